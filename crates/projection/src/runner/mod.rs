//! The consume loop of a projection, its rebuilds and its dead letters, on
//! the engine every follower of a log shares (`esk_follower::engine`:
//! batches, published positions and waits, idle positions, lag, back-off).
//!
//! One thread per projection runs the live loop ([`live`]): poll a batch
//! (`read_committed`), apply it in one store transaction with the new
//! checkpoints ([`batch`]), park what cannot be applied ([`dead_letters`]),
//! commit, publish the new positions (for read-your-writes) and commit the
//! group's offsets (for lag tools only: on every assignment the runner seeks
//! to its store's checkpoints).
//!
//! A rebuild ([`rebuild`]) builds the next store version from offset 0 on a
//! thread of its own while the live loop goes on. Near the end it asks the
//! live loop to pause at a batch boundary, catches up to (or past) the live
//! positions, and hands the new store over; the live loop switches to it and
//! resumes from its checkpoints. Queries see the old model until the switch
//! and the new one after, never a half-built one; positions never go
//! backwards.

mod batch;
mod dead_letters;
mod live;
mod rebuild;

use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub use batch::POISON_AFTER;
use esk_follower::engine::lag;
pub use esk_follower::engine::lag::Lag;
use esk_follower::engine::published::{Applied, Published};
use esk_kafka::KafkaConfig;
use esk_wire::{SchemaRegistry, Topics};
use serde::Serialize;

use crate::{Positions, Projection, Store, StoreError};

/// How a runner reaches Kafka.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub kafka: KafkaConfig,
    pub topics: Topics,
    /// The consumer group, committed for lag tools only. Every projector
    /// instance keeps a full copy, so each has a group of its own.
    pub group_id: String,
    pub max_batch: usize,
}

/// What the runner reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunnerStatus {
    pub projection: String,
    pub version: u64,
    pub applied: u64,
    pub parked: u64,
    /// Events applied per second, over the last few seconds.
    pub events_per_second: f64,
    pub rebuild: Option<RebuildStatus>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RebuildStatus {
    pub version: u64,
    /// building, catching-up, switched, failed
    pub phase: String,
    pub applied: u64,
    pub started_ms_ago: u64,
    pub positions: Vec<PartitionPosition>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionPosition {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

fn listed(p: &Positions) -> Vec<PartitionPosition> {
    p.iter().map(|((t, part), o)| PartitionPosition { topic: t.clone(), partition: *part, next_offset: *o }).collect()
}

/// The outcome of a replay of parked events.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    pub replayed: u64,
    /// Replayed by an earlier replay of this model version.
    pub already_replayed: u64,
    /// In the dead-letter topic, but applied by this model version in order
    /// (a rebuild after a fix), or parked by another instance only.
    pub not_parked_here: u64,
    pub still_failing: Vec<String>,
}

enum Control {
    Rebuild(Sender<Result<u64, String>>),
    Replay(Sender<Result<ReplayReport, String>>),
    Stop,
}

enum FromRebuild<S> {
    /// Pause at a batch boundary and answer with the live positions.
    Pause(Sender<Positions>),
    /// The new store has caught up: switch to it.
    Switch(S),
    Failed(String),
}

/// Why a projection's live loop stopped for good.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Stopped {
    /// The brokers refused the credentials or an ACL is missing.
    #[error(transparent)]
    Refused(esk_kafka::Error),
    #[error("{0}")]
    Failed(String),
}

/// What the loops of a projection publish: positions (for read-your-writes),
/// idle positions, when the last applied records were written, why it
/// stopped; and its status.
struct Shared {
    published: Published<Positions, Stopped>,
    status: Mutex<RunnerStatus>,
}

/// A running projection: positions to wait on, status, control.
pub struct RunnerHandle {
    applied: Applied<Positions>,
    shared: Arc<Shared>,
    control: Sender<Control>,
    /// Taken by the first [`RunnerHandle::stop`].
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Lag against the high watermarks, sampled every second: reading it
    /// never waits on Kafka.
    lag: esk_runtime::sample::Sampled<Option<Vec<Lag>>>,
    topics: Vec<String>,
}

impl std::fmt::Debug for RunnerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerHandle").field("topics", &self.topics).finish()
    }
}

impl RunnerHandle {
    /// The committed positions now.
    pub fn positions(&self) -> Positions {
        self.applied.now()
    }

