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
/// Set on a parked copy cut to fit: the original record's size in bytes. A
/// truncated copy cannot be replayed; its origin says where the whole one is.
pub const DLQ_TRUNCATED: &str = "esk_dlq_truncated";

/// Where a parked record came from.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// A record for a dead-letter topic.
#[derive(Debug)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: OwnedHeaders,
    /// The original did not fit: this is a cut copy.
    pub truncated: bool,
}

/// Bytes a record takes on the wire, near enough (key, value, headers).
pub fn record_bytes(key: Option<&[u8]>, value: Option<&[u8]>, headers: &HeaderList) -> usize {
    let h: usize = headers.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 8).sum();
    key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len) + h + 64
}

/// The dead letter of a record: the original key, value and headers, then
/// the reason, the origin and the consumer that parked it. When the whole
/// would exceed `limit` bytes (a record near the broker's limit, which a
/// producer cannot send again with headers added), it is a cut copy: the first
/// [`esk_wire::limits::TRUNCATED_VALUE_BYTES`] of the value, the first KiB of
/// the key, none of the original headers, and [`DLQ_TRUNCATED`] with the
/// original size. Either way it fits, so parking never fails for size.
pub fn dead_letter(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    original: &HeaderList,
    reason: &str,
    origin: Origin<'_>,
    consumer: &str,
    limit: usize,
) -> DeadLetter {
    use esk_wire::limits::{MAX_REASON_BYTES, TRUNCATED_VALUE_BYTES, shorten};
    let reason = shorten(reason, MAX_REASON_BYTES);
    let size = record_bytes(key, value, original);
    // Room for the added headers and for what compression adds to
    // incompressible bytes (lz4 and zstd: well under 1%).
    let whole = size + reason.len() + 4096 + size / 100 <= limit;
    let (key, value, kept, truncated) = if whole {
        (key.map(<[u8]>::to_vec), value.map(<[u8]>::to_vec), original.clone(), None)
    } else {
        let cut = |b: &[u8], n: usize| b[..b.len().min(n)].to_vec();
        (key.map(|k| cut(k, 1024)), value.map(|v| cut(v, TRUNCATED_VALUE_BYTES)), Vec::new(), Some(size.to_string()))
    };
    let (partition, offset) = (origin.partition.to_string(), origin.offset.to_string());
    let mut added = vec![
        (DLQ_REASON, reason.as_str()),
        (DLQ_TOPIC, origin.topic),
        (DLQ_PARTITION, partition.as_str()),
        (DLQ_OFFSET, offset.as_str()),
        (DLQ_CONSUMER, consumer),
    ];
    if let Some(size) = &truncated {
        added.push((DLQ_TRUNCATED, size.as_str()));
    }
    let headers = added.into_iter().fold(to_headers(&kept), |h, (k, v)| h.insert(Header { key: k, value: Some(v) }));
    DeadLetter { key, value, headers, truncated: truncated.is_some() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(h: &OwnedHeaders, name: &str) -> Option<String> {
        h.iter().find(|x| x.key == name).and_then(|x| x.value).map(|v| String::from_utf8_lossy(v).into_owned())
    }

    #[test]
    fn a_record_that_fits_is_parked_whole_and_one_that_does_not_is_cut() {
        let origin = Origin { topic: "t.commands", partition: 2, offset: 7 };
        let headers: HeaderList = vec![("h".into(), Some(b"v".to_vec()))];
        let small = dead_letter(Some(b"k"), Some(b"value"), &headers, "bad", origin, "writer", 1_000_000);
        assert!(!small.truncated);
        assert_eq!(small.value.as_deref(), Some(&b"value"[..]));
        assert_eq!(header(&small.headers, "h").as_deref(), Some("v"));
        assert_eq!(header(&small.headers, DLQ_OFFSET).as_deref(), Some("7"));
        let big = vec![b'x'; 1_040_000];
        let cut = dead_letter(Some(b"k"), Some(&big), &headers, &"r".repeat(5000), origin, "writer", 1_000_000);
        assert!(cut.truncated);
        assert_eq!(cut.value.as_ref().unwrap().len(), esk_wire::limits::TRUNCATED_VALUE_BYTES);
        assert_eq!(header(&cut.headers, "h"), None);
        assert!(header(&cut.headers, DLQ_TRUNCATED).unwrap().parse::<usize>().unwrap() > 1_040_000);
        assert!(header(&cut.headers, DLQ_REASON).unwrap().len() <= esk_wire::limits::MAX_REASON_BYTES + 3);
        let total: usize = cut.headers.iter().map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len)).sum::<usize>()
            + cut.value.as_ref().unwrap().len();
        assert!(total < 100_000, "{total}");
    }
}
