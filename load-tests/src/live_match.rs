//! `locus-bench --suite live`: the live feed's own work, in process, without
//! a database or a network: matching committed batches to the queries
//! suite's 200 subscribers (`Live::publish`, on the writer's path before its
//! acks), and the subscribers taking and encoding their updates. What it
//! times is locus's library code, so to compare two versions of it, build
//! `locus-bench` at each.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use locus::{
    ingest::validate::ValidLocation,
    pipeline::copy_encoder::encode_row,
    query::live::{Filter, Live, LiveBatch},
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
    // The first round warms up and is not counted.
    for round in 0..ROUNDS {
        for (rows, ranges) in &batches {
            let batch = LiveBatch::of_rows(rows.clone(), ranges.iter().cloned());
            let t = Instant::now();
            live.publish(batch);
            let p = t.elapsed();
            let t = Instant::now();
            let mut n = 0;
            for s in subs.iter_mut() {
                if let Some(update) = s.next().await {
                    n += update.encoded().len();
                }
            }
            if round > 0 {
                publish += p;
                take += t.elapsed();
                delivered += n;
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
    Ok(())
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
