//! Every metric locus exports, in one place. Names carry base units
//! (`_total`, `_seconds`, `_bytes`); no metric is labelled by device or user,
//! whose cardinality grows with the fleet.
//!
//! Other modules import the names they record by name from here; there,
//! `metrics::` is the `metrics` crate (its `counter!`, `gauge!` and
//! `histogram!`).

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const POINTS_RECEIVED: &str = "locus_points_received_total";
pub const POINTS_ACCEPTED: &str = "locus_points_accepted_total";
pub const POINTS_DUPLICATE: &str = "locus_points_duplicate_total";
/// Labelled by `reason`, the stable rejection code.
pub const POINTS_REJECTED: &str = "locus_points_rejected_total";
/// Labelled by `path`: `copy` (the fast path) or `dedup` (staging and ON CONFLICT).
pub const BATCHES_FLUSHED: &str = "locus_batches_flushed_total";
pub const BATCH_ROWS: &str = "locus_batch_rows";
pub const BATCH_BYTES: &str = "locus_batch_bytes";
pub const FLUSH_DURATION: &str = "locus_flush_duration_seconds";
pub const BUFFER_POINTS: &str = "locus_buffer_points";
pub const BUFFER_BYTES: &str = "locus_buffer_bytes";
/// Labelled by `kind` (`unavailable`, `database_transient`, `database`,
/// `other`) and `outcome` (`retried`, or `failed`: the clients got an error).
pub const WRITE_ERRORS: &str = "locus_write_errors_total";
/// Labelled by `rpc` (`StreamLocations`, `WriteLocations`) and `transport`
/// (`grpc`, `http`): see [`Call`].
pub const ACK_LATENCY: &str = "locus_ack_latency_seconds";
pub const OPEN_STREAMS: &str = "locus_open_streams";
/// Labelled by `reason` (`buffer_full`, `too_many_streams`, `batch_too_large`,
/// `decoding_busy`).
pub const REQUESTS_REFUSED: &str = "locus_requests_refused_total";

/// Open connections, labelled by `listener` (`grpc`, `http`, `metrics`).
pub const OPEN_CONNECTIONS: &str = "locus_open_connections";
/// Connections refused or closed by a limit, labelled by `listener` and
/// `reason` (the `CLOSED_*` values).
pub const CONNECTIONS_CLOSED: &str = "locus_connections_closed_total";
/// Over the listener's bound: closed as soon as accepted.
pub const CLOSED_TOO_MANY: &str = "too_many_connections";
/// No first request (HTTP), or no HTTP/2 preface (gRPC), TLS handshake
/// included, within --handshake-timeout.
pub const CLOSED_HANDSHAKE: &str = "handshake_timeout";
/// A request's headers not read within --header-read-timeout.
pub const CLOSED_HEADER: &str = "header_timeout";
/// No request in flight for --idle-timeout.
pub const CLOSED_IDLE: &str = "idle_timeout";
const LISTENERS: [&str; 3] = ["grpc", "http", "metrics"];

/// Points live subscribers lost because they fell behind.
pub const LIVE_DROPPED: &str = "locus_live_dropped_total";
pub const LIVE_SUBSCRIBERS: &str = "locus_live_subscribers";
/// Labelled by `rpc` (`GetLatest`, `GetTrack`, `GetHourlyStats`) and
/// `transport` (`grpc`, `http`): see [`Call`].
pub const QUERY_DURATION: &str = "locus_query_duration_seconds";
/// Calls refused by authentication or authorization, by reason.
pub const AUTH_REFUSED: &str = "locus_auth_refused_total";
/// Calls refused by a token's rate limit.
pub const RATE_LIMITED: &str = "locus_rate_limited_total";

