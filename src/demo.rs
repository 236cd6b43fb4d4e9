//! `kdedup demo`: the real pipeline (gate, outbox, relay, metrics) against the local
//! Postgres and librdkafka's embedded mock Kafka cluster, fed a stream with duplicates
//! inside batches, across batches and as a re-sent burst. It then reads the output topic
//! back and checks that every distinct id arrived exactly once, in order per partition.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers as _, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::kafka::properties::KafkaProperties;
use crate::metrics::Metrics;
use crate::settings::{DemoSettings, HttpUrl, RunSettings, SinkSettings};

const INPUT: &str = "orders";
const OUTPUT: &str = "orders.dedup";
const PARTITIONS: i32 = 3;

/// What the demo sent, so the output can be checked against it.
struct Sent {
    messages: usize,
    distinct: usize,
    in_batch: usize,
    cross_batch: usize,
    burst: usize,
    without_id: usize,
}

/// Runs the demo. `run_settings` makes the sidecar's settings once the embedded cluster
/// is up: `(bootstrap servers, admin address, (input topic, output topic))`.
pub async fn run<F>(args: DemoSettings, run_settings: F) -> anyhow::Result<()>
where
    F: FnOnce(&str, &str, (&str, &str)) -> anyhow::Result<RunSettings>,
{
    let db = args.db.clone();
    let (url, schema) = (db.url.clone(), db.schema.clone());

    // A fresh schema, so every demo run starts from an empty gate.
    let pool = crate::store::pool(&db)?;
    crate::store::drop_schema(&pool, &schema)
        .await
        .with_context(|| {
            format!("cannot reach Postgres at {url} (start it, or set DATABASE_URL)")
        })?;
    if args.postgres_sink {
        create_app_table(&pool, &args).await?;
    }

    let cluster = MockCluster::new(3).context("cannot start the embedded mock Kafka cluster")?;
    // The mock cluster does not serve CreateTopics, so the demo creates all three here.
    for topic in [INPUT, OUTPUT, &format!("{INPUT}.dlq")] {
        cluster.create_topic(topic, PARTITIONS, 1)?;
    }
    let brokers = cluster.bootstrap_servers();

    let metrics_addr = free_or_ephemeral(&args.metrics_addr).await;
    let mut cfg = run_settings(&brokers, &metrics_addr, (INPUT, OUTPUT))?;
    let receiver = match args.http_sink {
        true => Some(Receiver::start().await?),
        false => None,
    };
    if let (SinkSettings::Http(http), Some(r)) = (&mut cfg.sink, &receiver) {
        http.url = HttpUrl::new(r.url());
    }

    println!("kdedup demo");
    println!(
        "  Kafka: embedded mock cluster (3 brokers), topic `{INPUT}` with {PARTITIONS} partitions"
    );
    println!("  Postgres: {url} (schema {schema}, recreated)");
    let target = match (&receiver, args.postgres_sink) {
        (Some(r), _) => {
            println!("  Sink: http, POST {} (a built-in receiver that applies each Idempotency-Key once)", r.url());
            format!("the receiver at {}", r.url())
        }
        (None, true) => {
            let (app, table) = args.app_table();
            println!("  Sink: postgres, table {app}.{table} (recreated, no unique key: only the gate keeps ids once)");
            format!("{app}.{table}")
        }
        (None, false) => {
            println!("  Sink: kafka, topic `{OUTPUT}`");
            format!("`{OUTPUT}`")
        }
    };
    println!();

    let producer: FutureProducer =
        crate::kafka::producer_config(&brokers, &KafkaProperties::default()).create()?;
    let sent = produce_stream(&producer, args.events).await?;
    println!(
        "  produced {} messages: {} distinct ids, {} duplicates inside a batch, {} across batches, {} in a re-sent burst, {} without an id",
        sent.messages, sent.distinct, sent.in_batch, sent.cross_batch, sent.burst, sent.without_id
    );

    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let app = tokio::spawn(crate::app::run(
        cfg,
        stop.clone(),
        metrics.clone(),
        Some(tx),
    ));
    let running = rx.await.context("the pipeline did not start")?;

    let expected_dups = (sent.messages - sent.distinct - sent.without_id) as u64;
    let elapsed = match wait_until_settled(&metrics, &sent, &app).await {
        Ok(elapsed) => elapsed,
        Err(_) if app.is_finished() => bail!("the pipeline stopped early: {:?}", app.await),
        Err(e) => {
            stop.cancel();
            return Err(e);
        }
    };

    let expect = metrics.events_forwarded.get() as usize;
    let verified = match (&receiver, args.postgres_sink) {
        (Some(r), _) => r.verified(),
        (None, true) => read_table(&pool, &args).await?,
        (None, false) => tokio::task::block_in_place(|| read_output(&brokers, expect))?,
    };
    pool.close().await;
    let ok = report(&metrics, &sent, &verified, elapsed, expected_dups, &target);
    println!();
    if args.hold {
        println!(
            "  metrics: http://{}/metrics  (Ctrl-C to stop)",
            running.admin_addr
        );
        let _ = tokio::signal::ctrl_c().await;
    } else {
        println!(
            "  metrics were served at http://{}/metrics during the run (add --hold to keep them up)",
            running.admin_addr
        );
    }
    stop.cancel();
    app.await??;
    // Clients first, then the cluster they talk to.
    drop(producer);
    drop(cluster);
    if !ok {
        bail!("output verification failed");
    }
    Ok(())
}

