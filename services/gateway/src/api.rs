#![allow(unused_qualifications, reason = "utoipa's path macro names the parameter types it documents by path")]

//! The HTTP API over the platform: appends, commands, stream reads,
//! transactions and subscriptions, with the CLI's guarantees and error
//! classes (see [`crate::problem`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use esk_client::{Client, ReadEvent};
use esk_wire::StreamName;
use esk_wire::protocol::{Appended, CommandData, ExpectedVersion, NewEvent, Participant, Position, TxStatus};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::App;
use crate::problem::{Class, Problem};
use crate::subscribe::{self, Item, Spec};

/// The header carrying a write's position token.
pub const POSITION_HEADER: &str = "esk-position";
/// Events a page of a stream read holds at most.
pub const MAX_PAGE: u64 = 1000;

/// `any`, `no-stream`, `exists`, or the version the stream's last event must have.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Expected {
    Keyword(Keyword),
    Version(u64),
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
pub enum Keyword {
    #[serde(rename = "any")]
    Any,
    #[serde(rename = "no-stream")]
    NoStream,
    #[serde(rename = "exists")]
    Exists,
}

impl Expected {
    fn version(v: Option<&Expected>) -> ExpectedVersion {
        match v {
            None | Some(Expected::Keyword(Keyword::Any)) => ExpectedVersion::Any,
            Some(Expected::Keyword(Keyword::NoStream)) => ExpectedVersion::NoStream,
            Some(Expected::Keyword(Keyword::Exists)) => ExpectedVersion::Exists,
            Some(Expected::Version(n)) => ExpectedVersion::Exact(*n),
        }
    }
}

/// An event to append.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEventDoc {
    /// The event type, e.g. `Deposited`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The event's data: any JSON (the category's schema, if it has one, decides).
    #[schema(value_type = Object)]
    pub data: Value,
    /// The event id (a UUID); made by the writer when absent. The same ids at
    /// the same expected version again are answered with the first result.
    #[serde(default)]
    pub id: Option<String>,
}

/// Events to append to one stream, atomically.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AppendBody {
    /// Default `any`.
    #[serde(default)]
    pub expected_version: Option<Expected>,
    /// One or more events.
    pub events: Vec<NewEventDoc>,
}

/// A command for the stream's aggregate.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandBody {
    /// Default `any`.
    #[serde(default)]
    pub expected_version: Option<Expected>,
    /// The command's data (default `{}`).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub data: Option<Value>,
}

/// What a write did.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AppendedDoc {
    pub stream: String,
    /// The first version written (`last_version + 1` when nothing was: a
    /// command that decided no events).
    pub first_version: u64,
    pub last_version: u64,
    /// The read-your-writes token of the write: pass it as `after=` or `from=`.
    pub position: String,
}

impl From<Appended> for AppendedDoc {
    fn from(a: Appended) -> Self {
        Self { stream: a.stream, first_version: a.first_version, last_version: a.last_version, position: a.position }
    }
}

/// An event as read.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventDoc {
    pub stream: String,
    pub version: u64,
    #[serde(rename = "type")]
    pub event_type: String,
    #[schema(value_type = Object)]
    pub data: Value,
    pub id: String,
    /// RFC 3339.
    pub time: String,
    /// Where the event is: a position token.
    pub position: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
}

impl EventDoc {
    pub fn of(e: &ReadEvent) -> Self {
        Self {
            stream: e.event.stream.to_string(),
            version: e.event.version,
            event_type: e.event.event_type.clone(),
            data: e.event.data.clone(),
            id: e.event.id.clone(),
            time: esk_wire::envelope::format_time(&e.event.time),
            position: e.position.to_string(),
            correlation_id: e.event.correlation_id.clone(),
            causation_id: e.event.causation_id.clone(),
        }
    }
}

