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
//! the log, so they survive restarts.
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
//! right after the first decision commits.

pub mod config;
pub mod handler;
pub mod http;
pub mod logic;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result, bail};
use esk_domain::Registry;
use esk_kafka::KafkaConfig;
use esk_kafka::admin::{Admin, Durability, TopicKind};
use esk_wire::Topics;
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
    /// The transactions of every partition this instance owns.
    pub owned: Mutex<BTreeMap<i32, Arc<Mutex<logic::Txs>>>>,
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
            partitions: self.partitions,
            reply_partitions: self.reply_partitions,
            resend_after_ms: self.config.resend_ms as i64,
        }
    }
}

/// Runs the coordinator until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    esk_runtime::metrics();
    let kafka = KafkaConfig::new(&config.bootstrap_servers, config.kafka_timeout())?;
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
    let reply_partitions = count(topics.replies()).await?;
    let brokers = admin.broker_count().await?;
    admin
        .ensure(&[TopicKind::DeadLetters.spec(topics.dlq("coordinator"), partitions, Durability::for_brokers(brokers))])
        .await?;
    let listener = tokio::net::TcpListener::bind(&config.http_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_addr))?;
    tracing::info!(prefix = topics.prefix(), partitions, http = %listener.local_addr()?, "coordinator starting");
    let shared = Arc::new(Shared {
        config,
        kafka,
        topics,
        aggregates: Registry::builtin(),
        partitions,
        reply_partitions,
        owned: Mutex::new(BTreeMap::new()),
    });
    let server = tokio::spawn(http::serve(listener, shared.clone(), shutdown.clone()));
    let spec = esk_owner::GroupSpec {
        kafka: shared.kafka.clone(),
        group_id: shared.config.group_id(),
        inputs: vec![shared.topics.tx_requests(), shared.topics.tx_votes()],
        session_timeout_ms: shared.config.session_timeout_ms,
    };
    let handler = Arc::new(handler::CoordinatorHandler { shared: shared.clone() });
    esk_owner::serve(spec, handler, shutdown, server).await
}
