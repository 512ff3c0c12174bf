//! Encodes rows in PostgreSQL's binary COPY format
//! (<https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4>).
//!
//! A COPY stream is a header, rows, and a trailer. Rows are encoded once, when
//! a point is accepted, and the batch only concatenates them.

use bytes::{BufMut, BytesMut};

use crate::location::{LocationRef, ValidLocation};

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01),
/// from which a binary `timestamptz` counts.
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
const FIELD_COUNT: i16 = 11;
/// The jsonb binary format: a version byte, then the JSON text.
const JSONB_VERSION: u8 = 1;

/// Writes the 19-byte header: signature, flags (no OIDs), no extension.
pub fn encode_header(buf: &mut BytesMut) {
    buf.put_slice(SIGNATURE);
    buf.put_i32(0);
    buf.put_i32(0);
}

/// Writes the end-of-data marker.
pub fn encode_trailer(buf: &mut BytesMut) {
    buf.put_i16(-1);
}

/// The exact size of [`encode_row`]'s output for `loc`.
pub fn encoded_len(loc: &ValidLocation) -> usize {
    let opt = |o: Option<f32>| 4 + if o.is_some() { 4 } else { 0 };
    2 + (4 + 8)
        + 2 * (4 + 16)
        + (4 + loc.app_source.len())
        + 2 * (4 + 8)
        + opt(loc.accuracy)
        + opt(loc.altitude)
        + opt(loc.speed)
        + opt(loc.heading)
        + 4
        + loc.metadata.as_ref().map_or(0, |m| 1 + m.len())
}

/// Appends one row of [`COLUMNS`](crate::location::COLUMNS): `timestamptz,
/// uuid, uuid, text, float8, float8, float4, float4, float4, float4, jsonb`,
/// each as a length and big-endian bytes, or length -1 for NULL.
pub fn encode_row(buf: &mut BytesMut, loc: &ValidLocation) {
    buf.reserve(encoded_len(loc));
    buf.put_i16(FIELD_COUNT);
    buf.put_i32(8);
    buf.put_i64(loc.time_us - PG_EPOCH_OFFSET_US);
    buf.put_i32(16);
    buf.put_slice(loc.device_id.as_bytes());
    buf.put_i32(16);
    buf.put_slice(loc.user_id.as_bytes());
    put_text(buf, &loc.app_source);
    buf.put_i32(8);
    buf.put_f64(loc.latitude);
    buf.put_i32(8);
    buf.put_f64(loc.longitude);
    for v in [loc.accuracy, loc.altitude, loc.speed, loc.heading] {
        match v {
            Some(x) => {
                buf.put_i32(4);
                buf.put_f32(x);
            }
            None => buf.put_i32(-1),
        }
    }
    match &loc.metadata {
        Some(json) => {
            buf.put_i32(len_i32(json.len() + 1));
            buf.put_u8(JSONB_VERSION);
            buf.put_slice(json.as_bytes());
        }
        None => buf.put_i32(-1),
    }
}

/// Reads back one row written by [`encode_row`]; `None` if `row` is not one.
/// Committed rows are decoded this way for the latest-position map and the
/// live feed, so the pipeline keeps only the encoded bytes.
pub fn decode_row(row: &[u8]) -> Option<ValidLocation> {
    read_row(row).map(|l| l.to_owned())
}

/// [`decode_row`], borrowing the row's strings.
pub fn read_row(row: &[u8]) -> Option<LocationRef<'_>> {
    let mut r = Reader(row);
    if r.i16()? != FIELD_COUNT {
        return None;
    }
    let time_us = i64::from_be_bytes(r.field_exact::<8>()?) + PG_EPOCH_OFFSET_US;
    let device_id = uuid::Uuid::from_bytes(r.field_exact::<16>()?);
    let user_id = uuid::Uuid::from_bytes(r.field_exact::<16>()?);
    let app_source = std::str::from_utf8(r.field()??).ok()?;
    let latitude = f64::from_be_bytes(r.field_exact::<8>()?);
    let longitude = f64::from_be_bytes(r.field_exact::<8>()?);
    let mut opt = || -> Option<Option<f32>> {
        Some(match r.field()? {
            None => None,
            Some(b) => Some(f32::from_be_bytes(b.try_into().ok()?)),
        })
    };
    let (accuracy, altitude, speed, heading) = (opt()?, opt()?, opt()?, opt()?);
    let metadata = match r.field()? {
        None => None,
        Some([JSONB_VERSION, json @ ..]) => Some(std::str::from_utf8(json).ok()?),
        Some(_) => return None,
    };
    Some(LocationRef {
        time_us,
        device_id,
        user_id,
        app_source,
        latitude,
        longitude,
        accuracy,
        altitude,
        speed,
        heading,
        metadata,
    })
}

