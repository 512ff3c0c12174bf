//! The storage lifecycle: which tier the database offers, the schema locus
//! owns on it, the jobs locus runs where TimescaleDB's own are missing (or
//! where its scheduler keeps failing them), and the doctor that reports drift.

pub mod adopt;
pub mod catalog;
pub mod cover;
pub mod doctor;
pub mod hourly;
pub mod maintain;
pub mod partitions;
pub mod setup;
pub mod timescale;

pub use setup::{Plan, SetupError, Step, Tier};
