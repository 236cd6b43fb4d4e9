//! The command line: flags, `KDEDUP_*` environment, validation, exit codes.
//!
//! Every flag of `kdedup run` also reads `KDEDUP_<FLAG>` (the other commands' own flags
//! are command-line only, but for replay's `KDEDUP_REPLAY_TOPIC` and
//! `KDEDUP_REPLAY_SERVE_METRICS`). Any librdkafka property passes through as
//! `KDEDUP_KAFKA_<PROPERTY>` (dots written as underscores) or `--kafka-property k=v`.
//!
//! Parsing (clap) only checks shapes; `validate` ([`validate`]) turns the raw flags into
//! [`crate::settings`] and checks the rules that span fields, so that a bad setting is
//! reported with its name and a fix *before* anything connects to Kafka or Postgres.
//! `main` maps a [`ConfigError`] to exit code 64 (`EX_USAGE`). This is the only module
//! that knows clap.

pub mod env;
pub mod validate;

use clap::{Args, Parser, Subcommand};

/// Exit code for bad configuration (sysexits.h `EX_USAGE`).
pub const EX_USAGE: i32 = 64;

/// Exit code when a server refuses the configuration: Postgres rejected the TLS settings,
/// the login or the database name (sysexits.h `EX_CONFIG`). A restart cannot fix it.
pub const EX_CONFIG: i32 = 78;

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
    Replay(Box<ReplayArgs>),
    /// Delete expired processed_events rows once and exit.
    Prune(PruneArgs),
    /// Show where and when an event id was first seen and whether it was forwarded.
    ///
    /// Exit codes: 0 found, 1 not recorded (never seen, or expired and pruned), 2 the
    /// database could not be read.
    Inspect(InspectArgs),
    /// Gate table statistics: rows, expiry horizon, outbox backlog, duplicates avoided.
    Stats(StatsArgs),
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

    /// Postgres connections besides the relay's and the pruner's: in `kdedup run` each
    /// gate lane keeps one for its transactions and the rest (at least one) are a pool.
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

    /// Where first-seen events go: `kafka` (an outbox row relayed to --output-topic),
    /// `postgres` (the application's own row, written in the gate transaction:
    /// --sink-table or --sink-sql) or `http` (a POST to --http-url with an
    /// Idempotency-Key, guarded by a status gate).
    #[arg(long, env = "KDEDUP_SINK", value_enum, default_value_t = SinkKind::Kafka)]
    pub sink: SinkKind,

    /// Topic that receives each first-seen event exactly once (--sink kafka).
    #[arg(long, env = "KDEDUP_OUTPUT_TOPIC")]
    pub output_topic: Option<String>,

    /// --sink postgres: the table (`[schema.]table`) that gets one row per first-seen
    /// event, its columns filled from the JSON object in the value by name.
    #[arg(long, env = "KDEDUP_SINK_TABLE")]
    pub sink_table: Option<String>,

    /// --sink postgres: the statement that writes the batch's first-seen events, reading
    /// them from the relation `kdedup_events` (see README "Postgres sink").
    #[arg(long, env = "KDEDUP_SINK_SQL")]
    pub sink_sql: Option<String>,

    /// --sink-table: fill a column from the event's metadata, `<field>=<column>` with field
    /// one of event_id, scope, key, source_topic, source_partition, source_offset,
    /// source_timestamp, headers (repeatable; comma-separated in the variable).
    #[arg(
        long,
        env = "KDEDUP_SINK_COLUMNS",
        value_delimiter = ',',
        value_name = "FIELD=COLUMN"
    )]
    pub sink_column: Vec<String>,

    /// --sink-table: a row that collides with one of the table's own unique keys:
    /// `error` (dead-lettered as sink_rejected), `nothing` (the existing row stays) or
    /// `update` (the existing row, found by primary key, takes the event's values).
    #[arg(long, env = "KDEDUP_SINK_ON_CONFLICT", value_enum, default_value_t = SinkOnConflict::Error)]
    pub sink_on_conflict: SinkOnConflict,

    #[command(flatten)]
    pub http: HttpFlags,

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
    /// Pin it: with the default, a renamed group id starts from an empty gate.
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

    /// Most bytes of messages read ahead of the gate lanes (key, value, headers and about
    /// 150 bytes of bookkeeping each).
    /// Lets the lanes work while librdkafka delivers a long run of one partition (Apache
    /// Kafka: at most max.partition.fetch.bytes, 1 MiB); the memory it takes comes on top
    /// of librdkafka's prefetch queue.
    #[arg(long, env = "KDEDUP_READ_AHEAD_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub read_ahead_bytes: usize,

    /// Longest wait for a batch to fill, counted from when its first message was read
    /// from Kafka. A broker delivers a live stream in fetch-sized bursts, and while a lane
    /// gates one batch the next is read ahead: a longer wait mostly adds to every event's
    /// latency.
    #[arg(long, env = "KDEDUP_BATCH_LINGER", default_value = "1ms")]
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

    /// Run the outbox relay in this process: it publishes the partitions this process
    /// gates and adopts streams nobody publishes (off: rows wait for another replica's).
    #[arg(long, env = "KDEDUP_RELAY", default_value_t = true, action = clap::ArgAction::Set)]
    pub relay: bool,

    /// How long the gate writes into one outbox slot before it moves to the next; a slot
    /// is emptied with TRUNCATE once every row in it is published. Bounds the outbox to
    /// about two intervals of input while the relay keeps up.
    #[arg(long, env = "KDEDUP_OUTBOX_ROTATE_INTERVAL", default_value = "10s")]
    pub outbox_rotate_interval: String,

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

