//! `make bench` / `make bench-quick`: kdedup's throughput against its ceilings and against
//! the hand-written baseline, measured in one run on one machine.
//!
//! Everything runs against the local services (`scripts/services.sh all`): Postgres on
//! 127.0.0.1:5432 and the tansu broker on 127.0.0.1:19092. kdedup is the release binary
//! (`target/release/kdedup run`), started as a child process the way a pod starts it; the
//! naive baseline is `target/release/examples/naive_consumer`. Every scenario gets fresh
//! topics, groups and schemas (random suffixes); the schemas are dropped at the end.
//!
//! Scenarios (method and caveats in bench/README.md):
//! - L-db: pgbench inserting the rows kdedup writes per event (gate row + outbox row) in
//!   server-side batches: the Postgres ceiling.
//! - L-kafka: one consumer reading the pre-produced input topic from the beginning.
//! - kdedup end to end at 0% and 50% duplicates, with 10M live rows, with the pruner
//!   deleting expired rows (and the same table with the pruner off), peak RSS, latency at
//!   a fixed input rate, and a tuning sweep.
//! - naive: one transaction and one synchronous offset commit per message.
//! - batched: the batched consumer a team writes by hand (bench/batched_consumer.py,
//!   Python): one INSERT ... ON CONFLICT per batch, produce, flush, store offsets; no
//!   outbox. Run right after each end-to-end Kafka-sink run on the same input
//!   (examples/bench/batched.rs).
//! - pgsink: kdedup with the Postgres sink (`KDEDUP_SINK=postgres`, rows into an
//!   application table) against its own ceiling, L-db (postgres sink): pgbench inserting
//!   the gate row + application row per event (examples/bench/pgsink.rs).
//! - httpsink: kdedup with the HTTP sink (`KDEDUP_SINK=http`) posting to an application in
//!   this process: vs the Kafka sink and vs wrk with a no-op application, and vs
//!   concurrency / latency with an application that takes 20 ms (examples/bench/httpsink.rs).
//!
//! Writes the report to bench/RESULTS.md (full) or .tmp/bench/RESULTS-quick.md (--quick).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use rand::{Rng, SeedableRng};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

mod batched;
mod httpsink;
mod passthrough;
mod pgsink;
mod relays;
mod shapes;

/// Input partitions of every bench topic.
const PARTITIONS: i32 = 4;
/// Bytes of each input message value (a JSON document).
const VALUE_BYTES: usize = 256;
/// The dedup scope of every kdedup run and prefill (so prefilled rows share its key space).
const SCOPE: &str = "bench";
/// Default kdedup tuning for the bench (see bench/README.md, "Tuning"). All but the fetch
/// wait and the read-ahead are kdedup's own defaults, set explicitly so that a change of
/// default is visible; those two make up for the test broker (tansu).
const TUNING: &[(&str, &str)] = &[
    ("KDEDUP_BATCH_SIZE", "1000"),
    ("KDEDUP_GATE_LANES", "2"),
    ("KDEDUP_BATCH_LINGER", "1ms"),
    ("KDEDUP_DB_MAX_CONNECTIONS", "4"),
    ("KDEDUP_RELAY_BATCH_SIZE", "2000"),
    // tansu answers a fetch only when fetch.wait.max.ms has passed, even with data
    // waiting (Apache Kafka answers as soon as fetch.min.bytes are there), so the default
    // 500 ms is added to every hop of a live stream.
    ("KDEDUP_KAFKA_FETCH_WAIT_MAX_MS", "20"),
    // tansu fills a fetch response with one partition's backlog, 20,000-40,000 of the
    // bench's messages (10-20 MiB) per partition, where Apache Kafka stops at
    // max.partition.fetch.bytes (1 MiB): the default 8 MiB read-ahead then fills with one
    // lane's partition while the other lane waits (bench/README.md, "The read-ahead").
    ("KDEDUP_READ_AHEAD_BYTES", "33554432"),
    // kdedup's default (librdkafka's own is 64 MiB): 16 MiB, one full batch at the
    // default --batch-max-bytes, is plenty ahead of a gate that takes ~1000 events per
    // transaction, and keeps the sidecar's memory bounded.
    ("KDEDUP_KAFKA_QUEUED_MAX_MESSAGES_KBYTES", "16384"),
];

#[derive(Debug, Parser)]
#[command(about = "kdedup benchmark: writes bench/RESULTS.md")]
struct Args {
    /// Small sizes (under 2 minutes); writes .tmp/bench/RESULTS-quick.md.
    #[arg(long)]
    quick: bool,
    /// Run the tuning sweep (always on in full mode unless --no-sweep).
    #[arg(long)]
    sweep: bool,
    #[arg(long)]
    no_sweep: bool,
    /// Run only these scenarios (comma-separated): ldb,lkafka,sweep,e2e,batched,pgsink,httpsink,naive,prefill,prune,latency,relays,shapes,keys.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Messages per end-to-end run (default: 20000 quick, 300000 full).
    #[arg(long)]
    n: Option<usize>,
    /// Live rows prefilled for the "large table" run (default: 500000 quick, 10000000 full).
    #[arg(long)]
    prefill: Option<u64>,
    /// Expired rows prefilled for the pruner run (default: 300000 quick, 3000000 full).
    #[arg(long)]
    expired: Option<u64>,
    /// Input rate for the latency run when the 0% run is skipped (events/s).
    #[arg(long)]
    latency_rate: Option<f64>,
    /// Extra environment for every kdedup run, KEY=VALUE (repeatable), e.g. -e KDEDUP_BATCH_SIZE=2000.
    #[arg(short = 'e')]
    env: Vec<String>,
    /// Report file (default: bench/RESULTS.md, or .tmp/bench/RESULTS-quick.md with --quick).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run the gate statement experiments (always on in full mode).
    #[arg(long)]
    shapes: bool,
    /// Diagnostics: stop the clock when the events are gated (committed to the outbox)
    /// instead of acknowledged on the output topic; use with -e KDEDUP_RELAY=false to time
    /// the consumer and gate without the relay.
    #[arg(long)]
    until_gated: bool,
    /// Keep the bench schemas (for inspection).
    #[arg(long)]
    keep: bool,
}

/// Sizes of one bench mode.
#[derive(Debug, Clone)]
struct Sizes {
    n: usize,
    prefill: u64,
    expired: u64,
    naive_seconds: f64,
    ldb_seconds: u32,
    latency_seconds: f64,
    lkafka_n: usize,
}

