//! Revoked tokens: polled from the database every
//! `--auth-refresh-interval`, refused from then on, on open streams too.

use tokio_util::sync::CancellationToken;

use super::{Auth, AuthError, principal::Principal, token, unauthenticated};

impl Auth {
    /// Wakes each time a poll finds a newly revoked token; `None` when
    /// authentication is off (nothing is ever revoked).
    pub fn revocations(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.as_ref().map(|i| i.revocations.subscribe())
    }

    /// Refuses a caller whose token was revoked since it was authenticated.
    pub fn check_revoked(&self, caller: &Principal) -> Result<(), AuthError> {
        match (&self.inner, caller.token_id) {
            (Some(inner), Some(id)) if inner.revoked.contains(&id) => {
                Err(unauthenticated("the token was revoked"))
            }
            _ => Ok(()),
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
}
