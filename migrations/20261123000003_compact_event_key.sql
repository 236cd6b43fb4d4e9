-- processed_events is keyed by a 16-byte digest of (scope, event_id) instead of the two
-- texts. Event ids are random (UUIDs, hashes), so every gate insert lands on a random leaf
-- of the primary key: the smaller that index, the fewer pages each checkpoint cycle has to
-- write as full-page images and the more of it stays cached. Measured with 10 million live
-- rows (bench/README.md, "Key representation"): the (scope, event_id) text key took 647 MiB,
-- the uuid key 301 MiB, and the gate's insert ran 1.4-1.55x faster (1.15-1.25x on an empty
-- table, where uuid comparisons beat text collation).
--
-- event_key = the first 16 bytes of SHA-256(len(scope) as 4 bytes big-endian || scope ||
-- event_id), UTF-8. The length prefix keeps ("a", "bc") and ("ab", "c") apart. kdedup
-- computes it in Rust (db::event_key) for the hot path; this function is the same
-- computation for SQL (the backfill below, `kdedup inspect`, hand-written queries). A
-- collision of two live ids would need ~2^64 of them.
CREATE FUNCTION event_key(scope text, event_id text) RETURNS uuid
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT encode(substring(sha256(int4send(octet_length(convert_to(scope, 'UTF8')))
                                   || convert_to(scope, 'UTF8')
                                   || convert_to(event_id, 'UTF8')) FROM 1 FOR 16),
                  'hex')::uuid
$$;

ALTER TABLE processed_events ADD COLUMN event_key uuid;
UPDATE processed_events SET event_key = event_key(scope, event_id);
ALTER TABLE processed_events ALTER COLUMN event_key SET NOT NULL;
ALTER TABLE processed_events DROP CONSTRAINT processed_events_pkey;
ALTER TABLE processed_events ADD CONSTRAINT processed_events_pkey PRIMARY KEY (event_key);
-- scope and event_id stay in the row, for `kdedup inspect` and for people reading the table.

-- The pruner deletes up to --prune-batch-size rows per transaction, millions a day on a busy
-- topic. With the default scale factor (20% of the table) autovacuum waits for a fifth of
-- the table to be dead before it makes the space reusable, and meanwhile new rows extend the
-- file (bench/RESULTS.md, "processed_events after a long prune"). Vacuum after 1% instead.
ALTER TABLE processed_events SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_analyze_scale_factor = 0.02
);
-- The outbox is a queue: every row is inserted and deleted within a relay round or two.
-- Vacuum it often so the relay's ORDER BY id scan does not wade through dead rows.
ALTER TABLE outbox SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 5000
);
