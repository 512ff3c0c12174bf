//! OwnTracks over MQTT against a real Mosquitto (LOCUS_TEST_MQTT_URL,
//! default mqtt://127.0.0.1:1883; `.ci/test` starts one): messages
//! published as the app publishes them are stored in locus's units,
//! unknown trackers and bad payloads are dropped and counted, and what the
//! broker accepted is stored exactly once through kill -9, a database
//! outage and a broker restart. Each test has topics and a client id of
//! its own.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{LocusProcess, TestDb, TestServer, config, count_rows, now_secs, scrape};
use locus::{config::ServeConfig, ingest::mqtt::Broker, trackers};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

/// The shared broker, reachable, or the test fails saying so.
async fn broker() -> (String, Broker) {
    let url =
        std::env::var("LOCUS_TEST_MQTT_URL").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".into());
    let b = Broker::parse(&url).unwrap();
    if let Err(e) = tokio::net::TcpStream::connect((b.host.as_str(), b.port)).await {
        panic!(
            "the MQTT tests need an MQTT broker (Mosquitto 2): cannot connect to {}:{} ({e}). \
             Start one (apt-get install mosquitto; .ci/test does it), or point \
             LOCUS_TEST_MQTT_URL at one.",
            b.host, b.port
        );
    }
    (url, b)
}

/// A topic prefix and a client id no other test uses.
fn unique(what: &str) -> String {
    format!("{what}-{}", &Uuid::new_v4().simple().to_string()[..10])
}

/// A server config subscribed to `<prefix>/+/+` as `client_id`.
fn mqtt_config(db: &TestDb, url: &str, prefix: &str, client_id: &str) -> ServeConfig {
    let mut c = config(db);
    c.mqtt.mqtt_url = Some(url.to_string());
    c.mqtt.mqtt_client_id = Some(client_id.to_string());
    c.mqtt.mqtt_topics = vec![format!("{prefix}/+/+")];
    c
}

/// Registers `<user>/<device>` under owntracks; returns its device UUID.
async fn register(db: &TestDb, tracker_id: &str, user: Uuid) -> Uuid {
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    trackers::registry::register(&mut conn, "owntracks", tracker_id, user)
        .await
        .unwrap()
        .device_id
}

/// A location as OwnTracks for Android publishes it, at `tst`.
fn location(tst: i64, i: usize) -> Value {
    json!({
        "_type": "location", "tst": tst, "lat": 48.856826 + i as f64 * 1e-5, "lon": 2.292713,
        "vel": 7, "cog": 271, "acc": 13, "alt": 49, "batt": 79, "bs": 2,
        "tid": "jp", "conn": "w", "t": "u", "created_at": tst + 1
    })
}

