//! The integration tests, linked once: every module below runs against the `kdedup`
//! binary, the broker `make test` starts (KDEDUP_TEST_BROKERS) and the local Postgres
//! (KDEDUP_TEST_DATABASE_URL), through the harness in `helpers`.
//!
//! `cargo test --test it <module>::` runs one module's tests.
//!
//! The test threads run tests of any module side by side. None needs another module's
//! tests to be idle: each has its own topics, group, Postgres schema, log names and free
//! ports, sets no environment variable of the test process, and the RSS checks (faults,
//! poison) read the sidecar process's own. The exception is ignored: `chaos` restarts the
//! shared Postgres, so it runs by itself (`make chaos`), never with `--include-ignored`.

mod helpers;

mod broker_outage;
mod broker_restart;
mod chaos;
mod config;
// Needs the `crash-points` feature (`make test` enables it).
#[cfg(feature = "crash-points")]
mod crash;
mod deploy;
mod drift;
mod faults;
mod http_sink;
mod image;
mod layout;
mod ops;
mod pipeline;
mod poison;
mod postgres_sink;
mod prometheus;
mod pruner;
mod replay;
mod tls;
mod topics;
