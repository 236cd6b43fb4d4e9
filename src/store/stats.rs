//! Read-only figures about the gate tables, for the gauges every replica exports.

use sqlx::PgPool;

use super::outbox;

/// The tables' figures at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TableStats {
    /// `processed_events` rows (the statistics collector's live-row count).
    pub processed_events_rows: i64,
    /// Outbox rows waiting to be published.
    pub outbox_backlog: i64,
    /// Age of the oldest outbox row, seconds (0 when empty).
    pub outbox_oldest_age_s: i64,
    /// Age of the oldest gate row, seconds (0 when empty).
    pub oldest_row_age_s: i64,
}

/// Reads [`TableStats`] in one transaction whose statements may take at most a second
/// each: every replica runs this every 2 s, so a slow database (or a huge backlog) skips a
/// refresh instead of piling up queries.
pub async fn table_stats(pool: &PgPool) -> Result<TableStats, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL statement_timeout = '1s'")
        .execute(&mut *tx)
        .await?;
    // The statistics collector's live-tuple count follows inserts and deletes within a
    // second or so; the planner's reltuples waits for the next ANALYZE (and is -1 on a
    // table never analyzed), so it is only the fallback.
    let rows: Option<i64> = sqlx::query_scalar(
        "SELECT greatest(coalesce(s.n_live_tup, c.reltuples::int8), 0)::int8
         FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
         WHERE c.oid = to_regclass('processed_events')",
    )
    .fetch_optional(&mut *tx)
    .await?
    .flatten();
    let oldest = outbox::oldest_age(&mut *tx).await?;
    let backlog = outbox::backlog(&mut *tx).await?;
    // The row that expires first is the oldest one (the TTL is the same for every row
    // written by one configuration); found through the pruner's index, not a scan.
    let oldest_row: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - first_seen_at)::float8 FROM processed_events \
         ORDER BY expires_at LIMIT 1",
    )
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(TableStats {
        processed_events_rows: rows.unwrap_or(0),
        outbox_backlog: backlog,
        outbox_oldest_age_s: oldest.map_or(0, |s| s.max(0.0) as i64),
        oldest_row_age_s: oldest_row.map_or(0, |s| s.max(0.0) as i64),
    })
}

/// Whether `scope` has ever been gated in this schema, and the scopes that have (the
/// busiest first, at most `limit`), from `gate_counters`.
pub async fn scopes_seen(
    pool: &PgPool,
    scope: &str,
    limit: i64,
) -> Result<(bool, Vec<String>), sqlx::Error> {
    let seen: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM gate_counters WHERE scope = $1)")
            .bind(scope)
            .fetch_one(pool)
            .await?;
    let others: Vec<String> = sqlx::query_scalar(
        "SELECT scope FROM gate_counters WHERE scope <> $1 ORDER BY forwarded + duplicates DESC LIMIT $2",
    )
    .bind(scope)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok((seen, others))
}
