//! The live feed: every newly committed point, to each subscriber whose
//! filter it matches.
//!
//! Subscribers are indexed by what they filter on, so a committed point is
//! matched once against the few subscribers that may want it, not once per
//! subscriber: by device id, by a grid cell of its bounding box, by
//! app_source, or (no filter) everyone. Each subscriber has its own queue,
//! bounded in points (`--live-queue-points`); one that falls behind loses
//! its oldest points, counted in `locus_live_dropped_total`, and the writers
//! never wait for it.

use std::{
    collections::{HashSet, VecDeque},
    sync::{Arc, Mutex, RwLock, Weak},
};

use foldhash::HashMap;
use tokio::sync::{Notify, Semaphore};
use uuid::Uuid;

use super::encoded::SharedLocation;
use crate::{ingest::validate::ValidLocation, metrics as m};

/// A committed point, shared by every subscriber that carries it (encoded
/// for gRPC at most once).
pub type LivePoint = Arc<SharedLocation>;

/// What a subscriber wants. Every filter that is set must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub app_source: Option<String>,
    pub devices: Option<HashSet<Uuid>>,
    /// (min_lat, max_lat, min_lon, max_lon)
    pub bbox: Option<(f64, f64, f64, f64)>,
}

impl Filter {
    pub fn matches(&self, l: &ValidLocation) -> bool {
        self.app_source.as_ref().is_none_or(|a| *a == l.app_source)
            && self
                .devices
                .as_ref()
                .is_none_or(|d| d.contains(&l.device_id))
            && self.bbox.is_none_or(|(a, b, c, d)| {
                (a..=b).contains(&l.latitude) && (c..=d).contains(&l.longitude)
            })
    }
}

/// The live feed's subscribers and their index.
#[derive(Debug)]
pub struct Live {
    index: RwLock<Index>,
    /// A subscription holds one slot for as long as it is in the index.
    slots: Arc<Semaphore>,
    max_subscribers: usize,
    queue_points: usize,
}

