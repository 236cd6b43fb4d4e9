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
    /// Handed-over rows that came after a gap, kept (within half the byte budget) while
    /// the gap is read back, so that the read-back ends at them instead of chasing the
    /// lanes. Contiguous; the first is past `queued_through + 1`.
    pub(super) parked: VecDeque<Pending>,
    pub(super) parked_bytes: usize,
    pub(super) in_flight: VecDeque<InFlight>,
    /// A send failed: nothing more is sent until every send in flight has settled; the
    /// stream is then taken over again (the tail shows which of them landed).
    pub(super) failed: bool,
    /// Seqs already in the topic (found in the tail): partition, offset, event id.
    pub(super) in_topic: HashMap<i64, (i32, i64, String)>,
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
            parked: VecDeque::new(),
            parked_bytes: 0,
            in_flight: VecDeque::new(),
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

    /// Sends still waiting for the broker's answer.
    pub(super) fn waiting(&self) -> bool {
        self.in_flight.iter().any(|f| f.result.is_none())
    }

    pub(super) fn idle(&self) -> bool {
        self.queue.is_empty() && self.in_flight.is_empty() && !self.behind
    }

    /// Bytes this stream holds: queued and parked.
    pub(super) fn held_bytes(&self) -> usize {
        self.queued_bytes + self.parked_bytes
    }

    /// The last seq the read-back has to reach: just before the parked rows (`None`: up
    /// to whatever the outbox holds).
    pub(super) fn read_back_until(&self) -> Option<i64> {
        self.parked.front().map(|r| r.seq - 1)
    }

    /// Queues `rows` that follow what the stream has, within `room` bytes (always at
    /// least one row when the queue is empty). Rows past a gap are parked while the gap
    /// is read back from the outbox (within `room / 2`); past that, they are dropped and
    /// read back too.
    pub(super) fn enqueue(&mut self, rows: Vec<Pending>, room: usize) {
        let mut added = 0usize;
        for row in rows {
            let last_parked = self.parked.back().map(|r| r.seq);
            if row.seq <= self.queued_through || last_parked.is_some_and(|l| row.seq <= l) {
                continue;
            }
            if !self.behind && row.seq == self.queued_through + 1 {
                if added + row.size() > room && !self.queue.is_empty() {
                    self.behind = true;
                    return;
                }
                added += row.size();
                self.queued_through = row.seq;
                self.queued_bytes += row.size();
                self.queue.push_back(row);
                continue;
            }
            // A gap (rows committed elsewhere, or dropped): read back up to here.
            self.behind = true;
            let follows = last_parked.map_or(true, |l| row.seq == l + 1);
            if !follows || added + row.size() > room / 2 {
                // Not contiguous with what is parked, or no room: read back past it all.
                if !follows {
                    self.parked.clear();
                    self.parked_bytes = 0;
                }
                return;
            }
            added += row.size();
            self.parked_bytes += row.size();
            self.parked.push_back(row);
        }
    }

    /// Rows read back from the outbox (in seq order, from `queued_through + 1`): queued;
    /// once they reach the parked rows, those follow and the stream is caught up.
    /// `complete`: the read-back found everything there is (no parked rows to reach).
    pub(super) fn read_back(&mut self, rows: Vec<Pending>, complete: bool) {
        for row in rows {
            if row.seq != self.queued_through + 1 {
                continue;
            }
            self.queued_through = row.seq;
            self.queued_bytes += row.size();
            self.queue.push_back(row);
        }
        match self.read_back_until() {
            Some(until) if self.queued_through >= until => {
                self.queued_bytes += self.parked_bytes;
                self.parked_bytes = 0;
                while let Some(row) = self.parked.pop_front() {
                    if row.seq == self.queued_through + 1 {
                        self.queued_through = row.seq;
                        self.queue.push_back(row);
                    }
                }
                self.behind = false;
            }
            Some(_) => {}
            None => self.behind = !complete,
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
    fn rows_past_a_gap_are_parked_and_the_read_back_ends_at_them() {
        let mut s = ready(2);
        s.enqueue(vec![row(5), row(6)], usize::MAX);
        assert!(s.queue.is_empty());
        assert!(s.behind);
        assert_eq!(s.queued_through, 2, "read back from seq 3");
        assert_eq!(s.read_back_until(), Some(4));
        // More hand-offs join the parked rows; one already had is skipped.
        s.enqueue(vec![row(6), row(7)], usize::MAX);
        assert_eq!(s.parked.len(), 3);
        s.read_back(vec![row(3), row(4)], false);
        assert!(!s.behind, "caught up");
        assert_eq!(
            s.queue.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [3, 4, 5, 6, 7]
        );
        assert_eq!(s.queued_through, 7);
        assert!(s.parked.is_empty());
    }

    #[test]
    fn a_read_back_without_parked_rows_ends_when_it_finds_everything() {
        let mut s = ready(0);
        s.behind = true;
        s.read_back(vec![row(1), row(2)], false);
        assert!(s.behind, "a full page: there may be more");
        s.read_back(vec![row(3)], true);
        assert!(!s.behind);
        assert_eq!(s.queued_through, 3);
    }

    #[test]
    fn parked_rows_that_stop_following_each_other_are_dropped_and_read_back() {
        let mut s = ready(0);
        s.enqueue(vec![row(3)], usize::MAX);
        s.enqueue(vec![row(9)], usize::MAX);
        assert!(s.parked.is_empty());
        assert_eq!(s.read_back_until(), None);
        assert!(s.behind);
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
