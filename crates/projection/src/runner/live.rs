//! The live loop of a projection: batches applied with their checkpoints,
//! published, the group's offsets advised; control (rebuild, replay, stop)
//! between batches; a pause at a batch boundary for a rebuild's switch.

use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use esk_kafka::GroupMember;
use esk_wire::{Event, SchemaRegistry};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use super::batch::{Failing, apply_batch, decode_all};
use super::dead_letters::DeadLetters;
use super::rebuild::Rebuild;
use super::{Control, FromRebuild, RebuildStatus, RunnerConfig, Shared, Stopped, subscription};
use crate::{Parked, Positions, Projection, Store};

/// Rebalances: every assignment starts at the store's checkpoints.
struct SeekToCheckpoints {
    positions: Arc<Mutex<Positions>>,
}

impl ClientContext for SeekToCheckpoints {}

impl ConsumerContext for SeekToCheckpoints {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        if err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS {
            let positions = self.positions.lock().expect("positions lock").clone();
            let parts: Vec<(String, i32)> =
                tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
            for (topic, p) in parts {
                let offset = positions.get(&(topic.clone(), p)).map_or(Offset::Beginning, |n| Offset::Offset(*n));
                let _ = tpl.set_partition_offset(&topic, p, offset);
            }
            tracing::info!(partitions = tpl.count(), "assigned; seeking to the store's checkpoints");
            if let Err(e) = consumer.assign(tpl) {
                tracing::error!("assign: {e}");
            }
        } else {
            if let Err(e) = consumer.unassign() {
                tracing::warn!("unassign: {e}");
            }
        }
    }
}

pub(super) struct Live<S: Store, P> {
    pub(super) config: RunnerConfig,
    pub(super) projection: Arc<P>,
    pub(super) schemas: Arc<SchemaRegistry>,
    pub(super) store: S,
    pub(super) on_switch: Box<dyn Fn(&S) + Send>,
    pub(super) shared: Arc<Shared>,
    /// The store's committed checkpoints, shared with the rebalance callback.
    pub(super) committed: Arc<Mutex<Positions>>,
    pub(super) control: Receiver<Control>,
    pub(super) rebuild: Option<Receiver<FromRebuild<S>>>,
    pub(super) rates: Vec<(Instant, u64)>,
}

impl<S: Store, P: Projection<S>> Live<S, P> {
    fn consumer(&self) -> Result<BaseConsumer<SeekToCheckpoints>, rdkafka::error::KafkaError> {
        let consumer: BaseConsumer<SeekToCheckpoints> = self
            .config
            .kafka
            // The group is this instance's alone (ADR 5). As a static member
            // a restarted instance takes its place at once; otherwise its
            // join waited for the killed one's session to expire (45 s), and
            // the partitions were first split with that ghost.
            .group_member(&GroupMember {
                group: &self.config.group_id,
                instance: Some(&self.config.group_id),
                session: None,
                co_partitioned: false,
            })
            .create_with_context(SeekToCheckpoints { positions: self.committed.clone() })?;
        let pattern = subscription(&self.config.topics, &self.projection.categories());
        consumer.subscribe(&[&pattern])?;
        Ok(consumer)
    }

