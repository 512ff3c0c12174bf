//! The console in a real browser: Debian's headless chromium, driven by
//! chromedriver through fantoccini, against a real locus on a real
//! database, signed in with real tokens. Without chromium and chromedriver
//! each test says "skipped: no chromium/chromedriver" and passes, unless
//! `LOCUS_REQUIRE_BROWSER=1` (CI), where it fails.
//!
//! Screenshots go to `target/console-shots/`.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    Device, TestDb, TestServer, free_port, now_secs,
    tenants::{auth_config, create_token, write},
};
use fantoccini::{Client, ClientBuilder, Locator};
use locus::{
    auth::Role,
    location::json::rfc3339,
    proto::{Location, LocationBatch},
    storage::{maintain, setup},
};
use serde_json::{Value, json};
use uuid::Uuid;

const A: &str = "mextrack";
const B: &str = "pshop";
/// Points of the device whose track is drawn: three pages of 100.
const TRACK_POINTS: i64 = 250;
const TRACK_PAGE: u32 = 100;
/// One browser at a time: the machine has two cores.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `name` on the PATH, if it is there.
fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// chromedriver on a free port, and a session of headless chromium.
struct Browser {
    client: Client,
    driver: Child,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    /// `None` (and says so) where chromium or chromedriver is missing,
    /// unless LOCUS_REQUIRE_BROWSER=1.
    async fn start() -> Option<Browser> {
        let chromium = on_path(&["chromium", "chromium-browser", "google-chrome"]);
        let driver = on_path(&["chromedriver"]);
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            assert!(
                std::env::var("LOCUS_REQUIRE_BROWSER").as_deref() != Ok("1"),
                "LOCUS_REQUIRE_BROWSER=1, but chromium or chromedriver is not on the PATH \
                 (apt-get install chromium chromium-driver)"
            );
            eprintln!("skipped: no chromium/chromedriver");
            return None;
        };
        let port = free_port();
        let mut driver = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let caps = json!({
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,860",
                         "--hide-scrollbars"],
            }
        });
        let serde_json::Value::Object(caps) = caps else {
            unreachable!()
        };
        let url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) if started.elapsed() > Duration::from_secs(30) => {
                    let _ = driver.kill();
                    panic!("no chromium session through chromedriver: {e}");
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        Some(Browser { client, driver })
    }

    async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("{script}: {e}"))
    }

    /// Waits until `expr` (JavaScript) is true, at most 15 s.
    async fn until(&self, expr: &str, what: &str) {
        let started = Instant::now();
        while self.js(&format!("return !!({expr});")).await != json!(true) {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{what} ({expr}); page says: {}",
                self.js("return document.body.innerText.slice(0, 2000);")
                    .await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn sign_in(&self, http: std::net::SocketAddr, token: &str, app: &str) {
        self.client.goto(&format!("http://{http}/")).await.unwrap();
        self.until("document.getElementById('token')", "the sign-in form")
            .await;
        let c = &self.client;
        c.find(Locator::Id("token"))
            .await
            .unwrap()
            .send_keys(token)
            .await
            .unwrap();
        c.find(Locator::Id("app-source"))
            .await
            .unwrap()
            .send_keys(app)
            .await
            .unwrap();
        c.find(Locator::Css("#signin-form button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    /// Signs in, and waits for the fleet read and the live feed open.
    async fn open_map(&self, http: std::net::SocketAddr, token: &str, app: &str) {
        self.sign_in(http, token, app).await;
        self.until(
            "document.getElementById('fleet-map').dataset.loaded === 'true' \
             && document.getElementById('live-status').textContent === 'live'",
            "the map loaded and the live feed open",
        )
        .await;
    }

    /// The device ids of the markers on the live map.
    async fn markers(&self) -> Vec<String> {
        let v = self
            .js("return [...document.querySelectorAll('#fleet-map .marker')].map(m => m.dataset.device);")
            .await;
        let mut ids: Vec<String> = serde_json::from_value(v).unwrap();
        ids.sort();
        ids
    }

    /// Sets a datetime-local input to `us` (microseconds since the epoch).
    async fn set_time(&self, id: &str, us: i64) {
        self.js(&format!(
            "const d = new Date('{}'); document.getElementById('{id}').value = \
             new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 19); return 0;",
            rfc3339(us)
        ))
        .await;
    }

    /// A screenshot in target/console-shots/`name`.png.
    async fn shot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .unwrap()
            .join("console-shots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    async fn close(mut self) {
        let client = self.client.clone();
        let _ = client.close().await;
        let _ = self.driver.kill();
    }
}

/// Two apps' fleets, written and rolled up: A's devices (one with a long
/// track and a stop) and B's, and a reader token of each.
struct Fleet {
    db: TestDb,
    server: TestServer,
    admin: String,
    reader_a: String,
    reader_b: String,
    a_devices: Vec<Uuid>,
    b_devices: Vec<Uuid>,
    track: Device,
}

/// The tracked device's `i`th point, 10 s apart: east at varying speed,
/// ten minutes still (points 100..160), then north.
fn track_point(d: &Device, i: i64) -> Location {
    let mut l = d.point(0);
    l.time = common::at(d.start + i * 10);
    l.metadata_json = String::new();
    let step = 0.0003;
    let (east, north) = match i {
        ..100 => (i, 0),
        100..160 => (100, 0),
        _ => (100, i - 160),
    };
    l.latitude = 19.40 + north as f64 * step;
    l.longitude = -99.15 + east as f64 * step;
    (l.speed, l.heading) = match i {
        ..100 => (Some(5.0 + (i % 20) as f64 * 2.0), Some(90.0)),
        100..160 => (Some(0.0), Some(90.0)),
        _ => (Some(20.0 + (i % 15) as f64 * 5.0), Some(0.0)),
    };
    l
}

/// A device of `app` at one point `minutes_ago`, placed by `k`.
fn still(app: &str, k: usize, minutes_ago: i64) -> Location {
    let d = Device::new(now_secs() - minutes_ago * 60);
    let mut l = d.point(0);
    l.app_source = app.into();
    // On a spiral around the city centre.
    let (angle, r) = (k as f64 * 2.4, 0.012 * (k as f64 + 1.0).sqrt());
    l.latitude = 19.43 + r * angle.sin();
    l.longitude = -99.13 + r * angle.cos();
    l.heading = Some((k as f64 * 47.0) % 360.0);
    l.speed = Some(k as f64 * 4.0);
    l
}

impl Fleet {
    async fn start() -> Fleet {
        Self::start_with(None).await
    }

    /// With `map_tiles` as --map-tiles.
    async fn start_with(map_tiles: Option<String>) -> Fleet {
        let db = TestDb::new().await;
        let mut c = auth_config(&db);
        c.console.map_tiles = map_tiles;
        c.query.track_page = TRACK_PAGE;
        // The fleet comes in pages too.
        c.query.latest_page = 5;
        let server = TestServer::start(c).await;
        let admin = create_token(&db, Role::Admin, None).await;
        let reader_a = create_token(&db, Role::Reader, Some(A)).await;
        let reader_b = create_token(&db, Role::Reader, Some(B)).await;
        let mut grpc = server.client().await;
        // Starts 20 minutes before an hour, three hours ago: two hours.
        let start = (now_secs() - 3 * 3600) / 3600 * 3600 - 1200;
        let track = Device::new(start);
        let ack = write(
            &mut grpc,
            LocationBatch {
                batch_id: 1,
                locations: (0..TRACK_POINTS).map(|i| track_point(&track, i)).collect(),
            },
            &admin,
        )
        .await;
        assert_eq!(ack.accepted, TRACK_POINTS as u32);
        // A's fleet: some heard from a minute ago, some silent for 20.
        let a: Vec<Location> = (0..12)
            .map(|k| still(A, k, if k % 3 == 0 { 20 } else { 1 }))
            .collect();
        let b: Vec<Location> = (0..4).map(|k| still(B, k + 20, 1)).collect();
        let ids = |ls: &[Location]| -> Vec<Uuid> {
            ls.iter().map(|l| l.device_id.parse().unwrap()).collect()
        };
        let (mut a_devices, b_devices) = (ids(&a), ids(&b));
        a_devices.push(track.device_id);
        let mut locations = a;
        locations.extend(b);
        let n = locations.len() as u32;
        let ack = write(
            &mut grpc,
            LocationBatch {
                batch_id: 2,
                locations,
            },
            &admin,
        )
        .await;
        assert_eq!(ack.accepted, n, "{ack:?}");
        let mut conn = setup::connect(&db.url).await.unwrap();
        maintain::rollup(&mut conn).await.unwrap();
        Fleet {
            db,
            server,
            admin,
            reader_a,
            reader_b,
            a_devices,
            b_devices,
            track,
        }
    }

    /// `GET path` as the HTTP API answers it, with `token`.
    async fn api(&self, path: &str, token: &str) -> Value {
        reqwest::Client::new()
            .get(format!("http://{}{path}", self.server.http))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn stop(self) {
        self.server.stop().await;
        self.db.drop_db().await;
    }
}

fn sorted(ids: &[Uuid]) -> Vec<String> {
    let mut v: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    v.sort();
    v
}

/// After sign-in the map holds a marker per device of the app (read over
/// pages), the count says so, silent devices are greyed, and a point
/// ingested now moves its marker within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_map_shows_the_fleet_and_moves_with_live_points() {
    let _one = ONE_BROWSER.lock().await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    let fleet = Fleet::start().await;
    browser
        .open_map(fleet.server.http, &fleet.reader_a, A)
        .await;
    let want = sorted(&fleet.a_devices);
    assert_eq!(browser.markers().await, want);
    assert_eq!(
        browser
            .js("return document.getElementById('device-count').dataset.count;")
            .await,
        json!(want.len().to_string())
    );
    // Those heard from 20 minutes ago or more (4, and the tracked device)
    // are greyed after the default 5 minutes; the others are not.
    browser
        .until(
            "document.querySelectorAll('#fleet-map .marker.silent').length === 5",
            "five silent devices greyed",
        )
        .await;
    let headings = browser
        .js("return document.querySelectorAll('#fleet-map .marker path[transform^=rotate]').length;")
        .await;
    assert_eq!(headings, json!(want.len()), "each marker shows its heading");
    browser.shot("map").await;

    // A point now: the silent tracked device moves, and is no longer silent.
    let id = fleet.track.device_id;
    let mut p = track_point(&fleet.track, 0);
    p.time = common::at(now_secs());
    (p.latitude, p.longitude) = (19.45, -99.10);
    let mut grpc = fleet.server.client().await;
    let ack = write(
        &mut grpc,
        LocationBatch {
            batch_id: 3,
            locations: vec![p],
        },
        &fleet.admin,
    )
    .await;
    assert_eq!(ack.accepted, 1);
    let acked = Instant::now();
    let moved = format!(
        "(m => m && m.dataset.lat === '19.45' && m.dataset.lon === '-99.1' && m.dataset.silent === 'false')\
         (document.querySelector('#fleet-map .marker[data-device=\"{id}\"]'))"
    );
    browser.until(&moved, "the marker moved").await;
    let took = acked.elapsed();
    assert!(took < Duration::from_secs(1), "moved after {took:?}");
    browser
        .until(
            "Number(document.getElementById('rate').textContent) > 0",
            "points a second counted",
        )
        .await;
    browser.close().await;
    fleet.stop().await;
}

/// A reader of one app_source sees none of another's devices, and asking
/// for the other app_source by name is refused with a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_sees_only_its_own_app_source() {
    let _one = ONE_BROWSER.lock().await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    let fleet = Fleet::start().await;
    browser
        .open_map(fleet.server.http, &fleet.reader_b, B)
        .await;
    let seen = browser.markers().await;
    assert_eq!(seen, sorted(&fleet.b_devices));
    for a in &fleet.a_devices {
        assert!(!seen.contains(&a.to_string()), "B's reader sees A's {a}");
    }
    browser
        .js("document.getElementById('signout').click(); return 0;")
        .await;
    browser.sign_in(fleet.server.http, &fleet.reader_b, A).await;
    browser
        .until(
            "!document.getElementById('signin-error').hidden",
            "a refusal shown",
        )
        .await;
    let msg = browser
        .js("return document.getElementById('signin-error').textContent;")
        .await;
    let msg = msg.as_str().unwrap();
    assert!(msg.starts_with("This token may not read that"), "{msg}");
    assert!(msg.contains(A), "{msg}");
    assert_eq!(browser.markers().await, Vec::<String>::new());
    browser.close().await;
    fleet.stop().await;
}

/// A token locus does not know is refused at sign-in with a clear
/// message, and nothing is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_gets_a_clear_message() {
    let _one = ONE_BROWSER.lock().await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    let fleet = Fleet::start().await;
    let wrong = format!("locus_{}_not-a-secret", Uuid::new_v4().simple());
    browser.sign_in(fleet.server.http, &wrong, A).await;
    browser
        .until(
            "!document.getElementById('signin-error').hidden",
            "a refusal shown",
        )
        .await;
    let msg = browser
        .js("return document.getElementById('signin-error').textContent;")
        .await;
    let msg = msg.as_str().unwrap();
    assert!(msg.starts_with("This token was refused"), "{msg}");
    assert!(msg.contains("locus token create"), "{msg}");
    assert_eq!(
        browser.js("return sessionStorage.length;").await,
        json!(0),
        "a refused token is not kept"
    );
    assert_eq!(
        browser
            .js("return document.getElementById('view-map').hidden;")
            .await,
        json!(true)
    );
    browser.close().await;
    fleet.stop().await;
}

/// The track of a device over more than one page: as many table rows,
/// path vertices and coloured points as the API has points, across all
/// its pages, and the ten-minute stop found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_track_draws_every_point_of_every_page() {
    let _one = ONE_BROWSER.lock().await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    let fleet = Fleet::start().await;
    browser
        .open_map(fleet.server.http, &fleet.reader_a, A)
        .await;
    let (from, to) = (
        (fleet.track.start - 60) * 1_000_000,
        (fleet.track.start + 3 * 3600) * 1_000_000,
    );
    // The API's count, page by page.
    let (mut api_points, mut pages, mut cursor) = (0, 0, String::new());
    loop {
        let page = fleet
            .api(
                &format!(
                    "/v1/devices/{}/track?app_source={A}&from={}&to={}{cursor}",
                    fleet.track.device_id,
                    rfc3339(from).replace('+', "%2B"),
                    rfc3339(to).replace('+', "%2B"),
                ),
                &fleet.reader_a,
            )
            .await;
        api_points += page["locations"].as_array().unwrap().len();
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert_eq!((api_points, pages), (TRACK_POINTS as usize, 3));

    browser.js("location.hash = '#track'; return 0;").await;
    browser.set_time("track-from", from).await;
    browser.set_time("track-to", to).await;
    browser
        .client
        .find(Locator::Id("track-device"))
        .await
        .unwrap()
        .send_keys(&fleet.track.device_id.to_string())
        .await
        .unwrap();
    browser
        .client
        .find(Locator::Css("#track-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .until(
            "document.getElementById('track-map').dataset.loaded === 'true'",
            "the track drawn",
        )
        .await;
    let drawn = browser
        .js("return {
            rows: document.querySelectorAll('#track-points tbody tr').length,
            vertices: document.getElementById('track-path').points.numberOfItems,
            dots: document.querySelectorAll('#track-map .pt').length,
            colours: new Set([...document.querySelectorAll('#track-map .pt')].map(c => c.getAttribute('fill'))).size,
            pages: Number(document.getElementById('track-status').dataset.pages),
            stops: document.querySelectorAll('#track-stops tbody tr').length,
            stop_marks: document.querySelectorAll('#track-map .stop').length,
        };")
        .await;
    assert_eq!(
        drawn,
        json!({"rows": api_points, "vertices": api_points, "dots": api_points,
               "colours": drawn["colours"], "pages": 3, "stops": 1, "stop_marks": 1}),
    );
    assert!(
        drawn["colours"].as_u64().unwrap() > 5,
        "coloured by speed: {drawn}"
    );
    browser.shot("track").await;
    browser.close().await;
    fleet.stop().await;
}

/// The chart has a bar for each hour the API answers, and only those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_shows_the_hours_that_exist() {
    let _one = ONE_BROWSER.lock().await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    let fleet = Fleet::start().await;
    browser
        .open_map(fleet.server.http, &fleet.reader_a, A)
        .await;
    let hour = fleet.track.start / 3600 * 3600;
    let (from, to) = ((hour - 3600) * 1_000_000, (hour + 6 * 3600) * 1_000_000);
    let stats = fleet
        .api(
            &format!(
                "/v1/stats/hourly?app_source={A}&from={}&to={}",
                rfc3339(from),
                rfc3339(to)
            ),
            &fleet.reader_a,
        )
        .await;
    let mut hours: Vec<String> = stats["hours"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["hour"].as_str().unwrap().to_string())
        .collect();
    hours.sort();
    // The track's two hours, and the hour of the fleet's points (or two,
    // right after an hour turned).
    assert!((3..=4).contains(&hours.len()), "{stats}");

    browser.js("location.hash = '#stats'; return 0;").await;
    browser.set_time("stats-from", from).await;
    browser.set_time("stats-to", to).await;
    browser
        .client
        .find(Locator::Css("#stats-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .until(
            "document.getElementById('stats-chart').dataset.loaded === 'true'",
            "the chart drawn",
        )
        .await;
    let bars = browser
        .js("return [...document.querySelectorAll('#stats-chart rect.hour')].map(r => [r.dataset.hour, Number(r.dataset.points), Number(r.getAttribute('height')) > 0]);")
        .await;
    let mut bars: Vec<(String, i64, bool)> = serde_json::from_value(bars).unwrap();
    bars.sort();
    let want: Vec<(String, i64, bool)> = {
        let mut w: Vec<_> = stats["hours"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h["hour"].as_str().unwrap().to_string(),
                    h["point_count"].as_i64().unwrap(),
                    true,
                )
            })
            .collect();
        w.sort();
        w
    };
    assert_eq!(bars, want);
    let lines = browser
        .js("return [document.querySelectorAll('#stats-chart .avg .dot').length, document.querySelectorAll('#stats-chart .max .dot').length];")
        .await;
    assert_eq!(lines, json!([hours.len(), hours.len()]), "a speed per hour");
    browser.shot("stats").await;
    browser.close().await;
    fleet.stop().await;
}

/// A tile server on its own origin: each tile an SVG that names itself.
/// Returns its URL template and the count of tiles asked.
async fn tile_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::{Arc, atomic::AtomicUsize};

    use axum::{extract::Path as UrlPath, routing::get};
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&asked);
    let app = axum::Router::new().route(
        "/{z}/{x}/{file}",
        get(move |UrlPath((z, x, file)): UrlPath<(u32, u32, String)>| {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let y = file.trim_end_matches(".svg").to_string();
            async move {
                (
                    [("content-type", "image/svg+xml")],
                    format!(
                        r##"<svg xmlns="http://www.w3.org/2000/svg" width="256" height="256"><rect width="256" height="256" fill="#eef3e6" stroke="#c4cfb4"/><text x="8" y="20" font-size="12" fill="#8a9a78">tile {z}/{x}/{y}</text></svg>"##
                    ),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/{{z}}/{{x}}/{{y}}.svg"), asked)
}

/// With --map-tiles, the map's tiles come from that server (its origin
/// let in by the pages' policy) and cover the map.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_tiles_come_from_the_tile_server() {
    let _one = ONE_BROWSER.lock().await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    let (tiles, asked) = tile_server().await;
    let fleet = Fleet::start_with(Some(tiles.clone())).await;
    browser
        .open_map(fleet.server.http, &fleet.reader_a, A)
        .await;
    let shown = browser
        .js("return [...document.querySelectorAll('#fleet-map .tiles image')].map(i => i.getAttribute('href'));")
        .await;
    let shown: Vec<String> = serde_json::from_value(shown).unwrap();
    assert!(!shown.is_empty(), "tiles drawn");
    let origin = tiles.split("/{z}").next().unwrap();
    assert!(shown.iter().all(|h| h.starts_with(origin)), "{shown:?}");
    let started = Instant::now();
    while asked.load(std::sync::atomic::Ordering::Relaxed) < shown.len() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the browser fetched {} of {} tiles",
            asked.load(std::sync::atomic::Ordering::Relaxed),
            shown.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    browser.shot("map-tiles").await;
    browser.close().await;
    fleet.stop().await;
}

/// A token revoked while the map is open: the live feed ends, the page
/// reconnects, is refused, and goes back to sign-in saying why, with the
/// token forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_ends_the_session_with_a_message() {
    let _one = ONE_BROWSER.lock().await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    let fleet = Fleet::start().await;
    browser
        .open_map(fleet.server.http, &fleet.reader_a, A)
        .await;
    let id = locus::auth::token::Token::parse(&fleet.reader_a)
        .unwrap()
        .id;
    let mut conn = sqlx::Connection::connect(&fleet.db.url).await.unwrap();
    locus::auth::token::revoke(&mut conn, id).await.unwrap();
    browser
        .until(
            "document.body.dataset.signedIn === 'false' \
             && !document.getElementById('signin-error').hidden",
            "back at sign-in with a message",
        )
        .await;
    let msg = browser
        .js("return document.getElementById('signin-error').textContent;")
        .await;
    assert!(
        msg.as_str().unwrap().starts_with("This token was refused"),
        "{msg}"
    );
    assert_eq!(
        browser
            .js("return sessionStorage.getItem('locus.console.session');")
            .await,
        Value::Null
    );
    browser.close().await;
    fleet.stop().await;
}
