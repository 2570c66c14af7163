//! Restoring one partition from the compacted state topic: each stream's last
//! record. Cost grows with the number of streams, not events.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Result;
use esk_wire::protocol::StreamRecord;

use crate::Shared;
use crate::batch::PartitionState;

/// `None` when `stop` was set meanwhile.
pub fn restore(shared: &Shared, partition: i32, stop: &AtomicBool) -> Result<Option<PartitionState>> {
    let started = Instant::now();
    let mut state = PartitionState::new(partition);
    let mut skipped = 0u64;
    let group = format!("{}-restore", shared.config.group_id());
    let done = esk_owner::restore::read_partition(
        &shared.kafka,
        &group,
        &shared.topics.state(),
        partition,
        stop,
        |_, value| {
            match value.map(serde_json::from_slice::<StreamRecord>) {
                Some(Ok(rec)) => {
                    state.streams.insert(rec.stream.clone(), rec);
                }
                // A tombstone or a record of another shape: not the writer's, skip it.
                _ => skipped += 1,
            }
        },
    )?;
    if !done {
        return Ok(None);
    }
    if skipped > 0 {
        tracing::warn!(partition, skipped, "restore skipped records that are not stream records");
    }
    metrics::histogram!("esk_writer_restore_seconds").record(started.elapsed().as_secs_f64());
    tracing::info!(
        partition,
        streams = state.streams.len(),
        ms = started.elapsed().as_millis() as u64,
        "partition restored"
    );
    Ok(Some(state))
}
