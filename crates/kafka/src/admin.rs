//! The platform topics of DESIGN section 2, created idempotently with their configs.
//!
//! Every co-partitioned topic shares one partition count P. Once any platform
//! topic exists, P is read from the cluster rather than assumed, so a second
//! `topics init` (or a writer creating a new category's topic) can never
//! break co-partitioning.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use esk_wire::Topics;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::metadata::Metadata;
use rdkafka::producer::{BaseProducer, Producer};
use serde::Serialize;

use crate::config::KafkaConfig;
use crate::error::{Error, is_authorization_code};
use crate::watch::{AuthWatch, fetch_metadata};

/// The partition count of a new installation unless `--partitions` says otherwise.
pub const DEFAULT_PARTITIONS: i32 = 12;

/// Writer shards of a new installation (at most its partitions).
pub const DEFAULT_SHARDS: i32 = 1;

const HOUR_MS: &str = "3600000";

/// How long a retried request or transaction is answered with its first
/// result unless `esk topics init --idempotency-horizon` says otherwise: the
/// requests topics keep records this long, the answers topic too.
pub const DEFAULT_HORIZON: Duration = Duration::from_secs(7 * 24 * 3600);

/// What one topic should look like.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub configs: BTreeMap<String, String>,
}

/// The kinds of platform topic, each with its cleanup and retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    /// Requests to the writer; kept for the idempotency horizon.
    Commands,
    /// The event log: delete policy with infinite retention.
    Events,
    /// The leader topic: compacted, one record per stream survives.
    State,
    /// Answers to clients: short retention.
    Replies,
    /// Coordinator and participant traffic; kept for the idempotency horizon.
    TxTraffic,
    /// The coordinator's log: compacted, one record per txid survives until
    /// the coordinator tombstones it, an idempotency horizon after it ended.
    TxLog,
    /// The writer's memory of answered requests and applied decisions:
    /// deleted an idempotency horizon after they were written.
    Answers,
    /// Parked records: kept until an operator deals with them.
    DeadLetters,
    /// The shards: a partition each, nothing written.
    Shards,
    /// The registry of contexts: one partition of claims, kept forever
    /// (the first claim of a category wins, so none may be deleted).
    Contexts,
}

/// Replication factor and min ISR for a cluster of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durability {
    pub replication_factor: i32,
    pub min_insync_replicas: i32,
}

impl Durability {
    /// min.insync.replicas: 2 from replication 3 up (one broker may die with
    /// acks=all still succeeding), else 1.
    pub fn new(replication_factor: i32) -> Self {
        Self { replication_factor, min_insync_replicas: if replication_factor >= 3 { 2 } else { 1 } }
    }

    /// Replication 3 where the cluster has three brokers, else as many as there are.
    pub fn for_brokers(brokers: usize) -> Self {
        Self::new(brokers.clamp(1, 3) as i32)
    }
}

impl TopicKind {
    /// The topic's spec with the default idempotency horizon.
    pub fn spec(self, name: String, partitions: i32, d: Durability) -> TopicSpec {
        self.spec_for(name, partitions, d, DEFAULT_HORIZON)
    }

