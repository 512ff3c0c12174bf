//! `location_hourly` where TimescaleDB's continuous aggregates are missing
//! (the Apache edition and plain PostgreSQL): locus keeps it as a table.
//!
//! Writers record each hour a batch touched in `locus_rollup_pending`, in
//! the batch's own transaction, so no committed point can be missed, even
//! across a crash. The rollup recomputes exactly those hours from the raw
//! points and upserts them. It never deletes an hourly row: an hour whose raw
//! points were dropped by retention keeps its aggregate.

use sqlx::PgConnection;

/// Hours are aligned to UTC, like `time_bucket('1 hour', time)`.
pub const HOUR_US: i64 = 3_600_000_000;

const ROLLUP_SQL: &str = "
WITH taken AS (
    DELETE FROM locus_rollup_pending RETURNING hour
), hours AS (
    SELECT DISTINCT hour FROM taken
)
INSERT INTO location_hourly AS h (hour, device_id, user_id, app_source, point_count, avg_latitude, avg_longitude,
    avg_speed, max_speed, first_event, last_event, min_latitude, max_latitude, min_longitude, max_longitude)
SELECT hours.hour, e.device_id, e.user_id, e.app_source, count(*), avg(e.latitude), avg(e.longitude),
    avg(e.speed), max(e.speed), min(e.time), max(e.time), min(e.latitude), max(e.latitude),
    min(e.longitude), max(e.longitude)
FROM hours
JOIN location_events e ON e.time >= hours.hour AND e.time < hours.hour + INTERVAL '1 hour'
GROUP BY hours.hour, e.device_id, e.user_id, e.app_source
ON CONFLICT (hour, device_id, user_id, app_source) DO UPDATE SET
    point_count = EXCLUDED.point_count, avg_latitude = EXCLUDED.avg_latitude,
    avg_longitude = EXCLUDED.avg_longitude, avg_speed = EXCLUDED.avg_speed, max_speed = EXCLUDED.max_speed,
    first_event = EXCLUDED.first_event, last_event = EXCLUDED.last_event,
    min_latitude = EXCLUDED.min_latitude, max_latitude = EXCLUDED.max_latitude,
    min_longitude = EXCLUDED.min_longitude, max_longitude = EXCLUDED.max_longitude";

/// The distinct hours of `times_us` (microseconds since the Unix epoch).
pub fn hours_of(times_us: impl Iterator<Item = i64>) -> Vec<i64> {
    let mut hours: Vec<i64> = times_us.map(|t| t.div_euclid(HOUR_US) * HOUR_US).collect();
    hours.sort_unstable();
    hours.dedup();
    hours
}

/// Records `hours` (from [`hours_of`]) as pending, inside the caller's transaction.
pub async fn mark_pending(conn: &mut PgConnection, hours: Vec<i64>) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO locus_rollup_pending (hour) SELECT to_timestamp(h::float8 / 1e6) FROM unnest($1::int8[]) AS h")
        .bind(hours)
        .execute(conn)
        .await
        .map(|_| ())
}

/// Recomputes every pending hour; returns the hourly rows written.
pub async fn rollup(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    sqlx::query(ROLLUP_SQL)
        .execute(conn)
        .await
        .map(|r| r.rows_affected())
}
