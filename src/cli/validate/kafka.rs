//! librdkafka properties: collected from `KDEDUP_KAFKA_*` and `-X`, the ones kdedup owns
//! refused, and every one handed to librdkafka once so a bad name or value is an error
//! before anything connects.

use std::collections::BTreeMap;

use super::super::env::Env;
use super::super::{ConfigError, KAFKA_ENV_PREFIX};
use crate::kafka::properties::{redact_property_values, ClientKind};
use crate::settings::KafkaProperties;

/// Properties kdedup owns: overriding them would break the offsets-after-commit or
/// the no-duplicate-publish guarantees.
pub(super) const RESERVED_PROPERTIES: &[(&str, &str)] = &[
    (
        "enable.auto.offset.store",
        "offsets are stored only after the Postgres commit",
    ),
    ("group.id", "use --group-id / KDEDUP_GROUP_ID"),
    ("bootstrap.servers", "use --brokers / KDEDUP_BROKERS"),
    (
        "enable.idempotence",
        "the relay's producer must stay idempotent",
    ),
    ("acks", "the relay's producer must use acks=all"),
    ("transactional.id", "kdedup does not use Kafka transactions"),
    (
        "enable.auto.commit",
        "offsets are committed only for stored (durable) work by kdedup's auto-commit",
    ),
    (
        "isolation.level",
        "events of aborted producer transactions must never be forwarded",
    ),
    (
        "enable.partition.eof",
        "the consumer loop treats every consumer error as a fault",
    ),
    (
        "allow.auto.create.topics",
        "kdedup creates its own topics, with the input's partition count, when KDEDUP_CREATE_TOPICS is on; a metadata lookup must never create one with the broker's default",
    ),
];

/// Values of reserved properties that equal what kdedup sets anyway.
pub(super) fn reserved_value_is_harmless(property: &str, value: &str) -> bool {
    matches!(
        (property, value.trim().to_ascii_lowercase().as_str()),
        ("enable.auto.offset.store", "false")
            | ("enable.idempotence", "true")
            | ("acks", "all")
            | ("acks", "-1")
            | ("enable.auto.commit", "true")
            | ("isolation.level", "read_committed")
            | ("enable.partition.eof", "false")
            | ("allow.auto.create.topics", "false")
    )
}

/// Collects `KDEDUP_KAFKA_*` variables and `-X k=v` flags into librdkafka properties.
pub fn kafka_properties(env: &dyn Env, flags: &[String]) -> Result<KafkaProperties, ConfigError> {
    let mut props = BTreeMap::new();
    for (name, value) in env.vars() {
        if let Some(prop) = name.strip_prefix(KAFKA_ENV_PREFIX) {
            // A Service named kdedup-kafka gives every pod KDEDUP_KAFKA_SERVICE_HOST and
            // friends: not properties.
            if prop.is_empty() || super::super::env::is_service_link(&name) {
                continue;
            }
            props.insert(prop.to_ascii_lowercase().replace('_', "."), value);
        }
    }
    for flag in flags {
        let Some((k, v)) = flag.split_once('=') else {
            return Err(ConfigError::new(
                "--kafka-property",
                format!("{flag:?} is not of the form key=value"),
                "write it as -X security.protocol=SASL_SSL",
            ));
        };
        props.insert(k.trim().to_string(), v.to_string());
    }
    for (reserved, why) in RESERVED_PROPERTIES {
        if let Some(value) = props.get(*reserved) {
            // Setting a reserved property to the value kdedup uses anyway is harmless.
            if !reserved_value_is_harmless(reserved, value) {
                return Err(ConfigError::new(
                    &format!(
                        "{KAFKA_ENV_PREFIX}{}",
                        reserved.to_ascii_uppercase().replace('.', "_")
                    ),
                    format!("the librdkafka property {reserved} is managed by kdedup ({why})"),
                    "remove it",
                ));
            }
        }
    }
    Ok(KafkaProperties(props))
}

/// Hands every property to librdkafka once, the way each client will get it, so that
/// an unknown name or a bad value is a configuration error before anything connects.
/// The error never quotes a value that is not on the printable allow-list.
pub(super) fn check_kafka_properties(props: &KafkaProperties) -> Result<(), ConfigError> {
    for kind in [
        ClientKind::Consumer,
        ClientKind::Producer,
        ClientKind::Admin,
    ] {
        let mut config = rdkafka::ClientConfig::new();
        props.apply(&mut config, kind);
        let Err(e) = config.create_native_config() else {
            continue;
        };
        let (property, problem) = match &e {
            rdkafka::error::KafkaError::ClientConfig(_, desc, key, _) => {
                (key.clone(), desc.clone())
            }
            other => (String::new(), other.to_string()),
        };
        let problem = redact_property_values(
            &problem,
            props.0.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
        let setting = if property.is_empty() {
            "--kafka-property".to_string()
        } else {
            format!(
                "{KAFKA_ENV_PREFIX}{}",
                property.to_ascii_uppercase().replace('.', "_")
            )
        };
        return Err(ConfigError::new(
            &setting,
            format!("librdkafka refuses it: {problem}"),
            "correct the property name or value (see librdkafka's CONFIGURATION.md), or remove it",
        ));
    }
    Ok(())
}
