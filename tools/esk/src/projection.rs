//! `esk projection status` and `esk projection rebuild NAME`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::cli::Global;
use crate::exit::{Failure, Kind};
use crate::http::{call, message};

async fn fetch_status(g: &Global) -> Result<Value, Failure> {
    let (code, body) = call(&g.projector_url, "GET", "/status", g.timeout).await?;
    if code != 200 {
        return Err(Failure::unavailable(format!("{}/status: {code} {}", g.projector_url, message(&body))));
    }
    Ok(body)
}

pub async fn status(g: &Global) -> Result<(), Failure> {
    let body = fetch_status(g).await?;
    if g.json {
        println!("{body}");
        return Ok(());
    }
    let empty = Vec::new();
    for p in body["projections"].as_array().unwrap_or(&empty) {
        println!(
            "{}  version {}  applied {}  parked {}  lag {} records, {} ms  {:.0} events/s",
            p["name"].as_str().unwrap_or("?"),
            p["version"],
            p["applied"],
            p["parked"],
            p["lag"],
            p["lag_ms"],
            p["events_per_second"].as_f64().unwrap_or(0.0)
        );
        for part in p["partitions"].as_array().unwrap_or(&empty) {
            println!(
                "  {}/{}  at {}  end {}  lag {} records, {} ms",
                part["topic"].as_str().unwrap_or("?"),
                part["partition"],
                part["next_offset"],
                part["high_watermark"],
                part["lag_records"],
                part["lag_ms"]
            );
        }
        if let Some(r) = p["rebuild"].as_object() {
            println!(
                "  rebuild v{}: {} ({} events applied)",
                r["version"],
                r["phase"].as_str().unwrap_or("?"),
                r["applied"]
            );
        }
    }
    Ok(())
}

fn projection<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["projections"].as_array()?.iter().find(|p| p["name"] == name)
}

pub async fn rebuild(g: &Global, name: &str, no_wait: bool) -> Result<(), Failure> {
    let before = fetch_status(g).await?;
    let (code, body) = call(&g.projector_url, "POST", &format!("/projections/{name}/rebuild"), g.timeout).await?;
    match code {
        202 => {}
        401 => return Err(Failure::invalid(crate::http::unauthorized(&body))),
        404 => return Err(Failure::invalid(message(&body))),
        409 => return Err(Failure::new(Kind::Internal, message(&body))),
        _ => {
            return Err(Failure::unavailable(format!("rebuild {name}: {code} {}", message(&body))));
        }
    }
    let version = body["version"].as_u64().unwrap_or(0);
    if no_wait {
        if g.json {
            println!("{}", json!({"projection": name, "version": version, "phase": "building"}));
        } else {
            println!("rebuilding {name} as version {version}");
        }
        return Ok(());
    }
    // The events to apply: roughly what the live copy has applied.
    let total: u64 = projection(&before, name)
        .and_then(|p| p["partitions"].as_array())
        .map_or(0, |ps| ps.iter().filter_map(|p| p["high_watermark"].as_u64()).sum());
    let bar = if std::io::stderr().is_terminal() && !g.json {
        let b = ProgressBar::new(total.max(1));
        b.set_style(ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} {per_sec}").expect("a valid template"));
        b.set_message(format!("rebuilding {name} v{version}"));
        b
    } else {
        ProgressBar::hidden()
    };
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let status = fetch_status(g).await?;
        let Some(p) = projection(&status, name) else {
            return Err(Failure::new(Kind::Internal, format!("projection {name} vanished from /status")));
        };
        let r = &p["rebuild"];
        bar.set_position(r["applied"].as_u64().unwrap_or(0));
        match r["phase"].as_str() {
            Some("switched") if p["version"].as_u64() == Some(version) => {
                bar.finish_and_clear();
                let secs = started.elapsed().as_secs_f64();
                if g.json {
                    println!(
                        "{}",
                        json!({"projection": name, "version": version, "phase": "switched",
                        "applied": r["applied"], "seconds": secs})
                    );
                } else {
                    println!(
                        "{name} rebuilt as version {version} ({} events) in {secs:.1}s and switched",
                        r["applied"]
                    );
                }
                return Ok(());
            }
            Some("failed") => {
                bar.finish_and_clear();
                return Err(Failure::new(Kind::Internal, format!("rebuild of {name} failed: {}", r["error"])));
            }
            _ => {}
        }
    }
}
