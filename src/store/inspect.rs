//! The read-only queries of `kdedup inspect` and `kdedup stats`: one connection of their
//! own, one `REPEATABLE READ READ ONLY` transaction (a consistent snapshot; `now()` is the
//! same in every query) under a statement timeout; nothing is written.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection, Postgres, Transaction};

use crate::settings::DbSettings;
use crate::store as db;

/// Above this many rows (Postgres' `reltuples` estimate) `stats` reports the estimate
/// instead of `count(*)`, and takes the oldest/newest first sighting from the ends of the
/// `expires_at` index instead of scanning the table (exact as long as the TTL never
/// changed).
pub const EXACT_COUNT_LIMIT: i64 = 1_000_000;

/// Longest any single query of `inspect` or `stats` may run.
const STATEMENT_TIMEOUT: &str = "60s";

/// One `processed_events` row of the inspected id.
#[derive(Debug, Clone, PartialEq)]
pub struct Sighting {
    pub scope: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub payload_hash: Option<Vec<u8>>,
    pub first_seen_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// When its outbox row was written, while the relay has not published it yet.
    pub queued_since: Option<DateTime<Utc>>,
    /// The HTTP sink's status gate, for a row that sink wrote.
    pub delivery: Option<Delivery>,
}

/// The HTTP sink's record of a delivery (migration 4).
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// `PROCESSING`, `PROCESSED` or `FAILED`.
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub response_status: Option<i32>,
    pub response_headers: Option<serde_json::Value>,
    pub response_body: Option<Vec<u8>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl Sighting {
    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at <= now
    }

    pub fn status(&self) -> &'static str {
        match &self.delivery {
            Some(d) if d.status == "PROCESSED" => "delivered",
            Some(d) if d.status == "FAILED" => "delivery failed",
            Some(_) => "being delivered",
            None if self.queued_since.is_some() => "queued for output",
            None => "forwarded",
        }
    }
}

type DeliveryRow = (
    String,
    String,
    i32,
    Option<String>,
    Option<String>,
    Option<DateTime<Utc>>,
    Option<i32>,
    Option<String>,
    Option<Vec<u8>>,
    Option<DateTime<Utc>>,
);

/// What `kdedup inspect` found.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub event_id: String,
    pub scope: Option<String>,
    pub schema: String,
    pub now: DateTime<Utc>,
    pub sightings: Vec<Sighting>,
}

/// Totals of one scope in `gate_counters`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScopeCounters {
    pub scope: String,
    pub duplicates: i64,
    pub forwarded: i64,
    pub since: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What `kdedup stats` read.
#[derive(Debug, Clone)]
pub struct Stats {
    pub schema: String,
    pub now: DateTime<Utc>,
    pub rows: i64,
    /// `count(*)`, or else Postgres' estimate (above [`EXACT_COUNT_LIMIT`]).
    pub rows_exact: bool,
    /// Oldest and newest `first_seen_at`.
    pub first_seen: Option<(DateTime<Utc>, DateTime<Utc>)>,
    /// Earliest and latest `expires_at`: the expiry horizon.
    pub expires: Option<(DateTime<Utc>, DateTime<Utc>)>,
    /// Rows past `expires_at` the pruner has not deleted yet.
    pub expired_rows: i64,
    pub outbox_rows: i64,
    pub outbox_oldest: Option<DateTime<Utc>>,
    /// `None` when the schema predates the `gate_counters` migration.
    pub counters: Option<Vec<ScopeCounters>>,
    /// The HTTP sink's status gate; `None` when no row has a status (the other sinks).
    pub deliveries: Option<Deliveries>,
}

/// `processed_events` rows by delivery status (the HTTP sink's status gate).
#[derive(Debug, Clone, PartialEq)]
pub struct Deliveries {
    /// Being delivered, leased to a replica (exact: the partial index on them).
    pub processing: i64,
    /// Of those, past their lease: their replica died or lost Postgres (exact).
    pub processing_expired: i64,
    pub processed: i64,
    /// Dead-lettered after their last attempt; `kdedup replay` delivers them again.
    pub failed: i64,
    /// `processed` and `failed` are `count(*)`, or else Postgres' estimate from the
    /// column's statistics (above [`EXACT_COUNT_LIMIT`] rows).
    pub exact: bool,
}

