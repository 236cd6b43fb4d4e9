//! The HTTP sink's metrics, registered on the process registry when the sink starts.
//! Labels are bounded (status class, retry reason, failure reason): never an event id.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct HttpMetrics {
    /// Requests by `class`: `2xx` ... `5xx`, `timeout`, `error` (no answer).
    pub requests: IntCounterVec,
    pub request_duration: Histogram,
    /// Attempts that will be repeated, by `reason`: `retry_after` (429, 503), `status`
    /// (408, other 5xx), `conflict` (409), `timeout`, `error`.
    pub retries: IntCounterVec,
    pub in_flight: IntGauge,
    /// Rows the gate took over from a `PROCESSING` row whose lease expired.
    pub lease_takeovers: IntCounter,
    /// Rows written `FAILED`, by `reason`: `http_failed`, `http_rejected`.
    pub failed: IntCounterVec,
    /// Deliveries whose row was taken over by another replica before this one wrote
    /// its outcome (its lease expired meanwhile).
    pub leases_lost: IntCounter,
    /// Input headers not passed to the application (see `request`).
    pub headers_left_out: IntCounter,
    /// `PROCESSING` rows past their lease, over the schema (every replica's).
    pub processing_expired: IntGauge,
}

impl HttpMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        let registry = &metrics.registry;
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            registry
                .register(c)
                .expect("HTTP sink metrics are registered once");
        };
        let m = HttpMetrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "kdedup_http_requests_total",
                    "HTTP sink: requests sent to the application, by status class (2xx..5xx), or timeout / error when no answer came.",
                ),
                &["class"],
            )
            .expect("valid metric"),
            request_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "kdedup_http_request_duration_seconds",
                    "HTTP sink: one request, until the answer's body was read (or the timeout).",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0,
                ]),
            )
            .expect("valid metric"),
            retries: IntCounterVec::new(
                Opts::new(
                    "kdedup_http_retries_total",
                    "HTTP sink: attempts that failed and will be repeated with the same Idempotency-Key, by reason (retry_after: 429/503, status: 408/5xx, conflict: 409, timeout, error).",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            in_flight: IntGauge::with_opts(Opts::new(
                "kdedup_http_in_flight",
                "HTTP sink: requests sent and not yet answered.",
            ))
            .expect("valid metric"),
            lease_takeovers: IntCounter::with_opts(Opts::new(
                "kdedup_http_lease_takeovers_total",
                "HTTP sink: events taken over from a PROCESSING row whose lease had expired (the replica delivering it died or stalled).",
            ))
            .expect("valid metric"),
            failed: IntCounterVec::new(
                Opts::new(
                    "kdedup_http_failed_total",
                    "HTTP sink: events written FAILED and dead-lettered, by reason (http_rejected: a 4xx; http_failed: out of attempts).",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            leases_lost: IntCounter::with_opts(Opts::new(
                "kdedup_http_leases_lost_total",
                "HTTP sink: deliveries whose row another replica took over (this one's lease expired) before the outcome was written.",
            ))
            .expect("valid metric"),
            headers_left_out: IntCounter::with_opts(Opts::new(
                "kdedup_http_headers_left_out_total",
                "HTTP sink: input headers not passed to the application (framing, hop-by-hop, kdedup's own, or not valid in HTTP).",
            ))
            .expect("valid metric"),
            processing_expired: IntGauge::with_opts(Opts::new(
                "kdedup_http_processing_expired_rows",
                "HTTP sink: rows in PROCESSING past their lease (a replica died mid-delivery and no copy has come back to take them over).",
            ))
            .expect("valid metric"),
        };
        reg(Box::new(m.requests.clone()));
        reg(Box::new(m.request_duration.clone()));
        reg(Box::new(m.retries.clone()));
        reg(Box::new(m.in_flight.clone()));
        reg(Box::new(m.lease_takeovers.clone()));
        reg(Box::new(m.failed.clone()));
        reg(Box::new(m.leases_lost.clone()));
        reg(Box::new(m.headers_left_out.clone()));
        reg(Box::new(m.processing_expired.clone()));
        // Series that exist from the start, so rate() alerts see a flat zero.
        for class in ["2xx", "4xx", "5xx", "timeout", "error"] {
            m.requests.with_label_values(&[class]);
        }
        for reason in ["http_failed", "http_rejected"] {
            m.failed.with_label_values(&[reason]);
        }
        m
    }
}
