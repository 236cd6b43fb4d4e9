//! kdedup: a Kafka consumer-side deduplication sidecar.
//!
//! Each `(scope, event_id)` causes exactly one forwarding write within its TTL, however
//! many times Kafka, a producer retry or a dead-letter replay delivers it. The gate is a
//! primary key in Postgres; the forwarding write (an outbox row) commits in the same
//! transaction; Kafka offsets move only after that commit.
//!
//! Layout:
//! - [`config`]: flags, `KDEDUP_*` environment, validation (exit 64 on bad config).
//! - [`crash`]: named crash points for the crash tests (feature `crash-points`).
//! - [`identity`]: where an event id and its scope come from; why a message has none.
//! - [`pipeline`]: consume → identify → gate → store offsets; dead letters.
//! - [`db`]: pool, embedded migrations, the gate statement.
//! - [`pruner`]: deletes expired gate rows in bounded batches, one pruner per schema.
//! - [`relay`]: outbox → output topic, one active relay per schema (advisory lock).
//! - [`replay`]: re-feeds the DLQ (or any topic range) through the same gate.
//! - [`kafka`]: client settings, rebalance bookkeeping, topic creation.
//! - [`admin`]: `/metrics`, `/livez`, `/readyz`.
//! - [`metrics`]: the metric set, on one registry passed down.
//! - [`app`]: `kdedup run` start-up and shutdown order.
//! - [`demo`]: `kdedup demo` on librdkafka's embedded mock cluster.
//! - [`ops`]: `kdedup inspect` and `kdedup stats`, read-only views of the gate tables.

pub mod admin;
pub mod app;
pub mod config;
pub mod crash;
pub mod db;
pub mod demo;
pub mod headers;
pub mod identity;
pub mod kafka;
pub mod metrics;
pub mod ops;
pub mod pipeline;
pub mod pruner;
pub mod relay;
pub mod replay;
pub mod retry;
pub mod telemetry;
