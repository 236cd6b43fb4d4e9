//! The sink seam: what the forwarding write of a first-seen event is.
//!
//! The gate (`consume::settle`, the stage above) is the same for every sink: one transaction
//! inserts the batch's ids into `processed_events` and, for the rows it inserted and only
//! those, does the sink's forwarding write, so a crash leaves both or neither. A sink
//! decides three things:
//! - its write in the gate transaction ([`Sink::statement`]): one data-modifying CTE of
//!   the gate statement over the batch's first-seen rows (see [`crate::store::gate`]), or a
//!   statement of its own right after it (see [`crate::store::app_rows`]);
//! - which events it can take at all ([`Sink::admit`]), checked before the gate;
//! - what happens once that transaction committed: [`Sink::deliver`], the delivery the
//!   batch waits for before its offsets are stored (the HTTP sink's requests), and
//!   [`Sink::committed`], such as waking a background task that finishes the delivery.
//!
//! Sinks: [`kafka`], an outbox row relayed to the output topic by [`kafka::relay`];
//! [`postgres`], the application's own row; [`http`], a POST to the application behind a
//! status gate.

pub mod http;
pub mod kafka;
pub mod postgres;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::model::identity::Rejection;
use crate::model::InputMessage;
use crate::store::gate::{GateRow, GateStatement};

/// What [`Sink::deliver`] made of each row, in the order given: `None` delivered (or, for
/// a row held elsewhere, left to that delivery), `Some(why)` failed for good (its final
/// status written; to be dead-lettered).
pub type Delivered = Vec<Option<Rejection>>;

/// A row for [`Sink::deliver`]: a first sighting the gate just committed, or a copy of an
/// event another delivery holds (a live lease, [`crate::store::gate::GateOutcome::Busy`]),
/// which the gate checks again until that delivery ended.
pub struct Pending<'a> {
    pub row: &'a GateRow,
    /// `None`: the gate committed the row; deliver it. `Some`: held elsewhere; it resolves
    /// to `Some(since)` once the gate took the row over (deliver it, leased since that
    /// instant), or to `None` (or is dropped) when nothing is left to deliver: the other
    /// delivery ended it, or a stop came first. Until then the later rows of its key wait
    /// behind it.
    pub held: Option<tokio::sync::oneshot::Receiver<Option<std::time::Instant>>>,
}

/// One way of forwarding first-seen events. Shared by the gate lanes of `kdedup run` and
/// by `kdedup replay`.
pub trait Sink: Send + Sync {
    /// The gate statement with this sink's write in it (built once, at start).
    fn statement(&self) -> GateStatement;

    /// Whether this sink can take `msg` at all. One it cannot is dead-lettered before the
    /// gate, so its id stays free for a corrected copy.
    fn admit(&self, _msg: &InputMessage) -> Result<(), Rejection> {
        Ok(())
    }

    /// A gate transaction just committed `first_seen` first sightings (called only when
    /// there was at least one); `sequenced` are those that got a seq in an outbox stream
    /// (the Kafka sink's), with it, in input order.
    fn committed(&self, first_seen: usize, sequenced: Vec<(GateRow, i64)>);

    /// The batch's rows to deliver, in input order (see [`Pending`]), delivered before
    /// the batch's offsets are stored: returns once each has its final outcome written,
    /// or `None` when `stop` ended the delivery first (the batch is then abandoned and
    /// redelivered). Rows it takes over after `stop` fired are given up undelivered.
    /// `gated_since`: an instant before the first gate statement of the batch began (a
    /// status-gated sink's leases started after it). The sinks whose forwarding write
    /// committed with the gate have nothing to do (and are never given held rows).
    fn deliver<'a>(
        &'a self,
        rows: Vec<Pending<'a>>,
        _gated_since: std::time::Instant,
        _stop: &'a CancellationToken,
    ) -> BoxFuture<'a, Option<Delivered>> {
        Box::pin(std::future::ready(Some(
            rows.iter().map(|_| None).collect(),
        )))
    }

    /// The gate took over `rows` from deliveries whose lease had expired (status-gated
    /// sinks only).
    fn taken_over(&self, _rows: usize) {}

    /// Whether a gate lane may gate its next batch while this sink still delivers the
    /// previous one ([`Sink::deliver`] registers each call's deliveries when it is
    /// called and keeps each key's deliveries in the order of those calls). Offsets are
    /// still stored batch after batch, each once it is final. The sinks whose write
    /// commits with the gate are not: their batches commit one after the other.
    fn pipelined(&self) -> bool {
        false
    }
}
