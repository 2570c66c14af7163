//! The messages esk's components exchange over Kafka, as JSON values.
//!
//! - [`Request`] on `<prefix>.commands`, key = stream: an append, a domain
//!   command, or a head query. The writer answers each with a [`Reply`] on
//!   `<prefix>.replies`, key = request id, in the partition the client named.
//! - [`Prepare`] on `<prefix>.tx.prepare` and [`Decision`] on `<prefix>.tx.commit`,
//!   key = participant stream; the participant answers with a [`TxVote`] or
//!   [`TxAck`] (a [`ParticipantMessage`]) on `<prefix>.tx.votes`, key = txid.
//! - [`StreamRecord`] on `<prefix>.state`, key = stream: the leader's record of a
//!   stream, which replicas follow and a new owner restores from.
//!
//! Stream names travel as plain strings so that a bad one can be answered with a
//! precise error instead of failing to decode.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// What version a stream must be at for an append to succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpectedVersion {
    /// No check.
    #[default]
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must have at least one event.
    Exists,
    /// The stream's last event must have exactly this version.
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream at `current` (0 = no events) satisfies the expectation.
    pub fn admits(self, current: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current == 0,
            ExpectedVersion::Exists => current > 0,
            ExpectedVersion::Exact(n) => current == n,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no-stream"),
            ExpectedVersion::Exists => f.write_str("exists"),
            ExpectedVersion::Exact(n) => write!(f, "{n}"),
        }
    }
}

impl FromStr for ExpectedVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "any" => Ok(Self::Any),
            "no-stream" | "no_stream" => Ok(Self::NoStream),
            "exists" => Ok(Self::Exists),
            n => n
                .parse()
                .map(Self::Exact)
                .map_err(|_| format!("expected version '{s}' is not any, no-stream, exists or a whole number")),
        }
    }
}

impl Serialize for ExpectedVersion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ExpectedVersion::Exact(n) => s.serialize_u64(*n),
            ExpectedVersion::NoStream => s.serialize_str("no_stream"),
            other => s.serialize_str(&other.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for ExpectedVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Number(n) => n
                .as_u64()
                .map(Self::Exact)
                .ok_or_else(|| serde::de::Error::custom(format!("expected version {n} is not a whole number"))),
            Value::String(s) => s.parse().map_err(serde::de::Error::custom),
            other => Err(serde::de::Error::custom(format!(
                "expected version {other} is not any, no_stream, exists or a number"
            ))),
        }
    }
}

/// An event a client asks to append.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    /// The event id (`ce_id`); the writer makes a UUIDv7 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub event_type: String,
    pub data: Value,
}

/// A domain command: a type and its JSON data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandData {
    #[serde(rename = "type")]
    pub command_type: String,
    #[serde(default)]
    pub data: Value,
}

/// A request to the writer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Unique per request; a retry reuses it and gets the first answer.
    pub request_id: String,
    /// The partition of `<prefix>.replies` the client reads.
    pub reply_partition: i32,
    pub stream: String,
    #[serde(flatten)]
    pub body: RequestBody,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// Unique per send: the reply echoes it, so a client tells the answer to
    /// this attempt from the answer to an earlier attempt of the same request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<String>,
    /// When the first attempt of this request was sent (ms since the epoch);
    /// retries keep it. A request older than the idempotency horizon is
    /// refused (`request_expired`): its first attempt may have been applied,
    /// and the writer no longer remembers. Absent, the time in a UUIDv7
    /// request id counts, else the time the writer reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_ms: Option<i64>,
}

impl Request {
    /// When the request was first sent, as far as it tells.
    pub fn origin_ms(&self) -> Option<i64> {
        self.sent_ms.or_else(|| crate::limits::uuid_v7_ms(&self.request_id))
    }

    /// A stable hash of what the request asks (body and stream), so that a
    /// request id reused for another request is told from a retry.
    pub fn fingerprint(&self) -> u64 {
        let body = serde_json::to_vec(&self.body).unwrap_or_default();
        fnv1a(&[self.stream.as_bytes(), b"\0", &body])
    }
}

