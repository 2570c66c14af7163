//! One owned shard: fence, restore its partitions, then serve batches, one
//! Kafka transaction each over every partition of the shard that has work.
//!
//! Fencing: the producer's `transactional.id` is `<prefix>-writer-s<K>`, the
//! same for every instance that ever owns shard K (the partitions p with
//! `p % shards == K`, fixed for the installation). `init_transactions` bumps
//! its epoch, which aborts the previous owner's open transaction at once and
//! makes every later write of that owner fail. One transaction at a time a
//! shard: a busy shard's transactions grow with the load instead of each
//! partition paying a transaction of its own (ADR 11, fifth round).
//!
//! Where each partition is in its inputs is not committed to the consumer
//! group: every transaction that consumed anything of a partition also writes
//! that partition's consumed-positions record (`ConsumedRecord`, key
//! `CONSUMED_KEY`) to its state partition, so it commits with what it
//! produced, and a new owner (or an owner after an abort) resumes from what
//! the store took of it. An installation whose state topic has no such
//! record yet resumes from the group's offsets.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use chrono::{DateTime, Utc};
use esk_kafka::admin::{Durability, TopicKind};
use esk_kafka::record::{Origin, dead_letter};
use esk_owner::txn::{self, TxnError, classify};
use esk_owner::{Bounds, Handler, Lease, Phase, ShardIo};
use esk_wire::protocol::{CONSUMED_KEY, ConsumedRecord, IndexPage, ParticipantMessage};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use crate::Shared;
use crate::batch::{Batch, DeadLetter, Finished, Incoming};
use crate::memory::{Committed, PartitionMemory, consumed_position};

/// Serves the shards the writer group assigns to this instance.
#[derive(Debug)]
pub struct WriterHandler {
    pub shared: Arc<Shared>,
}

