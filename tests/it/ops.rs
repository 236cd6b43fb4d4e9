//! `kdedup inspect` and `kdedup stats` against tables a real sidecar filled, and the
//! per-scope `gate_counters` totals the gate statement keeps.

use std::process::Command;
use std::time::Duration;

use crate::helpers::*;
use serde_json::Value;

/// Runs `kdedup <args>` with the database settings of `cfg`: (exit code, stdout).
fn kdedup(cfg: &SidecarConfig, args: &[&str]) -> (Option<i32>, String) {
    let out = capture(
        Command::new(env!("CARGO_BIN_EXE_kdedup"))
            .args(args)
            .env_clear()
            .env("KDEDUP_DATABASE_URL", &cfg.env["KDEDUP_DATABASE_URL"])
            .env("KDEDUP_DB_SCHEMA", &cfg.env["KDEDUP_DB_SCHEMA"]),
    );
    assert!(
        out.code == Some(2) || out.stderr.is_empty(),
        "kdedup {args:?} wrote to stderr: {}",
        out.stderr
    );
    (out.code, out.stdout)
}

fn json(cfg: &SidecarConfig, args: &[&str]) -> (Option<i32>, Value) {
    let (code, out) = kdedup(cfg, args);
    let doc = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"));
    (code, doc)
}

fn event(tenant: &str, partition: i32, id: &str, seq: u64) -> In {
    let mut ev = In::event(partition, id, seq);
    ev.headers
        .push(("tenant".into(), tenant.as_bytes().to_vec()));
    ev
}

