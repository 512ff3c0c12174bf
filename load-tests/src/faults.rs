//! `locus-faults`: the fault suite. Each case starts a real `locus serve`
//! on a fresh database, drives a simulated fleet at it with `locus-load
//! --verify` (which resends whatever was not acknowledged, as a real client
//! must), does something bad to it, and then checks that every acknowledged
//! point is stored exactly once, and what the case promises besides.
//!
//! `--quick` runs short versions (they run in `.ci/run`); without it the
//! cases run at the lengths of the issue (a 2-minute outage, 10,000 idle
//! streams, a 30-minute soak with `--cases soak`).

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use locus::proto::{
    GetLatestRequest, Location, LocationBatch, ingest_client::IngestClient,
    query_client::QueryClient,
};
use locus_load::{
    fleet::Device,
    nats::Nats,
    pg::Cluster,
    proc::{Locus, open_fds, pg_cpu, postmaster, proc_times, rss_mib, rss_peak_mib, sibling_locus},
};
use serde_json::Value;
use sqlx::{Connection, PgConnection};
use tonic::transport::Endpoint;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Case {
    Crash,
    Outage,
    Slow,
    Overload,
    Hostile,
    Amplify,
    Soak,
    Connections,
    Nats,
    KillInstance,
    LogOutage,
    LogNatsKill,
    LogKillInstance,
    LogDeadLetter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Postgres {
    /// A throwaway cluster of the suite's own (initdb, a free port), which
    /// the outage and the soak really stop and start.
    Own,
    /// The server at --database-url, shared with others: there an outage is
    /// the case's database refusing connections and its sessions killed.
    Shared,
}

#[derive(Debug, Parser)]
#[command(
    name = "locus-faults",
    about = "Faults against a real locus; exits 1 if any did not hold"
)]
struct Args {
    /// Which PostgreSQL the cases run against.
    #[arg(long, value_enum, default_value = "own")]
    postgres: Postgres,
    /// With --postgres own: where initdb and pg_ctl are (default: the newest
    /// /usr/lib/postgresql/*/bin).
    #[arg(long)]
    pg_bindir: Option<PathBuf>,
    /// With --postgres shared: a server where the suite may create and drop
    /// databases.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["crash", "outage", "slow", "overload", "hostile", "amplify", "connections", "nats", "kill-instance", "log-outage", "log-nats-kill", "log-kill-instance", "log-dead-letter"])]
    cases: Vec<Case>,
    /// Short versions of every case (for CI).
    #[arg(long)]
    quick: bool,
    /// How long the soak runs.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    soak: Duration,
    /// How many requests of each kind the amplify case sends at once (a
    /// build without its bounds, measured with 4, would need some 14 GB).
    #[arg(long, default_value_t = 4)]
    amplify_at_once: usize,
    /// The locus binary (default: beside this one).
    #[arg(long)]
    locus: Option<PathBuf>,
}

/// What a case found.
struct Outcome {
    held: bool,
    figures: Vec<String>,
    failures: Vec<String>,
}

impl Outcome {
    fn new() -> Self {
        Outcome {
            held: true,
            figures: Vec::new(),
            failures: Vec::new(),
        }
    }

    fn figure(&mut self, f: impl Into<String>) {
        self.figures.push(f.into());
    }

    fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.held = false;
            self.failures.push(what.into());
        }
    }
}

/// A fresh database for one case, dropped at the end.
struct Db {
    admin: String,
    name: String,
    url: String,
    cluster: Option<Arc<Cluster>>,
}

impl Db {
    async fn new(admin: &str, cluster: Option<Arc<Cluster>>, case: &str) -> anyhow::Result<Db> {
        let name = format!("locus_faults_{case}_{}", std::process::id());
        let mut conn = PgConnection::connect(admin).await?;
        for sql in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ] {
            sqlx::raw_sql(&sql).execute(&mut conn).await?;
        }
        let url = match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => bail!("{admin} names no database"),
        };
        Ok(Db {
            admin: admin.to_string(),
            name,
            url,
            cluster,
        })
    }

    /// The database goes away: on the suite's own cluster PostgreSQL stops
    /// (`pg_ctl stop -m fast`); on a shared server new connections to the
    /// database are refused and open ones killed.
    async fn cut_off(&self) -> anyhow::Result<()> {
        if let Some(c) = &self.cluster {
            return c.stop().await;
        }
        let mut conn = PgConnection::connect(&self.admin).await?;
        sqlx::raw_sql(&format!(
            "ALTER DATABASE {n} ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{n}';",
            n = self.name
        ))
        .execute(&mut conn)
        .await?;
        Ok(())
    }

    async fn restore(&self) -> anyhow::Result<()> {
        if let Some(c) = &self.cluster {
            return c.start().await;
        }
        let mut conn = PgConnection::connect(&self.admin).await?;
        sqlx::raw_sql(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            self.name
        ))
        .execute(&mut conn)
        .await?;
        Ok(())
    }

    async fn drop(self) {
        if let Ok(mut conn) = PgConnection::connect(&self.admin).await {
            let _ = sqlx::raw_sql(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn)
            .await;
        }
    }
}

/// A `locus-load --verify` run in the background.
struct Fleet {
    child: tokio::process::Child,
}

impl Fleet {
    fn start(locus: &Locus, db: &Db, flags: &[&str]) -> anyhow::Result<Fleet> {
        Fleet::start_on(&[locus], db, flags)
    }

    /// A fleet of streams spread over `instances` (stream i on the (i mod
    /// n)th), each reconnecting to the next after an error.
    fn start_on(instances: &[&Locus], db: &Db, flags: &[&str]) -> anyhow::Result<Fleet> {
        let bin = std::env::current_exe()?.with_file_name("locus-load");
        let targets: Vec<String> = instances.iter().map(|l| l.grpc_target()).collect();
        let http = instances.first().context("an instance")?.http_target();
        let child = tokio::process::Command::new(&bin)
            .args(["--target", &targets.join(",")])
            .args(["--http-target", &http])
            .args(["--verify", "--database-url", &db.url])
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        Ok(Fleet { child })
    }

    /// Waits for the run to end: whether `--verify` passed, and its JSON summary.
    async fn finish(self, limit: Duration) -> anyhow::Result<(bool, Value)> {
        let out = tokio::time::timeout(limit, self.child.wait_with_output())
            .await
            .context("the fleet did not finish in time")??;
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text
            .lines()
            .filter(|l| l.starts_with("verify:") || l.starts_with("  "))
        {
            println!("    {line}");
        }
        let summary = text
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .context("no summary from locus-load")?;
        Ok((out.status.success(), summary))
    }
}

fn n(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

/// Samples locus's RSS, readiness and buffer (`locus_buffer_points`) every
/// 250 ms while `work` runs.
struct Samples {
    rss_max: f64,
    buffer_max: f64,
    not_ready: usize,
    samples: usize,
}

async fn sampled<F: std::future::Future<Output = anyhow::Result<()>>>(
    locus: &Locus,
    work: F,
) -> anyhow::Result<Samples> {
    let mut s = Samples {
        rss_max: 0.0,
        buffer_max: 0.0,
        not_ready: 0,
        samples: 0,
    };
    tokio::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            r = &mut work => { r?; return Ok(s) }
            _ = tick.tick() => {
                s.rss_max = s.rss_max.max(rss_mib(locus.pid).unwrap_or(0.0));
                s.buffer_max = s.buffer_max.max(counter(locus, BUFFER_POINTS).await);
                if locus.ready().await != Some(true) { s.not_ready += 1; }
                s.samples += 1;
            }
        }
    }
}

/// Bounds every case's locus runs with: small, so that a leak shows.
const BUFFER_MIB: usize = 32;
const BOUNDS: &[&str] = &[
    "--buffer-points",
    "200000",
    "--buffer-bytes",
    "33554432",
    "--write-retry-deadline",
    "5s",
    "--shutdown-grace",
    "5s",
];

/// The buffer of the outage and slow cases, in points: far below what
/// their fleet keeps in flight (300 streams of 8 batches of 10 points,
/// 24,000), so that it fills and the streams are no longer read.
const SMALL_BUFFER: usize = 2_000;

/// [`BOUNDS`] with a buffer of [`SMALL_BUFFER`] points (and batches of at
/// most as many).
fn small_buffer_bounds() -> Vec<String> {
    let mut flags: Vec<String> = BOUNDS.iter().map(|s| s.to_string()).collect();
    flags[1] = SMALL_BUFFER.to_string();
    flags.extend(["--max-batch-points".into(), SMALL_BUFFER.to_string()]);
    flags
}

const BUFFER_POINTS: &str = "locus_buffer_points";

/// Whether the buffer reached its bound (within one batch of `batch`
/// points: the next one no longer fit) and never passed it.
fn check_buffer_full(out: &mut Outcome, buffer_max: f64, batch: usize) {
    out.check(
        buffer_max >= (SMALL_BUFFER - batch) as f64,
        format!("the buffer never filled ({buffer_max:.0} of {SMALL_BUFFER} points at most)"),
    );
    out.check(
        buffer_max <= SMALL_BUFFER as f64,
        format!("the buffer passed its bound ({buffer_max:.0} of {SMALL_BUFFER} points)"),
    );
}

