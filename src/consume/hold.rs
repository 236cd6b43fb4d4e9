//! Holding the input: while a batch waits to be retried (Postgres or the DLQ topic down),
//! the consumer must keep polling or it exceeds `max.poll.interval.ms` and is evicted from
//! its group.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer as _;
use rdkafka::{Message, Offset};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::kafka::Consumer;

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
    /// skip the dropped messages. The reader stops when this is set (see [`super::Pipeline`]).
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
    pub(crate) async fn idle(&self, d: Duration, stop: &CancellationToken) -> bool {
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
    pub(crate) async fn resume(&self) {
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
                // `seek` waits up to its timeout for librdkafka: off the runtime's threads.
                let (consumer, t) = (self.consumer.clone(), topic.clone());
                let sought = tokio::task::spawn_blocking(move || {
                    consumer.seek(
                        &t,
                        partition,
                        Offset::Offset(offset),
                        Duration::from_secs(5),
                    )
                })
                .await
                .expect("seek does not panic");
                let Err(e) = sought else {
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
