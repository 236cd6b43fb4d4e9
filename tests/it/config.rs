//! Bad configuration exits 64 (EX_USAGE) with a message naming the setting and the fix,
//! before anything connects to Kafka or Postgres.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::helpers::capture;

/// A complete configuration whose endpoints answer nothing.
const UNREACHABLE: [(&str, &str); 5] = [
    ("KDEDUP_BROKERS", "127.0.0.1:1"),
    ("KDEDUP_GROUP_ID", "g"),
    ("KDEDUP_INPUT_TOPICS", "orders"),
    ("KDEDUP_OUTPUT_TOPIC", "orders.dedup"),
    (
        "KDEDUP_DATABASE_URL",
        "postgres://kd:s3cret-pw@127.0.0.1:1/app",
    ),
];

fn run(env: &[(&str, &str)]) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    let out = capture(
        Command::new(env!("CARGO_BIN_EXE_kdedup"))
            .arg("run")
            .env_clear()
            // Unreachable endpoints: if validation let a bad config through, the process
            // would hang retrying instead of exiting at once.
            .envs(UNREACHABLE)
            .envs(env.iter().copied()),
    );
    (out.code, out.text(), started.elapsed())
}

#[test]
fn bad_settings_exit_64_naming_the_setting_and_the_fix() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("KDEDUP_BROKERS", "")], "KDEDUP_BROKERS"),
        (&[("KDEDUP_TTL", "a week")], "KDEDUP_TTL"),
        (&[("KDEDUP_ID_FROM", "body:/id")], "KDEDUP_ID_FROM"),
        (&[("KDEDUP_DB_SCHEMA", "public; drop")], "KDEDUP_DB_SCHEMA"),
        (
            &[("KDEDUP_DATABASE_URL", "mysql://x@y/z")],
            "KDEDUP_DATABASE_URL",
        ),
        (&[("KDEDUP_OUTPUT_TOPIC", "orders")], "KDEDUP_OUTPUT_TOPIC"),
        (
            &[("KDEDUP_METRICS_ADDR", "everywhere")],
            "KDEDUP_METRICS_ADDR",
        ),
        (
            &[("KDEDUP_KAFKA_ENABLE_AUTO_OFFSET_STORE", "true")],
            "KDEDUP_KAFKA_ENABLE_AUTO_OFFSET_STORE",
        ),
        (
            &[
                ("KDEDUP_KAFKA_SESSION_TIMEOUT_MS", "6000"),
                ("KDEDUP_SHUTDOWN_TIMEOUT", "25s"),
            ],
            "session.timeout.ms",
        ),
        (&[("KDEDUP_BATCH_SIZE", "lots")], "batch-size"),
    ];
    for (env, needle) in cases {
        let (code, text, took) = run(env);
        assert_eq!(code, Some(64), "{env:?}: {text}");
        assert!(
            text.contains(needle),
            "{env:?} should name {needle}: {text}"
        );
        assert!(
            took < Duration::from_secs(5),
            "{env:?} took {took:?}: it connected to something"
        );
        assert!(!text.contains("s3cret-pw"), "password leaked: {text}");
    }
}

#[test]
fn missing_database_url_names_both_variables() {
    let out = capture(
        Command::new(env!("CARGO_BIN_EXE_kdedup"))
            .args([
                "run",
                "--brokers",
                "b:1",
                "--group-id",
                "g",
                "--input-topics",
                "a",
                "--output-topic",
                "b",
            ])
            .env_clear(),
    );
    let text = out.stderr;
    assert_eq!(out.code, Some(64), "{text}");
    assert!(
        text.contains("KDEDUP_DATABASE_URL") && text.contains("DATABASE_URL"),
        "{text}"
    );
}

#[test]
fn help_lists_every_setting_with_its_environment_variable() {
    let out = capture(Command::new(env!("CARGO_BIN_EXE_kdedup")).args(["run", "--help"]));
    assert_eq!(out.code, Some(0));
    let text = out.stdout;
    for var in [
        "KDEDUP_BROKERS",
        "KDEDUP_TTL",
        "KDEDUP_ID_FROM",
        "KDEDUP_DLQ_TOPIC",
        "KDEDUP_METRICS_ADDR",
    ] {
        assert!(text.contains(var), "{var} missing from --help");
    }
}

/// `kdedup run` with `env`, stopped after `wait`: what it logged.
fn started(env: &[(&str, &str)], wait: Duration) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kdedup"))
        .arg("run")
        .env_clear()
        .envs(UNREACHABLE)
        .envs([
            ("KDEDUP_METRICS_ADDR", "127.0.0.1:0"),
            ("KDEDUP_LOG_FORMAT", "json"),
        ])
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kdedup");
    std::thread::sleep(wait);
    let running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(running, "kdedup exited at start:\n{text}");
    text
}

#[test]
fn a_misspelt_variable_is_named_with_the_setting_it_resembles() {
    let text = started(
        &[("KDEDUP_GROUPID", "orders-app"), ("KDEDUP_BATCHSIZE", "10")],
        Duration::from_secs(1),
    );
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("unknown KDEDUP_* variable"))
        .collect();
    assert_eq!(warnings.len(), 2, "{text}");
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("KDEDUP_GROUPID") && l.contains("KDEDUP_GROUP_ID")),
        "{text}"
    );
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("KDEDUP_BATCHSIZE") && l.contains("KDEDUP_BATCH_SIZE")),
        "{text}"
    );
}

#[test]
fn kubernetes_service_links_are_neither_settings_nor_kafka_properties() {
    // What a pod gets for Services named kdedup and kdedup-kafka in its namespace.
    let text = started(
        &[
            ("KDEDUP_SERVICE_HOST", "10.0.0.7"),
            ("KDEDUP_SERVICE_PORT", "9464"),
            ("KDEDUP_PORT", "tcp://10.0.0.7:9464"),
            ("KDEDUP_PORT_9464_TCP_ADDR", "10.0.0.7"),
            ("KDEDUP_KAFKA_SERVICE_HOST", "10.0.0.8"),
            ("KDEDUP_KAFKA_PORT", "tcp://10.0.0.8:9092"),
            ("KDEDUP_KAFKA_PORT_9092_TCP_PROTO", "tcp"),
        ],
        Duration::from_secs(1),
    );
    assert!(!text.contains("unknown KDEDUP_* variable"), "{text}");
    assert!(!text.contains("librdkafka refuses"), "{text}");
}

#[test]
fn prune_offers_only_the_settings_of_one_round() {
    let out = capture(Command::new(env!("CARGO_BIN_EXE_kdedup")).args(["prune", "--help"]));
    let help = out.text();
    assert_eq!(out.code, Some(0), "{help}");
    for offered in ["--prune-batch-size", "--prune-pause", "--database-url"] {
        assert!(help.contains(offered), "{offered} missing:\n{help}");
    }
    for meaningless in ["--pruner ", "--prune-interval"] {
        assert!(
            !help.contains(meaningless),
            "{meaningless} offered:\n{help}"
        );
    }
}
