//! The consume loop of a projection, its rebuilds and its dead letters.
//!
//! One thread per projection runs the live loop: poll a batch (`read_committed`),
//! apply it in one store transaction with the new checkpoints, park what cannot
//! be applied, commit, publish the new positions (for read-your-writes) and
//! commit the group's offsets (for lag tools only: on every assignment the
//! runner seeks to its store's checkpoints).
//!
//! A rebuild builds the next store version from offset 0 on a thread of its
//! own while the live loop goes on. Near the end it asks the live loop to pause
//! at a batch boundary, catches up to (or past) the live positions, and hands
//! the new store over; the live loop switches to it and resumes from its
//! checkpoints. Queries see the old model until the switch and the new one
//! after, never a half-built one; positions never go backwards.

use std::collections::{BTreeSet, HashMap};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use esk_kafka::admin::{Admin, Durability, TopicKind};
use esk_kafka::record::{DLQ_OFFSET, DLQ_PARTITION, DLQ_TOPIC, DLQ_TRUNCATED, Origin, dead_letter, headers_of};
use esk_kafka::{GroupMember, KafkaConfig, Sending};
use esk_wire::{Event, SchemaRegistry, Topics};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use serde::Serialize;
use tokio::sync::watch;

use crate::{ApplyError, Parked, Positions, Projection, Store, StoreError};

/// How a runner reaches Kafka.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub kafka: KafkaConfig,
    pub topics: Topics,
    /// The consumer group, committed for lag tools only. Every projector
    /// instance keeps a full copy, so each has a group of its own.
    pub group_id: String,
    pub max_batch: usize,
}

/// A consumed record, owned.
#[derive(Debug, Clone)]
struct Rec {
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Rec {
    fn of(m: &impl Message) -> Self {
        Rec {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers: headers_of(m),
        }
    }

    fn parked(&self, reason: String) -> Parked {
        Parked {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
            reason,
            key: self.key.clone(),
            value: self.value.clone(),
            headers: self.headers.clone(),
        }
    }
}

/// Decodes, upcasts and validates a record; `Err` is the reason to park it.
fn decode(rec: &Rec, schemas: &SchemaRegistry) -> Result<Event, String> {
    let headers: Vec<(&str, Option<&[u8]>)> = rec.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
    decode_parts(headers, rec.value.as_deref(), schemas)
}

fn decode_parts(
    headers: Vec<(&str, Option<&[u8]>)>,
    value: Option<&[u8]>,
    schemas: &SchemaRegistry,
) -> Result<Event, String> {
    let mut event = Event::decode(headers, value).map_err(|e| format!("undecodable: {e}"))?;
    let (data, schema) = schemas.upcast(event.data_schema.as_deref(), std::mem::take(&mut event.data))?;
    event.data = data;
    event.data_schema = schema;
    schemas
        .validate(event.stream.category(), &event.event_type, &event.data)
        .map_err(|e| format!("fails its schema: {e}"))?;
    Ok(event)
}

/// A record a batch applies: one just polled (borrowed from the consumer,
/// copied only when parked) or one read back for a replay.
trait Record {
    fn at(&self) -> (&str, i32, i64);
    fn decode(&self, schemas: &SchemaRegistry) -> Result<Event, String>;
    fn parked(&self, reason: String) -> Parked;
}

impl Record for Rec {
    fn at(&self) -> (&str, i32, i64) {
        (&self.topic, self.partition, self.offset)
    }

    fn decode(&self, schemas: &SchemaRegistry) -> Result<Event, String> {
        decode(self, schemas)
    }

    fn parked(&self, reason: String) -> Parked {
        Rec::parked(self, reason)
    }
}

impl Record for BorrowedMessage<'_> {
    fn at(&self) -> (&str, i32, i64) {
        (self.topic(), self.partition(), self.offset())
    }

    fn decode(&self, schemas: &SchemaRegistry) -> Result<Event, String> {
        let headers = self.headers().map(|h| h.iter().map(|x| (x.key, x.value)).collect()).unwrap_or_default();
        decode_parts(headers, self.payload(), schemas)
    }

    fn parked(&self, reason: String) -> Parked {
        Rec::of(self).parked(reason)
    }
}

/// What the runner reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunnerStatus {
    pub projection: String,
    pub version: u64,
    pub applied: u64,
    pub parked: u64,
    /// Events applied per second, over the last few seconds.
    pub events_per_second: f64,
    pub rebuild: Option<RebuildStatus>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RebuildStatus {
    pub version: u64,
    /// building, catching-up, switched, failed
    pub phase: String,
    pub applied: u64,
    pub started_ms_ago: u64,
    pub positions: Vec<PartitionPosition>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionPosition {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

fn listed(p: &Positions) -> Vec<PartitionPosition> {
    p.iter().map(|((t, part), o)| PartitionPosition { topic: t.clone(), partition: *part, next_offset: *o }).collect()
}

/// The outcome of a replay of parked events.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    pub replayed: u64,
    /// Replayed by an earlier replay of this model version.
    pub already_replayed: u64,
    /// In the dead-letter topic, but applied by this model version in order
    /// (a rebuild after a fix), or parked by another instance only.
    pub not_parked_here: u64,
    pub still_failing: Vec<String>,
}

enum Control {
    Rebuild(Sender<Result<u64, String>>),
    Replay(Sender<Result<ReplayReport, String>>),
    Stop,
}

enum FromRebuild<S> {
    /// Pause at a batch boundary and answer with the live positions.
    Pause(Sender<Positions>),
    /// The new store has caught up: switch to it.
    Switch(S),
    Failed(String),
}

/// Why a projection's live loop stopped for good.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Stopped {
    /// The brokers refused the credentials or an ACL is missing.
    #[error(transparent)]
    Refused(esk_kafka::Error),
    #[error("{0}")]
    Failed(String),
}

struct Published {
    positions: watch::Sender<Positions>,
    status: Mutex<RunnerStatus>,
    /// The consumer's positions when it last found nothing new: past the
    /// transaction markers that follow the last applied event.
    fetched: Mutex<Positions>,
    /// Why the live loop gave up for good (it stopped).
    failure: watch::Sender<Option<Stopped>>,
}

/// A running projection: positions to wait on, status, control.
pub struct RunnerHandle {
    positions: watch::Receiver<Positions>,
    published: Arc<Published>,
    control: Sender<Control>,
    thread: Option<JoinHandle<()>>,
    /// Lag against the high watermarks, sampled every second: reading it
    /// never waits on Kafka.
    lag: esk_runtime::sample::Sampled<Option<Vec<Lag>>>,
    topics: Vec<String>,
}

