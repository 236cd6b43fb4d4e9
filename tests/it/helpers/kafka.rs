//! The Kafka side of the harness: a handle on one cluster (the shared test broker, or a
//! tansu of a test's own) whose methods create topics, produce and read back, and the
//! messages that go in and come out.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use super::unique;

/// A Kafka cluster the tests talk to, by its bootstrap servers.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub brokers: String,
}

impl Cluster {
    /// The broker `make test` starts (KDEDUP_TEST_BROKERS), which every test shares.
    pub fn shared() -> Cluster {
        Cluster {
            brokers: std::env::var("KDEDUP_TEST_BROKERS")
                .unwrap_or_else(|_| "127.0.0.1:19092".into()),
        }
    }

    /// A client configuration with this cluster's bootstrap servers.
    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c
    }

    pub fn producer(&self) -> FutureProducer {
        self.producer_with(&[])
    }

    /// [`Cluster::producer`] with further settings (e.g. `compression.type`).
    pub fn producer_with(&self, settings: &[(&str, &str)]) -> FutureProducer {
        // One message per record batch: tansu 0.6 answers a fetch that starts inside a record
        // batch with nothing, so a consumer resuming mid-batch (after a rebalance, a pause or a
        // seek) would wait forever. Real Kafka serves such fetches; the tests keep every offset
        // a batch start so that they exercise kdedup, not that broker limitation.
        let mut c = self.client();
        c.set("linger.ms", "0").set("batch.num.messages", "1");
        for (k, v) in settings {
            c.set(*k, *v);
        }
        c.create().expect("producer")
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        self.create_topic_with(name, partitions, &[]).await
    }

    /// Creates `name` through the admin API with topic-level `config` (e.g. `retention.ms`).
    pub async fn create_topic_with(&self, name: &str, partitions: i32, config: &[(&str, &str)]) {
        let admin: AdminClient<DefaultClientContext> =
            self.client().create().expect("admin client");
        let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for (k, v) in config {
            topic = topic.set(k, v);
        }
        let results = admin
            .create_topics(
                &[topic],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .expect("create topic");
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
        }
    }

    /// Produces `msgs` in order (one message per record batch, as [`Cluster::producer`])
    /// and waits for every acknowledgement, however long the broker is away.
    pub async fn produce(&self, topic: &str, msgs: &[In]) {
        let p = self.producer();
        let deliveries: Vec<_> = msgs
            .iter()
            .map(|m| send_waiting(&p, record(topic, m)))
            .collect();
        for d in deliveries {
            d.await.expect("delivery").expect("produce acknowledged");
        }
        p.flush(Duration::from_secs(30)).expect("flush");
    }

    /// Reads `topic` from the beginning until at least `expect` messages arrived and no more
    /// came for a second, or `timeout` passed.
    pub fn read_topic(&self, topic: &str, expect: usize, timeout: Duration) -> Vec<Out> {
        let c: BaseConsumer = self
            .client()
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let md = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let mut tpl = TopicPartitionList::new();
        for p in 0..md.topics()[0].partitions().len() as i32 {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        c.assign(&tpl).expect("assign");
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut last = Instant::now();
        while Instant::now() < deadline {
            match c.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    last = Instant::now();
                    let headers = m
                        .headers()
                        .map(|hs| {
                            hs.iter()
                                .map(|h| {
                                    (
                                        h.key.to_string(),
                                        String::from_utf8_lossy(h.value.unwrap_or_default())
                                            .into_owned(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    out.push(Out {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        value: m.payload().map(<[u8]>::to_vec),
                        headers,
                    });
                }
                Some(Err(e)) => panic!("read {topic}: {e}"),
                None => {
                    if out.len() >= expect && last.elapsed() > Duration::from_secs(1) {
                        break;
                    }
                }
            }
        }
        out
    }

    /// Offsets `group` committed on each partition of `topic` (-1 where it committed none).
    pub fn committed_offsets(&self, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
        let c: BaseConsumer = self
            .client()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        let Ok(got) = c.committed_offsets(tpl, Duration::from_secs(10)) else {
            return vec![-1; partitions as usize];
        };
        (0..partitions)
            .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            })
            .collect()
    }

    /// High watermarks of each partition of `topic`. Asked with `read_uncommitted`: tansu
    /// 0.6.0 answers a `read_committed` ListOffsets "latest" from Postgres storage with
    /// `list_latest_offset_committed.sql`, whose `FROM (subquery)` has no alias, which only
    /// Postgres 16 and later accept.
    pub fn high_watermarks(&self, topic: &str, partitions: i32) -> Vec<i64> {
        let c: BaseConsumer = self
            .client()
            .set("isolation.level", "read_uncommitted")
            .create()
            .expect("consumer");
        (0..partitions)
            .map(|p| {
                c.fetch_watermarks(topic, p, Duration::from_secs(10))
                    .map(|(_, high)| high)
                    .unwrap_or(-1)
            })
            .collect()
    }

    /// The topics the cluster lists (a request that names none, so it creates none).
    pub fn topics(&self) -> Vec<String> {
        let c: BaseConsumer = self.client().create().expect("consumer");
        let md = c
            .fetch_metadata(None, Duration::from_secs(10))
            .expect("metadata");
        md.topics().iter().map(|t| t.name().to_string()).collect()
    }

    /// Whether the cluster answers a metadata request within two seconds.
    pub fn answers(&self) -> bool {
        let c: BaseConsumer = self.client().create().expect("consumer");
        c.fetch_metadata(None, Duration::from_secs(2)).is_ok()
    }
}

/// One message to produce.
#[derive(Clone, Debug, Default)]
pub struct In {
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl In {
    /// A JSON event with an `event-id` header, sent to `partition`.
    pub fn event(partition: i32, id: &str, seq: u64) -> Self {
        In {
            partition: Some(partition),
            key: Some(format!("k-{id}").into_bytes()),
            value: Some(format!(r#"{{"id":"{id}","seq":{seq}}}"#).into_bytes()),
            headers: vec![("event-id".into(), id.as_bytes().to_vec())],
        }
    }
}

/// The record for `m` on `topic`.
pub fn record<'a>(topic: &'a str, m: &'a In) -> FutureRecord<'a, Vec<u8>, Vec<u8>> {
    let mut hs = OwnedHeaders::new();
    for (k, v) in &m.headers {
        hs = hs.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    let mut r = FutureRecord::to(topic).headers(hs);
    if let Some(p) = m.partition {
        r = r.partition(p);
    }
    if let Some(k) = &m.key {
        r = r.key(k);
    }
    if let Some(v) = &m.value {
        r = r.payload(v);
    }
    r
}

/// Enqueues `r`, waiting while the producer's queue is full.
pub fn send_waiting<'a>(
    p: &FutureProducer,
    mut r: FutureRecord<'a, Vec<u8>, Vec<u8>>,
) -> rdkafka::producer::DeliveryFuture {
    loop {
        match p.send_result(r) {
            Ok(d) => return d,
            Err((_, back)) => {
                r = back;
                p.poll(Duration::from_millis(10));
            }
        }
    }
}

/// A message read back from a topic.
#[derive(Clone, Debug)]
pub struct Out {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

impl Out {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(self.value.as_deref().unwrap_or_default()).expect("json value")
    }
}
