//! Configuration drift and start-up failures, as an operator meets them: two Deployments
//! that drifted apart refuse to run side by side (exit 78, naming the running sidecar and
//! the fix), a conflict that slipped past the start check is an ERROR and a metric, a role
//! that cannot run the migrations ends the start with the fix instead of retrying for ever,
//! and an unreachable broker does not flood the log.

use std::time::{Duration, Instant};

use crate::helpers::*;

/// Two sidecars: the first runs, the second is refused while it does and starts once it
/// stopped cleanly.
#[tokio::test(flavor = "multi_thread")]
async fn a_drifted_deployment_is_refused_while_the_other_runs() {
    let kafka = Cluster::shared();
    let t = names("drift_group");
    kafka.create_topic(&t.input, 1).await;
    let first_cfg =
        SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema).set("KDEDUP_SCOPE", "orders");
    let mut first = Sidecar::start(&first_cfg, "drift_group_a");
    first.wait_ready(Duration::from_secs(60)).await;
    let info = first.metrics_text();
    let series = format!(
        "kdedup_config_info{{group_id=\"{}\",output_topic=\"{}\",schema=\"{}\",scope=\"orders\",sink=\"kafka\"}} 1",
        t.group, t.output, t.schema
    );
    assert!(info.lines().any(|l| l == series), "no {series} in:\n{info}");
    assert_eq!(first.metric("kdedup_config_conflicts"), 0.0);

    // The same group in another schema (a second Deployment whose KDEDUP_DB_SCHEMA drifted).
    let other_schema = format!("{}_b", t.schema);
    let drifted = first_cfg.clone().set("KDEDUP_DB_SCHEMA", &other_schema);
    let started = Instant::now();
    let (code, _, stderr) = kdedup_command(&drifted, &["run"]);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        stderr.contains(&format!(
            "consumer group {} is also gated in schema {}",
            t.group, t.schema
        )) && stderr.contains("KDEDUP_DB_SCHEMA"),
        "names the conflict and the fix: {stderr}"
    );

    // Another output topic in the same schema: one outbox, one relay.
    let other_output = SidecarConfig::new(
        &format!("{}_b", t.group),
        &t.input,
        &format!("{}_b", t.output),
        &t.schema,
    );
    let (code, _, stderr) = kdedup_command(&other_output, &["run"]);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("one outbox and one relay"), "{stderr}");

    // Nothing of either reached the running sidecar's table or its output.
    let pool = pg().await;
    assert_eq!(count(&pool, &t.schema, "kdedup_sidecars").await, 1);

    // Stopped cleanly, the first leaves the registry: the moved Deployment may start now.
    assert_eq!(first.sigterm(Duration::from_secs(30)), Some(0));
    assert_eq!(count(&pool, &t.schema, "kdedup_sidecars").await, 0);
    let moved = Sidecar::start(&drifted, "drift_group_b");
    moved.wait_ready(Duration::from_secs(60)).await;
    drop(moved);
    drop_schema(&pool, &t.schema).await;
    drop_schema(&pool, &other_schema).await;
}

/// A conflicting sidecar that appears after the start check (two that started at the same
/// moment both pass it) is found by the next heartbeat.
#[tokio::test(flavor = "multi_thread")]
async fn a_conflict_that_appears_while_running_is_an_error_and_a_metric() {
    let kafka = Cluster::shared();
    let t = names("drift_live");
    kafka.create_topic(&t.input, 1).await;
    let s = Sidecar::start(
        &SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema),
        "drift_live",
    );
    s.wait_ready(Duration::from_secs(60)).await;
    // What a sidecar of the same output in another schema records, as its heartbeat would.
    let pool = pg().await;
    let other = format!("{}_b", t.schema);
    sqlx::query(&format!("CREATE SCHEMA {other}"))
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(&format!(
        "CREATE TABLE {other}.kdedup_sidecars (LIKE {}.kdedup_sidecars INCLUDING ALL)",
        t.schema
    ))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(&format!(
        "INSERT INTO {other}.kdedup_sidecars (instance, group_id, scope, sink, output, input_topics, version, host)
         VALUES ('pod-b:1:0', 'another-group', 'another-group', 'kafka', $1, '{{x}}', '0', 'pod-b')"
    ))
    .bind(&t.output)
    .execute(&pool)
    .await
    .unwrap();
    // The heartbeat runs every 30 s.
    wait_until(Duration::from_secs(45), "the conflict is counted", || {
        s.metric("kdedup_config_conflicts") == 1.0
    })
    .await;
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(
        log.lines().any(|l| l.contains(r#""level":"ERROR""#)
            && l.contains(&format!(
                "output {} is also fed from schema {other}",
                t.output
            ))
            && l.contains("pod-b")),
        "no ERROR naming the conflict:\n{log}"
    );
    drop(s);
    drop_schema(&pool, &t.schema).await;
    drop_schema(&pool, &other).await;
}

