//! `--verify`: what locus acknowledged against what the table holds. Every
//! point acknowledged as stored (accepted or duplicate) is stored, with the
//! values that were sent; no point that was rejected is stored, nor any
//! that was never acknowledged; and the acks' `accepted` count is what the
//! table gained (less only by acks lost to errors, whose points were sent
//! again and came back as duplicates).
//!
//! With `--acks log` an ack says "in the log", not "stored": the check
//! waits until the log has drained, points the database was set to refuse
//! (`--refused-speed`) are expected absent (in the dead letters) and the
//! rest present, and the acks' `accepted` (which cannot count points the
//! table already held) is at least what the table gained.
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
    /// Acknowledged into the log, with a value the database refuses: for
    /// the dead letters, never the table.
    refused: HashMap<Uuid, Vec<i64>>,
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

    pub fn refuse(&mut self, device: Uuid, time_us: i64) {
        self.refused.entry(device).or_default().push(time_us);
    }

    /// Sorts and deduplicates each device's points.
    fn settle(&mut self) {
        for points in self.stored.values_mut() {
            points.sort_unstable();
            points.dedup();
        }
        for times in self.rejected.values_mut().chain(self.refused.values_mut()) {
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
    /// Stored though the database was set to refuse it.
    refused_stored: Vec<i64>,
    /// Stored, never acknowledged, not rejected.
    unacknowledged: Vec<i64>,
}

/// `acked` and `stored` sorted and deduplicated by time; `rejected` and
/// `refused` sorted.
fn compare(
    acked: &[(i64, u64)],
    rejected: &[i64],
    refused: &[i64],
    stored: &[(i64, u64)],
) -> Tally {
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
                } else if refused.binary_search(&s.0).is_ok() {
                    t.refused_stored.push(s.0);
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

/// What [`verify`] found.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    /// Everything holds.
    pub held: bool,
    /// Acknowledged points of the refused speed, absent from the table as
    /// they should be.
    pub refused_absent: usize,
}

/// Prints what does not hold. One device (of
/// its app_source) at a time, by the unique key (app_source, device_id,
/// time). `log`: the acks said "in the log" (`--acks log`).
pub async fn verify(
    url: &str,
    devices: &[(String, Uuid)],
    acked: &mut Acked,
    log: bool,
) -> anyhow::Result<Verdict> {
    acked.settle();
    let mut conn = PgConnection::connect(url).await?;
    let mut found = 0u64;
    let mut bad: Vec<(&str, Uuid, i64)> = Vec::new();
    let mut counts = [0usize; 5];
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
            acked.refused.get(device).map_or(&[][..], Vec::as_slice),
            &stored,
        );
        for (k, (what, list)) in [
            ("missing", t.missing),
            ("stored with other values than sent", t.altered),
            ("stored though rejected", t.rejected_stored),
            ("stored, never acknowledged", t.unacknowledged),
            (
                "stored though the database was set to refuse it",
                t.refused_stored,
            ),
        ]
        .into_iter()
        .enumerate()
        {
            counts[k] += list.len();
            bad.extend(list.into_iter().map(|at| (what, *device, at)));
        }
    }
    let distinct = acked.len() as u64;
    let refused: usize = acked.refused.values().map(Vec::len).sum();
    // The table gained `found` rows; the acks said `accepted` were new. They
    // differ only by acks lost to errors (their points sent again, then
    // answered as duplicates), at most the points sent again. An ack of the
    // log counts as new a point the table already held (sent again in
    // another batch), and one the database refuses later: it says at least
    // what the table gained, less what lost acks hid.
    let split_holds = if log {
        found <= acked.accepted + acked.resent
    } else {
        acked.accepted <= found && found - acked.accepted <= acked.resent
    };
    println!(
        "verify: {distinct} points acknowledged as stored, {found} rows found for the fleet, {} missing, {} stored with other values, {} rejected but stored, {} stored but never acknowledged; acks said {} accepted ({} points sent again after errors)",
        counts[0], counts[1], counts[2], counts[3], acked.accepted, acked.resent
    );
    if log {
        println!(
            "verify: acks of the log; {refused} acknowledged points of the refused speed, {} of them absent as they should be, {} stored",
            refused - counts[4],
            counts[4]
        );
    }
    for (what, d, t) in bad.iter().take(20) {
        println!("  {what}: device {d} at {t} us");
    }
    if !split_holds {
        println!(
            "  the acks' accepted ({}) is not what the table gained ({found}), beyond the {} points sent again after errors",
            acked.accepted, acked.resent
        );
    }
    Ok(Verdict {
        held: bad.is_empty() && split_holds,
        refused_absent: refused - counts[4],
    })
}

