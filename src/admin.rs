//! Admin HTTP server: `/metrics` (Prometheus text format), `/livez`, `/readyz`.
//!
//! `/livez` answers 200 while the process serves requests: restarting a sidecar whose
//! Postgres is down would not bring Postgres back, so liveness does not depend on it.
//! `/readyz` answers 200 only when Postgres and the broker answered their last check and
//! the consumer has joined its group; the body says which check failed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics as MetricSet;

/// Readiness inputs, written by the health checker and the consumer's rebalance callback.
#[derive(Default)]
pub struct Health {
    pub postgres_up: AtomicBool,
    pub broker_up: AtomicBool,
    pub consumer_joined: AtomicBool,
}

impl Health {
    /// Names of the checks that currently fail.
    pub fn failing(&self) -> Vec<&'static str> {
        let mut failing = Vec::new();
        if !self.postgres_up.load(Ordering::Acquire) {
            failing.push("postgres");
        }
        if !self.broker_up.load(Ordering::Acquire) {
            failing.push("broker");
        }
        if !self.consumer_joined.load(Ordering::Acquire) {
            failing.push("consumer_group");
        }
        failing
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: MetricSet,
    health: Arc<Health>,
}

async fn render_metrics(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let failing = s.health.failing();
    if failing.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", failing.join(", ")),
        )
    }
}

/// Binds `addr` (so a taken port fails start-up) and serves until `stop` fires.
pub async fn serve(
    addr: SocketAddr,
    metrics: MetricSet,
    health: Arc<Health>,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(AdminState { metrics, health });
    let handle = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    Ok((bound, handle))
}
