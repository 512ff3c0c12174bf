//! Following: every instance reads the stream and applies what the others
//! committed to its latest map and its live feed (its own batches it
//! applied as it committed them). It remembers the last stream sequence it
//! applied; after NATS was away it resumes from there, and where the
//! stream no longer holds what it missed (aged out, or the stream is new)
//! it refills its latest map from the database and says so in its log.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull::OrderedConfig},
    stream::DirectGetErrorKind,
};
use bytes::Bytes;
use futures::StreamExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{
    stream,
    wire::{self, Incoming},
};
use crate::{
    config::ClusterArgs,
    metrics::{
        CLUSTER_APPLIED, CLUSTER_BAD_MESSAGES, CLUSTER_CONNECTED, CLUSTER_LAG_MESSAGES,
        CLUSTER_LAG_SECONDS, CLUSTER_REFILLS,
    },
    query::QueryState,
};

/// How often the stream's end is read, for the lag.
const TICK: Duration = Duration::from_secs(1);
/// How long batches may wait in the stream with none delivered before the
/// consumer is made anew.
const STALL: Duration = Duration::from_secs(3);
/// How long a message the consumer delivered may be "not found" by a
/// direct get (a server of the stream that has not stored it yet) before
/// it is taken as gone.
const DIRECT_GET_PATIENCE: Duration = Duration::from_secs(2);
/// Longest wait between two tries while NATS is away.
const MOST_BACKOFF: Duration = Duration::from_secs(2);

/// How this instance's view stands against the stream: read by `/readyz`
/// and exported as metrics.
#[derive(Debug)]
pub struct Status {
    connected: AtomicBool,
    /// The last stream sequence applied, and the stream's last one seen.
    applied: AtomicU64,
    stream_last: AtomicU64,
    /// When the view was last known to hold the whole stream.
    caught_up_at: Mutex<Instant>,
}

/// What `/readyz` says of the cluster view.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StatusReport {
    pub connected: bool,
    pub lag_messages: u64,
    pub lag_seconds: f64,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            connected: AtomicBool::new(false),
            applied: AtomicU64::new(0),
            stream_last: AtomicU64::new(0),
            caught_up_at: Mutex::new(Instant::now()),
        }
    }
}

impl Status {
    pub fn report(&self) -> StatusReport {
        let applied = self.applied.load(Ordering::Acquire);
        let last = self.stream_last.load(Ordering::Acquire);
        let connected = self.connected.load(Ordering::Acquire);
        let lag_messages = last.saturating_sub(applied);
        let mut at = self
            .caught_up_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let caught_up = connected && lag_messages == 0;
        if caught_up {
            *at = Instant::now();
        }
        StatusReport {
            connected,
            lag_messages,
            lag_seconds: if caught_up {
                0.0
            } else {
                at.elapsed().as_secs_f64()
            },
        }
    }

    fn export(&self) {
        let r = self.report();
        metrics::gauge!(CLUSTER_CONNECTED).set(if r.connected { 1.0 } else { 0.0 });
        metrics::gauge!(CLUSTER_LAG_MESSAGES).set(r.lag_messages as f64);
        metrics::gauge!(CLUSTER_LAG_SECONDS).set(r.lag_seconds);
    }

    fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Release);
    }

    fn saw_stream_end(&self, last: u64) {
        self.stream_last.fetch_max(last, Ordering::AcqRel);
    }

    fn applied_up_to(&self, seq: u64) {
        self.applied.store(seq, Ordering::Release);
        self.saw_stream_end(seq);
    }

    /// The stream was new or reset: its end is `last`, whatever was seen.
    fn restart_at(&self, last: u64) {
        self.applied.store(last, Ordering::Release);
        self.stream_last.store(last, Ordering::Release);
    }

    /// Refilled: the view holds the stream up to `seq`.
    fn refilled_to(&self, seq: u64) {
        self.applied.fetch_max(seq, Ordering::AcqRel);
    }
}

