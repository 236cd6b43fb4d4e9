//! Command line and environment configuration.
//!
//! Every flag also reads `KDEDUP_<FLAG>`. Any librdkafka property passes through as
//! `KDEDUP_KAFKA_<PROPERTY>` (dots written as underscores) or `--kafka-property k=v`.
//!
//! Parsing (clap) only checks shapes; [`RunArgs::validate`] turns the raw flags into a
//! [`RunConfig`] and checks the rules that span fields, so that a bad setting is reported
//! with its name and a fix *before* anything connects to Kafka or Postgres. `main` maps a
//! [`ConfigError`] to exit code 64 (`EX_USAGE`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::identity::{IdSpec, ScopeSpec};

/// Exit code for bad configuration (sysexits.h `EX_USAGE`).
pub const EX_USAGE: i32 = 64;

/// Exit code when a server refuses the configuration: Postgres rejected the TLS settings,
/// the login or the database name (sysexits.h `EX_CONFIG`). A restart cannot fix it.
pub const EX_CONFIG: i32 = 78;

/// Longest `--ttl`: the expiry (`now() + ttl`) must stay far inside Postgres' timestamp
/// range and every conversion of it to seconds or milliseconds must fit an `i64`.
/// 100 years of 365.25 days, which is what `--ttl 100y` means.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 31_557_600);

/// Prefix of the environment variables that pass librdkafka properties through.
pub const KAFKA_ENV_PREFIX: &str = "KDEDUP_KAFKA_";

#[derive(Debug, Parser)]
#[command(
    name = "kdedup",
    version,
    about = "Kafka consumer-side deduplication sidecar: each event id causes exactly one forwarding write"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar: consume, gate in Postgres, relay to the output topic.
    Run(Box<RunArgs>),
    /// Apply the embedded database migrations and exit.
    Migrate(DbArgs),
    /// Zero-setup demo: embedded mock Kafka cluster + the local Postgres.
    Demo(DemoArgs),
    /// Re-feed events (the dead-letter topic by default) through the gate.
    Replay(Box<crate::replay::ReplayArgs>),
    /// Delete expired processed_events rows once and exit.
    Prune(PruneArgs),
    /// Show where and when an event id was first seen and whether it was forwarded.
    ///
    /// Exit codes: 0 found, 1 not recorded (never seen, or expired and pruned), 2 the
    /// database could not be read.
    Inspect(crate::ops::InspectArgs),
    /// Gate table statistics: rows, expiry horizon, outbox backlog, duplicates avoided.
    Stats(crate::ops::StatsArgs),
}

