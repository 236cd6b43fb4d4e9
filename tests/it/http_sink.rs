//! `--sink http` against the real broker, Postgres and a real HTTP application
//! ([`HttpApp`]: it records every request and applies each Idempotency-Key once): each
//! distinct id is applied once in key order, through duplicates, retries, refusals,
//! replays, an application outage, kill -9 and a rebalance between two replicas; SIGTERM
//! writes the outcomes of the requests in flight.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::helpers::*;

/// `n` events over 3 partitions, 30 Kafka keys (each on one partition), a JSON body with
/// the key and a sequence number; every 4th sent again later, every 10th twice in a row.
fn events_with_duplicates(n: u64) -> (Vec<In>, usize) {
    let event = |i: u64| {
        let k = i % 30;
        In {
            partition: Some((k % 3) as i32),
            key: Some(format!("k{k}").into_bytes()),
            value: Some(format!(r#"{{"id":"e-{i}","k":"k{k}","seq":{i}}}"#).into_bytes()),
            headers: vec![
                ("event-id".into(), format!("e-{i}").into_bytes()),
                ("content-type".into(), b"application/json".to_vec()),
                ("tenant".into(), b"acme".to_vec()),
            ],
        }
    };
    let mut msgs = Vec::new();
    for i in 0..n {
        if i % 10 == 0 {
            msgs.push(event(i));
        }
        msgs.push(event(i));
    }
    msgs.extend((0..n).step_by(4).map(event));
    let dups = msgs.len() - n as usize;
    (msgs, dups)
}

/// Event `e-<i>` on `partition`, its own Kafka key, a JSON body with key and sequence.
fn single(partition: i32, i: u64) -> In {
    let mut m = In::event(partition, &format!("e-{i}"), i);
    m.value = Some(format!(r#"{{"id":"e-{i}","k":"k-e-{i}","seq":{i}}}"#).into_bytes());
    m
}

fn body_json(r: &Received) -> serde_json::Value {
    serde_json::from_slice(&r.body).expect("a JSON body")
}

/// Every request for one Kafka key came in input order (by `seq`), counting only the
/// first request of each event (a repeat after a crash is the same event again).
fn assert_key_order(received: &[Received]) {
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut seen = HashSet::new();
    for r in received {
        if !seen.insert(r.key.clone()) {
            continue;
        }
        let v = body_json(r);
        let (k, seq) = (
            v["k"].as_str().unwrap().to_string(),
            v["seq"].as_i64().unwrap(),
        );
        if let Some(prev) = last.insert(k.clone(), seq) {
            assert!(prev < seq, "key {k}: seq {seq} delivered after {prev}");
        }
    }
}

/// The event ids the application applied.
fn applied_ids(app: &HttpApp) -> HashSet<String> {
    let applied: HashSet<String> = app.applied().into_iter().collect();
    app.received()
        .into_iter()
        .filter(|r| applied.contains(&r.key))
        .map(|r| r.event_id)
        .collect()
}

fn all_ids(n: u64) -> HashSet<String> {
    (0..n).map(|i| format!("e-{i}")).collect()
}

async fn statuses(pool: &sqlx::PgPool, schema: &str) -> HashMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(&format!(
        "SELECT coalesce(status, 'NULL'), count(*) FROM \"{schema}\".processed_events GROUP BY 1"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_distinct_id_is_applied_once_in_key_order_with_its_key_headers_and_stored_answer() {
    let kafka = Cluster::shared();
    let pool = pg().await;
    let app = HttpApp::start().await;
    let t = names("http_once");
    kafka.create_topic(&t.input, 3).await;
    let n = 3000;
    let (msgs, dups) = events_with_duplicates(n);
    kafka.produce(&t.input, &msgs).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .http_sink(&app.url())
        .set("KDEDUP_SCOPE", "orders")
        .set("KDEDUP_HTTP_CONCURRENCY", "8");
    let s = Sidecar::start(&cfg, "http_once");
    wait_until(Duration::from_secs(120), "every event settled", || {
        s.metric("kdedup_events_forwarded_total") >= n as f64
            && s.metric("kdedup_duplicates_total") >= dups as f64
    })
    .await;

    let received = app.received();
    assert_eq!(
        received.len(),
        n as usize,
        "one request per distinct id, no repeat"
    );
    assert_eq!(applied_ids(&app), all_ids(n));
    assert!(app.concurrent().is_empty());
    assert!(
        app.max_in_flight() <= 8,
        "at most --http-concurrency in flight: {}",
        app.max_in_flight()
    );
    assert!(app.max_in_flight() > 1, "requests went side by side");
    assert_key_order(&received);

    // The key is the gate row's key: event_key(scope, event_id), as the SQL function says.
    let keys: HashMap<String, String> = sqlx::query_as::<_, (String, String)>(&format!(
        "SELECT event_id, \"{0}\".event_key('orders', event_id)::text FROM \"{0}\".processed_events",
        t.schema
    ))
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    for r in &received {
        assert_eq!(
            keys[&r.event_id], r.key,
            "Idempotency-Key of {}",
            r.event_id
        );
        assert_eq!(r.content_type, "application/json");
        assert_eq!(r.headers["tenant"], "acme", "input headers passed through");
        assert!(
            r.source.starts_with(&format!("{}/", t.input)),
            "{}",
            r.source
        );
        assert_eq!(
            body_json(r)["id"],
            r.event_id.as_str(),
            "the body is the value"
        );
    }
    let distinct_keys: HashSet<&String> = received.iter().map(|r| &r.key).collect();
    assert_eq!(
        distinct_keys.len(),
        n as usize,
        "distinct ids, distinct keys"
    );

    assert_eq!(
        statuses(&pool, &t.schema).await,
        HashMap::from([("PROCESSED".to_string(), n as i64)])
    );
    let (status, attempts, headers, body): (i32, i32, serde_json::Value, Vec<u8>) =
        sqlx::query_as(&format!(
            "SELECT response_status, attempts, response_headers, response_body
             FROM \"{}\".processed_events WHERE event_id = 'e-7'",
            t.schema
        ))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((status, attempts), (201, 1));
    assert_eq!(headers["x-app"], "applied", "the answer's headers are kept");
    assert_eq!(
        body,
        br#"{"applied":"e-7"}"#.to_vec(),
        "the answer's body is kept"
    );

    assert_eq!(
        s.metric("kdedup_http_requests_total{class=\"2xx\"}"),
        n as f64
    );
    assert_eq!(s.metric("kdedup_events_forwarded_total"), n as f64);
    assert_eq!(s.metric("kdedup_duplicates_total"), dups as f64);
    assert_eq!(s.metric("kdedup_http_in_flight"), 0.0);
    assert_eq!(gate_totals(&pool, &t.schema).await, (n as i64, dups as i64));
    wait_until(Duration::from_secs(30), "input committed", || {
        kafka
            .committed_offsets(&t.group, &t.input, 3)
            .iter()
            .sum::<i64>()
            == msgs.len() as i64
    })
    .await;
    drop(s);
    drop_schema(&pool, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_retry_after_refusals_and_a_replay_once_the_application_accepts() {
    let kafka = Cluster::shared();
    let pool = pg().await;
    let app = HttpApp::start().await;
    let t = names("http_retry");
    // One partition: "the partition went on" past a refusal is visible.
    kafka.create_topic(&t.input, 1).await;
    let n = 200u64;
    let msgs: Vec<In> = (0..n).map(|i| single(0, i)).collect();
    app.fail_id("e-10", 500, 2, None); // transient, then accepted
    app.fail_id("e-20", 429, 1, Some(2)); // honoured Retry-After
    app.fail_id("e-30", 400, u32::MAX, None); // refused: DLQ at once
    app.fail_id("e-31", 422, u32::MAX, None);
    app.fail_id("e-40", 503, u32::MAX, None); // out of attempts: DLQ
                                              // 409, "still being processed": past --http-max-attempts without using it up ...
    app.fail_id("e-50", 409, 5, None);
    // ... but not past --http-conflict-timeout.
    app.fail_id("e-60", 409, u32::MAX, None);
    kafka.produce(&t.input, &msgs).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .http_sink(&app.url())
        .set("KDEDUP_HTTP_MAX_ATTEMPTS", "4")
        .set("KDEDUP_HTTP_MAX_BACKOFF", "3s")
        .set("KDEDUP_HTTP_CONFLICT_TIMEOUT", "4s")
        .set("KDEDUP_BATCH_SIZE", "50");
    let mut s = Sidecar::start(&cfg, "http_retry");
    wait_until(Duration::from_secs(90), "settled", || {
        s.metric("kdedup_events_forwarded_total") >= (n - 4) as f64
            && s.metric("kdedup_events_dead_lettered_total") >= 4.0
    })
    .await;
    let received = app.received();
    let requests = |id: &str| -> Vec<Instant> {
        received
            .iter()
            .filter(|r| r.event_id == id)
            .map(|r| r.at)
            .collect()
    };
    assert_eq!(requests("e-10").len(), 3, "two 500s, then accepted");
    let e20 = requests("e-20");
    assert_eq!(e20.len(), 2);
    assert!(
        e20[1] - e20[0] >= Duration::from_millis(1900),
        "Retry-After: 2 honoured: {:?}",
        e20[1] - e20[0]
    );
    assert_eq!(requests("e-30").len(), 1, "a 400 is not retried");
    assert_eq!(requests("e-40").len(), 4, "--http-max-attempts");
    assert_eq!(
        requests("e-50").len(),
        6,
        "five 409s do not use up 4 attempts, then accepted"
    );
    let e60 = requests("e-60");
    assert!(
        e60.len() > 4 && e60[e60.len() - 1] - e60[0] >= Duration::from_secs(4),
        "409s retried past --http-max-attempts until --http-conflict-timeout: {} requests over {:?}",
        e60.len(),
        e60[e60.len() - 1] - e60[0]
    );
    let failed = HashSet::from(["e-30", "e-31", "e-40", "e-60"].map(String::from));
    let applied = applied_ids(&app);
    assert_eq!(
        applied,
        all_ids(n).difference(&failed).cloned().collect(),
        "the partition went on past the failures"
    );
    let rows: HashMap<String, (String, i32, Option<String>)> =
        sqlx::query_as::<_, (String, String, i32, Option<String>)>(&format!(
            "SELECT event_id, status, attempts, last_error FROM \"{}\".processed_events
             WHERE event_id IN ('e-10', 'e-30', 'e-40', 'e-50', 'e-60')",
            t.schema
        ))
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, s, a, e)| (id, (s, a, e)))
        .collect();
    assert_eq!(rows["e-10"].0, "PROCESSED");
    assert_eq!(rows["e-10"].1, 3);
    assert_eq!(rows["e-30"].0, "FAILED");
    assert!(
        rows["e-30"].2.as_deref().unwrap().contains("HTTP 400"),
        "{rows:?}"
    );
    assert_eq!((rows["e-40"].0.as_str(), rows["e-40"].1), ("FAILED", 4));
    assert_eq!((rows["e-50"].0.as_str(), rows["e-50"].1), ("PROCESSED", 6));
    assert_eq!(rows["e-60"].0, "FAILED");
    assert!(
        rows["e-60"]
            .2
            .as_deref()
            .unwrap()
            .starts_with("HTTP 409: still in progress after 4s of 409s"),
        "{rows:?}"
    );

    let dlq = kafka.read_topic(&t.dlq, 4, Duration::from_secs(20));
    let by_id: HashMap<&str, &Out> = dlq
        .iter()
        .map(|m| (m.header("event-id").unwrap(), m))
        .collect();
    assert_eq!(by_id.len(), 4);
    assert_eq!(
        by_id["e-30"].header("kdedup-dlq-reason"),
        Some("http_rejected")
    );
    assert_eq!(by_id["e-30"].header("kdedup-dlq-http-status"), Some("400"));
    assert!(by_id["e-30"]
        .header("kdedup-dlq-http-body")
        .unwrap()
        .contains("refused with 400"));
    assert_eq!(by_id["e-31"].header("kdedup-dlq-http-status"), Some("422"));
    assert_eq!(
        by_id["e-40"].header("kdedup-dlq-reason"),
        Some("http_failed")
    );
    assert_eq!(by_id["e-40"].header("kdedup-dlq-http-status"), Some("503"));
    assert_eq!(
        by_id["e-60"].header("kdedup-dlq-reason"),
        Some("http_failed")
    );
    assert_eq!(by_id["e-60"].header("kdedup-dlq-http-status"), Some("409"));
    assert_eq!(
        s.metric("kdedup_http_failed_total{reason=\"http_rejected\"}"),
        2.0
    );
    assert_eq!(
        s.metric("kdedup_http_failed_total{reason=\"http_failed\"}"),
        2.0
    );
    assert!(s.metric("kdedup_http_retries_total{reason=\"conflict\"}") >= 9.0);
    assert_eq!(
        s.metric("kdedup_http_retries_total{reason=\"retry_after\"}"),
        1.0
    );
    assert_eq!(s.sigterm(Duration::from_secs(20)), Some(0));
    let (code, text, err) = kdedup_command(&cfg, &["inspect", "e-30"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(text.contains("FAILED: dead-lettered"), "{text}");
    assert!(
        text.contains("HTTP 400: event e-30 refused with 400"),
        "{text}"
    );

    let (code, stats, err) = kdedup_command(&cfg, &["stats", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let d = &stats["deliveries"];
    assert_eq!(
        (&d["processed"], &d["failed"], &d["processing"]),
        (&(n - 4).into(), &4.into(), &0.into()),
        "{stats}"
    );

    // Fixed: the replay of the dead-letter topic delivers the FAILED ones, once.
    app.accept_all();
    let (code, out, err) = kdedup_command(&cfg, &["replay"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(summary_value(&out, "forwarded"), 4, "{out}");
    let (code, again, err) = kdedup_command(&cfg, &["replay"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        summary_value(&again, "forwarded"),
        0,
        "PROCESSED is skipped: {again}"
    );
    assert_eq!(applied_ids(&app), all_ids(n));
    assert_eq!(app.applied_count(), n as usize, "each key applied once");
    let keys_of = |id: &str| -> HashSet<String> {
        app.received()
            .into_iter()
            .filter(|r| r.event_id == id)
            .map(|r| r.key)
            .collect()
    };
    assert_eq!(keys_of("e-40").len(), 1, "the replay used the same key");
    let (code, json, err) = kdedup_command(&cfg, &["inspect", "e-40", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    let delivery = &json["matches"][0]["delivery"];
    assert_eq!(json["matches"][0]["status"], "delivered", "{json}");
    assert_eq!(delivery["attempts"], 5, "4 before, 1 in the replay: {json}");
    assert_eq!(delivery["response_status"], 201, "{json}");
    assert!(
        delivery["last_error"]
            .as_str()
            .unwrap()
            .contains("HTTP 503"),
        "{json}"
    );
    assert_eq!(delivery["response_body"], r#"{"applied":"e-40"}"#, "{json}");
    assert_eq!(
        statuses(&pool, &t.schema).await,
        HashMap::from([("PROCESSED".to_string(), n as i64)])
    );
    drop_schema(&pool, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_application_down_for_a_minute_loses_nothing_and_delivery_resumes() {
    let kafka = Cluster::shared();
    let pool = pg().await;
    let app = HttpApp::start().await;
    let t = names("http_down");
    kafka.create_topic(&t.input, 2).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .http_sink(&app.url())
        .set("KDEDUP_HTTP_MAX_ATTEMPTS", "200");
    let s = Sidecar::start(&cfg, "http_down");
    s.wait_ready(Duration::from_secs(60)).await;
    let n = 600u64;
    let (msgs, _) = events_with_duplicates(n);
    let msgs: Vec<In> = msgs
        .into_iter()
        .map(|mut m| {
            m.partition = m.partition.map(|p| p % 2);
            m
        })
        .collect();
    let (first, rest) = msgs.split_at(msgs.len() / 3);
    kafka.produce(&t.input, first).await;
    wait_until(Duration::from_secs(60), "some delivered", || {
        app.applied_count() > 0
    })
    .await;
    // First it hangs (requests time out), then it is gone (connections refused).
    app.set_mode(Mode::Hang);
    kafka.produce(&t.input, rest).await;
    wait_until(Duration::from_secs(30), "requests time out", || {
        s.metric("kdedup_http_requests_total{class=\"timeout\"}") >= 2.0
    })
    .await;
    app.go_down().await;
    app.set_mode(Mode::Ok);
    let down_at = Instant::now();
    while down_at.elapsed() < Duration::from_secs(60) {
        assert_eq!(
            s.metric("kdedup_consumer_joined"),
            1.0,
            "stays in its group"
        );
        assert!(s.child_running(), "kdedup keeps running");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(s.metric("kdedup_http_requests_total{class=\"error\"}") > 0.0);
    app.come_back().await;
    wait_until(Duration::from_secs(90), "everything delivered", || {
        app.applied_count() >= n as usize
    })
    .await;
    assert_eq!(applied_ids(&app), all_ids(n));
    assert_eq!(app.applied_count(), n as usize);
    assert_eq!(s.metric("kdedup_events_dead_lettered_total"), 0.0);
    wait_until(Duration::from_secs(30), "input committed", || {
        kafka
            .committed_offsets(&t.group, &t.input, 2)
            .iter()
            .sum::<i64>()
            == msgs.len() as i64
    })
    .await;
    drop(s);
    drop_schema(&pool, &t.schema).await;
}

/// The keys of rows left `PROCESSING` (the requests of a killed process that may have
/// been sent without their outcome written).
async fn processing_keys(pool: &sqlx::PgPool, schema: &str) -> HashSet<String> {
    sqlx::query_scalar(&format!(
        "SELECT event_key::text FROM \"{schema}\".processed_events WHERE status = 'PROCESSING'"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_with_requests_in_flight_loses_nothing_and_repeats_only_those_in_flight() {
    let kafka = Cluster::shared();
    let pool = pg().await;
    let app = HttpApp::start().await;
    app.set_latency(Duration::from_millis(30));
    let t = names("http_kill");
    kafka.create_topic(&t.input, 2).await;
    let n = 2400u64;
    let (msgs, _) = events_with_duplicates(n);
    let msgs: Vec<In> = msgs
        .into_iter()
        .map(|mut m| {
            m.partition = m.partition.map(|p| p % 2);
            m
        })
        .collect();
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .http_sink(&app.url())
        .set("KDEDUP_HTTP_CONCURRENCY", "16")
        .set("KDEDUP_BATCH_SIZE", "100");
    let lives = 4;
    let share = msgs.len() / (lives + 1) + 1;
    let mut chunks = msgs.chunks(share);
    // The keys that may come twice: sent by a life that was killed before it wrote their
    // outcome.
    let mut in_flight_at_kills = HashSet::new();
    for life in 0..lives {
        kafka.produce(&t.input, chunks.next().unwrap()).await;
        let mut s = Sidecar::start(&cfg, "http_kill");
        let before = app.received().len();
        let deadline = Instant::now() + Duration::from_secs(90);
        while app.received().len() < before + 50 {
            assert!(
                Instant::now() < deadline,
                "life {life} sent nothing; log:\n{}",
                s.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.kill9();
        let received: HashSet<String> = app.received().into_iter().map(|r| r.key).collect();
        let processing = processing_keys(&pool, &t.schema).await;
        in_flight_at_kills.extend(processing.intersection(&received).cloned());
        tokio::time::sleep(Duration::from_secs(7)).await;
    }
    for rest in chunks {
        kafka.produce(&t.input, rest).await;
    }
    let s = Sidecar::start(&cfg, "http_kill");
    wait_until(Duration::from_secs(180), "every id applied", || {
        app.applied_count() >= n as usize
    })
    .await;
    wait_until(Duration::from_secs(60), "input consumed", || {
        kafka
            .committed_offsets(&t.group, &t.input, 2)
            .iter()
            .sum::<i64>()
            == msgs.len() as i64
    })
    .await;
    assert_eq!(applied_ids(&app), all_ids(n), "nothing lost");
    assert_eq!(app.applied_count(), n as usize, "each key applied once");
    assert!(
        !in_flight_at_kills.is_empty(),
        "the kills hit no request in flight: the test did not test the window"
    );
    let repeated = app.repeated_keys();
    eprintln!(
        "kill -9 x{lives}: {} keys in flight at the kills, {} sent again, {} lease takeovers in the last life",
        in_flight_at_kills.len(),
        repeated.len(),
        s.metric("kdedup_http_lease_takeovers_total")
    );
    let beyond: Vec<&String> = repeated.difference(&in_flight_at_kills).collect();
    assert!(
        beyond.is_empty(),
        "keys sent twice that were not in flight at a kill: {beyond:?}"
    );
    assert!(app.concurrent().is_empty(), "never the same key at once");
    assert_eq!(
        statuses(&pool, &t.schema).await,
        HashMap::from([("PROCESSED".to_string(), n as i64)])
    );
    drop(s);
    drop_schema(&pool, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_in_one_group_through_rebalances_never_deliver_a_key_at_the_same_time() {
    let kafka = Cluster::shared();
    let pool = pg().await;
    let app = HttpApp::start().await;
    // A slow application and few requests in flight: both replicas still have events in
    // hand when the group rebalances.
    app.set_latency(Duration::from_millis(100));
    let t = names("http_rebalance");
    kafka.create_topic(&t.input, 4).await;
    let n = 800u64;
    // Every id twice, on two partitions: copies race between replicas and lanes.
    let msgs: Vec<In> = (0..n)
        .flat_map(|i| [single((i % 4) as i32, i), single(((i + 1) % 4) as i32, i)])
        .collect();
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .http_sink(&app.url())
        .set("KDEDUP_HTTP_CONCURRENCY", "8")
        .set("KDEDUP_BATCH_SIZE", "50");
    let (first, rest) = msgs.split_at(msgs.len() / 2);
    kafka.produce(&t.input, first).await;
    let mut a = Sidecar::start(&cfg, "http_rebalance_a");
    wait_until(Duration::from_secs(60), "a delivers", || {
        app.applied_count() > 50
    })
    .await;
    let b = Sidecar::start(&cfg, "http_rebalance_b");
    wait_until(Duration::from_secs(60), "b has partitions", || {
        b.metric("kdedup_assigned_partitions") > 0.0
    })
    .await;
    assert!(
        app.applied_count() < n as usize / 2,
        "a is still busy at the rebalance"
    );
    kafka.produce(&t.input, rest).await;
    wait_until(Duration::from_secs(60), "b delivers too", || {
        b.metric("kdedup_http_requests_total") > 0.0
    })
    .await;
    // A leaves in the middle of its work: its partitions move to B.
    assert_eq!(a.sigterm(Duration::from_secs(20)), Some(0));
    wait_until(Duration::from_secs(120), "every id applied", || {
        app.applied_count() >= n as usize
    })
    .await;
    wait_until(Duration::from_secs(60), "input consumed", || {
        kafka
            .committed_offsets(&t.group, &t.input, 4)
            .iter()
            .sum::<i64>()
            == msgs.len() as i64
    })
    .await;
    assert!(
        app.concurrent().is_empty(),
        "a key delivered by both at once: {:?}",
        app.concurrent()
    );
    assert!(
        app.repeated_keys().is_empty(),
        "no crash, so no key sent twice: {:?}",
        app.repeated_keys()
    );
    assert_eq!(applied_ids(&app), all_ids(n));
    drop(b);
    drop_schema(&pool, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_requests_in_flight_writes_their_outcomes_and_exits_0() {
    let kafka = Cluster::shared();
    let pool = pg().await;
    let app = HttpApp::start().await;
    app.set_latency(Duration::from_millis(1500));
    let t = names("http_sigterm");
    kafka.create_topic(&t.input, 1).await;
    let n = 100u64;
    let msgs: Vec<In> = (0..n).map(|i| single(0, i)).collect();
    kafka.produce(&t.input, &msgs).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .http_sink(&app.url())
        .set("KDEDUP_HTTP_TIMEOUT", "3s")
        .set("KDEDUP_HTTP_LEASE", "10s")
        .set("KDEDUP_HTTP_CONCURRENCY", "4");
    let mut s = Sidecar::start(&cfg, "http_sigterm");
    wait_until(Duration::from_secs(60), "requests in flight", || {
        app.received().len() >= 4
    })
    .await;
    let sent_before_stop: HashSet<String> = app.received().into_iter().map(|r| r.key).collect();
    assert_eq!(
        s.sigterm(Duration::from_secs(20)),
        Some(0),
        "{}",
        s.log_tail()
    );
    // Every request sent got its answer and its outcome written; nothing was left
    // PROCESSING under a live lease.
    let rows: Vec<(String, String, bool)> = sqlx::query_as(&format!(
        "SELECT event_key::text, status, coalesce(lease_expires_at > now(), false)
         FROM \"{}\".processed_events",
        t.schema
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    let processed: HashSet<&String> = rows
        .iter()
        .filter(|r| r.1 == "PROCESSED")
        .map(|r| &r.0)
        .collect();
    for k in &sent_before_stop {
        assert!(processed.contains(k), "the outcome of {k} was written");
    }
    assert!(
        rows.iter().all(|r| r.1 == "PROCESSED" || !r.2),
        "a stopped delivery gave its lease up: {rows:?}"
    );
    // The next life delivers the rest at once (no lease to wait out), none twice.
    app.set_latency(Duration::ZERO);
    let started = Instant::now();
    let s = Sidecar::start(&cfg, "http_sigterm");
    wait_until(Duration::from_secs(60), "the rest delivered", || {
        app.applied_count() >= n as usize
    })
    .await;
    assert!(app.repeated_keys().is_empty(), "{:?}", app.repeated_keys());
    assert_eq!(applied_ids(&app), all_ids(n));
    assert!(started.elapsed() < Duration::from_secs(40));
    drop(s);
    drop_schema(&pool, &t.schema).await;
}

#[test]
fn http_sink_settings_that_cannot_work_exit_64_naming_the_fix() {
    let base = SidecarConfig::new("g", "orders", "unused", "kdedup_http_cfg")
        .set("KDEDUP_BROKERS", "127.0.0.1:1")
        .set("KDEDUP_DATABASE_URL", "postgres://kd:pw@127.0.0.1:1/app")
        .unset("KDEDUP_OUTPUT_TOPIC")
        .set("KDEDUP_SINK", "http");
    let url = "http://127.0.0.1:8080/events";
    let cases: Vec<(SidecarConfig, &str, &str)> = vec![
        (base.clone(), "KDEDUP_HTTP_URL", "is required"),
        (
            base.clone()
                .set("KDEDUP_HTTP_URL", url)
                .set("KDEDUP_OUTPUT_TOPIC", "orders.out"),
            "KDEDUP_OUTPUT_TOPIC",
            "unset it",
        ),
        (
            base.clone()
                .set("KDEDUP_HTTP_URL", "https://app:8443/events"),
            "KDEDUP_HTTP_URL",
            "over http://",
        ),
        (
            base.clone().set(
                "KDEDUP_HTTP_URL",
                "http://user:hunter2@127.0.0.1:8080/events",
            ),
            "KDEDUP_HTTP_URL",
            "remove user:password@",
        ),
        (
            base.clone()
                .set("KDEDUP_HTTP_URL", url)
                .set("KDEDUP_HTTP_TIMEOUT", "30s"),
            "KDEDUP_HTTP_TIMEOUT",
            "--shutdown-timeout",
        ),
        (
            base.clone()
                .set("KDEDUP_HTTP_URL", url)
                .set("KDEDUP_HTTP_LEASE", "2s"),
            "KDEDUP_HTTP_LEASE",
            "raise --http-lease",
        ),
        (
            base.clone()
                .set("KDEDUP_HTTP_URL", url)
                .set("KDEDUP_HTTP_CONCURRENCY", "0"),
            "KDEDUP_HTTP_CONCURRENCY",
            "choose between 1 and 4096",
        ),
        (
            base.clone()
                .set("KDEDUP_SINK", "kafka")
                .set("KDEDUP_OUTPUT_TOPIC", "orders.out")
                .set("KDEDUP_HTTP_URL", url),
            "KDEDUP_HTTP_URL",
            "set --sink http",
        ),
    ];
    for (cfg, setting, fix) in cases {
        let out = capture(&mut kdedup(&cfg, &["run"]));
        let text = out.text();
        assert_eq!(out.code, Some(64), "{setting}: {text}");
        assert!(text.contains(setting), "{setting} named: {text}");
        assert!(text.contains(fix), "{setting}: fix {fix:?} in {text}");
        assert!(
            !text.contains("hunter2"),
            "no password in the output: {text}"
        );
    }
}

/// A replica died holding an event (its row `PROCESSING`, its lease running). The copy
/// kdedup reads waits for that lease, is taken over, and is delivered before the later
/// events of its key, in its batch and in the next; another key does not wait.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_taken_over_from_a_dead_replica_keeps_its_keys_order() {
    use kdedup::store::gate::{self, GateBatch, GateRow, GateStatement};
    use sha2::Digest;

    let kafka = Cluster::shared();
    let pool = pg().await;
    let app = HttpApp::start().await;
    let t = names("http_held");
    kafka.create_topic(&t.input, 1).await;
    let event = |id: &str, key: &str, seq: u64| In {
        partition: Some(0),
        key: Some(key.as_bytes().to_vec()),
        value: Some(format!(r#"{{"id":"{id}","k":"{key}","seq":{seq}}}"#).into_bytes()),
        headers: vec![("event-id".into(), id.as_bytes().to_vec())],
    };
    // Batches of 2: [e-1 e-2] [e-3 e-4] [e-5]. e-1 is held by the dead replica.
    let msgs = vec![
        event("e-1", "k", 1),
        event("e-2", "k", 2),
        event("e-3", "other", 3),
        event("e-4", "k", 4),
        event("e-5", "k", 5),
    ];

    // The dead replica's row for e-1, as its gate left it: PROCESSING, leased for the
    // same --http-lease as the sidecar's (4 s).
    let db = kdedup::settings::DbSettings {
        url: kdedup::settings::DatabaseUrl::new(database_url()),
        schema: t.schema.clone(),
        max_connections: 1,
    };
    let gate_pool = kdedup::store::pool(&db).unwrap();
    kdedup::store::migrate(&gate_pool, &t.schema).await.unwrap();
    let value = msgs[0].value.clone().unwrap();
    let mut batch = GateBatch::with_capacity(1);
    batch.push(GateRow {
        scope: "orders".into(),
        event_id: "e-1".into(),
        topic: t.input.clone(),
        partition: 0,
        offset: 0,
        timestamp_ms: None,
        payload_hash: sha2::Sha256::digest(&value)[..16].to_vec(),
        key: Some(b"k".to_vec()),
        value: Some(value),
        headers: vec![],
    });
    let lease = Duration::from_secs(4);
    let statement = GateStatement::leased("dead-host/1/00000000".into(), lease);
    gate::gate(
        &gate_pool,
        &statement,
        batch.part(0..1, true),
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    let expires = Instant::now() + lease;

    kafka.produce(&t.input, &msgs).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .http_sink(&app.url())
        .set("KDEDUP_SCOPE", "orders")
        .set("KDEDUP_HTTP_LEASE", "4s")
        .set("KDEDUP_BATCH_SIZE", "2");
    let s = Sidecar::start(&cfg, "http_held");
    wait_until(Duration::from_secs(60), "every event delivered", || {
        s.metric("kdedup_events_forwarded_total") >= 5.0
    })
    .await;

    let received = app.received();
    let order: Vec<&str> = received.iter().map(|r| r.event_id.as_str()).collect();
    let at = |id: &str| received.iter().find(|r| r.event_id == id).unwrap().at;
    assert_eq!(received.len(), 5, "each event once: {order:?}");
    let k: Vec<&str> = order.iter().copied().filter(|&id| id != "e-3").collect();
    assert_eq!(
        k,
        ["e-1", "e-2", "e-4", "e-5"],
        "key k in input order, the copy taken over first"
    );
    assert!(
        at("e-1") >= expires - Duration::from_millis(500),
        "e-1 waited for the dead replica's lease"
    );
    assert!(at("e-3") < at("e-1"), "another key did not wait: {order:?}");
    assert_eq!(s.metric("kdedup_http_lease_takeovers_total"), 1.0);
    assert_eq!(app.applied_count(), 5);
    assert_eq!(
        statuses(&pool, &t.schema).await,
        HashMap::from([("PROCESSED".to_string(), 5)])
    );
    drop(s);
    drop_schema(&pool, &t.schema).await;
}

/// The status gate's statements against Postgres alone: who takes a row, when a copy is
/// busy, a duplicate, or taken over, and which outcomes a lost lease can still write.
#[tokio::test(flavor = "multi_thread")]
async fn the_status_gate_takes_over_failed_rows_and_expired_leases_and_waits_on_live_ones() {
    use kdedup::store::delivery::{self, Final};
    use kdedup::store::gate::{self, event_key, GateBatch, GateOutcome, GateRow, GateStatement};

    let pool_for_checks = pg().await;
    let schema = unique("http_gate").to_lowercase();
    let db = kdedup::settings::DbSettings {
        url: kdedup::settings::DatabaseUrl::new(database_url()),
        schema: schema.clone(),
        max_connections: 2,
    };
    let pool = kdedup::store::pool(&db).unwrap();
    kdedup::store::migrate(&pool, &schema).await.unwrap();
    let ttl = Duration::from_secs(3600);
    let row = |id: &str| GateRow {
        scope: "orders".into(),
        event_id: id.into(),
        topic: "in".into(),
        partition: 0,
        offset: 1,
        timestamp_ms: None,
        payload_hash: vec![1; 16],
        key: None,
        value: Some(b"{}".to_vec()),
        headers: vec![],
    };
    let leased = |owner: &str, lease_ms: u64| {
        GateStatement::leased(owner.to_string(), Duration::from_millis(lease_ms))
    };
    let gate = |statement: GateStatement, id: &'static str| {
        let pool = pool.clone();
        async move {
            let mut batch = GateBatch::with_capacity(1);
            batch.push(row(id));
            let commit = gate::gate(&pool, &statement, batch.part(0..1, true), ttl)
                .await
                .unwrap();
            (commit.outcomes[0].clone(), commit.taken_over)
        }
    };
    let finished = |id: &str, processed: bool| Final {
        event_key: event_key("orders", id),
        processed,
        attempts: 1,
        response_status: Some(if processed { 200 } else { 400 }),
        response_headers: processed.then(|| "{}".to_string()),
        response_body: processed.then(Vec::new),
        last_error: (!processed).then(|| "HTTP 400: no".to_string()),
    };

    // First touch: PROCESSING, leased to a; a copy meets the live lease: busy.
    assert_eq!(
        gate(leased("a", 60_000), "x").await,
        (GateOutcome::Forwarded, 0)
    );
    assert_eq!(gate(leased("b", 60_000), "x").await, (GateOutcome::Busy, 0));
    // FAILED is taken over (it is not a lease takeover).
    let written = delivery::finish(&pool, "a", &[finished("x", false)])
        .await
        .unwrap();
    assert_eq!(written, vec![event_key("orders", "x")]);
    assert_eq!(
        gate(leased("b", 60_000), "x").await,
        (GateOutcome::Forwarded, 0)
    );
    // An expired lease is taken over; the old owner can no longer write its outcome.
    assert_eq!(gate(leased("a", 1), "y").await, (GateOutcome::Forwarded, 0));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        gate(leased("b", 60_000), "y").await,
        (GateOutcome::Forwarded, 1)
    );
    assert!(delivery::finish(&pool, "a", &[finished("y", true)])
        .await
        .unwrap()
        .is_empty());
    assert!(
        delivery::renew(&pool, "a", &[event_key("orders", "y")], ttl)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        delivery::finish(&pool, "b", &[finished("y", true)])
            .await
            .unwrap(),
        vec![event_key("orders", "y")]
    );
    // Only PROCESSED suppresses.
    assert!(matches!(
        gate(leased("c", 60_000), "y").await.0,
        GateOutcome::Duplicate { .. }
    ));
    // A released lease is taken over at once.
    assert_eq!(
        delivery::renew(&pool, "b", &[event_key("orders", "x")], ttl)
            .await
            .unwrap(),
        vec![event_key("orders", "x")]
    );
    assert_eq!(
        delivery::release(&pool, "b", &[(event_key("orders", "x"), 2, None)])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        gate(leased("c", 60_000), "x").await,
        (GateOutcome::Forwarded, 1)
    );
    // The Kafka sink's statement sees a status-gated row as recorded, as before.
    assert!(matches!(
        gate(GateStatement::new(None), "x").await.0,
        GateOutcome::Duplicate { .. }
    ));
    let (status, attempts, last_error): (String, i32, Option<String>) = sqlx::query_as(&format!(
        "SELECT status, attempts, last_error FROM \"{schema}\".processed_events WHERE event_id = 'x'"
    ))
    .fetch_one(&pool_for_checks)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), attempts, last_error.as_deref()),
        ("PROCESSING", 3, Some("HTTP 400: no")),
        "attempts add up over owners; the last error stays"
    );
    assert_eq!(
        gate_totals(&pool_for_checks, &schema).await,
        (5, 2),
        "busy copies are not duplicates: 5 first touches or takeovers, 2 duplicates"
    );
    pool.close().await;
    drop_schema(&pool_for_checks, &schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_verifies_what_its_receiver_applied() {
    let pool = pg().await;
    let schema = unique("kdedup_demo_http").to_lowercase();
    let cfg = SidecarConfig::new("unused", "unused", "unused", &schema);
    let out = capture(&mut kdedup(
        &cfg,
        &[
            "demo",
            "--sink",
            "http",
            "--events",
            "3000",
            "--db-schema",
            &schema,
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    ));
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert!(
        out.stdout
            .contains("3000 requests, 3000 distinct ids, 0 repeats"),
        "{}",
        out.stdout
    );
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
    let processed: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{schema}\".processed_events WHERE status = 'PROCESSED'"
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(processed, 3000);
    drop_schema(&pool, &schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cloudevents_arrive_in_http_binary_mode_from_either_kafka_mode() {
    let kafka = Cluster::shared();
    let pool = pg().await;
    let app = HttpApp::start().await;
    let t = names("http_ce");
    kafka.create_topic(&t.input, 1).await;
    let binary = In {
        partition: Some(0),
        key: None,
        value: Some(br#"{"amount":1}"#.to_vec()),
        headers: vec![
            ("ce_specversion".into(), b"1.0".to_vec()),
            ("ce_id".into(), b"b-1".to_vec()),
            ("ce_source".into(), b"/orders".to_vec()),
            ("ce_type".into(), b"order.created".to_vec()),
            ("content-type".into(), b"application/json".to_vec()),
        ],
    };
    let structured = In {
        partition: Some(0),
        key: None,
        value: Some(
            br#"{"specversion":"1.0","id":"s-1","source":"/orders","type":"order.paid","datacontenttype":"application/json","data":{"amount":2}}"#
                .to_vec(),
        ),
        headers: vec![("content-type".into(), b"application/cloudevents+json".to_vec())],
    };
    kafka.produce(&t.input, &[binary, structured]).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .http_sink(&app.url())
        .set("KDEDUP_ID_FROM", "cloudevents");
    let s = Sidecar::start(&cfg, "http_ce");
    wait_until(Duration::from_secs(60), "both delivered", || {
        app.applied_count() == 2
    })
    .await;
    let received = app.received();
    for (r, id, typ, body) in [
        (&received[0], "b-1", "order.created", r#"{"amount":1}"#),
        (&received[1], "s-1", "order.paid", r#"{"amount":2}"#),
    ] {
        assert_eq!(r.headers["ce-id"], id);
        assert_eq!(r.headers["ce-source"], "/orders");
        assert_eq!(r.headers["ce-specversion"], "1.0");
        assert_eq!(r.headers["ce-type"], typ);
        assert_eq!(r.content_type, "application/json");
        assert_eq!(
            String::from_utf8_lossy(&r.body),
            body,
            "the data is the body"
        );
    }
    drop(s);
    drop_schema(&pool, &t.schema).await;
}
