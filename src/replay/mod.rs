//! `kdedup replay`: re-feeds events through the same gate as `kdedup run`.
//!
//! Source: the dead-letter topic (default) or any topic, between two offsets or two
//! timestamps (a backfill). Without an end, each partition is read up to the end offset
//! (high watermark) listed at start, so replaying a live topic terminates. Events already
//! processed count as duplicates with cause `replay` and are not forwarded again; new ones
//! get their outbox row, published by whichever relay holds the lock (this process runs
//! one too, so a replay works with no sidecar running).
//!
//! Replay never commits consumer offsets and never writes to the dead-letter topic: a
//! message that still has no usable id is reported and stays where it is. A DLQ record
//! that was sent stripped (the DLQ topic refused it whole) has lost its value and headers:
//! it is skipped and reported with its source position, never gated. An event older than
//! the TTL is refused unless `--force`, because the gate may have forgotten it and would
//! forward it again; that check reads the whole range first, so a refused replay writes
//! nothing. Replay is idempotent, so a stopped replay is simply run again.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::BaseConsumer;
use tokio::task::block_in_place;
use tokio_util::sync::CancellationToken;

mod dlq;
mod range;

use crate::consume::settle::{payload_hash, Gate, Origin};
use crate::metrics::Metrics;
use crate::model::InputMessage;
use crate::settings::SinkSettings;
use crate::settings::{ConsumeSettings, ReplaySettings, RunSettings};
use crate::sink::http::HttpSink;
use crate::sink::kafka::relay::Relay;
use crate::sink::kafka::KafkaSink;
use crate::sink::{postgres, Sink};
use crate::store::{self as db, outbox};
use dlq::{restore_original, stripped_source};
use range::{consumer, resolve_range, Range, Reader};

/// How many stripped DLQ records the summary lists by source position (all are logged).
const STRIPPED_LISTED: usize = 20;

/// What a replay did (or, with `--dry-run`, would do).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    pub read: usize,
    pub forwarded: usize,
    pub duplicates: usize,
    pub unusable: usize,
    pub mismatched: usize,
    /// DLQ records sent without their value and headers: never gated, never forwarded.
    pub stripped: usize,
    /// Source positions (`topic/partition/offset`) of the first stripped records, to
    /// re-read them from.
    pub stripped_sources: Vec<String>,
    /// Partitions that stopped, idle, before the end listed at start.
    pub ended_short: Vec<i32>,
}

struct Progress {
    label: &'static str,
    total: usize,
    started: Instant,
    last: Instant,
    enabled: bool,
}

impl Progress {
    fn new(label: &'static str, total: usize) -> Self {
        Progress {
            label,
            total,
            started: Instant::now(),
            last: Instant::now(),
            enabled: std::io::stderr().is_terminal(),
        }
    }

    fn show(&mut self, done: usize, force: bool) {
        if !self.enabled || (!force && self.last.elapsed() < Duration::from_millis(200)) {
            return;
        }
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let pct = if self.total == 0 {
            100.0
        } else {
            (100.0 * done as f64 / self.total as f64).min(100.0)
        };
        let eta = if rate > 0.0 {
            (self.total.saturating_sub(done)) as f64 / rate
        } else {
            0.0
        };
        let width = 30;
        let filled = ((pct / 100.0) * width as f64) as usize;
        eprint!(
            "\r{} [{}{}] {done}/{} {pct:5.1}% {rate:8.0} ev/s ETA {eta:4.0}s ",
            self.label,
            "#".repeat(filled.min(width)),
            "-".repeat(width - filled.min(width)),
            self.total
        );
        let _ = std::io::stderr().flush();
    }

    fn end(&mut self, done: usize) {
        self.show(done, true);
        if self.enabled {
            eprintln!();
        }
    }
}

/// Events of the range older than the TTL, found by the first pass.
struct TooOld {
    count: usize,
    first: String,
    first_timestamp_ms: i64,
}

