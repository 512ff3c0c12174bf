//! `locus.v1.Ingest` over gRPC.
//!
//! A stream is served by two tasks: a reader that validates and queues each
//! batch, and an acker that awaits the acks in the order the batches came and
//! sends them. At most `--stream-inflight` batches of a stream await their
//! ack; past that, or while the buffer is full, the stream is not read, so
//! backpressure reaches the client through HTTP/2 flow control.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures::{Future, Stream};
use prost::Message;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming, server::NamedService};
use tower::Service;

use super::{Admitted, IngestError, Ingestor, PendingAck, WhenFull};
use crate::{
    auth::Principal,
    codec::RawRequests,
    metrics::{Call, OPEN_STREAMS, REQUESTS_REFUSED},
    proto::{
        BatchAck, LocationBatch,
        ingest_server::{Ingest, IngestServer},
    },
};

/// The gRPC face of an [`Ingestor`].
#[derive(Debug, Clone)]
pub struct IngestService {
    ingestor: Ingestor,
    streams: Arc<Semaphore>,
    max_streams: usize,
    stream_inflight: usize,
    shutdown: CancellationToken,
}

impl IngestService {
    pub fn new(
        ingestor: Ingestor,
        max_streams: usize,
        stream_inflight: usize,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            ingestor,
            streams: Arc::new(Semaphore::new(max_streams)),
            max_streams,
            stream_inflight,
            shutdown,
        }
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<BatchAck, Status>> + Send>>;

#[tonic::async_trait]
impl Ingest for IngestService {
    type StreamLocationsStream = AckStream;

    async fn stream_locations(
        &self,
        request: Request<Streaming<LocationBatch>>,
    ) -> Result<Response<AckStream>, Status> {
        self.open_stream(request).await
    }

    /// Served by [`WriteLocations`] (see [`IngestRoutes`]), which refuses
    /// before decoding; here because the trait has it, and alike.
    async fn write_locations(
        &self,
        request: Request<LocationBatch>,
    ) -> Result<Response<BatchAck>, Status> {
        let caller = self.ingestor.auth.authenticate_grpc(&request).await?;
        let batch = request.into_inner();
        let admitted = self
            .ingestor
            .admit(&caller, batch.locations.len(), WhenFull::Refuse)?;
        write(&self.ingestor, admitted, &caller, batch).await
    }
}

impl IngestService {
    /// A stream of batches, decoded by tonic (the generated server) or as
    /// bytes ([`IngestRoutes`] serves it so, each counted before it is
    /// decoded).
    async fn open_stream<M: Incoming>(
        &self,
        request: Request<Streaming<M>>,
    ) -> Result<Response<AckStream>, Status> {
        if self.shutdown.is_cancelled() {
            return Err(IngestError::ShuttingDown.into());
        }
        let caller = self.ingestor.auth.authenticate_grpc(&request).await?;
        let Ok(slot) = Arc::clone(&self.streams).try_acquire_owned() else {
            metrics::counter!(REQUESTS_REFUSED, "reason" => "too_many_streams").increment(1);
            return Err(IngestError::TooManyStreams(self.max_streams).into());
        };
        let inbound = request.into_inner();
        let (pending_tx, pending_rx) = mpsc::channel(self.stream_inflight);
        let (ack_tx, ack_rx) = mpsc::channel(self.stream_inflight);
        tokio::spawn(read(
            inbound,
            caller,
            self.ingestor.clone(),
            pending_tx,
            self.shutdown.clone(),
        ));
        tokio::spawn(async move {
            metrics::gauge!(OPEN_STREAMS).increment(1.0);
            acknowledge(pending_rx, ack_tx).await;
            metrics::gauge!(OPEN_STREAMS).decrement(1.0);
            drop(slot);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(ack_rx))))
    }
}

/// A batch as it comes off a stream: admitted for its number of points,
/// then decoded.
trait Incoming: Send + 'static {
    fn admit(
        self,
        ingestor: &Ingestor,
        caller: &Principal,
        when_full: WhenFull,
    ) -> Result<(Admitted, LocationBatch), Status>;
}

impl Incoming for LocationBatch {
    fn admit(
        self,
        ingestor: &Ingestor,
        caller: &Principal,
        when_full: WhenFull,
    ) -> Result<(Admitted, LocationBatch), Status> {
        Ok((
            ingestor.admit(caller, self.locations.len(), when_full)?,
            self,
        ))
    }
}

