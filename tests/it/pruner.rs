//! The TTL pruner against real Postgres, with injected time: rows past expiry go, rows
//! before it stay, deletes come in bounded batches, and an expired id is accepted again.

use std::time::Duration;

use crate::helpers::*;
use chrono::{TimeZone, Utc};
use kdedup::metrics::Metrics;
use kdedup::pruner::{prune_batch, prune_round, PruneSettings};
use kdedup::settings::{DatabaseUrl, DbSettings};
use kdedup::store::gate::{self, GateBatch, GateOutcome, GateRow, GateStatement};
use kdedup::store::{self as db, outbox};
use tokio_util::sync::CancellationToken;

fn db_config(schema: &str) -> DbSettings {
    DbSettings {
        url: DatabaseUrl::new(database_url()),
        schema: schema.to_string(),
        max_connections: 2,
    }
}

fn row(id: &str) -> GateRow {
    GateRow {
        scope: "s".into(),
        event_id: id.into(),
        topic: "t".into(),
        partition: 0,
        offset: 0,
        timestamp_ms: None,
        payload_hash: vec![0; 16],
        key: None,
        value: Some(b"v".to_vec()),
        headers: vec![],
    }
}

async fn setup(schema: &str) -> sqlx::PgPool {
    let pool = db::pool(&db_config(schema)).unwrap();
    db::migrate(&pool, schema).await.unwrap();
    // 1000 rows that expire at t0 + i seconds.
    sqlx::query(
        "INSERT INTO processed_events (event_key, scope, event_id, source_topic, source_partition, source_offset, first_seen_at, expires_at)
         SELECT event_key('s', 'e-' || i), 's', 'e-' || i, 't', 0, i, '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'::timestamptz + make_interval(secs => i)
         FROM generate_series(1, 1000) AS i",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool
}

#[tokio::test]
async fn the_key_kdedup_computes_is_the_key_sql_computes() {
    let schema = unique("prune_key").to_lowercase();
    let pool = setup(&schema).await;
    let cases = [
        ("s", "e-1"),
        ("orders", "7b0c8b9e-3f0a-4f5e-9a51-0d6f2b1e4c11"),
        ("a", "bc"),
        ("ab", "c"),
        ("tenant-é", "ключ-ü-🙂"),
        ("", ""),
    ];
    for (scope, id) in cases {
        let in_sql: uuid::Uuid = sqlx::query_scalar("SELECT event_key($1, $2)")
            .bind(scope)
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(in_sql, gate::event_key(scope, id), "{scope:?} {id:?}");
    }
    // The scope length is part of the key: moving a character across the boundary is
    // another key.
    assert_ne!(gate::event_key("a", "bc"), gate::event_key("ab", "c"));
    // Rows written by SQL (setup) are found by the key kdedup computes.
    let live: i64 =
        sqlx::query_scalar("SELECT count(*) FROM processed_events WHERE event_key = $1")
            .bind(gate::event_key("s", "e-7"))
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(live, 1);
}

#[tokio::test]
async fn rows_past_expiry_go_in_bounded_batches_and_younger_rows_stay() {
    let schema = unique("prune").to_lowercase();
    let pool = setup(&schema).await;
    let mut conn = db::dedicated_connection(&db_config(&schema)).await.unwrap();
    let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();

    // One batch deletes at most its size, oldest first.
    let now = t0 + chrono::Duration::seconds(600);
    assert_eq!(prune_batch(&mut conn, now, 100).await.unwrap(), 100);
    let oldest_left: i64 = sqlx::query_scalar("SELECT min(source_offset) FROM processed_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(oldest_left, 101, "the oldest rows went first");

    // A round runs batches until nothing expired is left: rows 1..=600 expired at `now`.
    let metrics = Metrics::new();
    let settings = PruneSettings {
        interval: Duration::from_secs(60),
        batch_size: 64,
        pause: Duration::from_millis(1),
    };
    let n = prune_round(
        &mut conn,
        now,
        &settings,
        &metrics,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(n, 500);
    assert_eq!(metrics.rows_pruned.get(), 500);
    assert!(metrics.prune_batches.get() >= 500 / 64, "bounded batches");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 400, "rows whose expiry is after `now` stay");
    drop_schema(&pg().await, &schema).await;
}

#[tokio::test]
async fn an_expired_id_is_accepted_again_as_new() {
    let schema = unique("ttl").to_lowercase();
    let pool = setup(&schema).await;
    // e-1 expired long ago (2026-01-01) but has not been pruned: the gate treats it as
    // absent. e-new is new. Then with a live TTL both are duplicates.
    let ttl = Duration::from_secs(3600);
    let statement = GateStatement::outboxed(outbox::LIVE);
    let mut batch = GateBatch::default();
    batch.push(row("e-1"));
    batch.push(row("e-new"));
    let first = gate::gate(&pool, &statement, batch.part(0..2, true), ttl)
        .await
        .unwrap()
        .outcomes;
    assert_eq!(first, vec![GateOutcome::Forwarded, GateOutcome::Forwarded]);
    let again = gate::gate(&pool, &statement, batch.part(0..2, true), ttl)
        .await
        .unwrap()
        .outcomes;
    assert!(
        again
            .iter()
            .all(|o| matches!(o, GateOutcome::Duplicate { .. })),
        "{again:?}"
    );
    let outbox: Vec<(String, i64)> =
        sqlx::query_as("SELECT event_id, seq FROM outbox_pending ORDER BY seq")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        outbox,
        vec![("e-1".to_string(), 1), ("e-new".to_string(), 2)],
        "one forwarding write each, numbered in input order"
    );
    drop_schema(&pg().await, &schema).await;
}

#[tokio::test]
async fn one_pruner_per_schema_works_while_the_others_stand_by() {
    let schema = unique("prune_lock").to_lowercase();
    let pool = setup(&schema).await;
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM processed_events")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    // Another replica's pruner holds the schema's pruner lock.
    let mut other = db::dedicated_connection(&db_config(&schema)).await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1, hashtext('pruner:' || $2))")
        .bind(db::ADVISORY_LOCK_CLASS)
        .bind(&schema)
        .execute(&mut other)
        .await
        .unwrap();

    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let settings = PruneSettings {
        interval: Duration::from_millis(200),
        batch_size: 100,
        pause: Duration::from_millis(1),
    };
    let task = tokio::spawn(kdedup::pruner::run(
        db_config(&schema),
        settings,
        metrics.clone(),
        stop.clone(),
    ));
    // Every row of setup() expired in January 2026: a working pruner would take them all.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count().await, 1000, "a pruner stood by deleted rows");
    assert_eq!(metrics.rows_pruned.get(), 0);

    // The other replica goes away: this one takes over within a few intervals.
    drop(other);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    // The counter moves once the delete has returned, a moment after the rows are gone.
    while count().await > 0 || metrics.rows_pruned.get() < 1000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the standing-by pruner did not take over ({} rows pruned)",
            metrics.rows_pruned.get()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metrics.rows_pruned.get(), 1000);
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("pruner stops when asked")
        .unwrap();
    drop_schema(&pg().await, &schema).await;
}
