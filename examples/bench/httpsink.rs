//! The HTTP sink scenario (`--only httpsink`): kdedup with `KDEDUP_SINK=http` posting to
//! an application in this process (axum on 127.0.0.1), measured in the same run as what
//! it is compared with:
//! - with a no-op application (answers 204 at once): the HTTP sink end to end vs the Kafka
//!   sink end to end on the same 0%-duplicates input, and vs `wrk` driving the same
//!   application with the same request (a POST of a bench value) at the same concurrency;
//! - with an application that takes 20 ms per request, on an input of 6 partitions:
//!   throughput vs the ceiling concurrency / latency.
//!
//! The application counts the requests and the distinct Idempotency-Keys it got; after
//! each kdedup run both must equal the distinct input ids.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;

use super::{sample_value, step, Bench, E2e, Report};

/// `KDEDUP_HTTP_CONCURRENCY` of every run, and wrk's connections.
const CONCURRENCY: usize = 64;
/// The slow application's time per request.
const SLOW: Duration = Duration::from_millis(20);
/// Input partitions of the slow-application run.
const SLOW_PARTITIONS: i32 = 6;
/// Targets: HTTP sink / Kafka sink, HTTP sink / wrk, slow run / (concurrency / latency).
const GOAL_VS_KAFKA: f64 = 0.5;
const GOAL_VS_WRK: f64 = 0.5;
const GOAL_SLOW: f64 = 0.8;

/// What the scenario measured.
#[derive(Debug, Default)]
pub(super) struct HttpReport {
    /// The HTTP sink with the no-op application, 0% duplicates.
    noop: Option<E2e>,
    /// wrk against the no-op application: requests/s.
    wrk: Option<f64>,
    wrk_note: Option<String>,
    /// The HTTP sink with the 20 ms application.
    slow: Option<E2e>,
    slow_n: usize,
}

/// The application: counts requests and distinct keys; waits `latency` before its 204.
#[derive(Clone)]
struct App {
    addr: std::net::SocketAddr,
    state: Arc<Mutex<(usize, HashSet<String>)>>,
}

impl App {
    async fn start(latency: Duration) -> anyhow::Result<App> {
        use axum::extract::State;
        use axum::http::{HeaderMap, StatusCode};
        type Shared = (Arc<Mutex<(usize, HashSet<String>)>>, Duration);
        async fn handle(
            State((state, latency)): State<Shared>,
            headers: HeaderMap,
            _body: axum::body::Bytes,
        ) -> StatusCode {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            let mut s = state.lock().expect("app lock");
            s.0 += 1;
            if let Some(k) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
                s.1.insert(k.to_string());
            }
            StatusCode::NO_CONTENT
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new((0, HashSet::new())));
        let router = axum::Router::new()
            .route("/events", axum::routing::post(handle))
            .with_state((state.clone(), latency));
        // A runtime of its own: the harness's runtime blocks in its /metrics polls, and
        // an application sharing it would answer late for reasons of the harness's own.
        std::thread::Builder::new()
            .name("bench-app".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("the application's runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                    let _ = axum::serve(listener, router).await;
                });
            })?;
        Ok(App { addr, state })
    }

    fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    /// (requests, distinct Idempotency-Keys) so far.
    fn counts(&self) -> (usize, usize) {
        let s = self.state.lock().expect("app lock");
        (s.0, s.1.len())
    }

    fn reset(&self) {
        *self.state.lock().expect("app lock") = (0, HashSet::new());
    }
}

