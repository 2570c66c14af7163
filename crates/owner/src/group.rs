//! The consumer group of a single-writer service and its rebalances.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use esk_kafka::{GroupMember, KafkaConfig};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::io::{PartitionIo, ShardIo, Signal};

pub type GroupConsumer = BaseConsumer<GroupContext>;

/// The group a service's instances form.
#[derive(Debug, Clone)]
pub struct GroupSpec {
    pub kafka: KafkaConfig,
    pub group_id: String,
    /// Co-partitioned input topics; the owner of p owns p of every one.
    pub inputs: Vec<String>,
    /// How soon the group notices a dead member and gives its partitions away.
    pub session_timeout_ms: u64,
    /// Owned by shard (`Some`) or partition by partition (`None`).
    pub shards: Option<ShardSpec>,
}

/// Ownership by shard: the group assigns the partitions of a shards topic
/// (one per shard, nothing is written to it), and the owner of shard k owns
/// partition p of every input for each p with `p % count == k`. A shard is
/// one handler, one transactional producer and one transaction at a time
/// over all its partitions.
#[derive(Debug, Clone)]
pub struct ShardSpec {
    pub topic: String,
    /// Shards: the shards topic's partition count, fixed for the
    /// installation (read at start).
    pub count: i32,
    /// Partitions of the inputs.
    pub partitions: i32,
}

impl ShardSpec {
    /// The input partitions shard `shard` owns.
    pub fn partitions_of(&self, shard: i32) -> Vec<i32> {
        (0..self.partitions).filter(|p| p % self.count.max(1) == shard).collect()
    }
}

/// What a service does with a shard it owns (a partition, when the service
/// owns partitions one by one).
pub trait Handler: Send + Sync + 'static {
    /// Serves one owned shard on a thread of its own until
    /// [`ShardIo::stopped`]: fence, restore, process batches.
    fn run(&self, io: ShardIo);
    /// Everything was revoked (all handlers have returned).
    fn revoked(&self) {}
    /// The group assigned these partitions, of every shard it assigned
    /// (handlers are starting on them): what readiness waits for.
    fn assigned(&self, _partitions: &[i32]) {}
}

struct Worker {
    signal: Signal,
    partitions: Vec<i32>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    fn signal_stop(&self) {
        self.signal.set();
    }

    fn join(mut self) {
        self.signal_stop();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("a partition handler panicked");
        }
    }
}

/// Rebalance callbacks: start and stop partition handlers.
pub struct GroupContext {
    spec: GroupSpec,
    handler: Arc<dyn Handler>,
    consumer: OnceLock<Weak<GroupConsumer>>,
    /// By shard (or partition).
    workers: Mutex<BTreeMap<i32, Worker>>,
    /// Set on shutdown: an assignment still queued must start no handler.
    shutting_down: AtomicBool,
}

impl std::fmt::Debug for GroupContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let owned: Vec<i32> = self.workers.lock().map(|w| w.keys().copied().collect()).unwrap_or_default();
        f.debug_struct("GroupContext").field("group", &self.spec.group_id).field("partitions", &owned).finish()
    }
}

impl ClientContext for GroupContext {
    // Enabled only to keep heartbeats on time (see `run_group`).
    fn stats_raw(&self, _statistics: &[u8]) {}
}

impl ConsumerContext for GroupContext {
    // Eager protocol (range assignor): a revoke takes everything, an assign
    // gives everything anew. By shard, the group assigns partitions of the
    // shards topic and the member fetches the inputs' partitions of those
    // shards instead (librdkafka lets the rebalance callback assign any).
    fn rebalance(&self, consumer: &GroupConsumer, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(consumer, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(partitions = self.owned_partitions().len(), "partitions revoked");
                self.stop_all();
                if let Err(e) = consumer.unassign() {
                    tracing::warn!("unassign: {e}");
                }
            }
            other => {
                tracing::warn!("rebalance error: {other:?}");
                self.stop_all();
                if let Err(e) = consumer.unassign() {
                    tracing::warn!("unassign: {e}");
                }
            }
        }
    }
}

