//! Test harness: a real Kafka-protocol broker (tansu, started by `make test`), the local
//! Postgres, and the `kdedup` binary run as a child process the way Kubernetes runs it.
//! Every test gets its own topics, group and schema, so tests run in parallel.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

pub fn brokers() -> String {
    std::env::var("KDEDUP_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

pub fn database_url() -> String {
    std::env::var("KDEDUP_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

pub async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topic");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

pub fn producer() -> FutureProducer {
    // One message per record batch: tansu 0.6 answers a fetch that starts inside a record
    // batch with nothing, so a consumer resuming mid-batch (after a rebalance, a pause or a
    // seek) would wait forever. Real Kafka serves such fetches; the tests keep every offset
    // a batch start so that they exercise kdedup, not that broker limitation.
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "0")
        .set("batch.num.messages", "1")
        .create()
        .expect("producer")
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

/// Produces `msgs` in order and waits for every acknowledgement.
pub async fn produce(topic: &str, msgs: &[In]) {
    let p = producer();
    let mut deliveries = Vec::with_capacity(msgs.len());
    for m in msgs {
        let mut hs = OwnedHeaders::new();
        for (k, v) in &m.headers {
            hs = hs.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut r: FutureRecord<'_, Vec<u8>, Vec<u8>> = FutureRecord::to(topic).headers(hs);
        if let Some(p) = m.partition {
            r = r.partition(p);
        }
        if let Some(k) = &m.key {
            r = r.key(k);
        }
        if let Some(v) = &m.value {
            r = r.payload(v);
        }
        loop {
            match p.send_result(r) {
                Ok(d) => {
                    deliveries.push(d);
                    break;
                }
                Err((_, back)) => {
                    r = back;
                    p.poll(Duration::from_millis(10));
                }
            }
        }
    }
    for d in deliveries {
        d.await.expect("delivery").expect("produce acknowledged");
    }
    p.flush(Duration::from_secs(10)).expect("flush");
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

pub fn partition_count(topic: &str) -> i32 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("consumer");
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    md.topics()[0].partitions().len() as i32
}

/// Reads `topic` from the beginning until at least `expect` messages arrived and no more
/// came for a second, or `timeout` passed.
pub fn read_topic(topic: &str, expect: usize, timeout: Duration) -> Vec<Out> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partition_count(topic) {
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

/// Polls `f` until it returns true or `timeout` passes.
pub async fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Settings for one sidecar process.
#[derive(Clone)]
pub struct SidecarConfig {
    pub env: BTreeMap<String, String>,
}

impl SidecarConfig {
    pub fn new(group: &str, input: &str, output: &str, schema: &str) -> Self {
        let mut env = BTreeMap::new();
        for (k, v) in [
            ("KDEDUP_BROKERS", brokers()),
            ("KDEDUP_GROUP_ID", group.to_string()),
            ("KDEDUP_INPUT_TOPICS", input.to_string()),
            ("KDEDUP_OUTPUT_TOPIC", output.to_string()),
            ("KDEDUP_DATABASE_URL", database_url()),
            ("KDEDUP_DB_SCHEMA", schema.to_string()),
            ("KDEDUP_TOPIC_REPLICATION_FACTOR", "1".to_string()),
            ("KDEDUP_SHUTDOWN_TIMEOUT", "5s".to_string()),
            // A group join on tansu takes session.timeout.ms / 2.
            ("KDEDUP_KAFKA_SESSION_TIMEOUT_MS", "6000".to_string()),
            ("KDEDUP_KAFKA_HEARTBEAT_INTERVAL_MS", "500".to_string()),
            ("KDEDUP_LOG", "info,kdedup=debug".to_string()),
            ("KDEDUP_LOG_FORMAT", "json".to_string()),
        ] {
            env.insert(k.to_string(), v);
        }
        SidecarConfig { env }
    }

    pub fn set(mut self, k: &str, v: &str) -> Self {
        self.env.insert(k.to_string(), v.to_string());
        self
    }
}

/// A running `kdedup run` process.
pub struct Sidecar {
    pub child: Child,
    pub metrics_port: u16,
    pub log: PathBuf,
}

pub fn log_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tmp/test-logs");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Sidecar {
    pub fn start(cfg: &SidecarConfig, name: &str) -> Sidecar {
        let port = free_port();
        let log = log_dir().join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kdedup"))
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(&cfg.env)
            .env("KDEDUP_METRICS_ADDR", format!("127.0.0.1:{port}"))
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn kdedup");
        Sidecar {
            child,
            metrics_port: port,
            log,
        }
    }

    /// Plain HTTP/1.0 GET against the admin server: (status, body).
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.metrics_port, path)
    }

    pub fn metrics_text(&self) -> String {
        self.get("/metrics").map(|(_, t)| t).unwrap_or_default()
    }

    /// Value of one series, e.g. `metric("kdedup_duplicates_total{cause=\"upstream\"}")`,
    /// or the sum over all series of a name given without labels. 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics_text(), series)
    }

    pub fn ready(&self) -> bool {
        matches!(self.get("/readyz"), Some((200, _)))
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.ready() {
            if Instant::now() > deadline {
                panic!("sidecar not ready; log:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and returns the exit code.
    pub fn sigterm(&mut self, timeout: Duration) -> Option<i32> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                self.kill9();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

pub fn metric_value(text: &str, series: &str) -> f64 {
    let with_labels = series.contains('{');
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            let matches = if with_labels {
                name == series
            } else {
                name == series || name.starts_with(&format!("{series}{{"))
            };
            matches.then(|| value.parse::<f64>().unwrap_or(0.0))
        })
        .sum()
}

/// Postgres access for assertions on the tables.
pub async fn pg() -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url())
        .await
        .expect("connect to the test database")
}

pub async fn count(pool: &sqlx::PgPool, schema: &str, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM \"{schema}\".{table}"))
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}

pub async fn drop_schema(pool: &sqlx::PgPool, schema: &str) {
    let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(pool)
        .await;
}

/// One test's names.
pub struct Names {
    pub input: String,
    pub output: String,
    pub dlq: String,
    pub group: String,
    pub schema: String,
}

pub fn names(test: &str) -> Names {
    let base = unique(test);
    Names {
        input: format!("{base}.in"),
        output: format!("{base}.out"),
        dlq: format!("{base}.in.dlq"),
        group: format!("{base}-group"),
        schema: base.to_lowercase(),
    }
}

/// Runs a one-shot `kdedup <args>` with the sidecar's environment; (exit code, stdout, stderr).
pub fn kdedup_command(cfg: &SidecarConfig, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kdedup"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(&cfg.env)
        .env("KDEDUP_METRICS_ADDR", "127.0.0.1:0")
        .env("KDEDUP_LOG", "warn")
        .output()
        .expect("run kdedup");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The number on a summary line such as `  forwarded     12`.
pub fn summary_value(text: &str, label: &str) -> usize {
    text.lines()
        .find(|l| l.trim_start().starts_with(label))
        .and_then(|l| l.split_whitespace().find_map(|w| w.parse().ok()))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{text}"))
}

/// A TCP proxy in front of a service, that a test can cut (every open connection is
/// closed, new ones are refused) and restore: a Postgres outage without stopping the
/// Postgres other tests share.
pub struct Proxy {
    pub port: u16,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: std::net::SocketAddr) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (d, c) = (down.clone(), cut.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if d.load(Ordering::Acquire) {
                    drop(inbound);
                    continue;
                }
                let mut cut_rx = c.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Proxy {
            port,
            down,
            cut,
            task,
        }
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::Release);
        if down {
            self.cut.send_modify(|n| *n += 1);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Resident set size of a process, in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
