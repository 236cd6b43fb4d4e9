//! Topic metadata, creation and configuration look-ups.

use std::time::Duration;

use crate::kafka::log::ClientLog;
use crate::kafka::Producer;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::metadata::{Metadata, MetadataTopic};
use tracing::info;

use super::properties::{ClientKind, KafkaProperties};
use super::{base_config, client, KafkaSetupError};

/// Cluster metadata for `topic`, or for every topic (`None`).
fn metadata(
    producer: &Producer,
    brokers: &str,
    topic: Option<&str>,
    timeout: Duration,
) -> Result<Metadata, KafkaSetupError> {
    use rdkafka::producer::Producer as _;
    producer
        .client()
        .fetch_metadata(topic, timeout)
        .map_err(|source| KafkaSetupError::Metadata {
            brokers: brokers.to_string(),
            source,
        })
}

/// A listed topic's partition count; `None` when the broker listed it with an error or
/// without partitions (it does not exist, or this principal may not Describe it).
fn usable_partitions(t: &MetadataTopic) -> Option<usize> {
    (t.error().is_none() && !t.partitions().is_empty()).then(|| t.partitions().len())
}

/// Partition count of each named topic; `None` when the topic does not exist.
pub fn partition_count(
    producer: &Producer,
    brokers: &str,
    topic: &str,
    timeout: Duration,
) -> Result<Option<usize>, KafkaSetupError> {
    let md = metadata(producer, brokers, Some(topic), timeout)?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .and_then(usable_partitions))
}

/// Partition count of every topic the cluster lists to this principal, in one metadata
/// request (start-up needs the input's and whether each of kdedup's own topics exists).
/// No lookup creates a topic: kdedup's producer sets `allow.auto.create.topics=false`.
pub fn partition_counts(
    producer: &Producer,
    brokers: &str,
    timeout: Duration,
) -> Result<std::collections::BTreeMap<String, usize>, KafkaSetupError> {
    let md = metadata(producer, brokers, None, timeout)?;
    Ok(md
        .topics()
        .iter()
        .filter_map(|t| Some((t.name().to_string(), usable_partitions(t)?)))
        .collect())
}

/// How long a CreateTopics request may take before kdedup gives up on it.
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates each topic in `topics` that does not exist yet, with `partitions` partitions.
pub async fn ensure_topics(
    brokers: &str,
    props: &KafkaProperties,
    topics: &[&str],
    partitions: i32,
    replication: i32,
) -> Result<(), KafkaSetupError> {
    let admin: AdminClient<ClientLog> = client(
        &base_config(brokers, props, ClientKind::Admin),
        ClientLog::default(),
    )?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replication)))
        .collect();
    let opts = AdminOptions::new()
        .operation_timeout(Some(CREATE_TIMEOUT))
        .request_timeout(Some(CREATE_TIMEOUT));
    let results = admin
        .create_topics(new_topics.iter(), &opts)
        .await
        .map_err(|e| match e {
            KafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut) => {
                KafkaSetupError::CreateTopicUnanswered {
                    topic: topics.join(","),
                    seconds: CREATE_TIMEOUT.as_secs(),
                }
            }
            _ => KafkaSetupError::CreateTopic {
                topic: topics.join(","),
                reason: e.to_string(),
            },
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
    let admin: AdminClient<ClientLog> = client(
        &base_config(brokers, props, ClientKind::Admin),
        ClientLog::default(),
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
