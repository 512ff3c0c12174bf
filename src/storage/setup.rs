//! `locus setup`: detect the tier, plan the steps that bring the database to
//! the wanted schema, and apply them under an advisory lock.
//!
//! The plan is computed from what the catalog says exists, so a database that
//! is already right yields an empty plan, and `--dry-run` prints exactly the
//! SQL that would run. Setup never drops or rewrites data: where the existing
//! state cannot be reached without doing so, it stops and says why.

use std::{fmt, str::FromStr, time::Duration};

use sqlx::{Connection, PgConnection, postgres::PgConnectOptions};

use super::partitions::{self, DEFAULT_PARTITION};
use crate::config::StorageArgs;

/// `pg_advisory_lock` key of setup: two instances never plan at once.
const SETUP_LOCK_KEY: i64 = 0x6c6f_6375_735f_7365; // "locus_se"
const CREATE_TABLE_SQL: &str = include_str!("../../migrations/0001_location_events.sql");

/// What the database offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Tier {
    /// TimescaleDB, community edition: hypertable, compression, continuous aggregates, policies.
    Timescale,
    /// TimescaleDB, Apache edition: hypertable only.
    TimescaleApache,
    /// Plain PostgreSQL: native range partitions.
    Postgres,
}

impl Tier {
    pub fn is_timescale(self) -> bool {
        matches!(self, Tier::Timescale | Tier::TimescaleApache)
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Timescale => "timescale (TimescaleDB community edition)",
            Tier::TimescaleApache => "timescale-apache (TimescaleDB Apache edition: no compression, continuous aggregates or policies)",
            Tier::Postgres => "postgres (plain PostgreSQL, native partitions)",
        })
    }
}

impl FromStr for Tier {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        <Tier as clap::ValueEnum>::from_str(s, true)
    }
}

/// Why setup stopped.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("while {doing}: {source}")]
    Sql {
        doing: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("tier {required:?} required, but the database offers {found}: {missing}")]
    TierNotMet {
        required: Tier,
        found: Tier,
        missing: String,
    },
    #[error("{0}")]
    Refused(String),
}

impl SetupError {
    fn sql(doing: impl Into<String>) -> impl FnOnce(sqlx::Error) -> SetupError {
        let doing = doing.into();
        move |source| SetupError::Sql { doing, source }
    }
}

/// One change to the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub description: String,
    pub sql: String,
}

/// What setup found and what it would do.
#[derive(Debug, Clone)]
pub struct Plan {
    pub tier: Tier,
    /// Facts an operator should know (a half-installed TimescaleDB, say).
    pub notes: Vec<String>,
    pub steps: Vec<Step>,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "-- tier: {}", self.tier)?;
        for n in &self.notes {
            writeln!(f, "-- note: {n}")?;
        }
        if self.steps.is_empty() {
            return writeln!(f, "-- nothing to do: the schema is up to date");
        }
        for s in &self.steps {
            writeln!(f, "-- {}\n{};", s.description, s.sql.trim_end())?;
        }
        Ok(())
    }
}

/// Options of `locus setup`.
#[derive(Debug, Clone)]
pub struct SetupOptions {
    pub storage: StorageArgs,
    pub require_tier: Option<Tier>,
}

/// Opens the connection setup uses: UTC and ISO dates (partition bounds are
/// parsed), and a lock timeout so that DDL never waits forever behind writes.
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
        .map_err(SetupError::Connect)
}

/// Plans and, unless `dry_run`, applies; returns the plan. `now_us` is the
/// clock partitions are made against.
pub async fn run(
    conn: &mut PgConnection,
    opts: &SetupOptions,
    dry_run: bool,
    now_us: i64,
) -> Result<Plan, SetupError> {
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(SETUP_LOCK_KEY)
        .execute(&mut *conn)
        .await
        .map_err(SetupError::sql("taking the setup lock"))?;
    let result = plan_and_apply(conn, opts, dry_run, now_us).await;
    let unlock = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(SETUP_LOCK_KEY)
        .execute(&mut *conn)
        .await;
    let plan = result?;
    unlock.map_err(SetupError::sql("releasing the setup lock"))?;
    Ok(plan)
}

