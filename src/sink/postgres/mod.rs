//! The Postgres sink: the forwarding write is the application's own row, written by one
//! statement in the gate transaction, right after the gate rows. A crash leaves both or
//! neither, so the application's table holds each event exactly once, with no relay and
//! no dedup code in the application.
//!
//! The statement is `--sink-sql` (any statement over `kdedup_events`) or generated from
//! `--sink-table`'s columns ([`table`]). [`prepare`] checks it against the database at
//! start: a missing table, column, function or privilege ends the start with exit 64.
//! Rows the statement refuses as data (SQLSTATE classes 21, 22, 23) are found by the gate
//! splitting the batch, and dead-lettered as `sink_rejected`; their gate rows are not
//! committed, so `kdedup replay` writes them once the cause is fixed.

pub mod table;

use prometheus::IntCounter;
use sqlx::Connection;
use tracing::{info, warn};

use super::Sink;
use crate::metrics::Metrics;
use crate::model::identity::Rejection;
use crate::model::InputMessage;
use crate::settings::{DbSettings, OnConflict, PostgresSinkSettings};
use crate::store::app_rows::{self, ValueKind};
use crate::store::gate::{GateRow, GateStatement};
use crate::store::{self, sqlstate, DbError};

/// The sink statement, checked.
#[derive(Debug, Clone)]
pub struct PostgresSink {
    /// The statement with `kdedup_events` in front ([`app_rows::with_events`]).
    statement: String,
    /// `--sink-table`: only JSON objects can be mapped onto columns.
    objects_only: bool,
    /// `kdedup_events_forwarded_total`: for this sink, delivery is the commit.
    forwarded: IntCounter,
}

/// The sink statement cannot work against this database: what is wrong and the fix.
/// `kdedup run` exits 64 with it; a restart cannot help.
#[derive(Debug, thiserror::Error)]
#[error("--sink postgres: {problem}. Fix: {fix}")]
pub struct SinkSetupError {
    pub problem: String,
    pub fix: String,
}

impl Sink for PostgresSink {
    fn statement(&self) -> GateStatement {
        GateStatement::followed_by(self.statement.clone())
    }

    fn admit(&self, msg: &InputMessage) -> Result<(), Rejection> {
        if !self.objects_only {
            return Ok(());
        }
        match (
            msg.value.as_deref(),
            app_rows::value_kind(msg.value.as_deref()),
        ) {
            (_, ValueKind::Object) => Ok(()),
            (None, _) => Err(Rejection::NotAJsonObject {
                what: "missing (a tombstone)",
            }),
            (_, ValueKind::OtherJson) => Err(Rejection::NotAJsonObject {
                what: "JSON but not an object",
            }),
            (_, ValueKind::NotJson) => Err(Rejection::NotAJsonObject {
                what: "not JSON that Postgres can store (invalid, or a \\u0000 in a string)",
            }),
        }
    }

    fn committed(&self, first_seen: usize, _sequenced: Vec<(GateRow, i64)>) {
        self.forwarded.inc_by(first_seen as u64);
    }
}

impl PostgresSink {
    /// The statement as it runs, for logs and the benchmark.
    pub fn sql(&self) -> &str {
        &self.statement
    }
}

/// Builds the sink statement of `settings` and checks it against the database (parse,
/// analyse and plan, with privileges, in a transaction that is rolled back). A problem of
/// the statement or the tables is a [`SinkSetupError`]; a connection failure is a
/// [`DbError`].
pub async fn prepare(
    settings: &PostgresSinkSettings,
    db: &DbSettings,
    metrics: &Metrics,
) -> Result<PostgresSink, anyhow::Error> {
    let mut conn = store::dedicated_connection(db).await?;
    let result = prepare_on(&mut conn, settings, &db.schema, metrics).await;
    let _ = conn.close().await;
    result
}

