//! Followers of the leader topic (`<prefix>.state`): replicas that serve reads,
//! and the writer's hot standby.
//!
//! A follower reads a topic with `read_committed` (a write of an aborted Kafka
//! transaction is never seen) and hands batches of records to a [`Sink`],
//! which checks each (any producer can write anything to a topic: a record
//! that does not fit is refused, logged and counted, never a panic) and
//! applies them together with its new positions in one local transaction: a
//! crash never leaves it ahead of, or out of step with, what it says it
//! applied. On start it resumes from the sink's positions.
//!
//! # Layout
//! - [`engine`]: what every follower of a log shares, the projector's read
//!   models too: batches, published progress and waits, idle positions, lag,
//!   back-off.
//! - [`Follower`] / [`spawn`]: the state topic's consume loop on that engine
//!   and its published [`Progress`], with waits for read-your-writes tokens.
//! - [`sqlite::SqliteSink`]: the replica's store (one SQLite file, WAL).
//! - [`store`]: topics into local stores (`esk_store`), for restores and hot
//!   standbys alike: the writer's and the coordinator's.
//!
//! Tokens: a write's position is `<category>:<partition>:<offset>` of its last
//! event. The writer writes state records in event order, each with its
//! stream's `last_offset`, so a follower has applied a write once it applied
//! a state record of that category and partition whose `last_offset` reaches
//! the token's offset.

pub mod engine;
pub mod sqlite;
pub mod store;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;
use esk_kafka::KafkaConfig;
use esk_wire::protocol::{Position, StreamRecord};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;

use crate::engine::backoff::Backoff;
use crate::engine::published::{Applied, Published};

/// A record as followed, with where it was, not decoded yet.
#[derive(Debug, Clone)]
pub struct Followed {
    pub partition: i32,
    pub offset: i64,
    /// Partitions of the topic.
    pub partitions: i32,
    /// When it was written (ms since the epoch).
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

impl Followed {
    /// Whether this is the writer's consumed-positions record
    /// ([`esk_wire::protocol::CONSUMED_KEY`]), not a stream's.
    pub fn is_consumed(&self) -> bool {
        self.key.as_deref() == Some(esk_wire::protocol::CONSUMED_KEY.as_bytes())
    }

    /// Whether this is one of the writer's index pages
    /// ([`esk_wire::protocol::IndexPage`]), not a stream's record.
    pub fn is_index_page(&self) -> bool {
        self.key.as_deref().is_some_and(|k| k.starts_with(esk_wire::protocol::INDEX_PAGE_PREFIX.as_bytes()))
    }

    /// Decodes a stream record of the state topic and checks it against its
    /// key, its partition and the (version, last offset) it would replace.
    pub fn stream_record(&self, previous: Option<(u64, i64)>) -> Result<StreamRecord, String> {
        let value = self.value.as_deref().ok_or("a record with no value (a tombstone)")?;
        let record: StreamRecord = serde_json::from_slice(value).map_err(|e| format!("not a stream record: {e}"))?;
        record.check(self.key.as_deref(), self.partition, self.partitions, previous)?;
        Ok(record)
    }
}

/// Logs and counts a record a sink refused (rate-limited to one line a second
/// per follower thread; the counter has them all).
pub fn refused(topic: &str, f: &Followed, reason: &str) {
    use std::cell::Cell;
    thread_local!(static LAST: Cell<Option<Instant>> = const { Cell::new(None) });
    metrics::counter!("esk_refused_records_total", "topic" => topic.to_owned()).increment(1);
    let now = Instant::now();
    let due = LAST.with(|l| {
        let due = l.get().is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if due {
            l.set(Some(now));
        }
        due
    });
    if due {
        tracing::warn!(topic, partition = f.partition, offset = f.offset, reason, "refused a record");
    }
}

/// What a follower has applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// Next offset of each state-topic partition.
    pub positions: BTreeMap<i32, i64>,
    /// Highest event offset applied per (category, partition): what tokens are
    /// checked against.
    pub events: BTreeMap<(String, i32), i64>,
    /// Timestamp of the last record applied per partition.
    pub last_ms: BTreeMap<i32, i64>,
    /// Set by a sink: read these partitions again from these offsets (it
    /// passed over records it must now take). Not kept.
    #[serde(skip)]
    pub rewind: BTreeMap<i32, i64>,
}

