//! The Postgres sink's statements: the `kdedup_events` relation its statement reads, the
//! start-up check of that statement, and the catalog of a `--sink-table`.
//!
//! The sink statement runs in the gate transaction, right after the gate statement, with
//! the rows that statement inserted (first sightings only). It is the operator's statement
//! (or one generated from a table's columns) behind a `WITH kdedup_events AS (...)` that
//! unnests the batch from array parameters, so one round trip carries the whole batch and
//! each value crosses the wire once.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use sqlx::{PgConnection, Row};

use crate::store::gate::GateRow;

/// The columns of `kdedup_events`, as documented (README "Postgres sink").
pub const EVENT_COLUMNS: [&str; 11] = [
    "scope",
    "event_id",
    "key",
    "value",
    "value_json",
    "headers",
    "source_topic",
    "source_partition",
    "source_offset",
    "source_timestamp",
    "ord",
];

/// The relation the sink statement reads: one row per first-seen event of the batch, in
/// input order (`ord`). A value that is JSON text is sent once, as text, and `value` is
/// rebuilt from it (`convert_to`, byte for byte: the database encoding is UTF-8); any other
/// value goes as bytes and its `value_json` is null.
const EVENTS_CTE: &str = "kdedup_events AS (
    SELECT e.scope, e.event_id, e.key,
           coalesce(e.value, convert_to(e.value_text, 'UTF8')) AS value,
           e.value_text::jsonb AS value_json,
           e.headers::jsonb AS headers,
           e.source_topic, e.source_partition, e.source_offset,
           to_timestamp(e.source_timestamp_ms / 1000.0) AS source_timestamp,
           e.ord
    FROM UNNEST($1::text[], $2::text[], $3::bytea[], $4::bytea[], $5::text[], $6::text[],
                $7::text[], $8::int4[], $9::int8[], $10::int8[])
         WITH ORDINALITY
         AS e(scope, event_id, key, value, value_text, headers,
              source_topic, source_partition, source_offset, source_timestamp_ms, ord)
)";

/// `statement` reading `kdedup_events`: the relation is put in front of it, merged into
/// its own `WITH` list when it has one.
pub fn with_events(statement: &str) -> String {
    let trimmed = statement.trim_start();
    let word = |w: &str, s: &str| {
        s.get(..w.len()).is_some_and(|p| p.eq_ignore_ascii_case(w))
            && s[w.len()..].starts_with(|c: char| c.is_whitespace())
    };
    if word("with", trimmed) {
        let rest = trimmed[4..].trim_start();
        if word("recursive", rest) {
            let rest = rest[9..].trim_start();
            return format!("WITH RECURSIVE {EVENTS_CTE},\n{rest}");
        }
        return format!("WITH {EVENTS_CTE},\n{rest}");
    }
    format!("WITH {EVENTS_CTE}\n{trimmed}")
}

/// How a value goes into `kdedup_events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// A JSON object.
    Object,
    /// JSON, but not an object (an array, a string, a number...).
    OtherJson,
    /// Not JSON (or JSON that `jsonb` cannot hold: a `\u0000` in a string).
    NotJson,
}

/// What `value` is, for `value_json`.
pub fn value_kind(value: Option<&[u8]>) -> ValueKind {
    let Some(v) = value else {
        return ValueKind::NotJson;
    };
    let Ok(text) = std::str::from_utf8(v) else {
        return ValueKind::NotJson;
    };
    if text.contains("\\u0000") {
        return ValueKind::NotJson;
    }
    match serde_json::from_str::<serde::de::IgnoredAny>(text) {
        Err(_) => ValueKind::NotJson,
        Ok(_) if text.trim_start().starts_with('{') => ValueKind::Object,
        Ok(_) => ValueKind::OtherJson,
    }
}

/// The headers as a JSON object: name to value, a UTF-8 value as a string, any other as
/// `\x` and hex (Postgres' bytea text form), a null value as null. A name that repeats
/// keeps its last value, as most Kafka header readers do.
pub fn headers_json(headers: &[(String, Option<Vec<u8>>)]) -> String {
    let mut map = serde_json::Map::with_capacity(headers.len());
    for (name, value) in headers {
        let v = match value {
            None => serde_json::Value::Null,
            Some(bytes) => match std::str::from_utf8(bytes) {
                Ok(s) => serde_json::Value::String(s.to_string()),
                Err(_) => {
                    let mut hex = String::with_capacity(2 + 2 * bytes.len());
                    hex.push_str("\\x");
                    for b in bytes {
                        let _ = write!(hex, "{b:02x}");
                    }
                    serde_json::Value::String(hex)
                }
            },
        };
        map.insert(name.clone(), v);
    }
    serde_json::Value::Object(map).to_string()
}

