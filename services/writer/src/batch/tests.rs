use serde_json::json;

use super::*;

const P: i32 = 4;

struct World {
    schemas: SchemaRegistry,
    aggregates: Registry,
    state: HashMap<i32, PartitionState>,
}

impl World {
    fn new() -> Self {
        let mut schemas = SchemaRegistry::builtin();
        schemas.add("note", "Written", 1, &json!({"type": "object", "required": ["text"]})).unwrap();
        Self { schemas, aggregates: Registry::builtin(), state: HashMap::new() }
    }

    fn ctx(&self) -> Context<'_> {
        Context {
            schemas: &self.schemas,
            aggregates: &self.aggregates,
            partitions: P,
            reply_partitions: 2,
            vote_partitions: P,
            unusable: HashMap::new(),
        }
    }

    /// Runs one batch on the stream's partition, commits it, and returns what was written.
    fn run(&mut self, inputs: Vec<Incoming>) -> (Vec<OutEvent>, Finished, Vec<DeadLetter>, Vec<ParticipantMessage>) {
        let partition = inputs[0].partition;
        let base = self.state.remove(&partition).unwrap_or_else(|| PartitionState::new(partition));
        let (events, finished, dead, votes) = {
            let ctx = self.ctx();
            let mut batch = Batch::new(&base);
            for i in inputs {
                batch.handle(&ctx, i, Utc::now());
            }
            let events = batch.events.clone();
            let dead = batch.dead_letters.clone();
            let votes = batch.votes.iter().map(|v| v.2.clone()).collect();
            // Pretend the events landed at offsets 100, 101, ...
            let offsets: Vec<i64> = (0..events.len() as i64).map(|i| 100 + i).collect();
            (events, batch.finish(partition, &offsets), dead, votes)
        };
        let mut base = base;
        base.absorb(finished.records.clone());
        self.state.insert(partition, base);
        (events, finished, dead, votes)
    }

    fn version(&self, stream: &str) -> u64 {
        let p = partition_for(stream.as_bytes(), P);
        self.state.get(&p).and_then(|s| s.streams.get(stream)).map_or(0, |r| r.version)
    }
}

fn incoming(source: Source, key: &str, payload: Value) -> Incoming {
    Incoming {
        input: source as usize,
        topic: format!("{source:?}"),
        partition: partition_for(key.as_bytes(), P),
        offset: 0,
        key: Some(key.as_bytes().to_vec()),
        payload: Some(serde_json::to_vec(&payload).unwrap()),
        headers: Vec::new(),
    }
}

fn append(id: &str, stream: &str, expected: Value, events: Value) -> Incoming {
    incoming(
        Source::Commands,
        stream,
        json!({"request_id": id, "reply_partition": 1, "stream": stream, "kind": "append",
               "expected_version": expected, "events": events}),
    )
}

fn command(id: &str, stream: &str, ty: &str, data: Value) -> Incoming {
    incoming(
        Source::Commands,
        stream,
        json!({"request_id": id, "reply_partition": 0, "stream": stream, "kind": "command",
               "command": {"type": ty, "data": data}}),
    )
}

fn note(text: &str) -> Value {
    json!([{"type": "Written", "data": {"text": text}}])
}

fn outcome(f: &Finished, i: usize) -> &ReplyOutcome {
    &f.replies[i].2.outcome
}

fn appended(f: &Finished, i: usize) -> Appended {
    match outcome(f, i) {
        ReplyOutcome::Appended(a) => a.clone(),
        other => panic!("reply {i} is {other:?}"),
    }
}

fn failed(f: &Finished, i: usize) -> ReplyError {
    match outcome(f, i) {
        ReplyOutcome::Error(e) => e.clone(),
        other => panic!("reply {i} is {other:?}"),
    }
}

