//! One owned partition: fence, restore, then serve batches, one Kafka
//! transaction each.
//!
//! Fencing: the producer's `transactional.id` is `<prefix>-writer-p<N>`, the
//! same for every instance that ever owns partition N. `init_transactions`
//! bumps its epoch, which aborts the previous owner's open transaction at once
//! and makes every later write of that owner fail. Every transaction also
//! carries the consumer group's metadata (`send_offsets_to_transaction`), so a
//! zombie whose group generation is stale cannot commit either.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use chrono::Utc;
use esk_kafka::admin::{Durability, TopicKind};
use esk_wire::protocol::StreamRecord;
use rdkafka::consumer::Consumer;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::Shared;
use crate::batch::{Batch, Incoming, PartitionState, Source};
use crate::group::{GroupConsumer, GroupContext};

type Queue = (Source, String, PartitionQueue<GroupContext>);

/// A running partition worker.
#[derive(Debug)]
pub struct Worker {
    stop: Arc<AtomicBool>,
    wake: Arc<Wake>,
    thread: Option<JoinHandle<()>>,
}

/// Wakes a worker when one of its queues gets records, or when it must stop.
#[derive(Debug, Default)]
struct Wake {
    flag: Mutex<bool>,
    cv: Condvar,
}

impl Wake {
    fn notify(&self) {
        *self.flag.lock().expect("wake lock") = true;
        self.cv.notify_one();
    }

    fn wait(&self, timeout: Duration) {
        let guard = self.flag.lock().expect("wake lock");
        let (mut guard, _) = self.cv.wait_timeout_while(guard, timeout, |woken| !*woken).expect("wake lock");
        *guard = false;
    }
}

impl Worker {
    pub fn spawn(shared: Arc<Shared>, consumer: Arc<GroupConsumer>, partition: i32, mut queues: Vec<Queue>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(Wake::default());
        for (_, _, q) in &mut queues {
            let w = wake.clone();
            q.set_nonempty_callback(move || w.notify());
        }
        let run = Run { shared, consumer, partition, queues, stop: stop.clone(), wake: wake.clone() };
        let thread = std::thread::Builder::new()
            .name(format!("writer-p{partition}"))
            .spawn(move || run.main())
            .expect("spawning a partition worker");
        Self { stop, wake, thread: Some(thread) }
    }

    pub fn signal_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.notify();
    }

    pub fn join(mut self) {
        self.signal_stop();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("a partition worker panicked");
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

struct Run {
    shared: Arc<Shared>,
    consumer: Arc<GroupConsumer>,
    partition: i32,
    queues: Vec<Queue>,
    stop: Arc<AtomicBool>,
    wake: Arc<Wake>,
}

/// A partition this worker owns: its fenced producer and its restored state.
struct Owned {
    producer: FutureProducer,
    state: PartitionState,
    /// Next offset of each events topic's partition, when known.
    next_offsets: HashMap<String, i64>,
}

/// Why a transaction did not commit.
enum Failure {
    /// Abort, rewind to the committed offsets, go on.
    Abortable(anyhow::Error),
    /// Failed before the transaction began: rewind and go on.
    BeforeBegin(anyhow::Error),
    /// The events' offsets were not the predicted ones: abort, and go on with
    /// these next offsets (past the abort marker).
    Mispredicted(anyhow::Error, HashMap<String, i64>),

    /// The producer is fenced or broken: acquire the partition anew.
    Fatal(anyhow::Error),
}

fn classify(e: KafkaError) -> Failure {
    let fenced = matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::InvalidProducerIdMapping
        )
    );
    let fatal = match &e {
        KafkaError::Transaction(rde) => rde.is_fatal(),
        _ => false,
    };
    if fenced || fatal { Failure::Fatal(anyhow!(e)) } else { Failure::Abortable(anyhow!(e)) }
}