/// A page of a stream.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StreamPage {
    pub stream: String,
    /// The stream's last version when it was read.
    pub version: u64,
    pub events: Vec<EventDoc>,
    /// The `from` of the next page in the same direction; null at the end.
    pub next: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    #[default]
    Forwards,
    Backwards,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReadParams {
    /// The first version to read (forwards: default 1; backwards: default the last).
    #[param(minimum = 1)]
    pub from: Option<u64>,
    pub direction: Option<Direction>,
    /// Events a page holds (1 to 1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u64>,
    /// A position token: reads go to the stream's writer, so a read always
    /// includes every write acknowledged before it; the token is checked.
    pub after: Option<String>,
}

/// One participant of a transaction: a command for one stream.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ParticipantDoc {
    pub stream: String,
    pub command: String,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub data: Option<Value>,
}

/// A transaction across streams: all of it is written, or none.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransactionBody {
    /// The transaction id (default: the Idempotency-Key, else a new UUID).
    /// The same txid again is answered with the first outcome.
    #[serde(default)]
    pub txid: Option<String>,
    pub participants: Vec<ParticipantDoc>,
    /// The deadline for the participants' votes, in ms (100 to 300000, default 10000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// A participant's state in a transaction.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ParticipantStateDoc {
    pub stream: String,
    pub command: CommandDoc,
    /// Absent until it voted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vote: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub acked: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CommandDoc {
    #[serde(rename = "type")]
    pub command_type: String,
    #[schema(value_type = Object)]
    pub data: Value,
}

/// A transaction's state.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TxStatusDoc {
    pub txid: String,
    /// preparing, committing, aborting, committed, aborted or unknown.
    pub state: String,
    /// committed, aborted, pending or unknown.
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub participants: Vec<ParticipantStateDoc>,
}

