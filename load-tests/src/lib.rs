//! The fleet simulator and the drivers shared by `locus-load` and
//! `locus-bench`.

pub mod fleet;
pub mod nats;
pub mod pg;
pub mod proc;
pub mod raw_calls;
pub mod run;
pub mod verify;
