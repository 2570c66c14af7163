//! One owned partition: fence, restore, then serve batches, one Kafka
//! transaction each.
//!
//! Fencing: the producer's `transactional.id` is `<prefix>-writer-p<N>`, the
//! same for every instance that ever owns partition N. `init_transactions`
//! bumps its epoch, which aborts the previous owner's open transaction at once
//! and makes every later write of that owner fail.
//!
//! Where the partition is in its inputs is not committed to the consumer
//! group: every transaction that consumed anything also writes the
//! consumed-positions record (`ConsumedRecord`, key `CONSUMED_KEY`) to the
//! partition's state topic, so it commits with what it produced, and a new
//! owner (or an owner after an abort) resumes from what the store took of it.
//! That saves AddOffsetsToTxn and TxnOffsetCommit, two sequential round trips
//! and a transaction-log write a transaction (ADR 11). An installation whose
//! state topic has no such record yet resumes from the group's offsets.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use chrono::Utc;
use esk_kafka::admin::{Durability, TopicKind};
use esk_kafka::record::{Origin, dead_letter};
use esk_owner::txn::{self, TxnError, classify};
use esk_owner::{Handler, PartitionIo, Phase};
use esk_wire::protocol::{CONSUMED_KEY, ConsumedRecord, IndexPage, ParticipantMessage};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::Shared;
use crate::batch::{Batch, Incoming};
use crate::memory::{Committed, PartitionMemory, consumed_position};

/// Serves the partitions the writer group assigns to this instance.
#[derive(Debug)]
pub struct WriterHandler {
    pub shared: Arc<Shared>,
}

impl Handler for WriterHandler {
    fn run(&self, io: PartitionIo) {
        Run { shared: self.shared.clone(), partition: io.partition, io }.main();
    }

    fn revoked(&self) {
        *self.shared.assigned.lock().expect("assigned lock") = None;
        self.shared.status.lock().expect("status lock").partitions.clear();
        metrics::gauge!("esk_writer_partitions").set(0.0);
    }

    fn assigned(&self, partitions: &[i32]) {
        *self.shared.assigned.lock().expect("assigned lock") = Some(partitions.to_vec());
    }
}

struct Run {
    shared: Arc<Shared>,
    partition: i32,
    io: PartitionIo,
}

/// A partition this worker owns: its fenced producer and its memory.
struct Owned {
    producer: FutureProducer,
    memory: PartitionMemory,
    /// Next offset of each events topic's partition, when known.
    next_offsets: HashMap<String, i64>,
    /// Next offset to process of each input, as last committed (the
    /// consumed-positions record); inputs not in it resume from the group's.
    consumed: BTreeMap<String, i64>,
    /// What was last committed to the group for the lag tools.
    advised: BTreeMap<String, i64>,
}

/// What one transaction is made of.
enum Work {
    /// Records to decide, and holds to ask the coordinator about.
    Decide(Vec<Incoming>, Vec<(String, String)>),
    /// A record whose batch could not be written: refuse it with the reason.
    Refuse(Incoming, String),
    /// A record whose refusal could not be written: park a cut copy of it.
    Park(Incoming, String),
}

/// Why a batch did not commit.
enum Failure {
    /// Abort, rewind to the committed offsets, go on.
    Abortable(anyhow::Error),
    /// Failed before the transaction began: rewind and go on.
    BeforeBegin(anyhow::Error),
    /// A record the batch made could not be written (too large, refused by
    /// the broker): abort if the transaction began, then take the inputs one
    /// at a time and refuse the one that makes it.
    Rejected { error: anyhow::Error, began: bool },
    /// The events' offsets were not the predicted ones: abort, and go on with
    /// these next offsets (past the abort marker).
    Mispredicted(anyhow::Error, HashMap<String, i64>),
    /// The producer is fenced or broken, a commit's outcome is unknown, or
    /// the local store failed: acquire the partition anew.
    Fatal(anyhow::Error),
}