struct Bench {
    args: Args,
    sizes: Sizes,
    root: PathBuf,
    tmp: PathBuf,
    brokers: String,
    db_url: String,
    kdedup_bin: PathBuf,
    naive_bin: PathBuf,
    run_id: String,
    pg: PgPool,
    schemas: Vec<String>,
    topics: Vec<String>,
    extra_env: Vec<(String, String)>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = root.join(".tmp/bench");
    std::fs::create_dir_all(tmp.join("logs"))?;
    let sizes = if args.quick {
        Sizes {
            n: args.n.unwrap_or(50_000),
            prefill: args.prefill.unwrap_or(500_000),
            expired: args.expired.unwrap_or(300_000),
            naive_seconds: 3.0,
            ldb_seconds: 3,
            latency_seconds: 5.0,
            lkafka_n: args.n.unwrap_or(50_000),
        }
    } else {
        Sizes {
            n: args.n.unwrap_or(300_000),
            prefill: args.prefill.unwrap_or(10_000_000),
            expired: args.expired.unwrap_or(3_000_000),
            naive_seconds: 10.0,
            ldb_seconds: 10,
            latency_seconds: 20.0,
            lkafka_n: args.n.unwrap_or(300_000),
        }
    };
    let brokers = std::env::var("KDEDUP_BENCH_BROKERS")
        .or_else(|_| std::env::var("KDEDUP_TEST_BROKERS"))
        .unwrap_or_else(|_| "127.0.0.1:19092".into());
    let db_url = std::env::var("KDEDUP_BENCH_DATABASE_URL")
        .or_else(|_| std::env::var("KDEDUP_TEST_DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let kdedup_bin = root.join("target/release/kdedup");
    let naive_bin = root.join("target/release/examples/naive_consumer");
    for b in [&kdedup_bin, &naive_bin] {
        if !b.exists() {
            bail!(
                "{} is missing: run `cargo build --release --bin kdedup --examples` (make bench does)",
                b.display()
            );
        }
    }
    let pg = PgPoolOptions::new()
        .max_connections(3)
        .connect(&db_url)
        .await
        .with_context(|| format!("cannot reach Postgres at {db_url} (scripts/services.sh all)"))?;
    let mut extra_env = Vec::new();
    for e in &args.env {
        let (k, v) = e.split_once('=').context("-e wants KEY=VALUE")?;
        extra_env.push((k.to_string(), v.to_string()));
    }
    let run_id = format!("{:08x}", rand::rng().random::<u32>());
    let mut bench = Bench {
        args,
        sizes,
        root,
        tmp,
        brokers,
        db_url,
        kdedup_bin,
        naive_bin,
        run_id,
        pg,
        schemas: Vec::new(),
        topics: Vec::new(),
        extra_env,
    };
    let started = Instant::now();
    let mut report = Report::new(&bench).await?;
    let result = bench.run_all(&mut report).await;
    report.total_seconds = started.elapsed().as_secs_f64();
    bench.cleanup().await;
    if let Err(e) = &result {
        report
            .notes
            .push(format!("The run stopped early with an error: {e:#}"));
    }
    let text = report.render(&bench);
    let out = bench.args.out.clone().unwrap_or_else(|| {
        if bench.args.quick {
            bench.tmp.join("RESULTS-quick.md")
        } else {
            bench.root.join("bench/RESULTS.md")
        }
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, &text)?;
    println!("\n{text}");
    println!("written to {}", out.display());
    result
}

impl Bench {
    fn wants(&self, scenario: &str) -> bool {
        self.args.only.is_empty() || self.args.only.iter().any(|s| s == scenario)
    }

    fn name(&self, what: &str) -> String {
        format!("bench_{}_{what}", self.run_id)
    }

    async fn run_all(&mut self, report: &mut Report) -> anyhow::Result<()> {
        let n = self.sizes.n;
        if self.wants("batched") {
            // Before anything is measured: a missing library should not end a long run
            // halfway.
            batched::versions()?;
        }
        if self.wants("ldb") {
            for clients in [1, 2] {
                step(&format!("L-db: pgbench, {clients} client(s)"));
                let r = self.ldb(clients).await?;
                println!("    {:.0} events/s", r.events_per_s);
                report.ldb.push(r);
            }
        }

        let needs_a = [
            "lkafka", "sweep", "e2e", "batched", "pgsink", "httpsink", "naive", "prefill", "prune",
        ]
        .iter()
        .any(|s| self.wants(s));
        let topic_a = self.name("a");
        if needs_a {
            step(&format!(
                "producing {n} messages (0% duplicates) to {topic_a}"
            ));
            let p = self.produce_input(&topic_a, n, 0.0, 1).await?;
            println!("    {:.0} msg/s", p.rate);
            report.produce = Some(p);
        }
        if self.wants("lkafka") {
            // librdkafka's defaults, then the properties kdedup's consumer gets in this bench.
            let tuned = self.kafka_properties();
            for props in [Vec::new(), tuned] {
                let label = if props.is_empty() {
                    "librdkafka defaults".to_string()
                } else {
                    props
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                step(&format!(
                    "L-kafka: plain consumer from the beginning, {label}"
                ));
                let r = self.lkafka(&topic_a, self.sizes.lkafka_n.min(n), &props)?;
                println!("    {:.0} msg/s", r);
                report.lkafka.push((label, r));
            }
        }
        if self.wants("sweep") && (self.args.sweep || (!self.args.quick && !self.args.no_sweep)) {
            for (label, env) in sweep_configs() {
                step(&format!("tuning sweep: {label}"));
                let schema = self.name(&format!("sweep{}", report.sweep.len()));
                let r = self
                    .kdedup(
                        &format!("sweep{}", report.sweep.len()),
                        &topic_a,
                        n,
                        n,
                        &schema,
                        &env,
                    )
                    .await?;
                println!("    {:.0} events/s", r.rate);
                report.sweep.push((label, r));
                self.drop_schema(&schema).await;
            }
        }
        // The 50%-duplicates input, for the Kafka sink's, the batched consumer's and the
        // Postgres sink's runs.
        let topic_b = self.name("b");
        let mut distinct_b = 0;
        if self.wants("e2e") || self.wants("batched") || self.wants("pgsink") {
            step(&format!(
                "producing {n} messages (50% duplicates) to {topic_b}"
            ));
            distinct_b = self.produce_input(&topic_b, n, 0.5, 2).await?.distinct;
        }
        if self.wants("e2e") || self.wants("batched") {
            // Full mode runs each twice, alternating, and the better run counts (as the
            // better L-db pass does): a burst of load from elsewhere then spoils at most one.
            // The batched consumer runs right after kdedup on the same input, so that the
            // two are compared under the same conditions.
            let rounds: &[[(&'static str, &'static str); 2]] = if self.args.quick {
                &[[("e2e0", "batched0"), ("e2e50", "batched50")]]
            } else {
                &[
                    [("e2e0", "batched0"), ("e2e50", "batched50")],
                    [("e2e0b", "batched0b"), ("e2e50b", "batched50b")],
                ]
            };
            for round in rounds {
                for ((kdedup_key, batched_key), dups) in round.iter().zip(["0%", "50%"]) {
                    let (topic, distinct) = if dups == "0%" {
                        (&topic_a, n)
                    } else {
                        (&topic_b, distinct_b)
                    };
                    if self.wants("e2e") {
                        step(&format!("kdedup end to end, {dups} duplicates"));
                        let schema = self.name(kdedup_key);
                        let r = self
                            .kdedup(kdedup_key, topic, n, distinct, &schema, &[])
                            .await?;
                        println!("    {:.0} events/s", r.rate);
                        report.runs.insert(kdedup_key, r);
                        self.drop_schema(&schema).await;
                    }
                    if self.wants("batched") {
                        step(&format!(
                            "hand-written batched consumer (Python), {dups} duplicates"
                        ));
                        let r = self.batched(batched_key, topic, n, distinct).await?;
                        println!("    {:.0} events/s", r.rate);
                        report.batched.insert(batched_key, r);
                    }
                }
            }
        }
        if self.wants("pgsink") {
            self.pgsink_scenario(report, &topic_a, &topic_b, distinct_b)
                .await?;
        }
        if self.wants("httpsink") {
            self.httpsink_scenario(report, &topic_a).await?;
        }
        if self.wants("naive") {
            for mode in ["outbox", "produce"] {
                step(&format!("naive consumer, forward by {mode}"));
                let r = self.naive(&topic_a, mode).await?;
                println!("    {:.0} events/s", r.rate);
                report.naive.push((mode, r));
            }
        }
        if self.wants("prefill") {
            let rows = self.sizes.prefill;
            let schema = self.name("big");
            step(&format!("prefilling {rows} live rows into {schema}"));
            let info = self.prefill(&schema, rows, false).await?;
            println!("    {:.1}s, table {}", info.seconds, mib(info.total_bytes));
            report.prefill = Some(info);
            report.prefill_stats = Some(self.table_stats(&schema).await?);
            step("kdedup end to end, 0% duplicates, large table");
            let r = self.kdedup("big", &topic_a, n, n, &schema, &[]).await?;
            println!("    {:.0} events/s", r.rate);
            report.runs.insert("big", r);
            self.drop_schema(&schema).await;
        }
        if self.wants("prune") {
            let rows = self.sizes.expired;
            let schema = self.name("exp");
            step(&format!(
                "prefilling {rows} expired rows into {schema} (pruner off)"
            ));
            self.prefill(&schema, rows, true).await?;
            step("kdedup end to end, expired rows, pruner off");
            let off = [("KDEDUP_PRUNER".to_string(), "false".to_string())];
            let r = self
                .kdedup("exp_off", &topic_a, n, n, &schema, &off)
                .await?;
            println!("    {:.0} events/s", r.rate);
            report.runs.insert("exp_off", r);
            self.drop_schema(&schema).await;

            let schema = self.name("prune");
            step(&format!(
                "prefilling {rows} expired rows into {schema} (pruner on)"
            ));
            let info = self.prefill(&schema, rows, true).await?;
            let before = self.table_stats(&schema).await?;
            step("kdedup end to end while the pruner deletes expired rows");
            let on = [
                ("KDEDUP_PRUNE_INTERVAL".to_string(), "1s".to_string()),
                ("KDEDUP_PRUNER".to_string(), "true".to_string()),
            ];
            let (r, bloat) = self
                .kdedup_with_prune(&topic_a, n, &schema, &on, rows, info, before)
                .await?;
            println!(
                "    {:.0} events/s, {} rows pruned during the run",
                r.rate, r.pruned_in_window
            );
            report.runs.insert("prune", r);
            report.bloat = Some(bloat);
            self.drop_schema(&schema).await;

            let schema = self.name("paced");
            step(&format!(
                "prefilling {rows} expired rows into {schema} (paced pruner)"
            ));
            self.prefill(&schema, rows, true).await?;
            step("kdedup end to end while a paced pruner (200 ms pause) deletes expired rows");
            let paced = [
                ("KDEDUP_PRUNE_INTERVAL".to_string(), "1s".to_string()),
                ("KDEDUP_PRUNER".to_string(), "true".to_string()),
                ("KDEDUP_PRUNE_PAUSE".to_string(), "200ms".to_string()),
            ];
            let r = self
                .kdedup("paced", &topic_a, n, n, &schema, &paced)
                .await?;
            println!(
                "    {:.0} events/s, {} rows pruned during the run",
                r.rate, r.pruned_in_window
            );
            report.runs.insert("paced", r);
            self.drop_schema(&schema).await;
        }
        if self.wants("latency") {
            let max = report
                .best("e2e0")
                .map(|r| r.rate)
                .or(self.args.latency_rate.map(|r| r * 2.0))
                .unwrap_or(10_000.0);
            let rate = (max / 2.0).round();
            self.latency_runs(report, rate).await?;
        }
        if self.wants("relays") && !self.args.quick {
            let (rounds, n) = (2, 200_000);
            step(&format!(
                "two relays against one: {rounds} rounds of {n} events (bench/relays.py)"
            ));
            report.relays = self.relays(rounds, n)?;
            report.relays_n = n;
            for r in &report.relays {
                println!(
                    "    one replica {:.0} events/s, two {:.0}: {:.2}x",
                    r.one,
                    r.two,
                    r.two / r.one
                );
            }
        }
        if self.wants("ldb") && !self.args.quick {
            for clients in [1, 2] {
                step(&format!("L-db, second pass: pgbench, {clients} client(s)"));
                let mut r = self.ldb(clients).await?;
                r.pass = 2;
                println!("    {:.0} events/s", r.events_per_s);
                report.ldb.push(r);
            }
        }
        if self.wants("keys") {
            let seconds = if self.args.quick { 3 } else { 15 };
            let rows = self.sizes.prefill;
            report.keys = self.key_layouts(rows, seconds).await?;
        }
        if self.wants("shapes") && (self.args.shapes || !self.args.quick) {
            let batch: usize = self.tuning("KDEDUP_BATCH_SIZE").parse()?;
            let seconds = if self.args.quick { 2.0 } else { 3.0 };
            let rounds = if self.args.quick { 1 } else { 3 };
            let list = shapes::shapes();
            report.shapes =
                shapes::measure_all(self, &list, &[0.0, 0.5], batch, seconds, rounds).await?;
            for r in &report.shapes {
                println!(
                    "    {}, {:.0}% dups: {:.0} events/s ({:.0}-{:.0})",
                    r.label,
                    r.dup_ratio * 100.0,
                    r.events_per_s,
                    r.min,
                    r.max
                );
            }
        }
        if self.wants("pgsink") {
            println!("\n{}", report.pgsink_ratio_line().replace("**", ""));
        }
        if self.wants("batched") {
            println!("\n{}", report.batched_ratio_line().replace("**", ""));
        }
        Ok(())
    }

    /// Runs pgbench with `script` in `schema`; returns transactions per second and the
    /// report it printed.
    fn pgbench(
        &self,
        script: &Path,
        schema: &str,
        clients: u32,
        seconds: u32,
    ) -> anyhow::Result<(f64, String)> {
        let out = Command::new(pgbench())
            .args(["-n", "-M", "prepared", "-c", &clients.to_string()])
            .args(["-j", &clients.to_string()])
            .args(["-T", &seconds.to_string()])
            .arg("-f")
            .arg(script)
            .arg(&self.db_url)
            .env("PGOPTIONS", format!("-c search_path={schema}"))
            .output()
            .context("run pgbench")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "pgbench failed: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let tps: f64 = text
            .lines()
            .find(|l| l.starts_with("tps = "))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no tps in pgbench output: {text}"))?;
        Ok((tps, text))
    }

    /// The primary key of processed_events as it was before migration 3 (the two texts)
    /// against the shipped one (the 16-byte `event_key`): the gate's insert (1000 random ids
    /// per transaction, `ON CONFLICT ... DO UPDATE ... WHERE expired`, as in the gate) by
    /// pgbench, on an empty table and on `rows` live rows, two rounds each, alternating.
    async fn key_layouts(&mut self, rows: u64, seconds: u32) -> anyhow::Result<Vec<KeyRun>> {
        const LAYOUTS: [(&str, &str); 2] = [
            ("text", "(scope, event_id) texts (before migration 3)"),
            ("uuid", "event_key uuid (shipped)"),
        ];
        let mut out = Vec::new();
        for live in [0, rows] {
            let mut prepared = Vec::new();
            for (tag, label) in LAYOUTS {
                let schema = self.name(&format!("key{tag}{}", if live == 0 { "e" } else { "f" }));
                if live == 0 {
                    self.migrate(&schema)?;
                } else {
                    step(&format!("prefilling {live} live rows into {schema}"));
                    self.prefill(&schema, live, false).await?;
                }
                let t = format!("\"{schema}\".processed_events");
                if tag == "text" {
                    // The old layout: no event_key (new rows leave it NULL), the texts as key.
                    for sql in [
                        format!("ALTER TABLE {t} DROP CONSTRAINT processed_events_pkey"),
                        format!("ALTER TABLE {t} ALTER COLUMN event_key DROP NOT NULL"),
                        format!("ALTER TABLE {t} ADD CONSTRAINT processed_events_pkey PRIMARY KEY (scope, event_id)"),
                        format!("VACUUM (ANALYZE) {t}"),
                    ] {
                        sqlx::query(&sql).execute(&self.pg).await?;
                    }
                }
                let pk_bytes: i64 = sqlx::query_scalar(&format!(
                    "SELECT pg_relation_size('\"{schema}\".processed_events_pkey')"
                ))
                .fetch_one(&self.pg)
                .await?;
                // As the gate writes it (src/store/gate.rs); here the key is computed by the server
                // (kdedup computes it in the client), which only handicaps the uuid layout.
                let (key_col, key_val, conflict) = if tag == "text" {
                    ("", "", "scope, event_id")
                } else {
                    ("event_key, ", "event_key('{SCOPE}', e), ", "event_key")
                };
                let key_val = key_val.replace("{SCOPE}", SCOPE);
                let script = format!(
                    "INSERT INTO processed_events ({key_col}scope, event_id, source_topic, source_partition,
    source_offset, payload_hash, first_seen_at, expires_at)
SELECT {key_val}'{SCOPE}', e, 'bench-keys', g % {PARTITIONS}, g,
    '\\x00112233445566778899aabbccddeeff'::bytea, now(), now() + interval '7 days'
FROM (SELECT gen_random_uuid()::text AS e, g FROM generate_series(1, 1000) AS g) AS ids
ORDER BY 1
ON CONFLICT ({conflict}) DO UPDATE SET expires_at = EXCLUDED.expires_at
    WHERE processed_events.expires_at <= now();
"
                );
                let path = self.tmp.join(format!("keys-{tag}-{}.sql", self.run_id));
                std::fs::write(&path, script)?;
                prepared.push((tag, label, schema, path, pk_bytes));
            }
            let mut rates: Vec<Vec<f64>> = vec![Vec::new(); prepared.len()];
            for round in 1..=2 {
                for (i, (tag, _, schema, path, _)) in prepared.iter().enumerate() {
                    step(&format!(
                        "key layout {tag}, {live} live rows, round {round}: pgbench for {seconds}s"
                    ));
                    self.checkpoint().await;
                    let (tps, _) = self.pgbench(path, schema, 1, seconds)?;
                    println!("    {:.0} events/s", tps * 1000.0);
                    rates[i].push(tps * 1000.0);
                }
            }
            for ((_, label, schema, _, pk_bytes), rates) in prepared.into_iter().zip(rates) {
                out.push(KeyRun {
                    label,
                    live_rows: live,
                    pk_bytes,
                    rates,
                });
                self.drop_schema(&schema).await;
            }
        }
        Ok(out)
    }

    async fn cleanup(&mut self) {
        if !self.args.keep {
            for s in std::mem::take(&mut self.schemas) {
                self.drop_schema(&s).await;
            }
        }
        if !self.topics.is_empty() {
            // tansu keeps topics in memory: give the memory back.
            if let Ok(admin) = ClientConfig::new()
                .set("bootstrap.servers", &self.brokers)
                .create::<AdminClient<DefaultClientContext>>()
            {
                let names: Vec<&str> = self.topics.iter().map(String::as_str).collect();
                let _ = tokio::time::timeout(
                    Duration::from_secs(20),
                    admin.delete_topics(&names, &AdminOptions::new()),
                )
                .await;
            }
        }
    }

    async fn drop_schema(&self, schema: &str) {
        if self.args.keep {
            return;
        }
        let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .execute(&self.pg)
            .await;
    }

    /// Creates `schema` with kdedup's own migrations (`kdedup migrate`).
    fn migrate(&mut self, schema: &str) -> anyhow::Result<()> {
        self.schemas.push(schema.to_string());
        let out = Command::new(&self.kdedup_bin)
            .arg("migrate")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KDEDUP_DATABASE_URL", &self.db_url)
            .env("KDEDUP_DB_SCHEMA", schema)
            .env("KDEDUP_LOG_FORMAT", "json")
            .output()?;
        if !out.status.success() {
            bail!(
                "kdedup migrate failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    // ---------------------------------------------------------------- L-db

    async fn ldb(&mut self, clients: u32) -> anyhow::Result<Ldb> {
        let schema = self.name(&format!("ldb{clients}"));
        self.migrate(&schema)?;
        let batch: usize = self.tuning("KDEDUP_BATCH_SIZE").parse()?;
        let topic = self.name("a");
        let value = sample_value("00000000-0000-0000-0000-000000000000", 0);
        // The outbox `headers` column: kdedup's encoding of one `event-id` header
        // (src/headers.rs), i.e. count, name length, name, value length, value.
        let mut hdr_prefix = Vec::new();
        hdr_prefix.extend_from_slice(&1u32.to_be_bytes());
        hdr_prefix.extend_from_slice(&8u32.to_be_bytes());
        hdr_prefix.extend_from_slice(b"event-id");
        hdr_prefix.extend_from_slice(&36u32.to_be_bytes());
        let script = format!(
            "WITH ids AS MATERIALIZED (
    -- event_key: kdedup computes it in the client, so here it is a random uuid as well.
    SELECT gen_random_uuid()::text AS event_id, gen_random_uuid() AS event_key, g
    FROM generate_series(1, {batch}) AS g
), gate AS (
    INSERT INTO processed_events (event_key, scope, event_id, source_topic, source_partition,
        source_offset, payload_hash, first_seen_at, expires_at)
    SELECT event_key, '{SCOPE}', event_id, '{topic}', g % {PARTITIONS}, g, decode(md5(event_id), 'hex'),
        now(), now() + interval '7 days'
    FROM ids
)
INSERT INTO outbox (scope, event_id, source_topic, source_partition, source_offset,
    source_timestamp_ms, key, value, headers)
SELECT '{SCOPE}', event_id, '{topic}', g % {PARTITIONS}, g,
    (extract(epoch FROM now()) * 1000)::int8, convert_to('customer-' || (g % 1000), 'UTF8'),
    '\\x{value_hex}'::bytea, '\\x{hdr_hex}'::bytea || convert_to(event_id, 'UTF8')
FROM ids;
",
            value_hex = hex(value.as_bytes()),
            hdr_hex = hex(&hdr_prefix),
        );
        let path = self.tmp.join(format!("ldb-{}.sql", self.run_id));
        std::fs::write(&path, script)?;
        let r = self.ldb_measure(&path, &schema, clients, batch).await;
        self.drop_schema(&schema).await;
        r
    }

    /// One L-db measurement: a checkpoint, then pgbench with `script` (one transaction of
    /// `batch` events) in `schema` for the L-db time.
    async fn ldb_measure(
        &self,
        script: &Path,
        schema: &str,
        clients: u32,
        batch: usize,
    ) -> anyhow::Result<Ldb> {
        self.checkpoint().await;
        let (tps, text) = self.pgbench(script, schema, clients, self.sizes.ldb_seconds)?;
        let latency_ms: f64 = text
            .lines()
            .find(|l| l.starts_with("latency average"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Ok(Ldb {
            pass: 1,
            clients,
            batch,
            tps,
            latency_ms,
            events_per_s: tps * batch as f64,
        })
    }

    /// librdkafka properties of the bench's kdedup configuration (`KDEDUP_KAFKA_*`),
    /// except the test broker's group settings.
    fn kafka_properties(&self) -> Vec<(String, String)> {
        let mut props = BTreeMap::new();
        for (k, v) in TUNING
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain(self.extra_env.iter().cloned())
        {
            if let Some(p) = k.strip_prefix("KDEDUP_KAFKA_") {
                props.insert(p.to_lowercase().replace('_', "."), v);
            }
        }
        props.retain(|_, v| !v.is_empty());
        props.into_iter().collect()
    }

    fn tuning(&self, key: &str) -> String {
        self.extra_env
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .or_else(|| {
                TUNING
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v.to_string())
            })
            .unwrap_or_default()
    }

    /// Cluster-wide WAL and checkpoint counters (pg_stat_wal, pg_stat_bgwriter) and this
    /// database's blocks read from outside shared_buffers.
    async fn pg_snap(&self) -> PgSnap {
        let row: Result<(i64, i64, i64, i64), _> = sqlx::query_as(
            "SELECT w.wal_bytes::int8, w.wal_fpi, b.checkpoints_timed + b.checkpoints_req,
                    d.blks_read
             FROM pg_stat_wal w, pg_stat_bgwriter b, pg_stat_database d
             WHERE d.datname = current_database()",
        )
        .fetch_one(&self.pg)
        .await;
        match row {
            Ok((wal_bytes, fpi, checkpoints, blks_read)) => PgSnap {
                wal_bytes,
                fpi,
                checkpoints,
                blks_read,
            },
            Err(_) => PgSnap::default(),
        }
    }

    async fn checkpoint(&self) {
        // Every measured run starts right after a checkpoint, so none of them pays for the
        // dirty pages of the set-up before it, and all pay the same full-page writes.
        let _ = sqlx::query("CHECKPOINT").execute(&self.pg).await;
    }

    // ---------------------------------------------------------------- Kafka input

    async fn create_topic(&mut self, name: &str, partitions: i32) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()?;
        let results = admin
            .create_topics(
                &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await?;
        for r in results {
            r.map_err(|(t, e)| anyhow::anyhow!("create topic {t}: {e}"))?;
        }
        self.topics.push(name.to_string());
        Ok(())
    }

    /// Produces `n` messages; a share `dup_ratio` of them repeat an id sent shortly before
    /// (within the last ~10000 distinct ids, so mostly in another batch than the first).
    async fn produce_input(
        &mut self,
        topic: &str,
        n: usize,
        dup_ratio: f64,
        seed: u64,
    ) -> anyhow::Result<Produced> {
        self.create_topic(topic, PARTITIONS).await?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("linger.ms", "20")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "200000")
            .create()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // (id, sequence number of its first copy): a duplicate is an exact re-send, with
        // the first copy's key and payload, as a producer retry or a replay makes it.
        let mut ids: Vec<(String, u64)> = Vec::with_capacity(n);
        let started = Instant::now();
        let mut pending = Vec::with_capacity(50_000);
        for seq in 0..n as u64 {
            let dup = !ids.is_empty() && rng.random::<f64>() < dup_ratio;
            let (id, first_seq) = if dup {
                let lo = ids.len().saturating_sub(10_000);
                ids[rng.random_range(lo..ids.len())].clone()
            } else {
                let id = uuid::Uuid::from_u128(rng.random::<u128>())
                    .hyphenated()
                    .to_string();
                ids.push((id.clone(), seq));
                (id, seq)
            };
            let value = sample_value(&id, first_seq);
            let key = format!("customer-{:05}", first_seq % 1000);
            let partition = partition_of(&id);
            let mut record: FutureRecord<'_, String, String> = FutureRecord::to(topic)
                .partition(partition)
                .key(&key)
                .payload(&value)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "event-id",
                    value: Some(id.as_bytes()),
                }));
            loop {
                match producer.send_result(record) {
                    Ok(d) => {
                        pending.push(d);
                        break;
                    }
                    Err((_, back)) => {
                        record = back;
                        producer.poll(Duration::from_millis(5));
                    }
                }
            }
            if pending.len() >= 50_000 {
                for d in pending.drain(..) {
                    d.await?.map_err(|(e, _)| e)?;
                }
            }
        }
        for d in pending.drain(..) {
            d.await?.map_err(|(e, _)| e)?;
        }
        producer.flush(Duration::from_secs(30))?;
        Ok(Produced {
            messages: n,
            distinct: ids.len(),
            rate: n as f64 / started.elapsed().as_secs_f64(),
        })
    }

    /// L-kafka: a consumer with librdkafka's default fetch settings reads `n` messages of
    /// `topic` from the beginning and does nothing with them.
    fn lkafka(&self, topic: &str, n: usize, props: &[(String, String)]) -> anyhow::Result<f64> {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &self.brokers)
            .set("group.id", self.name("lkafka"))
            .set("enable.auto.commit", "false");
        for (k, v) in props {
            cc.set(k, v);
        }
        let c: BaseConsumer = cc.create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        c.assign(&tpl)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut got = 0usize;
        let mut first = None;
        while got < n {
            if Instant::now() > deadline {
                bail!("L-kafka: read only {got} of {n} messages in 120s");
            }
            if let Some(m) = c.poll(Duration::from_millis(100)) {
                let m = m?;
                std::hint::black_box(m.payload());
                first.get_or_insert_with(Instant::now);
                got += 1;
            }
        }
        // The first message is the start: the rate covers the n - 1 that followed it.
        let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
        Ok((n - 1) as f64 / secs.max(1e-9))
    }

    // ---------------------------------------------------------------- kdedup runs

    fn sidecar_env(&self, name: &str, input: &str, schema: &str) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let group = format!("{}-{name}-{}", self.run_id, rand::rng().random::<u16>());
        for (k, v) in [
            ("KDEDUP_BROKERS", self.brokers.clone()),
            ("KDEDUP_GROUP_ID", group.clone()),
            ("KDEDUP_INPUT_TOPICS", input.to_string()),
            ("KDEDUP_OUTPUT_TOPIC", format!("{group}.out")),
            ("KDEDUP_DLQ_TOPIC", format!("{group}.dlq")),
            ("KDEDUP_DATABASE_URL", self.db_url.clone()),
            ("KDEDUP_DB_SCHEMA", schema.to_string()),
            ("KDEDUP_SCOPE", SCOPE.to_string()),
            ("KDEDUP_TOPIC_REPLICATION_FACTOR", "1".to_string()),
            ("KDEDUP_SHUTDOWN_TIMEOUT", "5s".to_string()),
            // A group join on tansu takes session.timeout.ms / 2.
            ("KDEDUP_KAFKA_SESSION_TIMEOUT_MS", "6000".to_string()),
            ("KDEDUP_KAFKA_HEARTBEAT_INTERVAL_MS", "500".to_string()),
            ("KDEDUP_LOG", "info".to_string()),
            ("KDEDUP_LOG_FORMAT", "json".to_string()),
        ] {
            env.insert(k.to_string(), v);
        }
        for (k, v) in TUNING {
            env.insert(k.to_string(), v.to_string());
        }
        for (k, v) in &self.extra_env {
            env.insert(k.clone(), v.clone());
        }
        env
    }

