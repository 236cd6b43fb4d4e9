//! Delivery chains: the events of one Kafka key (a null key: of one partition) are
//! delivered one after the other, in input order, across the batches of every lane.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::store::gate::GateRow;

/// What orders a delivery chain: events with the same Kafka key, or (a null key) of the
/// same partition, are delivered one after the other, in input order.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub(super) enum ChainKey {
    Key(Vec<u8>),
    Partition(String, i32),
}

/// The batch's events in delivery chains: one chain per [`ChainKey`], each in input
/// order. Chains run side by side.
pub(super) fn chains(rows: &[&GateRow]) -> Vec<(ChainKey, Vec<usize>)> {
    let mut index: HashMap<ChainKey, usize> = HashMap::new();
    let mut chains: Vec<(ChainKey, Vec<usize>)> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let k = match &r.key {
            Some(k) => ChainKey::Key(k.clone()),
            None => ChainKey::Partition(r.topic.clone(), r.partition),
        };
        let c = *index.entry(k.clone()).or_insert_with(|| {
            chains.push((k, Vec::new()));
            chains.len() - 1
        });
        chains[c].1.push(i);
    }
    chains
}

/// The end of one registered chain, which the next chain of its key (from a later
/// batch of the same lane) waits for.
#[derive(Default)]
pub(super) struct Tail {
    pub(super) ended: std::sync::atomic::AtomicBool,
    pub(super) notify: tokio::sync::Notify,
}

impl Tail {
    pub(super) async fn wait(&self) {
        use std::sync::atomic::Ordering;
        loop {
            let notified = self.notify.notified();
            if self.ended.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

/// What became of a row held elsewhere (see [`Pending::held`]).
/// The last registered chain of each key, until it ended.
pub(super) type Tails = Mutex<HashMap<ChainKey, Arc<Tail>>>;

pub(super) type HeldElsewhere = tokio::sync::oneshot::Receiver<Option<Instant>>;

/// One chain of a call to [`Sink::deliver`], registered when the call was made.
pub(super) struct Chain {
    pub(super) key: ChainKey,
    /// Its rows, by index in the call, in input order; with what becomes of each one
    /// held elsewhere.
    pub(super) rows: Vec<(usize, Option<HeldElsewhere>)>,
    /// The previous chain of this key, still running when this one was registered.
    pub(super) after: Option<Arc<Tail>>,
    pub(super) tail: Arc<Tail>,
}

/// Ends a chain's tail however the chain ends (and forgets it, unless a later chain of
/// its key has registered since).
pub(super) struct EndTail<'a> {
    pub(super) tails: &'a Tails,
    pub(super) key: &'a ChainKey,
    pub(super) tail: &'a Arc<Tail>,
}

impl Drop for EndTail<'_> {
    fn drop(&mut self) {
        self.tail
            .ended
            .store(true, std::sync::atomic::Ordering::Release);
        self.tail.notify.notify_waiters();
        let mut tails = self.tails.lock().expect("tails lock");
        if tails
            .get(self.key)
            .is_some_and(|t| Arc::ptr_eq(t, self.tail))
        {
            tails.remove(self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(partition: i32, offset: i64, key: Option<&str>) -> GateRow {
        GateRow {
            scope: "s".into(),
            event_id: format!("e{offset}"),
            topic: "t".into(),
            partition,
            offset,
            timestamp_ms: None,
            payload_hash: vec![],
            key: key.map(|k| k.as_bytes().to_vec()),
            value: None,
            headers: vec![],
        }
    }

    #[test]
    fn chains_keep_input_order_per_key_and_per_partition_for_null_keys() {
        let rows = [
            row(0, 1, Some("a")),
            row(0, 2, Some("b")),
            row(0, 3, None),
            row(1, 1, Some("a")),
            row(1, 2, None),
            row(0, 4, None),
            row(0, 5, Some("b")),
        ];
        let refs: Vec<&GateRow> = rows.iter().collect();
        let found: Vec<Vec<usize>> = chains(&refs).into_iter().map(|(_, c)| c).collect();
        assert_eq!(found, vec![vec![0, 3], vec![1, 6], vec![2, 5], vec![4]]);
    }
}
