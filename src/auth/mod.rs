//! Who may write and read what: tokens (or client certificates) name a
//! principal with a role bound to an app_source; every call is checked
//! before anything is buffered or read.
//!
//! - `device` writes points of its listed devices, of its app_source;
//! - `gateway` writes points of any device of its app_source;
//! - `reader` reads its app_source's data (latest, track, stats, live);
//! - `admin` writes and reads everything.
//!
//! A point that the principal does not cover is rejected alone with reason
//! `forbidden`; the batch's other points go through. A call that the role
//! may not make at all (a reader writing, a device querying) is refused
//! with `PERMISSION_DENIED` / 403.
//!
//! Tokens are cached in memory (bounded, with a time to live) so that a
//! call costs no database round trip; revocations are polled every
//! `--auth-refresh-interval`, and a revoked token stops working at once
//! on the calls and open streams of every instance that has seen it.

pub mod token;

use std::{
    collections::HashSet,
    num::NonZeroU32,
    sync::{Arc, LazyLock},
    time::Duration,
};

use clap::ValueEnum;
use dashmap::DashSet;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock};
use sqlx::PgPool;
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{config::AuthArgs, metrics as m};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
pub enum Role {
    Device,
    Gateway,
    Reader,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Gateway => "gateway",
            Role::Reader => "reader",
            Role::Admin => "admin",
        }
    }

    fn from_str_opt(s: &str) -> Option<Self> {
        Some(match s {
            "device" => Role::Device,
            "gateway" => Role::Gateway,
            "reader" => Role::Reader,
            "admin" => Role::Admin,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// `None` only when authentication is off.
    pub token_id: Option<Uuid>,
    pub name: String,
    pub role: Role,
    /// `None` for admin: every app_source.
    pub app_source: Option<String>,
    pub devices: HashSet<Uuid>,
}

/// The caller when authentication is off: may do anything.
static ANONYMOUS: LazyLock<Arc<Principal>> = LazyLock::new(|| {
    Arc::new(Principal {
        token_id: None,
        name: "anonymous (authentication off)".into(),
        role: Role::Admin,
        app_source: None,
        devices: HashSet::new(),
    })
});

impl Principal {
    /// Refuses a call that writes, for a role that may not.
    pub fn require_write(&self) -> Result<(), AuthError> {
        match self.role {
            Role::Device | Role::Gateway | Role::Admin => Ok(()),
            Role::Reader => Err(denied(format!(
                "token {:?} is a reader: it may not write points",
                self.name
            ))),
        }
    }

    /// Refuses a call that reads, for a role that may not.
    pub fn require_read(&self) -> Result<(), AuthError> {
        match self.role {
            Role::Reader | Role::Admin => Ok(()),
            Role::Device | Role::Gateway => Err(denied(format!(
                "token {:?} is a {}: it may not query; use a reader token",
                self.name, self.role
            ))),
        }
    }

    /// Why this principal may not write a point of `device` for `app`, if it may not.
    pub fn forbids(&self, device: &Uuid, app: &str) -> Option<String> {
        let own_app = || self.app_source.as_deref() == Some(app);
        match self.role {
            Role::Admin => None,
            Role::Gateway if own_app() => None,
            Role::Device if own_app() && self.devices.contains(device) => None,
            Role::Device if own_app() => Some(format!(
                "this token may not write for device {device}: it covers only its own devices"
            )),
            Role::Gateway | Role::Device => Some(format!(
                "this token is bound to app_source {:?}, not {app:?}",
                self.app_source.as_deref().unwrap_or_default()
            )),
            Role::Reader => Some("a reader token may not write".into()),
        }
    }

    /// The app_source that this principal's reads are confined to; `None`: all.
    pub fn read_scope(&self) -> Option<&str> {
        match self.role {
            Role::Admin => None,
            _ => Some(self.app_source.as_deref().unwrap_or_default()),
        }
    }

    /// Refuses a read of `app`'s data outside this principal's scope.
    pub fn require_app(&self, app: &str) -> Result<(), AuthError> {
        match self.read_scope() {
            Some(own) if own != app => Err(denied(format!(
                "this token reads app_source {own:?} only, not {app:?}"
            ))),
            _ => Ok(()),
        }
    }
}

/// What a caller presented.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Credential {
    Token(Uuid),
    /// SHA-256 of a client certificate (DER).
    Cert([u8; 32]),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("rate limit of token {token:?} exceeded; retry in {retry_after:?}")]
    RateLimited {
        token: String,
        retry_after: Duration,
    },
    #[error("credentials cannot be checked now: the database is unavailable; retry later")]
    Unavailable,
    #[error("too many unknown credentials are being checked at once; retry later")]
    Busy,
}

