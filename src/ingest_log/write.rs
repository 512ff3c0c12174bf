//! The writers of `--ack-after log`: every instance takes messages of the
//! log through the consumer they share, hands their rows to its pipeline,
//! and acknowledges each message only once its rows are committed. A
//! message whose rows the database refused for good leaves the log for the
//! dead letters, with the reason; one that could not be written now is
//! given back, to be taken again (here or elsewhere).

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{self, AckKind, consumer};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::oneshot;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{FROM, Mean, REASON, dead_subject};
use crate::{
    cluster::wire,
    config::{ClusterArgs, LogArgs},
    metrics::{LOG_DEAD_LETTERED, LOG_REDELIVERED, LOG_WRITTEN, POINTS_DUPLICATE},
    pipeline::{Pipeline, PointKey, Submission, WriteError, WriteOutcome, copy_encoder},
};

/// Messages asked of the server at a time.
const PULL_BATCH: usize = 256;
/// How long a message refused for now waits before it is taken again.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Longest wait between tries to reach the log.
const MOST_BACKOFF: Duration = Duration::from_secs(5);

/// One instance's writers.
#[derive(Debug, Clone)]
pub struct Writers {
    pub js: jetstream::Context,
    pub client: async_nats::Client,
    pub cluster: ClusterArgs,
    pub args: LogArgs,
    pub pipeline: Pipeline,
    pub mean: Arc<Mean>,
    pub not_made: Arc<super::NotMade>,
}

/// A message's rows, read back as the pipeline takes them.
struct Rows {
    rows: Bytes,
    keys: Vec<PointKey>,
    row_ends: Vec<u32>,
}

/// Reads a log message; `Err` says why it is no batch of locus's.
fn read(headers: Option<&async_nats::HeaderMap>, payload: Bytes) -> Result<Rows, &'static str> {
    if headers
        .and_then(|h| h.get(wire::FORMAT))
        .map(|v| v.as_str())
        != Some(wire::ROWS_FORMAT)
    {
        return Err("not of the format pgcopy-rows/1");
    }
    let ranges =
        copy_encoder::split_rows(&payload).ok_or("rows that do not read back as locations")?;
    let mut keys: Vec<PointKey> = Vec::with_capacity(ranges.len());
    for r in &ranges {
        let row = copy_encoder::read_row(&payload[r.start as usize..r.end as usize])
            .ok_or("rows that do not read back as locations")?;
        let app = match keys.last() {
            Some((app, _, _)) if **app == *row.app_source => Arc::clone(app),
            _ => Arc::from(row.app_source),
        };
        keys.push((app, row.device_id, row.time_us));
    }
    if keys.is_empty() {
        return Err("no rows");
    }
    Ok(Rows {
        row_ends: ranges.iter().map(|r| r.end).collect(),
        keys,
        rows: payload,
    })
}

