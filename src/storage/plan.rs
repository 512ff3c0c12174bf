//! What setup works with: the tier the database offers, the steps that
//! change it and the plan they make, and why setup (or a storage job)
//! stopped.

use std::{fmt, str::FromStr};

/// What the database offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
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
            Tier::TimescaleApache => "timescale-apache (TimescaleDB Apache edition)",
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
    #[error(
        "database {name:?} does not exist on {host}:{port}: create it \
         (createdb -h {host} -p {port} -U {user} {name}), or start locus with --create-database"
    )]
    NoDatabase {
        name: String,
        host: String,
        port: u16,
        user: String,
    },
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
    pub(crate) fn sql(doing: impl Into<String>) -> impl FnOnce(sqlx::Error) -> SetupError {
        let doing = doing.into();
        move |source| SetupError::Sql { doing, source }
    }
}

/// One change to the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub description: String,
    pub sql: String,
    /// Runs as the first command of a new connection (`ALTER EXTENSION ... UPDATE`).
    pub fresh_connection: bool,
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
            let fresh = if s.fresh_connection {
                " (on a fresh connection)"
            } else {
                ""
            };
            writeln!(f, "-- {}{fresh}\n{};", s.description, s.sql.trim_end())?;
        }
        Ok(())
    }
}

/// A step that runs on the session already open.
pub(crate) fn step(description: impl Into<String>, sql: impl Into<String>) -> Step {
    Step {
        description: description.into(),
        sql: sql.into(),
        fresh_connection: false,
    }
}