/// Connection settings shared by every subcommand that talks to Postgres.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// Postgres connection URL (falls back to DATABASE_URL).
    #[arg(long, env = "KDEDUP_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Schema that holds kdedup's tables, so the application's own tables are never touched.
    #[arg(long, env = "KDEDUP_DB_SCHEMA", default_value = "kdedup")]
    pub db_schema: String,

    /// Size of the Postgres connection pool.
    #[arg(long, env = "KDEDUP_DB_MAX_CONNECTIONS", default_value_t = 4)]
    pub db_max_connections: u32,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Kafka bootstrap servers, comma-separated (host:port,...).
    #[arg(long, env = "KDEDUP_BROKERS")]
    pub brokers: Option<String>,

    /// Consumer group id.
    #[arg(long, env = "KDEDUP_GROUP_ID")]
    pub group_id: Option<String>,

    /// Input topics, comma-separated.
    #[arg(long, env = "KDEDUP_INPUT_TOPICS")]
    pub input_topics: Option<String>,

    /// Topic that receives each first-seen event exactly once.
    #[arg(long, env = "KDEDUP_OUTPUT_TOPIC")]
    pub output_topic: Option<String>,

    /// Dead-letter topic for events without a usable id [default: <first input topic>.dlq].
    #[arg(long, env = "KDEDUP_DLQ_TOPIC")]
    pub dlq_topic: Option<String>,

    #[command(flatten)]
    pub db: DbArgs,

    /// Where the event id comes from: comma-separated fallback chain of
    /// `header:<name>`, `key`, `json:<JSON pointer>`, `cloudevents` (source + id, binary
    /// or structured mode); the first source present wins.
    #[arg(long, env = "KDEDUP_ID_FROM", default_value = "header:event-id")]
    pub id_from: String,

    /// Dedup scope: a literal, or `header:<name>` for per-tenant scoping [default: the group id].
    #[arg(long, env = "KDEDUP_SCOPE")]
    pub scope: Option<String>,

    /// Longest accepted event id, in bytes.
    #[arg(long, env = "KDEDUP_MAX_ID_BYTES", default_value_t = 512)]
    pub max_id_bytes: usize,

    /// Largest message (key + value + headers) accepted, in bytes; larger ones are
    /// dead-lettered. Lowered at start to what the output topic and the producer take
    /// with kdedup's own headers. 0 turns off this flag's own limit (not those).
    #[arg(long, env = "KDEDUP_MAX_MESSAGE_BYTES", default_value_t = 1_000_000)]
    pub max_message_bytes: usize,

    /// What to do with an event whose id was already seen with a different payload:
    /// `skip` it (counted and logged) or send it to the dead-letter topic (`dlq`).
    #[arg(long, env = "KDEDUP_ON_PAYLOAD_MISMATCH", value_enum, default_value_t = PayloadMismatch::Skip)]
    pub on_payload_mismatch: PayloadMismatch,

    /// How long an id is remembered (e.g. `7d`, `36h`). Must outlive every way an event can
    /// come back: topic retention, consumer lag, the age of what sits in the DLQ.
    #[arg(long, env = "KDEDUP_TTL", default_value = "7d")]
    pub ttl: String,

    /// Most messages per gate transaction.
    #[arg(long, env = "KDEDUP_BATCH_SIZE", default_value_t = 1000)]
    pub batch_size: usize,

    /// Gate lanes: each owns a share of the assigned partitions and runs its own gate
    /// transactions on its own connection, at the same time as the others. A partition
    /// belongs to one lane, so its order is kept. About one per Postgres core to spend.
    #[arg(long, env = "KDEDUP_GATE_LANES", default_value_t = 2)]
    pub gate_lanes: usize,

    /// Most message bytes read ahead of the gate lanes (each message counts at least 1 KiB).
    /// Lets the lanes work while librdkafka delivers a long run of one partition; the
    /// memory it takes comes on top of librdkafka's prefetch queue.
    #[arg(long, env = "KDEDUP_READ_AHEAD_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub read_ahead_bytes: usize,

    /// Longest wait for a batch to fill once its first message arrived (e.g. `20ms`).
    #[arg(long, env = "KDEDUP_BATCH_LINGER", default_value = "20ms")]
    pub batch_linger: String,

    /// Most bytes (keys + values + headers) held in one batch.
    #[arg(long, env = "KDEDUP_BATCH_MAX_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub batch_max_bytes: usize,

    /// Most outbox rows the relay publishes per round.
    #[arg(long, env = "KDEDUP_RELAY_BATCH_SIZE", default_value_t = 2000)]
    pub relay_batch_size: usize,

    /// Most bytes (keys + values + headers) of outbox rows the relay reads and publishes
    /// per round; a round always takes at least one row. Bounds the relay's memory and
    /// the producer's queue whatever the payload sizes.
    #[arg(long, env = "KDEDUP_RELAY_BATCH_MAX_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub relay_batch_max_bytes: usize,

    /// Run the outbox relay in this process (one relay per schema publishes; others stand by).
    #[arg(long, env = "KDEDUP_RELAY", default_value_t = true, action = clap::ArgAction::Set)]
    pub relay: bool,

    /// Admin HTTP address: /metrics, /livez, /readyz.
    #[arg(long, env = "KDEDUP_METRICS_ADDR", default_value = "0.0.0.0:9464")]
    pub metrics_addr: String,

    /// Deadline for a graceful stop after SIGTERM/SIGINT. Keep it below the pod's
    /// terminationGracePeriodSeconds (30s by default).
    #[arg(long, env = "KDEDUP_SHUTDOWN_TIMEOUT", default_value = "25s")]
    pub shutdown_timeout: String,

    /// Apply database migrations at start (turn off when a migration Job does it).
    #[arg(long, env = "KDEDUP_MIGRATE_ON_START", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate_on_start: bool,

    /// Create missing output and dead-letter topics at start.
    #[arg(long, env = "KDEDUP_CREATE_TOPICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub create_topics: bool,

    /// Replication factor for topics kdedup creates (-1: the broker's default).
    #[arg(long, env = "KDEDUP_TOPIC_REPLICATION_FACTOR", default_value_t = -1, allow_hyphen_values = true)]
    pub topic_replication_factor: i32,

    #[command(flatten)]
    pub prune: PruneFlags,

    /// Extra librdkafka property `key=value` for every Kafka client (repeatable). The same
    /// can be set as KDEDUP_KAFKA_<PROPERTY> with dots as underscores.
    #[arg(long = "kafka-property", short = 'X', value_name = "KEY=VALUE")]
    pub kafka_property: Vec<String>,
}

