//! The consume → identify → gate loop.
//!
//! Contract:
//! - A batch is bounded by `--batch-size`, `--batch-max-bytes` and `--batch-linger`, and
//!   keeps the order messages arrived in (which is per-partition offset order).
//! - Every message of a batch ends in exactly one of: forwarded (gate row + outbox row
//!   committed), duplicate (gate row already there), dead-lettered (acknowledged by the
//!   broker on the DLQ topic). Only once all three are durable are the batch's offsets
//!   stored; librdkafka's auto-commit then commits them.
//! - A Postgres or DLQ failure retries the same batch with capped, jittered backoff. On
//!   shutdown an unfinished batch is abandoned: its offsets were never stored, so it is
//!   redelivered and the gate absorbs whatever part of it did commit.
//! - Batches are made by gate lanes, each owning whole partitions ([`Pipeline`]), so every
//!   rule above holds per partition while several lanes commit at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{PayloadMismatch, RunConfig};
use crate::crash;
use crate::db::{self, FirstSighting, GateOutcome, GateRow};
use crate::headers::{self, Headers};
use crate::identity::{MessageView, Rejection};
use crate::kafka::{self, Consumer};
use crate::metrics::Metrics;
use crate::retry::Backoff;

/// Header names kdedup writes.
pub mod header {
    pub const EVENT_ID: &str = "kdedup-event-id";
    pub const SOURCE: &str = "kdedup-source";
    pub const DLQ_REASON: &str = "kdedup-dlq-reason";
    pub const DLQ_ERROR: &str = "kdedup-dlq-error";
    pub const SOURCE_TOPIC: &str = "kdedup-source-topic";
    pub const SOURCE_PARTITION: &str = "kdedup-source-partition";
    pub const SOURCE_OFFSET: &str = "kdedup-source-offset";
    pub const SOURCE_TIMESTAMP: &str = "kdedup-source-timestamp";
    /// Set when the DLQ topic refused the message as it was and it was sent without its
    /// value and headers.
    pub const DLQ_STRIPPED: &str = "kdedup-dlq-stripped";
}

/// An input message copied out of librdkafka's buffer, so a batch can outlive a poll.
#[derive(Debug, Clone)]
pub struct InputMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Headers,
    /// False when a header name was not UTF-8 (kept lossily in `headers`): such a
    /// message is dead-lettered with reason `header_not_utf8`.
    pub header_names_utf8: bool,
}

impl InputMessage {
    pub fn from_kafka(m: &BorrowedMessage<'_>) -> Self {
        let (headers, header_names_utf8) = headers::read(m);
        InputMessage {
            header_names_utf8,
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers,
        }
    }

    /// Bytes this message holds in memory (what `--batch-max-bytes` bounds).
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.value.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
    }

    fn view(&self) -> MessageView<'_> {
        MessageView {
            key: self.key.as_deref(),
            value: self.value.as_deref(),
            headers: &self.headers,
        }
    }
}

/// How a batch's events were settled.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchSummary {
    pub forwarded: usize,
    pub duplicates: usize,
    pub dead_lettered: usize,
    /// Same id as an earlier event, different payload (dead-lettered too with `dlq`).
    pub mismatched: usize,
}

/// Where duplicates come from, for `kdedup_duplicates_total{cause}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Consumed from the input topics by `kdedup run`.
    Live,
    /// Re-fed by `kdedup replay`.
    Replay,
}

/// Everything the gate step needs; shared by `kdedup run` and `kdedup replay`.
#[derive(Clone)]
pub struct Gate {
    pub cfg: Arc<RunConfig>,
    pub pool: PgPool,
    pub dlq: FutureProducer,
    pub metrics: Metrics,
    pub relay_wakeup: Arc<Notify>,
    pub origin: Origin,
    /// Keeps the consumer in its group while a batch waits to be retried (`None` for
    /// consumers that are not group members, such as replay).
    pub keepalive: Option<Arc<Keepalive>>,
    /// Largest message accepted (key + value + headers): `--max-message-bytes`, lowered
    /// to what the output topic takes once kdedup's own headers are added (see
    /// [`crate::app::input_size_limit`]). `None`: no limit (kdedup always sets one).
    pub max_message_bytes: Option<usize>,
}

