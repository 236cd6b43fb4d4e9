//! `--sink-table`: the statement that maps each first-seen event's JSON object onto a
//! table's columns, generated from the table's catalog at start.
//!
//! - A column the JSON has takes its value (`jsonb_populate_record`, so a JSON string
//!   `"42"` fills an integer column and a JSON object fills a `jsonb` column); a field the
//!   JSON has as `null` is null.
//! - A column the JSON lacks takes its default (the column's `DEFAULT`, or its identity
//!   sequence), or null when it has none; a field the table lacks is ignored.
//! - Generated columns and `GENERATED ALWAYS` identities are never written.
//! - `--sink-column field=column` fills a column from the event's metadata instead, cast
//!   to the column's type (a `key` into a text column is read as UTF-8).
//! - `--sink-on-conflict`: `error` adds nothing (a collision with a unique key is an
//!   integrity error, SQLSTATE 23505, and the event is dead-lettered), `nothing` adds `ON
//!   CONFLICT DO NOTHING`, `update` upserts by primary key; when one batch has several
//!   events for one key, the last in input order wins.

use crate::settings::{EventField, OnConflict};
use crate::store::app_rows::Table;

/// `name` as a quoted identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as a string literal.
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The event's metadata field as an expression of `kdedup_events e`, cast to `type_name`.
fn field_expr(field: EventField, type_name: &str) -> String {
    let column = format!("e.{}", field.name());
    let expr = match field {
        EventField::Key if type_name != "bytea" => format!("convert_from({column}, 'UTF8')"),
        _ => column,
    };
    format!("({expr})::{type_name}")
}

