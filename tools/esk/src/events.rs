//! `esk append`, `esk command`, `esk read` and `esk tail`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use esk_client::{Client, ReadEvent, decode, read_stream};
use esk_kafka::KafkaConfig;
use esk_kafka::admin::Admin;
use esk_wire::protocol::{Appended, CommandData, ExpectedVersion, NewEvent};
use esk_wire::stream::is_valid_category;
use esk_wire::{StreamName, Topics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};

use crate::cli::{AppendArgs, CommandArgs, Global, ReadArgs, TailArgs};
use crate::exit::Failure;

pub fn kafka(g: &Global) -> Result<(KafkaConfig, Topics), Failure> {
    Topics::validate_prefix(&g.prefix).map_err(Failure::invalid)?;
    Ok((KafkaConfig::load(&g.bootstrap_servers, g.timeout, g.kafka_config.as_deref())?, Topics::new(&g.prefix)))
}

pub async fn connect(g: &Global, pipelined: bool) -> Result<Client, Failure> {
    let (config, topics) = kafka(g)?;
    let open = if pipelined { Client::connect_pipelined } else { Client::connect };
    Ok(tokio::task::spawn_blocking(move || open(config, topics))
        .await
        .map_err(|e| Failure::new(crate::exit::Kind::Internal, e))??)
}

/// Parses a JSON argument; `@path` reads it from a file (large data does not fit
/// in one command-line argument).
pub fn parse_json(what: &str, text: &str) -> Result<Value, Failure> {
    let (source, content) = match text.strip_prefix('@') {
        Some(path) => (
            format!("{what} file {path}"),
            std::fs::read_to_string(path).map_err(|e| Failure::invalid(format!("{what}: cannot read {path}: {e}")))?,
        ),
        None => (what.to_owned(), text.to_owned()),
    };
    serde_json::from_str(&content).map_err(|e| {
        let shown: String = content.chars().take(200).collect();
        Failure::invalid(format!("{source} is not valid JSON ({e}): {shown}"))
    })
}

pub fn parse_stream(text: &str) -> Result<StreamName, Failure> {
    StreamName::parse(text).map_err(Failure::invalid)
}

pub fn parse_expected(text: &str) -> Result<ExpectedVersion, Failure> {
    text.parse().map_err(|e: String| Failure::invalid(format!("--expected-version: {e}")))
}

fn print_appended(g: &Global, a: &Appended) {
    if g.json {
        println!(
            "{}",
            json!({"stream": a.stream, "first_version": a.first_version, "last_version": a.last_version, "position": a.position})
        );
    } else if a.first_version > a.last_version {
        println!("{} unchanged at version {} (position {})", a.stream, a.last_version, a.position);
    } else if a.first_version == a.last_version {
        println!("{} version {} (position {})", a.stream, a.last_version, a.position);
    } else {
        println!("{} versions {}..{} (position {})", a.stream, a.first_version, a.last_version, a.position);
    }
}

pub async fn append(g: &Global, args: AppendArgs) -> Result<(), Failure> {
    let stream = parse_stream(&args.stream)?;
    let data = parse_json("DATA_JSON", &args.data)?;
    let expected = parse_expected(&args.expected_version)?;
    if let Some(id) = &args.event_id {
        uuid::Uuid::parse_str(id).map_err(|e| Failure::invalid(format!("--event-id '{id}' is not a UUID: {e}")))?;
    }
    let client = connect(g, false).await?;
    let event = NewEvent { id: args.event_id, event_type: args.event_type, data };
    let a = client.append(stream.as_str(), expected, vec![event], args.request_id).await?;
    print_appended(g, &a);
    Ok(())
}

pub async fn command(g: &Global, args: CommandArgs) -> Result<(), Failure> {
    let stream = parse_stream(&args.stream)?;
    let data = parse_json("DATA_JSON", &args.data)?;
    let expected = parse_expected(&args.expected_version)?;
    let client = connect(g, false).await?;
    let command = CommandData { command_type: args.command, data };
    let a = client.command(stream.as_str(), expected, command, args.request_id).await?;
    print_appended(g, &a);
    Ok(())
}

pub fn event_json(e: &ReadEvent) -> Value {
    json!({
        "stream": e.event.stream.as_str(),
        "version": e.event.version,
        "type": e.event.event_type,
        "data": e.event.data,
        "id": e.event.id,
        "time": esk_wire::envelope::format_time(&e.event.time),
        "position": e.position.to_string(),
    })
}

