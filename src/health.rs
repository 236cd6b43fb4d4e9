//! Readiness inputs: what `/readyz` reports, written by the health checks, the consumer's
//! rebalance callback and the reader, read by the admin server.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// One check's last result: not made yet, passed or failed. A check not made yet is not
/// reported as failing: at start `/readyz` says what is still unchecked, rather than
/// blaming a broker nobody has asked yet.
#[derive(Default)]
pub struct Check(AtomicU8);

const UNCHECKED: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

impl Check {
    /// Records a result; returns the previous one (`None`: not checked before).
    pub fn set(&self, up: bool) -> Option<bool> {
        match self.0.swap(if up { UP } else { DOWN }, Ordering::AcqRel) {
            UNCHECKED => None,
            previous => Some(previous == UP),
        }
    }

    pub fn is_up(&self) -> bool {
        self.0.load(Ordering::Acquire) == UP
    }

    fn is_unchecked(&self) -> bool {
        self.0.load(Ordering::Acquire) == UNCHECKED
    }
}

/// Readiness inputs, written by the health checker and the consumer's rebalance callback.
#[derive(Default)]
pub struct Health {
    pub postgres: Check,
    pub broker: Check,
    pub consumer_joined: AtomicBool,
    /// `--migrate-on-start false` and the schema lacks migrations this binary needs.
    pub schema_not_migrated: AtomicBool,
    /// kdedup's own topics (output, dead-letter) the cluster says do not exist.
    pub missing_topics: std::sync::Mutex<Vec<String>>,
    /// When the consumer last met input it cannot decode. A fetch that cannot be decoded
    /// fails again on every retry, so a recent one means a stuck partition.
    pub undecodable_at: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How long after the last undecodable fetch `/readyz` still reports it.
const UNDECODABLE_HOLD: std::time::Duration = std::time::Duration::from_secs(30);

impl Health {
    /// Names of the checks not made yet (the broker is asked only once Postgres is up).
    pub fn unchecked(&self) -> Vec<&'static str> {
        [("postgres", &self.postgres), ("broker", &self.broker)]
            .into_iter()
            .filter(|(_, check)| check.is_unchecked())
            .map(|(name, _)| name)
            .collect()
    }

    /// Names of the checks that currently fail (a check not made yet is not failing).
    pub fn failing(&self) -> Vec<&'static str> {
        let mut failing = Vec::new();
        for (name, check) in [("postgres", &self.postgres), ("broker", &self.broker)] {
            if !check.is_up() && !check.is_unchecked() {
                failing.push(name);
            }
        }
        if self.schema_not_migrated.load(Ordering::Acquire) {
            failing.push("schema_not_migrated");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_not_made_yet_are_unchecked_not_failing() {
        let h = Health::default();
        assert_eq!(h.unchecked(), ["postgres", "broker"]);
        assert_eq!(h.failing(), ["consumer_group"]);
        assert_eq!(h.postgres.set(false), None);
        assert_eq!(h.failing(), ["postgres", "consumer_group"]);
        assert_eq!(h.unchecked(), ["broker"]);
        assert_eq!(h.postgres.set(true), Some(false));
        assert_eq!(h.broker.set(true), None);
        h.consumer_joined.store(true, Ordering::Release);
        assert!(h.failing().is_empty() && h.unchecked().is_empty());
    }
}
