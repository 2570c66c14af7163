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

pub async fn init(g: &Global, args: InitArgs) -> Result<(), Failure> {
    let (admin, topics) = connect(g)?;
    let brokers = admin.broker_count().await?;
    let existing = admin.describe(&admin.list(&format!("{}.", topics.prefix())).await?).await?;
    let installed = admin::installed_partitions(&existing, &topics)?;
    let partitions = match (args.partitions, installed) {
        (Some(asked), Some(have)) if asked != have => {
            return Err(Failure::invalid(format!(
                "--partitions {asked}: this installation ('{}') already has {have} partitions; \
                 co-partitioned topics must share one count",
                topics.prefix()
            )));
        }
        (asked, have) => asked.or(have).unwrap_or(DEFAULT_PARTITIONS),
    };
    let layout = match (args.shards, admin::installed_shards(&existing, &topics)) {
        (Some(asked), Some(have)) if asked != have => {
            return Err(Failure::invalid(format!(
                "--shards {asked}: this installation ('{}') has {have} shards; changing them needs \
                 every writer and coordinator stopped, then {} recreated with {asked} partitions",
                topics.prefix(),
                topics.shards()
            )));
        }
        (asked, have) => Layout::new(partitions, asked.or(have)).map_err(|e| Failure::invalid(e.to_string()))?,
    };
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
    let specs = admin::platform_topics(&topics, schemas.categories(), layout, durability, horizon);
    let outcomes = admin.ensure(&specs).await?;

    if g.json {
        let list = |o: Outcome| -> Vec<&str> {
            outcomes.iter().filter(|(_, x)| *x == o).map(|(s, _)| s.name.as_str()).collect()
        };
        let doc = json!({
            "prefix": topics.prefix(),
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
    let expected = admin::platform_topics(
        &topics,
        g.schemas()?.categories(),
        Layout { partitions: 1, shards: 1 },
        Durability::new(1),
        admin::DEFAULT_HORIZON,
    );
    let missing: Vec<&str> =
        expected.iter().map(|s| s.name.as_str()).filter(|n| !found.iter().any(|t| t.name == *n)).collect();
    if g.json {
        println!("{}", json!({"prefix": topics.prefix(), "topics": found, "missing": missing}));
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
        println!("{m:width$}  missing: run `esk topics init`");
    }
    Ok(())
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
