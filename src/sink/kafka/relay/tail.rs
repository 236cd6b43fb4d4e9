//! Reading back what the output topic already holds of a stream: the messages after the
//! stream's anchor in an output partition, known by their `kdedup-position` header.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::kafka::properties::ClientKind;
use crate::model::header;
use crate::settings::RunSettings;

/// The `kdedup-position` value of a stream's seq: `stream@seq`.
pub fn position(stream: &str, seq: i64) -> String {
    format!("{stream}@{seq}")
}

/// The stream and seq of a `kdedup-position` value.
pub fn parse_position(value: &[u8]) -> Option<(&str, i64)> {
    let text = std::str::from_utf8(value).ok()?;
    let (stream, seq) = text.rsplit_once('@')?;
    Some((stream, seq.parse().ok()?))
}

/// What one output partition holds of a stream after its anchor.
#[derive(Debug, Default)]
pub struct Tail {
    /// Seq -> output offset, for every message of the stream read.
    pub found: HashMap<i64, i64>,
    /// What was wrong with the anchor, for a warning: the topic was recreated (anchor
    /// past its end) or retention deleted messages after it (anchor before its start).
    pub anchor_lost: Option<String>,
}

/// A consumer with no group that only reads tails (never commits).
pub fn reader(cfg: &RunSettings) -> anyhow::Result<BaseConsumer> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.brokers)
        .set("group.id", format!("{}.relay-tail", cfg.kafka.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set("queued.max.messages.kbytes", "16384");
    cfg.kafka.properties.apply(&mut c, ClientKind::Consumer);
    c.set("enable.auto.offset.store", "false");
    Ok(crate::kafka::client(
        &c,
        rdkafka::consumer::DefaultConsumerContext,
    )?)
}

/// Reads `topic`/`partition` from `anchor` to its end and returns the seqs of `stream`
/// found there. Blocking: run it off the runtime's threads.
pub fn read(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    anchor: i64,
    stream: &str,
    timeout: Duration,
) -> Result<Tail, String> {
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, timeout)
        .map_err(|e| format!("cannot read the watermarks of {topic}/{partition}: {e}"))?;
    let mut tail = Tail::default();
    if anchor > high {
        tail.anchor_lost = Some(format!(
            "the checkpoint anchors {topic}/{partition} at offset {anchor}, past its end {high}: \
             the topic was deleted and recreated"
        ));
        return Ok(tail);
    }
    let start = match anchor < low {
        true => {
            tail.anchor_lost = Some(format!(
                "the checkpoint anchors {topic}/{partition} at offset {anchor}, before its first \
                 offset {low}: retention deleted what was published after the checkpoint"
            ));
            low
        }
        false => anchor,
    };
    if start >= high {
        return Ok(tail);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(start))
        .map_err(|e| e.to_string())?;
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + timeout;
    let result = loop {
        if Instant::now() > deadline {
            break Err(format!(
                "reading {topic}/{partition} from {start} to {high} took longer than {timeout:?}"
            ));
        }
        let Some(next) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = match next {
            Ok(m) => m,
            Err(e) => break Err(format!("reading {topic}/{partition}: {e}")),
        };
        if m.partition() != partition || m.topic() != topic {
            continue;
        }
        if let Some(hs) = m.headers() {
            for h in hs.iter() {
                if h.key != header::POSITION {
                    continue;
                }
                if let Some((s, seq)) = h.value.and_then(parse_position) {
                    if s == stream {
                        tail.found.insert(seq, m.offset());
                    }
                }
            }
        }
        if m.offset() + 1 >= high {
            break Ok(());
        }
    };
    let _ = consumer.unassign();
    result.map(|()| tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_with_slashes_and_at_signs_in_the_stream() {
        for stream in ["orders/3", "replay:orders/3", "a@b/1"] {
            let p = position(stream, 42);
            assert_eq!(parse_position(p.as_bytes()), Some((stream, 42)));
        }
        assert_eq!(parse_position(b"no-seq"), None);
        assert_eq!(parse_position(b"s@x"), None);
    }
}
