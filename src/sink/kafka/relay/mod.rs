//! The relay: publishes committed outbox rows to the output topic exactly once, without
//! Kafka transactions.
//!
//! **Streams.** The gate numbers each stream's first sightings 1, 2, 3, ... in the gate
//! transaction (a stream is the input partition, see [`crate::store::outbox`]): seq order
//! is commit order and no seq is skipped. One relay at a time publishes a stream: the one
//! holding the stream's advisory lock, normally the replica whose gate lane owns the input
//! partition, so relay capacity grows with replicas. Every message carries
//! `kdedup-position: stream@seq`; an output partition may hold several streams.
//!
//! **Hot path.** A gate lane hands its committed rows to this process's relay in memory
//! ([`Feed`]); the relay produces them in seq order through the idempotent producer
//! (which keeps order within a partition) and never reads them back or deletes them. The
//! outbox is the durable copy for recovery; its slots are emptied with TRUNCATE once
//! every row in them is published ([`crate::store::relay::reclaim`]).
//!
//! **Checkpoints.** A few times a second the relay records per stream the last seq of the
//! unbroken acknowledged run (`published_seq`) and, per output partition, the offset just
//! after that message (the anchor). Whatever the stream put in the topic past
//! `published_seq` lies after the anchor.
//!
//! **Taking a stream over** (a new holder, or this one after a failed produce): read the
//! output partition from the anchor to its end, note the seqs of this stream found there,
//! then publish the rows past `published_seq` that are not among them. Nothing is
//! published twice and nothing is skipped, whatever the previous holder managed to send
//! before it died. The assumption: a holder that lost its lock sends nothing more. A
//! crashed process sends nothing; a live one that loses its Postgres session stops
//! sending before it can take any stream again (its in-flight produces settle first),
//! and the lock passes only after Postgres has dropped that session.
//!
//! **Gaps.** A handed-over row whose seq is not the next one expected means rows of the
//! stream were committed elsewhere (a rebalanced partition's previous owner, a replay, a
//! gate retry whose first COMMIT did commit): the relay reads the missing seqs back from
//! the outbox. An idle stream is compared with its counter every second for the same
//! reason, and streams nobody holds are adopted by any relay.

mod tail;

pub use tail::{parse_position, position};

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Level};

use crate::kafka::{self, dlq, Assignment, Producer};
use crate::metrics::Metrics;
use crate::model::identity::Rejection;
use crate::model::{header, InputMessage, Position};
use crate::retry::Backoff;
use crate::settings::{RelaySettings, RunSettings};
use crate::store::lock::sleep_or_stop;
use crate::store::relay::{self as sql, Checkpoint, Pending};
use crate::store::{self as db, outbox};

/// Logs an event about one outbox row with the fields every event line carries: the event
/// id, its scope, its source position and its place in its stream.
macro_rules! pending_event {
    ($level:expr, $stream:expr, $row:ident, $($rest:tt)+) => {
        tracing::event!(
            $level,
            event_id = $row.event_id,
            scope = $row.scope,
            topic = $row.source_topic,
            partition = $row.source_partition,
            offset = $row.source_offset,
            stream = $stream,
            seq = $row.seq,
            $($rest)+
        )
    };
}

/// Rows one gate transaction committed for one stream, in seq order.
pub struct Handoff {
    pub stream: String,
    pub rows: Vec<Pending>,
    bytes: usize,
}

/// The gate lanes' side of the in-memory hand-off. Past its byte budget it hands over
/// only the stream's name: the relay then reads those rows back from the outbox.
#[derive(Clone)]
pub struct Feed {
    tx: mpsc::UnboundedSender<Handoff>,
    in_channel: Arc<AtomicUsize>,
    budget: usize,
}

/// The relay's side of the hand-off.
pub struct Intake {
    rx: mpsc::UnboundedReceiver<Handoff>,
    in_channel: Arc<AtomicUsize>,
}

/// A hand-off channel holding at most `budget` bytes of rows.
pub fn channel(budget: usize) -> (Feed, Intake) {
    let (tx, rx) = mpsc::unbounded_channel();
    let in_channel = Arc::new(AtomicUsize::new(0));
    (
        Feed {
            tx,
            in_channel: in_channel.clone(),
            budget,
        },
        Intake { rx, in_channel },
    )
}

