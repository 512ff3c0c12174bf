//! Tracking apps that speak their own formats (Traccar Client's OsmAnd
//! protocol, OwnTracks' JSON) and carry a free-form identifier of their
//! own instead of locus's device and user UUIDs.
//!
//! A tracker is registered once ([`registry`]): its app_source and its
//! identifier fix its device UUID ([`device_id`]) and its user. Each
//! format has one parser ([`osmand`], [`owntracks`]) that reads a request
//! or a message into [`Fix`]es, the point as the app sent it, with the
//! identifier it named; [`Fix::into_location`] binds one to its tracker,
//! and the result goes through the same ingest path as any other point.
//! Every transport (HTTP here, MQTT later) uses these parsers and this
//! registry.

pub mod osmand;
pub mod owntracks;
pub mod registry;

use serde_json::{Map, Value};
use uuid::Uuid;

use crate::{location::Rejection, proto};

pub use registry::{Registry, Tracker, TrackerError};

/// The UUIDv5 namespace of tracker devices. Fixed forever: changing it
/// would move every tracker to a new device.
pub const NAMESPACE: Uuid = Uuid::from_u128(0x3c48de36_bf38_4e3a_9d6f_652c5e2a8a66);

/// The device UUID of a tracker: UUIDv5 of [`NAMESPACE`] and
/// `<app_source>/<tracker_id>` (UTF-8), so that anyone who knows both
/// can compute it.
pub fn device_id(app_source: &str, tracker_id: &str) -> Uuid {
    Uuid::new_v5(&NAMESPACE, format!("{app_source}/{tracker_id}").as_bytes())
}

/// Metadata keys under which the formats' shared facts are stored, in
/// locus's words whatever the app called them.
pub mod keys {
    /// Battery level in percent (0..100).
    pub const BATTERY: &str = "battery";
    /// Whether the phone is charging.
    pub const CHARGING: &str = "charging";
}

/// What one report of a tracking app holds: the identifier it named, and
/// its point, none (a report without a position, such as a heartbeat), or
/// why it cannot be one.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The identifier it named (OsmAnd's `id`); `None`: the caller's own
    /// tracker, or one named by the transport (OwnTracks' user and device).
    pub tracker_id: Option<String>,
    pub fix: Result<Option<Fix>, Rejection>,
}

/// A position as a tracking app sent it, not yet bound to a device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fix {
    /// Microseconds since the Unix epoch; `None`: not sent (the time of
    /// arrival is used, as Traccar does).
    pub time_us: Option<i64>,
    pub latitude: f64,
    pub longitude: f64,
    pub accuracy: Option<f64>,
    pub altitude: Option<f64>,
    /// km/h, whatever unit the app sent.
    pub speed: Option<f64>,
    pub heading: Option<f64>,
    pub metadata: Map<String, Value>,
}

impl Fix {
    /// The point of `tracker`, for the validator; `now_us` stands in for
    /// a time the app did not send.
    pub fn into_location(self, tracker: &Tracker, now_us: i64) -> proto::Location {
        let us = self.time_us.unwrap_or(now_us);
        proto::Location {
            time: Some(prost_types::Timestamp {
                seconds: us.div_euclid(1_000_000),
                nanos: (us.rem_euclid(1_000_000) * 1000) as i32,
            }),
            device_id: tracker.device_id.to_string(),
            user_id: tracker.user_id.to_string(),
            app_source: tracker.app_source.clone(),
            latitude: self.latitude,
            longitude: self.longitude,
            accuracy: self.accuracy,
            altitude: self.altitude,
            speed: self.speed,
            heading: self.heading,
            metadata_json: if self.metadata.is_empty() {
                String::new()
            } else {
                Value::Object(self.metadata).to_string()
            },
        }
    }
}

/// km/h in a knot.
pub const KMH_PER_KNOT: f64 = 1.852;
/// km/h in a metre a second.
pub const KMH_PER_MPS: f64 = 3.6;

/// A number sent as a JSON number or as text (`"12.5"`).
fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A boolean sent as JSON, as text (`true`, `1`) or as a number.
fn boolean(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.trim() {
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            _ => None,
        },
        Value::Number(n) => n.as_f64().map(|x| x != 0.0),
        _ => None,
    }
}

/// Text sent as it came from a query string or a form: a number or a
/// boolean if it reads as one, else the text (what Traccar does with the
/// keys it does not know).
fn typed(text: &str) -> Value {
    match text {
        "true" => return Value::Bool(true),
        "false" => return Value::Bool(false),
        _ => {}
    }
    match text.parse::<f64>() {
        Ok(x) if x.is_finite() => serde_json::Number::from_f64(x)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(text.to_string())),
        _ => Value::String(text.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule the README gives, as another implementation computes it.
    #[test]
    fn the_device_id_is_the_documented_uuid_v5() {
        let id = device_id("fleet", "353861053849681");
        assert_eq!(id.get_version_num(), 5);
        assert_eq!(id, device_id("fleet", "353861053849681"));
        assert_ne!(id, device_id("fleet2", "353861053849681"));
        assert_eq!(
            NAMESPACE.to_string(),
            "3c48de36-bf38-4e3a-9d6f-652c5e2a8a66"
        );
        // Python: uuid.uuid5(uuid.UUID("3c48de36-..."), "fleet/353861053849681")
        assert_eq!(id.to_string(), "58709db6-b1e4-50f3-8025-972a3ac3cecf");
    }
}
