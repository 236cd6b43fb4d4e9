//! One relay session: the stream locks held on one Postgres connection, and what the
//! relay does with them (see the module above for the design).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use rdkafka::error::KafkaError;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Level};

use super::output::{dead_letter, produce};
use super::stream::{InFlight, Source, StreamState};
use super::{tail, Handoff, Intake, Relay};
use crate::kafka;
use crate::store::relay::{self as sql, Pending};

/// Why a relay session ended.
pub(super) enum Exit {
    Stopped,
    ConnectionLost(sqlx::Error),
}

type Ack = BoxFuture<'static, (String, i64, Result<(i32, i64), KafkaError>)>;

/// What a relay session keeps.
pub(super) struct Session<'a> {
    pub(super) relay: &'a Relay,
    pub(super) conn: PgConnection,
    pub(super) owner: String,
    pub(super) partitions: i32,
    pub(super) streams: HashMap<String, StreamState>,
    pub(super) acks: FuturesUnordered<Ack>,
    pub(super) tail: Arc<super::tail::TailReader>,
    pub(super) legacy_lock: bool,
    pub(super) was_empty: bool,
}

/// The intake, borrowed by one session at a time.
pub(super) struct IntakeRef<'a>(pub(super) &'a mut Intake);

impl IntakeRef<'_> {
    async fn recv(&mut self) -> Option<Handoff> {
        let h = self.0.rx.recv().await?;
        self.0.in_channel.fetch_sub(h.bytes, Ordering::AcqRel);
        Some(h)
    }
}

/// How often checkpoints are written, at most.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// How often idle held streams are compared with their counters.
pub(super) const COUNTER_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How often streams nobody moves are looked for.
pub(super) const ADOPT_EVERY: Duration = Duration::from_secs(5);
/// A stream whose checkpoint has not moved for this long, with rows past it, is adopted.
pub(super) const ADOPT_AFTER: Duration = Duration::from_secs(10);
/// A stream held for this process's lanes that another relay holds is tried this often.
pub(super) const LOCK_RETRY: Duration = Duration::from_millis(500);
/// Streams handed over by a replay (no assignment) are let go after this long idle.
pub(super) const RELEASE_IDLE: Duration = Duration::from_secs(5);
/// How long a stopping relay goes on publishing what it holds.
pub(super) const STOP_DRAIN: Duration = Duration::from_secs(10);
/// The longest a tail read may take. A read that stops making progress ends sooner (see
/// `tail::read`); this bounds one that goes on, e.g. from an old anchor after Postgres was
/// restored from a backup.
pub(super) const TAIL_TIMEOUT: Duration = Duration::from_secs(600);

