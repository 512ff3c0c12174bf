//! Writes a batch with binary COPY and answers its submissions.
//!
//! The fast path is one `COPY location_events FROM STDIN (FORMAT binary)` in
//! its own implicit transaction: PostgreSQL commits before it reports the
//! COPY complete, so a reply sent after [`PgCopyIn::finish`] returns is a
//! reply about committed rows. Only when a batch really holds a duplicate
//! (sent twice within it, or already stored) does the slow path run: COPY
//! into a temporary staging table, then `INSERT ... ON CONFLICT DO NOTHING
//! RETURNING` tells which rows were new.
//!
//! The retry rule: [`WriteError::is_retryable`] names exactly which errors
//! are retried, with exponential backoff, until `--write-retry-deadline`.
//! A permanent error on a batch of several submissions writes each of them
//! alone, so one client's bad data never fails another's.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use backon::{ExponentialBuilder, Retryable};
use bytes::BytesMut;
use chrono::{DateTime, Utc};
use foldhash::HashSet;
use sqlx::{PgConnection, PgPool, postgres::PgCopyIn};
use uuid::Uuid;

use super::{
    PointKey, Submission, WriteOutcome,
    batcher::{Batch, WriteBatch},
    copy_encoder::{self, COLUMNS},
};
use crate::{metrics as m, storage::hourly};

/// COPY data is sent in messages of about this size.
const SEND_CHUNK_BYTES: usize = 1 << 20;
/// Backoff between attempts: from 50 ms, doubling, at most 2 s, with jitter.
const RETRY_MIN_DELAY: Duration = Duration::from_millis(50);
const RETRY_MAX_DELAY: Duration = Duration::from_secs(2);

/// Why a batch was not written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// The database could not be reached, or the connection broke.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database refused the write with an SQLSTATE.
    #[error("database error {code}: {message}")]
    Database { code: String, message: String },
    /// Anything else sqlx reports (protocol, decoding).
    #[error("write failed: {0}")]
    Other(String),
}

impl WriteError {
    /// Transient: worth retrying the same batch. Connection loss or failure
    /// to connect for any reason, and the
    /// SQLSTATEs that mean "not now" rather than "never": class 08
    /// (connection exception), 40001 and 40P01 (serialization failure,
    /// deadlock), class 53 (insufficient resources), 55P03 (lock not
    /// available), 57014 (statement timeout or cancel), 57P01 to 57P03
    /// (shutdown, crash, cannot connect now) and 58000 (system error).
    pub fn is_retryable(&self) -> bool {
        match self {
            WriteError::Unavailable(_) => true,
            WriteError::Database { code, .. } => {
                code.starts_with("08")
                    || code.starts_with("53")
                    || matches!(
                        code.as_str(),
                        "40001"
                            | "40P01"
                            | "55P03"
                            | "57014"
                            | "57P01"
                            | "57P02"
                            | "57P03"
                            | "58000"
                    )
            }
            WriteError::Other(_) => false,
        }
    }

    /// A short label for the `kind` of the write error metric.
    pub fn kind(&self) -> &'static str {
        match self {
            WriteError::Unavailable(_) => "unavailable",
            WriteError::Database { .. } if self.is_retryable() => "database_transient",
            WriteError::Database { .. } => "database",
            WriteError::Other(_) => "other",
        }
    }

    fn is_unique_violation(&self) -> bool {
        matches!(self, WriteError::Database { code, .. } if code == "23505")
    }
}

impl From<sqlx::Error> for WriteError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Database(db) => WriteError::Database {
                code: db.code().map(|c| c.into_owned()).unwrap_or_default(),
                message: db.message().to_string(),
            },
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => WriteError::Unavailable(e.to_string()),
            other => WriteError::Other(other.to_string()),
        }
    }
}

/// Told about every batch once it is committed, before its clients are
/// acknowledged (the latest-position map, the live feed).
pub trait CommitSink: Send + Sync + std::fmt::Debug {
    /// `inserted`: the keys newly stored, or `None` when all of them were.
    fn committed(&self, subs: &[Submission], inserted: Option<&HashSet<PointKey>>);
}

/// What an attempt stored: each submission's outcome, the path, and the
/// keys newly stored when not all were.
type Stored = (Vec<WriteOutcome>, Path, Option<HashSet<PointKey>>);

/// Which way a batch went in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Copy,
    Dedup,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::Copy => "copy",
            Path::Dedup => "dedup",
        }
    }
}

/// Writes batches into `location_events`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Writer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    retry_deadline: Duration,
    /// Record touched hours for locus's own hourly rollup (no continuous
    /// aggregate), on both paths.
    track_hours: bool,
    sink: Option<Arc<dyn CommitSink>>,
    copy_sql: String,
    staging_create_sql: String,
    staging_copy_sql: String,
    staging_insert_sql: String,
}

