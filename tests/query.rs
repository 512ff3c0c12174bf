//! The Query service against the real server: latest, track pagination,
//! hourly stats, live feed, and bad parameters.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::{collections::HashSet, time::Duration};

use common::{Device, TestDb, TestServer, at, config, now_secs, scrape};
use locus::{
    proto::{
        GetHourlyStatsRequest, GetLatestRequest, GetTrackRequest, Location, LocationBatch,
        SubscribeRequest, get_hourly_stats_request::Key, query_client::QueryClient,
    },
    storage::{maintain, setup},
};
use prost::Message;
use tonic::{Code, transport::Channel};

async fn query_client(server: &TestServer) -> QueryClient<Channel> {
    QueryClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap()
}

/// The latest points of `devices`, in the app_source a [`Device`]'s points have.
async fn latest_of(q: &mut QueryClient<Channel>, devices: &[&Device]) -> Vec<Location> {
    q.get_latest(GetLatestRequest {
        device_ids: devices.iter().map(|d| d.device_id.to_string()).collect(),
        app_source: "mextrack".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .locations()
    .unwrap()
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
    let resp = latest_of(&mut q, &[&a, &b]).await;
    let times: Vec<i64> = resp.iter().map(|l| l.time.unwrap().seconds).collect();
    assert_eq!(
        times,
        vec![start + 109, start + 4],
        "a's latest is still its newest point"
    );
    let by_app = q
        .get_latest(GetLatestRequest {
            app_source: "mextrack".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_app.into_inner().locations().unwrap().len(), 2);
    server.stop().await;

    // A new server fills the map from the database.
    let server = TestServer::start(config(&db)).await;
    let mut q = query_client(&server).await;
    let resp = latest_of(&mut q, &[&a]).await;
    assert_eq!(resp[0].time.unwrap().seconds, start + 109);
    assert_eq!(resp[0].latitude, a.point(109).latitude);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_silent_past_retention_are_not_loaded() {
    let db = TestDb::new().await;
    let server = TestServer::start(config(&db)).await;
    server.stop().await;
    // Stored straight away, as ingest would refuse the older: one device
    // last heard 26 hours ago, one an hour ago.
    let (old, recent) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let pool = db.pool().await;
    for (device, hours) in [(old, 26), (recent, 1)] {
        sqlx::query(
            "INSERT INTO location_events (time, device_id, user_id, app_source, latitude, longitude)
             VALUES (now() - make_interval(hours => $2), $1, $1, 'mextrack', 19.4, -99.1)",
        )
        .bind(device)
        .bind(hours)
        .execute(&pool)
        .await
        .unwrap();
    }
    // A retention of 25 hours, and no setup to drop anything meanwhile: the
    // old point is still stored, past retention.
    let mut cfg = config(&db);
    cfg.storage.raw_retention = Duration::from_secs(25 * 3600);
    // The hourly rollup's refresh window must end before retention does.
    cfg.storage.hourly_refresh_window = Some(Duration::from_secs(4 * 3600));
    cfg.no_setup = true;
    let server = TestServer::start(cfg).await;
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM location_events WHERE device_id = $1")
            .bind(old)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(stored, 1);
    let page = query_client(&server)
        .await
        .get_latest(GetLatestRequest {
            device_ids: vec![old.to_string(), recent.to_string()],
            app_source: "mextrack".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids_of(&page, None), [recent]);
    server.stop().await;
    db.drop_db().await;
}

/// One point for each of `n` new devices of `app`, with `metadata_bytes`
/// of metadata each (0 for none).
fn fleet(n: usize, app: &str, metadata_bytes: usize) -> (Vec<uuid::Uuid>, LocationBatch) {
    let start = now_secs() - 1_000;
    let locations: Vec<Location> = (0..n)
        .map(|_| {
            let mut l = Device::new(start).point(1);
            l.app_source = app.into();
            if metadata_bytes > 0 {
                l.metadata_json = format!(r#"{{"pad":"{}"}}"#, "x".repeat(metadata_bytes - 10));
            }
            l
        })
        .collect();
    let ids = locations
        .iter()
        .map(|l| l.device_id.parse().unwrap())
        .collect();
    (
        ids,
        LocationBatch {
            batch_id: 1,
            locations,
        },
    )
}

/// Ids of a page's locations, each checked to be of `app` if one is given.
fn ids_of(page: &locus::query::encoded::LocationPage, app: Option<&str>) -> Vec<uuid::Uuid> {
    page.locations()
        .unwrap()
        .iter()
        .inspect(|l| assert!(app.is_none_or(|a| a == l.app_source), "{l:?}"))
        .map(|l| l.device_id.parse().unwrap())
        .collect()
}

/// Every page of `req`, following next_cursor; each holds at most 64 KiB
/// of locations (the server's `--max-latest-bytes` in these tests).
async fn all_pages(
    q: &mut QueryClient<Channel>,
    mut req: GetLatestRequest,
) -> Vec<locus::query::encoded::LocationPage> {
    let mut pages = Vec::new();
    loop {
        let page = q.get_latest(req.clone()).await.unwrap().into_inner();
        assert!(page.locations.encoded_len() <= 65_536);
        req.cursor = page.next_cursor.clone();
        pages.push(page);
        if req.cursor.is_empty() {
            return pages;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_pages_have_no_gaps_or_repeats_while_devices_join() {
    let db = TestDb::new().await;
    let mut cfg = config(&db);
    cfg.query.max_latest_bytes = 65_536;
    let server = TestServer::start(cfg).await;
    let mut ingest = server.client().await;
    let (before, batch) = fleet(230, "mextrack", 0);
    ingest.write_locations(batch).await.unwrap();
    // Another app's devices, each with 3,000 bytes of metadata.
    let (heavy, batch) = fleet(30, "pshop", 3_000);
    ingest.write_locations(batch).await.unwrap();
    let mut q = query_client(&server).await;

    // An app's devices in pages of 40, 50 more joining after the second.
    let (mut seen, mut cursor, mut pages) = (Vec::new(), String::new(), 0);
    let mut joined = (Vec::new(), None);
    loop {
        let page = q
            .get_latest(GetLatestRequest {
                app_source: "mextrack".into(),
                limit: 40,
                cursor: cursor.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let ids = ids_of(&page, Some("mextrack"));
        assert!(ids.len() <= 40);
        seen.extend(ids);
        pages += 1;
        if pages == 2 {
            let (ids, batch) = fleet(50, "mextrack", 0);
            ingest.write_locations(batch).await.unwrap();
            joined = (ids, seen.last().copied());
        }
        if page.next_cursor.is_empty() {
            break;
        }
        cursor = page.next_cursor;
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "in device_id order, none twice"
    );
    assert!(before.iter().all(|d| seen.contains(d)), "none left out");
    let (joined, cursor_then) = joined;
    let cursor_then = cursor_then.unwrap();
    for d in &joined {
        assert_eq!(
            seen.contains(d),
            *d > cursor_then,
            "a device that joins is in a later page iff its id sorts after the cursor"
        );
    }
    assert_eq!(
        seen.len(),
        before.len() + joined.iter().filter(|d| **d > cursor_then).count()
    );
    assert!(pages >= 6, "{pages} pages");

    // Pages end before 64 KiB of locations: the heavy app's 30 (about 3 KB
    // each) take two pages though the default limit is 1,000.
    let pages = all_pages(
        &mut q,
        GetLatestRequest {
            app_source: "pshop".into(),
            ..Default::default()
        },
    )
    .await;
    let sizes: Vec<usize> = pages.iter().map(|p| p.locations.len()).collect();
    let seen: Vec<uuid::Uuid> = pages
        .iter()
        .flat_map(|p| ids_of(p, Some("pshop")))
        .collect();
    assert_eq!(sizes.len(), 2, "{sizes:?}");
    let mut want = heavy.clone();
    want.sort();
    assert_eq!(seen, want);

    // Device ids of an app are answered in the order asked, unknown ones
    // (and another app's) left out, pages ending by bytes too.
    let mut asked: Vec<String> = heavy.iter().map(|d| d.to_string()).collect();
    asked.insert(7, uuid::Uuid::new_v4().to_string());
    asked.insert(20, before[3].to_string());
    let pages = all_pages(
        &mut q,
        GetLatestRequest {
            device_ids: asked.clone(),
            app_source: "pshop".into(),
            ..Default::default()
        },
    )
    .await;
    let seen: Vec<uuid::Uuid> = pages
        .iter()
        .flat_map(|p| ids_of(p, Some("pshop")))
        .collect();
    let want: Vec<uuid::Uuid> = heavy.clone();
    assert_eq!(seen, want);
    assert_eq!(pages.len(), 2);
    // And by limit.
    let page = q
        .get_latest(GetLatestRequest {
            device_ids: asked.clone(),
            app_source: "pshop".into(),
            limit: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids_of(&page, None), want[..5]);
    assert_eq!(page.next_cursor, "i5");

    // Cursors that this server did not give for the request.
    for (req, text) in [
        (
            GetLatestRequest {
                app_source: "mextrack".into(),
                cursor: "garbage".into(),
                ..Default::default()
            },
            "cursor",
        ),
        (
            GetLatestRequest {
                app_source: "mextrack".into(),
                cursor: "i5".into(),
                ..Default::default()
            },
            "cursor",
        ),
        (
            GetLatestRequest {
                device_ids: asked.clone(),
                app_source: "pshop".into(),
                cursor: format!("i{}", asked.len()),
                ..Default::default()
            },
            "cursor",
        ),
        (
            GetLatestRequest {
                device_ids: asked.clone(),
                app_source: "pshop".into(),
                cursor: format!("d{}", before[0]),
                ..Default::default()
            },
            "cursor",
        ),
        (
            GetLatestRequest {
                app_source: "mextrack".into(),
                limit: 10_001,
                ..Default::default()
            },
            "over the maximum",
        ),
        (
            GetLatestRequest {
                device_ids: vec![uuid::Uuid::new_v4().to_string(); 10_001],
                ..Default::default()
            },
            "at most 10000",
        ),
    ] {
        let err = q.get_latest(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(text), "{err:?}");
    }
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
                app_source: "mextrack".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let locations = page.locations().unwrap();
        assert!(locations.len() <= 300);
        seen.extend(locations.iter().map(|l| l.time.unwrap().seconds));
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
        app_source: "mextrack".into(),
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
        // A span in days, as flags take it, not in humantime's months.
        (
            track(d.device_id.to_string(), now - 40 * 86_400, now, ""),
            Code::InvalidArgument,
            "limit of 31days",
        ),
        // Both ends representable, their difference past i64: refused as
        // wide, never wrapped into a small span.
        (
            track(
                d.device_id.to_string(),
                -8_000_000_000_000,
                8_000_000_000_000,
                "",
            ),
            Code::InvalidArgument,
            "wider",
        ),
        (
            track(d.device_id.to_string(), now, i64::MAX, ""),
            Code::InvalidArgument,
            "out of range",
        ),
        (
            GetTrackRequest {
                to: Some(prost_types::Timestamp {
                    seconds: i64::MAX / 1_000_000,
                    nanos: 999_999_999,
                }),
                ..track(d.device_id.to_string(), now, now, "")
            },
            Code::InvalidArgument,
            "to (9223372036854 s) is out of range",
        ),
        (
            GetTrackRequest {
                app_source: String::new(),
                ..track(d.device_id.to_string(), now - 100, now, "")
            },
            Code::InvalidArgument,
            locus::query::APP_SOURCE_REQUIRED,
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
            app_source: String::new(),
            from: at(now - 3600),
            to: at(now),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = q
        .get_hourly_stats(GetHourlyStatsRequest {
            key: Some(Key::DeviceId(d.device_id.to_string())),
            from: at(-8_000_000_000_000),
            to: at(8_000_000_000_000),
            app_source: "mextrack".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("wider than the limit of"), "{err:?}");
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
        app_source: "mextrack".into(),
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
        .get_hourly_stats(GetHourlyStatsRequest {
            key: None,
            ..stats(Key::UserId(String::new()))
        })
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
            app_source: "mextrack".into(),
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
            app_source: "mextrack".into(),
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
