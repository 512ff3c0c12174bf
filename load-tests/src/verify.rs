//! `--verify`: what locus acknowledged against what the table holds. Every
//! point acknowledged as stored (accepted or duplicate) is stored, with the
//! values that were sent; no point that was rejected is stored, nor any
//! that was never acknowledged; and the acks' `accepted` count is what the
//! table gained (less only by acks lost to errors, whose points were sent
//! again and came back as duplicates).
//!
//! It holds 16 bytes an acknowledged point (its time and a fingerprint of
//! its values) and reads the stored rows one device at a time, so that a
//! long soak of tens of millions of points can be checked on an ordinary
//! machine.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
};

use locus::{
    location::{LocationReader, LocationRef, SELECT_COLUMNS, ValidLocation},
    proto::Location,
};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

/// A fingerprint of a point's values as the table stores them (the
/// optional numbers as `real`, the metadata as parsed JSON, so that jsonb's
/// own spacing and key order do not count). Its key (device and time) is
/// kept beside it, not in it.
pub fn fingerprint(l: &LocationRef<'_>) -> u64 {
    let mut h = DefaultHasher::new();
    l.user_id.hash(&mut h);
    l.app_source.hash(&mut h);
    l.latitude.to_bits().hash(&mut h);
    l.longitude.to_bits().hash(&mut h);
    for x in [l.accuracy, l.altitude, l.speed, l.heading] {
        x.map(f32::to_bits).hash(&mut h);
    }
    l.metadata
        .map(|m| {
            serde_json::from_str::<serde_json::Value>(m).map_or(m.to_string(), |j| j.to_string())
        })
        .hash(&mut h);
    h.finish()
}

/// A sent point's fingerprint, with its values converted as the validator
/// converts them.
pub fn of_sent(l: &Location) -> u64 {
    let f = |x: Option<f64>| x.map(|x| x as f32);
    fingerprint(&LocationRef {
        // The key, which the fingerprint leaves out.
        time_us: 0,
        device_id: Uuid::nil(),
        user_id: Uuid::try_parse(&l.user_id).unwrap_or_default(),
        app_source: &l.app_source,
        latitude: l.latitude,
        longitude: l.longitude,
        accuracy: f(l.accuracy),
        altitude: f(l.altitude),
        speed: f(l.speed),
        heading: f(l.heading),
        metadata: (!l.metadata_json.is_empty()).then_some(l.metadata_json.as_str()),
    })
}

/// A stored row's fingerprint.
pub fn of_stored(r: &ValidLocation) -> u64 {
    fingerprint(&r.as_ref())
}

/// What the acks said, by device: the (time in µs since the epoch,
/// fingerprint) of every point acknowledged as stored (a point acknowledged
/// twice, sent again as a duplicate, is listed twice until it is settled),
/// the times of the points rejected, and the acks' totals.
#[derive(Debug, Default)]
pub struct Acked {
    stored: HashMap<Uuid, Vec<(i64, u64)>>,
    rejected: HashMap<Uuid, Vec<i64>>,
    /// The sum of the acks' `accepted`.
    pub accepted: u64,
    /// Points sent again after an error, whose first ack may have been
    /// lost: they may come back as duplicates though their first try
    /// was stored.
    pub resent: u64,
}

impl Acked {
    pub fn add(&mut self, device: Uuid, time_us: i64, fingerprint: u64) {
        self.stored
            .entry(device)
            .or_default()
            .push((time_us, fingerprint));
    }

    pub fn reject(&mut self, device: Uuid, time_us: i64) {
        self.rejected.entry(device).or_default().push(time_us);
    }

    /// Sorts and deduplicates each device's points.
    fn settle(&mut self) {
        for points in self.stored.values_mut() {
            points.sort_unstable();
            points.dedup();
        }
        for times in self.rejected.values_mut() {
            times.sort_unstable();
            times.dedup();
        }
    }

