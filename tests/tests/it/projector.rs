//! Projectors against a real broker: exactly-once under SIGKILL, read-your-writes,
//! dead letters and replays, rebuilds under queries, bad queries, two instances.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use esk_domain::Aggregate;
use esk_domain::account::{Account, Event as AccountEvent, State};
use esk_tests::{Service, TestEnv, http_get, poll_until, wait_serving};
use esk_wire::protocol::{CommandData, ExpectedVersion};
use futures::StreamExt;
use serde_json::{Value, json};

fn projector(env: &TestEnv, data: &std::path::Path, instance: &str, extra: &[(&str, &str)]) -> Service {
    let mut vars = vec![("ESK_DATA_DIR", data.to_str().unwrap()), ("ESK_PROJECTOR_INSTANCE", instance)];
    vars.extend_from_slice(extra);
    let p = Service::start(env, "projector", &vars);
    let started = Instant::now();
    while p.get("/health").is_none() {
        assert!(started.elapsed() < Duration::from_secs(30), "projector did not start: {}", p.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    p
}

async fn platform(partitions: u32) -> (TestEnv, Service) {
    let env = TestEnv::new();
    env.init_topics(partitions);
    let w = Service::start(&env, "writer", &[("ESK_WRITER_SESSION_TIMEOUT_MS", "6000")]);
    wait_serving(&[&w], u64::from(partitions), Duration::from_secs(60)).await;
    (env, w)
}

fn cmd(ty: &str, data: Value) -> CommandData {
    CommandData { command_type: ty.into(), data }
}

/// Opens the account `stream` (it must not exist yet).
async fn open(client: &esk_client::Client, stream: &str) -> esk_wire::protocol::Appended {
    client.command(stream, ExpectedVersion::NoStream, cmd("OpenAccount", json!({"owner": "o"})), None).await.unwrap()
}

/// The accounts as a fold of the log: id -> (balance, available, version).
fn fold(env: &TestEnv) -> BTreeMap<String, (i64, i64, u64)> {
    let mut states: BTreeMap<String, (State, u64)> = BTreeMap::new();
    for (_, _, e) in env.all_events("account") {
        let typed: AccountEvent = serde_json::from_value(json!({"type": e.event_type, "data": e.data})).unwrap();
        let entry = states.entry(e.stream.id().to_owned()).or_default();
        entry.0 = Account::apply(std::mem::take(&mut entry.0), &typed);
        entry.1 = e.version;
    }
    states.into_iter().map(|(id, (s, v))| (id, (s.balance, s.available(), v))).collect()
}

/// The accounts as the projector shows them.
fn model(p: &Service) -> BTreeMap<String, (i64, i64, u64)> {
    let mut out = BTreeMap::new();
    let mut cursor = String::new();
    loop {
        let path = format!("/accounts?limit=1000&cursor={cursor}");
        let (code, body) = p.get(&path).expect("the projector answers");
        assert_eq!(code, 200, "{body}");
        let doc: Value = serde_json::from_str(&body).unwrap();
        for a in doc["accounts"].as_array().unwrap() {
            out.insert(
                a["id"].as_str().unwrap().to_owned(),
                (a["balance"].as_i64().unwrap(), a["available"].as_i64().unwrap(), a["version"].as_u64().unwrap()),
            );
        }
        match doc["next"].as_str() {
            Some(n) => cursor = n.to_owned(),
            None => return out,
        }
    }
}

/// A small deterministic generator, seeded from the clock (the seed is printed).
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        println!("seed {seed}");
        Self(seed | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_under_load_leaves_every_balance_equal_to_the_fold() {
    let (env, _w) = platform(3).await;
    let data = tempfile::tempdir().unwrap();
    let mut p = projector(&env, data.path(), "0", &[]);
    let client = Arc::new(env.client(Duration::from_secs(30), true));
    let accounts = 100;
    for i in 0..accounts {
        open(&client, &format!("account-{i}")).await;
    }
    let done = Arc::new(AtomicBool::new(false));
    let load = {
        let (client, done) = (client.clone(), done.clone());
        tokio::spawn(async move {
            let mut rng = Rng::new();
            let ops: Vec<(String, String, u64)> = (0..10_000)
                .map(|_| {
                    let kind = if rng.below(3) == 0 { "Withdraw" } else { "Deposit" };
                    (format!("account-{}", rng.below(accounts)), kind.to_owned(), 1 + rng.below(50))
                })
                .collect();
            let results: Vec<_> = futures::stream::iter(ops.into_iter().map(|(s, kind, amount)| {
                let client = client.clone();
                // Boxed: a plain async block here trips a higher-ranked lifetime limit of tokio::spawn.
                let f: futures::future::BoxFuture<'static, _> = Box::pin(async move {
                    client.command(&s, ExpectedVersion::Any, cmd(&kind, json!({"amount": amount})), None).await
                });
                f
            }))
            .buffer_unordered(64)
            .collect()
            .await;
            done.store(true, Ordering::SeqCst);
            results
        })
    };
    let mut rng = Rng::new();
    let mut kills = 0;
    while kills < 4 {
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1200))).await;
        p.kill();
        kills += 1;
        p = projector(&env, data.path(), "0", &[]);
        if done.load(Ordering::SeqCst) && kills >= 3 {
            break;
        }
    }
    let results = load.await.unwrap();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let refused = results.iter().filter(|r| matches!(r, Err(esk_client::ClientError::Refused(_)))).count();
    assert_eq!(ok + refused, results.len(), "only domain refusals may fail");
    println!("{ok} commands applied, {refused} refused (insufficient funds), {kills} projector kills");
    let want = fold(&env);
    assert_eq!(want.len(), accounts as usize);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let got = model(&p);
        if got == want {
            break;
        }
        if Instant::now() > deadline {
            let diff: Vec<_> =
                want.iter().filter(|(k, v)| got.get(*k) != Some(v)).map(|(k, v)| (k, v, got.get(k))).take(10).collect();
            panic!("the model differs from the fold of the log (id, fold, model): {diff:?}\n{}", p.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Caught up: position >= high watermark, transaction markers included.
    poll_until(Duration::from_secs(15), "the projector to report no lag", || async {
        p.get_json("/status").filter(|s| s["projections"][0]["lag"] == 0).map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_with_a_token_always_sees_the_write() {
    let (env, _w) = platform(2).await;
    let data = tempfile::tempdir().unwrap();
    let p = projector(&env, data.path(), "0", &[]);
    let client = env.client(Duration::from_secs(30), false);
    for i in 0..3 {
        open(&client, &format!("account-r{i}")).await;
    }
    let mut balances = [0i64; 3];
    for round in 0..1000usize {
        let i = round % 3;
        let a = client
            .command(&format!("account-r{i}"), ExpectedVersion::Any, cmd("Deposit", json!({"amount": 1})), None)
            .await
            .unwrap();
        balances[i] += 1;
        // Half the rounds wait on the position token, half on the stream version.
        let path = if round % 2 == 0 {
            format!("/accounts/r{i}?after={}", a.position)
        } else {
            format!("/accounts/r{i}?min_version={}", a.last_version)
        };
        let (code, body) = p.get(&path).unwrap();
        assert_eq!(code, 200, "round {round}: {body}");
        let doc: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["balance"], balances[i], "round {round}: stale answer {doc}");
        assert_eq!(doc["version"], a.last_version, "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_projector_killed_and_restarted_serves_again_without_waiting_for_its_old_session() {
    let (env, _w) = platform(3).await;
    let data = tempfile::tempdir().unwrap();
    let p = projector(&env, data.path(), "0", &[]);
    let client = env.client(Duration::from_secs(30), false);
    let mut last = None;
    for i in 0..3 {
        last = Some(open(&client, &format!("account-k{i}")).await);
    }
    let (code, body) = p.get(&format!("/accounts/k2?after={}", last.unwrap().position)).unwrap();
    assert_eq!(code, 200, "{body}");
    // Twice, as in a crash loop: each killed instance leaves a member behind
    // in the group, whose session (45 s by default) has not expired.
    p.kill();
    let p = projector(&env, data.path(), "0", &[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.kill();
    let restarted = Instant::now();
    let p = projector(&env, data.path(), "0", &[]);
    for i in 0..3 {
        let a = client
            .command(&format!("account-k{i}"), ExpectedVersion::Any, cmd("Deposit", json!({"amount": 5})), None)
            .await
            .unwrap();
        let (code, body) = p.get(&format!("/accounts/k{i}?after={}&timeout_ms=20000", a.position)).unwrap();
        assert_eq!(code, 200, "account-k{i}, {:?} after the restart: {body}\n{}", restarted.elapsed(), p.log_tail());
        let doc: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["balance"], 5, "{doc}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn of_two_projectors_started_with_one_instance_id_the_older_stops_with_a_clear_error() {
    let (env, _w) = platform(2).await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut first = projector(&env, d1.path(), "7", &[]);
    let client = env.client(Duration::from_secs(30), false);
    let a = open(&client, "account-twin").await;
    assert_eq!(first.get(&format!("/accounts/twin?after={}", a.position)).unwrap().0, 200);
    // The same id by mistake: each would get part of the partitions, and
    // both models would silently miss events.
    let second = projector(&env, d2.path(), "7", &[]);
    let started = Instant::now();
    while first.running() {
        assert!(started.elapsed() < Duration::from_secs(30), "the older one still runs: {}", first.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(first.log_tail().contains("another projector with the same instance id"), "{}", first.log_tail());
    let a =
        client.command("account-twin", ExpectedVersion::Any, cmd("Deposit", json!({"amount": 3})), None).await.unwrap();
    let (code, body) = second.get(&format!("/accounts/twin?after={}&timeout_ms=20000", a.position)).unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["balance"], 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_events_are_parked_counted_and_replayed_once_after_a_fix() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let (env, _w) = platform(2).await;
    let data = tempfile::tempdir().unwrap();
    let mut p = projector(&env, data.path(), "0", &[]);
    let client = env.client(Duration::from_secs(30), false);
    client
        .command("account-p", ExpectedVersion::NoStream, cmd("OpenAccount", json!({"owner": "p"})), None)
        .await
        .unwrap();
    // A foreign producer writes two poison records into the account log: one
    // with no CloudEvents headers, one whose data its schema does not allow.
    let topic = env.topics().events("account");
    let producer: FutureProducer =
        env.kafka().producer(esk_kafka::Sending::Foreign { max_message_bytes: 1_000_000 }).create().unwrap();
    producer
        .send(FutureRecord::to(&topic).key("account-p").payload("not an event"), Duration::from_secs(10))
        .await
        .unwrap();
    let noted = esk_wire::Event {
        id: uuid::Uuid::new_v4().to_string(),
        source: "foreign".into(),
        event_type: "Deposited".into(),
        time: chrono::Utc::now(),
        stream: esk_wire::StreamName::parse("account-p").unwrap(),
        version: 2,
        correlation_id: None,
        causation_id: None,
        data_schema: None,
        data: json!({"amount": 7, "note": "bonus"}),
    };
    let headers = noted.headers().iter().fold(rdkafka::message::OwnedHeaders::new(), |h, (k, v)| {
        h.insert(rdkafka::message::Header { key: k, value: v.as_deref() })
    });
    let value = noted.value();
    producer
        .send(FutureRecord::to(&topic).key("account-p").payload(&value).headers(headers), Duration::from_secs(10))
        .await
        .unwrap();
    // Every later event is still applied.
    let a =
        client.command("account-p", ExpectedVersion::Any, cmd("Deposit", json!({"amount": 100})), None).await.unwrap();
    let (code, body) = p.get(&format!("/accounts/p?after={}", a.position)).unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["balance"], 100);
    let metrics = p.get("/metrics").unwrap().1;
    assert!(metrics.contains("esk_projection_parked_total{projection=\"accounts\"} 2"), "{metrics}");
    let listed = env.esk().args(["dlq", "list", "accounts", "--json"]).run().ok();
    let parked: Vec<Value> = listed.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(parked.len(), 2, "{}", listed.stdout);
    assert!(parked[0]["reason"].as_str().unwrap().contains("undecodable"), "{parked:?}");
    assert!(parked[1]["reason"].as_str().unwrap().contains("schema"), "{parked:?}");
    assert_eq!(parked[1]["topic"], topic.as_str());
    assert!(parked[1]["offset"].as_i64().is_some());

    // The fix: a schema version that allows a note. Restart with it and replay.
    let schemas = tempfile::tempdir().unwrap();
    std::fs::create_dir(schemas.path().join("account")).unwrap();
    std::fs::write(
        schemas.path().join("account/Deposited.v1.json"),
        json!({"type": "object", "required": ["amount"],
               "properties": {"amount": {"type": "integer", "minimum": 1}, "note": {"type": "string"}}})
        .to_string(),
    )
    .unwrap();
    p.kill();
    p = projector(&env, data.path(), "0", &[("ESK_SCHEMAS_DIR", schemas.path().to_str().unwrap())]);
    let url = format!("http://{}", p.http);
    let run = env.esk().args(["dlq", "replay", "accounts", "--json", "--projector-url", &url]).run().ok();
    let report = run.json();
    assert_eq!(report["replayed"], 1, "{report}");
    assert_eq!(report["still_failing"].as_array().unwrap().len(), 1, "{report}");
    let balance =
        |p: &Service| serde_json::from_str::<Value>(&p.get("/accounts/p").unwrap().1).unwrap()["balance"].clone();
    assert_eq!(balance(&p), 107);
    // Once: a second replay applies nothing.
    let again = env.esk().args(["dlq", "replay", "accounts", "--json", "--projector-url", &url]).run().ok().json();
    assert_eq!(again["replayed"], 0);
    assert_eq!(again["already_replayed"], 1);
    assert_eq!(balance(&p), 107);
    // A rebuild applies the fixed event in order and parks the other again;
    // a replay after it applies nothing twice.
    let run = env.esk().args(["projection", "rebuild", "accounts", "--json", "--projector-url", &url]).run().ok();
    assert_eq!(run.json()["phase"], "switched", "{}", run.stdout);
    assert_eq!(balance(&p), 107, "the rebuilt model applied the fixed event once");
    let after = env.esk().args(["dlq", "replay", "accounts", "--json", "--projector-url", &url]).run().ok().json();
    assert_eq!(after["replayed"], 0, "{after}");
    assert_eq!(after["not_parked_here"], 1, "{after}");
    assert_eq!(after["still_failing"].as_array().unwrap().len(), 1, "the rebuild parked the undecodable one: {after}");
    assert_eq!(balance(&p), 107);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_under_queries_never_shows_a_half_built_model() {
    let (env, _w) = platform(2).await;
    let data = tempfile::tempdir().unwrap();
    let p = projector(&env, data.path(), "0", &[]);
    let client = Arc::new(env.client(Duration::from_secs(30), true));
    let n = 40;
    for i in 0..n {
        let s = format!("account-q{i}");
        client.command(&s, ExpectedVersion::NoStream, cmd("OpenAccount", json!({"owner": "q"})), None).await.unwrap();
        for d in 1..=10 {
            client.command(&s, ExpectedVersion::Any, cmd("Deposit", json!({"amount": d})), None).await.unwrap();
        }
    }
    let last =
        client.command("account-q0", ExpectedVersion::Any, cmd("Deposit", json!({"amount": 1})), None).await.unwrap();
    assert_eq!(p.get(&format!("/accounts/q0?after={}", last.position)).unwrap().0, 200);
    let before = model(&p);
    let stop = Arc::new(AtomicBool::new(false));
    let (queries, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let readers: Vec<_> = (0..2)
        .map(|k| {
            let (http, stop, before) = (p.http.clone(), stop.clone(), before.clone());
            let (queries, failures) = (queries.clone(), failures.clone());
            std::thread::spawn(move || {
                let mut i = k;
                while !stop.load(Ordering::SeqCst) {
                    let id = format!("q{}", i % n);
                    i += 1;
                    let ok = http_get(&http, &format!("/accounts/{id}")).is_some_and(|(code, body)| {
                        let doc: Value = serde_json::from_str(&body).unwrap_or_default();
                        code == 200 && doc["balance"].as_i64() == Some(before[&id].0)
                    });
                    queries.fetch_add(1, Ordering::SeqCst);
                    if !ok {
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    // Writes to other accounts go on during the rebuild.
    let writes = {
        let client = client.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                let s = format!("account-w{}", i % 10);
                if i < 10 {
                    client
                        .command(&s, ExpectedVersion::NoStream, cmd("OpenAccount", json!({"owner": "w"})), None)
                        .await
                        .unwrap();
                }
                client.command(&s, ExpectedVersion::Any, cmd("Deposit", json!({"amount": 3})), None).await.unwrap();
            }
        })
    };
    let url = format!("http://{}", p.http);
    let run = env.esk().args(["projection", "rebuild", "accounts", "--json", "--projector-url", &url]).run().ok();
    assert_eq!(run.json()["phase"], "switched");
    writes.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        r.join().unwrap();
    }
    let (q, f) = (queries.load(Ordering::SeqCst), failures.load(Ordering::SeqCst));
    println!("{q} queries during the rebuild, {f} failed or wrong");
    assert!(q > 50, "too few queries ran: {q}");
    assert_eq!(f, 0);
    let status = p.get_json("/status").unwrap();
    assert_eq!(status["projections"][0]["version"], 2, "{status}");
    let want = fold(&env);
    poll_until(Duration::from_secs(30), "the rebuilt model to equal the fold", || async {
        (model(&p) == want).then_some(())
    })
    .await;
    let after = model(&p);
    for (id, v) in &before {
        assert_eq!(after[id], *v, "{id} changed across the rebuild");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_queries_get_clear_4xx_errors() {
    let (env, _w) = platform(2).await;
    let data = tempfile::tempdir().unwrap();
    let p = projector(&env, data.path(), "0", &[]);
    let client = env.client(Duration::from_secs(30), false);
    let a = client
        .command("account-b", ExpectedVersion::NoStream, cmd("OpenAccount", json!({"owner": "b"})), None)
        .await
        .unwrap();
    assert_eq!(p.get(&format!("/accounts/b?after={}", a.position)).unwrap().0, 200);
    let cases = [
        ("/accounts/nobody", 404, "does not exist"),
        ("/accounts/b?after=garbage", 400, "not a position token"),
        ("/accounts/b?after=order:0:5", 400, "category 'order'"),
        ("/accounts/b?min_version=abc", 400, "not a whole number"),
        ("/accounts/b?timeout_ms=soon", 400, "timeout_ms"),
        ("/accounts/b%20c", 400, "not an account id"),
        ("/accounts?limit=0", 400, "limit"),
        ("/accounts?limit=x", 400, "limit"),
        ("/accounts/b?min_version=99&timeout_ms=200", 504, "did not reach version 99"),
        ("/nowhere", 404, "no such endpoint"),
    ];
    for (path, code, wanted) in cases {
        let (got, body) = p.get(path).unwrap();
        assert_eq!(got, code, "{path}: {body}");
        let doc: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path}: not JSON: {body}"));
        assert!(doc["message"].as_str().unwrap().contains(wanted), "{path}: {doc}");
        assert!(doc["error"].is_string());
    }
    let url = format!("http://{}", p.http);
    let run = env.esk().args(["projection", "rebuild", "nothing", "--projector-url", &url]).run().code(4);
    assert!(run.stderr.contains("no projection 'nothing'"), "{}", run.stderr);
    env.esk().args(["projection", "status", "--projector-url", "http://127.0.0.1:1"]).run().code(5);
    env.esk().args(["projection", "status", "--projector-url", "localhost:8702"]).run().code(4);
    let status = env.esk().args(["projection", "status", "--json", "--projector-url", &url]).run().ok().json();
    assert_eq!(status["projections"][0]["name"], "accounts");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_projector_instance_keeps_a_full_copy_and_honours_tokens() {
    let (env, _w) = platform(3).await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let p1 = projector(&env, d1.path(), "a", &[]);
    let p2 = projector(&env, d2.path(), "b", &[]);
    let client = env.client(Duration::from_secs(30), false);
    for i in 0..12 {
        let s = format!("account-s{i}");
        client.command(&s, ExpectedVersion::NoStream, cmd("OpenAccount", json!({"owner": "s"})), None).await.unwrap();
        let a = client.command(&s, ExpectedVersion::Any, cmd("Deposit", json!({"amount": i + 1})), None).await.unwrap();
        for p in [&p1, &p2] {
            let (code, body) = p.get(&format!("/accounts/s{i}?after={}", a.position)).unwrap();
            assert_eq!(code, 200, "{body}");
            assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["balance"], i + 1);
        }
    }
    assert_eq!(model(&p1), model(&p2));
    assert_eq!(model(&p1).len(), 12);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_an_admin_token_rebuild_and_replay_need_it_and_no_service_listens_beyond_loopback_without_one() {
    let (env, _w) = platform(2).await;
    let dir = tempfile::tempdir().unwrap();
    let p = projector(&env, dir.path(), "a", &[("ESK_ADMIN_TOKEN", "s3cret")]);
    let url = format!("http://{}", p.http);
    for args in [["projection", "rebuild", "accounts"], ["dlq", "replay", "accounts"]] {
        let run = env.esk().args(args).args(["--projector-url", &url]).env_remove("ESK_ADMIN_TOKEN").run().code(4);
        assert!(run.stderr.contains("ESK_ADMIN_TOKEN is not set"), "{args:?}: {run:#?}");
        let run = env.esk().args(args).args(["--projector-url", &url]).env("ESK_ADMIN_TOKEN", "wrong").run().code(4);
        assert!(run.stderr.contains("is not the service's"), "{args:?}: {run:#?}");
    }
    env.esk().args(["dlq", "replay", "accounts", "--projector-url", &url]).env("ESK_ADMIN_TOKEN", "s3cret").run().ok();
    env.esk()
        .args(["projection", "rebuild", "accounts", "--no-wait", "--projector-url", &url])
        .env("ESK_ADMIN_TOKEN", "s3cret")
        .run()
        .ok();
    // Reads need no token.
    assert_eq!(p.get("/status").unwrap().0, 200);

    // Beyond loopback without a token: refused before anything listens.
    for service in ["writer", "coordinator", "projector", "replica"] {
        let var = format!("ESK_{}_HTTP", service.to_uppercase());
        let mut s =
            Service::start(&env, service, &[(&var, "0.0.0.0:18999"), ("ESK_DATA_DIR", dir.path().to_str().unwrap())]);
        let code = tokio::task::block_in_place(|| s.exit_code(Duration::from_secs(30)));
        assert_eq!(code, Some(1), "esk-{service} on 0.0.0.0 did not stop: {}", s.log_tail());
        assert!(s.log_tail().contains("ESK_ADMIN_TOKEN"), "esk-{service}: {}", s.log_tail());
    }
}
