//! The gateway benchmarks: appends through HTTP at 64 in flight beside the
//! same appends through the Kafka client in the same run, and the delivery
//! rate of a subscription (Server-Sent Events) reading a backlog.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use esk_client::Client;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::projector::{backlog_of, get, spawn};

/// A keep-alive HTTP/1.1 connection sending one request at a time.
struct Connection {
    addr: String,
    io: BufReader<TcpStream>,
}

impl Connection {
    async fn open(addr: &str) -> Result<Self> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Self { addr: addr.to_owned(), io: BufReader::new(s) })
    }

    /// POSTs a JSON body: the status and the body of the answer.
    async fn post(&mut self, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>)> {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        );
        let s = self.io.get_mut();
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await?;
        let mut line = String::new();
        self.io.read_line(&mut line).await?;
        let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("not an HTTP answer")?;
        let mut length = 0usize;
        loop {
            line.clear();
            if self.io.read_line(&mut line).await? == 0 {
                bail!("the connection closed");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse()?;
            }
        }
        let mut body = vec![0; length];
        self.io.read_exact(&mut body).await?;
        Ok((status, body))
    }
}

/// Appends through the gateway as `crate::appends` does through the client:
/// `in_flight` connections, each appending to streams of its own with the
/// exact version it expects.
async fn http_appends(
    addr: &str,
    category: &str,
    size: usize,
    count: usize,
    in_flight: usize,
) -> Result<(Histogram<u64>, Duration)> {
    let streams = crate::STREAMS.max(in_flight);
    let started = Instant::now();
    let workers = (0..in_flight).map(|w| async move {
        let mut c = Connection::open(addr).await?;
        let mut h = Histogram::<u64>::new(3)?;
        let own: Vec<usize> = (w..streams).step_by(in_flight).collect();
        let mut versions: Vec<Option<u64>> = vec![None; own.len()];
        let mut i = w;
        let pad = "x".repeat(size.saturating_sub(20));
        while i < count {
            let k = (i / in_flight) % own.len();
            let stream = format!("{category}-{}r{}", crate::run_tag(), own[k]);
            let expected = versions[k].map_or(json!("no-stream"), |v| json!(v));
            let body =
                json!({"expected_version": expected, "events": [{"type": "Measured", "data": {"n": i, "pad": pad}}]});
            let t = Instant::now();
            let (status, answer) = c.post(&format!("/streams/{stream}/events"), body.to_string().as_bytes()).await?;
            if status != 201 {
                bail!("append {i} to {stream}: {status} {}", String::from_utf8_lossy(&answer));
            }
            h.record(t.elapsed().as_micros() as u64)?;
            let a: Value = serde_json::from_slice(&answer)?;
            versions[k] = a["last_version"].as_u64();
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

/// Both benchmarks, with the gateway binary `bin` started here.
pub async fn run(client: &Client, bin: &Path, args: &crate::Args, direct: (Histogram<u64>, Duration)) -> Result<()> {
    println!("\n## esk gateway (HTTP/JSON, one keep-alive connection a request in flight)");
    let (_gateway, http) = spawn(bin, &args.bootstrap_servers, &args.prefix, "ESK_GATEWAY_HTTP", &[])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(&http, "/ready").is_none_or(|(s, _)| s != 200) {
        if Instant::now() > deadline {
            bail!("the gateway at {http} was not ready in 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let count = args.gateway_appends;
    http_appends(&http, "gwwarm", args.record_size, 500, 32).await?;
    let (h, took) = http_appends(&http, "gw", args.record_size, count, 64).await?;
    crate::report("gateway, 64 in flight", &h, count, took);
    crate::report("client, 64 in flight (same run)", &direct.0, count, direct.1);

    let total = args.sse_events;
    if total == 0 {
        return Ok(());
    }
    let topic = backlog_of(client, "sse", total, |v| ("Measured", json!({"v": v}))).await?;
    let want = (total / 1000 * 1000) as u64;
    let started = Instant::now();
    let s = TcpStream::connect(&http).await?;
    let mut io = BufReader::with_capacity(1 << 20, s);
    let path = format!("/subscriptions/sse?from=start&limit={want}");
    io.get_mut().write_all(format!("GET {path} HTTP/1.0\r\nHost: {http}\r\n\r\n").as_bytes()).await?;
    let (mut events, mut bytes, mut first) = (0u64, 0usize, None);
    let mut line = String::new();
    loop {
        line.clear();
        let n = io.read_line(&mut line).await?;
        if n == 0 {
            break;
        }
        bytes += n;
        if line.starts_with("data:") {
            events += 1;
            first.get_or_insert_with(Instant::now);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if events != want {
        bail!("the subscription sent {events} of {want} events of {topic}");
    }
    let streaming = first.map_or(secs, |f| f.elapsed().as_secs_f64());
    println!(
        "subscription: a backlog of {want} events in {secs:.1}s = {:.0} events/s ({:.0} events/s from the first; {:.0} MB/s of SSE)",
        want as f64 / secs,
        want as f64 / streaming,
        bytes as f64 / secs / 1e6
    );
    Ok(())
}
