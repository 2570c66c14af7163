//! The guarantees of README's "Guarantees" against a real broker: retries
//! within the idempotency horizon however busy the stream and across
//! takeovers, transactions retried by txid, replies to the attempt, records
//! over every limit and forged records (stream records, index pages,
//! positions, transactions) on internal topics, late prepares.

use std::time::{Duration, Instant};

use esk_client::ClientError;
use esk_tests::{Service, TestEnv, poll_until, wait_serving};
use esk_wire::partition::partition_for;
use esk_wire::protocol::{CommandData, ExpectedVersion, Participant, RequestBody, StreamRecord};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

const SESSION: &str = "6000";

fn writer(env: &TestEnv, standby: bool) -> Service {
    let standby = if standby { "true" } else { "false" };
    Service::start(env, "writer", &[("ESK_WRITER_SESSION_TIMEOUT_MS", SESSION), ("ESK_WRITER_STANDBY", standby)])
}

fn coordinator(env: &TestEnv) -> Service {
    Service::start(
        env,
        "coordinator",
        &[("ESK_COORDINATOR_SESSION_TIMEOUT_MS", SESSION), ("ESK_COORDINATOR_RESEND_MS", "1000")],
    )
}

async fn coordinating(c: &Service, partitions: u64) {
    poll_until(Duration::from_secs(60), "the coordinator to own every partition", || async {
        c.get_json("/health").filter(|h| h["partitions_owned"] == partitions).map(|_| ())
    })
    .await;
}

/// A writer and a coordinator serving every partition, and `accounts` opened
/// with `deposit` in each.
async fn platform(
    env: &TestEnv,
    partitions: u32,
    accounts: &[&str],
    deposit: i64,
) -> (Service, Service, esk_client::Client) {
    env.init_topics(partitions);
    let w = writer(env, true);
    let c = coordinator(env);
    wait_serving(&[&w], u64::from(partitions), Duration::from_secs(60)).await;
    coordinating(&c, u64::from(partitions)).await;
    let client = env.client(Duration::from_secs(30), true);
    for s in accounts {
        client.command(s, ExpectedVersion::NoStream, cmd("OpenAccount", json!({"owner": "o"})), None).await.unwrap();
        client.command(s, ExpectedVersion::Any, cmd("Deposit", json!({"amount": deposit})), None).await.unwrap();
    }
    (w, c, client)
}

fn cmd(ty: &str, data: Value) -> CommandData {
    CommandData { command_type: ty.into(), data }
}

fn transfer(from: &str, to: &str, amount: i64) -> Vec<Participant> {
    vec![
        Participant { stream: from.into(), command: cmd("Withdraw", json!({"amount": amount})) },
        Participant { stream: to.into(), command: cmd("Deposit", json!({"amount": amount})) },
    ]
}

/// A producer that sends records up to the broker's limit (librdkafka's own
/// default stops at 1,000,000 bytes).
fn raw_producer(env: &TestEnv) -> FutureProducer {
    env.kafka().producer(esk_kafka::Sending::Foreign { max_message_bytes: 2_000_000 }).create().unwrap()
}

async fn produce(p: &FutureProducer, topic: &str, partition: i32, key: &str, value: &[u8]) {
    p.send(FutureRecord::to(topic).partition(partition).key(key).payload(value), Duration::from_secs(15))
        .await
        .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
}

