//! The edge of `--ack-after log`: a client batch's valid points appended
//! to the log, acknowledged once JetStream stored every message of it.

use std::{future::Future, pin::Pin, sync::Arc};

use async_nats::{
    HeaderMap,
    jetstream::{self, context::PublishErrorKind},
};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{Mean, partition_subject};
use crate::{
    cluster::wire::{self, Outgoing},
    metrics::{LOG_APPENDED, LOG_RESENT},
    pipeline::Submission,
};

/// Why a batch was not appended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    /// The log holds `--log-max-bytes`: the writers are behind (the
    /// database is away or slow).
    #[error("the log is full ({0}); retry later")]
    Full(String),
    /// NATS did not store the batch (away, or no answer in time).
    #[error("the log is unavailable: {0}")]
    Unavailable(String),
}

/// What JetStream said of an appended batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Appended {
    /// Points in the log now.
    pub points: u32,
    /// Of them, points of messages the log already held (the same batch
    /// sent again within the dedup window).
    pub resent: u32,
}

/// Resolves once JetStream answered for every message of a batch.
pub type Appending = Pin<Box<dyn Future<Output = Result<Appended, LogError>> + Send>>;

/// Appends client batches to the log. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Appender {
    js: jetstream::Context,
    client: async_nats::Client,
    prefix: String,
    partitions: u16,
    mean: Arc<Mean>,
}

/// The partition of `device`'s points: the same for every instance and
/// every version, so one device's points stay in one subject, in order.
pub fn partition(device: &Uuid, partitions: u16) -> u16 {
    let (hi, lo) = device.as_u64_pair();
    ((hi ^ lo) % u64::from(partitions.max(1))) as u16
}

/// A message's id: a digest of its subject and rows, so that the same rows
/// sent again are recognised by JetStream, whichever instance takes them.
pub fn message_id(out: &Outgoing) -> String {
    let digest = Sha256::new()
        .chain_update(out.subject.as_bytes())
        .chain_update([0])
        .chain_update(&out.payload)
        .finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

fn headers(out: &Outgoing) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(wire::FORMAT, wire::ROWS_FORMAT);
    h.insert(wire::POINTS, out.points.to_string().as_str());
    h.insert(wire::MSG_ID, message_id(out).as_str());
    h
}

impl Appender {
    pub fn new(
        js: jetstream::Context,
        client: async_nats::Client,
        prefix: String,
        partitions: u16,
        mean: Arc<Mean>,
    ) -> Self {
        Self {
            js,
            client,
            prefix,
            partitions,
            mean,
        }
    }

    /// The messages `sub`'s rows make: grouped by partition, each within
    /// the server's largest message.
    pub fn messages(&self, sub: &Submission) -> Vec<Outgoing> {
        let max_payload = match self.client.server_info().max_payload {
            0 => 1024 * 1024,
            n => n,
        };
        let rows = sub
            .rows()
            .map(|(range, key)| (&sub.rows[range], partition(&key.1, self.partitions)));
        wire::grouped(rows, |p| partition_subject(&self.prefix, p), max_payload)
    }

    /// Sends `sub`'s rows to the log; the returned future resolves when
    /// JetStream has stored them all (or refused). `sub` (its share of the
    /// buffer) is held until then.
    pub async fn append(&self, sub: Submission) -> Result<Appending, LogError> {
        let messages = self.messages(&sub);
        let mut acks = Vec::with_capacity(messages.len());
        for out in messages {
            let ack = self
                .js
                .publish_with_headers(out.subject.clone(), headers(&out), out.payload.clone())
                .await
                .map_err(classify)?;
            acks.push((out.points, ack));
        }
        let mean = Arc::clone(&self.mean);
        Ok(Box::pin(async move {
            let answers = futures::future::join_all(
                acks.into_iter()
                    .map(|(points, ack)| async move { (points, ack.await) }),
            )
            .await;
            drop(sub);
            let mut appended = Appended::default();
            for (points, answer) in answers {
                let ack = answer.map_err(classify)?;
                mean.record(points.into());
                appended.points += points;
                if ack.duplicate {
                    appended.resent += points;
                }
            }
            metrics::counter!(LOG_APPENDED).increment(appended.points.into());
            metrics::counter!(LOG_RESENT).increment(appended.resent.into());
            Ok(appended)
        }))
    }
}

/// A full stream (`discard: new` past its bytes) is told apart from NATS
/// being away: the first asks the client to slow down, the second to retry.
fn classify(e: jetstream::context::PublishError) -> LogError {
    let full = e.kind() == PublishErrorKind::Other
        && std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<jetstream::Error>())
            .is_some_and(|j| j.error_code() == jetstream::ErrorCode::STREAM_STORE_FAILED);
    if full {
        LogError::Full(e.to_string())
    } else {
        LogError::Unavailable(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_keeps_its_partition() {
        let d = Uuid::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        // The rule is part of the log's format: written down here.
        assert_eq!(
            partition(&d, 16),
            ((0x0123_4567_89ab_cdef_u64 ^ 0x0011_2233_4455_6677) % 16) as u16
        );
        let spread: std::collections::HashSet<u16> =
            (0..200).map(|_| partition(&Uuid::new_v4(), 16)).collect();
        assert_eq!(spread.len(), 16, "random devices reach every partition");
        assert_eq!(partition(&d, 1), 0);
    }

    #[test]
    fn the_same_rows_make_the_same_id() {
        let out = |subject: &str, payload: &'static [u8]| Outgoing {
            subject: subject.into(),
            payload: bytes::Bytes::from_static(payload),
            points: 1,
        };
        assert_eq!(
            message_id(&out("a.part.1", b"xy")),
            message_id(&out("a.part.1", b"xy"))
        );
        assert_ne!(
            message_id(&out("a.part.1", b"xy")),
            message_id(&out("a.part.2", b"xy"))
        );
        assert_ne!(
            message_id(&out("a.part.1", b"xy")),
            message_id(&out("a.part.1", b"xz"))
        );
        assert_eq!(message_id(&out("a", b"")).len(), 32);
    }
}
