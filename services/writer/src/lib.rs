//! The esk writer: the single writer of each partition.
//!
//! Delivery guarantee: **exactly once, for the idempotency horizon**. A
//! request is consumed, decided and answered in one Kafka transaction together
//! with its events, the streams' new state records, what the writer remembers
//! of it (`<prefix>.answers`) and the consumed offsets; a client sees a reply
//! only after that transaction committed. A crash at any point either commits
//! all of it or none. A retry of a request (same request id, or same first
//! event id at the same expected version) within the horizon is answered with
//! the first result and writes nothing, however many requests came between,
//! across restarts and takeovers; one older than the horizon is refused
//! (`request_expired`), never applied a second time.
//!
//! As a library, [`Writer`] serves the aggregates it is given (a service's
//! own, through the `esk` facade); the `esk-writer` binary serves the built-in
//! `account` and `inventory`. Every category without an aggregate still
//! takes raw appends. One writer group serves an installation's commands
//! topic, so every writer of an installation must be given the same
//! aggregates.
//!
//! # Layout
//! - [`config`]: the command-line and environment configuration.
//! - The consumer group is `esk_owner`'s, by shard: it assigns the partitions
//!   of `<prefix>.shards` (one per shard); the owner of shard k reads
//!   partition p of `commands`, `tx.prepare` and `tx.commit` for every p with
//!   `p % shards == k` (a thread per owned shard, stopped before a revoke
//!   completes).
//! - [`worker`]: one thread per owned shard: fences the previous owner
//!   (`transactional.id = <prefix>-writer-s<k>`), restores the shard's
//!   partitions, then runs batches, each one Kafka transaction over the
//!   partitions that have work; asks for the decisions of holds open past
//!   their deadline.
//! - [`batch`]: the decisions of a batch, pure and unit-tested.
//! - [`memory`]: what a partition remembers, on disk (`esk_store`) with a
//!   bounded cache of stream records.
//! - [`restore`]: bringing a partition's store to the ends of its topics.
//! - [`standby`]: the hot standby, a follower of the whole state and answers
//!   topics into the store, so a takeover reads only what its copy lacks
//!   (`--standby`, on by default).
//! - [`http`]: `/health`, `/metrics`, `/status`.
//!
//! Crash tests: `ESK_FAULT=after-vote` kills the process right after the first
//! transaction with a yes vote commits.

pub mod batch;
pub mod config;
pub mod http;
pub mod memory;
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
use esk_wire::limits::Limits;
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
    /// Writer shards (the shards topic's partitions), fixed at start.
    pub shards: i32,
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
    /// The local stores of every partition.
    pub store: Arc<esk_store::Store>,
    /// The hot standby: followers of the whole state and answers topics into the store.
    pub standby: Option<(esk_follower::Follower, esk_follower::Follower)>,
    /// The partitions this instance owns (their stores are their workers').
    pub owned: esk_follower::store::Owned,
    /// Record sizes, from the smallest `max.message.bytes` of the topics written.
    pub limits: Limits,
    /// How long answers and decisions are remembered (ms).
    pub horizon_ms: i64,
    /// The partitions the group last assigned (`None` before the first
    /// assignment and during a rebalance): what `/ready` waits for.
    pub assigned: Mutex<Option<Vec<i32>>>,
    /// Whether Kafka answers, sampled every second.
    pub probe: esk_runtime::sample::Sampled<Result<(), String>>,
    /// Which context each category belongs to, followed: a request for a
    /// category another context claimed is refused, never written here.
    pub routes: Arc<esk_kafka::contexts::Routes>,
    /// The thread that keeps `routes` current (stopped when dropped).
    pub following: esk_kafka::contexts::Following,
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
            limits: self.limits,
            horizon_ms: self.horizon_ms,
            context: &self.config.context,
            routes: Some(&self.routes),
        }
    }
}

/// `retention.ms` of a topic (`None`: forever).
async fn retention(admin: &Admin, topic: &str) -> Result<Option<i64>> {
    let ms = admin.topic_config(topic, "retention.ms").await?.and_then(|v| v.parse::<i64>().ok());
    Ok(ms.filter(|ms| *ms >= 0))
}

/// The horizon: `--idempotency-horizon`, else how long the commands topic
/// keeps requests (what `esk topics init --idempotency-horizon` set). Never
/// shorter than that (a request still there could be read again after its
/// answer was forgotten), and the answers topic must keep answers for the
/// horizon and its clock margin.
async fn horizon(config: &Config, admin: &Admin, topics: &Topics) -> Result<Duration> {
    let answers = retention(admin, &topics.answers()).await?;
    let Some(commands) = retention(admin, &topics.commands()).await? else {
        bail!(
            "{} keeps requests forever (retention.ms=-1), longer than any idempotency horizon: a request read again \
             after its answer expired would be applied twice. Give it a retention (esk topics init sets the horizon)",
            topics.commands()
        );
    };
    let horizon = config.idempotency_horizon.unwrap_or(Duration::from_millis(commands as u64));
    let ms = horizon.as_millis() as i64;
    if commands > ms {
        bail!(
            "the idempotency horizon ({} s) is shorter than {} keeps requests ({} s): a request read again after its \
             answer expired would be applied twice; give a longer --idempotency-horizon",
            ms / 1000,
            topics.commands(),
            commands / 1000
        );
    }
    let kept = esk_wire::limits::kept_ms(ms);
    if answers.is_some_and(|a| a < kept) {
        bail!(
            "{} keeps answers {} s, less than the idempotency horizon ({} s) and its clock margin ({} s): the writer \
             would forget them too soon; give a shorter --idempotency-horizon or raise that topic's retention.ms",
            topics.answers(),
            answers.unwrap_or_default() / 1000,
            ms / 1000,
            (kept - ms) / 1000
        );
    }
    Ok(horizon)
}