/// The rows of the message at `seq` (the consumer delivers headers
/// alone), by a direct get, which any of the stream's servers answers;
/// `None` when the stream no longer holds it. A server that has not yet
/// stored the message answers "not found" too: it is asked again, for
/// up to [`DIRECT_GET_PATIENCE`].
async fn rows_of(
    stream: &jetstream::stream::Stream,
    seq: u64,
) -> Result<Option<Bytes>, async_nats::Error> {
    let started = Instant::now();
    let mut wait = Duration::from_millis(5);
    loop {
        // Bounded: while this waits, the status is not looked after (a
        // request made as NATS goes away would wait for its reconnection).
        let got = tokio::time::timeout(TICK, stream.direct_get(seq))
            .await
            .map_err(|_| format!("no answer to a direct get within {TICK:?}"))?;
        match got {
            Ok(m) => return Ok(Some(m.payload)),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => {
                if started.elapsed() >= DIRECT_GET_PATIENCE {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(200));
    }
}

/// Every [`TICK`] until `stop`: the client's connection lost is the view
/// stale (following sets it connected again), and the metrics exported.
async fn watch(status: Arc<Status>, client: async_nats::Client, stop: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if client.connection_state() != async_nats::connection::State::Connected {
            status.set_connected(false);
        }
        status.export();
    }
}

/// The following task.
pub struct Follower {
    pub js: jetstream::Context,
    pub client: async_nats::Client,
    pub args: ClusterArgs,
    pub instance: String,
    pub query: Arc<QueryState>,
    pub pool: PgPool,
    pub status: Arc<Status>,
    /// The sequence to go on after; `None` to refill first.
    pub position: Option<u64>,
}

/// Why following ended without an error.
enum Ended {
    Stopped,
    Reconnected,
    /// Batches waited and the consumer delivered none for [`STALL`].
    Stalled,
}

/// Why the view was refilled from the database.
#[derive(Debug, Clone, Copy)]
enum Refill {
    Start,
    Gap,
    Resync,
    Reset,
}

impl Refill {
    fn label(self) -> &'static str {
        match self {
            Refill::Start => "start",
            Refill::Gap => "gap",
            Refill::Resync => "resync",
            Refill::Reset => "reset",
        }
    }
}