/// Cluster mode (--nats-url): 1 while NATS answers this instance.
pub const CLUSTER_CONNECTED: &str = "locus_cluster_connected";
/// Batches in the stream this instance has not applied to its view yet.
pub const CLUSTER_LAG_MESSAGES: &str = "locus_cluster_lag_messages";
/// Since when this instance's view is not known to hold everything the
/// stream holds: 0 when caught up; rises while NATS is away.
pub const CLUSTER_LAG_SECONDS: &str = "locus_cluster_lag_seconds";
/// Committed points published to the stream.
pub const CLUSTER_PUBLISHED: &str = "locus_cluster_published_points_total";
/// Committed points never published (the publish buffer was full while NATS
/// was away); the other instances refill their view from the database.
pub const CLUSTER_UNPUBLISHED: &str = "locus_cluster_unpublished_points_total";
/// Points of other instances applied to this instance's view.
pub const CLUSTER_APPLIED: &str = "locus_cluster_applied_points_total";
/// Times the view was refilled from the database, by `reason` (`start`,
/// `gap`: the stream no longer held what was missed, `resync`: another
/// instance could not publish some batches, `reset`: the stream was new).
pub const CLUSTER_REFILLS: &str = "locus_cluster_refills_total";
/// Messages of the stream that were not batches of locus's (skipped).
pub const CLUSTER_BAD_MESSAGES: &str = "locus_cluster_bad_messages_total";
/// Bytes of committed batches waiting to be published.
pub const CLUSTER_PUBLISH_BUFFER_BYTES: &str = "locus_cluster_publish_buffer_bytes";

/// `--ack-after log`: points appended to the log (acknowledged to clients).
pub const LOG_APPENDED: &str = "locus_log_appended_points_total";
/// Points of client batches JetStream had already (a resend within the
/// dedup window), by message id.
pub const LOG_RESENT: &str = "locus_log_resent_points_total";
/// Messages in the log not yet written (taken by no writer, or not yet
/// acknowledged by the one that took them).
pub const LOG_BACKLOG_MESSAGES: &str = "locus_log_backlog_messages";
/// Their bytes.
pub const LOG_BACKLOG_BYTES: &str = "locus_log_backlog_bytes";
/// Their points: the messages times the mean points of a message this
/// instance has appended or written (an estimate; the log counts messages).
pub const LOG_BACKLOG_POINTS: &str = "locus_log_backlog_points";
/// Age of the oldest message in the log not yet written.
pub const LOG_OLDEST_SECONDS: &str = "locus_log_oldest_unwritten_seconds";
/// Points this instance's writers committed from the log.
pub const LOG_WRITTEN: &str = "locus_log_written_points_total";
/// Points moved to the dead-letter stream (refused by the database for
/// good, or unreadable), by reason.
pub const LOG_DEAD_LETTERED: &str = "locus_log_dead_lettered_points_total";
/// Messages in the dead-letter stream.
pub const LOG_DEAD_LETTERS: &str = "locus_log_dead_letters";
/// Messages this instance's writers took again after a first delivery
/// (another writer died or gave them back).
pub const LOG_REDELIVERED: &str = "locus_log_redelivered_messages_total";

/// MQTT ingest (--mqtt-url): 1 while the broker has accepted locus's session.
pub const MQTT_CONNECTED: &str = "locus_mqtt_connected";
/// PUBLISH messages received from the broker (a redelivery counts again).
pub const MQTT_RECEIVED: &str = "locus_mqtt_messages_received_total";
/// Of them, marked as redelivered by the broker (DUP).
pub const MQTT_REDELIVERED: &str = "locus_mqtt_messages_redelivered_total";
/// Messages whose point was committed (new or a duplicate), then acknowledged.
pub const MQTT_STORED: &str = "locus_mqtt_messages_stored_total";
/// Messages that were no location (`status`, `lwt`, ...): acknowledged, not stored.
pub const MQTT_IGNORED: &str = "locus_mqtt_messages_ignored_total";
/// Messages acknowledged without storing a point, by `reason`:
/// `unknown_tracker`, `bad_topic`, or the point's rejection reason.
pub const MQTT_DROPPED: &str = "locus_mqtt_messages_dropped_total";
/// Attempts to store a message that failed for a while (database away,
/// tracker lookup unavailable) and were tried again; the message was held.
pub const MQTT_RETRIED: &str = "locus_mqtt_retries_total";
/// Connections to the broker lost or refused.
pub const MQTT_CONNECTION_ERRORS: &str = "locus_mqtt_connection_errors_total";

/// What the `rpc` and `transport` labels of a call's histogram say: the
/// proto's name of the rpc, whichever transport carried it (an HTTP route
/// is labelled with the rpc it answers as), so that one query reads both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    pub rpc: &'static str,
    pub transport: &'static str,
}

impl Call {
    pub const fn grpc(rpc: &'static str) -> Self {
        Self {
            rpc,
            transport: "grpc",
        }
    }

    pub const fn http(rpc: &'static str) -> Self {
        Self {
            rpc,
            transport: "http",
        }
    }

    pub const fn mqtt(rpc: &'static str) -> Self {
        Self {
            rpc,
            transport: "mqtt",
        }
    }

