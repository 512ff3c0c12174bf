//! Settings for every subcommand: flags with `DATABASE_URL` / `LOCUS_*`
//! environment fallbacks. [`ServeConfig::validate`] runs before any port is
//! bound, so a bad setting exits at once with one clear error.

use std::{net::SocketAddr, time::Duration};

use clap::{Args, ValueEnum};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "database URL must start with postgres:// or postgresql:// (got scheme {0:?}); locus never falls back to another database"
    )]
    DatabaseScheme(String),
    #[error("{name} must be at least {min} (got {value})")]
    TooSmall {
        name: &'static str,
        min: u64,
        value: u64,
    },
    #[error("{0}")]
    Inconsistent(String),
}

/// A group of flags as clap reads it from `given` alone, with no
/// environment: so each default is written once, in its `#[arg]`, and the
/// `Default` of a group is the same as the flags' by construction.
fn flag_defaults<T: Args + clap::FromArgMatches>(given: &[String]) -> T {
    let command = T::augment_args(clap::Command::new("locus")).mut_args(|a| a.env(None));
    let matches = command
        .try_get_matches_from(std::iter::once("locus".to_string()).chain(given.iter().cloned()))
        .unwrap_or_else(|e| panic!("flag defaults: {e}"));
    T::from_arg_matches(&matches).unwrap_or_else(|e| panic!("flag defaults: {e}"))
}

/// `Default` for groups of flags that have a default each.
macro_rules! default_from_flags {
    ($($group:ty),*) => {$(
        impl Default for $group {
            fn default() -> Self {
                flag_defaults(&[])
            }
        }
    )*};
}

default_from_flags!(
    StorageArgs,
    ValidationArgs,
    LimitArgs,
    ConnectionArgs,
    PipelineArgs,
    QueryArgs,
    AuthArgs,
    ClusterArgs,
    LogArgs,
    ConsoleArgs,
    MqttArgs
);

/// Where the tracking database is. Required: there is no default and no fallback.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL or TimescaleDB URL of the tracking database.
    #[arg(long = "database-url", env = "DATABASE_URL", hide_env_values = true)]
    pub url: String,
}

impl DatabaseArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let scheme = self.url.split_once("://").map(|(s, _)| s).unwrap_or("");
        if scheme != "postgres" && scheme != "postgresql" {
            return Err(ConfigError::DatabaseScheme(scheme.to_string()));
        }
        Ok(())
    }
}

/// Storage settings shared by `setup`, `serve`, `doctor` and validation.
#[derive(Debug, Clone, Args)]
pub struct StorageArgs {
    /// Width of one partition or hypertable chunk.
    #[arg(long, env = "LOCUS_CHUNK_INTERVAL", default_value = "1day", value_parser = humantime::parse_duration)]
    pub chunk_interval: Duration,
    /// How long raw points are kept. Older points are rejected at ingest (`time_too_old`).
    #[arg(long, env = "LOCUS_RAW_RETENTION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub raw_retention: Duration,
    /// TimescaleDB community edition: compress chunks older than this.
    #[arg(long, env = "LOCUS_COMPRESS_AFTER", default_value = "7days", value_parser = humantime::parse_duration)]
    pub compress_after: Duration,
    /// How long `location_hourly` rows are kept.
    #[arg(long, env = "LOCUS_HOURLY_RETENTION", default_value = "365days", value_parser = humantime::parse_duration)]
    pub hourly_retention: Duration,
    /// How often `location_hourly` is brought up to date.
    #[arg(long, env = "LOCUS_HOURLY_REFRESH_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    pub hourly_refresh_interval: Duration,
    /// How far back a refresh looks for late points. Default: the raw
    /// retention less one chunk, so no refresh ever covers dropped raw data.
    #[arg(long, env = "LOCUS_HOURLY_REFRESH_WINDOW", value_parser = humantime::parse_duration)]
    pub hourly_refresh_window: Option<Duration>,
    /// On plain PostgreSQL, how many partitions are made ahead of the current one.
    #[arg(long, env = "LOCUS_PARTITIONS_AHEAD", default_value_t = 7)]
    pub partitions_ahead: u32,
    /// TimescaleDB community edition: once TimescaleDB's scheduler has
    /// failed one of locus's policy jobs (compression, retention, the
    /// aggregate's refresh and retention) this many runs in a row, locus
    /// runs that job itself, on the job's schedule, until the scheduler
    /// succeeds with it again (0: never).
    #[arg(long, env = "LOCUS_COVER_FAILED_JOBS_AFTER", default_value_t = 3)]
    pub cover_failed_jobs_after: u32,
}

impl StorageArgs {
    /// The refresh window in effect.
    pub fn refresh_window(&self) -> Duration {
        self.hourly_refresh_window
            .unwrap_or_else(|| self.raw_retention.saturating_sub(self.chunk_interval))
    }

    /// Checks the intervals and the order of their offsets.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let hour = Duration::from_secs(3600);
        if self.chunk_interval < hour {
            return Err(ConfigError::Inconsistent(
                "--chunk-interval must be at least 1h".into(),
            ));
        }
        if self.raw_retention < self.chunk_interval {
            return Err(ConfigError::Inconsistent(
                "--raw-retention must be at least one --chunk-interval".into(),
            ));
        }
        let window = self.refresh_window();
        // The refresh ends an hour before now (the current hour is computed
        // at query time), and TimescaleDB wants two buckets beyond that.
        if window < 3 * hour || window >= self.raw_retention {
            return Err(ConfigError::Inconsistent(format!(
                "--hourly-refresh-window ({}) must be at least 3h and shorter than --raw-retention ({}): \
                 a refresh over hours whose raw points were dropped would erase their aggregates",
                human(window),
                human(self.raw_retention)
            )));
        }
        if self.hourly_retention < self.raw_retention {
            return Err(ConfigError::Inconsistent(
                "--hourly-retention must be at least --raw-retention".into(),
            ));
        }
        if self.hourly_refresh_interval < Duration::from_secs(1) {
            return Err(ConfigError::Inconsistent(
                "--hourly-refresh-interval must be at least 1s".into(),
            ));
        }
        Ok(())
    }
}

