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
//! - CloudEvents in Kafka binary mode (`ce_<attribute>` headers) become HTTP binary mode
//!   (`ce-<attribute>`); structured mode (a JSON body) passes unchanged, which HTTP
//!   structured mode is;
//! - every other input header whose name is an HTTP field name and whose value is a
//!   field value, under its own name, except the ones that would change the request
//!   itself (framing, connection, host) or that kdedup sets (`idempotency-key`,
//!   `kdedup-*`). Those are left out and counted.

use std::time::{Duration, SystemTime};

use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};

use crate::model::headers::Headers;

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
pub fn mapped_headers(input: &Headers) -> (Vec<(HeaderName, HeaderValue)>, usize) {
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
    /// 408, 409 (the key is being processed elsewhere), 429, 5xx: try again later;
    /// `honour_retry_after` for 429 and 503.
    Retry { honour_retry_after: bool },
    /// Any other status: the application refused this event; `FAILED` at once.
    Rejected,
}

pub fn verdict(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        429 | 503 => Verdict::Retry {
            honour_retry_after: true,
        },
        408 | 409 | 500..=599 => Verdict::Retry {
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
        for s in [408, 409, 500, 502, 504] {
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
