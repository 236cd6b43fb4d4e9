//! Admin HTTP server: `/metrics` (Prometheus text format), `/livez`, `/readyz`.
//!
//! `/livez` answers 200 while the process serves requests: restarting a sidecar whose
//! Postgres is down would not bring Postgres back, so liveness does not depend on it.
//! `/readyz` answers 200 only when Postgres and the broker answered their last check, the
//! consumer has joined its group and kdedup's own topics exist; the body says which check
//! failed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::metrics::Metrics as MetricSet;

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
    let unchecked = s.health.unchecked();
    if failing.is_empty() && unchecked.is_empty() {
        return (StatusCode::OK, "ready\n".to_string());
    }
    let mut body = String::from("not ready:");
    if !failing.is_empty() {
        body += &format!(" {}", failing.join(", "));
    }
    if !unchecked.is_empty() {
        body += &format!(
            "{}not checked yet: {}",
            if failing.is_empty() { " " } else { "; " },
            unchecked.join(", ")
        );
    }
    (StatusCode::SERVICE_UNAVAILABLE, body + "\n")
}

/// Longest a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection stays open, idle keep-alive included; a scraper reconnects.
const CONNECTION_MAX_AGE: Duration = Duration::from_secs(60);
/// Most connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 32;

/// Binds `addr` (so a taken port fails start-up) and serves until `stop` fires.
///
/// The accept loop is kdedup's own so that every connection is bounded: headers must
/// arrive within [`HEADER_READ_TIMEOUT`], a connection lives at most
/// [`CONNECTION_MAX_AGE`], and at most [`MAX_CONNECTIONS`] are open at once. A slow or
/// idle client (or many) cannot hold the probes' and the scraper's port.
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
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            while connections.try_join_next().is_some() {}
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait a moment rather than spin.
                    tracing::warn!(error = %e, "admin server cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!("admin server at its connection limit; connection closed");
                continue;
            };
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            let stop = stop.clone();
            connections.spawn(async move {
                let _slot = slot;
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = tokio::time::sleep(CONNECTION_MAX_AGE) => {}
                    _ = stop.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                    }
                }
            });
        }
        connections.shutdown().await;
    });
    Ok((bound, handle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> Option<String> {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        Some(out)
    }

    #[tokio::test]
    async fn slow_and_idle_clients_cannot_hold_the_admin_port() {
        let stop = CancellationToken::new();
        let (addr, task) = serve(
            "127.0.0.1:0".parse().unwrap(),
            MetricSet::new(),
            Arc::new(Health::default()),
            stop.clone(),
        )
        .await
        .unwrap();
        assert!(get(addr, "/livez").await.unwrap().contains("200 OK"));

        // Twice the connection cap, each sending half a request line and then nothing.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS * 2 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = s.write_all(b"GET /metr").await;
            idle.push(s);
        }
        // The server closes each within the header-read timeout (plus scheduling).
        let started = std::time::Instant::now();
        for s in &mut idle {
            let mut buf = [0u8; 256];
            let read = tokio::time::timeout(HEADER_READ_TIMEOUT * 2, s.read(&mut buf)).await;
            assert!(read.is_ok(), "a silent client was not cut off");
        }
        assert!(started.elapsed() < HEADER_READ_TIMEOUT * 2);
        // And the probes answer again.
        assert!(get(addr, "/livez").await.unwrap().contains("200 OK"));
        stop.cancel();
        task.await.unwrap();
    }
}
