//! `esk topics init` and `esk topics describe`.

use esk_kafka::KafkaConfig;
use esk_kafka::admin::{self, Admin, DEFAULT_PARTITIONS, Durability, Layout, Outcome, TopicInfo};
use esk_wire::Topics;
use serde_json::json;

use crate::cli::{Global, InitArgs};
use crate::exit::Failure;

pub fn connect(g: &Global) -> Result<(Admin, Topics), Failure> {
    Topics::validate_prefix(&g.prefix).map_err(Failure::invalid)?;
    let config = KafkaConfig::load(&g.bootstrap_servers, g.timeout, g.kafka_config.as_deref())?;
    Ok((Admin::new(&config)?, Topics::new(&g.prefix)))
}

/// The layout of the co-partitioned topics of `topics`' context: what it
/// has, else what was asked, else `fallback`'s partitions (or the default).
fn layout_of(
    args: &InitArgs,
    existing: &[TopicInfo],
    topics: &Topics,
    fallback: Option<i32>,
) -> Result<Layout, Failure> {
    let what = match topics.context() {
        esk_wire::topics::DEFAULT_CONTEXT => format!("this installation ('{}')", topics.prefix()),
        c => format!("context '{c}' of '{}'", topics.prefix()),
    };
    let installed = admin::installed_partitions(existing, topics)?;
    let partitions = match (args.partitions, installed) {
        (Some(asked), Some(have)) if asked != have => {
            return Err(Failure::invalid(format!(
                "--partitions {asked}: {what} already has {have} partitions; co-partitioned topics must share one count"
            )));
        }
        (asked, have) => asked.or(have).or(fallback).unwrap_or(DEFAULT_PARTITIONS),
    };
    match (args.shards, admin::installed_shards(existing, topics)) {
        (Some(asked), Some(have)) if asked != have => Err(Failure::invalid(format!(
            "--shards {asked}: {what} has {have} shards; changing them needs every writer and coordinator stopped, \
             then {} recreated with {asked} partitions",
            topics.shards()
        ))),
        (asked, have) => Layout::new(partitions, asked.or(have)).map_err(|e| Failure::invalid(e.to_string())),
    }
}

pub async fn init(g: &Global, args: InitArgs) -> Result<(), Failure> {
    let (admin, topics) = connect(g)?;
    if let Some(c) = &args.context {
        esk_wire::topics::check_context_name(c).map_err(|e| Failure::invalid(format!("--context: {e}")))?;
    }
    let brokers = admin.broker_count().await?;
    let existing = admin.describe(&admin.list(&format!("{}.", topics.prefix())).await?).await?;
    // The installation's own layout: given only when there is no context to
    // give it to.
    let installed = admin::installed_partitions(&existing, &topics)?;
    let layout = match &args.context {
        None => layout_of(&args, &existing, &topics, None)?,
        Some(_) => {
            let own = InitArgs { context: None, partitions: None, shards: None, ..args.clone() };
            layout_of(&own, &existing, &topics, installed.or(args.partitions))?
        }
    };
    let context = match &args.context {
        Some(c) => {
            let t = topics.in_context(c);
            let l = layout_of(&args, &existing, &t, Some(layout.partitions))?;
            if l.partitions != layout.partitions {
                // A category's events topic has its context's partition
                // count, and events topics are the installation's.
                return Err(Failure::invalid(format!(
                    "context '{c}' would have {} partitions and the installation ('{}') has {}: every context has \
                     the installation's partition count (events topics are shared; a context scales by its \
                     --shards and writer instances)",
                    l.partitions,
                    topics.prefix(),
                    layout.partitions
                )));
            }
            Some((l, t))
        }
        None => None,
    };
    let partitions = context.as_ref().map_or(layout.partitions, |(l, _)| l.partitions);
    let durability = match args.replication_factor {
        Some(r) if r as usize > brokers => {
            return Err(Failure::invalid(format!(
                "--replication-factor {r} needs {r} brokers; the cluster at {} has {brokers}",
                g.bootstrap_servers
            )));
        }
        Some(r) => Durability::new(r),
        None => Durability::for_brokers(brokers),
    };
    let installed_horizon = [topics.commands(), topics.tx_requests()]
        .iter()
        .find_map(|name| existing.iter().find(|t| t.name == *name))
        .and_then(|t| t.configs.get("retention.ms")?.parse::<u64>().ok())
        .map(std::time::Duration::from_millis);
    let horizon = match (args.idempotency_horizon, installed_horizon) {
        (Some(asked), Some(have)) if asked != have => {
            return Err(Failure::invalid(format!(
                "--idempotency-horizon {}s: this installation ('{}') has {}s; to change it, alter retention.ms of its \
                 requests and answers topics and restart the writers and coordinators",
                asked.as_secs(),
                topics.prefix(),
                have.as_secs()
            )));
        }
        (asked, have) => asked.or(have).unwrap_or(admin::DEFAULT_HORIZON),
    };
    let schemas = g.schemas()?;
    let mut specs = admin::platform_topics(&topics, schemas.categories(), layout, durability, horizon);
    if let Some((l, t)) = &context {
        specs.extend(admin::context_topics(t, *l, durability, horizon));
    }
    let outcomes = admin.ensure(&specs).await?;
    let layout = context.as_ref().map_or(layout, |(l, _)| *l);

    if g.json {
        let list = |o: Outcome| -> Vec<&str> {
            outcomes.iter().filter(|(_, x)| *x == o).map(|(s, _)| s.name.as_str()).collect()
        };
        let doc = json!({
            "prefix": topics.prefix(),
            "context": args.context.as_deref().unwrap_or(esk_wire::topics::DEFAULT_CONTEXT),
            "partitions": partitions,
            "shards": layout.shards,
            "replication_factor": durability.replication_factor,
            "idempotency_horizon_ms": horizon.as_millis() as u64,
            "created": list(Outcome::Created),
            "existing": list(Outcome::Existing),
            "topics": outcomes.iter().map(|(s, o)| json!({
                "name": s.name, "status": o, "partitions": s.partitions,
                "replication_factor": s.replication_factor, "configs": s.configs,
            })).collect::<Vec<_>>(),
        });
        println!("{doc}");
    } else {
        for (spec, outcome) in &outcomes {
            let word = match outcome {
                Outcome::Created => "created",
                Outcome::Existing => "exists ",
            };
            println!("{word} {}", spec.name);
        }
        let created = outcomes.iter().filter(|(_, o)| *o == Outcome::Created).count();
        println!(
            "{created} created, {} already there; {partitions} partitions in {} shard{}, replication {}, \
             idempotency horizon {}",
            outcomes.len() - created,
            layout.shards,
            if layout.shards == 1 { "" } else { "s" },
            durability.replication_factor,
            show_duration(horizon)
        );
    }
    Ok(())
}

