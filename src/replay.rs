//! `kdedup replay`: re-feeds events through the same gate as `kdedup run`.
//!
//! Source: the dead-letter topic (default) or any topic, between two offsets or two
//! timestamps (a backfill). Events already processed count as duplicates with cause
//! `replay` and are not forwarded again; new ones get their outbox row, published by
//! whichever relay holds the lock (this process runs one too, so a replay works with no
//! sidecar running).
//!
//! Replay never commits consumer offsets and never writes to the dead-letter topic: a
//! message that still has no usable id is reported and stays where it is. An event older
//! than the TTL is refused unless `--force`, because the gate may have forgotten it and
//! would forward it again. Replay is idempotent, so a stopped replay is simply run again.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{ClientKind, ConfigError, Env, RunArgs, RunConfig};
use crate::db;
use crate::metrics::Metrics;
use crate::pipeline::{header, Gate, InputMessage, Origin};
use crate::relay::Relay;

#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// Topic to replay [default: the dead-letter topic].
    #[arg(long, env = "KDEDUP_REPLAY_TOPIC")]
    pub from_topic: Option<String>,

    /// First offset to replay, in every partition [default: the beginning].
    #[arg(long, conflicts_with = "from_time")]
    pub from_offset: Option<i64>,

    /// Replay up to this offset (exclusive), in every partition [default: the end at start].
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
    /// be forwarded again).
    #[arg(long)]
    pub force: bool,

    /// Without --to-offset/--to-time, the replay ends once the topic's end (as listed at
    /// start) is reached and no message arrived for this long.
    #[arg(long, default_value = "3s")]
    pub idle_timeout: String,

    /// How long to wait, at the end, for the outbox to be published.
    #[arg(long, default_value = "60s")]
    pub publish_timeout: String,

    #[command(flatten)]
    pub run: RunArgs,
}

/// What a replay did (or, with `--dry-run`, would do).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    pub read: usize,
    pub forwarded: usize,
    pub duplicates: usize,
    pub unusable: usize,
    pub mismatched: usize,
}

struct Range {
    topic: String,
    /// partition -> (start offset, end offset exclusive, whether the end was asked for).
    /// An end that was not asked for is the end listed at start: brokers that list it
    /// late (some Kafka-protocol brokers answer with the last batch's start) are covered
    /// by reading on until the topic is idle.
    partitions: BTreeMap<i32, (i64, i64, bool)>,
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

fn consumer(cfg: &RunConfig) -> anyhow::Result<BaseConsumer> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", format!("{}.replay", cfg.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    cfg.kafka.apply(&mut c, ClientKind::Consumer);
    c.set("enable.auto.offset.store", "false");
    Ok(c.create()?)
}

fn resolve_range(
    consumer: &BaseConsumer,
    topic: &str,
    args: &ReplayArgs,
    from_ms: Option<i64>,
    to_ms: Option<i64>,
) -> anyhow::Result<Range> {
    let timeout = Duration::from_secs(10);
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("cannot read metadata of {topic}"))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .with_context(|| format!("topic {topic:?} does not exist"))?;
    let mut partitions = BTreeMap::new();
    for p in t.partitions() {
        let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
        let mut start = args.from_offset.unwrap_or(low).clamp(low, high);
        let mut end = args.to_offset.unwrap_or(high).clamp(low, high);
        for (ms, slot) in [(from_ms, &mut start), (to_ms, &mut end)] {
            let Some(ms) = ms else { continue };
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, p.id(), Offset::Offset(ms))?;
            let found = consumer.offsets_for_times(tpl, timeout)?;
            *slot = match found.find_partition(topic, p.id()).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                // No message at or after that time.
                _ => high,
            };
        }
        let explicit_end = args.to_offset.is_some() || to_ms.is_some();
        tracing::debug!(
            topic,
            partition = p.id(),
            low,
            high,
            start,
            end,
            "replay range"
        );
        if start < end || !explicit_end {
            partitions.insert(p.id(), (start, end, explicit_end));
        }
    }
    Ok(Range {
        topic: topic.to_string(),
        partitions,
    })
}

