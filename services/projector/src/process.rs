//! Process managers (sagas): long-running work across streams and contexts,
//! driven by events, with compensation (ADR 14).
//!
//! A [`Process`] reacts to events of the categories it reads (from any
//! context), to the answers to the commands it sent, and to its deadlines.
//! Each reaction changes the process's state and may send commands, set or
//! cancel deadlines, and finish the process ([`Effects`]).
//!
//! Delivery guarantee: **each reaction takes effect once**.
//! - An event's reaction is applied by the projection runner, in the batch's
//!   local transaction with the checkpoint: the process's state, the
//!   commands to send (an outbox) and its deadlines change with the offsets
//!   consumed, so a crash replays the event into the state it found.
//! - The sender sends each outbox command with a request id made of the
//!   manager, the process and the step (`pm:<manager>:<process>:<step>`), and
//!   applies the answer in one local transaction that also removes the command
//!   from the outbox. A crash between the two sends it again under the same
//!   id, and the writer answers with the first result for the idempotency
//!   horizon: a step takes effect once, and its answer is reacted to once.
//!   A refusal is not remembered by the writer (it wrote nothing), so a
//!   retried refused command is decided afresh; the process reacts to the
//!   answer it got first *and recorded*.
//! - A command not answered (Kafka or the writer unreachable) stays in the
//!   outbox and is sent again with a backoff (0.1 s doubling to 30 s), for as
//!   long as it takes; a process bounds how long it waits with a deadline.
//!   One answered "expired" (older than the horizon, not remembered) is
//!   handed to the process as [`Answer::Expired`].
//! - A deadline fires once: removed in the transaction that applies its
//!   reaction.
//!
//! Bounds: at most [`MAX_IN_FLIGHT`] commands of a manager in flight; step
//! and deadline names at most 64 characters; a step name is used once per
//! process (it makes the request id); a finished process with nothing left
//! to send is removed [`FINISHED_KEPT`] (7 days) after it finished
//! (`esk_process_processes`, `esk_process_forgotten_total`). A process manager's store is not
//! rebuilt (a rebuild would send its commands again): `POST
//! /projections/{name}/rebuild` answers 409.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use esk_client::{Client, ClientError};
use esk_projection::sqlite::SqliteStore;
use esk_projection::{ApplyError, Projection, StoreError};
use esk_wire::Event;
use esk_wire::protocol::{CommandData, ExpectedVersion};
use rusqlite::{Connection, OptionalExtension, params};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Most commands of one manager waiting for their answers at once.
pub const MAX_IN_FLIGHT: usize = 64;
/// Longest step or deadline name.
pub const MAX_NAME: usize = 64;
/// How often the sender looks for new outbox commands and due deadlines.
const TICK: Duration = Duration::from_millis(50);
/// The longest wait before a command that got no answer is sent again.
const MAX_BACKOFF_MS: i64 = 30_000;
/// How long a finished process with nothing left to send is kept (its
/// state, steps and answers, for `/processes` and against a step sent again):
/// 7 days, esk's default idempotency horizon. Then it is removed, so the
/// store holds the processes of the last 7 days, however many there were.
pub const FINISHED_KEPT: Duration = Duration::from_secs(7 * 86_400);

/// A process manager: what it reads, how an event finds its process, and
/// its reactions. Reactions are pure: they change the state and ask for
/// effects; the runtime does the rest exactly once.
pub trait Process: Send + Sync + 'static {
    /// One process's state (JSON in the manager's store).
    type State: Serialize + DeserializeOwned + Default + Send;

    /// Names the manager's store, group, dead-letter topic and its commands'
    /// request ids: category-like, unique in the installation.
    fn name(&self) -> &str;

    /// The categories whose events it reacts to (of any context).
    fn categories(&self) -> Vec<String>;

    /// The process an event belongs to; `None`: not this manager's business.
    fn correlate(&self, event: &Event) -> Option<String>;

    /// An event of the process happened.
    fn on_event(&self, state: &mut Self::State, event: &Event, fx: &mut Effects);

    /// The command sent as `step` was answered.
    fn on_answer(&self, state: &mut Self::State, step: &str, answer: &Answer, fx: &mut Effects);

    /// The deadline `name` passed.
    fn on_deadline(&self, state: &mut Self::State, name: &str, fx: &mut Effects);
}

/// A command a reaction sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outgoing {
    /// The step's name: unique in its process, it makes the request id.
    pub step: String,
    pub stream: String,
    pub command: CommandData,
    pub expected: ExpectedVersion,
}

/// What a reaction asks for.
#[derive(Debug, Default)]
pub struct Effects {
    commands: Vec<Outgoing>,
    deadlines: Vec<(String, Duration)>,
    cancelled: Vec<String>,
    finished: bool,
}

