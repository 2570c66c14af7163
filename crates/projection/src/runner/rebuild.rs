//! A rebuild: the next version of a model built from offset 0 beside the
//! live loop, then handed over at a batch boundary.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::mpsc::{self, Sender};
use std::time::{Duration, Instant};

use esk_wire::SchemaRegistry;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::batch::{Failing, POISON_AFTER, apply_batch, decode_all};
use super::dead_letters::DeadLetters;
use super::{FromRebuild, RebuildStatus, RunnerConfig, Shared, listed};
use crate::{Parked, Positions, Projection, Store};

/// Builds the next version of a model from offset 0, then hands it to the live loop.
pub(super) struct Rebuild<S: Store, P> {
    pub(super) config: RunnerConfig,
    pub(super) projection: Arc<P>,
    pub(super) schemas: Arc<SchemaRegistry>,
    pub(super) store: Option<S>,
    pub(super) shared: Arc<Shared>,
    pub(super) to_live: Sender<FromRebuild<S>>,
}

impl<S: Store, P: Projection<S>> Rebuild<S, P> {
    fn set(&self, f: impl FnOnce(&mut RebuildStatus)) {
        if let Some(r) = self.shared.status.lock().expect("status lock").rebuild.as_mut() {
            f(r);
        }
    }

    pub(super) fn run(mut self) {
        if let Err(e) = self.build() {
            self.set(|r| {
                r.phase = "failed".into();
                r.error = Some(e.clone());
            });
            let _ = self.to_live.send(FromRebuild::Failed(e));
        }
    }

    fn build(&mut self) -> Result<(), String> {
        let started = Instant::now();
        let mut dead_letters = DeadLetters::new(&self.config, self.projection.name())?;
        let consumer: BaseConsumer = self
            .config
            .kafka
            .committed_reader(&format!("{}-rebuild", self.config.group_id), Duration::from_millis(50))
            .create()
            .map_err(|e| e.to_string())?;
        let mut assigned: BTreeSet<(String, i32)> = BTreeSet::new();
        let mut positions = Positions::new();
        let mut applied = 0u64;
        let mut paused_at: Option<Positions> = None;
        loop {
            // Follow every partition the live loop knows (new ones may appear).
            let live = self.shared.published.applied();
            let target = paused_at.as_ref().unwrap_or(&live);
            let missing: Vec<(String, i32)> = target.keys().filter(|k| !assigned.contains(*k)).cloned().collect();
            if !missing.is_empty() {
                assigned.extend(missing);
                let mut tpl = TopicPartitionList::new();
                for (t, p) in &assigned {
                    let offset = positions.get(&(t.clone(), *p)).map_or(Offset::Beginning, |n| Offset::Offset(*n));
                    tpl.add_partition_offset(t, *p, offset).map_err(|e| e.to_string())?;
                }
                consumer.assign(&tpl).map_err(|e| e.to_string())?;
            }
            let behind = |target: &Positions| {
                target.iter().filter(|(k, want)| positions.get(*k).copied().unwrap_or(0) < **want).count()
            };
            match &paused_at {
                Some(target) if behind(target) == 0 => {
                    let store = self.store.take().ok_or("the rebuilt store was handed over already")?;
                    self.set(|r| r.phase = "switching".into());
                    self.to_live.send(FromRebuild::Switch(store)).map_err(|_| "the live loop stopped")?;
                    tracing::info!(
                        projection = self.projection.name(),
                        applied,
                        ms = started.elapsed().as_millis() as u64,
                        "rebuild caught up"
                    );
                    return Ok(());
                }
                None if behind(&live) == 0 || near(&positions, &live) => {
                    let (tx, rx) = mpsc::channel();
                    self.to_live.send(FromRebuild::Pause(tx)).map_err(|_| "the live loop stopped")?;
                    let at = rx.recv_timeout(Duration::from_secs(60)).map_err(|_| "the live loop did not pause")?;
                    self.set(|r| r.phase = "catching-up".into());
                    paused_at = Some(at);
                    continue;
                }
                _ => {}
            }
            let batch = esk_follower::engine::poll::batch(
                &consumer,
                self.config.max_batch.max(1000),
                Duration::from_millis(100),
            )
            .map_err(|refused| refused.to_string())?;
            if batch.is_empty() {
                continue;
            }
            let decoded = decode_all(&batch, &self.schemas);
            let store = self.store.as_mut().ok_or("the rebuilt store was handed over already")?;
            // What the rebuild cannot apply is parked like the live loop's,
            // in the new version's store and the dead-letter topic: a replay
            // on the new version then finds it.
            let mut failing = Failing::default();
            let mut tries = 0;
            loop {
                let mut send = |parked: &[Parked]| dead_letters.send(&self.config, self.projection.name(), parked);
                match apply_batch(
                    &*self.projection,
                    store,
                    &batch,
                    &decoded,
                    &mut positions,
                    &failing.poison,
                    &mut send,
                ) {
                    Ok((n, parked)) => {
                        applied += n + parked.len() as u64;
                        break;
                    }
                    Err(e) if tries < 20 + POISON_AFTER => {
                        tries += 1;
                        tracing::warn!("rebuild batch failed, retrying: {e}");
                        failing.failed(e);
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
            let listed_positions = listed(&positions);
            self.set(|r| {
                r.applied = applied;
                r.positions = listed_positions;
                r.started_ms_ago = started.elapsed().as_millis() as u64;
            });
        }
    }
}

/// Within a few hundred records of the live loop on every partition: time to pause it.
fn near(positions: &Positions, live: &Positions) -> bool {
    live.iter().all(|(k, want)| positions.get(k).copied().unwrap_or(0) + 500 >= *want)
}