/// While a batch is retried (Postgres or the DLQ topic down), the consumer must keep
/// polling or it exceeds `max.poll.interval.ms` and is evicted from its group. Partitions
/// are paused; messages that still arrive (already fetched) are dropped and their
/// partitions rewound with a seek before fetching resumes, so none is skipped.
pub struct Keepalive {
    consumer: Arc<Consumer>,
    /// Lowest dropped offset per partition: where to seek back to on resume.
    rewind: std::sync::Mutex<BTreeMap<(String, i32), i64>>,
    paused: std::sync::atomic::AtomicBool,
    /// A partition, still assigned, that could not be rewound: fetching it further would
    /// skip the dropped messages. The pipeline stops when this is set (see [`Pipeline::run`]).
    rewind_failed: std::sync::Mutex<Option<(String, i32, i64)>>,
}

impl Keepalive {
    pub fn new(consumer: Arc<Consumer>) -> Self {
        Keepalive {
            consumer,
            rewind: Default::default(),
            paused: Default::default(),
            rewind_failed: Default::default(),
        }
    }

    /// Polls (and drops) for `d`, with the assignment paused. False when stopped.
    async fn idle(&self, d: Duration, stop: &CancellationToken) -> bool {
        use std::sync::atomic::Ordering;
        if !self.paused.swap(true, Ordering::AcqRel) {
            if let Ok(assignment) = self.consumer.assignment() {
                if let Err(e) = self.consumer.pause(&assignment) {
                    warn!(error = %e, "cannot pause partitions");
                }
            }
            info!("input held until the batch in hand is durable; polling to stay in the group");
        }
        let until = tokio::time::Instant::now() + d;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep_until(until) => return true,
                m = self.consumer.recv() => {
                    if let Ok(m) = m {
                        let mut rewind = self.rewind.lock().expect("rewind lock");
                        let e = rewind.entry((m.topic().to_string(), m.partition())).or_insert(m.offset());
                        *e = (*e).min(m.offset());
                    }
                }
            }
        }
    }

    /// Seeks back over dropped messages and resumes fetching. A seek can fail for a
    /// moment (a partition whose fetcher is not started yet answers "erroneous state"),
    /// so it is retried; a partition that was revoked meanwhile is left to its next owner,
    /// which starts from the committed offset.
    async fn resume(&self) {
        use std::sync::atomic::Ordering;
        if !self.paused.swap(false, Ordering::AcqRel) {
            return;
        }
        let rewind = std::mem::take(&mut *self.rewind.lock().expect("rewind lock"));
        debug!(
            partitions = rewind.len(),
            "rewinding partitions over messages dropped while held"
        );
        for ((topic, partition), offset) in rewind {
            let mut attempt = 0;
            loop {
                let Err(e) = self.consumer.seek(
                    &topic,
                    partition,
                    Offset::Offset(offset),
                    Duration::from_secs(5),
                ) else {
                    break;
                };
                if !self.is_assigned(&topic, partition) {
                    debug!(topic, partition, offset, error = %e, "seek back skipped: partition revoked");
                    break;
                }
                attempt += 1;
                if attempt >= 10 {
                    error!(topic, partition, offset, error = %e,
                           "cannot rewind a held partition; stopping so that it is re-read from its committed offset");
                    *self.rewind_failed.lock().expect("rewind lock") =
                        Some((topic.clone(), partition, offset));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        if let Ok(assignment) = self.consumer.assignment() {
            if let Err(e) = self.consumer.resume(&assignment) {
                warn!(error = %e, "cannot resume partitions");
            }
        }
        info!("input resumed");
    }

    fn is_assigned(&self, topic: &str, partition: i32) -> bool {
        self.consumer.assignment().is_ok_and(|a| {
            a.elements()
                .iter()
                .any(|e| e.topic() == topic && e.partition() == partition)
        })
    }

    /// The partition that could not be rewound, if any (see `rewind_failed`).
    pub fn rewind_failure(&self) -> Option<(String, i32, i64)> {
        self.rewind_failed.lock().expect("rewind lock").clone()
    }
}

/// The batch was not made durable because a stop was requested.
#[derive(Debug)]
pub struct Abandoned;

fn payload_hash(value: Option<&[u8]>) -> Vec<u8> {
    // Truncated SHA-256: 16 bytes tell payloads apart with no realistic collision and
    // keep the row small.
    Sha256::digest(value.unwrap_or_default())[..16].to_vec()
}

impl Gate {
    /// Settles every message of `batch` durably (see the module contract), retrying on
    /// failure until it succeeds or `stop` fires.
    pub async fn settle(
        &self,
        batch: Vec<InputMessage>,
        stop: &CancellationToken,
    ) -> Result<BatchSummary, Abandoned> {
        self.settle_inner(batch, stop, true).await
    }

    /// Like [`Gate::settle`], but messages without a usable id are only counted and logged
    /// (in `dead_lettered`), not produced: replay uses it so that re-reading the
    /// dead-letter topic never writes into it again.
    pub async fn settle_without_dead_letters(
        &self,
        batch: Vec<InputMessage>,
        stop: &CancellationToken,
    ) -> Result<BatchSummary, Abandoned> {
        self.settle_inner(batch, stop, false).await
    }

    async fn settle_inner(
        &self,
        batch: Vec<InputMessage>,
        stop: &CancellationToken,
        produce_dead_letters: bool,
    ) -> Result<BatchSummary, Abandoned> {
        let started = Instant::now();
        let mut summary = BatchSummary::default();
        let mut rejected: Vec<(InputMessage, Rejection)> = Vec::new();
        let mut candidates: Vec<GateRow> = Vec::with_capacity(batch.len());
        let mut first_in_batch: HashMap<(String, String), usize> = HashMap::new();
        // Per scope, for the gate_counters totals (db::gate).
        let mut in_batch_duplicates: BTreeMap<String, i64> = BTreeMap::new();

        for msg in batch {
            self.metrics
                .events_consumed
                .with_label_values(&[&msg.topic])
                .inc();
            let (scope, event_id) = match self.identify(&msg) {
                Ok(identity) => identity,
                Err(rejection) => {
                    rejected.push((msg, rejection));
                    continue;
                }
            };
            let hash = payload_hash(msg.value.as_deref());
            let Some(&first) = first_in_batch.get(&(scope.clone(), event_id.clone())) else {
                first_in_batch.insert((scope.clone(), event_id.clone()), candidates.len());
                candidates.push(GateRow {
                    scope,
                    event_id,
                    topic: msg.topic,
                    partition: msg.partition,
                    offset: msg.offset,
                    timestamp_ms: msg.timestamp_ms,
                    payload_hash: hash,
                    key: msg.key,
                    value: msg.value,
                    headers: headers::encode(&msg.headers),
                });
                continue;
            };
            let f = &candidates[first];
            let first_seen = FirstSighting {
                topic: f.topic.clone(),
                partition: f.partition,
                offset: f.offset,
            };
            if f.payload_hash != hash {
                if let Some(r) = self.payload_mismatch(&scope, &event_id, &msg, &first_seen) {
                    rejected.push((msg, r));
                }
                summary.mismatched += 1;
                continue;
            }
            summary.duplicates += 1;
            *in_batch_duplicates.entry(scope.clone()).or_default() += 1;
            let cause = self.cause_for(false);
            debug!(
                event_id,
                scope,
                topic = msg.topic,
                partition = msg.partition,
                offset = msg.offset,
                cause,
                "duplicate within batch, not forwarded"
            );
            self.metrics.duplicates.with_label_values(&[cause]).inc();
        }

        // Dead letters first: they are durable once acknowledged, and a retry of the gate
        // below must not send them twice.
        if !rejected.is_empty() {
            self.dead_letter_or_report(&rejected, stop, produce_dead_letters)
                .await?;
            summary.dead_lettered += rejected.len();
        }

        let outcomes = self
            .gate_with_retry(&candidates, &in_batch_duplicates, stop)
            .await?;
        if let Some(k) = &self.keepalive {
            k.resume().await;
        }
        let committed_at = chrono::Utc::now().timestamp_millis();
        let mut late_rejects: Vec<(InputMessage, Rejection)> = Vec::new();
        for (row, outcome) in candidates.into_iter().zip(outcomes) {
            let outcome = match outcome {
                Ok(outcome) => outcome,
                Err((sqlstate, message)) => {
                    // Not committed: a replay after the cause is fixed gates it as new.
                    let (scope, event_id) = (row.scope.clone(), row.event_id.clone());
                    late_rejects.push((
                        row_to_message(row),
                        Rejection::DatabaseRefused {
                            sqlstate,
                            message,
                            scope,
                            event_id,
                        },
                    ));
                    continue;
                }
            };
            match outcome {
                GateOutcome::Forwarded => {
                    summary.forwarded += 1;
                    debug!(
                        event_id = row.event_id,
                        scope = row.scope,
                        topic = row.topic,
                        partition = row.partition,
                        offset = row.offset,
                        "first sighting, queued for output"
                    );
                    if let Some(ts) = row.timestamp_ms {
                        let secs = (committed_at - ts).max(0) as f64 / 1000.0;
                        self.metrics
                            .latency
                            .with_label_values(&["input_to_commit"])
                            .observe(secs);
                    }
                }
                GateOutcome::Duplicate {
                    first,
                    payload_differs: true,
                } => {
                    summary.mismatched += 1;
                    let first = first.expect("payload_differs implies a first sighting");
                    let (scope, event_id) = (row.scope.clone(), row.event_id.clone());
                    let msg = row_to_message(row);
                    if let Some(r) = self.payload_mismatch(&scope, &event_id, &msg, &first) {
                        late_rejects.push((msg, r));
                    }
                }
                GateOutcome::Duplicate { first, .. } => {
                    summary.duplicates += 1;
                    let same_position = first.as_ref().is_some_and(|f| {
                        f.topic == row.topic
                            && f.partition == row.partition
                            && f.offset == row.offset
                    });
                    let cause = self.cause_for(same_position);
                    self.metrics.duplicates.with_label_values(&[cause]).inc();
                    debug!(
                        event_id = row.event_id,
                        scope = row.scope,
                        topic = row.topic,
                        partition = row.partition,
                        offset = row.offset,
                        cause,
                        "duplicate, not forwarded"
                    );
                }
            }
        }
        // Mismatches found by the gate (and rows Postgres refused) are dead-lettered after
        // its commit; a crash before this produce redelivers the message, and the gate
        // finds the mismatch (or the refusal) again.
        if !late_rejects.is_empty() {
            self.dead_letter_or_report(&late_rejects, stop, produce_dead_letters)
                .await?;
            summary.dead_lettered += late_rejects.len();
            // A dead-letter retry above may have held the input again.
            if let Some(k) = &self.keepalive {
                k.resume().await;
            }
        }
        self.metrics.events_gated.inc_by(summary.forwarded as u64);
        if summary.forwarded > 0 {
            self.relay_wakeup.notify_one();
        }
        self.metrics
            .batch_duration
            .observe(started.elapsed().as_secs_f64());
        Ok(summary)
    }

    /// `(scope, event_id)` of a message, or why it has none.
    pub fn identify(&self, msg: &InputMessage) -> Result<(String, String), Rejection> {
        if !msg.header_names_utf8 {
            return Err(Rejection::HeaderNotUtf8);
        }
        if let Some(max) = self.max_message_bytes {
            let len = msg.size();
            if len > max {
                return Err(Rejection::MessageTooLarge { len, max });
            }
        }
        let scope = self.cfg.scope.extract(&msg.view())?;
        let id = self.cfg.id.extract(&msg.view())?;
        Ok((scope, id))
    }

    /// Counts and logs an id reused with a different payload; returns the rejection to
    /// dead-letter it with, when `--on-payload-mismatch dlq`.
    fn payload_mismatch(
        &self,
        scope: &str,
        event_id: &str,
        msg: &InputMessage,
        first: &FirstSighting,
    ) -> Option<Rejection> {
        let action = match self.cfg.on_payload_mismatch {
            PayloadMismatch::Skip => "skipped",
            PayloadMismatch::Dlq => "dead_lettered",
        };
        self.metrics
            .payload_mismatches
            .with_label_values(&[action])
            .inc();
        warn!(
            event_id,
            scope,
            topic = msg.topic,
            partition = msg.partition,
            offset = msg.offset,
            first_topic = first.topic,
            first_partition = first.partition,
            first_offset = first.offset,
            action,
            "same event id with a different payload: not a duplicate but a producer bug"
        );
        match self.cfg.on_payload_mismatch {
            PayloadMismatch::Skip => None,
            PayloadMismatch::Dlq => Some(Rejection::PayloadMismatch {
                first: format!("{}/{}/{}", first.topic, first.partition, first.offset),
                scope: scope.to_string(),
                event_id: event_id.to_string(),
            }),
        }
    }

    fn cause_for(&self, same_position: bool) -> &'static str {
        match (self.origin, same_position) {
            (Origin::Replay, _) => "replay",
            (Origin::Live, true) => "redelivery",
            (Origin::Live, false) => "upstream",
        }
    }

    /// Gates `rows`, retrying what can heal. Rows Postgres refuses as data (SQLSTATE class
    /// 22: a value this database cannot store) are found by splitting the batch in halves,
    /// each half its own transaction, committed in input order, down to the single rows
    /// at fault; those come back as `Err((sqlstate, message))` for the dead-letter topic
    /// and everything else is gated. `in_batch_duplicates` is counted with the first part
    /// that commits.
    async fn gate_with_retry(
        &self,
        rows: &[GateRow],
        in_batch_duplicates: &BTreeMap<String, i64>,
        stop: &CancellationToken,
    ) -> Result<Vec<Result<GateOutcome, (String, String)>>, Abandoned> {
        let mut results: Vec<Option<Result<GateOutcome, (String, String)>>> =
            vec![None; rows.len()];
        let no_duplicates = BTreeMap::new();
        let mut duplicates = Some(in_batch_duplicates);
        // Ranges still to gate, the next one last; the whole batch at first.
        let mut todo = vec![(0, rows.len())];
        while let Some((lo, hi)) = todo.pop() {
            if lo == hi {
                continue;
            }
            let counted = duplicates.unwrap_or(&no_duplicates);
            match self.gate_attempts(&rows[lo..hi], counted, stop).await? {
                Ok(outcomes) => {
                    duplicates = None;
                    for (slot, outcome) in results[lo..hi].iter_mut().zip(outcomes) {
                        *slot = Some(Ok(outcome));
                    }
                }
                Err(refused) if hi - lo == 1 => results[lo] = Some(Err(refused)),
                Err((sqlstate, _)) => {
                    debug!(
                        rows = hi - lo,
                        sqlstate, "Postgres refused data in these rows; splitting to find them"
                    );
                    let mid = lo + (hi - lo) / 2;
                    todo.push((mid, hi));
                    todo.push((lo, mid));
                }
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every row is gated or refused"))
            .collect())
    }

    /// One set of rows through the gate, retried until it commits, `stop` fires, or
    /// Postgres refuses the data (`Ok(Err((sqlstate, message)))`, not retried).
    async fn gate_attempts(
        &self,
        rows: &[GateRow],
        in_batch_duplicates: &BTreeMap<String, i64>,
        stop: &CancellationToken,
    ) -> Result<Result<Vec<GateOutcome>, (String, String)>, Abandoned> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let timeout = self.gate_timeout();
        loop {
            let started = Instant::now();
            let attempt = db::gate(&self.pool, rows, self.cfg.ttl, in_batch_duplicates);
            // A timed-out attempt may still have committed (the answer to COMMIT was lost):
            // the retry then finds its rows at their own positions, counts them as
            // redeliveries and forwards nothing twice.
            let result = match tokio::time::timeout(timeout, attempt).await {
                Ok(result) => result,
                Err(_elapsed) => Err(db::DbError::Timeout(timeout)),
            };
            match result {
                Ok(outcomes) => {
                    self.metrics
                        .gate_duration
                        .observe(started.elapsed().as_secs_f64());
                    self.metrics.postgres_up.set(1);
                    return Ok(Ok(outcomes));
                }
                Err(e) if e.data_exception().is_some() => {
                    return Ok(Err(e.data_exception().expect("checked")));
                }
                Err(e) => {
                    self.metrics.gate_retries.inc();
                    let delay = backoff.next_delay();
                    if e.is_transient() {
                        self.metrics.postgres_up.set(0);
                        warn!(error = %e, retry_in_ms = delay.as_millis() as u64, rows = rows.len(),
                              "gate transaction failed; retrying the batch");
                    } else {
                        error!(error = %e, retry_in_ms = delay.as_millis() as u64, rows = rows.len(),
                               "gate transaction failed with a non-transient error; retrying the batch");
                    }
                    if !self.idle(delay, stop).await {
                        return Err(Abandoned);
                    }
                }
            }
        }
    }

    /// How long one gate attempt may take before it is given up and retried. Nothing polls
    /// the consumer while the statement runs, so an attempt hung on a dead connection (a
    /// blackholed port answers nothing, not even a reset) must end well within
    /// `max.poll.interval.ms`, or the consumer is evicted from its group.
    pub(crate) fn gate_timeout(&self) -> Duration {
        let max_poll_ms = self
            .cfg
            .kafka
            .0
            .get("max.poll.interval.ms")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(300_000);
        Duration::from_millis(max_poll_ms / 3)
            .clamp(Duration::from_secs(5), Duration::from_secs(60))
    }

    async fn idle(&self, d: Duration, stop: &CancellationToken) -> bool {
        match &self.keepalive {
            Some(k) => k.idle(d, stop).await,
            None => {
                tokio::select! {
                    _ = stop.cancelled() => false,
                    _ = tokio::time::sleep(d) => true,
                }
            }
        }
    }

    async fn dead_letter_or_report(
        &self,
        rejected: &[(InputMessage, Rejection)],
        stop: &CancellationToken,
        produce: bool,
    ) -> Result<(), Abandoned> {
        if produce {
            return self.dead_letter(rejected, stop).await;
        }
        for (msg, why) in rejected {
            let (scope, event_id) = why.identity();
            warn!(event_id, scope, topic = msg.topic, partition = msg.partition, offset = msg.offset,
                  reason = why.reason(), error = %why, "still no usable event id; left where it is");
        }
        Ok(())
    }

    async fn dead_letter(
        &self,
        rejected: &[(InputMessage, Rejection)],
        stop: &CancellationToken,
    ) -> Result<(), Abandoned> {
        let mut pending: Vec<usize> = (0..rejected.len()).collect();
        // Messages the broker refuses as they are (too large for the DLQ topic) are sent
        // again without their value; the source position headers still lead to the original.
        let mut stripped = vec![false; rejected.len()];
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            let mut deliveries = Vec::with_capacity(pending.len());
            for &i in &pending {
                let (msg, why) = &rejected[i];
                let record = dlq_record(&self.cfg.dlq_topic, msg, why, stripped[i]);
                deliveries.push(self.dlq.send(record, Duration::from_secs(30)));
            }
            let results = futures::future::join_all(deliveries).await;
            let mut failed = Vec::new();
            for (&i, result) in pending.iter().zip(results) {
                let (msg, why) = &rejected[i];
                match result {
                    Ok(_) => {
                        self.metrics
                            .dead_lettered
                            .with_label_values(&[why.reason()])
                            .inc();
                        let (scope, event_id) = why.identity();
                        warn!(event_id, scope, topic = msg.topic, partition = msg.partition, offset = msg.offset,
                              reason = why.reason(), error = %why, "message dead-lettered");
                    }
                    Err((e, _)) if kafka::is_permanent_produce_error(&e) && !stripped[i] => {
                        let (scope, event_id) = why.identity();
                        warn!(event_id, scope, topic = msg.topic, partition = msg.partition, offset = msg.offset,
                              error = %e, "dead-letter topic refused the message; sending it without its value");
                        stripped[i] = true;
                        failed.push(i);
                    }
                    Err((e, _)) => {
                        let (scope, event_id) = why.identity();
                        error!(event_id, scope, topic = msg.topic, partition = msg.partition, offset = msg.offset,
                               dlq_topic = self.cfg.dlq_topic, error = %e, "dead-letter produce failed; retrying");
                        failed.push(i);
                    }
                }
            }
            if failed.is_empty() {
                return Ok(());
            }
            pending = failed;
            if !self.idle(backoff.next_delay(), stop).await {
                return Err(Abandoned);
            }
        }
    }
}

