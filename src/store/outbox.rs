//! The Kafka sink's outbox: the gate transaction's first sightings, numbered in streams
//! (migration `20261204000001_relay_streams.sql`) and written one row per stream and
//! transaction (`relay_batches`, migration `20261205000001_relay_batches.sql`), published
//! by the relay, reclaimed in bulk (see [`super::relay`]). `relay_outbox`, one row per
//! event, holds what the previous version wrote and what it left in its old `outbox`.

use std::collections::BTreeMap;

use sqlx::{PgConnection, PgExecutor};

use super::gate::{GateRow, Totals};
use crate::model::headers::{self, Headers};

/// Stream of live input: the input partition, `topic/partition`.
pub const LIVE: &str = "";
/// Stream prefix of `kdedup replay`: its rows are numbered apart from the live ones.
pub const REPLAY: &str = "replay:";

/// The Kafka sink's forwarding write, after the gate statement in its transaction (see
/// [`super::gate::GateStatement::outboxed`]): the first sightings `rows` (each with its
/// index in the gate part), grouped by stream (`prefix` + `topic/partition` of the input)
/// in input order, get the next seqs of their stream from `outbox_seqs` and one
/// `relay_batches` row per stream in the current slot. The counter's row lock serialises
/// the gate transactions of a stream, so seq order is commit order and no seq is
/// skipped. Streams are claimed in name order: two transactions claiming overlapping
/// streams lock them in the same order. The same statement adds the gate's `totals` to
/// `gate_counters`, after the rows (so the counters' row locks are held for the shortest
/// time, as when they had a statement of their own). Returns each row's seq, by index.
pub async fn write_batches(
    tx: &mut PgConnection,
    prefix: &str,
    rows: &[(usize, &GateRow)],
    totals: &Totals<'_>,
) -> Result<Vec<(usize, i64)>, sqlx::Error> {
    // Streams in name order, each stream's rows in input order.
    let mut by_stream: BTreeMap<String, Vec<(usize, &GateRow)>> = BTreeMap::new();
    for &(i, row) in rows {
        by_stream
            .entry(stream_of(prefix, &row.topic, row.partition))
            .or_default()
            .push((i, row));
    }
    let n = by_stream.len();
    let (mut streams, mut counts, mut topics, mut partitions, mut starts, mut payloads) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut scopes, mut ids, mut offsets, mut timestamps) = (
        Vec::with_capacity(rows.len()),
        Vec::with_capacity(rows.len()),
        Vec::with_capacity(rows.len()),
        Vec::with_capacity(rows.len()),
    );
    for (stream, members) in &by_stream {
        let first = members[0].1;
        streams.push(stream.as_str());
        counts.push(members.len() as i64);
        topics.push(first.topic.as_str());
        partitions.push(first.partition);
        // Postgres arrays count from 1.
        starts.push(scopes.len() as i32 + 1);
        payloads.push(encode_payloads(members.iter().map(|(_, r)| *r)));
        for (_, r) in members {
            scopes.push(r.scope.as_str());
            ids.push(r.event_id.as_str());
            offsets.push(r.offset);
            timestamps.push(r.timestamp_ms);
        }
    }
    let firsts: Vec<(String, i64)> = sqlx::query_as(WRITE_BATCHES)
        .bind(&streams)
        .bind(&counts)
        .bind(&topics)
        .bind(&partitions)
        .bind(&starts)
        .bind(&payloads)
        .bind(&scopes)
        .bind(&ids)
        .bind(&offsets)
        .bind(&timestamps)
        .bind(&totals.scopes)
        .bind(&totals.duplicates)
        .bind(&totals.forwarded)
        .fetch_all(&mut *tx)
        .await?;
    let firsts: BTreeMap<String, i64> = firsts.into_iter().collect();
    let mut seqs = Vec::with_capacity(rows.len());
    for (stream, members) in &by_stream {
        let first = *firsts.get(stream).ok_or_else(|| {
            sqlx::Error::Protocol(format!(
                "the outbox write returned no seq for stream {stream}"
            ))
        })?;
        seqs.extend(members.iter().zip(first..).map(|((i, _), seq)| (*i, seq)));
    }
    Ok(seqs)
}

