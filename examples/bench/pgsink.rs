//! The Postgres sink scenario (`--only pgsink`): kdedup with `KDEDUP_SINK=postgres`, each
//! first-seen event written as a row of an application table in the gate transaction (no
//! outbox, no relay), against its own ceiling, "L-db (postgres sink)": pgbench doing the
//! same work at the limit, one statement per transaction that inserts a batch of gate rows
//! and the batch's application rows, the rows kdedup's sink writes for the bench input.
//!
//! The application table lives in a schema of its own beside kdedup's (`<schema>_app`),
//! created before each run and dropped after it. Its columns are the fields of the bench's
//! JSON value (`sample_value`) with their natural types, plus three filled from the event's
//! metadata (`KDEDUP_SINK_COLUMNS`); no key, no index, no defaults. After every kdedup run
//! the table is checked: one row per distinct input id, and sampled rows equal to the JSON
//! the harness produced for their id.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context};

use super::{sample_value, step, Bench, E2e, Ldb, Output, Report, PARTITIONS, SCOPE};

/// The application table, in the schema [`app_schema`].
const TABLE: &str = "orders";

/// `KDEDUP_SINK_COLUMNS`: the metadata columns of [`TABLE`].
const SINK_COLUMNS: &str =
    "event_id=event_id,source_partition=source_partition,source_offset=source_offset";

/// The ratio target of the Postgres sink (kdedup / L-db (postgres sink)).
pub(super) const GOAL: f64 = 0.7;
/// The Kafka sink's target (kdedup 0% duplicates / L-db), for the line beside it.
const KAFKA_GOAL: f64 = 0.5;

/// The application schema that goes with kdedup's schema `schema`.
fn app_schema(schema: &str) -> String {
    format!("{schema}_app")
}

/// Length of the `note` padding of `sample_value` for a sequence number and an amount of
/// one digit each; each further digit of either shortens it by one.
fn note_pad_one_digit() -> anyhow::Result<usize> {
    let v: serde_json::Value =
        serde_json::from_str(&sample_value("00000000-0000-0000-0000-000000000000", 0))?;
    Ok(v["note"]
        .as_str()
        .context("sample_value has no note")?
        .len())
}

/// The best events/s of some L-db passes.
fn best_of(runs: &[Ldb]) -> Option<f64> {
    runs.iter().map(|l| l.events_per_s).reduce(f64::max)
}

impl Bench {
    /// The whole scenario: L-db (postgres sink) with 1 and 2 clients, kdedup with the
    /// Postgres sink on the 0% and the 50%-duplicates topics (twice each in full mode,
    /// alternating), and in full mode a second L-db pass at the end.
    pub(super) async fn pgsink_scenario(
        &mut self,
        report: &mut Report,
        topic_a: &str,
        topic_b: &str,
        distinct_b: usize,
    ) -> anyhow::Result<()> {
        let n = self.sizes.n;
        for clients in [1, 2] {
            step(&format!(
                "L-db (postgres sink): pgbench, gate row + application row, {clients} client(s)"
            ));
            let r = self.ldb_pgsink(clients).await?;
            println!("    {:.0} events/s", r.events_per_s);
            report.ldb_pg.push(r);
        }
        let keys: &[(&'static str, &'static str)] = if self.args.quick {
            &[("pgsink0", "pgsink50")]
        } else {
            &[("pgsink0", "pgsink50"), ("pgsink0b", "pgsink50b")]
        };
        for (k0, k50) in keys {
            step("kdedup, Postgres sink, 0% duplicates");
            let r = self.kdedup_pgsink(k0, topic_a, n, n).await?;
            println!(
                "    {:.0} events/s, sink statement {:.0}% of wall time",
                r.rate,
                r.sink_share * 100.0
            );
            report.runs.insert(k0, r);

            step("kdedup, Postgres sink, 50% duplicates");
            let r = self.kdedup_pgsink(k50, topic_b, n, distinct_b).await?;
            println!(
                "    {:.0} events/s, sink statement {:.0}% of wall time",
                r.rate,
                r.sink_share * 100.0
            );
            report.runs.insert(k50, r);
        }
        if !self.args.quick {
            for clients in [1, 2] {
                step(&format!(
                    "L-db (postgres sink), second pass: pgbench, {clients} client(s)"
                ));
                let mut r = self.ldb_pgsink(clients).await?;
                r.pass = 2;
                println!("    {:.0} events/s", r.events_per_s);
                report.ldb_pg.push(r);
            }
        }
        Ok(())
    }

