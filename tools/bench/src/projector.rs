//! The projector benchmarks: catch-up from a backlog, and the time from an
//! append's reply until a query shows it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use esk_client::Client;
use esk_kafka::admin::{Admin, Durability, TopicKind};
use esk_wire::partition::partition_for;
use esk_wire::protocol::{CommandData, ExpectedVersion};
use esk_wire::{Event, StreamName};
use hdrhistogram::Histogram;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

/// A service the benchmark started: killed when the guard goes, however the
/// benchmark ends (its store folder goes with it).
pub struct Spawned(pub Child, #[allow(dead_code, reason = "held for its Drop")] pub tempfile::TempDir);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The bench's `--kafka-config`, given to every service it starts.
pub static KAFKA_CONFIG: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();

/// Starts `bin` with the installation's environment plus `env`; its HTTP on a free port.
pub fn spawn(
    bin: &Path,
    bootstrap: &str,
    prefix: &str,
    http_var: &str,
    env: &[(&str, &str)],
) -> Result<(Spawned, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let http = format!("127.0.0.1:{port}");
    let data = tempfile::tempdir()?;
    let mut cmd = Command::new(bin);
    cmd.env("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
        .env("ESK_TOPIC_PREFIX", prefix)
        .env(http_var, &http)
        .env("ESK_DATA_DIR", data.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    if let Some(Some(file)) = KAFKA_CONFIG.get() {
        cmd.env("ESK_KAFKA_CONFIG", file);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
    Ok((Spawned(child, data), http))
}

pub fn get(addr: &str, path: &str) -> Option<(u16, Value)> {
    let (status, body) = esk_client::http::get(addr, path, Duration::from_secs(30)).ok()?;
    Some((status, serde_json::from_str(&body).ok()?))
}

/// Writes `total` valid account events (1000 accounts) straight into the
/// category topic: the backlog a new projector must catch up with.
async fn backlog(client: &Client, total: usize, size: usize) -> Result<String> {
    let pad = "x".repeat(size.saturating_sub(40));
    backlog_of(client, "account", total, |v| {
        if v == 1 { ("AccountOpened", json!({"owner": pad})) } else { ("Deposited", json!({"amount": 1})) }
    })
    .await
}

/// Writes `total` events of `category` (1000 streams, `<category>-bk<n>`,
/// each event's type and data made by `event` from its version) straight
/// into its topic; the topic's name.
pub async fn backlog_of(
    client: &Client,
    category: &str,
    total: usize,
    event: impl Fn(u64) -> (&'static str, Value),
) -> Result<String> {
    let topics = client.topics();
    let topic = topics.events(category);
    let partitions = client.partitions();
    let admin = Admin::new(client.kafka())?;
    let brokers = admin.broker_count().await?;
    admin.ensure(&[TopicKind::Events.spec(topic.clone(), partitions, Durability::for_brokers(brokers))]).await?;
    let producer: FutureProducer = client.kafka().producer(esk_kafka::Sending::Bulk { idempotent: true }).create()?;
    let accounts = 1000;
    let per_account = total / accounts;
    let started = Instant::now();
    let mut pending = Vec::new();
    for v in 1..=per_account as u64 {
        for a in 0..accounts {
            let stream = StreamName::parse(&format!("{category}-bk{a}"))?;
            let (ty, data) = event(v);
            let e = Event {
                id: format!("bk{a}-{v}"),
                source: "esk-bench".into(),
                event_type: ty.into(),
                time: chrono::Utc::now(),
                stream: stream.clone(),
                version: v,
                correlation_id: None,
                causation_id: None,
                data_schema: (category == "account").then(|| format!("urn:esk:schema:account:{ty}:v1")),
                data,
            };
            let headers = e
                .headers()
                .iter()
                .fold(OwnedHeaders::new(), |h, (k, v)| h.insert(Header { key: k, value: v.as_deref() }));
            let value = e.value();
            let record = FutureRecord::to(&topic)
                .partition(partition_for(stream.as_str().as_bytes(), partitions))
                .key(stream.as_str())
                .payload(&value)
                .headers(headers);
            pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
            if pending.len() >= 50_000 {
                for d in futures::future::join_all(pending.drain(..)).await {
                    d?.map_err(|(e, _)| e)?;
                }
            }
        }
    }
    for d in futures::future::join_all(pending).await {
        d?.map_err(|(e, _)| e)?;
    }
    println!(
        "backlog: {} events written to {topic} in {:.1}s",
        per_account * accounts,
        started.elapsed().as_secs_f64()
    );
    Ok(topic)
}

pub async fn run(client: &Client, bin: &Path, total: usize, size: usize, prefix: &str, bootstrap: &str) -> Result<()> {
    println!("\n## esk projector (accounts)");
    let topic = backlog(client, total, size).await?;
    let started = Instant::now();
    let (_projector, http) = spawn(bin, bootstrap, prefix, "ESK_PROJECTOR_HTTP", &[])?;
    let want = (total / 1000 * 1000) as u64;
    let mut first: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some((_, status)) = get(&http, "/status") else { continue };
        let applied = status["projections"][0]["applied"].as_u64().unwrap_or(0);
        if applied > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if applied >= want {
            break;
        }
        if started.elapsed() > Duration::from_secs(900) {
            bail!("the projector applied {applied} of {want} in 15 minutes");
        }
    }
    let total_secs = started.elapsed().as_secs_f64();
    let applying = first.map_or(total_secs, |f| f.elapsed().as_secs_f64());
    println!(
        "catch-up: {want} events in {total_secs:.1}s from process start = {:.0} events/s ({:.0} events/s from the first commit)",
        want as f64 / total_secs,
        want as f64 / applying
    );
    println!("category topic for ConsumerPerformance: {topic}");

    // Latency from an append's reply to the query that shows it.
    let mut h = Histogram::<u64>::new(3)?;
    let rounds = 1000;
    for i in 0..10 {
        let c = CommandData { command_type: "OpenAccount".into(), data: json!({"owner": "e2e"}) };
        client.command(&format!("account-e2e{i}"), ExpectedVersion::NoStream, c, None).await?;
    }
    for r in 0..rounds {
        let c = CommandData { command_type: "Deposit".into(), data: json!({"amount": 1}) };
        let a = client.command(&format!("account-e2e{}", r % 10), ExpectedVersion::Any, c, None).await?;
        let t = Instant::now();
        let path = format!("/accounts/e2e{}?after={}&timeout_ms=10000", r % 10, a.position);
        let http2 = http.clone();
        let (code, body) = tokio::task::spawn_blocking(move || get(&http2, &path)).await?.context("no answer")?;
        if code != 200 {
            bail!("query failed: {code} {body}");
        }
        h.record(t.elapsed().as_micros() as u64)?;
    }
    println!(
        "append reply -> visible in a query: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms ({rounds} rounds)",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
    Ok(())
}
