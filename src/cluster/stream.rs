//! The JetStream stream of committed batches: created when missing, its
//! limits brought to the flags' when they differ.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use super::wire;
use crate::config::ClusterArgs;

/// Copies of the stream to try, in turn, when it is made: `--nats-replicas`;
/// or, for 0, three on a NATS cluster (one where it has fewer servers
/// than that) and one on a single server.
pub fn replicas(args: &ClusterArgs, client: &async_nats::Client) -> Vec<usize> {
    if args.nats_replicas > 0 {
        return vec![args.nats_replicas.into()];
    }
    if client.server_info().cluster.is_some() {
        vec![3, 1]
    } else {
        vec![1]
    }
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
        // Followers read headers, then another instance's rows by
        // sequence, from any of the stream's servers.
        allow_direct: true,
        ..Default::default()
    }
}

/// The stream, made or brought to the flags' limits.
pub async fn ensure(
    js: &jetstream::Context,
    client: &async_nats::Client,
    args: &ClusterArgs,
) -> Result<stream::Stream, async_nats::Error> {
    ensure_as(js, client, args, "--nats-max-bytes", |n| config(args, n)).await
}

/// A stream made as `want(replicas)` where missing (the replicas as
/// [`replicas`] chooses), or brought to its subjects, limits and copies
/// where they differ. Its retention cannot change: a stream of that name
/// kept otherwise is an error that says so. `bytes_flag` is the flag that
/// sets the stream's `max_bytes`, named when NATS cannot store that much.
pub async fn ensure_as(
    js: &jetstream::Context,
    client: &async_nats::Client,
    args: &ClusterArgs,
    bytes_flag: &str,
    want: impl Fn(usize) -> stream::Config,
) -> Result<stream::Stream, async_nats::Error> {
    let name = want(1).name;
    match js.get_stream(&name).await {
        Ok(mut existing) => {
            let have = existing.info().await?.config.clone();
            let mut want = want(have.num_replicas);
            if args.nats_replicas > 0 {
                want.num_replicas = args.nats_replicas.into();
            }
            if have.retention != want.retention {
                return Err(format!(
                    "the NATS stream {name} exists with retention {:?}; locus needs {:?}: delete it or name another",
                    have.retention, want.retention
                )
                .into());
            }
            let differs = have.subjects != want.subjects
                || have.max_age != want.max_age
                || have.max_bytes != want.max_bytes
                || have.num_replicas != want.num_replicas
                || have.duplicate_window != want.duplicate_window
                || have.discard != want.discard
                || have.allow_direct != want.allow_direct;
            if differs {
                tracing::info!(stream = %name, ?want.max_age, want.max_bytes, want.num_replicas, "cluster: the stream's limits updated to the flags'");
                js.update_stream(&want)
                    .await
                    .map_err(|e| explained(e, &want, bytes_flag))?;
                return Ok(js.get_stream(&name).await?);
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
            let tries = replicas(args, client);
            for (i, n) in tries.iter().enumerate() {
                let want = want(*n);
                tracing::info!(stream = %want.name, replicas = n, "cluster: creating the stream");
                match js.get_or_create_stream(&want).await {
                    Ok(s) => return Ok(s),
                    Err(e) if i + 1 < tries.len() => {
                        tracing::warn!(error = %e, replicas = n, "cluster: the NATS cluster cannot keep that many copies; trying fewer");
                    }
                    Err(e) => return Err(explained(e, &want, bytes_flag)),
                }
            }
            Err("no number of copies to try".into())
        }
        Err(e) => Err(e.into()),
    }
}

/// JetStream's refusal to reserve a stream's `max_bytes` (its store, or
/// the account's, is smaller), said with the flag that sets them; other
/// errors as they are.
fn explained(
    e: jetstream::context::CreateStreamError,
    want: &stream::Config,
    bytes_flag: &str,
) -> async_nats::Error {
    let code = match e.kind() {
        jetstream::context::CreateStreamErrorKind::JetStream(j) => Some(j.error_code()),
        _ => None,
    };
    let storage = [
        jetstream::ErrorCode::STORAGE_RESOURCES_EXCEEDED,
        jetstream::ErrorCode::INSUFFICIENT_RESOURCES,
    ];
    if code.is_some_and(|c| storage.contains(&c)) {
        return format!(
            "NATS cannot store {} bytes for the stream {} ({e}): lower {bytes_flag}, or give nats-server's JetStream more (jetstream {{ max_file_store }}, or the account's limit)",
            want.max_bytes, want.name
        )
        .into();
    }
    e.into()
}