/// A batch of its own on a stream of its own, sent while nothing can be
/// committed (the table locked, the database away), before anything fills
/// the buffer: when its ack arrived, if it did.
async fn probe(locus: &Locus) -> anyhow::Result<tokio::task::JoinHandle<Option<Instant>>> {
    let mut c = IngestClient::new(
        Endpoint::from_shared(locus.grpc_target())?
            .connect()
            .await?,
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<LocationBatch>(1);
    tx.send(junk_batch(1, PROBE_POINTS, "")).await?;
    let mut acks = c
        .stream_locations(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // Queued: in the buffer, waiting for its commit.
    let queued = Instant::now();
    while counter(locus, BUFFER_POINTS).await < PROBE_POINTS as f64 {
        anyhow::ensure!(
            queued.elapsed() < Duration::from_secs(10),
            "the probe's batch was not queued"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(tokio::spawn(async move {
        let _tx = tx;
        match tokio::time::timeout(Duration::from_secs(120), acks.message()).await {
            Ok(Ok(Some(_))) => Some(Instant::now()),
            _ => None,
        }
    }))
}

const PROBE_POINTS: usize = 10;

/// Whether the probe's ack came only after `committable` (when the table
/// was unlocked, or the database back), and, if `must_ack`, whether it came
/// at all (an outage past `--write-retry-deadline` fails the batch instead).
async fn check_probe(
    out: &mut Outcome,
    probe: tokio::task::JoinHandle<Option<Instant>>,
    committable: Instant,
    must_ack: bool,
) -> anyhow::Result<()> {
    let acked = probe.await?;
    out.figure(format!(
        "a {PROBE_POINTS}-point batch queued while nothing could be committed: acknowledged {}",
        match acked {
            Some(t) if t >= committable => format!(
                "{:.1} s after writes could resume",
                (t - committable).as_secs_f64()
            ),
            Some(t) => format!(
                "{:.1} s BEFORE writes could resume",
                (committable - t).as_secs_f64()
            ),
            None => "never (its stream failed, to be sent again)".into(),
        }
    ));
    out.check(
        acked.is_none_or(|t| t >= committable),
        "the probe's batch was acknowledged before it could be committed",
    );
    out.check(
        acked.is_some() || !must_ack,
        "the probe's batch was never acknowledged",
    );
    Ok(())
}

fn fleet_flags(devices: u64, rate: f64, secs: u64) -> Vec<String> {
    fleet_flags_batch(devices, rate, secs, 10)
}

fn fleet_flags_batch(devices: u64, rate: f64, secs: u64, batch: usize) -> Vec<String> {
    vec![
        "--devices".into(),
        devices.to_string(),
        "--rate".into(),
        rate.to_string(),
        "--batch-size".into(),
        batch.to_string(),
        "--duration".into(),
        format!("{secs}s"),
        "--duplicate-share".into(),
        "0.02".into(),
        "--invalid-share".into(),
        "0.01".into(),
    ]
}

/// `flags` with other devices (another seed): a second fleet whose verify
/// does not count the first one's rows as stored but never acknowledged.
fn other_devices(flags: &[String]) -> Vec<String> {
    let mut f = flags.to_vec();
    f.extend(["--seed".into(), "2".into()]);
    f
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `kill -9` twice under load; clients resend what was not acknowledged.
async fn crash(bin: &Path, db: &Db, quick: bool) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new();
    let mut locus = Locus::start(bin, &db.url, BOUNDS).await?;
    let secs = if quick { 16 } else { 60 };
    let fleet = Fleet::start(&locus, db, &strs(&fleet_flags(300, 5.0, secs)))?;
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(secs / 4)).await;
        locus.kill9().await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t = Instant::now();
        locus.restart().await?;
        out.figure(format!(
            "kill -9, restart ready in {:.1} s",
            t.elapsed().as_secs_f64()
        ));
    }
    let (verified, s) = fleet.finish(Duration::from_secs(secs + 120)).await?;
    out.figure(format!(
        "{} points acknowledged, {} client errors (reconnects)",
        n(&s, "acked"),
        n(&s, "errors")
    ));
    out.check(verified, "an acknowledged point is missing or stored twice");
    out.check(n(&s, "acked") > 0.0, "nothing was acknowledged");
    locus.kill9().await?;
    Ok(out)
}

/// The database is away under load: readiness turns false, the buffer fills
/// to its bound and stays there (the streams are no longer read), memory
/// stays bounded, no ack comes before its commit; ingest resumes by itself.
async fn outage(bin: &Path, db: &Db, quick: bool) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new();
    let mut locus = Locus::start(bin, &db.url, &strs(&small_buffer_bounds())).await?;
    let away = Duration::from_secs(if quick { 15 } else { 120 });
    let secs = away.as_secs() + 20;
    let before = rss_mib(locus.pid).unwrap_or(0.0);
    db.cut_off().await?;
    // The probe first, while the buffer has room; the fleet then fills it.
    let probe = probe(&locus).await?;
    let fleet = Fleet::start(&locus, db, &strs(&fleet_flags(300, 5.0, secs)))?;
    let during = sampled(&locus, async {
        tokio::time::sleep(away).await;
        Ok(())
    })
    .await?;
    db.restore().await?;
    let back = Instant::now();
    let mut recovered = None;
    while back.elapsed() < Duration::from_secs(30) {
        if locus.ready().await == Some(true) {
            recovered = Some(back.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (verified, s) = fleet.finish(Duration::from_secs(secs + 120)).await?;
    out.figure(format!(
        "database away {} s: RSS {:.0} MiB before, {:.0} MiB at most during (buffer bound {BUFFER_MIB} MiB); buffer at most {:.0} of {SMALL_BUFFER} points",
        away.as_secs(),
        before,
        during.rss_max,
        during.buffer_max
    ));
    out.figure(format!(
        "not ready in {}/{} samples; ready again {:.1} s after the database returned",
        during.not_ready,
        during.samples,
        recovered.map_or(f64::NAN, |d| d.as_secs_f64())
    ));
    out.figure(format!(
        "{} points acknowledged, {} client errors",
        n(&s, "acked"),
        n(&s, "errors")
    ));
    check_probe(&mut out, probe, back, false).await?;
    check_buffer_full(&mut out, during.buffer_max, 10);
    out.check(verified, "an acknowledged point is missing or stored twice");
    out.check(
        during.not_ready * 2 > during.samples,
        "readiness did not turn false during the outage",
    );
    out.check(recovered.is_some(), "not ready again within 30 s");
    out.check(
        during.rss_max <= before + 3.0 * BUFFER_MIB as f64,
        "memory grew past three times the buffer bound",
    );
    out.check(locus.alive(), "locus died");
    locus.kill9().await?;
    Ok(out)
}

/// COPY blocked for seconds by a lock: the buffer fills to its bound and
/// stays there, backpressure reaches the clients (their acks wait), no ack
/// comes while the lock is held, memory stays bounded, nothing is lost.
async fn slow(bin: &Path, db: &Db, quick: bool) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new();
    let mut locus = Locus::start(bin, &db.url, &strs(&small_buffer_bounds())).await?;
    let hold = Duration::from_secs(if quick { 8 } else { 30 });
    let secs = hold.as_secs() + 15;
    let before = rss_mib(locus.pid).unwrap_or(0.0);
    let mut conn = PgConnection::connect(&db.url).await?;
    let mut tx = conn.begin().await?;
    sqlx::query("LOCK TABLE location_events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    // The probe first, while the buffer has room; the fleet then fills it.
    let probe = probe(&locus).await?;
    let fleet = Fleet::start(&locus, db, &strs(&fleet_flags(300, 10.0, secs)))?;
    let during = sampled(&locus, async {
        tokio::time::sleep(hold).await;
        Ok(())
    })
    .await?;
    let unlocked = Instant::now();
    tx.rollback().await?;
    let (verified, s) = fleet.finish(Duration::from_secs(secs + 120)).await?;
    out.figure(format!(
        "writes blocked {} s: RSS {:.0} MiB before, {:.0} MiB at most; buffer at most {:.0} of {SMALL_BUFFER} points; longest ack {:.0} ms",
        hold.as_secs(),
        before,
        during.rss_max,
        during.buffer_max,
        n(&s, "ack_max_ms")
    ));
    check_probe(&mut out, probe, unlocked, true).await?;
    check_buffer_full(&mut out, during.buffer_max, 10);
    out.check(verified, "an acknowledged point is missing or stored twice");
    out.check(
        n(&s, "ack_max_ms") >= hold.as_millis() as f64 * 0.5,
        "no ack waited for the lock: was anything acknowledged before it was committed?",
    );
    out.check(
        during.rss_max <= before + 3.0 * BUFFER_MIB as f64,
        "memory grew past three times the buffer bound",
    );
    locus.kill9().await?;
    Ok(out)
}

/// More than twice what locus can write, by unary calls: it keeps writing
/// at its rate, refuses the excess with a retry hint that the clients
/// honour, and keeps the p99 of what it accepts bounded.
///
/// "Sustainable" is the most that closed-loop callers get through without a
/// refusal: as many callers as the buffer holds calls, less two (38 of 500
/// points against 20,000; more could be refused), before and after the
/// overload (their mean: the machine and the table drift). It is the
/// writer's maximum, not what the callers' latency allowed, if the one
/// writer was busy all along (`locus_flush_duration_seconds`). The
/// overload is an open loop: new batches on a fixed schedule at 2.5 times
/// the rate measured before, whatever the answers, each refused one sent
/// again after its hint beside them, so that "offered" counts distinct
/// points, not retries.
async fn overload(bin: &Path, db: &Db, quick: bool) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new();
    // One writer and a small buffer make the ceiling low and the excess
    // easy to reach on two cores.
    const BATCH: usize = 500;
    const BUFFER: usize = 20_000;
    let buffer = BUFFER.to_string();
    let flags = [
        "--writers",
        "1",
        "--db-pool-size",
        "4",
        "--buffer-points",
        buffer.as_str(),
        "--max-batch-points",
        "1000",
    ];
    let callers = BUFFER / BATCH - 2;
    let mut locus = Locus::start(bin, &db.url, &flags).await?;
    let secs: u64 = if quick { 10 } else { 30 };
    let postmaster = postmaster(&db.url).await?;
    // Each run on devices of its own (a seed each): --verify counts another
    // run's rows on the same devices as stored but never acknowledged.
    let fleet = |mode: Vec<String>, seed: &'static str| {
        let mut flags = fleet_flags_batch(2_000, 0.0, secs, BATCH);
        flags.extend(["--mode".into(), "unary".into()]);
        flags.extend(["--fix-interval".into(), "0.01".into()]);
        flags.extend(["--seed".into(), seed.into()]);
        flags.extend(mode);
        let locus = &locus;
        async move {
            let before = refused(locus).await;
            let writing = || async {
                (
                    counter(locus, "locus_flush_duration_seconds_sum").await,
                    counter(locus, "locus_batch_rows_sum").await,
                    counter(locus, "locus_batch_rows_count").await,
                )
            };
            let writing0 = writing().await;
            let cpu = || {
                let own = proc_times(locus.pid).map_or(0.0, |t| t.0);
                (own, pg_cpu(postmaster))
            };
            let cpu0 = cpu();
            let (verified, mut summary) = Fleet::start(locus, db, &strs(&flags))?
                .finish(Duration::from_secs(secs + 120))
                .await?;
            // PostgreSQL's includes the verify's queries; the clients'
            // is what they spent driving, before them.
            let cpu1 = cpu();
            let per_sec = |x: f64| Value::from(x / secs as f64);
            summary["locus_cpu_s"] = per_sec(cpu1.0 - cpu0.0);
            summary["pg_cpu_s"] = per_sec(cpu1.1 - cpu0.1);
            summary["cpu_s"] = per_sec(n(&summary, "cpu_s"));
            // The share of the run the one writer spent writing, and the
            // rows of its COPYs.
            let writing1 = writing().await;
            summary["writer_busy"] = per_sec(writing1.0 - writing0.0);
            summary["rows_a_copy"] =
                ((writing1.1 - writing0.1) / (writing1.2 - writing0.2).max(1.0)).into();
            summary["locus_refused"] = refused(locus).await.saturating_sub(before).into();
            anyhow::Ok((verified, summary))
        }
    };
    let closed = vec!["--concurrency".to_string(), callers.to_string()];
    let rate = |s: &Value| n(s, "window_points_per_sec");
    let (ok1, before) = fleet(closed.clone(), "1").await?;
    let target = 2.5 * rate(&before);
    let (ok2, over) = fleet(
        vec!["--offered-rate".to_string(), format!("{target:.0}")],
        "2",
    )
    .await?;
    let (ok3, after) = fleet(closed, "3").await?;
    let sustained = (rate(&before) + rate(&after)) / 2.0;
    let offered = n(&over, "offered_per_sec");
    let accepted = rate(&over);
    let closed_refused: f64 = [&before, &after]
        .iter()
        .map(|s| n(s, "refused") + n(s, "locus_refused"))
        .sum();
    out.figure(format!(
        "sustainable {sustained:.0} points/s: the mean of {callers} closed-loop callers before and after the overload, {:.0} and {:.0} points/s (ack p99 {:.0} / {:.0} ms, {closed_refused:.0} calls refused); they keep {} points of the {BUFFER}-point buffer in flight (more could be refused), and the one writer was busy {:.2} / {:.2} of the time",
        rate(&before),
        rate(&after),
        n(&before, "ack_p99_ms"),
        n(&after, "ack_p99_ms"),
        callers * BATCH,
        n(&before, "writer_busy"),
        n(&after, "writer_busy"),
    ));
    for (name, s) in [
        ("before", &before),
        ("the open loop", &over),
        ("after", &after),
    ] {
        out.figure(format!(
            "{name}: CPU s per s clients {:.2}, locus {:.2}, PostgreSQL {:.2}; {:.0} rows a COPY",
            n(s, "cpu_s"),
            n(s, "locus_cpu_s"),
            n(s, "pg_cpu_s"),
            n(s, "rows_a_copy"),
        ));
    }
    out.figure(format!(
        "overload: an open loop offered {offered:.0} distinct points/s ({:.1}x) for {secs} s, {accepted:.0} accepted ({:.2} of sustainable; the writer busy {:.2}), ack p99 {:.0} ms",
        offered / sustained,
        accepted / sustained,
        n(&over, "writer_busy"),
        n(&over, "ack_p99_ms"),
    ));
    let closest = (
        over["closest_retry_wait_ms"].as_f64(),
        over["closest_retry_hint_ms"].as_f64(),
    );
    out.figure(format!(
        "{:.0} calls refused ({:.0} counted by locus), {:.0} of them without a retry hint; {:.0} batches sent again after their hint, the soonest {} ms after its refusal against a hint of {} ms; {:.0} points still waiting when the run ended, given up",
        n(&over, "refused"),
        n(&over, "locus_refused"),
        n(&over, "refused_without_hint"),
        n(&over, "retries"),
        closest.0.map_or("-".into(), |w| format!("{w:.0}")),
        closest.1.map_or("-".into(), |h| format!("{h:.0}")),
        n(&over, "abandoned"),
    ));
    out.check(
        ok1 && ok2 && ok3,
        "an acknowledged point is missing or stored twice",
    );
    out.check(
        closed_refused == 0.0,
        "a closed-loop caller within the buffer was refused: sustainable is not a rate without refusals",
    );
    out.check(
        n(&before, "writer_busy") >= 0.9 && n(&after, "writer_busy") >= 0.9,
        "the writer was idle more than a tenth of a closed-loop run: sustainable is what the callers' latency allowed, not the writer's maximum",
    );
    out.check(
        offered >= 2.0 * sustained,
        "the offered load was not twice the sustainable rate",
    );
    out.check(
        accepted >= 0.8 * sustained,
        "throughput fell by more than 20% under overload",
    );
    out.check(
        n(&over, "ack_p99_ms") <= 2_000.0,
        "the p99 latency of accepted calls passed 2 s",
    );
    out.check(n(&over, "refused") > 0.0, "nothing was refused");
    out.check(
        n(&over, "refused_without_hint") == 0.0,
        "a refusal carried no retry hint",
    );
    out.check(
        n(&over, "retries") > 0.0 && closest.0.zip(closest.1).is_some_and(|(w, h)| w >= h),
        "a refused batch was sent again before its retry hint had passed",
    );
    locus.kill9().await?;
    Ok(out)
}

/// `locus_requests_refused_total{reason="buffer_full"}`.
async fn refused(locus: &Locus) -> u64 {
    counter(
        locus,
        "locus_requests_refused_total{reason=\"buffer_full\"}",
    )
    .await as u64
}

/// The sum of every series of /metrics whose name (with labels, if given)
/// starts with `series` (0 if none).
async fn counter(locus: &Locus, series: &str) -> f64 {
    let text = locus.metrics().await.unwrap_or_default();
    // + 0.0: a sum of nothing is -0.0.
    text.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum::<f64>()
        + 0.0
}

/// Idle streams, streams that never read their acks, a flood of stream
/// resets, oversized messages, deep and huge metadata, a gzip bomb: each is
/// limited, locus stays up, and a well-behaved fleet keeps its rate in
/// every second (a stall of its acks shows).
async fn hostile(bin: &Path, db: &Db, quick: bool) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new();
    let idle_streams: usize = if quick { 2_000 } else { 10_000 };
    // Room for the well-behaved fleet's 200 streams, the deaf ones, and
    // half the idle ones: the other half must be refused.
    const GOOD_DEVICES: u64 = 200;
    const GOOD_RATE: f64 = 5.0;
    const DEAF: usize = 20;
    let max_streams = idle_streams / 2 + GOOD_DEVICES as usize + DEAF;
    let max_streams_flag = max_streams.to_string();
    let mut flags: Vec<&str> = BOUNDS.to_vec();
    flags.extend(["--max-streams", &max_streams_flag]);
    let mut locus = Locus::start(bin, &db.url, &flags).await?;
    let secs: u64 = if quick { 10 } else { 30 };
    let good = fleet_flags(GOOD_DEVICES, GOOD_RATE, secs);
    // The well-behaved fleet alone, then beside the hostile clients.
    let (ok1, alone) = Fleet::start(&locus, db, &strs(&good))?
        .finish(Duration::from_secs(secs + 60))
        .await?;

    // The fleet connects first, then the deaf streams: the idle ones then
    // take what is left, and are refused past it.
    let fleet = Fleet::start(&locus, db, &strs(&other_devices(&good)))?;
    let fleet_ends = tokio::time::Instant::now() + Duration::from_secs(secs);
    let connecting = Instant::now();
    while counter(&locus, OPEN_STREAMS).await < GOOD_DEVICES as f64
        && connecting.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let endpoint = Endpoint::from_shared(locus.grpc_target())?;
    let mut c = IngestClient::new(endpoint.connect().await?);
    // Streams that send without end and never read an ack, each on a
    // connection of its own: until locus stops reading them.
    let rss_before_deaf = rss_mib(locus.pid).unwrap_or(0.0);
    let taken = Arc::new(AtomicU64::new(0));
    let mut deaf = Vec::new();
    for _ in 0..DEAF {
        deaf.push(DeafStream::open(&locus, Arc::clone(&taken)).await?);
    }
    let deaf_opened = Instant::now();
    let mut last = (Instant::now(), taken.load(Relaxed));
    while last.0.elapsed() < Duration::from_millis(500)
        && deaf_opened.elapsed() < Duration::from_secs(3)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = taken.load(Relaxed);
        if now != last.1 {
            last = (Instant::now(), now);
        }
    }
    let rss_deaf = rss_mib(locus.pid).unwrap_or(0.0);
    let deaf_taken = taken.load(Relaxed);
    let deaf_stalled = last.0.elapsed() >= Duration::from_millis(500);
    let mut channels = Vec::new();
    // HTTP/2 servers allow a bounded number of streams per connection.
    for _ in 0..idle_streams.div_ceil(100) {
        channels.push(endpoint.connect().await?);
    }
    // Idle streams: opened, never sent on.
    let mut idle = Vec::new();
    let mut idle_refused = Vec::new();
    for i in 0..idle_streams {
        let mut c = IngestClient::new(channels[i % channels.len()].clone());
        let (tx, rx) = tokio::sync::mpsc::channel::<LocationBatch>(1);
        match c
            .stream_locations(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            Ok(resp) => idle.push((tx, resp)),
            Err(status) => idle_refused.push(status.code()),
        }
    }
    let open_streams = counter(&locus, OPEN_STREAMS).await;
    let fds_idle = open_fds(locus.pid).unwrap_or(0);
    let rss_idle = rss_mib(locus.pid).unwrap_or(0.0);
    let attacks = async {
        // A flood of resets: streams opened and dropped at once.
        for _ in 0..2_000 {
            let (_tx, rx) = tokio::sync::mpsc::channel::<LocationBatch>(1);
            let _ = c
                .stream_locations(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await;
        }
        // An oversized message.
        let big = junk_batch(1, 1, &format!("{{\"x\": \"{}\"}}", "a".repeat(5 << 20)));
        let e = c.write_locations(big).await.err();
        let oversized = e.as_ref().map(|s| s.code());
        // Deep and huge metadata: each point rejected alone.
        let deep = format!(
            "{}{}",
            "{\"a\":".repeat(200),
            "1".to_string() + &"}".repeat(200)
        );
        let huge = format!("{{\"x\": \"{}\"}}", "a".repeat(10_000));
        let mut mixed = junk_batch(2, 3, "");
        mixed.locations[0].metadata_json = deep;
        mixed.locations[1].metadata_json = huge;
        let (accepted, reasons) = match c.write_locations(mixed).await {
            Ok(ack) => {
                let ack = ack.into_inner();
                (
                    ack.accepted,
                    ack.rejected.iter().map(|r| r.reason.clone()).collect(),
                )
            }
            Err(s) => (0, vec![format!("the batch refused: {:?}", s.code())]),
        };
        // A gzip bomb: 1 GiB of zeros (64 MiB quick), about 1 MiB compressed.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..if quick { 64 } else { 1024 } {
            gz.write_all(&zeros)?;
        }
        let bomb = gz.finish()?;
        let status = reqwest::Client::new()
            .post(format!("{}/v1/locations", locus.http_target()))
            .header("content-encoding", "gzip")
            .header("content-type", "application/json")
            .body(bomb)
            .send()
            .await?
            .status()
            .as_u16();
        // The deaf streams stay for the fleet's run, then leave.
        tokio::time::sleep_until(fleet_ends).await;
        drop(deaf);
        anyhow::Ok((oversized, accepted, reasons, status))
    };
    let (attacked, beside) = tokio::join!(attacks, fleet.finish(Duration::from_secs(secs + 60)));
    let (oversized, accepted, reasons, bomb_status) = attacked?;
    let (ok2, beside) = beside?;
    out.figure(format!(
        "{idle_streams} idle streams against --max-streams {max_streams} (beside the fleet's {GOOD_DEVICES} and {DEAF} deaf ones): {} refused ({:?}), {open_streams:.0} streams open; {fds_idle} fds, {rss_idle:.0} MiB RSS",
        idle_refused.len(),
        idle_refused.first()
    ));
    // What locus may hold for a deaf stream: what HTTP/2 lets its client
    // send unread (hyper's initial stream window, 1 MiB, which locus keeps;
    // its connection window is as large), twice (each frame received keeps
    // the read buffer it was cut from), and the batches read before the
    // stream stopped being read (--stream-inflight awaiting their ack, as
    // many acks waiting to be sent, and the one in hand), each at most
    // DEAF_BATCH_BYTES; and 16 MiB for the allocator and the fleet beside.
    let per_deaf = 2 * H2_WINDOW + (2 * STREAM_INFLIGHT + 2) * DEAF_BATCH_BYTES;
    let deaf_bound = (DEAF * per_deaf) as f64 / MIB as f64 + 16.0;
    out.figure(format!(
        "{DEAF} deaf streams, each on a connection of its own, sending {DEAF_POINTS}-point batches without end: {deaf_taken} batches handed to their connections before locus {}; RSS {rss_before_deaf:.0} MiB before them, {rss_deaf:.0} MiB after (bound {:.0} MiB: {} KiB a deaf stream + 16 MiB)",
        if deaf_stalled {
            format!(
                "stopped reading them (no batch taken for 0.5 s, {:.1} s after they opened)",
                (last.0 - deaf_opened).as_secs_f64()
            )
        } else {
            "still read them 3 s after they opened".to_string()
        },
        rss_before_deaf + deaf_bound,
        per_deaf / 1024
    ));
    let seconds = |s: &Value| -> Vec<f64> {
        s["answered_per_sec"]
            .as_array()
            .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(0.0)).collect())
            .unwrap_or_default()
    };
    // Whole seconds of the run but the first and the last (connecting,
    // and the acks after the last batch).
    let lowest = |s: &Value| {
        let v = seconds(s);
        (1..secs as usize - 1)
            .map(|i| v.get(i).copied().unwrap_or(0.0))
            .fold(f64::INFINITY, f64::min)
    };
    let nominal = GOOD_DEVICES as f64 * GOOD_RATE;
    out.figure(format!(
        "well-behaved fleet ({nominal:.0} points/s offered): {:.0} points/s alone, {:.0} beside the attacks; the fewest in a second {:.0} alone, {:.0} beside; ack p99 {:.0} / {:.0} ms, longest {:.0} / {:.0} ms; beside, a second: {:?}",
        n(&alone, "points_per_sec"),
        n(&beside, "points_per_sec"),
        lowest(&alone),
        lowest(&beside),
        n(&alone, "ack_p99_ms"),
        n(&beside, "ack_p99_ms"),
        n(&alone, "ack_max_ms"),
        n(&beside, "ack_max_ms"),
        seconds(&beside)
    ));
    out.figure(format!(
        "oversized message: {oversized:?}; deep and huge metadata: {reasons:?} ({accepted} good point stored); gzip bomb: HTTP {bomb_status}"
    ));
    out.check(
        ok1 && ok2,
        "an acknowledged point is missing or stored twice",
    );
    out.check(
        open_streams <= max_streams as f64 && idle.len() + DEAF <= max_streams,
        "more streams were open than --max-streams",
    );
    out.check(
        !idle_refused.is_empty(),
        "no idle stream was refused past --max-streams",
    );
    out.check(
        idle_refused
            .iter()
            .all(|c| *c == tonic::Code::ResourceExhausted),
        "a stream past --max-streams was not refused with RESOURCE_EXHAUSTED",
    );
    out.check(
        oversized == Some(tonic::Code::OutOfRange),
        format!("the oversized message was answered {oversized:?}, not OUT_OF_RANGE"),
    );
    out.check(
        reasons == ["metadata_invalid", "metadata_too_large"] && accepted == 1,
        "deep or huge metadata was not rejected alone",
    );
    out.check(bomb_status == 413, "the gzip bomb was not refused with 413");
    out.check(
        n(&beside, "points_per_sec") >= 0.9 * n(&alone, "points_per_sec"),
        "the well-behaved fleet lost more than 10% of its rate",
    );
    // A paced fleet makes up its rate after a stall; its acks' wait shows it.
    out.check(
        n(&beside, "ack_p99_ms") < 2_000.0,
        "the well-behaved fleet's ack p99 passed 2 s beside the attacks (a stall)",
    );
    out.check(
        deaf_stalled,
        "locus kept reading streams that never read their acks",
    );
    out.check(
        rss_deaf <= rss_before_deaf + deaf_bound,
        format!(
            "the deaf streams took locus's RSS past its bound ({rss_deaf:.0} MiB, bound {:.0} MiB)",
            rss_before_deaf + deaf_bound
        ),
    );
    // A paced fleet makes up its rate after a stall, so its rate over the
    // run hides one; a second with few acks shows it.
    out.check(
        lowest(&beside) >= 0.5 * nominal,
        format!(
            "the well-behaved fleet's acks stalled beside the attacks (a second with {:.0} points answered, under half the {nominal:.0} it offers)",
            lowest(&beside)
        ),
    );
    out.check(locus.alive(), "locus died");
    drop(idle);
    locus.kill9().await?;
    Ok(out)
}