/// How often [`wait_drained`] looks.
const DRAIN_POLL: std::time::Duration = std::time::Duration::from_secs(1);
/// Polls in a row that must find the log empty and the fleet's rows
/// unchanged: locus reads the log's state every 2 s.
const DRAIN_QUIET: usize = 4;

/// With `--acks log`: waits until the log has drained into the table (the
/// first of `metrics` that answers says `locus_log_backlog_messages 0`, and
/// the fleet's rows stop changing, [`DRAIN_QUIET`] polls in a row), at
/// most `deadline`. How long it took, or `None` past the deadline.
pub async fn wait_drained(
    url: &str,
    devices: &[(String, Uuid)],
    metrics: &[String],
    deadline: std::time::Duration,
) -> anyhow::Result<Option<std::time::Duration>> {
    let ids: Vec<Uuid> = devices.iter().map(|d| d.1).collect();
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(2))
        .build()?;
    let started = std::time::Instant::now();
    let mut seen: Vec<(Option<f64>, Option<i64>)> = Vec::new();
    while started.elapsed() < deadline {
        let mut backlog = None;
        for m in metrics {
            let text = match client.get(format!("{m}/metrics")).send().await {
                Ok(r) => r.text().await.ok(),
                Err(_) => None,
            };
            backlog = text.as_deref().and_then(|t| {
                t.lines().find_map(|l| {
                    let (series, value) = l.rsplit_once(' ')?;
                    (series == "locus_log_backlog_messages")
                        .then(|| value.parse::<f64>().ok())
                        .flatten()
                })
            });
            if backlog.is_some() {
                break;
            }
        }
        // The database may still be away: then no count.
        let rows = match PgConnection::connect(url).await {
            Ok(mut c) => sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM location_events WHERE device_id = ANY($1)",
            )
            .bind(&ids)
            .fetch_one(&mut c)
            .await
            .ok(),
            Err(_) => None,
        };
        seen.push((backlog, rows));
        if let Some(last) = seen.len().checked_sub(DRAIN_QUIET).map(|i| &seen[i..])
            && last.iter().all(|(b, r)| *b == Some(0.0) && r.is_some())
            && last.windows(2).all(|w| w[0].1 == w[1].1)
        {
            return Ok(Some(started.elapsed()));
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let (backlog, rows) = seen.last().copied().unwrap_or_default();
    println!(
        "verify: the log did not drain within {deadline:?} (backlog {backlog:?} messages, {rows:?} rows of the fleet)"
    );
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_finds_what_does_not_hold() {
        let t = compare(
            &[(1, 10), (2, 20), (3, 30), (5, 50)],
            &[4],
            &[6, 7],
            &[(0, 0), (2, 20), (3, 31), (4, 40), (7, 70)],
        );
        assert_eq!(t.missing, vec![1, 5]);
        assert_eq!(t.altered, vec![3]);
        assert_eq!(t.rejected_stored, vec![4]);
        assert_eq!(t.unacknowledged, vec![0]);
        // 6 absent as it should be; 7 stored though refused.
        assert_eq!(t.refused_stored, vec![7]);
        assert_eq!(
            compare(&[(1, 1), (2, 2)], &[], &[], &[(1, 1), (2, 2)]),
            Tally::default()
        );
        assert_eq!(compare(&[(7, 1)], &[], &[], &[]).missing, vec![7]);
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
