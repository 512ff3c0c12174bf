//! The point as JSON, in the two forms of the HTTP API: what a query
//! answers ([`LocationJson`]) and what `POST /v1/locations` takes
//! ([`IngestLocationJson`]).
//!
//! Two forms, not one, since the form sent in takes what an answer never
//! holds: the metadata as text (`metadata_json`) as well as an object,
//! kept as sent (jsonb takes numbers past an f64); any RFC 3339 offset;
//! the optional numbers at the proto's f64 width, so that the validator
//! judges them as it judges gRPC's (a value past an f32 is refused, not
//! stored as infinity); and it refuses unknown fields. What they share is
//! every field of an answer, by name and JSON type: an answered point sent
//! back as it is is the same point (the test below holds them to that).

use chrono::{DateTime, SecondsFormat};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use super::{LocationOf, Reason, Rejection, reject};
use crate::proto;

/// A stored point.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LocationJson {
    /// RFC 3339, microseconds.
    pub time: String,
    pub device_id: String,
    pub user_id: String,
    pub app_source: String,
    pub latitude: f64,
    pub longitude: f64,
    pub accuracy: Option<f32>,
    pub altitude: Option<f32>,
    pub speed: Option<f32>,
    pub heading: Option<f32>,
    /// The metadata object, or null.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
}

/// A time (microseconds since the Unix epoch) as the answers write it:
/// RFC 3339 in UTC, to the microsecond.
pub fn rfc3339(us: i64) -> String {
    DateTime::from_timestamp_micros(us)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl<S: AsRef<str>> From<&LocationOf<S>> for LocationJson {
    fn from(l: &LocationOf<S>) -> Self {
        LocationJson {
            time: rfc3339(l.time_us),
            device_id: l.device_id.to_string(),
            user_id: l.user_id.to_string(),
            app_source: l.app_source.as_ref().to_owned(),
            latitude: l.latitude,
            longitude: l.longitude,
            accuracy: l.accuracy,
            altitude: l.altitude,
            speed: l.speed,
            heading: l.heading,
            metadata: l
                .metadata
                .as_ref()
                .and_then(|m| serde_json::from_str(m.as_ref()).ok()),
        }
    }
}

/// A point as JSON: the proto's fields, `time` in RFC 3339, and the metadata
/// either as an object (`metadata`) or as text (`metadata_json`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestLocationJson<'a> {
    /// RFC 3339.
    time: String,
    device_id: String,
    user_id: String,
    app_source: String,
    latitude: f64,
    longitude: f64,
    accuracy: Option<f64>,
    altitude: Option<f64>,
    speed: Option<f64>,
    heading: Option<f64>,
    /// Kept as sent: the validator checks it as it checks `metadata_json`
    /// (numbers beyond an f64 that jsonb takes are kept, not refused).
    #[serde(borrow)]
    #[schema(value_type = Option<Object>)]
    metadata: Option<&'a RawValue>,
    metadata_json: Option<String>,
}

/// The `index`th location of a body, read into the proto that gRPC sends,
/// for the validator; a location that is not an [`IngestLocationJson`], or
/// whose time is not RFC 3339, is rejected here.
pub fn to_proto(index: usize, raw: &RawValue) -> Result<proto::Location, Rejection> {
    let l: IngestLocationJson = serde_json::from_str(raw.get())
        .map_err(|e| reject(Reason::PointMalformed, format!("location {index}: {e}")))?;
    let time = DateTime::parse_from_rfc3339(&l.time).map_err(|e| {
        reject(
            Reason::TimeInvalid,
            format!("time {:?} is not RFC 3339: {e}", l.time),
        )
    })?;
    let metadata_json = match (l.metadata, l.metadata_json) {
        (Some(_), Some(_)) => {
            return Err(reject(
                Reason::PointMalformed,
                "give metadata or metadata_json, not both",
            ));
        }
        (None, None) => String::new(),
        (Some(m), None) => m.get().to_string(),
        (None, Some(text)) => text,
    };
    Ok(proto::Location {
        time: Some(prost_types::Timestamp {
            seconds: time.timestamp(),
            // A leap second (23:59:60, which RFC 3339 allows and chrono
            // reads as a second nanos past :59) is taken as the last
            // microsecond of :59: PostgreSQL would make it 00:00 of the
            // next minute, where it could collide with a point that is.
            nanos: time.timestamp_subsec_nanos().min(999_999_999) as i32,
        }),
        device_id: l.device_id,
        user_id: l.user_id,
        app_source: l.app_source,
        latitude: l.latitude,
        longitude: l.longitude,
        accuracy: l.accuracy,
        altitude: l.altitude,
        speed: l.speed,
        heading: l.heading,
        metadata_json,
    })
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::location::ValidLocation;

    /// Every field of an answer is one that the ingest form takes (it
    /// refuses unknown fields), and each comes through with its value.
    #[test]
    fn an_answered_point_sent_back_is_the_same_point() {
        let point = ValidLocation {
            time_us: 1_780_000_000_123_456,
            device_id: Uuid::from_u128(1),
            user_id: Uuid::from_u128(2),
            app_source: "mextrack".into(),
            latitude: 19.4326,
            longitude: -99.1332,
            accuracy: Some(4.5),
            altitude: Some(2240.25),
            speed: Some(42.0),
            heading: Some(359.5),
            metadata: Some(r#"{"battery":0.8}"#.into()),
        };
        let answered = serde_json::to_string(&LocationJson::from(&point)).unwrap();
        let sent = to_proto(0, &RawValue::from_string(answered).unwrap()).unwrap();
        let want = proto::Location {
            time: Some(prost_types::Timestamp {
                seconds: 1_780_000_000,
                nanos: 123_456_000,
            }),
            device_id: point.device_id.to_string(),
            user_id: point.user_id.to_string(),
            app_source: "mextrack".into(),
            latitude: 19.4326,
            longitude: -99.1332,
            accuracy: Some(4.5),
            altitude: Some(2240.25),
            speed: Some(42.0),
            heading: Some(359.5),
            metadata_json: r#"{"battery":0.8}"#.into(),
        };
        assert_eq!(sent, want);
    }
}
