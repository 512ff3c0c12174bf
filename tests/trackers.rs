//! The tracking apps' own HTTP forms, sent as each app sends them
//! (Traccar Client classic and SDK, the background-geolocation JSON that
//! Traccar captured, OwnTracks in HTTP mode), read back from the table:
//! units, times, metadata, dedup on resend, refusals in each app's terms,
//! trackers not registered, and tokens of another tracker.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::io::Write;

use common::{TestDb, TestServer, count_rows, now_secs, tenants::auth_config};
use locus::{
    auth::{Role, token},
    trackers::{self, registry},
};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

/// Registers a tracker and returns a device token bound to it, as
/// `locus token create --tracker-id` does.
async fn register(db: &TestDb, app: &str, tracker_id: &str, user: Uuid) -> String {
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let t = registry::register(&mut conn, app, tracker_id, user)
        .await
        .unwrap();
    token::create(
        &mut conn,
        &token::NewToken {
            name: format!("tracker {tracker_id}"),
            role: Role::Device,
            app_source: Some(app.into()),
            devices: vec![t.device_id],
            client_cert: None,
        },
    )
    .await
    .unwrap()
    .to_string()
}

/// A device's stored rows, as JSON, `time` in microseconds.
async fn rows(pool: &PgPool, device: Uuid) -> Vec<Value> {
    sqlx::query_scalar(
        "SELECT json_build_object('time', (extract(epoch FROM time) * 1000000)::int8, 'user_id', user_id,
                'app_source', app_source, 'latitude', latitude, 'longitude', longitude,
                'accuracy', accuracy, 'altitude', altitude, 'speed', speed, 'heading', heading,
                'metadata', metadata)
         FROM location_events WHERE device_id = $1 ORDER BY time",
    )
    .bind(device)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A request's status and its body as JSON (`Null` when empty).
async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn url(server: &TestServer, path: &str) -> String {
    format!("http://{}{path}", server.http)
}

/// As a `real` column stores it and JSON writes it back: the shortest
/// decimal of the nearest f32.
fn f32_of(x: f64) -> f64 {
    (x as f32).to_string().parse().unwrap()
}

