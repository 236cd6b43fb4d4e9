//! The `kdedup` binary as a child process: `kdedup run` as the sidecar Kubernetes runs,
//! and one-shot commands whose output the tests read.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{database_url, free_port, http_get, log_dir, metric_value, Cluster};

/// Settings for one sidecar process.
#[derive(Clone)]
pub struct SidecarConfig {
    pub env: BTreeMap<String, String>,
}

impl SidecarConfig {
    /// The sidecar on the shared broker (`KDEDUP_BROKERS` can be set to another).
    pub fn new(group: &str, input: &str, output: &str, schema: &str) -> Self {
        let mut env = BTreeMap::new();
        for (k, v) in [
            ("KDEDUP_BROKERS", Cluster::shared().brokers),
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

    pub fn unset(mut self, k: &str) -> Self {
        self.env.remove(k);
        self
    }

    /// The Postgres sink writing with `statement` (`KDEDUP_SINK_TABLE` or
    /// `KDEDUP_SINK_SQL`), no output topic.
    pub fn postgres_sink(self, setting: &str, statement: &str) -> Self {
        self.unset("KDEDUP_OUTPUT_TOPIC")
            .set("KDEDUP_SINK", "postgres")
            .set(setting, statement)
    }
}

impl SidecarConfig {
    /// The HTTP sink posting to `url`, no output topic; short timeouts, backoffs and
    /// leases, so that retries and takeovers happen within a test.
    pub fn http_sink(self, url: &str) -> Self {
        self.unset("KDEDUP_OUTPUT_TOPIC")
            .set("KDEDUP_SINK", "http")
            .set("KDEDUP_HTTP_URL", url)
            .set("KDEDUP_HTTP_TIMEOUT", "1s")
            .set("KDEDUP_HTTP_BACKOFF", "50ms")
            .set("KDEDUP_HTTP_MAX_BACKOFF", "1s")
            .set("KDEDUP_HTTP_LEASE", "4s")
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

/// A one-shot `kdedup <args>` with the sidecar's environment, quieter and with its admin
/// server (if any) on a free port.
fn one_shot(cfg: &SidecarConfig, args: &[&str]) -> Command {
    let mut c = kdedup(cfg, args);
    c.env("KDEDUP_METRICS_ADDR", "127.0.0.1:0")
        .env("KDEDUP_LOG", "warn");
    // A replay ends a partition without a trustworthy end once it delivered nothing for
    // --idle-timeout (3 s); one short of a known end waits 30 s itself. The test broker
    // lists an end inside the last record batch, so a topic kdedup wrote in batches (a
    // dead-letter topic) has no trustworthy end there, and under the whole suite that
    // broker has paused a partition for longer than 3 s: 20 s, unless the test sets its
    // own. A healthy replay ends at its end and never waits for it.
    if args.first() == Some(&"replay") && !args.contains(&"--idle-timeout") {
        c.args(["--idle-timeout", "20s"]);
    }
    c
}

/// Runs a one-shot `kdedup <args>` with the sidecar's environment; (exit code, stdout, stderr).
pub fn kdedup_command(cfg: &SidecarConfig, args: &[&str]) -> (Option<i32>, String, String) {
    capture(&mut one_shot(cfg, args)).parts()
}

/// A one-shot `kdedup <args>` started with the sidecar's environment and `env` on top,
/// its output collected while it runs.
pub fn kdedup_spawn(cfg: &SidecarConfig, args: &[&str], env: &[(&str, &str)]) -> Capturing {
    Capturing::spawn(one_shot(cfg, args).envs(env.iter().copied()))
}

/// The number on a summary line such as `  forwarded     12`.
pub fn summary_value(text: &str, label: &str) -> usize {
    text.lines()
        .find(|l| l.trim_start().starts_with(label))
        .and_then(|l| l.split_whitespace().find_map(|w| w.parse().ok()))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{text}"))
}

/// How a process ended and what it printed.
pub struct Captured {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Captured {
    /// stdout followed by stderr.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// (exit code, stdout, stderr).
    pub fn parts(self) -> (Option<i32>, String, String) {
        (self.code, self.stdout, self.stderr)
    }
}

/// Runs `cmd` to its end with its output captured.
pub fn capture(cmd: &mut Command) -> Captured {
    let out = cmd.output().expect("run kdedup");
    Captured {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A child process whose stdout and stderr are collected while it runs (so that a test
/// can read them before it exits, and a chatty process never blocks on a full pipe).
/// Killed on drop if still running.
pub struct Capturing {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Capturing {
    pub fn spawn(cmd: &mut Command) -> Capturing {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kdedup");
        let collect = |mut from: Box<dyn Read + Send>| {
            let text = Arc::new(Mutex::new(String::new()));
            let sink = text.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
            text
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Capturing {
            child,
            stdout,
            stderr,
        }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        sigterm(&self.child);
    }

    /// Waits for the exit and returns what it printed. Kills it and fails after `timeout`.
    pub async fn finish(mut self, timeout: Duration) -> Captured {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for kdedup") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "kdedup still running after {timeout:?}; stdout:\n{}\nstderr:\n{}",
                    self.stdout.lock().unwrap(),
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Let the reader threads drain the closed pipes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let stdout = self.stdout.lock().unwrap().clone();
        Captured {
            code: status.code(),
            stdout,
            stderr: self.stderr(),
        }
    }
}

impl Drop for Capturing {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends SIGTERM to `child` (what the kubelet sends to stop a container).
fn sigterm(child: &Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
}

/// A running `kdedup run` process.
pub struct Sidecar {
    pub child: Child,
    pub metrics_port: u16,
    pub log: PathBuf,
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

    /// The process has not exited.
    pub fn child_running(&self) -> bool {
        // `try_wait` needs `&mut`; /proc tells without reaping.
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and returns the exit code.
    pub fn sigterm(&mut self, timeout: Duration) -> Option<i32> {
        sigterm(&self.child);
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
