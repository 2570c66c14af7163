//! Records as esk passes them around, and the headers of dead letters.

use rdkafka::Message;
use rdkafka::message::{Header, Headers, OwnedHeaders};

/// Headers as owned `(name, value)` pairs.
pub type HeaderList = Vec<(String, Option<Vec<u8>>)>;

/// A consumed message's headers, owned.
pub fn headers_of(m: &impl Message) -> HeaderList {
    m.headers().map(|h| h.iter().map(|x| (x.key.to_owned(), x.value.map(<[u8]>::to_vec))).collect()).unwrap_or_default()
}

/// Kafka headers from owned pairs.
pub fn to_headers(list: &HeaderList) -> OwnedHeaders {
    list.iter().fold(OwnedHeaders::new(), |h, (k, v)| h.insert(Header { key: k, value: v.as_deref() }))
}

/// Header names of a parked record: why, and where it came from.
pub const DLQ_REASON: &str = "esk_dlq_reason";
pub const DLQ_TOPIC: &str = "esk_dlq_topic";
pub const DLQ_PARTITION: &str = "esk_dlq_partition";
pub const DLQ_OFFSET: &str = "esk_dlq_offset";
pub const DLQ_CONSUMER: &str = "esk_dlq_consumer";

/// Where a parked record came from.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// The headers of a dead letter: the original ones, then the reason, the
/// origin and the consumer that parked it.
pub fn dead_letter_headers(original: &HeaderList, reason: &str, origin: Origin<'_>, consumer: &str) -> OwnedHeaders {
    let (partition, offset) = (origin.partition.to_string(), origin.offset.to_string());
    [
        (DLQ_REASON, reason),
        (DLQ_TOPIC, origin.topic),
        (DLQ_PARTITION, partition.as_str()),
        (DLQ_OFFSET, offset.as_str()),
        (DLQ_CONSUMER, consumer),
    ]
    .into_iter()
    .fold(to_headers(original), |h, (k, v)| h.insert(Header { key: k, value: Some(v) }))
}
