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

use std::{
    collections::{HashSet, VecDeque},
    ops::Range,
    sync::{Arc, Mutex, OnceLock, RwLock, Weak},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use foldhash::HashMap;
use tokio::{
    sync::{Notify, Semaphore},
    time::Instant,
};
use uuid::Uuid;

use super::encoded::{EncodedLocations, encode_location, put_framed};
use crate::{
    location::{LocationRef, ValidLocation},
    metrics as m,
    pipeline::copy_encoder::read_row,
};

/// What a subscriber wants. Every filter that is set must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub app_source: Option<String>,
    pub devices: Option<HashSet<Uuid>>,
    /// (min_lat, max_lat, min_lon, max_lon)
    pub bbox: Option<(f64, f64, f64, f64)>,
}

impl Filter {
    pub fn matches(&self, l: &LocationRef) -> bool {
        self.app_source.as_ref().is_none_or(|a| a == l.app_source)
            && self
                .devices
                .as_ref()
                .is_none_or(|d| d.contains(&l.device_id))
            && self.bbox.is_none_or(|(a, b, c, d)| {
                (a..=b).contains(&l.latitude) && (c..=d).contains(&l.longitude)
            })
    }
}

/// One committed batch's new points, as the live feed carries them: their
/// COPY rows, shared with the batch (not copied), read in place to match
/// them; and, made once by the first gRPC subscriber to take from the
/// batch, the protobuf encoding of every point that some subscriber wants,
/// one after another. A subscriber's update is then a copy of its points'
/// runs of that one buffer. (A reference-counted allocation per point, its
/// encoding another, each handed to every subscriber, cost locus about 1.5
/// CPU s per million points ingested with the benchmark's 200 subscribers;
/// this, about 1.0.)
#[derive(Debug, Default)]
pub struct LiveBatch {
    rows: Vec<Bytes>,
    /// Per point: which of `rows`, and its byte range there.
    points: Vec<(u32, Range<u32>)>,
    /// Per point: whether a subscriber matched it (only those are encoded).
    wanted: Vec<bool>,
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
    fn row(&self, i: usize) -> Option<&[u8]> {
        let (rows, range) = self.points.get(i)?;
        self.rows
            .get(*rows as usize)?
            .get(range.start as usize..range.end as usize)
    }

    /// Point `i`, borrowed from its row; `None` if the row is not one.
    fn location(&self, i: usize) -> Option<LocationRef<'_>> {
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
    fn frames(&self, first: usize, last: usize) -> &[u8] {
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
    fn json(&self, i: usize, encode: JsonEncoder) -> &[u8] {
        self.encoded(&self.json, encode).of(i, i)
    }
}

/// Points of one batch, by index, in order.
#[derive(Debug)]
struct Chunk {
    batch: Arc<LiveBatch>,
    points: Vec<u32>,
    /// Whether `batch` is the committed batch, shared with other
    /// subscribers, rather than a copy of just these points.
    shared: bool,
}

impl Chunk {
    fn new(batch: Arc<LiveBatch>, points: Vec<u32>) -> Self {
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

/// One subscriber's filter and queue.
#[derive(Debug)]
struct Inbox {
    filter: Filter,
    queue: Mutex<Queue>,
    ready: Notify,
}

/// A subscriber's points not yet taken, oldest first.
#[derive(Debug, Default)]
struct Queue {
    chunks: VecDeque<Chunk>,
    points: usize,
    closed: bool,
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
    fn push(&mut self, chunk: Chunk, limit: usize) -> usize {
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
    fn take(&mut self, max: usize) -> Update {
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
const MAX_UPDATE_POINTS: usize = 4_096;

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
        metrics::gauge!(m::LIVE_SUBSCRIBERS).decrement(1.0);
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
        metrics::gauge!(m::LIVE_SUBSCRIBERS).increment(1.0);
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

/// A box is indexed this many levels finer than the coarsest whose cells
/// hold it, in cells of a quarter to a half of its size, so that a point's
/// cell names few boxes beyond those that hold it. For the benchmark's 200
/// overlapping boxes, matching a 5,000-point batch took 0.8-1.2 ms so,
/// against 1.4-1.9 ms at the coarsest level (`locus-bench --suite live`);
/// three levels finer did no better.
const REFINE: u8 = 2;

/// Subscribers by the one filter that narrows them most cheaply: their
/// device ids, else the grid cells their box covers, else their app_source,
/// else none. A candidate's whole filter is still checked.
#[derive(Debug, Default)]
struct Index {
    by_device: HashMap<Uuid, Vec<Arc<Inbox>>>,
    /// (level, latitude cell, longitude cell): a box sits [`REFINE`] levels
    /// below the finest level whose cells are at least its size, so it
    /// covers at most 5 x 5 cells (6 x 6 at the poles and the antimeridian,
    /// where cells end).
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
    fn candidates(&self, l: &LocationRef, mut f: impl FnMut(&Arc<Inbox>)) {
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
            && let Some(v) = self.by_app.get(l.app_source)
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
    let level = (level + REFINE).min(FINEST);
    let mut out = Vec::new();
    for la in cell(min_lat, 90.0, level)..=cell(max_lat, 90.0, level) {
        for lo in cell(min_lon, 180.0, level)..=cell(max_lon, 180.0, level) {
            out.push((la, lo));
        }
    }
    (level, out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{pipeline::copy_encoder::encode_row, query::encoded::to_proto};

    fn point(device: Uuid, app: &str, lat: f64, lon: f64) -> ValidLocation {
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

    fn bbox(b: (f64, f64, f64, f64)) -> Filter {
        Filter {
            bbox: Some(b),
            ..Filter::default()
        }
    }

    /// What `sub` has now, without waiting.
    fn pending(sub: &Subscription) -> Vec<(f64, f64)> {
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

    /// Every point of a spread over the globe reaches exactly the
    /// subscribers whose filter matches it: the index finds all a linear
    /// scan finds, and no more.
    #[test]
    fn the_index_matches_as_a_scan_of_every_filter() {
        let live = Live::new(1_000_000, 100, Duration::ZERO);
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
        live.publish(batch(&points));
        for (f, s) in filters.iter().zip(&subs) {
            let want: Vec<_> = points
                .iter()
                .filter(|p| f.matches(&p.as_ref()))
                .map(|p| (p.latitude, p.longitude))
                .collect();
            assert!(!want.is_empty(), "{f:?} matches some point");
            assert_eq!(pending(s), want, "{f:?}");
        }
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