/// Traccar Client (Android, classic): `POST <url>?id=...&timestamp=...`
/// with an empty body and no way to set a header, so the token stands in
/// for the identifier; the SDK's form and JSON with a bearer header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traccar_client_requests_are_stored_in_locus_units() {
    let db = TestDb::new().await;
    let server = TestServer::start(auth_config(&db)).await;
    let pool = db.pool().await;
    let user = Uuid::new_v4();
    let token = register(&db, "fleet", "353861053849681", user).await;
    let device = trackers::device_id("fleet", "353861053849681");
    let http = reqwest::Client::new();
    let t0 = now_secs() - 600;

    // The classic app's request (ProtocolFormatter.formatRequest), its
    // `id` the token.
    let classic = format!(
        "/osmand?id={token}&timestamp={t0}&lat=49.60688&lon=6.15788&speed=10.0&bearing=271.5\
         &altitude=384.7&accuracy=12.0&batt=87.0&charge=true&mock=true"
    );
    let (status, body) = send(http.post(url(&server, &classic))).await;
    assert_eq!((status, &body), (200, &Value::Null));
    let got = rows(&pool, device).await;
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(r["time"], t0 * 1_000_000);
    assert_eq!(r["user_id"], user.to_string());
    assert_eq!(r["app_source"], "fleet");
    assert_eq!(
        (r["latitude"].as_f64(), r["longitude"].as_f64()),
        (Some(49.60688), Some(6.15788))
    );
    // 10 knots.
    assert_eq!(r["speed"].as_f64(), Some(f32_of(18.52)));
    assert_eq!(r["heading"].as_f64(), Some(271.5));
    assert_eq!(r["altitude"].as_f64(), Some(f32_of(384.7)));
    assert_eq!(r["accuracy"].as_f64(), Some(12.0));
    assert_eq!(
        r["metadata"],
        json!({"battery": 87.0, "charging": true, "mock": true})
    );
    // Sent again (the app retries what it saw no answer to): kept once.
    let (status, _) = send(http.post(url(&server, &classic))).await;
    assert_eq!(status, 200);
    assert_eq!(rows(&pool, device).await.len(), 1);

    // GET, the identifier and the token in a header, `location=`, a
    // timestamp in milliseconds.
    let (status, _) = send(
        http.get(url(
            &server,
            &format!(
                "/osmand?id=353861053849681&timestamp={}&location=49.61,6.16&hdop=0.9",
                (t0 + 1) * 1000
            ),
        ))
        .bearer_auth(&token),
    )
    .await;
    assert_eq!(status, 200);

    // traccar-client-sdk, form (HttpUploader.submitForm): the identifier,
    // the token in a header (Config.headers), speed already in knots.
    let form = [
        ("id", "353861053849681".to_string()),
        ("lat", "49.62".into()),
        ("lon", "6.17".into()),
        ("timestamp", (t0 + 2).to_string()),
        ("accuracy", "4.5".into()),
        ("altitude", "300.0".into()),
        ("speed", "5.4".into()),
        ("bearing", "90.0".into()),
        ("batt", "55".into()),
        ("charge", "false".into()),
        ("battery_health", "good".into()),
        ("battery_voltage", "4100".into()),
        ("battery_temp", "31.5".into()),
    ];
    let (status, _) = send(
        http.post(url(&server, "/osmand"))
            .bearer_auth(&token)
            .form(&form),
    )
    .await;
    assert_eq!(status, 200);

    // traccar-client-sdk with uploadJson: an array of flat objects.
    let array = json!([
        {"id": "353861053849681", "lat": 49.63, "lon": 6.18, "timestamp": t0 + 3, "accuracy": 3.0,
         "speed": 1.0, "bearing": 45.0, "batt": 54, "charge": true},
        {"id": "353861053849681", "lat": 49.64, "lon": 6.19, "timestamp": t0 + 4}
    ]);
    let (status, _) = send(
        http.post(url(&server, "/osmand"))
            .bearer_auth(&token)
            .json(&array),
    )
    .await;
    assert_eq!(status, 200);

    // The background-geolocation JSON Traccar captured (its test's
    // field set), at a recent time: speed in m/s, -1 unknown.
    let iso = chrono::DateTime::from_timestamp(t0 + 5, 862_000_000)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let geo = json!({"location": {"event": "motionchange", "is_moving": false,
        "uuid": "0e9a2473-a9a7-4c00-997b-fb97d2154e75", "timestamp": iso, "odometer": 0,
        "coords": {"latitude": -6.1148096, "longitude": 106.6837015, "accuracy": 3.8,
            "speed": 18.67, "speed_accuracy": 0.26, "heading": -1, "heading_accuracy": -1,
            "altitude": 35.7, "altitude_accuracy": 3.8},
        "activity": {"type": "still", "confidence": 100},
        "battery": {"is_charging": false, "level": 0.79}, "extras": {"driver": "ana"}},
        "device_id": "353861053849681"});
    let (status, _) = send(
        http.post(url(&server, "/osmand"))
            .bearer_auth(&token)
            .json(&geo),
    )
    .await;
    assert_eq!(status, 200);

    let got = rows(&pool, device).await;
    assert_eq!(got.len(), 6, "{got:#?}");
    assert_eq!(got[1]["time"], (t0 + 1) * 1_000_000);
    assert_eq!(got[1]["metadata"], json!({"hdop": 0.9}));
    assert_eq!(got[2]["speed"].as_f64(), Some(f32_of(5.4 * 1.852)));
    assert_eq!(
        got[2]["metadata"],
        json!({"battery": 55.0, "charging": false, "battery_health": "good",
               "battery_voltage": 4100.0, "battery_temp": 31.5})
    );
    assert_eq!(got[3]["speed"].as_f64(), Some(f32_of(1.852)));
    assert_eq!(got[4]["metadata"], Value::Null);
    let g = &got[5];
    assert_eq!(g["time"], (t0 + 5) * 1_000_000 + 862_000);
    assert_eq!(g["speed"].as_f64(), Some(f32_of(18.67 * 3.6)));
    assert_eq!(g["heading"], Value::Null);
    assert_eq!(
        g["metadata"],
        json!({"battery": 79.0, "charging": false, "activity": "still", "event": "motionchange",
               "is_moving": false, "odometer": 0, "uuid": "0e9a2473-a9a7-4c00-997b-fb97d2154e75",
               "speed_accuracy": 0.26, "altitude_accuracy": 3.8, "driver": "ana"})
    );

    // The whole array again: nothing new.
    let (status, _) = send(
        http.post(url(&server, "/osmand"))
            .bearer_auth(&token)
            .json(&array),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(rows(&pool, device).await.len(), 6);

    // A heartbeat without a position: success, nothing stored.
    let (status, _) =
        send(http.post(url(&server, &format!("/osmand?id={token}&timestamp={t0}")))).await;
    assert_eq!(status, 200);
    assert_eq!(rows(&pool, device).await.len(), 6);
    server.stop().await;
    db.drop_db().await;
}

