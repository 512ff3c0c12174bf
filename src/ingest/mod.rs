//! Receiving points: validation, the hand-off to the pipeline and the
//! acknowledgement, shared by every transport; the gRPC service, HTTP
//! JSON, and the tracking apps' own HTTP forms ([`trackers`]). Their
//! errors become statuses and answers in [`crate::status`].

pub mod grpc;
pub mod http;
pub mod jsonb;
pub mod mqtt;
pub mod trackers;
pub mod validate;

/// Every HTTP ingest route, sharing one body budget.
pub fn router(
    ingestor: Ingestor,
    registry: crate::trackers::Registry,
    limits: &crate::config::LimitArgs,
) -> axum::Router {
    let body = http::BodyLimits::new(limits);
    http::router(ingestor.clone(), body.clone()).merge(trackers::router(ingestor, registry, body))
}

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use crate::{
    auth::{Auth, AuthError, Principal},
    ingest_log::append::{Appended, Appender, Appending, LogError},
    location::{Reason, Rejection, reject},
    metrics::{
        ACK_LATENCY, Call, POINTS_ACCEPTED, POINTS_DUPLICATE, POINTS_RECEIVED, POINTS_REJECTED,
        REQUESTS_REFUSED,
    },
    pipeline::{Budget, Pipeline, Refused, SubmissionBuilder, WriteError, WriteOutcome},
    proto,
};
use validate::Validator;

/// Why an HTTP body was refused before its points were read. Answered in
/// [`crate::status::http`].
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the body is over {0} bytes (--max-message-bytes)")]
    TooLargeAsSent(usize),
    #[error("too many bodies are being decoded at once (--max-decoding-bytes); retry shortly")]
    DecodingBusy,
    #[error("the body is not valid gzip: {0}")]
    BadGzip(std::io::Error),
    #[error("the body is over {0} bytes once decompressed")]
    TooLarge(usize),
    #[error("Content-Encoding {0:?} is not supported; send identity or gzip")]
    Encoding(String),
    #[error("the body must be a JSON object {{\"batch_id\", \"locations\": [...]}}: {0}")]
    BadJson(serde_json::Error),
}

/// Why a client batch was not acknowledged. Mapped to gRPC statuses and
/// HTTP answers in [`crate::status`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    #[error("batch has {points} points; the limit is {limit} (--max-batch-points)")]
    BatchTooLarge { points: usize, limit: usize },
    /// As `BatchTooLarge`, where the points were counted only up to the limit.
    #[error("batch has more than {limit} points (--max-batch-points)")]
    BatchOverLimit { limit: usize },
    #[error("the ingest buffer is full; retry later")]
    BufferFull,
    #[error("too many open streams (limit {0}); retry later")]
    TooManyStreams(usize),
    #[error("locus is shutting down; reconnect and send again what was not acknowledged")]
    ShuttingDown,
    #[error(transparent)]
    Write(#[from] WriteError),
    /// `--ack-after log`: the batch is not in the log.
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Auth(#[from] AuthError),
}

impl From<Refused> for IngestError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::BufferFull => IngestError::BufferFull,
            Refused::Closed => IngestError::ShuttingDown,
        }
    }
}

/// Whether a producer waits for room in the buffer (a stream, which then
/// stops being read) or is refused at once (a unary call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    Wait,
    Refuse,
}

/// Where accepted points go, and so what their acknowledgement waits for.
#[derive(Debug, Clone)]
pub enum Target {
    /// The pipeline: acknowledged once committed (`--ack-after commit`).
    Pipeline(Pipeline),
    /// The replicated log: acknowledged once JetStream stored them
    /// (`--ack-after log`); the writers take them from there.
    Log(Box<Appender>),
}

/// Validates client batches and hands their good points to the pipeline
/// or the log.
#[derive(Debug, Clone)]
pub struct Ingestor {
    validator: Validator,
    target: Target,
    /// Bounds what the points of batches not yet acknowledged hold.
    budget: Budget,
    max_batch_points: usize,
    pub auth: Auth,
}

/// A batch that passed [`Ingestor::admit`]: of so many points, and what
/// it does when the buffer is full.
#[derive(Debug)]
#[must_use]
pub struct Admitted {
    points: usize,
    when_full: WhenFull,
    received: Instant,
}

