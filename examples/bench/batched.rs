//! The batched baseline (`--only batched`): [`bench/batched_consumer.py`], the batched
//! dedup consumer a capable team writes by hand in an afternoon (Python, confluent-kafka
//! and psycopg 3): per batch of 1000 one `INSERT ... SELECT FROM UNNEST ... ON CONFLICT DO
//! NOTHING RETURNING`, COMMIT, produce the first-seen events with an idempotent producer,
//! flush, store the offsets. No outbox, so not crash-safe: what kdedup's outbox and relay
//! buy costs it nothing.
//!
//! It runs right after each of kdedup's end-to-end Kafka-sink runs on the same input topic
//! (0% and 50% duplicates) with a fresh group, schema and output topic and the consumer
//! properties kdedup's runs get; its output is read back and must hold every distinct id
//! once. The goal: kdedup at least [`GOAL`] × its rate, in the same run.
//!
//! [`bench/batched_consumer.py`]: ../../bench/batched_consumer.py

use std::fmt::Write as _;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use rand::Rng;

use super::{Bench, Report, PARTITIONS};

/// kdedup end to end / the batched consumer, on the same input in the same run.
pub(super) const GOAL: f64 = 1.5;
/// The script, relative to the repository.
const SCRIPT: &str = "bench/batched_consumer.py";
/// Where the bench's input carries the event id (and kdedup's default `--id-from` reads it).
const ID_HEADER: &str = "event-id";

/// One run of the batched consumer.
#[derive(Debug, Clone)]
pub(super) struct BatchedRun {
    consumed: u64,
    forwarded: u64,
    duplicates: u64,
    batches: u64,
    seconds: f64,
    pub(super) rate: f64,
    startup_seconds: f64,
    /// Cores the Python process used over the timed window (the interpreter and
    /// librdkafka's threads).
    cpu_cores: f64,
    /// Output read back: (messages, distinct event ids), against `distinct` input ids.
    output: (usize, usize),
    distinct: usize,
}

/// The Python the bench runs the script with: the one on PATH, which
/// scripts/bench-python.sh installs the client libraries into.
pub(super) fn python() -> &'static str {
    "python3"
}

