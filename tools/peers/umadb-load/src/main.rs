//! `umadb-load`: conditional appends to an UmaDB server, the shape of
//! esk-bench's appends, for `make bench-peers` (infra/bench-peers.sh).
//!
//! `--clients C` workers, each with one append in flight, one event of
//! `--size` bytes an append. Worker w owns streams w, w + C, w + 2C, ... below
//! max(`--streams`, C) and appends to them in turn; a stream is a tag. Every
//! append carries the DCB equivalent of an expected version: fail if any event
//! with the stream's tag lies after the position of the stream's last event
//! (none at first: "no stream"). A worker knows that position from its own
//! previous append, so it reads nothing.
//!
//! The workers share `--connections` gRPC connections (1 by default: one
//! client, as an application has, its requests multiplexed over HTTP/2; 0
//! for one a worker, as pgbench has).
//!
//! Before the run it checks that the condition is enforced: an append with a
//! stale condition must be refused (IntegrityError).
//!
//! Prints one line:
//! `umadb clients=C appends=N seconds=S rate=R p50_ms=X p99_ms=Y max_ms=Z conflicts=K errors=E`

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use umadb_client::{AsyncUmaDbClient, UmaDbClient};
use umadb_dcb::{DcbAppendCondition, DcbError, DcbEvent, DcbEventStoreAsync, DcbQuery, DcbQueryItem};

struct Args {
    url: String,
    clients: usize,
    connections: usize,
    seconds: f64,
    size: usize,
    streams: usize,
    run: String,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        url: "http://127.0.0.1:50051".into(),
        clients: 1,
        connections: 1,
        seconds: 10.0,
        size: 200,
        streams: 1000,
        run: "run".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--url" => a.url = value,
            "--clients" => a.clients = value.parse().map_err(|e| bad(&e))?,
            "--connections" => a.connections = value.parse().map_err(|e| bad(&e))?,
            "--seconds" => a.seconds = value.parse().map_err(|e| bad(&e))?,
            "--size" => a.size = value.parse().map_err(|e| bad(&e))?,
            "--streams" => a.streams = value.parse().map_err(|e| bad(&e))?,
            "--run" => a.run = value,
            _ => {
                return Err(format!(
                    "unknown flag {flag}; flags: --url --clients --connections (1; 0: one a client) \
                     --seconds --size --streams --run (tag prefix)"
                ));
            }
        }
    }
    a.clients = a.clients.max(1);
    if a.connections == 0 || a.connections > a.clients {
        a.connections = a.clients;
    }
    Ok(a)
}

/// "Fail if any event of `tag` lies after `after`": the expected version.
fn condition(tag: &str, after: Option<u64>) -> DcbAppendCondition {
    DcbAppendCondition { fail_if_events_match: DcbQuery::new().item(DcbQueryItem::new().tags([tag])), after }
}

fn event(tag: &str, data: &[u8]) -> DcbEvent {
    DcbEvent::new().event_type("Appended").tags([tag]).data(data.to_vec())
}

/// An append with a stale condition must be refused.
async fn check(client: &AsyncUmaDbClient, run: &str) -> Result<(), String> {
    let tag = format!("{run}-check");
    let first = client
        .append(vec![event(&tag, b"1")], Some(condition(&tag, None)), None)
        .await
        .map_err(|e| format!("check: first append: {e}"))?;
    client
        .append(vec![event(&tag, b"2")], Some(condition(&tag, Some(first))), None)
        .await
        .map_err(|e| format!("check: second append: {e}"))?;
    match client.append(vec![event(&tag, b"3")], Some(condition(&tag, Some(first))), None).await {
        Err(DcbError::IntegrityError(_)) => Ok(()),
        Ok(p) => Err(format!("check: an append with a stale condition was accepted (position {p})")),
        Err(e) => Err(format!("check: expected an IntegrityError, got {e}")),
    }
}

#[derive(Default)]
struct Outcome {
    appends: u64,
    conflicts: u64,
    errors: u64,
    last_error: Option<String>,
}

async fn worker(
    client: Arc<AsyncUmaDbClient>,
    args: Arc<Args>,
    w: usize,
    deadline: Instant,
) -> (Histogram<u64>, Outcome) {
    let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
    let mut o = Outcome::default();
    let streams = args.streams.max(args.clients);
    let own: Vec<String> = (w..streams).step_by(args.clients).map(|s| format!("{}-{s}", args.run)).collect();
    let mut after: Vec<Option<u64>> = vec![None; own.len()];
    let data = vec![b'x'; args.size];
    let mut i = 0usize;
    while Instant::now() < deadline {
        let k = i % own.len();
        i += 1;
        let tag = &own[k];
        let t = Instant::now();
        match client.append(vec![event(tag, &data)], Some(condition(tag, after[k])), None).await {
            Ok(position) => {
                h.saturating_record((t.elapsed().as_micros() as u64).max(1));
                after[k] = Some(position);
                o.appends += 1;
            }
            Err(DcbError::IntegrityError(e)) => {
                o.conflicts += 1;
                o.last_error = Some(format!("conflict: {e}"));
            }
            Err(e) => {
                o.errors += 1;
                o.last_error = Some(e.to_string());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    (h, o)
}

#[tokio::main]
async fn main() {
    let args = match parse() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("umadb-load: {e}");
            std::process::exit(2);
        }
    };
    let mut clients = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        match UmaDbClient::new(args.url.clone()).connect_async().await {
            Ok(c) => clients.push(Arc::new(c)),
            Err(e) => {
                eprintln!("umadb-load: connect {}: {e}", args.url);
                std::process::exit(1);
            }
        }
    }
    if let Err(e) = check(&clients[0], &args.run).await {
        eprintln!("umadb-load: {e}");
        std::process::exit(1);
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let tasks: Vec<_> = (0..args.clients)
        .map(|w| tokio::spawn(worker(clients[w % clients.len()].clone(), args.clone(), w, deadline)))
        .collect();
    let mut all = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
    let mut total = Outcome::default();
    for t in futures::future::join_all(tasks).await {
        let (h, o) = t.expect("worker panicked");
        all.add(h).expect("histogram add");
        total.appends += o.appends;
        total.conflicts += o.conflicts;
        total.errors += o.errors;
        total.last_error = o.last_error.or(total.last_error);
    }
    let took = started.elapsed().as_secs_f64();
    let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "umadb clients={} appends={} seconds={took:.2} rate={:.0} p50_ms={:.3} p99_ms={:.3} max_ms={:.3} conflicts={} errors={}",
        args.clients,
        total.appends,
        total.appends as f64 / took,
        ms(0.50),
        ms(0.99),
        all.max() as f64 / 1000.0,
        total.conflicts,
        total.errors,
    );
    if let Some(e) = total.last_error {
        eprintln!("umadb-load: last failure: {e}");
    }
    if total.appends == 0 || total.errors > 0 {
        std::process::exit(1);
    }
}
