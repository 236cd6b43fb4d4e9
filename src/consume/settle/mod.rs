//! Settling a batch: identify, gate, dead-letter. The one place where an input message's
//! fate is decided.
//!
//! Contract:
//! - Every message of a batch ends in exactly one of: forwarded (gate row + the sink's
//!   forwarding write committed), duplicate (gate row already there), dead-lettered
//!   (acknowledged by the broker on the DLQ topic). [`Gate::settle_prepared`] returns
//!   only once all three are durable; the caller stores offsets after that.
//! - A Postgres or DLQ failure retries the same batch with capped, jittered backoff. On
//!   shutdown an unfinished batch is abandoned ([`Abandoned`]): its offsets were never
//!   stored, so it is redelivered and the gate absorbs whatever part of it did commit.
//! - Rows Postgres refuses as data (SQLSTATE class 22) are found by splitting the batch and
//!   dead-lettered; the rest commits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::kafka::Producer;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

mod held;

use super::events;
use super::hold::Keepalive;
use crate::kafka::dlq;
use crate::metrics::{Cause, Metrics};
use crate::model::identity::Rejection;
use crate::model::{InputMessage, Position};
use crate::retry::Backoff;
use crate::settings::{GateSettings, RunSettings};
use crate::sink::Sink;
use crate::store::gate::{self, GateBatch, GateOutcome, GateRow, GateStatement, Pushed};
use crate::store::lane::LaneConnection;
use crate::store::{DbError, Refused};

/// How a batch's events were settled.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchSummary {
    /// First sightings committed with the sink's forwarding write (for the Kafka sink:
    /// queued in the outbox; `kdedup_events_forwarded_total` counts them once the broker
    /// acknowledged them).
    pub first_seen: usize,
    pub duplicates: usize,
    pub dead_lettered: usize,
    /// First sightings whose delivery ended `FAILED` (HTTP sink): counted in `first_seen`
    /// (their gate row committed) and in `dead_lettered`, but not delivered.
    pub delivery_failed: usize,
    /// Same id as an earlier event, different payload (dead-lettered too with `dlq`).
    pub mismatched: usize,
}

/// A batch identified for the gate ([`Gate::prepare`]), not yet gated.
pub struct Prepared {
    candidates: GateBatch,
    rejected: Vec<(InputMessage, Rejection)>,
    summary: BatchSummary,
}

/// Where duplicates come from, for `kdedup_duplicates_total{cause}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Consumed from the input topics by `kdedup run`.
    Live,
    /// Re-fed by `kdedup replay`.
    Replay,
}

impl Origin {
    /// Why a duplicate came; `same_position`: seen before at this very
    /// topic/partition/offset (Kafka redelivered it).
    fn cause(self, same_position: bool) -> Cause {
        match (self, same_position) {
            (Origin::Replay, _) => Cause::Replay,
            (Origin::Live, true) => Cause::Redelivery,
            (Origin::Live, false) => Cause::Upstream,
        }
    }
}

/// Everything the gate step needs; shared by `kdedup run` and `kdedup replay`.
#[derive(Clone)]
pub struct Gate {
    pub settings: Arc<GateSettings>,
    pub dlq_topic: String,
    pub pool: PgPool,
    /// A gate lane's own connection for its gate transactions (`None`: the pool's).
    pub lane_connection: Option<Arc<LaneConnection>>,
    pub dlq: Producer,
    pub metrics: Metrics,
    pub sink: Arc<dyn Sink>,
    /// The gate statement with the sink's write in it, built once.
    pub statement: Arc<GateStatement>,
    pub origin: Origin,
    /// Keeps the consumer in its group while a batch waits to be retried (`None` for
    /// callers that do not poll a group member, such as the lanes and replay).
    pub keepalive: Option<Arc<Keepalive>>,
    /// Largest message accepted (key + value + headers): `--max-message-bytes`, lowered
    /// to what the output topic takes once kdedup's own headers are added (see
    /// [`crate::sink::kafka::topics::input_size_limit`]). `None`: no limit.
    pub max_message_bytes: Option<usize>,
}

/// The batch was not made durable because a stop was requested.
#[derive(Debug)]
pub struct Abandoned;

/// A gate outcome, or Postgres' refusal of the row's data.
type RowResult = Result<GateOutcome, Refused>;

/// First sightings with their seq in an outbox stream (the Kafka sink's hand-off).
type Sequenced = Vec<(GateRow, i64)>;

