//! The live feed: every newly committed point, to every subscriber, through
//! a bounded broadcast channel. A subscriber that falls behind skips the
//! oldest batches (counted); the writers never wait for it.

use std::sync::Arc;

use tokio::sync::{Semaphore, broadcast};
use uuid::Uuid;

use super::encoded::SharedLocation;
use crate::{ingest::validate::ValidLocation, metrics as m};

/// A committed point, shared by every subscriber that carries it (encoded
/// for gRPC at most once).
pub type LivePoint = Arc<SharedLocation>;

/// Points committed together.
pub type Committed = Arc<Vec<LivePoint>>;

#[derive(Debug)]
pub struct Live {
    tx: broadcast::Sender<Committed>,
    slots: Arc<Semaphore>,
}

/// What a subscriber wants. Every filter that is set must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub app_source: Option<String>,
    pub devices: Option<std::collections::HashSet<Uuid>>,
    /// (min_lat, max_lat, min_lon, max_lon)
    pub bbox: Option<(f64, f64, f64, f64)>,
}

impl Filter {
    pub fn matches(&self, l: &ValidLocation) -> bool {
        self.app_source.as_ref().is_none_or(|a| *a == l.app_source)
            && self
                .devices
                .as_ref()
                .is_none_or(|d| d.contains(&l.device_id))
            && self.bbox.is_none_or(|(a, b, c, d)| {
                (a..=b).contains(&l.latitude) && (c..=d).contains(&l.longitude)
            })
    }
}

/// A subscription: holds one of the `--max-subscribers` slots.
#[derive(Debug)]
pub struct Subscription {
    rx: broadcast::Receiver<Committed>,
    filter: Filter,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Subscription {
    /// The next matching points, waiting for them; `None` when the feed ends.
    pub async fn next(&mut self) -> Option<Vec<LivePoint>> {
        loop {
            match self.rx.recv().await {
                Ok(batch) => {
                    let hits: Vec<LivePoint> = batch
                        .iter()
                        .filter(|l| self.filter.matches(&l.location))
                        .cloned()
                        .collect();
                    if !hits.is_empty() {
                        return Some(hits);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    metrics::counter!(m::LIVE_DROPPED).increment(n);
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        metrics::gauge!(m::LIVE_SUBSCRIBERS).decrement(1.0);
    }
}

impl Live {
    pub fn new(buffer: usize, max_subscribers: usize) -> Self {
        let (tx, _) = broadcast::channel(buffer.max(1));
        Self {
            tx,
            slots: Arc::new(Semaphore::new(max_subscribers)),
        }
    }

    pub fn subscribe(&self, filter: Filter) -> Option<Subscription> {
        let slot = Arc::clone(&self.slots).try_acquire_owned().ok()?;
        metrics::gauge!(m::LIVE_SUBSCRIBERS).increment(1.0);
        Some(Subscription {
            rx: self.tx.subscribe(),
            filter,
            _slot: slot,
        })
    }

    /// Whether anyone listens: committed rows are decoded only then.
    pub fn has_subscribers(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    pub fn publish(&self, points: Vec<LivePoint>) {
        if !points.is_empty() {
            let _ = self.tx.send(Arc::new(points));
        }
    }
}