/// Runs a transactional call, again while it fails with a retriable error.
/// An error that requires an abort means the transaction did not commit; an
/// outcome still unknown after the retries is fatal, so that the partition is
/// acquired afresh and its state restored from what did commit. Never abort
/// after a commit whose outcome is unknown: the rewind could skip a batch that
/// was committed.
fn retrying(what: &str, mut call: impl FnMut() -> Result<(), KafkaError>) -> Result<(), Failure> {
    for attempt in 1..=3 {
        match call() {
            Ok(()) => return Ok(()),
            Err(KafkaError::Transaction(e)) if e.is_fatal() => return Err(Failure::Fatal(anyhow!("{what}: {e}"))),
            Err(KafkaError::Transaction(e)) if e.txn_requires_abort() => {
                return Err(Failure::Abortable(anyhow!("{what}: {e}")));
            }
            Err(e) => tracing::warn!(attempt, "{what} failed, retrying: {e}"),
        }
    }
    Err(Failure::Fatal(anyhow!("{what}: outcome unknown after 3 attempts")))
}

impl Run {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn set_phase(&self, phase: &'static str) {
        let mut status = self.shared.status.lock().expect("status lock");
        status.partitions.entry(self.partition).or_default().phase = phase;
        let owned = status.partitions.len();
        drop(status);
        metrics::gauge!("esk_writer_partitions").set(owned as f64);
    }

