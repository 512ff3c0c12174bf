//! Cluster mode against a real nats-server: two instances on one database
//! share their latest positions and live feeds; an instance started late
//! fills from the database and follows from where the stream stood; NATS
//! away costs no acknowledged point, and the views converge when it
//! returns (resuming, or refilling where what was missed is gone).
//!
//! The shared server is `LOCUS_TEST_NATS_URL` (default the local one on
//! 4222), each test on a stream and subjects of its own. Tests that stop a
//! server start their own `nats-server` on a free port.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::{
    collections::HashMap,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{Device, TestDb, TestServer, config, free_port, get_json, now_secs};
use futures::StreamExt;
use locus::{
    config::ServeConfig,
    proto::{GetLatestRequest, Location, SubscribeRequest, query_client::QueryClient},
};
use tokio::{net::TcpListener, sync::watch};
use uuid::Uuid;

fn shared_nats() -> String {
    std::env::var("LOCUS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A config in cluster mode on `nats`, with a stream and subjects of the
/// test's own (`tag`).
fn clustered(db: &TestDb, nats: &str, tag: &str) -> ServeConfig {
    // Shown when a test fails: what each instance said of NATS and its view.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("locus::cluster=info")
        .with_test_writer()
        .try_init();
    let mut c = config(db);
    c.cluster.nats_urls = vec![nats.to_string()];
    c.cluster.nats_stream = format!("LOCUS_TEST_{tag}");
    c.cluster.nats_subject_prefix = format!("locustest.{tag}");
    c
}

fn tag() -> String {
    Uuid::new_v4().simple().to_string()[..12].to_string()
}

async fn delete_stream(nats: &str, tag: &str) {
    if let Ok(client) = async_nats::connect(nats).await {
        let _ = async_nats::jetstream::new(client)
            .delete_stream(format!("LOCUS_TEST_{tag}"))
            .await;
    }
}

/// `device`'s latest position as `server` answers over gRPC.
async fn latest_grpc(server: &TestServer, device: &Device) -> Option<Location> {
    let mut q = QueryClient::new(server.channel().await);
    q.get_latest(GetLatestRequest {
        device_ids: vec![device.device_id.to_string()],
        app_source: "mextrack".into(),
        ..Default::default()
    })
    .await
    .ok()?
    .into_inner()
    .locations()
    .ok()?
    .pop()
}

/// The seconds of `device`'s latest position at `server`, over gRPC.
async fn latest_second(server: &TestServer, device: &Device) -> Option<i64> {
    latest_grpc(server, device)
        .await
        .and_then(|l| l.time)
        .map(|t| t.seconds)
}

/// Waits until `server`'s latest position of `device` is at second
/// `start + i`; fails after `within`.
async fn wait_latest(server: &TestServer, device: &Device, i: i64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = latest_second(server, device).await;
        if got == Some(device.start + i) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "latest of {} is {got:?}, not {} (point {i}) after {within:?}",
            device.device_id,
            device.start + i
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The newest stored second of each device, from the database.
async fn stored_latest(db: &TestDb) -> HashMap<Uuid, i64> {
    let pool = db.pool().await;
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT device_id, extract(epoch FROM max(time))::bigint FROM location_events GROUP BY device_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    rows.into_iter().collect()
}

/// Waits until `server`'s latest map agrees with the database for every
/// device of `devices`.
async fn wait_converged(db: &TestDb, server: &TestServer, devices: &[Device], within: Duration) {
    let stored = stored_latest(db).await;
    let deadline = Instant::now() + within;
    loop {
        let mut wrong = Vec::new();
        for d in devices {
            let got = latest_second(server, d).await;
            let want = stored.get(&d.device_id).copied();
            if got != want {
                wrong.push((d.device_id, got, want));
            }
        }
        if wrong.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} devices differ from the database after {within:?} (view: {}), e.g. {:?}",
            wrong.len(),
            devices.len(),
            cluster_status(server).await.1,
            wrong[0]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A gRPC live feed of `device`'s points at `server`.
async fn live_feed(
    server: &TestServer,
    device: &Device,
) -> tonic::Streaming<locus::query::encoded::EncodedLocations> {
    QueryClient::new(server.channel().await)
        .subscribe(SubscribeRequest {
            app_source: "mextrack".into(),
            device_ids: vec![device.device_id.to_string()],
            bbox: None,
        })
        .await
        .unwrap()
        .into_inner()
}

/// `/readyz`'s cluster part at `server`.
async fn cluster_status(server: &TestServer) -> (u16, serde_json::Value) {
    let (status, body) = get_json(server, "/readyz").await;
    (status, body["cluster"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_written_through_one_instance_reach_the_others_latest_and_live_feeds() {
    let db = TestDb::new().await;
    let (nats, tag) = (shared_nats(), tag());
    let a = TestServer::start(clustered(&db, &nats, &tag)).await;
    let b = TestServer::start(clustered(&db, &nats, &tag)).await;
    let d = Device::new(now_secs() - 600);
    // B's live feeds, over gRPC and Server-Sent Events.
    let mut feed = live_feed(&b, &d).await;
    let sse = reqwest::get(format!(
        "http://{}/v1/live?app_source=mextrack&device_ids={}",
        b.http, d.device_id
    ))
    .await
    .unwrap();
    assert_eq!(sse.status(), 200);
    let mut sse = sse.bytes_stream();

    let mut ingest = a.client().await;
    ingest.write_locations(d.batch(1, 0, 20)).await.unwrap();
    wait_latest(&b, &d, 19, Duration::from_secs(5)).await;
    let (status, http) = get_json(
        &b,
        &format!("/v1/devices/{}/latest?app_source=mextrack", d.device_id),
    )
    .await;
    assert_eq!(status, 200, "{http}");
    let want = chrono::DateTime::from_timestamp(d.start + 19, 250_000_000).unwrap();
    let got: chrono::DateTime<chrono::Utc> = http["time"].as_str().unwrap().parse().unwrap();
    assert_eq!(got, want, "{http}");

    let mut live = Vec::new();
    while live.len() < 20 {
        let update = tokio::time::timeout(Duration::from_secs(5), feed.message())
            .await
            .expect("B's gRPC live feed carries A's points")
            .unwrap()
            .unwrap();
        live.extend(update.locations().unwrap());
    }
    assert!(live.iter().all(|l| l.device_id == d.device_id.to_string()));
    let mut text = String::new();
    while text.matches("event: location").count() < 20 {
        let chunk = tokio::time::timeout(Duration::from_secs(5), sse.next())
            .await
            .expect("B's Server-Sent Events carry A's points")
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }

    // A late point through A reaches B's feed, and B's latest stays put.
    ingest.write_locations(d.batch(2, -30, 1)).await.unwrap();
    let late = tokio::time::timeout(Duration::from_secs(5), feed.message())
        .await
        .expect("the late point is fed")
        .unwrap()
        .unwrap()
        .locations()
        .unwrap();
    assert_eq!(late[0].time.unwrap().seconds, d.start - 30);
    assert_eq!(latest_second(&b, &d).await, Some(d.start + 19));
    // And the other way: B's points reach A.
    b.client()
        .await
        .write_locations(d.batch(3, 20, 5))
        .await
        .unwrap();
    wait_latest(&a, &d, 24, Duration::from_secs(5)).await;
    let (code, cluster) = cluster_status(&b).await;
    assert_eq!(code, 200);
    assert_eq!(cluster["connected"], true, "{cluster}");

    a.stop().await;
    b.stop().await;
    delete_stream(&nats, &tag).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instances_own_points_reach_its_live_feed_once() {
    let db = TestDb::new().await;
    let (nats, tag) = (shared_nats(), tag());
    let a = TestServer::start(clustered(&db, &nats, &tag)).await;
    let b = TestServer::start(clustered(&db, &nats, &tag)).await;
    let d = Device::new(now_secs() - 600);
    let mut feed = live_feed(&a, &d).await;
    a.client()
        .await
        .write_locations(d.batch(1, 0, 20))
        .await
        .unwrap();
    // The batch is in the stream once B has it, and A reads it back from
    // there too: its feed gets nothing more from it.
    wait_latest(&b, &d, 19, Duration::from_secs(5)).await;
    let mut live = Vec::new();
    while let Ok(update) = tokio::time::timeout(Duration::from_secs(2), feed.message()).await {
        live.extend(update.unwrap().unwrap().locations().unwrap());
    }
    assert_eq!(live.len(), 20, "each of A's points once in A's own feed");

    a.stop().await;
    b.stop().await;
    delete_stream(&nats, &tag).await;
    db.drop_db().await;
}

/// Writes through `server`, for `devices` in turn, until `stop`: batches
/// of 5 points, each device moving on. Returns the points acknowledged.
async fn keep_writing(
    server: &TestServer,
    devices: &[Device],
    mut stop: watch::Receiver<bool>,
) -> u64 {
    let mut ingest = server.client().await;
    let mut acked = 0;
    for round in 0.. {
        for d in devices {
            if *stop.borrow_and_update() {
                return acked;
            }
            let r = ingest
                .write_locations(d.batch(round as u64 + 1, round * 5, 5))
                .await
                .unwrap()
                .into_inner();
            acked += u64::from(r.accepted);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_started_during_ingest_serves_every_devices_latest_position() {
    let db = TestDb::new().await;
    let (nats, tag) = (shared_nats(), tag());
    let a = std::sync::Arc::new(TestServer::start(clustered(&db, &nats, &tag)).await);
    let start = now_secs() - 3_000;
    let devices: Vec<Device> = (0..30).map(|_| Device::new(start)).collect();
    let (stop, stopped) = watch::channel(false);
    let writer = {
        let a = std::sync::Arc::clone(&a);
        let devices: Vec<Device> = devices
            .iter()
            .map(|d| Device {
                device_id: d.device_id,
                user_id: d.user_id,
                start: d.start,
            })
            .collect();
        tokio::spawn(async move { keep_writing(&a, &devices, stopped).await })
    };
    // B starts while A commits: points committed during its start are
    // either in its fill or after the stream position it took before.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = TestServer::start(clustered(&db, &nats, &tag)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(true).unwrap();
    let acked = writer.await.unwrap();
    assert!(acked > 0);
    wait_converged(&db, &b, &devices, Duration::from_secs(10)).await;

    b.stop().await;
    std::sync::Arc::into_inner(a).unwrap().stop().await;
    delete_stream(&nats, &tag).await;
    db.drop_db().await;
}

/// A `nats-server` of the test's own, which it may stop and start again
/// with what its JetStream stored.
struct OwnNats {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// More arguments: a cluster node's name, cluster port and routes.
    extra: Vec<String>,
}

impl OwnNats {
    fn start() -> OwnNats {
        Self::start_with(free_port(), Vec::new())
    }

    fn start_with(port: u16, extra: Vec<String>) -> OwnNats {
        let dir = std::env::temp_dir().join(format!("locus-nats-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut n = OwnNats {
            port,
            dir,
            child: None,
            extra,
        };
        n.resume();
        n
    }

    /// Three servers routed to each other, JetStream clustered.
    fn cluster_of_three() -> Vec<OwnNats> {
        // Six ports free at once: none of them handed out twice.
        let held: Vec<std::net::TcpListener> = (0..6)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let ports: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        drop(held);
        let (routes, clients) = ports.split_at(3);
        let route_urls = routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        (0..3)
            .map(|i| {
                let extra = vec![
                    "--name".into(),
                    format!("n{i}"),
                    "--cluster_name".into(),
                    "locustest".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{}", routes[i]),
                    "--routes".into(),
                    route_urls.clone(),
                ];
                OwnNats::start_with(clients[i], extra)
            })
            .collect()
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn resume(&mut self) {
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is installed (.ci/test installs it)");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(Ok(Some(exit))) = self.child.as_mut().map(Child::try_wait) {
                panic!("nats-server on {} exited: {exit}", self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nats-server did not listen on {}", self.port);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_away_costs_no_point_and_the_views_converge_when_it_returns() {
    let db = TestDb::new().await;
    let mut nats = OwnNats::start();
    let tag = tag();
    let mut cfg = clustered(&db, &nats.url(), &tag);
    // Small, so that the outage overflows it: the batches past it are never
    // published, and B must refill from the database when NATS returns.
    cfg.cluster.nats_publish_buffer_bytes = 1024 * 1024;
    let a = TestServer::start(cfg.clone()).await;
    let b = TestServer::start(cfg).await;
    let start = now_secs() - 3_000;
    let early: Vec<Device> = (0..10).map(|_| Device::new(start)).collect();
    let late: Vec<Device> = (0..5).map(|_| Device::new(start)).collect();
    let mut ingest = a.client().await;
    for d in &early {
        ingest.write_locations(d.batch(1, 0, 10)).await.unwrap();
    }
    wait_converged(&db, &b, &early, Duration::from_secs(5)).await;

    nats.stop();
    let away = Instant::now();
    // Ingest goes on, acknowledged after commit; A's buffer overflows
    // (about 2 MiB of rows for a 1 MiB buffer), the last devices' batches
    // are dropped.
    let mut acked = 0u64;
    for (i, d) in early.iter().enumerate() {
        for k in 0..20 {
            let r = ingest
                .write_locations(d.batch(2 + k, 10 + k as i64 * 100, 100))
                .await
                .unwrap()
                .into_inner();
            acked += u64::from(r.accepted);
        }
        if i == 0 {
            let (code, cluster) = cluster_status(&b).await;
            assert_eq!(code, 200, "B still takes points: ready");
            let _ = cluster;
        }
    }
    for d in &late {
        acked += u64::from(
            ingest
                .write_locations(d.batch(1, 0, 3))
                .await
                .unwrap()
                .into_inner()
                .accepted,
        );
    }
    assert_eq!(acked, 10 * 20 * 100 + 5 * 3);
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(away.elapsed())).await;
    let (code, cluster) = cluster_status(&b).await;
    assert_eq!(code, 200, "B still takes points: ready");
    assert_eq!(cluster["connected"], false, "{cluster}");
    let stale_for = cluster["lag_seconds"].as_f64().unwrap();
    assert!(
        stale_for >= 2.0,
        "the lag rises while NATS is away: {cluster}"
    );

    nats.resume();
    let mut all = early;
    all.extend(late);
    // The late devices' points were only in dropped batches: B has them
    // from its refill, told by A's resync message.
    wait_converged(&db, &b, &all, Duration::from_secs(20)).await;
    wait_converged(&db, &a, &all, Duration::from_secs(5)).await;
    let pool = db.pool().await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM location_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        stored,
        100 + acked as i64,
        "every acknowledged point is stored"
    );
    pool.close().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, cluster) = cluster_status(&b).await;
        if cluster["connected"] == true && cluster["lag_seconds"].as_f64() == Some(0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "the lag falls back: {cluster}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    a.stop().await;
    b.stop().await;
    db.drop_db().await;
}

/// A resync message tried again and again while NATS is away (each try
/// waits for an ack that cannot come, and the client still sends it when
/// it reconnects) is stored once: the other instances refill once, not
/// once per try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_tried_while_nats_is_away_is_stored_once() {
    let db = TestDb::new().await;
    let mut nats = OwnNats::start();
    let tag = tag();
    let mut cfg = clustered(&db, &nats.url(), &tag);
    cfg.cluster.nats_publish_buffer_bytes = 1024 * 1024;
    let a = TestServer::start(cfg.clone()).await;
    let start = now_secs() - 3_000;
    let devices: Vec<Device> = (0..10).map(|_| Device::new(start)).collect();
    let mut ingest = a.client().await;
    nats.stop();
    // About 2 MiB of rows against a 1 MiB buffer: the last batches are
    // dropped, and a resync is due.
    for d in &devices {
        for k in 0..20 {
            ingest
                .write_locations(d.batch(1 + k, k as i64 * 100, 100))
                .await
                .unwrap();
        }
    }
    // A try waits 5 s for its ack: two or three tries while NATS is away.
    tokio::time::sleep(Duration::from_secs(12)).await;
    nats.resume();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let resyncs = async || {
        let stream = js.get_stream(&cfg.cluster.nats_stream).await.ok()?;
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::Config {
                filter_subject: locus::cluster::wire::resync_subject(
                    &cfg.cluster.nats_subject_prefix,
                ),
                ..Default::default()
            })
            .await
            .ok()?;
        let pending = consumer.cached_info().num_pending;
        Some(pending)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while resyncs().await.unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "no resync message in 20 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every try the client kept arrives at once, when it reconnects.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(resyncs().await, Some(1), "resync messages in the stream");

    a.stop().await;
    drop(nats);
    db.drop_db().await;
}

/// A TCP proxy the test can cut: while cut, it closes what it carries and
/// refuses what comes.
struct Proxy {
    port: u16,
    open: watch::Sender<bool>,
}

impl Proxy {
    async fn to(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (open, is_open) = watch::channel(true);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !*is_open.borrow() {
                    continue;
                }
                let mut is_open = is_open.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = is_open.wait_for(|o| !*o) => {}
                    }
                });
            }
        });
        Proxy { port, open }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_missed_what_the_stream_dropped_refills_from_the_database() {
    let db = TestDb::new().await;
    let nats = OwnNats::start();
    let proxy = Proxy::to(nats.port).await;
    let tag = tag();
    let mut cfg = clustered(&db, &nats.url(), &tag);
    // The stream keeps 1 MiB: what B misses while cut off is gone by the
    // time it returns.
    cfg.cluster.nats_max_bytes = 1024 * 1024;
    let a = TestServer::start(cfg.clone()).await;
    cfg.cluster.nats_urls = vec![proxy.url()];
    let b = TestServer::start(cfg).await;
    let start = now_secs() - 3_000;
    let devices: Vec<Device> = (0..10).map(|_| Device::new(start)).collect();
    let mut ingest = a.client().await;
    for d in &devices {
        ingest.write_locations(d.batch(1, 0, 5)).await.unwrap();
    }
    wait_converged(&db, &b, &devices, Duration::from_secs(5)).await;

    proxy.set_open(false);
    // Each device moves on once; then other devices write about 1.5 MiB,
    // which pushes those batches out of the stream before B returns.
    for d in &devices {
        ingest.write_locations(d.batch(2, 100, 10)).await.unwrap();
    }
    let others: Vec<Device> = (0..3).map(|_| Device::new(start)).collect();
    for k in 0..40 {
        for d in &others {
            ingest
                .write_locations(d.batch(1 + k, k as i64 * 100, 100))
                .await
                .unwrap();
        }
    }
    // B has the moves from its refill only.
    proxy.set_open(true);
    let mut all = devices;
    all.extend(others);
    wait_converged(&db, &b, &all, Duration::from_secs(20)).await;

    a.stop().await;
    b.stop().await;
    drop(nats);
    db.drop_db().await;
}

/// On a NATS cluster of three, the stream keeps three copies by itself, and
/// the instances go on sharing their view with one server down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_three_nats_servers_the_stream_keeps_three_copies_and_outlives_one() {
    let db = TestDb::new().await;
    let mut servers = OwnNats::cluster_of_three();
    let urls: Vec<String> = servers.iter().map(OwnNats::url).collect();
    // JetStream elects its leaders once the routes are up.
    let addrs: Vec<async_nats::ServerAddr> = urls.iter().map(|u| u.parse().unwrap()).collect();
    let client = async_nats::connect(addrs).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + Duration::from_secs(30);
    // JetStream answers (that there is no such stream) once it has a leader.
    loop {
        let answer = js.get_stream("LOCUS_NO_SUCH_STREAM").await;
        let err = answer.expect_err("no such stream");
        if matches!(
            err.kind(),
            async_nats::jetstream::context::GetStreamErrorKind::JetStream(_)
        ) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "JetStream cluster did not form: {err}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let tag = tag();
    let mut cfg = clustered(&db, &urls[0], &tag);
    cfg.cluster.nats_urls = urls.clone();
    let a = TestServer::start(cfg.clone()).await;
    cfg.cluster.nats_urls = vec![urls[1].clone(), urls[2].clone()];
    let b = TestServer::start(cfg).await;
    let mut stream = js.get_stream(format!("LOCUS_TEST_{tag}")).await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert_eq!(config.num_replicas, 3);
    // Rows are read by direct get, which any of the three may answer.
    assert!(config.allow_direct);

    let d = Device::new(now_secs() - 600);
    let mut ingest = a.client().await;
    ingest.write_locations(d.batch(1, 0, 10)).await.unwrap();
    wait_latest(&b, &d, 9, Duration::from_secs(10)).await;
    // One server down: the stream still has a majority of copies.
    servers[2].stop();
    ingest.write_locations(d.batch(2, 10, 10)).await.unwrap();
    wait_latest(&b, &d, 19, Duration::from_secs(20)).await;

    a.stop().await;
    b.stop().await;
    drop(servers);
    db.drop_db().await;
}

/// A stream made before followers read rows by direct get (an older
/// locus made it without `allow_direct`) is brought to allow them, and
/// what one instance commits then reaches the other through it; its
/// messages were kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_made_without_direct_gets_is_brought_to_allow_them() {
    let db = TestDb::new().await;
    let (nats, tag) = (shared_nats(), tag());
    let cfg = clustered(&db, &nats, &tag);
    let js = async_nats::jetstream::new(async_nats::connect(&nats).await.unwrap());
    let mut old = locus::cluster::stream::config(&cfg.cluster, 1);
    old.allow_direct = false;
    js.create_stream(old).await.unwrap();
    js.publish(format!("locustest.{tag}.control.note"), "kept".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let a = TestServer::start(cfg.clone()).await;
    let b = TestServer::start(cfg).await;
    let mut stream = js.get_stream(format!("LOCUS_TEST_{tag}")).await.unwrap();
    let info = stream.info().await.unwrap();
    assert!(info.config.allow_direct, "{:?}", info.config);
    assert!(info.state.messages >= 1, "{:?}", info.state);
    let d = Device::new(now_secs() - 600);
    let mut ingest = a.client().await;
    ingest.write_locations(d.batch(1, 0, 10)).await.unwrap();
    wait_latest(&b, &d, 9, Duration::from_secs(10)).await;

    a.stop().await;
    b.stop().await;
    delete_stream(&nats, &tag).await;
    db.drop_db().await;
}

/// Credentials in the URL are used: a server that requires them is
/// followed with them, and not without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_nats_url_are_used() {
    let db = TestDb::new().await;
    let extra = ["--user", "locus", "--pass", "s3cret"]
        .map(String::from)
        .to_vec();
    let nats = OwnNats::start_with(free_port(), extra);
    let tag = tag();
    let with = format!("nats://locus:s3cret@127.0.0.1:{}", nats.port);
    let a = TestServer::start(clustered(&db, &with, &tag)).await;
    let b = TestServer::start(clustered(&db, &nats.url(), &tag)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, cluster) = cluster_status(&a).await;
        if cluster["connected"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not connected with credentials: {cluster}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, cluster) = cluster_status(&b).await;
    assert_eq!(code, 200, "ingest does not need NATS");
    assert_eq!(cluster["connected"], false, "{cluster}");
    a.stop().await;
    b.stop().await;
    drop(nats);
    db.drop_db().await;
}