impl Bench {
    /// The whole scenario (see the module docs). `kafka_e2e` is the Kafka sink's 0%
    /// run of this bench, measured here when the run has none.
    pub(super) async fn httpsink_scenario(
        &mut self,
        report: &mut Report,
        topic_a: &str,
    ) -> anyhow::Result<()> {
        let n = self.sizes.n;
        if !report.runs.contains_key("e2e0") {
            step("kdedup end to end, 0% duplicates (Kafka sink, for the HTTP sink's ratio)");
            let schema = self.name("e2e0");
            let r = self.kdedup("e2e0", topic_a, n, n, &schema, &[]).await?;
            println!("    {:.0} events/s", r.rate);
            report.runs.insert("e2e0", r);
            self.drop_schema(&schema).await;
        }
        let noop = App::start(Duration::ZERO).await?;
        step(&format!(
            "kdedup, HTTP sink, no-op application, {CONCURRENCY} in flight"
        ));
        let r = self.kdedup_http("http0", topic_a, n, &noop).await?;
        println!("    {:.0} events/s", r.rate);
        report.http.noop = Some(r);

        step(&format!(
            "wrk, the same application and request, {CONCURRENCY} connections"
        ));
        match self.wrk(&noop).await {
            Ok(rps) => {
                println!("    {rps:.0} requests/s");
                report.http.wrk = Some(rps);
            }
            Err(e) => {
                println!("    skipped: {e:#}");
                report.http.wrk_note = Some(format!("wrk did not run: {e:#}"));
            }
        }

        let slow_n = (n / 5).clamp(10_000, 60_000);
        let topic = self.name("http6");
        step(&format!(
            "producing {slow_n} messages to {topic} ({SLOW_PARTITIONS} partitions)"
        ));
        self.produce_simple(&topic, slow_n).await?;
        let slow = App::start(SLOW).await?;
        step(&format!(
            "kdedup, HTTP sink, application taking {} ms, {CONCURRENCY} in flight",
            SLOW.as_millis()
        ));
        let r = self.kdedup_http("http20", &topic, slow_n, &slow).await?;
        println!(
            "    {:.0} events/s (ceiling {:.0})",
            r.rate,
            CONCURRENCY as f64 / SLOW.as_secs_f64()
        );
        report.http.slow = Some(r);
        report.http.slow_n = slow_n;
        Ok(())
    }

    /// One HTTP-sink run against `app`; checks that the application got one request per
    /// distinct id, each with its own key.
    async fn kdedup_http(
        &mut self,
        key: &str,
        input: &str,
        n: usize,
        app: &App,
    ) -> anyhow::Result<E2e> {
        app.reset();
        let schema = self.name(key);
        let extra: Vec<(String, String)> = [
            ("KDEDUP_SINK", "http".to_string()),
            ("KDEDUP_HTTP_URL", app.url()),
            ("KDEDUP_HTTP_CONCURRENCY", CONCURRENCY.to_string()),
            // Below the bench's 5 s KDEDUP_SHUTDOWN_TIMEOUT.
            ("KDEDUP_HTTP_TIMEOUT", "2s".to_string()),
            ("KDEDUP_HTTP_LEASE", "30s".to_string()),
            // No output topic with this sink (kdedup exits 64 if one is set): "" removes it.
            ("KDEDUP_OUTPUT_TOPIC", String::new()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let r = self.kdedup(key, input, n, n, &schema, &extra).await;
        self.drop_schema(&schema).await;
        let r = r.with_context(|| format!("{key} (HTTP sink)"))?;
        let (requests, keys) = app.counts();
        if requests != n || keys != n {
            bail!("{key}: the application got {requests} requests with {keys} distinct keys for {n} distinct ids");
        }
        Ok(r)
    }

    /// wrk against `app` with the request kdedup sends (POST, a bench value, JSON), for
    /// 10 s (3 s quick); requests/s.
    async fn wrk(&self, app: &App) -> anyhow::Result<f64> {
        let script = self.tmp.join("wrk-post.lua");
        let body = sample_value("00000000-0000-0000-0000-000000000000", 1);
        std::fs::write(
            &script,
            format!(
                "wrk.method = \"POST\"\nwrk.body = {body:?}\nwrk.headers[\"Content-Type\"] = \"application/json\"\n\
                 wrk.headers[\"Idempotency-Key\"] = \"00000000-0000-0000-0000-000000000000\"\n"
            ),
        )?;
        let seconds = if self.args.quick { 3 } else { 10 };
        let url = app.url();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("wrk")
                .args([
                    "-t2",
                    &format!("-c{CONCURRENCY}"),
                    &format!("-d{seconds}s"),
                    "-s",
                ])
                .arg(&script)
                .arg(&url)
                .output()
        })
        .await?
        .context("run wrk (apt-get install wrk)")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
        }
        text.lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no Requests/sec in wrk's output: {text}"))
    }

    /// `n` distinct events (0% duplicates) round-robin over [`SLOW_PARTITIONS`]
    /// partitions of a new topic `topic`.
    async fn produce_simple(&mut self, topic: &str, n: usize) -> anyhow::Result<()> {
        self.create_topic(topic, SLOW_PARTITIONS).await?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("linger.ms", "20")
            .set("queue.buffering.max.messages", "200000")
            .create()?;
        let started = Instant::now();
        let mut pending = Vec::with_capacity(n);
        for seq in 0..n as u64 {
            let id = format!("00000000-0000-4000-8000-{seq:012}");
            let value = sample_value(&id, seq);
            let key = format!("customer-{:05}", seq % 1000);
            let record: FutureRecord<'_, String, String> = FutureRecord::to(topic)
                .partition((seq % SLOW_PARTITIONS as u64) as i32)
                .key(&key)
                .payload(&value)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "event-id",
                    value: Some(id.as_bytes()),
                }));
            pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
        }
        for d in pending {
            d.await?.map_err(|(e, _)| e)?;
        }
        producer.flush(Duration::from_secs(30))?;
        if started.elapsed() > Duration::from_secs(120) {
            bail!("producing {n} messages took {:?}", started.elapsed());
        }
        Ok(())
    }
}

