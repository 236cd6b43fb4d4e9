//! One event's delivery, attempt after attempt: the request, what its answer means, the
//! backoff between attempts, and the lease a request must start under.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use super::request::{self, Verdict};
use super::{Inner, LeaseClock, Outcome};
use crate::model::header;
use crate::retry::Backoff;
use crate::store::gate::GateRow;

/// Most bytes of an error answer kept in `last_error` and the dead letter's headers.
const ERROR_EXCERPT_BYTES: usize = 512;

/// Most bytes of an answer's body read (the rest is dropped, and the connection with it):
/// enough that ordinary answers are read whole and their connection reused.
const BODY_READ_LIMIT: usize = 64 * 1024;

impl Inner {
    /// Waits until a request may start under the lease: true when it may, false when the
    /// row is no longer held (taken over) or `stop` fired.
    async fn lease_allows_request(
        &self,
        lease: &LeaseClock,
        i: usize,
        stop: &CancellationToken,
    ) -> Result<(), Outcome> {
        loop {
            if !lease.holds(i) {
                return Err(Outcome::Lost);
            }
            if lease.safe_until_for(i) >= Instant::now() + self.settings.timeout {
                return Ok(());
            }
            let renewed = lease.renewed.notified();
            tokio::select! {
                _ = stop.cancelled() => return Err(Outcome::Stopped { attempts: 0, last_error: None }),
                _ = renewed => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    /// One event, attempt after attempt, until it has an outcome.
    pub(super) async fn deliver_one(
        &self,
        row: &GateRow,
        key: Uuid,
        i: usize,
        lease: &LeaseClock,
        stop: &CancellationToken,
    ) -> Outcome {
        let s = &self.settings;
        let value = row.value.as_deref().unwrap_or_default();
        let (mut mapped, left_out) = request::mapped_headers(&row.headers);
        if left_out > 0 {
            self.metrics.headers_left_out.inc_by(left_out as u64);
        }
        let body = match request::structured_cloudevent(&row.headers, value) {
            Some((ce, data)) => {
                mapped.retain(|(name, _)| name != hyper::header::CONTENT_TYPE);
                mapped.extend(ce);
                Bytes::from(data)
            }
            None => Bytes::copy_from_slice(value),
        };
        let idempotency_key = hyper::header::HeaderValue::from_str(&key.to_string())
            .expect("a uuid is a header value");
        let event_id = request::header_text(&row.event_id);
        let source = request::header_text(&row.position().to_string());
        let mut backoff = Backoff::new(s.backoff, s.max_backoff);
        let mut attempts = 0u32;
        // 409s: not counted toward --http-max-attempts; since when they keep coming.
        let mut conflicts = 0u32;
        let mut conflict_since: Option<Instant> = None;
        let mut last_error: Option<String> = None;
        loop {
            if stop.is_cancelled() {
                return Outcome::Stopped {
                    attempts,
                    last_error,
                };
            }
            let permit = tokio::select! {
                p = self.permits.acquire() => p.expect("the semaphore is never closed"),
                _ = stop.cancelled() => return Outcome::Stopped { attempts, last_error },
            };
            if let Err(outcome) = self.lease_allows_request(lease, i, stop).await {
                return match outcome {
                    Outcome::Stopped { .. } => Outcome::Stopped {
                        attempts,
                        last_error,
                    },
                    other => other,
                };
            }
            let mut req = hyper::Request::post(self.uri.clone())
                .header(request::IDEMPOTENCY_KEY, idempotency_key.clone())
                .header(header::EVENT_ID, event_id.clone())
                .header(header::SOURCE, source.clone());
            for (name, value) in &mapped {
                req = req.header(name, value);
            }
            let req = req
                .body(Full::new(body.clone()))
                .expect("every part of the request is checked");
            self.metrics.in_flight.inc();
            let started = Instant::now();
            // Not cancelled by a stop: a request in flight finishes (within the timeout)
            // and its outcome is written.
            let answer = tokio::time::timeout(s.timeout, self.send(req)).await;
            self.metrics.in_flight.dec();
            drop(permit);
            attempts += 1;
            self.metrics
                .request_duration
                .observe(started.elapsed().as_secs_f64());
            // The status of this attempt's answer, when it had one and is retried.
            let last_status: Option<u16>;
            let (retry_reason, delay) = match answer {
                Ok(Ok((status, headers, body))) => {
                    self.metrics
                        .requests
                        .with_label_values(&[request::status_class(status)])
                        .inc();
                    match request::verdict(status) {
                        Verdict::Delivered => {
                            let keep = body.len().min(s.max_response_bytes);
                            row_event!(debug, row, status, attempts, "delivered");
                            return Outcome::Processed {
                                attempts,
                                status,
                                headers: request::headers_json(&headers),
                                body: body[..keep].to_vec(),
                            };
                        }
                        Verdict::Rejected => {
                            row_event!(warn, row, status, attempts,
                                  "the application refused the event; FAILED, to the dead-letter topic");
                            return Outcome::Failed {
                                attempts,
                                rejected: true,
                                status: Some(status),
                                error: request::excerpt(&body, ERROR_EXCERPT_BYTES),
                            };
                        }
                        Verdict::Conflict => {
                            conflicts += 1;
                            let since = *conflict_since.get_or_insert(started);
                            let excerpt = request::excerpt(&body, ERROR_EXCERPT_BYTES);
                            if since.elapsed() >= s.conflict_timeout {
                                row_event!(warn, row, status, attempts,
                                      "the application still answers 409 after --http-conflict-timeout; FAILED, to the dead-letter topic");
                                return Outcome::Failed {
                                    attempts,
                                    rejected: false,
                                    status: Some(status),
                                    error: format!(
                                        "still in progress after {:?} of 409s: {excerpt}",
                                        s.conflict_timeout
                                    ),
                                };
                            }
                            last_status = Some(status);
                            last_error = Some(format!("HTTP {status}: {excerpt}"));
                            ("conflict", backoff.next_delay())
                        }
                        Verdict::Retry { honour_retry_after } => {
                            last_status = Some(status);
                            last_error = Some(format!(
                                "HTTP {status}: {}",
                                request::excerpt(&body, ERROR_EXCERPT_BYTES)
                            ));
                            let after = honour_retry_after
                                .then(|| headers.get(hyper::header::RETRY_AFTER))
                                .flatten()
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| request::retry_after(v, SystemTime::now()));
                            match after {
                                Some(after) => ("retry_after", after.min(s.max_backoff)),
                                None => ("status", backoff.next_delay()),
                            }
                        }
                    }
                }
                Ok(Err(e)) => {
                    self.metrics.requests.with_label_values(&["error"]).inc();
                    last_status = None;
                    last_error = Some(request::excerpt(e.as_bytes(), ERROR_EXCERPT_BYTES));
                    ("error", backoff.next_delay())
                }
                Err(_elapsed) => {
                    self.metrics.requests.with_label_values(&["timeout"]).inc();
                    last_status = None;
                    last_error = Some(format!("no answer within {:?}", s.timeout));
                    ("timeout", backoff.next_delay())
                }
            };
            // The conflict timeout runs over 409s in a row only.
            if retry_reason != "conflict" {
                conflict_since = None;
            }
            if attempts - conflicts >= s.max_attempts {
                let status = last_status;
                // The status is a field of its own; the error keeps the answer's excerpt.
                let error = match (&last_error, status) {
                    (Some(e), Some(s)) => e
                        .strip_prefix(&format!("HTTP {s}: "))
                        .unwrap_or(e)
                        .to_string(),
                    (Some(e), None) => e.clone(),
                    (None, _) => String::new(),
                };
                row_event!(
                    warn,
                    row,
                    attempts,
                    status,
                    "no attempt succeeded; FAILED, to the dead-letter topic"
                );
                return Outcome::Failed {
                    attempts,
                    rejected: false,
                    status,
                    error,
                };
            }
            self.metrics
                .retries
                .with_label_values(&[retry_reason])
                .inc();
            row_event!(
                debug,
                row,
                attempts,
                reason = retry_reason,
                retry_in_ms = delay.as_millis() as u64,
                "delivery attempt failed; retrying with the same key"
            );
            tokio::select! {
                _ = stop.cancelled() => return Outcome::Stopped { attempts, last_error },
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Sends `req`; the answer's status, headers and body (at most [`BODY_READ_LIMIT`]
    /// bytes read), or the error as text.
    async fn send(
        &self,
        req: hyper::Request<Full<Bytes>>,
    ) -> Result<(u16, hyper::HeaderMap, Vec<u8>), String> {
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| error_chain(&e))?;
        let (parts, mut body) = resp.into_parts();
        let mut buf = Vec::new();
        while buf.len() < BODY_READ_LIMIT {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        buf.extend_from_slice(data);
                    }
                }
                Some(Err(e)) => return Err(error_chain(&e)),
            }
        }
        Ok((parts.status.as_u16(), parts.headers, buf))
    }
}

/// An error and its causes, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