impl std::fmt::Debug for RunnerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerHandle").field("topics", &self.topics).finish()
    }
}

/// Per partition: where the projection is, where the log ends.
#[derive(Debug, Clone, Serialize)]
pub struct Lag {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
    pub high_watermark: i64,
    /// Records (including transaction markers) not yet applied.
    pub lag: i64,
}

impl RunnerHandle {
    /// The committed positions now.
    pub fn positions(&self) -> Positions {
        self.positions.borrow().clone()
    }

    /// Waits until `(topic, partition)` has been applied past `offset`, or the
    /// timeout passes (then `Err` with the positions reached).
    pub async fn wait_past(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        timeout: Duration,
    ) -> Result<(), Positions> {
        let mut rx = self.positions.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let done = rx.borrow_and_update().get(&(topic.to_owned(), partition)).is_some_and(|next| *next > offset);
            if done {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(rx.borrow().clone()),
            }
        }
    }

    /// Waits for the next published change of positions (or the timeout).
    pub async fn changed(&self, timeout: Duration) {
        let mut rx = self.positions.clone();
        rx.borrow_and_update();
        let _ = tokio::time::timeout(timeout, rx.changed()).await;
    }

    pub fn status(&self) -> RunnerStatus {
        self.published.status.lock().expect("status lock").clone()
    }

    /// Resolves, with the reason, once the projection has stopped for good
    /// (the service should exit: its model no longer follows the log).
    pub async fn failed(&self) -> Stopped {
        let mut rx = self.published.failure.subscribe();
        let why = rx.wait_for(Option::is_some).await.ok().and_then(|why| why.clone());
        match why {
            Some(why) => why,
            // The sender lives as long as `self`: not reached.
            None => std::future::pending().await,
        }
    }

    /// Checkpoints against high watermarks, per partition of the projection's topics.
    /// Per partition, as last sampled (about a second ago at most while
    /// Kafka answers); `None` before the first sample or when the last one
    /// could not reach Kafka (so an unreachable broker never reads as caught up).
    pub fn lag(&self) -> Option<Vec<Lag>> {
        self.lag.latest().and_then(|(lag, _)| lag)
    }

    /// Starts a rebuild; returns the version being built.
    pub fn rebuild(&self) -> Result<u64, String> {
        self.ask(Control::Rebuild)
    }

    /// Applies the parked events that apply now, each once.
    pub fn replay(&self) -> Result<ReplayReport, String> {
        self.ask(Control::Replay)
    }

    fn ask<T>(&self, make: impl FnOnce(Sender<Result<T, String>>) -> Control) -> Result<T, String> {
        let (tx, rx) = mpsc::channel();
        self.control.send(make(tx)).map_err(|_| "the projection has stopped".to_owned())?;
        rx.recv_timeout(Duration::from_secs(120)).map_err(|_| "the projection did not answer".to_owned())?
    }

    /// Stops after the current batch and waits.
    pub fn stop(mut self) {
        let _ = self.control.send(Control::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Rebalances: every assignment starts at the store's checkpoints.
struct SeekToCheckpoints {
    positions: Arc<Mutex<Positions>>,
}

impl ClientContext for SeekToCheckpoints {}

impl ConsumerContext for SeekToCheckpoints {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        if err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS {
            let positions = self.positions.lock().expect("positions lock").clone();
            let parts: Vec<(String, i32)> =
                tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
            for (topic, p) in parts {
                let offset = positions.get(&(topic.clone(), p)).map_or(Offset::Beginning, |n| Offset::Offset(*n));
                let _ = tpl.set_partition_offset(&topic, p, offset);
            }
            tracing::info!(partitions = tpl.count(), "assigned; seeking to the store's checkpoints");
            if let Err(e) = consumer.assign(tpl) {
                tracing::error!("assign: {e}");
            }
        } else {
            if let Err(e) = consumer.unassign() {
                tracing::warn!("unassign: {e}");
            }
        }
    }
}

/// The regex that subscribes to a projection's category topics.
fn subscription(topics: &Topics, categories: &[String]) -> String {
    let prefix = topics.events_prefix().replace('.', "\\.");
    format!("^{prefix}({})$", categories.join("|"))
}

/// Starts a projection's live loop on a thread of its own. `on_switch` runs
/// after a rebuild's store became current (to point queries at it).
pub fn spawn<S, P>(
    config: RunnerConfig,
    projection: Arc<P>,
    schemas: Arc<SchemaRegistry>,
    mut store: S,
    on_switch: Box<dyn Fn(&S) + Send>,
) -> Result<RunnerHandle, StoreError>
where
    S: Store,
    P: Projection<S>,
{
    projection.migrate(&mut store)?;
    let initial = store.checkpoints()?;
    let (tx, rx) = watch::channel(initial.clone());
    let published = Arc::new(Published {
        positions: tx,
        status: Mutex::new(RunnerStatus {
            projection: projection.name().to_owned(),
            version: store.version(),
            ..RunnerStatus::default()
        }),
        fetched: Mutex::new(Positions::new()),
        failure: watch::Sender::new(None),
    });
    let topics: Vec<String> = projection.categories().iter().map(|c| config.topics.events(c)).collect();
    let watermarks: BaseConsumer = config
        .kafka
        .metadata(&format!("{}-watermarks", config.group_id))
        .create()
        .map_err(|e| StoreError::Other(e.to_string()))?;
    let (control_tx, control_rx) = mpsc::channel();
    let timeout = config.kafka.timeout.min(Duration::from_secs(5));
    let live = Live {
        config,
        projection,
        schemas,
        store,
        on_switch,
        published: published.clone(),
        committed: Arc::new(Mutex::new(initial)),
        control: control_rx,
        rebuild: None,
        rates: Vec::new(),
    };
    let name = live.projection.name().to_owned();
    let thread = std::thread::Builder::new()
        .name(format!("projection-{name}"))
        .spawn(move || live.run())
        .map_err(StoreError::Io)?;
    let (positions, p, t) = (rx.clone(), published.clone(), topics.clone());
    let lag = esk_runtime::sample::spawn(&format!("lag-{name}"), Duration::from_secs(1), move || {
        measure_lag(&watermarks, &t, timeout, positions.borrow().clone(), &p)
    });
    Ok(RunnerHandle { positions: rx, published, control: control_tx, thread: Some(thread), lag, topics })
}

/// Where the projection stands against each partition's high watermark;
/// `None` when Kafka does not answer (a category topic that does not exist
/// yet has nothing to lag behind).
fn measure_lag(
    consumer: &BaseConsumer,
    topics: &[String],
    timeout: Duration,
    mut positions: Positions,
    published: &Published,
) -> Option<Vec<Lag>> {
    // Transaction markers take offsets: where the consumer stands when idle
    // counts as caught up (position >= high watermark).
    for (k, v) in published.fetched.lock().expect("fetched lock").iter() {
        let p = positions.entry(k.clone()).or_insert(0);
        *p = (*p).max(*v);
    }
    let mut out = Vec::new();
    for topic in topics {
        let md = consumer.fetch_metadata(Some(topic), timeout).ok()?;
        let Some(t) = md.topics().first().filter(|t| t.error().is_none()) else {
            continue;
        };
        for p in t.partitions() {
            let (_, high) = esk_kafka::watermarks(consumer.client(), topic, p.id(), timeout).ok()?;
            let next = positions.get(&(topic.clone(), p.id())).copied().unwrap_or(0);
            out.push(Lag {
                topic: topic.clone(),
                partition: p.id(),
                next_offset: next,
                high_watermark: high,
                lag: (high - next).max(0),
            });
        }
    }
    Some(out)
}

struct Live<S: Store, P> {
    config: RunnerConfig,
    projection: Arc<P>,
    schemas: Arc<SchemaRegistry>,
    store: S,
    on_switch: Box<dyn Fn(&S) + Send>,
    published: Arc<Published>,
    /// The store's committed checkpoints, shared with the rebalance callback.
    committed: Arc<Mutex<Positions>>,
    control: Receiver<Control>,
    rebuild: Option<Receiver<FromRebuild<S>>>,
    rates: Vec<(Instant, u64)>,
}

/// Why a batch did not apply.
#[derive(Debug)]
enum BatchError {
    /// The store (or the dead-letter topic) failed: retry the batch.
    Store(StoreError),
    /// The projection failed transiently on this event: retry, and park it
    /// once it has failed [`POISON_AFTER`] times in a row.
    Event { at: (String, i32, i64), reason: String },
}

impl From<StoreError> for BatchError {
    fn from(e: StoreError) -> Self {
        BatchError::Store(e)
    }
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchError::Store(e) => write!(f, "{e}"),
            BatchError::Event { at: (t, p, o), reason } => write!(f, "{t}/{p}@{o}: {reason}"),
        }
    }
}

