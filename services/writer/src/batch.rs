//! The writer's decisions for one batch of requests, without Kafka.
//!
//! A [`Batch`] reads what the partition committed through a [`Lookup`] (the
//! streams' records, the answers and decisions remembered for the
//! idempotency horizon) and records everything the batch changes in a scratch
//! copy: the events to append, the stream records, replies, votes, dead
//! letters and what to remember. The Kafka side writes the events, learns
//! their offsets, calls [`Batch::finish`] to fill in positions and indexes,
//! writes the rest and commits; only then does the partition's memory take
//! the new records. An aborted transaction just drops the batch: nothing
//! half-applied survives.
//!
//! Every input is hostile until decoded: nothing here panics on any bytes
//! (`tests::arbitrary_records_never_panic`), and every record it makes is
//! bounded (see `esk_wire::limits`), so that it can always be written.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use esk_domain::{DomainError, DynError, EventData, Registry};
use esk_wire::limits::{
    self, Limits, MAX_EVENT_ID_BYTES, MAX_EVENTS_PER_REQUEST, MAX_OPEN_HOLDS, MAX_REASON_BYTES, MAX_TXID_BYTES,
    MAX_TYPE_BYTES, shorten,
};
use esk_wire::partition::partition_for;
use esk_wire::protocol::{
    Answered, Appended, CommandData, Decided, Decision, ErrorCode, ExpectedVersion, INDEX_PAGE_ENTRIES, IndexEntry,
    IndexPage, MAX_HEAD_ENTRIES, Memory, NewEvent, OpenHold, ParticipantMessage, Position, Prepare, Reply, ReplyError,
    ReplyOutcome, Request, RequestBody, StreamHead, StreamRecord, TxAck, TxVote, Verdict,
};
use esk_wire::{Event, SchemaRegistry, StreamName};
use serde_json::Value;

/// The highest version a stream may reach (versions travel as JSON numbers).
pub const MAX_VERSION: u64 = i64::MAX as u64;
/// The CloudEvents source of everything the writer appends.
pub const SOURCE: &str = "esk/writer";
/// A hold placed by a prepare without a deadline is asked about this long after.
pub const DEFAULT_HOLD_DEADLINE_MS: i64 = 300_000;

pub use esk_owner::Incoming;

/// Which input topic a record came from, by its index in the writer group's
/// inputs (`commands`, `tx.prepare`, `tx.commit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Commands = 0,
    Prepare = 1,
    Commit = 2,
}

impl Source {
    pub fn of(input: usize) -> Self {
        match input {
            0 => Source::Commands,
            1 => Source::Prepare,
            _ => Source::Commit,
        }
    }
}

/// What the writer knows about its installation.
#[derive(Debug)]
pub struct Context<'a> {
    pub schemas: &'a SchemaRegistry,
    pub aggregates: &'a Registry,
    /// Partitions of the co-partitioned topics (commands, state, events, ...).
    pub partitions: i32,
    /// Partitions of the replies topic.
    pub reply_partitions: i32,
    /// Partitions of the votes topic.
    pub vote_partitions: i32,
    /// Categories whose events topic cannot be written (and why).
    pub unusable: HashMap<String, String>,
    pub limits: Limits,
    /// How long answers and decisions are remembered (ms).
    pub horizon_ms: i64,
    /// The context this writer serves, and the registry's routes (`None`:
    /// every category is this writer's, as in tests).
    pub context: &'a str,
    pub routes: Option<&'a esk_kafka::contexts::Routes>,
}

impl Context<'_> {
    /// Whether the events of this stream's category can be written.
    fn writable(&self, stream: &StreamName) -> Result<(), String> {
        match self.unusable.get(stream.category()) {
            Some(reason) => Err(format!("category '{}' cannot be written: {reason}", stream.category())),
            None => Ok(()),
        }
    }
}

/// Why a lookup did not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupError {
    /// This stream cannot be served (its state record was refused): its
    /// requests are answered with the reason.
    Unservable(String),
    /// The local store failed: the batch is tried again.
    Store(String),
}

/// What the partition committed, as a batch needs it. Answers and decisions
/// older than the idempotency horizon are not returned.
pub trait Lookup {
    /// A stream's committed record (`None`: no events yet).
    fn stream(&mut self, stream: &str) -> Result<Option<StreamRecord>, LookupError>;
    /// The answer to a request of this stream.
    fn answer(&mut self, stream: &str, request_id: &str) -> Result<Option<Answered>, LookupError>;
    /// The answer to an append of this stream whose first event had this id, at this expected version.
    fn answer_by_event(
        &mut self,
        stream: &str,
        event_id: &str,
        expected: ExpectedVersion,
    ) -> Result<Option<Answered>, LookupError>;
    /// The decision this stream applied for a transaction.
    fn decided(&mut self, stream: &str, txid: &str) -> Result<Option<Decided>, LookupError>;
    /// Entries of the stream's committed index pages, in order, from the page
    /// holding version `from` (or the first), at least `limit` of them if
    /// there are (whole pages).
    fn index_pages(&mut self, stream: &str, from: u64, limit: usize) -> Result<Vec<IndexEntry>, LookupError>;
}

/// An event to append, in order.
#[derive(Debug, Clone)]
pub struct OutEvent {
    pub category: String,
    pub event: Event,
}

/// A record for a dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub original: Incoming,
    pub reason: String,
    /// Park a cut copy even if the whole would fit.
    pub cut: bool,
}

#[derive(Debug)]
enum PendingReply {
    Ready(ReplyOutcome),
    Appended {
        stream: String,
        first_version: u64,
        last_version: u64,
        /// Index in `events` of the request's last event, if it wrote any.
        last_event: Option<usize>,
    },
    Head {
        stream: String,
        from: u64,
    },
}

/// An event that passed its checks, ready to be numbered.
#[derive(Debug)]
struct Checked {
    id: Option<String>,
    event_type: String,
    data: Value,
    schema: Option<String>,
}

