//! Reading back what the output topic already holds of a stream: the messages after the
//! stream's anchor in an output partition, known by their `kdedup-position` header.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::log::ClientLog;
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
    /// Seq -> (output offset, `kdedup-event-id`), for every message of the stream read.
    /// The id tells a message of this seq from one of a seq reused after a restore of
    /// Postgres from a backup.
    pub found: HashMap<i64, (i64, String)>,
    /// What was wrong with the anchor, for a warning: the partition ends before it (the
    /// topic was deleted and recreated, or truncated).
    pub anchor_lost: Option<String>,
}

/// A consumer with no group that only reads tails (never commits). The end of a partition
/// is the fetch's own end-of-partition event, whose high watermark comes with the data.
pub fn reader(cfg: &RunSettings) -> anyhow::Result<TailReader> {
    let mut c = crate::kafka::reader_config(
        &cfg.kafka.brokers,
        &format!("{}.relay-tail", cfg.kafka.group_id),
        &cfg.kafka.properties,
        &[("fetch.wait.max.ms", "100")],
    );
    c.set("enable.partition.eof", "true");
    Ok(crate::kafka::client(&c, TailLog::default())?)
}

/// The tail reader's client context: librdkafka's errors and log lines as the other
/// clients have them ([`ClientLog`]), except the end of a partition, which this reader
/// asks for (`enable.partition.eof`) and which librdkafka also reports as a client error:
/// written as is, it was an ERROR line on every take-over.
#[derive(Default)]
pub struct TailLog(ClientLog);

impl ClientContext for TailLog {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.0.client_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if !is_partition_end(&error) {
            self.0.client_error(&error, reason);
        }
    }
}

/// The end of a partition, as librdkafka's error callback reports it: through the error
/// callback it comes as a global error carrying the code, not as [`KafkaError::PartitionEOF`].
fn is_partition_end(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::PartitionEOF(_)
            | KafkaError::Global(rdkafka::error::RDKafkaErrorCode::PartitionEOF)
    )
}

impl ConsumerContext for TailLog {}

/// The tail reader's consumer.
pub type TailReader = BaseConsumer<TailLog>;

/// How long a read may see neither a message nor the partition's end before it starts
/// again from further back.
const QUIET: Duration = Duration::from_secs(1);

/// Reads `topic`/`partition` from `anchor` to its end and returns the seqs of `stream`
/// found there. Blocking: run it off the runtime's threads.
///
/// A broker that answers a fetch from inside a record batch with the next batch only
/// (skipping the rest of the one the offset is in) is read from further back until the
/// first message read is at or before the anchor: reading more than needed is harmless,
/// the stream's seqs tell what is its own.
pub fn read(
    consumer: &TailReader,
    topic: &str,
    partition: i32,
    anchor: i64,
    stream: &str,
    timeout: Duration,
) -> Result<Tail, String> {
    let deadline = Instant::now() + timeout;
    let mut back = 0i64;
    let mut step = 1024i64;
    let result = loop {
        let start = (anchor - back).max(0);
        match read_from(consumer, topic, partition, start, anchor, stream, deadline) {
            Ok(Some(tail)) => break Ok(tail),
            Ok(None) if start == 0 => {
                break Err(format!(
                "{topic}/{partition} sent neither messages nor its end for {QUIET:?} from offset 0"
            ))
            }
            Ok(None) => {
                back += step;
                step *= 4;
            }
            Err(e) => break Err(e),
        }
    };
    let _ = consumer.unassign();
    result
}

/// One read from `start`: `Ok(None)` when it cannot tell that nothing from `anchor` on
/// was skipped (the first message came after the anchor, or nothing came at all).
fn read_from(
    consumer: &TailReader,
    topic: &str,
    partition: i32,
    start: i64,
    anchor: i64,
    stream: &str,
    deadline: Instant,
) -> Result<Option<Tail>, String> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(start))
        .map_err(|e| e.to_string())?;
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    let mut tail = Tail::default();
    let mut first: Option<i64> = None;
    let mut heard = Instant::now();
    loop {
        if Instant::now() > deadline {
            return Err(format!(
                "reading {topic}/{partition} from offset {start} did not reach its end in time"
            ));
        }
        if heard.elapsed() > QUIET {
            return Ok(None);
        }
        let Some(next) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        heard = Instant::now();
        let m = match next {
            Ok(m) => m,
            Err(rdkafka::error::KafkaError::PartitionEOF(p)) if p == partition => {
                // The end. A position past the anchor with nothing read before it means
                // the broker skipped what lies between: read again from further back.
                // Nothing consumed: the end is where the read started.
                let end = match first {
                    None => start,
                    Some(_) => consumer
                        .position()
                        .ok()
                        .and_then(|tpl| {
                            tpl.find_partition(topic, partition)
                                .and_then(|e| e.offset().to_raw())
                        })
                        .filter(|o| *o >= 0)
                        .unwrap_or(start),
                };
                if end < anchor {
                    tail.anchor_lost = Some(format!(
                        "the checkpoint anchors {topic}/{partition} at offset {anchor}, past its end {end}: \
                         the topic was deleted and recreated, or truncated"
                    ));
                }
                return Ok(Some(tail));
            }
            Err(e) => return Err(format!("reading {topic}/{partition}: {e}")),
        };
        if m.partition() != partition || m.topic() != topic {
            continue;
        }
        if first.is_none() {
            first = Some(m.offset());
            if m.offset() > anchor.max(start) {
                if start > 0 {
                    return Ok(None);
                }
                // From the very start and still past the anchor: retention deleted what
                // lay between (a first anchor of 0 has nothing of the stream before it).
                if anchor > 0 {
                    tail.anchor_lost = Some(format!(
                        "the checkpoint anchors {topic}/{partition} at offset {anchor}, before its \
                         first offset {}: retention deleted what was published after the checkpoint",
                        m.offset()
                    ));
                }
            }
        }
        let Some(hs) = m.headers() else { continue };
        let mut position = None;
        let mut event_id = String::new();
        for h in hs.iter() {
            if h.key == header::POSITION {
                position = h.value.and_then(parse_position);
            } else if h.key == header::EVENT_ID {
                event_id = String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned();
            }
        }
        if let Some((s, seq)) = position {
            if s == stream {
                tail.found.insert(seq, (m.offset(), event_id));
            }
        }
    }
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

    #[test]
    fn the_end_of_a_partition_is_not_a_client_error_whichever_way_it_comes() {
        use rdkafka::error::RDKafkaErrorCode;
        assert!(is_partition_end(&KafkaError::PartitionEOF(3)));
        assert!(is_partition_end(&KafkaError::Global(
            RDKafkaErrorCode::PartitionEOF
        )));
        assert!(!is_partition_end(&KafkaError::Global(
            RDKafkaErrorCode::BrokerTransportFailure
        )));
    }
}
