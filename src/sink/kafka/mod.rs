//! The Kafka sink: the forwarding write is an outbox row in the gate transaction; the
//! [`relay`] publishes outbox rows to the output topic after the commit and deletes them
//! once the broker acknowledged them. The output topic holds each event once (but for
//! the relay's one window, see [`relay`]); a consumer of it is at least once again.

pub mod relay;
pub mod topics;

use std::sync::Arc;

use tokio::sync::Notify;

use super::Sink;
use crate::store::gate::GateStatement;
use crate::store::outbox::OUTBOX_WRITE;

/// The outbox write, and the relay's wake-up call.
pub struct KafkaSink {
    /// Notified after a commit that queued rows, so an idle relay publishes at once.
    pub relay_wakeup: Arc<Notify>,
}

impl Sink for KafkaSink {
    fn statement(&self) -> GateStatement {
        GateStatement::new(Some(OUTBOX_WRITE))
    }

    fn committed(&self, _first_seen: usize) {
        self.relay_wakeup.notify_one();
    }
}