/// The input message a gate row was made from.
fn row_to_message(row: GateRow) -> InputMessage {
    InputMessage {
        topic: row.topic,
        partition: row.partition,
        offset: row.offset,
        timestamp_ms: row.timestamp_ms,
        key: row.key,
        value: row.value,
        headers: headers::decode(&row.headers).unwrap_or_default(),
        header_names_utf8: true,
    }
}

pub(crate) fn dlq_record<'a>(
    topic: &'a str,
    msg: &'a InputMessage,
    why: &Rejection,
    stripped: bool,
) -> FutureRecord<'a, Vec<u8>, Vec<u8>> {
    let mut hs = OwnedHeaders::new_with_capacity(msg.headers.len() + 7);
    if !stripped {
        for (k, v) in &msg.headers {
            hs = hs.insert(Header {
                key: k,
                value: v.as_deref(),
            });
        }
    } else {
        hs = hs.insert(Header {
            key: header::DLQ_STRIPPED,
            value: Some(b"true"),
        });
    }
    let partition = msg.partition.to_string();
    let offset = msg.offset.to_string();
    let timestamp = msg.timestamp_ms.map(|t| t.to_string()).unwrap_or_default();
    let error_text = why.to_string();
    for (k, v) in [
        (header::DLQ_REASON, why.reason()),
        (header::DLQ_ERROR, error_text.as_str()),
        (header::SOURCE_TOPIC, msg.topic.as_str()),
        (header::SOURCE_PARTITION, partition.as_str()),
        (header::SOURCE_OFFSET, offset.as_str()),
        (header::SOURCE_TIMESTAMP, timestamp.as_str()),
    ] {
        hs = hs.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    let mut record = FutureRecord::to(topic).headers(hs);
    if let Some(k) = &msg.key {
        record = record.key(k);
    }
    if let Some(v) = msg.value.as_ref().filter(|_| !stripped) {
        record = record.payload(v);
    }
    if let Some(ts) = msg.timestamp_ms {
        record = record.timestamp(ts);
    }
    record
}

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
/// in its group, and rewinds over what it dropped (see [`Keepalive`]). It is the only
/// poller, so for every partition the messages in the lanes precede the dropped ones.
pub struct Pipeline {
    pub gate: Gate,
    pub consumer: Arc<Consumer>,
    /// Where the reader reports input it cannot decode (`None` in tools without `/readyz`).
    pub health: Option<Arc<crate::admin::Health>>,
}

