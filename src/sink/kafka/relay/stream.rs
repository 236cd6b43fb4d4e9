//! What the relay keeps per stream, and how handed-over rows join it.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use rdkafka::error::KafkaError;

use crate::store::relay::{Checkpoint, Pending};

/// How a stream came to this relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// Handed over by this process's gate lanes.
    Local,
    /// Adopted: rows past its checkpoint and nobody moving it.
    Adopted,
}

/// One message sent and not yet settled.
pub(super) struct InFlight {
    pub(super) seq: i64,
    /// `Some(Ok((partition, offset)))` acknowledged, `Some(Err)` failed; `None` waiting.
    pub(super) result: Option<Result<(i32, i64), KafkaError>>,
    pub(super) row: Option<Pending>,
    pub(super) sent_at: Instant,
}

pub(super) struct StreamState {
    pub(super) name: String,
    pub(super) source: Source,
    pub(super) held: bool,
    /// Taken over: every seq up to `queued_through` is published, in flight or queued.
    pub(super) ready: bool,
    /// Last seq sent or queued; the next one expected is this + 1.
    pub(super) queued_through: i64,
    /// Rows committed past `queued_through` may exist only in the outbox: read them back
    /// once the queue is empty.
    pub(super) behind: bool,
    pub(super) queue: VecDeque<Pending>,
    pub(super) queued_bytes: usize,
    pub(super) in_flight: VecDeque<InFlight>,
    pub(super) waiting: usize,
    /// A send failed: nothing more is sent until every send in flight has settled; the
    /// stream is then taken over again (the tail shows which of them landed).
    pub(super) failed: bool,
    /// Seqs already in the topic (found in the tail), with their offsets.
    pub(super) in_topic: HashMap<i64, (i32, i64)>,
    pub(super) checkpoint: Checkpoint,
    pub(super) dirty: bool,
    pub(super) last_lock_try: Option<Instant>,
    pub(super) last_active: Instant,
}

impl StreamState {
    pub(super) fn new(name: String, source: Source, output_topic: &str) -> Self {
        StreamState {
            name,
            source,
            held: false,
            ready: false,
            queued_through: 0,
            behind: true,
            queue: VecDeque::new(),
            queued_bytes: 0,
            in_flight: VecDeque::new(),
            waiting: 0,
            failed: false,
            in_topic: HashMap::new(),
            checkpoint: Checkpoint {
                output_topic: output_topic.to_string(),
                ..Default::default()
            },
            dirty: false,
            last_lock_try: None,
            last_active: Instant::now(),
        }
    }

    pub(super) fn idle(&self) -> bool {
        self.queue.is_empty() && self.in_flight.is_empty() && !self.behind
    }

    /// Queues `rows` that follow what the stream has, within `room` bytes (always at
    /// least one row when the queue is empty); past a gap or past `room`, the stream reads
    /// back from the outbox instead.
    pub(super) fn enqueue(&mut self, rows: Vec<Pending>, room: usize) {
        let mut added = 0usize;
        for row in rows {
            if row.seq <= self.queued_through {
                continue;
            }
            if self.behind || row.seq != self.queued_through + 1 {
                // A gap: the missing seqs were committed elsewhere. Read back from here.
                self.behind = true;
                return;
            }
            if added + row.size() > room && !self.queue.is_empty() {
                self.behind = true;
                return;
            }
            added += row.size();
            self.queued_through = row.seq;
            self.queued_bytes += row.size();
            self.queue.push_back(row);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn row(seq: i64) -> Pending {
        Pending {
            seq,
            scope: "s".into(),
            event_id: format!("e{seq}"),
            source_topic: "t".into(),
            source_partition: 0,
            source_offset: seq,
            source_timestamp_ms: None,
            key: None,
            value: Some(vec![0; 10]),
            headers: Vec::new(),
            committed_at: chrono::Utc::now(),
        }
    }

    fn ready(through: i64) -> StreamState {
        let mut s = StreamState::new("t/0".into(), Source::Local, "out");
        s.ready = true;
        s.behind = false;
        s.queued_through = through;
        s
    }

    #[test]
    fn a_hand_off_that_follows_is_queued_and_one_already_had_is_skipped() {
        let mut s = ready(2);
        s.enqueue(vec![row(1), row(2), row(3), row(4)], usize::MAX);
        assert_eq!(s.queue.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4]);
        assert!(!s.behind);
        assert_eq!(s.queued_through, 4);
    }

    #[test]
    fn a_gap_sends_the_stream_back_to_the_outbox_from_the_last_seq_it_has() {
        let mut s = ready(2);
        s.enqueue(vec![row(5), row(6)], usize::MAX);
        assert!(s.queue.is_empty());
        assert!(s.behind);
        assert_eq!(s.queued_through, 2, "read back from seq 3");
        // Later hand-offs are not queued until the read-back caught up.
        s.enqueue(vec![row(3)], usize::MAX);
        assert!(s.queue.is_empty());
    }

    #[test]
    fn past_the_byte_budget_the_rest_is_read_back() {
        let mut s = ready(0);
        s.enqueue(vec![row(1), row(2), row(3)], 15);
        assert_eq!(s.queue.len(), 1);
        assert!(s.behind);
        assert_eq!(s.queued_through, 1);
    }
}