fn lookup_failed(e: sqlx::Error) -> AuthError {
    tracing::warn!(error = %e, "token lookup failed");
    AuthError::Unavailable
}

fn denied(msg: String) -> AuthError {
    metrics::counter!(m::AUTH_REFUSED, "reason" => "permission_denied").increment(1);
    AuthError::PermissionDenied(msg)
}

fn unauthenticated(msg: impl Into<String>) -> AuthError {
    metrics::counter!(m::AUTH_REFUSED, "reason" => "unauthenticated").increment(1);
    AuthError::Unauthenticated(msg.into())
}

/// Checks credentials and rate limits. Cheap to clone.
#[derive(Clone)]
pub struct Auth {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    pool: PgPool,
    /// Credential -> the stored token, or `None` for an unknown one.
    cache: moka::future::Cache<Credential, Option<Arc<token::Stored>>>,
    /// Tokens seen revoked since this process started.
    revoked: DashSet<Uuid>,
    /// Counts the polls that found a revocation: long-lived calls (live
    /// feeds) wait on it, so a revoked token's idle feed ends at the next
    /// poll rather than at its next update.
    revocations: tokio::sync::watch::Sender<u64>,
    limiter: Option<DefaultKeyedRateLimiter<Uuid>>,
    refresh: Duration,
    /// Lookups of credentials not in the cache, at most [`LOOKUPS`] at once:
    /// a flood of made-up tokens must not take the pool's connections from
    /// the writers.
    lookups: Arc<Semaphore>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("enabled", &self.inner.is_some())
            .finish()
    }
}

/// Cached tokens, at most; each is looked up again after [`CACHE_TTL`].
const CACHE_ENTRIES: u64 = 100_000;
const CACHE_TTL: Duration = Duration::from_secs(300);
/// Database lookups of credentials at once, and how long one waits for its
/// turn before the call is refused as retryable.
const LOOKUPS: usize = 2;
const LOOKUP_WAIT: Duration = Duration::from_secs(5);

impl Auth {
    /// No checks at all: every caller is an admin. For local development.
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    pub fn new(pool: PgPool, args: &AuthArgs) -> Self {
        let limiter = NonZeroU32::new(args.rate_limit_points).map(|rate| {
            let burst = NonZeroU32::new(args.rate_limit_burst).unwrap_or(rate);
            RateLimiter::dashmap(Quota::per_second(rate).allow_burst(burst))
        });
        Self {
            inner: Some(Arc::new(Inner {
                pool,
                cache: moka::future::Cache::builder()
                    .max_capacity(CACHE_ENTRIES)
                    .time_to_live(CACHE_TTL)
                    .build(),
                revoked: DashSet::new(),
                revocations: tokio::sync::watch::Sender::new(0),
                limiter,
                refresh: args.auth_refresh_interval,
                lookups: Arc::new(Semaphore::new(LOOKUPS)),
            })),
        }
    }