/// What a point must satisfy to be stored.
#[derive(Debug, Clone, Args)]
pub struct ValidationArgs {
    /// How far in the future a point's time may be (device clock skew).
    #[arg(long, env = "LOCUS_MAX_FUTURE_SKEW", default_value = "5m", value_parser = humantime::parse_duration)]
    pub max_future_skew: Duration,
    /// Highest plausible speed, km/h.
    #[arg(long, env = "LOCUS_MAX_SPEED_KMH", default_value_t = 1_200.0)]
    pub max_speed_kmh: f64,
    /// Longest app_source, in bytes.
    #[arg(long, env = "LOCUS_MAX_APP_SOURCE_LEN", default_value_t = 50)]
    pub max_app_source_len: usize,
    /// If set, the only app_source values accepted (comma-separated).
    #[arg(long, env = "LOCUS_APP_SOURCES", value_delimiter = ',')]
    pub app_sources: Vec<String>,
    /// Largest metadata_json, in bytes.
    #[arg(long, env = "LOCUS_MAX_METADATA_BYTES", default_value_t = 4096)]
    pub max_metadata_bytes: usize,
}

/// Memory and concurrency bounds. Every one is enforced.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "LOCUS_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Most points in one client LocationBatch.
    #[arg(long, env = "LOCUS_MAX_BATCH_POINTS", default_value_t = 10_000)]
    pub max_batch_points: usize,
    /// Most points buffered in memory and not yet acknowledged, over all clients.
    #[arg(long, env = "LOCUS_BUFFER_POINTS", default_value_t = 500_000)]
    pub buffer_points: usize,
    /// Most encoded bytes buffered in memory and not yet acknowledged.
    #[arg(long, env = "LOCUS_BUFFER_BYTES", default_value_t = 128 * 1024 * 1024)]
    pub buffer_bytes: usize,
    /// Most open StreamLocations streams.
    #[arg(long, env = "LOCUS_MAX_STREAMS", default_value_t = 20_000)]
    pub max_streams: usize,
    /// Largest HTTP ingest body after gzip decompression, in bytes (the body
    /// as sent is bounded by --max-message-bytes).
    #[arg(long, env = "LOCUS_MAX_DECOMPRESSED_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_decompressed_bytes: usize,
    /// Most bytes of HTTP ingest bodies being decompressed and parsed at
    /// once, across all requests (a gzip body counts as
    /// --max-decompressed-bytes, a plain one as its size); a request waits
    /// up to 5 s for its share, then gets 503 and Retry-After.
    #[arg(long, env = "LOCUS_MAX_DECODING_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_decoding_bytes: usize,
    /// Most batches of one stream awaiting their ack; past it the stream is not read.
    #[arg(long, env = "LOCUS_STREAM_INFLIGHT", default_value_t = 16)]
    pub stream_inflight: usize,
}

/// How many connections each listener holds, and how long one may take to
/// start and may sit idle: so that no client, before it has even
/// authenticated, can take every file descriptor of the process.
#[derive(Debug, Clone, Args)]
pub struct ConnectionArgs {
    /// Most open connections on the gRPC address; past it a new one is closed at once.
    #[arg(long, env = "LOCUS_MAX_CONNECTIONS_GRPC", default_value_t = 10_000)]
    pub max_connections_grpc: usize,
    /// Most open connections on the HTTP address.
    #[arg(long, env = "LOCUS_MAX_CONNECTIONS_HTTP", default_value_t = 2_000)]
    pub max_connections_http: usize,
    /// Most open connections on the metrics address (scrapes, health checks).
    #[arg(long, env = "LOCUS_MAX_CONNECTIONS_METRICS", default_value_t = 100)]
    pub max_connections_metrics: usize,
    /// Time from accepting a connection to its first request (HTTP) or to
    /// the end of the HTTP/2 preface (gRPC), TLS handshake included.
    #[arg(long, env = "LOCUS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// Time a client has to send a request's headers, once it began one or
    /// once the previous answer ended (HTTP/1).
    #[arg(long, env = "LOCUS_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// An HTTP connection with no request in flight for this long is closed
    /// (HTTP/1 keep-alive, HTTP/2 without streams).
    #[arg(long, env = "LOCUS_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
}

impl ConnectionArgs {
    /// File descriptors the listeners may hold at once.
    pub fn total(&self) -> u64 {
        (self.max_connections_grpc + self.max_connections_http + self.max_connections_metrics)
            as u64
    }
}

/// How buffered points become database writes.
#[derive(Debug, Clone, Args)]
pub struct PipelineArgs {
    /// Flush a batch once it holds this many points.
    #[arg(long, env = "LOCUS_FLUSH_POINTS", default_value_t = 5_000)]
    pub flush_points: usize,
    /// Flush a batch once it holds this many encoded bytes.
    #[arg(long, env = "LOCUS_FLUSH_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub flush_bytes: usize,
    /// Flush a batch once its oldest point has waited this long.
    #[arg(long, env = "LOCUS_LINGER", default_value = "20ms", value_parser = humantime::parse_duration)]
    pub linger: Duration,
    /// Batches written in parallel, each on its own connection.
    #[arg(long, env = "LOCUS_WRITERS", default_value_t = 4)]
    pub writers: usize,
    /// How long a batch is retried on transient errors before its clients get an error.
    #[arg(long, env = "LOCUS_WRITE_RETRY_DEADLINE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub write_retry_deadline: Duration,
    /// Server-side statement_timeout for each write.
    #[arg(long, env = "LOCUS_STATEMENT_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub statement_timeout: Duration,
}

