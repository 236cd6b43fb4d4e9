//! The topics kdedup writes to, at start, on a broker that does not serve CreateTopics
//! (librdkafka's mock cluster, like some Kafka-compatible brokers and proxies, never
//! answers it): with the default `KDEDUP_CREATE_TOPICS=true`, topics made beforehand are
//! used as they are, and a missing one ends the start with the fix.

use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;

use crate::helpers::*;

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
    cluster
        .produce(
            &n.input,
            &[
                In::event(0, "a", 1),
                In::event(1, "b", 2),
                In::event(0, "a", 1),
            ],
        )
        .await;
    let out = cluster.read_topic(&n.output, 2, Duration::from_secs(30));
    let mut ids: Vec<&str> = out
        .iter()
        .filter_map(|m| m.header("kdedup-event-id"))
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["a", "b"], "each event once");
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