/// A client batch whose good points are in the pipeline; resolves to its ack.
#[derive(Debug)]
pub struct PendingAck {
    batch_id: u64,
    rejected: Vec<proto::Rejection>,
    outcome: Option<Outcome>,
    /// The index in the client's batch of each row written, in row order:
    /// where a row the database refuses is answered.
    row_index: Vec<u32>,
    received: Instant,
    call: Call,
}

/// What a batch's acknowledgement waits for.
enum Outcome {
    Commit(oneshot::Receiver<Result<WriteOutcome, WriteError>>),
    Log(Appending),
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Commit(_) => "Commit",
            Outcome::Log(_) => "Log",
        })
    }
}

impl Ingestor {
    /// `budget`: for [`Target::Pipeline`], the pipeline's own.
    pub fn new(
        validator: Validator,
        target: Target,
        budget: Budget,
        max_batch_points: usize,
        auth: Auth,
    ) -> Self {
        Self {
            validator,
            target,
            budget,
            max_batch_points,
            auth,
        }
    }

    /// The checks that need only the caller and how many points it sends:
    /// the batch's size, the token (revoked, role), for a unary call room in
    /// the buffer, and the token's rate limit (the points are taken from it
    /// here). Under overload most unary calls are refused
    /// here: before their points are validated and encoded (that work
    /// would come out of what the writers get), before they spend the
    /// caller's rate budget, and where the transport can count the points
    /// without decoding them (gRPC unary, [`grpc::WriteLocations`]), before
    /// they are decoded. The reservation in [`Ingestor::ingest_admitted`]
    /// still decides for the calls that pass.
    pub fn admit(
        &self,
        caller: &Principal,
        points: usize,
        when_full: WhenFull,
    ) -> Result<Admitted, IngestError> {
        let received = Instant::now();
        metrics::counter!(POINTS_RECEIVED).increment(points as u64);
        if points > self.max_batch_points {
            metrics::counter!(REQUESTS_REFUSED, "reason" => "batch_too_large").increment(1);
            return Err(IngestError::BatchTooLarge {
                points,
                limit: self.max_batch_points,
            });
        }
        self.may_write(caller, (when_full == WhenFull::Refuse).then_some(points))?;
        self.auth.take(caller, points)?;
        Ok(Admitted {
            points,
            when_full,
            received,
        })
    }

    /// For a unary call whose points cannot be counted before it is parsed
    /// (HTTP JSON): whether the caller may write at all, and whether the
    /// buffer has room for a point, before the body is decompressed and
    /// parsed. Under overload that refuses most calls for the cost of their
    /// bytes' arrival, as [`Ingestor::admit`] does for gRPC.
    /// `--max-batch-points`: transports that count points as they parse
    /// stop there.
    pub fn max_batch_points(&self) -> usize {
        self.max_batch_points
    }

    /// A batch found to be over `--max-batch-points` before it was counted
    /// whole: counted as refused.
    pub fn over_limit(&self) -> IngestError {
        metrics::counter!(REQUESTS_REFUSED, "reason" => "batch_too_large").increment(1);
        IngestError::BatchOverLimit {
            limit: self.max_batch_points,
        }
    }

    pub fn admit_unparsed(&self, caller: &Principal) -> Result<(), IngestError> {
        self.may_write(caller, Some(1))
    }

    /// The token (revoked, role) and, given a number of points, room for
    /// them in the buffer.
    fn may_write(&self, caller: &Principal, room_for: Option<usize>) -> Result<(), IngestError> {
        self.auth.check_revoked(caller)?;
        caller.require_write()?;
        if room_for.is_some_and(|points| !self.budget.has_room_for(points)) {
            metrics::counter!(REQUESTS_REFUSED, "reason" => "buffer_full").increment(1);
            return Err(IngestError::BufferFull);
        }
        Ok(())
    }

