//! Topics into local stores (`esk_store`): the same intake of records for a
//! restore (an owner reading its partition to the end before it serves) and
//! for a hot standby (a follower of every partition), so both check and keep
//! records alike.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use esk_kafka::KafkaConfig;
use esk_store::{Changes, PartitionStore, Store, StoreError};

use crate::{Followed, Progress, Sink};

/// How records of one topic become rows of a partition's store.
pub trait Intake: Send + 'static {
    /// A batch of one partition's records begins (reset per-batch state).
    fn begin(&mut self) {}
    /// Turns one record into changes, refusing (with [`crate::refused`]) what
    /// does not fit; `Err` only when the store itself failed.
    fn take(&mut self, store: &PartitionStore, f: &Followed, changes: &mut Changes) -> Result<(), StoreError>;
    /// About once a minute, for each partition store followed (expiry).
    fn tidy(&mut self, _store: &mut PartitionStore) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Records applied to a store in one local transaction during a restore.
const CHUNK: usize = 5000;

/// Brings `store` to the end of `topic`/`partition`, from the position it
/// has: every record through `intake`, the position with the rows. Call it
/// after fencing (no transaction open on the partition). Returns how many
/// records were read, or `None` when `stop` was set meanwhile.
#[allow(clippy::too_many_arguments)]
pub fn restore(
    kafka: &KafkaConfig,
    group: &str,
    topic: &str,
    partition: i32,
    partitions: i32,
    store: &mut PartitionStore,
    intake: &mut impl Intake,
    stop: &AtomicBool,
) -> Result<Option<u64>> {
    let from = store.position(topic)?;
    let mut changes = Changes::default();
    let mut read = 0u64;
    intake.begin();
    let end = esk_kafka::read::read_partition(kafka, group, topic, partition, from, stop, |r| {
        read += 1;
        let f = Followed {
            partition,
            offset: r.offset,
            partitions,
            timestamp_ms: r.timestamp_ms,
            key: r.key.map(<[u8]>::to_vec),
            value: r.value.map(<[u8]>::to_vec),
        };
        intake.take(store, &f, &mut changes)?;
        changes.position(topic, r.offset + 1);
        if changes.puts.len() + changes.deletes.len() >= CHUNK {
            store.apply(&std::mem::take(&mut changes))?;
            intake.begin();
        }
        Ok::<(), StoreError>(())
    })
    .with_context(|| format!("restoring {topic}/{partition} into the local store"))?;
    let Some(end) = end else {
        store.apply(&changes)?;
        return Ok(None);
    };
    // Up to the end read: transaction markers take offsets too.
    changes.position(topic, end);
    store.apply(&changes)?;
    Ok(Some(read))
}

/// The partitions this process owns, whose stores their owner writes.
pub type Owned = Arc<std::sync::RwLock<BTreeSet<i32>>>;

/// A follower's sink that writes every partition of a topic into its store,
/// but those this process owns: their owner writes them, and a standby
/// writing them too would only contend for the file. When a partition stops
/// being owned, the follower reads it again from where its store stands, so
/// nothing passed over while it was owned is missed.
#[derive(Debug)]
pub struct StoreSink<I> {
    store: Arc<Store>,
    topic: String,
    intake: I,
    partitions: HashMap<i32, PartitionStore>,
    owned: Owned,
    /// Partitions whose records were passed over while owned.
    passed: BTreeSet<i32>,
    tidied: Instant,
}

impl<I: Intake> StoreSink<I> {
    pub fn new(store: Arc<Store>, topic: String, intake: I, owned: Owned) -> Self {
        Self {
            store,
            topic,
            intake,
            partitions: HashMap::new(),
            owned,
            passed: BTreeSet::new(),
            tidied: Instant::now(),
        }
    }

    fn partition(&mut self, p: i32) -> Result<&mut PartitionStore> {
        if !self.partitions.contains_key(&p) {
            let s = self.store.partition(p)?;
            self.partitions.insert(p, s);
        }
        Ok(self.partitions.get_mut(&p).expect("inserted above"))
    }
}

