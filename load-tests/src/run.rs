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
use tonic::transport::Channel;
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
}

/// Shapes the batches: the share of duplicates, invalid points and late batches.
#[derive(Debug, Clone)]
pub struct Shape {
    pub batch_size: usize,
    pub duplicate_share: f64,
    pub invalid_share: f64,
    pub late_share: f64,
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

/// Makes the batches of one stream (or of one unary worker) from its devices.
#[derive(Debug)]
pub struct Feeder {
    devices: Vec<Device>,
    next_device: usize,
    shape: Shape,
    next_id: u64,
    /// Batches held back to be sent late (offline buffering).
    held: VecDeque<LocationBatch>,
    /// Recent points, to resend as duplicates.
    recent: VecDeque<Location>,
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
                self.recent.push_back(p.clone());
                if self.recent.len() > 64 {
                    self.recent.pop_front();
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
}

/// Paces a stream: `points_per_sec` over all its devices; 0 is unthrottled.
fn pacer(points_per_sec: f64, batch_size: usize) -> Option<tokio::time::Interval> {
    (points_per_sec > 0.0).then(|| {
        let every = Duration::from_secs_f64(batch_size as f64 / points_per_sec);
        let mut i = tokio::time::interval(every);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        i
    })
}

/// One long-lived stream: keeps up to `inflight` batches unacknowledged,
/// and after any error reconnects and sends them again.
#[allow(clippy::too_many_arguments)]
pub async fn stream(
    channel: Channel,
    token: Token,
    mut feeder: Feeder,
    rate: f64,
    inflight: usize,
    budget: Arc<Budget>,
    stats: Arc<Stats>,
) {
    let mut pace = pacer(rate * feeder.devices() as f64, feeder.shape.batch_size);
    let mut unacked: VecDeque<(LocationBatch, Instant)> = VecDeque::new();
    let mut exhausted = false;
    while !(exhausted && unacked.is_empty()) {
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
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Unary calls: one batch in flight per worker; a failed call is retried
/// after 100 ms (sooner than the server's hint: a pressing client), with
/// the bytes encoded for the first try.
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
        loop {
            // The latency of the call that was answered, not of the refused
            // attempts before it.
            let at = Instant::now();
            let call = call_encoded::<BatchAck>(
                channel.clone(),
                WRITE_LOCATIONS,
                request(encoded.clone(), &token),
            );
            match call.await {
                Ok(ack) => {
                    if !stats.record(&batch, &ack.into_inner(), at) {
                        // A broken ack fails the run; the batch is sent
                        // again, as after any error.
                        stats.resending(batch.locations.len());
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    break;
                }
                Err(_) => {
                    stats.errors.fetch_add(1, Relaxed);
                    stats.resending(batch.locations.len());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
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
/// a refused or failed call is retried.
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
        let at = Instant::now();
        loop {
            let mut req = client.post(&url).json(&body);
            if let Some(a) = &auth {
                req = req.header("authorization", a);
            }
            let ack = match req.send().await {
                Ok(r) if r.status().is_success() => r.json::<serde_json::Value>().await.ok(),
                // A request locus will never take (400, 413): count it, and go on.
                Ok(r) if r.status().is_client_error() && r.status().as_u16() != 429 => {
                    stats.errors.fetch_add(1, Relaxed);
                    eprintln!("locus refused a batch: {}", r.status());
                    break;
                }
                _ => None,
            };
            match ack {
                Some(a) => {
                    let ack = BatchAck {
                        batch_id: batch.batch_id,
                        accepted: a["accepted"].as_u64().unwrap_or(0) as u32,
                        duplicates: a["duplicates"].as_u64().unwrap_or(0) as u32,
                        rejected: a["rejected"]
                            .as_array()
                            .map(|r| {
                                r.iter()
                                    .map(|x| locus::proto::Rejection {
                                        index: x["index"].as_u64().unwrap_or(0) as u32,
                                        reason: x["reason"]
                                            .as_str()
                                            .unwrap_or_default()
                                            .to_string(),
                                        message: String::new(),
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    };
                    if !stats.record(&batch, &ack, at) {
                        stats.resending(batch.locations.len());
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    break;
                }
                None => {
                    stats.errors.fetch_add(1, Relaxed);
                    stats.resending(batch.locations.len());
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
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
        let mut p = pacer(100.0, 10).expect("a rate"); // a batch every 100 ms
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
}
