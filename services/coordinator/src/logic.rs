//! The coordinator's decisions, without I/O.
//!
//! A [`Step`] reads the partition's live transactions ([`Txs`], in memory)
//! and, through a [`Done`] lookup, the ones that ended within the idempotency
//! horizon (on disk), and records what a batch of requests and votes (or the
//! clock) changes: log records, prepares, decisions, replies. The handler
//! writes them all in one Kafka transaction; a decision's transaction is the
//! commit point. Every input may come twice or late: each is idempotent by
//! txid and stream, and a vote for a decided transaction is answered with the
//! decision, so no hold outlives it.

use std::collections::{BTreeSet, HashMap};

use esk_domain::Registry;
use esk_owner::Incoming;
use esk_wire::limits::{self, Limits, MAX_REASON_BYTES, shorten};
use esk_wire::partition::partition_for;
use esk_wire::protocol::{
    Decision, ErrorCode, ParticipantMessage, ParticipantState, Prepare, Reply, ReplyError, ReplyOutcome, TxRecord,
    TxRequest, TxState, TxStatus, TxVote, Verdict, Waiter,
};

/// Where a category's 2PC records go (ADR 13): its context, from the
/// registry of contexts, and that context's partition count.
pub trait Router: std::fmt::Debug {
    /// The context of `category` and the partitions of its `tx.prepare` and
    /// `tx.commit`. `Err`: they cannot be known now (the context's topics
    /// are missing, or Kafka did not answer).
    fn route(&self, category: &str) -> Result<(String, i32), String>;
    /// The partitions of a context's `tx.prepare` and `tx.commit`.
    fn partitions(&self, context: &str) -> Result<i32, String>;
    /// Whether a context other than the default one claimed `category` (its
    /// writers check its commands when they vote).
    fn elsewhere(&self, category: &str) -> bool;
}

/// Every category in the default context of `partitions` partitions.
#[derive(Debug)]
pub struct DefaultContext(pub i32);

impl Router for DefaultContext {
    fn route(&self, _: &str) -> Result<(String, i32), String> {
        Ok((esk_wire::topics::DEFAULT_CONTEXT.to_owned(), self.0))
    }

    fn partitions(&self, _: &str) -> Result<i32, String> {
        Ok(self.0)
    }

    fn elsewhere(&self, _: &str) -> bool {
        false
    }
}

/// What the coordinator knows about its installation.
#[derive(Debug)]
pub struct Context<'a> {
    pub aggregates: &'a Registry,
    /// Where each category's prepares and decisions go.
    pub router: &'a dyn Router,
    /// Partitions of `tx.requests`, `tx.votes` and `tx.log`.
    pub partitions: i32,
    pub reply_partitions: i32,
    /// How long to wait for acknowledgements before sending a decision again.
    pub resend_after_ms: i64,
    pub limits: Limits,
    /// How long an ended transaction is remembered (ms).
    pub horizon_ms: i64,
}

/// Transactions that ended within the horizon, looked up by txid. `Err`:
/// the local store failed, and the batch is tried again.
pub trait Done {
    fn done(&mut self, txid: &str) -> Result<Option<TxRecord>, String>;
}

/// No transaction ended: for a coordinator's first start, and tests.
impl Done for HashMap<String, TxRecord> {
    fn done(&mut self, txid: &str) -> Result<Option<TxRecord>, String> {
        Ok(self.get(txid).cloned())
    }
}

