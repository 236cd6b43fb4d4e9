//! Validation: raw flags and environment into [`crate::settings`], or a [`ConfigError`]
//! naming the setting and the fix, before anything connects to Kafka or Postgres.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::env::Env;
use super::{
    setting_name, ConfigError, DbArgs, DemoArgs, InspectArgs, PruneFlags, ReplayArgs, RunArgs,
    KAFKA_ENV_PREFIX,
};
use crate::kafka::properties::{redact_property_values, ClientKind};
use crate::model::identity::{IdSpec, ScopeSpec};
use crate::model::is_valid_topic_name;
use crate::settings::{
    redact_url, ConsumeSettings, DatabaseUrl, DbSettings, DemoSettings, GateSettings,
    InspectSettings, KafkaProperties, KafkaSettings, PayloadMismatch, PruneSettings, RelaySettings,
    ReplaySettings, RunSettings,
};

/// Longest `--ttl`: the expiry (`now() + ttl`) must stay far inside Postgres' timestamp
/// range and every conversion of it to seconds or milliseconds must fit an `i64`.
/// 100 years of 365.25 days, which is what `--ttl 100y` means.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 31_557_600);

/// Properties kdedup owns: overriding them would break the offsets-after-commit or
/// the no-duplicate-publish guarantees.
const RESERVED_PROPERTIES: &[(&str, &str)] = &[
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
];

/// Values of reserved properties that equal what kdedup sets anyway.
fn reserved_value_is_harmless(property: &str, value: &str) -> bool {
    matches!(
        (property, value.trim().to_ascii_lowercase().as_str()),
        ("enable.auto.offset.store", "false")
            | ("enable.idempotence", "true")
            | ("acks", "all")
            | ("acks", "-1")
            | ("enable.auto.commit", "true")
            | ("isolation.level", "read_committed")
            | ("enable.partition.eof", "false")
    )
}

pub fn parse_duration(setting: &str, value: &str, example: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value.trim()).map_err(|e| {
        ConfigError::new(
            setting,
            format!("cannot read {value:?} as a duration ({e})"),
            format!("write a duration such as {example}"),
        )
    })
}

pub fn database_url(arg: Option<String>, env: &dyn Env) -> Result<String, ConfigError> {
    let url = arg
        .filter(|u| !u.trim().is_empty())
        .or_else(|| env.var("DATABASE_URL").filter(|u| !u.trim().is_empty()))
        .ok_or_else(|| {
            ConfigError::new(
                "database_url",
                "no Postgres URL is set",
                "set KDEDUP_DATABASE_URL (or DATABASE_URL), e.g. postgres://kdedup@db:5432/app",
            )
        })?;
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(ConfigError::new(
            "database_url",
            format!("{} is not a Postgres URL", redact_url(&url)),
            "use the form postgres://user:password@host:5432/database",
        ));
    }
    check_url_parameters(&url)?;
    Ok(url)
}

/// `%XX` sequences decoded (a URL query value); anything malformed is kept as written.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The URL parameters kdedup's Postgres client understands (sqlx's names, which follow
/// libpq's for TLS).
const URL_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// Refuses URL parameters the Postgres client would ignore. An ignored `ssl_mode=require`
/// (a typo) would connect in plaintext without a word; an ignored parameter's value would
/// also be logged by the client. Only the name is quoted here, never the value.
fn check_url_parameters(url: &str) -> Result<(), ConfigError> {
    let Some((_, query)) = url.split_once('?') else {
        return Ok(());
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let name = pair.split_once('=').map_or(pair, |(k, _)| k);
        let known =
            URL_PARAMETERS.contains(&name) || (name.starts_with("options[") && name.ends_with(']'));
        if !known {
            return Err(ConfigError::new(
                "database_url",
                format!("the URL parameter {name:?} is not one kdedup's Postgres client understands (it would be ignored)"),
                format!("remove it, or use one of {}", URL_PARAMETERS.join(", ")),
            ));
        }
        if matches!(
            name,
            "sslrootcert"
                | "ssl-root-cert"
                | "ssl-ca"
                | "sslcert"
                | "ssl-cert"
                | "sslkey"
                | "ssl-key"
        ) {
            let path = percent_decode(pair.split_once('=').map_or("", |(_, v)| v));
            if let Err(e) = std::fs::File::open(&path) {
                return Err(ConfigError::new(
                    "database_url",
                    format!("{name}={path:?} cannot be read: {e}"),
                    "mount the file (in Kubernetes: a ConfigMap or Secret volume) at that path, or correct the path",
                ));
            }
        }
        if matches!(name, "sslmode" | "ssl-mode") {
            let value = pair.split_once('=').map_or("", |(_, v)| v);
            const MODES: [&str; 6] = [
                "disable",
                "allow",
                "prefer",
                "require",
                "verify-ca",
                "verify-full",
            ];
            if !MODES.contains(&value) {
                return Err(ConfigError::new(
                    "database_url",
                    format!("sslmode={value:?} is not a TLS mode"),
                    format!("use one of {} (verify-full with sslrootcert=<CA file> checks the server's name)", MODES.join(", ")),
                ));
            }
        }
    }
    Ok(())
}

