//! Replica and failover benchmarks: how long an acknowledged append takes to
//! show at a replica (low and high load), and how long a writer takeover of a
//! partition holding 100,000 streams takes with and without the hot standby.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use esk_client::Client;
use esk_kafka::KafkaConfig;
use esk_kafka::admin::{Admin, DEFAULT_HORIZON, Durability, Layout, platform_topics};
use esk_wire::Topics;
use esk_wire::partition::partition_for;
use esk_wire::protocol::{Answered, Appended, ExpectedVersion, IndexEntry, Memory, NewEvent, StreamRecord};
use futures::StreamExt;
use hdrhistogram::Histogram;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

use crate::projector::{get, spawn};

fn note(n: usize) -> Vec<NewEvent> {
    vec![NewEvent { id: None, event_type: "Noted".into(), data: json!({"n": n}) }]
}

async fn lag_rounds(client: &Client, http: &str, rounds: usize) -> Result<Histogram<u64>> {
    let mut h = Histogram::<u64>::new(3)?;
    for r in 0..rounds {
        let a = client.append(&format!("note-lag{}", r % 50), ExpectedVersion::Any, note(r), None).await?;
        let t = Instant::now();
        let path = format!("/streams/{}?after={}&timeout_ms=10000", a.stream, a.position);
        let http = http.to_owned();
        let (code, body) = tokio::task::spawn_blocking(move || get(&http, &path)).await?.context("no answer")?;
        if code != 200 {
            bail!("replica query failed: {code} {body}");
        }
        h.record(t.elapsed().as_micros() as u64)?;
    }
    Ok(h)
}

fn print(name: &str, h: &Histogram<u64>) {
    println!(
        "{name:<34} p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>7.2} ms ({} rounds)",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
        h.len()
    );
}

