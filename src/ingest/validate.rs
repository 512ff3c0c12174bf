//! Checks one point at a time. A bad point is rejected alone, with a stable
//! reason code; its good neighbours go on.

use std::{collections::HashSet, time::Duration};

use uuid::Uuid;

use crate::{
    config::ValidationArgs,
    location::{Reason, Rejection, ValidLocation, reject},
    proto,
};

/// The rules, built once from the configuration.
#[derive(Debug, Clone)]
pub struct Validator {
    max_future_skew_us: i64,
    max_age_us: i64,
    max_speed_kmh: f64,
    max_app_source_len: usize,
    app_sources: Option<HashSet<String>>,
    max_metadata_bytes: usize,
}

impl Validator {
    pub fn new(rules: &ValidationArgs, raw_retention: Duration) -> Self {
        let us = |d: Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Self {
            max_future_skew_us: us(rules.max_future_skew),
            max_age_us: us(raw_retention),
            max_speed_kmh: rules.max_speed_kmh,
            max_app_source_len: rules.max_app_source_len,
            app_sources: (!rules.app_sources.is_empty())
                .then(|| rules.app_sources.iter().cloned().collect()),
            max_metadata_bytes: rules.max_metadata_bytes,
        }
    }

    /// Checks one point against the clock `now_us` (microseconds since the
    /// Unix epoch). Takes the point by value to move its strings, not copy them.
    pub fn validate(&self, loc: proto::Location, now_us: i64) -> Result<ValidLocation, Rejection> {
        let time_us = self.time(loc.time.as_ref(), now_us)?;
        let device_id = uuid(&loc.device_id, "device_id", Reason::DeviceIdInvalid)?;
        let user_id = uuid(&loc.user_id, "user_id", Reason::UserIdInvalid)?;
        self.app_source(&loc.app_source)?;
        let (latitude, longitude) = position(loc.latitude, loc.longitude)?;
        let accuracy = optional("accuracy", loc.accuracy)?;
        if accuracy.is_some_and(|a| a < 0.0) {
            return Err(reject(
                Reason::AccuracyNegative,
                "accuracy must not be negative",
            ));
        }
        let altitude = optional("altitude", loc.altitude)?;
        let speed = optional("speed", loc.speed)?;
        if let Some(s) = speed {
            if s < 0.0 {
                return Err(reject(Reason::SpeedNegative, "speed must not be negative"));
            }
            if f64::from(s) > self.max_speed_kmh {
                return Err(reject(
                    Reason::SpeedTooHigh,
                    format!(
                        "speed {s} km/h is over the limit of {} km/h",
                        self.max_speed_kmh
                    ),
                ));
            }
        }
        let heading = optional("heading", loc.heading)?;
        if heading.is_some_and(|h| !(0.0..360.0).contains(&h)) {
            return Err(reject(
                Reason::HeadingOutOfRange,
                "heading must be in [0, 360)",
            ));
        }
        let metadata = self.metadata(loc.metadata_json)?;
        Ok(ValidLocation {
            time_us,
            device_id,
            user_id,
            app_source: loc.app_source,
            latitude,
            longitude,
            accuracy,
            altitude,
            speed,
            heading,
            metadata,
        })
    }

    fn time(&self, t: Option<&prost_types::Timestamp>, now_us: i64) -> Result<i64, Rejection> {
        let t = t.ok_or_else(|| reject(Reason::TimeMissing, "time is required"))?;
        if !(0..1_000_000_000).contains(&t.nanos) {
            return Err(reject(
                Reason::TimeInvalid,
                format!(
                    "time.nanos {} is outside [0, 1e9); a Timestamp has no leap second (send 23:59:60 as 23:59:59.999999999)",
                    t.nanos
                ),
            ));
        }
        let time_us = t
            .seconds
            .checked_mul(1_000_000)
            .and_then(|s| s.checked_add(i64::from(t.nanos / 1_000)))
            .ok_or_else(|| reject(Reason::TimeInvalid, "time is out of range"))?;
        if time_us > now_us.saturating_add(self.max_future_skew_us) {
            return Err(reject(
                Reason::TimeInFuture,
                format!(
                    "time is {} s in the future; at most {} s of clock skew is allowed",
                    (time_us - now_us) / 1_000_000,
                    self.max_future_skew_us / 1_000_000
                ),
            ));
        }
        if time_us < now_us.saturating_sub(self.max_age_us) {
            return Err(reject(
                Reason::TimeTooOld,
                format!(
                    "time is older than the raw retention of {} days and would be dropped at once",
                    self.max_age_us / 86_400_000_000
                ),
            ));
        }
        Ok(time_us)
    }

