//! The coordinator's decisions, without I/O.
//!
//! A [`Step`] reads the partition's committed transactions ([`Txs`]) and records
//! what a batch of requests and votes (or the clock) changes: log records,
//! prepares, decisions, replies. The handler writes them all in one Kafka
//! transaction; a decision's transaction is the commit point. Every input may
//! come twice or late: each is idempotent by txid and stream.

use std::collections::HashMap;

use esk_domain::Registry;
use esk_owner::Incoming;
use esk_wire::partition::partition_for;
use esk_wire::protocol::{
    Decision, ErrorCode, ParticipantMessage, ParticipantState, Prepare, Reply, ReplyError, ReplyOutcome, TxRecord,
    TxRequest, TxState, TxStatus, Verdict,
};

/// Done transactions a partition keeps in memory for status queries; older
/// ones answer `unknown` (their log records stay in the compacted topic).
pub const MAX_DONE: usize = 100_000;

/// What the coordinator knows about its installation.
#[derive(Debug)]
pub struct Context<'a> {
    pub aggregates: &'a Registry,
    /// Partitions of `tx.prepare` and `tx.commit` (the platform's count).
    pub partitions: i32,
    pub reply_partitions: i32,
    /// How long to wait for acknowledgements before sending a decision again.
    pub resend_after_ms: i64,
}

/// The committed transactions of one partition.
#[derive(Debug, Default)]
pub struct Txs {
    pub records: HashMap<String, TxRecord>,
    /// When each decision was last sent (not persisted: after a takeover every
    /// unacknowledged decision is sent again at once).
    pub sent_ms: HashMap<String, i64>,
}

impl Txs {
    pub fn absorb(&mut self, records: Vec<TxRecord>, sent: Vec<(String, i64)>) {
        for r in records {
            self.records.insert(r.txid.clone(), r);
        }
        self.sent_ms.extend(sent);
        self.sent_ms.retain(|txid, _| {
            self.records.get(txid).is_some_and(|r| matches!(r.state, TxState::Committing | TxState::Aborting))
        });
        let done = self.records.values().filter(|r| matches!(r.state, TxState::Committed | TxState::Aborted)).count();
        if done > MAX_DONE {
            let mut old: Vec<(i64, String)> = self
                .records
                .values()
                .filter(|r| matches!(r.state, TxState::Committed | TxState::Aborted))
                .map(|r| (r.decided_ms.unwrap_or(r.created_ms), r.txid.clone()))
                .collect();
            old.sort();
            for (_, txid) in old.into_iter().take(done - MAX_DONE) {
                self.records.remove(&txid);
            }
        }
    }

    /// Open transactions, and those past their deadline without a decision.
    pub fn counts(&self, now_ms: i64) -> (usize, usize) {
        let open = self.records.values().filter(|r| !matches!(r.state, TxState::Committed | TxState::Aborted)).count();
        let in_doubt =
            self.records.values().filter(|r| r.state == TxState::Preparing && r.deadline_ms < now_ms).count();
        (open, in_doubt)
    }
}

/// What a step decided.
#[derive(Debug, Default)]
pub struct Step {
    changed: HashMap<String, TxRecord>,
    order: Vec<String>,
    /// (tx.prepare partition, stream, prepare)
    pub prepares: Vec<(i32, String, Prepare)>,
    /// (tx.commit partition, stream, decision)
    pub decisions: Vec<(i32, String, Decision)>,
    /// (replies partition, txid, reply)
    pub replies: Vec<(i32, String, Reply)>,
    pub dead_letters: Vec<(Incoming, String)>,
    /// Highest offset consumed per input topic.
    pub consumed: HashMap<String, i64>,
    /// Decisions sent in this step (txid, when).
    pub sent: Vec<(String, i64)>,
    /// Decided in this step: (commit?, ms from creation to decision).
    pub decided: Vec<(bool, i64)>,
}

