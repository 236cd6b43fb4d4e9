//! The gate statement's text, one per kind of sink, and how its answer is read back.

use std::time::Duration;

use crate::store::DbError;

/// The forwarding write that follows a gate statement, in its transaction.
#[derive(Debug, Clone)]
pub(super) enum After {
    /// A statement over the first sightings (see [`crate::store::app_rows`]).
    AppRows(String),
    /// The Kafka sink's outbox: one batch row per stream, its streams named with this
    /// prefix (see [`crate::store::outbox::write_batches`]).
    Outbox(&'static str),
}

/// The gate statement for one sink, built once at start.
#[derive(Debug, Clone)]
pub struct GateStatement {
    pub(super) sql: String,
    /// What runs after the gate statement in the same transaction, over the rows it
    /// inserted.
    pub(super) after: Option<After>,
    /// The lease of a status-gated sink ([`GateStatement::leased`]): owner and length.
    pub(super) lease: Option<(String, Duration)>,
}

impl GateStatement {
    /// The gate with `forward` as the sink's forwarding write: data-modifying CTEs (each
    /// `name AS (...),`) that read `batch b JOIN gate g ON g.event_key = b.event_key` (see
    /// the module docs), or `None` for a sink that writes nothing in the statement.
    pub fn new(forward: Option<&str>) -> Self {
        let forward = forward.unwrap_or_default();
        GateStatement {
            sql: format!(
                "{GATE_BATCH}{GATE_HEAD}{forward}{GATE_DECIDED}{GATE_COUNTED}{GATE_SELECT}"
            ),
            after: None,
            lease: None,
        }
    }

    /// The status gate of a sink whose forwarding write cannot join the transaction (the
    /// HTTP sink): a first sighting is inserted `PROCESSING`, leased to `owner` for
    /// `lease`, and so is a row taken over: one `FAILED`, or `PROCESSING` with an expired
    /// lease. Only a `PROCESSED` row (or one of another sink, status NULL) is a duplicate;
    /// a `PROCESSING` row with a live lease is [`super::GateOutcome::Busy`].
    pub fn leased(owner: String, lease: Duration) -> Self {
        GateStatement {
            sql: format!(
                "{GATE_BATCH}{GATE_HEAD_LEASED}{GATE_DECIDED_LEASED}{GATE_COUNTED}{GATE_SELECT}"
            ),
            after: None,
            lease: Some((owner, lease)),
        }
    }

    /// The gate with no write of its own, followed by `statement` (made by
    /// [`crate::store::app_rows::with_events`]) over the first sightings. Keys, values and
    /// headers then go to Postgres once, with that statement. The running totals are
    /// upserted after it, in a statement of their own: in the gate statement they would
    /// hold the hot counters row locked while the sink statement runs, and the lanes
    /// (and replicas) of one scope would write their rows one at a time.
    pub fn followed_by(statement: String) -> Self {
        GateStatement {
            sql: unforwarded_sql(),
            after: Some(After::AppRows(statement)),
            lease: None,
        }
    }

    /// The statement's text (the benchmark runs it as it ships).
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The Kafka sink's gate: the gate statement with no write of its own, followed by
    /// the outbox write of the first sightings ([`crate::store::outbox::write_batches`]), one row
    /// per stream (`prefix` + the input partition) holding its events and their next seqs.
    /// Keys, values and headers go to Postgres once, encoded in that row; the totals are
    /// upserted last, as in [`GateStatement::followed_by`].
    pub fn outboxed(prefix: &'static str) -> Self {
        GateStatement {
            sql: unforwarded_sql(),
            after: Some(After::Outbox(prefix)),
            lease: None,
        }
    }

    /// The statement that follows the gate, if any.
    pub fn after(&self) -> Option<&str> {
        match &self.after {
            Some(After::AppRows(sql)) => Some(sql),
            _ => None,
        }
    }
}

/// The gate statement of a sink whose forwarding write and running totals follow it in
/// the transaction ([`GateStatement::followed_by`], [`GateStatement::outboxed`]).
fn unforwarded_sql() -> String {
    format!("{GATE_BATCH}{GATE_HEAD}{GATE_DECIDED}{GATE_SELECT}")
}

// Gate rows are inserted in event_key order: two replicas inserting overlapping ids then lock
// them in the same order, which rules out deadlocks between their transactions.
const GATE_BATCH: &str = r#"
WITH batch AS (
    SELECT *
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int4[], $5::int8[], $6::int8[],
                $7::bytea[], $8::bytea[], $9::bytea[], $10::bytea[], $14::uuid[])
         WITH ORDINALITY
         AS b(scope, event_id, source_topic, source_partition, source_offset,
              source_timestamp_ms, payload_hash, key, value, headers, event_key, ord)
),
"#;

