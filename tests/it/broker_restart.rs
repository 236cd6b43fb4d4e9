//! A broker restart during a run, on a real tansu of the test's own whose storage is a
//! Postgres database (so it keeps its topics, records, committed offsets and idempotent
//! producer state across a SIGKILL): no loss, no duplicate forward, the relay resumes.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::helpers::*;

fn ev(i: u64) -> In {
    In::event((i % 2) as i32, &format!("r-{i}"), i)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_restart_loses_nothing_forwards_nothing_twice_and_the_relay_resumes() {
    let mut broker = Tansu::start("restart").await;
    let b = broker.cluster();
    let t = names("brokerrestart");
    b.create_topic(&t.input, 2).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .set("KDEDUP_BROKERS", &b.brokers)
        .set("KDEDUP_BATCH_SIZE", "100")
        .set("KDEDUP_RELAY_BATCH_SIZE", "100");
    let mut s = Sidecar::start(&cfg, &t.schema);
    s.wait_ready(Duration::from_secs(60)).await;
    let pool = pg().await;

    // Wave 1, and part of it forwarded.
    b.produce(&t.input, &(0..400).map(ev).collect::<Vec<_>>())
        .await;
    wait_until(Duration::from_secs(60), "part of wave 1 forwarded", || {
        s.metric("kdedup_events_forwarded_total") >= 100.0
    })
    .await;

    // Wave 2 in the background; the broker dies while it is consumed, gated and relayed.
    let (b2, in2) = (b.clone(), t.input.clone());
    let wave2 = tokio::spawn(async move {
        b2.produce(&in2, &(400..3000).map(ev).collect::<Vec<_>>())
            .await;
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let gated = count(&pool, &t.schema, "processed_events").await;
        let pending = count(&pool, &t.schema, "outbox_pending").await;
        if gated > 600 && pending > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "wave 2 never had outbox rows pending (gated {gated}); log:\n{}",
            s.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    broker.kill();
    let killed_at = Instant::now();
    let forwarded_at_kill = s.metric("kdedup_events_forwarded_total");

    // While it is down: a third wave and a re-sent burst wait in the test producer, and
    // the sidecar gates what it had fetched into the outbox, which the relay cannot publish.
    let (b3, in3) = (b.clone(), t.input.clone());
    let wave3 = tokio::spawn(async move {
        let mut msgs: Vec<In> = (3000..3400).map(ev).collect();
        msgs.extend((0..200).map(ev));
        b3.produce(&in3, &msgs).await;
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pending_while_down = count(&pool, &t.schema, "outbox_pending").await;
    let gated_while_down = count(&pool, &t.schema, "processed_events").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        pending_while_down > 0,
        "outbox rows pending while the broker is down"
    );
    broker.start_again().await;
    let down_for = killed_at.elapsed();
    wave2.await.unwrap();
    wave3.await.unwrap();

    // Everything settles: the relay empties the outbox, the group commits to the end.
    let distinct: HashSet<String> = (0..3400).map(|i| format!("r-{i}")).collect();
    let ends = b.high_watermarks(&t.input, 2);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let pending = count(&pool, &t.schema, "outbox_pending").await;
        let gated = count(&pool, &t.schema, "processed_events").await;
        let committed = b.committed_offsets(&t.group, &t.input, 2);
        if pending == 0 && gated == distinct.len() as i64 && committed == ends {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not settled: outbox {pending}, gated {gated}, committed {committed:?} of {ends:?}; log:\n{}",
            s.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        matches!(s.child.try_wait(), Ok(None)),
        "the sidecar rode out the restart without exiting; log:\n{}",
        s.log_tail()
    );

    let out = b.read_topic(&t.output, distinct.len(), Duration::from_secs(60));
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in &out {
        *seen
            .entry(m.header("kdedup-event-id").unwrap_or_default().to_string())
            .or_default() += 1;
    }
    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    let (gate_forwarded, gate_duplicates) = gate_totals(&pool, &t.schema).await;
    let relayed = s.metric("kdedup_events_forwarded_total");
    println!(
        "broker restart: down {down_for:?}; at the kill {forwarded_at_kill} relayed, \
         1s later {pending_while_down} outbox rows pending of {gated_while_down} gated; \
         after: {} output messages, {} distinct ids, {} repeated, relayed {relayed}, \
         gate forwarded {gate_forwarded} duplicates {gate_duplicates}",
        out.len(),
        seen.len(),
        repeated.len()
    );
    assert!(repeated.is_empty(), "ids forwarded twice: {repeated:?}");
    assert_eq!(
        seen.keys().cloned().collect::<HashSet<_>>(),
        distinct,
        "every distinct id is on the output"
    );
    assert_eq!(
        count(&pool, &t.schema, "outbox_pending").await,
        0,
        "relay resumed"
    );
    assert!(
        relayed > forwarded_at_kill,
        "the relay published after the restart"
    );
    assert_eq!(
        relayed,
        distinct.len() as f64,
        "the one relay published each row once"
    );
    assert_eq!(
        gated_ids(&pool, &t.schema).await,
        distinct,
        "processed_events"
    );
    assert_eq!(
        gate_forwarded,
        distinct.len() as i64,
        "gate_counters.forwarded"
    );
    assert!(
        gate_duplicates >= 200,
        "the re-sent burst counted as duplicates"
    );

    s.sigterm(Duration::from_secs(10));
    drop_schema(&pool, &t.schema).await;
    drop(broker);
}
