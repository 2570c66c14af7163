//! `esk produce`: many appends from JSON lines, pipelined.
//!
//! The whole input is checked first (JSON, stream names, expected versions,
//! the schemas of strict categories); one bad line stops everything before
//! anything is written. Then each stream's lines, in file order, are merged
//! into requests of up to `--merge` lines where their expected versions allow
//! (see [`merge`]): a request is one append, all of its lines or none. The
//! requests are sent in the order of their first lines with up to
//! `--in-flight` awaiting replies, so lines of one stream are appended in
//! order; lines of different streams may be appended in another order than
//! the file's.

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
    expected: ExpectedVersion,
    event: NewEvent,
}

/// One append request of `esk produce`: lines of one stream, in file order.
#[derive(Debug)]
struct Merged {
    stream: String,
    /// The lines it carries, in order.
    lines: Vec<usize>,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
    /// Its events' JSON, summed (to stay within a request's size).
    bytes: usize,
}

impl Merged {
    /// Whether a line expecting `e` has, appended as part of this request,
    /// the outcome it would have alone after the lines before it: the
    /// request cannot fail for a version (it expects any), and the line
    /// expects any, or that the stream exists (its first events made it).
    /// A line expecting a version goes alone: had a line before it failed,
    /// it could still succeed alone (a file run again after part of it was
    /// appended), and in a request it would fail with it.
    fn admits(&self, e: ExpectedVersion) -> bool {
        self.expected == ExpectedVersion::Any && matches!(e, ExpectedVersion::Any | ExpectedVersion::Exists)
    }
}

/// Room kept in a request for everything but its events' data.
const REQUEST_ROOM_BYTES: usize = 4096;

