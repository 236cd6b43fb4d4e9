//! Gate statement experiments: the gate transaction alone (no Kafka, no relay), driven the
//! way `store::gate::gate` drives it (one transaction per batch, the batch bound as ten arrays),
//! for the statement kdedup ships and for alternative shapes. The numbers back the
//! recommendations in bench/README.md; kdedup itself is not changed by any of this.
//!
//! The shipped statement comes from the library (`store::gate::GateStatement` with the
//! Kafka sink's outbox write), so it follows the source. The alternatives are fixed texts
//! written for this experiment.

use std::time::Instant;

use anyhow::Context;
use rand::{Rng, SeedableRng};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};

/// A statement shape to measure.
pub struct Shape {
    pub label: &'static str,
    pub sql: String,
    /// Binds `$12 text[]`, `$13 int8[]` (in-batch duplicate counts) as the shipped one does.
    pub counters_params: bool,
    /// Run after `kdedup migrate` on the fresh schema.
    pub setup: &'static [&'static str],
    /// Concurrent sessions, each gating its own batches.
    pub sessions: usize,
    /// Run on each session's connection first (e.g. `SET plan_cache_mode = ...`).
    pub session_setup: &'static [&'static str],
}

pub struct ShapeResult {
    pub label: &'static str,
    pub sessions: usize,
    pub dup_ratio: f64,
    /// Median round.
    pub events_per_s: f64,
    pub ms_per_batch: f64,
    pub min: f64,
    pub max: f64,
    /// Highest CPU use (cores) of everything but Postgres and the harness in any round.
    pub other_cpu: f64,
}

const BATCH: &str = r#"
WITH batch AS (
    SELECT *
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int4[], $5::int8[], $6::int8[],
                $7::bytea[], $8::bytea[], $9::bytea[], $10::bytea[], $12::uuid[])
         WITH ORDINALITY
         AS b(scope, event_id, source_topic, source_partition, source_offset,
              source_timestamp_ms, payload_hash, key, value, headers, event_key, ord)
),"#;

const GATE_DO_UPDATE: &str = r#"
gate AS (
    INSERT INTO processed_events
        (event_key, scope, event_id, source_topic, source_partition, source_offset,
         payload_hash, first_seen_at, expires_at)
    SELECT event_key, scope, event_id, source_topic, source_partition, source_offset, payload_hash,
           now(), now() + make_interval(secs => $11)
    FROM batch
    ORDER BY event_key
    ON CONFLICT (event_key) DO UPDATE
        SET source_topic = EXCLUDED.source_topic,
            source_partition = EXCLUDED.source_partition,
            source_offset = EXCLUDED.source_offset,
            payload_hash = EXCLUDED.payload_hash,
            first_seen_at = EXCLUDED.first_seen_at,
            expires_at = EXCLUDED.expires_at
        WHERE processed_events.expires_at <= now()
    RETURNING event_key
),"#;

/// Live duplicates are left alone (no row lock, no WAL); expired rows are revived by an
/// UPDATE that only looks at the rows the INSERT did not take.
const GATE_DO_NOTHING: &str = r#"
inserted AS (
    INSERT INTO processed_events
        (event_key, scope, event_id, source_topic, source_partition, source_offset,
         payload_hash, first_seen_at, expires_at)
    SELECT event_key, scope, event_id, source_topic, source_partition, source_offset, payload_hash,
           now(), now() + make_interval(secs => $11)
    FROM batch
    ORDER BY event_key
    ON CONFLICT (event_key) DO NOTHING
    RETURNING event_key
),
revived AS (
    UPDATE processed_events pe
       SET source_topic = b.source_topic, source_partition = b.source_partition,
           source_offset = b.source_offset, payload_hash = b.payload_hash,
           first_seen_at = now(), expires_at = now() + make_interval(secs => $11)
      FROM batch b
     WHERE pe.event_key = b.event_key AND pe.expires_at <= now()
       AND NOT EXISTS (SELECT 1 FROM inserted i
                       WHERE i.event_key = b.event_key)
    RETURNING pe.event_key
),
gate AS (
    SELECT event_key FROM inserted UNION ALL SELECT event_key FROM revived
),"#;

const QUEUED: &str = r#"
queued AS (
    INSERT INTO outbox
        (scope, event_id, source_topic, source_partition, source_offset,
         source_timestamp_ms, key, value, headers)
    SELECT b.scope, b.event_id, b.source_topic, b.source_partition, b.source_offset,
           b.source_timestamp_ms, b.key, b.value, b.headers
    FROM batch b
    JOIN gate g ON g.event_key = b.event_key
    ORDER BY b.ord
    RETURNING 1
)"#;