    /// Creates `<schema>_app` and the application table in it; returns the table's
    /// qualified name.
    async fn create_app_table(&mut self, schema: &str) -> anyhow::Result<String> {
        let app = app_schema(schema);
        self.schemas.push(app.clone());
        let table = format!("\"{app}\".{TABLE}");
        for sql in [
            format!("DROP SCHEMA IF EXISTS \"{app}\" CASCADE"),
            format!("CREATE SCHEMA \"{app}\""),
            // The fields of sample_value() with their natural types, and the metadata
            // columns of SINK_COLUMNS. NOT NULL everywhere: a field the mapping missed
            // would be refused (and dead-lettered), not silently stored as null.
            format!(
                "CREATE TABLE {table} (
                    id               uuid    NOT NULL,
                    seq              bigint  NOT NULL,
                    customer         text    NOT NULL,
                    amount_cents     bigint  NOT NULL,
                    currency         text    NOT NULL,
                    note             text    NOT NULL,
                    event_id         text    NOT NULL,
                    source_partition integer NOT NULL,
                    source_offset    bigint  NOT NULL
                )"
            ),
        ] {
            sqlx::query(&sql)
                .execute(&self.pg)
                .await
                .with_context(|| format!("create the application table {table}"))?;
        }
        Ok(table)
    }

    /// Rows of `table` that differ from what the harness produced for their id (up to 5
    /// sampled rows, the highest sequence numbers, so every digit count of `seq` is
    /// covered in a long run), as a description; `None` when they all match.
    async fn app_rows_mismatch(&self, table: &str) -> anyhow::Result<Option<String>> {
        let rows: Vec<(String, i64, String, i64, String, String, String)> =
            sqlx::query_as(&format!(
                "(SELECT id::text, seq, customer, amount_cents, currency, note, event_id
                  FROM {table} LIMIT 3)
                 UNION ALL
                 (SELECT id::text, seq, customer, amount_cents, currency, note, event_id
                  FROM {table} ORDER BY seq DESC LIMIT 2)"
            ))
            .fetch_all(&self.pg)
            .await?;
        if rows.is_empty() {
            return Ok(Some(format!("{table} is empty")));
        }
        for (id, seq, customer, amount_cents, currency, note, event_id) in rows {
            let want: serde_json::Value =
                serde_json::from_str(&sample_value(&id, seq.max(0) as u64))?;
            let got = serde_json::json!({
                "id": id, "seq": seq, "customer": customer, "amount_cents": amount_cents,
                "currency": currency, "note": note,
            });
            if got != want || event_id != id {
                return Ok(Some(format!(
                    "row {got} (event_id {event_id}) is not the input's {want}"
                )));
            }
        }
        Ok(None)
    }

    // ---------------------------------------------------------------- L-db (postgres sink)

    /// L-db for the Postgres sink: as [`Bench::ldb`], but the second insert writes the
    /// application rows (the columns and values kdedup's sink writes for the bench input,
    /// generated server-side) instead of outbox rows.
    async fn ldb_pgsink(&mut self, clients: u32) -> anyhow::Result<Ldb> {
        let schema = self.name(&format!("ldbpg{clients}"));
        self.migrate(&schema)?;
        let table = self.create_app_table(&schema).await?;
        let batch: usize = self.tuning("KDEDUP_BATCH_SIZE").parse()?;
        let topic = self.name("a");
        // sample_value(id, g): seq g, customer-<g % 1000 in 5 digits>, amount (g * 7919) %
        // 100000, and a note padding the JSON to VALUE_BYTES (shorter by one per digit).
        let pad = note_pad_one_digit()? + 2;
        let script = format!(
            "WITH ids AS MATERIALIZED (
    -- event_key: kdedup computes it in the client, so here it is a random uuid as well.
    SELECT u AS id, u::text AS event_id, gen_random_uuid() AS event_key, g
    FROM (SELECT gen_random_uuid() AS u, g FROM generate_series(1, {batch}) AS g) AS s
), gate AS (
    INSERT INTO processed_events (event_key, scope, event_id, source_topic, source_partition,
        source_offset, payload_hash, first_seen_at, expires_at)
    SELECT event_key, '{SCOPE}', event_id, '{topic}', g % {PARTITIONS}, g, decode(md5(event_id), 'hex'),
        now(), now() + interval '7 days'
    FROM ids
)
INSERT INTO {table} (id, seq, customer, amount_cents, currency, note, event_id,
    source_partition, source_offset)
SELECT id, g, 'customer-' || lpad((g % 1000)::text, 5, '0'), (g * 7919) % 100000, 'EUR',
    repeat('x', {pad} - length(g::text) - length(((g * 7919) % 100000)::text)),
    event_id, g % {PARTITIONS}, g
FROM ids;
"
        );
        let path = self.tmp.join(format!("ldbpg-{}.sql", self.run_id));
        std::fs::write(&path, script)?;
        let r = self
            .ldb_pgsink_measure(&path, &schema, &table, clients, batch)
            .await;
        self.drop_schema(&app_schema(&schema)).await;
        self.drop_schema(&schema).await;
        r
    }

    async fn ldb_pgsink_measure(
        &self,
        path: &Path,
        schema: &str,
        table: &str,
        clients: u32,
        batch: usize,
    ) -> anyhow::Result<Ldb> {
        let r = self.ldb_measure(path, schema, clients, batch).await?;
        // The script writes what it should: one application row per gate row, equal to
        // the input's JSON.
        let (gate, app): (i64, i64) = sqlx::query_as(&format!(
            "SELECT (SELECT count(*) FROM \"{schema}\".processed_events), (SELECT count(*) FROM {table})"
        ))
        .fetch_one(&self.pg)
        .await?;
        if gate == 0 || gate != app {
            bail!("L-db (postgres sink): {gate} gate rows but {app} application rows");
        }
        if let Some(m) = self.app_rows_mismatch(table).await? {
            bail!("L-db (postgres sink) wrote other rows than kdedup's sink would: {m}");
        }
        Ok(r)
    }

    // ---------------------------------------------------------------- kdedup, postgres sink

    /// One end-to-end run with the Postgres sink: `n` messages are in `input`, `distinct`
    /// ids among them; the clock stops when `distinct` rows were committed
    /// (`kdedup_events_forwarded_total`). Then the table must hold exactly one row per
    /// distinct id, equal to the input's JSON, or the run fails.
    async fn kdedup_pgsink(
        &mut self,
        key: &str,
        input: &str,
        n: usize,
        distinct: usize,
    ) -> anyhow::Result<E2e> {
        let schema = self.name(key);
        let table = self.create_app_table(&schema).await?;
        let extra: Vec<(String, String)> = [
            ("KDEDUP_SINK", "postgres"),
            ("KDEDUP_SINK_TABLE", table.as_str()),
            ("KDEDUP_SINK_COLUMNS", SINK_COLUMNS),
            // No output topic with this sink (kdedup exits 64 if one is set): "" removes it.
            ("KDEDUP_OUTPUT_TOPIC", ""),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let r = self.kdedup(key, input, n, distinct, &schema, &extra).await;
        let r = match r {
            Ok(mut r) => self.check_pgsink(&table, distinct).await.map(|o| {
                r.output = Some(o);
                r
            }),
            Err(e) => Err(e),
        };
        self.drop_schema(&app_schema(&schema)).await;
        self.drop_schema(&schema).await;
        r.with_context(|| format!("{key} (Postgres sink)"))
    }

    /// The table after a run: rows and distinct event ids must both be `distinct`.
    async fn check_pgsink(&self, table: &str, distinct: usize) -> anyhow::Result<Output> {
        let (rows, ids): (i64, i64) = sqlx::query_as(&format!(
            "SELECT count(*), count(DISTINCT event_id) FROM {table}"
        ))
        .fetch_one(&self.pg)
        .await?;
        if rows as usize != distinct || ids as usize != distinct {
            bail!(
                "{table} holds {rows} rows with {ids} distinct event ids; expected {distinct} of each"
            );
        }
        if let Some(m) = self.app_rows_mismatch(table).await? {
            bail!("{table}: {m}");
        }
        Ok(Output {
            messages: rows as usize,
            distinct: ids as usize,
        })
    }
}

