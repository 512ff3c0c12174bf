//! Cluster mode (`--nats-url`): several `locus serve` behind a load
//! balancer share one view (each device's latest position and the live
//! feed) through a NATS JetStream stream. The database stays the truth, and
//! clients are still acknowledged after their points are committed.
//!
//! Each instance publishes every batch it commits ([`publish`], in the
//! format of [`wire`]) and follows the stream ([`follow`]), applying the
//! others' batches to its latest map and live feed. At start the stream's
//! end is read *before* the latest map is filled from the database, and
//! following starts right after it, so no point falls between the two.
//! While NATS is away, ingest and queries go on; only the view of other
//! instances' points goes stale, and `/readyz` and the metrics say so.

pub mod follow;
pub mod publish;
pub mod stream;
pub mod wire;

use std::{sync::Arc, time::Duration};

use async_nats::jetstream;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use self::follow::{Status, StatusReport};
use crate::{
    config::ClusterArgs,
    pipeline::{PointKey, Submission, writer::CommitSink},
    query::QueryState,
};

/// How long start waits for NATS before it serves without a stream
/// position (following then starts with a refill from the database).
const START_WAIT: Duration = Duration::from_secs(5);

/// The servers of `--nats-url`, and the options to connect with: where
/// they are given, credentials come with the URLs (the client would not
/// take them from there itself); logs name hosts only.
pub fn options(args: &ClusterArgs) -> (async_nats::ConnectOptions, Vec<async_nats::ServerAddr>) {
    let addrs: Vec<async_nats::ServerAddr> = args
        .nats_urls
        .iter()
        .filter_map(|u| u.parse().ok())
        .collect();
    let mut options = async_nats::ConnectOptions::new();
    if let Some(a) = addrs.iter().find(|a| a.username().is_some()) {
        let user = a.username().unwrap_or_default().to_string();
        options = options.user_and_password(user, a.password().unwrap_or_default().to_string());
    }
    (options, addrs)
}

/// One instance's part of the cluster.
#[derive(Debug)]
pub struct Cluster {
    /// This instance's id in the stream, new at each start.
    pub instance: String,
    client: async_nats::Client,
    js: jetstream::Context,
    args: ClusterArgs,
    pub status: Arc<Status>,
    /// The stream's last sequence when start read it (`None`: NATS did not
    /// answer in time).
    start_position: Option<u64>,
}

/// The tasks of a started cluster, stopped by [`Running::stop`].
#[derive(Debug)]
pub struct Running {
    stop: CancellationToken,
    publishing: JoinHandle<()>,
    following: JoinHandle<()>,
}

impl Cluster {
    /// Connects to NATS and reads where the stream ends; call it before
    /// the latest map is filled. NATS away is no error: the instance
    /// serves, and follows once NATS answers.
    pub async fn connect(args: &ClusterArgs) -> Result<Self, async_nats::ConnectError> {
        let instance = uuid::Uuid::new_v4().to_string();
        let (options, addrs) = options(args);
        let hosts: Vec<String> = addrs
            .iter()
            .map(|a| format!("{}:{}", a.host(), a.port()))
            .collect();
        let client = options
            .name(format!("locus {instance}"))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("cluster: NATS connected"),
                    async_nats::Event::Disconnected => {
                        tracing::warn!("cluster: NATS disconnected; reconnecting")
                    }
                    other => tracing::warn!(%other, "cluster: NATS"),
                }
            })
            .connect(addrs)
            .await?;
        let js = jetstream::new(client.clone());
        let start_position = match tokio::time::timeout(START_WAIT, async {
            let mut s = stream::ensure(&js, &client, args).await?;
            Ok::<_, async_nats::Error>(s.info().await?.state.last_sequence)
        })
        .await
        {
            Ok(Ok(last)) => Some(last),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cluster: the stream is not ready; serving, and following once it is");
                None
            }
            Err(_) => {
                tracing::warn!(
                    ?hosts,
                    "cluster: NATS did not answer within 5 s; serving, and following once it does"
                );
                None
            }
        };
        tracing::info!(%instance, stream = %args.nats_stream, position = ?start_position, "cluster mode");
        Ok(Self {
            instance,
            client,
            js,
            args: args.clone(),
            status: Arc::new(Status::default()),
            start_position,
        })
    }

    /// The connection and its JetStream context.
    pub fn nats(&self) -> (&async_nats::Client, &jetstream::Context) {
        (&self.client, &self.js)
    }

    /// Starts publishing and following; returns the sink the writer tells
    /// of each commit (the local view, then the stream).
    pub fn start(
        &self,
        query: Arc<QueryState>,
        pool: PgPool,
        grace: Duration,
    ) -> (Arc<dyn CommitSink>, Running) {
        let stop = CancellationToken::new();
        let (publisher, task) = publish::channel(
            self.js.clone(),
            self.instance.clone(),
            self.args.nats_subject_prefix.clone(),
            self.args.nats_publish_buffer_bytes,
        );
        let publishing = tokio::spawn(task.run(self.client.clone(), stop.clone(), grace));
        let follower = follow::Follower {
            js: self.js.clone(),
            client: self.client.clone(),
            args: self.args.clone(),
            instance: self.instance.clone(),
            query: Arc::clone(&query),
            pool,
            status: Arc::clone(&self.status),
            position: self.start_position,
        };
        let following = tokio::spawn(follower.run(stop.clone()));
        let sink = Arc::new(Sink {
            local: query,
            publisher,
        });
        let running = Running {
            stop,
            publishing,
            following,
        };
        (sink, running)
    }
}

impl Running {
    /// Stops following, and publishes what is still queued (within the
    /// grace given at start); call it once the pipeline has drained.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.following.await;
        let _ = self.publishing.await;
    }
}

/// What the writer tells of each commit: the local view first, then the
/// stream.
#[derive(Debug)]
struct Sink {
    local: Arc<QueryState>,
    publisher: publish::Publisher,
}

impl CommitSink for Sink {
    fn committed(&self, subs: &[Submission], inserted: Option<&foldhash::HashSet<PointKey>>) {
        self.local.committed(subs, inserted);
        self.publisher.offer(subs, inserted);
    }
}