impl Effects {
    /// Sends `command_type` with `data` to `stream` as the step `step`, at any version.
    pub fn send(&mut self, step: &str, stream: &str, command_type: &str, data: Value) {
        self.send_expecting(step, stream, ExpectedVersion::Any, command_type, data);
    }

    /// Sends a command that expects the stream at `expected`.
    pub fn send_expecting(
        &mut self,
        step: &str,
        stream: &str,
        expected: ExpectedVersion,
        command_type: &str,
        data: Value,
    ) {
        let command = CommandData { command_type: command_type.to_owned(), data };
        self.commands.push(Outgoing { step: step.to_owned(), stream: stream.to_owned(), command, expected });
    }

    /// Sets (or moves) the deadline `name` to `after` from now.
    pub fn deadline(&mut self, name: &str, after: Duration) {
        self.cancelled.retain(|n| n != name);
        self.deadlines.push((name.to_owned(), after));
    }

    /// Cancels the deadline `name`, if set.
    pub fn cancel_deadline(&mut self, name: &str) {
        self.deadlines.retain(|(n, _)| n != name);
        self.cancelled.push(name.to_owned());
    }

    /// The process is over: its deadlines are cancelled; commands already
    /// asked for are still sent and their answers still reacted to.
    pub fn finish(&mut self) {
        self.finished = true;
    }

    /// The commands asked for so far.
    pub fn commands(&self) -> &[Outgoing] {
        &self.commands
    }
}

/// How a command the process sent was answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Answer {
    /// Applied: its events' versions and a read-your-writes position.
    Done { first_version: u64, last_version: u64, position: String },
    /// The aggregate refused it (a rule); nothing was written.
    Refused { message: String },
    /// The command was not valid; nothing was written.
    Invalid { message: String },
    /// The stream was not at the version expected; nothing was written.
    WrongExpectedVersion { actual: u64, message: String },
    /// Sent again after the idempotency horizon and not remembered: it may or
    /// may not have been applied.
    Expired { message: String },
}

impl Answer {
    pub fn is_done(&self) -> bool {
        matches!(self, Answer::Done { .. })
    }
}

/// The request id of a step: `pm:<manager>:<process>:<step>`. A process id
/// that does not fit (the id over 128 characters in all, or not visible ASCII
/// without ':') is replaced by its hash, `#<16 hex>`; if even that does not
/// fit, the whole id is `pm:#<32 hex>` (two 64-bit FNV-1a hashes).
pub fn request_id(manager: &str, process: &str, step: &str) -> String {
    let max = esk_wire::limits::MAX_REQUEST_ID_BYTES;
    let plain = format!("pm:{manager}:{process}:{step}");
    if plain.len() <= max && process.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        return plain;
    }
    let hashed = format!("pm:{manager}:#{:016x}:{step}", fnv(process.as_bytes(), 0));
    if hashed.len() <= max {
        return hashed;
    }
    let whole = format!("{manager}\0{process}\0{step}");
    format!("pm:#{:016x}{:016x}", fnv(whole.as_bytes(), 0), fnv(whole.as_bytes(), 1))
}