    pub fn len(&self) -> usize {
        self.stored.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What one device's stored rows say against what was acknowledged for it.
#[derive(Debug, Default, PartialEq)]
struct Tally {
    missing: Vec<i64>,
    /// Stored with other values than were sent.
    altered: Vec<i64>,
    /// Stored though rejected.
    rejected_stored: Vec<i64>,
    /// Stored, never acknowledged, not rejected.
    unacknowledged: Vec<i64>,
}

/// `acked` and `stored` sorted and deduplicated by time; `rejected` sorted.
fn compare(acked: &[(i64, u64)], rejected: &[i64], stored: &[(i64, u64)]) -> Tally {
    let mut t = Tally::default();
    let (mut i, mut j) = (0, 0);
    while i < acked.len() || j < stored.len() {
        match (acked.get(i), stored.get(j)) {
            (Some(a), Some(s)) if a.0 == s.0 => {
                if a.1 != s.1 {
                    t.altered.push(a.0);
                }
                i += 1;
                j += 1;
            }
            (Some(a), s) if s.is_none_or(|s| a.0 < s.0) => {
                t.missing.push(a.0);
                i += 1;
            }
            (_, Some(s)) => {
                if rejected.binary_search(&s.0).is_ok() {
                    t.rejected_stored.push(s.0);
                } else {
                    t.unacknowledged.push(s.0);
                }
                j += 1;
            }
            (_, None) => break,
        }
    }
    t
}

/// Prints what does not hold; true when everything does. One device (of
/// its app_source) at a time, by the unique key (app_source, device_id,
/// time).
pub async fn verify(
    url: &str,
    devices: &[(String, Uuid)],
    acked: &mut Acked,
) -> anyhow::Result<bool> {
    acked.settle();
    let mut conn = PgConnection::connect(url).await?;
    let mut found = 0u64;
    let mut bad: Vec<(&str, Uuid, i64)> = Vec::new();
    let mut counts = [0usize; 4];
    for (app_source, device) in devices {
        let rows = sqlx::query(&format!(
            "SELECT {SELECT_COLUMNS} FROM location_events
             WHERE app_source = $1 AND device_id = $2 ORDER BY time"
        ))
        .bind(app_source)
        .bind(device)
        .fetch_all(&mut conn)
        .await?;
        found += rows.len() as u64;
        let mut reader = LocationReader::default();
        let mut stored = Vec::with_capacity(rows.len());
        for r in &rows {
            let l = reader.read(r)?;
            stored.push((l.time_us, of_stored(&l)));
        }
        let t = compare(
            acked.stored.get(device).map_or(&[][..], Vec::as_slice),
            acked.rejected.get(device).map_or(&[][..], Vec::as_slice),
            &stored,
        );
        for (k, (what, list)) in [
            ("missing", t.missing),
            ("stored with other values than sent", t.altered),
            ("stored though rejected", t.rejected_stored),
            ("stored, never acknowledged", t.unacknowledged),
        ]
        .into_iter()
        .enumerate()
        {
            counts[k] += list.len();
            bad.extend(list.into_iter().map(|at| (what, *device, at)));
        }
    }
    let distinct = acked.len() as u64;
    // The table gained `found` rows; the acks said `accepted` were new. They
    // differ only by acks lost to errors (their points sent again, then
    // answered as duplicates), at most the points sent again.
    let split_holds = acked.accepted <= found && found - acked.accepted <= acked.resent;
    println!(
        "verify: {distinct} points acknowledged as stored, {found} rows found for the fleet, {} missing, {} stored with other values, {} rejected but stored, {} stored but never acknowledged; acks said {} accepted ({} points sent again after errors)",
        counts[0], counts[1], counts[2], counts[3], acked.accepted, acked.resent
    );
    for (what, d, t) in bad.iter().take(20) {
        println!("  {what}: device {d} at {t} us");
    }
    if !split_holds {
        println!(
            "  the acks' accepted ({}) is not what the table gained ({found}), beyond the {} points sent again after errors",
            acked.accepted, acked.resent
        );
    }
    Ok(bad.is_empty() && split_holds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_finds_what_does_not_hold() {
        let t = compare(
            &[(1, 10), (2, 20), (3, 30), (5, 50)],
            &[4],
            &[(0, 0), (2, 20), (3, 31), (4, 40)],
        );
        assert_eq!(t.missing, vec![1, 5]);
        assert_eq!(t.altered, vec![3]);
        assert_eq!(t.rejected_stored, vec![4]);
        assert_eq!(t.unacknowledged, vec![0]);
        assert_eq!(
            compare(&[(1, 1), (2, 2)], &[], &[(1, 1), (2, 2)]),
            Tally::default()
        );
        assert_eq!(compare(&[(7, 1)], &[], &[]).missing, vec![7]);
    }

    #[test]
    fn a_point_read_back_has_the_fingerprint_it_was_sent_with() {
        let mut d = crate::fleet::Device::new(1, 1, "mextrack", 1_780_000_000_000_000, 1_000_000);
        let mut p = d.next_point();
        p.metadata_json = r#"{"b": 1, "a": [0.5, "x"]}"#.into();
        let validator = locus::ingest::validate::Validator::new(
            &locus::config::ValidationArgs::default(),
            std::time::Duration::from_secs(10 * 365 * 86_400),
        );
        let mut v = validator
            .validate(p.clone(), 1_780_000_000_000_000)
            .expect("valid");
        // As jsonb gives it back: its own spacing and key order.
        v.metadata = Some(r#"{"a": [0.5, "x"], "b": 1}"#.into());
        assert_eq!(of_stored(&v), of_sent(&p));
        v.speed = v.speed.map(|s| s + 1.0);
        assert_ne!(of_stored(&v), of_sent(&p));
    }
}
