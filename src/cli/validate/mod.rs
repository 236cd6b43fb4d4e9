//! Validation: raw flags and environment into [`crate::settings`], or a [`ConfigError`]
//! naming every bad setting and its fix, before anything connects to Kafka or Postgres.
//!
//! - this file: `kdedup run`'s settings, one function per component, errors collected by
//!   [`Findings`];
//! - [`db`]: the Postgres URL (parameters, TLS files) and schema name;
//! - [`http`]: `--sink http`'s URL and delivery limits;
//! - [`kafka`]: librdkafka properties from `KDEDUP_KAFKA_*` and `-X`, checked by librdkafka;
//! - [`commands`]: what `replay`, `inspect` and `demo` add.

mod commands;
mod db;
mod http;
mod kafka;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::time::Duration;

use super::env::Env;
use super::{setting_name, ConfigError, PruneFlags, RunArgs};
use super::{SinkKind, SinkOnConflict};
use crate::model::identity::{IdSpec, ScopeSpec};
use crate::model::is_valid_topic_name;
use crate::settings::{
    ConsumeSettings, DbSettings, EventField, GateSettings, KafkaSettings, OnConflict,
    PayloadMismatch, PostgresSinkSettings, PruneSettings, RelaySettings, RunSettings, SinkSettings,
};
pub use commands::demo_run_settings;
use kafka::{check_kafka_properties, kafka_properties};

/// Longest `--ttl`: the expiry (`now() + ttl`) must stay far inside Postgres' timestamp
/// range and every conversion of it to seconds or milliseconds must fit an `i64`.
/// 100 years of 365.25 days, which is what `--ttl 100y` means.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 31_557_600);