/// What one run of the sink statement did.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    /// Rows the statement reported (inserted, updated, or returned by a `SELECT`).
    pub rows: u64,
    pub duration: Duration,
}

/// Runs `statement` (made by [`with_events`]) over `rows` on `conn`, inside the caller's
/// transaction.
pub async fn write(
    conn: &mut PgConnection,
    statement: &str,
    rows: &[&GateRow],
) -> Result<Written, sqlx::Error> {
    let n = rows.len();
    let mut scopes = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut values: Vec<Option<&[u8]>> = Vec::with_capacity(n);
    let mut texts: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut headers = Vec::with_capacity(n);
    let mut topics = Vec::with_capacity(n);
    let mut partitions = Vec::with_capacity(n);
    let mut offsets = Vec::with_capacity(n);
    let mut timestamps = Vec::with_capacity(n);
    for r in rows {
        scopes.push(r.scope.as_str());
        ids.push(r.event_id.as_str());
        keys.push(r.key.as_deref());
        match value_kind(r.value.as_deref()) {
            ValueKind::NotJson => {
                values.push(r.value.as_deref());
                texts.push(None);
            }
            _ => {
                values.push(None);
                texts.push(r.value.as_deref().and_then(|v| std::str::from_utf8(v).ok()));
            }
        }
        headers.push(headers_json(&r.headers));
        topics.push(r.topic.as_str());
        partitions.push(r.partition);
        offsets.push(r.offset);
        timestamps.push(r.timestamp_ms);
    }
    let started = Instant::now();
    let done = sqlx::query(statement)
        .bind(&scopes)
        .bind(&ids)
        .bind(&keys)
        .bind(&values)
        .bind(&texts)
        .bind(&headers)
        .bind(&topics)
        .bind(&partitions)
        .bind(&offsets)
        .bind(&timestamps)
        .execute(conn)
        .await?;
    Ok(Written {
        rows: done.rows_affected(),
        duration: started.elapsed(),
    })
}

/// Parses, analyses and plans `statement` (made by [`with_events`]) without running it:
/// `EXPLAIN` in a transaction that is rolled back. Finds a missing table, column or
/// function, a type that does not fit, and a missing privilege (checked when the plan
/// is made).
pub async fn check(conn: &mut PgConnection, statement: &str) -> Result<(), sqlx::Error> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    let empty_text: Vec<&str> = Vec::new();
    let empty_bytes: Vec<&[u8]> = Vec::new();
    sqlx::query(&format!("EXPLAIN {statement}"))
        .bind(&empty_text)
        .bind(&empty_text)
        .bind(&empty_bytes)
        .bind(&empty_bytes)
        .bind(&empty_text)
        .bind(&empty_text)
        .bind(&empty_text)
        .bind(Vec::<i32>::new())
        .bind(Vec::<i64>::new())
        .bind(Vec::<i64>::new())
        .fetch_all(&mut *tx)
        .await?;
    tx.rollback().await?;
    Ok(())
}

/// Whether the connection's role may take values from the sequence `name` (`nextval`).
pub async fn may_use_sequence(conn: &mut PgConnection, name: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT has_sequence_privilege($1, 'USAGE')")
        .bind(name)
        .fetch_one(conn)
        .await
}

/// The connection's role, for a `GRANT` in an error's fix.
pub async fn current_user(conn: &mut PgConnection) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(conn)
        .await
}

/// One column of a `--sink-table`, as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// `format_type`: `integer`, `text`, `numeric(10,2)`...
    pub type_name: String,
    /// The default expression (`pg_get_expr`), for a row whose JSON lacks the field.
    pub default: Option<String>,
    /// `a` (GENERATED ALWAYS AS IDENTITY), `d` (BY DEFAULT) or empty.
    pub identity: String,
    /// The sequence the column takes its values from (an identity or a `serial`),
    /// qualified and quoted.
    pub identity_sequence: Option<String>,
    /// A generated (computed) column: never written.
    pub generated: bool,
    pub in_primary_key: bool,
}

