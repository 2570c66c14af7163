//! The web console (static assets in `console/`, embedded in the binary)
//! and the data it shows: categories and their newest events, the
//! coordinator's transactions, projections, dead letters (replayed with the
//! admin token), and the services' health.
//!
//! What the console reads from Kafka is bounded: the newest
//! [`MAX_RECENT`] records of each partition it looks at, within the
//! gateway's timeout.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{Method, header};
use axum::response::{IntoResponse, Response};
use esk_kafka::KafkaConfig;
use esk_kafka::record::{DLQ_OFFSET, DLQ_PARTITION, DLQ_REASON, DLQ_TOPIC, headers_of};
use esk_wire::protocol::{TxRecord, TxState};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::App;
use crate::api::EventDoc;
use crate::problem::{Class, Problem};

/// Records the console shows at most from the end of each partition (it
/// reads twice as many offsets back).
pub const MAX_RECENT: i64 = 200;

const INDEX: &str = include_str!("../console/index.html");
const APP_JS: &str = include_str!("../console/app.js");
const APP_CSS: &str = include_str!("../console/app.css");

/// The admin token guards the console's replays alone (when one is set).
pub fn admin_only(method: &Method, path: &str) -> bool {
    *method == Method::POST && path.starts_with("/dead-letters/")
}

pub async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX)
}

pub async fn asset(Path(name): Path<String>) -> Response {
    match name.as_str() {
        "app.js" => page("text/javascript; charset=utf-8", APP_JS),
        "app.css" => page("text/css; charset=utf-8", APP_CSS),
        "index.html" => page("text/html; charset=utf-8", INDEX),
        _ => Problem::not_found(format!("the console has no {name}")).into_response(),
    }
}

fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            // Nothing but the gateway itself: no CDN, no inline script.
            (header::CONTENT_SECURITY_POLICY, "default-src 'self'; style-src 'self'; img-src 'self' data:"),
        ],
        body,
    )
        .into_response()
}

/// `http://host:port` of a service, checked at start.
pub fn address(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("service URL '{url}' must start with http:// (for example http://127.0.0.1:8702)"))?;
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        return Err(format!("service URL '{url}' must be http://host:port"));
    }
    Ok(if host.contains(':') { host.to_owned() } else { format!("{host}:80") })
}

/// A request to one of esk's services (plain HTTP/1.0, JSON): its status and
/// body, within `timeout`.
pub async fn call(
    url: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(u16, Value), String> {
    let addr = address(url)?;
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(&addr).await.map_err(|e| e.to_string())?;
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n{auth}Content-Length: 0\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        // A service's answer is small: read at most 8 MiB.
        (&mut s).take(8 << 20).read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(buf)
    };
    let buf = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("{url}{path}: no answer within {timeout:?}"))?
        .map_err(|e| format!("{url}{path}: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("{url}{path}: not an HTTP response"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{url}{path}: not an HTTP response"))?;
    Ok((status, serde_json::from_str(body).unwrap_or(Value::String(body.to_owned()))))
}

const PROBE: Duration = Duration::from_secs(2);

/// Each configured service: healthy, ready (with the reasons) and its status.
#[utoipa::path(get, path = "/services", tag = "console",
    responses((status = 200, description = "`{\"services\": [{name, url, healthy, ready, reasons, status}]}`", body = Object)))]
pub async fn services(State(app): State<Arc<App>>) -> Json<Value> {
    let c = &app.config;
    let all: Vec<(&str, &String)> = [
        ("writer", &c.writer_url),
        ("projector", &c.projector_url),
        ("replica", &c.replica_url),
        ("coordinator", &c.coordinator_url),
    ]
    .into_iter()
    .flat_map(|(name, urls)| urls.iter().map(move |u| (name, u)))
    .collect();
    let probes = all.into_iter().map(|(name, url)| async move {
        let health = call(url, "GET", "/health", None, PROBE).await;
        let ready = call(url, "GET", "/ready", None, PROBE).await;
        let status = call(url, "GET", "/status", None, PROBE).await;
        let reasons: Vec<Value> = match &ready {
            Ok((200, _)) => Vec::new(),
            Ok((_, v)) => v.get("reasons").and_then(Value::as_array).cloned().unwrap_or_else(|| vec![v.clone()]),
            Err(e) => vec![json!(e)],
        };
        json!({
            "name": name,
            "url": url,
            "healthy": matches!(health, Ok((200, _))),
            "ready": matches!(ready, Ok((200, _))),
            "reasons": reasons,
            "status": status.ok().filter(|(s, _)| *s == 200).map(|(_, v)| v),
        })
    });
    let mut services = futures::future::join_all(probes).await;
    services.push(json!({
        "name": "gateway", "url": format!("http://{}", app.config.http_addr), "healthy": true,
        "ready": app.client.get().is_some(), "reasons": [], "status": null,
    }));
    Json(json!({ "services": services }))
}