/// A publisher, MQTT 3.1.1 at QoS 1 as the apps publish, that counts the
/// PUBACKs the broker sends it (what the broker accepted).
struct Publisher {
    client: rumqttc::AsyncClient,
    acked: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    fn new(b: &Broker) -> Publisher {
        let mut o = rumqttc::MqttOptions::new(unique("pub"), b.host.clone(), b.port);
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 2_000);
        let acked = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&acked);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Publisher {
            client,
            acked,
            task,
        }
    }

    async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// Waits until the broker has accepted `n` messages.
    async fn accepted(&self, n: usize) {
        wait_for(
            Duration::from_secs(30),
            "the broker accepted the messages",
            || async { self.acked.load(Ordering::Relaxed) >= n },
        )
        .await;
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Publishes the location of `t0` until the table holds a row: locus's
/// subscription is then in place (a message published before it would be
/// the broker's to drop).
async fn first_stored(publisher: &Publisher, topic: &str, t0: i64, pool: &PgPool) {
    wait_for(
        Duration::from_secs(20),
        "the first location stored",
        || async {
            publisher.publish(topic, location(t0, 0).to_string()).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            count_rows(pool).await > 0
        },
    )
    .await;
}

async fn wait_for<F, Fut>(limit: Duration, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    while !done().await {
        assert!(t.elapsed() < limit, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_rows(pool: &PgPool, n: i64, limit: Duration) {
    let t = Instant::now();
    loop {
        let got = count_rows(pool).await;
        if got >= n {
            assert_eq!(got, n, "no more rows than messages");
            return;
        }
        assert!(
            t.elapsed() < limit,
            "timed out: {got} rows of {n} after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of a series in Prometheus text (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Messages the broker still holds for the session `client_id` (delivered
/// to a client that resumes it, then the session is ended).
async fn left_in_session(b: &Broker, client_id: &str) -> usize {
    use rumqttc::v5::{AsyncClient, Event, MqttOptions, mqttbytes::v5::Packet};
    let mut o = MqttOptions::new(client_id, b.host.clone(), b.port);
    o.set_clean_start(false)
        .set_session_expiry_interval(Some(0));
    let (client, mut eventloop) = AsyncClient::new(o, 10);
    let mut left = 0;
    let mut session_present = None;
    let until = tokio::time::Instant::now() + Duration::from_millis(1_500);
    while let Ok(event) = tokio::time::timeout_at(until, eventloop.poll()).await {
        match event.unwrap() {
            Event::Incoming(Packet::Publish(_)) => left += 1,
            Event::Incoming(Packet::ConnAck(a)) => session_present = Some(a.session_present),
            _ => {}
        }
    }
    assert_eq!(session_present, Some(true), "locus's session was kept");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    left
}

/// A device's stored rows, as JSON.
async fn rows(pool: &PgPool, device: Uuid) -> Vec<Value> {
    sqlx::query_scalar(
        "SELECT json_build_object('time', (extract(epoch FROM time) * 1000000)::int8, 'user_id', user_id,
                'app_source', app_source, 'latitude', latitude, 'longitude', longitude,
                'accuracy', accuracy, 'altitude', altitude, 'speed', speed, 'heading', heading,
                'metadata', metadata)
         FROM location_events WHERE device_id = $1 ORDER BY time",
    )
    .bind(device)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A location is stored in locus's units, with its metadata; a `status`,
/// a bad payload and an unknown tracker's message are acknowledged and not
/// stored, and counted. At shutdown, a point still in the buffer (a long
/// linger) is committed and acknowledged: the session holds nothing after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owntracks_messages_are_stored_and_acknowledged_after_commit() {
    let (url, b) = broker().await;
    let db = TestDb::new().await;
    let (prefix, client_id) = (unique("ot"), unique("locus"));
    let mut c = mqtt_config(&db, &url, &prefix, &client_id);
    c.pipeline.linger = Duration::from_secs(3);
    let server = TestServer::start(c).await;
    let pool = db.pool().await;
    let user = Uuid::new_v4();
    let device = register(&db, "jane/phone", user).await;
    let before = scrape(&server).await;
    let publisher = Publisher::new(&b);
    // Subscribed once the session is up: wait until a message gets through.
    let t0 = now_secs() - 600;
    let topic = format!("{prefix}/jane/phone");
    first_stored(&publisher, &topic, t0, &pool).await;
    let got = rows(&pool, device).await;
    assert_eq!(got.len(), 1, "sent again until stored: kept once");
    let r = &got[0];
    assert_eq!(r["time"], t0 * 1_000_000);
    assert_eq!(r["user_id"], user.to_string());
    assert_eq!(r["app_source"], "owntracks");
    assert_eq!(r["latitude"].as_f64(), Some(48.856826));
    assert_eq!(r["speed"].as_f64(), Some(7.0), "vel is km/h already");
    assert_eq!(r["heading"].as_f64(), Some(271.0));
    assert_eq!(r["accuracy"].as_f64(), Some(13.0));
    assert_eq!(r["altitude"].as_f64(), Some(49.0));
    assert_eq!(
        r["metadata"],
        json!({"battery": 79.0, "charging": true, "bs": 2, "tid": "jp", "conn": "w", "t": "u",
               "created_at": t0 + 1})
    );

    publisher
        .publish(&topic, r#"{"_type":"status","android":{}}"#)
        .await;
    publisher.publish(&topic, "not json").await;
    publisher
        .publish(&topic, location(now_secs() + 86_400, 1).to_string())
        .await;
    let stranger = format!("{prefix}/john/tablet");
    for i in 0..3 {
        publisher
            .publish(&stranger, location(t0 + i, 0).to_string())
            .await;
    }
    // The last one is a point, behind the others: once stored, they were
    // all settled (acknowledgements go in order).
    publisher
        .publish(&topic, location(t0 + 1, 1).to_string())
        .await;
    let n = publisher.acked.load(Ordering::Relaxed);
    publisher.accepted(n).await;
    wait_rows(&pool, 2, Duration::from_secs(20)).await;
    let after = scrape(&server).await;
    let delta = |series: &str| metric(&after, series) - metric(&before, series);
    assert_eq!(
        delta(r#"locus_mqtt_messages_dropped_total{reason="unknown_tracker"}"#),
        3.0
    );
    assert_eq!(
        delta(r#"locus_mqtt_messages_dropped_total{reason="point_malformed"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"locus_mqtt_messages_dropped_total{reason="time_in_future"}"#),
        1.0,
        "{after}"
    );
    assert!(delta("locus_mqtt_messages_ignored_total") >= 1.0);
    assert!(delta("locus_mqtt_messages_stored_total") >= 2.0);

    // One more, stopped while it waits in the buffer (the linger is 3 s).
    publisher
        .publish(&topic, location(t0 + 2, 2).to_string())
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count_rows(&pool).await, 2, "still buffered");
    server.stop().await;
    assert_eq!(count_rows(&pool).await, 3, "committed at shutdown");
    assert_eq!(
        left_in_session(&b, &client_id).await,
        0,
        "every message was acknowledged"
    );
    db.drop_db().await;
}

/// kill -9 while messages are in flight, then the same client id again:
/// every message the broker accepted is stored, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_the_broker_accepted_and_stores_it_once() {
    let (url, b) = broker().await;
    let db = TestDb::new().await;
    let (prefix, client_id) = (unique("ot"), unique("locus"));
    let args = |url: &str| -> Vec<String> {
        [
            "--mqtt-url",
            url,
            "--mqtt-client-id",
            &client_id,
            "--mqtt-topics",
            &format!("{prefix}/+/+"),
            "--linger",
            "50ms",
        ]
        .map(str::to_string)
        .to_vec()
    };
    let a = args(&url);
    let mut locus =
        LocusProcess::start(&db, &a.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let pool = db.pool().await;
    register(&db, "jane/phone", Uuid::new_v4()).await;
    let publisher = Publisher::new(&b);
    let topic = format!("{prefix}/jane/phone");
    // Stored once the subscription is in place.
    let t0 = now_secs() - 3_000;
    first_stored(&publisher, &topic, t0, &pool).await;
    // Mosquitto keeps 1,000 messages queued for an absent session by
    // default (max_queued_messages): fewer than that.
    const N: i64 = 800;
    let sent = publisher.acked.load(Ordering::Relaxed);
    let publishing = {
        let client = publisher.client.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            for i in 1..=N {
                client
                    .publish(
                        &topic,
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        location(t0 + i, i as usize).to_string(),
                    )
                    .await
                    .unwrap();
            }
        })
    };
    let first = count_rows(&pool).await;
    wait_for(Duration::from_secs(30), "some stored", || async {
        count_rows(&pool).await >= first + 20
    })
    .await;
    locus.child.start_kill().unwrap();
    locus.child.wait().await.unwrap();
    let at_kill = count_rows(&pool).await;
    publishing.await.unwrap();
    publisher.accepted(sent + N as usize).await;
    assert!(
        at_kill < N + 1,
        "messages were in flight at the kill ({at_kill} stored)"
    );

    let mut locus =
        LocusProcess::start(&db, &a.iter().map(String::as_str).collect::<Vec<_>>()).await;
    wait_rows(&pool, N + 1, Duration::from_secs(60)).await;
    let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT time) FROM location_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(distinct, N + 1, "each message once");
    let pid = nix::unistd::Pid::from_raw(locus.child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), locus.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(left_in_session(&b, &client_id).await, 0);
    db.drop_db().await;
}

/// The database goes away: messages are held, unacknowledged, and tried
/// again; when it is back they are all stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_held_while_the_database_is_away_then_stored() {
    let (url, b) = broker().await;
    let db = TestDb::new().await;
    let (prefix, client_id) = (unique("ot"), unique("locus"));
    let mut c = mqtt_config(&db, &url, &prefix, &client_id);
    // The writer gives up soon, so that MQTT's own hold and retry is what
    // keeps the messages.
    c.pipeline.write_retry_deadline = Duration::from_secs(1);
    let server = TestServer::start(c).await;
    let pool = db.pool().await;
    register(&db, "jane/phone", Uuid::new_v4()).await;
    let publisher = Publisher::new(&b);
    let topic = format!("{prefix}/jane/phone");
    let t0 = now_secs() - 3_000;
    first_stored(&publisher, &topic, t0, &pool).await;
    let before = metric(&scrape(&server).await, "locus_mqtt_retries_total");
    drop(pool);
    assert!(db.cut_off().await > 0, "locus had connections to kill");
    let sent = publisher.acked.load(Ordering::Relaxed);
    for i in 1..=50 {
        publisher
            .publish(&topic, location(t0 + i, i as usize).to_string())
            .await;
    }
    publisher.accepted(sent + 50).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = metric(&scrape(&server).await, "locus_mqtt_retries_total");
    assert!(
        during > before,
        "held and tried again ({before} -> {during})"
    );
    db.restore().await;
    let pool = db.pool().await;
    wait_rows(&pool, 51, Duration::from_secs(60)).await;
    server.stop().await;
    assert_eq!(left_in_session(&b, &client_id).await, 0);
    db.drop_db().await;
}

/// A Mosquitto of the test's own, persistence on, on a free port.
struct OwnBroker {
    dir: std::path::PathBuf,
    port: u16,
    child: Option<std::process::Child>,
}

impl OwnBroker {
    fn start() -> OwnBroker {
        Self::start_with("allow_anonymous true\n")
    }

    /// With `more` as its configuration's lines after the first
    /// listener's (authentication, more listeners).
    fn start_with(more: &str) -> OwnBroker {
        let dir = std::env::temp_dir().join(unique("locus-mosquitto"));
        std::fs::create_dir_all(&dir).unwrap();
        // Mosquitto started as root writes as its own user.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let port = common::free_port();
        std::fs::write(
            dir.join("mosquitto.conf"),
            format!(
                "listener {port} 127.0.0.1\n{more}persistence true\n\
                 persistence_location {}/\n",
                dir.display()
            ),
        )
        .unwrap();
        let mut b = OwnBroker {
            dir,
            port,
            child: None,
        };
        b.run();
        b
    }

    fn run(&mut self) {
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("this test runs mosquitto of its own: {e}"));
        self.child = Some(child);
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(10), "mosquitto started");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM: Mosquitto saves its sessions and exits.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
    }

    fn broker(&self) -> Broker {
        Broker::parse(&self.url()).unwrap()
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The broker goes away and comes back (its sessions persisted): locus
/// reconnects with backoff, and what was published meanwhile, before locus
/// is back, is delivered to its session and stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locus_reconnects_when_the_broker_comes_back() {
    broker().await; // Mosquitto is installed
    let mut own = OwnBroker::start();
    let db = TestDb::new().await;
    let (prefix, client_id) = (unique("ot"), unique("locus"));
    let server = TestServer::start(mqtt_config(&db, &own.url(), &prefix, &client_id)).await;
    let pool = db.pool().await;
    register(&db, "jane/phone", Uuid::new_v4()).await;
    let topic = format!("{prefix}/jane/phone");
    let t0 = now_secs() - 3_000;
    let publisher = Publisher::new(&own.broker());
    first_stored(&publisher, &topic, t0, &pool).await;
    drop(publisher);
    let errors = metric(&scrape(&server).await, "locus_mqtt_connection_errors_total");
    own.stop();
    wait_for(
        Duration::from_secs(10),
        "locus saw the broker go",
        || async { metric(&scrape(&server).await, "locus_mqtt_connection_errors_total") > errors },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    own.run();
    let publisher = Publisher::new(&own.broker());
    for i in 1..=20 {
        publisher
            .publish(&topic, location(t0 + i, i as usize).to_string())
            .await;
    }
    publisher.accepted(20).await;
    wait_rows(&pool, 21, Duration::from_secs(60)).await;
    server.stop().await;
    assert_eq!(left_in_session(&own.broker(), &client_id).await, 0);
    db.drop_db().await;
}

/// A bad MQTT setting exits at once with a clear error, before any port is
/// bound (the gRPC port is held here: binding it would fail otherwise).
#[tokio::test]
async fn bad_mqtt_settings_are_refused_before_any_port_is_bound() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let grpc = held.local_addr().unwrap().to_string();
    for (args, says) in [
        (
            vec!["--mqtt-url", "tcp://jane:secret@127.0.0.1:1883"],
            "--mqtt-url: the scheme must be mqtt:// or mqtts://",
        ),
        (
            vec!["--mqtt-url", "mqtt://jane:secret@127.0.0.1/owntracks"],
            "--mqtt-url: only mqtt[s]://",
        ),
        (
            vec!["--mqtt-url", "mqtt://127.0.0.1", "--mqtt-inflight", "0"],
            "--mqtt-inflight",
        ),
        (
            vec![
                "--mqtt-url",
                "mqtt://127.0.0.1",
                "--mqtt-share-group",
                "a/b",
            ],
            "--mqtt-share-group",
        ),
        (
            vec![
                "--mqtt-url",
                "mqtt://127.0.0.1",
                "--mqtt-topics",
                "owntracks/#/x",
            ],
            "--mqtt-topics",
        ),
        (
            vec![
                "--mqtt-url",
                "mqtt://jane:secret@127.0.0.1",
                "--mqtt-ca",
                "/etc/hostname",
            ],
            "--mqtt-ca and --mqtt-client-cert are for TLS",
        ),
        (
            vec![
                "--mqtt-url",
                "mqtts://jane:secret@127.0.0.1",
                "--mqtt-ca",
                "/nonexistent/ca.pem",
            ],
            "--mqtt-ca /nonexistent/ca.pem",
        ),
        (
            vec![
                "--mqtt-url",
                "mqtts://jane:secret@127.0.0.1",
                "--mqtt-ca",
                "/etc/hostname",
            ],
            "--mqtt-ca /etc/hostname: no certificate in it",
        ),
    ] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_locus"))
            .args(["serve", "--auth", "off", "--grpc-addr", &grpc])
            .args(&args)
            .env("DATABASE_URL", "postgres://127.0.0.1:1/none")
            .output();
        let out = tokio::time::timeout(Duration::from_secs(20), out)
            .await
            .unwrap()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr.contains("invalid configuration"),
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains("secret"), "{args:?}: {stderr}");
    }
    drop(held);
}

/// Two instances in one shared subscription (`--mqtt-share-group`), each
/// with its own session: every message is stored, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_of_a_share_group_store_every_message_once() {
    let (url, b) = broker().await;
    let db = TestDb::new().await;
    let (prefix, group) = (unique("ot"), unique("group"));
    let mut servers = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let id = unique("locus");
        let mut c = mqtt_config(&db, &url, &prefix, &id);
        c.mqtt.mqtt_share_group = Some(group.clone());
        servers.push(TestServer::start(c).await);
        ids.push(id);
    }
    let pool = db.pool().await;
    register(&db, "jane/phone", Uuid::new_v4()).await;
    let publisher = Publisher::new(&b);
    let topic = format!("{prefix}/jane/phone");
    let t0 = now_secs() - 3_000;
    first_stored(&publisher, &topic, t0, &pool).await;
    let sent = publisher.acked.load(Ordering::Relaxed);
    for i in 1..=60 {
        publisher
            .publish(&topic, location(t0 + i, i as usize).to_string())
            .await;
    }
    publisher.accepted(sent + 60).await;
    wait_rows(&pool, 61, Duration::from_secs(30)).await;
    for s in servers {
        s.stop().await;
    }
    for id in ids {
        assert_eq!(left_in_session(&b, &id).await, 0);
    }
    db.drop_db().await;
}

