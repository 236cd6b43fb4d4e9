//! The baseline `make bench` compares kdedup against: the idempotent consumer a team
//! writes by hand, one transaction and one synchronous offset commit per message.
//!
//! ```text
//! for each message:
//!     BEGIN
//!     SELECT 1 FROM processed_events WHERE event_key = event_key($1, $2) AND expires_at > now()
//!     if not seen:
//!         INSERT INTO processed_events ...
//!         INSERT INTO outbox ...                         (--forward outbox, the default)
//!         or: produce to the output topic, wait for ack  (--forward produce)
//!     COMMIT
//!     commit the message's offset (synchronously)
//! ```
//!
//! It writes the same rows as kdedup (same tables, created by `kdedup migrate`, same
//! column contents), so the database work per event is comparable. With `--forward outbox`
//! nothing relays the outbox: the baseline is not charged for publishing.
//!
//! Prints one JSON line when done: messages handled, forwarded, duplicates, seconds from
//! the first message to the last offset commit, and the rate.

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Forward {
    /// INSERT an outbox row in the transaction (the same rows kdedup writes).
    Outbox,
    /// Produce to the output topic and wait for the ack before COMMIT.
    Produce,
}

#[derive(Debug, Parser)]
#[command(about = "Naive per-message idempotent consumer (benchmark baseline)")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:19092")]
    brokers: String,
    #[arg(long)]
    topic: String,
    #[arg(long)]
    group: String,
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    database_url: String,
    /// Schema holding processed_events and outbox (create it with `kdedup migrate`).
    #[arg(long)]
    schema: String,
    #[arg(long, default_value = "bench")]
    scope: String,
    /// Header that carries the event id.
    #[arg(long, default_value = "event-id")]
    id_header: String,
    #[arg(long, value_enum, default_value = "outbox")]
    forward: Forward,
    /// Output topic for `--forward produce`.
    #[arg(long)]
    output_topic: Option<String>,
    /// Stop after this many messages (0: no limit).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Stop this many seconds after the first message (0: no limit).
    #[arg(long, default_value_t = 0.0)]
    seconds: f64,
    /// Give up when no message arrived for this long.
    #[arg(long, default_value_t = 30.0)]
    idle_seconds: f64,
    #[arg(long, default_value_t = 7 * 86400)]
    ttl_seconds: i64,
    /// Extra librdkafka property for the consumer, `key=value` (repeatable).
    #[arg(short = 'X')]
    kafka_property: Vec<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let opts = PgConnectOptions::from_str(&args.database_url)?
        .application_name("naive_consumer")
        .options([("search_path", args.schema.as_str())]);
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await
        .context("connect to Postgres")?;

    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &args.brokers)
        .set("group.id", &args.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500");
    for p in &args.kafka_property {
        let (k, v) = p.split_once('=').context("-X wants key=value")?;
        cc.set(k, v);
    }
    let consumer: StreamConsumer = cc.create()?;
    consumer.subscribe(&[&args.topic])?;
    let producer: Option<FutureProducer> = match args.forward {
        Forward::Outbox => None,
        Forward::Produce => Some(
            ClientConfig::new()
                .set("bootstrap.servers", &args.brokers)
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .set("linger.ms", "0")
                .create()?,
        ),
    };
    let output_topic = args.output_topic.clone().unwrap_or_default();
    if matches!(args.forward, Forward::Produce) && output_topic.is_empty() {
        anyhow::bail!("--forward produce needs --output-topic");
    }

    let (mut handled, mut forwarded, mut duplicates) = (0u64, 0u64, 0u64);
    let mut first: Option<Instant> = None;
    let idle = Duration::from_secs_f64(args.idle_seconds);
    loop {
        if args.count > 0 && handled >= args.count {
            break;
        }
        if let Some(t) = first {
            if args.seconds > 0.0 && t.elapsed().as_secs_f64() >= args.seconds {
                break;
            }
        }
        let m = match tokio::time::timeout(idle, consumer.recv()).await {
            Err(_) => break,
            Ok(m) => m?,
        };
        first.get_or_insert_with(Instant::now);

        let event_id = m
            .headers()
            .and_then(|hs| hs.iter().find(|h| h.key == args.id_header))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .context("message without an event id")?;
        let value = m.payload();
        let hash = &Sha256::digest(value.unwrap_or_default())[..16];
        let headers: Vec<(String, Option<Vec<u8>>)> = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();

        let mut tx = pool.begin().await?;
        let seen: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM processed_events WHERE event_key = event_key($1, $2) AND expires_at > now()",
        )
        .bind(&args.scope)
        .bind(&event_id)
        .fetch_optional(&mut *tx)
        .await?;
        if seen.is_some() {
            duplicates += 1;
        } else {
            sqlx::query(
                "INSERT INTO processed_events (event_key, scope, event_id, source_topic,
                     source_partition, source_offset, payload_hash, first_seen_at, expires_at)
                 VALUES (event_key($1, $2), $1, $2, $3, $4, $5, $6, now(),
                         now() + make_interval(secs => $7))
                 ON CONFLICT (event_key) DO UPDATE SET expires_at = EXCLUDED.expires_at",
            )
            .bind(&args.scope)
            .bind(&event_id)
            .bind(m.topic())
            .bind(m.partition())
            .bind(m.offset())
            .bind(hash)
            .bind(args.ttl_seconds as f64)
            .execute(&mut *tx)
            .await?;
            match &producer {
                None => {
                    sqlx::query(
                        "INSERT INTO outbox (scope, event_id, source_topic, source_partition,
                             source_offset, source_timestamp_ms, key, value, headers)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    )
                    .bind(&args.scope)
                    .bind(&event_id)
                    .bind(m.topic())
                    .bind(m.partition())
                    .bind(m.offset())
                    .bind(m.timestamp().to_millis())
                    .bind(m.key())
                    .bind(value)
                    .bind(kdedup::model::headers::encode(&headers))
                    .execute(&mut *tx)
                    .await?;
                }
                Some(p) => {
                    let mut hs = OwnedHeaders::new();
                    for (k, v) in &headers {
                        hs = hs.insert(Header {
                            key: k,
                            value: v.as_deref(),
                        });
                    }
                    let mut r: FutureRecord<'_, [u8], [u8]> =
                        FutureRecord::to(&output_topic).headers(hs);
                    if let Some(k) = m.key() {
                        r = r.key(k);
                    }
                    if let Some(v) = value {
                        r = r.payload(v);
                    }
                    if let Some(ts) = m.timestamp().to_millis() {
                        r = r.timestamp(ts);
                    }
                    p.send(r, Duration::from_secs(30))
                        .await
                        .map_err(|(e, _)| e)?;
                }
            }
            forwarded += 1;
        }
        tx.commit().await?;
        consumer.commit_message(&m, CommitMode::Sync)?;
        handled += 1;
    }
    let elapsed = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    println!(
        "{}",
        serde_json::json!({
            "handled": handled,
            "forwarded": forwarded,
            "duplicates": duplicates,
            "elapsed_s": elapsed,
            "rate": if elapsed > 0.0 { handled as f64 / elapsed } else { 0.0 },
        })
    );
    Ok(())
}
