//! The JetStream stream of committed batches: created when missing, its
//! limits brought to the flags' when they differ.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use super::wire;
use crate::config::ClusterArgs;

/// Copies of the stream when `--nats-replicas` is 0: one per server of the
/// NATS cluster this client was told of, at most 3.
pub fn replicas(args: &ClusterArgs, client: &async_nats::Client) -> usize {
    if args.nats_replicas > 0 {
        return args.nats_replicas.into();
    }
    let info = client.server_info();
    if info.cluster.is_none() {
        return 1;
    }
    // Each server advertises the client URLs of all servers of its cluster.
    info.connect_urls.len().clamp(1, 3)
}

/// The stream's configuration as the flags want it.
pub fn config(args: &ClusterArgs, replicas: usize) -> stream::Config {
    stream::Config {
        name: args.nats_stream.clone(),
        description: Some("locus: committed location batches, for the other instances".into()),
        subjects: wire::stream_subjects(&args.nats_subject_prefix),
        max_age: args.nats_max_age,
        max_bytes: i64::try_from(args.nats_max_bytes).unwrap_or(i64::MAX),
        num_replicas: replicas,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    }
}

/// The stream, made or brought to the flags' limits.
pub async fn ensure(
    js: &jetstream::Context,
    client: &async_nats::Client,
    args: &ClusterArgs,
) -> Result<stream::Stream, async_nats::Error> {
    match js.get_stream(&args.nats_stream).await {
        Ok(mut existing) => {
            let have = existing.info().await?.config.clone();
            let mut want = config(args, have.num_replicas);
            if args.nats_replicas > 0 {
                want.num_replicas = args.nats_replicas.into();
            }
            let differs = have.subjects != want.subjects
                || have.max_age != want.max_age
                || have.max_bytes != want.max_bytes
                || have.num_replicas != want.num_replicas;
            if differs {
                tracing::info!(stream = %args.nats_stream, ?want.max_age, want.max_bytes, want.num_replicas, "cluster: the stream's limits updated to the flags'");
                js.update_stream(&want).await?;
                return Ok(js.get_stream(&args.nats_stream).await?);
            }
            Ok(existing)
        }
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            let want = config(args, replicas(args, client));
            tracing::info!(stream = %want.name, replicas = want.num_replicas, "cluster: creating the stream");
            Ok(js.get_or_create_stream(want).await?)
        }
        Err(e) => Err(e.into()),
    }
}