/// mqtts:// to a broker with a private CA that asks for client
/// certificates: refused while locus does not trust the CA, and while it
/// presents no certificate; with `--mqtt-ca`, `--mqtt-client-cert` and
/// `--mqtt-client-key`, locations are stored. (The apps publish on a plain
/// listener of the same broker.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_a_private_ca_and_a_client_certificate() {
    broker().await; // Mosquitto is installed
    let pki = common::pki::pki();
    let tls_port = common::free_port();
    let own = OwnBroker::start_with(&format!(
        "allow_anonymous true\nlistener {tls_port} 127.0.0.1\nallow_anonymous true\n\
         cafile {dir}/ca.pem\ncertfile {dir}/server.pem\nkeyfile {dir}/server.key\n\
         require_certificate true\n",
        dir = pki.dir.display()
    ));
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "the TLS listener");
        std::thread::sleep(Duration::from_millis(50));
    }
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let prefix = unique("ot");
    let topic = format!("{prefix}/jane/phone");
    let url = format!("mqtts://127.0.0.1:{tls_port}");
    let publisher = Publisher::new(&own.broker());
    let t0 = now_secs() - 600;

    // Refused: the broker's CA unknown; then its certificate trusted but
    // none presented.
    let mut cfg = mqtt_config(&db, &url, &prefix, &unique("locus"));
    for ca in [None, Some(pki.dir.join("ca.pem"))] {
        let first = ca.is_none();
        cfg.mqtt.mqtt_ca = ca;
        let server = TestServer::start(cfg.clone()).await;
        if first {
            // The first start made the schema.
            register(&db, "jane/phone", Uuid::new_v4()).await;
        }
        wait_for(Duration::from_secs(10), "a refusal counted", || async {
            metric(&scrape(&server).await, "locus_mqtt_connection_errors_total") > 0.0
        })
        .await;
        publisher
            .publish(&topic, location(t0 - 1, 0).to_string())
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let text = scrape(&server).await;
        assert_eq!(metric(&text, "locus_mqtt_connected"), 0.0, "{:?}", cfg.mqtt);
        server.stop().await;
        assert_eq!(count_rows(&pool).await, 0, "{:?}", cfg.mqtt);
    }

    cfg.mqtt.mqtt_client_cert = Some(pki.dir.join("client.pem"));
    cfg.mqtt.mqtt_client_key = Some(pki.dir.join("client.key"));
    let server = TestServer::start(cfg).await;
    first_stored(&publisher, &topic, t0, &pool).await;
    assert_eq!(metric(&scrape(&server).await, "locus_mqtt_connected"), 1.0);
    server.stop().await;
    drop(publisher);
    drop(own);
    let _ = std::fs::remove_dir_all(&pki.dir);
    db.drop_db().await;
}

