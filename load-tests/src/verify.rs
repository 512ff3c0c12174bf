//! `--verify`: every point locus acknowledged as stored (accepted or
//! duplicate) is in the table exactly once.
//!
//! It holds an 8-byte time an acknowledged point and reads the stored rows
//! one device at a time, so that a long soak of hundreds of millions of points
//! can be checked on an ordinary machine.

use std::collections::HashMap;

use sqlx::{Connection, PgConnection};
use uuid::Uuid;

/// The times (µs since the epoch) of every point acknowledged as stored,
/// by device. A point acknowledged twice (sent again as a duplicate) is
/// listed twice until [`Acked::settle`].
#[derive(Debug, Default)]
pub struct Acked(HashMap<Uuid, Vec<i64>>);

impl Acked {
    pub fn add(&mut self, device: Uuid, time_us: i64) {
        self.0.entry(device).or_default().push(time_us);
    }

    /// Sorts and deduplicates each device's times.
    fn settle(&mut self) {
        for times in self.0.values_mut() {
            times.sort_unstable();
            times.dedup();
        }
    }

    pub fn len(&self) -> usize {
        self.0.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What one device's stored rows say against what was acknowledged for it.
#[derive(Debug, Default, PartialEq)]
struct Tally {
    missing: Vec<i64>,
    doubled: Vec<(i64, usize)>,
}

/// `stored` sorted; `acked` sorted and deduplicated.
fn compare(acked: &[i64], stored: &[i64]) -> Tally {
    let mut t = Tally::default();
    for run in stored.chunk_by(|a, b| a == b) {
        if run.len() > 1 {
            t.doubled.push((run[0], run.len()));
        }
    }
    let (mut i, mut j) = (0, 0);
    while i < acked.len() {
        if j >= stored.len() || acked[i] < stored[j] {
            t.missing.push(acked[i]);
            i += 1;
        } else if acked[i] == stored[j] {
            i += 1;
            j += 1;
        } else {
            j += 1;
        }
    }
    t
}

/// Prints what is missing or doubled; true when nothing is. One device
/// (of its app_source) at a time, by the unique key (app_source, device_id,
/// time).
pub async fn verify(
    url: &str,
    devices: &[(String, Uuid)],
    acked: &mut Acked,
) -> anyhow::Result<bool> {
    acked.settle();
    let mut conn = PgConnection::connect(url).await?;
    let (mut found, mut missing, mut doubled) = (0usize, Vec::new(), Vec::new());
    for (app_source, device) in devices {
        let mut stored: Vec<i64> = sqlx::query_scalar::<_, i64>(
            "SELECT (extract(epoch FROM time) * 1000000)::int8
             FROM location_events WHERE app_source = $1 AND device_id = $2",
        )
        .bind(app_source)
        .bind(device)
        .fetch_all(&mut conn)
        .await?;
        found += stored.len();
        stored.sort_unstable();
        let t = compare(acked.0.get(device).map_or(&[][..], Vec::as_slice), &stored);
        missing.extend(t.missing.into_iter().map(|at| (*device, at)));
        doubled.extend(t.doubled.into_iter().map(|(at, n)| (*device, at, n)));
    }
    println!(
        "verify: {} points acknowledged as stored, {found} rows found for the fleet, {} missing, {} stored more than once",
        acked.len(),
        missing.len(),
        doubled.len()
    );
    for (d, t) in missing.iter().take(20) {
        println!("  missing: device {d} at {t} us");
    }
    for (d, t, n) in doubled.iter().take(20) {
        println!("  stored {n} times: device {d} at {t} us");
    }
    Ok(missing.is_empty() && doubled.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_finds_missing_and_doubled() {
        let t = compare(&[1, 2, 3, 5], &[0, 2, 2, 3, 4, 4, 4]);
        assert_eq!(t.missing, vec![1, 5]);
        assert_eq!(t.doubled, vec![(2, 2), (4, 3)]);
        assert_eq!(compare(&[1, 2], &[1, 2]), Tally::default());
        assert_eq!(compare(&[7], &[]).missing, vec![7]);
    }
}
