//! Outbox relay: publishes committed outbox rows to the output topic, in outbox order,
//! and deletes them only after the broker acknowledged them.
//!
//! One relay per schema publishes at a time: it holds the schema's `relay`
//! [`SingletonLock`] and does all its queries on that lock's connection, so losing the
//! connection (and with it the lock) also stops it from deleting anything. Other replicas
//! stand by and retry the lock.
//!
//! The one window that can publish a row twice is a crash after the broker's ack and
//! before the delete commits. Every output message carries `kdedup-event-id` and
//! `kdedup-source`, so a consumer of the output can recognise such a repeat.
//!
//! Order: rows are produced in id order to partition `source_partition % partitions`
//! with an idempotent producer, so events of one input partition keep their order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::kafka::Producer;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use sqlx::PgConnection;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Level};

use crate::kafka::{self, dlq};
use crate::metrics::Metrics;
use crate::model::headers;
use crate::model::identity::Rejection;
use crate::model::{header, InputMessage, Position};
use crate::retry::Backoff;
use crate::settings::{DbSettings, RelaySettings, RunSettings};
use crate::store::lock::{sleep_or_stop, SingletonLock};
use crate::store::outbox::{self, OutboxRow};

/// Logs an event about one outbox row with the fields every event line carries: the event
/// id, its scope and its source position, so `grep event_id=X` finds the whole story.
macro_rules! row_event {
    ($level:expr, $row:ident, $($rest:tt)+) => {
        tracing::event!(
            $level,
            event_id = $row.event_id,
            scope = $row.scope,
            topic = $row.source_topic,
            partition = $row.source_partition,
            offset = $row.source_offset,
            $($rest)+
        )
    };
}

pub struct Relay {
    pub settings: RelaySettings,
    pub db: DbSettings,
    pub brokers: String,
    pub output_topic: String,
    pub dlq_topic: String,
    pub producer: Producer,
    pub metrics: Metrics,
    pub wakeup: Arc<Notify>,
    /// Told when the outbox became empty, so the backlog gauge (written by the health
    /// loop) drops at once.
    pub emptied: Option<Arc<Notify>>,
}

/// Why the relay left its active state.
enum Exit {
    Stopped,
    ConnectionLost(sqlx::Error),
}

impl Relay {
    /// The relay of `cfg`'s sidecar (or replay), publishing to `output_topic` through
    /// `producer`.
    pub fn new(
        cfg: &RunSettings,
        output_topic: &str,
        producer: Producer,
        metrics: Metrics,
        wakeup: Arc<Notify>,
    ) -> Self {
        Relay {
            settings: cfg.relay.clone(),
            db: cfg.db.clone(),
            brokers: cfg.kafka.brokers.clone(),
            output_topic: output_topic.to_string(),
            dlq_topic: cfg.kafka.dlq_topic.clone(),
            producer,
            metrics,
            wakeup,
            emptied: None,
        }
    }

    /// Runs until `stop` fires; then publishes what is left in the outbox and returns.
    pub async fn run(self, stop: CancellationToken) {
        let lock = SingletonLock {
            role: "relay",
            db: self.db.clone(),
            standby_retry: Duration::from_secs(2),
        };
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        // 0 on standby: it is set to 1 only while the lock is held.
        let active = &self.metrics.relay_active;
        while let Ok(mut conn) = lock.acquire(&stop).await {
            backoff.reset();
            active.set(1);
            info!(output_topic = self.output_topic, "relay active");
            let exit = self.publish_while_locked(&mut conn, &stop).await;
            active.set(0);
            match exit {
                Exit::Stopped => {
                    // Closing the connection releases the advisory lock.
                    let _ = sqlx::Connection::close(conn).await;
                    info!("relay stopped");
                    return;
                }
                Exit::ConnectionLost(e) => {
                    warn!(error = %e, "relay lost its Postgres connection (and lock); reacquiring");
                    sleep_or_stop(backoff.next_delay(), &stop).await;
                }
            }
        }
    }