pub async fn describe(g: &Global) -> Result<(), Failure> {
    let (admin, topics) = connect(g)?;
    let names = admin.list(&format!("{}.", topics.prefix())).await?;
    let found: Vec<TopicInfo> = admin.describe(&names).await?;
    let config = KafkaConfig::load(&g.bootstrap_servers, g.timeout, g.kafka_config.as_deref())?;
    let registry = {
        let topics = topics.clone();
        tokio::task::spawn_blocking(move || esk_kafka::contexts::read(&config, &topics))
            .await
            .map_err(|e| Failure::unavailable(e.to_string()))??
    };
    let one = Layout { partitions: 1, shards: 1 };
    let mut expected =
        admin::platform_topics(&topics, g.schemas()?.categories(), one, Durability::new(1), admin::DEFAULT_HORIZON);
    let claimed = registry.contexts();
    for context in claimed.keys().filter(|c| **c != esk_wire::topics::DEFAULT_CONTEXT) {
        expected.extend(admin::context_topics(
            &topics.in_context(context),
            one,
            Durability::new(1),
            admin::DEFAULT_HORIZON,
        ));
    }
    let missing: Vec<&str> =
        expected.iter().map(|s| s.name.as_str()).filter(|n| !found.iter().any(|t| t.name == *n)).collect();
    let init = |name: &str| -> String {
        match expected.iter().find(|s| s.name == name).and_then(|s| context_of_topic(&topics, &s.name, &claimed)) {
            Some(c) => format!("esk topics init --context {c}"),
            None => "esk topics init".into(),
        }
    };
    if g.json {
        let contexts: Vec<_> = claimed
            .iter()
            .map(|(c, categories)| {
                let t = topics.in_context(c);
                json!({"context": c, "categories": categories, "commands": t.commands(), "writer_group": group_of(&t)})
            })
            .collect();
        println!("{}", json!({"prefix": topics.prefix(), "topics": found, "missing": missing, "contexts": contexts}));
        return Ok(());
    }
    if found.is_empty() {
        println!("no topics under prefix '{}': run `esk topics init`", topics.prefix());
        return Ok(());
    }
    let width = found.iter().map(|t| t.name.len()).max().unwrap_or(0);
    println!("{:width$}  partitions  replicas  configs", "topic");
    for t in &found {
        let configs: Vec<String> = t.configs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("{:width$}  {:>10}  {:>8}  {}", t.name, t.partitions, t.replication_factor, configs.join(" "));
    }
    for m in &missing {
        println!("{m:width$}  missing: run `{}`", init(m));
    }
    println!();
    if claimed.is_empty() {
        println!("contexts: none claimed a category yet (every category is the default context's)");
    } else {
        println!("contexts (the categories each claimed; any other category is the default context's):");
        for (context, categories) in &claimed {
            let t = topics.in_context(context);
            println!(
                "  {context}: {}  (requests on {}, writers in group {})",
                categories.join(", "),
                t.commands(),
                group_of(&t)
            );
        }
    }
    Ok(())
}

/// The writer group of a context.
fn group_of(t: &Topics) -> String {
    format!("{}-writer", t.scope())
}

/// The context a context-owned topic name belongs to, among the claimed ones.
fn context_of_topic<'a>(
    topics: &Topics,
    name: &str,
    claimed: &std::collections::BTreeMap<&'a str, Vec<&'a str>>,
) -> Option<&'a str> {
    claimed
        .keys()
        .copied()
        .filter(|c| *c != esk_wire::topics::DEFAULT_CONTEXT)
        .find(|c| name.starts_with(&format!("{}.{c}.", topics.prefix())))
}

/// `7d`, `24h`, `90s`: the largest whole unit.
fn show_duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s > 0 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s > 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s > 0 => format!("{s}s"),
        _ => format!("{}ms", d.as_millis()),
    }
}
