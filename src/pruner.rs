//! TTL pruner: deletes `processed_events` rows past `expires_at`, in bounded batches.
//!
//! Each batch is its own short transaction (`--prune-batch-size` rows, oldest first,
//! `SKIP LOCKED` so it never waits on the gate), followed by `--prune-pause`, so the
//! pruner never holds long locks or builds a giant transaction. One pruner per schema
//! works at a time (advisory lock on its own connection); other replicas stand by.
//!
//! Expiry does not depend on the pruner keeping up: the gate treats an expired row as
//! absent (`ON CONFLICT ... DO UPDATE ... WHERE expires_at <= now()`), so an id whose TTL
//! passed is accepted again as new whether or not its row was deleted yet.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::metrics::Metrics;
use crate::settings::DbSettings;
pub use crate::settings::PruneSettings;
use crate::store::lock::{sleep_or_stop, SingletonLock};
pub use crate::store::prune::prune_batch;

/// One full round: batches until fewer than `batch_size` rows were deleted.
pub async fn prune_round(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    settings: &PruneSettings,
    metrics: &Metrics,
    stop: &CancellationToken,
) -> Result<u64, sqlx::Error> {
    let started = Instant::now();
    let mut total = 0;
    loop {
        let deleted = prune_batch(conn, now, settings.batch_size).await?;
        total += deleted;
        metrics.rows_pruned.inc_by(deleted);
        metrics.prune_batches.inc();
        if deleted < settings.batch_size as u64 || stop.is_cancelled() {
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(settings.pause) => {}
        }
    }
    metrics
        .prune_duration
        .observe(started.elapsed().as_secs_f64());
    Ok(total)
}

/// Runs prune rounds every `interval` while holding the pruner lock, until `stop`.
pub async fn run(
    db: DbSettings,
    settings: PruneSettings,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let lock = SingletonLock {
        role: "pruner",
        db,
        standby_retry: settings.interval,
    };
    // A round that fails for good (a revoked grant, a dropped table) must not reconnect
    // and fail again in a tight loop: the wait grows up to the prune interval.
    let mut failed = crate::retry::Backoff::new(
        Duration::from_millis(500).min(settings.interval),
        settings.interval,
    );
    while let Ok(mut conn) = lock.acquire(&stop).await {
        loop {
            match prune_round(&mut conn, Utc::now(), &settings, &metrics, &stop).await {
                Ok(0) => failed.reset(),
                Ok(n) => {
                    failed.reset();
                    info!(rows = n, "pruned expired processed_events rows")
                }
                Err(e) => {
                    let delay = failed.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "prune round failed; reconnecting");
                    drop(conn);
                    sleep_or_stop(delay, &stop).await;
                    break;
                }
            }
            if stop.is_cancelled() {
                return;
            }
            sleep_or_stop(settings.interval, &stop).await;
            if stop.is_cancelled() {
                return;
            }
        }
    }
}
