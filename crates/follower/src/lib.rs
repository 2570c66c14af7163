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
//! - [`Follower`] / [`spawn`]: the consume loop and its published [`Progress`],
//!   with waits for read-your-writes tokens and lag per partition.
//! - [`sqlite::SqliteSink`]: the replica's store (one SQLite file, WAL).
//! - [`store`]: topics into local stores (`esk_store`), for restores and hot
//!   standbys alike: the writer's and the coordinator's.
//!
//! Tokens: a write's position is `<category>:<partition>:<offset>` of its last
//! event. The writer writes state records in event order, each with its
//! stream's `last_offset`, so a follower has applied a write once it applied
//! a state record of that category and partition whose `last_offset` reaches
//! the token's offset.

pub mod sqlite;
pub mod store;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;
use esk_kafka::KafkaConfig;
use esk_wire::protocol::{Position, StreamRecord};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use tokio::sync::watch;

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

/// Lag of one state-topic partition.
#[derive(Debug, Clone, Serialize)]
pub struct Lag {
    pub partition: i32,
    pub next_offset: i64,
    pub high_watermark: i64,
    /// Records (transaction markers included) not applied yet.
    pub lag_records: i64,
    /// 0 when caught up, else how old the last applied record is.
    pub lag_ms: i64,
}

/// A running follower.
pub struct Follower {
    progress: watch::Receiver<Progress>,
    fetched: Arc<Mutex<BTreeMap<i32, i64>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Lag against the high watermarks, sampled every second: reading it
    /// never waits on Kafka.
    lag: esk_runtime::sample::Sampled<Option<Vec<Lag>>>,
    topic: String,
    /// Set when the loop stopped for good: the brokers refused it.
    failure: watch::Receiver<Option<esk_kafka::Error>>,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower").field("topic", &self.topic).finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Follower {
    pub fn progress(&self) -> Progress {
        self.progress.borrow().clone()
    }

    /// Waits until the write behind `token` is applied, or the timeout passes
    /// (then `Err` with the event offset reached for its category and partition).
    pub async fn wait_for(&self, token: &Position, timeout: Duration) -> Result<(), i64> {
        let mut rx = self.progress.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if rx.borrow_and_update().covers(token) {
                return Ok(());
            }
            if !matches!(tokio::time::timeout_at(deadline, rx.changed()).await, Ok(Ok(()))) {
                let reached = rx.borrow().events.get(&(token.category.clone(), token.partition)).copied().unwrap_or(-1);
                return Err(reached);
            }
        }
    }

    /// Where the consumer of `partition` stood when it last found nothing new
    /// (past transaction markers): everything before it is applied.
    pub fn idle_position(&self, partition: i32) -> i64 {
        self.fetched.lock().expect("fetched lock").get(&partition).copied().unwrap_or(-1)
    }

    /// Waits for the next applied batch (or the timeout).
    pub async fn changed(&self, timeout: Duration) {
        let mut rx = self.progress.clone();
        rx.borrow_and_update();
        let _ = tokio::time::timeout(timeout, rx.changed()).await;
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
        let mut rx = self.failure.clone();
        let why = rx.wait_for(Option::is_some).await.ok().and_then(|why| why.clone());
        match why {
            Some(why) => why,
            // The loop dropped its sender without a failure: it was stopped.
            None => std::future::pending().await,
        }
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
    let (tx, rx) = watch::channel(initial.clone());
    let consumer: BaseConsumer = kafka.committed_reader(group, Duration::from_millis(20)).create()?;
    let watermarks: BaseConsumer = kafka.metadata(&format!("{group}-watermarks")).create()?;
    let stop = Arc::new(AtomicBool::new(false));
    let fetched = Arc::new(Mutex::new(BTreeMap::new()));
    let (failed, failure) = watch::channel(None);
    let run = Loop {
        bootstrap: kafka.bootstrap.clone(),
        failed,
        consumer,
        partitions: 0,
        topic: topic.to_owned(),
        timeout: kafka.timeout,
        sink,
        progress: initial,
        tx,
        stop: stop.clone(),
        fetched: fetched.clone(),
    };
    let thread = std::thread::Builder::new().name(format!("follow-{topic}")).spawn(move || run.run())?;
    let (progress, f, t, timeout) = (rx.clone(), fetched.clone(), topic.to_owned(), kafka.timeout);
    let lag = esk_runtime::sample::spawn(&format!("lag-{topic}"), Duration::from_secs(1), move || {
        measure_lag(&watermarks, &t, timeout, &progress.borrow().clone(), &f.lock().expect("fetched lock").clone())
    });
    Ok(Follower { progress: rx, fetched, stop, thread: Some(thread), lag, topic: topic.to_owned(), failure })
}

