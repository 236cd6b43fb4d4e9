//! The relay's SQL: stream locks, checkpoints, reading rows back, and reclaiming the
//! outbox's slots in bulk. The relay itself is [`crate::sink::kafka::relay`].

use std::time::Duration;

use sqlx::{PgConnection, PgPool};

use super::outbox;
use super::ADVISORY_LOCK_CLASS;
use crate::model::headers::{self, Headers};

/// One outbox row to publish, read back from `relay_batches` or `relay_outbox`, or handed over
/// by a gate lane.
#[derive(Debug, Clone)]
pub struct Pending {
    pub seq: i64,
    pub scope: String,
    pub event_id: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub source_timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Headers,
    /// When its gate transaction committed (for the commit-to-ack latency).
    pub committed_at: chrono::DateTime<chrono::Utc>,
}

impl Pending {
    /// Bytes of key, value and headers: what it costs the relay's memory budget.
    pub fn size(&self) -> usize {
        crate::model::payload_size(&self.key, &self.value, &self.headers)
    }
}

/// Where a stream's publishing stands ([`Checkpoint::published_seq`] and the anchors: see
/// the migration's `relay_checkpoints`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    pub output_topic: String,
    pub published_seq: i64,
    /// `(output partition, offset)`.
    pub anchors: Vec<(i32, i64)>,
}

impl Checkpoint {
    pub fn anchor(&self, partition: i32) -> Option<i64> {
        self.anchors
            .iter()
            .find(|(p, _)| *p == partition)
            .map(|(_, o)| *o)
    }

    pub fn set_anchor(&mut self, partition: i32, offset: i64) {
        match self.anchors.iter_mut().find(|(p, _)| *p == partition) {
            Some(a) => a.1 = offset,
            None => self.anchors.push((partition, offset)),
        }
    }
}

const STREAM_LOCK: &str = "hashtext($2 || ':stream:' || $3)";

/// Takes the lock of `stream` on the relay's connection (a session lock: it lasts until
/// [`unlock_stream`] or the connection ends). `false`: another process holds it.
pub async fn try_lock_stream(
    conn: &mut PgConnection,
    schema: &str,
    stream: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(&format!("SELECT pg_try_advisory_lock($1, {STREAM_LOCK})"))
        .bind(ADVISORY_LOCK_CLASS)
        .bind(schema)
        .bind(stream)
        .fetch_one(conn)
        .await
}

pub async fn unlock_stream(
    conn: &mut PgConnection,
    schema: &str,
    stream: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query_scalar::<_, bool>(&format!("SELECT pg_advisory_unlock($1, {STREAM_LOCK})"))
        .bind(ADVISORY_LOCK_CLASS)
        .bind(schema)
        .bind(stream)
        .fetch_one(conn)
        .await?;
    Ok(())
}

pub async fn load_checkpoint(
    conn: &mut PgConnection,
    stream: &str,
) -> Result<Option<Checkpoint>, sqlx::Error> {
    let row: Option<(String, i64, Vec<i32>, Vec<i64>)> = sqlx::query_as(
        "SELECT output_topic, published_seq, anchor_partitions, anchor_offsets
         FROM relay_checkpoints WHERE stream = $1",
    )
    .bind(stream)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|(output_topic, published_seq, ps, os)| Checkpoint {
        output_topic,
        published_seq,
        anchors: ps.into_iter().zip(os).collect(),
    }))
}

