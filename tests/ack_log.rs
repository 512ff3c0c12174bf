//! `--ack-after log` against a real nats-server and PostgreSQL: clients
//! are acknowledged once their points are in the log; writers copy the log
//! into the database; a batch resent within the dedup window is stored in
//! the log once; the database away costs no client an error and no point;
//! rows the database refuses for good go to the dead letters while the
//! rest flow; a full log answers RESOURCE_EXHAUSTED; messages a stopped
//! instance held go to another.
//!
//! The shared server is `LOCUS_TEST_NATS_URL` (default the local one on
//! 4222), each test on streams and subjects of its own. The metrics are
//! one registry for every test of this process, so they are checked in
//! the fault suite's `log-*` cases, where each instance is a process.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::{
    Device, LocusProcess, TestDb, TestServer, config, count_rows, health, now_secs, scrape,
};
use locus::{
    config::{AckAfter, ServeConfig},
    proto::{LocationBatch, ingest_client::IngestClient},
};
use sqlx::PgPool;
use uuid::Uuid;

fn shared_nats() -> String {
    std::env::var("LOCUS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// Names of a test's own streams and subjects.
struct Names {
    tag: String,
}

impl Names {
    fn new() -> Self {
        Self {
            tag: Uuid::new_v4().simple().to_string()[..12].to_string(),
        }
    }

    fn log(&self) -> String {
        format!("LOCUS_TEST_LOG_{}", self.tag)
    }

    fn dead(&self) -> String {
        format!("{}_DEAD", self.log())
    }
}

/// The test's streams are deleted when it ends, failed or not: left on
/// the shared server, they would hold the bytes JetStream sets aside for
/// them until it refuses new streams.
impl Drop for Names {
    fn drop(&mut self) {
        let streams = [
            self.log(),
            self.dead(),
            format!("LOCUS_TEST_VIEW_{}", self.tag),
        ];
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async {
                let js = js().await;
                for s in streams {
                    let _ = js.delete_stream(s).await;
                }
            });
        })
        .join();
    }
}

async fn js() -> jetstream::Context {
    jetstream::new(async_nats::connect(shared_nats()).await.unwrap())
}

/// A config in log mode, on the test's streams.
fn logged(db: &TestDb, names: &Names) -> ServeConfig {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("locus::ingest_log=info,locus::cluster=warn")
        .with_test_writer()
        .try_init();
    let mut c = config(db);
    c.cluster.nats_urls = vec![shared_nats()];
    c.cluster.nats_stream = format!("LOCUS_TEST_VIEW_{}", names.tag);
    c.cluster.nats_subject_prefix = format!("locustest.view.{}", names.tag);
    c.log.ack_after = AckAfter::Log;
    c.log.log_stream = names.log();
    c.log.log_subject_prefix = format!("locustest.log.{}", names.tag);
    c.log.log_ack_wait = Duration::from_secs(3);
    // JetStream sets aside a stream's most bytes on its server.
    c.log.log_max_bytes = 64 * 1024 * 1024;
    c.cluster.nats_max_bytes = 16 * 1024 * 1024;
    c.pipeline.write_retry_deadline = Duration::from_secs(2);
    c
}

