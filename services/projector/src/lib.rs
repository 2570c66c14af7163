//! The esk projector: read models built from the event log, queried over HTTP.
//!
//! Delivery guarantee: **exactly-once effects** (see `esk_projection`): each
//! model and its checkpoints change in one SQLite transaction.
//!
//! Scaling: every projector instance keeps a full copy of its models (its own
//! store and consumer group, `--instance`), so any instance answers any query,
//! read-your-writes tokens included. See docs/adr/0005-projectors.md.
//!
//! As a library, [`Projector`] runs any projections, with the built-in
//! service's guarantees, status, rebuilds, dead-letter replays, health,
//! readiness and metrics; a service adds its own query routes, which read a
//! model through [`http::after`] (read-your-writes tokens) and [`http::read`]. The
//! `esk-projector` binary is `Projector` with the `accounts` projection and
//! its routes.
//!
//! # Layout
//! - [`config`]: flags and environment.
//! - [`accounts`]: the `accounts` projection and its queries.
//! - [`http`]: `/status`, rebuilds, dead-letter replays, `/health`, `/metrics`,
//!   and [`http::after`] and [`http::read`], what a model's own routes read through.

pub mod accounts;
pub mod config;
pub mod http;
pub mod process;

use std::sync::Arc;

use anyhow::{Context as _, Result};
use esk_kafka::KafkaConfig;
use esk_projection::Projection;
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
    /// A process manager's store (never rebuilt: a rebuild would send its
    /// commands again).
    pub process: bool,
}

/// What the HTTP handlers share: the running models, by name.
#[derive(Debug)]
pub struct App {
    pub config: Config,
    pub topics: Topics,
    pub models: Vec<Model>,
    /// Whether Kafka answers, sampled every second.
    pub probe: esk_runtime::sample::Sampled<Result<(), String>>,
}

impl App {
    pub fn model(&self, name: &str) -> Option<&Model> {
        self.models.iter().find(|m| m.name == name)
    }

    pub fn models(&self) -> impl Iterator<Item = &Model> {
        self.models.iter()
    }
}

type Start = Box<dyn FnOnce(RunnerConfig, Arc<SchemaRegistry>, SqliteStore, Readers) -> Result<RunnerHandle> + Send>;

/// Starts a process manager's sender on its store's file.
type Sender = Box<
    dyn FnOnce(std::path::PathBuf, Arc<esk_client::Client>, CancellationToken) -> tokio::task::JoinHandle<Result<()>>
        + Send,
>;

/// A projection given to a [`Projector`], not yet started.
struct Registered {
    name: String,
    categories: Vec<String>,
    /// The categories it reads with esk's shipped schemas (a built-in model's).
    builtin: Vec<String>,
    start: Start,
    /// A process manager's sender.
    sender: Option<Sender>,
}

/// A projector: the projections it is given, each in its own SQLite store,
/// consumer group and thread, behind one HTTP server.
///
/// ```no_run
/// # async fn f(config: esk_projector::Config, shutdown: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
/// esk_projector::Projector::new(config)
///     .projection(esk_projector::accounts::Accounts)
///     .routes(esk_projector::accounts::routes())
///     .run(shutdown)
///     .await
/// # }
/// ```
pub struct Projector {
    config: Config,
    projections: Vec<Registered>,
    routes: axum::Router<Arc<App>>,
}

