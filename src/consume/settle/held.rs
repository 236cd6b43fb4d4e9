//! A batch's delivery by a status-gated sink (HTTP), with the copies another delivery
//! holds: gated again until that delivery ended, and handed to the sink in their place in
//! input order, so that a copy taken over keeps its key's order.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{Abandoned, Gate, RowResult};
use crate::model::identity::Rejection;
use crate::sink::Pending;
use crate::store::gate::{GateBatch, GateOutcome};

/// How long a row held by another delivery waits before it is gated again.
const BUSY_RECHECK: Duration = Duration::from_millis(250);

/// Tells the sink what became of a row held elsewhere (see [`Pending::held`]).
type Resolver = tokio::sync::oneshot::Sender<Option<Instant>>;

impl Gate {
    /// Delivers the rows the gate committed as first sightings ([`Sink::deliver`]; a
    /// no-op for the sinks whose write committed with the gate), and meanwhile gates the
    /// rows another delivery holds ([`GateOutcome::Busy`], status-gated sinks only) again
    /// until that delivery ended: a row it finished is a duplicate, one it gave up (FAILED,
    /// or its lease ran out) is taken over here and delivered. The held rows go to the
    /// sink with the others, in input order, so the later events of their keys wait behind
    /// them (this batch's and, through the sink's chains, the next batch's) and a copy
    /// taken over is still delivered in input order; the rest of the batch goes on. One
    /// event is never delivered by two at the same time. Returns, per row of
    /// `candidates`, why its delivery failed for good, if it did.
    pub(super) async fn deliver(
        &self,
        candidates: &GateBatch,
        outcomes: &mut [RowResult],
        gated_since: Instant,
        stop: &CancellationToken,
        delivering: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<Vec<Option<Rejection>>, Abandoned> {
        let rows = candidates.rows();
        let mut failed: Vec<Option<Rejection>> = (0..rows.len()).map(|_| None).collect();
        let mut pending: Vec<usize> = Vec::new();
        let mut items: Vec<Pending<'_>> = Vec::new();
        let mut resolvers: Vec<(usize, Resolver)> = Vec::new();
        for (i, o) in outcomes.iter().enumerate() {
            let held = match o {
                Ok(GateOutcome::Forwarded) => None,
                Ok(GateOutcome::Busy) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    resolvers.push((i, tx));
                    Some(rx)
                }
                _ => continue,
            };
            pending.push(i);
            items.push(Pending {
                row: &rows[i],
                held,
            });
        }
        if pending.is_empty() {
            return Ok(failed);
        }
        // The sink registers the deliveries when it is called (their keys' order).
        let delivery = self.sink.deliver(items, gated_since, stop);
        if let Some(registered) = delivering {
            let _ = registered.send(());
        }
        let (delivered, regated) =
            tokio::join!(delivery, self.wait_while_busy(candidates, resolvers, stop));
        let regated = regated?;
        for (i, o) in regated {
            outcomes[i] = o;
        }
        let Some(delivered) = delivered else {
            return Err(Abandoned);
        };
        for (&i, why) in pending.iter().zip(delivered) {
            failed[i] = why;
        }
        Ok(failed)
    }
    /// Gates the `held` rows again every [`BUSY_RECHECK`] until none is held by another
    /// delivery, telling the sink each one's fate as soon as it is known (taken over:
    /// deliver it; else nothing to deliver); their new outcomes.
    async fn wait_while_busy(
        &self,
        candidates: &GateBatch,
        mut held: Vec<(usize, Resolver)>,
        stop: &CancellationToken,
    ) -> Result<Vec<(usize, RowResult)>, Abandoned> {
        let mut resolved = Vec::new();
        let mut rounds = 0u32;
        while !held.is_empty() {
            // A copy of an event still being delivered (a duplicate in the lane's next
            // batch) is common and short: a line at INFO only after 10 s of waiting.
            if rounds % 40 == 0 {
                let first = &candidates.rows()[held[0].0];
                let waited_s = f64::from(rounds) * BUSY_RECHECK.as_secs_f64();
                if rounds == 0 {
                    debug!(
                        rows = held.len(),
                        event_id = first.event_id,
                        scope = first.scope,
                        topic = first.topic,
                        partition = first.partition,
                        offset = first.offset,
                        "events held by another delivery (a live lease): waiting for it to end"
                    );
                } else {
                    info!(rows = held.len(), event_id = first.event_id, scope = first.scope,
                          topic = first.topic, partition = first.partition, offset = first.offset,
                          waited_s, "events still held by another delivery (a live lease): waiting for it to end");
                }
            }
            rounds += 1;
            if !self.idle(BUSY_RECHECK, stop).await {
                return Err(Abandoned);
            }
            let mut again = GateBatch::with_capacity(held.len());
            for (i, _) in &held {
                again.push(candidates.rows()[*i].clone());
            }
            let regated_since = Instant::now();
            let (regated, _) = self.gate_with_retry(&again, stop).await?;
            let mut still = Vec::new();
            for ((i, resolver), o) in held.into_iter().zip(regated) {
                match o {
                    Ok(GateOutcome::Busy) => still.push((i, resolver)),
                    o => {
                        let taken = matches!(o, Ok(GateOutcome::Forwarded));
                        let _ = resolver.send(taken.then_some(regated_since));
                        resolved.push((i, o));
                    }
                }
            }
            held = still;
        }
        Ok(resolved)
    }
}
