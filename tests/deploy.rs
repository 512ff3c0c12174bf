//! What ships for operations: docker-compose.yml against the settings locus
//! really reads, the Grafana dashboard against the metrics locus really
//! exports, `/metrics` through promtool, and health that follows the
//! database. (This machine has a docker client but no engine: the compose
//! file is checked, not run.)

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::{collections::BTreeSet, time::Duration, time::Instant};

use clap::CommandFactory;
use common::{Device, TestDb, TestServer, block_writes, config, get_json, now_secs, scrape};
use locus::cli::Cli;
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Value {
    // With its merge keys (`<<: *anchor`) applied, as docker compose reads it.
    let mut y: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    y.apply_merge()
        .unwrap_or_else(|e| panic!("{path}: merge keys: {e}"));
    serde_json::to_value(y).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every environment variable any subcommand of `locus` reads.
fn env_locus_reads() -> BTreeSet<String> {
    let cmd = Cli::command();
    let mut names: BTreeSet<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into())
        .collect();
    for sub in cmd.get_subcommands() {
        names.extend(
            sub.get_arguments()
                .filter_map(|a| a.get_env())
                .map(|e| e.to_string_lossy().into()),
        );
    }
    names.insert("RUST_LOG".into()); // tracing's filter
    names
}

fn seconds(s: &str) -> u64 {
    humantime::parse_duration(s)
        .unwrap_or_else(|e| panic!("{s}: {e}"))
        .as_secs()
}

fn port_of(addr: &str) -> &str {
    addr.rsplit(':').next().unwrap()
}

