//! Kafka: how each client is configured and created, and which errors mean what.
//!
//! - [`properties`]: librdkafka properties passed through, per client kind, redacted.
//! - [`context`]: the consumer's rebalance bookkeeping and statistics (lag).
//! - [`topics`]: metadata, topic creation and topic configuration look-ups.
//! - [`input`]: a consumed message copied out of librdkafka's buffer.
//! - [`dlq`]: dead-letter records and producing them.

pub mod context;
pub mod dlq;
pub mod input;
pub mod log;
pub mod pending;
pub mod properties;
pub mod topics;

use std::sync::Arc;

use rdkafka::client::ClientContext;
use rdkafka::consumer::StreamConsumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;

pub use context::{Assignment, ConsumerState, KdedupContext};
use properties::{ClientKind, KafkaProperties};

#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    /// The text is redacted (see [`client`]): librdkafka quotes property values.
    #[error("kafka client could not be created: {0}")]
    Client(String),
    #[error("input topic {topic:?} does not exist (or this principal cannot Describe it); create it first or grant DESCRIBE on it")]
    MissingInputTopic { topic: String },
    #[error("broker refused to create topic {topic:?}: {reason}. Create it yourself, or grant this principal the CREATE permission on the topic (or cluster), or set KDEDUP_CREATE_TOPICS=false if it exists")]
    CreateTopic { topic: String, reason: String },
    #[error("the brokers did not answer the request to create topic {topic:?} within {seconds} s (some Kafka-compatible brokers and proxies do not serve CreateTopics). Create it yourself and set KDEDUP_CREATE_TOPICS=false")]
    CreateTopicUnanswered { topic: String, seconds: u64 },
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

/// A consumer that reads the partitions it is assigned and never commits (`kdedup
/// replay`, the relay's tail reads): the group id only names it. `defaults` are set before
/// the user's properties, so those can override them.
pub fn reader_config(
    brokers: &str,
    group_id: &str,
    props: &KafkaProperties,
    defaults: &[(&str, &str)],
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        // A start offset deleted by retention meanwhile: read from what is left.
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // The same prefetch bound as the sidecar's consumer (consumer_config).
        .set("queued.max.messages.kbytes", "16384");
    for (k, v) in defaults {
        c.set(*k, *v);
    }
    props.apply(&mut c, ClientKind::Consumer);
    c.set("enable.auto.offset.store", "false");
    c
}

/// Producer for the output and dead-letter topics: idempotent, `acks=all`, so a retried
/// produce neither duplicates nor reorders within a partition.
pub fn producer_config(brokers: &str, props: &KafkaProperties) -> ClientConfig {
    let mut c = base_config(brokers, props, ClientKind::Producer);
    // The relay hands librdkafka a whole round of a partition's rows at once, so the
    // batch is formed before the linger starts; lingering longer only holds the round's
    // request back: librdkafka's 5 ms added 5 ms to every event's latency (bench/README.md,
    // "The relay's producer linger", which measures the throughput of both too).
    c.set_default("linger.ms", "1");
    c.set_default("compression.type", "lz4");
    // librdkafka queues up to 1 GiB by default. The relay's rounds are bounded by
    // --relay-batch-max-bytes (16 MiB), so 32 MiB holds a round and dead letters with room;
    // a full queue makes the relay wait (QueueFull), it loses nothing.
    c.set_default("queue.buffering.max.kbytes", "32768");
    c.set("enable.idempotence", "true").set("acks", "all");
    // librdkafka's producer asks brokers with `auto.create.topics.enable` to create a
    // topic it looks up (the relay's output lookup, the health check's every 2 s, a dead
    // letter's first produce). Such a topic would get the broker's default partition
    // count; kdedup creates its topics itself (KDEDUP_CREATE_TOPICS), or they are missing
    // and /readyz says so.
    c.set("allow.auto.create.topics", "false");
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

pub type Consumer = StreamConsumer<KdedupContext>;

/// Creates a client from `config`. Every kdedup client is made here, so that no error of
/// librdkafka's (which quote the offending property's value) is shown unredacted.
pub fn client<T, C>(config: &ClientConfig, context: C) -> Result<T, KafkaSetupError>
where
    C: ClientContext,
    T: rdkafka::config::FromClientConfigAndContext<C>,
{
    config.create_with_context(context).map_err(|e| {
        KafkaSetupError::Client(properties::redact_property_values(
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
        KdedupContext {
            state,
            log: Default::default(),
        },
    )
}

/// kdedup's producer (output and dead-letter topics), whose librdkafka errors and log
/// lines are held to one per kind per 30 s ([`log::ClientLog`]).
pub type Producer = FutureProducer<log::ClientLog>;

pub fn producer(brokers: &str, props: &KafkaProperties) -> Result<Producer, KafkaSetupError> {
    client(&producer_config(brokers, props), log::ClientLog::default())
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

    #[test]
    fn the_producer_defaults_give_way_to_the_operators_properties() {
        let ours = producer_config("b:9092", &KafkaProperties::default());
        assert_eq!(ours.get("linger.ms"), Some("1"));
        assert_eq!(ours.get("compression.type"), Some("lz4"));
        let props = KafkaProperties(
            [
                ("linger.ms", "20"),
                ("compression.type", "zstd"),
                ("enable.idempotence", "false"),
                ("acks", "1"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        );
        let theirs = producer_config("b:9092", &props);
        assert_eq!(theirs.get("linger.ms"), Some("20"));
        assert_eq!(theirs.get("compression.type"), Some("zstd"));
        // What kdedup's guarantees rest on is not theirs to change.
        assert_eq!(theirs.get("enable.idempotence"), Some("true"));
        assert_eq!(theirs.get("acks"), Some("all"));
    }
}