/// The first-sighting lookup as a plain LEFT JOIN: Postgres probes the primary key for
/// every row of the batch, inserted or not.
const RESULT_JOIN: &str = r#"
SELECT b.ord,
       g.event_key IS NOT NULL AS inserted,
       pe.source_topic, pe.source_partition, pe.source_offset,
       (pe.payload_hash IS DISTINCT FROM b.payload_hash) AS payload_differs
FROM batch b
LEFT JOIN gate g ON g.event_key = b.event_key
LEFT JOIN processed_events pe
       ON g.event_key IS NULL AND pe.event_key = b.event_key
ORDER BY b.ord
"#;

/// The same lookup as a LATERAL subquery gated on `g.event_key IS NULL`: only the rows not
/// inserted are looked up.
const RESULT_LATERAL: &str = r#"
SELECT b.ord,
       g.event_key IS NOT NULL AS inserted,
       pe.source_topic, pe.source_partition, pe.source_offset,
       (pe.payload_hash IS DISTINCT FROM b.payload_hash) AS payload_differs
FROM batch b
LEFT JOIN gate g ON g.event_key = b.event_key
LEFT JOIN LATERAL (
    SELECT p.source_topic, p.source_partition, p.source_offset, p.payload_hash
    FROM processed_events p
    WHERE g.event_key IS NULL AND p.event_key = b.event_key
) pe ON true
ORDER BY b.ord
"#;

/// The Kafka sink's outbox write as it was inside the gate statement before
/// `relay_batches` (one `relay_outbox` row per event, numbered by window functions in SQL):
/// the "before" of bench/README.md, "One outbox row per gate transaction".
const PER_ROW_OUTBOX: &str = r#"numbered AS (
    SELECT b.ord, b.source_topic || '/' || b.source_partition AS stream,
           row_number() OVER (PARTITION BY b.source_topic, b.source_partition ORDER BY b.ord) AS n
    FROM batch b
    JOIN gate g ON g.event_key = b.event_key
),
counts AS (
    SELECT stream, count(*) AS n FROM numbered GROUP BY stream
),
claimed AS (
    INSERT INTO outbox_seqs AS s (stream, last_seq)
    SELECT stream, n FROM counts ORDER BY stream
    ON CONFLICT (stream) DO UPDATE SET last_seq = s.last_seq + EXCLUDED.last_seq
    RETURNING stream, last_seq
),
sequenced AS (
    SELECT n.ord, n.stream, c.last_seq - t.n + n.n AS seq
    FROM numbered n
    JOIN counts t ON t.stream = n.stream
    JOIN claimed c ON c.stream = n.stream
),
queued AS (
    INSERT INTO relay_outbox
        (slot, stream, seq, scope, event_id, source_topic, source_partition, source_offset,
         source_timestamp_ms, key, value, headers)
    SELECT (SELECT slot FROM relay_rotation), s.stream, s.seq, b.scope, b.event_id,
           b.source_topic, b.source_partition, b.source_offset, b.source_timestamp_ms, b.key,
           b.value, b.headers
    FROM sequenced s
    JOIN batch b ON b.ord = s.ord
    ORDER BY s.stream, s.seq
    RETURNING 1
),
"#;

/// Marks the shape that runs kdedup's own gate (`store::gate::gate` with the Kafka sink's
/// `GateStatement::outboxed`): the gate statement, the outbox write and the totals, as shipped.
const SHIPPED: &str = "(kdedup's Kafka sink gate)";

/// The gate statement with the per-row outbox write in it (the previous version).
fn per_row_gate_sql() -> String {
    kdedup::store::gate::GateStatement::new(Some(PER_ROW_OUTBOX))
        .sql()
        .to_string()
}