/// Each stream's lines, in file order, as requests of up to `max_lines` lines
/// (and `max_bytes` of events): a line joins its stream's open request when
/// its outcome there is the one it would have alone ([`Merged::admits`]),
/// else it opens the next one. The requests come in the order of their first lines, so a stream's
/// requests are in file order.
fn merge(checked: Vec<Checked>, max_lines: usize, max_bytes: usize) -> Vec<Merged> {
    let mut requests: Vec<Merged> = Vec::new();
    let mut open: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for c in checked {
        let bytes = serde_json::to_vec(&c.event).map_or(max_bytes, |v| v.len());
        if let Some(&i) = open.get(&c.stream) {
            let r = &mut requests[i];
            if r.lines.len() < max_lines && r.bytes + bytes <= max_bytes && r.admits(c.expected) {
                r.lines.push(c.line);
                r.events.push(c.event);
                r.bytes += bytes;
                continue;
            }
        }
        open.insert(c.stream.clone(), requests.len());
        requests.push(Merged {
            stream: c.stream,
            lines: vec![c.line],
            expected: c.expected,
            events: vec![c.event],
            bytes,
        });
    }
    requests
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
                expected: l.expected_version,
                event: NewEvent { id: l.id, event_type: l.event_type, data: l.data },
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

/// `3, 7, 11` or `3, 7, ... 99 (25 lines)`.
fn describe_lines(lines: &[usize]) -> String {
    match lines {
        [a, b, .., z] if lines.len() > 3 => format!("{a}, {b}, ... {z} ({} lines)", lines.len()),
        _ => lines.iter().map(usize::to_string).collect::<Vec<_>>().join(", "),
    }
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
    let budget = client.limits().request_bytes().saturating_sub(REQUEST_ROOM_BYTES).max(1);
    let max_lines = (args.merge as usize).min(esk_wire::limits::MAX_EVENTS_PER_REQUEST);
    let requests = merge(checked, max_lines, budget);
    let sent = requests.len();
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
        let mut replies = futures::stream::iter(requests.into_iter().map(|r| {
            let body = RequestBody::Append { expected_version: r.expected, events: r.events };
            let submitted = client.submit(&r.stream, body, None);
            async move {
                let result = match submitted {
                    Ok(s) => s.reply().await.and_then(|reply| match reply.outcome {
                        esk_wire::protocol::ReplyOutcome::Appended(_) => Ok(()),
                        other => Err(esk_client::outcome_error(other)),
                    }),
                    Err(e) => Err(e),
                };
                (r.lines, result)
            }
        }))
        .buffer_unordered(args.in_flight as usize);
        while let Some((lines, result)) = replies.next().await {
            bar.inc(lines.len() as u64);
            match result {
                Ok(()) => appended += lines.len(),
                Err(e) => {
                    let kind = kind_of(&e);
                    if matches!(e, ClientError::Unavailable(_)) && submit_error.is_none() {
                        submit_error = Some(e.to_string());
                    }
                    let message = if lines.len() > 1 {
                        format!("{e} (appended with lines {}, all or none)", describe_lines(&lines))
                    } else {
                        e.to_string()
                    };
                    failures.extend(lines.into_iter().map(|l| (l, kind, message.clone())));
                }
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
            json!({"lines": total, "requests": sent, "appended": appended, "failed": failures.len(), "errors": by_code,
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
        println!("produced {total} lines in {sent} requests in {secs:.2}s ({rate:.0}/s): {appended} appended{failed}");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn line(line: usize, stream: &str, expected: ExpectedVersion) -> Checked {
        let event = NewEvent { id: None, event_type: "Noted".into(), data: json!({"line": line}) };
        Checked { line, stream: stream.into(), expected, event }
    }

    fn shape(requests: &[Merged]) -> Vec<(&str, Vec<usize>)> {
        requests.iter().map(|r| (r.stream.as_str(), r.lines.clone())).collect()
    }

    #[test]
    fn a_streams_lines_merge_in_file_order_and_the_requests_follow_their_first_lines() {
        use ExpectedVersion::Any;
        let lines = vec![line(1, "a-1", Any), line(2, "b-1", Any), line(3, "a-1", Any), line(4, "b-1", Any)];
        let merged = merge(lines, 100, usize::MAX);
        assert_eq!(shape(&merged), vec![("a-1", vec![1, 3]), ("b-1", vec![2, 4])]);
        assert_eq!(merged[0].events.len(), 2);
        assert_eq!(merged[0].events[1].data["line"], 3);
    }

    #[test]
    fn a_line_joins_only_where_its_outcome_is_the_one_it_would_have_alone() {
        use ExpectedVersion::{Any, Exact, Exists, NoStream};
        // Any and exists join a request expecting any.
        let m = merge(
            vec![line(1, "a-1", Any), line(2, "a-1", Exists), line(3, "a-1", Any), line(4, "a-1", Exact(3))],
            100,
            usize::MAX,
        );
        assert_eq!(shape(&m), vec![("a-1", vec![1, 2, 3]), ("a-1", vec![4])]);
        // A line expecting a version goes alone, and nothing joins it: had
        // line 1 failed (the stream at 6, a file run again), line 2 would
        // still succeed alone, and line 3 too.
        let m = merge(vec![line(1, "a-1", Exact(5)), line(2, "a-1", Exact(6)), line(3, "a-1", Any)], 100, usize::MAX);
        assert_eq!(shape(&m), vec![("a-1", vec![1]), ("a-1", vec![2]), ("a-1", vec![3])]);
        let m = merge(vec![line(1, "a-1", NoStream), line(2, "a-1", Exists), line(3, "a-1", Any)], 100, usize::MAX);
        assert_eq!(shape(&m), vec![("a-1", vec![1]), ("a-1", vec![2]), ("a-1", vec![3])]);
        // A request opened by exists could fail for a version: any does not join it.
        let m = merge(vec![line(1, "a-1", Exists), line(2, "a-1", Any)], 100, usize::MAX);
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn requests_stay_within_their_line_and_byte_bounds() {
        use ExpectedVersion::Any;
        let lines: Vec<Checked> = (1..=7).map(|n| line(n, "a-1", Any)).collect();
        assert_eq!(
            shape(&merge(lines, 3, usize::MAX)),
            vec![("a-1", vec![1, 2, 3]), ("a-1", vec![4, 5, 6]), ("a-1", vec![7])]
        );
        let one = serde_json::to_vec(&line(1, "a-1", Any).event).unwrap().len();
        let lines: Vec<Checked> = (1..=5).map(|n| line(n, "a-1", Any)).collect();
        let m = merge(lines, 100, 2 * one + 1);
        assert!(m.iter().all(|r| r.bytes <= 2 * one + 1 && r.lines.len() <= 2), "{m:?}");
        assert_eq!(m.iter().map(|r| r.lines.len()).sum::<usize>(), 5);
        // 1 merges nothing.
        let lines: Vec<Checked> = (1..=3).map(|n| line(n, "a-1", Any)).collect();
        assert_eq!(merge(lines, 1, usize::MAX).len(), 3);
    }
}