/// An event whose apply fails transiently this many times in a row is parked:
/// no event holds a projection back for ever.
pub const POISON_AFTER: u32 = 10;

/// Applies a batch in one transaction: the events, the parked ones, the new
/// checkpoints. Events in `poison` are parked without being applied (they
/// failed too often). `before_commit` sees the parked events first (they go
/// to the dead-letter topic). Returns (applied, parked).
///
/// The first pass applies the events without a savepoint each (one SQL
/// statement saved per event, and the reason a catch-up applies several
/// hundred thousand events a second). An event the projection refuses may
/// have made part of its changes already, so the first refusal rolls the
/// whole transaction back and the batch is applied again with each event in
/// a savepoint of its own, which undoes exactly the refused event's changes
/// (`esk_projection_batches_redone_total`).
fn apply_batch<S: Store, P: Projection<S>, R: Record>(
    projection: &P,
    schemas: &SchemaRegistry,
    store: &mut S,
    batch: &[R],
    positions: &mut Positions,
    poison: &HashMap<(String, i32, i64), String>,
    before_commit: &mut dyn FnMut(&[Parked]) -> Result<(), StoreError>,
) -> Result<(u64, Vec<Parked>), BatchError> {
    if let Some(done) = apply_pass(projection, schemas, store, batch, positions, poison, before_commit, false)? {
        return Ok(done);
    }
    metrics::counter!("esk_projection_batches_redone_total", "projection" => projection.name().to_owned()).increment(1);
    apply_pass(projection, schemas, store, batch, positions, poison, before_commit, true)?
        .ok_or_else(|| BatchError::Store(StoreError::Other("a batch with savepoints gave up".into())))
}

/// One pass of [`apply_batch`]: `None` when an event was refused in a pass
/// without savepoints (nothing was committed; the batch needs the careful
/// pass).
#[allow(clippy::too_many_arguments)]
fn apply_pass<S: Store, P: Projection<S>, R: Record>(
    projection: &P,
    schemas: &SchemaRegistry,
    store: &mut S,
    batch: &[R],
    positions: &mut Positions,
    poison: &HashMap<(String, i32, i64), String>,
    before_commit: &mut dyn FnMut(&[Parked]) -> Result<(), StoreError>,
    careful: bool,
) -> Result<Option<(u64, Vec<Parked>)>, BatchError> {
    let mut tx = store.begin()?;
    let mut parked = Vec::new();
    let mut applied = 0;
    // The next offset of each partition in the batch (a handful).
    let mut reached: Vec<(&str, i32, i64)> = Vec::new();
    for rec in batch {
        let (topic, partition, offset) = rec.at();
        match reached.iter_mut().find(|(t, p, _)| *p == partition && *t == topic) {
            Some(r) => r.2 = offset + 1,
            None => reached.push((topic, partition, offset + 1)),
        }
        if let Some(reason) = poisoned(poison, rec) {
            parked.push(rec.parked(format!("failed {POISON_AFTER} times in a row: {reason}")));
            continue;
        }
        let event = match rec.decode(schemas) {
            Ok(e) => e,
            Err(reason) => {
                parked.push(rec.parked(reason));
                continue;
            }
        };
        if careful {
            S::event_begin(&mut tx)?;
        }
        match projection.apply(&mut tx, &event) {
            Ok(()) => {
                if careful {
                    S::event_release(&mut tx)?;
                }
                applied += 1;
            }
            Err(ApplyError::Permanent(_)) if !careful => return Ok(None),
            Err(ApplyError::Permanent(reason)) => {
                S::event_rollback(&mut tx)?;
                parked.push(rec.parked(format!("the projection refused it: {reason}")));
            }
            Err(ApplyError::Transient(reason)) => {
                return Err(BatchError::Event { at: (topic.to_owned(), partition, offset), reason });
            }
        }
    }
    let mut next = positions.clone();
    for (topic, partition, offset) in reached {
        next.insert((topic.to_owned(), partition), offset);
    }
    for p in &parked {
        S::record_parked(&mut tx, p)?;
    }
    S::save_checkpoints(&mut tx, &next)?;
    before_commit(&parked)?;
    S::commit(tx)?;
    *positions = next;
    Ok(Some((applied, parked)))
}

