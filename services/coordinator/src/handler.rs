//! One owned shard of `tx.requests`/`tx.votes` (the partitions p with
//! `p % shards == k`): fence, restore each partition's transactions from
//! `tx.log` into its local store, then decide batches and the clock's
//! deadlines, one Kafka transaction each over every partition of the shard
//! that has work.
//!
//! Only live transactions (not yet acknowledged by every participant) are
//! held in memory; ended ones are in the local store for the idempotency
//! horizon, then tombstoned in the log and forgotten.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use esk_follower::Followed;
use esk_follower::store::Intake;
use esk_kafka::record::{Origin, dead_letter};
use esk_owner::txn::{self, TxnError, classify};
use esk_owner::{Bounds, Handler, Incoming, Lease, Phase, ShardIo};
use esk_store::{Changes, PartitionStore, StoreError, consumed_position};
use esk_wire::protocol::{CONSUMED_KEY, ConsumedRecord, TxRecord};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use crate::Shared;
use crate::isolation::{self, Isolation, Key};
use crate::logic::{Done, Step, Txs};

/// How often the clock is checked for deadlines and resends.
const TICK: Duration = Duration::from_millis(200);
/// How often ended transactions past the horizon are looked for (at once
/// again while a full page of them was found).
const TOMBSTONE_EVERY: Duration = Duration::from_secs(10);
/// Tombstones in one transaction at most.
const TOMBSTONE_PAGE: usize = 1000;
/// Most bytes of input (keys and values) decided in one transaction.
const MAX_BATCH_BYTES: usize = 4 << 20;

/// Rows of live transactions in the local store.
pub const TAG_LIVE: i64 = 1;

/// Serves the shards the coordinator group assigns to this instance.
#[derive(Debug)]
pub struct CoordinatorHandler {
    pub shared: Arc<Shared>,
}

impl Handler for CoordinatorHandler {
    fn run(&self, io: ShardIo) {
        let partitions = io.partitions();
        let views: BTreeMap<i32, Arc<Mutex<Txs>>> =
            partitions.iter().map(|p| (*p, Arc::new(Mutex::new(Txs::default())))).collect();
        {
            let mut owned = self.shared.owned.lock().expect("owned lock");
            for (p, view) in &views {
                owned.insert(*p, view.clone());
            }
        }
        Run { shared: self.shared.clone(), partitions: partitions.clone(), io, views }.main();
        let mut owned = self.shared.owned.lock().expect("owned lock");
        for p in &partitions {
            owned.remove(p);
        }
    }

    fn revoked(&self) {
        *self.shared.assigned.lock().expect("assigned lock") = None;
    }

    fn assigned(&self, partitions: &[i32]) {
        *self.shared.assigned.lock().expect("assigned lock") = Some(partitions.to_vec());
    }
}

struct Run {
    shared: Arc<Shared>,
    partitions: Vec<i32>,
    io: ShardIo,
    /// Each partition's live transactions, also read by the HTTP status.
    views: BTreeMap<i32, Arc<Mutex<Txs>>>,
}

/// What this instance holds while it owns a shard.
struct Owned {
    producer: FutureProducer,
    stores: BTreeMap<i32, PartitionStore>,
    /// Each partition's next offset to process of each input, as last
    /// committed (its consumed-positions record on `tx.log`); an input not
    /// in it resumes from the group's offsets.
    consumed: BTreeMap<i32, BTreeMap<String, i64>>,
    /// What was last committed to the group for the lag tools.
    advised: BTreeMap<i32, BTreeMap<String, i64>>,
}

/// A record's place in its input, to know it again after a rewind.
/// A partition's step with its log records serialized, to write.
struct Prepared<'a> {
    p: i32,
    step: &'a Step,
    records: Vec<TxRecord>,
    values: Vec<Vec<u8>>,
    /// The partition's consumed positions after the transaction, and their
    /// record (when the step consumed anything).
    next_consumed: BTreeMap<String, i64>,
    positions: Option<Vec<u8>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Takes records of `tx.log` into the store: each transaction's latest
