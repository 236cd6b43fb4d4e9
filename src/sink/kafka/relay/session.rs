//! One relay session: the stream locks held on one Postgres connection, and what the
//! relay does with them (see the module above for the design).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Level};

use super::stream::{InFlight, Source, StreamState};
use super::{tail, Handoff, Intake, Relay};
use crate::kafka::{self, dlq};
use crate::model::identity::Rejection;
use crate::model::{header, InputMessage, Position};
use crate::store::relay::{self as sql, Checkpoint, Pending};
use crate::store::{self as db};

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
    pub(super) tail: Arc<BaseConsumer>,
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
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// How often idle held streams are compared with their counters.
const COUNTER_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How often streams nobody moves are looked for, and the outbox's slots reclaimed.
const ADOPT_EVERY: Duration = Duration::from_secs(5);
/// A stream whose checkpoint has not moved for this long, with rows past it, is adopted.
const ADOPT_AFTER: Duration = Duration::from_secs(10);
/// A stream held for this process's lanes that another relay holds is tried this often.
const LOCK_RETRY: Duration = Duration::from_millis(500);
/// Streams handed over by a replay (no assignment) are let go after this long idle.
const RELEASE_IDLE: Duration = Duration::from_secs(5);
/// How long a stopping relay goes on publishing what it holds.
const STOP_DRAIN: Duration = Duration::from_secs(10);
/// The longest a tail read may take. A read that stops making progress ends sooner (see
/// `tail::read`); this bounds one that goes on, e.g. from an old anchor after Postgres was
/// restored from a backup.
const TAIL_TIMEOUT: Duration = Duration::from_secs(600);

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
            tokio::select! {
                h = intake.recv(), if intake_open => match h {
                    Some(h) => self.take(h),
                    None => intake_open = false,
                },
                Some((stream, seq, result)) = self.acks.next(), if !self.acks.is_empty() => {
                    if let Err(e) = self.settle(&stream, seq, result).await {
                        return Exit::ConnectionLost(e);
                    }
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
                self.pump(stopping.is_some()).await
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
    async fn pump(&mut self, stopping: bool) -> Result<(), sqlx::Error> {
        let names: Vec<String> = self.streams.keys().cloned().collect();
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
                if s.waiting == 0 && due {
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
        s.waiting = 0;
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
                    s.waiting += 1;
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

    /// A send settled: the stream's unbroken acknowledged run moves on.
    async fn settle(
        &mut self,
        stream: &str,
        seq: i64,
        result: Result<(i32, i64), KafkaError>,
    ) -> Result<(), sqlx::Error> {
        let Some(s) = self.streams.get_mut(stream) else {
            return Ok(());
        };
        s.waiting = s.waiting.saturating_sub(1);
        if let Some(front) = s.in_flight.front() {
            let i = (seq - front.seq) as usize;
            if let Some(f) = s.in_flight.get_mut(i) {
                f.result = Some(result);
            }
        }
        self.advance(stream).await;
        Ok(())
    }

    /// Moves `published_seq` over the settled front of the stream's sends.
    async fn advance(&mut self, stream: &str) {
        let now = chrono::Utc::now();
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
                        self.relay
                            .metrics
                            .latency
                            .with_label_values(&["commit_to_ack"])
                            .observe(secs);
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

    /// Writes the checkpoints that moved, and the anchors of partitions about to get
    /// their first message of a stream.
    async fn checkpoint(&mut self) -> Result<(), sqlx::Error> {
        let mut new_anchors = Vec::new();
        for s in self.streams.values() {
            if !s.held {
                continue;
            }
            for (p, o) in &s.checkpoint.anchors {
                if *o == -1 {
                    new_anchors.push((s.name.clone(), *p));
                }
            }
        }
        // A new anchor: an offset of the partition before anything this stream sends
        // to it (see `sql::partition_floor`).
        for (name, partition) in new_anchors {
            let floor =
                sql::partition_floor(&self.relay.pool, &self.relay.output_topic, partition).await?;
            let s = self.streams.get_mut(&name).expect("stream");
            s.checkpoint.set_anchor(partition, floor);
            s.dirty = true;
        }
        let dirty: Vec<(String, Checkpoint)> = self
            .streams
            .values()
            .filter(|s| s.held && s.dirty)
            .map(|s| {
                let mut c = s.checkpoint.clone();
                c.anchors.retain(|(_, o)| *o >= 0);
                (s.name.clone(), c)
            })
            .collect();
        if dirty.is_empty() {
            return Ok(());
        }
        crate::crash::reached(crate::crash::Point::RelayAfterAck);
        sql::save_checkpoints(&mut self.conn, &self.owner, &dirty).await?;
        for (name, c) in &dirty {
            if let Some(s) = self.streams.get_mut(name) {
                if s.checkpoint.published_seq == c.published_seq {
                    s.dirty = s.checkpoint.anchors.iter().any(|(_, o)| *o < 0);
                }
            }
        }
        Ok(())
    }

    /// Idle held streams whose counter is past what they have: rows committed without a
    /// hand-off to this process (a gate retry whose first COMMIT did commit, the previous
    /// owner's last batch). They are read back.
    async fn compare_counters(&mut self) -> Result<(), sqlx::Error> {
        // The streams of the partitions assigned here are taken at once, not when their
        // first rows come: what the previous owner left unpublished goes out now.
        if let Some(a) = &self.relay.assignment {
            for name in a.streams() {
                let output_topic = &self.relay.output_topic;
                self.streams
                    .entry(name.clone())
                    .or_insert_with(|| StreamState::new(name, Source::Local, output_topic));
            }
        }
        let idle: Vec<String> = self
            .streams
            .values()
            .filter(|s| s.held && s.ready && s.idle())
            .map(|s| s.name.clone())
            .collect();
        if idle.is_empty() {
            return Ok(());
        }
        for (name, last) in sql::last_seqs(&self.relay.pool, &idle).await? {
            if let Some(s) = self.streams.get_mut(&name) {
                if last > s.queued_through && s.idle() {
                    s.behind = true;
                }
            }
        }
        Ok(())
    }

    /// Lets go of streams this process no longer writes: partitions rebalanced away,
    /// adopted streams caught up, a replay's streams once idle.
    async fn release(&mut self) -> Result<(), sqlx::Error> {
        let mut done = Vec::new();
        for s in self.streams.values() {
            if !s.held || !s.idle() || s.dirty {
                continue;
            }
            let keep = match s.source {
                Source::Local => match &self.relay.assignment {
                    Some(a) => a.contains(&s.name),
                    None => s.last_active.elapsed() < RELEASE_IDLE,
                },
                Source::Adopted => false,
            };
            if !keep {
                done.push(s.name.clone());
            }
        }
        let schema = self.relay.cfg.db.schema.clone();
        for name in done {
            sql::unlock_stream(&mut self.conn, &schema, &name).await?;
            self.streams.remove(&name);
            debug!(stream = name, "stream let go");
        }
        Ok(())
    }

    /// Adopts streams with rows past their checkpoint that nobody moves, reclaims the
    /// outbox's slots, and moves rows the previous version left in the old outbox.
    async fn adopt(&mut self) -> Result<(), sqlx::Error> {
        for name in sql::orphans(&self.relay.pool, ADOPT_AFTER).await? {
            if !self.streams.contains_key(&name) {
                info!(
                    stream = name,
                    "adopting a stream with unpublished rows that no relay holds"
                );
                self.streams.insert(
                    name.clone(),
                    StreamState::new(name, Source::Adopted, &self.relay.output_topic),
                );
            }
        }
        match sql::reclaim(
            &self.relay.pool,
            &self.relay.cfg.db.schema,
            self.relay.settings.rotate_every,
        )
        .await
        {
            Ok(r) => {
                if !r.truncated.is_empty() || r.rotated_to.is_some() {
                    debug!(truncated = ?r.truncated, rotated_to = ?r.rotated_to, "outbox slots reclaimed");
                }
                self.relay
                    .metrics
                    .outbox_slots_truncated
                    .inc_by(r.truncated.len() as u64);
            }
            // A lock timeout (a long read, a slow gate transaction) only postpones it.
            Err(e) => debug!(error = %e, "outbox reclaim postponed"),
        }
        self.adopt_legacy().await
    }

    async fn adopt_legacy(&mut self) -> Result<(), sqlx::Error> {
        let any: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM outbox)")
            .fetch_one(&self.relay.pool)
            .await?;
        if !any {
            return Ok(());
        }
        if !self.legacy_lock {
            // The previous version's relay lock: once held here (for the session), its
            // relays stand by and the rows they would publish move to streams.
            self.legacy_lock = sqlx::query_scalar(
                "SELECT pg_try_advisory_lock($1, hashtext('relay' || ':' || $2))",
            )
            .bind(db::ADVISORY_LOCK_CLASS)
            .bind(&self.relay.cfg.db.schema)
            .fetch_one(&mut self.conn)
            .await?;
            if !self.legacy_lock {
                return Ok(());
            }
        }
        let moved = sql::adopt_legacy(&mut self.conn, 10_000).await?;
        if moved > 0 {
            info!(
                rows = moved,
                "moved rows of the previous version's outbox into upgrade: streams"
            );
        }
        Ok(())
    }

    fn assigned(&self, stream: &str) -> bool {
        self.relay
            .assignment
            .as_ref()
            .map_or(true, |a| a.contains(stream))
    }
}

/// Enqueues one row with the producer.
fn produce(
    relay: &Relay,
    stream: &str,
    row: &Pending,
    partition: i32,
) -> Result<rdkafka::producer::DeliveryFuture, KafkaError> {
    let source = Position {
        topic: row.source_topic.clone(),
        partition: row.source_partition,
        offset: row.source_offset,
    }
    .to_string();
    let position = tail::position(stream, row.seq);
    let mut hs = OwnedHeaders::new_with_capacity(row.headers.len() + 3);
    for (k, v) in &row.headers {
        if k == header::EVENT_ID || k == header::SOURCE || k == header::POSITION {
            continue;
        }
        hs = hs.insert(Header {
            key: k,
            value: v.as_deref(),
        });
    }
    hs = hs
        .insert(Header {
            key: header::EVENT_ID,
            value: Some(row.event_id.as_bytes()),
        })
        .insert(Header {
            key: header::SOURCE,
            value: Some(source.as_bytes()),
        })
        .insert(Header {
            key: header::POSITION,
            value: Some(position.as_bytes()),
        });
    let mut record: FutureRecord<'_, Vec<u8>, Vec<u8>> = FutureRecord::to(&relay.output_topic)
        .partition(partition)
        .headers(hs);
    if let Some(k) = &row.key {
        record = record.key(k);
    }
    if let Some(v) = &row.value {
        record = record.payload(v);
    }
    if let Some(ts) = row.source_timestamp_ms {
        record = record.timestamp(ts);
    }
    relay.producer.send_result(record).map_err(|(e, _)| e)
}

/// Sends a row the output topic refused for good to the dead-letter topic (reason
/// `output_refused`). Returns whether it is there.
async fn dead_letter(relay: &Relay, stream: &str, row: &Pending, error: String) -> bool {
    let msg = InputMessage {
        topic: row.source_topic.clone(),
        partition: row.source_partition,
        offset: row.source_offset,
        timestamp_ms: row.source_timestamp_ms,
        key: row.key.clone(),
        value: row.value.clone(),
        headers: row.headers.clone(),
        header_names_utf8: true,
    };
    let why = Rejection::OutputRefused { error };
    let dlq_topic = &relay.cfg.kafka.dlq_topic;
    match dlq::send(&relay.producer, dlq_topic, &msg, &why).await {
        Ok(_stripped) => {
            relay
                .metrics
                .dead_lettered
                .with_label_values(&[why.reason()])
                .inc();
            pending_event!(Level::ERROR, stream, row, error = %why, dlq_topic,
                "the output topic refused this event for good; it is in the dead-letter topic");
            true
        }
        Err(e) => {
            pending_event!(Level::WARN, stream, row, error = %e,
                "dead-letter produce failed; the row stays in the outbox and is tried again");
            false
        }
    }
}
