//! The protocol's test vectors (`docs/protocol/vectors.json`, described in
//! `docs/PROTOCOL.md`), checked byte for byte: each message as this client
//! encodes it, each decoded and encoded again unchanged, and the partition
//! of each key. `ESK_WRITE_PROTOCOL_VECTORS=1` writes the file from the code
//! (after a deliberate change of the protocol; review the diff).

use esk_wire::contexts::Claim;
use esk_wire::partition::partition_for;
use esk_wire::protocol::{
    Appended, CommandData, ErrorCode, ExpectedVersion, IndexEntry, NewEvent, Participant, Reply, ReplyError,
    ReplyOutcome, Request, RequestBody, StreamHead, TxRequest, TxState, TxStatus,
};
use serde_json::{Value, json};

fn path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/protocol/vectors.json")
}

const REQUEST_ID: &str = "01938a7e-1f2a-7cc3-9d4e-5b6a7c8d9e0f";
const ATTEMPT: &str = "9f1c2b3a4d5e6f708192a3b4c5d6e7f8";

fn request(stream: &str, body: RequestBody) -> Request {
    Request {
        request_id: REQUEST_ID.into(),
        reply_partition: 3,
        stream: stream.into(),
        body,
        correlation_id: None,
        causation_id: None,
        attempt: Some(ATTEMPT.into()),
        sent_ms: None,
    }
}

fn reply(outcome: ReplyOutcome) -> Reply {
    Reply { request_id: REQUEST_ID.into(), attempt: Some(ATTEMPT.into()), outcome }
}

fn encode<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("a message encodes")
}

/// One vector: its name, topic, key, kind and value as esk encodes it.
struct Message {
    name: &'static str,
    topic: &'static str,
    key: &'static str,
    kind: &'static str,
    value: String,
}

