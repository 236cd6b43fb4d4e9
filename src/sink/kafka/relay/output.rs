//! What the relay sends: the output record of an outbox row, and the dead letter of one
//! the output topic refuses for good.

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use tracing::Level;

use super::{tail, Relay};
use crate::kafka::dlq;
use crate::model::identity::Rejection;
use crate::model::{header, InputMessage, Position};
use crate::store::relay::Pending;

/// Enqueues one row with the producer.
pub(super) fn produce(
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
pub(super) async fn dead_letter(relay: &Relay, stream: &str, row: &Pending, error: String) -> bool {
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