impl std::fmt::Debug for Projector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projector")
            .field("projections", &self.projections.iter().map(|p| &p.name).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Projector {
    pub fn new(config: Config) -> Self {
        Self { config, projections: Vec::new(), routes: axum::Router::new() }
    }

    /// Runs `projection` too. Its name names its store, consumer group
    /// (`<prefix>-projector-<instance>-<name>`) and dead-letter topic
    /// (`<prefix>.dlq.<name>`): a category-like name (lowercase letters and
    /// digits, at most 64), not `writer` or `coordinator`, and unique in the
    /// installation for an instance id — two services running a projection
    /// of one name under one prefix and instance would share its group and
    /// each miss the events the other gets.
    pub fn projection<P: Projection<SqliteStore>>(mut self, projection: P) -> Self {
        let name = projection.name().to_owned();
        let categories = projection.categories();
        // esk's own model reads its events with esk's shipped schemas; any
        // other projection with the schemas of `--schemas-dir` alone.
        let builtin = if std::any::TypeId::of::<P>() == std::any::TypeId::of::<accounts::Accounts>() {
            categories.clone()
        } else {
            Vec::new()
        };
        let start: Start = Box::new(move |config, schemas, store, readers| {
            let on_switch = Box::new(move |s: &SqliteStore| readers.switch_to(s));
            Ok(runner::spawn(config, Arc::new(projection), schemas, store, on_switch)?)
        });
        self.projections.push(Registered { name, categories, builtin, start, sender: None });
        self
    }

    /// Runs the process manager `process` too (see [`process`]): a projection
    /// of its events into its processes' state, outbox and deadlines (named
    /// as a projection is), and a sender of its commands. Its store is never
    /// rebuilt.
    pub fn process<P: process::Process>(mut self, process: P) -> Self {
        let process = Arc::new(process);
        let sending = process.clone();
        self = self.projection(process::Manager(process));
        let sender: Sender =
            Box::new(move |path, client, shutdown| tokio::spawn(process::send(sending, path, client, shutdown)));
        if let Some(last) = self.projections.last_mut() {
            last.sender = Some(sender);
        }
        self
    }

    /// Adds query routes beside the built-in ones ([`http::BUILT_IN`], which
    /// they may not use). They read a model through [`http::after`] and
    /// [`http::read`]. With an admin token (`ESK_ADMIN_TOKEN`) set, a route
    /// other than GET needs it, as the built-in ones do.
    pub fn routes(mut self, routes: axum::Router<Arc<App>>) -> Self {
        self.routes = self.routes.merge(routes);
        self
    }

    /// Runs until `shutdown` is cancelled or a projection stops for good.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        serve(self, shutdown).await
    }
}

/// The built-in projector: the `accounts` projection and its routes.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    Projector::new(config).projection(accounts::Accounts).routes(accounts::routes()).run(shutdown).await
}

/// Names a projector can run side by side: see [`Projector::projection`].
fn check(projections: &[Registered]) -> Result<()> {
    if projections.is_empty() {
        anyhow::bail!("a projector needs at least one projection");
    }
    let mut names = std::collections::BTreeSet::new();
    for p in projections {
        esk_wire::topics::check_projection_name(&p.name).map_err(anyhow::Error::msg)?;
        if !names.insert(p.name.as_str()) {
            anyhow::bail!(
                "two projections are named '{}': a name names a store, a group and a dead-letter topic",
                p.name
            );
        }
        if p.categories.is_empty() {
            anyhow::bail!("projection '{}' reads no category", p.name);
        }
        if let Some(bad) = p.categories.iter().find(|c| !esk_wire::stream::is_valid_category(c)) {
            anyhow::bail!(
                "projection '{}' reads '{}', which is not a category",
                p.name,
                esk_wire::limits::shorten(bad, 80)
            );
        }
    }
    Ok(())
}

