//! What one request carries and what its answer means: pure functions, no I/O.
//!
//! The request for an event (see README "HTTP sink" for the mapping as users read it):
//! - `POST`, the body is the Kafka value (empty for a tombstone);
//! - `Content-Type`: the input's `content-type` header, else `application/octet-stream`;
//! - `Idempotency-Key`: the event's gate key (a digest of scope and event id, see
//!   [`crate::store::gate::event_key`]), the same on every attempt by every replica, and
//!   distinct across scopes;
//! - `kdedup-event-id` and `kdedup-source` (`topic/partition/offset`), as on the Kafka
//!   output; an event id byte outside visible ASCII is sent as `%XX` (and `%` as `%25`);
//! - CloudEvents arrive in HTTP binary mode: from Kafka binary mode, each `ce_<attribute>`
//!   header becomes `ce-<attribute>`; from structured mode (`content-type:
//!   application/cloudevents+json`), each attribute becomes a `ce-<attribute>` header
//!   ([`structured_cloudevent`]), `datacontenttype` the `Content-Type`, and `data` (or the
//!   decoded `data_base64`) the body;
//! - every other input header whose name is an HTTP field name and whose value is a
//!   field value, under its own name, except the ones that would change the request
//!   itself (framing, connection, host) or that kdedup sets (`idempotency-key`,
//!   `kdedup-*`). Those are left out and counted.

use std::time::{Duration, SystemTime};

use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};

use crate::model::headers::Headers;

/// Headers of a request, in the order they are sent.
pub type HeaderList = Vec<(HeaderName, HeaderValue)>;

/// `Idempotency-Key`.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Sent when the input has no usable `content-type` header.
pub const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

/// Input headers that would change the request itself rather than describe the event.
const NOT_PASSED: [&str; 14] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "idempotency-key",
    "content-type",
];

/// The headers of an event's request, besides `Idempotency-Key` and the `kdedup-*` ones;
/// and how many input headers were left out.
pub fn mapped_headers(input: &Headers) -> (HeaderList, usize) {
    let mut out = Vec::with_capacity(input.len() + 1);
    let mut left_out = 0;
    let mut content_type = None;
    for (name, value) in input {
        let value = value.as_deref().unwrap_or_default();
        let lower = name.to_ascii_lowercase();
        if lower == "content-type" {
            // The last one wins, as for every header read from Kafka.
            content_type = HeaderValue::from_bytes(value).ok();
            continue;
        }
        let http_name = match lower.strip_prefix("ce_") {
            Some(attribute) if !attribute.is_empty() => format!("ce-{attribute}"),
            _ => lower,
        };
        if NOT_PASSED.contains(&http_name.as_str()) || http_name.starts_with("kdedup-") {
            left_out += 1;
            continue;
        }
        match (
            HeaderName::from_bytes(http_name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            (Ok(n), Ok(v)) => out.push((n, v)),
            _ => left_out += 1,
        }
    }
    out.push((
        CONTENT_TYPE,
        content_type.unwrap_or(HeaderValue::from_static(DEFAULT_CONTENT_TYPE)),
    ));
    (out, left_out)
}

/// A structured-mode CloudEvent (the input's `content-type` is
/// `application/cloudevents+json`) in HTTP binary mode: the `ce-*` headers and the
/// `Content-Type`, and the body. `None` when the value is not one (no `specversion`, not a
/// JSON object) or cannot be carried in binary mode (an attribute that is not a string,
/// number or boolean, an invalid `data_base64`): it then passes as it is, which is HTTP
/// structured mode.
pub fn structured_cloudevent(input: &Headers, value: &[u8]) -> Option<(HeaderList, Vec<u8>)> {
    use base64::Engine as _;
    let content_type = input
        .iter()
        .rev()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        .and_then(|(_, v)| v.as_deref())?;
    let content_type = String::from_utf8_lossy(content_type).to_ascii_lowercase();
    if !content_type
        .trim_start()
        .starts_with("application/cloudevents+json")
    {
        return None;
    }
    let serde_json::Value::Object(event) = serde_json::from_slice(value).ok()? else {
        return None;
    };
    event.get("specversion")?.as_str()?;
    let data_type = event
        .get("datacontenttype")
        .and_then(|v| v.as_str())
        .unwrap_or("application/json")
        .to_string();
    let mut headers = vec![(CONTENT_TYPE, HeaderValue::from_str(&data_type).ok()?)];
    for (name, v) in &event {
        if matches!(name.as_str(), "data" | "data_base64" | "datacontenttype") {
            continue;
        }
        let text = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            serde_json::Value::Null => continue,
            _ => return None,
        };
        let header =
            HeaderName::from_bytes(format!("ce-{}", name.to_ascii_lowercase()).as_bytes()).ok()?;
        headers.push((header, ce_value(&text)));
    }
    let json_data = {
        let t = data_type.to_ascii_lowercase();
        let media = t.split(';').next().unwrap_or_default().trim().to_string();
        media == "application/json" || media == "text/json" || media.ends_with("+json")
    };
    let body = match (event.get("data"), event.get("data_base64")) {
        (_, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_str()?)
            .ok()?,
        (Some(serde_json::Value::String(s)), None) if !json_data => s.clone().into_bytes(),
        (Some(data), None) => serde_json::to_vec(data).ok()?,
        (None, None) => Vec::new(),
    };
    Some((headers, body))
}

