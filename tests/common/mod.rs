//! Shared by the integration tests: a fresh database each, the real server on
//! port 0, and a client.

#![allow(dead_code)]

pub mod pki;
/// The load tests' gRPC calls with messages as bytes, compiled here too:
/// the tests cannot depend on the load tests' crate, which depends on locus.
#[path = "../../load-tests/src/raw_calls.rs"]
pub mod raw_calls;
pub mod tenants;

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use locus::{
    config::ServeConfig,
    proto::{Location, LocationBatch, ingest_client::IngestClient},
    server::{self, Listeners},
};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use uuid::Uuid;

/// The server tests talk to: `DATABASE_URL`, or the local PostgreSQL.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database made for one test, dropped by [`TestDb::drop_db`].
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        Self::on(&admin_url()).await
    }

    /// A fresh database on the server `admin` points at.
    pub async fn on(admin: &str) -> TestDb {
        static N: AtomicU32 = AtomicU32::new(0);
        let mut conn = PgConnection::connect(admin).await.unwrap_or_else(|e| {
            panic!(
                "the integration tests need PostgreSQL: cannot connect to {admin} ({e}). \
                 Start it, or point DATABASE_URL at one (trust or password in the URL)."
            )
        });
        let name = format!(
            "locus_test_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            Uuid::new_v4()
                .simple()
                .to_string()
                .get(..6)
                .unwrap_or_default()
        );
        sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create test database");
        let url = match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("DATABASE_URL {admin} names no database"),
        };
        TestDb {
            name,
            url,
            admin: admin.to_string(),
        }
    }

    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&self.url)
            .await
            .expect("connect to the test database")
    }

    /// The `locus` binary run with `args` against this database
    /// (`DATABASE_URL`), to its end.
    pub fn locus(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_locus"))
            .args(args)
            .env("DATABASE_URL", &self.url)
            .output()
            .unwrap()
    }

    pub async fn drop_db(self) {
        if let Ok(mut conn) = PgConnection::connect(&self.admin).await {
            let _ = sqlx::Executor::execute(
                &mut conn,
                format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str(),
            )
            .await;
        }
    }
}

/// `locus serve`, in this process, on port 0.
pub struct TestServer {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub metrics: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), server::ServeError>>,
    /// How clients reach a server with TLS on.
    pub tls: Option<ClientTlsConfig>,
}

impl TestServer {
    pub async fn start(config: ServeConfig) -> TestServer {
        Self::start_with_tls(config, None).await
    }

    /// A server with TLS on, which clients reach with `tls`.
    pub async fn start_with_tls(config: ServeConfig, tls: Option<ClientTlsConfig>) -> TestServer {
        let server = Self::spawn(config, tls).await;
        server.wait_ready().await;
        server
    }

    /// A server started, without waiting for it to be ready (its ports are
    /// bound: a request waits until it serves).
    pub async fn start_unready(config: ServeConfig) -> TestServer {
        Self::spawn(config, None).await
    }

    async fn spawn(config: ServeConfig, tls: Option<ClientTlsConfig>) -> TestServer {
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        let listeners = Listeners::bind(any, any, any).await.expect("bind port 0");
        let grpc = listeners.grpc.local_addr().expect("local addr");
        let http = listeners.http.local_addr().expect("local addr");
        let metrics = listeners.metrics.local_addr().expect("local addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server::run(config, listeners, shutdown.clone()));
        TestServer {
            grpc,
            http,
            metrics,
            shutdown,
            task,
            tls,
        }
    }

    /// Waits until the gRPC health service says SERVING (after setup, and
    /// once the database answered).
    async fn wait_ready(&self) {
        for _ in 0..400 {
            if let Ok(channel) = self.endpoint().connect().await {
                let status = HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: "locus.v1.Ingest".into(),
                    })
                    .await
                    .map(|r| r.into_inner().status);
                if status.ok() == Some(ServingStatus::Serving as i32) {
                    return;
                }
            }
            assert!(!self.task.is_finished(), "the server stopped during start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the server did not become ready");
    }

