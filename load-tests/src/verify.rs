//! `--verify`: every point locus acknowledged as stored (accepted or
//! duplicate) is in the table exactly once.

use std::collections::{HashMap, HashSet};

use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::run::Stats;

/// Prints what is missing or doubled; true when nothing is.
pub async fn verify(url: &str, devices: &[Uuid], stats: &Stats) -> anyhow::Result<bool> {
    let mut conn = PgConnection::connect(url).await?;
    let rows: Vec<(Uuid, i64, i64)> = sqlx::query_as(
        "SELECT device_id, (extract(epoch FROM time) * 1000000)::int8, count(*)
         FROM location_events WHERE device_id = ANY($1) GROUP BY 1, 2",
    )
    .bind(devices)
    .fetch_all(&mut conn)
    .await?;
    let stored: HashMap<(Uuid, i64), i64> = rows.into_iter().map(|(d, t, n)| ((d, t), n)).collect();
    let acked: HashSet<(Uuid, i64)> = stats
        .stored
        .as_ref()
        .map(|s| s.lock().map(|s| s.clone()).unwrap_or_default())
        .unwrap_or_default();
    let missing: Vec<&(Uuid, i64)> = acked.iter().filter(|k| !stored.contains_key(k)).collect();
    let doubled: Vec<(&(Uuid, i64), &i64)> = stored.iter().filter(|(_, n)| **n > 1).collect();
    println!(
        "verify: {} points acknowledged as stored, {} rows found for the fleet, {} missing, {} stored more than once",
        acked.len(),
        stored.len(),
        missing.len(),
        doubled.len()
    );
    for (d, t) in missing.iter().take(20) {
        println!("  missing: device {d} at {t} us");
    }
    for ((d, t), n) in doubled.iter().take(20) {
        println!("  stored {n} times: device {d} at {t} us");
    }
    Ok(missing.is_empty() && doubled.is_empty())
}