    /// The topic's spec: topics that keep requests or answers keep them for `horizon`.
    pub fn spec_for(self, name: String, partitions: i32, d: Durability, horizon: Duration) -> TopicSpec {
        let horizon_ms = horizon.as_millis().to_string();
        // Answers are kept a clock margin longer than requests (see `limits::kept_ms`).
        let kept_ms = esk_wire::limits::kept_ms(horizon.as_millis() as i64);
        let kept = kept_ms.to_string();
        let (cleanup, retention) = match self {
            TopicKind::Commands | TopicKind::TxTraffic => ("delete", horizon_ms.as_str()),
            TopicKind::Answers => ("delete", kept.as_str()),
            TopicKind::Events | TopicKind::DeadLetters | TopicKind::Contexts => ("delete", "-1"),
            TopicKind::Replies | TopicKind::Shards => ("delete", HOUR_MS),
            TopicKind::State | TopicKind::TxLog => ("compact", "-1"),
        };
        let mut configs = BTreeMap::from([
            ("cleanup.policy".to_owned(), cleanup.to_owned()),
            ("retention.ms".to_owned(), retention.to_owned()),
            ("min.insync.replicas".to_owned(), d.min_insync_replicas.to_string()),
        ]);
        if matches!(self, TopicKind::Events | TopicKind::DeadLetters | TopicKind::Contexts) {
            configs.insert("retention.bytes".into(), "-1".into());
        }
        if self == TopicKind::Answers {
            // Segments roll often enough that expired answers are deleted
            // within an eighth of the horizon after it (a segment goes whole).
            let segment = (kept_ms / 8).clamp(60_000, 86_400_000);
            configs.insert("segment.ms".into(), segment.to_string());
            configs.insert("retention.bytes".into(), "-1".into());
        }
        TopicSpec { name, partitions, replication_factor: d.replication_factor, configs }
    }
}

/// Every platform topic: the installation's (replies, the coordinator's,
/// the registry of contexts, an events topic per known category, the
/// coordinator's dead letters) and the default context's.
pub fn platform_topics<'a>(
    topics: &Topics,
    categories: impl IntoIterator<Item = &'a str>,
    layout: Layout,
    d: Durability,
    horizon: Duration,
) -> Vec<TopicSpec> {
    let partitions = layout.partitions;
    let spec = |kind: TopicKind, name: String| kind.spec_for(name, partitions, d, horizon);
    let mut specs = vec![
        spec(TopicKind::Replies, topics.replies()),
        spec(TopicKind::TxTraffic, topics.tx_requests()),
        spec(TopicKind::TxTraffic, topics.tx_votes()),
        spec(TopicKind::TxLog, topics.tx_log()),
        TopicKind::Contexts.spec(topics.contexts(), 1, d),
    ];
    for c in categories {
        specs.push(TopicKind::Events.spec(topics.events(c), partitions, d));
    }
    specs.push(TopicKind::DeadLetters.spec(topics.dlq("coordinator"), partitions, d));
    specs.extend(context_topics(&topics.in_context(esk_wire::topics::DEFAULT_CONTEXT), layout, d, horizon));
    specs
}

/// The topics a context owns (ADR 13), co-partitioned: its requests, state,
/// answers, 2PC prepares and decisions, its writers' dead letters, and its
/// shards.
pub fn context_topics(topics: &Topics, layout: Layout, d: Durability, horizon: Duration) -> Vec<TopicSpec> {
    let Layout { partitions, shards } = layout;
    let spec = |kind: TopicKind, name: String| kind.spec_for(name, partitions, d, horizon);
    vec![
        spec(TopicKind::Commands, topics.commands()),
        spec(TopicKind::State, topics.state()),
        spec(TopicKind::Answers, topics.answers()),
        spec(TopicKind::TxTraffic, topics.tx_prepare()),
        spec(TopicKind::TxTraffic, topics.tx_commit()),
        TopicKind::DeadLetters.spec(topics.writer_dlq(), partitions, d),
        TopicKind::Shards.spec(topics.shards(), shards, d),
    ]
}

/// How an installation is partitioned: the co-partitioned topics'
/// partitions, and the shards they are owned in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub partitions: i32,
    /// 1..=partitions; shard k writes every partition p with p % shards == k.
    pub shards: i32,
}

impl Layout {
    /// `partitions` written in `shards` shards: the default shard count is
    /// capped at the partitions; more shards than partitions is refused.
    pub fn new(partitions: i32, shards: Option<i32>) -> Result<Self, Error> {
        let shards = shards.unwrap_or(DEFAULT_SHARDS.min(partitions));
        if !(1..=partitions).contains(&shards) {
            return Err(Error::Invalid(format!(
                "{shards} shards for {partitions} partitions: give 1 to {partitions} (a shard writes at least \
                 one partition)"
            )));
        }
        Ok(Self { partitions, shards })
    }
}

