use std::collections::HashMap;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

const P: i32 = 4;

const HORIZON_MS: i64 = 3_600_000;

fn ctx(aggregates: &Registry) -> Context<'_> {
    Context {
        aggregates,
        router: &DefaultContext(P),
        partitions: P,
        reply_partitions: 2,
        resend_after_ms: 1000,
        limits: Limits::default(),
        horizon_ms: HORIZON_MS,
    }
}

/// The partition: live transactions in memory, ended ones "on disk".
#[derive(Default)]
struct World {
    txs: Txs,
    done: HashMap<String, TxRecord>,
}

fn msg(input: usize, key: &str, payload: Value) -> Incoming {
    msg_at(input, key, payload, 0)
}

fn msg_at(input: usize, key: &str, payload: Value, offset: i64) -> Incoming {
    Incoming {
        input,
        topic: if input == 0 { "requests".into() } else { "votes".into() },
        partition: partition_for(key.as_bytes(), P),
        offset,
        key: Some(key.as_bytes().to_vec()),
        payload: Some(serde_json::to_vec(&payload).unwrap()),
        headers: Vec::new(),
    }
}

fn begin(txid: &str, legs: &[(&str, &str, i64)]) -> Incoming {
    let participants: Vec<Value> =
        legs.iter().map(|(s, c, a)| json!({"stream": s, "command": {"type": c, "data": {"amount": a}}})).collect();
    msg(
        0,
        txid,
        json!({"kind": "begin", "txid": txid, "participants": participants, "timeout_ms": 5000, "reply_partition": 1}),
    )
}

fn vote(txid: &str, stream: &str, yes: bool) -> Incoming {
    let reason = if yes { Value::Null } else { json!("insufficient funds") };
    msg(1, txid, json!({"kind": "vote", "txid": txid, "stream": stream, "yes": yes, "reason": reason}))
}

fn ack(txid: &str, stream: &str, decision: &str) -> Incoming {
    msg(1, txid, json!({"kind": "ack", "txid": txid, "stream": stream, "decision": decision}))
}

/// Runs one step and commits it into the world.
fn step(w: &mut World, inputs: Vec<Incoming>, now: i64) -> Step {
    let aggregates = Registry::builtin();
    let c = ctx(&aggregates);
    let mut s = Step::default();
    for i in inputs {
        s.handle(&c, &w.txs, &mut w.done, i, now);
    }
    s.tick(&c, &w.txs, now);
    for r in s.records() {
        if r.is_done() {
            w.done.insert(r.txid.clone(), r);
        }
    }
    w.txs.absorb(&s);
    s
}

impl World {
    fn state(&self, txid: &str) -> TxState {
        self.txs.get(txid).or_else(|| self.done.get(txid)).map_or(TxState::Unknown, |r| r.state)
    }
}

fn outcome(s: &Step, i: usize) -> &ReplyOutcome {
    &s.replies[i].2.outcome
}

fn transfer() -> Incoming {
    begin("t1", &[("account-a", "Withdraw", 10), ("account-b", "Deposit", 10)])
}

#[test]
fn all_yes_commits_everywhere_and_tells_the_client() {
    let mut txs = World::default();
    let s = step(&mut txs, vec![transfer()], 0);
    assert_eq!(s.prepares.len(), 2);
    assert_eq!(s.prepares[0].0, partition_for(b"account-a", P));
    assert!(s.replies.is_empty(), "no answer before the decision");
    assert_eq!(txs.state("t1"), TxState::Preparing);
    let s = step(&mut txs, vec![vote("t1", "account-a", true)], 10);
    assert!(s.decisions.is_empty());
    let s = step(&mut txs, vec![vote("t1", "account-b", true), vote("t1", "account-b", true)], 20);
    assert_eq!(s.decisions.len(), 2, "one decision each, the duplicate vote ignored");
    assert!(s.decisions.iter().all(|d| d.2.decision == Verdict::Commit));
    assert!(matches!(outcome(&s, 0), ReplyOutcome::Tx(t) if t.outcome == "committed"));
    assert_eq!(s.replies[0].0, 1);
    assert_eq!(txs.state("t1"), TxState::Committing);
    step(&mut txs, vec![ack("t1", "account-a", "commit")], 30);
    assert_eq!(txs.state("t1"), TxState::Committing);
    step(&mut txs, vec![ack("t1", "account-b", "commit"), ack("t1", "account-b", "commit")], 40);
    assert_eq!(txs.state("t1"), TxState::Committed);
    assert!(txs.txs.is_empty(), "an ended transaction leaves memory");
    assert_eq!(txs.done["t1"].done_ms, Some(40));
}