    /// Waits until `(topic, partition)` has been applied past `offset`, or the
    /// timeout passes (then `Err` with the positions reached).
    pub async fn wait_past(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        timeout: Duration,
    ) -> Result<(), Positions> {
        let key = (topic.to_owned(), partition);
        self.applied.until(|p| p.get(&key).is_some_and(|next| *next > offset), timeout).await
    }

    /// Waits for the next published change of positions (or the timeout).
    pub async fn changed(&self, timeout: Duration) {
        self.applied.changed(timeout).await;
    }

    pub fn status(&self) -> RunnerStatus {
        self.shared.status.lock().expect("status lock").clone()
    }

    /// Resolves, with the reason, once the projection has stopped for good
    /// (the service should exit: its model no longer follows the log).
    pub async fn failed(&self) -> Stopped {
        self.shared.published.failed().await
    }

    /// Checkpoints against high watermarks, per partition of the projection's topics.
    /// Per partition, as last sampled (about a second ago at most while
    /// Kafka answers); `None` before the first sample or when the last one
    /// could not reach Kafka (so an unreachable broker never reads as caught up).
    pub fn lag(&self) -> Option<Vec<Lag>> {
        self.lag.latest().and_then(|(lag, _)| lag)
    }

    /// Starts a rebuild; returns the version being built.
    pub fn rebuild(&self) -> Result<u64, String> {
        self.ask(Control::Rebuild)
    }

    /// Applies the parked events that apply now, each once.
    pub fn replay(&self) -> Result<ReplayReport, String> {
        self.ask(Control::Replay)
    }

    fn ask<T>(&self, make: impl FnOnce(Sender<Result<T, String>>) -> Control) -> Result<T, String> {
        let (tx, rx) = mpsc::channel();
        self.control.send(make(tx)).map_err(|_| "the projection has stopped".to_owned())?;
        rx.recv_timeout(Duration::from_secs(120)).map_err(|_| "the projection did not answer".to_owned())?
    }

    /// Stops after the current batch and waits (a second call returns at once).
    pub fn stop(&self) {
        let _ = self.control.send(Control::Stop);
        let thread = self.thread.lock().expect("thread lock").take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

/// The regex that subscribes to a projection's category topics.
fn subscription(topics: &Topics, categories: &[String]) -> String {
    let prefix = topics.events_prefix().replace('.', "\\.");
    format!("^{prefix}({})$", categories.join("|"))
}

/// Starts a projection's live loop on a thread of its own. `on_switch` runs
/// after a rebuild's store became current (to point queries at it).
pub fn spawn<S, P>(
    config: RunnerConfig,
    projection: Arc<P>,
    schemas: Arc<SchemaRegistry>,
    mut store: S,
    on_switch: Box<dyn Fn(&S) + Send>,
) -> Result<RunnerHandle, StoreError>
where
    S: Store,
    P: Projection<S>,
{
    projection.migrate(&mut store)?;
    let initial = store.checkpoints()?;
    let shared = Arc::new(Shared {
        published: Published::new(initial.clone()),
        status: Mutex::new(RunnerStatus {
            projection: projection.name().to_owned(),
            version: store.version(),
            ..RunnerStatus::default()
        }),
    });
    let topics: Vec<String> = projection.categories().iter().map(|c| config.topics.events(c)).collect();
    let name = projection.name().to_owned();
    let s = shared.clone();
    let lag = lag::sample(&config.kafka, &config.group_id, &name, topics.clone(), move || lag::Source {
        applied: s.published.applied(),
        last_ms: s.published.last_written(),
        idle: s.published.idle(),
    })
    .map_err(|e| StoreError::Other(e.to_string()))?;
    let (control_tx, control_rx) = mpsc::channel();
    let live = live::Live {
        config,
        projection,
        schemas,
        store,
        on_switch,
        shared: shared.clone(),
        committed: Arc::new(Mutex::new(initial)),
        control: control_rx,
        rebuild: None,
        rates: Vec::new(),
    };
    let thread = std::thread::Builder::new()
        .name(format!("projection-{name}"))
        .spawn(move || live.run())
        .map_err(StoreError::Io)?;
    let applied = shared.published.watch();
    Ok(RunnerHandle { applied, shared, control: control_tx, thread: Mutex::new(Some(thread)), lag, topics })
}