    /// Wakes each time a poll finds a newly revoked token; `None` when
    /// authentication is off (nothing is ever revoked).
    pub fn revocations(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.as_ref().map(|i| i.revocations.subscribe())
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The caller of a request with this `Authorization` header value and
    /// this client certificate (DER). A bearer token is preferred when both
    /// are present.
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
        client_cert: Option<&[u8]>,
    ) -> Result<Arc<Principal>, AuthError> {
        let Some(inner) = &self.inner else {
            return Ok(Arc::clone(&ANONYMOUS));
        };
        let (credential, secret) = match (authorization, client_cert) {
            (Some(header), _) => {
                let text = header
                    .strip_prefix("Bearer ")
                    .or_else(|| header.strip_prefix("bearer "))
                    .ok_or_else(|| {
                        unauthenticated("the authorization header must be \"Bearer <token>\"")
                    })?;
                let t = token::Token::parse(text.trim())
                    .ok_or_else(|| unauthenticated("the token is malformed"))?;
                (Credential::Token(t.id), Some(t.secret_sha256()))
            }
            (None, Some(der)) => (Credential::Cert(token::sha256(der)), None),
            (None, None) => {
                return Err(unauthenticated(
                    "no credentials: send \"authorization: Bearer <token>\" (or a client certificate)",
                ));
            }
        };
        let pool = inner.pool.clone();
        let key = credential.clone();
        let slots = Arc::clone(&inner.lookups);
        let stored = inner
            .cache
            .try_get_with(credential, async move {
                let _slot = tokio::time::timeout(LOOKUP_WAIT, slots.acquire_owned())
                    .await
                    .map_err(|_| AuthError::Busy)?
                    .map_err(|_| AuthError::Unavailable)?;
                let mut conn = pool.acquire().await.map_err(lookup_failed)?;
                token::lookup(&mut conn, &key)
                    .await
                    .map(|s| s.map(Arc::new))
                    .map_err(lookup_failed)
            })
            .await
            .map_err(|e| (*e).clone())?;
        let stored = stored.ok_or_else(|| unauthenticated("unknown or revoked token"))?;
        if let Some(presented) = secret {
            let ok = stored
                .secret_sha256
                .as_deref()
                .is_some_and(|kept| bool::from(kept.ct_eq(&presented)));
            if !ok {
                return Err(unauthenticated("unknown or revoked token"));
            }
        }
        let principal = Arc::new(stored.principal.clone());
        self.check_revoked(&principal)?;
        Ok(principal)
    }

    /// Refuses a principal whose token was revoked since it was authenticated.
    pub fn check_revoked(&self, p: &Principal) -> Result<(), AuthError> {
        match (&self.inner, p.token_id) {
            (Some(inner), Some(id)) if inner.revoked.contains(&id) => {
                Err(unauthenticated("the token was revoked"))
            }
            _ => Ok(()),
        }
    }

    /// Takes `points` from the principal's rate limit, or says when to retry.
    pub fn take(&self, p: &Principal, points: usize) -> Result<(), AuthError> {
        let (Some(inner), Some(id)) = (&self.inner, p.token_id) else {
            return Ok(());
        };
        let Some(limiter) = &inner.limiter else {
            return Ok(());
        };
        let n =
            NonZeroU32::new(u32::try_from(points).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        let refused = |retry_after: Duration| {
            metrics::counter!(m::RATE_LIMITED).increment(1);
            Err(AuthError::RateLimited {
                token: p.name.clone(),
                retry_after,
            })
        };
        match limiter.check_key_n(&id, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                refused(not_until.wait_time_from(governor::clock::DefaultClock::default().now()))
            }
            // More points than the burst: config validation keeps the burst
            // at least --max-batch-points, so this only comes from a
            // burst below one batch; tell the client to split it.
            Err(_) => refused(Duration::from_secs(1)),
        }
    }

