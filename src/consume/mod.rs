//! The data path of `kdedup run`, in flow order: the reader ([`Pipeline`]) polls the
//! consumer and hands each message to the gate lane that owns its partition
//! ([`lanes`]); a lane batches and settles ([`settle`]: identify, gate, dead-letter; each
//! decision logged and counted by one event in `events`) and then stores the batch's
//! offsets; when the lanes make no room, the reader holds the
//! input ([`hold`]).
//!
//! Contract:
//! - A batch is bounded by `--batch-size`, `--batch-max-bytes` and `--batch-linger`, and
//!   keeps the order messages arrived in (which is per-partition offset order).
//! - A batch's offsets are stored only once every message of it is durable (see
//!   [`settle`]); librdkafka's auto-commit then commits them.
//! - Batches are made by gate lanes, each owning whole partitions, so every rule above
//!   holds per partition while several lanes commit at once.

mod events;
pub mod hold;
pub mod lanes;
pub mod settle;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::health::Health;
use crate::kafka::{self, Consumer};
use crate::settings::ConsumeSettings;
use crate::store::lane::LaneConnection;
use lanes::{lane_of, read_ahead_cost, Lane, Queued, ReadAhead};
use settle::Gate;

/// The consumer loop of `kdedup run`.
///
/// One reader polls the consumer and hands each message to the gate lane that owns its
/// partition (`--gate-lanes`); each lane batches, gates and stores offsets for its own
/// partitions on its own connection, so lanes run gate transactions at the same time while
/// every partition keeps its order and its offsets still move only after its commit. The
/// reader runs ahead of the lanes by a bounded amount: enough to read past a long
/// run of one partition (librdkafka delivers a backlog partition by partition) to the next
/// lane's messages (`--read-ahead-bytes`). When the lanes have not made room for a while (Postgres down), the
/// reader holds the input: it pauses the partitions and keeps polling so the consumer stays
/// in its group, and rewinds over what it dropped (see [`hold::Keepalive`]). It is the only
/// poller, so for every partition the messages in the lanes precede the dropped ones.
pub struct Pipeline {
    pub gate: Gate,
    pub settings: ConsumeSettings,
    pub input_topics: Vec<String>,
    pub group_id: String,
    pub consumer: Arc<Consumer>,
    /// Where the reader reports input it cannot decode.
    pub health: Arc<Health>,
}

