//! Input and output that used to stop kdedup for good, against the real broker and real
//! Postgres: compressed input, header names that are not UTF-8, values the database
//! cannot store, records the output refuses, and payloads near the size limit. Each ends
//! forwarded once or in the dead-letter topic with a reason, and the partition goes on.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use crate::helpers::*;

fn ids(out: &[Out]) -> Vec<String> {
    out.iter()
        .map(|m| m.header("kdedup-event-id").unwrap_or("").to_string())
        .collect()
}

fn assert_each_once(out: &[Out], expected: &HashSet<String>) {
    let got = ids(out);
    let distinct: HashSet<String> = got.iter().cloned().collect();
    assert_eq!(got.len(), distinct.len(), "an id was forwarded twice");
    assert_eq!(&distinct, expected, "the ids on the output");
}

/// Input order per partition is output order per partition.
fn assert_ordered(out: &[Out]) {
    let mut last: BTreeMap<i32, u64> = BTreeMap::new();
    for m in out {
        let seq = m.json()["seq"].as_u64().expect("seq");
        if let Some(prev) = last.insert(m.partition, seq) {
            assert!(prev < seq, "partition {} went {prev} -> {seq}", m.partition);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn input_compressed_with_every_codec_is_forwarded() {
    let kafka = Cluster::shared();
    let t = names("codecs");
    kafka.create_topic(&t.input, 4).await;
    let codecs = ["gzip", "snappy", "lz4", "zstd"];
    let mut expected = HashSet::new();
    for (p, codec) in codecs.iter().enumerate() {
        let producer = kafka.producer_with(&[("compression.type", *codec)]);
        let msgs: Vec<In> = (0..50)
            .map(|i| In::event(p as i32, &format!("{codec}-{i}"), i))
            .collect();
        expected.extend(
            msgs.iter()
                .map(|m| String::from_utf8(m.headers[0].1.clone()).unwrap()),
        );
        for m in &msgs {
            send_waiting(&producer, record(&t.input, m))
                .await
                .expect("delivery")
                .unwrap_or_else(|(e, _)| panic!("{codec} produce: {e}"));
        }
    }
    let s = Sidecar::start(
        &SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema),
        "codecs",
    );
    s.wait_ready(Duration::from_secs(60)).await;
    let out = kafka.read_topic(&t.output, expected.len(), Duration::from_secs(90));
    assert_each_once(&out, &expected);
    assert_eq!(s.metric("kdedup_input_undecodable_total"), 0.0);
    assert!(s.ready(), "ready after reading every codec");
    drop(s);
    drop_schema(&pg().await, &t.schema).await;
}

/// A record whose header name is the given bytes. librdkafka's C API takes any bytes as
/// a header name; rdkafka's safe API only `&str`, so the name is added through the C API
/// on the headers' native handle (`BorrowedHeaders` is that handle, as rdkafka itself
/// treats it).
#[allow(unsafe_code)]
fn headers_with_raw_name(name: &[u8], value: &[u8]) -> rdkafka::message::OwnedHeaders {
    use rdkafka::message::{Header, OwnedHeaders};
    let hs = OwnedHeaders::new().insert(Header {
        key: "event-id",
        value: Some("raw-1"),
    });
    let native = hs.as_borrowed() as *const rdkafka::message::BorrowedHeaders
        as *mut rdkafka::bindings::rd_kafka_headers_t;
    // SAFETY: `native` is the live header list `hs` owns; librdkafka copies name and value.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_header_add(
            native,
            name.as_ptr().cast(),
            name.len() as isize,
            value.as_ptr().cast(),
            value.len() as isize,
        )
    };
    assert_eq!(
        err,
        rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
    );
    hs
}

#[tokio::test(flavor = "multi_thread")]
async fn a_header_name_that_is_not_utf8_is_dead_lettered_and_the_partition_goes_on() {
    let kafka = Cluster::shared();
    let t = names("hdrutf8");
    kafka.create_topic(&t.input, 1).await;
    let before: Vec<In> = (0..20)
        .map(|i| In::event(0, &format!("h-{i}"), i))
        .collect();
    let after: Vec<In> = (20..40)
        .map(|i| In::event(0, &format!("h-{i}"), i))
        .collect();
    kafka.produce(&t.input, &before).await;
    let p = kafka.producer();
    let poison = rdkafka::producer::FutureRecord::<Vec<u8>, Vec<u8>>::to(&t.input)
        .partition(0)
        .headers(headers_with_raw_name(&[0xff, 0xfe, b'x'], b"v"));
    p.send(poison, Duration::from_secs(10))
        .await
        .expect("raw header name produced");
    kafka.produce(&t.input, &after).await;

    let mut s = Sidecar::start(
        &SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema),
        "hdrutf8",
    );
    s.wait_ready(Duration::from_secs(60)).await;
    let out = kafka.read_topic(&t.output, 40, Duration::from_secs(60));
    let expected: HashSet<String> = (0..40).map(|i| format!("h-{i}")).collect();
    assert_each_once(&out, &expected);
    let dlq = kafka.read_topic(&t.dlq, 1, Duration::from_secs(30));
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].header("kdedup-dlq-reason"), Some("header_not_utf8"));
    assert_eq!(dlq[0].header("kdedup-source-offset"), Some("20"));
    assert!(
        matches!(s.child.try_wait(), Ok(None)),
        "the sidecar exited:\n{}",
        s.log_tail()
    );
    assert_eq!(s.sigterm(Duration::from_secs(20)), Some(0));
    drop_schema(&pg().await, &t.schema).await;
}

