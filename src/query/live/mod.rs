//! The live feed: every newly committed point, to each subscriber whose
//! filter it matches.
//!
//! Subscribers are indexed by what they filter on, so a committed point is
//! matched once against the few subscribers that may want it, not once per
//! subscriber: by device id, by a grid cell of its bounding box, by
//! app_source, or (no filter) everyone. Each subscriber has its own queue,
//! bounded in points (`--live-queue-points`); one that falls behind loses
//! its oldest points, counted in `locus_live_dropped_total`, and the writers
//! never wait for it. It takes an update at most every `--live-interval`:
//! what commits meanwhile goes in the next one.
//!
//! Here the feed and its subscriptions; beside it, what a subscriber asks
//! for (`filter`), the committed batch and its encodings (`batch`), each
//! subscriber's queue (`queue`) and the index (`index`).

mod batch;
mod filter;
mod index;
mod queue;

use std::{
    sync::{Arc, Mutex, RwLock, Weak},
    time::Duration,
};

use foldhash::HashMap;
use tokio::{
    sync::{Notify, Semaphore},
    time::Instant,
};

pub use self::{
    batch::{JsonEncoder, LiveBatch},
    filter::Filter,
    queue::Update,
};
use self::{
    index::Index,
    queue::{Chunk, Inbox, MAX_UPDATE_POINTS},
};
use crate::metrics::{LIVE_DROPPED, LIVE_SUBSCRIBERS};

/// The live feed's subscribers and their index.
#[derive(Debug)]
pub struct Live {
    index: RwLock<Index>,
    /// A subscription holds one slot for as long as it is in the index.
    slots: Arc<Semaphore>,
    max_subscribers: usize,
    queue_points: usize,
    interval: Duration,
}

/// A subscription: holds one of the `--max-subscribers` slots, and leaves
/// the index when dropped.
#[derive(Debug)]
pub struct Subscription {
    inbox: Arc<Inbox>,
    /// Weak: the feed's end (its owner dropping it) ends the subscription.
    live: Weak<Live>,
    _slot: tokio::sync::OwnedSemaphorePermit,
    /// The slot of its caller's token (`--max-subscribers-per-token`).
    _token_slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// When the next update may be taken (`--live-interval` after the last).
    next_at: Option<Instant>,
    interval: Duration,
}

impl Subscription {
    /// Holds `slot` (its token's) for as long as the subscription lives.
    pub fn holding(mut self, slot: tokio::sync::OwnedSemaphorePermit) -> Self {
        self._token_slot = Some(slot);
        self
    }

    /// The oldest matching points not yet taken (at most
    /// [`MAX_UPDATE_POINTS`]), waiting for at least one, and for
    /// `--live-interval` since the last update: what commits meanwhile goes
    /// in the next update whole. `None` when the feed ends.
    pub async fn next(&mut self) -> Option<Update> {
        if let Some(at) = self.next_at {
            tokio::time::sleep_until(at).await;
        }
        loop {
            {
                let mut q = self.inbox.queue.lock().unwrap_or_else(|e| e.into_inner());
                if q.points > 0 {
                    if !self.interval.is_zero() {
                        self.next_at = Some(Instant::now() + self.interval);
                    }
                    return Some(q.take(MAX_UPDATE_POINTS));
                }
                if q.closed {
                    return None;
                }
            }
            // A notification given between the check and here is kept (one
            // permit), so none is lost.
            self.inbox.ready.notified().await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(live) = self.live.upgrade() {
            live.remove(&self.inbox);
        }
        metrics::gauge!(LIVE_SUBSCRIBERS).decrement(1.0);
    }
}

impl Live {
    /// `queue_points`: the most points a subscriber may fall behind;
    /// `interval`: the least time between two updates to one subscriber.
    pub fn new(queue_points: usize, max_subscribers: usize, interval: Duration) -> Arc<Self> {
        Arc::new(Self {
            index: RwLock::default(),
            slots: Arc::new(Semaphore::new(max_subscribers)),
            max_subscribers,
            queue_points: queue_points.max(1),
            interval,
        })
    }

    pub fn subscribe(self: &Arc<Self>, filter: Filter) -> Option<Subscription> {
        let slot = Arc::clone(&self.slots).try_acquire_owned().ok()?;
        let inbox = Arc::new(Inbox {
            filter,
            queue: Mutex::default(),
            ready: Notify::new(),
        });
        self.write().insert(&inbox);
        metrics::gauge!(LIVE_SUBSCRIBERS).increment(1.0);
        Some(Subscription {
            inbox,
            live: Arc::downgrade(self),
            _slot: slot,
            _token_slot: None,
            next_at: None,
            interval: self.interval,
        })
    }

