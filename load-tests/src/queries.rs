//! The queries suite of `locus-bench`: query latency while ingest runs at
//! about half its maximum, and ingest throughput with and without 200 live
//! subscribers.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use locus::{
    codec::count_field,
    proto::{
        BoundingBox, GetHourlyStatsRequest, GetLatestRequest, GetTrackRequest, Location,
        LocationBatch, SubscribeRequest, get_hourly_stats_request::Key,
        ingest_client::IngestClient, query_client::QueryClient,
    },
};
use locus_load::{
    fleet::Device,
    proc::Locus,
    raw_calls::{call_encoded, call_raw, stream_raw},
};
use prost::Message;
use sqlx::{Connection, PgConnection};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

pub(crate) fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

pub(crate) fn ts(us: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: (us.rem_euclid(1_000_000) * 1000) as i32,
    })
}

pub(crate) async fn dial(target: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(target.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

/// Runs `work` on a thread and a runtime of its own, as a dashboard is a
/// process apart from the devices: a measured answer never waits for a
/// worker of the runtime that drives the ingest streams (the benchmark's
/// own load, not locus's time).
pub(crate) async fn apart<T, Fut>(work: impl FnOnce() -> Fut + Send + 'static) -> anyhow::Result<T>
where
    Fut: Future<Output = anyhow::Result<T>>,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(work())
    })
    .await?
}

/// `n` calls, timed as `timed` does, by a client of their own (`apart`):
/// each call is handed a clone of its channel.
async fn timed_apart<F, Fut>(target: &str, n: usize, mut call: F) -> anyhow::Result<(f64, f64)>
where
    F: FnMut(Channel) -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let target = target.to_string();
    apart(move || async move {
        let channel = dial(&target).await?;
        timed(n, || call(channel.clone())).await
    })
    .await
}

