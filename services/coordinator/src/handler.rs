//! One owned partition of `tx.requests`/`tx.votes`: fence, restore the
//! transactions from `tx.log` into the local store, then decide batches and
//! the clock's deadlines, one Kafka transaction each.
//!
//! Only live transactions (not yet acknowledged by every participant) are
//! held in memory; ended ones are in the local store for the idempotency
//! horizon, then tombstoned in the log and forgotten.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use esk_follower::Followed;
use esk_follower::store::Intake;
use esk_kafka::record::{Origin, dead_letter};
use esk_owner::txn::{self, TxnError, classify};
use esk_owner::{Handler, Incoming, PartitionIo, Phase, ShardIo};
use esk_store::{Changes, PartitionStore, StoreError};
use esk_wire::protocol::TxRecord;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::Shared;
use crate::logic::{Done, Step, Txs};

/// How often the clock is checked for deadlines and resends.
const TICK: Duration = Duration::from_millis(200);
/// How often ended transactions past the horizon are looked for (at once
/// again while a full page of them was found).
const TOMBSTONE_EVERY: Duration = Duration::from_secs(10);
/// Tombstones in one transaction at most.
const TOMBSTONE_PAGE: usize = 1000;

/// Rows of live transactions in the local store.
pub const TAG_LIVE: i64 = 1;

/// Serves the partitions the coordinator group assigns to this instance.
#[derive(Debug)]
pub struct CoordinatorHandler {
    pub shared: Arc<Shared>,
}

impl Handler for CoordinatorHandler {
    /// The coordinator owns partitions one by one: a shard is one partition.
    fn run(&self, io: ShardIo) {
        let Some(io) = io.into_parts().pop() else {
            return;
        };
        let p = io.partition;
        let view = Arc::new(Mutex::new(Txs::default()));
        self.shared.owned.lock().expect("owned lock").insert(p, view.clone());
        Run { shared: self.shared.clone(), io, view }.main();
        self.shared.owned.lock().expect("owned lock").remove(&p);
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
    io: PartitionIo,
    /// The partition's live transactions, also read by the HTTP status.
    view: Arc<Mutex<Txs>>,
}

/// What this instance holds while it owns a partition.
struct Owned {
    producer: FutureProducer,
    store: PartitionStore,
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
    /// Owned, the partition's store is this handler's to write (see the writer's).
    fn own_store(&self, owned: bool) {
        let mut set = self.shared.owned_stores.write().expect("owned lock");
        if owned {
            set.insert(self.io.partition);
        } else {
            set.remove(&self.io.partition);
        }
    }

    fn main(self) {
        esk_owner::own(
            &self.io,
            Duration::from_millis(self.shared.config.session_timeout_ms),
            || self.acquire(),
            |owned| self.serve(owned),
            |phase| match phase {
                Phase::Starting => self.own_store(true),
                Phase::Serving => {
                    self.shared.serving.lock().expect("serving lock").insert(self.io.partition);
                }
                Phase::Lost => {
                    self.shared.serving.lock().expect("serving lock").remove(&self.io.partition);
                    self.own_store(false);
                    metrics::counter!("esk_coordinator_fenced_total").increment(1);
                }
            },
        );
        self.shared.serving.lock().expect("serving lock").remove(&self.io.partition);
        self.own_store(false);
    }

    /// Fences the previous owner, brings the local store to the end of the
    /// partition's log, and loads the live transactions.
    fn acquire(&self) -> Result<Option<Owned>> {
        let c = &self.shared.config;
        let p = self.io.partition;
        let started = Instant::now();
        let producer = esk_owner::io::fence(
            &self.shared.kafka,
            &c.transactional_id(p),
            c.transaction_timeout_ms,
            &self.shared.topics.tx_requests(),
        )?;
        let mut store = self.shared.store.partition(p)?;
        let log = self.shared.topics.tx_log();
        let timeout = Duration::from_millis(c.transaction_timeout_ms);
        let (_, high) = esk_kafka::watermarks(producer.client(), &log, p, timeout)?;
        if store.position(&log)? > high {
            tracing::warn!(partition = p, "the local store is ahead of the log; starting it afresh");
            store.clear()?;
        }
        let group = format!("{}-restore", c.group_id());
        let Some(read) = esk_follower::store::restore(
            &self.shared.kafka,
            &group,
            &log,
            p,
            self.shared.partitions,
            &mut store,
            &mut TxLogIntake,
            self.io.stop_flag(),
        )?
        else {
            return Ok(None);
        };
        let mut txs = Txs::default();
        for (_, row) in store.tagged(TAG_LIVE)? {
            if let Ok(r) = serde_json::from_slice::<TxRecord>(&row.value) {
                txs.records.insert(r.txid.clone(), r);
            }
        }
        let (open, in_doubt) = txs.counts(now_ms());
        *self.view.lock().expect("view lock") = txs;
        self.io.rewind(timeout)?;
        metrics::histogram!("esk_coordinator_restore_seconds").record(started.elapsed().as_secs_f64());
        tracing::info!(
            partition = p,
            open,
            in_doubt,
            log_records_read = read,
            ms = started.elapsed().as_millis() as u64,
            "partition taken over"
        );
        Ok(Some(Owned { producer, store }))
    }

