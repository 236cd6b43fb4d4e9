//! The sidecar's `/metrics` as Prometheus sees it: scraped every second by a real
//! Prometheus server started for the test, and linted by `promtool check metrics`; and
//! every query of the Grafana dashboard (deploy/grafana/kdedup-dashboard.json) run against
//! that Prometheus, as an operator's Grafana would run it.
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
    fn start(target_ports: &[u16], name: &str) -> Prometheus {
        let targets = target_ports
            .iter()
            .map(|p| format!("'127.0.0.1:{p}'"))
            .collect::<Vec<_>>()
            .join(", ");
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
                 - targets: [{targets}]\n"
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

    /// Every sample of an instant query: (labels, value), or the error Prometheus gave.
    /// A scalar result is one sample without labels.
    fn samples(&self, promql: &str) -> Result<Vec<(serde_json::Value, f64)>, String> {
        let (status, body) = http_get(
            self.port,
            &format!("/api/v1/query?query={}", encode(promql)),
        )
        .ok_or("Prometheus did not answer")?;
        let doc: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if status != 200 || doc["status"] != "success" {
            return Err(format!("HTTP {status}: {}", doc["error"]));
        }
        let value = |v: &serde_json::Value| v[1].as_str().and_then(|s| s.parse().ok());
        let result = &doc["data"]["result"];
        if doc["data"]["resultType"] == "scalar" {
            return Ok(value(result)
                .map(|v| (serde_json::Value::Null, v))
                .into_iter()
                .collect());
        }
        Ok(result
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| Some((s["metric"].clone(), value(&s["value"])?)))
            .collect())
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
    let mut prometheus = Prometheus::start(&[sidecar.metrics_port], "prom_scrape");
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

/// The Grafana dashboard operators import.
const DASHBOARD: &str = "deploy/grafana/kdedup-dashboard.json";

/// The alert rules, whose metric names are checked against the same Prometheus.
const ALERT_RULES: &str = "deploy/prometheus/kdedup-alerts.yaml";

/// Panels whose series come from an exporter beside kdedup, by title, and why: the test's
/// Prometheus scrapes only the sidecar. Their queries must still parse, and the kdedup
/// series they join must exist.
const PANELS_NEEDING_EXPORTERS: &[(&str, &str)] = &[(
    "Memory against the limit",
    "container_memory_working_set_bytes comes from cAdvisor and kube_pod_container_resource_limits \
     from kube-state-metrics; kdedup exports no process metrics (the prometheus crate's `process` \
     feature is off)",
)];

/// Metrics the alert rules read that this test's sidecar never creates, and why.
const ALERT_METRICS_NOT_EXERCISED: &[(&str, &str)] = &[(
    "kdedup_sink_errors_total",
    "Postgres sink only, and its series appear with the first failure of the sink statement",
)];

/// Grafana's built-in interval variables, as Grafana fills them in for a data source with
/// the default 15s scrape interval: `$__rate_interval` is then at least 4 × 15s. One minute
/// also spans dozens of this test's 1s scrapes, so every rate() has the two samples it
/// needs.
const GRAFANA_INTERVALS: &[(&str, &str)] = &[
    ("__rate_interval", "1m"),
    ("__interval", "15s"),
    ("__range", "1h"),
];

/// One query of one panel.
struct PanelQuery {
    /// `panel 27 "Consumer lag in seconds", query A`
    name: String,
    title: String,
    expr: String,
}

fn read_dashboard() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(DASHBOARD);
    let text = std::fs::read_to_string(&path).expect("read the dashboard");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every target of every panel, including panels folded into collapsed rows.
fn panel_queries(dashboard: &serde_json::Value) -> Vec<PanelQuery> {
    let mut panels: Vec<&serde_json::Value> = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        panels.push(p);
        panels.extend(p["panels"].as_array().into_iter().flatten());
    }
    let mut queries = Vec::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or("").to_string();
        for t in p["targets"].as_array().into_iter().flatten() {
            queries.push(PanelQuery {
                name: format!(
                    "panel {} {title:?}, query {}",
                    p["id"],
                    t["refId"].as_str().unwrap_or("?")
                ),
                title: title.clone(),
                expr: t["expr"].as_str().unwrap_or("").to_string(),
            });
        }
    }
    queries
}

