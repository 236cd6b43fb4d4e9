//! The Kafka sink: the forwarding write is an outbox row in the gate transaction, numbered
//! in its stream; the [`relay`] publishes it to the output topic exactly once. The lanes
//! hand committed rows to the relay in memory, so the hot path never reads them back.
//! The output topic holds each event once; a consumer of it is at least once again.

pub mod relay;
pub mod topics;

use super::Sink;
use crate::store::gate::{GateRow, GateStatement};
use crate::store::relay::Pending;

/// The outbox write, and the hand-off to this process's relay.
pub struct KafkaSink {
    /// `outbox::LIVE` for `kdedup run`, `outbox::REPLAY` for `kdedup replay`.
    pub stream_prefix: &'static str,
    /// `None` when this process runs no relay (`--relay=false`): another one adopts the
    /// rows from the outbox.
    pub feed: Option<relay::Feed>,
}

impl Sink for KafkaSink {
    fn statement(&self) -> GateStatement {
        GateStatement::outboxed(self.stream_prefix)
    }

    fn committed(&self, _first_seen: usize, sequenced: Vec<(GateRow, i64)>) {
        let Some(feed) = &self.feed else {
            return;
        };
        let now = chrono::Utc::now();
        let rows = sequenced
            .into_iter()
            .map(|(r, seq)| Pending {
                seq,
                scope: r.scope,
                event_id: r.event_id,
                source_topic: r.topic,
                source_partition: r.partition,
                source_offset: r.offset,
                source_timestamp_ms: r.timestamp_ms,
                key: r.key,
                value: r.value,
                headers: r.headers,
                committed_at: now,
            })
            .collect();
        for (stream, rows) in relay::group_by_stream(self.stream_prefix, rows) {
            feed.hand_over(stream, rows);
        }
    }
}