impl Step {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty()
            && self.prepares.is_empty()
            && self.decisions.is_empty()
            && self.replies.is_empty()
            && self.dead_letters.is_empty()
            && self.consumed.is_empty()
    }

    /// The log records to write, in the order first changed.
    pub fn records(&self) -> Vec<TxRecord> {
        self.order.iter().map(|t| self.changed[t].clone()).collect()
    }

    fn get<'a>(&'a self, base: &'a Txs, txid: &str) -> Option<&'a TxRecord> {
        self.changed.get(txid).or_else(|| base.records.get(txid))
    }

    fn put(&mut self, record: TxRecord) {
        if !self.changed.contains_key(&record.txid) {
            self.order.push(record.txid.clone());
        }
        self.changed.insert(record.txid.clone(), record);
    }

    fn reply(&mut self, partition: i32, txid: &str, outcome: ReplyOutcome) {
        self.replies.push((partition, txid.to_owned(), Reply { request_id: txid.to_owned(), outcome }));
    }

    /// Decides one consumed record: input 0 is `tx.requests`, input 1 `tx.votes`.
    pub fn handle(&mut self, ctx: &Context<'_>, base: &Txs, msg: Incoming, now_ms: i64) {
        let next = self.consumed.entry(msg.topic.clone()).or_insert(msg.offset);
        *next = (*next).max(msg.offset);
        if msg.input == 0 { self.request(ctx, base, msg, now_ms) } else { self.participant(ctx, base, msg, now_ms) }
    }

    fn request(&mut self, ctx: &Context<'_>, base: &Txs, msg: Incoming, now_ms: i64) {
        let parsed = msg.payload.as_deref().map(serde_json::from_slice::<TxRequest>);
        let request = match parsed {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                let reason = format!("transaction request is not valid: {e}");
                // Answer if the client can be found, else park the record.
                let loose: Option<serde_json::Value> =
                    msg.payload.as_deref().and_then(|p| serde_json::from_slice(p).ok());
                let txid = loose.as_ref().and_then(|v| v.get("txid")?.as_str().map(str::to_owned));
                let part = loose
                    .as_ref()
                    .and_then(|v| v.get("reply_partition")?.as_i64())
                    .and_then(|p| i32::try_from(p).ok())
                    .filter(|p| (0..ctx.reply_partitions).contains(p));
                if let (Some(txid), Some(part)) = (txid, part) {
                    self.reply(part, &txid, invalid(reason));
                } else {
                    self.dead_letters.push((msg, reason));
                }
                return;
            }
            None => return self.dead_letters.push((msg, "transaction request has no value".into())),
        };
        let part = request.reply_partition();
        if !(0..ctx.reply_partitions).contains(&part) {
            let reason =
                format!("reply_partition {part} does not exist (the replies topic has {})", ctx.reply_partitions);
            return self.dead_letters.push((msg, reason));
        }
        match request {
            TxRequest::Status { txid, .. } => {
                let status = self.get(base, &txid).map_or_else(|| TxStatus::unknown(&txid), TxStatus::of);
                self.reply(part, &txid, ReplyOutcome::Tx(status));
            }
            TxRequest::Begin { txid, participants, timeout_ms, .. } => {
                if let Some(known) = self.get(base, &txid).cloned() {
                    let same = known.participants.len() == participants.len()
                        && known
                            .participants
                            .iter()
                            .zip(&participants)
                            .all(|(a, b)| a.stream == b.stream && a.command == b.command);
                    if !same {
                        return self.reply(
                            part,
                            &txid,
                            invalid(format!("txid {txid} is already used for another transaction")),
                        );
                    }
                    if known.state.is_decided() {
                        return self.reply(part, &txid, ReplyOutcome::Tx(TxStatus::of(&known)));
                    }
                    // A retry while votes come in: answer it with the decision.
                    if !known.reply_partitions.contains(&part) {
                        let mut r = known;
                        r.reply_partitions.push(part);
                        self.put(r);
                    }
                    return;
                }
                if let Err(reason) = esk_client::tx::validate(&txid, &participants, timeout_ms, ctx.aggregates) {
                    return self.reply(part, &txid, invalid(reason));
                }
                for p in &participants {
                    let prepare = Prepare { txid: txid.clone(), stream: p.stream.clone(), command: p.command.clone() };
                    self.prepares.push((partition_for(p.stream.as_bytes(), ctx.partitions), p.stream.clone(), prepare));
                }
                self.put(TxRecord {
                    txid,
                    state: TxState::Preparing,
                    participants: participants
                        .into_iter()
                        .map(|p| ParticipantState {
                            stream: p.stream,
                            command: p.command,
                            vote: None,
                            reason: None,
                            acked: false,
                        })
                        .collect(),
                    deadline_ms: now_ms + timeout_ms as i64,
                    created_ms: now_ms,
                    decided_ms: None,
                    reason: None,
                    reply_partitions: vec![part],
                });
            }
        }
    }

    fn participant(&mut self, ctx: &Context<'_>, base: &Txs, msg: Incoming, now_ms: i64) {
        let message = match msg.payload.as_deref().map(serde_json::from_slice::<ParticipantMessage>) {
            Some(Ok(m)) => m,
            Some(Err(e)) => return self.dead_letters.push((msg, format!("participant message is not valid: {e}"))),
            None => return self.dead_letters.push((msg, "participant message has no value".into())),
        };
        match message {
            ParticipantMessage::Vote(v) => {
                let Some(mut r) = self.get(base, &v.txid).cloned() else {
                    if v.yes {
                        // Presumed abort: a yes for a transaction this log does not
                        // hold must not leave a hold behind.
                        let decision = Decision {
                            txid: v.txid.clone(),
                            stream: v.stream.clone(),
                            decision: Verdict::Abort,
                            reason: Some("unknown transaction".into()),
                        };
                        self.decisions.push((partition_for(v.stream.as_bytes(), ctx.partitions), v.stream, decision));
                    }
                    return;
                };
                if r.state != TxState::Preparing {
                    return; // Late: the decision was sent to every participant already.
                }
                let Some(p) = r.participants.iter_mut().find(|p| p.stream == v.stream) else {
                    return self.dead_letters.push((msg, format!("{} is not a participant of {}", v.stream, v.txid)));
                };
                if p.vote.is_some() {
                    return; // A duplicate vote.
                }
                p.vote = Some(v.yes);
                p.reason.clone_from(&v.reason);
                if !v.yes {
                    let reason = format!("{} voted no: {}", v.stream, v.reason.as_deref().unwrap_or("no reason given"));
                    self.decide(ctx, r, Verdict::Abort, Some(reason), now_ms);
                } else if r.participants.iter().all(|p| p.vote == Some(true)) {
                    self.decide(ctx, r, Verdict::Commit, None, now_ms);
                } else {
                    self.put(r);
                }
            }
            ParticipantMessage::Ack(a) => {
                let Some(mut r) = self.get(base, &a.txid).cloned() else { return };
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
                }
                self.put(r);
            }
        }
    }

    /// The decision: the log record, a decision to every participant, the
    /// outcome to every waiting client, all in this step's transaction.
    fn decide(&mut self, ctx: &Context<'_>, mut r: TxRecord, verdict: Verdict, reason: Option<String>, now_ms: i64) {
        r.state = if verdict == Verdict::Commit { TxState::Committing } else { TxState::Aborting };
        r.decided_ms = Some(now_ms);
        r.reason.clone_from(&reason);
        self.send_decisions(ctx, &r, now_ms);
        let status = TxStatus::of(&r);
        for part in &r.reply_partitions {
            self.reply(*part, &r.txid, ReplyOutcome::Tx(status.clone()));
        }
        self.decided.push((verdict == Verdict::Commit, now_ms - r.created_ms));
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
            self.decisions.push((partition_for(p.stream.as_bytes(), ctx.partitions), p.stream.clone(), decision));
        }
        self.sent.push((r.txid.clone(), now_ms));
    }

    /// What the clock decides: aborts past their deadline (presumed abort), and
    /// decisions sent again where acknowledgements are missing.
    pub fn tick(&mut self, ctx: &Context<'_>, base: &Txs, now_ms: i64) {
        let due: Vec<TxRecord> = base
            .records
            .values()
            .filter(|r| !self.changed.contains_key(&r.txid))
            .filter(|r| match r.state {
                TxState::Preparing => r.deadline_ms <= now_ms,
                TxState::Committing | TxState::Aborting => {
                    base.sent_ms.get(&r.txid).is_none_or(|sent| now_ms - sent >= ctx.resend_after_ms)
                }
                _ => false,
            })
            .cloned()
            .collect();
        for r in due {
            if r.state == TxState::Preparing {
                let missing: Vec<&str> =
                    r.participants.iter().filter(|p| p.vote.is_none()).map(|p| p.stream.as_str()).collect();
                let reason = format!(
                    "timed out after {} ms waiting for the votes of {}",
                    r.deadline_ms - r.created_ms,
                    missing.join(", ")
                );
                self.decide(ctx, r, Verdict::Abort, Some(reason), now_ms);
            } else {
                self.send_decisions(ctx, &r, now_ms);
            }
        }
    }
}

fn invalid(message: String) -> ReplyOutcome {
    ReplyOutcome::Error(ReplyError { code: ErrorCode::InvalidInput, message, actual_version: None })
}

#[cfg(test)]
mod tests;
