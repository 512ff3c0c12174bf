//! The subscribers, indexed by what they filter on, so that a committed
//! point is matched against the few that may want it: by device id, by a
//! grid cell of its box, by app_source, or (no filter) everyone.

use std::{collections::HashSet, sync::Arc};

use foldhash::HashMap;
use uuid::Uuid;

use super::{filter::Filter, queue::Inbox};
use crate::location::LocationRef;

/// Finest grid level: cells of 180 / 2^16 degrees, about 300 m.
const FINEST: u8 = 16;

/// A box is indexed this many levels finer than the coarsest whose cells
/// hold it, in cells of a quarter to a half of its size, so that a point's
/// cell names few boxes beyond those that hold it. Two, measured against
/// none and three with overlapping boxes: load-tests/RESULTS.md, "Boxes
/// indexed in finer cells".
const REFINE: u8 = 2;

/// Subscribers by the one filter that narrows them most cheaply: their
/// device ids, else the grid cells their box covers, else their app_source,
/// else none. A candidate's whole filter is still checked.
#[derive(Debug, Default)]
pub(super) struct Index {
    by_device: HashMap<Uuid, Vec<Arc<Inbox>>>,
    /// (level, latitude cell, longitude cell): a box sits [`REFINE`] levels
    /// below the finest level whose cells are at least its size, so it
    /// covers at most 5 x 5 cells (6 x 6 at the poles and the antimeridian,
    /// where cells end).
    by_cell: HashMap<(u8, i32, i32), Vec<Arc<Inbox>>>,
    /// Subscribers at each level, so that a point is looked up only at the
    /// levels in use.
    levels: [usize; FINEST as usize + 1],
    by_app: HashMap<String, Vec<Arc<Inbox>>>,
    everyone: Vec<Arc<Inbox>>,
}

enum Key<'a> {
    Devices(&'a HashSet<Uuid>),
    Cells(u8, Vec<(i32, i32)>),
    App(&'a str),
    Everyone,
}

impl Index {
    fn key(filter: &Filter) -> Key<'_> {
        if let Some(d) = &filter.devices {
            Key::Devices(d)
        } else if let Some(b) = filter.bbox {
            let (level, cells) = cells(b);
            Key::Cells(level, cells)
        } else if let Some(a) = &filter.app_source {
            Key::App(a)
        } else {
            Key::Everyone
        }
    }

    pub(super) fn insert(&mut self, inbox: &Arc<Inbox>) {
        let add = |v: &mut Vec<Arc<Inbox>>| v.push(Arc::clone(inbox));
        match Self::key(&inbox.filter) {
            Key::Devices(d) => d
                .iter()
                .for_each(|d| add(self.by_device.entry(*d).or_default())),
            Key::Cells(level, cells) => {
                self.levels[level as usize] += 1;
                for (la, lo) in cells {
                    add(self.by_cell.entry((level, la, lo)).or_default());
                }
            }
            Key::App(a) => add(self.by_app.entry(a.to_string()).or_default()),
            Key::Everyone => add(&mut self.everyone),
        }
    }

    pub(super) fn remove(&mut self, inbox: &Arc<Inbox>) {
        fn take<K: std::hash::Hash + Eq>(
            map: &mut HashMap<K, Vec<Arc<Inbox>>>,
            k: K,
            inbox: &Arc<Inbox>,
        ) {
            if let Some(v) = map.get_mut(&k) {
                v.retain(|i| !Arc::ptr_eq(i, inbox));
                if v.is_empty() {
                    map.remove(&k);
                }
            }
        }
        match Self::key(&inbox.filter) {
            Key::Devices(d) => d.iter().for_each(|d| take(&mut self.by_device, *d, inbox)),
            Key::Cells(level, cells) => {
                self.levels[level as usize] -= 1;
                for (la, lo) in cells {
                    take(&mut self.by_cell, (level, la, lo), inbox);
                }
            }
            Key::App(a) => take(&mut self.by_app, a.to_string(), inbox),
            Key::Everyone => self.everyone.retain(|i| !Arc::ptr_eq(i, inbox)),
        }
    }

    /// Calls `f` with each subscriber that may want `l`, each at most once.
    pub(super) fn candidates(&self, l: &LocationRef, mut f: impl FnMut(&Arc<Inbox>)) {
        if !self.by_device.is_empty()
            && let Some(v) = self.by_device.get(&l.device_id)
        {
            v.iter().for_each(&mut f);
        }
        for (level, n) in self.levels.iter().enumerate() {
            if *n > 0 {
                let level = level as u8;
                let key = (
                    level,
                    cell(l.latitude, 90.0, level),
                    cell(l.longitude, 180.0, level),
                );
                if let Some(v) = self.by_cell.get(&key) {
                    v.iter().for_each(&mut f);
                }
            }
        }
        if !self.by_app.is_empty()
            && let Some(v) = self.by_app.get(l.app_source)
        {
            v.iter().for_each(&mut f);
        }
        self.everyone.iter().for_each(f);
    }

    /// Every subscriber, once.
    pub(super) fn all(&self) -> Vec<Arc<Inbox>> {
        let mut seen = foldhash::HashSet::default();
        self.by_device
            .values()
            .chain(self.by_cell.values())
            .chain(self.by_app.values())
            .chain([&self.everyone])
            .flatten()
            .filter(|i| seen.insert(Arc::as_ptr(i)))
            .cloned()
            .collect()
    }
}