    fn start_sidecar(
        &mut self,
        name: &str,
        input: &str,
        schema: &str,
        extra: &[(String, String)],
    ) -> anyhow::Result<Sidecar> {
        if !self.schemas.iter().any(|s| s == schema) {
            self.schemas.push(schema.to_string());
        }
        let mut env = self.sidecar_env(name, input, schema);
        for (k, v) in extra {
            env.insert(k.clone(), v.clone());
        }
        // An empty value means "leave it at kdedup's (or librdkafka's) default".
        env.retain(|_, v| !v.is_empty());
        // (An extra `KDEDUP_OUTPUT_TOPIC=""` removes the output topic: the Postgres sink.)
        for k in ["KDEDUP_OUTPUT_TOPIC", "KDEDUP_DLQ_TOPIC"] {
            if let Some(t) = env.get(k) {
                self.topics.push(t.clone());
            }
        }
        Sidecar::start(&self.kdedup_bin, &self.tmp, &self.run_id, name, env)
    }

    /// One end-to-end run: `n` messages are already in `input`; kdedup starts, and the
    /// clock runs from the first consumed message to the moment `expect_forwarded` events
    /// were acknowledged on the output topic.
    async fn kdedup(
        &mut self,
        name: &str,
        input: &str,
        n: usize,
        expect_forwarded: usize,
        schema: &str,
        extra: &[(String, String)],
    ) -> anyhow::Result<E2e> {
        self.checkpoint().await;
        let pg0 = self.pg_snap().await;
        let mut side = self.start_sidecar(name, input, schema, extra)?;
        let r = measure(&mut side, n, expect_forwarded, self.args.until_gated).await;
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                let tail = side.log_tail();
                side.stop();
                bail!("{name}: {e:#}\nlog tail:\n{tail}");
            }
        };
        side.stop();
        let mut r = r;
        r.pg = self.pg_snap().await.since(&pg0);
        if !self.args.until_gated && !side.output_topic.is_empty() {
            r.output = self.read_back(&side.output_topic, r.distinct, "kdedup-event-id");
        }
        Ok(r)
    }

    /// The pruner run: like [`Self::kdedup`], then waits for the pruner to finish the
    /// expired rows and measures the table.
    #[allow(clippy::too_many_arguments)]
    async fn kdedup_with_prune(
        &mut self,
        input: &str,
        n: usize,
        schema: &str,
        extra: &[(String, String)],
        expired: u64,
        prefill: Prefill,
        before: TableStats,
    ) -> anyhow::Result<(E2e, Bloat)> {
        self.checkpoint().await;
        let pg0 = self.pg_snap().await;
        let mut side = self.start_sidecar("prune", input, schema, extra)?;
        let mut r = match measure(&mut side, n, n, self.args.until_gated).await {
            Ok(r) => r,
            Err(e) => {
                let tail = side.log_tail();
                side.stop();
                bail!("prune: {e:#}\nlog tail:\n{tail}");
            }
        };
        r.pg = self.pg_snap().await.since(&pg0);
        // Let the pruner finish, then stop kdedup (its backends flush their statistics
        // when they exit) and look at the table.
        let started = Instant::now();
        let limit = Duration::from_secs(if self.args.quick { 60 } else { 300 });
        let mut pruned = 0.0;
        while started.elapsed() < limit {
            pruned = side.metric("kdedup_rows_pruned_total").unwrap_or(pruned);
            if pruned as u64 >= expired {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let prune_wall = side.started.elapsed().as_secs_f64();
        side.stop();
        if !self.args.until_gated {
            r.output = self.read_back(&side.output_topic, r.distinct, "kdedup-event-id");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = self.table_stats(schema).await?;
        let t = Instant::now();
        sqlx::query(&format!("VACUUM \"{schema}\".processed_events"))
            .execute(&self.pg)
            .await?;
        let vacuum_seconds = t.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_millis(700)).await;
        let vacuumed = self.table_stats(schema).await?;
        Ok((
            r,
            Bloat {
                expired,
                pruned_total: pruned as u64,
                prune_seconds: prune_wall,
                prefill,
                before,
                after,
                vacuumed,
                vacuum_seconds,
            },
        ))
    }

    /// Reads the whole output topic back: (messages, distinct values of the `id_header`
    /// header: kdedup's `kdedup-event-id`, or the input's own header for a consumer that
    /// forwards the input's headers as they are).
    fn read_back(&self, topic: &str, expect: usize, id_header: &str) -> Option<Output> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", self.name("readback"))
            .set("enable.auto.commit", "false")
            .create()
            .ok()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(topic, p, Offset::Beginning).ok()?;
        }
        c.assign(&tpl).ok()?;
        let mut ids = std::collections::HashSet::with_capacity(expect);
        let mut messages = 0usize;
        let mut last = Instant::now();
        loop {
            let idle = last.elapsed();
            if (messages >= expect && idle > Duration::from_secs(1))
                || idle > Duration::from_secs(10)
            {
                break;
            }
            match c.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    last = Instant::now();
                    messages += 1;
                    use rdkafka::message::Headers as _;
                    if let Some(h) = m
                        .headers()
                        .and_then(|hs| hs.iter().find(|h| h.key == id_header))
                    {
                        ids.insert(h.value.unwrap_or_default().to_vec());
                    }
                }
                Some(Err(_)) => return None,
                None => {}
            }
        }
        Some(Output {
            messages,
            distinct: ids.len(),
        })
    }

    // ---------------------------------------------------------------- naive

    async fn naive(&mut self, topic: &str, mode: &str) -> anyhow::Result<NaiveRun> {
        let schema = self.name(&format!("naive_{mode}"));
        self.migrate(&schema)?;
        let group = format!("{}-naive-{mode}", self.run_id);
        let output = format!("{group}.out");
        if mode == "produce" {
            self.create_topic(&output, PARTITIONS).await?;
        }
        self.checkpoint().await;
        let log = self
            .tmp
            .join(format!("logs/{}-naive-{mode}.log", self.run_id));
        let out = Command::new(&self.naive_bin)
            .args([
                "--brokers",
                &self.brokers,
                "--topic",
                topic,
                "--group",
                &group,
            ])
            .args(["--database-url", &self.db_url, "--schema", &schema])
            .args([
                "--scope",
                SCOPE,
                "--forward",
                mode,
                "--output-topic",
                &output,
            ])
            .args(["--seconds", &self.sizes.naive_seconds.to_string()])
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .output()
            .context("run naive_consumer")?;
        self.drop_schema(&schema).await;
        let text = stdout_of("naive_consumer", &out, &log)?;
        let v: serde_json::Value = serde_json::from_str(text.trim())
            .with_context(|| format!("naive_consumer printed {text:?}"))?;
        Ok(NaiveRun {
            handled: v["handled"].as_u64().unwrap_or(0),
            seconds: v["elapsed_s"].as_f64().unwrap_or(0.0),
            rate: v["rate"].as_f64().unwrap_or(0.0),
        })
    }

    // ---------------------------------------------------------------- prefill

    /// Creates `schema` with kdedup's migrations and fills `processed_events` with `rows`
    /// rows of the bench scope and random UUID ids, live (expiring in 7 days) or expired.
    /// Indexes are dropped during the load and rebuilt after it (much faster than
    /// maintaining a random-key btree row by row), then the table is vacuumed and analysed,
    /// as a long-lived table would be.
    async fn prefill(&mut self, schema: &str, rows: u64, expired: bool) -> anyhow::Result<Prefill> {
        self.migrate(schema)?;
        let started = Instant::now();
        let t = format!("\"{schema}\".processed_events");
        for sql in [
            format!("ALTER TABLE {t} DROP CONSTRAINT processed_events_pkey"),
            format!("DROP INDEX \"{schema}\".processed_events_expires_at_idx"),
        ] {
            sqlx::query(&sql).execute(&self.pg).await?;
        }
        // Expired rows expire one millisecond apart, an hour or more ago, oldest first.
        let (first_seen, expires) = if expired {
            (
                "now() - interval '8 days' + g * interval '1 ms'",
                "now() - interval '1 day' + g * interval '1 ms' - interval '1 hour'",
            )
        } else {
            ("now()", "now() + interval '7 days'")
        };
        // Two loaders on two connections, 1M rows per statement.
        let chunk = 1_000_000u64;
        let mut ranges = Vec::new();
        let mut lo = 1u64;
        while lo <= rows {
            let hi = (lo + chunk - 1).min(rows);
            ranges.push((lo, hi));
            lo = hi + 1;
        }
        let topic = format!("bench-prefill-{}", self.run_id);
        let key_fn = format!("\"{schema}\".event_key");
        let mut halves: [Vec<(u64, u64)>; 2] = [Vec::new(), Vec::new()];
        for (i, r) in ranges.into_iter().enumerate() {
            halves[i % 2].push(r);
        }
        let load = |part: Vec<(u64, u64)>| {
            let pg = self.pg.clone();
            let sql_t = t.clone();
            let key_fn = key_fn.clone();
            let topic = topic.clone();
            async move {
                for (lo, hi) in part {
                    sqlx::query(&format!(
                        "INSERT INTO {sql_t} (event_key, scope, event_id, source_topic,
                             source_partition, source_offset, payload_hash, first_seen_at,
                             expires_at)
                         SELECT {key_fn}('{SCOPE}', e), '{SCOPE}', e, '{topic}', g % {PARTITIONS},
                             g, decode(md5(g::text), 'hex'), {first_seen}, {expires}
                         FROM (SELECT gen_random_uuid()::text AS e, g
                               FROM generate_series({lo}, {hi}) AS g) AS ids"
                    ))
                    .execute(&pg)
                    .await?;
                }
                anyhow::Ok(())
            }
        };
        let [a, b] = halves;
        let (ra, rb) = tokio::join!(load(a), load(b));
        ra?;
        rb?;
        for sql in [
            format!("ALTER TABLE {t} ADD CONSTRAINT processed_events_pkey PRIMARY KEY (event_key)"),
            format!("CREATE INDEX processed_events_expires_at_idx ON {t} (expires_at)"),
            format!("VACUUM (ANALYZE) {t}"),
        ] {
            sqlx::query(&sql).execute(&self.pg).await?;
        }
        let total_bytes: i64 = sqlx::query_scalar(&format!("SELECT pg_total_relation_size('{t}')"))
            .fetch_one(&self.pg)
            .await?;
        Ok(Prefill {
            rows,
            seconds: started.elapsed().as_secs_f64(),
            total_bytes,
        })
    }

    async fn table_stats(&self, schema: &str) -> anyhow::Result<TableStats> {
        let t = format!("\"{schema}\".processed_events");
        let (total, heap, indexes): (i64, i64, i64) = sqlx::query_as(&format!(
            "SELECT pg_total_relation_size('{t}'), pg_relation_size('{t}'), pg_indexes_size('{t}')"
        ))
        .fetch_one(&self.pg)
        .await?;
        let stat: Option<(i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT n_live_tup, n_dead_tup, autovacuum_count + vacuum_count, n_tup_del
             FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = 'processed_events'",
        )
        .bind(schema)
        .fetch_optional(&self.pg)
        .await?;
        let (live, dead, vacuums, deleted) = stat.unwrap_or((-1, -1, -1, -1));
        let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {t}"))
            .fetch_one(&self.pg)
            .await?;
        Ok(TableStats {
            rows,
            live,
            dead,
            vacuums,
            deleted,
            total,
            heap,
            indexes,
        })
    }

    // ---------------------------------------------------------------- latency

    /// The latency rows at a paced `rate`: on the test broker with the bench's fetch wait,
    /// its floor (the pass-through forwarder) and librdkafka's default fetch wait; on
    /// librdkafka's mock cluster with the bench's fetch wait and its floor; each with
    /// Postgres's `max_wal_size` sized for the run; then, where that sizing changed
    /// anything, once more on the test broker with `max_wal_size` as the server had it.
    async fn latency_runs(&mut self, report: &mut Report, rate: f64) -> anyhow::Result<()> {
        let default_wait = [("KDEDUP_KAFKA_FETCH_WAIT_MAX_MS".to_string(), String::new())];
        let found = self.size_wal_for(rate * self.sizes.latency_seconds).await;
        let sized: [LatencyRow<'_>; 5] = [
            (
                LATENCY_TEST.to_string(),
                &[],
                LatencyBroker::Test,
                Forwarder::Kdedup,
            ),
            (
                LATENCY_PASS_TEST.to_string(),
                &[],
                LatencyBroker::Test,
                Forwarder::PassThrough,
            ),
            (
                "librdkafka's default fetch.wait.max.ms=500".to_string(),
                &default_wait,
                LatencyBroker::Test,
                Forwarder::Kdedup,
            ),
            (
                LATENCY_MOCK.to_string(),
                &[],
                LatencyBroker::Mock,
                Forwarder::Kdedup,
            ),
            (
                LATENCY_PASS_MOCK.to_string(),
                &[],
                LatencyBroker::Mock,
                Forwarder::PassThrough,
            ),
        ];
        let result = self.latency_rows(report, rate, sized).await;
        // Put back whatever happened, before the row that runs as the server had it.
        if let Some(wal) = &found {
            self.restore_wal(wal).await;
            report.latency_wal = Some(wal.raised_to.clone());
        }
        result?;
        if let Some(wal) = found {
            let label = format!(
                "bench tuning, Postgres's max_wal_size left at {}",
                wal.setting
            );
            let row: LatencyRow<'_> = (label, &[], LatencyBroker::Test, Forwarder::Kdedup);
            self.latency_rows(report, rate, [row]).await?;
        }
        Ok(())
    }

    /// Runs each latency row in turn and adds it to the report.
    async fn latency_rows<'a>(
        &mut self,
        report: &mut Report,
        rate: f64,
        rows: impl IntoIterator<Item = LatencyRow<'a>>,
    ) -> anyhow::Result<()> {
        for (label, extra, broker, forwarder) in rows {
            step(&format!(
                "latency at a paced {rate:.0} events/s for {}s, {label}",
                self.sizes.latency_seconds
            ));
            let l = self.latency(rate, extra, broker, forwarder).await?;
            println!(
                "    p50 {:.1} ms, p99 {:.1} ms (output read by a live consumer)",
                l.p50_ms, l.p99_ms
            );
            report.latency.push((label, l));
        }
        Ok(())
    }

    /// Raises Postgres's `max_wal_size` (`ALTER SYSTEM`, a reload) so that a run of
    /// `events` events cannot request a checkpoint by WAL volume: deploy/POSTGRES.md says to
    /// size it for the event rate, and a checkpoint in the middle of a 2-core run takes
    /// the gate below the input rate. Sized at 4 KiB of WAL per event, about five times what
    /// the Kafka sink writes. `None` when the setting is large enough already, or cannot be
    /// changed (the runs then go on as the server is).
    async fn size_wal_for(&self, events: f64) -> Option<WalSetting> {
        const GIB: f64 = (1u64 << 30) as f64;
        let needed_gib = (events * 4096.0 / GIB).ceil().max(1.0) as i64;
        let row: Option<(String, i64, Option<String>)> = sqlx::query_as(
            "SELECT current_setting('max_wal_size'), pg_size_bytes(current_setting('max_wal_size')), \
                    (SELECT sourcefile FROM pg_settings WHERE name = 'max_wal_size')",
        )
        .fetch_optional(&self.pg)
        .await
        .ok()
        .flatten();
        let (setting, bytes, sourcefile) = row?;
        if bytes as f64 >= needed_gib as f64 * GIB {
            return None;
        }
        let raised_to = format!("{needed_gib}GB");
        let wal = WalSetting {
            setting,
            // Set by an earlier ALTER SYSTEM: put that value back, not the file's.
            by_alter_system: sourcefile.is_some_and(|f| f.ends_with("postgresql.auto.conf")),
            raised_to,
        };
        match self
            .set_wal(
                &format!("ALTER SYSTEM SET max_wal_size = '{}'", wal.raised_to),
                &wal.raised_to,
            )
            .await
        {
            Ok(()) => Some(wal),
            Err(e) => {
                println!("    (max_wal_size stays at {}: {e:#})", wal.setting);
                None
            }
        }
    }

    /// Puts `max_wal_size` back as [`Self::size_wal_for`] found it.
    async fn restore_wal(&self, wal: &WalSetting) {
        let statement = match wal.by_alter_system {
            true => format!("ALTER SYSTEM SET max_wal_size = '{}'", wal.setting),
            false => "ALTER SYSTEM RESET max_wal_size".to_string(),
        };
        if let Err(e) = self.set_wal(&statement, &wal.setting).await {
            println!(
                "    WARNING: could not put max_wal_size back to {} ({e:#}); run `{statement}` and `SELECT pg_reload_conf()`",
                wal.setting
            );
        }
    }

    /// Runs an `ALTER SYSTEM` for `max_wal_size`, reloads, and waits until the server
    /// reports `expect`.
    async fn set_wal(&self, statement: &str, expect: &str) -> anyhow::Result<()> {
        sqlx::query(statement).execute(&self.pg).await?;
        sqlx::query("SELECT pg_reload_conf()")
            .execute(&self.pg)
            .await?;
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let now: String = sqlx::query_scalar("SELECT current_setting('max_wal_size')")
                .fetch_one(&self.pg)
                .await?;
            if now == expect {
                return Ok(());
            }
            if Instant::now() > until {
                bail!("the server still reports max_wal_size = {now} after the reload");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Produces at a paced `rate` into a fresh topic while kdedup runs; a live consumer of
    /// the output topic records (time read) - (input timestamp) for every message.
    ///
    /// `broker`: the test broker, or librdkafka's mock cluster, hosted in this process for
    /// the run. The mock answers a fetch at once when it holds data for it, as Apache Kafka
    /// does; the test broker (tansu) holds every fetch for its full `fetch.wait.max.ms`.
    async fn latency(
        &mut self,
        rate: f64,
        extra: &[(String, String)],
        broker: LatencyBroker,
        forwarder: Forwarder,
    ) -> anyhow::Result<Latency> {
        let input = self.name(&format!("lat{}", rand::rng().random::<u16>()));
        let out = format!("{input}.out");
        let mut extra = extra.to_vec();
        let cluster = match broker {
            LatencyBroker::Test => {
                self.create_topic(&input, PARTITIONS).await?;
                if let Forwarder::PassThrough = forwarder {
                    self.create_topic(&out, PARTITIONS).await?;
                }
                None
            }
            LatencyBroker::Mock => {
                let cluster =
                    MockCluster::new(1).context("cannot start librdkafka's mock cluster")?;
                // The mock cluster does not serve CreateTopics: every topic is made here.
                let dlq = format!("{input}.dlq");
                for t in [&input, &out, &dlq] {
                    cluster.create_topic(t, PARTITIONS, 1)?;
                }
                extra.extend([
                    ("KDEDUP_BROKERS".to_string(), cluster.bootstrap_servers()),
                    ("KDEDUP_OUTPUT_TOPIC".to_string(), out.clone()),
                    ("KDEDUP_DLQ_TOPIC".to_string(), dlq),
                    ("KDEDUP_CREATE_TOPICS".to_string(), "false".to_string()),
                ]);
                Some(cluster)
            }
        };
        let brokers = cluster
            .as_ref()
            .map_or_else(|| self.brokers.clone(), |c| c.bootstrap_servers());
        let schema = input.clone();
        self.checkpoint().await;
        let running = match forwarder {
            Forwarder::Kdedup => {
                let topics_before = self.topics.len();
                let side = self.start_sidecar("lat", &input, &schema, &extra)?;
                if cluster.is_some() {
                    // They live in the mock cluster, not on the test broker.
                    self.topics.truncate(topics_before);
                }
                let ready_by = Instant::now() + Duration::from_secs(60);
                while !side.ready() {
                    if Instant::now() > ready_by {
                        let tail = side.log_tail();
                        let mut side = side;
                        side.stop();
                        bail!("latency: kdedup not ready in 60s\n{tail}");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Running::Kdedup(side)
            }
            Forwarder::PassThrough => Running::PassThrough(passthrough::PassThrough::start(
                &brokers,
                &input,
                &out,
                PARTITIONS,
                &self.tuning("KDEDUP_KAFKA_FETCH_WAIT_MAX_MS"),
            )?),
        };
        let seconds = self.sizes.latency_seconds;
        let total = (rate * seconds) as usize;
        let output = match &running {
            Running::Kdedup(side) => side.output_topic.clone(),
            Running::PassThrough(_) => out,
        };
        let reader_brokers = brokers.clone();
        let group = format!("{input}-reader");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            read_latencies(&reader_brokers, &group, &output, total, ready_tx)
        });
        let _ = ready_rx.recv_timeout(Duration::from_secs(20));

        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("linger.ms", "5")
            .create()?;
        // The pass-through forwarder runs in this process: its CPU is "other".
        let pid = match &running {
            Running::Kdedup(side) => side.child.id(),
            Running::PassThrough(_) => 0,
        };
        let cpu0 = CpuSnap::take(pid);
        let start_ms = now_ms();
        let started = Instant::now();
        let mut sent = 0usize;
        let mut pending = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        while sent < total {
            tick.tick().await;
            let due = ((started.elapsed().as_secs_f64() * rate) as usize).min(total);
            while sent < due {
                let id = uuid::Uuid::new_v4().hyphenated().to_string();
                let value = sample_value(&id, sent as u64);
                let key = format!("customer-{:05}", sent % 1000);
                let record: FutureRecord<'_, String, String> = FutureRecord::to(&input)
                    .partition(partition_of(&id))
                    .key(&key)
                    .payload(&value)
                    .headers(OwnedHeaders::new().insert(Header {
                        key: "event-id",
                        value: Some(id.as_bytes()),
                    }));
                match producer.send_result(record) {
                    Ok(d) => pending.push(d),
                    Err((e, _)) => bail!("latency produce: {e}"),
                }
                sent += 1;
            }
        }
        let produce_seconds = started.elapsed().as_secs_f64();
        for d in pending {
            d.await?.map_err(|(e, _)| e)?;
        }
        let samples = tokio::task::spawn_blocking(move || reader.join())
            .await?
            .map_err(|_| anyhow::anyhow!("latency reader panicked"))??;
        let cpu = CpuSnap::take(pid).since(&cpu0);
        let (metrics, peak_rss_kib) = match running {
            Running::Kdedup(mut side) => {
                let found = (side.metrics_text(), side.vm_hwm_kib());
                side.stop();
                self.drop_schema(&schema).await;
                found
            }
            Running::PassThrough(pass) => {
                pass.stop()?;
                (String::new(), None)
            }
        };

        if let Ok(dir) = std::env::var("KDEDUP_BENCH_LATENCY_DUMP") {
            let path = format!("{dir}/latency-{input}.txt");
            let text: String = samples
                .iter()
                .map(|(ts, read)| format!("{} {}\n", ts - start_ms, read - ts))
                .collect();
            std::fs::write(path, text)?;
            if !metrics.is_empty() {
                std::fs::write(format!("{dir}/metrics-{input}.txt"), &metrics)?;
            }
        }
        // The first second is warm-up (fetch sessions, first relay round). The rest, all
        // together and per whole second.
        let mut lat: Vec<i64> = Vec::with_capacity(samples.len());
        let mut seconds: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
        for (ts, read) in samples.iter().filter(|(ts, _)| *ts >= start_ms + 1000) {
            lat.push(read - ts);
            seconds
                .entry((ts - start_ms) / 1000)
                .or_default()
                .push(read - ts);
        }
        lat.sort_unstable();
        // The last second is cut short by the end of the input.
        seconds.pop_last();
        let mut second_p99: Vec<i64> = seconds
            .into_values()
            .map(|mut v| {
                v.sort_unstable();
                quantile(&v, 0.99) as i64
            })
            .collect();
        second_p99.sort_unstable();
        let hist = |stage: &str, q: f64| {
            histogram_quantile(&metrics, "kdedup_latency_seconds", stage, q).map(|s| s * 1000.0)
        };
        Ok(Latency {
            target_rate: rate,
            achieved_rate: sent as f64 / produce_seconds,
            seconds: produce_seconds,
            received: samples.len(),
            sent,
            measured: lat.len(),
            p50_ms: quantile(&lat, 0.50),
            p99_ms: quantile(&lat, 0.99),
            max_ms: lat.last().copied().unwrap_or(0) as f64,
            second_p99_ms: (
                quantile(&second_p99, 0.5),
                second_p99.last().map_or(f64::NAN, |v| *v as f64),
            ),
            commit_p50_ms: hist("input_to_commit", 0.5),
            commit_p99_ms: hist("input_to_commit", 0.99),
            ack_p50_ms: hist("commit_to_ack", 0.5),
            ack_p99_ms: hist("commit_to_ack", 0.99),
            peak_rss_kib,
            cpu,
        })
    }
}

/// The `q` quantile of `sorted` (nearest rank), NaN when it is empty.
fn quantile(sorted: &[i64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize] as f64
}

/// The standard output of a helper program the bench ran (`what`), once it exited 0; its
/// standard error went to `log`.
fn stdout_of(what: &str, out: &std::process::Output, log: &Path) -> anyhow::Result<String> {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {text} (see {})",
            out.status,
            log.display()
        );
    }
    Ok(text)
}