/// Thousands of connections that send part of a request and hold it, and
/// gRPC connections that never send the HTTP/2 preface, past the bounds:
/// the well-behaved fleet keeps its rate, readiness answers, the storage
/// job runs, the held connections are closed at the deadlines, and the
/// descriptors and memory of locus stay bounded.
async fn connections(bin: &Path, db: &Db, quick: bool) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new();
    // The client's own descriptors: every held connection is one.
    let (own_limit, _) = locus::connections::raise_file_limit()?;
    let (http_held, grpc_held): (usize, usize) = if quick {
        (1_500, 1_000)
    } else {
        (6_000, 3_000)
    };
    anyhow::ensure!(
        (http_held + grpc_held + 500) as u64 <= own_limit,
        "this client's open-file limit ({own_limit}) is too low for {http_held} + {grpc_held} connections"
    );
    let (http_bound, grpc_bound) = (http_held / 3, grpc_held / 2);
    let deadline = Duration::from_secs(if quick { 3 } else { 5 });
    let secs: u64 = if quick { 12 } else { 30 };
    let (hb, gb, d) = (
        http_bound.to_string(),
        grpc_bound.to_string(),
        format!("{}s", deadline.as_secs()),
    );
    let mut flags: Vec<&str> = BOUNDS.to_vec();
    flags.extend([
        "--max-connections-http",
        &hb,
        "--max-connections-grpc",
        &gb,
        "--handshake-timeout",
        &d,
        "--header-read-timeout",
        &d,
        "--hourly-refresh-interval",
        "1s",
    ]);
    let mut locus = Locus::start(bin, &db.url, &flags).await?;
    let good = fleet_flags(200, 5.0, secs);
    let (ok1, alone) = Fleet::start(&locus, db, &strs(&good))?
        .finish(Duration::from_secs(secs + 60))
        .await?;
    let fds_before = open_fds(locus.pid).unwrap_or(0);
    let rss_before = rss_mib(locus.pid).unwrap_or(0.0);

    let fleet = Fleet::start(&locus, db, &strs(&other_devices(&good)))?;
    // Let the fleet connect before its slots are fought over.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let attack_started = chrono::Utc::now();
    let mut fds_max = 0;
    let mut closed_late = Vec::new();
    let mut still_open = 0;
    let mut held_total = 0;
    let during = sampled(&locus, async {
        // Waves of held connections for the fleet's run: each wave past
        // the bounds, each held until the server closes it.
        let started = Instant::now();
        while started.elapsed() + deadline * 2 < Duration::from_secs(secs) {
            // Each held connection is watched from its own connect, by a
            // task of its own, so that the time a wave takes to open does
            // not count against the deadline of the ones opened first.
            let mut held = Vec::new();
            for i in 0..http_held + grpc_held {
                let (port, first): (u16, &'static [u8]) = if i < http_held {
                    (locus.http, b"GET / HTTP/1.1\r\n")
                } else {
                    (
                        locus.grpc,
                        if i % 2 == 0 {
                            b""
                        } else {
                            b"PRI * HTTP/2.0\r\n"
                        },
                    )
                };
                if let Ok(mut c) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let connected = tokio::time::Instant::now();
                    let _ = tokio::io::AsyncWriteExt::write_all(&mut c, first).await;
                    held.push(tokio::spawn(async move {
                        let mut buf = [0u8; 512];
                        let limit = connected + deadline * 3;
                        loop {
                            match tokio::time::timeout_at(
                                limit,
                                tokio::io::AsyncReadExt::read(&mut c, &mut buf),
                            )
                            .await
                            {
                                Err(_) => return None,
                                Ok(Ok(0)) | Ok(Err(_)) => return Some(connected.elapsed()),
                                Ok(Ok(_)) => {}
                            }
                        }
                    }));
                }
            }
            held_total += held.len();
            fds_max = fds_max.max(open_fds(locus.pid).unwrap_or(0));
            let closes = held
                .into_iter()
                .map(|task| async move { task.await.ok().flatten() });
            for c in futures::future::join_all(closes).await {
                match c {
                    Some(t) => closed_late.push(t),
                    None => still_open += 1,
                }
            }
        }
        Ok(())
    })
    .await?;
    let (ok2, beside) = fleet.finish(Duration::from_secs(secs + 60)).await?;
    let fds_after = open_fds(locus.pid).unwrap_or(0);
    let rss_max = during.rss_max;
    let latest = closed_late.iter().max().copied().unwrap_or_default();
    let mut conn = PgConnection::connect(&db.url).await?;
    let rollups: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM locus_job_runs WHERE job = 'hourly_rollup' AND ok AND started_at > $1",
    )
    .bind(attack_started)
    .fetch_one(&mut conn)
    .await?;
    let refused = counter(&locus, "locus_connections_closed_total").await;
    out.figure(format!(
        "{held_total} connections held in waves of {http_held} partial HTTP requests and {grpc_held} gRPC without a preface (bounds {http_bound} and {grpc_bound}, deadlines {} s): {refused:.0} refused or closed by a limit, the last closed {:.1} s after it connected, {still_open} still open past 3 deadlines",
        deadline.as_secs(),
        latest.as_secs_f64()
    ));
    out.figure(format!(
        "locus: {fds_before} fds before, at most {fds_max} during, {fds_after} after; RSS {rss_before:.0} MiB before, at most {rss_max:.0} MiB during"
    ));
    out.figure(format!(
        "well-behaved fleet: {:.0} points/s alone, {:.0} beside the held connections (ack p99 {:.0} / {:.0} ms); /readyz not ready or silent in {}/{} samples; {rollups} hourly rollups ran during",
        n(&alone, "points_per_sec"),
        n(&beside, "points_per_sec"),
        n(&alone, "ack_p99_ms"),
        n(&beside, "ack_p99_ms"),
        during.not_ready,
        during.samples
    ));
    out.check(
        ok1 && ok2,
        "an acknowledged point is missing or stored twice",
    );
    out.check(
        n(&beside, "points_per_sec") >= 0.9 * n(&alone, "points_per_sec"),
        "the well-behaved fleet lost more than 10% of its rate",
    );
    out.check(
        n(&beside, "ack_p99_ms") < 1_000.0,
        "the fleet's ack p99 passed 1 s",
    );
    out.check(during.not_ready == 0, "/readyz did not answer ready");
    out.check(rollups >= 1, "the storage job did not run");
    out.check(still_open == 0, "held connections were not closed");
    out.check(
        latest <= deadline + Duration::from_secs(2),
        "held connections were closed later than the deadline",
    );
    out.check(
        fds_max <= fds_before + http_bound + grpc_bound + 100,
        "locus held more descriptors than its connection bounds",
    );
    out.check(
        rss_max <= rss_before + 3.0 * BUFFER_MIB as f64,
        "memory grew past three times the buffer bound",
    );
    out.check(locus.alive(), "locus died");
    locus.kill9().await?;
    Ok(out)
}