/// Every projector's projections (lag, events/s, rebuild progress), each
/// with the projector that runs it.
#[utoipa::path(get, path = "/projections", tag = "console",
    responses((status = 200, description = "`{\"projections\": [...], \"unreachable\": [...]}`", body = Object)))]
pub async fn projections(State(app): State<Arc<App>>) -> Json<Value> {
    let (projections, unreachable) = projections_of(&app).await;
    Json(json!({ "projections": projections, "unreachable": unreachable }))
}

async fn projections_of(app: &App) -> (Vec<Value>, Vec<Value>) {
    let mut projections = Vec::new();
    let mut unreachable = Vec::new();
    let asked =
        app.config.projector_url.iter().map(|url| async move { (url, call(url, "GET", "/status", None, PROBE).await) });
    for (url, answer) in futures::future::join_all(asked).await {
        match answer {
            Ok((200, v)) => {
                for mut p in v.get("projections").and_then(Value::as_array).cloned().unwrap_or_default() {
                    p["projector"] = json!(url);
                    p["instance"] = v.get("instance").cloned().unwrap_or(Value::Null);
                    projections.push(p);
                }
            }
            Ok((status, v)) => unreachable.push(json!({"url": url, "error": format!("status {status}: {v}")})),
            Err(e) => unreachable.push(json!({"url": url, "error": e})),
        }
    }
    (projections, unreachable)
}

/// The parked events of every projection the projectors run, and of the
/// default context's writers, newest first ([`MAX_RECENT`] a partition).
#[utoipa::path(get, path = "/dead-letters", tag = "console",
    responses((status = 200, description = "`{\"consumers\": [{consumer, topic, parked: [...]}]}`", body = Object),
              (status = 503, description = "Kafka unreachable", body = Problem, content_type = "application/problem+json")))]
pub async fn dead_letters(State(app): State<Arc<App>>) -> Result<Json<Value>, Problem> {
    let (projections, _) = projections_of(&app).await;
    let mut names: Vec<String> =
        projections.iter().filter_map(|p| p.get("name").and_then(Value::as_str).map(str::to_owned)).collect();
    names.sort();
    names.dedup();
    let mut wanted: Vec<(String, String)> = names.into_iter().map(|n| (n.clone(), app.topics.dlq(&n))).collect();
    wanted.push(("writer".into(), app.topics.writer_dlq()));
    let kafka = app.kafka.clone();
    let group = format!("{}-gateway", app.topics.prefix());
    let consumers = tokio::task::spawn_blocking(move || -> Result<Vec<Value>, String> {
        let consumer: BaseConsumer<Tail> =
            kafka.tail_reader(&group).create_with_context(Tail).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for (name, topic) in wanted {
            let mut parked: Vec<Value> = recent(&consumer, &kafka, &topic, MAX_RECENT, |m| Some(parked_doc(m)))?;
            parked.sort_by(|a, b| b["time_ms"].as_i64().cmp(&a["time_ms"].as_i64()));
            out.push(json!({"consumer": name, "topic": topic, "parked": parked}));
        }
        esk_kafka::destroy_later(consumer);
        Ok(out)
    })
    .await
    .map_err(|e| Problem::internal(e.to_string()))?
    .map_err(Problem::unavailable)?;
    Ok(Json(json!({ "consumers": consumers })))
}

