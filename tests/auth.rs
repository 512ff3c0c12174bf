//! Who may write and read what: tokens, roles, app_source scopes,
//! revocation (also on open streams), rate limits, the token CLI, and TLS
//! with client certificates. Negative cases first.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::{process::Stdio, time::Duration};

use common::{
    Device, TestDb, TestServer, at, count_rows, free_port, json_point, locus_health, now_secs,
    pki::pki,
    tenants::{auth_config, create_token, create_token_for, with_token, write},
};
use locus::{
    auth::{Role, token},
    proto::{
        GetHourlyStatsRequest, GetLatestRequest, GetTrackRequest, LocationBatch, SubscribeRequest,
        get_hourly_stats_request::Key, ingest_client::IngestClient, query_client::QueryClient,
    },
};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;
use uuid::Uuid;

async fn http(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = reqwest::Client::new().request(method, format!("http://{}{path}", server.http));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_valid_credentials_are_refused_and_store_nothing() {
    let db = TestDb::new().await;
    let server = TestServer::start(auth_config(&db)).await;
    let good = create_token(&db, Role::Gateway, Some("mextrack")).await;
    let d = Device::new(now_secs() - 100);
    let batch = || d.batch(1, 0, 5);

    let mut c = server.client().await;
    let none = c.write_locations(batch()).await.unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated, "{none:?}");
    assert!(none.message().contains("no credentials"), "{none:?}");
    // Same id, another secret: a guessed or tampered token.
    let (id_part, _) = good.rsplit_once('_').unwrap();
    let tampered = format!("{id_part}_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    for bad in [
        "nonsense",
        "locus_00000000000000000000000000000000_x",
        &tampered,
    ] {
        let e = c
            .write_locations(with_token(batch(), bad))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{bad}: {e:?}");
    }
    let e = c
        .stream_locations(futures::stream::iter([batch()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let mut q = QueryClient::new(server.channel().await);
    let e = q
        .get_latest(GetLatestRequest {
            app_source: "mextrack".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    let body =
        json!({"batch_id": 1, "locations": [json_point(&d.device_id, "mextrack", now_secs())]});
    for token in [None, Some("nonsense"), Some(tampered.as_str())] {
        let (status, headers, err) = http(
            &server,
            reqwest::Method::POST,
            "/v1/locations",
            token,
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, 401, "{token:?}: {err}");
        assert_eq!(err["error"]["code"], "unauthenticated");
        assert!(headers.get("www-authenticate").is_some());
    }
    let (status, _, _) = http(
        &server,
        reqwest::Method::GET,
        "/v1/latest?app_source=mextrack",
        None,
        None,
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(count_rows(&db.pool().await).await, 0);

    // The good token does work: the refusals above were about credentials.
    let ack = write(&mut c, batch(), &good).await;
    assert_eq!(ack.accepted, 5);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_writes_only_the_devices_and_app_source_it_covers() {
    let db = TestDb::new().await;
    let server = TestServer::start(auth_config(&db)).await;
    let mine = Device::new(now_secs() - 100);
    let other = Device::new(now_secs() - 100);
    let device_token =
        create_token_for(&db, Role::Device, Some("mextrack"), &[mine.device_id], None).await;
    let gateway = create_token(&db, Role::Gateway, Some("mextrack")).await;
    let reader = create_token(&db, Role::Reader, Some("mextrack")).await;

    // Own device, another device, own device of another app.
    let mut foreign_app = mine.point(2);
    foreign_app.app_source = "pshop".into();
    let batch = LocationBatch {
        batch_id: 7,
        locations: vec![mine.point(0), other.point(0), foreign_app, mine.point(1)],
    };
    let mut c = server.client().await;
    let ack = write(&mut c, batch.clone(), &device_token).await;
    assert_eq!(ack.accepted, 2);
    let rejected: Vec<(u32, &str)> = ack
        .rejected
        .iter()
        .map(|r| (r.index, r.reason.as_str()))
        .collect();
    assert_eq!(rejected, [(1, "forbidden"), (2, "forbidden")]);
    assert!(
        ack.rejected[0].message.contains("own devices"),
        "{:?}",
        ack.rejected
    );
    assert!(
        ack.rejected[1].message.contains("pshop"),
        "{:?}",
        ack.rejected
    );

    // A gateway covers every device of its app_source, and no other app.
    let ack = write(&mut c, batch.clone(), &gateway).await;
    assert_eq!((ack.accepted, ack.duplicates), (1, 2));
    assert_eq!(ack.rejected.len(), 1);
    assert_eq!(
        (ack.rejected[0].index, ack.rejected[0].reason.as_str()),
        (2, "forbidden")
    );

    // A reader may not write at all.
    let e = c
        .write_locations(with_token(batch.clone(), &reader))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let (status, _, err) = http(
        &server,
        reqwest::Method::POST,
        "/v1/locations",
        Some(&reader),
        Some(json!({"batch_id": 1, "locations": [json_point(&mine.device_id, "mextrack", now_secs())]})),
    )
    .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (403, Some("permission_denied"))
    );

    // Over HTTP, the same per-point rule.
    let t = now_secs() - 10;
    let (status, _, ack) = http(
        &server,
        reqwest::Method::POST,
        "/v1/locations",
        Some(&device_token),
        Some(json!({"batch_id": 2, "locations": [
            json_point(&mine.device_id, "mextrack", t),
            json_point(&other.device_id, "mextrack", t),
        ]})),
    )
    .await;
    assert_eq!(status, 200, "{ack}");
    assert_eq!(ack["accepted"], 1);
    assert_eq!(ack["rejected"][0]["reason"], "forbidden");
    assert_eq!(ack["rejected"][0]["index"], 1);

    // A device token may not query.
    let mut q = QueryClient::new(server.channel().await);
    let e = q
        .get_latest(with_token(
            GetLatestRequest {
                device_ids: vec![mine.device_id.to_string()],
                ..Default::default()
            },
            &device_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM location_events WHERE device_id = $1")
            .bind(other.device_id)
            .fetch_one(&db.pool().await)
            .await
            .unwrap();
    assert_eq!(stored, 1, "only the gateway's write of the other device");
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_never_sees_another_app_sources_data() {
    let db = TestDb::new().await;
    let server = TestServer::start(auth_config(&db)).await;
    let admin = create_token(&db, Role::Admin, None).await;
    let reader = create_token(&db, Role::Reader, Some("mextrack")).await;
    let ours = Device::new(now_secs() - 100);
    let theirs = Device::new(now_secs() - 100);
    let mut theirs_batch = theirs.batch(2, 0, 10);
    for l in &mut theirs_batch.locations {
        l.app_source = "pshop".into();
    }

    // The reader's live feed, opened before anything is written, asks for
    // every app_source: it gets its own only.
    let mut q = QueryClient::new(server.channel().await);
    let mut live = q
        .subscribe(with_token(SubscribeRequest::default(), &reader))
        .await
        .unwrap()
        .into_inner();
    let e = q
        .subscribe(with_token(
            SubscribeRequest {
                app_source: "pshop".into(),
                ..Default::default()
            },
            &reader,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    let mut c = server.client().await;
    // Theirs first: if the feed leaked, it would be the first update.
    for b in [theirs_batch, ours.batch(1, 0, 10)] {
        let ack = write(&mut c, b, &admin).await;
        assert_eq!(ack.accepted, 10);
    }
    let update = tokio::time::timeout(Duration::from_secs(10), live.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .locations()
        .unwrap();
    assert!(!update.is_empty());
    assert!(
        update
            .iter()
            .all(|l| l.device_id == ours.device_id.to_string()),
        "{update:?}"
    );

    // Latest: the other app's device is as absent as an unknown one.
    let latest = q
        .get_latest(with_token(
            GetLatestRequest {
                device_ids: vec![ours.device_id.to_string(), theirs.device_id.to_string()],
                ..Default::default()
            },
            &reader,
        ))
        .await
        .unwrap()
        .into_inner()
        .locations()
        .unwrap();
    assert_eq!(latest.len(), 1);
    assert_eq!(latest[0].device_id, ours.device_id.to_string());
    let e = q
        .get_latest(with_token(
            GetLatestRequest {
                app_source: "pshop".into(),
                ..Default::default()
            },
            &reader,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Track: theirs is not found; ours is there.
    let track = |d: &Device| GetTrackRequest {
        device_id: d.device_id.to_string(),
        from: at(d.start - 1),
        to: at(d.start + 100),
        limit: 0,
        cursor: String::new(),
        app_source: String::new(),
    };
    let e = q
        .get_track(with_token(track(&theirs), &reader))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let page = q
        .get_track(with_token(track(&ours), &reader))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.locations.len(), 10);

    // Hourly stats, once the rollup ran: theirs by device or user is empty,
    // by app_source refused; ours is there.
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    locus::storage::maintain::rollup(&mut conn).await.unwrap();
    let stats = |key: Option<Key>, app: &str| GetHourlyStatsRequest {
        key,
        app_source: app.into(),
        from: at(now_secs() - 7200),
        to: at(now_secs() + 3600),
    };
    let hours = |key: Key| {
        let mut q = q.clone();
        let req = with_token(stats(Some(key), ""), &reader);
        async move { q.get_hourly_stats(req).await }
    };
    let ours_hours = hours(Key::DeviceId(ours.device_id.to_string()))
        .await
        .unwrap()
        .into_inner()
        .hours;
    assert_eq!(ours_hours.iter().map(|h| h.point_count).sum::<u64>(), 10);
    for key in [
        Key::DeviceId(theirs.device_id.to_string()),
        Key::UserId(theirs.user_id.to_string()),
    ] {
        assert!(hours(key).await.unwrap().into_inner().hours.is_empty());
    }
    for key in [None, Some(Key::DeviceId(theirs.device_id.to_string()))] {
        let e = q
            .get_hourly_stats(with_token(stats(key, "pshop"), &reader))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
    }

    // The same over HTTP.
    for (path, want) in [
        ("/v1/latest?app_source=pshop".to_string(), 403),
        (format!("/v1/devices/{}/latest", theirs.device_id), 404),
        (format!("/v1/devices/{}/latest", ours.device_id), 200),
        (
            "/v1/stats/hourly?app_source=pshop&from=2020-01-01T00:00:00Z&to=2020-01-02T00:00:00Z"
                .to_string(),
            403,
        ),
        ("/v1/live?app_source=pshop".to_string(), 403),
    ] {
        let (status, _, body) =
            http(&server, reqwest::Method::GET, &path, Some(&reader), None).await;
        assert_eq!(status, want, "{path}: {body}");
    }
    server.stop().await;
    db.drop_db().await;
}

/// One device id, two apps' gateways (one phone running both apps, or a
/// hostile gateway naming another app's device): each app reads and stores
/// its own points, and after a restart too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_app_hides_or_takes_the_place_of_another_apps_device() {
    let db = TestDb::new().await;
    common::tenants::apps_never_touch_each_others_devices(&db, true).await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_stops_working_within_seconds_also_on_an_open_stream() {
    let db = TestDb::new().await;
    let server = TestServer::start(auth_config(&db)).await;
    let gateway = create_token(&db, Role::Gateway, Some("mextrack")).await;
    let id = token::Token::parse(&gateway).unwrap().id;
    let d = Device::new(now_secs() - 1000);

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut c = server.client().await;
    let mut acks = c
        .stream_locations(with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            &gateway,
        ))
        .await
        .unwrap()
        .into_inner();
    tx.send(d.batch(0, 0, 5)).await.unwrap();
    assert_eq!(acks.message().await.unwrap().unwrap().accepted, 5);

    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    token::revoke(&mut conn, id).await.unwrap();
    let revoked_at = std::time::Instant::now();
    // The stream keeps sending; within seconds a batch is refused, and the
    // stream ends with UNAUTHENTICATED.
    let mut n = 1;
    let status = loop {
        assert!(
            revoked_at.elapsed() < Duration::from_secs(5),
            "still accepted 5 s after revocation"
        );
        tx.send(d.batch(n, n as i64 * 5, 5)).await.unwrap();
        match acks.message().await {
            Ok(Some(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
        n += 1;
    };
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");

    let e = c
        .write_locations(with_token(d.batch(99, 900, 1), &gateway))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let (status, _, _) = http(
        &server,
        reqwest::Method::POST,
        "/v1/locations",
        Some(&gateway),
        Some(
            json!({"batch_id": 1, "locations": [json_point(&d.device_id, "mextrack", now_secs())]}),
        ),
    )
    .await;
    assert_eq!(status, 401);
    server.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_rate_limit_is_refused_with_a_retry_hint() {
    let db = TestDb::new().await;
    let mut cfg = auth_config(&db);
    cfg.auth.rate_limit_points = 100;
    cfg.auth.rate_limit_burst = 200;
    cfg.limits.max_batch_points = 200;
    let server = TestServer::start(cfg).await;
    let a = create_token(&db, Role::Gateway, Some("mextrack")).await;
    let b = create_token(&db, Role::Gateway, Some("mextrack")).await;
    let d = Device::new(now_secs() - 1000);
    let mut c = server.client().await;

    let ack = write(&mut c, d.batch(1, 0, 200), &a).await;
    assert_eq!(ack.accepted, 200);
    let e = c
        .write_locations(with_token(d.batch(2, 200, 50), &a))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let retry = e.get_details_retry_info().unwrap().retry_delay.unwrap();
    // 50 points at 100/s: half a second, give or take the time since.
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_millis(600),
        "{retry:?}"
    );
    let fifty: Vec<Value> = (0..50)
        .map(|i| json_point(&d.device_id, "mextrack", now_secs() - 100 - i))
        .collect();
    let (status, headers, err) = http(
        &server,
        reqwest::Method::POST,
        "/v1/locations",
        Some(&a),
        Some(json!({"batch_id": 3, "locations": fifty})),
    )
    .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (429, Some("rate_limited"))
    );
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");

    // Another token has its own bucket.
    let ack = write(&mut c, d.batch(4, 300, 200), &b).await;
    assert_eq!(ack.accepted, 200);
    // And the first one's refills: after the hint, it may write again.
    tokio::time::sleep(retry + Duration::from_millis(50)).await;
    let ack = write(&mut c, d.batch(5, 600, 50), &a).await;
    assert_eq!(ack.accepted, 50);
    server.stop().await;
    db.drop_db().await;
}

/// `locus token create|list|revoke`, through the binary: the token is shown
/// once and kept only as a hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_cli_creates_lists_and_revokes_and_keeps_only_hashes() {
    let db = TestDb::new().await;
    let locus = |args: &[&str]| db.locus(args);
    let device = Uuid::new_v4().to_string();
    let create = [
        "token",
        "create",
        "--name",
        "van 7",
        "--role",
        "device",
        "--app-source",
        "mextrack",
        "--device",
        &device,
    ];
    let before_setup = locus(&create);
    assert!(!before_setup.status.success());
    assert!(
        String::from_utf8_lossy(&before_setup.stderr).contains("run `locus setup` first"),
        "{before_setup:?}"
    );
    assert!(locus(&["setup"]).status.success());

    let made = locus(&create);
    assert!(made.status.success(), "{made:?}");
    let text = String::from_utf8(made.stdout).unwrap();
    let token = text.trim();
    assert_eq!(text.lines().count(), 1, "only the token on stdout: {text}");
    let parsed = token::Token::parse(token).unwrap();

    let no_device = locus(&[
        "token",
        "create",
        "--name",
        "x",
        "--role",
        "device",
        "--app-source",
        "mextrack",
    ]);
    assert!(!no_device.status.success());
    assert!(String::from_utf8_lossy(&no_device.stderr).contains("--device"));
    let admin_with_app = locus(&[
        "token",
        "create",
        "--name",
        "x",
        "--role",
        "admin",
        "--app-source",
        "mextrack",
    ]);
    assert!(!admin_with_app.status.success());

    let list = String::from_utf8(locus(&["token", "list"]).stdout).unwrap();
    assert!(list.contains(&parsed.id.to_string()), "{list}");
    assert!(list.contains("van 7") && list.contains("device"), "{list}");
    assert!(
        !list.contains(&parsed.secret),
        "the secret is never shown again"
    );

    let pool = db.pool().await;
    let (hash, whole): (Vec<u8>, String) =
        sqlx::query_as("SELECT secret_sha256, t::text FROM locus_tokens t WHERE id = $1")
            .bind(parsed.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(hash, parsed.secret_sha256());
    assert!(!whole.contains(&parsed.secret), "{whole}");

    let revoked = locus(&["token", "revoke", &parsed.id.to_string()]);
    assert!(revoked.status.success(), "{revoked:?}");
    let list = String::from_utf8(locus(&["token", "list"]).stdout).unwrap();
    assert!(!list.contains(&parsed.id.to_string()), "{list}");
    let all = String::from_utf8(locus(&["token", "list", "--all", "--json"]).stdout).unwrap();
    let all: Value = serde_json::from_str(&all).unwrap();
    assert!(all[0]["revoked_at"].is_string(), "{all}");
    let unknown = locus(&["token", "revoke", &Uuid::new_v4().to_string()]);
    assert!(!unknown.status.success());
    pool.close().await;
    db.drop_db().await;
}

/// `--auth off` works, and says so loudly at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_off_is_announced_in_the_log() {
    let db = TestDb::new().await;
    let port = || format!("127.0.0.1:{}", free_port());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_locus"))
        .args(["serve", "--auth", "off", "--grpc-addr", &port()])
        .args(["--http-addr", &port(), "--metrics-addr", &port()])
        .env("DATABASE_URL", &db.url)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("AUTHENTICATION IS OFF") && line.contains("WARN") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true));
    child.kill().await.unwrap();
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_tokens_or_registered_client_certificates() {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let db = TestDb::new().await;
    let pki = pki();
    let mut cfg = auth_config(&db);
    cfg.tls.tls_cert = Some(pki.dir.join("server.pem"));
    cfg.tls.tls_key = Some(pki.dir.join("server.key"));
    cfg.tls.tls_client_ca = Some(pki.dir.join("ca.pem"));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost");
    let server = TestServer::start_with_tls(cfg, Some(tls.clone())).await;
    let d = Device::new(now_secs() - 100);
    let other = Device::new(now_secs() - 100);
    let gateway = create_token(&db, Role::Gateway, Some("mextrack")).await;
    create_token_for(
        &db,
        Role::Device,
        Some("mextrack"),
        &[d.device_id],
        Some(pki.client.2.clone()),
    )
    .await;

    // Plain text to the TLS port gets nowhere.
    let plain = match Channel::from_shared(format!("http://{}", server.grpc))
        .unwrap()
        .connect()
        .await
    {
        Err(_) => true,
        Ok(ch) => IngestClient::new(ch)
            .write_locations(with_token(d.batch(1, 0, 1), &gateway))
            .await
            .is_err(),
    };
    assert!(plain, "a plain-text call was served");

    // TLS and a token.
    let ack = server
        .client()
        .await
        .write_locations(with_token(d.batch(1, 0, 3), &gateway))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 3);

    // mTLS: the registered certificate is the device's credential; it covers
    // its own device only.
    let with_identity = |cert: &str, key: &str| tls.clone().identity(Identity::from_pem(cert, key));
    let channel = server
        .endpoint()
        .tls_config(with_identity(&pki.client.0, &pki.client.1))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut batch = d.batch(2, 3, 3);
    batch.locations.push(other.point(0));
    let ack = IngestClient::new(channel)
        .write_locations(batch)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 3);
    assert_eq!(ack.rejected.len(), 1);
    assert_eq!(ack.rejected[0].reason, "forbidden");

    // A certificate from no trusted CA fails the handshake.
    let refused = match server
        .endpoint()
        .tls_config(with_identity(&pki.stranger.0, &pki.stranger.1))
        .unwrap()
        .connect()
        .await
    {
        Err(_) => true,
        Ok(ch) => IngestClient::new(ch)
            .write_locations(d.batch(3, 10, 1))
            .await
            .is_err(),
    };
    assert!(refused, "a certificate from an unknown CA was let in");

    // HTTPS: the same certificate, and a token.
    let identity =
        reqwest::Identity::from_pem(format!("{}{}", pki.client.1, pki.client.0).as_bytes())
            .unwrap();
    let https = |identity: Option<reqwest::Identity>| {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap());
        if let Some(i) = identity {
            b = b.identity(i);
        }
        b.build().unwrap()
    };
    let url = format!("https://localhost:{}/v1/locations", server.http.port());
    let body =
        json!({"batch_id": 9, "locations": [json_point(&d.device_id, "mextrack", now_secs() - 5)]});
    let resp = https(Some(identity))
        .post(&url)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let ack: Value = resp.json().await.unwrap();
    assert_eq!(ack["accepted"], 1, "{ack}");
    let resp = https(None).post(&url).json(&body).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let resp = https(None)
        .post(&url)
        .bearer_auth(&gateway)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let plain = reqwest::get(format!("http://{}/healthz", server.http)).await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());

    // The container health check: plain gRPC cannot ask a TLS port; the
    // metrics listener's readiness, plain HTTP, answers.
    let grpc = locus_health(&["--target", &format!("http://{}", server.grpc)]);
    assert_ne!(grpc.0, Some(0), "{grpc:?}");
    let readyz = format!("http://{}/readyz", server.metrics);
    assert_eq!(
        locus_health(&["--http", &readyz]),
        (Some(0), "ready".into())
    );
    let absent = format!("http://{}/nowhere", server.metrics);
    assert_eq!(
        locus_health(&["--http", &absent]),
        (Some(1), "not ready".into())
    );
    let https = format!("https://{}/readyz", server.metrics);
    assert_ne!(locus_health(&["--http", &https]).0, Some(0));

    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM location_events WHERE device_id = $1")
            .bind(d.device_id)
            .fetch_one(&db.pool().await)
            .await
            .unwrap();
    assert_eq!(stored, 7);
    server.stop().await;
    assert_ne!(locus_health(&["--http", &readyz]).0, Some(0), "stopped");
    std::fs::remove_dir_all(&pki.dir).ok();
    db.drop_db().await;
}

/// Made-up tokens each cost a database lookup; however many arrive at once,
/// those lookups hold at most two of the pool's connections, so a flood
/// cannot take the writers' connections away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_tokens_does_not_starve_the_writers() {
    let db = TestDb::new().await;
    let mut cfg = auth_config(&db);
    cfg.pipeline.writers = 1;
    cfg.db_pool_size = 6;
    let server = TestServer::start(cfg).await;
    let good = create_token(&db, Role::Gateway, Some("mextrack")).await;
    let d = Device::new(now_secs() - 1000);
    let mut c = server.client().await;
    // The good token is looked up (and cached) before the flood.
    assert_eq!(write(&mut c, d.batch(1, 0, 10), &good).await.accepted, 10);

    // Lookups now hang: the tokens table is locked.
    let mut locker = PgConnection::connect(&db.url).await.unwrap();
    let mut tx = locker.begin().await.unwrap();
    sqlx::query("LOCK TABLE locus_tokens IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let endpoint = server.endpoint();
    let flood: Vec<_> = (0..20)
        .map(|_| {
            let endpoint = endpoint.clone();
            let bogus = format!("locus_{}_{}", Uuid::new_v4().simple(), "x".repeat(40));
            let d = Device::new(now_secs() - 1000);
            tokio::spawn(async move {
                IngestClient::new(endpoint.connect().await.unwrap())
                    .write_locations(with_token(d.batch(1, 0, 1), &bogus))
                    .await
                    .unwrap_err()
                    .code()
            })
        })
        .collect();
    // The flood's lookups are waiting for the lock, two and no more
    // (pg_stat_activity shows them; the revocation poll waits too, and is
    // not counted), before the good call is made.
    let waiting = || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%FROM locus_tokens WHERE id = $1%'",
        )
        .fetch_one(&mut PgConnection::connect(&db.url).await.unwrap())
        .await
        .unwrap();
        n
    };
    let t = std::time::Instant::now();
    while waiting().await < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "two lookups wait for the lock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(waiting().await, 2, "at most two lookups at once");
    let ack = tokio::time::timeout(
        Duration::from_secs(3),
        write(&mut c, d.batch(2, 10, 10), &good),
    )
    .await
    .expect("the writer still gets a connection during the flood");
    assert_eq!(ack.accepted, 10);

    // The flood waits no longer than its turn allows: refused as
    // retryable, or (once the lock goes) as unknown.
    tokio::time::sleep(Duration::from_secs(1)).await;
    tx.rollback().await.unwrap();
    for f in flood {
        let code = f.await.unwrap();
        assert!(
            matches!(code, Code::Unavailable | Code::Unauthenticated),
            "{code:?}"
        );
    }
    server.stop().await;
    db.drop_db().await;
}

/// One token holds at most --max-subscribers-per-token live feeds (gRPC and
/// Server-Sent Events together), so another app's reader still gets one;
/// and a revoked token's idle feed ends at the next revocation poll, not at
/// its next update (it may never have one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_feeds_are_bounded_per_token_and_a_revoked_idle_feed_ends() {
    let db = TestDb::new().await;
    let mut c = auth_config(&db);
    c.query.max_subscribers = 10;
    c.query.max_subscribers_per_token = 3;
    let server = TestServer::start(c).await;
    let greedy = create_token(&db, Role::Reader, Some("mextrack")).await;
    let other = create_token(&db, Role::Reader, Some("pshop")).await;
    let open = |token: &str| {
        reqwest::Client::new()
            .get(format!("http://{}/v1/live", server.http))
            .bearer_auth(token)
            .send()
    };
    let mut held = Vec::new();
    for _ in 0..2 {
        let r = open(&greedy).await.unwrap();
        assert_eq!(r.status(), 200);
        held.push(r);
    }
    let mut q = QueryClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let grpc_feed = q
        .subscribe(with_token(SubscribeRequest::default(), &greedy))
        .await
        .unwrap();
    let refused = open(&greedy).await.unwrap();
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(
        body["error"]["code"], "too_many_subscribers_for_token",
        "{body}"
    );
    let e = q
        .subscribe(with_token(SubscribeRequest::default(), &greedy))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("--max-subscribers-per-token"), "{e:?}");

    // Another tenant is not shut out.
    let theirs = open(&other).await.unwrap();
    assert_eq!(theirs.status(), 200);

    // A feed closed gives its slot back.
    drop(grpc_feed);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = open(&greedy).await.unwrap();
        if r.status() == 200 {
            held.push(r);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Revoked while idle: nothing is written, yet the feed ends with its
    // `error` event within a few polls (--auth-refresh-interval 200ms).
    let id = token::Token::parse(&other).unwrap().id;
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    token::revoke(&mut conn, id).await.unwrap();
    let mut body = theirs.bytes_stream();
    let mut text = String::new();
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        use futures::StreamExt;
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the revoked token's idle feed is still open: {text:?}"
    );
    assert!(
        text.contains("event: error") && text.contains("revoked"),
        "{text:?}"
    );
    drop(held);
    server.stop().await;
    db.drop_db().await;
}
