use std::collections::BTreeMap;

use super::commands::*;
use super::db::*;
use super::*;
use crate::cli::env::is_known_env_var;
use crate::cli::{Cli, Command, DbArgs};
use crate::settings::redact_url;
use clap::Parser;

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn args(extra: &[&str]) -> RunArgs {
    let mut argv = vec![
        "kdedup",
        "run",
        "--brokers",
        "b:9092",
        "--group-id",
        "g",
        "--input-topics",
        "orders",
        "--output-topic",
        "orders.dedup",
        "--database-url",
        "postgres://u:pw@h/db",
    ];
    argv.extend_from_slice(extra);
    match Cli::try_parse_from(argv).unwrap().command {
        Command::Run(a) => *a,
        _ => unreachable!(),
    }
}

#[test]
fn defaults_are_sensible() {
    let c = args(&[]).validate(&env(&[])).unwrap();
    assert_eq!(c.kafka.dlq_topic, "orders.dlq");
    assert_eq!(c.gate.ttl, Duration::from_secs(7 * 86400));
    assert_eq!(c.db.schema, "kdedup");
    assert!(matches!(c.gate.scope, ScopeSpec::Literal(ref s) if s == "g"));
    assert_eq!(c.shutdown_timeout, Duration::from_secs(25));
}

#[test]
fn bad_ttl_names_the_setting_and_fix() {
    let e = args(&["--ttl", "soon"]).validate(&env(&[])).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("--ttl / KDEDUP_TTL"), "{text}");
    assert!(text.contains("Fix:"), "{text}");
}

#[test]
fn database_url_falls_back_to_database_url_env() {
    let mut a = args(&[]);
    a.db.database_url = None;
    let c = a
        .validate(&env(&[("DATABASE_URL", "postgres://x@y/z")]))
        .unwrap();
    assert_eq!(c.db.url.expose(), "postgres://x@y/z");
    let mut a = args(&[]);
    a.db.database_url = None;
    assert!(a.validate(&env(&[])).is_err());
}

