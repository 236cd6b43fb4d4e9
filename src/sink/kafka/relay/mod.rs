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

mod output;
mod session;
mod stream;
mod tail;
mod upkeep;

pub use tail::{parse_position, position};

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use sqlx::PgPool;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::kafka::{self, Assignment, Producer};
use crate::metrics::Metrics;
use crate::retry::Backoff;
use crate::settings::{RelaySettings, RunSettings};
use crate::store::lock::sleep_or_stop;
use crate::store::relay::Pending;
use crate::store::{self as db, outbox};
use session::{Exit, IntakeRef, Session};

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
        let Some(intake) = self.intake.take() else {
            return;
        };
        // Slots are reclaimed for as long as the relay publishes, its drain included; a
        // round cut short when publishing ends is rolled back.
        tokio::select! {
            biased;
            _ = self.publish(intake, &stop) => {}
            _ = upkeep::reclaim_slots(&self) => {}
        }
    }

    async fn publish(&self, mut intake: Intake, stop: &CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let Some(partitions) = self.output_partitions(stop).await else {
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
                    sleep_or_stop(backoff.next_delay(), stop).await;
                    continue;
                }
            };
            backoff.reset();
            let mut session = Session {
                relay: self,
                conn,
                owner: owner.clone(),
                partitions,
                streams: HashMap::new(),
                acks: FuturesUnordered::new(),
                tail: tail.clone(),
                legacy_lock: false,
                was_empty: false,
            };
            let exit = session.run(&mut IntakeRef(&mut intake), stop).await;
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
                    sleep_or_stop(backoff.next_delay(), stop).await;
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

/// Rows of `outbox::stream_of` for one committed gate transaction, grouped by stream in
/// seq order, ready for [`Feed::hand_over`].
pub fn group_by_stream(prefix: &str, rows: Vec<Pending>) -> Vec<(String, Vec<Pending>)> {
    // By input partition first: the stream's name is made once per group, not per row.
    let mut groups: Vec<((String, i32), Vec<Pending>)> = Vec::new();
    for row in rows {
        let found = groups
            .iter_mut()
            .find(|((t, p), _)| *p == row.source_partition && *t == row.source_topic);
        match found {
            Some((_, v)) => v.push(row),
            None => groups.push(((row.source_topic.clone(), row.source_partition), vec![row])),
        }
    }
    groups
        .into_iter()
        .map(|((topic, partition), mut v)| {
            v.sort_by_key(|r| r.seq);
            (outbox::stream_of(prefix, &topic, partition), v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64) -> Pending {
        stream::tests::row(seq)
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