impl Writer {
    pub fn new(
        pool: PgPool,
        retry_deadline: Duration,
        track_hours: bool,
        sink: Option<Arc<dyn CommitSink>>,
    ) -> Self {
        let table = "location_events";
        let staging = "locus_staging";
        Self {
            inner: Arc::new(Inner {
                pool,
                retry_deadline,
                track_hours,
                sink,
                copy_sql: format!("COPY {table} ({COLUMNS}) FROM STDIN (FORMAT binary)"),
                staging_create_sql: format!(
                    "CREATE TEMP TABLE IF NOT EXISTS {staging} (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                ),
                staging_copy_sql: format!("COPY {staging} ({COLUMNS}) FROM STDIN (FORMAT binary)"),
                // DISTINCT ON keeps the first copy of a point sent twice in
                // one batch: a fresh staging table is read in COPY order.
                // The key is the table's unique key, (app_source, device_id,
                // time): a device id is unique only within its app_source.
                staging_insert_sql: format!(
                    "INSERT INTO {table} ({COLUMNS}) \
                     SELECT DISTINCT ON (app_source, device_id, time) {COLUMNS} FROM {staging} \
                     ORDER BY app_source, device_id, time, ctid \
                     ON CONFLICT DO NOTHING RETURNING app_source, device_id, time"
                ),
            }),
        }
    }

    /// Writes `subs` as one transaction, retrying transient errors until the
    /// deadline. Returns each submission's outcome, in order.
    async fn write_with_retry(&self, subs: &[Submission]) -> Result<Stored, WriteError> {
        let started = Instant::now();
        let backoff = ExponentialBuilder::default()
            .with_min_delay(RETRY_MIN_DELAY)
            .with_max_delay(RETRY_MAX_DELAY)
            .with_jitter()
            .without_max_times();
        (|| self.attempt(subs))
            .retry(backoff)
            .when(|e: &WriteError| e.is_retryable() && started.elapsed() < self.inner.retry_deadline)
            .notify(|e: &WriteError, after: Duration| {
                metrics::counter!(m::WRITE_ERRORS, "kind" => e.kind(), "outcome" => "retried").increment(1);
                tracing::warn!(error = %e, retry_in_ms = after.as_millis() as u64, "batch write failed; retrying");
            })
            .await
    }

    async fn attempt(&self, subs: &[Submission]) -> Result<Stored, WriteError> {
        // Whatever stops us from getting a connection (refused, auth, "not
        // accepting connections", too many clients) says nothing against
        // the batch: it is retried like a lost connection.
        let mut conn = self
            .inner
            .pool
            .acquire()
            .await
            .map_err(|e| WriteError::Unavailable(e.to_string()))?;
        let result = async {
            if !has_duplicate_keys(subs) {
                match self.copy(&mut conn, subs).await {
                    Ok(()) => return Ok((all_accepted(subs), Path::Copy, None)),
                    Err(e) if e.is_unique_violation() => {}
                    Err(e) => return Err(e),
                }
            }
            let inserted = self.dedup(&mut conn, subs).await?;
            let kept = self.inner.sink.as_ref().map(|_| inserted.clone());
            Ok((attribute(subs, inserted), Path::Dedup, kept))
        }
        .await;
        if result.is_err() {
            // The connection may be mid-protocol or broken: never reuse it.
            conn.close_on_drop();
        }
        result
    }

    /// The fast path: one COPY, committed on its own, or with the touched
    /// hours in one transaction where locus keeps the hourly rollup.
    async fn copy(&self, conn: &mut PgConnection, subs: &[Submission]) -> Result<(), WriteError> {
        if !self.inner.track_hours {
            return copy_rows(conn, &self.inner.copy_sql, subs)
                .await
                .map(|_| ());
        }
        let hours = hourly::hours_of(subs.iter().flat_map(|s| s.keys.iter().map(|k| k.2)));
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        copy_rows(&mut tx, &self.inner.copy_sql, subs).await?;
        hourly::mark_pending(&mut tx, hours).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The slow path: stage, then insert what is new. Returns the keys stored.
    async fn dedup(
        &self,
        conn: &mut PgConnection,
        subs: &[Submission],
    ) -> Result<HashSet<PointKey>, WriteError> {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        sqlx::query(&self.inner.staging_create_sql)
            .execute(&mut *tx)
            .await?;
        copy_rows(&mut tx, &self.inner.staging_copy_sql, subs).await?;
        let rows: Vec<(String, Uuid, DateTime<Utc>)> =
            sqlx::query_as(&self.inner.staging_insert_sql)
                .fetch_all(&mut *tx)
                .await?;
        // The hours of what was stored, in the same transaction, as the
        // COPY path does: duplicates changed no hour.
        if self.inner.track_hours && !rows.is_empty() {
            let hours = hourly::hours_of(rows.iter().map(|(_, _, t)| t.timestamp_micros()));
            hourly::mark_pending(&mut tx, hours).await?;
        }
        tx.commit().await?;
        Ok(rows
            .into_iter()
            .map(|(a, d, t)| (Arc::from(a), d, t.timestamp_micros()))
            .collect())
    }
}

impl Writer {
    fn tell_sink(&self, subs: &[Submission], inserted: Option<&HashSet<PointKey>>) {
        if let Some(sink) = &self.inner.sink {
            sink.committed(subs, inserted);
        }
    }
}

impl WriteBatch for Writer {
    async fn write(&self, batch: Batch) {
        let started = Instant::now();
        match self.write_with_retry(&batch.submissions).await {
            Ok((outcomes, path, inserted)) => {
                record_flush(path, &batch, started);
                self.tell_sink(&batch.submissions, inserted.as_ref());
                for (sub, outcome) in batch.submissions.into_iter().zip(outcomes) {
                    let _ = sub.reply.send(Ok(outcome));
                }
            }
            Err(e) if !e.is_retryable() && batch.submissions.len() > 1 => {
                metrics::counter!(m::WRITE_ERRORS, "kind" => e.kind(), "outcome" => "failed")
                    .increment(1);
                tracing::error!(error = %e, submissions = batch.submissions.len(), "batch refused; writing its submissions one by one");
                for sub in batch.submissions {
                    let result = self.write_with_retry(std::slice::from_ref(&sub)).await;
                    if let Err(e) = &result {
                        metrics::counter!(m::WRITE_ERRORS, "kind" => e.kind(), "outcome" => "failed").increment(1);
                        tracing::error!(error = %e, points = sub.keys.len(), "submission refused by the database");
                    }
                    if let Ok((_, _, inserted)) = &result {
                        self.tell_sink(std::slice::from_ref(&sub), inserted.as_ref());
                    }
                    let _ = sub.reply.send(result.map(|(mut o, _, _)| o.remove(0)));
                }
            }
            Err(e) => {
                metrics::counter!(m::WRITE_ERRORS, "kind" => e.kind(), "outcome" => "failed")
                    .increment(1);
                tracing::error!(error = %e, points = batch.points, elapsed_ms = started.elapsed().as_millis() as u64, "batch not written");
                for sub in batch.submissions {
                    let _ = sub.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

fn record_flush(path: Path, batch: &Batch, started: Instant) {
    metrics::counter!(m::BATCHES_FLUSHED, "path" => path.label()).increment(1);
    metrics::histogram!(m::BATCH_ROWS).record(batch.points as f64);
    metrics::histogram!(m::BATCH_BYTES).record(batch.bytes as f64);
    metrics::histogram!(m::FLUSH_DURATION).record(started.elapsed().as_secs_f64());
}

/// Runs one COPY of every row of `subs`, and always ends it with `finish` or
/// `abort`: a COPY left open would poison the connection.
async fn copy_rows(
    conn: &mut PgConnection,
    sql: &str,
    subs: &[Submission],
) -> Result<u64, WriteError> {
    let mut copy = conn.copy_in_raw(sql).await?;
    match send_rows(&mut copy, subs).await {
        Ok(()) => Ok(copy.finish().await?),
        Err(e) => {
            let _ = copy.abort(e.to_string()).await;
            Err(e)
        }
    }
}

async fn send_rows(
    copy: &mut PgCopyIn<&mut PgConnection>,
    subs: &[Submission],
) -> Result<(), WriteError> {
    let mut chunk = BytesMut::with_capacity(SEND_CHUNK_BYTES);
    copy_encoder::encode_header(&mut chunk);
    for sub in subs {
        if chunk.len() + sub.rows.len() > SEND_CHUNK_BYTES && !chunk.is_empty() {
            copy.send(chunk.split()).await?;
        }
        if sub.rows.len() >= SEND_CHUNK_BYTES {
            copy.send(&sub.rows[..]).await?;
        } else {
            chunk.extend_from_slice(&sub.rows);
        }
    }
    copy_encoder::encode_trailer(&mut chunk);
    copy.send(chunk).await?;
    Ok(())
}

fn has_duplicate_keys(subs: &[Submission]) -> bool {
    let total: usize = subs.iter().map(|s| s.keys.len()).sum();
    let mut seen = HashSet::with_capacity_and_hasher(total, Default::default());
    subs.iter().flat_map(|s| &s.keys).any(|k| !seen.insert(k))
}

fn all_accepted(subs: &[Submission]) -> Vec<WriteOutcome> {
    subs.iter()
        .map(|s| WriteOutcome {
            accepted: s.keys.len() as u32,
            duplicates: 0,
        })
        .collect()
}

/// The first occurrence of each stored key is accepted; every other is a duplicate.
fn attribute(subs: &[Submission], mut inserted: HashSet<PointKey>) -> Vec<WriteOutcome> {
    subs.iter()
        .map(|s| {
            let accepted = s.keys.iter().filter(|k| inserted.remove(k)).count() as u32;
            WriteOutcome {
                accepted,
                duplicates: s.keys.len() as u32 - accepted,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_rule_names_transient_errors() {
        let db = |code: &str| WriteError::Database {
            code: code.into(),
            message: String::new(),
        };
        for code in [
            "08006", "08001", "40001", "40P01", "53300", "57014", "57P01", "57P03",
        ] {
            assert!(db(code).is_retryable(), "{code}");
        }
        for code in ["23505", "22P02", "42P01", "23514", "22021"] {
            assert!(!db(code).is_retryable(), "{code}");
        }
        assert!(WriteError::Unavailable("refused".into()).is_retryable());
        assert!(!WriteError::Other("protocol".into()).is_retryable());
    }
}
