//! The point itself, which every stage shares: a location as accepted and
//! stored ([`LocationOf`]), the columns it is stored in ([`COLUMNS`]), how a
//! SQL row is read back into one ([`LocationReader`]), its JSON forms
//! ([`json`]), and why a point is rejected ([`Reason`]). It sits
//! below the stages (ingest, pipeline, query), so that none of them reaches
//! up into another for it.

pub mod json;
mod rejection;
mod sql;

pub use rejection::{Reason, Rejection, reject};
pub use sql::{COLUMNS, LocationReader, SELECT_COLUMNS};

use uuid::Uuid;

/// A point that passed validation, in the units the table stores. Also what
/// queries read back (see [`LocationReader`]). Generic over its
/// strings: [`ValidLocation`] owns them; [`LocationRef`] borrows them, from
/// a `ValidLocation` or from a committed COPY row (see
/// `copy_encoder::read_row`), which is what the live feed matches and
/// encodes without an allocation per point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocationOf<S> {
    /// Microseconds since the Unix epoch.
    pub time_us: i64,
    pub device_id: Uuid,
    pub user_id: Uuid,
    pub app_source: S,
    pub latitude: f64,
    pub longitude: f64,
    pub accuracy: Option<f32>,
    pub altitude: Option<f32>,
    pub speed: Option<f32>,
    pub heading: Option<f32>,
    /// The JSON object, as sent; `None` for no metadata.
    pub metadata: Option<S>,
}

pub type ValidLocation = LocationOf<String>;
pub type LocationRef<'a> = LocationOf<&'a str>;

impl<S> LocationOf<S> {
    /// The same location, each string passed through `f`.
    fn map<'a, T>(&'a self, f: impl Fn(&'a S) -> T) -> LocationOf<T> {
        LocationOf {
            time_us: self.time_us,
            device_id: self.device_id,
            user_id: self.user_id,
            app_source: f(&self.app_source),
            latitude: self.latitude,
            longitude: self.longitude,
            accuracy: self.accuracy,
            altitude: self.altitude,
            speed: self.speed,
            heading: self.heading,
            metadata: self.metadata.as_ref().map(f),
        }
    }
}

impl ValidLocation {
    pub fn as_ref(&self) -> LocationRef<'_> {
        self.map(String::as_str)
    }
}

/// A point for tests, which set what they test with struct update syntax
/// (`ValidLocation { speed: Some(2.0), ..ValidLocation::example() }`):
/// every optional field empty.
impl ValidLocation {
    pub fn example() -> ValidLocation {
        ValidLocation {
            time_us: 1_700_000_000_123_456,
            device_id: Uuid::from_u128(1),
            user_id: Uuid::from_u128(2),
            app_source: "mextrack".into(),
            latitude: 19.43,
            longitude: -99.13,
            accuracy: None,
            altitude: None,
            speed: None,
            heading: None,
            metadata: None,
        }
    }
}

impl LocationRef<'_> {
    pub fn to_owned(&self) -> ValidLocation {
        self.map(|s| (*s).to_owned())
    }
}
