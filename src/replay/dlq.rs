//! Dead-letter records back into input messages: where they came from
//! (`kdedup-source-*`, believed only when well formed) and what was stripped.

use crate::model::{header, is_valid_topic_name, InputMessage};

fn header_text(msg: &InputMessage, name: &str) -> Option<String> {
    msg.headers
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.as_deref())
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_string)
}

/// For a DLQ record sent stripped (no value, no original headers), the position of the
/// original to re-read it from: `topic/partition/offset`, or the DLQ record's own position
/// when the source headers are missing.
pub(super) fn stripped_source(msg: &InputMessage) -> Option<String> {
    let flag = header_text(msg, header::DLQ_STRIPPED)?;
    if flag.eq_ignore_ascii_case("false") {
        return None;
    }
    match (
        header_text(msg, header::SOURCE_TOPIC),
        header_text(msg, header::SOURCE_PARTITION),
        header_text(msg, header::SOURCE_OFFSET),
    ) {
        (Some(t), Some(p), Some(o)) => Some(format!("{t}/{p}/{o}")),
        _ => Some(format!(
            "unknown (DLQ record {}/{}/{})",
            msg.topic, msg.partition, msg.offset
        )),
    }
}

/// A DLQ message carries its original position in headers; the gate row and the output
/// should point at the original, and the dead-letter headers should not travel on.
///
/// Anyone can write a DLQ record, so the headers are checked before they are believed: a
/// topic that is not a valid topic name (a NUL byte would fail the whole gate
/// transaction), a negative or non-numeric partition or offset. A record whose source
/// headers do not check out keeps its DLQ position and headers, and says so in the log.
pub(super) fn restore_original(mut msg: InputMessage) -> InputMessage {
    let source = (
        header_text(&msg, header::SOURCE_TOPIC),
        header_text(&msg, header::SOURCE_PARTITION),
        header_text(&msg, header::SOURCE_OFFSET),
    );
    if source == (None, None, None) {
        return msg;
    }
    let valid = (
        source.0.clone().filter(|t| is_valid_topic_name(t)),
        source
            .1
            .as_deref()
            .and_then(|p| p.parse::<i32>().ok())
            .filter(|p| *p >= 0),
        source
            .2
            .as_deref()
            .and_then(|o| o.parse::<i64>().ok())
            .filter(|o| *o >= 0),
    );
    let (Some(topic), Some(partition), Some(offset)) = valid else {
        tracing::warn!(
            topic = msg.topic,
            partition = msg.partition,
            offset = msg.offset,
            "DLQ record has kdedup-source-* headers that are missing or invalid; gated at its DLQ position instead"
        );
        return msg;
    };
    {
        msg.timestamp_ms = header_text(&msg, header::SOURCE_TIMESTAMP)
            .and_then(|t| t.parse::<i64>().ok())
            .filter(|t| *t >= 0)
            .or(msg.timestamp_ms);
        msg.topic = topic;
        msg.partition = partition;
        msg.offset = offset;
        msg.headers
            .retain(|(k, _)| !(k.starts_with("kdedup-dlq-") || k.starts_with("kdedup-source-")));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dlq_msg(headers: &[(&str, &str)]) -> InputMessage {
        InputMessage {
            topic: "orders.dlq".into(),
            partition: 0,
            offset: 3,
            timestamp_ms: Some(5),
            key: Some(b"k".to_vec()),
            value: None,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), Some(v.as_bytes().to_vec())))
                .collect(),
            header_names_utf8: true,
        }
    }

    #[test]
    fn a_stripped_dlq_record_names_its_source_position() {
        let m = dlq_msg(&[
            (header::DLQ_STRIPPED, "true"),
            (header::SOURCE_TOPIC, "orders"),
            (header::SOURCE_PARTITION, "2"),
            (header::SOURCE_OFFSET, "41"),
        ]);
        assert_eq!(stripped_source(&m).as_deref(), Some("orders/2/41"));
        let bare = dlq_msg(&[(header::DLQ_STRIPPED, "true")]);
        assert_eq!(
            stripped_source(&bare).as_deref(),
            Some("unknown (DLQ record orders.dlq/0/3)")
        );
        let whole = dlq_msg(&[(header::SOURCE_TOPIC, "orders")]);
        assert_eq!(stripped_source(&whole), None);
    }

    #[test]
    fn restore_original_moves_a_dlq_record_back_to_its_source() {
        let m = restore_original(dlq_msg(&[
            ("event-id", "e-1"),
            (header::DLQ_REASON, "missing_id"),
            (header::SOURCE_TOPIC, "orders"),
            (header::SOURCE_PARTITION, "2"),
            (header::SOURCE_OFFSET, "41"),
            (header::SOURCE_TIMESTAMP, "1000"),
        ]));
        assert_eq!((m.topic.as_str(), m.partition, m.offset), ("orders", 2, 41));
        assert_eq!(m.timestamp_ms, Some(1000));
        assert_eq!(m.headers.len(), 1, "{:?}", m.headers);
    }

    #[test]
    fn forged_source_headers_are_not_believed() {
        for (topic, partition, offset) in [
            ("ord\0ers", "2", "41"),
            ("orders", "-2", "41"),
            ("orders", "2", "x"),
            ("", "2", "41"),
        ] {
            let m = restore_original(dlq_msg(&[
                (header::SOURCE_TOPIC, topic),
                (header::SOURCE_PARTITION, partition),
                (header::SOURCE_OFFSET, offset),
            ]));
            assert_ne!(m.topic, topic, "{topic:?} {partition} {offset}");
            assert_eq!(m.headers.len(), 3, "DLQ headers kept: {:?}", m.headers);
        }
    }
}