/// A role that may not create kdedup's schema: the start ends after a few tries, exit 78,
/// naming the privilege and the fix (it used to retry with a WARN for ever).
#[tokio::test(flavor = "multi_thread")]
async fn migrations_the_role_may_not_run_end_the_start_with_the_fix() {
    let t = names("drift_role");
    let pool = pg().await;
    let role = format!("{}_role", t.schema);
    sqlx::query(&format!("CREATE ROLE {role} LOGIN"))
        .execute(&pool)
        .await
        .unwrap();
    let url = database_url().replacen("postgres@", &format!("{role}@"), 1);
    assert!(
        url.contains(&role),
        "the test database URL names the user postgres: {url}"
    );
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .set("KDEDUP_DATABASE_URL", &url)
        .set("KDEDUP_BROKERS", "127.0.0.1:1");
    let started = Instant::now();
    let (code, _, stderr) = kdedup_command(&cfg, &["run"]);
    let took = started.elapsed();
    sqlx::query(&format!("DROP ROLE {role}"))
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(code, Some(78), "{stderr}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(
        stderr.contains(&format!("schema {}", t.schema))
            && stderr.contains("permission denied")
            && stderr.contains("KDEDUP_MIGRATE_ON_START=false"),
        "{stderr}"
    );
}

/// Before the first check of a dependency, `/readyz` says it is not checked yet rather
/// than failing; an unreachable Postgres is named as failing.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_tells_unchecked_from_failing() {
    let t = names("drift_ready");
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema).set(
        "KDEDUP_DATABASE_URL",
        "postgres://postgres@127.0.0.1:1/test",
    );
    let s = Sidecar::start(&cfg, "drift_ready");
    wait_until(Duration::from_secs(20), "Postgres reported down", || {
        s.get("/readyz").is_some_and(|(code, body)| {
            code == 503
                && body.starts_with("not ready: postgres, consumer_group; not checked yet: broker")
        })
    })
    .await;
}

/// An unreachable broker: librdkafka's errors are held to one line per kind per 30 s.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_broker_does_not_flood_the_log() {
    let t = names("drift_noisy");
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .set("KDEDUP_BROKERS", "127.0.0.1:1")
        .set("KDEDUP_LOG", "info");
    let s = Sidecar::start(&cfg, "drift_noisy");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let log = std::fs::read_to_string(&s.log).unwrap();
    let kafka_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("librdkafka") || l.contains("kafka client error"))
        .collect();
    assert!(
        !kafka_lines.is_empty(),
        "the failure is still logged:\n{log}"
    );
    assert!(
        kafka_lines.len() <= 20,
        "{} librdkafka lines in 10 s:\n{}",
        kafka_lines.len(),
        kafka_lines.join("\n")
    );
    drop(s);
    drop_schema(&pg().await, &t.schema).await;
}

/// `KDEDUP_MIGRATE_ON_START=false` on a schema nobody migrated: not ready, an ERROR naming
/// the fix, and the sidecar goes on by itself once the migration Job has run.
#[tokio::test(flavor = "multi_thread")]
async fn an_unmigrated_schema_is_waited_for_not_ready() {
    let kafka = Cluster::shared();
    let t = names("drift_unmigrated");
    kafka.create_topic(&t.input, 1).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .set("KDEDUP_MIGRATE_ON_START", "false");
    let s = Sidecar::start(&cfg, "drift_unmigrated");
    wait_until(
        Duration::from_secs(30),
        "not ready, naming the schema",
        || {
            s.get("/readyz")
                .is_some_and(|(code, body)| code == 503 && body.contains("schema_not_migrated"))
        },
    )
    .await;
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(
        log.lines().any(|l| l.contains(r#""level":"ERROR""#)
            && l.contains("kdedup migrate")
            && l.contains(&t.schema)),
        "{log}"
    );
    // The migration Job.
    let (code, _, stderr) = kdedup_command(&cfg, &["migrate"]);
    assert_eq!(code, Some(0), "{stderr}");
    s.wait_ready(Duration::from_secs(60)).await;
    kafka
        .produce(&t.input, &[In::event(0, "after-migrate", 1)])
        .await;
    assert_eq!(
        kafka
            .read_topic(&t.output, 1, Duration::from_secs(30))
            .len(),
        1
    );
    drop(s);
    drop_schema(&pg().await, &t.schema).await;
}