/// record, checked; a tombstone removes it.
#[derive(Debug)]
pub struct TxLogIntake;

impl Intake for TxLogIntake {
    fn take(&mut self, _store: &PartitionStore, f: &Followed, changes: &mut Changes) -> Result<(), StoreError> {
        if f.is_consumed() {
            // Positions only move forward (`Changes::position`).
            match ConsumedRecord::decode(f.value.as_deref()) {
                Ok(r) => r.next.iter().for_each(|(input, next)| changes.position(&consumed_position(input), *next)),
                Err(reason) => esk_follower::refused("tx.log", f, &reason),
            }
            return Ok(());
        }
        let key = f.key.as_deref().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
        let Some(value) = f.value.as_deref() else {
            changes.deletes.push((key, f.offset + 1));
            return Ok(());
        };
        let checked = serde_json::from_slice::<TxRecord>(value)
            .map_err(|e| format!("not a transaction record: {e}"))
            .and_then(|r| r.check(f.key.as_deref()).map(|()| r));
        match checked {
            Ok(r) => put(changes, f.offset, &r, value.to_vec()),
            Err(reason) => esk_follower::refused("tx.log", f, &reason),
        }
        Ok(())
    }
}

fn put(changes: &mut Changes, offset: i64, r: &TxRecord, value: Vec<u8>) {
    let (time, tag) =
        if r.is_done() { (r.done_ms.or(r.decided_ms).unwrap_or(r.created_ms).max(1), 0) } else { (0, TAG_LIVE) };
    changes.put(r.txid.clone(), offset, value, time, tag);
}

/// Ended transactions in the store, within the horizon.
#[derive(Debug)]
pub struct StoreDone<'a> {
    pub store: &'a PartitionStore,
    pub horizon_ms: i64,
    pub now_ms: i64,
}

impl Done for StoreDone<'_> {
    fn done(&mut self, txid: &str) -> Result<Option<TxRecord>, String> {
        let Some(row) = self.store.get(txid).map_err(|e| e.to_string())? else { return Ok(None) };
        // Live transactions of an owned partition are in memory; a live row
        // is the store's copy of one, not an ended transaction.
        if row.tag == TAG_LIVE || row.time_ms < self.now_ms - esk_wire::limits::kept_ms(self.horizon_ms) {
            return Ok(None);
        }
        Ok(serde_json::from_slice(&row.value).ok())
    }
}

/// Why a step did not commit.
enum Failure {
    Txn(TxnError),
    /// The step had begun no Kafka transaction.
    BeforeBegin(anyhow::Error),
}

impl From<TxnError> for Failure {
    fn from(e: TxnError) -> Self {
        Failure::Txn(e)
    }
}

impl Run {
    /// Owned, the shard's stores are this handler's to write (see the writer's).
    fn own_store(&self, owned: bool) {
        esk_owner::mark(&mut self.shared.owned_stores.write().expect("owned lock"), &self.partitions, owned);
    }

    fn serving(&self, serving: bool) {
        esk_owner::mark(&mut self.shared.serving.lock().expect("serving lock"), &self.partitions, serving);
    }

    fn main(self) {
        esk_owner::own(
            &self.io,
            Duration::from_millis(self.shared.config.session_timeout_ms),
            || self.acquire(),
            |owned| self.serve(owned),
            |phase| match phase {
                Phase::Starting => self.own_store(true),
                Phase::Serving => self.serving(true),
                Phase::Lost => {
                    self.serving(false);
                    self.own_store(false);
                    metrics::counter!("esk_coordinator_fenced_total").increment(1);
                }
            },
        );
        self.serving(false);
        self.own_store(false);
    }

