//! A relay session's upkeep, a few times a second: checkpoints, idle streams compared
//! with their counters, streams let go or adopted, the previous version's outbox moved.
//! The outbox's slots are reclaimed beside the session, not in it ([`reclaim_slots`]).

use std::time::Duration;

use tracing::{debug, info};

use super::session::{Session, ADOPT_AFTER, RELEASE_IDLE};
use super::stream::{Source, StreamState};
use super::Relay;
use crate::store::relay::{self as sql, Checkpoint};
use crate::store::{self as db};

impl Session<'_> {
    /// Writes the checkpoints that moved, and the anchors of partitions about to get
    /// their first message of a stream.
    pub(super) async fn checkpoint(&mut self) -> Result<(), sqlx::Error> {
        let mut new_anchors = Vec::new();
        for s in self.streams.values() {
            if !s.held {
                continue;
            }
            for (p, o) in &s.checkpoint.anchors {
                if *o == -1 {
                    new_anchors.push((s.name.clone(), *p));
                }
            }
        }
        // A new anchor: an offset of the partition before anything this stream sends
        // to it (see `sql::partition_floor`).
        for (name, partition) in new_anchors {
            let floor =
                sql::partition_floor(&self.relay.pool, &self.relay.output_topic, partition).await?;
            let s = self.streams.get_mut(&name).expect("stream");
            s.checkpoint.set_anchor(partition, floor);
            s.dirty = true;
        }
        let dirty: Vec<(String, Checkpoint)> = self
            .streams
            .values()
            .filter(|s| s.held && s.dirty)
            .map(|s| {
                let mut c = s.checkpoint.clone();
                c.anchors.retain(|(_, o)| *o >= 0);
                (s.name.clone(), c)
            })
            .collect();
        if dirty.is_empty() {
            return Ok(());
        }
        crate::crash::reached(crate::crash::Point::RelayAfterAck);
        sql::save_checkpoints(&mut self.conn, &self.owner, &dirty).await?;
        for (name, c) in &dirty {
            if let Some(s) = self.streams.get_mut(name) {
                if s.checkpoint.published_seq == c.published_seq {
                    s.dirty = s.checkpoint.anchors.iter().any(|(_, o)| *o < 0);
                }
            }
        }
        Ok(())
    }

    /// Idle held streams whose counter is past what they have: rows committed without a
    /// hand-off to this process (a gate retry whose first COMMIT did commit, the previous
    /// owner's last batch). They are read back.
    pub(super) async fn compare_counters(&mut self) -> Result<(), sqlx::Error> {
        // The streams of the partitions assigned here are taken at once, not when their
        // first rows come: what the previous owner left unpublished goes out now.
        if let Some(a) = &self.relay.assignment {
            for name in a.streams() {
                let output_topic = &self.relay.output_topic;
                self.streams
                    .entry(name.clone())
                    .or_insert_with(|| StreamState::new(name, Source::Local, output_topic));
            }
        }
        let idle: Vec<String> = self
            .streams
            .values()
            .filter(|s| s.held && s.ready && s.idle())
            .map(|s| s.name.clone())
            .collect();
        if idle.is_empty() {
            return Ok(());
        }
        for (name, last) in sql::last_seqs(&self.relay.pool, &idle).await? {
            if let Some(s) = self.streams.get_mut(&name) {
                if last > s.queued_through && s.idle() {
                    s.behind = true;
                }
            }
        }
        Ok(())
    }

    /// Lets go of streams this process no longer writes: partitions rebalanced away,
    /// adopted streams caught up, a replay's streams once idle.
    pub(super) async fn release(&mut self) -> Result<(), sqlx::Error> {
        let mut done = Vec::new();
        for s in self.streams.values() {
            if !s.held || !s.idle() || s.dirty {
                continue;
            }
            let keep = match s.source {
                Source::Local => match &self.relay.assignment {
                    Some(a) => a.contains(&s.name),
                    None => s.last_active.elapsed() < RELEASE_IDLE,
                },
                Source::Adopted => false,
            };
            if !keep {
                done.push(s.name.clone());
            }
        }
        let schema = self.relay.cfg.db.schema.clone();
        for name in done {
            sql::unlock_stream(&mut self.conn, &schema, &name).await?;
            self.streams.remove(&name);
            debug!(stream = name, "stream let go");
        }
        Ok(())
    }

    /// Adopts streams with rows past their checkpoint that nobody moves, and moves rows
    /// the previous version left in the old outbox.
    pub(super) async fn adopt(&mut self) -> Result<(), sqlx::Error> {
        for name in sql::orphans(&self.relay.pool, ADOPT_AFTER).await? {
            if !self.streams.contains_key(&name) {
                info!(
                    stream = name,
                    "adopting a stream with unpublished rows that no relay holds"
                );
                self.streams.insert(
                    name.clone(),
                    StreamState::new(name, Source::Adopted, &self.relay.output_topic),
                );
            }
        }
        self.adopt_legacy().await
    }

    async fn adopt_legacy(&mut self) -> Result<(), sqlx::Error> {
        let any: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM outbox)")
            .fetch_one(&self.relay.pool)
            .await?;
        if !any {
            return Ok(());
        }
        if !self.legacy_lock {
            // The previous version's relay lock: once held here (for the session), its
            // relays stand by and the rows they would publish move to streams.
            self.legacy_lock = sqlx::query_scalar(
                "SELECT pg_try_advisory_lock($1, hashtext('relay' || ':' || $2))",
            )
            .bind(db::ADVISORY_LOCK_CLASS)
            .bind(&self.relay.cfg.db.schema)
            .fetch_one(&mut self.conn)
            .await?;
            if !self.legacy_lock {
                return Ok(());
            }
        }
        let moved = sql::adopt_legacy(&mut self.conn, 10_000).await?;
        if moved > 0 {
            info!(
                rows = moved,
                "moved rows of the previous version's outbox into upgrade: streams"
            );
        }
        Ok(())
    }
}

/// How often the outbox's slots are reclaimed.
const RECLAIM_EVERY: Duration = Duration::from_secs(5);

/// Empties the outbox's published slots and moves the gate on to the next one, every
/// [`RECLAIM_EVERY`], for as long as the relay runs (it is dropped with the relay; a round
/// cut short is rolled back). It runs beside the session, not in its loop: a TRUNCATE of
/// a slot full of rows (and the lock it waits for) takes tens of milliseconds, which would
/// hold back every acknowledgement and hand-off the session has to publish.
pub(super) async fn reclaim_slots(relay: &Relay) {
    let mut tick = tokio::time::interval(RECLAIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match sql::reclaim(
            &relay.pool,
            &relay.cfg.db.schema,
            relay.settings.rotate_every,
        )
        .await
        {
            Ok(r) => {
                if !r.truncated.is_empty() || r.rotated_to.is_some() {
                    debug!(truncated = ?r.truncated, rotated_to = ?r.rotated_to, "outbox slots reclaimed");
                }
                relay
                    .metrics
                    .outbox_slots_truncated
                    .inc_by(r.truncated.len() as u64);
            }
            // A lock timeout (a long read, a slow gate transaction) or Postgres away only
            // postpones it.
            Err(e) => debug!(error = %e, "outbox reclaim postponed"),
        }
    }
}