async fn prepare_on(
    conn: &mut sqlx::PgConnection,
    settings: &PostgresSinkSettings,
    schema: &str,
    metrics: &Metrics,
) -> Result<PostgresSink, anyhow::Error> {
    let (sql, objects_only, what, privileges) = match settings {
        PostgresSinkSettings::Sql(sql) => {
            if !sql.to_ascii_lowercase().contains("kdedup_events") {
                warn!("--sink-sql does not read kdedup_events: it runs once per batch, whatever the events are");
            }
            (sql.clone(), false, "--sink-sql".to_string(), None)
        }
        PostgresSinkSettings::Table {
            table,
            columns,
            on_conflict,
        } => {
            let found = app_rows::table(conn, table).await.map_err(DbError::from)?;
            let Some(found) = found else {
                return Err(SinkSetupError {
                    problem: format!("--sink-table {table:?}: no such table"),
                    fix: unqualified_hint(table, schema).unwrap_or_else(|| {
                        "create the table, or correct the name (views are not supported)".into()
                    }),
                }
                .into());
            };
            let sql = table::insert_statement(&found, columns, *on_conflict)
                .map_err(|(problem, fix)| SinkSetupError { problem, fix })?;
            // The statement calls nextval() for a column the JSON lacks (a `serial`, an
            // identity BY DEFAULT), and nextval() is checked when it runs, not when the
            // statement is planned. A GENERATED ALWAYS identity is filled by Postgres
            // itself, which needs no grant on its sequence.
            let mapped = |c: &app_rows::Column| columns.iter().any(|(_, col)| *col == c.name);
            for seq in found
                .columns
                .iter()
                .filter(|c| c.identity != "a" && !c.generated && !mapped(c))
                .filter_map(|c| c.identity_sequence.as_ref())
            {
                if !app_rows::may_use_sequence(conn, seq)
                    .await
                    .map_err(DbError::from)?
                {
                    let role = app_rows::current_user(conn).await.map_err(DbError::from)?;
                    return Err(SinkSetupError {
                        problem: format!("--sink-table {}: kdedup's role may not use the identity sequence {seq}", found.name),
                        fix: format!("GRANT USAGE ON SEQUENCE {seq} TO {role}"),
                    }
                    .into());
                }
            }
            let grant = match on_conflict {
                OnConflict::Update => "SELECT, INSERT, UPDATE",
                _ => "INSERT",
            };
            (
                sql,
                true,
                format!("--sink-table {}", found.name),
                Some(format!("{grant} ON {}", found.name)),
            )
        }
    };
    let statement = app_rows::with_events(&sql);
    if let Err(e) = app_rows::check(conn, &statement).await {
        let e = DbError::from(e);
        let Some(code) = e.sqlstate() else {
            return Err(e.into());
        };
        let fix = match code.as_str() {
            sqlstate::INSUFFICIENT_PRIVILEGE => {
                let role = app_rows::current_user(conn).await.map_err(DbError::from)?;
                let what =
                    privileges.unwrap_or_else(|| "what the statement reads and writes".into());
                format!(
                    "grant it to kdedup's role, e.g. GRANT USAGE ON SCHEMA <schema> TO {role}; GRANT {what} TO {role} \
                     (deploy/README.md, \"Postgres sink grants\")"
                )
            }
            _ => fix_for(&code, &what, schema),
        };
        return Err(SinkSetupError {
            problem: format!("{what} does not work against this database: {e}"),
            fix,
        }
        .into());
    }
    info!(sink = what, statement = sql, "sink statement checked");
    Ok(PostgresSink {
        statement,
        objects_only,
        forwarded: metrics.events_forwarded.clone(),
    })
}

/// For a name given without a schema: kdedup's connections search only their own schema.
fn unqualified_hint(name: &str, schema: &str) -> Option<String> {
    (!name.contains('.')).then(|| {
        format!(
            "qualify it with its schema (e.g. public.{name}): kdedup's connections search only its own schema, {schema:?}"
        )
    })
}

/// What to do about a statement Postgres refused at the check, by SQLSTATE.
fn fix_for(code: &str, what: &str, schema: &str) -> String {
    match code {
        "42P01" | "42883" | "3F000" => format!(
            "create what is missing, or qualify its name with its schema (e.g. public.orders): kdedup's connections search only its own schema, {schema:?}"
        ),
        "42703" => "use a column the table has (kdedup_events has scope, event_id, key, value, value_json, headers, \
                    source_topic, source_partition, source_offset, source_timestamp, ord)"
            .into(),
        "42601" => format!("correct the syntax of {what}: one statement (INSERT, UPDATE, DELETE, MERGE or SELECT), no trailing commands"),
        c if c.starts_with("42") => format!("correct {what}: Postgres names the problem above"),
        _ => format!("correct {what} or the database; Postgres names the problem above"),
    }
}
