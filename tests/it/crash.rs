//! A crash at every step of an event's life, at the exact step (src/crash.rs), then a
//! restart: nothing is lost, the gate makes one forwarding write per id, and the output
//! topic holds each id once, including after a relay crash between the broker's
//! acknowledgements and the checkpoint that records them.
//!
//! Needs the `crash-points` feature (`make test` enables it).

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use crate::helpers::*;

/// `n` distinct events over 2 partitions, every 5th sent again later (another batch).
fn traffic(n: usize) -> Vec<In> {
    let mut msgs: Vec<In> = (0..n)
        .map(|i| In::event((i % 2) as i32, &format!("ev-{i}"), i as u64))
        .collect();
    let again: Vec<In> = msgs.iter().step_by(5).cloned().collect();
    msgs.extend(again);
    msgs
}

struct Outcome {
    /// Output messages per `kdedup-event-id`.
    copies: HashMap<String, usize>,
    output_len: usize,
    /// Duplicates the second life found at their own first-sighting position.
    redeliveries: f64,
    /// Rows past a checkpoint the second life found in the output topic already.
    takeovers_seen_in_topic: usize,
    /// The second life's ERROR log lines, and its lines that report the end of a
    /// partition (which its take-over's tail reads ask for) as a client error.
    errors: Vec<String>,
    partition_end_reported: Vec<String>,
}

