//! One owned partition of `tx.requests`/`tx.votes`: fence, restore the
//! transactions from `tx.log`, then decide batches and the clock's deadlines,
//! one Kafka transaction each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use esk_kafka::record::{Origin, dead_letter_headers};
use esk_owner::txn::{self, TxnError, classify};
use esk_owner::{Handler, PartitionIo, Phase};
use esk_wire::protocol::TxRecord;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::Shared;
use crate::logic::{Step, Txs};

/// How often the clock is checked for deadlines and resends.
const TICK: Duration = Duration::from_millis(200);

/// Serves the partitions the coordinator group assigns to this instance.
#[derive(Debug)]
pub struct CoordinatorHandler {
    pub shared: Arc<Shared>,
}

impl Handler for CoordinatorHandler {
    fn run(&self, io: PartitionIo) {
        let p = io.partition;
        let view = Arc::new(Mutex::new(Txs::default()));
        self.shared.owned.lock().expect("owned lock").insert(p, view.clone());
        Run { shared: self.shared.clone(), io, view }.main();
        self.shared.owned.lock().expect("owned lock").remove(&p);
    }
}

struct Run {
    shared: Arc<Shared>,
    io: PartitionIo,
    /// The partition's transactions, also read by the HTTP status.
    view: Arc<Mutex<Txs>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Run {
    fn main(self) {
        esk_owner::own(
            &self.io,
            Duration::from_millis(self.shared.config.session_timeout_ms),
            || self.acquire(),
            |producer| self.serve(producer),
            |phase| {
                if phase == Phase::Lost {
                    metrics::counter!("esk_coordinator_fenced_total").increment(1);
                }
            },
        );
    }

    /// Fences the previous owner and restores the partition's transactions.
    fn acquire(&self) -> Result<Option<FutureProducer>> {
        let c = &self.shared.config;
        let p = self.io.partition;
        let started = Instant::now();
        let producer = esk_owner::io::fence(
            &self.shared.kafka,
            &c.transactional_id(p),
            c.transaction_timeout_ms,
            &self.shared.topics.tx_requests(),
        )?;
        let mut txs = Txs::default();
        let mut skipped = 0;
        let group = format!("{}-restore", c.group_id());
        let done = esk_owner::restore::read_partition(
            &self.shared.kafka,
            &group,
            &self.shared.topics.tx_log(),
            p,
            0,
            self.io.stop_flag(),
            |_, v| match v.map(serde_json::from_slice::<TxRecord>) {
                Some(Ok(r)) => {
                    txs.records.insert(r.txid.clone(), r);
                }
                _ => skipped += 1,
            },
        )?;
        if !done {
            return Ok(None);
        }
        if skipped > 0 {
            tracing::warn!(partition = p, skipped, "restore skipped records that are not transaction records");
        }
        txs.absorb(Vec::new(), Vec::new());
        let (open, in_doubt) = txs.counts(now_ms());
        *self.view.lock().expect("view lock") = txs;
        self.io.rewind(Duration::from_millis(c.transaction_timeout_ms))?;
        tracing::info!(
            partition = p,
            open,
            in_doubt,
            ms = started.elapsed().as_millis() as u64,
            "partition taken over"
        );
        Ok(Some(producer))
    }

    fn serve(&self, producer: &FutureProducer) -> Result<()> {
        let mut failures = 0u32;
        let max = self.shared.config.max_batch as usize;
        while !self.io.stopped() {
            let batch = self.io.collect(max, TICK);
            let ctx = self.shared.context();
            let now = now_ms();
            let step = {
                let txs = self.view.lock().expect("view lock");
                let mut step = Step::default();
                for m in batch {
                    step.handle(&ctx, &txs, m, now);
                }
                step.tick(&ctx, &txs, now);
                step
            };
            if step.is_empty() {
                continue;
            }
            let started = Instant::now();
            match self.transact(producer, &step) {
                Ok(()) => {
                    failures = 0;
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
                    metrics::histogram!("esk_coordinator_transaction_seconds").record(started.elapsed().as_secs_f64());
                    let mut txs = self.view.lock().expect("view lock");
                    txs.absorb(step.records(), step.sent.clone());
                    let (open, in_doubt) = txs.counts(now);
                    metrics::gauge!("esk_coordinator_open").set(open as f64);
                    metrics::gauge!("esk_coordinator_in_doubt").set(in_doubt as f64);
                }
                Err(TxnError::Fatal(e)) => return Err(e),
                Err(TxnError::Abortable(e)) => {
                    failures += 1;
                    metrics::counter!("esk_coordinator_aborts_total").increment(1);
                    tracing::warn!(partition = self.io.partition, failures, "batch failed, retrying: {e:#}");
                    if let Err(e) =
                        producer.abort_transaction(Duration::from_millis(self.shared.config.transaction_timeout_ms))
                    {
                        return Err(anyhow!("abort_transaction failed: {e}"));
                    }
                    self.io.rewind(Duration::from_millis(self.shared.config.transaction_timeout_ms))?;
                    self.io.pause(Duration::from_millis(100 * u64::from(failures.min(50))));
                }
            }
        }
        Ok(())
    }

    /// The step's log records, prepares, decisions, replies and dead letters,
    /// with the consumed offsets, in one transaction: a decision's commit point.
    fn transact(&self, producer: &FutureProducer, step: &Step) -> Result<(), TxnError> {
        let t = &self.shared.topics;
        let p = self.io.partition;
        producer.begin_transaction().map_err(classify)?;
        let mut deliveries = Vec::new();
        let mut send = |topic: &str, partition: i32, key: &[u8], value: &[u8], headers: Option<OwnedHeaders>| {
            let mut record = FutureRecord::to(topic).partition(partition).key(key).payload(value);
            if let Some(h) = headers {
                record = record.headers(h);
            }
            deliveries.push(producer.send_result(record).map_err(|(e, _)| classify(e))?);
            Ok::<(), TxnError>(())
        };
        for r in step.records() {
            send(&t.tx_log(), p, r.txid.as_bytes(), &json(&r), None)?;
        }
        for (part, stream, prepare) in &step.prepares {
            send(&t.tx_prepare(), *part, stream.as_bytes(), &json(prepare), None)?;
        }
        for (part, stream, decision) in &step.decisions {
            send(&t.tx_commit(), *part, stream.as_bytes(), &json(decision), None)?;
        }
        for (part, txid, reply) in &step.replies {
            send(&t.replies(), *part, txid.as_bytes(), &json(reply), None)?;
        }
        for (o, reason) in &step.dead_letters {
            tracing::warn!(topic = o.topic, offset = o.offset, reason, "parked a record");
            let origin = Origin { topic: &o.topic, partition: o.partition, offset: o.offset };
            let h = dead_letter_headers(&o.headers, reason, origin, "coordinator");
            let key = o.key.as_deref().unwrap_or_default();
            send(&t.dlq("coordinator"), p, key, o.payload.as_deref().unwrap_or_default(), Some(h))?;
            metrics::counter!("esk_coordinator_dead_letters_total").increment(1);
        }
        txn::await_deliveries(deliveries)?;
        let consumed: HashMap<String, i64> = step.consumed.clone();
        let timeout = Duration::from_millis(self.shared.config.transaction_timeout_ms);
        txn::commit(producer, p, &consumed, self.io.group_metadata(), timeout, self.io.stop_flag())
    }
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("protocol messages serialize")
}