#[test]
fn partial_votes_and_acknowledgements_are_kept_in_memory_and_logged_with_the_next_change() {
    let mut w = World::default();
    step(&mut w, vec![transfer()], 0);
    // The first yes: no log record, no Kafka transaction needed; the vote's
    // offset may not be committed until it is logged.
    let mut first = vote("t1", "account-a", true);
    first.offset = 7;
    let s = step(&mut w, vec![first], 10);
    assert!(s.records().is_empty() && !s.needs_transaction(), "{:?}", s.records());
    assert_eq!(s.kept().len(), 1);
    assert_eq!(w.state("t1"), TxState::Preparing);
    assert_eq!(w.txs.unlogged_votes["t1"], ("votes".to_owned(), vec![7]));
    let later = Step::default();
    assert_eq!(w.txs.committable(&later, "votes", 9), Some(6), "not past the held vote");
    assert_eq!(w.txs.committable(&later, "requests", 9), Some(9));
    // The second yes decides: the record, with both votes, is logged, and the
    // held offset is free.
    let s = step(
        &mut w,
        vec![msg_at(1, "t1", json!({"kind": "vote", "txid": "t1", "stream": "account-b", "yes": true}), 8)],
        20,
    );
    let logged = s.records();
    assert_eq!(logged.len(), 1);
    assert!(logged[0].participants.iter().all(|p| p.vote == Some(true)));
    assert_eq!(w.txs.committable(&s, "votes", 8), Some(8));
    assert!(w.txs.unlogged_votes.is_empty());
    // The first acknowledgement: memory only; the last logs the end with both.
    let s = step(&mut w, vec![ack("t1", "account-a", "commit")], 30);
    assert!(!s.needs_transaction());
    assert_eq!(w.state("t1"), TxState::Committing);
    let s = step(&mut w, vec![ack("t1", "account-b", "commit")], 40);
    let logged = s.records();
    assert_eq!(logged.len(), 1);
    assert_eq!(logged[0].state, TxState::Committed);
    assert!(logged[0].participants.iter().all(|p| p.acked));
    // A vote held in memory is logged when the deadline aborts its transaction.
    step(&mut w, vec![begin("t2", &[("account-a", "Withdraw", 1), ("account-b", "Deposit", 1)])], 100);
    step(
        &mut w,
        vec![msg_at(1, "t2", json!({"kind": "vote", "txid": "t2", "stream": "account-a", "yes": true}), 11)],
        110,
    );
    assert_eq!(w.txs.committable(&Step::default(), "votes", 20), Some(10));
    let s = step(&mut w, vec![], 100 + 5000);
    assert_eq!(s.records().len(), 1);
    assert_eq!(s.records()[0].state, TxState::Aborting);
    assert_eq!(w.txs.committable(&Step::default(), "votes", 20), Some(20));
}

#[test]
fn one_no_aborts_everywhere_with_the_reason() {
    let mut txs = World::default();
    step(&mut txs, vec![transfer(), vote("t1", "account-b", true)], 0);
    let s = step(&mut txs, vec![vote("t1", "account-a", false)], 5);
    assert_eq!(s.decisions.len(), 2);
    assert!(s.decisions.iter().all(|d| d.2.decision == Verdict::Abort));
    match outcome(&s, 0) {
        ReplyOutcome::Tx(t) => {
            assert_eq!(t.outcome, "aborted");
            assert!(t.reason.as_deref().unwrap().contains("account-a voted no: insufficient funds"));
        }
        other => panic!("{other:?}"),
    }
    // A late yes from a participant that has not acknowledged is answered
    // with the decision; nothing else changes.
    let s = step(&mut txs, vec![vote("t1", "account-b", true)], 6);
    assert!(s.replies.is_empty() && s.records().is_empty());
    assert_eq!(s.decisions.len(), 1);
    assert_eq!((s.decisions[0].1.as_str(), s.decisions[0].2.decision), ("account-b", Verdict::Abort));
}

