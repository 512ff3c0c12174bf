//! Publishing: every committed batch, once, by the instance that committed
//! it. The writer hands its newly stored rows over as it commits them
//! ([`Publisher::offer`], which never waits); a task publishes them in
//! order, each until JetStream has stored it. Acknowledgements to clients
//! never wait for NATS: while it is away, batches wait in a bounded buffer;
//! past it they are dropped, and once NATS answers again a resync message
//! tells the other instances to refill their view from the database.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::wire::{self, Outgoing};
use crate::{
    metrics::{CLUSTER_PUBLISH_BUFFER_BYTES, CLUSTER_PUBLISHED, CLUSTER_UNPUBLISHED},
    pipeline::{PointKey, Submission},
};

/// How long one publish may wait for JetStream's acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait between two tries while NATS is away.
const MOST_BACKOFF: Duration = Duration::from_secs(2);

/// The writer's side: hands committed rows to the publishing task.
#[derive(Debug)]
pub struct Publisher {
    tx: mpsc::UnboundedSender<Outgoing>,
    shared: Arc<Shared>,
    prefix: String,
}

#[derive(Debug)]
struct Shared {
    /// Payload bytes waiting, and their bound.
    queued: AtomicUsize,
    most: usize,
    /// Some batch was dropped since the last resync message.
    dropped: AtomicBool,
    /// The largest message the server takes.
    max_payload: AtomicUsize,
}

impl Publisher {
    /// Queues the newly stored rows of a committed flush; drops them (and
    /// says a resync is due) when the buffer is full.
    pub fn offer(&self, subs: &[Submission], inserted: Option<&foldhash::HashSet<PointKey>>) {
        let max_payload = self.shared.max_payload.load(Ordering::Relaxed);
        for out in wire::batches(subs, inserted, &self.prefix, max_payload) {
            let len = out.payload.len();
            let fits = self
                .shared
                .queued
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                    (q + len <= self.shared.most).then_some(q + len)
                })
                .is_ok();
            if !fits || self.tx.send(out.clone()).is_err() {
                if fits {
                    self.shared.queued.fetch_sub(len, Ordering::AcqRel);
                }
                self.shared.dropped.store(true, Ordering::Release);
                metrics::counter!(CLUSTER_UNPUBLISHED).increment(out.points.into());
            }
        }
        metrics::gauge!(CLUSTER_PUBLISH_BUFFER_BYTES)
            .set(self.shared.queued.load(Ordering::Acquire) as f64);
    }
}

/// The publishing task's state.
pub struct Task {
    rx: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
    js: jetstream::Context,
    instance: String,
    prefix: String,
    serial: AtomicU64,
    /// The serial of the resync message being tried (0: none): every try
    /// of one resync is the same message, as a batch's are. A try that
    /// timed out while NATS was away is still sent when the client
    /// reconnects: were each try a message of its own, every other
    /// instance would refill once per try.
    resync_serial: AtomicU64,
}

/// A publisher and the task that publishes what it queues.
pub fn channel(
    js: jetstream::Context,
    instance: String,
    prefix: String,
    buffer_bytes: usize,
) -> (Publisher, Task) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        most: buffer_bytes,
        dropped: AtomicBool::new(false),
        max_payload: AtomicUsize::new(1024 * 1024),
    });
    let publisher = Publisher {
        tx,
        shared: Arc::clone(&shared),
        prefix: prefix.clone(),
    };
    let task = Task {
        rx,
        shared,
        js,
        instance,
        prefix,
        serial: AtomicU64::new(0),
        resync_serial: AtomicU64::new(0),
    };
    (publisher, task)
}