fn metric(service: &Service, name: &str) -> f64 {
    let text = service.get("/metrics").map(|r| r.1).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn count(env: &TestEnv, category: &str, stream: &str) -> usize {
    env.all_events(category).iter().filter(|(_, _, e)| e.stream.as_str() == stream).count()
}

/// The command with a request id, through the CLI: its JSON answer.
fn deposit(env: &TestEnv, stream: &str, request_id: &str, amount: i64) -> Value {
    let data = json!({"amount": amount}).to_string();
    env.esk().args(["command", stream, "Deposit", &data, "--request-id", request_id, "--json"]).run().ok().json()
}

async fn retried_after_a_hundred_others_and_a_takeover(standby: bool) {
    let env = TestEnv::new();
    env.init_topics(2);
    let a = writer(&env, standby);
    wait_serving(&[&a], 2, Duration::from_secs(60)).await;
    let client = env.client(Duration::from_secs(30), true);
    client
        .command("account-r", ExpectedVersion::NoStream, cmd("OpenAccount", json!({"owner": "r"})), None)
        .await
        .unwrap();
    let first = deposit(&env, "account-r", "pay-1", 5);
    // A hundred other commands on the same stream (16 were remembered before).
    let sent: Vec<_> = (0..100)
        .map(|i| {
            let body = RequestBody::Command {
                expected_version: ExpectedVersion::Any,
                command: cmd("Deposit", json!({"amount": 1})),
            };
            client.submit("account-r", body, Some(format!("other-{i}"))).unwrap()
        })
        .collect();
    for s in sent {
        s.reply().await.unwrap();
    }
    assert_eq!(deposit(&env, "account-r", "pay-1", 5), first, "the retry gets the first answer");
    assert_eq!(count(&env, "account", "account-r"), 102);
    // A second writer takes over from the first, killed.
    let b = writer(&env, standby);
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.kill();
    wait_serving(&[&b], 2, Duration::from_secs(60)).await;
    assert_eq!(deposit(&env, "account-r", "pay-1", 5), first, "after the takeover too");
    assert_eq!(count(&env, "account", "account-r"), 102, "and nothing was written twice");
    assert!(metric(&b, "esk_writer_retries_answered_total") >= 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_retried_after_a_hundred_others_and_a_takeover_with_standby_writes_once() {
    retried_after_a_hundred_others_and_a_takeover(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_retried_after_a_hundred_others_and_a_takeover_without_standby_writes_once() {
    retried_after_a_hundred_others_and_a_takeover(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn esk_produce_twice_on_one_file_with_ids_writes_nothing_the_second_time() {
    let env = TestEnv::new();
    env.init_topics(2);
    let w = writer(&env, true);
    wait_serving(&[&w], 2, Duration::from_secs(60)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lines.jsonl");
    let lines: Vec<String> = (0..60)
        .map(|i| {
            json!({"stream": format!("note-{}", i % 2), "type": "Written", "data": {"n": i},
                   "id": uuid::Uuid::new_v4().to_string()})
            .to_string()
        })
        .collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let path = file.to_str().unwrap();
    let once = env.esk().args(["produce", "--file", path, "--json"]).run().ok().json();
    assert_eq!(once["appended"], 60);
    let twice = env.esk().args(["produce", "--file", path, "--json"]).run().ok().json();
    assert_eq!(twice["failed"], 0, "{twice}");
    let log = crate::writer::checked_log(&env, "note");
    assert_eq!(log["note-0"].len() + log["note-1"].len(), 60, "30 lines a stream, each written once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transfer_retried_after_a_hundred_others_and_a_coordinator_kill_runs_once() {
    let env = TestEnv::new();
    let (_w, c, client) = platform(&env, 2, &["account-ta", "account-tb"], 1000).await;
    let run = |txid: &str| {
        env.esk().args(["tx", "transfer", "account-ta", "account-tb", "10", "--txid", txid, "--json"]).run().ok().json()
    };
    assert_eq!(run("pay-t1")["outcome"], "committed");
    let timeout = Duration::from_secs(20);
    let others = futures::future::join_all((0..100).map(|i| {
        let client = &client;
        async move { client.transact(&format!("other-{i}"), transfer("account-tb", "account-ta", 1), timeout).await }
    }))
    .await;
    assert!(others.iter().all(|r| r.as_ref().is_ok_and(|s| s.outcome == "committed")), "{others:?}");
    let withdrawals = |env: &TestEnv| {
        env.all_events("account")
            .into_iter()
            .filter(|(_, _, e)| e.event_type == "Withdrawn" && e.data["txid"] == "pay-t1")
            .count()
    };
    assert_eq!(run("pay-t1")["outcome"], "committed", "a retry gets its outcome");
    c.kill();
    let c2 = coordinator(&env);
    coordinating(&c2, 2).await;
    assert_eq!(run("pay-t1")["outcome"], "committed", "after a coordinator's kill too");
    let status = env.esk().args(["tx", "status", "pay-t1", "--json"]).run().ok().json();
    assert_eq!(status["outcome"], "committed", "{status}");
    assert_eq!(withdrawals(&env), 1, "it ran once");
    let unknown = env.esk().args(["tx", "status", "never-was", "--json"]).run().ok().json();
    assert_eq!(unknown["state"], "unknown");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_belongs_to_its_attempt() {
    let env = TestEnv::new();
    env.init_topics(1);
    let w = writer(&env, true);
    wait_serving(&[&w], 1, Duration::from_secs(60)).await;
    let client = env.client(Duration::from_secs(30), true);
    let append = |expected| RequestBody::Append {
        expected_version: expected,
        events: vec![esk_wire::protocol::NewEvent { id: None, event_type: "Written".into(), data: json!({}) }],
    };
    // Two attempts of one request id in flight: the first is refused, the
    // second (a retry that fixed its expectation) succeeds. Each gets its own answer.
    let first = client.submit("note-att", append(ExpectedVersion::Exact(5)), Some("req-att".into())).unwrap();
    let second = client.submit("note-att", append(ExpectedVersion::NoStream), Some("req-att".into())).unwrap();
    let (first, second) = (first.reply().await, second.reply().await);
    assert!(matches!(first, Ok(ref r) if matches!(r.outcome, esk_wire::protocol::ReplyOutcome::Error(_))), "{first:?}");
    assert!(
        matches!(second, Ok(ref r) if matches!(r.outcome, esk_wire::protocol::ReplyOutcome::Appended(_))),
        "{second:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_after_the_horizon_is_refused_never_applied_again() {
    let env = TestEnv::new();
    env.esk().args(["topics", "init", "--partitions", "1", "--idempotency-horizon", "20s"]).run().ok();
    let w = writer(&env, true);
    wait_serving(&[&w], 1, Duration::from_secs(60)).await;
    let id = uuid::Uuid::now_v7().to_string();
    let append = || env.esk().args(["append", "note-h", "Written", "{}", "--request-id", &id, "--json"]).run();
    let first = append().ok().json();
    assert_eq!(append().ok().json(), first, "within the horizon, the first answer");
    // Past the horizon and the clock margin (a tenth of it) the answers keep.
    std::thread::sleep(Duration::from_secs(23));
    let late = append().code(4);
    assert_eq!(late.json()["error"], "request_expired", "{late:?}");
    assert!(late.stderr.contains("idempotency horizon"), "{}", late.stderr);
    assert_eq!(count(&env, "note", "note-h"), 1, "written once");
    // A writer asked for a horizon shorter than the requests are kept refuses to start.
    let mut short = Service::start(&env, "writer", &[("ESK_WRITER_IDEMPOTENCY_HORIZON", "10s")]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while short.running() {
        assert!(Instant::now() < deadline, "the writer did not refuse: {}", short.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = std::fs::read_to_string(&short.log).unwrap();
    assert!(log.contains("shorter than"), "{log}");
}

/// A value just under the broker's limit and over the client's.
fn garbage() -> Vec<u8> {
    vec![b'#'; 1_040_000]
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_near_the_broker_limit_is_parked_and_every_partition_serves_on() {
    let env = TestEnv::new();
    let (w, _c, client) = platform(&env, 2, &["account-g1", "account-g2"], 100).await;
    let data = tempfile::tempdir().unwrap();
    let p = Service::start(&env, "projector", &[("ESK_DATA_DIR", data.path().to_str().unwrap())]);
    let t = env.topics();
    let raw = raw_producer(&env);
    let part = partition_for(b"account-g1", 2);
    produce(&raw, &t.commands(), part, "account-g1", &garbage()).await;
    produce(&raw, &t.tx_requests(), partition_for(b"tx-g", 2), "tx-g", &garbage()).await;
    produce(&raw, &t.tx_votes(), partition_for(b"tx-g", 2), "tx-g", &garbage()).await;
    produce(&raw, &t.events("account"), part, "account-g1", &garbage()).await;
    // The same partitions answer the next requests within seconds.
    let started = Instant::now();
    let a = tokio::time::timeout(
        Duration::from_secs(20),
        client.command("account-g1", ExpectedVersion::Any, cmd("Deposit", json!({"amount": 1})), None),
    )
    .await
    .expect("the writer's partition serves the next request")
    .unwrap();
    let status = tokio::time::timeout(
        Duration::from_secs(20),
        client.transact("tx-g", transfer("account-g1", "account-g2", 5), Duration::from_secs(10)),
    )
    .await
    .expect("the coordinator's partition serves the next transaction")
    .unwrap();
    assert_eq!(status.outcome, "committed");
    println!("served again after {:?}", started.elapsed());
    poll_until(Duration::from_secs(30), "the projector to apply the next event", || async {
        let (code, _) = p.get(&format!("/accounts/g1?after={}&timeout_ms=1000", a.position))?;
        (code == 200).then_some(())
    })
    .await;
    // Each was parked, as a cut copy that says where the whole one is.
    for consumer in ["writer", "coordinator", "accounts"] {
        let run = env.esk().args(["dlq", "list", consumer, "--json"]).run().ok();
        let parked: Vec<Value> = run.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert!(!parked.is_empty(), "{consumer}: nothing parked");
        assert!(parked.iter().all(|d| d["truncated_from_bytes"].as_u64().is_some_and(|n| n > 1_000_000)), "{parked:?}");
    }
    // After a restart too: the records are behind the committed offsets.
    w.kill();
    let w2 = writer(&env, true);
    wait_serving(&[&w2], 2, Duration::from_secs(60)).await;
    tokio::time::timeout(
        Duration::from_secs(20),
        client.command("account-g1", ExpectedVersion::Any, cmd("Deposit", json!({"amount": 1})), None),
    )
    .await
    .expect("served after a restart")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_over_the_limits_get_exit_4_before_anything_is_sent() {
    let env = TestEnv::new();
    env.init_topics(1);
    let long_id = "r".repeat(500);
    let run = env.esk().args(["append", "note-l", "Written", "{}", "--request-id", &long_id]).run().code(4);
    assert!(run.stderr.contains("1 to 128"), "{}", run.stderr);
    let dir = tempfile::tempdir().unwrap();
    let tx = dir.path().join("tx.json");
    let big = json!({"participants": [{"stream": "account-1", "command": "Deposit", "data": {"amount": 1, "pad": "x".repeat(20_000)}}]});
    std::fs::write(&tx, big.to_string()).unwrap();
    let run = env.esk().args(["tx", "run", "--file", tx.to_str().unwrap()]).run().code(4);
    assert!(run.stderr.contains("limit"), "{}", run.stderr);
    assert!(env.read_topic(&env.topics().commands(), false).is_empty());
    assert!(env.read_topic(&env.topics().tx_requests(), false).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_records_on_state_and_tx_log_are_refused_and_no_process_dies() {
    let env = TestEnv::new();
    let (w, c, client) = platform(&env, 1, &["account-f1", "account-f2", "account-f3", "account-f4"], 100).await;
    let t = env.topics();
    let raw = raw_producer(&env);
    // A state record whose state does not read as an account's, for a stream
    // the writer never wrote; one for a stream it did; garbage.
    let mut forged = StreamRecord::new("account-forged", Some(json!({"balance": "x"})));
    forged.version = 3;
    forged.last_offset = 5;
    forged.index = vec![esk_wire::protocol::IndexEntry { version: 1, offset: 0 }];
    produce(&raw, &t.state(), 0, "account-forged", &serde_json::to_vec(&forged).unwrap()).await;
    forged.stream = "account-f1".into();
    produce(&raw, &t.state(), 0, "account-f1", &serde_json::to_vec(&forged).unwrap()).await;
    produce(&raw, &t.state(), 0, "account-f2", b"{not json").await;
    // Where the writer is in its inputs, garbled: refused, the last good one stands.
    let consumed = esk_wire::protocol::CONSUMED_KEY;
    produce(&raw, &t.state(), 0, consumed, b"{not json").await;
    produce(&raw, &t.state(), 0, consumed, br#"{"v":1,"next":{"x":-3}}"#).await;
    // Index pages: garbled, and a good one under a key that is not its own.
    let page_key = esk_wire::protocol::IndexPage::key("account-f3", 1);
    produce(&raw, &t.state(), 0, &page_key, b"{not json").await;
    let page = json!({"v": 1, "stream": "account-f3", "entries": [{"version": 1, "offset": 0}]});
    produce(&raw, &t.state(), 0, &esk_wire::protocol::IndexPage::key("account-f4", 1), page.to_string().as_bytes())
        .await;
    produce(&raw, &t.tx_log(), 0, "tx-forged", b"{\"txid\": 7}").await;
    produce(
        &raw,
        &t.tx_log(),
        0,
        "tx-other",
        &serde_json::to_vec(&json!({"txid": "tx-x", "state": "committed"})).unwrap(),
    )
    .await;
    // Where the coordinator is in its inputs, garbled likewise.
    produce(&raw, &t.tx_log(), 0, consumed, b"{not json").await;
    produce(&raw, &t.tx_log(), 0, consumed, br#"{"v":9,"next":{}}"#).await;
    // Restarted on new machines (empty local stores), writer and coordinator
    // restore through them and serve every other stream.
    w.kill();
    c.kill();
    let fresh = tempfile::tempdir().unwrap();
    let dir = fresh.path().to_str().unwrap();
    let mut w2 = Service::start(
        &env,
        "writer",
        &[("ESK_WRITER_SESSION_TIMEOUT_MS", SESSION), ("ESK_WRITER_STANDBY", "false"), ("ESK_DATA_DIR", dir)],
    );
    let mut c2 =
        Service::start(&env, "coordinator", &[("ESK_COORDINATOR_SESSION_TIMEOUT_MS", SESSION), ("ESK_DATA_DIR", dir)]);
    wait_serving(&[&w2], 1, Duration::from_secs(60)).await;
    coordinating(&c2, 1).await;
    let a =
        client.command("account-f3", ExpectedVersion::Any, cmd("Deposit", json!({"amount": 1})), None).await.unwrap();
    assert_eq!(a.last_version, 3);
    let status =
        client.transact("tx-f", transfer("account-f3", "account-f4", 5), Duration::from_secs(10)).await.unwrap();
    assert_eq!(status.outcome, "committed");
    // Each stream a refused record names answers with the reason, and writes
    // nothing: served from an older record, its events could be numbered wrong.
    for stream in ["account-forged", "account-f1", "account-f2"] {
        let refused = client.command(stream, ExpectedVersion::Any, cmd("Deposit", json!({"amount": 1})), None).await;
        assert!(matches!(&refused, Err(ClientError::Unavailable(m)) if m.contains("refused")), "{stream}: {refused:?}");
    }
    assert_eq!(count(&env, "account", "account-forged"), 0);
    assert_eq!(count(&env, "account", "account-f1"), 2, "nothing written to account-f1 since");
    assert!(w2.running() && c2.running(), "no process died");
    let read =
        esk_client::read_stream(&client, "account-f3", 1, std::sync::Arc::new(esk_wire::SchemaRegistry::builtin()))
            .await
            .unwrap();
    let head = client.head("account-f3").await.unwrap();
    let versions: Vec<u64> = read.iter().map(|e| e.event.version).collect();
    assert_eq!(versions, (1..=head.version).collect::<Vec<_>>(), "account-f3 reads as written");
    assert!(metric(&w2, "esk_refused_records_total") >= 7.0, "{}", w2.get("/metrics").unwrap().1);
    assert!(metric(&c2, "esk_refused_records_total") >= 4.0, "{}", c2.get("/metrics").unwrap().1);
    assert!(std::fs::read_to_string(&w2.log).unwrap().contains("refused a record"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_prepare_for_a_decided_transaction_leaves_no_hold() {
    let env = TestEnv::new();
    let (_w, _c, client) = platform(&env, 2, &["account-la", "account-lb", "account-lc"], 100).await;
    let status =
        client.transact("tx-late", transfer("account-la", "account-lb", 10), Duration::from_secs(10)).await.unwrap();
    assert_eq!(status.outcome, "committed");
    // Late prepares of the ended transaction: again for a participant, and for
    // a stream that never took part (its hold would be stray).
    let raw = raw_producer(&env);
    let t = env.topics();
    for stream in ["account-la", "account-lc"] {
        let prepare = json!({"txid": "tx-late", "stream": stream,
                             "command": {"type": "Withdraw", "data": {"amount": 10}}, "deadline_ms": 1});
        produce(
            &raw,
            &t.tx_prepare(),
            partition_for(stream.as_bytes(), 2),
            stream,
            &serde_json::to_vec(&prepare).unwrap(),
        )
        .await;
    }
    // Open holds as the writer last recorded them: the account's own and the writer's.
    let holds = |stream: &str| -> Option<usize> {
        let records = env.read_topic(&env.topics().state(), true);
        let last = records.iter().rev().find(|r| r.key.as_deref() == Some(stream.as_bytes()))?;
        let rec: StreamRecord = serde_json::from_slice(last.value.as_deref()?).ok()?;
        let account = rec.state.as_ref()?.get("holds").and_then(Value::as_object).map_or(0, |h| h.len());
        Some(account + rec.holds.len())
    };
    // The stray hold is placed, then released on the coordinator's answer.
    poll_until(Duration::from_secs(30), "no hold left on account-lc", || async {
        let events = env.all_events("account");
        let released =
            events.iter().any(|(_, _, e)| e.stream.as_str() == "account-lc" && e.event_type == "HoldReleased");
        (released && holds("account-lc") == Some(0)).then_some(())
    })
    .await;
    assert_eq!(holds("account-la"), Some(0));
    let withdrawn: Vec<_> = env
        .all_events("account")
        .into_iter()
        .filter(|(_, _, e)| e.event_type == "Withdrawn" && e.data["txid"] == "tx-late")
        .collect();
    assert_eq!(withdrawn.len(), 1, "the transaction took effect once");
}

#[tokio::test(flavor = "multi_thread")]
async fn writer_dlq_replay_sends_each_parked_record_once() {
    let env = TestEnv::new();
    env.init_topics(2);
    let w = writer(&env, true);
    wait_serving(&[&w], 2, Duration::from_secs(60)).await;
    let raw = raw_producer(&env);
    let t = env.topics();
    let part = partition_for(b"note-dlq", 2);
    let lost = json!({"request_id": "lost-1", "reply_partition": 9, "stream": "note-dlq", "kind": "head"});
    produce(&raw, &t.commands(), part, "note-dlq", &serde_json::to_vec(&lost).unwrap()).await;
    produce(&raw, &t.commands(), part, "note-dlq", &garbage()).await;
    let parked = |n: usize| {
        let env = &env;
        async move {
            poll_until(Duration::from_secs(30), &format!("{n} records parked by the writer"), || async {
                let run = env.esk().args(["dlq", "list", "writer", "--json"]).run();
                (run.stdout.lines().count() >= n).then_some(())
            })
            .await;
        }
    };
    parked(2).await;
    let replay = || env.esk().args(["dlq", "replay", "writer", "--json"]).run().ok().json();
    let first = replay();
    assert_eq!((first["resent"].as_u64(), first["truncated"].as_u64()), (Some(1), Some(1)), "{first}");
    // The request still has no replies partition: the writer parks it again, a new record.
    parked(3).await;
    let second = replay();
    assert_eq!((second["resent"].as_u64(), second["truncated"].as_u64()), (Some(1), Some(0)), "{second}");
    parked(4).await;
    let copies = env
        .read_topic(&t.commands(), true)
        .iter()
        .filter(|r| r.value.as_deref() == Some(serde_json::to_vec(&lost).unwrap().as_slice()))
        .count();
    assert_eq!(copies, 3, "the original and one resend per replay, none twice");
}
