//! `--sink postgres` against the real broker and Postgres: the application's own table
//! holds each event exactly once (through duplicates, replays, kill -9 and racing
//! replicas), poison rows are dead-lettered without stopping their partition and written
//! by a replay once fixed, and a statement that cannot work ends the start with exit 64.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::helpers::*;

/// A schema of the application's own, beside kdedup's.
async fn app_schema(pool: &sqlx::PgPool, t: &Names, ddl: &str) -> String {
    let app = format!("{}_app", t.schema);
    sqlx::query(&format!("CREATE SCHEMA {app}"))
        .execute(pool)
        .await
        .unwrap();
    for stmt in ddl
        .replace("APP", &app)
        .split(";\n")
        .filter(|s| !s.trim().is_empty())
    {
        sqlx::query(stmt).execute(pool).await.unwrap();
    }
    app
}

async fn drop_both(pool: &sqlx::PgPool, t: &Names, app: &str) {
    drop_schema(pool, &t.schema).await;
    drop_schema(pool, app).await;
}

/// An order event: id in the `event-id` header, a JSON body with the customer and amount.
fn order(partition: i32, i: u64, amount: i64) -> In {
    let id = format!("o-{i}");
    In {
        partition: Some(partition),
        key: Some(format!("customer-{}", i % 7).into_bytes()),
        value: Some(
            format!(
                r#"{{"id":"{id}","customer":"c{}","seq":{i},"amount":{amount}}}"#,
                i % 7
            )
            .into_bytes(),
        ),
        headers: vec![
            ("event-id".into(), id.into_bytes()),
            ("tenant".into(), b"acme".to_vec()),
        ],
    }
}

/// `n` orders over 3 partitions, every 4th sent again later and every 10th twice in a row.
fn orders_with_duplicates(n: u64) -> (Vec<In>, usize) {
    let mut msgs = Vec::new();
    for i in 0..n {
        let m = order((i % 3) as i32, i, (i % 50) as i64 + 1);
        if i % 10 == 0 {
            msgs.push(m.clone());
        }
        msgs.push(m);
    }
    let again: Vec<In> = (0..n)
        .step_by(4)
        .map(|i| order((i % 3) as i32, i, (i % 50) as i64 + 1))
        .collect();
    msgs.extend(again);
    let dups = msgs.len() - n as usize;
    (msgs, dups)
}

#[derive(sqlx::FromRow)]
struct OrderRow {
    id: String,
    customer: String,
    seq: i64,
    amount: String,
    note: String,
    event_id: String,
    from_topic: String,
    from_partition: i32,
    from_offset: i64,
    stamped: bool,
    headers: serde_json::Value,
    message_key: String,
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_gets_one_row_per_distinct_id_with_its_json_and_metadata() {
    let kafka = Cluster::shared();
    let pool = pg().await;
    let t = names("pgsink_table");
    kafka.create_topic(&t.input, 3).await;
    let app = app_schema(
        &pool,
        &t,
        "CREATE TABLE APP.orders (
            id text,
            customer text NOT NULL,
            seq bigint,
            amount numeric(10,2),
            note text DEFAULT 'none',
            received_at timestamptz NOT NULL DEFAULT now(),
            event_id text,
            from_topic text,
            from_partition int,
            from_offset bigint,
            produced_at timestamptz,
            headers jsonb,
            message_key text
        )",
    )
    .await;
    let n = 3000;
    let (msgs, dups) = orders_with_duplicates(n);
    kafka.produce(&t.input, &msgs).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .postgres_sink("KDEDUP_SINK_TABLE", &format!("{app}.orders"))
        .set(
            "KDEDUP_SINK_COLUMNS",
            "event_id=event_id,source_topic=from_topic,source_partition=from_partition,\
             source_offset=from_offset,source_timestamp=produced_at,headers=headers,key=message_key",
        );
    let s = Sidecar::start(&cfg, "pgsink_table");
    wait_until(Duration::from_secs(90), "every event settled", || {
        s.metric("kdedup_events_forwarded_total") >= n as f64
            && s.metric("kdedup_duplicates_total") >= dups as f64
    })
    .await;

