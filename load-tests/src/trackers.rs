//! `locus-bench --suite trackers`: the tracking apps' paths against gRPC,
//! side by side in one run on one instance and database. The apps send
//! one point a request, each phone on a connection of its own, so every
//! path is driven that way: `--streams` clients, each with its own
//! connection, sending one point and waiting for its answer before the
//! next (a closed loop), until `--tracker-points` points were answered.
//! gRPC batches of `--batch` points are the ceiling beside them.
//!
//! OwnTracks over MQTT is the one path whose answers do not come from
//! locus: the broker acknowledges a publish as soon as it has it. Its
//! rate is the rows locus stored a second, from publishers at QoS 1 to
//! the broker at `LOCUS_BENCH_MQTT_URL` (default mqtt://127.0.0.1:1883)
//! that keep at most `MQTT_WINDOW` messages ahead of what is stored
//! (Mosquitto drops what passes its queue of 1,000 for a session).

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::Instant,
};

use anyhow::Context as _;
use locus::proto::{Location, LocationBatch, ingest_client::IngestClient};
use serde_json::json;
use sqlx::{Connection, PgConnection};

use crate::{
    cluster::{instance, median, stop},
    queries::{dial, fleet_points},
};

/// What the suite is asked to do.
pub struct Params {
    /// Points of each run.
    pub points: usize,
    /// Trackers of each app (and devices of the gRPC paths).
    pub devices: u64,
    /// Clients at once, each on a connection of its own.
    pub clients: usize,
    /// Points of a gRPC batch, for the ceiling.
    pub batch: usize,
    pub writers: usize,
    pub rounds: usize,
}

/// The ways in, each one point a request but the last.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Way {
    Grpc,
    Json,
    OsmAnd,
    OwnTracks,
    GrpcBatch,
    Mqtt,
}

const PATHS: [Way; 6] = [
    Way::Grpc,
    Way::Json,
    Way::OsmAnd,
    Way::OwnTracks,
    Way::Mqtt,
    Way::GrpcBatch,
];

/// Messages published and not yet stored, at most.
const MQTT_WINDOW: usize = 600;

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Grpc => "gRPC WriteLocations, one point",
            Way::Json => "POST /v1/locations, one point",
            Way::OsmAnd => "GET /osmand (Traccar Client), one point",
            Way::OwnTracks => "POST /owntracks, one point",
            Way::GrpcBatch => "gRPC WriteLocations, a batch",
            Way::Mqtt => "OwnTracks over MQTT (QoS 1), rows stored",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Way::Grpc => "grpc",
            Way::Json => "http_json",
            Way::OsmAnd => "osmand",
            Way::OwnTracks => "owntracks",
            Way::GrpcBatch => "grpc_batch",
            Way::Mqtt => "mqtt",
        }
    }

    /// The app_source its points are stored under.
    fn app(self) -> &'static str {
        match self {
            Way::OsmAnd => "fleet",
            Way::OwnTracks | Way::Mqtt => "owntracks",
            _ => "mextrack",
        }
    }
}

struct Run {
    path: Way,
    round: usize,
    points: usize,
    seconds: f64,
    /// locus's CPU seconds during the run.
    cpu: f64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.points as f64 / self.seconds
    }

    fn cpu_per_m(&self) -> f64 {
        self.cpu / self.points as f64 * 1e6
    }
}