/// What the gate compares to tell a duplicate from an id reused with another payload.
pub fn payload_hash(value: Option<&[u8]>) -> Vec<u8> {
    // Truncated SHA-256: 16 bytes tell payloads apart with no realistic collision and
    // keep the row small.
    Sha256::digest(value.unwrap_or_default())[..16].to_vec()
}

impl Gate {
    /// The gate of `cfg`'s sidecar (or replay), forwarding through `sink`, with no
    /// keep-alive (set `keepalive` for the reader of a group member).
    pub fn new(
        cfg: &RunSettings,
        pool: PgPool,
        dlq: Producer,
        metrics: Metrics,
        sink: Arc<dyn Sink>,
        origin: Origin,
        max_message_bytes: Option<usize>,
    ) -> Self {
        Gate {
            settings: Arc::new(cfg.gate.clone()),
            dlq_topic: cfg.kafka.dlq_topic.clone(),
            pool,
            lane_connection: None,
            dlq,
            metrics,
            statement: Arc::new(sink.statement()),
            sink,
            origin,
            keepalive: None,
            max_message_bytes,
        }
    }

    /// Settles a batch, for a lane that settles its next batch while this one is still
    /// being delivered (a pipelined sink, see [`Sink::pipelined`]): `delivering` is sent
    /// (or dropped) once this batch's deliveries are registered with the sink, so that
    /// the next batch's, registered after them, keep their keys' input order.
    pub async fn settle_pipelined(
        &self,
        batch: Vec<InputMessage>,
        stop: &CancellationToken,
        delivering: tokio::sync::oneshot::Sender<()>,
    ) -> Result<BatchSummary, Abandoned> {
        self.settle_inner(batch, stop, true, Some(delivering)).await
    }

    /// Settles a batch as [`Gate::settle_prepared`] does, but messages without a usable id
    /// are only counted and logged (in `dead_lettered`), not produced: replay uses it so
    /// that re-reading the dead-letter topic never writes into it again.
    pub async fn settle_without_dead_letters(
        &self,
        batch: Vec<InputMessage>,
        stop: &CancellationToken,
    ) -> Result<BatchSummary, Abandoned> {
        self.settle_inner(batch, stop, false, None).await
    }

    /// Identifies a batch's messages for the gate (ids, payload hashes, in-batch
    /// repeats): work without Postgres that a lane does for its next batch while the gate
    /// transaction of the one before runs ([`Gate::settle_prepared`]).
    pub fn prepare(&self, batch: Vec<InputMessage>) -> Prepared {
        let mut summary = BatchSummary::default();
        let (candidates, rejected) = self.candidates(batch, &mut summary);
        Prepared {
            candidates,
            rejected,
            summary,
        }
    }

    /// Settles every message of a batch [`Gate::prepare`]d before durably (see the module
    /// contract), retrying on failure until it succeeds or `stop` fires.
    pub async fn settle_prepared(
        &self,
        prepared: Prepared,
        stop: &CancellationToken,
    ) -> Result<BatchSummary, Abandoned> {
        self.settle_from(prepared, Instant::now(), stop, true, None)
            .await
    }

