//! A device's raw points over a time range, in time order, paginated.
//! `(app_source, device_id, time)` is unique, so the cursor (the last time
//! returned) makes pages without gaps or repeats.

use futures::TryStreamExt;

use super::{QueryError, QueryState, device_app_source, invalid, page_limit, parse_uuid, ts};
use crate::{
    auth::Principal,
    location::{LocationReader, SELECT_COLUMNS, ValidLocation},
};

/// A track request, as both transports carry it. The times and the limit
/// are as each transport reads them; a value it could not read is reported
/// after the caller's right to read, as every other error of the request.
pub struct TrackRequest<'a> {
    pub device_id: &'a str,
    /// The device's app_source: a device id is unique only within one. The
    /// caller's own when empty (see [`device_app_source`]).
    pub app_source: &'a str,
    pub from_us: Result<i64, QueryError>,
    pub to_us: Result<i64, QueryError>,
    pub limit: Result<Option<u32>, QueryError>,
    pub cursor: Option<String>,
}

pub struct TrackPage {
    pub points: Vec<ValidLocation>,
    pub next_cursor: Option<String>,
}

/// `t` and the time of the last point returned, in microseconds.
fn encode_cursor(time_us: i64) -> String {
    format!("t{time_us}")
}

fn decode_cursor(c: &str, from_us: i64, to_us: i64) -> Result<i64, QueryError> {
    let t: i64 = c
        .strip_prefix('t')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| invalid(format!("cursor {c:?} is not one this server gave")))?;
    if !(from_us..to_us).contains(&t) {
        return Err(invalid(
            "cursor lies outside [from, to): pass the same range as for the first page",
        ));
    }
    Ok(t)
}

/// One page of the track `req` asks for, if `caller` may read it.
pub async fn track(
    state: &QueryState,
    caller: &Principal,
    req: TrackRequest<'_>,
) -> Result<TrackPage, QueryError> {
    caller.require_read()?;
    let limit = req.limit?;
    let device_id = parse_uuid(req.device_id, "device_id")?;
    let (from_us, to_us) = (req.from_us?, req.to_us?);
    let app_source = device_app_source(caller, req.app_source)?;
    let limits = &state.limits;
    if from_us >= to_us {
        return Err(invalid("from must be before to"));
    }
    let span = i64::try_from(limits.max_track_span.as_micros()).unwrap_or(i64::MAX);
    if to_us.saturating_sub(from_us) > span {
        return Err(invalid(format!(
            "the range is wider than the limit of {}",
            crate::config::human(limits.max_track_span)
        )));
    }
    let limit = page_limit(limit.unwrap_or(0), limits.track_page, limits.max_track_page)?;
    let after = match req.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(decode_cursor(c, from_us, to_us)?),
    };
    let known = state.latest.get(app_source, &device_id, |_| ()).is_some();
    if after.is_none() && !known {
        return Err(QueryError::NotFound(format!(
            "no points are stored for device {} of app_source {:?}",
            device_id, app_source
        )));
    }
    let mut reader = LocationReader::default();
    let mut rows = Vec::new();
    let sql = format!(
        "SELECT {SELECT_COLUMNS} FROM location_events
         WHERE app_source = $6 AND device_id = $1 AND time >= $2 AND time < $3 AND time > $4
         ORDER BY time LIMIT $5"
    );
    let mut found = sqlx::query(&sql)
        .bind(device_id)
        .bind(ts(from_us)?)
        .bind(ts(to_us)?)
        .bind(ts(after.unwrap_or(from_us.saturating_sub(1)))?)
        .bind(i64::from(limit) + 1)
        .bind(app_source)
        .fetch(&state.pool);
    while let Some(row) = found.try_next().await? {
        rows.push(reader.read(&row)?);
    }
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next_cursor = if more {
        rows.last().map(|r| encode_cursor(r.time_us))
    } else {
        None
    };
    Ok(TrackPage {
        points: rows,
        next_cursor,
    })
}
