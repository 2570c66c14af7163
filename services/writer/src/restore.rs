//! Restoring one partition from the compacted state topic.
//!
//! Reads `state` partition p with `read_committed` from the beginning to the
//! high watermark. The caller has already fenced the previous owner, so no
//! transaction is open on the partition and the last stable offset is the high
//! watermark. Cost grows with the number of streams, not events.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use esk_wire::protocol::StreamRecord;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::Shared;
use crate::batch::PartitionState;

/// `None` when `stop` was set meanwhile.
pub fn restore(shared: &Shared, partition: i32, stop: &AtomicBool) -> Result<Option<PartitionState>> {
    let started = Instant::now();
    let topic = shared.topics.state();
    let consumer: BaseConsumer = shared
        .kafka
        .client()
        .set("group.id", format!("{}-restore", shared.config.group_id()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.max.bytes", "52428800")
        .set("fetch.wait.max.ms", "20")
        .create()?;
    let timeout = shared.config.kafka_timeout();
    let (low, high) = consumer.fetch_watermarks(&topic, partition, timeout)?;
    let mut state = PartitionState::new(partition);
    if high <= low {
        return Ok(Some(state));
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, partition, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut skipped = 0u64;
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => match m.payload().map(serde_json::from_slice::<StreamRecord>) {
                Some(Ok(rec)) => {
                    state.streams.insert(rec.stream.clone(), rec);
                }
                // A tombstone or a record of another shape: not the writer's, skip it.
                _ => skipped += 1,
            },
            Some(Err(e)) => tracing::warn!(partition, "restore: {e}"),
            None => {}
        }
        let position =
            consumer.position()?.find_partition(&topic, partition).and_then(|p| p.offset().to_raw()).unwrap_or(0);
        // Offsets are not contiguous (transaction markers take some): caught up
        // means position >= high watermark.
        if position >= high {
            break;
        }
        if Instant::now() > deadline {
            bail!("restoring {topic}/{partition} did not reach offset {high} in 10 minutes (at {position})");
        }
    }
    if skipped > 0 {
        tracing::warn!(partition, skipped, "restore skipped records that are not stream records");
    }
    metrics::histogram!("esk_writer_restore_seconds").record(started.elapsed().as_secs_f64());
    tracing::info!(
        partition,
        streams = state.streams.len(),
        records_to = high,
        ms = started.elapsed().as_millis() as u64,
        "partition restored"
    );
    Ok(Some(state))
}