/// 64-bit FNV-1a, its offset basis varied by `seed`.
fn fnv(bytes: &[u8], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} '{}': 1 to {MAX_NAME} letters, digits, '_', '-' or '.'",
            esk_wire::limits::shorten(name, 80)
        ))
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS pm_process (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    finished INTEGER NOT NULL DEFAULT 0,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pm_steps (
    process TEXT NOT NULL,
    step TEXT NOT NULL,
    PRIMARY KEY (process, step)
);
CREATE TABLE IF NOT EXISTS pm_outbox (
    request_id TEXT PRIMARY KEY,
    process TEXT NOT NULL,
    step TEXT NOT NULL,
    stream TEXT NOT NULL,
    command TEXT NOT NULL,
    expected TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_ms INTEGER NOT NULL,
    last_error TEXT,
    invalid TEXT
);
CREATE INDEX IF NOT EXISTS pm_outbox_next ON pm_outbox (next_ms);
CREATE TABLE IF NOT EXISTS pm_answers (
    request_id TEXT PRIMARY KEY,
    process TEXT NOT NULL,
    step TEXT NOT NULL,
    answer TEXT NOT NULL,
    answered_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pm_deadlines (
    process TEXT NOT NULL,
    name TEXT NOT NULL,
    due_ms INTEGER NOT NULL,
    PRIMARY KEY (process, name)
);
CREATE INDEX IF NOT EXISTS pm_deadlines_due ON pm_deadlines (due_ms);
";

/// Creates the manager's tables.
pub fn migrate(c: &Connection) -> rusqlite::Result<()> {
    c.execute_batch(SCHEMA)
}

fn load<P: Process>(c: &Connection, id: &str) -> Result<P::State, String> {
    let raw: Option<String> = c
        .prepare_cached("SELECT state FROM pm_process WHERE id = ?1")
        .and_then(|mut s| s.query_row([id], |r| r.get(0)).optional())
        .map_err(|e| e.to_string())?;
    match raw {
        None => Ok(P::State::default()),
        Some(raw) => serde_json::from_str(&raw).map_err(|e| format!("the state of process '{id}' does not read: {e}")),
    }
}

/// Why a reaction could not be kept: the store failed (retry), or its state
/// does not serialize (a bug of the process: its input is parked or logged).
#[derive(Debug)]
enum Failed {
    Store(String),
    Refused(String),
}

impl From<rusqlite::Error> for Failed {
    fn from(e: rusqlite::Error) -> Self {
        Failed::Store(e.to_string())
    }
}

/// An effect a reaction may not have: logged and counted, and the rest kept.
fn refuse_effect(manager: &str, process: &str, why: &str) {
    tracing::error!(manager, process, "an effect of a reaction was refused: {why}");
    metrics::counter!("esk_process_refused_reactions_total", "process" => manager.to_owned()).increment(1);
}

/// Keeps a reaction: the state, the commands (outbox), the deadlines. A
/// command to a stream that is not a stream name is kept as answered
/// `Invalid` (the sender answers it without sending, so the process hears of
/// it); a step name used before or not a name, and a deadline name that is
/// not a name, are refused alone.
fn keep<P: Process>(c: &Connection, p: &P, id: &str, state: &P::State, fx: Effects, now_ms: i64) -> Result<(), Failed> {
    let state =
        serde_json::to_string(state).map_err(|e| Failed::Refused(format!("the state does not serialize: {e}")))?;
    c.prepare_cached(
        "INSERT INTO pm_process (id, state, finished, updated_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (id) DO UPDATE SET state = excluded.state, finished = MAX(finished, excluded.finished),
         updated_ms = excluded.updated_ms",
    )?
    .execute(params![id, state, fx.finished, now_ms])?;
    for out in fx.commands {
        if let Err(why) = check_name("step", &out.step) {
            refuse_effect(p.name(), id, &why);
            continue;
        }
        let new = c
            .prepare_cached("INSERT OR IGNORE INTO pm_steps (process, step) VALUES (?1, ?2)")?
            .execute(params![id, out.step])?;
        if new == 0 {
            let why = format!(
                "a step named '{}' was sent before: a step name is used once in a process (it makes the command's \
                 request id)",
                out.step
            );
            refuse_effect(p.name(), id, &why);
            continue;
        }
        let invalid = esk_wire::StreamName::parse(&out.stream).err().map(|e| format!("step {}: {e}", out.step));
        let command = serde_json::to_string(&out.command).map_err(|e| Failed::Refused(e.to_string()))?;
        c.prepare_cached(
            "INSERT INTO pm_outbox (request_id, process, step, stream, command, expected, created_ms, next_ms, invalid)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8)",
        )?
        .execute(params![
            request_id(p.name(), id, &out.step),
            id,
            out.step,
            out.stream,
            command,
            out.expected.to_string(),
            now_ms,
            invalid
        ])?;
    }
    for name in fx.cancelled {
        c.prepare_cached("DELETE FROM pm_deadlines WHERE process = ?1 AND name = ?2")?.execute(params![id, name])?;
    }
    if fx.finished {
        c.prepare_cached("DELETE FROM pm_deadlines WHERE process = ?1")?.execute([id])?;
    } else {
        for (name, after) in fx.deadlines {
            if let Err(why) = check_name("deadline", &name) {
                refuse_effect(p.name(), id, &why);
                continue;
            }
            let due = now_ms.saturating_add(after.as_millis().min(i64::MAX as u128) as i64);
            c.prepare_cached(
                "INSERT INTO pm_deadlines (process, name, due_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (process, name) DO UPDATE SET due_ms = excluded.due_ms",
            )?
            .execute(params![id, name, due])?;
        }
    }
    Ok(())
}

/// Runs a reaction of the process's code; a panic in it is an error (the
/// caller parks its event, or sends its command again later).
fn react<P: Process>(
    p: &P,
    state: &mut P::State,
    f: impl FnOnce(&P, &mut P::State, &mut Effects),
) -> Result<Effects, String> {
    let mut fx = Effects::default();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(p, state, &mut fx)))
        .map_err(|_| format!("a reaction of process manager '{}' panicked", p.name()))?;
    Ok(fx)
}