/// First pass: reads the whole range without writing anything, and finds events older
/// than the TTL that the second pass would gate. Stripped DLQ records and messages without
/// a usable id are never gated, so they do not count. Returns the range actually read,
/// which the second pass replays exactly, and the partitions that stopped short of their
/// listed end.
fn check_ages(
    gate: &Gate,
    consume: &ConsumeSettings,
    consumer: &BaseConsumer,
    range: &Range,
    idle_timeout: Duration,
    oldest_allowed_ms: i64,
) -> anyhow::Result<(Range, Option<TooOld>, Vec<i32>)> {
    let mut reader = Reader::start(consumer, range, idle_timeout)?;
    let mut progress = Progress::new("checking ages", range.known_total());
    let mut too_old: Option<TooOld> = None;
    let mut read = 0;
    loop {
        let batch = reader.next_batch(consume.batch_size, consume.batch_max_bytes)?;
        if batch.is_empty() {
            break;
        }
        read += batch.len();
        for m in batch {
            if stripped_source(&m).is_some() {
                continue;
            }
            let m = restore_original(m);
            let Some(ts) = m.timestamp_ms.filter(|t| *t < oldest_allowed_ms) else {
                continue;
            };
            if gate.identify(&m).is_err() {
                continue;
            }
            let old = too_old.get_or_insert_with(|| TooOld {
                count: 0,
                first: m.position().to_string(),
                first_timestamp_ms: ts,
            });
            old.count += 1;
        }
        progress.show(read, false);
    }
    progress.end(read);
    Ok((reader.covered(range), too_old, reader.ended_short))
}

fn format_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// Binds the admin server for `--serve-metrics`. Replay is no consumer-group member and
/// has no readiness of its own: /readyz answers 200 while it runs.
async fn serve_metrics(
    addr: SocketAddr,
    metrics: &Metrics,
    stop: &CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let health = Arc::new(crate::health::Health::default());
    health.postgres.set(true);
    health.broker.set(true);
    health.consumer_joined.store(true, Ordering::Release);
    let (bound, handle) = crate::admin::serve(addr, metrics.clone(), health, stop.clone())
        .await
        .with_context(|| {
            format!("--serve-metrics: cannot listen on {addr} (--metrics-addr / KDEDUP_METRICS_ADDR); choose a free address")
        })?;
    tracing::info!(addr = %bound, "serving /metrics while the replay runs");
    Ok(handle)
}

/// Runs a replay; prints a summary on stdout.
pub async fn run(args: ReplaySettings) -> anyhow::Result<ReplaySummary> {
    let cfg = Arc::new(args.run.clone());
    match db::check_connection(&cfg.db).await? {
        Ok(security) => security.log(&cfg.db),
        Err(e) => return Err(db::ConnectConfigError::or_context(&cfg.db, e)),
    }
    let metrics = Metrics::new();
    let admin_stop = CancellationToken::new();
    let admin = match args.serve_metrics {
        true => Some(serve_metrics(cfg.metrics_addr, &metrics, &admin_stop).await?),
        false => None,
    };
    let result = replay(&args, cfg, &metrics).await;
    admin_stop.cancel();
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    let summary = result?;
    print_summary(&args.topic, args.dry_run, &summary);
    Ok(summary)
}