fn parked_doc(m: &BorrowedMessage<'_>) -> Value {
    let headers = headers_of(m);
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let event_header = |name: &str| header(name).map_or(Value::Null, Value::String);
    json!({
        "partition": m.partition(),
        "offset": m.offset(),
        "time_ms": m.timestamp().to_millis(),
        "reason": header(DLQ_REASON),
        "topic": header(DLQ_TOPIC),
        "source_partition": header(DLQ_PARTITION).and_then(|p| p.parse::<i64>().ok()),
        "source_offset": header(DLQ_OFFSET).and_then(|o| o.parse::<i64>().ok()),
        "stream": m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        "type": event_header("ce_type"),
        "bytes": m.payload().map_or(0, <[u8]>::len),
    })
}

/// Replays a projection's parked events (the projector that runs it does;
/// needs the admin token when one is set).
#[utoipa::path(post, path = "/dead-letters/{projection}/replay", tag = "console",
    params(("projection" = String, Path, description = "A projection's name", pattern = r"^[a-z][a-z0-9_]*$")),
    responses((status = 200, description = "What the projector replayed", body = Object),
              (status = 400, description = "Not a projection name", body = Problem, content_type = "application/problem+json"),
              (status = 401, description = "The admin token is needed", body = Problem, content_type = "application/problem+json"),
              (status = 404, description = "No projector runs it", body = Problem, content_type = "application/problem+json"),
              (status = 503, description = "The projector did not answer", body = Problem, content_type = "application/problem+json")),
    security(("admin_token" = [])))]
pub async fn replay(State(app): State<Arc<App>>, Path(name): Path<String>) -> Result<Json<Value>, Problem> {
    if !esk_wire::stream::is_valid_category(&name) {
        return Err(Problem::invalid(format!("'{}' is not a projection name", esk_wire::limits::shorten(&name, 80))));
    }
    let started = Instant::now();
    let (projections, unreachable) = projections_of(&app).await;
    let Some(url) = projections
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name.as_str()))
        .and_then(|p| p["projector"].as_str().map(str::to_owned))
    else {
        if !unreachable.is_empty() {
            return Err(Problem::unavailable(format!(
                "no projector that answered runs {name}; unreachable: {unreachable:?}"
            )));
        }
        return Err(Problem::not_found(format!("no projector runs a projection {name}")));
    };
    let token = app.config.http.admin_token.as_deref();
    // A replay takes as long as the projector takes, within the request's bound.
    let left = app.max_wait().saturating_sub(started.elapsed());
    let (status, body) =
        call(&url, "POST", &format!("/projections/{name}/replay"), token, left).await.map_err(Problem::unavailable)?;
    match status {
        200 => Ok(Json(body)),
        401 => {
            Err(Problem::new(Class::Unauthorized, format!("the projector at {url} refused the gateway's admin token")))
        }
        s if s >= 500 => Err(Problem::unavailable(format!("the projector at {url} answered {s}: {body}"))),
        s => Err(Problem::invalid(format!("the projector at {url} answered {s}: {body}"))),
    }
}

/// The categories: every events topic and its partitions.
#[utoipa::path(get, path = "/categories", tag = "console",
    responses((status = 200, description = "`{\"categories\": [{name, partitions}]}`", body = Object),
              (status = 503, description = "Kafka unreachable", body = Problem, content_type = "application/problem+json")))]
pub async fn categories(State(app): State<Arc<App>>) -> Result<Json<Value>, Problem> {
    let (kafka, prefix) = (app.kafka.clone(), app.topics.events_prefix());
    let group = format!("{}-gateway", app.topics.prefix());
    let found = tokio::task::spawn_blocking(move || -> Result<Vec<Value>, String> {
        let consumer: BaseConsumer = kafka.metadata(&group).create().map_err(|e| e.to_string())?;
        let md =
            consumer.fetch_metadata(None, kafka.timeout).map_err(|e| format!("Kafka at {}: {e}", kafka.bootstrap))?;
        let mut out: Vec<Value> = md
            .topics()
            .iter()
            .filter_map(|t| {
                let c = t.name().strip_prefix(&prefix)?;
                esk_wire::stream::is_valid_category(c).then(|| json!({"name": c, "partitions": t.partitions().len()}))
            })
            .collect();
        out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        esk_kafka::destroy_later(consumer);
        Ok(out)
    })
    .await
    .map_err(|e| Problem::internal(e.to_string()))?
    .map_err(Problem::unavailable)?;
    Ok(Json(json!({ "categories": found })))
}

