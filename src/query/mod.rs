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
    #[error(
        "this token already holds {0} live subscriptions (--max-subscribers-per-token); \
         close one before opening another"
    )]
    TooManySubscribersForToken(usize),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Auth(#[from] AuthError),
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
    /// Each token's live-subscriber slots (`--max-subscribers-per-token`);
    /// one entry per token that ever subscribed.
    token_slots: dashmap::DashMap<Uuid, Arc<tokio::sync::Semaphore>>,
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
            token_slots: Default::default(),
        }
    }

    /// A live subscription for `caller`, confined to its app_source. Device
    /// ids are matched within an app_source: the one asked, else the
    /// caller's (see [`device_app_source`]).
    pub fn subscribe(
        &self,
        caller: &Principal,
        mut filter: live::Filter,
    ) -> Result<live::Subscription, QueryError> {
        caller.require_read()?;
        let asked = filter.app_source.as_deref().unwrap_or_default();
        if filter.devices.is_some() {
            filter.app_source = Some(device_app_source(caller, asked)?.to_string());
        } else if let Some(own) = caller.read_scope() {
            match &filter.app_source {
                Some(asked) => caller.require_app(asked)?,
                None => filter.app_source = Some(own.to_string()),
            }
        }
        let per_token = self.limits.max_subscribers_per_token;
        let token_slot = match caller.token_id {
            // Authentication off: one anonymous caller is everyone.
            None => None,
            Some(id) => Some(
                Arc::clone(
                    self.token_slots
                        .entry(id)
                        .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(per_token)))
                        .value(),
                )
                .try_acquire_owned()
                .map_err(|_| QueryError::TooManySubscribersForToken(per_token))?,
            ),
        };
        let sub = self
            .live
            .subscribe(filter)
            .ok_or(QueryError::TooManySubscribers(self.limits.max_subscribers))?;
        Ok(match token_slot {
            Some(slot) => sub.holding(slot),
            None => sub,
        })
    }

    /// `stream`, ended with an error once `caller`'s token is revoked: at
    /// its next item, or at the revocation poll that finds it, whichever
    /// comes first (an idle feed has no next item).
    pub fn while_authorized<T, S>(
        &self,
        caller: Arc<Principal>,
        stream: S,
    ) -> impl Stream<Item = Result<T, AuthError>> + Send + 'static + use<T, S>
    where
        T: Send + 'static,
        S: Stream<Item = T> + Send + 'static,
    {
        enum Event<T> {
            Item(T),
            Revocation,
            End,
        }
        let auth = self.auth.clone();
        let revocations = match auth.revocations() {
            Some(rx) => futures::stream::unfold(rx, |mut rx| async move {
                rx.changed().await.ok()?;
                Some((Event::Revocation, rx))
            })
            .boxed(),
            None => futures::stream::pending().boxed(),
        };
        let items = stream
            .map(Event::Item)
            .chain(futures::stream::once(futures::future::ready(Event::End)));
        let events = Box::pin(futures::stream::select(items, revocations));
        // Ends right after the error (the state becomes `None`): an idle
        // feed has no next event to end on.
        futures::stream::unfold(Some((events, auth, caller)), |state| async move {
            let (mut events, auth, caller) = state?;
            loop {
                match events.next().await? {
                    Event::End => return None,
                    event => match (auth.check_revoked(&caller), event) {
                        (Ok(()), Event::Item(item)) => {
                            return Some((Ok(item), Some((events, auth, caller))));
                        }
                        (Ok(()), _) => continue,
                        (Err(e), _) => return Some((Err(e), None)),
                    },
                }
            }
        })
    }
}

/// Why a request that names a device must also name its app_source.
pub const APP_SOURCE_REQUIRED: &str =
    "app_source is required with device_id: a device id is unique only within its app_source";

/// The app_source a request that names devices reads them in: `asked`, if
/// given and the caller may read it; else the caller's own. A caller that
/// reads every app_source (an admin) must name one: a device id is unique
/// only within its app_source, and one phone may run two apps with the same
/// id.
pub fn device_app_source<'a>(caller: &'a Principal, asked: &'a str) -> Result<&'a str, QueryError> {
    if !asked.is_empty() {
        caller.require_app(asked)?;
        return Ok(asked);
    }
    caller
        .read_scope()
        .ok_or_else(|| invalid(APP_SOURCE_REQUIRED))
}

