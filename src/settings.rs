//! Validated settings, one struct per component, free of the command line.
//!
//! `cli` turns flags and `KDEDUP_*` variables into these (every rule checked, exit 64
//! otherwise); everything below the command line reads only these. Secrets are wrapped
//! ([`DatabaseUrl`], [`KafkaProperties`]) so that `Debug` can be derived everywhere and a
//! start-up log line of the whole configuration never shows a password.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

pub use crate::kafka::properties::KafkaProperties;
use crate::model::identity::{IdSpec, ScopeSpec};

/// Validated settings of `kdedup run` (and of the gate that `kdedup replay` shares).
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub kafka: KafkaSettings,
    pub db: DbSettings,
    pub gate: GateSettings,
    pub consume: ConsumeSettings,
    /// Where first-seen events go.
    pub sink: SinkSettings,
    pub relay: RelaySettings,
    /// `None` when the pruner is off in this process.
    pub prune: Option<PruneSettings>,
    /// Admin HTTP address: `/metrics`, `/livez`, `/readyz`.
    pub metrics_addr: SocketAddr,
    pub shutdown_timeout: Duration,
    pub migrate_on_start: bool,
}

/// Brokers, topics and the librdkafka properties every client gets.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    pub group_id: String,
    pub input_topics: Vec<String>,
    pub dlq_topic: String,
    /// Create missing output (Kafka sink) and dead-letter topics at start.
    pub create_topics: bool,
    /// For topics kdedup creates; -1: the broker's default.
    pub topic_replication_factor: i32,
    /// librdkafka properties for every client, in the order they were given.
    pub properties: KafkaProperties,
}

/// What the gate decides with: identity, TTL, limits.
#[derive(Debug, Clone)]
pub struct GateSettings {
    pub id: IdSpec,
    pub scope: ScopeSpec,
    pub ttl: Duration,
    /// `--max-message-bytes`; `None` when that flag's own limit is off (the producer's
    /// always applies, see `app::input_size_limit`).
    pub max_message_bytes: Option<usize>,
    pub on_payload_mismatch: PayloadMismatch,
    /// How long one gate attempt may take before it is given up and retried: a third of
    /// `max.poll.interval.ms`, within 5-60 s. Nothing polls the consumer while a gate
    /// statement runs, so an attempt hung on a dead connection (a blackholed port answers
    /// nothing, not even a reset) must end well within that interval, or the consumer is
    /// evicted from its group.
    pub attempt_timeout: Duration,
}

/// How the reader and the gate lanes batch.
#[derive(Debug, Clone)]
pub struct ConsumeSettings {
    /// Most messages per gate transaction.
    pub batch_size: usize,
    /// Most key + value + header bytes per batch.
    pub batch_max_bytes: usize,
    pub batch_linger: Duration,
    pub gate_lanes: usize,
    pub read_ahead_bytes: usize,
}

/// `--sink`: what the forwarding write of a first-seen event is.
#[derive(Debug, Clone)]
pub enum SinkSettings {
    /// An outbox row, relayed to `output_topic`.
    Kafka { output_topic: String },
    /// The application's own row, written in the gate transaction.
    Postgres(PostgresSinkSettings),
    /// A POST to the application, guarded by the status gate (`sink::http`).
    Http(HttpSinkSettings),
}

impl RunSettings {
    /// The Postgres sink's settings, when that is the sink.
    pub fn sink_postgres(&self) -> Option<&PostgresSinkSettings> {
        match &self.sink {
            SinkSettings::Postgres(p) => Some(p),
            SinkSettings::Kafka { .. } | SinkSettings::Http(_) => None,
        }
    }

    /// The topics kdedup writes to: the output topic (Kafka sink) and the dead-letter topic.
    pub fn own_topics(&self) -> Vec<&str> {
        self.sink
            .output_topic()
            .into_iter()
            .chain([self.kafka.dlq_topic.as_str()])
            .collect()
    }
}

