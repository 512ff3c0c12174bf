//! Liveness and readiness, for gRPC (`grpc.health.v1`) and HTTP (`/healthz`,
//! `/readyz`). Ready means: locus can take points and is not shutting down;
//! it can take points while the database answers, or with `--ack-after
//! log` while NATS does (the database away then only delays the writes:
//! `/readyz` says so, and the Query service alone turns NOT_SERVING).
//! Shutdown turns both to not ready at once. In cluster mode `/readyz`
//! also says how this instance's view of the others stands (connected to
//! NATS, lag): a stale view does not make an instance unready, since it
//! still takes and stores points.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

/// How often the database (and, with `--ack-after log`, the log) is checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// How long the log's stream may take to answer a check.
const LOG_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Health {
    database_ok: AtomicBool,
    /// `--ack-after log`: the JetStream context and the name of the log's
    /// stream, which must answer for the instance to be ready.
    log: std::sync::OnceLock<(
        async_nats::jetstream::Context,
        String,
        Arc<crate::ingest_log::NotMade>,
    )>,
    /// Why the log does not answer, as the last check saw it.
    log_error: std::sync::Mutex<Option<String>>,
    log_ok: AtomicBool,
    shutting_down: AtomicBool,
    grpc: HealthReporter,
    cluster: std::sync::OnceLock<Arc<crate::cluster::Status>>,
}

impl Health {
    pub fn new(grpc: HealthReporter) -> Arc<Self> {
        Arc::new(Self {
            database_ok: AtomicBool::new(false),
            log: std::sync::OnceLock::new(),
            log_error: std::sync::Mutex::new(None),
            log_ok: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            grpc,
            cluster: std::sync::OnceLock::new(),
        })
    }

    /// Cluster mode: `/readyz` reports the view's status too.
    pub fn report_cluster(&self, status: Arc<crate::cluster::Status>) {
        let _ = self.cluster.set(status);
    }

    /// `--ack-after log`: ready while the log's stream `stream` answers
    /// through `js` (a connection to NATS is not enough: a JetStream that
    /// refused the stream, or turned itself off on a full disk, takes no
    /// appends).
    /// `not_made` says why the stream is missing, where it could not be
    /// made.
    pub fn follow_log(
        &self,
        js: async_nats::jetstream::Context,
        stream: String,
        not_made: Arc<crate::ingest_log::NotMade>,
    ) {
        let _ = self.log.set((js, stream, not_made));
    }

    /// Whether the log's stream answers, and why not.
    async fn check_log(&self) -> Option<Result<(), String>> {
        let (js, stream, not_made) = self.log.get()?;
        let answer = tokio::time::timeout(LOG_CHECK_TIMEOUT, js.get_stream(stream)).await;
        Some(match answer {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(match not_made.get() {
                Some(why) => format!("log stream {stream}: {e}; not made: {why}"),
                None => format!("log stream {stream}: {e}"),
            }),
            Err(_) => Err(format!(
                "log stream {stream}: no answer within {LOG_CHECK_TIMEOUT:?}"
            )),
        })
    }

    /// Whether locus can take points now.
    pub fn is_ready(&self) -> bool {
        let takes = match self.log.get() {
            Some(_) => self.log_ok.load(Ordering::Acquire),
            None => self.database_ok.load(Ordering::Acquire),
        };
        takes && !self.shutting_down.load(Ordering::Acquire)
    }

    async fn publish(&self) {
        let serving = |yes: bool| match yes {
            true => ServingStatus::Serving,
            false => ServingStatus::NotServing,
        };
        let ingest = serving(self.is_ready());
        let query = serving(
            self.database_ok.load(Ordering::Acquire) && !self.shutting_down.load(Ordering::Acquire),
        );
        self.grpc.set_service_status("", ingest).await;
        self.grpc
            .set_service_status("locus.v1.Ingest", ingest)
            .await;
        self.grpc.set_service_status("locus.v1.Query", query).await;
    }

    /// Not ready from now on.
    pub async fn shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.publish().await;
    }

    /// Checks the database every [`CHECK_INTERVAL`] until `stop`.
    pub async fn watch(self: Arc<Self>, pool: PgPool, stop: CancellationToken) {
        let mut last = None;
        loop {
            let db = tokio::select! {
                _ = stop.cancelled() => return,
                r = sqlx::query("SELECT 1").execute(&pool) => r.is_ok(),
            };
            let checked = self.check_log().await;
            let log = checked.as_ref().map(Result::is_ok);
            let why = checked.and_then(Result::err);
            *self.log_error.lock().unwrap_or_else(|p| p.into_inner()) = why.clone();
            if last != Some((db, log)) {
                self.database_ok.store(db, Ordering::Release);
                self.log_ok.store(log == Some(true), Ordering::Release);
                if stop.is_cancelled() {
                    return;
                }
                self.publish().await;
                match (db, log) {
                    (true, None | Some(true)) => tracing::info!("database reachable: ready"),
                    (false, None) => tracing::warn!("database unreachable: not ready"),
                    (false, Some(true)) => tracing::warn!(
                        "database unreachable: ready (--ack-after log: points wait in the log)"
                    ),
                    (_, Some(false)) => tracing::warn!(
                        error = why.as_deref().unwrap_or_default(),
                        "log unreachable: not ready (--ack-after log)"
                    ),
                }
                last = Some((db, log));
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(CHECK_INTERVAL) => {}
            }
        }
    }
}

/// `GET /healthz` (the process serves) and `GET /readyz` (it can take points).
pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({"status": "alive"})) }),
        )
        .route(
            "/readyz",
            get(|State(h): State<Arc<Health>>| async move {
                let (code, mut body) = if h.is_ready() {
                    (StatusCode::OK, json!({"status": "ready"}))
                } else {
                    let reason = if h.shutting_down.load(Ordering::Acquire) {
                        "shutting down"
                    } else if h.log.get().is_some() {
                        "log unreachable"
                    } else {
                        "database unreachable"
                    };
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        json!({"status": "not_ready", "reason": reason}),
                    )
                };
                if let Some(cluster) = h.cluster.get() {
                    body["cluster"] = json!(cluster.report());
                }
                let log_error = h
                    .log_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                if let Some(why) = log_error {
                    body["log"] = json!(why);
                }
                if h.log.get().is_some() {
                    body["database"] = json!(match h.database_ok.load(Ordering::Acquire) {
                        true => "reachable",
                        false => "unreachable: points wait in the log",
                    });
                }
                (code, Json(body))
            }),
        )
        .with_state(health)
}
