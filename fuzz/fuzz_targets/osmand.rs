//! Any bytes as an OsmAnd request: as a query string or form body (first
//! byte even) or as a JSON body (odd). The parser never panics, and each
//! point it makes, bound to a tracker, goes through the validator without
//! panicking.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use locus::{
    config::ValidationArgs,
    ingest::validate::Validator,
    trackers::{Report, Tracker, osmand},
};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let reports: Vec<Report> = if mode % 2 == 0 {
        let pairs: Vec<(String, String)> = form_urlencoded::parse(rest)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        vec![osmand::parse_params(
            pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )]
    } else {
        match osmand::parse_json(rest, 10_000) {
            Ok(r) => r,
            Err(_) => return,
        }
    };
    let tracker = Tracker {
        app_source: "fleet".into(),
        tracker_id: "fuzz".into(),
        device_id: locus::trackers::device_id("fleet", "fuzz"),
        user_id: uuid::Uuid::from_u128(1),
    };
    let v = Validator::new(&ValidationArgs::default(), Duration::from_secs(30 * 86_400));
    for r in reports {
        if let Ok(Some(fix)) = r.fix {
            let _ = v.validate(
                fix.into_location(&tracker, 1_764_000_000_000_000),
                1_764_000_000_000_000,
            );
        }
    }
});