/// A page size: `asked`, or `default` for 0 (none asked); one over `most`
/// is refused.
pub(crate) fn page_limit(asked: u32, default: u32, most: u32) -> Result<u32, QueryError> {
    match asked {
        0 => Ok(default),
        n if n > most => Err(invalid(format!("limit {n} is over the maximum of {most}"))),
        n => Ok(n),
    }
}

impl QueryState {
    /// Offers the latest map each (app_source, device)'s newest of `rows`
    /// (its key, its time and its encoded row): only those are decoded.
    fn offer_newest<'a>(&self, rows: impl IntoIterator<Item = ((&'a str, Uuid), i64, &'a [u8])>) {
        let mut newest: foldhash::HashMap<(&str, Uuid), (i64, &[u8])> = Default::default();
        for (key, t, row) in rows {
            let e = newest.entry(key).or_insert((t, row));
            if t > e.0 {
                *e = (t, row);
            }
        }
        for (_, row) in newest.into_values() {
            if let Some(loc) = copy_encoder::decode_row(row) {
                self.latest.offer(loc);
            }
        }
    }

    /// Rows another instance committed (`ranges` of `rows`, as published):
    /// the newest of each device is offered to the latest map, and all go
    /// to the live feed. Returns how many rows there were.
    pub fn apply_remote(&self, rows: bytes::Bytes, ranges: Vec<std::ops::Range<u32>>) -> usize {
        self.offer_newest(ranges.iter().filter_map(|r| {
            let row = &rows[r.start as usize..r.end as usize];
            copy_encoder::read_row(row).map(|l| ((l.app_source, l.device_id), l.time_us, row))
        }));
        let n = ranges.len();
        if self.live.has_subscribers() {
            self.live.publish(live::LiveBatch::of_rows(rows, ranges));
        }
        n
    }
}

impl CommitSink for QueryState {
    fn committed(&self, subs: &[Submission], inserted: Option<&foldhash::HashSet<PointKey>>) {
        self.offer_newest(subs.iter().flat_map(|s| {
            s.rows()
                .map(|(range, (app, device, t))| ((&**app, *device), *t, &s.rows[range]))
        }));
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::auth::Role;

    fn refused<T>(r: Result<T, QueryError>) -> bool {
        matches!(r, Err(QueryError::Auth(AuthError::PermissionDenied(_))))
    }

    /// Every read asks the shared query logic, not the transport, whether
    /// the caller may read: a device's token is refused by each, first,
    /// though its request is wrong in every other way and nothing could be
    /// looked up (the pool connects to nothing).
    #[tokio::test]
    async fn every_read_refuses_a_role_that_may_not_read() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("a lazy pool connects to nothing");
        let state = QueryState::new(pool, QueryArgs::default(), Auth::disabled());
        let device = Principal {
            token_id: None,
            name: "phone".into(),
            role: Role::Device,
            app_source: Some("pshop".into()),
            devices: HashSet::new(),
        };
        let latest = latest::LatestRequest {
            limit: u32::MAX,
            cursor: "not a cursor",
            ..Default::default()
        };
        assert!(refused(state.latest_page(&device, &latest, |_| ())));
        let track = track::TrackRequest {
            device_id: "not a uuid",
            app_source: "",
            from_us: Err(invalid("unreadable")),
            to_us: Err(invalid("unreadable")),
            limit: Err(invalid("unreadable")),
            cursor: None,
        };
        assert!(refused(track::track(&state, &device, track).await));
        let stats = stats::StatsRequest {
            device_id: Some("not a uuid"),
            user_id: Some("not a uuid"),
            app_source: "",
            from_us: Err(invalid("unreadable")),
            to_us: Err(invalid("unreadable")),
        };
        assert!(refused(stats::hourly_stats(&state, &device, stats).await));
        assert!(refused(state.subscribe(&device, live::Filter::default())));
    }
}