/// What a message counts against the read-ahead, in KiB (at least 1).
fn read_ahead_cost(msg: &InputMessage) -> usize {
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
struct ReadAhead {
    limit_kib: usize,
    in_lanes: std::sync::atomic::AtomicUsize,
    freed: Notify,
}

impl ReadAhead {
    fn new(limit_bytes: usize) -> Self {
        ReadAhead {
            limit_kib: (limit_bytes / 1024).max(1),
            in_lanes: Default::default(),
            freed: Notify::new(),
        }
    }

    fn full(&self) -> bool {
        self.in_lanes.load(std::sync::atomic::Ordering::Acquire) >= self.limit_kib
    }

    fn take(&self, cost: usize) {
        self.in_lanes
            .fetch_add(cost, std::sync::atomic::Ordering::AcqRel);
    }

    fn give_back(&self, cost: usize) {
        self.in_lanes
            .fetch_sub(cost, std::sync::atomic::Ordering::AcqRel);
        self.freed.notify_one();
    }

    async fn room(&self) {
        while self.full() {
            self.freed.notified().await;
        }
    }
}

/// One gate lane: its own batches, gate transactions and offsets.
struct Lane {
    gate: Gate,
    consumer: Arc<Consumer>,
    rx: tokio::sync::mpsc::UnboundedReceiver<InputMessage>,
    read_ahead: Arc<ReadAhead>,
    durable: Arc<std::sync::Mutex<BTreeMap<(String, i32), i64>>>,
}

impl Lane {
    async fn run(mut self, stop: CancellationToken) {
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
                let _ = self.consumer.commit_consumer_state(CommitMode::Sync);
                crash::reached(crash::Point::AfterOffsetCommit);
            }
            self.durable.lock().expect("durable lock").extend(next);
            self.read_ahead.give_back(cost);
        }
    }

    /// Waits for a first message, then fills the batch until it is full or the linger
    /// time since that first message has passed. Empty when the reader has stopped.
    async fn collect_batch(&mut self) -> Vec<InputMessage> {
        let cfg = &self.gate.cfg;
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

impl Pipeline {
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let topics: Vec<&str> = self
            .gate
            .cfg
            .input_topics
            .iter()
            .map(String::as_str)
            .collect();
        self.consumer.subscribe(&topics)?;
        let lanes = self.gate.cfg.gate_lanes.max(1);
        info!(topics = ?topics, group_id = self.gate.cfg.group_id, lanes, "consuming");
        let read_ahead = Arc::new(ReadAhead::new(self.gate.cfg.read_ahead_bytes));
        // Offsets made durable so far, for the final commit.
        let durable = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let mut senders = Vec::with_capacity(lanes);
        let mut workers = Vec::with_capacity(lanes);
        for _ in 0..lanes {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            senders.push(tx);
            let lane = Lane {
                // Lanes never poll the consumer: the reader is its only poller.
                gate: Gate {
                    keepalive: None,
                    ..self.gate.clone()
                },
                consumer: self.consumer.clone(),
                rx,
                read_ahead: read_ahead.clone(),
                durable: durable.clone(),
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
        self.final_commit(&durable);
        self.consumer.unsubscribe();
        result
    }

    /// The reader: polls the consumer and queues each message on its partition's lane,
    /// until `stop`.
    async fn read(
        &self,
        lanes: &[tokio::sync::mpsc::UnboundedSender<InputMessage>],
        read_ahead: &ReadAhead,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        // Nothing polls the consumer while the reader waits for room, so past this the
        // input is held (paused and polled) to stay within max.poll.interval.ms.
        let hold_after = self.gate.gate_timeout();
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
                    let msg = InputMessage::from_kafka(&m);
                    let lane = lane_of(&msg.topic, msg.partition, lanes.len());
                    read_ahead.take(read_ahead_cost(&msg));
                    if lanes[lane].send(msg).is_err() {
                        // A lane ends before the reader only when stopping.
                        return Ok(());
                    }
                }
                Err(e) if kafka::is_undecodable_input(&e) => {
                    // Fetching again fails the same way: a stuck partition. Loud at ERROR,
                    // counted, and not ready, at most one log line per 10 s.
                    self.gate.metrics.input_undecodable.inc();
                    if let Some(health) = &self.health {
                        let mut at = health.undecodable_at.lock().expect("health lock");
                        if at.map_or(true, |t| t.elapsed() > Duration::from_secs(10)) {
                            error!(error = %e, "input cannot be decoded (a compression codec this build lacks, or a corrupt record batch): the partition makes no progress until it is fixed");
                        }
                        *at = Some(std::time::Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    warn!(error = %e, "kafka consumer error");
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
    fn final_commit(&self, durable: &BTreeMap<(String, i32), i64>) {
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
        match self.consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => info!(partitions = tpl.count(), "committed durable offsets"),
            Err(e) => {
                warn!(error = %e, "final offset commit failed; uncommitted work will be redelivered and absorbed by the gate")
            }
        }
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

    #[test]
    fn payload_hash_tells_payloads_apart() {
        assert_eq!(payload_hash(Some(b"a")), payload_hash(Some(b"a")));
        assert_ne!(payload_hash(Some(b"a")), payload_hash(Some(b"b")));
        assert_eq!(payload_hash(None).len(), 16);
    }
}
