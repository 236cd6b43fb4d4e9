//! Postgres over TLS, against a real server that requires it: a second local cluster
//! (`scripts/pg-tls.sh`, started by `make test`) with a throwaway CA, `ssl = on`,
//! `hostssl ... trust` and `hostnossl ... reject`.
//!
//! Every command that talks to Postgres connects with `sslmode=verify-full`; a wrong CA,
//! a plaintext connection and a URL parameter the client would ignore are refused at
//! once, naming the setting and the fix, never retried for ever.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::helpers::*;

fn tls_dir() -> PathBuf {
    std::env::var("KDEDUP_TEST_TLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tmp/pg-tls"))
}

fn tls_port() -> String {
    std::env::var("KDEDUP_TEST_TLS_PG_PORT").unwrap_or_else(|_| "5433".into())
}

/// The TLS cluster's `test` database, reached by `host` with the given TLS parameters.
fn tls_url(host: &str, params: &str) -> String {
    format!("postgres://postgres@{host}:{}/test?{params}", tls_port())
}

fn verify_full() -> String {
    tls_url(
        "localhost",
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            tls_dir().join("ca.crt").display()
        ),
    )
}

async fn tls_pool() -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&verify_full())
        .await
        .expect("connect to the TLS cluster (scripts/pg-tls.sh sets it up)")
}

fn with_url(cfg: &SidecarConfig, url: &str) -> SidecarConfig {
    cfg.clone().set("KDEDUP_DATABASE_URL", url)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_command_works_over_verify_full_and_the_sidecars_connections_are_encrypted() {
    let kafka = Cluster::shared();
    let t = names("tls");
    kafka.create_topic(&t.input, 2).await;
    let cfg = with_url(
        &SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema),
        &verify_full(),
    );

    let (code, _, err) = kdedup_command(&cfg, &["migrate"]);
    assert_eq!(code, Some(0), "migrate over verify-full: {err}");

    let mut s = Sidecar::start(&cfg, "tls-run");
    s.wait_ready(Duration::from_secs(60)).await;
    let msgs: Vec<In> = (0..200)
        .map(|i| In::event(i % 2, &format!("t-{}", i % 150), i as u64))
        .collect();
    kafka.produce(&t.input, &msgs).await;
    let out = kafka.read_topic(&t.output, 150, Duration::from_secs(60));
    assert_eq!(out.len(), 150, "each distinct id forwarded once");

    // Postgres' own view: every connection of the sidecar (application_name kdedup) is
    // encrypted, and there is at least the pool's and the relay's.
    let pool = tls_pool().await;
    let conns: Vec<(bool, Option<String>)> = sqlx::query_as(
        "SELECT s.ssl, s.version FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.application_name = 'kdedup' AND a.datname = 'test'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(conns.len() >= 2, "sidecar connections seen: {conns:?}");
    assert!(
        conns.iter().all(|(ssl, version)| *ssl && version.is_some()),
        "{conns:?}"
    );
    assert!(
        std::fs::read_to_string(&s.log)
            .unwrap()
            .contains("connected to Postgres over TLS"),
        "the start-up log says how Postgres is reached"
    );
    assert_eq!(s.sigterm(Duration::from_secs(20)), Some(0));

    // The one-shot commands, over the same URL.
    let (code, out, err) = kdedup_command(&cfg, &["stats"]);
    assert_eq!(code, Some(0), "stats: {err}");
    assert!(out.contains("150"), "{out}");
    let (code, out, err) = kdedup_command(&cfg, &["inspect", "t-7"]);
    assert_eq!(code, Some(0), "inspect: {out}{err}");
    let (code, _, err) = kdedup_command(&cfg, &["prune"]);
    assert_eq!(code, Some(0), "prune: {err}");
    let (code, out, err) = kdedup_command(
        &cfg,
        &["replay", "--from-topic", &t.input, "--idle-timeout", "2s"],
    );
    assert_eq!(code, Some(0), "replay: {out}{err}");
    assert_eq!(summary_value(&out, "forwarded"), 0, "{out}");

    // A client certificate (sslcert/sslkey) is presented and accepted too.
    let dir = tls_dir();
    let client_cert = with_url(
        &cfg,
        &format!(
            "{}&sslcert={}&sslkey={}",
            verify_full(),
            dir.join("client.crt").display(),
            dir.join("client.key").display()
        ),
    );
    let (code, _, err) = kdedup_command(&client_cert, &["stats"]);
    assert_eq!(code, Some(0), "stats with a client certificate: {err}");
    drop_schema(&pool, &t.schema).await;
}

/// Each of these is a setting the server (or the client) refuses: the process exits at
/// once with `EX_CONFIG` (78), naming the setting and a fix, and never retries.
#[tokio::test(flavor = "multi_thread")]
async fn refused_tls_settings_exit_at_once_naming_the_setting() {
    let kafka = Cluster::shared();
    let t = names("tlsbad");
    kafka.create_topic(&t.input, 1).await;
    let base = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema);
    let dir = tls_dir();
    // (what, URL, what the fix mentions, exit code of run/migrate, of stats)
    let cases = [
        (
            "a CA that did not sign the server's certificate",
            tls_url(
                "localhost",
                &format!(
                    "sslmode=verify-full&sslrootcert={}",
                    dir.join("wrong-ca.crt").display()
                ),
            ),
            "sslrootcert",
            78,
            2,
        ),
        (
            "plaintext to a server that requires TLS",
            tls_url("127.0.0.1", "sslmode=disable"),
            "pg_hba.conf",
            78,
            2,
        ),
        // Checked before connecting: a configuration error (64) like any other.
        (
            "a CA file that does not exist",
            tls_url(
                "localhost",
                "sslmode=verify-full&sslrootcert=/nonexistent/ca.crt",
            ),
            "sslrootcert",
            64,
            64,
        ),
    ];
    for (what, url, fix_mentions, code, stats_code) in cases {
        let cfg = with_url(&base, &url);
        for command in ["run", "migrate", "stats"] {
            let started = Instant::now();
            let out = capture(kdedup(&cfg, &[command]).env("KDEDUP_METRICS_ADDR", "127.0.0.1:0"));
            let text = out.text();
            let expected = if command == "stats" { stats_code } else { code };
            assert_eq!(out.code, Some(expected), "{what}, kdedup {command}: {text}");
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{what}, kdedup {command} took {:?}: retried instead of failing",
                started.elapsed()
            );
            assert!(
                text.contains("KDEDUP_DATABASE_URL") && text.contains(fix_mentions),
                "{what}, kdedup {command}: the error names the setting and the fix: {text}"
            );
        }
    }

    // A misspelt TLS parameter would be ignored by the client (and the connection made in
    // plaintext where the server allows it): refused before connecting, exit 64.
    let cfg = with_url(&base, &tls_url("localhost", "ssl_mode=require"));
    let (code, _, err) = kdedup_command(&cfg, &["migrate"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("\"ssl_mode\""), "{err}");
}

