//! The writer's consumer group and its rebalances.
//!
//! One consumer subscribes to `commands`, `tx.prepare` and `tx.commit` with the
//! range assignor, so whoever owns partition p of one owns p of all three. Each
//! owned partition's three queues are split off to a [`Worker`] thread; the
//! consumer thread itself only serves the group protocol. On a revoke every
//! worker finishes its current transaction and stops before the partitions are
//! given up; on an assign a worker starts per partition.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use anyhow::Result;
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::batch::Source;
use crate::worker::Worker;

pub type GroupConsumer = BaseConsumer<GroupContext>;

/// Rebalance callbacks: start and stop partition workers.
pub struct GroupContext {
    shared: Arc<Shared>,
    consumer: OnceLock<Weak<GroupConsumer>>,
    workers: Mutex<BTreeMap<i32, Worker>>,
    /// Set on shutdown: an assignment still queued must start no worker.
    shutting_down: AtomicBool,
}

impl std::fmt::Debug for GroupContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let owned: Vec<i32> = self.workers.lock().map(|w| w.keys().copied().collect()).unwrap_or_default();
        f.debug_struct("GroupContext").field("partitions", &owned).finish()
    }
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _consumer: &GroupConsumer, rebalance: &Rebalance<'_>) {
        match rebalance {
            // Eager protocol: a revoke takes every partition.
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = tpl.count() / 3, "partitions revoked");
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
        let t = &self.shared.topics;
        let partitions: Vec<i32> =
            tpl.elements().iter().filter(|e| e.topic() == t.commands()).map(|e| e.partition()).collect();
        tracing::info!(?partitions, "partitions assigned");
        let mut workers = self.workers.lock().expect("workers lock");
        for p in partitions {
            // Split the queues here: `assign` deactivates earlier splits.
            let queues =
                [(Source::Commands, t.commands()), (Source::Prepare, t.tx_prepare()), (Source::Commit, t.tx_commit())]
                    .into_iter()
                    .filter_map(|(source, topic)| {
                        let q = consumer.split_partition_queue(&topic, p)?;
                        Some((source, topic, q))
                    })
                    .collect();
            if let Some(old) = workers.insert(p, Worker::spawn(self.shared.clone(), consumer.clone(), p, queues)) {
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
        self.shared.status.lock().expect("status lock").partitions.clear();
        metrics::gauge!("esk_writer_partitions").set(0.0);
    }
}

/// Runs the consumer thread until `shutdown`; blocks.
pub fn run(shared: &Arc<Shared>, shutdown: &CancellationToken) -> Result<()> {
    let t = &shared.topics;
    let topics = [t.commands(), t.tx_prepare(), t.tx_commit()];
    let context = GroupContext {
        shared: shared.clone(),
        consumer: OnceLock::new(),
        workers: Mutex::new(BTreeMap::new()),
        shutting_down: AtomicBool::new(false),
    };
    let session = shared.config.session_timeout_ms;
    let consumer: Arc<GroupConsumer> = Arc::new(
        shared
            .kafka
            .client()
            .set("group.id", shared.config.group_id())
            .set("partition.assignment.strategy", "range")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("session.timeout.ms", session.to_string())
            .set("heartbeat.interval.ms", (session / 6).max(300).to_string())
            .create_with_context(context)?,
    );
    let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names)?;
    tracing::info!(group = %shared.config.group_id(), "joined the writer group");
    while !shutdown.is_cancelled() {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                // Split queues take every owned partition's records; one here was
                // fetched before the split and is fetched again after the worker's seek.
                tracing::debug!(topic = rdkafka::Message::topic(&m), "record on the main queue ignored");
            }
            Some(Err(e)) => tracing::warn!("consumer: {e}"),
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
    Ok(())
}
