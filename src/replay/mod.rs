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

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio::task::block_in_place;
use tokio_util::sync::CancellationToken;

use crate::consume::settle::{Gate, Origin};
use crate::kafka::properties::ClientKind;
use crate::metrics::Metrics;
use crate::model::{header, is_valid_topic_name, InputMessage};
use crate::settings::{ConsumeSettings, ReplaySettings, RunSettings};
use crate::sink::kafka::relay::Relay;
use crate::sink::kafka::KafkaSink;
use crate::store::{self as db, outbox};

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

/// Where one partition's replay starts and ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bounds {
    start: i64,
    /// Exclusive end: asked for, or the high watermark listed at start. `None` when the
    /// broker reported none: the partition then ends once idle.
    end: Option<i64>,
    /// The end is the broker's listing (not asked for): see [`Reader::listed_end_holds`].
    listed: bool,
}

struct Range {
    topic: String,
    partitions: BTreeMap<i32, Bounds>,
}

impl Range {
    /// Messages in the range, where every end is known.
    fn known_total(&self) -> usize {
        self.partitions
            .values()
            .filter_map(|b| b.end.map(|e| (e - b.start).max(0) as usize))
            .sum()
    }
}

fn consumer(cfg: &RunSettings) -> anyhow::Result<BaseConsumer> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.brokers)
        .set("group.id", format!("{}.replay", cfg.kafka.group_id))
        .set("enable.auto.commit", "false")
        // A start offset deleted by retention meanwhile: read from what is left.
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // The same prefetch bound as the sidecar's consumer (kafka::consumer_config).
        .set("queued.max.messages.kbytes", "16384");
    cfg.kafka.properties.apply(&mut c, ClientKind::Consumer);
    c.set("enable.auto.offset.store", "false");
    Ok(crate::kafka::client(
        &c,
        rdkafka::consumer::DefaultConsumerContext,
    )?)
}

fn resolve_range(
    consumer: &BaseConsumer,
    topic: &str,
    args: &ReplaySettings,
) -> anyhow::Result<Range> {
    let (from_ms, to_ms) = (args.from_ms, args.to_ms);
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
        let (low, high) = match consumer.fetch_watermarks(topic, p.id(), timeout) {
            Ok((low, high)) if low >= 0 && high >= low => (low, Some(high)),
            Ok((low, high)) => {
                tracing::warn!(
                    topic,
                    partition = p.id(),
                    low,
                    high,
                    "broker reported no usable end offset; this partition ends once idle"
                );
                (low.max(0), None)
            }
            Err(e) => {
                tracing::warn!(topic, partition = p.id(), error = %e,
                               "cannot list this partition's offsets; reading it from the start until idle");
                (0, None)
            }
        };
        let clamp = |o: i64| match high {
            Some(high) => o.clamp(low, high),
            None => o.max(low),
        };
        let mut start = clamp(args.from_offset.unwrap_or(low));
        let mut end = args.to_offset.map(clamp).or(high);
        for (ms, is_end) in [(from_ms, false), (to_ms, true)] {
            let Some(ms) = ms else { continue };
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, p.id(), Offset::Offset(ms))?;
            let found = consumer.offsets_for_times(tpl, timeout)?;
            let at = match found.find_partition(topic, p.id()).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => Some(o),
                // No message at or after that time.
                _ => high,
            };
            match (is_end, at) {
                (false, Some(o)) => start = o,
                (false, None) => start = i64::MAX,
                (true, at) => end = at.or(end),
            }
        }
        tracing::debug!(
            topic,
            partition = p.id(),
            low,
            ?high,
            start,
            ?end,
            "replay range"
        );
        // An end that is the broker's listing (also where --to-time found no message).
        let listed = args.to_offset.is_none() && end.is_some() && end == high;
        if end.map_or(true, |end| start < end) && start != i64::MAX {
            partitions.insert(p.id(), Bounds { start, end, listed });
        }
    }
    Ok(Range {
        topic: topic.to_string(),
        partitions,
    })
}

/// Reads a range's messages in batches, ending each partition at its end.
///
/// Some Kafka-protocol brokers list an end offset inside the last record batch (tansu 0.6
/// answers the last batch's first offset + 1). Kafka never does: any message it serves is
/// below its high watermark. So when a message at or past a listed end arrives, the end is
/// listed again; if the broker still lists it at or below that message, its listing cannot
/// be trusted and the partition falls back to ending once idle, as when no end is listed.
/// To see such a message, a partition that reached its listed end is not paused until the
/// messages already fetched for it are drained.
struct Reader<'c> {
    consumer: &'c BaseConsumer,
    topic: String,
    /// Partitions not finished yet.
    remaining: BTreeMap<i32, Bounds>,
    /// Partitions that reached their listed end, still unpaused (see above).
    settling: BTreeMap<i32, Bounds>,
    /// One past the last offset read, per partition: the end actually reached.
    reached: BTreeMap<i32, i64>,
    ended_short: Vec<i32>,
    idle_timeout: Duration,
    last_message: Instant,
}