/// TTL pruner settings.
#[derive(Debug, Clone, Args)]
pub struct PruneFlags {
    /// Run the TTL pruner in this process (one pruner per schema works; others stand by).
    #[arg(long, env = "KDEDUP_PRUNER", default_value_t = true, action = clap::ArgAction::Set)]
    pub pruner: bool,

    /// Time between prune rounds.
    #[arg(long, env = "KDEDUP_PRUNE_INTERVAL", default_value = "60s")]
    pub prune_interval: String,

    /// Rows deleted per prune transaction.
    #[arg(long, env = "KDEDUP_PRUNE_BATCH_SIZE", default_value_t = 5000)]
    pub prune_batch_size: i64,

    /// Pause between two prune transactions.
    #[arg(long, env = "KDEDUP_PRUNE_PAUSE", default_value = "50ms")]
    pub prune_pause: String,
}

impl PruneFlags {
    pub fn validate(&self) -> Result<crate::pruner::PruneSettings, ConfigError> {
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
        Ok(crate::pruner::PruneSettings {
            interval,
            batch_size: self.prune_batch_size,
            pause,
        })
    }
}

/// `kdedup prune`.
#[derive(Debug, Clone, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub prune: PruneFlags,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Distinct events the demo produces (duplicates come on top).
    #[arg(long, default_value_t = 20_000)]
    pub events: usize,

    /// Admin HTTP address during the demo.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_addr: String,

    /// Postgres connection URL (falls back to DATABASE_URL, then the local server).
    #[arg(long, env = "KDEDUP_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Schema the demo recreates for itself.
    #[arg(long, default_value = "kdedup_demo")]
    pub db_schema: String,

    /// Keep serving /metrics after the summary until Ctrl-C.
    #[arg(long)]
    pub hold: bool,
}

/// `--on-payload-mismatch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PayloadMismatch {
    Skip,
    Dlq,
}

/// A setting that cannot be used, with what is wrong and how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {setting}: {problem}. Fix: {fix}")]
pub struct ConfigError {
    /// Flag and environment variable, e.g. `--ttl / KDEDUP_TTL`.
    pub setting: String,
    pub problem: String,
    pub fix: String,
}