#[tokio::test(flavor = "multi_thread")]
async fn inspect_and_stats_report_what_the_gate_recorded() {
    let kafka = Cluster::shared();
    let t = names("ops");
    kafka.create_topic(&t.input, 2).await;
    // Two tenants (scope from a header) with the same 40 ids each. Tenant a sends every
    // 5th id twice in a row (8 duplicates), tenant b re-sends every 4th id at the end, in
    // later batches (10 duplicates).
    let mut msgs = Vec::new();
    let mut later = Vec::new();
    for i in 0..40u64 {
        let id = format!("ev-{i}");
        let p = (i % 2) as i32;
        msgs.push(event("a", p, &id, i));
        if i % 5 == 0 {
            msgs.push(event("a", p, &id, i));
        }
        msgs.push(event("b", p, &id, i));
        if i % 4 == 0 {
            later.push(event("b", p, &id, i));
        }
    }
    msgs.extend(later);
    let total = msgs.len();
    kafka.produce(&t.input, &msgs).await;

    // First life without a relay: every first sighting stays queued in the outbox.
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .set("KDEDUP_SCOPE", "header:tenant")
        .set("KDEDUP_BATCH_SIZE", "20")
        .set("KDEDUP_PRUNER", "false");
    let mut first = Sidecar::start(&cfg.clone().set("KDEDUP_RELAY", "false"), "ops_first");
    wait_until(Duration::from_secs(90), "everything gated", || {
        first.metric("kdedup_events_consumed_total") as usize >= total
            && first.metric("kdedup_events_gated_total") as usize >= 80
    })
    .await;
    let first_duplicates = first.metric("kdedup_duplicates_total");
    assert_eq!(first_duplicates, 18.0);

    let (code, doc) = json(&cfg, &["inspect", "ev-5", "--scope", "a", "--json"]);
    assert_eq!(code, Some(0), "{doc}");
    assert_eq!(doc["found"], true);
    let m = &doc["matches"][0];
    assert_eq!(m["scope"], "a");
    assert_eq!(m["status"], "queued for output", "{doc}");
    assert!(m["queued_since"].is_string(), "{doc}");
    assert_eq!(m["source_topic"], t.input.as_str());
    assert_eq!(m["source_partition"], 1);
    assert_eq!(m["expired"], false);
    assert_eq!(m["payload_hash"].as_str().unwrap().len(), 32, "{doc}");

    let (code, stats) = json(&cfg, &["stats", "--json"]);
    assert_eq!(code, Some(0));
    assert_eq!(stats["processed_events"]["rows"], 80, "{stats}");
    assert_eq!(stats["processed_events"]["rows_exact"], true);
    assert_eq!(stats["outbox"]["rows"], 80, "{stats}");
    assert!(stats["outbox"]["oldest_age_seconds"].is_number());
    assert_eq!(stats["duplicates_avoided"], 18, "{stats}");
    assert_eq!(stats["forwarded"], 80);
    let scopes = stats["scopes"].as_array().unwrap();
    assert_eq!(scopes.len(), 2, "{stats}");
    assert_eq!(
        (&scopes[0]["scope"], &scopes[0]["duplicates"]),
        (&"b".into(), &10.into())
    );
    assert_eq!(
        (&scopes[1]["scope"], &scopes[1]["duplicates"]),
        (&"a".into(), &8.into())
    );
    assert_eq!(first.sigterm(Duration::from_secs(20)), Some(0));

    // Second life with the relay: the outbox drains.
    let second = Sidecar::start(&cfg, "ops_second");
    wait_until(Duration::from_secs(90), "outbox drained", || {
        second.metric("kdedup_events_forwarded_total") >= 80.0
            && json(&cfg, &["stats", "--json"]).1["outbox"]["rows"] == 0
    })
    .await;

    let (code, text) = kdedup(&cfg, &["inspect", "ev-5"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("\"ev-5\""), "{text}");
    assert!(text.contains("seen in 2 scopes"), "{text}");
    assert_eq!(
        text.matches("forwarded (no outbox row left").count(),
        2,
        "{text}"
    );
    assert!(
        text.contains(&format!("{} partition 1 offset", t.input)),
        "{text}"
    );

    // Every duplicate either process counted is in the totals, and nothing else.
    let (_, stats) = json(&cfg, &["stats", "--json"]);
    assert_eq!(
        stats["duplicates_avoided"].as_f64().unwrap(),
        first_duplicates + second.metric("kdedup_duplicates_total"),
        "{stats}"
    );
    assert_eq!(stats["forwarded"], 80);
    let (code, text) = kdedup(&cfg, &["stats"]);
    assert_eq!(code, Some(0));
    assert!(text.contains("80 rows (exact count)"), "{text}");
    assert!(text.contains("duplicates avoided"), "{text}");
    drop(second);

    // An expired row the pruner has not deleted yet.
    let pool = pg().await;
    sqlx::query(&format!(
        "UPDATE \"{}\".processed_events SET expires_at = now() - interval '1 minute'
         WHERE scope = 'b' AND event_id = 'ev-5'",
        t.schema
    ))
    .execute(&pool)
    .await
    .unwrap();
    let (code, doc) = json(&cfg, &["inspect", "ev-5", "--json"]);
    assert_eq!(code, Some(0));
    assert_eq!(doc["matches"][0]["expired"], false, "{doc}");
    assert_eq!(doc["matches"][1]["scope"], "b");
    assert_eq!(doc["matches"][1]["expired"], true, "{doc}");
    let (_, text) = kdedup(&cfg, &["inspect", "ev-5", "--scope", "b"]);
    assert!(text.contains("expired: the next sighting"), "{text}");
    let (_, stats) = json(&cfg, &["stats", "--json"]);
    assert_eq!(stats["processed_events"]["expired_awaiting_prune"], 1);

    // Absent ids exit 1; a database that cannot be read exits 2.
    let (code, text) = kdedup(&cfg, &["inspect", "never-sent"]);
    assert_eq!(code, Some(1));
    assert!(text.contains("never seen, or expired and pruned"), "{text}");
    let (code, doc) = json(&cfg, &["inspect", "ev-5", "--scope", "c", "--json"]);
    assert_eq!(code, Some(1));
    assert_eq!(doc["found"], false);
    let (code, _) = kdedup(
        &cfg.clone().set("KDEDUP_DB_SCHEMA", "kdedup_no_such_schema"),
        &["stats"],
    );
    assert_eq!(code, Some(2));

    drop_schema(&pool, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scope_new_to_a_schema_that_holds_others_is_warned_about_at_start() {
    let kafka = Cluster::shared();
    let t = names("newscope");
    kafka.create_topic(&t.input, 1).await;
    let pool = pg().await;
    // A schema a group named orders-v1 has been gating (its scope: the group id).
    let cfg = SidecarConfig::new("orders-v1", &t.input, &t.output, &t.schema);
    let (code, _, err) = kdedup_command(&cfg, &["migrate"]);
    assert_eq!(code, Some(0), "{err}");
    sqlx::query(&format!(
        "INSERT INTO \"{}\".gate_counters (scope, duplicates, forwarded) VALUES ('orders-v1', 5, 500)",
        t.schema
    ))
    .execute(&pool)
    .await
    .unwrap();

    // The group renamed (a blue/green deploy): its default scope is new to the schema.
    let renamed = cfg.clone().set("KDEDUP_GROUP_ID", "orders-v2");
    let s = Sidecar::start(&renamed, "newscope_v2");
    s.wait_ready(Duration::from_secs(60)).await;
    let log = std::fs::read_to_string(&s.log).unwrap();
    let warning = log
        .lines()
        .find(|l| l.contains("this scope has never been gated in this schema"))
        .unwrap_or_else(|| panic!("no warning:\n{log}"));
    assert!(warning.contains(r#""scope":"orders-v2""#), "{warning}");
    assert!(
        warning.contains("orders-v1"),
        "names the scopes it holds: {warning}"
    );
    assert!(warning.contains("KDEDUP_SCOPE"), "names the fix: {warning}");
    drop(s);

    // The fix: the scope pinned to the old one. No warning.
    let pinned = renamed.set("KDEDUP_SCOPE", "orders-v1");
    let s = Sidecar::start(&pinned, "newscope_pinned");
    s.wait_ready(Duration::from_secs(60)).await;
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(!log.contains("never been gated"), "{log}");
    drop(s);
    drop_schema(&pool, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_that_never_consumed_still_exports_a_flat_consumed_series() {
    let kafka = Cluster::shared();
    let t = names("flatseries");
    kafka.create_topic(&t.input, 1).await;
    let s = Sidecar::start(
        &SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema),
        "flatseries",
    );
    s.wait_ready(Duration::from_secs(60)).await;
    // KdedupNoProgress is `rate(kdedup_events_consumed_total) == 0 and lag > 0`: without a
    // series from the start, a sidecar stuck before its first message would never fire it.
    let text = s.metrics_text();
    let series = format!("kdedup_events_consumed_total{{topic=\"{}\"}} 0", t.input);
    assert!(
        text.lines().any(|l| l == series),
        "no {series:?} in:\n{text}"
    );
    drop(s);
    drop_schema(&pg().await, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_output_topic_makes_the_sidecar_unready_with_an_error_until_it_exists() {
    let kafka = Cluster::shared();
    let t = names("notopic");
    kafka.create_topic(&t.input, 1).await;
    // Topics managed by the operator, and the output and dead-letter topics forgotten.
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .set("KDEDUP_CREATE_TOPICS", "false");
    let s = Sidecar::start(&cfg, "notopic");
    wait_until(
        Duration::from_secs(60),
        "readiness names the missing topic",
        || {
            s.get("/readyz")
                .is_some_and(|(code, body)| code == 503 && body.contains("topic_missing"))
        },
    )
    .await;
    let log = std::fs::read_to_string(&s.log).unwrap();
    for topic in [&t.output, &t.dlq] {
        assert!(
            log.lines().any(|l| l.contains(r#""level":"ERROR""#)
                && l.contains("does not exist")
                && l.contains(topic.as_str())),
            "no ERROR naming {topic}:\n{log}"
        );
    }

    // The operator creates them: ready again, and events flow.
    kafka.create_topic(&t.output, 1).await;
    kafka.create_topic(&t.dlq, 1).await;
    s.wait_ready(Duration::from_secs(60)).await;
    let msgs: Vec<In> = (0..10)
        .map(|i| In::event(0, &format!("n-{i}"), i))
        .collect();
    kafka.produce(&t.input, &msgs).await;
    assert_eq!(
        kafka
            .read_topic(&t.output, 10, Duration::from_secs(30))
            .len(),
        10
    );
    drop(s);
    drop_schema(&pg().await, &t.schema).await;
}