    /// Records `seconds` in `histogram` with this call's labels.
    pub fn record(self, histogram: &'static str, seconds: f64) {
        metrics::histogram!(histogram, "rpc" => self.rpc, "transport" => self.transport)
            .record(seconds);
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const ROWS_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 25000.0, 50000.0,
];
const BYTES_BUCKETS: &[f64] = &[
    1024.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
];

/// Installs the process-wide Prometheus recorder once and returns its handle.
/// Servers started later in the same process (tests) share it.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(BATCH_ROWS.into()), ROWS_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(BATCH_BYTES.into()), BYTES_BUCKETS)
                })
                .expect("bucket lists are non-empty constants")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe();
            register_zeroes();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        POINTS_RECEIVED,
        "Points received from clients, before validation."
    );
    describe_counter!(POINTS_ACCEPTED, "Points newly stored and acknowledged.");
    describe_counter!(
        POINTS_DUPLICATE,
        "Points whose (app_source, device_id, time) was already stored."
    );
    describe_counter!(POINTS_REJECTED, "Points rejected by validation, by reason.");
    describe_counter!(
        BATCHES_FLUSHED,
        "Batches committed to the database, by write path."
    );
    describe_histogram!(BATCH_ROWS, "Rows per flushed batch.");
    describe_histogram!(BATCH_BYTES, "Encoded COPY bytes per flushed batch.");
    describe_histogram!(
        FLUSH_DURATION,
        "Time to write and commit one batch, retries included."
    );
    describe_gauge!(
        BUFFER_POINTS,
        "Points buffered in memory, not yet acknowledged."
    );
    describe_gauge!(
        BUFFER_BYTES,
        "Encoded bytes buffered in memory, not yet acknowledged."
    );
    describe_counter!(
        WRITE_ERRORS,
        "Failed write attempts, by kind and whether retried."
    );
    describe_histogram!(
        ACK_LATENCY,
        "From receiving a batch to sending its acknowledgement."
    );
    describe_gauge!(OPEN_STREAMS, "Open StreamLocations streams.");
    describe_counter!(
        REQUESTS_REFUSED,
        "Requests or streams refused by a limit, by reason."
    );
    describe_counter!(
        LIVE_DROPPED,
        "Points live subscribers lost because they fell behind (the oldest of their queue)."
    );
    describe_gauge!(LIVE_SUBSCRIBERS, "Open live subscriptions.");
    describe_histogram!(QUERY_DURATION, "Time to answer a query, by rpc.");
    describe_counter!(
        AUTH_REFUSED,
        "Calls refused for their credentials (unauthenticated) or role (permission_denied)."
    );
    describe_counter!(RATE_LIMITED, "Calls refused by their token's rate limit.");
    describe_gauge!(
        CLUSTER_CONNECTED,
        "1 while NATS answers this instance (cluster mode)."
    );
    describe_gauge!(
        CLUSTER_LAG_MESSAGES,
        "Batches in the stream not yet applied to this instance's view."
    );
    describe_gauge!(
        CLUSTER_LAG_SECONDS,
        "Seconds since this instance's view was last known to hold the whole stream."
    );
    describe_counter!(
        CLUSTER_PUBLISHED,
        "Committed points published to the stream."
    );
    describe_counter!(
        CLUSTER_UNPUBLISHED,
        "Committed points not published (publish buffer full); the others refill from the database."
    );
    describe_counter!(
        CLUSTER_APPLIED,
        "Points committed by other instances applied to this instance's view."
    );
    describe_counter!(
        CLUSTER_REFILLS,
        "Refills of the view from the database, by reason."
    );
    describe_counter!(
        CLUSTER_BAD_MESSAGES,
        "Messages of the stream that are no batch of locus's, skipped."
    );
    describe_gauge!(
        CLUSTER_PUBLISH_BUFFER_BYTES,
        "Bytes of committed batches waiting to be published."
    );
    describe_counter!(
        LOG_APPENDED,
        "Points appended to the log and acknowledged to clients (--ack-after log)."
    );
    describe_counter!(
        LOG_RESENT,
        "Points of resent batches the log already held (message id within the dedup window)."
    );
    describe_gauge!(LOG_BACKLOG_MESSAGES, "Messages in the log not yet written.");
    describe_gauge!(LOG_BACKLOG_BYTES, "Bytes in the log not yet written.");
    describe_gauge!(
        LOG_BACKLOG_POINTS,
        "Points in the log not yet written (estimated from the mean points of a message)."
    );
    describe_gauge!(
        LOG_OLDEST_SECONDS,
        "Age of the oldest message in the log not yet written."
    );
    describe_counter!(
        LOG_WRITTEN,
        "Points this instance's writers committed from the log."
    );
    describe_counter!(
        LOG_DEAD_LETTERED,
        "Points moved to the dead-letter stream, by reason."
    );
    describe_gauge!(LOG_DEAD_LETTERS, "Messages in the dead-letter stream.");
    describe_counter!(
        LOG_REDELIVERED,
        "Log messages this instance took after an earlier delivery."
    );
    describe_gauge!(
        MQTT_CONNECTED,
        "1 while the MQTT broker has accepted locus's session (--mqtt-url)."
    );
    describe_counter!(MQTT_RECEIVED, "MQTT messages received from the broker.");
    describe_counter!(
        MQTT_REDELIVERED,
        "MQTT messages the broker marked as redelivered."
    );
    describe_counter!(
        MQTT_STORED,
        "MQTT messages whose point was committed, then acknowledged."
    );
    describe_counter!(
        MQTT_IGNORED,
        "MQTT messages that were no location, acknowledged and not stored."
    );
    describe_counter!(
        MQTT_DROPPED,
        "MQTT messages acknowledged without storing a point, by reason."
    );
    describe_counter!(
        MQTT_RETRIED,
        "Attempts to store an MQTT message that failed and were tried again."
    );
    describe_counter!(
        MQTT_CONNECTION_ERRORS,
        "MQTT connections to the broker lost or refused."
    );
    describe_gauge!(OPEN_CONNECTIONS, "Open connections, by listener.");
    describe_counter!(
        CONNECTIONS_CLOSED,
        "Connections refused or closed by a limit, by listener and reason."
    );
}

