//! Duplicates: within a batch, across batches in flight at once, and across
//! restarts; and one client's refused data never costs another's.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{
    Device, TestDb, TestServer, config, count_rows, hourly_mismatches, now_secs, scrape,
    write_duplicates_and_late_points,
};
use locus::proto::LocationBatch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_sent_twice_in_one_batch_is_stored_once() {
    let db = TestDb::new().await;
    let server = TestServer::start(config(&db)).await;
    let d = Device::new(now_secs() - 500);
    let mut batch = d.batch(1, 0, 10);
    batch.locations.push(d.point(3));
    batch.locations.push(d.point(3));
    let ack = server
        .client()
        .await
        .write_locations(batch)
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ack.accepted, ack.duplicates), (10, 2));
    assert_eq!(count_rows(&db.pool().await).await, 10);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_points_from_many_clients_at_once_are_stored_once() {
    let db = TestDb::new().await;
    let server = TestServer::start(config(&db)).await;
    let d = Device::new(now_secs() - 5_000);
    // Eight clients send overlapping windows of one device's points at once.
    let mut calls = Vec::new();
    for c in 0..8i64 {
        let mut client = server.client().await;
        let batch = d.batch(c as u64, c * 50, 400);
        calls.push(tokio::spawn(async move {
            client.write_locations(batch).await.map(|r| r.into_inner())
        }));
    }
    let mut accepted = 0;
    let mut duplicates = 0;
    for call in calls {
        let ack = call.await.unwrap().unwrap();
        accepted += ack.accepted;
        duplicates += ack.duplicates;
    }
    // Points 0..750 exist once each.
    assert_eq!(accepted, 750);
    assert_eq!(duplicates, 8 * 400 - 750);
    assert_eq!(count_rows(&db.pool().await).await, 750);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_recognised_across_a_restart() {
    let db = TestDb::new().await;
    let d = Device::new(now_secs() - 500);
    let server = TestServer::start(config(&db)).await;
    let ack = server
        .client()
        .await
        .write_locations(d.batch(1, 0, 50))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 50);
    server.stop().await;
    let server = TestServer::start(config(&db)).await;
    let ack = server
        .client()
        .await
        .write_locations(d.batch(1, 25, 50))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ack.accepted, ack.duplicates), (25, 25));
    assert_eq!(count_rows(&db.pool().await).await, 75);
    server.stop().await;
    db.drop_db().await;
}

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

/// `locus_write_errors_total{kind="database",outcome="failed"}`: writes the
/// database refused for good. The recorder is the process's, shared by this
/// file's tests; only the test above makes the database refuse a write.
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

/// Every stored point reaches the hourly stats, whichever way its batch went
/// in: batches with duplicates take the writer's dedup path, which must
/// record the hours it touched for locus's rollup just as plain COPY does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hourly_stats_hold_every_point_of_batches_with_duplicates() {
    let db = TestDb::new().await;
    let server = TestServer::start(config(&db)).await;
    let pool = db.pool().await;
    let stored = write_duplicates_and_late_points(&server).await;
    assert_eq!(count_rows(&pool).await, stored);
    let mut conn = locus::storage::setup::connect(&db.url).await.unwrap();
    locus::storage::maintain::rollup(&mut conn).await.unwrap();
    assert_eq!(hourly_mismatches(&pool).await, Vec::<String>::new());
    server.stop().await;
    db.drop_db().await;
}