/// A DLQ message carries its original position in headers; the gate row and the output
/// should point at the original, and the dead-letter headers should not travel on.
fn restore_original(mut msg: InputMessage) -> InputMessage {
    let get = |name: &str| {
        msg.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_string)
    };
    if let (Some(topic), Some(partition), Some(offset)) = (
        get(header::SOURCE_TOPIC),
        get(header::SOURCE_PARTITION).and_then(|p| p.parse().ok()),
        get(header::SOURCE_OFFSET).and_then(|o| o.parse().ok()),
    ) {
        msg.timestamp_ms = get(header::SOURCE_TIMESTAMP)
            .and_then(|t| t.parse().ok())
            .or(msg.timestamp_ms);
        msg.topic = topic;
        msg.partition = partition;
        msg.offset = offset;
        msg.headers
            .retain(|(k, _)| !(k.starts_with("kdedup-dlq-") || k.starts_with("kdedup-source-")));
    }
    msg
}

struct Progress {
    total: usize,
    started: Instant,
    last: Instant,
    enabled: bool,
}

impl Progress {
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
            100.0 * done as f64 / self.total as f64
        };
        let eta = if rate > 0.0 {
            (self.total.saturating_sub(done)) as f64 / rate
        } else {
            0.0
        };
        let width = 30;
        let filled = ((pct / 100.0) * width as f64) as usize;
        eprint!(
            "\r[{}{}] {done}/{} {pct:5.1}% {rate:8.0} ev/s ETA {eta:4.0}s ",
            "#".repeat(filled.min(width)),
            "-".repeat(width - filled.min(width)),
            self.total
        );
        let _ = std::io::stderr().flush();
    }
}

