//! The esk coordinator: 2PC-equivalent commits across streams and services,
//! over prepare/commit topics (DESIGN section 7).
//!
//! Delivery guarantee: **exactly once**, and **nothing only in memory**. Every
//! state change goes to `tx.log` in the same Kafka transaction as the messages
//! it sends; a decision's transaction (log record, a decision to each
//! participant, the outcome to the client) is the commit point. An instance
//! that takes over a partition restores its transactions from `tx.log`, sends
//! again the decisions not yet acknowledged, and aborts the undecided ones
//! whose deadline passed (presumed abort). Deadlines are wall-clock times in
//! the log, so they survive restarts. A txid retried within the idempotency
//! horizon gets the first outcome; ended transactions are kept on disk (the
//! local store) for the horizon, then tombstoned in the log. Memory holds the
//! live transactions only.
//!
//! # Layout
//! - [`config`]: flags and environment.
//! - [`logic`]: the decisions, pure and unit-tested.
//! - [`handler`]: one owned partition of `tx.requests`/`tx.votes` (the group
//!   and fencing are `esk_owner`'s, as for the writer).
//! - [`http`]: `/health`, `/metrics`, `/status`, `GET /tx/{txid}`.
//!
//! Crash tests: `ESK_FAULT=after-prepare` kills the process right after the
//! first transaction that sent prepares commits, `ESK_FAULT=after-decision`
//! right after the first decision commits, `ESK_FAULT=after-partial-vote`
//! right after a partial vote was taken in memory only (not logged, its
//! offset not committed), `ESK_FAULT=after-commit-holding-vote` right after a
//! transaction committed while such a vote was held.

pub mod config;
pub mod handler;
pub mod http;
pub mod isolation;
pub mod logic;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{Result, bail};
use esk_domain::Registry;
use esk_kafka::KafkaConfig;
use esk_kafka::admin::{Admin, Durability, TopicKind};
use esk_wire::Topics;
use esk_wire::limits::Limits;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// What the partition handlers and the HTTP endpoint share.
pub struct Shared {
    pub config: Config,
    pub kafka: KafkaConfig,
    pub topics: Topics,
    pub aggregates: Registry,
    pub partitions: i32,
    pub reply_partitions: i32,
    /// The live transactions of every partition this instance owns.
    pub owned: Mutex<BTreeMap<i32, Arc<Mutex<logic::Txs>>>>,
    /// Ended transactions of the horizon, every partition, on disk.
    pub store: Arc<esk_store::Store>,
    pub limits: Limits,
    pub horizon_ms: i64,
    /// The standby: a follower of the whole log into the store.
    pub standby: Option<esk_follower::Follower>,
    /// The partitions this instance owns (their stores are their handlers').
    pub owned_stores: esk_follower::store::Owned,
    /// The partitions the group last assigned (`None` before the first
    /// assignment and during a rebalance), and those served: what `/ready` waits for.
    pub assigned: Mutex<Option<Vec<i32>>>,
    pub serving: Mutex<std::collections::BTreeSet<i32>>,
    /// Whether Kafka answers, sampled every second.
    pub probe: esk_runtime::sample::Sampled<Result<(), String>>,
    /// Which context each category belongs to (ADR 13), followed.
    pub routes: Arc<esk_kafka::contexts::Routes>,
    pub following: esk_kafka::contexts::Following,
    /// Partitions of each context's `tx.prepare`, as first looked up.
    pub context_partitions: esk_kafka::contexts::Partitions,
    /// For those lookups.
    pub metadata: rdkafka::consumer::BaseConsumer,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("prefix", &self.topics.prefix()).finish_non_exhaustive()
    }
}

impl Shared {
    pub fn context(&self) -> logic::Context<'_> {
        logic::Context {
            aggregates: &self.aggregates,
            router: self,
            partitions: self.partitions,
            reply_partitions: self.reply_partitions,
            resend_after_ms: self.config.resend_ms as i64,
            limits: self.limits,
            horizon_ms: self.horizon_ms,
        }
    }
}

impl logic::Router for Shared {
    fn route(&self, category: &str) -> Result<(String, i32), String> {
        let context = self.routes.context_of(category);
        let n = self.partitions(&context).map_err(|e| format!("category '{category}': {e}"))?;
        Ok((context, n))
    }

    fn partitions(&self, context: &str) -> Result<i32, String> {
        use rdkafka::consumer::Consumer as _;
        if context == esk_wire::topics::DEFAULT_CONTEXT {
            return Ok(self.partitions);
        }
        let topic = self.topics.in_context(context).tx_prepare();
        self.context_partitions.of(self.metadata.client(), context, &topic, "", self.config.kafka_timeout())
    }

    fn elsewhere(&self, category: &str) -> bool {
        !self.routes.routes_to(category, esk_wire::topics::DEFAULT_CONTEXT)
    }
}

/// The horizon: `--idempotency-horizon`, else how long `tx.requests` keeps
/// requests; never shorter than that (a request still there could be read
/// again after its transaction was forgotten).
async fn horizon(config: &Config, admin: &Admin, topics: &Topics) -> Result<std::time::Duration> {
    let requests = admin.topic_config(&topics.tx_requests(), "retention.ms").await?.and_then(|v| v.parse::<i64>().ok());
    let kept = match requests {
        Some(ms) if ms >= 0 => ms,
        _ => bail!(
            "{} keeps requests forever (retention.ms=-1), longer than any idempotency horizon: give it a retention \
             (esk topics init sets the horizon)",
            topics.tx_requests()
        ),
    };
    let horizon = config.idempotency_horizon.unwrap_or(std::time::Duration::from_millis(kept as u64));
    if (horizon.as_millis() as i64) < kept {
        bail!(
            "the idempotency horizon ({} s) is shorter than {} keeps requests ({} s): a transaction request read \
             again after it was forgotten would run twice; give a longer --idempotency-horizon",
            horizon.as_secs(),
            topics.tx_requests(),
            kept / 1000
        );
    }
    Ok(horizon)
}

