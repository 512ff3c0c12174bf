//! Hourly statistics from `location_hourly`, on every tier: one row per
//! hour, combining the rows of the devices that match the key.

use uuid::Uuid;

use super::{QueryError, QueryState, invalid, ts};

pub enum StatsKey {
    Device(Uuid),
    User(Uuid),
    AppSource(String),
}

#[derive(Debug, sqlx::FromRow)]
pub struct HourStats {
    pub hour_us: i64,
    pub point_count: i64,
    pub devices: i64,
    pub avg_latitude: f64,
    pub avg_longitude: f64,
    /// Weighted by each device's point count in the hour.
    pub avg_speed: Option<f64>,
    pub max_speed: Option<f64>,
    pub first_event_us: i64,
    pub last_event_us: i64,
    pub min_latitude: f64,
    pub max_latitude: f64,
    pub min_longitude: f64,
    pub max_longitude: f64,
}

/// The hours of `key` in [from, to); `scope` keeps only rows of that
/// app_source (the caller's), `None` keeps all.
pub async fn hourly(
    state: &QueryState,
    key: StatsKey,
    scope: Option<&str>,
    from_us: i64,
    to_us: i64,
) -> Result<Vec<HourStats>, QueryError> {
    if from_us >= to_us {
        return Err(invalid("from must be before to"));
    }
    let span = i64::try_from(state.limits.max_stats_span.as_micros()).unwrap_or(i64::MAX);
    if to_us.saturating_sub(from_us) > span {
        return Err(invalid(format!(
            "the range is wider than the limit of {}",
            crate::config::human(state.limits.max_stats_span)
        )));
    }
    let column = match &key {
        StatsKey::Device(_) => "device_id",
        StatsKey::User(_) => "user_id",
        StatsKey::AppSource(_) => "app_source",
    };
    let sql = format!(
        "SELECT (extract(epoch FROM hour) * 1000000)::int8 AS hour_us,
                sum(point_count)::int8 AS point_count,
                count(DISTINCT device_id)::int8 AS devices,
                sum(avg_latitude * point_count) / sum(point_count) AS avg_latitude,
                sum(avg_longitude * point_count) / sum(point_count) AS avg_longitude,
                sum(avg_speed * point_count) / nullif(sum(point_count) FILTER (WHERE avg_speed IS NOT NULL), 0) AS avg_speed,
                max(max_speed)::float8 AS max_speed,
                (extract(epoch FROM min(first_event)) * 1000000)::int8 AS first_event_us,
                (extract(epoch FROM max(last_event)) * 1000000)::int8 AS last_event_us,
                min(min_latitude) AS min_latitude, max(max_latitude) AS max_latitude,
                min(min_longitude) AS min_longitude, max(max_longitude) AS max_longitude
         FROM location_hourly
         WHERE {column} = $1 AND hour >= $2 AND hour < $3
           AND ($4::text IS NULL OR app_source = $4)
         GROUP BY hour ORDER BY hour"
    );
    let q = sqlx::query_as(&sql);
    let q = match key {
        StatsKey::Device(u) | StatsKey::User(u) => q.bind(u),
        StatsKey::AppSource(a) => q.bind(a),
    };
    Ok(q.bind(ts(from_us)?)
        .bind(ts(to_us)?)
        .bind(scope)
        .fetch_all(&state.pool)
        .await?)
}