impl Progress {
    /// Whether the write behind `token` is applied.
    pub fn covers(&self, token: &Position) -> bool {
        self.events.get(&(token.category.clone(), token.partition)).is_some_and(|o| *o >= token.offset)
    }

    /// Moves the positions past a batch.
    pub fn advance(&mut self, batch: &[Followed]) {
        for f in batch {
            self.positions.insert(f.partition, f.offset + 1);
            if let Some(ts) = f.timestamp_ms {
                self.last_ms.insert(f.partition, ts);
            }
        }
    }

    /// Notes an accepted stream record: its write is applied (for tokens).
    pub fn applied(&mut self, partition: i32, record: &StreamRecord) {
        if record.last_offset >= 0 {
            let category = record.stream.split_once('-').map_or("", |(c, _)| c).to_owned();
            let e = self.events.entry((category, partition)).or_insert(-1);
            *e = (*e).max(record.last_offset);
        }
    }
}

/// Where followed records go.
pub trait Sink: Send + 'static {
    /// What the sink applied so far (where to resume).
    fn load(&mut self) -> Result<Progress>;
    /// Checks and applies a batch with `progress` (already past the batch;
    /// the sink notes what it accepted with [`Progress::applied`]),
    /// atomically. A record that does not fit is refused ([`refused`]), not
    /// an error: an error means the sink itself failed, and the batch is tried again.
    fn apply(&mut self, batch: &[Followed], progress: &mut Progress) -> Result<()>;
}

pub use engine::lag::Lag;

/// A running follower.
pub struct Follower {
    published: Arc<Published<Progress, esk_kafka::Error>>,
    applied: Applied<Progress>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Lag against the high watermarks, sampled every second: reading it
    /// never waits on Kafka.
    lag: esk_runtime::sample::Sampled<Option<Vec<Lag>>>,
    topic: String,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower").field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl Follower {
    pub fn progress(&self) -> Progress {
        self.published.applied()
    }

    /// Waits until the write behind `token` is applied, or the timeout passes
    /// (then `Err` with the event offset reached for its category and partition).
    pub async fn wait_for(&self, token: &Position, timeout: Duration) -> Result<(), i64> {
        self.applied
            .until(|p| p.covers(token), timeout)
            .await
            .map_err(|reached| reached.events.get(&(token.category.clone(), token.partition)).copied().unwrap_or(-1))
    }

    /// Where the consumer of `partition` stood when it last found nothing new
    /// (past transaction markers): everything before it is applied.
    pub fn idle_position(&self, partition: i32) -> i64 {
        self.published.idle().get(&(self.topic.clone(), partition)).copied().unwrap_or(-1)
    }

    /// Waits for the next applied batch (or the timeout).
    pub async fn changed(&self, timeout: Duration) {
        self.applied.changed(timeout).await;
    }

    /// Applied position against the high watermark, per partition, as last
    /// sampled (about a second ago at most while Kafka answers); `None`
    /// before the first sample or when the last one could not reach Kafka.
    pub fn lag(&self) -> Option<Vec<Lag>> {
        self.lag.latest().and_then(|(lag, _)| lag)
    }