impl From<TxnError> for Failure {
    fn from(e: TxnError) -> Self {
        match e {
            TxnError::Abortable(e) => Failure::Abortable(e),
            TxnError::Rejected(error) => Failure::Rejected { error, began: true },
            TxnError::Fatal(e) => Failure::Fatal(e),
        }
    }
}

/// What a committed batch did, for metrics.
struct Done {
    voted_yes: bool,
    retries_answered: u64,
    expired: u64,
}

/// How long a partition waits after committing a batch of `n` records before
/// it begins the next: the commit gap, plus 5 ms for each record beyond the
/// first, up to the linger (when the linger is larger).
fn linger(gap_us: u64, linger_us: u64, n: usize) -> Duration {
    let busy = gap_us.saturating_add(5_000u64.saturating_mul(n.saturating_sub(1) as u64));
    Duration::from_micros(busy.min(linger_us.max(gap_us)))
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

impl Run {
    fn set_phase(&self, phase: &'static str) {
        let mut status = self.shared.status.lock().expect("status lock");
        status.partitions.entry(self.partition).or_default().phase = phase;
        let owned = status.partitions.len();
        drop(status);
        metrics::gauge!("esk_writer_partitions").set(owned as f64);
    }

    /// Owned, the partition's store is this worker's to write: the hot
    /// standby passes it over (and reads it again from the store's position
    /// once the partition is given up).
    fn own_store(&self, owned: bool) {
        let mut set = self.shared.owned.write().expect("owned lock");
        if owned {
            set.insert(self.partition);
        } else {
            set.remove(&self.partition);
        }
    }

    fn main(self) {
        esk_owner::own(
            &self.io,
            Duration::from_millis(self.shared.config.session_timeout_ms),
            || self.acquire(),
            |owned| self.serve(owned),
            |phase| match phase {
                Phase::Starting => {
                    self.own_store(true);
                    self.set_phase("starting");
                }
                Phase::Serving => self.set_phase("serving"),
                Phase::Lost => {
                    self.own_store(false);
                    self.set_phase("fenced");
                    metrics::counter!("esk_writer_fenced_total").increment(1);
                }
            },
        );
        self.own_store(false);
    }

    /// Fences the previous owner, restores the partition and rewinds the input
    /// queues to the committed offsets. `None` when told to stop meanwhile.
    fn acquire(&self) -> Result<Option<Owned>> {
        let c = &self.shared.config;
        let started = Instant::now();
        let producer = esk_owner::io::fence(
            &self.shared.kafka,
            &c.transactional_id(self.partition),
            c.transaction_timeout_ms,
            &self.shared.topics.commands(),
        )?;
        let fenced_ms = started.elapsed().as_millis() as u64;
        if self.io.stopped() {
            return Ok(None);
        }
        self.set_phase("restoring");
        let mut store = self.shared.store.partition(self.partition)?;
        if !crate::restore::restore(&self.shared, self.partition, &mut store, self.io.stop_flag())? {
            return Ok(None);
        }
        let mut memory = PartitionMemory::new(self.partition, store, c.stream_cache as usize, self.shared.horizon_ms);
        let holds = memory.load_holds()?;
        let consumed = memory.consumed()?;
        let restored_ms = started.elapsed().as_millis() as u64;
        self.io.rewind_to(&consumed, Duration::from_millis(c.transaction_timeout_ms))?;
        tracing::info!(
            partition = self.partition,
            ms = started.elapsed().as_millis() as u64,
            fenced_ms,
            restored_ms,
            open_holds = holds,
            "partition taken over"
        );
        Ok(Some(Owned { producer, memory, next_offsets: HashMap::new(), consumed, advised: BTreeMap::new() }))
    }

    fn abort(&self, owned: &Owned) -> Result<()> {
        metrics::counter!("esk_writer_aborts_total").increment(1);
        owned
            .producer
            .abort_transaction(Duration::from_millis(self.shared.config.transaction_timeout_ms))
            .map_err(|e| anyhow!("abort_transaction failed: {e}"))
    }

    fn rewind(&self, owned: &Owned) -> Result<()> {
        self.io.rewind_to(&owned.consumed, Duration::from_millis(self.shared.config.transaction_timeout_ms))
    }

    /// What the clock asks for, at most once a second: decisions of holds
    /// open past their deadline, expiry of what the horizon forgets, gauges.
    fn tick(&self, owned: &mut Owned, last: &mut Instant, expired_at: &mut Instant) -> Vec<(String, String)> {
        if last.elapsed() < Duration::from_secs(1) {
            return Vec::new();
        }
        *last = Instant::now();
        let grace = self.shared.config.hold_grace_ms as i64;
        let asks = owned.memory.overdue(now_ms(), grace, grace);
        if !asks.is_empty() {
            tracing::info!(partition = self.partition, holds = asks.len(), "asking for the decisions of overdue holds");
            metrics::counter!("esk_writer_hold_asks_total").increment(asks.len() as u64);
        }
        if expired_at.elapsed() > Duration::from_secs(10) {
            *expired_at = Instant::now();
            // Pages of 10,000 for up to 200 ms every 10 s: whatever came in
            // an horizon ago goes, at far more rows a second than a
            // partition takes in.
            let deadline = Instant::now() + Duration::from_millis(200);
            while Instant::now() < deadline {
                match owned.memory.expire(now_ms()) {
                    Ok(n) if n >= 10_000 => continue,
                    Ok(n) => {
                        if n > 0 {
                            tracing::debug!(partition = self.partition, n, "forgot answers past the horizon");
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(partition = self.partition, "expiring answers: {e}");
                        break;
                    }
                }
            }
        }
        // For the tools that read the group's offsets, when they moved; the
        // partition resumes from its consumed-positions record.
        if owned.advised != owned.consumed {
            self.io.advise(&owned.consumed);
            owned.advised.clone_from(&owned.consumed);
        }
        let p = self.partition.to_string();
        metrics::gauge!("esk_writer_cached_streams", "partition" => p.clone()).set(owned.memory.cached() as f64);
        metrics::gauge!("esk_writer_open_holds", "partition" => p).set(owned.memory.open_holds() as f64);
        metrics::gauge!("esk_writer_store_bytes").set(self.shared.store.disk_bytes() as f64);
        asks
    }

    /// Serves batches until told to stop (`Ok`) or the producer is lost (`Err`).
    ///
    /// A batch whose records cannot be written (`Failure::Rejected`) makes its
    /// records suspects: they are taken again one at a time, without the
    /// clock's asks, until each has been written or refused alone (its client
    /// answered, or it is parked), and the partition goes on: no input makes
    /// it retry for ever. Other failures retry with backoff.
    fn serve(&self, owned: &mut Owned) -> Result<()> {
        let mut failures = 0u32;
        let max = self.shared.config.max_batch as usize;
        let mut suspects: HashSet<(String, i64)> = HashSet::new();
        let (mut ticked, mut expired) = (Instant::now() - Duration::from_secs(2), Instant::now());
        let c = &self.shared.config;
        let mut last_commit: Option<(Instant, usize)> = None;
        while !self.io.stopped() {
            // Not too soon after the last commit, and longer after a busy one
            // (see `Config::commit_gap_us` and `Config::batch_linger_us`).
            if let Some((at, n)) = last_commit.take() {
                let wait = linger(c.commit_gap_us, c.batch_linger_us, n);
                if let Some(left) = (at + wait).checked_duration_since(Instant::now()) {
                    metrics::histogram!("esk_writer_linger_seconds").record(left.as_secs_f64());
                    std::thread::sleep(left);
                }
            }
            let isolating = !suspects.is_empty();
            let asks = if isolating { Vec::new() } else { self.tick(owned, &mut ticked, &mut expired) };
            let records = self.io.collect(if isolating { 1 } else { max }, Duration::from_millis(100));
            if records.is_empty() && asks.is_empty() {
                continue;
            }
            let keys: Vec<(String, i64)> = records.iter().map(|r| (r.topic.clone(), r.offset)).collect();
            let alone = (records.len() == 1 && asks.is_empty()).then(|| records[0].clone());
            let clock_only = records.is_empty();
            let started = Instant::now();
            match self.transact(owned, Work::Decide(records, asks)) {
                Ok(done) => {
                    failures = 0;
                    for k in &keys {
                        suspects.remove(k);
                    }
                    self.committed(owned, keys.len(), started, &done);
                    last_commit = Some((Instant::now(), keys.len()));
                }
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Rejected { error, began }) => {
                    if began {
                        self.abort(owned)?;
                    }
                    self.rewind(owned)?;
                    if let Some(record) = alone {
                        let reason = format!("{error:#}");
                        tracing::warn!(
                            partition = self.partition,
                            topic = record.topic,
                            offset = record.offset,
                            "refusing a record that cannot be written: {reason}"
                        );
                        metrics::counter!("esk_writer_refused_inputs_total").increment(1);
                        suspects.remove(&(record.topic.clone(), record.offset));
                        self.refuse(owned, record, reason, &mut failures)?;
                    } else if clock_only {
                        // Only the clock's asks: no input is to blame.
                        tracing::error!(
                            partition = self.partition,
                            "the asks for overdue holds cannot be written: {error:#}"
                        );
                        self.io.pause(Duration::from_secs(1));
                    } else {
                        tracing::warn!(
                            partition = self.partition,
                            records = keys.len(),
                            "a batch cannot be written ({error:#}): taking its records one at a time"
                        );
                        suspects.extend(keys);
                    }
                }
                Err(failure) => self.failed(owned, failure, &mut failures)?,
            }
        }
        Ok(())
    }

    /// Refuses one record in a transaction of its own, then rewinds past it.
    /// A refusal that cannot be written either is parked as a cut copy.
    fn refuse(&self, owned: &mut Owned, record: Incoming, reason: String, failures: &mut u32) -> Result<()> {
        for work in [Work::Refuse(record.clone(), reason.clone()), Work::Park(record, reason)] {
            match self.transact(owned, work) {
                Ok(_) => return self.rewind(owned),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Rejected { error, began }) => {
                    if began {
                        self.abort(owned)?;
                    }
                    tracing::warn!(partition = self.partition, "the refusal cannot be written either ({error:#})");
                    self.rewind(owned)?;
                }
                Err(failure) => return self.failed(owned, failure, failures),
            }
        }
        // Not even a cut copy: the broker refuses whatever the record is.
        self.failed(owned, Failure::BeforeBegin(anyhow!("a cut dead letter was refused")), failures)
    }

    /// After a failed batch: abort if needed, rewind, back off.
    fn failed(&self, owned: &mut Owned, failure: Failure, failures: &mut u32) -> Result<()> {
        *failures += 1;
        let (Failure::Abortable(e)
        | Failure::BeforeBegin(e)
        | Failure::Rejected { error: e, .. }
        | Failure::Mispredicted(e, _)
        | Failure::Fatal(e)) = &failure;
        tracing::warn!(partition = self.partition, failures, "batch failed, retrying: {e:#}");
        if let Failure::Abortable(_) | Failure::Mispredicted(..) = failure {
            self.abort(owned)?;
        }
        owned.next_offsets = match failure {
            Failure::Mispredicted(_, next) => next,
            _ => HashMap::new(),
        };
        self.rewind(owned)?;
        // The same records come again: back off so a persistent failure does not spin.
        self.io.pause(Duration::from_millis(100 * u64::from((*failures).min(50))));
        Ok(())
    }

    fn committed(&self, owned: &Owned, n: usize, started: Instant, done: &Done) {
        if done.voted_yes {
            esk_runtime::fault_point("after-vote");
        }
        metrics::counter!("esk_writer_batches_total").increment(1);
        metrics::counter!("esk_writer_records_total").increment(n as u64);
        metrics::counter!("esk_writer_retries_answered_total").increment(done.retries_answered);
        metrics::counter!("esk_writer_expired_requests_total").increment(done.expired);
        metrics::histogram!("esk_writer_batch_records").record(n as f64);
        metrics::histogram!("esk_writer_transaction_seconds").record(started.elapsed().as_secs_f64());
        let mut status = self.shared.status.lock().expect("status lock");
        let s = status.partitions.entry(self.partition).or_default();
        s.batches += 1;
        s.records += n as u64;
        s.cached_streams = owned.memory.cached();
        s.open_holds = owned.memory.open_holds();
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
    fn predict_offsets(
        &self,
        next_offsets: &HashMap<String, i64>,
        events: &[crate::batch::OutEvent],
    ) -> Result<Vec<i64>, Failure> {
        let mut next: HashMap<&str, i64> = HashMap::new();
        let mut predicted = Vec::with_capacity(events.len());
        for e in events {
            let offset = match next.get_mut(e.category.as_str()) {
                Some(n) => n,
                None => {
                    let topic = self.shared.topics.events(&e.category);
                    let start = match next_offsets.get(&topic) {
                        Some(n) => *n,
                        None => self
                            .shared
                            .high_watermark(&topic, self.partition)
                            .map_err(|e| Failure::BeforeBegin(anyhow!("watermarks of {topic}: {e}")))?,
                    };
                    next.entry(e.category.as_str()).or_insert(start)
                }
            };
            predicted.push(*offset);
            *offset += 1;
        }
        Ok(predicted)
    }

    /// Decides `work` and writes it in one Kafka transaction; after the
    /// commit, the partition's memory takes the new records.
    fn transact(&self, owned: &mut Owned, work: Work) -> Result<Done, Failure> {
        let shared = &self.shared;
        let p = self.partition;
        // Bounded by the transaction timeout: a handler stuck in a call holds up rebalances.
        let timeout = Duration::from_millis(shared.config.transaction_timeout_ms);
        let ctx = shared.batch_context();
        let now = Utc::now();
        owned.memory.set_now(now.timestamp_millis());
        let Owned { producer, memory, next_offsets, consumed: resume, .. } = owned;
        let mut batch = Batch::new(memory, now);
        match work {
            Work::Decide(records, asks) => {
                for r in records {
                    batch.handle(&ctx, r);
                }
                for (txid, stream) in &asks {
                    batch.ask(&ctx, txid, stream);
                }
            }
            Work::Refuse(record, reason) => batch.refuse(&ctx, record, &reason),
            Work::Park(record, reason) => batch.park_cut(record, &reason),
        }
        if let Some(e) = batch.store_failure.take() {
            return Err(Failure::Fatal(anyhow!("the local store failed: {e}")));
        }
        let categories: BTreeSet<String> = batch.events.iter().map(|e| e.category.clone()).collect();
        self.ensure_events_topics(&categories).map_err(Failure::BeforeBegin)?;
        let predicted = self.predict_offsets(next_offsets, &batch.events)?;
        let events: Vec<(String, esk_wire::Event)> =
            batch.events.iter().map(|e| (shared.topics.events(&e.category), e.event.clone())).collect();
        let votes = std::mem::take(&mut batch.votes);
        let dead = std::mem::take(&mut batch.dead_letters);
        let consumed = std::mem::take(&mut batch.consumed);
        let (retries_answered, expired) = (batch.retries_answered, batch.expired);
        let finished =
            batch.finish(&ctx, p, &predicted).map_err(|o| Failure::Rejected { error: anyhow!(o.0), began: false })?;

        let t_begin = Instant::now();
        producer.begin_transaction().map_err(|e| Failure::from(classify(e)))?;
        let send = |topic: &str,
                    partition: i32,
                    key: &[u8],
                    value: Option<&[u8]>,
                    headers: Option<OwnedHeaders>,
                    ts: Option<i64>| {
            let mut record = FutureRecord::to(topic).partition(partition).key(key);
            if let Some(v) = value {
                record = record.payload(v);
            }
            if let Some(h) = headers {
                record = record.headers(h);
            }
            if let Some(ts) = ts {
                record = record.timestamp(ts);
            }
            producer.send_result(record).map_err(|(err, _)| Failure::from(classify(err)))
        };
        // The events, then what carries their positions: state records (in event
        // order, which replicas rely on), what is remembered, replies, votes,
        // dead letters. One transaction; nothing is visible to read_committed
        // readers before commit.
        let mut deliveries = Vec::with_capacity(events.len() + finished.records.len() + finished.replies.len());
        for (topic, e) in &events {
            let headers = e
                .headers()
                .iter()
                .fold(OwnedHeaders::new(), |h, (k, v)| h.insert(Header { key: k, value: v.as_deref() }));
            let ts = e.time.timestamp_millis();
            let value = e.value();
            deliveries.push(send(topic, p, e.stream.as_str().as_bytes(), Some(&value), Some(headers), Some(ts))?);
        }
        let state_topic = shared.topics.state();
        for (page, value) in &finished.pages {
            let key = IndexPage::key(&page.stream, page.first_version());
            deliveries.push(send(&state_topic, p, key.as_bytes(), Some(value), None, None)?);
        }
        for (r, value) in &finished.records {
            deliveries.push(send(&state_topic, p, r.stream.as_bytes(), Some(value), None, None)?);
        }
        let answers_topic = shared.topics.answers();
        for (m, value) in &finished.memories {
            deliveries.push(send(&answers_topic, p, m.stream().as_bytes(), Some(value), None, None)?);
        }
        let replies_topic = shared.topics.replies();
        for (part, id, value) in &finished.replies {
            deliveries.push(send(&replies_topic, *part, id.as_bytes(), Some(value), None, None)?);
        }
        let votes_topic = shared.topics.tx_votes();
        for (part, txid, message) in &votes {
            let value = serde_json::to_vec(message).map_err(|e| Failure::BeforeBegin(anyhow!(e)))?;
            deliveries.push(send(&votes_topic, *part, txid.as_bytes(), Some(&value), None, None)?);
        }
        // Where the partition is in its inputs after this transaction: with
        // what the transaction produced, on the state topic.
        let mut next_consumed = resume.clone();
        for (topic, last) in &consumed {
            let next = next_consumed.entry(topic.clone()).or_insert(0);
            *next = (*next).max(last + 1);
        }
        let positions = (!consumed.is_empty()).then(|| ConsumedRecord { v: 1, next: next_consumed.clone() });
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
            let origin = Origin { topic: &o.topic, partition: o.partition, offset: o.offset };
            // A cut copy is forced by asking for a limit nothing fits.
            let limit = if d.cut { 0 } else { shared.limits.record_bytes };
            let l = dead_letter(o.key.as_deref(), o.payload.as_deref(), &o.headers, &d.reason, origin, "writer", limit);
            let key = l.key.unwrap_or_default();
            deliveries.push(send(&dlq_topic, p, &key, l.value.as_deref(), Some(l.headers), None)?);
            metrics::counter!("esk_writer_dead_letters_total").increment(1);
        }
        if let Some(record) = &positions {
            let value = serde_json::to_vec(record).map_err(|e| Failure::BeforeBegin(anyhow!(e)))?;
            deliveries.push(send(&state_topic, p, CONSUMED_KEY.as_bytes(), Some(&value), None, None)?);
        }
        // Wait for every delivery here: rdkafka's commit_transaction flushes
        // first, and its flush polls in 100 ms steps while anything is in flight.
        // `message.timeout.ms` bounds the wait.
        let mut delivered = txn::await_deliveries(deliveries)?;
        let positions_offset = if positions.is_some() { delivered.pop() } else { None };
        let t_sent = Instant::now();
        let (event_offsets, rest) = delivered.split_at(events.len());
        let (page_offsets, rest) = rest.split_at(finished.pages.len());
        let (state_offsets, rest) = rest.split_at(finished.records.len());
        let answer_offsets = &rest[..finished.memories.len()];
        if event_offsets != predicted.as_slice() {
            metrics::counter!("esk_writer_offset_mispredictions_total").increment(1);
            // Every event was delivered: after the abort marker, each partition
            // goes on right after it.
            let mut after_abort = HashMap::new();
            for ((topic, _), offset) in events.iter().zip(event_offsets) {
                let next = after_abort.entry(topic.clone()).or_insert(0);
                *next = (*next).max(offset + 2);
            }
            return Err(Failure::Mispredicted(
                anyhow!(
                    "events landed at other offsets than their positions say (first {:?}, predicted {:?}): retrying",
                    event_offsets.first(),
                    predicted.first()
                ),
                after_abort,
            ));
        }
        txn::commit_only(producer, timeout, self.io.stop_flag())?;
        // Each partition written gets one commit marker after its last record.
        for ((topic, _), offset) in events.iter().zip(event_offsets) {
            let next = next_offsets.entry(topic.clone()).or_insert(0);
            *next = (*next).max(offset + 2);
        }
        metrics::counter!("esk_writer_events_total").increment(events.len() as u64);
        metrics::counter!("esk_writer_answers_remembered_total").increment(finished.memories.len() as u64);
        let mut committed = Committed::default();
        if let Some(last) = state_offsets.iter().chain(page_offsets).chain(&positions_offset).max() {
            committed.positions.push((state_topic, last + 1));
        }
        if positions.is_some() {
            committed.positions.extend(next_consumed.iter().map(|(t, n)| (consumed_position(t), *n)));
        }
        if let Some(last) = answer_offsets.iter().max() {
            committed.positions.push((answers_topic, last + 1));
        }
        committed.records = finished.records.into_iter().zip(state_offsets).map(|((r, v), o)| (r, v, *o)).collect();
        committed.memories = finished.memories.into_iter().zip(answer_offsets).map(|((m, _), o)| (m, *o)).collect();
        committed.pages = finished.pages.into_iter().zip(page_offsets).map(|((p, v), o)| (p, v, *o)).collect();
        // The transaction is committed: a store that cannot take it is
        // behind Kafka, so the partition is restored afresh from its topics.
        memory.absorb(committed).map_err(|e| Failure::Fatal(anyhow!("the local store failed after a commit: {e}")))?;
        *resume = next_consumed;
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1000.0;
        tracing::debug!(produce_ms = ms(t_begin, t_sent), commit_ms = ms(t_sent, Instant::now()), "committed");
        let voted_yes = votes.iter().any(|(_, _, m)| matches!(m, ParticipantMessage::Vote(v) if v.yes));
        Ok(Done { voted_yes, retries_answered, expired })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_request_waits_only_the_commit_gap_and_a_busy_partition_up_to_the_linger() {
        let ms = Duration::from_millis;
        assert_eq!(linger(5_000, 20_000, 1), ms(5));
        assert_eq!(linger(5_000, 20_000, 0), ms(5));
        assert_eq!(linger(5_000, 20_000, 2), ms(10));
        assert_eq!(linger(5_000, 20_000, 4), ms(20));
        assert_eq!(linger(5_000, 20_000, 500), ms(20));
        // Off: only the gap.
        assert_eq!(linger(5_000, 0, 500), ms(5));
        assert_eq!(linger(0, 0, 500), ms(0));
        assert_eq!(linger(0, 20_000, usize::MAX), ms(20));
    }
}