impl RunArgs {
    /// `kdedup run`'s settings as its flags declare them, with no command line and no
    /// environment: the base of settings built in code (the demo's), so that each default
    /// is written once, on its flag. The demo must not pick up a real deployment's
    /// settings, so none of these flags reads its `KDEDUP_*` variable here.
    pub fn defaults() -> RunArgs {
        use clap::FromArgMatches;
        let parsed = Self::without_env()
            .try_get_matches_from(std::iter::empty::<&str>())
            .and_then(|m| RunArgs::from_arg_matches(&m));
        // No flag of `kdedup run` is required and every default parses: the unit tests
        // build these defaults, so a flag that broke this would fail them first.
        parsed.expect("kdedup run's flags have defaults that parse")
    }

    /// `kdedup run`'s flags with their defaults and no `KDEDUP_*` behind them.
    fn without_env() -> clap::Command {
        RunArgs::augment_args(clap::Command::new("run").no_binary_name(true))
            .mut_args(|a| a.env(None::<&'static str>))
    }
}

/// `--sink http`'s flags.
#[derive(Debug, Clone, Args)]
pub struct HttpFlags {
    /// --sink http: the application's URL, e.g. http://127.0.0.1:8080/events (http only:
    /// the application is on localhost in the pod).
    #[arg(long, env = "KDEDUP_HTTP_URL")]
    pub http_url: Option<String>,

    /// --sink http: most requests in flight, across and within partitions (events with
    /// the same Kafka key are still sent one at a time, in input order).
    #[arg(long, env = "KDEDUP_HTTP_CONCURRENCY", default_value_t = 64)]
    pub http_concurrency: usize,

    /// --sink http: requests sent for one event (timeouts, connection errors, 408, 429,
    /// 5xx) before it is FAILED and dead-lettered as http_failed.
    #[arg(long, env = "KDEDUP_HTTP_MAX_ATTEMPTS", default_value_t = 12)]
    pub http_max_attempts: u32,

    /// --sink http: how long an event is retried while the application answers 409 (its
    /// key is still being processed, by an earlier attempt); then FAILED and dead-lettered
    /// as http_failed. A 409 does not count toward --http-max-attempts.
    #[arg(long, env = "KDEDUP_HTTP_CONFLICT_TIMEOUT", default_value = "10m")]
    pub http_conflict_timeout: String,

    /// --sink http: longest one request may take, answer and body included. Below
    /// --shutdown-timeout, so that a request in flight at SIGTERM can finish.
    #[arg(long, env = "KDEDUP_HTTP_TIMEOUT", default_value = "10s")]
    pub http_timeout: String,

    /// --sink http: first retry delay; doubles per attempt, with jitter.
    #[arg(long, env = "KDEDUP_HTTP_BACKOFF", default_value = "200ms")]
    pub http_backoff: String,

    /// --sink http: longest wait between two attempts, a Retry-After included.
    #[arg(long, env = "KDEDUP_HTTP_MAX_BACKOFF", default_value = "30s")]
    pub http_max_backoff: String,

    /// --sink http: how long an event's PROCESSING row belongs to this replica without a
    /// renewal (renewed every third of it while the delivery lasts). After a crash, a
    /// copy of the event waits up to this long before another replica takes it over.
    #[arg(long, env = "KDEDUP_HTTP_LEASE", default_value = "30s")]
    pub http_lease: String,

    /// --sink http: most bytes of a successful response's body stored with the row.
    #[arg(long, env = "KDEDUP_HTTP_MAX_RESPONSE_BYTES", default_value_t = 4096)]
    pub http_max_response_bytes: usize,
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

/// `kdedup prune`: one round, so only the round's own settings.
#[derive(Debug, Clone, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub db: DbArgs,

    /// Rows deleted per prune transaction.
    #[arg(long, env = "KDEDUP_PRUNE_BATCH_SIZE", default_value_t = 5000)]
    pub prune_batch_size: i64,

    /// Pause between two prune transactions.
    #[arg(long, env = "KDEDUP_PRUNE_PAUSE", default_value = "50ms")]
    pub prune_pause: String,
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

    /// The sink to demonstrate: `kafka` (an output topic, read back), `postgres` (a table
    /// `<schema>_app.orders`, read back) or `http` (a built-in receiver on localhost that
    /// applies each Idempotency-Key once).
    #[arg(long, value_enum, default_value_t = SinkKind::Kafka)]
    pub sink: SinkKind,
}

/// `--sink`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkKind {
    Kafka,
    Postgres,
    Http,
}

/// `--sink-on-conflict`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkOnConflict {
    Error,
    Nothing,
    Update,
}