    /// Resolves once the loop has stopped for good, with why: the brokers
    /// refused its credentials or an ACL is missing (no retry mends that;
    /// the process should exit).
    pub async fn failed(&self) -> esk_kafka::Error {
        self.published.failed().await
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Starts following `topic` (every partition) into `sink` on a thread of its own.
pub fn spawn<S: Sink>(kafka: &KafkaConfig, topic: &str, group: &str, mut sink: S) -> Result<Follower> {
    let initial = sink.load()?;
    let consumer: BaseConsumer = kafka.committed_reader(group, Duration::from_millis(20)).create()?;
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(Published::new(initial.clone()));
    let run = Loop {
        bootstrap: kafka.bootstrap.clone(),
        consumer,
        partitions: 0,
        topic: topic.to_owned(),
        timeout: kafka.timeout,
        sink,
        progress: initial,
        published: published.clone(),
        stop: stop.clone(),
    };
    let (p, t) = (published.clone(), topic.to_owned());
    let lag = engine::lag::sample(kafka, group, topic, vec![topic.to_owned()], move || {
        let progress = p.applied();
        let keyed = |m: &BTreeMap<i32, i64>| m.iter().map(|(part, o)| ((t.clone(), *part), *o)).collect();
        engine::lag::Source { applied: keyed(&progress.positions), last_ms: keyed(&progress.last_ms), idle: p.idle() }
    })?;
    let thread = std::thread::Builder::new().name(format!("follow-{topic}")).spawn(move || run.run())?;
    let applied = published.watch();
    Ok(Follower { published, applied, stop, thread: Some(thread), lag, topic: topic.to_owned() })
}

struct Loop<S> {
    bootstrap: String,
    consumer: BaseConsumer,
    /// Partitions of the topic, from the metadata at assignment.
    partitions: i32,
    topic: String,
    timeout: Duration,
    sink: S,
    progress: Progress,
    published: Arc<Published<Progress, esk_kafka::Error>>,
    stop: Arc<AtomicBool>,
}

impl<S: Sink> Loop<S> {
    /// Assigns every partition of the topic from the sink's positions:
    /// `Ok(false)` to be tried again (no metadata yet, the topic not made
    /// yet), `Err` when the brokers refused (credentials, an ACL).
    fn assign(&mut self) -> Result<bool, esk_kafka::Error> {
        let md =
            match esk_kafka::watch::consumer_metadata(&self.consumer, &self.bootstrap, Some(&self.topic), self.timeout)
            {
                Ok(md) => md,
                Err(e) if e.is_refusal() => return Err(e),
                Err(_) => return Ok(false),
            };
        if let Some(refused) = esk_kafka::error::topic_refused(&md, &self.topic) {
            return Err(refused);
        }
        let Some(t) = md.topics().first() else { return Ok(false) };
        if t.error().is_some() || t.partitions().is_empty() {
            return Ok(false);
        }
        self.partitions = t.partitions().len() as i32;
        let mut tpl = TopicPartitionList::new();
        for p in t.partitions() {
            let offset = self.progress.positions.get(&p.id()).map_or(Offset::Beginning, |n| Offset::Offset(*n));
            if tpl.add_partition_offset(&self.topic, p.id(), offset).is_err() {
                return Ok(false);
            }
        }
        Ok(self.consumer.assign(&tpl).is_ok())
    }

    /// The loop stops for good: the brokers refused it.
    fn refused(&self, e: esk_kafka::Error) {
        tracing::error!(topic = self.topic, "following stopped: {e}");
        self.published.fail(e);
    }

    fn run(mut self) {
        loop {
            match self.assign() {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => return self.refused(e),
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            tracing::warn!(topic = self.topic, "cannot assign the state topic yet; retrying");
            std::thread::sleep(Duration::from_secs(1));
        }
        while !self.stop.load(Ordering::SeqCst) {
            // Short: a poll that serves only a transaction marker returns
            // nothing but waits out its timeout, and the idle position (what
            // a standby's takeover trusts) is taken after it.
            let batch: Vec<Followed> = match engine::poll::batch(&self.consumer, 2000, Duration::from_millis(20)) {
                Ok(batch) => batch
                    .iter()
                    .map(|m| Followed {
                        partition: m.partition(),
                        offset: m.offset(),
                        partitions: self.partitions,
                        timestamp_ms: m.timestamp().to_millis(),
                        key: m.key().map(<[u8]>::to_vec),
                        value: m.payload().map(<[u8]>::to_vec),
                    })
                    .collect(),
                Err(refused) => return self.refused(refused),
            };
            if batch.is_empty() {
                self.published.idle_at(&self.consumer);
                continue;
            }
            let started = Instant::now();
            let mut backoff = Backoff::default();
            let next = loop {
                let mut next = self.progress.clone();
                next.advance(&batch);
                match self.sink.apply(&batch, &mut next) {
                    Ok(()) => break next,
                    Err(e) => {
                        tracing::warn!(topic = self.topic, "applying followed records failed, retrying: {e:#}");
                        if self.stop.load(Ordering::SeqCst) {
                            return;
                        }
                        backoff.wait();
                    }
                }
            };
            tracing::trace!(records = batch.len(), ms = started.elapsed().as_millis() as u64, "followed");
            let mut next = next;
            for (p, offset) in std::mem::take(&mut next.rewind) {
                match self.consumer.seek(&self.topic, p, Offset::Offset(offset), self.timeout) {
                    Ok(()) => {
                        next.positions.insert(p, offset);
                    }
                    Err(e) => tracing::warn!(topic = self.topic, partition = p, "rewinding: {e}"),
                }
            }
            self.progress = next;
            self.published.publish(self.progress.clone());
        }
    }
}
