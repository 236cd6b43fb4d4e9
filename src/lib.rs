//! kdedup: a Kafka consumer-side deduplication sidecar.
//!
//! Each `(scope, event_id)` causes exactly one forwarding write within its TTL, however
//! many times Kafka, a producer retry or a dead-letter replay delivers it. The gate is a
//! primary key in Postgres; the sink's forwarding write (an outbox row, or the
//! application's own row) commits in the same transaction; Kafka offsets move only after
//! that commit.
//!
//! Layout, top to bottom; a module uses only those below it:
//!
//! | layer | modules |
//! |---|---|
//! | command line | [`cli`]: flags, `KDEDUP_*`, validation (exit 64); the only user of clap |
//! | commands | [`app`] (`kdedup run`: start and stop order, health loop), [`replay`], [`ops`] (`inspect`, `stats`), [`demo`] |
//! | stages | `consume` (reader → lanes → settle: the `run` data path), [`sink`] (the seam; `sink::kafka`: outbox + relay; `sink::postgres`: the application's row), [`pruner`], `admin` (`/metrics`, `/livez`, `/readyz`) |
//! | clients | [`store`] (pool, migrations, errors, every SQL statement: [`store::gate`] is the gate), `kafka` (client configs, rebalance context, topics, dead-letter records) |
//! | domain | [`settings`] (validated, one struct per component), [`model`] (input message, position, headers, identity), [`metrics`], `health`, `crash`, `retry`, [`telemetry`] |
//!
//! Where to look first: the gate transaction is [`store::gate`]; the Kafka loop is
//! `consume` (`consume/mod.rs`, the reader; `consume/lanes.rs`; `consume/settle/`); the
//! sink seam is `sink/mod.rs`; configuration is [`cli`] and [`settings`].

/// Logs about one gate row (`store::gate::GateRow`) with the fields every event line
/// carries: the event id, its scope and its position, so `grep event_id=X` finds the whole
/// story. Defined before the modules so that the gate's events and the HTTP sink share it
/// (the relay's outbox rows name their fields differently and have their own).
macro_rules! row_event {
    ($level:ident, $row:expr, $($rest:tt)+) => {
        $level!(
            event_id = $row.event_id,
            scope = $row.scope,
            topic = $row.topic,
            partition = $row.partition,
            offset = $row.offset,
            $($rest)+
        )
    };
}

pub mod app;
pub mod cli;
pub mod demo;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod pruner;
pub mod replay;
pub mod settings;
pub mod store;
pub mod telemetry;

pub(crate) mod admin;
pub(crate) mod consume;
pub(crate) mod crash;
pub(crate) mod health;
pub(crate) mod kafka;
pub(crate) mod retry;
pub mod sink;

/// The producer settings kdedup's relay runs with when the operator sets no
/// `KDEDUP_KAFKA_*` property: for a tool that must produce as kdedup does, such as the
/// bench's pass-through forwarder (the broker's floor).
pub fn default_producer_config(brokers: &str) -> rdkafka::ClientConfig {
    kafka::producer_config(brokers, &Default::default())
}
