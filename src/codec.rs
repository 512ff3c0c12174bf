//! gRPC messages as bytes on one side of a call: a server that looks at a
//! request before decoding it ([`RawRequests`], for `WriteLocations`), and
//! a client that sends a request it encoded beforehand ([`call_encoded`]:
//! the load generator's retries, the benchmark's repeated queries).

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use tonic::{
    Request, Response, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
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
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("the channel is not ready: {e}")))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    grpc.unary(request, path, EncodedRequests(PhantomData))
        .await
}