/// A topic as it exists on the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopicInfo {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    /// Configs that are set on the topic (not broker defaults), plus
    /// `cleanup.policy`, `retention.ms` and `min.insync.replicas` always.
    pub configs: BTreeMap<String, String>,
}

/// Whether `ensure_topics` made a topic or found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Created,
    Existing,
}

/// [`Error::Authorization`] if the brokers refuse to describe one of `names`
/// (asked one by one: a refused one is missing from a listing of all).
fn refused_topics(probe: &BaseProducer<AuthWatch>, names: &[String], timeout: Duration) -> Result<(), Error> {
    for name in names {
        let md = probe.client().fetch_metadata(Some(name), timeout)?;
        if let Some(refused) = crate::error::topic_refused(&md, name) {
            return Err(refused);
        }
    }
    Ok(())
}

/// An admin connection with bounded waits.
pub struct Admin {
    client: Arc<AdminClient<AuthWatch>>,
    /// Asks for metadata, and sees a refused login (see [`fetch_metadata`]).
    probe: Arc<BaseProducer<AuthWatch>>,
    config: KafkaConfig,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").field("bootstrap", &self.config.bootstrap).finish()
    }
}

impl Admin {
    pub fn new(config: &KafkaConfig) -> Result<Self, Error> {
        let client = Arc::new(config.admin().create_with_context(AuthWatch::default())?);
        let probe = Arc::new(config.admin().create_with_context(AuthWatch::default())?);
        Ok(Self { client, probe, config: config.clone() })
    }

    fn options(&self) -> AdminOptions {
        AdminOptions::new().request_timeout(Some(self.config.timeout)).operation_timeout(Some(self.config.timeout))
    }

    /// Cluster metadata; `Unavailable` after the configured timeout, or
    /// `Authentication` as soon as the brokers refused the credentials.
    pub async fn metadata(&self) -> Result<Metadata, Error> {
        let timeout = self.config.timeout;
        // A blocking call: off the async threads, and fine on any runtime flavour.
        let (probe, bootstrap) = (self.probe.clone(), self.config.bootstrap.clone());
        tokio::task::spawn_blocking(move || fetch_metadata(&probe, &bootstrap, None, timeout))
            .await
            .map_err(|e| self.config.unavailable(format!("metadata task failed: {e}")))?
    }

    /// The cluster's id, as its brokers report it.
    pub async fn cluster_id(&self) -> Result<String, Error> {
        // Metadata first: a refused login ends it at once.
        self.metadata().await?;
        let timeout = self.config.timeout;
        let probe = self.probe.clone();
        tokio::task::spawn_blocking(move || probe.client().fetch_cluster_id(timeout))
            .await
            .map_err(|e| self.config.unavailable(format!("cluster id task failed: {e}")))?
            .ok_or_else(|| self.config.unavailable(format!("no cluster id within {timeout:?}")))
    }

    /// The number of brokers the cluster reports.
    pub async fn broker_count(&self) -> Result<usize, Error> {
        Ok(self.metadata().await?.brokers().len())
    }

