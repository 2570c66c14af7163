//! `esk produce`: many appends from JSON lines, pipelined.
//!
//! The whole input is checked first (JSON, stream names, expected versions,
//! the schemas of strict categories); one bad line stops everything before
//! anything is written. Then requests are sent in file order with up to
//! `--in-flight` awaiting replies, so lines of one stream are appended in order.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal};
use std::time::Instant;

use esk_client::ClientError;
use esk_domain::Registry;
use esk_wire::SchemaRegistry;
use esk_wire::protocol::{ExpectedVersion, NewEvent, RequestBody};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::cli::{Global, ProduceArgs};
use crate::events::connect;
use crate::exit::{Failure, Kind};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    stream: String,
    #[serde(rename = "type")]
    event_type: String,
    data: Value,
    #[serde(default)]
    expected_version: ExpectedVersion,
    #[serde(default)]
    id: Option<String>,
}

struct Checked {
    line: usize,
    stream: String,
    body: RequestBody,
}

fn read_input(file: &str) -> Result<Vec<(usize, String)>, Failure> {
    let reader: Box<dyn BufRead> = if file == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(file).map_err(|e| Failure::invalid(format!("cannot read {file}: {e}")))?;
        Box::new(std::io::BufReader::new(f))
    };
    let mut lines = Vec::new();
    for (i, l) in reader.lines().enumerate() {
        let l = l.map_err(|e| Failure::invalid(format!("{file}: line {}: {e}", i + 1)))?;
        if !l.trim().is_empty() {
            lines.push((i + 1, l));
        }
    }
    Ok(lines)
}

fn check(lines: Vec<(usize, String)>, schemas: &SchemaRegistry) -> Result<Vec<Checked>, Failure> {
    let aggregates = Registry::builtin();
    let mut ok = Vec::with_capacity(lines.len());
    let mut bad = Vec::new();
    for (n, text) in lines {
        let parsed = serde_json::from_str::<Line>(&text)
            .map_err(|e| format!("not a {{\"stream\",\"type\",\"data\"}} object: {e}"))
            .and_then(|l| {
                let stream = esk_wire::StreamName::parse(&l.stream).map_err(|e| e.to_string())?;
                if aggregates.get(stream.category()).is_some() {
                    return Err(format!("category '{}' is owned by its aggregate: use esk command", stream.category()));
                }
                schemas.validate(stream.category(), &l.event_type, &l.data).map_err(|e| e.to_string())?;
                if let Some(id) = &l.id {
                    uuid::Uuid::parse_str(id).map_err(|e| format!("id '{id}' is not a UUID: {e}"))?;
                }
                Ok(l)
            });
        match parsed {
            Ok(l) => ok.push(Checked {
                line: n,
                stream: l.stream,
                body: RequestBody::Append {
                    expected_version: l.expected_version,
                    events: vec![NewEvent { id: l.id, event_type: l.event_type, data: l.data }],
                },
            }),
            Err(e) => bad.push(format!("line {n}: {e}")),
        }
    }
    if bad.is_empty() {
        return Ok(ok);
    }
    let shown: Vec<&str> = bad.iter().take(20).map(String::as_str).collect();
    let more = if bad.len() > 20 { format!("\n... and {} more", bad.len() - 20) } else { String::new() };
    Err(Failure::invalid(format!("{} invalid line(s), nothing was sent:\n{}{more}", bad.len(), shown.join("\n"))))
}

fn kind_of(e: &ClientError) -> Kind {
    match e {
        ClientError::WrongExpectedVersion { .. } => Kind::WrongExpectedVersion,
        ClientError::Invalid(_) => Kind::InvalidInput,
        ClientError::Refused(_) => Kind::Refused,
        ClientError::Unavailable(_) => Kind::Unavailable,
        ClientError::Internal(_) => Kind::Internal,
        ClientError::Expired(_) => Kind::Expired,
    }
}

pub async fn produce(g: &Global, args: ProduceArgs) -> Result<(), Failure> {
    let checked = check(read_input(&args.file)?, &g.schemas()?)?;
    let total = checked.len();
    let client = connect(g, true).await?;
    let bar = if std::io::stderr().is_terminal() && !g.json {
        let b = ProgressBar::new(total as u64);
        b.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta}").expect("a valid template"),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let started = Instant::now();
    let mut appended = 0usize;
    let mut failures: Vec<(usize, Kind, String)> = Vec::new();
    let mut submit_error = None;
    {
        // Submitting is synchronous and in file order; replies are awaited concurrently.
        let client = &client;
        let mut replies = futures::stream::iter(checked.into_iter().map(|c| {
            let submitted = client.submit(&c.stream, c.body, None);
            async move {
                let result = match submitted {
                    Ok(s) => s.reply().await.and_then(|r| match r.outcome {
                        esk_wire::protocol::ReplyOutcome::Appended(_) => Ok(()),
                        other => Err(esk_client::outcome_error(other)),
                    }),
                    Err(e) => Err(e),
                };
                (c.line, result)
            }
        }))
        .buffer_unordered(args.in_flight as usize);
        while let Some((line, result)) = replies.next().await {
            bar.inc(1);
            match result {
                Ok(()) => appended += 1,
                Err(e @ ClientError::Unavailable(_)) if submit_error.is_none() => {
                    submit_error = Some(e.to_string());
                    failures.push((line, Kind::Unavailable, e.to_string()));
                }
                Err(e) => failures.push((line, kind_of(&e), e.to_string())),
            }
        }
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let rate = appended as f64 / secs.max(1e-9);
    failures.sort_by_key(|f| f.0);
    let mut by_code: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, k, _) in &failures {
        *by_code.entry(k.code()).or_default() += 1;
    }
    if g.json {
        let shown: Vec<Value> =
            failures.iter().take(100).map(|(l, k, m)| json!({"line": l, "error": k.code(), "message": m})).collect();
        println!(
            "{}",
            json!({"lines": total, "appended": appended, "failed": failures.len(), "errors": by_code,
                   "seconds": secs, "rate": rate, "failures": shown})
        );
    } else {
        for (l, _, m) in failures.iter().take(20) {
            eprintln!("esk: line {l}: {m}");
        }
        let failed = if failures.is_empty() {
            String::new()
        } else {
            let codes: Vec<String> = by_code.iter().map(|(c, n)| format!("{c} {n}")).collect();
            format!(", {} failed ({})", failures.len(), codes.join(", "))
        };
        println!("produced {total} lines in {secs:.2}s ({rate:.0}/s): {appended} appended{failed}");
    }
    match failures.first() {
        None => Ok(()),
        Some((line, kind, message)) => {
            let mut f = Failure::new(
                *kind,
                format!("{} of {total} lines failed; first, line {line}: {message}", failures.len()),
            );
            f.json_printed = g.json;
            Err(f)
        }
    }
}
