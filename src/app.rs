//! `kdedup run`: wires the pieces together and owns the shutdown order.
//!
//! Start: admin server (so probes answer at once), Postgres + migrations (retried: the
//! database may come up after the sidecar), topics, then consumer, relay and health
//! checks. Stop: the pipeline finishes or abandons its batch and commits durable offsets,
//! then the relay publishes what is left in the outbox, all within `--shutdown-timeout`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdkafka::producer::FutureProducer;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin::{self, Health};
use crate::config::RunConfig;
use crate::db;
use crate::kafka::{self, ConsumerState};
use crate::metrics::Metrics;
use crate::pipeline::{Gate, Origin, Pipeline};
use crate::relay::Relay;
use crate::retry::Backoff;

/// Handles a caller needs while the sidecar runs (tests read metrics through them).
pub struct Running {
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub admin_addr: std::net::SocketAddr,
}

/// Runs the sidecar until `stop` fires, then drains. `started` receives the handles once
/// the admin server is listening.
pub async fn run(
    cfg: RunConfig,
    stop: CancellationToken,
    metrics: Metrics,
    started: Option<tokio::sync::oneshot::Sender<Running>>,
) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    metrics
        .ttl_seconds
        .set(i64::try_from(cfg.ttl.as_secs()).unwrap_or(i64::MAX));
    let health = Arc::new(Health::default());
    let admin_stop = CancellationToken::new();
    let (admin_addr, admin_task) = admin::serve(
        cfg.metrics_addr,
        metrics.clone(),
        health.clone(),
        admin_stop.clone(),
    )
    .await
    .with_context(|| format!("cannot listen on --metrics-addr {}", cfg.metrics_addr))?;
    info!(addr = %admin_addr, "admin server listening (/metrics, /livez, /readyz)");
    if let Some(tx) = started {
        let _ = tx.send(Running {
            metrics: metrics.clone(),
            health: health.clone(),
            admin_addr,
        });
    }

    // One connection first: settings the server refuses (TLS, login, database) end the
    // start here with the fix named; an unreachable server is waited for.
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        match db::check_connection(&cfg.db).await? {
            Ok(security) => {
                log_connection_security(&cfg.db, &security);
                break;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                      database_url = crate::config::redact_url(&cfg.db.url),
                      "connecting to Postgres failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    let pool = db::pool(&cfg.db)?;
    if cfg.migrate_on_start {
        if !retry_until(&stop, "applying migrations", || {
            db::migrate(&pool, &cfg.db.schema)
        })
        .await
        {
            return Ok(());
        }
        info!(schema = cfg.db.schema, "migrations applied");
    }
    health.postgres_up.store(true, Ordering::Release);
    metrics.postgres_up.set(1);

    let producer = kafka::producer(&cfg.brokers, &cfg.kafka)?;
    if cfg.create_topics {
        create_topics(&cfg, &producer).await?;
    }
    check_retention(&cfg, &metrics).await;
    let max_message_bytes = input_size_limit(&cfg).await;
    info!(
        max_message_bytes,
        "largest input message accepted (larger ones are dead-lettered)"
    );

    let relay_wakeup = Arc::new(Notify::new());
    let consumer = Arc::new(kafka::consumer(
        &cfg.brokers,
        &cfg.group_id,
        &cfg.kafka,
        Arc::new(ConsumerState {
            health: health.clone(),
            metrics: metrics.clone(),
        }),
    )?);

    // Stopped by the caller (a signal) or by a fatal Kafka client error found by the
    // health checks: the same drain either way, but the second ends in an error exit.
    let consume_stop = stop.child_token();
    let fatal: Arc<std::sync::Mutex<Option<String>>> = Default::default();
    let checks_stop = CancellationToken::new();
    let checks = tokio::spawn(health_checks(
        pool.clone(),
        producer.clone(),
        cfg.input_topics[0].clone(),
        health.clone(),
        metrics.clone(),
        checks_stop.clone(),
        Fatal {
            reason: fatal.clone(),
            stop: consume_stop.clone(),
        },
    ));

    let pruner = cfg.prune.clone().map(|settings| {
        tokio::spawn(crate::pruner::run(
            cfg.db.clone(),
            settings,
            metrics.clone(),
            checks_stop.clone(),
        ))
    });

    let relay_stop = CancellationToken::new();
    let relay = cfg.relay.then(|| {
        tokio::spawn(
            Relay {
                cfg: cfg.clone(),
                producer: producer.clone(),
                metrics: metrics.clone(),
                wakeup: relay_wakeup.clone(),
            }
            .run(relay_stop.clone()),
        )
    });

    let pipeline = Pipeline {
        gate: Gate {
            cfg: cfg.clone(),
            pool: pool.clone(),
            dlq: producer.clone(),
            metrics: metrics.clone(),
            relay_wakeup,
            origin: Origin::Live,
            keepalive: Some(Arc::new(crate::pipeline::Keepalive::new(consumer.clone()))),
            max_message_bytes,
        },
        consumer: consumer.clone(),
        health: Some(health.clone()),
    };
    let result = pipeline.run(consume_stop).await;
    info!("consumer stopped");
    // Dropping the last handle closes the consumer: it leaves the group at once instead
    // of waiting for the session to time out.
    drop(consumer);
    relay_stop.cancel();
    if let Some(relay) = relay {
        let _ = relay.await;
    }
    checks_stop.cancel();
    let _ = checks.await;
    if let Some(pruner) = pruner {
        let _ = pruner.await;
    }
    admin_stop.cancel();
    let _ = admin_task.await;
    pool.close().await;
    if let Some(reason) = fatal.lock().expect("fatal lock").take() {
        anyhow::bail!(
            "the Kafka producer failed for good ({reason}); exiting so that a restart brings a new one. \
             Nothing is lost: offsets only cover durable work, and the outbox keeps what was not relayed"
        );
    }
    result
}

/// Says once how the connection to Postgres is protected. Plaintext is a warning unless
/// the URL asked for it (`sslmode=disable`): with libpq's default, `prefer`, a server
/// without TLS is used in plaintext without a word.
pub fn log_connection_security(db: &crate::config::DbConfig, security: &db::ConnectionSecurity) {
    if security.ssl {
        info!(
            tls_version = security.version.as_deref().unwrap_or("?"),
            cipher = security.cipher.as_deref().unwrap_or("?"),
            "connected to Postgres over TLS"
        );
    } else if db.url.contains("sslmode=disable") || db.url.contains("ssl-mode=disable") {
        info!("connected to Postgres without TLS (sslmode=disable)");
    } else {
        warn!("connected to Postgres WITHOUT TLS: the server offers none; set sslmode=verify-full (with sslrootcert) in KDEDUP_DATABASE_URL to require it");
    }
}

/// Where the health checks report a fatal Kafka client error: the reason, and the stop
/// token of the consumer so that the process drains and exits.
struct Fatal {
    reason: Arc<std::sync::Mutex<Option<String>>>,
    stop: CancellationToken,
}

/// Retries `op` with backoff until it succeeds (true) or `stop` fires (false).
async fn retry_until<F, Fut, E>(stop: &CancellationToken, what: &str, mut op: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        match op().await {
            Ok(()) => return true,
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "{what} failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return false,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Creates the output and dead-letter topics with the first input topic's partition count.
pub async fn create_topics(cfg: &RunConfig, producer: &FutureProducer) -> anyhow::Result<()> {
    let first = cfg.input_topics[0].clone();
    let (p, brokers) = (producer.clone(), cfg.brokers.clone());
    let partitions = tokio::task::spawn_blocking(move || {
        kafka::partition_count(&p, &brokers, &first, Duration::from_secs(10))
    })
    .await??
    .ok_or_else(|| kafka::KafkaSetupError::MissingInputTopic {
        topic: cfg.input_topics[0].clone(),
    })?;
    kafka::ensure_topics(
        &cfg.brokers,
        &cfg.kafka,
        &[cfg.output_topic.as_str(), cfg.dlq_topic.as_str()],
        partitions as i32,
        cfg.topic_replication_factor,
    )
    .await?;
    Ok(())
}

/// Room kept in an output record for kdedup's own headers (`kdedup-event-id`, at most
/// `--max-id-bytes`, and `kdedup-source`, a topic name and two numbers) and the record's
/// framing.
fn own_header_room(cfg: &RunConfig) -> usize {
    cfg.id.max_id_bytes + 512
}

/// The largest input message kdedup accepts: `--max-message-bytes`, lowered to what the
/// output topic (`max.message.bytes`) and the producer (`message.max.bytes`) take once
/// kdedup's own headers are added. A larger message would pass the gate and then be
/// refused by the broker at relay time; this way it is dead-lettered at once, with the
/// reason. Always a limit: `--max-message-bytes 0` turns off only kdedup's own; the
/// producer's (1,000,000 unless `message.max.bytes` says otherwise) always applies.
pub async fn input_size_limit(cfg: &RunConfig) -> Option<usize> {
    let mut limits: Vec<usize> = cfg.max_message_bytes.into_iter().collect();
    let room = own_header_room(cfg);
    match kafka::topic_config(
        &cfg.brokers,
        &cfg.kafka,
        std::slice::from_ref(&cfg.output_topic),
        "max.message.bytes",
    )
    .await
    {
        Ok(found) => {
            for topic_limit in found.iter().filter_map(|(_, v)| v.parse::<usize>().ok()) {
                limits.push(topic_limit.saturating_sub(room));
                // The broker checks the limit per record batch, not per record: a batch of
                // several records over it is refused whole, and the relay would
                // dead-letter every record in it.
                let batch_size = cfg
                    .kafka
                    .0
                    .get("batch.size")
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(1_000_000);
                if batch_size > topic_limit {
                    warn!(output_topic = cfg.output_topic, max_message_bytes = topic_limit, batch_size,
                          "the output topic's max.message.bytes is below the producer's batch.size: a full batch would be refused whole and its records dead-lettered; set KDEDUP_KAFKA_BATCH_SIZE to at most the topic's limit");
                }
            }
        }
        Err(e) => warn!(error = %e, output_topic = cfg.output_topic,
                        "cannot read the output topic's max.message.bytes; only --max-message-bytes limits input size"),
    }
    let producer_limit = cfg
        .kafka
        .0
        .get("message.max.bytes")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1_000_000);
    limits.push(producer_limit.saturating_sub(room));
    limits.into_iter().min()
}

/// Exports each input topic's retention and warns when the TTL is shorter: an event
/// re-read (or replayed) after its gate row expired would be forwarded again.
async fn check_retention(cfg: &RunConfig, metrics: &Metrics) {
    match kafka::retention_seconds(&cfg.brokers, &cfg.kafka, &cfg.input_topics).await {
        Ok(retentions) => {
            for (topic, secs) in retentions {
                metrics
                    .input_retention
                    .with_label_values(&[topic.as_str()])
                    .set(secs);
                let ttl = i64::try_from(cfg.ttl.as_secs()).unwrap_or(i64::MAX);
                if secs < 0 || ttl < secs {
                    warn!(topic, retention_s = secs, ttl_s = ttl,
                          "TTL is shorter than the input topic's retention: an event re-read after its id expired would be forwarded again; raise KDEDUP_TTL above the retention plus the longest expected lag");
                }
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot read input topic retention; the TTL-vs-retention check is skipped")
        }
    }
}

/// Outbox rows counted exactly by the health checks; above this, an estimate.
const OUTBOX_EXACT: i64 = 100_000;

/// Gauges read from Postgres, on every replica (so a standby relay or pruner still reports
/// them): table size estimate, outbox backlog and the age of its oldest row, and the age of
/// the oldest gate row.
async fn table_stats(pool: &PgPool, metrics: &Metrics) -> Result<(), sqlx::Error> {
    // Every replica runs this every 2 s: each statement is bounded, and a slow database
    // (or a huge backlog) skips a refresh instead of piling up queries.
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL statement_timeout = '1s'")
        .execute(&mut *tx)
        .await?;
    // The statistics collector's live-tuple count follows inserts and deletes within a
    // second or so; the planner's reltuples waits for the next ANALYZE (and is -1 on a
    // table never analyzed), so it is only the fallback.
    let rows: Option<i64> = sqlx::query_scalar(
        "SELECT greatest(coalesce(s.n_live_tup, c.reltuples::int8), 0)::int8
         FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
         WHERE c.oid = to_regclass('processed_events')",
    )
    .fetch_optional(&mut *tx)
    .await?
    .flatten();
    metrics.processed_events_rows.set(rows.unwrap_or(0));
    let oldest: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - created_at)::float8 FROM outbox ORDER BY id LIMIT 1",
    )
    .fetch_optional(&mut *tx)
    .await?;
    metrics
        .outbox_oldest_age
        .set(oldest.map_or(0, |s| s.max(0.0) as i64));
    // Exact up to OUTBOX_EXACT rows; past that (an output topic down for hours) the
    // statistics collector's estimate, so this stays a small read however large it grows.
    let backlog: i64 = sqlx::query_scalar(
        "SELECT CASE WHEN exact.n <= $1 THEN exact.n
                     ELSE greatest(coalesce(s.n_live_tup, 0), exact.n) END
         FROM (SELECT count(*) AS n FROM (SELECT 1 FROM outbox LIMIT $1 + 1) o) exact
         LEFT JOIN pg_stat_user_tables s ON s.relid = to_regclass('outbox')",
    )
    .bind(OUTBOX_EXACT)
    .fetch_one(&mut *tx)
    .await?;
    metrics.outbox_backlog.set(backlog);
    // The row that expires first is the oldest one (the TTL is the same for every row
    // written by one configuration); found through the pruner's index, not a scan.
    let oldest_row: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - first_seen_at)::float8 FROM processed_events \
         ORDER BY expires_at LIMIT 1",
    )
    .fetch_optional(&mut *tx)
    .await?;
    metrics
        .oldest_row_age
        .set(oldest_row.map_or(0, |s| s.max(0.0) as i64));
    tx.commit().await?;
    Ok(())
}

