-- The gate: one row per (scope, event_id) seen within its TTL. The primary key is the
-- dedup decision: INSERT ... ON CONFLICT DO NOTHING either inserts (first sighting) or
-- does nothing (duplicate), atomically, even with concurrent replicas.
CREATE TABLE processed_events (
    scope            text        NOT NULL,
    event_id         text        NOT NULL,
    -- Position of the first sighting; a duplicate at the same position is a redelivery.
    source_topic     text        NOT NULL,
    source_partition integer     NOT NULL,
    source_offset    bigint      NOT NULL,
    -- SHA-256 of the first payload, to tell a duplicate from a reused id.
    payload_hash     bytea,
    first_seen_at    timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    PRIMARY KEY (scope, event_id)
);

-- The pruner deletes in expires_at order.
CREATE INDEX processed_events_expires_at_idx ON processed_events (expires_at);

-- Forwarding writes waiting for the relay. Rows are written in the gate transaction
-- and deleted only after the broker acknowledged them; id order is publish order.
CREATE TABLE outbox (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    scope               text        NOT NULL,
    event_id            text        NOT NULL,
    source_topic        text        NOT NULL,
    source_partition    integer     NOT NULL,
    source_offset       bigint      NOT NULL,
    source_timestamp_ms bigint,
    key                 bytea,
    value               bytea,
    -- Kafka headers of the input message, in kdedup's compact encoding (src/headers.rs).
    headers             bytea       NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now()
);
