//! locus covers for TimescaleDB's scheduler: once the scheduler has failed
//! one of locus's policy jobs `--cover-failed-jobs-after` runs in a row,
//! locus runs that job itself (`CALL run_job`) on the job's own schedule, and
//! records each run in `locus_job_runs`, until the scheduler succeeds with
//! it again. Without this a scheduler that fails every job (as TimescaleDB
//! 2.28.3 does on PostgreSQL 15.20) leaves chunks uncompressed and old
//! chunks undropped until the disk fills.
//!
//! How many runs in a row failed is `consecutive_failures` of
//! `_timescaledb_internal.bgw_job_stat`, the table behind
//! `timescaledb_information.job_stats` in every 2.x; it counts the
//! scheduler's runs only (`CALL run_job` does not touch it) and is reset by
//! its first success. Where that table is missing, the failures in
//! `timescaledb_information.job_errors` (2.9 and later) since the last
//! success are counted; before 2.9, only `job_stats` is there.

use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;

use super::{SetupError, job_runs, timescale};
use crate::config::StorageArgs;

/// First key of the advisory lock held around a covering run (the second
/// is the job id): two instances never run the same job at once.
pub const LOCK_CLASS: i32 = 0x6c63_7672; // "lcvr"

/// A locus-owned policy job and what the scheduler made of it lately.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct SchedulerState {
    pub job_id: i32,
    pub proc_name: String,
    /// `location_events` or `location_hourly`.
    pub target: String,
    pub schedule_s: i64,
    /// False when the job was paused (`alter_job(..., scheduled => false)`).
    pub scheduled: bool,
    /// The scheduler's runs that failed in a row, up to its latest.
    pub consecutive_failures: i64,
    /// The scheduler's last error text (TimescaleDB 2.9 and later).
    pub last_error: Option<String>,
}

impl SchedulerState {
    /// TimescaleDB's name for it, as the doctor lists jobs.
    pub fn label(&self) -> String {
        format!(
            "{} on {} (job {})",
            self.proc_name, self.target, self.job_id
        )
    }

    /// The name locus records its covering runs of this job under.
    pub fn cover_name(&self) -> Option<&'static str> {
        cover_name(&self.proc_name, &self.target)
    }

    /// Whether locus covers for the scheduler with this job: it is locus's,
    /// the operator has not paused it, and the scheduler failed its last
    /// `after` runs (never when `after` is 0).
    pub fn is_covered(&self, after: u32) -> bool {
        after > 0
            && self.scheduled
            && self.cover_name().is_some()
            && self.consecutive_failures >= i64::from(after)
    }
}

/// The `locus_job_runs` name of the covering runs of `proc` on `target`.
pub fn cover_name(proc: &str, target: &str) -> Option<&'static str> {
    Some(match (proc, target) {
        ("policy_compression", "location_events") => "cover_compression",
        ("policy_retention", "location_events") => "cover_raw_retention",
        ("policy_refresh_continuous_aggregate", "location_hourly") => "cover_hourly_refresh",
        ("policy_retention", "location_hourly") => "cover_hourly_retention",
        _ => return None,
    })
}

/// Every covering job name, as recorded.
pub const NAMES: [&str; 4] = [
    "cover_compression",
    "cover_raw_retention",
    "cover_hourly_refresh",
    "cover_hourly_retention",
];