// $1..$6: per stream (name order): name, event count, input topic and partition, where
// its events start in the per-event arrays $7..$10, encoded payloads; $11..$13: the
// counters to add per scope (name order).
const WRITE_BATCHES: &str = concat!(
    "
WITH s AS (
    SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::int4[], $5::int4[], $6::bytea[])
        AS s(stream, n, source_topic, source_partition, start, payloads)
),
claimed AS (
    INSERT INTO outbox_seqs AS q (stream, last_seq)
    SELECT stream, n FROM s ORDER BY stream
    ON CONFLICT (stream) DO UPDATE SET last_seq = q.last_seq + EXCLUDED.last_seq
    RETURNING stream, last_seq
),
-- Not read by the main query: Postgres runs it to completion after it, so the counters'
-- rows are locked last.
counted AS (
",
    counters_upsert!(11, 12, 13),
    "
)
INSERT INTO relay_batches
    (slot, stream, first_seq, last_seq, source_topic, source_partition, scopes, event_ids,
     source_offsets, source_timestamps_ms, payloads)
SELECT (SELECT slot FROM relay_rotation), s.stream, c.last_seq - s.n + 1, c.last_seq,
       s.source_topic, s.source_partition,
       ($7::text[])[s.start : s.start + s.n - 1],
       ($8::text[])[s.start : s.start + s.n - 1],
       ($9::int8[])[s.start : s.start + s.n - 1],
       ($10::int8[])[s.start : s.start + s.n - 1],
       s.payloads
FROM s JOIN claimed c ON c.stream = s.stream
RETURNING stream, first_seq",
);

/// Version byte of [`encode_payloads`]' format.
const PAYLOADS_V1: u8 = 1;

/// The Kafka keys, values and headers of a batch's events, in order, as one `bytea`: a
/// version byte (1), then per event its key and value (each a 4-byte big-endian length,
/// -1 for none, and the bytes) and its headers (a 4-byte length and kdedup's header
/// encoding, [`headers::encode`]).
pub fn encode_payloads<'a>(rows: impl Iterator<Item = &'a GateRow> + Clone) -> Vec<u8> {
    // Per event: three 4-byte lengths, the key, the value and the encoded headers.
    let size: usize = rows
        .clone()
        .map(|r| {
            12 + r.key.as_ref().map_or(0, Vec::len)
                + r.value.as_ref().map_or(0, Vec::len)
                + headers::encoded_len(&r.headers)
        })
        .sum();
    let mut out = Vec::with_capacity(1 + size);
    out.push(PAYLOADS_V1);
    let put = |out: &mut Vec<u8>, bytes: Option<&[u8]>| match bytes {
        None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        Some(b) => {
            out.extend_from_slice(&(b.len() as i32).to_be_bytes());
            out.extend_from_slice(b);
        }
    };
    for r in rows {
        put(&mut out, r.key.as_deref());
        put(&mut out, r.value.as_deref());
        // The headers' length, then their encoding, written in place.
        let at = out.len();
        out.extend_from_slice(&0i32.to_be_bytes());
        headers::encode_into(&mut out, &r.headers);
        let len = (out.len() - at - 4) as i32;
        out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }
    out
}

/// One event's Kafka key, value and headers, as [`decode_payloads`] returns them.
pub type Payload = (Option<Vec<u8>>, Option<Vec<u8>>, Headers);

/// A `payloads` value that does not decode: written by something other than kdedup, or
/// damaged.
#[derive(Debug, thiserror::Error)]
#[error("outbox payloads do not decode at byte {0} (expected {1} events)")]
pub struct CorruptPayloads(pub usize, pub usize);

