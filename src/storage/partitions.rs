//! Native range partitions on plain PostgreSQL (tier 3): one per chunk
//! interval, aligned to the Unix epoch like `time_bucket`, made ahead of time.
//! A default partition catches whatever falls outside them, so no point is
//! ever refused for lack of a partition.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::SetupError;

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
        if interval_us % 86_400_000_000 == 0 && self.start_us % 86_400_000_000 == 0 {
            format!("location_events_p{}", start.format("%Y%m%d"))
        } else {
            format!("location_events_p{}", start.format("%Y%m%d_%H%M"))
        }
    }

    pub fn create_sql(&self, interval_us: i64) -> String {
        format!(
            "CREATE TABLE {} PARTITION OF location_events FOR VALUES FROM ('{}') TO ('{}')",
            self.name(interval_us),
            bound(self.start_us),
            bound(self.end_us),
        )
    }
}

fn ts(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

/// The partitions to make at `now_us` so that every interval from `now -
/// retention` to `ahead` intervals after the current one is covered, given
/// the ranges that exist. Where an existing partition (of another interval,
/// say) covers part of a range, the new one only fills the gap: partitions
/// never overlap, and no gap is left to the default partition.
pub fn missing(
    existing: &[Range],
    now_us: i64,
    interval_us: i64,
    retention_us: i64,
    ahead: u32,
) -> Vec<Range> {
    let align = |t: i64| t.div_euclid(interval_us) * interval_us;
    let mut cursor = align(now_us - retention_us);
    let last_end = align(now_us) + (i64::from(ahead) + 1) * interval_us;
    let mut out = Vec::new();
    while cursor < last_end {
        if let Some(r) = existing
            .iter()
            .find(|r| r.start_us <= cursor && cursor < r.end_us)
        {
            cursor = r.end_us;
            continue;
        }
        let next_existing = existing
            .iter()
            .map(|r| r.start_us)
            .filter(|s| *s > cursor)
            .min();
        let end = (align(cursor) + interval_us).min(next_existing.unwrap_or(i64::MAX));
        out.push(Range {
            start_us: cursor,
            end_us: end,
        });
        cursor = end;
    }
    out
}

/// Makes a partition for a range the default partition already holds rows
/// of: the rows move into it, in one transaction.
pub fn create_moving_sql(r: &Range, interval_us: i64) -> String {
    let (name, from, to) = (r.name(interval_us), bound(r.start_us), bound(r.end_us));
    format!(
        "CREATE TABLE {name} (LIKE location_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS);\n\
         INSERT INTO {name} SELECT * FROM {DEFAULT_PARTITION} WHERE time >= '{from}' AND time < '{to}';\n\
         DELETE FROM {DEFAULT_PARTITION} WHERE time >= '{from}' AND time < '{to}';\n\
         ALTER TABLE location_events ATTACH PARTITION {name} FOR VALUES FROM ('{from}') TO ('{to}')"
    )
}

fn bound(us: i64) -> String {
    ts(us).format("%Y-%m-%d %H:%M:%S%.f+00").to_string()
}

/// The partitions of `location_events`: name, and range (`None` for the default).
/// The name is the partition's `regclass` as text: quoted and
/// schema-qualified by PostgreSQL where it must be, so that it names that
/// table and no other when written into SQL.
pub async fn list(conn: &mut PgConnection) -> Result<Vec<(String, Option<Range>)>, SetupError> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.oid::regclass::text, pg_get_expr(c.relpartbound, c.oid)
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'location_events'::regclass",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(SetupError::sql("reading partitions"))?;
    Ok(rows
        .into_iter()
        .map(|(name, bound)| {
            let r = parse_bound(&bound);
            (name, r)
        })
        .collect())
}

/// Whether the default partition holds rows (in `range`, if given).
pub async fn default_has_rows(
    conn: &mut PgConnection,
    range: Option<&Range>,
) -> Result<bool, SetupError> {
    let Some(r) = range else {
        return sqlx::query_scalar(&format!(
            "SELECT EXISTS (SELECT 1 FROM {DEFAULT_PARTITION})"
        ))
        .fetch_one(&mut *conn)
        .await
        .map_err(SetupError::sql("reading the default partition"));
    };
    sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM {DEFAULT_PARTITION} \
         WHERE time >= to_timestamp($1::float8 / 1e6) AND time < to_timestamp($2::float8 / 1e6))"
    ))
    .bind(r.start_us as f64)
    .bind(r.end_us as f64)
    .fetch_one(&mut *conn)
    .await
    .map_err(SetupError::sql("reading the default partition"))
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
    fn missing_covers_retention_and_ahead() {
        let now = 20_000 * DAY + 3_600_000_000; // 1h into a day
        let w = missing(&[], now, DAY, 30 * DAY, 7);
        assert_eq!(w.first().unwrap().start_us, (20_000 - 30) * DAY);
        assert_eq!(w.last().unwrap().start_us, (20_000 + 7) * DAY);
        assert_eq!(w.len(), 38);
        assert!(w.windows(2).all(|p| p[0].end_us == p[1].start_us));
        assert!(missing(&w, now, DAY, 30 * DAY, 7).is_empty());
    }

    #[test]
    fn a_new_interval_fills_gaps_without_overlap() {
        let now = 20_000 * DAY;
        // Daily partitions exist for today and tomorrow; the interval becomes 2 days.
        let existing = [
            Range {
                start_us: 20_000 * DAY,
                end_us: 20_001 * DAY,
            },
            Range {
                start_us: 20_001 * DAY,
                end_us: 20_002 * DAY,
            },
        ];
        let w = missing(&existing, now, 2 * DAY, 4 * DAY, 2);
        let mut all: Vec<Range> = w.iter().chain(existing.iter()).copied().collect();
        all.sort_by_key(|r| r.start_us);
        assert!(
            all.windows(2).all(|p| p[0].end_us == p[1].start_us),
            "{all:?}"
        );
        assert_eq!(all.first().unwrap().start_us, 19_996 * DAY);
        assert_eq!(all.last().unwrap().end_us, 20_006 * DAY);
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
