//! Crash points: where the crash tests kill the process, at an exact step.
//!
//! A SIGKILL from outside lands at a random moment; the steps that matter for
//! correctness are narrower than that (between the gate's statement and its COMMIT,
//! between the COMMIT and the offset commit, between the broker's ack and the relay's
//! checkpoint). With the `crash-points` feature, `KDEDUP_CRASH_AT=<point>[:<n>]` aborts the
//! process the `n`-th time (default 1st) it reaches `<point>`: no drain, no offset commit,
//! no destructor, as a SIGKILL would. Without the feature [`reached`] compiles to nothing.

/// The named steps. Their order is the life of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// The gate statement ran inside its transaction; COMMIT was not sent.
    BeforeDbCommit,
    /// The gate transaction committed; the batch's offsets were not stored.
    AfterDbCommit,
    /// The batch's offsets were committed to the group coordinator (synchronously).
    AfterOffsetCommit,
    /// The broker acknowledged the relay's sends; the checkpoint recording them was not
    /// written.
    RelayAfterAck,
}

// Names and parsing are needed only where points can be armed (and by the unit tests).
#[cfg(any(test, feature = "crash-points"))]
impl Point {
    pub const ALL: [Point; 4] = [
        Point::BeforeDbCommit,
        Point::AfterDbCommit,
        Point::AfterOffsetCommit,
        Point::RelayAfterAck,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Point::BeforeDbCommit => "before-db-commit",
            Point::AfterDbCommit => "after-db-commit",
            Point::AfterOffsetCommit => "after-offset-commit",
            Point::RelayAfterAck => "relay-after-ack",
        }
    }
}

/// Whether a crash point is armed for `point`. The caller uses it for work that only makes
/// sense right before the crash (e.g. committing offsets synchronously first).
#[cfg(feature = "crash-points")]
pub fn armed(point: Point) -> bool {
    armed_point().is_some_and(|(p, _)| p == point)
}

#[cfg(not(feature = "crash-points"))]
#[inline(always)]
pub fn armed(_point: Point) -> bool {
    false
}

/// Aborts the process if `point` is armed and this is its `n`-th arrival.
#[cfg(feature = "crash-points")]
pub fn reached(point: Point) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static ARRIVALS: AtomicU64 = AtomicU64::new(0);
    let Some((armed, n)) = armed_point() else {
        return;
    };
    if armed != point {
        return;
    }
    if ARRIVALS.fetch_add(1, Ordering::AcqRel) + 1 >= n {
        eprintln!("kdedup: crash point {} reached; aborting", point.name());
        std::process::abort();
    }
}

#[cfg(not(feature = "crash-points"))]
#[inline(always)]
pub fn reached(_point: Point) {}

/// With `KDEDUP_GATE_DELAY_MS=<ms>`, each gate transaction waits that long before its
/// COMMIT: the rebalance test uses it to keep batches in flight while partitions move.
#[cfg(feature = "crash-points")]
pub async fn gate_delay() {
    static DELAY: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let delay = *DELAY.get_or_init(|| {
        std::env::var("KDEDUP_GATE_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if let Some(ms) = delay {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

#[cfg(not(feature = "crash-points"))]
#[inline(always)]
pub async fn gate_delay() {}

#[cfg(feature = "crash-points")]
fn armed_point() -> Option<(Point, u64)> {
    static ARMED: std::sync::OnceLock<Option<(Point, u64)>> = std::sync::OnceLock::new();
    *ARMED.get_or_init(|| {
        let spec = std::env::var("KDEDUP_CRASH_AT").ok()?;
        parse(&spec)
    })
}

/// `<point>[:<n>]`; `None` for anything else.
#[cfg(any(test, feature = "crash-points"))]
pub fn parse(spec: &str) -> Option<(Point, u64)> {
    let (name, n) = match spec.split_once(':') {
        Some((name, n)) => (name, n.parse().ok().filter(|n| *n > 0)?),
        None => (spec, 1),
    };
    Point::ALL
        .into_iter()
        .find(|p| p.name() == name)
        .map(|p| (p, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_point_and_arrival() {
        assert_eq!(parse("after-db-commit"), Some((Point::AfterDbCommit, 1)));
        assert_eq!(parse("relay-after-ack:3"), Some((Point::RelayAfterAck, 3)));
        assert_eq!(parse("relay-after-ack:0"), None);
        assert_eq!(parse("nowhere"), None);
    }
}