/// Refreshes the Postgres and broker readiness inputs every few seconds.
async fn health_checks(
    pool: PgPool,
    producer: FutureProducer,
    probe_topic: String,
    health: Arc<Health>,
    metrics: Metrics,
    stop: CancellationToken,
    fatal: Fatal,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let pg = tokio::time::timeout(Duration::from_secs(3), db::ping(&pool))
            .await
            .is_ok_and(|r| r.is_ok());
        if pg != health.postgres_up.swap(pg, Ordering::AcqRel) {
            if pg {
                info!("postgres reachable")
            } else {
                warn!("postgres unreachable")
            }
        }
        metrics.postgres_up.set(pg as i64);
        if pg {
            let _ = table_stats(&pool, &metrics).await;
        }

        let (p, t) = (producer.clone(), probe_topic.clone());
        let broker = tokio::task::spawn_blocking(move || {
            use rdkafka::producer::Producer;
            // One of kdedup's own topics: metadata of every topic in a large cluster is
            // a heavy request to make every 2 s from every replica.
            p.client()
                .fetch_metadata(Some(&t), Duration::from_secs(3))
                .is_ok_and(|md| !md.brokers().is_empty())
        })
        .await
        .unwrap_or(false);
        if broker != health.broker_up.swap(broker, Ordering::AcqRel) {
            if broker {
                info!("kafka cluster reachable")
            } else {
                warn!("kafka cluster unreachable")
            }
        }
        metrics.broker_up.set(broker as i64);

        // An idempotent producer that hit a fatal error (fenced, out-of-order sequence)
        // fails every later produce: dead letters and the relay would retry for ever.
        // librdkafka cannot recover it; a new process can.
        use rdkafka::producer::Producer;
        if let Some((code, reason)) = producer.client().fatal_error() {
            error!(code = ?code, reason, "kafka producer hit a fatal error; stopping so that the process restarts");
            *fatal.reason.lock().expect("fatal lock") = Some(format!("{code:?}: {reason}"));
            fatal.stop.cancel();
            return;
        }
    }
}