const GATE_HEAD: &str = r#"gate AS (
    INSERT INTO processed_events
        (event_key, scope, event_id, source_topic, source_partition, source_offset,
         payload_hash, first_seen_at, expires_at)
    SELECT event_key, scope, event_id, source_topic, source_partition, source_offset,
           payload_hash, now(), now() + make_interval(secs => $11)
    FROM batch
    ORDER BY event_key
    -- An expired row is treated as absent even before the pruner deleted it: the id is
    -- accepted again as new, which is what a TTL means.
    ON CONFLICT (event_key) DO UPDATE
        SET source_topic = EXCLUDED.source_topic,
            source_partition = EXCLUDED.source_partition,
            source_offset = EXCLUDED.source_offset,
            payload_hash = EXCLUDED.payload_hash,
            first_seen_at = EXCLUDED.first_seen_at,
            expires_at = EXCLUDED.expires_at
        WHERE processed_events.expires_at <= now()
    RETURNING event_key
),
"#;

// The row already there is looked up per batch row through the primary key (a LATERAL
// subquery with a LIMIT, which the planner cannot flatten into a join), not joined: on a table whose statistics lag its growth
// (a new deployment, a schema filled since the last ANALYZE) the planner hashed the whole
// table for every batch, 11 ms per batch at 21,812 rows and growing with it (auto_explain of
// the bench's end-to-end run).
const GATE_DECIDED: &str = r#"
decided AS (
    SELECT b.ord, b.scope,
           g.event_key IS NOT NULL AS inserted,
           pe.source_topic, pe.source_partition, pe.source_offset,
           (pe.event_key IS NOT NULL AND pe.payload_hash IS DISTINCT FROM b.payload_hash)
               AS payload_differs,
           false AS busy, false AS taken_over
    FROM batch b
    LEFT JOIN gate g ON g.event_key = b.event_key
    LEFT JOIN LATERAL (
        SELECT * FROM processed_events p0
        WHERE g.event_key IS NULL AND p0.event_key = b.event_key
        LIMIT 1
    ) pe ON true
)"#;

// The status gate (GateStatement::leased): as GATE_HEAD, after the same GATE_BATCH, but the row starts PROCESSING
// with a lease ($15 owner, $16 seconds), and a conflict also takes over a FAILED row or a
// PROCESSING row whose lease expired. A takeover keeps the first sighting's position and
// the attempts so far; only an expired TTL starts the row afresh. ON CONFLICT DO UPDATE
// evaluates the WHERE against the latest committed version of the row (waiting for a
// replica's transaction that holds it), so two replicas never both take one row.
const GATE_HEAD_LEASED: &str = r#"gate AS (
    INSERT INTO processed_events AS p
        (event_key, scope, event_id, source_topic, source_partition, source_offset,
         payload_hash, first_seen_at, expires_at, status, lease_owner, lease_expires_at)
    SELECT event_key, scope, event_id, source_topic, source_partition, source_offset,
           payload_hash, now(), now() + make_interval(secs => $11),
           'PROCESSING', $15, now() + make_interval(secs => $16)
    FROM batch
    ORDER BY event_key
    ON CONFLICT (event_key) DO UPDATE
        SET source_topic = CASE WHEN p.expires_at <= now() THEN EXCLUDED.source_topic ELSE p.source_topic END,
            source_partition = CASE WHEN p.expires_at <= now() THEN EXCLUDED.source_partition ELSE p.source_partition END,
            source_offset = CASE WHEN p.expires_at <= now() THEN EXCLUDED.source_offset ELSE p.source_offset END,
            payload_hash = CASE WHEN p.expires_at <= now() THEN EXCLUDED.payload_hash ELSE p.payload_hash END,
            first_seen_at = CASE WHEN p.expires_at <= now() THEN EXCLUDED.first_seen_at ELSE p.first_seen_at END,
            attempts = CASE WHEN p.expires_at <= now() THEN 0 ELSE p.attempts END,
            expires_at = CASE WHEN p.expires_at <= now() THEN EXCLUDED.expires_at ELSE p.expires_at END,
            status = 'PROCESSING',
            lease_owner = EXCLUDED.lease_owner,
            lease_expires_at = EXCLUDED.lease_expires_at,
            finished_at = NULL
        WHERE p.expires_at <= now()
           OR p.status = 'FAILED'
           OR (p.status = 'PROCESSING' AND p.lease_expires_at <= now())
    RETURNING event_key
),
"#;

