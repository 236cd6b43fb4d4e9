//! The HTTP sink's statements after the gate: the final status of each delivery, and the
//! lease on the rows still being delivered (see [`super::gate::GateStatement::leased`] for
//! how rows enter `PROCESSING`).
//!
//! Every statement touches only rows this replica still owns (`lease_owner` and status
//! `PROCESSING`): a row taken over after this replica's lease expired belongs to the new
//! owner, whose delivery (with the same Idempotency-Key) decides it.
//!
//! Each finds its rows by primary key. Their status test is written
//! `coalesce(status, '') = 'PROCESSING'`, which the partial index on `PROCESSING` rows
//! cannot serve, so the planner does not pick that index: it holds every row in flight of
//! every replica, and the dead entries of every row that left `PROCESSING` since the last
//! vacuum, and a plan that scans it and joins the keys costs their product. Measured on a
//! fresh bench table (no statistics yet, 51,800 entries in that index): 61 ms for 500
//! final statuses with `status = 'PROCESSING'`, 4.9 ms by primary key.

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

/// A delivery that ended, to be written with its status.
#[derive(Debug, Clone)]
pub struct Final {
    pub event_key: Uuid,
    pub processed: bool,
    /// Requests sent by this owner (added to the row's count).
    pub attempts: i32,
    /// The answer kept with the row: the successful one, or the last one of a failure.
    pub response_status: Option<i32>,
    /// A JSON object of the response's headers (PROCESSED only).
    pub response_headers: Option<String>,
    pub response_body: Option<Vec<u8>>,
    /// Why it failed (FAILED only), bounded.
    pub last_error: Option<String>,
}

/// One statement for any number of final statuses, PROCESSED and FAILED together. The
/// rows are locked in event_key order, as the gate locks them, so this cannot deadlock
/// with a gate statement of another replica.
const FINISH_SQL: &str = r#"
WITH d AS (
    SELECT * FROM UNNEST($1::uuid[], $2::bool[], $3::int4[], $4::int4[], $5::text[],
                         $6::bytea[], $7::text[])
        AS d(event_key, processed, attempts, response_status, response_headers,
             response_body, last_error)
),
locked AS (
    SELECT p.event_key FROM processed_events p
    WHERE p.event_key = ANY($1::uuid[]) AND p.lease_owner = $8
      AND coalesce(p.status, '') = 'PROCESSING'
    ORDER BY p.event_key
    FOR UPDATE OF p
)
UPDATE processed_events p
SET status = CASE WHEN d.processed THEN 'PROCESSED' ELSE 'FAILED' END,
    lease_owner = NULL,
    lease_expires_at = NULL,
    attempts = p.attempts + d.attempts,
    response_status = d.response_status,
    response_headers = d.response_headers::jsonb,
    response_body = d.response_body,
    last_error = coalesce(d.last_error, p.last_error),
    finished_at = now()
FROM d JOIN locked USING (event_key)
WHERE p.event_key = d.event_key
RETURNING p.event_key
"#;

/// Writes `finals` in one statement; returns the keys of the rows this owner still held
/// (the others were taken over after its lease expired).
pub async fn finish(
    pool: &PgPool,
    owner: &str,
    finals: &[Final],
) -> Result<Vec<Uuid>, sqlx::Error> {
    let keys: Vec<Uuid> = finals.iter().map(|f| f.event_key).collect();
    let processed: Vec<bool> = finals.iter().map(|f| f.processed).collect();
    let attempts: Vec<i32> = finals.iter().map(|f| f.attempts).collect();
    let statuses: Vec<Option<i32>> = finals.iter().map(|f| f.response_status).collect();
    let headers: Vec<Option<&str>> = finals
        .iter()
        .map(|f| f.response_headers.as_deref())
        .collect();
    let bodies: Vec<Option<&[u8]>> = finals.iter().map(|f| f.response_body.as_deref()).collect();
    let errors: Vec<Option<&str>> = finals.iter().map(|f| f.last_error.as_deref()).collect();
    sqlx::query_scalar(FINISH_SQL)
        .bind(&keys)
        .bind(&processed)
        .bind(&attempts)
        .bind(&statuses)
        .bind(&headers)
        .bind(&bodies)
        .bind(&errors)
        .bind(owner)
        .fetch_all(pool)
        .await
}

/// Extends this owner's lease on `keys` to `lease` from now; returns the keys it still
/// holds.
pub async fn renew(
    pool: &PgPool,
    owner: &str,
    keys: &[Uuid],
    lease: Duration,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE processed_events
         SET lease_expires_at = now() + make_interval(secs => $3)
         WHERE event_key = ANY($1) AND lease_owner = $2
           AND coalesce(status, '') = 'PROCESSING'
         RETURNING event_key",
    )
    .bind(keys)
    .bind(owner)
    .bind(lease.as_secs_f64())
    .fetch_all(pool)
    .await
}

/// Gives up this owner's lease on deliveries it stops before their end (a stop): the
/// rows stay `PROCESSING` with their attempts counted and a lease that has expired, so
/// the next copy of each event (its offset was never stored) takes it over at once.
pub async fn release(
    pool: &PgPool,
    owner: &str,
    released: &[(Uuid, i32, Option<String>)],
) -> Result<u64, sqlx::Error> {
    let keys: Vec<Uuid> = released.iter().map(|r| r.0).collect();
    let attempts: Vec<i32> = released.iter().map(|r| r.1).collect();
    let errors: Vec<Option<&str>> = released.iter().map(|r| r.2.as_deref()).collect();
    let done = sqlx::query(
        "UPDATE processed_events p
         SET lease_expires_at = now(), attempts = p.attempts + d.attempts,
             last_error = coalesce(d.last_error, p.last_error)
         FROM UNNEST($1::uuid[], $2::int4[], $3::text[]) AS d(event_key, attempts, last_error)
         WHERE p.event_key = d.event_key AND p.lease_owner = $4
           AND coalesce(p.status, '') = 'PROCESSING'",
    )
    .bind(&keys)
    .bind(&attempts)
    .bind(&errors)
    .bind(owner)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Rows in `PROCESSING` whose lease expired: a replica died mid-delivery and no copy of
/// the event has come back to take it over yet (its offset was not stored, so one will,
/// once the partition is read again).
pub async fn expired_leases(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM processed_events
         WHERE status = 'PROCESSING' AND lease_expires_at < now()",
    )
    .fetch_one(pool)
    .await
}