/// A Postgres identifier kdedup will quote into DDL: lower-case, digits, underscores.
pub fn validate_schema(schema: &str) -> Result<String, ConfigError> {
    let ok = !schema.is_empty()
        && schema.len() <= 63
        && schema
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !schema.starts_with("pg_");
    if ok {
        Ok(schema.to_string())
    } else {
        Err(ConfigError::new(
            "db_schema",
            format!("{schema:?} is not a usable schema name"),
            "use 1-63 characters of a-z, 0-9 and _, starting with a letter or _ (not pg_)",
        ))
    }
}

impl DbArgs {
    pub fn validate(self, env: &dyn Env) -> Result<DbSettings, ConfigError> {
        if self.db_max_connections == 0 {
            return Err(ConfigError::new(
                "db_max_connections",
                "must be at least 1",
                "set it to 2 or more (the relay holds one connection of its own)",
            ));
        }
        Ok(DbSettings {
            url: DatabaseUrl::new(database_url(self.database_url, env)?),
            schema: validate_schema(&self.db_schema)?,
            max_connections: self.db_max_connections,
        })
    }
}

fn required(value: Option<String>, setting: &str, example: &str) -> Result<String, ConfigError> {
    match value.map(|v| v.trim().to_string()) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(ConfigError::new(
            setting,
            "is required and not set",
            format!("set {} (e.g. {example})", setting_name(setting)),
        )),
    }
}

fn validate_topic(setting: &str, topic: &str) -> Result<(), ConfigError> {
    if is_valid_topic_name(topic) {
        Ok(())
    } else {
        Err(ConfigError::new(
            setting,
            format!("{topic:?} is not a valid Kafka topic name"),
            "use 1-249 characters of a-z, A-Z, 0-9, '.', '_' and '-'",
        ))
    }
}

