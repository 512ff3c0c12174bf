//! The query API as HTTP JSON, with the live feed as Server-Sent Events.
//! Its handlers are described in the OpenAPI document ([`crate::openapi`]).

use std::{convert::Infallible, sync::Arc, time::Instant};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    response::sse::{Event, KeepAlive, Sse},
    routing::get,
};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use utoipa::{IntoParams, ToSchema};

use super::{
    QueryError, QueryState,
    grpc::updates,
    invalid,
    latest::LatestRequest,
    live::{Filter, Update},
    stats, track,
};
use crate::{
    auth::{Auth, Caller},
    location::{LocationRef, json::LocationJson},
    metrics::{Call, QUERY_DURATION},
    proto,
    status::http::ErrorJson,
};

#[derive(Clone)]
struct QueryHttp {
    state: Arc<QueryState>,
    shutdown: CancellationToken,
}

impl axum::extract::FromRef<QueryHttp> for Auth {
    fn from_ref(app: &QueryHttp) -> Auth {
        app.state.auth.clone()
    }
}

/// The query routes. `extra` is merged in (ingest and health routes).
pub fn router(state: Arc<QueryState>, shutdown: CancellationToken) -> Router {
    Router::new()
        .route("/v1/devices/{device_id}/latest", get(device_latest))
        .route("/v1/latest", get(latest))
        .route("/v1/devices/{device_id}/track", get(device_track))
        .route("/v1/stats/hourly", get(hourly_stats))
        .route("/v1/live", get(live))
        .with_state(QueryHttp { state, shutdown })
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LatestJson {
    pub locations: Vec<LocationJson>,
    /// Pass as `cursor` (with the same `device_ids` or `app_source`) for the
    /// next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TrackJson {
    pub locations: Vec<LocationJson>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HourlyJson {
    pub hours: Vec<stats::HourStats>,
}

type HttpResult<T> = Result<Json<T>, QueryError>;

/// `rpc` names the proto's rpc the route answers as.
fn timed<T>(rpc: &'static str, started: Instant, r: Result<T, QueryError>) -> HttpResult<T> {
    Call::http(rpc).record(QUERY_DURATION, started.elapsed().as_secs_f64());
    r.map(Json)
}

/// A page size from the query string: absent for the default.
fn parse_limit(s: Option<&str>) -> Result<Option<u32>, QueryError> {
    s.map(|l| {
        l.parse()
            .map_err(|_| invalid(format!("limit {l:?} is not a number")))
    })
    .transpose()
}

fn parse_time(s: Option<&str>, field: &str) -> Result<i64, QueryError> {
    let s = s.ok_or_else(|| invalid(format!("{field} is required (RFC 3339)")))?;
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc).timestamp_micros())
        .map_err(|e| invalid(format!("{field} {s:?} is not an RFC 3339 time: {e}")))
}

#[derive(Debug, Deserialize, IntoParams)]
struct DeviceParams {
    /// The device's app_source: a device id is unique only within its
    /// app_source. A reader's own when absent; required of an admin.
    app_source: Option<String>,
}

/// The newest position of one device.
#[utoipa::path(get, path = "/v1/devices/{device_id}/latest",
    params(("device_id" = String, Path, description = "UUID"), DeviceParams),
    responses((status = 200, body = LocationJson), (status = 400, body = ErrorJson), (status = 401, body = ErrorJson), (status = 403, body = ErrorJson), (status = 404, body = ErrorJson)))]
async fn device_latest(
    State(app): State<QueryHttp>,
    Caller(caller): Caller,
    Path(device_id): Path<String>,
    Query(p): Query<DeviceParams>,
) -> HttpResult<LocationJson> {
    let started = Instant::now();
    let mut found = None;
    let req = LatestRequest {
        device_ids: &[&device_id],
        app_source: p.app_source.as_deref().unwrap_or_default(),
        ..Default::default()
    };
    let r = app
        .state
        .latest_page(&caller, &req, |l| {
            found = Some(l.location.clone());
        })
        .and_then(|_| {
            found.as_ref().map(LocationJson::from).ok_or_else(|| {
                QueryError::NotFound(format!("no points are stored for device {device_id}"))
            })
        });
    timed("GetLatest", started, r)
}

#[derive(Debug, Deserialize, IntoParams)]
struct LatestParams {
    /// Alone: every device of this app_source. With `device_ids`: the
    /// app_source they are of (a reader's own when absent; required of an
    /// admin).
    app_source: Option<String>,
    /// Or these devices of `app_source`: comma-separated UUIDs, answered in
    /// this order.
    device_ids: Option<String>,
    /// Most locations in this page. Default: every device asked, or
    /// `--latest-page` (1,000) of an app_source's, in device_id order.
    limit: Option<String>,
    /// From the previous page's next_cursor.
    cursor: Option<String>,
}