    fn abort(&self, owned: &Owned) -> Result<()> {
        metrics::counter!("esk_coordinator_aborts_total").increment(1);
        owned
            .producer
            .abort_transaction(Duration::from_millis(self.shared.config.transaction_timeout_ms))
            .map_err(|e| anyhow!("abort_transaction failed: {e}"))
    }

    fn rewind(&self) -> Result<()> {
        self.io.rewind(Duration::from_millis(self.shared.config.transaction_timeout_ms))
    }

    /// Ended transactions older than the horizon, to tombstone.
    fn expired(&self, owned: &Owned, last: &mut Instant) -> Vec<String> {
        if last.elapsed() < TOMBSTONE_EVERY {
            return Vec::new();
        }
        *last = Instant::now();
        let before = now_ms() - esk_wire::limits::kept_ms(self.shared.horizon_ms);
        match owned.store.older_than(before, TOMBSTONE_PAGE) {
            Ok(rows) => rows.into_iter().filter(|(_, r)| r.tag != TAG_LIVE).map(|(k, _)| k).collect(),
            Err(e) => {
                tracing::warn!(partition = self.io.partition, "looking for ended transactions: {e}");
                Vec::new()
            }
        }
    }

    /// Serves steps until told to stop (`Ok`) or the producer is lost (`Err`).
    /// A step whose records cannot be written makes them suspects: they are
    /// taken again one at a time, without the clock's output, and the one
    /// that fails alone is refused: no input makes the partition retry for ever.
    fn serve(&self, owned: &mut Owned) -> Result<()> {
        let mut failures = 0u32;
        let max = self.shared.config.max_batch as usize;
        let mut suspects: HashSet<(String, i64)> = HashSet::new();
        let mut tombstoned = Instant::now();
        while !self.io.stopped() {
            let isolating = !suspects.is_empty();
            let batch = self.io.collect(if isolating { 1 } else { max }, TICK);
            let keys: Vec<(String, i64)> = batch.iter().map(|r| (r.topic.clone(), r.offset)).collect();
            let alone = (isolating && batch.len() == 1).then(|| batch[0].clone());
            let tombstones = if isolating { Vec::new() } else { self.expired(owned, &mut tombstoned) };
            let step = self.decide(owned, batch, tombstones, !isolating);
            if let Some(e) = &step.store_failure {
                return Err(anyhow!("the local store failed: {e}"));
            }
            if step.is_empty() {
                continue;
            }
            let started = Instant::now();
            match self.transact(owned, &step) {
                Ok(()) => {
                    failures = 0;
                    for k in &keys {
                        suspects.remove(k);
                    }
                    if step.tombstones.len() >= TOMBSTONE_PAGE {
                        // More are due: look again at once.
                        tombstoned = Instant::now() - TOMBSTONE_EVERY;
                    }
                    self.committed(step, started)?;
                }
                Err(Failure::Txn(TxnError::Fatal(e))) => return Err(e),
                Err(Failure::Txn(TxnError::Rejected(e))) => {
                    self.abort(owned)?;
                    self.rewind()?;
                    if let Some(record) = alone {
                        tracing::warn!(
                            partition = self.io.partition,
                            topic = record.topic,
                            offset = record.offset,
                            "refusing a record that cannot be written: {e:#}"
                        );
                        metrics::counter!("esk_coordinator_refused_inputs_total").increment(1);
                        suspects.remove(&(record.topic.clone(), record.offset));
                        let step = self.refusal(record, &format!("{e:#}"));
                        match self.transact(owned, &step) {
                            Ok(()) => {
                                self.committed(step, started)?;
                                self.rewind()?;
                            }
                            Err(Failure::Txn(TxnError::Fatal(e))) => return Err(e),
                            Err(f) => self.failed(owned, f, &mut failures)?,
                        }
                    } else if keys.is_empty() {
                        // Only the clock's output: no input is to blame.
                        tracing::error!(
                            partition = self.io.partition,
                            "the clock's decisions cannot be written: {e:#}"
                        );
                        self.io.pause(Duration::from_secs(1));
                    } else {
                        suspects.extend(keys);
                    }
                }
                Err(f) => self.failed(owned, f, &mut failures)?,
            }
        }
        Ok(())
    }