/// A category's newest events, newest first.
#[utoipa::path(get, path = "/categories/{category}/events", tag = "console",
    params(("category" = String, Path, description = "A category", pattern = r"^[a-z][a-z0-9_]*$"),
           ("limit" = Option<u32>, Query, description = "At most this many (1 to 200, default 50)", minimum = 1, maximum = 200)),
    responses((status = 200, description = "`{\"events\": [Event...]}`", body = Object),
              (status = 400, description = "Invalid input", body = Problem, content_type = "application/problem+json"),
              (status = 404, description = "No such category", body = Problem, content_type = "application/problem+json"),
              (status = 503, description = "Kafka unreachable", body = Problem, content_type = "application/problem+json")))]
pub async fn category_events(
    State(app): State<Arc<App>>,
    Path(category): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, Problem> {
    if !esk_wire::stream::is_valid_category(&category) {
        return Err(Problem::invalid(format!("'{}' is not a category", esk_wire::limits::shorten(&category, 80))));
    }
    let limit = match params.get("limit").map(|l| l.parse::<i64>()) {
        None => 50,
        Some(Ok(n)) if (1..=MAX_RECENT).contains(&n) => n,
        Some(_) => return Err(Problem::invalid(format!("limit must be a whole number from 1 to {MAX_RECENT}"))),
    };
    let topic = app.topics.events(&category);
    let (kafka, schemas) = (app.kafka.clone(), app.schemas.clone());
    let group = format!("{}-gateway", app.topics.prefix());
    let events = tokio::task::spawn_blocking(move || -> Result<Option<Vec<EventDoc>>, String> {
        let consumer: BaseConsumer<Tail> =
            kafka.tail_reader(&group).create_with_context(Tail).map_err(|e| e.to_string())?;
        let md = consumer.fetch_metadata(Some(&topic), kafka.timeout).map_err(|e| e.to_string())?;
        if md.topics().first().is_none_or(|t| t.error().is_some() || t.partitions().is_empty()) {
            return Ok(None);
        }
        let mut events: Vec<EventDoc> = recent(&consumer, &kafka, &topic, limit, |m| {
            esk_client::decode(m, &schemas).ok().map(|e| EventDoc::of(&e))
        })?;
        // Newest first; one append's events share a time: by offset then.
        let place = |e: &EventDoc| -> (String, i64) {
            let offset = e.position.rsplit(':').next().and_then(|o| o.parse().ok()).unwrap_or(0);
            (e.time.clone(), offset)
        };
        events.sort_by_key(|e| std::cmp::Reverse(place(e)));
        events.truncate(limit as usize);
        esk_kafka::destroy_later(consumer);
        Ok(Some(events))
    })
    .await
    .map_err(|e| Problem::internal(e.to_string()))?
    .map_err(Problem::unavailable)?;
    match events {
        Some(events) => Ok(Json(json!({ "events": events }))),
        None => Err(Problem::not_found(format!("no category {category} (no topic {})", app.topics.events(&category)))),
    }
}

/// The coordinator's newest transactions (from its log), newest first,
/// each with its state, votes, and whether it is in doubt (past its votes'
/// deadline with no decision).
#[utoipa::path(get, path = "/transactions", tag = "transactions",
    params(("limit" = Option<u32>, Query, description = "At most this many (1 to 200, default 50)", minimum = 1, maximum = 200)),
    responses((status = 200, description = "`{\"transactions\": [...]}`", body = Object),
              (status = 400, description = "Invalid input", body = Problem, content_type = "application/problem+json"),
              (status = 503, description = "Kafka unreachable", body = Problem, content_type = "application/problem+json")))]