fn step(what: &str) {
    println!("==> {what}");
}

/// The latency row that the p99 target is read from on the test broker.
const LATENCY_TEST: &str = "bench tuning (fetch.wait.max.ms=20)";

/// The latency row run on librdkafka's mock cluster instead of the test broker.
const LATENCY_MOCK: &str =
    "bench tuning, on librdkafka's mock cluster (answers a fetch at once when it has data)";

/// The pass-through forwarder's row on the test broker: the floor of [`LATENCY_TEST`].
const LATENCY_PASS_TEST: &str =
    "no kdedup: a pass-through consumer and producer, same client settings (the broker's floor)";

/// The pass-through forwarder's row on the mock cluster: the floor of [`LATENCY_MOCK`].
const LATENCY_PASS_MOCK: &str =
    "no kdedup: the pass-through, on librdkafka's mock cluster (the broker's floor)";

/// The sweep row that raises librdkafka's prefetch queue back to its 64 MiB default: an
/// experiment on memory, so the peak-RSS target (which is about kdedup as shipped) reports
/// it beside the target rather than in it.
const SWEEP_BIG_PREFETCH: &str = "bench tuning, librdkafka's default prefetch queue (64 MiB)";

/// The input topic's tuning sweep: (label, kdedup environment).
fn sweep_configs() -> Vec<(String, Vec<(String, String)>)> {
    let e = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    // An empty value removes the setting: kdedup's or librdkafka's default applies.
    let all_defaults: Vec<(&str, &str)> = TUNING.iter().map(|(k, _)| (*k, "")).collect();
    vec![
        (
            "kdedup's defaults (batch 1000, 2 gate lanes, 16 MiB prefetch, librdkafka's fetch wait)".into(),
            e(&all_defaults),
        ),
        ("bench tuning (batch 1000, 2 gate lanes)".into(), Vec::new()),
        (
            "bench tuning, 1 gate lane (one gate transaction at a time)".into(),
            e(&[("KDEDUP_GATE_LANES", "1")]),
        ),
        (
            "bench tuning, 4 gate lanes".into(),
            e(&[("KDEDUP_GATE_LANES", "4")]),
        ),
        (
            "bench tuning, batch 500".into(),
            e(&[("KDEDUP_BATCH_SIZE", "500")]),
        ),
        (
            "bench tuning, batch 2000".into(),
            e(&[("KDEDUP_BATCH_SIZE", "2000")]),
        ),
        (
            "bench tuning, batch 2000, linger 50ms, relay batch 5000".into(),
            e(&[
                ("KDEDUP_BATCH_SIZE", "2000"),
                ("KDEDUP_BATCH_LINGER", "50ms"),
                ("KDEDUP_RELAY_BATCH_SIZE", "5000"),
            ]),
        ),
        (
            SWEEP_BIG_PREFETCH.into(),
            e(&[("KDEDUP_KAFKA_QUEUED_MAX_MESSAGES_KBYTES", "65536")]),
        ),
    ]
}

