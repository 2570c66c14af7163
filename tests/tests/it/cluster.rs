//! The 3-node cluster of `infra/kafka`: replication 3 stays writable with
//! acks=all while a node is dead, and the node rejoins after a restart.

use std::time::Duration;

use esk_kafka::admin::{Admin, Durability, TopicKind};
use esk_kafka::{GroupMember, KafkaConfig, Sending};
use esk_tests::{Cluster, TestEnv, poll_until};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};

const PARTITIONS: i32 = 3;

async fn produce(producer: &FutureProducer, topic: &str, range: std::ops::Range<u32>) {
    let sends: Vec<_> = range
        .map(|i| {
            let key = format!("k{}", i % 7);
            let value = i.to_string();
            async move {
                producer
                    .send(FutureRecord::to(topic).key(&key).payload(&value), Duration::from_secs(60))
                    .await
                    .map_err(|(e, _)| e)
            }
        })
        .collect();
    for r in futures::future::join_all(sends).await {
        r.expect("an acks=all write failed while two of three replicas were up");
    }
}

fn isr_sizes(bootstrap: &str, topic: &str) -> Option<Vec<usize>> {
    let c: BaseConsumer = KafkaConfig::new(bootstrap, Duration::from_secs(5)).ok()?.metadata("isr").create().ok()?;
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(5)).ok()?;
    Some(md.topics().first()?.partitions().iter().map(|p| p.isr().len()).collect())
}

fn leader_of_partition_0(bootstrap: &str, topic: &str) -> i32 {
    let c: BaseConsumer =
        KafkaConfig::new(bootstrap, Duration::from_secs(10)).unwrap().metadata("leader").create().unwrap();
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    md.topics()[0].partitions().iter().find(|p| p.id() == 0).unwrap().leader()
}

#[tokio::test(flavor = "multi_thread")]
async fn replicated_topic_survives_a_killed_node_and_the_node_rejoins() {
    let pass = std::sync::Arc::new(esk_tests::exclusive());
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap().unwrap();
    let env = TestEnv::with(&cluster.bootstrap(), pass);
    let topic = format!("{}.replicated", env.prefix);
    Admin::new(&env.kafka())
        .unwrap()
        .ensure(&[TopicKind::Events.spec(topic.clone(), PARTITIONS, Durability::new(3))])
        .await
        .unwrap();

    let producer: FutureProducer = KafkaConfig::new(&cluster.bootstrap(), Duration::from_secs(60))
        .unwrap()
        .producer(Sending::Requests { idempotent: true, timeout: Duration::from_secs(60) })
        .create()
        .unwrap();
    produce(&producer, &topic, 0..100).await;

    // Kill the leader of partition 0 so that a new leader must be elected.
    let victim = leader_of_partition_0(&cluster.bootstrap(), &topic) as usize;
    assert!((1..=3).contains(&victim));
    let c2 = cluster.node(victim % 3 + 1);
    tokio::task::block_in_place(|| cluster.kill(victim)).unwrap();
    produce(&producer, &topic, 100..300).await;
    let isr = poll_until(Duration::from_secs(30), "the ISR to shrink to 2", || async {
        isr_sizes(&c2, &topic).filter(|s| s.iter().all(|n| *n == 2))
    })
    .await;
    assert_eq!(isr.len(), PARTITIONS as usize);

    tokio::task::block_in_place(|| cluster.restart(victim)).unwrap();
    poll_until(Duration::from_secs(60), "the restarted node to rejoin every ISR", || async {
        isr_sizes(&c2, &topic).filter(|s| s.iter().all(|n| *n == 3)).map(|_| ())
    })
    .await;
    produce(&producer, &topic, 300..350).await;

    // Every acknowledged record is there exactly once.
    let consumer: BaseConsumer = KafkaConfig::new(&cluster.bootstrap(), Duration::from_secs(10))
        .unwrap()
        .group_member(&GroupMember { group: &env.id("check"), instance: None, session: None, co_partitioned: false })
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut seen = vec![0u32; 350];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut total = 0;
    tokio::task::block_in_place(|| {
        while total < 350 && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let i: usize = std::str::from_utf8(m.payload().unwrap()).unwrap().parse().unwrap();
                seen[i] += 1;
                total += 1;
            }
        }
    });
    assert!(seen.iter().all(|n| *n == 1), "counts per record: {seen:?}");
}
