//! Reading one partition of a compacted topic to its end: how an owner
//! restores what the previous owner committed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use esk_kafka::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

/// Calls `each(key, value)` for every record of `topic`/`partition` from
/// offset `from` (0: the beginning) up to its
/// high watermark, read with `read_committed`. Call it after fencing: then no
/// transaction is open on the partition and the last stable offset is the high
/// watermark. Returns `false` when `stop` was set meanwhile.
pub fn read_partition(
    kafka: &KafkaConfig,
    group: &str,
    topic: &str,
    partition: i32,
    from: i64,
    stop: &AtomicBool,
    mut each: impl FnMut(Option<&[u8]>, Option<&[u8]>),
) -> Result<bool> {
    let consumer: BaseConsumer = kafka
        .client()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.max.bytes", "52428800")
        .set("fetch.wait.max.ms", "20")
        .create()?;
    let (low, high) = esk_kafka::watermarks(consumer.client(), topic, partition, kafka.timeout)?;
    if high <= low.max(from) {
        return Ok(true);
    }
    let mut tpl = TopicPartitionList::new();
    let start = if from > low { Offset::Offset(from) } else { Offset::Beginning };
    tpl.add_partition_offset(topic, partition, start)?;
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(false);
        }
        // Short polls: a poll that serves only a transaction marker returns
        // nothing but waits out its timeout, and the end is often a marker.
        match consumer.poll(Duration::from_millis(20)) {
            Some(Ok(m)) => each(m.key(), m.payload()),
            Some(Err(e)) => tracing::warn!(topic, partition, "restore: {e}"),
            None => {}
        }
        let position =
            consumer.position()?.find_partition(topic, partition).and_then(|p| p.offset().to_raw()).unwrap_or(0);
        // Offsets are not contiguous (transaction markers take some): caught up
        // means position >= high watermark.
        if position >= high {
            return Ok(true);
        }
        if Instant::now() > deadline {
            bail!("restoring {topic}/{partition} did not reach offset {high} in 10 minutes (at {position})");
        }
    }
}