impl Feed {
    /// Hands `rows` (of one stream, in seq order) to the relay; never waits.
    pub fn hand_over(&self, stream: String, mut rows: Vec<Pending>) {
        let mut bytes: usize = rows.iter().map(Pending::size).sum();
        if self.in_channel.load(Ordering::Acquire) + bytes > self.budget {
            // The relay is behind: it reads these back from the outbox.
            rows.clear();
            bytes = 0;
        }
        self.in_channel.fetch_add(bytes, Ordering::AcqRel);
        let _ = self.tx.send(Handoff {
            stream,
            rows,
            bytes,
        });
    }
}

pub struct Relay {
    pub settings: RelaySettings,
    pub cfg: Arc<RunSettings>,
    pub pool: PgPool,
    pub output_topic: String,
    pub producer: Producer,
    pub metrics: Metrics,
    /// Taken by [`Relay::run`].
    pub intake: Option<Intake>,
    /// `Some` in `kdedup run`: streams of partitions no longer assigned are let go.
    pub assignment: Option<Arc<Assignment>>,
    /// Told when nothing waits any more, so the backlog gauge drops at once.
    pub emptied: Option<Arc<Notify>>,
}

/// Why a relay session ended.
enum Exit {
    Stopped,
    ConnectionLost(sqlx::Error),
}

/// How a stream came to this relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Handed over by this process's gate lanes.
    Local,
    /// Adopted: rows past its checkpoint and nobody moving it.
    Adopted,
}

/// One message sent and not yet settled.
struct InFlight {
    seq: i64,
    /// `Some(Ok((partition, offset)))` acknowledged, `Some(Err)` failed; `None` waiting.
    result: Option<Result<(i32, i64), KafkaError>>,
    row: Option<Pending>,
    sent_at: Instant,
}

struct StreamState {
    name: String,
    source: Source,
    held: bool,
    /// Taken over: every seq up to `queued_through` is published, in flight or queued.
    ready: bool,
    /// Last seq sent or queued; the next one expected is this + 1.
    queued_through: i64,
    /// Rows committed past `queued_through` may exist only in the outbox: read them back
    /// once the queue is empty.
    behind: bool,
    queue: VecDeque<Pending>,
    queued_bytes: usize,
    in_flight: VecDeque<InFlight>,
    waiting: usize,
    /// A send failed: nothing more is sent until every send in flight has settled; the
    /// stream is then taken over again (the tail shows which of them landed).
    failed: bool,
    /// Seqs already in the topic (found in the tail), with their offsets.
    in_topic: HashMap<i64, (i32, i64)>,
    checkpoint: Checkpoint,
    dirty: bool,
    last_lock_try: Option<Instant>,
    last_active: Instant,
}

impl StreamState {
    fn new(name: String, source: Source, output_topic: &str) -> Self {
        StreamState {
            name,
            source,
            held: false,
            ready: false,
            queued_through: 0,
            behind: true,
            queue: VecDeque::new(),
            queued_bytes: 0,
            in_flight: VecDeque::new(),
            waiting: 0,
            failed: false,
            in_topic: HashMap::new(),
            checkpoint: Checkpoint {
                output_topic: output_topic.to_string(),
                ..Default::default()
            },
            dirty: false,
            last_lock_try: None,
            last_active: Instant::now(),
        }
    }

    fn idle(&self) -> bool {
        self.queue.is_empty() && self.in_flight.is_empty() && !self.behind
    }

    /// Queues `rows` that follow what the stream has, within `room` bytes (always at
    /// least one row when the queue is empty); past a gap or past `room`, the stream reads
    /// back from the outbox instead.
    fn enqueue(&mut self, rows: Vec<Pending>, room: usize) {
        let mut added = 0usize;
        for row in rows {
            if row.seq <= self.queued_through {
                continue;
            }
            if self.behind || row.seq != self.queued_through + 1 {
                // A gap: the missing seqs were committed elsewhere. Read back from here.
                self.behind = true;
                return;
            }
            if added + row.size() > room && !self.queue.is_empty() {
                self.behind = true;
                return;
            }
            added += row.size();
            self.queued_through = row.seq;
            self.queued_bytes += row.size();
            self.queue.push_back(row);
        }
    }
}

