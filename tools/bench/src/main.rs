//! `esk-bench`: esk's benchmarks against a running writer. `make bench` runs it
//! beside Kafka's own tools on the same broker (see `infra/bench.sh`).
//!
//! - append: throughput and p50/p99 latency of closed loops of 1, 64, 256 and
//!   1024 requests in flight (`--levels`), one event of `--record-size` bytes
//!   each, every append with the exact version it expects and the requests in
//!   flight on distinct streams (as the peers are measured); with
//!   `--writer-pid`/`--broker-pid`, their CPU time per append;
//! - read: `esk read` of one stream among `--read-events` events in its
//!   category, which must not scan the category topic;
//! - takeover: SIGKILL of a partition's owner with `--takeover-streams`
//!   streams and `--takeover-answers` remembered requests, with and without
//!   hot standby;
//! - memory: a writer's RSS with `--memory-streams` streams in its partition;
//! - gateway (with `--gateway-bin`): appends through HTTP at 64 in flight
//!   beside the client's in the same run, and a subscription's delivery of a
//!   backlog of `--sse-events` events.

/// mimalloc rather than glibc's malloc: esk's hot paths allocate and free
/// per record (ADR 11).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod gateway;
mod projector;
mod replica;
mod tx;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use esk_client::{Client, read_stream};
use esk_kafka::KafkaConfig;
use esk_wire::protocol::{ExpectedVersion, NewEvent};
use esk_wire::{SchemaRegistry, Topics};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(name = "esk-bench", about = "esk's benchmarks (needs a running esk-writer)")]
pub struct Args {
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS", default_value = "127.0.0.1:9092")]
    pub bootstrap_servers: String,
    /// Kafka client properties (librdkafka names: TLS, SASL, tuning) from a
    /// Java-style properties file, as Kafka's tools take `--command-config`.
    /// Each `ESK_KAFKA_<PROPERTY>` variable applies on top (`_` for `.`, `__`
    /// for `_`: `ESK_KAFKA_SECURITY_PROTOCOL=SASL_SSL`). Properties esk's
    /// guarantees rest on (isolation.level, enable.idempotence,
    /// transactional.id, partitioner, acks, group.id, ...) are refused.
    #[arg(long, env = "ESK_KAFKA_CONFIG")]
    kafka_config: Option<std::path::PathBuf>,
    #[arg(long, env = "ESK_TOPIC_PREFIX", default_value = "esk")]
    pub prefix: String,
    /// Bytes of event data per append.
    #[arg(long, default_value_t = 200)]
    pub record_size: usize,
    /// Appends measured with one request in flight.
    #[arg(long, default_value_t = 2000)]
    sequential: usize,
    /// Appends measured at each level of more than one request in flight.
    #[arg(long, default_value_t = 100_000)]
    pipelined: usize,
    /// Requests in flight of each closed-loop run (1 takes `--sequential`
    /// appends, the others `--pipelined`).
    #[arg(long, value_delimiter = ',', default_value = "1,64,256,1024")]
    levels: Vec<usize>,
    /// Requests in flight while filling the category for the read benchmark.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// The writer's process id: each run then reports the writer's CPU time
    /// per append (user + system, from /proc).
    #[arg(long)]
    writer_pid: Option<u32>,
    /// The broker's process id, for its CPU time per append likewise.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Concurrent clients of each 2PC run (a fifth of `--transfers` at 1).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,256")]
    transfer_clients: Vec<usize>,
    /// Events in the category before the read benchmark (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    read_events: usize,
    /// The esk-projector binary for the projector benchmarks (skipped without it).
    #[arg(long)]
    projector_bin: Option<std::path::PathBuf>,
    /// Backlog the projector catches up with.
    #[arg(long, default_value_t = 1_000_000)]
    projector_events: usize,
    /// The esk-replica binary for the replica-lag benchmark (skipped without it).
    #[arg(long)]
    replica_bin: Option<std::path::PathBuf>,
    /// The esk-writer binary for the takeover benchmark (skipped without it).
    #[arg(long)]
    writer_bin: Option<std::path::PathBuf>,
    /// Streams in the partition a takeover restores.
    #[arg(long, default_value_t = 100_000)]
    takeover_streams: usize,
    /// Requests remembered (within the idempotency horizon) in that partition.
    #[arg(long, default_value_t = 1_000_000)]
    takeover_answers: usize,
    /// Streams in the partition whose writer's memory is measured (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    memory_streams: usize,
    /// 2PC transfers per concurrency level (needs a running esk-coordinator; 0 skips).
    #[arg(long, default_value_t = 0)]
    transfers: usize,
    /// The esk-gateway binary for the gateway benchmarks (skipped without it).
    #[arg(long)]
    gateway_bin: Option<std::path::PathBuf>,
    /// Appends through the gateway (and through the client beside it).
    #[arg(long, default_value_t = 50_000)]
    pub gateway_appends: usize,
    /// Backlog a subscription through the gateway reads (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    pub sse_events: usize,
}