/// A JSON order of exactly VALUE_BYTES bytes.
fn sample_value(id: &str, seq: u64) -> String {
    let head = format!(
        r#"{{"id":"{id}","seq":{seq},"customer":"customer-{:05}","amount_cents":{},"currency":"EUR","note":""#,
        seq % 1000,
        (seq * 7919) % 100_000
    );
    let pad = VALUE_BYTES.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "x".repeat(pad))
}

/// Every copy of an id goes to the same partition, as with a keyed producer.
fn partition_of(id: &str) -> i32 {
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    (h % PARTITIONS as u64) as i32
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

fn mib(bytes: i64) -> String {
    format!("{:.0} MiB", bytes as f64 / 1048576.0)
}

fn pgbench() -> PathBuf {
    if let Ok(out) = Command::new("which").arg("pgbench").output() {
        let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin/pgbench"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| PathBuf::from("pgbench"))
}

/// Reads `output` from the beginning until `total` messages arrived (or 60s passed without
/// one); returns (input timestamp, time read) in ms for each message.
fn read_latencies(
    brokers: &str,
    group: &str,
    output: &str,
    total: usize,
    ready: std::sync::mpsc::Sender<()>,
) -> anyhow::Result<Vec<(i64, i64)>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        // Return fetches at once, so the reader adds little to what it measures.
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(output, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    // Poll once so the fetchers are running before the first input is produced.
    let _ = c.poll(Duration::from_millis(500));
    let _ = ready.send(());
    let mut out = Vec::with_capacity(total);
    let mut last = Instant::now();
    while out.len() < total && last.elapsed() < Duration::from_secs(60) {
        match c.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                let read = now_ms();
                last = Instant::now();
                if let Some(ts) = m.timestamp().to_millis() {
                    out.push((ts, read));
                }
            }
            Some(Err(e)) => bail!("latency reader: {e}"),
            None => {}
        }
    }
    Ok(out)
}

/// `histogram_quantile` over one series of a Prometheus histogram (linear interpolation
/// inside the bucket, as Prometheus does).
fn histogram_quantile(text: &str, name: &str, stage: &str, q: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(&format!("stage=\"{stage}\"")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let v: f64 = l.rsplit_once(' ')?.1.parse().ok()?;
            Some((le, v))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in &buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let span = count - prev.1;
            let frac = if span > 0.0 {
                (rank - prev.1) / span
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, count);
    }
    None
}

// -------------------------------------------------------------------- the sidecar process

struct Sidecar {
    child: Child,
    port: u16,
    log: PathBuf,
    output_topic: String,
    started: Instant,
}

