//! Configuration drift: sidecars whose settings disagree in a way that forwards events
//! twice or to the wrong place, found through the registry every schema keeps
//! ([`crate::store::sidecars`]).
//!
//! The gate only works when one consumer group and one output are gated in one schema.
//! Two Deployments that drifted apart break that without a single error: the same group
//! in two schemas (partitions move between them, and each schema forwards what the other
//! already did), one output fed from two schemas (an event gated in both reaches it twice),
//! or two outputs sharing one schema (one outbox and one relay: events go to the wrong
//! topic; or one scope: an id forwarded to one output is a duplicate for the other).
//!
//! At start, a live conflicting sidecar (a heartbeat within [`LIVE_FOR_S`]) refuses the
//! start (exit 78, naming it and the fix); one that stopped (seen within the last week)
//! is a warning. While running, the heartbeat task checks again every [`HEARTBEAT`]
//! (two sidecars that started at the same moment both passed the start check): a conflict
//! is an ERROR and `kdedup_config_conflicts`.

use std::collections::BTreeSet;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::metrics::Metrics;
use crate::settings::RunSettings;
use crate::store::sidecars::{self, Peer, Served};

/// How often a running sidecar refreshes its row and checks again.
pub const HEARTBEAT: Duration = Duration::from_secs(30);
/// A sidecar whose heartbeat is younger than this is running.
pub const LIVE_FOR_S: f64 = 90.0;
/// Rows older than this are deleted; younger stopped ones are still warned about.
const FORGET_AFTER_S: f64 = 7.0 * 86_400.0;

const FIX: &str = "Fix: keep one consumer group and one output per schema: give each Deployment its own \
    KDEDUP_DB_SCHEMA (or align the drifted settings); to move a running Deployment to another output or \
    schema, stop its old pods first (a Recreate rollout). A sidecar that stopped without a clean exit is \
    forgotten 90 s after its last heartbeat";

/// Live sidecars conflict with this one's configuration; starting would forward twice.
#[derive(Debug)]
pub struct DriftError {
    pub schema: String,
    pub conflicts: Vec<String>,
}

impl std::fmt::Display for DriftError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "configuration conflicts with running sidecars (Postgres schema {}):",
            self.schema
        )?;
        for conflict in &self.conflicts {
            write!(f, "\n  - {conflict}")?;
        }
        write!(f, "\n{FIX}")
    }
}

impl std::error::Error for DriftError {}

/// This process in the registry.
pub struct Registration {
    pool: PgPool,
    instance: String,
    host: String,
    schema: String,
    served: Served,
}

impl Registration {
    pub fn new(cfg: &RunSettings, pool: PgPool) -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".to_string());
        let instance = format!(
            "{host}:{}:{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        Registration {
            pool,
            instance,
            host,
            schema: cfg.db.schema.clone(),
            served: Served {
                group_id: cfg.kafka.group_id.clone(),
                scope: cfg.gate.scope.describe(),
                sink: cfg.sink.name().to_string(),
                output: cfg.sink.target(),
                input_topics: cfg.kafka.input_topics.clone(),
            },
        }
    }

    /// The start check: refuses when a running sidecar conflicts, warns about stopped ones,
    /// then records this one. A schema migrated by an older binary (no registry) skips it.
    pub async fn check_and_register(&self) -> anyhow::Result<()> {
        if !sidecars::exists(&self.pool).await? {
            warn!(schema = self.schema, "this schema has no sidecar registry yet (run kdedup migrate): the configuration drift checks are skipped");
            return Ok(());
        }
        let peers = sidecars::peers(&self.pool, &self.instance, FORGET_AFTER_S).await?;
        let mut live = Vec::new();
        for peer in &peers {
            let Some(why) = conflict(&self.schema, &self.served, peer) else {
                continue;
            };
            if peer.seen_ago_s < LIVE_FOR_S {
                live.push(why);
            } else {
                warn!(conflict = %why, "a stopped sidecar served a configuration that conflicts with this one's; \
                      if it comes back, events will be forwarded twice or to the wrong place");
            }
        }
        if !live.is_empty() {
            return Err(DriftError {
                schema: self.schema.clone(),
                conflicts: live,
            }
            .into());
        }
        sidecars::forget(&self.pool, "", FORGET_AFTER_S).await?;
        sidecars::heartbeat(&self.pool, &self.instance, &self.host, &self.served).await?;
        Ok(())
    }

    /// Refreshes this process's row and checks again every [`HEARTBEAT`] until `stop`,
    /// then deletes the row.
    pub async fn run(self, metrics: Metrics, stop: CancellationToken) {
        let mut reported = BTreeSet::new();
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.tick().await; // the start check has just run
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.round(&metrics, &mut reported).await {
                warn!(error = %e, "sidecar registry heartbeat failed; retrying in 30 s");
            }
        }
        if let Err(e) = sidecars::forget(&self.pool, &self.instance, FORGET_AFTER_S).await {
            warn!(error = %e, "could not remove this sidecar from the registry; it is forgotten 90 s after its last heartbeat");
        }
    }

    async fn round(
        &self,
        metrics: &Metrics,
        reported: &mut BTreeSet<String>,
    ) -> Result<(), sqlx::Error> {
        sidecars::heartbeat(&self.pool, &self.instance, &self.host, &self.served).await?;
        let peers = sidecars::peers(&self.pool, &self.instance, LIVE_FOR_S).await?;
        let mut now = BTreeSet::new();
        for peer in &peers {
            if let Some(why) = conflict(&self.schema, &self.served, peer) {
                if !reported.contains(&peer.instance) {
                    error!(conflict = %why, "configuration conflicts with a running sidecar: events are forwarded twice or to the wrong place. {FIX}");
                }
                now.insert(peer.instance.clone());
            }
        }
        for gone in reported.difference(&now) {
            info!(instance = %gone, "a conflicting sidecar is no longer running");
        }
        metrics.config_conflicts.set(now.len() as i64);
        *reported = now;
        Ok(())
    }
}

