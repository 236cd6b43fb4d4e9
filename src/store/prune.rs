//! Deleting expired gate rows.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// Deletes at most `batch_size` rows that expired at or before `now`, oldest first,
/// skipping rows a gate transaction holds; returns how many.
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
