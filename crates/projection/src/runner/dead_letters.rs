//! Dead letters: parking what a projection cannot apply, and replaying it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use esk_kafka::Sending;
use esk_kafka::admin::{Admin, Durability, TopicKind};
use esk_kafka::record::{DLQ_OFFSET, DLQ_PARTITION, DLQ_TOPIC, DLQ_TRUNCATED, Origin, dead_letter};
use esk_wire::SchemaRegistry;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::batch::{Rec, decode};
use super::live::Live;
use super::{ReplayReport, RunnerConfig};
use crate::{Parked, Positions, Projection, Store, StoreError};

/// Where a projection parks what it cannot apply: `<prefix>.dlq.<projection>`,
/// made on first use.
pub(super) struct DeadLetters {
    producer: FutureProducer,
    topic: String,
    made: bool,
}

impl DeadLetters {
    pub(super) fn new(config: &RunnerConfig, projection: &str) -> Result<Self, String> {
        let producer = config.kafka.producer(Sending::Parked).create().map_err(|e| e.to_string())?;
        Ok(Self { producer, topic: config.topics.dlq(projection), made: false })
    }

    /// Sends parked events, durable before this returns (the checkpoint
    /// must not move past them first).
    pub(super) fn send(
        &mut self,
        config: &RunnerConfig,
        projection: &str,
        parked: &[Parked],
    ) -> Result<(), StoreError> {
        if parked.is_empty() {
            return Ok(());
        }
        if !self.made {
            ensure_dlq(config, &self.topic)?;
            self.made = true;
        }
        send_parked(&self.producer, &self.topic, projection, parked)
    }
}

impl<S: Store, P: Projection<S>> Live<S, P> {
    /// Applies parked events that apply now (after a fix), each at most once.
    pub(super) fn replay(&mut self, positions: &mut Positions) -> Result<ReplayReport, String> {
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
        self.shared.published.touch();
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
