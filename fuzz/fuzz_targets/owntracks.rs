//! Any bytes as an OwnTracks payload (HTTP body or MQTT message), and as
//! a topic: the parser never panics, and a location it makes, bound to a
//! tracker, goes through the validator without panicking.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use locus::{
    config::ValidationArgs,
    ingest::validate::Validator,
    trackers::{
        Tracker,
        owntracks::{self, Message},
    },
};

fuzz_target!(|data: &[u8]| {
    if let Ok(topic) = std::str::from_utf8(data) {
        let _ = owntracks::tracker_of_topic(topic);
    }
    let Ok(Message::Location { fix, .. }) = owntracks::parse(data) else {
        return;
    };
    let tracker = Tracker {
        app_source: "owntracks".into(),
        tracker_id: "jane/phone".into(),
        device_id: locus::trackers::device_id("owntracks", "jane/phone"),
        user_id: uuid::Uuid::from_u128(1),
    };
    let v = Validator::new(&ValidationArgs::default(), Duration::from_secs(30 * 86_400));
    let now = 1_764_000_000_000_000;
    let _ = v.validate(fix.into_location(&tracker, now), now);
});