/// `expr` with Grafana's `$name`, `${name}` and `${name:format}` replaced from `vars`;
/// an unknown variable is an error (Grafana would leave it in, and the query would fail).
fn interpolate(expr: &str, vars: &[(String, String)]) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').ok_or("unclosed ${")?;
            let inner = &braced[..end];
            (inner.split(':').next().unwrap_or(inner), end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        let value = vars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or_else(|| format!("uses ${name}, which the dashboard does not define"))?;
        out.push_str(value);
        rest = &after[len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A value of a multi-value variable as Grafana writes it into a Prometheus regex matcher:
/// regex metacharacters escaped, backslashes doubled for the PromQL string.
fn grafana_regex_escape(value: &str) -> String {
    let mut out = String::new();
    for c in value.chars() {
        match c {
            '\\' => out.push_str(r"\\\\"),
            '$' | '^' | '*' | '{' | '}' | '[' | ']' | '\'' | '+' | '?' | '.' | '(' | ')' | '|' => {
                out.push_str(r"\\");
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out
}

/// Grafana's intervals, then each template variable in dashboard order set to the first
/// value its `label_values(selector, label)` query finds: what an operator sees after
/// picking one job and one instance (a stricter test than "All", whose `.*` matches even a
/// misspelt label).
fn resolve_variables(
    prometheus: &Prometheus,
    dashboard: &serde_json::Value,
) -> Result<Vec<(String, String)>, String> {
    let mut vars: Vec<(String, String)> = GRAFANA_INTERVALS
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = v["name"].as_str().unwrap_or("?").to_string();
        match v["type"].as_str() {
            Some("datasource") => continue,
            Some("query") => {}
            other => {
                return Err(format!(
                    "variable {name}: type {other:?} is not handled here"
                ))
            }
        }
        let definition = v["definition"].as_str().unwrap_or("");
        let (selector, label) = definition
            .strip_prefix("label_values(")
            .and_then(|d| d.strip_suffix(')'))
            .and_then(|d| d.rsplit_once(','))
            .ok_or_else(|| format!("variable {name}: cannot read {definition:?}"))?;
        let selector = interpolate(selector.trim(), &vars)?;
        let mut values: Vec<String> = prometheus
            .samples(&selector)
            .map_err(|e| format!("variable {name}: {selector}: {e}"))?
            .iter()
            .filter_map(|(labels, _)| labels[label.trim()].as_str().map(str::to_string))
            .collect();
        values.sort();
        let first = values
            .first()
            .cloned()
            .ok_or_else(|| format!("variable {name}: {definition} finds no value"))?;
        // A multi-value variable is shown with every value selected (Grafana's "All"):
        // `(a|b)`, each value regex-escaped.
        let multi = v["multi"] == true || v["includeAll"] == true;
        let value = if multi {
            values.dedup();
            let all: Vec<String> = values.iter().map(|v| grafana_regex_escape(v)).collect();
            format!("({})", all.join("|"))
        } else {
            first
        };
        vars.push((name, value));
    }
    Ok(vars)
}

/// The metric names of kdedup's own a PromQL text reads (string literals skipped).
fn kdedup_metric_names(promql: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut chars = promql.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '"' || c == '\'' || c == '`' {
            let mut escaped = false;
            for (_, d) in chars.by_ref() {
                if d == c && !escaped {
                    break;
                }
                escaped = d == '\\' && !escaped;
            }
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' {
            let mut end = i + c.len_utf8();
            while let Some(&(j, d)) = chars.peek() {
                if !(d.is_ascii_alphanumeric() || d == '_' || d == ':') {
                    break;
                }
                end = j + d.len_utf8();
                chars.next();
            }
            // A colon ends a sentence in prose; kdedup's own names have none.
            let word = promql[i..end].trim_end_matches(':');
            if word.starts_with("kdedup_") && !names.iter().any(|n| n == word) {
                names.push(word.to_string());
            }
        }
    }
    names
}

/// Runs every panel query of `dashboard` and returns what an operator would find wrong:
/// an error, no series, only NaN, or a kdedup metric no series has (which an `or vector(0)`
/// would otherwise hide). Panels in [`PANELS_NEEDING_EXPORTERS`] only need to parse and
/// to name kdedup metrics that exist.
fn dashboard_defects(prometheus: &Prometheus, dashboard: &serde_json::Value) -> Vec<String> {
    let vars = match resolve_variables(prometheus, dashboard) {
        Ok(vars) => vars,
        Err(e) => return vec![format!("template variables: {e}")],
    };
    let mut defects = Vec::new();
    for q in panel_queries(dashboard) {
        let expr = match interpolate(&q.expr, &vars) {
            Ok(expr) => expr,
            Err(e) => {
                defects.push(format!("{}: {e}", q.name));
                continue;
            }
        };
        let needs_exporter = PANELS_NEEDING_EXPORTERS.iter().any(|(t, _)| *t == q.title);
        match prometheus.samples(&expr) {
            Err(e) => defects.push(format!("{}: {e}\n    {expr}", q.name)),
            Ok(_) if needs_exporter => {}
            Ok(samples) if samples.is_empty() => {
                defects.push(format!("{}: returns no series\n    {expr}", q.name))
            }
            Ok(samples) if samples.iter().all(|(_, v)| v.is_nan()) => {
                defects.push(format!("{}: returns only NaN\n    {expr}", q.name))
            }
            Ok(_) => {}
        }
        for metric in kdedup_metric_names(&expr) {
            if !matches!(prometheus.samples(&format!("count({metric})")), Ok(s) if !s.is_empty()) {
                defects.push(format!("{}: reads {metric}, which has no series", q.name));
            }
        }
    }
    defects
}

/// The dashboard as an operator sees it: a sidecar that has forwarded, dropped duplicates,
/// dead-lettered, seen a payload mismatch and pruned, scraped every second by a real
/// Prometheus since before the first event, and every panel's query run against it with
/// the dashboard's variables filled in. A panel that shows nothing is named.
#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_panel_shows_data_from_a_real_sidecar() {
    let dashboard = read_dashboard();
    let titles: Vec<String> = panel_queries(&dashboard)
        .into_iter()
        .map(|q| q.title)
        .collect();
    for (title, why) in PANELS_NEEDING_EXPORTERS {
        assert!(
            titles.iter().any(|t| t == title),
            "PANELS_NEEDING_EXPORTERS names {title:?}, which the dashboard does not have"
        );
        eprintln!("panel {title:?} is only parsed, not required to show data: {why}");
    }

    let kafka = Cluster::shared();
    let t = names("prom_dash");
    // A retention of its own: the TTL headroom panels compare the TTL against it (tansu
    // reports none for a topic created without one).
    kafka
        .create_topic_with(&t.input, 2, &[("retention.ms", "604800000")])
        .await;
    let sidecar = Sidecar::start(
        &SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
            .set("KDEDUP_BATCH_SIZE", "50")
            .set("KDEDUP_PRUNE_INTERVAL", "1s"),
        "prom_dash",
    );
    // The HTTP sink's panels need a sidecar of that sink: a second Deployment, pushing to
    // an application that answers one event with a 500 first (a retry).
    let app = HttpApp::start().await;
    app.fail_id("h-3", 500, 1, None);
    let h = names("prom_dash_http");
    kafka.create_topic(&h.input, 1).await;
    let http_sidecar = Sidecar::start(
        &SidecarConfig::new(&h.group, &h.input, &h.output, &h.schema).http_sink(&app.url()),
        "prom_dash_http",
    );
    let mut prometheus = Prometheus::start(
        &[sidecar.metrics_port, http_sidecar.metrics_port],
        "prom_dash",
    );
    prometheus.wait_ready(Duration::from_secs(30)).await;
    sidecar.wait_ready(Duration::from_secs(60)).await;
    http_sidecar.wait_ready(Duration::from_secs(60)).await;
    // Scraped before any work, so that every counter and histogram below rises inside
    // Prometheus' data and rate() sees it.
    prometheus
        .wait_for_value("min(up{job=\"kdedup\"})", 1.0, Duration::from_secs(30))
        .await;
    let text = sidecar.metrics_text();
    assert!(
        !text.contains("process_resident_memory_bytes"),
        "kdedup exports process metrics now: draw \"Memory against the limit\" from \
         process_resident_memory_bytes and take it out of PANELS_NEEDING_EXPORTERS"
    );

    // The HTTP sidecar's work first: the Kafka sidecar's below must still be inside the
    // panels' one-minute rate windows when the queries run.
    let pushed: Vec<In> = (0..20)
        .map(|i| In::event(0, &format!("h-{i}"), i))
        .collect();
    kafka.produce(&h.input, &pushed).await;
    wait_until(
        Duration::from_secs(60),
        "the HTTP sidecar delivered, once after a retry",
        || {
            http_sidecar.metric("kdedup_events_forwarded_total") >= 20.0
                && http_sidecar.metric("kdedup_http_retries_total") >= 1.0
        },
    )
    .await;

    // Forwarding, duplicates and a dead letter; then ev-1 again with another payload.
    let (mut msgs, _) = traffic(200);
    msgs.push(In::event(1, "ev-1", 999_999));
    let total = msgs.len();
    kafka.produce(&t.input, &msgs).await;
    // Rows that expired a day ago, for the pruner (every second) to delete.
    let pool = pg().await;
    sqlx::query(&format!(
        "INSERT INTO \"{s}\".processed_events (event_key, scope, event_id, source_topic, \
         source_partition, source_offset, first_seen_at, expires_at) \
         SELECT \"{s}\".event_key('expired', 'old-' || i), 'expired', 'old-' || i, 't', 0, i, \
         now() - interval '8 days', now() - interval '1 day' FROM generate_series(1, 100) AS i",
        s = t.schema
    ))
    .execute(&pool)
    .await
    .expect("insert expired rows");
    wait_until(Duration::from_secs(90), "every kind of work done", || {
        sidecar.metric("kdedup_events_consumed_total") as usize >= total
            && sidecar.metric("kdedup_events_forwarded_total") >= 200.0
            && sidecar.metric("kdedup_events_dead_lettered_total") >= 1.0
            && sidecar.metric("kdedup_payload_mismatches_total") >= 1.0
            && sidecar.metric("kdedup_rows_pruned_total") >= 100.0
    })
    .await;
    // More HTTP deliveries, so that both sidecars' work is inside the panels' one-minute
    // rate windows when the queries run, however long the Kafka sidecar's took.
    let more: Vec<In> = (20..30)
        .map(|i| In::event(0, &format!("h-{i}"), i))
        .collect();
    kafka.produce(&h.input, &more).await;
    wait_until(
        Duration::from_secs(60),
        "the HTTP sidecar's second round",
        || http_sidecar.metric("kdedup_events_forwarded_total") >= 30.0,
    )
    .await;

    // Scrapes, the lag statistics (every 5s) and the table gauges (every 2s) trail the
    // work by seconds: ask again until every panel shows data, or name those that do not.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let defects = dashboard_defects(&prometheus, &dashboard);
        if defects.is_empty() {
            let queries = panel_queries(&dashboard);
            let parsed_only = queries
                .iter()
                .filter(|q| PANELS_NEEDING_EXPORTERS.iter().any(|(t, _)| *t == q.title))
                .count();
            eprintln!(
                "{} dashboard queries return data; {parsed_only} more only parsed",
                queries.len() - parsed_only
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} dashboard queries show nothing against a sidecar that did all its work \
             ({DASHBOARD}):\n{}",
            defects.len(),
            defects.join("\n")
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // The same check names a panel whose metric is misspelt, even behind `or vector(0)`.
    let mut broken = dashboard.clone();
    let text = serde_json::to_string(&broken)
        .unwrap()
        .replace("kdedup_consumer_lag_seconds{", "kdedup_consumer_lag_secs{");
    broken = serde_json::from_str(&text).unwrap();
    let stat = broken["panels"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|p| p["title"] == "Dead-lettered /s")
        .expect("the Dead-lettered /s panel");
    let expr = stat["targets"][0]["expr"].as_str().unwrap().to_string();
    stat["targets"][0]["expr"] = expr
        .replace(
            "kdedup_events_dead_lettered_total",
            "kdedup_events_deadlettered_total",
        )
        .into();
    let defects = dashboard_defects(&prometheus, &broken);
    assert!(
        defects
            .iter()
            .any(|d| d.contains("\"Consumer lag in seconds\"") && d.contains("no series")),
        "{defects:?}"
    );
    assert!(
        defects.iter().any(|d| d.contains("\"Dead-lettered /s\"")
            && d.contains("kdedup_events_deadlettered_total, which has no series")),
        "{defects:?}"
    );

    // The alert rules read metrics by name too; promtool's unit tests cannot catch a
    // misspelt one (their input series are spelt by the same hand).
    let rules =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(ALERT_RULES))
            .expect("read the alert rules");
    // Names in the annotations count too; quotes are dropped so that an apostrophe in a
    // comment does not hide what follows it.
    let named = kdedup_metric_names(&rules.replace(['"', '\'', '`'], " "));
    for (metric, why) in ALERT_METRICS_NOT_EXERCISED {
        assert!(
            named.contains(&metric.to_string()),
            "ALERT_METRICS_NOT_EXERCISED names {metric}, which no rule reads"
        );
        eprintln!("{metric} is not checked: {why}");
    }
    let missing: Vec<String> = named
        .into_iter()
        .filter(|m| !ALERT_METRICS_NOT_EXERCISED.iter().any(|(n, _)| n == m))
        .filter(|m| !matches!(prometheus.samples(&format!("count({m})")), Ok(s) if !s.is_empty()))
        .collect();
    assert!(
        missing.is_empty(),
        "{ALERT_RULES} reads metrics the sidecar does not export: {missing:?}"
    );

    drop(prometheus);
    drop(sidecar);
    drop(http_sidecar);
    drop_schema(&pool, &t.schema).await;
    drop_schema(&pool, &h.schema).await;
}