    fn app_source(&self, s: &str) -> Result<(), Rejection> {
        if s.is_empty() {
            return Err(reject(Reason::AppSourceEmpty, "app_source is required"));
        }
        if s.len() > self.max_app_source_len {
            return Err(reject(
                Reason::AppSourceTooLong,
                format!(
                    "app_source is {} bytes; the limit is {}",
                    s.len(),
                    self.max_app_source_len
                ),
            ));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(reject(
                Reason::AppSourceInvalid,
                "app_source may hold only ASCII letters, digits, '_', '-' and '.'",
            ));
        }
        if let Some(allowed) = &self.app_sources
            && !allowed.contains(s)
        {
            return Err(reject(
                Reason::AppSourceNotAllowed,
                format!("app_source {s:?} is not one of the configured app sources"),
            ));
        }
        Ok(())
    }

    fn metadata(&self, json: String) -> Result<Option<String>, Rejection> {
        if json.is_empty() {
            return Ok(None);
        }
        if json.len() > self.max_metadata_bytes {
            return Err(reject(
                Reason::MetadataTooLarge,
                format!(
                    "metadata_json is {} bytes; the limit is {}",
                    json.len(),
                    self.max_metadata_bytes
                ),
            ));
        }
        // JSON's syntax, with numbers read as text (serde_json's `Value`
        // would refuse 1e400, which jsonb takes); then what jsonb refuses
        // in valid JSON, so that one point cannot fail a whole batch in the
        // database.
        let invalid = |why: String| {
            reject(
                Reason::MetadataInvalid,
                format!("metadata_json is not valid JSON for jsonb: {why}"),
            )
        };
        serde_json::from_str::<serde::de::IgnoredAny>(&json).map_err(|e| invalid(e.to_string()))?;
        super::jsonb::check(&json).map_err(|e| invalid(e.to_string()))?;
        if !json
            .trim_start_matches([' ', '\t', '\n', '\r'])
            .starts_with('{')
        {
            return Err(reject(
                Reason::MetadataNotObject,
                "metadata_json must be a JSON object",
            ));
        }
        Ok(Some(json))
    }
}

fn uuid(s: &str, field: &str, reason: Reason) -> Result<Uuid, Rejection> {
    match Uuid::try_parse(s) {
        Ok(u) if !u.is_nil() => Ok(u),
        Ok(_) => Err(reject(reason, format!("{field} must not be the nil UUID"))),
        Err(_) => Err(reject(reason, format!("{field} {s:?} is not a UUID"))),
    }
}

fn position(lat: f64, lon: f64) -> Result<(f64, f64), Rejection> {
    if !lat.is_finite() || !lon.is_finite() {
        return Err(reject(
            Reason::NotFinite,
            "latitude and longitude must be finite numbers",
        ));
    }
    if !(-90.0..=90.0).contains(&lat) {
        return Err(reject(
            Reason::LatitudeOutOfRange,
            format!("latitude {lat} is outside [-90, 90]"),
        ));
    }
    if !(-180.0..=180.0).contains(&lon) {
        return Err(reject(
            Reason::LongitudeOutOfRange,
            format!("longitude {lon} is outside [-180, 180]"),
        ));
    }
    if lat == 0.0 && lon == 0.0 {
        return Err(reject(
            Reason::NullIsland,
            "(0, 0) is the default of a GPS that has no fix",
        ));
    }
    Ok((lat, lon))
}

