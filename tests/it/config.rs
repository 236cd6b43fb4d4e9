//! Bad configuration exits 64 (EX_USAGE) with a message naming the setting and the fix,
//! before anything connects to Kafka or Postgres.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::helpers::capture;

fn run(env: &[(&str, &str)]) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    let out = capture(
        Command::new(env!("CARGO_BIN_EXE_kdedup"))
            .arg("run")
            .env_clear()
            // Unreachable endpoints: if validation let a bad config through, the process
            // would hang retrying instead of exiting at once.
            .envs([
                ("KDEDUP_BROKERS", "127.0.0.1:1"),
                ("KDEDUP_GROUP_ID", "g"),
                ("KDEDUP_INPUT_TOPICS", "orders"),
                ("KDEDUP_OUTPUT_TOPIC", "orders.dedup"),
                (
                    "KDEDUP_DATABASE_URL",
                    "postgres://kd:s3cret-pw@127.0.0.1:1/app",
                ),
            ])
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