/// Requests small on the wire that would be large once parsed, each alone
/// and then `at_once` of each kind at once, against locus with its
/// default limits: locus's peak RSS (VmHWM, in a fresh process each round)
/// for each.
async fn amplify(bin: &Path, db: &Db, at_once: usize) -> anyhow::Result<Outcome> {
    // The defaults of --max-message-bytes and --max-decompressed-bytes.
    const MAX_MESSAGE: usize = 4 * MIB;
    const MAX_DECOMPRESSED: usize = 16 * MIB;
    let mut out = Outcome::new();
    let mut locus = Locus::start(bin, &db.url, &[]).await?;
    // `{"locations":[0,0,...]}`: a body of `0,` elements, gzip-compressed
    // (8 million of them in about 16 KB) or plain (4 MiB).
    let zeros = |n: usize| {
        let mut body = Vec::with_capacity(2 * n + 16);
        body.extend_from_slice(b"{\"locations\":[");
        for _ in 0..n - 1 {
            body.extend_from_slice(b"0,");
        }
        body.extend_from_slice(b"0]}");
        body
    };
    let bomb = {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&zeros(8_000_000))?;
        bytes::Bytes::from(gz.finish()?)
    };
    let plain = bytes::Bytes::from(zeros((MAX_MESSAGE - 32) / 2));
    // A stream message of empty locations (field 2, length 0: two bytes each).
    let message = bytes::Bytes::from([0x12u8, 0].repeat(MAX_MESSAGE / 2 - 8));
    let http = reqwest::Client::new();
    let url = format!("{}/v1/locations", locus.http_target());
    let post = |body: bytes::Bytes, gzip: bool| {
        let mut req = http
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        if gzip {
            req = req.header("content-encoding", "gzip");
        }
        async move { anyhow::Ok(req.send().await?.status().as_u16().to_string()) }
    };
    let endpoint = Endpoint::from_shared(locus.grpc_target())?;
    let stream = |raw: bytes::Bytes| {
        let endpoint = endpoint.clone();
        async move {
            let channel = endpoint.connect().await?;
            let resp = locus_load::raw_calls::stream_encoded::<locus::proto::BatchAck, _>(
                channel,
                locus::ingest::grpc::STREAM_LOCATIONS,
                tokio_stream::iter([raw]),
            )
            .await;
            let code = match resp {
                Err(s) => s.code(),
                Ok(r) => match r.into_inner().message().await {
                    Err(s) => s.code(),
                    Ok(_) => tonic::Code::Ok,
                },
            };
            anyhow::Ok(format!("{code:?}"))
        }
    };
    let reset_peak = |pid: u32| std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    let mut peaks = Vec::new();
    for kind in ["gzip bomb", "plain", "stream", "all"] {
        // A fresh process each time: memory freed is not always given back,
        // and would count in the next peak.
        locus.restart().await?;
        if kind == "all" {
            break;
        }
        reset_peak(locus.pid)?;
        let answer = match kind {
            "gzip bomb" => post(bomb.clone(), true).await?,
            "plain" => post(plain.clone(), false).await?,
            _ => stream(message.clone()).await?,
        };
        let peak = rss_peak_mib(locus.pid).unwrap_or(0.0);
        peaks.push(peak);
        out.figure(format!(
            "{kind} ({} bytes sent): answered {answer}, peak RSS {peak:.0} MiB",
            match kind {
                "gzip bomb" => bomb.len(),
                "plain" => plain.len(),
                _ => message.len(),
            }
        ));
        out.check(
            answer == "413" || answer == "InvalidArgument",
            format!("{kind}: answered {answer}, not refused as too many points"),
        );
    }
    let idle = rss_mib(locus.pid).unwrap_or(0.0);
    reset_peak(locus.pid)?;
    let mut all = Vec::new();
    for _ in 0..at_once {
        all.push(tokio::spawn(post(bomb.clone(), true)));
        all.push(tokio::spawn(post(plain.clone(), false)));
        all.push(tokio::spawn(stream(message.clone())));
    }
    let mut answers = Vec::new();
    for a in all {
        answers.push(a.await??);
    }
    let peak_all = rss_peak_mib(locus.pid).unwrap_or(0.0);
    // What those requests may hold at once: each gzip body decompressed up
    // to its cap, each plain body and stream message twice (as received,
    // and as read into one buffer), plus 8 MiB each for what parsing builds
    // before it stops at --max-batch-points (10,000 locations).
    let bound = idle
        + (at_once * (MAX_DECOMPRESSED + 2 * MAX_MESSAGE + 2 * MAX_MESSAGE + 3 * 8 * MIB)) as f64
            / MIB as f64;
    out.figure(format!(
        "RSS {idle:.0} MiB idle; {at_once} of each at once: peak {peak_all:.0} MiB (bound {bound:.0} MiB), answers {answers:?}"
    ));
    out.check(
        answers.iter().all(|a| a == "413" || a == "InvalidArgument"),
        "a request was not refused as too many points",
    );
    out.check(
        peak_all <= bound,
        format!("peak RSS {peak_all:.0} MiB over the bound {bound:.0} MiB"),
    );
    out.check(locus.alive(), "locus died");
    locus.kill9().await?;
    Ok(out)
}

fn junk_batch(batch_id: u64, points: usize, metadata: &str) -> LocationBatch {
    let device = uuid::Uuid::new_v4().to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    LocationBatch {
        batch_id,
        locations: (0..points)
            .map(|i| Location {
                time: Some(prost_types::Timestamp {
                    seconds: now - 60 - i as i64 - batch_id as i64 * 1_000,
                    nanos: 0,
                }),
                device_id: device.clone(),
                user_id: device.clone(),
                app_source: "hostile".into(),
                latitude: 10.0,
                longitude: 10.0,
                metadata_json: metadata.to_string(),
                ..Default::default()
            })
            .collect(),
    }
}

/// A stream that sends batches of [`DEAF_POINTS`] without end and never
/// reads an ack, on a connection of its own whose receive window
/// ([`DEAF_WINDOW`]) a few acks fill: from then on locus cannot send it
/// anything. Each batch the client takes to send counts in `taken`.
/// Dropped, it shuts its connection down (its sending half would keep it
/// open, waiting for a window that never comes).
struct DeafStream {
    socket: Option<std::net::TcpStream>,
    _channel: tonic::transport::Channel,
    _acks: tonic::Response<tonic::Streaming<locus::proto::BatchAck>>,
}

impl DeafStream {
    async fn open(locus: &Locus, taken: Arc<AtomicU64>) -> anyhow::Result<DeafStream> {
        // The connection, with a handle on its socket kept to shut it down.
        let socket = Arc::new(std::sync::Mutex::new(None));
        let port = locus.grpc;
        let kept = Arc::clone(&socket);
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let kept = Arc::clone(&kept);
            async move {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                let std = tcp.into_std()?;
                if let Ok(mut k) = kept.lock() {
                    *k = Some(std.try_clone()?);
                }
                let tcp = tokio::net::TcpStream::from_std(std)?;
                std::io::Result::Ok(hyper_util::rt::TokioIo::new(tcp))
            }
        });
        let channel = Endpoint::from_shared(locus.grpc_target())?
            .initial_stream_window_size(DEAF_WINDOW)
            .connect_with_connector(connector)
            .await?;
        let batches = futures::stream::iter(0u64..).map(move |b| {
            taken.fetch_add(1, Relaxed);
            // Times within the last day, a device a batch.
            junk_batch(b % 64, DEAF_POINTS, "")
        });
        let acks = IngestClient::new(channel.clone())
            .stream_locations(batches)
            .await?;
        let socket = socket.lock().ok().and_then(|mut s| s.take());
        Ok(DeafStream {
            socket,
            _channel: channel,
            _acks: acks,
        })
    }
}

