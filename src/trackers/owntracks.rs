//! OwnTracks' JSON (the booklet's `docs/tech/json.md`), as its apps POST
//! it in HTTP mode and publish it over MQTT: a `_type: "location"` object
//! is a point (`tst` in seconds, `lat`, `lon`, `vel` in km/h, `cog`,
//! `acc`, `alt`; `batt` into the metadata as `battery`, the rest as
//! sent); every other `_type`, and an empty body (a friend deleted), is
//! no point, and is answered as the Recorder answers it.

use serde_json::{Map, Value};

use super::{Fix, keys, number};
use crate::location::{Reason, Rejection, reject};

/// The tracker an OwnTracks identity names: `<user>/<device>`, as in the
/// MQTT topic `owntracks/<user>/<device>`.
pub fn tracker_id(user: &str, device: &str) -> String {
    format!("{user}/{device}")
}

/// The `<user>/<device>` of a topic `owntracks/<user>/<device>` (or any
/// prefix before the last two levels), as the app puts it in an HTTP
/// payload's `topic`.
pub fn tracker_of_topic(topic: &str) -> Option<String> {
    let mut levels = topic.rsplitn(3, '/');
    let device = levels.next().filter(|d| !d.is_empty())?;
    let user = levels.next().filter(|u| !u.is_empty())?;
    Some(tracker_id(user, device))
}

/// What a message holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A `location`: its point, and the `topic` it names, if any.
    Location { fix: Fix, topic: Option<String> },
    /// Anything else (`status`, `transition`, `lwt`, a card, an empty
    /// body...): acknowledged and not stored.
    Ignored,
}

/// Reads one payload.
pub fn parse(body: &[u8]) -> Result<Message, Rejection> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Message::Ignored);
    }
    let mut m: Map<String, Value> = match serde_json::from_slice(body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return Err(reject(
                Reason::PointMalformed,
                "the payload is not a JSON object",
            ));
        }
        Err(e) => {
            return Err(reject(
                Reason::PointMalformed,
                format!("the payload is not JSON: {e}"),
            ));
        }
    };
    match m.get("_type").and_then(Value::as_str) {
        Some("location") => {}
        Some("encrypted") => {
            return Err(reject(
                Reason::PointMalformed,
                "encrypted payloads are not supported: turn encryption off in the app",
            ));
        }
        _ => return Ok(Message::Ignored),
    }
    m.remove("_type");
    let mut take = |k: &str| -> Result<Option<f64>, Rejection> {
        match m.remove(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => number(&v)
                .map(Some)
                .ok_or_else(|| reject(Reason::PointMalformed, format!("{k} {v} is not a number"))),
        }
    };
    let (Some(latitude), Some(longitude)) = (take("lat")?, take("lon")?) else {
        return Err(reject(
            Reason::PointMalformed,
            "a location needs lat and lon",
        ));
    };
    let tst = take("tst")?.ok_or_else(|| reject(Reason::TimeMissing, "a location needs tst"))?;
    if !tst.is_finite() || !(0.0..1e11).contains(&tst) {
        return Err(reject(
            Reason::TimeInvalid,
            format!("tst {tst} is not seconds since 1970"),
        ));
    }
    let mut fix = Fix {
        time_us: Some((tst * 1e6).round() as i64),
        latitude,
        longitude,
        accuracy: take("acc")?,
        altitude: take("alt")?,
        speed: take("vel")?,
        heading: take("cog")?,
        metadata: Map::new(),
    };
    if let Some(batt) = take("batt")? {
        fix.metadata.insert(
            keys::BATTERY.into(),
            serde_json::Number::from_f64(batt).map_or(Value::Null, Value::Number),
        );
    }
    // bs: 0 unknown, 1 unplugged, 2 charging, 3 full.
    if let Some(bs) = m
        .get("bs")
        .and_then(number)
        .filter(|bs| (1.0..=3.0).contains(bs))
    {
        fix.metadata
            .insert(keys::CHARGING.into(), Value::Bool(bs != 1.0));
    }
    let topic = m.get("topic").and_then(Value::as_str).map(str::to_string);
    for (k, v) in m {
        if !v.is_null() {
            fix.metadata.insert(k, v);
        }
    }
    Ok(Message::Location { fix, topic })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A payload as the Android app sends it (booklet, json.md).
    #[test]
    fn a_location_is_read() {
        let body = br#"{"_type":"location","acc":13,"alt":49,"batt":79,"bs":2,"conn":"w","created_at":1702473543,"lat":48.856826,"lon":2.292713,"t":"u","tid":"jj","tst":1702473540,"vac":1,"vel":7,"cog":271,"topic":"owntracks/jane/phone","inregions":["home"],"_id":"e1b2c3"}"#;
        let Message::Location { fix, topic } = parse(body).expect("a location") else {
            panic!("not a location");
        };
        assert_eq!(topic.as_deref(), Some("owntracks/jane/phone"));
        assert_eq!(
            tracker_of_topic("owntracks/jane/phone").as_deref(),
            Some("jane/phone")
        );
        assert_eq!(fix.time_us, Some(1_702_473_540_000_000));
        assert_eq!((fix.latitude, fix.longitude), (48.856826, 2.292713));
        assert_eq!(
            (fix.accuracy, fix.altitude, fix.speed, fix.heading),
            (Some(13.0), Some(49.0), Some(7.0), Some(271.0))
        );
        assert_eq!(fix.metadata["battery"], 79.0);
        assert_eq!(fix.metadata["charging"], true);
        assert_eq!(fix.metadata["tid"], "jj");
        assert_eq!(fix.metadata["conn"], "w");
        assert_eq!(fix.metadata["inregions"][0], "home");
        assert!(!fix.metadata.contains_key("_type"));
    }

    #[test]
    fn other_types_and_empty_bodies_are_ignored() {
        for body in [
            &b""[..],
            b"  \n",
            br#"{"_type":"status","android":{}}"#,
            br#"{"_type":"transition","event":"enter"}"#,
            br#"{"_type":"lwt","tst":1}"#,
        ] {
            assert_eq!(parse(body), Ok(Message::Ignored));
        }
        assert!(parse(br#"{"_type":"encrypted","data":"x"}"#).is_err());
        assert!(parse(br#"{"_type":"location","lat":1,"lon":2}"#).is_err());
        assert!(parse(b"[1]").is_err());
    }
}