impl Task {
    /// Publishes until `stop`; then, within `grace`, what is still queued.
    pub async fn run(
        mut self,
        client: async_nats::Client,
        stop: CancellationToken,
        grace: Duration,
    ) {
        loop {
            let out = tokio::select! {
                out = self.rx.recv() => out,
                _ = stop.cancelled() => break,
            };
            let Some(out) = out else { return };
            self.learn_max_payload(&client);
            let serial = self.next_serial();
            if !self.publish_until_stored(&out, serial, &stop).await {
                self.release(&out, false);
                break;
            }
            self.release(&out, true);
        }
        // Stopped once the pipeline drained: what it committed last is
        // published if NATS answers in time.
        let deadline = tokio::time::Instant::now() + grace;
        while let Ok(out) = self.rx.try_recv() {
            let serial = self.next_serial();
            let sent = tokio::time::timeout_at(deadline, self.publish_once(&out, serial)).await;
            self.release(&out, matches!(sent, Ok(Ok(()))));
        }
    }

    fn learn_max_payload(&self, client: &async_nats::Client) {
        let max = client.server_info().max_payload;
        if max > 0 {
            self.shared.max_payload.store(max, Ordering::Relaxed);
        }
    }

    /// Tries until JetStream stored `out` (first the resync message, if one
    /// is due); false if stopped first.
    async fn publish_until_stored(
        &self,
        out: &Outgoing,
        serial: u64,
        stop: &CancellationToken,
    ) -> bool {
        let mut wait = Duration::from_millis(50);
        let mut failing = false;
        loop {
            let result = match self.resync_if_due().await {
                Ok(()) => self.publish_once(out, serial).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {
                    if failing {
                        tracing::info!("cluster: publishing committed batches again");
                    }
                    return true;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "cluster: cannot publish committed batches; they wait in the publish buffer (--nats-publish-buffer-bytes)");
                        failing = true;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return false,
            }
            wait = (wait * 2).min(MOST_BACKOFF);
        }
    }

    async fn resync_if_due(&self) -> Result<(), async_nats::Error> {
        if !self.shared.dropped.load(Ordering::Acquire) {
            return Ok(());
        }
        let serial = match self.resync_serial.load(Ordering::Relaxed) {
            0 => {
                let s = self.next_serial();
                self.resync_serial.store(s, Ordering::Relaxed);
                s
            }
            s => s,
        };
        let headers = wire::headers(&self.instance, serial, None);
        self.send(wire::resync_subject(&self.prefix), headers, Bytes::new())
            .await?;
        self.resync_serial.store(0, Ordering::Relaxed);
        self.shared.dropped.store(false, Ordering::Release);
        tracing::warn!(
            "cluster: some committed batches were never published; the other instances were told to refill their view from the database"
        );
        Ok(())
    }

    /// Publishes `out` as the instance's `serial`th message: the same
    /// serial on every try, so that JetStream stores a retried message
    /// once (a try that timed out may still arrive), and no other message
    /// with it.
    async fn publish_once(&self, out: &Outgoing, serial: u64) -> Result<(), async_nats::Error> {
        let headers = wire::headers(&self.instance, serial, Some(out.points));
        self.send(out.subject.clone(), headers, out.payload.clone())
            .await?;
        metrics::counter!(CLUSTER_PUBLISHED).increment(out.points.into());
        Ok(())
    }

    fn next_serial(&self) -> u64 {
        self.serial.fetch_add(1, Ordering::Relaxed) + 1
    }

    async fn send(
        &self,
        subject: String,
        headers: async_nats::HeaderMap,
        payload: Bytes,
    ) -> Result<(), async_nats::Error> {
        let ack = self
            .js
            .publish_with_headers(subject, headers, payload)
            .await?;
        tokio::time::timeout(ACK_TIMEOUT, ack)
            .await
            .map_err(|_| "no acknowledgement from JetStream in time")??;
        Ok(())
    }

    /// `out` left the buffer: published, or given up at shutdown.
    fn release(&self, out: &Outgoing, published: bool) {
        self.shared
            .queued
            .fetch_sub(out.payload.len(), Ordering::AcqRel);
        if !published {
            metrics::counter!(CLUSTER_UNPUBLISHED).increment(out.points.into());
        }
        metrics::gauge!(CLUSTER_PUBLISH_BUFFER_BYTES)
            .set(self.shared.queued.load(Ordering::Acquire) as f64);
    }
}
