//! `locus setup`: detect the tier, plan the steps that bring the database to
//! the wanted schema, and apply them under an advisory lock.
//!
//! The plan is computed from what the catalog says exists, so a database that
//! is already right yields an empty plan, and `--dry-run` prints exactly the
//! SQL that would run. A changed setting is a difference like any other: the
//! plan replaces the policy or sets the new interval. Setup never drops or
//! rewrites data: an existing table is adopted only by an explicit, checked
//! migration that keeps the old table, and where that is not possible setup
//! stops and says why.
//!
//! Order matters on TimescaleDB: `ALTER EXTENSION ... UPDATE` runs as the
//! first command of a fresh connection, and the continuous aggregate is
//! created outside any transaction block (every step runs on its own, over
//! the simple protocol, never inside BEGIN).

use sqlx::{Connection, PgConnection, postgres::PgConnectOptions};

use super::{
    Plan, SetupError, Step, Tier, adopt,
    catalog::{self, Facts},
    micros,
    partitions::{self, DEFAULT_PARTITION},
    plan::step,
    timescale,
};
use crate::config::StorageArgs;

/// `pg_advisory_lock` key of setup: two instances never plan at once.
const SETUP_LOCK_KEY: i64 = 0x6c6f_6375_735f_7365; // "locus_se"
pub const EVENTS_SQL: &str = include_str!("../../migrations/location_events.sql");
pub const HOURLY_TABLE_SQL: &str = include_str!("../../migrations/location_hourly.table.sql");
pub const JOBS_SQL: &str = include_str!("../../migrations/locus_jobs.sql");
pub const TOKENS_SQL: &str = include_str!("../../migrations/locus_tokens.sql");
pub const TRACKERS_SQL: &str = include_str!("../../migrations/locus_trackers.sql");

/// Options of `locus setup`.
#[derive(Debug, Clone)]
pub struct SetupOptions {
    pub storage: StorageArgs,
    pub require_tier: Option<Tier>,
}

/// Opens a connection for setup and maintenance: UTC and ISO dates
/// (partition bounds are parsed), and a lock timeout so that DDL never waits
/// forever behind writes.
pub async fn connect(url: &str) -> Result<PgConnection, SetupError> {
    let opts: PgConnectOptions = url.parse().map_err(SetupError::Connect)?;
    let opts = opts.application_name("locus-setup").options([
        ("TimeZone", "UTC"),
        ("DateStyle", "ISO"),
        ("lock_timeout", "10s"),
        ("client_min_messages", "warning"),
    ]);
    PgConnection::connect_with(&opts)
        .await
        .map_err(|e| connect_error(&opts, e))
}

/// A missing database says so, and what to do, once; any other failure to
/// connect is reported as sqlx gives it.
fn connect_error(opts: &PgConnectOptions, e: sqlx::Error) -> SetupError {
    let missing = matches!(&e, sqlx::Error::Database(d) if d.code().as_deref() == Some("3D000"));
    if !missing {
        return SetupError::Connect(e);
    }
    SetupError::NoDatabase {
        name: opts
            .get_database()
            .unwrap_or(opts.get_username())
            .to_string(),
        host: opts.get_host().to_string(),
        port: opts.get_port(),
        user: opts.get_username().to_string(),
    }
}

/// Creates the database `url` names when the server has none of that name
/// (`--create-database`); returns its name when it did. It connects to the
/// server's `postgres` database to do so, as `createdb` does.
pub async fn create_database_if_missing(url: &str) -> Result<Option<String>, SetupError> {
    let name = match connect(url).await {
        Ok(conn) => {
            let _ = conn.close().await;
            return Ok(None);
        }
        Err(SetupError::NoDatabase { name, .. }) => name,
        Err(e) => return Err(e),
    };
    let opts: PgConnectOptions = url.parse().map_err(SetupError::Connect)?;
    let mut conn = PgConnection::connect_with(&opts.database("postgres"))
        .await
        .map_err(SetupError::Connect)?;
    let created = sqlx::Executor::execute(
        &mut conn,
        format!("CREATE DATABASE {}", super::catalog::quote_ident(&name)).as_str(),
    )
    .await;
    let _ = conn.close().await;
    match created {
        Ok(_) => Ok(Some(name)),
        // Another instance made it first.
        Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("42P04") => Ok(None),
        Err(e) => Err(SetupError::sql(format!("creating database {name:?}"))(e)),
    }
}