/// `--on-payload-mismatch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PayloadMismatch {
    Skip,
    Dlq,
}

/// A setting that cannot be used, with what is wrong and how to fix it; validation reports
/// every such setting at once, the first here and the others in `more`.
#[derive(Debug)]
pub struct ConfigError {
    /// Flag and environment variable, e.g. `--ttl / KDEDUP_TTL`.
    pub setting: String,
    pub problem: String,
    pub fix: String,
    /// Further bad settings found in the same validation, one line each.
    pub more: Vec<ConfigError>,
}

impl ConfigError {
    pub fn new(setting: &str, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            setting: setting_name(setting),
            problem: problem.into(),
            fix: fix.into(),
            more: Vec::new(),
        }
    }

    /// This error with `more` found beside it.
    pub fn with_more(mut self, more: Vec<ConfigError>) -> Self {
        self.more.extend(more);
        self
    }
}

impl std::fmt::Display for ConfigError {
    /// One line per bad setting.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid configuration: {}: {}. Fix: {}",
            self.setting, self.problem, self.fix
        )?;
        for e in &self.more {
            write!(f, "\n{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// `ttl` -> `--ttl / KDEDUP_TTL`.
pub(crate) fn setting_name(flag: &str) -> String {
    if flag.starts_with(KAFKA_ENV_PREFIX) || flag.starts_with("--") {
        return flag.to_string();
    }
    format!(
        "--{} / KDEDUP_{}",
        flag.replace('_', "-"),
        flag.to_uppercase().replace('-', "_")
    )
}

/// `kdedup inspect <event-id>`.
#[derive(Debug, Clone, Args)]
pub struct InspectArgs {
    /// The event id, exactly as kdedup extracted it from the message.
    pub event_id: String,

    /// Only this scope, as stored: the group id, the literal `--scope` of `kdedup run`, or
    /// the header's value for `header:<name>` scopes [default: every scope].
    #[arg(long)]
    pub scope: Option<String>,

    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub db: DbArgs,
}

/// `kdedup stats`.
#[derive(Debug, Clone, Args)]
pub struct StatsArgs {
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub db: DbArgs,
}

/// `kdedup replay`.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// Topic to replay [default: the dead-letter topic].
    #[arg(long, env = "KDEDUP_REPLAY_TOPIC")]
    pub from_topic: Option<String>,

    /// First offset to replay, in every partition [default: the beginning].
    #[arg(long, conflicts_with = "from_time")]
    pub from_offset: Option<i64>,

    /// Replay up to this offset (exclusive), in every partition [default: the end listed
    /// at start].
    #[arg(long, conflicts_with = "to_time")]
    pub to_offset: Option<i64>,

    /// First message timestamp to replay (RFC 3339, e.g. 2026-11-20T00:00:00Z).
    #[arg(long)]
    pub from_time: Option<String>,

    /// Replay messages with timestamps before this (RFC 3339).
    #[arg(long)]
    pub to_time: Option<String>,

    /// Report what would be forwarded without writing anything.
    #[arg(long)]
    pub dry_run: bool,

    /// Replay events older than the TTL too (the gate may have forgotten them: they would
    /// be forwarded again). Also skips the first pass that checks the range's timestamps.
    #[arg(long)]
    pub force: bool,

    /// Fallback end: a partition whose end offset the broker does not report (or reports
    /// below a message it serves) ends once nothing arrived for this long. A partition short
    /// of its known end, and every partition before a pass's first message, waits at least
    /// 30 s: its records are there, and a loaded broker can pause that long.
    #[arg(long, default_value = "3s")]
    pub idle_timeout: String,

    /// How long to wait, at the end, for the outbox to be published.
    #[arg(long, default_value = "60s")]
    pub publish_timeout: String,

    /// Serve /metrics (and /livez, /readyz) on --metrics-addr / KDEDUP_METRICS_ADDR while
    /// the replay runs, e.g. kdedup_duplicates_total{cause="replay"}.
    #[arg(long, env = "KDEDUP_REPLAY_SERVE_METRICS")]
    pub serve_metrics: bool,

    #[command(flatten)]
    pub run: RunArgs,
}