#[test]
fn a_yes_after_the_participant_applied_the_decision_releases_the_stray_hold() {
    let mut txs = World::default();
    step(&mut txs, vec![transfer(), vote("t1", "account-a", true), vote("t1", "account-b", true)], 0);
    step(&mut txs, vec![ack("t1", "account-a", "commit")], 1);
    // account-a applied the commit; a yes from it now is a hold placed by a
    // late prepare: it is released, not committed a second time.
    let s = step(&mut txs, vec![vote("t1", "account-a", true)], 2);
    assert_eq!(s.decisions.len(), 1);
    assert_eq!((s.decisions[0].1.as_str(), s.decisions[0].2.decision), ("account-a", Verdict::Abort));
    assert!(s.decisions[0].2.reason.as_deref().unwrap().contains("late prepare"));
    step(&mut txs, vec![ack("t1", "account-b", "commit")], 3);
    assert_eq!(txs.state("t1"), TxState::Committed);
    // Ended too: the same for every participant, and for streams that never were one.
    for stream in ["account-b", "account-z"] {
        let s = step(&mut txs, vec![vote("t1", stream, true)], 4);
        assert_eq!(s.decisions.len(), 1, "{stream}");
        assert_eq!(s.decisions[0].2.decision, Verdict::Abort);
    }
    let s = step(&mut txs, vec![vote("t1", "account-b", false)], 5);
    assert!(s.decisions.is_empty(), "a no holds nothing");
}

#[test]
fn prepares_carry_the_deadline_and_replies_the_attempt() {
    let mut txs = World::default();
    let mut b = transfer();
    let mut v: Value = serde_json::from_slice(b.payload.as_deref().unwrap()).unwrap();
    v["attempt"] = json!("a-1");
    b.payload = Some(serde_json::to_vec(&v).unwrap());
    let s = step(&mut txs, vec![b], 100);
    assert!(s.prepares.iter().all(|(_, _, p, _)| p.deadline_ms == Some(5100)));
    let s = step(&mut txs, vec![vote("t1", "account-a", true), vote("t1", "account-b", true)], 200);
    assert_eq!(s.replies[0].2.attempt.as_deref(), Some("a-1"));
}

#[test]
fn a_transaction_older_than_the_horizon_is_refused_unless_remembered() {
    let mut txs = World::default();
    let old = 10 * HORIZON_MS;
    let mut b = begin("late", &[("account-a", "Withdraw", 1)]);
    let mut v: Value = serde_json::from_slice(b.payload.as_deref().unwrap()).unwrap();
    v["sent_ms"] = json!(old - HORIZON_MS - 1);
    b.payload = Some(serde_json::to_vec(&v).unwrap());
    let s = step(&mut txs, vec![b.clone()], old);
    assert!(s.prepares.is_empty());
    assert!(matches!(outcome(&s, 0), ReplyOutcome::Error(e) if e.code == ErrorCode::RequestExpired));
    // Known, the same old request gets its outcome.
    let mut b2 = b.clone();
    b2.payload = Some(
        serde_json::to_vec(&{
            let mut v2 = v.clone();
            v2["sent_ms"] = json!(old);
            v2
        })
        .unwrap(),
    );
    step(&mut txs, vec![b2], old);
    let s = step(&mut txs, vec![b], old + 1);
    assert!(s.replies.is_empty() && s.prepares.is_empty(), "a retry while it prepares waits for the decision");
}

