//! Reading one partition of a topic to its end: how an owner restores what
//! the previous owner committed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::{Error, KafkaConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

/// Why a read did not reach the end.
#[derive(Debug, thiserror::Error)]
pub enum ReadError<E> {
    #[error(transparent)]
    Kafka(#[from] Error),
    /// What the caller did with a record failed.
    #[error("{0}")]
    Each(E),
}

/// A record as a restore reads it.
#[derive(Debug, Clone, Copy)]
pub struct Read<'a> {
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
}

/// Calls `each` for every record of `topic`/`partition` from offset `from`
/// (0: the beginning) up to its high watermark, read with `read_committed`.
/// Call it after fencing: then no transaction is open on the partition and
/// the last stable offset is the high watermark. Returns the offset it read
/// up to (the high watermark it found), or `None` when `stop` was set
/// meanwhile; an error of `each` ends it.
pub fn read_partition<E>(
    kafka: &KafkaConfig,
    group: &str,
    topic: &str,
    partition: i32,
    from: i64,
    stop: &AtomicBool,
    mut each: impl FnMut(Read<'_>) -> Result<(), E>,
) -> Result<Option<i64>, ReadError<E>> {
    let consumer: BaseConsumer = kafka.bulk_reader(group).create().map_err(|e| ReadError::Kafka(e.into()))?;
    let kafka_error = |e: rdkafka::error::KafkaError| ReadError::Kafka(e.into());
    let (low, high) = crate::watermarks(consumer.client(), topic, partition, kafka.timeout).map_err(kafka_error)?;
    if high <= low.max(from) {
        return Ok(Some(high));
    }
    let mut tpl = TopicPartitionList::new();
    let start = if from > low { Offset::Offset(from) } else { Offset::Beginning };
    tpl.add_partition_offset(topic, partition, start).map_err(kafka_error)?;
    consumer.assign(&tpl).map_err(kafka_error)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        // Short polls: a poll that serves only a transaction marker returns
        // nothing but waits out its timeout, and the end is often a marker.
        match consumer.poll(Duration::from_millis(20)) {
            Some(Ok(m)) => each(Read {
                key: m.key(),
                value: m.payload(),
                offset: m.offset(),
                timestamp_ms: m.timestamp().to_millis(),
            })
            .map_err(ReadError::Each)?,
            Some(Err(e)) => tracing::warn!(topic, partition, "restore: {e}"),
            None => {}
        }
        let position = consumer
            .position()
            .map_err(kafka_error)?
            .find_partition(topic, partition)
            .and_then(|p| p.offset().to_raw())
            .unwrap_or(0);
        // Offsets are not contiguous (transaction markers take some): caught up
        // means position >= high watermark.
        if position >= high {
            return Ok(Some(high));
        }
        if Instant::now() > deadline {
            return Err(ReadError::Kafka(Error::Invalid(format!(
                "reading {topic}/{partition} did not reach offset {high} in 10 minutes (at {position})"
            ))));
        }
    }
}

/// Calls `each` for every record of every partition of `topic`, from
/// `from(partition)` (`None`: the beginning) up to the high watermark each had
/// when the read began, with `read_committed`, within `limit`. A topic that
/// does not exist has nothing to read; one the principal may not describe
/// is [`Error::Authorization`]. Short polls: the end is often a
/// transaction marker, which a poll serves without returning a record.
pub fn read_topic<E>(
    kafka: &KafkaConfig,
    group: &str,
    topic: &str,
    from: impl Fn(i32) -> Option<i64>,
    limit: Duration,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Result<(), E>,
) -> Result<(), ReadError<E>> {
    let kafka_error = |e: rdkafka::error::KafkaError| ReadError::Kafka(e.into());
    let consumer: BaseConsumer =
        kafka.committed_reader(group, Duration::from_millis(20)).create().map_err(kafka_error)?;
    let md = consumer.fetch_metadata(Some(topic), kafka.timeout).map_err(|e| ReadError::Kafka(kafka.unavailable(e)))?;
    if let Some(refused) = crate::error::topic_refused(&md, topic) {
        return Err(ReadError::Kafka(refused));
    }
    let Some(t) = md.topics().first().filter(|t| t.error().is_none() && !t.partitions().is_empty()) else {
        return Ok(());
    };
    let mut tpl = TopicPartitionList::new();
    let mut ends = Vec::new();
    for p in t.partitions() {
        let (_, high) = crate::watermarks(consumer.client(), topic, p.id(), kafka.timeout).map_err(kafka_error)?;
        let start = from(p.id());
        if high > start.unwrap_or(0) {
            ends.push((p.id(), high));
            tpl.add_partition_offset(topic, p.id(), start.map_or(Offset::Beginning, Offset::Offset))
                .map_err(kafka_error)?;
        }
    }
    if ends.is_empty() {
        return Ok(());
    }
    consumer.assign(&tpl).map_err(kafka_error)?;
    let deadline = Instant::now() + limit;
    loop {
        let pos = consumer.position().map_err(kafka_error)?;
        let done = ends.iter().all(|(p, high)| {
            pos.find_partition(topic, *p).and_then(|e| e.offset().to_raw()).is_some_and(|o| o >= *high)
        });
        if done {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(ReadError::Kafka(Error::Invalid(format!(
                "reading {topic} did not reach its end in {limit:?}"
            ))));
        }
        match consumer.poll(Duration::from_millis(20)) {
            Some(Ok(m)) => each(&m).map_err(ReadError::Each)?,
            Some(Err(e)) => tracing::debug!(topic, "read: {e}"),
            None => {}
        }
    }
}