#[test]
fn compose_file_matches_what_locus_reads() {
    let c = yaml("docker-compose.yml");
    let s = &c["services"];
    for name in ["timescaledb", "locus", "prometheus", "grafana", "fleet"] {
        assert!(s[name].is_object(), "service {name}");
    }
    let image = s["timescaledb"]["image"].as_str().unwrap();
    assert!(
        image.starts_with("timescale/timescaledb:") && image.ends_with("-pg17"),
        "{image}"
    );
    for name in ["timescaledb", "locus", "prometheus", "grafana"] {
        assert!(
            s[name]["healthcheck"]["test"].is_array(),
            "{name} has a healthcheck"
        );
        assert!(
            !s[name]["ports"].as_array().unwrap().is_empty(),
            "{name} publishes a port"
        );
    }
    assert_eq!(
        s["timescaledb"]["volumes"][0]
            .as_str()
            .unwrap()
            .split(':')
            .nth(1),
        Some("/var/lib/postgresql/data")
    );
    let healthy = |svc: &str, on: &str| {
        s[svc]["depends_on"][on]["condition"].as_str() == Some("service_healthy")
    };
    assert!(healthy("locus", "timescaledb"));
    assert!(healthy("grafana", "timescaledb") && healthy("grafana", "prometheus"));
    assert!(healthy("fleet", "locus"));
    assert_eq!(s["fleet"]["profiles"][0], "demo");

    // The cluster profile: three NATS nodes routed to each other, two
    // instances told of all three, reading only what locus reads.
    for n in ["nats-1", "nats-2", "nats-3"] {
        assert_eq!(s[n]["profiles"][0], "cluster", "{n}");
        let args: Vec<&str> = s[n]["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(args.contains(&"--jetstream"), "{n}: {args:?}");
        let routes = args[args.iter().position(|a| *a == "--routes").unwrap() + 1];
        assert_eq!(routes.split(',').count(), 3, "{n}: {routes}");
        assert!(args.contains(&n), "{n} is named");
    }
    for name in ["locus-a", "locus-b"] {
        assert_eq!(s[name]["profiles"][0], "cluster", "{name}");
        let env = s[name]["environment"].as_object().unwrap();
        let known = env_locus_reads();
        assert!(env.keys().all(|k| known.contains(k)), "{name}: {env:?}");
        let nats = env["LOCUS_NATS_URL"].as_str().unwrap();
        for n in ["nats-1", "nats-2", "nats-3"] {
            assert!(nats.contains(&format!("nats://{n}:4222")), "{nats}");
            assert!(healthy(name, n), "{name} waits for {n}");
        }
    }

    let locus = &s["locus"];
    let env = locus["environment"].as_object().unwrap();
    let known = env_locus_reads();
    for key in env.keys() {
        assert!(
            known.contains(key),
            "docker-compose sets {key}, which locus does not read (it reads {known:?})"
        );
    }
    let url = env["DATABASE_URL"].as_str().unwrap();
    assert!(
        url.starts_with("postgres://") && url.contains("@timescaledb:5432/"),
        "{url}"
    );
    let ports: Vec<&str> = locus["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for var in ["LOCUS_GRPC_ADDR", "LOCUS_HTTP_ADDR", "LOCUS_METRICS_ADDR"] {
        let port = port_of(env[var].as_str().unwrap());
        assert!(
            ports.iter().any(|p| p.ends_with(&format!(":{port}"))),
            "{var} port {port} is published"
        );
    }
    assert_eq!(locus["init"], true);
    assert!(
        seconds(locus["stop_grace_period"].as_str().unwrap())
            > seconds(env["LOCUS_SHUTDOWN_GRACE"].as_str().unwrap()),
        "stop_grace_period outlasts the shutdown deadline"
    );
    assert_eq!(
        locus["healthcheck"]["test"],
        serde_json::json!(["CMD", "locus", "health"])
    );
    // The health check asks the gRPC port locus listens on.
    assert_eq!(port_of(env["LOCUS_GRPC_ADDR"].as_str().unwrap()), "50051");

    // Prometheus scrapes locus's metrics port; Grafana gets both data sources.
    let prom = yaml("deploy/prometheus/prometheus.yml");
    let target = prom["scrape_configs"][0]["static_configs"][0]["targets"][0]
        .as_str()
        .unwrap();
    assert_eq!(
        target,
        format!(
            "locus:{}",
            port_of(env["LOCUS_METRICS_ADDR"].as_str().unwrap())
        )
    );
    let ds = yaml("deploy/grafana/provisioning/datasources/datasources.yml");
    let uids: Vec<&str> = ds["datasources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["uid"].as_str().unwrap())
        .collect();
    assert_eq!(uids, ["prometheus", "timescaledb"]);
    let tsdb = &ds["datasources"][1];
    assert_eq!(tsdb["url"], "timescaledb:5432");
    assert_eq!(
        tsdb["jsonData"]["database"].as_str(),
        s["timescaledb"]["environment"]["POSTGRES_DB"].as_str()
    );
    let dash = yaml("deploy/grafana/provisioning/dashboards/dashboards.yml");
    let path = dash["providers"][0]["options"]["path"].as_str().unwrap();
    assert!(
        s["grafana"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v.as_str().unwrap().ends_with(&format!(":{path}:ro"))),
        "the dashboards folder is mounted where the provider looks"
    );
}

fn dashboard() -> Value {
    serde_json::from_str(&read("deploy/grafana/dashboards/locus.json"))
        .expect("the dashboard is valid JSON")
}

/// (metric names in Prometheus expressions, SQL of TimescaleDB panels)
fn dashboard_queries(d: &Value) -> (BTreeSet<String>, Vec<String>) {
    let mut metrics = BTreeSet::new();
    let mut sql = Vec::new();
    for panel in d["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            if let Some(expr) = t["expr"].as_str() {
                let mut rest = expr;
                while let Some(i) = rest.find("locus_") {
                    let name: String = rest[i..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    rest = &rest[i + name.len()..];
                    metrics.insert(name);
                }
            }
            if let Some(q) = t["rawSql"].as_str() {
                sql.push(q.to_string());
            }
        }
    }
    (metrics, sql)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_queries_what_locus_exports_and_metrics_pass_promtool() {
    let d = dashboard();
    let (metrics, sql) = dashboard_queries(&d);
    assert!(metrics.len() >= 12, "{metrics:?}");
    assert_eq!(sql.len(), 2);
    let db = TestDb::new().await;
    // In cluster mode with --ack-after log, so that their panels' metrics
    // are exported too.
    let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let nats =
        std::env::var("LOCUS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let mut c = config(&db);
    c.cluster.nats_urls = vec![nats.clone()];
    c.cluster.nats_stream = format!("LOCUS_TEST_DASH_{tag}");
    c.cluster.nats_subject_prefix = format!("locustest.dash.{tag}");
    c.log.ack_after = locus::config::AckAfter::Log;
    c.log.log_stream = format!("LOCUS_TEST_DASHLOG_{tag}");
    c.log.log_subject_prefix = format!("locustest.dashlog.{tag}");
    c.log.log_max_bytes = 64 * 1024 * 1024;
    c.cluster.nats_max_bytes = 16 * 1024 * 1024;
    let server = TestServer::start(c).await;
    let dev = Device::new(now_secs() - 100);
    let mut batch = dev.batch(1, 0, 10);
    batch.locations[0].latitude = 100.0;
    server.client().await.write_locations(batch).await.unwrap();
    // The points are written from the log a little after the ack.
    let exported = |text: &str| -> BTreeSet<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
            .collect()
    };
    let started = std::time::Instant::now();
    let text = loop {
        let text = scrape(&server).await;
        if metrics.iter().all(|m| exported(&text).contains(m))
            || started.elapsed() > std::time::Duration::from_secs(10)
        {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let exported = exported(&text);
    for m in &metrics {
        assert!(
            exported.contains(m.as_str()),
            "the dashboard queries {m}, which locus does not export"
        );
    }
    if let Ok(client) = async_nats::connect(nats).await {
        let js = async_nats::jetstream::new(client);
        for s in ["DASH", "DASHLOG", "DASHLOG_DEAD"] {
            let name = match s {
                "DASHLOG_DEAD" => format!("LOCUS_TEST_DASHLOG_{tag}_DEAD"),
                s => format!("LOCUS_TEST_{s}_{tag}"),
            };
            let _ = js.delete_stream(name).await;
        }
    }
    // The TimescaleDB panels' SQL runs against locus's schema.
    let pool = db.pool().await;
    for q in sql {
        let q = q.replace("$__timeFilter(hour)", "hour > now() - interval '1 day'");
        sqlx::query(&q)
            .fetch_all(&pool)
            .await
            .unwrap_or_else(|e| panic!("{q}: {e}"));
    }

    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success() && said.trim().is_empty(),
                "promtool check metrics: {said}"
            );
        }
        Err(_) if std::env::var("LOCUS_REQUIRE_PROMTOOL").is_ok() => {
            panic!(
                "promtool is required (LOCUS_REQUIRE_PROMTOOL) but not found; apt-get install prometheus"
            )
        }
        Err(_) => println!(
            "skipped: promtool not found (Debian package prometheus); .ci/test installs it"
        ),
    }
    server.stop().await;
    db.drop_db().await;
}

async fn readyz(server: &TestServer) -> u16 {
    reqwest::get(format!("http://{}/readyz", server.http))
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn until(server: &TestServer, want: u16) {
    let t = Instant::now();
    while readyz(server).await != want {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "/readyz did not become {want}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `locus health` asking gRPC health or, with `--http`, the metrics
/// listener's /readyz.
fn locus_health(server: &TestServer, http: bool) -> (Option<i32>, String) {
    if http {
        common::locus_health(&["--http", &format!("http://{}/readyz", server.metrics)])
    } else {
        common::locus_health(&["--target", &format!("http://{}", server.grpc)])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_database() {
    let db = TestDb::new().await;
    let server = TestServer::start(config(&db)).await;
    assert_eq!(readyz(&server).await, 200);
    for http in [false, true] {
        assert_eq!(locus_health(&server, http), (Some(0), "ready".into()));
    }
    db.cut_off().await;
    until(&server, 503).await;
    for http in [false, true] {
        assert_eq!(locus_health(&server, http), (Some(1), "not ready".into()));
    }
    let (_, body) = get_json(&server, "/readyz").await;
    assert_eq!(body["reason"], "database unreachable");
    let live = reqwest::get(format!("http://{}/healthz", server.http))
        .await
        .unwrap()
        .status();
    assert_eq!(live, 200, "liveness does not depend on the database");
    db.restore().await;
    until(&server, 200).await;
    server.stop().await;
    db.drop_db().await;
}

/// On shutdown, readiness turns false at once, while buffered batches are
/// still being written (the metrics address answers until the end), and the
/// linger is not waited out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_false_at_once_on_shutdown() {
    let db = TestDb::new().await;
    let mut cfg = config(&db);
    cfg.pipeline.linger = Duration::from_secs(30);
    cfg.pipeline.flush_points = 100_000;
    let server = TestServer::start(cfg).await;
    let ready = || async {
        reqwest::get(format!("http://{}/readyz", server.metrics))
            .await
            .unwrap()
    };
    assert_eq!(ready().await.status(), 200);
    // Writes wait for this lock, so shutdown has work to finish.
    let pool = db.pool().await;
    let locker = block_writes(&pool).await;
    let d = Device::new(now_secs() - 100);
    let mut client = server.client().await;
    let call = tokio::spawn(async move { client.write_locations(d.batch(1, 0, 10)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resp = ready().await;
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["reason"],
        "shutting down"
    );
    let started = Instant::now();
    locker.rollback().await.unwrap();
    let ack = call.await.unwrap().unwrap().into_inner();
    assert_eq!(
        ack.accepted, 10,
        "the buffered batch was stored and acknowledged"
    );
    server.task.await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "shutdown did not wait out the 30 s linger"
    );
    db.drop_db().await;
}

/// The README's configuration section names every environment variable
/// that `locus serve` reads, so that a flag added is a flag documented.
#[test]
fn the_readme_documents_every_setting_of_serve() {
    let readme = read("README.md");
    let config = readme
        .split("\n## Configuration\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("README has a Configuration section");
    let cmd = Cli::command();
    let serve = cmd
        .get_subcommands()
        .find(|s| s.get_name() == "serve")
        .expect("locus serve");
    let missing: Vec<String> = serve
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .filter(|env| !config.contains(&format!("`{env}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "not in the README's Configuration section: {missing:?}"
    );
}