/// What each app is told when a point cannot be stored, when its tracker
/// is not registered, or when its token is another tracker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trackers_are_refused_in_their_apps_terms() {
    let db = TestDb::new().await;
    let server = TestServer::start(auth_config(&db)).await;
    let pool = db.pool().await;
    let mine = register(&db, "fleet", "van-1", Uuid::new_v4()).await;
    let theirs = register(&db, "fleet", "van-2", Uuid::new_v4()).await;
    let http = reqwest::Client::new();
    let t = now_secs() - 60;
    let osmand = |q: String| http.post(url(&server, &format!("/osmand?{q}")));

    // Out of range: 400, with the reason; nothing stored.
    let (status, body) = send(osmand(format!("id={mine}&timestamp={t}&lat=95.0&lon=6.1"))).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "point_rejected");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("latitude_out_of_range"),
        "{body}"
    );
    // Not a number.
    let (status, body) = send(osmand(format!("id={mine}&timestamp={t}&lat=north&lon=6.1"))).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("point_rejected"))
    );
    // A tracker never registered.
    let (status, body) =
        send(osmand(format!("id=van-9&timestamp={t}&lat=1.5&lon=6.1")).bearer_auth(&mine)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("unknown_tracker")),
        "{body}"
    );
    // Another tracker's identifier with my token.
    let (status, body) =
        send(osmand(format!("id=van-2&timestamp={t}&lat=1.5&lon=6.1")).bearer_auth(&mine)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("permission_denied")),
        "{body}"
    );
    // No credentials at all, a made-up token in the id.
    let (status, body) = send(osmand(format!("id=van-1&timestamp={t}&lat=1.5&lon=6.1"))).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthenticated")),
        "{body}"
    );
    let fake = format!("locus_{}_AAAA", Uuid::new_v4().simple());
    let (status, _) = send(osmand(format!("id={fake}&timestamp={t}&lat=1.5&lon=6.1"))).await;
    assert_eq!(status, 401);

    // OwnTracks: the same refusals.
    let jane = register(&db, "owntracks", "jane/phone", Uuid::new_v4()).await;
    let ot = |user: &str, password: &str, body: Value| {
        http.post(url(&server, "/owntracks"))
            .basic_auth(user, Some(password))
            .header("X-Limit-U", user)
            .header("X-Limit-D", "phone")
            .json(&body)
    };
    let loc =
        |lat: f64| json!({"_type": "location", "lat": lat, "lon": 2.29, "tst": t, "tid": "jj"});
    let (status, body) = send(ot("jane", &jane, loc(91.0))).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("point_rejected")),
        "{body}"
    );
    let (status, _) = send(ot("jane", "wrong", loc(48.8))).await;
    assert_eq!(status, 401);
    let (status, body) = send(ot("john", &jane, loc(48.8))).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("unknown_tracker")),
        "{body}"
    );
    // Tokens of other trackers (and of another app_source) write nothing here.
    register(&db, "owntracks", "john/phone", Uuid::new_v4()).await;
    let (status, body) = send(ot("john", &jane, loc(48.8))).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("permission_denied")),
        "{body}"
    );
    let (status, _) = send(ot("jane", &theirs, loc(48.8))).await;
    assert_eq!(status, 404);
    let (status, _) = send(
        http.post(url(&server, "/owntracks"))
            .header("X-Limit-U", "jane")
            .header("X-Limit-D", "phone")
            .json(&loc(48.8)),
    )
    .await;
    assert_eq!(status, 401);

    assert_eq!(count_rows(&pool).await, 0);
    server.stop().await;
    db.drop_db().await;
}

