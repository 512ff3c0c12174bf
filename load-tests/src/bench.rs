//! `locus-bench`: in one run, on one schema and the same generated rows,
//! raw binary COPY (the ceiling), locus end to end over gRPC, per-row INSERT
//! and multi-row INSERT (UNNEST). For each: rows per second, CPU seconds per
//! million rows for the service and for PostgreSQL (from /proc), and the
//! service's peak RSS. Raw COPY and locus run `--rounds` times side by
//! side, the order alternating; each case's client is ready (rows encoded,
//! messages built, connections open) before its timer starts. Ends with a
//! markdown table, each round's `e2e_vs_raw_copy` and their median.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use bytes::BytesMut;
use chrono::{DateTime, Utc};
use clap::Parser;
use locus::{
    config::ValidationArgs,
    ingest::validate::Validator,
    location::{COLUMNS, ValidLocation},
    pipeline::copy_encoder::{encode_header, encode_row, encode_trailer},
    proto::{Location, LocationBatch, ingest_client::IngestClient},
};
use locus_load::{
    fleet::Device,
    proc::{Locus, pg_cpu, postmaster, proc_times, rss_peak_mib},
};

mod ack_log;
mod cluster;
mod latest_map;
mod live_match;
mod queries;
mod track_page;
mod trackers;
use sqlx::{Connection, PgConnection};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(
    name = "locus-bench",
    about = "Side-by-side ingest benchmark: raw COPY, locus, INSERTs"
)]
struct Args {
    /// Admin URL of the server to benchmark on; a fresh database is made there.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Rows for the COPY paths (raw COPY, locus) and multi-row INSERT.
    #[arg(long, default_value_t = 1_000_000)]
    rows: usize,
    /// Rows for per-row INSERT (it is slow; its rate is what counts).
    #[arg(long, default_value_t = 100_000)]
    insert_rows: usize,
    #[arg(long, default_value_t = 1_000)]
    devices: u64,
    /// Parallel connections of raw COPY and the INSERT cases, and locus's --writers.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Rows per COPY of the raw case, and locus's --flush-points.
    #[arg(long, default_value_t = 5_000)]
    copy_rows: usize,
    /// Rounds of raw COPY and locus end to end, side by side, the order
    /// alternating (raw COPY first in odd rounds, locus first in even ones).
    #[arg(long, default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    rounds: usize,
    /// gRPC streams of the locus case.
    #[arg(long, default_value_t = 50)]
    streams: usize,
    /// Points per LocationBatch of the locus case.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// The locus binary (default: beside this one).
    #[arg(long)]
    locus: Option<PathBuf>,
    /// Keep the benchmark database.
    #[arg(long)]
    keep: bool,
    /// `ingest` (the four write paths), `queries` (query latency under
    /// ingest, and ingest with live subscribers), `cluster` (two clustered
    /// instances against one, how soon a point reaches the other instance,
    /// and the CPU cluster mode adds; it starts its own nats-server), `log`
    /// (`--ack-after log` against `commit`: ingest, ack latency, the drain
    /// after a database outage; its own nats-server), `live` (the live feed's
    /// matching and encoding in process, without a database), `latest`
    /// (GetLatest's answer built in process), `track` (a day's track page
    /// in process, in its parts) or `trackers` (the tracking apps' paths,
    /// one point a request from `--streams` clients, against gRPC's).
    #[arg(long, default_value = "ingest")]
    suite: String,
    /// Queries and cluster suites: the ingest rate kept up while queries
    /// run, or while the cluster's probes are timed (points/s).
    /// By default half of the maximum, measured first in the same run
    /// (`--half-rate 1000` runs the queries with ingest all but idle).
    #[arg(long)]
    half_rate: Option<u64>,
    /// Queries suite: rounds of ingest without, with, with and without the
    /// 200 live subscribers. One run is seconds long on this machine, and
    /// its noise is of the size of what is measured.
    #[arg(long, default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    live_rounds: usize,
    /// Cluster suite: points written through one instance and timed until
    /// the other shows them, with ingest idle and again at half the maximum.
    #[arg(long, default_value_t = 300, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    probes: usize,
    /// Trackers suite: points of each path's run.
    #[arg(long, default_value_t = 20_000)]
    tracker_points: usize,
}

struct Row {
    case: &'static str,
    /// The round of raw COPY and locus it belongs to (0 for the INSERTs).
    round: usize,
    rows: usize,
    seconds: f64,
    service_cpu: Option<f64>,
    pg_cpu: f64,
    rss_mib: Option<f64>,
}