    async fn output_partitions(&self, stop: &CancellationToken) -> Option<i32> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let producer = self.producer.clone();
            let brokers = self.brokers.clone();
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

    async fn publish_while_locked(
        &self,
        conn: &mut PgConnection,
        stop: &CancellationToken,
    ) -> Exit {
        let Some(partitions) = self.output_partitions(stop).await else {
            return Exit::Stopped;
        };
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        // Rounds of this session, for the debug log: a round's rows are "sending" until
        // its "outbox rows deleted"; a round that never got there is republished by the
        // next relay, and whatever the broker had written of it appears twice.
        let mut round: u64 = 0;
        // The outbox is known here to be empty before any refresh of the health loop.
        let mut was_empty = false;
        loop {
            let stopping = stop.is_cancelled();
            let rows = match outbox::next_round(
                conn,
                self.settings.batch_size,
                self.settings.batch_max_bytes,
            )
            .await
            {
                Ok(rows) => rows,
                Err(e) => return Exit::ConnectionLost(e),
            };
            if rows.is_empty() {
                if !was_empty {
                    if let Some(emptied) = &self.emptied {
                        emptied.notify_one();
                    }
                }
                was_empty = true;
                if stopping {
                    return Exit::Stopped;
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = self.wakeup.notified() => {}
                    // Rows written by other replicas do not wake this process.
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
                continue;
            }
            was_empty = false;
            let started = Instant::now();
            round += 1;
            let (mut acked, refused, mut failed) = self.publish(&rows, partitions, round).await;
            let forwarded = acked.len();
            if !refused.is_empty() {
                let (dead_lettered, not_yet) = self.dead_letter(&rows, &refused).await;
                acked.extend(dead_lettered);
                failed += not_yet;
            }
            if !acked.is_empty() {
                crate::crash::reached(crate::crash::Point::RelayAfterAck);
                if let Err(e) = outbox::delete(conn, &acked).await {
                    // These rows will be published again by whoever holds the lock next;
                    // the kdedup-event-id header makes the repeat recognisable.
                    return Exit::ConnectionLost(e);
                }
                debug!(round, rows = acked.len(), "outbox rows deleted");
                self.metrics.events_forwarded.inc_by(forwarded as u64);
            }
            self.metrics
                .relay_publish_duration
                .observe(started.elapsed().as_secs_f64());
            if failed > 0 {
                if stopping {
                    return Exit::Stopped;
                }
                sleep_or_stop(backoff.next_delay(), stop).await;
            } else {
                backoff.reset();
            }
        }
    }

    /// Sends rows the output topic refused for good to the dead-letter topic (reason
    /// `output_refused`, with their source position), stripped of value and headers if
    /// the DLQ topic refuses them too. Returns the ids now durable in the DLQ (to delete
    /// from the outbox) and how many are not yet (they stay, and are tried again).
    async fn dead_letter(
        &self,
        rows: &[OutboxRow],
        refused: &[(usize, String)],
    ) -> (Vec<i64>, usize) {
        let mut done = Vec::with_capacity(refused.len());
        let mut not_yet = 0;
        for (i, error) in refused {
            let row = &rows[*i];
            let msg = InputMessage {
                topic: row.source_topic.clone(),
                partition: row.source_partition,
                offset: row.source_offset,
                timestamp_ms: row.source_timestamp_ms,
                key: row.key.clone(),
                value: row.value.clone(),
                headers: headers::decode(&row.headers).unwrap_or_default(),
                header_names_utf8: true,
            };
            let why = Rejection::OutputRefused {
                error: error.clone(),
            };
            match dlq::send(&self.producer, &self.dlq_topic, &msg, &why).await {
                Ok(_stripped) => {
                    self.metrics
                        .dead_lettered
                        .with_label_values(&[why.reason()])
                        .inc();
                    row_event!(Level::ERROR, row, outbox_id = row.id, error = %why,
                               dlq_topic = self.dlq_topic,
                               "the output topic refused this event for good; it is in the dead-letter topic");
                    done.push(row.id);
                }
                Err(e) => {
                    not_yet += 1;
                    row_event!(Level::WARN, row, outbox_id = row.id, error = %e,
                               "dead-letter produce failed; the row stays in the outbox");
                }
            }
        }
        (done, not_yet)
    }

    /// Produces `rows` in order and waits for every acknowledgement. Returns the ids the
    /// broker acknowledged, the rows it refused for good (index and error: the record
    /// itself is at fault, retrying cannot help) and how many failed otherwise (those stay
    /// in the outbox and are retried).
    async fn publish(
        &self,
        rows: &[OutboxRow],
        partitions: i32,
        round: u64,
    ) -> (Vec<i64>, Vec<(usize, String)>, usize) {
        let mut deliveries = Vec::with_capacity(rows.len());
        for row in rows {
            row_event!(Level::DEBUG, row, outbox_id = row.id, round, "sending");
            let input_headers = match headers::decode(&row.headers) {
                Ok(h) => h,
                Err(e) => {
                    row_event!(Level::ERROR, row, outbox_id = row.id, error = %e,
                               "outbox row has corrupt headers; publishing without them");
                    Vec::new()
                }
            };
            let source = Position {
                topic: row.source_topic.clone(),
                partition: row.source_partition,
                offset: row.source_offset,
            }
            .to_string();
            let mut hs = OwnedHeaders::new_with_capacity(input_headers.len() + 2);
            for (k, v) in &input_headers {
                if k == header::EVENT_ID || k == header::SOURCE {
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
                });
            let mut record: FutureRecord<'_, Vec<u8>, Vec<u8>> =
                FutureRecord::to(&self.output_topic)
                    .partition(row.source_partition.rem_euclid(partitions))
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
            // Enqueue strictly in row order: waiting on a full queue here (rather than
            // enqueuing from concurrent futures) is what keeps the output in outbox order.
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push(Some(Ok(delivery)));
                        break;
                    }
                    Err((e, r)) => {
                        record = r;
                        if e.rdkafka_error_code()
                            == Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        {
                            // The producer's own thread serves delivery reports, which
                            // make room; waiting here never blocks the runtime.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        } else {
                            row_event!(Level::ERROR, row, error = %e,
                                       "produce to output topic refused");
                            deliveries.push(Some(Err(e)));
                            break;
                        }
                    }
                }
            }
        }
        let results = futures::future::join_all(deliveries.into_iter().map(|d| async move {
            match d {
                None => Err((false, "refused before enqueue".to_string())),
                Some(Err(e)) => Err((kafka::is_refused_record(&e), e.to_string())),
                Some(Ok(f)) => match f.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err((kafka::is_refused_record(&e), e.to_string())),
                    Err(_canceled) => Err((false, "producer closed".to_string())),
                },
            }
        }))
        .await;
        let now = chrono::Utc::now();
        let mut acked = Vec::with_capacity(rows.len());
        let mut refused = Vec::new();
        let mut failed = 0;
        for (i, (row, result)) in rows.iter().zip(results).enumerate() {
            match result {
                Ok(()) => {
                    acked.push(row.id);
                    let secs = (now - row.created_at).num_milliseconds().max(0) as f64 / 1000.0;
                    self.metrics
                        .latency
                        .with_label_values(&["commit_to_ack"])
                        .observe(secs);
                    row_event!(Level::DEBUG, row, "forwarded");
                }
                Err((true, e)) => refused.push((i, e)),
                Err((false, e)) => {
                    failed += 1;
                    self.metrics.relay_failures.inc();
                    row_event!(Level::WARN, row, error = %e,
                               "output produce failed; the row stays in the outbox");
                }
            }
        }
        (acked, refused, failed)
    }
}