impl Handler for WriterHandler {
    fn run(&self, io: ShardIo) {
        Run { shared: self.shared.clone(), partitions: io.partitions(), io }.main();
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
    partitions: Vec<i32>,
    io: ShardIo,
}

/// A shard this worker owns: its fenced producer and its partitions.
struct Owned {
    producer: FutureProducer,
    parts: BTreeMap<i32, Part>,
}

/// An owned partition of the shard.
struct Part {
    memory: PartitionMemory,
    /// Next offset of each events topic's partition, when known.
    next_offsets: HashMap<String, i64>,
    /// Next offset to process of each input, as last committed (the
    /// consumed-positions record); inputs not in it resume from the group's.
    consumed: BTreeMap<String, i64>,
    /// What was last committed to the group for the lag tools.
    advised: BTreeMap<String, i64>,
}

/// A hold to ask the coordinator about: (partition, txid, stream).
type Ask = (i32, String, String);

/// What one transaction is made of.
enum Work {
    /// Records to decide, and holds to ask the coordinator about.
    Decide(Vec<Incoming>, Vec<Ask>),
    /// A record whose batch could not be written: refuse it with the reason.
    Refuse(Incoming, String),
    /// A record whose refusal could not be written: park a cut copy of it.
    Park(Incoming, String),
}

/// One partition's share of a transaction.
enum PartWork {
    Decide(Vec<Incoming>, Vec<(String, String)>),
    Refuse(Incoming, String),
    Park(Incoming, String),
}

impl Work {
    fn by_partition(self) -> BTreeMap<i32, PartWork> {
        let mut out = BTreeMap::new();
        match self {
            Work::Decide(records, asks) => {
                for r in records {
                    let entry = out.entry(r.partition).or_insert_with(|| PartWork::Decide(Vec::new(), Vec::new()));
                    if let PartWork::Decide(records, _) = entry {
                        records.push(r);
                    }
                }
                for (p, txid, stream) in asks {
                    let entry = out.entry(p).or_insert_with(|| PartWork::Decide(Vec::new(), Vec::new()));
                    if let PartWork::Decide(_, asks) = entry {
                        asks.push((txid, stream));
                    }
                }
            }
            Work::Refuse(r, reason) => {
                out.insert(r.partition, PartWork::Refuse(r, reason));
            }
            Work::Park(r, reason) => {
                out.insert(r.partition, PartWork::Park(r, reason));
            }
        }
        out
    }
}

/// A partition's share of a transaction, decided: what to write.
struct Decided {
    partition: i32,
    /// (events topic, event), in the order written.
    events: Vec<(String, esk_wire::Event)>,
    predicted: Vec<i64>,
    votes: Vec<(i32, String, ParticipantMessage)>,
    dead: Vec<DeadLetter>,
    finished: Finished,
    /// The partition's consumed positions after the transaction, and whether
    /// it consumed anything (then its record is written).
    next_consumed: BTreeMap<String, i64>,
    positions: Option<ConsumedRecord>,
    records: usize,
    retries_answered: u64,
    expired: u64,
}

/// What a partition's share got when it was written.
struct Written {
    /// Offsets of what was sent, in the order sent.
    offsets: Vec<i64>,
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
    /// these next offsets (past the abort marker), by partition.
    Mispredicted(anyhow::Error, HashMap<i32, HashMap<String, i64>>),
    /// The producer is fenced or broken, a commit's outcome is unknown, or
    /// a local store failed: acquire the shard anew.
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
    /// Records decided, by partition.
    records: Vec<(i32, usize)>,
    /// Partitions written (of every topic).
    written: usize,
}

/// How long a shard waits after committing a batch of `n` records that
/// wrote `written` partitions before it begins the next: the commit gap for
/// each partition written (at most 100 ms), plus 5 ms for each record beyond
/// the first, up to the linger (when the linger is larger).
fn linger(gap_us: u64, linger_us: u64, n: usize, written: usize) -> Duration {
    let gap = gap_us.saturating_mul(written as u64).min(100_000);
    let busy = gap.saturating_add(5_000u64.saturating_mul(n.saturating_sub(1) as u64));
    Duration::from_micros(busy.min(linger_us.max(gap)))
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// How many partitions (of every topic) a transaction of these shares writes:
/// each gets a commit marker.
fn partitions_written(decided: &[Decided]) -> usize {
    let mut elsewhere = HashSet::new();
    let mut n = 0;
    for d in decided {
        let f = &d.finished;
        n += d.events.iter().map(|(topic, _)| topic).collect::<HashSet<_>>().len();
        n += usize::from(!f.records.is_empty() || !f.pages.is_empty() || d.positions.is_some());
        n += usize::from(!f.memories.is_empty());
        n += usize::from(!d.dead.is_empty());
        elsewhere.extend(f.replies.iter().map(|(p, _, _)| (0, *p)));
        elsewhere.extend(d.votes.iter().map(|(p, _, _)| (1, *p)));
    }
    n + elsewhere.len()
}

/// A record's place in its input, to know it again after a rewind.
type Key = (String, i32, i64);

fn key_of(r: &Incoming) -> Key {
    (r.topic.clone(), r.partition, r.offset)
}

impl Run {
    fn set_phase(&self, phase: &'static str) {
        let mut status = self.shared.status.lock().expect("status lock");
        for p in &self.partitions {
            status.partitions.entry(*p).or_default().phase = phase;
        }
        let owned = status.partitions.len();
        drop(status);
        metrics::gauge!("esk_writer_partitions").set(owned as f64);
    }

    /// Owned, the shard's stores are this worker's to write: the hot standby
    /// passes them over (and reads them again from the store's position once
    /// the shard is given up).
    fn own_store(&self, owned: bool) {
        esk_owner::mark(&mut self.shared.owned.write().expect("owned lock"), &self.partitions, owned);
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
                    metrics::counter!("esk_writer_fenced_total").increment(self.partitions.len() as u64);
                }
            },
        );
        self.own_store(false);
    }

    /// Fences the previous owner, restores the shard's partitions and rewinds
    /// their input queues to the committed offsets. `None` when told to stop
    /// meanwhile.
    fn acquire(&self) -> Result<Option<Owned>> {
        let c = &self.shared.config;
        let started = Instant::now();
        let producer = esk_owner::io::fence(
            &self.shared.kafka,
            &c.transactional_id(self.io.shard),
            c.transaction_timeout_ms,
            &self.shared.topics.commands(),
        )?;
        let fenced_ms = started.elapsed().as_millis() as u64;
        if self.io.stopped() {
            return Ok(None);
        }
        self.set_phase("restoring");
        let Some(restored) = self.restore_all()? else {
            return Ok(None);
        };
        let restored_ms = started.elapsed().as_millis() as u64;
        let mut parts = BTreeMap::new();
        let mut open_holds = 0;
        for (p, store) in restored {
            let mut memory = PartitionMemory::new(p, store, c.stream_cache as usize, self.shared.horizon_ms);
            open_holds += memory.load_holds()?;
            let consumed = memory.consumed()?;
            if let Some(io) = self.io.part(p) {
                io.rewind_to(&consumed, Duration::from_millis(c.transaction_timeout_ms))?;
            }
            parts.insert(p, Part { memory, next_offsets: HashMap::new(), consumed, advised: BTreeMap::new() });
        }
        tracing::info!(
            shard = self.io.shard,
            partitions = ?self.partitions,
            ms = started.elapsed().as_millis() as u64,
            fenced_ms,
            restored_ms,
            open_holds,
            "shard taken over"
        );
        Ok(Some(Owned { producer, parts }))
    }

    /// Restores every partition of the shard, side by side (each reads its
    /// own partitions of the state and answers topics into its own store).
    fn restore_all(&self) -> Result<Option<Vec<(i32, esk_store::PartitionStore)>>> {
        let stop = self.io.stop_flag();
        let results: Vec<Result<Option<(i32, esk_store::PartitionStore)>>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .partitions
                .iter()
                .map(|&p| {
                    s.spawn(move || {
                        let mut store = self.shared.store.partition(p)?;
                        let done = crate::restore::restore(&self.shared, p, &mut store, stop)?;
                        Ok(done.then_some((p, store)))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("a restore thread panicked"))))
                .collect()
        });
        let mut stores = Vec::with_capacity(results.len());
        for r in results {
            match r? {
                Some(s) => stores.push(s),
                None => return Ok(None),
            }
        }
        Ok(Some(stores))
    }

    fn abort(&self, owned: &Owned) -> Result<()> {
        metrics::counter!("esk_writer_aborts_total").increment(1);
        owned
            .producer
            .abort_transaction(Duration::from_millis(self.shared.config.transaction_timeout_ms))
            .map_err(|e| anyhow!("abort_transaction failed: {e}"))
    }

    fn rewind(&self, owned: &Owned) -> Result<()> {
        let timeout = Duration::from_millis(self.shared.config.transaction_timeout_ms);
        for (p, part) in &owned.parts {
            if let Some(io) = self.io.part(*p) {
                io.rewind_to(&part.consumed, timeout)?;
            }
        }
        Ok(())
    }

    /// What the clock asks for, at most once a second: decisions of holds
    /// open past their deadline, expiry of what the horizon forgets, gauges.
    fn tick(&self, owned: &mut Owned, last: &mut Instant) -> Vec<Ask> {
        if last.elapsed() < Duration::from_secs(1) {
            return Vec::new();
        }
        *last = Instant::now();
        let grace = self.shared.config.hold_grace_ms as i64;
        let mut asks = Vec::new();
        for (&p, part) in &mut owned.parts {
            let due = part.memory.overdue(now_ms(), grace, grace);
            if !due.is_empty() {
                tracing::info!(partition = p, holds = due.len(), "asking for the decisions of overdue holds");
                metrics::counter!("esk_writer_hold_asks_total").increment(due.len() as u64);
            }
            asks.extend(due.into_iter().map(|(txid, stream)| (p, txid, stream)));
            // Pages of 10,000 for up to 20 ms a partition each second:
            // whatever came in an horizon ago goes, at far more rows a second
            // than a partition takes in.
            let deadline = Instant::now() + Duration::from_millis(20);
            while Instant::now() < deadline {
                match part.memory.expire(now_ms()) {
                    Ok(n) if n >= 10_000 => continue,
                    Ok(n) => {
                        if n > 0 {
                            tracing::debug!(partition = p, n, "forgot answers past the horizon");
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(partition = p, "expiring answers: {e}");
                        break;
                    }
                }
            }
            // For the tools that read the group's offsets, when they moved;
            // the partition resumes from its consumed-positions record.
            if part.advised != part.consumed
                && let Some(io) = self.io.part(p)
            {
                io.advise(&part.consumed);
                part.advised.clone_from(&part.consumed);
            }
            let label = p.to_string();
            metrics::gauge!("esk_writer_cached_streams", "partition" => label.clone()).set(part.memory.cached() as f64);
            metrics::gauge!("esk_writer_open_holds", "partition" => label).set(part.memory.open_holds() as f64);
        }
        metrics::gauge!("esk_writer_store_bytes").set(self.shared.store.disk_bytes() as f64);
        asks
    }

    /// Serves batches until told to stop (`Ok`) or the producer is lost (`Err`).
    ///
    /// A batch whose records cannot be written (`Failure::Rejected`) makes its
    /// records suspects: they are taken again one at a time, without the
    /// clock's asks, until each has been written or refused alone (its client
    /// answered, or it is parked), and the shard goes on: no input makes it
    /// retry for ever. Other failures retry with backoff.
    fn serve(&self, owned: &mut Owned) -> Result<()> {
        let mut failures = 0u32;
        let c = &self.shared.config;
        let bounds = Bounds { records: c.max_batch as usize, bytes: c.max_batch_bytes as usize };
        let alone = Bounds { records: 1, bytes: usize::MAX };
        let mut suspects: HashSet<Key> = HashSet::new();
        let mut ticked = Instant::now() - Duration::from_secs(2);
        let mut last_commit: Option<(Instant, usize, usize)> = None;
        while !self.io.stopped() {
            // Not too soon after the last commit, and longer after a busy one
            // (see `Config::commit_gap_us` and `Config::batch_linger_us`).
            if let Some((at, n, written)) = last_commit.take() {
                let wait = linger(c.commit_gap_us, c.batch_linger_us, n, written);
                if let Some(left) = (at + wait).checked_duration_since(Instant::now()) {
                    metrics::histogram!("esk_writer_linger_seconds").record(left.as_secs_f64());
                    std::thread::sleep(left);
                }
            }
            let isolating = !suspects.is_empty();
            let asks = if isolating { Vec::new() } else { self.tick(owned, &mut ticked) };
            let records = self.io.collect(if isolating { alone } else { bounds }, Duration::from_millis(100));
            if records.is_empty() && asks.is_empty() {
                continue;
            }
            let keys: Vec<Key> = records.iter().map(key_of).collect();
            let lone = (records.len() == 1 && asks.is_empty()).then(|| records[0].clone());
            let clock_only = records.is_empty();
            let started = Instant::now();
            match self.transact(owned, Work::Decide(records, asks)) {
                Ok(done) => {
                    failures = 0;
                    for k in &keys {
                        suspects.remove(k);
                    }
                    self.committed(owned, started, &done);
                    last_commit = Some((Instant::now(), keys.len(), done.written));
                }
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Rejected { error, began }) => {
                    if began {
                        self.abort(owned)?;
                    }
                    self.rewind(owned)?;
                    if let Some(record) = lone {
                        let reason = format!("{error:#}");
                        tracing::warn!(
                            partition = record.partition,
                            topic = record.topic,
                            offset = record.offset,
                            "refusing a record that cannot be written: {reason}"
                        );
                        metrics::counter!("esk_writer_refused_inputs_total").increment(1);
                        suspects.remove(&key_of(&record));
                        self.refuse(owned, record, reason, &mut failures)?;
                    } else if clock_only {
                        // Only the clock's asks: no input is to blame.
                        tracing::error!(
                            shard = self.io.shard,
                            "the asks for overdue holds cannot be written: {error:#}"
                        );
                        self.io.pause(Duration::from_secs(1));
                    } else {
                        tracing::warn!(
                            shard = self.io.shard,
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
                    tracing::warn!(shard = self.io.shard, "the refusal cannot be written either ({error:#})");
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
        tracing::warn!(shard = self.io.shard, failures, "batch failed, retrying: {e:#}");
        if let Failure::Abortable(_) | Failure::Mispredicted(..) = failure {
            self.abort(owned)?;
        }
        let mut next = match failure {
            Failure::Mispredicted(_, next) => next,
            _ => HashMap::new(),
        };
        for (p, part) in &mut owned.parts {
            part.next_offsets = next.remove(p).unwrap_or_default();
        }
        self.rewind(owned)?;
        // The same records come again: back off so a persistent failure does not spin.
        self.io.pause(Duration::from_millis(100 * u64::from((*failures).min(50))));
        Ok(())
    }

    fn committed(&self, owned: &Owned, started: Instant, done: &Done) {
        if done.voted_yes {
            esk_runtime::fault_point("after-vote");
        }
        let n: usize = done.records.iter().map(|(_, n)| n).sum();
        metrics::counter!("esk_writer_batches_total").increment(1);
        metrics::counter!("esk_writer_records_total").increment(n as u64);
        metrics::counter!("esk_writer_retries_answered_total").increment(done.retries_answered);
        metrics::counter!("esk_writer_expired_requests_total").increment(done.expired);
        metrics::histogram!("esk_writer_batch_records").record(n as f64);
        metrics::histogram!("esk_writer_batch_partitions").record(done.records.len() as f64);
        metrics::histogram!("esk_writer_transaction_seconds").record(started.elapsed().as_secs_f64());
        let mut status = self.shared.status.lock().expect("status lock");
        for (p, n) in &done.records {
            let s = status.partitions.entry(*p).or_default();
            s.batches += 1;
            s.records += *n as u64;
            if let Some(part) = owned.parts.get(p) {
                s.cached_streams = part.memory.cached();
                s.open_holds = part.memory.open_holds();
            }
        }
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

    /// The offsets the batch's events will get in `partition`: each events
    /// partition's next offset, known from the previous transaction (its last
    /// record + 1, plus 1 for its commit or abort marker) or asked from the
    /// broker on first use. `transact` checks them against the delivery
    /// reports before committing, so a wrong guess costs an aborted
    /// transaction, never a wrong position.
    fn predict_offsets(
        &self,
        partition: i32,
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
                            .high_watermark(&topic, partition)
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

    /// Decides one partition's share of a transaction against its memory.
    fn decide(
        &self,
        ctx: &crate::batch::Context<'_>,
        now: DateTime<Utc>,
        partition: i32,
        part: &mut Part,
        work: PartWork,
    ) -> Result<Decided, Failure> {
        let Part { memory, next_offsets, consumed: resume, .. } = part;
        memory.set_now(now.timestamp_millis());
        let mut batch = Batch::new(memory, now);
        let records = match work {
            PartWork::Decide(records, asks) => {
                let n = records.len();
                for r in records {
                    batch.handle(ctx, r);
                }
                for (txid, stream) in &asks {
                    batch.ask(ctx, txid, stream);
                }
                n
            }
            PartWork::Refuse(record, reason) => {
                batch.refuse(ctx, record, &reason);
                1
            }
            PartWork::Park(record, reason) => {
                batch.park_cut(record, &reason);
                1
            }
        };
        if let Some(e) = batch.store_failure.take() {
            return Err(Failure::Fatal(anyhow!("the local store of partition {partition} failed: {e}")));
        }
        let categories: BTreeSet<String> = batch.events.iter().map(|e| e.category.clone()).collect();
        self.ensure_events_topics(&categories).map_err(Failure::BeforeBegin)?;
        let predicted = self.predict_offsets(partition, next_offsets, &batch.events)?;
        let events: Vec<(String, esk_wire::Event)> =
            batch.events.iter().map(|e| (self.shared.topics.events(&e.category), e.event.clone())).collect();
        let votes = std::mem::take(&mut batch.votes);
        let dead = std::mem::take(&mut batch.dead_letters);
        let consumed = std::mem::take(&mut batch.consumed);
        let (retries_answered, expired) = (batch.retries_answered, batch.expired);
        let finished = batch
            .finish(ctx, partition, &predicted)
            .map_err(|o| Failure::Rejected { error: anyhow!(o.0), began: false })?;
        // Where the partition is in its inputs after this transaction: with
        // what the transaction produced, on the state topic.
        let mut next_consumed = resume.clone();
        for (topic, last) in &consumed {
            let next = next_consumed.entry(topic.clone()).or_insert(0);
            *next = (*next).max(last + 1);
        }
        let positions = (!consumed.is_empty()).then(|| ConsumedRecord { v: 1, next: next_consumed.clone() });
        Ok(Decided {
            partition,
            events,
            predicted,
            votes,
            dead,
            finished,
            next_consumed,
            positions,
            records,
            retries_answered,
            expired,
        })
    }

    /// Sends one partition's share in the open transaction: the events, then
    /// what carries their positions: index pages and state records (in event
    /// order, which replicas rely on), what is remembered, replies, votes,
    /// dead letters, and last the consumed positions. Nothing is visible to
    /// read_committed readers before the commit.
    fn send_part(&self, producer: &FutureProducer, d: &Decided) -> Result<Vec<DeliveryFuture>, Failure> {
        let shared = &self.shared;
        let p = d.partition;
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
        let f = &d.finished;
        let mut deliveries = Vec::with_capacity(d.events.len() + f.records.len() + f.replies.len() + 1);
        for (topic, e) in &d.events {
            let headers = e
                .headers()
                .iter()
                .fold(OwnedHeaders::new(), |h, (k, v)| h.insert(Header { key: k, value: v.as_deref() }));
            let ts = e.time.timestamp_millis();
            let value = e.value();
            deliveries.push(send(topic, p, e.stream.as_str().as_bytes(), Some(&value), Some(headers), Some(ts))?);
        }
        let state_topic = shared.topics.state();
        for (page, value) in &f.pages {
            let key = IndexPage::key(&page.stream, page.first_version());
            deliveries.push(send(&state_topic, p, key.as_bytes(), Some(value), None, None)?);
        }
        for (r, value) in &f.records {
            deliveries.push(send(&state_topic, p, r.stream.as_bytes(), Some(value), None, None)?);
        }
        let answers_topic = shared.topics.answers();
        for (m, value) in &f.memories {
            deliveries.push(send(&answers_topic, p, m.stream().as_bytes(), Some(value), None, None)?);
        }
        let replies_topic = shared.topics.replies();
        for (part, id, value) in &f.replies {
            deliveries.push(send(&replies_topic, *part, id.as_bytes(), Some(value), None, None)?);
        }
        let votes_topic = shared.topics.tx_votes();
        for (part, txid, message) in &d.votes {
            let value = serde_json::to_vec(message).map_err(|e| Failure::BeforeBegin(anyhow!(e)))?;
            deliveries.push(send(&votes_topic, *part, txid.as_bytes(), Some(&value), None, None)?);
        }
        let dlq_topic = shared.topics.writer_dlq();
        for dl in &d.dead {
            let o = &dl.original;
            tracing::warn!(
                topic = o.topic,
                partition = o.partition,
                offset = o.offset,
                reason = dl.reason,
                "parked a record"
            );
            let origin = Origin { topic: &o.topic, partition: o.partition, offset: o.offset };
            // A cut copy is forced by asking for a limit nothing fits.
            let limit = if dl.cut { 0 } else { shared.limits.record_bytes };
            let l =
                dead_letter(o.key.as_deref(), o.payload.as_deref(), &o.headers, &dl.reason, origin, "writer", limit);
            let key = l.key.unwrap_or_default();
            deliveries.push(send(&dlq_topic, p, &key, l.value.as_deref(), Some(l.headers), None)?);
            metrics::counter!("esk_writer_dead_letters_total").increment(1);
        }
        if let Some(record) = &d.positions {
            let value = serde_json::to_vec(record).map_err(|e| Failure::BeforeBegin(anyhow!(e)))?;
            deliveries.push(send(&state_topic, p, CONSUMED_KEY.as_bytes(), Some(&value), None, None)?);
        }
        Ok(deliveries)
    }

    /// Decides `work` and writes it in one Kafka transaction over the
    /// shard's partitions that have work; after the commit, each partition's
    /// memory takes its new records.
    fn transact(&self, owned: &mut Owned, work: Work) -> Result<Done, Failure> {
        let shared = &self.shared;
        // Bounded by the transaction timeout: a handler stuck in a call holds up rebalances.
        let timeout = Duration::from_millis(shared.config.transaction_timeout_ms);
        let ctx = shared.batch_context();
        let now = Utc::now();
        let Owned { producer, parts } = owned;
        let mut decided = Vec::new();
        for (p, w) in work.by_partition() {
            let Some(part) = parts.get_mut(&p) else {
                // Not this shard's: a record fetched for a partition no longer
                // owned (cannot happen with the queues split by partition).
                return Err(Failure::BeforeBegin(anyhow!("partition {p} is not in shard {}", self.io.shard)));
            };
            decided.push(self.decide(&ctx, now, p, part, w)?);
        }

        let t_begin = Instant::now();
        producer.begin_transaction().map_err(|e| Failure::from(classify(e)))?;
        let mut in_flight = Vec::with_capacity(decided.len());
        for d in &decided {
            in_flight.push(self.send_part(producer, d)?);
        }
        let touched = partitions_written(&decided);
        // Wait for every delivery here: rdkafka's commit_transaction flushes
        // first, and its flush polls in 100 ms steps while anything is in flight.
        // `message.timeout.ms` bounds the wait.
        let mut written = Vec::with_capacity(decided.len());
        for deliveries in in_flight {
            written.push(Written { offsets: txn::await_deliveries(deliveries)? });
        }
        let t_sent = Instant::now();
        if decided.iter().zip(&written).any(|(d, w)| w.offsets[..d.events.len()] != d.predicted[..]) {
            metrics::counter!("esk_writer_offset_mispredictions_total").increment(1);
            // Every event was delivered: after the abort marker, each partition
            // goes on right after it.
            let mut after_abort: HashMap<i32, HashMap<String, i64>> = HashMap::new();
            let mut first = None;
            for (d, w) in decided.iter().zip(&written) {
                let next_offsets = after_abort.entry(d.partition).or_default();
                for ((topic, _), offset) in d.events.iter().zip(&w.offsets) {
                    let next = next_offsets.entry(topic.clone()).or_insert(0);
                    *next = (*next).max(offset + 2);
                }
                if first.is_none() && w.offsets[..d.events.len()] != d.predicted[..] {
                    first = Some((d.partition, w.offsets.first().copied(), d.predicted.first().copied()));
                }
            }
            return Err(Failure::Mispredicted(
                anyhow!(
                    "events landed at other offsets than their positions say (partition, first, predicted: \
                     {first:?}): retrying"
                ),
                after_abort,
            ));
        }
        txn::commit_only(producer, timeout, self.io.stop_flag())?;

        let mut done =
            Done { voted_yes: false, retries_answered: 0, expired: 0, records: Vec::new(), written: touched };
        let (state_topic, answers_topic) = (shared.topics.state(), shared.topics.answers());
        for (d, w) in decided.into_iter().zip(written) {
            let p = d.partition;
            let Some(part) = parts.get_mut(&p) else { continue };
            let mut offsets = w.offsets;
            let positions_offset = if d.positions.is_some() { offsets.pop() } else { None };
            let (event_offsets, rest) = offsets.split_at(d.events.len());
            let (page_offsets, rest) = rest.split_at(d.finished.pages.len());
            let (state_offsets, rest) = rest.split_at(d.finished.records.len());
            let answer_offsets = &rest[..d.finished.memories.len()];
            // Each partition written gets one commit marker after its last record.
            for ((topic, _), offset) in d.events.iter().zip(event_offsets) {
                let next = part.next_offsets.entry(topic.clone()).or_insert(0);
                *next = (*next).max(offset + 2);
            }
            metrics::counter!("esk_writer_events_total").increment(d.events.len() as u64);
            metrics::counter!("esk_writer_answers_remembered_total").increment(d.finished.memories.len() as u64);
            let mut committed = Committed::default();
            if let Some(last) = state_offsets.iter().chain(page_offsets).chain(&positions_offset).max() {
                committed.positions.push((state_topic.clone(), last + 1));
            }
            if d.positions.is_some() {
                committed.positions.extend(d.next_consumed.iter().map(|(t, n)| (consumed_position(t), *n)));
            }
            if let Some(last) = answer_offsets.iter().max() {
                committed.positions.push((answers_topic.clone(), last + 1));
            }
            let Finished { records, memories, pages, .. } = d.finished;
            committed.records = records.into_iter().zip(state_offsets).map(|((r, v), o)| (r, v, *o)).collect();
            committed.memories = memories.into_iter().zip(answer_offsets).map(|((m, _), o)| (m, *o)).collect();
            committed.pages = pages.into_iter().zip(page_offsets).map(|((pg, v), o)| (pg, v, *o)).collect();
            // The transaction is committed: a store that cannot take it is
            // behind Kafka, so the shard is restored afresh from its topics.
            part.memory
                .absorb(committed)
                .map_err(|e| Failure::Fatal(anyhow!("the local store of partition {p} failed after a commit: {e}")))?;
            part.consumed = d.next_consumed;
            done.voted_yes |= d.votes.iter().any(|(_, _, m)| matches!(m, ParticipantMessage::Vote(v) if v.yes));
            done.retries_answered += d.retries_answered;
            done.expired += d.expired;
            done.records.push((p, d.records));
        }
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1000.0;
        tracing::debug!(produce_ms = ms(t_begin, t_sent), commit_ms = ms(t_sent, Instant::now()), "committed");
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_request_waits_only_the_commit_gap_and_a_busy_shard_up_to_the_linger() {
        let ms = Duration::from_millis;
        let us = Duration::from_micros;
        // The gap grows with the partitions the transaction wrote.
        assert_eq!(linger(100, 0, 1, 4), us(400));
        assert_eq!(linger(100, 0, 500, 37), us(3_700));
        assert_eq!(linger(100, 0, 500, usize::MAX), ms(100));
        assert_eq!(linger(5_000, 20_000, 1, 1), ms(5));
        assert_eq!(linger(5_000, 20_000, 0, 1), ms(5));
        assert_eq!(linger(5_000, 20_000, 2, 1), ms(10));
        assert_eq!(linger(5_000, 20_000, 4, 1), ms(20));
        assert_eq!(linger(5_000, 20_000, 500, 1), ms(20));
        // Off: only the gap.
        assert_eq!(linger(5_000, 0, 500, 1), ms(5));
        assert_eq!(linger(0, 0, 500, 9), ms(0));
        assert_eq!(linger(0, 20_000, usize::MAX, 9), ms(20));
    }
}
