//! The sink seam: what the forwarding write of a first-seen event is.
//!
//! The gate (`consume::settle`, the stage above) is the same for every sink: one transaction
//! inserts the batch's ids into `processed_events` and, for the rows it inserted and only
//! those, does the sink's forwarding write, so a crash leaves both or neither. A sink
//! decides two things:
//! - its write inside the gate statement ([`Sink::gate_write`]): one data-modifying CTE
//!   over the batch's first-seen rows (see [`crate::store::gate`]);
//! - what happens once that transaction committed ([`Sink::committed`]), such as waking
//!   a background task that finishes the delivery.
//!
//! Sinks: [`kafka`], an outbox row relayed to the output topic by [`kafka::relay`].

pub mod kafka;

/// One way of forwarding first-seen events. Shared by the gate lanes of `kdedup run` and
/// by `kdedup replay`.
pub trait Sink: Send + Sync {
    /// The forwarding write inside the gate statement: the body of one data-modifying
    /// CTE that reads `batch b JOIN gate g ON g.event_key = b.event_key`, or `None` when
    /// the sink writes nothing there.
    fn gate_write(&self) -> Option<&'static str>;

    /// A gate transaction just committed `first_seen` first sightings (called only when
    /// there was at least one).
    fn committed(&self, first_seen: usize);
}
