//! Connection limits: clients that open connections and never finish a
//! request (or the HTTP/2 preface) cannot take every file descriptor;
//! past a listener's bound new connections are closed at once, the held
//! ones are closed at the handshake or header deadline, and meanwhile
//! readiness answers and a well-behaved client writes and gets its acks.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::{Device, TestDb, TestServer, config, now_secs, scrape};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const HTTP_BOUND: usize = 50;
const GRPC_BOUND: usize = 20;
const HANDSHAKE: Duration = Duration::from_secs(2);
const HEADER: Duration = Duration::from_secs(2);

/// Opens `n` connections to `addr`, each sending `first` and then holding.
async fn hold(addr: std::net::SocketAddr, n: usize, first: &'static [u8]) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        let mut c = TcpStream::connect(addr).await.expect("connect");
        // A refused connection may already be closed: the write may fail.
        let _ = c.write_all(first).await;
        held.push(c);
    }
    held
}

/// How long after `since` each connection was closed by the server (read
/// returned 0 or an error), or `None` if still open after `limit`.
async fn closed_after(held: Vec<TcpStream>, since: Instant, limit: Duration) -> Vec<Option<f64>> {
    let waits = held.into_iter().map(|mut c| async move {
        let mut buf = [0u8; 1024];
        let deadline = tokio::time::Instant::from_std(since) + limit;
        loop {
            match tokio::time::timeout_at(deadline, c.read(&mut buf)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(since.elapsed().as_secs_f64()),
                // A 408 or 400 answer before the close: keep reading.
                Ok(Ok(_)) => continue,
            }
        }
    });
    futures::future::join_all(waits).await
}

