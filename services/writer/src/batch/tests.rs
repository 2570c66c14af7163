use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use serde_json::json;

use super::*;

const P: i32 = 4;

/// The partition's memory, in maps.
#[derive(Default)]
struct Memo {
    streams: HashMap<String, StreamRecord>,
    answers: Vec<Answered>,
    decided: Vec<(String, Decided)>,
    unservable: HashMap<String, String>,
    broken_store: bool,
    pages: Vec<IndexPage>,
    /// Where the next batch's events land.
    next_offset: i64,
}

impl Lookup for Memo {
    fn stream(&mut self, stream: &str) -> Result<Option<StreamRecord>, LookupError> {
        if self.broken_store {
            return Err(LookupError::Store("disk on fire".into()));
        }
        if let Some(why) = self.unservable.get(stream) {
            return Err(LookupError::Unservable(why.clone()));
        }
        Ok(self.streams.get(stream).cloned())
    }

    fn answer(&mut self, stream: &str, request_id: &str) -> Result<Option<Answered>, LookupError> {
        Ok(self.answers.iter().find(|a| a.result.stream == stream && a.request_id == request_id).cloned())
    }

    fn answer_by_event(
        &mut self,
        stream: &str,
        event_id: &str,
        expected: ExpectedVersion,
    ) -> Result<Option<Answered>, LookupError> {
        Ok(self
            .answers
            .iter()
            .find(|a| {
                a.result.stream == stream
                    && a.first_event_id.as_deref() == Some(event_id)
                    && a.expected_version == expected
            })
            .cloned())
    }

    fn decided(&mut self, stream: &str, txid: &str) -> Result<Option<Decided>, LookupError> {
        Ok(self.decided.iter().find(|(s, d)| s == stream && d.txid == txid).map(|(_, d)| d.clone()))
    }

    fn index_pages(&mut self, stream: &str, from: u64, limit: usize) -> Result<Vec<IndexEntry>, LookupError> {
        let mine: Vec<&IndexPage> = self.pages.iter().filter(|p| p.stream == stream).collect();
        let start = mine.partition_point(|p| p.first_version() <= from).saturating_sub(1);
        let mut out = Vec::new();
        for p in &mine[start..] {
            if out.len() >= limit {
                break;
            }
            out.extend(p.entries.iter().copied());
        }
        Ok(out)
    }
}

struct World {
    schemas: SchemaRegistry,
    aggregates: Registry,
    memory: BTreeMap<i32, Memo>,
    limits: Limits,
    horizon_ms: i64,
    routes: Option<esk_kafka::contexts::Routes>,
}

/// What a batch wrote, decoded.
#[derive(Debug)]
struct Out {
    events: Vec<OutEvent>,
    records: Vec<StreamRecord>,
    replies: Vec<(i32, String, Reply)>,
    memories: Vec<Memory>,
    pages: Vec<IndexPage>,
    dead: Vec<DeadLetter>,
    votes: Vec<ParticipantMessage>,
}

impl World {
    fn new() -> Self {
        let mut schemas = SchemaRegistry::builtin();
        schemas.add("note", "Written", 1, &json!({"type": "object", "required": ["text"]})).unwrap();
        Self {
            schemas,
            aggregates: Registry::builtin(),
            memory: BTreeMap::new(),
            limits: Limits::default(),
            horizon_ms: 3_600_000,
            routes: None,
        }
    }