impl SinkSettings {
    /// The output topic, for the Kafka sink.
    pub fn output_topic(&self) -> Option<&str> {
        match self {
            SinkSettings::Kafka { output_topic } => Some(output_topic),
            SinkSettings::Postgres(_) | SinkSettings::Http(_) => None,
        }
    }

    /// What the sink writes to: the output topic (kafka), the table or `sql` (postgres), the
    /// application's URL (http).
    pub fn target(&self) -> String {
        match self {
            SinkSettings::Kafka { output_topic } => output_topic.clone(),
            SinkSettings::Postgres(PostgresSinkSettings::Table { table, .. }) => table.clone(),
            SinkSettings::Postgres(PostgresSinkSettings::Sql(_)) => "sql".to_string(),
            // Without its query, which may hold a token: this goes into a metric label.
            SinkSettings::Http(http) => http.url.to_string(),
        }
    }

    /// The name of `--sink`, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            SinkSettings::Kafka { .. } => "kafka",
            SinkSettings::Postgres(_) => "postgres",
            SinkSettings::Http(_) => "http",
        }
    }
}

/// `--sink http`: where and how first-seen events are POSTed.
#[derive(Debug, Clone)]
pub struct HttpSinkSettings {
    /// `--http-url`: an `http://` URL (checked: no user information, no fragment).
    pub url: HttpUrl,
    /// Most requests in flight, over every lane and partition.
    pub concurrency: usize,
    /// Requests sent for one event before it is `FAILED` (retryable answers only; a 409
    /// does not count).
    pub max_attempts: u32,
    /// How long an event the application keeps answering 409 for is tried again before
    /// it is `FAILED`.
    pub conflict_timeout: Duration,
    /// One request, answer and body included.
    pub timeout: Duration,
    /// First retry delay; doubles per attempt (with jitter) up to `max_backoff`.
    pub backoff: Duration,
    /// Longest wait between two attempts, `Retry-After` included.
    pub max_backoff: Duration,
    /// How long a `PROCESSING` row stays owned by this replica without a renewal; renewed
    /// every third of it while the delivery lasts.
    pub lease: Duration,
    /// Most response body bytes kept with the row (and in a dead letter's excerpt: less).
    pub max_response_bytes: usize,
}

/// The application's URL. `Debug` and `Display` hide the query, which may hold a token.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpUrl(String);

impl HttpUrl {
    pub fn new(url: String) -> Self {
        HttpUrl(url)
    }

    /// The URL as written, query included: only for the HTTP client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.split_once('?') {
            Some((before, _)) => write!(f, "{before}?<redacted>"),
            None => f.write_str(&self.0),
        }
    }
}

/// `--sink postgres`: the statement that writes the batch's first-seen events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostgresSinkSettings {
    /// `--sink-table`: the JSON object in the value, mapped onto the table's columns.
    Table {
        /// As given (`[schema.]table`); resolved by Postgres at start.
        table: String,
        /// `--sink-column <metadata>=<column>`.
        columns: Vec<(EventField, String)>,
        on_conflict: OnConflict,
    },
    /// `--sink-sql`: a statement over the relation `kdedup_events`.
    Sql(String),
}

/// What kdedup knows of an event besides its value, for `--sink-column`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventField {
    EventId,
    Scope,
    Key,
    SourceTopic,
    SourcePartition,
    SourceOffset,
    SourceTimestamp,
    Headers,
}

impl EventField {
    pub const ALL: [EventField; 8] = [
        EventField::EventId,
        EventField::Scope,
        EventField::Key,
        EventField::SourceTopic,
        EventField::SourcePartition,
        EventField::SourceOffset,
        EventField::SourceTimestamp,
        EventField::Headers,
    ];

