//! What the Kafka sink needs of its topics at start: the output and dead-letter topics
//! created, and the largest input message whose output record the broker will take.

use std::time::Duration;

use crate::kafka::Producer;
use tracing::{debug, warn};

use crate::kafka::{topics, KafkaSetupError};
use crate::settings::RunSettings;

/// Creates the output topic (for the Kafka sink) and the dead-letter topic with the first
/// input topic's partition count, where they do not exist: topics made beforehand are used
/// as they are, and no CreateTopics request is sent for them (a principal without the
/// CREATE permission, or a broker that does not serve CreateTopics, then still starts).
pub async fn create_topics(cfg: &RunSettings, producer: &Producer) -> anyhow::Result<()> {
    let (p, brokers) = (producer.clone(), cfg.kafka.brokers.clone());
    let counts = tokio::task::spawn_blocking(move || {
        topics::partition_counts(&p, &brokers, Duration::from_secs(10))
    })
    .await??;
    let first = &cfg.kafka.input_topics[0];
    let partitions = *counts
        .get(first)
        .ok_or_else(|| KafkaSetupError::MissingInputTopic {
            topic: first.clone(),
        })?;
    let mut missing = cfg.own_topics();
    missing.retain(|t| !counts.contains_key(*t));
    if missing.is_empty() {
        debug!("the output and dead-letter topics exist; none to create");
        return Ok(());
    }
    topics::ensure_topics(
        &cfg.kafka.brokers,
        &cfg.kafka.properties,
        &missing,
        partitions as i32,
        cfg.kafka.topic_replication_factor,
    )
    .await?;
    Ok(())
}

/// Room kept in an output record for kdedup's own headers (`kdedup-event-id`, at most
/// `--max-id-bytes`, and `kdedup-source`, a topic name and two numbers) and the record's
/// framing.
fn own_header_room(cfg: &RunSettings) -> usize {
    cfg.gate.id.max_id_bytes + 512
}

/// The largest input message kdedup accepts: `--max-message-bytes`, lowered to what the
/// output topic (`max.message.bytes`) and the producer (`message.max.bytes`) take once
/// kdedup's own headers are added. A larger message would pass the gate and then be
/// refused by the broker at relay time; this way it is dead-lettered at once, with the
/// reason. Always a limit: `--max-message-bytes 0` turns off only kdedup's own; the
/// producer's (1,000,000 unless `message.max.bytes` says otherwise) always applies.
pub async fn input_size_limit(cfg: &RunSettings) -> Option<usize> {
    let mut limits: Vec<usize> = cfg.gate.max_message_bytes.into_iter().collect();
    let Some(output_topic) = cfg.sink.output_topic() else {
        // The Postgres sink: nothing is produced but dead letters, which go stripped
        // when too large.
        return limits.into_iter().min();
    };
    let room = own_header_room(cfg);
    match topics::topic_config(
        &cfg.kafka.brokers,
        &cfg.kafka.properties,
        &[output_topic.to_string()],
        "max.message.bytes",
    )
    .await
    {
        Ok(found) => {
            for topic_limit in found.iter().filter_map(|(_, v)| v.parse::<usize>().ok()) {
                limits.push(topic_limit.saturating_sub(room));
                // The broker checks the limit per record batch, not per record: a batch of
                // several records over it is refused whole, and the relay would
                // dead-letter every record in it.
                let batch_size = cfg
                    .kafka
                    .properties
                    .number("batch.size")
                    .unwrap_or(1_000_000) as usize;
                if batch_size > topic_limit {
                    warn!(output_topic, max_message_bytes = topic_limit, batch_size,
                          "the output topic's max.message.bytes is below the producer's batch.size: a full batch would be refused whole and its records dead-lettered; set KDEDUP_KAFKA_BATCH_SIZE to at most the topic's limit");
                }
            }
        }
        Err(e) => warn!(error = %e, output_topic,
                        "cannot read the output topic's max.message.bytes; only --max-message-bytes limits input size"),
    }
    let producer_limit = cfg
        .kafka
        .properties
        .number("message.max.bytes")
        .unwrap_or(1_000_000) as usize;
    limits.push(producer_limit.saturating_sub(room));
    limits.into_iter().min()
}
