//! Reading one stream without scanning its category topic.
//!
//! The writer keeps, per stream, an index of where runs of its events start in
//! the category partition (one entry per append, merged beyond 32). A read asks
//! the writer for the head, then fetches each run from its offset, skipping the
//! other streams' events between runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use esk_wire::protocol::{IndexEntry, Position};
use esk_wire::{Event, SchemaRegistry};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::{Client, ClientError};

/// An event read back, with where it is in the log.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadEvent {
    pub event: Event,
    pub position: Position,
}

/// Decodes a consumed record into an event (upcast to the current schema).
pub fn decode(m: &impl Message, schemas: &SchemaRegistry) -> Result<ReadEvent, String> {
    let headers: Vec<(&str, Option<&[u8]>)> =
        m.headers().map(|h| h.iter().map(|x| (x.key, x.value)).collect()).unwrap_or_default();
    let mut event = Event::decode(headers, m.payload()).map_err(|e| e.to_string())?;
    let (data, schema) = schemas.upcast(event.data_schema.as_deref(), event.data.clone())?;
    event.data = data;
    event.data_schema = schema;
    let category = event.stream.category().to_owned();
    Ok(ReadEvent { event, position: Position { category, partition: m.partition(), offset: m.offset() } })
}

/// The events of `stream` from version `from` on, in order.
pub async fn read_stream(
    client: &Client,
    stream: &str,
    from: u64,
    schemas: Arc<SchemaRegistry>,
) -> Result<Vec<ReadEvent>, ClientError> {
    let head = client.head(stream).await?;
    let from = from.max(1);
    if head.version < from {
        return Ok(Vec::new());
    }
    let topic = client.topics().events(stream.split_once('-').map_or("", |(c, _)| c));
    let config = client.kafka().clone();
    let stream = stream.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.committed_reader("esk-read", Duration::from_millis(10)).create()?;
        fetch_runs(
            &consumer,
            &topic,
            head.partition,
            &stream,
            &head.index,
            from,
            head.version,
            config.timeout,
            &schemas,
        )
    })
    .await
    .map_err(|e| ClientError::Internal(format!("the reader panicked: {e}")))?
}

#[allow(clippy::too_many_arguments)]
fn fetch_runs(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    stream: &str,
    index: &[IndexEntry],
    from: u64,
    last: u64,
    timeout: Duration,
    schemas: &SchemaRegistry,
) -> Result<Vec<ReadEvent>, ClientError> {
    let mut out: Vec<ReadEvent> = Vec::with_capacity((last + 1 - from) as usize);
    let deadline = Instant::now() + timeout.max(Duration::from_secs(10)) * 3;
    let mut want = from;
    for (i, entry) in index.iter().enumerate() {
        // Versions this run (up to the next entry) holds.
        let run_end = index.get(i + 1).map_or(last, |next| next.version - 1);
        if run_end < want {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(entry.offset))?;
        consumer.assign(&tpl)?;
        while want <= run_end {
            if Instant::now() > deadline {
                return Err(ClientError::Unavailable(format!(
                    "reading {stream} from {topic}/{partition} timed out at version {want}"
                )));
            }
            let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let m = m?;
            if m.key() != Some(stream.as_bytes()) {
                continue;
            }
            let e = decode(&m, schemas).map_err(|e| {
                ClientError::Internal(format!("{topic}/{partition}@{}: undecodable event of {stream}: {e}", m.offset()))
            })?;
            if e.event.version < want {
                continue;
            }
            if e.event.version != want {
                return Err(ClientError::Internal(format!(
                    "{stream}: expected version {want} at {topic}/{partition}@{}, found {}",
                    m.offset(),
                    e.event.version
                )));
            }
            want += 1;
            out.push(e);
        }
    }
    if want <= last {
        return Err(ClientError::Internal(format!(
            "{stream}: the index ends before version {last} (read up to {})",
            want - 1
        )));
    }
    Ok(out)
}
