//! Gate lanes: each owns whole partitions, batches their messages, settles each batch and
//! only then stores its offsets; the reader runs ahead of the lanes by a bounded amount.

use std::collections::BTreeMap;
use std::sync::Arc;

use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::settle::{Abandoned, Gate, Prepared};
use crate::crash;
use crate::kafka::Consumer;
use crate::model::InputMessage;
use crate::settings::ConsumeSettings;

/// Stores a settled batch's offsets; librdkafka's auto-commit commits them.
fn store_offsets(consumer: &Consumer, next: &BTreeMap<(String, i32), i64>) {
    let mut tpl = TopicPartitionList::with_capacity(next.len());
    for ((topic, partition), offset) in next {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            warn!(topic, partition, error = %e, "cannot express offset");
        }
    }
    if let Err(e) = consumer.store_offsets(&tpl) {
        // The partition was revoked while the batch was in flight: the new owner
        // re-reads from the last committed offset and the gate absorbs the repeat.
        debug!(error = %e, "offsets not stored (partition no longer assigned); it will be redelivered");
    }
}

/// Next offset to read per partition: one past the last message of the batch.
pub fn next_offsets(batch: &[InputMessage]) -> BTreeMap<(String, i32), i64> {
    let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
    // A batch is long runs of one partition: the topic is cloned once per run, not per
    // message.
    let mut run: Option<(&str, i32, i64)> = None;
    let flush = |next: &mut BTreeMap<(String, i32), i64>,
                 (topic, partition, to): (&str, i32, i64)| {
        let e = next.entry((topic.to_string(), partition)).or_insert(to);
        *e = (*e).max(to);
    };
    for m in batch {
        match &mut run {
            Some((t, p, to)) if *t == m.topic && *p == m.partition => *to = (*to).max(m.offset + 1),
            _ => {
                if let Some(r) = run.take() {
                    flush(&mut next, r);
                }
                run = Some((&m.topic, m.partition, m.offset + 1));
            }
        }
    }
    if let Some(r) = run {
        flush(&mut next, r);
    }
    next
}

/// What a message counts against the read-ahead, in bytes: its key, value and headers,
/// its topic's name and the queued message itself.
pub(super) fn read_ahead_cost(msg: &InputMessage) -> usize {
    msg.size() + msg.topic.len() + std::mem::size_of::<Queued>()
}

/// The lane that owns a partition.
pub fn lane_of(topic: &str, partition: i32, lanes: usize) -> usize {
    // Stable across processes and restarts (not `DefaultHasher`, which is seeded).
    let t = topic
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    (t.wrapping_add(partition as u64) % lanes.max(1) as u64) as usize
}

/// Room the lanes have made for the reader, in bytes.
pub(super) struct ReadAhead {
    limit: usize,
    in_lanes: std::sync::atomic::AtomicUsize,
    freed: Notify,
}

impl ReadAhead {
    pub(super) fn new(limit_bytes: usize) -> Self {
        ReadAhead {
            limit: limit_bytes.max(1),
            in_lanes: Default::default(),
            freed: Notify::new(),
        }
    }

    pub(super) fn full(&self) -> bool {
        self.in_lanes.load(std::sync::atomic::Ordering::Acquire) >= self.limit
    }

    pub(super) fn take(&self, cost: usize) {
        self.in_lanes
            .fetch_add(cost, std::sync::atomic::Ordering::AcqRel);
    }

    fn give_back(&self, cost: usize) {
        self.in_lanes
            .fetch_sub(cost, std::sync::atomic::Ordering::AcqRel);
        self.freed.notify_one();
    }

    pub(super) async fn room(&self) {
        while self.full() {
            self.freed.notified().await;
        }
    }
}

/// One gate lane: its own batches, gate transactions and offsets.
pub(super) struct Lane {
    /// Shared with the batch being settled while the next one is collected: one
    /// reference count per batch, not a copy of the gate.
    pub(super) gate: Arc<Gate>,
    pub(super) settings: ConsumeSettings,
    pub(super) consumer: Arc<Consumer>,
    pub(super) rx: tokio::sync::mpsc::UnboundedReceiver<Queued>,
    pub(super) read_ahead: Arc<ReadAhead>,
    /// Offsets made durable so far, per partition, for the reader's final commit.
    pub(super) durable: Arc<std::sync::Mutex<BTreeMap<(String, i32), i64>>>,
    /// The batch being collected, kept here so that collecting can be interrupted and
    /// resumed without losing what it took ([`Lane::collect_batch`] is cancel-safe).
    pub(super) collecting: Collecting,
}

/// A message on its way from the reader to a lane, with when the reader queued it.
pub(super) type Queued = (tokio::time::Instant, InputMessage);

/// A batch being collected: its messages, bytes, and when its linger time ends.
#[derive(Default)]
pub(super) struct Collecting {
    batch: Vec<InputMessage>,
    bytes: usize,
    deadline: Option<tokio::time::Instant>,
}

