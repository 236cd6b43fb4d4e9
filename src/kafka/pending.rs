//! Lag in time: how long the oldest input message read but not yet durable has waited,
//! per partition. The message count of `kdedup_consumer_lag` says nothing about age: 1000
//! messages are a second of a busy topic and a day of a quiet one.
//!
//! The reader records each message it hands to a lane; the lane forgets a partition's
//! messages once their offsets are stored. Memory is bounded by the read-ahead (every
//! message in the lanes counts at least 1 KiB against `--read-ahead-bytes`), and further by
//! recording a message only when its timestamp is [`RESOLUTION_MS`] newer than the last
//! one recorded for its partition: the age reported is then at most that much too young.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

/// Messages of one partition whose timestamps are this close share one record.
const RESOLUTION_MS: i64 = 10;

/// `(offset, timestamp ms)` of a partition's messages in the lanes, oldest first.
type Waiting = VecDeque<(i64, i64)>;

/// What waits in the lanes, per partition.
#[derive(Default)]
pub struct Pending {
    partitions: Mutex<HashMap<(String, i32), Waiting>>,
}

impl Pending {
    /// The reader handed `offset` of `topic`/`partition` to a lane.
    pub fn read(&self, topic: &str, partition: i32, offset: i64, timestamp_ms: Option<i64>) {
        let Some(ts) = timestamp_ms else { return };
        let mut parts = self.partitions.lock().expect("pending lock");
        let queue = parts.entry((topic.to_string(), partition)).or_default();
        if queue
            .back()
            .map_or(true, |&(_, last)| ts - last >= RESOLUTION_MS)
        {
            queue.push_back((offset, ts));
        }
    }

    /// Offsets below `next` of each partition are durable.
    pub fn durable(&self, next: &BTreeMap<(String, i32), i64>) {
        let mut parts = self.partitions.lock().expect("pending lock");
        for (key, &next) in next {
            if let Some(queue) = parts.get_mut(key) {
                while queue.front().is_some_and(|&(offset, _)| offset < next) {
                    queue.pop_front();
                }
                if queue.is_empty() {
                    parts.remove(key);
                }
            }
        }
    }

    /// Seconds the oldest message of `topic`/`partition` in the lanes has waited since its
    /// timestamp; 0 when none waits.
    pub fn oldest_age_seconds(&self, topic: &str, partition: i32, now_ms: i64) -> f64 {
        let parts = self.partitions.lock().expect("pending lock");
        parts
            .get(&(topic.to_string(), partition))
            .and_then(|q| q.front())
            .map_or(0.0, |&(_, ts)| (now_ms - ts).max(0) as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_age_is_that_of_the_oldest_message_not_yet_durable() {
        let p = Pending::default();
        p.read("t", 0, 10, Some(1_000));
        p.read("t", 0, 11, Some(1_005)); // within the resolution: shares the record above
        p.read("t", 0, 12, Some(2_000));
        p.read("t", 1, 7, Some(5_000));
        assert_eq!(p.oldest_age_seconds("t", 0, 4_000), 3.0);
        p.durable(&BTreeMap::from([(("t".to_string(), 0), 12)]));
        assert_eq!(p.oldest_age_seconds("t", 0, 4_000), 2.0);
        p.durable(&BTreeMap::from([(("t".to_string(), 0), 13)]));
        assert_eq!(p.oldest_age_seconds("t", 0, 4_000), 0.0, "caught up");
        assert_eq!(
            p.oldest_age_seconds("t", 1, 4_000),
            0.0,
            "a timestamp in the future is no age"
        );
        assert_eq!(p.oldest_age_seconds("t", 1, 6_500), 1.5);
        assert_eq!(p.oldest_age_seconds("other", 0, 6_500), 0.0);
    }
}
