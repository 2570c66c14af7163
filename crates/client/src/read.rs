//! Reading one stream without scanning its category topic.
//!
//! The writer keeps, per stream, an index of where each append's events start
//! in the category partition (the latest 32 entries in the stream's record,
//! the older ones on index pages of the state topic; records written before
//! pages may have merged runs). A read asks the writer for the head with the
//! index from the version it wants, then fetches each run from its offset,
//! skipping the other streams' events between runs.

use std::sync::{Arc, Mutex};
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
///
/// The writer's index has an entry per append (older ones on index pages),
/// so each run is fetched from its own offset; up to [`READERS`] consumers
/// fetch contiguous parts of the index at once.
pub async fn read_stream(
    client: &Client,
    stream: &str,
    from: u64,
    schemas: Arc<SchemaRegistry>,
) -> Result<Vec<ReadEvent>, ClientError> {
    Ok(read_range(client, stream, from, u64::MAX, schemas).await?.events)
}

/// A page of a stream: at most `max` events from version `from` on, and the
/// stream's version when it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub events: Vec<ReadEvent>,
    /// The stream's last version (0: no events) as the writer answered.
    pub version: u64,
}

/// [`read_stream`] of at most `max` events: a page.
pub async fn read_range(
    client: &Client,
    stream: &str,
    from: u64,
    max: u64,
    schemas: Arc<SchemaRegistry>,
) -> Result<Page, ClientError> {
    let from = from.max(1);
    let head = client.head_from(stream, from).await?;
    let version = head.version;
    if head.version < from || max == 0 {
        return Ok(Page { events: Vec::new(), version });
    }
    let (last, partition) = (head.version.min(from.saturating_add(max - 1)), head.partition);
    // Entries past `last` start runs this page does not read: once one is
    // seen, the index of every run it reads is known.
    let mut index = head.index;
    let mut more = head.more && index.last().is_none_or(|e| e.version <= last);
    index.retain(|e| e.version <= last);
    while more {
        let after = index.last().map_or(from, |e| e.version);
        let next = client.head_from(stream, after).await?;
        let before = index.len();
        let past = next.index.last().is_some_and(|e| e.version > last);
        index.extend(next.index.into_iter().filter(|e| e.version > after && e.version <= last));
        more = next.more && !past && index.last().is_some_and(|e| e.version < last);
        if more && index.len() == before {
            return Err(ClientError::Internal(format!(
                "{stream}: the writer's index does not go on after version {after}"
            )));
        }
    }
    let topic = client.topics().events(stream.split_once('-').map_or("", |(c, _)| c));
    let config = client.kafka().clone();
    // Contiguous parts of the index, each with the versions it holds.
    let readers = (index.len() / RUNS_PER_READER).clamp(1, READERS);
    let per = index.len().div_ceil(readers).max(1);
    let parts: Vec<(Vec<IndexEntry>, u64, u64)> = index
        .chunks(per)
        .enumerate()
        .map(|(i, chunk)| {
            let first = if i == 0 { from } else { chunk[0].version };
            let end = index.get((i + 1) * per).map_or(last, |next| next.version - 1);
            (chunk.to_vec(), first, end)
        })
        .collect();
    let pool = client.point_readers.clone();
    let tasks: Vec<_> = parts
        .into_iter()
        .map(|(entries, first, end)| {
            let (config, topic, stream, schemas) = (config.clone(), topic.clone(), stream.to_owned(), schemas.clone());
            let pool = pool.clone();
            tokio::task::spawn_blocking(move || {
                let consumer = match pool.take() {
                    Some(c) => c,
                    None => config.point_reader("esk-read").create()?,
                };
                let part =
                    fetch_runs(&consumer, &topic, partition, &stream, &entries, first, end, config.timeout, &schemas);
                // Reused only after a clean read (nothing left assigned).
                match part.is_ok() && consumer.unassign().is_ok() {
                    true => pool.give(consumer),
                    false => esk_kafka::destroy_later(consumer),
                }
                part
            })
        })
        .collect();
    let mut out = Vec::with_capacity((last + 1 - from) as usize);
    for task in tasks {
        let part = task.await.map_err(|e| ClientError::Internal(format!("the reader panicked: {e}")))??;
        out.extend(part);
    }
    Ok(Page { events: out, version })
}

/// Idle consumers of [`read_stream`], at most [`READERS`]: a read takes
/// them instead of connecting anew, and gives them back.
#[derive(Clone, Default)]
pub(crate) struct Pool(Arc<Mutex<Idle>>);

#[derive(Default)]
struct Idle {
    consumers: Vec<BaseConsumer>,
    closed: bool,
}

impl Pool {
    fn take(&self) -> Option<BaseConsumer> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).consumers.pop()
    }

    fn give(&self, consumer: BaseConsumer) {
        let mut idle = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if idle.closed || idle.consumers.len() >= READERS {
            esk_kafka::destroy_later(consumer);
        } else {
            idle.consumers.push(consumer);
        }
    }

    /// Destroys the idle consumers (off the caller's thread) and keeps none
    /// from now on: the client is going away.
    pub(crate) fn close(&self) {
        let mut idle = self.0.lock().unwrap_or_else(|p| p.into_inner());
        idle.closed = true;
        for c in idle.consumers.drain(..) {
            esk_kafka::destroy_later(c);
        }
    }
}

/// Consumers a read uses at most, each with its own connection.
pub const READERS: usize = 4;
/// Index entries below which a read uses one consumer fewer.
const RUNS_PER_READER: usize = 16;
/// A run starting this many offsets or fewer after the last record read is
/// reached by reading on; farther, by a seek.
const SEEK_GAP: i64 = 256;

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
    let mut read_to: Option<i64> = None;
    for (i, entry) in index.iter().enumerate() {
        // Versions this run (up to the next entry) holds.
        let run_end = index.get(i + 1).map_or(last, |next| next.version - 1);
        if run_end < want {
            continue;
        }
        if read_to.is_none_or(|o| entry.offset > o + SEEK_GAP || entry.offset <= o) {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, partition, Offset::Offset(entry.offset))?;
            consumer.assign(&tpl)?;
        }
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
            read_to = Some(m.offset());
            if m.key() != Some(stream.as_bytes()) {
                continue;
            }
            // A record with the stream's key that is no esk event (another
            // producer's) is not one of its events: the writer's follow it,
            // and their versions say whether any is missing.
            let e = match decode(&m, schemas) {
                Ok(e) => e,
                Err(why) => {
                    tracing::debug!("{topic}/{partition}@{}: skipping a record of {stream}'s key: {why}", m.offset());
                    continue;
                }
            };
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

#[cfg(test)]
mod tests {
    use super::*;
    use esk_kafka::KafkaConfig;

    #[test]
    fn the_pool_keeps_at_most_readers_and_none_once_closed() {
        // Creating a consumer connects to nothing until it is used.
        let config = KafkaConfig::new("127.0.0.1:1", Duration::from_secs(1)).unwrap();
        let consumer = || -> BaseConsumer { config.point_reader("esk-read").create().unwrap() };
        let pool = Pool::default();
        assert!(pool.take().is_none());
        for _ in 0..READERS + 2 {
            pool.give(consumer());
        }
        let mut taken = Vec::new();
        while let Some(c) = pool.take() {
            taken.push(c);
        }
        assert_eq!(taken.len(), READERS);
        taken.into_iter().for_each(|c| pool.give(c));
        pool.close();
        assert!(pool.take().is_none(), "closed: nothing idle");
        pool.give(consumer());
        assert!(pool.take().is_none(), "closed: nothing kept");
    }
}
