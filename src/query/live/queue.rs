//! Each subscriber's queue: the points matched for it and not yet taken,
//! bounded in points, and taken from it as updates.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use bytes::BytesMut;
use tokio::sync::Notify;

use super::{
    batch::{JsonEncoder, LiveBatch},
    filter::Filter,
};
use crate::{location::ValidLocation, query::encoded::EncodedLocations};

/// Points of one batch, by index, in order.
#[derive(Debug)]
pub(super) struct Chunk {
    batch: Arc<LiveBatch>,
    points: Vec<u32>,
    /// Whether `batch` is the committed batch, shared with other
    /// subscribers, rather than a copy of just these points.
    shared: bool,
}

impl Chunk {
    pub(super) fn new(batch: Arc<LiveBatch>, points: Vec<u32>) -> Self {
        Self {
            batch,
            points,
            shared: true,
        }
    }

    /// These points, copied out of their batch into one of their own.
    fn compacted(&self) -> Self {
        let mut rows = BytesMut::new();
        let mut ranges = Vec::with_capacity(self.points.len());
        for row in self
            .points
            .iter()
            .filter_map(|i| self.batch.row(*i as usize))
        {
            let start = rows.len() as u32;
            rows.extend_from_slice(row);
            ranges.push(start..rows.len() as u32);
        }
        let mut batch = LiveBatch::of_rows(rows.freeze(), ranges);
        batch.wanted = vec![true; batch.len()];
        let points = (0..batch.len() as u32).collect();
        Self {
            batch: Arc::new(batch),
            points,
            shared: false,
        }
    }
}

/// What a subscriber takes at once: its oldest points not yet taken, at most
/// [`MAX_UPDATE_POINTS`], in the order they were committed.
#[derive(Debug)]
pub struct Update(Vec<Chunk>);