/// The reaction to one event, in the runner's transaction.
fn react_to_event<P: Process>(c: &Connection, p: &P, event: &Event, now_ms: i64) -> Result<(), ApplyError> {
    let id = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.correlate(event)))
        .map_err(|_| ApplyError::Permanent(format!("process manager '{}' panicked correlating it", p.name())))?;
    let Some(id) = id else { return Ok(()) };
    let mut state = load::<P>(c, &id).map_err(ApplyError::Permanent)?;
    let fx = react(p, &mut state, |p, s, fx| p.on_event(s, event, fx)).map_err(ApplyError::Permanent)?;
    keep(c, p, &id, &state, fx, now_ms).map_err(|e| match e {
        Failed::Store(m) => ApplyError::Transient(m),
        Failed::Refused(m) => ApplyError::Permanent(m),
    })
}

/// A command of the outbox.
#[derive(Debug, Clone)]
struct Queued {
    request_id: String,
    process: String,
    step: String,
    stream: String,
    command: CommandData,
    expected: ExpectedVersion,
    attempts: i64,
    /// When it was queued: the request's first-attempt time.
    created_ms: i64,
    /// Why it cannot be sent (answered `Invalid` without sending).
    invalid: Option<String>,
}

fn due_commands(c: &Connection, now_ms: i64, limit: usize) -> rusqlite::Result<Vec<Queued>> {
    let mut s = c.prepare_cached(
        "SELECT request_id, process, step, stream, command, expected, attempts, created_ms, invalid FROM pm_outbox
         WHERE next_ms <= ?1 ORDER BY next_ms LIMIT ?2",
    )?;
    let rows = s.query_map(params![now_ms, limit as i64], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, String>(5)?,
            r.get::<_, i64>(6)?,
            r.get::<_, i64>(7)?,
            r.get::<_, Option<String>>(8)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (request_id, process, step, stream, command, expected, attempts, created_ms, invalid) = row?;
        // Written by `keep` from valid values; a row that does not read is skipped (and stays, for an operator).
        let (Ok(command), Ok(expected)) = (serde_json::from_str(&command), expected.parse()) else {
            tracing::error!(request_id, "an outbox command does not read; left in the outbox");
            continue;
        };
        out.push(Queued { request_id, process, step, stream, command, expected, attempts, created_ms, invalid });
    }
    Ok(out)
}

