//! The health loop: refreshes the readiness inputs and the table gauges every 2 s, and
//! stops the process when the producer failed for good.

use std::sync::Arc;
use std::time::Duration;

use crate::kafka::Producer;
use prometheus::IntGauge;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::health::{Check, Health};
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
    pub(super) producer: Producer,
    /// kdedup's own topics (the output topic of the Kafka sink, the dead-letter topic):
    /// their metadata says whether the cluster answers and whether they exist.
    pub(super) own_topics: Vec<String>,
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
        own_topics,
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
        record_check(&health.postgres, &metrics.postgres_up, pg, "postgres");
        if pg {
            refresh_table_gauges(&pool, &metrics).await;
        }

        let (p, topics) = (producer.clone(), own_topics.clone());
        let (broker, missing) = tokio::task::spawn_blocking(move || own_topics_state(&p, &topics))
            .await
            .unwrap_or((false, Vec::new()));
        record_check(&health.broker, &metrics.broker_up, broker, "kafka cluster");
        if broker {
            record_missing_topics(&health, missing);
        }

        // An idempotent producer that hit a fatal error (fenced, out-of-order sequence)
        // fails every later produce: dead letters and the relay would retry for ever.
        // librdkafka cannot recover it; a new process can.
        use rdkafka::producer::Producer as _;
        if let Some((code, reason)) = producer.client().fatal_error() {
            error!(code = ?code, reason, "kafka producer hit a fatal error; stopping so that the process restarts");
            *fatal.reason.lock().expect("fatal lock") = Some(format!("{code:?}: {reason}"));
            fatal.stop.cancel();
            return;
        }
    }
}

/// Whether the cluster answers, and which of `topics` it says do not exist. Only kdedup's
/// own topics are asked for: metadata of every topic of a large cluster is a heavy request
/// to make every 2 s from every replica.
fn own_topics_state(producer: &Producer, topics: &[String]) -> (bool, Vec<String>) {
    use rdkafka::producer::Producer as _;
    use rdkafka::types::RDKafkaRespErr;
    let mut answered = false;
    let mut missing = Vec::new();
    for topic in topics {
        let Ok(md) = producer
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(3))
        else {
            continue;
        };
        if md.brokers().is_empty() {
            continue;
        }
        answered = true;
        let unknown = match md.topics().iter().find(|t| t.name() == topic) {
            None => true,
            Some(t) => matches!(
                t.error(),
                Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART)
            ),
        };
        if unknown {
            missing.push(topic.clone());
        }
    }
    (answered, missing)
}

/// Keeps the missing topics for `/readyz` and says when that changes: a topic kdedup must
/// write to and cannot is an ERROR (nothing it should deliver there can be delivered).
fn record_missing_topics(health: &Health, missing: Vec<String>) {
    let mut known = health.missing_topics.lock().expect("health lock");
    for topic in missing.iter().filter(|t| !known.contains(t)) {
        error!(topic, "a topic kdedup writes to does not exist: nothing bound for it can be delivered, and /readyz fails until it does. \
               Create it (same partitions as the input, your usual replication), or set KDEDUP_CREATE_TOPICS=true");
    }
    for topic in known.iter().filter(|t| !missing.contains(t)) {
        info!(topic, "topic exists now");
    }
    *known = missing;
}

/// Records one check's result in the readiness flag and its gauge, and logs a change
/// ("postgres reachable", "kafka cluster unreachable").
fn record_check(check: &Check, gauge: &IntGauge, up: bool, what: &str) {
    if Some(up) != check.set(up) {
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
/// Bounded in time like the ping: on a connection that stopped answering (a network that
/// drops packets) the read would otherwise wait for ever, and with it every later check,
/// so readiness would never drop.
async fn refresh_table_gauges(pool: &PgPool, metrics: &Metrics) {
    let read = tokio::time::timeout(Duration::from_secs(3), stats::table_stats(pool)).await;
    if let Ok(Ok(t)) = read {
        metrics.processed_events_rows.set(t.processed_events_rows);
        metrics.outbox_backlog.set(t.outbox_backlog);
        metrics.outbox_oldest_age.set(t.outbox_oldest_age_s);
        metrics.oldest_row_age.set(t.oldest_row_age_s);
    }
}