impl Update {
    pub fn len(&self) -> usize {
        self.0.iter().map(|c| c.points.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// As a `LiveUpdate`: each run of consecutive points of a batch is one
    /// copy of their frames.
    pub fn encoded(&self) -> EncodedLocations {
        let runs = || {
            self.0.iter().flat_map(|c| {
                c.points.chunk_by(|a, b| *a + 1 == *b).map(|run| {
                    let (first, last) = (run[0] as usize, run[run.len() - 1] as usize);
                    (c.batch.frames(first, last), run.len())
                })
            })
        };
        // Sized exactly: grown as it fills, most of it would be copied twice.
        let mut out = EncodedLocations::with_wire_capacity(runs().map(|(f, _)| f.len()).sum());
        for (frames, n) in runs() {
            out.extend_framed(frames, n);
        }
        out
    }

    /// Each point as JSON, written by `encode` once per committed batch
    /// for every subscriber that takes it (for Server-Sent Events).
    pub fn json(&self, encode: JsonEncoder) -> impl Iterator<Item = &[u8]> {
        self.0.iter().flat_map(move |c| {
            c.points
                .iter()
                .map(move |i| c.batch.json(*i as usize, encode))
        })
    }

    /// Each point, decoded (for tests).
    pub fn locations(&self) -> Vec<ValidLocation> {
        self.0
            .iter()
            .flat_map(|c| {
                c.points
                    .iter()
                    .filter_map(|i| c.batch.location(*i as usize).map(|l| l.to_owned()))
            })
            .collect()
    }
}

/// One subscriber's filter and queue.
#[derive(Debug)]
pub(super) struct Inbox {
    pub(super) filter: Filter,
    pub(super) queue: Mutex<Queue>,
    pub(super) ready: Notify,
}

/// A subscriber's points not yet taken, oldest first.
#[derive(Debug, Default)]
pub(super) struct Queue {
    chunks: VecDeque<Chunk>,
    pub(super) points: usize,
    pub(super) closed: bool,
}

impl Queue {
    /// Appends `chunk`, then drops the oldest points beyond `limit`;
    /// returns how many were dropped.
    ///
    /// A chunk holds its whole committed batch. A subscriber that falls
    /// behind keeps only its newest [`SHARED_CHUNKS`] so; older chunks are
    /// copied down to their own points, so that what it holds stays bounded
    /// by its points (`--live-queue-points`), not by the batches they came
    /// in.
    pub(super) fn push(&mut self, chunk: Chunk, limit: usize) -> usize {
        self.points += chunk.points.len();
        self.chunks.push_back(chunk);
        let older = self.chunks.len().saturating_sub(SHARED_CHUNKS);
        for c in self.chunks.iter_mut().take(older).rev() {
            if !c.shared {
                break; // and every older one is copied already
            }
            *c = c.compacted();
        }
        let dropped = self.points.saturating_sub(limit);
        let mut over = dropped;
        while over > 0
            && let Some(oldest) = self.chunks.front_mut()
        {
            if oldest.points.len() <= over {
                over -= oldest.points.len();
                self.chunks.pop_front();
            } else {
                oldest.points.drain(..over);
                over = 0;
            }
        }
        self.points -= dropped;
        dropped
    }

    /// The oldest points, at most `max`.
    pub(super) fn take(&mut self, max: usize) -> Update {
        let mut out = Vec::new();
        let mut n = 0;
        while n < max
            && let Some(oldest) = self.chunks.front_mut()
        {
            let room = max - n;
            if oldest.points.len() <= room {
                n += oldest.points.len();
                out.extend(self.chunks.pop_front());
            } else {
                out.push(Chunk {
                    batch: Arc::clone(&oldest.batch),
                    points: oldest.points.drain(..room).collect(),
                    shared: oldest.shared,
                });
                n = max;
            }
        }
        self.points -= n;
        Update(out)
    }
}

/// Chunks of a queue that may hold their whole committed batch.
const SHARED_CHUNKS: usize = 4;

/// At most this many points an update: about 450 KB encoded, within the
/// 4 MiB a gRPC client accepts by default, whatever `--live-queue-points`.
pub(super) const MAX_UPDATE_POINTS: usize = 4_096;

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use uuid::Uuid;

    use super::*;
    use crate::query::{
        encoded::to_proto,
        live::{
            Live, Subscription,
            batch::tests::{batch, point},
            filter::tests::bbox,
        },
    };

    /// What `sub` has now, without waiting.
    pub(crate) fn pending(sub: &Subscription) -> Vec<(f64, f64)> {
        let q = sub.inbox.queue.lock().unwrap();
        let update = Update(
            q.chunks
                .iter()
                .map(|c| Chunk::new(Arc::clone(&c.batch), c.points.clone()))
                .collect(),
        );
        assert_eq!(update.len(), q.points, "the queue counts its points");
        update
            .locations()
            .iter()
            .map(|l| (l.latitude, l.longitude))
            .collect()
    }

    #[test]
    fn a_subscriber_that_falls_behind_loses_its_oldest_points() {
        let live = Live::new(3, 10, Duration::ZERO);
        let slow = live.subscribe(Filter::default()).unwrap();
        let d = Uuid::from_u128(7);
        for lat in 0..5 {
            live.publish(batch(&[point(d, "a", f64::from(lat), 0.0)]));
        }
        // The newest three are kept, in order.
        assert_eq!(pending(&slow), [(2.0, 0.0), (3.0, 0.0), (4.0, 0.0)]);
        // A batch larger than the queue keeps its own newest points.
        live.publish(batch(
            &(10..15)
                .map(|lat| point(d, "a", f64::from(lat), 0.0))
                .collect::<Vec<_>>(),
        ));
        assert_eq!(pending(&slow), [(12.0, 0.0), (13.0, 0.0), (14.0, 0.0)]);
    }

    /// A subscriber that falls behind holds the whole committed batch of
    /// only its newest chunks; older ones are copies of its own points.
    #[tokio::test]
    async fn a_stalled_subscriber_holds_its_points_not_their_batches() {
        let live = Live::new(1_000, 1, Duration::ZERO);
        let mut stalled = live.subscribe(bbox((0.0, 1.0, 0.0, 1.0))).unwrap();
        let d = Uuid::from_u128(7);
        let lon = |b: i32| f64::from(b) / 10.0;
        let mut want = Vec::new();
        for b in 0..10 {
            // 100 points a batch, one of them in the box.
            let points: Vec<_> = (0..100)
                .map(|i| point(d, "a", if i == b { 0.5 } else { 50.0 }, lon(b)))
                .collect();
            live.publish(batch(&points));
            want.push((0.5, lon(b)));
        }
        {
            let q = stalled.inbox.queue.lock().unwrap();
            let held: Vec<_> = q.chunks.iter().map(|c| (c.shared, c.batch.len())).collect();
            let copied = 10 - SHARED_CHUNKS;
            assert_eq!(
                held,
                [vec![(false, 1); copied], vec![(true, 100); SHARED_CHUNKS]].concat()
            );
        }
        assert_eq!(pending(&stalled), want);
        let update = stalled.next().await.unwrap();
        let lons: Vec<_> = update.locations().iter().map(|l| l.longitude).collect();
        assert_eq!(lons, want.iter().map(|w| w.1).collect::<Vec<_>>());
        let encoded = update.encoded().locations().unwrap();
        assert_eq!(
            encoded.iter().map(|l| l.longitude).collect::<Vec<_>>(),
            lons
        );
    }

    /// A queue, through any mix of batches, drops and partial takes (and
    /// the copying of older chunks), behaves as a plain bounded list of its
    /// points: the newest `limit` kept, taken oldest first.
    #[test]
    fn a_queue_is_a_bounded_list_of_its_points() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(7);
        let d = Uuid::from_u128(7);
        for limit in [1, 5, 37, 200] {
            let mut queue = Queue::default();
            let mut model = VecDeque::new();
            let mut next = 0u32;
            for _ in 0..300 {
                if rng.random_bool(0.6) {
                    // A batch of up to 50 points, of which the subscriber
                    // wants some, in order.
                    let n = rng.random_range(1..50);
                    let points: Vec<_> = (next..next + n)
                        .map(|i| point(d, "a", 0.0, f64::from(i)))
                        .collect();
                    next += n;
                    let wanted: Vec<u32> = (0..n).filter(|_| rng.random_bool(0.3)).collect();
                    if wanted.is_empty() {
                        continue;
                    }
                    model.extend(wanted.iter().map(|i| points[*i as usize].longitude));
                    let mut b = batch(&points);
                    b.wanted = vec![true; b.len()];
                    let dropped = queue.push(Chunk::new(Arc::new(b), wanted), limit);
                    let over = model.len().saturating_sub(limit);
                    model.drain(..over);
                    assert_eq!(dropped, over);
                } else {
                    let max = rng.random_range(1..60);
                    let update = queue.take(max);
                    let want: Vec<_> = model.drain(..max.min(model.len())).collect();
                    let got: Vec<_> = update.locations().iter().map(|l| l.longitude).collect();
                    assert_eq!(got, want);
                    let encoded = update.encoded().locations().unwrap();
                    assert_eq!(
                        encoded.iter().map(|l| l.longitude).collect::<Vec<_>>(),
                        want
                    );
                }
                assert_eq!(queue.points, model.len());
                let held: usize = queue.chunks.iter().map(|c| c.points.len()).sum();
                assert_eq!(held, model.len());
                assert!(
                    queue
                        .chunks
                        .iter()
                        .rev()
                        .skip(SHARED_CHUNKS)
                        .all(|c| !c.shared)
                );
            }
        }
    }