    pub(super) fn run(mut self) {
        let name = self.projection.name().to_owned();
        let consumer = loop {
            match self.consumer() {
                Ok(c) => break c,
                Err(e) => {
                    tracing::error!(projection = name, "cannot create the consumer: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        };
        let mut dead_letters = match DeadLetters::new(&self.config, &name) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(projection = name, "cannot create the dead-letter producer: {e}");
                return;
            }
        };
        let mut positions = self.committed.lock().expect("positions lock").clone();
        tracing::info!(projection = name, version = self.store.version(), "projection running");
        loop {
            match self.control.try_recv() {
                Ok(Control::Stop) | Err(TryRecvError::Disconnected) => break,
                Ok(Control::Rebuild(reply)) => {
                    let _ = reply.send(self.start_rebuild());
                }
                Ok(Control::Replay(reply)) => {
                    let _ = reply.send(self.replay(&mut positions));
                }
                Err(TryRecvError::Empty) => {}
            }
            if let Some(msg) = self.rebuild.as_ref().map(Receiver::try_recv) {
                match msg {
                    Ok(FromRebuild::Pause(ack)) => {
                        self.paused(&consumer, &ack, &mut positions);
                        continue;
                    }
                    Ok(FromRebuild::Switch(_)) => unreachable!("a switch comes only while paused"),
                    Ok(FromRebuild::Failed(e)) => {
                        tracing::error!(projection = name, "rebuild failed: {e}");
                        self.rebuild = None;
                    }
                    Err(TryRecvError::Disconnected) => self.rebuild = None,
                    Err(TryRecvError::Empty) => {}
                }
            }
            let batch =
                match esk_follower::engine::poll::batch(&consumer, self.config.max_batch, Duration::from_millis(100)) {
                    Ok(batch) => batch,
                    Err(refused) => {
                        tracing::error!(projection = name, "{refused}");
                        self.shared.published.fail(Stopped::Refused(refused));
                        break;
                    }
                };
            if batch.is_empty() {
                // A fatal consumer error ends the loop: for a static member
                // it means another process joined with this instance's id.
                if let Some((code, reason)) = consumer.client().fatal_error() {
                    let why = format!(
                        "the consumer of group {} failed for good ({code:?}: {reason}); another projector with the \
                         same instance id took its place",
                        self.config.group_id
                    );
                    tracing::error!(projection = name, "{why}");
                    self.shared.published.fail(Stopped::Failed(why));
                    break;
                }
                self.shared.published.idle_at(&consumer);
                continue;
            }
            let decoded = decode_all(&batch, &self.schemas);
            self.apply(&consumer, &batch, &decoded, &mut positions, &mut dead_letters);
        }
        tracing::info!(projection = name, "projection stopped");
    }

    /// Applies a batch with its checkpoints, trying again (with back-off,
    /// parking an event that keeps failing) until it commits.
    fn apply(
        &mut self,
        consumer: &BaseConsumer<SeekToCheckpoints>,
        batch: &[BorrowedMessage<'_>],
        decoded: &[Result<Event, String>],
        positions: &mut Positions,
        dead_letters: &mut DeadLetters,
    ) {
        let name = self.projection.name().to_owned();
        let started = Instant::now();
        let mut failing = Failing::default();
        loop {
            let mut send = |parked: &[Parked]| dead_letters.send(&self.config, &name, parked);
            match apply_batch(&*self.projection, &mut self.store, batch, decoded, positions, &failing.poison, &mut send)
            {
                Ok((applied, parked)) => {
                    self.shared.published.written(batch);
                    self.committed_now(consumer, positions, applied, parked.len() as u64, started);
                    return;
                }
                Err(e) => {
                    metrics::counter!("esk_projection_retries_total", "projection" => name.clone()).increment(1);
                    tracing::warn!(projection = name, "batch failed, retrying: {e}");
                    failing.failed(e);
                }
            }
        }
    }

    fn committed_now(
        &mut self,
        consumer: &BaseConsumer<SeekToCheckpoints>,
        positions: &Positions,
        applied: u64,
        parked: u64,
        started: Instant,
    ) {
        let name = self.projection.name().to_owned();
        *self.committed.lock().expect("positions lock") = positions.clone();
        self.shared.published.publish(positions.clone());
        metrics::counter!("esk_projection_applied_total", "projection" => name.clone()).increment(applied);
        metrics::counter!("esk_projection_parked_total", "projection" => name.clone()).increment(parked);
        metrics::histogram!("esk_projection_batch_seconds", "projection" => name)
            .record(started.elapsed().as_secs_f64());
        let now = Instant::now();
        self.rates.push((now, applied + parked));
        self.rates.retain(|(t, _)| now.duration_since(*t) < Duration::from_secs(5));
        let window = self.rates.first().map_or(0.0, |(t, _)| now.duration_since(*t).as_secs_f64()).max(1.0);
        let recent: u64 = self.rates.iter().map(|(_, n)| n).sum();
        {
            let mut s = self.shared.status.lock().expect("status lock");
            s.applied += applied;
            s.parked += parked;
            s.events_per_second = recent as f64 / window;
            s.version = self.store.version();
        }
        // For lag tools only: the checkpoints in the store are what counts.
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in positions {
            let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!("group offset commit: {e}");
        }
    }

    fn start_rebuild(&mut self) -> Result<u64, String> {
        if self.rebuild.is_some() {
            return Err("a rebuild is already running".into());
        }
        let mut next = self.store.create_next().map_err(|e| e.to_string())?;
        self.projection.migrate(&mut next).map_err(|e| e.to_string())?;
        let version = next.version();
        let (tx, rx) = mpsc::channel();
        self.rebuild = Some(rx);
        let rebuild = Rebuild {
            config: self.config.clone(),
            projection: self.projection.clone(),
            schemas: self.schemas.clone(),
            store: Some(next),
            shared: self.shared.clone(),
            to_live: tx,
        };
        self.shared.status.lock().expect("status lock").rebuild =
            Some(RebuildStatus { version, phase: "building".into(), ..RebuildStatus::default() });
        std::thread::Builder::new()
            .name(format!("rebuild-{}", self.projection.name()))
            .spawn(move || rebuild.run())
            .map_err(|e| e.to_string())?;
        tracing::info!(projection = self.projection.name(), version, "rebuild started");
        Ok(version)
    }

    /// Paused for a rebuild's last catch-up: serve the group, wait for the new store.
    fn paused(
        &mut self,
        consumer: &BaseConsumer<SeekToCheckpoints>,
        ack: &Sender<Positions>,
        positions: &mut Positions,
    ) {
        let assignment = consumer.assignment().unwrap_or_default();
        let _ = consumer.pause(&assignment);
        let _ = ack.send(positions.clone());
        let outcome = loop {
            // Keep serving the group protocol; paused partitions return nothing.
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                tracing::debug!(offset = m.offset(), "record while paused is fetched again after the switch");
            }
            match self.rebuild.as_ref().map(|r| r.recv_timeout(Duration::from_millis(10))) {
                Some(Ok(FromRebuild::Switch(store))) => break Some(store),
                Some(Ok(FromRebuild::Failed(e))) => {
                    tracing::error!(projection = self.projection.name(), "rebuild failed: {e}");
                    break None;
                }
                Some(Ok(FromRebuild::Pause(_))) | Some(Err(mpsc::RecvTimeoutError::Timeout)) => {}
                None | Some(Err(mpsc::RecvTimeoutError::Disconnected)) => break None,
            }
        };
        self.rebuild = None;
        if let Some(mut store) = outcome {
            match store.checkpoints().and_then(|c| store.make_current().map(|()| c)) {
                Ok(checkpoints) => {
                    (self.on_switch)(&store);
                    self.store = store;
                    *positions = checkpoints;
                    *self.committed.lock().expect("positions lock") = positions.clone();
                    self.shared.published.publish(positions.clone());
                    let mut s = self.shared.status.lock().expect("status lock");
                    s.version = self.store.version();
                    if let Some(r) = s.rebuild.as_mut() {
                        r.phase = "switched".into();
                    }
                    tracing::info!(
                        projection = self.projection.name(),
                        version = self.store.version(),
                        "switched to the rebuilt model"
                    );
                }
                Err(e) => tracing::error!("cannot switch to the rebuilt model: {e}"),
            }
        }
        // Resume where the (possibly new) store stands.
        let current = assignment.elements();
        for e in &current {
            let offset =
                positions.get(&(e.topic().to_owned(), e.partition())).map_or(Offset::Beginning, |n| Offset::Offset(*n));
            if let Err(err) = consumer.seek(e.topic(), e.partition(), offset, Duration::from_secs(10)) {
                tracing::warn!("seek after switch: {err}");
            }
        }
        let _ = consumer.resume(&assignment);
    }
}
