//! Readiness inputs: what `/readyz` reports, written by the health checks, the consumer's
//! rebalance callback and the reader, read by the admin server.

use std::sync::atomic::{AtomicBool, Ordering};

/// Readiness inputs, written by the health checker and the consumer's rebalance callback.
#[derive(Default)]
pub struct Health {
    pub postgres_up: AtomicBool,
    pub broker_up: AtomicBool,
    pub consumer_joined: AtomicBool,
    /// kdedup's own topics (output, dead-letter) the cluster says do not exist.
    pub missing_topics: std::sync::Mutex<Vec<String>>,
    /// When the consumer last met input it cannot decode. A fetch that cannot be decoded
    /// fails again on every retry, so a recent one means a stuck partition.
    pub undecodable_at: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How long after the last undecodable fetch `/readyz` still reports it.
const UNDECODABLE_HOLD: std::time::Duration = std::time::Duration::from_secs(30);

impl Health {
    /// Names of the checks that currently fail.
    pub fn failing(&self) -> Vec<&'static str> {
        let mut failing = Vec::new();
        if !self.postgres_up.load(Ordering::Acquire) {
            failing.push("postgres");
        }
        if !self.broker_up.load(Ordering::Acquire) {
            failing.push("broker");
        }
        if !self.consumer_joined.load(Ordering::Acquire) {
            failing.push("consumer_group");
        }
        if !self.missing_topics.lock().expect("health lock").is_empty() {
            failing.push("topic_missing");
        }
        let undecodable = *self.undecodable_at.lock().expect("health lock");
        if undecodable.is_some_and(|at| at.elapsed() < UNDECODABLE_HOLD) {
            failing.push("input_undecodable");
        }
        failing
    }
}
