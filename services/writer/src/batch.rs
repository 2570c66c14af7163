//! The writer's decisions for one batch of requests, without any I/O.
//!
//! A [`Batch`] reads the partition's committed [`PartitionState`] and records
//! everything the batch changes in a scratch copy: the events to append, the
//! stream records, replies, votes and dead letters. The Kafka side writes the
//! events, learns their offsets, calls [`Batch::finish`] to fill in positions and
//! indexes, writes the rest and commits; only then does [`PartitionState::absorb`]
//! make the scratch the new committed state. An aborted transaction just drops
//! the batch: nothing half-applied survives.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use esk_domain::{DomainError, EventData, Registry};
use esk_wire::partition::partition_for;
use esk_wire::protocol::{
    Answered, Appended, CommandData, Decided, Decision, ErrorCode, ExpectedVersion, IndexEntry, NewEvent,
    ParticipantMessage, Position, Prepare, Reply, ReplyError, ReplyOutcome, Request, RequestBody, StreamHead,
    StreamRecord, TxAck, TxVote, Verdict,
};
use esk_wire::{Event, SchemaRegistry, StreamName};
use serde_json::Value;

/// Requests a stream remembers for idempotent retries.
pub const MAX_ANSWERED: usize = 16;
/// 2PC decisions a stream remembers, so a late duplicate Prepare places no hold.
pub const MAX_DECIDED: usize = 32;
/// Index entries per stream; older runs are merged beyond this.
pub const MAX_INDEX: usize = 32;
/// Events in one request.
pub const MAX_EVENTS_PER_REQUEST: usize = 1000;
/// Bytes of one event's JSON data.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;
/// The CloudEvents source of everything the writer appends.
pub const SOURCE: &str = "esk/writer";

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

/// The committed state of one partition: every stream that hashes to it.
#[derive(Debug, Default)]
pub struct PartitionState {
    pub partition: i32,
    pub streams: HashMap<String, StreamRecord>,
}

impl PartitionState {
    pub fn new(partition: i32) -> Self {
        Self { partition, streams: HashMap::new() }
    }

    /// Makes a finished batch's changes the committed state.
    pub fn absorb(&mut self, records: Vec<StreamRecord>) {
        for r in records {
            self.streams.insert(r.stream.clone(), r);
        }
    }
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

/// Everything a batch decided, with positions still open.
#[derive(Debug)]
pub struct Batch<'s> {
    base: &'s PartitionState,
    scratch: HashMap<String, StreamRecord>,
    touched: Vec<String>,
    runs: Vec<Run>,
    pub events: Vec<OutEvent>,
    replies: Vec<(i32, String, PendingReply)>,
    pub votes: Vec<(i32, String, ParticipantMessage)>,
    pub dead_letters: Vec<DeadLetter>,
    /// Highest offset consumed per input topic.
    pub consumed: HashMap<String, i64>,
    /// Requests answered in this batch, with their last event.
    in_batch: Vec<(Answered, Option<usize>)>,
}

/// A batch with every position known: what to write after the events.
#[derive(Debug)]
pub struct Finished {
    /// New stream records, ordered by their last event's offset.
    pub records: Vec<StreamRecord>,
    /// (replies partition, request id, reply).
    pub replies: Vec<(i32, String, Reply)>,
}

fn error(code: ErrorCode, message: impl Into<String>) -> ReplyOutcome {
    ReplyOutcome::Error(ReplyError { code, message: message.into(), actual_version: None })
}

fn domain_error(e: DomainError) -> ReplyOutcome {
    match e {
        DomainError::Invalid(m) => error(ErrorCode::InvalidInput, m),
        DomainError::Rejected(m) => error(ErrorCode::DomainRefused, m),
    }
}

fn push_bounded<T>(v: &mut Vec<T>, item: T, max: usize) {
    v.push(item);
    if v.len() > max {
        let excess = v.len() - max;
        v.drain(..excess);
    }
}

/// Merges index entries until at most [`MAX_INDEX`] remain, each time dropping
/// the entry whose removal adds the fewest offsets to scan.
pub fn compact_index(index: &mut Vec<IndexEntry>) {
    while index.len() > MAX_INDEX {
        let (drop, _) = (1..index.len() - 1)
            .map(|i| (i, index[i + 1].offset - index[i - 1].offset))
            .min_by_key(|(_, span)| *span)
            .expect("more than MAX_INDEX entries");
        index.remove(drop);
    }
}