impl<'c> Reader<'c> {
    fn start(
        consumer: &'c BaseConsumer,
        range: &Range,
        idle_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut tpl = TopicPartitionList::new();
        for (p, b) in &range.partitions {
            tpl.add_partition_offset(&range.topic, *p, Offset::Offset(b.start))?;
        }
        // Replaces any earlier assignment; messages fetched for it are discarded. A pause
        // from an earlier pass (see `pause`) would outlive the new assignment.
        consumer.assign(&tpl)?;
        if let Err(e) = consumer.resume(&tpl) {
            tracing::debug!(error = %e, "cannot resume the assigned partitions");
        }
        Ok(Reader {
            consumer,
            topic: range.topic.clone(),
            remaining: range.partitions.clone(),
            settling: BTreeMap::new(),
            reached: range
                .partitions
                .iter()
                .map(|(p, b)| (*p, b.start))
                .collect(),
            ended_short: Vec::new(),
            idle_timeout,
            last_message: Instant::now(),
        })
    }

    /// Stops fetching a finished partition (a live topic keeps growing).
    fn pause(&self, partition: i32) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, partition);
        if let Err(e) = self.consumer.pause(&tpl) {
            tracing::debug!(topic = self.topic, partition, error = %e, "cannot pause a finished partition");
        }
    }

    fn finish(&mut self, partition: i32) {
        self.remaining.remove(&partition);
        self.settling.remove(&partition);
        self.pause(partition);
    }

    /// Whether the end listed for `partition` is real, given that the broker served a
    /// message at `offset`, at or past it.
    fn listed_end_holds(&self, partition: i32, end: i64, offset: i64) -> bool {
        match self
            .consumer
            .fetch_watermarks(&self.topic, partition, Duration::from_secs(10))
        {
            Ok((_, high)) if high > offset => true,
            Ok((_, high)) => {
                tracing::warn!(
                    topic = self.topic,
                    partition,
                    listed_end = end,
                    listed_now = high,
                    served = offset,
                    "the broker lists an end offset below a message it serves; its end offsets cannot be trusted, \
                     so this partition ends once idle"
                );
                false
            }
            Err(e) => {
                tracing::debug!(topic = self.topic, partition, error = %e, "cannot list the end again; keeping the one listed at start");
                true
            }
        }
    }

    /// Decides what to do with a message at or past the end of its partition: `true`
    /// when the partition turns out to have no trustworthy end and reading goes on.
    fn past_end(&mut self, partition: i32, b: Bounds, offset: i64) -> bool {
        let end = b.end.unwrap_or(i64::MAX);
        if b.listed && !self.listed_end_holds(partition, end, offset) {
            self.settling.remove(&partition);
            self.remaining.insert(
                partition,
                Bounds {
                    end: None,
                    listed: false,
                    ..b
                },
            );
            return true;
        }
        self.finish(partition);
        false
    }

    /// The next messages of the range, at most `max` of them or `max_bytes`; empty once
    /// every partition reached its end.
    fn next_batch(&mut self, max: usize, max_bytes: usize) -> anyhow::Result<Vec<InputMessage>> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while batch.len() < max && bytes < max_bytes {
            let reading = !self.remaining.is_empty();
            if !reading && self.settling.is_empty() {
                break;
            }
            let wait = if batch.is_empty() && reading { 200 } else { 0 };
            let Some(m) = self.consumer.poll(Duration::from_millis(wait)) else {
                if !reading {
                    // Drained: what was fetched for the settling partitions held nothing
                    // past their ends.
                    for p in std::mem::take(&mut self.settling).into_keys() {
                        self.pause(p);
                    }
                    break;
                }
                if !batch.is_empty() {
                    break;
                }
                self.on_idle();
                continue;
            };
            let m = m?;
            let partition = m.partition();
            let offset = m.offset();
            if let Some(&b) = self.settling.get(&partition) {
                if offset < b.end.unwrap_or(i64::MAX) || !self.past_end(partition, b, offset) {
                    continue;
                }
            } else if let Some(&b) = self.remaining.get(&partition) {
                if let Some(end) = b.end {
                    if offset >= end && !self.past_end(partition, b, offset) {
                        continue;
                    }
                }
            } else {
                continue;
            }
            self.last_message = Instant::now();
            let b = self.remaining[&partition];
            if b.end.is_some_and(|end| offset + 1 >= end) {
                self.remaining.remove(&partition);
                if b.listed {
                    self.settling.insert(partition, b);
                } else {
                    self.pause(partition);
                }
            }
            self.reached.insert(partition, offset + 1);
            let msg = crate::kafka::input::input_message(&m);
            bytes += msg.size();
            batch.push(msg);
        }
        Ok(batch)
    }

    /// Nothing arrived: ends partitions whose position passed their end (records the
    /// consumer skips, such as transaction markers, close the range) and, after the idle
    /// timeout, partitions without a known end or stuck short of it.
    fn on_idle(&mut self) {
        if let Ok(positions) = self.consumer.position() {
            let passed: Vec<i32> = self
                .remaining
                .iter()
                .filter_map(|(p, b)| {
                    let end = b.end?;
                    match positions.find_partition(&self.topic, *p)?.offset() {
                        Offset::Offset(pos) if pos >= end => Some(*p),
                        _ => None,
                    }
                })
                .collect();
            for p in passed {
                self.finish(p);
            }
        }
        if self.last_message.elapsed() <= self.idle_timeout {
            return;
        }
        let idle: Vec<(i32, Bounds)> = self.remaining.iter().map(|(p, b)| (*p, *b)).collect();
        for (p, b) in idle {
            if let Some(end) = b.end {
                let reached = self.reached.get(&p).copied().unwrap_or_default();
                tracing::warn!(
                    topic = self.topic,
                    partition = p,
                    end,
                    reached,
                    idle_timeout = %humantime::format_duration(self.idle_timeout),
                    "nothing arrived before the end listed at start; this partition stops here"
                );
                self.ended_short.push(p);
            } else {
                tracing::debug!(topic = self.topic, partition = p, "idle; partition ends");
            }
            self.finish(p);
        }
    }

    /// The range this reader actually covered: every partition up to where it stopped.
    fn covered(&self, range: &Range) -> Range {
        Range {
            topic: range.topic.clone(),
            partitions: range
                .partitions
                .iter()
                .filter_map(|(p, b)| {
                    let end = self.reached.get(p).copied().unwrap_or(b.start);
                    (end > b.start).then_some((
                        *p,
                        Bounds {
                            start: b.start,
                            end: Some(end),
                            listed: false,
                        },
                    ))
                })
                .collect(),
        }
    }
}

