//! The storage lifecycle: which tier the database offers, and the schema
//! locus owns on it.

pub mod partitions;
pub mod setup;

pub use setup::{Plan, SetupError, Step, Tier};
