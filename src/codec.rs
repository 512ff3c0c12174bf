//! gRPC messages as bytes on the server's side: a request looked at before
//! it is decoded ([`RawRequests`], for `WriteLocations`), its points
//! counted from its fields' keys and lengths ([`count_field`]). The
//! clients that send and take bytes are the load tests'
//! (`load-tests/src/raw_calls.rs`).

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};
use tonic_prost::ProstEncoder;

/// The server's codec of an rpc whose request it takes as bytes and whose
/// answer `R` prost encodes.
pub struct RawRequests<R>(PhantomData<R>);

impl<R> Default for RawRequests<R> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<R: Message + Send + 'static> Codec for RawRequests<R> {
    type Encode = R;
    type Decode = Bytes;
    type Encoder = ProstEncoder<R>;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawBytes
    }
}

/// A message as its bytes, either way: received without a copy (a slice of
/// the receive buffer), or sent as encoded beforehand.
#[derive(Debug, Default, Clone, Copy)]
pub struct RawBytes;

impl Decoder for RawBytes {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Encoder for RawBytes {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

/// How many length-delimited fields `tag` the encoded message `raw` holds,
/// read from its fields' keys and lengths without decoding them; `None` if
/// `raw` is not a well-formed sequence of fields. For a message that prost
/// decodes, with `tag` a repeated message or string field, this is its
/// length: prost skips unknown fields as this does, and fails on field
/// `tag` of another wire type.
pub fn count_field(mut raw: &[u8], tag: u32) -> Option<usize> {
    use prost::encoding::{WireType, decode_key, decode_varint};
    let mut count = 0;
    while !raw.is_empty() {
        let (key, wire) = decode_key(&mut raw).ok()?;
        match wire {
            WireType::Varint => {
                decode_varint(&mut raw).ok()?;
            }
            WireType::SixtyFourBit => raw = raw.get(8..)?,
            WireType::ThirtyTwoBit => raw = raw.get(4..)?,
            WireType::LengthDelimited => {
                let len = usize::try_from(decode_varint(&mut raw).ok()?).ok()?;
                raw = raw.get(len..)?;
                count += usize::from(key == tag);
            }
            // Groups: prost fails on them in locus's messages, and so does this.
            WireType::StartGroup | WireType::EndGroup => return None,
        }
    }
    Some(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Location, SubscribeRequest};

    /// A LiveUpdate's locations (field 1), as the benchmark's subscribers
    /// count them, against what prost decodes.
    #[test]
    fn count_field_counts_one_field_of_any_message() {
        #[derive(Clone, PartialEq, prost::Message)]
        struct Update {
            #[prost(message, repeated, tag = "1")]
            locations: Vec<Location>,
        }
        for n in [0, 1, 3] {
            let raw = Update {
                locations: vec![Location::default(); n],
            }
            .encode_to_vec();
            assert_eq!(count_field(&raw, 1), Some(n));
            assert_eq!(count_field(&raw, 2), Some(0));
            assert_eq!(Update::decode(&raw[..]).unwrap().locations.len(), n);
        }
        let raw = SubscribeRequest {
            device_ids: vec!["a".into(), "b".into()],
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(count_field(&raw, 2), Some(2));
        assert_eq!(count_field(&raw[..raw.len() - 1], 2), None);
    }
}
