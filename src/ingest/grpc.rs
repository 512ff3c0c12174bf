//! `locus.v1.Ingest` over gRPC.
//!
//! A stream is served by two tasks: a reader that validates and queues each
//! batch, and an acker that awaits the acks in the order the batches came and
//! sends them. At most `--stream-inflight` batches of a stream await their
//! ack; past that, or while the buffer is full, the stream is not read, so
//! backpressure reaches the client through HTTP/2 flow control.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::{IngestError, Ingestor, PendingAck, WhenFull};
use crate::{
    auth::Principal,
    metrics as m,
    proto::{BatchAck, LocationBatch, ingest_server::Ingest},
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
        if self.shutdown.is_cancelled() {
            return Err(IngestError::ShuttingDown.into());
        }
        let caller = self.ingestor.auth.authenticate_grpc(&request).await?;
        let Ok(slot) = Arc::clone(&self.streams).try_acquire_owned() else {
            metrics::counter!(m::REQUESTS_REFUSED, "reason" => "too_many_streams").increment(1);
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
            metrics::gauge!(m::OPEN_STREAMS).increment(1.0);
            acknowledge(pending_rx, ack_tx).await;
            metrics::gauge!(m::OPEN_STREAMS).decrement(1.0);
            drop(slot);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(ack_rx))))
    }

    async fn write_locations(
        &self,
        request: Request<LocationBatch>,
    ) -> Result<Response<BatchAck>, Status> {
        let caller = self.ingestor.auth.authenticate_grpc(&request).await?;
        let pending = self
            .ingestor
            .ingest(
                &caller,
                request.into_inner(),
                WhenFull::Refuse,
                "grpc_unary",
            )
            .await?;
        Ok(Response::new(pending.resolve().await?))
    }
}

/// What the reader hands the acker, in stream order.
type Pending = Result<PendingAck, Status>;

/// Reads the stream until it ends, fails, or locus shuts down. An error is
/// queued after the acks before it, and ends the stream. Each batch is
/// checked against `caller` as it is now: a token revoked while the stream
/// is open ends it.
async fn read(
    mut inbound: Streaming<LocationBatch>,
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
                    r = ingestor.ingest(&caller, batch, WhenFull::Wait, "grpc_stream") => r.map_err(Status::from),
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