/// A CloudEvents attribute as an HTTP header value (CloudEvents HTTP binding 3.1.3.2):
/// printable ASCII as it is; space, `"`, `%` and everything else percent-encoded as UTF-8.
fn ce_value(text: &str) -> HeaderValue {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x21..0x7f).contains(&b) && b != b'"' && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).expect("printable ASCII only")
}

/// `text` as a header value: visible ASCII and spaces as they are, `%` and every other
/// byte as `%XX`.
pub fn header_text(text: &str) -> HeaderValue {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).expect("visible ASCII only")
}

/// What an answer's status means for the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: `PROCESSED`.
    Delivered,
    /// 408, 429, 5xx: try again later, within `--http-max-attempts`;
    /// `honour_retry_after` for 429 and 503.
    Retry { honour_retry_after: bool },
    /// 409: the application is still processing this key (an earlier attempt whose
    /// answer kdedup did not get). Tried again later, without counting toward
    /// `--http-max-attempts` (that attempt may still succeed), for at most
    /// `--http-conflict-timeout`.
    Conflict,
    /// Any other status: the application refused this event; `FAILED` at once.
    Rejected,
}

pub fn verdict(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        429 | 503 => Verdict::Retry {
            honour_retry_after: true,
        },
        409 => Verdict::Conflict,
        408 | 500..=599 => Verdict::Retry {
            honour_retry_after: false,
        },
        _ => Verdict::Rejected,
    }
}

/// `requests_total{class}`: `2xx` ... `5xx` for an answer.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// A `Retry-After` value: delay-seconds or an HTTP-date, from `now`. `None` when it is
/// neither.
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(at.timestamp()).ok()?);
    Some(at.duration_since(now).unwrap_or_default())
}

/// At most `max` bytes of a body, as text for a log field, a header or `last_error`:
/// invalid UTF-8 replaced, control characters as spaces, cut at a character boundary.
pub fn excerpt(body: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(max)]);
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

