//! Locations encoded once, however many answers carry them.
//!
//! A fleet map asks for the same 10,000 latest positions again and again, and
//! 200 live subscribers may each carry the same committed point. Built and
//! encoded per answer, that is a `proto::Location` (two UUID strings, an
//! app_source, metadata) per device per call. Here each latest location keeps
//! its protobuf encoding, made on first use (and each live batch its points',
//! see `live::LiveBatch`); an answer is those encodings copied one after
//! another into one buffer, as they are found (a copy of bytes the answer has
//! to carry anyway, where holding each by a reference count cost two atomic
//! operations on a cold cache line per location).
//!
//! A track's points, read from the database for one answer, are encoded
//! straight into it, without a `proto::Location` each.
//!
//! `LiveUpdate` is `repeated Location locations = 1`, and
//! `GetLatestResponse` and `GetTrackResponse` that and a `string
//! next_cursor = 2`. On the wire that is each location as a
//! length-delimited field 1, so a message made of pre-encoded locations is
//! byte for byte the one prost would build.
//! prost cannot splice encoded submessages, hence these small hand-written
//! [`prost::Message`]s; `build.rs` maps the proto messages to them
//! (`extern_path`).

use std::sync::OnceLock;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::{
    DecodeError, Message,
    encoding::{DecodeContext, WireType, encode_key, encode_varint, skip_field},
};

use crate::{
    location::{LocationRef, ValidLocation},
    proto,
};

/// A location and, once asked for, its protobuf encoding.
#[derive(Debug)]
pub struct SharedLocation {
    pub location: ValidLocation,
    encoded: OnceLock<Box<[u8]>>,
}

impl SharedLocation {
    pub fn new(location: ValidLocation) -> Self {
        Self {
            location,
            encoded: OnceLock::new(),
        }
    }

    /// The encoded `proto::Location`, made on the first call.
    pub fn encoded(&self) -> &[u8] {
        self.encoded.get_or_init(|| {
            let mut buf = Vec::with_capacity(160);
            encode_location(&self.location.as_ref(), &mut buf);
            buf.into()
        })
    }
}

/// Appends `l` as an encoded `proto::Location`: byte for byte what prost
/// writes for [`to_proto`]'s message (fields in order, proto3 defaults left
/// out), without its four allocations.
pub fn encode_location(l: &LocationRef, buf: &mut Vec<u8>) {
    fn bytes_field(tag: u32, b: &[u8], buf: &mut Vec<u8>) {
        if !b.is_empty() {
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(b.len() as u64, buf);
            buf.put_slice(b);
        }
    }
    fn double(tag: u32, v: Option<f64>, buf: &mut Vec<u8>) {
        if let Some(v) = v {
            prost::encoding::double::encode(tag, &v, buf);
        }
    }
    prost::encoding::message::encode(1, &timestamp(l.time_us), buf);
    let mut text = uuid::Uuid::encode_buffer();
    bytes_field(
        2,
        l.device_id.hyphenated().encode_lower(&mut text).as_bytes(),
        buf,
    );
    bytes_field(
        3,
        l.user_id.hyphenated().encode_lower(&mut text).as_bytes(),
        buf,
    );
    bytes_field(4, l.app_source.as_bytes(), buf);
    double(5, Some(l.latitude).filter(|v| *v != 0.0), buf);
    double(6, Some(l.longitude).filter(|v| *v != 0.0), buf);
    double(7, l.accuracy.map(f64::from), buf);
    double(8, l.altitude.map(f64::from), buf);
    double(9, l.speed.map(f64::from), buf);
    double(10, l.heading.map(f64::from), buf);
    bytes_field(11, l.metadata.unwrap_or_default().as_bytes(), buf);
}

/// `l` as protobuf; by value, so that a track page's strings move into it.
pub fn to_proto(l: ValidLocation) -> proto::Location {
    proto::Location {
        time: Some(timestamp(l.time_us)),
        device_id: l.device_id.to_string(),
        user_id: l.user_id.to_string(),
        app_source: l.app_source,
        latitude: l.latitude,
        longitude: l.longitude,
        accuracy: l.accuracy.map(f64::from),
        altitude: l.altitude.map(f64::from),
        speed: l.speed.map(f64::from),
        heading: l.heading.map(f64::from),
        metadata_json: l.metadata.unwrap_or_default(),
    }
}

pub fn timestamp(us: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: (us.rem_euclid(1_000_000) * 1_000) as i32,
    }
}

/// `repeated Location locations = 1`, each location already encoded: the
/// Rust type of `GetLatestResponse` and `LiveUpdate`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EncodedLocations {
    /// Each location as field 1 (key, length, encoding), one after another:
    /// the message's wire form.
    wire: BytesMut,
    count: usize,
}

const LOCATIONS: u32 = 1;

/// A framed location with two UUIDs, an app_source, the four optional
/// numbers and a little metadata: about 160 bytes; metadata makes it more.
const TYPICAL_FRAMED_BYTES: usize = 192;

