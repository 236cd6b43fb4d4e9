//! The topics kdedup writes to, at start, on a broker that does not serve CreateTopics
//! (librdkafka's mock cluster, like some Kafka-compatible brokers and proxies, never
//! answers it): with the default `KDEDUP_CREATE_TOPICS=true`, topics made beforehand are
//! used as they are, and a missing one ends the start with the fix; with it off, missing
//! topics are reported and waited for, and no look-up creates them.

use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;

use crate::helpers::*;

/// Events a, b and a again, on two partitions.
async fn produce_a_b_a(cluster: &Cluster, input: &str) {
    let events = [
        In::event(0, "a", 1),
        In::event(1, "b", 2),
        In::event(0, "a", 1),
    ];
    cluster.produce(input, &events).await;
}

/// The output holds a and b, once each.
fn assert_each_forwarded_once(cluster: &Cluster, output: &str) {
    let out = cluster.read_topic(output, 2, Duration::from_secs(60));
    let mut ids: Vec<&str> = out
        .iter()
        .filter_map(|m| m.header("kdedup-event-id"))
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["a", "b"], "each event once");
}

#[tokio::test(flavor = "multi_thread")]
async fn topics_made_beforehand_are_used_without_asking_to_create_them() {
    let mock = MockCluster::new(1).unwrap();
    let n = names("premade");
    for t in [&n.input, &n.output, &n.dlq] {
        mock.create_topic(t, 2, 1).unwrap();
    }
    let cluster = Cluster {
        brokers: mock.bootstrap_servers(),
    };
    let cfg = SidecarConfig::new(&n.group, &n.input, &n.output, &n.schema)
        .set("KDEDUP_BROKERS", &cluster.brokers);
    let side = Sidecar::start(&cfg, "premade-topics");
    side.wait_ready(Duration::from_secs(30)).await;
    produce_a_b_a(&cluster, &n.input).await;
    assert_each_forwarded_once(&cluster, &n.output);
    let log = side.log_tail();
    assert!(!log.contains("created topic"), "nothing created:\n{log}");
    drop(side);
    drop_schema(&pg().await, &n.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_create_request_the_brokers_never_answer_ends_the_start_with_the_fix() {
    let mock = MockCluster::new(1).unwrap();
    let n = names("unanswered");
    // The input exists; the output and dead-letter topics do not.
    mock.create_topic(&n.input, 2, 1).unwrap();
    let cfg = SidecarConfig::new(&n.group, &n.input, &n.output, &n.schema)
        .set("KDEDUP_BROKERS", &mock.bootstrap_servers());
    let started = Instant::now();
    let (code, _, stderr) = kdedup_command(&cfg, &["run"]);
    assert_eq!(code, Some(1), "{stderr}");
    for part in [
        "the brokers did not answer the request to create topic",
        &format!("{},{}", n.output, n.dlq),
        "within 30 s",
        "Create it yourself and set KDEDUP_CREATE_TOPICS=false",
    ] {
        assert!(stderr.contains(part), "{part:?} in:\n{stderr}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "{:?}",
        started.elapsed()
    );
    drop_schema(&pg().await, &n.schema).await;
}

/// The mock cluster creates a topic that a producer's metadata lookup names, with 4
/// partitions, as a broker with `auto.create.topics.enable` does with its default count.
/// kdedup's lookups of its own topics (the relay's, the health check's every 2 s) must not
/// create one: with `KDEDUP_CREATE_TOPICS=false` the operator makes them.
#[tokio::test(flavor = "multi_thread")]
async fn with_topic_creation_off_missing_topics_are_reported_and_no_lookup_creates_them() {
    let mock = MockCluster::new(1).unwrap();
    let n = names("nocreate");
    mock.create_topic(&n.input, 2, 1).unwrap();
    let cluster = Cluster {
        brokers: mock.bootstrap_servers(),
    };
    let cfg = SidecarConfig::new(&n.group, &n.input, &n.output, &n.schema)
        .set("KDEDUP_BROKERS", &cluster.brokers)
        .set("KDEDUP_CREATE_TOPICS", "false");
    let side = Sidecar::start(&cfg, "no-create");
    for topic in [&n.output, &n.dlq] {
        wait_until(Duration::from_secs(60), "a missing topic reported", || {
            let log = std::fs::read_to_string(&side.log).unwrap_or_default();
            log.lines()
                .any(|l| l.contains("a topic kdedup writes to does not exist") && l.contains(topic))
        })
        .await;
    }
    produce_a_b_a(&cluster, &n.input).await;
    // A message without an event id, bound for the dead-letter topic.
    let no_id = In {
        partition: Some(1),
        value: Some(b"{}".to_vec()),
        ..In::default()
    };
    cluster.produce(&n.input, &[no_id]).await;
    // Several health checks, relay look-ups and dead-letter attempts later, both topics
    // are still missing.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let listed = cluster.topics();
    for topic in [&n.output, &n.dlq] {
        assert!(
            !listed.contains(topic),
            "a look-up created {topic}: {listed:?}\n{}",
            side.log_tail()
        );
    }
    assert!(!side.ready(), "/readyz fails while they are missing");

    // The operator creates them: what waited is delivered, nothing lost.
    mock.create_topic(&n.output, 2, 1).unwrap();
    mock.create_topic(&n.dlq, 2, 1).unwrap();
    assert_each_forwarded_once(&cluster, &n.output);
    let dead = cluster.read_topic(&n.dlq, 1, Duration::from_secs(90));
    assert_eq!(
        dead.len(),
        1,
        "the message without an id, dead-lettered once"
    );
    assert_eq!(dead[0].header("kdedup-dlq-reason"), Some("missing_id"));
    side.wait_ready(Duration::from_secs(30)).await;
    drop(side);
    drop_schema(&pg().await, &n.schema).await;
}