/// The live transactions of one partition: not yet acknowledged everywhere.
///
/// Some of what memory holds is not in the log yet: a partial vote or a
/// partial acknowledgement changes a transaction without a log record of its
/// own (ADR 11). It is written with the transaction's next logged change (the
/// decision, or its end). Until then a partial vote's input offset is not
/// committed ([`Txs::unlogged_votes`]), so a coordinator that dies reads the
/// vote again; an acknowledgement lost that way is asked for again by the
/// decision sent anew after a takeover.
///
/// Indexed by what the clock looks for, so that a tick or a gauge costs what
/// is due, not every live transaction: preparing ones by deadline, decided
/// ones by when their decision was last sent.
#[derive(Debug, Default)]
pub struct Txs {
    records: HashMap<String, TxRecord>,
    /// When each decision was last sent (not persisted: after a takeover every
    /// unacknowledged decision is sent again at once).
    sent_ms: HashMap<String, i64>,
    /// Preparing transactions by deadline.
    deadlines: BTreeSet<(i64, String)>,
    /// Decided, unacknowledged transactions by when their decision was last
    /// sent (`i64::MIN`: not sent by this process yet).
    resends: BTreeSet<(i64, String)>,
    /// Votes held in memory only: txid -> (input topic, offsets of its votes).
    pub unlogged_votes: HashMap<String, (String, Vec<i64>)>,
}

impl Txs {
    /// A live transaction.
    pub fn get(&self, txid: &str) -> Option<&TxRecord> {
        self.records.get(txid)
    }

    pub fn contains(&self, txid: &str) -> bool {
        self.records.contains_key(txid)
    }

    /// How many transactions are live.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Keeps a live transaction (restored, or changed by a step), indexed;
    /// an ended one leaves memory.
    pub fn insert(&mut self, record: TxRecord) {
        self.remove(&record.txid);
        if record.is_done() {
            return;
        }
        match record.state {
            TxState::Preparing => {
                self.deadlines.insert((record.deadline_ms, record.txid.clone()));
            }
            TxState::Committing | TxState::Aborting => {
                let sent = self.sent_ms.get(&record.txid).copied().unwrap_or(i64::MIN);
                self.resends.insert((sent, record.txid.clone()));
            }
            _ => {}
        }
        self.records.insert(record.txid.clone(), record);
    }

    fn remove(&mut self, txid: &str) {
        let Some(old) = self.records.remove(txid) else { return };
        match old.state {
            TxState::Preparing => {
                self.deadlines.remove(&(old.deadline_ms, old.txid));
            }
            TxState::Committing | TxState::Aborting => {
                let sent = self.sent_ms.get(txid).copied().unwrap_or(i64::MIN);
                self.resends.remove(&(sent, old.txid));
            }
            _ => {}
        }
    }

    /// Notes that a decided transaction's decision was sent at `now_ms`.
    fn sent(&mut self, txid: &str, now_ms: i64) {
        if !self.records.get(txid).is_some_and(|r| matches!(r.state, TxState::Committing | TxState::Aborting)) {
            return;
        }
        let before = self.sent_ms.insert(txid.to_owned(), now_ms).unwrap_or(i64::MIN);
        self.resends.remove(&(before, txid.to_owned()));
        self.resends.insert((now_ms, txid.to_owned()));
    }

    /// Preparing transactions whose deadline is at or before `now_ms`, and
    /// decided ones whose decision was last sent at or before `sent_by_ms`,
    /// oldest first.
    fn due(&self, now_ms: i64, sent_by_ms: i64) -> impl Iterator<Item = &TxRecord> {
        let expired = self.deadlines.range(..(now_ms.saturating_add(1), String::new()));
        let unanswered = self.resends.range(..(sent_by_ms.saturating_add(1), String::new()));
        expired.chain(unanswered).filter_map(|(_, txid)| self.records.get(txid))
    }

    /// Takes a step's changes once it committed (or needed no Kafka
    /// transaction): live records stay, done ones leave memory (the handler
    /// keeps them in the local store); a logged record's votes are in the log.
    pub fn absorb(&mut self, step: &Step) {
        for r in step.kept() {
            self.insert(r);
        }
        for (txid, topic, offset) in &step.unlogged_votes {
            let entry = self.unlogged_votes.entry(txid.clone()).or_insert_with(|| (topic.clone(), Vec::new()));
            entry.1.push(*offset);
        }
        for r in step.records() {
            self.unlogged_votes.remove(&r.txid);
            self.insert(r);
        }
        for (txid, at) in &step.sent {
            self.sent(txid, *at);
        }
        let records = &self.records;
        self.sent_ms.retain(|txid, _| records.contains_key(txid));
    }

