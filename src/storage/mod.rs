//! The storage lifecycle: which tier the database offers, the schema locus
//! owns on it, the jobs locus runs where TimescaleDB's own are missing (or
//! where its scheduler keeps failing them), and the doctor that reports drift.

use std::time::Duration;

pub mod adopt;
pub mod catalog;
pub mod cover;
pub mod doctor;
pub mod hourly;
pub mod job_runs;
pub mod maintain;
pub mod partitions;
pub mod plan;
pub mod setup;
pub mod timescale;

pub use plan::{Plan, SetupError, Step, Tier};

/// `d` in whole microseconds, as partition bounds and cutoffs are compared.
pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// `d` in whole seconds, as SQL intervals are written.
pub(crate) fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}