impl Report {
    /// kdedup with the Postgres sink (0% duplicates, the better run) / the best L-db
    /// (postgres sink) pass.
    pub(super) fn pgsink_ratio(&self) -> Option<f64> {
        let k = self.best("pgsink0")?.rate;
        let l = best_of(&self.ldb_pg).filter(|l| *l > 0.0)?;
        Some(k / l)
    }

    /// The Kafka sink's ratio: kdedup 0% duplicates / L-db.
    fn kafka_ratio(&self) -> Option<f64> {
        let k = self.best("e2e0")?.rate;
        let l = best_of(&self.ldb).filter(|l| *l > 0.0)?;
        Some(k / l)
    }

    /// One line: the Postgres sink's ratio against its goal, the Kafka sink's beside it.
    pub(super) fn pgsink_ratio_line(&self) -> String {
        let pg = match (
            self.best("pgsink0"),
            best_of(&self.ldb_pg),
            self.pgsink_ratio(),
        ) {
            (Some(k), Some(l), Some(r)) => format!(
                "Postgres sink {:.0} / {l:.0} = **{r:.2}×** (goal ≥ {GOAL}×: {})",
                k.rate,
                if r >= GOAL { "met" } else { "not met" }
            ),
            _ => "Postgres sink n/a".into(),
        };
        let kafka = match (self.best("e2e0"), best_of(&self.ldb), self.kafka_ratio()) {
            (Some(k), Some(l), Some(r)) => format!(
                "Kafka sink {:.0} / {l:.0} = {r:.2}× (goal ≥ {KAFKA_GOAL}×: {})",
                k.rate,
                if r >= KAFKA_GOAL { "met" } else { "not met" }
            ),
            _ => "Kafka sink n/a (needs the ldb and e2e scenarios)".into(),
        };
        format!("kdedup / L-db, each sink against its own ceiling: {pg}; {kafka}.")
    }