/// ` --context NAME` for a context's topics (what `esk topics init` is told).
fn init_flag(topics: &Topics) -> String {
    match topics.context() {
        esk_wire::topics::DEFAULT_CONTEXT => String::new(),
        c => format!(" --context {c}"),
    }
}

/// Claims the categories of the writer's aggregates and `--categories` for
/// its context (refused when another context has one), then follows the
/// registry: what the writer's batches check each request's category against.
async fn claim(
    config: &Config,
    kafka: &KafkaConfig,
    admin: &Admin,
    topics: &Topics,
    aggregates: &Registry,
    store: &esk_store::Store,
) -> Result<(esk_kafka::contexts::Following, Arc<esk_kafka::contexts::Routes>)> {
    use esk_kafka::admin::{Durability, TopicKind};
    if admin.describe(&[topics.contexts()]).await?.is_empty() {
        // An installation from before contexts: its registry begins now.
        let brokers = admin.broker_count().await?;
        admin.ensure(&[TopicKind::Contexts.spec(topics.contexts(), 1, Durability::for_brokers(brokers))]).await?;
    }
    let mut categories: Vec<String> = aggregates.categories().map(str::to_owned).collect();
    categories.extend(config.categories.iter().cloned());
    categories.sort_unstable();
    categories.dedup();
    let by = format!(
        "esk-writer {} (pid {})",
        store.dir().file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        std::process::id()
    );
    let (k, t) = (kafka.clone(), topics.clone());
    tokio::task::spawn_blocking(move || esk_kafka::contexts::claim(&k, &t, &categories, &by))
        .await?
        .with_context(|| format!("claiming the categories of context '{}'", topics.context()))?;
    Ok(esk_kafka::contexts::follow_async(kafka, topics).await?)
}

/// A writer of the aggregates it is given.
///
/// ```no_run
/// # async fn f(config: esk_writer::Config, shutdown: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
/// esk_writer::Writer::new(config).aggregate::<esk_domain::account::Account>().run(shutdown).await
/// # }
/// ```
#[derive(Debug)]
pub struct Writer {
    config: Config,
    aggregates: Registry,
}

impl Writer {
    /// A writer with no aggregate yet: raw appends to any category.
    pub fn new(config: Config) -> Self {
        Self { config, aggregates: Registry::default() }
    }

    /// Serves commands to `A::CATEGORY` with `A` (a second aggregate of the
    /// same category replaces the first).
    pub fn aggregate<A: esk_domain::Aggregate + 'static>(mut self) -> Self {
        self.aggregates.register::<A>();
        self
    }

    /// Serves the bounded context `name` (ADR 13): its own requests, state,
    /// answers and 2PC topics (`esk topics init --context NAME` makes them)
    /// and writer group; the categories of its aggregates are claimed for it
    /// at start. What a service declares here replaces `--context`.
    pub fn context(mut self, name: &str) -> Self {
        self.config.context = name.to_owned();
        self
    }

    /// Serves every aggregate of `registry` too.
    pub fn aggregates(mut self, registry: Registry) -> Self {
        self.aggregates.extend(registry);
        self
    }

    /// Runs until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        serve(self.config, self.aggregates, shutdown).await
    }
}

/// The built-in writer until `shutdown` is cancelled: the built-in aggregates
/// `--aggregates` names (`account` and `inventory` by default).
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let wanted: Vec<String> = config.aggregates.iter().filter(|c| c.as_str() != "none").cloned().collect();
    let builtin = Registry::builtin().only(&wanted).map_err(|e| anyhow::anyhow!("--aggregates: {e}"))?;
    Writer::new(config).aggregates(builtin).run(shutdown).await
}