#[derive(Debug)]
struct Run {
    stream: String,
    first_version: u64,
    first_event: usize,
}

/// A remembered answer of this batch, with its last event.
#[derive(Debug, Clone)]
struct InBatch {
    answer: Answered,
    last_event: Option<usize>,
}

/// Everything a batch decided, with positions still open.
pub struct Batch<'s> {
    lookup: &'s mut dyn Lookup,
    /// Committed records looked up (`None`: the stream has none).
    loaded: HashMap<String, Option<StreamRecord>>,
    scratch: HashMap<String, StreamRecord>,
    touched: Vec<String>,
    runs: Vec<Run>,
    pub events: Vec<OutEvent>,
    replies: Vec<(i32, String, Option<String>, PendingReply)>,
    pub votes: Vec<(i32, String, ParticipantMessage)>,
    pub dead_letters: Vec<DeadLetter>,
    /// Highest offset consumed per input topic.
    pub consumed: HashMap<String, i64>,
    /// Requests answered in this batch.
    in_batch: Vec<InBatch>,
    decisions: Vec<(String, Decided)>,
    /// Retries answered from memory, requests refused as expired.
    pub retries_answered: u64,
    pub expired: u64,
    /// The local store failed: nothing of this batch may be written.
    pub store_failure: Option<String>,
    now: DateTime<Utc>,
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").field("events", &self.events.len()).field("touched", &self.touched).finish()
    }
}

/// A batch with every position known: what to write after the events,
/// serialized, each within the limits.
#[derive(Debug)]
pub struct Finished {
    /// New stream records, ordered by their last event's offset, with their JSON.
    pub records: Vec<(StreamRecord, Vec<u8>)>,
    /// (replies partition, request id, reply JSON).
    pub replies: Vec<(i32, String, Vec<u8>)>,
    /// What to remember on the answers topic, with its JSON.
    pub memories: Vec<(Memory, Vec<u8>)>,
    /// Index pages filled by this batch, with their JSON (written before the
    /// stream records that count them).
    pub pages: Vec<(IndexPage, Vec<u8>)>,
}

/// A batch that made a record too large to write (an aggregate state that
/// grew past the limit): its inputs are taken one at a time, and the one that
/// does it is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oversized(pub String);

fn error(code: ErrorCode, message: impl Into<String>) -> ReplyOutcome {
    ReplyOutcome::Error(ReplyError { code, message: shorten(&message.into(), MAX_REASON_BYTES), actual_version: None })
}

fn domain_error(e: DynError) -> ReplyOutcome {
    match e {
        DynError::Domain(DomainError::Invalid(m)) => error(ErrorCode::InvalidInput, m),
        DynError::Domain(DomainError::Rejected(m)) => error(ErrorCode::DomainRefused, m),
        DynError::State(m) => error(ErrorCode::Internal, m),
    }
}

