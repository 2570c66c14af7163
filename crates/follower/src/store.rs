//! Topics into local stores (`esk_store`): the same intake of records for a
//! restore (an owner reading its partition to the end before it serves) and
//! for a hot standby (a follower of every partition), so both check and keep
//! records alike.

use std::collections::HashMap;
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

/// A follower's sink that writes every partition of a topic into its store.
#[derive(Debug)]
pub struct StoreSink<I> {
    store: Arc<Store>,
    topic: String,
    intake: I,
    partitions: HashMap<i32, PartitionStore>,
    tidied: Instant,
}

impl<I: Intake> StoreSink<I> {
    pub fn new(store: Arc<Store>, topic: String, intake: I) -> Self {
        Self { store, topic, intake, partitions: HashMap::new(), tidied: Instant::now() }
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
        for (p, records) in by_partition {
            self.partition(p)?;
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