    /// Fences the previous owner, brings each partition's local store to the
    /// end of its log, and loads the live transactions.
    fn acquire(&self) -> Result<Option<Owned>> {
        let c = &self.shared.config;
        let started = Instant::now();
        let producer = esk_owner::io::fence(
            &self.shared.kafka,
            &c.transactional_id(self.io.shard),
            c.transaction_timeout_ms,
            &self.shared.topics.tx_requests(),
        )?;
        let timeout = Duration::from_millis(c.transaction_timeout_ms);
        let restored: Vec<Result<Option<(i32, PartitionStore, u64)>>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .partitions
                .iter()
                .map(|&p| {
                    let producer = &producer;
                    s.spawn(move || self.restore(producer, p, timeout))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("a restore thread panicked"))))
                .collect()
        });
        let mut stores = BTreeMap::new();
        let mut consumed = BTreeMap::new();
        let (mut open, mut in_doubt, mut read) = (0, 0, 0);
        for r in restored {
            let Some((p, store, n)) = r? else { return Ok(None) };
            let mut txs = Txs::default();
            for (_, row) in store.tagged(TAG_LIVE)? {
                if let Ok(r) = serde_json::from_slice::<TxRecord>(&row.value) {
                    txs.insert(r);
                }
            }
            let (o, d) = txs.counts(now_ms());
            (open, in_doubt, read) = (open + o, in_doubt + d, read + n);
            if let Some(view) = self.views.get(&p) {
                *view.lock().expect("view lock") = txs;
            }
            consumed.insert(p, esk_store::consumed_positions(&store.positions()?));
            stores.insert(p, store);
        }
        let owned = Owned { producer, stores, consumed, advised: BTreeMap::new() };
        self.rewind(&owned)?;
        metrics::histogram!("esk_coordinator_restore_seconds").record(started.elapsed().as_secs_f64());
        tracing::info!(
            shard = self.io.shard,
            partitions = ?self.partitions,
            open,
            in_doubt,
            log_records_read = read,
            ms = started.elapsed().as_millis() as u64,
            "shard taken over"
        );
        Ok(Some(owned))
    }

    /// Brings partition `p`'s local store to the end of its log.
    fn restore(
        &self,
        producer: &FutureProducer,
        p: i32,
        timeout: Duration,
    ) -> Result<Option<(i32, PartitionStore, u64)>> {
        let mut store = self.shared.store.partition(p)?;
        let log = self.shared.topics.tx_log();
        let (_, high) = esk_kafka::watermarks(producer.client(), &log, p, timeout)?;
        if store.position(&log)? > high {
            tracing::warn!(partition = p, "the local store is ahead of the log; starting it afresh");
            store.clear()?;
        }
        let group = format!("{}-restore", self.shared.config.group_id());
        let read = esk_follower::store::restore(
            &self.shared.kafka,
            &group,
            &log,
            p,
            self.shared.partitions,
            &mut store,
            &mut TxLogIntake,
            self.io.stop_flag(),
        )?;
        Ok(read.map(|n| (p, store, n)))
    }

    fn abort(&self, owned: &Owned) -> Result<()> {
        metrics::counter!("esk_coordinator_aborts_total").increment(1);
        owned
            .producer
            .abort_transaction(Duration::from_millis(self.shared.config.transaction_timeout_ms))
            .map_err(|e| anyhow!("abort_transaction failed: {e}"))
    }

    /// Seeks each partition's inputs to where its consumed-positions record
    /// says (the group's offsets for an input it does not name).
    fn rewind(&self, owned: &Owned) -> Result<()> {
        let timeout = Duration::from_millis(self.shared.config.transaction_timeout_ms);
        let none = BTreeMap::new();
        for p in &self.partitions {
            if let Some(io) = self.io.part(*p) {
                io.rewind_to(owned.consumed.get(p).unwrap_or(&none), timeout)?;
            }
        }
        Ok(())
    }

    /// Commits each partition's consumed positions to the group when they
    /// moved, for the tools that show a group's lag; nothing resumes from them.
    fn advise(&self, owned: &mut Owned) {
        for (p, next) in &owned.consumed {
            if owned.advised.get(p) != Some(next)
                && let Some(io) = self.io.part(*p)
            {
                io.advise(next);
                owned.advised.insert(*p, next.clone());
            }
        }
    }

    /// Ended transactions older than the horizon, to tombstone, by partition.
    fn expired(&self, owned: &Owned, last: &mut Instant) -> BTreeMap<i32, Vec<String>> {
        let mut out = BTreeMap::new();
        if last.elapsed() < TOMBSTONE_EVERY {
            return out;
        }
        *last = Instant::now();
        let before = now_ms() - esk_wire::limits::kept_ms(self.shared.horizon_ms);
        let mut room = TOMBSTONE_PAGE;
        for (p, store) in &owned.stores {
            if room == 0 {
                break;
            }
            match store.older_than(before, room) {
                Ok(rows) => {
                    let txids: Vec<String> =
                        rows.into_iter().filter(|(_, r)| r.tag != TAG_LIVE).map(|(k, _)| k).collect();
                    room -= txids.len().min(room);
                    if !txids.is_empty() {
                        out.insert(*p, txids);
                    }
                }
                Err(e) => tracing::warn!(partition = p, "looking for ended transactions: {e}"),
            }
        }
        out
    }

    /// Serves steps until told to stop (`Ok`) or the producer is lost (`Err`).
    /// A step whose records cannot be written makes them suspects: they are
    /// taken again one at a time, without the clock's output, and the one
    /// that fails alone is refused: no input makes the shard retry for ever.
    fn serve(&self, owned: &mut Owned) -> Result<()> {
        let mut failures = 0u32;
        let c = &self.shared.config;
        let bounds = Bounds { records: c.max_batch as usize, bytes: MAX_BATCH_BYTES };
        let one = Bounds { records: 1, bytes: usize::MAX };
        let mut isolation = Isolation::default();
        let mut tombstoned = Instant::now();
        let mut advised = Instant::now();
        let mut last_commit: Option<(Instant, usize)> = None;
        while !self.io.stopped() {
            // Not before the last transaction's markers are likely written
            // (see `Config::commit_gap_us`).
            if let Some((at, written)) = last_commit.take() {
                let gap = Duration::from_micros(c.commit_gap_us.saturating_mul(written as u64).min(100_000));
                if let Some(left) = (at + gap).checked_duration_since(Instant::now()) {
                    std::thread::sleep(left);
                }
            }
            if advised.elapsed() >= Duration::from_secs(1) {
                advised = Instant::now();
                self.advise(owned);
            }
            let isolating = isolation.isolating();
            let mut batch = self.io.collect(if isolating { one } else { bounds }, TICK);
            let passed = isolation.unrefused(&mut batch);
            if passed > 0 {
                metrics::counter!("esk_coordinator_refused_passed_total").increment(passed as u64);
            }
            let keys: Vec<Key> = batch.iter().map(isolation::key).collect();
            let alone = (isolating && batch.len() == 1).then(|| batch[0].clone());
            let tombstones = if isolating { BTreeMap::new() } else { self.expired(owned, &mut tombstoned) };
            let steps = self.decide(owned, batch, tombstones, !isolating);
            if let Some(e) = steps.iter().find_map(|(_, s)| s.store_failure.as_ref()) {
                return Err(anyhow!("the local store failed: {e}"));
            }
            if steps.is_empty() {
                isolation.handled(&keys);
                continue;
            }
            if !steps.iter().any(|(_, s)| s.needs_transaction()) {
                // Partial votes and acknowledgements only: memory takes them,
                // the log with the transactions' next change (see `Txs`).
                self.absorb(&steps);
                isolation.handled(&keys);
                if steps.iter().any(|(_, s)| !s.unlogged_votes.is_empty()) {
                    esk_runtime::fault_point("after-partial-vote");
                }
                continue;
            }
            let started = Instant::now();
            match self.transact(owned, &steps) {
                Ok(written) => {
                    failures = 0;
                    isolation.handled(&keys);
                    isolation.passed(|t, p| owned.consumed.get(&p).and_then(|c| c.get(t)).copied());
                    metrics::gauge!("esk_coordinator_refused_remembered").set(isolation.remembered() as f64);
                    if steps.iter().map(|(_, s)| s.tombstones.len()).sum::<usize>() >= TOMBSTONE_PAGE {
                        // More are due: look again at once.
                        tombstoned = Instant::now() - TOMBSTONE_EVERY;
                    }
                    self.committed(steps, started)?;
                    last_commit = Some((Instant::now(), written));
                }
                Err(Failure::Txn(TxnError::Fatal(e))) => return Err(e),
                Err(Failure::Txn(TxnError::Rejected(e))) => {
                    self.abort(owned)?;
                    self.rewind(owned)?;
                    if let Some(record) = alone {
                        tracing::warn!(
                            partition = record.partition,
                            topic = record.topic,
                            offset = record.offset,
                            "refusing a record that cannot be written: {e:#}"
                        );
                        metrics::counter!("esk_coordinator_refused_inputs_total").increment(1);
                        isolation.refused(isolation::key(&record));
                        let steps = vec![(record.partition, self.refusal(record, &format!("{e:#}")))];
                        match self.transact(owned, &steps) {
                            Ok(_) => {
                                self.committed(steps, started)?;
                                isolation.passed(|t, p| owned.consumed.get(&p).and_then(|c| c.get(t)).copied());
                                metrics::gauge!("esk_coordinator_refused_remembered")
                                    .set(isolation.remembered() as f64);
                                self.rewind(owned)?;
                            }
                            Err(Failure::Txn(TxnError::Fatal(e))) => return Err(e),
                            Err(f) => self.failed(owned, f, &mut failures)?,
                        }
                    } else if keys.is_empty() {
                        // Only the clock's output: no input is to blame.
                        tracing::error!(shard = self.io.shard, "the clock's decisions cannot be written: {e:#}");
                        self.io.pause(Duration::from_secs(1));
                    } else {
                        isolation.suspect(keys);
                    }
                }
                Err(f) => self.failed(owned, f, &mut failures)?,
            }
        }
        Ok(())
    }

    /// A step for each partition with something to do: its records of
    /// `batch`, its tombstones, and the clock's deadlines and resends when
    /// `with_clock`.
    fn decide(
        &self,
        owned: &Owned,
        batch: Vec<Incoming>,
        mut tombstones: BTreeMap<i32, Vec<String>>,
        with_clock: bool,
    ) -> Vec<(i32, Step)> {
        let ctx = self.shared.context();
        let now = now_ms();
        let mut by_partition: BTreeMap<i32, Vec<Incoming>> = BTreeMap::new();
        for m in batch {
            by_partition.entry(m.partition).or_default().push(m);
        }
        let mut steps = Vec::new();
        for (p, view) in &self.views {
            let Some(store) = owned.stores.get(p) else { continue };
            let txs = view.lock().expect("view lock");
            let mut done = StoreDone { store, horizon_ms: self.shared.horizon_ms, now_ms: now };
            let mut step = Step::default();
            for m in by_partition.remove(p).unwrap_or_default() {
                step.handle(&ctx, &txs, &mut done, m, now);
            }
            if with_clock {
                step.tick(&ctx, &txs, now);
            }
            step.tombstones =
                tombstones.remove(p).unwrap_or_default().into_iter().filter(|t| !txs.contains(t)).collect();
            if !step.is_empty() || step.store_failure.is_some() {
                steps.push((*p, step));
            }
        }
        steps
    }

    /// A step that only refuses one record (its step could not be written).
    fn refusal(&self, record: Incoming, reason: &str) -> Step {
        let mut step = Step::default();
        step.refuse(&self.shared.context(), record, reason);
        step
    }

    fn failed(&self, owned: &Owned, failure: Failure, failures: &mut u32) -> Result<()> {
        *failures += 1;
        let (e, began) = match &failure {
            Failure::Txn(TxnError::Abortable(e) | TxnError::Rejected(e) | TxnError::Fatal(e)) => (e, true),
            Failure::BeforeBegin(e) => (e, false),
        };
        tracing::warn!(shard = self.io.shard, failures, "batch failed, retrying: {e:#}");
        if began {
            self.abort(owned)?;
        }
        self.rewind(owned)?;
        self.io.pause(Duration::from_millis(100 * u64::from((*failures).min(50))));
        Ok(())
    }

    /// After a commit: each partition's view takes its records, the store too.
    fn committed(&self, steps: Vec<(i32, Step)>, started: Instant) -> Result<()> {
        if steps.iter().any(|(_, s)| !s.prepares.is_empty()) {
            esk_runtime::fault_point("after-prepare");
        }
        if steps.iter().any(|(_, s)| !s.decided.is_empty()) {
            esk_runtime::fault_point("after-decision");
        }
        metrics::histogram!("esk_coordinator_transaction_seconds").record(started.elapsed().as_secs_f64());
        for (_, step) in &steps {
            for (commit, ms) in &step.decided {
                let outcome = if *commit { "committed" } else { "aborted" };
                metrics::counter!("esk_coordinator_decisions_total", "outcome" => outcome).increment(1);
                metrics::histogram!("esk_coordinator_decision_seconds").record(*ms as f64 / 1000.0);
            }
            metrics::counter!("esk_coordinator_expired_requests_total").increment(step.expired);
            metrics::counter!("esk_coordinator_tombstones_total").increment(step.tombstones.len() as u64);
        }
        self.absorb(&steps);
        Ok(())
    }

    /// Each partition's view takes its step's changes, and the gauges follow.
    fn absorb(&self, steps: &[(i32, Step)]) {
        self.absorb_views(steps);
        let holding = self.views.values().any(|v| !v.lock().expect("view lock").unlogged_votes.is_empty());
        if holding && steps.iter().any(|(_, s)| s.needs_transaction()) {
            esk_runtime::fault_point("after-commit-holding-vote");
        }
    }

    fn absorb_views(&self, steps: &[(i32, Step)]) {
        for (p, step) in steps {
            let kept = step.kept().len() as u64;
            if kept > 0 {
                metrics::counter!("esk_coordinator_unlogged_changes_total").increment(kept);
            }
            if let Some(view) = self.views.get(p) {
                view.lock().expect("view lock").absorb(step);
            }
        }
        let (mut open, mut in_doubt) = (0, 0);
        for view in self.views.values() {
            let (o, d) = view.lock().expect("view lock").counts(now_ms());
            (open, in_doubt) = (open + o, in_doubt + d);
        }
        metrics::gauge!("esk_coordinator_open_transactions", "shard" => self.io.shard.to_string()).set(open as f64);
        metrics::gauge!("esk_coordinator_in_doubt_transactions", "shard" => self.io.shard.to_string())
            .set(in_doubt as f64);
    }

    /// Sends one partition's step in the open transaction: its log records
    /// and tombstones, prepares, decisions, replies and dead letters.
    fn send_step(&self, producer: &FutureProducer, x: &Prepared<'_>) -> Result<Vec<DeliveryFuture>, TxnError> {
        let Prepared { p, step, records, values, positions, .. } = x;
        let p = *p;
        let t = &self.shared.topics;
        let mut deliveries = Vec::new();
        let mut send =
            |topic: &str, partition: i32, key: &[u8], value: Option<&[u8]>, headers: Option<OwnedHeaders>| {
                let mut record = FutureRecord::to(topic).partition(partition).key(key);
                if let Some(v) = value {
                    record = record.payload(v);
                }
                if let Some(h) = headers {
                    record = record.headers(h);
                }
                deliveries.push(producer.send_result(record).map_err(|(e, _)| classify(e))?);
                Ok::<(), TxnError>(())
            };
        for (r, v) in records.iter().zip(values) {
            send(&t.tx_log(), p, r.txid.as_bytes(), Some(v), None)?;
        }
        for txid in &step.tombstones {
            send(&t.tx_log(), p, txid.as_bytes(), None, None)?;
        }
        for (part, stream, prepare, context) in &step.prepares {
            send(&t.in_context(context).tx_prepare(), *part, stream.as_bytes(), Some(&json(prepare)), None)?;
        }
        for (part, stream, decision, context) in &step.decisions {
            send(&t.in_context(context).tx_commit(), *part, stream.as_bytes(), Some(&json(decision)), None)?;
        }
        for (part, txid, reply) in &step.replies {
            send(&t.replies(), *part, txid.as_bytes(), Some(&json(reply)), None)?;
        }
        for (o, reason) in &step.dead_letters {
            tracing::warn!(topic = o.topic, offset = o.offset, reason, "parked a record");
            let origin = Origin { topic: &o.topic, partition: o.partition, offset: o.offset };
            let l = dead_letter(
                o.key.as_deref(),
                o.payload.as_deref(),
                &o.headers,
                reason,
                origin,
                "coordinator",
                self.shared.limits.record_bytes,
            );
            let key = l.key.unwrap_or_default();
            send(&t.dlq("coordinator"), p, &key, l.value.as_deref(), Some(l.headers))?;
            metrics::counter!("esk_coordinator_dead_letters_total").increment(1);
        }
        // Last: where the partition is in its inputs after this transaction.
        if let Some(value) = positions {
            send(&t.tx_log(), p, CONSUMED_KEY.as_bytes(), Some(value), None)?;
        }
        Ok(deliveries)
    }

    /// The steps' log records, prepares, decisions, replies and dead letters,
    /// with the consumed offsets, in one transaction: a decision's commit
    /// point. After the commit, each partition's local store takes its log
    /// records. `Ok`: how many partitions the transaction wrote.
    fn transact(&self, owned: &mut Owned, steps: &[(i32, Step)]) -> Result<usize, Failure> {
        let t = &self.shared.topics;
        let mut prepared = Vec::with_capacity(steps.len());
        for (p, step) in steps {
            let records = step.records();
            let values: Vec<Vec<u8>> = records
                .iter()
                .map(serde_json::to_vec)
                .collect::<Result<_, _>>()
                .map_err(|e| Failure::BeforeBegin(anyhow!(e)))?;
            // Where the partition is in its inputs after this transaction,
            // committed with it on the log: never past a vote held in memory
            // only (see `Txs`).
            let mut next_consumed = owned.consumed.get(p).cloned().unwrap_or_default();
            if let Some(view) = self.views.get(p) {
                let view = view.lock().expect("view lock");
                for (topic, last) in &step.consumed {
                    if let Some(last) = view.committable(step, topic, *last) {
                        let next = next_consumed.entry(topic.clone()).or_insert(0);
                        *next = (*next).max(last + 1);
                    }
                }
            }
            let positions = (!step.consumed.is_empty())
                .then(|| serde_json::to_vec(&ConsumedRecord { v: 1, next: next_consumed.clone() }))
                .transpose()
                .map_err(|e| Failure::BeforeBegin(anyhow!(e)))?;
            prepared.push(Prepared { p: *p, step, records, values, next_consumed, positions });
        }
        let producer = &owned.producer;
        producer.begin_transaction().map_err(classify)?;
        let mut in_flight = Vec::with_capacity(prepared.len());
        for x in &prepared {
            in_flight.push(self.send_step(producer, x)?);
        }
        let written = partitions_written(&prepared);
        let mut offsets = Vec::with_capacity(in_flight.len());
        for deliveries in in_flight {
            offsets.push(txn::await_deliveries(deliveries)?);
        }
        let timeout = Duration::from_millis(self.shared.config.transaction_timeout_ms);
        txn::commit_only(producer, timeout, self.io.stop_flag())?;
        for (x, mut offsets) in prepared.into_iter().zip(offsets) {
            let Prepared { p, step, records, values, next_consumed, positions } = x;
            let positions_offset = if positions.is_some() { offsets.pop() } else { None };
            let mut changes = Changes::default();
            for ((r, v), offset) in records.iter().zip(values).zip(&offsets) {
                put(&mut changes, *offset, r, v);
            }
            for (txid, offset) in step.tombstones.iter().zip(&offsets[records.len()..]) {
                changes.deletes.push((txid.clone(), offset + 1));
            }
            if let Some(last) = offsets[..records.len() + step.tombstones.len()].iter().chain(&positions_offset).max() {
                changes.position(&t.tx_log(), last + 1);
            }
            if positions.is_some() {
                for (input, next) in &next_consumed {
                    changes.position(&consumed_position(input), *next);
                }
            }
            // Committed: a store that cannot take it is behind the log, so the
            // shard is restored afresh.
            let Some(store) = owned.stores.get_mut(&p) else { continue };
            store.apply(&changes).map_err(|e| {
                Failure::Txn(TxnError::Fatal(anyhow!("the local store of partition {p} failed after a commit: {e}")))
            })?;
            owned.consumed.insert(p, next_consumed);
        }
        Ok(written)
    }
}