/// FNV-1a, 64 bits: stable across builds and platforms (it is stored).
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RequestBody {
    /// Append raw events (checked by version and schema).
    Append {
        #[serde(default)]
        expected_version: ExpectedVersion,
        events: Vec<NewEvent>,
    },
    /// Send a command to the category's aggregate.
    Command {
        #[serde(default)]
        expected_version: ExpectedVersion,
        command: CommandData,
    },
    /// Ask for the stream's head: version and where its events are, the
    /// index from the entry holding version `from` on (at most
    /// [`MAX_HEAD_ENTRIES`] entries; [`StreamHead::more`] says if it goes on).
    Head {
        #[serde(default)]
        from: u64,
    },
}

/// The writer's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub request_id: String,
    /// The request's `attempt`, echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<String>,
    #[serde(flatten)]
    pub outcome: ReplyOutcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ReplyOutcome {
    Appended(Appended),
    Head(StreamHead),
    Error(ReplyError),
    /// A 2PC transaction's state (the coordinator's answer).
    Tx(TxStatus),
}

/// A successful append or command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appended {
    pub stream: String,
    pub first_version: u64,
    pub last_version: u64,
    /// Opaque read-your-writes token (see [`Position`]).
    pub position: String,
}

/// Where a stream stands and where its events are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHead {
    pub stream: String,
    /// 0 when the stream has no events.
    pub version: u64,
    /// The partition of the category topic (and of every co-partitioned topic).
    pub partition: i32,
    /// Offsets in the events partition where runs of the stream's events
    /// start, from the run holding the version asked for: one entry per
    /// append (records written before index pages may have merged runs).
    pub index: Vec<IndexEntry>,
    /// The index goes on beyond these entries (more than
    /// [`MAX_HEAD_ENTRIES`]): ask again from the last entry's version.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
}

/// Index entries a head reply carries at most (about 40 KB of JSON).
pub const MAX_HEAD_ENTRIES: usize = 1024;

/// Index entries a stream record holds inline at most: when an append would
/// make one more, the first [`INDEX_PAGE_ENTRIES`] move to an [`IndexPage`].
pub const INDEX_PAGE_ENTRIES: usize = 32;

/// Events of the stream from `version` on are found from `offset` on in its
/// events partition (interleaved with other streams' events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub version: u64,
    pub offset: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    WrongExpectedVersion,
    InvalidInput,
    DomainRefused,
    Internal,
    /// The request is older than the idempotency horizon and its id is no
    /// longer remembered: it may have been applied. Nothing was written.
    RequestExpired,
    /// The stream cannot be served (its state record was refused); nothing was written.
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyError {
    pub code: ErrorCode,
    pub message: String,
    /// With `wrong_expected_version`: the stream's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_version: Option<u64>,
}

/// A read-your-writes token: the partition and offset of the last event a write
/// produced in its category topic. Clients treat it as an opaque string,
/// `<category>:<partition>:<offset>`. A projector has applied it once its
/// checkpoint for that partition is past the offset; a replica once it has
/// applied a state record of that category and partition whose `last_offset`
/// reaches it (the writer writes state records in event order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub category: String,
    pub partition: i32,
    pub offset: i64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.category, self.partition, self.offset)
    }
}

impl FromStr for Position {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not a position token (it comes from an append or command reply)");
        let mut parts = s.split(':');
        let (Some(category), Some(p), Some(o), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        if !crate::stream::is_valid_category(category) {
            return Err(bad());
        }
        let partition: i32 = p.parse().map_err(|_| bad())?;
        let offset: i64 = o.parse().map_err(|_| bad())?;
        if partition < 0 || offset < -1 {
            return Err(bad());
        }
        Ok(Self { category: category.to_owned(), partition, offset })
    }
}

/// Phase one of a 2PC transaction, for one participant stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prepare {
    pub txid: String,
    pub stream: String,
    pub command: CommandData,
    /// The coordinator's deadline for the votes (ms since the epoch): a hold
    /// still open well after it makes its participant ask for the decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<i64>,
}

/// Phase two: the coordinator's decision for one participant stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub txid: String,
    pub stream: String,
    pub decision: Verdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Commit,
    Abort,
}

