//! The Kafka sink's outbox: rows written by the gate statement in numbered streams
//! (migration `20261204000001_relay_streams.sql`), published by the relay, reclaimed in
//! bulk (see [`super::relay`]).

use sqlx::PgExecutor;

/// Stream of live input: the input partition, `topic/partition`.
pub const LIVE: &str = "";
/// Stream prefix of `kdedup replay`: its rows are numbered apart from the live ones.
pub const REPLAY: &str = "replay:";

/// The Kafka sink's forwarding write inside the gate statement (see
/// [`super::gate::GateStatement::new`]): each first sighting gets the next seq of its
/// stream (`prefix` + `topic/partition` of the input) from `outbox_seqs`, and an outbox
/// row in the current slot. The counter's row lock serialises the gate transactions of a
/// stream, so seq order is commit order and no seq is skipped. Streams are claimed in
/// name order: two transactions claiming overlapping streams lock them in the same order.
pub fn outbox_write(prefix: &'static str) -> String {
    debug_assert!(!prefix.contains('\''));
    format!(
        "numbered AS (
    SELECT b.ord, '{prefix}' || b.source_topic || '/' || b.source_partition AS stream,
           row_number() OVER (PARTITION BY b.source_topic, b.source_partition ORDER BY b.ord) AS n
    FROM batch b
    JOIN gate g ON g.event_key = b.event_key
),
counts AS (
    SELECT stream, count(*) AS n FROM numbered GROUP BY stream
),
claimed AS (
    INSERT INTO outbox_seqs AS s (stream, last_seq)
    SELECT stream, n FROM counts ORDER BY stream
    ON CONFLICT (stream) DO UPDATE SET last_seq = s.last_seq + EXCLUDED.last_seq
    RETURNING stream, last_seq
),
sequenced AS (
    SELECT n.ord, n.stream, c.last_seq - t.n + n.n AS seq
    FROM numbered n
    JOIN counts t ON t.stream = n.stream
    JOIN claimed c ON c.stream = n.stream
),
queued AS (
    INSERT INTO relay_outbox
        (slot, stream, seq, scope, event_id, source_topic, source_partition, source_offset,
         source_timestamp_ms, key, value, headers)
    SELECT (SELECT slot FROM relay_rotation), s.stream, s.seq, b.scope, b.event_id,
           b.source_topic, b.source_partition, b.source_offset, b.source_timestamp_ms, b.key,
           b.value, b.headers
    FROM sequenced s
    JOIN batch b ON b.ord = s.ord
    ORDER BY s.stream, s.seq
    RETURNING 1
),
"
    )
}

/// The stream a row of `prefix` from `topic/partition` belongs to.
pub fn stream_of(prefix: &str, topic: &str, partition: i32) -> String {
    format!("{prefix}{topic}/{partition}")
}

/// Outbox rows waiting: exact, from each stream's counter and its checkpoint (no row is
/// read), plus whatever the previous version left in the old `outbox` table.
pub async fn backlog<'e>(db: impl PgExecutor<'e>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT (SELECT coalesce(sum(s.last_seq - coalesce(c.published_seq, 0)), 0)::int8
                 FROM outbox_seqs s LEFT JOIN relay_checkpoints c ON c.stream = s.stream
                 WHERE s.last_seq > coalesce(c.published_seq, 0))
              + (SELECT count(*) FROM (SELECT 1 FROM outbox LIMIT 100000) o)",
    )
    .fetch_one(db)
    .await
}

/// Age of the oldest waiting row, in seconds (`None`: nothing waits): per stream, the row
/// right after its checkpoint, found through the (stream, seq) index.
pub async fn oldest_age<'e>(db: impl PgExecutor<'e>) -> Result<Option<f64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - min(t))::float8 FROM (
             SELECT (SELECT o.created_at FROM relay_outbox o
                     WHERE o.stream = s.stream AND o.seq > coalesce(c.published_seq, 0)
                     ORDER BY o.seq LIMIT 1) AS t
             FROM outbox_seqs s LEFT JOIN relay_checkpoints c ON c.stream = s.stream
             WHERE s.last_seq > coalesce(c.published_seq, 0)
             UNION ALL
             SELECT min(created_at) FROM outbox
         ) w",
    )
    .fetch_one(db)
    .await
}