/// Reads the scheduler's record of each locus-owned policy job.
pub async fn scheduler_states(conn: &mut PgConnection) -> Result<Vec<SchedulerState>, SetupError> {
    let jobs = timescale::jobs(conn).await?;
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let (stat_table, errors_view): (bool, bool) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('_timescaledb_internal.bgw_job_stat')
                        AND attname = 'consecutive_failures' AND NOT attisdropped),
                to_regclass('timescaledb_information.job_errors') IS NOT NULL",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(SetupError::sql("finding TimescaleDB's job statistics"))?;
    let failures = if stat_table {
        "coalesce((SELECT st.consecutive_failures FROM _timescaledb_internal.bgw_job_stat st
                   WHERE st.job_id = j.job_id), 0)"
    } else if errors_view {
        "CASE WHEN s.last_run_status = 'Failed' THEN
             (SELECT count(*) FROM timescaledb_information.job_errors e WHERE e.job_id = j.job_id
              AND e.start_time > coalesce(s.last_successful_finish, '-infinity')) ELSE 0 END"
    } else {
        // Failed, and never succeeded: every run failed; otherwise the last one at least.
        "CASE WHEN s.last_run_status = 'Failed' THEN
             CASE WHEN s.total_successes = 0 THEN s.total_failures ELSE 1 END ELSE 0 END"
    };
    let last_error = if errors_view {
        "(SELECT e.err_message FROM timescaledb_information.job_errors e
          WHERE e.job_id = j.job_id ORDER BY e.start_time DESC LIMIT 1)"
    } else {
        "NULL::text"
    };
    let ids: Vec<i32> = jobs.iter().map(|j| j.job_id).collect();
    let rows: Vec<(i32, bool, i64, Option<String>)> = sqlx::query_as(&format!(
        "SELECT j.job_id, j.scheduled, ({failures})::int8, {last_error}
         FROM timescaledb_information.jobs j
         LEFT JOIN timescaledb_information.job_stats s ON s.job_id = j.job_id
         WHERE j.job_id = ANY($1)"
    ))
    .bind(ids)
    .fetch_all(&mut *conn)
    .await
    .map_err(SetupError::sql("reading the scheduler's job statistics"))?;
    Ok(jobs
        .into_iter()
        .filter_map(|j| {
            let (_, scheduled, consecutive_failures, last_error) =
                rows.iter().find(|r| r.0 == j.job_id)?.clone();
            Some(SchedulerState {
                job_id: j.job_id,
                proc_name: j.proc_name,
                target: j.target,
                schedule_s: j.schedule_s,
                scheduled,
                consecutive_failures,
                last_error,
            })
        })
        .collect())
}

/// What one covering pass did with one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Ran it; the recorded detail, or the error.
    Ran(Result<String, String>),
    /// Covered, but locus ran it less than its schedule interval ago.
    NotDue,
    /// Another instance holds the job's lock: it runs it now.
    Busy,
}

/// One covering pass: runs each job the scheduler keeps failing, where it
/// is due. Returns what it did, by covering job name.
pub async fn run(
    conn: &mut PgConnection,
    storage: &StorageArgs,
) -> Result<Vec<(&'static str, Outcome)>, SetupError> {
    let after = storage.cover_failed_jobs_after;
    if after == 0 {
        return Ok(Vec::new());
    }
    let mut done = Vec::new();
    for state in scheduler_states(conn).await? {
        if !state.is_covered(after) {
            continue;
        }
        let Some(name) = state.cover_name() else {
            continue;
        };
        let outcome = cover_one(conn, &state, name).await?;
        done.push((name, outcome));
    }
    Ok(done)
}

/// Runs one job under its lock, if due, and records the run.
async fn cover_one(
    conn: &mut PgConnection,
    state: &SchedulerState,
    name: &'static str,
) -> Result<Outcome, SetupError> {
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(LOCK_CLASS)
        .bind(state.job_id)
        .fetch_one(&mut *conn)
        .await
        .map_err(SetupError::sql("taking a covering job's lock"))?;
    if !locked {
        return Ok(Outcome::Busy);
    }
    let result = due_then_run(conn, state, name).await;
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1, $2)")
        .bind(LOCK_CLASS)
        .bind(state.job_id)
        .execute(&mut *conn)
        .await
        .map_err(SetupError::sql("releasing a covering job's lock"));
    let outcome = result?;
    unlocked?;
    Ok(outcome)
}