#[test]
fn the_deadline_aborts_and_decisions_are_sent_again_until_acknowledged() {
    let mut txs = World::default();
    step(&mut txs, vec![transfer(), vote("t1", "account-a", true)], 0);
    let s = step(&mut txs, vec![], 4999);
    assert!(s.decisions.is_empty(), "not before the deadline");
    let s = step(&mut txs, vec![], 5000);
    assert_eq!(s.decisions.len(), 2);
    assert!(txs.txs.get("t1").unwrap().reason.as_deref().unwrap().contains("votes of account-b"));
    step(&mut txs, vec![ack("t1", "account-a", "abort")], 5100);
    let s = step(&mut txs, vec![], 5500);
    assert!(s.decisions.is_empty(), "not before resend_after_ms");
    let s = step(&mut txs, vec![], 6000);
    assert_eq!(s.decisions.len(), 1, "only to the participant that did not acknowledge");
    assert_eq!(s.decisions[0].1, "account-b");
    // After a takeover nothing was sent yet: unacknowledged decisions go at once.
    txs.txs.forget_sent();
    let s = step(&mut txs, vec![], 6001);
    assert_eq!(s.decisions.len(), 1);
}

#[test]
fn retries_and_status_answer_from_the_log() {
    let mut txs = World::default();
    step(&mut txs, vec![transfer()], 0);
    // A retry while preparing adds nothing but waits for the same decision.
    let s = step(&mut txs, vec![transfer()], 1);
    assert!(s.prepares.is_empty() && s.replies.is_empty());
    step(&mut txs, vec![vote("t1", "account-a", true), vote("t1", "account-b", true)], 2);
    let s = step(&mut txs, vec![transfer()], 3);
    assert!(matches!(outcome(&s, 0), ReplyOutcome::Tx(t) if t.outcome == "committed"));
    let other = begin("t1", &[("account-a", "Withdraw", 99)]);
    let s = step(&mut txs, vec![other], 4);
    assert!(matches!(outcome(&s, 0), ReplyOutcome::Error(e) if e.message.contains("already used")));
    let s = step(&mut txs, vec![msg(0, "zz", json!({"kind": "status", "txid": "zz", "reply_partition": 0}))], 5);
    assert!(matches!(outcome(&s, 0), ReplyOutcome::Tx(t) if t.state == TxState::Unknown
        && t.reason.as_deref().unwrap().contains("idempotency horizon")));
    // Ended, it is still known: retries and status get its outcome.
    step(&mut txs, vec![ack("t1", "account-a", "commit"), ack("t1", "account-b", "commit")], 6);
    assert!(txs.txs.is_empty());
    let s = step(&mut txs, vec![transfer()], 7);
    assert!(matches!(outcome(&s, 0), ReplyOutcome::Tx(t) if t.state == TxState::Committed));
    let s = step(&mut txs, vec![msg(0, "t1", json!({"kind": "status", "txid": "t1", "reply_partition": 0}))], 8);
    assert!(matches!(outcome(&s, 0), ReplyOutcome::Tx(t) if t.outcome == "committed"));
}

#[test]
fn bad_transactions_are_refused_before_anything_is_logged() {
    let cases: Vec<(Incoming, &str)> = vec![
        (begin("x1", &[]), "at least one participant"),
        (begin("x2", &[("account-a", "Withdraw", 1), ("account-a", "Deposit", 1)]), "appears twice"),
        (begin("x3", &[("nothing-a", "Withdraw", 1)]), "unknown category 'nothing'"),
        (begin("x4", &[("account-a", "Withdraw", 0)]), "at least 1"),
        (begin("x5", &[("account-a", "Withdraw", -5)]), "at least 1"),
        (begin("x6", &[("account-a", "OpenAccount", 1)]), "OpenAccount"),
        (begin("bad txid", &[("account-a", "Withdraw", 1)]), "txid"),
    ];
    for (input, wanted) in cases {
        let mut txs = World::default();
        let s = step(&mut txs, vec![input], 0);
        assert!(s.prepares.is_empty() && txs.txs.is_empty(), "{wanted}");
        match outcome(&s, 0) {
            ReplyOutcome::Error(e) => assert!(e.message.contains(wanted), "wanted '{wanted}' in '{}'", e.message),
            other => panic!("{other:?}"),
        }
    }
    let mut txs = World::default();
    let mut garbage = transfer();
    garbage.payload = Some(b"{{{".to_vec());
    let s = step(&mut txs, vec![garbage], 0);
    assert_eq!(s.dead_letters.len(), 1);
}

