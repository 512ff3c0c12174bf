//! Duplicates: within a batch, across batches in flight at once, and across
//! restarts; and the hourly stats after them (a refused submission in a
//! shared batch is in `refused_batch.rs`, alone for its metrics).

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use common::{
    Device, TestDb, TestServer, config, count_rows, hourly_mismatches, now_secs,
    write_duplicates_and_late_points,
};

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
