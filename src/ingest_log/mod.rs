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
/// dropped first past an eighth of the log's size (JetStream sets a
/// stream's bytes aside on its servers, and dead letters are few).
pub fn dead_config(args: &LogArgs, replicas: usize) -> stream::Config {
    stream::Config {
        name: dead_stream(args),
        description: Some("locus: rows of the log the database refused for good".into()),
        subjects: vec![dead_subject(&args.log_subject_prefix)],
        storage: stream::StorageType::File,
        max_age: args.log_max_age,
        max_bytes: i64::try_from((args.log_max_bytes / 8).max(1024 * 1024)).unwrap_or(i64::MAX),
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
    let log = ensure_as(js, client, cluster, "--log-max-bytes", |n| {
        log_config(args, n)
    })
    .await?;
    ensure_as(js, client, cluster, "--log-max-bytes", |n| {
        dead_config(args, n)
    })
    .await?;
    Ok(log
        .get_or_create_consumer(WRITERS, writers_config(args))
        .await?)
}

/// Why the log's streams could not be made, as the last try said (`None`
/// once they were): shared by whoever tries (start, the writers) with
/// `/readyz`, which otherwise sees only that the stream is missing.
#[derive(Debug, Default)]
pub struct NotMade(std::sync::Mutex<Option<String>>);

impl NotMade {
    pub fn set(&self, why: Option<String>) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = why;
    }

    pub fn get(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
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

/// What `locus doctor` says of the log (with `--nats-url`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct LogReport {
    pub stream: String,
    /// `None`: NATS or the log could not be read (see `attention`).
    pub backlog: Option<Backlog>,
    /// The writers' shared consumer: messages no writer has taken yet,
    /// taken and not yet acknowledged, and taken more than once.
    pub writers: Option<WritersState>,
    /// The newest dead letters (at most [`DEAD_SHOWN`]), newest first.
    pub dead_letters: Vec<DeadLetter>,
    pub attention: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct WritersState {
    pub waiting: u64,
    pub taken: u64,
    pub redelivered: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub sequence: u64,
    pub time: chrono::DateTime<chrono::Utc>,
    pub from: String,
    pub reason: String,
    pub points: usize,
}

/// How many dead letters doctor shows.
pub const DEAD_SHOWN: u64 = 10;

/// Reads the log's state for `locus doctor`; what needs an operator goes
/// to `attention`: NATS or the log unreadable, dead letters, and a backlog
/// whose oldest point nears `--log-max-age` (past it JetStream drops it).
pub async fn examine(cluster: &ClusterArgs, args: &LogArgs) -> LogReport {
    let mut report = LogReport {
        stream: args.log_stream.clone(),
        backlog: None,
        writers: None,
        dead_letters: Vec::new(),
        attention: Vec::new(),
    };
    let (options, addrs) = crate::cluster::options(cluster);
    let client = match tokio::time::timeout(START_WAIT, options.connect(addrs)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            report.attention.push(format!("NATS: {e}"));
            return report;
        }
        Err(_) => {
            report
                .attention
                .push("NATS did not answer within 5 s".into());
            return report;
        }
    };
    let js = jetstream::new(client);
    match backlog(&js, args).await {
        Ok(b) => {
            if b.dead_letters > 0 {
                report.attention.push(format!(
                    "{} dead letters in {}: rows the database refused for good (below); fix and republish them, or purge the stream",
                    b.dead_letters,
                    dead_stream(args)
                ));
            }
            if b.oldest_seconds > args.log_max_age.as_secs_f64() / 2.0 {
                report.attention.push(format!(
                    "the oldest unwritten point has waited {}, over half of --log-max-age ({}): past it JetStream drops it; are the writers (and the database) up?",
                    crate::config::human(Duration::from_secs_f64(b.oldest_seconds)),
                    crate::config::human(args.log_max_age)
                ));
            }
            report.backlog = Some(b);
        }
        Err(e) => report
            .attention
            .push(format!("the log {} cannot be read: {e}", args.log_stream)),
    }
    if let Ok(mut c) = js
        .get_consumer_from_stream::<consumer::pull::Config, _, _>(WRITERS, &args.log_stream)
        .await
        && let Ok(info) = c.info().await
    {
        report.writers = Some(WritersState {
            waiting: info.num_pending,
            taken: info.num_ack_pending as u64,
            redelivered: info.num_redelivered as u64,
        });
    }
    report.dead_letters = dead_letters(&js, args).await;
    report
}

/// The newest dead letters, newest first.
async fn dead_letters(js: &jetstream::Context, args: &LogArgs) -> Vec<DeadLetter> {
    let Ok(mut stream) = js.get_stream(dead_stream(args)).await else {
        return Vec::new();
    };
    let Ok(info) = stream.info().await else {
        return Vec::new();
    };
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut out = Vec::new();
    let mut seq = last;
    while seq >= first.max(1) && (out.len() as u64) < DEAD_SHOWN {
        if let Ok(m) = stream.get_raw_message(seq).await {
            let header = |name: &str| {
                m.headers
                    .get(name)
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            };
            out.push(DeadLetter {
                sequence: seq,
                time: m.time,
                from: header(FROM),
                reason: header(REASON),
                points: crate::pipeline::copy_encoder::split_rows(&m.payload)
                    .map_or(0, |r| r.len()),
            });
        }
        seq -= 1;
    }
    out
}

/// The log's part of doctor's text.
pub fn render(r: &LogReport) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    match &r.backlog {
        Some(b) => {
            let _ = writeln!(
                o,
                "log {}: {} messages ({} bytes) not yet written, the oldest {}; {} dead letters",
                r.stream,
                b.messages,
                b.bytes,
                crate::config::human(Duration::from_secs_f64(b.oldest_seconds)),
                b.dead_letters
            );
        }
        None => {
            let _ = writeln!(o, "log {}: not readable", r.stream);
        }
    }
    if let Some(w) = &r.writers {
        let _ = writeln!(
            o,
            "log writers: {} messages waiting, {} taken and not yet acknowledged, {} taken again",
            w.waiting, w.taken, w.redelivered
        );
    }
    for d in &r.dead_letters {
        let _ = writeln!(
            o,
            "  dead letter {} ({}, {} points from {}): {}",
            d.sequence,
            d.time.to_rfc3339(),
            d.points,
            d.from,
            d.reason
        );
    }
    o
}