fn header_text(msg: &InputMessage, name: &str) -> Option<String> {
    msg.headers
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.as_deref())
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_string)
}

/// For a DLQ record sent stripped (no value, no original headers), the position of the
/// original to re-read it from: `topic/partition/offset`, or the DLQ record's own position
/// when the source headers are missing.
fn stripped_source(msg: &InputMessage) -> Option<String> {
    let flag = header_text(msg, header::DLQ_STRIPPED)?;
    if flag.eq_ignore_ascii_case("false") {
        return None;
    }
    match (
        header_text(msg, header::SOURCE_TOPIC),
        header_text(msg, header::SOURCE_PARTITION),
        header_text(msg, header::SOURCE_OFFSET),
    ) {
        (Some(t), Some(p), Some(o)) => Some(format!("{t}/{p}/{o}")),
        _ => Some(format!(
            "unknown (DLQ record {}/{}/{})",
            msg.topic, msg.partition, msg.offset
        )),
    }
}

/// A DLQ message carries its original position in headers; the gate row and the output
/// should point at the original, and the dead-letter headers should not travel on.
///
/// Anyone can write a DLQ record, so the headers are checked before they are believed: a
/// topic that is not a valid topic name (a NUL byte would fail the whole gate
/// transaction), a negative or non-numeric partition or offset. A record whose source
/// headers do not check out keeps its DLQ position and headers, and says so in the log.
fn restore_original(mut msg: InputMessage) -> InputMessage {
    let source = (
        header_text(&msg, header::SOURCE_TOPIC),
        header_text(&msg, header::SOURCE_PARTITION),
        header_text(&msg, header::SOURCE_OFFSET),
    );
    if source == (None, None, None) {
        return msg;
    }
    let valid = (
        source.0.clone().filter(|t| is_valid_topic_name(t)),
        source
            .1
            .as_deref()
            .and_then(|p| p.parse::<i32>().ok())
            .filter(|p| *p >= 0),
        source
            .2
            .as_deref()
            .and_then(|o| o.parse::<i64>().ok())
            .filter(|o| *o >= 0),
    );
    let (Some(topic), Some(partition), Some(offset)) = valid else {
        tracing::warn!(
            topic = msg.topic,
            partition = msg.partition,
            offset = msg.offset,
            "DLQ record has kdedup-source-* headers that are missing or invalid; gated at its DLQ position instead"
        );
        return msg;
    };
    {
        msg.timestamp_ms = header_text(&msg, header::SOURCE_TIMESTAMP)
            .and_then(|t| t.parse::<i64>().ok())
            .filter(|t| *t >= 0)
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
    health.postgres_up.store(true, Ordering::Release);
    health.broker_up.store(true, Ordering::Release);
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
    let wakeup = Arc::new(Notify::new());
    let producer = crate::kafka::producer(&cfg.kafka.brokers, &cfg.kafka.properties)?;
    let sink = Arc::new(KafkaSink {
        relay_wakeup: wakeup.clone(),
    });
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
    let relay = (!args.dry_run).then(|| {
        tokio::spawn(
            Relay::new(&cfg, producer.clone(), metrics.clone(), wakeup.clone())
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
        } else {
            let s = gate
                .settle_without_dead_letters(batch, &stop)
                .await
                .map_err(|_| anyhow::anyhow!("replay stopped"))?;
            summary.forwarded += s.first_seen;
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
        // The outbox rows are published by whichever relay holds the lock: this one, or a
        // running sidecar's.
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
        "  still without a usable id{:>8}   (left where they are)",
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
            "  partitions that stopped idle before the end listed at start: {:?}",
            summary.ended_short
        );
    }
}

/// Which events of `batch` the gate would forward, without writing anything.
async fn dry_run_batch(
    gate: &Gate,
    batch: Vec<InputMessage>,
    gate_table_exists: bool,
) -> anyhow::Result<ReplaySummary> {
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
    let live = match gate_table_exists {
        true => db::gate::live_ids(&gate.pool, &keys).await?,
        false => 0,
    };
    s.duplicates += live;
    s.forwarded += keys.len() - live;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dlq_msg(headers: &[(&str, &str)]) -> InputMessage {
        InputMessage {
            topic: "orders.dlq".into(),
            partition: 0,
            offset: 3,
            timestamp_ms: Some(5),
            key: Some(b"k".to_vec()),
            value: None,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), Some(v.as_bytes().to_vec())))
                .collect(),
            header_names_utf8: true,
        }
    }

    #[test]
    fn a_stripped_dlq_record_names_its_source_position() {
        let m = dlq_msg(&[
            (header::DLQ_STRIPPED, "true"),
            (header::SOURCE_TOPIC, "orders"),
            (header::SOURCE_PARTITION, "2"),
            (header::SOURCE_OFFSET, "41"),
        ]);
        assert_eq!(stripped_source(&m).as_deref(), Some("orders/2/41"));
        let bare = dlq_msg(&[(header::DLQ_STRIPPED, "true")]);
        assert_eq!(
            stripped_source(&bare).as_deref(),
            Some("unknown (DLQ record orders.dlq/0/3)")
        );
        let whole = dlq_msg(&[(header::SOURCE_TOPIC, "orders")]);
        assert_eq!(stripped_source(&whole), None);
    }

    #[test]
    fn restore_original_moves_a_dlq_record_back_to_its_source() {
        let m = restore_original(dlq_msg(&[
            ("event-id", "e-1"),
            (header::DLQ_REASON, "missing_id"),
            (header::SOURCE_TOPIC, "orders"),
            (header::SOURCE_PARTITION, "2"),
            (header::SOURCE_OFFSET, "41"),
            (header::SOURCE_TIMESTAMP, "1000"),
        ]));
        assert_eq!((m.topic.as_str(), m.partition, m.offset), ("orders", 2, 41));
        assert_eq!(m.timestamp_ms, Some(1000));
        assert_eq!(m.headers.len(), 1, "{:?}", m.headers);
    }

    #[test]
    fn forged_source_headers_are_not_believed() {
        for (topic, partition, offset) in [
            ("ord\0ers", "2", "41"),
            ("orders", "-2", "41"),
            ("orders", "2", "x"),
            ("", "2", "41"),
        ] {
            let m = restore_original(dlq_msg(&[
                (header::SOURCE_TOPIC, topic),
                (header::SOURCE_PARTITION, partition),
                (header::SOURCE_OFFSET, offset),
            ]));
            assert_ne!(m.topic, topic, "{topic:?} {partition} {offset}");
            assert_eq!(m.headers.len(), 3, "DLQ headers kept: {:?}", m.headers);
        }
    }
}