fn generate(devices: u64, rows: usize) -> anyhow::Result<(Vec<Location>, Vec<ValidLocation>)> {
    let per_device = rows.div_ceil(devices as usize);
    let now_us = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros() as i64;
    let interval_us = 10_000_000;
    let start_us = now_us - per_device as i64 * interval_us - 3_600_000_000;
    let mut fleet: Vec<Device> = (0..devices)
        .map(|i| {
            Device::new(
                i,
                42,
                if i % 2 == 0 { "mextrack" } else { "pshop" },
                start_us,
                interval_us,
            )
        })
        .collect();
    let validator = Validator::new(&ValidationArgs::default(), Duration::from_secs(30 * 86_400));
    let mut protos = Vec::with_capacity(rows);
    let mut valid = Vec::with_capacity(rows);
    'outer: for _ in 0..per_device {
        for d in fleet.iter_mut() {
            if protos.len() == rows {
                break 'outer;
            }
            let p = d.next_point();
            valid.push(
                validator
                    .validate(p.clone(), now_us)
                    .map_err(|r| anyhow::anyhow!("{r:?}"))?,
            );
            protos.push(p);
        }
    }
    Ok((protos, valid))
}

async fn reset(url: &str) -> anyhow::Result<()> {
    let mut c = PgConnection::connect(url).await?;
    sqlx::raw_sql("TRUNCATE location_events; TRUNCATE location_hourly; TRUNCATE locus_rollup_pending; CHECKPOINT")
        .execute(&mut c)
        .await?;
    Ok(())
}

async fn count(url: &str) -> anyhow::Result<i64> {
    let mut c = PgConnection::connect(url).await?;
    Ok(sqlx::query_scalar("SELECT count(*) FROM location_events")
        .fetch_one(&mut c)
        .await?)
}

/// Runs `work` and measures it (what it needs is made before: the timer
/// covers `work` alone); `service` is a process to charge CPU to. Returns
/// the measurement and what `work` handed back.
async fn measure<F, T>(
    (case, round): (&'static str, usize),
    url: &str,
    postmaster: u32,
    service: Option<u32>,
    rows: usize,
    work: F,
) -> anyhow::Result<(Row, T)>
where
    F: std::future::Future<Output = anyhow::Result<T>>,
{
    reset(url).await?;
    eprintln!("locus-bench: {case}: {rows} rows ...");
    let (pg0, svc0) = (
        pg_cpu(postmaster),
        service.and_then(proc_times).map(|t| t.0),
    );
    let t = Instant::now();
    let handed_back = work.await?;
    let seconds = t.elapsed().as_secs_f64();
    let (pg1, svc1) = (
        pg_cpu(postmaster),
        service.and_then(proc_times).map(|t| t.0),
    );
    let stored = count(url).await?;
    if stored != rows as i64 {
        bail!("{case}: {stored} rows stored, expected {rows}");
    }
    let row = Row {
        case,
        round,
        rows,
        seconds,
        service_cpu: svc0.zip(svc1).map(|(a, b)| b - a),
        pg_cpu: pg1 - pg0,
        rss_mib: service.and_then(rss_peak_mib),
    };
    eprintln!("locus-bench: {case}: {:.0} rows/s", rows as f64 / seconds);
    Ok((row, handed_back))
}

/// Raw binary COPY as a client holding ready rows does it: the rows are
/// encoded and the connections open before [`raw_copy`] is timed.
struct RawCopy {
    chunks: Arc<Vec<BytesMut>>,
    conns: Vec<PgConnection>,
}

impl RawCopy {
    async fn prepare(
        url: &str,
        rows: &[ValidLocation],
        connections: usize,
        chunk: usize,
    ) -> anyhow::Result<Self> {
        let chunks: Vec<BytesMut> = rows
            .chunks(chunk)
            .map(|c| {
                let mut b = BytesMut::new();
                encode_header(&mut b);
                c.iter().for_each(|r| encode_row(&mut b, r));
                encode_trailer(&mut b);
                b
            })
            .collect();
        Ok(RawCopy {
            chunks: Arc::new(chunks),
            conns: connect_all(url, connections).await?,
        })
    }
}

async fn connect_all(url: &str, n: usize) -> anyhow::Result<Vec<PgConnection>> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(PgConnection::connect(url).await?);
    }
    Ok(conns)
}

