//! `kdedup replay` against the real broker and Postgres: the same gate, so a replay
//! forwards only what was never forwarded.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn replaying_the_whole_input_again_forwards_nothing() {
    let t = names("replay_all");
    create_topic(&t.input, 2).await;
    let msgs: Vec<In> = (0..400)
        .map(|i| In::event(i % 2, &format!("r-{i}"), i as u64))
        .collect();
    produce(&t.input, &msgs).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema);
    let s = Sidecar::start(&cfg, "replay_all");
    wait_until(Duration::from_secs(60), "forwarded", || {
        s.metric("kdedup_events_forwarded_total") >= 400.0
    })
    .await;

    let (code, dry, err) = kdedup_command(&cfg, &["replay", "--from-topic", &t.input, "--dry-run"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(summary_value(&dry, "would be forwarded"), 0, "{dry}");

    let (code, out, err) = kdedup_command(&cfg, &["replay", "--from-topic", &t.input]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(summary_value(&out, "read"), 400, "{out}");
    assert_eq!(summary_value(&out, "forwarded"), 0, "{out}");
    assert_eq!(summary_value(&out, "duplicates"), 400, "{out}");
    let output = read_topic(&t.output, 400, Duration::from_secs(20));
    assert_eq!(output.len(), 400, "nothing new reached the output topic");
    drop(s);
    drop_schema(&pg().await, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replaying_the_dlq_after_a_fix_forwards_exactly_the_dead_lettered_events_once() {
    let t = names("replay_dlq");
    create_topic(&t.input, 1).await;
    // 30 events carry their id only in the JSON body, which the first configuration does
    // not read: they are dead-lettered.
    let mut msgs = Vec::new();
    for i in 0..100u64 {
        let mut m = In::event(0, &format!("d-{i}"), i);
        if i % 10 < 3 {
            m.headers.clear();
        }
        msgs.push(m);
    }
    produce(&t.input, &msgs).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema);
    let s = Sidecar::start(&cfg, "replay_dlq");
    wait_until(Duration::from_secs(60), "settled", || {
        s.metric("kdedup_events_forwarded_total") >= 70.0
            && s.metric("kdedup_events_dead_lettered_total") >= 30.0
    })
    .await;

    // The fix: also read the id from the body. Replay the DLQ through the gate.
    let fixed = cfg
        .clone()
        .set("KDEDUP_ID_FROM", "header:event-id,json:/id");
    let (code, dry, err) = kdedup_command(&fixed, &["replay", "--dry-run"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(summary_value(&dry, "would be forwarded"), 30, "{dry}");
    let (code, out, err) = kdedup_command(&fixed, &["replay"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(summary_value(&out, "forwarded"), 30, "{out}");
    // Again: all of it is now a duplicate.
    let (code, again, err) = kdedup_command(&fixed, &["replay"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(summary_value(&again, "forwarded"), 0, "{again}");
    assert_eq!(summary_value(&again, "duplicates"), 30, "{again}");

    let output = read_topic(&t.output, 100, Duration::from_secs(20));
    assert_eq!(output.len(), 100, "every event exactly once");
    let replayed = output
        .iter()
        .find(|m| m.header("kdedup-event-id") == Some("d-0"))
        .unwrap();
    assert_eq!(
        replayed.header("kdedup-source"),
        Some(format!("{}/0/0", t.input).as_str()),
        "a replayed DLQ event points at its original position"
    );
    assert!(
        replayed.header("kdedup-dlq-reason").is_none(),
        "DLQ headers do not travel on"
    );
    drop(s);
    drop_schema(&pg().await, &t.schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn events_older_than_the_ttl_are_refused_without_force() {
    let t = names("replay_old");
    create_topic(&t.input, 1).await;
    produce(&t.input, &[In::event(0, "new-1", 1)]).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema).set("KDEDUP_TTL", "1h");
    // A dead-lettered event from 1970: its original timestamp travels in the DLQ headers.
    let mut old = In::event(0, "old-2", 2);
    old.headers
        .push(("kdedup-source-topic".into(), t.input.clone().into_bytes()));
    old.headers
        .push(("kdedup-source-partition".into(), b"0".to_vec()));
    old.headers
        .push(("kdedup-source-offset".into(), b"99".to_vec()));
    old.headers
        .push(("kdedup-source-timestamp".into(), b"1000".to_vec()));
    produce(&t.input, &[old]).await;
    let (code, out, err) = kdedup_command(&cfg, &["replay", "--from-topic", &t.input]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("older than the TTL") && err.contains("--force"),
        "{err}"
    );
    let (code, out, err) = kdedup_command(&cfg, &["replay", "--from-topic", &t.input, "--force"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(summary_value(&out, "forwarded"), 2, "{out}");
    assert_eq!(read_topic(&t.output, 2, Duration::from_secs(20)).len(), 2);
    drop_schema(&pg().await, &t.schema).await;
}
