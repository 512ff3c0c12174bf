//! gRPC messages as bytes on one side of a call: a server that looks at a
//! request before decoding it ([`RawRequests`], for `WriteLocations`), a
//! client that sends a request it encoded beforehand ([`call_encoded`]:
//! the load generator's retries, the benchmark's repeated queries), one that
//! also takes the answer as bytes ([`call_raw`]: the benchmark times an
//! answer received apart from it decoded), and one that takes a stream's
//! answers as bytes ([`stream_raw`]: the benchmark's live subscribers, which
//! count locations without copying them).

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use tonic::{
    Request, Response, Status, Streaming,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::Channel,
};
use tonic_prost::{ProstDecoder, ProstEncoder};

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

/// The client's side of it: the request as encoded beforehand, the answer
/// `R` decoded by prost.
struct EncodedRequests<R>(PhantomData<R>);

impl<R: Message + Default + Send + 'static> Codec for EncodedRequests<R> {
    type Encode = Bytes;
    type Decode = R;
    type Encoder = RawBytes;
    type Decoder = ProstDecoder<R>;

    fn encoder(&mut self) -> Self::Encoder {
        RawBytes
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::default()
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

/// The unary rpc at `path` (`/package.Service/Method`) with a request
/// encoded beforehand: sending it again costs no encoding.
pub async fn call_encoded<R: Message + Default + Send + 'static>(
    channel: Channel,
    path: &'static str,
    request: Request<Bytes>,
) -> Result<Response<R>, Status> {
    let (mut grpc, path) = ready(channel, path).await?;
    grpc.unary(request, path, EncodedRequests(PhantomData))
        .await
}

/// The bidirectional rpc at `path` with each request message encoded
/// beforehand, its answers decoded by prost: messages no client of locus's
/// types would build (the fault suite's, the tests').
pub async fn stream_encoded<R, S>(
    channel: Channel,
    path: &'static str,
    requests: S,
) -> Result<Response<Streaming<R>>, Status>
where
    R: Message + Default + Send + 'static,
    S: futures::Stream<Item = Bytes> + Send + 'static,
{
    let (mut grpc, path) = ready(channel, path).await?;
    grpc.streaming(Request::new(requests), path, EncodedRequests(PhantomData))
        .await
}

/// Both ways as bytes: the request encoded beforehand, the answer as received.
struct RawBoth;

impl Codec for RawBoth {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawBytes;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> Self::Encoder {
        RawBytes
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawBytes
    }
}

/// The unary rpc at `path` with a request encoded beforehand, its answer
/// as the bytes received, for the caller to decode.
pub async fn call_raw(
    channel: Channel,
    path: &'static str,
    request: Request<Bytes>,
) -> Result<Response<Bytes>, Status> {
    let (mut grpc, path) = ready(channel, path).await?;
    grpc.unary(request, path, RawBoth).await
}

/// A client on `channel` once it is ready, and `path` as tonic takes it.
async fn ready(
    channel: Channel,
    path: &'static str,
) -> Result<(tonic::client::Grpc<Channel>, PathAndQuery), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("the channel is not ready: {e}")))?;
    Ok((grpc, PathAndQuery::from_static(path)))
}

/// The server-streaming rpc at `path` with its answers as their bytes,
/// each a slice of the receive buffer (see [`count_field`]).
pub async fn stream_raw<Q: Message + Send + 'static>(
    channel: Channel,
    path: &'static str,
    request: Request<Q>,
) -> Result<Response<Streaming<Bytes>>, Status> {
    let (mut grpc, path) = ready(channel, path).await?;
    // Encodes the request with prost, decodes answers as bytes: the
    // server's codec of `WriteLocations` is the same pair.
    grpc.server_streaming(request, path, RawRequests::<Q>::default())
        .await
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
