//! Restoring one partition from the compacted state topic: each stream's last
//! record. Cost grows with the number of streams, not events.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Result;
use esk_wire::protocol::StreamRecord;

use crate::Shared;
use crate::batch::PartitionState;

/// `None` when `stop` was set meanwhile. With the hot standby on, starts from
/// its copy of the partition and reads only what came after it.
pub fn restore(shared: &Shared, partition: i32, stop: &AtomicBool) -> Result<Option<PartitionState>> {
    let started = Instant::now();
    // Where the standby's consumer stood when last idle: past transaction
    // markers. Read before the snapshot, so the snapshot holds all before it.
    let caught_up = shared.standby.as_ref().map_or(-1, |(f, _)| f.idle_position(partition));
    let standby = shared.standby.as_ref().and_then(|(_, s)| s.lock().expect("standby lock").snapshot(partition));
    let from_standby = standby.is_some();
    let (mut state, from) = standby.unwrap_or_else(|| (PartitionState::new(partition), 0));
    let topic = shared.topics.state();
    if from_standby && caught_up >= from && caught_up >= shared.high_watermark(&topic, partition)? {
        tracing::info!(
            partition,
            streams = state.streams.len(),
            ms = started.elapsed().as_millis() as u64,
            "partition taken from the standby as it is"
        );
        return Ok(Some(state));
    }
    let mut skipped = 0u64;
    let group = format!("{}-restore", shared.config.group_id());
    let done = esk_owner::restore::read_partition(&shared.kafka, &group, &topic, partition, from, stop, |_, value| {
        match value.map(serde_json::from_slice::<StreamRecord>) {
            Some(Ok(rec)) => {
                state.streams.insert(rec.stream.clone(), rec);
            }
            // A tombstone or a record of another shape: not the writer's, skip it.
            _ => skipped += 1,
        }
    })?;
    if !done {
        return Ok(None);
    }
    if skipped > 0 {
        tracing::warn!(partition, skipped, "restore skipped records that are not stream records");
    }
    metrics::histogram!("esk_writer_restore_seconds").record(started.elapsed().as_secs_f64());
    tracing::info!(
        partition,
        from_standby,
        from_offset = from,
        streams = state.streams.len(),
        ms = started.elapsed().as_millis() as u64,
        "partition restored"
    );
    Ok(Some(state))
}