pub async fn transactions(
    State(app): State<Arc<App>>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, Problem> {
    let limit = match params.get("limit").map(|l| l.parse::<i64>()) {
        None => 50,
        Some(Ok(n)) if (1..=MAX_RECENT).contains(&n) => n,
        Some(_) => return Err(Problem::invalid(format!("limit must be a whole number from 1 to {MAX_RECENT}"))),
    };
    let (kafka, topic) = (app.kafka.clone(), app.topics.tx_log());
    let group = format!("{}-gateway", app.topics.prefix());
    let records = tokio::task::spawn_blocking(move || -> Result<Vec<TxRecord>, String> {
        let consumer: BaseConsumer<Tail> =
            kafka.tail_reader(&group).create_with_context(Tail).map_err(|e| e.to_string())?;
        let r = recent(&consumer, &kafka, &topic, MAX_RECENT, |m| {
            m.payload().and_then(|p| serde_json::from_slice::<TxRecord>(p).ok())
        });
        esk_kafka::destroy_later(consumer);
        r
    })
    .await
    .map_err(|e| Problem::internal(e.to_string()))?
    .map_err(Problem::unavailable)?;
    // The newest record of each transaction (they come in log order per partition).
    let mut latest: HashMap<String, TxRecord> = HashMap::new();
    for r in records {
        latest.insert(r.txid.clone(), r);
    }
    let mut all: Vec<TxRecord> = latest.into_values().collect();
    all.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then_with(|| a.txid.cmp(&b.txid)));
    all.truncate(limit as usize);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let docs: Vec<Value> = all
        .iter()
        .map(|r| {
            let mut doc = serde_json::to_value(crate::api::TxStatusDoc::of(&esk_wire::protocol::TxStatus::of(r)))
                .unwrap_or(Value::Null);
            doc["created_ms"] = json!(r.created_ms);
            doc["deadline_ms"] = json!(r.deadline_ms);
            doc["decided_ms"] = json!(r.decided_ms);
            doc["in_doubt"] = json!(r.state == TxState::Preparing && r.deadline_ms < now);
            doc
        })
        .collect();
    Ok(Json(json!({ "transactions": docs })))
}

/// The context of the console's readers: a partition's end is what they
/// wait for, not an error to log (librdkafka reports it as one too).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tail;

impl rdkafka::ClientContext for Tail {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if !matches!(error, rdkafka::error::KafkaError::PartitionEOF(_)) {
            tracing::warn!("Kafka: {error}: {reason}");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for Tail {}

/// What `keep` makes of the records among the newest `2n + 16` offsets of
/// each partition of `topic` (at least its newest `n` records, Kafka
/// transactions' markers taking an offset each), in log order per
/// partition; none when the topic does not exist.
fn recent<T>(
    consumer: &BaseConsumer<Tail>,
    kafka: &KafkaConfig,
    topic: &str,
    n: i64,
    keep: impl Fn(&BorrowedMessage<'_>) -> Option<T>,
) -> Result<Vec<T>, String> {
    let md = consumer
        .fetch_metadata(Some(topic), kafka.timeout)
        .map_err(|e| format!("Kafka at {}: {e}", kafka.bootstrap))?;
    let Some(t) = md.topics().first().filter(|t| t.error().is_none()) else { return Ok(Vec::new()) };
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in t.partitions() {
        let (low, high) = esk_kafka::watermarks(consumer.client(), topic, p.id(), kafka.timeout)
            .map_err(|e| format!("Kafka: {topic}/{}: {e}", p.id()))?;
        if high > low {
            // Kafka transactions' markers take offsets too: twice as far back.
            tpl.add_partition_offset(topic, p.id(), Offset::Offset((high - 2 * n - 16).max(low)))
                .map_err(|e| e.to_string())?;
            ends.insert(p.id(), high);
        }
    }
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let deadline = Instant::now() + kafka.timeout;
    // A partition is done at its end (the last offsets may be transaction
    // markers, which a read_committed reader never sees: the reader's
    // partition EOF says so); what was written since is not read.
    while !ends.is_empty() && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let Some(end) = ends.get(&m.partition()).copied() else { continue };
                if m.offset() >= end - 1 {
                    ends.remove(&m.partition());
                }
                if m.offset() < end
                    && let Some(t) = keep(&m)
                {
                    out.push(t);
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                ends.remove(&p);
            }
            Some(Err(e)) => return Err(format!("Kafka: {topic}: {e}")),
            None => {}
        }
    }
    let _ = consumer.unassign();
    Ok(out)
}
