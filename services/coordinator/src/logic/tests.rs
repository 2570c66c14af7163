use serde_json::{Value, json};

use super::*;

const P: i32 = 4;

fn ctx(aggregates: &Registry) -> Context<'_> {
    Context { aggregates, partitions: P, reply_partitions: 2, resend_after_ms: 1000 }
}

fn msg(input: usize, key: &str, payload: Value) -> Incoming {
    Incoming {
        input,
        topic: if input == 0 { "requests".into() } else { "votes".into() },
        partition: 0,
        offset: 0,
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

/// Runs one step and commits it into `txs`.
fn step(txs: &mut Txs, inputs: Vec<Incoming>, now: i64) -> Step {
    let aggregates = Registry::builtin();
    let c = ctx(&aggregates);
    let mut s = Step::default();
    for i in inputs {
        s.handle(&c, txs, i, now);
    }
    s.tick(&c, txs, now);
    txs.absorb(s.records(), s.sent.clone());
    s
}

fn outcome(s: &Step, i: usize) -> &ReplyOutcome {
    &s.replies[i].2.outcome
}

fn transfer() -> Incoming {
    begin("t1", &[("account-a", "Withdraw", 10), ("account-b", "Deposit", 10)])
}

#[test]
fn all_yes_commits_everywhere_and_tells_the_client() {
    let mut txs = Txs::default();
    let s = step(&mut txs, vec![transfer()], 0);
    assert_eq!(s.prepares.len(), 2);
    assert_eq!(s.prepares[0].0, partition_for(b"account-a", P));
    assert!(s.replies.is_empty(), "no answer before the decision");
    assert_eq!(txs.records["t1"].state, TxState::Preparing);
    let s = step(&mut txs, vec![vote("t1", "account-a", true)], 10);
    assert!(s.decisions.is_empty());
    let s = step(&mut txs, vec![vote("t1", "account-b", true), vote("t1", "account-b", true)], 20);
    assert_eq!(s.decisions.len(), 2, "one decision each, the duplicate vote ignored");
    assert!(s.decisions.iter().all(|d| d.2.decision == Verdict::Commit));
    assert!(matches!(outcome(&s, 0), ReplyOutcome::Tx(t) if t.outcome == "committed"));
    assert_eq!(s.replies[0].0, 1);
    assert_eq!(txs.records["t1"].state, TxState::Committing);
    step(&mut txs, vec![ack("t1", "account-a", "commit")], 30);
    assert_eq!(txs.records["t1"].state, TxState::Committing);
    step(&mut txs, vec![ack("t1", "account-b", "commit"), ack("t1", "account-b", "commit")], 40);
    assert_eq!(txs.records["t1"].state, TxState::Committed);
}

#[test]
fn one_no_aborts_everywhere_with_the_reason() {
    let mut txs = Txs::default();
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
    // A late yes changes nothing.
    let s = step(&mut txs, vec![vote("t1", "account-b", true)], 6);
    assert!(s.decisions.is_empty() && s.replies.is_empty());
}

#[test]
fn the_deadline_aborts_and_decisions_are_sent_again_until_acknowledged() {
    let mut txs = Txs::default();
    step(&mut txs, vec![transfer(), vote("t1", "account-a", true)], 0);
    let s = step(&mut txs, vec![], 4999);
    assert!(s.decisions.is_empty(), "not before the deadline");
    let s = step(&mut txs, vec![], 5000);
    assert_eq!(s.decisions.len(), 2);
    assert!(txs.records["t1"].reason.as_deref().unwrap().contains("votes of account-b"));
    step(&mut txs, vec![ack("t1", "account-a", "abort")], 5100);
    let s = step(&mut txs, vec![], 5500);
    assert!(s.decisions.is_empty(), "not before resend_after_ms");
    let s = step(&mut txs, vec![], 6000);
    assert_eq!(s.decisions.len(), 1, "only to the participant that did not acknowledge");
    assert_eq!(s.decisions[0].1, "account-b");
    // After a takeover nothing was sent yet: unacknowledged decisions go at once.
    txs.sent_ms.clear();
    let s = step(&mut txs, vec![], 6001);
    assert_eq!(s.decisions.len(), 1);
}

#[test]
fn retries_and_status_answer_from_the_log() {
    let mut txs = Txs::default();
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
    assert!(matches!(outcome(&s, 0), ReplyOutcome::Tx(t) if t.state == TxState::Unknown));
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
        let mut txs = Txs::default();
        let s = step(&mut txs, vec![input], 0);
        assert!(s.prepares.is_empty() && txs.records.is_empty(), "{wanted}");
        match outcome(&s, 0) {
            ReplyOutcome::Error(e) => assert!(e.message.contains(wanted), "wanted '{wanted}' in '{}'", e.message),
            other => panic!("{other:?}"),
        }
    }
    let mut txs = Txs::default();
    let mut garbage = transfer();
    garbage.payload = Some(b"{{{".to_vec());
    let s = step(&mut txs, vec![garbage], 0);
    assert_eq!(s.dead_letters.len(), 1);
}

#[test]
fn a_yes_for_an_unknown_transaction_is_answered_with_an_abort() {
    let mut txs = Txs::default();
    let s = step(&mut txs, vec![vote("ghost", "account-a", true)], 0);
    assert_eq!(s.decisions.len(), 1);
    assert_eq!(s.decisions[0].2.decision, Verdict::Abort);
    let s = step(&mut txs, vec![vote("ghost", "account-a", false)], 0);
    assert!(s.decisions.is_empty());
}

#[test]
fn inventory_and_accounts_in_one_transaction() {
    let mut txs = Txs::default();
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
