-- Running totals of the gate's decisions, per scope, for `kdedup stats`. Prometheus
-- counters restart with each process; these survive restarts and add up every replica.
-- The gate statement upserts one row per scope per batch in its own transaction, so the
-- totals commit (or roll back) together with the gate rows they count.
CREATE TABLE gate_counters (
    scope      text        PRIMARY KEY,
    -- Events not forwarded because their (scope, event_id) was already recorded, within
    -- a batch or by an earlier one (the same events as kdedup_duplicates_total).
    duplicates bigint      NOT NULL DEFAULT 0,
    -- First sightings recorded and queued in the outbox (kdedup_events_gated_total).
    forwarded  bigint      NOT NULL DEFAULT 0,
    -- When the first count was recorded: the totals cover the time since then.
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