pub fn parse_duration(setting: &str, value: &str, example: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value.trim()).map_err(|e| {
        ConfigError::new(
            setting,
            format!("cannot read {value:?} as a duration ({e})"),
            format!("write a duration such as {example}"),
        )
    })
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
        let sink = self.sink_settings(kafka.as_ref(), &mut f);
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
        let rotate_every = f.ok(parse_duration(
            "outbox_rotate_interval",
            &self.outbox_rotate_interval,
            "10s",
        ));
        if let Some(d) = rotate_every {
            f.rule(d < Duration::from_secs(1) || d > Duration::from_secs(3600), || {
                ConfigError::new(
                    "outbox_rotate_interval",
                    format!("{} is outside 1s..1h", self.outbox_rotate_interval),
                    "keep the default 10s unless the outbox holds more than two intervals of input comfortably",
                )
            });
        }
        if let (Some(SinkSettings::Http(http)), Some(shutdown)) = (&sink, shutdown_timeout) {
            f.rule(http.timeout >= shutdown, || {
                ConfigError::new(
                    "http_timeout",
                    format!(
                        "{} is not below --shutdown-timeout ({}): a request in flight at SIGTERM could not finish and write its outcome",
                        self.http.http_timeout, self.shutdown_timeout
                    ),
                    "lower --http-timeout (KDEDUP_HTTP_TIMEOUT) or raise --shutdown-timeout",
                )
            });
        }
        let prune = match self.prune.pruner {
            true => f.ok(self.prune.validate()).map(Some),
            false => Some(None),
        };
        f.into_result(|| RunSettings {
            kafka: kafka.expect("no error"),
            db: db.expect("no error"),
            gate: gate.expect("no error"),
            consume: consume.expect("no error"),
            sink: sink.expect("no error"),
            relay: RelaySettings {
                enabled: self.relay,
                rotate_every: rotate_every.expect("no error"),
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
        let dlq_topic = self
            .dlq_topic
            .clone()
            .filter(|t| !t.trim().is_empty())
            .or_else(|| Some(format!("{}.dlq", input_topics.as_ref()?[0])))
            .and_then(|t| f.ok(validate_topic("dlq_topic", &t)).map(|()| t));
        if let (Some(inputs), Some(dlq)) = (&input_topics, &dlq_topic) {
            f.rule(inputs.contains(dlq), || {
                ConfigError::new(
                    "dlq_topic",
                    format!("{dlq:?} is also an input topic"),
                    "choose a distinct dead-letter topic, e.g. <input>.dlq",
                )
            });
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
            dlq_topic: dlq_topic?,
            create_topics: self.create_topics,
            topic_replication_factor: self.topic_replication_factor,
            properties: properties?,
        })
    }

    /// `--sink` and what it needs: the output topic (distinct from the others) for
    /// `kafka`; exactly one of `--sink-table` and `--sink-sql` for `postgres`. A flag of
    /// the other sink is an error, not ignored: it says the operator expects something
    /// this configuration does not do.
    fn sink_settings(
        &self,
        kafka: Option<&KafkaSettings>,
        f: &mut Findings,
    ) -> Option<SinkSettings> {
        match self.sink {
            SinkKind::Kafka => {
                self.no_postgres_sink_flags("kafka", f);
                self.no_http_url("kafka", f);
                let output_topic = f
                    .ok(required(
                        self.output_topic.clone(),
                        "output_topic",
                        "orders.dedup",
                    ))
                    .and_then(|t| f.ok(validate_topic("output_topic", &t)).map(|()| t))?;
                if let Some(k) = kafka {
                    f.rule(k.input_topics.contains(&output_topic), || {
                        ConfigError::new(
                            "output_topic",
                            format!("{output_topic:?} is also an input topic; kdedup would consume its own output"),
                            "choose a distinct output topic, e.g. <input>.dedup",
                        )
                    });
                    f.rule(k.dlq_topic == output_topic, || {
                        ConfigError::new(
                            "dlq_topic",
                            format!("{output_topic:?} is also the output topic"),
                            "choose a distinct dead-letter topic, e.g. <input>.dlq",
                        )
                    });
                }
                Some(SinkSettings::Kafka { output_topic })
            }
            SinkKind::Postgres => {
                self.no_output_topic("postgres", f);
                self.no_http_url("postgres", f);
                f.ok(postgres_sink_settings(self))
                    .map(SinkSettings::Postgres)
            }
            SinkKind::Http => {
                self.no_output_topic("http", f);
                self.no_postgres_sink_flags("http", f);
                self.http_sink_settings(f).map(SinkSettings::Http)
            }
        }
    }

    /// `--output-topic` given to a sink that writes no topic.
    fn no_output_topic(&self, sink: &str, f: &mut Findings) {
        let given = self
            .output_topic
            .as_deref()
            .is_some_and(|v| !v.trim().is_empty());
        f.rule(given, || {
            ConfigError::new(
                "output_topic",
                format!("is a setting of the Kafka sink, but --sink is {sink}: nothing would be written to it"),
                "unset it, or set --sink kafka",
            )
        });
    }

    /// The Postgres sink's flags given to another sink.
    fn no_postgres_sink_flags(&self, sink: &str, f: &mut Findings) {
        let set = |v: &Option<String>| v.as_deref().is_some_and(|v| !v.trim().is_empty());
        for (flag, given) in [
            ("sink_table", set(&self.sink_table)),
            ("sink_sql", set(&self.sink_sql)),
            (SINK_COLUMN, !self.sink_column.is_empty()),
            (
                "sink_on_conflict",
                self.sink_on_conflict != SinkOnConflict::Error,
            ),
        ] {
            f.rule(given, || {
                ConfigError::new(
                    flag,
                    format!("is a setting of the Postgres sink, but --sink is {sink}"),
                    "set --sink postgres (KDEDUP_SINK=postgres), or unset it",
                )
            });
        }
    }

    /// `--http-url` given to another sink: it would never be called.
    fn no_http_url(&self, sink: &str, f: &mut Findings) {
        let given = self
            .http
            .http_url
            .as_deref()
            .is_some_and(|v| !v.trim().is_empty());
        f.rule(given, || {
            ConfigError::new(
                "http_url",
                format!("is a setting of the HTTP sink, but --sink is {sink}: nothing would be sent to it"),
                "set --sink http (KDEDUP_SINK=http), or unset it",
            )
        });
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
                        "{} lanes keep a connection each, but --db-max-connections allows {}",
                        self.gate_lanes, db.max_connections
                    ),
                    "raise --db-max-connections (KDEDUP_DB_MAX_CONNECTIONS) or lower --gate-lanes",
                )
            });
        }
        f.kib("read_ahead_bytes", self.read_ahead_bytes, 8 << 20);
        let batch_linger = f.ok(parse_duration("batch_linger", &self.batch_linger, "1ms"));
        if let Some(linger) = batch_linger {
            f.rule(linger > Duration::from_secs(10), || {
                ConfigError::new(
                    "batch_linger",
                    format!("{} would hold events for too long", self.batch_linger),
                    "choose at most 10s (default 1ms)",
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

/// `--sink-column`, whose variable is plural (it takes a comma-separated list).
const SINK_COLUMN: &str = "--sink-column / KDEDUP_SINK_COLUMNS";

/// `--sink postgres`: exactly one of `--sink-table` and `--sink-sql`; the column mapping
/// and the conflict rule only with a table. The statement itself is checked against the
/// database at start (`sink::postgres::prepare`), where the tables are.
fn postgres_sink_settings(a: &RunArgs) -> Result<PostgresSinkSettings, ConfigError> {
    let table = a
        .sink_table
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let sql = a
        .sink_sql
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty());
    match (table, sql) {
        (None, None) => Err(ConfigError::new(
            "sink_table",
            "--sink postgres needs a table or a statement to write, and neither is set",
            "set --sink-table <[schema.]table> (KDEDUP_SINK_TABLE), or --sink-sql <statement over kdedup_events> (KDEDUP_SINK_SQL)",
        )),
        (Some(_), Some(_)) => Err(ConfigError::new(
            "sink_sql",
            "is set together with --sink-table; only one can say what is written",
            "unset one of them",
        )),
        (None, Some(sql)) => {
            if !a.sink_column.is_empty() || a.sink_on_conflict != SinkOnConflict::Error {
                return Err(ConfigError::new(
                    if a.sink_column.is_empty() { "sink_on_conflict" } else { SINK_COLUMN },
                    "only applies to --sink-table; a --sink-sql statement says its own columns and conflict handling",
                    "unset it, or write the mapping into the statement",
                ));
            }
            Ok(PostgresSinkSettings::Sql(sql.trim_end_matches(';').trim_end().to_string()))
        }
        (Some(table), None) => {
            if table.contains(';') || table.split('.').count() > 2 {
                return Err(ConfigError::new(
                    "sink_table",
                    format!("{table:?} is not a table name"),
                    "write [schema.]table, e.g. public.orders",
                ));
            }
            let mut columns = Vec::new();
            for spec in a.sink_column.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
                let (field, column) = spec.split_once('=').unwrap_or((spec, ""));
                let (field, column) = (field.trim(), column.trim());
                let Some(field) = EventField::parse(field) else {
                    return Err(ConfigError::new(
                        SINK_COLUMN,
                        format!("{spec:?}: {field:?} is not an event field"),
                        format!(
                            "write <field>=<column> with field one of {}",
                            EventField::ALL.map(EventField::name).join(", ")
                        ),
                    ));
                };
                if column.is_empty() {
                    return Err(ConfigError::new(
                        SINK_COLUMN,
                        format!("{spec:?} names no column"),
                        format!("write {}=<column>, e.g. {}=order_event_id", field.name(), field.name()),
                    ));
                }
                if columns.iter().any(|(_, c)| c == column) {
                    return Err(ConfigError::new(
                        SINK_COLUMN,
                        format!("column {column:?} is mapped twice"),
                        "map each column from one field",
                    ));
                }
                columns.push((field, column.to_string()));
            }
            Ok(PostgresSinkSettings::Table {
                table: table.to_string(),
                columns,
                on_conflict: match a.sink_on_conflict {
                    SinkOnConflict::Error => OnConflict::Error,
                    SinkOnConflict::Nothing => OnConflict::Nothing,
                    SinkOnConflict::Update => OnConflict::Update,
                },
            })
        }
    }
}
