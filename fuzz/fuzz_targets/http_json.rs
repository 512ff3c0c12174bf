//! Any bytes as an HTTP ingest body: the JSON parser never panics, and what
//! it makes of each point goes through the validator without panicking.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use locus::{config::ValidationArgs, ingest::http::parse_batch, ingest::validate::Validator};

fuzz_target!(|data: &[u8]| {
    let Ok((_, points)) = parse_batch(data, 10_000) else {
        return;
    };
    let v = Validator::new(&ValidationArgs::default(), Duration::from_secs(30 * 86_400));
    for p in points.into_iter().flatten() {
        let _ = v.validate(p, 1_764_000_000_000_000);
    }
});
