//! gRPC calls with their messages as bytes on the client's side: a request
//! encoded beforehand ([`call_encoded`]: the load generator's retries, the
//! benchmark's repeated queries; [`stream_encoded`]: messages no client of
//! locus's types would build, the fault suite's and the tests'), an answer
//! taken as bytes too ([`call_raw`]: the benchmark times an answer received
//! apart from it decoded), and a stream's answers as bytes ([`stream_raw`]:
//! the benchmark's live subscribers, which count locations without copying
//! them, with `locus::codec::count_field`).
//!
//! The integration tests of locus compile this same file as a module of
//! theirs (`tests/common`): they cannot depend on this crate, which depends
//! on locus.

use std::marker::PhantomData;

use bytes::Bytes;
use locus::codec::{RawBytes, RawRequests};
use prost::Message;
use tonic::{
    Request, Response, Status, Streaming, codec::Codec, codegen::http::uri::PathAndQuery,
    transport::Channel,
};
use tonic_prost::ProstDecoder;

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