/// Reads: bounds on what one query may ask.
#[derive(Debug, Clone, Args)]
pub struct QueryArgs {
    /// HTTP JSON listen address (queries, live feed, OpenAPI).
    #[arg(long, env = "LOCUS_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Widest time range of one track query.
    #[arg(long, env = "LOCUS_MAX_TRACK_SPAN", default_value = "31days", value_parser = humantime::parse_duration)]
    pub max_track_span: Duration,
    /// Points per track page when the client asks none.
    #[arg(long, env = "LOCUS_TRACK_PAGE", default_value_t = 1_000)]
    pub track_page: u32,
    /// Most points per track page.
    #[arg(long, env = "LOCUS_MAX_TRACK_PAGE", default_value_t = 10_000)]
    pub max_track_page: u32,
    /// Devices per page of a latest-positions query by app_source when the
    /// client asks none.
    #[arg(long, env = "LOCUS_LATEST_PAGE", default_value_t = 1_000)]
    pub latest_page: u32,
    /// Most positions in one latest-positions answer: devices per page, and
    /// device_ids per request.
    #[arg(long, env = "LOCUS_MAX_LATEST_PAGE", default_value_t = 10_000)]
    pub max_latest_page: u32,
    /// Most bytes of locations (as protobuf) in one latest-positions answer;
    /// a page ends early rather than pass it. The default stays under the
    /// 4 MiB that gRPC clients accept unless told otherwise.
    #[arg(long, env = "LOCUS_MAX_LATEST_BYTES", default_value_t = 4_000_000)]
    pub max_latest_bytes: usize,
    /// Widest time range of one hourly-stats query.
    #[arg(long, env = "LOCUS_MAX_STATS_SPAN", default_value = "366days", value_parser = humantime::parse_duration)]
    pub max_stats_span: Duration,
    /// Points a live subscriber may fall behind before it loses the oldest.
    #[arg(long, env = "LOCUS_LIVE_QUEUE_POINTS", default_value_t = 8_192)]
    pub live_queue_points: usize,
    /// Most live subscribers at once.
    #[arg(long, env = "LOCUS_MAX_SUBSCRIBERS", default_value_t = 1_000)]
    pub max_subscribers: usize,
    /// Most live subscribers one token may hold at once (gRPC and Server-Sent
    /// Events together), so that one token cannot take every slot.
    #[arg(long, env = "LOCUS_MAX_SUBSCRIBERS_PER_TOKEN", default_value_t = 50)]
    pub max_subscribers_per_token: usize,
    /// Least time between two live updates to one subscriber; points
    /// committed meanwhile go in the next update (0 for an update per
    /// committed batch; at most 10s).
    #[arg(long, env = "LOCUS_LIVE_INTERVAL", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub live_interval: Duration,
}

/// Whether callers must present credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// Every call carries a token (or a registered client certificate).
    Tokens,
    /// No checks at all, every caller is an admin: for local development
    /// only. locus says so loudly at start.
    Off,
}

/// Who may call, and how often.
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// `tokens` (the default) or `off` (local development only).
    #[arg(
        long = "auth",
        env = "LOCUS_AUTH",
        value_enum,
        default_value = "tokens"
    )]
    pub mode: AuthMode,
    /// How often revoked tokens are polled for: a revoked token stops
    /// working within this time, on open streams too.
    #[arg(long, env = "LOCUS_AUTH_REFRESH_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub auth_refresh_interval: Duration,
    /// Points per second that one token may write (0: no limit).
    #[arg(long, env = "LOCUS_RATE_LIMIT_POINTS", default_value_t = 5_000)]
    pub rate_limit_points: u32,
    /// Points a token may write at once above its rate; at least
    /// --max-batch-points, so that a full batch can pass.
    #[arg(long, env = "LOCUS_RATE_LIMIT_BURST", default_value_t = 20_000)]
    pub rate_limit_burst: u32,
}

/// TLS for the gRPC and HTTP listeners (rustls). The metrics listener stays
/// plain: keep it on an internal network.
#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// PEM certificate chain; with --tls-key, turns TLS on.
    #[arg(long, env = "LOCUS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "LOCUS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// PEM CA certificates of client certificates (mTLS). A client that
    /// presents one signed by them authenticates as the token it was
    /// registered with (`locus token create --client-cert`); clients
    /// without one still use bearer tokens.
    #[arg(long, env = "LOCUS_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,
}

/// The console, the pages served at `/` on the HTTP listener.
#[derive(Debug, Clone, Args)]
pub struct ConsoleArgs {
    /// Map tiles under the console's live map and tracks, as a URL with
    /// {z}, {x} and {y} (e.g. https://tile.openstreetmap.org/{z}/{x}/{y}.png);
    /// its origin is allowed in the pages' Content-Security-Policy. Off by
    /// default: the map is drawn without tiles, and the browser asks
    /// nothing of any other server.
    #[arg(long, env = "LOCUS_MAP_TILES")]
    pub map_tiles: Option<String>,
}

impl ConsoleArgs {
    fn validate(&self) -> Result<(), ConfigError> {
        self.tile_origin().map(|_| ())
    }

    /// The origin (`scheme://host[:port]`) of `--map-tiles`, if set and valid.
    pub fn tile_origin(&self) -> Result<Option<String>, ConfigError> {
        let Some(url) = self.map_tiles.as_deref() else {
            return Ok(None);
        };
        let bad = |why: &str| {
            inconsistent(format!(
                "--map-tiles {url:?} {why} (e.g. https://tile.openstreetmap.org/{{z}}/{{x}}/{{y}}.png)"
            ))
        };
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| bad("must start with https:// or http://"))?;
        let host = rest.split('/').next().unwrap_or_default();
        let host_ok = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
        if !host_ok {
            return Err(bad("must name a host (letters, digits, '.', '-', a port)"));
        }
        if url
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | ';' | ','))
        {
            return Err(bad("must not hold spaces, quotes, ';' or ','"));
        }
        for part in ["{z}", "{x}", "{y}"] {
            if !rest[host.len()..].contains(part) {
                return Err(bad(&format!("must hold {part} in its path or query")));
            }
        }
        Ok(Some(url[..url.len() - rest.len() + host.len()].to_string()))
    }
}