/// A subscription: holds one of the `--max-subscribers` slots, and leaves
/// the index when dropped.
#[derive(Debug)]
pub struct Subscription {
    inbox: Arc<Inbox>,
    /// Weak: the feed's end (its owner dropping it) ends the subscription.
    live: Weak<Live>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// One subscriber's filter and queue.
#[derive(Debug)]
struct Inbox {
    filter: Filter,
    queue: Mutex<Queue>,
    ready: Notify,
}

#[derive(Debug, Default)]
struct Queue {
    points: VecDeque<LivePoint>,
    closed: bool,
}

/// At most this many points an update: about 450 KB encoded, within the
/// 4 MiB a gRPC client accepts by default, whatever `--live-queue-points`.
const MAX_UPDATE_POINTS: usize = 4_096;

impl Subscription {
    /// The oldest matching points not yet taken (at most
    /// [`MAX_UPDATE_POINTS`]), waiting for at least one; `None` when the
    /// feed ends.
    pub async fn next(&mut self) -> Option<Vec<LivePoint>> {
        loop {
            {
                let mut q = self.inbox.queue.lock().unwrap_or_else(|e| e.into_inner());
                if !q.points.is_empty() {
                    let n = q.points.len().min(MAX_UPDATE_POINTS);
                    return Some(q.points.drain(..n).collect());
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
        metrics::gauge!(m::LIVE_SUBSCRIBERS).decrement(1.0);
    }
}

impl Live {
    /// `queue_points`: the most points a subscriber may fall behind.
    pub fn new(queue_points: usize, max_subscribers: usize) -> Arc<Self> {
        Arc::new(Self {
            index: RwLock::default(),
            slots: Arc::new(Semaphore::new(max_subscribers)),
            max_subscribers,
            queue_points: queue_points.max(1),
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
        metrics::gauge!(m::LIVE_SUBSCRIBERS).increment(1.0);
        Some(Subscription {
            inbox,
            live: Arc::downgrade(self),
            _slot: slot,
        })
    }

    fn remove(&self, inbox: &Arc<Inbox>) {
        self.write().remove(inbox);
    }

    /// Whether anyone listens: committed rows are decoded only then.
    pub fn has_subscribers(&self) -> bool {
        self.slots.available_permits() < self.max_subscribers
    }

    /// Hands each of `points` to the subscribers it matches.
    pub fn publish(&self, points: Vec<LivePoint>) {
        if points.is_empty() || !self.has_subscribers() {
            return;
        }
        // Group by subscriber first: one lock and one wake-up each.
        let mut hits: HashMap<*const Inbox, (Arc<Inbox>, Vec<LivePoint>)> = HashMap::default();
        {
            let index = self.index.read().unwrap_or_else(|e| e.into_inner());
            for p in &points {
                index.candidates(&p.location, |inbox| {
                    if inbox.filter.matches(&p.location) {
                        hits.entry(Arc::as_ptr(inbox))
                            .or_insert_with(|| (Arc::clone(inbox), Vec::new()))
                            .1
                            .push(Arc::clone(p));
                    }
                });
            }
        }
        let mut dropped = 0;
        for (inbox, new) in hits.into_values() {
            {
                let mut q = inbox.queue.lock().unwrap_or_else(|e| e.into_inner());
                q.points.extend(new);
                let over = q.points.len().saturating_sub(self.queue_points);
                q.points.drain(..over);
                dropped += over;
            }
            inbox.ready.notify_one();
        }
        if dropped > 0 {
            metrics::counter!(m::LIVE_DROPPED).increment(dropped as u64);
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

/// Finest grid level: cells of 180 / 2^16 degrees, about 300 m.
const FINEST: u8 = 16;

/// Subscribers by the one filter that narrows them most cheaply: their
/// device ids, else the grid cells their box covers, else their app_source,
/// else none. A candidate's whole filter is still checked.
#[derive(Debug, Default)]
struct Index {
    by_device: HashMap<Uuid, Vec<Arc<Inbox>>>,
    /// (level, latitude cell, longitude cell): a box sits at the finest
    /// level whose cells are at least its size, so it covers at most 2 x 2
    /// cells (3 x 3 at the poles and the antimeridian, where cells end).
    by_cell: HashMap<(u8, i32, i32), Vec<Arc<Inbox>>>,
    /// Subscribers at each level, so that a point is looked up only at the
    /// levels in use.
    levels: [usize; FINEST as usize + 1],
    by_app: HashMap<String, Vec<Arc<Inbox>>>,
    everyone: Vec<Arc<Inbox>>,
}

enum Key<'a> {
    Devices(&'a HashSet<Uuid>),
    Cells(u8, Vec<(i32, i32)>),
    App(&'a str),
    Everyone,
}

impl Index {
    fn key(filter: &Filter) -> Key<'_> {
        if let Some(d) = &filter.devices {
            Key::Devices(d)
        } else if let Some(b) = filter.bbox {
            let (level, cells) = cells(b);
            Key::Cells(level, cells)
        } else if let Some(a) = &filter.app_source {
            Key::App(a)
        } else {
            Key::Everyone
        }
    }

    fn insert(&mut self, inbox: &Arc<Inbox>) {
        let add = |v: &mut Vec<Arc<Inbox>>| v.push(Arc::clone(inbox));
        match Self::key(&inbox.filter) {
            Key::Devices(d) => d
                .iter()
                .for_each(|d| add(self.by_device.entry(*d).or_default())),
            Key::Cells(level, cells) => {
                self.levels[level as usize] += 1;
                for (la, lo) in cells {
                    add(self.by_cell.entry((level, la, lo)).or_default());
                }
            }
            Key::App(a) => add(self.by_app.entry(a.to_string()).or_default()),
            Key::Everyone => add(&mut self.everyone),
        }
    }

    fn remove(&mut self, inbox: &Arc<Inbox>) {
        fn take<K: std::hash::Hash + Eq>(
            map: &mut HashMap<K, Vec<Arc<Inbox>>>,
            k: K,
            inbox: &Arc<Inbox>,
        ) {
            if let Some(v) = map.get_mut(&k) {
                v.retain(|i| !Arc::ptr_eq(i, inbox));
                if v.is_empty() {
                    map.remove(&k);
                }
            }
        }
        match Self::key(&inbox.filter) {
            Key::Devices(d) => d.iter().for_each(|d| take(&mut self.by_device, *d, inbox)),
            Key::Cells(level, cells) => {
                self.levels[level as usize] -= 1;
                for (la, lo) in cells {
                    take(&mut self.by_cell, (level, la, lo), inbox);
                }
            }
            Key::App(a) => take(&mut self.by_app, a.to_string(), inbox),
            Key::Everyone => self.everyone.retain(|i| !Arc::ptr_eq(i, inbox)),
        }
    }

    /// Calls `f` with each subscriber that may want `l`, each at most once.
    fn candidates(&self, l: &ValidLocation, mut f: impl FnMut(&Arc<Inbox>)) {
        if !self.by_device.is_empty()
            && let Some(v) = self.by_device.get(&l.device_id)
        {
            v.iter().for_each(&mut f);
        }
        for (level, n) in self.levels.iter().enumerate() {
            if *n > 0 {
                let level = level as u8;
                let key = (
                    level,
                    cell(l.latitude, 90.0, level),
                    cell(l.longitude, 180.0, level),
                );
                if let Some(v) = self.by_cell.get(&key) {
                    v.iter().for_each(&mut f);
                }
            }
        }
        if !self.by_app.is_empty()
            && let Some(v) = self.by_app.get(l.app_source.as_str())
        {
            v.iter().for_each(&mut f);
        }
        self.everyone.iter().for_each(f);
    }

    /// Every subscriber, once.
    fn all(&self) -> Vec<Arc<Inbox>> {
        let mut seen = foldhash::HashSet::default();
        self.by_device
            .values()
            .chain(self.by_cell.values())
            .chain(self.by_app.values())
            .chain([&self.everyone])
            .flatten()
            .filter(|i| seen.insert(Arc::as_ptr(i)))
            .cloned()
            .collect()
    }
}

/// The cell of `degrees` (offset by `half`, so that cells start at -90 or
/// -180) at `level`.
fn cell(degrees: f64, half: f64, level: u8) -> i32 {
    let size = 180.0 / f64::from(1u32 << level);
    ((degrees + half) / size).floor() as i32
}

/// The level of a box, and the cells it covers there.
fn cells((min_lat, max_lat, min_lon, max_lon): (f64, f64, f64, f64)) -> (u8, Vec<(i32, i32)>) {
    // Points are within these bounds; a box beyond them covers no more.
    let (min_lat, max_lat) = (min_lat.max(-90.0), max_lat.min(90.0));
    let (min_lon, max_lon) = (min_lon.max(-180.0), max_lon.min(180.0));
    let extent = (max_lat - min_lat).max(max_lon - min_lon).max(0.0);
    let mut level = 0;
    while level < FINEST && 180.0 / f64::from(1u32 << (level + 1)) >= extent {
        level += 1;
    }
    let mut out = Vec::new();
    for la in cell(min_lat, 90.0, level)..=cell(max_lat, 90.0, level) {
        for lo in cell(min_lon, 180.0, level)..=cell(max_lon, 180.0, level) {
            out.push((la, lo));
        }
    }
    (level, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(device: Uuid, app: &str, lat: f64, lon: f64) -> LivePoint {
        Arc::new(SharedLocation::new(ValidLocation {
            time_us: 0,
            device_id: device,
            user_id: Uuid::nil(),
            app_source: app.into(),
            latitude: lat,
            longitude: lon,
            accuracy: None,
            altitude: None,
            speed: None,
            heading: None,
            metadata: None,
        }))
    }

    fn bbox(b: (f64, f64, f64, f64)) -> Filter {
        Filter {
            bbox: Some(b),
            ..Filter::default()
        }
    }

    /// What `sub` has now, without waiting.
    fn pending(sub: &Subscription) -> Vec<(f64, f64)> {
        let q = sub.inbox.queue.lock().unwrap();
        q.points
            .iter()
            .map(|p| (p.location.latitude, p.location.longitude))
            .collect()
    }

    /// Every point of a spread over the globe reaches exactly the
    /// subscribers whose filter matches it: the index finds all a linear
    /// scan finds, and no more.
    #[test]
    fn the_index_matches_as_a_scan_of_every_filter() {
        let live = Live::new(1_000_000, 100);
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let filters = vec![
            Filter::default(),
            bbox((52.0, 52.5, 13.0, 13.7)),
            bbox((52.3, 52.3, 13.4, 13.4)),
            bbox((-90.0, 90.0, -180.0, 180.0)),
            bbox((-91.0, 95.0, -500.0, 500.0)),
            bbox((89.9, 90.0, 179.9, 180.0)),
            bbox((-10.0, 10.0, -0.001, 0.001)),
            Filter {
                app_source: Some("fleet".into()),
                ..Filter::default()
            },
            Filter {
                devices: Some([a].into()),
                bbox: Some((0.0, 60.0, 0.0, 60.0)),
                ..Filter::default()
            },
            Filter {
                app_source: Some("rides".into()),
                bbox: Some((52.0, 52.5, 13.0, 13.7)),
                ..Filter::default()
            },
        ];
        let subs: Vec<_> = filters
            .iter()
            .map(|f| live.subscribe(f.clone()).unwrap())
            .collect();
        let mut points = Vec::new();
        for (i, lat) in [-90.0, -45.5, -0.0001, 0.0, 10.0, 52.3, 52.5, 89.95, 90.0]
            .into_iter()
            .enumerate()
        {
            for lon in [
                -180.0, -13.4, -0.001, 0.0, 0.001, 13.0, 13.4, 13.7, 179.95, 180.0,
            ] {
                let device = if i % 2 == 0 { a } else { b };
                let app = if i % 3 == 0 { "fleet" } else { "rides" };
                points.push(point(device, app, lat, lon));
            }
        }
        live.publish(points.clone());
        for (f, s) in filters.iter().zip(&subs) {
            let want: Vec<_> = points
                .iter()
                .filter(|p| f.matches(&p.location))
                .map(|p| (p.location.latitude, p.location.longitude))
                .collect();
            assert!(!want.is_empty(), "{f:?} matches some point");
            assert_eq!(pending(s), want, "{f:?}");
        }
    }

    #[test]
    fn a_subscriber_that_falls_behind_loses_its_oldest_points() {
        let live = Live::new(3, 10);
        let slow = live.subscribe(Filter::default()).unwrap();
        let d = Uuid::from_u128(7);
        for lat in 0..5 {
            live.publish(vec![point(d, "a", f64::from(lat), 0.0)]);
        }
        // The newest three are kept, in order.
        assert_eq!(pending(&slow), [(2.0, 0.0), (3.0, 0.0), (4.0, 0.0)]);
    }

    #[tokio::test]
    async fn a_long_queue_is_taken_in_bounded_updates_in_order() {
        let live = Live::new(10_000, 1);
        let mut sub = live.subscribe(Filter::default()).unwrap();
        let d = Uuid::from_u128(7);
        let n = MAX_UPDATE_POINTS + 10;
        live.publish(
            (0..n)
                .map(|i| point(d, "a", 0.0, i as f64 * 1e-4))
                .collect(),
        );
        let first = sub.next().await.unwrap();
        let second = sub.next().await.unwrap();
        assert_eq!((first.len(), second.len()), (MAX_UPDATE_POINTS, 10));
        assert_eq!(second[9].location.longitude, (n - 1) as f64 * 1e-4);
    }

    #[tokio::test]
    async fn subscriptions_leave_the_index_and_end_with_the_feed() {
        let live = Live::new(10, 2);
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
        live.publish(vec![point(d, "a", 0.5, 0.5)]);
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
