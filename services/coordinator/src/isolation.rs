//! Inputs under suspicion, and inputs refused.
//!
//! When the brokers reject a batch's transaction (a record they will not
//! take), the shard takes the batch's inputs again one at a time; the one
//! whose transaction is rejected alone is refused (a dead letter, an error
//! reply) and its refusal committed. The partition's position on its input
//! may not pass a refused record at once: it stays below a vote held in
//! memory only (see `logic::Txs`), so the shard reads the refused record
//! again after its rewind. It is then passed over, not refused twice, until
//! the position passes it: no input makes the shard retry for ever.
//!
//! Bounds: suspects are at most one batch (`--max-batch`); refused records
//! are kept only while a held vote keeps the position below them, which the
//! held vote's transaction deadline ends.

use std::collections::HashSet;

use esk_owner::Incoming;

/// An input record: (topic, partition, offset).
pub type Key = (String, i32, i64);

pub fn key(r: &Incoming) -> Key {
    (r.topic.clone(), r.partition, r.offset)
}

#[derive(Debug, Default)]
pub struct Isolation {
    suspects: HashSet<Key>,
    refused: HashSet<Key>,
}

impl Isolation {
    /// Whether inputs are taken one at a time.
    pub fn isolating(&self) -> bool {
        !self.suspects.is_empty()
    }

    /// Drops from `batch` the records refused already; how many.
    pub fn unrefused(&self, batch: &mut Vec<Incoming>) -> usize {
        if self.refused.is_empty() {
            return 0;
        }
        let before = batch.len();
        batch.retain(|r| !self.refused.contains(&key(r)));
        before - batch.len()
    }

    /// These records were handled: committed, or taken by memory alone.
    pub fn handled(&mut self, keys: &[Key]) {
        if !self.suspects.is_empty() {
            for k in keys {
                self.suspects.remove(k);
            }
        }
    }

    /// A batch's transaction was rejected: its records are taken again one
    /// at a time.
    pub fn suspect(&mut self, keys: Vec<Key>) {
        self.suspects.extend(keys);
    }

    /// A record whose transaction was rejected alone: refused, once.
    pub fn refused(&mut self, key: Key) {
        self.suspects.remove(&key);
        self.refused.insert(key);
    }

    /// Forgets the refused records a partition's position has passed;
    /// `next(topic, partition)` is its next offset to read.
    pub fn passed(&mut self, next: impl Fn(&str, i32) -> Option<i64>) {
        self.refused.retain(|(t, p, o)| next(t, *p).is_none_or(|n| *o >= n));
    }

    /// Refused records still remembered (`esk_coordinator_refused_remembered`).
    pub fn remembered(&self) -> usize {
        self.refused.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(topic: &str, offset: i64) -> Incoming {
        Incoming { input: 1, topic: topic.into(), partition: 0, offset, key: None, payload: None, headers: Vec::new() }
    }

    /// A batch taken without a Kafka transaction (partial votes only) ends
    /// the suspicion of its records: the shard does not stay in one-at-a-time
    /// mode (and without its clock) for ever.
    #[test]
    fn records_handled_without_a_transaction_are_no_longer_suspects() {
        let mut i = Isolation::default();
        i.suspect(vec![("votes".into(), 0, 5), ("votes".into(), 0, 6)]);
        assert!(i.isolating());
        i.handled(&[("votes".into(), 0, 5)]);
        assert!(i.isolating());
        i.handled(&[("votes".into(), 0, 6)]);
        assert!(!i.isolating());
    }

    /// A refused record read again below a held vote is passed over, until
    /// the position passes it; then it is forgotten.
    #[test]
    fn a_refused_record_read_again_is_passed_over_until_the_position_passes_it() {
        let mut i = Isolation::default();
        i.suspect(vec![("votes".into(), 0, 9)]);
        i.refused(("votes".into(), 0, 9));
        assert!(!i.isolating());
        let mut batch = vec![rec("votes", 7), rec("votes", 9), rec("votes", 10), rec("requests", 9)];
        assert_eq!(i.unrefused(&mut batch), 1);
        assert_eq!(
            batch.iter().map(|r| (r.topic.as_str(), r.offset)).collect::<Vec<_>>(),
            [("votes", 7), ("votes", 10), ("requests", 9)]
        );
        // The position stays below it (a held vote at 7): remembered.
        i.passed(|t, _| (t == "votes").then_some(7));
        assert_eq!(i.remembered(), 1);
        i.passed(|t, _| (t == "votes").then_some(10));
        assert_eq!(i.remembered(), 0);
        let mut again = vec![rec("votes", 9)];
        assert_eq!(i.unrefused(&mut again), 0, "forgotten once passed");
    }
}
