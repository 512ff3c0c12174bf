//! The newest position of every device, in memory: the most common fleet
//! query, answered without the database. Updated as batches commit; filled
//! from the database at start. It only moves forward. Keyed by
//! (app_source, device_id), as every stored point is. GetLatest reads it a
//! page at a time (`page`).

mod page;

use std::{
    collections::{BTreeSet, HashMap},
    ops::Bound,
    sync::{PoisonError, RwLock},
};

use dashmap::{DashMap, mapref::entry::Entry};
use smallvec::{SmallVec, smallvec};
use sqlx::PgPool;
use uuid::Uuid;

use super::encoded::SharedLocation;
use crate::location::{LocationReader, SELECT_COLUMNS, ValidLocation};

pub use self::page::LatestRequest;

/// Each device's newest location, one per app_source it was seen in: a
/// device id is unique only within its app_source (one phone may run two
/// apps with the same id), so no app's points can hide another's.
///
/// foldhash, randomly seeded per process: device ids come from clients, but
/// one lookup per device of a batch and 10,000 per fleet query make SipHash
/// a cost worth cutting.
#[derive(Debug, Default)]
pub struct Latest {
    /// By device id, then app_source: nearly always one app a device, kept
    /// inline, so that a lookup is one probe as when the id was the key.
    map: DashMap<Uuid, Apps, foldhash::fast::RandomState>,
    /// Each app_source's devices in id order, for an app's fleet a page at a
    /// time. Written only when a device is new to an app or is forgotten,
    /// and then while its entry of `map` is held, so that the two agree
    /// once it is released. Lock order: a `map` shard, then this; readers
    /// copy ids out of it before they look any up.
    by_app: RwLock<HashMap<String, BTreeSet<Uuid>>>,
}

/// A device's newest location in each of its app_sources.
type Apps = SmallVec<[SharedLocation; 1]>;

fn of_app<'a>(apps: &'a Apps, app_source: &str) -> Option<&'a SharedLocation> {
    apps.iter().find(|l| l.location.app_source == app_source)
}

/// Ids copied out of `by_app` at a time while a page is read.
const IDS_AT_A_TIME: usize = 1_024;

impl Latest {
    /// Keeps `loc` if it is newer than what the map has for its device in
    /// its app_source.
    pub fn offer(&self, loc: ValidLocation) {
        match self.map.entry(loc.device_id) {
            Entry::Occupied(mut e) => {
                let apps = e.get_mut();
                match apps
                    .iter_mut()
                    .find(|l| l.location.app_source == loc.app_source)
                {
                    Some(old) if loc.time_us > old.location.time_us => {
                        *old = SharedLocation::new(loc);
                    }
                    Some(_) => {}
                    None => {
                        remember_in(&mut self.by_app_mut(), &loc.app_source, loc.device_id);
                        apps.push(SharedLocation::new(loc));
                    }
                }
            }
            Entry::Vacant(e) => {
                remember_in(&mut self.by_app_mut(), &loc.app_source, loc.device_id);
                e.insert(smallvec![SharedLocation::new(loc)]);
            }
        }
    }

