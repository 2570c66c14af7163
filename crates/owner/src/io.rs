//! What a partition's handler works with.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use esk_kafka::KafkaConfig;
use esk_kafka::record::headers_of;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::group::{GroupConsumer, GroupContext};

/// One consumed record, owned.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Index of its topic in [`crate::GroupSpec::inputs`].
    pub input: usize,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// Wakes a handler when one of its queues gets records, or when it must stop.
#[derive(Debug, Default)]
pub(crate) struct Wake {
    flag: Mutex<bool>,
    cv: Condvar,
}

impl Wake {
    pub(crate) fn notify(&self) {
        *self.flag.lock().expect("wake lock") = true;
        self.cv.notify_one();
    }

    fn wait(&self, timeout: Duration) {
        let guard = self.flag.lock().expect("wake lock");
        let (mut guard, _) = self.cv.wait_timeout_while(guard, timeout, |woken| !*woken).expect("wake lock");
        *guard = false;
    }
}

/// One input queue of an owned partition: (partition, input index, topic, queue).
type Queue<'a> = (i32, usize, &'a str, &'a PartitionQueue<GroupContext>);

/// How much one `collect` takes at most. A lone record larger than `bytes`
/// is still taken: a batch always makes progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub records: usize,
    /// Keys and values, summed.
    pub bytes: usize,
}

/// Takes records from `queues`, one of each a turn beginning with the one
/// after the last call's first, until `bounds` or every queue is empty;
/// waits up to `wait` (woken by `wake`) for the first.
fn gather(
    queues: &[Queue<'_>],
    first: &std::sync::atomic::AtomicUsize,
    bounds: Bounds,
    wait: Duration,
    signal: &Signal,
) -> Vec<Incoming> {
    let Signal { stop, wake } = signal;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let deadline = Instant::now() + wait;
    let n = queues.len().max(1);
    let start = first.fetch_add(1, Ordering::Relaxed) % n;
    let full = |out: &Vec<Incoming>, bytes: usize| out.len() >= bounds.records || bytes >= bounds.bytes;
    loop {
        let mut open = vec![true; queues.len()];
        while !full(&out, bytes) && open.iter().any(|o| *o) {
            for k in 0..queues.len() {
                let i = (start + k) % n;
                let (partition, input, topic, q) = queues[i];
                if !open[i] || full(&out, bytes) {
                    continue;
                }
                match q.poll(Duration::ZERO) {
                    Some(Ok(m)) => {
                        let record = Incoming {
                            input,
                            topic: topic.to_owned(),
                            partition: m.partition(),
                            offset: m.offset(),
                            key: m.key().map(<[u8]>::to_vec),
                            payload: m.payload().map(<[u8]>::to_vec),
                            headers: headers_of(&m),
                        };
                        bytes += record.key.as_ref().map_or(0, Vec::len) + record.payload.as_ref().map_or(0, Vec::len);
                        out.push(record);
                    }
                    Some(Err(e)) => {
                        tracing::warn!(partition, "fetch: {e}");
                        open[i] = false;
                    }
                    None => open[i] = false,
                }
            }
        }
        let now = Instant::now();
        if !out.is_empty() || stop.load(Ordering::SeqCst) || now >= deadline {
            return out;
        }
        wake.wait(deadline - now);
    }
}

/// A handler's stop signal: set on a revoke or shutdown, with the wake-up of
/// its queues.
#[derive(Debug, Clone, Default)]
pub struct Signal {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) wake: Arc<Wake>,
}

impl Signal {
    pub(crate) fn set(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.notify();
    }
}

/// What a handler holds while the group gives it a partition or a shard:
/// its stop signal.
pub trait Lease {
    fn signal(&self) -> &Signal;
    /// For logs: `partition 3`, `shard 0 (partitions [0, 2])`.
    fn describe(&self) -> String;

    /// Whether the handler must return (revoke or shutdown).
    fn stopped(&self) -> bool {
        self.signal().stop.load(Ordering::SeqCst)
    }

    /// The stop flag, for long work (a restore) that must end early.
    fn stop_flag(&self) -> &AtomicBool {
        &self.signal().stop
    }

    /// Sleeps up to `d`, waking at once when told to stop.
    fn pause(&self, d: Duration) {
        let Signal { stop, wake } = self.signal();
        let until = Instant::now() + d;
        while !stop.load(Ordering::SeqCst) && Instant::now() < until {
            wake.wait(Duration::from_millis(100).min(until.saturating_duration_since(Instant::now())));
        }
    }
}

/// Marks a shard's `partitions` in `set` (`on`) or takes them out.
pub fn mark(set: &mut std::collections::BTreeSet<i32>, partitions: &[i32], on: bool) {
    for p in partitions {
        if on {
            set.insert(*p);
        } else {
            set.remove(p);
        }
    }
}