/// OwnTracks in HTTP mode: Basic credentials (the user, the token as the
/// password), `X-Limit-U`/`X-Limit-D`, a location as the Android app
/// sends it; other types and empty bodies answered `[]` and not stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owntracks_locations_are_stored_and_the_rest_acknowledged() {
    let db = TestDb::new().await;
    let server = TestServer::start(auth_config(&db)).await;
    let pool = db.pool().await;
    let user = Uuid::new_v4();
    let token = register(&db, "owntracks", "jane/phone", user).await;
    let device = trackers::device_id("owntracks", "jane/phone");
    let http = reqwest::Client::new();
    let tst = now_secs() - 120;
    let post = |body: Vec<u8>| {
        http.post(url(&server, "/owntracks"))
            .basic_auth("jane", Some(&token))
            .header("X-Limit-U", "jane")
            .header("X-Limit-D", "phone")
            .header("content-type", "application/json")
            .body(body)
    };
    let location = json!({"_type": "location", "acc": 13, "alt": 49, "batt": 79, "bs": 1,
        "conn": "w", "created_at": tst + 3, "lat": 48.856826, "lon": 2.292713, "m": 1,
        "t": "u", "tid": "jj", "tst": tst, "vac": 1, "vel": 7, "cog": 271,
        "topic": "owntracks/jane/phone", "inregions": ["home"], "_id": "e1b2c3"});
    let (status, body) = send(post(serde_json::to_vec(&location).unwrap())).await;
    assert_eq!((status, body), (200, json!([])));
    let got = rows(&pool, device).await;
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(r["time"], tst * 1_000_000);
    assert_eq!(r["user_id"], user.to_string());
    assert_eq!(
        (
            r["accuracy"].as_f64(),
            r["altitude"].as_f64(),
            r["speed"].as_f64(),
            r["heading"].as_f64()
        ),
        (Some(13.0), Some(49.0), Some(7.0), Some(271.0))
    );
    assert_eq!(
        r["metadata"],
        json!({"battery": 79.0, "charging": false, "bs": 1, "conn": "w", "created_at": tst + 3,
               "m": 1, "t": "u", "tid": "jj", "vac": 1, "topic": "owntracks/jane/phone",
               "inregions": ["home"], "_id": "e1b2c3"})
    );
    // Resent (the app's queue after a lost answer): stored once.
    let (status, _) = send(post(serde_json::to_vec(&location).unwrap())).await;
    assert_eq!(status, 200);
    // Other types, and an empty body: acknowledged, not stored.
    for body in [
        b"".to_vec(),
        br#"{"_type":"status","android":{"hib":1,"bo":1,"loc":0}}"#.to_vec(),
        br#"{"_type":"transition","event":"enter","desc":"home","tst":1,"lat":1,"lon":2,"acc":5,"tid":"jj","t":"c"}"#.to_vec(),
        br#"{"_type":"lwt","tst":1}"#.to_vec(),
    ] {
        let (status, answer) = send(post(body)).await;
        assert_eq!((status, answer), (200, json!([])));
    }
    // Identity from the payload's topic when the app sends no headers
    // (iOS), the token alone as Basic's password.
    let later = json!({"_type": "location", "lat": 48.86, "lon": 2.3, "tst": tst + 10,
        "topic": "owntracks/jane/phone"});
    let (status, _) = send(
        http.post(url(&server, "/owntracks"))
            .basic_auth("jane", Some(&token))
            .json(&later),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(rows(&pool, device).await.len(), 2);
    assert_eq!(count_rows(&pool).await, 2);
    server.stop().await;
    db.drop_db().await;
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// The body limits of `POST /v1/locations` hold here too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracker_bodies_are_capped_as_json_bodies_are() {
    let db = TestDb::new().await;
    let mut cfg = auth_config(&db);
    cfg.limits.max_message_bytes = 16 * 1024;
    cfg.limits.max_decompressed_bytes = 64 * 1024;
    cfg.limits.max_batch_points = 10;
    let server = TestServer::start(cfg).await;
    let token = register(&db, "fleet", "van-1", Uuid::new_v4()).await;
    let http = reqwest::Client::new();
    let post = |path: &str, body: Vec<u8>, gz: bool| {
        let mut r = http
            .post(url(&server, path))
            .bearer_auth(&token)
            .header("content-type", "application/json");
        if gz {
            r = r.header("content-encoding", "gzip");
        }
        r.body(body)
    };
    let big = vec![b' '; 20 * 1024];
    let (status, body) = send(post("/osmand", big.clone(), false)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );
    let (status, _) = send(post("/owntracks", big, false)).await;
    assert_eq!(status, 413);
    // A gzip bomb: small as sent, over the cap once decompressed.
    let bomb = gzip(&vec![b' '; 1024 * 1024]);
    assert!(bomb.len() < 16 * 1024);
    let (status, body) = send(post("/osmand", bomb, true)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );
    // More points than --max-batch-points.
    let t = now_secs() - 60;
    let many: Vec<Value> = (0..11)
        .map(|i| json!({"id": "van-1", "lat": 1.5, "lon": 2.5, "timestamp": t + i}))
        .collect();
    let (status, body) = send(post("/osmand", serde_json::to_vec(&many).unwrap(), false)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("batch_too_large"))
    );
    // Gzip within the caps is read.
    let few = serde_json::to_vec(&many[..3]).unwrap();
    let (status, _) = send(post("/osmand", gzip(&few), true)).await;
    assert_eq!(status, 200);
    assert_eq!(count_rows(&db.pool().await).await, 3);
    server.stop().await;
    db.drop_db().await;
}