async fn serve(config: Config, aggregates: Registry, shutdown: CancellationToken) -> Result<()> {
    esk_wire::topics::parse_context(&config.context).map_err(anyhow::Error::msg)?;
    // Install the recorder before anything counts.
    esk_runtime::metrics();
    esk_runtime::described::describe("writer");

    let kafka = KafkaConfig::load(&config.bootstrap_servers, config.kafka_timeout(), config.kafka_config.as_deref())?;
    Topics::validate_prefix(&config.prefix).map_err(anyhow::Error::msg)?;
    let topics = config.topics();
    // esk's shipped schemas hold only where esk's own aggregates run: a
    // service's own category, whatever its name, follows its own schemas.
    let schemas = SchemaRegistry::with_dir_for(config.schemas_dir.as_deref(), &aggregates.builtin_categories())
        .with_context(|| format!("loading schemas from {:?}", config.schemas_dir))?;
    let admin = Admin::new(&kafka)?;
    let flag = init_flag(&topics);
    let count = |name: String| {
        let (admin, flag) = (&admin, &flag);
        async move {
            let found = admin.describe(std::slice::from_ref(&name)).await?;
            match found.first() {
                Some(t) => Ok(t.partitions),
                None => bail!("topic {name} does not exist: run `esk topics init{flag}` first"),
            }
        }
    };
    let partitions = count(topics.commands()).await?;
    for t in [topics.tx_prepare(), topics.tx_commit(), topics.state(), topics.answers()] {
        let n = count(t.clone()).await?;
        if n != partitions {
            bail!(
                "{t} has {n} partitions but {} has {partitions}: co-partitioned topics must agree",
                topics.commands()
            );
        }
    }
    let installation = Topics::new(topics.prefix());
    if topics != installation {
        let theirs = count(installation.commands()).await?;
        if theirs != partitions {
            bail!(
                "{} has {partitions} partitions but the installation's {} has {theirs}: every context has the \
                 installation's partition count (events topics are shared); make the context's topics again with \
                 `esk topics init{flag}` while none of its writers runs",
                topics.commands(),
                installation.commands()
            );
        }
    }
    let shards = count(topics.shards()).await.map_err(|e| {
        e.context(format!(
            "the shards topic is missing (an installation made before shards): stop every writer and coordinator of \
             the version before, run `esk topics init` (it adds {}), then start the writers",
            topics.shards()
        ))
    })?;
    if !(1..=partitions).contains(&shards) {
        bail!(
            "{} has {shards} partitions (shards) for {partitions} partitions: a shard writes at least one \
             partition; recreate it with 1 to {partitions} partitions while no writer runs",
            topics.shards()
        );
    }
    let reply_partitions = count(topics.replies()).await?;
    let vote_partitions = count(topics.tx_votes()).await?;
    count(topics.writer_dlq()).await?;
    let horizon = horizon(&config, &admin, &topics).await?;
    let written =
        [topics.commands(), topics.state(), topics.answers(), topics.replies(), topics.tx_votes(), topics.writer_dlq()];
    let limits = admin.limits(&written).await?;
    let store = Arc::new(esk_store::Store::open_instance(|i| config.store_dir(i), config.instance.as_deref())?);
    store.bind_cluster(&admin.cluster_id().await?)?;
    let routes = claim(&config, &kafka, &admin, &topics, &aggregates, &store).await?;
    let http = esk_runtime::http::bind(&config.http_addr, &config.http).await?;
    let watermarks = kafka.metadata(&format!("{}-watermarks", config.group_id())).create()?;
    let horizon_ms = horizon.as_millis() as i64;
    let owned = esk_follower::store::Owned::default();
    let probe = esk_runtime::sample::kafka_probe(&kafka, &config.group_id(), &topics.commands())?;
    let standby = if config.standby {
        let group = format!("{}-standby", config.group_id());
        Some(standby::spawn(&kafka, &topics, &group, &store, aggregates.clone(), horizon_ms, &owned)?)
    } else {
        None
    };
    tracing::info!(
        prefix = topics.prefix(),
        context = topics.context(),
        partitions,
        shards,
        horizon_s = horizon.as_secs(),
        record_bytes = limits.record_bytes,
        store = %store.dir().display(),
        http = %http.local_addr()?,
        "writer starting"
    );
    let shared = Arc::new(Shared {
        config,
        kafka,
        topics,
        schemas,
        aggregates,
        partitions,
        shards,
        reply_partitions,
        vote_partitions,
        admin,
        known_topics: Mutex::new(HashSet::new()),
        unusable: Mutex::new(HashMap::new()),
        runtime: tokio::runtime::Handle::current(),
        status: Mutex::new(http::Status::default()),
        watermarks,
        store,
        standby,
        owned,
        limits,
        horizon_ms,
        assigned: Mutex::new(None),
        probe,
        routes: routes.1,
        following: routes.0,
    });
    let server = tokio::spawn(http::serve(http, shared.clone(), shutdown.clone()));
    let spec = esk_owner::GroupSpec {
        kafka: shared.kafka.clone(),
        group_id: shared.config.group_id(),
        inputs: vec![shared.topics.commands(), shared.topics.tx_prepare(), shared.topics.tx_commit()],
        session_timeout_ms: shared.config.session_timeout_ms,
        shards: Some(esk_owner::ShardSpec {
            topic: shared.topics.shards(),
            count: shared.shards,
            partitions: shared.partitions,
        }),
    };
    let handler = Arc::new(worker::WriterHandler { shared: shared.clone() });
    esk_owner::serve(spec, handler, shutdown, server).await
}