fn event(size: usize, n: usize) -> NewEvent {
    NewEvent {
        id: None,
        event_type: "Measured".into(),
        data: json!({"n": n, "pad": "x".repeat(size.saturating_sub(20))}),
    }
}

pub fn report(name: &str, h: &Histogram<u64>, count: usize, elapsed: Duration) {
    println!(
        "{name:<28} {count:>8} appends in {:>6.2}s = {:>8.0}/s   latency p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>7.2} ms",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64(),
        h.value_at_quantile(0.50) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
    );
}

/// CPU time of the writer and the broker, to report it per append.
struct Cpu(Vec<(&'static str, u32, f64)>);

impl Cpu {
    fn sample(args: &Args) -> Cpu {
        let who = [("writer", args.writer_pid), ("broker", args.broker_pid)];
        Cpu(who.into_iter().filter_map(|(n, p)| Some((n, p?, cpu_seconds(p?)?))).collect())
    }

    fn report(&self, appends: usize) {
        if self.0.is_empty() || appends == 0 {
            return;
        }
        let parts: Vec<String> = self
            .0
            .iter()
            .filter_map(|(name, pid, before)| {
                let used = cpu_seconds(*pid)? - before;
                Some(format!("{name} {:.0} µs", used * 1e6 / appends as f64))
            })
            .collect();
        println!("{:28} CPU per append: {}", "", parts.join(", "));
    }
}

/// User + system CPU seconds of a process (all its threads), from /proc.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // /proc counts in USER_HZ, which Linux fixes at 100 for this interface.
    Some(ticks / 100.0)
}

/// Tells this run's streams from an earlier run's on the same installation
/// (every append expects the exact version, `NoStream` first).
pub fn run_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        format!(
            "{:x}",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs()
        )
    })
}

/// Streams the appends of a run are spread over (more when more are in flight).
pub const STREAMS: usize = 1000;

/// `count` appends by `in_flight` workers, like for like with the event
/// stores a user compares: every append names the exact version it expects
/// (`NoStream` first), and the requests in flight are on distinct streams
/// (each worker has streams of its own, `STREAMS` in all or one a worker).
async fn appends(
    client: &Client,
    args: &Args,
    category: &str,
    count: usize,
    in_flight: usize,
) -> Result<(Histogram<u64>, Duration)> {
    let in_flight = in_flight.clamp(1, count.max(1));
    let streams = STREAMS.max(in_flight);
    let started = Instant::now();
    let workers = (0..in_flight).map(|w| async move {
        let mut h = Histogram::<u64>::new(3)?;
        // Worker w owns streams w, w + in_flight, w + 2 * in_flight, ...
        let own: Vec<usize> = (w..streams).step_by(in_flight).collect();
        let mut versions = vec![None; own.len()];
        let mut i = w;
        while i < count {
            let k = (i / in_flight) % own.len();
            let stream = format!("{category}-{}r{}", run_tag(), own[k]);
            let expected = versions[k].map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
            let t = Instant::now();
            let appended = client
                .append(&stream, expected, vec![event(args.record_size, i)], None)
                .await
                .with_context(|| format!("append {i} to {stream} at {expected:?}"))?;
            h.record(t.elapsed().as_micros() as u64)?;
            versions[k] = Some(appended.last_version);
            i += in_flight;
        }
        anyhow::Ok(h)
    });
    let mut all = Histogram::<u64>::new(3)?;
    for h in futures::future::join_all(workers).await {
        all.add(h?)?;
    }
    Ok((all, started.elapsed()))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let config = KafkaConfig::load(&args.bootstrap_servers, Duration::from_secs(60), args.kafka_config.as_deref())?;
    // The services the bench starts take the same client properties.
    projector::KAFKA_CONFIG.get_or_init(|| args.kafka_config.clone());
    let topics = Topics::new(&args.prefix);
    let client = Arc::new(Client::connect_pipelined(config.clone(), topics)?);
    println!("## esk append (writer at {}, prefix {})", args.bootstrap_servers, args.prefix);
    // Warm up: create the category topic, fill the writer's caches.
    appends(&client, &args, "warm", 500, 32).await?;
    for &level in &args.levels {
        let count = if level <= 1 { args.sequential } else { args.pipelined };
        let cpu = Cpu::sample(&args);
        let (h, took) = appends(&client, &args, &format!("f{level}"), count, level).await?;
        report(&format!("{level} in flight"), &h, count, took);
        cpu.report(count);
    }

    if args.read_events > 0 {
        read_bench(&client, &config, &args).await?;
    }
    if let Some(bin) = &args.replica_bin {
        replica::lag(&client, bin, &args.prefix, &args.bootstrap_servers).await?;
    }
    if let Some(bin) = &args.writer_bin {
        replica::failover(&config, bin, args.takeover_streams, args.takeover_answers).await?;
        if args.memory_streams > 0 {
            replica::memory(&config, bin, args.memory_streams).await?;
        }
    }
    if args.transfers > 0 {
        tx::run(&client, args.transfers, &args.transfer_clients).await?;
    }
    if let Some(bin) = &args.gateway_bin {
        let direct = appends(&client, &args, "gwdirect", args.gateway_appends, 64).await?;
        gateway::run(&client, bin, &args, direct).await?;
    }
    if let Some(bin) = &args.projector_bin {
        projector::run(&client, bin, args.projector_events, args.record_size, &args.prefix, &args.bootstrap_servers)
            .await?;
    }
    Ok(())
}