pub async fn run(locus: &Path, url: &str, p: Params) -> anyhow::Result<()> {
    let broker_url = std::env::var("LOCUS_BENCH_MQTT_URL")
        .unwrap_or_else(|_| "mqtt://127.0.0.1:1883".to_string());
    let mqtt = Mqtt::new(&broker_url)?;
    let topics = format!("{}/+/+", mqtt.prefix);
    let server = instance(
        locus,
        url,
        p.writers,
        None,
        &[
            "--mqtt-url",
            &broker_url,
            "--mqtt-client-id",
            &mqtt.client_id,
            "--mqtt-topics",
            &topics,
        ],
    )
    .await?;
    register(url, p.devices).await?;
    let mut runs = Vec::new();
    for round in 1..=p.rounds {
        // The order turns each round: a warmer cache or a grown table
        // falls on each path in turn.
        let mut order = PATHS;
        if round % 2 == 0 {
            order.reverse();
        }
        for path in order {
            crate::reset(url).await?;
            let points = fleet_points(path.app(), p.devices, round as u64, per_device(&p), 1.0);
            let n = points.len();
            eprintln!("locus-bench trackers: {} ({n} points) ...", path.name());
            let cpu = crate::cluster::cpu(server.pid);
            let t = Instant::now();
            match path {
                Way::Mqtt => mqtt.send(url, &points, p.devices).await?,
                _ => send(&server, path, points, &p).await?,
            }
            let seconds = t.elapsed().as_secs_f64();
            let cpu = crate::cluster::cpu(server.pid) - cpu;
            let stored = count(url).await?;
            anyhow::ensure!(
                stored == n as i64,
                "{}: {stored} rows stored of {n} points answered",
                path.name()
            );
            runs.push(Run {
                path,
                round,
                points: n,
                seconds,
                cpu,
            });
        }
    }
    stop(server).await;
    print(&p, &runs);
    Ok(())
}

fn per_device(p: &Params) -> usize {
    p.points.div_ceil(p.devices as usize)
}

/// The tracker ids of device `i` of each app.
fn osmand_id(i: usize) -> String {
    format!("353861053{i:06}")
}

fn owntracks_user(i: usize) -> String {
    format!("driver{i}")
}

/// Registers the trackers as `locus token create --tracker-id` does.
async fn register(url: &str, devices: u64) -> anyhow::Result<()> {
    let mut c = PgConnection::connect(url).await?;
    for i in 0..devices as usize {
        let user = uuid::Uuid::from_u128(0x5e2d_0000_0000_4000_8000_0000_0000_0000 + i as u128);
        locus::trackers::registry::register(&mut c, "fleet", &osmand_id(i), user)
            .await
            .context("register an OsmAnd tracker")?;
        let id = format!("{}/phone", owntracks_user(i));
        locus::trackers::registry::register(&mut c, "owntracks", &id, user)
            .await
            .context("register an OwnTracks tracker")?;
    }
    Ok(())
}

async fn count(url: &str) -> anyhow::Result<i64> {
    let mut c = PgConnection::connect(url).await?;
    Ok(sqlx::query_scalar("SELECT count(*) FROM location_events")
        .fetch_one(&mut c)
        .await?)
}

/// The device index of `points[k]`: `fleet_points` lists one point of
/// each device in turn.
fn device_of(k: usize, devices: u64) -> usize {
    k % devices as usize
}