fn is_event_type(s: &str) -> bool {
    !s.is_empty() && s.len() <= 100 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

impl<'s> Batch<'s> {
    pub fn new(base: &'s PartitionState) -> Self {
        Self {
            base,
            scratch: HashMap::new(),
            touched: Vec::new(),
            runs: Vec::new(),
            events: Vec::new(),
            replies: Vec::new(),
            votes: Vec::new(),
            dead_letters: Vec::new(),
            consumed: HashMap::new(),
            in_batch: Vec::new(),
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

    fn record(&self, stream: &str) -> Option<&StreamRecord> {
        self.scratch.get(stream).or_else(|| self.base.streams.get(stream))
    }

    fn record_mut(&mut self, stream: &StreamName, ctx: &Context<'_>) -> &mut StreamRecord {
        let name = stream.as_str();
        if !self.scratch.contains_key(name) {
            let rec = self.base.streams.get(name).cloned().unwrap_or_else(|| StreamRecord {
                stream: name.to_owned(),
                version: 0,
                state: ctx.aggregates.get(stream.category()).map(|a| a.initial()),
                last_offset: -1,
                index: Vec::new(),
                answered: Vec::new(),
                decided: Vec::new(),
            });
            self.scratch.insert(name.to_owned(), rec);
        }
        if !self.touched.iter().any(|t| t == name) {
            self.touched.push(name.to_owned());
        }
        self.scratch.get_mut(name).expect("inserted above")
    }

    /// Decides one consumed record.
    pub fn handle(&mut self, ctx: &Context<'_>, msg: Incoming, now: DateTime<Utc>) {
        let next = self.consumed.entry(msg.topic.clone()).or_insert(msg.offset);
        *next = (*next).max(msg.offset);
        match Source::of(msg.input) {
            Source::Commands => self.handle_request(ctx, msg, now),
            Source::Prepare => self.handle_prepare(ctx, msg, now),
            Source::Commit => self.handle_decision(ctx, msg, now),
        }
    }

    fn dead_letter(&mut self, msg: Incoming, reason: impl Into<String>) {
        self.dead_letters.push(DeadLetter { original: msg, reason: reason.into() });
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
                msg.key.as_deref().map(String::from_utf8_lossy)
            ));
        }
        Ok(name)
    }

    fn handle_request(&mut self, ctx: &Context<'_>, msg: Incoming, now: DateTime<Utc>) {
        let Some(payload) = msg.payload.as_deref() else {
            return self.dead_letter(msg, "request has no value");
        };
        let request: Request = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => {
                // Answer if the client can be found, else park the record.
                let reason = format!("request is not valid: {e}");
                let loose: Option<Value> = serde_json::from_slice(payload).ok();
                let id = loose.as_ref().and_then(|v| v.get("request_id")?.as_str().map(str::to_owned));
                let part = loose
                    .as_ref()
                    .and_then(|v| v.get("reply_partition")?.as_i64())
                    .and_then(|p| i32::try_from(p).ok())
                    .filter(|p| (0..ctx.reply_partitions).contains(p));
                return match (id, part) {
                    (Some(id), Some(part)) => {
                        self.reply(part, id, error(ErrorCode::InvalidInput, reason));
                    }
                    _ => self.dead_letter(msg, reason),
                };
            }
        };
        if !(0..ctx.reply_partitions).contains(&request.reply_partition) {
            let reason = format!(
                "reply_partition {} does not exist (the replies topic has {})",
                request.reply_partition, ctx.reply_partitions
            );
            return self.dead_letter(msg, reason);
        }
        let (part, id) = (request.reply_partition, request.request_id.clone());
        let stream = match Self::owned_stream(ctx, &msg, &request.stream) {
            Ok(s) => s,
            Err(m) => return self.reply(part, id, error(ErrorCode::InvalidInput, m)),
        };
        let outcome = match &request.body {
            RequestBody::Head => {
                self.replies.push((part, id, PendingReply::Head { stream: stream.to_string() }));
                return;
            }
            RequestBody::Append { expected_version, events } => {
                self.append(ctx, &request, &stream, *expected_version, events, now)
            }
            RequestBody::Command { expected_version, command } => {
                self.command(ctx, &request, &stream, *expected_version, command, now)
            }
        };
        match outcome {
            Ok(pending) => self.replies.push((part, id, pending)),
            Err(outcome) => self.reply(part, id, outcome),
        }
    }

    fn reply(&mut self, partition: i32, request_id: String, outcome: ReplyOutcome) {
        self.replies.push((partition, request_id, PendingReply::Ready(outcome)));
    }

    /// The first answer to a retried request, if this stream remembers it: from
    /// this batch (its position is filled in with the original's), or committed.
    fn answered(
        &self,
        stream: &str,
        request_id: &str,
        first_event_id: Option<&str>,
        expected: ExpectedVersion,
    ) -> Option<PendingReply> {
        let same = |a: &Answered| {
            a.request_id == request_id
                || (first_event_id.is_some()
                    && a.first_event_id.as_deref() == first_event_id
                    && a.expected_version == expected)
        };
        if let Some((a, last_event)) = self.in_batch.iter().find(|(a, _)| a.result.stream == stream && same(a)) {
            return Some(PendingReply::Appended {
                stream: stream.to_owned(),
                first_version: a.result.first_version,
                last_version: a.result.last_version,
                last_event: *last_event,
            });
        }
        let rec = self.base.streams.get(stream)?;
        rec.answered.iter().find(|a| same(a)).map(|a| PendingReply::Ready(ReplyOutcome::Appended(a.result.clone())))
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
        now: DateTime<Utc>,
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
        let first_id = events[0].id.as_deref();
        if let Some(done) = self.answered(stream.as_str(), &request.request_id, first_id, expected) {
            return Ok(done);
        }
        ctx.writable(stream).map_err(|m| error(ErrorCode::Internal, m))?;
        let current = self.check_version(stream.as_str(), expected)?;
        let mut validated = Vec::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            let at = |m: String| invalid(format!("event {} ({}): {m}", i + 1, e.event_type));
            if !is_event_type(&e.event_type) {
                return Err(invalid(format!(
                    "event {}: type '{}' is not a name (letters, digits, _ . -, at most 100)",
                    i + 1,
                    e.event_type
                )));
            }
            if let Some(id) = &e.id
                && (id.is_empty() || id.len() > 100)
            {
                return Err(at("an event id has 1 to 100 characters".into()));
            }
            let size = serde_json::to_vec(&e.data).map_or(usize::MAX, |v| v.len());
            if size > MAX_EVENT_BYTES {
                return Err(at(format!("data is {size} bytes; the limit is {MAX_EVENT_BYTES}")));
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
        let (first, last, last_event) = self.write(ctx, stream, current, validated, request, now);
        self.remember(ctx, stream, request, first_id, expected, first, last, last_event);
        Ok(PendingReply::Appended { stream: stream.to_string(), first_version: first, last_version: last, last_event })
    }

    fn command(
        &mut self,
        ctx: &Context<'_>,
        request: &Request,
        stream: &StreamName,
        expected: ExpectedVersion,
        command: &CommandData,
        now: DateTime<Utc>,
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
        if let Some(done) = self.answered(stream.as_str(), &request.request_id, None, expected) {
            return Ok(done);
        }
        ctx.writable(stream).map_err(|m| error(ErrorCode::Internal, m))?;
        let current = self.check_version(stream.as_str(), expected)?;
        let state = self.record(stream.as_str()).and_then(|r| r.state.clone()).unwrap_or_else(|| aggregate.initial());
        let cmd = EventData { event_type: command.command_type.clone(), data: command.data.clone() };
        let events = aggregate.handle(&state, &cmd).map_err(domain_error)?;
        let data = self.checked_domain_events(ctx, stream, &events)?;
        let (first, last, last_event) = self.write(ctx, stream, current, data, request, now);
        self.remember(ctx, stream, request, None, expected, first, last, last_event);
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
        now: DateTime<Utc>,
    ) -> (u64, u64, Option<usize>) {
        let correlation = request.correlation_id.clone().unwrap_or_else(|| request.request_id.clone());
        let causation = request.causation_id.clone().unwrap_or_else(|| request.request_id.clone());
        self.write_events(ctx, stream, current, events, &correlation, &causation, now)
    }

    #[allow(clippy::too_many_arguments)]
    fn write_events(
        &mut self,
        ctx: &Context<'_>,
        stream: &StreamName,
        current: u64,
        events: Vec<Checked>,
        correlation: &str,
        causation: &str,
        now: DateTime<Utc>,
    ) -> (u64, u64, Option<usize>) {
        if events.is_empty() {
            return (current, current, None);
        }
        let aggregate = ctx.aggregates.get(stream.category()).cloned();
        let first_event = self.events.len();
        let mut version = current;
        let mut state = self
            .record(stream.as_str())
            .and_then(|r| r.state.clone())
            .or_else(|| aggregate.as_ref().map(|a| a.initial()));
        for Checked { id, event_type, data, schema } in events {
            version += 1;
            if let (Some(agg), Some(s)) = (&aggregate, state.take()) {
                let folded = agg.apply(s, &EventData { event_type: event_type.clone(), data: data.clone() });
                state = Some(folded.expect("events were validated against the aggregate's schemas"));
            }
            self.events.push(OutEvent {
                category: stream.category().to_owned(),
                event: Event {
                    id: id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
                    source: SOURCE.to_owned(),
                    event_type,
                    time: now,
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
        (current + 1, version, Some(self.events.len() - 1))
    }

    #[allow(clippy::too_many_arguments)]
    fn remember(
        &mut self,
        ctx: &Context<'_>,
        stream: &StreamName,
        request: &Request,
        first_event_id: Option<&str>,
        expected: ExpectedVersion,
        first: u64,
        last: u64,
        last_event: Option<usize>,
    ) {
        let entry = Answered {
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
        };
        self.in_batch.push((entry.clone(), last_event));
        let rec = self.record_mut(stream, ctx);
        push_bounded(&mut rec.answered, entry, MAX_ANSWERED);
    }

    fn vote(&mut self, ctx: &Context<'_>, txid: &str, message: ParticipantMessage) {
        let partition = partition_for(txid.as_bytes(), ctx.vote_partitions);
        self.votes.push((partition, txid.to_owned(), message));
    }

    fn handle_prepare(&mut self, ctx: &Context<'_>, msg: Incoming, now: DateTime<Utc>) {
        let prepare: Prepare = match msg.payload.as_deref().map(serde_json::from_slice::<Prepare>) {
            Some(Ok(p)) => p,
            Some(Err(e)) => return self.dead_letter(msg, format!("prepare is not valid: {e}")),
            None => return self.dead_letter(msg, "prepare has no value"),
        };
        let no = |reason: String| TxVote {
            txid: prepare.txid.clone(),
            stream: prepare.stream.clone(),
            yes: false,
            reason: Some(reason),
        };
        let vote = match self.prepare(ctx, &msg, &prepare, now) {
            Ok(()) => TxVote { txid: prepare.txid.clone(), stream: prepare.stream.clone(), yes: true, reason: None },
            Err(reason) => no(reason),
        };
        self.vote(ctx, &prepare.txid, ParticipantMessage::Vote(vote));
    }

    fn prepare(
        &mut self,
        ctx: &Context<'_>,
        msg: &Incoming,
        prepare: &Prepare,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        let stream = Self::owned_stream(ctx, msg, &prepare.stream)?;
        if let Some(d) = self.record(stream.as_str()).and_then(|r| r.decided.iter().find(|d| d.txid == prepare.txid)) {
            // A late duplicate: the decision stands and no new hold is placed.
            return match d.decision {
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
        if aggregate.has_hold(&state, &prepare.txid) {
            return Ok(());
        }
        let cmd = EventData { event_type: prepare.command.command_type.clone(), data: prepare.command.data.clone() };
        let events = aggregate.prepare(&state, &prepare.txid, &cmd).map_err(|e| e.to_string())?;
        let data = self.checked_domain_events(ctx, &stream, &events).map_err(|o| match o {
            ReplyOutcome::Error(e) => e.message,
            _ => "invalid hold".into(),
        })?;
        let current = self.record(stream.as_str()).map_or(0, |r| r.version);
        self.write_events(ctx, &stream, current, data, &prepare.txid, &prepare.txid, now);
        Ok(())
    }

    fn handle_decision(&mut self, ctx: &Context<'_>, msg: Incoming, now: DateTime<Utc>) {
        let decision: Decision = match msg.payload.as_deref().map(serde_json::from_slice::<Decision>) {
            Some(Ok(d)) => d,
            Some(Err(e)) => return self.dead_letter(msg, format!("decision is not valid: {e}")),
            None => return self.dead_letter(msg, "decision has no value"),
        };
        let stream = match Self::owned_stream(ctx, &msg, &decision.stream) {
            Ok(s) => s,
            Err(reason) => return self.dead_letter(msg, reason),
        };
        if let Err(reason) = ctx.writable(&stream) {
            return self.dead_letter(msg, reason);
        }
        let already = self.record(stream.as_str()).is_some_and(|r| r.decided.iter().any(|d| d.txid == decision.txid));
        if !already {
            let aggregate = ctx.aggregates.get(stream.category()).cloned();
            let state = self.record(stream.as_str()).and_then(|r| r.state.clone());
            let events = match (&aggregate, &state) {
                (Some(a), Some(s)) => match decision.decision {
                    Verdict::Commit => a.commit(s, &decision.txid),
                    Verdict::Abort => a.abort(s, &decision.txid, decision.reason.as_deref().unwrap_or("aborted")),
                },
                _ => Vec::new(),
            };
            match self.checked_domain_events(ctx, &stream, &events) {
                Ok(data) => {
                    let current = self.record(stream.as_str()).map_or(0, |r| r.version);
                    self.write_events(ctx, &stream, current, data, &decision.txid, &decision.txid, now);
                }
                Err(_) => {
                    return self.dead_letter(msg, "the aggregate made invalid events for this decision");
                }
            }
            let rec = self.record_mut(&stream, ctx);
            push_bounded(
                &mut rec.decided,
                Decided { txid: decision.txid.clone(), decision: decision.decision },
                MAX_DECIDED,
            );
        }
        let ack = TxAck { txid: decision.txid.clone(), stream: decision.stream.clone(), decision: decision.decision };
        self.vote(ctx, &decision.txid, ParticipantMessage::Ack(ack));
    }

    /// Fills in what depended on the events' offsets (`offsets[i]` is the offset
    /// of `events[i]`): stream indexes, last offsets, positions in replies and in
    /// the remembered answers.
    pub fn finish(mut self, partition: i32, offsets: &[i64]) -> Finished {
        assert_eq!(offsets.len(), self.events.len(), "one offset per event");
        for run in std::mem::take(&mut self.runs) {
            let rec = self.scratch.get_mut(&run.stream).expect("a run's stream is touched");
            rec.index.push(IndexEntry { version: run.first_version, offset: offsets[run.first_event] });
            compact_index(&mut rec.index);
        }
        for (i, e) in self.events.iter().enumerate() {
            let rec = self.scratch.get_mut(e.event.stream.as_str()).expect("an event's stream is touched");
            rec.last_offset = rec.last_offset.max(offsets[i]);
        }
        let position =
            |category: &str, offset: i64| Position { category: category.to_owned(), partition, offset }.to_string();
        let mut replies = Vec::with_capacity(self.replies.len());
        for (part, request_id, pending) in std::mem::take(&mut self.replies) {
            let outcome = match pending {
                PendingReply::Ready(o) => o,
                PendingReply::Appended { stream, first_version, last_version, last_event } => {
                    let category = stream.split_once('-').map_or("", |(c, _)| c);
                    let offset = match last_event {
                        Some(i) => offsets[i],
                        None => self.record(&stream).map_or(-1, |r| r.last_offset),
                    };
                    let result = Appended {
                        stream: stream.clone(),
                        first_version,
                        last_version,
                        position: position(category, offset),
                    };
                    if let Some(rec) = self.scratch.get_mut(&stream)
                        && let Some(a) = rec.answered.iter_mut().find(|a| a.request_id == request_id)
                    {
                        a.result = result.clone();
                    }
                    ReplyOutcome::Appended(result)
                }
                PendingReply::Head { stream } => {
                    let rec = self.record(&stream);
                    ReplyOutcome::Head(StreamHead {
                        stream: stream.clone(),
                        version: rec.map_or(0, |r| r.version),
                        partition,
                        index: rec.map(|r| r.index.clone()).unwrap_or_default(),
                    })
                }
            };
            replies.push((part, request_id.clone(), Reply { request_id, outcome }));
        }
        let mut records: Vec<StreamRecord> =
            self.touched.iter().map(|s| self.scratch.remove(s).expect("touched streams are in scratch")).collect();
        // Replicas read positions from state records: keep them in event order.
        records.sort_by_key(|r| r.last_offset);
        Finished { records, replies }
    }
}

#[cfg(test)]
mod tests;
