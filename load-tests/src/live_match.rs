//! `locus-bench --suite live`: the live feed's own work, in process, without
//! a database or a network: matching committed batches to the queries
//! suite's 200 subscribers (`Live::publish`, on the writer's path before its
//! acks), the subscribers taking and encoding their updates, and the same
//! updates as Server-Sent Events: each point's JSON written once a batch
//! (locus now) and, side by side, once per subscriber (locus before
//! 2026-12-03). What it times is locus's library code, so to compare two
//! versions of it, build `locus-bench` at each.

use std::time::{Duration, Instant};

use axum::response::sse::Event;
use bytes::{Bytes, BytesMut};
use locus::{
    location::{ValidLocation, json::LocationJson},
    pipeline::copy_encoder::encode_row,
    query::{
        http::sse_events,
        live::{Filter, Live, LiveBatch, Update},
    },
};
use locus_load::fleet::Rng;
use uuid::Uuid;

const BATCHES: usize = 40;
const BATCH_POINTS: u32 = 5_000;
const ROUNDS: usize = 5;

pub async fn run() -> anyhow::Result<()> {
    let live = Live::new(1_000_000, 1_000, Duration::ZERO);
    // The queries suite's subscribers: 200 boxes of 0.05 x 0.1 degrees,
    // each overlapping its neighbours by half, over the fleet's area.
    let mut subs = Vec::new();
    for i in 0..200 {
        let lat = 19.2 + (i % 20) as f64 * 0.025;
        let lon = -99.4 + (i / 20) as f64 * 0.05;
        let bbox = Some((lat, lat + 0.05, lon, lon + 0.1));
        let filter = Filter {
            bbox,
            ..Filter::default()
        };
        subs.push(
            live.subscribe(filter)
                .ok_or_else(|| anyhow::anyhow!("no subscriber slot"))?,
        );
    }
    let batches = batches();
    let (mut publish, mut take, mut delivered) = (Duration::ZERO, Duration::ZERO, 0);
    let (mut sse_once, mut sse_each) = (Duration::ZERO, Duration::ZERO);
    // The first round warms up and is not counted.
    for round in 0..ROUNDS {
        for (rows, ranges) in &batches {
            let batch = LiveBatch::of_rows(rows.clone(), ranges.iter().cloned());
            let t = Instant::now();
            live.publish(batch);
            let p = t.elapsed();
            let t = Instant::now();
            let mut n = 0;
            let mut updates = Vec::with_capacity(subs.len());
            for s in subs.iter_mut() {
                if let Some(update) = s.next().await {
                    n += update.encoded().len();
                    updates.push(update);
                }
            }
            let took = t.elapsed();
            // Alternated by round, so that neither always runs first.
            let (once, each) = if round % 2 == 0 {
                let once = sse(&updates, sse_events, n);
                (once?, sse(&updates, sse_events_each, n)?)
            } else {
                let each = sse(&updates, sse_events_each, n);
                (sse(&updates, sse_events, n)?, each?)
            };
            if round > 0 {
                publish += p;
                take += took;
                delivered += n;
                sse_once += once;
                sse_each += each;
            }
        }
    }
    let counted = ((ROUNDS - 1) * BATCHES) as f64;
    let per_batch = |d: Duration| d.as_secs_f64() * 1e6 / counted;
    println!(
        "Live feed, {BATCHES} batches of {BATCH_POINTS} points x {} rounds, 200 box subscribers: \
         publish {:.0} µs a batch, take and encode {:.0} µs a batch ({:.0} locations delivered a batch)",
        ROUNDS - 1,
        per_batch(publish),
        per_batch(take),
        delivered as f64 / counted
    );
    println!(
        "The same updates as Server-Sent Events: {:.0} µs a batch with each point's JSON written once a batch, \
         {:.0} µs written once per subscriber (ratio {:.2})",
        per_batch(sse_once),
        per_batch(sse_each),
        sse_each.as_secs_f64() / sse_once.as_secs_f64()
    );
    Ok(())
}

/// How long `events` takes to turn every update into its events; checks
/// that they are `want` in all.
fn sse(
    updates: &[Update],
    events: fn(&Update) -> Vec<Event>,
    want: usize,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let n: usize = updates.iter().map(|u| events(u).len()).sum();
    let took = t.elapsed();
    anyhow::ensure!(n == want, "{n} events for {want} points");
    Ok(took)
}

/// The Server-Sent Events of locus before 2026-12-03: each subscriber's
/// points decoded and written as JSON for it alone.
fn sse_events_each(update: &Update) -> Vec<Event> {
    update
        .locations()
        .iter()
        .map(|l| {
            Event::default()
                .event("location")
                .json_data(LocationJson::from(l))
                .unwrap_or_default()
        })
        .collect()
}

/// COPY rows of points spread evenly over the boxes' area, as committed.
fn batches() -> Vec<(Bytes, Vec<std::ops::Range<u32>>)> {
    // The same points every run.
    let mut rng = Rng::new(12_345);
    (0..BATCHES as u32)
        .map(|b| {
            let mut rows = BytesMut::new();
            let mut ranges = Vec::new();
            for i in 0..BATCH_POINTS {
                let l = ValidLocation {
                    time_us: 1_700_000_000_000_000 + i64::from(b * BATCH_POINTS + i),
                    device_id: Uuid::from_u128(u128::from(i % 1_000)),
                    user_id: Uuid::from_u128(7),
                    app_source: "mextrack".into(),
                    latitude: 19.2 + rng.unit() * 0.575,
                    longitude: -99.4 + rng.unit() * 0.55,
                    accuracy: Some(5.0),
                    altitude: None,
                    speed: Some(30.0),
                    heading: Some(90.0),
                    metadata: None,
                };
                let start = rows.len() as u32;
                encode_row(&mut rows, &l);
                ranges.push(start..rows.len() as u32);
            }
            (rows.freeze(), ranges)
        })
        .collect()
}
