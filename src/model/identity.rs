//! Event identity: `(scope, event_id)` worked out from a Kafka message.
//!
//! `--id-from` is a fallback chain: the first source that is *present* wins. A source that
//! is present but unusable (empty, too long, not UTF-8) rejects the message at once rather
//! than silently falling through, because falling through would give the same event a
//! different identity depending on which sources a producer happened to fill in. A value
//! that is not JSON only makes `json:` sources absent; if nothing later matches, the
//! rejection says the value was not JSON.
//!
//! A rejected message goes to the dead-letter topic with [`Rejection::reason`] (a short,
//! bounded label used in metrics and headers) and [`Rejection`]'s text (for people).

use std::fmt;

/// One place an event id can come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdSource {
    Header(String),
    Key,
    /// RFC 6901 JSON pointer into the message value, e.g. `/id` or `/meta/event_id`.
    Json(String),
    /// CloudEvents: an event is identified by `source` + `id` (the spec makes `id` unique
    /// per source only). Binary mode: the `ce_source` and `ce_id` headers; structured mode:
    /// the `source` and `id` fields of the JSON value. The event id is `<source> <id>`,
    /// with any `%` or space in the source percent-encoded, so the first space always
    /// separates the two (a valid source, a URI-reference, has neither).
    CloudEvents,
}

impl fmt::Display for IdSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdSource::Header(h) => write!(f, "header:{h}"),
            IdSource::Key => write!(f, "key"),
            IdSource::Json(p) => write!(f, "json:{p}"),
            IdSource::CloudEvents => write!(f, "cloudevents"),
        }
    }
}

/// The parsed `--id-from` chain plus the size limit.
#[derive(Debug, Clone)]
pub struct IdSpec {
    pub sources: Vec<IdSource>,
    pub max_id_bytes: usize,
}

/// Where the dedup scope comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeSpec {
    Literal(String),
    Header(String),
}

/// Why a message has no usable identity. Each variant maps to one bounded `reason` label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("no event id: none of {0} is present")]
    MissingId(String),
    #[error("event id from {0} is empty")]
    EmptyId(String),
    #[error("event id from {from} is {len} bytes, longer than --max-id-bytes {max}")]
    IdTooLong {
        from: String,
        len: usize,
        max: usize,
    },
    #[error("event id from {0} is not valid UTF-8 text")]
    IdNotUtf8(String),
    #[error("event id from {0} contains a NUL byte")]
    IdHasNul(String),
    #[error("event id at {0} is not a string or a number")]
    IdNotScalar(String),
    #[error("value is not JSON, so {pointer} cannot be read: {error}")]
    ValueNotJson { pointer: String, error: String },
    #[error("no scope: header {0} is missing, empty or not UTF-8")]
    MissingScope(String),
    #[error("message is {len} bytes, larger than {max}, the most that --max-message-bytes and the output topic's max.message.bytes (less kdedup's own headers) allow")]
    MessageTooLarge { len: usize, max: usize },
    #[error("Postgres refused to store the event (SQLSTATE {sqlstate}): {message}")]
    DatabaseRefused {
        sqlstate: String,
        message: String,
        scope: String,
        event_id: String,
    },
    #[error("the sink statement refused the event (SQLSTATE {sqlstate}): {message}")]
    SinkRejected {
        sqlstate: String,
        message: String,
        scope: String,
        event_id: String,
    },
    #[error("--sink-table maps a JSON object's fields onto columns, and the value is {what}")]
    NotAJsonObject { what: &'static str },
    #[error("the output topic refused the event for good: {error}")]
    OutputRefused { error: String },
    #[error("a header name is not valid UTF-8 text")]
    HeaderNotUtf8,
    #[error(
        "CloudEvent has {present} but no {missing}: an id is unique only together with its source"
    )]
    CloudEventIncomplete {
        present: &'static str,
        missing: &'static str,
    },
    #[error("event id was first seen at {first} with a different payload")]
    PayloadMismatch {
        first: String,
        scope: String,
        event_id: String,
    },
    /// `--sink http`: the application refused the event (a 4xx other than 408, 409 and
    /// 429), or every one of `--http-max-attempts` requests failed.
    #[error("{}", http_failure_text(.rejected, .attempts, .status, .error))]
    HttpFailed {
        /// Refused at once (`http_rejected`), not out of attempts (`http_failed`).
        rejected: bool,
        attempts: u32,
        /// The last answer's status, if there was an answer.
        status: Option<u16>,
        /// The last answer's body excerpt, or the I/O error (bounded).
        error: String,
        scope: String,
        event_id: String,
    },
}