/// A `--sink-table` as found at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Qualified and quoted, as `regclass` prints it with the schema forced in.
    pub name: String,
    pub columns: Vec<Column>,
}

/// The table `name` (`[schema.]table`, resolved by the connection's `search_path`), or
/// `None` when there is no such table. Views and foreign tables are not supported
/// (`relkind` must be an ordinary or partitioned table).
pub async fn table(conn: &mut PgConnection, name: &str) -> Result<Option<Table>, sqlx::Error> {
    let found: Option<(sqlx::postgres::types::Oid, String, String)> = sqlx::query_as(
        "SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname), c.relkind::text
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = to_regclass($1)",
    )
    .bind(name)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((oid, qualified, kind)) = found else {
        return Ok(None);
    };
    if kind != "r" && kind != "p" {
        return Ok(None);
    }
    let rows = sqlx::query(
        "SELECT a.attname::text AS name,
                format_type(a.atttypid, a.atttypmod) AS type_name,
                pg_get_expr(d.adbin, d.adrelid) AS default_expr,
                a.attidentity::text AS identity,
                pg_get_serial_sequence($2, a.attname) AS identity_sequence,
                a.attgenerated <> '' AS generated,
                coalesce(a.attnum = ANY(i.indkey), false) AS in_primary_key
         FROM pg_attribute a
         LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
         WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum",
    )
    .bind(oid)
    .bind(&qualified)
    .fetch_all(&mut *conn)
    .await?;
    let columns = rows
        .into_iter()
        .map(|r| {
            Ok(Column {
                name: r.try_get("name")?,
                type_name: r.try_get("type_name")?,
                default: r.try_get("default_expr")?,
                identity: r.try_get("identity")?,
                identity_sequence: r.try_get("identity_sequence")?,
                generated: r.try_get("generated")?,
                in_primary_key: r.try_get("in_primary_key")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Some(Table {
        name: qualified,
        columns,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relation_goes_in_front_or_into_the_statements_own_with() {
        assert!(with_events("INSERT INTO t SELECT * FROM kdedup_events")
            .starts_with("WITH kdedup_events AS ("));
        let merged = with_events("  with x AS (SELECT 1) INSERT INTO t SELECT * FROM x");
        assert!(merged.starts_with("WITH kdedup_events AS ("), "{merged}");
        assert!(merged.ends_with("),\nx AS (SELECT 1) INSERT INTO t SELECT * FROM x"));
        let recursive = with_events("WITH RECURSIVE r(n) AS (SELECT 1) SELECT * FROM r");
        assert!(recursive.starts_with("WITH RECURSIVE kdedup_events AS ("));
        assert!(recursive.ends_with("),\nr(n) AS (SELECT 1) SELECT * FROM r"));
        // A table whose name starts with "with" is not a WITH clause.
        assert!(with_events("withdrawals").ends_with(")\nwithdrawals"));
    }

    #[test]
    fn values_are_told_apart_for_value_json() {
        assert_eq!(value_kind(Some(br#"{"a":1}"#)), ValueKind::Object);
        assert_eq!(value_kind(Some(b" [1,2]")), ValueKind::OtherJson);
        assert_eq!(value_kind(Some(b"42")), ValueKind::OtherJson);
        assert_eq!(value_kind(Some(b"{nope")), ValueKind::NotJson);
        assert_eq!(value_kind(Some(&[0xff, 0xfe])), ValueKind::NotJson);
        assert_eq!(value_kind(Some(br#"{"a":"\u0000"}"#)), ValueKind::NotJson);
        assert_eq!(value_kind(None), ValueKind::NotJson);
    }

    #[test]
    fn headers_become_an_object_with_the_last_value_of_a_name() {
        let h = vec![
            ("a".to_string(), Some(b"1".to_vec())),
            ("a".to_string(), Some(b"2".to_vec())),
            ("bin".to_string(), Some(vec![0, 255])),
            ("none".to_string(), None),
        ];
        let v: serde_json::Value = serde_json::from_str(&headers_json(&h)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a": "2", "bin": "\\x00ff", "none": null})
        );
    }
}
