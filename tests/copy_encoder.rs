//! The COPY encoder against PostgreSQL itself: byte for byte what the server
//! produces for the same rows, and a round trip through a real COPY.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use bytes::BytesMut;
use common::TestDb;
use futures::TryStreamExt;
use locus::{
    location::{COLUMNS, LocationReader, SELECT_COLUMNS, ValidLocation},
    pipeline::copy_encoder::{encode_header, encode_row, encode_trailer},
};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

/// Loads `rows` with one binary COPY, encoded as locus encodes them.
async fn copy_in(conn: &mut PgConnection, rows: &[ValidLocation]) -> u64 {
    let mut buf = BytesMut::new();
    encode_header(&mut buf);
    for r in rows {
        encode_row(&mut buf, r);
    }
    encode_trailer(&mut buf);
    let mut copy = conn
        .copy_in_raw(&format!(
            "COPY location_events ({COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await
        .unwrap();
    copy.send(buf.as_ref()).await.unwrap();
    copy.finish().await.unwrap()
}

fn rows() -> Vec<ValidLocation> {
    vec![
        ValidLocation {
            time_us: 1_780_000_000_123_456,
            device_id: uuid::uuid!("6f1c1c2e-5a3b-4c1d-9e8f-0a1b2c3d4e5f"),
            user_id: uuid::uuid!("0b6e7c7a-1f2d-4e3c-8b9a-9c8d7e6f5a4b"),
            app_source: "mextrack".into(),
            latitude: 19.432_608_123,
            longitude: -99.133_208_456,
            accuracy: Some(4.5),
            altitude: Some(2_240.25),
            speed: Some(42.125),
            heading: Some(359.5),
            // jsonb prints its canonical text: keys sorted by length then bytes, ", " and ": ".
            metadata: Some(r#"{"n": 1, "ok": true, "tag": "é"}"#.into()),
        },
        ValidLocation {
            time_us: -1, // before 1970 and before 2000: negative offsets
            device_id: Uuid::from_u128(1),
            user_id: Uuid::from_u128(u128::MAX),
            app_source: "pshop".into(),
            latitude: -90.0,
            longitude: 180.0,
            accuracy: None,
            altitude: Some(-12.5),
            speed: None,
            heading: None,
            metadata: None,
        },
    ]
}

fn sql_literal(r: &ValidLocation) -> String {
    let opt = |v: Option<f32>| v.map_or("NULL::real".into(), |x| format!("{x}::real"));
    format!(
        "SELECT to_timestamp({}::numeric / 1000000), '{}'::uuid, '{}'::uuid, '{}'::text, {}::float8, {}::float8, {}, {}, {}, {}, {}",
        r.time_us,
        r.device_id,
        r.user_id,
        r.app_source,
        r.latitude,
        r.longitude,
        opt(r.accuracy),
        opt(r.altitude),
        opt(r.speed),
        opt(r.heading),
        r.metadata
            .as_ref()
            .map_or("NULL::jsonb".into(), |m| format!("'{m}'::jsonb")),
    )
}

#[tokio::test]
async fn encoder_matches_postgres_byte_for_byte() {
    let db = TestDb::new().await;
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let select = rows()
        .iter()
        .map(sql_literal)
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let from_pg: Vec<u8> = conn
        .copy_out_raw(&format!("COPY ({select}) TO STDOUT (FORMAT binary)"))
        .await
        .unwrap()
        .try_fold(Vec::new(), |mut acc, chunk| async move {
            acc.extend_from_slice(&chunk);
            Ok(acc)
        })
        .await
        .unwrap();
    let mut ours = BytesMut::new();
    encode_header(&mut ours);
    for r in rows() {
        encode_row(&mut ours, &r);
    }
    encode_trailer(&mut ours);
    assert_eq!(ours.as_ref(), from_pg.as_slice());
    drop(conn);
    db.drop_db().await;
}

#[tokio::test]
async fn encoded_rows_load_and_read_back_unchanged() {
    let db = TestDb::new().await;
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    sqlx::Executor::execute(&mut conn, include_str!("../migrations/location_events.sql"))
        .await
        .unwrap();
    assert_eq!(copy_in(&mut conn, &rows()).await, 2);
    type Row = (
        i64,
        Uuid,
        Uuid,
        String,
        f64,
        f64,
        Option<f32>,
        Option<f32>,
        Option<f32>,
        Option<f32>,
        Option<String>,
    );
    let back: Vec<Row> = sqlx::query_as(
        "SELECT ((extract(epoch FROM time) * 1000000)::numeric)::int8, device_id, user_id, app_source, latitude, longitude,
                accuracy, altitude, speed, heading, metadata::text
         FROM location_events ORDER BY time DESC",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    for (got, want) in back.iter().zip(rows()) {
        assert_eq!(got.0, want.time_us);
        assert_eq!(
            (got.1, got.2, got.3.as_str()),
            (want.device_id, want.user_id, want.app_source.as_str())
        );
        assert_eq!((got.4, got.5), (want.latitude, want.longitude));
        assert_eq!(
            (got.6, got.7, got.8, got.9),
            (want.accuracy, want.altitude, want.speed, want.heading)
        );
        assert_eq!(got.10, want.metadata);
    }

    // The same rows as the queries read them: by position, the column types
    // checked on the first row only.
    let mut reader = LocationReader::default();
    let read: Vec<ValidLocation> = sqlx::query(&format!(
        "SELECT {SELECT_COLUMNS} FROM location_events ORDER BY time DESC"
    ))
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .iter()
    .map(|r| reader.read(r).unwrap())
    .collect();
    assert_eq!(read, rows());

    // A column of another type (a table that drifted: accuracy as float8)
    // is an error naming it, not a float4 read from half a float8.
    let drifted = sqlx::query(
        "SELECT time, device_id, user_id, app_source, latitude, longitude, accuracy::float8 AS accuracy,
                altitude, speed, heading, metadata::text AS metadata
         FROM location_events",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let err = LocationReader::default()
        .read(&drifted[0])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("location column 6 is FLOAT8, not FLOAT4"),
        "{err}"
    );
    drop(conn);
    db.drop_db().await;
}

/// The fuzzer's corpus for the validator (`fuzz/corpus/validate`, kept in
/// the repo): every point that passes validation is encoded and loaded by a
/// real COPY. The fuzz target checks the encoder against its own decoder;
/// this checks PostgreSQL agrees.
#[tokio::test]
async fn fuzz_corpus_points_that_pass_validation_load_into_postgres() {
    use locus::{config::ValidationArgs, ingest::validate::Validator, proto::LocationBatch};
    use prost::Message;
    /// The fuzz target's clock.
    const NOW_US: i64 = 1_764_000_000_000_000;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/validate");
    let validator = Validator::new(
        &ValidationArgs::default(),
        std::time::Duration::from_secs(30 * 86_400),
    );
    let mut seen = std::collections::HashSet::new();
    let mut valid = Vec::new();
    let mut files = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        files += 1;
        let Ok(batch) = LocationBatch::decode(bytes.as_slice()) else {
            continue;
        };
        for loc in batch.locations {
            if let Ok(v) = validator.validate(loc, NOW_US)
                && seen.insert((v.device_id, v.time_us))
            {
                valid.push(v);
            }
        }
    }
    assert!(files >= 3, "the corpus is missing: {dir}");
    assert!(
        !valid.is_empty(),
        "no point of the corpus passes validation"
    );

    let db = TestDb::new().await;
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    sqlx::Executor::execute(&mut conn, include_str!("../migrations/location_events.sql"))
        .await
        .unwrap();
    assert_eq!(copy_in(&mut conn, &valid).await, valid.len() as u64);
    drop(conn);
    db.drop_db().await;
}