impl Stats {
    pub fn duplicates(&self) -> Option<i64> {
        self.counters
            .as_ref()
            .map(|c| c.iter().map(|s| s.duplicates).sum())
    }

    pub fn forwarded(&self) -> Option<i64> {
        self.counters
            .as_ref()
            .map(|c| c.iter().map(|s| s.forwarded).sum())
    }
}

async fn connect(cfg: &DbSettings) -> anyhow::Result<PgConnection> {
    let mut conn = tokio::time::timeout(Duration::from_secs(10), db::dedicated_connection(cfg))
        .await
        .map_err(|_| anyhow::anyhow!("cannot connect to Postgres within 10s"))?
        .map_err(|e| db::ConnectConfigError::or_context(cfg, e))?;
    sqlx::query(&format!("SET statement_timeout = '{STATEMENT_TIMEOUT}'"))
        .execute(&mut conn)
        .await?;
    Ok(conn)
}

async fn snapshot(conn: &mut PgConnection) -> anyhow::Result<Transaction<'_, Postgres>> {
    let mut tx = conn.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// `(processed_events, outbox, gate_counters)` exist in the schema.
async fn tables(
    tx: &mut Transaction<'_, Postgres>,
    schema: &str,
) -> anyhow::Result<(bool, bool, bool)> {
    let found: (bool, bool, bool) = sqlx::query_as(
        "SELECT to_regclass('processed_events') IS NOT NULL,
                to_regclass('outbox') IS NOT NULL AND to_regclass('relay_outbox') IS NOT NULL,
                to_regclass('gate_counters') IS NOT NULL",
    )
    .fetch_one(&mut **tx)
    .await?;
    if !found.0 || !found.1 {
        anyhow::bail!(
            "schema {schema:?} holds no kdedup tables: check --db-schema / KDEDUP_DB_SCHEMA, \
             or apply the migrations (kdedup migrate)"
        );
    }
    Ok(found)
}

type SightingRow = (
    String,
    String,
    i32,
    i64,
    Option<Vec<u8>>,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
);

// An outbox entry waits in one of the streams of its first sighting's partition (live,
// replay or upgrade), past that stream's checkpoint: a range of the (stream, last_seq)
// index of relay_batches (its ids unnested) or of the (stream, seq) index of relay_outbox,
// short unless the relay has been down for a long time. The previous version's outbox has no
// index on the id, and is empty once a relay of this version ran.
const SIGHTING_COLUMNS: &str = "pe.scope, pe.source_topic, pe.source_partition, \
    pe.source_offset, pe.payload_hash, pe.first_seen_at, pe.expires_at, \
    (SELECT min(t) FROM ( \
        SELECT o.created_at AS t FROM relay_batches o \
        LEFT JOIN relay_checkpoints c ON c.stream = o.stream \
        CROSS JOIN LATERAL unnest(o.scopes, o.event_ids) WITH ORDINALITY AS u(scope, event_id, i) \
        WHERE o.stream IN (pe.source_topic || '/' || pe.source_partition, \
                           'replay:' || pe.source_topic || '/' || pe.source_partition) \
          AND o.last_seq > coalesce(c.published_seq, 0) \
          AND o.first_seq + u.i - 1 > coalesce(c.published_seq, 0) \
          AND u.scope = pe.scope AND u.event_id = pe.event_id \
        UNION ALL \
        SELECT o.created_at AS t FROM relay_outbox o \
        LEFT JOIN relay_checkpoints c ON c.stream = o.stream \
        WHERE o.stream IN (pe.source_topic || '/' || pe.source_partition, \
                           'replay:' || pe.source_topic || '/' || pe.source_partition, \
                           'upgrade:' || pe.source_topic || '/' || pe.source_partition) \
          AND o.seq > coalesce(c.published_seq, 0) \
          AND o.scope = pe.scope AND o.event_id = pe.event_id \
        UNION ALL \
        SELECT o.created_at FROM outbox o WHERE o.scope = pe.scope AND o.event_id = pe.event_id \
    ) waiting) AS queued_since";