/// Why `rec` is to be parked unapplied, if it failed too often.
fn poisoned<'a>(poison: &'a HashMap<(String, i32, i64), String>, rec: &impl Record) -> Option<&'a String> {
    if poison.is_empty() {
        return None;
    }
    let (topic, partition, offset) = rec.at();
    poison.get(&(topic.to_owned(), partition, offset))
}

/// What keeps failing in a batch being retried, and the backoff.
#[derive(Debug)]
struct Failing {
    counts: HashMap<(String, i32, i64), u32>,
    /// Events that failed [`POISON_AFTER`] times: parked on the next try.
    poison: HashMap<(String, i32, i64), String>,
    backoff: Duration,
}

impl Default for Failing {
    fn default() -> Self {
        Self { counts: HashMap::new(), poison: HashMap::new(), backoff: Duration::from_millis(100) }
    }
}

impl Failing {
    /// Notes a failed try and waits before the next.
    fn failed(&mut self, e: BatchError) {
        if let BatchError::Event { at, reason } = e {
            let n = self.counts.entry(at.clone()).or_default();
            *n += 1;
            if *n >= POISON_AFTER {
                self.poison.insert(at, reason);
                // Park it now, without waiting.
                return;
            }
        }
        std::thread::sleep(self.backoff);
        self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
    }
}

/// Up to `max` records; a consumer error ends the batch and is retried by
/// the next poll, except a refusal by the brokers (credentials, an ACL),
/// which is returned: no retry mends it.
fn poll_batch<'c>(
    consumer: &'c BaseConsumer<impl ConsumerContext>,
    max: usize,
    wait: Duration,
) -> Result<Vec<BorrowedMessage<'c>>, esk_kafka::Error> {
    let mut batch = Vec::new();
    let mut timeout = wait;
    while batch.len() < max {
        match consumer.poll(timeout) {
            Some(Ok(m)) => batch.push(m),
            Some(Err(e)) => {
                if let Some(refused) = esk_kafka::Error::refusal(&e) {
                    return Err(refused);
                }
                tracing::warn!("consume: {e}");
                break;
            }
            None => break,
        }
        timeout = Duration::ZERO;
    }
    Ok(batch)
}

impl<S: Store, P: Projection<S>> Live<S, P> {
    fn consumer(&self) -> Result<BaseConsumer<SeekToCheckpoints>, rdkafka::error::KafkaError> {
        let consumer: BaseConsumer<SeekToCheckpoints> = self
            .config
            .kafka
            // The group is this instance's alone (ADR 5). As a static member
            // a restarted instance takes its place at once; otherwise its
            // join waited for the killed one's session to expire (45 s), and
            // the partitions were first split with that ghost.
            .group_member(&GroupMember {
                group: &self.config.group_id,
                instance: Some(&self.config.group_id),
                session: None,
                co_partitioned: false,
            })
            .create_with_context(SeekToCheckpoints { positions: self.committed.clone() })?;
        let pattern = subscription(&self.config.topics, &self.projection.categories());
        consumer.subscribe(&[&pattern])?;
        Ok(consumer)
    }

    fn dlq_producer(&self) -> Result<(FutureProducer, String), String> {
        let topic = self.config.topics.dlq(self.projection.name());
        let producer: FutureProducer =
            self.config.kafka.producer(Sending::Parked).create().map_err(|e| e.to_string())?;
        Ok((producer, topic))
    }