/// The newest position of every device of an app_source, or of a list of
/// devices, one page at a time.
#[utoipa::path(get, path = "/v1/latest", params(LatestParams),
    responses((status = 200, body = LatestJson), (status = 400, body = ErrorJson), (status = 401, body = ErrorJson), (status = 403, body = ErrorJson)))]
async fn latest(
    State(app): State<QueryHttp>,
    Caller(caller): Caller,
    Query(p): Query<LatestParams>,
) -> HttpResult<LatestJson> {
    let started = Instant::now();
    let ids: Vec<&str> = p
        .device_ids
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .collect();
    // Cloned while the map's shard is locked, converted (strings formatted,
    // metadata parsed) after: a commit updating the map waits for the first,
    // not for the second.
    let mut found = Vec::new();
    let r = parse_limit(p.limit.as_deref()).and_then(|limit| {
        let req = LatestRequest {
            device_ids: &ids,
            app_source: p.app_source.as_deref().unwrap_or_default(),
            limit: limit.unwrap_or_default(),
            cursor: p.cursor.as_deref().unwrap_or_default(),
        };
        // A refused limit is latest_page's to report, after the caller's rights.
        found.reserve(app.state.latest_page_len(&req).unwrap_or_default());
        let next_cursor = app
            .state
            .latest_page(&caller, &req, |l| found.push(l.location.clone()))?;
        Ok(LatestJson {
            locations: found.iter().map(LocationJson::from).collect(),
            next_cursor,
        })
    });
    timed("GetLatest", started, r)
}

#[derive(Debug, Deserialize, IntoParams)]
struct TrackParams {
    /// The device's app_source: a device id is unique only within its
    /// app_source. A reader's own when absent; required of an admin.
    app_source: Option<String>,
    /// RFC 3339, inclusive.
    from: Option<String>,
    /// RFC 3339, exclusive.
    to: Option<String>,
    /// Points per page.
    limit: Option<String>,
    /// From the previous page's next_cursor.
    cursor: Option<String>,
}

/// A device's points in [from, to), in time order, one page at a time.
#[utoipa::path(get, path = "/v1/devices/{device_id}/track",
    params(("device_id" = String, Path, description = "UUID"), TrackParams),
    responses((status = 200, body = TrackJson), (status = 400, body = ErrorJson), (status = 401, body = ErrorJson), (status = 403, body = ErrorJson), (status = 404, body = ErrorJson)))]
async fn device_track(
    State(app): State<QueryHttp>,
    Caller(caller): Caller,
    Path(device_id): Path<String>,
    Query(p): Query<TrackParams>,
) -> HttpResult<TrackJson> {
    let started = Instant::now();
    let r = track::track(
        &app.state,
        &caller,
        track::TrackRequest {
            device_id: &device_id,
            app_source: p.app_source.as_deref().unwrap_or_default(),
            from_us: parse_time(p.from.as_deref(), "from"),
            to_us: parse_time(p.to.as_deref(), "to"),
            limit: parse_limit(p.limit.as_deref()),
            cursor: p.cursor,
        },
    )
    .await
    .map(|page| TrackJson {
        locations: page.points.iter().map(LocationJson::from).collect(),
        next_cursor: page.next_cursor,
    });
    timed("GetTrack", started, r)
}

#[derive(Debug, Deserialize, IntoParams)]
struct StatsParams {
    device_id: Option<String>,
    user_id: Option<String>,
    /// Alone: the app_source's stats. With `device_id`: the device's
    /// app_source (a reader's own when absent; required of an admin). With
    /// `user_id`: only the user's rows of it.
    app_source: Option<String>,
    /// RFC 3339, inclusive.
    from: Option<String>,
    /// RFC 3339, exclusive.
    to: Option<String>,
}

/// Hourly statistics for one device or user (within an app_source), or an
/// app_source: one row per hour.
#[utoipa::path(get, path = "/v1/stats/hourly", params(StatsParams),
    responses((status = 200, body = HourlyJson), (status = 400, body = ErrorJson), (status = 401, body = ErrorJson), (status = 403, body = ErrorJson)))]
async fn hourly_stats(
    State(app): State<QueryHttp>,
    Caller(caller): Caller,
    Query(p): Query<StatsParams>,
) -> HttpResult<HourlyJson> {
    let started = Instant::now();
    let r = stats::hourly_stats(
        &app.state,
        &caller,
        stats::StatsRequest {
            device_id: p.device_id.as_deref(),
            user_id: p.user_id.as_deref(),
            app_source: p.app_source.as_deref().unwrap_or_default(),
            from_us: parse_time(p.from.as_deref(), "from"),
            to_us: parse_time(p.to.as_deref(), "to"),
        },
    )
    .await
    .map(|hours| HourlyJson { hours });
    timed("GetHourlyStats", started, r)
}