impl Sidecar {
    fn start(
        bin: &Path,
        tmp: &Path,
        run_id: &str,
        name: &str,
        env: BTreeMap<String, String>,
    ) -> anyhow::Result<Sidecar> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = tmp.join(format!("logs/{run_id}-{name}.log"));
        let file = std::fs::File::create(&log)?;
        // Empty for the Postgres sink, which has no output topic.
        let output_topic = env.get("KDEDUP_OUTPUT_TOPIC").cloned().unwrap_or_default();
        let child = Command::new(bin)
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(&env)
            .env("KDEDUP_METRICS_ADDR", format!("127.0.0.1:{port}"))
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()
            .context("spawn kdedup")?;
        Ok(Sidecar {
            child,
            port,
            log,
            output_topic,
            started: Instant::now(),
        })
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], self.port)),
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

    fn metrics_text(&self) -> String {
        self.get("/metrics").map(|(_, t)| t).unwrap_or_default()
    }

    fn metric(&self, series: &str) -> Option<f64> {
        let text = self.get("/metrics")?.1;
        Some(metric_value(&text, series))
    }

    fn ready(&self) -> bool {
        matches!(self.get("/readyz"), Some((200, _)))
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Peak resident set size (VmHWM) so far, in KiB.
    fn vm_hwm_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGTERM, then SIGKILL if it has not exited 20s later.
    fn stop(&mut self) {
        if self.exited() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.exited() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if !self.exited() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sum of every series of `series` (a name without labels) or the one series given with
/// its labels.
fn metric_value(text: &str, series: &str) -> f64 {
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

/// Counters of one kdedup run at one moment.
#[derive(Debug, Clone, Default)]
struct Counters {
    consumed: f64,
    forwarded: f64,
    gated: f64,
    duplicates: f64,
    pruned: f64,
    gate_seconds: f64,
    batches: f64,
    relay_seconds: f64,
    relay_rounds: f64,
    sink_seconds: f64,
    sink_statements: f64,
    sink_rows: f64,
}

impl Counters {
    fn read(text: &str) -> Counters {
        Counters {
            consumed: metric_value(text, "kdedup_events_consumed_total"),
            forwarded: metric_value(text, "kdedup_events_forwarded_total"),
            gated: metric_value(text, "kdedup_events_gated_total"),
            duplicates: metric_value(text, "kdedup_duplicates_total"),
            pruned: metric_value(text, "kdedup_rows_pruned_total"),
            gate_seconds: metric_value(text, "kdedup_batch_duration_seconds_sum"),
            batches: metric_value(text, "kdedup_batch_duration_seconds_count"),
            relay_seconds: metric_value(text, "kdedup_relay_postgres_seconds_total"),
            relay_rounds: metric_value(text, "kdedup_relay_rows_read_back_total"),
            sink_seconds: metric_value(text, "kdedup_sink_statement_duration_seconds_sum"),
            sink_statements: metric_value(text, "kdedup_sink_statement_duration_seconds_count"),
            sink_rows: metric_value(text, "kdedup_sink_rows_written_total"),
        }
    }
}

/// Polls kdedup's /metrics: the clock starts at the first poll that sees a consumed
/// message, and stops at the first poll that sees `expect_forwarded` acknowledged. The
/// rate counts the messages consumed after the first poll, so the poll interval does not
/// inflate it.
async fn measure(
    side: &mut Sidecar,
    n: usize,
    expect_forwarded: usize,
    until_gated: bool,
) -> anyhow::Result<E2e> {
    let timeout = Duration::from_secs(90 + (n / 400) as u64);
    let poll = Duration::from_millis(20);
    let spawned = Instant::now();
    let (t0, c0, cpu0) = loop {
        if spawned.elapsed() > timeout {
            bail!("nothing consumed after {timeout:?}");
        }
        if side.exited() {
            bail!("kdedup exited");
        }
        if let Some((_, text)) = side.get("/metrics") {
            let c = Counters::read(&text);
            if c.consumed > 0.0 {
                break (Instant::now(), c, CpuSnap::take(side.child.id()));
            }
        }
        tokio::time::sleep(poll).await;
    };
    let startup = spawned.elapsed().as_secs_f64();
    let (t1, c1, cpu1) = loop {
        if t0.elapsed() > timeout {
            let c = side
                .get("/metrics")
                .map(|(_, t)| Counters::read(&t))
                .unwrap_or_default();
            bail!(
                "timed out after {timeout:?}: consumed {}/{n}, forwarded {}/{expect_forwarded}",
                c.consumed,
                c.forwarded
            );
        }
        if side.exited() {
            bail!("kdedup exited");
        }
        if let Some((_, text)) = side.get("/metrics") {
            let c = Counters::read(&text);
            let done = if until_gated { c.gated } else { c.forwarded };
            if done as usize >= expect_forwarded && c.consumed as usize >= n {
                // Kept next to the log, for a look at every series after the run.
                let _ = std::fs::write(side.log.with_extension("metrics"), &text);
                break (Instant::now(), c, CpuSnap::take(side.child.id()));
            }
        }
        tokio::time::sleep(poll).await;
    };
    let seconds = (t1 - t0).as_secs_f64();
    let counted = n as f64 - c0.consumed;
    Ok(E2e {
        input: n,
        distinct: expect_forwarded,
        seconds,
        rate: counted / seconds.max(1e-9),
        startup_seconds: startup,
        forwarded: c1.forwarded as u64,
        duplicates: c1.duplicates as u64,
        peak_rss_kib: side.vm_hwm_kib(),
        gate_share: (c1.gate_seconds - c0.gate_seconds) / seconds,
        relay_share: (c1.relay_seconds - c0.relay_seconds) / seconds,
        batches: (c1.batches - c0.batches) as u64,
        relay_rounds: (c1.relay_rounds - c0.relay_rounds) as u64,
        sink_share: (c1.sink_seconds - c0.sink_seconds) / seconds,
        sink_statements: (c1.sink_statements - c0.sink_statements) as u64,
        sink_rows: c1.sink_rows as u64,
        pruned_in_window: (c1.pruned - c0.pruned) as u64,
        cpu: cpu1.since(&cpu0),
        output: None,
        pg: PgSnap::default(),
    })
}

// -------------------------------------------------------------------- CPU accounting

/// CPU time (clock ticks) of the processes that matter, and of the whole machine.
#[derive(Debug, Clone, Default)]
struct CpuSnap {
    at: Option<Instant>,
    machine_busy: u64,
    kdedup: u64,
    postgres: u64,
    tansu: u64,
}

/// Cores used on average over a window, by process group.
#[derive(Debug, Clone, Default)]
struct CpuUse {
    kdedup: f64,
    postgres: f64,
    tansu: f64,
    other: f64,
}

impl CpuSnap {
    fn take(kdedup_pid: u32) -> CpuSnap {
        let mut s = CpuSnap {
            at: Some(Instant::now()),
            ..Default::default()
        };
        if let Ok(stat) = std::fs::read_to_string("/proc/stat") {
            if let Some(line) = stat.lines().next() {
                let f: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal
                if f.len() >= 8 {
                    s.machine_busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
                }
            }
        }
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return s;
        };
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let comm = &stat[open + 1..close];
            let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            // Fields after the command: state is field 3, utime 14, stime 15, and the
            // time of waited-for children cutime 16, cstime 17.
            let field =
                |n: usize| -> u64 { rest.get(n - 3).and_then(|v| v.parse().ok()).unwrap_or(0) };
            let own = field(14) + field(15);
            if pid == kdedup_pid {
                s.kdedup += own;
            } else if comm == "postgres" {
                // The postmaster reaps backends and autovacuum workers, so their CPU time
                // stays counted after they exit (as the postmaster's children's time).
                s.postgres += own + field(16) + field(17);
            } else if comm == "tansu" {
                s.tansu += own;
            }
        }
        s
    }

    fn since(&self, earlier: &CpuSnap) -> CpuUse {
        let secs = match (self.at, earlier.at) {
            (Some(a), Some(b)) => (a - b).as_secs_f64().max(1e-9),
            _ => return CpuUse::default(),
        };
        // Linux reports CPU time in USER_HZ ticks, 100 per second.
        let cores = |a: u64, b: u64| a.saturating_sub(b) as f64 / 100.0 / secs;
        let machine = cores(self.machine_busy, earlier.machine_busy);
        let kdedup = cores(self.kdedup, earlier.kdedup);
        let postgres = cores(self.postgres, earlier.postgres);
        let tansu = cores(self.tansu, earlier.tansu);
        CpuUse {
            kdedup,
            postgres,
            tansu,
            other: (machine - kdedup - postgres - tansu).max(0.0),
        }
    }
}

// -------------------------------------------------------------------- results

struct Ldb {
    pass: u32,
    clients: u32,
    batch: usize,
    tps: f64,
    latency_ms: f64,
    events_per_s: f64,
}

struct Produced {
    messages: usize,
    distinct: usize,
    rate: f64,
}

#[derive(Debug, Clone)]
struct E2e {
    input: usize,
    distinct: usize,
    seconds: f64,
    rate: f64,
    startup_seconds: f64,
    forwarded: u64,
    duplicates: u64,
    peak_rss_kib: Option<u64>,
    gate_share: f64,
    relay_share: f64,
    batches: u64,
    relay_rounds: u64,
    /// Postgres sink: time in the sink statement (`kdedup_sink_statement_duration_seconds`)
    /// / wall time, its runs in the window, and `kdedup_sink_rows_written_total` at the end.
    sink_share: f64,
    sink_statements: u64,
    sink_rows: u64,
    pruned_in_window: u64,
    cpu: CpuUse,
    output: Option<Output>,
    /// Postgres counters over the whole kdedup process (start-up included).
    pg: PgSnap,
}

/// Postgres activity counters (or their difference over a run).
#[derive(Debug, Clone, Default)]
struct PgSnap {
    wal_bytes: i64,
    fpi: i64,
    checkpoints: i64,
    blks_read: i64,
}

impl PgSnap {
    fn since(&self, earlier: &PgSnap) -> PgSnap {
        PgSnap {
            wal_bytes: self.wal_bytes - earlier.wal_bytes,
            fpi: self.fpi - earlier.fpi,
            checkpoints: self.checkpoints - earlier.checkpoints,
            blks_read: self.blks_read - earlier.blks_read,
        }
    }
}

#[derive(Debug, Clone)]
struct Output {
    messages: usize,
    distinct: usize,
}

struct NaiveRun {
    handled: u64,
    seconds: f64,
    rate: f64,
}

#[derive(Debug, Clone)]
struct KeyRun {
    label: &'static str,
    live_rows: u64,
    pk_bytes: i64,
    /// events/s of each round.
    rates: Vec<f64>,
}

struct Prefill {
    rows: u64,
    seconds: f64,
    total_bytes: i64,
}

#[derive(Debug, Clone)]
struct TableStats {
    rows: i64,
    live: i64,
    dead: i64,
    vacuums: i64,
    deleted: i64,
    total: i64,
    heap: i64,
    indexes: i64,
}

struct Bloat {
    expired: u64,
    pruned_total: u64,
    prune_seconds: f64,
    prefill: Prefill,
    before: TableStats,
    after: TableStats,
    vacuumed: TableStats,
    vacuum_seconds: f64,
}

/// Postgres's `max_wal_size` as the latency runs found it, and what they raised it to.
struct WalSetting {
    setting: String,
    by_alter_system: bool,
    raised_to: String,
}

/// One latency run: its label, extra kdedup environment, broker, and what forwards.
type LatencyRow<'a> = (String, &'a [(String, String)], LatencyBroker, Forwarder);

/// What a latency run forwards with, once started (see [`Forwarder`]).
enum Running {
    Kdedup(Sidecar),
    PassThrough(passthrough::PassThrough),
}

/// What reads the latency run's input and writes its output topic.
#[derive(Clone, Copy)]
enum Forwarder {
    Kdedup,
    /// [`passthrough::PassThrough`]: the broker's floor, with no Postgres and no dedup.
    PassThrough,
}

/// Where a latency run's topics live (see [`Bench::latency`]).
#[derive(Clone, Copy)]
enum LatencyBroker {
    Test,
    Mock,
}

struct Latency {
    target_rate: f64,
    achieved_rate: f64,
    seconds: f64,
    sent: usize,
    received: usize,
    measured: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// The p99 of each whole second after the warm-up: the median second's and the
    /// worst second's. One slow second (a stall of the machine, the broker or Postgres)
    /// holds 5% of a 20 s run's samples, and so sets the run's p99 alone.
    second_p99_ms: (f64, f64),
    commit_p50_ms: Option<f64>,
    commit_p99_ms: Option<f64>,
    ack_p50_ms: Option<f64>,
    ack_p99_ms: Option<f64>,
    peak_rss_kib: Option<u64>,
    cpu: CpuUse,
}

struct Report {
    date: String,
    machine: Vec<(String, String)>,
    versions: Vec<(String, String)>,
    ldb: Vec<Ldb>,
    /// L-db (postgres sink): gate row + application row per event.
    ldb_pg: Vec<Ldb>,
    produce: Option<Produced>,
    lkafka: Vec<(String, f64)>,
    sweep: Vec<(String, E2e)>,
    runs: BTreeMap<&'static str, E2e>,
    naive: Vec<(&'static str, NaiveRun)>,
    /// The hand-written batched consumer, by run ("batched0", "batched50", and their
    /// repeats with a "b").
    batched: BTreeMap<&'static str, batched::BatchedRun>,
    prefill: Option<Prefill>,
    prefill_stats: Option<TableStats>,
    bloat: Option<Bloat>,
    latency: Vec<(String, Latency)>,
    /// `max_wal_size` the latency runs had (raised for them), if the bench raised it.
    latency_wal: Option<String>,
    shapes: Vec<shapes::ShapeResult>,
    keys: Vec<KeyRun>,
    /// The HTTP sink scenario.
    http: httpsink::HttpReport,
    /// Two relays against one, per round, and the events of each run.
    relays: Vec<relays::RelayRound>,
    relays_n: usize,
    notes: Vec<String>,
    total_seconds: f64,
}

fn read_first_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|l| l.trim().to_string())
}

fn cargo_lock_version(root: &Path, package: &str) -> Option<String> {
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).ok()?;
    let needle = format!("name = \"{package}\"\nversion = \"");
    let at = lock.find(&needle)? + needle.len();
    Some(lock[at..].split('"').next()?.to_string())
}

impl Report {
    /// The better of a run and its repeat (`<key>b`), if it was repeated.
    fn best(&self, key: &str) -> Option<&E2e> {
        let again = format!("{key}b");
        [self.runs.get(key), self.runs.get(again.as_str())]
            .into_iter()
            .flatten()
            .max_by(|a, b| a.rate.total_cmp(&b.rate))
    }

    async fn new(b: &Bench) -> anyhow::Result<Report> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: u64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        let load = std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ");
        let machine = vec![
            ("CPU".into(), format!("{cores} cores, {model}")),
            (
                "memory".into(),
                format!("{:.1} GiB", mem_kib as f64 / 1048576.0),
            ),
            ("kernel".into(), format!("Linux {kernel}")),
            ("load average at start".into(), load),
        ];

        let kdedup_version =
            read_first_line(b.kdedup_bin.to_str().unwrap_or("kdedup"), &["--version"])
                .unwrap_or_else(|| "unknown".into());
        let commit = read_first_line(
            "git",
            &[
                "-C",
                b.root.to_str().unwrap_or("."),
                "rev-parse",
                "--short",
                "HEAD",
            ],
        )
        .unwrap_or_default();
        let dirty = Command::new("git")
            .args([
                "-C",
                b.root.to_str().unwrap_or("."),
                "status",
                "--porcelain",
                "--untracked-files=no",
                // What the binaries are built from; an edited page of documentation does
                // not make a run "uncommitted".
                "--",
                "src",
                "migrations",
                "examples",
                "Cargo.toml",
                "Cargo.lock",
            ])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        let (_, librdkafka) = rdkafka::util::get_rdkafka_version();
        let pg_version: String = sqlx::query_scalar("SELECT version()")
            .fetch_one(&b.pg)
            .await?;
        let pg_settings: Vec<(String, String)> = sqlx::query_as(
            "SELECT name, current_setting(name) FROM pg_settings
             WHERE name IN ('shared_buffers', 'synchronous_commit', 'max_wal_size', 'fsync', 'wal_level')
             ORDER BY name",
        )
        .fetch_all(&b.pg)
        .await?;
        let tansu = tansu_version().unwrap_or_else(|| "unknown".into());
        let mut versions = vec![
            (
                "kdedup".into(),
                format!(
                    "{kdedup_version} (git {commit}{}), release build",
                    if dirty { " + uncommitted changes" } else { "" }
                ),
            ),
            (
                "rdkafka / librdkafka".into(),
                format!(
                    "rdkafka {} (rdkafka-sys {}) / librdkafka {librdkafka}",
                    cargo_lock_version(&b.root, "rdkafka").unwrap_or_default(),
                    cargo_lock_version(&b.root, "rdkafka-sys").unwrap_or_default()
                ),
            ),
            (
                "sqlx".into(),
                cargo_lock_version(&b.root, "sqlx").unwrap_or_default(),
            ),
            ("Postgres".into(), pg_version),
            (
                "Postgres settings".into(),
                pg_settings
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            (
                "broker".into(),
                format!("{tansu}, in-memory storage, on this machine"),
            ),
            (
                "rustc".into(),
                read_first_line("rustc", &["--version"]).unwrap_or_default(),
            ),
        ];
        if b.wants("batched") {
            // Its librdkafka is the one the Python package bundles, not kdedup's.
            if let Ok(v) = batched::versions() {
                versions.push(("batched consumer".into(), v));
            }
        }
        Ok(Report {
            date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            machine,
            versions,
            ldb: Vec::new(),
            ldb_pg: Vec::new(),
            produce: None,
            lkafka: Vec::new(),
            sweep: Vec::new(),
            runs: BTreeMap::new(),
            naive: Vec::new(),
            batched: BTreeMap::new(),
            prefill: None,
            prefill_stats: None,
            bloat: None,
            latency: Vec::new(),
            latency_wal: None,
            shapes: Vec::new(),
            keys: Vec::new(),
            http: Default::default(),
            relays: Vec::new(),
            relays_n: 0,
            notes: Vec::new(),
            total_seconds: 0.0,
        })
    }

