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
//! - what happens once that transaction committed ([`Sink::committed`]), such as waking
//!   a background task that finishes the delivery.
//!
//! Sinks: [`kafka`], an outbox row relayed to the output topic by [`kafka::relay`];
//! [`postgres`], the application's own row.

pub mod kafka;
pub mod postgres;

use crate::model::identity::Rejection;
use crate::model::InputMessage;
use crate::store::gate::GateStatement;

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
    /// there was at least one).
    fn committed(&self, first_seen: usize);
}
