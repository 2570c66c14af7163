//! The esk writer: the single writer of each partition.
//!
//! Delivery guarantee: **exactly once**. A request is consumed, decided and
//! answered in one Kafka transaction together with its events, the streams' new
//! state records and the consumed offsets; a client sees a reply only after that
//! transaction committed. A crash at any point either commits all of it or none.
//!
//! # Layout
//! - [`config`]: the command-line and environment configuration.
//! - The consumer group over `commands`, `tx.prepare` and `tx.commit` is
//!   `esk_owner`'s (range assignor: partition p of all three together; a thread
//!   per owned partition, stopped before a revoke completes).
//! - [`worker`]: one thread per owned partition: fences the previous owner
//!   (`transactional.id = <prefix>-writer-p<N>`), restores the partition from
//!   `state`, then runs batches, each one Kafka transaction.
//! - [`batch`]: the decisions of a batch, pure and unit-tested.
//! - [`restore`]: reading a partition of the compacted state topic.
//! - [`standby`]: the hot standby, a follower of the whole state topic, so a
//!   takeover reads only what its copy lacks (`--standby`, on by default).
//! - [`http`]: `/health`, `/metrics`, `/status`.
//!
//! Crash tests: `ESK_FAULT=after-vote` kills the process right after the first
//! transaction with a yes vote commits.

pub mod batch;
pub mod config;
pub mod http;
pub mod restore;
pub mod standby;
pub mod worker;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use esk_domain::Registry;
use esk_kafka::KafkaConfig;
use esk_kafka::admin::Admin;
use esk_wire::{SchemaRegistry, Topics};
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// What every partition worker shares.
pub struct Shared {
    pub config: Config,
    pub kafka: KafkaConfig,
    pub topics: Topics,
    pub schemas: SchemaRegistry,
    pub aggregates: Registry,
    /// Partitions of the co-partitioned topics.
    pub partitions: i32,
    pub reply_partitions: i32,
    pub vote_partitions: i32,
    pub admin: Admin,
    /// Events topics known to exist.
    pub known_topics: Mutex<HashSet<String>>,
    /// Categories whose events topic cannot be used (wrong partition count):
    /// their requests are refused instead of blocking the partition.
    pub unusable: Mutex<HashMap<String, String>>,
    pub runtime: tokio::runtime::Handle,
    pub status: Mutex<http::Status>,
    /// For high watermarks: a consumer client (read_uncommitted) that refreshes
    /// its metadata by itself, unlike a transactional producer's.
    pub watermarks: rdkafka::consumer::BaseConsumer,
    /// The hot standby: a follower of the whole state topic and what it holds.
    pub standby: Option<(esk_follower::Follower, Arc<Mutex<standby::Standby>>)>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("prefix", &self.topics.prefix())
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The high watermark of a partition.
    ///
    /// Partition handlers ask at once (no lock: a leader that died blocks only
    /// the handlers of its partitions), each call bounded by the transaction
    /// timeout so that a handler told to stop is never held longer.
    pub fn high_watermark(&self, topic: &str, partition: i32) -> Result<i64> {
        use rdkafka::consumer::Consumer;
        let timeout = Duration::from_millis(self.config.transaction_timeout_ms);
        Ok(esk_kafka::watermarks(self.watermarks.client(), topic, partition, timeout)?.1)
    }

    pub fn batch_context(&self) -> batch::Context<'_> {
        batch::Context {
            schemas: &self.schemas,
            aggregates: &self.aggregates,
            partitions: self.partitions,
            reply_partitions: self.reply_partitions,
            vote_partitions: self.vote_partitions,
            unusable: self.unusable.lock().expect("unusable lock").clone(),
        }
    }
}

/// Runs the writer until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    // Install the recorder before anything counts.
    esk_runtime::metrics();

    let kafka = KafkaConfig::new(&config.bootstrap_servers, config.kafka_timeout())?;
    Topics::validate_prefix(&config.prefix).map_err(anyhow::Error::msg)?;
    let topics = Topics::new(&config.prefix);
    let schemas = match &config.schemas_dir {
        Some(dir) => {
            SchemaRegistry::load_dir(dir).with_context(|| format!("loading schemas from {}", dir.display()))?
        }
        None => SchemaRegistry::builtin(),
    };
    let admin = Admin::new(&kafka)?;
    let count = |name: String| {
        let admin = &admin;
        async move {
            let found = admin.describe(std::slice::from_ref(&name)).await?;
            match found.first() {
                Some(t) => Ok(t.partitions),
                None => bail!("topic {name} does not exist: run `esk topics init` first"),
            }
        }
    };
    let partitions = count(topics.commands()).await?;
    for t in [topics.tx_prepare(), topics.tx_commit(), topics.state()] {
        let n = count(t.clone()).await?;
        if n != partitions {
            bail!(
                "{t} has {n} partitions but {} has {partitions}: co-partitioned topics must agree",
                topics.commands()
            );
        }
    }
    let reply_partitions = count(topics.replies()).await?;
    let vote_partitions = count(topics.tx_votes()).await?;
    count(topics.dlq("writer")).await?;
    let http = http::bind(&config.http_addr).await?;
    let watermarks = kafka.client().set("group.id", format!("{}-watermarks", config.group_id())).create()?;
    let standby = if config.standby {
        let held = Arc::new(Mutex::new(standby::Standby::default()));
        let group = format!("{}-standby", config.group_id());
        let follower = esk_follower::spawn(&kafka, &topics.state(), &group, standby::StandbySink(held.clone()))?;
        Some((follower, held))
    } else {
        None
    };
    tracing::info!(
        prefix = topics.prefix(),
        partitions,
        http = %http.local_addr()?,
        "writer starting"
    );
    let shared = Arc::new(Shared {
        config,
        kafka,
        topics,
        schemas,
        aggregates: Registry::builtin(),
        partitions,
        reply_partitions,
        vote_partitions,
        admin,
        known_topics: Mutex::new(HashSet::new()),
        unusable: Mutex::new(HashMap::new()),
        runtime: tokio::runtime::Handle::current(),
        status: Mutex::new(http::Status::default()),
        watermarks,
        standby,
    });
    let server = tokio::spawn(http::serve(http, shared.clone(), shutdown.clone()));
    let spec = esk_owner::GroupSpec {
        kafka: shared.kafka.clone(),
        group_id: shared.config.group_id(),
        inputs: vec![shared.topics.commands(), shared.topics.tx_prepare(), shared.topics.tx_commit()],
        session_timeout_ms: shared.config.session_timeout_ms,
    };
    let handler = Arc::new(worker::WriterHandler { shared: shared.clone() });
    esk_owner::serve(spec, handler, shutdown, server).await
}
