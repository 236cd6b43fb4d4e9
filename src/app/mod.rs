//! `kdedup run`: wires the pieces together and owns the shutdown order.
//!
//! Start: admin server (so probes answer at once), Postgres + migrations (retried: the
//! database may come up after the sidecar), topics, then consumer, relay and health
//! checks. Stop: the pipeline finishes or abandons its batch and commits durable offsets,
//! then the relay publishes what is left in the outbox, all within `--shutdown-timeout`.

pub mod checks;
mod health;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin;
use crate::consume::hold::Keepalive;
use crate::consume::settle::{Gate, Origin};
use crate::consume::Pipeline;
use crate::health::Health;
use crate::kafka::{self, ConsumerState};
use crate::metrics::Metrics;
use crate::retry::Backoff;
use crate::settings::{RunSettings, SinkSettings};
use crate::sink::http::HttpSink;
use crate::sink::kafka::relay::Relay;
use crate::sink::kafka::KafkaSink;
use crate::sink::{postgres, Sink};
use crate::store;
use health::{health_checks, Fatal, HealthChecks};

/// Handles a caller needs while the sidecar runs (tests read metrics through them).
pub struct Running {
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub admin_addr: std::net::SocketAddr,
}

/// Runs the sidecar until `stop` fires, then drains. `started` receives the handles once
/// the admin server is listening.
pub async fn run(
    cfg: RunSettings,
    stop: CancellationToken,
    metrics: Metrics,
    started: Option<tokio::sync::oneshot::Sender<Running>>,
) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    metrics
        .ttl_seconds
        .set(i64::try_from(cfg.gate.ttl.as_secs()).unwrap_or(i64::MAX));
    // Series that exist from the start: a sidecar stuck before its first message must
    // still show a flat consumed counter, or no rate-based alert can see it.
    for topic in &cfg.kafka.input_topics {
        metrics.events_consumed.with_label_values(&[topic]);
    }
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

    let Some(pool) = connect_postgres(&cfg, &stop).await? else {
        return Ok(());
    };
    // Ready as far as Postgres goes; the health loop keeps this and the gauge current.
    health.postgres_up.store(true, Ordering::Release);

    // The Postgres sink's statement is checked before anything consumes: a missing table
    // or grant ends the start here, naming the fix.
    let postgres_sink = match &cfg.sink {
        SinkSettings::Postgres(settings) => {
            Some(postgres::prepare(settings, &cfg.db, &metrics).await?)
        }
        SinkSettings::Kafka { .. } | SinkSettings::Http(_) => None,
    };

    let producer = kafka::producer(&cfg.kafka.brokers, &cfg.kafka.properties)?;
    if cfg.kafka.create_topics {
        crate::sink::kafka::topics::create_topics(&cfg, &producer).await?;
    }
    checks::check_retention(&cfg, &metrics).await;
    checks::check_scope(&cfg, &pool).await;
    let max_message_bytes = crate::sink::kafka::topics::input_size_limit(&cfg).await;
    info!(
        max_message_bytes,
        "largest input message accepted (larger ones are dead-lettered)"
    );

    let relay_wakeup = Arc::new(Notify::new());
    let consumer = Arc::new(kafka::consumer(
        &cfg.kafka.brokers,
        &cfg.kafka.group_id,
        &cfg.kafka.properties,
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
    let outbox_emptied = Arc::new(Notify::new());
    let checks = tokio::spawn(health_checks(
        HealthChecks {
            pool: pool.clone(),
            producer: producer.clone(),
            own_topics: cfg
                .sink
                .output_topic()
                .into_iter()
                .chain([cfg.kafka.dlq_topic.as_str()])
                .map(str::to_string)
                .collect(),
            health: health.clone(),
            metrics: metrics.clone(),
            fatal: Fatal {
                reason: fatal.clone(),
                stop: consume_stop.clone(),
            },
            tables_changed: outbox_emptied.clone(),
        },
        checks_stop.clone(),
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
    let (sink, relay): (Arc<dyn Sink>, _) = match (&cfg.sink, postgres_sink) {
        (SinkSettings::Kafka { output_topic }, _) => {
            let relay = cfg.relay.enabled.then(|| {
                let relay = Relay {
                    emptied: Some(outbox_emptied.clone()),
                    ..Relay::new(
                        &cfg,
                        output_topic,
                        producer.clone(),
                        metrics.clone(),
                        relay_wakeup.clone(),
                    )
                };
                tokio::spawn(relay.run(relay_stop.clone()))
            });
            (Arc::new(KafkaSink { relay_wakeup }), relay)
        }
        (SinkSettings::Postgres(_), Some(sink)) => (Arc::new(sink), None),
        (SinkSettings::Postgres(_), None) => unreachable!("prepared above"),
        (SinkSettings::Http(settings), _) => {
            let sink = HttpSink::new(settings, pool.clone(), &metrics);
            // The gauge behind the "stuck in PROCESSING" alert; stopped with the relay.
            let watch = tokio::spawn(
                sink.clone()
                    .watch_leases(Duration::from_secs(15), relay_stop.clone()),
            );
            (Arc::new(sink), Some(watch))
        }
    };
    let pipeline = Pipeline {
        gate: Gate {
            keepalive: Some(Arc::new(Keepalive::new(consumer.clone()))),
            ..Gate::new(
                &cfg,
                pool.clone(),
                producer.clone(),
                metrics.clone(),
                sink,
                Origin::Live,
                max_message_bytes,
            )
        },
        settings: cfg.consume.clone(),
        input_topics: cfg.kafka.input_topics.clone(),
        group_id: cfg.kafka.group_id.clone(),
        consumer: consumer.clone(),
        health: health.clone(),
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

/// Connects to Postgres and applies the migrations (when `--migrate-on-start`). `None`
/// when `stop` fired first.
async fn connect_postgres(
    cfg: &RunSettings,
    stop: &CancellationToken,
) -> anyhow::Result<Option<sqlx::PgPool>> {
    // One connection first: settings the server refuses (TLS, login, database) end the
    // start here with the fix named; an unreachable server is waited for.
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        match store::check_connection(&cfg.db).await? {
            Ok(security) => {
                security.log(&cfg.db);
                break;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                      database_url = %cfg.db.url,
                      "connecting to Postgres failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    let pool = store::pool(&cfg.db)?;
    if cfg.migrate_on_start {
        if !retry_until(stop, "applying migrations", || {
            store::migrate(&pool, &cfg.db.schema)
        })
        .await
        {
            return Ok(None);
        }
        info!(schema = cfg.db.schema, "migrations applied");
    }
    Ok(Some(pool))
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