/// Writes checkpoints, one statement for all of them. A checkpoint never moves back: a
/// stale writer (a holder that lost its lock a moment ago) leaves a newer one alone.
pub async fn save_checkpoints(
    conn: &mut PgConnection,
    owner: &str,
    checkpoints: &[(String, Checkpoint)],
) -> Result<(), sqlx::Error> {
    if checkpoints.is_empty() {
        return Ok(());
    }
    let mut streams = Vec::with_capacity(checkpoints.len());
    let mut topics = Vec::with_capacity(checkpoints.len());
    let mut seqs = Vec::with_capacity(checkpoints.len());
    let mut partitions = Vec::with_capacity(checkpoints.len());
    let mut offsets = Vec::with_capacity(checkpoints.len());
    for (stream, c) in checkpoints {
        streams.push(stream.as_str());
        topics.push(c.output_topic.as_str());
        seqs.push(c.published_seq);
        // Arrays of arrays must be rectangular in Postgres: pass them as text.
        partitions.push(format!(
            "{{{}}}",
            c.anchors
                .iter()
                .map(|(p, _)| p.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ));
        offsets.push(format!(
            "{{{}}}",
            c.anchors
                .iter()
                .map(|(_, o)| o.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    sqlx::query(
        "INSERT INTO relay_checkpoints AS c
             (stream, output_topic, published_seq, anchor_partitions, anchor_offsets, owner, updated_at)
         SELECT s, t, q, p::int4[], o::int8[], $6, now()
         FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[]) AS u(s, t, q, p, o)
         ORDER BY s
         ON CONFLICT (stream) DO UPDATE
             SET output_topic = EXCLUDED.output_topic,
                 published_seq = EXCLUDED.published_seq,
                 anchor_partitions = EXCLUDED.anchor_partitions,
                 anchor_offsets = EXCLUDED.anchor_offsets,
                 owner = EXCLUDED.owner,
                 updated_at = now()
             WHERE c.published_seq <= EXCLUDED.published_seq",
    )
    .bind(&streams)
    .bind(&topics)
    .bind(&seqs)
    .bind(&partitions)
    .bind(&offsets)
    .bind(owner)
    .execute(conn)
    .await?;
    Ok(())
}

/// An offset known to exist in `output_topic`/`partition`: the furthest anchor any stream
/// has there (0 when none has). A stream's first anchor in a partition: its messages all
/// come after it, and reading from there costs at most what other streams wrote since
/// their last checkpoint. (Asking the broker for the partition's end is no better: a
/// broker may answer it late, or with the start of its last batch.)
pub async fn partition_floor(
    pool: &PgPool,
    output_topic: &str,
    partition: i32,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce(max(a.o), 0)::int8
         FROM relay_checkpoints c, UNNEST(c.anchor_partitions, c.anchor_offsets) AS a(p, o)
         WHERE c.output_topic = $1 AND a.p = $2",
    )
    .bind(output_topic)
    .bind(partition)
    .fetch_one(pool)
    .await
}

/// Rows of `stream` after seq `after`, in seq order: at most `max_rows`, and at most
/// `max_bytes` of keys, values and headers (at least one row, whatever its size), from
/// `relay_batches` and from `relay_outbox`. A batch whose payloads do not decode is an
/// error naming its stream and seqs: nothing is published in their place.
pub async fn read_rows(
    pool: &PgPool,
    stream: &str,
    after: i64,
    max_rows: usize,
    max_bytes: usize,
) -> Result<Vec<Pending>, sqlx::Error> {
    let mut rows = read_batches(pool, stream, after, max_rows, max_bytes).await?;
    rows.extend(read_outbox_rows(pool, stream, after, max_rows, max_bytes).await?);
    rows.sort_by_key(|r| r.seq);
    rows.dedup_by_key(|r| r.seq);
    let mut bytes = 0usize;
    let mut keep = 0usize;
    for r in rows.iter().take(max_rows.max(1)) {
        bytes += r.size();
        if keep > 0 && bytes > max_bytes {
            break;
        }
        keep += 1;
    }
    rows.truncate(keep);
    Ok(rows)
}

/// [`read_rows`] from `relay_batches`: the batches holding seqs after `after`, while the
/// payloads before each are within `max_bytes` (stored lengths, read without fetching the
/// values), at most `max_rows` of them; decoded, the rows after `after`.
async fn read_batches(
    pool: &PgPool,
    stream: &str,
    after: i64,
    max_rows: usize,
    max_bytes: usize,
) -> Result<Vec<Pending>, sqlx::Error> {
    type Row = (
        i64,
        i64,
        String,
        i32,
        Vec<String>,
        Vec<String>,
        Vec<i64>,
        Vec<Option<i64>>,
        Vec<u8>,
        chrono::DateTime<chrono::Utc>,
    );
    let batches: Vec<Row> = sqlx::query_as(
        "SELECT o.first_seq, o.last_seq, o.source_topic, o.source_partition, o.scopes,
                o.event_ids, o.source_offsets, o.source_timestamps_ms, o.payloads, o.created_at
         FROM (
             SELECT last_seq,
                    sum(octet_length(payloads)) OVER (ORDER BY last_seq)
                        - octet_length(payloads) AS before
             FROM relay_batches
             WHERE stream = $1 AND last_seq > $2 AND first_seq <= $2 + $3
             ORDER BY last_seq LIMIT $3
         ) sized
         JOIN relay_batches o ON o.stream = $1 AND o.last_seq = sized.last_seq
         WHERE sized.before = 0 OR sized.before < $4
         ORDER BY o.last_seq",
    )
    .bind(stream)
    .bind(after)
    .bind(i64::try_from(max_rows).unwrap_or(i64::MAX))
    .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?;
    let mut rows = Vec::new();
    for (first, last, topic, partition, scopes, ids, offsets, timestamps, payloads, at) in batches {
        let count = usize::try_from(last - first + 1).unwrap_or(0);
        let decoded = outbox::decode_payloads(&payloads, count)
            .ok()
            .filter(|_| {
                scopes.len() == count
                    && ids.len() == count
                    && offsets.len() == count
                    && timestamps.len() == count
            })
            .ok_or_else(|| {
                sqlx::Error::Decode(
                    format!(
                        "relay_batches row of stream {stream}, seqs {first}..={last}, does not \
                         decode (its arrays and payloads must hold {count} events, as kdedup \
                         writes them); nothing of it is published"
                    )
                    .into(),
                )
            })?;
        let events = scopes.into_iter().zip(ids).zip(offsets).zip(timestamps);
        for ((seq, (((scope, event_id), offset), ts)), (key, value, headers)) in
            (first..).zip(events).zip(decoded)
        {
            if seq <= after {
                continue;
            }
            rows.push(Pending {
                seq,
                scope,
                event_id,
                source_topic: topic.clone(),
                source_partition: partition,
                source_offset: offset,
                source_timestamp_ms: ts,
                key,
                value,
                headers,
                committed_at: at,
            });
        }
    }
    Ok(rows)
}

/// [`read_rows`] from `relay_outbox`, one row per event (written by the previous version,
/// or moved there from its old `outbox`). Sizes
/// come from `octet_length`, which reads a stored value's length without fetching it, so
/// rows past the budget are never read. A stream's seqs have no gaps, so the rows are
/// also bounded by seq: the plan never visits more than `max_rows` index entries, however
/// large the backlog and whatever the statistics say.
async fn read_outbox_rows(
    pool: &PgPool,
    stream: &str,
    after: i64,
    max_rows: usize,
    max_bytes: usize,
) -> Result<Vec<Pending>, sqlx::Error> {
    type Row = (
        i64,
        String,
        String,
        String,
        i32,
        i64,
        Option<i64>,
        Option<Vec<u8>>,
        Option<Vec<u8>>,
        Vec<u8>,
        chrono::DateTime<chrono::Utc>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT o.seq, o.scope, o.event_id, o.source_topic, o.source_partition,
                o.source_offset, o.source_timestamp_ms, o.key, o.value, o.headers, o.created_at
         FROM (
             SELECT seq, sum(size) OVER (ORDER BY seq) - size AS before, size
             FROM (
                 SELECT seq, coalesce(octet_length(key), 0) + coalesce(octet_length(value), 0)
                            + octet_length(headers) AS size
                 FROM relay_outbox WHERE stream = $1 AND seq > $2 AND seq <= $2 + $3
                 ORDER BY seq LIMIT $3
             ) candidates
         ) sized
         JOIN relay_outbox o ON o.stream = $1 AND o.seq = sized.seq
         WHERE sized.before = 0 OR sized.before + sized.size <= $4
         ORDER BY o.seq",
    )
    .bind(stream)
    .bind(after)
    .bind(i64::try_from(max_rows).unwrap_or(i64::MAX))
    .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(seq, scope, event_id, topic, partition, offset, ts, key, value, hs, at)| {
                let headers = headers::decode(&hs).unwrap_or_else(|e| {
                    tracing::error!(event_id, error = %e,
                        "outbox row has corrupt headers; publishing without them");
                    Vec::new()
                });
                Pending {
                    seq,
                    scope,
                    event_id,
                    source_topic: topic,
                    source_partition: partition,
                    source_offset: offset,
                    source_timestamp_ms: ts,
                    key,
                    value,
                    headers,
                    committed_at: at,
                }
            },
        )
        .collect())
}

/// The last seq handed out for each of `streams` (absent: none yet).
pub async fn last_seqs(
    pool: &PgPool,
    streams: &[String],
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT stream, last_seq FROM outbox_seqs WHERE stream = ANY($1)")
        .bind(streams)
        .fetch_all(pool)
        .await
}

/// Streams with rows past their checkpoint whose checkpoint has not moved for `quiet`:
/// candidates for a relay to adopt (their holder is gone, or there never was one).
pub async fn orphans(pool: &PgPool, quiet: Duration) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT s.stream FROM outbox_seqs s
         LEFT JOIN relay_checkpoints c ON c.stream = s.stream
         WHERE s.last_seq > coalesce(c.published_seq, 0)
           AND (c.updated_at IS NULL OR c.updated_at < now() - make_interval(secs => $1))
         ORDER BY s.stream",
    )
    .bind(quiet.as_secs_f64())
    .fetch_all(pool)
    .await
}