/// Append acknowledged -> visible at a replica, with and without other load.
pub async fn lag(client: &Arc<Client>, bin: &Path, prefix: &str, bootstrap: &str) -> Result<()> {
    println!("\n## esk replica: append acknowledged -> visible at the replica");
    let (_replica, http) = spawn(bin, bootstrap, prefix, "ESK_REPLICA_HTTP", &[])?;
    let started = Instant::now();
    while get(&http, "/status").is_none_or(|(_, s)| s["lag_records"] != 0) {
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the replica did not catch up in 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    print("low load (1 append in flight)", &lag_rounds(client, &http, 500).await?);
    let stop = Arc::new(AtomicBool::new(false));
    let background = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0usize;
            let mut s =
                futures::stream::iter(std::iter::from_fn(move || {
                    n += 1;
                    Some(n)
                }))
                .map(|i| {
                    let client = client.clone();
                    async move {
                        client.append(&format!("note-load{}", i % 1000), ExpectedVersion::Any, note(i), None).await
                    }
                })
                .buffer_unordered(64);
            let mut done = 0u64;
            while !stop.load(Ordering::SeqCst) {
                if s.next().await.is_none() {
                    break;
                }
                done += 1;
            }
            done
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = Instant::now();
    let h = lag_rounds(client, &http, 500).await?;
    stop.store(true, Ordering::SeqCst);
    let background = background.await?;
    print("high load (+64 appends in flight)", &h);
    println!("(background load: {:.0} appends/s)", background as f64 / t.elapsed().as_secs_f64().max(1.0));
    Ok(())
}

/// Writes `streams` stream records and `answers` remembered answers (as the
/// writer writes them, spread over the streams) into partition 0 of a
/// one-partition installation's state and answers topics.
pub async fn fill_state(kafka: &KafkaConfig, topics: &Topics, streams: usize, answers: usize) -> Result<()> {
    let admin = Admin::new(kafka)?;
    let brokers = admin.broker_count().await?;
    admin
        .ensure(&platform_topics(
            topics,
            ["note"],
            Layout { partitions: 1, shards: 1 },
            Durability::for_brokers(brokers),
            DEFAULT_HORIZON,
        ))
        .await?;
    let producer: FutureProducer = kafka.producer(esk_kafka::Sending::Bulk { idempotent: false }).create()?;
    let (state, remembered) = (topics.state(), topics.answers());
    let now = chrono::Utc::now().timestamp_millis();
    let mut pending = Vec::new();
    for i in 0..streams.max(answers) {
        let stream = format!("note-s{}", i % streams.max(1));
        let mut sends = Vec::new();
        if i < streams {
            let mut record = StreamRecord::new(&stream, None);
            record.version = 3;
            record.last_offset = 0;
            record.index = vec![IndexEntry { version: 1, offset: 0 }];
            sends.push((&state, serde_json::to_vec(&record)?));
        }
        if i < answers {
            let memory = Memory::Answer {
                stream: stream.clone(),
                answer: Answered {
                    request_id: format!("req-{i}"),
                    first_event_id: None,
                    expected_version: ExpectedVersion::Any,
                    result: Appended {
                        stream: stream.clone(),
                        first_version: 3,
                        last_version: 3,
                        position: "note:0:0".into(),
                    },
                    fingerprint: 1,
                    answered_ms: now,
                },
            };
            sends.push((&remembered, serde_json::to_vec(&memory)?));
        }
        for (topic, value) in sends {
            pending.push(
                producer
                    .send_result(FutureRecord::to(topic).partition(0).key(&stream).payload(&value))
                    .map_err(|(e, _)| e)?,
            );
        }
        if pending.len() >= 20_000 {
            for d in futures::future::join_all(pending.drain(..)).await {
                d?.map_err(|(e, _)| e)?;
            }
        }
    }
    for d in futures::future::join_all(pending).await {
        d?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

async fn serving(http: &str) -> u64 {
    get(http, "/health").and_then(|(_, h)| h["partitions_serving"].as_u64()).unwrap_or(0)
}

/// Waits until a writer's hot standby has every record of the state and
/// answers topics in its local store (at most `limit`).
async fn standby_caught_up(http: &str, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let lag = get(http, "/status").and_then(|(_, s)| {
            let sb = s.get("standby")?;
            Some(sb["state_lag_records"].as_i64()? + sb["answers_lag_records"].as_i64()?)
        });
        if lag == Some(0) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!("the standby at {http} did not catch up in {limit:?} (lag {lag:?})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Resident memory of a process, from /proc (kB), 0 where it cannot be read.
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Memory of a writer holding `streams` streams: one partition, its owner
/// (which also follows the whole state as a hot standby), then after appends
/// to 20,000 of the streams.
pub async fn memory(kafka: &KafkaConfig, bin: &Path, streams: usize) -> Result<()> {
    println!("\n## writer memory with {streams} streams in its partition (owner and hot standby)");
    let kafka = kafka.clone().with_timeout(Duration::from_secs(120));
    let prefix = format!("bench-memory-{}", std::process::id());
    let t = Instant::now();
    fill_state(&kafka, &Topics::new(&prefix), streams, 0).await?;
    println!("fill: {streams} stream records in {:.1}s", t.elapsed().as_secs_f64());
    let (w, http) = spawn(bin, &kafka.bootstrap, &prefix, "ESK_WRITER_HTTP", &[])?;
    let t = Instant::now();
    while serving(&http).await != 1 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let serving_after = t.elapsed();
    let caught_up = standby_caught_up(&http, Duration::from_secs(600)).await?;
    let idle = rss_kb(w.0.id());
    let client = Client::connect_pipelined(kafka.clone(), Topics::new(&prefix))?;
    let touched = 20_000.min(streams);
    let mut replies = futures::stream::iter((0..touched).map(|i| {
        let client = &client;
        async move {
            client.append(&format!("note-s{}", i * (streams / touched)), ExpectedVersion::Exact(3), note(i), None).await
        }
    }))
    .buffer_unordered(64);
    while let Some(r) = replies.next().await {
        r.context("an append to a filled stream")?;
    }
    let busy = rss_kb(w.0.id());
    let metrics = esk_client::http::get(&http, "/metrics", Duration::from_secs(10)).map(|(_, b)| b).unwrap_or_default();
    let store_mb = metrics
        .lines()
        .find(|l| l.starts_with("esk_writer_store_bytes"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1e6;
    println!(
        "serving after {:.1}s, standby caught up after {:.1}s; RSS {:.0} MB idle, {:.0} MB after appends to {touched} \
         streams (cache 10,000 a partition); local store {store_mb:.0} MB on disk",
        serving_after.as_secs_f64(),
        caught_up.as_secs_f64(),
        idle as f64 / 1024.0,
        busy as f64 / 1024.0
    );
    Ok(())
}

/// Kill the owner of the one partition; time until a writer answers again.
/// With standby, the other writer has followed everything; without, a new
/// writer with an empty disk starts as the owner dies (a rescheduled
/// instance), so the restore reads the whole partition.
async fn takeover(kafka: &KafkaConfig, bin: &Path, prefix: &str, standby: bool) -> Result<Duration> {
    let flag = if standby { "true" } else { "false" };
    let env = [("ESK_WRITER_STANDBY", flag), ("ESK_WRITER_SESSION_TIMEOUT_MS", "6000")];
    let (a, a_http) = spawn(bin, &kafka.bootstrap, prefix, "ESK_WRITER_HTTP", &env)?;
    while serving(&a_http).await != 1 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client = Client::connect(kafka.clone(), Topics::new(prefix))?;
    let stream = "note-s7";
    assert_eq!(partition_for(stream.as_bytes(), 1), 0);
    if !standby {
        let mut owner = a;
        let killed = Instant::now();
        owner.0.kill()?;
        let _ = owner.0.wait();
        let _fresh = spawn(bin, &kafka.bootstrap, prefix, "ESK_WRITER_HTTP", &env)?;
        client
            .append(stream, ExpectedVersion::Exact(3), note(0), None)
            .await
            .context("the append after the takeover")?;
        return Ok(killed.elapsed());
    }
    let (b, b_http) = spawn(bin, &kafka.bootstrap, prefix, "ESK_WRITER_HTTP", &env)?;
    // Give the second writer time to join and to follow everything.
    while get(&b_http, "/health").is_none() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    standby_caught_up(&a_http, Duration::from_secs(600)).await?;
    standby_caught_up(&b_http, Duration::from_secs(600)).await?;
    // The group gives the one partition to either writer: kill whichever owns it.
    let mut owner = loop {
        match (serving(&a_http).await, serving(&b_http).await) {
            (1, 0) => break a,
            (0, 1) => break b,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let killed = Instant::now();
    owner.0.kill()?;
    let _ = owner.0.wait();
    client.append(stream, ExpectedVersion::Exact(3), note(0), None).await.context("the append after the takeover")?;
    Ok(killed.elapsed())
}

pub async fn failover(kafka: &KafkaConfig, bin: &Path, streams: usize, answers: usize) -> Result<()> {
    println!(
        "\n## writer takeover of a partition holding {streams} streams and {answers} remembered requests \
         (session timeout 6 s)"
    );
    let kafka = kafka.clone().with_timeout(Duration::from_secs(120));
    for standby in [false, true] {
        let prefix = format!("bench-takeover-{}-{}", u8::from(standby), std::process::id());
        fill_state(&kafka, &Topics::new(&prefix), streams, answers).await?;
        let took = takeover(&kafka, bin, &prefix, standby).await?;
        println!(
            "{:<22} SIGKILL of the owner -> next append answered: {:>6.2} s",
            if standby { "with hot standby" } else { "new instance, empty disk" },
            took.as_secs_f64()
        );
    }
    Ok(())
}
