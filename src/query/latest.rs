//! The newest position of every device, in memory: the most common fleet
//! query, answered without the database. Updated as batches commit; filled
//! from the database at start. It only moves forward.

use dashmap::{DashMap, mapref::entry::Entry};
use sqlx::PgPool;
use uuid::Uuid;

use super::{LOCATION_COLUMNS, encoded::SharedLocation};
use crate::ingest::validate::{LocationReader, ValidLocation};

/// foldhash, randomly seeded per process: device ids come from clients, but
/// one lookup per device of a batch and 10,000 per fleet query make SipHash
/// a cost worth cutting.
#[derive(Debug, Default)]
pub struct Latest {
    map: DashMap<Uuid, SharedLocation, foldhash::fast::RandomState>,
}

impl Latest {
    /// Keeps `loc` if it is newer than what the map has for its device.
    pub fn offer(&self, loc: ValidLocation) {
        match self.map.entry(loc.device_id) {
            Entry::Occupied(mut e) => {
                if loc.time_us > e.get().location.time_us {
                    e.insert(SharedLocation::new(loc));
                }
            }
            Entry::Vacant(e) => {
                e.insert(SharedLocation::new(loc));
            }
        }
    }

    /// `pick` applied to the device's newest location.
    pub fn get<T>(&self, device: &Uuid, pick: impl FnOnce(&SharedLocation) -> T) -> Option<T> {
        self.map.get(device).map(|e| pick(e.value()))
    }

    /// `found` called with the newest location of each of `devices` that
    /// has one, in their order.
    pub fn of_devices(&self, devices: &[Uuid], mut found: impl FnMut(&SharedLocation)) {
        for d in devices {
            if let Some(e) = self.map.get(d) {
                found(e.value());
            }
        }
    }

    /// `found` called with the newest location of every device of
    /// `app_source`, in no particular order.
    pub fn of_app(&self, app_source: &str, mut found: impl FnMut(&SharedLocation)) {
        self.map
            .iter()
            .filter(|e| e.location.app_source == app_source)
            .for_each(|e| found(e.value()));
    }

    /// Forgets every device whose newest point is older than `cutoff_us`;
    /// returns how many.
    pub fn forget_older_than(&self, cutoff_us: i64) -> usize {
        let mut forgotten = 0;
        self.map.retain(|_, l| {
            let keep = l.location.time_us >= cutoff_us;
            forgotten += usize::from(!keep);
            keep
        });
        forgotten
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Fills the map with each device's newest stored point. A loose index
    /// scan over `(device_id, time DESC)`: one probe per device, not a scan
    /// of every row.
    pub async fn load(&self, pool: &PgPool) -> Result<usize, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "WITH RECURSIVE d AS (
                 (SELECT device_id FROM location_events ORDER BY device_id LIMIT 1)
                 UNION ALL
                 SELECT (SELECT e.device_id FROM location_events e WHERE e.device_id > d.device_id
                         ORDER BY e.device_id LIMIT 1)
                 FROM d WHERE d.device_id IS NOT NULL
             )
             SELECT l.* FROM d CROSS JOIN LATERAL (
                 SELECT {LOCATION_COLUMNS}
                 FROM location_events e WHERE e.device_id = d.device_id ORDER BY time DESC LIMIT 1
             ) l"
        ))
        .fetch_all(pool)
        .await?;
        let n = rows.len();
        let mut reader = LocationReader::default();
        for r in &rows {
            let r = reader.read(r)?;
            self.offer(r);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(device: u128, time_us: i64) -> ValidLocation {
        ValidLocation {
            time_us,
            device_id: Uuid::from_u128(device),
            user_id: Uuid::from_u128(9),
            app_source: if device.is_multiple_of(2) {
                "pshop".into()
            } else {
                "mextrack".into()
            },
            latitude: 1.0,
            longitude: 2.0,
            accuracy: None,
            altitude: None,
            speed: None,
            heading: None,
            metadata: None,
        }
    }

    #[test]
    fn only_moves_forward() {
        let l = Latest::default();
        l.offer(at(1, 100));
        l.offer(at(1, 50)); // late
        let time = |d| l.get(&Uuid::from_u128(d), |s| s.location.time_us);
        assert_eq!(time(1), Some(100));
        let stale = l
            .get(&Uuid::from_u128(1), |s| s.encoded().to_vec())
            .unwrap();
        l.offer(at(1, 150));
        assert_eq!(time(1), Some(150));
        // A newer point is encoded anew, not served from the old encoding.
        let fresh = l
            .get(&Uuid::from_u128(1), |s| s.encoded().to_vec())
            .unwrap();
        assert_ne!(stale, fresh);
        assert_eq!(time(3), None);
        l.offer(at(2, 10));
        let mut of_app = Vec::new();
        l.of_app("pshop", |s| of_app.push(s.location.device_id));
        assert_eq!(of_app, [Uuid::from_u128(2)]);
        // In the order asked, without the devices it does not know.
        let mut of_devices = Vec::new();
        let asked = [2, 3, 1].map(Uuid::from_u128);
        l.of_devices(&asked, |s| of_devices.push(s.location.device_id));
        assert_eq!(of_devices, [Uuid::from_u128(2), Uuid::from_u128(1)]);
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn forgets_devices_silent_past_the_cutoff() {
        let l = Latest::default();
        l.offer(at(1, 100));
        l.offer(at(2, 200));
        l.offer(at(3, 300));
        assert_eq!(l.forget_older_than(200), 1);
        assert_eq!(l.len(), 2);
        assert!(l.get(&Uuid::from_u128(1), |_| ()).is_none());
        assert!(l.get(&Uuid::from_u128(2), |_| ()).is_some());
        assert_eq!(l.forget_older_than(200), 0);
    }
}