fn is_event_type(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_TYPE_BYTES
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn json_len(v: &Value) -> usize {
    serde_json::to_vec(v).map_or(usize::MAX, |b| b.len())
}

/// The loose fields of a record that is not a valid request: enough to
/// answer its client, if they are there and small.
struct Loose {
    request_id: Option<String>,
    attempt: Option<String>,
    reply_partition: Option<i32>,
}

impl Loose {
    fn of(payload: &[u8], reply_partitions: i32) -> Self {
        let v: Option<Value> = serde_json::from_slice(payload).ok();
        let text = |name: &str| v.as_ref().and_then(|v| v.get(name)?.as_str().map(str::to_owned));
        Self {
            request_id: text("request_id"),
            attempt: text("attempt").filter(|a| limits::check_request_id(a).is_ok()),
            reply_partition: v
                .as_ref()
                .and_then(|v| v.get("reply_partition")?.as_i64())
                .and_then(|p| i32::try_from(p).ok())
                .filter(|p| (0..reply_partitions).contains(p)),
        }
    }

    /// Where and under which id to answer: the request id if it is valid (or
    /// cut short when the attempt tells the client anyway).
    fn answer_to(&self) -> Option<(i32, String, Option<String>)> {
        let part = self.reply_partition?;
        let id = self.request_id.as_deref()?;
        match (limits::check_request_id(id), &self.attempt) {
            (Ok(()), attempt) => Some((part, id.to_owned(), attempt.clone())),
            (Err(_), Some(attempt)) => Some((part, shorten(id, 64), Some(attempt.clone()))),
            (Err(_), None) => None,
        }
    }
}

impl<'s> Batch<'s> {
    pub fn new(lookup: &'s mut dyn Lookup, now: DateTime<Utc>) -> Self {
        Self {
            lookup,
            loaded: HashMap::new(),
            scratch: HashMap::new(),
            touched: Vec::new(),
            runs: Vec::new(),
            events: Vec::new(),
            replies: Vec::new(),
            votes: Vec::new(),
            dead_letters: Vec::new(),
            consumed: HashMap::new(),
            in_batch: Vec::new(),
            decisions: Vec::new(),
            retries_answered: 0,
            expired: 0,
            store_failure: None,
            now,
        }
    }

    /// Whether the batch decided anything that must be written.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.replies.is_empty()
            && self.votes.is_empty()
            && self.dead_letters.is_empty()
            && self.touched.is_empty()
    }

    fn now_ms(&self) -> i64 {
        self.now.timestamp_millis()
    }

    /// Makes the stream's committed record available to [`Self::record`].
    fn load(&mut self, stream: &str) -> Result<(), String> {
        if self.scratch.contains_key(stream) || self.loaded.contains_key(stream) {
            return Ok(());
        }
        match self.lookup.stream(stream) {
            Ok(r) => {
                self.loaded.insert(stream.to_owned(), r);
                Ok(())
            }
            Err(e) => Err(self.lookup_failed(e)),
        }
    }

    /// A lookup's failure as a reason for the request, noting a store failure.
    fn lookup_failed(&mut self, e: LookupError) -> String {
        match e {
            LookupError::Unservable(reason) => reason,
            LookupError::Store(reason) => {
                self.store_failure.get_or_insert_with(|| reason.clone());
                format!("the writer's local store failed: {reason}")
            }
        }
    }

    fn record(&self, stream: &str) -> Option<&StreamRecord> {
        self.scratch.get(stream).or_else(|| self.loaded.get(stream).and_then(Option::as_ref))
    }

    fn record_mut(&mut self, stream: &StreamName, ctx: &Context<'_>) -> &mut StreamRecord {
        let name = stream.as_str();
        if !self.scratch.contains_key(name) {
            let rec =
                self.loaded.get(name).cloned().flatten().unwrap_or_else(|| {
                    StreamRecord::new(name, ctx.aggregates.get(stream.category()).map(|a| a.initial()))
                });
            self.scratch.insert(name.to_owned(), rec);
        }
        if !self.touched.iter().any(|t| t == name) {
            self.touched.push(name.to_owned());
        }
        self.scratch.get_mut(name).expect("inserted above")
    }

    /// Decides one consumed record.
    pub fn handle(&mut self, ctx: &Context<'_>, msg: Incoming) {
        let next = self.consumed.entry(msg.topic.clone()).or_insert(msg.offset);
        *next = (*next).max(msg.offset);
        match Source::of(msg.input) {
            Source::Commands => self.handle_request(ctx, msg),
            Source::Prepare => self.handle_prepare(ctx, msg),
            Source::Commit => self.handle_decision(ctx, msg),
        }
    }

    /// Refuses one consumed record without deciding it (the batch that held
    /// it could not be written, see [`Oversized`] and `TxnError::Rejected`):
    /// its client gets the reason when it can be found, a prepare is voted
    /// no, anything else is parked.
    pub fn refuse(&mut self, ctx: &Context<'_>, msg: Incoming, reason: &str) {
        let next = self.consumed.entry(msg.topic.clone()).or_insert(msg.offset);
        *next = (*next).max(msg.offset);
        let payload = msg.payload.as_deref().unwrap_or_default();
        match Source::of(msg.input) {
            Source::Commands => match Loose::of(payload, ctx.reply_partitions).answer_to() {
                Some((part, id, attempt)) => self.reply(part, id, attempt, error(ErrorCode::InvalidInput, reason)),
                None => self.dead_letter(msg, reason),
            },
            Source::Prepare => match serde_json::from_slice::<Prepare>(payload) {
                Ok(p)
                    if !p.txid.is_empty()
                        && p.txid.len() <= MAX_TXID_BYTES
                        && p.stream.len() <= esk_wire::stream::MAX_STREAM_LEN =>
                {
                    let reason = Some(shorten(reason, MAX_REASON_BYTES));
                    let vote = TxVote { txid: p.txid.clone(), stream: p.stream, yes: false, reason, context: None };
                    self.vote(ctx, &p.txid, ParticipantMessage::Vote(vote));
                }
                _ => self.dead_letter(msg, reason),
            },
            Source::Commit => self.dead_letter(msg, reason),
        }
    }

    fn dead_letter(&mut self, msg: Incoming, reason: impl Into<String>) {
        let reason = shorten(&reason.into(), MAX_REASON_BYTES);
        self.dead_letters.push(DeadLetter { original: msg, reason, cut: false });
    }

    /// Parks a cut copy of one consumed record (its refusal could not be written).
    pub fn park_cut(&mut self, msg: Incoming, reason: &str) {
        let next = self.consumed.entry(msg.topic.clone()).or_insert(msg.offset);
        *next = (*next).max(msg.offset);
        let reason = shorten(reason, MAX_REASON_BYTES);
        self.dead_letters.push(DeadLetter { original: msg, reason, cut: true });
    }

    /// Checks that a stream name is valid and belongs to the record's partition.
    fn owned_stream(ctx: &Context<'_>, msg: &Incoming, stream: &str) -> Result<StreamName, String> {
        let name = StreamName::parse(stream).map_err(|e| e.to_string())?;
        let home = partition_for(stream.as_bytes(), ctx.partitions);
        if home != msg.partition || msg.key.as_deref() != Some(stream.as_bytes()) {
            return Err(format!(
                "stream '{stream}' belongs to partition {home} of {}, keyed by its name; this record came on \
                 partition {} with key {:?}: produce with key = stream and Kafka's default (murmur2) partitioner",
                msg.topic,
                msg.partition,
                msg.key.as_deref().map(|k| shorten(&String::from_utf8_lossy(k), 100))
            ));
        }
        Ok(name)
    }

    /// Whether this context owns the stream's category: a client whose view
    /// of the registry was stale, or a record produced by hand, may send it
    /// here, and a stream is written by its category's context alone.
    fn foreign(ctx: &Context<'_>, stream: &StreamName, msg: &Incoming) -> Option<String> {
        let routes = ctx.routes?;
        if routes.routes_to(stream.category(), ctx.context) {
            return None;
        }
        Some(format!(
            "category '{}' belongs to context '{}', not to '{}' whose {} this record came on: clients route by the \
             registry of contexts (one that had not seen the claim yet sends it again there); nothing was written",
            stream.category(),
            routes.context_of(stream.category()),
            ctx.context,
            msg.topic
        ))
    }

    fn handle_request(&mut self, ctx: &Context<'_>, msg: Incoming) {
        let Some(payload) = msg.payload.as_deref() else {
            return self.dead_letter(msg, "request has no value");
        };
        if payload.len() > ctx.limits.request_bytes() {
            let reason = format!("the request is {} bytes; the limit is {}", payload.len(), ctx.limits.request_bytes());
            return self.refuse(ctx, msg, &reason);
        }
        let request: Request = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => {
                // Answer if the client can be found, else park the record.
                let reason = format!("request is not valid: {e}");
                return self.refuse(ctx, msg, &reason);
            }
        };
        if !(0..ctx.reply_partitions).contains(&request.reply_partition) {
            let reason = format!(
                "reply_partition {} does not exist (the replies topic has {})",
                request.reply_partition, ctx.reply_partitions
            );
            return self.dead_letter(msg, reason);
        }
        if request.attempt.as_deref().is_some_and(|a| limits::check_request_id(a).is_err()) {
            return self.dead_letter(msg, "the request's attempt is not 1 to 128 visible ASCII characters");
        }
        if let Err(reason) = limits::check_request_id(&request.request_id) {
            return self.refuse(ctx, msg, &reason);
        }
        let (part, id, attempt) = (request.reply_partition, request.request_id.clone(), request.attempt.clone());
        let checked = Self::owned_stream(ctx, &msg, &request.stream).and_then(|s| {
            for (what, v) in [("correlation id", &request.correlation_id), ("causation id", &request.causation_id)] {
                if let Some(v) = v {
                    limits::check_trace_id(what, v)?;
                }
            }
            Ok(s)
        });
        let stream = match checked {
            Ok(s) => s,
            Err(m) => return self.reply(part, id, attempt, error(ErrorCode::InvalidInput, m)),
        };
        if let Some(why) = Self::foreign(ctx, &stream, &msg) {
            // Not final: the sender's view of the registry was behind; sent
            // again, it reaches the right context.
            return self.reply(part, id, attempt, error(ErrorCode::Unavailable, why));
        }
        if let Err(reason) = self.load(stream.as_str()) {
            return self.reply(part, id, attempt, error(ErrorCode::Unavailable, reason));
        }
        let outcome = match &request.body {
            RequestBody::Head { from } => {
                let pending = PendingReply::Head { stream: stream.to_string(), from: *from };
                self.replies.push((part, id, attempt, pending));
                return;
            }
            RequestBody::Append { expected_version, events } => {
                self.append(ctx, &request, &stream, *expected_version, events)
            }
            RequestBody::Command { expected_version, command } => {
                self.command(ctx, &request, &stream, *expected_version, command)
            }
        };
        match outcome {
            Ok(pending) => self.replies.push((part, id, attempt, pending)),
            Err(outcome) => self.reply(part, id, attempt, outcome),
        }
    }

    fn reply(&mut self, partition: i32, request_id: String, attempt: Option<String>, outcome: ReplyOutcome) {
        self.replies.push((partition, request_id, attempt, PendingReply::Ready(outcome)));
    }

    /// The first answer to a retried request, if this stream remembers it
    /// within the horizon: from this batch (its position is filled in with
    /// the original's), or committed. A request id reused for another
    /// request is refused.
    fn answered(
        &mut self,
        ctx: &Context<'_>,
        request: &Request,
        stream: &str,
        first_event_id: Option<&str>,
        expected: ExpectedVersion,
    ) -> Result<Option<PendingReply>, ReplyOutcome> {
        let fingerprint = request.fingerprint();
        let same = |a: &Answered| {
            a.request_id == request.request_id
                || (first_event_id.is_some()
                    && a.first_event_id.as_deref() == first_event_id
                    && a.expected_version == expected)
        };
        let reused =
            |a: &Answered| a.request_id == request.request_id && a.fingerprint != 0 && a.fingerprint != fingerprint;
        let refuse_reuse = || {
            error(
                ErrorCode::InvalidInput,
                format!(
                    "request id '{}' was already used for another request on {stream}; a retry must send the same \
                     request, a new request needs a new id",
                    request.request_id
                ),
            )
        };
        if let Some(b) = self.in_batch.iter().find(|b| b.answer.result.stream == stream && same(&b.answer)) {
            if reused(&b.answer) {
                return Err(refuse_reuse());
            }
            self.retries_answered += 1;
            return Ok(Some(PendingReply::Appended {
                stream: stream.to_owned(),
                first_version: b.answer.result.first_version,
                last_version: b.answer.result.last_version,
                last_event: b.last_event,
            }));
        }
        let by_id = self.lookup.answer(stream, &request.request_id);
        let found = match (by_id, first_event_id) {
            (Ok(Some(a)), _) => Some(a),
            (Ok(None), Some(event_id)) => match self.lookup.answer_by_event(stream, event_id, expected) {
                Ok(a) => a,
                Err(e) => return Err(error(ErrorCode::Unavailable, self.lookup_failed(e))),
            },
            (Ok(None), None) => None,
            (Err(e), _) => return Err(error(ErrorCode::Unavailable, self.lookup_failed(e))),
        };
        match found {
            Some(a) if reused(&a) => Err(refuse_reuse()),
            Some(a) => {
                self.retries_answered += 1;
                Ok(Some(PendingReply::Ready(ReplyOutcome::Appended(a.result))))
            }
            None => self.not_expired(ctx, request, stream).map(|()| None),
        }
    }

    /// A request not remembered must be younger than the horizon: an older
    /// one may have been applied and forgotten.
    fn not_expired(&mut self, ctx: &Context<'_>, request: &Request, stream: &str) -> Result<(), ReplyOutcome> {
        let Some(why) = limits::too_old(request.origin_ms(), self.now_ms(), ctx.horizon_ms) else { return Ok(()) };
        self.expired += 1;
        Err(error(
            ErrorCode::RequestExpired,
            format!(
                "request '{}' on {stream} is not remembered and {why}: it may have been applied, and the writer no \
                 longer knows; nothing was written. Read the stream (esk read) and send it again with a new \
                 request id if it is missing",
                request.request_id
            ),
        ))
    }

    fn check_version(&self, stream: &str, expected: ExpectedVersion) -> Result<u64, ReplyOutcome> {
        let current = self.record(stream).map_or(0, |r| r.version);
        if expected.admits(current) {
            Ok(current)
        } else {
            Err(ReplyOutcome::Error(ReplyError {
                code: ErrorCode::WrongExpectedVersion,
                message: format!("stream '{stream}' is at version {current}, expected {expected}"),
                actual_version: Some(current),
            }))
        }
    }

    fn append(
        &mut self,
        ctx: &Context<'_>,
        request: &Request,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<PendingReply, ReplyOutcome> {
        let invalid = |m: String| error(ErrorCode::InvalidInput, m);
        if events.is_empty() {
            return Err(invalid("an append needs at least one event".into()));
        }
        if events.len() > MAX_EVENTS_PER_REQUEST {
            return Err(invalid(format!(
                "{} events in one append; the limit is {MAX_EVENTS_PER_REQUEST}",
                events.len()
            )));
        }
        if ctx.aggregates.get(stream.category()).is_some() {
            return Err(invalid(format!(
                "category '{}' is owned by its aggregate: send a command (esk command), not raw events",
                stream.category()
            )));
        }
        let first_id = events[0].id.as_deref().filter(|id| id.len() <= MAX_EVENT_ID_BYTES);
        if let Some(done) = self.answered(ctx, request, stream.as_str(), first_id, expected)? {
            return Ok(done);
        }
        ctx.writable(stream).map_err(|m| error(ErrorCode::Internal, m))?;
        let current = self.check_version(stream.as_str(), expected)?;
        let max_data = ctx.limits.event_data_bytes();
        let mut validated = Vec::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            if !is_event_type(&e.event_type) {
                return Err(invalid(format!(
                    "event {}: type '{}' is not a name (letters, digits, _ . -, at most {MAX_TYPE_BYTES})",
                    i + 1,
                    shorten(&e.event_type, 100)
                )));
            }
            let at = |m: String| invalid(format!("event {} ({}): {m}", i + 1, e.event_type));
            if let Some(id) = &e.id
                && (id.is_empty() || id.len() > MAX_EVENT_ID_BYTES)
            {
                return Err(at(format!("an event id has 1 to {MAX_EVENT_ID_BYTES} characters")));
            }
            let size = json_len(&e.data);
            if size > max_data {
                return Err(at(format!("data is {size} bytes; the limit is {max_data}")));
            }
            let schema =
                ctx.schemas.validate(stream.category(), &e.event_type, &e.data).map_err(|err| at(err.to_string()))?;
            validated.push(Checked {
                id: e.id.clone(),
                event_type: e.event_type.clone(),
                data: e.data.clone(),
                schema: schema.map(str::to_owned),
            });
        }
        let (first, last, last_event) = self.write(ctx, stream, current, validated, request)?;
        self.remember(stream, request, first_id, expected, first, last, last_event);
        Ok(PendingReply::Appended { stream: stream.to_string(), first_version: first, last_version: last, last_event })
    }

    fn command(
        &mut self,
        ctx: &Context<'_>,
        request: &Request,
        stream: &StreamName,
        expected: ExpectedVersion,
        command: &CommandData,
    ) -> Result<PendingReply, ReplyOutcome> {
        let Some(aggregate) = ctx.aggregates.get(stream.category()).cloned() else {
            return Err(error(
                ErrorCode::InvalidInput,
                format!(
                    "category '{}' has no aggregate (known: {}); append events instead",
                    stream.category(),
                    ctx.aggregates.categories().collect::<Vec<_>>().join(", ")
                ),
            ));
        };
        if let Some(done) = self.answered(ctx, request, stream.as_str(), None, expected)? {
            return Ok(done);
        }
        ctx.writable(stream).map_err(|m| error(ErrorCode::Internal, m))?;
        if command.command_type.len() > MAX_TYPE_BYTES || json_len(&command.data) > ctx.limits.event_data_bytes() {
            return Err(error(ErrorCode::InvalidInput, "the command's name or data is over its limit"));
        }
        let current = self.check_version(stream.as_str(), expected)?;
        let state = self.record(stream.as_str()).and_then(|r| r.state.clone()).unwrap_or_else(|| aggregate.initial());
        let cmd = EventData { event_type: command.command_type.clone(), data: command.data.clone() };
        let events = aggregate.handle(&state, &cmd).map_err(domain_error)?;
        let data = self.checked_domain_events(ctx, stream, &events)?;
        let (first, last, last_event) = self.write(ctx, stream, current, data, request)?;
        self.remember(stream, request, None, expected, first, last, last_event);
        Ok(PendingReply::Appended { stream: stream.to_string(), first_version: first, last_version: last, last_event })
    }

    /// Validates events an aggregate produced; a failure is a bug in the domain.
    fn checked_domain_events(
        &self,
        ctx: &Context<'_>,
        stream: &StreamName,
        events: &[EventData],
    ) -> Result<Vec<Checked>, ReplyOutcome> {
        events
            .iter()
            .map(|e| {
                let schema = ctx.schemas.validate(stream.category(), &e.event_type, &e.data).map_err(|err| {
                    error(
                        ErrorCode::Internal,
                        format!("the {} aggregate made an invalid event: {err}", stream.category()),
                    )
                })?;
                if !is_event_type(&e.event_type) || json_len(&e.data) > ctx.limits.event_data_bytes() {
                    return Err(error(
                        ErrorCode::Internal,
                        format!("the {} aggregate made an event over the limits", stream.category()),
                    ));
                }
                Ok(Checked {
                    id: None,
                    event_type: e.event_type.clone(),
                    data: e.data.clone(),
                    schema: schema.map(str::to_owned),
                })
            })
            .collect()
    }

    /// Appends validated events to a stream at `current + 1..`, folding them into
    /// the aggregate state. Returns (first version, last version, last event index).
    fn write(
        &mut self,
        ctx: &Context<'_>,
        stream: &StreamName,
        current: u64,
        events: Vec<Checked>,
        request: &Request,
    ) -> Result<(u64, u64, Option<usize>), ReplyOutcome> {
        let correlation = request.correlation_id.clone().unwrap_or_else(|| request.request_id.clone());
        let causation = request.causation_id.clone().unwrap_or_else(|| request.request_id.clone());
        self.write_events(ctx, stream, current, events, &correlation, &causation)
            .map_err(|m| error(ErrorCode::Internal, m))
    }

    fn write_events(
        &mut self,
        ctx: &Context<'_>,
        stream: &StreamName,
        current: u64,
        events: Vec<Checked>,
        correlation: &str,
        causation: &str,
    ) -> Result<(u64, u64, Option<usize>), String> {
        if events.is_empty() {
            return Ok((current, current, None));
        }
        if current.checked_add(events.len() as u64).is_none_or(|v| v > MAX_VERSION) {
            return Err(format!("{stream} is at version {current}, the most a stream may reach"));
        }
        let aggregate = ctx.aggregates.get(stream.category()).cloned();
        // Fold first: an event the aggregate cannot apply writes nothing.
        let mut state = self
            .record(stream.as_str())
            .and_then(|r| r.state.clone())
            .or_else(|| aggregate.as_ref().map(|a| a.initial()));
        if let Some(agg) = &aggregate {
            for e in &events {
                let s = state.take().unwrap_or_else(|| agg.initial());
                let folded = agg.apply(s, &EventData { event_type: e.event_type.clone(), data: e.data.clone() })?;
                state = Some(folded);
            }
        }
        let first_event = self.events.len();
        let mut version = current;
        let time = self.now;
        for Checked { id, event_type, data, schema } in events {
            version += 1;
            self.events.push(OutEvent {
                category: stream.category().to_owned(),
                event: Event {
                    id: id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
                    source: SOURCE.to_owned(),
                    event_type,
                    time,
                    stream: stream.clone(),
                    version,
                    correlation_id: Some(correlation.to_owned()),
                    causation_id: Some(causation.to_owned()),
                    data_schema: schema,
                    data,
                },
            });
        }
        self.runs.push(Run { stream: stream.to_string(), first_version: current + 1, first_event });
        let rec = self.record_mut(stream, ctx);
        rec.version = version;
        if state.is_some() {
            rec.state = state;
        }
        Ok((current + 1, version, Some(self.events.len() - 1)))
    }

    #[allow(clippy::too_many_arguments)]
    fn remember(
        &mut self,
        stream: &StreamName,
        request: &Request,
        first_event_id: Option<&str>,
        expected: ExpectedVersion,
        first: u64,
        last: u64,
        last_event: Option<usize>,
    ) {
        let answer = Answered {
            request_id: request.request_id.clone(),
            first_event_id: first_event_id.map(str::to_owned),
            expected_version: expected,
            // The position is filled in by `finish`, once offsets are known.
            result: Appended {
                stream: stream.to_string(),
                first_version: first,
                last_version: last,
                position: String::new(),
            },
            fingerprint: request.fingerprint(),
            answered_ms: self.now_ms(),
        };
        self.in_batch.push(InBatch { answer, last_event });
    }

    fn vote(&mut self, ctx: &Context<'_>, txid: &str, mut message: ParticipantMessage) {
        // A vote says whose it is, so that a decision sent in answer to it
        // comes back to this context's writers.
        if let ParticipantMessage::Vote(v) = &mut message
            && ctx.context != esk_wire::topics::DEFAULT_CONTEXT
        {
            v.context = Some(ctx.context.to_owned());
        }
        let partition = partition_for(txid.as_bytes(), ctx.vote_partitions);
        self.votes.push((partition, txid.to_owned(), message));
    }

    /// Asks the coordinator again for the decision on a hold still open past
    /// its deadline: the vote is sent again, and the coordinator answers a
    /// vote for a decided or unknown transaction with the decision.
    pub fn ask(&mut self, ctx: &Context<'_>, txid: &str, stream: &str) {
        let vote = TxVote { txid: txid.to_owned(), stream: stream.to_owned(), yes: true, reason: None, context: None };
        self.vote(ctx, txid, ParticipantMessage::Vote(vote));
    }

    fn handle_prepare(&mut self, ctx: &Context<'_>, msg: Incoming) {
        let prepare: Prepare = match msg.payload.as_deref().map(serde_json::from_slice::<Prepare>) {
            Some(Ok(p)) => p,
            Some(Err(e)) => return self.dead_letter(msg, format!("prepare is not valid: {e}")),
            None => return self.dead_letter(msg, "prepare has no value"),
        };
        if prepare.txid.is_empty() || prepare.txid.len() > MAX_TXID_BYTES {
            return self.dead_letter(msg, format!("a txid has 1 to {MAX_TXID_BYTES} characters"));
        }
        let Ok(stream) = Self::owned_stream(ctx, &msg, &prepare.stream) else {
            let reason = format!("stream '{}' is not a stream of this partition", shorten(&prepare.stream, 100));
            return self.dead_letter(msg, reason);
        };
        // A prepare for another context's stream is voted down: the
        // transaction aborts at once instead of at its deadline.
        let prepared = match Self::foreign(ctx, &stream, &msg) {
            Some(why) => Err(why),
            None => self.prepare(ctx, &msg, &prepare),
        };
        let vote = match prepared {
            Ok(()) => TxVote {
                txid: prepare.txid.clone(),
                stream: prepare.stream.clone(),
                yes: true,
                reason: None,
                context: None,
            },
            Err(reason) => TxVote {
                txid: prepare.txid.clone(),
                stream: prepare.stream.clone(),
                yes: false,
                reason: Some(shorten(&reason, MAX_REASON_BYTES)),
                context: None,
            },
        };
        self.vote(ctx, &prepare.txid, ParticipantMessage::Vote(vote));
    }

    /// The decision this stream applied for `txid`: in this batch or remembered.
    fn decision_of(&mut self, stream: &str, txid: &str) -> Result<Option<Verdict>, String> {
        if let Some((_, d)) = self.decisions.iter().find(|(s, d)| s == stream && d.txid == txid) {
            return Ok(Some(d.decision));
        }
        match self.lookup.decided(stream, txid) {
            Ok(d) => Ok(d.map(|d| d.decision)),
            Err(e) => Err(self.lookup_failed(e)),
        }
    }

    fn prepare(&mut self, ctx: &Context<'_>, msg: &Incoming, prepare: &Prepare) -> Result<(), String> {
        let stream = Self::owned_stream(ctx, msg, &prepare.stream)?;
        self.load(stream.as_str())?;
        if let Some(d) = self.decision_of(stream.as_str(), &prepare.txid)? {
            // A late duplicate: the decision stands and no new hold is placed.
            return match d {
                Verdict::Commit => Ok(()),
                Verdict::Abort => Err(format!("transaction {} was already aborted", prepare.txid)),
            };
        }
        ctx.writable(&stream)?;
        let aggregate =
            ctx.aggregates.get(stream.category()).cloned().ok_or_else(|| {
                format!("category '{}' has no aggregate to take part in transactions", stream.category())
            })?;
        let state = self.record(stream.as_str()).and_then(|r| r.state.clone()).unwrap_or_else(|| aggregate.initial());
        if aggregate.has_hold(&state, &prepare.txid)? {
            return Ok(());
        }
        if self.record(stream.as_str()).is_some_and(|r| r.holds.len() >= MAX_OPEN_HOLDS) {
            return Err(format!("{stream} has {MAX_OPEN_HOLDS} holds open already, the most a stream may have"));
        }
        if json_len(&prepare.command.data) > limits::MAX_TX_COMMAND_BYTES {
            return Err(format!("the command's data is over {} bytes", limits::MAX_TX_COMMAND_BYTES));
        }
        let cmd = EventData { event_type: prepare.command.command_type.clone(), data: prepare.command.data.clone() };
        let events = aggregate.prepare(&state, &prepare.txid, &cmd).map_err(|e| e.to_string())?;
        let data = self.checked_domain_events(ctx, &stream, &events).map_err(|o| match o {
            ReplyOutcome::Error(e) => e.message,
            _ => "invalid hold".into(),
        })?;
        let current = self.record(stream.as_str()).map_or(0, |r| r.version);
        self.write_events(ctx, &stream, current, data, &prepare.txid, &prepare.txid)?;
        // A deadline is at most what a transaction may ask for: a hold placed
        // by a prepare that says otherwise is asked about by then.
        let latest = self.now_ms().saturating_add(DEFAULT_HOLD_DEADLINE_MS);
        let deadline_ms = prepare.deadline_ms.map_or(latest, |d| d.min(latest));
        let rec = self.record_mut(&stream, ctx);
        rec.holds.retain(|h| h.txid != prepare.txid);
        rec.holds.push(OpenHold { txid: prepare.txid.clone(), deadline_ms });
        Ok(())
    }

    fn handle_decision(&mut self, ctx: &Context<'_>, msg: Incoming) {
        let decision: Decision = match msg.payload.as_deref().map(serde_json::from_slice::<Decision>) {
            Some(Ok(d)) => d,
            Some(Err(e)) => return self.dead_letter(msg, format!("decision is not valid: {e}")),
            None => return self.dead_letter(msg, "decision has no value"),
        };
        if decision.txid.is_empty() || decision.txid.len() > MAX_TXID_BYTES {
            return self.dead_letter(msg, format!("a txid has 1 to {MAX_TXID_BYTES} characters"));
        }
        let stream = match Self::owned_stream(ctx, &msg, &decision.stream) {
            Ok(s) => s,
            Err(reason) => return self.dead_letter(msg, reason),
        };
        if let Some(why) = Self::foreign(ctx, &stream, &msg) {
            return self.dead_letter(msg, why);
        }
        if let Err(reason) = ctx.writable(&stream).and_then(|()| self.load(stream.as_str())) {
            return self.dead_letter(msg, reason);
        }
        let already = match self.decision_of(stream.as_str(), &decision.txid) {
            Ok(d) => d.is_some(),
            Err(reason) => return self.dead_letter(msg, reason),
        };
        if !already {
            let aggregate = ctx.aggregates.get(stream.category()).cloned();
            let state = self.record(stream.as_str()).and_then(|r| r.state.clone());
            let reason =
                decision.reason.as_deref().map_or_else(|| "aborted".to_owned(), |r| shorten(r, MAX_REASON_BYTES));
            let events = match (&aggregate, &state) {
                (Some(a), Some(s)) => match decision.decision {
                    Verdict::Commit => a.commit(s, &decision.txid),
                    Verdict::Abort => a.abort(s, &decision.txid, &reason),
                },
                _ => Ok(Vec::new()),
            };
            let written = events
                .map_err(|e| format!("the decision cannot be applied: {e}"))
                .and_then(|events| {
                    self.checked_domain_events(ctx, &stream, &events)
                        .map_err(|_| "the aggregate made invalid events for this decision".to_owned())
                })
                .and_then(|data| {
                    let current = self.record(stream.as_str()).map_or(0, |r| r.version);
                    self.write_events(ctx, &stream, current, data, &decision.txid, &decision.txid)
                });
            if let Err(reason) = written {
                return self.dead_letter(msg, reason);
            }
            let rec = self.record_mut(&stream, ctx);
            rec.holds.retain(|h| h.txid != decision.txid);
            let decided =
                Decided { txid: decision.txid.clone(), decision: decision.decision, decided_ms: self.now_ms() };
            self.decisions.push((stream.to_string(), decided));
        }
        let ack = TxAck { txid: decision.txid.clone(), stream: decision.stream.clone(), decision: decision.decision };
        self.vote(ctx, &decision.txid, ParticipantMessage::Ack(ack));
    }

    /// Fills in what depended on the events' offsets (`offsets[i]` is the offset
    /// of `events[i]`): stream indexes, last offsets, positions in replies and in
    /// the remembered answers; serializes every record and checks its size.
    pub fn finish(mut self, ctx: &Context<'_>, partition: i32, offsets: &[i64]) -> Result<Finished, Oversized> {
        assert_eq!(offsets.len(), self.events.len(), "one offset per event");
        let mut pages = Vec::new();
        for run in std::mem::take(&mut self.runs) {
            if let Some(rec) = self.scratch.get_mut(&run.stream) {
                rec.index.push(IndexEntry { version: run.first_version, offset: offsets[run.first_event] });
                if rec.index.len() > INDEX_PAGE_ENTRIES {
                    let entries = rec.index.drain(..INDEX_PAGE_ENTRIES).collect();
                    rec.pages += 1;
                    pages.push(IndexPage { v: 1, stream: run.stream.clone(), entries });
                }
            }
        }
        for (i, e) in self.events.iter().enumerate() {
            if let Some(rec) = self.scratch.get_mut(e.event.stream.as_str()) {
                rec.last_offset = rec.last_offset.max(offsets[i]);
            }
        }
        let position =
            |category: &str, offset: i64| Position { category: category.to_owned(), partition, offset }.to_string();
        let result_of = |stream: &str,
                         first_version: u64,
                         last_version: u64,
                         last_event: Option<usize>,
                         scratch: &HashMap<String, StreamRecord>,
                         loaded: &HashMap<String, Option<StreamRecord>>| {
            let category = stream.split_once('-').map_or("", |(c, _)| c);
            let offset = match last_event {
                Some(i) => offsets[i],
                None => scratch
                    .get(stream)
                    .or_else(|| loaded.get(stream).and_then(Option::as_ref))
                    .map_or(-1, |r| r.last_offset),
            };
            Appended { stream: stream.to_owned(), first_version, last_version, position: position(category, offset) }
        };
        let mut replies = Vec::with_capacity(self.replies.len());
        for (part, request_id, attempt, pending) in std::mem::take(&mut self.replies) {
            let outcome = match pending {
                PendingReply::Ready(o) => o,
                PendingReply::Appended { stream, first_version, last_version, last_event } => ReplyOutcome::Appended(
                    result_of(&stream, first_version, last_version, last_event, &self.scratch, &self.loaded),
                ),
                PendingReply::Head { stream, from } => {
                    let (version, inline, paged) =
                        self.record(&stream).map_or((0, Vec::new(), 0), |r| (r.version, r.index.clone(), r.pages));
                    // Pages of earlier batches, then of this one, then the record's own entries.
                    let mut index = Vec::new();
                    let fresh: Vec<&IndexPage> = pages.iter().filter(|p| p.stream == stream).collect();
                    // Enough pages that, after the runs before `from`, more than a reply's worth remain.
                    let asked = (MAX_HEAD_ENTRIES / INDEX_PAGE_ENTRIES + 2) * INDEX_PAGE_ENTRIES;
                    if paged > fresh.len() as u64 {
                        match self.lookup.index_pages(&stream, from, asked) {
                            Ok(entries) => index = entries,
                            Err(e) => {
                                let reason = self.lookup_failed(e);
                                replies.push(reply_bytes(
                                    part,
                                    request_id,
                                    attempt,
                                    error(ErrorCode::Unavailable, reason),
                                )?);
                                continue;
                            }
                        }
                    }
                    let complete = index.len() < asked;
                    if complete {
                        index.extend(fresh.iter().flat_map(|p| p.entries.iter().copied()));
                        index.extend(inline);
                    }
                    // Drop the runs that end before `from`, keep what fits.
                    let start = index.partition_point(|e| e.version <= from).saturating_sub(1);
                    let mut index = index.split_off(start);
                    let more = !complete || index.len() > MAX_HEAD_ENTRIES;
                    index.truncate(MAX_HEAD_ENTRIES);
                    ReplyOutcome::Head(StreamHead { stream: stream.clone(), version, partition, index, more })
                }
            };
            replies.push(reply_bytes(part, request_id, attempt, outcome)?);
        }
        let mut memories = Vec::with_capacity(self.in_batch.len() + self.decisions.len());
        for InBatch { mut answer, last_event } in std::mem::take(&mut self.in_batch) {
            let r = &answer.result;
            answer.result =
                result_of(&r.stream, r.first_version, r.last_version, last_event, &self.scratch, &self.loaded);
            memories.push(Memory::Answer { stream: answer.result.stream.clone(), answer });
        }
        for (stream, decided) in std::mem::take(&mut self.decisions) {
            memories.push(Memory::Decision { stream, decided });
        }
        let memories = memories
            .into_iter()
            .map(|m| serde_json::to_vec(&m).map(|v| (m, v)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Oversized(format!("an answer does not serialize: {e}")))?;
        let mut records = Vec::with_capacity(self.touched.len());
        for stream in std::mem::take(&mut self.touched) {
            let Some(rec) = self.scratch.remove(&stream) else { continue };
            let value = serde_json::to_vec(&rec).map_err(|e| Oversized(format!("{stream}: {e}")))?;
            if value.len() > ctx.limits.state_bytes() {
                return Err(Oversized(format!(
                    "the state of {stream} would be {} bytes, over the limit of {} (a record must fit the broker's \
                     message.max.bytes); nothing was written",
                    value.len(),
                    ctx.limits.state_bytes()
                )));
            }
            records.push((rec, value));
        }
        // Replicas read positions from state records: keep them in event order.
        records.sort_by_key(|(r, _)| r.last_offset);
        let pages = pages
            .into_iter()
            .map(|p| serde_json::to_vec(&p).map(|v| (p, v)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Oversized(format!("an index page does not serialize: {e}")))?;
        Ok(Finished { records, replies, memories, pages })
    }
}

fn reply_bytes(
    part: i32,
    request_id: String,
    attempt: Option<String>,
    outcome: ReplyOutcome,
) -> Result<(i32, String, Vec<u8>), Oversized> {
    let reply = Reply { request_id, attempt, outcome };
    let value = serde_json::to_vec(&reply).map_err(|e| Oversized(format!("a reply does not serialize: {e}")))?;
    Ok((part, reply.request_id, value))
}

#[cfg(test)]
mod tests;