    /// After a takeover nothing was sent by this process yet.
    #[cfg(test)]
    pub fn forget_sent(&mut self) {
        let records: Vec<TxRecord> = self.records.values().cloned().collect();
        self.sent_ms.clear();
        self.resends.clear();
        for r in records {
            self.insert(r);
        }
    }

    /// The highest offset of `topic` a step may commit as consumed: below
    /// every vote held in memory only, after the step's own changes.
    pub fn committable(&self, step: &Step, topic: &str, consumed: i64) -> Option<i64> {
        let logged: std::collections::HashSet<&str> = step.logged().collect();
        let held = self
            .unlogged_votes
            .iter()
            .filter(|(txid, (t, _))| t == topic && !logged.contains(txid.as_str()))
            .flat_map(|(_, (_, offsets))| offsets.iter().copied())
            .chain(
                step.unlogged_votes
                    .iter()
                    .filter(|(txid, t, _)| t == topic && !logged.contains(txid.as_str()))
                    .map(|(_, _, o)| *o),
            )
            .min();
        let last = held.map_or(consumed, |h| consumed.min(h - 1));
        (last >= 0).then_some(last)
    }

    /// Open transactions, and those past their deadline without a decision.
    pub fn counts(&self, now_ms: i64) -> (usize, usize) {
        (self.records.len(), self.deadlines.range(..(now_ms, String::new())).count())
    }
}

/// What a step decided.
#[derive(Debug, Default)]
pub struct Step {
    changed: HashMap<String, TxRecord>,
    order: Vec<String>,
    /// Changed in memory only (a partial vote or acknowledgement), unless
    /// also logged in this step.
    memory_only: std::collections::HashSet<String>,
    /// Partial votes of this step held in memory only: (txid, topic, offset).
    pub unlogged_votes: Vec<(String, String, i64)>,
    /// Ended transactions looked up in this step (`None`: not known).
    looked_up: HashMap<String, Option<TxRecord>>,
    /// The local store failed: nothing of this step may be written.
    pub store_failure: Option<String>,
    /// Txids to tombstone in the log (ended longer ago than the horizon).
    pub tombstones: Vec<String>,
    /// (tx.prepare partition, stream, prepare, context)
    pub prepares: Vec<(i32, String, Prepare, String)>,
    /// (tx.commit partition, stream, decision, context)
    pub decisions: Vec<(i32, String, Decision, String)>,
    /// (replies partition, txid, reply)
    pub replies: Vec<(i32, String, Reply)>,
    pub dead_letters: Vec<(Incoming, String)>,
    /// Highest offset consumed per input topic.
    pub consumed: HashMap<String, i64>,
    /// Decisions sent in this step (txid, when).
    pub sent: Vec<(String, i64)>,
    /// Decided in this step: (commit?, ms from creation to decision).
    pub decided: Vec<(bool, i64)>,
    /// Begins refused as older than the horizon.
    pub expired: u64,
}

impl Step {
    /// Whether the step has anything to write: otherwise it changed memory
    /// only and needs no Kafka transaction.
    pub fn needs_transaction(&self) -> bool {
        self.order.iter().any(|t| !self.memory_only.contains(t))
            || !self.tombstones.is_empty()
            || !self.prepares.is_empty()
            || !self.decisions.is_empty()
            || !self.replies.is_empty()
            || !self.dead_letters.is_empty()
    }

    /// Txids whose records this step logs.
    pub fn logged(&self) -> impl Iterator<Item = &str> {
        self.order.iter().filter(|t| !self.memory_only.contains(*t)).map(String::as_str)
    }

