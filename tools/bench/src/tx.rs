//! The coordinator benchmark: committed transfers per second and the latency
//! from request to outcome, with 1, 8, 32 and 256 concurrent clients.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use esk_client::Client;
use esk_wire::protocol::{CommandData, ExpectedVersion, Participant};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;

fn legs(from: u64, to: u64) -> Vec<Participant> {
    let leg = |s: u64, c: &str| Participant {
        stream: format!("account-tx{s}"),
        command: CommandData { command_type: c.into(), data: json!({"amount": 1}) },
    };
    vec![leg(from, "Withdraw"), leg(to, "Deposit")]
}

pub async fn run(client: &Client, transfers: usize, levels: &[usize]) -> Result<()> {
    println!("\n## esk transactions (2PC transfers between 1000 accounts)");
    let accounts = 1000u64;
    let open = futures::stream::iter((0..accounts).map(|i| async move {
        let s = format!("account-tx{i}");
        let c = CommandData { command_type: "OpenAccount".into(), data: json!({"owner": "bench"}) };
        client.command(&s, ExpectedVersion::Any, c, None).await?;
        let c = CommandData { command_type: "Deposit".into(), data: json!({"amount": 1_000_000}) };
        client.command(&s, ExpectedVersion::Any, c, None).await
    }))
    .buffer_unordered(64)
    .collect::<Vec<_>>()
    .await;
    if let Some(e) = open.into_iter().find_map(Result::err) {
        bail!("opening the accounts: {e}");
    }
    for &clients in levels {
        let n = if clients == 1 { transfers / 5 } else { transfers };
        let mut h = Histogram::<u64>::new(3)?;
        let started = Instant::now();
        let mut results = futures::stream::iter((0..n).map(|i| async move {
            let from = (i as u64 * 7919) % accounts;
            let to = (from + 1 + (i as u64 % (accounts - 1))) % accounts;
            let txid = format!("bench-{clients}-{i}-{}", started.elapsed().as_nanos());
            let t = Instant::now();
            let r = client.transact(&txid, legs(from, to), Duration::from_secs(10)).await;
            (r, t.elapsed())
        }))
        .buffer_unordered(clients);
        let mut committed = 0;
        while let Some((r, took)) = results.next().await {
            if r?.outcome == "committed" {
                committed += 1;
                h.record(took.as_micros() as u64)?;
            }
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{clients:>3} clients  {committed:>6} committed in {secs:>6.2}s = {:>7.0}/s   request -> outcome p50 {:>6.2} ms  p99 {:>7.2} ms",
            f64::from(committed) / secs,
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0
        );
    }
    Ok(())
}