/// The `INSERT` for `table`, or what is wrong with the mapping (with its fix).
pub fn insert_statement(
    table: &Table,
    mapped: &[(EventField, String)],
    on_conflict: OnConflict,
) -> Result<String, (String, String)> {
    for (field, column) in mapped {
        let Some(c) = table.columns.iter().find(|c| &c.name == column) else {
            return Err((
                format!(
                    "--sink-column {}={column}: {} has no column {column:?}",
                    field.name(),
                    table.name
                ),
                format!(
                    "name one of its columns: {}",
                    table
                        .columns
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        };
        if c.generated || c.identity == "a" {
            return Err((
                format!("--sink-column {}={column}: {column:?} is a generated column, which cannot be written", field.name()),
                "map the field to another column".into(),
            ));
        }
    }
    let mut names = Vec::new();
    let mut exprs = Vec::new();
    for c in &table.columns {
        if c.generated || c.identity == "a" {
            continue;
        }
        let name = ident(&c.name);
        let from_json = format!("r.{name}");
        let default = match (&c.identity_sequence, &c.default) {
            (Some(seq), _) => Some(format!("nextval({})", literal(seq))),
            (None, Some(default)) => Some(default.clone()),
            (None, None) => None,
        };
        let expr = match mapped.iter().find(|(_, col)| col == &c.name) {
            Some((field, _)) => field_expr(*field, &c.type_name),
            None => match default {
                Some(default) => format!(
                    "CASE WHEN e.value_json ? {} THEN {from_json} ELSE {default} END",
                    literal(&c.name)
                ),
                None => from_json,
            },
        };
        names.push(name);
        exprs.push(expr);
    }
    if names.is_empty() {
        return Err((
            format!("{} has no column kdedup can write", table.name),
            "choose a table with ordinary columns".into(),
        ));
    }
    let source = format!(
        "FROM kdedup_events e\nCROSS JOIN LATERAL jsonb_populate_record(NULL::{}, e.value_json) r",
        table.name
    );
    let columns = names.join(", ");
    let sql = match on_conflict {
        OnConflict::Error | OnConflict::Nothing => {
            let conflict = match on_conflict {
                OnConflict::Nothing => "\nON CONFLICT DO NOTHING",
                _ => "",
            };
            format!(
                "INSERT INTO {} ({columns})\nSELECT {}\n{source}\nORDER BY e.ord{conflict}",
                table.name,
                exprs.join(",\n       ")
            )
        }
        OnConflict::Update => {
            let keys: Vec<String> = table
                .columns
                .iter()
                .filter(|c| c.in_primary_key)
                .map(|c| ident(&c.name))
                .collect();
            if keys.is_empty() {
                return Err((
                    format!(
                        "--sink-on-conflict update upserts by primary key, and {} has none",
                        table.name
                    ),
                    "add a primary key to the table, or use --sink-on-conflict nothing or error"
                        .into(),
                ));
            }
            let set: Vec<String> = names
                .iter()
                .filter(|n| !keys.contains(n))
                .map(|n| format!("{n} = EXCLUDED.{n}"))
                .collect();
            let action = match set.is_empty() {
                true => "DO NOTHING".to_string(),
                false => format!("DO UPDATE SET {}", set.join(", ")),
            };
            let inner: Vec<String> = exprs
                .iter()
                .zip(&names)
                .map(|(e, n)| format!("{e} AS {n}"))
                .collect();
            let keys = keys.join(", ");
            format!(
                "INSERT INTO {} ({columns})\nSELECT DISTINCT ON ({keys}) {columns}\nFROM (\n    SELECT {}, e.ord AS kdedup_ord\n    {source}\n) s\nORDER BY {keys}, kdedup_ord DESC\nON CONFLICT ({keys}) {action}",
                table.name,
                inner.join(",\n           "),
            )
        }
    };
    Ok(sql)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::app_rows::Column;

    fn column(name: &str, type_name: &str) -> Column {
        Column {
            name: name.into(),
            type_name: type_name.into(),
            default: None,
            identity: String::new(),
            identity_sequence: None,
            generated: false,
            in_primary_key: false,
        }
    }

    fn orders() -> Table {
        Table {
            name: "public.orders".into(),
            columns: vec![
                Column {
                    identity: "a".into(),
                    in_primary_key: true,
                    ..column("id", "bigint")
                },
                column("customer", "text"),
                Column {
                    default: Some("now()".into()),
                    ..column("created_at", "timestamp with time zone")
                },
                column("order_event_id", "text"),
                Column {
                    generated: true,
                    ..column("total_cents", "bigint")
                },
            ],
        }
    }

    #[test]
    fn json_fields_fill_columns_and_defaults_apply_where_the_json_has_none() {
        let sql = insert_statement(
            &orders(),
            &[(EventField::EventId, "order_event_id".into())],
            OnConflict::Error,
        )
        .unwrap();
        assert!(
            sql.starts_with(
                "INSERT INTO public.orders (\"customer\", \"created_at\", \"order_event_id\")"
            ),
            "{sql}"
        );
        assert!(sql.contains("r.\"customer\""));
        assert!(sql.contains(
            "CASE WHEN e.value_json ? 'created_at' THEN r.\"created_at\" ELSE now() END"
        ));
        assert!(sql.contains("(e.event_id)::text"));
        assert!(!sql.contains("ON CONFLICT"));
    }

    #[test]
    fn update_needs_a_primary_key_and_keeps_the_last_event_of_a_key() {
        let mut t = orders();
        t.columns[0].identity = String::new();
        let sql = insert_statement(&t, &[], OnConflict::Update).unwrap();
        assert!(sql.contains("SELECT DISTINCT ON (\"id\")"), "{sql}");
        assert!(sql.contains("ORDER BY \"id\", kdedup_ord DESC"));
        assert!(
            sql.contains("ON CONFLICT (\"id\") DO UPDATE SET \"customer\" = EXCLUDED.\"customer\"")
        );
        t.columns[0].in_primary_key = false;
        let (problem, fix) = insert_statement(&t, &[], OnConflict::Update).unwrap_err();
        assert!(problem.contains("has none"), "{problem}");
        assert!(fix.contains("primary key"));
    }

    #[test]
    fn mapping_a_missing_or_generated_column_is_an_error_naming_the_columns() {
        let (problem, fix) = insert_statement(
            &orders(),
            &[(EventField::Key, "nope".into())],
            OnConflict::Nothing,
        )
        .unwrap_err();
        assert!(problem.contains("no column \"nope\""), "{problem}");
        assert!(fix.contains("customer"), "{fix}");
        let (problem, _) = insert_statement(
            &orders(),
            &[(EventField::Key, "total_cents".into())],
            OnConflict::Nothing,
        )
        .unwrap_err();
        assert!(problem.contains("generated"), "{problem}");
    }

    #[test]
    fn a_key_goes_into_a_text_column_as_utf8_and_names_are_quoted() {
        assert_eq!(
            field_expr(EventField::Key, "text"),
            "(convert_from(e.key, 'UTF8'))::text"
        );
        assert_eq!(field_expr(EventField::Key, "bytea"), "(e.key)::bytea");
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(literal("it's"), "'it''s'");
    }
}
