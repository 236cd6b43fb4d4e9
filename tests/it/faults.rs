//! Faults and bad input, against the real broker and real Postgres: nothing lost,
//! nothing forwarded twice, no partition stopped, no process restarted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::helpers::*;
use rand::{Rng, SeedableRng};

fn ids_on(out: &[Out]) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for m in out {
        *seen
            .entry(m.header("kdedup-event-id").unwrap_or("").to_string())
            .or_insert(0) += 1;
    }
    seen
}

fn assert_once(out: &[Out], expected: usize) {
    let seen = ids_on(out);
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "forwarded twice: {twice:?}");
    assert_eq!(seen.len(), expected, "distinct ids on the output");
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_outage_pauses_input_keeps_the_group_and_loses_nothing() {
    let kafka = Cluster::shared();
    let t = names("pgdown");
    kafka.create_topic(&t.input, 2).await;
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = format!("postgres://postgres@127.0.0.1:{}/test", proxy.port);
    // A short max.poll.interval.ms: a consumer that stopped polling during the outage
    // would be evicted from its group long before the outage ends.
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .set("KDEDUP_DATABASE_URL", &url)
        .set("KDEDUP_KAFKA_MAX_POLL_INTERVAL_MS", "10000")
        .set("KDEDUP_BATCH_SIZE", "100")
        // 64 KiB read ahead of the lanes, a few hundred of these small messages: the
        // outage wave (1,200) fills that at once, so the input has to be held (paused,
        // polled, rewound) to stay in the group.
        .set("KDEDUP_READ_AHEAD_BYTES", "65536");
    let _ = std::fs::remove_file(log_dir().join("pgdown.log"));
    let mut s = Sidecar::start(&cfg, "pgdown");
    s.wait_ready(Duration::from_secs(60)).await;
    let first: Vec<In> = (0..300)
        .map(|i| In::event(i % 2, &format!("a-{i}"), i as u64))
        .collect();
    kafka.produce(&t.input, &first).await;
    wait_until(Duration::from_secs(60), "first wave forwarded", || {
        s.metric("kdedup_events_forwarded_total") >= 300.0
    })
    .await;

    proxy.set_down(true);
    let outage = Instant::now();
    let mut second: Vec<In> = (300..1300)
        .map(|i| In::event(i % 2, &format!("a-{i}"), i as u64))
        .collect();
    second.extend((0..200).map(|i| In::event(i % 2, &format!("a-{i}"), i as u64)));
    kafka.produce(&t.input, &second).await;
    wait_until(Duration::from_secs(20), "readiness to drop", || !s.ready()).await;
    let mut peak_rss = 0;
    while outage.elapsed() < Duration::from_secs(60) {
        peak_rss = peak_rss.max(rss_kib(s.child.id()));
        assert!(
            matches!(s.child.try_wait(), Ok(None)),
            "the sidecar exited during the outage; log:\n{}",
            s.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(s.metric("kdedup_postgres_up"), 0.0);
    proxy.set_down(false);

    wait_until(
        Duration::from_secs(90),
        "backlog processed after the outage",
        || s.metric("kdedup_events_forwarded_total") >= 1300.0,
    )
    .await;
    s.wait_ready(Duration::from_secs(20)).await;
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(
        log.contains("input held"),
        "input was not held during the outage"
    );
    assert!(
        !log.contains("partitions revoked"),
        "the consumer left its group during the outage"
    );
    assert!(
        peak_rss < 200 * 1024,
        "RSS grew to {peak_rss} KiB during the outage"
    );
    let out = kafka.read_topic(&t.output, 1300, Duration::from_secs(30));
    assert_once(&out, 1300);
    assert_eq!(out.len(), 1300);
    assert_eq!(s.metric("kdedup_duplicates_total"), 200.0);
    drop(s);
    drop_schema(&pg().await, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebalance_mid_stream_loses_nothing_and_forwards_nothing_twice() {
    let kafka = Cluster::shared();
    let t = names("rebalance");
    kafka.create_topic(&t.input, 4).await;
    let cfg =
        SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema).set("KDEDUP_BATCH_SIZE", "50");
    let a = Sidecar::start(&cfg, "rebalance_a");
    a.wait_ready(Duration::from_secs(60)).await;

    let total = 4000usize;
    let (kafka_in_task, input) = (kafka.clone(), t.input.clone());
    let producer = tokio::spawn(async move {
        for chunk in 0..40 {
            let msgs: Vec<In> = (chunk * 100..chunk * 100 + 100)
                .map(|i| In::event(i % 4, &format!("rb-{i}"), i as u64))
                .collect();
            kafka_in_task.produce(&input, &msgs).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut b = Sidecar::start(&cfg, "rebalance_b");
    b.wait_ready(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // b leaves (a Kubernetes stop): its partitions go back to a, from the last committed
    // offsets, while the producer is still writing.
    assert_eq!(b.sigterm(Duration::from_secs(15)), Some(0));
    producer.await.unwrap();
    wait_until(Duration::from_secs(120), "every id forwarded", || {
        let out = kafka.read_topic(&t.output, total, Duration::from_secs(3));
        ids_on(&out).len() >= total
    })
    .await;
    let out = kafka.read_topic(&t.output, total, Duration::from_secs(20));
    assert_once(&out, total);
    drop(a);
    drop_schema(&pg().await, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fuzzed_input_never_stops_a_partition_and_nothing_is_lost() {
    let kafka = Cluster::shared();
    let t = names("fuzz");
    kafka.create_topic(&t.input, 3).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut msgs = Vec::new();
    let mut good = 0usize;
    let mut bad = 0usize;
    // Where each bad message lands: one producer, in order, so offsets count up per partition.
    let mut next_offset = [0i64; 3];
    let mut bad_positions = std::collections::HashSet::new();
    for i in 0..3000usize {
        let p = (i % 3) as i32;
        let offset = next_offset[p as usize];
        next_offset[p as usize] += 1;
        if rng.random_bool(0.6) {
            msgs.push(In::event(p, &format!("f-{i}"), i as u64));
            good += 1;
            continue;
        }
        bad += 1;
        bad_positions.insert((p, offset));
        let random: Vec<u8> = (0..rng.random_range(0..200))
            .map(|_| rng.random())
            .collect();
        let m = match rng.random_range(0..7) {
            // Random bytes, no id header.
            0 => In {
                partition: Some(p),
                key: Some(random.clone()),
                value: Some(random),
                headers: vec![],
            },
            // Truncated JSON.
            1 => In {
                partition: Some(p),
                key: None,
                value: Some(format!(r#"{{"id":"t-{i}","seq":"#).into_bytes()),
                headers: vec![],
            },
            // Empty key, empty id header.
            2 => In {
                partition: Some(p),
                key: Some(vec![]),
                value: Some(b"{}".to_vec()),
                headers: vec![("event-id".into(), vec![])],
            },
            // An id that is not UTF-8.
            3 => In {
                partition: Some(p),
                key: None,
                value: None,
                headers: vec![("event-id".into(), vec![0xc3, 0x28, 0xff])],
            },
            // An id far over --max-id-bytes.
            4 => In {
                partition: Some(p),
                key: None,
                value: None,
                headers: vec![("event-id".into(), vec![b'z'; 4096])],
            },
            // Huge headers and no id.
            5 => In {
                partition: Some(p),
                key: None,
                value: Some(b"null".to_vec()),
                headers: vec![("noise".into(), vec![b'h'; 64 * 1024])],
            },
            // A message over --max-message-bytes, with a perfectly good id.
            _ => In {
                partition: Some(p),
                key: None,
                value: Some(vec![b'v'; 150 * 1024]),
                headers: vec![("event-id".into(), format!("big-{i}").into_bytes())],
            },
        };
        msgs.push(m);
    }
    kafka.produce(&t.input, &msgs).await;
    let mut s = Sidecar::start(
        &SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
            .set("KDEDUP_ID_FROM", "header:event-id,json:/id")
            .set("KDEDUP_MAX_MESSAGE_BYTES", "100000"),
        "fuzz",
    );
    wait_until(Duration::from_secs(120), "all consumed and settled", || {
        s.metric("kdedup_events_consumed_total") as usize >= msgs.len()
            && s.metric("kdedup_events_forwarded_total") as usize >= good
            && s.metric("kdedup_events_dead_lettered_total") as usize >= bad
    })
    .await;
    assert!(
        matches!(s.child.try_wait(), Ok(None)),
        "the sidecar exited; log:\n{}",
        s.log_tail()
    );
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert_eq!(
        log.matches(r#""message":"consuming""#).count(),
        1,
        "the pipeline started more than once"
    );
    assert!(
        s.get("/livez").is_some_and(|(c, _)| c == 200),
        "the process is alive"
    );
    let out = kafka.read_topic(&t.output, good, Duration::from_secs(30));
    assert_eq!(out.len(), good);
    assert_once(&out, good);
    let dlq = kafka.read_topic(&t.dlq, bad, Duration::from_secs(30));
    assert_eq!(dlq.len(), bad, "every bad message is in the DLQ");
    assert!(dlq
        .iter()
        .all(|m| m.header("kdedup-dlq-reason").is_some_and(|r| !r.is_empty())));
    // Exactly the bad messages, each once, traced back to its own input position.
    let dead_lettered: std::collections::HashSet<(i32, i64)> = dlq
        .iter()
        .map(|m| {
            assert_eq!(m.header("kdedup-source-topic"), Some(t.input.as_str()));
            (
                m.header("kdedup-source-partition")
                    .unwrap()
                    .parse()
                    .unwrap(),
                m.header("kdedup-source-offset").unwrap().parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        dead_lettered.len(),
        bad,
        "a bad message dead-lettered twice"
    );
    assert_eq!(
        dead_lettered, bad_positions,
        "DLQ positions are the bad inputs'"
    );
    assert_eq!(s.metric("kdedup_events_dead_lettered_total") as usize, bad);
    drop(s);
    drop_schema(&pg().await, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn same_id_with_a_different_payload_is_counted_and_dead_lettered_on_request() {
    let kafka = Cluster::shared();
    let t = names("mismatch");
    kafka.create_topic(&t.input, 1).await;
    let mut changed = In::event(0, "m-1", 99);
    changed.value = Some(br#"{"id":"m-1","seq":99,"amount":"changed"}"#.to_vec());
    let msgs = vec![
        In::event(0, "m-1", 1),
        In::event(0, "m-2", 2),
        In::event(0, "m-1", 1),
        changed,
    ];
    kafka.produce(&t.input, &msgs).await;
    let s = Sidecar::start(
        &SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
            .set("KDEDUP_ON_PAYLOAD_MISMATCH", "dlq"),
        "mismatch",
    );
    wait_until(Duration::from_secs(60), "settled", || {
        s.metric("kdedup_events_consumed_total") >= 4.0
    })
    .await;
    wait_until(Duration::from_secs(30), "mismatch dead-lettered", || {
        s.metric("kdedup_events_dead_lettered_total{reason=\"payload_mismatch\"}") >= 1.0
    })
    .await;
    assert_eq!(
        s.metric("kdedup_payload_mismatches_total{action=\"dead_lettered\"}"),
        1.0
    );
    assert_eq!(
        s.metric("kdedup_duplicates_total"),
        1.0,
        "the identical repeat is a duplicate"
    );
    let dlq = kafka.read_topic(&t.dlq, 1, Duration::from_secs(20));
    assert_eq!(dlq.len(), 1);
    assert!(dlq[0]
        .header("kdedup-dlq-error")
        .unwrap()
        .contains(&format!("{}/0/0", t.input)));
    assert_eq!(
        kafka
            .read_topic(&t.output, 2, Duration::from_secs(20))
            .len(),
        2
    );
    drop(s);
    drop_schema(&pg().await, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blackholed_postgres_keeps_the_group_and_sigterm_still_exits_cleanly() {
    let kafka = Cluster::shared();
    let t = names("pghang");
    kafka.create_topic(&t.input, 2).await;
    let hole = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = format!("postgres://postgres@127.0.0.1:{}/test", hole.port);
    // max.poll.interval.ms 12 s: a gate attempt that waited on the dead connection for
    // ever would get the consumer evicted; the attempt must give up after 5 s instead.
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .set("KDEDUP_DATABASE_URL", &url)
        .set("KDEDUP_KAFKA_MAX_POLL_INTERVAL_MS", "12000")
        .set("KDEDUP_BATCH_SIZE", "50");
    let mut s = Sidecar::start(&cfg, "pghang");
    s.wait_ready(Duration::from_secs(60)).await;
    let first: Vec<In> = (0..200)
        .map(|i| In::event(i % 2, &format!("h-{i}"), i as u64))
        .collect();
    kafka.produce(&t.input, &first).await;
    wait_until(Duration::from_secs(60), "first wave forwarded", || {
        s.metric("kdedup_events_forwarded_total") >= 200.0
    })
    .await;

    hole.set_silent(true);
    let second: Vec<In> = (200..500)
        .map(|i| In::event(i % 2, &format!("h-{i}"), i as u64))
        .collect();
    kafka.produce(&t.input, &second).await;
    wait_until(Duration::from_secs(30), "readiness to drop", || !s.ready()).await;
    // Longer than max.poll.interval.ms with Postgres silent.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let log = std::fs::read_to_string(&s.log).unwrap();
    // Each attempt is given up (a connection that never answers, or a pool that cannot
    // hand one out) and retried, several times over the hang.
    let given_up = log
        .matches("gate transaction failed; retrying the batch")
        .count();
    assert!(
        given_up >= 2,
        "the hung gate attempt was not given up and retried ({given_up}):\n{}",
        s.log_tail()
    );
    assert!(
        !log.contains("partitions revoked"),
        "the consumer left its group while Postgres hung:\n{}",
        s.log_tail()
    );
    // Kubernetes stops the pod in the middle of it: exit 0 within the drain deadline (5s).
    let stopping = Instant::now();
    assert_eq!(
        s.sigterm(Duration::from_secs(15)),
        Some(0),
        "{}",
        s.log_tail()
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(8),
        "drain took {:?}",
        stopping.elapsed()
    );

    hole.set_silent(false);
    let s2 = Sidecar::start(&cfg, "pghang_second");
    wait_until(
        Duration::from_secs(90),
        "everything forwarded after the hang",
        || {
            s2.metric("kdedup_events_forwarded_total") + s.metric("kdedup_events_forwarded_total")
                >= 500.0
                || kafka
                    .read_topic(&t.output, 500, Duration::from_secs(2))
                    .len()
                    >= 500
        },
    )
    .await;
    let out = kafka.read_topic(&t.output, 500, Duration::from_secs(30));
    assert_once(&out, 500);
    assert_eq!(out.len(), 500);
    drop(s2);
    drop_schema(&pg().await, &t.schema).await;
}

/// The backend pid of the lane connection's session, with the connection given back
/// after the query (kept, or dropped after an error that may have broken it).
async fn lane_session(lane: &kdedup::store::lane::LaneConnection) -> Option<i32> {
    let mut lent = lane.lend().await.expect("lend");
    let r: Result<i32, kdedup::store::DbError> = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(lent.conn())
        .await
        .map_err(Into::into);
    lent.give_back(&r);
    r.ok()
}

#[tokio::test]
async fn a_gate_lane_connection_ended_by_the_server_is_replaced() {
    use kdedup::store::lane::{LaneConnection, TEST_AFTER_IDLE};
    let pool = pg().await;
    let terminate = |pid: i32| {
        let pool = pool.clone();
        async move {
            let done: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
                .bind(pid)
                .fetch_one(&pool)
                .await
                .unwrap();
            assert!(done, "session {pid} not terminated");
        }
    };
    let lane = LaneConnection::new(&pool);
    let first = lane_session(&lane).await.expect("first use");
    assert_eq!(lane_session(&lane).await, Some(first), "kept between uses");

    // Ended by the server (a failover, an administrator) while in use moments ago: the
    // next use fails (and is retried by the gate), the one after it has a new session.
    terminate(first).await;
    assert_eq!(
        lane_session(&lane).await,
        None,
        "the ended session fails once"
    );
    let second = lane_session(&lane).await.expect("a new session");
    assert_ne!(second, first);

    // Ended while idle for longer than TEST_AFTER_IDLE: tested before use, so the use
    // itself does not fail.
    terminate(second).await;
    tokio::time::sleep(TEST_AFTER_IDLE + Duration::from_millis(300)).await;
    let third = lane_session(&lane)
        .await
        .expect("tested and replaced before use");
    assert_ne!(third, second);
}
