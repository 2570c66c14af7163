//! `esk dlq list CONSUMER` and `esk dlq replay CONSUMER`.

use std::time::Duration;

use esk_kafka::record::{
    DLQ_OFFSET, DLQ_PARTITION, DLQ_REASON, DLQ_TOPIC, DLQ_TRUNCATED, HeaderList, headers_of, to_headers,
};
use esk_wire::Topics;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::json;

use crate::cli::Global;
use crate::events::kafka;
use crate::exit::{Failure, Kind};
use crate::http::{call, message};

struct Parked {
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Parked {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

fn check_consumer(name: &str, context: Option<&str>) -> Result<(), Failure> {
    if !esk_wire::stream::is_valid_category(name) {
        return Err(Failure::invalid(format!(
            "'{name}' is not a consumer name (writer, or a projection such as accounts)"
        )));
    }
    match context {
        Some(_) if name != "writer" => {
            Err(Failure::invalid(format!("--context is the writers' context: give it with 'writer', not '{name}'")))
        }
        Some(c) if c != esk_wire::topics::DEFAULT_CONTEXT => {
            esk_wire::topics::check_context_name(c).map_err(|e| Failure::invalid(format!("--context: {e}")))
        }
        _ => Ok(()),
    }
}

/// The dead-letter topic of a consumer (a context's writers': that
/// context's), and the name its replay group and transactional id take.
fn parked_topic(topics: &Topics, consumer: &str, context: Option<&str>) -> (String, String) {
    match context.filter(|c| *c != esk_wire::topics::DEFAULT_CONTEXT) {
        Some(c) if consumer == "writer" => (topics.in_context(c).writer_dlq(), format!("{c}-writer")),
        _ => (topics.dlq(consumer), consumer.to_owned()),
    }
}

/// Every record of `<prefix>.dlq.<consumer>`, read to its end.
fn read_parked(g: &Global, consumer: &str, context: Option<&str>) -> Result<(String, Vec<Parked>), Failure> {
    let (config, topics): (_, Topics) = kafka(g)?;
    let (topic, _) = parked_topic(&topics, consumer, context);
    let mut out = Vec::new();
    esk_kafka::read::read_topic(
        &config,
        "esk-dlq",
        &topic,
        |_| None,
        g.timeout * 6,
        |m| {
            out.push(Parked {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers: headers_of(m),
            });
            Ok::<(), Failure>(())
        },
    )
    .map_err(|e| match e {
        esk_kafka::read::ReadError::Kafka(e) => Failure::from(e),
        esk_kafka::read::ReadError::Each(f) => f,
    })?;
    out.sort_by_key(|p| (p.partition, p.offset));
    Ok((topic, out))
}

pub async fn list(g: &Global, consumer: &str, context: Option<&str>) -> Result<(), Failure> {
    check_consumer(consumer, context)?;
    let g2 = g.clone();
    let (name, context) = (consumer.to_owned(), context.map(str::to_owned));
    let (topic, parked) = tokio::task::spawn_blocking(move || read_parked(&g2, &name, context.as_deref()))
        .await
        .map_err(|e| Failure::new(Kind::Internal, e))??;
    for p in &parked {
        let text = |b: &Option<Vec<u8>>| b.as_deref().map(|v| String::from_utf8_lossy(v).into_owned());
        let doc = json!({
            "dlq_partition": p.partition, "dlq_offset": p.offset,
            "reason": p.header(DLQ_REASON),
            "topic": p.header(DLQ_TOPIC),
            "partition": p.header(DLQ_PARTITION).and_then(|v| v.parse::<i32>().ok()),
            "offset": p.header(DLQ_OFFSET).and_then(|v| v.parse::<i64>().ok()),
            "key": text(&p.key),
            "value": text(&p.value),
            "truncated_from_bytes": p.header(DLQ_TRUNCATED).and_then(|v| v.parse::<u64>().ok()),
        });
        if g.json {
            println!("{doc}");
        } else {
            let value: String = text(&p.value).unwrap_or_default().chars().take(120).collect();
            println!(
                "{}/{}@{}  {}\n    {value}",
                doc["topic"].as_str().unwrap_or("?"),
                doc["partition"],
                doc["offset"],
                doc["reason"].as_str().unwrap_or("(no reason)")
            );
        }
    }
    if !g.json {
        eprintln!("esk: {} parked in {topic}", parked.len());
    }
    Ok(())
}

pub async fn replay(g: &Global, consumer: &str, context: Option<&str>) -> Result<(), Failure> {
    check_consumer(consumer, context)?;
    if consumer == "writer" || consumer == "coordinator" {
        return replay_service(g, consumer, context).await;
    }
    let (code, body) =
        call(&g.projector_url, "POST", &format!("/projections/{consumer}/replay"), g.timeout * 6).await?;
    match code {
        200 => {}
        401 => return Err(Failure::invalid(crate::http::unauthorized(&body))),
        404 => return Err(Failure::invalid(message(&body))),
        _ => {
            return Err(Failure::unavailable(format!("replay {consumer}: {code} {}", message(&body))));
        }
    }
    if g.json {
        println!("{body}");
    } else {
        println!(
            "{consumer}: {} replayed, {} replayed before, {} applied in order by this model version, {} still failing",
            body["replayed"],
            body["already_replayed"],
            body["not_parked_here"],
            body["still_failing"].as_array().map_or(0, Vec::len)
        );
        for f in body["still_failing"].as_array().into_iter().flatten() {
            eprintln!("  still failing: {}", f.as_str().unwrap_or_default());
        }
    }
    Ok(())
}

/// A service's parked records (the writer's, the coordinator's) are
/// requests: each is sent to its topic again, **once**. The records sent and
/// the dead-letter offsets read are one Kafka transaction (a consumer group
/// per consumer keeps the offsets, a transactional id fences a concurrent
/// replay), so a replay sends only what was parked since the last one, and a
/// crash mid-replay sends nothing twice. A cut copy (`esk_dlq_truncated`)
/// cannot be sent again: it is reported and passed. (It reads with a consumer
/// of its own rather than `esk_kafka::read::read_topic`: the offsets it
/// commits in each transaction are that consumer group's.)
async fn replay_service(g: &Global, consumer: &str, context: Option<&str>) -> Result<(), Failure> {
    let g2 = g.clone();
    let (name, context) = (consumer.to_owned(), context.map(str::to_owned));
    let report = tokio::task::spawn_blocking(move || replay_once(&g2, &name, context.as_deref()))
        .await
        .map_err(|e| Failure::new(Kind::Internal, e))??;
    if g.json {
        println!(
            "{}",
            json!({"consumer": consumer, "resent": report.resent, "truncated": report.truncated,
                   "without_origin": report.without_origin})
        );
    } else {
        println!(
            "{consumer}: {} parked record(s) sent again, {} cut copies passed, {} without an origin passed",
            report.resent, report.truncated, report.without_origin
        );
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Resent {
    resent: u64,
    truncated: u64,
    without_origin: u64,
}

fn replay_once(g: &Global, consumer: &str, context: Option<&str>) -> Result<Resent, Failure> {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let (config, topics): (_, Topics) = kafka(g)?;
    let (topic, name) = parked_topic(&topics, consumer, context);
    let group = format!("{}-dlq-replay-{name}", topics.prefix());
    let c: BaseConsumer =
        config.committed_reader(&group, Duration::from_millis(50)).create().map_err(esk_kafka::Error::from)?;
    let md = c
        .fetch_metadata(Some(&topic), g.timeout)
        .map_err(|e| Failure::unavailable(format!("Kafka at {}: {e}", config.bootstrap)))?;
    let Some(t) = md.topics().first().filter(|t| t.error().is_none() && !t.partitions().is_empty()) else {
        return Ok(Resent::default());
    };
    let mut wanted = TopicPartitionList::new();
    for p in t.partitions() {
        wanted.add_partition(&topic, p.id());
    }
    let committed = c.committed_offsets(wanted, g.timeout).map_err(esk_kafka::Error::from)?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = Vec::new();
    for p in t.partitions() {
        let (_, high) = esk_kafka::watermarks(c.client(), &topic, p.id(), g.timeout)
            .map_err(|e| Failure::unavailable(e.to_string()))?;
        let from = committed.find_partition(&topic, p.id()).and_then(|e| e.offset().to_raw()).filter(|o| *o >= 0);
        if high > from.unwrap_or(0) {
            ends.push((p.id(), high));
            let offset = from.map_or(Offset::Beginning, Offset::Offset);
            tpl.add_partition_offset(&topic, p.id(), offset).map_err(esk_kafka::Error::from)?;
        }
    }
    if ends.is_empty() {
        return Ok(Resent::default());
    }
    c.assign(&tpl).map_err(esk_kafka::Error::from)?;
    // The transaction spans the whole replay (bounded below by six timeouts).
    let producer: ThreadedProducer<DefaultProducerContext> = config
        .transactional_producer(&group, (g.timeout * 6).max(Duration::from_secs(60)))
        .create()
        .map_err(esk_kafka::Error::from)?;
    let kafka_failure = |e: rdkafka::error::KafkaError| Failure::unavailable(format!("replaying {topic}: {e}"));
    producer.init_transactions(g.timeout).map_err(kafka_failure)?;
    let mut report = Resent::default();
    let deadline = std::time::Instant::now() + g.timeout * 6;
    let mut consumed: std::collections::BTreeMap<i32, i64> = std::collections::BTreeMap::new();
    let mut in_txn = 0usize;
    producer.begin_transaction().map_err(kafka_failure)?;
    loop {
        let pos = c.position().map_err(esk_kafka::Error::from)?;
        let done = ends.iter().all(|(p, high)| {
            pos.find_partition(&topic, *p).and_then(|e| e.offset().to_raw()).is_some_and(|o| o >= *high)
        });
        if done || in_txn >= 500 {
            if !consumed.is_empty() {
                let mut offsets = TopicPartitionList::new();
                for (p, o) in &consumed {
                    offsets.add_partition_offset(&topic, *p, Offset::Offset(o + 1)).map_err(esk_kafka::Error::from)?;
                }
                let meta = c.group_metadata().ok_or_else(|| Failure::unavailable("no consumer group metadata"))?;
                producer.send_offsets_to_transaction(&offsets, &meta, g.timeout).map_err(kafka_failure)?;
            }
            producer.commit_transaction(g.timeout).map_err(kafka_failure)?;
            if done {
                break;
            }
            in_txn = 0;
            producer.begin_transaction().map_err(kafka_failure)?;
        }
        if std::time::Instant::now() > deadline {
            let _ = producer.abort_transaction(g.timeout);
            return Err(Failure::unavailable(format!("reading {topic} did not reach its end")));
        }
        let Some(Ok(m)) = c.poll(Duration::from_millis(20)) else { continue };
        let p = Parked {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers: headers_of(&m),
        };
        consumed.insert(p.partition, p.offset);
        in_txn += 1;
        if p.header(DLQ_TRUNCATED).is_some() {
            report.truncated += 1;
            continue;
        }
        let Some(origin) = p.header(DLQ_TOPIC) else {
            report.without_origin += 1;
            continue;
        };
        let original: HeaderList = p.headers.iter().filter(|(k, _)| !k.starts_with("esk_dlq_")).cloned().collect();
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&origin).headers(to_headers(&original));
        if let Some(partition) = p.header(DLQ_PARTITION).and_then(|v| v.parse().ok()) {
            record = record.partition(partition);
        }
        if let Some(k) = &p.key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = &p.value {
            record = record.payload(v.as_slice());
        }
        producer.send(record).map_err(|(e, _)| kafka_failure(e))?;
        report.resent += 1;
    }
    Ok(report)
}
