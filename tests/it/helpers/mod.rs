//! Test harness: a real Kafka-protocol broker (tansu, started by `make test`), the local
//! Postgres, and the `kdedup` binary run as a child process the way Kubernetes runs it.
//! Every test gets its own topics, group and schema, so tests run in parallel.

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
    create_topic_on(&brokers(), name, partitions).await
}

pub fn producer() -> FutureProducer {
    producer_on(&brokers())
}

pub fn producer_on(brokers: &str) -> FutureProducer {
    // One message per record batch: tansu 0.6 answers a fetch that starts inside a record
    // batch with nothing, so a consumer resuming mid-batch (after a rebalance, a pause or a
    // seek) would wait forever. Real Kafka serves such fetches; the tests keep every offset
    // a batch start so that they exercise kdedup, not that broker limitation.
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
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
    produce_on(&brokers(), topic, msgs).await
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

/// Reads `topic` from the beginning until at least `expect` messages arrived and no more
/// came for a second, or `timeout` passed.
pub fn read_topic(topic: &str, expect: usize, timeout: Duration) -> Vec<Out> {
    read_topic_on(&brokers(), topic, expect, timeout)
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
        // The first start of a name in this test run truncates what an earlier run left
        // (tests read these logs); later starts of the same name append to it.
        static STARTED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        let first_start = {
            let mut started = STARTED.lock().unwrap();
            let first = !started.iter().any(|n| n == name);
            if first {
                started.push(name.to_string());
            }
            first
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(!first_start)
            .write(true)
            .truncate(first_start)
            .open(&log)
            .unwrap();
        let child = kdedup(cfg, &["run"])
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

/// `kdedup <args>` with exactly `cfg`'s environment (and PATH), not yet started.
pub fn kdedup(cfg: &SidecarConfig, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kdedup"));
    c.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(&cfg.env);
    c
}

/// Runs a one-shot `kdedup <args>` with the sidecar's environment; (exit code, stdout, stderr).
pub fn kdedup_command(cfg: &SidecarConfig, args: &[&str]) -> (Option<i32>, String, String) {
    let out = kdedup(cfg, args)
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

/// What a [`Proxy`] does with the traffic to its service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Up,
    /// Open connections are closed, new ones refused: a server that went away.
    Down,
    /// Open connections stay open and silent, new ones are accepted and never answered:
    /// a dropped network path or a frozen server, where a query waits for ever.
    Silent,
}

/// A TCP proxy in front of a service, whose path a test can take down or silence and
/// restore: a Postgres outage without stopping the Postgres other tests share.
pub struct Proxy {
    pub port: u16,
    path: tokio::sync::watch::Sender<Path>,
    task: tokio::task::JoinHandle<()>,
}

/// Waits until the proxy's path satisfies `f` (the watch guard never outlives the call).
async fn path_until(rx: &mut tokio::sync::watch::Receiver<Path>, f: impl Fn(Path) -> bool) {
    let _ = rx.wait_for(|p| f(*p)).await;
}

impl Proxy {
    pub async fn start(target: std::net::SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (path, _) = tokio::sync::watch::channel(Path::Up);
        let state = path.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut rx = state.subscribe();
                let now = *rx.borrow_and_update();
                match now {
                    Path::Down => drop(inbound),
                    // Held, never answered, closed once the path is back.
                    Path::Silent => {
                        tokio::spawn(async move {
                            path_until(&mut rx, |p| p != Path::Silent).await;
                            drop(inbound);
                        });
                    }
                    Path::Up => {
                        tokio::spawn(async move {
                            let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await
                            else {
                                return;
                            };
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                                _ = path_until(&mut rx, |p| p != Path::Up) => {
                                    // Silent: both sockets stay open until the path changes.
                                    path_until(&mut rx, |p| p != Path::Silent).await;
                                }
                            }
                        });
                    }
                }
            }
        });
        Proxy { port, path, task }
    }

    pub fn set_down(&self, down: bool) {
        self.path
            .send_replace(if down { Path::Down } else { Path::Up });
    }

    pub fn set_silent(&self, silent: bool) {
        self.path
            .send_replace(if silent { Path::Silent } else { Path::Up });
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

// ---------------------------------------------------------------------------------------
// A broker of the test's own: tansu with Postgres storage, which survives its own restart.
// ---------------------------------------------------------------------------------------

/// The tables of tansu 0.6.0's Postgres storage engine. tansu 0.6.0 does not create them
/// (its `pg.rs` only runs the queries under `tansu-storage/src/sql/`; the DDL it ships in
/// `src/ddl/` is SQLite's), so this is that DDL in Postgres types, with the column types
/// its binary `COPY` into `record` and `header` and its parameters need, plus the
/// `record.transaction_id` that its Postgres-only `src/pg/record_fetch.sql` reads.
pub const TANSU_PG_SCHEMA: &str = r#"
create table cluster (
    id int generated always as identity primary key,
    name text not null unique,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null
);
create table consumer_group (
    id int generated always as identity primary key,
    cluster int references cluster (id) on delete cascade not null,
    name text not null,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (cluster, name)
);
create table producer (
    id bigint generated by default as identity primary key,
    cluster int references cluster (id) on delete cascade not null,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null
);
create table scram_credential (
    id int generated always as identity primary key,
    cluster int references cluster (id) on delete cascade not null,
    username text not null,
    mechanism int not null,
    salt bytea not null,
    iterations int not null,
    stored_key bytea not null,
    server_key bytea not null,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (cluster, username, mechanism)
);
create table topic (
    id int generated always as identity primary key,
    cluster int references cluster (id) on delete cascade not null,
    name text not null,
    uuid uuid not null default gen_random_uuid(),
    partitions int not null,
    replication_factor int not null,
    is_internal bool default false not null,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (cluster, name)
);
create table consumer_group_detail (
    id int generated always as identity primary key,
    consumer_group int references consumer_group (id) on delete cascade,
    e_tag uuid not null,
    detail json not null,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (consumer_group)
);
create table producer_epoch (
    id int generated by default as identity primary key,
    producer bigint references producer (id) on delete cascade,
    epoch smallint default 0 not null,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (producer, epoch)
);
create table topic_configuration (
    id int generated always as identity primary key,
    topic int references topic (id) on delete cascade,
    name text not null,
    value text,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (topic, name)
);
create table topition (
    id int generated always as identity primary key,
    topic int references topic (id) on delete cascade,
    partition int,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (topic, partition)
);
create table txn (
    id bigint generated always as identity primary key,
    cluster int references cluster (id) on delete cascade,
    name text,
    producer bigint references producer (id) on delete cascade,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (cluster, name)
);
create table consumer_offset (
    id int generated always as identity primary key,
    consumer_group int references consumer_group (id) on delete cascade,
    topition int references topition (id) on delete cascade,
    committed_offset bigint,
    leader_epoch int,
    timestamp timestamptz,
    metadata text,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (consumer_group, topition)
);
create table record (
    topition int references topition (id) on delete cascade,
    offset_id bigint not null,
    attributes smallint,
    producer_id bigint,
    producer_epoch smallint,
    timestamp timestamptz,
    k bytea,
    v bytea,
    -- src/pg/record_fetch.sql serves a record once its writer's transaction is older
    -- than every open snapshot: `transaction_id < pg_snapshot_xmin(pg_current_snapshot())`.
    transaction_id xid8 default pg_current_xact_id() not null,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    primary key (topition, offset_id)
);
create table header (
    topition int,
    offset_id bigint,
    k bytea,
    v bytea,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    foreign key (topition, offset_id) references record (topition, offset_id) on delete cascade
);
create index header_record_idx on header (topition, offset_id);
create table producer_detail (
    id bigint generated by default as identity primary key,
    producer_epoch int references producer_epoch (id) on delete cascade,
    topition int references topition (id) on delete cascade,
    sequence int default 0 not null,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (producer_epoch, topition)
);
create table txn_detail (
    id bigint generated always as identity primary key,
    "transaction" bigint references txn (id) on delete cascade,
    producer_epoch int references producer_epoch (id) on delete cascade,
    transaction_timeout_ms int not null,
    started_at timestamptz,
    status text,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique ("transaction", producer_epoch)
);
create table watermark (
    id int generated always as identity primary key,
    topition int references topition (id) on delete cascade,
    low bigint,
    high bigint,
    stable bigint,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (topition)
);
create table txn_offset_commit (
    id int generated always as identity primary key,
    txn_detail bigint references txn_detail (id) on delete cascade,
    consumer_group int references consumer_group (id) on delete cascade,
    generation_id int,
    member_id text,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (txn_detail, consumer_group)
);
create table txn_topition (
    id int generated always as identity primary key,
    txn_detail bigint references txn_detail (id) on delete cascade,
    topition int references topition (id) on delete cascade,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (txn_detail, topition)
);
create table txn_offset_commit_tp (
    id int generated always as identity primary key,
    offset_commit int references txn_offset_commit (id) on delete cascade,
    topition int references topition (id) on delete cascade,
    committed_offset bigint,
    leader_epoch int,
    metadata text,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null,
    unique (offset_commit, topition)
);
create table txn_produce_offset (
    id int generated always as identity primary key,
    txn_topition int references txn_topition (id) on delete cascade unique,
    offset_start bigint,
    offset_end bigint,
    last_updated timestamptz default current_timestamp not null,
    created_at timestamptz default current_timestamp not null
);
"#;

/// The tansu binary `scripts/services.sh` installs.
pub fn tansu_bin() -> PathBuf {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    home.join("bin/tansu")
}

/// `database_url()` with another database name.
pub fn database_url_for(db: &str) -> String {
    let url = database_url();
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b.to_string(), format!("?{q}")),
        None => (url.clone(), String::new()),
    };
    let (server, _) = base.rsplit_once('/').expect("database url with a path");
    format!("{server}/{db}{query}")
}