impl<I: Intake> Sink for StoreSink<I> {
    fn load(&mut self) -> Result<Progress> {
        let mut progress = Progress::default();
        let files: Vec<i32> = std::fs::read_dir(self.store.dir())?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix('p')?.strip_suffix(".sqlite")?.parse().ok())
            .collect();
        for p in files {
            let topic = self.topic.clone();
            let next = self.partition(p)?.position(&topic)?;
            if next > 0 {
                progress.positions.insert(p, next);
            }
        }
        Ok(progress)
    }

    fn apply(&mut self, batch: &[Followed], progress: &mut Progress) -> Result<()> {
        let mut by_partition: HashMap<i32, Vec<&Followed>> = HashMap::new();
        for f in batch {
            by_partition.entry(f.partition).or_default().push(f);
        }
        let owned = self.owned.read().expect("owned lock").clone();
        for (p, records) in by_partition {
            if owned.contains(&p) {
                self.passed.insert(p);
                continue;
            }
            self.partition(p)?;
            if self.passed.remove(&p) {
                // Owned until a moment ago: read it again from the store's position.
                let from = self.partitions[&p].position(&self.topic)?;
                progress.rewind.insert(p, from);
                continue;
            }
            let store = self.partitions.get_mut(&p).expect("opened above");
            // What the store has from its position on was written by a
            // restore or the owner: taking an older record again could bring
            // back a row a later tombstone removed.
            let position = store.position(&self.topic)?;
            let mut changes = Changes::default();
            self.intake.begin();
            for f in records.into_iter().filter(|f| f.offset >= position) {
                self.intake.take(store, f, &mut changes)?;
            }
            if let Some(next) = progress.positions.get(&p) {
                changes.position(&self.topic, *next);
            }
            store.apply(&changes)?;
        }
        if self.tidied.elapsed() > Duration::from_secs(60) {
            self.tidied = Instant::now();
            for s in self.partitions.values_mut() {
                self.intake.tidy(s)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Keeps each record as a row named by its offset.
    struct Rows;

    impl Intake for Rows {
        fn take(&mut self, _store: &PartitionStore, f: &Followed, changes: &mut Changes) -> Result<(), StoreError> {
            changes.put(format!("r{}", f.offset), f.offset, Vec::new(), 0, 0);
            Ok(())
        }
    }

    fn records(from: i64, to: i64) -> Vec<Followed> {
        (from..to)
            .map(|offset| Followed {
                partition: 0,
                offset,
                partitions: 1,
                timestamp_ms: Some(0),
                key: None,
                value: Some(Vec::new()),
            })
            .collect()
    }

    fn apply(sink: &mut StoreSink<Rows>, from: i64, to: i64) -> Progress {
        let mut progress = Progress::default();
        progress.positions.insert(0, to);
        sink.apply(&records(from, to), &mut progress).unwrap();
        progress
    }

    #[test]
    fn an_owned_partition_is_passed_over_and_read_again_from_its_store_once_given_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let owned = Owned::default();
        let mut sink = StoreSink::new(store.clone(), "t".into(), Rows, owned.clone());
        let rows =
            |p: &PartitionStore| (0..8).filter(|o| p.get(&format!("r{o}")).unwrap().is_some()).collect::<Vec<_>>();

        owned.write().unwrap().insert(0);
        let progress = apply(&mut sink, 0, 3);
        assert!(progress.rewind.is_empty());
        let mut owner = store.partition(0).unwrap();
        assert_eq!(rows(&owner), Vec::<i64>::new(), "the owner writes an owned partition, not the standby");
        // The owner commits records 0 and 1 into its store, then gives the partition up.
        let mut changes = Changes::default();
        changes.put("r0".into(), 0, Vec::new(), 0, 0);
        changes.put("r1".into(), 1, Vec::new(), 0, 0);
        changes.position("t", 2);
        owner.apply(&changes).unwrap();
        owned.write().unwrap().clear();

        // The next batch (3..5) would skip record 2: the follower is sent back to the store's position.
        let progress = apply(&mut sink, 3, 5);
        assert_eq!(progress.rewind, BTreeMap::from([(0, 2)]));
        assert_eq!(owner.position("t").unwrap(), 2, "nothing taken past the gap");
        assert_eq!(rows(&owner), vec![0, 1]);

        let progress = apply(&mut sink, 2, 5);
        assert!(progress.rewind.is_empty());
        assert_eq!(rows(&owner), vec![0, 1, 2, 3, 4]);
        assert_eq!(owner.position("t").unwrap(), 5);
    }
}
