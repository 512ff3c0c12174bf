//! `locus doctor`: what the storage looks like, and what needs attention.
//! Read-only: it plans setup without applying it to find drift.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;

use super::{
    SetupError, Tier, catalog,
    cover::{self, Covering},
    maintain, micros,
    partitions::DEFAULT_PARTITION,
    setup::{self, SetupOptions},
    timescale,
};

#[derive(Debug, Serialize)]
pub struct Report {
    pub tier: Tier,
    pub notes: Vec<String>,
    /// Setup steps still needed: missing indexes, policies, wrong intervals.
    pub drift: Vec<String>,
    pub raw: Raw,
    pub compression: Option<Compression>,
    pub jobs: Vec<JobStatus>,
    /// The policy jobs TimescaleDB's scheduler keeps failing, which locus
    /// runs itself (`--cover-failed-jobs-after`), and why.
    pub covering: Vec<Covering>,
    pub hourly: Hourly,
    /// Everything above that needs an operator. Doctor exits non-zero when
    /// this is not empty.
    pub attention: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Raw {
    /// Chunks (TimescaleDB) or partitions (plain PostgreSQL, default included).
    pub chunks: i64,
    pub bytes: i64,
    pub oldest_point: Option<DateTime<Utc>>,
    pub newest_point: Option<DateTime<Utc>>,
    /// Plain PostgreSQL: rows that fell outside every partition.
    pub default_partition_rows: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct Compression {
    pub chunks: i64,
    pub compressed_chunks: i64,
    pub before_bytes: i64,
    pub after_bytes: i64,
    /// before / after, over the compressed chunks.
    pub ratio: Option<f64>,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct JobStatus {
    pub job: String,
    pub last_run: Option<DateTime<Utc>>,
    pub last_ok: Option<bool>,
    pub last_success: Option<DateTime<Utc>>,
    /// Failed runs: over the job's life (TimescaleDB) or the last 24 hours (locus).
    pub failures: i64,
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Hourly {
    pub rows: i64,
    pub newest_hour: Option<DateTime<Utc>>,
    /// Hours waiting for locus's rollup (tiers 2 and 3).
    pub pending_hours: Option<i64>,
    /// Seconds since the aggregate was last brought up to date.
    pub lag_seconds: Option<i64>,
}

fn sql(doing: &str) -> impl FnOnce(sqlx::Error) -> SetupError {
    SetupError::sql(doing.to_string())
}

/// Examines the database at `now_us` against `opts`.
pub async fn examine(url: &str, opts: &SetupOptions, now_us: i64) -> Result<Report, SetupError> {
    let mut conn = setup::connect(url).await?;
    let plan = setup::plan(&mut conn, opts, now_us).await?;
    let facts = catalog::read(&mut conn).await?;
    let mut attention = Vec::new();
    let drift: Vec<String> = plan.steps.iter().map(|s| s.description.clone()).collect();
    if !drift.is_empty() {
        attention.push(format!(
            "{} setup steps are needed (run `locus setup`)",
            drift.len()
        ));
    }
    let storage = &opts.storage;
    let raw = raw(&mut conn, facts.tier, facts.events.is_some()).await?;
    if let Some(n) = raw.default_partition_rows.filter(|n| *n > 0) {
        attention.push(format!(
            "{n} rows are in the default partition: partitions are missing for their times"
        ));
    }
    if let Some(oldest) = raw.oldest_point {
        let cutoff_us = now_us - micros(storage.raw_retention) - micros(storage.chunk_interval);
        if oldest.timestamp_micros() < cutoff_us {
            attention.push(format!(
                "raw points from {oldest} are past the retention: is retention running?"
            ));
        }
    }
    let compression =
        if facts.tier == Tier::Timescale && facts.installed.is_some() && facts.events.is_some() {
            Some(compression(&mut conn).await?)
        } else {
            None
        };
    let (mut jobs, covering) = if facts.tier == Tier::Timescale && facts.installed.is_some() {
        (
            timescale_jobs(&mut conn).await?,
            cover::coverings(&mut conn, storage, facts.job_runs.is_some()).await?,
        )
    } else if facts.job_runs.is_some() {
        (
            locus_jobs(
                &mut conn,
                &[
                    maintain::ROLLUP,
                    maintain::RAW_RETENTION,
                    maintain::HOURLY_RETENTION,
                ],
            )
            .await?,
            Vec::new(),
        )
    } else {
        (Vec::new(), Vec::new())
    };
    for j in &jobs {
        if j.last_ok != Some(false) {
            continue;
        }
        let why = j.last_error.as_deref().unwrap_or("see the database log");
        let Some(c) = covering.iter().find(|c| c.job == j.job) else {
            attention.push(format!("job {} failed its last run: {why}", j.job));
            continue;
        };
        match c.last_cover_ok {
            Some(true) => {}
            Some(false) => attention.push(format!(
                "job {}: TimescaleDB's scheduler failed its last {} runs ({why}), and locus's own \
                 run of it ({}) failed too: {}",
                j.job,
                c.scheduler_failures,
                c.runs_as,
                c.last_cover_detail.as_deref().unwrap_or("-")
            )),
            None => attention.push(format!(
                "job {}: TimescaleDB's scheduler failed its last {} runs ({why}); locus covers for \
                 it but has not run it yet: is `locus serve` running (or `locus maintain`)?",
                j.job, c.scheduler_failures
            )),
        }
    }
    // locus's covering runs, listed with the other jobs.
    if facts.tier == Tier::Timescale && facts.job_runs.is_some() {
        jobs.extend(
            locus_jobs(&mut conn, &cover::NAMES)
                .await?
                .into_iter()
                .filter(|j| j.last_run.is_some()),
        );
    }
    let hourly = hourly(&mut conn, &facts, &jobs, now_us).await?;
    let stale_after = 3 * storage.hourly_refresh_interval.as_secs() as i64 + 60;
    // Work is waiting: pending hours (locus's rollup), or raw points at all
    // (the continuous aggregate's policy).
    let work_waiting = hourly
        .pending_hours
        .map_or(raw.newest_point.is_some(), |n| n > 0);
    match hourly.lag_seconds {
        Some(lag) if lag > stale_after && work_waiting => attention.push(format!(
            "location_hourly was last brought up to date {} ago (refresh every {})",
            timescale::human(lag),
            crate::config::human(storage.hourly_refresh_interval)
        )),
        None if work_waiting && facts.hourly.is_some() => attention.push(
            "location_hourly has never been refreshed: is `locus serve` (or the policy) running?"
                .into(),
        ),
        _ => {}
    }
    Ok(Report {
        tier: facts.tier,
        notes: plan.notes,
        drift,
        raw,
        compression,
        jobs,
        covering,
        hourly,
        attention,
    })
}

async fn raw(conn: &mut PgConnection, tier: Tier, exists: bool) -> Result<Raw, SetupError> {
    if !exists {
        return Ok(Raw {
            chunks: 0,
            bytes: 0,
            oldest_point: None,
            newest_point: None,
            default_partition_rows: None,
        });
    }
    let (chunks, bytes): (i64, i64) = if tier.is_timescale() {
        sqlx::query_as("SELECT count(*), coalesce(sum(total_bytes), 0)::int8 FROM chunks_detailed_size('location_events')")
    } else {
        sqlx::query_as(
            "SELECT count(*), coalesce(sum(pg_total_relation_size(relid)), 0)::int8
             FROM pg_partition_tree('location_events') WHERE isleaf",
        )
    }
    .fetch_one(&mut *conn)
    .await
    .map_err(sql("measuring chunks"))?;
    let (oldest_point, newest_point): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT min(time), max(time) FROM location_events")
            .fetch_one(&mut *conn)
            .await
            .map_err(sql("reading the oldest and newest point"))?;
    let default_partition_rows = if tier == Tier::Postgres
        && sqlx::query_scalar::<_, bool>(&format!(
            "SELECT to_regclass('{DEFAULT_PARTITION}') IS NOT NULL"
        ))
        .fetch_one(&mut *conn)
        .await
        .map_err(sql("finding the default partition"))?
    {
        Some(
            sqlx::query_scalar(&format!("SELECT count(*) FROM {DEFAULT_PARTITION}"))
                .fetch_one(&mut *conn)
                .await
                .map_err(sql("counting the default partition"))?,
        )
    } else {
        None
    };
    Ok(Raw {
        chunks,
        bytes,
        oldest_point,
        newest_point,
        default_partition_rows,
    })
}

async fn compression(conn: &mut PgConnection) -> Result<Compression, SetupError> {
    let (chunks, compressed_chunks, before_bytes, after_bytes): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(total_chunks), 0)::int8, coalesce(sum(number_compressed_chunks), 0)::int8,
                coalesce(sum(before_compression_total_bytes), 0)::int8, coalesce(sum(after_compression_total_bytes), 0)::int8
         FROM hypertable_compression_stats('location_events')",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(sql("reading compression stats"))?;
    let ratio = (after_bytes > 0).then(|| before_bytes as f64 / after_bytes as f64);
    Ok(Compression {
        chunks,
        compressed_chunks,
        before_bytes,
        after_bytes,
        ratio,
    })
}

async fn timescale_jobs(conn: &mut PgConnection) -> Result<Vec<JobStatus>, SetupError> {
    let ids: Vec<i32> = timescale::jobs(conn)
        .await?
        .into_iter()
        .map(|j| j.job_id)
        .collect();
    sqlx::query_as(
        "SELECT j.proc_name || ' on ' || j.hypertable_name || ' (job ' || j.job_id || ')' AS job,
                -- TimescaleDB says -infinity for never.
                CASE WHEN isfinite(s.last_run_started_at) THEN s.last_run_started_at END AS last_run,
                CASE s.last_run_status WHEN 'Success' THEN true WHEN 'Failed' THEN false END AS last_ok,
                CASE WHEN isfinite(s.last_successful_finish) THEN s.last_successful_finish END AS last_success,
                coalesce(s.total_failures, 0)::int8 AS failures,
                (SELECT e.err_message FROM timescaledb_information.job_errors e
                 WHERE e.job_id = j.job_id ORDER BY e.start_time DESC LIMIT 1) AS last_error
         FROM timescaledb_information.jobs j
         LEFT JOIN timescaledb_information.job_stats s ON s.job_id = j.job_id
         WHERE j.job_id = ANY($1) ORDER BY j.job_id",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await
    .map_err(sql("reading job history"))
}

async fn locus_jobs(conn: &mut PgConnection, names: &[&str]) -> Result<Vec<JobStatus>, SetupError> {
    sqlx::query_as(
        "SELECT j AS job,
                (SELECT max(started_at) FROM locus_job_runs WHERE job = j) AS last_run,
                (SELECT ok FROM locus_job_runs WHERE job = j ORDER BY started_at DESC LIMIT 1) AS last_ok,
                (SELECT max(started_at) FROM locus_job_runs WHERE job = j AND ok) AS last_success,
                (SELECT count(*) FROM locus_job_runs WHERE job = j AND NOT ok AND started_at > now() - INTERVAL '1 day') AS failures,
                (SELECT detail FROM locus_job_runs WHERE job = j AND NOT ok ORDER BY started_at DESC LIMIT 1) AS last_error
         FROM unnest($1::text[]) AS j",
    )
    .bind(names)
    .fetch_all(&mut *conn)
    .await
    .map_err(sql("reading job history"))
}

async fn hourly(
    conn: &mut PgConnection,
    facts: &catalog::Facts,
    jobs: &[JobStatus],
    now_us: i64,
) -> Result<Hourly, SetupError> {
    if facts.hourly.is_none() {
        return Ok(Hourly {
            rows: 0,
            newest_hour: None,
            pending_hours: None,
            lag_seconds: None,
        });
    }
    let (rows, newest_hour): (i64, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT count(*), max(hour) FROM location_hourly")
            .fetch_one(&mut *conn)
            .await
            .map_err(sql("reading location_hourly"))?;
    let pending_hours = if facts.tier != Tier::Timescale && facts.pending.is_some() {
        Some(
            sqlx::query_scalar("SELECT count(DISTINCT hour) FROM locus_rollup_pending")
                .fetch_one(&mut *conn)
                .await
                .map_err(sql("reading pending hours"))?,
        )
    } else {
        None
    };
    // On the community edition, the policy's runs, or locus's covering them.
    let refreshers: &[&str] = if facts.tier == Tier::Timescale {
        &[
            "policy_refresh_continuous_aggregate",
            "cover_hourly_refresh",
        ]
    } else {
        &[maintain::ROLLUP]
    };
    let last_success = jobs
        .iter()
        .filter(|j| refreshers.iter().any(|r| j.job.starts_with(r)))
        .filter_map(|j| j.last_success)
        .max();
    let lag_seconds = last_success.map(|t| (now_us - t.timestamp_micros()) / 1_000_000);
    Ok(Hourly {
        rows,
        newest_hour,
        pending_hours,
        lag_seconds,
    })
}

/// The report for people.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let t = |d: Option<DateTime<Utc>>| d.map_or("-".to_string(), |d| d.to_rfc3339());
    let _ = writeln!(o, "tier: {}", r.tier);
    for n in &r.notes {
        let _ = writeln!(o, "note: {n}");
    }
    let _ = writeln!(
        o,
        "drift: {}",
        if r.drift.is_empty() {
            "none".to_string()
        } else {
            r.drift.len().to_string()
        }
    );
    for d in &r.drift {
        let _ = writeln!(o, "  - {d}");
    }
    let _ = writeln!(
        o,
        "raw points: {} chunks/partitions, {} bytes, oldest {}, newest {}",
        r.raw.chunks,
        r.raw.bytes,
        t(r.raw.oldest_point),
        t(r.raw.newest_point)
    );
    if let Some(n) = r.raw.default_partition_rows {
        let _ = writeln!(o, "default partition: {n} rows");
    }
    match &r.compression {
        Some(c) => {
            let ratio = c.ratio.map_or("-".to_string(), |x| format!("{x:.1}x"));
            let _ = writeln!(
                o,
                "compression: {}/{} chunks compressed, {} -> {} bytes ({ratio})",
                c.compressed_chunks, c.chunks, c.before_bytes, c.after_bytes
            );
        }
        None => {
            let _ = writeln!(o, "compression: not available on this tier");
        }
    }
    for j in &r.jobs {
        let state = match j.last_ok {
            Some(true) => "ok",
            Some(false) => "FAILED",
            None => "never ran",
        };
        let _ = writeln!(
            o,
            "job {}: last run {} {state}, {} failures",
            j.job,
            t(j.last_run),
            j.failures
        );
    }
    for c in &r.covering {
        let last = match c.last_cover_ok {
            Some(true) => format!("last ran {} ok", t(c.last_cover_run)),
            Some(false) => format!("last ran {} and FAILED", t(c.last_cover_run)),
            None => "not run yet".into(),
        };
        let _ = writeln!(
            o,
            "covering: locus runs {} itself as {} ({last}): TimescaleDB's scheduler failed its last {} runs: {}",
            c.job,
            c.runs_as,
            c.scheduler_failures,
            c.scheduler_error
                .as_deref()
                .unwrap_or("see the database log")
        );
    }
    let _ = writeln!(
        o,
        "location_hourly: {} rows, newest hour {}, pending hours {}, last refreshed {}",
        r.hourly.rows,
        t(r.hourly.newest_hour),
        r.hourly.pending_hours.map_or("-".into(), |n| n.to_string()),
        r.hourly
            .lag_seconds
            .map_or("never".into(), |s| format!("{} ago", timescale::human(s)))
    );
    if r.attention.is_empty() {
        let _ = writeln!(o, "attention: nothing");
    } else {
        for a in &r.attention {
            let _ = writeln!(o, "ATTENTION: {a}");
        }
    }
    o
}