impl ConfigError {
    pub fn new(setting: &str, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            setting: setting_name(setting),
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

/// `ttl` -> `--ttl / KDEDUP_TTL`.
fn setting_name(flag: &str) -> String {
    if flag.starts_with(KAFKA_ENV_PREFIX) || flag.starts_with("--") {
        return flag.to_string();
    }
    format!(
        "--{} / KDEDUP_{}",
        flag.replace('_', "-"),
        flag.to_uppercase().replace('-', "_")
    )
}

/// Validated settings of `kdedup run`.
#[derive(Clone)]
pub struct RunConfig {
    pub brokers: String,
    pub group_id: String,
    pub input_topics: Vec<String>,
    pub output_topic: String,
    pub dlq_topic: String,
    pub db: DbConfig,
    pub id: IdSpec,
    pub scope: ScopeSpec,
    pub ttl: Duration,
    /// `None` when the size check is off.
    pub max_message_bytes: Option<usize>,
    pub on_payload_mismatch: PayloadMismatch,
    pub batch_size: usize,
    pub gate_lanes: usize,
    pub read_ahead_bytes: usize,
    pub batch_linger: Duration,
    pub batch_max_bytes: usize,
    pub relay_batch_size: usize,
    pub relay_batch_max_bytes: usize,
    pub relay: bool,
    pub metrics_addr: SocketAddr,
    pub shutdown_timeout: Duration,
    pub migrate_on_start: bool,
    pub create_topics: bool,
    pub topic_replication_factor: i32,
    /// `None` when the pruner is off in this process.
    pub prune: Option<crate::pruner::PruneSettings>,
    /// librdkafka properties for every client, in the order they were given.
    pub kafka: KafkaProperties,
}

/// Validated Postgres settings.
#[derive(Clone)]
pub struct DbConfig {
    pub url: String,
    pub schema: String,
    pub max_connections: u32,
}

impl fmt::Debug for DbConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbConfig")
            .field("url", &redact_url(&self.url))
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// librdkafka properties passed through from the environment and `-X`.
#[derive(Clone, Default)]
pub struct KafkaProperties(pub BTreeMap<String, String>);

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

impl KafkaProperties {
    /// Hands every property to librdkafka once, the way each client will get it, so that
    /// an unknown name or a bad value is a configuration error before anything connects.
    /// The error never quotes a value that is not on the printable allow-list.
    pub fn check(&self) -> Result<(), ConfigError> {
        for kind in [
            ClientKind::Consumer,
            ClientKind::Producer,
            ClientKind::Admin,
        ] {
            let mut config = rdkafka::ClientConfig::new();
            self.apply(&mut config, kind);
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
                self.0.iter().map(|(k, v)| (k.as_str(), v.as_str())),
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

impl fmt::Debug for RunConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("input_topics", &self.input_topics)
            .field("output_topic", &self.output_topic)
            .field("dlq_topic", &self.dlq_topic)
            .field("db", &self.db)
            .field("id_from", &self.id.describe())
            .field("scope", &self.scope)
            .field("ttl", &humantime::format_duration(self.ttl).to_string())
            .field("batch_size", &self.batch_size)
            .field("gate_lanes", &self.gate_lanes)
            .field("read_ahead_bytes", &self.read_ahead_bytes)
            .field("batch_linger", &self.batch_linger)
            .field("relay_batch_size", &self.relay_batch_size)
            .field("relay_batch_max_bytes", &self.relay_batch_max_bytes)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("batch_max_bytes", &self.batch_max_bytes)
            .field("relay", &self.relay)
            .field("metrics_addr", &self.metrics_addr)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("kafka", &self.kafka)
            .finish()
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

/// `postgres://user:pw@host/db` -> `postgres://user:<redacted>@host/db`. The user
/// information ends at the *last* `@` before the query, so a password that holds `/`, `@`
/// or `:` (written unencoded) is still hidden whole; `password=` in the query is hidden too.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return "<unparseable url>".to_string();
    };
    let rest = &url[scheme_end + 3..];
    let (before_query, query) = match rest.find('?') {
        Some(q) => rest.split_at(q),
        None => (rest, ""),
    };
    let redacted_query = redact_query(query);
    match before_query.rfind('@') {
        Some(at) => {
            let userinfo = &before_query[..at];
            let shown = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:<redacted>"),
                // No ':' at all: a bare user name. A '/' in it means a password was
                // split by an unencoded '/'; show nothing of it.
                None if userinfo.contains('/') => "<redacted>".to_string(),
                None => userinfo.to_string(),
            };
            format!(
                "{}://{}@{}{}",
                &url[..scheme_end],
                shown,
                &before_query[at + 1..],
                redacted_query
            )
        }
        None => format!(
            "{}://{}{}",
            &url[..scheme_end],
            before_query,
            redacted_query
        ),
    }
}

fn redact_query(path_and_query: &str) -> String {
    let Some(q) = path_and_query.find('?') else {
        return path_and_query.to_string();
    };
    let params: Vec<String> = path_and_query[q + 1..]
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.to_ascii_lowercase().contains("password") => {
                format!("{k}=<redacted>")
            }
            _ => kv.to_string(),
        })
        .collect();
    format!("{}?{}", &path_and_query[..q], params.join("&"))
}