    fn remove(&self, inbox: &Arc<Inbox>) {
        self.write().remove(inbox);
    }

    /// Whether anyone listens: a committed batch's rows are kept only then.
    pub fn has_subscribers(&self) -> bool {
        self.slots.available_permits() < self.max_subscribers
    }

    /// Hands each point of `batch` to the subscribers it matches.
    pub fn publish(&self, mut batch: LiveBatch) {
        if batch.is_empty() || !self.has_subscribers() {
            return;
        }
        // Group by subscriber first: one lock and one wake-up each.
        let mut hits: HashMap<*const Inbox, (Arc<Inbox>, Vec<u32>)> = HashMap::default();
        let mut wanted = vec![false; batch.len()];
        {
            let index = self.index.read().unwrap_or_else(|e| e.into_inner());
            for (i, wanted) in wanted.iter_mut().enumerate() {
                let Some(l) = batch.location(i) else { continue };
                index.candidates(&l, |inbox| {
                    if inbox.filter.matches(&l) {
                        *wanted = true;
                        hits.entry(Arc::as_ptr(inbox))
                            .or_insert_with(|| (Arc::clone(inbox), Vec::new()))
                            .1
                            .push(i as u32);
                    }
                });
            }
        }
        batch.wanted = wanted;
        let batch = Arc::new(batch);
        let mut dropped = 0;
        for (inbox, points) in hits.into_values() {
            let chunk = Chunk::new(Arc::clone(&batch), points);
            dropped += inbox
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(chunk, self.queue_points);
            inbox.ready.notify_one();
        }
        if dropped > 0 {
            metrics::counter!(LIVE_DROPPED).increment(dropped as u64);
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Live {
    /// Ends every subscription: their next call returns `None`.
    fn drop(&mut self) {
        let index = self.index.get_mut().unwrap_or_else(|e| e.into_inner());
        for inbox in index.all() {
            inbox.queue.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
            inbox.ready.notify_one();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use uuid::Uuid;

    pub(crate) use super::batch::tests::batch;
    use super::{batch::tests::point, filter::tests::bbox, *};

    /// Updates to one subscriber come at most every interval; what commits
    /// meanwhile waits for the next, whole and in order.
    #[tokio::test(start_paused = true)]
    async fn updates_come_at_most_every_interval() {
        let live = Live::new(1_000, 1, Duration::from_millis(100));
        let mut sub = live.subscribe(Filter::default()).unwrap();
        let d = Uuid::from_u128(7);
        let at = |lat: f64| batch(&[point(d, "a", lat, 0.0)]);
        let lats = |u: Update| u.locations().iter().map(|l| l.latitude).collect::<Vec<_>>();
        let start = Instant::now();
        live.publish(at(1.0));
        assert_eq!(lats(sub.next().await.unwrap()), [1.0]);
        assert_eq!(start.elapsed(), Duration::ZERO, "the first comes at once");
        live.publish(at(2.0));
        tokio::time::sleep(Duration::from_millis(30)).await;
        live.publish(at(3.0));
        assert_eq!(lats(sub.next().await.unwrap()), [2.0, 3.0]);
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        // After a quiet spell longer than the interval, a point goes at once.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let quiet = Instant::now();
        live.publish(at(4.0));
        assert_eq!(lats(sub.next().await.unwrap()), [4.0]);
        assert_eq!(quiet.elapsed(), Duration::ZERO);
    }

    #[tokio::test]
    async fn subscriptions_leave_the_index_and_end_with_the_feed() {
        let live = Live::new(10, 2, Duration::ZERO);
        let d = Uuid::from_u128(7);
        let s1 = live.subscribe(bbox((0.0, 1.0, 0.0, 1.0))).unwrap();
        let mut s2 = live
            .subscribe(Filter {
                devices: Some([d].into()),
                ..Filter::default()
            })
            .unwrap();
        assert!(live.subscribe(Filter::default()).is_none(), "2 slots");
        drop(s1);
        assert!(live.read_all().len() == 1, "s1 left the index");
        let s3 = live.subscribe(Filter::default()).unwrap();
        drop(s3);
        live.publish(batch(&[point(d, "a", 0.5, 0.5)]));
        assert_eq!(s2.next().await.unwrap().len(), 1);
        // The feed goes away (shutdown): the subscription ends.
        let waiting = tokio::spawn(async move { s2.next().await.is_none() });
        tokio::task::yield_now().await;
        drop(live);
        assert!(waiting.await.unwrap());
    }

    impl Live {
        fn read_all(&self) -> Vec<Arc<Inbox>> {
            self.index.read().unwrap().all()
        }
    }
}