    fn run(mut self) {
        let name = self.projection.name().to_owned();
        let consumer = loop {
            match self.consumer() {
                Ok(c) => break c,
                Err(e) => {
                    tracing::error!(projection = name, "cannot create the consumer: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        };
        let (dlq, dlq_topic) = match self.dlq_producer() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(projection = name, "cannot create the dead-letter producer: {e}");
                return;
            }
        };
        let mut dlq_ready = false;
        let mut positions = self.committed.lock().expect("positions lock").clone();
        tracing::info!(projection = name, version = self.store.version(), "projection running");
        loop {
            match self.control.try_recv() {
                Ok(Control::Stop) | Err(TryRecvError::Disconnected) => break,
                Ok(Control::Rebuild(reply)) => {
                    let _ = reply.send(self.start_rebuild());
                }
                Ok(Control::Replay(reply)) => {
                    let _ = reply.send(self.replay(&mut positions));
                }
                Err(TryRecvError::Empty) => {}
            }
            if let Some(msg) = self.rebuild.as_ref().map(Receiver::try_recv) {
                match msg {
                    Ok(FromRebuild::Pause(ack)) => {
                        self.paused(&consumer, &ack, &mut positions);
                        continue;
                    }
                    Ok(FromRebuild::Switch(_)) => unreachable!("a switch comes only while paused"),
                    Ok(FromRebuild::Failed(e)) => {
                        tracing::error!(projection = name, "rebuild failed: {e}");
                        self.rebuild = None;
                    }
                    Err(TryRecvError::Disconnected) => self.rebuild = None,
                    Err(TryRecvError::Empty) => {}
                }
            }
            let batch = match poll_batch(&consumer, self.config.max_batch, Duration::from_millis(100)) {
                Ok(batch) => batch,
                Err(refused) => {
                    tracing::error!(projection = name, "{refused}");
                    self.published.failure.send_replace(Some(Stopped::Refused(refused)));
                    break;
                }
            };
            if batch.is_empty() {
                // A fatal consumer error ends the loop: for a static member
                // it means another process joined with this instance's id.
                if let Some((code, reason)) = consumer.client().fatal_error() {
                    let why = format!(
                        "the consumer of group {} failed for good ({code:?}: {reason}); another projector with the \
                         same instance id took its place",
                        self.config.group_id
                    );
                    tracing::error!(projection = name, "{why}");
                    self.published.failure.send_replace(Some(Stopped::Failed(why)));
                    break;
                }
                if let Ok(tpl) = consumer.position() {
                    let mut fetched = self.published.fetched.lock().expect("fetched lock");
                    for e in tpl.elements() {
                        if let Some(o) = e.offset().to_raw() {
                            fetched.insert((e.topic().to_owned(), e.partition()), o);
                        }
                    }
                }
                continue;
            }
            let started = Instant::now();
            let mut failing = Failing::default();
            loop {
                let mut send_dead_letters = |parked: &[Parked]| -> Result<(), StoreError> {
                    if parked.is_empty() {
                        return Ok(());
                    }
                    if !dlq_ready {
                        ensure_dlq(&self.config, &dlq_topic)?;
                        dlq_ready = true;
                    }
                    send_parked(&dlq, &dlq_topic, &name, parked)
                };
                match apply_batch(
                    &*self.projection,
                    &self.schemas,
                    &mut self.store,
                    &batch,
                    &mut positions,
                    &failing.poison,
                    &mut send_dead_letters,
                ) {
                    Ok((applied, parked)) => {
                        self.committed_now(&consumer, &positions, applied, parked.len() as u64, started);
                        break;
                    }
                    Err(e) => {
                        metrics::counter!("esk_projection_retries_total", "projection" => name.clone()).increment(1);
                        tracing::warn!(projection = name, "batch failed, retrying: {e}");
                        failing.failed(e);
                    }
                }
            }
        }
        tracing::info!(projection = name, "projection stopped");
    }

    fn committed_now(
        &mut self,
        consumer: &BaseConsumer<SeekToCheckpoints>,
        positions: &Positions,
        applied: u64,
        parked: u64,
        started: Instant,
    ) {
        let name = self.projection.name().to_owned();
        *self.committed.lock().expect("positions lock") = positions.clone();
        self.published.positions.send_replace(positions.clone());
        metrics::counter!("esk_projection_applied_total", "projection" => name.clone()).increment(applied);
        metrics::counter!("esk_projection_parked_total", "projection" => name.clone()).increment(parked);
        metrics::histogram!("esk_projection_batch_seconds", "projection" => name)
            .record(started.elapsed().as_secs_f64());
        let now = Instant::now();
        self.rates.push((now, applied + parked));
        self.rates.retain(|(t, _)| now.duration_since(*t) < Duration::from_secs(5));
        let window = self.rates.first().map_or(0.0, |(t, _)| now.duration_since(*t).as_secs_f64()).max(1.0);
        let recent: u64 = self.rates.iter().map(|(_, n)| n).sum();
        {
            let mut s = self.published.status.lock().expect("status lock");
            s.applied += applied;
            s.parked += parked;
            s.events_per_second = recent as f64 / window;
            s.version = self.store.version();
        }
        // For lag tools only: the checkpoints in the store are what counts.
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in positions {
            let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!("group offset commit: {e}");
        }
    }

    fn start_rebuild(&mut self) -> Result<u64, String> {
        if self.rebuild.is_some() {
            return Err("a rebuild is already running".into());
        }
        let mut next = self.store.create_next().map_err(|e| e.to_string())?;
        self.projection.migrate(&mut next).map_err(|e| e.to_string())?;
        let version = next.version();
        let (tx, rx) = mpsc::channel();
        self.rebuild = Some(rx);
        let rebuild = Rebuild {
            config: self.config.clone(),
            projection: self.projection.clone(),
            schemas: self.schemas.clone(),
            store: Some(next),
            published: self.published.clone(),
            to_live: tx,
        };
        self.published.status.lock().expect("status lock").rebuild =
            Some(RebuildStatus { version, phase: "building".into(), ..RebuildStatus::default() });
        std::thread::Builder::new()
            .name(format!("rebuild-{}", self.projection.name()))
            .spawn(move || rebuild.run())
            .map_err(|e| e.to_string())?;
        tracing::info!(projection = self.projection.name(), version, "rebuild started");
        Ok(version)
    }

    /// Paused for a rebuild's last catch-up: serve the group, wait for the new store.
    fn paused(
        &mut self,
        consumer: &BaseConsumer<SeekToCheckpoints>,
        ack: &Sender<Positions>,
        positions: &mut Positions,
    ) {
        let assignment = consumer.assignment().unwrap_or_default();
        let _ = consumer.pause(&assignment);
        let _ = ack.send(positions.clone());
        let outcome = loop {
            // Keep serving the group protocol; paused partitions return nothing.
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                tracing::debug!(offset = m.offset(), "record while paused is fetched again after the switch");
            }
            match self.rebuild.as_ref().map(|r| r.recv_timeout(Duration::from_millis(10))) {
                Some(Ok(FromRebuild::Switch(store))) => break Some(store),
                Some(Ok(FromRebuild::Failed(e))) => {
                    tracing::error!(projection = self.projection.name(), "rebuild failed: {e}");
                    break None;
                }
                Some(Ok(FromRebuild::Pause(_))) | Some(Err(mpsc::RecvTimeoutError::Timeout)) => {}
                None | Some(Err(mpsc::RecvTimeoutError::Disconnected)) => break None,
            }
        };
        self.rebuild = None;
        if let Some(mut store) = outcome {
            match store.checkpoints().and_then(|c| store.make_current().map(|()| c)) {
                Ok(checkpoints) => {
                    (self.on_switch)(&store);
                    self.store = store;
                    *positions = checkpoints;
                    *self.committed.lock().expect("positions lock") = positions.clone();
                    self.published.positions.send_replace(positions.clone());
                    let mut s = self.published.status.lock().expect("status lock");
                    s.version = self.store.version();
                    if let Some(r) = s.rebuild.as_mut() {
                        r.phase = "switched".into();
                    }
                    tracing::info!(
                        projection = self.projection.name(),
                        version = self.store.version(),
                        "switched to the rebuilt model"
                    );
                }
                Err(e) => tracing::error!("cannot switch to the rebuilt model: {e}"),
            }
        }
        // Resume where the (possibly new) store stands.
        let current = assignment.elements();
        for e in &current {
            let offset =
                positions.get(&(e.topic().to_owned(), e.partition())).map_or(Offset::Beginning, |n| Offset::Offset(*n));
            if let Err(err) = consumer.seek(e.topic(), e.partition(), offset, Duration::from_secs(10)) {
                tracing::warn!("seek after switch: {err}");
            }
        }
        let _ = consumer.resume(&assignment);
    }

    /// Applies parked events that apply now (after a fix), each at most once.
    fn replay(&mut self, positions: &mut Positions) -> Result<ReplayReport, String> {
        let topic = self.config.topics.dlq(self.projection.name());
        let records = read_all(&self.config, &topic)?;
        let mut report = ReplayReport::default();
        let mut tx = self.store.begin().map_err(|e| e.to_string())?;
        let _ = positions;
        let mut seen = BTreeSet::new();
        for rec in records {
            let origin = |name: &str| {
                rec.headers
                    .iter()
                    .find(|(k, _)| k == name)
                    .and_then(|(_, v)| v.as_deref())
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            let (Some(t), Some(p), Some(o)) = (origin(DLQ_TOPIC), origin(DLQ_PARTITION), origin(DLQ_OFFSET)) else {
                report.still_failing.push(format!("dlq offset {}: no origin headers", rec.offset));
                continue;
            };
            let (Ok(p), Ok(o)) = (p.parse::<i32>(), o.parse::<i64>()) else {
                report.still_failing.push(format!("dlq offset {}: bad origin headers", rec.offset));
                continue;
            };
            if !seen.insert((t.clone(), p, o)) {
                continue; // Parked more than once (by a rebuild, by another instance).
            }
            if !S::is_parked(&mut tx, &t, p, o).map_err(|e| e.to_string())? {
                if S::replayed(&mut tx, &t, p, o).map_err(|e| e.to_string())? {
                    report.already_replayed += 1;
                } else {
                    report.not_parked_here += 1;
                }
                continue;
            }
            if origin(DLQ_TRUNCATED).is_some() {
                // A cut copy: the whole event is still at its origin.
                match read_one(&self.config, &t, p, o) {
                    Ok(Some(whole)) => {
                        replay_one(&*self.projection, &self.schemas, &mut tx, &whole, &mut report)?;
                    }
                    Ok(None) => report.still_failing.push(format!("{t}/{p}@{o}: no longer in its topic")),
                    Err(e) => report.still_failing.push(format!("{t}/{p}@{o}: reading it again: {e}")),
                }
                continue;
            }
            let original = Rec {
                topic: t.clone(),
                partition: p,
                offset: o,
                key: rec.key.clone(),
                value: rec.value.clone(),
                headers: rec.headers.iter().filter(|(k, _)| !k.starts_with("esk_dlq_")).cloned().collect(),
            };
            replay_one(&*self.projection, &self.schemas, &mut tx, &original, &mut report)?;
        }
        S::commit(tx).map_err(|e| e.to_string())?;
        // Queries waiting on positions re-read the model.
        self.published.positions.send_modify(|_| {});
        tracing::info!(projection = self.projection.name(), ?report, "replayed parked events");
        Ok(report)
    }
}

/// Applies one parked event again, if it applies now; marks it replayed.
fn replay_one<S: Store, P: Projection<S>>(
    projection: &P,
    schemas: &SchemaRegistry,
    tx: &mut S::Tx<'_>,
    original: &Rec,
    report: &mut ReplayReport,
) -> Result<(), String> {
    let (t, p, o) = (&original.topic, original.partition, original.offset);
    let event = match decode(original, schemas) {
        Ok(e) => e,
        Err(reason) => {
            report.still_failing.push(format!("{t}/{p}@{o}: {reason}"));
            return Ok(());
        }
    };
    S::event_begin(tx).map_err(|e| e.to_string())?;
    match projection.apply(tx, &event) {
        Ok(()) => {
            S::event_release(tx).map_err(|e| e.to_string())?;
            S::mark_replayed(tx, t, p, o).map_err(|e| e.to_string())?;
            report.replayed += 1;
        }
        Err(e) => {
            S::event_rollback(tx).map_err(|e| e.to_string())?;
            report.still_failing.push(format!("{t}/{p}@{o}: {e}"));
        }
    }
    Ok(())
}

/// The record at `offset` of `topic`/`partition` (read_committed), if it is still there.
fn read_one(config: &RunnerConfig, topic: &str, partition: i32, offset: i64) -> Result<Option<Rec>, String> {
    let consumer: BaseConsumer = config
        .kafka
        .committed_reader(&format!("{}-replay", config.group_id), Duration::from_millis(50))
        .create()
        .map_err(|e| e.to_string())?;
    let (low, high) =
        esk_kafka::watermarks(consumer.client(), topic, partition, config.kafka.timeout).map_err(|e| e.to_string())?;
    if offset < low || offset >= high {
        return Ok(None);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset)).map_err(|e| e.to_string())?;
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + config.kafka.timeout;
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) if m.offset() == offset => return Ok(Some(Rec::of(&m))),
            Some(Ok(m)) if m.offset() > offset => return Ok(None),
            Some(Err(e)) => return Err(e.to_string()),
            _ => {}
        }
    }
    Err(format!("no answer from {topic}/{partition} within {:?}", config.kafka.timeout))
}

