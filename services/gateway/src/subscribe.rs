//! Live subscriptions: a category's events (or every category's) as
//! Server-Sent Events, resumable exactly where they stopped.
//!
//! Each subscription has its own reader (`read_committed`, by assignment, no
//! group) on a thread of its own, which hands events to the HTTP response
//! through a bounded channel: a slow client makes its reader wait
//! (back-pressure), with at most [`BUFFERED`] events and the reader's
//! prefetch ([`esk_kafka::config::SUBSCRIPTION_PREFETCH_KB`]) held for it.
//!
//! Every event's SSE `id` is a [`Cursor`]: for every partition of every
//! topic subscribed, the offset of the next event to send. A client that
//! reconnects with `Last-Event-ID` (or `from=<cursor>`) gets exactly the
//! events after the last one it received, in order per partition, so per
//! stream, whatever happened to the gateway meanwhile: no gap, no duplicate.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use esk_client::decode;
use esk_kafka::KafkaConfig;
use esk_wire::protocol::Position;
use esk_wire::{SchemaRegistry, Topics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;

/// Events a subscription holds for a slow client before its reader waits.
pub const BUFFERED: usize = 256;
/// How often a subscription looks for new categories and partitions.
const DISCOVER_EVERY: Duration = Duration::from_secs(2);
/// Longest cursor accepted (a `Last-Event-ID` or `from=`), in bytes.
pub const MAX_CURSOR_BYTES: usize = 64 * 1024;

/// Where a subscription is: per category, per partition, the offset of the
/// next event to send. Text: `<category>:<partition>=<offset>,...;<category>:...`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor(pub BTreeMap<String, BTreeMap<i32, i64>>);

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (category, partitions)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(";")?;
            }
            write!(f, "{category}:")?;
            for (j, (p, o)) in partitions.iter().enumerate() {
                if j > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{p}={o}")?;
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for Cursor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "'{}' is not a subscription cursor ({why}); it is the `id` of an event a subscription sent",
                esk_wire::limits::shorten(s, 120)
            )
        };
        if s.len() > MAX_CURSOR_BYTES {
            return Err(bad("too long"));
        }
        let mut out = BTreeMap::new();
        for part in s.split(';').filter(|p| !p.is_empty()) {
            let (category, offsets) = part.split_once(':').ok_or_else(|| bad("a category needs ':'"))?;
            if !esk_wire::stream::is_valid_category(category) {
                return Err(bad("not a category name"));
            }
            let mut partitions = BTreeMap::new();
            for po in offsets.split(',').filter(|x| !x.is_empty()) {
                let (p, o) = po.split_once('=').ok_or_else(|| bad("a partition needs '='"))?;
                let p: i32 = p.parse().map_err(|_| bad("a partition is a whole number"))?;
                let o: i64 = o.parse().map_err(|_| bad("an offset is a whole number"))?;
                if !(0..=100_000).contains(&p) || o < 0 {
                    return Err(bad("out of range"));
                }
                partitions.insert(p, o);
            }
            if out.insert(category.to_owned(), partitions).is_some() {
                return Err(bad("a category appears twice"));
            }
        }
        Ok(Cursor(out))
    }
}

/// Where a subscription starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum From {
    /// Every event kept.
    Start,
    /// Events written from now on.
    End,
    /// Right after the events a cursor says were sent; partitions and
    /// categories it does not name (new since) from their start.
    Cursor(Cursor),
    /// After a write's position token: that partition after its offset,
    /// every other one from that event's time on.
    Position(Position),
}

impl From {
    /// `start`, `end`, a cursor or a position token.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "start" => Ok(From::Start),
            "end" | "now" => Ok(From::End),
            t if !t.contains('=') && t.matches(':').count() == 2 => t.parse().map(From::Position),
            t => t.parse().map(From::Cursor),
        }
    }
}

/// What one subscription reads.
#[derive(Debug, Clone)]
pub struct Spec {
    /// One category, or every one (`None`).
    pub category: Option<String>,
    pub from: From,
    /// Ends after this many events.
    pub limit: Option<u64>,
}

/// One event or a note for the client, as the response sends it.
#[derive(Debug)]
pub enum Item {
    /// Where the subscription starts: an id before any event, so that a
    /// client that reconnects before the first event resumes from here.
    Start(String),
    Event {
        id: String,
        data: String,
    },
    /// A record that is not an esk event, skipped (an SSE comment).
    Skipped(String),
}

/// Why a subscription could not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Its `from` names no event of this installation, or it is too large.
    Invalid(String),
    /// Kafka did not answer.
    Unavailable(String),
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::Invalid(m) | Refused::Unavailable(m) => f.write_str(m),
        }
    }
}

