//! A broker outage injected with librdkafka's mock cluster (`broker_down`/`broker_up`:
//! every connection drops, the broker keeps its log): the relay and the consumer resume,
//! nothing is lost, nothing is forwarded twice. `tests/broker_restart.rs` is the real
//! thing: a tansu of its own, with Postgres storage, SIGKILLed and started again.

use std::collections::HashMap;
use std::time::Duration;

use crate::helpers::{database_url, drop_schema, pg, unique, wait_until};
use kdedup::cli::{DbArgs, PruneFlags, RunArgs};
use kdedup::metrics::Metrics;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

async fn produce(producer: &FutureProducer, from: usize, to: usize) {
    let mut deliveries = Vec::new();
    for i in from..to {
        let id = format!("b-{i}");
        let record: FutureRecord<'_, str, str> = FutureRecord::to("in")
            .partition((i % 2) as i32)
            .payload("{}")
            .headers(OwnedHeaders::new().insert(Header {
                key: "event-id",
                value: Some(id.as_bytes()),
            }));
        deliveries.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    for d in deliveries {
        d.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_outage_loses_nothing_and_the_relay_resumes() {
    let cluster = MockCluster::new(1).unwrap();
    for t in ["in", "out", "in.dlq"] {
        cluster.create_topic(t, 2, 1).unwrap();
    }
    let brokers = cluster.bootstrap_servers();
    let schema = unique("brokerdown").to_lowercase();
    let defaults = RunArgs::defaults();
    let cfg = RunArgs {
        brokers: Some(brokers.clone()),
        group_id: Some("g".into()),
        input_topics: Some("in".into()),
        output_topic: Some("out".into()),
        db: DbArgs {
            database_url: Some(database_url()),
            db_schema: schema.clone(),
            ..defaults.db
        },
        batch_size: 100,
        batch_linger: "10ms".into(),
        batch_max_bytes: 1 << 20,
        relay_batch_size: 500,
        metrics_addr: "127.0.0.1:0".into(),
        shutdown_timeout: "5s".into(),
        create_topics: false,
        topic_replication_factor: 1,
        prune: PruneFlags {
            pruner: false,
            ..defaults.prune
        },
        kafka_property: vec![
            "session.timeout.ms=6000".into(),
            "heartbeat.interval.ms=500".into(),
        ],
        ..defaults
    }
    .validate(&std::collections::BTreeMap::<String, String>::new())
    .unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let app = tokio::spawn(kdedup::app::run(cfg, stop.clone(), metrics.clone(), None));

    produce(&producer, 0, 300).await;
    wait_until(Duration::from_secs(60), "first wave forwarded", || {
        metrics.events_forwarded.get() >= 300
    })
    .await;

    cluster.broker_down(1).unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.broker_up(1).unwrap();
    produce(&producer, 300, 600).await;
    produce(&producer, 0, 100).await; // a re-sent burst after the outage
    wait_until(
        Duration::from_secs(60),
        "everything settled after the outage",
        || metrics.events_forwarded.get() >= 600 && metrics.duplicates_total() >= 100,
    )
    .await;

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "verify")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition_offset("out", p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline && seen.values().sum::<usize>() < 600 {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let id = m
                .headers()
                .and_then(|h| {
                    h.iter()
                        .find(|h| h.key == "kdedup-event-id")
                        .and_then(|h| h.value)
                })
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap();
            *seen.entry(id).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), 600, "every id reached the output");
    assert!(seen.values().all(|n| *n == 1), "no id forwarded twice");
    stop.cancel();
    app.await.unwrap().unwrap();
    drop(consumer);
    drop(producer);
    drop(cluster);
    drop_schema(&pg().await, &schema).await;
}
