//! `locus-load`: a simulated fleet streaming to locus, with a report and an
//! optional check that every acknowledged point is stored exactly once.

use std::{
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tonic::transport::Endpoint;

use locus_load::{
    fleet::Device,
    run::{self, Budget, Feeder, Shape, Stats},
    verify,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Long-lived StreamLocations streams.
    Stream,
    /// WriteLocations calls.
    Unary,
    /// POST /v1/locations (HTTP JSON), as phone apps send.
    Http,
}

/// What an ack of locus means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Acks {
    /// The points are stored (`--ack-after commit`).
    Commit,
    /// The points are in the log, stored later (`--ack-after log`).
    Log,
}

#[derive(Debug, Parser)]
#[command(name = "locus-load", about = "A simulated GPS fleet against locus")]
struct Args {
    /// locus's gRPC address; several, comma-separated, in stream mode:
    /// stream i begins on the (i mod n)th, and after an error reconnects
    /// to the next (as a client of several instances behind no balancer).
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:50051")]
    target: Vec<String>,
    /// locus's HTTP address, for --mode http.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    http_target: String,
    #[arg(long, value_enum, default_value = "stream")]
    mode: Mode,
    /// Bearer token for every call (`locus token create --role admin`: the
    /// fleet spans several app_sources). None for a locus with `--auth off`.
    #[arg(long, env = "LOCUS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Simulated devices.
    #[arg(long, default_value_t = 100)]
    devices: u64,
    /// Stream mode: 0 for one stream per device, or this many gateway
    /// streams that multiplex the devices.
    #[arg(long, default_value_t = 0)]
    gateways: u64,
    /// Points per second per device; 0 sends as fast as acks allow.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Simulated seconds between a device's fixes (default: 1/rate, or 1 s unthrottled).
    #[arg(long)]
    fix_interval: Option<f64>,
    /// Points per LocationBatch.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Stop after this many points.
    #[arg(long)]
    total_points: Option<u64>,
    /// Stop after this long (e.g. 30s, 5m).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Unary mode: calls in flight (a closed loop: a caller sends its next
    /// batch once the last one is acknowledged).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Unary mode, an open loop instead: new batches making this many
    /// points a second, sent whatever the answers; a refused batch is sent
    /// again after the server's retry hint, beside the new ones. The
    /// report's `offered_per_sec` counts distinct points.
    #[arg(long, conflicts_with = "concurrency")]
    offered_rate: Option<f64>,
    /// Stream mode: batches unacknowledged per stream.
    #[arg(long, default_value_t = 8)]
    inflight: usize,
    /// HTTP/2 connections the streams share (default: one per 100 streams).
    #[arg(long)]
    connections: Option<usize>,
    #[arg(long, value_delimiter = ',', default_value = "mextrack,pshop")]
    app_sources: Vec<String>,
    /// Share of batches held back and sent late (offline buffering).
    #[arg(long, default_value_t = 0.01)]
    late_share: f64,
    /// Share of points that repeat an earlier point.
    #[arg(long, default_value_t = 0.0)]
    duplicate_share: f64,
    /// Share of points made invalid (latitude 123).
    #[arg(long, default_value_t = 0.0)]
    invalid_share: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How long ago the simulated clock starts (default: so that the run ends about now).
    #[arg(long, value_parser = humantime::parse_duration)]
    start_ago: Option<Duration>,
    /// After the run, check the database against the acks: every point
    /// acknowledged is stored with the values sent, none rejected or never
    /// acknowledged is, and the acks' accepted count is what the table
    /// gained. (An ack out of order, or one that does not count its batch's
    /// points once each, fails the run with or without this.)
    #[arg(long)]
    verify: bool,
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// What locus's acks mean. With `log`, --verify first waits until the
    /// log has drained into the table (--metrics-target says its backlog),
    /// and expects points of --refused-speed absent.
    #[arg(long, value_enum, default_value = "commit")]
    acks: Acks,
    /// With --acks log: locus's metrics addresses (comma-separated, e.g.
    /// http://127.0.0.1:9090); the first that answers gives the log's
    /// backlog (`locus_log_backlog_messages`).
    #[arg(long, value_delimiter = ',')]
    metrics_target: Vec<String>,
    /// With --acks log: how long --verify waits for the log to drain.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    drain_deadline: Duration,
    /// Every --refused-every-th point of each device gets this speed (km/h),
    /// one the database is set to refuse (a check constraint): with --acks
    /// log those points are acknowledged, and --verify expects them absent
    /// (in the dead letters) and every other point stored.
    #[arg(long, requires = "refused_every")]
    refused_speed: Option<f64>,
    #[arg(long, requires = "refused_speed")]
    refused_every: Option<u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    anyhow::ensure!(
        a.devices > 0 && a.batch_size > 0,
        "--devices and --batch-size must be positive"
    );
    anyhow::ensure!(
        a.total_points.is_some() || a.duration.is_some(),
        "give --total-points or --duration"
    );
    anyhow::ensure!(
        !a.verify || a.database_url.is_some(),
        "--verify needs --database-url or DATABASE_URL"
    );
    anyhow::ensure!(
        a.offered_rate
            .is_none_or(|r| a.mode == Mode::Unary && r > 0.0),
        "--offered-rate is for --mode unary, and must be positive"
    );
    anyhow::ensure!(
        a.mode == Mode::Stream || a.target.len() == 1,
        "several --target are for --mode stream"
    );
    anyhow::ensure!(
        !a.verify || a.acks == Acks::Commit || !a.metrics_target.is_empty(),
        "--verify with --acks log needs --metrics-target (to see the log drain)"
    );
    anyhow::ensure!(
        a.refused_every.is_none_or(|n| n > 0),
        "--refused-every must be positive"
    );
    let interval_s = a
        .fix_interval
        .unwrap_or(if a.rate > 0.0 { 1.0 / a.rate } else { 1.0 });
    let per_device = match (a.total_points, a.duration) {
        (Some(n), _) => n as f64 / a.devices as f64,
        (None, Some(d)) if a.rate > 0.0 => d.as_secs_f64() * a.rate,
        _ => 3_600.0,
    };
    let now_us = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros() as i64;
    let start_ago = a
        .start_ago
        .map_or(per_device * interval_s + 60.0, |d| d.as_secs_f64());
    let start_us = now_us - (start_ago * 1e6) as i64;
    let interval_us = (interval_s * 1e6) as i64;
    let devices: Vec<Device> = (0..a.devices)
        .map(|i| {
            Device::new(
                i,
                a.seed,
                &a.app_sources[(i as usize) % a.app_sources.len()],
                start_us,
                interval_us,
            )
        })
        .collect();
    let device_ids: Vec<(String, uuid::Uuid)> = devices
        .iter()
        .map(|d| (d.app_source.clone(), d.device_id))
        .collect();
    let shape = Shape {
        batch_size: a.batch_size,
        duplicate_share: a.duplicate_share,
        invalid_share: a.invalid_share,
        late_share: a.late_share,
        refused: a.refused_speed.zip(a.refused_every),
    };
    let budget = Arc::new(Budget::new(a.total_points, a.duration));
    let stats = Arc::new(Stats {
        stored: a.verify.then(Default::default),
        refused_speed: a.refused_speed.filter(|_| a.acks == Acks::Log),
        ..Default::default()
    });

