-- The HTTP sink's status gate, on the gate row itself (src/sink/http/mod.rs).
--
-- An HTTP request cannot join the gate transaction, so the gate row of an event the HTTP
-- sink delivers carries a status: PROCESSING (with a lease: owner and expiry) from the
-- gate's commit, before any request is sent; then PROCESSED or FAILED. Only PROCESSED (or
-- NULL, the other sinks' rows, whose forwarding write committed with them) suppresses a
-- later copy; the gate takes over a FAILED row or a PROCESSING row whose lease expired.
--
-- On the gate row rather than a table beside it: the takeover decision is then the gate's
-- own `INSERT ... ON CONFLICT DO UPDATE ... WHERE` over one row, atomic with the dedup
-- decision; an event costs two row writes (the gate insert, the final update) instead of
-- three; and the pruner expires the delivery record with the gate row, by the same TTL.
--
-- Every column is nullable or has a constant default: adding them rewrites nothing.
ALTER TABLE processed_events
    ADD COLUMN status           text,
    -- The replica delivering it (its lease): `<host>/<pid>/<start>`, and until when.
    ADD COLUMN lease_owner      text,
    ADD COLUMN lease_expires_at timestamptz,
    -- Requests sent for it, over every owner.
    ADD COLUMN attempts         integer NOT NULL DEFAULT 0,
    -- The last failed attempt: HTTP status and a bounded body excerpt, or the I/O error.
    ADD COLUMN last_error       text,
    -- The application's answer to the request that succeeded (the body bounded by
    -- --http-max-response-bytes), for `kdedup inspect` and audits.
    ADD COLUMN response_status  integer,
    ADD COLUMN response_headers jsonb,
    ADD COLUMN response_body    bytea,
    -- When the final status was written.
    ADD COLUMN finished_at      timestamptz;

ALTER TABLE processed_events
    ADD CONSTRAINT processed_events_status_check
    CHECK (status IN ('PROCESSING', 'PROCESSED', 'FAILED')) NOT VALID;

-- Rows in PROCESSING, for the "stuck past their lease" gauge and alert: small, since rows
-- leave PROCESSING within a delivery.
CREATE INDEX processed_events_processing_idx ON processed_events (lease_expires_at)
    WHERE status = 'PROCESSING';
