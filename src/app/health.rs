//! The health loop: refreshes the readiness inputs and the table gauges every 2 s, and
//! stops the process when the producer failed for good.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;
use rdkafka::producer::FutureProducer;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::health::Health;
use crate::metrics::Metrics;
use crate::store::{self, stats};

/// Where the health checks report a fatal Kafka client error: the reason, and the stop
/// token of the consumer so that the process drains and exits.
pub(super) struct Fatal {
    pub(super) reason: Arc<std::sync::Mutex<Option<String>>>,
    pub(super) stop: CancellationToken,
}

/// Refreshes the Postgres and broker readiness inputs every few seconds.
pub(super) struct HealthChecks {
    pub(super) pool: PgPool,
    pub(super) producer: FutureProducer,
    /// One of kdedup's own topics, whose metadata says the cluster answers.
    pub(super) probe_topic: String,
    pub(super) health: Arc<Health>,
    pub(super) metrics: Metrics,
    pub(super) fatal: Fatal,
    /// Notified when the outbox emptied: the table gauges are refreshed at once.
    pub(super) tables_changed: Arc<Notify>,
}

pub(super) async fn health_checks(checks: HealthChecks, stop: CancellationToken) {
    let HealthChecks {
        pool,
        producer,
        probe_topic,
        health,
        metrics,
        fatal,
        tables_changed,
    } = checks;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
            // The relay emptied the outbox: refresh the table gauges now, not in 2 s.
            _ = tables_changed.notified() => {
                refresh_table_gauges(&pool, &metrics).await;
                continue;
            }
        }
        let pg = tokio::time::timeout(Duration::from_secs(3), store::ping(&pool))
            .await
            .is_ok_and(|r| r.is_ok());
        record_check(&health.postgres_up, &metrics.postgres_up, pg, "postgres");
        if pg {
            refresh_table_gauges(&pool, &metrics).await;
        }

        let (p, t) = (producer.clone(), probe_topic.clone());
        let broker = tokio::task::spawn_blocking(move || {
            use rdkafka::producer::Producer;
            // One of kdedup's own topics: metadata of every topic in a large cluster is
            // a heavy request to make every 2 s from every replica.
            p.client()
                .fetch_metadata(Some(&t), Duration::from_secs(3))
                .is_ok_and(|md| !md.brokers().is_empty())
        })
        .await
        .unwrap_or(false);
        record_check(
            &health.broker_up,
            &metrics.broker_up,
            broker,
            "kafka cluster",
        );

        // An idempotent producer that hit a fatal error (fenced, out-of-order sequence)
        // fails every later produce: dead letters and the relay would retry for ever.
        // librdkafka cannot recover it; a new process can.
        use rdkafka::producer::Producer;
        if let Some((code, reason)) = producer.client().fatal_error() {
            error!(code = ?code, reason, "kafka producer hit a fatal error; stopping so that the process restarts");
            *fatal.reason.lock().expect("fatal lock") = Some(format!("{code:?}: {reason}"));
            fatal.stop.cancel();
            return;
        }
    }
}

/// Records one check's result in the readiness flag and its gauge, and logs a change
/// ("postgres reachable", "kafka cluster unreachable").
fn record_check(flag: &AtomicBool, gauge: &IntGauge, up: bool, what: &str) {
    if up != flag.swap(up, Ordering::AcqRel) {
        if up {
            info!("{what} reachable")
        } else {
            warn!("{what} unreachable")
        }
    }
    gauge.set(up as i64);
}

/// The one writer of the table gauges (on every replica, so a standby relay or pruner
/// still reports them). A refresh that fails (a slow database) is skipped.
async fn refresh_table_gauges(pool: &PgPool, metrics: &Metrics) {
    if let Ok(t) = stats::table_stats(pool).await {
        metrics.processed_events_rows.set(t.processed_events_rows);
        metrics.outbox_backlog.set(t.outbox_backlog);
        metrics.outbox_oldest_age.set(t.outbox_oldest_age_s);
        metrics.oldest_row_age.set(t.oldest_row_age_s);
    }
}
