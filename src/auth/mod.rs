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
//! AuthState are cached in memory (bounded, with a time to live) so that a
//! call costs no database round trip; revocations are polled every
//! `--auth-refresh-interval`, and a revoked token stops working at once
//! on the calls and open streams of every instance that has seen it.
//!
//! Its parts: the roles and their rules (`principal`), who a caller is
//! (`authenticate`, with the token cache), the rate limit (`rate_limit`),
//! the revocations (`revocation`), each transport's caller (`caller`), and
//! the tokens themselves (`token`).

mod authenticate;
mod caller;
mod principal;
mod rate_limit;
mod revocation;
pub mod token;

use std::{sync::Arc, time::Duration};

use dashmap::DashSet;
use governor::DefaultKeyedRateLimiter;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use uuid::Uuid;

pub use self::{
    authenticate::Credential,
    caller::Caller,
    principal::{Principal, Role},
};
use crate::{config::AuthArgs, metrics::AUTH_REFUSED};

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

fn denied(msg: String) -> AuthError {
    metrics::counter!(AUTH_REFUSED, "reason" => "permission_denied").increment(1);
    AuthError::PermissionDenied(msg)
}

fn unauthenticated(msg: impl Into<String>) -> AuthError {
    metrics::counter!(AUTH_REFUSED, "reason" => "unauthenticated").increment(1);
    AuthError::Unauthenticated(msg.into())
}

/// Checks credentials and rate limits. Cheap to clone.
#[derive(Clone)]
pub struct Auth {
    inner: Option<Arc<AuthState>>,
}

struct AuthState {
    pool: PgPool,
    /// Credential -> the stored token, or `None` for an unknown one.
    cache: authenticate::Cache,
    /// AuthState seen revoked since this process started.
    revoked: DashSet<Uuid>,
    /// Counts the polls that found a revocation: long-lived calls (live
    /// feeds) wait on it, so a revoked token's idle feed ends at the next
    /// poll rather than at its next update.
    revocations: tokio::sync::watch::Sender<u64>,
    limiter: Option<DefaultKeyedRateLimiter<Uuid>>,
    refresh: Duration,
    /// Lookups of credentials not in the cache, at most
    /// [`LOOKUPS`](authenticate::LOOKUPS) at once: a flood of made-up
    /// tokens must not take the pool's connections from the writers.
    lookups: Arc<Semaphore>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("enabled", &self.inner.is_some())
            .finish()
    }
}

impl Auth {
    /// No checks at all: every caller is an admin. For local development.
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    pub fn new(pool: PgPool, args: &AuthArgs) -> Self {
        Self {
            inner: Some(Arc::new(AuthState {
                pool,
                cache: authenticate::cache(),
                revoked: DashSet::new(),
                revocations: tokio::sync::watch::Sender::new(0),
                limiter: rate_limit::limiter(args),
                refresh: args.auth_refresh_interval,
                lookups: Arc::new(Semaphore::new(authenticate::LOOKUPS)),
            })),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }
}