/// Waits until everything is consumed, settled and acknowledged on the output topic;
/// returns the time from the first consume.
async fn wait_until_settled(
    metrics: &Metrics,
    sent: &Sent,
    app: &tokio::task::JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut first_consumed: Option<Instant> = None;
    loop {
        let consumed = metrics.consumed_total();
        if consumed > 0 && first_consumed.is_none() {
            first_consumed = Some(Instant::now());
        }
        let settled =
            metrics.events_gated.get() + metrics.duplicates_total() + metrics.dead_lettered_total();
        if consumed as usize >= sent.messages
            && settled >= consumed
            && metrics.events_forwarded.get() >= metrics.events_gated.get()
        {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "timed out: consumed {consumed}/{}, forwarded {}",
                sent.messages,
                metrics.events_forwarded.get()
            );
        }
        if app.is_finished() {
            bail!("the pipeline stopped early");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(first_consumed.map_or(Duration::ZERO, |t| t.elapsed()))
}

/// Prints the counts; true when the output holds every distinct id once, in order.
fn report(
    metrics: &Metrics,
    sent: &Sent,
    verified: &Verified,
    elapsed: Duration,
    expected_dups: u64,
    target: &str,
) -> bool {
    let duplicates = metrics.duplicates_total();
    let forwarded = metrics.events_forwarded.get();
    let rate = sent.messages as f64 / elapsed.as_secs_f64().max(1e-6);

    println!(
        "  consumed                   {:>8}",
        metrics.consumed_total()
    );
    println!(
        "  duplicates avoided         {:>8}   (expected {expected_dups})",
        duplicates
    );
    println!(
        "  forwarded                  {:>8}   (to {target})",
        forwarded
    );
    println!(
        "  dead-lettered              {:>8}   (`{INPUT}.dlq`, reason value_not_json)",
        metrics.dead_lettered_total()
    );
    println!(
        "  output read back           {:>8} {}, {} distinct ids, {} repeats, {}",
        verified.messages,
        verified.unit,
        verified.distinct,
        verified.messages - verified.distinct,
        if !verified.in_order {
            "ORDER BROKEN"
        } else if verified.unit == "rows" {
            "columns match the JSON, input order kept per partition"
        } else if verified.unit == "requests" {
            "input order kept per key, each key applied once"
        } else {
            "input order kept per partition"
        }
    );
    println!(
        "  throughput                 {:>8.0} events/s ({} messages in {:.2}s, first consume to last output ack)",
        rate,
        sent.messages,
        elapsed.as_secs_f64()
    );
    println!();

    let ok = verified.distinct == sent.distinct
        && verified.messages == sent.distinct
        && verified.in_order
        && duplicates == expected_dups;
    if ok {
        println!(
            "  VERIFIED: every distinct id reached {target} exactly once; {duplicates} duplicates never left the gate."
        );
    } else {
        println!("  NOT VERIFIED: the output does not match the input (see the counts above).");
    }
    ok
}

async fn free_or_ephemeral(addr: &str) -> String {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => {
            drop(l);
            addr.to_string()
        }
        Err(_) => "127.0.0.1:0".to_string(),
    }
}