/// Looks `event_id` up in one scope, or in every scope. Either way each lookup is a probe
/// of the primary key, `event_key(scope, event_id)`; without a scope, the scopes are the
/// ones `gate_counters` has seen (one probe per scope).
pub async fn inspect(
    cfg: &DbSettings,
    event_id: &str,
    scope: Option<&str>,
) -> anyhow::Result<Inspection> {
    let mut conn = connect(cfg).await?;
    let mut tx = snapshot(&mut conn).await?;
    tables(&mut tx, &cfg.schema).await?;
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *tx)
        .await?;
    let rows: Vec<SightingRow> = match scope {
        Some(scope) => {
            sqlx::query_as(&format!(
                "SELECT {SIGHTING_COLUMNS} FROM processed_events pe
                 WHERE pe.event_key = event_key($1, $2)"
            ))
            .bind(scope)
            .bind(event_id)
            .fetch_all(&mut *tx)
            .await?
        }
        None => {
            sqlx::query_as(&format!(
                // Every scope that ever gated an event has its row in gate_counters
                // (written by the same statement as its processed_events rows).
                "SELECT {SIGHTING_COLUMNS}
                 FROM gate_counters s
                 JOIN processed_events pe ON pe.event_key = event_key(s.scope, $1)
                 ORDER BY pe.scope"
            ))
            .bind(event_id)
            .fetch_all(&mut *tx)
            .await?
        }
    };
    // The HTTP sink's columns, in a schema migrated far enough to have them.
    let has_status: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns
                        WHERE table_schema = current_schema()
                          AND table_name = 'processed_events' AND column_name = 'status')",
    )
    .fetch_one(&mut *tx)
    .await?;
    let mut deliveries: std::collections::HashMap<String, Delivery> = Default::default();
    if has_status {
        let scopes: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        let found: Vec<DeliveryRow> = sqlx::query_as(
            "SELECT scope, status, attempts, last_error, lease_owner, lease_expires_at,
                    response_status, response_headers::text, response_body, finished_at
             FROM processed_events
             WHERE event_key = ANY (SELECT event_key(s, $2) FROM UNNEST($1::text[]) AS s)
               AND status IS NOT NULL",
        )
        .bind(&scopes)
        .bind(event_id)
        .fetch_all(&mut *tx)
        .await?;
        for (scope, status, attempts, last_error, owner, lease, rs, rh, rb, finished) in found {
            deliveries.insert(
                scope,
                Delivery {
                    status,
                    attempts,
                    last_error,
                    lease_owner: owner,
                    lease_expires_at: lease,
                    response_status: rs,
                    response_headers: rh.and_then(|h| serde_json::from_str(&h).ok()),
                    response_body: rb,
                    finished_at: finished,
                },
            );
        }
    }
    tx.rollback().await?;
    Ok(Inspection {
        event_id: event_id.to_string(),
        scope: scope.map(str::to_string),
        schema: cfg.schema.clone(),
        now,
        sightings: rows
            .into_iter()
            .map(
                |(scope, topic, partition, offset, hash, first_seen, expires, queued)| Sighting {
                    delivery: deliveries.remove(&scope),
                    scope,
                    source_topic: topic,
                    source_partition: partition,
                    source_offset: offset,
                    payload_hash: hash,
                    first_seen_at: first_seen,
                    expires_at: expires,
                    queued_since: queued,
                },
            )
            .collect(),
    })
}

/// `(scope, duplicates, forwarded, created_at, updated_at)` of `gate_counters`.
type CounterRow = (String, i64, i64, DateTime<Utc>, DateTime<Utc>);