/// Under the lock: another instance may have just run it.
async fn due_then_run(
    conn: &mut PgConnection,
    state: &SchedulerState,
    name: &'static str,
) -> Result<Outcome, SetupError> {
    let recent: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM locus_job_runs WHERE job = $1
                        AND started_at > now() - make_interval(secs => $2::float8))",
    )
    .bind(name)
    .bind(state.schedule_s as f64)
    .fetch_one(&mut *conn)
    .await
    .map_err(SetupError::sql("reading when a covering job last ran"))?;
    if recent {
        return Ok(Outcome::NotDue);
    }
    let why = format!(
        "TimescaleDB's scheduler failed its last {} runs: {}",
        state.consecutive_failures,
        state
            .last_error
            .as_deref()
            .unwrap_or("see the database log")
    );
    tracing::warn!(job = %state.label(), %why, "locus runs the job itself");
    let started = Instant::now();
    // The job id comes from the catalog. Over the simple protocol, outside
    // any transaction block, so that the policy may commit as it goes.
    let sql = format!("CALL run_job({})", state.job_id);
    let result = sqlx::Executor::execute(&mut *conn, sql.as_str())
        .await
        .map(|_| format!("{sql}, covering for the scheduler ({why})"))
        .map_err(SetupError::sql(format!("running {}", state.label())));
    job_runs::record(conn, name, started, &result).await?;
    Ok(Outcome::Ran(result.map_err(|e| e.to_string())))
}

/// A job locus covers for, as the doctor reports it.
#[derive(Debug, Serialize)]
pub struct Covering {
    /// TimescaleDB's job, as in the job list.
    pub job: String,
    /// The name of locus's runs in `locus_job_runs`.
    pub runs_as: &'static str,
    pub scheduler_failures: i64,
    /// Why: the scheduler's last error.
    pub scheduler_error: Option<String>,
    pub last_cover_run: Option<DateTime<Utc>>,
    pub last_cover_ok: Option<bool>,
    pub last_cover_detail: Option<String>,
}

/// The jobs locus covers for now, with its last covering run of each.
pub async fn coverings(
    conn: &mut PgConnection,
    storage: &StorageArgs,
    job_runs_table: bool,
) -> Result<Vec<Covering>, SetupError> {
    let mut out = Vec::new();
    for state in scheduler_states(conn).await? {
        let Some(name) = state
            .cover_name()
            .filter(|_| state.is_covered(storage.cover_failed_jobs_after))
        else {
            continue;
        };
        let last: Option<(DateTime<Utc>, bool, String)> = if job_runs_table {
            sqlx::query_as(
                "SELECT started_at, ok, detail FROM locus_job_runs WHERE job = $1
                 ORDER BY started_at DESC LIMIT 1",
            )
            .bind(name)
            .fetch_optional(&mut *conn)
            .await
            .map_err(SetupError::sql("reading covering runs"))?
        } else {
            None
        };
        out.push(Covering {
            job: state.label(),
            runs_as: name,
            scheduler_failures: state.consecutive_failures,
            scheduler_error: state.last_error.clone(),
            last_cover_run: last.as_ref().map(|l| l.0),
            last_cover_ok: last.as_ref().map(|l| l.1),
            last_cover_detail: last.map(|l| l.2),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(proc: &str, target: &str, failures: i64) -> SchedulerState {
        SchedulerState {
            job_id: 1000,
            proc_name: proc.into(),
            target: target.into(),
            schedule_s: 43_200,
            scheduled: true,
            consecutive_failures: failures,
            last_error: None,
        }
    }

    #[test]
    fn covered_after_n_failures_in_a_row_and_no_longer_after_a_success() {
        let s = state("policy_compression", "location_events", 3);
        assert!(s.is_covered(3));
        assert!(!s.is_covered(4));
        assert!(!s.is_covered(0), "0 never covers");
        // TimescaleDB resets the count at the scheduler's first success.
        assert!(!state("policy_compression", "location_events", 0).is_covered(3));
        let paused = SchedulerState {
            scheduled: false,
            ..s
        };
        assert!(!paused.is_covered(3), "a paused job is the operator's");
    }

    #[test]
    fn only_locus_jobs_are_covered() {
        assert!(!state("policy_reorder", "location_events", 9).is_covered(1));
        assert!(state("policy_retention", "location_hourly", 9).is_covered(1));
        for (proc, target) in [
            ("policy_compression", "location_events"),
            ("policy_retention", "location_events"),
            ("policy_refresh_continuous_aggregate", "location_hourly"),
            ("policy_retention", "location_hourly"),
        ] {
            assert!(NAMES.contains(&cover_name(proc, target).unwrap()));
        }
    }
}
