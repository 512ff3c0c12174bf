//! `locus-bench --suite log`: `--ack-after log` against `--ack-after
//! commit`, side by side in one run, on one database and a nats-server of
//! the suite's own (both instances with `--nats-url`, so that only the ack
//! mode differs): full ingest (the rate of acknowledgements, and of points
//! stored), the ack latency of single calls while ingest runs at half the
//! maximum, and how fast the log drains after a database outage, as a
//! ratio of the normal ingest rate.

use std::{
    path::Path,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use locus::proto::{LocationBatch, ingest_client::IngestClient};
use locus_load::proc::Locus;
use sqlx::{Connection, PgConnection, postgres::PgConnectOptions};

use crate::{
    cluster::{OwnNats, Params, instance, median, stop},
    queries::{batches, dial, fleet_points, ingest, percentile},
};

/// The log's bound (JetStream sets it aside on its server).
const LOG_BYTES: &str = "1073741824";
/// A timed call every this often while the background ingest runs.
const CALL_EVERY: Duration = Duration::from_millis(20);
/// Points of a timed call.
const CALL_POINTS: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Commit,
    Log,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Commit => "--ack-after commit",
            Mode::Log => "--ack-after log",
        }
    }
}

struct Run {
    mode: Mode,
    round: usize,
    points: u64,
    /// Until the last acknowledgement.
    acked_s: f64,
    /// Until the last point was stored (the log's writers behind the acks).
    stored_s: f64,
}

impl Run {
    fn ack_rate(&self) -> f64 {
        self.points as f64 / self.acked_s
    }

    fn stored_rate(&self) -> f64 {
        self.points as f64 / self.stored_s
    }
}

pub async fn run(locus: &Path, url: &str, p: Params) -> anyhow::Result<()> {
    let nats = OwnNats::start().await?;
    let commit = instance(locus, url, p.writers, Some(&nats.url()), &[]).await?;
    let logged = instance(
        locus,
        url,
        p.writers,
        Some(&nats.url()),
        &["--ack-after", "log", "--log-max-bytes", LOG_BYTES],
    )
    .await?;
    let target = |m: Mode| if m == Mode::Commit { &commit } else { &logged };

    let mut runs = Vec::new();
    let mut seed = 300;
    for round in 1..=p.rounds {
        let mut order = [Mode::Commit, Mode::Log];
        if round % 2 == 0 {
            order.reverse();
        }
        for mode in order {
            seed += 1;
            runs.push(full_ingest(&p, url, target(mode), mode, round, seed).await?);
        }
    }
    // Half of what the database takes (the commit mode's rate): the log
    // mode acknowledges faster than its writers store.
    let stored = median(
        runs.iter()
            .filter(|r| r.mode == Mode::Commit)
            .map(Run::stored_rate),
    );
    let half_rate = p.half_rate.unwrap_or((stored / 2.0) as u64);

    let mut latencies = Vec::new();
    for mode in [Mode::Commit, Mode::Log] {
        latencies.push((mode, ack_latency(&p, url, target(mode), half_rate).await?));
    }
    let drain = drain(&p, url, &logged).await?;
    stop(commit).await;
    stop(logged).await;
    print(&p, &runs, &latencies, half_rate, drain);
    Ok(())
}

/// `p.rows` points through `server`, flat out; timed until acknowledged and
/// until stored.
async fn full_ingest(
    p: &Params,
    url: &str,
    server: &Locus,
    mode: Mode,
    round: usize,
    seed: u64,
) -> anyhow::Result<Run> {
    let per_device = p.rows.div_ceil(p.devices as usize);
    let points = fleet_points("mextrack", p.devices, seed, per_device, 1.0);
    let expected = points.len() as u64;
    crate::reset(url).await?;
    eprintln!(
        "locus-bench log: round {round}, {}: {expected} points ...",
        mode.name()
    );
    let t = Instant::now();
    let acked = ingest(
        dial(&server.grpc_target()).await?,
        batches(points, p.batch),
        p.streams,
        None,
        Arc::new(AtomicBool::new(false)),
    )
    .await?;
    let acked_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(acked == expected, "{acked} acknowledged of {expected}");
    wait_stored(url, expected, Duration::from_secs(300)).await?;
    let run = Run {
        mode,
        round,
        points: expected,
        acked_s,
        stored_s: t.elapsed().as_secs_f64(),
    };
    eprintln!(
        "locus-bench log: {:.0} points/s acknowledged, {:.0} stored",
        run.ack_rate(),
        run.stored_rate()
    );
    Ok(run)
}

