//! The consumer's context: rebalances (readiness, assigned partitions) and librdkafka's
//! statistics (lag per partition, against durable work).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use tracing::{info, warn};

use super::log::ClientLog;
use super::pending::Pending;
use crate::health::Health;
use crate::metrics::Metrics;

/// Rebalance state shared between librdkafka's callbacks and the rest of the process.
pub struct ConsumerState {
    /// `consumer_joined` is set once an assignment arrived (even an empty one).
    pub health: Arc<Health>,
    pub metrics: Metrics,
    /// Input in the lanes, for the lag in time.
    pub pending: Arc<Pending>,
    /// The partitions assigned, for the relay: it lets go of the streams of the others.
    pub assignment: Arc<Assignment>,
}

/// The input partitions this process's consumer owns, as `topic/partition` (the names of
/// the Kafka sink's live outbox streams), kept by the rebalance callbacks. The relay lets
/// go of a stream that leaves it.
#[derive(Default)]
pub struct Assignment(std::sync::Mutex<std::collections::BTreeSet<String>>);

impl Assignment {
    pub fn set(&self, partitions: impl IntoIterator<Item = String>) {
        *self.0.lock().expect("assignment lock") = partitions.into_iter().collect();
    }

    pub fn contains(&self, partition: &str) -> bool {
        self.0.lock().expect("assignment lock").contains(partition)
    }

    pub fn streams(&self) -> Vec<String> {
        self.0
            .lock()
            .expect("assignment lock")
            .iter()
            .cloned()
            .collect()
    }
}

/// The consumer's context: logs and records rebalances.
pub struct KdedupContext {
    pub state: Arc<ConsumerState>,
    /// librdkafka's errors and log lines, one per kind per 30 s.
    pub log: ClientLog,
}

impl ClientContext for KdedupContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.log.client_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.log.client_error(&error, reason);
    }

    /// librdkafka statistics (every `statistics.interval.ms`): lag per assigned partition,
    /// measured against the stored offset, i.e. against durable work, in messages and in
    /// time (the age of the oldest message read and not yet durable).
    fn stats(&self, stats: rdkafka::Statistics) {
        use prometheus::core::Collector;
        let lag = &self.state.metrics.consumer_lag;
        let lag_seconds = &self.state.metrics.consumer_lag_seconds;
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut live = std::collections::BTreeSet::new();
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 || p.fetch_state != "active" || p.consumer_lag_stored < 0 {
                    continue;
                }
                let partition = partition.to_string();
                lag.with_label_values(&[topic.as_str(), &partition])
                    .set(p.consumer_lag_stored);
                lag_seconds
                    .with_label_values(&[topic.as_str(), &partition])
                    .set(
                        self.state
                            .pending
                            .oldest_age_seconds(topic, p.partition, now_ms),
                    );
                live.insert((topic.clone(), partition));
            }
        }
        // Series of partitions no longer fetched go away; the others were overwritten in
        // place, so a scrape never sees the lag of an assigned partition missing.
        for family in lag.collect() {
            for m in family.get_metric() {
                let labels: std::collections::BTreeMap<&str, &str> = m
                    .get_label()
                    .iter()
                    .map(|l| (l.name(), l.value()))
                    .collect();
                let (Some(topic), Some(partition)) = (labels.get("topic"), labels.get("partition"))
                else {
                    continue;
                };
                if !live.contains(&(topic.to_string(), partition.to_string())) {
                    let _ = lag.remove_label_values(&[topic, partition]);
                    let _ = lag_seconds.remove_label_values(&[topic, partition]);
                }
            }
        }
    }
}

impl ConsumerContext for KdedupContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Stored offsets cover only durable work, and librdkafka's auto-commit commits
            // them before the revoke completes. Work not yet durable is redelivered to the
            // next owner and absorbed by the gate.
            info!(partitions = tpl.count(), "partitions revoked");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts: Vec<String> = tpl
                    .elements()
                    .iter()
                    .map(|e| format!("{}/{}", e.topic(), e.partition()))
                    .collect();
                info!(partitions = ?parts, "partitions assigned");
                self.state.assignment.set(parts.iter().cloned());
                self.state
                    .metrics
                    .assigned_partitions
                    .set(tpl.count() as i64);
                self.state
                    .health
                    .consumer_joined
                    .store(true, Ordering::Release);
                self.state.metrics.consumer_joined.set(1);
            }
            Rebalance::Revoke(_) => {
                // Not ready until the next assignment: a consumer evicted from its group
                // (or between two rebalance steps) is not consuming.
                self.state.assignment.set([]);
                self.state.metrics.assigned_partitions.set(0);
                self.state
                    .health
                    .consumer_joined
                    .store(false, Ordering::Release);
                self.state.metrics.consumer_joined.set(0);
            }
            Rebalance::Error(e) => {
                warn!(error = %e, "rebalance error");
            }
        }
    }
}