    /// Records changed in memory only.
    pub fn kept(&self) -> Vec<TxRecord> {
        self.order.iter().filter(|t| self.memory_only.contains(*t)).map(|t| self.changed[t].clone()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.changed.is_empty()
            && self.tombstones.is_empty()
            && self.prepares.is_empty()
            && self.decisions.is_empty()
            && self.replies.is_empty()
            && self.dead_letters.is_empty()
            && self.consumed.is_empty()
    }

    /// The log records to write, in the order first changed.
    pub fn records(&self) -> Vec<TxRecord> {
        self.logged().map(|t| self.changed[t].clone()).collect()
    }

    /// A transaction as this step sees it: changed here, live, or ended
    /// within the horizon.
    fn get(&mut self, base: &Txs, done: &mut dyn Done, txid: &str) -> Option<TxRecord> {
        if let Some(r) = self.changed.get(txid).or_else(|| base.get(txid)) {
            return Some(r.clone());
        }
        if let Some(r) = self.looked_up.get(txid) {
            return r.clone();
        }
        let found = match done.done(txid) {
            Ok(r) => r,
            Err(e) => {
                self.store_failure.get_or_insert(e);
                None
            }
        };
        self.looked_up.insert(txid.to_owned(), found.clone());
        found
    }

    fn put(&mut self, record: TxRecord) {
        self.memory_only.remove(&record.txid);
        if !self.changed.contains_key(&record.txid) {
            self.order.push(record.txid.clone());
        }
        self.changed.insert(record.txid.clone(), record);
    }

    /// Changes a transaction in memory only, unless this step logs it anyway.
    fn keep(&mut self, record: TxRecord) {
        if !self.changed.contains_key(&record.txid) {
            self.order.push(record.txid.clone());
            self.memory_only.insert(record.txid.clone());
        }
        self.changed.insert(record.txid.clone(), record);
    }

    fn reply(&mut self, partition: i32, txid: &str, attempt: Option<String>, outcome: ReplyOutcome) {
        self.replies.push((partition, txid.to_owned(), Reply { request_id: txid.to_owned(), attempt, outcome }));
    }

    /// A decision in answer to `vote`: to the context of the writer that voted.
    fn decision_to(&mut self, ctx: &Context<'_>, vote: &TxVote, verdict: Verdict, reason: Option<String>) {
        let decision = Decision { txid: vote.txid.clone(), stream: vote.stream.clone(), decision: verdict, reason };
        self.push_decision(ctx, decision, vote.context.as_deref());
    }

    /// A decision to `context` (the one its prepare went to, or its voter's),
    /// else to its stream's context as the registry says. One that cannot be
    /// routed now (its context's topics unknown for the moment) is not sent:
    /// a decided transaction's decisions are sent again until acknowledged,
    /// and a vote about a decided one is answered again when it comes again.
    fn push_decision(&mut self, ctx: &Context<'_>, decision: Decision, context: Option<&str>) {
        // A context named on the wire is input: one that is not a name is not used.
        let given = context.filter(|c| esk_wire::topics::check_context_name(c).is_ok());
        let routed = match given {
            Some(c) => ctx.router.partitions(c).map(|n| (c.to_owned(), n)),
            None => route(ctx, &decision.stream),
        };
        match routed {
            Ok((context, n)) => {
                let part = partition_for(decision.stream.as_bytes(), n);
                self.decisions.push((part, decision.stream.clone(), decision, context));
            }
            Err(why) => tracing::warn!(txid = decision.txid, stream = decision.stream, "decision not sent now: {why}"),
        }
    }

    /// Decides one consumed record: input 0 is `tx.requests`, input 1 `tx.votes`.
    pub fn handle(&mut self, ctx: &Context<'_>, base: &Txs, done: &mut dyn Done, msg: Incoming, now_ms: i64) {
        let next = self.consumed.entry(msg.topic.clone()).or_insert(msg.offset);
        *next = (*next).max(msg.offset);
        if msg.input == 0 {
            self.request(ctx, base, done, msg, now_ms);
        } else {
            self.participant(ctx, base, done, msg, now_ms);
        }
    }

    /// Refuses one consumed record without deciding it (the step that held it
    /// could not be written): its client gets the reason when it can be
    /// found, anything else is parked.
    pub fn refuse(&mut self, ctx: &Context<'_>, msg: Incoming, reason: &str) {
        let next = self.consumed.entry(msg.topic.clone()).or_insert(msg.offset);
        *next = (*next).max(msg.offset);
        let reason = shorten(reason, MAX_REASON_BYTES);
        match (msg.input, loose_client(msg.payload.as_deref(), ctx.reply_partitions)) {
            (0, Some((part, txid, attempt))) => self.reply(part, &txid, attempt, invalid(reason)),
            _ => self.dead_letters.push((msg, reason)),
        }
    }

    fn request(&mut self, ctx: &Context<'_>, base: &Txs, done: &mut dyn Done, msg: Incoming, now_ms: i64) {
        let Some(payload) = msg.payload.as_deref() else {
            return self.dead_letters.push((msg, "transaction request has no value".into()));
        };
        if payload.len() > ctx.limits.request_bytes() {
            let reason = format!("the request is {} bytes; the limit is {}", payload.len(), ctx.limits.request_bytes());
            return self.refuse(ctx, msg, &reason);
        }
        let request = match serde_json::from_slice::<TxRequest>(payload) {
            Ok(r) => r,
            Err(e) => return self.refuse(ctx, msg, &format!("transaction request is not valid: {e}")),
        };
        let part = request.reply_partition();
        if !(0..ctx.reply_partitions).contains(&part) {
            let reason =
                format!("reply_partition {part} does not exist (the replies topic has {})", ctx.reply_partitions);
            return self.dead_letters.push((msg, reason));
        }
        let txid = request.txid().to_owned();
        if txid.is_empty() || txid.len() > limits::MAX_TXID_BYTES || !txid.chars().all(|c| c.is_ascii_graphic()) {
            return self.refuse(
                ctx,
                msg,
                &format!("a txid has 1 to {} visible ASCII characters", limits::MAX_TXID_BYTES),
            );
        }
        if request.attempt().is_some_and(|a| limits::check_request_id(a).is_err()) {
            return self.dead_letters.push((msg, "the request's attempt is not 1 to 128 visible characters".into()));
        }
        if let Err(reason) = owned_txid(ctx, &msg, &txid) {
            return self.refuse(ctx, msg, &reason);
        }
        let attempt = request.attempt().map(str::to_owned);
        match request {
            TxRequest::Status { txid, .. } => {
                let status = self.get(base, done, &txid).map_or_else(
                    || {
                        let mut s = TxStatus::unknown(&txid);
                        s.reason = Some(format!(
                            "no record of {txid}: never begun, or ended more than the idempotency horizon ({} s) ago",
                            ctx.horizon_ms / 1000
                        ));
                        s
                    },
                    |r| TxStatus::of(&r),
                );
                self.reply(part, &txid, attempt, ReplyOutcome::Tx(status));
            }
            TxRequest::Begin { txid, participants, timeout_ms, sent_ms, .. } => {
                if let Some(mut known) = self.get(base, done, &txid) {
                    let same = known.participants.len() == participants.len()
                        && known
                            .participants
                            .iter()
                            .zip(&participants)
                            .all(|(a, b)| a.stream == b.stream && a.command == b.command);
                    if !same {
                        let reason = format!("txid {txid} is already used for another transaction");
                        return self.reply(part, &txid, attempt, invalid(reason));
                    }
                    if known.state.is_decided() {
                        return self.reply(part, &txid, attempt, ReplyOutcome::Tx(TxStatus::of(&known)));
                    }
                    // A retry while votes come in: answer it with the decision.
                    let waiter = Waiter { partition: part, attempt };
                    if !known.waiters.contains(&waiter) && known.waiters.len() < 16 {
                        known.waiters.push(waiter);
                        self.put(known);
                    }
                    return;
                }
                if self.store_failure.is_some() {
                    return;
                }
                let origin = sent_ms.or_else(|| limits::uuid_v7_ms(&txid));
                if let Some(why) = limits::too_old(origin, now_ms, ctx.horizon_ms) {
                    self.expired += 1;
                    let outcome = ReplyOutcome::Error(ReplyError {
                        code: ErrorCode::RequestExpired,
                        message: format!(
                            "transaction {txid} is not remembered and {why}: it may have run, and the coordinator \
                             no longer knows; nothing was done. Check its participants and run it again under a new \
                             txid if it is missing"
                        ),
                        actual_version: None,
                    });
                    return self.reply(part, &txid, attempt, outcome);
                }
                let elsewhere = |category: &str| ctx.router.elsewhere(category);
                if let Err(reason) =
                    esk_client::tx::validate(&txid, &participants, timeout_ms, Some(ctx.aggregates), &elsewhere)
                {
                    return self.reply(part, &txid, attempt, invalid(reason));
                }
                // Where each participant's prepare goes, before anything is kept.
                let mut routes = Vec::with_capacity(participants.len());
                for p in &participants {
                    match route(ctx, &p.stream) {
                        Ok(r) => routes.push(r),
                        Err(why) => {
                            let outcome = ReplyOutcome::Error(ReplyError {
                                code: ErrorCode::Unavailable,
                                message: shorten(
                                    &format!("{}: {why}; nothing was done, retry with the same txid", p.stream),
                                    MAX_REASON_BYTES,
                                ),
                                actual_version: None,
                            });
                            return self.reply(part, &txid, attempt, outcome);
                        }
                    }
                }
                let deadline_ms = now_ms + timeout_ms as i64;
                let record = TxRecord {
                    txid: txid.clone(),
                    state: TxState::Preparing,
                    participants: participants
                        .into_iter()
                        .zip(&routes)
                        .map(|(p, (context, _))| ParticipantState {
                            stream: p.stream,
                            command: p.command,
                            vote: None,
                            reason: None,
                            acked: false,
                            context: (context != esk_wire::topics::DEFAULT_CONTEXT).then(|| context.clone()),
                        })
                        .collect(),
                    deadline_ms,
                    created_ms: now_ms,
                    decided_ms: None,
                    reason: None,
                    waiters: vec![Waiter { partition: part, attempt: attempt.clone() }],
                    done_ms: None,
                };
                let size = serde_json::to_vec(&record).map_or(usize::MAX, |v| v.len());
                if size > ctx.limits.tx_record_bytes() {
                    let reason = format!(
                        "the transaction is {size} bytes; the limit is {} (its record must fit the broker's \
                         message.max.bytes with its votes)",
                        ctx.limits.tx_record_bytes()
                    );
                    return self.reply(part, &txid, attempt, invalid(reason));
                }
                for (p, (context, n)) in record.participants.iter().zip(routes) {
                    let prepare = Prepare {
                        txid: txid.clone(),
                        stream: p.stream.clone(),
                        command: p.command.clone(),
                        deadline_ms: Some(deadline_ms),
                    };
                    self.prepares.push((partition_for(p.stream.as_bytes(), n), p.stream.clone(), prepare, context));
                }
                self.put(record);
            }
        }
    }

    fn participant(&mut self, ctx: &Context<'_>, base: &Txs, done: &mut dyn Done, msg: Incoming, now_ms: i64) {
        let message = match msg.payload.as_deref().map(serde_json::from_slice::<ParticipantMessage>) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                let reason = format!("participant message is not valid: {e}");
                return self.dead_letters.push((msg, shorten(&reason, MAX_REASON_BYTES)));
            }
            None => return self.dead_letters.push((msg, "participant message has no value".into())),
        };
        let (txid, stream) = match &message {
            ParticipantMessage::Vote(v) => (&v.txid, &v.stream),
            ParticipantMessage::Ack(a) => (&a.txid, &a.stream),
        };
        if txid.is_empty() || txid.len() > limits::MAX_TXID_BYTES || esk_wire::StreamName::parse(stream).is_err() {
            return self.dead_letters.push((msg, "a participant message with a bad txid or stream".into()));
        }
        if let Err(reason) = owned_txid(ctx, &msg, txid) {
            return self.dead_letters.push((msg, reason));
        }
        match message {
            ParticipantMessage::Vote(v) => {
                let known = self.get(base, done, &v.txid);
                if self.store_failure.is_some() {
                    return;
                }
                let Some(mut r) = known else {
                    if v.yes {
                        // Presumed abort: a yes for a transaction this log does not
                        // hold must not leave a hold behind.
                        self.decision_to(ctx, &v, Verdict::Abort, Some("unknown transaction".into()));
                    }
                    return;
                };
                let spurious = || Some(format!("transaction {} ended; this hold came from a late prepare", v.txid));
                let Some(p) = r.participants.iter_mut().find(|p| p.stream == v.stream) else {
                    // Not a participant: a hold placed by a stray prepare must not stay.
                    if v.yes {
                        let reason = Some(format!("{} is not a participant of {}", v.stream, v.txid));
                        self.decision_to(ctx, &v, Verdict::Abort, reason);
                    }
                    return;
                };
                match r.state {
                    TxState::Preparing => {
                        if p.vote.is_some() {
                            return; // A duplicate vote.
                        }
                        p.vote = Some(v.yes);
                        p.reason = v.reason.as_deref().map(|r| shorten(r, MAX_REASON_BYTES));
                        if !v.yes {
                            let why = v
                                .reason
                                .as_deref()
                                .map_or_else(|| "no reason given".to_owned(), |r| shorten(r, MAX_REASON_BYTES));
                            let reason = format!("{} voted no: {why}", v.stream);
                            self.decide(ctx, r, Verdict::Abort, Some(reason), now_ms);
                        } else if r.participants.iter().all(|p| p.vote == Some(true)) {
                            self.decide(ctx, r, Verdict::Commit, None, now_ms);
                        } else {
                            // A partial vote: in memory, logged with the decision.
                            self.unlogged_votes.push((r.txid.clone(), msg.topic.clone(), msg.offset));
                            self.keep(r);
                        }
                    }
                    // Decided, this participant not acknowledged yet: it may
                    // have missed the decision (or asks for it): send it again.
                    TxState::Committing | TxState::Aborting if !p.acked => {
                        if self.sent.iter().any(|(t, _)| *t == v.txid) {
                            return; // Sent in this very step.
                        }
                        let verdict = if r.state == TxState::Committing { Verdict::Commit } else { Verdict::Abort };
                        self.decision_to(ctx, &v, verdict, r.reason.clone());
                    }
                    // It applied the decision already: a yes now is a hold
                    // from a late or duplicate prepare, to be released.
                    _ if v.yes => self.decision_to(ctx, &v, Verdict::Abort, spurious()),
                    _ => {}
                }
            }
            ParticipantMessage::Ack(a) => {
                let Some(mut r) = self.get(base, done, &a.txid) else { return };
                if !matches!(r.state, TxState::Committing | TxState::Aborting) {
                    return;
                }
                let Some(p) = r.participants.iter_mut().find(|p| p.stream == a.stream) else { return };
                if p.acked {
                    return;
                }
                p.acked = true;
                if r.participants.iter().all(|p| p.acked) {
                    r.state = if r.state == TxState::Committing { TxState::Committed } else { TxState::Aborted };
                    r.done_ms = Some(now_ms);
                    r.waiters.clear();
                    self.put(r);
                } else {
                    // A partial acknowledgement: in memory, logged with the end.
                    self.keep(r);
                }
            }
        }
    }

    /// The decision: the log record, a decision to every participant, the
    /// outcome to every waiting client, all in this step's transaction.
    fn decide(&mut self, ctx: &Context<'_>, mut r: TxRecord, verdict: Verdict, reason: Option<String>, now_ms: i64) {
        r.state = if verdict == Verdict::Commit { TxState::Committing } else { TxState::Aborting };
        r.decided_ms = Some(now_ms);
        r.reason = reason.map(|r| shorten(&r, MAX_REASON_BYTES));
        self.send_decisions(ctx, &r, now_ms);
        let status = TxStatus::of(&r);
        for w in &r.waiters {
            self.reply(w.partition, &r.txid, w.attempt.clone(), ReplyOutcome::Tx(status.clone()));
        }
        self.decided.push((verdict == Verdict::Commit, now_ms.saturating_sub(r.created_ms)));
        self.put(r);
    }

    fn send_decisions(&mut self, ctx: &Context<'_>, r: &TxRecord, now_ms: i64) {
        let verdict =
            if matches!(r.state, TxState::Committing | TxState::Committed) { Verdict::Commit } else { Verdict::Abort };
        for p in r.participants.iter().filter(|p| !p.acked) {
            let decision = Decision {
                txid: r.txid.clone(),
                stream: p.stream.clone(),
                decision: verdict,
                reason: r.reason.clone(),
            };
            self.push_decision(ctx, decision, p.context.as_deref());
        }
        self.sent.push((r.txid.clone(), now_ms));
    }

    /// What the clock decides: aborts past their deadline (presumed abort), and
    /// decisions sent again where acknowledgements are missing.
    pub fn tick(&mut self, ctx: &Context<'_>, base: &Txs, now_ms: i64) {
        let due: Vec<TxRecord> = base
            .due(now_ms, now_ms.saturating_sub(ctx.resend_after_ms))
            .filter(|r| !self.changed.contains_key(&r.txid))
            .cloned()
            .collect();
        for r in due {
            if r.state == TxState::Preparing {
                let missing: Vec<&str> =
                    r.participants.iter().filter(|p| p.vote.is_none()).map(|p| p.stream.as_str()).collect();
                let reason = format!(
                    "timed out after {} ms waiting for the votes of {}",
                    r.deadline_ms.saturating_sub(r.created_ms),
                    missing.join(", ")
                );
                self.decide(ctx, r, Verdict::Abort, Some(reason), now_ms);
            } else {
                self.send_decisions(ctx, &r, now_ms);
            }
        }
    }
}