/// Series that exist from the start at zero, so that `rate()` and the
/// dashboard see them before the first event.
fn register_zeroes() {
    use crate::location::Reason;
    for name in [
        POINTS_RECEIVED,
        POINTS_ACCEPTED,
        POINTS_DUPLICATE,
        LIVE_DROPPED,
        RATE_LIMITED,
    ] {
        metrics::counter!(name).increment(0);
    }
    for name in [
        MQTT_RECEIVED,
        MQTT_REDELIVERED,
        MQTT_STORED,
        MQTT_IGNORED,
        MQTT_RETRIED,
        MQTT_CONNECTION_ERRORS,
    ] {
        metrics::counter!(name).increment(0);
    }
    metrics::counter!(MQTT_DROPPED, "reason" => "unknown_tracker").increment(0);
    for reason in Reason::ALL {
        metrics::counter!(POINTS_REJECTED, "reason" => reason.code()).increment(0);
    }
    for path in ["copy", "dedup"] {
        metrics::counter!(BATCHES_FLUSHED, "path" => path).increment(0);
    }
    for (kind, outcome) in [
        ("unavailable", "retried"),
        ("unavailable", "failed"),
        ("database_transient", "retried"),
        ("database_transient", "failed"),
        ("database", "failed"),
        ("other", "failed"),
    ] {
        metrics::counter!(WRITE_ERRORS, "kind" => kind, "outcome" => outcome).increment(0);
    }
    for reason in [
        "buffer_full",
        "too_many_streams",
        "batch_too_large",
        "decoding_busy",
    ] {
        metrics::counter!(REQUESTS_REFUSED, "reason" => reason).increment(0);
    }
    for reason in ["unauthenticated", "permission_denied"] {
        metrics::counter!(AUTH_REFUSED, "reason" => reason).increment(0);
    }
    for listener in LISTENERS {
        metrics::gauge!(OPEN_CONNECTIONS, "listener" => listener).increment(0.0);
        let reasons: &[&str] = if listener == "grpc" {
            &[CLOSED_TOO_MANY, CLOSED_HANDSHAKE]
        } else {
            &[
                CLOSED_TOO_MANY,
                CLOSED_HANDSHAKE,
                CLOSED_HEADER,
                CLOSED_IDLE,
            ]
        };
        for reason in reasons {
            metrics::counter!(CONNECTIONS_CLOSED, "listener" => listener, "reason" => *reason)
                .increment(0);
        }
    }
    for name in [BUFFER_POINTS, BUFFER_BYTES, OPEN_STREAMS, LIVE_SUBSCRIBERS] {
        metrics::gauge!(name).increment(0.0);
    }
}