async fn replay(
    args: &ReplaySettings,
    cfg: Arc<RunSettings>,
    metrics: &Metrics,
) -> anyhow::Result<ReplaySummary> {
    let (topic, idle_timeout, publish_timeout) =
        (args.topic.as_str(), args.idle_timeout, args.publish_timeout);
    let consumer = consumer(&cfg)?;
    let mut range = block_in_place(|| resolve_range(&consumer, topic, args))?;
    tracing::info!(
        topic,
        partitions = ?range.partitions,
        "replay range listed: each partition is read from start to end (exclusive)"
    );

    // Nothing below writes until the range has passed the age check.
    let pool = db::pool(&cfg.db)?;
    let (feed, intake) = crate::sink::kafka::relay::channel(cfg.relay.batch_max_bytes);
    let producer = crate::kafka::producer(&cfg.kafka.brokers, &cfg.kafka.properties)?;
    let sink: Arc<dyn Sink> = match &cfg.sink {
        // Its rows are numbered in streams of their own (`replay:topic/partition`),
        // published by this process's relay.
        SinkSettings::Kafka { .. } => Arc::new(KafkaSink {
            stream_prefix: outbox::REPLAY,
            feed: Some(feed),
        }),
        // Checked before anything is read or written: the statement and its grants.
        SinkSettings::Postgres(settings) => {
            Arc::new(postgres::prepare(settings, &cfg.db, metrics).await?)
        }
        // FAILED rows are taken over by the gate and delivered again (same key);
        // PROCESSED ones are duplicates.
        SinkSettings::Http(settings) => Arc::new(HttpSink::new(settings, pool.clone(), metrics)),
    };
    let max_message_bytes = crate::sink::kafka::topics::input_size_limit(&cfg).await;
    let gate = Gate::new(
        &cfg,
        pool.clone(),
        producer.clone(),
        metrics.clone(),
        sink,
        Origin::Replay,
        max_message_bytes,
    );
    let mut ended_short = Vec::new();
    if !args.force {
        let oldest_allowed = chrono::Utc::now()
            .timestamp_millis()
            .saturating_sub(i64::try_from(cfg.gate.ttl.as_millis()).unwrap_or(i64::MAX));
        let (covered, too_old, short) = block_in_place(|| {
            check_ages(
                &gate,
                &cfg.consume,
                &consumer,
                &range,
                idle_timeout,
                oldest_allowed,
            )
        })?;
        if let Some(old) = too_old {
            bail!(
                "refusing to replay: {} event(s) in the range are older than the TTL ({}), the first at {} (timestamp {}). \
                 The gate may have forgotten them and would forward them again. Nothing was written. \
                 Narrow the range with --from-time/--from-offset, or pass --force if forwarding such events again is acceptable",
                old.count,
                humantime::format_duration(cfg.gate.ttl),
                old.first,
                format_ms(old.first_timestamp_ms),
            );
        }
        // Replay exactly what was checked, even if the topic grew meanwhile.
        range = covered;
        ended_short = short;
    }

    if !args.dry_run && cfg.migrate_on_start {
        db::migrate(&pool, &cfg.db.schema).await?;
    }
    if !args.dry_run && cfg.kafka.create_topics {
        crate::sink::kafka::topics::create_topics(&cfg, &producer).await?;
    }
    let stop = CancellationToken::new();
    let relay_stop = CancellationToken::new();
    let relay = cfg
        .sink
        .output_topic()
        .filter(|_| !args.dry_run)
        .map(|output_topic| {
            tokio::spawn(
                Relay::new(
                    &cfg,
                    pool.clone(),
                    output_topic,
                    producer.clone(),
                    metrics.clone(),
                    intake,
                )
                .run(relay_stop.clone()),
            )
        });

    // A dry run against a schema no sidecar has migrated yet: nothing is recorded.
    let gate_table_exists = !args.dry_run
        || db::gate_table_exists(&pool)
            .await
            .context("cannot reach Postgres")?;
    let mut reader = Reader::start(&consumer, &range, idle_timeout)?;
    let mut progress = Progress::new("replaying", range.known_total());
    let mut summary = ReplaySummary::default();
    loop {
        let raw = block_in_place(|| {
            reader.next_batch(cfg.consume.batch_size, cfg.consume.batch_max_bytes)
        })?;
        if raw.is_empty() {
            break;
        }
        summary.read += raw.len();
        let batch = replayable(raw, &mut summary);
        if batch.is_empty() {
            progress.show(summary.read, false);
            continue;
        }
        if args.dry_run {
            let s = dry_run_batch(&gate, batch, gate_table_exists).await?;
            summary.forwarded += s.forwarded;
            summary.duplicates += s.duplicates;
            summary.unusable += s.unusable;
            summary.mismatched += s.mismatched;
        } else {
            let s = gate
                .settle_without_dead_letters(batch, &stop)
                .await
                .map_err(|_| anyhow::anyhow!("replay stopped"))?;
            summary.forwarded += s.first_seen - s.delivery_failed;
            summary.duplicates += s.duplicates;
            summary.unusable += s.dead_lettered;
            summary.mismatched += s.mismatched;
        }
        progress.show(summary.read, false);
    }
    progress.end(summary.read);
    ended_short.append(&mut reader.ended_short);
    summary.ended_short = ended_short;

    if let Some(relay) = relay {
        // This relay publishes the replay's streams; rows of other streams (a sidecar's)
        // are counted too, and published by their own relays.
        wait_for_outbox(&pool, publish_timeout).await;
        relay_stop.cancel();
        let _ = relay.await;
    }
    pool.close().await;
    Ok(summary)
}