/// Runs a replay; prints a summary on stdout.
pub async fn run(args: ReplayArgs, env: &dyn Env) -> anyhow::Result<ReplaySummary> {
    let from_ms = args
        .from_time
        .as_deref()
        .map(|v| parse_time("--from-time", v))
        .transpose()?;
    let to_ms = args
        .to_time
        .as_deref()
        .map(|v| parse_time("--to-time", v))
        .transpose()?;
    let publish_timeout =
        crate::config::parse_duration("--publish-timeout", &args.publish_timeout, "60s")?;
    let cfg = Arc::new(args.run.clone().validate(env)?);
    let topic = args
        .from_topic
        .clone()
        .unwrap_or_else(|| cfg.dlq_topic.clone());
    let consumer = consumer(&cfg)?;
    let range = resolve_range(&consumer, &topic, &args, from_ms, to_ms)?;
    let idle_timeout = crate::config::parse_duration("--idle-timeout", &args.idle_timeout, "3s")?;
    let total: i64 = range
        .partitions
        .values()
        .map(|(s, e, _)| (e - s).max(0))
        .sum();
    let mut tpl = TopicPartitionList::new();
    for (p, (start, _, _)) in &range.partitions {
        tpl.add_partition_offset(&range.topic, *p, Offset::Offset(*start))?;
    }
    consumer.assign(&tpl)?;

    let pool = db::pool(&cfg.db)?;
    if !args.dry_run && cfg.migrate_on_start {
        db::migrate(&pool, &cfg.db.schema).await?;
    }
    let metrics = Metrics::new();
    let wakeup = Arc::new(Notify::new());
    let producer = crate::kafka::producer(&cfg.brokers, &cfg.kafka)?;
    if !args.dry_run && cfg.create_topics {
        crate::app::create_topics(&cfg, &producer).await?;
    }
    let gate = Gate {
        cfg: cfg.clone(),
        pool: pool.clone(),
        dlq: producer.clone(),
        metrics: metrics.clone(),
        relay_wakeup: wakeup.clone(),
        origin: Origin::Replay,
        keepalive: None,
    };
    let stop = CancellationToken::new();
    let relay_stop = CancellationToken::new();
    let relay = (!args.dry_run).then(|| {
        tokio::spawn(
            Relay {
                cfg: cfg.clone(),
                producer: producer.clone(),
                metrics: metrics.clone(),
                wakeup: wakeup.clone(),
            }
            .run(relay_stop.clone()),
        )
    });

    let mut progress = Progress {
        total: total as usize,
        started: Instant::now(),
        last: Instant::now(),
        enabled: std::io::stderr().is_terminal(),
    };
    let mut remaining = range.partitions.clone();
    let mut summary = ReplaySummary::default();
    let oldest_allowed = chrono::Utc::now().timestamp_millis() - cfg.ttl.as_millis() as i64;
    let mut last_message = Instant::now();
    while !remaining.is_empty() {
        let mut batch = Vec::new();
        while batch.len() < cfg.batch_size {
            let wait = if batch.is_empty() { 200 } else { 0 };
            let Some(m) = consumer.poll(Duration::from_millis(wait)) else {
                break;
            };
            let m = m?;
            let Some(&(_, end, explicit)) = remaining.get(&m.partition()) else {
                continue;
            };
            if explicit && m.offset() >= end {
                remaining.remove(&m.partition());
                continue;
            }
            if explicit && m.offset() + 1 >= end {
                remaining.remove(&m.partition());
            }
            batch.push(restore_original(InputMessage::from_kafka(&m)));
        }
        if batch.is_empty() {
            // Also ends ranges with missing offsets (compaction, transaction markers).
            if last_message.elapsed() > idle_timeout {
                break;
            }
            continue;
        }
        last_message = Instant::now();
        if !args.force {
            if let Some(old) = batch
                .iter()
                .find(|m| m.timestamp_ms.is_some_and(|t| t < oldest_allowed))
            {
                if progress.enabled {
                    eprintln!();
                }
                bail!(
                    "refusing to replay {}/{}/{}: it is older than the TTL ({}), so the gate may have forgotten it and would forward it again. \
                     {} events were replayed before it. Narrow the range with --from-time, or pass --force if forwarding such events again is acceptable",
                    old.topic, old.partition, old.offset,
                    humantime::format_duration(cfg.ttl),
                    summary.read
                );
            }
        }
        summary.read += batch.len();
        if args.dry_run {
            let s = dry_run_batch(&gate, batch).await?;
            summary.forwarded += s.forwarded;
            summary.duplicates += s.duplicates;
            summary.unusable += s.unusable;
        } else {
            let s = gate
                .settle_without_dead_letters(batch, &stop)
                .await
                .map_err(|_| anyhow::anyhow!("replay stopped"))?;
            summary.forwarded += s.forwarded;
            summary.duplicates += s.duplicates;
            summary.unusable += s.dead_lettered;
            summary.mismatched += s.mismatched;
        }
        progress.show(summary.read, false);
    }
    progress.show(summary.read, true);
    if progress.enabled {
        eprintln!();
    }

    if let Some(relay) = relay {
        // The outbox rows are published by whichever relay holds the lock: this one, or a
        // running sidecar's.
        let deadline = Instant::now() + publish_timeout;
        loop {
            let backlog = db::outbox_backlog(&pool).await.unwrap_or(i64::MAX);
            if backlog == 0 {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("{backlog} outbox rows are not published yet; a running kdedup relay will publish them");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        relay_stop.cancel();
        let _ = relay.await;
    }
    pool.close().await;

    let verb = if args.dry_run {
        "would be forwarded"
    } else {
        "forwarded"
    };
    println!(
        "replay of {topic}{}:",
        if args.dry_run {
            " (dry run: nothing written)"
        } else {
            ""
        }
    );
    println!("  read                     {:>8}", summary.read);
    println!("  {verb:<24} {:>8}", summary.forwarded);
    println!("  duplicates (cause=replay){:>8}", summary.duplicates);
    println!(
        "  still without a usable id{:>8}   (left where they are)",
        summary.unusable
    );
    if summary.mismatched > 0 {
        println!("  same id, different payload{:>7}", summary.mismatched);
    }
    Ok(summary)
}

/// Which events of `batch` the gate would forward, without writing anything.
async fn dry_run_batch(gate: &Gate, batch: Vec<InputMessage>) -> anyhow::Result<ReplaySummary> {
    let mut s = ReplaySummary::default();
    let mut seen = std::collections::HashSet::new();
    let mut keys = Vec::new();
    for m in &batch {
        match gate.identify(m) {
            Err(_) => s.unusable += 1,
            Ok(k) => {
                if seen.insert(k.clone()) {
                    keys.push(k);
                } else {
                    s.duplicates += 1;
                }
            }
        }
    }
    let live = db::live_ids(&gate.pool, &keys).await?;
    s.duplicates += live;
    s.forwarded += keys.len() - live;
    Ok(s)
}
