//! Start-up checks against the cluster: the TTL against the input topics' retention, and
//! a scope new to a schema that holds others.

use sqlx::PgPool;
use tracing::warn;

use crate::kafka::topics;
use crate::metrics::Metrics;
use crate::model::identity::ScopeSpec;
use crate::settings::RunSettings;
use crate::store::stats;

/// Warns when this sidecar's scope was never gated in a schema that holds other scopes.
/// The scope defaults to the group id, so a renamed group (a blue/green deploy, a new
/// Deployment name) on the same schema starts from an empty gate and forwards every id
/// it sees again, however recently it was forwarded. Pinning `KDEDUP_SCOPE` prevents it.
pub async fn check_scope(cfg: &RunSettings, pool: &PgPool) {
    let ScopeSpec::Literal(scope) = &cfg.gate.scope else {
        return;
    };
    match stats::scopes_seen(pool, scope, 5).await {
        Ok((false, others)) if !others.is_empty() => {
            warn!(scope, schema = cfg.db.schema, other_scopes = others.join(","),
                  "this scope has never been gated in this schema, which holds others: every id is new to it, and events \
                   the other scopes forwarded are forwarded again. If this is a renamed group id (the scope defaults to \
                   it), set KDEDUP_SCOPE to the old scope; pin KDEDUP_SCOPE so that a rename cannot do this");
        }
        Ok(_) => {}
        Err(e) => {
            warn!(error = %e, "cannot read the scopes of this schema; the new-scope check is skipped")
        }
    }
}

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