/// What one [`reclaim`] round did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reclaimed {
    /// Slots emptied with TRUNCATE.
    pub truncated: Vec<i16>,
    /// The slot the gate writes into now, when this round moved it.
    pub rotated_to: Option<i16>,
    /// Another replica reclaims at the moment.
    pub busy: bool,
}

/// Empties every slot other than the current one whose rows are all published (TRUNCATE,
/// after taking the slot's lock, so a gate transaction still writing into it is waited
/// for and its rows are seen by the check), then moves the gate on to the next slot once
/// the current one is `rotate_every` old and the next one is empty. One replica at a time.
pub async fn reclaim(
    pool: &PgPool,
    schema: &str,
    rotate_every: Duration,
) -> Result<Reclaimed, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '500ms'")
        .execute(&mut *tx)
        .await?;
    let mine: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, hashtext($2 || ':reclaim'))")
            .bind(ADVISORY_LOCK_CLASS)
            .bind(schema)
            .fetch_one(&mut *tx)
            .await?;
    if !mine {
        return Ok(Reclaimed {
            busy: true,
            ..Default::default()
        });
    }
    let (current, due): (i16, bool) = sqlx::query_as(
        "SELECT slot, rotated_at < now() - make_interval(secs => $1) FROM relay_rotation FOR UPDATE",
    )
    .bind(rotate_every.as_secs_f64())
    .fetch_one(&mut *tx)
    .await?;
    let mut out = Reclaimed::default();
    let next = (current + 1) % 3;
    let mut next_empty = false;
    // The slot before the current one first: it is the one that fills up.
    for slot in [(current + 2) % 3, next] {
        let (rows, batches) = (
            format!("relay_outbox_{slot}"),
            format!("relay_batches_{slot}"),
        );
        let empty: bool = sqlx::query_scalar(&format!(
            "SELECT NOT EXISTS (SELECT 1 FROM {rows}) AND NOT EXISTS (SELECT 1 FROM {batches})"
        ))
        .fetch_one(&mut *tx)
        .await?;
        if empty {
            next_empty |= slot == next;
            continue;
        }
        // Waits (up to lock_timeout) for gate transactions writing into the slot; a lock
        // timeout ends the round without harm.
        sqlx::query(&format!(
            "LOCK TABLE {batches}, {rows} IN ACCESS EXCLUSIVE MODE"
        ))
        .execute(&mut *tx)
        .await?;
        let waiting: bool = sqlx::query_scalar(&format!(
            "SELECT EXISTS (
                 SELECT 1 FROM outbox_seqs s
                 LEFT JOIN relay_checkpoints c ON c.stream = s.stream
                 WHERE EXISTS (SELECT 1 FROM {batches} o
                               WHERE o.stream = s.stream AND o.last_seq > coalesce(c.published_seq, 0))
                    OR EXISTS (SELECT 1 FROM {rows} o
                               WHERE o.stream = s.stream AND o.seq > coalesce(c.published_seq, 0)))"
        ))
        .fetch_one(&mut *tx)
        .await?;
        if !waiting {
            sqlx::query(&format!("TRUNCATE {batches}, {rows}"))
                .execute(&mut *tx)
                .await?;
            out.truncated.push(slot);
            next_empty |= slot == next;
        }
    }
    if due && next_empty {
        sqlx::query("UPDATE relay_rotation SET slot = $1, rotated_at = now()")
            .bind(next)
            .execute(&mut *tx)
            .await?;
        out.rotated_to = Some(next);
    }
    tx.commit().await?;
    Ok(out)
}

