//! End-to-end tests of `kdedup run` against the real broker and real Postgres.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::helpers::*;
use rand::{Rng, SeedableRng};

/// `n` distinct events over `partitions` partitions, about 30% extra duplicates: half
/// re-sent right away (same batch), half re-sent later (another batch).
fn stream_with_duplicates(n: usize, partitions: i32, seed: u64) -> (Vec<In>, usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut msgs = Vec::new();
    let mut later = Vec::new();
    for i in 0..n {
        let p = (i % partitions as usize) as i32;
        let ev = In::event(p, &format!("ev-{i}"), i as u64);
        msgs.push(ev.clone());
        let roll: f64 = rng.random();
        if roll < 0.15 {
            msgs.push(ev);
        } else if roll < 0.30 {
            later.push(ev);
        }
        if i % 700 == 699 {
            msgs.append(&mut later);
        }
    }
    msgs.append(&mut later);
    (msgs, n)
}

/// Asserts every id in 0..n appears exactly once and `seq` rises within each partition.
fn assert_exactly_once_in_order(out: &[Out], n: usize) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in out {
        *seen
            .entry(m.header("kdedup-event-id").unwrap().to_string())
            .or_default() += 1;
    }
    let repeated: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        repeated.is_empty(),
        "ids forwarded more than once: {repeated:?}"
    );
    assert_eq!(seen.len(), n, "distinct ids on the output topic");
    let mut by_partition: HashMap<i32, Vec<&Out>> = HashMap::new();
    for m in out {
        by_partition.entry(m.partition).or_default().push(m);
    }
    for (p, mut msgs) in by_partition {
        msgs.sort_by_key(|m| m.offset);
        let seqs: Vec<u64> = msgs
            .iter()
            .map(|m| m.json()["seq"].as_u64().unwrap())
            .collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "partition {p} out of input order: {seqs:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn forwards_each_distinct_id_once_in_input_order() {
    let kafka = Cluster::shared();
    let t = names("dedup");
    kafka.create_topic(&t.input, 3).await;
    let (msgs, n) = stream_with_duplicates(3000, 3, 1);
    let total = msgs.len();
    kafka.produce(&t.input, &msgs).await;

    let sidecar = Sidecar::start(
        &SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
            .set("KDEDUP_BATCH_SIZE", "200"),
        "forwards_each_distinct_id_once",
    );
    wait_until(Duration::from_secs(90), "all events forwarded", || {
        sidecar.metric("kdedup_events_forwarded_total") as usize >= n
            && sidecar.metric("kdedup_events_consumed_total") as usize >= total
            && sidecar.metric("kdedup_duplicates_total") as usize >= total - n
    })
    .await;
    sidecar.wait_ready(Duration::from_secs(10)).await;

    let out = kafka.read_topic(&t.output, n, Duration::from_secs(30));
    assert_eq!(out.len(), n, "messages on the output topic");
    assert_exactly_once_in_order(&out, n);
    // Output keeps key and value and says where the event was first seen.
    let first = out
        .iter()
        .find(|m| m.header("kdedup-event-id") == Some("ev-0"))
        .unwrap();
    assert_eq!(first.key.as_deref(), Some(&b"k-ev-0"[..]));
    assert_eq!(first.header("event-id"), Some("ev-0"));
    assert_eq!(
        first.header("kdedup-source"),
        Some(format!("{}/0/0", t.input).as_str())
    );

    assert_eq!(
        sidecar.metric("kdedup_events_consumed_total") as usize,
        total
    );
    assert_eq!(sidecar.metric("kdedup_events_forwarded_total") as usize, n);
    assert_eq!(
        sidecar.metric("kdedup_duplicates_total") as usize,
        total - n
    );
    assert_eq!(sidecar.metric("kdedup_events_dead_lettered_total"), 0.0);
    assert_eq!(sidecar.metric("kdedup_outbox_backlog"), 0.0);

    let pool = pg().await;
    assert_eq!(
        count(&pool, &t.schema, "processed_events").await as usize,
        n
    );
    assert_eq!(count(&pool, &t.schema, "outbox_pending").await, 0);
    assert_event_lines_carry_their_position(&sidecar);
    drop(sidecar);
    drop_schema(&pool, &t.schema).await;
}

