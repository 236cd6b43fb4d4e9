-- The sidecars this schema serves, for the configuration drift checks of `kdedup run`:
-- two Deployments that drifted apart (one group gated in two schemas, one output fed from
-- two schemas, two outputs sharing one schema's outbox) each forward events twice or to the
-- wrong place. Every running sidecar keeps its row fresh (last_seen_at, every 30 s) and
-- deletes it on a clean stop; rows not seen for 7 days are deleted at start.
-- A new, small table: no lock on processed_events, nothing rewritten.
CREATE TABLE kdedup_sidecars (
    -- host:pid:random, one per process.
    instance     text        PRIMARY KEY,
    group_id     text        NOT NULL,
    scope        text        NOT NULL,
    -- kafka | postgres
    sink         text        NOT NULL,
    -- The output topic (kafka), the table or "sql" (postgres).
    output       text        NOT NULL,
    input_topics text[]      NOT NULL,
    version      text        NOT NULL,
    -- The pod name (HOSTNAME), for the operator reading a conflict.
    host         text        NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now()
);
