//! The user's Kafka client properties (`--kafka-config FILE`, `ESK_KAFKA_<PROPERTY>`):
//! they reach every client, and those a guarantee rests on are refused at start.

use std::time::Duration;

use esk_tests::{Service, TestEnv, wait_serving};
use rdkafka::consumer::{BaseConsumer, Consumer};

#[tokio::test(flavor = "multi_thread")]
async fn a_property_that_would_break_a_guarantee_is_refused_at_start_naming_it() {
    let env = TestEnv::new();
    env.init_topics(2);
    for (service, var, property) in [
        ("writer", "ESK_KAFKA_ISOLATION_LEVEL", "isolation.level"),
        ("coordinator", "ESK_KAFKA_ENABLE_IDEMPOTENCE", "enable.idempotence"),
        ("projector", "ESK_KAFKA_ENABLE_AUTO_COMMIT", "enable.auto.commit"),
        ("replica", "ESK_KAFKA_PARTITIONER", "partitioner"),
    ] {
        let mut s = Service::start(&env, service, &[(var, "x")]);
        let code = tokio::task::block_in_place(|| s.exit_code(Duration::from_secs(30)));
        assert_eq!(code, Some(1), "esk-{service} with {var} did not stop: {}", s.log_tail());
        let log = s.log_tail();
        assert!(log.contains(property) && log.contains(var), "esk-{service}: {log}");
    }
    // The CLI: exit 4 (invalid input), nothing sent, the property and its file line named.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("client.properties");
    std::fs::write(&file, "# mine\nclient.id=mine\ntransactional.id=stolen\n").unwrap();
    let run = env.esk().args(["--kafka-config", file.to_str().unwrap(), "topics", "describe"]).run().code(4);
    assert!(run.stderr.contains("transactional.id") && run.stderr.contains("client.properties:3"), "{run:#?}");
    let run = env.esk().env("ESK_KAFKA_NO_SUCH_PROPERTY", "1").args(["topics", "describe"]).run().code(4);
    assert!(run.stderr.contains("no.such.property"), "{run:#?}");
    let run = env
        .esk()
        .env("ESK_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
        .env("ESK_KAFKA_SASL_USERNAME", "me")
        .env("ESK_KAFKA_SASL_PASSWORD", "hunter2")
        .env("ESK_KAFKA_SASL_MECHANISM", "NOPE");
    let run = run.args(["topics", "describe"]).run().code(4);
    assert!(run.stderr.contains("sasl.mechanism") && !run.stderr.contains("hunter2"), "{run:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn properties_from_a_file_reach_the_services_clients() {
    let env = TestEnv::new();
    env.init_topics(2);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("client.properties");
    let client_id = format!("{}-props", env.prefix);
    std::fs::write(&file, format!("client.id={client_id}\ncompression.type=zstd\n")).unwrap();
    let w = Service::start(&env, "writer", &[("ESK_KAFKA_CONFIG", file.to_str().unwrap())]);
    wait_serving(&[&w], 2, Duration::from_secs(60)).await;
    env.esk().args(["--kafka-config", file.to_str().unwrap(), "append", "note-1", "Written", "{}"]).run().ok();
    // The writer's group members carry the client.id of the file.
    let consumer: BaseConsumer = env.kafka().metadata(&env.id("groups")).create().unwrap();
    let group = format!("{}-writer", env.prefix);
    let groups = tokio::task::block_in_place(|| consumer.fetch_group_list(Some(&group), Duration::from_secs(10)))
        .expect("the group list");
    let members: Vec<String> =
        groups.groups().iter().flat_map(|g| g.members().iter().map(|m| m.client_id().to_owned())).collect();
    assert!(!members.is_empty() && members.iter().all(|c| *c == client_id), "{members:?}");
}
