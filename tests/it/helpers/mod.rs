//! Test harness: a real Kafka-protocol broker (tansu, started by `make test`), the local
//! Postgres, and the `kdedup` binary run as a child process the way Kubernetes runs it.
//! Every test gets its own topics, group and schema, so tests run in parallel.

use std::path::PathBuf;
use std::time::{Duration, Instant};

mod http_app;
mod kafka;
mod proxy;
mod sidecar;
mod tansu;

pub use http_app::{HttpApp, Mode, Received};
pub use kafka::*;
pub use proxy::Proxy;
pub use sidecar::*;
pub use tansu::Tansu;

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

pub fn log_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tmp/test-logs");
    std::fs::create_dir_all(&dir).unwrap();
    dir
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
    id_set(
        pool,
        &format!("SELECT event_id FROM \"{schema}\".processed_events"),
    )
    .await
}

/// The event ids in `schema`'s outbox (`relay_batches`), over all three slots.
pub async fn outbox_ids(pool: &sqlx::PgPool, schema: &str) -> std::collections::HashSet<String> {
    id_set(
        pool,
        &format!("SELECT e FROM \"{schema}\".relay_batches, unnest(event_ids) AS e"),
    )
    .await
}

/// The distinct values of `sql`'s one text column.
async fn id_set(pool: &sqlx::PgPool, sql: &str) -> std::collections::HashSet<String> {
    sqlx::query_scalar(sql)
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .collect()
}
