//! TimescaleDB tiers: the hypertable and its chunk interval on both
//! editions; compression, the continuous aggregate and the policies on the
//! community edition.

use std::time::Duration;

use sqlx::PgConnection;

use super::{SetupError, Step, Tier, plan::step, secs};
use crate::config::StorageArgs;

/// `location_hourly` as a continuous aggregate, the community edition's.
pub const HOURLY_CAGG_SQL: &str = include_str!("../../migrations/location_hourly.cagg.sql");

/// The hypertable as found.
#[derive(Debug, Clone, Default)]
pub struct Hypertable {
    pub exists: bool,
    pub chunk_interval_s: Option<i64>,
    pub compression_enabled: bool,
    pub segmentby: Vec<String>,
    pub orderby: Vec<String>,
}

/// A policy job as found.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Job {
    pub job_id: i32,
    pub proc_name: String,
    /// `location_events` or `location_hourly`.
    pub target: String,
    /// The policy's main interval, in seconds (compress_after, drop_after or start_offset).
    pub after_s: Option<i64>,
    pub end_offset_s: Option<i64>,
    pub schedule_s: i64,
}

/// A row of `timescaledb_information.compression_settings`: column, its
/// segment-by position, order-by position and direction.
type Setting = (String, Option<i16>, Option<i16>, Option<bool>);

pub async fn hypertable(conn: &mut PgConnection) -> Result<Hypertable, SetupError> {
    let row: Option<(Option<i64>, bool)> = sqlx::query_as(
        "SELECT (SELECT extract(epoch FROM d.time_interval)::int8 FROM timescaledb_information.dimensions d
                 WHERE d.hypertable_name = h.hypertable_name AND d.column_name = 'time'),
                h.compression_enabled
         FROM timescaledb_information.hypertables h WHERE h.hypertable_name = 'location_events'",
    )
    .fetch_optional(&mut *conn)
    .await
    .map_err(SetupError::sql("reading the hypertable"))?;
    let Some((chunk_interval_s, compression_enabled)) = row else {
        return Ok(Hypertable::default());
    };
    let settings: Vec<Setting> = sqlx::query_as(
        "SELECT attname::text, segmentby_column_index, orderby_column_index, orderby_asc
         FROM timescaledb_information.compression_settings
         WHERE hypertable_name = 'location_events'",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(SetupError::sql("reading compression settings"))?;
    let ordered = |f: fn(&Setting) -> Option<(i16, String)>| {
        let mut v: Vec<(i16, String)> = settings.iter().filter_map(f).collect();
        v.sort();
        v.into_iter().map(|(_, s)| s).collect::<Vec<_>>()
    };
    Ok(Hypertable {
        exists: true,
        chunk_interval_s,
        compression_enabled,
        segmentby: ordered(|(a, s, _, _)| s.map(|i| (i, a.clone()))),
        orderby: ordered(|(a, _, o, asc)| {
            o.map(|i| {
                (
                    i,
                    format!("{a} {}", if *asc == Some(false) { "DESC" } else { "ASC" }),
                )
            })
        }),
    })
}

pub async fn jobs(conn: &mut PgConnection) -> Result<Vec<Job>, SetupError> {
    sqlx::query_as(
        "SELECT j.job_id, j.proc_name::text,
                CASE WHEN j.hypertable_name = 'location_events' THEN 'location_events' ELSE 'location_hourly' END AS target,
                extract(epoch FROM coalesce(j.config->>'compress_after', j.config->>'drop_after', j.config->>'start_offset')::interval)::int8 AS after_s,
                extract(epoch FROM (j.config->>'end_offset')::interval)::int8 AS end_offset_s,
                extract(epoch FROM j.schedule_interval)::int8 AS schedule_s
         FROM timescaledb_information.jobs j
         WHERE j.hypertable_name IN ('location_events', 'location_hourly')
            OR j.hypertable_name = (SELECT materialization_hypertable_name FROM timescaledb_information.continuous_aggregates
                                    WHERE view_name = 'location_hourly')
         ORDER BY j.job_id",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(SetupError::sql("reading policy jobs"))
}

pub async fn is_cagg(conn: &mut PgConnection) -> Result<bool, SetupError> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM timescaledb_information.continuous_aggregates WHERE view_name = 'location_hourly')",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(SetupError::sql("reading continuous aggregates"))
}

/// The steps after `location_events` exists as a plain table or hypertable.
pub fn hypertable_steps(found: &Hypertable, storage: &StorageArgs) -> Vec<Step> {
    let want = secs(storage.chunk_interval);
    if !found.exists {
        return vec![step(
            "make location_events a hypertable",
            format!(
                "SELECT create_hypertable('location_events', by_range('time', INTERVAL '{want} seconds'))"
            ),
        )];
    }
    if found.chunk_interval_s != Some(want) {
        return vec![step(
            format!(
                "change the chunk interval from {} to {} (new chunks only)",
                found.chunk_interval_s.map_or("?".into(), human),
                human(want)
            ),
            format!("SELECT set_chunk_time_interval('location_events', INTERVAL '{want} seconds')"),
        )];
    }
    Vec::new()
}

