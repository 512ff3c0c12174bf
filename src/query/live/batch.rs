//! One committed batch's new points as the live feed carries them, and
//! their two encodings, each made once for every subscriber: protobuf
//! frames for gRPC, JSON for Server-Sent Events.

use std::{ops::Range, sync::OnceLock};

use bytes::Bytes;

use crate::{
    location::LocationRef,
    pipeline::copy_encoder::read_row,
    query::encoded::{encode_location, put_framed},
};

/// One committed batch's new points, as the live feed carries them: their
/// COPY rows, shared with the batch (not copied), read in place to match
/// them; and, made once by the first gRPC subscriber to take from the
/// batch, the protobuf encoding of every point that some subscriber wants,
/// one after another. A subscriber's update is then a copy of its points'
/// runs of that one buffer: no allocation or encoding per point and
/// subscriber (what that saves: load-tests/RESULTS.md, "A committed batch
/// is held once, and encoded once").
#[derive(Debug, Default)]
pub struct LiveBatch {
    rows: Vec<Bytes>,
    /// Per point: which of `rows`, and its byte range there.
    points: Vec<(u32, Range<u32>)>,
    /// Per point: whether a subscriber matched it (only those are encoded).
    pub(super) wanted: Vec<bool>,
    /// The wanted points for gRPC subscribers.
    wire: OnceLock<Wire>,
    /// The wanted points as JSON, for Server-Sent Events.
    json: OnceLock<Wire>,
}

/// Each wanted point's encoding, one after another; an unwanted point has
/// none.
#[derive(Debug, Default)]
struct Wire {
    bytes: Vec<u8>,
    /// Per point, where its encoding ends in `bytes`.
    ends: Vec<u32>,
}

impl Wire {
    /// The encodings of points `first..=last`.
    fn of(&self, first: usize, last: usize) -> &[u8] {
        let start = match first {
            0 => 0,
            _ => self.ends[first - 1] as usize,
        };
        &self.bytes[start..self.ends[last] as usize]
    }
}

/// How the Server-Sent Events feed writes a point as JSON.
pub type JsonEncoder = fn(&LocationRef<'_>, &mut Vec<u8>);

impl LiveBatch {
    /// A batch of one buffer's rows, at `ranges` of it.
    pub fn of_rows(rows: Bytes, ranges: impl IntoIterator<Item = Range<u32>>) -> Self {
        let mut batch = Self::default();
        let all = batch.add_rows(rows);
        ranges.into_iter().for_each(|r| batch.push(all, r));
        batch
    }

    /// Adds a committed submission's rows; returns their number, for
    /// [`push`](Self::push).
    pub fn add_rows(&mut self, rows: Bytes) -> u32 {
        self.rows.push(rows);
        (self.rows.len() - 1) as u32
    }

    /// Adds the point whose row is `range` of rows `rows`.
    pub fn push(&mut self, rows: u32, range: Range<u32>) {
        self.points.push((rows, range));
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Point `i`'s COPY row.
    pub(super) fn row(&self, i: usize) -> Option<&[u8]> {
        let (rows, range) = self.points.get(i)?;
        self.rows
            .get(*rows as usize)?
            .get(range.start as usize..range.end as usize)
    }

    /// Point `i`, borrowed from its row; `None` if the row is not one.
    pub(super) fn location(&self, i: usize) -> Option<LocationRef<'_>> {
        read_row(self.row(i)?)
    }

    /// The wanted points, each written by `encode` into `cell`. Made by
    /// the first subscriber to ask; one asking meanwhile blocks its worker
    /// thread until it is made (a batch's few thousand points) rather than
    /// encode them again.
    fn encoded<'a>(
        &'a self,
        cell: &'a OnceLock<Wire>,
        mut encode: impl FnMut(&LocationRef<'_>, &mut Vec<u8>),
    ) -> &'a Wire {
        cell.get_or_init(|| {
            let mut wire = Wire {
                bytes: Vec::with_capacity(self.points.len() * 16),
                ends: Vec::with_capacity(self.points.len()),
            };
            for i in 0..self.points.len() {
                if self.wanted.get(i) == Some(&true)
                    && let Some(l) = self.location(i)
                {
                    encode(&l, &mut wire.bytes);
                }
                wire.ends
                    .push(u32::try_from(wire.bytes.len()).unwrap_or(u32::MAX));
            }
            wire
        })
    }

    /// The frames of points `first..=last`, each `LiveUpdate`'s field 1
    /// (key, length, `Location`).
    pub(super) fn frames(&self, first: usize, last: usize) -> &[u8] {
        // Allocated only when the batch is encoded, then reused point to point.
        let mut location = Vec::new();
        self.encoded(&self.wire, |l, out| {
            location.clear();
            encode_location(l, &mut location);
            put_framed(out, &location);
        })
        .of(first, last)
    }

    /// Point `i` as JSON, written by `encode` (the same function every
    /// time: the first call's encodes the batch).
    pub(super) fn json(&self, i: usize, encode: JsonEncoder) -> &[u8] {
        self.encoded(&self.json, encode).of(i, i)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use bytes::BytesMut;
    use uuid::Uuid;

    use super::*;
    use crate::{location::ValidLocation, pipeline::copy_encoder::encode_row};

    pub(crate) fn point(device: Uuid, app: &str, lat: f64, lon: f64) -> ValidLocation {
        ValidLocation {
            device_id: device,
            app_source: app.into(),
            latitude: lat,
            longitude: lon,
            ..ValidLocation::example()
        }
    }

    /// `points` as a committed batch: their COPY rows, in one buffer.
    pub(crate) fn batch(points: &[ValidLocation]) -> LiveBatch {
        let mut rows = BytesMut::new();
        let mut ranges = Vec::new();
        for p in points {
            let start = rows.len() as u32;
            encode_row(&mut rows, p);
            ranges.push(start..rows.len() as u32);
        }
        LiveBatch::of_rows(rows.freeze(), ranges)
    }
}