/// Decodes [`encode_payloads`]' output, which must hold exactly `count` events.
pub fn decode_payloads(bytes: &[u8], count: usize) -> Result<Vec<Payload>, CorruptPayloads> {
    let corrupt = |pos| CorruptPayloads(pos, count);
    if bytes.first() != Some(&PAYLOADS_V1) {
        return Err(corrupt(0));
    }
    let mut pos = 1usize;
    let take = |pos: &mut usize| -> Result<Option<Vec<u8>>, CorruptPayloads> {
        let len = bytes.get(*pos..*pos + 4).ok_or(corrupt(*pos))?;
        let len = i32::from_be_bytes(len.try_into().expect("4 bytes"));
        *pos += 4;
        if len < 0 {
            return Ok(None);
        }
        let end = *pos + len as usize;
        let b = bytes.get(*pos..end).ok_or(corrupt(*pos))?.to_vec();
        *pos = end;
        Ok(Some(b))
    };
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let key = take(&mut pos)?;
        let value = take(&mut pos)?;
        let at = pos;
        let hs = take(&mut pos)?.ok_or(corrupt(at))?;
        let hs = headers::decode(&hs).map_err(|_| corrupt(at))?;
        out.push((key, value, hs));
    }
    if pos != bytes.len() {
        return Err(corrupt(pos));
    }
    Ok(out)
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
/// right after its checkpoint (its batch, or its `relay_outbox` row), found through the indexes.
pub async fn oldest_age<'e>(db: impl PgExecutor<'e>) -> Result<Option<f64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - min(t))::float8 FROM (
             SELECT least(
                        (SELECT o.created_at FROM relay_batches o
                         WHERE o.stream = s.stream AND o.last_seq > coalesce(c.published_seq, 0)
                         ORDER BY o.last_seq LIMIT 1),
                        (SELECT o.created_at FROM relay_outbox o
                         WHERE o.stream = s.stream AND o.seq > coalesce(c.published_seq, 0)
                         ORDER BY o.seq LIMIT 1)) AS t
             FROM outbox_seqs s LEFT JOIN relay_checkpoints c ON c.stream = s.stream
             WHERE s.last_seq > coalesce(c.published_seq, 0)
             UNION ALL
             SELECT min(created_at) FROM outbox
         ) w",
    )
    .fetch_one(db)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: Option<&[u8]>, value: Option<&[u8]>, headers: Headers) -> GateRow {
        GateRow {
            scope: "s".into(),
            event_id: "e".into(),
            topic: "t".into(),
            partition: 0,
            offset: 0,
            timestamp_ms: None,
            payload_hash: Vec::new(),
            key: key.map(<[u8]>::to_vec),
            value: value.map(<[u8]>::to_vec),
            headers,
        }
    }

    #[test]
    fn payloads_decode_to_what_was_encoded_nulls_and_empties_kept_apart() {
        let rows = [
            row(
                Some(b"k1"),
                Some(b"{\"a\":1}"),
                vec![("event-id".into(), Some(b"e-1".to_vec()))],
            ),
            row(None, None, vec![]),
            row(
                Some(b""),
                Some(b""),
                vec![("x".into(), None), ("y".into(), Some(Vec::new()))],
            ),
        ];
        let bytes = encode_payloads(rows.iter());
        let decoded = decode_payloads(&bytes, rows.len()).unwrap();
        let expected: Vec<Payload> = rows
            .iter()
            .map(|r| (r.key.clone(), r.value.clone(), r.headers.clone()))
            .collect();
        assert_eq!(decoded, expected);
    }

    #[test]
    fn payloads_that_do_not_match_their_count_or_version_are_refused() {
        let rows = [row(Some(b"k"), Some(b"v"), vec![])];
        let bytes = encode_payloads(rows.iter());
        assert!(
            decode_payloads(&bytes, 2).is_err(),
            "fewer events than the row says"
        );
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(
            decode_payloads(&longer, 1).is_err(),
            "bytes past the last event"
        );
        assert!(
            decode_payloads(&bytes[..bytes.len() - 1], 1).is_err(),
            "cut short"
        );
        let mut other = bytes.clone();
        other[0] = 2;
        assert!(decode_payloads(&other, 1).is_err(), "unknown version");
        assert!(decode_payloads(&[], 0).is_err(), "no version byte");
    }
}
