//! `kdedup replay` against the real broker and Postgres: the same gate, so a replay
//! forwards only what was never forwarded.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::helpers::*;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use sqlx::Connection;

/// The event ids of output messages, in the order read.
fn output_ids(output: &[Out]) -> Vec<String> {
    output
        .iter()
        .map(|m| {
            m.header("kdedup-event-id")
                .expect("every output message names its event id")
                .to_string()
        })
        .collect()
}

/// Asserts that `output` holds each of `expected` exactly once, and nothing else.
fn assert_exactly_once(output: &[Out], expected: &BTreeSet<String>) {
    let ids = output_ids(output);
    let distinct: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(
        ids.len(),
        distinct.len(),
        "an event reached the output twice"
    );
    let missing: Vec<_> = expected.difference(&distinct).collect();
    let unexpected: Vec<_> = distinct.difference(expected).collect();
    assert!(
        missing.is_empty() && unexpected.is_empty(),
        "missing from the output: {missing:?}; not expected there: {unexpected:?}"
    );
}

fn id_set(prefix: &str, n: usize) -> BTreeSet<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Event ids recorded in the schema's gate table (none when the table does not exist).
async fn gated(schema: &str) -> BTreeSet<String> {
    let pool = pg().await;
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(format!("\"{schema}\".processed_events"))
        .fetch_one(&pool)
        .await
        .expect("to_regclass");
    if exists.is_none() {
        return BTreeSet::new();
    }
    sqlx::query_scalar(&format!(
        "SELECT event_id FROM \"{schema}\".processed_events"
    ))
    .fetch_all(&pool)
    .await
    .expect("read processed_events")
    .into_iter()
    .collect()
}

