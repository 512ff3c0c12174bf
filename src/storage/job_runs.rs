//! `locus_job_runs`: the log of the jobs locus runs itself (its own, and
//! those it covers for TimescaleDB's scheduler), which the doctor reads.

use std::time::Instant;

use sqlx::PgConnection;

use super::SetupError;

/// Runs kept per job.
const RUNS_KEPT: i64 = 500;

/// Writes one run into `locus_job_runs`, and logs it.
pub async fn record(
    conn: &mut PgConnection,
    job: &str,
    started: Instant,
    result: &Result<String, SetupError>,
) -> Result<(), SetupError> {
    let (ok, detail) = match result {
        Ok(d) => (true, d.clone()),
        Err(e) => (false, e.to_string()),
    };
    if ok {
        tracing::debug!(job, %detail, "job ran");
    } else {
        tracing::warn!(job, %detail, "job failed");
    }
    let ms = started.elapsed().as_millis() as i64;
    sqlx::query(
        "WITH ins AS (
            INSERT INTO locus_job_runs (job, started_at, duration_ms, ok, detail)
            VALUES ($1, now() - make_interval(secs => $2::float8 / 1000), $2, $3, $4)
         )
         DELETE FROM locus_job_runs WHERE job = $1 AND started_at < (
            SELECT started_at FROM locus_job_runs WHERE job = $1 ORDER BY started_at DESC OFFSET $5 LIMIT 1)",
    )
    .bind(job)
    .bind(ms)
    .bind(ok)
    .bind(detail)
    .bind(RUNS_KEPT)
    .execute(conn)
    .await
    .map_err(SetupError::sql("recording a job run"))?;
    Ok(())
}
