//! `esk replica status`: every replica's lag.

use serde_json::json;

use crate::cli::Global;
use crate::exit::Failure;
use crate::http::{call, message};

pub async fn status(g: &Global) -> Result<(), Failure> {
    let urls: Vec<&str> = g.replica_urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    if urls.is_empty() {
        return Err(Failure::invalid("--replica-urls is empty"));
    }
    let mut docs = Vec::new();
    let mut unreachable = Vec::new();
    for url in &urls {
        match call(url, "GET", "/status", g.timeout).await {
            Ok((200, body)) => docs.push(json!({"url": url, "status": body})),
            Ok((code, body)) => unreachable.push(format!("{url}: {code} {}", message(&body))),
            Err(f) if f.kind == crate::exit::Kind::InvalidInput => return Err(f),
            Err(f) => unreachable.push(f.message),
        }
    }
    if g.json {
        println!("{}", json!({"replicas": docs, "unreachable": unreachable}));
    } else {
        let empty = Vec::new();
        for d in &docs {
            let s = &d["status"];
            println!(
                "{} (instance {}): lag {} records, {} ms",
                d["url"].as_str().unwrap_or("?"),
                s["instance"].as_str().unwrap_or("?"),
                s["lag_records"],
                s["lag_ms"]
            );
            for p in s["partitions"].as_array().unwrap_or(&empty) {
                println!(
                    "  partition {}  at {}  end {}  lag {} records, {} ms",
                    p["partition"], p["next_offset"], p["high_watermark"], p["lag_records"], p["lag_ms"]
                );
            }
        }
        for u in &unreachable {
            eprintln!("esk: unreachable: {u}");
        }
    }
    match unreachable.first() {
        Some(first) if docs.is_empty() => {
            let mut f = Failure::unavailable(format!("no replica answered: {first}"));
            f.json_printed = g.json;
            Err(f)
        }
        _ => Ok(()),
    }
}