/// Secrets with `/`, `@` and `:` in them never reach the output, on any path that used to
/// print them: a Postgres URL (unencoded, so the client cannot even parse it), a URL
/// password parameter, a Kafka property librdkafka refuses, and the start-up config line.
#[tokio::test(flavor = "multi_thread")]
async fn secrets_with_slash_at_and_colon_never_reach_the_logs() {
    let kafka = Cluster::shared();
    let t = names("secrets");
    kafka.create_topic(&t.input, 1).await;
    let secret = "s3/cr@t:pw";
    let base = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema);
    let runs: Vec<(&str, SidecarConfig)> = vec![
        (
            "unencoded password in the URL",
            base.clone().set(
                "KDEDUP_DATABASE_URL",
                &format!("postgres://postgres:{secret}@127.0.0.1:5432/test"),
            ),
        ),
        (
            "password parameter and a refused Kafka property",
            base.clone()
                .set(
                    "KDEDUP_DATABASE_URL",
                    &format!("postgres://postgres@127.0.0.1:5432/test?password={secret}"),
                )
                .set("KDEDUP_KAFKA_SASL_JAAS_CONFIG", secret),
        ),
        (
            "secret Kafka properties in the start-up line",
            base.clone()
                .set("KDEDUP_KAFKA_SASL_PASSWORD", secret)
                .set(
                    "KDEDUP_KAFKA_SASL_OAUTHBEARER_CONFIG",
                    &format!("secret={secret}"),
                )
                .set("KDEDUP_KAFKA_SECURITY_PROTOCOL", "sasl_plaintext")
                .set("KDEDUP_KAFKA_SASL_MECHANISM", "PLAIN")
                .set("KDEDUP_KAFKA_SASL_USERNAME", "kdedup")
                .set(
                    "KDEDUP_DATABASE_URL",
                    &format!(
                        "postgres://postgres:{}@127.0.0.1:5432/test",
                        secret
                            .replace('/', "%2F")
                            .replace('@', "%40")
                            .replace(':', "%3A")
                    ),
                ),
        ),
    ];
    for (what, cfg) in runs {
        let mut run = Capturing::spawn(
            kdedup(&cfg, &["run"])
                .env("KDEDUP_METRICS_ADDR", "127.0.0.1:0")
                .env("KDEDUP_LOG", "debug"),
        );
        // Long enough to start (or fail), connect, and try the broker.
        let deadline = Instant::now() + Duration::from_secs(8);
        while Instant::now() < deadline && run.running() {
            std::thread::sleep(Duration::from_millis(100));
        }
        run.sigterm();
        let text = run.finish(Duration::from_secs(60)).await.text();
        assert!(!text.is_empty(), "{what}: no output at all");
        for piece in [secret, "s3/cr", "cr@t", "s3%2Fcr"] {
            assert!(
                !text.contains(piece),
                "{what}: {piece:?} was printed:\n{text}"
            );
        }
    }
}