/// Sends every point of `points` by `path` from `p.clients` clients, each
/// taking the next point not yet taken.
async fn send(
    server: &locus_load::proc::Locus,
    path: Way,
    points: Vec<Location>,
    p: &Params,
) -> anyhow::Result<()> {
    let unit = if path == Way::GrpcBatch { p.batch } else { 1 };
    let points = Arc::new(points);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..p.clients {
        let (points, next, devices) = (points.clone(), next.clone(), p.devices);
        let mut client = Client::connect(server, path).await?;
        tasks.spawn(async move {
            loop {
                let k = next.fetch_add(unit, Relaxed);
                if k >= points.len() {
                    return anyhow::Ok(());
                }
                let end = (k + unit).min(points.len());
                client.send(k, &points[k..end], devices).await?;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

enum Client {
    Grpc(IngestClient<tonic::transport::Channel>),
    Http(reqwest::Client, String, Way),
}

impl Client {
    async fn connect(server: &locus_load::proc::Locus, path: Way) -> anyhow::Result<Client> {
        Ok(match path {
            Way::Grpc | Way::GrpcBatch => {
                Client::Grpc(IngestClient::new(dial(&server.grpc_target()).await?))
            }
            _ => Client::Http(
                // One connection a client, kept, as a phone keeps its own.
                reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .tcp_nodelay(true)
                    .build()?,
                format!("http://127.0.0.1:{}", server.http),
                path,
            ),
        })
    }

    async fn send(&mut self, k: usize, points: &[Location], devices: u64) -> anyhow::Result<()> {
        match self {
            Client::Grpc(c) => {
                let ack = c
                    .write_locations(LocationBatch {
                        batch_id: k as u64,
                        locations: points.to_vec(),
                    })
                    .await?
                    .into_inner();
                anyhow::ensure!(
                    ack.accepted as usize == points.len(),
                    "gRPC: {} accepted of {}: {:?}",
                    ack.accepted,
                    points.len(),
                    ack.rejected.first()
                );
            }
            Client::Http(c, base, path) => {
                let l = &points[0];
                let i = device_of(k, devices);
                let request = match path {
                    Way::Json => c
                        .post(format!("{base}/v1/locations"))
                        .json(&json_body(k, l)),
                    Way::OsmAnd => c.get(format!("{base}/osmand")).query(&osmand_query(i, l)),
                    Way::OwnTracks => c
                        .post(format!("{base}/owntracks"))
                        .header("X-Limit-U", owntracks_user(i))
                        .header("X-Limit-D", "phone")
                        .json(&owntracks_body(l)),
                    Way::Grpc | Way::GrpcBatch | Way::Mqtt => {
                        unreachable!("not an HTTP path")
                    }
                };
                let answer = request.send().await?;
                let status = answer.status();
                if !status.is_success() {
                    anyhow::bail!("{}: {status} {}", path.name(), answer.text().await?);
                }
                answer.bytes().await?;
            }
        }
        Ok(())
    }
}

fn time_s(l: &Location) -> f64 {
    let t = l.time.as_ref().map_or((0, 0), |t| (t.seconds, t.nanos));
    t.0 as f64 + t.1 as f64 / 1e9
}

fn json_body(k: usize, l: &Location) -> serde_json::Value {
    let t = l.time.as_ref().map_or((0, 0), |t| (t.seconds, t.nanos));
    let time = chrono::DateTime::from_timestamp(t.0, t.1 as u32).unwrap_or_default();
    json!({"batch_id": k, "locations": [{
        "time": time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "device_id": l.device_id, "user_id": l.user_id, "app_source": l.app_source,
        "latitude": l.latitude, "longitude": l.longitude, "accuracy": l.accuracy,
        "altitude": l.altitude, "speed": l.speed, "heading": l.heading,
        "metadata": {"battery": 80},
    }]})
}

/// Traccar Client's query string: milliseconds, speed in knots.
fn osmand_query(i: usize, l: &Location) -> Vec<(&'static str, String)> {
    let mut q = vec![
        ("id", osmand_id(i)),
        ("timestamp", format!("{}", (time_s(l) * 1e3).round() as i64)),
        ("lat", l.latitude.to_string()),
        ("lon", l.longitude.to_string()),
        ("batt", "80".to_string()),
    ];
    let optional = [
        ("speed", l.speed.map(|s| s / locus::trackers::KMH_PER_KNOT)),
        ("bearing", l.heading),
        ("altitude", l.altitude),
        ("accuracy", l.accuracy),
    ];
    q.extend(
        optional
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?.to_string()))),
    );
    q
}

/// An OwnTracks location: whole seconds (`fleet_points` keeps a device's
/// points a second apart, so none collide).
fn owntracks_body(l: &Location) -> serde_json::Value {
    json!({
        "_type": "location", "tst": time_s(l).floor() as i64, "lat": l.latitude,
        "lon": l.longitude, "vel": l.speed.map(f64::round), "cog": l.heading.map(|h| h.floor() as i64 % 360),
        "acc": l.accuracy.map(f64::round), "alt": l.altitude.map(f64::round),
        "batt": 80, "bs": 1, "tid": "ph", "conn": "m",
    })
}

fn print(p: &Params, runs: &[Run]) {
    println!();
    println!(
        "{} points a run from {} devices (registered trackers for the apps' paths), {} clients at once, \
         each on a connection of its own sending one point and waiting for its answer (a batch of {} \
         for the last path); one instance, {} writers, --auth off; {} rounds, the order turning; the \
         table truncated before each run. Every answer was a success and every point stored. \
         OwnTracks over MQTT: published at QoS 1 to the broker (which answers, not locus), at most \
         {MQTT_WINDOW} ahead of the rows stored; its rate is rows stored a second.",
        runs.first().map_or(0, |r| r.points),
        p.devices,
        p.clients,
        p.batch,
        p.writers,
        p.rounds,
    );
    println!();
    println!("| path | round | points/s | locus CPU s / M points |");
    println!("|---|---:|---:|---:|");
    for r in runs {
        println!(
            "| {} | {} | {:.0} | {:.1} |",
            r.path.name(),
            r.round,
            r.rate(),
            r.cpu_per_m()
        );
    }
    println!();
    let of = |round, path| runs.iter().find(|r| r.round == round && r.path == path);
    for path in [
        Way::Json,
        Way::OsmAnd,
        Way::OwnTracks,
        Way::Mqtt,
        Way::GrpcBatch,
    ] {
        let ratios: Vec<f64> = (1..=p.rounds)
            .filter_map(|round| Some(of(round, path)?.rate() / of(round, Way::Grpc)?.rate()))
            .collect();
        let listed: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
        println!(
            "{}_vs_grpc={:.3} (points/s over gRPC's one point a call; median of rounds {})",
            path.key(),
            median(ratios.into_iter()),
            listed.join(",")
        );
    }
}

/// OwnTracks over MQTT: locus's session (a client id and topics of this
/// run's own) and a publisher.
struct Mqtt {
    host: String,
    port: u16,
    client_id: String,
    prefix: String,
}

impl Mqtt {
    fn new(url: &str) -> anyhow::Result<Mqtt> {
        let b = locus::ingest::mqtt::Broker::parse(url)
            .map_err(|e| anyhow::anyhow!("LOCUS_BENCH_MQTT_URL: {e}"))?;
        let run = uuid::Uuid::new_v4().simple().to_string();
        Ok(Mqtt {
            host: b.host,
            port: b.port,
            client_id: format!("locus-bench-{}", &run[..10]),
            prefix: format!("bench-{}", &run[..10]),
        })
    }

    /// Publishes every point at QoS 1 as `<prefix>/<user>/phone`, at most
    /// `MQTT_WINDOW` ahead of the rows stored, and returns once all are.
    async fn send(&self, url: &str, points: &[Location], devices: u64) -> anyhow::Result<()> {
        let mut o = rumqttc::MqttOptions::new(
            format!("{}-pub", self.client_id),
            self.host.clone(),
            self.port,
        );
        o.set_keep_alive(std::time::Duration::from_secs(10))
            .set_inflight(200);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 1_000);
        let polling = tokio::spawn(async move {
            loop {
                if let Err(e) = eventloop.poll().await {
                    eprintln!("locus-bench trackers: MQTT publisher: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
        });
        let mut db = PgConnection::connect(url).await?;
        let started = Instant::now();
        let (mut published, mut stored) = (0usize, 0usize);
        while stored < points.len() {
            anyhow::ensure!(
                started.elapsed() < std::time::Duration::from_secs(600),
                "MQTT: {stored} of {} points stored after 10 minutes",
                points.len()
            );
            while published < points.len() && published < stored + MQTT_WINDOW {
                let l = &points[published];
                let topic = format!(
                    "{}/{}/phone",
                    self.prefix,
                    owntracks_user(device_of(published, devices))
                );
                client
                    .publish(
                        topic,
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        owntracks_body(l).to_string(),
                    )
                    .await?;
                published += 1;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            stored = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM location_events")
                .fetch_one(&mut db)
                .await? as usize;
        }
        let _ = client.disconnect().await;
        polling.abort();
        Ok(())
    }
}
