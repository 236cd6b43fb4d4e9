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
use tracing::{debug, info, warn};

use crate::config::DbConfig;
use crate::db::{self, ADVISORY_LOCK_CLASS};
use crate::metrics::Metrics;
use crate::retry::Backoff;

#[derive(Debug, Clone)]
pub struct PruneSettings {
    /// Time between prune rounds.
    pub interval: Duration,
    /// Rows deleted per transaction.
    pub batch_size: i64,
    /// Pause between two batches of one round.
    pub pause: Duration,
}

/// Deletes at most `batch_size` rows that expired at or before `now`; returns how many.
pub async fn prune_batch(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    batch_size: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM processed_events
         WHERE event_key IN (
             SELECT event_key FROM processed_events
             WHERE expires_at <= $1
             ORDER BY expires_at
             LIMIT $2
             FOR UPDATE SKIP LOCKED)",
    )
    .bind(now)
    .bind(batch_size)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

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
pub async fn run(db: DbConfig, settings: PruneSettings, metrics: Metrics, stop: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    while !stop.is_cancelled() {
        let mut conn = match db::dedicated_connection(&db).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "pruner cannot reach Postgres; retrying");
                sleep_or_stop(backoff.next_delay(), &stop).await;
                continue;
            }
        };
        let locked: Result<bool, _> =
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext('pruner:' || $2))")
                .bind(ADVISORY_LOCK_CLASS)
                .bind(&db.schema)
                .fetch_one(&mut conn)
                .await;
        if !matches!(locked, Ok(true)) {
            debug!("another pruner works on this schema; standing by");
            sleep_or_stop(settings.interval, &stop).await;
            continue;
        }
        backoff.reset();
        loop {
            match prune_round(&mut conn, Utc::now(), &settings, &metrics, &stop).await {
                Ok(0) => {}
                Ok(n) => info!(rows = n, "pruned expired processed_events rows"),
                Err(e) => {
                    warn!(error = %e, "prune round failed; reconnecting");
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

async fn sleep_or_stop(d: Duration, stop: &CancellationToken) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}
