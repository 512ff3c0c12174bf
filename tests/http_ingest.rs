//! `POST /v1/locations`: the same semantics as gRPC, over HTTP JSON, with
//! gzip, and clear statuses for bodies that are bad or too large.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::{io::Write, time::Duration};

use common::{
    TestDb, TestServer, block_writes, config, conforms, count_rows, get_json, json_point, now_secs,
};
use serde_json::{Value, json};

fn point(device: &uuid::Uuid, t: i64) -> Value {
    json_point(device, "pshop", t)
}

async fn post(server: &TestServer, body: Vec<u8>, gzip: bool) -> (u16, Option<String>, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("http://{}/v1/locations", server.http))
        .header("content-type", "application/json");
    if gzip {
        req = req.header("content-encoding", "gzip");
    }
    let resp = req.body(body).send().await.unwrap();
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry, resp.json().await.unwrap_or(Value::Null))
}

/// `body` is refused whole, with `status` and the error `code`.
async fn refused(server: &TestServer, body: Vec<u8>, gzip: bool, status: u16, code: &str) {
    let (got, _, answer) = post(server, body, gzip).await;
    assert_eq!(
        (got, answer["error"]["code"].as_str()),
        (status, Some(code)),
        "{answer}"
    );
}

/// The index and reason of each point an answer rejected.
fn reasons(ack: &Value) -> Vec<(u64, &str)> {
    ack["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["reason"].as_str().unwrap()))
        .collect()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_batches_are_acknowledged_after_commit_with_per_point_reasons() {
    let db = TestDb::new().await;
    let server = TestServer::start(config(&db)).await;
    let d = uuid::Uuid::new_v4();
    let t = now_secs() - 60;
    let mut bad_time = point(&d, t + 3);
    bad_time["time"] = json!("yesterday");
    let mut wrong_type = point(&d, t + 4);
    wrong_type["latitude"] = json!("north");
    let mut bad_lat = point(&d, t + 5);
    bad_lat["latitude"] = json!(123.0);
    let body = json!({"batch_id": 42, "locations": [point(&d, t), point(&d, t + 1), bad_time, wrong_type, bad_lat, point(&d, t + 2)]});
    let (status, _, ack) = post(&server, serde_json::to_vec(&body).unwrap(), false).await;
    assert_eq!(status, 200, "{ack}");
    assert_eq!(
        (
            ack["batch_id"].as_u64(),
            ack["accepted"].as_u64(),
            ack["duplicates"].as_u64()
        ),
        (Some(42), Some(3), Some(0))
    );
    assert_eq!(
        reasons(&ack),
        [
            (2, "time_invalid"),
            (3, "point_malformed"),
            (4, "latitude_out_of_range")
        ]
    );
    // What was sent and answered is what the OpenAPI document describes.
    let (_, doc) = get_json(&server, "/v1/openapi.json").await;
    conforms(&doc, "IngestBatchJson", &body);
    conforms(&doc, "IngestLocationJson", &point(&d, t));
    conforms(&doc, "AckJson", &ack);
    for r in ack["rejected"].as_array().unwrap() {
        conforms(&doc, "RejectionJson", r);
    }
    let pool = db.pool().await;
    assert_eq!(count_rows(&pool).await, 3);
    let meta: Value = sqlx::query_scalar("SELECT metadata FROM location_events LIMIT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(meta, json!({"order": 7}));

    // The same again, gzip-compressed: all duplicates.
    let (status, _, ack) = post(&server, gzip(&serde_json::to_vec(&body).unwrap()), true).await;
    assert_eq!(
        (status, ack["duplicates"].as_u64()),
        (200, Some(3)),
        "{ack}"
    );
    assert_eq!(count_rows(&pool).await, 3);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_oversized_bodies_get_clear_statuses() {
    let db = TestDb::new().await;
    let mut cfg = config(&db);
    cfg.limits.max_message_bytes = 64 * 1024;
    cfg.limits.max_decompressed_bytes = 256 * 1024;
    cfg.limits.max_batch_points = 100;
    let server = TestServer::start(cfg).await;
    let d = uuid::Uuid::new_v4();

    refused(
        &server,
        b"this is not json".to_vec(),
        false,
        400,
        "bad_json",
    )
    .await;
    refused(
        &server,
        vec![b' '; 100 * 1024],
        false,
        413,
        "body_too_large",
    )
    .await;
    // A gzip bomb: 50 MB of zeros in about 50 KB.
    let bomb = gzip(&vec![0u8; 50 * 1024 * 1024]);
    assert!(bomb.len() < 64 * 1024);
    refused(&server, bomb, true, 413, "body_too_large").await;
    refused(&server, b"\x1f\x8b garbage".to_vec(), true, 400, "bad_gzip").await;
    // Counted as read: past the 100th location reading stops, before the
    // rest (here not even JSON) is looked at.
    let mut zeros = b"{\"locations\": [".to_vec();
    zeros.extend(b"0,".repeat(101));
    zeros.extend(b"!!! not read");
    refused(&server, zeros, false, 413, "batch_too_large").await;
    let many: Vec<Value> = (0..101).map(|i| point(&d, now_secs() - 200 + i)).collect();
    refused(
        &server,
        serde_json::to_vec(&json!({"locations": many})).unwrap(),
        false,
        413,
        "batch_too_large",
    )
    .await;
    assert_eq!(
        count_rows(&db.pool().await).await,
        0,
        "nothing of it was stored"
    );
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_and_a_missing_database_say_when_to_retry() {
    let db = TestDb::new().await;
    let mut cfg = config(&db);
    cfg.limits.buffer_points = 10;
    cfg.limits.max_batch_points = 10;
    cfg.pipeline.write_retry_deadline = Duration::from_secs(1);
    let server = TestServer::start(cfg).await;
    let d = uuid::Uuid::new_v4();
    let batch = |from: i64| {
        serde_json::to_vec(
            &json!({"locations": (0..10).map(|i| point(&d, from + i)).collect::<Vec<_>>()}),
        )
        .unwrap()
    };

    // Full: a write blocked on a lock holds the whole buffer.
    let pool = db.pool().await;
    let locker = block_writes(&pool).await;
    let first = {
        let (url, body) = (
            format!("http://{}/v1/locations", server.http),
            batch(now_secs() - 100),
        );
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, retry, body) = post(&server, batch(now_secs() - 50), false).await;
    assert_eq!(
        (status, retry.as_deref(), body["error"]["code"].as_str()),
        (429, Some("1"), Some("buffer_full"))
    );
    // Refused before it is parsed: a body that is not JSON is refused for
    // the buffer too, and told it is not JSON once there is room.
    let not_json = || b"{\"locations\": [".to_vec();
    refused(&server, not_json(), false, 429, "buffer_full").await;
    locker.rollback().await.unwrap();
    assert_eq!(first.await.unwrap(), 200);
    refused(&server, not_json(), false, 400, "bad_json").await;

    // The database refuses connections for longer than the retry deadline.
    db.cut_off().await;
    let (status, retry, body) = post(&server, batch(now_secs() - 30), false).await;
    db.restore().await;
    assert_eq!(
        (status, retry.as_deref(), body["error"]["code"].as_str()),
        (503, Some("1"), Some("database_unavailable"))
    );
    server.stop().await;
    db.drop_db().await;
}

/// Each point is read on its own: a number beyond an f64, metadata nested
/// too deep or holding what jsonb refuses, costs only its point, and its
/// neighbours are stored. Only a body that is not an object with a
/// `locations` array fails whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_numbers_and_deep_metadata_are_rejected_alone() {
    let db = TestDb::new().await;
    let server = TestServer::start(config(&db)).await;
    let d = uuid::Uuid::new_v4();
    let t = now_secs() - 3 * 86_400;
    let good = |i: i64| point(&d, t + i).to_string();
    let with = |i: i64, field: &str, text: &str| {
        let mut p = point(&d, t + i);
        p.as_object_mut().unwrap().remove("metadata");
        p[field] = json!("@@");
        p.to_string().replace("\"@@\"", text)
    };
    let deep = "{\"a\":".repeat(130) + "1" + &"}".repeat(130);
    // A leap second, yesterday's 23:59:60: RFC 3339 allows it.
    let leap_day = chrono::DateTime::from_timestamp(now_secs() - 86_400, 0)
        .unwrap()
        .format("%Y-%m-%d")
        .to_string();
    let mut leap = point(&d, t + 7);
    leap["time"] = json!(format!("{leap_day}T23:59:60Z"));
    let locations = [
        good(0),
        with(1, "latitude", "1e400"),
        with(2, "metadata", r#"{"big": 1e400}"#),
        with(3, "metadata", &deep),
        with(4, "metadata", r#"{"a": 1e-16384}"#),
        with(5, "metadata_json", r#""{\"a\": \"\\ud800\"}""#),
        with(6, "altitude", "3.5e38"),
        leap.to_string(),
    ];
    let body = format!(
        "{{\"batch_id\": 3, \"locations\": [{}]}}",
        locations.join(",")
    );
    let (status, _, ack) = post(&server, body.into_bytes(), false).await;
    assert_eq!(status, 200, "{ack}");
    assert_eq!(
        reasons(&ack),
        [
            (1, "point_malformed"),
            (3, "metadata_invalid"),
            (4, "metadata_invalid"),
            (5, "metadata_invalid"),
            (6, "number_not_finite"),
        ],
        "{ack}"
    );
    assert_eq!(ack["accepted"].as_u64(), Some(3), "{ack}");
    let pool = db.pool().await;
    assert_eq!(count_rows(&pool).await, 3);
    // 1e400 is kept as sent (jsonb holds it; an f64 could not).
    let big: String =
        sqlx::query_scalar("SELECT metadata ->> 'big' FROM location_events WHERE metadata ? 'big'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(big, format!("1{}", "0".repeat(400)));
    // The leap second, as the last microsecond of its minute.
    let leap_at: String = sqlx::query_scalar(
        "SELECT to_char(max(time) AT TIME ZONE 'UTC', 'HH24:MI:SS.US') FROM location_events",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(leap_at, "23:59:59.999999");
    server.stop().await;
    db.drop_db().await;
}

/// A gzip body of several members (RFC 1952 allows it; `cat a.gz b.gz`
/// makes one) is read whole, not cut after its first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_gzip_member_is_read() {
    let db = TestDb::new().await;
    let server = TestServer::start(config(&db)).await;
    let d = uuid::Uuid::new_v4();
    let body = serde_json::to_vec(
        &json!({"locations": [point(&d, now_secs() - 9), point(&d, now_secs() - 8)]}),
    )
    .unwrap();
    let (a, b) = body.split_at(body.len() / 2);
    let mut two = gzip(a);
    two.extend(gzip(b));
    let (status, _, ack) = post(&server, two, true).await;
    assert_eq!((status, ack["accepted"].as_u64()), (200, Some(2)), "{ack}");
    server.stop().await;
    db.drop_db().await;
}

/// Bodies decoded at once share `--max-decoding-bytes`: with room for one
/// gzip body at a time, eight sent at once are decoded in turn, each
/// answered, none refused and none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_decoded_at_once_share_the_decoding_budget() {
    let db = TestDb::new().await;
    let mut c = config(&db);
    c.limits.max_message_bytes = 1 << 20;
    c.limits.max_decompressed_bytes = 1 << 20;
    c.limits.max_decoding_bytes = 1 << 20;
    let server = TestServer::start(c).await;
    let sends = (0..8).map(|k| {
        let d = uuid::Uuid::new_v4();
        let body = serde_json::to_vec(&json!({
            "batch_id": k,
            "locations": (0..200).map(|i| point(&d, now_secs() - 300 + i)).collect::<Vec<_>>()
        }))
        .unwrap();
        let server = &server;
        async move { post(server, gzip(&body), true).await }
    });
    for (status, _, ack) in futures::future::join_all(sends).await {
        assert_eq!(
            (status, ack["accepted"].as_u64()),
            (200, Some(200)),
            "{ack}"
        );
    }
    assert_eq!(count_rows(&db.pool().await).await, 1_600);
    server.stop().await;
    db.drop_db().await;
}

/// A coordinate sent as JSON is stored as the very number sent: the JSON
/// parser reads each decimal to the nearest double (without serde_json's
/// `float_roundtrip`, about one in eight came out one unit off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_coordinates_are_stored_exactly_as_sent() {
    let db = TestDb::new().await;
    let server = TestServer::start(config(&db)).await;
    let d = uuid::Uuid::new_v4();
    let t = now_secs() - 3_000;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut unit = move || {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        (x >> 11) as f64 / (1u64 << 53) as f64
    };
    let sent: Vec<(f64, f64)> = (0..2_000)
        .map(|_| (unit() * 179.0 - 89.5, unit() * 359.0 - 179.5))
        .collect();
    let locations: Vec<Value> = sent
        .iter()
        .enumerate()
        .map(|(i, (lat, lon))| {
            let mut p = point(&d, t + i as i64);
            p["latitude"] = json!(lat);
            p["longitude"] = json!(lon);
            p
        })
        .collect();
    let body = json!({"batch_id": 1, "locations": locations});
    let (status, _, ack) = post(&server, serde_json::to_vec(&body).unwrap(), false).await;
    assert_eq!(
        (status, ack["accepted"].as_u64()),
        (200, Some(2_000)),
        "{ack}"
    );
    let pool = db.pool().await;
    let stored: Vec<(f64, f64)> = sqlx::query_as(
        "SELECT latitude, longitude FROM location_events WHERE device_id = $1 ORDER BY time",
    )
    .bind(d)
    .fetch_all(&pool)
    .await
    .unwrap();
    let off = sent
        .iter()
        .zip(&stored)
        .filter(|(a, b)| a.0.to_bits() != b.0.to_bits() || a.1.to_bits() != b.1.to_bits())
        .count();
    assert_eq!((stored.len(), off), (2_000, 0), "points stored not as sent");
    pool.close().await;
    server.stop().await;
    db.drop_db().await;
}