fn messages() -> Vec<Message> {
    let m = |name, topic, key, kind, value| Message { name, topic, key, kind, value };
    let commands = "<prefix>.<context>.commands";
    let replies = "<prefix>.replies";
    let append = request(
        "account-42",
        RequestBody::Append {
            expected_version: ExpectedVersion::NoStream,
            events: vec![NewEvent {
                id: Some("0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into()),
                event_type: "Noted".into(),
                data: json!({"text": "hello"}),
            }],
        },
    );
    let command = request(
        "account-42",
        RequestBody::Command {
            expected_version: ExpectedVersion::Exact(3),
            command: CommandData { command_type: "Deposit".into(), data: json!({"amount": 100}) },
        },
    );
    let mut own_id = request(
        "order-7",
        RequestBody::Command {
            expected_version: ExpectedVersion::Any,
            command: CommandData { command_type: "Confirm".into(), data: json!({}) },
        },
    );
    own_id.request_id = "pm:checkout:7:confirm".into();
    own_id.sent_ms = Some(1_796_000_000_000);
    own_id.correlation_id = Some("checkout-7".into());
    let head = request("account-42", RequestBody::Head { from: 1 });
    let appended = reply(ReplyOutcome::Appended(Appended {
        stream: "account-42".into(),
        first_version: 4,
        last_version: 4,
        position: "account:6:1187".into(),
    }));
    let wrong = reply(ReplyOutcome::Error(ReplyError {
        code: ErrorCode::WrongExpectedVersion,
        message: "account-42 is at version 4, not 3".into(),
        actual_version: Some(4),
    }));
    let refused = reply(ReplyOutcome::Error(ReplyError {
        code: ErrorCode::DomainRefused,
        message: "insufficient funds: balance 10, requested 25".into(),
        actual_version: None,
    }));
    let head_reply = reply(ReplyOutcome::Head(StreamHead {
        stream: "account-42".into(),
        version: 4,
        partition: 6,
        index: vec![IndexEntry { version: 1, offset: 1100 }, IndexEntry { version: 4, offset: 1187 }],
        more: false,
    }));
    let leg = |stream: &str, ty: &str, data: Value| Participant {
        stream: stream.into(),
        command: CommandData { command_type: ty.into(), data },
    };
    let begin = TxRequest::Begin {
        txid: "buy-1".into(),
        participants: vec![
            leg("account-ann", "Withdraw", json!({"amount": 700})),
            leg("inventory-tea", "Reserve", json!({"quantity": 2})),
        ],
        timeout_ms: 10_000,
        reply_partition: 3,
        attempt: Some(ATTEMPT.into()),
        sent_ms: Some(1_796_000_000_000),
    };
    let status = TxRequest::Status { txid: "buy-1".into(), reply_partition: 3, attempt: None };
    let tx_reply = Reply {
        request_id: "buy-1".into(),
        attempt: Some(ATTEMPT.into()),
        outcome: ReplyOutcome::Tx(TxStatus {
            txid: "buy-1".into(),
            state: TxState::Committed,
            outcome: "committed".into(),
            reason: None,
            participants: Vec::new(),
        }),
    };
    let claim = Claim { context: "payments".into(), at_ms: 1_796_000_000_000, by: "esk-writer (pid 4242)".into() };
    vec![
        m("append", commands, "account-42", "request", encode(&append)),
        m("command", commands, "account-42", "request", encode(&command)),
        m("command under a request id of its own", commands, "order-7", "request", encode(&own_id)),
        m("head", commands, "account-42", "request", encode(&head)),
        m("appended", replies, REQUEST_ID, "reply", encode(&appended)),
        m("wrong expected version", replies, REQUEST_ID, "reply", encode(&wrong)),
        m("refused", replies, REQUEST_ID, "reply", encode(&refused)),
        m("head reply", replies, REQUEST_ID, "reply", encode(&head_reply)),
        m("transaction", "<prefix>.tx.requests", "buy-1", "tx_request", encode(&begin)),
        m("transaction status", "<prefix>.tx.requests", "buy-1", "tx_request", encode(&status)),
        m("transaction reply", replies, "buy-1", "reply", encode(&tx_reply)),
        m("claim", "<prefix>.contexts", "account", "claim", encode(&claim)),
    ]
}

/// Decodes a message of `kind` and encodes it again.
fn round_trip(kind: &str, value: &str) -> String {
    fn again<T: serde::de::DeserializeOwned + serde::Serialize>(value: &str) -> String {
        let decoded: T = serde_json::from_str(value).unwrap_or_else(|e| panic!("{value}: {e}"));
        encode(&decoded)
    }
    match kind {
        "request" => again::<Request>(value),
        "reply" => again::<Reply>(value),
        "tx_request" => again::<TxRequest>(value),
        "claim" => again::<Claim>(value),
        other => panic!("no message kind {other}"),
    }
}

fn keys() -> Vec<(&'static str, i32)> {
    vec![("account-42", 12), ("account-42", 3), ("order-7", 12), ("inventory-tea", 12), ("buy-1", 12), ("21", 1000)]
}

fn document() -> Value {
    let messages: Vec<Value> = messages()
        .into_iter()
        .map(|m| json!({"name": m.name, "topic": m.topic, "key": m.key, "kind": m.kind, "value": m.value}))
        .collect();
    let partitions: Vec<Value> = keys()
        .into_iter()
        .map(|(key, n)| json!({"key": key, "partitions": n, "partition": partition_for(key.as_bytes(), n)}))
        .collect();
    json!({
        "about": "esk's Kafka protocol by example (docs/PROTOCOL.md): each value is the exact UTF-8 JSON of a record's value; each partition is Kafka's Java partitioner's (murmur2) for the key",
        "messages": messages,
        "partitions": partitions,
    })
}

#[test]
fn the_protocol_s_vectors_are_what_esk_writes_and_reads_byte_for_byte() {
    let file = path();
    let want = document();
    if std::env::var_os("ESK_WRITE_PROTOCOL_VECTORS").is_some() {
        std::fs::write(&file, serde_json::to_string_pretty(&want).unwrap() + "\n").unwrap();
    }
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let got: Value = serde_json::from_str(&text).unwrap();
    let (got_m, want_m) = (got["messages"].as_array().unwrap(), want["messages"].as_array().unwrap());
    assert_eq!(got_m.len(), want_m.len(), "one vector per message");
    for (m, w) in got_m.iter().zip(want_m) {
        let (name, value) = (m["name"].as_str().unwrap(), m["value"].as_str().unwrap());
        assert_eq!(value, w["value"].as_str().unwrap(), "{name}: esk encodes it otherwise");
        assert_eq!(round_trip(m["kind"].as_str().unwrap(), value), value, "{name}: decoded and encoded again");
        assert_eq!((&m["topic"], &m["key"]), (&w["topic"], &w["key"]), "{name}");
    }
    for p in got["partitions"].as_array().unwrap() {
        let (key, n) = (p["key"].as_str().unwrap(), p["partitions"].as_i64().unwrap() as i32);
        assert_eq!(i64::from(partition_for(key.as_bytes(), n)), p["partition"].as_i64().unwrap(), "{key} of {n}");
    }
    assert_eq!(got["partitions"], want["partitions"]);
}