/// A JetStream stream name: ASCII letters, digits, '_' and '-'.
fn stream_name(flag: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok {
        return Err(inconsistent(format!(
            "{flag} {name:?}: a stream name is ASCII letters, digits, '_' and '-'"
        )));
    }
    Ok(())
}

/// A subject prefix: dot-separated tokens without wildcards or spaces.
fn subject_prefix(flag: &str, prefix: &str) -> Result<(), ConfigError> {
    let ok = prefix.split('.').all(|t| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
    });
    if !ok {
        return Err(inconsistent(format!(
            "{flag} {prefix:?}: dot-separated tokens without spaces, '*' or '>'"
        )));
    }
    Ok(())
}

/// When a client hears "accepted".
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AckAfter {
    /// Once its points are committed to the database.
    Commit,
    /// Once its points are in the replicated log (NATS JetStream); writers
    /// on every instance then copy the log into the database. Needs
    /// --nats-url.
    Log,
}

/// `--ack-after log`: the replicated log in front of the database.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// When a client is acknowledged: after the commit (the default), or
    /// after JetStream has stored its points in the log (needs --nats-url).
    #[arg(long, env = "LOCUS_ACK_AFTER", value_enum, default_value = "commit")]
    pub ack_after: AckAfter,
    /// JetStream stream of accepted points not yet written (a work queue:
    /// a message leaves it once written), created if missing. Its dead
    /// letters go to the stream `<name>_DEAD`.
    #[arg(long, env = "LOCUS_LOG_STREAM", default_value = "LOCUS_LOG")]
    pub log_stream: String,
    /// Subjects of the log: `<prefix>.<partition>`, a device's points
    /// always in the same partition; dead letters on `<prefix>.dead`.
    #[arg(long, env = "LOCUS_LOG_SUBJECT_PREFIX", default_value = "locus.log")]
    pub log_subject_prefix: String,
    /// Partitions of the log (subjects), by device.
    #[arg(long, env = "LOCUS_LOG_PARTITIONS", default_value_t = 16)]
    pub log_partitions: u16,
    /// Most bytes the log holds; past it clients get RESOURCE_EXHAUSTED
    /// with a retry hint (nothing in it is dropped).
    #[arg(long, env = "LOCUS_LOG_MAX_BYTES", default_value_t = 8 * 1024 * 1024 * 1024)]
    pub log_max_bytes: u64,
    /// Points older than this in the log are dropped by JetStream, written
    /// or not: longer than any database outage you plan for. Dead letters
    /// are kept as long.
    #[arg(long, env = "LOCUS_LOG_MAX_AGE", default_value = "7days", value_parser = humantime::parse_duration)]
    pub log_max_age: Duration,
    /// A client batch resent within this window after a lost
    /// acknowledgement is stored in the log once (JetStream's message ids).
    #[arg(long, env = "LOCUS_LOG_DEDUP_WINDOW", default_value = "2m", value_parser = humantime::parse_duration)]
    pub log_dedup_window: Duration,
    /// A message a writer took and neither wrote nor gave back within this
    /// time (its instance died) goes to another writer.
    #[arg(long, env = "LOCUS_LOG_ACK_WAIT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub log_ack_wait: Duration,
}

impl LogArgs {
    pub fn enabled(&self) -> bool {
        self.ack_after == AckAfter::Log
    }

    pub fn validate(&self, cluster: &ClusterArgs) -> Result<(), ConfigError> {
        if self.enabled() && !cluster.enabled() {
            return Err(inconsistent(
                "--ack-after log needs --nats-url: the log is a NATS JetStream stream",
            ));
        }
        stream_name("--log-stream", &self.log_stream)?;
        subject_prefix("--log-subject-prefix", &self.log_subject_prefix)?;
        if self.log_stream == cluster.nats_stream {
            return Err(inconsistent("--log-stream must differ from --nats-stream"));
        }
        let overlaps = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}."));
        if overlaps(&self.log_subject_prefix, &cluster.nats_subject_prefix)
            || overlaps(&cluster.nats_subject_prefix, &self.log_subject_prefix)
        {
            return Err(inconsistent(
                "--log-subject-prefix and --nats-subject-prefix must not overlap",
            ));
        }
        at_least("--log-partitions", 1, self.log_partitions.into())?;
        at_least("--log-max-bytes", 1024 * 1024, self.log_max_bytes)?;
        if self.log_max_age < Duration::from_secs(60) {
            return Err(inconsistent("--log-max-age must be at least 1m"));
        }
        if self.log_ack_wait < Duration::from_secs(1) {
            return Err(inconsistent("--log-ack-wait must be at least 1s"));
        }
        if self.log_dedup_window < Duration::from_secs(1)
            || self.log_dedup_window > self.log_max_age
        {
            return Err(inconsistent(
                "--log-dedup-window must be at least 1s and at most --log-max-age",
            ));
        }
        Ok(())
    }
}

