//! The Query service against the real server: latest, track pagination,
//! hourly stats, live feed, and bad parameters.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::{collections::HashSet, time::Duration};

use common::{Device, TestDb, TestServer, config, now_secs, scrape};
use locus::{
    proto::{
        GetHourlyStatsRequest, GetLatestRequest, GetTrackRequest, SubscribeRequest,
        get_hourly_stats_request::Key, query_client::QueryClient,
    },
    storage::{maintain, setup},
};
use prost_types::Timestamp;
use tonic::{Code, transport::Channel};

async fn query_client(server: &TestServer) -> QueryClient<Channel> {
    QueryClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap()
}

fn at(seconds: i64) -> Option<Timestamp> {
    Some(Timestamp { seconds, nanos: 0 })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_moves_only_forward_and_survives_a_restart() {
    let db = TestDb::new().await;
    let server = TestServer::start(config(&db)).await;
    let start = now_secs() - 3_000;
    let (a, b) = (Device::new(start), Device::new(start));
    let mut ingest = server.client().await;
    ingest.write_locations(a.batch(1, 100, 10)).await.unwrap();
    ingest.write_locations(b.batch(1, 0, 5)).await.unwrap();
    ingest.write_locations(a.batch(2, 0, 10)).await.unwrap(); // late: older points
    let mut q = query_client(&server).await;
    let resp = q
        .get_latest(GetLatestRequest {
            device_ids: vec![a.device_id.to_string(), b.device_id.to_string()],
            app_source: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .locations()
        .unwrap();
    let times: Vec<i64> = resp.iter().map(|l| l.time.unwrap().seconds).collect();
    assert_eq!(
        times,
        vec![start + 109, start + 4],
        "a's latest is still its newest point"
    );
    let by_app = q
        .get_latest(GetLatestRequest {
            device_ids: vec![],
            app_source: "mextrack".into(),
        })
        .await
        .unwrap();
    assert_eq!(by_app.into_inner().locations().unwrap().len(), 2);
    server.stop().await;

    // A new server fills the map from the database.
    let server = TestServer::start(config(&db)).await;
    let mut q = query_client(&server).await;
    let resp = q
        .get_latest(GetLatestRequest {
            device_ids: vec![a.device_id.to_string()],
            app_source: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .locations()
        .unwrap();
    assert_eq!(resp[0].time.unwrap().seconds, start + 109);
    assert_eq!(resp[0].latitude, a.point(109).latitude);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn track_pages_have_no_gaps_or_repeats() {
    let db = TestDb::new().await;
    let server = TestServer::start(config(&db)).await;
    let start = now_secs() - 5_000;
    let d = Device::new(start);
    server
        .client()
        .await
        .write_locations(d.batch(1, 0, 2_345))
        .await
        .unwrap();
    let mut q = query_client(&server).await;
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = q
            .get_track(GetTrackRequest {
                device_id: d.device_id.to_string(),
                from: at(start),
                to: at(start + 2_000),
                limit: 300,
                cursor: cursor.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.locations.len() <= 300);
        seen.extend(page.locations.iter().map(|l| l.time.unwrap().seconds));
        if page.next_cursor.is_empty() {
            break;
        }
        cursor = page.next_cursor;
    }
    // Points are at start + i + 0.25 s: [start, start + 2000) holds i in 0..2000.
    assert_eq!(seen, (0..2_000).map(|i| start + i).collect::<Vec<_>>());
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_get_clear_errors() {
    let db = TestDb::new().await;
    let server = TestServer::start(config(&db)).await;
    let d = Device::new(now_secs() - 100);
    server
        .client()
        .await
        .write_locations(d.batch(1, 0, 5))
        .await
        .unwrap();
    let mut q = query_client(&server).await;
    let now = now_secs();
    let track = |device: String, from: i64, to: i64, cursor: &str| GetTrackRequest {
        device_id: device,
        from: at(from),
        to: at(to),
        limit: 0,
        cursor: cursor.into(),
    };
    let cases = [
        (
            track(uuid::Uuid::new_v4().to_string(), now - 100, now, ""),
            Code::NotFound,
            "no points",
        ),
        (
            track(d.device_id.to_string(), now, now - 100, ""),
            Code::InvalidArgument,
            "before",
        ),
        (
            track(d.device_id.to_string(), now - 40 * 86_400, now, ""),
            Code::InvalidArgument,
            "wider",
        ),
        (
            track(d.device_id.to_string(), now - 100, now, "garbage"),
            Code::InvalidArgument,
            "cursor",
        ),
        (
            track("not-a-uuid".into(), now - 100, now, ""),
            Code::InvalidArgument,
            "not a UUID",
        ),
    ];
    for (req, code, text) in cases {
        let err = q.get_track(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(text), "{err:?}");
    }
    let err = q.get_latest(GetLatestRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = q
        .get_hourly_stats(GetHourlyStatsRequest {
            key: None,
            from: at(now - 3600),
            to: at(now),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hourly_stats_by_device_user_and_app() {
    let db = TestDb::new().await;
    let server = TestServer::start(config(&db)).await;
    let hour = (now_secs() - 86_400) / 3600 * 3600;
    let (a, b) = (Device::new(hour), Device::new(hour));
    let mut ingest = server.client().await;
    ingest.write_locations(a.batch(1, 0, 3_600)).await.unwrap(); // one hour, every second
    ingest
        .write_locations(a.batch(2, 3_600, 1_800))
        .await
        .unwrap(); // half the next
    ingest.write_locations(b.batch(1, 0, 100)).await.unwrap();
    let mut conn = setup::connect(&db.url).await.unwrap();
    maintain::rollup(&mut conn).await.unwrap();
    let mut q = query_client(&server).await;
    let stats = |key| GetHourlyStatsRequest {
        key: Some(key),
        from: at(hour),
        to: at(hour + 3 * 3600),
    };
    let by_device = q
        .get_hourly_stats(stats(Key::DeviceId(a.device_id.to_string())))
        .await
        .unwrap()
        .into_inner();
    let counts: Vec<u64> = by_device.hours.iter().map(|h| h.point_count).collect();
    assert_eq!(counts, vec![3_600, 1_800]);
    assert_eq!(by_device.hours[0].hour.unwrap().seconds, hour);
    assert_eq!(by_device.hours[0].max_speed, Some(36.0));
    let bbox = by_device.hours[0].bbox.unwrap();
    assert!(bbox.min_latitude < bbox.max_latitude);
    let by_app = q
        .get_hourly_stats(stats(Key::AppSource("mextrack".into())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (by_app.hours[0].point_count, by_app.hours[0].devices),
        (3_700, 2)
    );
    let by_user = q
        .get_hourly_stats(stats(Key::UserId(b.user_id.to_string())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_user.hours.len(), 1);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_subscriber_sees_what_others_stream() {
    let db = TestDb::new().await;
    let server = TestServer::start(config(&db)).await;
    let (a, b) = (Device::new(now_secs() - 500), Device::new(now_secs() - 500));
    let mut q = query_client(&server).await;
    let mut feed = q
        .subscribe(SubscribeRequest {
            app_source: String::new(),
            device_ids: vec![a.device_id.to_string()],
            bbox: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut ingest = server.client().await;
    ingest.write_locations(b.batch(1, 0, 20)).await.unwrap(); // filtered out
    ingest.write_locations(a.batch(1, 0, 20)).await.unwrap();
    ingest.write_locations(a.batch(2, 0, 20)).await.unwrap(); // duplicates: not new, not fed
    ingest.write_locations(a.batch(3, 20, 5)).await.unwrap();
    let mut got = HashSet::new();
    let mut updates = 0;
    while got.len() < 25 {
        let update = tokio::time::timeout(Duration::from_secs(5), feed.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        updates += 1;
        for p in update.locations().unwrap() {
            assert_eq!(p.device_id, a.device_id.to_string());
            assert!(got.insert(p.time.unwrap().seconds), "no point twice");
        }
    }
    assert!(
        updates <= 2,
        "points come grouped by committed batch ({updates} updates)"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), feed.message())
            .await
            .is_err(),
        "nothing more"
    );
    server.stop().await;
    db.drop_db().await;
}

/// `locus_live_dropped_total` now (0 before any drop).
async fn live_dropped(server: &TestServer) -> u64 {
    scrape(server)
        .await
        .lines()
        .find_map(|l| l.strip_prefix("locus_live_dropped_total "))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_loses_its_oldest_points_and_never_holds_up_ingest() {
    let db = TestDb::new().await;
    let mut cfg = config(&db);
    cfg.query.live_queue_points = 100;
    let server = TestServer::start(cfg).await;
    let d = Device::new(now_secs() - 20_000);
    // A subscriber that reads nothing: once its transport holds 64 KiB of
    // unread updates (HTTP/2 flow control), locus can send it no more.
    let channel = server
        .endpoint()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut feed = QueryClient::new(channel)
        .subscribe(SubscribeRequest {
            device_ids: vec![d.device_id.to_string()],
            ..SubscribeRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let before = live_dropped(&server).await;
    let mut ingest = server.client().await;
    const N: i64 = 10_000;
    for b in 0..N / 500 {
        let ack = tokio::time::timeout(
            Duration::from_secs(10),
            ingest.write_locations(d.batch(b as u64, b * 500, 500)),
        )
        .await
        .expect("ingest is not held up by a subscriber that does not read")
        .unwrap()
        .into_inner();
        assert_eq!(ack.accepted, 500);
    }
    let dropped = live_dropped(&server).await - before;
    assert!(dropped > 0, "the subscriber fell behind, and lost points");

    // It reads at last: what it gets is in time order and ends with the
    // newest point; what it lost are the oldest of its queue, and every
    // point is either received or counted as lost.
    let last = d.start + N - 1;
    let mut times: Vec<i64> = Vec::new();
    while times.last() != Some(&last) {
        let update = tokio::time::timeout(Duration::from_secs(5), feed.message())
            .await
            .expect("the newest points come")
            .unwrap()
            .unwrap();
        times.extend(
            update
                .locations()
                .unwrap()
                .iter()
                .map(|l| l.time.unwrap().seconds),
        );
    }
    assert!(
        times.windows(2).all(|w| w[0] < w[1]),
        "in time order, none twice"
    );
    assert_eq!(times.len() as u64 + dropped, N as u64);
    // The newest 100 (the queue) came whole.
    assert!(times.ends_with(&(last - 99..=last).collect::<Vec<_>>()));
    server.stop().await;
    db.drop_db().await;
}
