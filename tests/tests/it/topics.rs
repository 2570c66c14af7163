//! `esk topics init` / `describe`: the platform topics, read back through the admin API.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use esk_tests::TestEnv;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;

/// Every topic under the prefix with (partitions, configs), read without esk's code.
async fn read_back(env: &TestEnv) -> BTreeMap<String, (usize, BTreeMap<String, String>)> {
    let admin: AdminClient<DefaultClientContext> = env.kafka().admin().create().unwrap();
    let md = admin.inner().fetch_metadata(None, Duration::from_secs(10)).unwrap();
    let prefix = format!("{}.", env.prefix);
    let mut out = BTreeMap::new();
    for t in md.topics().iter().filter(|t| t.name().starts_with(&prefix)) {
        let res = admin.describe_configs(&[ResourceSpecifier::Topic(t.name())], &AdminOptions::new()).await.unwrap();
        let configs = res
            .into_iter()
            .next()
            .unwrap()
            .unwrap()
            .entries
            .into_iter()
            .filter_map(|e| e.value.map(|v| (e.name, v)))
            .collect();
        out.insert(t.name().to_owned(), (t.partitions().len(), configs));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn init_creates_every_platform_topic_with_its_configs_idempotently() {
    let env = TestEnv::new();
    let first = env.esk().args(["topics", "init", "--partitions", "3", "--json"]).run().ok().json();
    let p = &env.prefix;
    let expected: Vec<String> = [
        "commands",
        "state",
        "answers",
        "replies",
        "tx.requests",
        "tx.prepare",
        "tx.commit",
        "tx.votes",
        "tx.log",
        "events.account",
        "events.inventory",
        "dlq.writer",
        "dlq.coordinator",
        "shards",
        "contexts",
    ]
    .iter()
    .map(|s| format!("{p}.{s}"))
    .collect();
    let mut created: Vec<String> = serde_json::from_value(first["created"].clone()).unwrap();
    created.sort();
    let mut want = expected.clone();
    want.sort();
    assert_eq!(created, want);

    let topics = read_back(&env).await;
    assert_eq!(topics.keys().cloned().collect::<Vec<_>>(), want);
    for (name, (partitions, configs)) in &topics {
        // One shard by default: one partition of the shards topic; one of the registry of contexts.
        let want = if name.ends_with(".shards") || name.ends_with(".contexts") { 1 } else { 3 };
        assert_eq!(*partitions, want, "{name}");
        let compacted = name.ends_with(".state") || name.ends_with(".tx.log");
        let policy = if compacted { "compact" } else { "delete" };
        assert_eq!(configs["cleanup.policy"], policy, "{name}");
    }
    let events = &topics[&format!("{p}.events.account")].1;
    assert_eq!(events["retention.ms"], "-1");
    assert_eq!(events["retention.bytes"], "-1");
    assert_eq!(topics[&format!("{p}.replies")].1["retention.ms"], "3600000");
    // The idempotency horizon: requests and answers kept 7 days by default.
    for t in ["commands", "tx.requests", "tx.votes"] {
        assert_eq!(topics[&format!("{p}.{t}")].1["retention.ms"], "604800000", "{t}");
    }
    // Answers a tenth longer: a client clock ahead by less cannot outrun them.
    assert_eq!(topics[&format!("{p}.answers")].1["retention.ms"], "665280000");
    assert_eq!(first["idempotency_horizon_ms"], 604_800_000);

    // Idempotent: nothing new, nothing changed, same partition count kept by default.
    let second = env.esk().args(["topics", "init", "--json"]).run().ok().json();
    assert_eq!(second["created"], serde_json::json!([]));
    assert_eq!(second["existing"].as_array().unwrap().len(), expected.len());
    assert_eq!(second["partitions"], 3);
    assert_eq!(second["shards"], 1);
    assert_eq!(read_back(&env).await, topics);

    // The shards are fixed too: another count is refused, as is more
    // shards than partitions on a new installation.
    let run = env.esk().args(["topics", "init", "--shards", "2"]).run().code(4);
    assert!(run.stderr.contains("has 1 shards"), "{}", run.stderr);
    assert_eq!(read_back(&env).await, topics);
    let other = TestEnv::new();
    let run = other.esk().args(["topics", "init", "--partitions", "2", "--shards", "3"]).run().code(4);
    assert!(run.stderr.contains("3 shards for 2 partitions"), "{}", run.stderr);
    let made = other.esk().args(["topics", "init", "--partitions", "4", "--shards", "2", "--json"]).run().ok();
    assert_eq!(made.json()["shards"], 2);

    // A different partition count would break co-partitioning: refused, nothing changed.
    let run = env.esk().args(["topics", "init", "--partitions", "5"]).run().code(4);
    assert!(run.stderr.contains("already has 3 partitions"), "{}", run.stderr);
    assert_eq!(read_back(&env).await, topics);
    // So would another horizon: writers would forget answers sooner than requests go.
    let run = env.esk().args(["topics", "init", "--idempotency-horizon", "1d"]).run().code(4);
    assert!(run.stderr.contains("has 604800s"), "{}", run.stderr);
    env.esk().args(["topics", "init", "--idempotency-horizon", "7d"]).run().ok();
    assert_eq!(read_back(&env).await, topics);

    // A bounded context's own topics, with the installation's partitions.
    let payments = env.esk().args(["topics", "init", "--context", "payments", "--json"]).run().ok().json();
    let mut made: Vec<String> = serde_json::from_value(payments["created"].clone()).unwrap();
    made.sort();
    let mut want: Vec<String> = ["commands", "state", "answers", "tx.prepare", "tx.commit", "dlq.writer", "shards"]
        .iter()
        .map(|s| format!("{p}.payments.{s}"))
        .collect();
    want.sort();
    assert_eq!(made, want);
    assert_eq!(payments["partitions"], 3);
    let other = env.esk().args(["topics", "init", "--context", "inventory", "--partitions", "4"]).run().code(4);
    assert!(other.stderr.contains("installation's partition count"), "{}", other.stderr);
    let bad = env.esk().args(["topics", "init", "--context", "events"]).run().code(4);
    assert!(bad.stderr.contains("context name 'events'"), "{}", bad.stderr);

    // describe shows them all, none missing.
    let described = env.esk().args(["topics", "describe", "--json"]).run().ok().json();
    assert_eq!(described["missing"], serde_json::json!([]));
    assert_eq!(described["topics"].as_array().unwrap().len(), expected.len() + 7, "with the payments context's");
    let human = env.esk().args(["topics", "describe"]).run().ok();
    assert!(human.stdout.contains(&format!("{p}.state")) && human.stdout.contains("cleanup.policy=compact"));
}

#[tokio::test(flavor = "multi_thread")]
async fn describe_names_missing_topics() {
    let env = TestEnv::new();
    let run = env.esk().args(["topics", "describe", "--json"]).run().ok();
    let doc = run.json();
    assert_eq!(doc["topics"], serde_json::json!([]));
    assert!(doc["missing"].as_array().unwrap().len() >= 10);
    let human = env.esk().args(["topics", "describe"]).run().ok();
    assert!(human.stdout.contains("esk topics init"), "{}", human.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_or_malformed_brokers_exit_5_in_bounded_time() {
    let env = TestEnv::new();
    // A closed port on this host, and a name that does not resolve.
    let closed = esk_tests::free_port_pair().unwrap();
    for bootstrap in [format!("127.0.0.1:{closed}"), "no-such-host.invalid:9092".to_owned()] {
        let run = env
            .esk()
            .args(["topics", "init", "--timeout", "3s", "--bootstrap-servers", &bootstrap, "--json"])
            .run()
            .code(5);
        assert!(run.elapsed < Duration::from_secs(10), "took {:?}", run.elapsed);
        assert!(run.stderr.contains("unavailable") && run.stderr.contains(&bootstrap), "{}", run.stderr);
        assert_eq!(run.json()["error"], "unavailable");
    }
    for bad in ["localhost:abc", "localhost", ""] {
        let started = Instant::now();
        let run = env.esk().args(["topics", "init", "--bootstrap-servers", bad]).run().code(5);
        assert!(started.elapsed() < Duration::from_secs(2), "a malformed address needs no network");
        assert!(run.stderr.contains("bootstrap"), "{}", run.stderr);
    }
    // Also through the environment variable.
    let run = env
        .esk()
        .env("KAFKA_BOOTSTRAP_SERVERS", &format!("127.0.0.1:{closed}"))
        .args(["topics", "init", "--timeout", "2s"])
        .run()
        .code(5);
    assert!(run.stderr.contains(&closed.to_string()), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_init_arguments_are_refused_and_write_nothing() {
    let env = TestEnv::new();
    let run = env.esk().args(["topics", "init", "--replication-factor", "7"]).run().code(4);
    assert!(run.stderr.contains("--replication-factor 7 needs 7 brokers"), "{}", run.stderr);
    let run = env.esk().args(["topics", "init", "--prefix", "bad/prefix"]).run().code(4);
    assert!(run.stderr.contains("'bad/prefix'"), "{}", run.stderr);
    for args in [
        vec!["topics", "init", "--partitions", "0"],
        vec!["topics", "init", "--partitions", "many"],
        vec!["topics", "init", "--timeout", "forever"],
        vec!["topics", "frobnicate"],
    ] {
        env.esk().args(&args).run().code(2);
    }
    assert!(read_back(&env).await.is_empty(), "a refused init wrote topics");
}