/// Plans and, unless `dry_run`, applies; returns the plan. `now_us` is the
/// clock partitions are made against.
pub async fn run(
    url: &str,
    opts: &SetupOptions,
    dry_run: bool,
    now_us: i64,
) -> Result<Plan, SetupError> {
    opts.storage
        .validate()
        .map_err(|e| SetupError::Refused(e.to_string()))?;
    // The lock lives on a session of its own, which does nothing else: the
    // work sessions may have to be replaced (after an extension update).
    let mut lock = connect(url).await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(SETUP_LOCK_KEY)
        .execute(&mut lock)
        .await
        .map_err(SetupError::sql("taking the setup lock"))?;
    let result = plan_and_apply(url, opts, dry_run, now_us).await;
    let _ = lock.close().await; // ends the session, and with it the lock
    result
}

async fn plan_and_apply(
    url: &str,
    opts: &SetupOptions,
    dry_run: bool,
    now_us: i64,
) -> Result<Plan, SetupError> {
    let mut conn = connect(url).await?;
    let first = plan(&mut conn, opts, now_us).await?;
    if dry_run {
        return Ok(first);
    }
    let Some(update) = first.steps.iter().find(|s| s.fresh_connection).cloned() else {
        apply(&mut conn, &first.steps).await?;
        return Ok(first);
    };
    // `ALTER EXTENSION ... UPDATE` must be the first command of its session,
    // and a session that loaded the old version cannot use the new one: the
    // rest is planned again, and applied, on a new session.
    drop(conn);
    let mut fresh = connect(url).await?;
    apply(&mut fresh, std::slice::from_ref(&update)).await?;
    drop(fresh);
    let mut conn = connect(url).await?;
    let rest = plan(&mut conn, opts, now_us).await?;
    apply(&mut conn, &rest.steps).await?;
    let mut steps = vec![update];
    steps.extend(rest.steps);
    Ok(Plan { steps, ..rest })
}

async fn apply(conn: &mut PgConnection, steps: &[Step]) -> Result<(), SetupError> {
    for step in steps {
        tracing::info!(step = %step.description, "setup");
        execute(conn, &step.sql)
            .await
            .map_err(SetupError::sql(step.description.clone()))?;
    }
    Ok(())
}

/// A query without arguments runs over the simple protocol: several
/// statements in one step run as one implicit transaction, and a single
/// statement runs outside any transaction block.
async fn execute(conn: &mut PgConnection, sql: &str) -> Result<(), sqlx::Error> {
    sqlx::Executor::execute(conn, sql).await.map(|_| ())
}

/// Reads the catalog and lists the steps still needed.
pub async fn plan(
    conn: &mut PgConnection,
    opts: &SetupOptions,
    now_us: i64,
) -> Result<Plan, SetupError> {
    let facts = catalog::read(conn).await?;
    check_required(&facts, opts.require_tier)?;
    let storage = &opts.storage;
    let mut steps = extension_steps(&facts);
    let hypertable = if facts.installed.is_some() {
        timescale::hypertable(conn).await?
    } else {
        timescale::Hypertable::default()
    };
    steps.extend(events_steps(conn, &facts, &hypertable, storage, now_us).await?);
    steps.extend(bookkeeping_steps(&facts)?);
    steps.extend(hourly_steps(conn, &facts, &hypertable, storage).await?);
    Ok(Plan {
        tier: facts.tier,
        notes: facts.notes,
        steps,
    })
}

/// Creates or updates the timescaledb extension where the tier has it.
fn extension_steps(facts: &Facts) -> Vec<Step> {
    if !facts.tier.is_timescale() {
        return Vec::new();
    }
    match (&facts.installed, &facts.available) {
        (None, _) => vec![step(
            "create the timescaledb extension",
            "CREATE EXTENSION IF NOT EXISTS timescaledb",
        )],
        (Some(have), Some(latest)) if have != latest => vec![Step {
            fresh_connection: true,
            ..step(
                format!("update timescaledb {have} -> {latest}"),
                "ALTER EXTENSION timescaledb UPDATE",
            )
        }],
        _ => Vec::new(),
    }
}