/// Moves up to `limit` rows the previous version left in the old `outbox` table into
/// streams of their own (`upgrade:topic/partition`, in their old publish order), for
/// this relay to publish. Run only while holding the old relay's schema lock, so no
/// relay of the previous version is publishing them at the same time. Returns how many
/// moved.
pub async fn adopt_legacy(conn: &mut PgConnection, limit: i64) -> Result<u64, sqlx::Error> {
    let moved = sqlx::query(
        "WITH old AS (
             DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT $1)
             RETURNING *
         ),
         numbered AS (
             SELECT old.*, 'upgrade:' || source_topic || '/' || source_partition AS stream,
                    row_number() OVER (PARTITION BY source_topic, source_partition ORDER BY id) AS n
             FROM old
         ),
         counts AS (SELECT stream, count(*) AS n FROM numbered GROUP BY stream),
         claimed AS (
             INSERT INTO outbox_seqs AS s (stream, last_seq)
             SELECT stream, n FROM counts ORDER BY stream
             ON CONFLICT (stream) DO UPDATE SET last_seq = s.last_seq + EXCLUDED.last_seq
             RETURNING stream, last_seq
         )
         INSERT INTO relay_outbox
             (slot, stream, seq, scope, event_id, source_topic, source_partition, source_offset,
              source_timestamp_ms, key, value, headers, created_at)
         SELECT (SELECT slot FROM relay_rotation), n.stream, c.last_seq - t.n + n.n, n.scope,
                n.event_id, n.source_topic, n.source_partition, n.source_offset,
                n.source_timestamp_ms, n.key, n.value, n.headers, n.created_at
         FROM numbered n
         JOIN counts t ON t.stream = n.stream
         JOIN claimed c ON c.stream = n.stream",
    )
    .bind(limit)
    .execute(conn)
    .await?;
    Ok(moved.rows_affected())
}