fn record<'a>(id: &'a str, key: &'a str, value: &'a str) -> FutureRecord<'a, str, str> {
    FutureRecord::to(INPUT)
        .key(key)
        .payload(value)
        .headers(OwnedHeaders::new().insert(Header {
            key: "event-id",
            value: Some(id.as_bytes()),
        }))
}

/// Produces `distinct` orders with duplicates: some re-sent at once (same batch), some
/// re-sent later (another batch), the first tenth re-sent as a burst at the end (what a
/// replay or a producer restart does), and a few messages without any id.
async fn produce_stream(producer: &FutureProducer, distinct: usize) -> anyhow::Result<Sent> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut sent = Sent {
        messages: 0,
        distinct,
        in_batch: 0,
        cross_batch: 0,
        burst: 0,
        without_id: 0,
    };
    let mut later: Vec<usize> = Vec::new();
    let mut deliveries = Vec::new();
    let event = |i: usize| {
        let id = format!("order-{i:07}");
        let key = format!("customer-{}", i % 97);
        let value = format!(
            r#"{{"id":"{id}","customer":"{key}","seq":{i},"amount_cents":{}}}"#,
            (i * 7919) % 100_000
        );
        (id, key, value)
    };
    for i in 0..distinct {
        let (id, key, value) = event(i);
        deliveries.push(
            producer
                .send_result(record(&id, &key, &value))
                .map_err(|(e, _)| e)?,
        );
        sent.messages += 1;
        let roll: f64 = rng.random();
        if roll < 0.10 {
            deliveries.push(
                producer
                    .send_result(record(&id, &key, &value))
                    .map_err(|(e, _)| e)?,
            );
            sent.in_batch += 1;
            sent.messages += 1;
        } else if roll < 0.20 {
            later.push(i);
        }
        if i % 2000 == 1999 {
            for j in later.drain(..) {
                let (id, key, value) = event(j);
                deliveries.push(
                    producer
                        .send_result(record(&id, &key, &value))
                        .map_err(|(e, _)| e)?,
                );
                sent.cross_batch += 1;
                sent.messages += 1;
            }
        }
        if i % 5000 == 2500 {
            let bad = FutureRecord::<str, str>::to(INPUT)
                .key("no-id")
                .payload("not json, no event-id header");
            deliveries.push(producer.send_result(bad).map_err(|(e, _)| e)?);
            sent.without_id += 1;
            sent.messages += 1;
        }
        if deliveries.len() >= 10_000 {
            for d in deliveries.drain(..) {
                d.await?.map_err(|(e, _)| e)?;
            }
        }
    }
    for j in later.drain(..) {
        let (id, key, value) = event(j);
        deliveries.push(
            producer
                .send_result(record(&id, &key, &value))
                .map_err(|(e, _)| e)?,
        );
        sent.cross_batch += 1;
        sent.messages += 1;
    }
    for i in 0..distinct / 10 {
        let (id, key, value) = event(i);
        deliveries.push(
            producer
                .send_result(record(&id, &key, &value))
                .map_err(|(e, _)| e)?,
        );
        sent.burst += 1;
        sent.messages += 1;
    }
    for d in deliveries {
        d.await?.map_err(|(e, _)| e)?;
    }
    Ok(sent)
}

/// The demo's application for `--sink http`: listens on a free port of 127.0.0.1,
/// applies each Idempotency-Key once (a repeat is answered 200 and not applied again) and
/// records, per Kafka key (the JSON's `customer`), the `seq` of what it applied.
struct Receiver {
    addr: std::net::SocketAddr,
    state: std::sync::Arc<std::sync::Mutex<ReceiverState>>,
}

#[derive(Default)]
struct ReceiverState {
    requests: usize,
    applied: HashSet<String>,
    ids: HashSet<String>,
    last_seq: HashMap<String, u64>,
    in_order: bool,
}