/// The cell of `degrees` (offset by `half`, so that cells start at -90 or
/// -180) at `level`.
fn cell(degrees: f64, half: f64, level: u8) -> i32 {
    let size = 180.0 / f64::from(1u32 << level);
    ((degrees + half) / size).floor() as i32
}

/// The level of a box, and the cells it covers there.
fn cells((min_lat, max_lat, min_lon, max_lon): (f64, f64, f64, f64)) -> (u8, Vec<(i32, i32)>) {
    // Points are within these bounds; a box beyond them covers no more.
    let (min_lat, max_lat) = (min_lat.max(-90.0), max_lat.min(90.0));
    let (min_lon, max_lon) = (min_lon.max(-180.0), max_lon.min(180.0));
    let extent = (max_lat - min_lat).max(max_lon - min_lon).max(0.0);
    let mut level = 0;
    while level < FINEST && 180.0 / f64::from(1u32 << (level + 1)) >= extent {
        level += 1;
    }
    let level = (level + REFINE).min(FINEST);
    let mut out = Vec::new();
    for la in cell(min_lat, 90.0, level)..=cell(max_lat, 90.0, level) {
        for lo in cell(min_lon, 180.0, level)..=cell(max_lon, 180.0, level) {
            out.push((la, lo));
        }
    }
    (level, out)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::query::live::{
        Filter, Live,
        batch::tests::{batch, point},
        filter::tests::bbox,
        queue::tests::pending,
    };
    use uuid::Uuid;

    /// Every point of a spread over the globe reaches exactly the
    /// subscribers whose filter matches it: the index finds all a linear
    /// scan finds, and no more.
    #[test]
    fn the_index_matches_as_a_scan_of_every_filter() {
        let live = Live::new(1_000_000, 100, Duration::ZERO);
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let filters = vec![
            Filter::default(),
            bbox((52.0, 52.5, 13.0, 13.7)),
            bbox((52.3, 52.3, 13.4, 13.4)),
            bbox((-90.0, 90.0, -180.0, 180.0)),
            bbox((-91.0, 95.0, -500.0, 500.0)),
            bbox((89.9, 90.0, 179.9, 180.0)),
            bbox((-10.0, 10.0, -0.001, 0.001)),
            Filter {
                app_source: Some("fleet".into()),
                ..Filter::default()
            },
            Filter {
                devices: Some([a].into()),
                bbox: Some((0.0, 60.0, 0.0, 60.0)),
                ..Filter::default()
            },
            Filter {
                app_source: Some("rides".into()),
                bbox: Some((52.0, 52.5, 13.0, 13.7)),
                ..Filter::default()
            },
        ];
        let subs: Vec<_> = filters
            .iter()
            .map(|f| live.subscribe(f.clone()).unwrap())
            .collect();
        let mut points = Vec::new();
        for (i, lat) in [-90.0, -45.5, -0.0001, 0.0, 10.0, 52.3, 52.5, 89.95, 90.0]
            .into_iter()
            .enumerate()
        {
            for lon in [
                -180.0, -13.4, -0.001, 0.0, 0.001, 13.0, 13.4, 13.7, 179.95, 180.0,
            ] {
                let device = if i % 2 == 0 { a } else { b };
                let app = if i % 3 == 0 { "fleet" } else { "rides" };
                points.push(point(device, app, lat, lon));
            }
        }
        live.publish(batch(&points));
        for (f, s) in filters.iter().zip(&subs) {
            let want: Vec<_> = points
                .iter()
                .filter(|p| f.matches(&p.as_ref()))
                .map(|p| (p.latitude, p.longitude))
                .collect();
            assert!(!want.is_empty(), "{f:?} matches some point");
            assert_eq!(pending(s), want, "{f:?}");
        }
    }
}
