//! Domain types every stage shares: the input message, where it came from, and the
//! names of the headers kdedup writes. Nothing here talks to Kafka or Postgres.

pub mod headers;
pub mod identity;

use std::fmt;

use headers::Headers;
use identity::MessageView;

/// Header names kdedup writes.
pub mod header {
    pub const EVENT_ID: &str = "kdedup-event-id";
    pub const SOURCE: &str = "kdedup-source";
    /// Where an output message stands in its outbox stream: `stream@seq` (the relay's
    /// exactly-once bookkeeping, see `sink::kafka::relay`).
    pub const POSITION: &str = "kdedup-position";
    pub const DLQ_REASON: &str = "kdedup-dlq-reason";
    pub const DLQ_ERROR: &str = "kdedup-dlq-error";
    /// The SQLSTATE of a `db_refused` or `sink_rejected` dead letter.
    pub const DLQ_SQLSTATE: &str = "kdedup-dlq-sqlstate";
    /// The last HTTP status of an `http_failed` or `http_rejected` dead letter (absent
    /// when there was no answer: a timeout, a connection error).
    pub const DLQ_HTTP_STATUS: &str = "kdedup-dlq-http-status";
    /// The last answer's body excerpt (or the I/O error) of such a dead letter, bounded.
    pub const DLQ_HTTP_BODY: &str = "kdedup-dlq-http-body";
    pub const SOURCE_TOPIC: &str = "kdedup-source-topic";
    pub const SOURCE_PARTITION: &str = "kdedup-source-partition";
    pub const SOURCE_OFFSET: &str = "kdedup-source-offset";
    pub const SOURCE_TIMESTAMP: &str = "kdedup-source-timestamp";
    /// Set when the DLQ topic refused the message as it was and it was sent without its
    /// value and headers.
    pub const DLQ_STRIPPED: &str = "kdedup-dlq-stripped";
}

/// Where a message sits in Kafka: topic, partition, offset. Shown as `topic/partition/offset`
/// (the form of the `kdedup-source` header and of `first=` in a mismatch).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.topic, self.partition, self.offset)
    }
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
    pub fn position(&self) -> Position {
        Position {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
        }
    }

    /// Bytes this message holds in memory (what `--batch-max-bytes` bounds).
    pub fn size(&self) -> usize {
        payload_size(&self.key, &self.value, &self.headers)
    }

    pub(crate) fn view(&self) -> MessageView<'_> {
        MessageView {
            key: self.key.as_deref(),
            value: self.value.as_deref(),
            headers: &self.headers,
        }
    }
}
/// A name Kafka accepts for a topic: 1-249 of `a-zA-Z0-9._-`, not `.` or `..`.
pub fn is_valid_topic_name(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Bytes of a message's key, value and headers: what the byte budgets count.
pub fn payload_size(
    key: &Option<Vec<u8>>,
    value: &Option<Vec<u8>>,
    headers: &headers::Headers,
) -> usize {
    key.as_ref().map_or(0, Vec::len)
        + value.as_ref().map_or(0, Vec::len)
        + headers
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
            .sum::<usize>()
}