pub fn shapes() -> Vec<Shape> {
    let shape = |label, sql: &str, counters, setup, sessions, session_setup| Shape {
        label,
        sql: sql.to_string(),
        counters_params: counters,
        setup,
        sessions,
        session_setup,
    };
    let mut v = Vec::new();
    {
        v.push(shape(
            "shipped: gate statement, then one outbox row per stream (src/store/gate/statement.rs)",
            SHIPPED,
            true,
            &[],
            1,
            &[],
        ));
        v.push(shape(
            "shipped, 2 sessions in parallel",
            SHIPPED,
            true,
            &[],
            2,
            &[],
        ));
        let sql = per_row_gate_sql();
        let c = sql.contains("$13");
        v.push(shape(
            "before: one relay_outbox row per event, in the gate statement",
            &sql,
            c,
            &[],
            1,
            &[],
        ));
        v.push(shape(
            "before, 2 sessions in parallel",
            &sql,
            c,
            &[],
            2,
            &[],
        ));
        v.push(shape(
            "shipped, without the expires_at btree index",
            SHIPPED,
            true,
            &["DROP INDEX \"{schema}\".processed_events_expires_at_idx"],
            1,
            &[],
        ));
        v.push(shape(
            "shipped, plan_cache_mode=force_generic_plan",
            SHIPPED,
            true,
            &[],
            1,
            &["SET plan_cache_mode = force_generic_plan"],
        ));
        let bare = kdedup::store::gate::GateStatement::new(None)
            .sql()
            .to_string();
        v.push(shape(
            "the gate statement with no forwarding write at all",
            &bare,
            bare.contains("$13"),
            &[],
            1,
            &[],
        ));
    }
    let a = format!("{BATCH}{GATE_DO_UPDATE}{QUEUED}{RESULT_JOIN}");
    v.push(shape(
        "A: before, without the gate_counters upsert",
        &a,
        false,
        &[],
        1,
        &[],
    ));
    v.push(shape("A, 2 sessions in parallel", &a, false, &[], 2, &[]));
    let b = format!("{BATCH}{GATE_DO_UPDATE}{QUEUED}{RESULT_LATERAL}");
    v.push(shape(
        "B: A + first-sighting lookup only for rows not inserted (LATERAL)",
        &b,
        false,
        &[],
        1,
        &[],
    ));
    let c = format!("{BATCH}{GATE_DO_NOTHING}{QUEUED}{RESULT_LATERAL}");
    v.push(shape(
        "C: B + ON CONFLICT DO NOTHING, expired rows revived by an UPDATE",
        &c,
        false,
        &[],
        1,
        &[],
    ));
    v
}

/// Builds gate batches like kdedup's: unique keys per batch, a share `dup_ratio` of them
/// repeating an id gated in an earlier batch (one of the last 10000).
struct Workload {
    rng: rand::rngs::StdRng,
    recent: Vec<String>,
    dup_ratio: f64,
    offset: i64,
    value: Vec<u8>,
}

impl Workload {
    fn new(seed: u64, dup_ratio: f64) -> Self {
        Workload {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            recent: Vec::new(),
            dup_ratio,
            offset: 0,
            value: super::sample_value("00000000-0000-0000-0000-000000000000", 0).into_bytes(),
        }
    }

    fn batch(&mut self, size: usize) -> Batch {
        let mut b = Batch::default();
        let mut seen = std::collections::HashSet::new();
        let mut fresh = Vec::new();
        while b.ids.len() < size {
            let dup = self.recent.len() > 1000 && self.rng.random::<f64>() < self.dup_ratio;
            let id = if dup {
                let lo = self.recent.len().saturating_sub(10_000);
                self.recent[self.rng.random_range(lo..self.recent.len())].clone()
            } else {
                let id = uuid::Uuid::from_u128(self.rng.random::<u128>())
                    .hyphenated()
                    .to_string();
                fresh.push(id.clone());
                id
            };
            if !seen.insert(id.clone()) {
                continue;
            }
            self.offset += 1;
            let mut headers = Vec::with_capacity(56);
            headers.extend_from_slice(&1u32.to_be_bytes());
            headers.extend_from_slice(&8u32.to_be_bytes());
            headers.extend_from_slice(b"event-id");
            headers.extend_from_slice(&(id.len() as u32).to_be_bytes());
            headers.extend_from_slice(id.as_bytes());
            b.scopes.push(super::SCOPE.to_string());
            b.topics.push("bench-shapes-topic".to_string());
            b.partitions.push((self.offset % 4) as i32);
            b.offsets.push(self.offset);
            b.timestamps.push(Some(1_700_000_000_000 + self.offset));
            b.hashes.push(self.value[..16].to_vec());
            b.keys.push(Some(
                format!("customer-{:05}", self.offset % 1000).into_bytes(),
            ));
            b.values.push(Some(self.value.clone()));
            b.headers.push(headers);
            b.event_keys
                .push(kdedup::store::gate::event_key(super::SCOPE, &id));
            b.ids.push(id);
        }
        self.recent.extend(fresh);
        if self.recent.len() > 20_000 {
            self.recent.drain(..10_000);
        }
        b
    }
}