impl Receiver {
    async fn start() -> anyhow::Result<Receiver> {
        use axum::extract::State;
        use axum::http::{HeaderMap, StatusCode};
        use axum::routing::post;
        type Shared = std::sync::Arc<std::sync::Mutex<ReceiverState>>;
        async fn apply(
            State(state): State<Shared>,
            headers: HeaderMap,
            body: axum::body::Bytes,
        ) -> StatusCode {
            let text = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string()
            };
            let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let mut s = state.lock().expect("receiver lock");
            s.requests += 1;
            if !s.applied.insert(text("idempotency-key")) {
                return StatusCode::OK;
            }
            s.ids.insert(text("kdedup-event-id"));
            let customer = value["customer"].as_str().unwrap_or_default().to_string();
            let seq = value["seq"].as_u64().unwrap_or_default();
            if let Some(prev) = s.last_seq.insert(customer, seq) {
                if prev >= seq {
                    s.in_order = false;
                }
            }
            StatusCode::CREATED
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state: Shared = std::sync::Arc::new(std::sync::Mutex::new(ReceiverState {
            in_order: true,
            ..Default::default()
        }));
        let router = axum::Router::new()
            .route("/events", post(apply))
            .with_state(state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(Receiver { addr, state })
    }

    fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    fn verified(&self) -> Verified {
        let s = self.state.lock().expect("receiver lock");
        Verified {
            unit: "requests",
            messages: s.requests,
            distinct: s.ids.len(),
            in_order: s.in_order,
        }
    }
}

struct Verified {
    /// `messages`, `rows` or `requests`.
    unit: &'static str,
    messages: usize,
    distinct: usize,
    in_order: bool,
}

/// The Postgres sink's table: no unique key, so a second write of an id would show.
async fn create_app_table(pool: &sqlx::PgPool, args: &DemoSettings) -> anyhow::Result<()> {
    let (app, table) = args.app_table();
    crate::store::drop_schema(pool, &app).await?;
    for stmt in [
        format!("CREATE SCHEMA \"{app}\""),
        format!(
            "CREATE TABLE \"{app}\".\"{table}\" (
                id text NOT NULL,
                customer text NOT NULL,
                seq bigint NOT NULL,
                amount_cents bigint NOT NULL,
                event_id text NOT NULL,
                source_partition int NOT NULL,
                source_offset bigint NOT NULL,
                produced_at timestamptz,
                written_at timestamptz NOT NULL DEFAULT now()
            )"
        ),
    ] {
        sqlx::query(&stmt).execute(pool).await?;
    }
    Ok(())
}

/// Reads the table back: ids unique, every row's columns what its JSON said (the demo's
/// events are a function of `seq`), metadata filled, and `seq` rising with the source
/// offset in each partition.
async fn read_table(pool: &sqlx::PgPool, args: &DemoSettings) -> anyhow::Result<Verified> {
    let (app, table) = args.app_table();
    let (rows, distinct, wrong, out_of_order): (i64, i64, i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*), count(DISTINCT id),
                count(*) FILTER (WHERE id <> 'order-' || lpad(seq::text, 7, '0')
                                    OR event_id <> id
                                    OR customer <> 'customer-' || (seq % 97)
                                    OR amount_cents <> (seq * 7919) % 100000
                                    OR produced_at IS NULL),
                count(*) FILTER (WHERE prev_seq >= seq)
         FROM (SELECT *, lag(seq) OVER (PARTITION BY source_partition ORDER BY source_offset) AS prev_seq
               FROM \"{app}\".\"{table}\") t"
    ))
    .fetch_one(pool)
    .await?;
    Ok(Verified {
        unit: "rows",
        messages: rows as usize,
        distinct: distinct as usize,
        in_order: wrong == 0 && out_of_order == 0,
    })
}

/// Reads the whole output topic and checks ids are unique and `seq` rises per partition.
fn read_output(brokers: &str, expect: usize) -> anyhow::Result<Verified> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "kdedup-demo-verify")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(OUTPUT, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut ids = HashSet::new();
    let mut last_seq: HashMap<i32, u64> = HashMap::new();
    let mut in_order = true;
    let mut messages = 0usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut idle_since = Instant::now();
    while Instant::now() < deadline {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            if messages >= expect && idle_since.elapsed() > Duration::from_millis(500) {
                break;
            }
            continue;
        };
        let m = m?;
        idle_since = Instant::now();
        messages += 1;
        let id = m
            .headers()
            .and_then(|hs| hs.iter().find(|h| h.key == "kdedup-event-id"))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        ids.insert(id);
        let value: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
        let seq = value["seq"].as_u64().unwrap_or_default();
        // Output partition = input partition, and first sightings were produced with
        // rising seq, so seq must rise within each output partition.
        if let Some(prev) = last_seq.insert(m.partition(), seq) {
            if prev >= seq {
                in_order = false;
            }
        }
    }
    Ok(Verified {
        unit: "messages",
        messages,
        distinct: ids.len(),
        in_order,
    })
}