    async fn settle_inner(
        &self,
        batch: Vec<InputMessage>,
        stop: &CancellationToken,
        produce_dead_letters: bool,
        delivering: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<BatchSummary, Abandoned> {
        let started = Instant::now();
        let prepared = self.prepare(batch);
        self.settle_from(prepared, started, stop, produce_dead_letters, delivering)
            .await
    }

    /// `started`: when the batch's settling began, for `kdedup_batch_duration_seconds`
    /// (a lane's preparation that overlapped the batch before is not counted twice).
    async fn settle_from(
        &self,
        prepared: Prepared,
        started: Instant,
        stop: &CancellationToken,
        produce_dead_letters: bool,
        delivering: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<BatchSummary, Abandoned> {
        let Prepared {
            candidates,
            rejected,
            mut summary,
        } = prepared;

        // Dead letters first: they are durable once acknowledged, and a retry of the gate
        // below must not send them twice.
        if !rejected.is_empty() {
            self.dead_letter_or_report(&rejected, stop, produce_dead_letters)
                .await?;
            summary.dead_lettered += rejected.len();
        }

        let gated_since = Instant::now();
        let (mut outcomes, seqs) = self.gate_with_retry(&candidates, stop).await?;
        if let Some(k) = &self.keepalive {
            k.resume().await;
        }
        // A sink whose delivery ends after the gate (HTTP) delivers now: the batch's
        // offsets wait for every outcome to be written.
        let delivered = self
            .deliver(&candidates, &mut outcomes, gated_since, stop, delivering)
            .await?;
        let (late_rejects, sequenced) =
            self.record_outcomes(candidates, outcomes, seqs, delivered, &mut summary);
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
        self.metrics.events_gated.inc_by(summary.first_seen as u64);
        if summary.first_seen > 0 {
            self.sink.committed(summary.first_seen, sequenced);
        }
        self.metrics
            .batch_duration
            .observe(started.elapsed().as_secs_f64());
        Ok(summary)
    }

    /// The batch's gate candidates (each id once) and the messages rejected before the
    /// gate: no usable id, or an id repeated in this batch with another payload.
    fn candidates(
        &self,
        batch: Vec<InputMessage>,
        summary: &mut BatchSummary,
    ) -> (GateBatch, Vec<(InputMessage, Rejection)>) {
        let mut rejected: Vec<(InputMessage, Rejection)> = Vec::new();
        let mut candidates = GateBatch::with_capacity(batch.len());
        // Counted per run of one topic (a batch is usually one): a labelled series is
        // looked up once per run, not once per message.
        let mut consumed: Option<(String, u64)> = None;
        let count = |consumed: Option<(String, u64)>| {
            if let Some((topic, n)) = consumed {
                self.metrics
                    .events_consumed
                    .with_label_values(&[&topic])
                    .inc_by(n);
            }
        };
        for msg in batch {
            match &mut consumed {
                Some((topic, n)) if *topic == msg.topic => *n += 1,
                _ => count(consumed.replace((msg.topic.clone(), 1))),
            }
            let (scope, event_id) = match self.identify(&msg).and_then(|id| {
                self.sink.admit(&msg)?;
                Ok(id)
            }) {
                Ok(identity) => identity,
                Err(rejection) => {
                    rejected.push((msg, rejection));
                    continue;
                }
            };
            let row = GateRow {
                payload_hash: payload_hash(msg.value.as_deref()),
                headers: msg.headers,
                scope,
                event_id,
                topic: msg.topic,
                partition: msg.partition,
                offset: msg.offset,
                timestamp_ms: msg.timestamp_ms,
                key: msg.key,
                value: msg.value,
            };
            match candidates.push(row) {
                Pushed::Candidate => {}
                Pushed::Duplicate(row) => {
                    // `push` kept the first copy; this one is only counted and logged.
                    summary.duplicates += 1;
                    events::Duplicate {
                        row: &row,
                        cause: self.origin.cause(false),
                        within_batch: true,
                    }
                    .emit(&self.metrics);
                }
                Pushed::Mismatch { first, row } => {
                    summary.mismatched += 1;
                    let first = first.position();
                    let (scope, event_id) = (row.scope.clone(), row.event_id.clone());
                    let msg = row_to_message(row);
                    if let Some(r) = self.payload_mismatch(&scope, &event_id, &msg, &first) {
                        rejected.push((msg, r));
                    }
                }
            }
        }
        count(consumed);
        (candidates, rejected)
    }

    /// Counts, logs and summarises what the gate decided; returns the rows to dead-letter
    /// after the commit (mismatches, rows Postgres refused, deliveries that failed for
    /// good: `failed`, one per row).
    /// Counts and logs each row's outcome. Returns the rows to dead-letter, and the first
    /// sightings that got a seq in an outbox stream (for the sink's hand-off).
    fn record_outcomes(
        &self,
        candidates: GateBatch,
        outcomes: Vec<RowResult>,
        seqs: Vec<Option<i64>>,
        failed: Vec<Option<Rejection>>,
        summary: &mut BatchSummary,
    ) -> (Vec<(InputMessage, Rejection)>, Sequenced) {
        let committed_at = chrono::Utc::now().timestamp_millis();
        let mut late_rejects: Vec<(InputMessage, Rejection)> = Vec::new();
        let mut sequenced = Vec::new();
        for (((row, outcome), failed), seq) in candidates
            .into_rows()
            .into_iter()
            .zip(outcomes)
            .zip(failed)
            .zip(seqs)
        {
            let outcome = match outcome {
                Ok(outcome) => outcome,
                Err(refused) => {
                    // Not committed: a replay after the cause is fixed gates it as new.
                    let (scope, event_id) = (row.scope.clone(), row.event_id.clone());
                    let Refused {
                        sqlstate,
                        message,
                        by_sink,
                    } = refused;
                    let why = match by_sink {
                        true => {
                            self.metrics
                                .sink_rejected
                                .with_label_values(&[sqlstate.get(..2).unwrap_or("??")])
                                .inc();
                            Rejection::SinkRejected {
                                sqlstate,
                                message,
                                scope,
                                event_id,
                            }
                        }
                        false => Rejection::DatabaseRefused {
                            sqlstate,
                            message,
                            scope,
                            event_id,
                        },
                    };
                    late_rejects.push((row_to_message(row), why));
                    continue;
                }
            };
            match outcome {
                GateOutcome::Forwarded => {
                    summary.first_seen += 1;
                    events::FirstSeen {
                        row: &row,
                        committed_at_ms: committed_at,
                    }
                    .emit(&self.metrics);
                    if let Some(why) = failed {
                        summary.delivery_failed += 1;
                        late_rejects.push((row_to_message(row), why));
                    } else if let Some(seq) = seq {
                        sequenced.push((row, seq));
                    }
                }
                GateOutcome::Busy => {
                    debug_assert!(false, "busy rows are gated again until they are not");
                }
                GateOutcome::Mismatch { first } => {
                    summary.mismatched += 1;
                    let (scope, event_id) = (row.scope.clone(), row.event_id.clone());
                    let msg = row_to_message(row);
                    if let Some(r) = self.payload_mismatch(&scope, &event_id, &msg, &first) {
                        late_rejects.push((msg, r));
                    }
                }
                GateOutcome::Duplicate { first } => {
                    summary.duplicates += 1;
                    let same_position = first.as_ref().is_some_and(|f| *f == row.position());
                    events::Duplicate {
                        row: &row,
                        cause: self.origin.cause(same_position),
                        within_batch: false,
                    }
                    .emit(&self.metrics);
                }
            }
        }
        (late_rejects, sequenced)
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
        let scope = self.settings.scope.extract(&msg.view())?;
        let id = self.settings.id.extract(&msg.view())?;
        Ok((scope, id))
    }

    /// Counts and logs an id reused with a different payload; returns the rejection to
    /// dead-letter it with, when `--on-payload-mismatch dlq`.
    fn payload_mismatch(
        &self,
        scope: &str,
        event_id: &str,
        msg: &InputMessage,
        first: &Position,
    ) -> Option<Rejection> {
        events::Mismatch {
            scope,
            event_id,
            msg,
            first,
            action: self.settings.on_payload_mismatch,
        }
        .emit(&self.metrics)
    }

    /// Gates `batch`, retrying what can heal. Rows Postgres refuses as data (SQLSTATE class
    /// 22: a value this database cannot store; for the sink statement also 21 and 23, see
    /// [`DbError::refused`]) are found by splitting the batch in halves, each half its own
    /// transaction, committed in input order, down to the single rows at fault; those come
    /// back as `Err(Refused)` for the dead-letter topic and everything else is gated. The in-batch duplicates are counted with the first
    /// part that commits.
    async fn gate_with_retry(
        &self,
        batch: &GateBatch,
        stop: &CancellationToken,
    ) -> Result<(Vec<RowResult>, Vec<Option<i64>>), Abandoned> {
        let mut results: Vec<Option<RowResult>> = vec![None; batch.len()];
        let mut seqs: Vec<Option<i64>> = vec![None; batch.len()];
        let mut duplicates_counted = false;
        // Ranges still to gate, the next one last; the whole batch at first.
        let mut todo = vec![(0, batch.len())];
        while let Some((lo, hi)) = todo.pop() {
            if lo == hi {
                continue;
            }
            let part = batch.part(lo..hi, !duplicates_counted);
            match self.gate_attempts(part, hi - lo, stop).await? {
                Ok((outcomes, part_seqs)) => {
                    duplicates_counted = true;
                    for (slot, outcome) in results[lo..hi].iter_mut().zip(outcomes) {
                        *slot = Some(Ok(outcome));
                    }
                    for (slot, seq) in seqs[lo..hi].iter_mut().zip(part_seqs) {
                        *slot = seq;
                    }
                }
                Err(refused) if hi - lo == 1 => results[lo] = Some(Err(refused)),
                Err(refused) => {
                    debug!(
                        rows = hi - lo,
                        sqlstate = refused.sqlstate,
                        by_sink = refused.by_sink,
                        "Postgres refused data in these rows; splitting to find them"
                    );
                    let mid = lo + (hi - lo) / 2;
                    todo.push((mid, hi));
                    todo.push((lo, mid));
                }
            }
        }
        let results = results
            .into_iter()
            .map(|r| r.expect("every row is gated or refused"))
            .collect();
        Ok((results, seqs))
    }

    /// One part of a batch through the gate, retried until it commits, `stop` fires, or
    /// Postgres refuses the data (`Ok(Err(Refused))`, not retried).
    async fn gate_attempts(
        &self,
        part: gate::GatePart<'_>,
        rows: usize,
        stop: &CancellationToken,
    ) -> Result<Result<(Vec<GateOutcome>, Vec<Option<i64>>), Refused>, Abandoned> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let timeout = self.settings.attempt_timeout;
        loop {
            let started = Instant::now();
            let attempt = async {
                match &self.lane_connection {
                    Some(own) => {
                        let mut lent = own.lend().await?;
                        let r =
                            gate::gate(lent.conn(), &self.statement, part, self.settings.ttl).await;
                        lent.give_back(&r);
                        r
                    }
                    None => gate::gate(&self.pool, &self.statement, part, self.settings.ttl).await,
                }
            };
            // A timed-out attempt may still have committed (the answer to COMMIT was lost):
            // the retry then finds its rows at their own positions, counts them as
            // redeliveries and forwards nothing twice.
            let result = match tokio::time::timeout(timeout, attempt).await {
                Ok(result) => result,
                Err(_elapsed) => Err(DbError::Timeout(timeout)),
            };
            match result {
                Ok(commit) => {
                    self.metrics
                        .gate_duration
                        .observe(started.elapsed().as_secs_f64());
                    if commit.taken_over > 0 {
                        self.sink.taken_over(commit.taken_over);
                    }
                    if let Some(w) = commit.written {
                        self.metrics.sink_rows_written.inc_by(w.rows);
                        self.metrics
                            .sink_statement_duration
                            .observe(w.duration.as_secs_f64());
                    }
                    return Ok(Ok((commit.outcomes, commit.seqs)));
                }
                Err(e) => {
                    if let Some(refused) = e.refused() {
                        return Ok(Err(refused));
                    }
                    self.metrics.gate_retries.inc();
                    let delay = backoff.next_delay();
                    if let DbError::Sink(_) = &e {
                        let code = e.sqlstate();
                        let class = code.as_deref().and_then(|c| c.get(..2)).unwrap_or("none");
                        self.metrics.sink_errors.with_label_values(&[class]).inc();
                    }
                    if e.is_transient() {
                        warn!(error = %e, retry_in_ms = delay.as_millis() as u64, rows,
                              "gate transaction failed; retrying the batch");
                    } else {
                        error!(error = %e, retry_in_ms = delay.as_millis() as u64, rows,
                               "gate transaction failed with a non-transient error; retrying the batch");
                    }
                    if !self.idle(delay, stop).await {
                        return Err(Abandoned);
                    }
                }
            }
        }
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
                  reason = why.reason(), error = %why, "still not taken (no usable event id, or the sink refused it); left where it is");
        }
        Ok(())
    }

    async fn dead_letter(
        &self,
        rejected: &[(InputMessage, Rejection)],
        stop: &CancellationToken,
    ) -> Result<(), Abandoned> {
        let mut pending: Vec<usize> = (0..rejected.len()).collect();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            let results = futures::future::join_all(pending.iter().map(|&i| {
                let (msg, why) = &rejected[i];
                dlq::send(&self.dlq, &self.dlq_topic, msg, why)
            }))
            .await;
            let mut failed = Vec::new();
            for (&i, result) in pending.iter().zip(results) {
                let (msg, why) = &rejected[i];
                match result {
                    Ok(_stripped) => events::DeadLettered { msg, why }.emit(&self.metrics),
                    Err(e) => {
                        let (scope, event_id) = why.identity();
                        error!(event_id, scope, topic = msg.topic, partition = msg.partition, offset = msg.offset,
                               dlq_topic = self.dlq_topic, error = %e, "dead-letter produce failed; retrying");
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
        headers: row.headers,
        header_names_utf8: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_hash_tells_payloads_apart() {
        assert_eq!(payload_hash(Some(b"a")), payload_hash(Some(b"a")));
        assert_ne!(payload_hash(Some(b"a")), payload_hash(Some(b"b")));
        assert_eq!(payload_hash(None).len(), 16);
    }
}
