//! The esk projector: read models built from the event log, queried over HTTP.
//!
//! Delivery guarantee: **exactly-once effects** (see `esk_projection`): each
//! model and its checkpoints change in one SQLite transaction.
//!
//! Scaling: every projector instance keeps a full copy of its models (its own
//! store and consumer group, `--instance`), so any instance answers any query,
//! read-your-writes tokens included. See docs/adr/0005-projectors.md.
//!
//! # Layout
//! - [`config`]: flags and environment.
//! - [`accounts`]: the `accounts` projection and its queries.
//! - [`http`]: `/accounts`, `/status`, rebuilds, dead-letter replays, `/health`, `/metrics`.

pub mod accounts;
pub mod config;
pub mod http;

use std::sync::Arc;

use anyhow::{Context as _, Result};
use esk_kafka::KafkaConfig;
use esk_projection::runner::{self, RunnerConfig, RunnerHandle};
use esk_projection::sqlite::{Readers, SqliteStore};
use esk_wire::{SchemaRegistry, Topics};
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// A running projection: its runner and its query connections.
#[derive(Debug)]
pub struct Model {
    pub name: String,
    pub categories: Vec<String>,
    pub runner: RunnerHandle,
    pub readers: Readers,
    /// Set once the model has caught up with its categories (for `/ready`).
    pub caught_up: esk_runtime::sample::CaughtUp,
}

/// What the HTTP handlers share.
#[derive(Debug)]
pub struct App {
    pub config: Config,
    pub topics: Topics,
    pub accounts: Model,
    /// Whether Kafka answers, sampled every second.
    pub probe: esk_runtime::sample::Sampled<Result<(), String>>,
}

impl App {
    pub fn model(&self, name: &str) -> Option<&Model> {
        (name == self.accounts.name).then_some(&self.accounts)
    }

    pub fn models(&self) -> impl Iterator<Item = &Model> {
        std::iter::once(&self.accounts)
    }
}

/// Runs the projector until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    // Install the recorder before anything counts.
    esk_runtime::metrics();
    esk_runtime::described::describe("projector");

    let kafka = KafkaConfig::load(
        &config.bootstrap_servers,
        std::time::Duration::from_secs(30),
        config.kafka_config.as_deref(),
    )?;
    Topics::validate_prefix(&config.prefix).map_err(anyhow::Error::msg)?;
    let topics = Topics::new(&config.prefix);
    let schemas = SchemaRegistry::with_dir(config.schemas_dir.as_deref())
        .with_context(|| format!("loading schemas from {:?}", config.schemas_dir))?;
    let schemas = Arc::new(schemas);
    let listener = esk_runtime::http::bind(&config.http_addr, &config.http).await?;

    let projection = Arc::new(accounts::Accounts);
    let name = "accounts";
    let dir = config.store_dir(name);
    let store = SqliteStore::open(&dir).with_context(|| format!("opening the store in {}", dir.display()))?;
    let readers = Readers::new(&store);
    let switch = readers.clone();
    let runner = runner::spawn(
        RunnerConfig {
            kafka: kafka.clone(),
            topics: topics.clone(),
            group_id: config.group_id(name),
            max_batch: config.max_batch as usize,
        },
        projection,
        schemas,
        store,
        Box::new(move |s: &SqliteStore| switch.switch_to(s)),
    )?;
    tracing::info!(
        http = %listener.local_addr()?,
        store = %dir.display(),
        group = config.group_id(name),
        "projector running"
    );
    let probe = esk_runtime::sample::kafka_probe(&kafka, &config.group_id(name), &topics.events("account"))?;
    let app = Arc::new(App {
        config,
        topics,
        accounts: Model {
            name: name.into(),
            categories: vec!["account".into()],
            runner,
            readers,
            caught_up: Default::default(),
        },
        probe,
    });
    // A projection that stopped for good (fenced by another instance with
    // this id) ends the service: serving a model that no longer follows the
    // log would answer tokens wrongly or never.
    let failed = {
        let (app, shutdown) = (app.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => None,
                why = app.accounts.runner.failed() => {
                    shutdown.cancel();
                    Some(why)
                }
            }
        })
    };
    http::serve(listener, app.clone(), shutdown).await?;
    let failure = failed.await?;
    let app = Arc::into_inner(app).context("HTTP handlers still hold the app")?;
    tokio::task::spawn_blocking(move || app.accounts.runner.stop()).await?;
    match failure {
        Some(runner::Stopped::Refused(e)) => Err(anyhow::Error::new(e).context(format!("projection {name} stopped"))),
        Some(why) => anyhow::bail!("projection {name} stopped: {why}"),
        None => Ok(()),
    }
}
