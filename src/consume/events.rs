//! What the gate decides about one event. Each decision is a struct whose `emit` writes the
//! log line and counts the metric together, so the two cannot drift apart. Every line
//! carries the event id, its scope and its position (`grep event_id=X` finds the story).

use tracing::{debug, warn};

use crate::metrics::{Cause, Metrics};
use crate::model::identity::Rejection;
use crate::model::{InputMessage, Position};
use crate::settings::PayloadMismatch;
use crate::store::gate::GateRow;

/// A first sighting, committed with the sink's forwarding write.
pub(super) struct FirstSeen<'a> {
    pub row: &'a GateRow,
    /// When the gate transaction committed, ms since the epoch.
    pub committed_at_ms: i64,
}

impl FirstSeen<'_> {
    pub fn emit(self, metrics: &Metrics) {
        row_event!(debug, self.row, "first sighting, queued for output");
        if let Some(ts) = self.row.timestamp_ms {
            let secs = (self.committed_at_ms - ts).max(0) as f64 / 1000.0;
            metrics
                .latency
                .with_label_values(&["input_to_commit"])
                .observe(secs);
        }
    }
}

/// A copy of an event already recorded, with the same payload: not forwarded.
pub(super) struct Duplicate<'a> {
    pub row: &'a GateRow,
    pub cause: Cause,
    /// Found among the batch's own rows, before the gate statement.
    pub within_batch: bool,
}

impl Duplicate<'_> {
    pub fn emit(self, metrics: &Metrics) {
        let cause = self.cause.label();
        if self.within_batch {
            row_event!(
                debug,
                self.row,
                cause,
                "duplicate within batch, not forwarded"
            );
        } else {
            row_event!(debug, self.row, cause, "duplicate, not forwarded");
        }
        metrics.duplicates.with_label_values(&[cause]).inc();
    }
}

/// An id reused with a different payload: not a duplicate but a producer bug.
pub(super) struct Mismatch<'a> {
    pub scope: &'a str,
    pub event_id: &'a str,
    pub msg: &'a InputMessage,
    pub first: &'a Position,
    pub action: PayloadMismatch,
}

impl Mismatch<'_> {
    /// Counts and logs it; returns the rejection to dead-letter it with, when
    /// `--on-payload-mismatch dlq`.
    pub fn emit(self, metrics: &Metrics) -> Option<Rejection> {
        let action = match self.action {
            PayloadMismatch::Skip => "skipped",
            PayloadMismatch::Dlq => "dead_lettered",
        };
        metrics
            .payload_mismatches
            .with_label_values(&[action])
            .inc();
        warn!(
            event_id = self.event_id,
            scope = self.scope,
            topic = self.msg.topic,
            partition = self.msg.partition,
            offset = self.msg.offset,
            first_topic = self.first.topic,
            first_partition = self.first.partition,
            first_offset = self.first.offset,
            action,
            "same event id with a different payload: not a duplicate but a producer bug"
        );
        match self.action {
            PayloadMismatch::Skip => None,
            PayloadMismatch::Dlq => Some(Rejection::PayloadMismatch {
                first: self.first.to_string(),
                scope: self.scope.to_string(),
                event_id: self.event_id.to_string(),
            }),
        }
    }
}

/// A message acknowledged on the dead-letter topic.
pub(super) struct DeadLettered<'a> {
    pub msg: &'a InputMessage,
    pub why: &'a Rejection,
}

impl DeadLettered<'_> {
    pub fn emit(self, metrics: &Metrics) {
        let (scope, event_id) = self.why.identity();
        metrics
            .dead_lettered
            .with_label_values(&[self.why.reason()])
            .inc();
        warn!(event_id, scope, topic = self.msg.topic, partition = self.msg.partition,
              offset = self.msg.offset, reason = self.why.reason(), error = %self.why,
              "message dead-lettered");
    }
}