fn dlq_headers(input: &str, offset: i64, timestamp_ms: i64) -> Vec<(String, Vec<u8>)> {
    vec![
        ("kdedup-dlq-reason".into(), b"missing_id".to_vec()),
        ("kdedup-source-topic".into(), input.as_bytes().to_vec()),
        ("kdedup-source-partition".into(), b"0".to_vec()),
        (
            "kdedup-source-offset".into(),
            offset.to_string().into_bytes(),
        ),
        (
            "kdedup-source-timestamp".into(),
            timestamp_ms.to_string().into_bytes(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn replaying_the_whole_input_again_forwards_nothing() {
    let kafka = Cluster::shared();
    let t = names("replay_all");
    kafka.create_topic(&t.input, 2).await;
    let msgs: Vec<In> = (0..400)
        .map(|i| In::event(i % 2, &format!("r-{i}"), i as u64))
        .collect();
    kafka.produce(&t.input, &msgs).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema);
    let s = Sidecar::start(&cfg, "replay_all");
    wait_until(Duration::from_secs(60), "forwarded", || {
        s.metric("kdedup_events_forwarded_total") >= 400.0
    })
    .await;

    let (code, dry, err) = kdedup_command(&cfg, &["replay", "--from-topic", &t.input, "--dry-run"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(summary_value(&dry, "would be forwarded"), 0, "{dry}");

    // A partition ends once idle for --idle-timeout: on a loaded machine the test broker
    // can pause longer than the 3 s default between two fetches of one partition.
    let (code, out, err) = kdedup_command(
        &cfg,
        &["replay", "--from-topic", &t.input, "--idle-timeout", "20s"],
    );
    assert_eq!(code, Some(0), "{err}");
    // The replay's own log (stderr) goes with a short read: it says what the reader saw.
    assert_eq!(summary_value(&out, "read"), 400, "{out}\n{err}");
    assert_eq!(summary_value(&out, "forwarded"), 0, "{out}");
    assert_eq!(summary_value(&out, "duplicates"), 400, "{out}");
    let output = kafka.read_topic(&t.output, 400, Duration::from_secs(20));
    assert_exactly_once(&output, &id_set("r", 400));
    drop(s);
    drop_schema(&pg().await, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replaying_the_dlq_after_a_fix_forwards_exactly_the_dead_lettered_events_once() {
    let kafka = Cluster::shared();
    let t = names("replay_dlq");
    kafka.create_topic(&t.input, 1).await;
    // 30 events carry their id only in the JSON body, which the first configuration does
    // not read: they are dead-lettered.
    let mut msgs = Vec::new();
    for i in 0..100u64 {
        let mut m = In::event(0, &format!("d-{i}"), i);
        if i % 10 < 3 {
            m.headers.clear();
        }
        msgs.push(m);
    }
    kafka.produce(&t.input, &msgs).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema);
    let s = Sidecar::start(&cfg, "replay_dlq");
    wait_until(Duration::from_secs(60), "settled", || {
        s.metric("kdedup_events_forwarded_total") >= 70.0
            && s.metric("kdedup_events_dead_lettered_total") >= 30.0
    })
    .await;

    // The fix: also read the id from the body. Replay the DLQ through the gate.
    let fixed = cfg
        .clone()
        .set("KDEDUP_ID_FROM", "header:event-id,json:/id");
    let (code, dry, err) = kdedup_command(&fixed, &["replay", "--dry-run"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(summary_value(&dry, "would be forwarded"), 30, "{dry}");
    let (code, out, err) = kdedup_command(&fixed, &["replay"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(summary_value(&out, "forwarded"), 30, "{out}");
    // Again: all of it is now a duplicate.
    let (code, again, err) = kdedup_command(&fixed, &["replay"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(summary_value(&again, "forwarded"), 0, "{again}");
    assert_eq!(summary_value(&again, "duplicates"), 30, "{again}");

    let output = kafka.read_topic(&t.output, 100, Duration::from_secs(20));
    assert_exactly_once(&output, &id_set("d", 100));
    let replayed = output
        .iter()
        .find(|m| m.header("kdedup-event-id") == Some("d-0"))
        .unwrap();
    assert_eq!(
        replayed.header("kdedup-source"),
        Some(format!("{}/0/0", t.input).as_str()),
        "a replayed DLQ event points at its original position"
    );
    assert!(
        replayed.header("kdedup-dlq-reason").is_none(),
        "DLQ headers do not travel on"
    );
    drop(s);
    drop_schema(&pg().await, &t.schema).await;
}

/// A dead-lettered event from 1970 (its original timestamp travels in the DLQ headers).
fn event_from_1970(input: &str, id: &str, source_offset: i64) -> In {
    let mut old = In::event(0, id, 0);
    old.headers.extend(dlq_headers(input, source_offset, 1000));
    old
}

#[tokio::test(flavor = "multi_thread")]
async fn events_older_than_the_ttl_are_refused_without_force() {
    let kafka = Cluster::shared();
    let t = names("replay_old");
    kafka.create_topic(&t.input, 1).await;
    kafka.create_topic(&t.output, 1).await;
    kafka
        .produce(&t.input, &[event_from_1970(&t.input, "old-0", 99)])
        .await;
    kafka.produce(&t.input, &[In::event(0, "new-1", 1)]).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema).set("KDEDUP_TTL", "1h");

    let (code, out, err) = kdedup_command(&cfg, &["replay", "--from-topic", &t.input]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("older than the TTL")
            && err.contains("--force")
            && err.contains("Nothing was written")
            && err.contains(&format!("{}/0/99", t.input)),
        "{err}"
    );
    // A dry run with --force, on a schema nothing was ever written to.
    let (code, dry, err) = kdedup_command(
        &cfg,
        &["replay", "--from-topic", &t.input, "--force", "--dry-run"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(summary_value(&dry, "would be forwarded"), 2, "{dry}");
    assert!(
        kafka
            .read_topic(&t.output, 0, Duration::from_secs(3))
            .is_empty(),
        "a refused replay forwards nothing"
    );
    assert!(
        gated(&t.schema).await.is_empty(),
        "a refused replay records nothing"
    );

    let (code, out, err) = kdedup_command(&cfg, &["replay", "--from-topic", &t.input, "--force"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(summary_value(&out, "forwarded"), 2, "{out}");
    let output = kafka.read_topic(&t.output, 2, Duration::from_secs(20));
    assert_exactly_once(&output, &["old-0", "new-1"].map(String::from).into());
    drop_schema(&pg().await, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_old_event_late_in_the_range_is_refused_before_earlier_ones_are_written() {
    let kafka = Cluster::shared();
    let t = names("replay_old_late");
    kafka.create_topic(&t.input, 1).await;
    kafka.create_topic(&t.output, 1).await;
    let mut msgs: Vec<In> = (0..5)
        .map(|i| In::event(0, &format!("new-{i}"), i))
        .collect();
    msgs.push(event_from_1970(&t.input, "old-5", 5));
    kafka.produce(&t.input, &msgs).await;
    // One event per gate transaction: a check made batch by batch would have forwarded
    // the five new events before meeting the old one.
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .set("KDEDUP_TTL", "1h")
        .set("KDEDUP_BATCH_SIZE", "1");

    let (code, out, err) = kdedup_command(&cfg, &["replay", "--from-topic", &t.input]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("older than the TTL") && err.contains("--force"),
        "{err}"
    );
    assert!(
        kafka
            .read_topic(&t.output, 0, Duration::from_secs(3))
            .is_empty(),
        "a refused replay forwards nothing"
    );
    assert!(
        gated(&t.schema).await.is_empty(),
        "a refused replay records nothing"
    );
    drop_schema(&pg().await, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stripped_dlq_record_is_skipped_and_reported_with_its_source_position() {
    let kafka = Cluster::shared();
    let t = names("replay_stripped");
    kafka.create_topic(&t.input, 1).await;
    kafka.create_topic(&t.dlq, 1).await;
    let now = chrono::Utc::now().timestamp_millis();
    // A whole dead letter: the original value and headers, plus the DLQ headers.
    let mut whole = In::event(0, "w-1", 1);
    whole.headers.extend(dlq_headers(&t.input, 3, now));
    // A stripped one: the DLQ topic refused it whole, so it was sent with its key and the
    // DLQ headers only. Its key would yield an id, but the real event is not in it.
    let mut stripped = In {
        partition: Some(0),
        key: Some(b"k-s-1".to_vec()),
        value: None,
        headers: dlq_headers(&t.input, 7, now),
    };
    stripped
        .headers
        .push(("kdedup-dlq-stripped".into(), b"true".to_vec()));
    kafka.produce(&t.dlq, &[whole, stripped]).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .set("KDEDUP_ID_FROM", "header:event-id,key");
    let source = format!("{}/0/7", t.input);

    let (code, out, err) = kdedup_command(&cfg, &["replay"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(summary_value(&out, "read"), 2, "{out}");
    assert_eq!(summary_value(&out, "forwarded"), 1, "{out}");
    assert_eq!(
        summary_value(&out, "skipped: stripped in the DLQ"),
        1,
        "{out}"
    );
    assert!(
        out.contains(&format!("re-read it from its source position {source}")),
        "{out}"
    );
    assert!(
        err.contains("stripped in the DLQ") && err.contains(&source),
        "a warning names the source position: {err}"
    );

    // A dry run now: nothing left to forward, and the stripped record is still reported.
    let (code, dry, err) = kdedup_command(&cfg, &["replay", "--dry-run"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(summary_value(&dry, "would be forwarded"), 0, "{dry}");
    assert_eq!(
        summary_value(&dry, "skipped: stripped in the DLQ"),
        1,
        "{dry}"
    );

    let output = kafka.read_topic(&t.output, 1, Duration::from_secs(20));
    assert_exactly_once(&output, &["w-1".to_string()].into());
    assert_eq!(
        output[0].json()["id"],
        "w-1",
        "the real event, with its value"
    );
    assert_eq!(
        gated(&t.schema).await,
        ["w-1".to_string()].into(),
        "the stripped record's id is not recorded"
    );
    assert_eq!(
        kafka.read_topic(&t.dlq, 2, Duration::from_secs(10)).len(),
        2,
        "replay writes nothing to the DLQ"
    );
    drop_schema(&pg().await, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_without_an_end_stops_at_the_end_listed_at_start_while_the_topic_grows() {
    let kafka = Cluster::shared();
    let t = names("replay_live");
    kafka.create_topic(&t.input, 1).await;
    kafka
        .produce(
            &t.input,
            &(0..50)
                .map(|i| In::event(0, &format!("pre-{i}"), i))
                .collect::<Vec<_>>(),
        )
        .await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema);
    let mut replay = kdedup_spawn(
        &cfg,
        &["replay", "--from-topic", &t.input],
        &[("KDEDUP_LOG", "warn,kdedup::replay=info")],
    );
    wait_until(Duration::from_secs(30), "the replay range listed", || {
        replay.stderr().contains("replay range listed")
    })
    .await;

    // The topic keeps growing until the replay exits.
    let producer = kafka.producer();
    let mut live = 0u64;
    let deadline = Instant::now() + Duration::from_secs(90);
    while replay.running() {
        assert!(
            Instant::now() < deadline,
            "replay did not stop while the topic kept growing; stderr:\n{}",
            replay.stderr()
        );
        let id = format!("live-{live}");
        let hs = OwnedHeaders::new().insert(Header {
            key: "event-id",
            value: Some(id.as_bytes()),
        });
        let value = format!(r#"{{"id":"{id}"}}"#);
        producer
            .send(
                FutureRecord::<str, str>::to(&t.input)
                    .partition(0)
                    .payload(&value)
                    .headers(hs),
                Duration::from_secs(10),
            )
            .await
            .expect("live produce acknowledged");
        live += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, out, err) = replay.finish(Duration::from_secs(5)).await.parts();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(live > 0, "the topic grew while the replay ran");
    assert_eq!(summary_value(&out, "read"), 50, "{out}");
    assert_eq!(summary_value(&out, "forwarded"), 50, "{out}");
    let output = kafka.read_topic(&t.output, 50, Duration::from_secs(20));
    assert_exactly_once(&output, &id_set("pre", 50));
    drop_schema(&pg().await, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_serves_its_duplicate_counts_on_metrics_while_it_runs() {
    let kafka = Cluster::shared();
    let t = names("replay_metrics");
    kafka.create_topic(&t.input, 1).await;
    kafka
        .produce(
            &t.input,
            &(0..5)
                .map(|i| In::event(0, &format!("m-{i}"), i))
                .collect::<Vec<_>>(),
        )
        .await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema);
    // A first replay forwards the five events (no sidecar needed).
    let (code, out, err) = kdedup_command(&cfg, &["replay", "--from-topic", &t.input]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(summary_value(&out, "forwarded"), 5, "{out}");
    kafka
        .produce(
            &t.input,
            &(5..8)
                .map(|i| In::event(0, &format!("m-{i}"), i))
                .collect::<Vec<_>>(),
        )
        .await;

    // Hold the lock of the replay's outbox stream, so the replay waits for its rows to be
    // published and can be scraped at that point.
    let mut lock = sqlx::PgConnection::connect(&database_url())
        .await
        .expect("connect");
    sqlx::query("SELECT pg_advisory_lock($1, hashtext($2 || ':stream:' || $3))")
        .bind(kdedup::store::ADVISORY_LOCK_CLASS)
        .bind(&t.schema)
        .bind(format!("replay:{}/0", t.input))
        .execute(&mut lock)
        .await
        .expect("take the stream lock");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut replay = kdedup_spawn(
        &cfg,
        &[
            "replay",
            "--from-topic",
            &t.input,
            "--serve-metrics",
            "--publish-timeout",
            "120s",
        ],
        &[("KDEDUP_METRICS_ADDR", addr.as_str())],
    );
    let scrape = || {
        http_get(port, "/metrics")
            .map(|(_, t)| t)
            .unwrap_or_default()
    };
    wait_until(Duration::from_secs(60), "replay counts on /metrics", || {
        let text = scrape();
        metric_value(&text, "kdedup_duplicates_total{cause=\"replay\"}") == 5.0
            && metric_value(&text, "kdedup_events_gated_total") == 3.0
    })
    .await;
    assert!(replay.running(), "scraped while the replay runs");
    lock.close().await.expect("release the stream lock");

    let (code, out, err) = replay.finish(Duration::from_secs(60)).await.parts();
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(summary_value(&out, "read"), 8, "{out}");
    assert_eq!(summary_value(&out, "forwarded"), 3, "{out}");
    assert_eq!(summary_value(&out, "duplicates (cause=replay)"), 5, "{out}");
    let output = kafka.read_topic(&t.output, 8, Duration::from_secs(20));
    assert_exactly_once(&output, &id_set("m", 8));
    drop_schema(&pg().await, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_counts_what_the_real_run_does_mismatches_included() {
    let kafka = Cluster::shared();
    let t = names("replay_dry");
    kafka.create_topic(&t.input, 1).await;
    let msgs: Vec<In> = (0..50)
        .map(|i| In::event(0, &format!("m-{i}"), i))
        .collect();
    kafka.produce(&t.input, &msgs).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema);
    let s = Sidecar::start(&cfg, "replay_dry");
    wait_until(Duration::from_secs(60), "forwarded", || {
        s.metric("kdedup_events_forwarded_total") >= 50.0
    })
    .await;
    drop(s);

    // A backfill topic: 20 of the ids again as they were, 10 of them with another payload
    // (a producer reusing ids), 10 new ids, and one new id twice with two payloads.
    let backfill = format!("{}.backfill", t.input);
    kafka.create_topic(&backfill, 1).await;
    let mut again: Vec<In> = (0..20)
        .map(|i| In::event(0, &format!("m-{i}"), i))
        .collect();
    again.extend((20..30).map(|i| In::event(0, &format!("m-{i}"), 1000 + i)));
    again.extend((100..110).map(|i| In::event(0, &format!("m-{i}"), i)));
    again.push(In::event(0, "m-200", 1));
    again.push(In::event(0, "m-200", 2));
    kafka.produce(&backfill, &again).await;

    let (code, dry, err) =
        kdedup_command(&cfg, &["replay", "--from-topic", &backfill, "--dry-run"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, real, err) = kdedup_command(&cfg, &["replay", "--from-topic", &backfill]);
    assert_eq!(code, Some(0), "{err}");
    for (label, want) in [("duplicates", 20), ("same id, different payload", 11)] {
        assert_eq!(summary_value(&dry, label), want, "dry run, {label}:\n{dry}");
        assert_eq!(
            summary_value(&real, label),
            want,
            "real run, {label}:\n{real}"
        );
    }
    assert_eq!(summary_value(&dry, "would be forwarded"), 11, "{dry}");
    assert_eq!(summary_value(&real, "forwarded"), 11, "{real}");
    drop_schema(&pg().await, &t.schema).await;
}

/// How the input of [`replay_through_a_slow_broker`] is produced.
enum Batches {
    /// One record batch per partition.
    OnePerPartition,
    /// One record batch per message.
    OnePerMessage,
}

/// `n` events (`<name>-<i>`, on two partitions) on the input of librdkafka's mock cluster,
/// which then answers every request 1.5 s late; a replay of them with a 1 s
/// `--idle-timeout` and the `extra` settings reads and forwards every one, once each.
/// Returns the replay's log.
async fn replay_through_a_slow_broker(
    name: &str,
    n: usize,
    batches: Batches,
    extra: &[(&str, &str)],
) -> String {
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    let t = names(&format!("replay_{name}"));
    for topic in [&t.input, &t.output, &t.dlq] {
        mock.create_topic(topic, 2, 1).unwrap();
    }
    let kafka = Cluster {
        brokers: mock.bootstrap_servers(),
    };
    let events: Vec<In> = (0..n)
        .map(|i| In::event(i as i32 % 2, &format!("{name}-{i}"), i as u64))
        .collect();
    let producer = match batches {
        Batches::OnePerPartition => {
            kafka.producer_with(&[("linger.ms", "200"), ("batch.num.messages", "100")])
        }
        Batches::OnePerMessage => kafka.producer(),
    };
    let sent: Vec<_> = events
        .iter()
        .map(|m| send_waiting(&producer, record(&t.input, m)))
        .collect();
    for d in sent {
        d.await.expect("delivery").expect("produce acknowledged");
    }
    mock.broker_round_trip_time(1, Duration::from_millis(1500))
        .unwrap();
    let mut cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .set("KDEDUP_BROKERS", &kafka.brokers)
        .set("KDEDUP_CREATE_TOPICS", "false");
    for (k, v) in extra {
        cfg = cfg.set(k, v);
    }

    let (code, out, err) = kdedup_command(
        &cfg,
        &["replay", "--from-topic", &t.input, "--idle-timeout", "1s"],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(summary_value(&out, "read"), n, "{out}\n{err}");
    assert_eq!(summary_value(&out, "forwarded"), n, "{out}");
    mock.broker_round_trip_time(1, Duration::ZERO).unwrap();
    let output = kafka.read_topic(&t.output, n, Duration::from_secs(20));
    assert_exactly_once(&output, &id_set(name, n));
    drop_schema(&pg().await, &t.schema).await;
    err
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_slower_than_the_idle_timeout_does_not_end_a_replay_before_its_first_message() {
    // The first fetch after the assignment comes back later than the 1 s --idle-timeout.
    // One record batch per partition, so that the first fetch brings all of it: this is
    // about the wait for the first message, not about a pause between two fetches.
    replay_through_a_slow_broker("slow", 10, Batches::OnePerPartition, &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_pausing_between_fetches_does_not_end_a_partition_short_of_its_end() {
    // The replay's consumer takes one record batch (here: one message) per partition per
    // fetch, so each partition falls silent for 1.5 s between two of its messages, longer
    // than the 1 s --idle-timeout, while the end listed at start says more are there.
    let log = replay_through_a_slow_broker(
        "pause",
        8,
        Batches::OnePerMessage,
        &[("KDEDUP_KAFKA_MAX_PARTITION_FETCH_BYTES", "1")],
    )
    .await;
    assert!(!log.contains("this partition stops here"), "{log}");
}