/// The byte range of each row in `rows`, rows written by [`encode_row`]
/// one after another (as a batch is committed and published to the other
/// instances); `None` unless every row reads back as a location.
pub fn split_rows(rows: &[u8]) -> Option<Vec<std::ops::Range<u32>>> {
    let mut ranges = Vec::new();
    let mut start = 0usize;
    while start < rows.len() {
        let mut r = Reader(&rows[start..]);
        if r.i16()? != FIELD_COUNT {
            return None;
        }
        for _ in 0..FIELD_COUNT {
            r.field()?;
        }
        let end = rows.len() - r.0.len();
        read_row(&rows[start..end])?;
        ranges.push(u32::try_from(start).ok()?..u32::try_from(end).ok()?);
        start = end;
    }
    Some(ranges)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn i16(&mut self) -> Option<i16> {
        Some(i16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    /// A field: `Some(None)` for NULL.
    fn field(&mut self) -> Option<Option<&'a [u8]>> {
        let len = i32::from_be_bytes(self.take(4)?.try_into().ok()?);
        if len < 0 {
            Some(None)
        } else {
            self.take(len as usize).map(Some)
        }
    }

    fn field_exact<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.field()??.try_into().ok()
    }
}

fn put_text(buf: &mut BytesMut, s: &str) {
    buf.put_i32(len_i32(s.len()));
    buf.put_slice(s.as_bytes());
}

/// Field lengths are bounded by validation (metadata and app_source limits)
/// far below `i32::MAX`.
fn len_i32(n: usize) -> i32 {
    i32::try_from(n).expect("validated field lengths fit in i32")
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn loc(metadata: Option<&str>, speed: Option<f32>) -> ValidLocation {
        ValidLocation {
            time_us: PG_EPOCH_OFFSET_US + 1,
            device_id: Uuid::from_u128(0x0102),
            app_source: "ab".into(),
            speed,
            metadata: metadata.map(str::to_string),
            ..ValidLocation::example()
        }
    }

    /// Rows one after another split back at their ends; a cut row, a
    /// wrong field count or bytes after the last row are refused whole.
    #[test]
    fn split_rows_finds_each_row_and_refuses_a_broken_one() {
        let mut b = BytesMut::new();
        let rows = [loc(Some("{\"a\":1}"), Some(2.0)), loc(None, None)];
        for l in &rows {
            encode_row(&mut b, l);
        }
        let ranges = split_rows(&b).expect("two whole rows");
        assert_eq!(ranges.len(), 2);
        for (range, l) in ranges.iter().zip(&rows) {
            let row = &b[range.start as usize..range.end as usize];
            assert_eq!(decode_row(row).as_ref(), Some(l));
        }
        assert_eq!(split_rows(&[]), Some(vec![]));
        assert_eq!(split_rows(&b[..b.len() - 1]), None);
        let mut extra = b.clone();
        extra.extend_from_slice(&[0]);
        assert_eq!(split_rows(&extra), None);
        let mut wrong_count = b.clone();
        wrong_count[1] = 10;
        assert_eq!(split_rows(&wrong_count), None);
    }

    #[test]
    fn header_and_trailer() {
        let mut b = BytesMut::new();
        encode_header(&mut b);
        encode_trailer(&mut b);
        assert_eq!(&b[..], b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0\xff\xff");
    }

    #[test]
    fn row_layout() {
        let mut b = BytesMut::new();
        let l = loc(Some("{}"), Some(2.0));
        encode_row(&mut b, &l);
        assert_eq!(b.len(), encoded_len(&l));
        assert_eq!(&b[0..2], &[0, 11]);
        assert_eq!(&b[2..14], &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(&b[14..18], &[0, 0, 0, 16]);
        assert_eq!(b[18 + 15], 0x02);
        // app_source: length 2, "ab"
        let text = 2 + 12 + 20 + 20;
        assert_eq!(&b[text..text + 6], b"\0\0\0\x02ab");
        // jsonb: version byte then the text
        assert_eq!(&b[b.len() - 7..], b"\0\0\0\x03\x01{}");
    }

    #[test]
    fn rows_decode_back() {
        for l in [loc(Some(r#"{"a": 1}"#), Some(2.5)), loc(None, None)] {
            let mut b = BytesMut::new();
            encode_row(&mut b, &l);
            assert_eq!(decode_row(&b), Some(l));
            assert_eq!(decode_row(&b[..b.len() - 1]), None);
        }
    }

    #[test]
    fn nulls_are_minus_one() {
        let mut b = BytesMut::new();
        let l = loc(None, None);
        encode_row(&mut b, &l);
        assert_eq!(b.len(), encoded_len(&l));
        assert_eq!(&b[b.len() - 4..], &[0xff; 4]);
    }
}
