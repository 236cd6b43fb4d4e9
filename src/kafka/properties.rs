//! librdkafka properties passed through from `KDEDUP_KAFKA_*` and `-X`: which client each
//! one is for, and which values may ever be printed.

use std::collections::BTreeMap;
use std::fmt;

/// librdkafka properties passed through from the environment and `-X`.
#[derive(Clone, Default)]
pub struct KafkaProperties(pub BTreeMap<String, String>);

impl KafkaProperties {
    /// The property's value parsed as a number, when it is set and is one.
    pub fn number(&self, name: &str) -> Option<u64> {
        self.0.get(name).and_then(|v| v.parse::<u64>().ok())
    }
}

/// Which kind of client a property is meant for. librdkafka warns (once per client) when
/// a client is given a property of the other kind, so each client gets only its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    Consumer,
    Producer,
    Admin,
}

const CONSUMER_ONLY: &[&str] = &[
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "auto.offset.reset",
    "enable.auto.commit",
    "auto.commit.interval.ms",
    "partition.assignment.strategy",
    "group.instance.id",
    "group.protocol",
    "group.remote.assignor",
    "isolation.level",
    "check.crcs",
    "enable.partition.eof",
    "fetch.wait.max.ms",
    "fetch.min.bytes",
    "fetch.max.bytes",
    "max.partition.fetch.bytes",
    "fetch.message.max.bytes",
    "fetch.error.backoff.ms",
    "fetch.queue.backoff.ms",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "coordinator.query.interval.ms",
    "consume.callback.max.messages",
    "group.protocol.type",
];

const PRODUCER_ONLY: &[&str] = &[
    "linger.ms",
    "queue.buffering.max.ms",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "batch.num.messages",
    "batch.size",
    "compression.type",
    "compression.codec",
    "compression.level",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "request.timeout.ms",
    "retries",
    "message.send.max.retries",
    "request.required.acks",
    "max.in.flight.requests.per.connection",
    "max.in.flight",
    "partitioner",
    "sticky.partitioning.linger.ms",
    "enable.gapless.guarantee",
    "queuing.strategy",
];

impl KafkaProperties {
    pub fn apply(&self, config: &mut rdkafka::ClientConfig, kind: ClientKind) {
        for (k, v) in &self.0 {
            let consumer_only = CONSUMER_ONLY.contains(&k.as_str());
            let producer_only = PRODUCER_ONLY.contains(&k.as_str());
            let wanted = match kind {
                ClientKind::Consumer => !producer_only,
                ClientKind::Producer => !consumer_only,
                ClientKind::Admin => !consumer_only && !producer_only,
            };
            if wanted {
                config.set(k, v);
            }
        }
    }
}

impl fmt::Debug for KafkaProperties {
    /// Values of properties that may hold secrets are never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (k, v) in &self.0 {
            if is_printable_property(k) {
                map.entry(k, v);
            } else {
                map.entry(k, &"<redacted>");
            }
        }
        map.finish()
    }
}

/// librdkafka properties whose values may be printed (in the start-up log line and in
/// configuration errors). Every other property's value is shown as `<redacted>`: an
/// allow-list, so a secret-bearing property this list has never heard of
/// (`sasl.oauthbearer.config`, `ssl.keystore.password`, a future one) stays hidden.
const PRINTABLE_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "client.id",
    "client.rack",
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.kerberos.service.name",
    "sasl.oauthbearer.method",
    "sasl.oauthbearer.token.endpoint.url",
    "ssl.endpoint.identification.algorithm",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "ssl.crl.location",
    "ssl.cipher.suites",
    "ssl.curves.list",
    "enable.ssl.certificate.verification",
    "broker.address.family",
    "api.version.request",
    "socket.timeout.ms",
    "socket.keepalive.enable",
    "socket.connection.setup.timeout.ms",
    "connections.max.idle.ms",
    "reconnect.backoff.ms",
    "reconnect.backoff.max.ms",
    "retry.backoff.ms",
    "retry.backoff.max.ms",
    "metadata.max.age.ms",
    "topic.metadata.refresh.interval.ms",
    "statistics.interval.ms",
    "debug",
    "log_level",
];

/// Whether a librdkafka property's value may be printed: the allow-list above and the
/// consumer and producer tuning properties (numbers and enums).
pub fn is_printable_property(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    PRINTABLE_PROPERTIES.contains(&n.as_str())
        || CONSUMER_ONLY.contains(&n.as_str())
        || PRODUCER_ONLY.contains(&n.as_str())
}

/// `text` with the value of every non-printable property in `config` replaced by
/// `<redacted>`. librdkafka's configuration errors quote the offending value
/// (`Invalid value "..." for configuration property "sasl.jaas.config"`), so every error
/// that comes out of building a client passes through here before it is shown.
pub fn redact_property_values<'a>(
    text: &str,
    config: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> String {
    let mut secrets: Vec<&str> = config
        .into_iter()
        .filter(|(k, v)| !is_printable_property(k) && !v.is_empty())
        .map(|(_, v)| v)
        .collect();
    // Longest first, so a secret that contains another is replaced whole.
    secrets.sort_by_key(|v| std::cmp::Reverse(v.len()));
    let mut out = text.to_string();
    for secret in secrets {
        out = out.replace(secret, "<redacted>");
    }
    out
}