/// First life crashes at `point` (its `arrival`-th time there), second life finishes the
/// work. Returns what reached the output topic, after checking the tables.
async fn crash_then_restart(point: &str, arrival: u32, n: usize) -> Outcome {
    let kafka = Cluster::shared();
    let t = names(&format!("crash_{}", point.replace('-', "_")));
    kafka.create_topic(&t.input, 2).await;
    let msgs = traffic(n);
    kafka.produce(&t.input, &msgs).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .set("KDEDUP_BATCH_SIZE", "50")
        .set("KDEDUP_RELAY_BATCH_SIZE", "50");

    // A crash at a gate step is tested with the first life's relay off, so that the crash
    // lands at the gate step and not in the relay (tested on its own below). The second
    // life relays everything.
    let mut first_cfg = cfg
        .clone()
        .set("KDEDUP_CRASH_AT", &format!("{point}:{arrival}"));
    if point != "relay-after-ack" {
        first_cfg = first_cfg.set("KDEDUP_RELAY", "false");
    }
    let mut first = Sidecar::start(&first_cfg, &format!("crash_{point}_first"));
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Ok(Some(status)) = first.child.try_wait() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "first life never reached crash point {point}; log:\n{}",
            first.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        status.signal(),
        Some(6),
        "first life must die by abort at {point}, not exit: {status:?}; log:\n{}",
        first.log_tail()
    );
    let log = std::fs::read_to_string(&first.log).unwrap();
    assert!(
        log.contains(&format!("crash point {point} reached")),
        "{log}"
    );
    drop(first);

    let second = Sidecar::start(&cfg, &format!("crash_{point}_second"));
    let pool = pg().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let gated = count(&pool, &t.schema, "processed_events").await as usize;
        let pending = count(&pool, &t.schema, "outbox_pending").await;
        if gated == n && pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "second life did not finish: {gated}/{n} gated, {pending} in the outbox; log:\n{}",
            second.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // One forwarding write per id, across both lives: the gate's own running total.
    let forwarded: i64 = sqlx::query_scalar(&format!(
        "SELECT coalesce(sum(forwarded), 0)::int8 FROM \"{}\".gate_counters",
        t.schema
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(forwarded as usize, n, "forwarding writes by the gate");

    let out = kafka.read_topic(&t.output, n, Duration::from_secs(30));
    let mut copies: HashMap<String, usize> = HashMap::new();
    let mut first_seq: HashMap<i32, Vec<u64>> = HashMap::new();
    let mut sorted = out.clone();
    sorted.sort_by_key(|m| (m.partition, m.offset));
    for m in &sorted {
        let id = m
            .header("kdedup-event-id")
            .expect("every output message carries kdedup-event-id")
            .to_string();
        let c = copies.entry(id).or_default();
        *c += 1;
        if *c == 1 {
            first_seq
                .entry(m.partition)
                .or_default()
                .push(m.json()["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(copies.len(), n, "every distinct id reached the output");
    for (p, seqs) in first_seq {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "partition {p}: first sightings out of input order"
        );
    }
    let redeliveries = second.metric("kdedup_duplicates_total{cause=\"redelivery\"}");
    let second_log = std::fs::read_to_string(&second.log).unwrap_or_default();
    let errors = second_log
        .lines()
        .filter(|l| l.contains("\"level\":\"ERROR\""))
        .map(String::from)
        .collect();
    let partition_end_reported = second_log
        .lines()
        .filter(|l| l.contains("PartitionEOF"))
        .map(String::from)
        .collect();
    let takeovers_seen_in_topic = second_log
        .lines()
        .filter(|l| l.contains("are in the output topic already"))
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["already_in_topic"].as_u64())
                .unwrap_or(0) as usize
        })
        .sum();
    drop(second);
    drop_schema(&pool, &t.schema).await;
    Outcome {
        copies,
        output_len: out.len(),
        redeliveries,
        takeovers_seen_in_topic,
        errors,
        partition_end_reported,
    }
}

fn repeats(o: &Outcome) -> usize {
    o.copies.values().map(|c| c - 1).sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_before_the_postgres_commit_loses_nothing() {
    let o = crash_then_restart("before-db-commit", 3, 400).await;
    assert_eq!(repeats(&o), 0, "nothing published twice");
    assert_eq!(o.output_len, 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_the_postgres_commit_forwards_nothing_twice() {
    let o = crash_then_restart("after-db-commit", 3, 400).await;
    assert_eq!(repeats(&o), 0, "nothing published twice");
    assert!(
        o.redeliveries >= 1.0,
        "the committed batch whose offsets were lost came back as redeliveries"
    );
    assert_eq!(o.output_len, 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_the_offset_commit_loses_nothing() {
    let o = crash_then_restart("after-offset-commit", 3, 400).await;
    assert_eq!(repeats(&o), 0, "nothing published twice");
    assert_eq!(o.output_len, 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_crash_between_ack_and_checkpoint_publishes_nothing_twice() {
    let o = crash_then_restart("relay-after-ack", 2, 400).await;
    // The broker acknowledged messages the checkpoint does not record: the next relay
    // finds them in the output topic's tail and publishes only what is missing.
    assert_eq!(repeats(&o), 0, "nothing published twice");
    assert_eq!(o.output_len, 400);
    assert!(
        o.takeovers_seen_in_topic >= 1,
        "the second life found published rows past the checkpoint in the tail"
    );
    // Reading the tail to its end is not an error, nor a warning.
    assert!(o.errors.is_empty(), "ERROR lines: {:#?}", o.errors);
    assert!(
        o.partition_end_reported.is_empty(),
        "{:#?}",
        o.partition_end_reported
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rebalance_mid_batch_never_commits_past_unfinished_work() {
    let kafka = Cluster::shared();
    let t = names("rebalance_mid_batch");
    kafka.create_topic(&t.input, 4).await;
    // Slow gate transactions keep batches in flight while the partitions move.
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .set("KDEDUP_BATCH_SIZE", "40")
        .set("KDEDUP_GATE_DELAY_MS", "250");
    let a = Sidecar::start(&cfg, "rebalance_mid_batch_a");
    a.wait_ready(Duration::from_secs(60)).await;

    let total = 2400usize;
    let (kafka_in_task, input) = (kafka.clone(), t.input.clone());
    let producer = tokio::spawn(async move {
        for chunk in 0..24 {
            let msgs: Vec<In> = (chunk * 100..chunk * 100 + 100)
                .map(|i: i32| In::event(i % 4, &format!("rb-{i}"), i as u64))
                .collect();
            kafka_in_task.produce(&input, &msgs).await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });

    // Every 200 ms: what the group committed must never be past what is durable. All ids
    // are distinct, so each input offset below the committed one has its gate row.
    let pool = pg().await;
    let watch_pool = pool.clone();
    let (group, input, schema) = (t.group.clone(), t.input.clone(), t.schema.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let watch_stop = stop.clone();
    let watcher = tokio::spawn(async move {
        let mut checks = 0usize;
        while !watch_stop.is_cancelled() {
            let (g, i) = (group.clone(), input.clone());
            let offsets =
                tokio::task::spawn_blocking(move || Cluster::shared().committed_offsets(&g, &i, 4))
                    .await
                    .unwrap();
            // Rows below each committed offset: all of them must be there.
            let parts: Vec<i32> = (0..4).collect();
            let durable: Vec<(i32, i64, i64)> = sqlx::query_as(&format!(
                "SELECT c.p, c.o, (SELECT count(*) FROM \"{schema}\".processed_events pe \
                                    WHERE pe.source_partition = c.p AND pe.source_offset < c.o) \
                 FROM unnest($1::int4[], $2::int8[]) AS c(p, o)"
            ))
            .bind(&parts)
            .bind(&offsets)
            .fetch_all(&watch_pool)
            .await
            .unwrap_or_default();
            for (p, committed, rows) in durable {
                assert!(
                    committed <= 0 || rows == committed,
                    "partition {p}: offset {committed} committed with only {rows} of the events before it durable"
                );
            }
            checks += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        checks
    });

    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut b = Sidecar::start(&cfg, "rebalance_mid_batch_b");
    b.wait_ready(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        b.sigterm(Duration::from_secs(15)),
        Some(0),
        "b drains and exits 0"
    );
    producer.await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(120);
    while (count(&pool, &t.schema, "processed_events").await as usize) < total
        || count(&pool, &t.schema, "outbox_pending").await != 0
    {
        assert!(
            Instant::now() < deadline,
            "not everything settled; log:\n{}",
            a.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    let checks = watcher
        .await
        .expect("committed offsets never ran ahead of durable work");
    assert!(checks > 10, "the watcher ran {checks} times");

    let a_log = std::fs::read_to_string(&a.log).unwrap();
    assert!(
        a_log.matches("partitions assigned").count() >= 3,
        "a went through the join and the leave of b:\n{}",
        a.log_tail()
    );
    let out = kafka.read_topic(&t.output, total, Duration::from_secs(30));
    let mut ids = std::collections::HashSet::new();
    for m in &out {
        assert!(
            ids.insert(m.header("kdedup-event-id").unwrap().to_string()),
            "forwarded twice: {:?}",
            m.header("kdedup-event-id")
        );
    }
    assert_eq!(ids.len(), total, "every id forwarded once");
    drop(a);
    drop(b);
    drop_schema(&pool, &t.schema).await;
}