#[test]
fn kafka_properties_pass_through_and_reserved_ones_are_refused() {
    let e = env(&[
        ("KDEDUP_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
        ("KDEDUP_KAFKA_SASL_PASSWORD", "hunter2"),
    ]);
    let c = args(&[]).validate(&e).unwrap();
    assert_eq!(c.kafka.properties.0["security.protocol"], "SASL_SSL");
    let shown = format!("{c:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(!shown.contains("pw@"), "{shown}");

    let e = env(&[("KDEDUP_KAFKA_ENABLE_AUTO_OFFSET_STORE", "true")]);
    let err = args(&[]).validate(&e).unwrap_err().to_string();
    assert!(
        err.contains("KDEDUP_KAFKA_ENABLE_AUTO_OFFSET_STORE"),
        "{err}"
    );

    // A broker-side auto-create would give kdedup's topics the broker's partition count.
    let e = env(&[("KDEDUP_KAFKA_ALLOW_AUTO_CREATE_TOPICS", "true")]);
    let err = args(&[]).validate(&e).unwrap_err().to_string();
    assert!(
        err.contains("KDEDUP_KAFKA_ALLOW_AUTO_CREATE_TOPICS"),
        "{err}"
    );
    assert!(err.contains("KDEDUP_CREATE_TOPICS"), "{err}");
    let e = env(&[("KDEDUP_KAFKA_ALLOW_AUTO_CREATE_TOPICS", "false")]);
    assert!(args(&[]).validate(&e).is_ok());
}

#[test]
fn shutdown_must_fit_in_the_session() {
    let e = env(&[("KDEDUP_KAFKA_SESSION_TIMEOUT_MS", "10000")]);
    let err = args(&[]).validate(&e).unwrap_err().to_string();
    assert!(err.contains("session.timeout.ms"), "{err}");
    assert!(args(&["--shutdown-timeout", "5s"]).validate(&e).is_ok());
}

#[test]
fn topics_must_not_loop() {
    let mut a = args(&[]);
    a.output_topic = Some("orders".into());
    let err = a.validate(&env(&[])).unwrap_err().to_string();
    assert!(err.contains("also an input topic"), "{err}");
}

#[test]
fn schema_names_are_checked_before_they_reach_ddl() {
    assert!(validate_schema("kdedup_1").is_ok());
    for bad in ["", "Robert'); DROP", "a-b", "pg_catalog", "1abc"] {
        assert!(validate_schema(bad).is_err(), "{bad}");
    }
}

#[test]
fn urls_are_redacted() {
    assert_eq!(
        redact_url("postgres://kd:s3cret@db:5432/app?sslmode=require&password=x"),
        "postgres://kd:<redacted>@db:5432/app?sslmode=require&password=<redacted>"
    );
    assert_eq!(redact_url("postgres://db/app"), "postgres://db/app");
}

#[test]
fn ttl_has_an_upper_bound() {
    let err = args(&["--ttl", "1000000y"])
        .validate(&env(&[]))
        .unwrap_err();
    assert!(err.to_string().contains("100 years"), "{err}");
    assert!(args(&["--ttl", "100y"]).validate(&env(&[])).is_ok());
}

#[test]
fn properties_the_guarantees_rest_on_cannot_be_overridden() {
    for (var, bad, same) in [
        ("KDEDUP_KAFKA_ENABLE_AUTO_COMMIT", "false", "true"),
        (
            "KDEDUP_KAFKA_ISOLATION_LEVEL",
            "read_uncommitted",
            "read_committed",
        ),
        ("KDEDUP_KAFKA_ENABLE_PARTITION_EOF", "true", "false"),
        ("KDEDUP_KAFKA_ENABLE_AUTO_OFFSET_STORE", "true", "false"),
        ("KDEDUP_KAFKA_ACKS", "1", "all"),
    ] {
        let err = args(&[]).validate(&env(&[(var, bad)])).unwrap_err();
        assert!(err.to_string().contains(var), "{err}");
        assert!(
            args(&[]).validate(&env(&[(var, same)])).is_ok(),
            "{var}={same}"
        );
    }
}

#[test]
fn passwords_with_slash_at_and_colon_are_redacted_whole() {
    for url in [
        "postgres://kd:pa/ss@w:rd@db:5432/app",
        "postgres://kd:pa/ss@w:rd@db:5432/app?sslmode=require",
        "postgresql://kd:pa%2Fss%40w%3Ard@db/app",
    ] {
        let shown = redact_url(url);
        for piece in ["pa/ss", "ss@w", "w:rd", "pa%2F"] {
            assert!(!shown.contains(piece), "{url} -> {shown}");
        }
        assert!(shown.contains("kd:<redacted>@db"), "{url} -> {shown}");
    }
    assert_eq!(
        redact_url("postgres://db/app?password=pa/ss@w:rd&sslmode=require"),
        "postgres://db/app?password=<redacted>&sslmode=require"
    );
}

#[test]
fn kafka_values_are_printed_only_from_an_allow_list() {
    let secret = "p/a@s:s";
    let e = env(&[
        ("KDEDUP_KAFKA_SASL_OAUTHBEARER_CONFIG", secret),
        ("KDEDUP_KAFKA_SSL_KEYSTORE_PASSWORD", secret),
        ("KDEDUP_KAFKA_SASL_USERNAME", "kdedup"),
    ]);
    let shown = format!("{:?}", args(&[]).validate(&e).unwrap());
    assert!(!shown.contains(secret), "{shown}");
    assert!(shown.contains("kdedup"), "{shown}");
    // librdkafka's error for an unknown property quotes its value.
    let e = env(&[("KDEDUP_KAFKA_SASL_JAAS_CONFIG", secret)]);
    let err = args(&[]).validate(&e).unwrap_err().to_string();
    assert!(err.contains("KDEDUP_KAFKA_SASL_JAAS_CONFIG"), "{err}");
    assert!(!err.contains(secret), "{err}");
    // A bad value of a known property is reported before anything connects.
    let e = env(&[("KDEDUP_KAFKA_SOCKET_TIMEOUT_MS", "soon")]);
    let err = args(&[]).validate(&e).unwrap_err().to_string();
    assert!(err.contains("KDEDUP_KAFKA_SOCKET_TIMEOUT_MS"), "{err}");
}

#[test]
fn url_parameters_the_client_would_ignore_are_refused() {
    let mut a = args(&[]);
    a.db.database_url = Some("postgres://u@h/db?ssl_mode=require&password=x".into());
    let err = a.validate(&env(&[])).unwrap_err().to_string();
    assert!(err.contains("\"ssl_mode\""), "{err}");
    let mut a = args(&[]);
    a.db.database_url = Some("postgres://u@h/db?sslmode=verify_full".into());
    assert!(a.validate(&env(&[])).is_err());
    let mut a = args(&[]);
    a.db.database_url = Some(
        "postgres://u@h/db?sslmode=verify-full&sslrootcert=/etc/hostname&options[statement_timeout]=5s"
            .into(),
    );
    assert!(a.validate(&env(&[])).is_ok());
    let mut a = args(&[]);
    a.db.database_url =
        Some("postgres://u@h/db?sslmode=verify-full&sslrootcert=/no%2Fca.crt".into());
    let err = a.validate(&env(&[])).unwrap_err().to_string();
    assert!(err.contains("\"/no/ca.crt\" cannot be read"), "{err}");
}

#[test]
fn env_var_names_are_known() {
    assert!(is_known_env_var("KDEDUP_TTL"));
    assert!(is_known_env_var("KDEDUP_DATABASE_URL"));
    assert!(is_known_env_var("KDEDUP_KAFKA_SASL_USERNAME"));
    assert!(!is_known_env_var("KDEDUP_TTTL"));
}

#[test]
fn the_demo_only_drops_a_demo_schema() {
    assert_eq!(demo_schema("kdedup_demo").unwrap(), "kdedup_demo");
    assert!(demo_schema("kdedup_demo_2").is_ok());
    for real in ["kdedup", "public", "orders"] {
        let err = demo_schema(real).unwrap_err().to_string();
        assert!(err.contains("kdedup_demo"), "{err}");
    }
}

#[test]
fn every_bad_setting_is_reported_at_once() {
    let e = args(&[
        "--ttl",
        "soon",
        "--batch-size",
        "0",
        "--metrics-addr",
        "nowhere",
    ])
    .validate(&env(&[("KDEDUP_KAFKA_GROUP_ID", "x")]))
    .unwrap_err();
    let settings: Vec<&str> = std::iter::once(&e)
        .chain(&e.more)
        .map(|e| e.setting.as_str())
        .collect();
    assert_eq!(
        settings,
        [
            "KDEDUP_KAFKA_GROUP_ID",
            "--ttl / KDEDUP_TTL",
            "--batch-size / KDEDUP_BATCH_SIZE",
            "--metrics-addr / KDEDUP_METRICS_ADDR"
        ]
    );
    assert_eq!(
        e.to_string().lines().count(),
        4,
        "one line per setting: {e}"
    );
}

/// `args` for `--sink postgres` (no output topic).
fn pg_args(extra: &[&str]) -> RunArgs {
    let mut a = args(&["--sink", "postgres"]);
    a.output_topic = None;
    let mut argv = vec!["kdedup", "run"];
    argv.extend_from_slice(extra);
    let Command::Run(more) = Cli::try_parse_from(argv).unwrap().command else {
        unreachable!()
    };
    a.sink_table = more.sink_table;
    a.sink_sql = more.sink_sql;
    a.sink_column = more.sink_column;
    a.sink_on_conflict = more.sink_on_conflict;
    a
}

#[test]
fn the_postgres_sink_takes_a_table_with_a_column_mapping_and_needs_no_output_topic() {
    let c = pg_args(&[
        "--sink-table",
        "app.orders",
        "--sink-column",
        "event_id=order_event_id,source_offset=at",
        "--sink-on-conflict",
        "update",
    ])
    .validate(&env(&[]))
    .unwrap();
    assert_eq!(c.sink.output_topic(), None);
    assert_eq!(
        c.sink_postgres(),
        Some(&PostgresSinkSettings::Table {
            table: "app.orders".into(),
            columns: vec![
                (EventField::EventId, "order_event_id".into()),
                (EventField::SourceOffset, "at".into()),
            ],
            on_conflict: OnConflict::Update,
        })
    );
    let c = pg_args(&[
        "--sink-sql",
        "INSERT INTO app.t SELECT event_id FROM kdedup_events;",
    ])
    .validate(&env(&[]))
    .unwrap();
    assert_eq!(
        c.sink_postgres(),
        Some(&PostgresSinkSettings::Sql(
            "INSERT INTO app.t SELECT event_id FROM kdedup_events".into()
        )),
        "a trailing semicolon is dropped"
    );
}

#[test]
fn sink_mistakes_name_the_setting_and_the_fix() {
    let err = |a: RunArgs| a.validate(&env(&[])).unwrap_err().to_string();
    let neither = err(pg_args(&[]));
    assert!(
        neither.contains("--sink-table / KDEDUP_SINK_TABLE"),
        "{neither}"
    );
    assert!(neither.contains("--sink-sql"), "{neither}");
    let both = err(pg_args(&["--sink-table", "a.b", "--sink-sql", "SELECT 1"]));
    assert!(both.contains("only one"), "{both}");
    let field = err(pg_args(&[
        "--sink-table",
        "a.b",
        "--sink-column",
        "offset=o",
    ]));
    assert!(
        field.contains("\"offset\" is not an event field"),
        "{field}"
    );
    assert!(
        field.contains("source_offset"),
        "the fix lists the fields: {field}"
    );
    let twice = err(pg_args(&[
        "--sink-table",
        "a.b",
        "--sink-column",
        "scope=c,event_id=c",
    ]));
    assert!(twice.contains("mapped twice"), "{twice}");
    let mapping_for_sql = err(pg_args(&[
        "--sink-sql",
        "SELECT 1",
        "--sink-column",
        "scope=c",
    ]));
    assert!(
        mapping_for_sql.contains("only applies to --sink-table"),
        "{mapping_for_sql}"
    );
    let table = err(pg_args(&["--sink-table", "a.b.c.d"]));
    assert!(table.contains("not a table name"), "{table}");
    // An output topic with the Postgres sink would never be written: said, not ignored.
    let mut with_topic = pg_args(&["--sink-table", "a.b"]);
    with_topic.output_topic = Some("orders.dedup".into());
    let e = err(with_topic);
    assert!(e.contains("--output-topic / KDEDUP_OUTPUT_TOPIC"), "{e}");
    // And a Postgres sink setting with the Kafka sink.
    let e = err(args(&["--sink-table", "a.b"]));
    assert!(e.contains("--sink-table / KDEDUP_SINK_TABLE"), "{e}");
    assert!(e.contains("--sink postgres"), "{e}");
}

#[test]
fn code_built_settings_start_from_the_flags_own_defaults_and_no_environment() {
    // The flags' defaults, as `kdedup run` parses them with only its required settings.
    let parsed = args(&[]);
    let defaults = RunArgs {
        brokers: parsed.brokers.clone(),
        group_id: parsed.group_id.clone(),
        input_topics: parsed.input_topics.clone(),
        output_topic: parsed.output_topic.clone(),
        db: DbArgs {
            database_url: parsed.db.database_url.clone(),
            ..RunArgs::defaults().db
        },
        ..RunArgs::defaults()
    };
    assert_eq!(format!("{defaults:?}"), format!("{parsed:?}"));
    // No `KDEDUP_*` can reach them: the demo must not pick up a real cluster's.
    let cmd = RunArgs::without_env();
    assert!(cmd.get_arguments().count() > 40);
    let read_env: Vec<_> = cmd
        .get_arguments()
        .filter(|a| a.get_env().is_some())
        .map(|a| a.get_id().to_string())
        .collect();
    assert!(read_env.is_empty(), "{read_env:?}");
}

#[test]
fn the_demo_runs_with_run_defaults_but_for_its_own_settings() {
    let env = env(&[]);
    let demo = match Cli::try_parse_from(["kdedup", "demo"]).unwrap().command {
        Command::Demo(a) => a.validate(&env).unwrap(),
        _ => unreachable!(),
    };
    let settings = demo_run_settings(&demo, "127.0.0.1:1", "127.0.0.1:0", ("in", "out")).unwrap();
    let run = args(&[]).validate(&env).unwrap();
    assert_eq!(
        format!("{:?}", settings.consume),
        format!("{:?}", run.consume)
    );
    assert_eq!(format!("{:?}", settings.relay), format!("{:?}", run.relay));
    assert_eq!(format!("{:?}", settings.prune), format!("{:?}", run.prune));
    assert_eq!(settings.gate.ttl, run.gate.ttl);
    assert_eq!(settings.gate.max_message_bytes, run.gate.max_message_bytes);
    assert_eq!(
        format!("{:?}", settings.gate.on_payload_mismatch),
        format!("{:?}", run.gate.on_payload_mismatch)
    );
    assert_eq!(settings.db.max_connections, run.db.max_connections);
    assert_eq!(settings.migrate_on_start, run.migrate_on_start);
    // The demo's own: a short shutdown, and the topics its embedded cluster already has.
    assert_eq!(settings.shutdown_timeout, std::time::Duration::from_secs(5));
    assert!(!settings.kafka.create_topics);
}