/// The broker's credentials in the URL: refused with a wrong password
/// (nothing stored, the refusal counted), taken with the right one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_credentials_come_from_the_url() {
    broker().await; // Mosquitto is installed
    let dir = std::env::temp_dir().join(unique("locus-mosquitto-passwd"));
    std::fs::create_dir_all(&dir).unwrap();
    let passwd = dir.join("passwd");
    let made = std::process::Command::new("mosquitto_passwd")
        .arg("-c")
        .arg("-b")
        .arg(&passwd)
        .args(["locus", "s3cret:pw"])
        .status()
        .expect("mosquitto_passwd (mosquitto) is installed");
    assert!(made.success());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&passwd, std::fs::Permissions::from_mode(0o644)).unwrap();
    let own = OwnBroker::start_with(&format!(
        "allow_anonymous false\npassword_file {}\n",
        passwd.display()
    ));
    let db = TestDb::new().await;
    let prefix = unique("ot");
    let wrong = format!("mqtt://locus:nope@127.0.0.1:{}", own.port);
    let server = TestServer::start(mqtt_config(&db, &wrong, &prefix, &unique("locus"))).await;
    let errors = metric(&scrape(&server).await, "locus_mqtt_connection_errors_total");
    wait_for(Duration::from_secs(10), "the refusal counted", || async {
        metric(&scrape(&server).await, "locus_mqtt_connection_errors_total") > errors
    })
    .await;
    let pool = db.pool().await;
    register(&db, "jane/phone", Uuid::new_v4()).await;
    let mut o = rumqttc::MqttOptions::new(unique("pub"), "127.0.0.1", own.port);
    o.set_credentials("locus", "s3cret:pw");
    let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 100);
    let polling = tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let topic = format!("{prefix}/jane/phone");
    let t0 = now_secs() - 600;
    for i in 0..5 {
        client
            .publish(
                &topic,
                rumqttc::QoS::AtLeastOnce,
                false,
                location(t0 - 10 - i, 0).to_string(),
            )
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(count_rows(&pool).await, 0, "refused: nothing received");
    server.stop().await;

    // The password percent-encoded, as a URL wants its ':'.
    let right = format!("mqtt://locus:s3cret%3Apw@127.0.0.1:{}", own.port);
    let server = TestServer::start(mqtt_config(&db, &right, &prefix, &unique("locus"))).await;
    wait_for(Duration::from_secs(20), "a location stored", || async {
        client
            .publish(
                &topic,
                rumqttc::QoS::AtLeastOnce,
                false,
                location(t0, 0).to_string(),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        count_rows(&pool).await > 0
    })
    .await;
    polling.abort();
    server.stop().await;
    drop(own);
    let _ = std::fs::remove_dir_all(&dir);
    db.drop_db().await;
}