impl GroupContext {
    /// The units (shards, or partitions) in an assignment, each with its
    /// input partitions. A shard the installation does not have (the shards
    /// topic grew while the writers ran) is not served: the shards this
    /// instance started with cover every partition.
    fn units(&self, tpl: &TopicPartitionList) -> Vec<(i32, Vec<i32>)> {
        match &self.spec.shards {
            None => tpl
                .elements()
                .iter()
                .filter(|e| e.topic() == self.spec.inputs[0])
                .map(|e| (e.partition(), vec![e.partition()]))
                .collect(),
            Some(s) => tpl
                .elements()
                .iter()
                .filter(|e| e.topic() == s.topic)
                .filter_map(|e| {
                    let k = e.partition();
                    if k >= s.count {
                        tracing::error!(
                            shard = k,
                            shards = s.count,
                            "{} has more partitions than when this instance started: shard {k} is not served; \
                             restart every instance to change the shard count",
                            s.topic
                        );
                        metrics::counter!("esk_owner_unknown_shards_total").increment(1);
                        return None;
                    }
                    Some((k, s.partitions_of(k)))
                })
                .collect(),
        }
    }

    fn owned_partitions(&self) -> Vec<i32> {
        self.workers.lock().map(|w| w.values().flat_map(|w| w.partitions.clone()).collect()).unwrap_or_default()
    }

    fn assign(&self, consumer: &GroupConsumer, tpl: &TopicPartitionList) {
        let units = self.units(tpl);
        let mut inputs = TopicPartitionList::new();
        for p in units.iter().flat_map(|(_, ps)| ps) {
            for topic in &self.spec.inputs {
                inputs.add_partition(topic, *p);
            }
        }
        if let Err(e) = consumer.assign(&inputs) {
            tracing::error!("assigning the inputs' partitions: {e}");
            return;
        }
        if self.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            return;
        };
        let partitions: Vec<i32> = units.iter().flat_map(|(_, ps)| ps.iter().copied()).collect();
        match &self.spec.shards {
            Some(_) => tracing::info!(shards = ?units, "shards assigned"),
            None => tracing::info!(?partitions, "partitions assigned"),
        }
        self.handler.assigned(&partitions);
        let mut workers = self.workers.lock().expect("workers lock");
        for (unit, ps) in units {
            let signal = Signal::default();
            let parts = ps
                .iter()
                .map(|&p| {
                    // Split the queues here: `assign` deactivates earlier splits.
                    let queues = self
                        .spec
                        .inputs
                        .iter()
                        .enumerate()
                        .filter_map(|(i, topic)| {
                            let mut q = consumer.split_partition_queue(topic, p)?;
                            let w = signal.wake.clone();
                            q.set_nonempty_callback(move || w.notify());
                            Some((i, topic.clone(), q))
                        })
                        .collect();
                    PartitionIo {
                        partition: p,
                        consumer: consumer.clone(),
                        queues,
                        signal: signal.clone(),
                        first: std::sync::atomic::AtomicUsize::new(0),
                    }
                })
                .collect();
            let io =
                ShardIo { shard: unit, parts, signal: signal.clone(), first: std::sync::atomic::AtomicUsize::new(0) };
            let handler = self.handler.clone();
            let name = match self.spec.shards {
                Some(_) => format!("{}-s{unit}", self.spec.group_id),
                None => format!("{}-p{unit}", self.spec.group_id),
            };
            let thread =
                std::thread::Builder::new().name(name).spawn(move || handler.run(io)).expect("spawning a handler");
            if let Some(old) = workers.insert(unit, Worker { signal, partitions: ps, thread: Some(thread) }) {
                old.join();
            }
        }
    }

    fn stop_all(&self) {
        let workers = std::mem::take(&mut *self.workers.lock().expect("workers lock"));
        // Signal all first so they finish their transactions in parallel.
        for w in workers.values() {
            w.signal_stop();
        }
        for (_, w) in workers {
            w.join();
        }
        self.handler.revoked();
    }
}

