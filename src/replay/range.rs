//! Where a replay reads: the range of each partition, listed at start (from offsets or
//! times), and a reader that stops every partition at its end, so a replay finishes even
//! while the topic grows.
//!
//! librdkafka's calls here wait for the broker (metadata, watermarks, offsets for times,
//! poll): callers run them off the async runtime's threads (`block_in_place`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::model::InputMessage;
use crate::settings::{ReplaySettings, RunSettings};

/// Where one partition's replay starts and ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Bounds {
    start: i64,
    /// Exclusive end: asked for, or the high watermark listed at start. `None` when the
    /// broker reported none: the partition then ends once idle.
    end: Option<i64>,
    /// The end is the broker's listing (not asked for): see [`Reader::listed_end_holds`].
    listed: bool,
}

pub(super) struct Range {
    pub(super) topic: String,
    pub(super) partitions: BTreeMap<i32, Bounds>,
}

impl Range {
    /// Messages in the range, where every end is known.
    pub(super) fn known_total(&self) -> usize {
        self.partitions
            .values()
            .filter_map(|b| b.end.map(|e| (e - b.start).max(0) as usize))
            .sum()
    }
}

pub(super) fn consumer(cfg: &RunSettings) -> anyhow::Result<BaseConsumer> {
    let c = crate::kafka::reader_config(
        &cfg.kafka.brokers,
        &format!("{}.replay", cfg.kafka.group_id),
        &cfg.kafka.properties,
        &[],
    );
    Ok(crate::kafka::client(
        &c,
        rdkafka::consumer::DefaultConsumerContext,
    )?)
}

pub(super) fn resolve_range(
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
pub(super) struct Reader<'c> {
    consumer: &'c BaseConsumer,
    topic: String,
    /// Partitions not finished yet.
    remaining: BTreeMap<i32, Bounds>,
    /// Partitions that reached their listed end, still unpaused (see above).
    settling: BTreeMap<i32, Bounds>,
    /// One past the last offset read, per partition: the end actually reached.
    reached: BTreeMap<i32, i64>,
    pub(super) ended_short: Vec<i32>,
    idle_timeout: Duration,
    /// When the reader started, and when its last message arrived (`None` before the
    /// first).
    started: Instant,
    last_message: Option<Instant>,
}

/// How long a reader waits at least, whatever `--idle-timeout` says, for a message it
/// knows is coming: the pass's first one (a loaded broker can take seconds to answer the
/// first fetches after an assignment), and the next one of a partition short of its known
/// end (its records exist up to there: a silence is the broker pausing, not the end).
/// Ending such a partition early would replay it short.
const KNOWN_MESSAGE_WAIT: Duration = Duration::from_secs(30);

impl<'c> Reader<'c> {
    pub(super) fn start(
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
            started: Instant::now(),
            last_message: None,
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
    pub(super) fn next_batch(
        &mut self,
        max: usize,
        max_bytes: usize,
    ) -> anyhow::Result<Vec<InputMessage>> {
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
            self.last_message = Some(Instant::now());
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
        let silent_for = self.last_message.unwrap_or(self.started).elapsed();
        let idle: Vec<(i32, Bounds, Duration)> = self
            .remaining
            .iter()
            .map(|(p, b)| (*p, *b, self.wait_for(b)))
            .filter(|(_, _, wait)| silent_for > *wait)
            .collect();
        for (p, b, wait) in idle {
            if let Some(end) = b.end {
                let reached = self.reached.get(&p).copied().unwrap_or_default();
                tracing::warn!(
                    topic = self.topic,
                    partition = p,
                    end,
                    reached,
                    idle_for = %humantime::format_duration(wait),
                    "nothing arrived before the end listed at start; this partition stops here"
                );
                self.ended_short.push(p);
            } else {
                tracing::debug!(topic = self.topic, partition = p, "idle; partition ends");
            }
            self.finish(p);
        }
    }

    /// How long a silence ends `b`'s partition: `--idle-timeout` once the pass has read a
    /// message and the partition has no known end; [`KNOWN_MESSAGE_WAIT`] at least
    /// otherwise.
    fn wait_for(&self, b: &Bounds) -> Duration {
        if self.last_message.is_some() && b.end.is_none() {
            self.idle_timeout
        } else {
            self.idle_timeout.max(KNOWN_MESSAGE_WAIT)
        }
    }

    /// The range this reader actually covered: every partition up to where it stopped.
    pub(super) fn covered(&self, range: &Range) -> Range {
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
