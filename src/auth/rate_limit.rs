//! Each token's rate limit, in points a second with a burst: taken as a
//! call is admitted, and forgotten once a token's bucket is full again.

use std::{num::NonZeroU32, time::Duration};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock};
use uuid::Uuid;

use super::{Auth, AuthError, AuthState, principal::Principal};
use crate::{config::AuthArgs, metrics::RATE_LIMITED};

/// The limiter of `--rate-limit-points` and `--rate-limit-burst`; `None`
/// when there is no limit.
pub(super) fn limiter(args: &AuthArgs) -> Option<DefaultKeyedRateLimiter<Uuid>> {
    NonZeroU32::new(args.rate_limit_points).map(|rate| {
        let burst = NonZeroU32::new(args.rate_limit_burst).unwrap_or(rate);
        RateLimiter::dashmap(Quota::per_second(rate).allow_burst(burst))
    })
}

impl Auth {
    /// Takes `points` from the caller's rate limit, or says when to retry.
    pub fn take(&self, caller: &Principal, points: usize) -> Result<(), AuthError> {
        let (Some(inner), Some(id)) = (&self.inner, caller.token_id) else {
            return Ok(());
        };
        let Some(limiter) = &inner.limiter else {
            return Ok(());
        };
        let n =
            NonZeroU32::new(u32::try_from(points).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        let refused = |retry_after: Duration| {
            metrics::counter!(RATE_LIMITED).increment(1);
            Err(AuthError::RateLimited {
                token: caller.name.clone(),
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

    /// AuthState that hold rate-limit state now.
    pub fn rate_limited_tokens(&self) -> usize {
        self.inner
            .as_ref()
            .and_then(|i| i.limiter.as_ref())
            .map_or(0, |l| l.len())
    }
}

impl AuthState {
    /// Forgets the rate-limit state of tokens whose bucket is full again:
    /// it is the same as none. So memory follows the tokens active within
    /// one burst's refill time, not every token ever seen.
    pub(super) fn trim(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::auth::Role;

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