/// Sends `batches` over `streams` streams, each keeping 8 unacknowledged;
/// paced to `rate` points/s overall when given. Once `stop` is set, a
/// stream ends after 2 s without an acknowledgement. Returns points
/// acknowledged.
pub(crate) async fn ingest(
    channel: Channel,
    batches: Vec<LocationBatch>,
    streams: usize,
    rate: Option<u64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<u64> {
    let batches = Arc::new(batches);
    let acked = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..streams {
        let (channel, batches, acked, stop) = (
            channel.clone(),
            batches.clone(),
            acked.clone(),
            stop.clone(),
        );
        tasks.spawn(async move {
            let mine: Vec<LocationBatch> =
                batches.iter().skip(s).step_by(streams).cloned().collect();
            let expected = mine.len();
            let per_batch = mine.first().map_or(1, |b| b.locations.len()) as f64;
            let mut pace = rate.map(|r| {
                let mut i = tokio::time::interval(Duration::from_secs_f64(
                    per_batch * streams as f64 / r as f64,
                ));
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                i
            });
            let (tx, rx) = mpsc::channel(8);
            let mut acks = IngestClient::new(channel)
                .stream_locations(ReceiverStream::new(rx))
                .await?
                .into_inner();
            let stopped = stop.clone();
            let sender = tokio::spawn(async move {
                for b in mine {
                    if let Some(p) = pace.as_mut() {
                        p.tick().await;
                    }
                    if stop.load(Relaxed) || tx.send(b).await.is_err() {
                        break;
                    }
                }
                std::future::pending::<()>().await;
            });
            let mut got = 0;
            while got < expected {
                match tokio::time::timeout(Duration::from_secs(2), acks.message()).await {
                    Ok(Ok(Some(ack))) => {
                        acked.fetch_add(u64::from(ack.accepted + ack.duplicates), Relaxed);
                        got += 1;
                    }
                    Ok(_) => anyhow::bail!("stream ended"),
                    // Stopped early. (Not before: flat out, 50 streams of 8
                    // batches of 500 wait some 2 s for their acks.)
                    Err(_) if stopped.load(Relaxed) => break,
                    Err(_) => {}
                }
            }
            sender.abort();
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(acked.load(Relaxed))
}

/// `n` points each from `devices` of `app`, one every `every_s` seconds,
/// ending now.
pub(crate) fn fleet_points(
    app: &str,
    devices: u64,
    seed: u64,
    n: usize,
    every_s: f64,
) -> Vec<Location> {
    let interval_us = (every_s * 1e6) as i64;
    let start = now_us() - n as i64 * interval_us - 120_000_000;
    let mut fleet: Vec<Device> = (0..devices)
        .map(|i| Device::new(i, seed, app, start, interval_us))
        .collect();
    let mut out = Vec::with_capacity(devices as usize * n);
    for _ in 0..n {
        for d in fleet.iter_mut() {
            out.push(d.next_point());
        }
    }
    out
}

pub(crate) fn batches(points: Vec<Location>, size: usize) -> Vec<LocationBatch> {
    points
        .chunks(size)
        .enumerate()
        .map(|(i, c)| LocationBatch {
            batch_id: i as u64,
            locations: c.to_vec(),
        })
        .collect()
}

pub(crate) fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}

async fn timed<F, Fut>(n: usize, mut f: F) -> anyhow::Result<(f64, f64)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(p50_p99(ms))
}

/// `GetTrackResponse` and `GetLatestResponse` (the same fields) as prost
/// derives them, as a client generated from the proto decodes them in one
/// pass (locus maps both to its own `LocationPage`).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ProstPage {
    #[prost(message, repeated, tag = "1")]
    pub locations: Vec<Location>,
    #[prost(string, tag = "2")]
    pub next_cursor: String,
}

pub(crate) fn p50_p99(ms: Vec<f64>) -> (f64, f64) {
    (percentile(ms.clone(), 0.5), percentile(ms, 0.99))
}

/// Cumulative counts of locus's `locus_query_duration_seconds` buckets for
/// `rpc`, by upper bound in ms: locus's own time to answer, from the call's
/// arrival to its answer (not the transport, not the client).
async fn handler_buckets(server: &Locus, rpc: &str) -> Vec<(f64, u64)> {
    let text = server.metrics().await.unwrap_or_default();
    let prefix =
        format!("locus_query_duration_seconds_bucket{{rpc=\"{rpc}\",transport=\"grpc\",le=\"");
    text.lines()
        .filter_map(|l| {
            let (le, count) = l.strip_prefix(&prefix)?.split_once("\"} ")?;
            let le = match le {
                "+Inf" => f64::INFINITY,
                le => le.parse::<f64>().ok()? * 1000.0,
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The smallest bucket bound, in ms, under which at least 99% of the calls
/// counted between `before` and `after` were answered.
fn p99_bound(before: &[(f64, u64)], after: &[(f64, u64)]) -> f64 {
    let counted = |le: f64, v: &[(f64, u64)]| v.iter().find(|b| b.0 == le).map_or(0, |b| b.1);
    let total = counted(f64::INFINITY, after) - counted(f64::INFINITY, before);
    after
        .iter()
        .find(|(le, n)| (n - counted(*le, before)) as f64 >= 0.99 * total as f64)
        .map_or(f64::NAN, |b| b.0)
}

/// The app_source of the 10,000 devices whose latest positions are asked
/// for: a fleet map of its own.
const FLEET_MAP: &str = "fleetmap";

/// Points/s, points, and CPU seconds of locus, PostgreSQL and this process.
type Run = (f64, f64, [f64; 3]);

fn add(a: Run, b: Run) -> Run {
    (
        a.0 + b.0,
        a.1 + b.1,
        std::array::from_fn(|i| a.2[i] + b.2[i]),
    )
}

/// The processes a run's CPU seconds are counted of: locus, PostgreSQL and
/// this benchmark's own clients (the ingest streams, and the subscribers
/// when they run).
#[derive(Clone, Copy)]
struct Cpu {
    locus: u32,
    postmaster: u32,
}

impl Cpu {
    /// CPU seconds so far of each.
    fn seconds(self) -> [f64; 3] {
        let own = |p| locus_load::proc::proc_times(p).map_or(0.0, |t| t.0);
        [
            own(self.locus),
            locus_load::proc::pg_cpu(self.postmaster),
            own(std::process::id()),
        ]
    }
}

/// Full ingest as devices send it: 300,000 points of 1,000 devices over 50
/// streams, on `channel`, the devices' own.
async fn full_ingest(
    channel: &Channel,
    cpu: Cpu,
    no_stop: &Arc<AtomicBool>,
    seed: u64,
) -> anyhow::Result<Run> {
    let (t, before) = (Instant::now(), cpu.seconds());
    let points = batches(fleet_points("mextrack", 1_000, seed, 300, 1.0), 500);
    let n = ingest(channel.clone(), points, 50, None, no_stop.clone()).await? as f64;
    let after = cpu.seconds();
    Ok((
        n / t.elapsed().as_secs_f64(),
        n,
        std::array::from_fn(|i| after[i] - before[i]),
    ))
}

pub async fn run(
    locus: &std::path::Path,
    url: &str,
    writers: usize,
    half_rate: Option<u64>,
    rounds: usize,
) -> anyhow::Result<()> {
    let (mut server, pid, target) = crate::start_locus(locus, url, writers, None).await?;
    let cpu = Cpu {
        locus: pid,
        postmaster: locus_load::proc::postmaster(url).await?,
    };
    // Devices and dashboards are different clients: ingest and queries each
    // get their own connections, so an answer does not queue behind ingest
    // frames on one HTTP/2 connection.
    let channel = dial(&target).await?;
    let no_stop = Arc::new(AtomicBool::new(false));

    let data = load(&channel, &no_stop, url).await?;
    // Ingest at half the maximum, in the background, while querying: the
    // maximum as measured now, on this hour of the machine, unless given.
    let (half_rate, maximum) = match half_rate {
        Some(r) => (r, None),
        None => {
            let max = full_ingest(&channel, cpu, &no_stop, 6).await?.0;
            ((max / 2.0) as u64, Some(max))
        }
    };
    let queries = query_under_ingest(&server, &target, &channel, data, half_rate).await?;
    let live = live_rounds(&target, &channel, cpu, &no_stop, rounds).await?;
    let _ = server.child.start_kill();
    let _ = server.child.wait().await;

    let kept = match maximum {
        Some(max) => {
            format!("half of the {max:.0} points/s measured first (300,000 points over 50 streams)")
        }
        None => "--half-rate".to_string(),
    };
    print_queries(&queries, half_rate, &kept);
    print_live(&live, rounds);
    Ok(())
}

/// What the queries read: where each kind of query finds its rows.
struct Data {
    /// 10,000 devices of [`FLEET_MAP`], one position each.
    ids: Vec<String>,
    /// One device's day, one point every 10 s, and its span in µs.
    day_device: String,
    day_from: i64,
    day_to: i64,
    /// The device with 30 days of hourly rows.
    stats_device: uuid::Uuid,
}

/// Writes the data the queries read.
async fn load(channel: &Channel, no_stop: &Arc<AtomicBool>, url: &str) -> anyhow::Result<Data> {
    eprintln!(
        "locus-bench queries: loading 10,000 devices, one device's day, 30 days of hourly rows ..."
    );
    let latest_fleet = fleet_points(FLEET_MAP, 10_000, 7, 1, 1.0);
    let ids: Vec<String> = latest_fleet.iter().map(|l| l.device_id.clone()).collect();
    ingest(
        channel.clone(),
        batches(latest_fleet, 500),
        8,
        None,
        no_stop.clone(),
    )
    .await?;
    let day = fleet_points("mextrack", 1, 8, 8_640, 10.0);
    let (day_device, day_from, day_to) = (
        day[0].device_id.clone(),
        day[0].time.map_or(0, |t| t.seconds * 1_000_000),
        now_us(),
    );
    ingest(
        channel.clone(),
        batches(day, 1_000),
        1,
        None,
        no_stop.clone(),
    )
    .await?;
    // Hourly rows of one device for 30 days, written directly: the query
    // reads location_hourly alone, however its rows got there.
    let stats_device = uuid::Uuid::new_v4();
    let mut c = PgConnection::connect(url).await?;
    sqlx::query(
        "INSERT INTO location_hourly (hour, device_id, user_id, app_source, point_count, avg_latitude, avg_longitude,
             avg_speed, max_speed, first_event, last_event, min_latitude, max_latitude, min_longitude, max_longitude)
         SELECT h, $1, $1, 'mextrack', 360, 19.4, -99.1, 30, 80, h, h + interval '59 minutes', 19.3, 19.5, -99.2, -99.0
         FROM generate_series(date_trunc('hour', now()) - interval '30 days', date_trunc('hour', now()), interval '1 hour') h",
    )
    .bind(stats_device)
    .execute(&mut c)
    .await?;
    drop(c);
    Ok(Data {
        ids,
        day_device,
        day_from,
        day_to,
        stats_device,
    })
}

/// One row of the table of queries.
struct Row {
    name: &'static str,
    calls: usize,
    /// p50 and p99 ms, to the answer decoded.
    decoded: (f64, f64),
    /// p50 and p99 ms, to the answer received (GetLatest only).
    received: Option<(f64, f64)>,
    /// locus's own p99: the bucket bound, in ms.
    own: f64,
    /// The p99 wanted, in ms.
    target: Option<u32>,
}

/// The queries' answers, timed while ingest runs in the background.
struct Queries {
    rows: Vec<Row>,
    /// Points ingested in the background, over the seconds of the queries.
    during: u64,
    querying: f64,
}

/// Times each query while ingest is kept at `half_rate` points/s on
/// `channel` (the devices' connection; the queries open their own).
async fn query_under_ingest(
    server: &Locus,
    target: &str,
    channel: &Channel,
    data: Data,
    half_rate: u64,
) -> anyhow::Result<Queries> {
    let stop = Arc::new(AtomicBool::new(false));
    // 1.5 M points: at the default rate, more than the queries take.
    let background = batches(fleet_points("mextrack", 1_000, 9, 1_500, 1.0), 500);
    let querying = Instant::now();
    let ingesting = tokio::spawn(ingest(
        channel.clone(),
        background,
        20,
        Some(half_rate),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut rows = latest_rows(server, target, data.ids).await?;
    rows.push(track_row(server, target, data.day_device, data.day_from, data.day_to).await?);
    rows.push(stats_row(server, target, data.stats_device).await?);
    stop.store(true, Relaxed);
    let querying = querying.elapsed().as_secs_f64();
    let during = ingesting.await??;
    eprintln!(
        "locus-bench queries: {during} points ingested in the background over the {querying:.1} s of queries ({:.0} points/s)",
        during as f64 / querying
    );
    Ok(Queries {
        rows,
        during,
        querying,
    })
}

/// 200 calls of `req`, each answered with `want` positions, each timed
/// twice: to the answer's bytes received, and to it decoded into prost's
/// types in one pass, as a client generated from the proto does. The
/// request is encoded once, as a map that polls would keep it. Returns the
/// p50 and p99 of each, decoded first.
async fn latest_calls(
    target: &str,
    req: GetLatestRequest,
    want: usize,
) -> anyhow::Result<((f64, f64), (f64, f64))> {
    let encoded = Bytes::from(req.encode_to_vec());
    let target = target.to_string();
    apart(move || async move {
        let channel = dial(&target).await?;
        let (mut received, mut decoded) = (Vec::new(), Vec::new());
        for _ in 0..200 {
            let t = Instant::now();
            let answer = call_raw(
                channel.clone(),
                "/locus.v1.Query/GetLatest",
                tonic::Request::new(encoded.clone()),
            )
            .await?
            .into_inner();
            received.push(t.elapsed().as_secs_f64() * 1000.0);
            let page = ProstPage::decode(answer)?;
            decoded.push(t.elapsed().as_secs_f64() * 1000.0);
            let n = page.locations.len();
            anyhow::ensure!(n == want, "{n} latest positions, not {want}");
            anyhow::ensure!(page.next_cursor.is_empty(), "a page of all {want}");
        }
        anyhow::Ok((p50_p99(decoded), p50_p99(received)))
    })
    .await
}

/// GetLatest for one device, for the 10,000 by id, and for the app's 10,000
/// as one page.
async fn latest_rows(server: &Locus, target: &str, ids: Vec<String>) -> anyhow::Result<Vec<Row>> {
    let before = handler_buckets(server, "GetLatest").await;
    // The floor: the same call for one device, a 200-byte answer. What it
    // takes at p99 is this machine's, under this load, for any call.
    let (one, one_received) = latest_calls(
        target,
        GetLatestRequest {
            device_ids: ids[..1].to_vec(),
            app_source: FLEET_MAP.into(),
            ..Default::default()
        },
        1,
    )
    .await?;
    let after_one = handler_buckets(server, "GetLatest").await;
    let (latest, latest_received) = latest_calls(
        target,
        GetLatestRequest {
            device_ids: ids,
            app_source: FLEET_MAP.into(),
            ..Default::default()
        },
        10_000,
    )
    .await?;
    let after_ids = handler_buckets(server, "GetLatest").await;
    // The app's 10,000 devices as one page of the most a page may hold.
    let (latest_app, latest_app_received) = latest_calls(
        target,
        GetLatestRequest {
            app_source: FLEET_MAP.into(),
            limit: 10_000,
            ..Default::default()
        },
        10_000,
    )
    .await?;
    let after_app = handler_buckets(server, "GetLatest").await;
    Ok(vec![
        Row {
            name: "GetLatest, one device by id (the floor)",
            calls: 200,
            decoded: one,
            received: Some(one_received),
            own: p99_bound(&before, &after_one),
            target: None,
        },
        Row {
            name: "GetLatest, 10,000 devices by id",
            calls: 200,
            decoded: latest,
            received: Some(latest_received),
            own: p99_bound(&after_one, &after_ids),
            target: Some(5),
        },
        Row {
            name: "GetLatest, an app_source's 10,000 devices as one page",
            calls: 200,
            decoded: latest_app,
            received: Some(latest_app_received),
            own: p99_bound(&after_ids, &after_app),
            target: Some(5),
        },
    ])
}

/// GetTrack of one device's day, 50 calls.
async fn track_row(
    server: &Locus,
    target: &str,
    device: String,
    from_us: i64,
    to_us: i64,
) -> anyhow::Result<Row> {
    let before = handler_buckets(server, "GetTrack").await;
    // Decoded in one pass into prost's own types, as a client generated
    // from the proto does (locus's `LocationPage` would copy each location
    // out of the receive buffer first).
    let track_req = Bytes::from(
        GetTrackRequest {
            device_id: device,
            app_source: "mextrack".into(),
            from: ts(from_us),
            to: ts(to_us),
            limit: 10_000,
            cursor: String::new(),
        }
        .encode_to_vec(),
    );
    let track = timed_apart(target, 50, move |channel| {
        let req = tonic::Request::new(track_req.clone());
        async move {
            let answer =
                call_encoded::<ProstPage>(channel, "/locus.v1.Query/GetTrack", req).await?;
            let n = answer.into_inner().locations.len();
            anyhow::ensure!(n == 8_640, "{n} track points");
            Ok(())
        }
    })
    .await?;
    Ok(Row {
        name: "GetTrack, one day (8,640 points)",
        calls: 50,
        decoded: track,
        received: None,
        own: p99_bound(&before, &handler_buckets(server, "GetTrack").await),
        target: Some(50),
    })
}

/// GetHourlyStats of 30 days of one device, 200 calls.
async fn stats_row(server: &Locus, target: &str, device: uuid::Uuid) -> anyhow::Result<Row> {
    let before = handler_buckets(server, "GetHourlyStats").await;
    let stats = timed_apart(target, 200, move |channel| {
        let req = GetHourlyStatsRequest {
            key: Some(Key::DeviceId(device.to_string())),
            app_source: "mextrack".into(),
            from: ts(now_us() - 30 * 86_400_000_000),
            to: ts(now_us()),
        };
        async move {
            let mut q = QueryClient::new(channel);
            let n = q.get_hourly_stats(req).await?.into_inner().hours.len();
            anyhow::ensure!(n >= 719, "{n} hours");
            Ok(())
        }
    })
    .await?;
    Ok(Row {
        name: "GetHourlyStats, 30 days of one device",
        calls: 200,
        decoded: stats,
        received: None,
        own: p99_bound(&before, &handler_buckets(server, "GetHourlyStats").await),
        target: Some(50),
    })
}

/// What the live subscribers were sent.
#[derive(Default)]
struct Feed {
    received: AtomicU64,
    updates: AtomicU64,
    malformed: AtomicU64,
}

/// Opens 200 live subscriptions, each watching a small box of the fleet's
/// area, as a map view does; each counts what it is sent into `feed`.
async fn subscribe(
    target: &str,
    feed: &Arc<Feed>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut subs = Vec::new();
    for i in 0..200 {
        let lat = 19.2 + (i % 20) as f64 * 0.025;
        let lon = -99.4 + (i / 20) as f64 * 0.05;
        let bbox = BoundingBox {
            min_latitude: lat,
            max_latitude: lat + 0.05,
            min_longitude: lon,
            max_longitude: lon + 0.1,
        };
        // Each update is taken as its bytes and its locations are
        // counted from the fields' keys, neither copied nor decoded:
        // these clients share the machine's two cores with the service
        // and PostgreSQL, and what is measured is what serving them
        // costs ingest. (tests/query.rs decodes what the feed sends.)
        let mut stream = stream_raw(
            dial(target).await?,
            "/locus.v1.Query/Subscribe",
            tonic::Request::new(SubscribeRequest {
                app_source: String::new(),
                device_ids: vec![],
                bbox: Some(bbox),
            }),
        )
        .await?
        .into_inner();
        let feed = feed.clone();
        subs.push(tokio::spawn(async move {
            while let Ok(Some(update)) = stream.message().await {
                match count_field(&update, 1) {
                    Some(n) => feed.received.fetch_add(n as u64, Relaxed),
                    None => feed.malformed.fetch_add(1, Relaxed),
                };
                feed.updates.fetch_add(1, Relaxed);
            }
        }));
    }
    Ok(subs)
}

/// Full ingest without and with the live subscribers, summed over the rounds.
struct Live {
    without: Run,
    with: Run,
    /// Each round's points/s with over without.
    ratios: Vec<f64>,
    feed: Arc<Feed>,
}

/// Full ingest without and with 200 live subscribers, in rounds of without,
/// with, with, without: the table grows run by run, and this order cancels
/// that drift out of each round's ratio; the rounds are because a run is
/// seconds long, and one says little on this machine.
async fn live_rounds(
    target: &str,
    channel: &Channel,
    cpu: Cpu,
    no_stop: &Arc<AtomicBool>,
    rounds: usize,
) -> anyhow::Result<Live> {
    let feed = Arc::new(Feed::default());
    let rate = async |seed| full_ingest(channel, cpu, no_stop, seed).await;
    let zero: Run = (0.0, 0.0, [0.0; 3]);
    let (mut without, mut with) = (zero, zero);
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let seed = 10 + 4 * round as u64;
        let before = rate(seed).await?;
        let subs = subscribe(target, &feed).await?;
        let during = add(rate(seed + 1).await?, rate(seed + 2).await?);
        // What is still on its way (an update waits up to --live-interval)
        // is counted before the subscribers go: until a second passes with
        // none.
        loop {
            let seen = feed.received.load(Relaxed);
            tokio::time::sleep(Duration::from_secs(1)).await;
            if feed.received.load(Relaxed) == seen {
                break;
            }
        }
        subs.iter().for_each(|s| s.abort());
        let after = add(before, rate(seed + 3).await?);
        ratios.push(during.0 / after.0);
        without = add(without, after);
        with = add(with, during);
    }
    let malformed = feed.malformed.load(Relaxed);
    anyhow::ensure!(malformed == 0, "{malformed} live updates did not scan");
    Ok(Live {
        without,
        with,
        ratios,
        feed,
    })
}

/// The table of queries; `kept` says where `half_rate` came from.
fn print_queries(q: &Queries, half_rate: u64, kept: &str) {
    println!();
    println!(
        "Queries, while ingest is kept at {half_rate} points/s ({kept}); it reached {:.0} points/s:",
        q.during as f64 / q.querying
    );
    println!();
    println!(
        "p50 and p99: the client's, from sending the call to the answer decoded. For GetLatest also to the answer \
         received, before its locations are decoded (the client's decoding shares the two cores). locus's own \
         p99: the bucket of locus_query_duration_seconds (the handler, without transport) holding 99% of the calls."
    );
    println!();
    println!(
        "| query | calls | p50 ms | p99 ms | received, p50 / p99 ms | locus's own p99 | target p99 |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for row in &q.rows {
        let Row {
            name,
            calls,
            decoded: (p50, p99),
            own,
            ..
        } = row;
        let received = row
            .received
            .map_or("".to_string(), |(a, b)| format!("{a:.2} / {b:.2}"));
        let target = row.target.map_or("none".to_string(), |t| format!("{t} ms"));
        println!(
            "| {name} | {calls} | {p50:.2} | {p99:.2} | {received} | at most {own} ms | {target} |"
        );
    }
}

/// Full ingest's points/s without and with the subscribers, and its CPU
/// seconds per million points.
fn print_live(live: &Live, rounds: usize) {
    let Live {
        without,
        with,
        ratios,
        feed,
    } = live;
    // CPU seconds per million points ingested, by process.
    let per_m = |r: &Run, i: usize| r.2[i] / (r.1 / 1e6);
    println!();
    println!(
        "Full ingest, 300,000 points over 50 streams, {rounds} rounds of four runs (without, with, with, without): \
         {:.0} points/s without live subscribers, {:.0} with 200 (they received {} points in {} updates); \
         ratio {:.3} (target at least 0.9); by round {}",
        without.0 / (2 * rounds) as f64,
        with.0 / (2 * rounds) as f64,
        feed.received.load(Relaxed),
        feed.updates.load(Relaxed),
        with.0 / without.0,
        ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "CPU s per million points ingested, without / with the subscribers: locus {:.2} / {:.2}, \
         PostgreSQL {:.2} / {:.2}, this benchmark's clients {:.2} / {:.2}",
        per_m(without, 0),
        per_m(with, 0),
        per_m(without, 1),
        per_m(with, 1),
        per_m(without, 2),
        per_m(with, 2),
    );
    println!("live_subscribers_ingest_ratio={:.3}", with.0 / without.0);
}