    /// Its name on the command line, which is also its column in `kdedup_events`.
    pub fn name(self) -> &'static str {
        match self {
            EventField::EventId => "event_id",
            EventField::Scope => "scope",
            EventField::Key => "key",
            EventField::SourceTopic => "source_topic",
            EventField::SourcePartition => "source_partition",
            EventField::SourceOffset => "source_offset",
            EventField::SourceTimestamp => "source_timestamp",
            EventField::Headers => "headers",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// `--sink-on-conflict`: what a row that collides with one of the table's own keys does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnConflict {
    /// The event is rejected (`sink_rejected`, SQLSTATE 23505) and dead-lettered.
    Error,
    /// The existing row stays; the event counts as delivered.
    Nothing,
    /// The existing row takes the event's values (by primary key).
    Update,
}

/// The Kafka sink's relay.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Run the relay in this process: it publishes the streams of the partitions this
    /// process gates, and adopts streams nobody publishes.
    pub enabled: bool,
    /// How long the gate writes into one outbox slot before moving on to the next (an
    /// empty one); a slot is emptied with TRUNCATE once all its rows are published.
    pub rotate_every: std::time::Duration,
    /// Most outbox rows per round.
    pub batch_size: usize,
    /// Most key + value + header bytes per round (always at least one row).
    pub batch_max_bytes: usize,
}

/// `--on-payload-mismatch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadMismatch {
    /// Counted and logged, not forwarded.
    Skip,
    /// Sent to the dead-letter topic.
    Dlq,
}

/// TTL pruner settings.
#[derive(Debug, Clone)]
pub struct PruneSettings {
    /// Time between prune rounds.
    pub interval: Duration,
    /// Rows deleted per transaction.
    pub batch_size: i64,
    /// Pause between two batches of one round.
    pub pause: Duration,
}

/// Validated Postgres settings.
#[derive(Debug, Clone)]
pub struct DbSettings {
    pub url: DatabaseUrl,
    /// Schema of kdedup's tables (validated: safe to quote into DDL).
    pub schema: String,
    pub max_connections: u32,
}

/// A Postgres URL, which may hold a password: `Debug` and `Display` show it redacted;
/// [`DatabaseUrl::expose`] is the one way to the real text (for the client only).
#[derive(Clone)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: String) -> Self {
        DatabaseUrl(url)
    }

    /// The URL as written, password included: only for the Postgres client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact_url(&self.0))
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// What `kdedup replay` re-feeds, and how.
#[derive(Debug, Clone)]
pub struct ReplaySettings {
    pub run: RunSettings,
    /// Topic to replay (the dead-letter topic unless `--from-topic`).
    pub topic: String,
    pub from_offset: Option<i64>,
    pub to_offset: Option<i64>,
    /// Message timestamps, in milliseconds.
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub dry_run: bool,
    pub force: bool,
    pub idle_timeout: Duration,
    pub publish_timeout: Duration,
    pub serve_metrics: bool,
}

/// `kdedup inspect`.
#[derive(Debug, Clone)]
pub struct InspectSettings {
    pub db: DbSettings,
    pub event_id: String,
    pub scope: Option<String>,
    pub json: bool,
}

/// `kdedup demo`, before its embedded cluster exists.
#[derive(Debug, Clone)]
pub struct DemoSettings {
    /// The demo's database (its schema is dropped and recreated).
    pub db: DbSettings,
    pub events: usize,
    pub metrics_addr: String,
    pub hold: bool,
    /// Demonstrate the Postgres sink (a table) rather than the Kafka sink (a topic).
    pub postgres_sink: bool,
    /// Demonstrate the HTTP sink (a built-in receiver) rather than the Kafka sink.
    pub http_sink: bool,
}

impl DemoSettings {
    /// The `--http-url` the demo's settings are validated with (`--sink http`), replaced
    /// by its receiver's own once that listens.
    pub const RECEIVER_PLACEHOLDER: &'static str = "http://127.0.0.1:9/events";

    /// The Postgres sink's table: a schema of its own beside the demo's, as an
    /// application's would be.
    pub fn app_table(&self) -> (String, String) {
        (format!("{}_app", self.db.schema), "orders".to_string())
    }
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