/// The DLQ records of `raw` that can be replayed, moved back to their source positions;
/// stripped records (no value, no headers) are skipped, logged and counted.
fn replayable(raw: Vec<InputMessage>, summary: &mut ReplaySummary) -> Vec<InputMessage> {
    let mut batch = Vec::with_capacity(raw.len());
    for m in raw {
        if let Some(source) = stripped_source(&m) {
            tracing::warn!(
                dlq_topic = m.topic,
                dlq_partition = m.partition,
                dlq_offset = m.offset,
                source_position = source,
                "skipped: stripped in the DLQ (its value and headers were dropped when the DLQ topic refused it); \
                 re-read it from its source position {source}"
            );
            summary.stripped += 1;
            if summary.stripped_sources.len() < STRIPPED_LISTED {
                summary.stripped_sources.push(source);
            }
            continue;
        }
        batch.push(restore_original(m));
    }
    batch
}

/// Waits until the outbox is empty, at most `timeout`.
async fn wait_for_outbox(pool: &sqlx::PgPool, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let backlog = outbox::backlog(pool).await.unwrap_or(i64::MAX);
        if backlog == 0 {
            return;
        }
        if Instant::now() > deadline {
            eprintln!("{backlog} outbox rows are not published yet; a running kdedup relay will publish them");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_summary(topic: &str, dry_run: bool, summary: &ReplaySummary) {
    let verb = if dry_run {
        "would be forwarded"
    } else {
        "forwarded"
    };
    println!(
        "replay of {topic}{}:",
        if dry_run {
            " (dry run: nothing written)"
        } else {
            ""
        }
    );
    println!("  read                     {:>8}", summary.read);
    println!("  {verb:<24} {:>8}", summary.forwarded);
    println!("  duplicates (cause=replay){:>8}", summary.duplicates);
    println!(
        "  not taken                {:>8}   (no usable id, or the sink refused it: left where they are)",
        summary.unusable
    );
    if summary.mismatched > 0 {
        println!("  same id, different payload{:>7}", summary.mismatched);
    }
    if summary.stripped > 0 {
        println!(
            "  skipped: stripped in the DLQ{:>5}   (no value or headers left: re-read each from its source position)",
            summary.stripped
        );
        for source in &summary.stripped_sources {
            println!("    re-read it from its source position {source}");
        }
        if summary.stripped > summary.stripped_sources.len() {
            println!(
                "    ... and {} more, each logged with its source position",
                summary.stripped - summary.stripped_sources.len()
            );
        }
    }
    if !summary.ended_short.is_empty() {
        println!(
            "  partitions that stopped idle before the end listed at start: {:?} \
             (replay again with a longer --idle-timeout; what was read is gated, so it is not forwarded twice)",
            summary.ended_short
        );
    }
}

/// Which events of `batch` the gate would forward, without writing anything. Counts as
/// the real run does: an id seen with another payload (in this batch or in the gate) is a
/// mismatch, not a duplicate; an event the sink cannot take is unusable.
async fn dry_run_batch(
    gate: &Gate,
    batch: Vec<InputMessage>,
    gate_table_exists: bool,
) -> anyhow::Result<ReplaySummary> {
    let mut s = ReplaySummary::default();
    let mut first: HashMap<(String, String), Vec<u8>> = HashMap::new();
    let mut keys = Vec::new();
    for m in &batch {
        let identity = gate.identify(m).and_then(|k| {
            gate.sink.admit(m)?;
            Ok(k)
        });
        let Ok(k) = identity else {
            s.unusable += 1;
            continue;
        };
        let hash = payload_hash(m.value.as_deref());
        match first.get(&k) {
            None => {
                keys.push(k.clone());
                first.insert(k, hash);
            }
            Some(h) if *h == hash => s.duplicates += 1,
            Some(_) => s.mismatched += 1,
        }
    }
    let live = match gate_table_exists {
        true => db::gate::live_payloads(&gate.pool, &keys).await?,
        false => HashMap::new(),
    };
    for k in keys {
        match live.get(&k) {
            None => s.forwarded += 1,
            Some(h) if *h == first[&k] => s.duplicates += 1,
            Some(_) => s.mismatched += 1,
        }
    }
    Ok(s)
}
