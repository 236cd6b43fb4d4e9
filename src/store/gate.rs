//! The gate statement: one atomic decision per batch.
//!
//! One statement inserts the batch's `(scope, event_id)` rows (keyed by [`event_key`], a
//! 16-byte digest of the two) into `processed_events`, treats a conflict with a live row
//! as a duplicate (`ON CONFLICT ... DO UPDATE ... WHERE expires_at <= now()`: only an
//! expired row is taken over), and adds the decisions to the per-scope totals in
//! `gate_counters`. The sink's forwarding write for exactly the rows it inserted runs in
//! the same transaction, which commits with the batch, so a crash leaves all of it or none.
//!
//! The sink's part is either data-modifying CTEs of the statement ([`GateStatement::new`]),
//! which read `batch` (the candidate rows, with their input order `ord`) joined to `gate`
//! (the keys this statement inserted), so they see first-seen events only; or a statement
//! right after it over the rows it inserted: the Postgres sink's
//! ([`GateStatement::followed_by`]) and the Kafka sink's outbox rows
//! ([`GateStatement::outboxed`]).
//!
//! A key may appear only once per statement (`ON CONFLICT DO UPDATE` cannot touch one row
//! twice): [`GateBatch`] removes in-batch duplicates as it is built, and the gate only
//! takes parts of a `GateBatch`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use super::app_rows::{self, Written};
use super::outbox;
use super::DbError;
use crate::model::headers::{self, Headers};
use crate::model::Position;

mod statement;
pub use statement::GateStatement;
use statement::{every_row, After};

/// The key of `(scope, event_id)` in `processed_events`: the first 16 bytes of
/// SHA-256(len(scope) as u32 big-endian || scope || event_id). The SQL function
/// `event_key(scope, event_id)` (migration 3) computes the same value; the reasons for a
/// digest key are written there.
pub fn event_key(scope: &str, event_id: &str) -> Uuid {
    let mut h = Sha256::new();
    h.update((scope.len() as u32).to_be_bytes());
    h.update(scope.as_bytes());
    h.update(event_id.as_bytes());
    let digest = h.finalize();
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    Uuid::from_bytes(key)
}

/// One first-sighting candidate sent to the gate.
#[derive(Debug, Clone)]
pub struct GateRow {
    pub scope: String,
    pub event_id: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub payload_hash: Vec<u8>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// As consumed; encoded ([`crate::model::headers::encode`]) only when the row is
    /// bound to the gate statement, so a row that never reaches it costs no encoding.
    pub headers: Headers,
}

impl GateRow {
    pub fn position(&self) -> Position {
        Position {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
        }
    }
}

/// The candidates of one batch, each `(scope, event_id)` once, in input order.
#[derive(Debug, Default)]
pub struct GateBatch {
    rows: Vec<GateRow>,
    first_of: HashMap<(String, String), usize>,
    /// Per scope, the copies [`GateBatch::push`] removed, for the `gate_counters` totals.
    in_batch_duplicates: BTreeMap<String, i64>,
}

/// What [`GateBatch::push`] did with a row.
#[derive(Debug)]
pub enum Pushed<'a> {
    /// The first of its id in this batch: a candidate.
    Candidate,
    /// A repeat of an earlier row of this batch, with the same payload (counted); the
    /// row is handed back.
    Duplicate(GateRow),
    /// A repeat with a different payload: not a duplicate (not counted), the row is
    /// handed back.
    Mismatch { first: &'a GateRow, row: GateRow },
}

impl GateBatch {
    pub fn with_capacity(n: usize) -> Self {
        GateBatch {
            rows: Vec::with_capacity(n),
            ..Default::default()
        }
    }

    /// Adds `row` unless its id is already in the batch.
    pub fn push(&mut self, row: GateRow) -> Pushed<'_> {
        let id = (row.scope.clone(), row.event_id.clone());
        match self.first_of.get(&id) {
            None => {
                self.first_of.insert(id, self.rows.len());
                self.rows.push(row);
                Pushed::Candidate
            }
            Some(&first) if self.rows[first].payload_hash == row.payload_hash => {
                *self.in_batch_duplicates.entry(id.0).or_default() += 1;
                Pushed::Duplicate(row)
            }
            Some(&first) => Pushed::Mismatch {
                first: &self.rows[first],
                row,
            },
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn rows(&self) -> &[GateRow] {
        &self.rows
    }

    pub fn into_rows(self) -> Vec<GateRow> {
        self.rows
    }

    /// Rows `range` of the batch, as one gate statement's input. `with_duplicates`: add the
    /// in-batch duplicates to the totals with this part (exactly one committed part must).
    pub fn part(&self, range: std::ops::Range<usize>, with_duplicates: bool) -> GatePart<'_> {
        GatePart {
            rows: &self.rows[range],
            in_batch_duplicates: with_duplicates.then_some(&self.in_batch_duplicates),
        }
    }
}

