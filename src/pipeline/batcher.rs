//! Gathers submissions from all clients into batches for the writers.
//!
//! A batch is flushed when it is full (points or bytes), when its oldest
//! submission has waited the linger time and a writer is free, or when the
//! input ends. While every writer is busy, a lingering batch keeps growing up
//! to full, so a slow database gets fewer, larger writes.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinSet,
    time::{Instant, sleep_until},
};

use tokio_util::sync::CancellationToken;

use super::Submission;
use crate::config::PipelineArgs;

/// What the batcher needs to know. Defaults are in [`PipelineArgs`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub flush_points: usize,
    pub flush_bytes: usize,
    pub linger: Duration,
    pub writers: usize,
}

impl From<&PipelineArgs> for Settings {
    fn from(a: &PipelineArgs) -> Self {
        Self {
            flush_points: a.flush_points,
            flush_bytes: a.flush_bytes,
            linger: a.linger,
            writers: a.writers,
        }
    }
}

/// Submissions flushed together: one COPY, one transaction (a client's
/// batch is a `LocationBatch`; these are what the batcher gathers of them).
#[derive(Debug, Default)]
pub struct Flush {
    pub submissions: Vec<Submission>,
    pub points: usize,
    pub bytes: usize,
}

impl Flush {
    fn push(&mut self, sub: Submission) {
        self.points += sub.keys.len();
        self.bytes += sub.rows.len();
        self.submissions.push(sub);
    }

    fn is_empty(&self) -> bool {
        self.submissions.is_empty()
    }
}

/// Writes one batch and answers every submission in it. Never fails: errors
/// are answered to the submissions.
pub trait WriteFlush: Clone + Send + Sync + 'static {
    fn write(&self, batch: Flush) -> impl Future<Output = ()> + Send;
}

