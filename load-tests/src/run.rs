//! Drives the simulated fleet against locus: long-lived gRPC streams (one
//! per device, or gateways multiplexing many) or unary calls. Whatever is not
//! acknowledged is sent again after a reconnect, as a real client must.

use std::{
    collections::{HashSet, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use locus::{
    ingest::grpc::WRITE_LOCATIONS,
    proto::{BatchAck, Location, LocationBatch, ingest_client::IngestClient},
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, transport::Channel};
use uuid::Uuid;

use crate::{
    fleet::Device,
    raw_calls::call_encoded,
    verify::{self, Acked},
};

/// The bearer token every call carries, if locus wants one.
pub type Token = Option<Arc<str>>;

/// `msg` as a request that carries `token`.
pub fn request<T>(msg: T, token: &Token) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token
        && let Ok(v) = format!("Bearer {t}").parse()
    {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

/// What every driver adds to.
#[derive(Debug, Default)]
pub struct Stats {
    pub sent: AtomicU64,
    pub accepted: AtomicU64,
    pub duplicates: AtomicU64,
    pub rejected: AtomicU64,
    pub errors: AtomicU64,
    pub acked_batches: AtomicU64,
    pub latencies_us: Mutex<Vec<u32>>,
    /// Acks that break the protocol: out of order, or not counting every
    /// point of their batch exactly once. Any fails the run.
    pub broken_acks: AtomicU64,
    /// What the acks said, point by point, for --verify.
    pub stored: Option<Mutex<Acked>>,
    /// Calls refused for now (gRPC `RESOURCE_EXHAUSTED` or `UNAVAILABLE`,
    /// HTTP 429 or 503), each to be sent again.
    pub refused: AtomicU64,
    /// Those refusals that carried no retry hint (gRPC `RetryInfo`, HTTP
    /// `Retry-After`).
    pub refused_without_hint: AtomicU64,
    /// Batches sent again after a refusal that carried a hint, each once
    /// the hint had passed.
    pub retries: AtomicU64,
    /// The retry that came soonest after its hint: (waited, hint).
    pub closest_retry: Mutex<Option<(Duration, Duration)>>,
    /// Points of batches given up when the run ended while they waited to
    /// be sent again (an open loop only).
    pub abandoned: AtomicU64,
    /// Points answered (accepted, duplicate or rejected) in each second of
    /// the run, from [`Stats::start_clock`].
    pub timeline: Mutex<Timeline>,
    /// With `--acks log` and `--refused-speed`: acknowledged points of
    /// this speed are expected in the dead letters, not in the table.
    pub refused_speed: Option<f64>,
}

/// Points answered a second, from the start of the run.
#[derive(Debug, Default)]
pub struct Timeline {
    start: Option<Instant>,
    pub per_sec: Vec<u64>,
}

/// Shapes the batches: the share of duplicates, invalid points and late batches.
#[derive(Debug, Clone)]
pub struct Shape {
    pub batch_size: usize,
    pub duplicate_share: f64,
    pub invalid_share: f64,
    pub late_share: f64,
    /// Every so many points made (each device's, not counting duplicates
    /// and invalid ones) get this speed, which the database is set to
    /// refuse (`--refused-speed`, `--refused-every`).
    pub refused: Option<(f64, u64)>,
}

/// When to stop making new points.
#[derive(Debug)]
pub struct Budget {
    left: AtomicU64,
    deadline: Option<Instant>,
    pub done: AtomicBool,
}

impl Budget {
    pub fn new(total_points: Option<u64>, duration: Option<Duration>) -> Self {
        Budget {
            left: AtomicU64::new(total_points.unwrap_or(u64::MAX)),
            deadline: duration.map(|d| Instant::now() + d),
            done: AtomicBool::new(false),
        }
    }

    /// When the run stops making new points, if it is bounded by time.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Claims up to `n` points; 0 when the run is over.
    fn claim(&self, n: u64) -> u64 {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            self.done.store(true, Relaxed);
            return 0;
        }
        let mut left = self.left.load(Relaxed);
        loop {
            let take = left.min(n);
            if take == 0 {
                self.done.store(true, Relaxed);
                return 0;
            }
            match self
                .left
                .compare_exchange(left, left - take, Relaxed, Relaxed)
            {
                Ok(_) => return take,
                Err(now) => left = now,
            }
        }
    }
}

/// A feeder keeps one point in this many to resend as a duplicate: a copy
/// of every point made costs three allocations a point, which an open loop
/// making points at twice what locus takes pays on a machine it shares.
const KEEP_EVERY: u64 = 8;

/// Makes the batches of one stream (or of one unary worker) from its devices.
#[derive(Debug)]
pub struct Feeder {
    devices: Vec<Device>,
    next_device: usize,
    shape: Shape,
    next_id: u64,
    /// Batches held back to be sent late (offline buffering).
    held: VecDeque<LocationBatch>,
    /// Recent points, to resend as duplicates: one in [`KEEP_EVERY`] made.
    recent: VecDeque<Location>,
    made: u64,
    /// Points this feeder may still make, when the run is bounded by points:
    /// each device makes its share, so no device runs ahead of the clock.
    quota: Option<u64>,
}

impl Feeder {
    pub fn new(devices: Vec<Device>, shape: Shape) -> Self {
        Feeder {
            devices,
            next_device: 0,
            shape,
            next_id: 0,
            held: VecDeque::new(),
            recent: VecDeque::new(),
            made: 0,
            quota: None,
        }
    }

    pub fn with_quota(mut self, points: u64) -> Self {
        self.quota = Some(points);
        self
    }

    pub fn devices(&self) -> usize {
        self.devices.len()
    }

    /// The next batch to send, or `None` when the budget is spent and
    /// nothing is held back.
    pub fn next_batch(&mut self, budget: &Budget) -> Option<LocationBatch> {
        let want = self.quota.map_or(self.shape.batch_size as u64, |q| {
            q.min(self.shape.batch_size as u64)
        });
        let n = budget.claim(want) as usize;
        if let Some(q) = self.quota.as_mut() {
            *q -= n as u64;
        }
        if n == 0 {
            return self.held.pop_front();
        }
        let mut locations = Vec::with_capacity(n);
        for _ in 0..n {
            let i = self.next_device;
            self.next_device = (self.next_device + 1) % self.devices.len();
            let d = &mut self.devices[i];
            let mut p = d.next_point();
            if d.rng().chance(self.shape.duplicate_share) && !self.recent.is_empty() {
                let k = (d.rng().next_u64() % self.recent.len() as u64) as usize;
                p = self.recent[k].clone();
            } else if d.rng().chance(self.shape.invalid_share) {
                p.latitude = 123.0;
            } else {
                self.made += 1;
                if let Some((speed, every)) = self.shape.refused
                    && self.made.is_multiple_of(every)
                {
                    p.speed = Some(speed);
                } else if self.shape.duplicate_share > 0.0 && self.made.is_multiple_of(KEEP_EVERY) {
                    self.recent.push_back(p.clone());
                    if self.recent.len() > 64 {
                        self.recent.pop_front();
                    }
                }
            }
            locations.push(p);
        }
        self.next_id += 1;
        let batch = LocationBatch {
            batch_id: self.next_id,
            locations,
        };
        let late = self.devices[0].rng().chance(self.shape.late_share);
        if late {
            self.held.push_back(batch);
            // Something else goes now; the held batch later.
            return self.next_batch(budget).or_else(|| self.held.pop_front());
        }
        if self.held.len() > 4 {
            // Back online: the oldest held batch goes out after this one.
            let old = self.held.pop_front();
            self.held.push_front(batch);
            return old;
        }
        Some(batch)
    }
}

fn key(l: &Location) -> (Uuid, i64) {
    let t = l.time.unwrap_or_default();
    (
        Uuid::try_parse(&l.device_id).unwrap_or_default(),
        t.seconds * 1_000_000 + i64::from(t.nanos / 1_000),
    )
}

impl Stats {
    /// Starts the clock of [`Stats::timeline`].
    pub fn start_clock(&self) {
        if let Ok(mut t) = self.timeline.lock() {
            t.start = Some(Instant::now());
        }
    }

    /// Records the ack of `batch`; false (and counted as broken) when the
    /// ack does not count each of the batch's points exactly once, and then
    /// nothing of it is recorded.
    fn record(&self, batch: &LocationBatch, ack: &BatchAck, sent_at: Instant) -> bool {
        let n = batch.locations.len();
        let mut bad: HashSet<u32> = HashSet::with_capacity(ack.rejected.len());
        let counted = ack.batch_id == batch.batch_id
            && ack.accepted as usize + ack.duplicates as usize + ack.rejected.len() == n
            && ack
                .rejected
                .iter()
                .all(|r| (r.index as usize) < n && bad.insert(r.index));
        if !counted {
            self.broken_acks.fetch_add(1, Relaxed);
            eprintln!(
                "ack {} of batch {} does not count its {n} points once each: {} accepted, {} duplicates, {} rejected",
                ack.batch_id,
                batch.batch_id,
                ack.accepted,
                ack.duplicates,
                ack.rejected.len()
            );
            return false;
        }
        self.accepted.fetch_add(u64::from(ack.accepted), Relaxed);
        self.duplicates
            .fetch_add(u64::from(ack.duplicates), Relaxed);
        self.rejected.fetch_add(ack.rejected.len() as u64, Relaxed);
        self.acked_batches.fetch_add(1, Relaxed);
        if let Ok(mut t) = self.timeline.lock()
            && let Some(start) = t.start
        {
            let second = start.elapsed().as_secs() as usize;
            if t.per_sec.len() <= second {
                t.per_sec.resize(second + 1, 0);
            }
            t.per_sec[second] += n as u64;
        }
        let us = sent_at.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
        if let Ok(mut l) = self.latencies_us.lock() {
            l.push(us);
        }
        if let Some(stored) = &self.stored
            && let Ok(mut s) = stored.lock()
        {
            s.accepted += u64::from(ack.accepted);
            for (i, l) in batch.locations.iter().enumerate() {
                let (device, at) = key(l);
                if bad.contains(&(i as u32)) {
                    s.reject(device, at);
                } else if self.refused_speed.is_some() && l.speed == self.refused_speed {
                    s.refuse(device, at);
                } else {
                    s.add(device, at, verify::of_sent(l));
                }
            }
        }
        true
    }

    /// `points` are being sent again after an error: their first ack may
    /// have been lost.
    fn resending(&self, points: usize) {
        if let Some(stored) = &self.stored
            && let Ok(mut s) = stored.lock()
        {
            s.resent += points as u64;
        }
    }

    /// A call refused for now, with the server's retry hint if it gave one.
    fn refusal(&self, hint: Option<Duration>) {
        self.refused.fetch_add(1, Relaxed);
        if hint.is_none() {
            self.refused_without_hint.fetch_add(1, Relaxed);
        }
    }

    /// A refused batch is sent again `waited` after its refusal, whose
    /// hint was `hint`.
    fn retried(&self, waited: Duration, hint: Duration) {
        self.retries.fetch_add(1, Relaxed);
        if let Ok(mut c) = self.closest_retry.lock() {
            let slack = |(w, h): (Duration, Duration)| w.as_secs_f64() - h.as_secs_f64();
            if c.is_none_or(|old| slack((waited, hint)) < slack(old)) {
                *c = Some((waited, hint));
            }
        }
    }
}

/// How long to wait before sending a batch again when the server gave no
/// hint, or the call failed for another reason.
const RETRY_WITHOUT_HINT: Duration = Duration::from_millis(100);

/// A unary call's answer, as a client acts on it.
enum Answer {
    Acked(BatchAck),
    /// Refused for now, with the server's retry hint if it gave one;
    /// `maybe_stored` when the batch may have been stored all the same (a
    /// write that failed after its commit was sent), so that its resend
    /// may come back as duplicates.
    Refused {
        hint: Option<Duration>,
        maybe_stored: bool,
    },
    /// Anything else: the connection, or a status no wait will change.
    Failed,
}

/// The retry hint of a gRPC status: its `RetryInfo` detail.
pub fn retry_hint(status: &Status) -> Option<Duration> {
    tonic_types::StatusExt::get_details_retry_info(status).and_then(|r| r.retry_delay)
}

impl Answer {
    fn of_grpc(r: Result<BatchAck, Status>) -> Answer {
        match r {
            Ok(ack) => Answer::Acked(ack),
            // Refused before anything was queued: the buffer is full, or
            // the token's rate is spent.
            Err(s) if s.code() == Code::ResourceExhausted => Answer::Refused {
                hint: retry_hint(&s),
                maybe_stored: false,
            },
            Err(s) if s.code() == Code::Unavailable => Answer::Refused {
                hint: retry_hint(&s),
                maybe_stored: true,
            },
            Err(_) => Answer::Failed,
        }
    }
}

/// Sends one batch, `encoded`, until it is acknowledged: after a refusal
/// once its retry hint has passed (the hint doubled for each refusal of
/// the batch before, up to 8 times the hint, so that a backlog of refused
/// batches does not grow into a storm of retries), after a refusal without
/// a hint or another error [`RETRY_WITHOUT_HINT`] later, the same bytes
/// each time. `batch` is
/// what was encoded (decoded again from `encoded` for its ack if `None`).
/// With `give_up`, a batch that would wait past it is dropped instead
/// (counted in [`Stats::abandoned`]).
async fn send_until_acked(
    channel: &Channel,
    token: &Token,
    encoded: Bytes,
    batch: Option<&LocationBatch>,
    stats: &Stats,
    give_up: Option<Instant>,
) {
    let decoded;
    let batch = match batch {
        Some(b) => b,
        None => match LocationBatch::decode(encoded.clone()) {
            Ok(b) => {
                decoded = b;
                &decoded
            }
            Err(_) => return,
        },
    };
    let points = batch.locations.len();
    let mut refusals: u32 = 0;
    loop {
        // The latency of the call that was answered, not of the refused
        // attempts before it.
        let at = Instant::now();
        let call = call_encoded::<BatchAck>(
            channel.clone(),
            WRITE_LOCATIONS,
            request(encoded.clone(), token),
        );
        let hint = match Answer::of_grpc(call.await.map(tonic::Response::into_inner)) {
            Answer::Acked(ack) => {
                if stats.record(batch, &ack, at) {
                    return;
                }
                // A broken ack fails the run; the batch is sent again, as
                // after any error.
                stats.resending(points);
                None
            }
            Answer::Refused { hint, maybe_stored } => {
                stats.errors.fetch_add(1, Relaxed);
                stats.refusal(hint);
                if maybe_stored {
                    stats.resending(points);
                }
                refusals += 1;
                hint
            }
            Answer::Failed => {
                stats.errors.fetch_add(1, Relaxed);
                stats.resending(points);
                None
            }
        };
        let refused_at = Instant::now();
        let wait = hint.map_or(RETRY_WITHOUT_HINT, |h| {
            h * (1 << refusals.saturating_sub(1).min(3))
        });
        if give_up.is_some_and(|g| refused_at + wait > g) {
            stats.abandoned.fetch_add(points as u64, Relaxed);
            return;
        }
        tokio::time::sleep(wait).await;
        if let Some(h) = hint {
            stats.retried(refused_at.elapsed(), h);
        }
    }
}

/// Paces a stream: `points_per_sec` over all its devices; 0 is unthrottled.
/// The first batch goes `phase` (0 to 1) of a period after the start, so
/// that streams started together do not send together: a fleet's acks then
/// come in every second, and a stall of a second shows in them.
fn pacer(points_per_sec: f64, batch_size: usize, phase: f64) -> Option<tokio::time::Interval> {
    (points_per_sec > 0.0).then(|| {
        let every = Duration::from_secs_f64(batch_size as f64 / points_per_sec);
        let first = tokio::time::Instant::now() + every.mul_f64(phase.clamp(0.0, 1.0));
        let mut i = tokio::time::interval_at(first, every);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        i
    })
}

/// One long-lived stream: keeps up to `inflight` batches unacknowledged,
/// and after any error reconnects and sends them again: to the next of
/// `targets` (the first to begin with), so that a fleet given several
/// instances goes on through the others when one dies.
#[allow(clippy::too_many_arguments)]
pub async fn stream(
    targets: Vec<Channel>,
    token: Token,
    mut feeder: Feeder,
    rate: f64,
    inflight: usize,
    budget: Arc<Budget>,
    stats: Arc<Stats>,
) {
    // The phase of its first device's id: spread, and the same each run.
    let phase = feeder.devices.first().map_or(0.0, |d| {
        d.device_id.as_u64_pair().0 as f64 / u64::MAX as f64
    });
    let mut pace = pacer(
        rate * feeder.devices() as f64,
        feeder.shape.batch_size,
        phase,
    );
    let mut unacked: VecDeque<(LocationBatch, Instant)> = VecDeque::new();
    let mut exhausted = false;
    let mut target = 0;
    while !(exhausted && unacked.is_empty()) {
        let Some(channel) = targets.get(target % targets.len().max(1)) else {
            return;
        };
        let mut client = IngestClient::new(channel.clone());
        let (tx, rx) = mpsc::channel(inflight.max(unacked.len()) + 1);
        stats.resending(unacked.iter().map(|(b, _)| b.locations.len()).sum());
        for (b, _) in &unacked {
            let _ = tx.try_send(b.clone());
        }
        let mut inbound = match client
            .stream_locations(request(ReceiverStream::new(rx), &token))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(_) => {
                stats.errors.fetch_add(1, Relaxed);
                target += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mut tx = Some(tx);
        loop {
            if exhausted && unacked.is_empty() {
                break;
            }
            let can_send = !exhausted && unacked.len() < inflight;
            tokio::select! {
                biased;
                msg = inbound.message() => match msg {
                    Ok(Some(ack)) => {
                        // An ack for no batch, or out of order, breaks the
                        // protocol: it fails the run, and the stream starts
                        // again with every batch not acknowledged.
                        let Some((batch, at)) = unacked.pop_front() else {
                            stats.broken_acks.fetch_add(1, Relaxed);
                            eprintln!("ack {} for no batch in flight", ack.batch_id);
                            break;
                        };
                        if batch.batch_id != ack.batch_id {
                            stats.broken_acks.fetch_add(1, Relaxed);
                            eprintln!("ack out of order: got {}, expected {}", ack.batch_id, batch.batch_id);
                            unacked.push_front((batch, at));
                            break;
                        }
                        if !stats.record(&batch, &ack, at) {
                            unacked.push_front((batch, at));
                            break;
                        }
                    }
                    Ok(None) | Err(_) => {
                        stats.errors.fetch_add(1, Relaxed);
                        break;
                    }
                },
                _ = async { if let Some(p) = pace.as_mut() { p.tick().await; } }, if can_send => {
                    match feeder.next_batch(&budget) {
                        Some(batch) => {
                            stats.sent.fetch_add(batch.locations.len() as u64, Relaxed);
                            unacked.push_back((batch.clone(), Instant::now()));
                            if let Some(t) = &tx && t.send(batch).await.is_err() {
                                break;
                            }
                        }
                        None => {
                            exhausted = true;
                        }
                    }
                }
            }
        }
        drop(tx.take());
        if !(exhausted && unacked.is_empty()) {
            target += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Unary calls: one batch in flight per worker (a closed loop: the next
/// batch once this one is acknowledged); a refused call is sent again once
/// the server's retry hint has passed, with the bytes encoded for the first
/// try.
pub async fn unary(
    channel: Channel,
    token: Token,
    feeder: Arc<tokio::sync::Mutex<Feeder>>,
    budget: Arc<Budget>,
    stats: Arc<Stats>,
) {
    loop {
        let Some(batch) = feeder.lock().await.next_batch(&budget) else {
            return;
        };
        stats.sent.fetch_add(batch.locations.len() as u64, Relaxed);
        let encoded = Bytes::from(batch.encode_to_vec());
        send_until_acked(&channel, &token, encoded, Some(&batch), &stats, None).await;
    }
}

/// Unary calls in an open loop: a new batch every `batch_size /
/// points_per_sec` seconds whatever the answers, so that [`Stats::sent`]
/// counts the distinct points offered, not the tries. Each batch is sent on
/// a task of its own until acknowledged, after a refusal once the server's
/// retry hint has passed; one still waiting to be sent again when the run
/// ends is given up ([`Stats::abandoned`]).
pub async fn open_loop(
    channels: Vec<Channel>,
    token: Token,
    mut feeder: Feeder,
    points_per_sec: f64,
    budget: Arc<Budget>,
    stats: Arc<Stats>,
) {
    let Some(mut pace) = pacer(points_per_sec, feeder.shape.batch_size, 0.0) else {
        return;
    };
    let mut calls = tokio::task::JoinSet::new();
    for i in 0.. {
        pace.tick().await;
        let Some(batch) = feeder.next_batch(&budget) else {
            break;
        };
        stats.sent.fetch_add(batch.locations.len() as u64, Relaxed);
        // Only the bytes wait for a retry; the batch is decoded again for
        // its ack.
        let encoded = Bytes::from(batch.encode_to_vec());
        drop(batch);
        let (channel, token, stats) = (
            channels[i % channels.len()].clone(),
            token.clone(),
            Arc::clone(&stats),
        );
        let give_up = budget.deadline();
        calls.spawn(async move {
            send_until_acked(&channel, &token, encoded, None, &stats, give_up).await;
        });
        while calls.try_join_next().is_some() {}
    }
    while calls.join_next().await.is_some() {}
}

/// The JSON body of `POST /v1/locations` for a batch.
pub fn json_batch(batch: &LocationBatch) -> serde_json::Value {
    let points: Vec<serde_json::Value> = batch
        .locations
        .iter()
        .map(|l| {
            let t = l.time.unwrap_or_default();
            let time = chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
                .unwrap_or_default();
            serde_json::json!({
                "time": time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "device_id": l.device_id,
                "user_id": l.user_id,
                "app_source": l.app_source,
                "latitude": l.latitude,
                "longitude": l.longitude,
                "accuracy": l.accuracy,
                "altitude": l.altitude,
                "speed": l.speed,
                "heading": l.heading,
                "metadata_json": l.metadata_json,
            })
        })
        .collect();
    serde_json::json!({"batch_id": batch.batch_id, "locations": points})
}

/// HTTP JSON calls, as phone apps make them: one batch in flight per worker;
/// a refused call (429, 503) is sent again once its `Retry-After` has
/// passed, a failed one 100 ms later.
pub async fn http(
    base: String,
    token: Token,
    feeder: Arc<tokio::sync::Mutex<Feeder>>,
    budget: Arc<Budget>,
    stats: Arc<Stats>,
) {
    let client = reqwest::Client::new();
    let auth = token.map(|t| format!("Bearer {t}"));
    let url = format!("{}/v1/locations", base.trim_end_matches('/'));
    loop {
        let Some(batch) = feeder.lock().await.next_batch(&budget) else {
            return;
        };
        stats.sent.fetch_add(batch.locations.len() as u64, Relaxed);
        let body = json_batch(&batch);
        let points = batch.locations.len();
        loop {
            let at = Instant::now();
            let mut req = client.post(&url).json(&body);
            if let Some(a) = &auth {
                req = req.header("authorization", a);
            }
            let answer = match req.send().await {
                Ok(r) if r.status().is_success() => match r.json::<serde_json::Value>().await {
                    Ok(a) => Answer::Acked(http_ack(batch.batch_id, &a)),
                    Err(_) => Answer::Failed,
                },
                Ok(r) if matches!(r.status().as_u16(), 429 | 503) => {
                    // Whole seconds (RFC 9110 also allows a date, which
                    // locus does not send).
                    let hint = r
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    Answer::Refused {
                        hint,
                        maybe_stored: r.status().as_u16() == 503,
                    }
                }
                // A request locus will never take (400, 413): count it, and go on.
                Ok(r) if r.status().is_client_error() => {
                    stats.errors.fetch_add(1, Relaxed);
                    eprintln!("locus refused a batch: {}", r.status());
                    break;
                }
                _ => Answer::Failed,
            };
            let hint = match answer {
                Answer::Acked(ack) => {
                    if stats.record(&batch, &ack, at) {
                        break;
                    }
                    stats.resending(points);
                    None
                }
                Answer::Refused { hint, maybe_stored } => {
                    stats.errors.fetch_add(1, Relaxed);
                    stats.refusal(hint);
                    if maybe_stored {
                        stats.resending(points);
                    }
                    hint
                }
                Answer::Failed => {
                    stats.errors.fetch_add(1, Relaxed);
                    stats.resending(points);
                    None
                }
            };
            let refused_at = Instant::now();
            tokio::time::sleep(hint.unwrap_or(RETRY_WITHOUT_HINT)).await;
            if let Some(h) = hint {
                stats.retried(refused_at.elapsed(), h);
            }
        }
    }
}

/// The ack in an HTTP answer's JSON body.
fn http_ack(batch_id: u64, a: &serde_json::Value) -> BatchAck {
    BatchAck {
        batch_id,
        accepted: a["accepted"].as_u64().unwrap_or(0) as u32,
        duplicates: a["duplicates"].as_u64().unwrap_or(0) as u32,
        rejected: a["rejected"]
            .as_array()
            .map(|r| {
                r.iter()
                    .map(|x| locus::proto::Rejection {
                        index: x["index"].as_u64().unwrap_or(0) as u32,
                        reason: x["reason"].as_str().unwrap_or_default().to_string(),
                        message: String::new(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that could not send for a while (its batches all in flight,
    /// or the CPU busy) makes up for it, so that the offered rate holds on
    /// average. (It did not: the soak offered 70% and got 0.79 of that.)
    #[tokio::test(start_paused = true)]
    async fn pacer_catches_up_after_a_stall() {
        let mut p = pacer(100.0, 10, 0.0).expect("a rate"); // a batch every 100 ms
        p.tick().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t = tokio::time::Instant::now();
        for _ in 0..10 {
            p.tick().await;
        }
        assert_eq!(t.elapsed(), Duration::ZERO, "the missed ticks come at once");
        p.tick().await;
        assert!(
            t.elapsed() >= Duration::from_millis(50),
            "then the pace resumes"
        );
    }

    /// A stream's first batch waits its phase of a period.
    #[tokio::test(start_paused = true)]
    async fn pacer_starts_at_its_phase() {
        let t = tokio::time::Instant::now();
        let mut p = pacer(100.0, 10, 0.25).expect("a rate"); // a batch every 100 ms
        p.tick().await;
        assert_eq!(t.elapsed(), Duration::from_millis(25));
        p.tick().await;
        assert_eq!(t.elapsed(), Duration::from_millis(125));
    }
}
