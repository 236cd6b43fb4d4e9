//! Gate lanes: each owns whole partitions, batches their messages, settles each batch and
//! only then stores its offsets; the reader runs ahead of the lanes by a bounded amount.

use std::collections::BTreeMap;
use std::sync::Arc;

use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::settle::{Abandoned, Gate};
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
    let mut next = BTreeMap::new();
    for m in batch {
        let e = next
            .entry((m.topic.clone(), m.partition))
            .or_insert(m.offset + 1);
        *e = (*e).max(m.offset + 1);
    }
    next
}

/// What a message counts against the read-ahead, in KiB (at least 1).
pub(super) fn read_ahead_cost(msg: &InputMessage) -> usize {
    msg.size().div_ceil(1024).max(1)
}

/// The lane that owns a partition.
pub fn lane_of(topic: &str, partition: i32, lanes: usize) -> usize {
    // Stable across processes and restarts (not `DefaultHasher`, which is seeded).
    let t = topic
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    (t.wrapping_add(partition as u64) % lanes.max(1) as u64) as usize
}

/// Room the lanes have made for the reader, in KiB.
pub(super) struct ReadAhead {
    limit_kib: usize,
    in_lanes: std::sync::atomic::AtomicUsize,
    freed: Notify,
}

impl ReadAhead {
    pub(super) fn new(limit_bytes: usize) -> Self {
        ReadAhead {
            limit_kib: (limit_bytes / 1024).max(1),
            in_lanes: Default::default(),
            freed: Notify::new(),
        }
    }

    pub(super) fn full(&self) -> bool {
        self.in_lanes.load(std::sync::atomic::Ordering::Acquire) >= self.limit_kib
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
    pub(super) gate: Gate,
    pub(super) settings: ConsumeSettings,
    pub(super) consumer: Arc<Consumer>,
    pub(super) rx: tokio::sync::mpsc::UnboundedReceiver<InputMessage>,
    pub(super) read_ahead: Arc<ReadAhead>,
    /// Offsets made durable so far, per partition, for the reader's final commit.
    pub(super) durable: Arc<std::sync::Mutex<BTreeMap<(String, i32), i64>>>,
}

impl Lane {
    pub(super) async fn run(mut self, stop: CancellationToken) {
        loop {
            let batch = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                batch = self.collect_batch() => batch,
            };
            if batch.is_empty() {
                break; // the reader has stopped
            }
            let next = next_offsets(&batch);
            let cost: usize = batch.iter().map(read_ahead_cost).sum();
            self.gate.metrics.batch_size.observe(batch.len() as f64);
            if let Err(Abandoned) = self.gate.settle(batch, &stop).await {
                info!("stop requested; unfinished batch abandoned, it will be redelivered");
                break;
            }
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
            self.read_ahead.give_back(cost);
        }
    }

    /// Waits for a first message, then fills the batch until it is full or the linger
    /// time since that first message has passed. Empty when the reader has stopped.
    async fn collect_batch(&mut self) -> Vec<InputMessage> {
        let cfg = &self.settings;
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        let mut deadline: Option<tokio::time::Instant> = None;
        while batch.len() < cfg.batch_size && bytes < cfg.batch_max_bytes {
            let next = match deadline {
                None => self.rx.recv().await,
                Some(d) => match tokio::time::timeout_at(d, self.rx.recv()).await {
                    Ok(next) => next,
                    Err(_elapsed) => break,
                },
            };
            let Some(msg) = next else { break };
            bytes += msg.size();
            batch.push(msg);
            deadline.get_or_insert_with(|| tokio::time::Instant::now() + cfg.batch_linger);
        }
        batch
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