impl Drop for DeafStream {
    fn drop(&mut self) {
        if let Some(s) = &self.socket {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

const DEAF_POINTS: usize = 10;
/// A deaf stream's batch, encoded (about 120 bytes a point), with room.
const DEAF_BATCH_BYTES: usize = 4 * 1024;
const DEAF_WINDOW: u32 = 1024;
const MIB: usize = 1 << 20;
/// hyper's initial HTTP/2 stream (and connection) window as a server: what
/// a client may send on a stream before locus reads it. locus keeps it.
const H2_WINDOW: usize = MIB;
/// locus's default --stream-inflight, which the cases keep.
const STREAM_INFLIGHT: usize = 16;

const ACCEPTED: &str = "locus_points_accepted_total";
const OPEN_STREAMS: &str = "locus_open_streams";

/// The soak's fleet: vehicles on their own streams, a point a message.
const SOAK_DEVICES: u64 = 2_000;

/// First the soak's fleet flat out for 30 s, to find its maximum rate on
/// this machine; then `length` at 70% of it, PostgreSQL stopped for 20 s
/// and started again every 10 minutes: RSS and open file descriptors stay
/// flat, the rate holds, and nothing acknowledged is lost.
async fn soak(bin: &Path, db: &Db, length: Duration) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new();
    let mut locus = Locus::start(bin, &db.url, BOUNDS).await?;
    let (ok, calibration) = Fleet::start(
        &locus,
        db,
        &strs(&fleet_flags_batch(SOAK_DEVICES, 0.0, 30, 1)),
    )?
    .finish(Duration::from_secs(300))
    .await?;
    let max = n(&calibration, "points_per_sec");
    out.check(
        ok,
        "calibration: an acknowledged point is missing or stored twice",
    );
    let target = 0.7 * max;
    let mut flags = fleet_flags_batch(
        SOAK_DEVICES,
        target / SOAK_DEVICES as f64,
        length.as_secs(),
        1,
    );
    flags.extend(["--seed".into(), "2".into()]);
    let fleet = Fleet::start(&locus, db, &strs(&flags))?;
    out.figure(format!(
        "{SOAK_DEVICES} device streams, a point a message: at most {max:.0} points/s flat out, so the soak offers {target:.0} points/s for {:.0} min",
        length.as_secs_f64() / 60.0
    ));
    let started = Instant::now();
    let warm = Duration::from_secs(60).min(length / 4);
    tokio::time::sleep(warm).await;
    let usage = |pid| (rss_mib(pid).unwrap_or(0.0), open_fds(pid).unwrap_or(0));
    let first = usage(locus.pid);
    let (mut rss_max, mut fds_max) = first;
    let every = Duration::from_secs(600).min(length / 3);
    let mut connected = Vec::new();
    let mut next_outage = every;
    let mut outages = 0;
    // Points accepted a second over 10-second windows while the database
    // was up, not counting the 90 s after each restart.
    let mut rates = Vec::new();
    let mut settled_at = Instant::now();
    let mut window = (Instant::now(), counter(&locus, ACCEPTED).await);
    while started.elapsed() + Duration::from_secs(30) < length {
        if started.elapsed() >= next_outage {
            db.cut_off().await?;
            tokio::time::sleep(Duration::from_secs(20)).await;
            db.restore().await?;
            outages += 1;
            next_outage += every;
            settled_at = Instant::now() + Duration::from_secs(90);
        } else {
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        let now = (Instant::now(), counter(&locus, ACCEPTED).await);
        if window.0 >= settled_at {
            rates.push((now.1 - window.1) / (now.0 - window.0).as_secs_f64());
        }
        window = now;
        let (rss, fds) = usage(locus.pid);
        (rss_max, fds_max) = (rss_max.max(rss), fds_max.max(fds));
        connected.push((rss, fds));
    }
    // The trend while the fleet is connected: the median of the last third
    // of the samples against that of the first third.
    let third = |part: usize| {
        let k = connected.len() / 3;
        let mut rss: Vec<f64> = connected[part * k..(part + 1) * k]
            .iter()
            .map(|u| u.0)
            .collect();
        let mut fds: Vec<usize> = connected[part * k..(part + 1) * k]
            .iter()
            .map(|u| u.1)
            .collect();
        rss.sort_by(f64::total_cmp);
        fds.sort_unstable();
        (
            rss.get(k / 2).copied().unwrap_or(0.0),
            fds.get(k / 2).copied().unwrap_or(0),
        )
    };
    let (early, late) = (third(0), third(2));
    rates.sort_by(f64::total_cmp);
    let median = rates.get(rates.len() / 2).copied().unwrap_or(0.0);
    let lowest = rates.first().copied().unwrap_or(0.0);
    let (verified, s) = fleet.finish(length + Duration::from_secs(900)).await?;
    let last = usage(locus.pid);
    out.figure(format!(
        "PostgreSQL stopped for 20 s and started again {outages} times; after {:.0} s of warm-up RSS {:.0} MiB and {} fds, at most {rss_max:.0} MiB and {fds_max} fds, at the end {:.0} MiB and {} fds",
        warm.as_secs_f64(),
        first.0,
        first.1,
        last.0,
        last.1
    ));
    out.figure(format!(
        "with the database up: {median:.0} points/s accepted in the median 10-s window ({:.2} of the offered rate), {lowest:.0} in the lowest; {} points acknowledged in all, ack p99 {:.0} ms, {} client errors",
        median / target,
        n(&s, "acked"),
        n(&s, "ack_p99_ms"),
        n(&s, "errors")
    ));
    out.check(verified, "an acknowledged point is missing or stored twice");
    out.check(outages >= 1, "the database was never restarted");
    out.figure(format!(
        "while connected, median of the first and last thirds of the 10-s samples: RSS {:.0} -> {:.0} MiB, {} -> {} fds",
        early.0, late.0, early.1, late.1
    ));
    // Peak and trend while connected (a leak per point or per reconnect
    // grows with the run), and after the fleet left. The margins are
    // absolute, not a share of the warm-up value (which a leak inflates
    // too): the buffer (32 MiB, filled during a stop) twice for the peak,
    // once for the trend.
    out.check(
        rss_max <= first.0 + 2.0 * BUFFER_MIB as f64,
        "RSS while connected peaked past its warm-up value plus twice the buffer",
    );
    out.check(
        late.0 <= early.0 + BUFFER_MIB as f64,
        "RSS while connected trended up (last third's median past the first's + the buffer)",
    );
    out.check(
        fds_max <= first.1 + 20,
        "open file descriptors while connected peaked past their warm-up value + 20",
    );
    out.check(
        late.1 <= early.1 + 10,
        "open file descriptors while connected trended up",
    );
    out.check(last.0 <= first.0 * 1.5 + 20.0, "RSS grew by more than half");
    out.check(last.1 <= first.1 + 20, "open file descriptors grew");
    out.check(
        median >= 0.9 * target,
        "with the database up, less than 90% of the offered rate got through",
    );
    locus.kill9().await?;
    Ok(out)
}

/// `locus serve` flags of an instance clustered through `nats`: [`BOUNDS`]
/// and `extra`.
fn clustered(nats: &Nats, extra: &[&str]) -> Vec<String> {
    let mut flags: Vec<String> = BOUNDS.iter().map(|s| s.to_string()).collect();
    flags.extend(["--nats-url".into(), nats.url()]);
    flags.extend(extra.iter().map(|s| s.to_string()));
    flags
}

/// The least `--nats-publish-buffer-bytes`: the nats case gives it to one
/// instance, so that its buffer overflows while NATS is away.
const LEAST_PUBLISH_BUFFER: &str = "1048576";

/// What an instance says of its cluster view at one moment.
#[derive(Debug, Clone, Copy)]
struct View {
    /// `/readyz` on its HTTP address answered 200.
    ready: bool,
    /// `locus_cluster_connected` and `locus_cluster_lag_seconds`, where its
    /// metrics answered.
    connected: Option<f64>,
    lag_seconds: Option<f64>,
}

impl View {
    fn caught_up(&self) -> bool {
        self.connected == Some(1.0) && self.lag_seconds == Some(0.0)
    }
}

/// An instance's HTTP and metrics ports, for a task that samples it.
#[derive(Debug, Clone, Copy)]
struct Ports {
    http: u16,
    metrics: u16,
}

impl Ports {
    fn of(locus: &Locus) -> Ports {
        Ports {
            http: locus.http,
            metrics: locus.metrics,
        }
    }

    async fn view(self, client: &reqwest::Client) -> View {
        let ready = client
            .get(format!("http://127.0.0.1:{}/readyz", self.http))
            .send()
            .await
            .is_ok_and(|r| r.status() == reqwest::StatusCode::OK);
        let text = match client
            .get(format!("http://127.0.0.1:{}/metrics", self.metrics))
            .send()
            .await
        {
            Ok(r) => r.text().await.ok(),
            Err(_) => None,
        };
        let gauge = |name| text.as_deref().and_then(|t| gauge(t, name));
        View {
            ready,
            connected: gauge("locus_cluster_connected"),
            lag_seconds: gauge("locus_cluster_lag_seconds"),
        }
    }
}

/// The value of the series `name` (without labels) in a /metrics text.
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        if series == name {
            value.parse().ok()
        } else {
            None
        }
    })
}

/// When each sample was taken, and a view of each instance.
type ViewSamples = Vec<(Instant, Vec<View>)>;

/// Samples `instances` every 250 ms until `stop`.
fn sample_views(
    instances: Vec<Ports>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<ViewSamples> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap_or_default();
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = &mut stop => return samples,
                _ = tick.tick() => {
                    let at = Instant::now();
                    let views = futures::future::join_all(
                        instances.iter().map(|p| p.view(&client)),
                    )
                    .await;
                    samples.push((at, views));
                }
            }
        }
    })
}

/// Each device's newest position, by (app_source, device_id): its time
/// (µs since the epoch), latitude and longitude.
type LatestMap = std::collections::HashMap<(String, uuid::Uuid), (i64, f64, f64)>;

/// The newest stored point of every device.
async fn newest_stored(db: &Db) -> anyhow::Result<LatestMap> {
    let mut conn = PgConnection::connect(&db.url).await?;
    let rows: Vec<(String, uuid::Uuid, i64, f64, f64)> = sqlx::query_as(
        "SELECT DISTINCT ON (app_source, device_id) app_source, device_id,
                (extract(epoch FROM time) * 1000000)::bigint, latitude, longitude
         FROM location_events ORDER BY app_source, device_id, time DESC",
    )
    .fetch_all(&mut conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(app, device, t, lat, lon)| ((app, device), (t, lat, lon)))
        .collect())
}

/// An instance's latest position of every device of `apps`, as gRPC
/// `GetLatest` answers it by app_source, page after page. (Not HTTP: JSON
/// numbers read back by serde_json without `float_roundtrip` may be a unit
/// in the last place off.)
async fn latest_served(
    locus: &Locus,
    apps: &std::collections::BTreeSet<String>,
) -> anyhow::Result<LatestMap> {
    let mut q = QueryClient::new(
        Endpoint::from_shared(locus.grpc_target())?
            .connect()
            .await?,
    );
    let mut map = LatestMap::new();
    for app in apps {
        let mut cursor = String::new();
        loop {
            let page = q
                .get_latest(GetLatestRequest {
                    app_source: app.clone(),
                    cursor,
                    ..Default::default()
                })
                .await?
                .into_inner();
            for l in page.locations()? {
                let t = l.time.unwrap_or_default();
                let time = t.seconds * 1_000_000 + i64::from(t.nanos / 1_000);
                let device = uuid::Uuid::try_parse(&l.device_id)?;
                map.insert((app.clone(), device), (time, l.latitude, l.longitude));
            }
            if page.next_cursor.is_empty() {
                break;
            }
            cursor = page.next_cursor;
        }
    }
    Ok(map)
}

/// The (app_source, device_id) of each device of a `locus-load` fleet of
/// `devices` with `seed` and its default app_sources, as it makes them.
fn fleet_devices(devices: u64, seed: u64) -> Vec<(String, uuid::Uuid)> {
    const APPS: [&str; 2] = ["mextrack", "pshop"];
    (0..devices)
        .map(|i| {
            let d = Device::new(i, seed, APPS[i as usize % APPS.len()], 0, 1);
            (d.app_source, d.device_id)
        })
        .collect()
}

/// An instance's latest position of each of `devices`, as gRPC
/// `GetLatest` answers it by device_ids.
async fn latest_of(locus: &Locus, devices: &[(String, uuid::Uuid)]) -> anyhow::Result<LatestMap> {
    let mut q = QueryClient::new(
        Endpoint::from_shared(locus.grpc_target())?
            .connect()
            .await?,
    );
    let mut map = LatestMap::new();
    let apps: std::collections::BTreeSet<&String> = devices.iter().map(|(app, _)| app).collect();
    for app in apps {
        let ids = devices
            .iter()
            .filter(|(a, _)| a == app)
            .map(|(_, d)| d.to_string())
            .collect();
        let page = q
            .get_latest(GetLatestRequest {
                app_source: app.clone(),
                device_ids: ids,
                ..Default::default()
            })
            .await?
            .into_inner();
        for l in page.locations()? {
            let t = l.time.unwrap_or_default();
            let time = t.seconds * 1_000_000 + i64::from(t.nanos / 1_000);
            let device = uuid::Uuid::try_parse(&l.device_id)?;
            map.insert((app.clone(), device), (time, l.latitude, l.longitude));
        }
    }
    Ok(map)
}

/// How many devices `served` gives otherwise than `stored` (another
/// point, or none, or a device never stored), and one of them.
fn differences(stored: &LatestMap, served: &LatestMap) -> (usize, Option<String>) {
    let mut count = 0;
    let mut first = None;
    for (key, want) in stored {
        let got = served.get(key);
        if got != Some(want) {
            count += 1;
            first.get_or_insert_with(|| {
                format!(
                    "device {} of {}: served {got:?}, stored {want:?}",
                    key.1, key.0
                )
            });
        }
    }
    for (key, got) in served {
        if !stored.contains_key(key) {
            count += 1;
            first.get_or_insert_with(|| {
                format!(
                    "device {} of {}: served {got:?}, never stored",
                    key.1, key.0
                )
            });
        }
    }
    (count, first)
}

