-- The Kafka sink's outbox, one row per stream per gate transaction instead of one per
-- event (README, "How it works"; bench/README.md, "One outbox row per gate transaction").
--
-- A gate transaction that forwards k events of a stream writes one relay_batches row:
-- seqs first_seq .. last_seq (= first_seq + k - 1), in input order. Per event the row
-- keeps its scope, event id, source offset and timestamp in arrays (so the view
-- outbox_pending and `kdedup inspect` read them in SQL), and its Kafka key, value and
-- headers in `payloads`, encoded by kdedup (src/store/outbox.rs, `encode_payloads`).
-- Postgres then inserts one heap row and one index entry per stream and batch, not one
-- per event, and stores the payloads uncompressed (STORAGE EXTERNAL: no compression
-- attempt on the hot path, and the relay's read-back fetches only what it reads).
--
-- New tables only. relay_outbox stays: the previous version writes it during a rolling
-- upgrade, and rows the previous version's `outbox` held are still moved into it; the
-- relay reads both (deploy/UPGRADING.md). Slots rotate and are emptied with TRUNCATE
-- exactly as relay_outbox's, on the same relay_rotation slot.

CREATE TABLE relay_batches (
    slot                 smallint    NOT NULL,
    stream               text        NOT NULL,
    first_seq            bigint      NOT NULL,
    last_seq             bigint      NOT NULL,
    source_topic         text        NOT NULL,
    source_partition     integer     NOT NULL,
    scopes               text[]      NOT NULL,
    event_ids            text[]      NOT NULL,
    source_offsets       bigint[]    NOT NULL,
    source_timestamps_ms bigint[]    NOT NULL,
    payloads             bytea       NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    CHECK (last_seq >= first_seq)
) PARTITION BY LIST (slot);
CREATE TABLE relay_batches_0 PARTITION OF relay_batches FOR VALUES IN (0);
CREATE TABLE relay_batches_1 PARTITION OF relay_batches FOR VALUES IN (1);
CREATE TABLE relay_batches_2 PARTITION OF relay_batches FOR VALUES IN (2);
ALTER TABLE relay_batches
    ALTER COLUMN scopes SET STORAGE EXTERNAL,
    ALTER COLUMN event_ids SET STORAGE EXTERNAL,
    ALTER COLUMN source_offsets SET STORAGE EXTERNAL,
    ALTER COLUMN source_timestamps_ms SET STORAGE EXTERNAL,
    ALTER COLUMN payloads SET STORAGE EXTERNAL;
-- A stream's batches do not overlap and follow each other: ordered by last_seq, they are
-- in seq order, and "the batches past seq n" is a range of this index.
CREATE INDEX relay_batches_stream_last_seq_idx ON relay_batches (stream, last_seq);

-- What waits for a relay, one row per event: the batches' events past their stream's
-- checkpoint, then relay_outbox's and the old outbox's as before.
CREATE OR REPLACE VIEW outbox_pending AS
SELECT o.stream, o.first_seq + u.i - 1 AS seq, u.scope, u.event_id, o.source_topic,
       o.source_partition, u.source_offset, o.created_at
FROM relay_batches o
LEFT JOIN relay_checkpoints c ON c.stream = o.stream
CROSS JOIN LATERAL unnest(o.scopes, o.event_ids, o.source_offsets)
     WITH ORDINALITY AS u(scope, event_id, source_offset, i)
WHERE o.last_seq > coalesce(c.published_seq, 0)
  AND o.first_seq + u.i - 1 > coalesce(c.published_seq, 0)
UNION ALL
SELECT o.stream, o.seq, o.scope, o.event_id, o.source_topic, o.source_partition,
       o.source_offset, o.created_at
FROM relay_outbox o
LEFT JOIN relay_checkpoints c ON c.stream = o.stream
WHERE o.seq > coalesce(c.published_seq, 0)
UNION ALL
SELECT NULL, NULL, scope, event_id, source_topic, source_partition, source_offset, created_at
FROM outbox;
