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
//! alone, so one client's bad data never fails another's; a refusal of some
//! rows' data splits a submission until those rows are found, so that they
//! alone are refused ([`WriteError::is_point_refusal`]).

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
    PointKey, RefusedRow, Submission, WriteOutcome,
    batcher::{Flush, WriteFlush},
    copy_encoder,
};
use crate::{
    location::COLUMNS,
    metrics::{BATCH_BYTES, BATCH_ROWS, BATCHES_FLUSHED, FLUSH_DURATION, WRITE_ERRORS},
    storage::hourly,
};

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

    /// Permanent, and about some rows' data rather than the batch or the
    /// schema: class 22 (data exception: a value out of range, text that is
    /// not valid input for its type), class 23 (integrity constraint
    /// violation: not null, foreign key, check, exclusion, and "no
    /// partition for the row", which is 23514) but 23505 (unique violation,
    /// which the dedup path answers), and 54000 (program limit exceeded: an
    /// index row too large). Such a batch is written in parts until the
    /// refused rows are found, and only they are refused.
    pub fn is_point_refusal(&self) -> bool {
        match self {
            WriteError::Database { code, .. } => {
                code.starts_with("22")
                    || (code.starts_with("23") && code != "23505")
                    || code == "54000"
            }
            _ => false,
        }
    }

    /// What a client is told of a refused row: the SQLSTATE and its
    /// condition name. The database's message can name tables and
    /// constraints; it stays in the log.
    fn refusal_message(&self) -> String {
        let code = match self {
            WriteError::Database { code, .. } => code.as_str(),
            _ => "",
        };
        let condition = match code {
            "22001" => "string_data_right_truncation",
            "22003" => "numeric_value_out_of_range",
            "22007" => "invalid_datetime_format",
            "22008" => "datetime_field_overflow",
            "22021" => "character_not_in_repertoire",
            "22P02" => "invalid_text_representation",
            "22P05" => "untranslatable_character",
            "23502" => "not_null_violation",
            "23503" => "foreign_key_violation",
            "23514" => "check_violation",
            "23P01" => "exclusion_violation",
            "54000" => "program_limit_exceeded",
            c if c.starts_with("22") => "data_exception",
            c if c.starts_with("23") => "integrity_constraint_violation",
            _ => "error",
        };
        format!("refused by the database: SQLSTATE {code} ({condition})")
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
    inner: Arc<WriterState>,
}

#[derive(Debug)]
struct WriterState {
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
            inner: Arc::new(WriterState {
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
                metrics::counter!(WRITE_ERRORS, "kind" => e.kind(), "outcome" => "retried").increment(1);
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

impl WriteFlush for Writer {
    async fn write(&self, batch: Flush) {
        let started = Instant::now();
        match self.write_with_retry(&batch.submissions).await {
            Ok((outcomes, path, inserted)) => {
                record_flush(path, &batch, started);
                self.tell_sink(&batch.submissions, inserted.as_ref());
                for (sub, outcome) in batch.submissions.into_iter().zip(outcomes) {
                    let _ = sub.reply.send(Ok(outcome));
                }
            }
            Err(e)
                if !e.is_retryable() && (batch.submissions.len() > 1 || e.is_point_refusal()) =>
            {
                metrics::counter!(WRITE_ERRORS, "kind" => e.kind(), "outcome" => "failed")
                    .increment(1);
                tracing::error!(error = %e, submissions = batch.submissions.len(), "batch refused; writing its submissions apart");
                // A lone submission was just refused whole: no need to try it again.
                let refused = (batch.submissions.len() == 1).then_some(e);
                for sub in batch.submissions {
                    let result = self.write_apart(&sub, refused.clone()).await;
                    match &result {
                        Err(e) => {
                            metrics::counter!(WRITE_ERRORS, "kind" => e.kind(), "outcome" => "failed").increment(1);
                            tracing::error!(error = %e, points = sub.keys.len(), "submission refused by the database");
                        }
                        Ok(o) if !o.refused.is_empty() => {
                            tracing::warn!(
                                refused = o.refused.len(),
                                points = sub.keys.len(),
                                "points refused by the database; the others stored"
                            );
                        }
                        Ok(_) => {}
                    }
                    let _ = sub.reply.send(result);
                }
            }
            Err(e) => {
                metrics::counter!(WRITE_ERRORS, "kind" => e.kind(), "outcome" => "failed")
                    .increment(1);
                tracing::error!(error = %e, points = batch.points, elapsed_ms = started.elapsed().as_millis() as u64, "batch not written");
                for sub in batch.submissions {
                    let _ = sub.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

impl Writer {
    /// Writes `sub` alone. If the database refuses it for some rows' data
    /// ([`WriteError::is_point_refusal`]), writes it in halves, and the
    /// halves of what is refused, until the refused rows are found alone:
    /// those are answered as refused, the others are stored. `refused`: the
    /// error the whole submission already met, if it did. Any other error
    /// fails the whole submission, even with parts of it stored: the client
    /// sends it again, and those come back as duplicates.
    async fn write_apart(
        &self,
        sub: &Submission,
        refused: Option<WriteError>,
    ) -> Result<WriteOutcome, WriteError> {
        let mut outcome = WriteOutcome::default();
        // Ranges of rows to write, lowest first; each with the refusal it
        // already met, if it did.
        let mut todo = vec![(0..sub.keys.len(), refused)];
        while let Some((range, refused)) = todo.pop() {
            let error = match refused {
                Some(e) => e,
                None => {
                    let part = sub.part(range.clone());
                    match self.write_with_retry(std::slice::from_ref(&part)).await {
                        Ok((outcomes, _, inserted)) => {
                            self.tell_sink(std::slice::from_ref(&part), inserted.as_ref());
                            for o in outcomes {
                                outcome.accepted += o.accepted;
                                outcome.duplicates += o.duplicates;
                            }
                            continue;
                        }
                        Err(e) => e,
                    }
                }
            };
            if !error.is_point_refusal() {
                return Err(error);
            }
            if range.len() == 1 {
                tracing::warn!(error = %error, row = range.start, "row refused by the database");
                outcome.refused.push(RefusedRow {
                    row: range.start as u32,
                    message: error.refusal_message(),
                });
                continue;
            }
            let mid = range.start + range.len() / 2;
            todo.push((mid..range.end, None));
            todo.push((range.start..mid, None));
        }
        Ok(outcome)
    }
}

fn record_flush(path: Path, batch: &Flush, started: Instant) {
    metrics::counter!(BATCHES_FLUSHED, "path" => path.label()).increment(1);
    metrics::histogram!(BATCH_ROWS).record(batch.points as f64);
    metrics::histogram!(BATCH_BYTES).record(batch.bytes as f64);
    metrics::histogram!(FLUSH_DURATION).record(started.elapsed().as_secs_f64());
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
            ..Default::default()
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
                ..Default::default()
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
        // Refused for some rows' data: found by writing in parts.
        for code in [
            "22003", "22P02", "22P05", "22008", "23514", "23502", "54000",
        ] {
            assert!(db(code).is_point_refusal(), "{code}");
        }
        // Not about rows: the batch, the schema, or a transient state.
        for code in ["23505", "42P01", "42501", "40001", "08006", "XX000"] {
            assert!(!db(code).is_point_refusal(), "{code}");
        }
        assert!(!WriteError::Unavailable("refused".into()).is_point_refusal());
        assert!(WriteError::Unavailable("refused".into()).is_retryable());
        assert!(!WriteError::Other("protocol".into()).is_retryable());
    }
}
