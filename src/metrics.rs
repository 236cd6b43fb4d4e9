//! Prometheus metrics. One [`Registry`] is created at start and passed down; nothing is
//! registered globally, so tests can run several pipelines in one process.
//!
//! Labels are bounded: topic, partition, reason, cause, outcome. Never an event id.

use prometheus::core::Collector;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Why a duplicate came: the `cause` label of `kdedup_duplicates_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Same topic/partition/offset as the first sighting: Kafka delivered it again.
    Redelivery,
    /// Re-fed by `kdedup replay`.
    Replay,
    /// Anything else: a producer retry, a client that sent it twice.
    Upstream,
}

impl Cause {
    pub const ALL: [Cause; 3] = [Cause::Redelivery, Cause::Upstream, Cause::Replay];

    pub fn label(self) -> &'static str {
        match self {
            Cause::Redelivery => "redelivery",
            Cause::Replay => "replay",
            Cause::Upstream => "upstream",
        }
    }
}

/// Every metric kdedup exports, with help text.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Messages read from input topics, by topic.
    pub events_consumed: IntCounterVec,
    /// Events the gate refused because their id was already recorded, by cause.
    pub duplicates: IntCounterVec,
    /// Events that passed the gate and whose outbox row was committed.
    pub events_gated: IntCounter,
    /// Events the sink delivered: outbox rows the broker acknowledged on the output topic
    /// (Kafka sink), rows committed in the gate transaction (Postgres sink).
    pub events_forwarded: IntCounter,
    /// Messages sent to the dead-letter topic, by reason.
    pub dead_lettered: IntCounterVec,
    /// Ids reused with a different payload, by action (skipped, dead_lettered).
    pub payload_mismatches: IntCounterVec,
    pub batch_duration: Histogram,
    /// One gate transaction (statement + COMMIT), successful attempts only.
    pub gate_duration: Histogram,
    pub batch_size: Histogram,
    pub gate_retries: IntCounter,
    /// Postgres sink: rows its statement reported (inserted, updated or returned).
    pub sink_rows_written: IntCounter,
    /// Postgres sink: one run of its statement, inside the gate transaction.
    pub sink_statement_duration: Histogram,
    /// Postgres sink: events its statement refused as data, by SQLSTATE class.
    pub sink_rejected: IntCounterVec,
    /// Postgres sink: failures of its statement that are not the rows' fault (the batch is
    /// retried), by SQLSTATE class (`none`: no answer from the server).
    pub sink_errors: IntCounterVec,
    pub outbox_backlog: IntGauge,
    pub relay_active: IntGauge,
    pub relay_streams: IntGauge,
    pub relay_takeovers: IntCounter,
    pub relay_rows_read_back: IntCounter,
    pub relay_postgres_seconds: prometheus::Counter,
    pub outbox_slots_truncated: IntCounter,
    pub relay_failures: IntCounter,
    /// Input fetches librdkafka could not decode (a compression codec it lacks, a corrupt
    /// batch): the partition makes no progress until it can.
    pub input_undecodable: IntCounter,
    pub relay_publish_duration: Histogram,
    pub postgres_up: IntGauge,
    pub broker_up: IntGauge,
    pub consumer_joined: IntGauge,
    pub assigned_partitions: IntGauge,
    pub ttl_seconds: IntGauge,
    pub rows_pruned: IntCounter,
    pub prune_batches: IntCounter,
    pub prune_duration: Histogram,
    pub oldest_row_age: IntGauge,
    pub consumer_lag: IntGaugeVec,
    /// Age of the oldest input message read and not yet durable, per assigned partition.
    pub consumer_lag_seconds: GaugeVec,
    pub input_retention: IntGaugeVec,
    pub processed_events_rows: IntGauge,
    pub outbox_oldest_age: IntGauge,
    pub build_info: IntGaugeVec,
    /// What this process serves (group, schema, scope, sink, output); always 1. Alerts and
    /// panels join on it to tell two kdedup Deployments of one namespace apart.
    pub config_info: IntGaugeVec,
    /// Live sidecars whose configuration conflicts with this one's (another schema for the
    /// same group or output, another output in this schema): each is a way to forward twice.
    pub config_conflicts: IntGauge,
    pub latency: HistogramVec,
}

/// Registers `metric` on `registry` as it is made, so a new metric is one field and one
/// constructor call.
fn reg<M: Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::with_opts(Opts::new(name, help)).expect("valid metric")
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::with_opts(Opts::new(name, help)).expect("valid metric")
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let seconds_buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let m = Metrics {
            events_consumed: reg(
                &registry,
                counter_vec(
                    "kdedup_events_consumed_total",
                    "Messages read from the input topics.",
                    &["topic"],
                ),
            ),
            duplicates: reg(
                &registry,
                counter_vec(
                    "kdedup_duplicates_total",
                    "Events not forwarded because their (scope, event_id) was already recorded. cause: redelivery (same topic/partition/offset as the first sighting), replay (re-fed by kdedup replay), upstream (anything else).",
                    &["cause"],
                ),
            ),
            events_gated: reg(
                &registry,
                counter(
                    "kdedup_events_gated_total",
                    "First-seen events whose gate row and outbox row were committed.",
                ),
            ),
            events_forwarded: reg(
                &registry,
                counter(
                    "kdedup_events_forwarded_total",
                    "Events the sink delivered: acknowledged on the output topic (kafka), committed with the application's row (postgres).",
                ),
            ),
            dead_lettered: reg(
                &registry,
                counter_vec(
                    "kdedup_events_dead_lettered_total",
                    "Messages sent to the dead-letter topic, by reason.",
                    &["reason"],
                ),
            ),
            payload_mismatches: reg(
                &registry,
                counter_vec(
                    "kdedup_payload_mismatches_total",
                    "Events whose id was already recorded with a different payload (a producer bug, not a duplicate), by action taken.",
                    &["action"],
                ),
            ),
            batch_duration: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "kdedup_batch_duration_seconds",
                        "Time to make one batch durable: dead-letter produce plus the gate transaction.",
                    )
                    .buckets(seconds_buckets.clone()),
                )
                .expect("valid metric"),
            ),
            gate_duration: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "kdedup_gate_transaction_duration_seconds",
                        "Time of one successful gate transaction: the gate statement and its COMMIT.",
                    )
                    .buckets(seconds_buckets.clone()),
                )
                .expect("valid metric"),
            ),
            batch_size: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new("kdedup_batch_size", "Messages per gate batch.")
                        .buckets(vec![1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0]),
                )
                .expect("valid metric"),
            ),
            gate_retries: reg(
                &registry,
                counter(
                    "kdedup_gate_retries_total",
                    "Gate transactions retried after a Postgres error.",
                ),
            ),
            sink_rows_written: reg(
                &registry,
                counter(
                    "kdedup_sink_rows_written_total",
                    "Postgres sink: rows the sink statement wrote (as it reported them), committed or not.",
                ),
            ),
            sink_statement_duration: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "kdedup_sink_statement_duration_seconds",
                        "Postgres sink: one run of the sink statement in the gate transaction.",
                    )
                    .buckets(seconds_buckets.clone()),
                )
                .expect("valid metric"),
            ),
            sink_rejected: reg(
                &registry,
                counter_vec(
                    "kdedup_sink_rejected_total",
                    "Postgres sink: events the sink statement refused as data and that were dead-lettered (sink_rejected), by SQLSTATE class.",
                    &["sqlstate_class"],
                ),
            ),
            sink_errors: reg(
                &registry,
                counter_vec(
                    "kdedup_sink_errors_total",
                    "Postgres sink: sink statement failures that are not the events' fault; the batch is retried. By SQLSTATE class (none: no answer).",
                    &["sqlstate_class"],
                ),
            ),
            outbox_backlog: reg(
                &registry,
                gauge(
                    "kdedup_outbox_backlog",
                    "Outbox rows committed but not yet published, over all streams of the schema (every replica reads the same figure).",
                ),
            ),
            relay_active: reg(
                &registry,
                gauge(
                    "kdedup_relay_active",
                    "1 when this process's relay holds at least one outbox stream and publishes it.",
                ),
            ),
            relay_streams: reg(
                &registry,
                gauge(
                    "kdedup_relay_streams",
                    "Outbox streams (input partitions) this process's relay holds and publishes.",
                ),
            ),
            relay_takeovers: reg(
                &registry,
                counter(
                    "kdedup_relay_takeovers_total",
                    "Streams taken over: the output topic's tail read back so that nothing is published twice (at start, after a rebalance, after a failed produce).",
                ),
            ),
            relay_rows_read_back: reg(
                &registry,
                counter(
                    "kdedup_relay_rows_read_back_total",
                    "Outbox rows the relay read back from Postgres instead of taking them from the gate lanes in memory (take-overs, gaps, a relay that fell behind).",
                ),
            ),
            relay_postgres_seconds: reg(
                &registry,
                prometheus::Counter::new(
                    "kdedup_relay_postgres_seconds_total",
                    "Time the relay's publishing loop spent waiting on Postgres: stream locks, checkpoints, read-backs and counter checks (none of it per row; slots are reclaimed beside the loop).",
                )
                .expect("valid metric"),
            ),
            outbox_slots_truncated: reg(
                &registry,
                counter(
                    "kdedup_outbox_slots_truncated_total",
                    "Outbox slots emptied with TRUNCATE once every row in them was published.",
                ),
            ),
            relay_failures: reg(
                &registry,
                counter(
                    "kdedup_relay_delivery_failures_total",
                    "Outbox rows whose produce failed and will be retried.",
                ),
            ),
            input_undecodable: reg(
                &registry,
                counter(
                    "kdedup_input_undecodable_total",
                    "Consumer errors for input librdkafka cannot decode (unsupported compression codec, corrupt record batch). The partition is stuck until fixed; /readyz is 503 meanwhile.",
                ),
            ),
            relay_publish_duration: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "kdedup_relay_publish_duration_seconds",
                        "Time from the relay's send of an outbox row to the broker's acknowledgement.",
                    )
                    .buckets(seconds_buckets.clone()),
                )
                .expect("valid metric"),
            ),
            postgres_up: reg(
                &registry,
                gauge("kdedup_postgres_up", "1 when Postgres answered the last check."),
            ),
            broker_up: reg(
                &registry,
                gauge("kdedup_broker_up", "1 when the Kafka cluster answered the last metadata request."),
            ),
            consumer_joined: reg(
                &registry,
                gauge(
                    "kdedup_consumer_joined",
                    "1 once the consumer has joined its group and received an assignment.",
                ),
            ),
            assigned_partitions: reg(
                &registry,
                gauge(
                    "kdedup_assigned_partitions",
                    "Input partitions currently assigned to this instance.",
                ),
            ),
            ttl_seconds: reg(
                &registry,
                gauge("kdedup_ttl_seconds", "Configured TTL of processed_events rows."),
            ),
            rows_pruned: reg(
                &registry,
                counter(
                    "kdedup_rows_pruned_total",
                    "processed_events rows deleted by the TTL pruner.",
                ),
            ),
            prune_batches: reg(
                &registry,
                counter(
                    "kdedup_prune_batches_total",
                    "Delete transactions run by the TTL pruner.",
                ),
            ),
            prune_duration: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "kdedup_prune_round_duration_seconds",
                        "Time for one pruner round (all batches until no expired row is left).",
                    )
                    .buckets(vec![0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0]),
                )
                .expect("valid metric"),
            ),
            oldest_row_age: reg(
                &registry,
                gauge(
                    "kdedup_oldest_row_age_seconds",
                    "Age of the oldest processed_events row (the one that expires first).",
                ),
            ),
            consumer_lag: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "kdedup_consumer_lag",
                        "Messages between the partition's high watermark and the last durable (stored) offset, per assigned partition.",
                    ),
                    &["topic", "partition"],
                )
                .expect("valid metric"),
            ),
            consumer_lag_seconds: reg(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        "kdedup_consumer_lag_seconds",
                        "Age (now minus the input timestamp) of the oldest message of the partition read and not yet durable; 0 when none waits. Per assigned partition.",
                    ),
                    &["topic", "partition"],
                )
                .expect("valid metric"),
            ),
            input_retention: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "kdedup_input_retention_seconds",
                        "retention.ms of each input topic, in seconds (-1: unlimited). A TTL shorter than this lets a replay slip through.",
                    ),
                    &["topic"],
                )
                .expect("valid metric"),
            ),
            processed_events_rows: reg(
                &registry,
                gauge(
                    "kdedup_processed_events_rows",
                    "Estimated rows in processed_events (Postgres statistics).",
                ),
            ),
            outbox_oldest_age: reg(
                &registry,
                gauge(
                    "kdedup_outbox_oldest_age_seconds",
                    "Age of the oldest outbox row not yet acknowledged (0 when empty).",
                ),
            ),
            build_info: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new("kdedup_build_info", "Build information; always 1."),
                    &["version", "rdkafka_version"],
                )
                .expect("valid metric"),
            ),
            config_info: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "kdedup_config_info",
                        "What this sidecar serves; always 1. output is the output topic (kafka sink) or the sink's target (postgres sink).",
                    ),
                    &["group_id", "schema", "scope", "sink", "output_topic"],
                )
                .expect("valid metric"),
            ),
            config_conflicts: reg(
                &registry,
                gauge(
                    "kdedup_config_conflicts",
                    "Live sidecars whose configuration conflicts with this one's: the same group or output topic gated in another schema, or another output served from this schema. Each one forwards events twice or to the wrong place.",
                ),
            ),
            latency: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "kdedup_latency_seconds",
                        "End-to-end latency by stage: input_to_commit (input message timestamp to gate commit), commit_to_ack (gate commit to output acknowledgement).",
                    )
                    .buckets(vec![
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    ]),
                    &["stage"],
                )
                .expect("valid metric"),
            ),
            registry,
        };
        let (_, rdkafka_version) = rdkafka::util::get_rdkafka_version();
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), &rdkafka_version])
            .set(1);
        // Pre-create the series dashboards and alerts read, so they exist at zero.
        for cause in Cause::ALL {
            m.duplicates.with_label_values(&[cause.label()]);
        }
        for stage in ["input_to_commit", "commit_to_ack"] {
            m.latency.with_label_values(&[stage]);
        }
        m
    }

    /// The registry in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }

    /// Sum of `kdedup_duplicates_total` over causes.
    pub fn duplicates_total(&self) -> u64 {
        Cause::ALL
            .iter()
            .map(|c| self.duplicates.with_label_values(&[c.label()]).get())
            .sum()
    }

    pub fn dead_lettered_total(&self) -> u64 {
        self.dead_lettered
            .collect()
            .iter()
            .flat_map(|mf| mf.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    pub fn consumed_total(&self) -> u64 {
        self.events_consumed
            .collect()
            .iter()
            .flat_map(|mf| mf.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