/// Every JSON log line about an event (it has `event_id`) also says which scope and where
/// it came from, so `grep event_id=X` finds the whole story of one event.
fn assert_event_lines_carry_their_position(sidecar: &Sidecar) {
    let log = std::fs::read_to_string(&sidecar.log).unwrap();
    let mut event_lines = 0;
    for line in log.lines() {
        let Ok(doc) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if doc.get("event_id").is_none() {
            continue;
        }
        event_lines += 1;
        for field in ["scope", "topic", "partition", "offset"] {
            assert!(doc.get(field).is_some(), "no {field} in: {line}");
        }
    }
    // Debug level: one line per first sighting, duplicate and forward.
    assert!(event_lines > 1000, "{event_lines} event lines in the log");
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_db_commit_before_offset_commit_forwards_nothing_twice() {
    let kafka = Cluster::shared();
    let t = names("crash");
    kafka.create_topic(&t.input, 2).await;
    let (msgs, n) = stream_with_duplicates(1000, 2, 2);
    let total = msgs.len();
    kafka.produce(&t.input, &msgs).await;

    // First life: every gate transaction commits, but no offset ever reaches Kafka
    // (the auto-commit interval is a day; enable.auto.commit itself is kdedup's and
    // cannot be turned off), then SIGKILL. That is the crash between the two commits, for
    // every batch at once.
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema);
    let mut first = Sidecar::start(
        &cfg.clone()
            .set("KDEDUP_KAFKA_AUTO_COMMIT_INTERVAL_MS", "86400000"),
        "crash_first_life",
    );
    wait_until(
        Duration::from_secs(90),
        "first life forwarded everything",
        || first.metric("kdedup_events_forwarded_total") as usize >= n,
    )
    .await;
    first.kill9();

    // Second life re-reads everything from the start: all of it must be absorbed.
    let second = Sidecar::start(&cfg, "crash_second_life");
    wait_until(
        Duration::from_secs(90),
        "second life settled everything",
        // Consumption is counted when a batch starts, duplicates once it committed.
        || {
            second.metric("kdedup_events_consumed_total") as usize >= total
                && second.metric("kdedup_duplicates_total") as usize >= total
        },
    )
    .await;
    assert_eq!(
        second.metric("kdedup_events_forwarded_total"),
        0.0,
        "nothing forwarded twice"
    );
    assert_eq!(second.metric("kdedup_duplicates_total") as usize, total);
    assert_eq!(
        second.metric("kdedup_duplicates_total{cause=\"redelivery\"}") as usize,
        n,
        "first sightings re-read at their own offsets are redeliveries"
    );
    let out = kafka.read_topic(&t.output, n, Duration::from_secs(30));
    assert_eq!(out.len(), n);
    assert_exactly_once_in_order(&out, n);
    drop(second);
    drop_schema(&pg().await, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_and_groups_racing_on_the_same_ids_forward_once() {
    let kafka = Cluster::shared();
    let t = names("race");
    kafka.create_topic(&t.input, 4).await;
    let (msgs, n) = stream_with_duplicates(2000, 4, 3);
    let total = msgs.len();

    // Two replicas of group A and one of group B, all in one scope and one schema.
    let base = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .set("KDEDUP_SCOPE", "shared")
        .set("KDEDUP_BATCH_SIZE", "100");
    let a1 = Sidecar::start(&base, "race_a1");
    let a2 = Sidecar::start(&base, "race_a2");
    let b1 = Sidecar::start(
        &base
            .clone()
            .set("KDEDUP_GROUP_ID", &format!("{}-b", t.group)),
        "race_b1",
    );
    for s in [&a1, &a2, &b1] {
        s.wait_ready(Duration::from_secs(60)).await;
    }
    kafka.produce(&t.input, &msgs).await;

    let all = [&a1, &a2, &b1];
    let sum = |name: &str| all.iter().map(|s| s.metric(name)).sum::<f64>() as usize;
    wait_until(
        Duration::from_secs(120),
        "both groups consumed everything",
        || {
            sum("kdedup_events_consumed_total") >= 2 * total
                && sum("kdedup_events_forwarded_total") >= n
        },
    )
    .await;
    let out = kafka.read_topic(&t.output, n, Duration::from_secs(30));
    assert_eq!(
        out.len(),
        n,
        "one forwarding write per id across replicas and groups"
    );
    assert_exactly_once_in_order(&out, n);
    assert_eq!(sum("kdedup_events_forwarded_total"), n);
    // Each input partition is one outbox stream, and each stream is published by exactly
    // one relay at a time: the four are held, between the three sidecars, once each.
    assert_eq!(
        sum("kdedup_relay_streams"),
        4,
        "every stream held by exactly one relay"
    );
    let pool = pg().await;
    assert_eq!(
        count(&pool, &t.schema, "processed_events").await as usize,
        n
    );
    drop((a1, a2, b1));
    drop_schema(&pool, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn events_without_a_usable_id_are_dead_lettered_and_the_partition_goes_on() {
    let kafka = Cluster::shared();
    let t = names("dlq");
    kafka.create_topic(&t.input, 1).await;
    let bad = |headers: Vec<(&str, Vec<u8>)>, value: &[u8]| In {
        partition: Some(0),
        key: Some(b"bad".to_vec()),
        value: Some(value.to_vec()),
        headers: headers
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    };
    let mut msgs = vec![In::event(0, "good-0", 0)];
    let cases: Vec<(In, &str)> = vec![
        (bad(vec![], b"{truncated"), "value_not_json"),
        (bad(vec![], br#"{"no_id":true}"#), "missing_id"),
        (bad(vec![("event-id", vec![])], b"{}"), "empty_id"),
        (
            bad(vec![("event-id", vec![b'x'; 600])], b"{}"),
            "id_too_long",
        ),
        (
            bad(vec![("event-id", vec![0xff, 0xfe, 0xfd])], b"{}"),
            "id_not_utf8",
        ),
    ];
    for (i, (m, _)) in cases.iter().enumerate() {
        msgs.push(m.clone());
        msgs.push(In::event(0, &format!("good-{}", i + 1), i as u64 + 1));
    }
    kafka.produce(&t.input, &msgs).await;

    let sidecar = Sidecar::start(
        &SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
            .set("KDEDUP_ID_FROM", "header:event-id,json:/id"),
        "dlq",
    );
    let good = cases.len() + 1;
    wait_until(Duration::from_secs(60), "good events forwarded", || {
        sidecar.metric("kdedup_events_forwarded_total") as usize >= good
    })
    .await;

    let dlq = kafka.read_topic(&t.dlq, cases.len(), Duration::from_secs(30));
    assert_eq!(dlq.len(), cases.len());
    let reasons: HashSet<&str> = dlq
        .iter()
        .map(|m| m.header("kdedup-dlq-reason").unwrap())
        .collect();
    for (_, reason) in &cases {
        assert!(
            reasons.contains(reason),
            "{reason} missing from {reasons:?}"
        );
        assert_eq!(
            sidecar.metric(&format!(
                "kdedup_events_dead_lettered_total{{reason=\"{reason}\"}}"
            )),
            1.0
        );
    }
    for m in &dlq {
        assert_eq!(m.header("kdedup-source-topic"), Some(t.input.as_str()));
        assert_eq!(m.header("kdedup-source-partition"), Some("0"));
        assert!(m
            .header("kdedup-source-offset")
            .unwrap()
            .parse::<i64>()
            .is_ok());
        assert!(!m.header("kdedup-dlq-error").unwrap().is_empty());
        assert_eq!(m.key.as_deref(), Some(&b"bad"[..]), "original message kept");
    }
    let out = kafka.read_topic(&t.output, good, Duration::from_secs(30));
    assert_eq!(
        out.len(),
        good,
        "every good event after a bad one was forwarded"
    );
    drop(sidecar);
    drop_schema(&pg().await, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_commits_offsets_and_exits_zero() {
    let kafka = Cluster::shared();
    let t = names("term");
    kafka.create_topic(&t.input, 2).await;
    let (msgs, n) = stream_with_duplicates(500, 2, 4);
    kafka.produce(&t.input, &msgs).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema);
    let mut s = Sidecar::start(&cfg, "sigterm_first");
    s.wait_ready(Duration::from_secs(60)).await;
    wait_until(Duration::from_secs(60), "forwarded", || {
        s.metric("kdedup_events_forwarded_total") as usize >= n
    })
    .await;
    assert_eq!(
        s.sigterm(Duration::from_secs(10)),
        Some(0),
        "{}",
        s.log_tail()
    );

    // The offsets were committed on the way out: a restart reads nothing old again.
    let more: Vec<In> = (0..10)
        .map(|i| In::event(i % 2, &format!("late-{i}"), 10_000 + i as u64))
        .collect();
    kafka.produce(&t.input, &more).await;
    let s2 = Sidecar::start(&cfg, "sigterm_second");
    wait_until(Duration::from_secs(60), "late events forwarded", || {
        s2.metric("kdedup_events_forwarded_total") as usize >= 10
    })
    .await;
    assert_eq!(
        s2.metric("kdedup_events_consumed_total"),
        10.0,
        "no redelivery after a clean stop"
    );
    assert_eq!(s2.metric("kdedup_duplicates_total"), 0.0);
    drop(s2);
    drop_schema(&pg().await, &t.schema).await;
}

/// Gate lanes commit out of order: the lane of partition 0 is held inside its gate
/// statement (an outside session holds its stream's counter row) while the lane of
/// partition 1 commits batch after batch, and its rows are published meanwhile. Then the
/// held lane commits. A relay that kept one "highest id published" watermark would skip
/// the rows that committed late; per-stream seqs cannot: every id arrives once, in input
/// order per partition, and each stream's seqs on the output are 1, 2, 3, ... with no gap.
#[tokio::test(flavor = "multi_thread")]
async fn lanes_committing_out_of_order_lose_nothing_and_repeat_nothing() {
    let kafka = Cluster::shared();
    let t = names("ooo");
    kafka.create_topic(&t.input, 2).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .set("KDEDUP_GATE_LANES", "2")
        .set("KDEDUP_BATCH_SIZE", "25");
    let sidecar = Sidecar::start(&cfg, "ooo");
    sidecar.wait_ready(Duration::from_secs(60)).await;
    let wave = |from: usize, to: usize| -> Vec<In> {
        (from..to)
            .map(|i| In::event((i % 2) as i32, &format!("ooo-{i}"), i as u64))
            .collect()
    };
    // A first wave, so that both streams have their counter rows.
    kafka.produce(&t.input, &wave(0, 100)).await;
    wait_until(Duration::from_secs(60), "the first wave forwarded", || {
        sidecar.metric("kdedup_events_forwarded_total") >= 100.0
    })
    .await;

    let mut hold = <sqlx::PgConnection as sqlx::Connection>::connect(&database_url())
        .await
        .expect("connect");
    sqlx::query("BEGIN").execute(&mut hold).await.unwrap();
    sqlx::query(&format!(
        "SELECT 1 FROM \"{}\".outbox_seqs WHERE stream = $1 FOR UPDATE",
        t.schema
    ))
    .bind(format!("{}/0", t.input))
    .fetch_one(&mut hold)
    .await
    .expect("hold stream 0's counter");
    kafka.produce(&t.input, &wave(100, 500)).await;
    // Partition 1's 200 new events are gated and published while partition 0's wait.
    wait_until(
        Duration::from_secs(60),
        "partition 1 forwarded past the held lane",
        || sidecar.metric("kdedup_events_forwarded_total") >= 300.0,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        sidecar.metric("kdedup_events_forwarded_total"),
        300.0,
        "partition 0's lane is still held"
    );
    sqlx::query("COMMIT").execute(&mut hold).await.unwrap();
    wait_until(Duration::from_secs(60), "everything forwarded", || {
        sidecar.metric("kdedup_events_forwarded_total") >= 500.0
    })
    .await;

    let out = kafka.read_topic(&t.output, 500, Duration::from_secs(30));
    assert_exactly_once_in_order(&out, 500);
    let mut seqs: HashMap<String, Vec<i64>> = HashMap::new();
    for m in &out {
        let position = m.header("kdedup-position").expect("kdedup-position");
        let (stream, seq) =
            kdedup::sink::kafka::relay::parse_position(position.as_bytes()).expect("stream@seq");
        seqs.entry(stream.to_string()).or_default().push(seq);
    }
    for (stream, mut s) in seqs {
        s.sort_unstable();
        assert_eq!(s, (1..=250).collect::<Vec<i64>>(), "stream {stream}");
    }
    drop(sidecar);
    drop_schema(&pg().await, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn outbox_slots_are_emptied_only_once_every_row_in_them_is_published() {
    let kafka = Cluster::shared();
    let t = names("reclaim");
    kafka.create_topic(&t.input, 2).await;
    let wave = |from: usize, to: usize| -> Vec<In> {
        (from..to)
            .map(|i| In::event((i % 2) as i32, &format!("rc-{i}"), i as u64))
            .collect()
    };
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .set("KDEDUP_OUTBOX_ROTATE_INTERVAL", "1s")
        .set("KDEDUP_BATCH_SIZE", "50");

    // A gate with no relay: its rows wait in the outbox, unpublished.
    let mut gating = Sidecar::start(&cfg.clone().set("KDEDUP_RELAY", "false"), "reclaim_gate");
    gating.wait_ready(Duration::from_secs(60)).await;
    kafka.produce(&t.input, &wave(0, 200)).await;
    wait_until(Duration::from_secs(60), "the first wave gated", || {
        gating.metric("kdedup_events_gated_total") >= 200.0
    })
    .await;
    assert_eq!(gating.sigterm(Duration::from_secs(30)), Some(0));

    // Reclaim rounds over unpublished rows: the gate moves on to other slots, and
    // nothing is emptied.
    let schema = t.schema.clone();
    let in_schema = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .after_connect(move |conn, _| {
            let set = format!("SET search_path TO \"{schema}\"");
            Box::pin(async move {
                sqlx::query(&set).execute(conn).await?;
                Ok(())
            })
        })
        .connect(&database_url())
        .await
        .expect("connect");
    let mut rotated = 0;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let r = kdedup::store::relay::reclaim(&in_schema, &t.schema, Duration::from_secs(1))
            .await
            .expect("reclaim");
        assert!(
            r.truncated.is_empty(),
            "emptied a slot of unpublished rows: {r:?}"
        );
        rotated += usize::from(r.rotated_to.is_some());
    }
    assert!(rotated >= 1, "the gate never moved to another slot");
    in_schema.close().await;
    let pool = pg().await;
    assert_eq!(outbox_ids(&pool, &t.schema).await.len(), 200);

    // A sidecar with its relay publishes them and the next wave; the slots they filled
    // are emptied in bulk once published.
    let sidecar = Sidecar::start(&cfg, "reclaim_relay");
    sidecar.wait_ready(Duration::from_secs(60)).await;
    kafka.produce(&t.input, &wave(200, 400)).await;
    wait_until(Duration::from_secs(60), "both waves forwarded", || {
        sidecar.metric("kdedup_events_forwarded_total") >= 400.0
            && sidecar.metric("kdedup_outbox_backlog") == 0.0
    })
    .await;
    wait_until(Duration::from_secs(60), "published slots emptied", || {
        sidecar.metric("kdedup_outbox_slots_truncated_total") >= 1.0
    })
    .await;
    let out = kafka.read_topic(&t.output, 400, Duration::from_secs(30));
    assert_exactly_once_in_order(&out, 400);
    // The first wave's slot went; the second wave may still be in the slot the gate
    // writes into.
    let left = outbox_ids(&pool, &t.schema).await;
    let first_wave: Vec<_> = left
        .iter()
        .filter(|id| id[3..].parse::<usize>().unwrap() < 200)
        .collect();
    assert!(
        first_wave.is_empty(),
        "{} events of the first wave still in the outbox after its slot was emptied",
        first_wave.len()
    );
    assert_eq!(count(&pool, &t.schema, "outbox_pending").await, 0);
    assert_eq!(count(&pool, &t.schema, "processed_events").await, 400);
    drop(sidecar);
    drop_schema(&pool, &t.schema).await;
}