    fn main(self) {
        let p = self.partition;
        let mut backoff = Duration::from_millis(200);
        while !self.stopped() {
            self.set_phase("starting");
            match self.acquire() {
                Ok(Some(mut owned)) => {
                    self.set_phase("serving");
                    backoff = Duration::from_millis(200);
                    match self.serve(&mut owned) {
                        Ok(()) => break,
                        Err(e) => {
                            self.set_phase("fenced");
                            metrics::counter!("esk_writer_fenced_total").increment(1);
                            tracing::warn!(partition = p, "giving up the producer: {e:#}");
                            drop(owned);
                            // Fenced (or the commit's outcome is unknown): if this
                            // writer was frozen, its group session has expired and
                            // a revoke is on its way; wait a session timeout for it
                            // rather than fence the new owner back.
                            self.pause(Duration::from_millis(self.shared.config.session_timeout_ms));
                            continue;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(partition = p, "cannot take over the partition yet: {e:#}");
                }
            }
            // A fenced writer waits before trying again, so that a rebalance it
            // has not seen yet can stop it first; a zombie never gets to commit
            // anyway (its group generation is stale).
            self.pause(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        tracing::info!(partition = p, "partition worker stopped");
    }

    fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stopped() && Instant::now() < until {
            self.wake.wait(Duration::from_millis(100));
        }
    }

    /// Fences the previous owner, restores the partition and rewinds the input
    /// queues to the committed offsets. `None` when told to stop meanwhile.
    fn acquire(&self) -> Result<Option<Owned>> {
        let c = &self.shared.config;
        let producer: FutureProducer = self
            .shared
            .kafka
            .client()
            .set("transactional.id", c.transactional_id(self.partition))
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("transaction.timeout.ms", c.transaction_timeout_ms.to_string())
            .set("linger.ms", "0")
            .set("compression.type", "lz4")
            .set("message.timeout.ms", c.transaction_timeout_ms.to_string())
            .create()?;
        let started = Instant::now();
        // Connect first: librdkafka asks for a producer id as soon as a broker is
        // up, but retries only every 500 ms if none is up yet.
        producer
            .client()
            .fetch_metadata(Some(&self.shared.topics.commands()), c.kafka_timeout())
            .context("connecting the producer")?;
        producer.init_transactions(c.kafka_timeout()).context("init_transactions (fencing the previous owner)")?;
        if self.stopped() {
            return Ok(None);
        }
        self.set_phase("restoring");
        let Some(state) = crate::restore::restore(&self.shared, self.partition, &self.stop)? else {
            return Ok(None);
        };
        self.shared.status.lock().expect("status lock").partitions.entry(self.partition).or_default().streams =
            state.streams.len();
        self.rewind()?;
        tracing::info!(partition = self.partition, ms = started.elapsed().as_millis() as u64, "partition taken over");
        Ok(Some(Owned { producer, state, next_offsets: HashMap::new() }))
    }

    /// Seeks every input queue to its committed offset: what a new owner, or a
    /// writer after an aborted transaction, must process next.
    fn rewind(&self) -> Result<()> {
        let timeout = self.shared.config.kafka_timeout();
        let mut tpl = TopicPartitionList::new();
        for (_, topic, _) in &self.queues {
            tpl.add_partition(topic, self.partition);
        }
        let committed = self.consumer.committed_offsets(tpl, timeout)?;
        for e in committed.elements() {
            let offset = match e.offset() {
                Offset::Offset(n) => Offset::Offset(n),
                _ => Offset::Beginning,
            };
            let mut tries = 0;
            loop {
                match self.consumer.seek(e.topic(), self.partition, offset, Duration::from_secs(5)) {
                    Ok(()) => break,
                    Err(_) if self.stopped() => return Ok(()),
                    // Right after an assignment the fetcher may not be ready for a seek.
                    Err(err) if tries < 50 => {
                        tries += 1;
                        tracing::debug!(topic = e.topic(), "seek retry: {err}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(err) => {
                        return Err(anyhow!("seeking {}/{} to {offset:?}: {err}", e.topic(), self.partition));
                    }
                }
            }
        }
        Ok(())
    }

    /// Takes what the queues hold, up to the batch limit; waits briefly for the first record.
    fn collect(&self) -> Vec<Incoming> {
        let max = self.shared.config.max_batch as usize;
        let mut out = Vec::new();
        for _ in 0..2 {
            // Round-robin over commands, prepares and decisions, one record each
            // a turn, so that a flood of commands cannot starve 2PC traffic.
            let mut open = vec![true; self.queues.len()];
            while out.len() < max && open.iter().any(|o| *o) {
                for (i, (source, topic, q)) in self.queues.iter().enumerate() {
                    if !open[i] || out.len() >= max {
                        continue;
                    }
                    match q.poll(Duration::ZERO) {
                        Some(Ok(m)) => out.push(Incoming {
                            source: *source,
                            topic: topic.clone(),
                            partition: m.partition(),
                            offset: m.offset(),
                            key: m.key().map(<[u8]>::to_vec),
                            payload: m.payload().map(<[u8]>::to_vec),
                            headers: m
                                .headers()
                                .map(|h| h.iter().map(|x| (x.key.to_owned(), x.value.map(<[u8]>::to_vec))).collect())
                                .unwrap_or_default(),
                        }),
                        Some(Err(e)) => {
                            tracing::warn!(partition = self.partition, "fetch: {e}");
                            open[i] = false;
                        }
                        None => open[i] = false,
                    }
                }
            }
            if !out.is_empty() || self.stopped() {
                break;
            }
            self.wake.wait(Duration::from_millis(100));
        }
        out
    }

    /// Serves batches until told to stop (`Ok`) or the producer is lost (`Err`).
    fn serve(&self, owned: &mut Owned) -> Result<()> {
        let mut failures = 0u32;
        while !self.stopped() {
            let records = self.collect();
            if records.is_empty() {
                continue;
            }
            let n = records.len();
            let started = Instant::now();
            match self.transact(owned, records) {
                Ok(records) => {
                    failures = 0;
                    owned.state.absorb(records);
                    metrics::counter!("esk_writer_batches_total").increment(1);
                    metrics::counter!("esk_writer_records_total").increment(n as u64);
                    metrics::histogram!("esk_writer_batch_size").record(n as f64);
                    metrics::histogram!("esk_writer_transaction_seconds").record(started.elapsed().as_secs_f64());
                    let mut status = self.shared.status.lock().expect("status lock");
                    let s = status.partitions.entry(self.partition).or_default();
                    s.batches += 1;
                    s.records += n as u64;
                    s.streams = owned.state.streams.len();
                }
                Err(Failure::Fatal(e)) => return Err(e),
                Err(failure) => {
                    failures += 1;
                    let (Failure::Abortable(e)
                    | Failure::BeforeBegin(e)
                    | Failure::Mispredicted(e, _)
                    | Failure::Fatal(e)) = &failure;
                    tracing::warn!(partition = self.partition, failures, "batch failed, retrying: {e:#}");
                    if let Failure::Abortable(_) | Failure::Mispredicted(..) = failure {
                        metrics::counter!("esk_writer_aborts_total").increment(1);
                        if let Err(e) = owned.producer.abort_transaction(self.shared.config.kafka_timeout()) {
                            return Err(anyhow!("abort_transaction failed: {e}"));
                        }
                    }
                    owned.next_offsets = match failure {
                        Failure::Mispredicted(_, next) => next,
                        _ => HashMap::new(),
                    };
                    self.rewind()?;

                    // The same records come again: back off so a persistent
                    // failure does not spin.
                    self.pause(Duration::from_millis(100 * u64::from(failures.min(50))));
                }
            }
        }
        Ok(())
    }

    fn ensure_events_topics(&self, categories: &BTreeSet<String>) -> Result<()> {
        let missing: Vec<String> = {
            let known = self.shared.known_topics.lock().expect("topics lock");
            categories.iter().map(|c| self.shared.topics.events(c)).filter(|t| !known.contains(t)).collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let admin = &self.shared.admin;
        let existing = self.shared.runtime.block_on(admin.describe(&missing))?;
        let brokers = self.shared.runtime.block_on(admin.broker_count())?;
        let mut create = Vec::new();
        for name in &missing {
            match existing.iter().find(|t| &t.name == name) {
                Some(t) if t.partitions != self.shared.partitions => {
                    let reason = format!(
                        "{name} has {} partitions; esk needs {} (the platform's count) to keep one writer per partition",
                        t.partitions, self.shared.partitions
                    );
                    tracing::error!("{reason}");
                    let category = name.strip_prefix(&self.shared.topics.events_prefix()).unwrap_or(name);
                    self.shared.unusable.lock().expect("unusable lock").insert(category.to_owned(), reason.clone());
                    // The retry decides the batch anew and refuses this category's requests.
                    return Err(anyhow!(reason));
                }
                Some(_) => {}
                None => create.push(TopicKind::Events.spec(
                    name.clone(),
                    self.shared.partitions,
                    Durability::for_brokers(brokers),
                )),
            }
        }
        if !create.is_empty() {
            self.shared.runtime.block_on(admin.ensure(&create))?;
            tracing::info!(topics = ?create.iter().map(|s| &s.name).collect::<Vec<_>>(), "created events topics");
        }
        self.shared.known_topics.lock().expect("topics lock").extend(missing);
        Ok(())
    }

    /// The offsets the batch's events will get: each events partition's next
    /// offset, known from the previous transaction (its last record + 1, plus 1
    /// for its commit or abort marker) or asked from the broker on first use.
    /// `transact` checks them against the delivery reports before committing,
    /// so a wrong guess costs an aborted transaction, never a wrong position.
    fn predict_offsets(&self, owned: &mut Owned, batch: &Batch<'_>) -> Result<Vec<i64>, Failure> {
        let mut next: HashMap<&str, i64> = HashMap::new();
        let mut predicted = Vec::with_capacity(batch.events.len());
        for e in &batch.events {
            let offset = match next.get_mut(e.category.as_str()) {
                Some(n) => n,
                None => {
                    let topic = self.shared.topics.events(&e.category);
                    let start = match owned.next_offsets.get(&topic) {
                        Some(n) => *n,
                        None => {
                            let (_, high) = owned
                                .producer
                                .client()
                                .fetch_watermarks(&topic, self.partition, self.shared.config.kafka_timeout())
                                .map_err(|e| Failure::BeforeBegin(anyhow!("watermarks of {topic}: {e}")))?;

                            high
                        }
                    };
                    next.entry(e.category.as_str()).or_insert(start)
                }
            };
            predicted.push(*offset);
            *offset += 1;
        }
        Ok(predicted)
    }

    fn transact(&self, owned: &mut Owned, records: Vec<Incoming>) -> Result<Vec<StreamRecord>, Failure> {
        let shared = &self.shared;
        let p = self.partition;
        let timeout = shared.config.kafka_timeout();
        let ctx = shared.batch_context();
        let now = Utc::now();
        let state = std::mem::take(&mut owned.state);
        let mut batch = Batch::new(&state);
        for r in records {
            batch.handle(&ctx, r, now);
        }
        let categories: BTreeSet<String> = batch.events.iter().map(|e| e.category.clone()).collect();
        let prepared = self
            .ensure_events_topics(&categories)
            .map_err(Failure::BeforeBegin)
            .and_then(|()| self.predict_offsets(owned, &batch));
        let predicted = match prepared {
            Ok(p) => p,
            Err(e) => {
                drop(batch);
                owned.state = state;
                return Err(e);
            }
        };
        let events: Vec<(String, esk_wire::Event)> =
            batch.events.iter().map(|e| (shared.topics.events(&e.category), e.event.clone())).collect();
        let votes = std::mem::take(&mut batch.votes);
        let dead = std::mem::take(&mut batch.dead_letters);
        let consumed = std::mem::take(&mut batch.consumed);
        let finished = batch.finish(p, &predicted);
        owned.state = state;

        let producer = &owned.producer;
        let t_begin = Instant::now();
        producer.begin_transaction().map_err(classify)?;
        let send =
            |topic: &str, partition: i32, key: &[u8], value: &[u8], headers: Option<OwnedHeaders>, ts: Option<i64>| {
                let mut record = FutureRecord::to(topic).partition(partition).key(key).payload(value);
                if let Some(h) = headers {
                    record = record.headers(h);
                }
                if let Some(ts) = ts {
                    record = record.timestamp(ts);
                }
                producer.send_result(record).map_err(|(err, _)| classify(err))
            };
        // The events, then what carries their positions: state records (in event
        // order, which replicas rely on), replies, votes, dead letters. One
        // transaction; nothing is visible to read_committed readers before commit.
        let mut event_deliveries = Vec::with_capacity(events.len());
        for (topic, e) in &events {
            let headers = e
                .headers()
                .iter()
                .fold(OwnedHeaders::new(), |h, (k, v)| h.insert(Header { key: k, value: v.as_deref() }));
            let ts = e.time.timestamp_millis();
            event_deliveries.push(send(topic, p, e.stream.as_str().as_bytes(), &e.value(), Some(headers), Some(ts))?);
        }
        let mut deliveries = Vec::new();
        let state_topic = shared.topics.state();
        for r in &finished.records {
            let value = serde_json::to_vec(r).expect("stream records serialize");
            deliveries.push(send(&state_topic, p, r.stream.as_bytes(), &value, None, None)?);
        }
        let replies_topic = shared.topics.replies();
        for (part, id, reply) in &finished.replies {
            let value = serde_json::to_vec(reply).expect("replies serialize");
            deliveries.push(send(&replies_topic, *part, id.as_bytes(), &value, None, None)?);
        }
        let votes_topic = shared.topics.tx_votes();
        for (part, txid, message) in &votes {
            let value = serde_json::to_vec(message).expect("votes serialize");
            deliveries.push(send(&votes_topic, *part, txid.as_bytes(), &value, None, None)?);
        }
        let dlq_topic = shared.topics.dlq("writer");
        for d in &dead {
            let o = &d.original;
            tracing::warn!(
                topic = o.topic,
                partition = o.partition,
                offset = o.offset,
                reason = d.reason,
                "parked a record"
            );
            let mut h = OwnedHeaders::new();
            for (k, v) in &o.headers {
                h = h.insert(Header { key: k, value: v.as_deref() });
            }
            let (offset, partition) = (o.offset.to_string(), o.partition.to_string());
            for (k, v) in [
                ("esk_dlq_reason", d.reason.as_str()),
                ("esk_dlq_topic", o.topic.as_str()),
                ("esk_dlq_partition", partition.as_str()),
                ("esk_dlq_offset", offset.as_str()),
                ("esk_dlq_consumer", "writer"),
            ] {
                h = h.insert(Header { key: k, value: Some(v) });
            }
            let key = o.key.as_deref().unwrap_or_default();
            deliveries.push(send(&dlq_topic, p, key, o.payload.as_deref().unwrap_or_default(), Some(h), None)?);
            metrics::counter!("esk_writer_dead_letters_total").increment(1);
        }
        // Wait for every delivery here: rdkafka's commit_transaction flushes
        // first, and its flush polls in 100 ms steps while anything is in flight.
        // `message.timeout.ms` bounds the wait.
        let (event_results, other_results) = futures::executor::block_on(futures::future::join(
            futures::future::join_all(event_deliveries),
            futures::future::join_all(deliveries),
        ));
        let t_sent = Instant::now();
        let mut delivered = Vec::with_capacity(event_results.len());
        for d in event_results.into_iter().chain(other_results) {
            match d {
                Ok(Ok(delivery)) => delivered.push(delivery.offset),
                Ok(Err((err, _))) => return Err(classify(err)),
                Err(_) => return Err(Failure::Abortable(anyhow!("a delivery was cancelled"))),
            }
        }
        delivered.truncate(events.len());
        if delivered != predicted {
            metrics::counter!("esk_writer_offset_mispredictions_total").increment(1);
            // Every event was delivered: after the abort marker, each partition
            // goes on right after it.
            let mut after_abort = HashMap::new();
            for ((topic, _), offset) in events.iter().zip(&delivered) {
                let next = after_abort.entry(topic.clone()).or_insert(0);
                *next = (*next).max(offset + 2);
            }
            return Err(Failure::Mispredicted(
                anyhow!(
                    "events landed at other offsets than their positions say (first {:?}, predicted {:?}): retrying",
                    delivered.first(),
                    predicted.first()
                ),
                after_abort,
            ));
        }
        let mut tpl = TopicPartitionList::new();
        for (topic, offset) in &consumed {
            tpl.add_partition_offset(topic, p, Offset::Offset(offset + 1))
                .map_err(|e| Failure::Abortable(anyhow!(e)))?;
        }
        let group =
            self.consumer.group_metadata().ok_or_else(|| Failure::Abortable(anyhow!("no consumer group metadata")))?;
        retrying("send_offsets_to_transaction", || producer.send_offsets_to_transaction(&tpl, &group, timeout))?;
        let t_offsets = Instant::now();
        retrying("commit_transaction", || producer.commit_transaction(timeout))?;
        // Each partition written gets one commit marker after its last record.
        for ((topic, _), offset) in events.iter().zip(&delivered) {
            let next = owned.next_offsets.entry(topic.clone()).or_insert(0);
            *next = (*next).max(offset + 2);
        }
        metrics::counter!("esk_writer_events_total").increment(events.len() as u64);
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1000.0;
        tracing::debug!(
            produce_ms = ms(t_begin, t_sent),
            offsets_ms = ms(t_sent, t_offsets),
            commit_ms = ms(t_offsets, Instant::now()),
            "committed"
        );
        Ok(finished.records)
    }
}