/// `locus token create --tracker-id --user` registers the tracker (once,
/// for one user) and binds the token to its device, which it prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_cli_registers_trackers() {
    let db = TestDb::new().await;
    let locus = |args: &[&str]| db.locus(args);
    assert!(locus(&["setup"]).status.success());
    let (user, other) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
    let create = |user: &str| {
        locus(&[
            "token",
            "create",
            "--name",
            "jane's phone",
            "--role",
            "device",
            "--app-source",
            "owntracks",
            "--tracker-id",
            "jane/phone",
            "--user",
            user,
        ])
    };
    let made = create(&user);
    assert!(made.status.success(), "{made:?}");
    let device = trackers::device_id("owntracks", "jane/phone");
    let said = String::from_utf8_lossy(&made.stderr);
    assert!(said.contains(&device.to_string()), "{said}");
    // A second token for the same tracker and user: fine.
    assert!(create(&user).status.success());
    // The same tracker for another user: refused, and no token made.
    let refused = create(&other);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("already registered"),
        "{refused:?}"
    );
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let tokens: i64 = sqlx::query_scalar("SELECT count(*) FROM locus_tokens")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(tokens, 2);
    let listed = registry::list(&mut conn).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].device_id, listed[0].user_id.to_string()),
        (device, user)
    );
    // Only for device tokens.
    let gateway = locus(&[
        "token",
        "create",
        "--name",
        "g",
        "--role",
        "gateway",
        "--app-source",
        "owntracks",
        "--tracker-id",
        "x/y",
        "--user",
        &other,
    ]);
    assert!(!gateway.status.success());
    // Setup has nothing more to do: doctor sees no drift.
    let dry = locus(&["setup", "--dry-run"]);
    assert!(
        !String::from_utf8_lossy(&dry.stdout).contains("tracker"),
        "{dry:?}"
    );
    db.drop_db().await;
}
