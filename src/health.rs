//! Liveness and readiness, for gRPC (`grpc.health.v1`) and HTTP (`/healthz`,
//! `/readyz`). Ready means: the database answers and locus is not shutting
//! down. Shutdown turns both to not ready at once. In cluster mode `/readyz`
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

/// How often the database is checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct Health {
    database_ok: AtomicBool,
    shutting_down: AtomicBool,
    grpc: HealthReporter,
    cluster: std::sync::OnceLock<Arc<crate::cluster::Status>>,
}

impl Health {
    pub fn new(grpc: HealthReporter) -> Arc<Self> {
        Arc::new(Self {
            database_ok: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            grpc,
            cluster: std::sync::OnceLock::new(),
        })
    }

    /// Cluster mode: `/readyz` reports the view's status too.
    pub fn report_cluster(&self, status: Arc<crate::cluster::Status>) {
        let _ = self.cluster.set(status);
    }

    pub fn is_ready(&self) -> bool {
        self.database_ok.load(Ordering::Acquire) && !self.shutting_down.load(Ordering::Acquire)
    }

    async fn publish(&self) {
        let status = if self.is_ready() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.grpc.set_service_status("", status).await;
        self.grpc
            .set_service_status("locus.v1.Ingest", status)
            .await;
        self.grpc.set_service_status("locus.v1.Query", status).await;
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
            let ok = tokio::select! {
                _ = stop.cancelled() => return,
                r = sqlx::query("SELECT 1").execute(&pool) => r.is_ok(),
            };
            if last != Some(ok) {
                self.database_ok.store(ok, Ordering::Release);
                if stop.is_cancelled() {
                    return;
                }
                self.publish().await;
                if ok {
                    tracing::info!("database reachable: ready");
                } else {
                    tracing::warn!("database unreachable: not ready");
                }
                last = Some(ok);
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
                (code, Json(body))
            }),
        )
        .with_state(health)
}
