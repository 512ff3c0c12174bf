//! Who a caller is: the credential it presented (a bearer token, or a
//! client certificate), looked up in `locus_tokens` through a bounded
//! cache, with a bounded number of lookups at once.

use std::{sync::Arc, time::Duration};

use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::{
    Auth, AuthError,
    principal::{ANONYMOUS, Principal},
    token, unauthenticated,
};

/// What a caller presented.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Credential {
    Token(Uuid),
    /// SHA-256 of a client certificate (DER).
    Cert([u8; 32]),
}

/// Cached tokens, at most; each is looked up again after [`CACHE_TTL`].
const CACHE_ENTRIES: u64 = 100_000;
const CACHE_TTL: Duration = Duration::from_secs(300);
/// Database lookups of credentials at once, and how long one waits for its
/// turn before the call is refused as retryable.
pub(super) const LOOKUPS: usize = 2;
const LOOKUP_WAIT: Duration = Duration::from_secs(5);

/// The token cache, by credential.
pub(super) type Cache = moka::future::Cache<Credential, Option<Arc<token::Stored>>>;

/// An empty cache, bounded in entries and in time.
pub(super) fn cache() -> Cache {
    moka::future::Cache::builder()
        .max_capacity(CACHE_ENTRIES)
        .time_to_live(CACHE_TTL)
        .build()
}

fn lookup_failed(e: sqlx::Error) -> AuthError {
    tracing::warn!(error = %e, "token lookup failed");
    AuthError::Unavailable
}

impl Auth {
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
}