/// The partitions a shard owns together, with one stop signal: a writer
/// shard's handler writes them all in one transaction at a time.
pub struct ShardIo {
    pub shard: i32,
    pub(crate) parts: Vec<PartitionIo>,
    pub(crate) signal: Signal,
    pub(crate) first: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for ShardIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardIo").field("shard", &self.shard).field("partitions", &self.partitions()).finish()
    }
}

impl ShardIo {
    /// The shard's partitions, in order.
    pub fn partitions(&self) -> Vec<i32> {
        self.parts.iter().map(|p| p.partition).collect()
    }

    /// One of the shard's partitions.
    pub fn part(&self, partition: i32) -> Option<&PartitionIo> {
        self.parts.iter().find(|p| p.partition == partition)
    }

    /// Its partitions, each on its own (a service that owns partitions one by
    /// one has shards of one partition).
    pub fn into_parts(self) -> Vec<PartitionIo> {
        self.parts
    }

    /// Takes what the shard's queues hold within `bounds`, one record of each
    /// queue of each partition a turn (a flood on one input or partition
    /// cannot starve another); waits up to `wait` for the first record. A
    /// lone record is never held back.
    pub fn collect(&self, bounds: Bounds, wait: Duration) -> Vec<Incoming> {
        let queues: Vec<Queue<'_>> = self
            .parts
            .iter()
            .flat_map(|p| p.queues.iter().map(move |(i, t, q)| (p.partition, *i, t.as_str(), q)))
            .collect();
        gather(&queues, &self.first, bounds, wait, &self.signal)
    }
}

impl Lease for ShardIo {
    fn signal(&self) -> &Signal {
        &self.signal
    }

    fn describe(&self) -> String {
        format!("shard {} (partitions {:?})", self.shard, self.partitions())
    }
}

impl Lease for PartitionIo {
    fn signal(&self) -> &Signal {
        &self.signal
    }

    fn describe(&self) -> String {
        format!("partition {}", self.partition)
    }
}

/// An owned partition's input queues, its stop signal, and its group.
pub struct PartitionIo {
    pub partition: i32,
    pub(crate) consumer: Arc<GroupConsumer>,
    pub(crate) queues: Vec<(usize, String, PartitionQueue<GroupContext>)>,
    pub(crate) signal: Signal,
    /// The queue `collect` polls first, moved on each call: taken one record
    /// at a time, every input still gets its turn.
    pub(crate) first: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for PartitionIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionIo").field("partition", &self.partition).finish_non_exhaustive()
    }
}

impl PartitionIo {
    /// Takes what the queues hold, up to `max`, one record of each queue a turn
    /// (a flood on one input cannot starve another), beginning with another
    /// queue each call; waits up to `wait` for the first record. A lone record
    /// is never held back.
    pub fn collect(&self, max: usize, wait: Duration) -> Vec<Incoming> {
        let queues: Vec<Queue<'_>> = self.queues.iter().map(|(i, t, q)| (self.partition, *i, t.as_str(), q)).collect();
        let bounds = Bounds { records: max, bytes: usize::MAX };
        gather(&queues, &self.first, bounds, wait, &self.signal)
    }

    /// Commits `next` (input topic → next offset) to the group outside any
    /// transaction, for the tools that show a group's lag from its offsets
    /// (`kafka-consumer-groups --describe`). A handler that keeps its
    /// positions with its own records resumes from those, never from these: a
    /// commit lost or refused (a rebalance) costs nothing but a stale figure.
    pub fn advise(&self, next: &BTreeMap<String, i64>) {
        let mut tpl = TopicPartitionList::new();
        for (topic, n) in next {
            if tpl.add_partition_offset(topic, self.partition, Offset::Offset(*n)).is_err() {
                return;
            }
        }
        if tpl.count() > 0
            && let Err(e) = self.consumer.commit(&tpl, CommitMode::Async)
        {
            tracing::debug!(partition = self.partition, "advisory offset commit: {e}");
        }
    }

    /// Seeks every input queue to its committed offset: what a new owner, or an
    /// owner after an aborted transaction, must process next.
    pub fn rewind(&self, timeout: Duration) -> Result<()> {
        self.rewind_to(&BTreeMap::new(), timeout)
    }

