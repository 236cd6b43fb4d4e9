//! `kdedup inspect` and `kdedup stats`: read-only views of the gate tables for operators.
//!
//! Both open one connection of their own, read in one `REPEATABLE READ READ ONLY`
//! transaction (a consistent snapshot; `now()` is the same in every query) under a
//! statement timeout, and never write. They print aligned text for a person, or one JSON
//! document with `--json` for scripts.
//!
//! Exit codes, like grep's: 0 found (inspect) or printed (stats); 1 the id is not in
//! `processed_events` (inspect only); 2 the database could not be read; 64 bad arguments.

use std::fmt::Write as _;
use std::process::ExitCode;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

use crate::settings::{DbSettings, InspectSettings};
pub use crate::store::inspect::{
    inspect, stats, Deliveries, Delivery, Inspection, ScopeCounters, Sighting, Stats,
    EXACT_COUNT_LIMIT,
};

/// `kdedup inspect`: the id is not in `processed_events`.
pub const EXIT_NOT_FOUND: u8 = 1;
/// `kdedup inspect` / `kdedup stats`: the database could not be read.
pub const EXIT_ERROR: u8 = 2;

/// `kdedup inspect`: prints the result and returns the exit code.
pub async fn inspect_command(args: &InspectSettings) -> ExitCode {
    match inspect(&args.db, &args.event_id, args.scope.as_deref()).await {
        Ok(found) => {
            if args.json {
                println!("{}", inspect_json(&found));
            } else {
                print!("{}", inspect_text(&found));
            }
            if found.sightings.is_empty() {
                ExitCode::from(EXIT_NOT_FOUND)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("kdedup inspect: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// `kdedup stats`: prints the result and returns the exit code.
pub async fn stats_command(db: &DbSettings, json: bool) -> ExitCode {
    match stats(db).await {
        Ok(s) => {
            if json {
                println!("{}", stats_json(&s));
            } else {
                print!("{}", stats_text(&s));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kdedup stats: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

// ---- output ----

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn timestamp(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string()
}

/// `12345678` -> `12,345,678`.
pub fn grouped(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    out
}

/// The two largest units of a span: `45s`, `3m 12s`, `2h 5m`, `6d 23h`.
pub fn span(secs: i64) -> String {
    let secs = secs.unsigned_abs();
    let parts = [
        (secs / 86_400, "d"),
        (secs / 3_600 % 24, "h"),
        (secs / 60 % 60, "m"),
        (secs % 60, "s"),
    ];
    let Some(first) = parts.iter().position(|(v, _)| *v > 0) else {
        return "0s".into();
    };
    parts[first..]
        .iter()
        .take(2)
        .filter(|(v, _)| *v > 0)
        .map(|(v, u)| format!("{v}{u}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `2026-11-23 09:41:02.123 UTC (3m 12s ago)` or `(in 6d 23h)`.
fn when(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (t - now).num_seconds();
    if secs > 0 {
        format!("{} (in {})", timestamp(t), span(secs))
    } else {
        format!("{} ({} ago)", timestamp(t), span(secs))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Label/value lines with the values aligned.
fn aligned(lines: &[(&str, String)], indent: usize) -> String {
    let width = lines.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (label, value) in lines {
        let _ = writeln!(out, "{:indent$}{label:<width$}  {value}", "");
    }
    out
}

pub fn inspect_text(r: &Inspection) -> String {
    let where_ = match &r.scope {
        Some(s) => format!("scope {s:?}"),
        None => "every scope".to_string(),
    };
    if r.sightings.is_empty() {
        return format!(
            "event {:?} (schema {}, {where_}): never seen, or expired and pruned\n",
            r.event_id, r.schema
        );
    }
    let mut out = format!(
        "event {:?} (schema {}, {where_}): seen in {} scope{}\n",
        r.event_id,
        r.schema,
        r.sightings.len(),
        if r.sightings.len() == 1 { "" } else { "s" }
    );
    for s in &r.sightings {
        let status = match (&s.delivery, s.queued_since) {
            (Some(d), _) => delivery_status(d, r.now),
            (None, Some(t)) => format!(
                "queued for output (outbox row waiting for the relay since {})",
                when(t, r.now)
            ),
            (None, None) => "forwarded (no outbox row left: the relay published it)".to_string(),
        };
        let expires = if s.expired(r.now) {
            format!(
                "{}; expired: the next sighting is forwarded as new, the pruner deletes this row",
                when(s.expires_at, r.now)
            )
        } else {
            when(s.expires_at, r.now)
        };
        let hash = match &s.payload_hash {
            Some(h) => format!("{} (SHA-256, first {} bytes)", hex(h), h.len()),
            None => "none".to_string(),
        };
        let mut lines = vec![
            ("scope", printable(&s.scope)),
            ("status", status),
            ("first seen", when(s.first_seen_at, r.now)),
            (
                "source",
                format!(
                    "{} partition {} offset {}",
                    s.source_topic, s.source_partition, s.source_offset
                ),
            ),
            ("expires", expires),
            ("payload hash", hash),
        ];
        if let Some(d) = &s.delivery {
            lines.extend(delivery_lines(d, r.now));
        }
        out.push('\n');
        out.push_str(&aligned(&lines, 2));
    }
    out
}

/// The status line of an HTTP delivery.
fn delivery_status(d: &Delivery, now: DateTime<Utc>) -> String {
    match d.status.as_str() {
        "PROCESSED" => "PROCESSED: delivered over HTTP".to_string(),
        "FAILED" => {
            "FAILED: dead-lettered; a replay (or a later copy) delivers it again with the same key"
                .to_string()
        }
        _ => match d.lease_expires_at {
            Some(t) if t > now => format!(
                "PROCESSING: being delivered by {} (lease until {})",
                printable(d.lease_owner.as_deref().unwrap_or("?")),
                when(t, now)
            ),
            Some(t) => format!(
                "PROCESSING, lease expired {}: the next copy of the event takes it over",
                when(t, now)
            ),
            None => "PROCESSING".to_string(),
        },
    }
}

/// Most characters of a stored answer's body `inspect` prints (`--json` has all of it).
const BODY_SHOWN: usize = 300;

/// Attempts, last error and the stored answer of an HTTP delivery.
fn delivery_lines(d: &Delivery, now: DateTime<Utc>) -> Vec<(&'static str, String)> {
    let mut lines = vec![("attempts", d.attempts.to_string())];
    if let Some(e) = &d.last_error {
        lines.push(("last error", printable(e)));
    }
    if let Some(status) = d.response_status {
        let headers = d
            .response_headers
            .as_ref()
            .map(|h| format!(", headers {h}"))
            .unwrap_or_default();
        lines.push(("answer", format!("HTTP {status}{headers}")));
    }
    if let Some(body) = &d.response_body {
        let text = String::from_utf8_lossy(body);
        let shown: String = text.chars().take(BODY_SHOWN).collect();
        let more = if shown.len() < text.len() { " ..." } else { "" };
        lines.push((
            "answer body",
            format!("{} ({} bytes){more}", printable(&shown), body.len()),
        ));
    }
    if let Some(t) = d.finished_at {
        lines.push(("finished", when(t, now)));
    }
    lines
}

/// `text` with control characters escaped (`\u{1b}`, `\n`, ...): a scope comes from a
/// message header, and printing it raw would let a producer write terminal escapes into
/// an operator's screen.
fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

pub fn inspect_json(r: &Inspection) -> Value {
    json!({
        "event_id": r.event_id,
        "schema": r.schema,
        "scope": r.scope,
        "now": rfc3339(r.now),
        "found": !r.sightings.is_empty(),
        "matches": r.sightings.iter().map(|s| json!({
            "scope": s.scope,
            "status": s.status(),
            "source_topic": s.source_topic,
            "source_partition": s.source_partition,
            "source_offset": s.source_offset,
            "first_seen_at": rfc3339(s.first_seen_at),
            "expires_at": rfc3339(s.expires_at),
            "expired": s.expired(r.now),
            "payload_hash": s.payload_hash.as_deref().map(hex),
            "queued_since": s.queued_since.map(rfc3339),
            "delivery": s.delivery.as_ref().map(|d| json!({
                "status": d.status,
                "attempts": d.attempts,
                "last_error": d.last_error,
                "lease_owner": d.lease_owner,
                "lease_expires_at": d.lease_expires_at.map(rfc3339),
                "response_status": d.response_status,
                "response_headers": d.response_headers,
                "response_body": d.response_body.as_deref().map(|b| String::from_utf8_lossy(b).into_owned()),
                "finished_at": d.finished_at.map(rfc3339),
            })),
        })).collect::<Vec<_>>(),
    })
}

/// Scopes listed one by one in the text output; `--json` lists them all.
const SCOPES_SHOWN: usize = 20;

pub fn stats_text(s: &Stats) -> String {
    let mut out = format!("schema {} at {}\n\n", s.schema, timestamp(s.now));
    let mut lines = vec![(
        "processed_events",
        format!(
            "{} rows ({})",
            grouped(s.rows),
            if s.rows_exact {
                "exact count"
            } else {
                "Postgres estimate"
            }
        ),
    )];
    if let Some((oldest, newest)) = s.first_seen {
        let note = if s.rows_exact {
            ""
        } else {
            " (by expiry order)"
        };
        lines.push((
            "  oldest first seen",
            format!("{}{note}", when(oldest, s.now)),
        ));
        lines.push((
            "  newest first seen",
            format!("{}{note}", when(newest, s.now)),
        ));
    }
    if let Some((earliest, latest)) = s.expires {
        lines.push(("  earliest expiry", when(earliest, s.now)));
        lines.push(("  latest expiry", when(latest, s.now)));
    }
    lines.push((
        "  expired, not pruned",
        format!("{} rows", grouped(s.expired_rows)),
    ));
    lines.push((
        "outbox backlog",
        match s.outbox_oldest {
            Some(t) => format!("{} rows, oldest {}", grouped(s.outbox_rows), when(t, s.now)),
            None => format!("{} rows", grouped(s.outbox_rows)),
        },
    ));
    if let Some(d) = &s.deliveries {
        let estimate = if d.exact { "" } else { " (Postgres estimate)" };
        lines.push((
            "HTTP deliveries",
            format!("{} PROCESSED{estimate}", grouped(d.processed)),
        ));
        lines.push((
            "  FAILED",
            format!(
                "{}{estimate}: dead-lettered; kdedup replay delivers them again",
                grouped(d.failed)
            ),
        ));
        lines.push((
            "  PROCESSING",
            format!(
                "{}, {} past their lease",
                grouped(d.processing),
                grouped(d.processing_expired)
            ),
        ));
    }
    match &s.counters {
        Some(counters) => {
            let since = counters.iter().map(|c| c.since).min();
            lines.push((
                "duplicates avoided",
                match since {
                    Some(t) => format!(
                        "{} (every replica, since {})",
                        grouped(s.duplicates().unwrap_or(0)),
                        timestamp(t)
                    ),
                    None => "0 (nothing gated yet)".to_string(),
                },
            ));
            lines.push(("forwarded", grouped(s.forwarded().unwrap_or(0))));
        }
        None => lines.push((
            "duplicates avoided",
            "unknown: no gate_counters table (apply the migrations: kdedup migrate)".into(),
        )),
    }
    out.push_str(&aligned(&lines, 0));
    if let Some(counters) = s.counters.as_ref().filter(|c| c.len() > 1) {
        let width = counters
            .iter()
            .take(SCOPES_SHOWN)
            .map(|c| printable(&c.scope).chars().count())
            .max()
            .unwrap_or(0)
            .max(5);
        let _ = writeln!(
            out,
            "\n  {:<width$}  {:>14}  {:>14}",
            "scope", "duplicates", "forwarded"
        );
        for c in counters.iter().take(SCOPES_SHOWN) {
            let _ = writeln!(
                out,
                "  {:<width$}  {:>14}  {:>14}",
                printable(&c.scope),
                grouped(c.duplicates),
                grouped(c.forwarded)
            );
        }
        if counters.len() > SCOPES_SHOWN {
            let _ = writeln!(
                out,
                "  ... and {} more scopes (--json lists them all)",
                counters.len() - SCOPES_SHOWN
            );
        }
    }
    out
}

pub fn stats_json(s: &Stats) -> Value {
    json!({
        "schema": s.schema,
        "now": rfc3339(s.now),
        "processed_events": {
            "rows": s.rows,
            "rows_exact": s.rows_exact,
            "oldest_first_seen_at": s.first_seen.map(|(t, _)| rfc3339(t)),
            "newest_first_seen_at": s.first_seen.map(|(_, t)| rfc3339(t)),
            "earliest_expires_at": s.expires.map(|(t, _)| rfc3339(t)),
            "latest_expires_at": s.expires.map(|(_, t)| rfc3339(t)),
            "expired_awaiting_prune": s.expired_rows,
        },
        "outbox": {
            "rows": s.outbox_rows,
            "oldest_created_at": s.outbox_oldest.map(rfc3339),
            "oldest_age_seconds": s.outbox_oldest.map(|t| (s.now - t).num_milliseconds() as f64 / 1000.0),
        },
        "deliveries": s.deliveries.as_ref().map(|d| json!({
            "processed": d.processed,
            "failed": d.failed,
            "processing": d.processing,
            "processing_past_lease": d.processing_expired,
            "exact": d.exact,
        })),
        "duplicates_avoided": s.duplicates(),
        "forwarded": s.forwarded(),
        "scopes": s.counters.as_ref().map(|c| c.iter().map(|c| json!({
            "scope": c.scope,
            "duplicates": c.duplicates,
            "forwarded": c.forwarded,
            "since": rfc3339(c.since),
            "updated_at": rfc3339(c.updated_at),
        })).collect::<Vec<_>>()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_795_000_000 + secs, 0).unwrap()
    }

    fn sighting(queued: bool, expires_in: i64) -> Sighting {
        Sighting {
            scope: "orders".into(),
            source_topic: "orders.in".into(),
            source_partition: 2,
            source_offset: 1234,
            payload_hash: Some(vec![0xab, 0x01, 0xff]),
            first_seen_at: t(-192),
            expires_at: t(expires_in),
            queued_since: queued.then(|| t(-12)),
            delivery: None,
        }
    }

    #[test]
    fn inspect_shows_an_http_delivery_with_its_attempts_error_and_answer() {
        let mut s = sighting(false, 3600);
        s.delivery = Some(Delivery {
            status: "PROCESSED".into(),
            attempts: 3,
            last_error: Some("HTTP 503: busy".into()),
            lease_owner: None,
            lease_expires_at: None,
            response_status: Some(201),
            response_headers: Some(json!({"x-app": "applied"})),
            response_body: Some(b"{\"ok\":true}".to_vec()),
            finished_at: Some(t(-5)),
        });
        let mut failed = sighting(false, 3600);
        failed.delivery = Some(Delivery {
            status: "PROCESSING".into(),
            attempts: 1,
            last_error: None,
            lease_owner: Some("pod-1/7/ab".into()),
            lease_expires_at: Some(t(-30)),
            response_status: None,
            response_headers: None,
            response_body: None,
            finished_at: None,
        });
        let r = Inspection {
            event_id: "ev-1".into(),
            scope: None,
            schema: "kdedup".into(),
            now: t(0),
            sightings: vec![s, failed],
        };
        let text = inspect_text(&r);
        assert!(text.contains("PROCESSED: delivered over HTTP"), "{text}");
        assert!(text.contains("attempts      3"), "{text}");
        assert!(text.contains("last error    HTTP 503: busy"), "{text}");
        assert!(
            text.contains("HTTP 201, headers {\"x-app\":\"applied\"}"),
            "{text}"
        );
        assert!(text.contains("{\"ok\":true} (11 bytes)"), "{text}");
        assert!(text.contains("lease expired"), "{text}");
        let j = inspect_json(&r);
        assert_eq!(j["matches"][0]["status"], "delivered");
        assert_eq!(j["matches"][0]["delivery"]["attempts"], 3);
        assert_eq!(
            j["matches"][0]["delivery"]["response_body"],
            "{\"ok\":true}"
        );
        assert_eq!(j["matches"][1]["status"], "being delivered");
        assert_eq!(j["matches"][0]["queued_since"], Value::Null);
    }

    #[test]
    fn scopes_are_printed_with_control_characters_escaped() {
        assert_eq!(printable("orders"), "orders");
        assert_eq!(printable("evil\u{1b}[2Jscope\n"), "evil\\u{1b}[2Jscope\\n");
    }

    #[test]
    fn numbers_and_spans_read_well() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(-1234567), "-1,234,567");
        assert_eq!(span(0), "0s");
        assert_eq!(span(45), "45s");
        assert_eq!(span(192), "3m 12s");
        assert_eq!(span(3600), "1h");
        assert_eq!(span(7 * 86_400 - 60), "6d 23h");
        assert_eq!(span(-90), "1m 30s");
        assert_eq!(hex(&[0xab, 0x01]), "ab01");
    }

    #[test]
    fn inspect_text_says_where_when_and_status() {
        let r = Inspection {
            event_id: "ev-1".into(),
            scope: None,
            schema: "kdedup".into(),
            now: t(0),
            sightings: vec![sighting(false, 3600), sighting(true, -60)],
        };
        let text = inspect_text(&r);
        assert!(text.contains("seen in 2 scopes"), "{text}");
        assert!(text.contains("  status        forwarded"), "{text}");
        assert!(text.contains("queued for output"), "{text}");
        assert!(text.contains("orders.in partition 2 offset 1234"), "{text}");
        assert!(text.contains("(3m 12s ago)"), "{text}");
        assert!(text.contains("(in 1h)"), "{text}");
        assert!(text.contains("(1m ago); expired"), "{text}");
        assert!(text.contains("ab01ff (SHA-256, first 3 bytes)"), "{text}");
        let j = inspect_json(&r);
        assert_eq!(j["found"], true);
        assert_eq!(j["matches"][0]["status"], "forwarded");
        assert_eq!(j["matches"][0]["expired"], false);
        assert_eq!(j["matches"][1]["status"], "queued for output");
        assert_eq!(j["matches"][1]["expired"], true);
        assert_eq!(j["matches"][0]["payload_hash"], "ab01ff");
    }

    #[test]
    fn inspect_says_when_nothing_is_found() {
        let r = Inspection {
            event_id: "nope".into(),
            scope: Some("orders".into()),
            schema: "kdedup".into(),
            now: t(0),
            sightings: vec![],
        };
        assert_eq!(
            inspect_text(&r),
            "event \"nope\" (schema kdedup, scope \"orders\"): never seen, or expired and pruned\n"
        );
        assert_eq!(inspect_json(&r)["found"], false);
    }

    #[test]
    fn stats_text_and_json() {
        let c = |scope: &str, d, f| ScopeCounters {
            scope: scope.into(),
            duplicates: d,
            forwarded: f,
            since: t(-600),
            updated_at: t(-1),
        };
        let s = Stats {
            schema: "kdedup".into(),
            now: t(0),
            rows: 20_000,
            rows_exact: true,
            first_seen: Some((t(-600), t(-1))),
            expires: Some((t(7 * 86_400 - 600), t(7 * 86_400 - 1))),
            expired_rows: 0,
            outbox_rows: 3,
            outbox_oldest: Some(t(-2)),
            counters: Some(vec![c("a", 5000, 15_000), c("b", 1012, 5000)]),
            deliveries: None,
        };
        let text = stats_text(&s);
        assert!(text.contains("20,000 rows (exact count)"), "{text}");
        assert!(text.contains("6,012 (every replica"), "{text}");
        assert!(text.contains("3 rows, oldest"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().eq(["b", "1,012", "5,000"])),
            "{text}"
        );
        let j = stats_json(&s);
        assert_eq!(j["duplicates_avoided"], 6012);
        assert_eq!(j["forwarded"], 20_000);
        assert_eq!(j["outbox"]["oldest_age_seconds"], 2.0);
        assert_eq!(j["scopes"][1]["scope"], "b");

        let old = Stats {
            counters: None,
            ..s
        };
        assert!(stats_text(&old).contains("unknown: no gate_counters table"));
        assert!(stats_json(&old)["duplicates_avoided"].is_null());
        assert!(!stats_text(&old).contains("HTTP deliveries"));
        assert!(stats_json(&old)["deliveries"].is_null());

        let http = Stats {
            deliveries: Some(Deliveries {
                processing: 12,
                processing_expired: 2,
                processed: 19_980,
                failed: 8,
                exact: true,
            }),
            ..old
        };
        let text = stats_text(&http);
        assert!(text.contains("HTTP deliveries"), "{text}");
        assert!(text.contains("19,980 PROCESSED\n"), "{text}");
        assert!(
            text.contains("8: dead-lettered; kdedup replay delivers them again"),
            "{text}"
        );
        assert!(text.contains("12, 2 past their lease"), "{text}");
        assert_eq!(stats_json(&http)["deliveries"]["failed"], 8);
        assert_eq!(stats_json(&http)["deliveries"]["processing_past_lease"], 2);
    }
}