/// A database whose encoding cannot store every character: the rows it refuses (SQLSTATE
/// 22P05) are found by splitting the batch and dead-lettered with the SQLSTATE; every
/// other event of the batch is forwarded.
#[tokio::test(flavor = "multi_thread")]
async fn events_the_database_cannot_store_are_dead_lettered_and_the_rest_forwarded() {
    let kafka = Cluster::shared();
    let t = names("dataerr");
    kafka.create_topic(&t.input, 2).await;
    let admin = pg().await;
    let created = sqlx::query(
        "CREATE DATABASE kdedup_test_latin1 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
    )
    .execute(&admin)
    .await;
    if let Err(e) = created {
        // Another run made it already (42P04), which is fine.
        assert!(e.to_string().contains("already exists"), "{e}");
    }
    let url = database_url().replace("/test", "/kdedup_test_latin1");
    let mut msgs = Vec::new();
    let mut expected = HashSet::new();
    let mut refused = HashSet::new();
    for i in 0..60u64 {
        // A snowman has no LATIN1 encoding.
        let id = if i % 15 == 7 {
            format!("snow-☃-{i}")
        } else {
            format!("d-{i}")
        };
        if id.contains('☃') {
            refused.insert(id.clone());
        } else {
            expected.insert(id.clone());
        }
        msgs.push(In::event((i % 2) as i32, &id, i));
    }
    kafka.produce(&t.input, &msgs).await;
    let mut s = Sidecar::start(
        &SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema)
            .set("KDEDUP_DATABASE_URL", &url),
        "dataerr",
    );
    s.wait_ready(Duration::from_secs(60)).await;
    let out = kafka.read_topic(&t.output, expected.len(), Duration::from_secs(60));
    assert_each_once(&out, &expected);
    assert_ordered(&out);
    let dlq = kafka.read_topic(&t.dlq, refused.len(), Duration::from_secs(30));
    let dead: HashSet<String> = dlq
        .iter()
        .map(|m| m.header("event-id").unwrap_or("").to_string())
        .collect();
    assert_eq!(dead, refused);
    for m in &dlq {
        assert_eq!(m.header("kdedup-dlq-reason"), Some("db_refused"));
        assert!(
            m.header("kdedup-dlq-error")
                .is_some_and(|e| e.contains("22P05")),
            "{:?}",
            m.header("kdedup-dlq-error")
        );
    }
    assert!(matches!(s.child.try_wait(), Ok(None)), "{}", s.log_tail());
    assert_eq!(s.sigterm(Duration::from_secs(20)), Some(0));
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    assert_eq!(
        count(&pool, &t.schema, "processed_events").await,
        expected.len() as i64,
        "the refused events' gate rows did not commit: a replay can still write them"
    );
    drop_schema(&pool, &t.schema).await;
}