/// The built-in coordinator: transactions over the built-in aggregates
/// (`account`, `inventory`) until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    run_with(config, Registry::builtin(), shutdown).await
}

/// A coordinator of transactions over `aggregates`' categories: a
/// transaction naming another category is refused before anything is
/// written. It must know every aggregate that takes part in a transaction
/// (the writers' own checks stand behind it).
pub async fn run_with(config: Config, aggregates: Registry, shutdown: CancellationToken) -> Result<()> {
    esk_runtime::metrics();
    esk_runtime::described::describe("coordinator");
    let kafka = KafkaConfig::load(&config.bootstrap_servers, config.kafka_timeout(), config.kafka_config.as_deref())?;
    Topics::validate_prefix(&config.prefix).map_err(anyhow::Error::msg)?;
    let topics = Topics::new(&config.prefix);
    let admin = Admin::new(&kafka)?;
    let count = |name: String| {
        let admin = &admin;
        async move {
            match admin.describe(std::slice::from_ref(&name)).await?.first() {
                Some(t) => Ok(t.partitions),
                None => bail!("topic {name} does not exist: run `esk topics init` first"),
            }
        }
    };
    let partitions = count(topics.tx_prepare()).await?;
    for t in [topics.tx_requests(), topics.tx_votes(), topics.tx_log(), topics.tx_commit()] {
        let n = count(t.clone()).await?;
        if n != partitions {
            bail!(
                "{t} has {n} partitions but {} has {partitions}: the platform's topics must agree",
                topics.tx_prepare()
            );
        }
    }
    let shards = count(topics.shards()).await.map_err(|e| {
        e.context(format!(
            "the shards topic is missing (an installation made before shards): stop every writer and coordinator \
             of the version before, run `esk topics init` (it adds {}), then start them",
            topics.shards()
        ))
    })?;
    if !(1..=partitions).contains(&shards) {
        bail!(
            "{} has {shards} partitions (shards) for {partitions} partitions: a shard owns at least one partition; \
             recreate it with 1 to {partitions} partitions while no writer or coordinator runs",
            topics.shards()
        );
    }
    let reply_partitions = count(topics.replies()).await?;
    let brokers = admin.broker_count().await?;
    admin
        .ensure(&[TopicKind::DeadLetters.spec(topics.dlq("coordinator"), partitions, Durability::for_brokers(brokers))])
        .await?;
    let horizon = horizon(&config, &admin, &topics).await?;
    let written =
        [topics.tx_log(), topics.tx_prepare(), topics.tx_commit(), topics.replies(), topics.dlq("coordinator")];
    let limits = admin.limits(&written).await?;
    let store = Arc::new(esk_store::Store::open_instance(|i| config.store_dir(i), config.instance.as_deref())?);
    store.bind_cluster(&admin.cluster_id().await?)?;
    let listener = esk_runtime::http::bind(&config.http_addr, &config.http).await?;
    let owned_stores = esk_follower::store::Owned::default();
    let probe = esk_runtime::sample::kafka_probe(&kafka, &config.group_id(), &topics.tx_requests())?;
    let standby = if config.standby {
        let sink = esk_follower::store::StoreSink::new(
            store.clone(),
            topics.tx_log(),
            handler::TxLogIntake,
            owned_stores.clone(),
        );
        Some(esk_follower::spawn(&kafka, &topics.tx_log(), &format!("{}-standby", config.group_id()), sink)?)
    } else {
        None
    };
    let (following, routes) = esk_kafka::contexts::follow_async(&kafka, &topics).await?;
    let metadata = kafka.metadata(&format!("{}-metadata", config.group_id())).create()?;
    tracing::info!(
        prefix = topics.prefix(),
        partitions,
        horizon_s = horizon.as_secs(),
        store = %store.dir().display(),
        http = %listener.local_addr()?,
        "coordinator starting"
    );
    let shared = Arc::new(Shared {
        config,
        kafka,
        topics,
        aggregates,
        partitions,
        reply_partitions,
        owned: Mutex::new(BTreeMap::new()),
        store,
        limits,
        horizon_ms: horizon.as_millis() as i64,
        standby,
        owned_stores,
        assigned: Mutex::new(None),
        serving: Mutex::default(),
        probe,
        routes,
        following,
        context_partitions: Default::default(),
        metadata,
    });
    let server = tokio::spawn(http::serve(listener, shared.clone(), shutdown.clone()));
    let spec = esk_owner::GroupSpec {
        kafka: shared.kafka.clone(),
        group_id: shared.config.group_id(),
        inputs: vec![shared.topics.tx_requests(), shared.topics.tx_votes()],
        session_timeout_ms: shared.config.session_timeout_ms,
        shards: Some(esk_owner::ShardSpec { topic: shared.topics.shards(), count: shards, partitions }),
    };
    let handler = Arc::new(handler::CoordinatorHandler { shared: shared.clone() });
    esk_owner::serve(spec, handler, shutdown, server).await
}