    /// Polls for revoked tokens and trims the rate limiter's memory until `stop`.
    pub async fn watch(self, stop: CancellationToken) {
        let Some(inner) = self.inner else { return };
        // Database time; the slack covers transactions that commit a
        // revocation stamped before our last poll.
        let slack = chrono::Duration::seconds(60);
        let mut since = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
        let mut tick = tokio::time::interval(inner.refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let polled = async {
                let mut conn = inner.pool.acquire().await?;
                token::revoked_since(&mut conn, since).await
            }
            .await;
            match polled {
                Ok((ids, now)) => {
                    let mut fresh = false;
                    for id in ids {
                        fresh |= inner.revoked.insert(id);
                    }
                    if fresh {
                        inner.cache.invalidate_all();
                        inner.revocations.send_modify(|n| *n += 1);
                    }
                    since = now - slack;
                }
                Err(e) => tracing::warn!(error = %e, "polling revoked tokens failed"),
            }
            inner.trim();
        }
    }

    /// Tokens that hold rate-limit state now.
    pub fn rate_limited_tokens(&self) -> usize {
        self.inner
            .as_ref()
            .and_then(|i| i.limiter.as_ref())
            .map_or(0, |l| l.len())
    }
}

impl Inner {
    /// Forgets the rate-limit state of tokens whose bucket is full again:
    /// it is the same as none. So memory follows the tokens active within
    /// one burst's refill time, not every token ever seen.
    fn trim(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

impl Auth {
    /// The caller of a gRPC request: its `authorization` metadata, or the
    /// client certificate of its TLS connection.
    pub async fn authenticate_grpc<T>(
        &self,
        req: &tonic::Request<T>,
    ) -> Result<Arc<Principal>, AuthError> {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let certs = req.peer_certs();
        let cert = certs.as_ref().and_then(|c| c.first()).map(|c| c.as_ref());
        self.authenticate(header, cert).await
    }
}

/// The authenticated caller of an HTTP request, as an axum extractor: from
/// `Authorization: Bearer`, or the connection's client certificate. Put it
/// before the body extractor, so that no body is read for a stranger.
pub struct Caller(pub Arc<Principal>);

impl<S> axum::extract::FromRequestParts<S> for Caller
where
    Auth: axum::extract::FromRef<S>,
    S: Send + Sync,
{
    type Rejection = axum::response::Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        use axum::extract::FromRef;
        let auth = Auth::from_ref(state);
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let cert = parts.extensions.get::<crate::tls::ClientCert>().cloned();
        auth.authenticate(header, cert.as_ref().map(|c| c.0.as_slice()))
            .await
            .map(Caller)
            .map_err(crate::status::auth_response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(id: Uuid) -> Principal {
        Principal {
            token_id: Some(id),
            name: "t".into(),
            role: Role::Gateway,
            app_source: Some("a".into()),
            devices: HashSet::new(),
        }
    }

    /// Token lookups never happen here: `take` needs only the limiter, so
    /// the pool is a lazy one that connects to nothing.
    fn limiter_only(args: &AuthArgs) -> Auth {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("a lazy pool connects to nothing");
        Auth::new(pool, args)
    }

    #[tokio::test]
    async fn rate_limit_state_is_forgotten_once_buckets_refill() {
        let args = AuthArgs {
            rate_limit_points: 100_000,
            rate_limit_burst: 100,
            ..AuthArgs::default()
        };
        let auth = limiter_only(&args);
        for _ in 0..200_000 {
            auth.take(&principal(Uuid::new_v4()), 1)
                .expect("a fresh token has room");
        }
        assert_eq!(auth.rate_limited_tokens(), 200_000);
        // 100 points refill in 1 ms at this rate.
        tokio::time::sleep(Duration::from_millis(20)).await;
        auth.inner.as_ref().expect("enabled").trim();
        assert_eq!(auth.rate_limited_tokens(), 0);
        // A token whose bucket is not full again keeps its state: here it
        // refills one point a second.
        let slow = limiter_only(&AuthArgs {
            rate_limit_points: 1,
            ..args
        });
        let busy = principal(Uuid::new_v4());
        slow.take(&busy, 100).expect("the whole burst");
        assert!(matches!(
            slow.take(&busy, 1),
            Err(AuthError::RateLimited { .. })
        ));
        slow.inner.as_ref().expect("enabled").trim();
        assert_eq!(slow.rate_limited_tokens(), 1);
    }
}