impl Report {
    pub(super) fn render_httpsink(&self, s: &mut String) {
        let h = &self.http;
        if h.noop.is_none() && h.slow.is_none() {
            return;
        }
        let _ = writeln!(s, "\n## HTTP sink\n");
        let _ = writeln!(
            s,
            "`KDEDUP_SINK=http`, `KDEDUP_HTTP_CONCURRENCY={CONCURRENCY}`, no output topic: each first-seen \
             event is POSTed to an application in the bench process (axum on 127.0.0.1) behind the status \
             gate (a `PROCESSING` row in the gate statement, one grouped update to `PROCESSED`). Same clock \
             as the other runs; it stops when `kdedup_events_forwarded_total` (for this sink, `PROCESSED` \
             written) reaches the distinct ids, and the application must then have counted exactly one \
             request and one distinct Idempotency-Key per id. wrk: `wrk -t2 -c{CONCURRENCY}` with the same \
             POST (a bench value, JSON) against the same no-op application.\n"
        );
        let _ = writeln!(
            s,
            "| scenario | events/s | compared with | ratio | goal |\n|---|---:|---|---:|---:|"
        );
        let kafka = self.best("e2e0").map(|r| r.rate);
        let ratio = |a: f64, b: Option<f64>| match b {
            Some(b) if b > 0.0 => format!("{:.2}×", a / b),
            _ => "n/a".into(),
        };
        if let Some(r) = &h.noop {
            let _ = writeln!(
                s,
                "| HTTP sink, no-op application | {:.0} | Kafka sink end to end, {} events/s | {} | ≥ {GOAL_VS_KAFKA}× |",
                r.rate,
                kafka.map_or("n/a".into(), |k| format!("{k:.0}")),
                ratio(r.rate, kafka)
            );
            let _ = writeln!(
                s,
                "| HTTP sink, no-op application | {:.0} | wrk, {} requests/s | {} | ≥ {GOAL_VS_WRK}× |",
                r.rate,
                h.wrk.map_or("n/a".into(), |w| format!("{w:.0}")),
                ratio(r.rate, h.wrk)
            );
        }
        if let Some(r) = &h.slow {
            let ceiling = CONCURRENCY as f64 / SLOW.as_secs_f64();
            let _ = writeln!(
                s,
                "| HTTP sink, application taking {} ms, {SLOW_PARTITIONS} partitions, {} events | {:.0} | concurrency / latency = {ceiling:.0}/s | {} | ≥ {GOAL_SLOW}× |",
                SLOW.as_millis(),
                h.slow_n,
                r.rate,
                ratio(r.rate, Some(ceiling))
            );
        }
        if let Some(note) = &h.wrk_note {
            let _ = writeln!(s, "\n{note}");
        }
    }

    /// The scenario's targets: (what, measured ratio, goal).
    pub(super) fn httpsink_targets(&self) -> Vec<(String, Option<f64>, f64)> {
        let h = &self.http;
        let noop = h.noop.as_ref().map(|r| r.rate);
        let div = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        vec![
            (
                format!("HTTP sink (no-op app) ≥ {GOAL_VS_KAFKA} × Kafka sink end to end"),
                div(noop, self.best("e2e0").map(|r| r.rate)),
                GOAL_VS_KAFKA,
            ),
            (
                format!("HTTP sink (no-op app) ≥ {GOAL_VS_WRK} × wrk at the same concurrency"),
                div(noop, h.wrk),
                GOAL_VS_WRK,
            ),
            (
                format!(
                    "HTTP sink (app taking {} ms) ≥ {GOAL_SLOW} × concurrency / latency",
                    SLOW.as_millis()
                ),
                div(
                    h.slow.as_ref().map(|r| r.rate),
                    Some(CONCURRENCY as f64 / SLOW.as_secs_f64()),
                ),
                GOAL_SLOW,
            ),
        ]
    }
}
