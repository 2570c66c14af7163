//! What a partition's handler works with.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use esk_kafka::KafkaConfig;
use esk_kafka::record::headers_of;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerGroupMetadata};
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

/// An owned partition's input queues, its stop signal, and its group.
pub struct PartitionIo {
    pub partition: i32,
    pub(crate) consumer: Arc<GroupConsumer>,
    pub(crate) queues: Vec<(usize, String, PartitionQueue<GroupContext>)>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) wake: Arc<Wake>,
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
    /// Whether the handler must return (revoke or shutdown).
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The stop flag, for long work (a restore) that must end early.
    pub fn stop_flag(&self) -> &AtomicBool {
        &self.stop
    }

    /// Sleeps up to `d`, waking at once when told to stop.
    pub fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stopped() && Instant::now() < until {
            self.wake.wait(Duration::from_millis(100).min(until.saturating_duration_since(Instant::now())));
        }
    }

    /// The group's metadata, for `send_offsets_to_transaction`.
    pub fn group_metadata(&self) -> Option<ConsumerGroupMetadata> {
        self.consumer.group_metadata()
    }

    /// Takes what the queues hold, up to `max`, one record of each queue a turn
    /// (a flood on one input cannot starve another), beginning with another
    /// queue each call; waits up to `wait` for the first record. A lone record
    /// is never held back.
    pub fn collect(&self, max: usize, wait: Duration) -> Vec<Incoming> {
        let mut out = Vec::new();
        let deadline = Instant::now() + wait;
        let n = self.queues.len().max(1);
        let first = self.first.fetch_add(1, Ordering::Relaxed) % n;
        loop {
            let mut open = vec![true; self.queues.len()];
            while out.len() < max && open.iter().any(|o| *o) {
                for k in 0..self.queues.len() {
                    let i = (first + k) % n;
                    let (input, topic, q) = &self.queues[i];
                    if !open[i] || out.len() >= max {
                        continue;
                    }
                    match q.poll(Duration::ZERO) {
                        Some(Ok(m)) => out.push(Incoming {
                            input: *input,
                            topic: topic.clone(),
                            partition: m.partition(),
                            offset: m.offset(),
                            key: m.key().map(<[u8]>::to_vec),
                            payload: m.payload().map(<[u8]>::to_vec),
                            headers: headers_of(&m),
                        }),
                        Some(Err(e)) => {
                            tracing::warn!(partition = self.partition, "fetch: {e}");
                            open[i] = false;
                        }
                        None => open[i] = false,
                    }
                }
            }
            let now = Instant::now();
            if !out.is_empty() || self.stopped() || now >= deadline {
                return out;
            }
            self.wake.wait(deadline - now);
        }
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
    io: &PartitionIo,
    session_timeout: Duration,
    mut acquire: impl FnMut() -> Result<Option<O>>,
    mut serve: impl FnMut(&mut O) -> Result<()>,
    mut phase: impl FnMut(Phase),
) {
    let p = io.partition;
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
                        tracing::warn!(partition = p, "giving up the producer: {e:#}");
                        drop(owned);
                        io.pause(session_timeout);
                        continue;
                    }
                }
            }
            Ok(None) => break,
            Err(e) => tracing::warn!(partition = p, "cannot take over the partition yet: {e:#}"),
        }
        io.pause(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    tracing::info!(partition = p, "partition handler stopped");
}