/// Waits until `locus`'s latest position of every device is the database's
/// newest point of it (the fleets are done: that no longer moves), at most
/// `within`: how long after `since` it was, or what still differed.
async fn converged(
    locus: &Locus,
    stored: &LatestMap,
    since: Instant,
    within: Duration,
) -> anyhow::Result<Result<Duration, String>> {
    let apps = stored.keys().map(|(app, _)| app.clone()).collect();
    let t = Instant::now();
    loop {
        let served = latest_served(locus, &apps).await?;
        let (wrong, example) = differences(stored, &served);
        if wrong == 0 {
            return Ok(Ok(since.elapsed()));
        }
        if t.elapsed() >= within {
            return Ok(Err(format!(
                "{wrong} of {} devices differ after {} s, e.g. {}",
                stored.len(),
                within.as_secs(),
                example.unwrap_or_default()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until `locus` says it is connected and caught up (its lag 0), at
/// most `within`: how long it took.
async fn caught_up(locus: &Locus, within: Duration) -> Option<Duration> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let t = Instant::now();
    while t.elapsed() < within {
        if Ports::of(locus).view(&client).await.caught_up() {
            return Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

/// Runs a case against a nats-server of its own (a free port, its store in
/// a temporary directory), stopped and removed once the case ended; where
/// the case failed, it names the server's log.
async fn with_own_nats(
    case: impl AsyncFnOnce(&mut Nats, &mut Outcome) -> anyhow::Result<()>,
) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new();
    let mut nats = Nats::start().await?;
    let result = case(&mut nats, &mut out).await;
    if result.is_err() || !out.held {
        println!("   (nats-server's log: {})", nats.log().display());
    }
    nats.destroy().await;
    result.map(|()| out)
}

/// Two instances on one database clustered through a nats-server of the
/// case's own, a fleet writing through both (half the devices to each);
/// nats-server killed for 20 s (6 s quick) and started again on its port
/// and store. B's publish buffer is the least (1 MiB), which the outage
/// overflows: B publishes a resync when NATS is back, and A refills from
/// the database; A's holds what it committed meanwhile, published then. A
/// second, smaller fleet stops a second before NATS returns, so that its
/// devices' newest points were all committed while NATS was away. Ingest
/// and readiness go on throughout; the view says it is stale (connected
/// 0, the lag rising) and caught up again after; every acknowledged point
/// is stored once, and each instance's latest position of every device is
/// the database's newest point of it at the end.
async fn nats(bin: &Path, db: &Db, quick: bool) -> anyhow::Result<Outcome> {
    with_own_nats(async |nats, out| nats_away(bin, db, quick, nats, out).await).await
}

async fn nats_away(
    bin: &Path,
    db: &Db,
    quick: bool,
    nats: &mut Nats,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    let (warm, away, after) = if quick { (5, 6, 6) } else { (15, 20, 20) };
    let mut a = Locus::start(bin, &db.url, &strs(&clustered(nats, &[]))).await?;
    let mut b = Locus::start(
        bin,
        &db.url,
        &strs(&clustered(
            nats,
            &["--nats-publish-buffer-bytes", LEAST_PUBLISH_BUFFER],
        )),
    )
    .await?;
    let (stop_sampling, sampling) = tokio::sync::oneshot::channel();
    let sampler = sample_views(vec![Ports::of(&a), Ports::of(&b)], sampling);
    let steady = fleet_flags(300, 10.0, warm + away + after);
    let last_word = other_devices(&fleet_flags(100, 10.0, warm + away - 1));
    let fleet = Fleet::start_on(&[&a, &b], db, &strs(&steady))?;
    let fleet2 = Fleet::start_on(&[&a, &b], db, &strs(&last_word))?;
    tokio::time::sleep(Duration::from_secs(warm)).await;
    nats.kill9().await?;
    let stopped = Instant::now();
    tokio::time::sleep(Duration::from_secs(away)).await;
    let buffered_a = counter(&a, "locus_cluster_publish_buffer_bytes").await;
    nats.resume().await?;
    let resumed = Instant::now();
    // The second fleet's devices stopped while NATS was away: how soon
    // after it returned each instance's view of them is the database's.
    let quiet = fleet_devices(100, 2);
    let mut agreed: [Option<Duration>; 2] = [None, None];
    while agreed.iter().any(Option::is_none) && resumed.elapsed() < Duration::from_secs(20) {
        let all = newest_stored(db).await?;
        let stored: LatestMap = quiet
            .iter()
            .filter_map(|k| Some((k.clone(), *all.get(k)?)))
            .collect();
        for (i, locus) in [&a, &b].into_iter().enumerate() {
            if agreed[i].is_none() && differences(&stored, &latest_of(locus, &quiet).await?).0 == 0
            {
                agreed[i] = Some(resumed.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (ok2, s2) = fleet2.finish(Duration::from_secs(away + 120)).await?;
    let (ok1, s1) = fleet.finish(Duration::from_secs(after + 120)).await?;
    let ended = Instant::now();
    let stored = newest_stored(db).await?;
    let views: Vec<_> = futures::future::try_join_all(
        [&a, &b].map(|locus| converged(locus, &stored, ended, Duration::from_secs(15))),
    )
    .await?;
    let rest =
        futures::future::join_all([&a, &b].map(|locus| caught_up(locus, Duration::from_secs(10))))
            .await;
    let _ = stop_sampling.send(());
    let samples = sampler.await?;
    let unpublished_b = counter(&b, "locus_cluster_unpublished_points_total").await;
    let refills_a = counter(&a, "locus_cluster_refills_total{reason=\"resync\"}").await;

    out.figure(format!(
        "nats-server killed {} s after two instances and the fleets started, for {away} s; started again on its port and store; ingest went on through both: {} + {} points acknowledged, {} + {} client errors",
        warm,
        n(&s1, "acked"),
        n(&s2, "acked"),
        n(&s1, "errors"),
        n(&s2, "errors"),
    ));
    out.figure(format!(
        "A held {:.0} KiB of committed batches for NATS when it returned; B's 1 MiB buffer overflowed ({unpublished_b:.0} points never published), and A refilled from the database {refills_a:.0} time(s) on B's resync",
        buffered_a / 1024.0
    ));
    out.check(
        ok1 && ok2,
        "an acknowledged point is missing or stored twice",
    );
    out.check(
        n(&s1, "acked") > 0.0 && n(&s2, "acked") > 0.0,
        "nothing was acknowledged",
    );
    out.check(
        unpublished_b > 0.0,
        "B's publish buffer did not overflow: the resync path was not taken",
    );
    let in_outage = |t: Instant| t >= stopped + Duration::from_secs(1) && t < resumed;
    for (i, name) in ["A", "B"].into_iter().enumerate() {
        let of = |when: &dyn Fn(Instant) -> bool| -> Vec<View> {
            samples
                .iter()
                .filter(|(t, _)| when(*t))
                .map(|(_, v)| v[i])
                .collect()
        };
        let before = of(&|t| t < stopped);
        let during = of(&in_outage);
        let lag_max = |v: &[View]| v.iter().filter_map(|v| v.lag_seconds).fold(0.0, f64::max);
        let not_ready = during.iter().filter(|v| !v.ready).count();
        let disconnected = during.iter().filter(|v| v.connected == Some(0.0)).count();
        let first_disconnected = samples
            .iter()
            .find(|(t, v)| *t >= stopped && v[i].connected == Some(0.0))
            .map(|(t, _)| (*t - stopped).as_secs_f64());
        let back = samples
            .iter()
            .find(|(t, v)| *t >= resumed && v[i].caught_up())
            .map(|(t, _)| (*t - resumed).as_secs_f64());
        out.figure(format!(
            "{name}: before the outage lag at most {:.1} s; during it /readyz 200 in {}/{} samples, locus_cluster_connected 0 in {disconnected} (the first {} s after the kill), lag_seconds up to {:.1} s; connected and lag 0 again {} after NATS returned; its latest positions of the second fleet's devices (their newest points committed while NATS was away) the database's {} after; of {}",
            lag_max(&before),
            during.len() - not_ready,
            during.len(),
            first_disconnected.map_or("-".into(), |s| format!("{s:.1}")),
            lag_max(&during),
            back.map_or("not under load".into(), |s| format!("{s:.1} s")),
            agreed[i].map_or("not within 20 s".into(), |d| format!("{:.1} s", d.as_secs_f64())),
            match &views[i] {
                Ok(d) => format!(
                    "each of the {} devices the database's newest {:.1} s after the fleets (and their verify) ended",
                    stored.len(),
                    d.as_secs_f64()
                ),
                Err(e) => e.clone(),
            }
        ));
        out.check(
            agreed[i].is_some(),
            format!("{name}: its latest positions of the devices that stopped while NATS was away were not the database's within 20 s of its return"),
        );
        out.check(
            !during.is_empty() && not_ready == 0,
            format!("{name}: /readyz was not 200 while NATS was away"),
        );
        out.check(
            disconnected > 0,
            format!("{name}: locus_cluster_connected never dropped to 0 while NATS was away"),
        );
        out.check(
            lag_max(&during) >= away as f64 / 2.0,
            format!(
                "{name}: locus_cluster_lag_seconds rose to {:.1} s at most in a {away}-s outage (less than half)",
                lag_max(&during)
            ),
        );
        out.check(
            rest[i].is_some(),
            format!("{name}: locus_cluster_connected 1 and lag_seconds 0 not back within 10 s of the end"),
        );
        out.check(
            views[i].is_ok(),
            format!("{name}: the latest positions are not the database's newest points"),
        );
    }
    out.check(a.alive() && b.alive(), "an instance died");
    a.kill9().await?;
    b.kill9().await?;
    Ok(())
}

/// Two instances on one database clustered through a nats-server of the
/// case's own, a fleet of streams writing through both (half the devices
/// to each), each stream reconnecting to the other instance after an error
/// and sending again what was not acknowledged; `kill -9` of A under load,
/// and the fleet goes on through B for 10 s (25 s full), so that every
/// device sends again. Every acknowledged point is stored once, and B's
/// latest position of every device is the database's newest point of it.
async fn kill_instance(bin: &Path, db: &Db, quick: bool) -> anyhow::Result<Outcome> {
    with_own_nats(async |nats, out| kill_one(bin, db, quick, nats, out).await).await
}

async fn kill_one(
    bin: &Path,
    db: &Db,
    quick: bool,
    nats: &Nats,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    let (before, after) = if quick { (6, 10) } else { (15, 25) };
    let mut a = Locus::start(bin, &db.url, &strs(&clustered(nats, &[]))).await?;
    let mut b = Locus::start(bin, &db.url, &strs(&clustered(nats, &[]))).await?;
    let started = Instant::now();
    let flags = fleet_flags(300, 10.0, before + after);
    let fleet = Fleet::start_on(&[&a, &b], db, &strs(&flags))?;
    // A second fleet writes through A alone and stops 3 s before the kill:
    // B knows its devices only from A's published batches, so B's view of
    // them checks the follower (the first fleet's resends through B would
    // put its devices right in B's view without any).
    let only_a = other_devices(&fleet_flags(100, 10.0, before - 3));
    let through_a = Fleet::start_on(&[&a], db, &strs(&only_a))?;
    let (verified_a, _) = through_a.finish(Duration::from_secs(before + 30)).await?;
    let left = before.saturating_sub(started.elapsed().as_secs());
    tokio::time::sleep(Duration::from_secs(left)).await;
    let accepted_a = counter(&a, ACCEPTED).await;
    a.kill9().await?;
    let killed = Instant::now();
    let accepted_b = counter(&b, ACCEPTED).await;
    let (verified, s) = fleet.finish(Duration::from_secs(after + 120)).await?;
    let ended = Instant::now();
    let accepted_b_end = counter(&b, ACCEPTED).await;
    let stored = newest_stored(db).await?;
    let view = converged(&b, &stored, ended, Duration::from_secs(15)).await?;
    out.figure(format!(
        "A killed (kill -9) {before} s into the run, having accepted {accepted_a:.0} points (B {accepted_b:.0}); the fleet went on through B, which accepted {:.0} more in the {:.0} s after; {} points acknowledged as new in all, {} client errors (reconnects)",
        accepted_b_end - accepted_b,
        (ended - killed).as_secs_f64(),
        n(&s, "acked"),
        n(&s, "errors"),
    ));
    out.figure(match &view {
        Ok(d) => format!(
            "B's latest position of each of the {} devices the database's newest {:.1} s after the fleet ended",
            stored.len(),
            d.as_secs_f64()
        ),
        Err(e) => format!("B: {e}"),
    });
    out.check(
        verified && verified_a,
        "an acknowledged point is missing or stored twice",
    );
    out.check(
        accepted_a > 0.0 && accepted_b_end > accepted_b,
        "the fleet did not write through both instances, and through B after the kill",
    );
    out.check(
        view.is_ok(),
        "B's latest positions are not the database's newest points",
    );
    out.check(b.alive(), "B died");
    b.kill9().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let bin = match &a.locus {
        Some(p) => p.clone(),
        None => sibling_locus()?,
    };
    let cluster = match a.postgres {
        Postgres::Own => {
            let c = Cluster::create(a.pg_bindir.clone()).await?;
            println!(
                "PostgreSQL: the suite's own cluster on port {} (log {})",
                c.port,
                c.log().display()
            );
            Some(Arc::new(c))
        }
        Postgres::Shared => None,
    };
    let admin = cluster
        .as_ref()
        .map_or(a.database_url.clone(), |c| c.admin_url());
    let failed = run(&a, &bin, &admin, cluster.clone()).await;
    if let Some(c) = cluster.and_then(Arc::into_inner) {
        c.destroy().await;
    }
    let failed = failed?;
    if !failed.is_empty() {
        eprintln!("did not hold: {}", failed.join(", "));
        std::process::exit(1);
    }
    Ok(())
}

/// Runs the cases; the names of those that did not hold.
async fn run(
    a: &Args,
    bin: &Path,
    admin: &str,
    cluster: Option<Arc<Cluster>>,
) -> anyhow::Result<Vec<String>> {
    let mut failed = Vec::new();
    let mut report = Vec::new();
    for case in &a.cases {
        // As --cases names it.
        let name = case
            .to_possible_value()
            .map_or_else(|| format!("{case:?}"), |v| v.get_name().to_string());
        println!("== {name}");
        let db = Db::new(admin, cluster.clone(), &name.replace('-', "_")).await?;
        let started = Instant::now();
        let result = match case {
            Case::Crash => crash(bin, &db, a.quick).await,
            Case::Outage => outage(bin, &db, a.quick).await,
            Case::Slow => slow(bin, &db, a.quick).await,
            Case::Overload => overload(bin, &db, a.quick).await,
            Case::Hostile => hostile(bin, &db, a.quick).await,
            Case::Amplify => amplify(bin, &db, a.amplify_at_once).await,
            Case::Soak => soak(bin, &db, a.soak).await,
            Case::Connections => connections(bin, &db, a.quick).await,
            Case::Nats => nats(bin, &db, a.quick).await,
            Case::KillInstance => kill_instance(bin, &db, a.quick).await,
            Case::LogOutage => log_outage(bin, &db, a.quick).await,
            Case::LogNatsKill => log_nats_kill(bin, &db, a.quick).await,
            Case::LogKillInstance => log_kill_instance(bin, &db, a.quick).await,
            Case::LogDeadLetter => log_dead_letter(bin, &db, a.quick).await,
        };
        db.drop().await;
        let outcome = match result {
            Ok(o) => o,
            Err(e) => Outcome {
                held: false,
                figures: Vec::new(),
                failures: vec![format!("the case could not run: {e:#}")],
            },
        };
        for f in &outcome.figures {
            println!("   {f}");
        }
        for f in &outcome.failures {
            println!("   FAILED: {f}");
        }
        if !outcome.held {
            println!(
                "   (locus's log: {}/locus-*.log)",
                std::env::temp_dir().display()
            );
        }
        println!(
            "   {} in {:.0} s",
            if outcome.held { "held" } else { "DID NOT HOLD" },
            started.elapsed().as_secs_f64()
        );
        if !outcome.held {
            failed.push(name.clone());
        }
        report.push(serde_json::json!({
            "case": name, "held": outcome.held,
            "figures": outcome.figures, "failures": outcome.failures,
        }));
    }
    println!("{}", serde_json::Value::Array(report));
    Ok(failed)
}

// --- `--ack-after log` (issue 21) ---

/// The log's bound in these cases (JetStream sets it aside on its servers).
const LOG_MAX_BYTES: &str = "268435456";
/// The shared view's stream's bound beside it.
const VIEW_MAX_BYTES: &str = "67108864";
/// `--log-ack-wait` of these cases: a killed instance's messages go to
/// another writer this long after it last said it is still on them.
const LOG_ACK_WAIT: &str = "5s";
/// How long a fleet's verify waits for the log to drain.
const DRAIN_DEADLINE: Duration = Duration::from_secs(300);
const LOG_BACKLOG: &str = "locus_log_backlog_messages";
const LOG_REDELIVERED: &str = "locus_log_redelivered_messages_total";
/// The log's and its dead letters' streams, as locus names them by default.
const LOG_STREAM: &str = "LOCUS_LOG";
const DEAD_STREAM: &str = "LOCUS_LOG_DEAD";

/// `locus serve` flags of an instance of `--ack-after log` on the NATS
/// server(s) at `nats_url`: [`BOUNDS`] and `extra`.
fn logged(nats_url: &str, extra: &[&str]) -> Vec<String> {
    let mut flags: Vec<String> = BOUNDS.iter().map(|s| s.to_string()).collect();
    flags.extend(
        [
            "--nats-url",
            nats_url,
            "--ack-after",
            "log",
            "--log-max-bytes",
            LOG_MAX_BYTES,
            "--nats-max-bytes",
            VIEW_MAX_BYTES,
            "--log-ack-wait",
            LOG_ACK_WAIT,
        ]
        .map(String::from),
    );
    flags.extend(extra.iter().map(|s| s.to_string()));
    flags
}

/// `flags` of a fleet whose acks mean "in the log": its verify waits until
/// the log of `instances` has drained.
fn log_fleet(instances: &[&Locus], mut flags: Vec<String>) -> Vec<String> {
    let metrics: Vec<String> = instances
        .iter()
        .map(|l| format!("http://127.0.0.1:{}", l.metrics))
        .collect();
    flags.extend([
        "--acks".into(),
        "log".into(),
        "--metrics-target".into(),
        metrics.join(","),
        "--drain-deadline".into(),
        format!("{}s", DRAIN_DEADLINE.as_secs()),
    ]);
    flags
}

/// JetStream on `url`.
async fn jetstream(url: &str) -> anyhow::Result<async_nats::jetstream::Context> {
    let servers = locus_load::nats::server_addrs(url)?;
    Ok(async_nats::jetstream::new(
        async_nats::connect(servers).await?,
    ))
}

/// One look at an instance of `--ack-after log` and its database.
#[derive(Debug, Clone, Copy)]
struct LogSample {
    at: Instant,
    /// `/readyz` answered 200.
    ready: bool,
    /// `locus_log_backlog_messages`.
    backlog: Option<f64>,
    /// Rows in the table, where the database answered.
    rows: Option<i64>,
}

/// Samples `locus` and the table every 250 ms until `stop`.
fn sample_log(
    ports: Ports,
    url: String,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<Vec<LogSample>> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap_or_default();
        let mut conn: Option<PgConnection> = None;
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = &mut stop => return samples,
                _ = tick.tick() => {}
            }
            let at = Instant::now();
            let ready = client
                .get(format!("http://127.0.0.1:{}/readyz", ports.http))
                .send()
                .await
                .is_ok_and(|r| r.status() == reqwest::StatusCode::OK);
            let text = match client
                .get(format!("http://127.0.0.1:{}/metrics", ports.metrics))
                .send()
                .await
            {
                Ok(r) => r.text().await.ok(),
                Err(_) => None,
            };
            let backlog = text.as_deref().and_then(|t| gauge(t, LOG_BACKLOG));
            if conn.is_none() {
                conn = tokio::time::timeout(Duration::from_secs(1), PgConnection::connect(&url))
                    .await
                    .ok()
                    .and_then(Result::ok);
            }
            let mut rows = None;
            if let Some(c) = conn.as_mut() {
                let count = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM location_events")
                    .fetch_one(c);
                match tokio::time::timeout(Duration::from_secs(1), count).await {
                    Ok(Ok(n)) => rows = Some(n),
                    _ => conn = None,
                }
            }
            samples.push(LogSample {
                at,
                ready,
                backlog,
                rows,
            });
        }
    })
}

/// Rows stored a second between two samples with a count.
fn stored_rate(a: &LogSample, b: &LogSample) -> Option<f64> {
    let dt = (b.at - a.at).as_secs_f64();
    Some((b.rows? - a.rows?) as f64 / dt).filter(|_| dt > 0.0)
}

/// The points a fleet had acknowledged in each second of its run from
/// `from` to `to` (seconds since it started).
fn answered(s: &Value, from: u64, to: u64) -> Vec<u64> {
    let per_sec: Vec<u64> = s["answered_per_sec"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(0)).collect())
        .unwrap_or_default();
    (from..to)
        .map(|k| per_sec.get(k as usize).copied().unwrap_or(0))
        .collect()
}

/// PostgreSQL away for 2 min (15 s quick) under a fleet of 300 streams at
/// 10 points/s against one instance of `--ack-after log`: the fleet is
/// acknowledged throughout without an error, `/readyz` stays 200, the log
/// holds the points (its backlog grows) and drains once the database is
/// back; every acknowledged point is then stored once. The drain's rate is
/// reported against the stored rate before the outage.
async fn log_outage(bin: &Path, db: &Db, quick: bool) -> anyhow::Result<Outcome> {
    with_own_nats(async |nats, out| log_outage_on(bin, db, quick, nats, out).await).await
}

async fn log_outage_on(
    bin: &Path,
    db: &Db,
    quick: bool,
    nats: &Nats,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    let (warm, away, after) = if quick { (8, 15, 10) } else { (20, 120, 30) };
    let (devices, rate) = (300, 10.0);
    let mut locus = Locus::start(bin, &db.url, &strs(&logged(&nats.url(), &[]))).await?;
    let (stop_sampling, sampling) = tokio::sync::oneshot::channel();
    let sampler = sample_log(Ports::of(&locus), db.url.clone(), sampling);
    let started = Instant::now();
    let flags = log_fleet(&[&locus], fleet_flags(devices, rate, warm + away + after));
    let fleet = Fleet::start(&locus, db, &strs(&flags))?;
    tokio::time::sleep(Duration::from_secs(warm)).await;
    db.cut_off().await?;
    let cut = Instant::now();
    tokio::time::sleep(Duration::from_secs(away)).await;
    db.restore().await?;
    let back = Instant::now();
    let (verified, s) = fleet
        .finish(Duration::from_secs(after + DRAIN_DEADLINE.as_secs() + 120))
        .await?;
    let _ = stop_sampling.send(());
    let samples = sampler.await?;

    // Before the outage: the first 3 s left out (streams connecting).
    let before: Vec<&LogSample> = samples
        .iter()
        .filter(|x| x.at >= started + Duration::from_secs(3) && x.at < cut)
        .collect();
    let counted: Vec<&&LogSample> = before.iter().filter(|x| x.rows.is_some()).collect();
    let normal_rate = match (counted.first(), counted.last()) {
        (Some(a), Some(b)) => stored_rate(a, b),
        _ => None,
    };
    let normal_backlog = before.iter().filter_map(|x| x.backlog).fold(0.0, f64::max);
    let during: Vec<&LogSample> = samples
        .iter()
        .filter(|x| x.at >= cut + Duration::from_secs(1) && x.at < back)
        .collect();
    let not_ready = during.iter().filter(|x| !x.ready).count();
    let backlog_max = during.iter().filter_map(|x| x.backlog).fold(0.0, f64::max);
    // The drain: from the database's return until the backlog is back to
    // what it was under load before (the gauge is read every 2 s).
    let after_back: Vec<&LogSample> = samples.iter().filter(|x| x.at >= back).collect();
    let first_count = after_back.iter().find(|x| x.rows.is_some());
    let caught_up = after_back
        .iter()
        .find(|x| x.backlog.is_some_and(|b| b <= normal_backlog) && x.rows.is_some());
    let drain = match (first_count, caught_up) {
        (Some(a), Some(b)) if b.at > a.at => {
            stored_rate(a, b).map(|r| (r, (b.at - back).as_secs_f64()))
        }
        _ => None,
    };
    // The fastest second of the drain.
    let counts: Vec<&&LogSample> = after_back
        .iter()
        .filter(|x| x.rows.is_some() && caught_up.is_none_or(|c| x.at <= c.at))
        .collect();
    let peak = counts
        .iter()
        .enumerate()
        .filter_map(|(i, a)| {
            let b = counts[i..]
                .iter()
                .find(|b| b.at >= a.at + Duration::from_secs(1))?;
            stored_rate(a, b)
        })
        .fold(0.0, f64::max);
    // The fleet's acks in each whole second of the outage.
    let since = |t: Instant| (t - started).as_secs();
    let acks_during = answered(&s, since(cut) + 1, since(back));
    let offered = devices as f64 * rate;
    let least_acks = acks_during.iter().copied().min().unwrap_or(0);

    out.figure(format!(
        "database away {away} s under {offered:.0} points/s offered to one instance of --ack-after log: {} points acknowledged, {} client errors, ack p99 {:.0} ms, max {:.0} ms; the fewest acknowledged in a second of the outage {least_acks} ({} seconds)",
        n(&s, "acked"),
        n(&s, "errors"),
        n(&s, "ack_p99_ms"),
        n(&s, "ack_max_ms"),
        acks_during.len()
    ));
    out.figure(format!(
        "/readyz 200 in {}/{} samples of the outage; the log's backlog at most {normal_backlog:.0} messages before it, {backlog_max:.0} during it",
        during.len() - not_ready,
        during.len()
    ));
    let ratio = |r: f64| normal_rate.map_or(f64::NAN, |n| r / n);
    out.figure(format!(
        "stored before the outage {:.0} points/s; the drain: back to that backlog {} after the database returned, {} points/s over it ({:.1}x), the fastest second {peak:.0} points/s ({:.1}x); the log drained {} after the fleet ended",
        normal_rate.unwrap_or(f64::NAN),
        drain.map_or("not under load".into(), |(_, t)| format!("{t:.1} s")),
        drain.map_or("-".into(), |(r, _)| format!("{r:.0}")),
        drain.map_or(f64::NAN, |(r, _)| ratio(r)),
        ratio(peak),
        s["drained_s"]
            .as_f64()
            .map_or("never".into(), |d| format!("{d:.1} s")),
    ));
    out.check(
        verified,
        "an acknowledged point is missing or stored twice (or the log did not drain)",
    );
    out.check(n(&s, "errors") == 0.0, "a client saw an error");
    out.check(
        !during.is_empty() && not_ready == 0,
        "/readyz was not 200 while the database was away",
    );
    out.check(
        !acks_during.is_empty() && least_acks as f64 >= offered * 0.5,
        "a second of the outage had fewer acks than half the rate offered: ingest waited for the database",
    );
    out.check(
        backlog_max > normal_backlog,
        "the log's backlog did not grow while the database was away: were the points written somewhere else?",
    );
    out.check(s["drained_s"].is_number(), "the log did not drain");
    out.check(locus.alive(), "locus died");
    locus.kill9().await?;
    Ok(())
}

/// A NATS cluster of three, the log three copies (R3); one instance of
/// `--ack-after log` under 300 streams at 10 points/s; the log's stream
/// leader killed with `kill -9` 15 s in (6 s quick), the other two going
/// on. Nothing acknowledged is lost; the stall of the acks is reported.
async fn log_nats_kill(bin: &Path, db: &Db, quick: bool) -> anyhow::Result<Outcome> {
    let mut out = Outcome::new();
    let mut cluster = locus_load::nats::NatsCluster::start(3).await?;
    let result = log_nats_kill_on(bin, db, quick, &mut cluster, &mut out).await;
    if result.is_err() || !out.held {
        println!("   (nats-servers' logs: {})", cluster.logs().display());
    }
    cluster.destroy().await;
    result.map(|()| out)
}

async fn log_nats_kill_on(
    bin: &Path,
    db: &Db,
    quick: bool,
    cluster: &mut locus_load::nats::NatsCluster,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    let (warm, after) = if quick { (6, 14) } else { (15, 45) };
    let (devices, rate) = (300, 10.0);
    let mut locus = Locus::start(bin, &db.url, &strs(&logged(&cluster.url(), &[]))).await?;
    let started = Instant::now();
    let flags = log_fleet(&[&locus], fleet_flags(devices, rate, warm + after));
    let fleet = Fleet::start(&locus, db, &strs(&flags))?;
    let js = jetstream(&cluster.url()).await?;
    tokio::time::sleep(Duration::from_secs(warm)).await;
    let info = js.get_stream(LOG_STREAM).await?.info().await?.clone();
    let replicas = info.config.num_replicas;
    let leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .context("the log's stream has no leader")?;
    cluster.kill9(&leader).await?;
    let killed = Instant::now();
    let (verified, s) = fleet
        .finish(Duration::from_secs(after + DRAIN_DEADLINE.as_secs() + 120))
        .await?;
    let ended = Instant::now();
    let new_leader = match js.get_stream(LOG_STREAM).await {
        Ok(mut st) => st
            .info()
            .await
            .ok()
            .and_then(|i| i.cluster.as_ref()?.leader.clone()),
        Err(_) => None,
    };
    let offered = devices as f64 * rate;
    let k = (killed - started).as_secs();
    let acks_after = answered(&s, k, (ended - started).as_secs().min(warm + after));
    // The stall: the longest run of seconds after the kill with fewer acks
    // than half the rate offered.
    let (mut stall, mut run) = (0, 0);
    for a in &acks_after {
        run = if (*a as f64) < offered * 0.5 {
            run + 1
        } else {
            0
        };
        stall = stall.max(run);
    }
    out.figure(format!(
        "the log {replicas} copies; its leader {leader} killed (kill -9) {warm} s into {offered:.0} points/s offered, the leader then {}; {} points acknowledged, {} client errors, ack p99 {:.0} ms, max {:.0} ms; acks stalled (under half the rate) for {stall} s at most; acks a second after the kill: {:?}",
        new_leader.as_deref().unwrap_or("-"),
        n(&s, "acked"),
        n(&s, "errors"),
        n(&s, "ack_p99_ms"),
        n(&s, "ack_max_ms"),
        acks_after
    ));
    out.check(
        replicas == 3,
        format!("the log keeps {replicas} copies, not 3"),
    );
    out.check(
        verified,
        "an acknowledged point is missing or stored twice (or the log did not drain)",
    );
    out.check(
        acks_after
            .iter()
            .rev()
            .take(3)
            .all(|a| *a as f64 >= offered * 0.5),
        "the acks did not come back to half the rate by the end",
    );
    out.check(locus.alive(), "locus died");
    locus.kill9().await?;
    Ok(())
}

/// Two instances of `--ack-after log` on one nats-server, 300 streams at
/// 10 points/s through both; writes blocked (`LOCK TABLE location_events`)
/// for 3 s so that A's writers hold messages they cannot commit, then A
/// killed with `kill -9` and the lock let go. What A held is redelivered to
/// B's writers after `--log-ack-wait` and stored, once.
async fn log_kill_instance(bin: &Path, db: &Db, quick: bool) -> anyhow::Result<Outcome> {
    with_own_nats(async |nats, out| log_kill_on(bin, db, quick, nats, out).await).await
}

async fn log_kill_on(
    bin: &Path,
    db: &Db,
    quick: bool,
    nats: &Nats,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    let (warm, after) = if quick { (6, 14) } else { (15, 30) };
    let mut a = Locus::start(bin, &db.url, &strs(&logged(&nats.url(), &[]))).await?;
    let mut b = Locus::start(bin, &db.url, &strs(&logged(&nats.url(), &[]))).await?;
    let flags = log_fleet(&[&a, &b], fleet_flags(300, 10.0, warm + after));
    let fleet = Fleet::start_on(&[&a, &b], db, &strs(&flags))?;
    let js = jetstream(&nats.url()).await?;
    tokio::time::sleep(Duration::from_secs(warm)).await;
    let mut conn = PgConnection::connect(&db.url).await?;
    let mut tx = conn.begin().await?;
    sqlx::query("LOCK TABLE location_events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // What A's writers hold: rows handed to its pipeline, not committed.
    let held_a = counter(&a, BUFFER_POINTS).await;
    let held_b = counter(&b, BUFFER_POINTS).await;
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream("locus-writers", LOG_STREAM)
        .await?;
    let taken = consumer.info().await?.num_ack_pending;
    let redelivered_before = counter(&b, LOG_REDELIVERED).await;
    a.kill9().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    tx.rollback().await?;
    let (verified, s) = fleet
        .finish(Duration::from_secs(after + DRAIN_DEADLINE.as_secs() + 120))
        .await?;
    let redelivered = counter(&b, LOG_REDELIVERED).await - redelivered_before;
    let duplicates_b = counter(&b, "locus_points_duplicate_total").await;
    out.figure(format!(
        "writes blocked (LOCK TABLE) {warm} s in, and 3 s later A killed (kill -9): A's writers held {held_a:.0} points not committed (B's {held_b:.0}), {taken} messages taken and not acknowledged by both"
    ));
    out.figure(format!(
        "B's writers took {redelivered:.0} messages again (redelivered), and found {duplicates_b:.0} points already stored; {} points acknowledged, {} client errors (A's streams reconnecting to B); the log drained {} after the fleet ended",
        n(&s, "acked"),
        n(&s, "errors"),
        s["drained_s"]
            .as_f64()
            .map_or("never".into(), |d| format!("{d:.1} s")),
    ));
    out.check(
        held_a > 0.0,
        "A's writers held nothing when it was killed: the case did not test what it should",
    );
    out.check(
        redelivered > 0.0,
        "B's writers took nothing again: A's messages were not redelivered",
    );
    out.check(
        verified,
        "an acknowledged point is missing or stored twice (or the log did not drain)",
    );
    out.check(b.alive(), "B died");
    b.kill9().await?;
    Ok(())
}

/// The speed the dead-letter case has PostgreSQL refuse.
const REFUSED_SPEED: f64 = 123.0;
/// One point in this many of each device gets it.
const REFUSED_EVERY: &str = "100";

/// One instance of `--ack-after log`; the table refuses a speed of 123
/// (a check constraint) and the fleet sends one point in 100 of each
/// device with it: those points are acknowledged (the log took them), land
/// in the dead letters with the database's reason, one a point, counted in
/// `locus_log_dead_lettered_points_total` and shown by `locus doctor`
/// (which exits 1); every other point is stored, among them the points
/// after the refused ones in the same device (partition).
async fn log_dead_letter(bin: &Path, db: &Db, quick: bool) -> anyhow::Result<Outcome> {
    with_own_nats(async |nats, out| log_dead_letter_on(bin, db, quick, nats, out).await).await
}

async fn log_dead_letter_on(
    bin: &Path,
    db: &Db,
    quick: bool,
    nats: &Nats,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    let secs = if quick { 15 } else { 60 };
    let mut locus = Locus::start(bin, &db.url, &strs(&logged(&nats.url(), &[]))).await?;
    let mut conn = PgConnection::connect(&db.url).await?;
    sqlx::raw_sql(&format!(
        "ALTER TABLE location_events ADD CONSTRAINT locus_faults_refused_speed
         CHECK (speed IS NULL OR speed <> {REFUSED_SPEED:.1})"
    ))
    .execute(&mut conn)
    .await?;
    let mut flags = log_fleet(&[&locus], fleet_flags(300, 10.0, secs));
    flags.extend([
        "--refused-speed".into(),
        REFUSED_SPEED.to_string(),
        "--refused-every".into(),
        REFUSED_EVERY.into(),
    ]);
    let fleet = Fleet::start(&locus, db, &strs(&flags))?;
    let (verified, s) = fleet
        .finish(Duration::from_secs(secs + DRAIN_DEADLINE.as_secs() + 120))
        .await?;
    let refused_absent = n(&s, "refused_absent");

    // The dead letters, each read back.
    let js = jetstream(&nats.url()).await?;
    let mut dead = js.get_stream(DEAD_STREAM).await?;
    let state = dead.info().await?.state.clone();
    let (mut points, mut with_reason, mut of_speed) = (0u64, 0u64, 0u64);
    let mut buried: Vec<(uuid::Uuid, i64)> = Vec::new();
    if state.messages > 0 {
        for seq in state.first_sequence..=state.last_sequence {
            let m = dead.get_raw_message(seq).await?;
            let reason = m
                .headers
                .get(locus::ingest_log::REASON)
                .map(|v| v.to_string())
                .unwrap_or_default();
            // 23514: check_violation.
            if reason.contains("23514") {
                with_reason += 1;
            }
            let rows = locus::pipeline::copy_encoder::split_rows(&m.payload).unwrap_or_default();
            for r in rows {
                points += 1;
                if let Some(row) = locus::pipeline::copy_encoder::decode_row(
                    &m.payload[r.start as usize..r.end as usize],
                ) {
                    if row.speed.is_some_and(|v| f64::from(v) == REFUSED_SPEED) {
                        of_speed += 1;
                    }
                    buried.push((row.device_id, row.time_us));
                }
            }
        }
    }
    // The partition kept flowing: each buried point's device has a point
    // stored after it, unless it came in the run's last 2 s (a device's
    // last point may be a refused one).
    let newest: i64 = sqlx::query_scalar(
        "SELECT coalesce((extract(epoch FROM max(time)) * 1000000)::bigint, 0) FROM location_events",
    )
    .fetch_one(&mut conn)
    .await?;
    let buried: Vec<(uuid::Uuid, i64)> = buried
        .into_iter()
        .filter(|(_, t)| *t < newest - 2_000_000)
        .collect();
    let mut flowed = 0;
    for (device, time_us) in &buried {
        let later: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM location_events
             WHERE device_id = $1 AND time > to_timestamp($2::float8 / 1e6))",
        )
        .bind(device)
        .bind(*time_us as f64)
        .fetch_one(&mut conn)
        .await?;
        flowed += usize::from(later);
    }
    let counted = counter(
        &locus,
        "locus_log_dead_lettered_points_total{reason=\"refused\"}",
    )
    .await;
    let doctor = tokio::process::Command::new(bin)
        .args([
            "doctor",
            "--json",
            "--database-url",
            &db.url,
            "--nats-url",
            &nats.url(),
        ])
        .stderr(Stdio::null())
        .output()
        .await?;
    let report: Value = serde_json::from_slice(&doctor.stdout).unwrap_or_default();
    let log = &report["log"];
    let doctor_dead = log["backlog"]["dead_letters"].as_u64().unwrap_or(0);
    let shown_reason = log["dead_letters"][0]["reason"].as_str().unwrap_or("");
    let attention = log["attention"].as_array().is_some_and(|a| {
        a.iter()
            .any(|x| x.as_str().is_some_and(|x| x.contains("dead letters")))
    });

    out.figure(format!(
        "speed {REFUSED_SPEED} refused by a check constraint, one point in {REFUSED_EVERY} of each device with it: {} points acknowledged ({} client errors), {refused_absent:.0} of them of that speed and absent from the table",
        n(&s, "acked"),
        n(&s, "errors")
    ));
    out.figure(format!(
        "{} dead letters holding {points} points ({of_speed} of speed {REFUSED_SPEED}, {with_reason} with SQLSTATE 23514 in Locus-Reason); locus_log_dead_lettered_points_total{{reason=\"refused\"}} {counted:.0}; the device of {flowed} of the {} not in the run's last 2 s has a point stored after it; locus doctor exit {:?}, {doctor_dead} dead letters, the newest: {shown_reason}",
        state.messages,
        buried.len(),
        doctor.status.code()
    ));
    out.check(
        verified,
        "a point is missing, or stored though refused, or stored twice (or the log did not drain)",
    );
    out.check(
        refused_absent > 0.0,
        "no point of the refused speed was acknowledged: the case tested nothing",
    );
    out.check(
        points as f64 == refused_absent && of_speed == points,
        format!("the dead letters hold {points} points ({of_speed} of the refused speed), not the {refused_absent:.0} refused"),
    );
    out.check(
        with_reason == state.messages,
        "a dead letter does not carry the database's reason (SQLSTATE 23514)",
    );
    out.check(
        counted == refused_absent,
        format!("locus_log_dead_lettered_points_total is {counted:.0}, not the {refused_absent:.0} refused"),
    );
    out.check(
        !buried.is_empty() && flowed == buried.len(),
        "a device's points after a refused one were not stored: the partition stalled",
    );
    out.check(
        doctor.status.code() == Some(1)
            && doctor_dead == state.messages
            && shown_reason.contains("23514")
            && attention,
        "locus doctor does not show the dead letters (exit 1, their count, the reason, attention)",
    );
    out.check(locus.alive(), "locus died");
    locus.kill9().await?;
    Ok(())
}
