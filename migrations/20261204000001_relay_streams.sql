-- The Kafka sink's outbox, in streams: exactly once into the output topic, with no
-- per-row delete and no read-back of payloads on the hot path (README, "How it works").
--
-- A stream is the input partition a row came from (`orders/3`; a replay's rows are
-- `replay:orders/3`, an upgrade's `upgrade:orders/3`). The gate statement numbers each
-- stream's first sightings 1, 2, 3, ... from outbox_seqs, in the gate transaction: the
-- row lock on the stream's counter serialises the transactions of one stream, so seq
-- order is commit order and a seq is never skipped (a rolled-back transaction rolls its
-- numbers back). A relay that has published seq n of a stream knows the next one is n + 1,
-- and a gap in what it was handed says exactly which rows to read back.
--
-- New tables only: nothing existing is locked or rewritten. The old `outbox` table stays
-- for the previous version during a rolling upgrade; the new relay moves whatever it
-- holds into relay_outbox (deploy/UPGRADING.md).

CREATE TABLE outbox_seqs (
    stream   text   PRIMARY KEY,
    -- The last seq handed out: rows 1..last_seq of the stream exist (or were published
    -- and reclaimed).
    last_seq bigint NOT NULL
) WITH (fillfactor = 50);

-- Where each stream's publishing stands, written by the relay that holds the stream
-- (a few times a second at most, never per row).
CREATE TABLE relay_checkpoints (
    stream            text        PRIMARY KEY,
    output_topic      text        NOT NULL,
    -- Every row of the stream with seq <= published_seq is in the output topic (or was
    -- dead-lettered); its storage may be reclaimed.
    published_seq     bigint      NOT NULL DEFAULT 0,
    -- Per output partition the stream writes to: the offset right after the message of
    -- published_seq there. Anything of the stream past published_seq that reached the
    -- topic lies at or after these offsets: the tail a new holder reads before it
    -- publishes.
    anchor_partitions integer[]   NOT NULL DEFAULT '{}',
    anchor_offsets    bigint[]    NOT NULL DEFAULT '{}',
    -- host:pid of the last holder, for operators.
    owner             text,
    updated_at        timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 50);

-- Which slot of relay_outbox the gate writes into. The relay moves it on to the next
-- slot once that one is empty, and empties a slot with TRUNCATE once every row in it is
-- published: storage comes back in bulk, with no dead rows and no vacuum.
CREATE TABLE relay_rotation (
    one        boolean     PRIMARY KEY DEFAULT true CHECK (one),
    slot       smallint    NOT NULL DEFAULT 0 CHECK (slot BETWEEN 0 AND 2),
    rotated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO relay_rotation DEFAULT VALUES;

CREATE TABLE relay_outbox (
    slot                smallint    NOT NULL,
    stream              text        NOT NULL,
    seq                 bigint      NOT NULL,
    scope               text        NOT NULL,
    event_id            text        NOT NULL,
    source_topic        text        NOT NULL,
    source_partition    integer     NOT NULL,
    source_offset       bigint      NOT NULL,
    source_timestamp_ms bigint,
    key                 bytea,
    value               bytea,
    -- Kafka headers of the input message, in kdedup's compact encoding.
    headers             bytea       NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now()
) PARTITION BY LIST (slot);
CREATE TABLE relay_outbox_0 PARTITION OF relay_outbox FOR VALUES IN (0);
CREATE TABLE relay_outbox_1 PARTITION OF relay_outbox FOR VALUES IN (1);
CREATE TABLE relay_outbox_2 PARTITION OF relay_outbox FOR VALUES IN (2);
-- Read back only to recover (a new holder, a gap, a relay that fell behind) and to check
-- a slot before it is emptied; every insert appends at the right edge of its stream.
CREATE INDEX relay_outbox_stream_seq_idx ON relay_outbox (stream, seq);

-- What waits for a relay: the rows past their stream's checkpoint, and anything the
-- previous version left in the old outbox. For operators and tests; the gauges compute
-- the same from outbox_seqs and relay_checkpoints without reading rows.
CREATE VIEW outbox_pending AS
SELECT o.stream, o.seq, o.scope, o.event_id, o.source_topic, o.source_partition,
       o.source_offset, o.created_at
FROM relay_outbox o
LEFT JOIN relay_checkpoints c ON c.stream = o.stream
WHERE o.seq > coalesce(c.published_seq, 0)
UNION ALL
SELECT NULL, NULL, scope, event_id, source_topic, source_partition, source_offset, created_at
FROM outbox;
