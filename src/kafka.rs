//! Kafka clients: how each one is configured, the consumer's rebalance bookkeeping, and
//! creation of the output and dead-letter topics.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;
use tracing::{info, warn};

use crate::admin::Health;
use crate::config::{ClientKind, KafkaProperties};
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    /// The text is redacted (see [`client`]): librdkafka quotes property values.
    #[error("kafka client could not be created: {0}")]
    Client(String),
    #[error("input topic {topic:?} does not exist (or this principal cannot Describe it); create it first or grant DESCRIBE on it")]
    MissingInputTopic { topic: String },
    #[error("broker refused to create topic {topic:?}: {reason}. Create it yourself, or grant this principal the CREATE permission on the topic (or cluster), or set KDEDUP_CREATE_TOPICS=false if it exists")]
    CreateTopic { topic: String, reason: String },
    #[error("could not read cluster metadata from {brokers}: {source}. Check KDEDUP_BROKERS and the security settings (KDEDUP_KAFKA_SECURITY_PROTOCOL, ...)")]
    Metadata {
        brokers: String,
        #[source]
        source: KafkaError,
    },
}

/// Settings every kdedup Kafka client shares.
pub fn base_config(brokers: &str, props: &KafkaProperties, kind: ClientKind) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("client.id", "kdedup");
    props.apply(&mut c, kind);
    c
}

/// Consumer: offsets are stored by kdedup after the Postgres commit, and committed by
/// librdkafka's auto-commit (which also commits them on revoke and close).
pub fn consumer_config(brokers: &str, group_id: &str, props: &KafkaProperties) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("client.id", "kdedup")
        .set("group.id", group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("statistics.interval.ms", "5000");
    props.apply(&mut c, ClientKind::Consumer);
    // librdkafka prefetches up to 64 MiB per consumer by default. Draining a backlog, that
    // put the sidecar's peak RSS at 98.5 MiB; 16 MiB (one full batch at the default
    // --batch-max-bytes) keeps it near 75 MiB at the same throughput (bench/README.md).
    c.set_default("queued.max.messages.kbytes", "16384");
    // Applied last: the whole design depends on it.
    c.set("enable.auto.offset.store", "false");
    c
}

/// Producer for the output and dead-letter topics: idempotent, `acks=all`, so a retried
/// produce neither duplicates nor reorders within a partition.
pub fn producer_config(brokers: &str, props: &KafkaProperties) -> ClientConfig {
    let mut c = base_config(brokers, props, ClientKind::Producer);
    c.set_default("linger.ms", "5");
    c.set_default("compression.type", "lz4");
    // librdkafka queues up to 1 GiB by default. The relay's rounds are bounded by
    // --relay-batch-max-bytes (16 MiB), so 32 MiB holds a round and dead letters with room;
    // a full queue makes the relay wait (QueueFull), it loses nothing.
    c.set_default("queue.buffering.max.kbytes", "32768");
    c.set("enable.idempotence", "true").set("acks", "all");
    c
}

trait SetDefault {
    fn set_default(&mut self, key: &str, value: &str) -> &mut Self;
}

impl SetDefault for ClientConfig {
    fn set_default(&mut self, key: &str, value: &str) -> &mut Self {
        if self.get(key).is_none() {
            self.set(key, value);
        }
        self
    }
}

/// Rebalance state shared between librdkafka's callbacks and the rest of the process.
pub struct ConsumerState {
    /// `consumer_joined` is set once an assignment arrived (even an empty one).
    pub health: Arc<Health>,
    pub metrics: Metrics,
}

/// The consumer's context: logs and records rebalances.
pub struct KdedupContext {
    pub state: Arc<ConsumerState>,
}

impl ClientContext for KdedupContext {
    fn error(&self, error: KafkaError, reason: &str) {
        warn!(error = %error, reason, "kafka client error");
    }

    /// librdkafka statistics (every `statistics.interval.ms`): lag per assigned partition,
    /// measured against the stored offset, i.e. against durable work.
    fn stats(&self, stats: rdkafka::Statistics) {
        use prometheus::core::Collector;
        let lag = &self.state.metrics.consumer_lag;
        let mut live = std::collections::BTreeSet::new();
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 || p.fetch_state != "active" || p.consumer_lag_stored < 0 {
                    continue;
                }
                let partition = partition.to_string();
                lag.with_label_values(&[topic.as_str(), &partition])
                    .set(p.consumer_lag_stored);
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

pub type Consumer = StreamConsumer<KdedupContext>;

/// Creates a client from `config`. Every kdedup client is made here, so that no error of
/// librdkafka's (which quote the offending property's value) is shown unredacted.
pub fn client<T, C>(config: &ClientConfig, context: C) -> Result<T, KafkaSetupError>
where
    C: ClientContext,
    T: rdkafka::config::FromClientConfigAndContext<C>,
{
    config.create_with_context(context).map_err(|e| {
        KafkaSetupError::Client(crate::config::redact_property_values(
            &e.to_string(),
            config.config_map(),
        ))
    })
}

pub fn consumer(
    brokers: &str,
    group_id: &str,
    props: &KafkaProperties,
    state: Arc<ConsumerState>,
) -> Result<Consumer, KafkaSetupError> {
    client(
        &consumer_config(brokers, group_id, props),
        KdedupContext { state },
    )
}

pub fn producer(brokers: &str, props: &KafkaProperties) -> Result<FutureProducer, KafkaSetupError> {
    client(&producer_config(brokers, props), DefaultClientContext)
}

/// Partition count of each named topic; `None` when the topic does not exist.
pub fn partition_count(
    producer: &FutureProducer,
    brokers: &str,
    topic: &str,
    timeout: Duration,
) -> Result<Option<usize>, KafkaSetupError> {
    use rdkafka::producer::Producer;
    let md = producer
        .client()
        .fetch_metadata(Some(topic), timeout)
        .map_err(|source| KafkaSetupError::Metadata {
            brokers: brokers.to_string(),
            source,
        })?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.partitions().len()))
}