/// An optional measurement, stored as `real`.
fn optional(field: &str, v: Option<f64>) -> Result<Option<f32>, Rejection> {
    match v {
        None => Ok(None),
        Some(x) if !x.is_finite() || !(x as f32).is_finite() => Err(reject(
            Reason::NotFinite,
            format!("{field} must be a finite number"),
        )),
        Some(x) => Ok(Some(x as f32)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_780_000_000_000_000;

    fn good() -> proto::Location {
        proto::Location {
            time: Some(prost_types::Timestamp {
                seconds: NOW / 1_000_000 - 10,
                nanos: 123_456_789,
            }),
            device_id: "6f1c1c2e-5a3b-4c1d-9e8f-0a1b2c3d4e5f".into(),
            user_id: "0b6e7c7a-1f2d-4e3c-8b9a-9c8d7e6f5a4b".into(),
            app_source: "mextrack".into(),
            latitude: 19.4326,
            longitude: -99.1332,
            accuracy: Some(4.5),
            altitude: Some(2240.0),
            speed: Some(42.0),
            heading: Some(359.9),
            metadata_json: r#"{"battery": 0.8}"#.into(),
        }
    }

    fn check(f: impl FnOnce(&mut proto::Location)) -> Result<ValidLocation, Reason> {
        let rules = ValidationArgs {
            app_sources: vec!["mextrack".into(), "pshop".into()],
            ..Default::default()
        };
        let v = Validator::new(&rules, Duration::from_secs(30 * 86_400));
        let mut loc = good();
        f(&mut loc);
        v.validate(loc, NOW).map_err(|r| r.reason)
    }

    #[test]
    fn accepts_a_good_point_and_truncates_to_microseconds() {
        let v = check(|_| {}).unwrap();
        assert_eq!(v.time_us, NOW - 10_000_000 + 123_456);
        assert_eq!(v.accuracy, Some(4.5));
        assert_eq!(v.metadata.as_deref(), Some(r#"{"battery": 0.8}"#));
    }

    #[test]
    fn accepts_edges() {
        check(|l| l.latitude = 90.0).unwrap();
        check(|l| l.longitude = -180.0).unwrap();
        check(|l| l.heading = Some(0.0)).unwrap();
        check(|l| l.latitude = 0.0).unwrap();
        check(|l| l.metadata_json.clear()).unwrap();
        check(|l| l.speed = Some(1200.0)).unwrap();
        // An escaped backslash and the text `u0000`: no U+0000, jsonb takes it.
        check(|l| l.metadata_json = r#"{"\\u0000": "a\\u0000"}"#.into()).unwrap();
        // Numbers jsonb takes, though an f64 cannot hold them; a surrogate pair.
        check(|l| l.metadata_json = r#"{"a": 1e400, "b": 1e-16383, "c": 9.9e131071}"#.into())
            .unwrap();
        check(|l| l.metadata_json = r#" {"a": "\ud83d\ude00"}"#.into()).unwrap();
        // Beyond what PostgreSQL's real holds: refused, not stored as infinity.
        assert_eq!(check(|l| l.altitude = Some(3.5e38)), Err(Reason::NotFinite));
        check(|l| l.altitude = Some(3.4e38)).unwrap();
    }

    #[test]
    fn rejects_each_kind_of_bad_point() {
        type Spoil = Box<dyn FnOnce(&mut proto::Location)>;
        let cases: Vec<(Reason, Spoil)> = vec![
            (Reason::TimeMissing, Box::new(|l| l.time = None)),
            (
                Reason::TimeInvalid,
                Box::new(|l| l.time.as_mut().unwrap().nanos = -1),
            ),
            (
                Reason::TimeInvalid,
                Box::new(|l| l.time.as_mut().unwrap().seconds = i64::MAX),
            ),
            (
                Reason::TimeInFuture,
                Box::new(|l| l.time.as_mut().unwrap().seconds += 311),
            ),
            (
                Reason::TimeTooOld,
                Box::new(|l| l.time.as_mut().unwrap().seconds -= 31 * 86_400),
            ),
            (
                Reason::DeviceIdInvalid,
                Box::new(|l| l.device_id = "truck-7".into()),
            ),
            (
                Reason::DeviceIdInvalid,
                Box::new(|l| l.device_id = Uuid::nil().to_string()),
            ),
            (Reason::UserIdInvalid, Box::new(|l| l.user_id.clear())),
            (Reason::AppSourceEmpty, Box::new(|l| l.app_source.clear())),
            (
                Reason::AppSourceTooLong,
                Box::new(|l| l.app_source = "x".repeat(51)),
            ),
            (
                Reason::AppSourceInvalid,
                Box::new(|l| l.app_source = "mex\0track".into()),
            ),
            (
                Reason::AppSourceNotAllowed,
                Box::new(|l| l.app_source = "other".into()),
            ),
            (Reason::NotFinite, Box::new(|l| l.latitude = f64::NAN)),
            (Reason::NotFinite, Box::new(|l| l.longitude = f64::INFINITY)),
            (Reason::NotFinite, Box::new(|l| l.altitude = Some(1e300))),
            (Reason::NotFinite, Box::new(|l| l.speed = Some(f64::NAN))),
            (
                Reason::LatitudeOutOfRange,
                Box::new(|l| l.latitude = 90.0001),
            ),
            (
                Reason::LongitudeOutOfRange,
                Box::new(|l| l.longitude = -180.5),
            ),
            (
                Reason::NullIsland,
                Box::new(|l| (l.latitude, l.longitude) = (0.0, 0.0)),
            ),
            (
                Reason::AccuracyNegative,
                Box::new(|l| l.accuracy = Some(-1.0)),
            ),
            (Reason::SpeedNegative, Box::new(|l| l.speed = Some(-0.1))),
            (Reason::SpeedTooHigh, Box::new(|l| l.speed = Some(1200.5))),
            (
                Reason::HeadingOutOfRange,
                Box::new(|l| l.heading = Some(360.0)),
            ),
            (
                Reason::HeadingOutOfRange,
                Box::new(|l| l.heading = Some(-0.5)),
            ),
            (
                Reason::MetadataTooLarge,
                Box::new(|l| l.metadata_json = format!("{{\"a\":\"{}\"}}", "x".repeat(5000))),
            ),
            (
                Reason::MetadataInvalid,
                Box::new(|l| l.metadata_json = "{not json".into()),
            ),
            (
                Reason::MetadataInvalid,
                Box::new(|l| l.metadata_json = r#"{"a":"\u0000"}"#.into()),
            ),
            (
                Reason::MetadataInvalid,
                Box::new(|l| l.metadata_json = r#"{"\\\u0000": 1}"#.into()),
            ),
            (
                Reason::MetadataInvalid,
                Box::new(|l| l.metadata_json = "[".repeat(200) + &"]".repeat(200)),
            ),
            (
                Reason::MetadataNotObject,
                Box::new(|l| l.metadata_json = "[1,2]".into()),
            ),
            // What jsonb refuses in valid JSON (SQLSTATE 22003, 22P02, 22P05
            // in the database, for the whole batch).
            (
                Reason::MetadataInvalid,
                Box::new(|l| l.metadata_json = r#"{"a":1e-16384}"#.into()),
            ),
            (
                Reason::MetadataInvalid,
                Box::new(|l| l.metadata_json = r#"{"a":[1e131072]}"#.into()),
            ),
            (
                Reason::MetadataInvalid,
                Box::new(|l| l.metadata_json = r#"{"a":"\ud800"}"#.into()),
            ),
            (
                Reason::MetadataInvalid,
                Box::new(|l| l.metadata_json = r#"{"a":"\udc00\ud800"}"#.into()),
            ),
            (
                Reason::MetadataNotObject,
                Box::new(|l| l.metadata_json = " \"text\"".into()),
            ),
            // Past PostgreSQL's timestamptz (4713 BC to 294276 AD): year
            // 294277 is past i64 microseconds too; both are outside the
            // retention window long before.
            (
                Reason::TimeInvalid,
                Box::new(|l| l.time.as_mut().unwrap().seconds = 9_224_286_393_600),
            ),
            (
                Reason::TimeTooOld,
                Box::new(|l| l.time.as_mut().unwrap().seconds = -210_898_425_600),
            ),
        ];
        for (want, f) in cases {
            assert_eq!(check(f).unwrap_err(), want, "expected {}", want.code());
        }
    }
}