/// A tansu broker of one test's own, on a free port, storing everything in a fresh
/// Postgres database, so that it can be SIGKILLed and restarted on the same port and
/// database with its topics, records, committed offsets and producer state intact.
/// Dropping it kills the broker and drops the database.
pub struct Tansu {
    pub port: u16,
    pub db: String,
    pub log: PathBuf,
    pub restarts: usize,
    child: Option<Child>,
}

impl Tansu {
    pub async fn start(name: &str) -> Tansu {
        let bin = tansu_bin();
        assert!(
            bin.exists(),
            "{} is missing: run scripts/services.sh broker",
            bin.display()
        );
        let db = unique(&format!("tansu_{name}")).to_lowercase();
        let admin = pg().await;
        sqlx::query(&format!("CREATE DATABASE \"{db}\""))
            .execute(&admin)
            .await
            .expect("create the broker's database");
        admin.close().await;
        let own = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&database_url_for(&db))
            .await
            .expect("connect to the broker's database");
        sqlx::raw_sql(TANSU_PG_SCHEMA)
            .execute(&own)
            .await
            .expect("create tansu's tables");
        own.close().await;
        let log = log_dir().join(format!("{db}.tansu.log"));
        let mut t = Tansu {
            port: free_port(),
            db,
            log,
            restarts: 0,
            child: None,
        };
        t.spawn();
        t.wait_up(Duration::from_secs(30)).await;
        t
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// tansu's Postgres client tries TLS first and rejects the local server's snake-oil
    /// certificate (issued to `localhost`), so TLS is off for it.
    pub fn storage_url(&self) -> String {
        let url = database_url_for(&self.db);
        if url.contains("sslmode=") {
            url
        } else if url.contains('?') {
            format!("{url}&sslmode=disable")
        } else {
            format!("{url}?sslmode=disable")
        }
    }

