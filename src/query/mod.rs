//! Reads for dashboards and fleet maps: the latest position (from memory),
//! tracks and hourly stats (from the database), and the live feed. The same
//! functions serve gRPC ([`grpc`]) and HTTP JSON ([`http`]).

pub mod encoded;
pub mod grpc;
pub mod http;
pub mod latest;
pub mod live;
pub mod stats;
pub mod track;

use std::sync::Arc;

use futures::{Stream, StreamExt};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    auth::{Auth, AuthError, Principal},
    config::QueryArgs,
    pipeline::{PointKey, Submission, copy_encoder, writer::CommitSink},
};

/// Why a query was not answered.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("too many live subscribers (limit {0}); retry later")]
    TooManySubscribers(usize),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Auth(#[from] AuthError),
}

impl QueryError {
    /// A stable code for HTTP error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            QueryError::InvalidArgument(_) => "invalid_argument",
            QueryError::NotFound(_) => "not_found",
            QueryError::TooManySubscribers(_) => "too_many_subscribers",
            QueryError::Database(_) => "internal",
            QueryError::Auth(AuthError::Unauthenticated(_)) => "unauthenticated",
            QueryError::Auth(AuthError::PermissionDenied(_)) => "permission_denied",
            QueryError::Auth(AuthError::RateLimited { .. }) => "rate_limited",
            QueryError::Auth(AuthError::Unavailable | AuthError::Busy) => "auth_unavailable",
        }
    }
}

pub(crate) fn invalid(msg: impl Into<String>) -> QueryError {
    QueryError::InvalidArgument(msg.into())
}

/// A timestamp for binding, from microseconds since the Unix epoch.
pub(crate) fn ts(us: i64) -> Result<chrono::DateTime<chrono::Utc>, QueryError> {
    chrono::DateTime::from_timestamp_micros(us).ok_or_else(|| invalid("time out of range"))
}

pub(crate) fn parse_uuid(s: &str, field: &str) -> Result<Uuid, QueryError> {
    Uuid::try_parse(s).map_err(|_| invalid(format!("{field} {s:?} is not a UUID")))
}

/// Device ids as a request carries them (text), each parsed, into `C`;
/// the first that is not a UUID is the error.
pub fn parse_device_ids<C: FromIterator<Uuid>>(
    ids: impl IntoIterator<Item = impl AsRef<str>>,
) -> Result<C, QueryError> {
    ids.into_iter()
        .map(|d| parse_uuid(d.as_ref(), "device_id"))
        .collect()
}

/// What queries share: the pool, the latest map, the live feed, the bounds,
/// and who may ask.
#[derive(Debug)]
pub struct QueryState {
    pub pool: PgPool,
    pub latest: latest::Latest,
    pub live: Arc<live::Live>,
    pub limits: QueryArgs,
    pub auth: Auth,
}

impl QueryState {
    pub fn new(pool: PgPool, limits: QueryArgs, auth: Auth) -> Self {
        Self {
            pool,
            latest: latest::Latest::default(),
            live: live::Live::new(
                limits.live_queue_points,
                limits.max_subscribers,
                limits.live_interval,
            ),
            limits,
            auth,
        }
    }

    /// `found` called with the newest position of each of `device_ids`, or of
    /// every device of `app_source` (exactly one of them is given), that `caller`
    /// may read. A device of another app_source is as absent as an unknown one.
    pub fn latest_of(
        &self,
        caller: &Principal,
        device_ids: &[&str],
        app_source: &str,
        mut found: impl FnMut(&encoded::SharedLocation),
    ) -> Result<(), QueryError> {
        caller.require_read()?;
        match (device_ids.is_empty(), app_source.is_empty()) {
            (false, true) if device_ids.len() <= MAX_LATEST_IDS => {
                let scope = caller.read_scope();
                // Every id parsed first, then looked up in a loop of lookups
                // alone: each lookup is a cache miss in a map of thousands,
                // and a parse between two of them keeps the processor from
                // overlapping them (10,000 ids: 4.3-4.6 ms interleaved,
                // 2.0-2.1 parsed first; `locus-bench --suite latest`).
                let devices: Vec<Uuid> = parse_device_ids(device_ids)?;
                self.latest.of_devices(&devices, |l| {
                    if scope.is_none_or(|a| a == l.location.app_source) {
                        found(l);
                    }
                });
                Ok(())
            }
            (false, true) => Err(invalid(format!("at most {MAX_LATEST_IDS} device_ids"))),
            (true, false) => {
                caller.require_app(app_source)?;
                self.latest.of_app(app_source, found);
                Ok(())
            }
            _ => Err(invalid("give either device_ids or app_source")),
        }
    }

    /// A live subscription for `caller`, confined to its app_source.
    pub fn subscribe(
        &self,
        caller: &Principal,
        mut filter: live::Filter,
    ) -> Result<live::Subscription, QueryError> {
        caller.require_read()?;
        if let Some(own) = caller.read_scope() {
            match &filter.app_source {
                Some(asked) => caller.require_app(asked)?,
                None => filter.app_source = Some(own.to_string()),
            }
        }
        self.live
            .subscribe(filter)
            .ok_or(QueryError::TooManySubscribers(self.limits.max_subscribers))
    }

    /// `stream`, ended with an error at its first item after `caller`'s
    /// token is revoked.
    pub fn while_authorized<T, S>(
        &self,
        caller: Arc<Principal>,
        stream: S,
    ) -> impl Stream<Item = Result<T, AuthError>> + Send + 'static + use<T, S>
    where
        T: Send + 'static,
        S: Stream<Item = T> + Send + 'static,
    {
        let auth = self.auth.clone();
        stream.scan(false, move |ended, item| {
            let next = match (*ended, auth.check_revoked(&caller)) {
                (true, _) => None,
                (false, Ok(())) => Some(Ok(item)),
                (false, Err(e)) => {
                    *ended = true;
                    Some(Err(e))
                }
            };
            futures::future::ready(next)
        })
    }
}

/// At most this many device ids in one latest-position query.
pub const MAX_LATEST_IDS: usize = 10_000;

impl CommitSink for QueryState {
    fn committed(&self, subs: &[Submission], inserted: Option<&foldhash::HashSet<PointKey>>) {
        // The latest map: only each device's newest row of the batch is decoded.
        let mut newest: foldhash::HashMap<Uuid, (i64, &[u8])> = Default::default();
        for s in subs {
            for (range, (device, t)) in s.rows() {
                let e = newest
                    .entry(*device)
                    .or_insert((*t, &s.rows[range.clone()]));
                if *t > e.0 {
                    *e = (*t, &s.rows[range]);
                }
            }
        }
        for (_, row) in newest.into_values() {
            if let Some(loc) = copy_encoder::decode_row(row) {
                self.latest.offer(loc);
            }
        }
        if self.live.has_subscribers() {
            let mut batch = live::LiveBatch::default();
            for s in subs {
                let rows_of_s = batch.add_rows(s.rows.clone());
                for (range, k) in s.rows() {
                    if inserted.is_none_or(|i| i.contains(k)) {
                        batch.push(rows_of_s, range.start as u32..range.end as u32);
                    }
                }
            }
            self.live.publish(batch);
        }
    }
}

/// The columns of a [`ValidLocation`](crate::ingest::validate::ValidLocation), for SELECTs on
/// `location_events`, in the order [`LocationReader`](crate::ingest::validate::LocationReader)
/// reads them.
pub const LOCATION_COLUMNS: &str = "time, device_id, user_id, \
     app_source, latitude, longitude, accuracy, altitude, speed, heading, metadata::text AS metadata";
