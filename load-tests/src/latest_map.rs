//! `locus-bench --suite latest`: the GetLatest handler's own work, in
//! process, without a network: 10,000 devices' latest positions copied
//! into an answer from a map of 11,000 (the queries suite's fleet and
//! another app's 1,000 devices), found by app_source (a page of 10,000,
//! in device_id order) and by the 10,000
//! ids as the request carries them (text, parsed per call). What the
//! queries suite times on top of this is the answer's way through gRPC to
//! its client. It times locus's library code, so to compare two versions
//! of it, build `locus-bench` at each.

use std::time::Instant;

use locus::{
    location::ValidLocation,
    query::{encoded::EncodedLocations, latest::Latest, parse_device_ids},
};
use locus_load::fleet::Rng;
use uuid::Uuid;

const CALLS: usize = 200;

pub fn run() -> anyhow::Result<()> {
    let latest = Latest::default();
    let mut rng = Rng::new(7);
    let mut ids = Vec::new();
    // Interleaved, as a fleet's points arrive.
    for i in 0..11_000u32 {
        let device_id = Uuid::from_u64_pair(rng.next_u64(), rng.next_u64());
        let app = if i % 11 == 10 { "mextrack" } else { "fleetmap" };
        if app == "fleetmap" {
            ids.push(device_id.to_string());
        }
        latest.offer(ValidLocation {
            time_us: 1_764_000_000_000_000 + i64::from(i),
            device_id,
            user_id: Uuid::from_u64_pair(rng.next_u64(), rng.next_u64()),
            app_source: app.into(),
            latitude: 19.2 + rng.unit() * 0.5,
            longitude: -99.4 + rng.unit() * 0.5,
            accuracy: Some(5.0),
            altitude: Some(2_240.0),
            speed: Some(30.0),
            heading: Some(90.0),
            metadata: None,
        });
    }
    let timed = |answer: &dyn Fn() -> anyhow::Result<EncodedLocations>| {
        let mut ms = Vec::with_capacity(CALLS);
        for _ in 0..CALLS {
            let t = Instant::now();
            let n = answer()?.len();
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(n == 10_000, "{n} latest positions");
        }
        anyhow::Ok(crate::queries::p50_p99(ms))
    };
    // One page of 10,000, in device_id order (`QueryState::latest_page`).
    let by_app = timed(&|| {
        let mut answer = EncodedLocations::with_capacity(10_000);
        latest.of_app_after("fleetmap", None, |l| {
            let room = answer.len() < 10_000;
            if room {
                answer.push(l.encoded());
            }
            room
        });
        Ok(answer)
    })?;
    // As locus finds them (`QueryState::latest_page`): every id parsed,
    // then looked up.
    let by_id = timed(&|| {
        let mut answer = EncodedLocations::with_capacity(ids.len());
        let devices: Vec<Uuid> = parse_device_ids(&ids)?;
        latest.of_devices("fleetmap", &devices, |_, l| {
            answer.push(l.encoded());
            true
        });
        Ok(answer)
    })?;
    // As it did before 2026-12-02: each id parsed, then looked up.
    let interleaved = timed(&|| {
        let mut answer = EncodedLocations::with_capacity(ids.len());
        for id in &ids {
            let d = Uuid::try_parse(id)?;
            latest.get("fleetmap", &d, |l| answer.push(l.encoded()));
        }
        Ok(answer)
    })?;
    println!("GetLatest's answer built in process, {CALLS} calls each, 10,000 of 11,000 devices:");
    println!();
    println!("| found | p50 ms | p99 ms |");
    println!("|---|---:|---:|");
    println!(
        "| by app_source: one page of 10,000 | {:.3} | {:.3} |",
        by_app.0, by_app.1
    );
    println!(
        "| by id: 10,000 ids parsed from text, then looked up (as locus does) | {:.3} | {:.3} |",
        by_id.0, by_id.1
    );
    println!(
        "| by id: each id parsed, then looked up (locus before 2026-12-02) | {:.3} | {:.3} |",
        interleaved.0, interleaved.1
    );
    println!(
        "interleaved_over_parsed_first={:.2}",
        interleaved.0 / by_id.0
    );
    Ok(())
}