/// The response headers as one JSON object (name to value, the last of a repeated name;
/// values that are not text are left out), for `response_headers`.
pub fn headers_json(headers: &hyper::HeaderMap) -> String {
    let map: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.into())))
        .collect();
    serde_json::Value::Object(map).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Some(v.as_bytes().to_vec())))
            .collect()
    }

    fn find<'a>(out: &'a [(HeaderName, HeaderValue)], name: &str) -> Option<&'a str> {
        out.iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, v)| v.to_str().unwrap())
    }

    #[test]
    fn cloudevents_binary_mode_becomes_http_binary_mode() {
        let (out, left_out) = mapped_headers(&h(&[
            ("ce_specversion", "1.0"),
            ("ce_id", "A-1"),
            ("ce_source", "/orders"),
            ("ce_type", "order.created"),
            ("content-type", "application/json"),
            ("traceparent", "00-abc-def-01"),
        ]));
        assert_eq!(left_out, 0);
        assert_eq!(find(&out, "ce-specversion"), Some("1.0"));
        assert_eq!(find(&out, "ce-id"), Some("A-1"));
        assert_eq!(find(&out, "ce-source"), Some("/orders"));
        assert_eq!(find(&out, "ce-type"), Some("order.created"));
        assert_eq!(find(&out, "content-type"), Some("application/json"));
        assert_eq!(find(&out, "traceparent"), Some("00-abc-def-01"));
        assert_eq!(find(&out, "ce_id"), None);
    }

    #[test]
    fn a_structured_cloudevent_is_delivered_in_binary_mode() {
        let input = h(&[(
            "content-type",
            "application/cloudevents+json; charset=utf-8",
        )]);
        let event = br#"{"specversion":"1.0","id":"A 1%","source":"/orders","type":"order.created",
            "time":"2026-12-03T10:00:00Z","datacontenttype":"application/json","seq":7,
            "data":{"amount":42}}"#;
        let (headers, body) = structured_cloudevent(&input, event).expect("a CloudEvent");
        assert_eq!(find(&headers, "content-type"), Some("application/json"));
        assert_eq!(find(&headers, "ce-specversion"), Some("1.0"));
        assert_eq!(find(&headers, "ce-id"), Some("A%201%25"), "percent-encoded");
        assert_eq!(find(&headers, "ce-source"), Some("/orders"));
        assert_eq!(find(&headers, "ce-type"), Some("order.created"));
        assert_eq!(find(&headers, "ce-seq"), Some("7"), "an extension");
        assert_eq!(find(&headers, "ce-data"), None);
        assert_eq!(find(&headers, "ce-datacontenttype"), None);
        assert_eq!(body, br#"{"amount":42}"#.to_vec());

        let text = br#"{"specversion":"1.0","id":"2","source":"s","type":"t","datacontenttype":"text/plain","data":"hello"}"#;
        let (headers, body) = structured_cloudevent(&input, text).unwrap();
        assert_eq!(find(&headers, "content-type"), Some("text/plain"));
        assert_eq!(body, b"hello".to_vec(), "text data as it is");

        let binary = br#"{"specversion":"1.0","id":"3","source":"s","type":"t","datacontenttype":"application/octet-stream","data_base64":"AAEC"}"#;
        let (_, body) = structured_cloudevent(&input, binary).unwrap();
        assert_eq!(body, vec![0, 1, 2], "data_base64 decoded");

        let no_type = br#"{"specversion":"1.0","id":"4","source":"s","type":"t","data":"x"}"#;
        let (headers, body) = structured_cloudevent(&input, no_type).unwrap();
        assert_eq!(find(&headers, "content-type"), Some("application/json"));
        assert_eq!(body, br#""x""#.to_vec(), "JSON data stays JSON");

        assert!(
            structured_cloudevent(&h(&[("content-type", "application/json")]), event).is_none()
        );
        assert!(structured_cloudevent(&input, b"not json").is_none());
        assert!(structured_cloudevent(&input, br#"{"id":"no specversion"}"#).is_none());
        assert!(structured_cloudevent(&input, br#"{"specversion":"1.0","ext":{"a":1}}"#).is_none());
    }

    #[test]
    fn headers_that_would_change_the_request_or_that_kdedup_sets_are_left_out() {
        let (out, left_out) = mapped_headers(&h(&[
            ("Host", "evil"),
            ("content-length", "9"),
            ("Transfer-Encoding", "chunked"),
            ("idempotency-key", "forged"),
            ("kdedup-event-id", "forged"),
            ("bad name", "x"),
            ("ok", "line\nbreak"),
            ("tenant", "acme"),
        ]));
        assert_eq!(left_out, 7);
        assert_eq!(find(&out, "tenant"), Some("acme"));
        assert_eq!(
            find(&out, "content-type"),
            Some(DEFAULT_CONTENT_TYPE),
            "no content-type in the input"
        );
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn an_event_id_that_is_not_visible_ascii_is_percent_encoded() {
        assert_eq!(header_text("order-1 a"), "order-1 a");
        assert_eq!(header_text("50%\n"), "50%25%0A");
        assert_eq!(header_text("é"), "%C3%A9");
    }

    #[test]
    fn statuses_decide_deliver_retry_or_reject() {
        assert_eq!(verdict(200), Verdict::Delivered);
        assert_eq!(verdict(204), Verdict::Delivered);
        for s in [429, 503] {
            assert_eq!(
                verdict(s),
                Verdict::Retry {
                    honour_retry_after: true
                }
            );
        }
        assert_eq!(verdict(409), Verdict::Conflict);
        for s in [408, 500, 502, 504] {
            assert_eq!(
                verdict(s),
                Verdict::Retry {
                    honour_retry_after: false
                }
            );
        }
        for s in [301, 400, 401, 404, 410, 422] {
            assert_eq!(verdict(s), Verdict::Rejected, "{s}");
        }
        assert_eq!(status_class(503), "5xx");
        assert_eq!(status_class(404), "4xx");
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(0)),
            "a date in the past"
        );
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:50:37 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(retry_after("soon", now), None);
    }

    #[test]
    fn an_excerpt_is_bounded_text() {
        assert_eq!(excerpt(b"bad\r\nrequest", 100), "bad  request");
        assert_eq!(excerpt(b"abcdef", 3), "abc");
        assert_eq!(excerpt(&[0xff, b'a'], 10), "\u{fffd}a");
    }
}