/// Fills a category with `read_events` events in 1000 streams, 100 a request,
/// with the measured stream's 200 single-event appends spread among them; then
/// times reading that stream.
async fn read_bench(client: &Client, config: &KafkaConfig, args: &Args) -> Result<()> {
    println!("\n## esk read of one stream among {} events", args.read_events);
    let per_request = 100;
    let requests = args.read_events / per_request;
    let target_every = (requests / 200).max(1);
    let started = Instant::now();
    let mut results = futures::stream::iter((0..requests).map(|i| async move {
        let events = (0..per_request).map(|j| event(args.record_size, i * per_request + j)).collect();
        let r = client.append(&format!("bulk-{}", i % 1000), ExpectedVersion::Any, events, None).await;
        let t = if i % target_every == 0 {
            Some(client.append("bulk-target", ExpectedVersion::Any, vec![event(args.record_size, i)], None).await)
        } else {
            None
        };
        (r, t)
    }))
    .buffer_unordered(args.in_flight);
    let mut target = 0u64;
    while let Some((r, t)) = results.next().await {
        r.context("a bulk append failed")?;
        if let Some(t) = t {
            t.context("a target append failed")?;
            target += 1;
        }
    }
    let fill = started.elapsed();
    println!(
        "fill: {} events in {:.1}s = {:.0} events/s (requests of {per_request})",
        requests * per_request + target as usize,
        fill.as_secs_f64(),
        (requests * per_request) as f64 / fill.as_secs_f64()
    );
    let schemas = Arc::new(SchemaRegistry::builtin());
    let entries = client.head("bulk-target").await?.index.len();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let first = read_target(client, &schemas, target).await?;
    println!(
        "read bulk-target ({target} events, {entries} index entries), first read of the client: {:.1} ms",
        ms(first)
    );
    let mut reused = Histogram::<u64>::new(3)?;
    for _ in 0..READ_ROUNDS {
        reused.record(read_target(client, &schemas, target).await?.as_micros() as u64)?;
    }
    println!(
        "read bulk-target, {READ_ROUNDS} more reads of the client (its readers reused): p50 {:.1} ms  max {:.1} ms",
        reused.value_at_quantile(0.5) as f64 / 1000.0,
        reused.max() as f64 / 1000.0
    );
    // What `esk read` does after its process starts: connect, read, once.
    for _ in 0..3 {
        let t = Instant::now();
        let (config, topics) = (config.clone(), client.topics().clone());
        let fresh = tokio::task::spawn_blocking(move || Client::connect(config, topics)).await??;
        let connected = t.elapsed();
        let took = read_target(&fresh, &schemas, target).await?;
        println!("a new client: connect {:.1} ms, read {:.1} ms", ms(connected), ms(took));
        tokio::task::spawn_blocking(move || drop(fresh));
    }
    Ok(())
}

async fn read_target(client: &Client, schemas: &Arc<SchemaRegistry>, target: u64) -> Result<Duration> {
    let t = Instant::now();
    let events = read_stream(client, "bulk-target", 1, schemas.clone()).await?;
    if events.len() as u64 != target {
        bail!("read {} events of bulk-target, expected {target}", events.len());
    }
    Ok(t.elapsed())
}

/// Reads of the stream measured with the client's readers reused.
const READ_ROUNDS: usize = 20;