    fn ctx(&self) -> Context<'_> {
        Context {
            schemas: &self.schemas,
            aggregates: &self.aggregates,
            partitions: P,
            reply_partitions: 2,
            vote_partitions: P,
            unusable: HashMap::new(),
            limits: self.limits,
            horizon_ms: self.horizon_ms,
            context: esk_wire::topics::DEFAULT_CONTEXT,
            routes: self.routes.as_ref(),
        }
    }

    fn memo(&mut self, stream: &str) -> &mut Memo {
        self.memory.entry(partition_for(stream.as_bytes(), P)).or_default()
    }

    /// Runs one batch on the first input's partition, commits it, and returns what was written.
    fn run(&mut self, inputs: Vec<Incoming>) -> Out {
        self.try_run(inputs, |_, _| {}).expect("the batch fits")
    }

    fn try_run(
        &mut self,
        inputs: Vec<Incoming>,
        extra: impl FnOnce(&mut Batch<'_>, &Context<'_>),
    ) -> Result<Out, Oversized> {
        let partition = inputs.first().map_or(0, |i| i.partition);
        let mut memo = self.memory.remove(&partition).unwrap_or_default();
        // Pretend the events land at offsets 100, 101, ... on, batch after batch.
        let first = memo.next_offset.max(100);
        let result = {
            let ctx = self.ctx();
            let mut batch = Batch::new(&mut memo, Utc::now());
            for i in inputs {
                batch.handle(&ctx, i);
            }
            extra(&mut batch, &ctx);
            let events = batch.events.clone();
            let dead = batch.dead_letters.clone();
            let votes = batch.votes.iter().map(|v| v.2.clone()).collect();
            let offsets: Vec<i64> = (0..events.len() as i64).map(|i| first + i).collect();
            batch.finish(&ctx, partition, &offsets).map(|f| (events, f, dead, votes))
        };
        let out = result.map(|(events, f, dead, votes)| Out {
            events,
            records: f.records.into_iter().map(|(r, _)| r).collect(),
            replies: f
                .replies
                .into_iter()
                .map(|(p, id, v)| (p, id, serde_json::from_slice(&v).expect("replies decode")))
                .collect(),
            memories: f.memories.into_iter().map(|(m, _)| m).collect(),
            pages: f.pages.into_iter().map(|(p, _)| p).collect(),
            dead,
            votes,
        });
        if let Ok(out) = &out {
            memo.next_offset = memo.next_offset.max(100) + out.events.len() as i64 + 1;
            memo.pages.extend(out.pages.iter().cloned());
            for r in &out.records {
                memo.streams.insert(r.stream.clone(), r.clone());
            }
            for m in &out.memories {
                match m {
                    Memory::Answer { answer, .. } => memo.answers.push(answer.clone()),
                    Memory::Decision { stream, decided } => memo.decided.push((stream.clone(), decided.clone())),
                }
            }
        }
        self.memory.insert(partition, memo);
        out
    }

    fn version(&mut self, stream: &str) -> u64 {
        self.memo(stream).streams.get(stream).map_or(0, |r| r.version)
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

fn outcome(f: &Out, i: usize) -> &ReplyOutcome {
    &f.replies[i].2.outcome
}

fn appended(f: &Out, i: usize) -> Appended {
    match outcome(f, i) {
        ReplyOutcome::Appended(a) => a.clone(),
        other => panic!("reply {i} is {other:?}"),
    }
}

fn failed(f: &Out, i: usize) -> ReplyError {
    match outcome(f, i) {
        ReplyOutcome::Error(e) => e.clone(),
        other => panic!("reply {i} is {other:?}"),
    }
}

#[test]
fn appends_number_events_and_answer_with_a_position() {
    let mut w = World::new();
    let o = w.run(vec![append(
        "r1",
        "note-1",
        json!("no_stream"),
        json!([{"type": "Written", "data": {"text": "a"}}, {"type": "Written", "data": {"text": "b"}}]),
    )]);
    assert_eq!(o.events.iter().map(|e| e.event.version).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(o.events[0].event.data_schema.as_deref(), Some("urn:esk:schema:note:Written:v1"));
    assert_eq!(o.events[0].event.causation_id.as_deref(), Some("r1"));
    let a = appended(&o, 0);
    assert_eq!((a.first_version, a.last_version), (1, 2));
    let p = partition_for(b"note-1", P);
    assert_eq!(a.position, format!("note:{p}:101"));
    assert_eq!(o.replies[0].0, 1, "answered on the partition the client named");
    let rec = &o.records[0];
    assert_eq!((rec.version, rec.last_offset), (2, 101));
    assert_eq!(rec.index, [IndexEntry { version: 1, offset: 100 }]);
    match &o.memories[0] {
        Memory::Answer { answer, .. } => assert_eq!(answer.result, a, "the remembered answer carries the position"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_wrong_expected_version_writes_nothing_and_names_the_actual_version() {
    let mut w = World::new();
    w.run(vec![append("r1", "note-1", json!("any"), note("a"))]);
    for expected in [json!("no_stream"), json!(0), json!(2)] {
        let o = w.run(vec![append("r2", "note-1", expected, note("b"))]);
        assert!(o.events.is_empty());
        let e = failed(&o, 0);
        assert_eq!((e.code, e.actual_version), (ErrorCode::WrongExpectedVersion, Some(1)));
        assert!(o.records.is_empty() && o.memories.is_empty(), "a refusal is not remembered");
    }
    let o = w.run(vec![append("r3", "note-2", json!("exists"), note("x"))]);
    assert_eq!(failed(&o, 0).actual_version, Some(0));
}

#[test]
fn requests_in_one_batch_see_each_other() {
    let mut w = World::new();
    let o = w.run(vec![
        append("r1", "note-1", json!(0), note("a")),
        append("r2", "note-1", json!(1), note("b")),
        append("r3", "note-1", json!(1), note("lost race")),
    ]);
    assert_eq!(o.events.len(), 2);
    assert_eq!(appended(&o, 1).first_version, 2);
    assert_eq!(failed(&o, 2).actual_version, Some(2));
    assert_eq!(o.records.len(), 1, "one state record per stream per batch");
    assert_eq!(o.records[0].index.len(), 2);
}

#[test]
fn retries_get_the_first_answer_and_write_nothing() {
    let mut w = World::new();
    let first = json!([{"id": "e-1", "type": "Written", "data": {"text": "a"}}]);
    let o1 = w.run(vec![append("r1", "note-1", json!("no_stream"), first.clone())]);
    let original = appended(&o1, 0);
    // Same request id.
    let o2 = w.run(vec![append("r1", "note-1", json!("no_stream"), first.clone())]);
    assert!(o2.events.is_empty() && o2.records.is_empty() && o2.memories.is_empty());
    assert_eq!(appended(&o2, 0), original);
    // Same event ids at the same expected version, new request id.
    let o3 = w.run(vec![append("r9", "note-1", json!("no_stream"), first)]);
    assert!(o3.events.is_empty());
    assert_eq!(appended(&o3, 0), original);
    // Same request id in the same batch as the original.
    let mut w = World::new();
    let o =
        w.run(vec![append("r1", "note-2", json!("any"), note("a")), append("r1", "note-2", json!("any"), note("a"))]);
    assert_eq!(o.events.len(), 1);
    assert_eq!(appended(&o, 1), appended(&o, 0), "the copy in the same batch gets the same answer, position too");
    assert!(!appended(&o, 1).position.is_empty());
    assert_eq!(w.version("note-2"), 1);
}

#[test]
fn a_retry_after_hundreds_of_other_requests_is_still_answered_from_memory() {
    let mut w = World::new();
    let first = appended(&w.run(vec![command("pay-1", "account-3", "OpenAccount", json!({"owner": "a"}))]), 0);
    for i in 0..300 {
        w.run(vec![command(&format!("d{i}"), "account-3", "Deposit", json!({"amount": 1}))]);
    }
    let again = w.run(vec![command("pay-1", "account-3", "OpenAccount", json!({"owner": "a"}))]);
    assert!(again.events.is_empty());
    assert_eq!(appended(&again, 0), first);
    assert_eq!(w.version("account-3"), 301);
}

#[test]
fn a_request_id_reused_for_another_request_is_refused() {
    let mut w = World::new();
    w.run(vec![command("r1", "account-4", "OpenAccount", json!({"owner": "a"}))]);
    let o = w.run(vec![command("r1", "account-4", "Deposit", json!({"amount": 5}))]);
    assert!(o.events.is_empty());
    let e = failed(&o, 0);
    assert_eq!(e.code, ErrorCode::InvalidInput);
    assert!(e.message.contains("already used for another request"), "{}", e.message);
}

fn with(mut i: Incoming, f: impl FnOnce(&mut Value)) -> Incoming {
    let mut v: Value = serde_json::from_slice(i.payload.as_deref().unwrap()).unwrap();
    f(&mut v);
    i.payload = Some(serde_json::to_vec(&v).unwrap());
    i
}

#[test]
fn a_request_older_than_the_horizon_that_is_not_remembered_is_refused() {
    let mut w = World::new();
    let old = Utc::now().timestamp_millis() - w.horizon_ms - 1000;
    let o = w.run(vec![with(append("r1", "note-1", json!("any"), note("a")), |v| v["sent_ms"] = json!(old))]);
    assert!(o.events.is_empty());
    let e = failed(&o, 0);
    assert_eq!(e.code, ErrorCode::RequestExpired);
    assert!(e.message.contains("idempotency horizon"), "{}", e.message);
    // The time in a UUIDv7 request id counts when the request does not say.
    let ts = uuid::Timestamp::from_unix(uuid::NoContext, (old / 1000) as u64, 0);
    let v7 = uuid::Uuid::new_v7(ts).to_string();
    let o = w.run(vec![append(&v7, "note-1", json!("any"), note("a"))]);
    assert_eq!(failed(&o, 0).code, ErrorCode::RequestExpired);
    // Remembered, an old retry is still answered.
    let fresh = w.run(vec![append("r2", "note-1", json!("any"), note("a"))]);
    let again = w.run(vec![with(append("r2", "note-1", json!("any"), note("a")), |v| v["sent_ms"] = json!(old))]);
    assert_eq!(appended(&again, 0), appended(&fresh, 0));
}

#[test]
fn replies_echo_the_attempt() {
    let mut w = World::new();
    let o = w.run(vec![with(append("r1", "note-1", json!("any"), note("a")), |v| v["attempt"] = json!("a-1"))]);
    assert_eq!(o.replies[0].2.attempt.as_deref(), Some("a-1"));
    let o = w.run(vec![with(append("r1", "note-1", json!("any"), note("a")), |v| v["attempt"] = json!("a-2"))]);
    assert_eq!(o.replies[0].2.attempt.as_deref(), Some("a-2"), "a retry's answer names the retry");
}

#[test]
fn ids_and_names_over_their_limits_are_refused_and_never_copied_whole() {
    let mut w = World::new();
    let huge = "x".repeat(450_000);
    // With an attempt the client can be answered under a cut id.
    let o = w.run(vec![with(append(&huge, "note-1", json!("any"), note("a")), |v| v["attempt"] = json!("a-1"))]);
    assert!(o.events.is_empty() && o.dead.is_empty());
    assert!(o.replies[0].1.len() < 100, "the reply's key is cut");
    assert!(failed(&o, 0).message.contains("1 to 128"));
    // Without one it is parked.
    let o = w.run(vec![append(&huge, "note-1", json!("any"), note("a"))]);
    assert!(o.replies.is_empty());
    assert_eq!(o.dead.len(), 1);
    let o = w.run(vec![with(append("r", "note-1", json!("any"), note("a")), |v| v["correlation_id"] = json!(huge))]);
    assert!(o.events.is_empty());
    assert!(failed(&o, 0).message.contains("correlation id"));
}

#[test]
fn a_state_that_would_outgrow_the_record_limit_fails_the_batch() {
    let mut w = World::new();
    w.limits = Limits::for_broker(20_000);
    w.run(vec![command("r0", "account-5", "OpenAccount", json!({"owner": "o".repeat(100)}))]);
    w.run(vec![command("r1", "account-5", "Deposit", json!({"amount": 1000}))]);
    // Every hold grows the state: at some point the record would not fit.
    let mut err = None;
    for i in 0..100 {
        match w.try_run(vec![prepare(&format!("t{i}"), "account-5", "Withdraw", 1)], |_, _| {}) {
            Ok(_) => {}
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let err = err.expect("the state outgrew the limit");
    assert!(err.0.contains("over the limit"), "{}", err.0);
    let version = w.version("account-5");
    assert!(version > 2, "the holds that fitted were written");
    // Refused alone, the request gets the reason.
    let mut w2 = World::new();
    let o = w2
        .try_run(vec![], |b, ctx| {
            b.refuse(ctx, command("r1", "account-5", "OpenAccount", json!({"owner": "x"})), &err.0);
        })
        .unwrap();
    assert!(failed(&o, 0).message.contains("over the limit"));
}

#[test]
fn a_stream_that_cannot_be_served_is_answered_with_the_reason() {
    let mut w = World::new();
    w.memo("account-8").unservable.insert("account-8".into(), "its state record was refused".into());
    let o = w.run(vec![command("r1", "account-8", "Deposit", json!({"amount": 1}))]);
    let e = failed(&o, 0);
    assert_eq!(e.code, ErrorCode::Unavailable);
    assert!(e.message.contains("refused"));
    w.memo("account-8").broken_store = true;
    let partition = partition_for(b"account-8", P);
    let mut memo = w.memory.remove(&partition).unwrap();
    let ctx = w.ctx();
    let mut batch = Batch::new(&mut memo, Utc::now());
    batch.handle(&ctx, command("r2", "account-8", "Deposit", json!({"amount": 1})));
    assert!(batch.store_failure.is_some(), "a store failure fails the whole batch");
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
                json!([{"type": "Written", "data": {"text": "x".repeat(limits::MAX_EVENT_DATA_BYTES)}}]),
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
        (command("j", "account-1", "OpenAccount", json!({"owner": 5})), "OpenAccount"),
    ];
    for (input, wanted) in cases {
        let o = w.run(vec![input]);
        assert!(o.events.is_empty() && o.dead.is_empty(), "{wanted}");
        let e = failed(&o, 0);
        assert_eq!(e.code, ErrorCode::InvalidInput, "{wanted}: {e:?}");
        assert!(e.message.contains(wanted), "wanted '{wanted}' in '{}'", e.message);
    }
}

#[test]
fn streams_must_arrive_on_their_own_partition_under_their_own_key() {
    let mut w = World::new();
    let mut wrong = append("r", "note-1", json!("any"), note("a"));
    wrong.partition = (wrong.partition + 1) % P;
    let o = w.run(vec![wrong]);
    assert!(o.events.is_empty());
    assert!(failed(&o, 0).message.contains("belongs to partition"));
    let mut rekeyed = append("r", "note-1", json!("any"), note("a"));
    rekeyed.key = Some(b"other".to_vec());
    let o = w.run(vec![rekeyed]);
    assert!(failed(&o, 0).message.contains("key"));
    let o = w.run(vec![append("r", "nocategory", json!("any"), note("a"))]);
    assert!(failed(&o, 0).message.contains("no category"));
}

#[test]
fn a_stream_of_a_category_another_context_claimed_is_not_written_here() {
    let mut w = World::new();
    let mut map = esk_wire::contexts::ContextMap::default();
    let claim = json!({"context": "payments", "at_ms": 1, "by": "test"}).to_string();
    map.apply(Some(b"account"), Some(claim.as_bytes())).unwrap();
    w.routes = Some(esk_kafka::contexts::Routes::fixed(map));
    let o = w.run(vec![
        command("1", "account-1", "OpenAccount", json!({"owner": "a"})),
        append("2", "note-1", json!("no_stream"), note("a")),
    ]);
    assert_eq!(o.events.len(), 1, "only the unclaimed category's event");
    let refused = failed(&o, 0);
    assert_eq!(refused.code, ErrorCode::Unavailable, "not final: sent again, it reaches its context");
    assert!(refused.message.contains("belongs to context 'payments'"), "{}", refused.message);
    appended(&o, 1);
    // A prepare for it is voted down, and its decision is parked.
    let o = w.run(vec![prepare("t1", "account-1", "Withdraw", 8)]);
    assert!(o.events.is_empty());
    assert_eq!(o.votes.len(), 1);
    let (yes, why) = vote(&o.votes[0]);
    assert!(!yes && why.unwrap().contains("belongs to context 'payments'"));
    let o = w.run(vec![decide("t1", "account-1", "commit")]);
    assert!(o.events.is_empty());
    assert_eq!(o.dead.len(), 1);
}

#[test]
fn undecodable_records_are_parked_or_answered() {
    let mut w = World::new();
    let mut garbage = append("r", "note-1", json!("any"), note("a"));
    garbage.payload = Some(b"\xff\x00not json".to_vec());
    let o = w.run(vec![garbage]);
    assert!(o.replies.is_empty());
    assert!(o.dead[0].reason.contains("not valid"), "{}", o.dead[0].reason);
    // Enough to answer: the client gets the reason instead.
    let half = incoming(Source::Commands, "note-1", json!({"request_id": "r", "reply_partition": 1, "kind": "append"}));
    let o = w.run(vec![half]);
    assert!(o.dead.is_empty());
    assert!(failed(&o, 0).message.contains("stream"));
    // A reply partition that does not exist cannot be answered.
    let lost = incoming(
        Source::Commands,
        "note-1",
        json!({"request_id": "r", "reply_partition": 9, "stream": "note-1", "kind": "head"}),
    );
    let o = w.run(vec![lost]);
    assert!(o.dead[0].reason.contains("reply_partition 9"));
    // Over the request limit: refused before it is even parsed.
    let mut big = append("r", "note-1", json!("any"), note("a"));
    big.payload = Some(vec![b' '; 1_000_000]);
    let o = w.run(vec![big]);
    assert!(o.dead[0].reason.contains("the limit is"), "{}", o.dead[0].reason);
}

#[test]
fn commands_go_through_the_aggregate() {
    let mut w = World::new();
    let o = w.run(vec![
        command("1", "account-7", "OpenAccount", json!({"owner": "ann"})),
        command("2", "account-7", "Deposit", json!({"amount": 10})),
        command("3", "account-7", "Withdraw", json!({"amount": 11})),
        command("4", "account-7", "Withdraw", json!({"amount": 4})),
    ]);
    assert_eq!(o.events.len(), 3);
    let refused = failed(&o, 2);
    assert_eq!(refused.code, ErrorCode::DomainRefused);
    assert!(refused.message.contains("insufficient funds"));
    assert_eq!(appended(&o, 3).last_version, 3);
    assert_eq!(o.records[0].state.as_ref().unwrap()["balance"], 6);
    // Every event the aggregate made carries the schema that validated it.
    assert!(o.events.iter().all(|e| e.event.data_schema.is_some()));
}

fn prepare(txid: &str, stream: &str, ty: &str, amount: i64) -> Incoming {
    incoming(
        Source::Prepare,
        stream,
        json!({"txid": txid, "stream": stream, "command": {"type": ty, "data": {"amount": amount}}, "deadline_ms": 1234}),
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
    let o = w.run(vec![prepare("t1", "account-1", "Withdraw", 8)]);
    assert_eq!(o.events[0].event.event_type, "HoldPlaced");
    assert_eq!(vote(&o.votes[0]), (true, None));
    assert_eq!(o.records[0].holds, [OpenHold { txid: "t1".into(), deadline_ms: 1234 }], "the hold and its deadline");
    // The hold counts against a second transaction and a direct withdrawal.
    let o = w.run(vec![prepare("t2", "account-1", "Withdraw", 5)]);
    assert!(o.events.is_empty());
    assert!(vote(&o.votes[0]).1.unwrap().contains("available 2"));
    let o = w.run(vec![command("3", "account-1", "Withdraw", json!({"amount": 3}))]);
    assert_eq!(failed(&o, 0).code, ErrorCode::DomainRefused);
    // A duplicate prepare votes yes again and places no second hold.
    let o = w.run(vec![prepare("t1", "account-1", "Withdraw", 8)]);
    assert!(o.events.is_empty());
    assert!(vote(&o.votes[0]).0);
    // Commit applies and releases; a duplicate commit only acknowledges.
    let o = w.run(vec![decide("t1", "account-1", "commit")]);
    let types: Vec<_> = o.events.iter().map(|e| e.event.event_type.as_str()).collect();
    assert_eq!(types, ["Withdrawn", "HoldReleased"]);
    assert!(matches!(&o.votes[0], ParticipantMessage::Ack(a) if a.decision == Verdict::Commit));
    assert_eq!(o.records[0].state.as_ref().unwrap()["balance"], 2);
    assert!(o.records[0].holds.is_empty());
    assert!(matches!(&o.memories[0], Memory::Decision { decided, .. } if decided.txid == "t1"));
    let o = w.run(vec![decide("t1", "account-1", "commit")]);
    assert!(o.events.is_empty());
    assert!(matches!(&o.votes[0], ParticipantMessage::Ack(_)));
    // A late duplicate prepare after the decision places no new hold.
    let o = w.run(vec![prepare("t1", "account-1", "Withdraw", 8)]);
    assert!(o.events.is_empty());
    // Asking about a hold sends the vote again.
    let o = w.try_run(vec![], |b, ctx| b.ask(ctx, "t7", "account-1")).unwrap();
    assert_eq!(vote(&o.votes[0]), (true, None));
}

#[test]
fn abort_releases_and_is_remembered() {
    let mut w = World::new();
    w.run(vec![
        command("1", "account-1", "OpenAccount", json!({"owner": "a"})),
        command("2", "account-1", "Deposit", json!({"amount": 10})),
    ]);
    w.run(vec![prepare("t1", "account-1", "Withdraw", 10)]);
    let o = w.run(vec![decide("t1", "account-1", "abort")]);
    assert_eq!(o.events[0].event.event_type, "HoldReleased");
    assert_eq!(o.records[0].state.as_ref().unwrap()["balance"], 10);
    // Abort before any prepare (the prepare was lost or late): remembered, so the
    // late prepare votes no and holds nothing.
    let o = w.run(vec![decide("t9", "account-1", "abort")]);
    assert!(o.events.is_empty());
    assert!(matches!(&o.votes[0], ParticipantMessage::Ack(_)));
    let o = w.run(vec![prepare("t9", "account-1", "Withdraw", 1)]);
    assert!(o.events.is_empty());
    assert!(!vote(&o.votes[0]).0);
    // Prepares for categories without an aggregate, or on closed accounts, vote no.
    let o = w.run(vec![prepare("t3", "note-1", "Withdraw", 1)]);
    assert!(vote(&o.votes[0]).1.unwrap().contains("no aggregate"));
    let o = w.run(vec![prepare("t4", "account-404", "Deposit", 1)]);
    assert!(vote(&o.votes[0]).1.unwrap().contains("not open"));
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
    let o = w.run(vec![append("2", "note-1", json!("any"), note("b")), head]);
    match outcome(&o, 1) {
        ReplyOutcome::Head(h) => {
            assert_eq!(h.version, 2);
            assert_eq!(h.index.len(), 2);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_index_that_fills_a_page_moves_it_out_and_heads_page_from_a_version() {
    let mut w = World::new();
    let head = |from: u64| {
        incoming(
            Source::Commands,
            "note-1",
            json!({"request_id": format!("h{from}"), "reply_partition": 0, "stream": "note-1", "kind": "head", "from": from}),
        )
    };
    let mut pages = Vec::new();
    for i in 0..(3 * INDEX_PAGE_ENTRIES + 5) {
        let o = w.run(vec![append(&format!("a{i}"), "note-1", json!("any"), note("x"))]);
        pages.extend(o.pages);
        let rec = &o.records[0];
        assert!(rec.index.len() <= INDEX_PAGE_ENTRIES, "{} inline entries", rec.index.len());
        assert_eq!(rec.pages, pages.len() as u64);
    }
    assert_eq!(pages.len(), 3);
    assert!(pages.iter().all(|p| p.entries.len() == INDEX_PAGE_ENTRIES && p.v == 1));
    assert_eq!(pages[1].first_version(), INDEX_PAGE_ENTRIES as u64 + 1);
    let all: Vec<u64> = (1..=3 * INDEX_PAGE_ENTRIES as u64 + 5).collect();
    for from in [0, 1, 2, 33, 40, 96, 97, 100, 101] {
        let o = w.run(vec![head(from)]);
        match outcome(&o, 0) {
            ReplyOutcome::Head(h) => {
                let versions: Vec<u64> = h.index.iter().map(|e| e.version).collect();
                let want: Vec<u64> = all.iter().copied().filter(|v| *v >= from.max(1)).collect();
                assert_eq!(versions, want, "from {from}");
                assert!(!h.more);
                assert!(h.index.windows(2).all(|w| w[0].offset < w[1].offset));
            }
            other => panic!("{other:?}"),
        }
    }
    // A head in the batch that fills a page sees it.
    let fill = INDEX_PAGE_ENTRIES - 4;
    let mut batch: Vec<Incoming> =
        (0..fill).map(|i| append(&format!("b{i}"), "note-1", json!("any"), note("y"))).collect();
    batch.push(head(1));
    let o = w.run(batch);
    assert_eq!(o.pages.len(), 1);
    match outcome(&o, fill) {
        ReplyOutcome::Head(h) => {
            let versions: Vec<u64> = h.index.iter().map(|e| e.version).collect();
            assert_eq!(versions, (1..=(4 * INDEX_PAGE_ENTRIES + 1) as u64).collect::<Vec<_>>());
        }
        other => panic!("{other:?}"),
    }
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

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
        prop_oneof![
            Just("account-1"),
            Just("note-1"),
            Just("any"),
            Just("no_stream"),
            Just("append"),
            Just("command"),
            Just("head"),
            Just("t1"),
            Just("commit"),
            Just("abort"),
            Just("Deposit"),
            Just("OpenAccount"),
            Just("Written")
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("request_id".to_owned()),
                    Just("reply_partition".to_owned()),
                    Just("stream".to_owned()),
                    Just("kind".to_owned()),
                    Just("events".to_owned()),
                    Just("type".to_owned()),
                    Just("data".to_owned()),
                    Just("txid".to_owned()),
                    Just("command".to_owned()),
                    Just("decision".to_owned()),
                    Just("expected_version".to_owned()),
                    Just("amount".to_owned()),
                    Just("attempt".to_owned()),
                    Just("sent_ms".to_owned()),
                    Just("id".to_owned()),
                    "[a-z_]{1,8}",
                ],
                inner,
                0..6,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// No record on any input topic makes the writer panic, and whatever it
    /// answers fits the limits.
    #[test]
    fn arbitrary_records_never_panic(
        inputs in prop::collection::vec(
            (0usize..3, prop_oneof![Just("account-1".to_owned()), Just("note-1".to_owned()), "\\PC{0,12}"],
             prop_oneof![
                 prop::collection::vec(any::<u8>(), 0..64).prop_map(Some),
                 arb_json().prop_map(|v| Some(serde_json::to_vec(&v).unwrap())),
                 Just(None),
             ]),
            1..8),
    ) {
        let mut w = World::new();
        w.run(vec![command("o", "account-1", "OpenAccount", json!({"owner": "a"}))]);
        let records: Vec<Incoming> = inputs
            .into_iter()
            .enumerate()
            .map(|(i, (source, key, payload))| Incoming {
                input: source,
                topic: format!("t{source}"),
                partition: partition_for(b"account-1", P),
                offset: i as i64,
                key: Some(key.into_bytes()),
                payload,
                headers: Vec::new(),
            })
            .collect();
        if let Ok(o) = w.try_run(records, |_, _| {}) {
            for (_, id, reply) in &o.replies {
                prop_assert!(id.len() <= limits::MAX_REQUEST_ID_BYTES);
                prop_assert!(serde_json::to_vec(reply).unwrap().len() < 8 * 1024);
            }
        }
    }
}