    /// The gRPC address, with the client TLS settings if the server has TLS.
    pub fn endpoint(&self) -> Endpoint {
        match &self.tls {
            None => Endpoint::from_shared(format!("http://{}", self.grpc)).expect("uri"),
            Some(tls) => Endpoint::from_shared(format!("https://{}", self.grpc))
                .expect("uri")
                .tls_config(tls.clone())
                .expect("client TLS config"),
        }
    }

    pub async fn channel(&self) -> Channel {
        self.endpoint().connect().await.expect("connect to locus")
    }

    pub async fn client(&self) -> IngestClient<Channel> {
        IngestClient::new(self.channel().await)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("server task")
            .expect("server ran cleanly");
    }
}

/// What gRPC health says of the whole server at `grpc` (`None`: no answer).
pub async fn health(grpc: SocketAddr) -> Option<i32> {
    let channel = Channel::from_shared(format!("http://{grpc}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()
        .map(|r| r.into_inner().status)
}

/// `locus serve` as a process of its own (the real binary: for signals and
/// `kill -9`), on free loopback ports, with `args` after `serve --auth
/// off`; started once gRPC health says SERVING.
pub struct LocusProcess {
    pub child: tokio::process::Child,
    pub grpc: SocketAddr,
    pub metrics_port: u16,
}

impl LocusProcess {
    pub async fn start(db: &TestDb, args: &[&str]) -> LocusProcess {
        let (grpc_port, http_port, metrics_port) = (free_port(), free_port(), free_port());
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_locus"))
            .args(["serve", "--auth", "off"])
            .args(args)
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc_port}")])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
            .env("DATABASE_URL", &db.url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn locus");
        let grpc: SocketAddr = ([127, 0, 0, 1], grpc_port).into();
        let t = std::time::Instant::now();
        while health(grpc).await != Some(1) {
            assert!(t.elapsed() < Duration::from_secs(30), "locus became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        LocusProcess {
            child,
            grpc,
            metrics_port,
        }
    }
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// A device moving north-east, one fix per second ending near now.
pub struct Device {
    pub device_id: Uuid,
    pub user_id: Uuid,
    pub start: i64,
}

impl Device {
    pub fn new(start: i64) -> Self {
        Device {
            device_id: Uuid::new_v4(),
            user_id: Uuid::new_v4(),
            start,
        }
    }

    pub fn point(&self, i: i64) -> Location {
        Location {
            time: Some(prost_types::Timestamp {
                seconds: self.start + i,
                nanos: 250_000_000,
            }),
            device_id: self.device_id.to_string(),
            user_id: self.user_id.to_string(),
            app_source: "mextrack".into(),
            latitude: 19.4 + i as f64 * 1e-5,
            longitude: -99.1 + i as f64 * 1e-5,
            accuracy: Some(5.0),
            altitude: None,
            speed: Some(36.0),
            heading: Some(45.0),
            metadata_json: if i % 10 == 0 {
                r#"{"battery": 0.9}"#.into()
            } else {
                String::new()
            },
        }
    }

    pub fn batch(&self, batch_id: u64, from: i64, n: i64) -> LocationBatch {
        LocationBatch {
            batch_id,
            locations: (from..from + n).map(|i| self.point(i)).collect(),
        }
    }
}

pub async fn count_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM location_events")
        .fetch_one(pool)
        .await
        .expect("count")
}

/// A config for `db` with every default but a short linger, and
/// authentication off (tests/auth.rs turns it on).
pub fn config(db: &TestDb) -> ServeConfig {
    let mut c = ServeConfig::with_database(db.url.clone());
    c.auth.mode = locus::config::AuthMode::Off;
    c.pipeline.linger = Duration::from_millis(10);
    c.shutdown_grace = Duration::from_secs(15);
    c
}

impl TestDb {
    /// The database goes away as locus sees it: new connections are refused
    /// and open ones are killed. Returns how many were killed.
    pub async fn cut_off(&self) -> usize {
        let mut admin = PgConnection::connect(&self.admin)
            .await
            .expect("admin connection");
        sqlx::Executor::execute(
            &mut admin,
            format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", self.name).as_str(),
        )
        .await
        .expect("refuse connections");
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .fetch_all(&mut admin)
        .await
        .expect("terminate backends");
        killed.len()
    }

    /// The database is back.
    pub async fn restore(&self) {
        let mut admin = PgConnection::connect(&self.admin)
            .await
            .expect("admin connection");
        sqlx::Executor::execute(
            &mut admin,
            format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", self.name).as_str(),
        )
        .await
        .expect("allow connections");
    }
}

/// A constraint the validator does not know (`slow_only`): the database
/// refuses points of 100 km/h and more, for good (SQLSTATE 23514).
pub async fn refuse_speeds_of_100_and_more(pool: &PgPool) {
    sqlx::query(
        "ALTER TABLE location_events ADD CONSTRAINT slow_only CHECK (speed IS NULL OR speed < 100)",
    )
    .execute(pool)
    .await
    .expect("add the constraint");
}

/// Holds a lock that makes every write to `location_events` wait, until the
/// returned transaction is rolled back or dropped.
pub async fn block_writes(pool: &PgPool) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE location_events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .expect("lock location_events");
    tx
}

/// Setup options with every default.
pub fn setup_opts() -> locus::storage::setup::SetupOptions {
    locus::storage::setup::SetupOptions {
        storage: locus::config::StorageArgs::default(),
        require_tier: None,
    }
}

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> i64 {
    locus::ingest::unix_micros(SystemTime::now())
}

/// The keys of `body` are the schema's properties, and include its required ones.
pub fn conforms(doc: &serde_json::Value, schema: &str, body: &serde_json::Value) {
    let s = &doc["components"]["schemas"][schema];
    let props = s["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("schema {schema} in {doc}"));
    let body = body.as_object().unwrap();
    for k in body.keys() {
        assert!(props.contains_key(k), "{schema} documents {k}");
    }
    for r in s["required"].as_array().into_iter().flatten() {
        assert!(
            body.contains_key(r.as_str().unwrap()),
            "{schema} requires {r}: {body:?}"
        );
    }
}

/// `GET path` on the server's HTTP port: the status and the JSON body.
pub async fn get_json(server: &TestServer, path: &str) -> (u16, serde_json::Value) {
    let resp = reqwest::get(format!("http://{}{path}", server.http))
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// The metrics endpoint's Prometheus text.
pub async fn scrape(server: &TestServer) -> String {
    let resp = reqwest::get(format!("http://{}/metrics", server.metrics))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap()
}

/// `locus health` (the container's health check) run with `args`, without
/// the environment's `LOCUS_HEALTH_*`: its exit code and output.
pub fn locus_health(args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_locus"))
        .arg("health")
        .args(args)
        .env_remove("LOCUS_HEALTH_HTTP")
        .env_remove("LOCUS_HEALTH_TARGET")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.code(), stdout)
}

/// Writes, through `server`, points that take the writer's dedup path and
/// points late for hours already written: a batch over three hours with one
/// point repeated in it, then a batch that repeats some of those points and
/// adds new ones to the first two hours, then late points of an hour before
/// them, with a repeat. Returns the points the table should hold.
pub async fn write_duplicates_and_late_points(server: &TestServer) -> i64 {
    let hour = (now_secs() - 2 * 86_400) / 3600 * 3600;
    let d = Device::new(hour + 3600);
    let other = Device::new(hour + 3600);
    let mut client = server.client().await;
    let mut send = async |batch: LocationBatch| {
        client
            .write_locations(batch)
            .await
            .expect("written")
            .into_inner()
    };
    let every = |d: &Device, ks: std::ops::Range<i64>, step: i64| {
        ks.map(|k| d.point(k * step)).collect::<Vec<_>>()
    };
    // 0..3 h, every 60 s, one point twice; another device's first hour.
    let mut first = LocationBatch {
        batch_id: 1,
        locations: every(&d, 0..180, 60),
    };
    first.locations.push(d.point(60));
    first.locations.extend(every(&other, 0..60, 60));
    let ack = send(first).await;
    assert_eq!((ack.accepted, ack.duplicates), (240, 1));
    // A resend of 20 of them with 40 new points, 30 s apart, in its first hours.
    let mut second = LocationBatch {
        batch_id: 2,
        locations: every(&d, 100..120, 60),
    };
    second
        .locations
        .extend((0..40).map(|k| d.point(1 + k * 150)));
    let ack = send(second).await;
    assert_eq!((ack.accepted, ack.duplicates), (40, 20));
    // Late: an hour before, with one point twice.
    let late = Device {
        device_id: d.device_id,
        user_id: d.user_id,
        start: hour,
    };
    let mut third = LocationBatch {
        batch_id: 3,
        locations: every(&late, 0..30, 100),
    };
    third.locations.push(late.point(500));
    let ack = send(third).await;
    assert_eq!((ack.accepted, ack.duplicates), (30, 1));
    240 + 40 + 30
}

/// Rows where `location_hourly` and an hourly aggregate of
/// `location_events` differ, in either direction (empty when they agree).
pub async fn hourly_mismatches(pool: &PgPool) -> Vec<String> {
    let of = |table: &str| {
        format!(
            "SELECT {hour} AS hour, device_id, user_id, app_source, {count}::bigint AS n,
                    round(avg_latitude::numeric, 9) AS lat, round(avg_longitude::numeric, 9) AS lon,
                    round(avg_speed::numeric, 6) AS speed, max_speed, first_event, last_event
             FROM {table}",
            hour = if table == "location_hourly" {
                "hour"
            } else {
                "h"
            },
            count = if table == "location_hourly" {
                "point_count"
            } else {
                "n"
            },
        )
    };
    let raw = "(SELECT to_timestamp(floor(extract(epoch FROM time) / 3600) * 3600) AS h, device_id, user_id,
                       app_source, count(*) AS n, avg(latitude) AS avg_latitude,
                       avg(longitude) AS avg_longitude, avg(speed) AS avg_speed, max(speed) AS max_speed,
                       min(time) AS first_event, max(time) AS last_event
                FROM location_events GROUP BY 1, 2, 3, 4) AS raw";
    let (hourly, raw) = (of("location_hourly"), of(raw));
    sqlx::query_scalar(&format!(
        "SELECT 'only in location_hourly: ' || x::text FROM ({hourly} EXCEPT {raw}) AS x
         UNION ALL
         SELECT 'only in the raw points: ' || x::text FROM ({raw} EXCEPT {hourly}) AS x"
    ))
    .fetch_all(pool)
    .await
    .expect("compare location_hourly with the raw points")
}

/// `seconds` since the Unix epoch, as a request's `from` or `to`.
pub fn at(seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos: 0 })
}

/// A port free now, for a `locus` child process to bind.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One point as `POST /v1/locations` takes it: `device`'s in `app`, half a
/// second after `t`, with a speed and metadata, from a user of its own.
pub fn json_point(device: &Uuid, app: &str, t: i64) -> serde_json::Value {
    serde_json::json!({
        "time": chrono::DateTime::from_timestamp(t, 500_000_000).expect("a time").to_rfc3339(),
        "device_id": device.to_string(),
        "user_id": Uuid::new_v4().to_string(),
        "app_source": app,
        "latitude": 19.43, "longitude": -99.13, "speed": 12.5,
        "metadata": {"order": 7}
    })
}