/// A slice of a [`GateBatch`]: unique keys by construction.
#[derive(Debug, Clone, Copy)]
pub struct GatePart<'a> {
    rows: &'a [GateRow],
    in_batch_duplicates: Option<&'a BTreeMap<String, i64>>,
}

/// What the gate decided for one row, in the order the rows were given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateOutcome {
    /// First sighting: recorded, and the sink's forwarding write done.
    Forwarded,
    /// Already recorded with the same payload. `first` is where it was first seen, when
    /// visible to this transaction (a replica that committed the same id a moment ago may
    /// not be).
    Duplicate { first: Option<Position> },
    /// Already recorded with a different payload: not a duplicate but a producer bug.
    Mismatch { first: Position },
    /// Leased statements only ([`GateStatement::leased`]): recorded, but not final, and
    /// not taken over: another delivery holds a live lease on it (or its row is not
    /// visible to this statement yet). Gate it again once that delivery may have ended;
    /// it is never delivered at the same time.
    Busy,
}

/// What the commit of one gate part did besides deciding.
#[derive(Debug)]
pub struct GateCommit {
    /// One per row, in the part's order.
    pub outcomes: Vec<GateOutcome>,
    /// One per row: the first sighting's seq in its outbox stream (Kafka sink only).
    pub seqs: Vec<Option<i64>>,
    /// The sink statement's run, when there is one and the part had first sightings.
    pub written: Option<Written>,
    /// Leased statements: rows taken over from a `PROCESSING` row whose lease expired.
    pub taken_over: usize,
}

/// The running totals of a gate whose counters are not in its statement (see
/// [`GateStatement::followed_by`]): the same upsert as the statement's `counted`, from
/// totals per scope computed by the caller, run last, just before the COMMIT.
const COUNTERS_SQL: &str = counters_upsert!(1, 2, 3);

/// A gate transaction's additions to `gate_counters`, per scope in name order, as the
/// arrays `counters_upsert!` binds.
#[derive(Debug, Default)]
pub struct Totals<'a> {
    pub scopes: Vec<&'a str>,
    pub duplicates: Vec<i64>,
    pub forwarded: Vec<i64>,
}

impl<'a> FromIterator<(&'a str, (i64, i64))> for Totals<'a> {
    /// From `(scope, (duplicates, forwarded))` in scope order.
    fn from_iter<I: IntoIterator<Item = (&'a str, (i64, i64))>>(iter: I) -> Self {
        let mut t = Totals::default();
        for (scope, (duplicates, forwarded)) in iter {
            t.scopes.push(scope);
            t.duplicates.push(duplicates);
            t.forwarded.push(forwarded);
        }
        t
    }
}