async fn plan_and_apply(
    conn: &mut PgConnection,
    opts: &SetupOptions,
    dry_run: bool,
    now_us: i64,
) -> Result<Plan, SetupError> {
    let plan = plan(conn, opts, now_us).await?;
    if !dry_run {
        apply(conn, &plan).await?;
    }
    Ok(plan)
}

async fn apply(conn: &mut PgConnection, plan: &Plan) -> Result<(), SetupError> {
    for step in &plan.steps {
        tracing::info!(step = %step.description, "setup");
        // A query without arguments runs over the simple protocol.
        sqlx::Executor::execute(&mut *conn, step.sql.as_str())
            .await
            .map_err(SetupError::sql(step.description.clone()))?;
    }
    Ok(())
}

#[derive(Debug, sqlx::FromRow)]
struct Facts {
    installed: Option<String>,
    available: Option<String>,
    preload: String,
    license: Option<String>,
    relkind: Option<String>,
}

/// Reads the catalog and lists the steps still needed.
pub async fn plan(
    conn: &mut PgConnection,
    opts: &SetupOptions,
    now_us: i64,
) -> Result<Plan, SetupError> {
    let facts: Facts = sqlx::query_as(
        "SELECT
            (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb') AS installed,
            (SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb') AS available,
            current_setting('shared_preload_libraries') AS preload,
            current_setting('timescaledb.license', true) AS license,
            (SELECT relkind::text FROM pg_class WHERE oid = to_regclass('location_events')) AS relkind",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(SetupError::sql("reading the catalog"))?;

    let mut notes = Vec::new();
    let preloaded = facts.preload.split(',').any(|l| l.trim() == "timescaledb");
    let tier = if facts.installed.is_some() || (facts.available.is_some() && preloaded) {
        if facts.license.as_deref() == Some("apache") {
            Tier::TimescaleApache
        } else {
            Tier::Timescale
        }
    } else {
        if facts.available.is_some() {
            notes.push("timescaledb is installed on the server but not in shared_preload_libraries; using plain PostgreSQL".into());
        }
        Tier::Postgres
    };
    if tier == Tier::TimescaleApache {
        notes.push("compression, continuous aggregates and policies are not available on the Apache edition".into());
    }
    if let Some(required) = opts.require_tier
        && required != tier
        && !(required == Tier::TimescaleApache && tier == Tier::Timescale)
    {
        let missing = match (required, tier) {
            (Tier::Timescale, Tier::TimescaleApache) => {
                "timescaledb.license is 'apache'; set it to 'timescale' for the community features"
                    .into()
            }
            (_, Tier::Postgres) if facts.available.is_none() => {
                "the timescaledb extension is not installed on the server".into()
            }
            (_, Tier::Postgres) => "timescaledb must be in shared_preload_libraries".into(),
            _ => {
                format!("the database offers more than {required:?}; do not require a lesser tier")
            }
        };
        return Err(SetupError::TierNotMet {
            required,
            found: tier,
            missing,
        });
    }

    let mut steps = Vec::new();
    let storage = &opts.storage;
    let interval_us = micros(storage.chunk_interval);
    let relkind = facts.relkind.as_deref().and_then(|k| k.chars().next());
    if tier.is_timescale() {
        if facts.installed.is_none() {
            steps.push(step(
                "create the timescaledb extension",
                "CREATE EXTENSION IF NOT EXISTS timescaledb",
            ));
        }
        let is_hypertable = facts.installed.is_some()
            && sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM timescaledb_information.hypertables WHERE hypertable_name = 'location_events')",
            )
            .fetch_one(&mut *conn)
            .await
            .map_err(SetupError::sql("reading hypertables"))?;
        match relkind {
            None => steps.push(step("create table location_events", CREATE_TABLE_SQL)),
            Some('r') if !is_hypertable => {
                if has_rows(conn).await? {
                    return Err(SetupError::Refused(
                        "location_events exists as a plain table with rows; adopting it is not implemented yet, and setup will not touch it".into(),
                    ));
                }
            }
            Some('r') => {}
            Some(k) => return Err(unexpected_relkind(k)),
        }
        if !is_hypertable {
            steps.push(step(
                "make location_events a hypertable",
                format!(
                    "SELECT create_hypertable('location_events', by_range('time', INTERVAL '{} seconds'))",
                    storage.chunk_interval.as_secs()
                ),
            ));
        }
    } else {
        match relkind {
            None => steps.push(step(
                "create table location_events, partitioned by time",
                format!("{}\nPARTITION BY RANGE (time)", CREATE_TABLE_SQL.trim_end()),
            )),
            Some('p') => {}
            Some('r') => {
                return Err(SetupError::Refused(
                    "location_events exists but is not partitioned; adopting it is not implemented yet, and setup will not touch it".into(),
                ));
            }
            Some(k) => return Err(unexpected_relkind(k)),
        }
    }

    let existing_indexes: Vec<String> = if relkind.is_some() {
        sqlx::query_scalar(
            "SELECT indexname::text FROM pg_indexes WHERE tablename = 'location_events'",
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(SetupError::sql("reading indexes"))?
    } else {
        Vec::new()
    };
    for (name, def) in INDEXES {
        if !existing_indexes.iter().any(|i| i == name) {
            steps.push(step(
                format!("create index {name}"),
                format!("CREATE {def}"),
            ));
        }
    }

    if tier == Tier::Postgres {
        steps.extend(partition_steps(conn, relkind.is_some(), storage, interval_us, now_us).await?);
    }
    Ok(Plan { tier, notes, steps })
}

/// The indexes of `location_events`: the unique key that makes duplicates
/// impossible, and the seed's query paths.
pub const INDEXES: [(&str, &str); 3] = [
    (
        "location_events_device_id_time_key",
        "UNIQUE INDEX location_events_device_id_time_key ON location_events (device_id, time DESC)",
    ),
    (
        "idx_location_user",
        "INDEX idx_location_user ON location_events (user_id, time DESC)",
    ),
    (
        "idx_location_app",
        "INDEX idx_location_app ON location_events (app_source, time DESC)",
    ),
];

async fn partition_steps(
    conn: &mut PgConnection,
    table_exists: bool,
    storage: &StorageArgs,
    interval_us: i64,
    now_us: i64,
) -> Result<Vec<Step>, SetupError> {
    let existing: Vec<(String, String)> = if table_exists {
        sqlx::query_as(
            "SELECT c.relname::text, pg_get_expr(c.relpartbound, c.oid)
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'location_events'::regclass",
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(SetupError::sql("reading partitions"))?
    } else {
        Vec::new()
    };
    let mut steps = Vec::new();
    if !existing.iter().any(|(name, _)| name == DEFAULT_PARTITION) {
        steps.push(step(
            "create the default partition",
            format!("CREATE TABLE {DEFAULT_PARTITION} PARTITION OF location_events DEFAULT"),
        ));
    }
    let ranges: Vec<partitions::Range> = existing
        .iter()
        .filter_map(|(_, bound)| partitions::parse_bound(bound))
        .collect();
    for want in partitions::wanted(
        now_us,
        interval_us,
        micros(storage.raw_retention),
        storage.partitions_ahead,
    ) {
        // A partition of another interval may already cover part of this
        // range; it is kept, and the gap is left to the default partition.
        if !ranges.iter().any(|r| r.overlaps(&want)) {
            steps.push(step(
                format!("create partition {}", want.name(interval_us)),
                want.create_sql(interval_us),
            ));
        }
    }
    Ok(steps)
}

async fn has_rows(conn: &mut PgConnection) -> Result<bool, SetupError> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM location_events)")
        .fetch_one(&mut *conn)
        .await
        .map_err(SetupError::sql("checking location_events for rows"))
}

fn unexpected_relkind(k: char) -> SetupError {
    SetupError::Refused(format!(
        "location_events exists but is not a table (relkind {k:?}); setup will not replace it"
    ))
}

fn step(description: impl Into<String>, sql: impl Into<String>) -> Step {
    Step {
        description: description.into(),
        sql: sql.into(),
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}