/// How a service built on esk-owner runs: the group on a blocking thread
/// until it ends or `shutdown` fires, then the end of the service's HTTP
/// `server`. The group's result is the service's.
pub async fn serve(
    spec: GroupSpec,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<Result<()>>,
) -> Result<()> {
    let group = {
        let shutdown = shutdown.clone();
        tokio::task::spawn_blocking(move || run_group(spec, handler, &shutdown))
    };
    let result = group.await.context("the consumer thread panicked")?;
    shutdown.cancel();
    server.await.context("the HTTP server panicked")??;
    result
}

/// Joins the group and runs handlers for the partitions it assigns, until
/// `shutdown`; then finishes open transactions and leaves. Blocks.
pub fn run_group(spec: GroupSpec, handler: Arc<dyn Handler>, shutdown: &CancellationToken) -> Result<()> {
    let session = spec.session_timeout_ms;
    let consumer: Arc<GroupConsumer> = Arc::new(
        spec.kafka
            // The statistics that keep heartbeats on time are dropped, see `GroupContext`.
            .group_member(&GroupMember {
                group: &spec.group_id,
                instance: None,
                session: Some(Duration::from_millis(session)),
                co_partitioned: true,
            })
            .create_with_context(GroupContext {
                spec: spec.clone(),
                handler,
                consumer: OnceLock::new(),
                workers: Mutex::new(BTreeMap::new()),
                shutting_down: AtomicBool::new(false),
            })?,
    );
    let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
    let names: Vec<&str> = match &spec.shards {
        Some(s) => vec![s.topic.as_str()],
        None => spec.inputs.iter().map(String::as_str).collect(),
    };
    consumer.subscribe(&names)?;
    tracing::info!(group = %spec.group_id, "joined the group");
    let mut refused = None;
    while !shutdown.is_cancelled() {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                // Split queues take every owned partition's records; one here was
                // fetched before the split and is fetched again after the handler's rewind.
                tracing::debug!(topic = rdkafka::Message::topic(&m), "record on the main queue ignored");
            }
            Some(Err(e)) => match esk_kafka::Error::refusal(&e) {
                // No retry mends a refusal (credentials, an ACL): leave the
                // group, and the process ends with it.
                Some(e) => {
                    refused = Some(e);
                    break;
                }
                None => tracing::warn!("consumer: {e}"),
            },
            None => {}
        }
    }
    tracing::info!("stopping: finishing open transactions and leaving the group");
    consumer.context().shutting_down.store(true, Ordering::SeqCst);
    consumer.context().stop_all();
    consumer.unsubscribe();
    // Leave the group now, so that another instance takes over at once.
    let _ = consumer.poll(Duration::from_millis(100));
    drop(consumer);
    match refused {
        Some(e) => Err(anyhow::Error::new(e).context(format!("the group {} stopped", spec.group_id))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_partition_is_in_exactly_one_shard() {
        for (partitions, count) in [(12, 1), (12, 5), (12, 12), (7, 3), (1, 1)] {
            let spec = ShardSpec { topic: "t".into(), count, partitions };
            let mut seen: Vec<i32> = (0..count).flat_map(|k| spec.partitions_of(k)).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..partitions).collect::<Vec<_>>(), "{partitions} partitions in {count} shards");
            assert!((0..count).all(|k| !spec.partitions_of(k).is_empty()));
        }
        let spec = ShardSpec { topic: "t".into(), count: 5, partitions: 12 };
        assert_eq!(spec.partitions_of(2), vec![2, 7]);
        assert_eq!(spec.partitions_of(0), vec![0, 5, 10]);
    }
}
