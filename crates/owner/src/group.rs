//! The consumer group of a single-writer service and its rebalances.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use esk_kafka::{GroupMember, KafkaConfig};
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use tokio_util::sync::CancellationToken;

use crate::io::{PartitionIo, Wake};

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
}

/// What a service does with a partition it owns.
pub trait Handler: Send + Sync + 'static {
    /// Serves one owned partition on a thread of its own until
    /// [`PartitionIo::stopped`]: fence, restore, process batches.
    fn run(&self, io: PartitionIo);
    /// Every partition was revoked (all handlers have returned).
    fn revoked(&self) {}
    /// The group assigned these partitions (handlers are starting on them):
    /// what readiness waits for.
    fn assigned(&self, _partitions: &[i32]) {}
}

struct Worker {
    stop: Arc<AtomicBool>,
    wake: Arc<Wake>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    fn signal_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.notify();
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
    fn pre_rebalance(&self, _consumer: &GroupConsumer, rebalance: &Rebalance<'_>) {
        match rebalance {
            // Eager protocol: a revoke takes every partition.
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = tpl.count() / self.spec.inputs.len().max(1), "partitions revoked");
                self.stop_all();
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!("rebalance error: {e}"),
        }
    }

    fn post_rebalance(&self, _consumer: &GroupConsumer, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(tpl) = rebalance else {
            return;
        };
        if self.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            return;
        };
        let partitions: Vec<i32> =
            tpl.elements().iter().filter(|e| e.topic() == self.spec.inputs[0]).map(|e| e.partition()).collect();
        tracing::info!(?partitions, "partitions assigned");
        self.handler.assigned(&partitions);
        let mut workers = self.workers.lock().expect("workers lock");
        for p in partitions {
            let stop = Arc::new(AtomicBool::new(false));
            let wake = Arc::new(Wake::default());
            // Split the queues here: `assign` deactivates earlier splits.
            let queues = self
                .spec
                .inputs
                .iter()
                .enumerate()
                .filter_map(|(i, topic)| {
                    let mut q = consumer.split_partition_queue(topic, p)?;
                    let w = wake.clone();
                    q.set_nonempty_callback(move || w.notify());
                    Some((i, topic.clone(), q))
                })
                .collect();
            let io = PartitionIo {
                partition: p,
                consumer: consumer.clone(),
                queues,
                stop: stop.clone(),
                wake: wake.clone(),
                first: std::sync::atomic::AtomicUsize::new(0),
            };
            let handler = self.handler.clone();
            let thread = std::thread::Builder::new()
                .name(format!("{}-p{p}", self.spec.group_id))
                .spawn(move || handler.run(io))
                .expect("spawning a partition handler");
            if let Some(old) = workers.insert(p, Worker { stop, wake, thread: Some(thread) }) {
                old.join();
            }
        }
    }
}

impl GroupContext {
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
    let names: Vec<&str> = spec.inputs.iter().map(String::as_str).collect();
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
