//! A submission the database refuses, in a batch with others. Alone in its
//! file, so that its test binary's metrics recorder (one a process) counts
//! this test's batches and no other's.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{Device, TestDb, TestServer, config, count_rows, now_secs, scrape};
use locus::proto::LocationBatch;

/// A submission the database refuses for good fails alone: the others
/// flushed in the same batch are stored and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_submission_does_not_fail_its_batch_neighbours() {
    let db = TestDb::new().await;
    let mut cfg = config(&db);
    cfg.pipeline.linger = Duration::from_secs(1); // so that the calls share a batch
    let server = TestServer::start(cfg).await;
    let failed_before = batches_refused(&server).await;
    let flushed_before = batches_flushed(&server).await;
    // A rule the validator does not know: the database refuses pshop rows.
    let pool = db.pool().await;
    sqlx::query(
        "ALTER TABLE location_events ADD CONSTRAINT no_pshop CHECK (app_source <> 'pshop')",
    )
    .execute(&pool)
    .await
    .unwrap();
    // Every client connected first, so that the four calls leave together.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(server.client().await);
    }
    let mut calls = Vec::new();
    for (c, mut client) in (0..4u64).zip(clients) {
        let d = Device::new(now_secs() - 500);
        let mut batch: LocationBatch = d.batch(c, 0, 20);
        if c == 2 {
            batch
                .locations
                .iter_mut()
                .for_each(|l| l.app_source = "pshop".into());
        }
        calls.push(tokio::spawn(
            async move { client.write_locations(batch).await },
        ));
    }
    let mut stored = 0;
    for (c, call) in calls.into_iter().enumerate() {
        let ack = call.await.unwrap().unwrap().into_inner();
        if c == 2 {
            // Refused row by row (a CHECK is about each row's data): each
            // point is answered as refused, none is lost in silence.
            assert_eq!((ack.accepted, ack.rejected.len()), (0, 20), "{ack:?}");
            for (i, r) in ack.rejected.iter().enumerate() {
                assert_eq!(
                    (r.index, r.reason.as_str()),
                    (i as u32, "refused_by_database")
                );
                assert!(r.message.contains("SQLSTATE 23514"), "{}", r.message);
                assert!(
                    !r.message.contains("no_pshop"),
                    "database details stay in the log"
                );
            }
        } else {
            assert!(ack.rejected.is_empty(), "{ack:?}");
            stored += ack.accepted;
        }
    }
    assert_eq!(stored, 60);
    assert_eq!(count_rows(&pool).await, 60);
    // The refused submission did share its batch: that batch was refused
    // once, and its neighbours were then written apart, never flushed as a
    // batch of their own. Had the refused one been alone in its batch, the
    // others would have been flushed normally, and the test proved nothing.
    assert_eq!(batches_refused(&server).await - failed_before, 1);
    assert_eq!(
        batches_flushed(&server).await - flushed_before,
        0,
        "the refused submission was written in a batch with its neighbours"
    );
    server.stop().await;
    db.drop_db().await;
}

/// Batches written as such (either path), from /metrics.
async fn batches_flushed(server: &TestServer) -> u64 {
    scrape(server)
        .await
        .lines()
        .filter(|l| l.starts_with("locus_batches_flushed_total{"))
        .filter_map(|l| l.rsplit(' ').next())
        .map(|v| v.parse::<f64>().unwrap() as u64)
        .sum()
}

/// `locus_write_errors_total{kind="database",outcome="failed"}`: writes the
/// database refused for good.
async fn batches_refused(server: &TestServer) -> u64 {
    scrape(server)
        .await
        .lines()
        .find(|l| {
            l.starts_with("locus_write_errors_total{")
                && l.contains(r#"kind="database""#)
                && l.contains(r#"outcome="failed""#)
        })
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |v| v.parse::<f64>().unwrap() as u64)
}
