//! `locus-bench --suite cluster`: cluster mode (`--nats-url`) measured side
//! by side in one run, on one database and a nats-server of the suite's
//! own: full ingest through two clustered instances (each taking half the
//! client's streams) against one; how soon a point committed through one
//! instance is in the other's GetLatest and live feed, with ingest idle and
//! at half the maximum; and the CPU cluster mode adds to an instance (one
//! instance with `--nats-url` against one without, under the same load).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use locus::proto::{
    GetLatestRequest, Location, LocationBatch, SubscribeRequest, ingest_client::IngestClient,
    query_client::QueryClient,
};
use locus_load::{
    fleet::Device,
    proc::{Locus, free_port, pg_cpu, postmaster, proc_times},
};
use tonic::transport::Channel;

use crate::queries::{apart, batches, dial, fleet_points, ingest, now_us, percentile, ts};

/// The app_source of the probes, apart from the fleet's.
const PROBE_APP: &str = "probe";
/// Devices the probes cycle through.
const PROBE_DEVICES: u64 = 50;
/// A probe is written every this often.
const PROBE_EVERY: Duration = Duration::from_millis(40);
/// GetLatest on the other instance is asked again after this.
const POLL_EVERY: Duration = Duration::from_millis(5);
/// A probe not seen by then is counted as never seen.
const GIVE_UP: Duration = Duration::from_secs(10);
/// The stream's bound, so that the store in the temporary directory stays
/// small (the default is 1 GiB).
const STREAM_BYTES: &str = "268435456";

/// What the suite is asked to do.
pub struct Params {
    /// Points of each full-ingest run, from `devices` devices.
    pub rows: usize,
    pub devices: u64,
    /// gRPC streams of a run, half on each of two connections.
    pub streams: usize,
    /// Points a LocationBatch.
    pub batch: usize,
    /// `--writers` of each instance.
    pub writers: usize,
    pub rounds: usize,
    pub probes: usize,
    /// The ingest rate kept up while probing; half the maximum measured
    /// first when not given.
    pub half_rate: Option<u64>,
}

/// A `nats-server -js` on a free port, its store in a temporary directory
/// removed when it is dropped.
pub(crate) struct OwnNats {
    child: tokio::process::Child,
    pid: u32,
    port: u16,
    dir: PathBuf,
}

impl OwnNats {
    pub(crate) async fn start() -> anyhow::Result<OwnNats> {
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("locus-bench-nats-{port}"));
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(
            std::env::temp_dir().join(format!("locus-bench-nats-{port}.log")),
        )?;
        let child = tokio::process::Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("start nats-server (Debian: apt-get install nats-server)")?;
        let pid = child.id().context("nats-server's pid")?;
        let nats = OwnNats {
            child,
            pid,
            port,
            dir,
        };
        let t = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(10),
                "nats-server did not listen on {port} within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(nats)
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `locus serve` with `writers` writers, clustered through `nats` when
/// given, with `more` flags.
pub(crate) async fn instance(
    locus: &Path,
    url: &str,
    writers: usize,
    nats: Option<&str>,
    more: &[&str],
) -> anyhow::Result<Locus> {
    let mut args = vec![
        "--writers".to_string(),
        writers.to_string(),
        "--db-pool-size".to_string(),
        (writers + 4).to_string(),
    ];
    if let Some(nats) = nats {
        args.extend(["--nats-url", nats, "--nats-max-bytes", STREAM_BYTES].map(str::to_string));
    }
    args.extend(more.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Locus::start(locus, url, &args).await
}

pub(crate) async fn stop(mut server: Locus) {
    let _ = server.child.start_kill();
    let _ = server.child.wait().await;
}

/// The cases of full ingest.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Case {
    /// One instance without `--nats-url`.
    Plain,
    /// One instance with `--nats-url`, alone on the stream.
    Clustered,
    /// Two instances with `--nats-url`, half the streams on each.
    Two,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Plain => "one instance, no --nats-url",
            Case::Clustered => "one instance, --nats-url",
            Case::Two => "two instances, --nats-url, half the streams each",
        }
    }
}

/// One full-ingest run.
struct Run {
    case: Case,
    round: usize,
    points: u64,
    seconds: f64,
    /// CPU seconds of each instance that took points.
    locus: Vec<f64>,
    nats: f64,
    pg: f64,
    /// This benchmark's own (the client's streams).
    client: f64,
    /// Clustered: seconds from the last acknowledgement until every point
    /// committed was published and applied by the other instance, and the
    /// points dropped instead (past the publish buffer).
    settled: Option<(f64, f64)>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.points as f64 / self.seconds
    }

    /// CPU seconds per million points.
    fn per_m(&self, cpu: f64) -> f64 {
        cpu / self.points as f64 * 1e6
    }

    fn locus_per_m(&self) -> f64 {
        self.per_m(self.locus.iter().sum())
    }
}