type Ack = BoxFuture<'static, (String, i64, Result<(i32, i64), KafkaError>)>;

/// What a relay session keeps.
struct Session<'a> {
    relay: &'a Relay,
    conn: PgConnection,
    owner: String,
    partitions: i32,
    streams: HashMap<String, StreamState>,
    acks: FuturesUnordered<Ack>,
    tail: Arc<BaseConsumer>,
    legacy_lock: bool,
    was_empty: bool,
}

impl Relay {
    /// The relay of `cfg`'s sidecar (or replay), publishing to `output_topic`.
    pub fn new(
        cfg: &RunSettings,
        pool: PgPool,
        output_topic: &str,
        producer: Producer,
        metrics: Metrics,
        intake: Intake,
    ) -> Self {
        Relay {
            settings: cfg.relay.clone(),
            cfg: Arc::new(cfg.clone()),
            pool,
            output_topic: output_topic.to_string(),
            producer,
            metrics,
            intake: Some(intake),
            assignment: None,
            emptied: None,
        }
    }

    /// Runs until `stop` fires; then publishes what it holds and returns.
    pub async fn run(mut self, stop: CancellationToken) {
        let Some(mut intake) = self.intake.take() else {
            return;
        };
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let Some(partitions) = self.output_partitions(&stop).await else {
            return;
        };
        let tail = match tail::reader(&self.cfg) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(error = %e, "cannot create the relay's tail reader; the relay does not run");
                return;
            }
        };
        let owner = format!(
            "{}:{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
            std::process::id()
        );
        loop {
            let conn = tokio::select! {
                _ = stop.cancelled() => return,
                c = db::dedicated_connection(&self.cfg.db) => c,
            };
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "relay cannot reach Postgres; retrying");
                    sleep_or_stop(backoff.next_delay(), &stop).await;
                    continue;
                }
            };
            backoff.reset();
            let mut session = Session {
                relay: &self,
                conn,
                owner: owner.clone(),
                partitions,
                streams: HashMap::new(),
                acks: FuturesUnordered::new(),
                tail: tail.clone(),
                legacy_lock: false,
                was_empty: false,
            };
            let exit = session.run(&mut IntakeRef(&mut intake), &stop).await;
            let Session { acks, .. } = session;
            // Whatever is still in flight settles before any stream is taken again, so
            // the next take-over reads a tail that no longer changes.
            acks.collect::<Vec<_>>().await;
            self.metrics.relay_active.set(0);
            match exit {
                Exit::Stopped => {
                    info!("relay stopped");
                    return;
                }
                Exit::ConnectionLost(e) => {
                    warn!(error = %e, "relay lost its Postgres connection (and its stream locks); taking them again");
                    sleep_or_stop(backoff.next_delay(), &stop).await;
                    if stop.is_cancelled() {
                        return;
                    }
                }
            }
        }
    }

    async fn output_partitions(&self, stop: &CancellationToken) -> Option<i32> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let producer = self.producer.clone();
            let brokers = self.cfg.kafka.brokers.clone();
            let topic = self.output_topic.clone();
            let found = tokio::task::spawn_blocking(move || {
                kafka::topics::partition_count(&producer, &brokers, &topic, Duration::from_secs(5))
            })
            .await
            .expect("metadata task does not panic");
            match found {
                Ok(Some(n)) => return Some(n as i32),
                Ok(None) => warn!(
                    output_topic = self.output_topic,
                    "output topic does not exist; create it (or leave KDEDUP_CREATE_TOPICS on)"
                ),
                Err(e) => warn!(error = %e, "cannot read output topic metadata; retrying"),
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }
}

/// The intake, borrowed by one session at a time.
struct IntakeRef<'a>(&'a mut Intake);

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
/// The longest a tail read may take.
const TAIL_TIMEOUT: Duration = Duration::from_secs(30);

