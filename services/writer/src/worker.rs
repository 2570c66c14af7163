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
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use chrono::Utc;
use esk_kafka::admin::{Durability, TopicKind};
use esk_kafka::record::{Origin, dead_letter_headers};
use esk_owner::txn::{self, TxnError, classify};
use esk_owner::{Handler, PartitionIo, Phase};
use esk_wire::protocol::{ParticipantMessage, StreamRecord};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::Shared;
use crate::batch::{Batch, Incoming, PartitionState};

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
        self.shared.status.lock().expect("status lock").partitions.clear();
        metrics::gauge!("esk_writer_partitions").set(0.0);
    }
}

struct Run {
    shared: Arc<Shared>,
    partition: i32,
    io: PartitionIo,
}

/// A partition this worker owns: its fenced producer and its restored state.
struct Owned {
    producer: FutureProducer,
    state: PartitionState,
    /// Next offset of each events topic's partition, when known.
    next_offsets: HashMap<String, i64>,
}

/// Why a batch did not commit.
enum Failure {
    /// Abort, rewind to the committed offsets, go on.
    Abortable(anyhow::Error),
    /// Failed before the transaction began: rewind and go on.
    BeforeBegin(anyhow::Error),
    /// The events' offsets were not the predicted ones: abort, and go on with
    /// these next offsets (past the abort marker).
    Mispredicted(anyhow::Error, HashMap<String, i64>),
    /// The producer is fenced or broken, or a commit's outcome is unknown:
    /// acquire the partition anew.
    Fatal(anyhow::Error),
}

impl From<TxnError> for Failure {
    fn from(e: TxnError) -> Self {
        match e {
            TxnError::Abortable(e) => Failure::Abortable(e),
            TxnError::Fatal(e) => Failure::Fatal(e),
        }
    }
}

impl Run {
    fn set_phase(&self, phase: &'static str) {
        let mut status = self.shared.status.lock().expect("status lock");
        status.partitions.entry(self.partition).or_default().phase = phase;
        let owned = status.partitions.len();
        drop(status);
        metrics::gauge!("esk_writer_partitions").set(owned as f64);
    }

    fn main(self) {
        esk_owner::own(
            &self.io,
            Duration::from_millis(self.shared.config.session_timeout_ms),
            || self.acquire(),
            |owned| self.serve(owned),
            |phase| match phase {
                Phase::Starting => self.set_phase("starting"),
                Phase::Serving => self.set_phase("serving"),
                Phase::Lost => {
                    self.set_phase("fenced");
                    metrics::counter!("esk_writer_fenced_total").increment(1);
                }
            },
        );
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
        let Some(state) = crate::restore::restore(&self.shared, self.partition, self.io.stop_flag())? else {
            return Ok(None);
        };
        self.shared.status.lock().expect("status lock").partitions.entry(self.partition).or_default().streams =
            state.streams.len();
        let restored_ms = started.elapsed().as_millis() as u64;
        self.io.rewind(Duration::from_millis(c.transaction_timeout_ms))?;
        tracing::info!(
            partition = self.partition,
            ms = started.elapsed().as_millis() as u64,
            fenced_ms,
            restored_ms,
            "partition taken over"
        );
        Ok(Some(Owned { producer, state, next_offsets: HashMap::new() }))
    }

    /// Serves batches until told to stop (`Ok`) or the producer is lost (`Err`).
    fn serve(&self, owned: &mut Owned) -> Result<()> {
        let mut failures = 0u32;
        let max = self.shared.config.max_batch as usize;
        while !self.io.stopped() {
            let records = self.io.collect(max, Duration::from_millis(100));
            if records.is_empty() {
                continue;
            }
            let n = records.len();
            let started = Instant::now();
            match self.transact(owned, records) {
                Ok((records, voted_yes)) => {
                    failures = 0;
                    owned.state.absorb(records);
                    if voted_yes {
                        esk_runtime::fault_point("after-vote");
                    }
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
                        if let Err(e) = owned
                            .producer
                            .abort_transaction(Duration::from_millis(self.shared.config.transaction_timeout_ms))
                        {
                            return Err(anyhow!("abort_transaction failed: {e}"));
                        }
                    }
                    owned.next_offsets = match failure {
                        Failure::Mispredicted(_, next) => next,
                        _ => HashMap::new(),
                    };
                    self.io.rewind(Duration::from_millis(self.shared.config.transaction_timeout_ms))?;
                    // The same records come again: back off so a persistent
                    // failure does not spin.
                    self.io.pause(Duration::from_millis(100 * u64::from(failures.min(50))));
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

    /// Returns the new stream records, and whether the batch voted yes on a prepare.
    fn transact(&self, owned: &mut Owned, records: Vec<Incoming>) -> Result<(Vec<StreamRecord>, bool), Failure> {
        let shared = &self.shared;
        let p = self.partition;
        // Bounded by the transaction timeout: a handler stuck in a call holds up rebalances.
        let timeout = Duration::from_millis(shared.config.transaction_timeout_ms);
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
        producer.begin_transaction().map_err(|e| Failure::from(classify(e)))?;
        let send =
            |topic: &str, partition: i32, key: &[u8], value: &[u8], headers: Option<OwnedHeaders>, ts: Option<i64>| {
                let mut record = FutureRecord::to(topic).partition(partition).key(key).payload(value);
                if let Some(h) = headers {
                    record = record.headers(h);
                }
                if let Some(ts) = ts {
                    record = record.timestamp(ts);
                }
                producer.send_result(record).map_err(|(err, _)| Failure::from(classify(err)))
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
            let origin = Origin { topic: &o.topic, partition: o.partition, offset: o.offset };
            let h = dead_letter_headers(&o.headers, &d.reason, origin, "writer");
            let key = o.key.as_deref().unwrap_or_default();
            deliveries.push(send(&dlq_topic, p, key, o.payload.as_deref().unwrap_or_default(), Some(h), None)?);
            metrics::counter!("esk_writer_dead_letters_total").increment(1);
        }
        // Wait for every delivery here: rdkafka's commit_transaction flushes
        // first, and its flush polls in 100 ms steps while anything is in flight.
        // `message.timeout.ms` bounds the wait.
        let n_events = event_deliveries.len();
        event_deliveries.extend(deliveries);
        let mut delivered = txn::await_deliveries(event_deliveries)?;
        let t_sent = Instant::now();
        delivered.truncate(n_events);
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
        txn::commit(producer, p, &consumed, self.io.group_metadata(), timeout, self.io.stop_flag())?;
        // Each partition written gets one commit marker after its last record.
        for ((topic, _), offset) in events.iter().zip(&delivered) {
            let next = owned.next_offsets.entry(topic.clone()).or_insert(0);
            *next = (*next).max(offset + 2);
        }
        metrics::counter!("esk_writer_events_total").increment(events.len() as u64);
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1000.0;
        tracing::debug!(produce_ms = ms(t_begin, t_sent), commit_ms = ms(t_sent, Instant::now()), "committed");
        let voted_yes = votes.iter().any(|(_, _, m)| matches!(m, ParticipantMessage::Vote(v) if v.yes));
        Ok((finished.records, voted_yes))
    }
}
