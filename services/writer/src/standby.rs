//! The hot standby: every writer instance follows the whole state topic (with
//! the replicas' follower code), so that when it takes a partition over it
//! already holds that partition's streams and reads only what was written since.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use esk_follower::{Followed, Progress, Sink};

use crate::batch::PartitionState;

/// What the standby holds: each partition's streams and the next offset to read.
#[derive(Debug, Default)]
pub struct Standby {
    partitions: HashMap<i32, (PartitionState, i64)>,
}

impl Standby {
    /// A copy of a partition's streams and the offset the copy reaches, if followed.
    pub fn snapshot(&self, partition: i32) -> Option<(PartitionState, i64)> {
        self.partitions.get(&partition).map(|(state, next)| {
            let copy = PartitionState { partition, streams: state.streams.clone() };
            (copy, *next)
        })
    }
}

/// The follower's sink: memory only (a restart follows from the beginning).
#[derive(Debug, Clone, Default)]
pub struct StandbySink(pub Arc<Mutex<Standby>>);

impl Sink for StandbySink {
    fn load(&mut self) -> anyhow::Result<Progress> {
        Ok(Progress::default())
    }

    fn apply(&mut self, batch: &[Followed], progress: &Progress) -> anyhow::Result<()> {
        let mut standby = self.0.lock().expect("standby lock");
        for f in batch {
            let (state, _) =
                standby.partitions.entry(f.partition).or_insert_with(|| (PartitionState::new(f.partition), 0));
            state.streams.insert(f.record.stream.clone(), f.record.clone());
        }
        for (p, next) in &progress.positions {
            let entry = standby.partitions.entry(*p).or_insert_with(|| (PartitionState::new(*p), 0));
            entry.1 = *next;
        }
        Ok(())
    }
}