    fn spawn(&mut self) {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let listener = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(tansu_bin())
            .arg("broker")
            .args(["--listener-url", &listener])
            .args(["--advertised-listener-url", &listener])
            .args(["--storage-engine", &self.storage_url()])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn tansu");
        self.child = Some(child);
    }

    /// Waits until the broker answers a metadata request.
    pub async fn wait_up(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("tansu exited ({status}); see {}", self.log.display());
            }
            let brokers = self.brokers();
            let up = tokio::task::spawn_blocking(move || {
                let c: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", brokers)
                    .create()
                    .expect("consumer");
                c.fetch_metadata(None, Duration::from_secs(2)).is_ok()
            })
            .await
            .unwrap();
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "tansu did not come up on {}; see {}",
                self.brokers(),
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// SIGKILL: no shutdown of any kind, open requests die with their connections.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the broker again on the same port and database, and waits until it answers.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "tansu is still running");
        self.spawn();
        self.restarts += 1;
        self.wait_up(Duration::from_secs(30)).await;
    }

    /// `kill` followed by `start_again` after `down`.
    pub async fn restart(&mut self, down: Duration) {
        self.kill();
        tokio::time::sleep(down).await;
        self.start_again().await;
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
        let _ = Command::new("psql")
            .args([&database_url(), "-qc"])
            .arg(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.db
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `create_topic` against the given brokers.
pub async fn create_topic_on(brokers: &str, name: &str, partitions: i32) {
    create_topic_with(brokers, name, partitions, &[]).await
}

/// Creates `name` through the admin API with topic-level `config` (e.g. `retention.ms`).
pub async fn create_topic_with(
    brokers: &str,
    name: &str,
    partitions: i32,
    config: &[(&str, &str)],
) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
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

/// `produce` against the given brokers (one message per record batch, as `producer()`).
/// Waits for every acknowledgement, however long the broker is away.
pub async fn produce_on(brokers: &str, topic: &str, msgs: &[In]) {
    let p = producer_on(brokers);
    let deliveries: Vec<_> = msgs
        .iter()
        .map(|m| send_waiting(&p, record(topic, m)))
        .collect();
    for d in deliveries {
        d.await.expect("delivery").expect("produce acknowledged");
    }
    p.flush(Duration::from_secs(30)).expect("flush");
}

/// `read_topic` against the given brokers.
pub fn read_topic_on(brokers: &str, topic: &str, expect: usize, timeout: Duration) -> Vec<Out> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
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
pub fn committed_offsets_on(brokers: &str, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
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
pub fn high_watermarks_on(brokers: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
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

/// `sum(forwarded)` and `sum(duplicates)` over the scopes of `schema`'s `gate_counters`.
pub async fn gate_totals(pool: &sqlx::PgPool, schema: &str) -> (i64, i64) {
    sqlx::query_as(&format!(
        "SELECT coalesce(sum(forwarded), 0)::int8, coalesce(sum(duplicates), 0)::int8 \
         FROM \"{schema}\".gate_counters"
    ))
    .fetch_one(pool)
    .await
    .unwrap_or((-1, -1))
}

/// The event ids `schema`'s gate holds.
pub async fn gated_ids(pool: &sqlx::PgPool, schema: &str) -> std::collections::HashSet<String> {
    sqlx::query_scalar(&format!(
        "SELECT event_id FROM \"{schema}\".processed_events"
    ))
    .fetch_all(pool)
    .await
    .expect("read processed_events")
    .into_iter()
    .collect()
}