#[test]
fn a_yes_for_an_unknown_transaction_is_answered_with_an_abort() {
    let mut txs = World::default();
    let s = step(&mut txs, vec![vote("ghost", "account-a", true)], 0);
    assert_eq!(s.decisions.len(), 1);
    assert_eq!(s.decisions[0].2.decision, Verdict::Abort);
    let s = step(&mut txs, vec![vote("ghost", "account-a", false)], 0);
    assert!(s.decisions.is_empty());
}

#[test]
fn a_transaction_on_another_partition_than_its_txid_is_refused() {
    let mut txs = World::default();
    let mut b = transfer();
    b.partition = (b.partition + 1) % P;
    let s = step(&mut txs, vec![b], 0);
    assert!(s.prepares.is_empty());
    assert!(matches!(outcome(&s, 0), ReplyOutcome::Error(e) if e.message.contains("belongs to partition")));
    let mut v = vote("t1", "account-a", true);
    v.key = Some(b"other".to_vec());
    let s = step(&mut txs, vec![v], 1);
    assert_eq!(s.dead_letters.len(), 1);
}

#[test]
fn inventory_and_accounts_in_one_transaction() {
    let mut txs = World::default();
    let s = step(&mut txs, vec![begin("buy", &[("account-a", "Withdraw", 5)])], 0);
    assert_eq!(s.prepares.len(), 1);
    let reserve = msg(
        0,
        "mix",
        json!({"kind": "begin", "txid": "mix", "timeout_ms": 1000, "reply_partition": 0, "participants": [
            {"stream": "account-a", "command": {"type": "Withdraw", "data": {"amount": 5}}},
            {"stream": "inventory-sku1", "command": {"type": "Reserve", "data": {"quantity": 2}}}]}),
    );
    let s = step(&mut txs, vec![reserve], 0);
    assert_eq!(s.prepares.len(), 2);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// No record on tx.requests or tx.votes makes the coordinator panic.
    #[test]
    fn arbitrary_records_never_panic(
        inputs in prop::collection::vec(
            (0usize..2, prop_oneof![
                prop::collection::vec(any::<u8>(), 0..64),
                prop_oneof![Just("begin"), Just("status"), Just("vote"), Just("ack"), Just("x")]
                    .prop_flat_map(|kind| (Just(kind), "\\PC{0,8}", any::<bool>(), -2i64..3))
                    .prop_map(|(kind, txid, yes, part)| serde_json::to_vec(&json!({
                        "kind": kind, "txid": txid, "stream": "account-a", "yes": yes, "decision": "commit",
                        "reply_partition": part, "timeout_ms": 1000,
                        "participants": [{"stream": "account-a", "command": {"type": "Withdraw", "data": {"amount": part}}}],
                    })).unwrap()),
            ]),
            1..10),
    ) {
        let mut txs = World::default();
        step(&mut txs, vec![transfer()], 0);
        let batch: Vec<Incoming> = inputs
            .into_iter()
            .map(|(input, payload)| {
                let mut m = msg(input, "k", json!(null));
                m.payload = Some(payload);
                m
            })
            .collect();
        step(&mut txs, batch, 10);
        step(&mut txs, vec![], 100_000);
    }
}