    let rows: Vec<OrderRow> = sqlx::query_as(&format!(
        "SELECT id, customer, seq, amount::text AS amount, note, event_id, from_topic, from_partition,
                from_offset, produced_at IS NOT NULL AND received_at IS NOT NULL AS stamped, headers,
                message_key
         FROM {app}.orders"
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), n as usize, "one row per distinct id");
    let ids: HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), n as usize, "no id twice");
    for r in &rows {
        let i = r.seq as u64;
        assert_eq!(r.id, format!("o-{i}"));
        assert_eq!(r.customer, format!("c{}", i % 7), "the JSON's customer");
        assert_eq!(
            r.amount,
            format!("{}.00", i % 50 + 1),
            "a JSON number into numeric"
        );
        assert_eq!(
            r.note, "none",
            "a field the JSON lacks takes the column's default"
        );
        assert_eq!(r.event_id, r.id, "metadata: the event id");
        assert_eq!(r.from_topic, t.input);
        assert_eq!(
            r.from_partition,
            (i % 3) as i32,
            "metadata: the source partition"
        );
        assert!(r.from_offset >= 0);
        assert!(r.stamped, "timestamps filled");
        assert_eq!(r.headers["tenant"], "acme", "headers as JSON");
        assert_eq!(
            r.message_key,
            format!("customer-{}", i % 7),
            "the key as text"
        );
    }
    assert_eq!(s.metric("kdedup_sink_rows_written_total"), n as f64);
    assert_eq!(s.metric("kdedup_events_forwarded_total"), n as f64);
    assert_eq!(s.metric("kdedup_duplicates_total"), dups as f64);
    assert_eq!(
        gate_totals(&pool, &t.schema).await,
        (n as i64, dups as i64),
        "kdedup stats' running totals"
    );
    assert_eq!(
        count(&pool, &t.schema, "outbox_pending").await,
        0,
        "the Kafka sink's outbox is unused"
    );
    assert!(
        kafka.high_watermarks(&t.input, 3).iter().sum::<i64>() == msgs.len() as i64,
        "input as produced"
    );
    drop(s);
    drop_both(&pool, &t, &app).await;
}

/// Sum of amounts per customer that one application of each distinct event gives.
fn expected_totals(n: u64) -> BTreeMap<String, i64> {
    let mut totals = BTreeMap::new();
    for i in 0..n {
        *totals.entry(format!("c{}", i % 7)).or_default() += (i % 50) as i64 + 1;
    }
    totals
}

async fn totals(pool: &sqlx::PgPool, app: &str) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(&format!("SELECT customer, total FROM {app}.totals"))
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

const TOTALS_SQL: &str = "INSERT INTO APP.totals AS t (customer, total, events)
SELECT value_json->>'customer', sum((value_json->>'amount')::bigint), count(*)
FROM kdedup_events
GROUP BY 1
ON CONFLICT (customer) DO UPDATE
    SET total = t.total + EXCLUDED.total, events = t.events + EXCLUDED.events";

