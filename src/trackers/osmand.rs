//! The OsmAnd protocol, as Traccar's server reads it
//! (`OsmAndProtocolDecoder`) and as the Traccar Client apps send it:
//!
//! - parameters, in the query string or a form body ([`parse_params`]):
//!   `id` or `deviceid`, `lat`, `lon` or `location=lat,lon`, `timestamp`
//!   (seconds, milliseconds, ISO 8601, or `yyyy-MM-dd HH:mm:ss` in UTC),
//!   `speed` in knots, `bearing` or `heading`, `altitude`, `accuracy`,
//!   `hdop`, `batt`, `charge`; any other key into the metadata;
//! - JSON ([`parse_json`]): one object or an array of them, each either
//!   the parameters as JSON fields (traccar-client-sdk's `uploadJson`) or
//!   the background-geolocation form `{"device_id", "location":
//!   {"timestamp", "coords": {...}, "battery": {...}, ...}}` (Traccar
//!   Client 9 and later), where speed is in m/s and -1 means unknown.

use chrono::{DateTime, NaiveDateTime};
use serde_json::{Map, Value, value::RawValue};

use super::{Fix, KMH_PER_KNOT, KMH_PER_MPS, Report, boolean, keys, number, typed};
use crate::location::{Reason, Rejection, reject};

/// Why a JSON body is not OsmAnd's.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("more than {0} points")]
    TooMany(usize),
    #[error("the body must be a JSON object or an array of them: {0}")]
    Json(#[from] serde_json::Error),
}

/// One report from its parameters, as decoded from a query string or a
/// form body (`+` and `%xx` already decoded). A key sent twice keeps its
/// last value, as Traccar does, but for the metadata's, which keep all.
pub fn parse_params<'a>(params: impl IntoIterator<Item = (&'a str, &'a str)>) -> Report {
    let mut fields = Map::new();
    for (k, v) in params {
        let v = Value::String(v.to_string());
        match fields.get_mut(k) {
            Some(Value::Array(all)) if !is_known(k) => all.push(v),
            Some(old) if !is_known(k) => *old = Value::Array(vec![old.take(), v]),
            _ => {
                fields.insert(k.to_string(), v);
            }
        }
    }
    flat(fields, true)
}

/// A JSON body: one report or an array of them, at most `max_points`
/// (counted before any is read).
pub fn parse_json(body: &[u8], max_points: usize) -> Result<Vec<Report>, JsonError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let raws: Vec<&RawValue> = if first == Some(&b'[') {
        serde_json::from_slice(body)?
    } else {
        vec![serde_json::from_slice(body)?]
    };
    if raws.len() > max_points {
        return Err(JsonError::TooMany(max_points));
    }
    Ok(raws.into_iter().map(object).collect())
}

/// One element of a JSON body.
fn object(raw: &RawValue) -> Report {
    let fields = match serde_json::from_str::<Value>(raw.get()) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return malformed(None, "a report must be a JSON object"),
        Err(e) => return malformed(None, format!("a report is not JSON: {e}")),
    };
    if fields.contains_key("location") {
        geolocation(fields)
    } else {
        flat(fields, false)
    }
}

fn malformed(tracker_id: Option<String>, why: impl Into<String>) -> Report {
    Report {
        tracker_id,
        fix: Err(reject(Reason::PointMalformed, why)),
    }
}

/// The keys read into the point's own fields (not kept in the metadata).
fn is_known(k: &str) -> bool {
    matches!(
        k,
        "id" | "deviceid"
            | "timestamp"
            | "lat"
            | "lon"
            | "location"
            | "speed"
            | "bearing"
            | "heading"
            | "altitude"
            | "accuracy"
            | "hdop"
            | "batt"
            | "charge"
    )
}