/// Collects `KDEDUP_KAFKA_*` variables and `-X k=v` flags into librdkafka properties.
pub fn kafka_properties(env: &dyn Env, flags: &[String]) -> Result<KafkaProperties, ConfigError> {
    let mut props = BTreeMap::new();
    for (name, value) in env.vars() {
        if let Some(prop) = name.strip_prefix(KAFKA_ENV_PREFIX) {
            if prop.is_empty() {
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

/// Every configuration error found, in the order the settings were checked.
#[derive(Debug, Default)]
pub struct Findings(pub Vec<ConfigError>);

impl Findings {
    /// The value, or `None` with the error kept.
    fn ok<T>(&mut self, r: Result<T, ConfigError>) -> Option<T> {
        r.map_err(|e| self.0.push(e)).ok()
    }

    /// Keeps `error()` when `broken`.
    fn rule(&mut self, broken: bool, error: impl FnOnce() -> ConfigError) {
        if broken {
            self.0.push(error());
        }
    }

    /// A number within `range`, named by `setting`, with the fix saying the default.
    fn within<N>(&mut self, setting: &str, n: N, range: std::ops::RangeInclusive<N>, default: N)
    where
        N: PartialOrd + std::fmt::Display + Copy,
    {
        self.rule(!range.contains(&n), || {
            ConfigError::new(
                setting,
                format!("{n} is out of range"),
                format!(
                    "choose between {} and {} (default {default})",
                    range.start(),
                    range.end()
                ),
            )
        });
    }

    /// At least 1024 bytes.
    fn kib(&mut self, setting: &str, n: usize, default: usize) {
        self.rule(n < 1024, || {
            ConfigError::new(
                setting,
                format!("{n} is too small"),
                format!("choose at least 1024 (default {default})"),
            )
        });
    }

    fn into_result<T>(self, value: impl FnOnce() -> T) -> Result<T, ConfigError> {
        let mut errors = self.0.into_iter();
        match errors.next() {
            None => Ok(value()),
            Some(first) => Err(first.with_more(errors.collect())),
        }
    }
}

impl RunArgs {
    /// Turns raw flags into [`RunSettings`], or names every bad setting and its fix (the
    /// first in the error, the others in [`ConfigError::more`]).
    pub fn validate(self, env: &dyn Env) -> Result<RunSettings, ConfigError> {
        let mut f = Findings::default();
        let kafka = self.kafka_settings(env, &mut f);
        let db = f.ok(self.db.clone().validate(env));
        let gate = self.gate_settings(kafka.as_ref(), &mut f);
        let consume = self.consume_settings(db.as_ref(), &mut f);
        f.within("relay_batch_size", self.relay_batch_size, 1..=100_000, 2000);
        f.kib(
            "relay_batch_max_bytes",
            self.relay_batch_max_bytes,
            16 << 20,
        );
        let metrics_addr = f.ok(self.metrics_addr.parse::<SocketAddr>().map_err(|_| {
            ConfigError::new(
                "metrics_addr",
                format!("{:?} is not an address", self.metrics_addr),
                "write ip:port, e.g. 0.0.0.0:9464",
            )
        }));
        let shutdown_timeout = self.shutdown_timeout(kafka.as_ref(), &mut f);
        let prune = match self.prune.pruner {
            true => f.ok(self.prune.validate()).map(Some),
            false => Some(None),
        };
        f.into_result(|| RunSettings {
            kafka: kafka.expect("no error"),
            db: db.expect("no error"),
            gate: gate.expect("no error"),
            consume: consume.expect("no error"),
            relay: RelaySettings {
                enabled: self.relay,
                batch_size: self.relay_batch_size,
                batch_max_bytes: self.relay_batch_max_bytes,
            },
            prune: prune.expect("no error"),
            metrics_addr: metrics_addr.expect("no error"),
            shutdown_timeout: shutdown_timeout.expect("no error"),
            migrate_on_start: self.migrate_on_start,
        })
    }

    /// Brokers, group, topics (distinct from each other) and librdkafka properties.
    fn kafka_settings(&self, env: &dyn Env, f: &mut Findings) -> Option<KafkaSettings> {
        let brokers = f.ok(required(
            self.brokers.clone(),
            "brokers",
            "kafka-0.kafka:9092",
        ));
        let group_id = f.ok(required(self.group_id.clone(), "group_id", "orders-app"));
        let input_topics: Option<Vec<String>> = f
            .ok(required(
                self.input_topics.clone(),
                "input_topics",
                "orders",
            ))
            .map(|list| {
                list.split(',')
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
                    .collect()
            });
        let input_topics = input_topics.and_then(|topics| {
            let mut ok = !topics.is_empty();
            f.rule(topics.is_empty(), || {
                ConfigError::new(
                    "input_topics",
                    "names no topic",
                    "list one or more topics, comma-separated",
                )
            });
            for t in &topics {
                ok &= f.ok(validate_topic("input_topics", t)).is_some();
            }
            ok.then_some(topics)
        });
        let output_topic = f
            .ok(required(
                self.output_topic.clone(),
                "output_topic",
                "orders.dedup",
            ))
            .and_then(|t| f.ok(validate_topic("output_topic", &t)).map(|()| t));
        let dlq_topic = self
            .dlq_topic
            .clone()
            .filter(|t| !t.trim().is_empty())
            .or_else(|| Some(format!("{}.dlq", input_topics.as_ref()?[0])))
            .and_then(|t| f.ok(validate_topic("dlq_topic", &t)).map(|()| t));
        if let (Some(inputs), Some(output)) = (&input_topics, &output_topic) {
            f.rule(inputs.contains(output), || {
                ConfigError::new(
                    "output_topic",
                    format!(
                        "{output:?} is also an input topic; kdedup would consume its own output"
                    ),
                    "choose a distinct output topic, e.g. <input>.dedup",
                )
            });
            if let Some(dlq) = &dlq_topic {
                f.rule(inputs.contains(dlq) || dlq == output, || {
                    ConfigError::new(
                        "dlq_topic",
                        format!("{dlq:?} is also an input or the output topic"),
                        "choose a distinct dead-letter topic, e.g. <input>.dlq",
                    )
                });
            }
        }
        f.rule(
            self.topic_replication_factor == 0 || self.topic_replication_factor < -1,
            || {
                ConfigError::new(
                    "topic_replication_factor",
                    format!(
                        "{} is not a replication factor",
                        self.topic_replication_factor
                    ),
                    "use -1 for the broker's default, or 1 or more",
                )
            },
        );
        let properties = f
            .ok(kafka_properties(env, &self.kafka_property))
            .and_then(|p| f.ok(check_kafka_properties(&p)).map(|()| p));
        Some(KafkaSettings {
            brokers: brokers?,
            group_id: group_id?,
            input_topics: input_topics?,
            output_topic: output_topic?,
            dlq_topic: dlq_topic?,
            create_topics: self.create_topics,
            topic_replication_factor: self.topic_replication_factor,
            properties: properties?,
        })
    }

    /// Identity, scope (the group id unless set), TTL and the gate attempt timeout.
    fn gate_settings(
        &self,
        kafka: Option<&KafkaSettings>,
        f: &mut Findings,
    ) -> Option<GateSettings> {
        let id = f.ok(IdSpec::parse(&self.id_from, self.max_id_bytes).map_err(|problem| {
            ConfigError::new(
                "id_from",
                problem,
                "write a comma-separated list of header:<name>, key, json:<pointer>, cloudevents (e.g. header:event-id,json:/id)",
            )
        }));
        f.rule(self.max_id_bytes == 0 || self.max_id_bytes > 2048, || {
            ConfigError::new(
                "max_id_bytes",
                format!("{} is out of range", self.max_id_bytes),
                "choose a value between 1 and 2048 (ids are part of a btree key)",
            )
        });
        let scope = match self.scope.clone().filter(|s| !s.trim().is_empty()) {
            None => kafka.map(|k| ScopeSpec::Literal(k.group_id.clone())),
            Some(s) => f.ok(ScopeSpec::parse(&s).map_err(|problem| {
                ConfigError::new(
                    "scope",
                    problem,
                    "write a literal scope (e.g. orders) or header:<name> (e.g. header:tenant-id)",
                )
            })),
        };
        let ttl = f.ok(parse_duration("ttl", &self.ttl, "7d or 36h"));
        if let Some(ttl) = ttl {
            f.rule(ttl > MAX_TTL, || {
                ConfigError::new(
                    "ttl",
                    format!("{} is longer than the 100 years kdedup can store", self.ttl),
                    "choose at most 100y (the expiry must fit Postgres' timestamps)",
                )
            });
            f.rule(ttl < Duration::from_secs(60), || {
                ConfigError::new(
                    "ttl",
                    format!("{} is too short to deduplicate anything", self.ttl),
                    "set it longer than the input topic's retention plus the longest expected lag (default 7d)",
                )
            });
        }
        // A third of max.poll.interval.ms (see GateSettings::attempt_timeout).
        let max_poll_ms = kafka
            .and_then(|k| k.properties.number("max.poll.interval.ms"))
            .unwrap_or(300_000);
        Some(GateSettings {
            id: id?,
            scope: scope?,
            ttl: ttl?,
            max_message_bytes: (self.max_message_bytes > 0).then_some(self.max_message_bytes),
            on_payload_mismatch: match self.on_payload_mismatch {
                super::PayloadMismatch::Skip => PayloadMismatch::Skip,
                super::PayloadMismatch::Dlq => PayloadMismatch::Dlq,
            },
            attempt_timeout: Duration::from_millis(max_poll_ms / 3)
                .clamp(Duration::from_secs(5), Duration::from_secs(60)),
        })
    }

    /// Batching and lanes; every lane needs a connection of the pool.
    fn consume_settings(
        &self,
        db: Option<&DbSettings>,
        f: &mut Findings,
    ) -> Option<ConsumeSettings> {
        f.within("batch_size", self.batch_size, 1..=50_000, 1000);
        f.within("gate_lanes", self.gate_lanes, 1..=16, 2);
        if let Some(db) = db {
            f.rule(self.gate_lanes as u32 > db.max_connections, || {
                ConfigError::new(
                    "gate_lanes",
                    format!(
                        "{} lanes need a connection each, but the pool holds {}",
                        self.gate_lanes, db.max_connections
                    ),
                    "raise --db-max-connections (KDEDUP_DB_MAX_CONNECTIONS) or lower --gate-lanes",
                )
            });
        }
        f.kib("read_ahead_bytes", self.read_ahead_bytes, 8 << 20);
        let batch_linger = f.ok(parse_duration("batch_linger", &self.batch_linger, "20ms"));
        if let Some(linger) = batch_linger {
            f.rule(linger > Duration::from_secs(10), || {
                ConfigError::new(
                    "batch_linger",
                    format!("{} would hold events for too long", self.batch_linger),
                    "choose at most 10s (default 20ms)",
                )
            });
        }
        f.kib("batch_max_bytes", self.batch_max_bytes, 16 << 20);
        Some(ConsumeSettings {
            batch_size: self.batch_size,
            batch_max_bytes: self.batch_max_bytes,
            batch_linger: batch_linger?,
            gate_lanes: self.gate_lanes,
            read_ahead_bytes: self.read_ahead_bytes,
        })
    }

    /// The drain deadline, which must end before the group session does: a drain that
    /// outlives the session would be cut short by the broker evicting the consumer, which
    /// turns a clean stop into a rebalance.
    fn shutdown_timeout(
        &self,
        kafka: Option<&KafkaSettings>,
        f: &mut Findings,
    ) -> Option<Duration> {
        let timeout = f.ok(parse_duration(
            "shutdown_timeout",
            &self.shutdown_timeout,
            "25s",
        ))?;
        f.rule(timeout.is_zero(), || {
            ConfigError::new(
                "shutdown_timeout",
                "must be more than zero",
                "set it a few seconds below the pod's terminationGracePeriodSeconds (default 25s)",
            )
        });
        let session = kafka.and_then(|k| k.properties.0.get("session.timeout.ms"));
        if let Some(session) = session {
            match session.parse::<u64>() {
                Err(_) => f.0.push(ConfigError::new(
                    "KDEDUP_KAFKA_SESSION_TIMEOUT_MS",
                    format!("{session:?} is not a number of milliseconds"),
                    "write milliseconds, e.g. 45000",
                )),
                Ok(session_ms) => f.rule(timeout >= Duration::from_millis(session_ms), || {
                    ConfigError::new(
                        "shutdown_timeout",
                        format!(
                            "{} is not below session.timeout.ms ({session_ms} ms)",
                            self.shutdown_timeout
                        ),
                        "lower --shutdown-timeout or raise KDEDUP_KAFKA_SESSION_TIMEOUT_MS",
                    )
                }),
            }
        }
        Some(timeout)
    }
}

impl PruneFlags {
    pub fn validate(&self) -> Result<PruneSettings, ConfigError> {
        let interval = parse_duration("prune_interval", &self.prune_interval, "60s")?;
        let pause = parse_duration("prune_pause", &self.prune_pause, "50ms")?;
        if !(1..=1_000_000).contains(&self.prune_batch_size) {
            return Err(ConfigError::new(
                "prune_batch_size",
                format!("{} is out of range", self.prune_batch_size),
                "choose between 1 and 1000000 (default 5000)",
            ));
        }
        if interval < Duration::from_millis(100) {
            return Err(ConfigError::new(
                "prune_interval",
                format!("{} is too short", self.prune_interval),
                "choose at least 100ms (default 60s)",
            ));
        }
        Ok(PruneSettings {
            interval,
            batch_size: self.prune_batch_size,
            pause,
        })
    }
}

impl ReplayArgs {
    /// `kdedup replay`'s flags, with the sidecar's own (`kdedup run`'s) settings inside.
    pub fn validate(self, env: &dyn Env) -> Result<ReplaySettings, ConfigError> {
        let from_ms = self
            .from_time
            .as_deref()
            .map(|v| parse_time("--from-time", v))
            .transpose()?;
        let to_ms = self
            .to_time
            .as_deref()
            .map(|v| parse_time("--to-time", v))
            .transpose()?;
        let publish_timeout = parse_duration("--publish-timeout", &self.publish_timeout, "60s")?;
        let idle_timeout = parse_duration("--idle-timeout", &self.idle_timeout, "3s")?;
        let run = self.run.validate(env)?;
        let topic = self
            .from_topic
            .unwrap_or_else(|| run.kafka.dlq_topic.clone());
        Ok(ReplaySettings {
            run,
            topic,
            from_offset: self.from_offset,
            to_offset: self.to_offset,
            from_ms,
            to_ms,
            dry_run: self.dry_run,
            force: self.force,
            idle_timeout,
            publish_timeout,
            serve_metrics: self.serve_metrics,
        })
    }
}

fn parse_time(setting: &str, v: &str) -> Result<i64, ConfigError> {
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            ConfigError::new(
                setting,
                format!("cannot read {v:?} as a time ({e})"),
                "write RFC 3339, e.g. 2026-11-20T00:00:00Z",
            )
        })
}

impl InspectArgs {
    pub fn validate(self, env: &dyn Env) -> Result<InspectSettings, ConfigError> {
        Ok(InspectSettings {
            db: self.db.validate(env)?,
            event_id: self.event_id,
            scope: self.scope,
            json: self.json,
        })
    }
}

impl DemoArgs {
    /// The demo's database: the local server unless `--database-url` / `DATABASE_URL`
    /// say otherwise, in a schema whose name says it is a demo's.
    pub fn validate(self, env: &dyn Env) -> Result<DemoSettings, ConfigError> {
        let url = self
            .database_url
            .clone()
            .or_else(|| env.var("DATABASE_URL"))
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
        let schema = demo_schema(&self.db_schema)?;
        let db = DbArgs {
            database_url: Some(url),
            db_schema: schema,
            db_max_connections: 4,
        }
        .validate(env)?;
        Ok(DemoSettings {
            db,
            events: self.events,
            metrics_addr: self.metrics_addr,
            hold: self.hold,
        })
    }
}

/// The demo drops its schema (with everything in it) at every start, so it only
/// accepts a name that says it is a demo's: pointing `--db-schema` at a real kdedup
/// schema (or an application's) must not delete it.
fn demo_schema(name: &str) -> Result<String, ConfigError> {
    let schema = validate_schema(name)?;
    if !schema.starts_with("kdedup_demo") {
        return Err(ConfigError::new(
            "--db-schema (kdedup demo)",
            format!("{schema:?} is not a demo schema, and the demo drops its schema with everything in it"),
            "use a name starting with kdedup_demo (the default is kdedup_demo)",
        ));
    }
    Ok(schema)
}

/// The settings `kdedup demo` runs the sidecar with, on its embedded cluster at
/// `brokers`: the defaults of `kdedup run`, a short linger and session, no environment
/// (the demo must not pick up a real cluster's `KDEDUP_KAFKA_*`).
pub fn demo_run_settings(
    demo: &DemoSettings,
    brokers: &str,
    metrics_addr: &str,
    topics: (&str, &str),
) -> Result<RunSettings, ConfigError> {
    let (input, output) = topics;
    let mut run_args = RunArgs {
        brokers: Some(brokers.to_string()),
        group_id: Some("orders-app".into()),
        input_topics: Some(input.into()),
        output_topic: Some(output.into()),
        dlq_topic: None,
        db: DbArgs {
            database_url: Some(demo.db.url.expose().to_string()),
            db_schema: demo.db.schema.clone(),
            db_max_connections: 4,
        },
        id_from: "header:event-id,json:/id".into(),
        scope: Some("orders".into()),
        max_id_bytes: 512,
        max_message_bytes: 1_000_000,
        on_payload_mismatch: super::PayloadMismatch::Skip,
        ttl: "7d".into(),
        batch_size: 1000,
        gate_lanes: 2,
        read_ahead_bytes: 8 << 20,
        batch_linger: "10ms".into(),
        batch_max_bytes: 16 << 20,
        relay_batch_size: 2000,
        relay_batch_max_bytes: 16 * 1024 * 1024,
        relay: true,
        metrics_addr: metrics_addr.to_string(),
        shutdown_timeout: "5s".into(),
        migrate_on_start: true,
        create_topics: false,
        topic_replication_factor: 1,
        prune: PruneFlags {
            pruner: true,
            prune_interval: "60s".into(),
            prune_batch_size: 5000,
            prune_pause: "50ms".into(),
        },
        kafka_property: vec![
            "session.timeout.ms=6000".into(),
            "heartbeat.interval.ms=500".into(),
        ],
    };
    // Only -X properties here: the demo must not pick up a real cluster's KDEDUP_KAFKA_*.
    let no_env: std::collections::BTreeMap<String, String> = Default::default();
    run_args.kafka_property.sort();
    run_args.validate(&no_env)
}

/// Hands every property to librdkafka once, the way each client will get it, so that
/// an unknown name or a bad value is a configuration error before anything connects.
/// The error never quotes a value that is not on the printable allow-list.
fn check_kafka_properties(props: &KafkaProperties) -> Result<(), ConfigError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::env::is_known_env_var;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn args(extra: &[&str]) -> RunArgs {
        let mut argv = vec![
            "kdedup",
            "run",
            "--brokers",
            "b:9092",
            "--group-id",
            "g",
            "--input-topics",
            "orders",
            "--output-topic",
            "orders.dedup",
            "--database-url",
            "postgres://u:pw@h/db",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(a) => *a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_are_sensible() {
        let c = args(&[]).validate(&env(&[])).unwrap();
        assert_eq!(c.kafka.dlq_topic, "orders.dlq");
        assert_eq!(c.gate.ttl, Duration::from_secs(7 * 86400));
        assert_eq!(c.db.schema, "kdedup");
        assert!(matches!(c.gate.scope, ScopeSpec::Literal(ref s) if s == "g"));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(25));
    }

    #[test]
    fn bad_ttl_names_the_setting_and_fix() {
        let e = args(&["--ttl", "soon"]).validate(&env(&[])).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("--ttl / KDEDUP_TTL"), "{text}");
        assert!(text.contains("Fix:"), "{text}");
    }

    #[test]
    fn database_url_falls_back_to_database_url_env() {
        let mut a = args(&[]);
        a.db.database_url = None;
        let c = a
            .validate(&env(&[("DATABASE_URL", "postgres://x@y/z")]))
            .unwrap();
        assert_eq!(c.db.url.expose(), "postgres://x@y/z");
        let mut a = args(&[]);
        a.db.database_url = None;
        assert!(a.validate(&env(&[])).is_err());
    }

    #[test]
    fn kafka_properties_pass_through_and_reserved_ones_are_refused() {
        let e = env(&[
            ("KDEDUP_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KDEDUP_KAFKA_SASL_PASSWORD", "hunter2"),
        ]);
        let c = args(&[]).validate(&e).unwrap();
        assert_eq!(c.kafka.properties.0["security.protocol"], "SASL_SSL");
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("pw@"), "{shown}");

        let e = env(&[("KDEDUP_KAFKA_ENABLE_AUTO_OFFSET_STORE", "true")]);
        let err = args(&[]).validate(&e).unwrap_err().to_string();
        assert!(
            err.contains("KDEDUP_KAFKA_ENABLE_AUTO_OFFSET_STORE"),
            "{err}"
        );
    }

    #[test]
    fn shutdown_must_fit_in_the_session() {
        let e = env(&[("KDEDUP_KAFKA_SESSION_TIMEOUT_MS", "10000")]);
        let err = args(&[]).validate(&e).unwrap_err().to_string();
        assert!(err.contains("session.timeout.ms"), "{err}");
        assert!(args(&["--shutdown-timeout", "5s"]).validate(&e).is_ok());
    }

    #[test]
    fn topics_must_not_loop() {
        let mut a = args(&[]);
        a.output_topic = Some("orders".into());
        let err = a.validate(&env(&[])).unwrap_err().to_string();
        assert!(err.contains("also an input topic"), "{err}");
    }

    #[test]
    fn schema_names_are_checked_before_they_reach_ddl() {
        assert!(validate_schema("kdedup_1").is_ok());
        for bad in ["", "Robert'); DROP", "a-b", "pg_catalog", "1abc"] {
            assert!(validate_schema(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://kd:s3cret@db:5432/app?sslmode=require&password=x"),
            "postgres://kd:<redacted>@db:5432/app?sslmode=require&password=<redacted>"
        );
        assert_eq!(redact_url("postgres://db/app"), "postgres://db/app");
    }

    #[test]
    fn ttl_has_an_upper_bound() {
        let err = args(&["--ttl", "1000000y"])
            .validate(&env(&[]))
            .unwrap_err();
        assert!(err.to_string().contains("100 years"), "{err}");
        assert!(args(&["--ttl", "100y"]).validate(&env(&[])).is_ok());
    }

    #[test]
    fn properties_the_guarantees_rest_on_cannot_be_overridden() {
        for (var, bad, same) in [
            ("KDEDUP_KAFKA_ENABLE_AUTO_COMMIT", "false", "true"),
            (
                "KDEDUP_KAFKA_ISOLATION_LEVEL",
                "read_uncommitted",
                "read_committed",
            ),
            ("KDEDUP_KAFKA_ENABLE_PARTITION_EOF", "true", "false"),
            ("KDEDUP_KAFKA_ENABLE_AUTO_OFFSET_STORE", "true", "false"),
            ("KDEDUP_KAFKA_ACKS", "1", "all"),
        ] {
            let err = args(&[]).validate(&env(&[(var, bad)])).unwrap_err();
            assert!(err.to_string().contains(var), "{err}");
            assert!(
                args(&[]).validate(&env(&[(var, same)])).is_ok(),
                "{var}={same}"
            );
        }
    }

    #[test]
    fn passwords_with_slash_at_and_colon_are_redacted_whole() {
        for url in [
            "postgres://kd:pa/ss@w:rd@db:5432/app",
            "postgres://kd:pa/ss@w:rd@db:5432/app?sslmode=require",
            "postgresql://kd:pa%2Fss%40w%3Ard@db/app",
        ] {
            let shown = redact_url(url);
            for piece in ["pa/ss", "ss@w", "w:rd", "pa%2F"] {
                assert!(!shown.contains(piece), "{url} -> {shown}");
            }
            assert!(shown.contains("kd:<redacted>@db"), "{url} -> {shown}");
        }
        assert_eq!(
            redact_url("postgres://db/app?password=pa/ss@w:rd&sslmode=require"),
            "postgres://db/app?password=<redacted>&sslmode=require"
        );
    }

    #[test]
    fn kafka_values_are_printed_only_from_an_allow_list() {
        let secret = "p/a@s:s";
        let e = env(&[
            ("KDEDUP_KAFKA_SASL_OAUTHBEARER_CONFIG", secret),
            ("KDEDUP_KAFKA_SSL_KEYSTORE_PASSWORD", secret),
            ("KDEDUP_KAFKA_SASL_USERNAME", "kdedup"),
        ]);
        let shown = format!("{:?}", args(&[]).validate(&e).unwrap());
        assert!(!shown.contains(secret), "{shown}");
        assert!(shown.contains("kdedup"), "{shown}");
        // librdkafka's error for an unknown property quotes its value.
        let e = env(&[("KDEDUP_KAFKA_SASL_JAAS_CONFIG", secret)]);
        let err = args(&[]).validate(&e).unwrap_err().to_string();
        assert!(err.contains("KDEDUP_KAFKA_SASL_JAAS_CONFIG"), "{err}");
        assert!(!err.contains(secret), "{err}");
        // A bad value of a known property is reported before anything connects.
        let e = env(&[("KDEDUP_KAFKA_SOCKET_TIMEOUT_MS", "soon")]);
        let err = args(&[]).validate(&e).unwrap_err().to_string();
        assert!(err.contains("KDEDUP_KAFKA_SOCKET_TIMEOUT_MS"), "{err}");
    }

    #[test]
    fn url_parameters_the_client_would_ignore_are_refused() {
        let mut a = args(&[]);
        a.db.database_url = Some("postgres://u@h/db?ssl_mode=require&password=x".into());
        let err = a.validate(&env(&[])).unwrap_err().to_string();
        assert!(err.contains("\"ssl_mode\""), "{err}");
        let mut a = args(&[]);
        a.db.database_url = Some("postgres://u@h/db?sslmode=verify_full".into());
        assert!(a.validate(&env(&[])).is_err());
        let mut a = args(&[]);
        a.db.database_url = Some(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=/etc/hostname&options[statement_timeout]=5s"
                .into(),
        );
        assert!(a.validate(&env(&[])).is_ok());
        let mut a = args(&[]);
        a.db.database_url =
            Some("postgres://u@h/db?sslmode=verify-full&sslrootcert=/no%2Fca.crt".into());
        let err = a.validate(&env(&[])).unwrap_err().to_string();
        assert!(err.contains("\"/no/ca.crt\" cannot be read"), "{err}");
    }

    #[test]
    fn env_var_names_are_known() {
        assert!(is_known_env_var("KDEDUP_TTL"));
        assert!(is_known_env_var("KDEDUP_DATABASE_URL"));
        assert!(is_known_env_var("KDEDUP_KAFKA_SASL_USERNAME"));
        assert!(!is_known_env_var("KDEDUP_TTTL"));
    }

    #[test]
    fn the_demo_only_drops_a_demo_schema() {
        assert_eq!(demo_schema("kdedup_demo").unwrap(), "kdedup_demo");
        assert!(demo_schema("kdedup_demo_2").is_ok());
        for real in ["kdedup", "public", "orders"] {
            let err = demo_schema(real).unwrap_err().to_string();
            assert!(err.contains("kdedup_demo"), "{err}");
        }
    }

    #[test]
    fn every_bad_setting_is_reported_at_once() {
        let e = args(&[
            "--ttl",
            "soon",
            "--batch-size",
            "0",
            "--metrics-addr",
            "nowhere",
        ])
        .validate(&env(&[("KDEDUP_KAFKA_GROUP_ID", "x")]))
        .unwrap_err();
        let settings: Vec<&str> = std::iter::once(&e)
            .chain(&e.more)
            .map(|e| e.setting.as_str())
            .collect();
        assert_eq!(
            settings,
            [
                "KDEDUP_KAFKA_GROUP_ID",
                "--ttl / KDEDUP_TTL",
                "--batch-size / KDEDUP_BATCH_SIZE",
                "--metrics-addr / KDEDUP_METRICS_ADDR"
            ]
        );
        assert_eq!(
            e.to_string().lines().count(),
            4,
            "one line per setting: {e}"
        );
    }
}