impl EncodedLocations {
    /// Room for `locations` of a typical size: a guess on the generous
    /// side, as a buffer that runs out of room is copied whole into one
    /// twice its size, while room never written is, in a large answer,
    /// pages never touched.
    pub fn with_capacity(locations: usize) -> Self {
        Self::with_wire_capacity(locations * TYPICAL_FRAMED_BYTES)
    }

    /// Room for `bytes` of framed locations, when the caller knows them.
    pub fn with_wire_capacity(bytes: usize) -> Self {
        Self {
            wire: BytesMut::with_capacity(bytes),
            count: 0,
        }
    }

    /// Appends one encoded `proto::Location`.
    pub fn push(&mut self, encoded: &[u8]) {
        put_framed(&mut self.wire, encoded);
        self.count += 1;
    }

    /// Appends `count` locations already framed by [`put_framed`] (see
    /// `live::LiveBatch`).
    pub fn extend_framed(&mut self, framed: &[u8], count: usize) {
        self.wire.put_slice(framed);
        self.count += count;
    }

    /// Room left in the buffer (a test checks that an update is sized
    /// exactly).
    #[cfg(test)]
    pub(crate) fn spare_capacity(&self) -> usize {
        self.wire.capacity() - self.wire.len()
    }

    /// How many locations.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The locations, decoded (for clients).
    pub fn locations(&self) -> Result<Vec<proto::Location>, DecodeError> {
        let mut wire = &self.wire[..];
        let mut out = Vec::with_capacity(self.count);
        while wire.has_remaining() {
            // Written by push, or checked by merge_field: key, length, bytes.
            prost::encoding::decode_key(&mut wire)?;
            let len = prost::encoding::decode_varint(&mut wire)? as usize;
            out.push(proto::Location::decode(&wire[..len])?);
            wire.advance(len);
        }
        Ok(out)
    }
}

/// The bytes `encoded` takes framed by [`put_framed`].
pub fn framed_len(encoded: &[u8]) -> usize {
    prost::encoding::key_len(LOCATIONS)
        + prost::encoding::encoded_len_varint(encoded.len() as u64)
        + encoded.len()
}

/// Appends one encoded `proto::Location` framed as a location of
/// [`EncodedLocations`]: field 1, its length, its bytes.
pub fn put_framed(buf: &mut impl BufMut, encoded: &[u8]) {
    encode_key(LOCATIONS, WireType::LengthDelimited, buf);
    encode_varint(encoded.len() as u64, buf);
    buf.put_slice(encoded);
}

/// A page of locations, `GetLatestResponse` and `GetTrackResponse`:
/// `repeated Location locations = 1` encoded once (see
/// [`EncodedLocations`]), then `string next_cursor = 2`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocationPage {
    pub locations: EncodedLocations,
    /// Empty on the last page.
    pub next_cursor: String,
}

const NEXT_CURSOR: u32 = 2;

impl LocationPage {
    /// The locations, decoded (for clients).
    pub fn locations(&self) -> Result<Vec<proto::Location>, DecodeError> {
        self.locations.locations()
    }
}

impl Message for LocationPage {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        self.locations.encode_raw(buf);
        if !self.next_cursor.is_empty() {
            prost::encoding::string::encode(NEXT_CURSOR, &self.next_cursor, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            NEXT_CURSOR => {
                prost::encoding::string::merge(wire_type, &mut self.next_cursor, buf, ctx)
            }
            _ => self.locations.merge_field(tag, wire_type, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        self.locations.encoded_len()
            + if self.next_cursor.is_empty() {
                0
            } else {
                prost::encoding::string::encoded_len(NEXT_CURSOR, &self.next_cursor)
            }
    }

    fn clear(&mut self) {
        self.locations.clear();
        self.next_cursor.clear();
    }
}

/// Each location encoded straight into the answer, without a
/// `proto::Location` (two UUIDs formatted into strings) each: a day's track
/// encodes faster so than through prost (load-tests/RESULTS.md, "a track
/// page's parts, and its answer encoded directly").
impl<'a> FromIterator<&'a ValidLocation> for EncodedLocations {
    fn from_iter<I: IntoIterator<Item = &'a ValidLocation>>(iter: I) -> Self {
        let iter = iter.into_iter();
        let mut out = Self::with_capacity(iter.size_hint().0);
        let mut one = Vec::with_capacity(TYPICAL_FRAMED_BYTES);
        for l in iter {
            one.clear();
            encode_location(&l.as_ref(), &mut one);
            out.push(&one);
        }
        out
    }
}

impl<'a> FromIterator<&'a SharedLocation> for EncodedLocations {
    fn from_iter<I: IntoIterator<Item = &'a SharedLocation>>(iter: I) -> Self {
        let iter = iter.into_iter();
        let mut out = Self::with_capacity(iter.size_hint().0);
        for l in iter {
            out.push(l.encoded());
        }
        out
    }
}