/// Rows the output topic refuses for good (here: larger than the producer's
/// `message.max.bytes`) go to the dead-letter topic with their source position; the rows
/// around them are forwarded in order and the outbox empties. New input that large is
/// dead-lettered at the gate instead, before it reaches the outbox.
#[tokio::test(flavor = "multi_thread")]
async fn records_the_output_refuses_are_dead_lettered_and_the_rest_keep_their_order() {
    let kafka = Cluster::shared();
    let t = names("refused");
    kafka.create_topic(&t.input, 2).await;
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema);
    // First, with the relay off, everything is gated into the outbox.
    let mut msgs = Vec::new();
    let mut big = HashSet::new();
    let mut small = HashSet::new();
    for i in 0..30u64 {
        let id = format!("r-{i}");
        let mut m = In::event((i % 2) as i32, &id, i);
        if i % 10 == 4 {
            let mut value = format!(r#"{{"id":"{id}","seq":{i},"pad":""#).into_bytes();
            value.extend_from_slice(&[b'x'; 40_000]);
            value.extend_from_slice(b"\"}");
            m.value = Some(value);
            big.insert(id);
        } else {
            small.insert(id);
        }
        msgs.push(m);
    }
    kafka.produce(&t.input, &msgs).await;
    let mut gating = Sidecar::start(&cfg.clone().set("KDEDUP_RELAY", "false"), "refused-gate");
    let pool = pg().await;
    wait_until(Duration::from_secs(60), "all 30 in the outbox", || {
        gating.metric("kdedup_events_gated_total") >= 30.0
    })
    .await;
    assert_eq!(gating.sigterm(Duration::from_secs(20)), Some(0));
    assert_eq!(count(&pool, &t.schema, "outbox_pending").await, 30);

    // Then a relay whose producer takes nothing over 20 kB.
    let limited = cfg.set("KDEDUP_KAFKA_MESSAGE_MAX_BYTES", "20000");
    let mut relay = Sidecar::start(&limited, "refused-relay");
    relay.wait_ready(Duration::from_secs(60)).await;
    let out = kafka.read_topic(&t.output, small.len(), Duration::from_secs(60));
    assert_each_once(&out, &small);
    assert_ordered(&out);
    let dlq = kafka.read_topic(&t.dlq, big.len(), Duration::from_secs(30));
    assert_eq!(dlq.len(), big.len(), "each refused row in the DLQ once");
    for m in &dlq {
        assert_eq!(m.header("kdedup-dlq-reason"), Some("output_refused"));
        assert!(m.header("kdedup-source-offset").is_some());
        assert!(m.header("kdedup-source-partition").is_some());
    }
    wait_until(Duration::from_secs(30), "the outbox to empty", || {
        relay.metric("kdedup_outbox_backlog") == 0.0
    })
    .await;
    assert_eq!(count(&pool, &t.schema, "outbox_pending").await, 0);

    // New input over the limit never reaches the outbox: dead-lettered at the gate.
    let mut late = In::event(0, "r-late", 100);
    late.value = Some(vec![b'y'; 30_000]);
    kafka.produce(&t.input, &[late]).await;
    let dlq = kafka.read_topic(&t.dlq, big.len() + 1, Duration::from_secs(30));
    assert!(
        dlq.iter()
            .any(|m| m.header("kdedup-dlq-reason") == Some("message_too_large")),
        "{:?}",
        dlq.iter()
            .map(|m| m.header("kdedup-dlq-reason"))
            .collect::<Vec<_>>()
    );
    assert_eq!(relay.sigterm(Duration::from_secs(20)), Some(0));
    drop_schema(&pool, &t.schema).await;
}

/// 500 payloads of 900 kB (just under the 1 MB limit), first gated with the relay off,
/// so that the outbox holds all 429 MB of them (the backlog a relay meets after the output
/// was down, or when it takes over from a replica that was killed), then relayed: every
/// one is forwarded once, and neither process passes the memory limit the deployment
/// manifests give the sidecar (160 MiB), because the relay's rounds and the producer's
/// queue are bounded by bytes, not only by rows. Unbounded, the relay took 690 MiB here.
#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_of_large_payloads_is_relayed_under_the_memory_limit() {
    let kafka = Cluster::shared();
    const LIMIT_KIB: u64 = 160 * 1024;
    let t = names("bigvalues");
    kafka.create_topic(&t.input, 2).await;
    let msgs: Vec<In> = (0..500u64)
        .map(|i| {
            let mut m = In::event((i % 2) as i32, &format!("b-{i}"), i);
            m.value = Some(vec![b'a' + (i % 26) as u8; 900_000]);
            m
        })
        .collect();
    let expected: HashSet<String> = (0..500).map(|i| format!("b-{i}")).collect();
    kafka.produce(&t.input, &msgs).await;
    drop(msgs);
    let cfg = SidecarConfig::new(&t.group, &t.input, &t.output, &t.schema);

    /// Samples the process's RSS until `done` (a metric reaching 500); the peak, in KiB.
    async fn peak_until(s: &mut Sidecar, metric: &str) -> u64 {
        let started = Instant::now();
        let mut peak = 0;
        while s.metric(metric) < 500.0 {
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "{metric} short of 500 after 5 minutes:\n{}",
                s.log_tail()
            );
            assert!(matches!(s.child.try_wait(), Ok(None)), "{}", s.log_tail());
            peak = peak.max(rss_kib(s.child.id()));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        peak
    }

    let mut gating = Sidecar::start(&cfg.clone().set("KDEDUP_RELAY", "false"), "bigvalues-gate");
    let gate_peak = peak_until(&mut gating, "kdedup_events_gated_total").await;
    assert_eq!(gating.sigterm(Duration::from_secs(20)), Some(0));
    let pool = pg().await;
    assert_eq!(
        count(&pool, &t.schema, "outbox_pending").await,
        500,
        "the backlog"
    );

    let mut relaying = Sidecar::start(&cfg, "bigvalues-relay");
    let relay_peak = peak_until(&mut relaying, "kdedup_events_forwarded_total").await;
    println!(
        "peak RSS for 500 x 900 kB: gating {} MiB, relaying the backlog {} MiB",
        gate_peak / 1024,
        relay_peak / 1024
    );
    assert!(
        gate_peak < LIMIT_KIB && relay_peak < LIMIT_KIB,
        "peak RSS {gate_peak} / {relay_peak} KiB is over the manifests' limit of {LIMIT_KIB} KiB"
    );
    let out = kafka.read_topic(&t.output, 500, Duration::from_secs(60));
    assert_each_once(&out, &expected);
    assert!(out
        .iter()
        .all(|m| m.value.as_ref().is_some_and(|v| v.len() == 900_000)));
    assert_eq!(relaying.sigterm(Duration::from_secs(20)), Some(0));
    drop_schema(&pool, &t.schema).await;
}
