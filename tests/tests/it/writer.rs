//! The write path against a real broker: races, retries, crashes, takeovers,
//! zombies and bad input.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use esk_client::{Client, ClientError};
use esk_tests::{Service, TestEnv, poll_until, repo_root, wait_serving};
use esk_wire::protocol::{CONSUMED_KEY, ExpectedVersion, INDEX_PAGE_PREFIX, NewEvent};
use serde_json::{Value, json};

const SESSION_MS: &str = "6000";

fn writer(env: &TestEnv) -> Service {
    let schemas = repo_root().join("tests/fixtures/schemas");
    Service::start(
        env,
        "writer",
        &[("ESK_WRITER_SESSION_TIMEOUT_MS", SESSION_MS), ("ESK_SCHEMAS_DIR", schemas.to_str().unwrap())],
    )
}

/// The log of a category, by stream, checked: versions 1..n without gaps or
/// duplicates, every event id once.
pub(crate) fn checked_log(env: &TestEnv, category: &str) -> BTreeMap<String, Vec<esk_wire::Event>> {
    let mut by_stream: BTreeMap<String, Vec<esk_wire::Event>> = BTreeMap::new();
    let mut ids = HashSet::new();
    for (_, _, e) in env.all_events(category) {
        assert!(ids.insert(e.id.clone()), "event id {} appears twice", e.id);
        by_stream.entry(e.stream.to_string()).or_default().push(e);
    }
    for (stream, events) in &by_stream {
        let versions: Vec<u64> = events.iter().map(|e| e.version).collect();
        let want: Vec<u64> = (1..=events.len() as u64).collect();
        assert_eq!(versions, want, "{stream}: versions not gapless 1..n");
    }
    by_stream
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_clients_race_each_version_is_won_exactly_once() {
    let env = TestEnv::new();
    env.init_topics(3);
    let w = writer(&env);
    wait_serving(&[&w], 3, Duration::from_secs(60)).await;
    let rounds = 3;
    for round in 1..=rounds {
        let expected = (round - 1).to_string();
        let children: Vec<_> = (0..50)
            .map(|c| {
                let data = json!({"round": round, "client": c}).to_string();
                env.esk().args(["append", "race-1", "Tick", &data, "--expected-version", &expected, "--json"]).spawn()
            })
            .collect();
        let runs: Vec<_> = children.into_iter().map(esk_tests::Spawned::wait).collect();
        let winners: Vec<_> = runs.iter().filter(|r| r.code == Some(0)).collect();
        assert_eq!(winners.len(), 1, "round {round}: {} winners", winners.len());
        assert_eq!(winners[0].json()["last_version"], round);
        for r in runs.iter().filter(|r| r.code != Some(0)) {
            assert_eq!(r.code, Some(3), "a loser must exit 3: {r:#?}");
            let doc = r.json();
            assert_eq!(doc["error"], "wrong_expected_version");
            assert_eq!(doc["actual_version"], round, "{doc}");
            assert!(r.stderr.contains(&format!("at version {round}")), "{}", r.stderr);
        }
    }
    let log = checked_log(&env, "race");
    assert_eq!(log["race-1"].len(), rounds as usize);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_request_writes_nothing_twice() {
    let env = TestEnv::new();
    env.init_topics(2);
    let w = writer(&env);
    wait_serving(&[&w], 2, Duration::from_secs(60)).await;
    let append = |extra: &[&str]| {
        let mut args = vec!["append", "note-1", "Written", r#"{"text":"once"}"#, "--json"];
        args.extend_from_slice(extra);
        env.esk().args(args).run().ok().json()
    };
    let first = append(&["--request-id", "req-1"]);
    let again = append(&["--request-id", "req-1"]);
    assert_eq!(first, again, "a retry answers with the first result");
    let event_id = uuid::Uuid::new_v4().to_string();
    let second = append(&["--event-id", &event_id, "--expected-version", "1"]);
    assert_eq!(second["first_version"], 2);
    // Same event id at the same expected version, under a new request id.
    let retry = append(&["--event-id", &event_id, "--expected-version", "1"]);
    assert_eq!(second, retry);
    let log = checked_log(&env, "note");
    assert_eq!(log["note-1"].len(), 2);
    assert_eq!(log["note-1"][1].id, event_id);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_its_exit_code_and_writes_nothing() {
    let env = TestEnv::new();
    env.init_topics(2);
    let w = writer(&env);
    wait_serving(&[&w], 2, Duration::from_secs(60)).await;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, len: usize| {
        let path = dir.path().join(name);
        std::fs::write(&path, json!({"x": "y".repeat(len)}).to_string()).unwrap();
        format!("@{}", path.display())
    };
    let (big, huge) = (write("big.json", 300_000), write("huge.json", 1_100_000));
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["append", "order-1", "OrderPlaced", "{bad"], 4, "not valid JSON"),
        (vec!["append", "order1", "OrderPlaced", "{}"], 4, "no category"),
        (vec!["append", "Order-1", "OrderPlaced", "{}"], 4, "category 'Order'"),
        (vec!["append", "order-1", "OrderShipped", "{}"], 4, "unknown event type 'OrderShipped'"),
        (vec!["append", "order-1", "OrderPlaced", r#"{"sku":"a","quantity":0}"#], 4, "/quantity"),
        (vec!["append", "blob-1", "Big", &big], 4, "limit is 262144"),
        (vec!["append", "blob-1", "Huge", &huge], 4, "the limit is 983616"),
        (
            vec!["append", "order-1", "OrderPlaced", r#"{"sku":"a","quantity":1}"#, "--expected-version", "5"],
            3,
            "at version 0, expected 5",
        ),
        (
            vec!["append", "order-1", "OrderPlaced", r#"{"sku":"a","quantity":1}"#, "--expected-version", "exists"],
            3,
            "expected exists",
        ),
        (vec!["append", "order-1", "OrderPlaced", "{}", "--expected-version", "banana"], 4, "'banana'"),
        (vec!["append", "order-1", "OrderPlaced", "{}", "--event-id", "nope"], 4, "not a UUID"),
        (vec!["append", "account-9", "Deposited", r#"{"amount":5}"#], 4, "owned by its aggregate"),
        (vec!["command", "account-9", "Deposit", r#"{"amount":5}"#], 7, "not open"),
        (vec!["command", "account-9", "Deposit", r#"{"amount":-5}"#], 4, "at least 1"),
        (vec!["command", "account-9", "Steal", "{}"], 4, "Steal"),
        (vec!["command", "order-1", "Place", "{}"], 4, "no aggregate"),
        (vec!["command", "account-9", "Deposit", "nope"], 4, "not valid JSON"),
        (vec!["command", "account-9", "Deposit", "@/no/such/file"], 4, "cannot read /no/such/file"),
        (vec!["read", "nocategory"], 4, "no category"),
        (vec!["tail", "--category", "Bad!"], 4, "not a category"),
        (vec!["append"], 2, "required"),
    ];
    for (args, code, wanted) in cases {
        let mut with_json = args.clone();
        with_json.push("--json");
        let run = env.esk().args(&with_json).run();
        assert_eq!(run.code, Some(code), "{args:?}: {run:#?}");
        assert!(run.stderr.contains(wanted), "{args:?}: wanted '{wanted}' in stderr: {}", run.stderr);
        if code != 2 {
            let doc = run.json();
            assert!(doc["error"].is_string() && doc["message"].is_string(), "{doc}");
        }
    }
    for category in ["order", "blob", "account"] {
        assert!(env.all_events(category).is_empty(), "something was written to {category}");
    }
    // Only where the writer is in its inputs (it consumed the requests).
    let state = env.read_topic(&env.topics().state(), true);
    let streams = state
        .iter()
        .filter(|r| {
            r.key
                .as_deref()
                .is_some_and(|k| k != CONSUMED_KEY.as_bytes() && !k.starts_with(INDEX_PAGE_PREFIX.as_bytes()))
        })
        .count();
    assert_eq!(streams, 0, "state records were written");
    // The writer is still fine.
    env.esk().args(["append", "order-1", "OrderPlaced", r#"{"sku":"a","quantity":1}"#]).run().ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_records_from_foreign_producers_are_parked_and_the_writer_goes_on() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let env = TestEnv::new();
    env.init_topics(2);
    let w = writer(&env);
    wait_serving(&[&w], 2, Duration::from_secs(60)).await;
    let producer: FutureProducer =
        env.kafka().producer(esk_kafka::Sending::Foreign { max_message_bytes: 1_000_000 }).create().unwrap();
    let commands = env.topics().commands();
    let foreign = [
        ("note-1", b"\x00\xffgarbage".to_vec()),
        ("note-1", br#"{"request_id":"x","reply_partition":99,"stream":"note-1","kind":"head"}"#.to_vec()),
    ];
    for (key, value) in &foreign {
        producer.send(FutureRecord::to(&commands).key(*key).payload(value), Duration::from_secs(10)).await.unwrap();
    }
    // The writer goes on: an append after them succeeds (and, being behind them
    // in the same partition, proves they were consumed).
    env.esk().args(["append", "note-1", "Written", r#"{"text":"after"}"#]).run().ok();
    let parked = env.read_topic(&env.topics().dlq("writer"), true);
    assert_eq!(parked.len(), 2, "{parked:#?}");
    assert!(parked[0].header("esk_dlq_reason").unwrap().contains("not valid"));
    assert_eq!(parked[0].header("esk_dlq_topic").as_deref(), Some(commands.as_str()));
    assert!(parked[0].header("esk_dlq_offset").is_some());
    assert_eq!(parked[0].value.as_deref(), Some(&b"\x00\xffgarbage"[..]));
    assert!(parked[1].header("esk_dlq_reason").unwrap().contains("reply_partition 99"));
    let metrics = w.get("/metrics").unwrap().1;
    assert!(metrics.contains("esk_writer_dead_letters_total 2"), "{metrics}");
    assert_eq!(checked_log(&env, "note")["note-1"].len(), 1);
}

/// One request of the load: its stream, its two event ids, and what the client heard.
#[derive(Debug)]
pub(crate) struct Sent {
    stream: String,
    ids: [String; 2],
    pub(crate) result: Result<(u64, u64), ClientError>,
}

/// Appends two-event requests to `streams` streams until `stop`, each stream
/// one request at a time, all streams at once.
pub(crate) async fn load(client: Arc<Client>, category: &str, streams: usize, stop: Arc<AtomicBool>) -> Vec<Sent> {
    let tasks: Vec<_> = (0..streams)
        .map(|i| {
            let client = client.clone();
            let stop = stop.clone();
            let stream = format!("{category}-{i}");
            tokio::spawn(async move {
                let mut sent = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let ids = [uuid::Uuid::new_v4().to_string(), uuid::Uuid::new_v4().to_string()];
                    let events = ids
                        .iter()
                        .map(|id| NewEvent {
                            id: Some(id.clone()),
                            event_type: "Loaded".into(),
                            data: json!({"n": sent.len()}),
                        })
                        .collect();
                    let result = client
                        .append(&stream, ExpectedVersion::Any, events, None)
                        .await
                        .map(|a| (a.first_version, a.last_version));
                    if result.is_err() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    sent.push(Sent { stream: stream.clone(), ids, result });
                }
                sent
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// Every acknowledged request is in the log exactly once at its versions; every
/// other is wholly there or wholly absent; the log is gapless.
pub(crate) async fn verify_load(env: &TestEnv, category: &str, sent: &[Sent]) {
    // A head request per stream is answered only after everything before it in
    // its partition: a barrier for requests still in flight at the end.
    let barrier = env.client(Duration::from_secs(60), false);
    let streams: HashSet<&str> = sent.iter().map(|s| s.stream.as_str()).collect();
    let mut heads = HashMap::new();
    for s in &streams {
        heads.insert(s.to_string(), barrier.head(s).await.expect("head").version);
    }
    let log = checked_log(env, category);
    let mut at: HashMap<String, (String, u64)> = HashMap::new();
    for (stream, events) in &log {
        assert_eq!(heads[stream], events.len() as u64, "{stream}: head and log disagree");
        for e in events {
            at.insert(e.id.clone(), (stream.clone(), e.version));
        }
    }
    let (mut acked, mut applied_unacked, mut absent) = (0, 0, 0);
    for s in sent {
        let found: Vec<_> = s.ids.iter().map(|id| at.get(id)).collect();
        match (&s.result, found[0], found[1]) {
            (Ok((first, last)), Some(a), Some(b)) => {
                assert_eq!((a, b), (&(s.stream.clone(), *first), &(s.stream.clone(), *last)), "{s:?}");
                acked += 1;
            }
            (Ok(_), _, _) => panic!("an acknowledged append is missing from the log: {s:?}"),
            (Err(_), Some(a), Some(b)) => {
                assert_eq!(a.1 + 1, b.1, "a request's events must be consecutive: {s:?}");
                applied_unacked += 1;
            }
            (Err(_), None, None) => absent += 1,
            (Err(_), _, _) => panic!("half of a request is in the log: {s:?}"),
        }
    }
    println!("{acked} acknowledged, {applied_unacked} applied but unacknowledged, {absent} absent");
    assert!(acked > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_load_loses_nothing_acknowledged_and_splits_nothing() {
    let env = TestEnv::new();
    env.init_topics(3);
    let w = writer(&env);
    wait_serving(&[&w], 3, Duration::from_secs(60)).await;
    let client = Arc::new(env.client(Duration::from_secs(4), true));
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(load(client.clone(), "crash", 12, stop.clone()));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    w.kill();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let w2 = writer(&env);
    wait_serving(&[&w2], 3, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::SeqCst);
    let sent = load.await.unwrap();
    assert!(sent.iter().any(|s| s.result.is_err()), "the kill interrupted nothing");
    verify_load(&env, "crash", &sent).await;
    drop(w2);
}

fn metric(service: &Service, name: &str) -> f64 {
    let text = service.get("/metrics").map(|r| r.1).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn serving(w: &Service) -> u64 {
    w.get_json("/health").map_or(0, |h| h["partitions_serving"].as_u64().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_writer_takes_over_and_a_frozen_zombie_writes_nothing() {
    // It measures time: the machine to itself.
    let env = TestEnv::exclusive();
    // Two shards of two partitions: each writer gets one.
    env.init_topics_sharded(4, 2);
    let a = writer(&env);
    wait_serving(&[&a], 4, Duration::from_secs(60)).await;
    let b = writer(&env);
    poll_until(Duration::from_secs(60), "both writers to serve", || async {
        (serving(&a) > 0 && serving(&b) > 0 && serving(&a) + serving(&b) == 4).then_some(())
    })
    .await;
    let client = Arc::new(env.client(Duration::from_secs(30), true));
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(load(client.clone(), "takeover", 16, stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Kill one: the other serves every partition within the session timeout.
    let killed_at = Instant::now();
    a.kill();
    poll_until(Duration::from_secs(30), "the survivor to serve all partitions", || async {
        (serving(&b) == 4).then_some(())
    })
    .await;
    let takeover = killed_at.elapsed();
    println!("takeover after SIGKILL: {takeover:?} (session timeout {SESSION_MS} ms)");
    // The killed owner had a transaction open: the survivor first aborts it
    // (fencing) and reads what its standby lacks. The standby test bounds the
    // idle case at the session timeout + 1 s.
    assert!(takeover < Duration::from_millis(6000 + 2000), "takeover took {takeover:?}");

    // A zombie: a writer frozen while it owns partitions, woken after the takeover.
    let zombie = writer(&env);
    poll_until(Duration::from_secs(60), "the new writer to get partitions", || async {
        (serving(&zombie) > 0 && serving(&zombie) + serving(&b) == 4).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    zombie.signal("STOP");
    poll_until(Duration::from_secs(30), "the takeover from the frozen writer", || async {
        (serving(&b) == 4).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    zombie.signal("CONT");
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::SeqCst);
    let sent = load.await.unwrap();
    println!(
        "zombie after waking: fenced {}, aborted {}",
        metric(&zombie, "esk_writer_fenced_total"),
        metric(&zombie, "esk_writer_aborts_total")
    );
    verify_load(&env, "takeover", &sent).await;
    let ok = sent.iter().filter(|s| s.result.is_ok()).count();
    assert!(ok * 10 > sent.len() * 8, "too few appends succeeded: {ok} of {}", sent.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn read_returns_a_stream_in_order_from_its_index() {
    let env = TestEnv::new();
    env.init_topics(2);
    let w = writer(&env);
    wait_serving(&[&w], 2, Duration::from_secs(60)).await;
    // 40 streams interleaved in one file, then 50 separate appends to one stream
    // (more entries than a stream's record keeps, so index pages are written).
    let lines: String = (0..2000)
        .map(|i| json!({"stream": format!("mix-{}", i % 40), "type": "Mixed", "data": {"i": i}}).to_string() + "\n")
        .collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), lines).unwrap();
    let summary = env.esk().args(["produce", "--file", file.path().to_str().unwrap(), "--json"]).run().ok().json();
    assert_eq!(summary["appended"], 2000);
    let client = env.client(Duration::from_secs(30), false);
    for n in 0..50 {
        client
            .append(
                "mix-7",
                ExpectedVersion::Exact(50 + n),
                vec![NewEvent { id: None, event_type: "Single".into(), data: json!({"n": n}) }],
                None,
            )
            .await
            .unwrap();
    }
    let log = checked_log(&env, "mix");
    for (stream, from) in [("mix-7", 1), ("mix-7", 77), ("mix-3", 1), ("mix-3", 50)] {
        let run = env.esk().args(["read", stream, "--from-version", &from.to_string(), "--json"]).run().ok();
        let got: Vec<Value> = run.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let want: Vec<&esk_wire::Event> = log[stream].iter().filter(|e| e.version >= from).collect();
        assert_eq!(got.len(), want.len(), "{stream} from {from}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g["version"], w.version);
            assert_eq!(g["id"], w.id.as_str());
            assert_eq!(g["data"], w.data);
            assert_eq!(g["stream"], stream);
            assert!(g["position"].as_str().unwrap().starts_with("mix:"));
        }
    }
    // An entry per append, the older ones on index pages of the state topic.
    let head = client.head_from("mix-7", 1).await.unwrap();
    assert_eq!((head.version, head.more), (100, false));
    let versions: Vec<u64> = head.index.iter().map(|e| e.version).collect();
    assert_eq!(versions[0], 1);
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    assert!((51..=100).all(|v| versions.contains(&v)), "every single append has its entry: {versions:?}");
    let from_77 = client.head_from("mix-7", 77).await.unwrap();
    assert_eq!(from_77.index.first().map(|e| e.version), Some(77), "the index from version 77");
    let pages = env
        .read_topic(&env.topics().state(), true)
        .into_iter()
        .filter_map(|r| r.key.filter(|k| k.starts_with(INDEX_PAGE_PREFIX.as_bytes())))
        .filter(|k| String::from_utf8_lossy(k).contains("mix-7"))
        .count();
    assert!(pages >= 1, "no index page of mix-7 on the state topic");
    let human = env.esk().args(["read", "mix-7", "--from-version", "100"]).run().ok();
    assert!(human.stdout.contains("Single") && human.stdout.contains(r#"{"n":49}"#), "{}", human.stdout);
    let empty = env.esk().args(["read", "mix-404"]).run().ok();
    assert!(empty.stdout.is_empty() && empty.stderr.contains("no events"));
    // A writer on a new machine restores the pages from the state topic.
    let before = env.esk().args(["read", "mix-7", "--json"]).run().ok().stdout;
    w.kill();
    let fresh = tempfile::tempdir().unwrap();
    let schemas = repo_root().join("tests/fixtures/schemas");
    let w2 = Service::start(
        &env,
        "writer",
        &[
            ("ESK_WRITER_SESSION_TIMEOUT_MS", SESSION_MS),
            ("ESK_SCHEMAS_DIR", schemas.to_str().unwrap()),
            ("ESK_DATA_DIR", fresh.path().to_str().unwrap()),
        ],
    );
    wait_serving(&[&w2], 2, Duration::from_secs(60)).await;
    let after = env.esk().args(["read", "mix-7", "--json"]).run().ok().stdout;
    assert_eq!(after.lines().count(), 100);
    assert_eq!(after, before, "mix-7 reads the same from the restored index");
}

/// More appends than a `head` reply carries (1,024 entries): the read asks
/// again from the last entry and returns every event once, in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_pages_through_an_index_longer_than_a_head_reply() {
    use futures::StreamExt;
    let env = TestEnv::new();
    env.init_topics(1);
    let w = writer(&env);
    wait_serving(&[&w], 1, Duration::from_secs(60)).await;
    let client = env.client(Duration::from_secs(60), true);
    let total = esk_wire::protocol::MAX_HEAD_ENTRIES as u64 + 76;
    let appended: Vec<_> = futures::stream::iter(0..total)
        .map(|n| {
            let client = &client;
            async move {
                let event = NewEvent { id: None, event_type: "Single".into(), data: json!({"n": n}) };
                client.append("long-1", ExpectedVersion::Any, vec![event], None).await
            }
        })
        .buffered(64)
        .collect()
        .await;
    assert!(appended.iter().all(Result::is_ok), "{:?}", appended.iter().find(|r| r.is_err()));
    let head = client.head_from("long-1", 1).await.unwrap();
    assert_eq!((head.version, head.index.len(), head.more), (total, esk_wire::protocol::MAX_HEAD_ENTRIES, true));
    let schemas = Arc::new(esk_wire::SchemaRegistry::builtin());
    let events = esk_client::read_stream(&client, "long-1", 1, schemas.clone()).await.unwrap();
    assert_eq!(events.iter().map(|e| e.event.version).collect::<Vec<_>>(), (1..=total).collect::<Vec<_>>());
    let log = checked_log(&env, "long");
    let ids: Vec<&str> = log["long-1"].iter().map(|e| e.id.as_str()).collect();
    assert_eq!(events.iter().map(|e| e.event.id.as_str()).collect::<Vec<_>>(), ids);
    let tail = esk_client::read_stream(&client, "long-1", 1050, schemas).await.unwrap();
    assert_eq!(tail.first().map(|e| e.event.version), Some(1050));
    assert_eq!(tail.len() as u64, total - 1049);
}

#[tokio::test(flavor = "multi_thread")]
async fn tail_follows_new_events() {
    let env = TestEnv::new();
    env.init_topics(2);
    let w = writer(&env);
    wait_serving(&[&w], 2, Duration::from_secs(60)).await;
    env.esk().args(["append", "feed-0", "Old", "{}"]).run().ok();
    let tail = env.esk().args(["tail", "--category", "feed", "--json", "--limit", "3"]).spawn();
    // The tail starts at the end: give it a moment to assign before appending.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 1..=3 {
        env.esk().args(["append", &format!("feed-{i}"), "New", &json!({"i": i}).to_string()]).run().ok();
    }
    let run = tail.wait();
    assert_eq!(run.code, Some(0), "{run:#?}");
    let got: Vec<Value> = run.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|e| e["type"] == "New"), "{got:?}");
    let from_start =
        env.esk().args(["tail", "--category", "feed", "--from-beginning", "--json", "--limit", "4"]).run().ok();
    assert_eq!(from_start.stdout.lines().count(), 4);
    assert!(from_start.stdout.contains("\"Old\""));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_category_topic_with_the_wrong_partition_count_is_refused_without_blocking_others() {
    use esk_kafka::admin::{Admin, Durability, TopicKind};
    let env = TestEnv::new();
    env.init_topics(2);
    Admin::new(&env.kafka())
        .unwrap()
        .ensure(&[TopicKind::Events.spec(env.topics().events("odd"), 5, Durability::new(1))])
        .await
        .unwrap();
    let w = writer(&env);
    wait_serving(&[&w], 2, Duration::from_secs(60)).await;
    let run = env.esk().args(["append", "odd-1", "Thing", "{}", "--json"]).run().code(1);
    assert!(run.stderr.contains("has 5 partitions; esk needs 2"), "{}", run.stderr);
    // Every partition still serves other categories.
    for i in 0..6 {
        env.esk().args(["append", &format!("fine-{i}"), "Thing", "{}"]).run().ok();
    }
    assert!(env.all_events("odd").is_empty());
}

/// Where a partition is in its inputs commits with what it produced, on the
/// state topic: a new owner resumes from there, whatever the consumer
/// group's offsets say. Here they are set back to the beginning after the
/// writer is killed; the next writer redoes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_owner_resumes_from_the_state_topic_not_from_the_groups_offsets() {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let env = TestEnv::new();
    env.init_topics(1);
    let w = writer(&env);
    wait_serving(&[&w], 1, Duration::from_secs(60)).await;
    for v in 0..10 {
        let expected = if v == 0 { "no-stream".to_owned() } else { v.to_string() };
        let args = ["append", "order-resume", "OrderPlaced", r#"{"sku":"a","quantity":1}"#, "--expected-version"];
        env.esk().args(args).args([expected.as_str()]).run().ok();
    }
    let state = env.read_topic(&env.topics().state(), true);
    assert!(state.iter().any(|r| r.key.as_deref() == Some(CONSUMED_KEY.as_bytes())), "no consumed-positions record");
    w.kill();
    // Once the dead member's session is over the group is empty and takes a
    // plain commit: every input back to its beginning.
    let group: BaseConsumer =
        env.kafka().committed_reader(&format!("{}-writer", env.prefix), Duration::from_millis(50)).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for topic in [env.topics().commands(), env.topics().tx_prepare(), env.topics().tx_commit()] {
        tpl.add_partition_offset(&topic, 0, Offset::Offset(0)).unwrap();
    }
    poll_until(Duration::from_secs(60), "the group takes a plain commit", || {
        let ok = group.commit(&tpl, CommitMode::Sync).ok();
        async move { ok }
    })
    .await;
    let w2 = writer(&env);
    wait_serving(&[&w2], 1, Duration::from_secs(60)).await;
    env.esk()
        .args(["append", "order-resume", "OrderPlaced", r#"{"sku":"b","quantity":1}"#, "--expected-version", "10"])
        .run()
        .ok();
    assert_eq!(metric(&w2, "esk_writer_records_total"), 1.0, "the new owner processed old requests again");
    assert_eq!(metric(&w2, "esk_writer_retries_answered_total"), 0.0);
    assert_eq!(checked_log(&env, "order")["order-resume"].len(), 11);
}

#[tokio::test(flavor = "multi_thread")]
async fn produce_merges_a_streams_lines_into_requests_and_keeps_each_streams_file_order() {
    let env = TestEnv::new();
    env.init_topics(3);
    let w = writer(&env);
    wait_serving(&[&w], 3, Duration::from_secs(60)).await;
    // 600 lines, the three streams in turn; line 301 expects a version, so
    // it goes alone (and fails: the stream is far past 5).
    let lines: String = (0..600)
        .map(|i| {
            let mut line = json!({"stream": format!("merge-{}", i % 3), "type": "Noted", "data": {"i": i}});
            if i == 300 {
                line["expected_version"] = json!(5);
            }
            line.to_string() + "\n"
        })
        .collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), lines).unwrap();
    let path = file.path().to_str().unwrap();
    let run = env.esk().args(["produce", "--file", path, "--merge", "100", "--json"]).run();
    assert_eq!(run.code, Some(3), "one line expects a wrong version: {run:#?}");
    let summary = run.json();
    assert_eq!(summary["appended"], 599);
    assert_eq!(summary["failed"], 1);
    assert_eq!(summary["failures"][0]["line"], 301);
    // Each stream: 200 lines, 100 a request; line 301 (merge-0's 101st)
    // goes alone, its 99 lines after it in one more: 3 + 2 + 2 requests.
    assert_eq!(summary["requests"], 7, "{summary}");
    assert_eq!(metric(&w, "esk_writer_records_total") as u64, 7);
    let log = checked_log(&env, "merge");
    for (stream, events) in &log {
        let seen: Vec<i64> = events.iter().map(|e| e.data["i"].as_i64().unwrap()).collect();
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        assert_eq!(seen, sorted, "{stream}: not in file order");
    }
    assert_eq!(log.values().map(Vec::len).sum::<usize>(), 599);
    // --merge 1: a request a line.
    let lines: String =
        (0..30).map(|i| json!({"stream": "merge-one", "type": "Noted", "data": {"i": i}}).to_string() + "\n").collect();
    std::fs::write(file.path(), lines).unwrap();
    let summary = env.esk().args(["produce", "--file", path, "--merge", "1", "--json"]).run().ok().json();
    assert_eq!((summary["requests"].as_u64(), summary["appended"].as_u64()), (Some(30), Some(30)));
}
