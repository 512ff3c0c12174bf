//! The fleet simulator and the drivers shared by `locus-load` and
//! `locus-bench`.

pub mod fleet;
pub mod run;
pub mod verify;