/// `location_events`: created, adopted, or kept (its partitions or
/// hypertable settings brought in line), then its indexes, the old unique
/// key last.
async fn events_steps(
    conn: &mut PgConnection,
    facts: &Facts,
    hypertable: &timescale::Hypertable,
    storage: &StorageArgs,
    now_us: i64,
) -> Result<Vec<Step>, SetupError> {
    let tier = facts.tier;
    let mut steps = Vec::new();
    let adopting = match facts.events {
        None => {
            steps.extend(create_events(tier, storage, now_us));
            false
        }
        Some('p') if tier == Tier::Postgres => {
            steps.extend(partition_steps(conn, storage, now_us).await?);
            false
        }
        Some('r') if hypertable.exists => {
            steps.extend(timescale::hypertable_steps(hypertable, storage));
            false
        }
        Some('r') if tier.is_timescale() && !adopt::needs_migration(conn).await? => {
            steps.extend(timescale::hypertable_steps(hypertable, storage));
            false
        }
        Some('r') => {
            steps.push(adopt::migration(conn, create_events(tier, storage, now_us)).await?);
            true
        }
        Some('p') => {
            return Err(SetupError::Refused(
                "location_events is a partitioned table but this database has TimescaleDB: \
                 moving between tiers is not supported; rename it to adopt its rows"
                    .into(),
            ));
        }
        Some(k) => {
            return Err(SetupError::Refused(format!(
                "location_events exists but is a {}; setup will not replace it",
                timescale::relkind_name(k)
            )));
        }
    };
    let existing = if facts.events.is_some() && !adopting {
        catalog::indexes(conn, "location_events").await?
    } else {
        Vec::new()
    };
    steps.extend(missing_indexes(&existing, &EVENTS_INDEXES));
    // Dropped only after the new key exists (a step above, or already):
    // the new key is strictly weaker, so its creation cannot fail on rows
    // the old one let in.
    if existing.iter().any(|i| i == OLD_EVENTS_KEY) {
        steps.push(step(
            format!(
                "drop the old unique key {OLD_EVENTS_KEY} (device_id, time): it let one app's points \
                 take another's place"
            ),
            format!("DROP INDEX {OLD_EVENTS_KEY}"),
        ));
    }
    Ok(steps)
}

/// The steps creating whichever of `indexes` is not among `existing`.
fn missing_indexes<'a>(
    existing: &'a [String],
    indexes: &'a [(&str, &str)],
) -> impl Iterator<Item = Step> + 'a {
    indexes
        .iter()
        .filter(|(name, _)| !existing.iter().any(|i| i == name))
        .map(|(name, def)| step(format!("create index {name}"), format!("CREATE {def}")))
}

/// locus's own tables: the rollup's pending hours, the job runs, tokens,
/// trackers.
fn bookkeeping_steps(facts: &Facts) -> Result<Vec<Step>, SetupError> {
    let mut steps = Vec::new();
    if facts.pending.is_none() || facts.job_runs.is_none() {
        if facts.pending.is_some() != facts.job_runs.is_some() {
            return Err(SetupError::Refused(
                "only one of locus_rollup_pending and locus_job_runs exists; \
                 setup will not guess: drop the other, and run setup again"
                    .into(),
            ));
        }
        steps.push(step("create locus's job tables", JOBS_SQL));
    }
    if facts.tokens.is_none() {
        steps.push(step("create the token table", TOKENS_SQL));
    }
    if facts.trackers.is_none() {
        steps.push(step("create the tracker table", TRACKERS_SQL));
    }
    Ok(steps)
}

/// `location_hourly`: TimescaleDB's continuous aggregate and its policies
/// on the community tier, a table locus keeps elsewhere.
async fn hourly_steps(
    conn: &mut PgConnection,
    facts: &Facts,
    hypertable: &timescale::Hypertable,
    storage: &StorageArgs,
) -> Result<Vec<Step>, SetupError> {
    if facts.tier == Tier::Timescale {
        let (is_cagg, jobs) = if facts.installed.is_some() {
            (
                timescale::is_cagg(conn).await?,
                timescale::jobs(conn).await?,
            )
        } else {
            (false, Vec::new())
        };
        return timescale::community_steps(hypertable, facts.hourly, is_cagg, &jobs, storage);
    }
    let mut steps = Vec::new();
    let existing = match facts.hourly {
        None => {
            steps.push(step("create table location_hourly", HOURLY_TABLE_SQL));
            Vec::new()
        }
        Some('r') => catalog::indexes(conn, "location_hourly").await?,
        Some(k) => {
            return Err(SetupError::Refused(format!(
                "location_hourly exists as a {} rather than a table (was this database on another \
                 tier?); setup will not replace it: rename or drop it, and run setup again",
                timescale::relkind_name(k)
            )));
        }
    };
    steps.extend(missing_indexes(&existing, &HOURLY_INDEXES));
    Ok(steps)
}

fn check_required(facts: &Facts, required: Option<Tier>) -> Result<(), SetupError> {
    let Some(required) = required else {
        return Ok(());
    };
    let tier = facts.tier;
    if required == tier || (required == Tier::TimescaleApache && tier == Tier::Timescale) {
        return Ok(());
    }
    let missing = match (required, tier) {
        (Tier::Timescale, Tier::TimescaleApache) => {
            "timescaledb.license is 'apache'; set it to 'timescale' for compression, continuous \
             aggregates and policies"
                .into()
        }
        (_, Tier::Postgres) if facts.available.is_none() => {
            "the timescaledb extension is not installed on the server".into()
        }
        (_, Tier::Postgres) => "timescaledb must be in shared_preload_libraries".into(),
        _ => format!("the database offers more than {required:?}; do not require a lesser tier"),
    };
    Err(SetupError::TierNotMet {
        required,
        found: tier,
        missing,
    })
}