/// Why `peer` conflicts with this sidecar (serving `me` from `schema`), if it does.
fn conflict(schema: &str, me: &Served, peer: &Peer) -> Option<String> {
    let who = format!(
        "sidecar on {} (group {}, schema {}, {} output {}, last seen {:.0} s ago)",
        peer.host, peer.group_id, peer.schema, peer.sink, peer.output, peer.seen_ago_s
    );
    let same_output = peer.sink == me.sink && peer.output == me.output;
    if peer.schema != schema {
        if peer.group_id == me.group_id {
            return Some(format!(
                "consumer group {} is also gated in schema {}: {who}. Partitions move between the two, and each schema forwards what the other already did",
                me.group_id, peer.schema
            ));
        }
        // `--sink-sql` statements cannot be compared; a topic or a table can.
        if same_output && me.output != "sql" {
            return Some(format!(
                "{} output {} is also fed from schema {}: {who}. An event gated in both schemas reaches it twice",
                me.sink, me.output, peer.schema
            ));
        }
        return None;
    }
    if same_output {
        return None;
    }
    if peer.sink == "kafka" && me.sink == "kafka" {
        return Some(format!(
            "schema {schema} also serves output topic {}: {who}. The schema has one outbox and one relay, so events meant for one topic are published to the other",
            peer.output
        ));
    }
    (peer.scope == me.scope).then(|| {
        format!(
            "schema {schema} also serves {} output {} with the same scope {}: {who}. An id forwarded to one output is a duplicate for the other and never reaches it",
            peer.sink, peer.output, me.scope
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(group: &str, sink: &str, output: &str) -> Served {
        Served {
            group_id: group.into(),
            scope: group.into(),
            sink: sink.into(),
            output: output.into(),
            input_topics: vec!["in".into()],
        }
    }

    fn peer(schema: &str, s: &Served) -> Peer {
        Peer {
            schema: schema.into(),
            instance: "pod-b:1:0".into(),
            host: "pod-b".into(),
            group_id: s.group_id.clone(),
            scope: s.scope.clone(),
            sink: s.sink.clone(),
            output: s.output.clone(),
            seen_ago_s: 3.0,
        }
    }

    #[test]
    fn replicas_of_one_deployment_do_not_conflict() {
        let me = served("orders", "kafka", "orders.dedup");
        assert_eq!(conflict("a", &me, &peer("a", &me)), None);
        // Two groups racing on one scope in one schema, to one output: the gate holds.
        let other_group = Served {
            scope: "orders".into(),
            ..served("orders-2", "kafka", "orders.dedup")
        };
        assert_eq!(conflict("a", &me, &peer("a", &other_group)), None);
        // Unrelated Deployments in other schemas.
        assert_eq!(
            conflict(
                "a",
                &me,
                &peer("b", &served("billing", "kafka", "billing.dedup"))
            ),
            None
        );
    }

    #[test]
    fn the_same_group_or_output_in_another_schema_conflicts() {
        let me = served("orders", "kafka", "orders.dedup");
        let why = conflict("a", &me, &peer("b", &me)).unwrap();
        assert!(
            why.contains("consumer group orders is also gated in schema b"),
            "{why}"
        );
        assert!(why.contains("pod-b"), "{why}");
        let why = conflict(
            "a",
            &me,
            &peer("b", &served("orders-v2", "kafka", "orders.dedup")),
        )
        .unwrap();
        assert!(
            why.contains("output orders.dedup is also fed from schema b"),
            "{why}"
        );
        // Two --sink-sql statements cannot be compared.
        let sql = served("x", "postgres", "sql");
        assert_eq!(
            conflict("a", &sql, &peer("b", &served("y", "postgres", "sql"))),
            None
        );
    }

    #[test]
    fn another_output_in_this_schema_conflicts() {
        let me = served("orders", "kafka", "orders.dedup");
        let why = conflict(
            "a",
            &me,
            &peer("a", &served("audit", "kafka", "audit.dedup")),
        )
        .unwrap();
        assert!(why.contains("one outbox and one relay"), "{why}");
        // A Postgres sink of another scope shares nothing with this schema's outbox.
        let table = served("audit", "postgres", "app.audit");
        assert_eq!(conflict("a", &me, &peer("a", &table)), None);
        let same_scope = Served {
            scope: "orders".into(),
            ..table
        };
        let why = conflict("a", &me, &peer("a", &same_scope)).unwrap();
        assert!(why.contains("never reaches it"), "{why}");
    }
}