#[derive(Default)]
struct Batch {
    scopes: Vec<String>,
    ids: Vec<String>,
    topics: Vec<String>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    timestamps: Vec<Option<i64>>,
    hashes: Vec<Vec<u8>>,
    keys: Vec<Option<Vec<u8>>>,
    values: Vec<Option<Vec<u8>>>,
    headers: Vec<Vec<u8>>,
    event_keys: Vec<uuid::Uuid>,
}

#[allow(clippy::too_many_arguments)]
async fn session(
    url: String,
    schema: String,
    sql: String,
    counters: bool,
    seed: u64,
    dup_ratio: f64,
    batch: usize,
    seconds: f64,
    session_setup: &'static [&'static str],
) -> anyhow::Result<(usize, usize, f64)> {
    let opts: PgConnectOptions = url
        .parse::<PgConnectOptions>()?
        .options([("search_path", schema.as_str())])
        .disable_statement_logging();
    if sql == SHIPPED {
        return shipped_session(opts, seed, dup_ratio, batch, seconds, session_setup).await;
    }
    let mut conn = PgConnection::connect_with(&opts).await?;
    for sql in session_setup {
        sqlx::query(sql).execute(&mut conn).await?;
    }
    let mut w = Workload::new(seed, dup_ratio);
    // Warm up: the first executions of a prepared statement are planned each time.
    let warmup = 6;
    let ttl = 7.0 * 86400.0;
    let empty_scopes: Vec<String> = Vec::new();
    let empty_counts: Vec<i64> = Vec::new();
    let mut rows = 0usize;
    let mut batches = 0usize;
    let mut started = Instant::now();
    let mut i = 0;
    loop {
        if i == warmup {
            started = Instant::now();
            rows = 0;
            batches = 0;
        }
        if i >= warmup && started.elapsed().as_secs_f64() >= seconds {
            break;
        }
        let b = w.batch(batch);
        let mut tx = conn.begin().await?;
        let mut q = sqlx::query(&sql)
            .bind(&b.scopes)
            .bind(&b.ids)
            .bind(&b.topics)
            .bind(&b.partitions)
            .bind(&b.offsets)
            .bind(&b.timestamps)
            .bind(&b.hashes)
            .bind(&b.keys)
            .bind(&b.values)
            .bind(&b.headers)
            .bind(ttl);
        // The shipped statement takes the event keys as $14, after the counters
        // arrays; the alternatives, without those, as $12.
        if counters {
            q = q.bind(&empty_scopes).bind(&empty_counts);
        }
        q = q.bind(&b.event_keys);
        let out = q.fetch_all(&mut *tx).await?;
        // kdedup's own statements (those with the counters' parameters) leave plain
        // first sightings out of their answer; A-C answer for every row.
        anyhow::ensure!(
            out.len() == b.ids.len() || (counters && out.len() < b.ids.len()),
            "statement returned {} rows",
            out.len()
        );
        tx.commit().await?;
        rows += b.ids.len();
        batches += 1;
        i += 1;
    }
    Ok((rows, batches, started.elapsed().as_secs_f64()))
}