    let feeders: Vec<Feeder> = match (a.mode, a.gateways) {
        (Mode::Stream, 0) => devices
            .into_iter()
            .map(|d| Feeder::new(vec![d], shape.clone()))
            .collect(),
        (Mode::Stream, g) => {
            let mut groups: Vec<Vec<Device>> = (0..g).map(|_| Vec::new()).collect();
            for (i, d) in devices.into_iter().enumerate() {
                groups[i % g as usize].push(d);
            }
            groups
                .into_iter()
                .filter(|g| !g.is_empty())
                .map(|g| Feeder::new(g, shape.clone()))
                .collect()
        }
        (Mode::Unary | Mode::Http, _) => vec![Feeder::new(devices, shape.clone())],
    };
    // With --total-points, each feeder makes its devices' share.
    let feeders: Vec<Feeder> = match a.total_points {
        Some(total) => {
            let per_device = total / a.devices;
            let mut extra = total % a.devices;
            feeders
                .into_iter()
                .map(|f| {
                    let mut q = per_device * f.devices() as u64;
                    let e = extra.min(f.devices() as u64);
                    extra -= e;
                    q += e;
                    f.with_quota(q)
                })
                .collect()
        }
        None => feeders,
    };
    let workers = match a.mode {
        Mode::Stream => feeders.len(),
        Mode::Unary | Mode::Http => a.concurrency,
    };
    // An open loop's calls are as many as the refusals make them: spread
    // over a few connections (each is one task of the server's).
    let connections = a
        .connections
        .unwrap_or(if a.offered_rate.is_some() {
            4
        } else {
            workers.div_ceil(100)
        })
        .max(1);
    // `connections` to each target.
    let mut by_target = Vec::with_capacity(a.target.len());
    for target in &a.target {
        let endpoint = Endpoint::from_shared(target.clone())?.tcp_nodelay(true);
        let mut channels = Vec::with_capacity(connections);
        for _ in 0..connections {
            channels.push(
                endpoint
                    .connect()
                    .await
                    .with_context(|| format!("cannot connect to {target}"))?,
            );
        }
        by_target.push(channels);
    }
    let targets = by_target.len();
    let channels = by_target[0].clone();
    match a.offered_rate {
        Some(r) => eprintln!(
            "locus-load: {} devices, unary calls in an open loop offering {r} points/s over {connections} connection(s), batch {}",
            a.devices, a.batch_size
        ),
        None => eprintln!(
            "locus-load: {} devices, {} {} worker(s) over {} connection(s) to each of {targets} target(s), batch {}, rate {}/s/device",
            a.devices,
            workers,
            match a.mode {
                Mode::Stream => "stream",
                Mode::Unary => "unary",
                Mode::Http => "http",
            },
            connections,
            a.batch_size,
            a.rate
        ),
    }