pub const SEGMENT_BY: &str = "device_id";
pub const ORDER_BY: &str = "time DESC";

/// Community edition: compression, the three policies and the continuous
/// aggregate. `hourly_is_cagg` and `jobs` are as found.
pub fn community_steps(
    found: &Hypertable,
    hourly: Option<char>,
    hourly_is_cagg: bool,
    jobs: &[Job],
    storage: &StorageArgs,
) -> Result<Vec<Step>, SetupError> {
    let mut steps = Vec::new();
    let compression_right =
        found.compression_enabled && found.segmentby == [SEGMENT_BY] && found.orderby == [ORDER_BY];
    if !compression_right {
        steps.push(step(
            "enable compression, segmented by device_id, ordered by time DESC",
            format!(
                "ALTER TABLE location_events SET (timescaledb.compress, \
                 timescaledb.compress_segmentby = '{SEGMENT_BY}', timescaledb.compress_orderby = '{ORDER_BY}')"
            ),
        ));
    }
    let job = |proc: &str, target: &str| {
        jobs.iter()
            .find(|j| j.proc_name == proc && j.target == target)
    };
    policy(
        &mut steps,
        job("policy_compression", "location_events"),
        "compression",
        secs(storage.compress_after),
        "SELECT add_compression_policy('location_events', INTERVAL '{} seconds')",
        "SELECT remove_compression_policy('location_events')",
    );
    policy(
        &mut steps,
        job("policy_retention", "location_events"),
        "raw retention",
        secs(storage.raw_retention),
        "SELECT add_retention_policy('location_events', INTERVAL '{} seconds')",
        "SELECT remove_retention_policy('location_events')",
    );
    match (hourly, hourly_is_cagg) {
        (None, _) => steps.push(step(
            "create the continuous aggregate location_hourly (outside a transaction)",
            HOURLY_CAGG_SQL,
        )),
        (Some(_), true) => {}
        (Some(k), false) => {
            return Err(SetupError::Refused(format!(
                "location_hourly exists as a {} rather than a continuous aggregate (was this database on \
                 another tier?); setup will not replace it: rename or drop it, and run setup again",
                relkind_name(k)
            )));
        }
    }
    let window = secs(storage.refresh_window());
    let schedule = secs(storage.hourly_refresh_interval);
    let refresh = job("policy_refresh_continuous_aggregate", "location_hourly");
    let refresh_right = refresh.is_some_and(|j| {
        j.after_s == Some(window) && j.end_offset_s == Some(3600) && j.schedule_s == schedule
    });
    if !refresh_right {
        if refresh.is_some() {
            steps.push(step(
                "replace the refresh policy of location_hourly",
                "SELECT remove_continuous_aggregate_policy('location_hourly')",
            ));
        }
        steps.push(step(
            format!(
                "refresh location_hourly every {} over the last {} (late points included)",
                human(schedule),
                human(window)
            ),
            format!(
                "SELECT add_continuous_aggregate_policy('location_hourly', start_offset => INTERVAL '{window} seconds', \
                 end_offset => INTERVAL '1 hour', schedule_interval => INTERVAL '{schedule} seconds')"
            ),
        ));
    }
    policy(
        &mut steps,
        job("policy_retention", "location_hourly"),
        "hourly retention",
        secs(storage.hourly_retention),
        "SELECT add_retention_policy('location_hourly', INTERVAL '{} seconds')",
        "SELECT remove_retention_policy('location_hourly')",
    );
    Ok(steps)
}

/// Adds a policy, or replaces one whose interval differs.
fn policy(
    steps: &mut Vec<Step>,
    found: Option<&Job>,
    what: &str,
    want_s: i64,
    add: &str,
    remove: &str,
) {
    match found {
        Some(j) if j.after_s == Some(want_s) => {}
        Some(j) => {
            steps.push(step(
                format!(
                    "replace the {what} policy ({} -> {})",
                    j.after_s.map_or("?".into(), human),
                    human(want_s)
                ),
                remove,
            ));
            steps.push(step(
                format!("{what} after {}", human(want_s)),
                add.replace("{}", &want_s.to_string()),
            ));
        }
        None => steps.push(step(
            format!("{what} after {}", human(want_s)),
            add.replace("{}", &want_s.to_string()),
        )),
    }
}

pub fn human(s: i64) -> String {
    crate::config::human(Duration::from_secs(s.max(0) as u64))
}

pub fn relkind_name(k: char) -> &'static str {
    match k {
        'r' => "table",
        'v' => "view",
        'm' => "materialized view",
        'p' => "partitioned table",
        _ => "relation",
    }
}

/// The jobs locus itself runs on this tier (the others are TimescaleDB's).
pub fn locus_runs_jobs(tier: Tier) -> bool {
    tier != Tier::Timescale
}
