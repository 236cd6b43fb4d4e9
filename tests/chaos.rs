//! `make chaos`: steady load while the sidecar is SIGKILLed at random moments (12 times)
//! and Postgres is restarted once, then the invariants of DESIGN.md are checked. Ignored
//! by `make test` (it takes a few minutes and restarts the shared Postgres); run it with
//! `make chaos`.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};

#[tokio::test(flavor = "multi_thread")]
#[ignore = "long; restarts the shared Postgres: run with make chaos"]
async fn chaos_kills_and_restarts_keep_every_invariant() {
    let t = names("chaos");
    create_topic(&t.input, 3).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
        .set("KDEDUP_BATCH_SIZE", "200")
        .set("KDEDUP_LOG", "info");

    // Steady load: 30 waves of 300 messages, ~25% duplicates and ~2% without an id.
    let input = t.input.clone();
    let load = tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(99);
        let (mut distinct, mut bad, mut total) = (HashSet::new(), 0usize, 0usize);
        let mut next = 0u64;
        for _ in 0..30 {
            let mut wave = Vec::new();
            for _ in 0..300 {
                let p = rng.random_range(0..3);
                let roll: f64 = rng.random();
                if roll < 0.02 {
                    wave.push(In {
                        partition: Some(p),
                        key: None,
                        value: Some(b"{}".to_vec()),
                        headers: vec![],
                    });
                    bad += 1;
                } else if roll < 0.27 && next > 0 {
                    let old = rng.random_range(0..next);
                    wave.push(In::event((old % 3) as i32, &format!("c-{old}"), old));
                } else {
                    wave.push(In::event((next % 3) as i32, &format!("c-{next}"), next));
                    distinct.insert(next);
                    next += 1;
                }
                total += 1;
            }
            produce(&input, &wave).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        (distinct.len(), bad, total)
    });

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut kills = 0;
    let mut sidecar = Sidecar::start(&cfg, "chaos");
    for round in 0..12 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        sidecar.kill9();
        kills += 1;
        if round == 6 {
            let version = std::fs::read_dir("/etc/postgresql")
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .file_name();
            let v = version.to_string_lossy().to_string();
            let status = std::process::Command::new("pg_ctlcluster")
                .args(["--skip-systemctl-redirect", &v, "main", "restart"])
                .status()
                .unwrap();
            assert!(status.success(), "postgres restart");
        }
        sidecar = Sidecar::start(&cfg, "chaos");
    }
    let (distinct, bad, total) = load.await.unwrap();
    wait_until(
        Duration::from_secs(180),
        "the last life settles everything",
        || {
            read_topic(&t.output, distinct, Duration::from_secs(3))
                .iter()
                .filter_map(|m| m.header("kdedup-event-id").map(str::to_string))
                .collect::<HashSet<_>>()
                .len()
                >= distinct
        },
    )
    .await;
    let out = read_topic(&t.output, distinct, Duration::from_secs(20));
    let mut counts: HashMap<String, usize> = HashMap::new();
    for m in &out {
        *counts
            .entry(m.header("kdedup-event-id").unwrap().to_string())
            .or_default() += 1;
    }
    let republished: usize = counts.values().map(|n| n - 1).sum();
    let pool = pg().await;
    let gated = count(&pool, &t.schema, "processed_events").await as usize;
    let dlq = read_topic(&t.dlq, bad, Duration::from_secs(20));
    let dlq_sources: HashSet<(String, String)> = dlq
        .iter()
        .map(|m| {
            (
                m.header("kdedup-source-partition").unwrap().to_string(),
                m.header("kdedup-source-offset").unwrap().to_string(),
            )
        })
        .collect();
    println!("chaos: {kills} SIGKILLs, 1 Postgres restart");
    println!("  input messages            {total}");
    println!("  distinct ids              {distinct}");
    println!("  without an id             {bad}");
    println!("  gate rows (forwarded once){gated:>6}");
    println!("  distinct ids on output    {}", counts.len());
    println!(
        "  output repeats (relay ack-before-delete window, carry kdedup-event-id) {republished}"
    );
    println!(
        "  dead-lettered (distinct source positions) {}",
        dlq_sources.len()
    );
    assert_eq!(gated, distinct, "the gate forwarded each id exactly once");
    assert_eq!(
        counts.len(),
        distinct,
        "every distinct input id reached the output"
    );
    assert_eq!(
        dlq_sources.len(),
        bad,
        "every message without an id is in the DLQ"
    );
    drop(sidecar);
    drop_schema(&pool, &t.schema).await;
}