/// Applies the answer to an outbox command, once: `false` when the command
/// had left the outbox already (answered before).
fn react_to_answer<P: Process>(
    c: &mut Connection,
    p: &P,
    request_id: &str,
    answer: &Answer,
    now_ms: i64,
) -> Result<bool, String> {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(|e| e.to_string())?;
    let found: Option<(String, String)> = tx
        .prepare_cached("SELECT process, step FROM pm_outbox WHERE request_id = ?1")
        .and_then(|mut s| s.query_row([request_id], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(|e| e.to_string())?;
    let Some((process, step)) = found else { return Ok(false) };
    let mut state = load::<P>(&tx, &process)?;
    let fx = react(p, &mut state, |p, s, fx| p.on_answer(s, &step, answer, fx))?;
    match keep(&tx, p, &process, &state, fx, now_ms) {
        Ok(()) => {}
        Err(Failed::Store(e)) => return Err(e),
        Err(Failed::Refused(why)) => {
            // The state does not serialize: the answer is recorded, the
            // reaction is not (an error for its author).
            refuse_effect(p.name(), &process, &why);
            drop(tx);
            return record_only(c, request_id, &process, &step, answer, now_ms).map(|()| true);
        }
    }
    let answer_json = serde_json::to_string(answer).map_err(|e| e.to_string())?;
    tx.prepare_cached("DELETE FROM pm_outbox WHERE request_id = ?1")
        .and_then(|mut s| s.execute([request_id]))
        .map_err(|e| e.to_string())?;
    tx.prepare_cached(
        "INSERT OR REPLACE INTO pm_answers (request_id, process, step, answer, answered_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .and_then(|mut s| s.execute(params![request_id, process, step, answer_json, now_ms]))
    .map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())?;
    Ok(true)
}

/// Records an answer whose reaction was refused, and removes its command.
fn record_only(
    c: &mut Connection,
    request_id: &str,
    process: &str,
    step: &str,
    answer: &Answer,
    now_ms: i64,
) -> Result<(), String> {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(|e| e.to_string())?;
    let answer_json = serde_json::to_string(answer).map_err(|e| e.to_string())?;
    tx.execute("DELETE FROM pm_outbox WHERE request_id = ?1", [request_id]).map_err(|e| e.to_string())?;
    tx.execute(
        "INSERT OR REPLACE INTO pm_answers (request_id, process, step, answer, answered_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![request_id, process, step, answer_json, now_ms],
    )
    .map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())
}

/// Fires the deadlines due at `now_ms`, each once (at most `limit`): how many
/// fired. One whose reaction cannot be kept (its state does not read, the
/// reaction panicked, the store failed) is put off by 30 s, logged and
/// counted, and the others fire.
fn fire_deadlines<P: Process>(c: &mut Connection, p: &P, now_ms: i64, limit: usize) -> Result<usize, String> {
    let due: Vec<(String, String)> = c
        .prepare_cached("SELECT process, name FROM pm_deadlines WHERE due_ms <= ?1 ORDER BY due_ms LIMIT ?2")
        .and_then(|mut s| {
            s.query_map(params![now_ms, limit as i64], |r| Ok((r.get(0)?, r.get(1)?))).and_then(Iterator::collect)
        })
        .map_err(|e| e.to_string())?;
    let mut fired = 0;
    for (process, name) in due {
        match fire_one(c, p, &process, &name, now_ms) {
            Ok(true) => fired += 1,
            Ok(false) => {}
            Err(why) => {
                tracing::warn!(manager = p.name(), process, name, "a deadline's reaction: {why}; again in 30 s");
                metrics::counter!("esk_process_retries_total", "process" => p.name().to_owned()).increment(1);
                c.execute(
                    "UPDATE pm_deadlines SET due_ms = ?3 WHERE process = ?1 AND name = ?2",
                    params![process, name, now_ms + MAX_BACKOFF_MS],
                )
                .map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(fired)
}

/// One deadline's reaction, in one transaction with the deadline's removal.
fn fire_one<P: Process>(c: &mut Connection, p: &P, process: &str, name: &str, now_ms: i64) -> Result<bool, String> {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(|e| e.to_string())?;
    let gone = tx
        .execute(
            "DELETE FROM pm_deadlines WHERE process = ?1 AND name = ?2 AND due_ms <= ?3",
            params![process, name, now_ms],
        )
        .map_err(|e| e.to_string())?;
    if gone == 0 {
        return Ok(false);
    }
    let mut state = load::<P>(&tx, process)?;
    let fx = react(p, &mut state, |p, s, fx| p.on_deadline(s, name, fx))?;
    match keep(&tx, p, process, &state, fx, now_ms) {
        Ok(()) => tx.commit().map_err(|e| e.to_string())?,
        Err(Failed::Store(e)) => return Err(e),
        Err(Failed::Refused(why)) => {
            // The state does not serialize: the deadline is gone, nothing else changes.
            refuse_effect(p.name(), process, &why);
            drop(tx);
            c.execute("DELETE FROM pm_deadlines WHERE process = ?1 AND name = ?2", params![process, name])
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(true)
}

/// A command that got no answer goes back to the outbox for later.
fn postpone(c: &Connection, q: &Queued, why: &str, now_ms: i64) -> rusqlite::Result<()> {
    let backoff = (100i64 << q.attempts.clamp(0, 20)).min(MAX_BACKOFF_MS);
    c.execute(
        "UPDATE pm_outbox SET attempts = attempts + 1, next_ms = ?2, last_error = ?3 WHERE request_id = ?1",
        params![q.request_id, now_ms + backoff, esk_wire::limits::shorten(why, 500)],
    )?;
    Ok(())
}

/// What a client's result means to a process: an answer, or "no answer yet".
fn answer_of(result: Result<esk_wire::protocol::Appended, ClientError>) -> Result<Answer, String> {
    match result {
        Ok(a) => {
            Ok(Answer::Done { first_version: a.first_version, last_version: a.last_version, position: a.position })
        }
        Err(ClientError::Refused(message)) => Ok(Answer::Refused { message }),
        Err(ClientError::Invalid(message)) => Ok(Answer::Invalid { message }),
        Err(ClientError::WrongExpectedVersion { message, actual }) => {
            Ok(Answer::WrongExpectedVersion { actual, message })
        }
        Err(ClientError::Expired(message)) => Ok(Answer::Expired { message }),
        Err(e @ (ClientError::Unavailable(_) | ClientError::Internal(_))) => Err(e.to_string()),
    }
}

/// Removes processes finished before `before_ms` with nothing left in their
/// outbox (at most `limit` a call): how many.
fn forget_finished(c: &mut Connection, before_ms: i64, limit: usize) -> rusqlite::Result<usize> {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let ids: Vec<String> = tx
        .prepare(
            "SELECT id FROM pm_process p WHERE finished = 1 AND updated_ms < ?1
             AND NOT EXISTS (SELECT 1 FROM pm_outbox o WHERE o.process = p.id) LIMIT ?2",
        )?
        .query_map(params![before_ms, limit as i64], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for id in &ids {
        for table in ["pm_steps", "pm_answers", "pm_deadlines"] {
            tx.execute(&format!("DELETE FROM {table} WHERE process = ?1"), [id])?;
        }
        tx.execute("DELETE FROM pm_process WHERE id = ?1", [id])?;
    }
    tx.commit()?;
    Ok(ids.len())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A [`Process`] as the projection the runner applies events with.
pub struct Manager<P>(pub Arc<P>);

impl<P: Process> std::fmt::Debug for Manager<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Manager").field(&self.0.name()).finish()
    }
}

impl<P: Process> Projection<SqliteStore> for Manager<P> {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn categories(&self) -> Vec<String> {
        self.0.categories()
    }

    fn migrate(&self, store: &mut SqliteStore) -> Result<(), StoreError> {
        store.execute_batch(SCHEMA)
    }

    fn apply(&self, tx: &mut rusqlite::Transaction<'_>, event: &Event) -> Result<(), ApplyError> {
        react_to_event(tx, self.0.as_ref(), event, now_ms())
    }
}

/// Opens a writing connection to a manager's store.
fn open(path: &std::path::Path) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(10))?;
    Ok(c)
}

/// Work on a manager's store, off the async threads.
type StoreJob = Box<dyn FnOnce(&mut Connection) -> Result<usize, String> + Send>;

/// The sender of one manager: outbox commands out, answers and due
/// deadlines into reactions, until `shutdown`.
pub(crate) async fn send<P: Process>(
    process: Arc<P>,
    path: PathBuf,
    client: Arc<Client>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let name = process.name().to_owned();
    let conn = Arc::new(Mutex::new(open(&path)?));
    // Every store job off the async threads; one that panicked (a process's
    // reaction is caught already) is an error for this round, not the end.
    let blocking = |f: StoreJob| {
        let conn = conn.clone();
        async move {
            tokio::task::spawn_blocking(move || f(&mut conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner)))
                .await
                .map_err(|e| format!("a store job failed: {e}"))?
        }
    };
    let mut in_flight: HashSet<String> = HashSet::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut answered = Vec::new();
    let mut gauge_at = std::time::Instant::now();
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        let p = process.clone();
        if let Err(e) = blocking(Box::new(move |c| fire_deadlines(c, p.as_ref(), now_ms(), 256))).await {
            tracing::warn!(process = name, "deadlines: {e}; again shortly");
        }
        let room = MAX_IN_FLIGHT - in_flight.len();
        if room > 0 {
            let limit = room + in_flight.len();
            let due = {
                let conn = conn.clone();
                tokio::task::spawn_blocking(move || {
                    let c = conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    due_commands(&c, now_ms(), limit).map_err(|e| e.to_string())
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
            };
            match due {
                Ok(due) => {
                    let fresh: Vec<Queued> =
                        due.into_iter().filter(|q| !in_flight.contains(&q.request_id)).take(room).collect();
                    for q in fresh {
                        if let Some(why) = q.invalid.clone() {
                            // Not sendable (a bad stream name): answered at once.
                            answered.push((q, Ok(Answer::Invalid { message: why })));
                            continue;
                        }
                        in_flight.insert(q.request_id.clone());
                        let client = client.clone();
                        tasks.spawn(async move {
                            let r = client
                                .command_first_sent(
                                    &q.stream,
                                    q.expected,
                                    q.command.clone(),
                                    q.request_id.clone(),
                                    q.created_ms,
                                )
                                .await;
                            (q, answer_of(r))
                        });
                    }
                }
                Err(e) => tracing::warn!(process = name, "outbox: {e}; again shortly"),
            }
        }
        if gauge_at.elapsed() > Duration::from_secs(1) {
            gauge_at = std::time::Instant::now();
            let label = name.clone();
            let counts = blocking(Box::new(move |c| {
                let before = now_ms().saturating_sub(FINISHED_KEPT.as_millis() as i64);
                let forgotten = forget_finished(c, before, 1000).map_err(|e| e.to_string())?;
                let one = |sql: &str| c.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap_or(-1);
                let gauge = |metric: &'static str, sql: &str| {
                    metrics::gauge!(metric, "process" => label.clone()).set(one(sql) as f64);
                };
                gauge("esk_process_outbox", "SELECT COUNT(*) FROM pm_outbox");
                gauge("esk_process_deadlines", "SELECT COUNT(*) FROM pm_deadlines");
                gauge("esk_process_processes", "SELECT COUNT(*) FROM pm_process");
                Ok(forgotten)
            }))
            .await;
            match counts {
                Ok(n) => {
                    metrics::counter!("esk_process_forgotten_total", "process" => name.clone()).increment(n as u64);
                }
                Err(e) => tracing::warn!(process = name, "counting: {e}"),
            }
        }
        if answered.is_empty() {
            let finished = tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(TICK) => None,
                Some(done) = tasks.join_next(), if !tasks.is_empty() => Some(done),
            };
            match finished {
                None => {}
                Some(Ok((q, result))) => {
                    in_flight.remove(&q.request_id);
                    answered.push((q, result));
                }
                Some(Err(e)) => {
                    // A send task panicked: its command is still in the
                    // outbox; in_flight forgets it when the set empties.
                    tracing::error!(process = name, "a send failed: {e}");
                    if tasks.is_empty() {
                        in_flight.clear();
                    }
                }
            }
        }
        for (q, result) in answered.drain(..) {
            match result {
                Ok(answer) => {
                    let outcome = match &answer {
                        Answer::Done { .. } => "done",
                        Answer::Refused { .. } => "refused",
                        Answer::Invalid { .. } => "invalid",
                        Answer::WrongExpectedVersion { .. } => "wrong_expected_version",
                        Answer::Expired { .. } => "expired",
                    };
                    metrics::counter!("esk_process_answers_total", "process" => name.clone(), "outcome" => outcome)
                        .increment(1);
                    let (p, id) = (process.clone(), q.request_id.clone());
                    let kept = blocking(Box::new(move |c| {
                        react_to_answer(c, p.as_ref(), &id, &answer, now_ms()).map(usize::from)
                    }))
                    .await;
                    if let Err(e) = kept {
                        // Sent again later (the writer answers the same): the
                        // command is still in the outbox.
                        retry_later(&blocking, &name, q, format!("keeping its answer: {e}")).await;
                    }
                }
                Err(why) => retry_later(&blocking, &name, q, why).await,
            }
        }
    }
    tasks.shutdown().await;
    Ok(())
}

/// Puts a command off with a backoff: it got no answer, or its answer
/// could not be kept.
async fn retry_later<F, Fut>(blocking: &F, name: &str, q: Queued, why: String)
where
    F: Fn(StoreJob) -> Fut,
    Fut: Future<Output = Result<usize, String>>,
{
    metrics::counter!("esk_process_retries_total", "process" => name.to_owned()).increment(1);
    tracing::debug!(process = name, request = q.request_id, attempts = q.attempts, "again later: {why}");
    let kept =
        blocking(Box::new(move |c| postpone(c, &q, &why, now_ms()).map(|()| 0).map_err(|e| e.to_string()))).await;
    if let Err(e) = kept {
        tracing::warn!(process = name, "outbox: {e}");
    }
}

/// A manager's processes as its store holds them, for `/processes/{name}/{id}`.
pub fn describe(c: &Connection, id: &str) -> rusqlite::Result<Option<Value>> {
    let found: Option<(String, bool)> = c
        .query_row("SELECT state, finished FROM pm_process WHERE id = ?1", [id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((state, finished)) = found else { return Ok(None) };
    let rows = |sql: &str, f: &dyn Fn(&rusqlite::Row<'_>) -> rusqlite::Result<Value>| -> rusqlite::Result<Vec<Value>> {
        let mut s = c.prepare(sql)?;
        let rows = s.query_map([id], |r| f(r))?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    };
    let outbox = rows("SELECT step, stream, attempts, last_error FROM pm_outbox WHERE process = ?1", &|r| {
        Ok(serde_json::json!({"step": r.get::<_, String>(0)?, "stream": r.get::<_, String>(1)?,
            "attempts": r.get::<_, i64>(2)?, "last_error": r.get::<_, Option<String>>(3)?}))
    })?;
    let answers = rows("SELECT step, answer FROM pm_answers WHERE process = ?1 ORDER BY answered_ms", &|r| {
        let answer: String = r.get(1)?;
        Ok(
            serde_json::json!({"step": r.get::<_, String>(0)?, "answer": serde_json::from_str::<Value>(&answer).unwrap_or(Value::Null)}),
        )
    })?;
    let deadlines = rows("SELECT name, due_ms FROM pm_deadlines WHERE process = ?1", &|r| {
        Ok(serde_json::json!({"name": r.get::<_, String>(0)?, "due_ms": r.get::<_, i64>(1)?}))
    })?;
    Ok(Some(serde_json::json!({
        "id": id,
        "state": serde_json::from_str::<Value>(&state).unwrap_or(Value::Null),
        "finished": finished,
        "outbox": outbox,
        "answers": answers,
        "deadlines": deadlines,
    })))
}

/// A process manager tested without Kafka: its real store in a temporary
/// folder, events applied as the runner applies them, answers and deadlines
/// as the sender applies them, on a clock the test moves.
pub struct Harness<P: Process> {
    process: P,
    conn: Connection,
    now_ms: i64,
    _dir: tempfile::TempDir,
}

impl<P: Process> std::fmt::Debug for Harness<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness").field("process", &self.process.name()).field("now_ms", &self.now_ms).finish()
    }
}

impl<P: Process> Harness<P> {
    pub fn new(process: P) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let conn = open(&dir.path().join("process.sqlite")).map_err(|e| e.to_string())?;
        migrate(&conn).map_err(|e| e.to_string())?;
        Ok(Self { process, conn, now_ms: 1_000_000, _dir: dir })
    }

    /// Applies events, each alone as the runner's savepoints make it (one
    /// the runner would park is undone alone): the commands they queued.
    /// `Err`: the index and reason of the first event the runner would park;
    /// the events before it are kept.
    pub fn given(&mut self, events: &[Event]) -> Result<Vec<Outgoing>, (usize, String)> {
        let before = self.queued();
        for (i, e) in events.iter().enumerate() {
            let tx = self.conn.transaction().map_err(|e| (i, e.to_string()))?;
            match react_to_event(&tx, &self.process, e, self.now_ms) {
                Ok(()) => tx.commit().map_err(|e| (i, e.to_string()))?,
                Err(e) => return Err((i, e.to_string())),
            }
        }
        Ok(self.new_since(&before))
    }

    /// Answers the queued command of `step` in `process`: the commands the
    /// reaction queued. `Err` when no such command waits.
    pub fn answer(&mut self, process: &str, step: &str, answer: Answer) -> Result<Vec<Outgoing>, String> {
        let before = self.queued();
        let id = request_id(self.process.name(), process, step);
        if !react_to_answer(&mut self.conn, &self.process, &id, &answer, self.now_ms)? {
            return Err(format!("no command of step '{step}' waits in process '{process}'"));
        }
        Ok(self.new_since(&before))
    }

    /// Moves the clock: the commands the deadlines that came due queued.
    pub fn elapse(&mut self, by: Duration) -> Result<Vec<Outgoing>, String> {
        let before = self.queued();
        self.now_ms += by.as_millis() as i64;
        fire_deadlines(&mut self.conn, &self.process, self.now_ms, usize::MAX >> 1)?;
        Ok(self.new_since(&before))
    }

    /// Removes what finished longer ago than [`FINISHED_KEPT`], as the
    /// sender does: how many processes.
    pub fn forget_finished(&mut self) -> Result<usize, String> {
        let before = self.now_ms.saturating_sub(FINISHED_KEPT.as_millis() as i64);
        forget_finished(&mut self.conn, before, usize::MAX >> 1).map_err(|e| e.to_string())
    }

    /// A process's state, if it has one.
    pub fn state(&self, process: &str) -> Option<P::State> {
        let known: Option<i64> =
            self.conn.query_row("SELECT 1 FROM pm_process WHERE id = ?1", [process], |r| r.get(0)).optional().ok()?;
        known.and_then(|_| load::<P>(&self.conn, process).ok())
    }

    /// Whether a process finished.
    pub fn finished(&self, process: &str) -> bool {
        self.conn
            .query_row("SELECT finished FROM pm_process WHERE id = ?1", [process], |r| r.get::<_, bool>(0))
            .unwrap_or(false)
    }

    /// Every command waiting for its answer: (process, command).
    pub fn waiting(&self) -> Vec<(String, Outgoing)> {
        self.queued().into_iter().map(|(_, p, o)| (p, o)).collect()
    }

    /// The deadlines set: (process, name, ms from now).
    pub fn deadlines(&self) -> Vec<(String, String, i64)> {
        let mut s = self.conn.prepare("SELECT process, name, due_ms FROM pm_deadlines ORDER BY due_ms").expect("query");
        s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? - self.now_ms)))
            .expect("query")
            .filter_map(Result::ok)
            .collect()
    }

    fn queued(&self) -> Vec<(String, String, Outgoing)> {
        due_commands(&self.conn, i64::MAX, usize::MAX >> 1)
            .unwrap_or_default()
            .into_iter()
            .map(|q| {
                let out = Outgoing { step: q.step, stream: q.stream, command: q.command, expected: q.expected };
                (q.request_id, q.process, out)
            })
            .collect()
    }

    fn new_since(&self, before: &[(String, String, Outgoing)]) -> Vec<Outgoing> {
        let old: HashSet<&str> = before.iter().map(|(id, _, _)| id.as_str()).collect();
        self.queued().into_iter().filter(|(id, _, _)| !old.contains(id.as_str())).map(|(_, _, o)| o).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_the_step_s_and_fit_the_limit() {
        assert_eq!(request_id("checkout", "42", "pay"), "pm:checkout:42:pay");
        let long = request_id("checkout", &"x".repeat(200), "pay");
        let longest = request_id(&"m".repeat(64), "p:1", &"s".repeat(64));
        assert!(longest.len() <= esk_wire::limits::MAX_REQUEST_ID_BYTES && longest.starts_with("pm:#"), "{longest}");
        assert!(long.len() <= esk_wire::limits::MAX_REQUEST_ID_BYTES && long.starts_with("pm:checkout:#"), "{long}");
        assert_eq!(long, request_id("checkout", &"x".repeat(200), "pay"), "stable");
        assert_ne!(request_id("checkout", "a:b", "pay"), "pm:checkout:a:b:pay", "no ':' in the process part");
        esk_wire::limits::check_request_id(&long).unwrap();
    }
}
