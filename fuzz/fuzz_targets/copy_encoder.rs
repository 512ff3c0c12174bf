//! Any point, valid or not, through the COPY encoder: it never panics, its
//! length prediction is exact, and the row is well formed (11 fields, each
//! length within the row) and reads back field for field.

#![no_main]

use arbitrary::Arbitrary;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use locus::{location::ValidLocation, pipeline::copy_encoder};

#[derive(Debug, Arbitrary)]
struct Input {
    time_us: i64,
    device: [u8; 16],
    user: [u8; 16],
    app_source: String,
    latitude: f64,
    longitude: f64,
    accuracy: Option<f32>,
    altitude: Option<f32>,
    speed: Option<f32>,
    heading: Option<f32>,
    metadata: Option<String>,
}

fn same_f32(a: Option<f32>, b: Option<f32>) -> bool {
    a.map(f32::to_bits) == b.map(f32::to_bits)
}

fuzz_target!(|i: Input| {
    let loc = ValidLocation {
        // The encoder subtracts the PostgreSQL epoch: keep clear of overflow,
        // as validation does (times are within years of now).
        time_us: i.time_us / 4,
        device_id: uuid::Uuid::from_bytes(i.device),
        user_id: uuid::Uuid::from_bytes(i.user),
        app_source: i.app_source,
        latitude: i.latitude,
        longitude: i.longitude,
        accuracy: i.accuracy,
        altitude: i.altitude,
        speed: i.speed,
        heading: i.heading,
        metadata: i.metadata,
    };
    let mut row = BytesMut::new();
    copy_encoder::encode_row(&mut row, &loc);
    assert_eq!(row.len(), copy_encoder::encoded_len(&loc));

    // Well formed: the field count, then 11 fields whose lengths add up.
    assert_eq!(i16::from_be_bytes([row[0], row[1]]), 11);
    let mut at = 2;
    for _ in 0..11 {
        let len = i32::from_be_bytes(row[at..at + 4].try_into().expect("4 bytes"));
        at += 4;
        assert!(len >= -1);
        at += len.max(0) as usize;
        assert!(at <= row.len());
    }
    assert_eq!(at, row.len());

    let back = copy_encoder::decode_row(&row).expect("a row the encoder wrote decodes");
    assert_eq!(back.time_us, loc.time_us);
    assert_eq!((back.device_id, back.user_id), (loc.device_id, loc.user_id));
    assert_eq!(back.app_source, loc.app_source);
    assert_eq!(back.latitude.to_bits(), loc.latitude.to_bits());
    assert_eq!(back.longitude.to_bits(), loc.longitude.to_bits());
    assert!(same_f32(back.accuracy, loc.accuracy) && same_f32(back.altitude, loc.altitude));
    assert!(same_f32(back.speed, loc.speed) && same_f32(back.heading, loc.heading));
    assert_eq!(back.metadata, loc.metadata);
});