async fn wait_rows(pool: &PgPool, want: i64, within: Duration) -> i64 {
    let until = Instant::now() + within;
    loop {
        let n = count_rows(pool).await;
        if n >= want || Instant::now() > until {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stream_messages(name: &str) -> u64 {
    js().await
        .get_stream(name)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

/// Waits until the log holds no message (every one written and acked).
async fn wait_log_empty(names: &Names, within: Duration) -> u64 {
    let until = Instant::now() + within;
    loop {
        let n = stream_messages(&names.log()).await;
        if n == 0 || Instant::now() > until {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Points of many devices in one batch.
fn fleet_batch(devices: &[Device], batch_id: u64, i: i64) -> LocationBatch {
    LocationBatch {
        batch_id,
        locations: devices.iter().map(|d| d.point(i)).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_points_are_written_from_the_log_and_a_resend_is_kept_once() {
    let db = TestDb::new().await;
    let names = Names::new();
    let server = TestServer::start(logged(&db, &names)).await;
    let pool = db.pool().await;
    let devices: Vec<Device> = (0..40).map(|_| Device::new(now_secs() - 100)).collect();
    let mut client = server.client().await;
    let mut sent = 0;
    for i in 0..5 {
        let ack = client
            .write_locations(fleet_batch(&devices, i as u64, i))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((ack.accepted, ack.duplicates), (40, 0), "{ack:?}");
        sent += 40;
    }
    // In the log, partitioned by device: more than one message a batch.
    assert_eq!(wait_rows(&pool, sent, Duration::from_secs(15)).await, sent);
    assert_eq!(wait_log_empty(&names, Duration::from_secs(10)).await, 0);

    // The same batch again (a lost ack): JetStream knows its messages.
    let again = client
        .write_locations(fleet_batch(&devices, 9, 4))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.accepted, again.duplicates), (0, 40), "{again:?}");
    // The same points in another batch are new messages for the log, and
    // duplicates for the database's unique key: stored once still.
    let mixed = LocationBatch {
        batch_id: 10,
        locations: devices.iter().rev().map(|d| d.point(3)).collect(),
    };
    let ack = client.write_locations(mixed).await.unwrap().into_inner();
    // (A partition that holds one device of the 40 makes the same message
    // as before: the log knows it.)
    assert_eq!(ack.accepted + ack.duplicates, 40, "{ack:?}");
    assert!(ack.accepted > 0, "{ack:?}");
    assert_eq!(wait_log_empty(&names, Duration::from_secs(10)).await, 0);
    assert_eq!(count_rows(&pool).await, sent);

    server.stop().await;
    db.drop_db().await;
}

/// The database away for longer than the write retry deadline: every
/// client batch is still acknowledged, and once it is back every point is
/// stored once and the log drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_away_costs_the_clients_nothing() {
    let db = TestDb::new().await;
    let names = Names::new();
    let server = TestServer::start(logged(&db, &names)).await;
    let pool = db.pool().await;
    let d = Device::new(now_secs() - 1_000);
    let mut client = server.client().await;
    client.write_locations(d.batch(0, 0, 10)).await.unwrap();
    assert_eq!(wait_rows(&pool, 10, Duration::from_secs(10)).await, 10);

    db.cut_off().await;
    let started = Instant::now();
    let mut batch = 1;
    // Longer than --write-retry-deadline (2 s here) and --log-ack-wait (3 s).
    while started.elapsed() < Duration::from_secs(8) {
        let ack = client
            .write_locations(d.batch(batch, batch as i64 * 10, 10))
            .await
            .expect("acknowledged while the database is away")
            .into_inner();
        assert_eq!(ack.accepted, 10);
        batch += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(stream_messages(&names.log()).await > 0);
    // Ready all along: the instance takes points; /readyz says where
    // they wait, and only the Query service is NOT_SERVING.
    let (code, body) = common::get_json(&server, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["database"], "unreachable: points wait in the log",
        "{body}"
    );
    assert_eq!(health(server.grpc).await, Some(1));
    db.restore().await;
    let want = batch as i64 * 10;
    assert_eq!(wait_rows(&pool, want, Duration::from_secs(30)).await, want);
    assert_eq!(wait_log_empty(&names, Duration::from_secs(10)).await, 0);
    let distinct: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT (device_id, time)) FROM location_events")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(distinct, want);
    server.stop().await;
    db.drop_db().await;
}

/// A row the database refuses for good goes to the dead letters with the
/// reason; the rows beside it and behind it are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_row_goes_to_the_dead_letters_and_the_rest_flow() {
    let db = TestDb::new().await;
    let names = Names::new();
    let server = TestServer::start(logged(&db, &names)).await;
    let pool = db.pool().await;
    common::refuse_speeds_of_100_and_more(&pool).await;
    let d = Device::new(now_secs() - 500);
    let mut first = d.batch(0, 0, 10);
    first.locations[4].speed = Some(150.0);
    let mut client = server.client().await;
    let ack = client.write_locations(first).await.unwrap().into_inner();
    // The log took it: the database's verdict comes later.
    assert_eq!(ack.accepted, 10);
    client.write_locations(d.batch(1, 10, 10)).await.unwrap();
    assert_eq!(wait_rows(&pool, 19, Duration::from_secs(15)).await, 19);
    assert_eq!(wait_log_empty(&names, Duration::from_secs(10)).await, 0);
    assert_eq!(stream_messages(&names.dead()).await, 1);
    let js = js().await;
    let dead = js
        .get_stream(names.dead())
        .await
        .unwrap()
        .get_raw_message(1)
        .await
        .unwrap();
    let reason = dead
        .headers
        .get("Locus-Reason")
        .map(|v| v.to_string())
        .unwrap_or_default();
    assert!(reason.contains("23514"), "{reason}");
    let row = locus::pipeline::copy_encoder::decode_row(&dead.payload).expect("the row itself");
    assert_eq!(row.speed, Some(150.0));
    // `locus doctor` shows it, with its reason, and asks for attention.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_locus"))
        .args(["doctor", "--json", "--nats-url", &shared_nats()])
        .args(["--log-stream", &names.log()])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let log = &report["log"];
    assert_eq!(log["backlog"]["dead_letters"], 1, "{log}");
    assert_eq!(log["backlog"]["messages"], 0, "{log}");
    assert_eq!(log["dead_letters"][0]["points"], 1, "{log}");
    assert!(
        log["dead_letters"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("23514")),
        "{log}"
    );
    assert!(
        log["attention"][0]
            .as_str()
            .is_some_and(|a| a.contains("1 dead letters")),
        "{log}"
    );
    let metrics = scrape(&server).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("locus_log_dead_lettered_points_total{reason=\"refused\"} 1")),
        "{metrics}"
    );
    server.stop().await;
    db.drop_db().await;
}

/// Past --log-max-bytes the log refuses, and so does locus: with
/// RESOURCE_EXHAUSTED and a retry hint; nothing in the log is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_answers_resource_exhausted() {
    let db = TestDb::new().await;
    let names = Names::new();
    let mut c = logged(&db, &names);
    c.log.log_max_bytes = 1024 * 1024;
    let server = TestServer::start(c).await;
    let pool = db.pool().await;
    db.cut_off().await;
    let devices: Vec<Device> = (0..100).map(|_| Device::new(now_secs() - 3_000)).collect();
    let mut client = server.client().await;
    let mut acked = 0i64;
    let (refused, last) = loop {
        let batch = fleet_batch(&devices, acked as u64, acked / 100);
        match client.write_locations(batch.clone()).await {
            Ok(ack) => acked += i64::from(ack.into_inner().accepted),
            Err(status) => break (status, batch),
        }
        assert!(acked < 100_000, "the log never filled");
    };
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(refused.message().contains("log is full"), "{refused:?}");
    assert!(
        refused.metadata().get("grpc-retry-pushback-ms").is_some(),
        "{refused:?}"
    );
    assert!(acked > 1_000, "{acked} points before the log filled");
    db.restore().await;
    // The refused batch's messages that the log took before it was full
    // are written too; the client sends it again, and each point is
    // stored once.
    let n = wait_rows(&pool, acked, Duration::from_secs(60)).await;
    assert!((acked..acked + 100).contains(&n), "{n} rows, {acked} acked");
    let t = Instant::now();
    loop {
        match client.write_locations(last.clone()).await {
            Ok(_) => break,
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                assert!(t.elapsed() < Duration::from_secs(30), "the log drains");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    }
    let all = acked + 100;
    assert_eq!(wait_rows(&pool, all, Duration::from_secs(30)).await, all);
    assert_eq!(wait_log_empty(&names, Duration::from_secs(10)).await, 0);
    assert_eq!(count_rows(&pool).await, all);
    server.stop().await;
    db.drop_db().await;
}

/// An instance killed with `kill -9` while its writers hold messages they
/// could not write (the database refused connections): another instance's
/// writers take them once the ack wait passed, and each point is stored
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_a_killed_instance_held_go_to_another() {
    let db = TestDb::new().await;
    let names = Names::new();
    let c = logged(&db, &names);
    let LocusProcess {
        mut child, grpc, ..
    } = LocusProcess::start(
        &db,
        &[
            "--ack-after",
            "log",
            "--nats-url",
            &shared_nats(),
            "--nats-stream",
            &c.cluster.nats_stream,
            "--nats-subject-prefix",
            &c.cluster.nats_subject_prefix,
            "--log-stream",
            &c.log.log_stream,
            "--log-subject-prefix",
            &c.log.log_subject_prefix,
            "--log-ack-wait",
            "3s",
            "--log-max-bytes",
            "67108864",
            "--nats-max-bytes",
            "16777216",
        ],
    )
    .await;
    let mut client = IngestClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let pool = db.pool().await;
    db.cut_off().await;
    let d = Device::new(now_secs() - 700);
    for b in 0..5 {
        let ack = client
            .write_locations(d.batch(b, b as i64 * 10, 10))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ack.accepted, 10);
    }
    // Its writers took the messages (the consumer has them pending).
    let js = js().await;
    let t = Instant::now();
    loop {
        let mut consumer: jetstream::consumer::PullConsumer = js
            .get_consumer_from_stream("locus-writers", names.log())
            .await
            .unwrap();
        let info = consumer.info().await.unwrap();
        if info.num_ack_pending == 5 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{info:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    db.restore().await;
    assert_eq!(stream_messages(&names.log()).await, 5);
    let b = TestServer::start(c).await;
    assert_eq!(wait_rows(&pool, 50, Duration::from_secs(20)).await, 50);
    assert_eq!(wait_log_empty(&names, Duration::from_secs(10)).await, 0);
    // A never wrote them (the database refused it connections while it
    // lived): B's writers took them after the ack wait.
    b.stop().await;
    db.drop_db().await;
}

/// A message on a log subject that is no batch of locus's (a publisher
/// with NATS credentials and a bug) goes to the dead letters as
/// unreadable, and the points behind it are stored; HTTP JSON ingest is
/// acknowledged after the log as gRPC is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_message_is_buried_and_http_ingest_goes_through_the_log() {
    let db = TestDb::new().await;
    let names = Names::new();
    let c = logged(&db, &names);
    let prefix = c.log.log_subject_prefix.clone();
    let server = TestServer::start(c).await;
    let pool = db.pool().await;
    let js = js().await;
    js.publish(format!("{prefix}.part.3"), "not rows".into())
        .await
        .unwrap()
        .await
        .unwrap();
    // Rows of locus's format, cut short.
    let mut rows = bytes::BytesMut::new();
    locus::pipeline::copy_encoder::encode_row(
        &mut rows,
        &locus::location::ValidLocation {
            time_us: now_secs() * 1_000_000,
            ..locus::location::ValidLocation::example()
        },
    );
    let mut h = async_nats::HeaderMap::new();
    h.insert("Locus-Format", "pgcopy-rows/1");
    js.publish_with_headers(format!("{prefix}.part.4"), h, rows.freeze().slice(..20))
        .await
        .unwrap()
        .await
        .unwrap();
    let device = Uuid::new_v4();
    let t = now_secs() - 60;
    let body = serde_json::json!({
        "batch_id": 1,
        "locations": (0..5).map(|i| common::json_point(&device, "mextrack", t + i)).collect::<Vec<_>>(),
    });
    let resp = reqwest::Client::new()
        .post(format!("http://{}/v1/locations", server.http))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ack: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(ack["accepted"], 5, "{ack}");
    assert_eq!(wait_rows(&pool, 5, Duration::from_secs(15)).await, 5);
    assert_eq!(wait_log_empty(&names, Duration::from_secs(10)).await, 0);
    assert_eq!(stream_messages(&names.dead()).await, 2);
    let dead = js.get_stream(names.dead()).await.unwrap();
    for seq in [1, 2] {
        let m = dead.get_raw_message(seq).await.unwrap();
        let reason = m.headers.get("Locus-Reason").map(|v| v.to_string());
        assert!(
            reason
                .as_deref()
                .is_some_and(|r| r.starts_with("unreadable: ")),
            "{reason:?}"
        );
    }
    server.stop().await;
    db.drop_db().await;
}

/// A NATS that answers while its JetStream refuses the log's stream (it
/// asks for more bytes than the server may store, as when NATS's disk is
/// small or full): no append can succeed, and the instance says so rather
/// than "ready": `/readyz` 503 naming the stream and JetStream's reason,
/// gRPC health NOT_SERVING, a write `UNAVAILABLE`; the reason names the
/// bytes asked for and the flag that asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_stream_jetstream_refuses_is_not_ready() {
    let db = TestDb::new().await;
    let names = Names::new();
    let mut c = logged(&db, &names);
    // A pebibyte: more than the shared server's JetStream may store.
    c.log.log_max_bytes = 1 << 50;
    let server = TestServer::start_unready(c).await;
    let t = Instant::now();
    let (code, body) = loop {
        let (code, body) = common::get_json(&server, "/readyz").await;
        if body.get("log").is_some() || t.elapsed() > Duration::from_secs(20) {
            break (code, body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["reason"], "log unreachable", "{body}");
    let why = body["log"].as_str().unwrap_or_default();
    assert!(why.contains(&names.log()), "{body}");
    assert!(why.contains("stream not found"), "{body}");
    // Why it is missing, with the flag to change.
    assert!(
        why.contains(&format!("NATS cannot store {} bytes", 1u64 << 50)),
        "{body}"
    );
    assert!(why.contains("lower --log-max-bytes"), "{body}");
    assert_eq!(common::health(server.grpc).await, Some(2), "NOT_SERVING");
    let d = Device::new(now_secs() - 600);
    let mut client = server.client().await;
    let refused = client.write_locations(d.batch(1, 0, 10)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    server.stop().await;
    db.drop_db().await;
}

#[test]
fn log_mode_needs_nats() {
    let mut c = ServeConfig::with_database("postgres://x/y");
    c.log.ack_after = AckAfter::Log;
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("--ack-after log needs --nats-url"), "{e}");
}
