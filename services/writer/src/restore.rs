//! Restoring one partition: the local store is brought up to the ends of the
//! state and answers topics, from the positions it has.
//!
//! With the hot standby on (the default) the store is near the ends already
//! and little is read; a store that is new (a first start, another machine)
//! reads both partitions whole: the state topic is compacted (its cost grows
//! with streams, not events), the answers topic keeps one idempotency horizon.
//! Every record is checked on the way in (`memory::StateIntake`,
//! `memory::AnswersIntake`): one that does not fit is refused, logged and
//! counted, never a panic.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Result;
use esk_follower::store::restore as read_into;
use esk_store::PartitionStore;

use crate::Shared;
use crate::memory::{AnswersIntake, StateIntake};

/// Brings `store` to the ends of partition `partition` of the state and
/// answers topics. `false` when `stop` was set meanwhile.
pub fn restore(shared: &Shared, partition: i32, store: &mut PartitionStore, stop: &AtomicBool) -> Result<bool> {
    let started = Instant::now();
    let group = format!("{}-restore", shared.config.group_id());
    let (state, answers) = (shared.topics.state(), shared.topics.answers());
    // A store ahead of a topic's end belongs to an earlier topic of the same
    // name (deleted and created again): start it afresh.
    for topic in [&state, &answers] {
        let from = store.position(topic)?;
        let high = shared.high_watermark(topic, partition)?;
        if from > high {
            tracing::warn!(partition, topic, from, high, "the local store is ahead of the topic; starting it afresh");
            store.clear()?;
            break;
        }
    }
    let (kafka, n) = (&shared.kafka, shared.partitions);
    let mut intake = StateIntake::new(shared.aggregates.clone());
    let Some(states) = read_into(kafka, &group, &state, partition, n, store, &mut intake, stop)? else {
        return Ok(false);
    };
    let mut intake = AnswersIntake { horizon_ms: shared.horizon_ms };
    let Some(remembered) = read_into(kafka, &group, &answers, partition, n, store, &mut intake, stop)? else {
        return Ok(false);
    };
    metrics::histogram!("esk_writer_restore_seconds").record(started.elapsed().as_secs_f64());
    tracing::info!(
        partition,
        state_records = states,
        answers = remembered,
        ms = started.elapsed().as_millis() as u64,
        "partition restored"
    );
    Ok(true)
}
