//! Native range partitions on plain PostgreSQL (tier 3): one per chunk
//! interval, aligned to the Unix epoch like `time_bucket`, made ahead of time.
//! A default partition catches whatever falls outside them, so no point is
//! ever refused for lack of a partition.

use chrono::{DateTime, Utc};

pub const DEFAULT_PARTITION: &str = "location_events_default";

/// One partition's range, in microseconds since the Unix epoch: [start, end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start_us: i64,
    pub end_us: i64,
}

impl Range {
    pub fn overlaps(&self, other: &Range) -> bool {
        self.start_us < other.end_us && other.start_us < self.end_us
    }

    /// `location_events_p20261124` for whole days, `..._p20261124_0600` otherwise.
    pub fn name(&self, interval_us: i64) -> String {
        let start = ts(self.start_us);
        if interval_us % 86_400_000_000 == 0 {
            format!("location_events_p{}", start.format("%Y%m%d"))
        } else {
            format!("location_events_p{}", start.format("%Y%m%d_%H%M"))
        }
    }

    pub fn create_sql(&self, interval_us: i64) -> String {
        format!(
            "CREATE TABLE {} PARTITION OF location_events FOR VALUES FROM ('{}') TO ('{}')",
            self.name(interval_us),
            ts(self.start_us).format("%Y-%m-%d %H:%M:%S+00"),
            ts(self.end_us).format("%Y-%m-%d %H:%M:%S+00"),
        )
    }
}

fn ts(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

/// The partitions that should exist at `now_us`: every interval from
/// `now - retention` to `ahead` intervals after the current one.
pub fn wanted(now_us: i64, interval_us: i64, retention_us: i64, ahead: u32) -> Vec<Range> {
    let first = (now_us - retention_us).div_euclid(interval_us) * interval_us;
    let last = now_us.div_euclid(interval_us) * interval_us + i64::from(ahead) * interval_us;
    (0..)
        .map(|i| first + i * interval_us)
        .take_while(|s| *s <= last)
        .map(|s| Range {
            start_us: s,
            end_us: s + interval_us,
        })
        .collect()
}

/// Parses `pg_get_expr(relpartbound, oid)` of a range partition, as printed
/// with `TimeZone = UTC` and `DateStyle = ISO`:
/// `FOR VALUES FROM ('2026-11-24 00:00:00+00') TO ('2026-11-25 00:00:00+00')`.
pub fn parse_bound(expr: &str) -> Option<Range> {
    let mut parts = expr.split('\'');
    let _ = parts.next()?;
    let from = parts.next()?;
    let _ = parts.next()?;
    let to = parts.next()?;
    let parse = |s: &str| {
        DateTime::parse_from_str(&format!("{s}00"), "%Y-%m-%d %H:%M:%S%.f%z")
            .ok()
            .map(|t| t.timestamp_micros())
    };
    Some(Range {
        start_us: parse(from)?,
        end_us: parse(to)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000_000;

    #[test]
    fn wanted_covers_retention_and_ahead() {
        let now = 20_000 * DAY + 3_600_000_000; // 1h into a day
        let w = wanted(now, DAY, 30 * DAY, 7);
        assert_eq!(w.first().unwrap().start_us, (20_000 - 30) * DAY);
        assert_eq!(w.last().unwrap().start_us, (20_000 + 7) * DAY);
        assert_eq!(w.len(), 38);
        assert!(w.windows(2).all(|p| p[0].end_us == p[1].start_us));
    }

    #[test]
    fn names_and_bounds_round_trip() {
        let r = Range {
            start_us: 20_416 * DAY,
            end_us: 20_417 * DAY,
        };
        assert_eq!(r.name(DAY), "location_events_p20251124");
        let sql = r.create_sql(DAY);
        assert!(
            sql.ends_with("FROM ('2025-11-24 00:00:00+00') TO ('2025-11-25 00:00:00+00')"),
            "{sql}"
        );
        let expr = "FOR VALUES FROM ('2025-11-24 00:00:00+00') TO ('2025-11-25 00:00:00+00')";
        assert_eq!(parse_bound(expr), Some(r));
        let six_hours = DAY / 4;
        assert_eq!(
            Range {
                start_us: 20_416 * DAY + six_hours,
                end_us: 0
            }
            .name(six_hours),
            "location_events_p20251124_0600"
        );
        assert_eq!(parse_bound("DEFAULT"), None);
    }
}