#[test]
fn appends_number_events_and_answer_with_a_position() {
    let mut w = World::new();
    let (events, f, _, _) = w.run(vec![append(
        "r1",
        "note-1",
        json!("no_stream"),
        json!([{"type": "Written", "data": {"text": "a"}}, {"type": "Written", "data": {"text": "b"}}]),
    )]);
    assert_eq!(events.iter().map(|e| e.event.version).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(events[0].event.data_schema.as_deref(), Some("urn:esk:schema:note:Written:v1"));
    assert_eq!(events[0].event.causation_id.as_deref(), Some("r1"));
    let a = appended(&f, 0);
    assert_eq!((a.first_version, a.last_version), (1, 2));
    let p = partition_for(b"note-1", P);
    assert_eq!(a.position, format!("note:{p}:101"));
    assert_eq!(f.replies[0].0, 1, "answered on the partition the client named");
    let rec = &f.records[0];
    assert_eq!((rec.version, rec.last_offset), (2, 101));
    assert_eq!(rec.index, [IndexEntry { version: 1, offset: 100 }]);
    assert_eq!(rec.answered[0].result, a, "the remembered answer carries the position");
}

#[test]
fn a_wrong_expected_version_writes_nothing_and_names_the_actual_version() {
    let mut w = World::new();
    w.run(vec![append("r1", "note-1", json!("any"), note("a"))]);
    for expected in [json!("no_stream"), json!(0), json!(2)] {
        let (events, f, _, _) = w.run(vec![append("r2", "note-1", expected, note("b"))]);
        assert!(events.is_empty());
        let e = failed(&f, 0);
        assert_eq!((e.code, e.actual_version), (ErrorCode::WrongExpectedVersion, Some(1)));
        assert!(f.records.is_empty());
    }
    let (_, f, _, _) = w.run(vec![append("r3", "note-2", json!("exists"), note("x"))]);
    assert_eq!(failed(&f, 0).actual_version, Some(0));
}

#[test]
fn requests_in_one_batch_see_each_other() {
    let mut w = World::new();
    let (events, f, _, _) = w.run(vec![
        append("r1", "note-1", json!(0), note("a")),
        append("r2", "note-1", json!(1), note("b")),
        append("r3", "note-1", json!(1), note("lost race")),
    ]);
    assert_eq!(events.len(), 2);
    assert_eq!(appended(&f, 1).first_version, 2);
    assert_eq!(failed(&f, 2).actual_version, Some(2));
    assert_eq!(f.records.len(), 1, "one state record per stream per batch");
    assert_eq!(f.records[0].index.len(), 2);
}

#[test]
fn retries_get_the_first_answer_and_write_nothing() {
    let mut w = World::new();
    let first = json!([{"id": "e-1", "type": "Written", "data": {"text": "a"}}]);
    let (_, f1, _, _) = w.run(vec![append("r1", "note-1", json!("no_stream"), first.clone())]);
    let original = appended(&f1, 0);
    // Same request id.
    let (events, f2, _, _) = w.run(vec![append("r1", "note-1", json!("no_stream"), first.clone())]);
    assert!(events.is_empty() && f2.records.is_empty());
    assert_eq!(appended(&f2, 0), original);
    // Same event ids at the same expected version, new request id.
    let (events, f3, _, _) = w.run(vec![append("r9", "note-1", json!("no_stream"), first)]);
    assert!(events.is_empty());
    assert_eq!(appended(&f3, 0), original);
    // Same request id in the same batch as the original.
    let mut w = World::new();
    let (events, f, _, _) =
        w.run(vec![append("r1", "note-2", json!("any"), note("a")), append("r1", "note-2", json!("any"), note("a"))]);
    assert_eq!(events.len(), 1);
    assert_eq!(appended(&f, 1), appended(&f, 0), "the copy in the same batch gets the same answer, position too");
    assert!(!appended(&f, 1).position.is_empty());
    assert_eq!(w.version("note-2"), 1);
}

#[test]
fn bad_appends_are_refused_with_a_reason() {
    let mut w = World::new();
    let cases: Vec<(Incoming, &str)> = vec![
        (append("a", "note-1", json!("any"), json!([])), "at least one event"),
        (
            append("b", "note-1", json!("any"), json!([{"type": "Scribbled", "data": {}}])),
            "unknown event type 'Scribbled'",
        ),
        (append("c", "note-1", json!("any"), json!([{"type": "Written", "data": {}}])), "event 1 (Written)"),
        (append("d", "note-1", json!("any"), json!([{"type": "has space", "data": {}}])), "not a name"),
        (
            append(
                "e",
                "note-1",
                json!("any"),
                json!([{"type": "Written", "data": {"text": "x".repeat(MAX_EVENT_BYTES)}}]),
            ),
            "limit is 262144",
        ),
        (
            append("f", "account-1", json!("any"), json!([{"type": "Deposited", "data": {"amount": 5}}])),
            "owned by its aggregate",
        ),
        (command("g", "note-1", "Write", json!({})), "has no aggregate"),
        (command("h", "account-1", "Steal", json!({})), "Steal"),
        (command("i", "account-1", "Deposit", json!({"amount": 0})), "at least 1"),
    ];
    for (input, wanted) in cases {
        let (events, f, dead, _) = w.run(vec![input]);
        assert!(events.is_empty() && dead.is_empty(), "{wanted}");
        let e = failed(&f, 0);
        assert_eq!(e.code, ErrorCode::InvalidInput, "{wanted}: {e:?}");
        assert!(e.message.contains(wanted), "wanted '{wanted}' in '{}'", e.message);
    }
}

#[test]
fn streams_must_arrive_on_their_own_partition_under_their_own_key() {
    let mut w = World::new();
    let mut wrong = append("r", "note-1", json!("any"), note("a"));
    wrong.partition = (wrong.partition + 1) % P;
    let (events, f, _, _) = w.run(vec![wrong]);
    assert!(events.is_empty());
    assert!(failed(&f, 0).message.contains("belongs to partition"));
    let mut rekeyed = append("r", "note-1", json!("any"), note("a"));
    rekeyed.key = Some(b"other".to_vec());
    let (_, f, _, _) = w.run(vec![rekeyed]);
    assert!(failed(&f, 0).message.contains("key"));
    let (_, f, _, _) = w.run(vec![append("r", "nocategory", json!("any"), note("a"))]);
    assert!(failed(&f, 0).message.contains("no category"));
}

#[test]
fn undecodable_records_are_parked_or_answered() {
    let mut w = World::new();
    let mut garbage = append("r", "note-1", json!("any"), note("a"));
    garbage.payload = Some(b"\xff\x00not json".to_vec());
    let (_, f, dead, _) = w.run(vec![garbage]);
    assert!(f.replies.is_empty());
    assert!(dead[0].reason.contains("not valid"), "{}", dead[0].reason);
    // Enough to answer: the client gets the reason instead.
    let half = incoming(Source::Commands, "note-1", json!({"request_id": "r", "reply_partition": 1, "kind": "append"}));
    let (_, f, dead, _) = w.run(vec![half]);
    assert!(dead.is_empty());
    assert!(failed(&f, 0).message.contains("stream"));
    // A reply partition that does not exist cannot be answered.
    let lost = incoming(
        Source::Commands,
        "note-1",
        json!({"request_id": "r", "reply_partition": 9, "stream": "note-1", "kind": "head"}),
    );
    let (_, _, dead, _) = w.run(vec![lost]);
    assert!(dead[0].reason.contains("reply_partition 9"));
}

#[test]
fn commands_go_through_the_aggregate() {
    let mut w = World::new();
    let (events, f, _, _) = w.run(vec![
        command("1", "account-7", "OpenAccount", json!({"owner": "ann"})),
        command("2", "account-7", "Deposit", json!({"amount": 10})),
        command("3", "account-7", "Withdraw", json!({"amount": 11})),
        command("4", "account-7", "Withdraw", json!({"amount": 4})),
    ]);
    assert_eq!(events.len(), 3);
    let refused = failed(&f, 2);
    assert_eq!(refused.code, ErrorCode::DomainRefused);
    assert!(refused.message.contains("insufficient funds"));
    assert_eq!(appended(&f, 3).last_version, 3);
    assert_eq!(f.records[0].state.as_ref().unwrap()["balance"], 6);
    // Every event the aggregate made carries the schema that validated it.
    assert!(events.iter().all(|e| e.event.data_schema.is_some()));
}

fn prepare(txid: &str, stream: &str, ty: &str, amount: i64) -> Incoming {
    incoming(
        Source::Prepare,
        stream,
        json!({"txid": txid, "stream": stream, "command": {"type": ty, "data": {"amount": amount}}}),
    )
}

fn decide(txid: &str, stream: &str, verdict: &str) -> Incoming {
    incoming(Source::Commit, stream, json!({"txid": txid, "stream": stream, "decision": verdict}))
}

fn vote(m: &ParticipantMessage) -> (bool, Option<String>) {
    match m {
        ParticipantMessage::Vote(v) => (v.yes, v.reason.clone()),
        other => panic!("not a vote: {other:?}"),
    }
}

#[test]
fn two_phase_participant_holds_then_commits_once() {
    let mut w = World::new();
    w.run(vec![
        command("1", "account-1", "OpenAccount", json!({"owner": "a"})),
        command("2", "account-1", "Deposit", json!({"amount": 10})),
    ]);
    let (events, _, _, votes) = w.run(vec![prepare("t1", "account-1", "Withdraw", 8)]);
    assert_eq!(events[0].event.event_type, "HoldPlaced");
    assert_eq!(vote(&votes[0]), (true, None));
    // The hold counts against a second transaction and a direct withdrawal.
    let (events, _, _, votes) = w.run(vec![prepare("t2", "account-1", "Withdraw", 5)]);
    assert!(events.is_empty());
    assert!(vote(&votes[0]).1.unwrap().contains("available 2"));
    let (_, f, _, _) = w.run(vec![command("3", "account-1", "Withdraw", json!({"amount": 3}))]);
    assert_eq!(failed(&f, 0).code, ErrorCode::DomainRefused);
    // A duplicate prepare votes yes again and places no second hold.
    let (events, _, _, votes) = w.run(vec![prepare("t1", "account-1", "Withdraw", 8)]);
    assert!(events.is_empty());
    assert!(vote(&votes[0]).0);
    // Commit applies and releases; a duplicate commit only acknowledges.
    let (events, f, _, votes) = w.run(vec![decide("t1", "account-1", "commit")]);
    let types: Vec<_> = events.iter().map(|e| e.event.event_type.as_str()).collect();
    assert_eq!(types, ["Withdrawn", "HoldReleased"]);
    assert!(matches!(&votes[0], ParticipantMessage::Ack(a) if a.decision == Verdict::Commit));
    assert_eq!(f.records[0].state.as_ref().unwrap()["balance"], 2);
    let (events, _, _, votes) = w.run(vec![decide("t1", "account-1", "commit")]);
    assert!(events.is_empty());
    assert!(matches!(&votes[0], ParticipantMessage::Ack(_)));
    // A late duplicate prepare after the decision places no new hold.
    let (events, _, _, _) = w.run(vec![prepare("t1", "account-1", "Withdraw", 8)]);
    assert!(events.is_empty());
}

#[test]
fn abort_releases_and_is_remembered() {
    let mut w = World::new();
    w.run(vec![
        command("1", "account-1", "OpenAccount", json!({"owner": "a"})),
        command("2", "account-1", "Deposit", json!({"amount": 10})),
    ]);
    w.run(vec![prepare("t1", "account-1", "Withdraw", 10)]);
    let (events, f, _, _) = w.run(vec![decide("t1", "account-1", "abort")]);
    assert_eq!(events[0].event.event_type, "HoldReleased");
    assert_eq!(f.records[0].state.as_ref().unwrap()["balance"], 10);
    // Abort before any prepare (the prepare was lost or late): remembered, so the
    // late prepare votes no and holds nothing.
    let (events, _, _, votes) = w.run(vec![decide("t9", "account-1", "abort")]);
    assert!(events.is_empty());
    assert!(matches!(&votes[0], ParticipantMessage::Ack(_)));
    let (events, _, _, votes) = w.run(vec![prepare("t9", "account-1", "Withdraw", 1)]);
    assert!(events.is_empty());
    assert!(!vote(&votes[0]).0);
    // Prepares for categories without an aggregate, or on closed accounts, vote no.
    let (_, _, _, votes) = w.run(vec![prepare("t3", "note-1", "Withdraw", 1)]);
    assert!(vote(&votes[0]).1.unwrap().contains("no aggregate"));
    let (_, _, _, votes) = w.run(vec![prepare("t4", "account-404", "Deposit", 1)]);
    assert!(vote(&votes[0]).1.unwrap().contains("not open"));
}

#[test]
fn head_reports_version_and_index() {
    let mut w = World::new();
    w.run(vec![append("1", "note-1", json!("any"), note("a"))]);
    let head = incoming(
        Source::Commands,
        "note-1",
        json!({"request_id": "h", "reply_partition": 0, "stream": "note-1", "kind": "head"}),
    );
    let (_, f, _, _) = w.run(vec![append("2", "note-1", json!("any"), note("b")), head]);
    match outcome(&f, 1) {
        ReplyOutcome::Head(h) => {
            assert_eq!(h.version, 2);
            assert_eq!(h.index.len(), 2);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn index_compaction_keeps_the_first_entry_and_the_tightest_spans() {
    let mut index: Vec<IndexEntry> = (0..40).map(|i| IndexEntry { version: i + 1, offset: (i * i) as i64 }).collect();
    compact_index(&mut index);
    assert_eq!(index.len(), MAX_INDEX);
    assert_eq!(index[0].version, 1);
    assert_eq!(index.last().unwrap().version, 40);
    assert!(index.windows(2).all(|w| w[0].version < w[1].version && w[0].offset < w[1].offset));
}

#[test]
fn every_account_event_matches_its_schema() {
    let schemas = SchemaRegistry::builtin();
    let samples = [
        json!({"type": "AccountOpened", "data": {"owner": "a"}}),
        json!({"type": "Deposited", "data": {"amount": 1, "txid": "t"}}),
        json!({"type": "Withdrawn", "data": {"amount": 1}}),
        json!({"type": "HoldPlaced", "data": {"txid": "t", "command": "Withdraw", "amount": 1}}),
        json!({"type": "HoldReleased", "data": {"txid": "t", "outcome": "aborted", "reason": "r"}}),
    ];
    for s in samples {
        let e: esk_domain::account::Event = serde_json::from_value(s.clone()).unwrap();
        let back = serde_json::to_value(&e).unwrap();
        schemas
            .validate("account", back["type"].as_str().unwrap(), &back["data"])
            .unwrap_or_else(|err| panic!("{s}: {err}"));
    }
}