    fn by_app_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, BTreeSet<Uuid>>> {
        // Nothing panics while it is held: a poisoned lock's set is whole.
        self.by_app.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// `pick` applied to the newest location of `device` in `app_source`.
    pub fn get<T>(
        &self,
        app_source: &str,
        device: &Uuid,
        pick: impl FnOnce(&SharedLocation) -> T,
    ) -> Option<T> {
        let apps = self.map.get(device)?;
        of_app(&apps, app_source).map(pick)
    }

    /// `take` called with the index in `devices` and the newest location in
    /// `app_source` of each of them that has one, in their order, until it
    /// returns false.
    pub fn of_devices(
        &self,
        app_source: &str,
        devices: &[Uuid],
        mut take: impl FnMut(usize, &SharedLocation) -> bool,
    ) {
        for (i, d) in devices.iter().enumerate() {
            if let Some(e) = self.map.get(d)
                && let Some(l) = of_app(&e, app_source)
                && !take(i, l)
            {
                return;
            }
        }
    }

    /// `take` called with the newest location of each device of
    /// `app_source` whose id is above `after`, in id order, until it
    /// returns false. A device that joins the app meanwhile is seen if its
    /// id is above the last one read.
    pub fn of_app_after(
        &self,
        app_source: &str,
        mut after: Option<Uuid>,
        mut take: impl FnMut(&SharedLocation) -> bool,
    ) {
        loop {
            let ids: Vec<Uuid> = {
                let by_app = self.by_app.read().unwrap_or_else(PoisonError::into_inner);
                let Some(ids) = by_app.get(app_source) else {
                    return;
                };
                let from = after.map_or(Bound::Unbounded, Bound::Excluded);
                ids.range((from, Bound::Unbounded))
                    .take(IDS_AT_A_TIME)
                    .copied()
                    .collect()
            };
            for id in &ids {
                // Forgotten since the copy: skipped.
                if let Some(e) = self.map.get(id)
                    && let Some(l) = of_app(&e, app_source)
                    && !take(l)
                {
                    return;
                }
            }
            if ids.len() < IDS_AT_A_TIME {
                return;
            }
            after = ids.last().copied();
        }
    }

    /// Forgets every (app_source, device) whose newest point is older than
    /// `cutoff_us`; returns how many.
    pub fn forget_older_than(&self, cutoff_us: i64) -> usize {
        let mut forgotten = 0;
        self.map.retain(|device, apps| {
            apps.retain(|l| {
                let keep = l.location.time_us >= cutoff_us;
                if !keep {
                    forget_in(&mut self.by_app_mut(), &l.location.app_source, *device);
                    forgotten += 1;
                }
                keep
            });
            !apps.is_empty()
        });
        forgotten
    }

    /// How many (app_source, device) positions are kept.
    pub fn len(&self) -> usize {
        self.map.iter().map(|e| e.value().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Fills the map with the newest stored point of each (app_source,
    /// device). A loose index scan over the unique key `(app_source,
    /// device_id, time DESC)`: one probe per pair, not a scan of every row.
    pub async fn load(&self, pool: &PgPool) -> Result<usize, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "WITH RECURSIVE d AS (
                 (SELECT app_source, device_id FROM location_events
                  ORDER BY app_source, device_id LIMIT 1)
                 UNION ALL
                 SELECT n.app_source, n.device_id FROM d CROSS JOIN LATERAL (
                     SELECT e.app_source, e.device_id FROM location_events e
                     WHERE (e.app_source, e.device_id) > (d.app_source, d.device_id)
                     ORDER BY e.app_source, e.device_id LIMIT 1
                 ) n
             )
             SELECT l.* FROM d CROSS JOIN LATERAL (
                 SELECT {SELECT_COLUMNS}
                 FROM location_events e
                 WHERE e.app_source = d.app_source AND e.device_id = d.device_id
                 ORDER BY time DESC LIMIT 1
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

fn remember_in(by_app: &mut HashMap<String, BTreeSet<Uuid>>, app_source: &str, device: Uuid) {
    match by_app.get_mut(app_source) {
        Some(ids) => {
            ids.insert(device);
        }
        None => {
            by_app.insert(app_source.to_string(), BTreeSet::from([device]));
        }
    }
}

fn forget_in(by_app: &mut HashMap<String, BTreeSet<Uuid>>, app_source: &str, device: Uuid) {
    if let Some(ids) = by_app.get_mut(app_source) {
        ids.remove(&device);
        if ids.is_empty() {
            by_app.remove(app_source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(device: u128, time_us: i64) -> ValidLocation {
        ValidLocation {
            time_us,
            device_id: Uuid::from_u128(device),
            app_source: if device.is_multiple_of(2) {
                "pshop".into()
            } else {
                "mextrack".into()
            },
            latitude: 1.0,
            ..ValidLocation::example()
        }
    }

    /// The app_source of `at(device, ..)`.
    fn app(device: u128) -> &'static str {
        at(device, 0).app_source.leak()
    }

    #[test]
    fn only_moves_forward() {
        let l = Latest::default();
        l.offer(at(1, 100));
        l.offer(at(1, 50)); // late
        let time = |d| l.get(app(d), &Uuid::from_u128(d), |s| s.location.time_us);
        assert_eq!(time(1), Some(100));
        let stale = l
            .get(app(1), &Uuid::from_u128(1), |s| s.encoded().to_vec())
            .unwrap();
        l.offer(at(1, 150));
        assert_eq!(time(1), Some(150));
        // A newer point is encoded anew, not served from the old encoding.
        let fresh = l
            .get(app(1), &Uuid::from_u128(1), |s| s.encoded().to_vec())
            .unwrap();
        assert_ne!(stale, fresh);
        assert_eq!(time(3), None);
        l.offer(at(2, 10));
        l.offer(at(4, 10));
        assert_eq!(of_app(&l, "pshop", None, usize::MAX), [2, 4]);
        // In the order asked, without the devices it does not know in
        // that app_source.
        let mut of_devices = Vec::new();
        let asked = [4, 3, 1, 2].map(Uuid::from_u128);
        l.of_devices("pshop", &asked, |i, s| {
            of_devices.push((i, s.location.device_id.as_u128()));
            true
        });
        assert_eq!(of_devices, [(0, 4), (3, 2)]);
        // Until told to stop.
        let mut first = Vec::new();
        l.of_devices("pshop", &asked, |i, _| {
            first.push(i);
            false
        });
        assert_eq!(first, [0]);
        assert_eq!(l.len(), 3);
    }

    /// One device id in two app_sources (one phone, two apps): two
    /// positions, and neither app's points, newer or not, touch the other's.
    #[test]
    fn a_device_id_is_kept_apart_in_each_app_source() {
        let l = Latest::default();
        let x = Uuid::from_u128(1);
        l.offer(at(1, 100)); // mextrack
        l.offer(ValidLocation {
            app_source: "pshop".into(),
            latitude: 5.0,
            ..at(1, 10_000)
        });
        l.offer(ValidLocation {
            app_source: "pshop".into(),
            ..at(1, 100)
        });
        let pick = |s: &SharedLocation| (s.location.time_us, s.location.latitude);
        assert_eq!(l.get("mextrack", &x, pick), Some((100, 1.0)));
        assert_eq!(l.get("pshop", &x, pick), Some((10_000, 5.0)));
        assert_eq!(l.get("other", &x, pick), None);
        assert_eq!(of_app(&l, "mextrack", None, 9), [1]);
        assert_eq!(of_app(&l, "pshop", None, 9), [1]);
        assert_eq!(l.len(), 2);
        // Forgetting one app's stale position keeps the other's.
        assert_eq!(l.forget_older_than(200), 1);
        assert_eq!(l.get("mextrack", &x, pick), None);
        assert_eq!(l.get("pshop", &x, pick), Some((10_000, 5.0)));
        assert_eq!(of_app(&l, "mextrack", None, 9), Vec::<u128>::new());
    }

    /// The ids (as numbers) `of_app_after` gives, taking at most `most`.
    fn of_app(l: &Latest, app: &str, after: Option<u128>, most: usize) -> Vec<u128> {
        let mut got = Vec::new();
        l.of_app_after(app, after.map(Uuid::from_u128), |s| {
            got.len() < most && {
                got.push(s.location.device_id.as_u128());
                true
            }
        });
        got
    }

    #[test]
    fn an_app_is_read_in_id_order_from_any_device_on() {
        let l = Latest::default();
        // More than are copied out of the index at a time, offered backwards.
        let n = 2 * IDS_AT_A_TIME as u128 + 7;
        for d in (1..=2 * n).rev() {
            l.offer(at(d, 100));
        }
        let odd: Vec<u128> = (1..=2 * n).filter(|d| d % 2 == 1).collect();
        assert_eq!(of_app(&l, "mextrack", None, usize::MAX), odd);
        assert_eq!(of_app(&l, "mextrack", Some(2), 3), [3, 5, 7]);
        // After an id that is not the app's, or not known at all.
        assert_eq!(of_app(&l, "mextrack", Some(1_000), 2), [1_001, 1_003]);
        assert_eq!(of_app(&l, "mextrack", Some(2 * n), 5), Vec::<u128>::new());
        assert_eq!(of_app(&l, "nobody", None, 5), Vec::<u128>::new());

        // A device's point of another app is kept apart, in that app:
        // the device stays in its own.
        l.offer(ValidLocation {
            app_source: "pshop".into(),
            ..at(1, 200)
        });
        l.offer(ValidLocation {
            app_source: "other".into(),
            ..at(3, 50)
        });
        assert_eq!(of_app(&l, "mextrack", None, 2), [1, 3]);
        assert_eq!(of_app(&l, "pshop", None, 3), [1, 2, 4]);
        assert_eq!(of_app(&l, "other", None, 3), [3]);

        // Forgotten positions leave their app: every first one (at 100)
        // but device 5's, which moved on, and device 3's in "other".
        l.offer(at(5, 300));
        assert_eq!(l.forget_older_than(150), 2 * n as usize);
        assert_eq!(of_app(&l, "mextrack", None, 9), [5]);
        assert_eq!(of_app(&l, "pshop", None, 9), [1]);
        assert!(l.by_app.read().unwrap().len() == 2, "empty apps dropped");
    }

    #[test]
    fn forgets_devices_silent_past_the_cutoff() {
        let l = Latest::default();
        l.offer(at(1, 100));
        l.offer(at(2, 200));
        l.offer(at(3, 300));
        assert_eq!(l.forget_older_than(200), 1);
        assert_eq!(l.len(), 2);
        assert!(l.get(app(1), &Uuid::from_u128(1), |_| ()).is_none());
        assert!(l.get(app(2), &Uuid::from_u128(2), |_| ()).is_some());
        assert_eq!(l.forget_older_than(200), 0);
    }
}
