//! `locus serve`: wires the pool, setup, pipeline, gRPC services and metrics
//! together, and shuts them down in order.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{Router, routing::get};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    auth::Auth,
    cluster::Cluster,
    config::{AuthMode, ConfigError, ServeConfig},
    connections::{Gate, grpc_incoming},
    health::Health,
    ingest::{
        Ingestor, Target,
        grpc::{IngestRoutes, IngestService},
        unix_micros,
        validate::Validator,
    },
    ingest_log::{self, append::Appender, write::Writers},
    metrics,
    metrics::{LOG_APPENDED, LOG_REDELIVERED, LOG_RESENT, LOG_WRITTEN},
    pipeline::{
        Budget, Pipeline,
        writer::{CommitSink, Writer},
    },
    proto::{self, query_server::QueryServer},
    query::{QueryState, grpc::QueryService},
    storage::{
        SetupError, Tier, catalog, maintain,
        setup::{self, SetupOptions},
        timescale,
    },
    tls::Tls,
};

/// How long a pool waits for a connection before the attempt fails (and is retried).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The sockets `serve` listens on, bound by the caller (tests bind port 0).
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
    pub metrics: TcpListener,
}

impl Listeners {
    pub async fn bind(
        grpc: SocketAddr,
        http: SocketAddr,
        metrics: SocketAddr,
    ) -> std::io::Result<Self> {
        Ok(Self {
            grpc: TcpListener::bind(grpc).await?,
            http: TcpListener::bind(http).await?,
            metrics: TcpListener::bind(metrics).await?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("setup failed: {0}")]
    Setup(#[from] SetupError),
    #[error("cannot open the database pool: {0}")]
    Pool(#[source] sqlx::Error),
    #[error("server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    FileLimit(#[from] crate::connections::FileLimitError),
    #[error("cluster mode: {0}")]
    Nats(#[from] async_nats::ConnectError),
    #[error("MQTT ingest: {0}")]
    Mqtt(#[from] crate::ingest::mqtt::MqttError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Every setting checked, and the TLS files read: done before any port is
/// bound, so that a bad setting exits at once with one clear error.
pub fn check(config: &ServeConfig) -> Result<Option<Tls>, ConfigError> {
    config.validate()?;
    crate::ingest::mqtt::Settings::from_args(&config.mqtt, &config.limits)?;
    crate::tls::load(&config.tls).map_err(|e| ConfigError::Inconsistent(format!("TLS: {e}")))
}

/// Serves until `shutdown` is cancelled, then stops taking streams, flushes
/// and acknowledges what is buffered, and returns within the grace deadline.
pub async fn run(
    config: ServeConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let tls = check(&config)?;
    let mqtt = crate::ingest::mqtt::Settings::from_args(&config.mqtt, &config.limits)?;
    let file_limit = crate::connections::fit_file_limit(&config)?;
    tracing::debug!(file_limit, "open-file limit");
    let prometheus = metrics::install();
    let tier = prepare_database(&config).await?;
    let pool = pool(&config).map_err(ServeError::Pool)?;
    let auth = auth(&config, &pool);
    // Before the latest map is filled: following the stream starts where
    // it ended then.
    let cluster = match config.cluster.enabled() {
        true => Some(Cluster::connect(&config.cluster).await?),
        false => None,
    };
    let query = query_state(&config, &pool, &auth).await;
    let (sink, cluster_tasks): (Arc<dyn CommitSink>, _) = match &cluster {
        Some(c) => {
            // At shutdown, after the pipeline drained: a little more time
            // for what it committed last to reach the stream.
            let publish_grace = config.shutdown_grace.min(Duration::from_secs(5));
            let (sink, running) = c.start(query.clone(), pool.clone(), publish_grace);
            (sink, Some(running))
        }
        None => (query.clone(), None),
    };
    let writer = Writer::new(
        pool.clone(),
        config.pipeline.write_retry_deadline,
        timescale::locus_runs_jobs(tier),
        Some(sink),
    );
    let budget = Budget::new(config.limits.buffer_points, config.limits.buffer_bytes);
    let (pipeline, pipeline_task) =
        Pipeline::start(writer, &config.pipeline, budget.clone(), shutdown.clone());
    let validator = Validator::new(&config.validation, config.storage.raw_retention);
    let log_writers = TaskTracker::new();
    let log_not_made = Arc::new(ingest_log::NotMade::default());
    let ingestor = match (&cluster, config.log.enabled()) {
        (Some(c), true) => {
            let (target, writers) =
                start_log(c, &config, pipeline, &log_writers, &shutdown, &log_not_made).await;
            // The edge's budget is its own: writers held up by the database
            // never fill it, so clients go on being acknowledged.
            let edge = Budget::new(config.limits.buffer_points, config.limits.buffer_bytes);
            tokio::spawn(writers);
            Ingestor::new(
                validator,
                target,
                edge,
                config.limits.max_batch_points,
                auth.clone(),
            )
        }
        _ => Ingestor::new(
            validator,
            Target::Pipeline(pipeline),
            budget,
            config.limits.max_batch_points,
            auth.clone(),
        ),
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    let background = CancellationToken::new();
    let health = Health::new(health);
    if let Some(c) = &cluster {
        health.report_cluster(Arc::clone(&c.status));
        if config.log.enabled() {
            health.follow_log(
                c.nats().1.clone(),
                config.log.log_stream.clone(),
                Arc::clone(&log_not_made),
            );
        }
    }
    tokio::spawn(Arc::clone(&health).watch(pool.clone(), shutdown.clone()));
    tokio::spawn(maintenance(
        config.clone(),
        tier,
        Arc::clone(&query),
        background.clone(),
    ));
    tokio::spawn(auth.watch(background.clone()));

    let conns = &config.connections;
    let timeouts = crate::http_server::HttpTimeouts::from_config(conns);
    let metrics_app = Router::new()
        .route(
            "/metrics",
            get(move || std::future::ready(prometheus.render())),
        )
        .merge(crate::health::router(Arc::clone(&health)));
    let metrics_task = tokio::spawn(crate::http_server::serve_http(
        listeners.metrics,
        metrics_app,
        None,
        Gate::new("metrics", conns.max_connections_metrics),
        timeouts,
        background.clone(),
    ));
    let registry = crate::trackers::Registry::new(pool.clone());
    // Holds an ingestor, so the pipeline drains only after it stopped.
    let mqtt_task = match mqtt {
        Some(settings) => Some(crate::ingest::mqtt::start(
            settings,
            ingestor.clone(),
            registry.clone(),
            shutdown.clone(),
            config.shutdown_grace,
        )?),
        None => None,
    };
    let http_app = crate::query::http::router(query.clone(), shutdown.clone())
        .merge(crate::ingest::router(
            ingestor.clone(),
            registry,
            &config.limits,
        ))
        .merge(crate::health::router(Arc::clone(&health)))
        .merge(crate::openapi::router())
        .merge(crate::console::router(
            config.console.map_tiles.as_deref(),
            config.console.tile_origin()?.as_deref(),
        ));
    let http_task = tokio::spawn(crate::http_server::serve_http(
        listeners.http,
        http_app,
        tls.as_ref().map(|t| Arc::clone(&t.http)),
        Gate::new("http", conns.max_connections_http),
        timeouts,
        shutdown.clone(),
    ));

    let grpc_addr = listeners.grpc.local_addr()?;
    let ingest = IngestService::new(
        ingestor,
        config.limits.max_streams,
        config.limits.stream_inflight,
        shutdown.clone(),
    );
    let grpc = tonic::transport::Server::builder()
        // Dead peers are noticed, and their streams freed.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(health_service)
        // v1 and v1alpha: grpcurl and older tools still ask the latter.
        .add_service(
            reflection()
                .build_v1()
                .expect("the embedded descriptor sets are valid"),
        )
        .add_service(
            reflection()
                .build_v1alpha()
                .expect("the embedded descriptor sets are valid"),
        )
        .add_service(IngestRoutes::new(ingest, config.limits.max_message_bytes))
        .add_service(QueryServer::new(QueryService::new(
            query.clone(),
            shutdown.clone(),
        )));
    let grpc = serve_grpc(
        grpc,
        listeners.grpc,
        &config,
        tls.as_ref(),
        shutdown.clone(),
    );
    tracing::info!(%grpc_addr, tls = tls.is_some(), auth = ?config.auth.mode, "locus serving");

    let result = drain(grpc, pipeline_task, mqtt_task, &health, &config, &shutdown).await;
    // The pipeline drained: the log messages it committed are acknowledged.
    log_writers.close();
    if tokio::time::timeout(config.shutdown_grace, log_writers.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "log: some messages were neither acknowledged nor given back; they go to another writer after --log-ack-wait"
        );
    }
    if let Some(c) = &cluster {
        // What the client still buffers goes out; a client that never
        // connected (or lost NATS) would wait here forever, so not long.
        let flushed = c.nats().0.flush();
        if tokio::time::timeout(config.shutdown_grace.min(Duration::from_secs(5)), flushed)
            .await
            .is_err()
        {
            tracing::warn!(
                "NATS did not answer the last flush; what the client still held is not sent"
            );
        }
    }
    if let Some(running) = cluster_tasks {
        running.stop().await;
    }
    background.cancel();
    let _ = metrics_task.await;
    let _ = http_task.await;
    pool.close().await;
    result
}

/// `--ack-after log`: the log made (or waited for a little, when NATS is
/// slow to answer), the gauges watched; returns the edge's target and the
/// writers' task (which takes messages until `shutdown`).
async fn start_log(
    cluster: &Cluster,
    config: &ServeConfig,
    pipeline: Pipeline,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    not_made: &Arc<ingest_log::NotMade>,
) -> (Target, impl std::future::Future<Output = ()> + use<>) {
    let (client, js) = cluster.nats();
    let made = tokio::time::timeout(
        ingest_log::START_WAIT,
        ingest_log::ensure(js, client, &config.cluster, &config.log),
    )
    .await;
    match made {
        Ok(Ok(_)) => {
            tracing::info!(stream = %config.log.log_stream, "log: acknowledging after the log (--ack-after log)")
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "log: the log is not ready; batches are refused (UNAVAILABLE) until it is");
            not_made.set(Some(e.to_string()));
        }
        Err(_) => tracing::warn!(
            "log: NATS did not answer within 5 s; batches are refused (UNAVAILABLE) until it does"
        ),
    }
    // From the start at zero, so that rate() and the dashboard see them.
    for name in [LOG_APPENDED, LOG_RESENT, LOG_WRITTEN, LOG_REDELIVERED] {
        ::metrics::counter!(name).increment(0);
    }
    let mean = Arc::new(ingest_log::Mean::default());
    tokio::spawn(ingest_log::watch(
        js.clone(),
        config.log.clone(),
        Arc::clone(&mean),
        shutdown.clone(),
    ));
    let target = Target::Log(Box::new(Appender::new(
        js.clone(),
        client.clone(),
        config.log.log_subject_prefix.clone(),
        config.log.log_partitions,
        Arc::clone(&mean),
    )));
    let writers = Writers {
        js: js.clone(),
        client: client.clone(),
        cluster: config.cluster.clone(),
        args: config.log.clone(),
        pipeline,
        mean,
        not_made: Arc::clone(not_made),
    };
    (target, writers.run(shutdown.clone(), tracker.clone()))
}

/// Creates the database if asked, then brings its schema up to date
/// (unless `--no-setup`, where the tier is read as it is).
async fn prepare_database(config: &ServeConfig) -> Result<Tier, ServeError> {
    if config.create_database
        && let Some(name) = setup::create_database_if_missing(&config.database.url).await?
    {
        tracing::info!(database = %name, "created the database (--create-database)");
    }
    if config.no_setup {
        let mut conn = setup::connect(&config.database.url).await?;
        return Ok(catalog::read(&mut conn).await?.tier);
    }
    let opts = SetupOptions {
        storage: config.storage.clone(),
        require_tier: None,
    };
    let plan = setup::run(
        &config.database.url,
        &opts,
        false,
        unix_micros(SystemTime::now()),
    )
    .await?;
    tracing::info!(tier = %plan.tier, steps = plan.steps.len(), "schema ready");
    Ok(plan.tier)
}

fn auth(config: &ServeConfig, pool: &PgPool) -> Auth {
    match config.auth.mode {
        AuthMode::Tokens => Auth::new(pool.clone(), &config.auth),
        AuthMode::Off => {
            tracing::warn!(
                "AUTHENTICATION IS OFF (--auth off): anyone who reaches this service may write \
                 and read every app_source's data. Use this for local development only."
            );
            Auth::disabled()
        }
    }
}

/// The queries' state, its latest map filled from the database.
async fn query_state(config: &ServeConfig, pool: &PgPool, auth: &Auth) -> Arc<QueryState> {
    let query = Arc::new(QueryState::new(
        pool.clone(),
        config.query.clone(),
        auth.clone(),
    ));
    match query.latest.load(pool).await {
        Ok(n) => tracing::info!(devices = n, "latest positions loaded"),
        Err(e) => {
            tracing::warn!(error = %e, "latest positions not loaded; they fill as points arrive")
        }
    }
    // Retention drops whole chunks, so points up to a chunk past it may
    // still be stored: their devices are forgotten now, as upkeep would.
    forget_past_retention(&query, config.storage.raw_retention);
    query
}

/// gRPC reflection of locus's and the health service's descriptors.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// The gRPC server on its gated listener, over TLS where configured.
fn serve_grpc(
    grpc: tonic::transport::server::Router,
    listener: TcpListener,
    config: &ServeConfig,
    tls: Option<&crate::tls::Tls>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
    let gate = Gate::new("grpc", config.connections.max_connections_grpc);
    let handshake = config.connections.handshake_timeout;
    let stopped = shutdown.clone().cancelled_owned();
    match tls {
        None => tokio::spawn(grpc.serve_with_incoming_shutdown(
            grpc_incoming(
                listener,
                gate,
                handshake,
                |tcp| std::future::ready(Ok(tcp)),
                shutdown,
            ),
            stopped,
        )),
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.grpc));
            tokio::spawn(grpc.serve_with_incoming_shutdown(
                grpc_incoming(
                    listener,
                    gate,
                    handshake,
                    move |tcp| acceptor.accept(tcp),
                    shutdown,
                ),
                stopped,
            ))
        }
    }
}

/// Waits for the gRPC server to end or `shutdown`; then, within the grace
/// deadline, lets the server's streams end and the pipeline flush and
/// acknowledge what it holds.
async fn drain(
    mut grpc: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    pipeline_task: tokio::task::JoinHandle<()>,
    mqtt_task: Option<tokio::task::JoinHandle<()>>,
    health: &Health,
    config: &ServeConfig,
    shutdown: &CancellationToken,
) -> Result<(), ServeError> {
    let early = tokio::select! {
        r = &mut grpc => Some(r),
        _ = shutdown.cancelled() => None,
    };
    health.shutting_down().await;
    let started = std::time::Instant::now();
    let drained = async {
        let served = match early {
            Some(r) => r,
            None => grpc.await,
        };
        // MQTT: what is in flight committed and acknowledged, the
        // session disconnected.
        if let Some(mqtt) = mqtt_task {
            mqtt.await.ok();
        }
        // The server and its streams are gone, so the last pipeline handle is
        // dropped: the batcher flushes what is left and the task ends.
        pipeline_task.await.ok();
        served
    };
    let result = match tokio::time::timeout(config.shutdown_grace, drained).await {
        Ok(Ok(served)) => served.map_err(ServeError::from),
        Ok(Err(join)) => Err(ServeError::Io(std::io::Error::other(join))),
        Err(_) => {
            tracing::error!(grace = ?config.shutdown_grace, "shutdown deadline passed with batches unacknowledged");
            Ok(())
        }
    };
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "locus stopped"
    );
    result
}

fn pool(config: &ServeConfig) -> Result<PgPool, sqlx::Error> {
    let opts: PgConnectOptions = config.database.url.parse()?;
    let timeout_ms = config.pipeline.statement_timeout.as_millis().to_string();
    let opts = opts.application_name("locus").options([
        ("statement_timeout", timeout_ms.as_str()),
        ("TimeZone", "UTC"),
    ]);
    Ok(PgPoolOptions::new()
        .max_connections(config.db_pool_size)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(false)
        .connect_lazy_with(opts))
}

/// The storage jobs: the hourly rollup every `--hourly-refresh-interval`
/// where locus keeps it (on the community edition, a pass that covers for
/// TimescaleDB's scheduler where it keeps failing a policy job), and every
/// hour (or quarter chunk) a new setup plan (partitions ahead, drift)
/// unless `--no-setup`, the retention jobs, and the latest-position map's
/// forgetting of devices past retention.
async fn maintenance(
    config: ServeConfig,
    tier: Tier,
    query: Arc<QueryState>,
    stop: CancellationToken,
) {
    let storage = &config.storage;
    let every = (storage.chunk_interval / 4).min(Duration::from_secs(3600));
    let opts = SetupOptions {
        storage: storage.clone(),
        require_tier: None,
    };
    let mut rollup = tokio::time::interval(storage.hourly_refresh_interval);
    let mut upkeep = tokio::time::interval(every);
    rollup.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    upkeep.tick().await; // setup just ran
    loop {
        let job = tokio::select! {
            _ = stop.cancelled() => return,
            _ = rollup.tick() => Job::Rollup,
            _ = upkeep.tick() => Job::Upkeep,
        };
        let result = match job {
            Job::Rollup if timescale::locus_runs_jobs(tier) => {
                rollup_once(&config.database.url).await
            }
            // As often as the refresh policy may be due: the covering pass
            // runs each job no more often than its own schedule.
            Job::Rollup if storage.cover_failed_jobs_after > 0 => {
                cover_once(&config.database.url, storage).await
            }
            Job::Rollup => Ok(()),
            Job::Upkeep => {
                forget_past_retention(&query, storage.raw_retention);
                upkeep_once(&config, &opts, tier).await
            }
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "storage job failed; it runs again on schedule");
        }
    }
}

enum Job {
    Rollup,
    Upkeep,
}

/// Devices silent for longer than `retention` leave the latest map: their
/// points are gone from the database, and a restart would not find them
/// either. Without this, a fleet whose device ids churn (reinstalled apps)
/// would grow the map for ever.
fn forget_past_retention(query: &QueryState, retention: Duration) {
    let cutoff = unix_micros(SystemTime::now()) - retention.as_micros() as i64;
    let forgotten = query.latest.forget_older_than(cutoff);
    if forgotten > 0 {
        tracing::info!(
            forgotten,
            devices = query.latest.len(),
            "latest map: devices past retention forgotten"
        );
    }
}

async fn rollup_once(url: &str) -> Result<(), SetupError> {
    let mut conn = setup::connect(url).await?;
    said_if_busy(maintain::rollup_in_turn(&mut conn).await?);
    Ok(())
}

/// Another instance on the database runs the jobs now: this one's turn
/// comes on its next tick.
fn said_if_busy(turn: maintain::Turn) {
    if turn == maintain::Turn::Busy {
        tracing::debug!("storage jobs: another instance is running them; skipped this time");
    }
}

async fn cover_once(url: &str, storage: &crate::config::StorageArgs) -> Result<(), SetupError> {
    let mut conn = setup::connect(url).await?;
    said_if_busy(
        maintain::run_all(
            &mut conn,
            Tier::Timescale,
            storage,
            unix_micros(SystemTime::now()),
        )
        .await?,
    );
    Ok(())
}

async fn upkeep_once(
    config: &ServeConfig,
    opts: &SetupOptions,
    tier: Tier,
) -> Result<(), SetupError> {
    let now = unix_micros(SystemTime::now());
    if !config.no_setup {
        let plan = setup::run(&config.database.url, opts, false, now).await?;
        if !plan.steps.is_empty() {
            tracing::info!(
                steps = plan.steps.len(),
                "maintenance applied a new setup plan"
            );
        }
    }
    let mut conn = setup::connect(&config.database.url).await?;
    said_if_busy(maintain::run_all(&mut conn, tier, &config.storage, now).await?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files that are there but are no certificate and key pass the
    /// settings' own checks; `check`, which runs before any port is bound,
    /// still refuses them.
    #[test]
    fn check_refuses_tls_files_that_do_not_parse() {
        let dir = std::env::temp_dir().join(format!("locus-check-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, "not a certificate").unwrap();
        std::fs::write(&key, "not a key").unwrap();
        let mut config = ServeConfig::with_database("postgres://127.0.0.1/locus");
        config.tls.tls_cert = Some(cert);
        config.tls.tls_key = Some(key);
        config.validate().expect("the files are there");
        let refused = check(&config).err();
        std::fs::remove_dir_all(&dir).unwrap();
        let e = refused.expect("refused");
        assert!(e.to_string().starts_with("TLS: "), "{e}");
    }
}