/// Runs until `rx` is closed and drained, then waits for the writes in flight.
/// Once `drain` is cancelled (shutdown), batches no longer linger: what is
/// buffered is flushed as soon as a writer is free.
pub async fn run<W: WriteFlush>(
    mut rx: mpsc::Receiver<Submission>,
    s: Settings,
    writer: W,
    drain: CancellationToken,
) {
    let writers = Arc::new(Semaphore::new(s.writers));
    let mut in_flight = JoinSet::new();
    let mut batch = Flush::default();
    // A submission that did not fit in the full batch; it opens the next one.
    let mut carry: Option<Submission> = None;
    let mut deadline: Option<Instant> = None;
    let mut input_open = true;

    loop {
        let full =
            batch.points >= s.flush_points || batch.bytes >= s.flush_bytes || carry.is_some();
        let lingered = deadline.is_some_and(|d| Instant::now() >= d) || drain.is_cancelled();
        let ready = !batch.is_empty() && (full || lingered || !input_open);
        if !input_open && batch.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            permit = Arc::clone(&writers).acquire_owned(), if ready => {
                let permit = permit.expect("the writer semaphore is never closed");
                let flushed = std::mem::take(&mut batch);
                deadline = None;
                if let Some(sub) = carry.take() {
                    deadline = Some(Instant::now() + s.linger);
                    batch.push(sub);
                }
                let writer = writer.clone();
                in_flight.spawn(async move {
                    writer.write(flushed).await;
                    drop(permit);
                });
            }
            sub = rx.recv(), if input_open && !full => match sub {
                Some(sub) => {
                    let fits = batch.is_empty()
                        || (batch.points + sub.keys.len() <= s.flush_points
                            && batch.bytes + sub.rows.len() <= s.flush_bytes);
                    if fits {
                        if batch.is_empty() {
                            deadline = Some(Instant::now() + s.linger);
                        }
                        batch.push(sub);
                    } else {
                        carry = Some(sub);
                    }
                }
                None => input_open = false,
            },
            _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() && !lingered => {}
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            _ = drain.cancelled(), if !drain.is_cancelled() => {}
        }
    }
    while in_flight.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use bytes::Bytes;
    use tokio::sync::oneshot;

    use super::*;
    use crate::pipeline::{Budget, WriteOutcome};

    /// Records when each batch was flushed and how many points it had, and
    /// takes `hold` to write.
    #[derive(Clone)]
    struct Recorder {
        flushed: Arc<Mutex<Vec<(Duration, usize)>>>,
        start: Instant,
        hold: Duration,
    }

    impl WriteFlush for Recorder {
        async fn write(&self, batch: Flush) {
            self.flushed
                .lock()
                .unwrap()
                .push((self.start.elapsed(), batch.points));
            tokio::time::sleep(self.hold).await;
            for sub in batch.submissions {
                let n = sub.keys.len() as u32;
                let _ = sub.reply.send(Ok(WriteOutcome {
                    accepted: n,
                    ..Default::default()
                }));
            }
        }
    }

    fn settings(writers: usize) -> Settings {
        Settings {
            flush_points: 10,
            flush_bytes: 1 << 20,
            linger: Duration::from_millis(50),
            writers,
        }
    }

    struct Harness {
        tx: mpsc::Sender<Submission>,
        flushed: Arc<Mutex<Vec<(Duration, usize)>>>,
        task: tokio::task::JoinHandle<()>,
        budget: Budget,
        drain: CancellationToken,
    }

    fn harness(s: Settings, hold: Duration) -> Harness {
        let flushed = Arc::new(Mutex::new(Vec::new()));
        let rec = Recorder {
            flushed: Arc::clone(&flushed),
            start: Instant::now(),
            hold,
        };
        let (tx, rx) = mpsc::channel(1024);
        let drain = CancellationToken::new();
        let task = tokio::spawn(run(rx, s, rec, drain.clone()));
        let budget = Budget::new(1 << 20, 1 << 30);
        Harness {
            tx,
            flushed,
            task,
            budget,
            drain,
        }
    }

    impl Harness {
        async fn send(
            &self,
            points: usize,
        ) -> oneshot::Receiver<Result<WriteOutcome, super::super::WriteError>> {
            let (reply, rx) = oneshot::channel();
            let reservation = self.budget.try_reserve(points, points).unwrap();
            let sub = Submission {
                rows: Bytes::from(vec![0u8; points]),
                keys: vec![(std::sync::Arc::from("app"), uuid::Uuid::nil(), 0); points],
                row_ends: (1..=points as u32).collect(),
                reply,
                reservation,
            };
            self.tx.send(sub).await.unwrap();
            rx
        }

        fn flushed(&self) -> Vec<(Duration, usize)> {
            self.flushed.lock().unwrap().clone()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_after_linger_measured_from_the_first_point() {
        let h = harness(settings(2), Duration::ZERO);
        let ack = h.send(3).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        let _ack = h.send(2).await;
        assert!(
            h.flushed().is_empty(),
            "nothing is flushed before the linger"
        );
        assert_eq!(ack.await.unwrap().unwrap().accepted, 3);
        assert_eq!(h.flushed(), vec![(Duration::from_millis(50), 5)]);
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_at_once_when_full_and_never_splits_a_submission() {
        let h = harness(settings(2), Duration::ZERO);
        let _a = h.send(6).await;
        let _b = h.send(6).await; // does not fit beside the first: starts the next batch
        let _c = h.send(4).await; // fills the second batch
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(h.flushed(), vec![(Duration::ZERO, 6), (Duration::ZERO, 10)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lingering_batch_grows_while_writers_are_busy() {
        let h = harness(settings(1), Duration::from_millis(200));
        let _a = h.send(10).await; // full: flushed at once, holds the only writer 200 ms
        tokio::time::sleep(Duration::from_millis(1)).await;
        for _ in 0..3 {
            let _ack = h.send(2).await;
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The second batch lingered past 50 ms but waited for the writer, and
        // took all three submissions when it came free.
        assert_eq!(
            h.flushed(),
            vec![(Duration::ZERO, 10), (Duration::from_millis(200), 6)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_the_linger() {
        let h = harness(settings(2), Duration::ZERO);
        let ack = h.send(4).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        h.drain.cancel();
        assert_eq!(ack.await.unwrap().unwrap().accepted, 4);
        assert_eq!(
            h.flushed(),
            vec![(Duration::from_millis(10), 4)],
            "flushed at once, not after 50 ms"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn end_of_input_flushes_without_waiting_and_waits_for_writes() {
        let h = harness(settings(2), Duration::from_millis(500));
        let ack = h.send(1).await;
        let Harness {
            tx, flushed, task, ..
        } = h;
        drop(tx);
        task.await.unwrap();
        assert_eq!(*flushed.lock().unwrap(), vec![(Duration::ZERO, 1)]);
        assert_eq!(ack.await.unwrap().unwrap().accepted, 1);
    }
}