/// The interpreter's and the client libraries' versions, or why they cannot be imported.
pub(super) fn versions() -> anyhow::Result<String> {
    let out = Command::new(python())
        .args([
            "-c",
            "import sys, confluent_kafka, psycopg; \
             print(f'Python {sys.version.split()[0]}, confluent-kafka {confluent_kafka.version()} \
             (librdkafka {confluent_kafka.libversion()[0]}), psycopg {psycopg.__version__} ({psycopg.pq.__impl__})')",
        ])
        .output()
        .with_context(|| format!("run {}", python()))?;
    if !out.status.success() {
        bail!(
            "the batched consumer needs confluent-kafka and psycopg in {}: run scripts/bench-python.sh \
             (make bench does): {}",
            python(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Bench {
    /// One run of the batched consumer on `input` (`n` messages, `distinct` ids), from
    /// the beginning, in a fresh group with a fresh schema and output topic.
    pub(super) async fn batched(
        &mut self,
        key: &str,
        input: &str,
        n: usize,
        distinct: usize,
    ) -> anyhow::Result<BatchedRun> {
        let schema = self.name(key);
        self.schemas.push(schema.clone());
        let group = format!("{}-{key}-{}", self.run_id, rand::rng().random::<u16>());
        let output = format!("{group}.out");
        self.create_topic(&output, PARTITIONS).await?;
        self.checkpoint().await;
        let log = self.tmp.join(format!("logs/{}-{key}.log", self.run_id));
        let mut cmd = Command::new(python());
        cmd.arg(self.root.join(SCRIPT))
            .args(["--brokers", &self.brokers, "--topic", input])
            .args(["--group", &group, "--output-topic", &output])
            .args(["--database-url", &self.db_url, "--schema", &schema])
            .args(["--id-header", ID_HEADER, "--count", &n.to_string()]);
        // The consumer properties of kdedup's runs (the test broker's fetch wait, the
        // prefetch bound), so that both read the input the same way.
        for (k, v) in self.kafka_properties() {
            cmd.arg("-X").arg(format!("{k}={v}"));
        }
        let out = cmd
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .output()
            .with_context(|| format!("run {SCRIPT}"))?;
        self.drop_schema(&schema).await;
        let text = super::stdout_of(SCRIPT, &out, &log)?;
        let v: serde_json::Value = serde_json::from_str(text.trim())
            .with_context(|| format!("{SCRIPT} printed {text:?}"))?;
        let num = |k: &str| v[k].as_f64().unwrap_or(0.0);
        let Some(read) = self.read_back(&output, distinct, ID_HEADER) else {
            bail!("{key}: could not read the output topic {output} back");
        };
        // Every distinct input id once: anything else and its rate means nothing.
        if read.messages != distinct || read.distinct != distinct {
            bail!(
                "{key}: the output topic holds {} messages with {} distinct ids; expected {distinct} of each",
                read.messages,
                read.distinct
            );
        }
        Ok(BatchedRun {
            consumed: num("consumed") as u64,
            forwarded: num("forwarded") as u64,
            duplicates: num("duplicates") as u64,
            batches: num("batches") as u64,
            seconds: num("seconds"),
            rate: num("events_per_s"),
            startup_seconds: num("startup_s"),
            cpu_cores: num("cpu_cores"),
            output: (read.messages, read.distinct),
            distinct,
        })
    }
}

impl Report {
    /// The better of a batched run and its repeat (`<key>b`), if it was repeated.
    pub(super) fn best_batched(&self, key: &str) -> Option<&BatchedRun> {
        let again = format!("{key}b");
        [self.batched.get(key), self.batched.get(again.as_str())]
            .into_iter()
            .flatten()
            .max_by(|a, b| a.rate.total_cmp(&b.rate))
    }

    /// kdedup end to end / the batched consumer at 0% or 50% duplicates (`"0"`, `"50"`).
    pub(super) fn batched_ratio(&self, dups: &str) -> Option<f64> {
        let k = self.best(&format!("e2e{dups}"))?;
        let b = self.best_batched(&format!("batched{dups}"))?;
        (b.rate > 0.0).then(|| k.rate / b.rate)
    }

    /// One line on the goal, for RESULTS.md and the console.
    pub(super) fn batched_ratio_line(&self) -> String {
        let part = |dups: &str| match (
            self.best(&format!("e2e{dups}")),
            self.best_batched(&format!("batched{dups}")),
            self.batched_ratio(dups),
        ) {
            (Some(k), Some(b), Some(r)) => format!(
                "{dups}% duplicates {:.0} / {:.0} = **{r:.2}×** ({})",
                k.rate,
                b.rate,
                if r >= GOAL { "met" } else { "not met" }
            ),
            _ => format!("{dups}% duplicates n/a (needs the e2e and batched scenarios)"),
        };
        format!(
            "kdedup end to end / hand-written batched consumer, same input, same run (goal ≥ {GOAL}×): {}; {}.",
            part("0"),
            part("50")
        )
    }

    /// The batched consumer's rows of the throughput table.
    pub(super) fn render_batched_rows(&self, s: &mut String, ldb: Option<f64>, naive: Option<f64>) {
        let vs = |a: f64, b: Option<f64>| match b {
            Some(b) if b > 0.0 => format!("{:.2}×", a / b),
            _ => "n/a".into(),
        };
        for dups in ["0", "50"] {
            let key = format!("batched{dups}");
            let Some(r) = self.best_batched(&key) else {
                continue;
            };
            let twice = self.batched.contains_key(format!("{key}b").as_str());
            let _ = writeln!(
                s,
                "| batched: hand-written batched consumer (Python), {dups}% duplicates | {:.0} | {} | {} | \
                 {:.1} s, {} consumed, {} forwarded, {} duplicates, {} batches, {:.2} cores (its own process), \
                 start-up {:.1} s; output read back: {} msgs, {} ids (expected {}); kdedup / batched = {}{} |",
                r.rate,
                vs(r.rate, ldb),
                vs(r.rate, naive),
                r.seconds,
                r.consumed,
                r.forwarded,
                r.duplicates,
                r.batches,
                r.cpu_cores,
                r.startup_seconds,
                r.output.0,
                r.output.1,
                r.distinct,
                self.batched_ratio(dups)
                    .map_or("n/a".into(), |v| format!("{v:.2}×")),
                if twice { "; the better of two runs" } else { "" },
            );
        }
    }

    /// Rows of the targets table: (what, measured, goal).
    pub(super) fn batched_targets(&self) -> Vec<(String, Option<f64>, f64)> {
        ["0", "50"]
            .into_iter()
            .map(|d| {
                (
                    format!("kdedup ≥ {GOAL} × hand-written batched consumer, {d}% duplicates"),
                    self.batched_ratio(d),
                    GOAL,
                )
            })
            .collect()
    }
}
