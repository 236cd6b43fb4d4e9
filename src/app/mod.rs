//! `kdedup run`: wires the pieces together and owns the shutdown order.
//!
//! Start: admin server (so probes answer at once), Postgres + migrations (retried: the
//! database may come up after the sidecar), topics, then consumer, relay and health
//! checks. Stop: the pipeline finishes or abandons its batch and commits durable offsets,
//! then the relay publishes what is left in the outbox, all within `--shutdown-timeout`.

pub mod checks;
pub mod drift;
mod health;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin;
use crate::consume::hold::Keepalive;
use crate::consume::settle::{Gate, Origin};
use crate::consume::Pipeline;
use crate::health::Health;
use crate::kafka::Assignment;
use crate::kafka::{self, ConsumerState};
use crate::metrics::Metrics;
use crate::retry::Backoff;
use crate::settings::{RunSettings, SinkSettings};
use crate::sink::http::HttpSink;
use crate::sink::kafka::relay::{self, Relay};
use crate::sink::kafka::KafkaSink;
use crate::sink::{postgres, Sink};
use crate::store;
use crate::store::outbox;
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
    metrics
        .config_info
        .with_label_values(&[
            cfg.kafka.group_id.as_str(),
            cfg.db.schema.as_str(),
            cfg.gate.scope.describe().as_str(),
            cfg.sink.name(),
            cfg.sink.target().as_str(),
        ])
        .set(1);
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

    let Some(pool) = connect_postgres(&cfg, &health, &stop).await? else {
        return Ok(());
    };
    // Ready as far as Postgres goes; the health loop keeps this and the gauge current.
    health.postgres.set(true);

    // The Postgres sink's statement is checked before anything consumes: a missing table
    // or grant ends the start here, naming the fix.
    let postgres_sink = match &cfg.sink {
        SinkSettings::Postgres(settings) => {
            Some(postgres::prepare(settings, &cfg.db, &metrics).await?)
        }
        SinkSettings::Kafka { .. } | SinkSettings::Http(_) => None,
    };

    // Before anything is consumed: a running sidecar whose configuration conflicts with
    // this one's (another schema for the same group or output) ends the start here.
    let registration = drift::Registration::new(&cfg, pool.clone());
    registration.check_and_register().await?;

    let producer = kafka::producer(&cfg.kafka.brokers, &cfg.kafka.properties)?;
    if cfg.kafka.create_topics {
        crate::sink::kafka::topics::create_topics(&cfg, &producer).await?;
    }
    // Together: on a broker that does not serve DescribeConfigs, each topic check waits
    // out its request timeout before it warns.
    let ((), (), max_message_bytes) = tokio::join!(
        checks::check_retention(&cfg, &metrics),
        checks::check_scope(&cfg, &pool),
        crate::sink::kafka::topics::input_size_limit(&cfg),
    );
    info!(
        max_message_bytes,
        "largest input message accepted (larger ones are dead-lettered)"
    );

    let assignment = Arc::new(Assignment::default());
    let consumer = Arc::new(kafka::consumer(
        &cfg.kafka.brokers,
        &cfg.kafka.group_id,
        &cfg.kafka.properties,
        Arc::new(ConsumerState {
            health: health.clone(),
            metrics: metrics.clone(),
            pending: Default::default(),
            assignment: assignment.clone(),
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
            own_topics: cfg.own_topics().into_iter().map(str::to_string).collect(),
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

    let heartbeat = tokio::spawn(registration.run(metrics.clone(), checks_stop.clone()));
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
            // The relay takes what the lanes commit in memory, up to the relay's byte
            // budget; past it, it reads back from the outbox.
            let (feed, intake) = relay::channel(cfg.relay.batch_max_bytes);
            let relay = cfg.relay.enabled.then(|| {
                let relay = Relay {
                    emptied: Some(outbox_emptied.clone()),
                    assignment: Some(assignment.clone()),
                    ..Relay::new(
                        &cfg,
                        pool.clone(),
                        output_topic,
                        producer.clone(),
                        metrics.clone(),
                        intake,
                    )
                };
                tokio::spawn(relay.run(relay_stop.clone()))
            });
            let sink = KafkaSink {
                stream_prefix: outbox::LIVE,
                feed: cfg.relay.enabled.then_some(feed),
            };
            (Arc::new(sink), relay)
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
    let _ = heartbeat.await;
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
    health: &Health,
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
                health.postgres.set(false);
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
    // Each gate lane holds a connection of its own (store::lane).
    let pool = store::pool_beside_lanes(&cfg.db, cfg.consume.gate_lanes)?;
    let ready = match cfg.migrate_on_start {
        true => migrate(cfg, &pool, stop).await?,
        false => wait_for_migrations(cfg, &pool, health, stop).await,
    };
    if !ready {
        return Ok(None);
    }
    Ok(Some(pool))
}

/// With `--migrate-on-start false`, waits until the schema has every migration this
/// binary needs (the migration Job may still be running): not ready meanwhile, with an
/// ERROR naming the fix, as every gate transaction would fail on a missing table or
/// column. `false` when `stop` fired.
async fn wait_for_migrations(
    cfg: &RunSettings,
    pool: &sqlx::PgPool,
    health: &Health,
    stop: &CancellationToken,
) -> bool {
    let mut said = None::<std::time::Instant>;
    loop {
        match store::unapplied_migrations(pool).await {
            Ok(missing) if missing.is_empty() => {
                if said.is_some() {
                    info!(schema = cfg.db.schema, "the schema is migrated now");
                }
                health
                    .schema_not_migrated
                    .store(false, std::sync::atomic::Ordering::Release);
                return true;
            }
            Ok(missing) => {
                health
                    .schema_not_migrated
                    .store(true, std::sync::atomic::Ordering::Release);
                if said.map_or(true, |at| at.elapsed() >= Duration::from_secs(60)) {
                    error!(schema = cfg.db.schema, missing_migrations = ?missing,
                           "the schema lacks migrations this kdedup needs and KDEDUP_MIGRATE_ON_START is false: \
                            waiting for them (not ready). Run `kdedup migrate` (the migration Job) against this schema, \
                            or set KDEDUP_MIGRATE_ON_START=true");
                    said = Some(std::time::Instant::now());
                }
            }
            Err(e) => warn!(error = %e, "cannot read the schema's migrations; retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// How many times a migration failure that cannot heal (a missing privilege, a schema in
/// an unexpected state) is tried before the start ends with it (exit 78): a few, in case a
/// DBA is granting the privilege at that moment.
const MIGRATE_TRIES: u32 = 5;

/// Applies the migrations, retrying with backoff: for ever while the failure can heal (the
/// database restarting), [`MIGRATE_TRIES`] times when it cannot. `false` when `stop` fired.
async fn migrate(
    cfg: &RunSettings,
    pool: &sqlx::PgPool,
    stop: &CancellationToken,
) -> anyhow::Result<bool> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut tries = 0;
    loop {
        let e = match store::migrate(pool, &cfg.db.schema).await {
            Ok(()) => {
                info!(schema = cfg.db.schema, "migrations applied");
                return Ok(true);
            }
            Err(e) => e,
        };
        if let Some(fix) = store::migration_cannot_heal(&e) {
            tries += 1;
            if tries >= MIGRATE_TRIES {
                return Err(store::MigrateConfigError {
                    schema: cfg.db.schema.clone(),
                    tries,
                    cause: e.to_string(),
                    fix,
                }
                .into());
            }
        }
        let delay = backoff.next_delay();
        warn!(error = %e, schema = cfg.db.schema, retry_in_ms = delay.as_millis() as u64,
              "applying migrations failed; retrying");
        tokio::select! {
            _ = stop.cancelled() => return Ok(false),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