    /// Seeks each input queue to the next offset `known` gives for its topic
    /// (a handler that keeps its positions with its own records), the others
    /// to the group's committed offset (or the beginning when it has none).
    pub fn rewind_to(&self, known: &BTreeMap<String, i64>, timeout: Duration) -> Result<()> {
        let mut targets: Vec<(String, Offset)> = Vec::new();
        let mut tpl = TopicPartitionList::new();
        for (_, topic, _) in &self.queues {
            match known.get(topic) {
                Some(n) => targets.push((topic.clone(), Offset::Offset(*n))),
                None => {
                    tpl.add_partition(topic, self.partition);
                }
            }
        }
        if tpl.count() > 0 {
            let committed = self.consumer.committed_offsets(tpl, timeout)?;
            for e in committed.elements() {
                let offset = match e.offset() {
                    Offset::Offset(n) => Offset::Offset(n),
                    _ => Offset::Beginning,
                };
                targets.push((e.topic().to_owned(), offset));
            }
        }
        for (topic, offset) in targets {
            let mut tries = 0;
            loop {
                match self.consumer.seek(&topic, self.partition, offset, Duration::from_secs(5)) {
                    Ok(()) => break,
                    Err(_) if self.stopped() => return Ok(()),
                    // Right after an assignment the fetcher may not be ready for a seek.
                    Err(err) if tries < 50 => {
                        tries += 1;
                        tracing::debug!(topic = topic.as_str(), "seek retry: {err}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(err) => {
                        return Err(anyhow!("seeking {}/{} to {offset:?}: {err}", topic.as_str(), self.partition));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Creates the transactional producer of one partition and fences every
/// earlier producer with the same `transactional_id`: their open transaction
/// is aborted now and their later writes fail.
pub fn fence(
    kafka: &KafkaConfig,
    transactional_id: &str,
    transaction_timeout_ms: u64,
    probe_topic: &str,
) -> Result<FutureProducer> {
    let producer: FutureProducer =
        kafka.transactional_producer(transactional_id, Duration::from_millis(transaction_timeout_ms)).create()?;
    // Connect to a broker first: librdkafka looks for the transaction
    // coordinator through a broker it learned from metadata (the bootstrap
    // connection does not count), and if none is up yet it looks again only
    // after 500 ms. Asking a partition leader for its watermarks opens such a
    // connection and waits for it (metadata first: see `esk_kafka::watermarks`).
    // All of it is bounded by the transaction timeout: a handler told to stop
    // meanwhile holds up the group's rebalance. A timed-out fencing is retried.
    let timeout = Duration::from_millis(transaction_timeout_ms);
    let deadline = Instant::now() + timeout;
    esk_kafka::watermarks(producer.client(), probe_topic, 0, timeout).context("connecting the producer")?;
    // A previous owner that died in a transaction has it aborted by the
    // broker, which meanwhile refuses the new producer id
    // (CONCURRENT_TRANSACTIONS); librdkafka asks again only after 500 ms, but
    // at once when init_transactions is called again. So it is called in
    // short slices: a timed-out slice resumes the same initialisation.
    loop {
        let slice = INIT_SLICE.min(deadline.saturating_duration_since(Instant::now()));
        match producer.init_transactions(slice) {
            Ok(()) => return Ok(producer),
            Err(KafkaError::Transaction(e)) if e.is_retriable() && Instant::now() < deadline => {}
            Err(e) => return Err(e).context("init_transactions (fencing the previous owner)"),
        }
    }
}

/// How long one init_transactions call waits before asking for a producer id
/// again (see [`fence`]).
const INIT_SLICE: Duration = Duration::from_millis(25);

/// Where an owned partition's loop is, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Fencing the previous owner and restoring.
    Starting,
    Serving,
    /// The producer was fenced or broke (or a commit's outcome is unknown).
    Lost,
}

/// The life of an owned partition: `acquire` (fence, restore, rewind), then
/// `serve` until the partition is taken away (`Ok`) or the producer is lost
/// (`Err`). After a loss it waits a session timeout before acquiring again: if
/// this process was frozen, its group session has expired and a revoke is on
/// its way; acquiring at once would fence the new owner back. Failures to
/// acquire are retried with backoff.
///
/// A partition given up cleanly lets go of what it owned (its producer) on
/// another thread: closing a Kafka client takes a while, and the rebalance
/// waits for this handler.
pub fn own<O: Send + 'static>(
    io: &dyn Lease,
    session_timeout: Duration,
    mut acquire: impl FnMut() -> Result<Option<O>>,
    mut serve: impl FnMut(&mut O) -> Result<()>,
    mut phase: impl FnMut(Phase),
) {
    let unit = io.describe();
    let mut backoff = Duration::from_millis(200);
    while !io.stopped() {
        phase(Phase::Starting);
        match acquire() {
            Ok(Some(mut owned)) => {
                phase(Phase::Serving);
                backoff = Duration::from_millis(200);
                match serve(&mut owned) {
                    Ok(()) => {
                        let _ = std::thread::Builder::new().name("esk-let-go".into()).spawn(move || drop(owned));
                        break;
                    }
                    Err(e) => {
                        phase(Phase::Lost);
                        tracing::warn!("{unit}: giving up the producer: {e:#}");
                        drop(owned);
                        io.pause(session_timeout);
                        continue;
                    }
                }
            }
            Ok(None) => break,
            Err(e) => tracing::warn!("{unit}: cannot take it over yet: {e:#}"),
        }
        io.pause(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    tracing::info!("{unit}: handler stopped");
}