/// A participant's vote on a [`Prepare`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxVote {
    pub txid: String,
    pub stream: String,
    pub yes: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The bounded context of the writer that voted (none: the default
    /// one): where the coordinator answers a vote about a transaction it no
    /// longer holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
}

/// A participant's acknowledgement of a [`Decision`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxAck {
    pub txid: String,
    pub stream: String,
    pub decision: Verdict,
}

/// What participants send on `<prefix>.tx.votes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ParticipantMessage {
    Vote(TxVote),
    Ack(TxAck),
}

/// One participant of a 2PC transaction: a stream and the command it must hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Participant {
    pub stream: String,
    pub command: CommandData,
}

/// A request to the coordinator, on `<prefix>.tx.requests`, key = txid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TxRequest {
    /// Start a transaction (or, for a txid already known, ask for its outcome).
    Begin {
        txid: String,
        participants: Vec<Participant>,
        /// How long the participants have to vote before the coordinator aborts.
        timeout_ms: u64,
        reply_partition: i32,
        /// Unique per send, echoed in the reply (see [`Request::attempt`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attempt: Option<String>,
        /// When the first attempt was sent (see [`Request::sent_ms`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sent_ms: Option<i64>,
    },
    /// Ask for a transaction's state.
    Status {
        txid: String,
        reply_partition: i32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attempt: Option<String>,
    },
}

impl TxRequest {
    pub fn txid(&self) -> &str {
        match self {
            TxRequest::Begin { txid, .. } | TxRequest::Status { txid, .. } => txid,
        }
    }

    pub fn reply_partition(&self) -> i32 {
        match self {
            TxRequest::Begin { reply_partition, .. } | TxRequest::Status { reply_partition, .. } => *reply_partition,
        }
    }

    pub fn attempt(&self) -> Option<&str> {
        match self {
            TxRequest::Begin { attempt, .. } | TxRequest::Status { attempt, .. } => attempt.as_deref(),
        }
    }
}

/// A client waiting for a transaction's outcome: where to answer it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiter {
    pub partition: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<String>,
}

/// Where a transaction stands in the coordinator's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TxState {
    /// Prepares sent, votes coming in.
    Preparing,
    /// Decided commit (the commit point); acknowledgements pending.
    Committing,
    /// Decided abort; acknowledgements pending.
    Aborting,
    /// Committed everywhere.
    Committed,
    /// Aborted everywhere.
    Aborted,
    /// The coordinator has no record of it.
    Unknown,
}

impl TxState {
    /// committed, aborted or pending: what a client is told.
    pub fn outcome(self) -> &'static str {
        match self {
            TxState::Committing | TxState::Committed => "committed",
            TxState::Aborting | TxState::Aborted => "aborted",
            TxState::Preparing => "pending",
            TxState::Unknown => "unknown",
        }
    }

    pub fn is_decided(self) -> bool {
        !matches!(self, TxState::Preparing | TxState::Unknown)
    }
}

/// One participant's part in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParticipantState {
    pub stream: String,
    pub command: CommandData,
    /// None until it voted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vote: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default)]
    pub acked: bool,
    /// The bounded context its prepare went to (none: the default one): its
    /// decision goes there too, whatever the registry says later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
}

/// The coordinator's record of a transaction, on `<prefix>.tx.log` (compacted, key = txid).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TxRecord {
    pub txid: String,
    pub state: TxState,
    pub participants: Vec<ParticipantState>,
    /// Wall-clock deadline for the votes, ms since the epoch: it survives restarts.
    pub deadline_ms: i64,
    pub created_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_ms: Option<i64>,
    /// Why it aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The clients waiting for the outcome.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiters: Vec<Waiter>,
    /// When every participant acknowledged the decision (ms since the epoch):
    /// the idempotency horizon counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done_ms: Option<i64>,
}

impl TxRecord {
    /// Committed or aborted, and acknowledged by every participant.
    pub fn is_done(&self) -> bool {
        matches!(self.state, TxState::Committed | TxState::Aborted)
    }