fn kafka(what: impl fmt::Display, e: impl fmt::Display) -> Refused {
    Refused::Unavailable(format!("Kafka: {what}: {e}"))
}

/// Partitions one subscription reads at most: its cursor names each (about
/// 12 bytes a partition, in every event's id).
pub const MAX_PARTITIONS: usize = 4096;

/// Starts a subscription's reader: where it starts is fixed before this
/// returns (so `from=end` means the end when the client asked), and the
/// first item sent is that start ([`Item::Start`]); then it runs on a thread
/// of its own, holding `slot`, until the client leaves (its channel closes),
/// the limit is reached, or `stop`. Blocking.
pub fn spawn(
    config: &KafkaConfig,
    topics: &Topics,
    schemas: Arc<SchemaRegistry>,
    spec: Spec,
    stop: Arc<AtomicBool>,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> Result<mpsc::Receiver<Item>, Refused> {
    if let From::Cursor(c) = &spec.from {
        if c.0.is_empty() {
            return Err(Refused::Invalid("an empty cursor: give the `id` of an event a subscription sent".into()));
        }
        if let Some(category) = &spec.category
            && let Some(other) = c.0.keys().find(|k| *k != category)
        {
            return Err(Refused::Invalid(format!(
                "the cursor names category {other}: it is not from a subscription to {category}"
            )));
        }
    }
    let consumer: BaseConsumer = config
        .subscription_reader(&format!("{}-gateway", topics.prefix()))
        .create()
        .map_err(|e| kafka("a reader", e))?;
    let (tx, rx) = mpsc::channel(BUFFERED);
    let cursor = match &spec.from {
        From::Cursor(c) => c.clone(),
        _ => Cursor::default(),
    };
    let mut reader = Reader {
        consumer,
        topics: topics.clone(),
        spec,
        schemas,
        timeout: config.timeout,
        cursor,
        tpl: TopicPartitionList::new(),
        tx,
        stop,
        sent: 0,
        notes: Vec::new(),
    };
    if let Err(e) = reader.discover(true) {
        esk_kafka::destroy_later(reader.consumer);
        return Err(e);
    }
    // The start, then what the start found (gaps), before any event.
    let _ = reader.tx.try_send(Item::Start(reader.cursor.to_string()));
    for note in std::mem::take(&mut reader.notes) {
        let _ = reader.tx.try_send(Item::Skipped(note));
    }
    std::thread::Builder::new()
        .name("esk-subscription".into())
        .spawn(move || {
            let _slot = slot;
            metrics::gauge!("esk_gateway_subscriptions").increment(1.0);
            if let Err(e) = reader.run() {
                tracing::info!("a subscription ended: {e}");
                let _ = reader.tx.blocking_send(Item::Skipped(format!("the subscription ended: {e}")));
            }
            metrics::gauge!("esk_gateway_subscriptions").decrement(1.0);
            esk_kafka::destroy_later(reader.consumer);
        })
        .map_err(|e| Refused::Unavailable(e.to_string()))?;
    Ok(rx)
}

struct Reader {
    consumer: BaseConsumer,
    topics: Topics,
    spec: Spec,
    schemas: Arc<SchemaRegistry>,
    timeout: Duration,
    /// Next offset to send per partition: what each event's id says (from
    /// the cursor given, whatever is not assigned yet included).
    cursor: Cursor,
    tpl: TopicPartitionList,
    tx: mpsc::Sender<Item>,
    stop: Arc<AtomicBool>,
    sent: u64,
    /// What the first look found for the client (a gap), sent after the start.
    notes: Vec<String>,
}

impl Reader {
    fn done(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.tx.is_closed() || self.spec.limit.is_some_and(|l| self.sent >= l)
    }

    fn run(&mut self) -> Result<(), Refused> {
        let mut looked = Instant::now();
        while !self.done() {
            // New categories, a category's topic made since, more partitions.
            if looked.elapsed() >= DISCOVER_EVERY {
                looked = Instant::now();
                self.discover(false)?;
                for note in std::mem::take(&mut self.notes) {
                    if self.tx.blocking_send(Item::Skipped(note)).is_err() {
                        return Ok(());
                    }
                }
            }
            let Some(m) = self.consumer.poll(Duration::from_millis(100)) else { continue };
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!("subscription: {e}");
                    continue;
                }
            };
            let Some(category) = m.topic().strip_prefix(&self.topics.events_prefix()).map(str::to_owned) else {
                continue;
            };
            let (partition, offset) = (m.partition(), m.offset());
            // A record before what the cursor says was sent (a fetch that
            // raced a seek) is not sent again.
            let next = self.cursor.0.get(&category).and_then(|c| c.get(&partition)).copied().unwrap_or(0);
            if offset < next {
                continue;
            }
            self.cursor.0.entry(category).or_default().insert(partition, offset + 1);
            let item = match decode(&m, &self.schemas) {
                Ok(e) => {
                    let data = serde_json::to_string(&crate::api::EventDoc::of(&e))
                        .map_err(|e| Refused::Unavailable(e.to_string()))?;
                    self.sent += 1;
                    Item::Event { id: self.cursor.to_string(), data }
                }
                Err(why) => {
                    metrics::counter!("esk_gateway_subscription_skipped_total").increment(1);
                    Item::Skipped(format!("skipped {}/{partition}@{offset}: not an esk event: {why}", m.topic()))
                }
            };
            if self.tx.blocking_send(item).is_err() {
                break;
            }
            metrics::counter!("esk_gateway_subscription_events_total").increment(1);
        }
        Ok(())
    }

    /// Assigns the partitions of the categories subscribed that are not yet
    /// assigned, from where the subscription starts (at the first look) or
    /// from their start (categories and partitions new since).
    fn discover(&mut self, first: bool) -> Result<(), Refused> {
        let md = self
            .consumer
            .fetch_metadata(self.spec.category.as_deref().map(|c| self.topics.events(c)).as_deref(), self.timeout)
            .map_err(|e| kafka("metadata", e))?;
        let prefix = self.topics.events_prefix();
        let mut added = Vec::new();
        for t in md.topics() {
            let Some(category) = t.name().strip_prefix(&prefix) else { continue };
            if t.error().is_some() || !esk_wire::stream::is_valid_category(category) {
                continue;
            }
            if self.spec.category.as_deref().is_some_and(|c| c != category) {
                continue;
            }
            for p in t.partitions() {
                if self.tpl.find_partition(t.name(), p.id()).is_none() {
                    added.push((category.to_owned(), t.name().to_owned(), p.id()));
                }
            }
        }
        if added.is_empty() {
            return Ok(());
        }
        if self.tpl.count() + added.len() > MAX_PARTITIONS {
            let why = format!(
                "the subscription would read {} partitions; at most {MAX_PARTITIONS} (subscribe to fewer categories)",
                self.tpl.count() + added.len()
            );
            if first {
                return Err(Refused::Invalid(why));
            }
            self.notes.push(format!("not following new partitions: {why}"));
            return Ok(());
        }
        let starts = self.starts(&added, first)?;
        for ((category, topic, p), next) in added.iter().zip(starts) {
            self.cursor.0.entry(category.clone()).or_default().insert(*p, next);
            self.tpl.add_partition_offset(topic, *p, Offset::Offset(next)).map_err(|e| kafka(topic, e))?;
        }
        // Keep what is assigned where it is.
        let positions = self.consumer.position().unwrap_or_default();
        for e in positions.elements() {
            if let Offset::Offset(n) = e.offset()
                && added.iter().all(|(_, t, p)| t != e.topic() || *p != e.partition())
            {
                let _ = self.tpl.set_partition_offset(e.topic(), e.partition(), Offset::Offset(n));
            }
        }
        self.consumer.assign(&self.tpl).map_err(|e| kafka("assign", e))
    }

    /// The first offset to send of each partition: as the subscription's
    /// `from` says at the first look; the start of a partition that a cursor
    /// does not name or that appeared later (new since). A cursor's offset
    /// past the end is refused (is it from this installation?); one before
    /// what retention kept starts at the oldest kept, with a note.
    fn starts(&mut self, added: &[(String, String, i32)], first: bool) -> Result<Vec<i64>, Refused> {
        let client = self.consumer.client();
        let timeout = self.timeout;
        let marks = |topic: &str, p: i32| {
            esk_kafka::watermarks(client, topic, p, timeout).map_err(|e| kafka(format!("{topic}/{p}"), e))
        };
        let low = |t: &str, p: i32| marks(t, p).map(|(low, _)| low);
        match &self.spec.from {
            From::Cursor(c) => {
                let mut out = Vec::with_capacity(added.len());
                for (category, t, p) in added {
                    let Some(next) = c.0.get(category).and_then(|ps| ps.get(p)).copied() else {
                        out.push(low(t, *p)?);
                        continue;
                    };
                    let (low, high) = marks(t, *p)?;
                    if next > high {
                        return Err(Refused::Invalid(format!(
                            "the cursor is past the end of {t}/{p} ({next} > {high}): is it from this installation?"
                        )));
                    }
                    if next < low {
                        self.notes.push(format!(
                            "{t}/{p}: offsets {next} to {} are gone (retention); going on from {low}",
                            low - 1
                        ));
                    }
                    out.push(next.max(low));
                }
                Ok(out)
            }
            _ if !first => added.iter().map(|(_, t, p)| low(t, *p)).collect(),
            From::Start => added.iter().map(|(_, t, p)| low(t, *p)).collect(),
            From::End => added.iter().map(|(_, t, p)| marks(t, *p).map(|(_, high)| high)).collect(),
            From::Position(pos) => {
                let topic = self.topics.events(&pos.category);
                if !added.iter().any(|(_, t, p)| *t == topic && *p == pos.partition) {
                    return Err(Refused::Invalid(format!(
                        "position {pos}: there is no partition {} of category {} here (is the token from this \
                         installation?)",
                        pos.partition, pos.category
                    )));
                }
                let at = self.time_of(&topic, pos.partition, pos.offset)?;
                let mut tpl = TopicPartitionList::new();
                for (_, t, p) in added {
                    tpl.add_partition_offset(t, *p, Offset::Offset(at)).map_err(|e| kafka(t, e))?;
                }
                let found = self.consumer.offsets_for_times(tpl, self.timeout).map_err(|e| kafka("offsets", e))?;
                added
                    .iter()
                    .map(|(_, t, p)| {
                        if *t == topic && *p == pos.partition {
                            return Ok(pos.offset + 1);
                        }
                        match found.find_partition(t, *p).map(|e| e.offset()) {
                            Some(Offset::Offset(o)) => Ok(o),
                            // No event at or after that time: from the end.
                            _ => marks(t, *p).map(|(_, high)| high),
                        }
                    })
                    .collect()
            }
        }
    }

    /// The time (ms) of the record at `offset`, for a start from a position token.
    fn time_of(&self, topic: &str, partition: i32, offset: i64) -> Result<i64, Refused> {
        let (low, high) = esk_kafka::watermarks(self.consumer.client(), topic, partition, self.timeout)
            .map_err(|e| kafka(format!("{topic}/{partition}"), e))?;
        if offset < low || offset >= high {
            return Err(Refused::Invalid(format!(
                "position {topic}/{partition}@{offset}: no such event (is the token from this installation?)"
            )));
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset)).map_err(|e| kafka(topic, e))?;
        self.consumer.assign(&tpl).map_err(|e| kafka("assign", e))?;
        let deadline = Instant::now() + self.timeout;
        let found = loop {
            if Instant::now() > deadline || self.done() {
                break None;
            }
            match self.consumer.poll(Duration::from_millis(100)) {
                // Under read_committed the offset may be a marker: the next record's time.
                Some(Ok(m)) if m.offset() >= offset => break m.timestamp().to_millis(),
                _ => {}
            }
        };
        self.consumer.unassign().map_err(|e| kafka("unassign", e))?;
        found.ok_or_else(|| {
            Refused::Unavailable(format!("Kafka: reading {topic}/{partition}@{offset} took over {:?}", self.timeout))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_read_back_what_they_write_and_refuse_garbage() {
        let mut c = Cursor::default();
        c.0.entry("order".into()).or_default().extend([(0, 5), (1, 0), (11, 42)]);
        c.0.entry("account".into()).or_default().insert(3, 7);
        let text = c.to_string();
        assert_eq!(text, "account:3=7;order:0=5,1=0,11=42");
        assert_eq!(text.parse::<Cursor>().unwrap(), c);
        assert_eq!("".parse::<Cursor>().unwrap(), Cursor::default());
        for bad in ["order", "order:x=1", "order:1=-4", "Order:1=1", "order:1=1;order:2=2", "a:1=1=1", "a:-1=3"] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad}");
        }
        assert!("a:1=1,".repeat(20_000).parse::<Cursor>().unwrap_err().contains("too long"));
    }

    #[test]
    fn from_tells_a_position_token_from_a_cursor() {
        assert_eq!(From::parse("start").unwrap(), From::Start);
        assert_eq!(From::parse("end").unwrap(), From::End);
        assert!(matches!(From::parse("order:3:1042").unwrap(), From::Position(p) if p.offset == 1042));
        assert!(matches!(From::parse("order:3=1042").unwrap(), From::Cursor(_)));
        assert!(From::parse("order:3:x").is_err());
        assert!(From::parse("yesterday").is_err());
    }
}