    /// Describes the named topics that exist (missing ones are left out).
    ///
    /// A topic the principal may not describe is left out of a cluster's
    /// metadata as if it did not exist: a named topic not found is asked
    /// about alone, and a refusal is [`Error::Authorization`].
    pub async fn describe(&self, names: &[String]) -> Result<Vec<TopicInfo>, Error> {
        let metadata = self.metadata().await?;
        let listed = |n: &String| metadata.topics().iter().any(|t| t.name() == n && !t.partitions().is_empty());
        let missing: Vec<String> = names.iter().filter(|n| !listed(n)).cloned().collect();
        if !missing.is_empty() {
            let (probe, timeout) = (self.probe.clone(), self.config.timeout);
            tokio::task::spawn_blocking(move || refused_topics(&probe, &missing, timeout))
                .await
                .map_err(|e| self.config.unavailable(format!("metadata task failed: {e}")))??;
        }
        let mut found = Vec::new();
        for t in metadata.topics() {
            if !names.iter().any(|n| n == t.name()) || t.partitions().is_empty() {
                continue;
            }
            found.push(TopicInfo {
                name: t.name().to_owned(),
                partitions: t.partitions().len() as i32,
                replication_factor: t.partitions()[0].replicas().len() as i32,
                configs: BTreeMap::new(),
            });
        }
        if found.is_empty() {
            return Ok(found);
        }
        let specifiers: Vec<_> = found.iter().map(|t| ResourceSpecifier::Topic(&t.name)).collect();
        let results = self.client.describe_configs(&specifiers, &self.options()).await?;
        for (info, result) in found.iter_mut().zip(results) {
            let resource = result.map_err(|code| match code {
                c if is_authorization_code(Some(c)) => {
                    Error::Authorization(format!("describing the configs of {} (DescribeConfigs): {c}", info.name))
                }
                c => Error::Invalid(format!("describing the configs of {}: {c}", info.name)),
            })?;
            for entry in resource.entries {
                let always = matches!(
                    entry.name.as_str(),
                    "cleanup.policy" | "retention.ms" | "retention.bytes" | "min.insync.replicas" | "max.message.bytes"
                );
                if let (Some(value), true) = (entry.value, always || !entry.is_default) {
                    info.configs.insert(entry.name, value);
                }
            }
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    /// A topic's config value (`None`: the topic does not exist).
    pub async fn topic_config(&self, topic: &str, name: &str) -> Result<Option<String>, Error> {
        let found = self.describe(&[topic.to_owned()]).await?;
        Ok(found.first().and_then(|t| t.configs.get(name).cloned()))
    }

    /// The largest record the topic takes (`max.message.bytes`), or Kafka's default.
    pub async fn max_message_bytes(&self, topic: &str) -> Result<usize, Error> {
        Ok(self
            .topic_config(topic, "max.message.bytes")
            .await?
            .and_then(|v| v.parse().ok())
            .unwrap_or(esk_wire::limits::BROKER_DEFAULT_MAX_MESSAGE_BYTES))
    }

    /// The limits of records written to all of `topics`: from the smallest
    /// `max.message.bytes` among them.
    pub async fn limits(&self, topics: &[String]) -> Result<esk_wire::limits::Limits, Error> {
        let mut smallest = usize::MAX;
        for t in topics {
            smallest = smallest.min(self.max_message_bytes(t).await?);
        }
        Ok(esk_wire::limits::Limits::for_broker(smallest))
    }

    /// The names of all topics starting with `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, Error> {
        let metadata = self.metadata().await?;
        let mut names: Vec<String> =
            metadata.topics().iter().map(|t| t.name().to_owned()).filter(|n| n.starts_with(prefix)).collect();
        names.sort();
        Ok(names)
    }

    /// Creates the topics that do not exist yet, with their configs; existing ones
    /// are reported, never altered.
    pub async fn ensure(&self, specs: &[TopicSpec]) -> Result<Vec<(TopicSpec, Outcome)>, Error> {
        let new_topics: Vec<NewTopic> = specs
            .iter()
            .map(|s| {
                let mut t = NewTopic::new(&s.name, s.partitions, TopicReplication::Fixed(s.replication_factor));
                for (k, v) in &s.configs {
                    t = t.set(k, v);
                }
                t
            })
            .collect();
        let results = self.client.create_topics(&new_topics, &self.options()).await?;
        let mut outcomes = Vec::with_capacity(specs.len());
        for (spec, result) in specs.iter().zip(results) {
            match result {
                Ok(_) => outcomes.push((spec.clone(), Outcome::Created)),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    outcomes.push((spec.clone(), Outcome::Existing));
                }
                Err((name, code)) if is_authorization_code(Some(code)) => {
                    return Err(Error::Authorization(format!(
                        "creating {name} (Create on the topic, an admin's job: `esk topics init` as admin): {code}"
                    )));
                }
                Err((name, code)) if crate::error::is_transient_code(Some(code)) => {
                    return Err(self.config.unavailable(format!("creating {name}: {code}")));
                }
                Err((name, code)) => {
                    return Err(Error::Invalid(format!("creating {name}: {code}")));
                }
            }
        }
        // A created topic's metadata reaches every broker a little later; wait so
        // that the caller can produce to it at once.
        let created: Vec<&str> =
            outcomes.iter().filter(|(_, o)| *o == Outcome::Created).map(|(s, _)| s.name.as_str()).collect();
        self.wait_visible(&created).await?;
        Ok(outcomes)
    }

