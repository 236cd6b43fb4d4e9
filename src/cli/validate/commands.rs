//! What `kdedup replay`, `kdedup inspect` and `kdedup demo` add to the shared settings.

use super::super::env::Env;
use super::super::{
    ConfigError, DbArgs, DemoArgs, InspectArgs, PruneArgs, PruneFlags, ReplayArgs, RunArgs,
};
use super::db::validate_schema;
use super::parse_duration;
use crate::settings::{DemoSettings, InspectSettings, PruneSettings, ReplaySettings, RunSettings};

impl ReplayArgs {
    /// `kdedup replay`'s flags, with the sidecar's own (`kdedup run`'s) settings inside.
    pub fn validate(self, env: &dyn Env) -> Result<ReplaySettings, ConfigError> {
        let from_ms = self
            .from_time
            .as_deref()
            .map(|v| parse_time("--from-time", v))
            .transpose()?;
        let to_ms = self
            .to_time
            .as_deref()
            .map(|v| parse_time("--to-time", v))
            .transpose()?;
        let publish_timeout = parse_duration("--publish-timeout", &self.publish_timeout, "60s")?;
        let idle_timeout = parse_duration("--idle-timeout", &self.idle_timeout, "3s")?;
        let run = self.run.validate(env)?;
        let topic = self
            .from_topic
            .unwrap_or_else(|| run.kafka.dlq_topic.clone());
        Ok(ReplaySettings {
            run,
            topic,
            from_offset: self.from_offset,
            to_offset: self.to_offset,
            from_ms,
            to_ms,
            dry_run: self.dry_run,
            force: self.force,
            idle_timeout,
            publish_timeout,
            serve_metrics: self.serve_metrics,
        })
    }
}

pub(super) fn parse_time(setting: &str, v: &str) -> Result<i64, ConfigError> {
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            ConfigError::new(
                setting,
                format!("cannot read {v:?} as a time ({e})"),
                "write RFC 3339, e.g. 2026-11-20T00:00:00Z",
            )
        })
}

impl InspectArgs {
    pub fn validate(self, env: &dyn Env) -> Result<InspectSettings, ConfigError> {
        Ok(InspectSettings {
            db: self.db.validate(env)?,
            event_id: self.event_id,
            scope: self.scope,
            json: self.json,
        })
    }
}

impl DemoArgs {
    /// The demo's database: the local server unless `--database-url` / `DATABASE_URL`
    /// say otherwise, in a schema whose name says it is a demo's.
    pub fn validate(self, env: &dyn Env) -> Result<DemoSettings, ConfigError> {
        let url = self
            .database_url
            .clone()
            .or_else(|| env.var("DATABASE_URL"))
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
        let schema = demo_schema(&self.db_schema)?;
        let db = DbArgs {
            database_url: Some(url),
            db_schema: schema,
            ..RunArgs::defaults().db
        }
        .validate(env)?;
        Ok(DemoSettings {
            db,
            events: self.events,
            metrics_addr: self.metrics_addr,
            hold: self.hold,
            postgres_sink: self.sink == super::super::SinkKind::Postgres,
            http_sink: self.sink == super::super::SinkKind::Http,
        })
    }
}

/// The demo drops its schema (with everything in it) at every start, so it only
/// accepts a name that says it is a demo's: pointing `--db-schema` at a real kdedup
/// schema (or an application's) must not delete it.
pub(super) fn demo_schema(name: &str) -> Result<String, ConfigError> {
    let schema = validate_schema(name)?;
    if !schema.starts_with("kdedup_demo") {
        return Err(ConfigError::new(
            "--db-schema (kdedup demo)",
            format!("{schema:?} is not a demo schema, and the demo drops its schema with everything in it"),
            "use a name starting with kdedup_demo (the default is kdedup_demo)",
        ));
    }
    Ok(schema)
}

/// The settings `kdedup demo` runs the sidecar with, on its embedded cluster at
/// `brokers`: the defaults of `kdedup run`, a short session, no environment
/// (the demo must not pick up a real cluster's `KDEDUP_KAFKA_*`).
pub fn demo_run_settings(
    demo: &DemoSettings,
    brokers: &str,
    metrics_addr: &str,
    topics: (&str, &str),
) -> Result<RunSettings, ConfigError> {
    let (input, output) = topics;
    // What the demo sets itself; everything else is `kdedup run`'s default.
    let defaults = RunArgs::defaults();
    let mut run_args = RunArgs {
        brokers: Some(brokers.to_string()),
        group_id: Some("orders-app".into()),
        input_topics: Some(input.into()),
        output_topic: Some(output.into()),
        db: DbArgs {
            database_url: Some(demo.db.url.expose().to_string()),
            db_schema: demo.db.schema.clone(),
            ..defaults.db
        },
        id_from: "header:event-id,json:/id".into(),
        scope: Some("orders".into()),
        metrics_addr: metrics_addr.to_string(),
        shutdown_timeout: "5s".into(),
        // The embedded cluster has its topics already, on one broker.
        create_topics: false,
        topic_replication_factor: 1,
        kafka_property: vec![
            "session.timeout.ms=6000".into(),
            "heartbeat.interval.ms=500".into(),
        ],
        ..defaults
    };
    if demo.postgres_sink {
        let (schema, table) = demo.app_table();
        run_args.sink = super::super::SinkKind::Postgres;
        run_args.output_topic = None;
        run_args.sink_table = Some(format!("{schema}.{table}"));
        run_args.sink_column = [
            "event_id=event_id",
            "source_partition=source_partition",
            "source_offset=source_offset",
            "source_timestamp=produced_at",
        ]
        .map(String::from)
        .to_vec();
    }
    if demo.http_sink {
        // The demo's receiver is started later, on a port of its own; `demo::run` puts
        // its URL in place of this one.
        run_args.sink = super::super::SinkKind::Http;
        run_args.output_topic = None;
        run_args.http.http_url = Some(DemoSettings::RECEIVER_PLACEHOLDER.into());
        run_args.http.http_timeout = "2s".into();
    }
    // Only -X properties here: the demo must not pick up a real cluster's KDEDUP_KAFKA_*.
    let no_env: std::collections::BTreeMap<String, String> = Default::default();
    run_args.kafka_property.sort();
    run_args.validate(&no_env)
}

impl PruneArgs {
    /// The settings of one prune round, checked as `kdedup run`'s pruner flags are.
    pub fn round_settings(&self) -> Result<PruneSettings, ConfigError> {
        PruneFlags {
            pruner: true,
            prune_interval: "60s".into(),
            prune_batch_size: self.prune_batch_size,
            prune_pause: self.prune_pause.clone(),
        }
        .validate()
    }
}