impl Follower {
    pub async fn run(mut self, stop: CancellationToken) {
        if let Some(p) = self.position {
            self.status.restart_at(p);
        }
        // The metrics are kept up while following waits on NATS (a
        // request made as it went away waits for its return).
        let watching = stop.child_token();
        let _watching = watching.clone().drop_guard();
        tokio::spawn(watch(
            Arc::clone(&self.status),
            self.client.clone(),
            watching,
        ));
        let mut wait = Duration::from_millis(100);
        loop {
            match self.follow(&stop).await {
                Ok(Ended::Stopped) => return,
                Ok(Ended::Reconnected) => {
                    tracing::info!(
                        "cluster: NATS is back; following again from the last batch applied"
                    );
                    wait = Duration::from_millis(100);
                    continue;
                }
                Ok(Ended::Stalled) => {
                    tracing::warn!(stall = ?STALL, "cluster: batches wait in the stream but none came; following again from the last batch applied");
                    continue;
                }
                Err(e) => {
                    self.status.set_connected(false);
                    self.status.export();
                    tracing::warn!(error = %e, "cluster: not following the stream; the view of other instances' points is stale until NATS answers");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return,
            }
            wait = (wait * 2).min(MOST_BACKOFF);
        }
    }

    /// Follows from the last applied sequence until stopped, NATS came
    /// back after being away, or NATS fails it.
    async fn follow(&mut self, stop: &CancellationToken) -> Result<Ended, async_nats::Error> {
        let mut stream = stream::ensure(&self.js, &self.client, &self.args).await?;
        let last = stream.info().await?.state.last_sequence;
        self.status.set_connected(true);
        let position = match self.position {
            None => self.refill(Refill::Start, last).await,
            Some(p) if last < p => {
                tracing::warn!(
                    applied = p,
                    stream_last = last,
                    "cluster: the stream ends before what this instance applied (it was deleted and made anew); refilling the latest positions from the database"
                );
                self.status.restart_at(last);
                self.refill(Refill::Reset, last).await
            }
            Some(p) => p,
        };
        self.status.saw_stream_end(last);
        let consumer = stream
            .create_consumer(OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: position + 1,
                },
                // Headers alone: an instance's own batches are most of what
                // it would read back, and it needs none of their rows;
                // another's rows it then gets by sequence.
                headers_only: true,
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        let mut tick = tokio::time::interval(TICK);
        let mut was_connected = true;
        // Last time the consumer delivered, or had nothing to deliver.
        let mut progressed = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(Ended::Stopped),
                _ = tick.tick() => {
                    let info = tokio::time::timeout(TICK, stream.info()).await;
                    let connected = self.client.connection_state() == async_nats::connection::State::Connected;
                    if let Ok(Ok(info)) = info {
                        self.status.saw_stream_end(info.state.last_sequence);
                    }
                    self.status.set_connected(connected);
                    self.status.export();
                    // The server may have lost the consumer (a restart):
                    // follow anew from the last applied, at once.
                    if connected && !was_connected {
                        return Ok(Ended::Reconnected);
                    }
                    was_connected = connected;
                    // The server that held the consumer may be gone while
                    // this client is still connected to another one of
                    // the cluster: batches wait, and nothing comes.
                    if self.status.report().lag_messages == 0 {
                        progressed = Instant::now();
                    } else if connected && progressed.elapsed() > STALL {
                        return Ok(Ended::Stalled);
                    }
                }
                m = messages.next() => {
                    let Some(m) = m else { return Err("the stream's consumer ended".into()) };
                    self.apply(&stream, m?).await?;
                    progressed = Instant::now();
                }
            }
        }
    }

    async fn apply(
        &mut self,
        stream: &jetstream::stream::Stream,
        m: jetstream::Message,
    ) -> Result<(), async_nats::Error> {
        let seq = m.info()?.stream_sequence;
        let applied = self.position.unwrap_or(0);
        if seq > applied + 1 {
            tracing::warn!(
                missed = seq - applied - 1,
                from = applied + 1,
                "cluster: the stream no longer holds batches this instance missed; refilling the latest positions from the database"
            );
            self.refill(Refill::Gap, seq - 1).await;
        }
        tracing::debug!(seq, subject = %m.message.subject, "cluster: applying");
        // Its own batches it applied as it committed them: they are
        // skipped by their header, before their rows are read.
        if wire::sender(m.message.headers.as_ref()) != Some(self.instance.as_str()) {
            self.apply_other(stream, &m, seq).await?;
        }
        self.position = Some(seq);
        self.status.applied_up_to(seq);
        Ok(())
    }

    /// A message of another instance's: its batch to the view, its resync
    /// to a refill.
    async fn apply_other(
        &mut self,
        stream: &jetstream::stream::Stream,
        m: &jetstream::Message,
        seq: u64,
    ) -> Result<(), async_nats::Error> {
        let headers = m.message.headers.as_ref();
        let payload = if wire::holds_rows(headers) {
            match rows_of(stream, seq).await? {
                Some(payload) => payload,
                None => {
                    tracing::warn!(
                        seq,
                        "cluster: the stream no longer holds a batch this instance was reading; refilling the latest positions from the database"
                    );
                    self.refill(Refill::Gap, seq).await;
                    return Ok(());
                }
            }
        } else {
            Bytes::new()
        };
        let incoming = wire::read(
            &m.message.subject,
            &self.args.nats_subject_prefix,
            headers,
            payload,
        );
        match incoming {
            Incoming::Batch { rows, ranges, .. } => {
                let n = self.query.apply_remote(rows, ranges);
                metrics::counter!(CLUSTER_APPLIED).increment(n as u64);
            }
            Incoming::Resync { instance } => {
                tracing::warn!(%instance, "cluster: another instance could not publish some batches; refilling the latest positions from the database");
                self.refill(Refill::Resync, seq).await;
            }
            Incoming::Unreadable(why) => {
                tracing::warn!(subject = %m.message.subject, seq, why, "cluster: skipped a message of the stream");
                metrics::counter!(CLUSTER_BAD_MESSAGES).increment(1);
            }
        }
        Ok(())
    }

    /// Fills the latest map from the database (it only moves forward, so
    /// what it holds stays where newer); the view then holds the stream up
    /// to `seq`. Returns `seq`.
    async fn refill(&mut self, why: Refill, seq: u64) -> u64 {
        match self.query.latest.load(&self.pool).await {
            Ok(devices) => tracing::info!(
                devices,
                reason = why.label(),
                "cluster: latest positions refilled from the database"
            ),
            Err(e) => {
                tracing::warn!(error = %e, reason = why.label(), "cluster: latest positions not refilled; they fill as points arrive")
            }
        }
        metrics::counter!(CLUSTER_REFILLS, "reason" => why.label()).increment(1);
        self.position = Some(seq);
        self.status.refilled_to(seq);
        seq
    }
}