    /// Checks a record read from the log: it must be a transaction the
    /// coordinator could have written under this key.
    pub fn check(&self, key: Option<&[u8]>) -> Result<(), String> {
        if key != Some(self.txid.as_bytes()) {
            return Err(format!(
                "key {:?} is not the record's txid '{}'",
                key.map(String::from_utf8_lossy),
                crate::limits::shorten(&self.txid, 100)
            ));
        }
        if self.txid.is_empty() || self.txid.len() > crate::limits::MAX_TXID_BYTES {
            return Err("the txid is empty or too long".into());
        }
        if self.participants.is_empty() || self.participants.len() > crate::limits::MAX_PARTICIPANTS {
            return Err(format!("{} participants", self.participants.len()));
        }
        if self.state == TxState::Unknown {
            return Err("state 'unknown' is never logged".into());
        }
        let size = serde_json::to_vec(self).map_or(usize::MAX, |v| v.len());
        if size > crate::limits::Limits::default().request_bytes() {
            return Err(format!("{size} bytes, over what the coordinator writes"));
        }
        if self.participants.iter().any(|p| {
            crate::StreamName::parse(&p.stream).is_err()
                || p.reason.as_ref().is_some_and(|r| r.len() > 4 * crate::limits::MAX_REASON_BYTES)
        }) {
            return Err("a participant with a bad stream name or an overlong reason".into());
        }
        if self.state.is_decided() && self.decided_ms.is_none() {
            return Err("a decided transaction without its decision time".into());
        }
        if self.is_done() && !self.participants.iter().all(|p| p.acked) {
            return Err("a done transaction with unacknowledged participants".into());
        }
        if self.state == TxState::Preparing && self.participants.iter().any(|p| p.acked) {
            return Err("an undecided transaction with acknowledgements".into());
        }
        Ok(())
    }
}

/// What a client is told about a transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TxStatus {
    pub txid: String,
    pub state: TxState,
    /// committed, aborted, pending or unknown.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default)]
    pub participants: Vec<ParticipantState>,
}

impl TxStatus {
    pub fn of(record: &TxRecord) -> Self {
        Self {
            txid: record.txid.clone(),
            state: record.state,
            outcome: record.state.outcome().to_owned(),
            reason: record.reason.clone(),
            participants: record.participants.clone(),
        }
    }

    pub fn unknown(txid: &str) -> Self {
        Self {
            txid: txid.to_owned(),
            state: TxState::Unknown,
            outcome: TxState::Unknown.outcome().to_owned(),
            reason: None,
            participants: Vec::new(),
        }
    }
}

/// A request the writer already answered, kept to answer its retries alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answered {
    pub request_id: String,
    /// The id of the first event written, for retries that reuse event ids
    /// under a new request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_event_id: Option<String>,
    pub expected_version: ExpectedVersion,
    pub result: Appended,
    /// [`Request::fingerprint`] of the request answered (0: not known).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub fingerprint: u64,
    /// When it was answered (ms since the epoch); 0 for answers imported
    /// from an older state record.
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub answered_ms: i64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}

/// A 2PC transaction this stream saw decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decided {
    pub txid: String,
    pub decision: Verdict,
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub decided_ms: i64,
}

/// What the writer remembers for the idempotency horizon, on
/// `<prefix>.answers` (delete policy, retention = the horizon), in the
/// stream's partition, written in the same transaction as the events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Memory {
    /// A request answered for `stream`.
    Answer { stream: String, answer: Answered },
    /// A 2PC decision `stream` applied.
    Decision { stream: String, decided: Decided },
}

impl Memory {
    pub fn stream(&self) -> &str {
        match self {
            Memory::Answer { stream, .. } | Memory::Decision { stream, .. } => stream,
        }
    }

    /// When it was answered or decided.
    pub fn time_ms(&self) -> i64 {
        match self {
            Memory::Answer { answer, .. } => answer.answered_ms,
            Memory::Decision { decided, .. } => decided.decided_ms,
        }
    }
}

/// A 2PC hold a stream has open, with the deadline its transaction's votes had.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenHold {
    pub txid: String,
    /// 0 when the prepare carried no deadline.
    #[serde(default)]
    pub deadline_ms: i64,
}

/// Entries of a stream's index that no longer fit its record, on
/// `<prefix>.state` under [`IndexPage::key`] (never replaced: the writer
/// writes each page once, in the transaction of the append that filled it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexPage {
    /// Format version (1).
    pub v: u32,
    pub stream: String,
    /// [`INDEX_PAGE_ENTRIES`] entries, in order; written compact
    /// (`[version, offset]`), read in either form.
    #[serde(with = "compact_index")]
    pub entries: Vec<IndexEntry>,
}