/// How many partitions (of every topic) a transaction of these steps writes:
/// each gets a commit marker.
fn partitions_written(prepared: &[Prepared<'_>]) -> usize {
    let mut written = HashSet::new();
    for Prepared { p, step, records, .. } in prepared {
        if !records.is_empty() || !step.tombstones.is_empty() {
            written.insert((0, "", *p));
        }
        if !step.dead_letters.is_empty() {
            written.insert((1, "", *p));
        }
        if !step.consumed.is_empty() {
            written.insert((0, "", *p));
        }
        written.extend(step.prepares.iter().map(|(part, _, _, c)| (2, c.as_str(), *part)));
        written.extend(step.decisions.iter().map(|(part, _, _, c)| (3, c.as_str(), *part)));
        written.extend(step.replies.iter().map(|(part, _, _)| (4, "", *part)));
    }
    written.len()
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// No record of tx.log makes a restore or the standby panic.
        #[test]
        fn arbitrary_log_records_never_panic(
            records in prop::collection::vec(
                (proptest::option::of(prop_oneof![Just(b"t1".to_vec()), prop::collection::vec(any::<u8>(), 0..12)]),
                 proptest::option::of(prop_oneof![
                     prop::collection::vec(any::<u8>(), 0..80),
                     Just(br#"{"txid":"t1","state":"committed","participants":[],"deadline_ms":1,"created_ms":1}"#.to_vec()),
                     Just(br#"{"txid":"t1","state":"preparing","participants":[{"stream":"account-a","command":{"type":"Withdraw","data":{}}}],"deadline_ms":1,"created_ms":1}"#.to_vec()),
                 ])),
                1..12),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let store = esk_store::Store::open(dir.path()).unwrap();
            let mut p = store.partition(0).unwrap();
            let mut changes = Changes::default();
            for (i, (key, value)) in records.into_iter().enumerate() {
                let f = Followed { partition: 0, offset: i as i64, partitions: 1, timestamp_ms: None, key, value };
                TxLogIntake.take(&p, &f, &mut changes).unwrap();
            }
            p.apply(&changes).unwrap();
            let mut done = StoreDone { store: &p, horizon_ms: 1000, now_ms: 10 };
            let _ = done.done("t1");
        }
    }
}