fn ensure_dlq(config: &RunnerConfig, topic: &str) -> Result<(), StoreError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(StoreError::Io)?;
    rt.block_on(async {
        let admin = Admin::new(&config.kafka).map_err(|e| StoreError::Other(e.to_string()))?;
        let brokers = admin.broker_count().await.map_err(|e| StoreError::Other(e.to_string()))?;
        let partitions = admin
            .describe(&[config.topics.commands()])
            .await
            .ok()
            .and_then(|t| t.first().map(|t| t.partitions))
            .unwrap_or(1);
        admin
            .ensure(&[TopicKind::DeadLetters.spec(topic.to_owned(), partitions, Durability::for_brokers(brokers))])
            .await
            .map_err(|e| StoreError::Other(e.to_string()))?;
        Ok(())
    })
}

/// Sends parked events to the dead-letter topic, each whole or, when it would
/// not fit, as a cut copy with its origin (it can never fail for its size).
fn send_parked(producer: &FutureProducer, topic: &str, consumer: &str, parked: &[Parked]) -> Result<(), StoreError> {
    let mut deliveries = Vec::new();
    let limit = esk_wire::limits::Limits::default().record_bytes;
    for p in parked {
        tracing::warn!(
            topic = p.topic,
            partition = p.partition,
            offset = p.offset,
            reason = p.reason,
            "parked an event"
        );
        let l = dead_letter(
            p.key.as_deref(),
            p.value.as_deref(),
            &p.headers,
            &p.reason,
            Origin { topic: &p.topic, partition: p.partition, offset: p.offset },
            consumer,
            limit,
        );
        let mut record = FutureRecord::to(topic).headers(l.headers);
        if let Some(k) = &l.key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = &l.value {
            record = record.payload(v.as_slice());
        }
        deliveries.push(producer.send_result(record).map_err(|(e, _)| StoreError::Other(e.to_string()))?);
    }
    // The parked records must be durable before the checkpoint moves past them.
    for d in futures::executor::block_on(futures::future::join_all(deliveries)) {
        match d {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(StoreError::Other(format!("parking: {e}"))),
            Err(_) => return Err(StoreError::Other("parking: cancelled".into())),
        }
    }
    Ok(())
}