fn http_failure_text(rejected: &bool, attempts: &u32, status: &Option<u16>, error: &str) -> String {
    let answer = match status {
        Some(s) => format!("HTTP {s}: {error}"),
        None => error.to_string(),
    };
    match rejected {
        true => format!("the application refused the event ({answer})"),
        false => format!("no request of {attempts} succeeded; the last: {answer}"),
    }
}

impl Rejection {
    /// The event's `(scope, event_id)`, for log lines, where the message has one.
    pub fn identity(&self) -> (Option<&str>, Option<&str>) {
        match self {
            Rejection::PayloadMismatch {
                scope, event_id, ..
            }
            | Rejection::DatabaseRefused {
                scope, event_id, ..
            }
            | Rejection::SinkRejected {
                scope, event_id, ..
            }
            | Rejection::HttpFailed {
                scope, event_id, ..
            } => (Some(scope), Some(event_id)),
            _ => (None, None),
        }
    }

    /// The SQLSTATE Postgres refused the event with, for the `kdedup-dlq-sqlstate` header.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Rejection::DatabaseRefused { sqlstate, .. }
            | Rejection::SinkRejected { sqlstate, .. } => Some(sqlstate),
            _ => None,
        }
    }

    /// The last HTTP status and body excerpt (or error) of an `http_*` dead letter, for
    /// the `kdedup-dlq-http-status` and `kdedup-dlq-http-body` headers.
    pub fn http_answer(&self) -> Option<(Option<u16>, &str)> {
        match self {
            Rejection::HttpFailed { status, error, .. } => Some((*status, error)),
            _ => None,
        }
    }

    /// Bounded label for metrics and the `kdedup-dlq-reason` header.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::MissingId(_) => "missing_id",
            Rejection::EmptyId(_) => "empty_id",
            Rejection::IdTooLong { .. } => "id_too_long",
            Rejection::IdNotUtf8(_) => "id_not_utf8",
            Rejection::IdHasNul(_) => "id_invalid",
            Rejection::IdNotScalar(_) => "id_invalid",
            Rejection::ValueNotJson { .. } => "value_not_json",
            Rejection::MissingScope(_) => "missing_scope",
            Rejection::MessageTooLarge { .. } => "message_too_large",
            Rejection::PayloadMismatch { .. } => "payload_mismatch",
            Rejection::HeaderNotUtf8 => "header_not_utf8",
            Rejection::DatabaseRefused { .. } => "db_refused",
            Rejection::SinkRejected { .. } | Rejection::NotAJsonObject { .. } => "sink_rejected",
            Rejection::OutputRefused { .. } => "output_refused",
            Rejection::CloudEventIncomplete { .. } => "missing_id",
            Rejection::HttpFailed { rejected: true, .. } => "http_rejected",
            Rejection::HttpFailed {
                rejected: false, ..
            } => "http_failed",
        }
    }
}

/// The parts of a Kafka message identity extraction looks at.
pub struct MessageView<'a> {
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: &'a [(String, Option<Vec<u8>>)],
}

impl MessageView<'_> {
    fn header(&self, name: &str) -> Option<&[u8]> {
        // The last header with a name wins, as with most Kafka header readers.
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }
}

impl IdSpec {
    pub fn parse(spec: &str, max_id_bytes: usize) -> Result<Self, String> {
        let mut sources = Vec::new();
        for part in spec.split(',').map(str::trim) {
            let source = if part == "key" {
                IdSource::Key
            } else if let Some(h) = part.strip_prefix("header:") {
                if h.is_empty() {
                    return Err(format!("{part:?} names no header"));
                }
                IdSource::Header(h.to_string())
            } else if let Some(p) = part.strip_prefix("json:") {
                if !(p.is_empty() || p.starts_with('/')) {
                    return Err(format!(
                        "{part:?} is not a JSON pointer (it must start with '/', e.g. json:/id)"
                    ));
                }
                IdSource::Json(p.to_string())
            } else if part == "cloudevents" {
                IdSource::CloudEvents
            } else {
                return Err(format!("{part:?} is not an id source"));
            };
            sources.push(source);
        }
        if sources.is_empty() {
            return Err("names no id source".into());
        }
        Ok(Self {
            sources,
            max_id_bytes,
        })
    }