#[tokio::test]
async fn held_connections_neither_starve_others_nor_stay_open() {
    let db = TestDb::new().await;
    let mut c = config(&db);
    c.connections.max_connections_http = HTTP_BOUND;
    c.connections.max_connections_grpc = GRPC_BOUND;
    c.connections.handshake_timeout = HANDSHAKE;
    c.connections.header_read_timeout = HEADER;
    let server = TestServer::start(c).await;

    // A device connected before the attack.
    let mut client = server.client().await;
    let device = Device::new(now_secs() - 600);
    let ack = client
        .write_locations(device.batch(1, 0, 10))
        .await
        .expect("write before")
        .into_inner();
    assert_eq!(ack.accepted, 10);

    let started = Instant::now();
    // Hundreds of partial requests on HTTP, many past the bound, and gRPC
    // connections that never send the HTTP/2 preface (some send part of it).
    let http = hold(server.http, 300, b"GET / HTTP/1.1\r\n").await;
    let mut grpc = hold(server.grpc, 50, b"").await;
    grpc.extend(hold(server.grpc, 50, b"PRI * HTTP/2.0\r\n").await);

    // Meanwhile readiness answers, and the device writes and gets acks.
    let ready = reqwest::Client::new()
        .get(format!("http://{}/readyz", server.metrics))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .expect("/readyz on the metrics address answers during the attack");
    assert_eq!(ready.status(), 200);
    for b in 2..5u64 {
        let t = Instant::now();
        let ack = tokio::time::timeout(
            Duration::from_secs(5),
            client.write_locations(device.batch(b, b as i64 * 10, 10)),
        )
        .await
        .expect("an ack within 5 s during the attack")
        .expect("write during the attack")
        .into_inner();
        assert_eq!(ack.accepted, 10);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }

    // Every held connection is closed by the server: those past the bound
    // at once, the others at the handshake or header deadline.
    let limit = HANDSHAKE.max(HEADER) + Duration::from_secs(3);
    let (http_closed, grpc_closed) = tokio::join!(
        closed_after(http, started, Duration::from_secs(20)),
        closed_after(grpc, started, Duration::from_secs(20)),
    );
    for (what, closed) in [("HTTP", &http_closed), ("gRPC", &grpc_closed)] {
        let open = closed.iter().filter(|c| c.is_none()).count();
        let latest = closed.iter().flatten().copied().fold(0.0, f64::max);
        assert_eq!(
            open, 0,
            "{what}: {open} held connections still open after 20 s"
        );
        assert!(
            latest <= limit.as_secs_f64(),
            "{what}: the last held connection was closed after {latest:.1} s (limit {limit:?})"
        );
    }

    // Slots are free again: a new client is served on both addresses.
    let health = reqwest::get(format!("http://{}/healthz", server.http))
        .await
        .expect("HTTP after the attack");
    assert_eq!(health.status(), 200);
    let mut fresh = server.client().await;
    fresh
        .write_locations(device.batch(9, 100, 10))
        .await
        .expect("a new gRPC connection after the attack");

    let text = scrape(&server).await;
    let value = |series: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or(0.0)
    };
    let refused_http =
        value(r#"locus_connections_closed_total{listener="http",reason="too_many_connections"}"#);
    let refused_grpc =
        value(r#"locus_connections_closed_total{listener="grpc",reason="too_many_connections"}"#);
    let late_grpc =
        value(r#"locus_connections_closed_total{listener="grpc",reason="handshake_timeout"}"#);
    assert!(
        refused_http >= 200.0,
        "{refused_http} HTTP connections refused\n{text}"
    );
    assert!(
        refused_grpc >= 50.0,
        "{refused_grpc} gRPC connections refused"
    );
    assert!(late_grpc >= 10.0, "{late_grpc} gRPC connections timed out");
    assert!(
        text.contains(r#"locus_open_connections{listener="grpc"}"#),
        "the open connections gauge is exported"
    );
    drop(client);
    drop(fresh);
    server.stop().await;
    db.drop_db().await;
}

/// A keep-alive HTTP/1 connection with no request in flight is closed
/// after the idle timeout; one that keeps asking is not.
#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let db = TestDb::new().await;
    let mut c = config(&db);
    c.connections.idle_timeout = Duration::from_secs(2);
    c.connections.header_read_timeout = Duration::from_secs(30);
    let server = TestServer::start(c).await;
    let mut conn = TcpStream::connect(server.http).await.unwrap();
    let ask = b"GET /healthz HTTP/1.1\r\nHost: locus\r\n\r\n";
    let mut buf = vec![0u8; 4096];
    for _ in 0..3 {
        conn.write_all(ask).await.unwrap();
        let n = conn.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
        tokio::time::sleep(Duration::from_millis(1_200)).await;
    }
    let idle = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
        .await
        .expect("closed within 10 s")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let took = idle.elapsed();
    assert!(
        took >= Duration::from_millis(700) && took <= Duration::from_secs(4),
        "closed {took:?} after the last answer"
    );
    server.stop().await;
    db.drop_db().await;
}

/// locus refuses to start when its connections, pool and margin do not
/// fit in the open-file limit, with one error naming the flags.
#[test]
fn start_refuses_limits_that_do_not_fit_the_file_limit() {
    // `locus serve` with `limits`, under an open-file limit of 256: its
    // stderr, and the exit code.
    let serve = |limits: &[&str]| {
        let out = std::process::Command::new("prlimit")
            .arg("--nofile=256:256")
            .arg(env!("CARGO_BIN_EXE_locus"))
            .args(["serve", "--database-url", "postgres://127.0.0.1:1/none"])
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(limits)
            .env_remove("LOCUS_MAX_CONNECTIONS_GRPC")
            .output()
            .expect("prlimit (util-linux) runs the locus binary");
        (
            String::from_utf8_lossy(&out.stderr).into_owned(),
            out.status.code(),
        )
    };
    let (stderr, code) = serve(&[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("the open-file limit is 256 (hard limit 256)")
            && stderr.contains("--max-connections-grpc 10000"),
        "{stderr}"
    );

    // Lowered to fit, it gets past the check (and fails later, on the
    // database that is not there).
    let (stderr, _) = serve(&[
        "--max-connections-grpc",
        "100",
        "--max-connections-http",
        "50",
        "--max-connections-metrics",
        "10",
    ]);
    assert!(!stderr.contains("open-file limit"), "{stderr}");
}