    /// A step over `batch`, and the clock's deadlines and resends when
    /// `with_clock`.
    fn decide(&self, owned: &Owned, batch: Vec<Incoming>, tombstones: Vec<String>, with_clock: bool) -> Step {
        let ctx = self.shared.context();
        let now = now_ms();
        let txs = self.view.lock().expect("view lock");
        let mut done = StoreDone { store: &owned.store, horizon_ms: self.shared.horizon_ms, now_ms: now };
        let mut step = Step::default();
        for m in batch {
            step.handle(&ctx, &txs, &mut done, m, now);
        }
        if with_clock {
            step.tick(&ctx, &txs, now);
        }
        step.tombstones = tombstones.into_iter().filter(|t| !txs.records.contains_key(t)).collect();
        step
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
        tracing::warn!(partition = self.io.partition, failures, "batch failed, retrying: {e:#}");
        if began {
            self.abort(owned)?;
        }
        self.rewind()?;
        self.io.pause(Duration::from_millis(100 * u64::from((*failures).min(50))));
        Ok(())
    }

    /// After a commit: the view takes the records, the store too.
    fn committed(&self, step: Step, started: Instant) -> Result<()> {
        if !step.prepares.is_empty() {
            esk_runtime::fault_point("after-prepare");
        }
        if !step.decided.is_empty() {
            esk_runtime::fault_point("after-decision");
        }
        for (commit, ms) in &step.decided {
            let outcome = if *commit { "committed" } else { "aborted" };
            metrics::counter!("esk_coordinator_decisions_total", "outcome" => outcome).increment(1);
            metrics::histogram!("esk_coordinator_decision_seconds").record(*ms as f64 / 1000.0);
        }
        metrics::counter!("esk_coordinator_expired_requests_total").increment(step.expired);
        metrics::counter!("esk_coordinator_tombstones_total").increment(step.tombstones.len() as u64);
        metrics::histogram!("esk_coordinator_transaction_seconds").record(started.elapsed().as_secs_f64());
        let mut txs = self.view.lock().expect("view lock");
        txs.absorb(step.records(), step.sent);
        let (open, in_doubt) = txs.counts(now_ms());
        drop(txs);
        metrics::gauge!("esk_coordinator_open_transactions").set(open as f64);
        metrics::gauge!("esk_coordinator_in_doubt_transactions").set(in_doubt as f64);
        Ok(())
    }

    /// The step's log records, prepares, decisions, replies and dead letters,
    /// with the consumed offsets, in one transaction: a decision's commit point.
    /// After the commit, the local store takes the log records.
    fn transact(&self, owned: &mut Owned, step: &Step) -> Result<(), Failure> {
        let t = &self.shared.topics;
        let p = self.io.partition;
        let producer = &owned.producer;
        let records = step.records();
        let values: Vec<Vec<u8>> = records
            .iter()
            .map(serde_json::to_vec)
            .collect::<Result<_, _>>()
            .map_err(|e| Failure::BeforeBegin(anyhow!(e)))?;
        producer.begin_transaction().map_err(classify)?;
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
        for (r, v) in records.iter().zip(&values) {
            send(&t.tx_log(), p, r.txid.as_bytes(), Some(v), None)?;
        }
        for txid in &step.tombstones {
            send(&t.tx_log(), p, txid.as_bytes(), None, None)?;
        }
        for (part, stream, prepare) in &step.prepares {
            send(&t.tx_prepare(), *part, stream.as_bytes(), Some(&json(prepare)), None)?;
        }
        for (part, stream, decision) in &step.decisions {
            send(&t.tx_commit(), *part, stream.as_bytes(), Some(&json(decision)), None)?;
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
        let offsets = txn::await_deliveries(deliveries)?;
        let consumed: HashMap<String, i64> = step.consumed.clone();
        let timeout = Duration::from_millis(self.shared.config.transaction_timeout_ms);
        txn::commit(producer, p, &consumed, self.io.group_metadata(), timeout, self.io.stop_flag())?;
        let mut changes = Changes::default();
        for ((r, v), offset) in records.iter().zip(values).zip(&offsets) {
            put(&mut changes, *offset, r, v);
        }
        for (txid, offset) in step.tombstones.iter().zip(&offsets[records.len()..]) {
            changes.deletes.push((txid.clone(), offset + 1));
        }
        if let Some(last) = offsets[..records.len() + step.tombstones.len()].iter().max() {
            changes.position(&t.tx_log(), last + 1);
        }
        // Committed: a store that cannot take it is behind the log, so the
        // partition is restored afresh.
        owned
            .store
            .apply(&changes)
            .map_err(|e| Failure::Txn(TxnError::Fatal(anyhow!("the local store failed after a commit: {e}"))))
    }
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