impl Session<'_> {
    async fn run(&mut self, intake: &mut IntakeRef<'_>, stop: &CancellationToken) -> Exit {
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
                if stopping.is_none() && last_adopt.is_none_or(|t| t.elapsed() >= ADOPT_EVERY) {
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
            s.behind = true;
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
                let due = s.last_lock_try.is_none_or(|t| t.elapsed() >= LOCK_RETRY);
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
                    for (seq, offset) in t.found {
                        if seq > published {
                            in_topic.insert(seq, (partition, offset));
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
        let after = self.streams[name].queued_through;
        let waited = Instant::now();
        let rows = sql::read_rows(
            &self.relay.pool,
            name,
            after,
            self.relay.settings.batch_size,
            room,
        )
        .await?;
        self.relay
            .metrics
            .relay_postgres_seconds
            .inc_by(waited.elapsed().as_secs_f64());
        self.relay
            .metrics
            .relay_rows_read_back
            .inc_by(rows.len() as u64);
        let s = self.streams.get_mut(name).expect("stream");
        let short = rows.len() < self.relay.settings.batch_size
            && rows.iter().map(Pending::size).sum::<usize>() < room / 2;
        if rows.is_empty() {
            s.behind = false;
            return Ok(());
        }
        s.behind = false;
        s.enqueue(rows, usize::MAX);
        s.behind = !short || s.behind;
        Ok(())
    }

    /// Bytes the relay may still queue, over all its streams.
    fn room(&self) -> usize {
        let queued: usize = self.streams.values().map(|s| s.queued_bytes).sum();
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
            if let Some(&(p, offset)) = s.in_topic.get(&row.seq) {
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
            .is_none_or(|a| a.contains(stream))
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

/// Rows of `outbox::stream_of` for one committed gate transaction, grouped by stream in
/// seq order, ready for [`Feed::hand_over`].
pub fn group_by_stream(prefix: &str, rows: Vec<Pending>) -> Vec<(String, Vec<Pending>)> {
    let mut out: Vec<(String, Vec<Pending>)> = Vec::new();
    for row in rows {
        let stream = outbox::stream_of(prefix, &row.source_topic, row.source_partition);
        match out.iter_mut().find(|(s, _)| *s == stream) {
            Some((_, v)) => v.push(row),
            None => out.push((stream, vec![row])),
        }
    }
    for (_, v) in &mut out {
        v.sort_by_key(|r| r.seq);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64) -> Pending {
        Pending {
            seq,
            scope: "s".into(),
            event_id: format!("e{seq}"),
            source_topic: "t".into(),
            source_partition: 0,
            source_offset: seq,
            source_timestamp_ms: None,
            key: None,
            value: Some(vec![0; 10]),
            headers: Vec::new(),
            committed_at: chrono::Utc::now(),
        }
    }

    fn ready(through: i64) -> StreamState {
        let mut s = StreamState::new("t/0".into(), Source::Local, "out");
        s.ready = true;
        s.behind = false;
        s.queued_through = through;
        s
    }

    #[test]
    fn a_hand_off_that_follows_is_queued_and_one_already_had_is_skipped() {
        let mut s = ready(2);
        s.enqueue(vec![row(1), row(2), row(3), row(4)], usize::MAX);
        assert_eq!(s.queue.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4]);
        assert!(!s.behind);
        assert_eq!(s.queued_through, 4);
    }

    #[test]
    fn a_gap_sends_the_stream_back_to_the_outbox_from_the_last_seq_it_has() {
        let mut s = ready(2);
        s.enqueue(vec![row(5), row(6)], usize::MAX);
        assert!(s.queue.is_empty());
        assert!(s.behind);
        assert_eq!(s.queued_through, 2, "read back from seq 3");
        // Later hand-offs are not queued until the read-back caught up.
        s.enqueue(vec![row(3)], usize::MAX);
        assert!(s.queue.is_empty());
    }

    #[test]
    fn past_the_byte_budget_the_rest_is_read_back() {
        let mut s = ready(0);
        s.enqueue(vec![row(1), row(2), row(3)], 15);
        assert_eq!(s.queue.len(), 1);
        assert!(s.behind);
        assert_eq!(s.queued_through, 1);
    }

    #[test]
    fn rows_are_grouped_by_stream_in_seq_order() {
        let mut a = row(2);
        a.source_partition = 1;
        let groups = group_by_stream("replay:", vec![a, row(7), row(6)]);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].0, "replay:t/1");
        assert_eq!(
            groups[1].1.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [6, 7]
        );
    }
}