/// The clock finds what is due through the indexes: exactly the preparing
/// transactions past their deadline, oldest first, and the decisions not
/// sent for `resend_after_ms`; the gauges count the same.
#[test]
fn the_clock_decides_exactly_what_is_due_among_many() {
    let mut w = World::default();
    for i in 0..200 {
        step(
            &mut w,
            vec![begin(&format!("t{i:03}"), &[("account-a", "Withdraw", 1), ("account-b", "Deposit", 1)])],
            i * 10,
        );
    }
    assert_eq!(w.txs.counts(5000), (200, 0));
    assert_eq!(w.txs.counts(5105), (200, 11), "deadlines 5000..=5100 passed");
    // t000..=t010 have deadlines at or before 5100.
    let s = step(&mut w, vec![], 5100);
    let mut aborted: Vec<String> = s.records().into_iter().map(|r| r.txid).collect();
    aborted.dedup();
    let want: Vec<String> = (0..=10).map(|i| format!("t{i:03}")).collect();
    assert_eq!(aborted, want, "the due ones, oldest first");
    assert!(s.decisions.iter().all(|d| d.2.decision == Verdict::Abort));
    assert_eq!(s.decisions.len(), 22);
    assert_eq!(w.txs.counts(5105), (200, 0), "decided: no longer in doubt");
    // Decisions are sent again only after resend_after_ms (1,000).
    assert!(step(&mut w, vec![], 5109).decisions.is_empty());
    let s = step(&mut w, vec![], 6100);
    assert_eq!(s.decisions.len(), 22 + 2 * 100, "the 11 decided again, and t011..=t110 past their deadlines");
    w.txs.forget_sent();
    assert_eq!(w.txs.len(), 200);
}

/// A registry a test changes: categories to contexts, each context with its
/// partition count.
#[derive(Debug, Default)]
struct Moving {
    owners: std::sync::Mutex<HashMap<String, String>>,
}

impl Router for Moving {
    fn route(&self, category: &str) -> Result<(String, i32), String> {
        let context = self.owners.lock().unwrap().get(category).cloned().unwrap_or_else(|| "default".into());
        Ok((context.clone(), self.partitions(&context)?))
    }

    fn partitions(&self, context: &str) -> Result<i32, String> {
        match context {
            "default" => Ok(P),
            "payments" => Ok(3),
            other => Err(format!("no context {other}")),
        }
    }

    fn elsewhere(&self, category: &str) -> bool {
        self.owners.lock().unwrap().contains_key(category)
    }
}

#[test]
fn a_decision_goes_where_its_prepare_went_whatever_the_registry_says_later() {
    let router = Moving::default();
    router.owners.lock().unwrap().insert("account".into(), "payments".into());
    let aggregates = Registry::builtin();
    let c = Context { router: &router, ..ctx(&aggregates) };
    let mut w = World::default();
    let run = |w: &mut World, inputs: Vec<Incoming>, now: i64| {
        let mut s = Step::default();
        for i in inputs {
            s.handle(&c, &w.txs, &mut w.done, i, now);
        }
        for r in s.records() {
            if r.is_done() {
                w.done.insert(r.txid.clone(), r);
            }
        }
        w.txs.absorb(&s);
        s
    };
    let s = run(&mut w, vec![transfer()], 0);
    assert!(s.prepares.iter().all(|p| p.3 == "payments" && p.0 == partition_for(p.1.as_bytes(), 3)), "{s:?}");
    // The registry changes (it cannot for a category with holds; say it did).
    router.owners.lock().unwrap().clear();
    let s = run(&mut w, vec![vote("t1", "account-a", true), vote("t1", "account-b", true)], 10);
    assert_eq!(s.decisions.len(), 2);
    assert!(s.decisions.iter().all(|d| d.3 == "payments" && d.0 == partition_for(d.1.as_bytes(), 3)), "{s:?}");
    // A vote about a transaction the log no longer holds is answered to the
    // voter's context; a context named on the wire that is not a name is not used.
    let mut stray = vote("t9", "account-z", true);
    let named = json!({"kind": "vote", "txid": "t9", "stream": "account-z", "yes": true, "context": "payments"});
    stray.payload = Some(serde_json::to_vec(&named).unwrap());
    let s = run(&mut w, vec![stray], 20);
    assert_eq!((s.decisions[0].3.as_str(), s.decisions[0].2.decision), ("payments", Verdict::Abort));
    let mut forged = vote("t8", "account-y", true);
    let bad = json!({"kind": "vote", "txid": "t8", "stream": "account-y", "yes": true, "context": "../x"});
    forged.payload = Some(serde_json::to_vec(&bad).unwrap());
    let s = run(&mut w, vec![forged], 30);
    assert_eq!(s.decisions[0].3, "default", "a context that is not a name is not used");
}