impl Pipeline {
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let topics: Vec<&str> = self.input_topics.iter().map(String::as_str).collect();
        self.consumer.subscribe(&topics)?;
        let lanes = self.settings.gate_lanes.max(1);
        info!(topics = ?topics, group_id = self.group_id, lanes, "consuming");
        let read_ahead = Arc::new(ReadAhead::new(self.settings.read_ahead_bytes));
        // Offsets made durable so far, for the final commit.
        let durable = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let mut senders = Vec::with_capacity(lanes);
        let mut workers = Vec::with_capacity(lanes);
        for _ in 0..lanes {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            senders.push(tx);
            let lane = Lane {
                // Lanes never poll the consumer: the reader is its only poller.
                gate: Arc::new(Gate {
                    keepalive: None,
                    lane_connection: Some(Arc::new(LaneConnection::new(&self.gate.pool))),
                    ..self.gate.clone()
                }),
                settings: self.settings.clone(),
                consumer: self.consumer.clone(),
                rx,
                read_ahead: read_ahead.clone(),
                durable: durable.clone(),
                collecting: Default::default(),
            };
            workers.push(tokio::spawn(lane.run(stop.clone())));
        }
        let result = self.read(&senders, &read_ahead, &stop).await;
        // Closing the channels ends each lane after the batch in hand; what is still queued
        // was never gated, its offsets never stored: it is redelivered.
        drop(senders);
        if result.is_err() {
            stop.cancel();
        }
        for w in workers {
            if let Err(e) = w.await {
                error!(error = %e, "gate lane failed");
            }
        }
        let durable = std::mem::take(&mut *durable.lock().expect("durable lock"));
        self.final_commit(&durable).await;
        self.consumer.unsubscribe();
        result
    }

    /// The reader: polls the consumer and queues each message on its partition's lane,
    /// until `stop`.
    async fn read(
        &self,
        lanes: &[tokio::sync::mpsc::UnboundedSender<Queued>],
        read_ahead: &ReadAhead,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        // Nothing polls the consumer while the reader waits for room, so past this the
        // input is held (paused and polled) to stay within max.poll.interval.ms.
        let hold_after = self.gate.settings.attempt_timeout;
        loop {
            if read_ahead.full() {
                let waited = tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    w = tokio::time::timeout(hold_after, read_ahead.room()) => w,
                };
                if waited.is_err() {
                    self.hold_until_room(read_ahead, stop).await?;
                }
                continue;
            }
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                m = self.consumer.recv() => m,
            };
            match next {
                Ok(m) => {
                    let msg = kafka::input::input_message(&m);
                    self.consumer.context().state.pending.read(
                        &msg.topic,
                        msg.partition,
                        msg.offset,
                        msg.timestamp_ms,
                    );
                    let lane = lane_of(&msg.topic, msg.partition, lanes.len());
                    read_ahead.take(read_ahead_cost(&msg));
                    if lanes[lane]
                        .send((tokio::time::Instant::now(), msg))
                        .is_err()
                    {
                        // A lane ends before the reader only when stopping.
                        return Ok(());
                    }
                }
                Err(e) if kafka::is_undecodable_input(&e) => {
                    // Fetching again fails the same way: a stuck partition. Loud at ERROR,
                    // counted, and not ready, at most one log line per 10 s.
                    self.gate.metrics.input_undecodable.inc();
                    {
                        let mut at = self.health.undecodable_at.lock().expect("health lock");
                        if at.map_or(true, |t| t.elapsed() > Duration::from_secs(10)) {
                            error!(error = %e, "input cannot be decoded (a compression codec this build lacks, or a corrupt record batch): the partition makes no progress until it is fixed");
                        }
                        *at = Some(std::time::Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    // Every 100 ms while the brokers are away: held to one line per kind
                    // per 30 s, as librdkafka's own errors are.
                    self.consumer
                        .context()
                        .log
                        .client_error(&e, "consumer poll");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Holds the input (paused, polled, dropped arrivals rewound) until the lanes have
    /// room again. Errors when a held partition could not be rewound.
    async fn hold_until_room(
        &self,
        read_ahead: &ReadAhead,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        let Some(k) = &self.gate.keepalive else {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = read_ahead.room() => {}
            }
            return Ok(());
        };
        while read_ahead.full() {
            if !k.idle(Duration::from_millis(200), stop).await {
                return Ok(());
            }
        }
        k.resume().await;
        if let Some((topic, partition, offset)) = k.rewind_failure() {
            anyhow::bail!(
                "partition {topic}/{partition} could not be rewound to offset {offset} after the input was held; \
                 stopping so that a restart re-reads it from its committed offset (nothing is lost)"
            );
        }
        Ok(())
    }

    /// Commits durable offsets of partitions still assigned, synchronously, before leaving
    /// the group. Partitions assigned elsewhere are left to their new owner.
    async fn final_commit(&self, durable: &BTreeMap<(String, i32), i64>) {
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        for e in assignment.elements() {
            if let Some(offset) = durable.get(&(e.topic().to_string(), e.partition())) {
                let _ = tpl.add_partition_offset(e.topic(), e.partition(), Offset::Offset(*offset));
            }
        }
        if tpl.count() == 0 {
            return;
        }
        let (consumer, count) = (self.consumer.clone(), tpl.count());
        let committed =
            tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync)).await;
        match committed.expect("commit does not panic") {
            Ok(()) => info!(partitions = count, "committed durable offsets"),
            Err(e) => {
                warn!(error = %e, "final offset commit failed; uncommitted work will be redelivered and absorbed by the gate")
            }
        }
    }
}