async fn serve(projector: Projector, shutdown: CancellationToken) -> Result<()> {
    let Projector { config, projections, routes } = projector;
    // Install the recorder before anything counts.
    esk_runtime::metrics();
    esk_runtime::described::describe("projector");

    check(&projections)?;
    // A route on a built-in path fails here, before anything starts.
    let router = http::router(routes);
    let kafka = KafkaConfig::load(
        &config.bootstrap_servers,
        std::time::Duration::from_secs(30),
        config.kafka_config.as_deref(),
    )?;
    Topics::validate_prefix(&config.prefix).map_err(anyhow::Error::msg)?;
    let topics = Topics::new(&config.prefix);
    let builtin: Vec<&str> = projections.iter().flat_map(|p| p.builtin.iter().map(String::as_str)).collect();
    let schemas = SchemaRegistry::with_dir_for(config.schemas_dir.as_deref(), &builtin)
        .with_context(|| format!("loading schemas from {:?}", config.schemas_dir))?;
    let schemas = Arc::new(schemas);
    let listener = esk_runtime::http::bind(&config.http_addr, &config.http).await?;

    let probe_topic = topics.events(&projections[0].categories[0]);
    let probe = esk_runtime::sample::kafka_probe(&kafka, &config.group_id(&projections[0].name), &probe_topic)?;
    let mut models: Vec<Model> = Vec::new();
    let mut senders = Vec::new();
    for p in projections {
        let dir = config.store_dir(&p.name);
        let started = SqliteStore::open(&dir)
            .with_context(|| format!("opening the store in {}", dir.display()))
            .and_then(|store| {
                let readers = Readers::new(&store);
                let config = RunnerConfig {
                    kafka: kafka.clone(),
                    topics: topics.clone(),
                    group_id: config.group_id(&p.name),
                    max_batch: config.max_batch as usize,
                };
                Ok(((p.start)(config, schemas.clone(), store, readers.clone())?, readers))
            });
        let (runner, readers) = match started {
            Ok(started) => started,
            Err(e) => {
                // Those already started stop before the error is returned.
                let started = std::mem::take(&mut models);
                tokio::task::spawn_blocking(move || started.iter().for_each(|m| m.runner.stop())).await?;
                return Err(e.context(format!("starting projection {}", p.name)));
            }
        };
        tracing::info!(
            projection = p.name,
            store = %dir.display(),
            group = config.group_id(&p.name),
            categories = p.categories.join(","),
            "projection running"
        );
        let process = p.sender.is_some();
        if let Some(sender) = p.sender {
            senders.push((p.name.clone(), readers.current().1, sender));
        }
        models.push(Model {
            name: p.name,
            categories: p.categories,
            runner,
            readers,
            caught_up: Default::default(),
            process,
        });
    }
    tracing::info!(http = %listener.local_addr()?, models = models.len(), "projector running");
    // The process managers' senders share one client of the installation.
    let mut sending = Vec::new();
    if !senders.is_empty() {
        let (k, t) = (kafka.clone(), topics.clone());
        let client = tokio::task::spawn_blocking(move || esk_client::Client::connect_pipelined(k, t)).await?;
        let client = match client {
            Ok(c) => Arc::new(c),
            Err(e) => {
                let started = std::mem::take(&mut models);
                tokio::task::spawn_blocking(move || started.iter().for_each(|m| m.runner.stop())).await?;
                return Err(anyhow::Error::new(e).context("connecting the process managers' client"));
            }
        };
        for (name, path, sender) in senders {
            tracing::info!(process = name, "process manager sending");
            sending.push((name, sender(path, client.clone(), shutdown.clone())));
        }
    }
    let app = Arc::new(App { config, topics, models, probe });
    // A projection that stopped for good (fenced by another instance with
    // this id) ends the service: serving a model that no longer follows the
    // log would answer tokens wrongly or never.
    let failed = {
        let (app, shutdown) = (app.clone(), shutdown.clone());
        tokio::spawn(async move {
            let stops = app.models().map(|m| {
                let name = m.name.clone();
                Box::pin(async move { (name, m.runner.failed().await) })
            });
            let stops: Vec<_> = stops.collect();
            tokio::select! {
                () = shutdown.cancelled() => None,
                ((name, why), _, _) = futures::future::select_all(stops) => {
                    shutdown.cancel();
                    Some((name, why))
                }
            }
        })
    };
    let served = http::serve(listener, app.clone(), router, shutdown.clone()).await;
    shutdown.cancel();
    let failure = failed.await?;
    for (name, sender) in sending {
        if let Err(e) = sender.await.map_err(anyhow::Error::from).and_then(|r| r) {
            tracing::error!(process = name, "the sender stopped: {e:#}");
        }
    }
    // Every runner stops, whatever the HTTP server or a query still holds.
    let stopping = app.clone();
    tokio::task::spawn_blocking(move || stopping.models().for_each(|m| m.runner.stop())).await?;
    served?;
    match failure {
        Some((name, runner::Stopped::Refused(e))) => {
            Err(anyhow::Error::new(e).context(format!("projection {name} stopped")))
        }
        Some((name, why)) => anyhow::bail!("projection {name} stopped: {why}"),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    async fn refused(projector: Projector) -> String {
        format!("{:#}", projector.run(CancellationToken::new()).await.unwrap_err())
    }

    #[tokio::test]
    async fn projections_that_cannot_run_side_by_side_are_refused_before_anything_starts() {
        let config = || Config::parse_from(["esk-projector", "--bootstrap-servers", "127.0.0.1:1"]);
        let none = refused(Projector::new(config())).await;
        assert!(none.contains("at least one projection"), "{none}");
        let twice =
            refused(Projector::new(config()).projection(accounts::Accounts).projection(accounts::Accounts)).await;
        assert!(twice.contains("two projections are named 'accounts'"), "{twice}");
    }
}
