//! Start-up checks against the cluster: the TTL against the input topics' retention.

use tracing::warn;

use crate::kafka::topics;
use crate::metrics::Metrics;
use crate::settings::RunSettings;

/// Exports each input topic's retention and warns when the TTL is shorter: an event
/// re-read (or replayed) after its gate row expired would be forwarded again.
pub async fn check_retention(cfg: &RunSettings, metrics: &Metrics) {
    match topics::retention_seconds(
        &cfg.kafka.brokers,
        &cfg.kafka.properties,
        &cfg.kafka.input_topics,
    )
    .await
    {
        Ok(retentions) => {
            for (topic, secs) in retentions {
                metrics
                    .input_retention
                    .with_label_values(&[topic.as_str()])
                    .set(secs);
                let ttl = i64::try_from(cfg.gate.ttl.as_secs()).unwrap_or(i64::MAX);
                if secs < 0 || ttl < secs {
                    warn!(topic, retention_s = secs, ttl_s = ttl,
                          "TTL is shorter than the input topic's retention: an event re-read after its id expired would be forwarded again; raise KDEDUP_TTL above the retention plus the longest expected lag");
                }
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot read input topic retention; the TTL-vs-retention check is skipped")
        }
    }
}