/// Every record of a topic up to its end.
fn read_all(config: &RunnerConfig, topic: &str) -> Result<Vec<Rec>, String> {
    let mut out = Vec::new();
    let group = format!("{}-replay", config.group_id);
    esk_kafka::read::read_topic(
        &config.kafka,
        &group,
        topic,
        |_| None,
        Duration::from_secs(120),
        |m| {
            out.push(Rec::of(m));
            Ok::<(), String>(())
        },
    )
    .map_err(|e| e.to_string())?;
    Ok(out)
}

/// Builds the next version of a model from offset 0, then hands it to the live loop.
struct Rebuild<S: Store, P> {
    config: RunnerConfig,
    projection: Arc<P>,
    schemas: Arc<SchemaRegistry>,
    store: Option<S>,
    published: Arc<Published>,
    to_live: Sender<FromRebuild<S>>,
}

impl<S: Store, P: Projection<S>> Rebuild<S, P> {
    fn set(&self, f: impl FnOnce(&mut RebuildStatus)) {
        if let Some(r) = self.published.status.lock().expect("status lock").rebuild.as_mut() {
            f(r);
        }
    }

    fn run(mut self) {
        if let Err(e) = self.build() {
            self.set(|r| {
                r.phase = "failed".into();
                r.error = Some(e.clone());
            });
            let _ = self.to_live.send(FromRebuild::Failed(e));
        }
    }

