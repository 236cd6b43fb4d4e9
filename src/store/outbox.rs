//! The Kafka sink's outbox: rows written by the gate statement, read and deleted by the
//! relay in `id` order.

use sqlx::{PgConnection, PgExecutor};

/// The Kafka sink's forwarding write inside the gate statement (see
/// [`super::gate::GateStatement::new`]): one outbox row per inserted gate row, in input
/// order, which is the order the relay publishes in.
pub const OUTBOX_WRITE: &str = "    INSERT INTO outbox
        (scope, event_id, source_topic, source_partition, source_offset,
         source_timestamp_ms, key, value, headers)
    SELECT b.scope, b.event_id, b.source_topic, b.source_partition, b.source_offset,
           b.source_timestamp_ms, b.key, b.value, b.headers
    FROM batch b
    JOIN gate g ON g.event_key = b.event_key
    ORDER BY b.ord
    RETURNING 1";

/// One row waiting to be published.
#[derive(sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub scope: String,
    pub event_id: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub source_timestamp_ms: Option<i64>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<u8>,
}

/// The next round: the oldest outbox rows, at most `$1` of them and at most `$2` bytes of
/// keys, values and headers (always at least one row, whatever its size). The sizes come
/// from `octet_length`, which reads a stored value's length without fetching it, so rows
/// past the budget are never read. Memory per round is bounded by bytes, not only rows.
const NEXT_ROUND_SQL: &str = "
SELECT o.id, o.scope, o.event_id, o.source_topic, o.source_partition, o.source_offset,
       o.source_timestamp_ms, o.created_at, o.key, o.value, o.headers
FROM (
    SELECT id, size, sum(size) OVER (ORDER BY id) - size AS before
    FROM (
        SELECT id, coalesce(octet_length(key), 0) + coalesce(octet_length(value), 0)
                   + octet_length(headers) AS size
        FROM outbox ORDER BY id LIMIT $1
    ) candidates
) sized
JOIN outbox o ON o.id = sized.id
WHERE sized.before = 0 OR sized.before + sized.size <= $2
ORDER BY o.id";

/// The oldest rows, at most `max_rows` and `max_bytes` (at least one row).
pub async fn next_round(
    conn: &mut PgConnection,
    max_rows: usize,
    max_bytes: usize,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    sqlx::query_as(NEXT_ROUND_SQL)
        .bind(i64::try_from(max_rows).unwrap_or(i64::MAX))
        .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
        .fetch_all(conn)
        .await
}

/// Deletes rows the broker acknowledged (or the DLQ took).
pub async fn delete(conn: &mut PgConnection, ids: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(())
}

/// Outbox rows counted exactly; above this, an estimate.
pub const BACKLOG_EXACT: i64 = 100_000;

/// Rows waiting: exact up to [`BACKLOG_EXACT`]; past that (an output topic down for
/// hours) the statistics collector's estimate, so this stays a small read however large
/// the outbox grows.
pub async fn backlog<'e>(db: impl PgExecutor<'e>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT CASE WHEN exact.n <= $1 THEN exact.n
                     ELSE greatest(coalesce(s.n_live_tup, 0), exact.n) END
         FROM (SELECT count(*) AS n FROM (SELECT 1 FROM outbox LIMIT $1 + 1) o) exact
         LEFT JOIN pg_stat_user_tables s ON s.relid = to_regclass('outbox')",
    )
    .bind(BACKLOG_EXACT)
    .fetch_one(db)
    .await
}

/// Age of the oldest waiting row, in seconds (`None`: the outbox is empty).
pub async fn oldest_age<'e>(db: impl PgExecutor<'e>) -> Result<Option<f64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - created_at)::float8 FROM outbox ORDER BY id LIMIT 1",
    )
    .fetch_optional(db)
    .await
}