/// Index entries on the state topic: `[version, offset]` pairs rather than
/// `{"version", "offset"}` objects, a third of the bytes (a record's index
/// was most of it; ADR 11). Read in either form: records written before are
/// objects. Replies to clients keep the objects.
mod compact_index {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::IndexEntry;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Pair(u64, i64),
        Entry(IndexEntry),
    }

    pub fn serialize<S: Serializer>(entries: &[IndexEntry], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(entries.iter().map(|e| (e.version, e.offset)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IndexEntry>, D::Error> {
        let entries = Vec::<Either>::deserialize(d)?;
        Ok(entries
            .into_iter()
            .map(|e| match e {
                Either::Pair(version, offset) => IndexEntry { version, offset },
                Either::Entry(e) => e,
            })
            .collect())
    }
}

/// Prefix of every index page's key: not a stream name, like [`CONSUMED_KEY`].
pub const INDEX_PAGE_PREFIX: &str = "\u{1f}i\u{1f}";

impl IndexPage {
    /// Its key on the state topic: the stream and the page's first version.
    pub fn key(stream: &str, first_version: u64) -> String {
        format!("{INDEX_PAGE_PREFIX}{stream}\u{1f}{first_version}")
    }

    pub fn first_version(&self) -> u64 {
        self.entries.first().map_or(0, |e| e.version)
    }

    /// Decodes and checks a record of the state topic whose key starts with
    /// [`INDEX_PAGE_PREFIX`]: its key, its partition, its entries in order.
    pub fn decode(key: &[u8], value: Option<&[u8]>, partition: i32, partitions: i32) -> Result<Self, String> {
        let value = value.ok_or("an index page with no value (a tombstone)")?;
        let page: IndexPage = serde_json::from_slice(value).map_err(|e| format!("not an index page: {e}"))?;
        if page.v != 1 {
            return Err(format!("index page of format {}, this writer knows 1", page.v));
        }
        crate::StreamName::parse(&page.stream).map_err(|e| e.to_string())?;
        if page.entries.is_empty() || page.entries.len() > INDEX_PAGE_ENTRIES {
            return Err(format!("an index page of {} entries", page.entries.len()));
        }
        if page.entries.windows(2).any(|w| w[1].version <= w[0].version || w[1].offset <= w[0].offset)
            || page.entries[0].version < 1
            || page.entries[0].offset < 0
        {
            return Err("its entries are not ordered within versions and offsets".into());
        }
        if key != Self::key(&page.stream, page.first_version()).as_bytes() {
            return Err(format!(
                "key {:?} is not the page's stream and first version",
                crate::limits::shorten(&String::from_utf8_lossy(key), 100)
            ));
        }
        let home = crate::partition::partition_for(page.stream.as_bytes(), partitions);
        if home != partition {
            return Err(format!("stream '{}' belongs to partition {home}, not {partition}", page.stream));
        }
        Ok(page)
    }
}

/// Key of the writer's consumed-positions record on each partition of
/// `<prefix>.state`: not a stream name (stream names have no control
/// characters), so no stream's record can take its place.
pub const CONSUMED_KEY: &str = "\u{1f}consumed";

/// Where the owner of a state-topic partition is in its inputs: the record
/// under [`CONSUMED_KEY`], written in every transaction that consumed
/// anything, atomically with what that consumption produced. A new owner
/// resumes each input of the same partition number from here; Kafka's group
/// offsets are not used (they cost two more round trips a transaction).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumedRecord {
    /// Format version (1).
    pub v: u32,
    /// Input topic → next offset to process.
    pub next: std::collections::BTreeMap<String, i64>,
}

impl ConsumedRecord {
    /// Decodes and checks a record found under [`CONSUMED_KEY`]: every offset
    /// non-negative, a known version.
    pub fn decode(value: Option<&[u8]>) -> Result<Self, String> {
        let value = value.ok_or("a consumed-positions record with no value")?;
        let r: ConsumedRecord =
            serde_json::from_slice(value).map_err(|e| format!("not a consumed-positions record: {e}"))?;
        if r.v != 1 {
            return Err(format!("consumed-positions record of version {}, this writer knows 1", r.v));
        }
        if let Some((topic, n)) = r.next.iter().find(|(t, n)| **n < 0 || t.is_empty()) {
            return Err(format!("consumed-positions record with next offset {n} for topic '{topic}'"));
        }
        Ok(r)
    }
}

/// The leader's record of one stream on `<prefix>.state` (compacted, key = stream).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamRecord {
    pub stream: String,
    pub version: u64,
    /// The aggregate state, for categories with an aggregate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<Value>,
    /// Offset of the stream's last event in its events partition (-1: none).
    pub last_offset: i64,
    /// The latest entries of the stream's index (one per append, at most
    /// [`INDEX_PAGE_ENTRIES`]); the earlier ones are in `pages` index pages.
    /// Written compact (`[version, offset]`), read in either form.
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "compact_index")]
    pub index: Vec<IndexEntry>,
    /// How many [`IndexPage`]s hold the entries before `index`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pages: u64,
    /// The 2PC holds the stream has open.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holds: Vec<OpenHold>,
    /// Read from records of esk before the answers topic, never written:
    /// the writer imports them into its memory of answers.
    #[serde(default, skip_serializing)]
    pub answered: Vec<Answered>,
    /// Likewise for decisions.
    #[serde(default, skip_serializing)]
    pub decided: Vec<Decided>,
}