    let token: run::Token = a.token.as_deref().map(Arc::from);
    let started = Instant::now();
    stats.start_clock();
    let mut tasks = tokio::task::JoinSet::new();
    match a.mode {
        Mode::Stream => {
            for (i, f) in feeders.into_iter().enumerate() {
                // Its own target first, then the others in turn.
                let ch = (0..targets)
                    .map(|k| by_target[(i + k) % targets][(i / targets) % connections].clone())
                    .collect();
                tasks.spawn(run::stream(
                    ch,
                    token.clone(),
                    f,
                    a.rate,
                    a.inflight,
                    budget.clone(),
                    stats.clone(),
                ));
            }
        }
        Mode::Http => {
            let feeder = Arc::new(tokio::sync::Mutex::new(
                feeders.into_iter().next().context("a feeder")?,
            ));
            for _ in 0..a.concurrency {
                tasks.spawn(run::http(
                    a.http_target.clone(),
                    token.clone(),
                    feeder.clone(),
                    budget.clone(),
                    stats.clone(),
                ));
            }
        }
        Mode::Unary if a.offered_rate.is_some() => {
            tasks.spawn(run::open_loop(
                channels.clone(),
                token.clone(),
                feeders.into_iter().next().context("a feeder")?,
                a.offered_rate.unwrap_or_default(),
                budget.clone(),
                stats.clone(),
            ));
        }
        Mode::Unary => {
            let feeder = Arc::new(tokio::sync::Mutex::new(
                feeders.into_iter().next().context("a feeder")?,
            ));
            for i in 0..a.concurrency {
                tasks.spawn(run::unary(
                    channels[i % connections].clone(),
                    token.clone(),
                    feeder.clone(),
                    budget.clone(),
                    stats.clone(),
                ));
            }
        }
    }
    let progress = tokio::spawn(report::progress(stats.clone()));
    while tasks.join_next().await.is_some() {}
    progress.abort();
    let elapsed = started.elapsed();
    let mut summary = report::Summary::new(&stats, elapsed, a.duration);
    summary.print_human();
    let broken = stats.broken_acks.load(std::sync::atomic::Ordering::Relaxed);
    if broken > 0 {
        println!("{broken} acks out of order or miscounted: the run fails");
    }
    let mut failed = broken > 0;
    if a.verify {
        let url = a.database_url.as_deref().unwrap_or_default();
        if a.acks == Acks::Log {
            let drained =
                verify::wait_drained(url, &device_ids, &a.metrics_target, a.drain_deadline).await?;
            if let Some(d) = drained {
                println!(
                    "verify: the log drained {:.1} s after the run",
                    d.as_secs_f64()
                );
            }
            failed |= drained.is_none();
            summary.drained(drained);
        }
        let mut acked = stats
            .stored
            .as_ref()
            .and_then(|s| s.lock().ok().map(|mut s| std::mem::take(&mut *s)))
            .unwrap_or_default();
        let verdict = verify::verify(url, &device_ids, &mut acked, a.acks == Acks::Log).await?;
        failed |= !verdict.held;
        summary.refused_absent = verdict.refused_absent;
    }
    println!("{}", summary.json());
    if failed {
        std::process::exit(1);
    }
    Ok(())
}