impl Writers {
    /// Takes messages until `stop`; what it took and handed on is settled
    /// by tasks of `tracker`, which the caller waits for once the pipeline
    /// has drained.
    pub async fn run(self, stop: CancellationToken, tracker: TaskTracker) {
        let mut wait = Duration::from_millis(100);
        let mut failing = false;
        while !stop.is_cancelled() {
            let ensured = tokio::select! {
                c = super::ensure(&self.js, &self.client, &self.cluster, &self.args) => c,
                _ = stop.cancelled() => return,
            };
            self.not_made
                .set(ensured.as_ref().err().map(ToString::to_string));
            let result = match ensured {
                Ok(consumer) => {
                    if failing {
                        tracing::info!("log: writing from the log again");
                        failing = false;
                    }
                    wait = Duration::from_millis(100);
                    self.take_from(consumer, &stop, &tracker).await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                if !failing {
                    tracing::warn!(error = %e, "log: cannot take messages from the log; trying again");
                    failing = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return,
                }
                wait = (wait * 2).min(MOST_BACKOFF);
            }
        }
    }

    /// Takes messages from `consumer` until `stop` (`Ok`) or the server
    /// stops answering (`Err`: made anew).
    async fn take_from(
        &self,
        consumer: consumer::Consumer<consumer::pull::Config>,
        stop: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<(), async_nats::Error> {
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(PULL_BATCH)
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await?;
        loop {
            let next = tokio::select! {
                m = messages.next() => m,
                _ = stop.cancelled() => return Ok(()),
            };
            match next {
                None => return Err("the consumer's messages ended".into()),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(m)) => {
                    if !self.take(m, tracker).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Hands one message's rows to the pipeline and leaves a task to
    /// settle it; false once the pipeline is closed.
    async fn take(&self, m: jetstream::Message, tracker: &TaskTracker) -> bool {
        if m.info().is_ok_and(|i| i.delivered > 1) {
            metrics::counter!(LOG_REDELIVERED).increment(1);
        }
        let rows = match read(m.headers.as_ref(), m.payload.clone()) {
            Ok(rows) => rows,
            Err(why) => {
                let dead = self.dead_letters();
                tracker.spawn(async move {
                    let reason = format!("unreadable: {why}");
                    tracing::warn!(subject = %m.subject, %reason, "log: a message that is no batch of locus's moved to the dead letters");
                    dead.bury(&m, &[(0, m.payload.clone(), reason)], "unreadable")
                        .await;
                });
                return true;
            }
        };
        self.mean.record(rows.keys.len() as u64);
        let Ok(reservation) = self
            .pipeline
            .budget
            .reserve(rows.keys.len(), rows.rows.len())
            .await
        else {
            return false;
        };
        let (reply, rx) = oneshot::channel();
        let sub = Submission {
            rows: rows.rows,
            keys: rows.keys,
            row_ends: rows.row_ends,
            reply,
            reservation,
        };
        // Kept to cut refused rows out of, after the write.
        let rows = sub.rows.clone();
        let row_ends = sub.row_ends.clone();
        if self.pipeline.submit(sub).await.is_err() {
            return false;
        }
        let dead = self.dead_letters();
        let ack_wait = self.args.log_ack_wait;
        tracker.spawn(async move {
            let outcome = wait_for(rx, &m, ack_wait).await;
            settle(m, outcome, &rows, &row_ends, &dead).await;
        });
        true
    }

    fn dead_letters(&self) -> DeadLetters {
        DeadLetters {
            js: self.js.clone(),
            subject: dead_subject(&self.args.log_subject_prefix),
        }
    }
}

/// The pipeline's answer; meanwhile, the message is kept ours (a write
/// retried longer than `--log-ack-wait` is not redelivered elsewhere).
async fn wait_for(
    mut rx: oneshot::Receiver<Result<WriteOutcome, WriteError>>,
    m: &jetstream::Message,
    ack_wait: Duration,
) -> Option<Result<WriteOutcome, WriteError>> {
    let mut progress = tokio::time::interval(ack_wait / 3);
    progress.tick().await;
    loop {
        tokio::select! {
            r = &mut rx => return r.ok(),
            _ = progress.tick() => {
                let _ = m.ack_with(AckKind::Progress).await;
            }
        }
    }
}

/// Acknowledges a written message (its refused rows buried first), or
/// gives it back.
async fn settle(
    m: jetstream::Message,
    outcome: Option<Result<WriteOutcome, WriteError>>,
    rows: &Bytes,
    row_ends: &[u32],
    dead: &DeadLetters,
) {
    match outcome {
        Some(Ok(o)) => {
            if !o.refused.is_empty() {
                let refused: Vec<(u32, Bytes, String)> = o
                    .refused
                    .iter()
                    .map(|r| {
                        let i = r.row as usize;
                        let start = if i == 0 { 0 } else { row_ends[i - 1] as usize };
                        let end = row_ends[i] as usize;
                        (r.row, rows.slice(start..end), r.message.clone())
                    })
                    .collect();
                if !dead.bury(&m, &refused, "refused").await {
                    return;
                }
            }
            metrics::counter!(LOG_WRITTEN).increment(o.accepted.into());
            metrics::counter!(POINTS_DUPLICATE).increment(o.duplicates.into());
            let _ = m.ack().await;
        }
        Some(Err(e)) if e.is_retryable() => {
            let _ = m.ack_with(AckKind::Nak(Some(RETRY_AFTER))).await;
        }
        Some(Err(e)) => {
            // Refused as a whole, for good (not for some rows' data).
            let all = (0, rows.clone(), format!("refused by the database: {e}"));
            dead.bury(&m, &[all], "refused").await;
        }
        // The pipeline is gone (shutting down): another writer takes it.
        None => {
            let _ = m.ack_with(AckKind::Nak(None)).await;
        }
    }
}

/// Where rows the database refused for good go.
#[derive(Debug, Clone)]
struct DeadLetters {
    js: jetstream::Context,
    subject: String,
}

impl DeadLetters {
    /// Publishes each of `rows` (its index in the message, its bytes, why)
    /// as a dead letter, then acknowledges `m`. Returns whether they were
    /// stored; if not, `m` is given back to be tried again.
    async fn bury(
        &self,
        m: &jetstream::Message,
        rows: &[(u32, Bytes, String)],
        kind: &'static str,
    ) -> bool {
        for (row, bytes, reason) in rows {
            let mut h = async_nats::HeaderMap::new();
            h.insert(wire::FORMAT, wire::ROWS_FORMAT);
            h.insert(REASON, reason.as_str());
            h.insert(FROM, m.subject.as_str());
            if let Ok(info) = m.info() {
                // Buried twice (a redelivery after a lost ack), kept once.
                h.insert(
                    wire::MSG_ID,
                    format!("{}-{}-{row}", info.stream, info.stream_sequence).as_str(),
                );
            }
            let stored = match self
                .js
                .publish_with_headers(self.subject.clone(), h, bytes.clone())
                .await
            {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            };
            if !stored {
                tracing::warn!(subject = %m.subject, "log: could not store a dead letter; the message goes back to the log");
                let _ = m.ack_with(AckKind::Nak(Some(RETRY_AFTER))).await;
                return false;
            }
            let points = copy_encoder::split_rows(bytes).map_or(0, |r| r.len());
            metrics::counter!(LOG_DEAD_LETTERED, "reason" => kind).increment(points as u64);
            tracing::warn!(subject = %m.subject, row, %reason, "log: rows moved to the dead letters");
        }
        let _ = m.ack().await;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::location::ValidLocation;

    #[test]
    fn a_message_reads_back_as_the_pipeline_takes_it() {
        let mut buf = bytes::BytesMut::new();
        for t in [1, 2] {
            let loc = ValidLocation {
                time_us: t,
                ..ValidLocation::example()
            };
            copy_encoder::encode_row(&mut buf, &loc);
        }
        let payload = buf.freeze();
        let mut h = async_nats::HeaderMap::new();
        h.insert(wire::FORMAT, wire::ROWS_FORMAT);
        let rows = read(Some(&h), payload.clone()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rows.keys.iter().map(|k| k.2).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(*rows.row_ends.last().unwrap_or(&0) as usize, payload.len());
        assert!(read(None, payload.clone()).is_err());
        assert!(read(Some(&h), payload.slice(..payload.len() - 1)).is_err());
        assert!(read(Some(&h), Bytes::new()).is_err());
    }
}