#[derive(Debug, Deserialize, IntoParams)]
struct LiveParams {
    /// Only this app_source's points; with `device_ids`, the app_source
    /// they are of (a reader's own when absent; required of an admin).
    app_source: Option<String>,
    /// Comma-separated UUIDs, of `app_source`.
    device_ids: Option<String>,
    /// min_latitude,min_longitude,max_latitude,max_longitude
    bbox: Option<String>,
}

/// The query string as a subscription request: one set of rules for both
/// transports ([`super::grpc::filter`]).
fn live_filter(p: LiveParams) -> Result<Filter, QueryError> {
    let bbox = match p.bbox.as_deref() {
        None | Some("") => None,
        Some(b) => {
            let bad =
                || invalid("bbox must be min_latitude,min_longitude,max_latitude,max_longitude");
            let v: Vec<f64> = b
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .map_err(|_| bad())?;
            let [min_latitude, min_longitude, max_latitude, max_longitude] = v[..] else {
                return Err(bad());
            };
            Some(proto::BoundingBox {
                min_latitude,
                max_latitude,
                min_longitude,
                max_longitude,
            })
        }
    };
    super::grpc::filter(&proto::SubscribeRequest {
        app_source: p.app_source.unwrap_or_default(),
        device_ids: p
            .device_ids
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .filter(|d| !d.is_empty())
            .map(str::to_string)
            .collect(),
        bbox,
    })
}

/// Every point as it is committed, as Server-Sent Events (`event: location`,
/// `data:` a LocationJson). A slow reader loses its oldest updates.
#[utoipa::path(get, path = "/v1/live", params(LiveParams),
    responses((status = 200, description = "text/event-stream of LocationJson", content_type = "text/event-stream"),
              (status = 400, body = ErrorJson), (status = 401, body = ErrorJson), (status = 403, body = ErrorJson), (status = 429, body = ErrorJson)))]
async fn live(
    State(app): State<QueryHttp>,
    Caller(caller): Caller,
    Query(p): Query<LiveParams>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, QueryError> {
    let filter = live_filter(p)?;
    let sub = app.state.subscribe(&caller, filter)?;
    let events = updates(sub)
        .flat_map(|u| futures::stream::iter(sse_events(&u)))
        .take_until(app.shutdown.cancelled_owned());
    // A revoked token's feed ends with one `error` event.
    let events = app
        .state
        .while_authorized(caller, events)
        .map(|e| Ok(e.unwrap_or_else(|e| Event::default().event("error").data(e.to_string()))));
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// A point as its `LocationJson`.
fn location_json(l: &LocationRef<'_>, out: &mut Vec<u8>) {
    // Serializing these fields into a Vec cannot fail.
    let _ = serde_json::to_writer(out, &LocationJson::from(l));
}

/// An update's points as events, `event: location` and `data:` a
/// LocationJson. Each point is written as JSON once for all the
/// subscribers that take it (its batch keeps it), not once each.
pub fn sse_events(update: &Update) -> Vec<Event> {
    update
        .json(location_json)
        .filter_map(|json| std::str::from_utf8(json).ok().filter(|j| !j.is_empty()))
        .map(|json| Event::default().event("location").data(json))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use uuid::Uuid;

    use super::*;
    use crate::{
        location::ValidLocation,
        query::live::{Live, tests::batch},
    };

    /// The live feed's JSON is what `LocationJson` serializes to, metadata
    /// included, and two subscribers taking the same points share one
    /// encoding of them.
    #[tokio::test]
    async fn sse_points_are_their_location_json_written_once_a_batch() {
        let live = Live::new(1_000, 10, Duration::ZERO);
        let mut subs: Vec<_> = (0..2)
            .map(|_| live.subscribe(Filter::default()).unwrap())
            .collect();
        let points: Vec<ValidLocation> = (0..5)
            .map(|i| ValidLocation {
                time_us: 1_700_000_000_123_456 + i,
                device_id: Uuid::from_u128(i as u128),
                accuracy: Some(5.0),
                altitude: (i % 2 == 0).then_some(2_240.5),
                heading: Some(90.0),
                metadata: (i == 3).then(|| r#"{"battery": 0.9, "note": "a\nb"}"#.to_string()),
                ..ValidLocation::example()
            })
            .collect();
        live.publish(batch(&points));
        let (a, b) = (subs[0].next().await.unwrap(), subs[1].next().await.unwrap());
        let want: Vec<Vec<u8>> = points
            .iter()
            .map(|p| serde_json::to_vec(&LocationJson::from(p)).unwrap())
            .collect();
        let got: Vec<&[u8]> = a.json(location_json).collect();
        assert_eq!(got, want);
        assert!(String::from_utf8_lossy(got[3]).contains(r#""note":"a\nb""#));
        for (x, y) in a.json(location_json).zip(b.json(location_json)) {
            assert_eq!(x.as_ptr(), y.as_ptr(), "one encoding for both");
        }
        assert_eq!(sse_events(&a).len(), 5);
    }
}