/// Counted from its fields' keys ([`count_locations`]) and admitted before
/// it is decoded: a message of many small locations is refused for its
/// count before it becomes as many `Location`s (a 4 MiB message of empty
/// ones would be 2 million of them, some 400 MB).
impl Incoming for Bytes {
    fn admit(
        self,
        ingestor: &Ingestor,
        caller: &Principal,
        when_full: WhenFull,
    ) -> Result<(Admitted, LocationBatch), Status> {
        let decode = |raw| {
            LocationBatch::decode(raw)
                .map_err(|e: prost::DecodeError| Status::internal(e.to_string()))
        };
        // A message that does not scan is not a batch: the decode says why.
        let Some(points) = count_locations(&self) else {
            decode(self)?;
            return Err(Status::internal(
                "the batch scanned as malformed but decoded",
            ));
        };
        let admitted = ingestor.admit(caller, points, when_full)?;
        let batch = decode(self)?;
        if batch.locations.len() != points {
            return Err(Status::internal(
                "the batch decoded to another number of points than it was counted",
            ));
        }
        Ok((admitted, batch))
    }
}

/// A unary batch once admitted: validated, queued, and answered when
/// committed.
async fn write(
    ingestor: &Ingestor,
    admitted: Admitted,
    caller: &Principal,
    batch: LocationBatch,
) -> Result<Response<BatchAck>, Status> {
    let points = batch.locations.into_iter().map(Ok).collect();
    let pending = ingestor
        .ingest_admitted(
            admitted,
            caller,
            batch.batch_id,
            points,
            Call::grpc("WriteLocations"),
        )
        .await?;
    Ok(Response::new(pending.resolve().await?))
}

/// The path of the unary rpc.
pub const WRITE_LOCATIONS: &str = "/locus.v1.Ingest/WriteLocations";
/// The path of the streaming rpc.
pub const STREAM_LOCATIONS: &str = "/locus.v1.Ingest/StreamLocations";

/// `locus.v1.Ingest` as served: the generated server, but for
/// `WriteLocations` and `StreamLocations`, whose messages it takes as bytes.
#[derive(Clone)]
pub struct IngestRoutes {
    generated: IngestServer<IngestService>,
    unary: WriteLocations,
    stream: StreamLocations,
    max_message_bytes: usize,
}

impl IngestRoutes {
    pub fn new(service: IngestService, max_message_bytes: usize) -> Self {
        Self {
            unary: WriteLocations {
                ingestor: service.ingestor.clone(),
            },
            stream: StreamLocations(service.clone()),
            generated: IngestServer::new(service).max_decoding_message_size(max_message_bytes),
            max_message_bytes,
        }
    }
}

impl NamedService for IngestRoutes {
    const NAME: &'static str = crate::proto::ingest_server::SERVICE_NAME;
}

impl Service<axum::http::Request<tonic::body::Body>> for IngestRoutes {
    type Response = axum::http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::http::Request<tonic::body::Body>) -> Self::Future {
        let max = self.max_message_bytes;
        let grpc = move || {
            tonic::server::Grpc::new(RawRequests::<BatchAck>::default())
                .apply_max_message_size_config(Some(max), None)
        };
        match req.uri().path() {
            WRITE_LOCATIONS => {
                let unary = self.unary.clone();
                Box::pin(async move { Ok(grpc().unary(unary, req).await) })
            }
            STREAM_LOCATIONS => {
                let stream = self.stream.clone();
                Box::pin(async move { Ok(grpc().streaming(stream, req).await) })
            }
            _ => self.generated.call(req),
        }
    }
}

/// `WriteLocations` with its request as bytes: the caller is authenticated
/// and its points counted (without decoding them, see [`count_locations`])
/// and admitted before the batch is decoded, so that a call refused under
/// overload costs little more than its bytes' arrival.
#[derive(Clone)]
pub struct WriteLocations {
    ingestor: Ingestor,
}

impl tonic::server::UnaryService<Bytes> for WriteLocations {
    type Response = BatchAck;
    type Future = Pin<Box<dyn Future<Output = Result<Response<BatchAck>, Status>> + Send>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let ingestor = self.ingestor.clone();
        Box::pin(async move {
            let caller = ingestor.auth.authenticate_grpc(&request).await?;
            let (admitted, batch) =
                request
                    .into_inner()
                    .admit(&ingestor, &caller, WhenFull::Refuse)?;
            write(&ingestor, admitted, &caller, batch).await
        })
    }
}

/// `StreamLocations` with each message as bytes, counted before it is
/// decoded (see [`Incoming`]).
#[derive(Clone)]
pub struct StreamLocations(IngestService);

impl tonic::server::StreamingService<Bytes> for StreamLocations {
    type Response = BatchAck;
    type ResponseStream = AckStream;
    type Future = Pin<Box<dyn Future<Output = Result<Response<AckStream>, Status>> + Send>>;

    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.open_stream(request).await })
    }
}

/// How many `locations` (field 2) a `LocationBatch` holds, read from its
/// fields' keys and lengths without decoding them; `None` if `raw` is not
/// a well-formed sequence of fields. For a message that prost decodes this
/// is its `locations.len()`: prost skips unknown fields as this does, and
/// fails on field 2 of another wire type.
pub fn count_locations(raw: &[u8]) -> Option<usize> {
    crate::codec::count_field(raw, 2)
}