/// [`session`] for the [`SHIPPED`] shape: kdedup's own gate function on a pool of one.
async fn shipped_session(
    opts: PgConnectOptions,
    seed: u64,
    dup_ratio: f64,
    batch: usize,
    seconds: f64,
    session_setup: &'static [&'static str],
) -> anyhow::Result<(usize, usize, f64)> {
    use kdedup::store::gate::{gate, GateBatch, GateRow, GateStatement};
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                for sql in session_setup {
                    sqlx::query(sql).execute(&mut *conn).await?;
                }
                Ok(())
            })
        })
        .connect_with(opts)
        .await?;
    let statement = GateStatement::outboxed(kdedup::store::outbox::LIVE);
    let ttl = std::time::Duration::from_secs(7 * 86400);
    let mut w = Workload::new(seed, dup_ratio);
    let warmup = 6;
    let (mut rows, mut batches, mut i) = (0usize, 0usize, 0);
    let mut started = Instant::now();
    loop {
        if i == warmup {
            started = Instant::now();
            rows = 0;
            batches = 0;
        }
        if i >= warmup && started.elapsed().as_secs_f64() >= seconds {
            break;
        }
        let b = w.batch(batch);
        let mut g = GateBatch::with_capacity(b.ids.len());
        for k in 0..b.ids.len() {
            g.push(GateRow {
                scope: b.scopes[k].clone(),
                event_id: b.ids[k].clone(),
                topic: b.topics[k].clone(),
                partition: b.partitions[k],
                offset: b.offsets[k],
                timestamp_ms: b.timestamps[k],
                payload_hash: b.hashes[k].clone(),
                key: b.keys[k].clone(),
                value: b.values[k].clone(),
                headers: vec![("event-id".to_string(), Some(b.ids[k].clone().into_bytes()))],
            });
        }
        let out = gate(&pool, &statement, g.part(0..b.ids.len(), true), ttl)
            .await
            .map_err(|e| anyhow::anyhow!("gate: {e}"))?;
        anyhow::ensure!(
            out.outcomes.len() == b.ids.len(),
            "gate returned {} outcomes",
            out.outcomes.len()
        );
        rows += b.ids.len();
        batches += 1;
        i += 1;
    }
    Ok((rows, batches, started.elapsed().as_secs_f64()))
}

/// Measures every shape at every duplicate ratio, `rounds` times, round-robin (so a burst
/// of load from elsewhere on the machine hits all shapes alike), each time on a fresh
/// schema; reports the median round of each.
pub async fn measure_all(
    bench: &mut super::Bench,
    shapes: &[Shape],
    dup_ratios: &[f64],
    batch: usize,
    seconds: f64,
    rounds: usize,
) -> anyhow::Result<Vec<ShapeResult>> {
    let mut samples: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); shapes.len() * dup_ratios.len()];
    for round in 0..rounds {
        super::step(&format!(
            "gate statement alone: round {} of {rounds}",
            round + 1
        ));
        for (si, shape) in shapes.iter().enumerate() {
            for (di, &dup) in dup_ratios.iter().enumerate() {
                let r = measure_once(bench, shape, dup, batch, seconds).await?;
                samples[si * dup_ratios.len() + di].push(r);
            }
        }
    }
    let mut out = Vec::new();
    for (si, shape) in shapes.iter().enumerate() {
        for (di, &dup) in dup_ratios.iter().enumerate() {
            let mut v = samples[si * dup_ratios.len() + di].clone();
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (rate, ms, _) = v[v.len() / 2];
            out.push(ShapeResult {
                label: shape.label,
                sessions: shape.sessions,
                dup_ratio: dup,
                events_per_s: rate,
                ms_per_batch: ms,
                min: v.first().map_or(0.0, |x| x.0),
                max: v.last().map_or(0.0, |x| x.0),
                other_cpu: v.iter().map(|x| x.2).fold(0.0, f64::max),
            });
        }
    }
    Ok(out)
}

/// One measurement on a fresh schema: (events/s, ms per batch, cores used by other
/// processes than Postgres and this harness).
async fn measure_once(
    bench: &mut super::Bench,
    shape: &Shape,
    dup_ratio: f64,
    batch: usize,
    seconds: f64,
) -> anyhow::Result<(f64, f64, f64)> {
    let schema = bench.name(&format!("shape{}", rand::rng().random::<u16>()));
    bench.migrate(&schema)?;
    for sql in shape.setup {
        sqlx::query(&sql.replace("{schema}", &schema))
            .execute(&bench.pg)
            .await
            .with_context(|| format!("shape set-up {sql}"))?;
    }
    bench.checkpoint().await;
    let cpu0 = super::CpuSnap::take(std::process::id());
    let mut tasks = Vec::new();
    for s in 0..shape.sessions {
        tasks.push(tokio::spawn(session(
            bench.db_url.clone(),
            schema.clone(),
            shape.sql.clone(),
            shape.counters_params,
            1000 + s as u64,
            dup_ratio,
            batch,
            seconds,
            shape.session_setup,
        )));
    }
    let mut rate = 0.0;
    let mut ms = 0.0;
    for t in tasks {
        let (rows, batches, elapsed) = t.await??;
        rate += rows as f64 / elapsed;
        ms += elapsed * 1000.0 / batches.max(1) as f64;
    }
    let cpu = super::CpuSnap::take(std::process::id()).since(&cpu0);
    bench.drop_schema(&schema).await;
    Ok((rate, ms / shape.sessions as f64, cpu.other))
}