/// Sends the prepared COPYs, one connection a share; hands the connections
/// back for the next round.
async fn raw_copy(prepared: RawCopy) -> anyhow::Result<RawCopy> {
    let RawCopy { chunks, conns } = prepared;
    let n = conns.len();
    let mut tasks = tokio::task::JoinSet::new();
    for (w, mut c) in conns.into_iter().enumerate() {
        let chunks = chunks.clone();
        tasks.spawn(async move {
            for b in chunks.iter().skip(w).step_by(n) {
                let mut copy = c
                    .copy_in_raw(&format!(
                        "COPY location_events ({COLUMNS}) FROM STDIN (FORMAT binary)"
                    ))
                    .await?;
                copy.send(&b[..]).await?;
                copy.finish().await?;
            }
            anyhow::Ok(c)
        });
    }
    let mut conns = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        conns.push(r??);
    }
    Ok(RawCopy { chunks, conns })
}

fn ts(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

async fn per_row_insert(
    conns: Vec<PgConnection>,
    rows: Arc<Vec<ValidLocation>>,
) -> anyhow::Result<()> {
    let connections = conns.len();
    let mut tasks = tokio::task::JoinSet::new();
    for (w, mut c) in conns.into_iter().enumerate() {
        let rows = rows.clone();
        tasks.spawn(async move {
            for r in rows.iter().skip(w).step_by(connections) {
                sqlx::query(&format!(
                    "INSERT INTO location_events ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb)"
                ))
                .bind(ts(r.time_us))
                .bind(r.device_id)
                .bind(r.user_id)
                .bind(&r.app_source)
                .bind(r.latitude)
                .bind(r.longitude)
                .bind(r.accuracy)
                .bind(r.altitude)
                .bind(r.speed)
                .bind(r.heading)
                .bind(&r.metadata)
                .execute(&mut c)
                .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

async fn multi_row_insert(
    conns: Vec<PgConnection>,
    chunks: Arc<Vec<Vec<ValidLocation>>>,
) -> anyhow::Result<()> {
    let connections = conns.len();
    let mut tasks = tokio::task::JoinSet::new();
    for (w, mut c) in conns.into_iter().enumerate() {
        let chunks = chunks.clone();
        tasks.spawn(async move {
            for ch in chunks.iter().skip(w).step_by(connections) {
                sqlx::query(&format!(
                    "INSERT INTO location_events ({COLUMNS})
                     SELECT t, d, u, a, la, lo, ac, al, sp, hd, md::jsonb
                     FROM UNNEST($1::timestamptz[], $2::uuid[], $3::uuid[], $4::text[], $5::float8[], $6::float8[],
                                 $7::real[], $8::real[], $9::real[], $10::real[], $11::text[])
                          AS u(t, d, u, a, la, lo, ac, al, sp, hd, md)"
                ))
                .bind(ch.iter().map(|r| ts(r.time_us)).collect::<Vec<_>>())
                .bind(ch.iter().map(|r| r.device_id).collect::<Vec<Uuid>>())
                .bind(ch.iter().map(|r| r.user_id).collect::<Vec<Uuid>>())
                .bind(ch.iter().map(|r| r.app_source.clone()).collect::<Vec<_>>())
                .bind(ch.iter().map(|r| r.latitude).collect::<Vec<_>>())
                .bind(ch.iter().map(|r| r.longitude).collect::<Vec<_>>())
                .bind(ch.iter().map(|r| r.accuracy).collect::<Vec<_>>())
                .bind(ch.iter().map(|r| r.altitude).collect::<Vec<_>>())
                .bind(ch.iter().map(|r| r.speed).collect::<Vec<_>>())
                .bind(ch.iter().map(|r| r.heading).collect::<Vec<_>>())
                .bind(ch.iter().map(|r| r.metadata.clone()).collect::<Vec<_>>())
                .execute(&mut c)
                .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

/// The locus case's client, ready before it is timed: the batches built as
/// prost messages and dealt out to the streams, the HTTP/2 connections
/// open. What [`through_locus`] times is what a gRPC client holding ready
/// messages does: open the streams, encode each message as it is sent
/// (tonic does), and read the acks.
struct LocusClient {
    per_stream: Vec<Vec<LocationBatch>>,
    channels: Vec<tonic::transport::Channel>,
}

impl LocusClient {
    async fn prepare(
        target: &str,
        rows: &[Location],
        streams: usize,
        batch: usize,
    ) -> anyhow::Result<Self> {
        let mut per_stream: Vec<Vec<LocationBatch>> = (0..streams).map(|_| Vec::new()).collect();
        for (i, c) in rows.chunks(batch).enumerate() {
            per_stream[i % streams].push(LocationBatch {
                batch_id: i as u64,
                locations: c.to_vec(),
            });
        }
        let endpoint = Endpoint::from_shared(target.to_string())?.tcp_nodelay(true);
        let mut channels = Vec::new();
        for _ in 0..streams.div_ceil(25) {
            channels.push(endpoint.connect().await?);
        }
        Ok(LocusClient {
            per_stream,
            channels,
        })
    }
}

/// Streams the prepared batches through locus: one gRPC stream each, each
/// keeping 8 batches unacknowledged.
async fn through_locus(client: LocusClient) -> anyhow::Result<()> {
    let LocusClient {
        per_stream,
        channels,
    } = client;
    let mut tasks = tokio::task::JoinSet::new();
    for (s, mine) in per_stream.into_iter().enumerate() {
        let channel = channels[s % channels.len()].clone();
        tasks.spawn(async move {
            let (tx, rx) = mpsc::channel(8);
            let mut client = IngestClient::new(channel);
            let mut acks = client
                .stream_locations(ReceiverStream::new(rx))
                .await?
                .into_inner();
            let expected = mine.len();
            let sender = tokio::spawn(async move {
                for b in mine {
                    if tx.send(b).await.is_err() {
                        break;
                    }
                }
                // Keep the stream open until every ack is in.
                std::future::pending::<()>().await;
            });
            let mut got = 0;
            while got < expected {
                let ack = acks.message().await?.context("stream ended early")?;
                if ack.accepted as usize + ack.duplicates as usize + ack.rejected.len() == 0 {
                    bail!("empty ack");
                }
                got += 1;
            }
            sender.abort();
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

/// `locus serve` on free ports against `url`; returns it, its pid and its
/// gRPC address once it is ready.
pub async fn start_locus(
    locus: &std::path::Path,
    url: &str,
    writers: usize,
    flush_points: Option<usize>,
) -> anyhow::Result<(Locus, u32, String)> {
    let mut args = vec![
        "--writers".to_string(),
        writers.to_string(),
        "--db-pool-size".to_string(),
        (writers + 4).to_string(),
    ];
    if let Some(n) = flush_points {
        args.extend(["--flush-points".to_string(), n.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Locus::start(locus, url, &args).await?;
    let (pid, target) = (server.pid, server.grpc_target());
    Ok((server, pid, target))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    match a.suite.as_str() {
        "live" => return live_match::run().await,
        "latest" => return latest_map::run(),
        _ => {}
    }
    let name = format!("locus_bench_{}", std::process::id());
    let mut admin = PgConnection::connect(&a.database_url)
        .await
        .context("connect to --database-url")?;
    sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    let url = match a.database_url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => bail!("--database-url names no database"),
    };
    let result = run(&a, &url).await;
    if !a.keep {
        let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await;
    }
    result
}

async fn run(a: &Args, url: &str) -> anyhow::Result<()> {
    let locus = match &a.locus {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("locus"),
    };
    match a.suite.as_str() {
        "queries" => {
            return queries::run(&locus, url, a.connections, a.half_rate, a.live_rounds).await;
        }
        "track" => return track_page::run(url).await,
        "trackers" => {
            let params = trackers::Params {
                points: a.tracker_points,
                devices: a.devices,
                clients: a.streams,
                batch: a.batch,
                writers: a.connections,
                rounds: a.rounds,
            };
            return trackers::run(&locus, url, params).await;
        }
        "cluster" | "log" => {
            let params = cluster::Params {
                rows: a.rows,
                devices: a.devices,
                streams: a.streams,
                batch: a.batch,
                writers: a.connections,
                rounds: a.rounds,
                probes: a.probes,
                half_rate: a.half_rate,
            };
            return match a.suite.as_str() {
                "cluster" => cluster::run(&locus, url, params).await,
                _ => ack_log::run(&locus, url, params).await,
            };
        }
        _ => {}
    }
    let setup = tokio::process::Command::new(&locus)
        .args(["setup", "--database-url", url])
        .output()
        .await?;
    if !setup.status.success() {
        bail!(
            "locus setup failed: {}",
            String::from_utf8_lossy(&setup.stderr)
        );
    }
    let tier = String::from_utf8_lossy(&setup.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let mut c = PgConnection::connect(url).await?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut c)
        .await?;
    drop(c);
    let postmaster = postmaster(url).await?;

    eprintln!(
        "locus-bench: generating {} rows from {} devices ...",
        a.rows, a.devices
    );
    let (protos, valid) = generate(a.devices, a.rows)?;
    let mut results = Vec::new();

    // Everything a case needs is ready before its timer starts: raw COPY's
    // rows encoded and its connections open, as a COPY client holding ready
    // rows would have them; locus started, its client's messages built and
    // its connections open.
    let (mut server, pid, target) =
        start_locus(&locus, url, a.connections, Some(a.copy_rows)).await?;
    let mut raw = RawCopy::prepare(url, &valid, a.connections, a.copy_rows).await?;
    const RAW: &str = "raw binary COPY";
    const E2E: &str = "locus end to end (gRPC streams)";
    for round in 1..=a.rounds {
        // Odd rounds raw COPY first, even rounds locus first: whatever the
        // order favours (a warmer cache, a checkpoint left behind) falls
        // on each in turn.
        for case in if round % 2 == 1 {
            [RAW, E2E]
        } else {
            [E2E, RAW]
        } {
            if case == RAW {
                let (row, back) =
                    measure((RAW, round), url, postmaster, None, a.rows, raw_copy(raw)).await?;
                raw = back;
                results.push(row);
            } else {
                let client = LocusClient::prepare(&target, &protos, a.streams, a.batch).await?;
                let (row, ()) = measure(
                    (E2E, round),
                    url,
                    postmaster,
                    Some(pid),
                    a.rows,
                    through_locus(client),
                )
                .await?;
                results.push(row);
            }
        }
    }
    drop(raw);
    let _ = server.child.start_kill();
    let _ = server.child.wait().await;

    let insert_rows = a.insert_rows.min(a.rows);
    let conns = connect_all(url, a.connections).await?;
    let (row, ()) = measure(
        ("per-row INSERT", 0),
        url,
        postmaster,
        None,
        insert_rows,
        per_row_insert(conns, Arc::new(valid[..insert_rows].to_vec())),
    )
    .await?;
    results.push(row);
    let conns = connect_all(url, a.connections).await?;
    let chunks = Arc::new(valid.chunks(1_000).map(<[_]>::to_vec).collect());
    let (row, ()) = measure(
        ("multi-row INSERT (UNNEST, 1,000 rows)", 0),
        url,
        postmaster,
        None,
        a.rows,
        multi_row_insert(conns, chunks),
    )
    .await?;
    results.push(row);

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    println!();
    println!(
        "PostgreSQL {version}, {tier}; {cpus} CPUs, {mem:.0} GiB; {} connections/writers, {}-row COPYs and --flush-points, {} streams of {}-point batches; {} rounds",
        a.connections, a.copy_rows, a.streams, a.batch, a.rounds
    );
    println!();
    println!(
        "| case | round | rows | seconds | rows/s | service CPU s / M rows | PostgreSQL CPU s / M rows | service peak RSS |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let rate = |r: &Row| r.rows as f64 / r.seconds;
    for r in &results {
        let per_m = |cpu: f64| cpu / r.rows as f64 * 1e6;
        println!(
            "| {} | {} | {} | {:.1} | {:.0} | {} | {:.1} | {} |",
            r.case,
            if r.round == 0 {
                "-".into()
            } else {
                r.round.to_string()
            },
            r.rows,
            r.seconds,
            rate(r),
            r.service_cpu
                .map_or("-".into(), |c| format!("{:.1}", per_m(c))),
            per_m(r.pg_cpu),
            r.rss_mib.map_or("-".into(), |m| format!("{m:.0} MiB")),
        );
    }
    let of = |case: &str, round: usize| {
        results
            .iter()
            .find(|r| r.case == case && r.round == round)
            .map(rate)
            .unwrap_or(f64::NAN)
    };
    let mut ratios: Vec<f64> = (1..=a.rounds)
        .map(|round| of(E2E, round) / of(RAW, round))
        .collect();
    let by_round: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    let mut e2e: Vec<f64> = (1..=a.rounds).map(|round| of(E2E, round)).collect();
    e2e.sort_by(f64::total_cmp);
    println!();
    println!(
        "locus_vs_per_row_insert={:.1}",
        e2e[e2e.len() / 2] / of("per-row INSERT", 0)
    );
    println!("e2e_vs_raw_copy_by_round={}", by_round.join(","));
    println!(
        "e2e_vs_raw_copy={median:.3} (median of {} rounds; {:.3}-{:.3})",
        a.rounds,
        ratios[0],
        ratios[ratios.len() - 1]
    );
    Ok(())
}
