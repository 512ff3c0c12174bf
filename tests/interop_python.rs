//! A client generated from `proto/` in another language (Python, grpcio)
//! streams points and gets them stored and acknowledged. It needs
//! `LOCUS_PYTHON`, a Python with grpcio and grpcio-tools, so it is marked
//! ignored (a plain `cargo test` lists it as such); `.ci/test` makes that
//! Python and runs it. Asked for without it, it fails.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use common::{TestDb, TestServer, config, count_rows};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs LOCUS_PYTHON, a python with grpcio and grpcio-tools; .ci/test makes one and runs it"]
async fn a_python_client_generated_from_the_proto_streams_points() {
    let python = std::env::var("LOCUS_PYTHON").expect(
        "LOCUS_PYTHON is not set: this test needs a python with grpcio and grpcio-tools (it is ignored unless asked for; .ci/test makes one)",
    );
    let root = env!("CARGO_MANIFEST_DIR");
    let stubs = std::env::temp_dir().join(format!("locus-py-{}", std::process::id()));
    std::fs::create_dir_all(&stubs).unwrap();
    let gen_status = std::process::Command::new(&python)
        .args(["-m", "grpc_tools.protoc", &format!("-I{root}/proto")])
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .arg(format!("{root}/proto/locus/v1/locus.proto"))
        .status()
        .expect("run grpc_tools.protoc");
    assert!(gen_status.success(), "stub generation failed");

    let db = TestDb::new().await;
    let server = TestServer::start(config(&db)).await;
    let (device, user) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let out = tokio::process::Command::new(&python)
        .arg(format!("{root}/tests/python/stream_client.py"))
        .arg(&stubs)
        .arg(server.grpc.to_string())
        .arg(device.to_string())
        .arg(user.to_string())
        .output()
        .await
        .expect("run the python client");
    assert!(
        out.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let acks: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON ack per line"))
        .collect();
    assert_eq!(acks.len(), 5);
    assert_eq!(acks[0]["accepted"], 10);
    assert_eq!(acks[1]["accepted"], 9);
    assert_eq!(
        acks[1]["rejected"],
        serde_json::json!([{"index": 4, "reason": "latitude_out_of_range"}])
    );
    assert_eq!(
        (acks[2]["accepted"].clone(), acks[2]["duplicates"].clone()),
        (0.into(), 5.into())
    );
    // The latest position, as protobuf's own Python runtime decodes it.
    let latest = &acks[3]["latest"];
    assert_eq!(latest.as_array().map(Vec::len), Some(1), "{latest}");
    assert_eq!(latest[0]["device_id"], device.to_string());
    assert_eq!(latest[0]["user_id"], user.to_string());
    assert_eq!(latest[0]["nanos"], 500_000_000);
    assert_eq!(latest[0]["metadata"], serde_json::json!({"order": 19}));
    // A track page of 7, likewise: the first seven points, in time order.
    let track = &acks[4]["track"];
    let orders: Vec<&Value> = track
        .as_array()
        .unwrap()
        .iter()
        .map(|l| &l["order"])
        .collect();
    assert_eq!(
        orders,
        (0..7)
            .map(Value::from)
            .collect::<Vec<_>>()
            .iter()
            .collect::<Vec<_>>()
    );
    assert!(
        track
            .as_array()
            .unwrap()
            .windows(2)
            .all(|w| w[0]["seconds"].as_i64() < w[1]["seconds"].as_i64()),
        "{track}"
    );
    assert!(!acks[4]["next_cursor"].as_str().unwrap().is_empty());
    let pool = db.pool().await;
    assert_eq!(count_rows(&pool).await, 19);
    let order: Option<Value> = sqlx::query_scalar(
        "SELECT metadata FROM location_events WHERE device_id = $1 ORDER BY time LIMIT 1",
    )
    .bind(device)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(order, Some(serde_json::json!({"order": 0})));
    server.stop().await;
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(stubs);
}
