//! Reads for dashboards and fleet maps: the latest position (from memory),
//! tracks and hourly stats (from the database), and the live feed. The same
//! functions serve gRPC ([`grpc`]) and HTTP JSON ([`http`]).

pub mod grpc;
pub mod http;
pub mod latest;
pub mod live;
pub mod stats;
pub mod track;

use std::collections::HashMap;

use sqlx::PgPool;
use uuid::Uuid;

use crate::{
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
}

impl QueryError {
    /// A stable code for HTTP error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            QueryError::InvalidArgument(_) => "invalid_argument",
            QueryError::NotFound(_) => "not_found",
            QueryError::TooManySubscribers(_) => "too_many_subscribers",
            QueryError::Database(_) => "internal",
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

/// What queries share: the pool, the latest map, the live feed, the bounds.
#[derive(Debug)]
pub struct QueryState {
    pub pool: PgPool,
    pub latest: latest::Latest,
    pub live: live::Live,
    pub limits: QueryArgs,
}

impl QueryState {
    pub fn new(pool: PgPool, limits: QueryArgs) -> Self {
        Self {
            pool,
            latest: latest::Latest::default(),
            live: live::Live::new(limits.live_buffer, limits.max_subscribers),
            limits,
        }
    }
}

impl CommitSink for QueryState {
    fn committed(
        &self,
        subs: &[Submission],
        inserted: Option<&std::collections::HashSet<PointKey>>,
    ) {
        let rows = || {
            subs.iter().flat_map(|s| {
                let starts = std::iter::once(0).chain(s.row_ends.iter().map(|e| *e as usize));
                starts
                    .zip(s.row_ends.iter())
                    .zip(&s.keys)
                    .map(move |((a, b), k)| (&s.rows[a..*b as usize], k))
            })
        };
        // The latest map: only each device's newest row of the batch is decoded.
        let mut newest: HashMap<Uuid, (i64, &[u8])> = HashMap::new();
        for (row, (device, t)) in rows() {
            let e = newest.entry(*device).or_insert((*t, row));
            if *t > e.0 {
                *e = (*t, row);
            }
        }
        for (_, row) in newest.into_values() {
            if let Some(loc) = copy_encoder::decode_row(row) {
                self.latest.offer(loc);
            }
        }
        if self.live.has_subscribers() {
            let new = rows()
                .filter(|(_, k)| inserted.is_none_or(|i| i.contains(k)))
                .filter_map(|(row, _)| copy_encoder::decode_row(row))
                .collect();
            self.live.publish(new);
        }
    }
}

/// The columns of a [`ValidLocation`], for SELECTs on `location_events`.
pub const LOCATION_COLUMNS: &str = "(extract(epoch FROM time) * 1000000)::int8 AS time_us, device_id, user_id, \
     app_source, latitude, longitude, accuracy, altitude, speed, heading, metadata::text AS metadata";