impl Session<'_> {
    pub(super) async fn run(
        &mut self,
        intake: &mut IntakeRef<'_>,
        stop: &CancellationToken,
    ) -> Exit {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_checkpoint = Instant::now();
        let mut last_counter_check = Instant::now();
        let mut last_adopt: Option<Instant> = None;
        let mut stopping: Option<Instant> = None;
        let mut intake_open = true;
        loop {
            // Acknowledgements move their own streams on (and those waiting for room in
            // the producer); the others are pumped on the next hand-off or tick.
            let mut only: Option<Vec<String>> = None;
            tokio::select! {
                h = intake.recv(), if intake_open => match h {
                    Some(h) => self.take(h),
                    None => intake_open = false,
                },
                Some(first) = self.acks.next(), if !self.acks.is_empty() => {
                    // They come a produce request at a time: the others already in are
                    // recorded too, and each of their streams advances once, so that one
                    // pass of this loop serves a request rather than a message.
                    let mut acked: Vec<String> = Vec::new();
                    let mut next = Some(first);
                    while let Some((stream, seq, result)) = next {
                        self.record(&stream, seq, result);
                        if !acked.contains(&stream) {
                            acked.push(stream);
                        }
                        next = self.acks.next().now_or_never().flatten();
                    }
                    for stream in &acked {
                        self.advance(stream).await;
                    }
                    only = Some(acked);
                }
                _ = tick.tick() => {}
                _ = stop.cancelled(), if stopping.is_none() => stopping = Some(Instant::now()),
            }
            let result: Result<(), sqlx::Error> = async {
                let waited = Instant::now();
                if last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
                    self.checkpoint().await?;
                    last_checkpoint = Instant::now();
                }
                if last_counter_check.elapsed() >= COUNTER_CHECK_EVERY {
                    self.compare_counters().await?;
                    self.release().await?;
                    last_counter_check = Instant::now();
                }
                if stopping.is_none() && !last_adopt.is_some_and(|t| t.elapsed() < ADOPT_EVERY) {
                    self.adopt().await?;
                    last_adopt = Some(Instant::now());
                }
                self.relay
                    .metrics
                    .relay_postgres_seconds
                    .inc_by(waited.elapsed().as_secs_f64());
                self.pump(stopping.is_some(), only).await
            }
            .await;
            if let Err(e) = result {
                return Exit::ConnectionLost(e);
            }
            let held = self.streams.values().filter(|s| s.held).count();
            self.relay.metrics.relay_active.set(i64::from(held > 0));
            self.relay.metrics.relay_streams.set(held as i64);
            let empty = self
                .streams
                .values()
                .filter(|s| s.held)
                .all(StreamState::idle);
            if empty && !self.was_empty {
                // Recorded first, so the gauges read right after see it.
                if let Err(e) = self.checkpoint().await {
                    return Exit::ConnectionLost(e);
                }
                if let Some(emptied) = &self.relay.emptied {
                    emptied.notify_one();
                }
            }
            self.was_empty = empty;
            // Stopping: done once what this relay holds is published; a stream it cannot
            // publish now (the output topic refuses, the broker is away) stays in the
            // outbox for the next relay, and so does anything after STOP_DRAIN.
            let stuck = self.streams.values().any(|s| s.held && s.failed);
            if stopping.is_some_and(|t| empty || stuck || t.elapsed() > STOP_DRAIN) {
                if let Err(e) = self.checkpoint().await {
                    return Exit::ConnectionLost(e);
                }
                return Exit::Stopped;
            }
        }
    }

    /// A hand-off from the gate lanes: queued when it follows what the stream has, else
    /// the stream reads back from the outbox.
    fn take(&mut self, h: Handoff) {
        let budget = self.room();
        let output_topic = &self.relay.output_topic;
        let s = self
            .streams
            .entry(h.stream.clone())
            .or_insert_with(|| StreamState::new(h.stream, Source::Local, output_topic));
        s.source = Source::Local;
        s.last_active = Instant::now();
        if !s.ready {
            return;
        }
        if h.rows.is_empty() {
            // Dropped for the budget: whatever follows is read back, past the parked rows.
            s.behind = true;
            s.parked.clear();
            s.parked_bytes = 0;
            return;
        }
        s.enqueue(h.rows, budget);
    }

    /// Takes streams, reads back, and sends what is queued.
    async fn pump(&mut self, stopping: bool, only: Option<Vec<String>>) -> Result<(), sqlx::Error> {
        // After acknowledgements: their streams, and the streams with rows queued (the
        // producer's queue has room again); otherwise every stream.
        let names: Vec<String> = self
            .streams
            .values()
            .filter(|s| only.as_ref().map_or(true, |o| o.contains(&s.name)) || !s.queue.is_empty())
            .map(|s| s.name.clone())
            .collect();
        for name in names {
            let Some(s) = self.streams.get(&name) else {
                continue;
            };
            if !s.held {
                if stopping || s.last_lock_try.is_some_and(|t| t.elapsed() < LOCK_RETRY) {
                    continue;
                }
                self.acquire(&name).await?;
                continue;
            }
            if s.failed {
                let due = !s.last_lock_try.is_some_and(|t| t.elapsed() < LOCK_RETRY);
                if !s.waiting() && due {
                    self.take_over(&name).await?;
                }
                continue;
            }
            if s.behind && s.queue.is_empty() {
                self.read_back(&name).await?;
            }
            self.send(&name);
            self.advance(&name).await;
        }
        Ok(())
    }

    /// Tries the stream's lock; holding it, takes the stream over.
    async fn acquire(&mut self, name: &str) -> Result<(), sqlx::Error> {
        let schema = self.relay.cfg.db.schema.clone();
        let waited = Instant::now();
        let locked = sql::try_lock_stream(&mut self.conn, &schema, name).await?;
        self.relay
            .metrics
            .relay_postgres_seconds
            .inc_by(waited.elapsed().as_secs_f64());
        let assigned = self.assigned(name);
        let s = self.streams.get_mut(name).expect("stream");
        s.last_lock_try = Some(Instant::now());
        if !locked {
            // Another relay holds it: the previous owner of a rebalanced partition that
            // has not let go yet, or one that adopted it. Keep trying while this
            // process's lanes write the stream; otherwise it is not ours to publish.
            if !(s.source == Source::Local && assigned) {
                self.streams.remove(name);
            }
            return Ok(());
        }
        s.held = true;
        debug!(stream = name, "stream lock taken");
        let cp = sql::load_checkpoint(&mut self.conn, name).await?;
        let s = self.streams.get_mut(name).expect("stream");
        if let Some(cp) = cp {
            if cp.output_topic != self.relay.output_topic {
                warn!(stream = name, previous = cp.output_topic, output_topic = self.relay.output_topic,
                      "this stream was published to another output topic; its rows from here on go to the new one");
                s.checkpoint.published_seq = cp.published_seq;
                s.checkpoint.anchors.clear();
                s.dirty = true;
            } else {
                s.checkpoint = cp;
            }
        }
        self.take_over(name).await
    }

    /// Reads what the output topic holds of the stream past its checkpoint, so that the
    /// rows from there on are published unless they already are.
    async fn take_over(&mut self, name: &str) -> Result<(), sqlx::Error> {
        let s = self.streams.get_mut(name).expect("stream");
        s.in_flight.clear();
        s.queue.clear();
        s.queued_bytes = 0;
        s.parked.clear();
        s.parked_bytes = 0;
        s.in_topic.clear();
        let anchors = s.checkpoint.anchors.clone();
        let published = s.checkpoint.published_seq;
        let mut in_topic = HashMap::new();
        for (partition, anchor) in anchors {
            let consumer = self.tail.clone();
            let topic = self.relay.output_topic.clone();
            let stream = name.to_string();
            let read = tokio::task::spawn_blocking(move || {
                tail::read(&consumer, &topic, partition, anchor, &stream, TAIL_TIMEOUT)
            })
            .await
            .expect("tail read does not panic");
            match read {
                Ok(t) => {
                    if let Some(why) = &t.anchor_lost {
                        warn!(stream = name, "{why}; rows of this stream published after the checkpoint may be published again");
                    }
                    for (seq, (offset, event_id)) in t.found {
                        if seq > published {
                            in_topic.insert(seq, (partition, offset, event_id));
                        }
                    }
                }
                Err(e) => {
                    // Publishing without knowing the tail could repeat messages: retry.
                    warn!(
                        stream = name,
                        error = e,
                        "cannot read the output topic's tail; trying again"
                    );
                    let s = self.streams.get_mut(name).expect("stream");
                    s.failed = true;
                    s.ready = false;
                    s.last_lock_try = Some(Instant::now());
                    return Ok(());
                }
            }
        }
        let s = self.streams.get_mut(name).expect("stream");
        if !in_topic.is_empty() {
            info!(
                stream = name,
                published_seq = published,
                already_in_topic = in_topic.len(),
                "taking over a stream: these rows past its checkpoint are in the output topic already and are not sent again"
            );
        }
        s.in_topic = in_topic;
        s.queued_through = published;
        s.behind = true;
        s.failed = false;
        s.ready = true;
        self.relay.metrics.relay_takeovers.inc();
        Ok(())
    }

    /// Reads the stream's next rows back from the outbox.
    async fn read_back(&mut self, name: &str) -> Result<(), sqlx::Error> {
        // One budget for everything queued, over all streams: a relay holding a hundred
        // partitions' backlogs holds no more than one holding one.
        let room = self.room();
        let budget = self.relay.settings.batch_max_bytes;
        if room < budget / 4 {
            return Ok(());
        }
        let (after, until) = {
            let s = &self.streams[name];
            (s.queued_through, s.read_back_until())
        };
        let max_rows = match until {
            Some(until) => (until - after).clamp(0, self.relay.settings.batch_size as i64) as usize,
            None => self.relay.settings.batch_size,
        };
        let waited = Instant::now();
        let rows = sql::read_rows(&self.relay.pool, name, after, max_rows.max(1), room).await?;
        self.relay
            .metrics
            .relay_postgres_seconds
            .inc_by(waited.elapsed().as_secs_f64());
        self.relay
            .metrics
            .relay_rows_read_back
            .inc_by(rows.len() as u64);
        let s = self.streams.get_mut(name).expect("stream");
        let complete =
            rows.len() < max_rows && rows.iter().map(Pending::size).sum::<usize>() < room / 2;
        s.read_back(rows, complete);
        Ok(())
    }

    /// Bytes the relay may still queue, over all its streams.
    fn room(&self) -> usize {
        let queued: usize = self.streams.values().map(|s| s.held_bytes()).sum();
        self.relay.settings.batch_max_bytes.saturating_sub(queued)
    }

    /// Sends the stream's queued rows, in seq order, while the producer takes them.
    fn send(&mut self, name: &str) {
        let partitions = self.partitions;
        let relay = self.relay;
        let s = self.streams.get_mut(name).expect("stream");
        while let Some(row) = s.queue.front() {
            let partition = row.source_partition.rem_euclid(partitions);
            if s.checkpoint.anchor(partition).is_none() {
                // The first message of this stream into this partition: its anchor is
                // written (by the next checkpoint) before the message is sent.
                s.dirty = true;
                s.checkpoint.set_anchor(partition, -1);
                return;
            }
            if s.checkpoint.anchor(partition) == Some(-1) {
                return;
            }
            // Already in the topic: the same seq with the same event. (After a restore of
            // Postgres from a backup a seq can come back with another event: that one is
            // not published yet.)
            let published = s
                .in_topic
                .get(&row.seq)
                .filter(|(_, _, id)| *id == row.event_id)
                .map(|(p, offset, _)| (*p, *offset));
            if let Some((p, offset)) = published {
                let row = s.queue.pop_front().expect("front");
                s.queued_bytes -= row.size();
                s.in_flight.push_back(InFlight {
                    seq: row.seq,
                    result: Some(Ok((p, offset))),
                    row: None,
                    sent_at: Instant::now(),
                });
                continue;
            }
            match produce(relay, name, row, partition) {
                Ok(delivery) => {
                    let mut row = s.queue.pop_front().expect("front");
                    s.queued_bytes -= row.size();
                    // The producer has its own copy; what stays is for the log line.
                    (row.key, row.value, row.headers) = (None, None, Vec::new());
                    let seq = row.seq;
                    let stream = name.to_string();
                    s.in_flight.push_back(InFlight {
                        seq,
                        result: None,
                        row: Some(row),
                        sent_at: Instant::now(),
                    });
                    self.acks.push(
                        async move {
                            let result = match delivery.await {
                                Ok(Ok(d)) => Ok((d.partition, d.offset)),
                                Ok(Err((e, _))) => Err(e),
                                Err(_canceled) => Err(KafkaError::Canceled),
                            };
                            (stream, seq, result)
                        }
                        .boxed(),
                    );
                }
                Err(e)
                    if e.rdkafka_error_code()
                        == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                {
                    return;
                }
                Err(e) => {
                    let row = s.queue.pop_front().expect("front");
                    s.queued_bytes -= row.size();
                    s.in_flight.push_back(InFlight {
                        seq: row.seq,
                        result: Some(Err(e)),
                        row: Some(row),
                        sent_at: Instant::now(),
                    });
                    break;
                }
            }
        }
        // Sends refused before they were queued settle here, in order.
        if s.in_flight.front().is_some_and(|f| f.result.is_some()) {
            s.dirty = true;
        }
    }

    /// Records the broker's answer to one send; [`Session::advance`] then moves the
    /// stream on.
    fn record(&mut self, stream: &str, seq: i64, result: Result<(i32, i64), KafkaError>) {
        let Some(s) = self.streams.get_mut(stream) else {
            return;
        };
        if let Some(front) = s.in_flight.front() {
            let i = (seq - front.seq) as usize;
            if let Some(f) = s.in_flight.get_mut(i) {
                f.result = Some(result);
            }
        }
    }

    /// Moves `published_seq` over the settled front of the stream's sends.
    async fn advance(&mut self, stream: &str) {
        let now = chrono::Utc::now();
        let commit_to_ack = self
            .relay
            .metrics
            .latency
            .with_label_values(&["commit_to_ack"]);
        loop {
            let Some(s) = self.streams.get_mut(stream) else {
                return;
            };
            if s.failed {
                return;
            }
            let Some(front) = s.in_flight.front() else {
                return;
            };
            let Some(result) = &front.result else {
                return;
            };
            match result {
                Ok((partition, offset)) => {
                    let (partition, offset) = (*partition, *offset);
                    let f = s.in_flight.pop_front().expect("front");
                    s.checkpoint.published_seq = f.seq;
                    s.checkpoint.set_anchor(partition, offset + 1);
                    s.dirty = true;
                    if let Some(row) = f.row {
                        self.relay
                            .metrics
                            .relay_publish_duration
                            .observe(f.sent_at.elapsed().as_secs_f64());
                        self.relay.metrics.events_forwarded.inc();
                        let secs =
                            (now - row.committed_at).num_milliseconds().max(0) as f64 / 1000.0;
                        commit_to_ack.observe(secs);
                        pending_event!(Level::DEBUG, stream, row, "forwarded");
                    }
                }
                Err(e) if kafka::is_refused_record(e) => {
                    let error = e.to_string();
                    let f = s.in_flight.pop_front().expect("front");
                    let Some(mut row) = f.row else { continue };
                    if row.value.is_none() && row.key.is_none() && row.headers.is_empty() {
                        // Sent, so its payload went to the producer: read it back.
                        let again = sql::read_rows(&self.relay.pool, stream, f.seq - 1, 1, 1)
                            .await
                            .unwrap_or_default();
                        if let Some(r) = again.into_iter().find(|r| r.seq == f.seq) {
                            row = r;
                        }
                    }
                    // Dead-lettered before anything after it counts as published.
                    if dead_letter(self.relay, stream, &row, error).await {
                        let s = self.streams.get_mut(stream).expect("stream");
                        s.checkpoint.published_seq = f.seq;
                        s.dirty = true;
                    } else {
                        let s = self.streams.get_mut(stream).expect("stream");
                        s.in_flight.push_front(InFlight {
                            seq: f.seq,
                            result: Some(Err(KafkaError::Canceled)),
                            row: Some(row),
                            sent_at: Instant::now(),
                        });
                        s.failed = true;
                        self.relay.metrics.relay_failures.inc();
                        return;
                    }
                }
                Err(e) => {
                    if let Some(row) = &front.row {
                        pending_event!(Level::WARN, stream, row, error = %e,
                            "output produce failed; the stream is taken over again once its sends in flight settle");
                    }
                    s.failed = true;
                    self.relay.metrics.relay_failures.inc();
                    return;
                }
            }
        }
    }

    fn assigned(&self, stream: &str) -> bool {
        self.relay
            .assignment
            .as_ref()
            .map_or(true, |a| a.contains(stream))
    }
}
