//! `locus.v1.Query` over gRPC.

use std::{pin::Pin, sync::Arc, time::Instant};

use futures::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{
    QueryError, QueryState,
    encoded::{EncodedLocations, LocationPage},
    invalid,
    latest::LatestRequest,
    live::{Filter, Update},
    parse_device_ids, stats, track,
};
use crate::{
    auth::Principal,
    metrics::{Call, QUERY_DURATION},
    proto::{self, query_server::Query},
};

#[derive(Debug, Clone)]
pub struct QueryService {
    state: Arc<QueryState>,
    /// Ends live subscriptions, so that shutdown does not wait for them.
    shutdown: CancellationToken,
}

impl QueryService {
    pub fn new(state: Arc<QueryState>, shutdown: CancellationToken) -> Self {
        Self { state, shutdown }
    }

    async fn caller<T>(&self, req: &Request<T>) -> Result<Arc<Principal>, Status> {
        Ok(self.state.auth.authenticate_grpc(req).await?)
    }
}

fn micros(t: Option<prost_types::Timestamp>, field: &str) -> Result<i64, QueryError> {
    let t = t.ok_or_else(|| invalid(format!("{field} is required")))?;
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(invalid(format!("{field}.nanos must be in [0, 1e9)")));
    }
    t.seconds
        .checked_mul(1_000_000)
        .and_then(|s| s.checked_add(i64::from(t.nanos / 1_000)))
        .filter(|&us| super::ts(us).is_ok())
        .ok_or_else(|| {
            invalid(format!(
                "{field} ({} s) is out of range: a time must lie within years -262143 to 262142",
                t.seconds
            ))
        })
}

fn timed<T>(
    rpc: &'static str,
    started: Instant,
    r: Result<T, QueryError>,
) -> Result<Response<T>, Status> {
    Call::grpc(rpc).record(QUERY_DURATION, started.elapsed().as_secs_f64());
    r.map(Response::new).map_err(Status::from)
}

/// Filter of a subscription request.
pub fn filter(req: &proto::SubscribeRequest) -> Result<Filter, QueryError> {
    let devices = if req.device_ids.is_empty() {
        None
    } else {
        Some(parse_device_ids(&req.device_ids)?)
    };
    let bbox = match &req.bbox {
        None => None,
        Some(b) if b.min_latitude <= b.max_latitude && b.min_longitude <= b.max_longitude => {
            Some((
                b.min_latitude,
                b.max_latitude,
                b.min_longitude,
                b.max_longitude,
            ))
        }
        Some(_) => return Err(invalid("bbox: min must not exceed max")),
    };
    Ok(Filter {
        app_source: (!req.app_source.is_empty()).then(|| req.app_source.clone()),
        devices,
        bbox,
    })
}

type LiveStream = Pin<Box<dyn Stream<Item = Result<EncodedLocations, Status>> + Send>>;

#[tonic::async_trait]
impl Query for QueryService {
    type SubscribeStream = LiveStream;

    async fn get_latest(
        &self,
        req: Request<proto::GetLatestRequest>,
    ) -> Result<Response<LocationPage>, Status> {
        let started = Instant::now();
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let ids: Vec<&str> = req.device_ids.iter().map(String::as_str).collect();
        let req = LatestRequest {
            device_ids: &ids,
            app_source: &req.app_source,
            limit: req.limit,
            cursor: &req.cursor,
        };
        // Sized for the page; a refused limit is latest_page's to report,
        // after the caller's rights.
        let page_len = self.state.latest_page_len(&req).unwrap_or_default();
        let mut locations = EncodedLocations::with_capacity(page_len);
        let r = self
            .state
            .latest_page(&caller, &req, |l| locations.push(l.encoded()))
            .map(|next_cursor| LocationPage {
                locations,
                next_cursor: next_cursor.unwrap_or_default(),
            });
        timed("GetLatest", started, r)
    }

    async fn get_track(
        &self,
        req: Request<proto::GetTrackRequest>,
    ) -> Result<Response<LocationPage>, Status> {
        let started = Instant::now();
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let r = track::track(
            &self.state,
            &caller,
            track::TrackRequest {
                device_id: &req.device_id,
                app_source: &req.app_source,
                from_us: micros(req.from, "from"),
                to_us: micros(req.to, "to"),
                limit: Ok(Some(req.limit)),
                cursor: Some(req.cursor),
            },
        )
        .await
        .map(|page| LocationPage {
            locations: page.points.iter().collect(),
            next_cursor: page.next_cursor.unwrap_or_default(),
        });
        timed("GetTrack", started, r)
    }

    async fn get_hourly_stats(
        &self,
        req: Request<proto::GetHourlyStatsRequest>,
    ) -> Result<Response<proto::GetHourlyStatsResponse>, Status> {
        use proto::get_hourly_stats_request::Key;
        let started = Instant::now();
        let caller = self.caller(&req).await?;
        let req = req.into_inner();
        let (device_id, user_id) = match &req.key {
            Some(Key::DeviceId(d)) => (Some(d.as_str()), None),
            Some(Key::UserId(u)) => (None, Some(u.as_str())),
            None => (None, None),
        };
        let r = stats::hourly_stats(
            &self.state,
            &caller,
            stats::StatsRequest {
                device_id,
                user_id,
                app_source: &req.app_source,
                from_us: micros(req.from, "from"),
                to_us: micros(req.to, "to"),
            },
        )
        .await
        .map(|rows| proto::GetHourlyStatsResponse {
            hours: rows.into_iter().map(Into::into).collect(),
        });
        timed("GetHourlyStats", started, r)
    }

    async fn subscribe(
        &self,
        req: Request<proto::SubscribeRequest>,
    ) -> Result<Response<LiveStream>, Status> {
        let caller = self.caller(&req).await?;
        let filter = filter(req.get_ref())?;
        let sub = self.state.subscribe(&caller, filter)?;
        use futures::StreamExt;
        // One message per --live-interval at most: far fewer frames than one a point.
        let live = updates(sub).take_until(self.shutdown.clone().cancelled_owned());
        let live = self.state.while_authorized(caller, live);
        Ok(Response::new(Box::pin(
            live.map(|update| Ok(update?.encoded())),
        )))
    }
}

/// A subscription as a stream of updates: the matching points committed
/// since the last.
pub fn updates(sub: super::live::Subscription) -> impl Stream<Item = Update> + Send + 'static {
    futures::stream::unfold(
        sub,
        |mut sub| async move { sub.next().await.map(|v| (v, sub)) },
    )
}