/// Cluster mode: several instances share one view (the latest positions
/// and the live feed) through a NATS JetStream stream of committed batches.
/// Off without --nats-url: locus is then one self-contained process.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// NATS server URLs (comma-separated for a cluster), e.g.
    /// nats://10.0.0.1:4222,nats://10.0.0.2:4222. Turns cluster mode on.
    /// Credentials go in the URL: nats://user:password@host:4222.
    #[arg(
        long = "nats-url",
        env = "LOCUS_NATS_URL",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub nats_urls: Vec<String>,
    /// JetStream stream of committed batches, created if missing.
    #[arg(long, env = "LOCUS_NATS_STREAM", default_value = "LOCUS_POINTS")]
    pub nats_stream: String,
    /// Subjects of the stream: `<prefix>.<app_source>`, with each '.' of the
    /// app_source written '~' so that an app is one subject token.
    #[arg(
        long,
        env = "LOCUS_NATS_SUBJECT_PREFIX",
        default_value = "locus.points"
    )]
    pub nats_subject_prefix: String,
    /// Oldest batch the stream keeps. An instance away longer refills its
    /// view from the database when it returns.
    #[arg(long, env = "LOCUS_NATS_MAX_AGE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub nats_max_age: Duration,
    /// Most bytes the stream keeps (oldest batches go first).
    #[arg(long, env = "LOCUS_NATS_MAX_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub nats_max_bytes: u64,
    /// Copies of the stream in the NATS cluster; 0 follows NATS (3 on a
    /// cluster, 1 where it cannot keep 3, 1 on a single server).
    #[arg(long, env = "LOCUS_NATS_REPLICAS", default_value_t = 0)]
    pub nats_replicas: u8,
    /// Committed batches held for publishing while NATS is slow or away;
    /// past it they are dropped, and the other instances told to refill
    /// their view from the database when NATS is back.
    #[arg(long, env = "LOCUS_NATS_PUBLISH_BUFFER_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub nats_publish_buffer_bytes: usize,
}

impl ClusterArgs {
    /// Whether cluster mode is on.
    pub fn enabled(&self) -> bool {
        !self.nats_urls.is_empty()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for url in &self.nats_urls {
            url.parse::<async_nats::ServerAddr>()
                .map_err(|e| inconsistent(format!("--nats-url {url:?}: {e}")))?;
        }
        stream_name("--nats-stream", &self.nats_stream)?;
        subject_prefix("--nats-subject-prefix", &self.nats_subject_prefix)?;
        if self.nats_replicas > 5 {
            return Err(inconsistent("--nats-replicas: JetStream keeps at most 5"));
        }
        at_least("--nats-max-bytes", 1024 * 1024, self.nats_max_bytes)?;
        at_least(
            "--nats-publish-buffer-bytes",
            1024 * 1024,
            self.nats_publish_buffer_bytes as u64,
        )?;
        if self.nats_max_age < Duration::from_secs(60) {
            return Err(inconsistent("--nats-max-age must be at least 1m"));
        }
        Ok(())
    }
}

/// OwnTracks over MQTT: locus subscribes to the apps' topics on a broker
/// and stores each location as if it had been POSTed to `/owntracks`.
/// Off without --mqtt-url.
#[derive(Debug, Clone, Args)]
pub struct MqttArgs {
    /// Broker to subscribe to: mqtt://host[:1883] or mqtts://host[:8883]
    /// (TLS, the system's roots and webpki's, and --mqtt-ca). The broker's credentials go
    /// in the URL: mqtts://user:password@host. Turns MQTT ingest on.
    #[arg(long = "mqtt-url", env = "LOCUS_MQTT_URL", hide_env_values = true)]
    pub mqtt_url: Option<String>,
    /// Client id of locus's persistent session on the broker; keep it
    /// fixed across restarts, so that the broker keeps what arrives while
    /// locus is away. Default: locus-<hostname>.
    #[arg(long, env = "LOCUS_MQTT_CLIENT_ID")]
    pub mqtt_client_id: Option<String>,
    /// Topic filters to subscribe to (comma-separated); each message's last
    /// two levels name the tracker, `<user>/<device>`.
    #[arg(
        long,
        env = "LOCUS_MQTT_TOPICS",
        value_delimiter = ',',
        default_value = "owntracks/+/+"
    )]
    pub mqtt_topics: Vec<String>,
    /// The app_source whose registered trackers the topics name.
    #[arg(long, env = "LOCUS_MQTT_APP_SOURCE", default_value = "owntracks")]
    pub mqtt_app_source: String,
    /// Most messages received and not yet acknowledged (MQTT 5's receive
    /// maximum: the broker sends no more until some are).
    #[arg(long, env = "LOCUS_MQTT_INFLIGHT", default_value_t = 100)]
    pub mqtt_inflight: u16,
    /// Subscribe as a member of this shared subscription
    /// (`$share/<group>/<filter>`): the instances of one group split the
    /// messages between them.
    #[arg(long, env = "LOCUS_MQTT_SHARE_GROUP")]
    pub mqtt_share_group: Option<String>,
    /// mqtts://: PEM file of CA certificates to trust for the broker, beside
    /// the system's roots and webpki's (a broker with a private CA).
    #[arg(long, env = "LOCUS_MQTT_CA")]
    pub mqtt_ca: Option<std::path::PathBuf>,
    /// mqtts://: PEM certificate (chain) locus presents to a broker that
    /// asks for client certificates; with --mqtt-client-key.
    #[arg(long, env = "LOCUS_MQTT_CLIENT_CERT", requires = "mqtt_client_key")]
    pub mqtt_client_cert: Option<std::path::PathBuf>,
    /// mqtts://: PEM private key of --mqtt-client-cert.
    #[arg(long, env = "LOCUS_MQTT_CLIENT_KEY", requires = "mqtt_client_cert")]
    pub mqtt_client_key: Option<std::path::PathBuf>,
}

