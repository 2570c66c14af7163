//! Applied positions against the high watermarks.

use std::time::Duration;

use esk_kafka::KafkaConfig;
use esk_runtime::sample::Sampled;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;

use super::Positions;

/// Where a follower stands in one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lag {
    pub topic: String,
    pub partition: i32,
    /// The next offset to apply (or where the consumer stood when idle, if
    /// further: transaction markers take offsets).
    pub next_offset: i64,
    pub high_watermark: i64,
    /// Records (transaction markers included) not applied yet.
    pub lag_records: i64,
    /// 0 when caught up, else how old the last applied record is.
    pub lag_ms: i64,
}

/// What the sampler needs of a follower: what it applied and when the last
/// applied record of each partition was written, and where its consumer
/// stood when idle.
#[derive(Debug)]
pub struct Source {
    pub applied: Positions,
    pub last_ms: Positions,
    pub idle: Positions,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Every partition of `topics` against its high watermark; `None` when Kafka
/// does not answer (so an unreachable broker never reads as caught up). A
/// topic that does not exist yet has nothing to lag behind.
pub fn measure(consumer: &BaseConsumer, topics: &[String], timeout: Duration, source: &Source) -> Option<Vec<Lag>> {
    let now = now_ms();
    let mut out = Vec::new();
    for topic in topics {
        let md = consumer.fetch_metadata(Some(topic), timeout).ok()?;
        let Some(t) = md.topics().first().filter(|t| t.error().is_none()) else {
            continue;
        };
        for p in t.partitions() {
            let (_, high) = esk_kafka::watermarks(consumer.client(), topic, p.id(), timeout).ok()?;
            let key = (topic.clone(), p.id());
            // Transaction markers take offsets: where the consumer stood when
            // idle counts as caught up.
            let next = source.applied.get(&key).copied().unwrap_or(0).max(source.idle.get(&key).copied().unwrap_or(0));
            let lag_records = (high - next).max(0);
            let lag_ms = if lag_records == 0 { 0 } else { source.last_ms.get(&key).map_or(0, |t| (now - t).max(0)) };
            out.push(Lag {
                topic: topic.clone(),
                partition: p.id(),
                next_offset: next,
                high_watermark: high,
                lag_records,
                lag_ms,
            });
        }
    }
    Some(out)
}

/// Samples the lag of `topics` once a second on a thread named after
/// `name`, with a metadata client of its own (`<group>-watermarks`); reading
/// the sample never waits on Kafka. `source` is called for each sample.
pub fn sample(
    kafka: &KafkaConfig,
    group: &str,
    name: &str,
    topics: Vec<String>,
    source: impl Fn() -> Source + Send + 'static,
) -> Result<Sampled<Option<Vec<Lag>>>, esk_kafka::Error> {
    let consumer: BaseConsumer = kafka.metadata(&format!("{group}-watermarks")).create()?;
    let timeout = kafka.timeout.min(Duration::from_secs(5));
    Ok(esk_runtime::sample::spawn(&format!("lag-{name}"), Duration::from_secs(1), move || {
        measure(&consumer, &topics, timeout, &source())
    }))
}
