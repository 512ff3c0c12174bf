//! The newest position of every device, in memory: the most common fleet
//! query, answered without the database. Updated as batches commit; filled
//! from the database at start. It only moves forward.

use dashmap::DashMap;
use sqlx::PgPool;
use uuid::Uuid;

use crate::ingest::validate::ValidLocation;

#[derive(Debug, Default)]
pub struct Latest {
    map: DashMap<Uuid, ValidLocation>,
}

impl Latest {
    /// Keeps `loc` if it is newer than what the map has for its device.
    pub fn offer(&self, loc: ValidLocation) {
        self.map
            .entry(loc.device_id)
            .and_modify(|cur| {
                if loc.time_us > cur.time_us {
                    *cur = loc.clone();
                }
            })
            .or_insert(loc);
    }

    pub fn get(&self, device: &Uuid) -> Option<ValidLocation> {
        self.map.get(device).map(|e| e.value().clone())
    }

    /// Every device of `app_source`, in no particular order.
    pub fn of_app(&self, app_source: &str) -> Vec<ValidLocation> {
        self.map
            .iter()
            .filter(|e| e.app_source == app_source)
            .map(|e| e.value().clone())
            .collect()
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
        let rows: Vec<ValidLocation> = sqlx::query_as(
            "WITH RECURSIVE d AS (
                 (SELECT device_id FROM location_events ORDER BY device_id LIMIT 1)
                 UNION ALL
                 SELECT (SELECT e.device_id FROM location_events e WHERE e.device_id > d.device_id
                         ORDER BY e.device_id LIMIT 1)
                 FROM d WHERE d.device_id IS NOT NULL
             )
             SELECT l.* FROM d CROSS JOIN LATERAL (
                 SELECT (extract(epoch FROM time) * 1000000)::int8 AS time_us, device_id, user_id, app_source,
                        latitude, longitude, accuracy, altitude, speed, heading, metadata::text AS metadata
                 FROM location_events e WHERE e.device_id = d.device_id ORDER BY time DESC LIMIT 1
             ) l",
        )
        .fetch_all(pool)
        .await?;
        let n = rows.len();
        for r in rows {
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
        assert_eq!(l.get(&Uuid::from_u128(1)).unwrap().time_us, 100);
        l.offer(at(1, 150));
        assert_eq!(l.get(&Uuid::from_u128(1)).unwrap().time_us, 150);
        l.offer(at(2, 10));
        assert_eq!(l.of_app("pshop").len(), 1);
        assert_eq!(l.len(), 2);
    }
}
