//! Dead-letter records: the input message as it was, with why it is there and where it
//! came from in `kdedup-*` headers, so `kdedup replay` can put it back.

use std::time::Duration;

use crate::kafka::Producer;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use tracing::warn;

use super::is_permanent_produce_error;
use crate::model::identity::Rejection;
use crate::model::{header, InputMessage};

/// Sends `msg` to the dead-letter topic and waits for the broker. When the topic refuses
/// it as it is (too large for the DLQ topic), it is sent again at once without its value
/// and headers (`kdedup-dlq-stripped`); the source position headers still lead to the
/// original. Returns whether it went stripped.
pub async fn send(
    producer: &Producer,
    topic: &str,
    msg: &InputMessage,
    why: &Rejection,
) -> Result<bool, KafkaError> {
    let timeout = Duration::from_secs(30);
    match producer.send(record(topic, msg, why, false), timeout).await {
        Ok(_) => Ok(false),
        Err((e, _)) if is_permanent_produce_error(&e) => {
            let (scope, event_id) = why.identity();
            warn!(event_id, scope, topic = msg.topic, partition = msg.partition, offset = msg.offset,
                  error = %e, "dead-letter topic refused the message; sending it without its value");
            producer
                .send(record(topic, msg, why, true), timeout)
                .await
                .map(|_| true)
                .map_err(|(e, _)| e)
        }
        Err((e, _)) => Err(e),
    }
}

fn record<'a>(
    topic: &'a str,
    msg: &'a InputMessage,
    why: &Rejection,
    stripped: bool,
) -> FutureRecord<'a, Vec<u8>, Vec<u8>> {
    let mut hs = OwnedHeaders::new_with_capacity(msg.headers.len() + 8);
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
    if let Some(sqlstate) = why.sqlstate() {
        hs = hs.insert(Header {
            key: header::DLQ_SQLSTATE,
            value: Some(sqlstate.as_bytes()),
        });
    }
    if let Some((status, body)) = why.http_answer() {
        if let Some(status) = status {
            hs = hs.insert(Header {
                key: header::DLQ_HTTP_STATUS,
                value: Some(status.to_string().as_bytes()),
            });
        }
        hs = hs.insert(Header {
            key: header::DLQ_HTTP_BODY,
            value: Some(body.as_bytes()),
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
