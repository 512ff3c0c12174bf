//! From accepted points to committed rows: a bounded buffer, the batcher and
//! the writers.
//!
//! Producers (the ingest handlers) first take a [`Reservation`] from the
//! buffer budget, then hand a [`Submission`] to the batcher through a bounded
//! channel. The reservation travels with the submission and is released only
//! when its points are committed or have failed, so memory is bounded by
//! `--buffer-points` and `--buffer-bytes`.

pub mod batcher;
pub mod copy_encoder;
pub mod writer;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc, oneshot};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::{
    config::PipelineArgs,
    location::ValidLocation,
    metrics::{BUFFER_BYTES, BUFFER_POINTS},
};
pub use writer::WriteError;

/// The identity of a stored point: duplicates share it. A device id is
/// unique only within its app_source (one phone may run two apps with the
/// same id), so the app_source is part of it. Points of one submission share
/// one allocation of their app_source: a key costs a reference count, not a
/// string.
pub type PointKey = (Arc<str>, Uuid, i64);

/// What happened to the points of one submission, once committed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Newly stored.
    pub accepted: u32,
    /// Already stored (or sent twice in flight); not stored again.
    pub duplicates: u32,
    /// Rows the database refused for their data (see
    /// `WriteError::is_point_refusal`), in row order: not stored, the others were.
    pub refused: Vec<RefusedRow>,
}

/// A row of a submission that the database refused for its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedRow {
    /// Its position among the submission's rows.
    pub row: u32,
    /// Why, for the client (the SQLSTATE and its condition; the database's
    /// own message, which may name the schema's objects, stays in the log).
    pub message: String,
}

/// Accepted points of one client batch, encoded and ready to COPY.
#[derive(Debug)]
pub struct Submission {
    /// Rows in binary COPY format, without header or trailer.
    pub rows: Bytes,
    /// One key per row, in row order.
    pub keys: Vec<PointKey>,
    /// Byte range of each row within `rows`, to rebuild a batch without some rows.
    pub row_ends: Vec<u32>,
    pub reply: oneshot::Sender<Result<WriteOutcome, WriteError>>,
    /// Released when the submission is dropped, that is after its reply.
    pub reservation: Reservation,
}

impl Submission {
    /// Each row: its byte range in `rows`, and its key.
    pub fn rows(&self) -> impl Iterator<Item = (std::ops::Range<usize>, &PointKey)> + Clone {
        let starts = std::iter::once(0).chain(self.row_ends.iter().map(|e| *e as usize));
        starts
            .zip(self.row_ends.iter().map(|e| *e as usize))
            .map(|(a, b)| a..b)
            .zip(&self.keys)
    }
}

impl Submission {
    /// Rows `range` as a submission of their own, sharing this one's bytes,
    /// whose reply goes nowhere: the writer answers for the whole.
    fn part(&self, range: std::ops::Range<usize>) -> Submission {
        let start = match range.start {
            0 => 0,
            i => self.row_ends[i - 1],
        };
        let end = self.row_ends[range.end - 1];
        Submission {
            rows: self.rows.slice(start as usize..end as usize),
            keys: self.keys[range.clone()].to_vec(),
            row_ends: self.row_ends[range].iter().map(|e| e - start).collect(),
            reply: oneshot::channel().0,
            reservation: Reservation::nothing(),
        }
    }
}

/// Encodes accepted points into a [`Submission`]'s parts.
#[derive(Debug, Default)]
pub struct SubmissionBuilder {
    rows: BytesMut,
    keys: Vec<PointKey>,
    row_ends: Vec<u32>,
}

impl SubmissionBuilder {
    /// The app_source of the point pushed last, shared with it when the
    /// next is of the same app (as nearly every point of a batch is).
    fn app_of(&self, app_source: &str) -> Arc<str> {
        match self.keys.last() {
            Some((app, _, _)) if **app == *app_source => Arc::clone(app),
            _ => Arc::from(app_source),
        }
    }

    pub fn with_capacity(points: usize) -> Self {
        Self {
            rows: BytesMut::with_capacity(points * 120),
            keys: Vec::with_capacity(points),
            row_ends: Vec::with_capacity(points),
        }
    }

    pub fn push(&mut self, loc: &ValidLocation) {
        copy_encoder::encode_row(&mut self.rows, loc);
        let app = self.app_of(&loc.app_source);
        self.keys.push((app, loc.device_id, loc.time_us));
        self.row_ends
            .push(u32::try_from(self.rows.len()).unwrap_or(u32::MAX));
    }

    pub fn points(&self) -> usize {
        self.keys.len()
    }

    pub fn bytes(&self) -> usize {
        self.rows.len()
    }

    pub fn finish(
        self,
        reservation: Reservation,
    ) -> (
        Submission,
        oneshot::Receiver<Result<WriteOutcome, WriteError>>,
    ) {
        let (reply, rx) = oneshot::channel();
        let sub = Submission {
            rows: self.rows.freeze(),
            keys: self.keys,
            row_ends: self.row_ends,
            reply,
            reservation,
        };
        (sub, rx)
    }
}

/// A share of the buffer budget. Dropping it gives the share back.
#[derive(Debug)]
pub struct Reservation {
    points: OwnedSemaphorePermit,
    bytes: OwnedSemaphorePermit,
}

