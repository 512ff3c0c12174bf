//! No tenant changes what another tenant's readers see, or what of its
//! points is stored: one device id written by two apps' gateways (one
//! phone running both apps, or a hostile gateway naming another app's
//! device) is two devices. Run on every tier (`tests/auth.rs`,
//! `tests/timescale.rs`).

use std::time::Duration;

use locus::{
    auth::{
        Role,
        token::{self, NewToken},
    },
    config::{AuthMode, ServeConfig},
    proto::{
        BatchAck, GetHourlyStatsRequest, GetLatestRequest, GetTrackRequest, LocationBatch,
        get_hourly_stats_request::Key, ingest_client::IngestClient, query_client::QueryClient,
    },
};
use serde_json::Value;
use sqlx::{Connection, PgConnection};
use tonic::{Code, Request, transport::Channel};
use uuid::Uuid;

use super::{Device, TestDb, TestServer, at, config, now_secs};

const A: &str = "mextrack";
const B: &str = "pshop";

pub fn with_token<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    r
}

pub fn auth_config(db: &TestDb) -> ServeConfig {
    let mut c = config(db);
    c.auth.mode = AuthMode::Tokens;
    c.auth.auth_refresh_interval = Duration::from_millis(200);
    c
}

/// A token of `role` in `app` (every app with `None`), for any device.
pub async fn create_token(db: &TestDb, role: Role, app: Option<&str>) -> String {
    create_token_for(db, role, app, &[], None).await
}

/// A token of `role` in `app`, for `devices` only (any with none), that
/// must come with `client_cert` if there is one.
pub async fn create_token_for(
    db: &TestDb,
    role: Role,
    app: Option<&str>,
    devices: &[Uuid],
    client_cert: Option<Vec<u8>>,
) -> String {
    let mut conn = PgConnection::connect(&db.url).await.expect("connect");
    token::create(
        &mut conn,
        &NewToken {
            name: format!("test {role} {app:?}"),
            role,
            app_source: app.map(str::to_string),
            devices: devices.to_vec(),
            client_cert,
        },
    )
    .await
    .expect("create token")
    .to_string()
}

/// A unary write with `token` that must be answered.
pub async fn write(c: &mut IngestClient<Channel>, batch: LocationBatch, token: &str) -> BatchAck {
    c.write_locations(with_token(batch, token))
        .await
        .expect("write")
        .into_inner()
}

/// `device`'s points `at` (offsets from its start) as `app` sends them, at
/// a latitude of its own so that the apps' points differ.
fn batch_of(device: &Device, app: &str, batch_id: u64, at: &[i64]) -> LocationBatch {
    LocationBatch {
        batch_id,
        locations: at
            .iter()
            .map(|i| {
                let mut l = device.point(*i);
                l.app_source = app.into();
                if app == B {
                    l.latitude += 1.0;
                }
                l
            })
            .collect(),
    }
}

/// The scenario on a database `db` already set up or not: `rollup` runs
/// locus's hourly rollup and checks stats by device (tiers where locus
/// keeps `location_hourly`).
pub async fn apps_never_touch_each_others_devices(db: &TestDb, rollup: bool) {
    let server = TestServer::start(auth_config(db)).await;
    let (gw_a, gw_b) = (
        create_token(db, Role::Gateway, Some(A)).await,
        create_token(db, Role::Gateway, Some(B)).await,
    );
    let (reader_a, reader_b) = (
        create_token(db, Role::Reader, Some(A)).await,
        create_token(db, Role::Reader, Some(B)).await,
    );
    let admin = create_token(db, Role::Admin, None).await;
    // Ten minutes ago, a point a second.
    let x = Device::new(now_secs() - 600);
    let mut c = server.client().await;
    let first: Vec<i64> = (0..10).collect();
    let ack = write(&mut c, batch_of(&x, A, 1, &first), &gw_a).await;
    assert_eq!((ack.accepted, ack.duplicates), (10, 0));
    // B's gateway writes X: five at A's exact times, five at times A will
    // write next, one three minutes ahead of A's newest.
    let theirs: Vec<i64> = (0..5).chain(10..15).chain([780]).collect();
    let ack = write(&mut c, batch_of(&x, B, 1, &theirs), &gw_b).await;
    assert_eq!(
        (ack.accepted, ack.duplicates),
        (11, 0),
        "B's points are B's, wherever A's are"
    );
    let later: Vec<i64> = (10..20).collect();
    let ack = write(&mut c, batch_of(&x, A, 2, &later), &gw_a).await;
    assert_eq!(
        (ack.accepted, ack.duplicates),
        (10, 0),
        "A's later points at B's times are stored, not duplicates"
    );

    // Both apps' stats by device, from the rollup.
    if rollup {
        let mut conn = locus::storage::setup::connect(&db.url)
            .await
            .expect("connect");
        locus::storage::maintain::rollup(&mut conn)
            .await
            .expect("rollup");
        let mut q = QueryClient::new(server.channel().await);
        for (token, app, want) in [(&reader_a, "", 20), (&reader_b, "", 11), (&admin, A, 20)] {
            let hours = q
                .get_hourly_stats(with_token(
                    GetHourlyStatsRequest {
                        key: Some(Key::DeviceId(x.device_id.to_string())),
                        app_source: app.into(),
                        from: at(now_secs() - 7200),
                        to: at(now_secs() + 3600),
                    },
                    token,
                ))
                .await
                .expect("stats")
                .into_inner()
                .hours;
            assert_eq!(hours.iter().map(|h| h.point_count).sum::<u64>(), want);
        }
    }

    let mut all_a: Vec<i64> = first.clone();
    all_a.extend(&later);
    let tokens = Tokens {
        reader_a,
        reader_b,
        admin,
    };
    reads_are_apart(&server, &x, &tokens, &all_a, &theirs).await;
    server.stop().await;
    // Again from storage: the map filled at start.
    let server = TestServer::start(auth_config(db)).await;
    reads_are_apart(&server, &x, &tokens, &all_a, &theirs).await;
    server.stop().await;
}