// pe is the row as this statement's snapshot saw it, before the insert: for a row taken
// over, what it was taken from. A row not inserted is a duplicate only when its final
// status is visible (PROCESSED, or NULL: another sink's row); anything else (a live lease,
// a row taken by a replica a moment ago, a row this snapshot cannot see yet) is busy.
const GATE_DECIDED_LEASED: &str = r#"
decided AS (
    SELECT b.ord, b.scope,
           g.event_key IS NOT NULL AS inserted,
           pe.source_topic, pe.source_partition, pe.source_offset,
           (pe.event_key IS NOT NULL AND pe.payload_hash IS DISTINCT FROM b.payload_hash)
               AS payload_differs,
           coalesce(g.event_key IS NULL
               AND (pe.event_key IS NULL OR pe.status IN ('PROCESSING', 'FAILED')), false) AS busy,
           coalesce(g.event_key IS NOT NULL AND pe.status = 'PROCESSING'
               AND pe.expires_at > now(), false) AS taken_over
    FROM batch b
    LEFT JOIN gate g ON g.event_key = b.event_key
    LEFT JOIN LATERAL (
        SELECT * FROM processed_events p0 WHERE p0.event_key = b.event_key LIMIT 1
    ) pe ON true
)"#;

// Running totals for `kdedup stats`, one upsert per scope in this batch. A duplicate is a
// row not inserted whose payload matches the first one (a reused id with another payload
// is a mismatch, not a duplicate), plus the in-batch duplicates the caller removed before
// this statement ($12 scopes, $13 counts). The counters row of a scope is a hot row: the
// transactions of all replicas gating that scope take its lock at the end of this
// statement and keep it until their COMMIT, so they serialise there for one round trip.
// Scopes are locked in order, and only after every gate row, so this cannot deadlock.
const GATE_COUNTED: &str = r#",
counted AS (
    INSERT INTO gate_counters AS c (scope, duplicates, forwarded)
    SELECT scope, sum(duplicates)::int8, sum(forwarded)::int8
    FROM (
        SELECT scope, (NOT inserted AND NOT payload_differs AND NOT busy)::int AS duplicates,
               inserted::int AS forwarded
        FROM decided
        UNION ALL
        SELECT scope, n, 0 FROM UNNEST($12::text[], $13::int8[]) AS d(scope, n)
    ) t
    GROUP BY scope
    ORDER BY scope
    ON CONFLICT (scope) DO UPDATE
        SET duplicates = c.duplicates + EXCLUDED.duplicates,
            forwarded = c.forwarded + EXCLUDED.forwarded,
            updated_at = now()
    RETURNING 1
)"#;

// Only the rows with something to say: a row left out is a plain first sighting (see
// `every_row`), which at a low duplicate rate is nearly every row, and then the statement
// sorts, sends and kdedup decodes next to nothing.
const GATE_SELECT: &str = r#"
SELECT ord, inserted, source_topic, source_partition, source_offset, payload_differs,
       busy, taken_over
FROM decided
WHERE (inserted AND NOT payload_differs AND NOT busy AND NOT taken_over
       AND source_topic IS NULL AND source_partition IS NULL AND source_offset IS NULL)
      IS NOT TRUE
ORDER BY ord
"#;

/// The gate's answer for each of a batch's `len` rows, in batch order, from the rows the
/// statement returned: those it left out are plain first sightings.
pub(super) fn every_row(
    returned: Vec<GateResultRow>,
    len: usize,
) -> Result<Vec<GateResultRow>, DbError> {
    let mut all: Vec<GateResultRow> = (1..=len as i64)
        .map(|ord| (ord, true, None, None, None, false, false, false))
        .collect();
    for row in returned {
        // `ord` is the row's ordinality in the arrays this statement was given.
        let ord = row.0;
        let slot = usize::try_from(ord - 1).ok().and_then(|i| all.get_mut(i));
        let Some(slot) = slot else {
            return Err(DbError::Sqlx(sqlx::Error::Protocol(format!(
                "the gate statement answered for position {ord} of a batch of {len}"
            ))));
        };
        *slot = row;
    }
    Ok(all)
}

/// `(ord, inserted, first topic, first partition, first offset, payload differs, busy,
/// taken over)`.
pub(super) type GateResultRow = (
    i64,
    bool,
    Option<String>,
    Option<i32>,
    Option<i64>,
    bool,
    bool,
    bool,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_the_statement_leaves_out_are_plain_first_sightings() {
        let duplicate = (
            2,
            false,
            Some("in".to_string()),
            Some(0),
            Some(7),
            false,
            false,
            false,
        );
        let all = every_row(vec![duplicate.clone()], 3).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0], (1, true, None, None, None, false, false, false));
        assert_eq!(all[1], duplicate);
        assert_eq!(all[2], (3, true, None, None, None, false, false, false));
        assert!(every_row(Vec::new(), 0).unwrap().is_empty());
        let err = every_row(vec![duplicate], 1).unwrap_err().to_string();
        assert!(err.contains("position 2 of a batch of 1"), "{err}");
    }
}