    async fn wait_visible(&self, names: &[&str]) -> Result<(), Error> {
        if names.is_empty() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        loop {
            let metadata = self.metadata().await?;
            let ready = names.iter().all(|n| {
                metadata.topics().iter().any(|t| {
                    t.name() == *n
                        && t.error().is_none()
                        && !t.partitions().is_empty()
                        && t.partitions().iter().all(|p| p.leader() >= 0)
                })
            });
            if ready {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(self.config.unavailable(format!("topics {names:?} have no leaders yet")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The largest record all of `topics` take (the smallest `max.message.bytes`
/// among them, Kafka's default where it cannot be read), asked without an
/// async runtime in one request: what a client needs once when it connects.
/// The admin client is destroyed off the caller's thread ([`crate::destroy_later`]).
pub fn max_message_bytes_blocking(config: &KafkaConfig, topics: &[String]) -> Result<usize, Error> {
    let client: AdminClient<DefaultClientContext> = config.admin().create()?;
    let options = AdminOptions::new().request_timeout(Some(config.timeout)).operation_timeout(Some(config.timeout));
    let resources: Vec<ResourceSpecifier<'_>> = topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let results = futures::executor::block_on(client.describe_configs(&resources, &options));
    crate::destroy_later(client);
    let default = esk_wire::limits::BROKER_DEFAULT_MAX_MESSAGE_BYTES;
    let smallest = results?
        .into_iter()
        .map(|result| {
            result
                .ok()
                .into_iter()
                .flat_map(|r| r.entries)
                .find(|e| e.name == "max.message.bytes")
                .and_then(|e| e.value)
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        })
        .min();
    Ok(smallest.unwrap_or(default))
}

/// The partition count of an installation: what its existing co-partitioned
/// topics have, or `None` when there are none yet. Disagreeing topics are an error.
pub fn installed_partitions(existing: &[TopicInfo], topics: &Topics) -> Result<Option<i32>, Error> {
    let co_partitioned = [topics.commands(), topics.state(), topics.answers(), topics.tx_prepare(), topics.tx_commit()];
    let mut found: Option<(&str, i32)> = None;
    for t in existing.iter().filter(|t| co_partitioned.contains(&t.name)) {
        match found {
            None => found = Some((&t.name, t.partitions)),
            Some((name, p)) if p != t.partitions => {
                return Err(Error::Invalid(format!(
                    "{name} has {p} partitions but {} has {}: co-partitioned topics must share one count",
                    t.name, t.partitions
                )));
            }
            Some(_) => {}
        }
    }
    Ok(found.map(|(_, p)| p))
}

/// The shards of an installation, from its shards topic (`None`: not
/// there yet).
pub fn installed_shards(existing: &[TopicInfo], topics: &Topics) -> Option<i32> {
    existing.iter().find(|t| t.name == topics.shards()).map(|t| t.partitions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_default_to_one_and_never_outnumber_the_partitions() {
        assert_eq!(Layout::new(12, None).unwrap(), Layout { partitions: 12, shards: DEFAULT_SHARDS });
        assert_eq!(Layout::new(12, Some(12)).unwrap().shards, 12);
        assert_eq!(Layout::new(1, None).unwrap().shards, 1);
        let e = Layout::new(4, Some(5)).unwrap_err().to_string();
        assert!(e.contains("5 shards for 4 partitions"), "{e}");
        assert!(Layout::new(4, Some(0)).is_err());
    }

    #[test]
    fn specs_carry_the_design_configs() {
        let specs = platform_topics(
            &Topics::new("x"),
            ["account"],
            Layout { partitions: 6, shards: 2 },
            Durability::new(3),
            DEFAULT_HORIZON,
        );
        let get = |name: &str| specs.iter().find(|s| s.name == name).unwrap();
        assert_eq!(get("x.state").configs["cleanup.policy"], "compact");
        assert_eq!(get("x.tx.log").configs["cleanup.policy"], "compact");
        assert_eq!(get("x.events.account").configs["retention.ms"], "-1");
        assert_eq!(get("x.events.account").configs["retention.bytes"], "-1");
        assert_eq!(get("x.commands").configs["cleanup.policy"], "delete");
        assert_eq!(get("x.commands").configs["retention.ms"], "604800000");
        assert_eq!(get("x.answers").configs["retention.ms"], "665280000", "the horizon and a tenth");
        assert_eq!(get("x.answers").configs["segment.ms"], "83160000");
        assert_eq!(get("x.shards").partitions, 2);
        assert_eq!(get("x.state").partitions, 6);
        let short = platform_topics(
            &Topics::new("x"),
            [],
            Layout { partitions: 1, shards: 1 },
            Durability::new(1),
            Duration::from_secs(30),
        );
        let answers = short.iter().find(|s| s.name == "x.answers").unwrap();
        assert_eq!(
            (answers.configs["retention.ms"].as_str(), answers.configs["segment.ms"].as_str()),
            ("33000", "60000")
        );
        assert!(specs.iter().all(|s| s.replication_factor == 3));
        assert!(
            specs.iter().filter(|s| !["x.shards", "x.contexts"].contains(&s.name.as_str())).all(|s| s.partitions == 6)
        );
        assert_eq!(get("x.contexts").partitions, 1, "one order of claims");
        assert_eq!(get("x.contexts").configs["retention.ms"], "-1", "no claim is ever deleted");
        assert_eq!(get("x.contexts").configs["cleanup.policy"], "delete", "nor compacted away");
        let payments = context_topics(
            &Topics::new("x").in_context("payments"),
            Layout { partitions: 3, shards: 1 },
            Durability::new(1),
            DEFAULT_HORIZON,
        );
        let names: Vec<&str> = payments.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "x.payments.commands",
                "x.payments.state",
                "x.payments.answers",
                "x.payments.tx.prepare",
                "x.payments.tx.commit",
                "x.payments.dlq.writer",
                "x.payments.shards"
            ]
        );
        assert!(specs.iter().all(|s| s.configs["min.insync.replicas"] == "2"));
        assert_eq!(Durability::for_brokers(1), Durability::new(1));
        assert_eq!(Durability::new(1).min_insync_replicas, 1);
        assert_eq!(Durability::for_brokers(5).replication_factor, 3);
    }

    #[test]
    fn disagreeing_partition_counts_are_refused() {
        let t = Topics::new("x");
        let info =
            |name: String, partitions| TopicInfo { name, partitions, replication_factor: 1, configs: BTreeMap::new() };
        assert_eq!(installed_partitions(&[], &t).unwrap(), None);
        assert_eq!(installed_partitions(&[info(t.commands(), 4)], &t).unwrap(), Some(4));
        let err = installed_partitions(&[info(t.commands(), 4), info(t.state(), 6)], &t).unwrap_err();
        assert!(err.to_string().contains("co-partitioned"), "{err}");
    }
}