struct Tokens {
    reader_a: String,
    reader_b: String,
    admin: String,
}

async fn reads_are_apart(
    server: &TestServer,
    x: &Device,
    t: &Tokens,
    times_a: &[i64],
    times_b: &[i64],
) {
    let mut q = QueryClient::new(server.channel().await);
    let id = x.device_id.to_string();
    let latest = |token: &str, app: &str| {
        let mut q = q.clone();
        let req = with_token(
            GetLatestRequest {
                device_ids: vec![id.clone()],
                app_source: app.into(),
                ..Default::default()
            },
            token,
        );
        async move {
            q.get_latest(req)
                .await
                .map(|r| r.into_inner().locations().expect("locations"))
        }
    };
    let newest = |times: &[i64]| x.start + times.iter().max().copied().unwrap_or_default();
    // Each reader sees its own app's X, by its scope; the admin names the app.
    for (token, asked, app, times) in [
        (&t.reader_a, "", A, times_a),
        (&t.reader_b, "", B, times_b),
        (&t.admin, A, A, times_a),
        (&t.admin, B, B, times_b),
    ] {
        let got = latest(token, asked).await.expect("latest");
        assert_eq!(got.len(), 1, "{app}: {got:?}");
        assert_eq!(got[0].app_source, app);
        assert_eq!(got[0].time.expect("time").seconds, newest(times), "{app}");
    }
    let e = latest(&t.admin, "").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.message(), locus::query::APP_SOURCE_REQUIRED);
    let e = latest(&t.reader_a, B).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Tracks: each app's own points only.
    for (token, app, times) in [(&t.reader_a, A, times_a), (&t.reader_b, B, times_b)] {
        let page = q
            .get_track(with_token(
                GetTrackRequest {
                    device_id: id.clone(),
                    from: at(x.start - 1),
                    to: at(now_secs() + 600),
                    limit: 0,
                    cursor: String::new(),
                    app_source: String::new(),
                },
                token,
            ))
            .await
            .expect("track")
            .into_inner()
            .locations()
            .expect("locations");
        assert!(page.iter().all(|l| l.app_source == app), "{page:?}");
        let seconds: Vec<i64> = page.iter().map(|l| l.time.expect("time").seconds).collect();
        let mut want: Vec<i64> = times.iter().map(|i| x.start + i).collect();
        want.sort();
        assert_eq!(seconds, want, "{app}");
    }

    // Over HTTP: the app's fleet, and the device by itself.
    let http = |path: String, token: String| async move {
        let resp = reqwest::Client::new()
            .get(format!("http://{}{path}", server.http))
            .bearer_auth(token)
            .send()
            .await
            .expect("http");
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().await.unwrap_or(Value::Null))
    };
    for (token, app, times) in [(&t.reader_a, A, times_a), (&t.reader_b, B, times_b)] {
        let (status, body) = http(format!("/v1/latest?app_source={app}"), token.clone()).await;
        assert_eq!(status, 200, "{body}");
        let locations = body["locations"].as_array().expect("locations");
        let mine: Vec<&Value> = locations.iter().filter(|l| l["device_id"] == id).collect();
        assert_eq!(mine.len(), 1, "{app}: {body}");
        let (status, one) = http(format!("/v1/devices/{id}/latest"), token.clone()).await;
        assert_eq!(status, 200, "{one}");
        for l in [mine[0], &one] {
            assert_eq!(l["app_source"], app);
            let t = chrono::DateTime::parse_from_rfc3339(l["time"].as_str().expect("time"))
                .expect("rfc3339");
            assert_eq!(t.timestamp(), newest(times), "{app}: {l}");
        }
    }
    let (status, body) = http(format!("/v1/devices/{id}/latest"), t.admin.clone()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"]["message"].as_str(),
        Some(locus::query::APP_SOURCE_REQUIRED)
    );
}