impl TxStatusDoc {
    pub fn of(s: &TxStatus) -> Self {
        let state = serde_json::to_value(s.state).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        Self {
            txid: s.txid.clone(),
            state,
            outcome: s.outcome.clone(),
            reason: s.reason.clone(),
            participants: s
                .participants
                .iter()
                .map(|p| ParticipantStateDoc {
                    stream: p.stream.clone(),
                    command: CommandDoc { command_type: p.command.command_type.clone(), data: p.command.data.clone() },
                    vote: p.vote,
                    reason: p.reason.clone(),
                    acked: p.acked,
                    context: p.context.clone(),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SubscribeParams {
    /// `start`, `end` (the default: live from now), the `id` of an event a
    /// subscription sent (a cursor), or a write's position token (after that
    /// write). `Last-Event-ID` wins over it.
    pub from: Option<String>,
    /// End the stream after this many events.
    #[param(minimum = 1)]
    pub limit: Option<u64>,
}

/// The client, once the gateway reached Kafka; 503 before.
fn client(app: &App) -> Result<Arc<Client>, Problem> {
    app.client.get().cloned().ok_or_else(|| {
        let why = app.connect_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Problem::unavailable(format!(
            "the gateway has not reached Kafka at {} yet{}",
            app.kafka.bootstrap,
            why.map(|w| format!(": {w}")).unwrap_or_default()
        ))
    })
}

/// A JSON body: application/json (415 else), decoded (400 naming what is wrong).
fn body<T: serde::de::DeserializeOwned>(headers: &HeaderMap, bytes: &Bytes) -> Result<T, Problem> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .is_some_and(|v| v == "application/json" || (v.starts_with("application/") && v.ends_with("+json")));
    if !json {
        return Err(Problem::new(Class::UnsupportedMediaType, "send the body as Content-Type: application/json"));
    }
    serde_json::from_slice(bytes).map_err(|e| Problem::invalid(format!("the body is not what this request takes: {e}")))
}

fn stream_name(text: &str) -> Result<StreamName, Problem> {
    StreamName::parse(text).map_err(|e| Problem::invalid(e.to_string()))
}

/// The Idempotency-Key header: the request id (or txid).
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let Some(v) = headers.get("idempotency-key") else { return Ok(None) };
    let key = v.to_str().map_err(|_| Problem::invalid("the Idempotency-Key header must be ASCII"))?.trim().to_owned();
    esk_wire::limits::check_request_id(&key).map_err(|e| Problem::invalid(format!("Idempotency-Key: {e}")))?;
    Ok(Some(key))
}

/// A write's answer: its document, status and `ESK-Position`.
fn written(status: StatusCode, a: Appended) -> Response {
    let position = HeaderValue::from_str(&a.position).ok();
    let mut response = (status, Json(AppendedDoc::from(a))).into_response();
    if let Some(p) = position {
        response.headers_mut().insert(POSITION_HEADER, p);
    }
    response
}

/// A client error as a problem; an over-the-limit request is 413.
fn problem(e: esk_client::ClientError) -> Problem {
    if let esk_client::ClientError::Invalid(m) = &e
        && (m.contains("the limit is")
            || m.contains("the limit in a transaction is")
            || m.contains("MessageSizeTooLarge"))
    {
        return Problem::new(Class::PayloadTooLarge, m.clone());
    }
    Problem::from(e)
}

/// Appends events to a stream at an expected version, atomically.
#[utoipa::path(
    post, path = "/streams/{stream}/events", tag = "streams",
    params(
        ("stream" = String, Path, description = "`<category>-<id>`, e.g. `order-1`", pattern = r"^[a-z][a-z0-9_]*-[A-Za-z0-9_.:@-]+$"),
        ("Idempotency-Key" = Option<String>, Header, description = "The request id (1 to 128 visible ASCII characters): the same key again within the idempotency horizon (24 h) is answered with the first result, nothing written twice"),
    ),
    request_body = AppendBody,
    responses(
        (status = 201, description = "Written", body = AppendedDoc, headers(("ESK-Position" = String, description = "The position token"))),
        (status = 400, description = "Invalid input", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Wrong expected version (`actual_version`), or an expired request", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Over the size limit", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Unavailable: retry with the same Idempotency-Key", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn append(
    State(app): State<Arc<App>>,
    Path(stream): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, Problem> {
    let stream = stream_name(&stream)?;
    let key = idempotency_key(&headers)?;
    let b: AppendBody = body(&headers, &bytes)?;
    if b.events.is_empty() {
        return Err(Problem::invalid("events: give at least one event"));
    }
    let mut events = Vec::with_capacity(b.events.len());
    for (i, e) in b.events.into_iter().enumerate() {
        if let Some(id) = &e.id {
            uuid::Uuid::parse_str(id)
                .map_err(|err| Problem::invalid(format!("events[{i}].id '{id}' is not a UUID: {err}")))?;
        }
        events.push(NewEvent { id: e.id, event_type: e.event_type, data: e.data });
    }
    let client = client(&app)?;
    let a = client
        .append(stream.as_str(), Expected::version(b.expected_version.as_ref()), events, key)
        .await
        .map_err(problem)?;
    Ok(written(StatusCode::CREATED, a))
}

/// Sends a command to the stream's aggregate, which decides the events.
#[utoipa::path(
    post, path = "/streams/{stream}/commands/{command}", tag = "streams",
    params(
        ("stream" = String, Path, description = "`<category>-<id>`", pattern = r"^[a-z][a-z0-9_]*-[A-Za-z0-9_.:@-]+$"),
        ("command" = String, Path, description = "The command type, e.g. `Deposit`"),
        ("Idempotency-Key" = Option<String>, Header, description = "The request id: the same key again is answered with the first result"),
    ),
    request_body = CommandBody,
    responses(
        (status = 200, description = "Decided and written", body = AppendedDoc, headers(("ESK-Position" = String, description = "The position token"))),
        (status = 400, description = "Invalid input (also an unknown command or category)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Wrong expected version, or an expired request", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Over the size limit", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The domain refused the command", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Unavailable: retry with the same Idempotency-Key", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn command(
    State(app): State<Arc<App>>,
    Path((stream, command)): Path<(String, String)>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Response, Problem> {
    let stream = stream_name(&stream)?;
    let key = idempotency_key(&headers)?;
    let b: CommandBody = body(&headers, &bytes)?;
    check_type("command", &command)?;
    let data = b.data.unwrap_or_else(|| Value::Object(Default::default()));
    let client = client(&app)?;
    let c = CommandData { command_type: command, data };
    let a = client
        .command(stream.as_str(), Expected::version(b.expected_version.as_ref()), c, key)
        .await
        .map_err(problem)?;
    Ok(written(StatusCode::OK, a))
}

fn check_type(what: &str, name: &str) -> Result<(), Problem> {
    if name.is_empty() || name.len() > esk_wire::limits::MAX_TYPE_BYTES || name.chars().any(char::is_control) {
        return Err(Problem::invalid(format!(
            "{what} '{}' must be 1 to {} characters, none a control character",
            esk_wire::limits::shorten(name, 80),
            esk_wire::limits::MAX_TYPE_BYTES
        )));
    }
    Ok(())
}

/// Reads a stream, a page at a time, forwards or backwards.
#[utoipa::path(
    get, path = "/streams/{stream}", tag = "streams",
    params(("stream" = String, Path, description = "`<category>-<id>`", pattern = r"^[a-z][a-z0-9_]*-[A-Za-z0-9_.:@-]+$"), ReadParams),
    responses(
        (status = 200, description = "A page of the stream", body = StreamPage),
        (status = 400, description = "Invalid input", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "The stream has no events", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn read(
    State(app): State<Arc<App>>,
    Path(stream): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<StreamPage>, Problem> {
    let stream = stream_name(&stream)?;
    let number = |name: &str, min: u64, max: u64| -> Result<Option<u64>, Problem> {
        params
            .get(name)
            .map(|v| match v.parse::<u64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(Problem::invalid(format!("{name} '{v}' must be a whole number from {min} to {max}"))),
            })
            .transpose()
    };
    let from = number("from", 1, u64::MAX)?;
    let limit = number("limit", 1, MAX_PAGE)?.unwrap_or(100);
    let direction = match params.get("direction").map(String::as_str) {
        None | Some("forwards") => Direction::Forwards,
        Some("backwards") => Direction::Backwards,
        Some(d) => return Err(Problem::invalid(format!("direction '{d}' is forwards or backwards"))),
    };
    if let Some(t) = params.get("after") {
        t.parse::<Position>().map_err(Problem::invalid)?;
    }
    if let Some(unknown) = params.keys().find(|k| !["from", "limit", "direction", "after"].contains(&k.as_str())) {
        return Err(Problem::invalid(format!("unknown parameter '{unknown}' (from, limit, direction, after)")));
    }
    let client = client(&app)?;
    let schemas = app.schemas.clone();
    let (events, version, next) = match direction {
        Direction::Forwards => {
            let from = from.unwrap_or(1);
            let page = esk_client::read_range(&client, stream.as_str(), from, limit, schemas).await.map_err(problem)?;
            let last = page.events.last().map(|e| e.event.version);
            let next = last.filter(|l| *l < page.version).map(|l| l + 1);
            (page.events, page.version, next)
        }
        Direction::Backwards => {
            let last = client.head(stream.as_str()).await.map_err(problem)?.version;
            let top = from.map_or(last, |f| f.min(last));
            let start = top.saturating_sub(limit - 1).max(1);
            let page = esk_client::read_range(&client, stream.as_str(), start, top.saturating_sub(start) + 1, schemas)
                .await
                .map_err(problem)?;
            let mut events = page.events;
            events.reverse();
            let next = (start > 1 && !events.is_empty()).then(|| start - 1);
            (events, page.version, next)
        }
    };
    if version == 0 {
        return Err(Problem::not_found(format!("stream {stream} has no events")));
    }
    Ok(Json(StreamPage {
        stream: stream.to_string(),
        version,
        events: events.iter().map(EventDoc::of).collect(),
        next,
    }))
}

/// Runs a transaction across streams (and bounded contexts) through the
/// coordinator: all of it is written, or none.
#[utoipa::path(
    post, path = "/transactions", tag = "transactions",
    params(("Idempotency-Key" = Option<String>, Header, description = "The txid when the body gives none: the same key again is answered with the first outcome")),
    request_body = TransactionBody,
    responses(
        (status = 200, description = "Committed", body = TxStatusDoc),
        (status = 400, description = "Invalid input", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Aborted (`transaction` has every vote), or expired", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Over the size limit", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No outcome in time: ask GET /transactions/{txid}, or retry with the same txid", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn transact(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Json<TxStatusDoc>, Problem> {
    let key = idempotency_key(&headers)?;
    let b: TransactionBody = body(&headers, &bytes)?;
    let txid = match (b.txid, key) {
        (Some(t), Some(k)) if t != k => {
            return Err(Problem::invalid(format!(
                "txid '{t}' and Idempotency-Key '{k}' differ: give one, or the same"
            )));
        }
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) => uuid::Uuid::now_v7().to_string(),
    };
    let timeout_ms = b.timeout_ms.unwrap_or(10_000);
    let participants: Vec<Participant> = b
        .participants
        .into_iter()
        .map(|p| Participant {
            stream: p.stream,
            command: CommandData {
                command_type: p.command,
                data: p.data.unwrap_or_else(|| Value::Object(Default::default())),
            },
        })
        .collect();
    for p in &participants {
        check_type("command", &p.command.command_type)?;
    }
    esk_client::tx::validate(&txid, &participants, timeout_ms, None, &|_| false)
        .map_err(|e| problem(esk_client::ClientError::Invalid(e)))?;
    let client = client(&app)?;
    // An answer before the HTTP request's own bound: the outcome is asked
    // for again with GET /transactions/{txid}.
    let wait = app.max_wait().min(Duration::from_millis(timeout_ms) + client.kafka().timeout);
    let outcome = tokio::time::timeout(wait, client.transact(&txid, participants, Duration::from_millis(timeout_ms)))
        .await
        .unwrap_or_else(|_| {
            Err(esk_client::ClientError::Unavailable(format!(
                "no outcome for transaction {txid} within {wait:?}: ask GET /transactions/{txid}, or retry with the same txid"
            )))
        })
        .map_err(problem)?;
    tx_answer(&outcome)
}

fn tx_answer(s: &TxStatus) -> Result<Json<TxStatusDoc>, Problem> {
    let doc = TxStatusDoc::of(s);
    match s.outcome.as_str() {
        "committed" => Ok(Json(doc)),
        "aborted" => {
            let why = s.reason.clone().unwrap_or_else(|| "a participant voted no".into());
            let mut p = Problem::new(Class::TransactionAborted, format!("transaction {} aborted: {why}", s.txid));
            p.transaction = serde_json::to_value(&doc).ok().map(Box::new);
            Err(p)
        }
        _ => Err(Problem::unavailable(format!(
            "transaction {} is {}: ask GET /transactions/{}",
            s.txid, doc.state, s.txid
        ))),
    }
}

/// A transaction's state, with every participant's vote.
#[utoipa::path(
    get, path = "/transactions/{txid}", tag = "transactions",
    params(("txid" = String, Path, description = "The transaction id")),
    responses(
        (status = 200, description = "Its state", body = TxStatusDoc),
        (status = 400, description = "Not a txid", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such transaction (or ended longer ago than the horizon)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn transaction(State(app): State<Arc<App>>, Path(txid): Path<String>) -> Result<Json<TxStatusDoc>, Problem> {
    let one =
        [Participant { stream: "x-1".into(), command: CommandData { command_type: "X".into(), data: Value::Null } }];
    esk_client::tx::validate(&txid, &one, 1000, None, &|_| false).map_err(Problem::invalid)?;
    let client = client(&app)?;
    let s = client.tx_status(&txid).await.map_err(problem)?;
    if s.outcome == "unknown" {
        return Err(Problem::not_found(format!("no transaction {txid} (or it ended longer ago than the horizon)")));
    }
    Ok(Json(TxStatusDoc::of(&s)))
}

/// Live events of one category as Server-Sent Events.
#[utoipa::path(
    get, path = "/subscriptions/{category}", tag = "subscriptions",
    params(
        ("category" = String, Path, description = "A category, e.g. `order`", pattern = r"^[a-z][a-z0-9_]*$"),
        ("Last-Event-ID" = Option<String>, Header, description = "The `id` of the last event received: resumes right after it, no gap, no duplicate"),
        SubscribeParams,
    ),
    responses(
        (status = 200, description = "`text/event-stream`: each event `id: <cursor>` and `data: <event JSON>`", content_type = "text/event-stream", body = String),
        (status = 400, description = "Invalid input", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Too many subscriptions, or Kafka unreachable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn subscribe_category(
    State(app): State<Arc<App>>,
    Path(category): Path<String>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, Problem> {
    if !esk_wire::stream::is_valid_category(&category) {
        return Err(Problem::invalid(format!(
            "'{}' is not a category (a lowercase letter, then a-z, 0-9 and _)",
            esk_wire::limits::shorten(&category, 80)
        )));
    }
    subscription(app, Some(category), &headers, &params).await
}

/// Live events of every category as Server-Sent Events.
#[utoipa::path(
    get, path = "/subscriptions", tag = "subscriptions",
    params(
        ("Last-Event-ID" = Option<String>, Header, description = "The `id` of the last event received: resumes right after it"),
        SubscribeParams,
    ),
    responses(
        (status = 200, description = "`text/event-stream`", content_type = "text/event-stream", body = String),
        (status = 400, description = "Invalid input", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Too many subscriptions, or Kafka unreachable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn subscribe_all(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, Problem> {
    subscription(app, None, &headers, &params).await
}

async fn subscription(
    app: Arc<App>,
    category: Option<String>,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
) -> Result<Response, Problem> {
    if let Some(unknown) = params.keys().find(|k| !["from", "limit"].contains(&k.as_str())) {
        return Err(Problem::invalid(format!("unknown parameter '{unknown}' (from, limit)")));
    }
    let resume = headers
        .get("last-event-id")
        .map(|v| v.to_str().map(str::to_owned).map_err(|_| Problem::invalid("Last-Event-ID must be ASCII")))
        .transpose()?
        .filter(|v| !v.is_empty());
    let from = match resume.as_deref().or(params.get("from").map(String::as_str)) {
        None => subscribe::From::End,
        Some(text) => subscribe::From::parse(text).map_err(Problem::invalid)?,
    };
    if let (Some(c), subscribe::From::Position(p)) = (&category, &from)
        && *c != p.category
    {
        return Err(Problem::invalid(format!("position token of category {} for a subscription to {c}", p.category)));
    }
    let limit = match params.get("limit") {
        None => None,
        Some(l) => match l.parse::<u64>() {
            Ok(n) if n >= 1 => Some(n),
            _ => return Err(Problem::invalid(format!("limit '{l}' must be a whole number from 1"))),
        },
    };
    let Ok(slot) = app.subscriptions.clone().try_acquire_owned() else {
        metrics::counter!("esk_gateway_subscriptions_refused_total").increment(1);
        return Err(Problem::unavailable(format!(
            "{} subscriptions are open, the most this gateway serves (--max-subscriptions)",
            app.config.max_subscriptions
        )));
    };
    client(&app)?;
    let stop = Arc::new(AtomicBool::new(false));
    let rx = {
        let (app, stop) = (app.clone(), stop.clone());
        let spec = Spec { category, from, limit };
        // The slot goes with the reader: setup a client gave up on still counts.
        tokio::task::spawn_blocking(move || {
            subscribe::spawn(&app.kafka, &app.topics, app.schemas.clone(), spec, stop, slot)
        })
        .await
        .map_err(|e| Problem::internal(e.to_string()))?
        .map_err(|e| match e {
            subscribe::Refused::Invalid(m) => Problem::invalid(m),
            subscribe::Refused::Unavailable(m) => Problem::unavailable(m),
        })?
    };
    let guard = Leaving { stop };
    let stream = futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        let item = rx.recv().await?;
        let event = match item {
            Item::Start(id) => Event::default().id(id).comment("start"),
            Item::Event { id, data } => Event::default().id(id).data(data),
            // A comment is one line: what a foreign record's header said may not be.
            Item::Skipped(note) => Event::default().comment(note.replace(['\r', '\n'], " ")),
        };
        Some((Ok::<_, Infallible>(event), (rx, guard)))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)).text("keep-alive"))
        .into_response())
}

/// Held by a subscription's response: when the client leaves, its reader
/// stops (and frees its slot).
struct Leaving {
    stop: Arc<AtomicBool>,
}

impl Drop for Leaving {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