    fn render(&self, b: &Bench) -> String {
        let mut s = String::new();
        let mode = if b.args.quick {
            "`make bench-quick` (small sizes: indicative only)"
        } else {
            "`make bench`"
        };
        let _ = writeln!(s, "# kdedup benchmark results\n");
        let _ = writeln!(
            s,
            "Generated by {mode} on {}, in {:.0} s. Every number below comes from this one run on \
             this one machine; the method, caveats and analysis are in [README.md](README.md).\n",
            self.date, self.total_seconds
        );
        let _ = writeln!(s, "## Machine and versions\n\n| | |\n|---|---|");
        for (k, v) in self.machine.iter().chain(&self.versions) {
            let _ = writeln!(s, "| {k} | {v} |");
        }

        let ldb = self
            .ldb
            .iter()
            .map(|l| l.events_per_s)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        let naive = self
            .naive
            .iter()
            .find(|(m, _)| *m == "outbox")
            .map(|(_, r)| r.rate);
        let e0 = self.best("e2e0").map(|r| r.rate);
        let e50 = self.best("e2e50").map(|r| r.rate);
        let big = self.runs.get("big").map(|r| r.rate);
        let prune = self.runs.get("prune").map(|r| r.rate);
        let off = self.runs.get("exp_off").map(|r| r.rate);
        let rss = self
            .runs
            .values()
            .chain(
                self.sweep
                    .iter()
                    .filter(|(label, _)| label != SWEEP_BIG_PREFETCH)
                    .map(|(_, r)| r),
            )
            .filter_map(|r| r.peak_rss_kib)
            .chain(self.latency.iter().filter_map(|(_, l)| l.peak_rss_kib))
            .max();
        let rss_big_prefetch = self
            .sweep
            .iter()
            .find(|(label, _)| label == SWEEP_BIG_PREFETCH)
            .and_then(|(_, r)| r.peak_rss_kib);

        let n = b.sizes.n;
        let _ = writeln!(s, "\n## Throughput\n");
        let _ = writeln!(
            s,
            "events/s = input messages handled per second. kdedup runs: {n} pre-produced messages \
             ({VALUE_BYTES}-byte JSON value, `event-id` header with a UUID, {PARTITIONS} partitions), \
             timed from the first consumed message to the last output acknowledgement.\n"
        );
        let _ = writeln!(
            s,
            "| scenario | events/s | vs L-db | vs naive | notes |\n|---|---:|---:|---:|---|"
        );
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
            _ => "n/a".into(),
        };
        for l in &self.ldb {
            let _ = writeln!(
                s,
                "| L-db: pgbench, {} client(s), {} events per transaction{} | {:.0} | {} | {} | {:.1} tx/s, {:.1} ms per tx |",
                l.clients, l.batch, if l.pass > 1 { " (second pass, end of run)" } else { "" }, l.events_per_s, ratio(Some(l.events_per_s), ldb), ratio(Some(l.events_per_s), naive), l.tps, l.latency_ms
            );
        }
        for (label, r) in &self.lkafka {
            let r = *r;
            let _ = writeln!(
                s,
                "| L-kafka: one consumer reads the input topic ({label}) | {r:.0} | {} | {} | {} messages from the beginning, no processing |",
                ratio(Some(r), ldb), ratio(Some(r), naive), b.sizes.lkafka_n.min(n)
            );
        }
        for (mode, r) in &self.naive {
            let _ = writeln!(
                s,
                "| naive: 1 transaction + 1 sync offset commit per message, forward by {mode} | {:.0} | {} | {} | {} messages in {:.1} s |",
                r.rate, ratio(Some(r.rate), ldb), ratio(Some(r.rate), naive), r.handled, r.seconds
            );
        }
        self.render_batched_rows(&mut s, ldb, naive);
        let run_row = |s: &mut String, label: &str, key: &str, extra: String| {
            let twice = self.runs.contains_key(format!("{key}b").as_str());
            let extra = if twice {
                format!("{extra}; the better of two runs (both in \"Where the time goes\")")
            } else {
                extra
            };
            if let Some(r) = self.best(key) {
                let _ = writeln!(
                    s,
                    "| {label} | {:.0} | {} | {} | {:.1} s, {} forwarded, peak RSS {}{} |",
                    r.rate,
                    ratio(Some(r.rate), ldb),
                    ratio(Some(r.rate), naive),
                    r.seconds,
                    r.forwarded,
                    r.peak_rss_kib
                        .map_or("n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
                    extra
                );
            }
        };
        run_row(&mut s, "**kdedup, 0% duplicates**", "e2e0", String::new());
        run_row(
            &mut s,
            "kdedup, 50% duplicates",
            "e2e50",
            format!(
                ", {} duplicates",
                self.best("e2e50").map_or(0, |r| r.duplicates)
            ),
        );
        run_row(
            &mut s,
            &format!(
                "kdedup, {} live rows in processed_events",
                human(self.prefill.as_ref().map_or(b.sizes.prefill, |p| p.rows))
            ),
            "big",
            String::new(),
        );
        run_row(
            &mut s,
            &format!(
                "kdedup, {} expired rows, pruner off",
                human(b.sizes.expired)
            ),
            "exp_off",
            String::new(),
        );
        run_row(
            &mut s,
            &format!(
                "kdedup, {} expired rows, pruner on (every 1 s)",
                human(b.sizes.expired)
            ),
            "prune",
            format!(
                ", {} rows pruned during the timed window",
                self.runs.get("prune").map_or(0, |r| r.pruned_in_window)
            ),
        );
        run_row(
            &mut s,
            &format!(
                "kdedup, {} expired rows, pruner on, `KDEDUP_PRUNE_PAUSE=200ms`",
                human(b.sizes.expired)
            ),
            "paced",
            format!(
                ", {} rows pruned during the timed window",
                self.runs.get("paced").map_or(0, |r| r.pruned_in_window)
            ),
        );

        if !self.batched.is_empty() {
            let _ = writeln!(
                s,
                "\nbatched: [bench/batched_consumer.py](batched_consumer.py) (confluent-kafka and psycopg 3), per batch \
                 of up to 1000 messages one `INSERT ... SELECT FROM UNNEST ... ON CONFLICT DO NOTHING RETURNING` into \
                 a table of its own, COMMIT, produce the first-seen messages with an idempotent producer, flush, \
                 store the offsets; no outbox, so not crash-safe. It runs right after kdedup's end-to-end run on \
                 the same input topic, with a fresh group and output topic and the same consumer properties; \
                 timed from the first batch in hand to the last flush, counting the messages after that batch \
                 (as kdedup's are counted after the first poll).\n\n{}",
                self.batched_ratio_line()
            );
        }
        self.render_pgsink(&mut s, b);
        self.render_httpsink(&mut s);

        let _ = writeln!(
            s,
            "\n## Targets\n\n| target | measured | met |\n|---|---:|---|"
        );
        let target = |s: &mut String, what: &str, v: Option<f64>, goal: f64| {
            let (m, ok) = match v {
                Some(v) => (format!("{v:.2}×"), if v >= goal { "yes" } else { "**no**" }),
                None => ("n/a".into(), "n/a"),
            };
            let _ = writeln!(s, "| {what} | {m} | {ok} |");
        };
        let div = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        target(
            &mut s,
            "kdedup ≥ 0.5 × L-db (best client count)",
            div(e0, ldb),
            0.5,
        );
        target(
            &mut s,
            "kdedup with the Postgres sink ≥ 0.7 × L-db (postgres sink), best client count",
            self.pgsink_ratio(),
            pgsink::GOAL,
        );
        for (what, v, goal) in self.httpsink_targets() {
            target(&mut s, &what, v, goal);
        }
        target(
            &mut s,
            "kdedup ≥ 20 × naive (forward by outbox)",
            div(e0, naive),
            20.0,
        );
        for (what, v, goal) in self.batched_targets() {
            target(&mut s, &what, v, goal);
        }
        target(
            &mut s,
            "50% duplicates ≥ 1.0 × 0% duplicates",
            div(e50, e0),
            1.0,
        );
        target(&mut s, "large table ≥ 0.8 × empty table", div(big, e0), 0.8);
        target(
            &mut s,
            "pruner on ≥ 0.8 × pruner off (same expired rows)",
            div(prune, off),
            0.8,
        );
        target(
            &mut s,
            "pruner on ≥ 0.8 × empty table, pruner idle",
            div(prune, e0),
            0.8,
        );
        target(
            &mut s,
            "(tuning) pruner on with `KDEDUP_PRUNE_PAUSE=200ms` ≥ 0.8 × pruner off",
            div(self.runs.get("paced").map(|r| r.rate), off),
            0.8,
        );
        match rss {
            Some(k) => {
                let mib = k as f64 / 1024.0;
                let experiment = rss_big_prefetch
                    .map(|k| {
                        format!(
                            "; the sweep's 64 MiB-prefetch experiment, not counted: {:.1} MiB",
                            k as f64 / 1024.0
                        )
                    })
                    .unwrap_or_default();
                let _ = writeln!(
                    s,
                    "| peak RSS ≤ 100 MiB (highest VmHWM of the kdedup runs at the shipped prefetch size{experiment}) | {mib:.1} MiB | {} |",
                    if mib <= 100.0 { "yes" } else { "**no**" }
                );
            }
            None => {
                let _ = writeln!(s, "| peak RSS ≤ 100 MiB | n/a | n/a |");
            }
        }
        let latency_of = |row: &str| {
            self.latency
                .iter()
                .find(|(label, _)| label == row)
                .map(|(_, l)| l)
        };
        for (row, floor, broker) in [
            (
                LATENCY_TEST,
                LATENCY_PASS_TEST,
                "on the test broker (tansu holds every fetch for its full fetch.wait.max.ms)",
            ),
            (
                LATENCY_MOCK,
                LATENCY_PASS_MOCK,
                "on librdkafka's mock cluster (answers a fetch at once when it has data, as Apache Kafka does)",
            ),
        ] {
            if let Some(l) = latency_of(row) {
                let floor = latency_of(floor).map_or(String::new(), |f| {
                    format!(
                        "; the broker's floor, a pass-through forwarder in the same run: p99 {:.0} ms, median second {:.0} ms",
                        f.p99_ms, f.second_p99_ms.0
                    )
                });
                let _ = writeln!(
                    s,
                    "| latency p99 ≤ 100 ms at half the 0% rate, input timestamp to output read back, {broker} | {:.0} ms (p99 of the median second {:.0} ms, of the worst {:.0} ms{floor}) | {} |",
                    l.p99_ms,
                    l.second_p99_ms.0,
                    l.second_p99_ms.1,
                    if l.p99_ms <= 100.0 { "yes" } else { "**no**" }
                );
            }
        }

        if let Some((_, l0)) = self.latency.first() {
            let _ = writeln!(s, "\n## Latency at a fixed input rate\n");
            let _ = writeln!(
                s,
                "Input produced at a paced {:.0} events/s (half the 0% rate above) for {:.0} s into a fresh topic \
                 (producer linger.ms=5) while kdedup runs. A live consumer of the output topic (fetch.wait.max.ms=10) records, \
                 per message, (time it read the message) − (the input message's timestamp, which the relay keeps on the \
                 output record): that is the primary measure, end to end as an application sees it. The \
                 `kdedup_latency_seconds` histograms of the same run are shown beside it (bucket-interpolated \
                 quantiles, so coarse). The first second is left out as warm-up. \"p99 of each second\" takes the \
                 p99 of each whole second on its own: the median second shows the steady state, the worst one a \
                 stall (one slow second holds 5% of the samples, so it alone sets the run's p99).\n",
                l0.target_rate, l0.seconds
            );
            if let Some(wal) = &self.latency_wal {
                let _ = writeln!(
                    s,
                    "Postgres's `max_wal_size` was raised to {wal} for these runs (`ALTER SYSTEM` and a reload, put \
                     back afterwards), so that no run requests a checkpoint by WAL volume: deploy/POSTGRES.md says to \
                     size it for the event rate. The row that says so ran with it as the server had it.\n"
                );
            }
            let _ = writeln!(
                s,
                "The mock cluster rows run on librdkafka's mock cluster, hosted by the bench process (its CPU is \
                 counted as \"other\"), instead of the test broker: it answers a fetch at once when it has data for \
                 it, where tansu holds every fetch for its full `fetch.wait.max.ms`.\n"
            );
            let _ = writeln!(
                s,
                "The \"no kdedup\" rows are the broker's floor: in place of kdedup, a pass-through forwarder in the \
                 bench process (examples/bench/passthrough.rs) reads the input with kdedup's consumer settings and \
                 produces each message at once to the output topic with kdedup's producer settings, keeping its \
                 timestamp, with no Postgres, no batching and no dedup. The path has the same two broker hops as \
                 kdedup's, read by the same reader: the floor of a consume-and-forward hop with kdedup's client settings \
                 on that broker (it joins no group and commits no offsets).\n"
            );
            let f = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.0} ms"));
            let _ = writeln!(
                s,
                "| run | input rate achieved | read back / sent (measured) | **p50** | **p99** | max | p99 of each second: median / worst | input_to_commit p50 / p99 | commit_to_ack p50 / p99 | peak RSS | CPU kdedup / postgres / tansu / other |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
            );
            for (label, l) in &self.latency {
                let _ = writeln!(
                    s,
                    "| {label} | {:.0}/s | {} / {} ({}) | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} / {:.0} ms | {} / {} | {} / {} | {} | {:.2} / {:.2} / {:.2} / {:.2} |",
                    l.achieved_rate,
                    l.received,
                    l.sent,
                    l.measured,
                    l.p50_ms,
                    l.p99_ms,
                    l.max_ms,
                    l.second_p99_ms.0,
                    l.second_p99_ms.1,
                    f(l.commit_p50_ms),
                    f(l.commit_p99_ms),
                    f(l.ack_p50_ms),
                    f(l.ack_p99_ms),
                    l.peak_rss_kib.map_or("n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
                    l.cpu.kdedup,
                    l.cpu.postgres,
                    l.cpu.tansu,
                    l.cpu.other,
                );
            }
        }

        if !self.shapes.is_empty() {
            let _ = writeln!(s, "\n## Gate statement alone (no Kafka, no relay)\n");
            let _ = writeln!(
                s,
                "The gate transaction driven as `store::gate::gate` drives it (BEGIN, one statement with the batch bound as \
                 arrays, COMMIT), {} events per batch, from a fresh schema, after a warm-up; 50% duplicates = half of \
                 each batch repeats ids gated in earlier batches. Every variant ran {} round(s) of {} s, round-robin, \
                 each on a fresh schema; the table shows the median round and the range. The shipped statement is the library's own (src/store/gate/statement.rs); A–C \
                 are alternatives written for this experiment (bench/README.md explains them).\n",
                b.tuning("KDEDUP_BATCH_SIZE"),
                if b.args.quick { 1 } else { 3 },
                if b.args.quick { 2 } else { 3 },
            );
            let _ = writeln!(
                s,
                "| statement | sessions | 0% dups: events/s (range) | ms/batch | 50% dups: events/s (range) | ms/batch |\n|---|---:|---:|---:|---:|---:|"
            );
            let mut labels: Vec<&str> = Vec::new();
            for r in &self.shapes {
                if !labels.contains(&r.label) {
                    labels.push(r.label);
                }
            }
            for label in labels {
                let get = |d: f64| {
                    self.shapes
                        .iter()
                        .find(|r| r.label == label && (r.dup_ratio - d).abs() < 1e-9)
                };
                let cell = |r: Option<&shapes::ShapeResult>| {
                    r.map_or("n/a | n/a".to_string(), |r| {
                        format!(
                            "{:.0} ({:.0}–{:.0}) | {:.1}",
                            r.events_per_s, r.min, r.max, r.ms_per_batch
                        )
                    })
                };
                let sessions = get(0.0).or(get(0.5)).map_or(1, |r| r.sessions);
                let _ = writeln!(
                    s,
                    "| {label} | {sessions} | {} | {} |",
                    cell(get(0.0)),
                    cell(get(0.5))
                );
            }
            let other = self.shapes.iter().map(|r| r.other_cpu).fold(0.0, f64::max);
            let _ = writeln!(
                s,
                "\nHighest CPU use of other processes (not Postgres, not the harness) in any round: {other:.2} cores."
            );
        }

        if !self.keys.is_empty() {
            let _ = writeln!(
                s,
                "\n## Key representation (processed_events primary key)\n"
            );
            let _ = writeln!(
                s,
                "The gate's insert alone, by pgbench on one connection: 1000 random ids per transaction, \
                 `ON CONFLICT ... DO UPDATE ... WHERE expired` as the gate does, for {} s per round, two rounds per \
                 layout alternating, a `CHECKPOINT` before each. The uuid layout computes `event_key` in the server \
                 here (kdedup computes it in the client). Live rows were prefilled as for the large-table run, \
                 then the old layout's primary key was rebuilt on the two texts.\n",
                if b.args.quick { 3 } else { 15 },
            );
            let _ = writeln!(
                s,
                "| primary key | live rows | primary key size | events/s, round 1 / round 2 | best | vs texts |\n|---|---:|---:|---:|---:|---:|"
            );
            for k in &self.keys {
                let best = k.rates.iter().copied().fold(0.0, f64::max);
                let base = self
                    .keys
                    .iter()
                    .find(|o| o.live_rows == k.live_rows && o.label.starts_with('('))
                    .map(|o| o.rates.iter().copied().fold(0.0, f64::max))
                    .unwrap_or(0.0);
                let rounds: Vec<String> = k.rates.iter().map(|r| format!("{r:.0}")).collect();
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {:.0} | {} |",
                    k.label,
                    human(k.live_rows),
                    mib(k.pk_bytes),
                    rounds.join(" / "),
                    best,
                    if base > 0.0 {
                        format!("{:.2}×", best / base)
                    } else {
                        "n/a".into()
                    }
                );
            }
        }