/// Runs the gate for `part` in one transaction (with the statement that follows it, if
/// any) on `db` (a pool, or a connection of its own: [`super::lane`]) and commits it. A
/// failure of the following statement is [`DbError::Sink`].
pub async fn gate<'c>(
    db: impl sqlx::Acquire<'c, Database = sqlx::Postgres>,
    statement: &GateStatement,
    part: GatePart<'_>,
    ttl: Duration,
) -> Result<GateCommit, DbError> {
    let rows = part.rows;
    if rows.is_empty() {
        return Ok(GateCommit {
            outcomes: Vec::new(),
            seqs: Vec::new(),
            written: None,
            taken_over: 0,
        });
    }
    // With a following statement, the gate statement needs no keys, values or headers:
    // its arrays stay empty (UNNEST pads them with nulls) and the data goes once, later.
    let payload = statement.after.is_none();
    let (dup_scopes, dup_counts): (Vec<&str>, Vec<i64>) = part
        .in_batch_duplicates
        .into_iter()
        .flatten()
        .filter(|(_, n)| **n > 0)
        .map(|(s, n)| (s.as_str(), *n))
        .unzip();
    let mut scopes = Vec::with_capacity(rows.len());
    let mut ids = Vec::with_capacity(rows.len());
    let mut topics = Vec::with_capacity(rows.len());
    let mut partitions = Vec::with_capacity(rows.len());
    let mut offsets = Vec::with_capacity(rows.len());
    let mut timestamps = Vec::with_capacity(rows.len());
    let mut hashes = Vec::with_capacity(rows.len());
    let mut keys = Vec::with_capacity(rows.len());
    let mut values = Vec::with_capacity(rows.len());
    let encoded: Vec<Vec<u8>> = match payload {
        true => rows.iter().map(|r| headers::encode(&r.headers)).collect(),
        false => Vec::new(),
    };
    let headers: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
    let mut event_keys = Vec::with_capacity(rows.len());
    for r in rows {
        event_keys.push(event_key(&r.scope, &r.event_id));
        scopes.push(r.scope.as_str());
        ids.push(r.event_id.as_str());
        topics.push(r.topic.as_str());
        partitions.push(r.partition);
        offsets.push(r.offset);
        timestamps.push(r.timestamp_ms);
        hashes.push(r.payload_hash.as_slice());
        if payload {
            keys.push(r.key.as_deref());
            values.push(r.value.as_deref());
        }
    }
    let mut tx = db.begin().await?;
    let (owner, lease_secs) = match &statement.lease {
        Some((owner, lease)) => (Some(owner.as_str()), Some(lease.as_secs_f64())),
        None => (None, None),
    };
    let mut query = sqlx::query_as(&statement.sql)
        .bind(&scopes)
        .bind(&ids)
        .bind(&topics)
        .bind(&partitions)
        .bind(&offsets)
        .bind(&timestamps)
        .bind(&hashes)
        .bind(&keys)
        .bind(&values)
        .bind(&headers)
        .bind(ttl.as_secs_f64())
        .bind(&dup_scopes)
        .bind(&dup_counts)
        .bind(&event_keys);
    if statement.lease.is_some() {
        query = query.bind(owner).bind(lease_secs);
    }
    let result = every_row(query.fetch_all(&mut *tx).await?, rows.len())?;
    let mut written = None;
    // Stream seqs: only the Kafka sink's outbox write hands them out.
    let mut seqs: Vec<Option<i64>> = vec![None; result.len()];
    if let Some(after) = &statement.after {
        // The running totals, upserted last: by the outbox write's own statement when
        // there is one (a round trip less), by a statement of their own otherwise.
        let mut totals: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
        for ((_, inserted, _, _, _, differs, ..), row) in result.iter().zip(rows) {
            let t = totals.entry(row.scope.as_str()).or_default();
            match (inserted, differs) {
                (true, _) => t.1 += 1,
                (false, false) => t.0 += 1,
                (false, true) => {}
            }
        }
        for (scope, n) in dup_scopes.iter().zip(&dup_counts) {
            totals.entry(scope).or_default().0 += n;
        }
        let totals = Totals::from_iter(totals);
        let first_seen: Vec<(usize, &GateRow)> = result
            .iter()
            .zip(rows)
            .enumerate()
            .filter(|(_, ((_, inserted, ..), _))| *inserted)
            .map(|(i, (_, row))| (i, row))
            .collect();
        let mut counted = false;
        if !first_seen.is_empty() {
            match after {
                After::AppRows(sql) => {
                    let rows: Vec<&GateRow> = first_seen.iter().map(|(_, r)| *r).collect();
                    let w = app_rows::write(&mut tx, sql, &rows)
                        .await
                        .map_err(DbError::Sink)?;
                    written = Some(w);
                }
                After::Outbox(prefix) => {
                    let claimed = outbox::write_batches(&mut tx, prefix, &first_seen, &totals);
                    for (i, seq) in claimed.await? {
                        seqs[i] = Some(seq);
                    }
                    counted = true;
                }
            }
        }
        if !counted {
            sqlx::query(COUNTERS_SQL)
                .bind(&totals.scopes)
                .bind(&totals.duplicates)
                .bind(&totals.forwarded)
                .execute(&mut *tx)
                .await?;
        }
    }
    crate::crash::gate_delay().await;
    crate::crash::reached(crate::crash::Point::BeforeDbCommit);
    tx.commit().await?;
    let taken_over = result.iter().filter(|r| r.7).count();
    let outcomes = result
        .into_iter()
        .map(
            |(_, inserted, topic, partition, offset, differs, busy, ..)| {
                if inserted {
                    return GateOutcome::Forwarded;
                }
                if busy {
                    return GateOutcome::Busy;
                }
                let first = match (topic, partition, offset) {
                    (Some(topic), Some(partition), Some(offset)) => Some(Position {
                        topic,
                        partition,
                        offset,
                    }),
                    _ => None,
                };
                match first {
                    Some(first) if differs => GateOutcome::Mismatch { first },
                    first => GateOutcome::Duplicate { first },
                }
            },
        )
        .collect();
    Ok(GateCommit {
        outcomes,
        seqs,
        written,
        taken_over,
    })
}

/// The payload hashes of those of `keys` (scope, event_id) the gate holds, has not
/// expired and would not hand out again, by key: a row of the HTTP sink that `FAILED`, or
/// is `PROCESSING` under an expired lease, is taken over by the next copy (see
/// [`GateStatement::leased`]). The status is read through `to_jsonb`, so a schema from
/// before the HTTP sink's migration reads as it did.
pub async fn live_payloads(
    pool: &PgPool,
    keys: &[(String, String)],
) -> Result<HashMap<(String, String), Vec<u8>>, DbError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let event_keys: Vec<Uuid> = keys.iter().map(|(s, i)| event_key(s, i)).collect();
    let rows: Vec<(String, String, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT scope, event_id, payload_hash FROM processed_events p
         WHERE event_key = ANY($1) AND expires_at > now()
           AND CASE coalesce(to_jsonb(p) ->> 'status', 'PROCESSED')
                 WHEN 'PROCESSED' THEN true
                 WHEN 'PROCESSING' THEN (to_jsonb(p) ->> 'lease_expires_at')::timestamptz > now()
                 ELSE false
               END",
    )
    .bind(&event_keys)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(scope, id, hash)| ((scope, id), hash.unwrap_or_default()))
        .collect())
}
