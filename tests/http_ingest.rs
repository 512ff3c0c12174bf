//! `POST /v1/locations`: the same semantics as gRPC, over HTTP JSON, with
//! gzip, and clear statuses for bodies that are bad or too large.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::{io::Write, time::Duration};

use common::{TestDb, TestServer, block_writes, config, conforms, count_rows, get_json, now_secs};
use serde_json::{Value, json};

fn point(device: &uuid::Uuid, t: i64) -> Value {
    json!({
        "time": chrono::DateTime::from_timestamp(t, 500_000_000).unwrap().to_rfc3339(),
        "device_id": device.to_string(),
        "user_id": uuid::Uuid::new_v4().to_string(),
        "app_source": "pshop",
        "latitude": 19.43, "longitude": -99.13, "speed": 12.5,
        "metadata": {"order": 7}
    })
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
    let reasons: Vec<(u64, &str)> = ack["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(
        reasons,
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

    let (status, _, body) = post(&server, b"this is not json".to_vec(), false).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_json"))
    );
    let (status, _, body) = post(&server, vec![b' '; 100 * 1024], false).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );
    // A gzip bomb: 50 MB of zeros in about 50 KB.
    let bomb = gzip(&vec![0u8; 50 * 1024 * 1024]);
    assert!(bomb.len() < 64 * 1024);
    let (status, _, body) = post(&server, bomb, true).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("body_too_large")),
        "{body}"
    );
    let (status, _, body) = post(&server, b"\x1f\x8b garbage".to_vec(), true).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_gzip"))
    );
    let many: Vec<Value> = (0..101).map(|i| point(&d, now_secs() - 200 + i)).collect();
    let (status, _, body) = post(
        &server,
        serde_json::to_vec(&json!({"locations": many})).unwrap(),
        false,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("batch_too_large"))
    );
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
    let (status, _, body) = post(&server, not_json(), false).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("buffer_full"))
    );
    locker.rollback().await.unwrap();
    assert_eq!(first.await.unwrap(), 200);
    let (status, _, body) = post(&server, not_json(), false).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_json"))
    );

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