/// An identifier as text: OsmAnd's `id`, sent as text or as a number.
fn text_id(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The parameters as a map (from a query string, a form, or a flat JSON
/// object); `from_text`: every value is text, typed as Traccar types it
/// before it goes into the metadata.
fn flat(mut fields: Map<String, Value>, from_text: bool) -> Report {
    let tracker_id = ["id", "deviceid"]
        .iter()
        .filter_map(|k| fields.get(*k).and_then(text_id))
        .next_back();
    let fix = flat_fix(&mut fields, from_text);
    Report { tracker_id, fix }
}

fn flat_fix(fields: &mut Map<String, Value>, from_text: bool) -> Result<Option<Fix>, Rejection> {
    let num = |k: &str| -> Result<Option<f64>, Rejection> {
        match fields.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => number(v)
                .map(Some)
                .ok_or_else(|| reject(Reason::PointMalformed, format!("{k} {v} is not a number"))),
        }
    };
    let (latitude, longitude) = match (num("lat")?, num("lon")?, fields.get("location")) {
        (Some(lat), Some(lon), _) => (lat, lon),
        (_, _, Some(Value::String(both))) => {
            let mut parts = both.split(',').map(|p| p.trim().parse::<f64>());
            match (parts.next(), parts.next()) {
                (Some(Ok(lat)), Some(Ok(lon))) => (lat, lon),
                _ => {
                    return Err(reject(
                        Reason::PointMalformed,
                        format!("location {both:?} is not \"lat,lon\""),
                    ));
                }
            }
        }
        // No position (a heartbeat): nothing to store.
        _ => return Ok(None),
    };
    let time_us = match fields.get("timestamp") {
        None | Some(Value::Null) => None,
        Some(v) => Some(time(v)?),
    };
    let heading = match num("heading")? {
        Some(h) => Some(h),
        None => num("bearing")?,
    };
    let mut fix = Fix {
        time_us,
        latitude,
        longitude,
        accuracy: num("accuracy")?,
        altitude: num("altitude")?,
        speed: num("speed")?.map(|kn| kn * KMH_PER_KNOT),
        heading,
        metadata: Map::new(),
    };
    if let Some(hdop) = num("hdop")? {
        fix.metadata.insert("hdop".into(), json_number(hdop));
    }
    if let Some(batt) = num("batt")? {
        fix.metadata.insert(keys::BATTERY.into(), json_number(batt));
    }
    if let Some(charge) = fields.get("charge") {
        let b = boolean(charge).ok_or_else(|| {
            reject(
                Reason::PointMalformed,
                format!("charge {charge} is not a boolean"),
            )
        })?;
        fix.metadata.insert(keys::CHARGING.into(), Value::Bool(b));
    }
    for (k, v) in std::mem::take(fields) {
        if is_known(&k) {
            continue;
        }
        let v = match v {
            Value::String(s) if from_text => typed(&s),
            Value::Array(all) if from_text => Value::Array(
                all.into_iter()
                    .map(|v| match v {
                        Value::String(s) => typed(&s),
                        other => other,
                    })
                    .collect(),
            ),
            other => other,
        };
        fix.metadata.insert(k, v);
    }
    Ok(Some(fix))
}

fn json_number(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// OsmAnd's `timestamp`: seconds or milliseconds since the epoch (below
/// 2^31 it is seconds, as Traccar reads it), ISO 8601 (an offset, or UTC),
/// or `yyyy-MM-dd HH:mm:ss` in UTC.
pub fn time(v: &Value) -> Result<i64, Rejection> {
    let bad = |why: &str| reject(Reason::TimeInvalid, format!("timestamp {v} is not {why}"));
    let epoch = |x: f64| -> Result<i64, Rejection> {
        if !(0.0..=1e16).contains(&x) {
            return Err(bad("a time since 1970 in seconds or milliseconds"));
        }
        Ok(if x < f64::from(i32::MAX) {
            (x * 1e6).round() as i64
        } else {
            (x * 1e3).round() as i64
        })
    };
    let text = match v {
        Value::Number(n) => return epoch(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => s.trim(),
        _ => return Err(bad("a number or text")),
    };
    if let Ok(x) = text.parse::<f64>() {
        return epoch(x);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_micros());
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Ok(t.and_utc().timestamp_micros());
        }
    }
    Err(bad(
        "seconds, milliseconds, ISO 8601 or yyyy-MM-dd HH:mm:ss",
    ))
}

/// The background-geolocation form: `{"device_id", "location": {...}}`.
fn geolocation(mut root: Map<String, Value>) -> Report {
    let tracker_id = root.get("device_id").and_then(text_id);
    let fix = match root.remove("location") {
        Some(Value::Object(location)) => geolocation_fix(location),
        _ => Err(reject(Reason::PointMalformed, "location must be an object")),
    };
    Report { tracker_id, fix }
}

fn geolocation_fix(mut location: Map<String, Value>) -> Result<Option<Fix>, Rejection> {
    let time_us = match location.remove("timestamp") {
        None | Some(Value::Null) => None,
        Some(v) => Some(time(&v)?),
    };
    let Some(Value::Object(mut coords)) = location.remove("coords") else {
        // No position: nothing to store.
        return Ok(None);
    };
    let mut take = |k: &str| -> Result<Option<f64>, Rejection> {
        match coords.remove(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => number(&v).map(Some).ok_or_else(|| {
                reject(
                    Reason::PointMalformed,
                    format!("coords.{k} {v} is not a number"),
                )
            }),
        }
    };
    let (Some(latitude), Some(longitude)) = (take("latitude")?, take("longitude")?) else {
        return Err(reject(
            Reason::PointMalformed,
            "coords needs latitude and longitude",
        ));
    };
    // -1: unknown.
    let known = |x: Option<f64>| x.filter(|x| *x >= 0.0);
    let mut fix = Fix {
        time_us,
        latitude,
        longitude,
        accuracy: known(take("accuracy")?),
        altitude: take("altitude")?,
        speed: known(take("speed")?).map(|mps| mps * KMH_PER_MPS),
        heading: known(take("heading")?),
        metadata: Map::new(),
    };
    let meta = &mut fix.metadata;
    // The rest of coords (their accuracies, floor...), where known.
    for (k, v) in coords {
        if number(&v).is_some_and(|x| x >= 0.0) || v.is_string() {
            meta.insert(k, v);
        }
    }
    if let Some(Value::Object(battery)) = location.remove("battery") {
        if let Some(level) = battery.get("level").and_then(number).filter(|l| *l >= 0.0) {
            meta.insert(keys::BATTERY.into(), json_number((level * 100.0).round()));
        }
        if let Some(charging) = battery.get("is_charging").and_then(boolean) {
            meta.insert(keys::CHARGING.into(), Value::Bool(charging));
        }
    }
    match location.remove("activity") {
        Some(Value::Object(activity)) => {
            if let Some(kind) = activity.get("type") {
                meta.insert("activity".into(), kind.clone());
            }
        }
        Some(other) => {
            meta.insert("activity".into(), other);
        }
        None => {}
    }
    let extras = location.remove("extras");
    // `_`: the same point again as OsmAnd parameters.
    location.remove("_");
    for (k, v) in location {
        if !v.is_null() {
            meta.insert(k, v);
        }
    }
    if let Some(Value::Object(extras)) = extras {
        for (k, v) in extras {
            meta.entry(k).or_insert(v);
        }
    }
    Ok(Some(fix))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(q: &str) -> Report {
        let pairs: Vec<(String, String)> = form_urlencoded::parse(q.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        parse_params(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    fn fix(r: &Report) -> &Fix {
        r.fix
            .as_ref()
            .expect("a point")
            .as_ref()
            .expect("a position")
    }

    /// Traccar's own test requests (OsmAndProtocolDecoderTest).
    #[test]
    fn traccars_captured_queries_are_read() {
        let r = query(
            "id=902064&lat=42.06288&lon=-88.23412&timestamp=2016-01-27T18%3A55%3A47Z&hdop=6.0&altitude=224.0&speed=0.0",
        );
        assert_eq!(r.tracker_id.as_deref(), Some("902064"));
        let f = fix(&r);
        assert_eq!((f.latitude, f.longitude), (42.06288, -88.23412));
        assert_eq!(f.time_us, Some(1_453_920_947_000_000));
        assert_eq!(f.metadata["hdop"], 6.0);
        assert_eq!(f.altitude, Some(224.0));

        let f = fix(&query(
            "id=902064&lat=42.06288&lon=-88.23412&timestamp=1442068686579&hdop=6.0&altitude=224.0&speed=0.0",
        ))
        .clone();
        assert_eq!(f.time_us, Some(1_442_068_686_579_000));

        let r = query(
            "lat=49.60688&lon=6.15788&timestamp=2014-06-04+09%3A10%3A11&altitude=384.7&speed=0.0&id=353861053849681",
        );
        assert_eq!(r.tracker_id.as_deref(), Some("353861053849681"));
        assert_eq!(fix(&r).time_us, Some(1_401_873_011_000_000));

        let r = query(
            "lat=60.0&lon=30.0&speed=0.0&heading=0.0&vacc=0&hacc=0&altitude=0&deviceid=123456",
        );
        assert_eq!(r.tracker_id.as_deref(), Some("123456"));
        assert_eq!(fix(&r).time_us, None);
        assert_eq!(fix(&r).metadata["vacc"], 0.0);

        let f = fix(&query("id=123456&timestamp=1377177267&location=60.0,30.0")).clone();
        assert_eq!((f.latitude, f.longitude), (60.0, 30.0));
        assert_eq!(f.time_us, Some(1_377_177_267_000_000));

        let f = fix(&query(
            "id=123456789012345&timestamp=1504763810&lat=40.7232948571&lon=-74.0061408571&bearing=7.19889788244&speed=40&ignition=true&rpm=933&fuel=24",
        ))
        .clone();
        assert_eq!(f.speed, Some(40.0 * 1.852));
        assert_eq!(f.heading, Some(7.19889788244));
        assert_eq!(f.metadata["ignition"], true);
        assert_eq!(f.metadata["rpm"], 933.0);

        // Cells and wifi without a position: nothing to store.
        let r = query(
            "id=123456&timestamp=1377177267&cell=257,02,16,2224&cell=257,02,16,2223,-90&wifi=00-14-22-01-23-45,-80",
        );
        assert_eq!(r.fix, Ok(None));
    }

    #[test]
    fn a_bad_number_rejects_the_point() {
        let r = query("id=1&lat=north&lon=3");
        assert_eq!(r.fix.expect_err("malformed").reason, Reason::PointMalformed);
        let r = query("id=1&lat=1&lon=3&timestamp=yesterday");
        assert_eq!(r.fix.expect_err("bad time").reason, Reason::TimeInvalid);
    }

    /// Traccar's captured background-geolocation bodies.
    #[test]
    fn the_geolocation_form_is_read() {
        let body = br#"{"location":{"timestamp":"2025-06-15T13:45:12.862Z","coords":{"latitude":37.4219983,"longitude":-122.084,"accuracy":5,"speed":0,"heading":-1,"altitude":5},"is_moving":false,"odometer":0,"event":"motionchange","battery":{"level":1,"is_charging":false},"activity":{"type":"still"},"extras":{"device_integer_twelve_test":12},"_":"&id=48241179&lat=37.4219983&lon=-122.084&timestamp=2025-06-15T13:45:12.862Z&"},"device_id":"48241179"}"#;
        let r = parse_json(body, 10).expect("parsed");
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].tracker_id.as_deref(), Some("48241179"));
        let f = fix(&r[0]);
        assert_eq!(f.time_us, Some(1_749_995_112_862_000));
        assert_eq!(
            (f.speed, f.heading, f.accuracy),
            (Some(0.0), None, Some(5.0))
        );
        assert_eq!(f.metadata["battery"], 100.0);
        assert_eq!(f.metadata["charging"], false);
        assert_eq!(f.metadata["activity"], "still");
        assert_eq!(f.metadata["event"], "motionchange");
        assert_eq!(f.metadata["device_integer_twelve_test"], 12);
        assert!(!f.metadata.contains_key("_"));

        let body = br#"{"location":{"event":"motionchange","is_moving":false,"uuid":"0e9a2473-a9a7-4c00-997b-fb97d2154e75","timestamp":"2021-07-21T08:06:34.444Z","odometer":0,"coords":{"latitude":-6.1148096,"longitude":106.6837015,"accuracy":3.8,"speed":18.67,"speed_accuracy":0.26,"heading":63,"heading_accuracy":0.28,"altitude":35.7,"altitude_accuracy":3.8},"activity":{"type":"still","confidence":100},"battery":{"is_charging":false,"level":0.79},"extras":{}},"device_id":"8737767034"}"#;
        let f = fix(&parse_json(body, 10).expect("parsed")[0]).clone();
        assert_eq!(f.speed, Some(18.67 * 3.6));
        assert_eq!(f.heading, Some(63.0));
        assert_eq!(f.metadata["battery"], 79.0);
        assert_eq!(f.metadata["speed_accuracy"], 0.26);
    }

    /// traccar-client-sdk's `uploadJson`: an array of flat objects.
    #[test]
    fn the_sdk_array_is_read_and_counted() {
        let body = br#"[{"id":"sdk-1","lat":52.5,"lon":13.4,"timestamp":1750000000,"accuracy":4.5,"speed":10.5,"bearing":90.0,"batt":55,"charge":true},{"id":"sdk-1","lat":52.6,"lon":13.5,"timestamp":1750000060}]"#;
        let r = parse_json(body, 10).expect("parsed");
        assert_eq!(r.len(), 2);
        let f = fix(&r[0]);
        assert_eq!(f.speed, Some(10.5 * 1.852));
        assert_eq!(f.metadata["battery"], 55.0);
        assert_eq!(f.metadata["charging"], true);
        assert!(matches!(parse_json(body, 1), Err(JsonError::TooMany(1))));
    }
}
