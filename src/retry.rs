//! Capped exponential backoff with jitter (each delay drawn from its upper half), for
//! retries against Postgres and Kafka.

use std::time::Duration;

use rand::Rng;

/// Delays grow `base, 2*base, 4*base, ...` up to `cap`; each delay is drawn uniformly
/// from `[d/2, d]` so replicas that failed together do not retry together.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        debug_assert!(base <= cap);
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .base
            .saturating_mul(2u32.saturating_pow(self.attempt.min(20)));
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = exp.min(self.cap);
        let floor = ceiling / 2;
        let jitter = rand::rng().random_range(0..=(ceiling - floor).as_millis() as u64);
        floor + Duration::from_millis(jitter)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_stays_under_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for i in 0..50 {
            let d = b.next_delay();
            if i < 5 {
                continue;
            }
            assert!(d <= Duration::from_secs(2), "{d:?}");
            assert!(d >= Duration::from_secs(1), "{d:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