#[tokio::test(flavor = "multi_thread")]
async fn an_upsert_into_running_totals_applies_each_event_once_through_duplicates_and_replays() {
    let kafka = Cluster::shared();
    let pool = pg().await;
    let t = names("pgsink_totals");
    kafka.create_topic(&t.input, 3).await;
    let app = app_schema(
        &pool,
        &t,
        "CREATE TABLE APP.totals (customer text PRIMARY KEY, total bigint NOT NULL, events int NOT NULL)",
    )
    .await;
    let n = 2000;
    let (msgs, dups) = orders_with_duplicates(n);
    kafka.produce(&t.input, &msgs).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .postgres_sink("KDEDUP_SINK_SQL", &TOTALS_SQL.replace("APP", &app));
    let s = Sidecar::start(&cfg, "pgsink_totals");
    wait_until(Duration::from_secs(90), "every event settled", || {
        s.metric("kdedup_events_forwarded_total") >= n as f64
            && s.metric("kdedup_duplicates_total") >= dups as f64
    })
    .await;
    assert_eq!(
        totals(&pool, &app).await,
        expected_totals(n),
        "after duplicates"
    );
    drop(s);

    // The whole input again, through the same gate: nothing is applied twice.
    let (code, out, err) = kdedup_command(&cfg, &["replay", "--from-topic", &t.input]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(summary_value(&out, "forwarded"), 0, "{out}");
    assert_eq!(
        totals(&pool, &app).await,
        expected_totals(n),
        "after a replay"
    );
    let events: i64 = sqlx::query_scalar(&format!("SELECT sum(events)::int8 FROM {app}.totals"))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(events, n as i64);
    drop_both(&pool, &t, &app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_a_check_constraint_refuses_are_dead_lettered_and_a_replay_writes_them_once_fixed() {
    let kafka = Cluster::shared();
    let pool = pg().await;
    let t = names("pgsink_check");
    kafka.create_topic(&t.input, 1).await;
    let app = app_schema(
        &pool,
        &t,
        "CREATE TABLE APP.orders (id text PRIMARY KEY, customer text, seq bigint, amount bigint,
                                  CONSTRAINT amount_positive CHECK (amount > 0))",
    )
    .await;
    // One partition, so "the partition went on" is visible: every 9th order is refused,
    // the ones after it are still written.
    let n = 300u64;
    let refused: HashSet<String> = (0..n)
        .filter(|i| i % 9 == 4)
        .map(|i| format!("o-{i}"))
        .collect();
    let msgs: Vec<In> = (0..n)
        .map(|i| order(0, i, if i % 9 == 4 { -5 } else { 10 }))
        .collect();
    kafka.produce(&t.input, &msgs).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .postgres_sink("KDEDUP_SINK_TABLE", &format!("{app}.orders"))
        .set("KDEDUP_BATCH_SIZE", "100");
    let mut s = Sidecar::start(&cfg, "pgsink_check");
    wait_until(Duration::from_secs(60), "settled", || {
        s.metric("kdedup_events_forwarded_total") >= (n as usize - refused.len()) as f64
            && s.metric("kdedup_events_dead_lettered_total") >= refused.len() as f64
    })
    .await;
    assert_eq!(
        s.metric("kdedup_sink_rejected_total{sqlstate_class=\"23\"}"),
        refused.len() as f64
    );
    let written: HashSet<String> =
        sqlx::query_scalar::<_, String>(&format!("SELECT id FROM {app}.orders"))
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let all: HashSet<String> = (0..n).map(|i| format!("o-{i}")).collect();
    assert_eq!(
        &written,
        &all.difference(&refused).cloned().collect(),
        "everything else is in the table"
    );
    let dlq = kafka.read_topic(&t.dlq, refused.len(), Duration::from_secs(20));
    assert_eq!(dlq.len(), refused.len());
    for m in &dlq {
        assert!(refused.contains(m.header("event-id").unwrap()));
        assert_eq!(m.header("kdedup-dlq-reason"), Some("sink_rejected"));
        assert_eq!(m.header("kdedup-dlq-sqlstate"), Some("23514"));
        let error = m.header("kdedup-dlq-error").unwrap();
        assert!(error.contains("amount_positive"), "{error}");
    }
    // The gate did not keep them: they are free for the replay.
    assert_eq!(
        gate_totals(&pool, &t.schema).await.0,
        (n as usize - refused.len()) as i64
    );
    assert_eq!(s.sigterm(Duration::from_secs(20)), Some(0));

    sqlx::query(&format!(
        "ALTER TABLE {app}.orders DROP CONSTRAINT amount_positive"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let (code, out, err) = kdedup_command(&cfg, &["replay"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(summary_value(&out, "forwarded"), refused.len(), "{out}");
    let (code, again, err) = kdedup_command(&cfg, &["replay"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(summary_value(&again, "forwarded"), 0, "{again}");
    let rows: Vec<(String, i64)> = sqlx::query_as(&format!("SELECT id, amount FROM {app}.orders"))
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(rows.len(), n as usize, "every order exactly once");
    let negative: HashSet<String> = rows.into_iter().filter(|r| r.1 < 0).map(|r| r.0).collect();
    assert_eq!(negative, refused, "the replay wrote the refused ones");
    drop_both(&pool, &t, &app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_value_that_is_not_a_json_object_is_dead_lettered_for_a_table() {
    let kafka = Cluster::shared();
    let pool = pg().await;
    let t = names("pgsink_notjson");
    kafka.create_topic(&t.input, 1).await;
    let app = app_schema(&pool, &t, "CREATE TABLE APP.orders (id text, seq bigint)").await;
    let mut msgs: Vec<In> = (0..20)
        .map(|i| In::event(0, &format!("j-{i}"), i))
        .collect();
    msgs[3].value = Some(b"[1,2,3]".to_vec());
    msgs[7].value = Some(b"not json".to_vec());
    msgs[9].value = None;
    kafka.produce(&t.input, &msgs).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .postgres_sink("KDEDUP_SINK_TABLE", &format!("{app}.orders"));
    let s = Sidecar::start(&cfg, "pgsink_notjson");
    wait_until(Duration::from_secs(60), "settled", || {
        s.metric("kdedup_events_forwarded_total") >= 17.0
            && s.metric("kdedup_events_dead_lettered_total") >= 3.0
    })
    .await;
    assert_eq!(count(&pool, &app, "orders").await, 17);
    let dlq = kafka.read_topic(&t.dlq, 3, Duration::from_secs(20));
    let reasons: HashSet<_> = dlq
        .iter()
        .map(|m| m.header("kdedup-dlq-reason").unwrap().to_string())
        .collect();
    assert_eq!(reasons, HashSet::from(["sink_rejected".to_string()]));
    drop(s);
    drop_both(&pool, &t, &app).await;
}

/// Orders for the kill and race tests: no unique key in the table, so only the gate can
/// keep an id from being written twice.
const LEDGER: &str =
    "CREATE TABLE APP.ledger (id text NOT NULL, seq bigint, amount bigint, at_offset bigint)";

async fn ledger_ids(pool: &sqlx::PgPool, app: &str) -> HashMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(&format!(
        "SELECT id, count(*) FROM {app}.ledger GROUP BY id"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

fn assert_each_once(ids: &HashMap<String, i64>, n: u64) {
    let twice: Vec<_> = ids.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        twice.is_empty(),
        "written twice: {} ids, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
    let missing: Vec<String> = (0..n)
        .map(|i| format!("o-{i}"))
        .filter(|id| !ids.contains_key(id))
        .collect();
    assert!(
        missing.is_empty(),
        "lost: {} ids, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_storms_and_crashes_around_the_commit_leave_each_id_in_the_table_once() {
    let kafka = Cluster::shared();
    let pool = pg().await;
    let t = names("pgsink_kill");
    kafka.create_topic(&t.input, 2).await;
    let app = app_schema(&pool, &t, LEDGER).await;
    let n = 4000u64;
    let (msgs, _) = orders_with_duplicates(n);
    let msgs: Vec<In> = msgs
        .into_iter()
        .map(|mut m| {
            m.partition = m.partition.map(|p| p % 2);
            m
        })
        .collect();
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .postgres_sink(
            "KDEDUP_SINK_SQL",
            &format!(
                "INSERT INTO {app}.ledger (id, seq, amount, at_offset)
                 SELECT event_id, (value_json->>'seq')::bigint, (value_json->>'amount')::bigint, source_offset
                 FROM kdedup_events"
            ),
        )
        .set("KDEDUP_BATCH_SIZE", "50");
    // Lives that die at the crash points (just before and just after the gate commit) and
    // lives killed with SIGKILL in the middle of their work, then one that finishes. Each
    // life gets a share of the input produced just before it, so that it always has work
    // to die in, whatever the lives before it got through.
    let lives: Vec<(&str, Option<&str>)> = vec![
        ("crash", Some("before-db-commit:3")),
        ("crash", Some("after-db-commit:2")),
        ("kill", None),
        ("crash", Some("after-db-commit:4")),
        ("kill", None),
        ("crash", Some("before-db-commit:1")),
    ];
    let share = msgs.len() / (lives.len() + 1) + 1;
    let mut chunks = msgs.chunks(share);
    for (i, (kind, point)) in lives.iter().enumerate() {
        kafka.produce(&t.input, chunks.next().unwrap()).await;
        let life_cfg = match point {
            Some(p) => cfg.clone().set("KDEDUP_CRASH_AT", p),
            None => cfg.clone(),
        };
        let mut s = Sidecar::start(&life_cfg, "pgsink_kill");
        let deadline = Instant::now() + Duration::from_secs(90);
        if *kind == "crash" {
            while s.child.try_wait().unwrap().is_none() {
                assert!(
                    Instant::now() < deadline,
                    "life {i} did not reach {point:?}; log:\n{}",
                    s.log_tail()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } else {
            // Killed once it has written something more, in the middle of its work.
            let before = ledger_ids(&pool, &app).await.len();
            while ledger_ids(&pool, &app).await.len() == before {
                assert!(
                    Instant::now() < deadline,
                    "life {i} wrote nothing; log:\n{}",
                    s.log_tail()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(30 * i as u64)).await;
            s.kill9();
        }
        // The dead member's session expires before the next one joins: tansu's
        // coordinator can otherwise leave the new member without partitions (README).
        tokio::time::sleep(Duration::from_secs(7)).await;
    }
    for rest in chunks {
        kafka.produce(&t.input, rest).await;
    }
    let s = Sidecar::start(&cfg, "pgsink_kill");
    let deadline = Instant::now() + Duration::from_secs(120);
    while (ledger_ids(&pool, &app).await.len() as u64) < n {
        assert!(
            Instant::now() < deadline,
            "not every id was written; log:\n{}",
            s.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_until(Duration::from_secs(60), "input consumed", || {
        kafka
            .committed_offsets(&t.group, &t.input, 2)
            .iter()
            .sum::<i64>()
            == msgs.len() as i64
    })
    .await;
    assert_each_once(&ledger_ids(&pool, &app).await, n);
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {app}.ledger"))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, n as i64);
    drop(s);
    drop_both(&pool, &t, &app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_racing_on_the_same_ids_write_one_row_per_id() {
    let kafka = Cluster::shared();
    let pool = pg().await;
    let t = names("pgsink_race");
    kafka.create_topic(&t.input, 2).await;
    let app = app_schema(&pool, &t, LEDGER).await;
    let n = 3000u64;
    let msgs: Vec<In> = (0..n).map(|i| order((i % 2) as i32, i, 1)).collect();
    kafka.produce(&t.input, &msgs).await;
    let sql = format!(
        "INSERT INTO {app}.ledger (id, seq, amount, at_offset)
         SELECT event_id, (value_json->>'seq')::bigint, (value_json->>'amount')::bigint, source_offset
         FROM kdedup_events"
    );
    // Two groups on one topic and one schema, with one scope: each replica sees every id,
    // at the same time, and only the gate decides which one writes it.
    let a = SidecarConfig::new(&format!("{}-a", t.group), &t.input, &t.output, &t.schema)
        .postgres_sink("KDEDUP_SINK_SQL", &sql)
        .set("KDEDUP_SCOPE", "orders")
        .set("KDEDUP_BATCH_SIZE", "50");
    let b = a.clone().set("KDEDUP_GROUP_ID", &format!("{}-b", t.group));
    let ra = Sidecar::start(&a, "pgsink_race_a");
    let rb = Sidecar::start(&b, "pgsink_race_b");
    wait_until(
        Duration::from_secs(90),
        "both replicas saw every event",
        || {
            let (fa, fb) = (
                ra.metric("kdedup_events_forwarded_total"),
                rb.metric("kdedup_events_forwarded_total"),
            );
            let (da, db) = (
                ra.metric("kdedup_duplicates_total"),
                rb.metric("kdedup_duplicates_total"),
            );
            fa + da >= n as f64 && fb + db >= n as f64
        },
    )
    .await;
    let ids = ledger_ids(&pool, &app).await;
    assert_each_once(&ids, n);
    let (fa, fb) = (
        ra.metric("kdedup_events_forwarded_total"),
        rb.metric("kdedup_events_forwarded_total"),
    );
    assert_eq!(fa + fb, n as f64, "forwarded once between them");
    drop((ra, rb));
    drop_both(&pool, &t, &app).await;
}

/// Starts `kdedup run` with `cfg` until it says its sink statement passed the start-up
/// check (it then waits for the broker), and stops it.
async fn passes_the_check(cfg: &SidecarConfig) {
    let mut running = kdedup_spawn(cfg, &["run"], &[("KDEDUP_LOG", "info")]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !running.stderr().contains("sink statement checked") {
        assert!(running.running(), "exited: {}", running.stderr());
        assert!(Instant::now() < deadline, "no check: {}", running.stderr());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.sigterm();
    let _ = running.finish(Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_that_cannot_work_or_missing_grants_end_the_start_with_exit_64() {
    let pool = pg().await;
    let t = names("pgsink_bad");
    let app = app_schema(
        &pool,
        &t,
        "CREATE TABLE APP.orders (id text PRIMARY KEY, amount bigint)",
    )
    .await;
    let base = SidecarConfig::new(&t.group, "pgsink-bad-in", "unused", &t.schema)
        .set("KDEDUP_SINK", "postgres")
        .unset("KDEDUP_OUTPUT_TOPIC");
    let cases: Vec<(SidecarConfig, &str, &str)> = vec![
        (
            base.clone().set("KDEDUP_SINK_TABLE", &format!("{app}.nope")),
            "no such table",
            "create the table",
        ),
        (
            base.clone().set("KDEDUP_SINK_TABLE", "orders"),
            "no such table",
            "qualify it with its schema",
        ),
        (
            base.clone().set(
                "KDEDUP_SINK_SQL",
                &format!("INSERT INTO {app}.orders (id, amount) SELECT event_id, amount FROM kdedup_events"),
            ),
            "does not exist",
            "kdedup_events has scope, event_id",
        ),
        (
            base.clone().set("KDEDUP_SINK_SQL", "INSERT INTO orders SELECT * FROM kdedup_events"),
            "does not exist",
            "qualify its name with its schema",
        ),
        (
            base.clone()
                .set("KDEDUP_SINK_TABLE", &format!("{app}.orders"))
                .set("KDEDUP_SINK_COLUMNS", "event_id=missing"),
            "has no column",
            "name one of its columns: id, amount",
        ),
        (
            base.clone().set("KDEDUP_SINK_SQL", "INSERT INTO x VALUES (1); DROP TABLE y"),
            "multiple commands",
            "one statement",
        ),
    ];
    for (cfg, problem, fix) in cases {
        let (code, out, err) = kdedup_command(&cfg, &["run"]);
        let text = format!("{out}{err}");
        assert_eq!(code, Some(64), "{text}");
        assert!(text.contains(problem), "wanted {problem:?} in:\n{text}");
        assert!(text.contains(fix), "wanted {fix:?} in:\n{text}");
    }

    // A role that owns kdedup's schema (made for it beforehand, as a DBA would: the role
    // may not create schemas in the database) and has no grant on the application's table.
    let role = format!("{}_role", t.schema);
    let role_schema = format!("{}_r", t.schema);
    for stmt in [
        format!("CREATE ROLE {role} LOGIN"),
        format!("CREATE SCHEMA {role_schema} AUTHORIZATION {role}"),
        format!("GRANT USAGE ON SCHEMA {app} TO {role}"),
    ] {
        sqlx::query(&stmt).execute(&pool).await.unwrap();
    }
    let url = database_url().replacen("postgres@", &format!("{role}@"), 1);
    let as_role = base
        .clone()
        .set("KDEDUP_DATABASE_URL", &url)
        .set("KDEDUP_DB_SCHEMA", &role_schema)
        .set("KDEDUP_SINK_TABLE", &format!("{app}.orders"));
    let (code, _, err) = kdedup_command(&as_role, &["migrate"]);
    assert_eq!(
        code,
        Some(0),
        "migrations into the schema made for the role: {err}"
    );
    let as_role = as_role.set("KDEDUP_MIGRATE_ON_START", "false");
    let (code, out, err) = kdedup_command(&as_role, &["run"]);
    let text = format!("{out}{err}");
    assert_eq!(code, Some(64), "{text}");
    assert!(text.contains("permission denied"), "{text}");
    assert!(text.contains("GRANT"), "the fix names the grant: {text}");

    // With the grant, the check passes (the start then waits for the broker: stop it).
    sqlx::query(&format!("GRANT SELECT, INSERT ON {app}.orders TO {role}"))
        .execute(&pool)
        .await
        .unwrap();
    passes_the_check(&as_role).await;

    // Sequences: a serial the JSON may lack is filled by nextval(), which needs USAGE on
    // its sequence (and Postgres checks that only when it runs); a GENERATED ALWAYS
    // identity is filled by Postgres itself and needs nothing.
    for stmt in [
        format!("CREATE TABLE {app}.serials (n serial, amount bigint)"),
        format!("CREATE TABLE {app}.always (n bigint GENERATED ALWAYS AS IDENTITY, amount bigint)"),
        format!("GRANT INSERT ON {app}.serials, {app}.always TO {role}"),
    ] {
        sqlx::query(&stmt).execute(&pool).await.unwrap();
    }
    let serials = as_role
        .clone()
        .set("KDEDUP_SINK_TABLE", &format!("{app}.serials"));
    let (code, out, err) = kdedup_command(&serials, &["run"]);
    let text = format!("{out}{err}");
    assert_eq!(code, Some(64), "{text}");
    assert!(
        text.contains(&format!(
            "GRANT USAGE ON SEQUENCE {app}.serials_n_seq TO {role}"
        )),
        "{text}"
    );
    let always = as_role.set("KDEDUP_SINK_TABLE", &format!("{app}.always"));
    passes_the_check(&always).await;
    drop_both(&pool, &t, &app).await;
    drop_schema(&pool, &role_schema).await;
    for stmt in [format!("DROP OWNED BY {role}"), format!("DROP ROLE {role}")] {
        sqlx::query(&stmt).execute(&pool).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_verifies_the_table_and_the_topic() {
    let pool = pg().await;
    for sink in ["postgres", "kafka"] {
        let schema = unique(&format!("kdedup_demo_{sink}")).to_lowercase();
        // A sidecar's environment, one of whose settings `kdedup run` would refuse: the
        // demo runs with run's defaults and reads none of run's settings from the
        // environment (of KDEDUP_*, only its own --database-url's KDEDUP_DATABASE_URL).
        let cfg =
            SidecarConfig::new("unused", "unused", "unused", &schema).set("KDEDUP_BATCH_SIZE", "0");
        let mut cmd = kdedup(
            &cfg,
            &[
                "demo",
                "--sink",
                sink,
                "--events",
                "3000",
                "--db-schema",
                &schema,
                "--metrics-addr",
                "127.0.0.1:0",
            ],
        );
        let out = capture(&mut cmd);
        assert_eq!(out.code, Some(0), "{}", out.text());
        assert!(
            out.stdout.contains("VERIFIED: every distinct id reached"),
            "{}",
            out.stdout
        );
        assert_eq!(
            summary_value(&out.stdout, "forwarded"),
            3000,
            "{}",
            out.stdout
        );
        if sink == "postgres" {
            assert_eq!(count(&pool, &format!("{schema}_app"), "orders").await, 3000);
            drop_schema(&pool, &format!("{schema}_app")).await;
        }
        drop_schema(&pool, &schema).await;
    }
}