/// Applied position against the high watermark, per partition; `None` when
/// Kafka does not answer.
fn measure_lag(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
    progress: &Progress,
    fetched: &BTreeMap<i32, i64>,
) -> Option<Vec<Lag>> {
    let md = consumer.fetch_metadata(Some(topic), timeout).ok()?;
    let t = md.topics().first()?;
    let now = now_ms();
    t.partitions()
        .iter()
        .map(|p| {
            let (_, high) = esk_kafka::watermarks(consumer.client(), topic, p.id(), timeout).ok()?;
            // Transaction markers take offsets: where the consumer stands
            // when idle counts as caught up.
            let next =
                progress.positions.get(&p.id()).copied().unwrap_or(0).max(fetched.get(&p.id()).copied().unwrap_or(0));
            let lag_records = (high - next).max(0);
            let lag_ms =
                if lag_records == 0 { 0 } else { progress.last_ms.get(&p.id()).map_or(0, |t| (now - t).max(0)) };
            Some(Lag { partition: p.id(), next_offset: next, high_watermark: high, lag_records, lag_ms })
        })
        .collect()
}

struct Loop<S> {
    bootstrap: String,
    failed: watch::Sender<Option<esk_kafka::Error>>,
    consumer: BaseConsumer,
    /// Partitions of the topic, from the metadata at assignment.
    partitions: i32,
    topic: String,
    timeout: Duration,
    sink: S,
    progress: Progress,
    tx: watch::Sender<Progress>,
    stop: Arc<AtomicBool>,
    fetched: Arc<Mutex<BTreeMap<i32, i64>>>,
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
        self.failed.send_replace(Some(e));
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
            let mut batch = Vec::new();
            // Short: a poll that serves only a transaction marker returns
            // nothing but waits out its timeout, and the idle position (what
            // a standby's takeover trusts) is taken after it.
            let mut wait = Duration::from_millis(20);
            while batch.len() < 2000 {
                match self.consumer.poll(wait) {
                    Some(Ok(m)) => batch.push(Followed {
                        partition: m.partition(),
                        offset: m.offset(),
                        partitions: self.partitions,
                        timestamp_ms: m.timestamp().to_millis(),
                        key: m.key().map(<[u8]>::to_vec),
                        value: m.payload().map(<[u8]>::to_vec),
                    }),
                    Some(Err(e)) => {
                        if let Some(refused) = esk_kafka::Error::refusal(&e) {
                            return self.refused(refused);
                        }
                        tracing::warn!(topic = self.topic, "follow: {e}");
                        break;
                    }
                    None => break,
                }
                wait = Duration::ZERO;
            }
            if batch.is_empty() {
                if let Ok(tpl) = self.consumer.position() {
                    let mut fetched = self.fetched.lock().expect("fetched lock");
                    for e in tpl.elements() {
                        if let Some(o) = e.offset().to_raw() {
                            fetched.insert(e.partition(), o);
                        }
                    }
                }
                continue;
            }
            let started = Instant::now();
            let mut backoff = Duration::from_millis(100);
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
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
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
            self.tx.send_replace(self.progress.clone());
        }
    }
}