    #[tokio::test]
    async fn a_long_queue_is_taken_in_bounded_updates_in_order() {
        let live = Live::new(10_000, 1, Duration::ZERO);
        let mut sub = live.subscribe(Filter::default()).unwrap();
        let d = Uuid::from_u128(7);
        let n = MAX_UPDATE_POINTS + 10;
        let lon = |i: usize| i as f64 * 1e-4;
        // Two batches, the first split across the two updates.
        let all: Vec<_> = (0..n).map(|i| point(d, "a", 0.0, lon(i))).collect();
        live.publish(batch(&all[..n - 5]));
        live.publish(batch(&all[n - 5..]));
        let first = sub.next().await.unwrap();
        let second = sub.next().await.unwrap();
        assert_eq!((first.len(), second.len()), (MAX_UPDATE_POINTS, 10));
        let lons: Vec<_> = [first, second]
            .iter()
            .flat_map(|u| u.locations())
            .map(|l| l.longitude)
            .collect();
        assert_eq!(lons, (0..n).map(lon).collect::<Vec<_>>());
    }

    /// An update's encoding is its points' encodings, in order, whether they
    /// come in runs of a batch or one by one, from one batch or several, in a
    /// buffer of exactly their size.
    #[tokio::test]
    async fn an_update_encodes_its_points_in_order() {
        let live = Live::new(1_000, 1, Duration::ZERO);
        let mut sub = live.subscribe(bbox((0.0, 10.0, 0.0, 10.0))).unwrap();
        let d = Uuid::from_u128(7);
        let mut sent = Vec::new();
        for batch_lats in [
            &[1.0, 2.0, 3.0, 20.0, 4.0, 20.0, 20.0, 5.0, 6.0][..],
            &[20.0, 7.0][..],
        ] {
            let points: Vec<_> = batch_lats
                .iter()
                .enumerate()
                .map(|(i, lat)| ValidLocation {
                    time_us: 1_700_000_000_000_000 + i as i64,
                    metadata: (i % 2 == 0).then(|| r#"{"i":1}"#.into()),
                    speed: Some(i as f32),
                    ..point(d, "a", *lat, 1.0)
                })
                .collect();
            live.publish(batch(&points));
            sent.extend(points.into_iter().filter(|p| p.latitude < 10.0));
        }
        let update = sub.next().await.unwrap();
        assert_eq!(update.locations(), sent);
        let want: Vec<_> = sent.into_iter().map(to_proto).collect();
        let encoded = update.encoded();
        assert_eq!(encoded.locations().unwrap(), want);
        assert_eq!(encoded.len(), 7);
        assert_eq!(encoded.spare_capacity(), 0, "an update is sized exactly");
    }
}