    pub fn describe(&self) -> String {
        self.sources
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The event id of a message, or why it has none.
    pub fn extract(&self, msg: &MessageView<'_>) -> Result<String, Rejection> {
        // JSON is parsed at most once per message, and only if a json: source is reached.
        let mut parsed: Option<Result<serde_json::Value, String>> = None;
        let mut not_json: Option<Rejection> = None;
        for source in &self.sources {
            let raw: Option<Vec<u8>> = match source {
                IdSource::Header(name) => msg.header(name).map(<[u8]>::to_vec),
                IdSource::Key => msg.key.map(<[u8]>::to_vec),
                IdSource::Json(pointer) => {
                    let Some(value) = msg.value else { continue };
                    let doc = parsed.get_or_insert_with(|| {
                        serde_json::from_slice(value).map_err(|e| e.to_string())
                    });
                    match doc {
                        Err(error) => {
                            not_json.get_or_insert(Rejection::ValueNotJson {
                                pointer: pointer.clone(),
                                error: error.clone(),
                            });
                            continue;
                        }
                        Ok(doc) => json_scalar(doc.pointer(pointer), source)?,
                    }
                }
                IdSource::CloudEvents => {
                    let parts = match (msg.header("ce_source"), msg.header("ce_id")) {
                        (Some(source), Some(id)) => Some((source.to_vec(), id.to_vec())),
                        (None, Some(_)) => {
                            return Err(Rejection::CloudEventIncomplete {
                                present: "a ce_id header",
                                missing: "ce_source header",
                            })
                        }
                        _ => {
                            // Structured mode, or no CloudEvent at all.
                            let doc = msg.value.map(|v| {
                                parsed.get_or_insert_with(|| {
                                    serde_json::from_slice(v).map_err(|e| e.to_string())
                                })
                            });
                            match doc {
                                Some(Ok(doc)) => {
                                    let id = json_scalar(doc.pointer("/id"), source)?;
                                    let ce_source = json_scalar(doc.pointer("/source"), source)?;
                                    match (ce_source, id) {
                                        (Some(s), Some(i)) => Some((s, i)),
                                        (None, Some(_)) => {
                                            return Err(Rejection::CloudEventIncomplete {
                                                present: "an \"id\" field",
                                                missing: "\"source\" field",
                                            })
                                        }
                                        _ => None,
                                    }
                                }
                                _ => None,
                            }
                        }
                    };
                    match parts {
                        None => None,
                        Some((ce_source, id)) => {
                            let ce_source = String::from_utf8(ce_source)
                                .map_err(|_| Rejection::IdNotUtf8("cloudevents source".into()))?;
                            if ce_source.is_empty() {
                                return Err(Rejection::EmptyId("cloudevents source".into()));
                            }
                            if id.is_empty() {
                                return Err(Rejection::EmptyId(source.to_string()));
                            }
                            let mut joined = ce_source
                                .replace('%', "%25")
                                .replace(' ', "%20")
                                .into_bytes();
                            joined.push(b' ');
                            joined.extend_from_slice(&id);
                            Some(joined)
                        }
                    }
                }
            };
            let Some(raw) = raw else { continue };
            return self.check(source, raw);
        }
        Err(not_json.unwrap_or_else(|| Rejection::MissingId(self.describe())))
    }

    fn check(&self, source: &IdSource, raw: Vec<u8>) -> Result<String, Rejection> {
        if raw.is_empty() {
            return Err(Rejection::EmptyId(source.to_string()));
        }
        if raw.len() > self.max_id_bytes {
            return Err(Rejection::IdTooLong {
                from: source.to_string(),
                len: raw.len(),
                max: self.max_id_bytes,
            });
        }
        let id = String::from_utf8(raw).map_err(|_| Rejection::IdNotUtf8(source.to_string()))?;
        // Postgres text cannot hold NUL; catching it here keeps bad input out of the
        // transaction, where it would fail the whole batch.
        if id.contains('\0') {
            return Err(Rejection::IdHasNul(source.to_string()));
        }
        Ok(id)
    }
}

/// A JSON scalar as id bytes: a string as is, a number exactly as written (serde_json's
/// `arbitrary_precision` keeps its text, so 100000000000000000001 and
/// 100000000000000000000 stay two ids instead of collapsing into one `f64`). Absent or
/// null: `None`; an object, array or boolean: rejected.
fn json_scalar(
    value: Option<&serde_json::Value>,
    source: &IdSource,
) -> Result<Option<Vec<u8>>, Rejection> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.as_bytes().to_vec())),
        Some(serde_json::Value::Number(n)) => Ok(Some(n.to_string().into_bytes())),
        Some(_) => Err(Rejection::IdNotScalar(source.to_string())),
    }
}