/// A stream's context and the partition count of its 2PC topics.
fn route(ctx: &Context<'_>, stream: &str) -> Result<(String, i32), String> {
    let category = stream.split_once('-').map_or(stream, |(c, _)| c);
    ctx.router.route(category)
}

fn invalid(message: String) -> ReplyOutcome {
    ReplyOutcome::Error(ReplyError {
        code: ErrorCode::InvalidInput,
        message: shorten(&message, MAX_REASON_BYTES),
        actual_version: None,
    })
}

/// A transaction belongs to the partition its txid hashes to, keyed by it:
/// one arriving elsewhere would be decided by two coordinators.
fn owned_txid(ctx: &Context<'_>, msg: &Incoming, txid: &str) -> Result<(), String> {
    let home = partition_for(txid.as_bytes(), ctx.partitions);
    if home != msg.partition || msg.key.as_deref() != Some(txid.as_bytes()) {
        return Err(format!(
            "transaction '{}' belongs to partition {home} of {}, keyed by its txid; this record came on partition {} \
             with another key: produce with key = txid and Kafka's default (murmur2) partitioner",
            shorten(txid, 100),
            msg.topic,
            msg.partition
        ));
    }
    Ok(())
}

/// Where to answer a request that is not valid, if it says and the values are small.
fn loose_client(payload: Option<&[u8]>, reply_partitions: i32) -> Option<(i32, String, Option<String>)> {
    let v: serde_json::Value = serde_json::from_slice(payload?).ok()?;
    let txid = v.get("txid")?.as_str().filter(|t| !t.is_empty() && t.len() <= limits::MAX_TXID_BYTES)?;
    let part = v
        .get("reply_partition")?
        .as_i64()
        .and_then(|p| i32::try_from(p).ok())
        .filter(|p| (0..reply_partitions).contains(p))?;
    let attempt = v.get("attempt").and_then(|a| a.as_str()).filter(|a| limits::check_request_id(a).is_ok());
    Some((part, txid.to_owned(), attempt.map(str::to_owned)))
}

#[cfg(test)]
mod tests;