/// Waits until `location_events` holds `expected` rows.
async fn wait_stored(url: &str, expected: u64, within: Duration) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        let n = crate::count(url).await?;
        if n == expected as i64 {
            return Ok(());
        }
        anyhow::ensure!(
            n < expected as i64 && t.elapsed() < within,
            "{n} rows stored, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// ms from sending each of `p.probes` WriteLocations calls of
/// [`CALL_POINTS`] points to its acknowledgement, one every
/// [`CALL_EVERY`], while a background fleet is ingested at `rate`.
async fn ack_latency(p: &Params, url: &str, server: &Locus, rate: u64) -> anyhow::Result<Vec<f64>> {
    crate::reset(url).await?;
    let seconds = p.probes as f64 * CALL_EVERY.as_secs_f64() + 3.0;
    let per_device = (rate as f64 * seconds / p.devices as f64).ceil() as usize;
    let background = fleet_points("mextrack", p.devices, 7, per_device.max(1), 1.0);
    let stop_bg = Arc::new(AtomicBool::new(false));
    let bg = tokio::spawn(ingest(
        dial(&server.grpc_target()).await?,
        batches(background, p.batch),
        p.streams,
        Some(rate),
        stop_bg.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = fleet_points("probe", CALL_POINTS as u64, 8, p.probes, 1.0);
    let mut client = IngestClient::new(dial(&server.grpc_target()).await?);
    let mut tick = tokio::time::interval(CALL_EVERY);
    let mut ms = Vec::with_capacity(p.probes);
    for (i, chunk) in calls.chunks(CALL_POINTS).enumerate() {
        tick.tick().await;
        let batch = LocationBatch {
            batch_id: i as u64,
            locations: chunk.to_vec(),
        };
        let t = Instant::now();
        client.write_locations(batch).await?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    stop_bg.store(true, Relaxed);
    bg.await??;
    Ok(ms)
}

/// What the drain measured.
struct Drain {
    points: u64,
    /// Acknowledgements per second while the database was away.
    acked_rate: f64,
    /// Seconds from the database's return until every point was stored.
    seconds: f64,
}

/// The database refuses connections while `p.rows` points are sent
/// through the log instance (every one acknowledged); then it is back, and
/// the log drains into it.
async fn drain(p: &Params, url: &str, logged: &Locus) -> anyhow::Result<Drain> {
    crate::reset(url).await?;
    let per_device = p.rows.div_ceil(p.devices as usize);
    let points = fleet_points("mextrack", p.devices, 9, per_device, 1.0);
    let expected = points.len() as u64;
    let away = Away::cut_off(url).await?;
    eprintln!("locus-bench log: database away, {expected} points through the log ...");
    let t = Instant::now();
    let acked = ingest(
        dial(&logged.grpc_target()).await?,
        batches(points, p.batch),
        p.streams,
        None,
        Arc::new(AtomicBool::new(false)),
    )
    .await;
    let acked_s = t.elapsed().as_secs_f64();
    away.restore().await?;
    let acked = acked?;
    anyhow::ensure!(
        acked == expected,
        "{acked} acknowledged of {expected} while the database was away"
    );
    let t = Instant::now();
    wait_stored(url, expected, Duration::from_secs(600)).await?;
    let seconds = t.elapsed().as_secs_f64();
    eprintln!("locus-bench log: drained {expected} points in {seconds:.1} s");
    Ok(Drain {
        points: expected,
        acked_rate: expected as f64 / acked_s,
        seconds,
    })
}

/// The benchmark database refusing connections (new ones refused, open
/// ones ended), until restored.
struct Away {
    admin: String,
    name: String,
}

impl Away {
    async fn cut_off(url: &str) -> anyhow::Result<Away> {
        let opts = PgConnectOptions::from_str(url)?;
        let name = opts.get_database().unwrap_or("postgres").to_string();
        let admin = opts.database("postgres");
        let mut c = PgConnection::connect_with(&admin).await?;
        sqlx::raw_sql(&format!(
            "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false"
        ))
        .execute(&mut c)
        .await?;
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
            .bind(&name)
            .execute(&mut c)
            .await?;
        let admin = url.replacen(&format!("/{name}"), "/postgres", 1);
        Ok(Away { admin, name })
    }

    async fn restore(self) -> anyhow::Result<()> {
        let mut c = PgConnection::connect(&self.admin).await?;
        sqlx::raw_sql(&format!(
            "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS true",
            self.name
        ))
        .execute(&mut c)
        .await?;
        Ok(())
    }
}

fn print(p: &Params, runs: &[Run], latencies: &[(Mode, Vec<f64>)], half_rate: u64, drain: Drain) {
    println!();
    println!(
        "Full ingest: {} points of {} devices a run, {} streams of {}-point batches (each keeping 8 unacknowledged) \
         to one instance; {} writers; both instances with --nats-url (a nats-server -js of the suite's own); \
         {} rounds, the order turning. Stored after: seconds until the last point was in the database.",
        runs.first().map_or(0, |r| r.points),
        p.devices,
        p.streams,
        p.batch,
        p.writers,
        p.rounds
    );
    println!();
    println!(
        "| mode | round | acknowledged points/s | stored points/s | acknowledged after, s | stored after, s |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in runs {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.1} | {:.1} |",
            r.mode.name(),
            r.round,
            r.ack_rate(),
            r.stored_rate(),
            r.acked_s,
            r.stored_s
        );
    }
    let ratio = |f: &dyn Fn(&Run) -> f64| {
        let ratios: Vec<f64> = (1..=p.rounds)
            .filter_map(|round| {
                let of = |m| runs.iter().find(|r| r.round == round && r.mode == m);
                Some(f(of(Mode::Log)?) / f(of(Mode::Commit)?))
            })
            .collect();
        let listed: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
        (median(ratios.into_iter()), listed.join(","))
    };
    let (acks, acks_by) = ratio(&Run::ack_rate);
    let (stored, stored_by) = ratio(&Run::stored_rate);
    let commit_rate = median(
        runs.iter()
            .filter(|r| r.mode == Mode::Commit)
            .map(Run::ack_rate),
    );
    println!();
    println!(
        "Ack latency: {} WriteLocations calls of {CALL_POINTS} points, one every {} ms, timed by the client, \
         while a fleet is ingested at {half_rate} points/s (half the commit mode's median stored rate above) through the same instance.",
        p.probes,
        CALL_EVERY.as_millis()
    );
    println!();
    println!("| mode | calls | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|");
    for (mode, ms) in latencies {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} |",
            mode.name(),
            ms.len(),
            percentile(ms.clone(), 0.5),
            percentile(ms.clone(), 0.99),
            ms.iter().copied().fold(0.0, f64::max)
        );
    }
    let drain_rate = drain.points as f64 / drain.seconds;
    println!();
    println!(
        "Drain: {} points sent through the log instance while the database refused connections \
         (acknowledged at {:.0} points/s), then the database back: {:.1} s until every point was stored.",
        drain.points, drain.acked_rate, drain.seconds
    );
    println!();
    println!("log_vs_commit_ack_rate={acks:.3} (median of rounds {acks_by}; target at least 0.7)");
    println!("log_vs_commit_stored_rate={stored:.3} (median of rounds {stored_by})");
    for (mode, ms) in latencies {
        println!(
            "ack_ms_p50_p99_{}={:.1},{:.1}",
            if *mode == Mode::Commit {
                "commit"
            } else {
                "log"
            },
            percentile(ms.clone(), 0.5),
            percentile(ms.clone(), 0.99)
        );
    }
    println!(
        "drain_points_per_s={drain_rate:.0} drain_vs_commit_ingest={:.3} (the commit mode's median acknowledged rate: {commit_rate:.0})",
        drain_rate / commit_rate
    );
}