        let _ = writeln!(s, "\n## Where the time goes in each kdedup run\n");
        let _ = writeln!(
            s,
            "Over the timed window: gate share = time inside the gate transaction \
             (`kdedup_batch_duration_seconds`, summed over the gate lanes, so above 100% while lanes overlap) / wall time; relay share = time the relay waited on Postgres \
             (`kdedup_relay_postgres_seconds_total`: stream locks, checkpoints, read-backs, counter checks; slots are reclaimed beside it) / wall time, \
             with the outbox rows it read back instead of taking them from the lanes in memory (the relay runs concurrently \
             with the gate; before the per-stream relay, its rounds of read-back, produce and delete took 43-45%). CPU = cores used on average, from /proc (this machine has {} cores; \
             \"other\" is everything else on the machine, e.g. builds of other engineers).\n",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let _ = writeln!(
            s,
            "| run | events/s | s | start-up s | batches (avg size) | gate share | relay share | CPU kdedup | CPU postgres | CPU tansu | CPU other | peak RSS | output read back (Postgres sink: table) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let detail = |s: &mut String, label: &str, r: &E2e| {
            let _ = writeln!(
                s,
                "| {label} | {:.0} | {:.1} | {:.1} | {} ({:.0}) | {:.0}% | {:.1}% ({} read back) | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |",
                r.rate,
                r.seconds,
                r.startup_seconds,
                r.batches,
                r.input as f64 / r.batches.max(1) as f64,
                r.gate_share * 100.0,
                r.relay_share * 100.0,
                r.relay_rounds,
                r.cpu.kdedup,
                r.cpu.postgres,
                r.cpu.tansu,
                r.cpu.other,
                r.peak_rss_kib.map_or("n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
                r.output.as_ref().map_or("n/a".into(), |o| format!(
                    "{} {}, {} ids (expected {})",
                    o.messages,
                    // The Postgres sink's runs count the application table's rows.
                    if r.sink_statements > 0 { "table rows" } else { "msgs" },
                    o.distinct,
                    r.distinct
                )),
            );
        };
        for (key, label) in [
            ("e2e0", "0% duplicates"),
            ("e2e0b", "0% duplicates, second run"),
            ("e2e50", "50% duplicates"),
            ("e2e50b", "50% duplicates, second run"),
            ("big", "large table"),
            ("exp_off", "expired rows, pruner off"),
            ("prune", "expired rows, pruner on"),
            ("paced", "expired rows, pruner on, 200 ms pause"),
            ("pgsink0", "Postgres sink, 0% duplicates"),
            ("pgsink0b", "Postgres sink, 0% duplicates, second run"),
            ("pgsink50", "Postgres sink, 50% duplicates"),
            ("pgsink50b", "Postgres sink, 50% duplicates, second run"),
        ] {
            if let Some(r) = self.runs.get(key) {
                detail(&mut s, label, r);
            }
        }
        let _ = writeln!(
            s,
            "\nPostgres work per input event over each kdedup process's life (cluster-wide `pg_stat_wal` and \
             `pg_stat_bgwriter`, so anything else writing to this Postgres at the time is included; blocks read = \
             this database's reads from outside shared_buffers, `pg_stat_database.blks_read`):\n"
        );
        let _ = writeln!(
            s,
            "| run | WAL bytes / event | full-page images / 1000 events | checkpoints during the run | blocks read / 1000 events |\n|---|---:|---:|---:|---:|"
        );
        for (key, label) in [
            ("e2e0", "0% duplicates"),
            ("e2e0b", "0% duplicates, second run"),
            ("e2e50", "50% duplicates"),
            ("e2e50b", "50% duplicates, second run"),
            ("big", "large table"),
            ("exp_off", "expired rows, pruner off"),
            ("prune", "expired rows, pruner on"),
            ("paced", "expired rows, pruner on, 200 ms pause"),
            ("pgsink0", "Postgres sink, 0% duplicates"),
            ("pgsink0b", "Postgres sink, 0% duplicates, second run"),
            ("pgsink50", "Postgres sink, 50% duplicates"),
            ("pgsink50b", "Postgres sink, 50% duplicates, second run"),
        ] {
            if let Some(r) = self.runs.get(key) {
                let per = |v: i64, k: f64| v as f64 * k / r.input.max(1) as f64;
                let _ = writeln!(
                    s,
                    "| {label} | {:.0} | {:.0} | {} | {:.0} |",
                    per(r.pg.wal_bytes, 1.0),
                    per(r.pg.fpi, 1000.0),
                    r.pg.checkpoints,
                    per(r.pg.blks_read, 1000.0),
                );
            }
        }

        self.render_relays(&mut s);

        if !self.sweep.is_empty() {
            let _ = writeln!(s, "\n## Tuning sweep (0% duplicates, same input topic)\n");
            let _ = writeln!(
                s,
                "| settings | events/s | batches (avg size) | gate share | relay share | CPU kdedup | CPU postgres | CPU tansu | peak RSS |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for (label, r) in &self.sweep {
                let _ = writeln!(
                    s,
                    "| {label} | {:.0} | {} ({:.0}) | {:.0}% | {:.0}% | {:.2} | {:.2} | {:.2} | {} |",
                    r.rate,
                    r.batches,
                    r.input as f64 / r.batches.max(1) as f64,
                    r.gate_share * 100.0,
                    r.relay_share * 100.0,
                    r.cpu.kdedup,
                    r.cpu.postgres,
                    r.cpu.tansu,
                    r.peak_rss_kib.map_or("n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
                );
            }
        }

        if let Some(bl) = &self.bloat {
            let _ = writeln!(s, "\n## processed_events after a long prune\n");
            let _ = writeln!(
                s,
                "{} expired rows prefilled ({:.0} s, indexes rebuilt and the table vacuumed after loading); kdedup then ran \
                 with `KDEDUP_PRUNE_INTERVAL=1s` (batches of 5000, 50 ms pause). The pruner deleted {} rows in {:.0} s \
                 from kdedup's start (while it also gated {n} new events), then kdedup was stopped and the table measured; \
                 a manual `VACUUM` (no FULL) followed, taking {:.1} s.\n",
                bl.expired, bl.prefill.seconds, bl.pruned_total, bl.prune_seconds, bl.vacuum_seconds
            );
            let _ = writeln!(
                s,
                "| moment | rows (count) | n_live_tup | n_dead_tup | n_tup_del | vacuums | total size | heap | indexes |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for (label, t) in [
                ("after prefill", &bl.before),
                ("after the prune", &bl.after),
                ("after VACUUM", &bl.vacuumed),
            ] {
                let _ = writeln!(
                    s,
                    "| {label} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    t.rows,
                    t.live,
                    t.dead,
                    t.deleted,
                    t.vacuums,
                    mib(t.total),
                    mib(t.heap),
                    mib(t.indexes)
                );
            }
        }

        let _ = writeln!(s, "\n## Settings\n");
        let _ = writeln!(
            s,
            "- kdedup tuning for every run unless the sweep says otherwise: {}; everything else at its default \
             (pruner every 60 s, TTL 7 d). Test-broker settings: `KDEDUP_KAFKA_SESSION_TIMEOUT_MS=6000`, \
             `KDEDUP_TOPIC_REPLICATION_FACTOR=1`; log level `info`.",
            TUNING
                .iter()
                .map(|(k, v)| format!("`{k}={v}`"))
                .chain(b.extra_env.iter().map(|(k, v)| format!("`{k}={v}` (from -e)")))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(
            s,
            "- sizes: {n} messages per kdedup run, {} live rows prefilled, {} expired rows prefilled, naive runs {} s, \
             pgbench runs {} s, latency run {} s.",
            b.sizes.prefill, b.sizes.expired, b.sizes.naive_seconds, b.sizes.ldb_seconds, b.sizes.latency_seconds
        );
        if let Some(p) = &self.produce {
            let _ = writeln!(
                s,
                "- pre-producing the input ({} messages, {} distinct) ran at {:.0} msg/s.",
                p.messages, p.distinct, p.rate
            );
        }
        if let Some(p) = &self.prefill {
            let _ = writeln!(
                s,
                "- prefill of {} live rows took {:.0} s; processed_events then held {}{}.",
                p.rows,
                p.seconds,
                mib(p.total_bytes),
                self.prefill_stats
                    .as_ref()
                    .map_or(String::new(), |t| format!(
                        " (heap {}, indexes {}: the primary key on event_key and expires_at)",
                        mib(t.heap),
                        mib(t.indexes)
                    ))
            );
        }
        let _ = writeln!(
            s,
            "- a `CHECKPOINT` precedes every timed run, so none pays for the set-up before it."
        );
        for note in &self.notes {
            let _ = writeln!(s, "- {note}");
        }
        s
    }
}

fn human(n: u64) -> String {
    if n >= 1_000_000 && n % 1_000_000 == 0 {
        format!("{}M", n / 1_000_000)
    } else if n >= 1_000 && n % 1_000 == 0 {
        format!("{}k", n / 1_000)
    } else {
        n.to_string()
    }
}

fn tansu_version() -> Option<String> {
    // The running broker's own binary, if it is a local tansu process.
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() == "tansu" {
            if let Ok(exe) = std::fs::read_link(e.path().join("exe")) {
                if let Some(v) = read_first_line(exe.to_str()?, &["--version"]) {
                    return Some(v);
                }
            }
        }
    }
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    read_first_line(home.join("bin/tansu").to_str()?, &["--version"])
}