/// The most messages a batch makes room for at its first message; past that it grows.
const MAX_BATCH_RESERVE: usize = 4096;

/// Batches a pipelined lane has in hand at once: one being delivered, the next being
/// gated (and delivered as far as its keys allow).
const PIPELINE_DEPTH: usize = 2;

/// A batch collected and prepared, not yet gated.
struct Ready {
    prepared: Prepared,
    next: BTreeMap<(String, i32), i64>,
    cost: usize,
}

/// A batch a pipelined lane settles in a task of its own, with what storing its offsets
/// needs.
struct InHand {
    settled: tokio::task::JoinHandle<Result<super::settle::BatchSummary, Abandoned>>,
    next: BTreeMap<(String, i32), i64>,
    cost: usize,
}

impl Lane {
    pub(super) async fn run(self, stop: CancellationToken) {
        match self.gate.sink.pipelined() {
            true => self.run_pipelined(stop).await,
            false => self.run_one_at_a_time(stop).await,
        }
    }

    /// Stores a settled batch's offsets (and passes its crash points).
    async fn batch_durable(&self, next: BTreeMap<(String, i32), i64>) {
        crash::reached(crash::Point::AfterDbCommit);
        store_offsets(&self.consumer, &next);
        // That crash point is about offsets the coordinator has, not only stored ones
        // (auto-commit sends those within a second): commit them first.
        if crash::armed(crash::Point::AfterOffsetCommit) {
            let consumer = self.consumer.clone();
            let _ = tokio::task::spawn_blocking(move || {
                consumer.commit_consumer_state(CommitMode::Sync)
            })
            .await;
            crash::reached(crash::Point::AfterOffsetCommit);
        }
        self.consumer.context().state.pending.durable(&next);
        self.durable.lock().expect("durable lock").extend(next);
    }

    /// A sink that delivers after the gate ([`crate::sink::Sink::pipelined`]): the next
    /// batch is collected and gated once the previous one's deliveries are registered,
    /// while they run; offsets are still stored batch after batch, each once it is
    /// settled, so they never pass a message that is not final. At most
    /// [`PIPELINE_DEPTH`] batches are in hand.
    async fn run_pipelined(mut self, stop: CancellationToken) {
        let mut in_hand: std::collections::VecDeque<InHand> = Default::default();
        // The last batch's deliveries are registered (or it ended without any).
        let mut registered: Option<tokio::sync::oneshot::Receiver<()>> = None;
        let (mut stopping, mut reader_done, mut abandoned) = (false, false, false);
        loop {
            if in_hand.is_empty() && (stopping || reader_done) {
                break;
            }
            let may_collect =
                !stopping && !reader_done && registered.is_none() && in_hand.len() < PIPELINE_DEPTH;
            tokio::select! {
                biased;
                _ = stop.cancelled(), if !stopping => stopping = true,
                settled = async { (&mut in_hand.front_mut().expect("not empty").settled).await },
                    if !in_hand.is_empty() => {
                    let InHand { next, cost, .. } = in_hand.pop_front().expect("not empty");
                    match settled.expect("settling does not panic") {
                        Ok(_) if !abandoned => self.batch_durable(next).await,
                        Ok(_) => {}
                        Err(Abandoned) => {
                            info!("stop requested; unfinished batch abandoned, it will be redelivered");
                            // Nothing after it may be stored either.
                            abandoned = true;
                            stopping = true;
                        }
                    }
                    self.read_ahead.give_back(cost);
                }
                _ = async { registered.as_mut().expect("some").await }, if registered.is_some() => {
                    registered = None;
                }
                batch = self.collect_batch(), if may_collect => {
                    if batch.is_empty() {
                        reader_done = true;
                        continue;
                    }
                    let next = next_offsets(&batch);
                    let cost: usize = batch.iter().map(read_ahead_cost).sum();
                    self.gate.metrics.batch_size.observe(batch.len() as f64);
                    let (delivering, rx) = tokio::sync::oneshot::channel();
                    registered = Some(rx);
                    let (gate, stop) = (self.gate.clone(), stop.clone());
                    let settled = tokio::spawn(async move {
                        gate.settle_pipelined(batch, &stop, delivering).await
                    });
                    in_hand.push_back(InHand { settled, next, cost });
                }
            }
        }
    }