mod report {
    use super::*;

    /// A line per second on stderr.
    pub async fn progress(stats: Arc<Stats>) {
        let start = Instant::now();
        let mut last = 0;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            let acked = stats.accepted.load(Relaxed)
                + stats.duplicates.load(Relaxed)
                + stats.rejected.load(Relaxed);
            eprintln!(
                "[{:>4}s] sent {} acked {} ({}/s) errors {}",
                start.elapsed().as_secs(),
                stats.sent.load(Relaxed),
                acked,
                acked - last,
                stats.errors.load(Relaxed)
            );
            last = acked;
        }
    }

    pub struct Summary {
        sent: u64,
        acked: u64,
        duplicates: u64,
        rejected: u64,
        errors: u64,
        broken_acks: u64,
        points_per_sec: f64,
        p50: f64,
        p99: f64,
        max: f64,
        elapsed: Duration,
        /// Distinct points sent a second over --duration (or the run).
        offered_per_sec: f64,
        /// Points answered in each second of the run.
        answered_per_sec: Vec<u64>,
        /// Points answered a second over --duration (or the run): acks
        /// that came after it do not count.
        window_points_per_sec: f64,
        refused: u64,
        refused_without_hint: u64,
        retries: u64,
        /// The retry that came soonest after its hint: (waited, hint).
        closest_retry: Option<(Duration, Duration)>,
        abandoned: u64,
        /// CPU seconds this process spent driving the fleet (before
        /// --verify), so that a run on the machine under test can say how
        /// much of it the clients took.
        cpu: Option<f64>,
        /// With --acks log and --verify: seconds from the end of the run
        /// until the log had drained into the table (`None`: it did not).
        drained_s: Option<f64>,
        /// With --verify: acknowledged points of --refused-speed that are
        /// absent from the table, as they should be.
        pub refused_absent: usize,
    }

    impl Summary {
        pub fn new(s: &Stats, elapsed: Duration, window: Option<Duration>) -> Self {
            let mut l = s.latencies_us.lock().map(|l| l.clone()).unwrap_or_default();
            l.sort_unstable();
            let pct = |p: f64| {
                l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
                    .map_or(0.0, |us| *us as f64 / 1000.0)
            };
            let (acked, duplicates, rejected) = (
                s.accepted.load(Relaxed),
                s.duplicates.load(Relaxed),
                s.rejected.load(Relaxed),
            );
            let answered_per_sec = s
                .timeline
                .lock()
                .map(|t| t.per_sec.clone())
                .unwrap_or_default();
            let window = window.unwrap_or(elapsed);
            let whole = (window.as_secs() as usize).max(1);
            let window_points_per_sec =
                answered_per_sec.iter().take(whole).sum::<u64>() as f64 / whole as f64;
            Summary {
                offered_per_sec: s.sent.load(Relaxed) as f64 / window.as_secs_f64(),
                answered_per_sec,
                window_points_per_sec,
                refused: s.refused.load(Relaxed),
                refused_without_hint: s.refused_without_hint.load(Relaxed),
                retries: s.retries.load(Relaxed),
                closest_retry: s.closest_retry.lock().ok().and_then(|c| *c),
                abandoned: s.abandoned.load(Relaxed),
                sent: s.sent.load(Relaxed),
                acked,
                duplicates,
                rejected,
                errors: s.errors.load(Relaxed),
                broken_acks: s.broken_acks.load(Relaxed),
                points_per_sec: (acked + duplicates + rejected) as f64 / elapsed.as_secs_f64(),
                p50: pct(0.5),
                p99: pct(0.99),
                max: l.last().map_or(0.0, |us| *us as f64 / 1000.0),
                elapsed,
                cpu: locus_load::proc::proc_times(std::process::id()).map(|t| t.0),
                drained_s: None,
                refused_absent: 0,
            }
        }

        pub fn drained(&mut self, after: Option<Duration>) {
            self.drained_s = after.map(|d| d.as_secs_f64());
        }

        pub fn print_human(&self) {
            println!(
                "sent {} points in {:.1} s: {} accepted, {} duplicates, {} rejected, {} errors; {:.0} points/s; ack p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                self.sent,
                self.elapsed.as_secs_f64(),
                self.acked,
                self.duplicates,
                self.rejected,
                self.errors,
                self.points_per_sec,
                self.p50,
                self.p99,
                self.max
            );
            if self.refused > 0 {
                println!(
                    "{} calls refused for now ({} without a retry hint), {} sent again after their hint{}; {} points given up at the end",
                    self.refused,
                    self.refused_without_hint,
                    self.retries,
                    self.closest_retry.map_or(String::new(), |(w, h)| format!(
                        " (the soonest {:.0} ms after a refusal whose hint was {:.0} ms)",
                        w.as_secs_f64() * 1e3,
                        h.as_secs_f64() * 1e3
                    )),
                    self.abandoned
                );
            }
        }

        pub fn json(&self) -> String {
            serde_json::json!({
                "sent": self.sent,
                "acked": self.acked,
                "duplicates": self.duplicates,
                "rejected": self.rejected,
                "errors": self.errors,
                "broken_acks": self.broken_acks,
                "points_per_sec": (self.points_per_sec * 10.0).round() / 10.0,
                "ack_p50_ms": (self.p50 * 100.0).round() / 100.0,
                "ack_p99_ms": (self.p99 * 100.0).round() / 100.0,
                "ack_max_ms": (self.max * 100.0).round() / 100.0,
                "cpu_s": self.cpu,
                "offered_per_sec": self.offered_per_sec.round(),
                "window_points_per_sec": self.window_points_per_sec.round(),
                "answered_per_sec": self.answered_per_sec,
                "refused": self.refused,
                "refused_without_hint": self.refused_without_hint,
                "retries": self.retries,
                "closest_retry_wait_ms": self.closest_retry.map(|(w, _)| (w.as_secs_f64() * 1e4).round() / 10.0),
                "closest_retry_hint_ms": self.closest_retry.map(|(_, h)| (h.as_secs_f64() * 1e4).round() / 10.0),
                "abandoned": self.abandoned,
                "drained_s": self.drained_s,
                "refused_absent": self.refused_absent,
            })
            .to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo fleet of docker-compose.yml runs with flags locus-load accepts.
    #[test]
    fn compose_demo_fleet_command_parses() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docker-compose.yml"
        ))
        .unwrap();
        let compose: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
        let command: Vec<String> = compose["services"]["fleet"]["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(command[0], "locus-load");
        let args = Args::try_parse_from(&command).unwrap_or_else(|e| panic!("{e}"));
        assert!(args.duration.is_some() && args.rate > 0.0);
    }
}
