//! Hourly statistics from `location_hourly`, on every tier: one row per
//! hour, combining the rows of the devices that match the key.

use chrono::{DateTime, Utc};
use serde::{Serialize, Serializer};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{
    QueryError, QueryState, device_app_source, encoded::timestamp, invalid, parse_uuid, ts,
};
use crate::{auth::Principal, location::json::rfc3339, proto};

enum StatsKey {
    Device(Uuid),
    User(Uuid),
    AppSource(String),
}

/// A stats request, as both transports carry it. The times are as each
/// transport reads them; one it could not read is reported after the
/// caller's rights and the key, as before the transports shared this.
pub struct StatsRequest<'a> {
    pub device_id: Option<&'a str>,
    pub user_id: Option<&'a str>,
    /// With a device or user: the app_source they are of; alone: the key.
    pub app_source: &'a str,
    pub from_us: Result<i64, QueryError>,
    pub to_us: Result<i64, QueryError>,
}

/// The hours `req` asks for, if `caller` may read them.
pub async fn hourly_stats(
    state: &QueryState,
    caller: &Principal,
    req: StatsRequest<'_>,
) -> Result<Vec<HourStats>, QueryError> {
    caller.require_read()?;
    let (key, app_source) = key_of(caller, req.device_id, req.user_id, req.app_source)?;
    hourly(state, key, app_source.as_deref(), req.from_us?, req.to_us?).await
}

/// What a stats request asks: the key, and the app_source its rows must be
/// of (`None`: every one). A device is named within its app_source (the
/// one asked, else the caller's); a user within the one asked, else within
/// the caller's scope; an app_source alone only by a caller that may read
/// it.
fn key_of(
    caller: &Principal,
    device_id: Option<&str>,
    user_id: Option<&str>,
    app_source: &str,
) -> Result<(StatsKey, Option<String>), QueryError> {
    match (device_id, user_id) {
        (Some(d), None) => {
            let app = device_app_source(caller, app_source)?;
            Ok((
                StatsKey::Device(parse_uuid(d, "device_id")?),
                Some(app.to_string()),
            ))
        }
        (None, Some(u)) => {
            let app = if app_source.is_empty() {
                caller.read_scope()
            } else {
                caller.require_app(app_source)?;
                Some(app_source)
            };
            Ok((
                StatsKey::User(parse_uuid(u, "user_id")?),
                app.map(str::to_string),
            ))
        }
        (None, None) if !app_source.is_empty() => {
            caller.require_app(app_source)?;
            Ok((
                StatsKey::AppSource(app_source.to_string()),
                Some(app_source.to_string()),
            ))
        }
        _ => Err(invalid(
            "give device_id or user_id (each with or without app_source), or app_source alone",
        )),
    }
}

// Written once in Rust: the row that `hourly`'s SQL reads by these names
// is also the JSON that HTTP answers (`HourJson` in the OpenAPI document);
// gRPC's `HourlyStats`, which nests the bounding box, is made from it below.
/// One hour of the matching rows of location_hourly, combined.
#[derive(Debug, sqlx::FromRow, Serialize, ToSchema)]
#[schema(as = HourJson)]
pub struct HourStats {
    #[serde(serialize_with = "as_rfc3339")]
    #[schema(value_type = String)]
    pub hour: DateTime<Utc>,
    pub point_count: i64,
    pub devices: i64,
    pub avg_latitude: f64,
    pub avg_longitude: f64,
    /// Weighted by each device's point count in the hour.
    pub avg_speed: Option<f64>,
    pub max_speed: Option<f64>,
    #[serde(serialize_with = "as_rfc3339")]
    #[schema(value_type = String)]
    pub first_event: DateTime<Utc>,
    #[serde(serialize_with = "as_rfc3339")]
    #[schema(value_type = String)]
    pub last_event: DateTime<Utc>,
    pub min_latitude: f64,
    pub max_latitude: f64,
    pub min_longitude: f64,
    pub max_longitude: f64,
}

/// A time as the JSON answers write it.
fn as_rfc3339<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(t.timestamp_micros()))
}

impl From<HourStats> for proto::HourlyStats {
    fn from(h: HourStats) -> Self {
        proto::HourlyStats {
            hour: Some(timestamp(h.hour.timestamp_micros())),
            point_count: h.point_count.max(0) as u64,
            devices: h.devices.max(0) as u32,
            avg_latitude: h.avg_latitude,
            avg_longitude: h.avg_longitude,
            avg_speed: h.avg_speed,
            max_speed: h.max_speed,
            first_event: Some(timestamp(h.first_event.timestamp_micros())),
            last_event: Some(timestamp(h.last_event.timestamp_micros())),
            bbox: Some(proto::BoundingBox {
                min_latitude: h.min_latitude,
                max_latitude: h.max_latitude,
                min_longitude: h.min_longitude,
                max_longitude: h.max_longitude,
            }),
        }
    }
}

/// The hours of `key` in [from, to); `app_source` keeps only rows of that
/// app_source, `None` keeps all (see [`key_of`]).
async fn hourly(
    state: &QueryState,
    key: StatsKey,
    app_source: Option<&str>,
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
        "SELECT hour,
                sum(point_count)::int8 AS point_count,
                count(DISTINCT device_id)::int8 AS devices,
                sum(avg_latitude * point_count) / sum(point_count) AS avg_latitude,
                sum(avg_longitude * point_count) / sum(point_count) AS avg_longitude,
                sum(avg_speed * point_count) / nullif(sum(point_count) FILTER (WHERE avg_speed IS NOT NULL), 0) AS avg_speed,
                max(max_speed)::float8 AS max_speed,
                min(first_event) AS first_event, max(last_event) AS last_event,
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
        .bind(app_source)
        .fetch_all(&state.pool)
        .await?)
}