    fn build(&mut self) -> Result<(), String> {
        let started = Instant::now();
        let dlq_topic = self.config.topics.dlq(self.projection.name());
        let dlq: FutureProducer = self.config.kafka.producer(Sending::Parked).create().map_err(|e| e.to_string())?;
        let consumer: BaseConsumer = self
            .config
            .kafka
            .committed_reader(&format!("{}-rebuild", self.config.group_id), Duration::from_millis(50))
            .create()
            .map_err(|e| e.to_string())?;
        let mut assigned: BTreeSet<(String, i32)> = BTreeSet::new();
        let mut positions = Positions::new();
        let mut applied = 0u64;
        let mut paused_at: Option<Positions> = None;
        loop {
            // Follow every partition the live loop knows (new ones may appear).
            let live = self.published.positions.borrow().clone();
            let target = paused_at.as_ref().unwrap_or(&live);
            let missing: Vec<(String, i32)> = target.keys().filter(|k| !assigned.contains(*k)).cloned().collect();
            if !missing.is_empty() {
                assigned.extend(missing);
                let mut tpl = TopicPartitionList::new();
                for (t, p) in &assigned {
                    let offset = positions.get(&(t.clone(), *p)).map_or(Offset::Beginning, |n| Offset::Offset(*n));
                    tpl.add_partition_offset(t, *p, offset).map_err(|e| e.to_string())?;
                }
                consumer.assign(&tpl).map_err(|e| e.to_string())?;
            }
            let behind = |target: &Positions| {
                target.iter().filter(|(k, want)| positions.get(*k).copied().unwrap_or(0) < **want).count()
            };
            match &paused_at {
                Some(target) if behind(target) == 0 => {
                    let store = self.store.take().ok_or("the rebuilt store was handed over already")?;
                    self.set(|r| r.phase = "switching".into());
                    self.to_live.send(FromRebuild::Switch(store)).map_err(|_| "the live loop stopped")?;
                    tracing::info!(
                        projection = self.projection.name(),
                        applied,
                        ms = started.elapsed().as_millis() as u64,
                        "rebuild caught up"
                    );
                    return Ok(());
                }
                None if behind(&live) == 0 || near(&positions, &live) => {
                    let (tx, rx) = mpsc::channel();
                    self.to_live.send(FromRebuild::Pause(tx)).map_err(|_| "the live loop stopped")?;
                    let at = rx.recv_timeout(Duration::from_secs(60)).map_err(|_| "the live loop did not pause")?;
                    self.set(|r| r.phase = "catching-up".into());
                    paused_at = Some(at);
                    continue;
                }
                _ => {}
            }
            let batch = poll_batch(&consumer, self.config.max_batch.max(1000), Duration::from_millis(100))
                .map_err(|refused| refused.to_string())?;
            if batch.is_empty() {
                continue;
            }
            let store = self.store.as_mut().ok_or("the rebuilt store was handed over already")?;
            // What the rebuild cannot apply is parked like the live loop's,
            // in the new version's store and the dead-letter topic: a replay
            // on the new version then finds it.
            let mut failing = Failing::default();
            let mut tries = 0;
            loop {
                let mut send = |parked: &[Parked]| -> Result<(), StoreError> {
                    if parked.is_empty() {
                        return Ok(());
                    }
                    ensure_dlq(&self.config, &dlq_topic)?;
                    send_parked(&dlq, &dlq_topic, self.projection.name(), parked)
                };
                match apply_batch(
                    &*self.projection,
                    &self.schemas,
                    store,
                    &batch,
                    &mut positions,
                    &failing.poison,
                    &mut send,
                ) {
                    Ok((n, parked)) => {
                        applied += n + parked.len() as u64;
                        break;
                    }
                    Err(e) if tries < 20 + POISON_AFTER => {
                        tries += 1;
                        tracing::warn!("rebuild batch failed, retrying: {e}");
                        failing.failed(e);
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
            let listed_positions = listed(&positions);
            self.set(|r| {
                r.applied = applied;
                r.positions = listed_positions;
                r.started_ms_ago = started.elapsed().as_millis() as u64;
            });
        }
    }
}

/// Within a few hundred records of the live loop on every partition: time to pause it.
fn near(positions: &Positions, live: &Positions) -> bool {
    live.iter().all(|(k, want)| positions.get(k).copied().unwrap_or(0) + 500 >= *want)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::sqlite::SqliteStore;

    /// Inserts a row per event, then refuses a deposit of 13 (after its
    /// insert, so a refusal leaves a change behind that must be undone).
    struct RefusesThirteen;

    impl Projection<SqliteStore> for RefusesThirteen {
        fn name(&self) -> &str {
            "thirteen"
        }
        fn categories(&self) -> Vec<String> {
            vec!["account".into()]
        }
        fn migrate(&self, store: &mut SqliteStore) -> Result<(), StoreError> {
            store.execute_batch("CREATE TABLE seen (version INTEGER)")
        }
        fn apply(&self, tx: &mut rusqlite::Transaction<'_>, e: &Event) -> Result<(), ApplyError> {
            tx.prepare_cached("INSERT INTO seen (version) VALUES (?1)")?.execute([e.version as i64])?;
            if e.data["amount"] == 13 {
                return Err(ApplyError::Permanent("13 is refused".into()));
            }
            Ok(())
        }
    }

    fn deposit(offset: i64, amount: i64) -> Rec {
        let h = |k: &str, v: String| (k.to_owned(), Some(v.into_bytes()));
        Rec {
            topic: "t.events.account".into(),
            partition: 0,
            offset,
            key: Some(b"account-1".to_vec()),
            value: Some(format!(r#"{{"amount": {amount}}}"#).into_bytes()),
            headers: vec![
                h("ce_specversion", "1.0".into()),
                h("ce_id", format!("e{offset}")),
                h("ce_source", "test".into()),
                h("ce_type", "Deposited".into()),
                h("ce_time", "2026-12-02T10:00:00Z".into()),
                h("ce_subject", "account-1".into()),
                h("ce_streamversion", (offset + 1).to_string()),
                h("ce_dataschema", "urn:esk:schema:account:Deposited:v1".into()),
                h("content-type", "application/json".into()),
            ],
        }
    }

    /// The versions `RefusesThirteen` inserted, in the order it inserted them.
    fn seen(store: &SqliteStore) -> Vec<i64> {
        let mut stmt = store.connection().prepare("SELECT version FROM seen ORDER BY rowid").unwrap();
        stmt.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
    }

    /// The first pass has no savepoints: a refusal must roll the batch back
    /// and redo it with savepoints, so that the refused event's own changes
    /// are undone and every other event is applied exactly once.
    #[test]
    fn a_refused_event_is_undone_and_parked_and_the_rest_applied_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        RefusesThirteen.migrate(&mut store).unwrap();
        let batch: Vec<Rec> = [5, 13, 7, 13, 9].iter().enumerate().map(|(o, a)| deposit(o as i64, *a)).collect();
        let mut positions = Positions::new();
        let mut dead = Vec::new();
        let (applied, parked) = apply_batch(
            &RefusesThirteen,
            &SchemaRegistry::builtin(),
            &mut store,
            &batch,
            &mut positions,
            &HashMap::new(),
            &mut |p: &[Parked]| {
                dead.extend(p.iter().map(|p| p.offset));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(applied, 3);
        assert_eq!(parked.iter().map(|p| p.offset).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(dead, [1, 3], "the dead-letter sender saw the parked events once");
        let seen = seen(&store);
        assert_eq!(seen, [1, 3, 5], "the refused events' inserts are undone, the others applied once");
        assert_eq!(positions, [(("t.events.account".to_owned(), 0), 5)].into());
        assert_eq!(store.checkpoints().unwrap(), positions);
    }

    /// A long batch over two partitions: in order, the refused and the
    /// undecodable parked, the rest applied once, each partition's
    /// checkpoint after its last record.
    #[test]
    fn a_long_batch_applies_in_order_and_parks_exactly_the_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        RefusesThirteen.migrate(&mut store).unwrap();
        let n = 320;
        let batch: Vec<Rec> = (0..n)
            .map(|o| {
                let mut r = deposit(o, if o % 50 == 7 { 13 } else { 1 });
                r.partition = (o % 2) as i32;
                if o % 100 == 42 {
                    r.value = Some(b"{not json".to_vec());
                }
                r
            })
            .collect();
        let mut positions = Positions::new();
        let (applied, parked) = apply_batch(
            &RefusesThirteen,
            &SchemaRegistry::builtin(),
            &mut store,
            &batch,
            &mut positions,
            &HashMap::new(),
            &mut |_: &[Parked]| Ok(()),
        )
        .unwrap();
        let bad: Vec<i64> = (0..n).filter(|o| o % 50 == 7 || o % 100 == 42).collect();
        assert_eq!(parked.iter().map(|p| p.offset).collect::<Vec<_>>(), bad);
        assert_eq!(applied, (n as usize - bad.len()) as u64);
        let seen = seen(&store);
        let good: Vec<i64> = (0..n).filter(|o| !bad.contains(o)).map(|o| o + 1).collect();
        assert_eq!(seen, good, "applied once each, in the batch's order");
        let want: Positions =
            [(("t.events.account".to_owned(), 0), n - 1), (("t.events.account".to_owned(), 1), n)].into();
        assert_eq!(positions, want);
        assert_eq!(store.checkpoints().unwrap(), positions);
    }

    proptest! {
        /// No record of an events topic makes a projection's decoding panic.
        #[test]
        fn arbitrary_event_records_never_panic(
            headers in prop::collection::vec(
                (prop_oneof![
                    Just("ce_specversion".to_owned()), Just("ce_id".to_owned()), Just("ce_time".to_owned()),
                    Just("ce_subject".to_owned()), Just("ce_streamversion".to_owned()), Just("ce_type".to_owned()),
                    Just("ce_source".to_owned()), Just("ce_dataschema".to_owned()), Just("content-type".to_owned()),
                    "\\PC{0,12}",
                ], proptest::option::of(prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..24),
                    prop_oneof![Just("1.0"), Just("account-1"), Just("Deposited"), Just("2026-11-26T10:00:00Z"),
                                Just("3"), Just("urn:esk:schema:account:Deposited:v1"), Just("application/json")]
                        .prop_map(|s| s.as_bytes().to_vec()),
                ])),
                0..12),
            value in proptest::option::of(prop_oneof![
                prop::collection::vec(any::<u8>(), 0..64),
                Just(br#"{"amount": 5}"#.to_vec()),
                Just(br#"{"amount": "x"}"#.to_vec()),
            ]),
        ) {
            let rec = Rec { topic: "t.events.account".into(), partition: 0, offset: 1, key: None, value, headers };
            let _ = decode(&rec, &SchemaRegistry::builtin());
        }
    }
}