    /// A sink whose write is in the gate transaction: batch after batch, each settled and
    /// its offsets stored before the next is gated. The next batch is collected and
    /// prepared ([`Gate::prepare`]: ids, payload hashes) while the one before is in its
    /// transaction, so the connection waits for nothing but the lane's own work in it.
    async fn run_one_at_a_time(mut self, stop: CancellationToken) {
        let mut ready: Option<Ready> = None;
        let mut reader_done = false;
        loop {
            if stop.is_cancelled() {
                // A batch prepared but not gated is redelivered, as what is still queued.
                break;
            }
            let current = match ready.take() {
                Some(r) => r,
                None if reader_done => break,
                None => {
                    let batch = tokio::select! {
                        biased;
                        _ = stop.cancelled() => break,
                        batch = self.collect_batch() => batch,
                    };
                    if batch.is_empty() {
                        break; // the reader has stopped
                    }
                    self.ready(batch)
                }
            };
            let gate = self.gate.clone();
            let settled = gate.settle_prepared(current.prepared, &stop);
            tokio::pin!(settled);
            let result = loop {
                tokio::select! {
                    biased;
                    r = &mut settled => break r,
                    batch = self.collect_batch(), if ready.is_none() && !reader_done => {
                        match batch.is_empty() {
                            true => reader_done = true,
                            false => ready = Some(self.ready(batch)),
                        }
                    }
                }
            };
            if let Err(Abandoned) = result {
                info!("stop requested; unfinished batch abandoned, it will be redelivered");
                break;
            }
            self.batch_durable(current.next).await;
            self.read_ahead.give_back(current.cost);
        }
    }

    /// A collected batch made ready for the gate, with what storing its offsets and
    /// giving its read-ahead back need.
    fn ready(&self, batch: Vec<InputMessage>) -> Ready {
        let next = next_offsets(&batch);
        let cost: usize = batch.iter().map(read_ahead_cost).sum();
        self.gate.metrics.batch_size.observe(batch.len() as f64);
        Ready {
            prepared: self.gate.prepare(batch),
            next,
            cost,
        }
    }

    /// Waits for a first message, then fills the batch until it is full or the linger
    /// time since that first message has passed. Empty when the reader has stopped.
    /// Cancel-safe: a call dropped half-way leaves what it took for the next call.
    async fn collect_batch(&mut self) -> Vec<InputMessage> {
        let cfg = &self.settings;
        let c = &mut self.collecting;
        while c.batch.len() < cfg.batch_size && c.bytes < cfg.batch_max_bytes {
            let next = match c.deadline {
                None => self.rx.recv().await,
                Some(d) => match tokio::time::timeout_at(d, self.rx.recv()).await {
                    Ok(next) => next,
                    Err(_elapsed) => break,
                },
            };
            let Some((read_at, msg)) = next else { break };
            c.bytes += msg.size();
            if c.batch.is_empty() {
                // Room for a full batch at once rather than growing (and copying) it ten
                // times on the way to --batch-size.
                c.batch.reserve(cfg.batch_size.min(MAX_BATCH_RESERVE));
            }
            c.batch.push(msg);
            // From when the reader queued it, not from when this lane took it: a message
            // that waited while the lane gated the batch before it has used its linger up,
            // and the batch goes with what is queued by then.
            c.deadline.get_or_insert(read_at + cfg.batch_linger);
        }
        std::mem::take(c).batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, partition: i32, offset: i64) -> InputMessage {
        InputMessage {
            topic: topic.into(),
            partition,
            offset,
            timestamp_ms: None,
            key: None,
            value: None,
            headers: vec![],
            header_names_utf8: true,
        }
    }

    #[test]
    fn next_offsets_point_past_the_last_message_of_each_partition() {
        let batch = vec![
            msg("a", 0, 5),
            msg("a", 1, 9),
            msg("a", 0, 6),
            msg("b", 0, 1),
        ];
        let next = next_offsets(&batch);
        assert_eq!(next[&("a".to_string(), 0)], 7);
        assert_eq!(next[&("a".to_string(), 1)], 10);
        assert_eq!(next[&("b".to_string(), 0)], 2);
    }

    #[test]
    fn read_ahead_counts_the_bytes_a_message_holds() {
        let mut m = msg("orders", 0, 1);
        m.value = Some(vec![0; 256]);
        let cost = read_ahead_cost(&m);
        // Its value, topic and bookkeeping, not a rounded-up KiB: 8 MiB holds about
        // 20,000 such messages, not 8,192.
        assert!(cost >= 256 + "orders".len() && cost < 512, "{cost}");
        let room = ReadAhead::new(10 * cost);
        for _ in 0..9 {
            room.take(cost);
            assert!(!room.full());
        }
        room.take(cost);
        assert!(room.full());
        room.give_back(cost);
        assert!(!room.full());
    }

    #[test]
    fn each_partition_has_one_lane_and_partitions_spread_over_lanes() {
        for lanes in 1..=4 {
            let mut per_lane = vec![0; lanes];
            for p in 0..8 {
                let lane = lane_of("orders", p, lanes);
                assert_eq!(lane, lane_of("orders", p, lanes), "stable");
                per_lane[lane] += 1;
            }
            // Consecutive partitions of one topic go round the lanes.
            assert!(
                per_lane
                    .iter()
                    .all(|&n| n == 8 / lanes || n == 8 / lanes + 1),
                "{per_lane:?}"
            );
        }
        assert_eq!(lane_of("orders", 3, 1), 0);
    }
}
