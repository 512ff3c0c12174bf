//! The ingest path end to end: real server on port 0, real PostgreSQL, a
//! gRPC client.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::{collections::HashMap, time::Duration};

use bytes::Bytes;
use common::{
    Device, TestDb, TestServer, block_writes, config, count_rows, now_secs,
    raw_calls::{call_encoded, stream_encoded},
    scrape,
};
use locus::{
    ingest::grpc::{STREAM_LOCATIONS, WRITE_LOCATIONS},
    location::{LocationReader, SELECT_COLUMNS, ValidLocation},
    proto::{BatchAck, Location, LocationBatch},
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request};

/// Streams `batches` over one stream; returns the acks received, in order,
/// and the status that ended the stream, if it ended with an error.
async fn stream_all(
    server: &TestServer,
    batches: Vec<LocationBatch>,
) -> (Vec<BatchAck>, Option<tonic::Status>) {
    let mut client = server.client().await;
    let (tx, rx) = mpsc::channel(4);
    let sender = tokio::spawn(async move {
        for b in batches {
            if tx.send(b).await.is_err() {
                break;
            }
        }
    });
    let mut acks = Vec::new();
    let mut status = None;
    match client.stream_locations(ReceiverStream::new(rx)).await {
        Ok(resp) => {
            let mut inbound = resp.into_inner();
            loop {
                match inbound.message().await {
                    Ok(Some(ack)) => acks.push(ack),
                    Ok(None) => break,
                    Err(s) => {
                        status = Some(s);
                        break;
                    }
                }
            }
        }
        Err(s) => status = Some(s),
    }
    sender.abort();
    (acks, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_thousand_points_from_a_hundred_devices_then_all_again_as_duplicates() {
    let db = TestDb::new().await;
    let server = TestServer::start(config(&db)).await;
    let start = now_secs() - 2_000;
    let devices: Vec<Device> = (0..100).map(|_| Device::new(start)).collect();
    let batches_of = |d: &Device| {
        (0..10)
            .map(|b| d.batch(b, b as i64 * 100, 100))
            .collect::<Vec<_>>()
    };

    let mut runs = Vec::new();
    for d in &devices {
        let batches = batches_of(d);
        let s = &server;
        runs.push(async move { stream_all(s, batches).await });
    }
    let results = futures::future::join_all(runs).await;
    let (mut accepted, mut duplicates) = (0, 0);
    for (acks, status) in &results {
        assert!(status.is_none(), "stream ended with {status:?}");
        assert_eq!(
            acks.iter().map(|a| a.batch_id).collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>(),
            "acks in order"
        );
        for a in acks {
            assert!(a.rejected.is_empty(), "{:?}", a.rejected);
            assert_eq!(a.accepted + a.duplicates, 100);
            accepted += a.accepted;
            duplicates += a.duplicates;
        }
    }
    // The acks' split is what the table gained: all new, none duplicate.
    assert_eq!((accepted, duplicates), (100_000, 0));
    let pool = db.pool().await;
    assert_eq!(count_rows(&pool).await, 100_000);
    // What was sent is what is stored: every point, field by field (the
    // unique key makes "stored twice" impossible; stored with other values
    // is not).
    let mut reader = LocationReader::default();
    let stored: HashMap<(uuid::Uuid, i64), ValidLocation> =
        sqlx::query(&format!("SELECT {SELECT_COLUMNS} FROM location_events"))
            .fetch_all(&pool)
            .await
            .unwrap()
            .iter()
            .map(|r| {
                let l = reader.read(r).unwrap();
                ((l.device_id, l.time_us), l)
            })
            .collect();
    assert_eq!(stored.len(), 100_000);
    let as_f32 = |x: Option<f64>| x.map(|x| x as f32);
    let json = |m: Option<&str>| m.map(|m| serde_json::from_str::<serde_json::Value>(m).unwrap());
    for d in &devices {
        for i in 0..1_000 {
            let p = d.point(i);
            let at = (start + i) * 1_000_000 + 250_000;
            let s = &stored[&(d.device_id, at)];
            assert_eq!(
                (
                    s.user_id.to_string(),
                    s.app_source.as_str(),
                    s.latitude,
                    s.longitude,
                    (s.accuracy, s.altitude, s.speed, s.heading),
                    json(s.metadata.as_deref()),
                ),
                (
                    p.user_id.clone(),
                    p.app_source.as_str(),
                    p.latitude,
                    p.longitude,
                    (
                        as_f32(p.accuracy),
                        as_f32(p.altitude),
                        as_f32(p.speed),
                        as_f32(p.heading)
                    ),
                    json((!p.metadata_json.is_empty()).then_some(p.metadata_json.as_str())),
                ),
                "device {} point {i}",
                d.device_id
            );
        }
    }

    // The same batches again, every one, on fresh streams: all duplicates.
    let mut runs = Vec::new();
    for d in &devices {
        let batches = batches_of(d);
        let s = &server;
        runs.push(async move { stream_all(s, batches).await });
    }
    for (acks, status) in futures::future::join_all(runs).await {
        assert!(status.is_none(), "{status:?}");
        assert_eq!(acks.len(), 10);
        assert!(
            acks.iter().all(|a| a.accepted == 0 && a.duplicates == 100),
            "{acks:?}"
        );
    }
    assert_eq!(count_rows(&pool).await, 100_000);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_points_are_rejected_alone_with_their_reason() {
    let db = TestDb::new().await;
    let mut cfg = config(&db);
    cfg.validation.app_sources = vec!["mextrack".into(), "pshop".into()];
    let server = TestServer::start(cfg).await;
    let d = Device::new(now_secs() - 100);
    type Spoil = fn(&mut Location);
    let spoilers: Vec<(&str, Spoil)> = vec![
        ("latitude_out_of_range", |l| l.latitude = 91.0),
        ("longitude_out_of_range", |l| l.longitude = -181.0),
        ("number_not_finite", |l| l.latitude = f64::NAN),
        ("number_not_finite", |l| l.speed = Some(f64::INFINITY)),
        ("null_island", |l| (l.latitude, l.longitude) = (0.0, 0.0)),
        ("device_id_invalid", |l| l.device_id = "truck-12".into()),
        ("user_id_invalid", |l| l.user_id = "42".into()),
        ("app_source_empty", |l| l.app_source.clear()),
        ("app_source_too_long", |l| l.app_source = "m".repeat(51)),
        ("app_source_not_allowed", |l| l.app_source = "other".into()),
        ("accuracy_negative", |l| l.accuracy = Some(-3.0)),
        ("speed_negative", |l| l.speed = Some(-1.0)),
        ("speed_too_high", |l| l.speed = Some(5_000.0)),
        ("heading_out_of_range", |l| l.heading = Some(360.0)),
        ("time_missing", |l| l.time = None),
        ("time_in_future", |l| {
            l.time.as_mut().unwrap().seconds = now_secs() + 3_600
        }),
        ("time_too_old", |l| {
            l.time.as_mut().unwrap().seconds = now_secs() - 31 * 86_400
        }),
        ("metadata_not_object", |l| l.metadata_json = "[1]".into()),
        ("metadata_invalid", |l| l.metadata_json = "{".into()),
        ("metadata_invalid", |l| {
            l.metadata_json = r#"{"k":"\u0000"}"#.into()
        }),
        ("metadata_too_large", |l| {
            l.metadata_json = format!(r#"{{"k":"{}"}}"#, "x".repeat(5_000))
        }),
    ];
    // Good and bad interleaved: even indexes good, odd bad.
    let mut locations = Vec::new();
    let mut want = HashMap::new();
    for (i, (reason, spoil)) in spoilers.iter().enumerate() {
        let mut good = d.point(2 * i as i64);
        if i == 0 {
            // An escaped backslash before `u0000` is text, not U+0000:
            // jsonb takes it, so the validator must too.
            good.metadata_json = r#"{"\\u0000": "\\u0000"}"#.into();
        }
        locations.push(good);
        let mut bad = d.point(2 * i as i64 + 1);
        spoil(&mut bad);
        want.insert(locations.len() as u32, *reason);
        locations.push(bad);
    }
    let total = locations.len();
    let ack = server
        .client()
        .await
        .write_locations(LocationBatch {
            batch_id: 9,
            locations,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.batch_id, 9);
    assert_eq!(ack.accepted as usize, spoilers.len());
    assert_eq!(
        ack.accepted as usize + ack.duplicates as usize + ack.rejected.len(),
        total
    );
    let got: HashMap<u32, &str> = ack
        .rejected
        .iter()
        .map(|r| (r.index, r.reason.as_str()))
        .collect();
    assert_eq!(got, want);
    assert!(ack.rejected.iter().all(|r| !r.message.is_empty()));
    let pool = db.pool().await;
    assert_eq!(count_rows(&pool).await, spoilers.len() as i64);
    // The good points are the ones stored, and no rejected one is: each
    // stored point is at an even offset from the device's start.
    let offsets: Vec<i64> = sqlx::query_scalar(
        "SELECT floor(extract(epoch FROM time))::int8 - $1 FROM location_events ORDER BY time",
    )
    .bind(d.start)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        offsets,
        (0..spoilers.len() as i64)
            .map(|i| 2 * i)
            .collect::<Vec<_>>(),
        "only the good points are stored"
    );
    let escaped: String =
        sqlx::query_scalar("SELECT metadata ->> $1 FROM location_events WHERE metadata ? $1")
            .bind(r"\u0000")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(escaped, r"\u0000");
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_give_clear_statuses() {
    let db = TestDb::new().await;
    let mut cfg = config(&db);
    cfg.limits.max_message_bytes = 128 * 1024;
    cfg.limits.max_batch_points = 500;
    cfg.limits.max_streams = 2;
    let server = TestServer::start(cfg).await;
    let d = Device::new(now_secs() - 5_000);
    let mut client = server.client().await;

    // Over the message size: 1,000 points with metadata are > 128 KiB.
    let mut big = d.batch(1, 0, 1_000);
    big.locations.iter_mut().for_each(|l| {
        l.metadata_json = r#"{"pad": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#.into()
    });
    let err = client.write_locations(big.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("too large"), "{}", err.message());
    let (acks, status) = stream_all(&server, vec![d.batch(0, 2_000, 10), big]).await;
    assert_eq!(
        acks.len(),
        1,
        "the batch before the oversized one is acknowledged"
    );
    assert_eq!(
        status.expect("stream ends with an error").code(),
        Code::OutOfRange
    );

    // Over the points per batch.
    let err = client
        .write_locations(d.batch(2, 3_000, 501))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("limit is 500"), "{}", err.message());

    // Over the number of streams: two held open, the third refused.
    let (_tx1, rx1) = mpsc::channel::<LocationBatch>(1);
    let (_tx2, rx2) = mpsc::channel::<LocationBatch>(1);
    let _s1 = client
        .stream_locations(ReceiverStream::new(rx1))
        .await
        .unwrap();
    let _s2 = client
        .stream_locations(ReceiverStream::new(rx2))
        .await
        .unwrap();
    let (_tx3, rx3) = mpsc::channel::<LocationBatch>(1);
    let err = client
        .stream_locations(ReceiverStream::new(rx3))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.metadata().get("grpc-retry-pushback-ms").is_some());
    drop((_s1, _s2, _tx1, _tx2, _tx3));
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_buffer_refuses_unary_calls_and_holds_streams_until_there_is_room() {
    let db = TestDb::new().await;
    let mut cfg = config(&db);
    cfg.limits.buffer_points = 20;
    cfg.limits.max_batch_points = 20;
    let server = TestServer::start(cfg).await;
    let d = Device::new(now_secs() - 5_000);

    // Block writes: COPY waits for this lock.
    let pool = db.pool().await;
    let locker = block_writes(&pool).await;

    let s = &server;
    let streaming =
        async { stream_all(s, (0..5).map(|b| d.batch(b, b as i64 * 20, 20)).collect()).await };
    let refusal = async {
        // Let the stream fill the buffer (20 points), then call.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut client = s.client().await;
        let err = client
            .write_locations(d.batch(100, 1_000, 5))
            .await
            .unwrap_err();
        // Refused before its points are looked at (what the fault suite's
        // overload case found): even a batch of bad points is refused,
        // not answered with their rejections.
        let mut bad = d.batch(101, 2_000, 3);
        bad.locations.iter_mut().for_each(|l| l.latitude = 500.0);
        let refused = client.write_locations(bad).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        // Nor are they decoded: a batch whose device_id is not UTF-8, which
        // no decoder takes, is refused for the buffer too.
        let refused = write_undecodable(s, &d).await;
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        let unlock = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            locker.rollback().await.unwrap();
        };
        unlock.await;
        err
    };
    let ((acks, status), err) = tokio::join!(streaming, refusal);
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("buffer is full"));
    // The refusal says when to come back, as gRPC clients read it.
    let retry = tonic_types::StatusExt::get_details_retry_info(&err)
        .and_then(|r| r.retry_delay)
        .expect("a full buffer's refusal carries RetryInfo with a delay");
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_secs(5),
        "{retry:?}"
    );
    assert!(status.is_none(), "{status:?}");
    assert_eq!(
        acks.iter().map(|a| a.accepted).sum::<u32>(),
        100,
        "the stream waited, then all went in"
    );
    assert_eq!(count_rows(&pool).await, 100);
    // With room, the same bytes are decoded, and fail as such.
    let err = write_undecodable(&server, &d).await;
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(err.message().contains("invalid string"), "{err:?}");
    server.stop().await;
    db.drop_db().await;
}

/// WriteLocations with a batch that does not decode: its answer.
async fn write_undecodable(server: &TestServer, d: &Device) -> tonic::Status {
    let raw = Request::new(undecodable(d));
    call_encoded::<BatchAck>(server.channel().await, WRITE_LOCATIONS, raw)
        .await
        .unwrap_err()
}

/// A batch of two points whose second's device_id is not UTF-8.
fn undecodable(d: &Device) -> Bytes {
    let mut batch = d.batch(102, 3_000, 2);
    batch.locations[1].device_id = "\u{7f}".repeat(8);
    let mut raw = batch.encode_to_vec();
    let at = raw
        .windows(8)
        .position(|w| w == [0x7f; 8])
        .expect("the device_id's bytes");
    raw[at] = 0xff;
    Bytes::from(raw)
}

/// A batch the database refuses for some of its points' data (a CHECK
/// locus does not know) costs only those points: found by writing the
/// batch in parts, they are answered as refused, the others are stored,
/// and the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_the_database_refuses_are_rejected_alone_and_the_stream_goes_on() {
    let db = TestDb::new().await;
    let server = TestServer::start(config(&db)).await;
    let pool = db.pool().await;
    common::refuse_speeds_of_100_and_more(&pool).await;
    let d = Device::new(now_secs() - 500);
    let mut first = d.batch(0, 0, 10);
    for i in [3, 7] {
        first.locations[i].speed = Some(150.0);
    }
    first.locations[5].latitude = 123.0; // rejected by the validator, as ever
    let (acks, status) = stream_all(&server, vec![first, d.batch(1, 10, 5)]).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(acks.len(), 2);
    let rejected: Vec<(u32, &str)> = acks[0]
        .rejected
        .iter()
        .map(|r| (r.index, r.reason.as_str()))
        .collect();
    assert_eq!(
        rejected,
        [
            (3, "refused_by_database"),
            (5, "latitude_out_of_range"),
            (7, "refused_by_database")
        ]
    );
    assert!(
        acks[0].rejected[0].message.contains("SQLSTATE 23514")
            && !acks[0].rejected[0].message.contains("slow_only"),
        "{}",
        acks[0].rejected[0].message
    );
    // Honest acks: every point sent is counted once.
    assert_eq!(
        acks[0].accepted as usize + acks[0].duplicates as usize + acks[0].rejected.len(),
        10
    );
    assert_eq!((acks[0].accepted, acks[1].accepted), (7, 5));
    assert_eq!(count_rows(&pool).await, 12);
    let metrics = scrape(&server).await;
    assert!(
        metrics.lines().any(|l| l
            .starts_with("locus_points_rejected_total{reason=\"refused_by_database\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    server.stop().await;
    db.drop_db().await;
}

/// A stream's message is counted from its fields' keys before it is
/// decoded: one over --max-batch-points is refused as such, however its
/// points would decode (here one would not: had it been decoded first, the
/// answer would be INTERNAL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_message_is_counted_before_it_is_decoded() {
    let db = TestDb::new().await;
    let mut cfg = config(&db);
    cfg.limits.max_batch_points = 2;
    let server = TestServer::start(cfg).await;
    let d = Device::new(now_secs() - 500);
    let mut raw = undecodable(&d).to_vec();
    // A third, empty location: over the limit of 2.
    raw.extend_from_slice(&[0x12, 0]);
    let resp = stream_encoded::<BatchAck, _>(
        server.channel().await,
        STREAM_LOCATIONS,
        tokio_stream::iter([Bytes::from(raw)]),
    )
    .await;
    let status = match resp {
        Err(s) => s,
        Ok(r) => r.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("limit is 2"), "{status:?}");
    // Within the limit, the same stream decodes its messages as before.
    let resp = stream_encoded::<BatchAck, _>(
        server.channel().await,
        STREAM_LOCATIONS,
        tokio_stream::iter([Bytes::from(d.batch(4, 0, 2).encode_to_vec())]),
    )
    .await
    .unwrap();
    let ack = resp.into_inner().message().await.unwrap().unwrap();
    assert_eq!((ack.batch_id, ack.accepted), (4, 2));
    server.stop().await;
    db.drop_db().await;
}