pub(crate) fn cpu(pid: u32) -> f64 {
    proc_times(pid).map_or(0.0, |t| t.0)
}

/// CPU seconds so far of the instances, NATS, PostgreSQL and this process.
fn snapshot(instances: &[u32], nats: u32, postmaster: u32) -> (Vec<f64>, f64, f64, f64) {
    (
        instances.iter().map(|&p| cpu(p)).collect(),
        cpu(nats),
        pg_cpu(postmaster),
        cpu(std::process::id()),
    )
}

/// The sum of the lines of a counter or gauge `name` in /metrics' `text`.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Of each instance: points accepted, published, not published (dropped
/// past the publish buffer), and applied from the others.
async fn counters(instances: &[&Locus]) -> anyhow::Result<Vec<[f64; 4]>> {
    let mut out = Vec::new();
    for i in instances {
        let text = i.metrics().await?;
        out.push(
            [
                "locus_points_accepted_total",
                "locus_cluster_published_points_total",
                "locus_cluster_unpublished_points_total",
                "locus_cluster_applied_points_total",
            ]
            .map(|name| metric(&text, name)),
        );
    }
    Ok(out)
}

/// Waits until each of `instances` published (or dropped) every point it
/// accepted since `before`, and, with two, each applied what the other
/// published; returns the seconds waited and the points dropped (`None`
/// without instances).
async fn settle(instances: &[&Locus], before: &[[f64; 4]]) -> anyhow::Result<Option<(f64, f64)>> {
    if instances.is_empty() {
        return Ok(None);
    }
    let t = Instant::now();
    loop {
        let now = counters(instances).await?;
        let d: Vec<[f64; 4]> = now
            .iter()
            .zip(before)
            .map(|(n, b)| std::array::from_fn(|k| n[k] - b[k]))
            .collect();
        let published = d.iter().all(|[acc, publ, unpubl, _]| publ + unpubl >= *acc);
        let applied = instances.len() < 2
            || d.iter().map(|x| x[3]).sum::<f64>() >= d.iter().map(|x| x[1]).sum::<f64>();
        if published && applied {
            let dropped: f64 = d.iter().map(|x| x[2]).sum();
            return Ok(Some((t.elapsed().as_secs_f64(), dropped)));
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(60),
            "cluster mode did not settle within 60 s of the last acknowledgement: {d:?} (accepted, published, unpublished, applied since the run began)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `points` as `batch`-point batches over `streams` streams, half on
/// a connection to each of `targets` (the same instance twice, or two), as
/// fast as they are acknowledged; each half paced to `rate / 2` when given.
/// Returns the points acknowledged.
async fn split_ingest(
    targets: [&Locus; 2],
    points: Vec<Location>,
    batch: usize,
    streams: usize,
    rate: Option<u64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<u64> {
    let all = batches(points, batch);
    let halves: [Vec<LocationBatch>; 2] =
        std::array::from_fn(|h| all.iter().skip(h).step_by(2).cloned().collect());
    drop(all);
    let [first, second] = halves;
    let (c0, c1) = (
        dial(&targets[0].grpc_target()).await?,
        dial(&targets[1].grpc_target()).await?,
    );
    let half_streams = (streams / 2).max(1);
    let half_rate = rate.map(|r| (r / 2).max(1));
    let (n0, n1) = tokio::try_join!(
        ingest(c0, first, half_streams, half_rate, stop.clone()),
        ingest(c1, second, half_streams, half_rate, stop),
    )?;
    Ok(n0 + n1)
}

/// Full ingest of `p.rows` points in `case`, timed; the table emptied
/// first, as the ingest suite does. `b` is started for the two-instance
/// case and stopped after it, so that the one-instance cases have the
/// stream to themselves.
#[allow(clippy::too_many_arguments)]
async fn full_ingest(
    p: &Params,
    locus: &Path,
    url: &str,
    (plain, clustered, nats): (&Locus, &Locus, &OwnNats),
    postmaster: u32,
    case: Case,
    round: usize,
    seed: u64,
) -> anyhow::Result<Run> {
    let per_device = p.rows.div_ceil(p.devices as usize);
    let points = fleet_points("mextrack", p.devices, seed, per_device, 1.0);
    let expected = points.len() as u64;
    crate::reset(url).await?;
    let other = match case {
        Case::Two => Some(instance(locus, url, p.writers, Some(&nats.url()), &[]).await?),
        _ => None,
    };
    let targets = match (case, &other) {
        (Case::Plain, _) => [plain, plain],
        (Case::Clustered, _) => [clustered, clustered],
        (Case::Two, Some(b)) => [clustered, b],
        (Case::Two, None) => unreachable!("started above"),
    };
    let pids: Vec<u32> = match &other {
        Some(b) => vec![clustered.pid, b.pid],
        None => vec![targets[0].pid],
    };
    eprintln!(
        "locus-bench cluster: round {round}, {}: {expected} points ...",
        case.name()
    );
    let clustered_ones: Vec<&Locus> = match (case, &other) {
        (Case::Plain, _) => vec![],
        (_, Some(b)) => vec![clustered, b],
        (_, None) => vec![clustered],
    };
    let counted = counters(&clustered_ones).await?;
    let before = snapshot(&pids, nats.pid, postmaster);
    let t = Instant::now();
    let acked = split_ingest(
        targets,
        points,
        p.batch,
        p.streams,
        None,
        Arc::new(AtomicBool::new(false)),
    )
    .await?;
    let seconds = t.elapsed().as_secs_f64();
    // What cluster mode does after the acknowledgements (publishing the
    // last batches, the other instance applying them) is counted too.
    let settled = settle(&clustered_ones, &counted).await?;
    let after = snapshot(&pids, nats.pid, postmaster);
    if let Some(b) = other {
        stop(b).await;
    }
    anyhow::ensure!(
        acked == expected,
        "{}: {acked} points acknowledged of {expected}",
        case.name()
    );
    let stored = crate::count(url).await?;
    anyhow::ensure!(
        stored == expected as i64,
        "{}: {stored} rows stored, expected {expected}",
        case.name()
    );
    let run = Run {
        case,
        round,
        points: expected,
        seconds,
        locus: before.0.iter().zip(&after.0).map(|(a, b)| b - a).collect(),
        nats: after.1 - before.1,
        pg: after.2 - before.2,
        client: after.3 - before.3,
        settled,
    };
    eprintln!("locus-bench cluster: {:.0} points/s", run.rate());
    Ok(run)
}

/// How soon probes written through one instance were seen on the other.
struct Latency {
    /// The ingest rate kept up meanwhile, asked and reached (0 for none).
    rate: u64,
    reached: f64,
    probes: usize,
    /// ms from the write's acknowledgement by A to the point seen on B;
    /// infinite for a probe not seen within [`GIVE_UP`].
    latest: Vec<f64>,
    live: Vec<f64>,
    /// Probes the live feed of B delivered before A's acknowledgement
    /// reached the client (counted as 0 ms).
    live_before_ack: usize,
}

/// Writes `probes` points through `a`, one every [`PROBE_EVERY`], each with
/// a time of its own, and times from each acknowledgement until `b` shows
/// the point: in GetLatest, asked every [`POLL_EVERY`] for that device, and
/// in a live subscription to the probes' devices opened before. Meanwhile,
/// when `rate` is not 0, `background` is ingested at `rate` points/s, half
/// through each instance (the probes start 2 s after it).
async fn latency(
    a: &Locus,
    b: &Locus,
    p: &Params,
    rate: u64,
    background: Vec<Location>,
) -> anyhow::Result<Latency> {
    let stop = Arc::new(AtomicBool::new(false));
    let t = Instant::now();
    let loading = async {
        if rate == 0 {
            return anyhow::Ok(0);
        }
        split_ingest(
            [a, b],
            background,
            p.batch,
            p.streams,
            Some(rate),
            stop.clone(),
        )
        .await
    };
    let probing = async {
        if rate > 0 {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let (ta, tb, probes) = (a.grpc_target(), b.grpc_target(), p.probes);
        let probed = apart(move || probe(ta, tb, probes)).await;
        stop.store(true, Relaxed);
        (probed, t.elapsed().as_secs_f64())
    };
    let (loaded, (probed, seconds)) = tokio::join!(loading, probing);
    let reached = loaded? as f64 / seconds;
    let (latest, live, live_before_ack) = probed?;
    Ok(Latency {
        rate,
        reached,
        probes: p.probes,
        latest,
        live,
        live_before_ack,
    })
}

fn time_us(l: &Location) -> i64 {
    l.time
        .map_or(0, |t| t.seconds * 1_000_000 + i64::from(t.nanos) / 1_000)
}

/// ms from `from` to `to`, 0 when `to` came first.
fn ms(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1000.0
}

/// The probes, on a runtime of their own (see [`apart`]): returns the ms
/// to GetLatest and to the live feed of each probe, and how many the live
/// feed delivered before the acknowledgement.
async fn probe(a: String, b: String, probes: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>, usize)> {
    let (on_a, on_b) = (dial(&a).await?, dial(&b).await?);
    let start = now_us();
    let mut fleet: Vec<Device> = (0..PROBE_DEVICES)
        .map(|i| Device::new(i, 99, PROBE_APP, start, 1_000_000))
        .collect();
    let ids: Vec<String> = fleet.iter().map(|d| d.device_id.to_string()).collect();
    // When each (device, time) reached the subscriber on B.
    let seen_live: Arc<Mutex<HashMap<(String, i64), Instant>>> = Arc::default();
    let mut feed = QueryClient::new(on_b.clone())
        .subscribe(SubscribeRequest {
            app_source: PROBE_APP.into(),
            device_ids: ids,
            bbox: None,
        })
        .await?
        .into_inner();
    let subscriber = {
        let seen = seen_live.clone();
        tokio::spawn(async move {
            while let Ok(Some(update)) = feed.message().await {
                let at = Instant::now();
                let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
                for l in update.locations().unwrap_or_default() {
                    let key = (l.device_id.clone(), time_us(&l));
                    seen.entry(key).or_insert(at);
                }
            }
        })
    };
    // The subscription is in place before the first probe.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut writer = IngestClient::new(on_a);
    let mut pollers = tokio::task::JoinSet::new();
    let mut acked = Vec::with_capacity(probes);
    let mut pace = tokio::time::interval(PROBE_EVERY);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0..probes {
        pace.tick().await;
        let device = &mut fleet[i % PROBE_DEVICES as usize];
        let mut point = device.next_point();
        let at = now_us();
        point.time = ts(at);
        let id = point.device_id.clone();
        let ack = writer
            .write_locations(LocationBatch {
                batch_id: i as u64,
                locations: vec![point],
            })
            .await?
            .into_inner();
        let ack_at = Instant::now();
        anyhow::ensure!(ack.accepted == 1, "probe {i} not accepted: {ack:?}");
        pollers.spawn(poll_latest(on_b.clone(), id.clone(), at, ack_at));
        acked.push(((id, at), ack_at));
    }
    let mut latest = Vec::with_capacity(probes);
    while let Some(r) = pollers.join_next().await {
        latest.push(r??);
    }
    // What the live feed still has on its way: until every probe is in, or
    // GIVE_UP after the last acknowledgement.
    let last = acked.last().map_or_else(Instant::now, |a| a.1);
    loop {
        let all = {
            let seen = seen_live.lock().unwrap_or_else(PoisonError::into_inner);
            acked.iter().all(|(k, _)| seen.contains_key(k))
        };
        if all || last.elapsed() > GIVE_UP {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    subscriber.abort();
    let seen = seen_live.lock().unwrap_or_else(PoisonError::into_inner);
    let mut before_ack = 0;
    let live = acked
        .iter()
        .map(|(k, ack_at)| match seen.get(k) {
            Some(&at) if at.saturating_duration_since(*ack_at) > GIVE_UP => f64::INFINITY,
            Some(&at) => {
                if at < *ack_at {
                    before_ack += 1;
                }
                ms(*ack_at, at)
            }
            None => f64::INFINITY,
        })
        .collect();
    Ok((latest, live, before_ack))
}

/// Asks `b` for `device`'s latest position every [`POLL_EVERY`] until it is
/// the probe of `time_us` or newer; the ms from `acked` to the answer that
/// showed it (infinite if none did within [`GIVE_UP`]).
async fn poll_latest(
    b: Channel,
    device: String,
    time_us: i64,
    acked: Instant,
) -> anyhow::Result<f64> {
    let mut q = QueryClient::new(b);
    let req = GetLatestRequest {
        device_ids: vec![device],
        app_source: PROBE_APP.into(),
        ..Default::default()
    };
    loop {
        let answer = q.get_latest(req.clone()).await;
        let at = Instant::now();
        let newest = match answer {
            Ok(page) => page.into_inner().locations()?.first().map(self::time_us),
            Err(s) if s.code() == tonic::Code::NotFound => None,
            Err(s) => return Err(s.into()),
        };
        if newest.is_some_and(|t| t >= time_us) {
            return Ok(ms(acked, at));
        }
        if acked.elapsed() > GIVE_UP {
            return Ok(f64::INFINITY);
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

pub async fn run(locus: &Path, url: &str, p: Params) -> anyhow::Result<()> {
    let nats = OwnNats::start().await?;
    // The first to start sets the schema up; then the other.
    let plain = instance(locus, url, p.writers, None, &[]).await?;
    let clustered = instance(locus, url, p.writers, Some(&nats.url()), &[]).await?;
    let postmaster = postmaster(url).await?;

    let mut runs = Vec::new();
    let mut seed = 100;
    for round in 1..=p.rounds {
        // The order turns each round: what it favours (a table grown, a
        // warmer cache) falls on each case in turn.
        let mut order = [Case::Plain, Case::Clustered, Case::Two];
        if round % 2 == 0 {
            order.reverse();
        }
        for case in order {
            seed += 1;
            let procs = (&plain, &clustered, &nats);
            runs.push(full_ingest(&p, locus, url, procs, postmaster, case, round, seed).await?);
        }
    }
    let median_rate = |case| median(runs.iter().filter(|r| r.case == case).map(Run::rate));
    let maximum = [Case::Plain, Case::Clustered, Case::Two]
        .map(median_rate)
        .into_iter()
        .fold(0.0, f64::max);
    let half_rate = p.half_rate.unwrap_or((maximum / 2.0) as u64);

    // The latency: through the clustered instance, seen on a second one.
    crate::reset(url).await?;
    let other = instance(locus, url, p.writers, Some(&nats.url()), &[]).await?;
    eprintln!("locus-bench cluster: {} probes, ingest idle ...", p.probes);
    let idle = latency(&clustered, &other, &p, 0, Vec::new()).await?;
    // Enough for the probes and the 2 s before them, and some to spare.
    let seconds = p.probes as f64 * PROBE_EVERY.as_secs_f64() + 2.0 + 5.0;
    let per_device = (half_rate as f64 * seconds / p.devices as f64).ceil() as usize;
    let background = fleet_points("mextrack", p.devices, 7, per_device.max(1), 1.0);
    eprintln!(
        "locus-bench cluster: {} probes, ingest at {half_rate} points/s ...",
        p.probes
    );
    let loaded = latency(&clustered, &other, &p, half_rate, background).await?;
    stop(other).await;
    stop(clustered).await;
    stop(plain).await;

    print(&p, &runs, &[idle, loaded], maximum, half_rate, &nats.dir);
    Ok(())
}

/// The middle value, or the mean of the two middle ones.
pub(crate) fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn print(
    p: &Params,
    runs: &[Run],
    latencies: &[Latency],
    maximum: f64,
    half_rate: u64,
    store: &Path,
) {
    println!();
    println!(
        "Full ingest: {} points of {} devices a run, {} streams of {}-point batches (each keeping 8 unacknowledged), \
         half of them on each of two connections: to one instance, or one to each of two; {} writers an instance; \
         {} rounds, the order turning; NATS: a nats-server -js of the suite's own, its store in {} \
         (the temporary directory: TMPDIR). Settled after: seconds from the last \
         acknowledgement until every point committed was published to the stream (and, with two, applied by the other \
         instance); CPU is counted until then.",
        runs.first().map_or(0, |r| r.points),
        p.devices,
        p.streams,
        p.batch,
        p.writers,
        p.rounds,
        store.display()
    );
    println!();
    println!(
        "| case | round | points/s | seconds | settled after, s | locus CPU s / M points | NATS CPU s / M | PostgreSQL CPU s / M | client CPU s / M |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in runs {
        let locus = if r.locus.len() > 1 {
            let each: Vec<String> = r
                .locus
                .iter()
                .map(|c| format!("{:.2}", r.per_m(*c)))
                .collect();
            format!("{:.2} ({})", r.locus_per_m(), each.join(" + "))
        } else {
            format!("{:.2}", r.locus_per_m())
        };
        println!(
            "| {} | {} | {:.0} | {:.1} | {} | {locus} | {:.2} | {:.2} | {:.2} |",
            r.case.name(),
            r.round,
            r.rate(),
            r.seconds,
            match r.settled {
                None => "-".to_string(),
                Some((s, 0.0)) => format!("{s:.2}"),
                Some((s, dropped)) => format!("{s:.2} ({dropped} points never published)"),
            },
            r.per_m(r.nats),
            r.per_m(r.pg),
            r.per_m(r.client),
        );
    }
    let by_round = |f: &dyn Fn(&Run, &Run) -> f64, num: Case, den: Case| {
        let ratios: Vec<f64> = (1..=p.rounds)
            .filter_map(|round| {
                let of = |case| runs.iter().find(|r| r.round == round && r.case == case);
                Some(f(of(num)?, of(den)?))
            })
            .collect();
        let listed: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
        (median(ratios.into_iter()), listed.join(","))
    };
    let rate = |n: &Run, d: &Run| n.rate() / d.rate();
    let cpu = |n: &Run, d: &Run| n.locus_per_m() / d.locus_per_m();
    let (two, two_by) = by_round(&rate, Case::Two, Case::Clustered);
    let (two_plain, two_plain_by) = by_round(&rate, Case::Two, Case::Plain);
    let (alone, alone_by) = by_round(&rate, Case::Clustered, Case::Plain);
    let (cost, cost_by) = by_round(&cpu, Case::Clustered, Case::Plain);
    let (cost_two, cost_two_by) = by_round(&cpu, Case::Two, Case::Plain);
    println!();
    println!("two_instances_vs_one={two:.3} (median of rounds {two_by}; both with --nats-url)");
    println!(
        "two_instances_vs_one_plain={two_plain:.3} (median of rounds {two_plain_by}; the one without --nats-url)"
    );
    println!(
        "cluster_ingest_ratio={alone:.3} (one instance with --nats-url over one without; median of rounds {alone_by})"
    );
    println!(
        "cluster_cpu_per_point_ratio={cost:.3} (locus CPU s per million points, one instance with --nats-url over one without; median of rounds {cost_by}; target under 1.2)"
    );
    println!(
        "two_instances_cpu_per_point_ratio={cost_two:.3} (both instances' CPU s per million points over one instance's without --nats-url; median of rounds {cost_two_by})"
    );

    println!();
    println!(
        "A point written through one instance (WriteLocations, one point, a time of its own, every {} ms, cycling over {PROBE_DEVICES} devices), \
         seen on the other: ms from the acknowledgement to GetLatest's answer that holds it (asked every {} ms per probe) and \
         to the live update that carries it (a Subscribe to the probes' devices; updates go out every --live-interval, 100 ms). \
         {}",
        PROBE_EVERY.as_millis(),
        POLL_EVERY.as_millis(),
        match p.half_rate {
            None => format!(
                "The rate kept up is {half_rate} points/s: half of {maximum:.0}, the highest median of the cases above."
            ),
            Some(_) => format!(
                "The rate kept up is --half-rate, {half_rate} points/s (the highest median above: {maximum:.0})."
            ),
        },
    );
    println!();
    println!(
        "| ingest meanwhile, half through each | seen on the other instance | probes | not seen in 10 s | p50 ms | p99 ms | max ms | target p99 |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let fmt = |v: f64| {
        if v.is_finite() {
            format!("{v:.0}")
        } else {
            "never".to_string()
        }
    };
    for l in latencies {
        let load = if l.rate == 0 {
            "none".to_string()
        } else {
            format!("{} points/s asked, {:.0} reached", l.rate, l.reached)
        };
        for (view, v) in [("GetLatest", &l.latest), ("live feed", &l.live)] {
            let unseen = v.iter().filter(|x| !x.is_finite()).count();
            let max = v.iter().copied().fold(0.0, f64::max);
            println!(
                "| {load} | {view} | {} | {unseen} | {} | {} | {} | 1,000 ms |",
                l.probes,
                fmt(percentile(v.clone(), 0.5)),
                fmt(percentile(v.clone(), 0.99)),
                fmt(max),
            );
        }
        if l.live_before_ack > 0 {
            println!(
                "|  | ({} probes were in the live feed before the acknowledgement reached the client: 0 ms) | | | | | | |",
                l.live_before_ack
            );
        }
    }
    if let Some(l) = latencies.iter().find(|l| l.rate == half_rate && l.rate > 0) {
        println!();
        println!(
            "cluster_latest_ms_p50_p99={},{}",
            fmt(percentile(l.latest.clone(), 0.5)),
            fmt(percentile(l.latest.clone(), 0.99))
        );
        println!(
            "cluster_live_ms_p50_p99={},{}",
            fmt(percentile(l.live.clone(), 0.5)),
            fmt(percentile(l.live.clone(), 0.99))
        );
    }
}