fn print_event(g: &Global, e: &ReadEvent, with_stream: bool) {
    if g.json {
        println!("{}", event_json(e));
    } else {
        let time = esk_wire::envelope::format_time(&e.event.time);
        let stream = if with_stream { format!("{} ", e.event.stream) } else { String::new() };
        println!("{stream}{:>5}  {:<16} {}  {time}", e.event.version, e.event.event_type, e.event.data);
    }
}

pub async fn read(g: &Global, args: ReadArgs) -> Result<(), Failure> {
    let stream = parse_stream(&args.stream)?;
    let client = connect(g, false).await?;
    let events = read_stream(&client, stream.as_str(), args.from_version, Arc::new(g.schemas()?)).await?;
    for e in &events {
        print_event(g, e, false);
    }
    if events.is_empty() && !g.json {
        eprintln!("esk: {stream} has no events from version {}", args.from_version);
    }
    Ok(())
}

pub async fn tail(g: &Global, args: TailArgs) -> Result<(), Failure> {
    if let Some(c) = &args.category
        && !is_valid_category(c)
    {
        return Err(Failure::invalid(format!(
            "--category '{c}' is not a category name (a lowercase letter, then a-z, 0-9 and _)"
        )));
    }
    let (config, topics) = kafka(g)?;
    let admin = Admin::new(&config)?;
    admin.broker_count().await?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.store(true, Ordering::SeqCst);
        });
    }
    let wanted = match &args.category {
        Some(c) => vec![topics.events(c)],
        None => Vec::new(),
    };
    let prefix = topics.events_prefix();
    let g2 = g.clone();
    let schemas = g.schemas()?;
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || -> Result<(), Failure> {
        let consumer: BaseConsumer =
            config.committed_reader("esk-tail", Duration::from_millis(50)).create().map_err(esk_kafka::Error::from)?;
        let mut assigned: Vec<String> = Vec::new();
        let mut tpl = TopicPartitionList::new();
        let mut last_refresh: Option<std::time::Instant> = None;
        let mut seen = 0u64;
        let mut warned = false;
        while !stop.load(Ordering::SeqCst) {
            if last_refresh.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                last_refresh = Some(std::time::Instant::now());
                let present = handle.block_on(admin.list(&prefix))?;
                let targets: Vec<String> = if wanted.is_empty() {
                    present
                } else {
                    present.into_iter().filter(|t| wanted.contains(t)).collect()
                };
                if targets.is_empty() && !warned {
                    warned = true;
                    eprintln!("esk: waiting for events under {prefix}* to appear");
                }
                let new: Vec<String> = targets.into_iter().filter(|t| !assigned.contains(t)).collect();
                if !new.is_empty() {
                    let infos = handle.block_on(admin.describe(&new))?;
                    for t in &infos {
                        // Topics found after the start are read from their beginning.
                        let from_start = args.from_beginning || !assigned.is_empty() || warned;
                        for p in 0..t.partitions {
                            let offset = if from_start { Offset::Beginning } else { Offset::End };
                            tpl.add_partition_offset(&t.name, p, offset).map_err(esk_kafka::Error::from)?;
                        }
                    }
                    // Keep the positions of what is already assigned.
                    if !assigned.is_empty() {
                        let positions = consumer.position().map_err(esk_kafka::Error::from)?;
                        for e in positions.elements() {
                            if let Offset::Offset(n) = e.offset() {
                                tpl.set_partition_offset(e.topic(), e.partition(), Offset::Offset(n))
                                    .map_err(esk_kafka::Error::from)?;
                            }
                        }
                    }
                    consumer.assign(&tpl).map_err(esk_kafka::Error::from)?;
                    assigned.extend(new);
                }
            }
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => match decode(&m, &schemas) {
                    Ok(e) => {
                        print_event(&g2, &e, true);
                        seen += 1;
                        if args.limit.is_some_and(|l| seen >= l) {
                            break;
                        }
                    }
                    Err(reason) => eprintln!(
                        "esk: skipping {}/{}@{}: not an esk event: {reason}",
                        rdkafka::Message::topic(&m),
                        rdkafka::Message::partition(&m),
                        rdkafka::Message::offset(&m)
                    ),
                },
                Some(Err(e)) => eprintln!("esk: {e}"),
                None => {}
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| Failure::new(crate::exit::Kind::Internal, e))?
}
