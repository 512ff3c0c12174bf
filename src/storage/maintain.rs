//! The jobs locus runs itself where TimescaleDB's policies are missing: raw
//! retention (drop old chunks or partitions), hourly retention, and the
//! hourly rollup; on the community edition, the policy jobs that
//! TimescaleDB's scheduler keeps failing ([`cover`]). Each run is recorded
//! in `locus_job_runs` for the doctor.

use std::time::Instant;

use sqlx::PgConnection;

use super::{
    SetupError, Tier, cover, hourly,
    job_runs::record,
    micros,
    partitions::{self, DEFAULT_PARTITION},
};
use crate::config::StorageArgs;

/// Job names, as recorded and reported.
pub const ROLLUP: &str = "hourly_rollup";
pub const RAW_RETENTION: &str = "raw_retention";
pub const HOURLY_RETENTION: &str = "hourly_retention";

/// Drops raw data older than the retention at `now_us`; returns what it did.
pub async fn raw_retention(
    conn: &mut PgConnection,
    tier: Tier,
    storage: &StorageArgs,
    now_us: i64,
) -> Result<String, SetupError> {
    let cutoff_us = now_us - micros(storage.raw_retention);
    match tier {
        // TimescaleDB's own policy does it.
        Tier::Timescale => Ok("done by TimescaleDB's retention policy".into()),
        Tier::TimescaleApache => {
            let dropped: Vec<String> = sqlx::query_scalar(
                "SELECT c::text FROM drop_chunks('location_events', older_than => to_timestamp($1::float8 / 1e6)) AS c",
            )
            .bind(cutoff_us as f64)
            .fetch_all(&mut *conn)
            .await
            .map_err(SetupError::sql("dropping old chunks"))?;
            Ok(format!("dropped {} chunks", dropped.len()))
        }
        Tier::Postgres => {
            let mut dropped = Vec::new();
            for (name, range) in partitions::list(conn).await? {
                if range.is_some_and(|r| r.end_us <= cutoff_us) {
                    sqlx::Executor::execute(&mut *conn, format!("DROP TABLE {name}").as_str())
                        .await
                        .map_err(SetupError::sql(format!("dropping partition {name}")))?;
                    dropped.push(name);
                }
            }
            let deleted = sqlx::query(&format!(
                "DELETE FROM {DEFAULT_PARTITION} WHERE time < to_timestamp($1::float8 / 1e6)"
            ))
            .bind(cutoff_us as f64)
            .execute(&mut *conn)
            .await
            .map_err(SetupError::sql(
                "deleting old rows of the default partition",
            ))?
            .rows_affected();
            Ok(format!(
                "dropped {} partitions, deleted {deleted} old rows from the default partition",
                dropped.len()
            ))
        }
    }
}

/// Deletes hourly rows older than the hourly retention (tiers 2 and 3).
pub async fn hourly_retention(
    conn: &mut PgConnection,
    storage: &StorageArgs,
    now_us: i64,
) -> Result<String, SetupError> {
    let cutoff_us = now_us - micros(storage.hourly_retention);
    let n = sqlx::query("DELETE FROM location_hourly WHERE hour < to_timestamp($1::float8 / 1e6)")
        .bind(cutoff_us as f64)
        .execute(&mut *conn)
        .await
        .map_err(SetupError::sql("deleting old hourly rows"))?
        .rows_affected();
    Ok(format!("deleted {n} hourly rows"))
}

/// Recomputes the pending hours (tiers 2 and 3).
pub async fn rollup(conn: &mut PgConnection) -> Result<String, SetupError> {
    let n = hourly::rollup(conn)
        .await
        .map_err(SetupError::sql("rolling up pending hours"))?;
    Ok(format!("wrote {n} hourly rows"))
}

/// `pg_try_advisory_lock` key of locus's own storage jobs: instances on one
/// database take turns, so two never drop the same partition or roll up the
/// same hours at once.
pub const JOBS_LOCK_KEY: i64 = 0x6c6f_6375_735f_6a62; // "locus_jb"

/// Whether a run of the jobs happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    Ran,
    /// Another session (another instance) was running them: nothing done.
    Busy,
}

/// Runs `jobs` on `conn` while holding the jobs' lock, unless another
/// session holds it.
async fn in_turn<F>(conn: &mut PgConnection, jobs: F) -> Result<Turn, SetupError>
where
    F: AsyncFnOnce(&mut PgConnection) -> Result<(), SetupError>,
{
    let mine: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(JOBS_LOCK_KEY)
        .fetch_one(&mut *conn)
        .await
        .map_err(SetupError::sql("taking the storage jobs' lock"))?;
    if !mine {
        return Ok(Turn::Busy);
    }
    let result = jobs(&mut *conn).await;
    let released = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(JOBS_LOCK_KEY)
        .execute(&mut *conn)
        .await
        .map_err(SetupError::sql("releasing the storage jobs' lock"));
    result?;
    released?;
    Ok(Turn::Ran)
}

/// The hourly rollup, recorded, in the jobs' turn (what `serve` runs every
/// --hourly-refresh-interval where locus keeps the rollup).
pub async fn rollup_in_turn(conn: &mut PgConnection) -> Result<Turn, SetupError> {
    in_turn(conn, async |conn| {
        let started = Instant::now();
        let result = rollup(conn).await;
        record(conn, ROLLUP, started, &result).await?;
        result.map(|_| ())
    })
    .await
}

/// Runs every job locus owns on `tier` once, at `now_us`, and records each,
/// in the jobs' turn. On the community edition those are the policy jobs
/// locus covers for TimescaleDB's scheduler, where due.
pub async fn run_all(
    conn: &mut PgConnection,
    tier: Tier,
    storage: &StorageArgs,
    now_us: i64,
) -> Result<Turn, SetupError> {
    in_turn(conn, async |conn| {
        run_all_now(conn, tier, storage, now_us).await
    })
    .await
}

async fn run_all_now(
    conn: &mut PgConnection,
    tier: Tier,
    storage: &StorageArgs,
    now_us: i64,
) -> Result<(), SetupError> {
    if tier == Tier::Timescale {
        let done = cover::run(conn, storage).await?;
        let failed: Vec<String> = done
            .into_iter()
            .filter_map(|(job, o)| match o {
                cover::Outcome::Ran(Err(e)) => Some(format!("{job}: {e}")),
                _ => None,
            })
            .collect();
        if failed.is_empty() {
            return Ok(());
        }
        return Err(SetupError::Refused(format!(
            "covering for TimescaleDB's scheduler failed: {}",
            failed.join("; ")
        )));
    }
    let started = Instant::now();
    let r = raw_retention(conn, tier, storage, now_us).await;
    record(conn, RAW_RETENTION, started, &r).await?;
    let started = Instant::now();
    let h = hourly_retention(conn, storage, now_us).await;
    record(conn, HOURLY_RETENTION, started, &h).await?;
    let started = Instant::now();
    let u = rollup(conn).await;
    record(conn, ROLLUP, started, &u).await?;
    r.and(h).and(u).map(|_| ())
}
