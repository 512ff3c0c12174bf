//! The database goes away mid-stream and comes back; and SIGTERM with open
//! streams. Nothing acknowledged is lost, nothing is stored twice.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use common::{Device, LocusProcess, TestDb, TestServer, config, count_rows, health, now_secs};
use locus::proto::{LocationBatch, ingest_client::IngestClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

/// A client as the docs tell clients to be: it streams, and after an error
/// reconnects and sends again every batch not acknowledged.
async fn resilient_stream(
    grpc: std::net::SocketAddr,
    batches: Vec<LocationBatch>,
) -> (u32, u32, u32) {
    let (mut accepted, mut duplicates, mut errors) = (0, 0, 0);
    let mut next = 0;
    while next < batches.len() {
        let Ok(mut client) = IngestClient::connect(format!("http://{grpc}")).await else {
            errors += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let (tx, rx) = mpsc::channel(4);
        let unacked = batches[next..].to_vec();
        let sender = tokio::spawn(async move {
            for b in unacked {
                if tx.send(b).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Keep the stream open until the acks are in.
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        match client.stream_locations(ReceiverStream::new(rx)).await {
            Ok(resp) => {
                let mut inbound = resp.into_inner();
                while next < batches.len() {
                    match inbound.message().await {
                        Ok(Some(ack)) => {
                            assert_eq!(ack.batch_id, batches[next].batch_id, "acks come in order");
                            accepted += ack.accepted;
                            duplicates += ack.duplicates;
                            next += 1;
                        }
                        Ok(None) => break,
                        Err(status) => {
                            assert!(
                                matches!(
                                    status.code(),
                                    Code::Unavailable | Code::ResourceExhausted
                                ),
                                "a transient failure is retryable: {status:?}"
                            );
                            errors += 1;
                            break;
                        }
                    }
                }
            }
            Err(_) => errors += 1,
        }
        sender.abort();
        if next < batches.len() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    (accepted, duplicates, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_outage_mid_stream_loses_nothing_and_recovers() {
    let db = TestDb::new().await;
    let mut cfg = config(&db);
    cfg.pipeline.write_retry_deadline = Duration::from_secs(4);
    let server = TestServer::start(cfg).await;
    let devices: Vec<Device> = (0..10).map(|_| Device::new(now_secs() - 3_000)).collect();
    let mut clients = Vec::new();
    for d in &devices {
        let batches: Vec<LocationBatch> = (0..60).map(|b| d.batch(b, b as i64 * 25, 25)).collect();
        clients.push(tokio::spawn(resilient_stream(server.grpc, batches)));
    }

    // Mid-stream: refuse new connections and kill the open ones, for 6 s,
    // longer than the retry deadline, so some batches fail back to clients.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(db.cut_off().await > 0, "the server had connections to kill");
    let down = Instant::now();
    let mut saw_not_serving = false;
    while down.elapsed() < Duration::from_secs(6) {
        saw_not_serving |= health(server.grpc).await == Some(2); // NOT_SERVING
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    db.restore().await;
    assert!(
        saw_not_serving,
        "health turned NOT_SERVING while the database was away"
    );

    let (mut accepted, mut duplicates, mut errors) = (0, 0, 0);
    for c in clients {
        let (a, d, e) = c.await.unwrap();
        accepted += a;
        duplicates += d;
        errors += e;
    }
    assert!(
        errors > 0,
        "the outage reached some clients as a retryable error"
    );
    let pool = db.pool().await;
    // Every batch was acknowledged exactly once, and every point is stored
    // exactly once. A point acknowledged as a duplicate was written by an
    // attempt whose ack the outage cut off.
    assert_eq!(accepted + duplicates, 10 * 60 * 25);
    assert_eq!(count_rows(&pool).await, 10 * 60 * 25);
    let t = Instant::now();
    while health(server.grpc).await != Some(1) {
        assert!(t.elapsed() < Duration::from_secs(10), "health recovers");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop().await;
    db.drop_db().await;
}

/// The real binary, a real SIGTERM: what is buffered is written and
/// acknowledged before the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_and_acknowledges_buffered_batches_before_exit() {
    let db = TestDb::new().await;
    let LocusProcess {
        mut child,
        grpc,
        metrics_port,
    } = LocusProcess::start(
        &db,
        &[
            "--linger",
            "5s",
            "--flush-points",
            "100000",
            "--shutdown-grace",
            "10s",
        ],
    )
    .await;

    let mut streams = Vec::new();
    let mut senders = Vec::new();
    for s in 0..3 {
        let d = Device::new(now_secs() - 1_000);
        let mut client = IngestClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(8);
        for b in 0..5u64 {
            tx.send(d.batch(b, b as i64 * 40 + s, 40)).await.unwrap();
        }
        senders.push(tx); // the stream stays open
        streams.push(
            client
                .stream_locations(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    // The points are buffered, all of them (locus's own gauge says so), and
    // none written: the linger is 5 s.
    let t = Instant::now();
    while buffered(metrics_port).await != Some(15 * 40) {
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "locus buffered the 600 points: {:?}",
            buffered(metrics_port).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count_rows(&db.pool().await).await, 0);

    let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let sent_at = Instant::now();
    let mut acked = HashSet::new();
    for (s, mut stream) in streams.into_iter().enumerate() {
        loop {
            match stream.message().await {
                Ok(Some(ack)) => {
                    assert_eq!(ack.accepted, 40);
                    acked.insert((s, ack.batch_id));
                }
                Ok(None) => break,
                Err(status) => {
                    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                    assert!(status.message().contains("shutting down"), "{status:?}");
                    break;
                }
            }
        }
    }
    assert_eq!(acked.len(), 15, "every buffered batch is acknowledged");
    let exit = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits in time")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(
        sent_at.elapsed() < Duration::from_secs(5),
        "did not wait for the linger"
    );
    assert_eq!(count_rows(&db.pool().await).await, 15 * 40);
    drop(senders);
    db.drop_db().await;
}

/// `locus_buffer_points` from the metrics of the locus on `port`.
async fn buffered(port: u16) -> Option<u64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("locus_buffer_points "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}
