//! librdkafka's errors and log lines, held to one line per kind per [`WINDOW`]. A cluster
//! that cannot be reached makes librdkafka report the same failure for every broker
//! connection attempt and every client, hundreds of lines in seconds, burying the one line
//! that says why. Each kind (an error code, a log facility at a level) is written the first
//! time, then at most once per window, with how many like it were held back meanwhile.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use tracing::{debug, error, info, warn};

/// At most one line per kind in this long.
pub const WINDOW: Duration = Duration::from_secs(30);

/// The client context of kdedup's producer, and the log half of the consumer's.
#[derive(Default)]
pub struct ClientLog {
    /// Per kind: when its last line was written, and how many were held back since.
    kinds: Mutex<HashMap<String, (Instant, u64)>>,
}

impl ClientLog {
    /// `Some(held back since the last line)` when a line of `kind` is due now.
    fn due(&self, kind: String, now: Instant) -> Option<u64> {
        let mut kinds = self.kinds.lock().expect("client log lock");
        match kinds.get_mut(&kind) {
            Some((last, held)) if now.duration_since(*last) < WINDOW => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                let n = std::mem::take(held);
                *last = now;
                Some(n)
            }
            None => {
                kinds.insert(kind, (now, 0));
                Some(0)
            }
        }
    }

    /// An error librdkafka reports for the client as a whole (all brokers down, a fatal
    /// error, an authentication failure).
    pub fn client_error(&self, error: &KafkaError, reason: &str) {
        let kind = format!("error:{:?}", error.rdkafka_error_code());
        if let Some(held_back) = self.due(kind, Instant::now()) {
            warn!(error = %error, reason, held_back,
                  "kafka client error (each kind is logged at most once per 30 s; held_back counts the ones not logged since the last)");
        }
    }

    /// A librdkafka log line (`debug` contexts and levels pass through unlimited).
    pub fn client_log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let severity = match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => 3,
            RDKafkaLogLevel::Warning => 4,
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => 6,
            RDKafkaLogLevel::Debug => {
                debug!(target: "librdkafka", fac, "librdkafka: {message}");
                return;
            }
        };
        let Some(held_back) = self.due(format!("log:{fac}:{severity}"), Instant::now()) else {
            return;
        };
        match severity {
            3 => error!(target: "librdkafka", fac, held_back, "librdkafka: {message}"),
            4 => warn!(target: "librdkafka", fac, held_back, "librdkafka: {message}"),
            _ => info!(target: "librdkafka", fac, held_back, "librdkafka: {message}"),
        }
    }
}

impl ClientContext for ClientLog {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.client_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.client_error(&error, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kind_per_window_with_the_count_held_back() {
        let log = ClientLog::default();
        let t0 = Instant::now();
        assert_eq!(log.due("a".into(), t0), Some(0), "the first is written");
        for i in 1..400 {
            assert_eq!(
                log.due("a".into(), t0 + Duration::from_millis(i * 25)),
                None
            );
        }
        assert_eq!(
            log.due("b".into(), t0),
            Some(0),
            "another kind is not held back"
        );
        assert_eq!(
            log.due("a".into(), t0 + WINDOW),
            Some(399),
            "then one line with the count"
        );
        assert_eq!(
            log.due("a".into(), t0 + WINDOW + Duration::from_secs(1)),
            None
        );
    }
}