/// Reads configuration that clap does not see. A trait so tests pass a map instead of
/// mutating the process environment.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
    fn vars(&self) -> Vec<(String, String)>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars().collect()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
    fn vars(&self) -> Vec<(String, String)> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

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
    pub fn validate(self, env: &dyn Env) -> Result<DbConfig, ConfigError> {
        if self.db_max_connections == 0 {
            return Err(ConfigError::new(
                "db_max_connections",
                "must be at least 1",
                "set it to 2 or more (the relay holds one connection of its own)",
            ));
        }
        Ok(DbConfig {
            url: database_url(self.database_url, env)?,
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

/// A name Kafka accepts for a topic: 1-249 of `a-zA-Z0-9._-`, not `.` or `..`.
pub fn is_valid_topic_name(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
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

impl RunArgs {
    /// Turns raw flags into a [`RunConfig`], or names the first bad setting and its fix.
    pub fn validate(self, env: &dyn Env) -> Result<RunConfig, ConfigError> {
        let brokers = required(self.brokers, "brokers", "kafka-0.kafka:9092")?;
        let group_id = required(self.group_id, "group_id", "orders-app")?;
        let input_topics: Vec<String> = required(self.input_topics, "input_topics", "orders")?
            .split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        if input_topics.is_empty() {
            return Err(ConfigError::new(
                "input_topics",
                "names no topic",
                "list one or more topics, comma-separated",
            ));
        }
        for t in &input_topics {
            validate_topic("input_topics", t)?;
        }
        let output_topic = required(self.output_topic, "output_topic", "orders.dedup")?;
        validate_topic("output_topic", &output_topic)?;
        let dlq_topic = self
            .dlq_topic
            .filter(|t| !t.trim().is_empty())
            .unwrap_or_else(|| format!("{}.dlq", input_topics[0]));
        validate_topic("dlq_topic", &dlq_topic)?;
        if input_topics.contains(&output_topic) {
            return Err(ConfigError::new(
                "output_topic",
                format!(
                    "{output_topic:?} is also an input topic; kdedup would consume its own output"
                ),
                "choose a distinct output topic, e.g. <input>.dedup",
            ));
        }
        if input_topics.contains(&dlq_topic) || dlq_topic == output_topic {
            return Err(ConfigError::new(
                "dlq_topic",
                format!("{dlq_topic:?} is also an input or the output topic"),
                "choose a distinct dead-letter topic, e.g. <input>.dlq",
            ));
        }

        let db = self.db.validate(env)?;
        let id = IdSpec::parse(&self.id_from, self.max_id_bytes).map_err(|problem| {
            ConfigError::new(
                "id_from",
                problem,
                "write a comma-separated list of header:<name>, key, json:<pointer>, cloudevents (e.g. header:event-id,json:/id)",
            )
        })?;
        if self.max_id_bytes == 0 || self.max_id_bytes > 2048 {
            return Err(ConfigError::new(
                "max_id_bytes",
                format!("{} is out of range", self.max_id_bytes),
                "choose a value between 1 and 2048 (ids are part of a btree key)",
            ));
        }
        let scope = match self.scope.filter(|s| !s.trim().is_empty()) {
            None => ScopeSpec::Literal(group_id.clone()),
            Some(s) => ScopeSpec::parse(&s).map_err(|problem| {
                ConfigError::new(
                    "scope",
                    problem,
                    "write a literal scope (e.g. orders) or header:<name> (e.g. header:tenant-id)",
                )
            })?,
        };
        let ttl = parse_duration("ttl", &self.ttl, "7d or 36h")?;
        if ttl > MAX_TTL {
            return Err(ConfigError::new(
                "ttl",
                format!("{} is longer than the 100 years kdedup can store", self.ttl),
                "choose at most 100y (the expiry must fit Postgres' timestamps)",
            ));
        }
        if ttl < Duration::from_secs(60) {
            return Err(ConfigError::new(
                "ttl",
                format!("{} is too short to deduplicate anything", self.ttl),
                "set it longer than the input topic's retention plus the longest expected lag (default 7d)",
            ));
        }
        if self.batch_size == 0 || self.batch_size > 50_000 {
            return Err(ConfigError::new(
                "batch_size",
                format!("{} is out of range", self.batch_size),
                "choose between 1 and 50000 (default 1000)",
            ));
        }
        if self.gate_lanes == 0 || self.gate_lanes > 16 {
            return Err(ConfigError::new(
                "gate_lanes",
                format!("{} is out of range", self.gate_lanes),
                "choose between 1 and 16 (default 2)",
            ));
        }
        if self.gate_lanes as u32 > db.max_connections {
            return Err(ConfigError::new(
                "gate_lanes",
                format!(
                    "{} lanes need a connection each, but the pool holds {}",
                    self.gate_lanes, db.max_connections
                ),
                "raise --db-max-connections (KDEDUP_DB_MAX_CONNECTIONS) or lower --gate-lanes",
            ));
        }
        if self.read_ahead_bytes < 1024 {
            return Err(ConfigError::new(
                "read_ahead_bytes",
                format!("{} is too small", self.read_ahead_bytes),
                "choose at least 1024 (default 8388608)",
            ));
        }
        let batch_linger = parse_duration("batch_linger", &self.batch_linger, "20ms")?;
        if batch_linger > Duration::from_secs(10) {
            return Err(ConfigError::new(
                "batch_linger",
                format!("{} would hold events for too long", self.batch_linger),
                "choose at most 10s (default 20ms)",
            ));
        }
        if self.batch_max_bytes < 1024 {
            return Err(ConfigError::new(
                "batch_max_bytes",
                format!("{} is too small", self.batch_max_bytes),
                "choose at least 1024 (default 16777216)",
            ));
        }
        if self.relay_batch_size == 0 || self.relay_batch_size > 100_000 {
            return Err(ConfigError::new(
                "relay_batch_size",
                format!("{} is out of range", self.relay_batch_size),
                "choose between 1 and 100000 (default 2000)",
            ));
        }
        if self.relay_batch_max_bytes < 1024 {
            return Err(ConfigError::new(
                "relay_batch_max_bytes",
                format!("{} is too small", self.relay_batch_max_bytes),
                "choose at least 1024 (default 16777216)",
            ));
        }
        let metrics_addr: SocketAddr = self.metrics_addr.parse().map_err(|_| {
            ConfigError::new(
                "metrics_addr",
                format!("{:?} is not an address", self.metrics_addr),
                "write ip:port, e.g. 0.0.0.0:9464",
            )
        })?;
        let shutdown_timeout = parse_duration("shutdown_timeout", &self.shutdown_timeout, "25s")?;
        if shutdown_timeout.is_zero() {
            return Err(ConfigError::new(
                "shutdown_timeout",
                "must be more than zero",
                "set it a few seconds below the pod's terminationGracePeriodSeconds (default 25s)",
            ));
        }
        if self.topic_replication_factor == 0 || self.topic_replication_factor < -1 {
            return Err(ConfigError::new(
                "topic_replication_factor",
                format!(
                    "{} is not a replication factor",
                    self.topic_replication_factor
                ),
                "use -1 for the broker's default, or 1 or more",
            ));
        }
        let kafka = kafka_properties(env, &self.kafka_property)?;
        kafka.check()?;
        // Rule spanning two settings: a drain that outlives the group session would be cut
        // short by the broker evicting us, which turns a clean stop into a rebalance.
        if let Some(session) = kafka.0.get("session.timeout.ms") {
            let session_ms: u64 = session.parse().map_err(|_| {
                ConfigError::new(
                    "KDEDUP_KAFKA_SESSION_TIMEOUT_MS",
                    format!("{session:?} is not a number of milliseconds"),
                    "write milliseconds, e.g. 45000",
                )
            })?;
            if shutdown_timeout >= Duration::from_millis(session_ms) {
                return Err(ConfigError::new(
                    "shutdown_timeout",
                    format!(
                        "{} is not below session.timeout.ms ({session_ms} ms)",
                        self.shutdown_timeout
                    ),
                    "lower --shutdown-timeout or raise KDEDUP_KAFKA_SESSION_TIMEOUT_MS",
                ));
            }
        }

        Ok(RunConfig {
            brokers,
            group_id,
            input_topics,
            output_topic,
            dlq_topic,
            db,
            id,
            scope,
            ttl,
            max_message_bytes: (self.max_message_bytes > 0).then_some(self.max_message_bytes),
            on_payload_mismatch: self.on_payload_mismatch,
            batch_size: self.batch_size,
            gate_lanes: self.gate_lanes,
            read_ahead_bytes: self.read_ahead_bytes,
            batch_linger,
            batch_max_bytes: self.batch_max_bytes,
            relay_batch_size: self.relay_batch_size,
            relay_batch_max_bytes: self.relay_batch_max_bytes,
            relay: self.relay,
            metrics_addr,
            shutdown_timeout,
            migrate_on_start: self.migrate_on_start,
            create_topics: self.create_topics,
            topic_replication_factor: self.topic_replication_factor,
            prune: self
                .prune
                .pruner
                .then(|| self.prune.validate())
                .transpose()?,
            kafka,
        })
    }
}

/// Every `KDEDUP_*` variable `kdedup run` reads, for checks against deployment manifests.
pub fn is_known_env_var(name: &str) -> bool {
    if name.starts_with(KAFKA_ENV_PREFIX) {
        return true;
    }
    use clap::CommandFactory;
    let cli = Cli::command();
    let known_extra = ["KDEDUP_LOG", "KDEDUP_LOG_FORMAT"];
    known_extra.contains(&name)
        || cli.get_subcommands().any(|sub| {
            sub.get_arguments()
                .any(|a| a.get_env().is_some_and(|e| e == name))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(c.dlq_topic, "orders.dlq");
        assert_eq!(c.ttl, Duration::from_secs(7 * 86400));
        assert_eq!(c.db.schema, "kdedup");
        assert!(matches!(c.scope, ScopeSpec::Literal(ref s) if s == "g"));
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
        assert_eq!(c.db.url, "postgres://x@y/z");
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
        assert_eq!(c.kafka.0["security.protocol"], "SASL_SSL");
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
}