    /// The "Postgres sink" section of RESULTS.md (nothing when the scenario did not run).
    pub(super) fn render_pgsink(&self, s: &mut String, b: &Bench) {
        if self.ldb_pg.is_empty() && self.best("pgsink0").is_none() {
            return;
        }
        let batch = b.tuning("KDEDUP_BATCH_SIZE");
        let _ = writeln!(s, "\n## Postgres sink\n");
        let _ = writeln!(
            s,
            "`KDEDUP_SINK=postgres`, `KDEDUP_SINK_TABLE=<schema>_app.{TABLE}`, \
             `KDEDUP_SINK_COLUMNS={SINK_COLUMNS}`, no output topic: each first-seen event is a row of the \
             application table, written by the sink statement right after the gate statement in the same \
             transaction; no outbox, no relay. The table has the JSON value's fields as columns (`id uuid`, \
             `seq bigint`, `customer text`, `amount_cents bigint`, `currency text`, `note text`, filled by \
             `jsonb_populate_record`) and `event_id text`, `source_partition integer`, `source_offset bigint`; \
             no key, no index, no defaults. Same input topics and clock as the Kafka sink's runs; the clock \
             stops when `kdedup_events_forwarded_total` (for this sink, rows committed) reaches the distinct \
             ids, and the table is then checked (rows = distinct `event_id` = distinct input ids, sampled rows \
             equal to the input JSON). L-db (postgres sink) is pgbench `-M prepared`, one statement per \
             transaction inserting {batch} gate rows and the {batch} application rows kdedup writes (values \
             generated server-side, checked the same way).\n"
        );
        let ceiling = best_of(&self.ldb_pg);
        let vs = |v: f64| match ceiling {
            Some(c) if c > 0.0 => format!("{:.2}×", v / c),
            _ => "n/a".into(),
        };
        let _ = writeln!(
            s,
            "| scenario | events/s | vs L-db (postgres sink) | notes |\n|---|---:|---:|---|"
        );
        for l in &self.ldb_pg {
            let _ = writeln!(
                s,
                "| L-db (postgres sink): pgbench, {} client(s), {} events per transaction{} | {:.0} | {} | {:.1} tx/s, {:.1} ms per tx |",
                l.clients,
                l.batch,
                if l.pass > 1 { " (second pass)" } else { "" },
                l.events_per_s,
                vs(l.events_per_s),
                l.tps,
                l.latency_ms
            );
        }
        for (label, key) in [
            ("**kdedup, Postgres sink, 0% duplicates**", "pgsink0"),
            ("kdedup, Postgres sink, 50% duplicates", "pgsink50"),
        ] {
            let Some(r) = self.best(key) else { continue };
            let twice = self.runs.contains_key(format!("{key}b").as_str());
            let _ = writeln!(
                s,
                "| {label} | {:.0} | {} | {:.1} s, {} rows committed, {} written by the sink statement ({}), {} duplicates; sink statement {:.0}% of wall time ({} statements), gate transaction {:.0}%; peak RSS {}{} |",
                r.rate,
                vs(r.rate),
                r.seconds,
                r.forwarded,
                r.sink_rows,
                r.output.as_ref().map_or("table not checked".into(), |o| format!(
                    "table: {} rows, {} distinct event_id, expected {}",
                    o.messages, o.distinct, r.distinct
                )),
                r.duplicates,
                r.sink_share * 100.0,
                r.sink_statements,
                r.gate_share * 100.0,
                r.peak_rss_kib
                    .map_or("n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
                if twice { "; the better of two runs" } else { "" },
            );
        }
        let _ = writeln!(s, "\n{}", self.pgsink_ratio_line());
    }
}