impl MqttArgs {
    /// Whether MQTT ingest is on.
    pub fn enabled(&self) -> bool {
        self.mqtt_url.is_some()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let Some(url) = &self.mqtt_url else {
            return Ok(());
        };
        let broker = crate::ingest::mqtt::Broker::parse(url)
            .map_err(|e| inconsistent(format!("--mqtt-url: {e}")))?;
        if !broker.tls && (self.mqtt_ca.is_some() || self.mqtt_client_cert.is_some()) {
            return Err(inconsistent(
                "--mqtt-ca and --mqtt-client-cert are for TLS: use an mqtts:// --mqtt-url",
            ));
        }
        if self.mqtt_client_id.as_deref().is_some_and(str::is_empty) {
            return Err(inconsistent("--mqtt-client-id must not be empty"));
        }
        if self.mqtt_topics.is_empty() {
            return Err(inconsistent("--mqtt-topics names no topic filter"));
        }
        for t in &self.mqtt_topics {
            let bad = t.is_empty()
                || t.starts_with('$')
                || t.split('/').any(|level| {
                    (level.contains('+') && level != "+") || (level.contains('#') && level != "#")
                })
                || t.find('#').is_some_and(|i| i != t.len() - 1);
            if bad {
                return Err(inconsistent(format!(
                    "--mqtt-topics: {t:?} is not an MQTT topic filter (levels split by '/', \
                     '+' a whole level, '#' the whole last one; no '$share/' prefix: see \
                     --mqtt-share-group)"
                )));
            }
        }
        if self.mqtt_app_source.is_empty() {
            return Err(inconsistent("--mqtt-app-source must not be empty"));
        }
        at_least("--mqtt-inflight", 1, self.mqtt_inflight.into())?;
        if let Some(g) = &self.mqtt_share_group
            && (g.is_empty() || g.contains(['/', '+', '#']))
        {
            return Err(inconsistent(format!(
                "--mqtt-share-group {g:?}: a group name is one topic level, without '/', '+' or '#'"
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `locus serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// gRPC listen address.
    #[arg(long, env = "LOCUS_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,
    /// Prometheus /metrics listen address.
    #[arg(long, env = "LOCUS_METRICS_ADDR", default_value = "0.0.0.0:9000")]
    pub metrics_addr: SocketAddr,
    /// Do not run `setup` at start (the schema is managed separately).
    #[arg(long, env = "LOCUS_NO_SETUP")]
    pub no_setup: bool,
    /// Create the database named by --database-url if the server has no
    /// such database yet (as `createdb` would), and say so in the log.
    #[arg(long, env = "LOCUS_CREATE_DATABASE")]
    pub create_database: bool,
    /// Time allowed, after SIGTERM/SIGINT, to flush and acknowledge what is buffered.
    #[arg(long, env = "LOCUS_SHUTDOWN_GRACE", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Database connections (writers, queries, maintenance).
    #[arg(long, env = "LOCUS_DB_POOL_SIZE", default_value_t = 10)]
    pub db_pool_size: u32,
    #[command(flatten)]
    pub storage: StorageArgs,
    #[command(flatten)]
    pub validation: ValidationArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub connections: ConnectionArgs,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[command(flatten)]
    pub query: QueryArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub console: ConsoleArgs,
    #[command(flatten)]
    pub mqtt: MqttArgs,
}

impl ServeConfig {
    /// A configuration with every default, for tests and embedding, on
    /// loopback addresses with ports the system picks.
    pub fn with_database(url: impl Into<String>) -> Self {
        let mut c: Self = flag_defaults(&[format!("--database-url={}", url.into())]);
        c.grpc_addr = ([127, 0, 0, 1], 0).into();
        c.metrics_addr = ([127, 0, 0, 1], 0).into();
        c.query.http_addr = ([127, 0, 0, 1], 0).into();
        c
    }

    /// Checks every setting and how they fit together, group by group.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.database.validate()?;
        self.limits.validate()?;
        self.pipeline.validate()?;
        at_least(
            "--db-pool-size",
            self.pipeline.writers as u64 + 1,
            self.db_pool_size as u64,
        )?;
        self.validation.validate()?;
        self.connections.validate()?;
        self.query.validate()?;
        self.auth.validate(&self.limits)?;
        self.tls.validate()?;
        self.cluster.validate()?;
        self.log.validate(&self.cluster)?;
        self.console.validate()?;
        self.mqtt.validate()?;
        self.storage.validate()
    }
}

/// A duration as people and `humantime::parse_duration` read it, in days,
/// hours, minutes, seconds and milliseconds only: humantime's own format
/// counts months of 30.44 days, so 31 days would read "1month 13h 26m 24s".
pub fn human(d: Duration) -> String {
    const UNITS: [(u64, &str, &str); 4] = [
        (86_400, "day", "days"),
        (3_600, "h", "h"),
        (60, "m", "m"),
        (1, "s", "s"),
    ];
    let mut left = d.as_secs();
    let mut parts = Vec::new();
    for (size, one, many) in UNITS {
        let n = left / size;
        left %= size;
        if n > 0 {
            parts.push(format!("{n}{}", if n == 1 { one } else { many }));
        }
    }
    let ms = d.subsec_millis();
    if ms > 0 || parts.is_empty() {
        parts.push(format!("{ms}ms"));
    }
    parts.join(" ")
}

/// `value` is at least `min`, or the error that says so for `name`.
fn at_least(name: &'static str, min: u64, value: u64) -> Result<(), ConfigError> {
    if value < min {
        Err(ConfigError::TooSmall { name, min, value })
    } else {
        Ok(())
    }
}

fn inconsistent(msg: impl Into<String>) -> ConfigError {
    ConfigError::Inconsistent(msg.into())
}

impl LimitArgs {
    /// Each bound is positive and holds what the others let in.
    fn validate(&self) -> Result<(), ConfigError> {
        at_least("--max-message-bytes", 1024, self.max_message_bytes as u64)?;
        at_least("--max-batch-points", 1, self.max_batch_points as u64)?;
        at_least("--buffer-points", 1, self.buffer_points as u64)?;
        at_least("--max-streams", 1, self.max_streams as u64)?;
        at_least("--stream-inflight", 1, self.stream_inflight as u64)?;
        if self.buffer_points < self.max_batch_points {
            return Err(inconsistent(format!(
                "--buffer-points ({}) must hold at least one full batch (--max-batch-points {})",
                self.buffer_points, self.max_batch_points
            )));
        }
        if self.max_decoding_bytes < self.max_decompressed_bytes.max(self.max_message_bytes) {
            return Err(inconsistent(format!(
                "--max-decoding-bytes ({}) must hold one body (--max-decompressed-bytes {}, --max-message-bytes {})",
                self.max_decoding_bytes, self.max_decompressed_bytes, self.max_message_bytes
            )));
        }
        if u32::try_from(self.max_decoding_bytes).is_err() {
            return Err(inconsistent("--max-decoding-bytes must be below 4 GiB"));
        }
        if self.buffer_bytes < self.max_message_bytes {
            return Err(inconsistent(format!(
                "--buffer-bytes ({}) must hold at least one message (--max-message-bytes {})",
                self.buffer_bytes, self.max_message_bytes
            )));
        }
        if u32::try_from(self.buffer_bytes).is_err() || u32::try_from(self.buffer_points).is_err() {
            return Err(inconsistent(
                "--buffer-points and --buffer-bytes must be below 4 GiB",
            ));
        }
        Ok(())
    }
}

impl PipelineArgs {
    fn validate(&self) -> Result<(), ConfigError> {
        at_least("--flush-points", 1, self.flush_points as u64)?;
        at_least("--flush-bytes", 1024, self.flush_bytes as u64)?;
        at_least("--writers", 1, self.writers as u64)
    }
}

impl ValidationArgs {
    fn validate(&self) -> Result<(), ConfigError> {
        at_least("--max-app-source-len", 1, self.max_app_source_len as u64)?;
        if self.max_speed_kmh.is_nan() || self.max_speed_kmh <= 0.0 {
            return Err(inconsistent("--max-speed-kmh must be positive"));
        }
        Ok(())
    }
}

impl ConnectionArgs {
    fn validate(&self) -> Result<(), ConfigError> {
        for (name, value) in [
            ("--max-connections-grpc", self.max_connections_grpc),
            ("--max-connections-http", self.max_connections_http),
            ("--max-connections-metrics", self.max_connections_metrics),
        ] {
            at_least(name, 1, value as u64)?;
        }
        for (name, value) in [
            ("--handshake-timeout", self.handshake_timeout),
            ("--header-read-timeout", self.header_read_timeout),
            ("--idle-timeout", self.idle_timeout),
        ] {
            if value < Duration::from_millis(100) {
                return Err(inconsistent(format!("{name} must be at least 100ms")));
            }
        }
        Ok(())
    }
}

impl QueryArgs {
    /// Pages, live queues and subscribers: positive, and each default
    /// within its maximum.
    fn validate(&self) -> Result<(), ConfigError> {
        at_least("--live-queue-points", 1, self.live_queue_points as u64)?;
        at_least("--track-page", 1, self.track_page.into())?;
        at_least("--latest-page", 1, self.latest_page.into())?;
        // A location is at most a few KiB (metadata is bounded), so a page
        // of this many bytes always has room for one.
        at_least("--max-latest-bytes", 65_536, self.max_latest_bytes as u64)?;
        for (page, max, default, most) in [
            (
                "--track-page",
                "--max-track-page",
                self.track_page,
                self.max_track_page,
            ),
            (
                "--latest-page",
                "--max-latest-page",
                self.latest_page,
                self.max_latest_page,
            ),
        ] {
            if default > most {
                return Err(inconsistent(format!(
                    "{page} ({default}) must not exceed {max} ({most})"
                )));
            }
        }
        at_least(
            "--max-subscribers-per-token",
            1,
            self.max_subscribers_per_token as u64,
        )?;
        if self.max_subscribers_per_token > self.max_subscribers {
            return Err(inconsistent(format!(
                "--max-subscribers-per-token ({}) must not exceed --max-subscribers ({})",
                self.max_subscribers_per_token, self.max_subscribers
            )));
        }
        if self.live_interval > Duration::from_secs(10) {
            return Err(inconsistent(
                "--live-interval must be at most 10s: a live feed holds points that long",
            ));
        }
        Ok(())
    }
}

impl AuthArgs {
    /// The rate limit lets one full batch of `limits` pass.
    fn validate(&self, limits: &LimitArgs) -> Result<(), ConfigError> {
        if self.rate_limit_points > 0 && (self.rate_limit_burst as usize) < limits.max_batch_points
        {
            return Err(inconsistent(format!(
                "--rate-limit-burst ({}) must let one full batch pass (--max-batch-points {})",
                self.rate_limit_burst, limits.max_batch_points
            )));
        }
        if self.auth_refresh_interval < Duration::from_millis(100) {
            return Err(inconsistent(
                "--auth-refresh-interval must be at least 100ms",
            ));
        }
        Ok(())
    }
}

impl TlsArgs {
    /// The files are there. Whether they parse, and the key fits the
    /// certificate, is [`crate::tls::load`]'s to say, before any port is
    /// bound ([`crate::server::check`]).
    fn validate(&self) -> Result<(), ConfigError> {
        for (flag, path) in [
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
            ("--tls-client-ca", &self.tls_client_ca),
        ] {
            if let Some(path) = path
                && !path.is_file()
            {
                return Err(inconsistent(format!(
                    "{flag} {} is not a readable file",
                    path.display()
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_in_days_not_months() {
        let cases = [
            (Duration::from_secs(31 * 86_400), "31days"),
            (Duration::from_secs(365 * 86_400), "365days"),
            (Duration::from_secs(86_400 + 12 * 3_600), "1day 12h"),
            (Duration::from_secs(90), "1m 30s"),
            (Duration::from_millis(1_500), "1s 500ms"),
            (Duration::ZERO, "0ms"),
        ];
        for (d, text) in cases {
            assert_eq!(human(d), text);
            assert_eq!(humantime::parse_duration(text).unwrap(), d, "{text}");
        }
    }

    /// `locus serve` with only a database URL is `with_database`'s
    /// configuration but for the addresses (each default is written once,
    /// in its flag; this holds the two ways of reading them together).
    /// A `LOCUS_*` variable set where the test runs would show here.
    #[test]
    fn serve_flags_default_to_the_configuration_default() {
        use clap::Parser;
        let url = "postgres://localhost/locus";
        let crate::cli::Command::Serve(mut parsed) =
            crate::cli::Cli::try_parse_from(["locus", "serve", "--database-url", url])
                .unwrap()
                .command
        else {
            panic!("not serve");
        };
        let defaults = ServeConfig::with_database(url);
        assert_eq!(parsed.grpc_addr, "0.0.0.0:50051".parse().unwrap());
        assert_eq!(parsed.query.http_addr, "0.0.0.0:8080".parse().unwrap());
        parsed.grpc_addr = defaults.grpc_addr;
        parsed.metrics_addr = defaults.metrics_addr;
        parsed.query.http_addr = defaults.query.http_addr;
        assert_eq!(format!("{parsed:?}"), format!("{defaults:?}"));
        assert_eq!(defaults.pipeline.writers, 4);
        assert_eq!(
            defaults.storage.raw_retention,
            Duration::from_secs(30 * 86_400)
        );
    }

    #[test]
    fn defaults_are_valid() {
        ServeConfig::with_database("postgres://localhost/locus")
            .validate()
            .unwrap();
    }

    #[test]
    fn refuses_other_databases() {
        let err = ServeConfig::with_database("sqlite:///caloria.db")
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("never falls back"), "{err}");
    }

    #[test]
    fn refresh_window_must_end_before_raw_retention() {
        let mut s = StorageArgs::default();
        assert_eq!(s.refresh_window(), Duration::from_secs(29 * 86_400));
        s.hourly_refresh_window = Some(Duration::from_secs(30 * 86_400));
        let err = s.validate().unwrap_err();
        assert!(err.to_string().contains("erase their aggregates"), "{err}");
    }

    #[test]
    fn a_decoding_budget_below_one_body_is_refused() {
        let mut c = ServeConfig::with_database("postgres://localhost/locus");
        c.limits.max_decoding_bytes = c.limits.max_decompressed_bytes - 1;
        assert!(c.validate().is_err());
        c.limits.max_decoding_bytes = c.limits.max_decompressed_bytes;
        c.validate().unwrap();
    }

    #[test]
    fn a_live_interval_of_more_than_ten_seconds_is_refused() {
        let mut c = ServeConfig::with_database("postgres://localhost/locus");
        c.query.live_interval = Duration::from_secs(11);
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("--live-interval"), "{err}");
        c.query.live_interval = Duration::from_secs(10);
        c.validate().unwrap();
    }

    #[test]
    fn a_default_page_fits_within_the_most_a_page_holds() {
        let mut c = ServeConfig::with_database("postgres://localhost/locus");
        c.query.latest_page = 10_001;
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("--max-latest-page"), "{err}");
        c.query.latest_page = 10_000;
        c.query.track_page = 20_000;
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("--max-track-page"), "{err}");
        c.query.track_page = 10_000;
        c.query.max_latest_bytes = 1_000;
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("--max-latest-bytes"), "{err}");
        c.query.max_latest_bytes = 65_536;
        c.validate().unwrap();
    }

    #[test]
    fn the_rate_limit_burst_lets_a_full_batch_pass() {
        let mut c = ServeConfig::with_database("postgres://x/y");
        c.auth.rate_limit_burst = 100;
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("--rate-limit-burst"), "{err}");
        c.auth.rate_limit_points = 0;
        c.validate().unwrap();
    }

    #[test]
    fn missing_tls_files_are_refused_before_binding() {
        let mut c = ServeConfig::with_database("postgres://x/y");
        c.tls.tls_cert = Some("/nonexistent/cert.pem".into());
        c.tls.tls_key = Some("/nonexistent/key.pem".into());
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("--tls-cert"), "{err}");
    }

    #[test]
    fn map_tiles_are_checked_and_give_their_origin() {
        let mut c = ServeConfig::with_database("postgres://x/y");
        assert_eq!(c.console.tile_origin().unwrap(), None);
        c.console.map_tiles = Some("https://tile.openstreetmap.org/{z}/{x}/{y}.png".into());
        c.validate().unwrap();
        assert_eq!(
            c.console.tile_origin().unwrap().as_deref(),
            Some("https://tile.openstreetmap.org")
        );
        c.console.map_tiles = Some("http://127.0.0.1:8081/t?z={z}&x={x}&y={y}".into());
        assert_eq!(
            c.console.tile_origin().unwrap().as_deref(),
            Some("http://127.0.0.1:8081")
        );
        for (bad, says) in [
            ("tile.openstreetmap.org/{z}/{x}/{y}.png", "https://"),
            ("ftp://tiles/{z}/{x}/{y}.png", "https://"),
            ("https:///{z}/{x}/{y}.png", "host"),
            ("https://{s}.tiles/{z}/{x}/{y}.png", "host"),
            ("https://tiles/{z}/{x}.png", "{y}"),
            ("https://tiles/{z}/{x}/{y}.png; script-src *", "';'"),
        ] {
            c.console.map_tiles = Some(bad.into());
            let err = c.validate().unwrap_err().to_string();
            assert!(
                err.contains("--map-tiles") && err.contains(says),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn refuses_inconsistent_limits() {
        let mut c = ServeConfig::with_database("postgres://x/y");
        c.limits.buffer_points = 10;
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("--buffer-points"), "{err}");
        let mut c = ServeConfig::with_database("postgres://x/y");
        c.db_pool_size = 2;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::TooSmall {
                name: "--db-pool-size",
                ..
            })
        ));
    }
}