impl StreamRecord {
    /// A stream with no events yet.
    pub fn new(stream: &str, state: Option<Value>) -> Self {
        Self {
            stream: stream.to_owned(),
            version: 0,
            state,
            last_offset: -1,
            index: Vec::new(),
            pages: 0,
            holds: Vec::new(),
            answered: Vec::new(),
            decided: Vec::new(),
        }
    }

    /// Checks a record read from the state topic against its key, its
    /// partition and the record it would replace: it must be a record the
    /// writer could have written there.
    /// `previous` is the (version, last offset) of the record it replaces.
    pub fn check(
        &self,
        key: Option<&[u8]>,
        partition: i32,
        partitions: i32,
        previous: Option<(u64, i64)>,
    ) -> Result<(), String> {
        if key != Some(self.stream.as_bytes()) {
            return Err(format!(
                "key {:?} is not the record's stream '{}'",
                key.map(|k| crate::limits::shorten(&String::from_utf8_lossy(k), 100)),
                crate::limits::shorten(&self.stream, 100)
            ));
        }
        crate::StreamName::parse(&self.stream).map_err(|e| e.to_string())?;
        let home = crate::partition::partition_for(self.stream.as_bytes(), partitions);
        if home != partition {
            return Err(format!("stream '{}' belongs to partition {home}, not {partition}", self.stream));
        }
        if self.last_offset < -1 {
            return Err(format!("last_offset {} is negative", self.last_offset));
        }
        if self.version > i64::MAX as u64 {
            return Err(format!("version {} is beyond any a stream reaches", self.version));
        }
        if self.holds.len() > crate::limits::MAX_OPEN_HOLDS
            || self.holds.iter().any(|h| h.txid.is_empty() || h.txid.len() > crate::limits::MAX_TXID_BYTES)
        {
            return Err("its open holds are too many or have a txid over the limit".into());
        }
        if self.version > 0 && self.index.is_empty() {
            return Err(format!("version {} with an empty index", self.version));
        }
        if self.index.len() > INDEX_PAGE_ENTRIES {
            return Err(format!("an index of {} entries, over {INDEX_PAGE_ENTRIES}", self.index.len()));
        }
        if self.pages > self.version {
            return Err(format!("{} index pages for version {}", self.pages, self.version));
        }
        if self.index.windows(2).any(|w| w[1].version <= w[0].version || w[1].offset <= w[0].offset)
            || self.index.first().is_some_and(|e| (e.version != 1 && self.pages == 0) || e.version < 1 || e.offset < 0)
            || self.index.last().is_some_and(|e| e.version > self.version || e.offset > self.last_offset)
        {
            return Err("its index is not ordered within its versions and offsets".into());
        }
        if let Some((version, last_offset)) = previous
            && (self.version < version || self.last_offset < last_offset)
        {
            return Err(format!(
                "version {} at offset {} does not follow version {version} at offset {last_offset}",
                self.version, self.last_offset
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn consumed_positions_records_are_checked() {
        let good = br#"{"v":1,"next":{"p.commands":7,"p.tx.commit":0}}"#;
        let r = ConsumedRecord::decode(Some(good)).unwrap();
        assert_eq!(r.next["p.commands"], 7);
        for (bad, why) in [
            (&b"{not json"[..], "not a consumed-positions record"),
            (br#"{"v":2,"next":{}}"#, "version 2"),
            (br#"{"v":1,"next":{"p.commands":-5}}"#, "next offset -5"),
            (br#"{"v":1,"next":{"":3}}"#, "topic ''"),
        ] {
            let err = ConsumedRecord::decode(Some(bad)).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
        assert!(ConsumedRecord::decode(None).unwrap_err().contains("no value"));
        assert!(crate::StreamName::parse(CONSUMED_KEY).is_err(), "the key must not be a stream name");
    }

    #[test]
    fn index_entries_on_the_state_topic_are_pairs_and_either_form_is_read() {
        let mut r = StreamRecord::new("account-7", Some(json!({"balance": 3})));
        r.version = 32;
        r.last_offset = 900;
        r.index = (1..=32).map(|v| IndexEntry { version: v, offset: 1000 + v as i64 * 37 }).collect();
        let compact = serde_json::to_value(&r).unwrap();
        assert_eq!(compact["index"][0], json!([1, 1037]));
        assert_eq!(serde_json::from_value::<StreamRecord>(compact.clone()).unwrap(), r);
        // A record written before: entries as objects.
        let mut old = compact.clone();
        old["index"] = serde_json::to_value(&r.index).unwrap();
        assert_eq!(old["index"][0], json!({"version": 1, "offset": 1037}));
        assert_eq!(serde_json::from_value::<StreamRecord>(old.clone()).unwrap(), r);
        let (new_len, old_len) = (compact.to_string().len(), old.to_string().len());
        assert!(new_len * 2 < old_len, "{new_len} vs {old_len} bytes");
        // Index pages alike; a mixed or broken entry is refused, not misread.
        let page = IndexPage { v: 1, stream: "account-7".into(), entries: r.index };
        let v = serde_json::to_value(&page).unwrap();
        assert_eq!(v["entries"][31], json!([32, 2184]));
        assert_eq!(serde_json::from_value::<IndexPage>(v).unwrap(), page);
        for bad in [json!([[1]]), json!([["a", 2]]), json!([{"version": 1}]), json!([1, 2])] {
            let mut broken = compact.clone();
            broken["index"] = bad.clone();
            assert!(serde_json::from_value::<StreamRecord>(broken).is_err(), "{bad}");
        }
    }

    #[test]
    fn index_pages_are_checked_against_their_key_and_partition() {
        let stream = "account-7";
        let partitions = 12;
        let home = crate::partition::partition_for(stream.as_bytes(), partitions);
        let page = |entries: Value| serde_json::to_vec(&json!({"v": 1, "stream": stream, "entries": entries})).unwrap();
        let good = page(json!([{"version": 33, "offset": 900}, {"version": 35, "offset": 960}]));
        let key = IndexPage::key(stream, 33);
        let p = IndexPage::decode(key.as_bytes(), Some(&good), home, partitions).unwrap();
        assert_eq!((p.first_version(), p.entries.len()), (33, 2));
        assert!(crate::StreamName::parse(&key).is_err(), "a page's key must not be a stream name");

        let many: Vec<Value> = (1..=33).map(|i| json!({"version": i, "offset": i * 10})).collect();
        for (bytes, k, why) in [
            (b"{not json".to_vec(), key.clone(), "not an index page"),
            (serde_json::to_vec(&json!({"v": 2, "stream": stream, "entries": []})).unwrap(), key.clone(), "format 2"),
            (page(json!([])), key.clone(), "0 entries"),
            (page(Value::Array(many)), IndexPage::key(stream, 1), "33 entries"),
            (page(json!([{"version": 33, "offset": 900}, {"version": 33, "offset": 960}])), key.clone(), "not ordered"),
            (page(json!([{"version": 33, "offset": 900}, {"version": 34, "offset": 800}])), key.clone(), "not ordered"),
            (page(json!([{"version": 0, "offset": 900}])), IndexPage::key(stream, 0), "not ordered"),
            (good.clone(), IndexPage::key(stream, 34), "is not the page's stream and first version"),
            (good.clone(), IndexPage::key("account-8", 33), "is not the page's stream and first version"),
            (
                serde_json::to_vec(&json!({"v": 1, "stream": "no dash", "entries": [{"version": 1, "offset": 0}]}))
                    .unwrap(),
                IndexPage::key("no dash", 1),
                "",
            ),
        ] {
            let err = IndexPage::decode(k.as_bytes(), Some(&bytes), home, partitions).unwrap_err();
            assert!(err.contains(why), "{why}: {err}");
        }
        let elsewhere = (home + 1) % partitions;
        assert!(
            IndexPage::decode(key.as_bytes(), Some(&good), elsewhere, partitions)
                .unwrap_err()
                .contains(&format!("belongs to partition {home}"))
        );
        assert!(IndexPage::decode(key.as_bytes(), None, home, partitions).unwrap_err().contains("tombstone"));
    }

    #[test]
    fn expected_versions_parse_and_serialize() {
        for (text, v) in [
            ("any", ExpectedVersion::Any),
            ("no-stream", ExpectedVersion::NoStream),
            ("exists", ExpectedVersion::Exists),
            ("7", ExpectedVersion::Exact(7)),
        ] {
            assert_eq!(text.parse::<ExpectedVersion>().unwrap(), v);
            let back: ExpectedVersion = serde_json::from_value(serde_json::to_value(v).unwrap()).unwrap();
            assert_eq!(back, v);
        }
        assert!("-1".parse::<ExpectedVersion>().is_err());
        assert!("latest".parse::<ExpectedVersion>().unwrap_err().contains("'latest'"));
        assert!(ExpectedVersion::NoStream.admits(0) && !ExpectedVersion::NoStream.admits(1));
        assert!(ExpectedVersion::Exists.admits(3) && !ExpectedVersion::Exists.admits(0));
        assert!(ExpectedVersion::Exact(2).admits(2) && !ExpectedVersion::Exact(2).admits(3));
    }

    #[test]
    fn requests_have_a_stable_json_shape() {
        let r = Request {
            request_id: "r1".into(),
            reply_partition: 2,
            stream: "account-1".into(),
            body: RequestBody::Append {
                expected_version: ExpectedVersion::NoStream,
                events: vec![NewEvent { id: None, event_type: "AccountOpened".into(), data: json!({"owner": "ann"}) }],
            },
            correlation_id: None,
            causation_id: None,
            attempt: None,
            sent_ms: None,
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["kind"], "append");
        assert_eq!(v["expected_version"], "no_stream");
        assert_eq!(serde_json::from_value::<Request>(v).unwrap(), r);
        let head: Request =
            serde_json::from_value(json!({"request_id": "x", "reply_partition": 0, "stream": "a-1", "kind": "head"}))
                .unwrap();
        assert_eq!(head.body, RequestBody::Head { from: 0 });
    }

    #[test]
    fn replies_round_trip() {
        let r = Reply {
            request_id: "r".into(),
            attempt: Some("a1".into()),
            outcome: ReplyOutcome::Error(ReplyError {
                code: ErrorCode::WrongExpectedVersion,
                message: "m".into(),
                actual_version: Some(3),
            }),
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["status"], "error");
        assert_eq!(v["code"], "wrong_expected_version");
        assert_eq!(serde_json::from_value::<Reply>(v).unwrap(), r);
    }

    #[test]
    fn positions_are_checked() {
        let p: Position = "account:3:1042".parse().unwrap();
        assert_eq!((p.partition, p.offset), (3, 1042));
        assert_eq!(p.to_string(), "account:3:1042");
        for bad in ["", "account:3", "Account:1:2", "account:x:1", "account:-1:1", "a:1:2:3", "account:1:1.5"] {
            assert!(bad.parse::<Position>().is_err(), "{bad}");
        }
    }
}