/// Reads the numbers `kdedup stats` prints.
pub async fn stats(cfg: &DbSettings) -> anyhow::Result<Stats> {
    let mut conn = connect(cfg).await?;
    let mut tx = snapshot(&mut conn).await?;
    let (_, _, has_counters) = tables(&mut tx, &cfg.schema).await?;
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *tx)
        .await?;
    // -1 until the table was first analysed.
    let estimate: i64 = sqlx::query_scalar(
        "SELECT reltuples::int8 FROM pg_class WHERE oid = 'processed_events'::regclass",
    )
    .fetch_one(&mut *tx)
    .await?;
    // PROCESSED and FAILED rows, counted in the same scan when the table is counted.
    let mut statuses: Option<(i64, i64)> = None;
    let (rows, rows_exact, oldest, newest) = if estimate > EXACT_COUNT_LIMIT {
        // Both ends of the expires_at index: no table scan.
        let (oldest, newest): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = sqlx::query_as(
            "SELECT (SELECT first_seen_at FROM processed_events ORDER BY expires_at LIMIT 1),
                    (SELECT first_seen_at FROM processed_events ORDER BY expires_at DESC LIMIT 1)",
        )
        .fetch_one(&mut *tx)
        .await?;
        (estimate, false, oldest, newest)
    } else {
        type Counted = (i64, Option<DateTime<Utc>>, Option<DateTime<Utc>>, i64, i64);
        let (n, oldest, newest, processed, failed): Counted = sqlx::query_as(
            "SELECT count(*), min(first_seen_at), max(first_seen_at),
                    count(*) FILTER (WHERE status = 'PROCESSED'),
                    count(*) FILTER (WHERE status = 'FAILED')
             FROM processed_events",
        )
        .fetch_one(&mut *tx)
        .await?;
        statuses = Some((processed, failed));
        (n, true, oldest, newest)
    };
    let (earliest, latest): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT min(expires_at), max(expires_at) FROM processed_events")
            .fetch_one(&mut *tx)
            .await?;
    let expired_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM processed_events WHERE expires_at <= now()")
            .fetch_one(&mut *tx)
            .await?;
    let outbox_rows = super::outbox::backlog(&mut *tx).await?;
    let outbox_oldest = super::outbox::oldest_age(&mut *tx)
        .await?
        .map(|age| now - chrono::Duration::milliseconds((age * 1000.0) as i64));
    let counters = if has_counters {
        let rows: Vec<CounterRow> = sqlx::query_as(
            "SELECT scope, duplicates, forwarded, created_at, updated_at FROM gate_counters
             ORDER BY duplicates DESC, scope",
        )
        .fetch_all(&mut *tx)
        .await?;
        Some(
            rows.into_iter()
                .map(
                    |(scope, duplicates, forwarded, since, updated_at)| ScopeCounters {
                        scope,
                        duplicates,
                        forwarded,
                        since,
                        updated_at,
                    },
                )
                .collect(),
        )
    } else {
        None
    };
    let deliveries = deliveries(&mut tx, rows, statuses).await?;
    tx.rollback().await?;
    Ok(Stats {
        schema: cfg.schema.clone(),
        now,
        rows,
        rows_exact,
        first_seen: oldest.zip(newest),
        expires: earliest.zip(latest),
        expired_rows,
        outbox_rows,
        outbox_oldest,
        counters,
        deliveries,
    })
}

/// Rows by delivery status. `PROCESSING` from its partial index; `PROCESSED` and `FAILED`
/// as `counted` (a small table's count), or else from the `status` column's statistics
/// (`pg_stats`: the most common values and their frequencies, times the row estimate).
async fn deliveries(
    tx: &mut Transaction<'_, Postgres>,
    rows: i64,
    counted: Option<(i64, i64)>,
) -> anyhow::Result<Option<Deliveries>> {
    let (processing, processing_expired): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE lease_expires_at <= now())
         FROM processed_events WHERE status = 'PROCESSING'",
    )
    .fetch_one(&mut **tx)
    .await?;
    let (processed, failed) = if let Some(counted) = counted {
        counted
    } else {
        let mcv: Option<(Vec<String>, Vec<f32>)> = sqlx::query_as(
            "SELECT most_common_vals::text::text[], most_common_freqs FROM pg_stats
             WHERE schemaname = current_schema() AND tablename = 'processed_events'
               AND attname = 'status' AND most_common_vals IS NOT NULL",
        )
        .fetch_optional(&mut **tx)
        .await?;
        let share = |status: &str| -> i64 {
            mcv.as_ref()
                .and_then(|(vals, freqs)| {
                    vals.iter()
                        .position(|v| v == status)
                        .map(|i| (f64::from(freqs[i]) * rows as f64).round() as i64)
                })
                .unwrap_or(0)
        };
        (share("PROCESSED"), share("FAILED"))
    };
    Ok((processing + processed + failed > 0).then_some(Deliveries {
        processing,
        processing_expired,
        processed,
        failed,
        exact: counted.is_some(),
    }))
}