/// Creates each topic in `topics` that does not exist yet, with `partitions` partitions.
pub async fn ensure_topics(
    brokers: &str,
    props: &KafkaProperties,
    topics: &[&str],
    partitions: i32,
    replication: i32,
) -> Result<(), KafkaSetupError> {
    let admin: AdminClient<DefaultClientContext> = client(
        &base_config(brokers, props, ClientKind::Admin),
        DefaultClientContext,
    )?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replication)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(new_topics.iter(), &opts)
        .await
        .map_err(|e| KafkaSetupError::CreateTopic {
            topic: topics.join(","),
            reason: e.to_string(),
        })?;
    for result in results {
        match result {
            Ok(topic) => info!(topic, partitions, "created topic"),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(topic, "topic exists")
            }
            Err((topic, code)) => {
                let reason = if code == RDKafkaErrorCode::TopicAuthorizationFailed
                    || code == RDKafkaErrorCode::ClusterAuthorizationFailed
                {
                    format!("{code} (this principal lacks the CREATE permission)")
                } else {
                    code.to_string()
                };
                return Err(KafkaSetupError::CreateTopic { topic, reason });
            }
        }
    }
    Ok(())
}

/// The value of topic configuration `key` for each of `topics` that reports it.
pub async fn topic_config(
    brokers: &str,
    props: &KafkaProperties,
    topics: &[String],
    key: &str,
) -> Result<Vec<(String, String)>, KafkaSetupError> {
    use rdkafka::admin::ResourceSpecifier;
    let admin: AdminClient<DefaultClientContext> = client(
        &base_config(brokers, props, ClientKind::Admin),
        DefaultClientContext,
    )?;
    let specs: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let described = admin
        .describe_configs(specs.iter(), &opts)
        .await
        .map_err(|source| KafkaSetupError::Metadata {
            brokers: brokers.to_string(),
            source,
        })?;
    let mut out = Vec::new();
    for (topic, result) in topics.iter().zip(described) {
        let Ok(resource) = result else { continue };
        if let Some(value) = resource.get(key).and_then(|e| e.value.clone()) {
            out.push((topic.clone(), value));
        }
    }
    Ok(out)
}

/// `retention.ms` of each topic, in seconds (-1 when unlimited).
pub async fn retention_seconds(
    brokers: &str,
    props: &KafkaProperties,
    topics: &[String],
) -> Result<Vec<(String, i64)>, KafkaSetupError> {
    Ok(topic_config(brokers, props, topics, "retention.ms")
        .await?
        .into_iter()
        .filter_map(|(topic, v)| {
            let ms = v.parse::<i64>().ok()?;
            Some((topic, if ms < 0 { -1 } else { ms / 1000 }))
        })
        .collect())
}

/// True for produce errors that are about the message itself (retrying cannot help).
pub fn is_permanent_produce_error(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge)
            | Some(RDKafkaErrorCode::InvalidRecord)
            | Some(RDKafkaErrorCode::TopicAuthorizationFailed)
    )
}

/// True for produce errors that refuse the record itself for good (too large for the
/// topic, a timestamp outside its window, a null key on a compacted topic): retrying the
/// same record cannot help, but the next record is unaffected. Unlike
/// [`is_permanent_produce_error`], authorization is not included: a missing ACL refuses
/// every record and is fixed by an operator, not by dead-lettering them all.
pub fn is_refused_record(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge)
            | Some(RDKafkaErrorCode::InvalidRecord)
            | Some(RDKafkaErrorCode::InvalidTimestamp)
    )
}

/// True for consumer errors that say fetched input cannot be decoded (librdkafka lacks
/// its compression codec, or the record batch is corrupt). Fetching again fails the same
/// way, so the partition is stuck until an operator acts: this must be loud.
pub fn is_undecodable_input(e: &KafkaError) -> bool {
    let code = match e {
        KafkaError::MessageConsumption(code) | KafkaError::MessageConsumptionFatal(code) => *code,
        _ => return false,
    };
    matches!(
        code,
        RDKafkaErrorCode::NotImplemented
            | RDKafkaErrorCode::BadCompression
            | RDKafkaErrorCode::BadMessage
            | RDKafkaErrorCode::UnsupportedCompressionType
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undecodable_input_is_told_apart_from_other_consumer_errors() {
        for code in [
            RDKafkaErrorCode::NotImplemented,
            RDKafkaErrorCode::BadCompression,
            RDKafkaErrorCode::BadMessage,
        ] {
            assert!(
                is_undecodable_input(&KafkaError::MessageConsumption(code)),
                "{code:?}"
            );
        }
        assert!(!is_undecodable_input(&KafkaError::MessageConsumption(
            RDKafkaErrorCode::BrokerTransportFailure
        )));
        assert!(!is_undecodable_input(&KafkaError::NoMessageReceived));
    }

    #[test]
    fn every_compression_codec_is_built_in() {
        // A producer may compress input with any of these; a consumer without the codec
        // stalls on the partition. librdkafka lists what it was built with.
        let features = ClientConfig::new()
            .create_native_config()
            .expect("config")
            .get("builtin.features")
            .expect("builtin.features");
        for codec in ["gzip", "snappy", "lz4", "zstd"] {
            assert!(
                features.split(',').any(|f| f == codec),
                "librdkafka is built without {codec}: {features}"
            );
        }
    }
}