impl ScopeSpec {
    /// The spec as `--scope` takes it: the literal scope, or `header:<name>`.
    pub fn describe(&self) -> String {
        match self {
            ScopeSpec::Literal(s) => s.clone(),
            ScopeSpec::Header(h) => format!("header:{h}"),
        }
    }

    pub fn parse(spec: &str) -> Result<Self, String> {
        let spec = spec.trim();
        if let Some(h) = spec.strip_prefix("header:") {
            if h.is_empty() {
                return Err(format!("{spec:?} names no header"));
            }
            return Ok(ScopeSpec::Header(h.to_string()));
        }
        if spec.len() > 255 || spec.contains('\0') {
            return Err("a literal scope must be at most 255 bytes without NUL".into());
        }
        Ok(ScopeSpec::Literal(spec.to_string()))
    }

    pub fn extract(&self, msg: &MessageView<'_>) -> Result<String, Rejection> {
        match self {
            ScopeSpec::Literal(s) => Ok(s.clone()),
            ScopeSpec::Header(name) => msg
                .header(name)
                .and_then(|v| std::str::from_utf8(v).ok())
                .filter(|s| !s.is_empty() && s.len() <= 255 && !s.contains('\0'))
                .map(str::to_string)
                .ok_or_else(|| Rejection::MissingScope(name.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(
        key: Option<&'a [u8]>,
        value: Option<&'a [u8]>,
        headers: &'a [(String, Option<Vec<u8>>)],
    ) -> MessageView<'a> {
        MessageView {
            key,
            value,
            headers,
        }
    }

    fn h(name: &str, v: &[u8]) -> (String, Option<Vec<u8>>) {
        (name.to_string(), Some(v.to_vec()))
    }

    #[test]
    fn first_present_source_wins() {
        let spec = IdSpec::parse("header:event-id,json:/id,key", 512).unwrap();
        let hs = [h("event-id", b"from-header")];
        assert_eq!(
            spec.extract(&view(Some(b"k"), Some(br#"{"id":"j"}"#), &hs)),
            Ok("from-header".into())
        );
        assert_eq!(
            spec.extract(&view(Some(b"k"), Some(br#"{"id":7}"#), &[])),
            Ok("7".into())
        );
        assert_eq!(
            spec.extract(&view(Some(b"k"), Some(br#"{"other":1}"#), &[])),
            Ok("k".into())
        );
    }

    #[test]
    fn unusable_ids_are_rejected_with_a_reason() {
        let spec = IdSpec::parse("header:event-id", 4).unwrap();
        let cases: [(&[u8], &str); 4] = [
            (b"", "empty_id"),
            (b"12345", "id_too_long"),
            (&[0xff, 0xfe], "id_not_utf8"),
            (b"a\0b", "id_invalid"),
        ];
        for (raw, reason) in cases {
            let hs = [h("event-id", raw)];
            let err = spec.extract(&view(None, None, &hs)).unwrap_err();
            assert_eq!(err.reason(), reason, "{err}");
        }
        let err = spec.extract(&view(None, None, &[])).unwrap_err();
        assert_eq!(err.reason(), "missing_id");
    }

    #[test]
    fn non_json_value_is_named_when_nothing_else_matches() {
        let spec = IdSpec::parse("json:/id", 512).unwrap();
        let err = spec
            .extract(&view(None, Some(b"{truncated"), &[]))
            .unwrap_err();
        assert_eq!(err.reason(), "value_not_json");
        assert!(err.to_string().contains("/id"));
        let spec = IdSpec::parse("json:/id,key", 512).unwrap();
        assert_eq!(
            spec.extract(&view(Some(b"k1"), Some(b"nope"), &[])),
            Ok("k1".into())
        );
        let spec = IdSpec::parse("json:/id", 512).unwrap();
        let err = spec
            .extract(&view(None, Some(br#"{"id":{"a":1}}"#), &[]))
            .unwrap_err();
        assert_eq!(err.reason(), "id_invalid");
    }

    #[test]
    fn cloudevents_identity_is_source_and_id_in_binary_and_structured_mode() {
        let spec = IdSpec::parse("cloudevents", 512).unwrap();
        let hs = [h("ce_source", b"/orders"), h("ce_id", b"ce-1")];
        assert_eq!(
            spec.extract(&view(None, None, &hs)),
            Ok("/orders ce-1".into())
        );
        // The same id from another source is another event.
        let other = [h("ce_source", b"/payments"), h("ce_id", b"ce-1")];
        assert_ne!(
            spec.extract(&view(None, None, &hs)),
            spec.extract(&view(None, None, &other))
        );
        let structured = br#"{"specversion":"1.0","id":"ce-2","type":"t","source":"s"}"#;
        assert_eq!(
            spec.extract(&view(None, Some(structured), &[])),
            Ok("s ce-2".into())
        );
        // A space in the source cannot make two events look alike.
        let a = [h("ce_source", b"a b"), h("ce_id", b"c")];
        let b = [h("ce_source", b"a"), h("ce_id", b"b c")];
        assert_ne!(
            spec.extract(&view(None, None, &a)),
            spec.extract(&view(None, None, &b))
        );
        let no_source = [h("ce_id", b"ce-1")];
        assert_eq!(
            spec.extract(&view(None, None, &no_source))
                .unwrap_err()
                .reason(),
            "missing_id"
        );
        let no_source = br#"{"specversion":"1.0","id":"ce-2","type":"t"}"#;
        assert!(matches!(
            spec.extract(&view(None, Some(no_source), &[])),
            Err(Rejection::CloudEventIncomplete { .. })
        ));
    }

    #[test]
    fn json_integers_beyond_64_bits_stay_distinct() {
        let spec = IdSpec::parse("json:/id", 512).unwrap();
        let a = spec.extract(&view(None, Some(br#"{"id":100000000000000000001}"#), &[]));
        let b = spec.extract(&view(None, Some(br#"{"id":100000000000000000000}"#), &[]));
        assert_eq!(a, Ok("100000000000000000001".into()));
        assert_eq!(b, Ok("100000000000000000000".into()));
        assert_eq!(
            spec.extract(&view(None, Some(br#"{"id":18446744073709551617}"#), &[])),
            Ok("18446744073709551617".into())
        );
    }

    #[test]
    fn bad_specs_are_explained() {
        assert!(IdSpec::parse("header:", 512)
            .unwrap_err()
            .contains("names no header"));
        assert!(IdSpec::parse("json:id", 512)
            .unwrap_err()
            .contains("JSON pointer"));
        assert!(IdSpec::parse("body", 512)
            .unwrap_err()
            .contains("not an id source"));
    }

    #[test]
    fn scope_from_header_or_literal() {
        let hs = [h("tenant", b"acme")];
        assert_eq!(
            ScopeSpec::parse("header:tenant")
                .unwrap()
                .extract(&view(None, None, &hs)),
            Ok("acme".into())
        );
        assert_eq!(
            ScopeSpec::parse("header:tenant")
                .unwrap()
                .extract(&view(None, None, &[]))
                .unwrap_err()
                .reason(),
            "missing_scope"
        );
        assert_eq!(
            ScopeSpec::parse("orders")
                .unwrap()
                .extract(&view(None, None, &[])),
            Ok("orders".into())
        );
    }
}