    /// Validates the points of a batch that [`Ingestor::admit`] let in, each
    /// against what the caller's token covers, and queues the good ones.
    pub async fn ingest_admitted(
        &self,
        admitted: Admitted,
        caller: &Principal,
        batch_id: u64,
        locations: Vec<Result<proto::Location, Rejection>>,
        call: Call,
    ) -> Result<PendingAck, IngestError> {
        let Admitted {
            points,
            when_full,
            received,
        } = admitted;
        debug_assert_eq!(points, locations.len(), "admitted for another count");
        let now_us = unix_micros(SystemTime::now());
        let mut rejected = Vec::new();
        let mut rows = SubmissionBuilder::with_capacity(points);
        let mut row_index = Vec::with_capacity(points);
        for (index, loc) in locations.into_iter().enumerate() {
            let checked = loc
                .and_then(|loc| self.validator.validate(loc, now_us))
                .and_then(
                    |valid| match caller.forbids(&valid.device_id, &valid.app_source) {
                        None => Ok(valid),
                        Some(why) => Err(reject(Reason::Forbidden, why)),
                    },
                );
            match checked {
                Ok(valid) => {
                    rows.push(&valid);
                    row_index.push(index as u32);
                }
                Err(r) => {
                    metrics::counter!(POINTS_REJECTED, "reason" => r.reason.code()).increment(1);
                    rejected.push(proto::Rejection {
                        index: index as u32,
                        reason: r.reason.code().to_string(),
                        message: r.message,
                    });
                }
            }
        }
        let outcome = if rows.points() == 0 {
            None
        } else {
            let reservation = match when_full {
                WhenFull::Wait => self.budget.reserve(rows.points(), rows.bytes()).await,
                WhenFull::Refuse => self.budget.try_reserve(rows.points(), rows.bytes()),
            }
            .inspect_err(|r| {
                if *r == Refused::BufferFull {
                    metrics::counter!(REQUESTS_REFUSED, "reason" => "buffer_full").increment(1);
                }
            })?;
            let (sub, rx) = rows.finish(reservation);
            Some(match &self.target {
                Target::Pipeline(pipeline) => {
                    pipeline.submit(sub).await?;
                    Outcome::Commit(rx)
                }
                Target::Log(log) => Outcome::Log(log.append(sub).await?),
            })
        };
        Ok(PendingAck {
            batch_id,
            rejected,
            outcome,
            row_index,
            received,
            call,
        })
    }
}

impl PendingAck {
    /// Waits until the batch's points are committed (or have failed).
    pub async fn resolve(self) -> Result<proto::BatchAck, IngestError> {
        let outcome = match self.outcome {
            None => WriteOutcome::default(),
            // The writer always answers; a dropped reply means the pipeline
            // was torn down before it could.
            Some(Outcome::Commit(rx)) => rx.await.map_err(|_| IngestError::ShuttingDown)??,
            // In the log: to be written. Whether some were stored before is
            // not known yet; those the log itself had (the same batch sent
            // again) are counted as duplicates.
            Some(Outcome::Log(appending)) => {
                let Appended { points, resent } = appending.await?;
                WriteOutcome {
                    accepted: points - resent,
                    duplicates: resent,
                    refused: Vec::new(),
                }
            }
        };
        let mut rejected = self.rejected;
        if !outcome.refused.is_empty() {
            let reason = Reason::RefusedByDatabase.code();
            metrics::counter!(POINTS_REJECTED, "reason" => reason)
                .increment(outcome.refused.len() as u64);
            rejected.extend(outcome.refused.into_iter().map(|r| {
                proto::Rejection {
                    index: self
                        .row_index
                        .get(r.row as usize)
                        .copied()
                        .unwrap_or(u32::MAX),
                    reason: reason.to_string(),
                    message: r.message,
                }
            }));
            rejected.sort_by_key(|r| r.index);
        }
        metrics::counter!(POINTS_ACCEPTED).increment(u64::from(outcome.accepted));
        metrics::counter!(POINTS_DUPLICATE).increment(u64::from(outcome.duplicates));
        self.call
            .record(ACK_LATENCY, self.received.elapsed().as_secs_f64());
        Ok(proto::BatchAck {
            batch_id: self.batch_id,
            accepted: outcome.accepted,
            duplicates: outcome.duplicates,
            rejected,
        })
    }
}

/// Microseconds since the Unix epoch.
pub fn unix_micros(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}