/// What the reader hands the acker, in stream order.
type Pending = Result<PendingAck, Status>;

/// Reads the stream until it ends, fails, or locus shuts down. An error is
/// queued after the acks before it, and ends the stream. Each batch is
/// checked against `caller` as it is now: a token revoked while the stream
/// is open ends it.
async fn read<M: Incoming>(
    mut inbound: Streaming<M>,
    caller: Arc<Principal>,
    ingestor: Ingestor,
    pending: mpsc::Sender<Pending>,
    shutdown: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => Some(Err(IngestError::ShuttingDown.into())),
            msg = inbound.message() => match msg {
                Ok(Some(batch)) => Some(tokio::select! {
                    biased;
                    // Nothing of this batch is acknowledged; the client sends it again.
                    _ = shutdown.cancelled() => Err(IngestError::ShuttingDown.into()),
                    r = ingest(&ingestor, &caller, batch) => r,
                }),
                Ok(None) => None,
                Err(status) => Some(Err(status)),
            },
        };
        let Some(item) = next else { break };
        let last = item.is_err();
        if pending.send(item).await.is_err() || last {
            break;
        }
    }
}

/// A stream's batch: admitted, decoded, validated and queued (waiting for
/// room in the buffer).
async fn ingest<M: Incoming>(
    ingestor: &Ingestor,
    caller: &Principal,
    msg: M,
) -> Result<PendingAck, Status> {
    let (admitted, batch) = msg.admit(ingestor, caller, WhenFull::Wait)?;
    let points = batch.locations.into_iter().map(Ok).collect();
    Ok(ingestor
        .ingest_admitted(
            admitted,
            caller,
            batch.batch_id,
            points,
            Call::grpc("StreamLocations"),
        )
        .await?)
}

/// Sends each ack once its batch is committed, in order. Stops at the first
/// error, which ends the stream with that status.
async fn acknowledge(
    mut pending: mpsc::Receiver<Pending>,
    acks: mpsc::Sender<Result<BatchAck, Status>>,
) {
    while let Some(item) = pending.recv().await {
        let ack = match item {
            Ok(p) => p.resolve().await.map_err(Status::from),
            Err(status) => Err(status),
        };
        let last = ack.is_err();
        if acks.send(ack).await.is_err() || last {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Location;

    fn batch(points: usize) -> LocationBatch {
        LocationBatch {
            batch_id: 7,
            locations: (0..points)
                .map(|i| Location {
                    device_id: format!("d{i}"),
                    latitude: i as f64,
                    metadata_json: "{}".into(),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn counting_the_locations_agrees_with_prost() {
        for points in [0, 1, 2, 500] {
            let raw = batch(points).encode_to_vec();
            assert_eq!(count_locations(&raw), Some(points));
            assert_eq!(
                LocationBatch::decode(&raw[..]).unwrap().locations.len(),
                points
            );
        }
        // Unknown fields of every wire type are skipped, by both.
        let mut raw = batch(3).encode_to_vec();
        for (key, body) in [
            (3 << 3, &[0x96, 0x01][..]),       // varint
            ((4 << 3) | 1, &[0; 8][..]),       // 64-bit
            ((5 << 3) | 5, &[0; 4][..]),       // 32-bit
            ((6 << 3) | 2, &[2, 0xff, 0][..]), // bytes, not UTF-8
        ] {
            raw.push(key);
            raw.extend_from_slice(body);
        }
        assert_eq!(count_locations(&raw), Some(3));
        assert_eq!(LocationBatch::decode(&raw[..]).unwrap().locations.len(), 3);
    }

    #[test]
    fn what_does_not_scan_does_not_decode() {
        let raw = batch(2).encode_to_vec();
        // Cut inside the last location.
        let cut = &raw[..raw.len() - 3];
        assert_eq!(count_locations(cut), None);
        assert!(LocationBatch::decode(cut).is_err());
        // A length past the end.
        let long = [(2 << 3) | 2, 10, 0];
        assert_eq!(count_locations(&long), None);
        assert!(LocationBatch::decode(&long[..]).is_err());
        // A group.
        let group = [(2 << 3) | 3];
        assert_eq!(count_locations(&group), None);
        assert!(LocationBatch::decode(&group[..]).is_err());
    }

    /// Field 2 of another wire type: prost fails on it, so the count (which
    /// passes over it) is never used for a batch.
    #[test]
    fn field_two_of_another_wire_type_does_not_decode() {
        let raw = [2 << 3, 1];
        assert_eq!(count_locations(&raw), Some(0));
        assert!(LocationBatch::decode(&raw[..]).is_err());
    }
}
