//! The sidecar's `/metrics` as Prometheus sees it: scraped every second by a real
//! Prometheus server started for the test, and linted by `promtool check metrics`.
//!
//! Needs `prometheus` and `promtool` (Debian's `prometheus` package, installed by
//! `scripts/services.sh prometheus`, which `make test` runs).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::*;

/// `/usr/bin/<name>` from the Debian package, else `<name>` on PATH, else the copy
/// scripts/check-deploy.sh unpacks into .tmp/prometheus-deb.
fn tool(name: &str) -> PathBuf {
    let packaged = PathBuf::from("/usr/bin").join(name);
    if packaged.is_file() {
        return packaged;
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if let Some(p) = on_path {
        return p;
    }
    let unpacked = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(".tmp/prometheus-deb/usr/bin")
        .join(name);
    if unpacked.is_file() {
        return unpacked;
    }
    panic!("{name} not found: run `scripts/services.sh prometheus` (installs Debian's prometheus package)");
}

/// Percent-encodes a query string value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server of the test's own: free loopback port, own data directory, a
/// generated configuration scraping one kdedup every second. Killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
    log: PathBuf,
}

impl Prometheus {
    fn start(target_port: u16, name: &str) -> Prometheus {
        let port = free_port();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(".tmp/test-prometheus")
            .join(unique(name));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: kdedup\n    scrape_interval: 1s\n    static_configs:\n      \
                 - targets: ['127.0.0.1:{target_port}']\n"
            ),
        )
        .unwrap();
        let log = log_dir().join(format!("{name}.prometheus.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--storage.tsdb.retention.time=1h")
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn prometheus");
        Prometheus {
            child,
            port,
            dir,
            log,
        }
    }

    async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !matches!(http_get(self.port, "/-/ready"), Some((200, _))) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited with {status}; log:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The value of an instant query that returns one sample; `None` when it returns
    /// none (yet) or Prometheus did not answer.
    fn query(&self, promql: &str) -> Option<f64> {
        let (status, body) = http_get(
            self.port,
            &format!("/api/v1/query?query={}", encode(promql)),
        )?;
        assert_eq!(status, 200, "query {promql}: {body}");
        let doc: serde_json::Value = serde_json::from_str(&body).expect("JSON answer");
        assert_eq!(doc["status"], "success", "query {promql}: {body}");
        let result = doc["data"]["result"].as_array()?;
        assert!(result.len() <= 1, "query {promql}: {body}");
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Polls `promql` until it returns `want`, or panics with the last value after `timeout`.
    async fn wait_for_value(&self, promql: &str, want: f64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.query(promql);
            if got == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{promql} is {got:?} after {timeout:?}, want {want}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `distinct` events over two partitions, each 4th re-sent later (another batch) and each
/// 10th sent twice in a row (same batch), plus one message without an id (dead-lettered).
/// Returns the messages and how many of them are duplicates.
fn traffic(distinct: usize) -> (Vec<In>, usize) {
    let mut msgs = Vec::new();
    let mut later = Vec::new();
    for i in 0..distinct {
        let ev = In::event((i % 2) as i32, &format!("ev-{i}"), i as u64);
        msgs.push(ev.clone());
        if i % 10 == 0 {
            msgs.push(ev.clone());
        }
        if i % 4 == 0 {
            later.push(ev);
        }
    }
    let duplicates = distinct.div_ceil(10) + distinct.div_ceil(4);
    msgs.extend(later);
    msgs.push(In {
        partition: Some(0),
        key: Some(b"no-id".to_vec()),
        value: Some(b"{}".to_vec()),
        headers: vec![],
    });
    (msgs, duplicates)
}

/// Starts a sidecar on fresh topics, runs [`traffic`] through it and waits until it has
/// consumed everything and the relay has forwarded every distinct event.
async fn sidecar_with_traffic(test: &str, distinct: usize) -> (Sidecar, Names, usize) {
    let kafka = Cluster::shared();
    let t = names(test);
    kafka.create_topic(&t.input, 2).await;
    let (msgs, duplicates) = traffic(distinct);
    let total = msgs.len();
    kafka.produce(&t.input, &msgs).await;
    let sidecar = Sidecar::start(
        &SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
            .set("KDEDUP_BATCH_SIZE", "50"),
        test,
    );
    // Consumption is counted when a batch starts, its duplicates and dead letters once
    // it is durable: wait for every message to have its outcome, then check the exact
    // counts (an over-count still fails below).
    wait_until(Duration::from_secs(90), "all traffic settled", || {
        sidecar.metric("kdedup_events_consumed_total") as usize >= total
            && sidecar.metric("kdedup_events_forwarded_total") as usize >= distinct
            && sidecar.metric("kdedup_duplicates_total") as usize >= duplicates
            && sidecar.metric("kdedup_events_dead_lettered_total") as usize >= 1
    })
    .await;
    assert_eq!(
        sidecar.metric("kdedup_duplicates_total") as usize,
        duplicates,
        "duplicates counted by the sidecar itself"
    );
    (sidecar, t, duplicates)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrapes_the_duplicate_count() {
    let (sidecar, t, duplicates) = sidecar_with_traffic("prom_scrape", 300).await;
    let mut prometheus = Prometheus::start(sidecar.metrics_port, "prom_scrape");
    prometheus.wait_ready(Duration::from_secs(30)).await;

    prometheus
        .wait_for_value(
            "sum(kdedup_duplicates_total)",
            duplicates as f64,
            Duration::from_secs(60),
        )
        .await;
    // The same scrape carries the rest of the picture. Every duplicate here is an upstream
    // one (sent again by the producer), none a redelivery or a replay.
    assert_eq!(prometheus.query("up{job=\"kdedup\"}"), Some(1.0));
    assert_eq!(
        prometheus.query("kdedup_duplicates_total{cause=\"upstream\"}"),
        Some(duplicates as f64)
    );
    assert_eq!(
        prometheus.query("kdedup_duplicates_total{cause=\"redelivery\"}"),
        Some(0.0)
    );
    assert_eq!(
        prometheus.query(&format!(
            "kdedup_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        Some(1.0)
    );
    assert_eq!(prometheus.query("kdedup_postgres_up"), Some(1.0));
    assert_eq!(prometheus.query("kdedup_outbox_backlog"), Some(0.0));
    // The table size is Postgres' live-row statistic, which trails commits by seconds.
    prometheus
        .wait_for_value(
            "kdedup_processed_events_rows",
            300.0,
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(
        prometheus.query("sum(kdedup_events_forwarded_total)"),
        Some(300.0)
    );
    assert_eq!(
        prometheus.query("sum(kdedup_events_dead_lettered_total)"),
        Some(1.0)
    );
    assert_eq!(
        prometheus.query(&format!(
            "kdedup_events_consumed_total{{topic=\"{}\"}}",
            t.input
        )),
        Some((300 + duplicates + 1) as f64)
    );
    drop(prometheus);
    drop(sidecar);
    drop_schema(&pg().await, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn promtool_finds_nothing_to_lint_in_metrics() {
    let (sidecar, t, _) = sidecar_with_traffic("prom_lint", 100).await;
    // Every family is there, with labelled series and histogram buckets filled in
    // (consumer lag comes with librdkafka's statistics, every 5s). The input retention
    // gauge is left out: tansu does not report retention.ms for topics created without it.
    let families = [
        "kdedup_consumer_lag{",
        "kdedup_events_dead_lettered_total{",
        "kdedup_batch_duration_seconds_bucket{",
        "kdedup_latency_seconds_bucket{",
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = sidecar.metrics_text();
        let missing: Vec<_> = families.iter().filter(|f| !text.contains(*f)).collect();
        if missing.is_empty() {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "{missing:?} missing from /metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let mut promtool = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    {
        use std::io::Write;
        let mut stdin = promtool.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
    }
    let out = promtool.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics ({}):\n{report}",
        out.status
    );
    drop(sidecar);
    drop_schema(&pg().await, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ttl_shorter_than_the_input_retention_is_exported_and_warned_about() {
    let kafka = Cluster::shared();
    let t = names("ttl_retention");
    // Seven days of retention, one hour of TTL: a redelivery after an hour slips through.
    kafka
        .create_topic_with(&t.input, 1, &[("retention.ms", "604800000")])
        .await;
    let sidecar = Sidecar::start(
        &SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema).set("KDEDUP_TTL", "1h"),
        "ttl_retention",
    );
    sidecar.wait_ready(Duration::from_secs(60)).await;
    let retention = format!("kdedup_input_retention_seconds{{topic=\"{}\"}}", t.input);
    assert_eq!(sidecar.metric(&retention), 604_800.0, "retention gauge");
    assert_eq!(sidecar.metric("kdedup_ttl_seconds"), 3600.0, "TTL gauge");
    let log = std::fs::read_to_string(&sidecar.log).unwrap();
    let warning = log
        .lines()
        .find(|l| l.contains("TTL is shorter than the input topic's retention"))
        .unwrap_or_else(|| panic!("no start-up warning:\n{}", sidecar.log_tail()));
    assert!(warning.contains(r#""level":"WARN""#), "{warning}");
    assert!(
        warning.contains("KDEDUP_TTL"),
        "the warning names the fix: {warning}"
    );
    drop(sidecar);
    drop_schema(&pg().await, &t.schema).await;
}
