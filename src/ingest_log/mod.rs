//! `--ack-after log`: a replicated log in front of the database, so that a
//! long database outage costs the devices nothing.
//!
//! At the edge, a client batch's valid points are appended to a JetStream
//! stream ([`append`]): one message per partition of devices, on
//! `<prefix>.part.<n>`, in the format of the shared view's batches
//! ([`crate::cluster::wire`]: binary COPY rows), with a message id made of
//! its content, so a batch resent after a lost acknowledgement (within the
//! dedup window) is stored once. The client is acknowledged once JetStream
//! confirmed every message of its batch.
//!
//! The stream is a work queue. Writers on every instance ([`write`]) take
//! its messages through one durable consumer that all instances share
//! (each message goes to one of them), hand them to the pipeline (the same
//! batching, binary COPY and dedup as every other point), and acknowledge
//! a message only after its rows are committed; a message whose instance
//! dies is redelivered to another after `--log-ack-wait`. Rows the
//! database refuses for good go to the dead-letter stream `<name>_DEAD`
//! (`<prefix>.dead`) with the reason, and the message is acknowledged: a
//! bad row never blocks the ones behind it.

pub mod append;
pub mod write;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream::{self, consumer, stream};
use tokio_util::sync::CancellationToken;

use crate::{
    cluster::stream::ensure_as,
    config::{ClusterArgs, LogArgs},
    metrics::{
        LOG_BACKLOG_BYTES, LOG_BACKLOG_MESSAGES, LOG_BACKLOG_POINTS, LOG_DEAD_LETTERS,
        LOG_OLDEST_SECONDS,
    },
};

/// The durable consumer all instances' writers share.
pub const WRITERS: &str = "locus-writers";
/// Header of a dead letter: why the database refused its rows.
pub const REASON: &str = "Locus-Reason";
/// Header of a dead letter: the log subject its rows came from.
pub const FROM: &str = "Locus-From";

/// The subject of partition `n`.
pub fn partition_subject(prefix: &str, n: u16) -> String {
    format!("{prefix}.part.{n}")
}

/// The dead letters' subject.
pub fn dead_subject(prefix: &str) -> String {
    format!("{prefix}.dead")
}

/// The dead-letter stream's name.
pub fn dead_stream(args: &LogArgs) -> String {
    format!("{}_DEAD", args.log_stream)
}

/// The log as the flags want it: a work queue on file storage that
/// refuses new messages when full (nothing accepted is ever dropped to
/// make room).
pub fn log_config(args: &LogArgs, replicas: usize) -> stream::Config {
    stream::Config {
        name: args.log_stream.clone(),
        description: Some("locus: accepted points not yet written to the database".into()),
        subjects: vec![format!("{}.part.*", args.log_subject_prefix)],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::New,
        max_age: args.log_max_age,
        max_bytes: i64::try_from(args.log_max_bytes).unwrap_or(i64::MAX),
        duplicate_window: args.log_dedup_window,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// The dead letters: kept as long as the log keeps points, the oldest
/// dropped first past the log's size.
pub fn dead_config(args: &LogArgs, replicas: usize) -> stream::Config {
    stream::Config {
        name: dead_stream(args),
        description: Some("locus: rows of the log the database refused for good".into()),
        subjects: vec![dead_subject(&args.log_subject_prefix)],
        storage: stream::StorageType::File,
        max_age: args.log_max_age,
        max_bytes: i64::try_from(args.log_max_bytes).unwrap_or(i64::MAX),
        num_replicas: replicas,
        ..Default::default()
    }
}

/// The writers' consumer: explicit acks, redelivered to another writer
/// after `--log-ack-wait`, as often as it takes.
pub fn writers_config(args: &LogArgs) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(WRITERS.into()),
        description: Some("locus: writers of every instance".into()),
        filter_subject: format!("{}.part.*", args.log_subject_prefix),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: args.log_ack_wait,
        max_deliver: -1,
        max_ack_pending: 100_000,
        ..Default::default()
    }
}

/// The log, its dead letters and the writers' consumer, made where
/// missing.
pub async fn ensure(
    js: &jetstream::Context,
    client: &async_nats::Client,
    cluster: &ClusterArgs,
    args: &LogArgs,
) -> Result<consumer::Consumer<consumer::pull::Config>, async_nats::Error> {
    let log = ensure_as(js, client, cluster, |n| log_config(args, n)).await?;
    ensure_as(js, client, cluster, |n| dead_config(args, n)).await?;
    Ok(log
        .get_or_create_consumer(WRITERS, writers_config(args))
        .await?)
}

/// How long an instance waits at start for the log before it serves
/// (appends then fail with UNAVAILABLE until NATS answers).
pub const START_WAIT: Duration = Duration::from_secs(5);

/// Points per message, as this instance appended and wrote them: to
/// estimate the points of a backlog the log counts in messages.
#[derive(Debug, Default)]
pub struct Mean {
    points: AtomicU64,
    messages: AtomicU64,
}

impl Mean {
    pub fn record(&self, points: u64) {
        self.points.fetch_add(points, Ordering::Relaxed);
        self.messages.fetch_add(1, Ordering::Relaxed);
    }

    fn per_message(&self) -> f64 {
        match self.messages.load(Ordering::Relaxed) {
            0 => 0.0,
            m => self.points.load(Ordering::Relaxed) as f64 / m as f64,
        }
    }
}

/// The log's state, as the metrics and `locus doctor` report it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Backlog {
    /// Messages not yet written (the work queue keeps only those).
    pub messages: u64,
    pub bytes: u64,
    /// Age of the oldest of them.
    pub oldest_seconds: f64,
    /// Messages in the dead-letter stream.
    pub dead_letters: u64,
}

/// Reads the log's and the dead letters' state.
pub async fn backlog(
    js: &jetstream::Context,
    args: &LogArgs,
) -> Result<Backlog, async_nats::Error> {
    let log = js
        .get_stream(&args.log_stream)
        .await?
        .info()
        .await?
        .state
        .clone();
    let dead = js
        .get_stream(dead_stream(args))
        .await?
        .info()
        .await?
        .state
        .clone();
    let oldest_seconds = if log.messages == 0 {
        0.0
    } else {
        (chrono::Utc::now() - log.first_timestamp)
            .to_std()
            .map_or(0.0, |d| d.as_secs_f64())
    };
    Ok(Backlog {
        messages: log.messages,
        bytes: log.bytes,
        oldest_seconds,
        dead_letters: dead.messages,
    })
}

/// Keeps the log's gauges current until `stop`.
pub async fn watch(
    js: jetstream::Context,
    args: LogArgs,
    mean: Arc<Mean>,
    stop: CancellationToken,
) {
    loop {
        if let Ok(b) = backlog(&js, &args).await {
            metrics::gauge!(LOG_BACKLOG_MESSAGES).set(b.messages as f64);
            metrics::gauge!(LOG_BACKLOG_BYTES).set(b.bytes as f64);
            metrics::gauge!(LOG_BACKLOG_POINTS).set(b.messages as f64 * mean.per_message());
            metrics::gauge!(LOG_OLDEST_SECONDS).set(b.oldest_seconds);
            metrics::gauge!(LOG_DEAD_LETTERS).set(b.dead_letters as f64);
        }
        tokio::select! {
            _ = tokio::time::sleep(WATCH_EVERY) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// How often the log's gauges are read.
const WATCH_EVERY: Duration = Duration::from_secs(2);
