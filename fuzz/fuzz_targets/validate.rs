//! Any bytes, as a gRPC LocationBatch, through the validator: it never
//! panics, what it passes is in range, and it encodes to a COPY row that
//! reads back as the same point.

#![no_main]

use std::time::Duration;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use locus::{
    config::ValidationArgs, ingest::validate::Validator, pipeline::copy_encoder,
    proto::LocationBatch,
};
use prost::Message;

/// A fixed clock (2025-11-24), so that a crash reproduces.
const NOW_US: i64 = 1_764_000_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = LocationBatch::decode(data) else {
        return;
    };
    let v = Validator::new(&ValidationArgs::default(), Duration::from_secs(30 * 86_400));
    for loc in batch.locations {
        let Ok(valid) = v.validate(loc, NOW_US) else {
            continue;
        };
        assert!((-90.0..=90.0).contains(&valid.latitude));
        assert!((-180.0..=180.0).contains(&valid.longitude));
        assert!(!(valid.latitude == 0.0 && valid.longitude == 0.0));
        assert!(valid.time_us <= NOW_US + 300_000_000);
        assert!(valid.heading.is_none_or(|h| (0.0..360.0).contains(&h)));
        assert!(valid.speed.is_none_or(|s| (0.0..=1_200.0).contains(&s)));
        assert!(!valid.app_source.is_empty() && !valid.app_source.contains('\0'));
        assert!(
            valid
                .metadata
                .as_ref()
                .is_none_or(|m| !escapes_nul(m) && m.len() <= 4096)
        );
        let mut row = BytesMut::new();
        copy_encoder::encode_row(&mut row, &valid);
        assert_eq!(row.len(), copy_encoder::encoded_len(&valid));
        assert_eq!(copy_encoder::decode_row(&row).as_ref(), Some(&valid));
    }
});

/// Whether JSON text writes U+0000 (which PostgreSQL's jsonb refuses): a
/// `\u0000` escape whose backslash is not itself escaped, i.e. preceded by
/// an even number of backslashes. (`{"\\u0000":1}` is a backslash and the
/// text `u0000`, which jsonb takes.) Raw control bytes are not valid JSON,
/// so the escape is the only way to write it. Deliberately not the
/// validator's own check, which walks the parsed value.
fn escapes_nul(json: &str) -> bool {
    let b = json.as_bytes();
    b.windows(6).enumerate().any(|(i, w)| {
        w.eq_ignore_ascii_case(b"\\u0000")
            && b[..i].iter().rev().take_while(|&&c| c == b'\\').count() % 2 == 0
    })
}
