//! The broker itself: transactions work on it (the replication-factor trap of a
//! single node shows up here as a timeout in `init_transactions`).

use std::time::Duration;

use esk_kafka::admin::{Admin, Durability, TopicKind};
use esk_tests::TestEnv;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::DefaultProducerContext;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};

#[tokio::test(flavor = "multi_thread")]
async fn transactional_produce_and_read_committed_consume() {
    let env = TestEnv::new();
    let topic = format!("{}.txcheck", env.prefix);
    let admin = Admin::new(&env.kafka()).unwrap();
    admin.ensure(&[TopicKind::Events.spec(topic.clone(), 1, Durability::new(1))]).await.unwrap();

    let producer: ThreadedProducer<DefaultProducerContext> =
        env.kafka().transactional_producer(&env.id("tx"), Duration::from_secs(10)).create().unwrap();
    let timeout = Duration::from_secs(30);
    tokio::task::block_in_place(|| {
        producer.init_transactions(timeout).expect("init_transactions: is the transaction log at replication 1?");
        for (value, commit) in [("one", true), ("aborted", false), ("two", true)] {
            producer.begin_transaction().unwrap();
            producer.send(BaseRecord::to(&topic).key("k").payload(value)).map_err(|(e, _)| e).unwrap();
            if commit {
                producer.commit_transaction(timeout).unwrap();
            } else {
                producer.flush(timeout).unwrap();
                producer.abort_transaction(timeout).unwrap();
            }
        }
    });

    let read = |isolation: &str| -> Vec<String> {
        let kafka = env.kafka();
        let group = env.id(isolation);
        let config = match isolation {
            "read_committed" => kafka.committed_reader(&group, Duration::from_millis(50)),
            _ => kafka.uncommitted_reader(&group),
        };
        let consumer: BaseConsumer = config.create().unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning).unwrap();
        consumer.assign(&tpl).unwrap();
        let (_, high) = esk_kafka::watermarks(consumer.client(), &topic, 0, timeout).unwrap();
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + timeout;
        // Offsets are not contiguous (transaction markers take some): caught up
        // means position >= high watermark.
        loop {
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                let m = m.unwrap();
                seen.push(String::from_utf8(m.payload().unwrap().to_vec()).unwrap());
            }
            let pos = consumer.position().unwrap();
            let at = pos.find_partition(&topic, 0).and_then(|p| p.offset().to_raw()).unwrap_or(0);
            if at >= high {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never caught up to {high}");
        }
        seen
    };
    let committed = tokio::task::block_in_place(|| read("read_committed"));
    assert_eq!(committed, ["one", "two"]);
    let uncommitted = tokio::task::block_in_place(|| read("read_uncommitted"));
    assert_eq!(uncommitted, ["one", "aborted", "two"]);
}
