//! Registered trackers, in `locus_trackers`: which device and which user
//! an app's identifier stands for. The one mapping from a tracker's
//! identifier to a device, whatever the transport.
//!
//! A registration never changes (the device follows from the identifier,
//! and registering it again for another user is refused), so a tracker
//! found is cached for good; an identifier not found is looked up again
//! each time, a few lookups at once.

use std::{sync::Arc, time::Duration};

use sqlx::{PgConnection, PgPool};
use tokio::sync::Semaphore;
use uuid::Uuid;

/// A registered tracker.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Tracker {
    pub app_source: String,
    pub tracker_id: String,
    pub device_id: Uuid,
    pub user_id: Uuid,
}

/// Why a point's tracker is not known. Answered in [`crate::status::http`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum TrackerError {
    #[error(
        "tracker {0:?} is not registered; register it with `locus token create --role device \
         --app-source ... --tracker-id ... --user ...`"
    )]
    Unknown(String),
    #[error(
        "tracker {0:?} is registered under several app_sources; send with a token bound to one"
    )]
    Ambiguous(String),
    #[error(
        "no tracker identifier: name one (the app's device identifier), or send with a device \
         token registered for one tracker"
    )]
    Missing,
    #[error("trackers cannot be looked up now: the database is unavailable; retry later")]
    Unavailable,
}

/// Trackers cached, at most.
const CACHE_ENTRIES: u64 = 100_000;
/// Lookups of trackers not in the cache at once, and how long one waits
/// for its turn.
const LOOKUPS: usize = 2;
const LOOKUP_WAIT: Duration = Duration::from_secs(5);

/// Finds registered trackers. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    pool: PgPool,
    /// By (app_source or `None` for any, tracker id).
    by_id: moka::future::Cache<(Option<String>, String), Tracker>,
    by_device: moka::future::Cache<Uuid, Tracker>,
    lookups: Arc<Semaphore>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registry")
    }
}

fn lookup_failed(e: sqlx::Error) -> TrackerError {
    tracing::warn!(error = %e, "tracker lookup failed");
    TrackerError::Unavailable
}

impl Registry {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            by_id: moka::future::Cache::new(CACHE_ENTRIES),
            by_device: moka::future::Cache::new(CACHE_ENTRIES),
            lookups: Arc::new(Semaphore::new(LOOKUPS)),
        }
    }

    /// The tracker `tracker_id` of `app_source`; with no app_source (an
    /// admin token, or authentication off), of whichever app_source has
    /// one of that identifier, if only one has.
    pub async fn resolve(
        &self,
        app_source: Option<&str>,
        tracker_id: &str,
    ) -> Result<Tracker, TrackerError> {
        let key = (app_source.map(str::to_string), tracker_id.to_string());
        if let Some(t) = self.by_id.get(&key).await {
            return Ok(t);
        }
        let _slot = self.slot().await?;
        let found: Vec<Tracker> = sqlx::query_as(
            "SELECT app_source, tracker_id, device_id, user_id FROM locus_trackers
             WHERE tracker_id = $1 AND ($2::text IS NULL OR app_source = $2) LIMIT 2",
        )
        .bind(tracker_id)
        .bind(app_source)
        .fetch_all(&self.pool)
        .await
        .map_err(lookup_failed)?;
        match <[Tracker; 1]>::try_from(found) {
            Ok([t]) => {
                self.by_id.insert(key, t.clone()).await;
                Ok(t)
            }
            Err(v) if v.is_empty() => Err(TrackerError::Unknown(tracker_id.to_string())),
            Err(_) => Err(TrackerError::Ambiguous(tracker_id.to_string())),
        }
    }

    /// The tracker whose device is `device_id`, if one is.
    pub async fn by_device(&self, device_id: Uuid) -> Result<Option<Tracker>, TrackerError> {
        if let Some(t) = self.by_device.get(&device_id).await {
            return Ok(Some(t));
        }
        let _slot = self.slot().await?;
        let t: Option<Tracker> = sqlx::query_as(
            "SELECT app_source, tracker_id, device_id, user_id FROM locus_trackers
             WHERE device_id = $1",
        )
        .bind(device_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(lookup_failed)?;
        if let Some(t) = &t {
            self.by_device.insert(device_id, t.clone()).await;
        }
        Ok(t)
    }

    /// A turn to look up in the database: a flood of unknown identifiers
    /// must not take the pool's connections from the writers.
    async fn slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, TrackerError> {
        tokio::time::timeout(LOOKUP_WAIT, self.lookups.acquire())
            .await
            .map_err(|_| TrackerError::Unavailable)?
            .map_err(|_| TrackerError::Unavailable)
    }
}

/// Why a tracker could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "tracker {tracker_id:?} of {app_source:?} is already registered to user {user_id}; \
         a tracker belongs to one user"
    )]
    OtherUser {
        app_source: String,
        tracker_id: String,
        user_id: Uuid,
    },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Registers a tracker, or finds it registered already to the same user.
pub async fn register(
    conn: &mut PgConnection,
    app_source: &str,
    tracker_id: &str,
    user_id: Uuid,
) -> Result<Tracker, RegisterError> {
    if tracker_id.is_empty() {
        return Err(RegisterError::Invalid("--tracker-id is empty".into()));
    }
    let want = Tracker {
        app_source: app_source.to_string(),
        tracker_id: tracker_id.to_string(),
        device_id: super::device_id(app_source, tracker_id),
        user_id,
    };
    sqlx::query(
        "INSERT INTO locus_trackers (app_source, tracker_id, device_id, user_id)
         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(&want.app_source)
    .bind(&want.tracker_id)
    .bind(want.device_id)
    .bind(want.user_id)
    .execute(&mut *conn)
    .await?;
    let kept: Tracker = sqlx::query_as(
        "SELECT app_source, tracker_id, device_id, user_id FROM locus_trackers
         WHERE app_source = $1 AND tracker_id = $2",
    )
    .bind(app_source)
    .bind(tracker_id)
    .fetch_one(&mut *conn)
    .await?;
    if kept.user_id != user_id {
        return Err(RegisterError::OtherUser {
            app_source: kept.app_source,
            tracker_id: kept.tracker_id,
            user_id: kept.user_id,
        });
    }
    Ok(kept)
}

/// Every registered tracker, for `locus token list`-like listings.
pub async fn list(conn: &mut PgConnection) -> Result<Vec<Tracker>, sqlx::Error> {
    sqlx::query_as(
        "SELECT app_source, tracker_id, device_id, user_id FROM locus_trackers
         ORDER BY app_source, tracker_id",
    )
    .fetch_all(&mut *conn)
    .await
}