impl Message for EncodedLocations {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.wire);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag == LOCATIONS {
            let mut b = Bytes::new();
            prost::encoding::bytes::merge(wire_type, &mut b, buf, ctx)?;
            self.push(&b);
            Ok(())
        } else {
            skip_field(wire_type, tag, buf, ctx)
        }
    }

    fn encoded_len(&self) -> usize {
        self.wire.len()
    }

    fn clear(&mut self) {
        self.wire.clear();
        self.count = 0;
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    /// The message prost derives for `repeated Location locations = 1`.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Derived {
        #[prost(message, repeated, tag = "1")]
        locations: Vec<proto::Location>,
    }

    fn at(i: u128) -> ValidLocation {
        let example = ValidLocation::example();
        ValidLocation {
            time_us: example.time_us + i as i64,
            device_id: Uuid::from_u128(i),
            user_id: Uuid::from_u128(i + 1_000),
            accuracy: Some(5.0),
            speed: Some(12.5),
            heading: Some(90.0),
            metadata: i.is_multiple_of(2).then(|| r#"{"order":1234}"#.into()),
            ..example
        }
    }

    #[test]
    fn same_bytes_as_the_derived_message() {
        let shared: Vec<SharedLocation> = (0..5).map(|i| SharedLocation::new(at(i))).collect();
        let ours: EncodedLocations = shared.iter().collect();
        let derived = Derived {
            locations: shared
                .iter()
                .map(|s| to_proto(s.location.clone()))
                .collect(),
        };
        assert_eq!(ours.encode_to_vec(), derived.encode_to_vec());
        assert_eq!(ours.encoded_len(), derived.encoded_len());

        // And back: what a client decodes is what was stored.
        let back = EncodedLocations::decode(derived.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back.locations().unwrap(), derived.locations);
        assert_eq!(
            EncodedLocations::default().encode_to_vec(),
            Vec::<u8>::new()
        );
    }

    /// The hand-written encoder writes what prost writes, at the edges of
    /// proto3's defaults too: zero and negative zero coordinates (left out),
    /// optional values of zero (kept), empty metadata, times before 1970.
    #[test]
    fn encode_location_is_prost_byte_for_byte() {
        let base = at(3);
        let cases = [
            base.clone(),
            ValidLocation {
                latitude: 0.0,
                longitude: -0.0,
                accuracy: Some(0.0),
                altitude: Some(-12.5),
                speed: None,
                heading: Some(0.0),
                metadata: Some(String::new()),
                ..base.clone()
            },
            ValidLocation {
                time_us: -1,
                app_source: String::new(),
                metadata: Some("{\"é\":[1,2]}".into()),
                ..base.clone()
            },
            ValidLocation {
                time_us: 0,
                device_id: Uuid::nil(),
                user_id: Uuid::max(),
                ..base
            },
        ];
        for l in cases {
            let mut ours = Vec::new();
            encode_location(&l.as_ref(), &mut ours);
            assert_eq!(ours, to_proto(l.clone()).encode_to_vec(), "{l:?}");
        }
    }

    /// The message prost derives for `GetLatestResponse` and `GetTrackResponse`.
    #[derive(Clone, PartialEq, prost::Message)]
    struct DerivedPage {
        #[prost(message, repeated, tag = "1")]
        locations: Vec<proto::Location>,
        #[prost(string, tag = "2")]
        next_cursor: String,
    }

    #[test]
    fn a_location_page_is_the_derived_message_byte_for_byte() {
        let shared: Vec<SharedLocation> = (0..3).map(|i| SharedLocation::new(at(i))).collect();
        for cursor in ["", "d00000000-0000-0000-0000-000000000002"] {
            let ours = LocationPage {
                locations: shared.iter().collect(),
                next_cursor: cursor.into(),
            };
            let derived = DerivedPage {
                locations: shared
                    .iter()
                    .map(|s| to_proto(s.location.clone()))
                    .collect(),
                next_cursor: cursor.into(),
            };
            assert_eq!(ours.encode_to_vec(), derived.encode_to_vec());
            assert_eq!(ours.encoded_len(), derived.encoded_len());
            let back = LocationPage::decode(derived.encode_to_vec().as_slice()).unwrap();
            assert_eq!(back.locations().unwrap(), derived.locations);
            assert_eq!(back.next_cursor, cursor);
        }
        let direct: EncodedLocations = shared.iter().map(|s| &s.location).collect();
        assert_eq!(direct, shared.iter().collect::<EncodedLocations>());
        let framed: usize = shared.iter().map(|s| framed_len(s.encoded())).sum();
        let all: EncodedLocations = shared.iter().collect();
        assert_eq!(framed, all.encoded_len());
    }

    #[test]
    fn unknown_fields_are_skipped_and_bad_locations_refused() {
        let mut wire = Derived {
            locations: vec![to_proto(at(1))],
        }
        .encode_to_vec();
        // field 2 (varint 7), as a newer server might add
        wire.extend_from_slice(&[2 << 3, 7]);
        let m = EncodedLocations::decode(wire.as_slice()).unwrap();
        assert_eq!(m.locations().unwrap().len(), 1);

        let mut bad = EncodedLocations::default();
        bad.push(&[0xff]);
        assert!(bad.locations().is_err());
    }
}