impl Reservation {
    /// A share of nothing: for a part of a submission that the writer writes
    /// apart, while the whole submission holds the real share.
    fn nothing() -> Reservation {
        let none = || {
            Arc::new(Semaphore::new(0))
                .try_acquire_many_owned(0)
                .expect("no permits are always available")
        };
        Reservation {
            points: none(),
            bytes: none(),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        metrics::gauge!(BUFFER_POINTS).decrement(self.points.num_permits() as f64);
        metrics::gauge!(BUFFER_BYTES).decrement(self.bytes.num_permits() as f64);
    }
}

/// Why a submission could not be taken now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the ingest buffer is full")]
    BufferFull,
    #[error("the pipeline is shutting down")]
    Closed,
}

/// The buffer's budget of points and bytes.
#[derive(Debug, Clone)]
pub struct Budget {
    points: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    capacity: (usize, usize),
}

impl Budget {
    pub fn new(points: usize, bytes: usize) -> Self {
        Self {
            points: Arc::new(Semaphore::new(points)),
            bytes: Arc::new(Semaphore::new(bytes)),
            capacity: (points, bytes),
        }
    }

    /// Waits until the buffer has room for `points` and `bytes`. A request
    /// larger than the whole budget takes all of it, so it waits for an empty
    /// buffer instead of forever.
    pub async fn reserve(&self, points: usize, bytes: usize) -> Result<Reservation, Refused> {
        let (points, bytes) = self.clamp(points, bytes);
        let p = Arc::clone(&self.points)
            .acquire_many_owned(permits(points))
            .await
            .map_err(|_| Refused::Closed)?;
        let b = Arc::clone(&self.bytes)
            .acquire_many_owned(permits(bytes))
            .await
            .map_err(|_| Refused::Closed)?;
        Ok(Self::reserved(p, b))
    }

    /// Takes room for `points` and `bytes` now, or refuses.
    pub fn try_reserve(&self, points: usize, bytes: usize) -> Result<Reservation, Refused> {
        let (points, bytes) = self.clamp(points, bytes);
        let map = |e| match e {
            TryAcquireError::NoPermits => Refused::BufferFull,
            TryAcquireError::Closed => Refused::Closed,
        };
        let p = Arc::clone(&self.points)
            .try_acquire_many_owned(permits(points))
            .map_err(map)?;
        let b = Arc::clone(&self.bytes)
            .try_acquire_many_owned(permits(bytes))
            .map_err(map)?;
        Ok(Self::reserved(p, b))
    }

    /// Whether `points` would fit now (as [`Budget::try_reserve`] counts
    /// them; bytes are not known before the points are encoded). A hint: by
    /// the time the caller reserves, others may have taken the room.
    pub fn has_room_for(&self, points: usize) -> bool {
        self.points.available_permits() >= permits(self.clamp(points, 0).0) as usize
    }

    fn clamp(&self, points: usize, bytes: usize) -> (usize, usize) {
        (points.min(self.capacity.0), bytes.min(self.capacity.1))
    }

    fn reserved(points: OwnedSemaphorePermit, bytes: OwnedSemaphorePermit) -> Reservation {
        metrics::gauge!(BUFFER_POINTS).increment(points.num_permits() as f64);
        metrics::gauge!(BUFFER_BYTES).increment(bytes.num_permits() as f64);
        Reservation { points, bytes }
    }
}

/// The producers' handle on the pipeline. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Pipeline {
    tx: mpsc::Sender<Submission>,
    pub budget: Budget,
}

impl Pipeline {
    /// Starts the batcher and its writers. The task ends once every clone of
    /// the returned [`Pipeline`] is dropped and all it was given is written.
    pub fn start<W: batcher::WriteFlush>(
        writer: W,
        settings: &PipelineArgs,
        budget: Budget,
        drain: tokio_util::sync::CancellationToken,
    ) -> (Pipeline, JoinHandle<()>) {
        // Each submission holds at least one point of the budget, so the
        // channel can never hold more than that many submissions; the
        // smaller bound keeps its own memory small.
        let (tx, rx) = mpsc::channel(budget.capacity.0.clamp(1, 65_536));
        let task = tokio::spawn(batcher::run(
            rx,
            batcher::Settings::from(settings),
            writer,
            drain,
        ));
        (Pipeline { tx, budget }, task)
    }

    /// Hands a submission to the batcher.
    pub async fn submit(&self, sub: Submission) -> Result<(), Refused> {
        self.tx.send(sub).await.map_err(|_| Refused::Closed)
    }
}

/// Limits are checked at start to fit in u32 (see `ServeConfig::validate`),
/// and a single request never exceeds them.
fn permits(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_what_a_reservation_of_points_would_find() {
        let budget = Budget::new(10, 1_000);
        assert!(budget.has_room_for(10));
        let held = budget.try_reserve(7, 1).unwrap();
        assert!(budget.has_room_for(3));
        assert!(!budget.has_room_for(4));
        assert_eq!(budget.try_reserve(4, 1).unwrap_err(), Refused::BufferFull);
        drop(held);
        // Larger than the whole budget: it takes all of it, so it needs an
        // empty buffer, as try_reserve.
        assert!(budget.has_room_for(50));
        let _one = budget.try_reserve(1, 1).unwrap();
        assert!(!budget.has_room_for(50));
    }
}