/// The indexes of `location_events`: the unique key that makes duplicates
/// impossible, and the seed's query paths. The key is `(app_source,
/// device_id, time)`: a device id is unique only within its app_source (one
/// phone may run two apps with the same id), so that no app's points can
/// take another's place.
pub const EVENTS_INDEXES: [(&str, &str); 3] = [
    (
        "location_events_app_source_device_id_time_key",
        "UNIQUE INDEX location_events_app_source_device_id_time_key ON location_events (app_source, device_id, time DESC)",
    ),
    (
        "location_events_user_id_time_idx",
        "INDEX location_events_user_id_time_idx ON location_events (user_id, time DESC)",
    ),
    (
        "location_events_app_source_time_idx",
        "INDEX location_events_app_source_time_idx ON location_events (app_source, time DESC)",
    ),
];

/// The unique key of `location_events` before it held the app_source.
pub const OLD_EVENTS_KEY: &str = "location_events_device_id_time_key";

/// The query paths of `location_hourly` where it is a table (a continuous
/// aggregate gets TimescaleDB's own group-by indexes).
pub const HOURLY_INDEXES: [(&str, &str); 3] = [
    (
        "location_hourly_device_id_hour_idx",
        "INDEX location_hourly_device_id_hour_idx ON location_hourly (device_id, hour)",
    ),
    (
        "location_hourly_user_id_hour_idx",
        "INDEX location_hourly_user_id_hour_idx ON location_hourly (user_id, hour)",
    ),
    (
        "location_hourly_app_source_hour_idx",
        "INDEX location_hourly_app_source_hour_idx ON location_hourly (app_source, hour)",
    ),
];

/// `CREATE TABLE location_events` for the tier, and its partitions or hypertable.
pub fn create_events(tier: Tier, storage: &StorageArgs, now_us: i64) -> Vec<Step> {
    if tier.is_timescale() {
        let mut steps = vec![step("create table location_events", EVENTS_SQL)];
        steps.extend(timescale::hypertable_steps(
            &timescale::Hypertable::default(),
            storage,
        ));
        return steps;
    }
    let mut steps = vec![
        step(
            "create table location_events, partitioned by time",
            format!("{}\nPARTITION BY RANGE (time)", EVENTS_SQL.trim_end()),
        ),
        step(
            "create the default partition",
            format!("CREATE TABLE {DEFAULT_PARTITION} PARTITION OF location_events DEFAULT"),
        ),
    ];
    let interval_us = micros(storage.chunk_interval);
    for r in partitions::missing(
        &[],
        now_us,
        interval_us,
        micros(storage.raw_retention),
        storage.partitions_ahead,
    ) {
        steps.push(step(
            format!("create partition {}", r.name(interval_us)),
            r.create_sql(interval_us),
        ));
    }
    steps
}

async fn partition_steps(
    conn: &mut PgConnection,
    storage: &StorageArgs,
    now_us: i64,
) -> Result<Vec<Step>, SetupError> {
    let existing = partitions::list(conn).await?;
    let mut steps = Vec::new();
    let default_exists = existing.iter().any(|(name, _)| name == DEFAULT_PARTITION);
    if !default_exists {
        steps.push(step(
            "create the default partition",
            format!("CREATE TABLE {DEFAULT_PARTITION} PARTITION OF location_events DEFAULT"),
        ));
    }
    let ranges: Vec<partitions::Range> = existing.iter().filter_map(|(_, r)| *r).collect();
    let interval_us = micros(storage.chunk_interval);
    let default_has_rows = default_exists && partitions::default_has_rows(conn, None).await?;
    for r in partitions::missing(
        &ranges,
        now_us,
        interval_us,
        micros(storage.raw_retention),
        storage.partitions_ahead,
    ) {
        if default_has_rows && partitions::default_has_rows(conn, Some(&r)).await? {
            steps.push(step(
                format!(
                    "create partition {} and move its rows out of the default partition",
                    r.name(interval_us)
                ),
                partitions::create_moving_sql(&r, interval_us),
            ));
        } else {
            steps.push(step(
                format!("create partition {}", r.name(interval_us)),
                r.create_sql(interval_us),
            ));
        }
    }
    Ok(steps)
}
