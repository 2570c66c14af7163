//! Replicas and hot standbys against a real broker; surviving a broker's death
//! on the 3-node cluster.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use esk_tests::{Cluster, Service, TestEnv, poll_until, wait_serving};
use esk_wire::protocol::{CommandData, ExpectedVersion, NewEvent, StreamRecord};
use serde_json::{Value, json};

use crate::writer::{load, verify_load};

fn replica(env: &TestEnv, data: &std::path::Path, instance: &str) -> Service {
    let r =
        Service::start(env, "replica", &[("ESK_DATA_DIR", data.to_str().unwrap()), ("ESK_REPLICA_INSTANCE", instance)]);
    let started = Instant::now();
    while r.get("/health").is_none() {
        assert!(started.elapsed() < Duration::from_secs(30), "replica did not start: {}", r.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    r
}

fn writer(env: &TestEnv, standby: bool) -> Service {
    let standby = if standby { "true" } else { "false" };
    Service::start(env, "writer", &[("ESK_WRITER_SESSION_TIMEOUT_MS", "6000"), ("ESK_WRITER_STANDBY", standby)])
}

/// The writers' state: the last record of every stream in the leader topic.
fn leader_state(env: &TestEnv) -> BTreeMap<String, (u64, Option<Value>)> {
    let mut out = BTreeMap::new();
    for r in env.read_topic(&env.topics().state(), true) {
        if let Some(Ok(rec)) = r.value.as_deref().map(serde_json::from_slice::<StreamRecord>) {
            out.insert(rec.stream.clone(), (rec.version, rec.state));
        }
    }
    out
}

/// Every stream as a replica shows it.
fn replica_view(r: &Service, streams: impl Iterator<Item = String>) -> BTreeMap<String, (u64, Option<Value>)> {
    streams
        .filter_map(|s| {
            let (code, body) = r.get(&format!("/streams/{s}"))?;
            if code != 200 {
                return None;
            }
            let doc: Value = serde_json::from_str(&body).ok()?;
            let state = if doc["state"].is_null() { None } else { Some(doc["state"].clone()) };
            Some((s, (doc["version"].as_u64()?, state)))
        })
        .collect()
}

async fn converged(env: &TestEnv, r: &Service, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let want = leader_state(env);
        let got = replica_view(r, want.keys().cloned());
        if got == want {
            return;
        }
        if Instant::now() > deadline {
            let diff: Vec<_> = want.iter().filter(|(k, v)| got.get(*k) != Some(v)).take(5).collect();
            panic!(
                "replica differs from the writers' state on {} streams, e.g. {diff:?}",
                want.iter().filter(|(k, v)| got.get(*k) != Some(v)).count()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_killed_at_random_under_load_converges_to_the_writers_state() {
    let env = TestEnv::new();
    env.init_topics(3);
    let w = writer(&env, true);
    wait_serving(&[&w], 3, Duration::from_secs(60)).await;
    let data = tempfile::tempdir().unwrap();
    let mut r = replica(&env, data.path(), "0");
    let client = Arc::new(env.client(Duration::from_secs(30), true));
    for i in 0..10 {
        let c = CommandData { command_type: "OpenAccount".into(), data: json!({"owner": "r"}) };
        client.command(&format!("account-rp{i}"), ExpectedVersion::NoStream, c, None).await.unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let raw = tokio::spawn(load(client.clone(), "follow", 12, stop.clone()));
    let commands = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let c = CommandData { command_type: "Deposit".into(), data: json!({"amount": 1 + n % 9}) };
                let _ = client.command(&format!("account-rp{}", n % 10), ExpectedVersion::Any, c, None).await;
                n += 1;
            }
        })
    };
    for pause in [700, 1300, 900] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        r.kill();
        r = replica(&env, data.path(), "0");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    raw.await.unwrap();
    commands.await.unwrap();
    converged(&env, &r, Duration::from_secs(60)).await;
    // The lag is sampled every second.
    poll_until(Duration::from_secs(20), "the replica's sampled lag to reach 0", || async {
        r.get_json("/status").filter(|s| s["lag_records"] == 0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_give_monotonic_reads_on_every_replica_and_aborted_writes_never_show() {
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
    let env = TestEnv::new();
    env.init_topics(2);
    let w = writer(&env, true);
    wait_serving(&[&w], 2, Duration::from_secs(60)).await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (r1, r2) = (replica(&env, d1.path(), "a"), replica(&env, d2.path(), "b"));
    let client = env.client(Duration::from_secs(30), false);
    // A transaction on the leader topic that aborts: no replica may show it.
    let producer: FutureProducer =
        env.kafka().transactional_producer(&env.id("aborter"), Duration::from_secs(30)).create().unwrap();
    let fake = json!({"stream": "note-m", "version": 999, "last_offset": 999_999});
    tokio::task::block_in_place(|| {
        producer.init_transactions(Duration::from_secs(30)).unwrap();
        producer.begin_transaction().unwrap();
    });
    producer
        .send(FutureRecord::to(&env.topics().state()).key("note-m").payload(&fake.to_string()), Duration::from_secs(10))
        .await
        .unwrap();
    tokio::task::block_in_place(|| producer.abort_transaction(Duration::from_secs(30))).unwrap();
    let mut last = 0;
    for round in 0..60 {
        let a = client
            .append(
                "note-m",
                ExpectedVersion::Any,
                vec![NewEvent { id: None, event_type: "Noted".into(), data: json!({"n": round}) }],
                None,
            )
            .await
            .unwrap();
        // Read from one replica or the other, always with the last token seen.
        let r = if round % 2 == 0 { &r1 } else { &r2 };
        let (code, body) = r.get(&format!("/streams/note-m?after={}", a.position)).unwrap();
        assert_eq!(code, 200, "{body}");
        let v = serde_json::from_str::<Value>(&body).unwrap()["version"].as_u64().unwrap();
        assert!(
            v >= a.last_version && v >= last,
            "round {round}: version {v} after seeing {last} (wanted {})",
            a.last_version
        );
        assert_ne!(v, 999, "an aborted write showed");
        last = v;
        let other = if round % 2 == 0 { &r2 } else { &r1 };
        let (code, body) = other.get(&format!("/streams/note-m?min_version={last}")).unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(serde_json::from_str::<Value>(&body).unwrap()["version"].as_u64().unwrap() >= last);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_replica_queries_get_clear_4xx_errors() {
    let env = TestEnv::new();
    env.init_topics(2);
    let w = writer(&env, false);
    wait_serving(&[&w], 2, Duration::from_secs(60)).await;
    let data = tempfile::tempdir().unwrap();
    let r = replica(&env, data.path(), "0");
    let client = env.client(Duration::from_secs(30), false);
    let a = client
        .append(
            "note-q",
            ExpectedVersion::Any,
            vec![NewEvent { id: None, event_type: "Noted".into(), data: json!({}) }],
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.get(&format!("/streams/note-q?after={}", a.position)).unwrap().0, 200);
    for (path, code, wanted) in [
        ("/streams/note-nobody", 404, "does not exist"),
        ("/streams/nocategory", 400, "no category"),
        ("/streams/note-q?after=rubbish", 400, "not a position token"),
        ("/streams/note-q?min_version=x", 400, "not a whole number"),
        ("/streams/note-q?timeout_ms=later", 400, "timeout_ms"),
        ("/streams/note-q?min_version=50&timeout_ms=200", 504, "did not reach version 50"),
        ("/streams/note-q?after=note:0:999999&timeout_ms=200", 504, "has not applied"),
        ("/elsewhere", 404, "no such endpoint"),
    ] {
        let (got, body) = r.get(path).unwrap();
        assert_eq!(got, code, "{path}: {body}");
        let doc: Value = serde_json::from_str(&body).unwrap();
        assert!(doc["message"].as_str().unwrap().contains(wanted), "{path}: {doc}");
    }
    let url = format!("http://{}", r.http);
    let status = env.esk().args(["replica", "status", "--json", "--replica-urls", &url]).run().ok().json();
    assert_eq!(status["replicas"][0]["status"]["instance"], "0");
    env.esk().args(["replica", "status", "--replica-urls", "http://127.0.0.1:1"]).run().code(5);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_writer_serves_a_taken_partition_within_the_session_timeout_plus_a_second() {
    // It measures time: the machine to itself.
    let env = TestEnv::exclusive();
    env.init_topics_sharded(2, 2);
    let a = writer(&env, true);
    wait_serving(&[&a], 2, Duration::from_secs(60)).await;
    let b = writer(&env, true);
    let serving = |w: &Service| w.get_json("/health").map_or(0, |h| h["partitions_serving"].as_u64().unwrap_or(0));
    poll_until(Duration::from_secs(60), "both writers to serve", || async {
        (serving(&a) == 1 && serving(&b) == 1).then_some(())
    })
    .await;
    // A stream in the partition `a` owns.
    let owned: Vec<i64> =
        a.get_json("/status").unwrap()["partitions"].as_object().unwrap().keys().map(|k| k.parse().unwrap()).collect();
    let stream = (0..)
        .map(|i| format!("note-sb{i}"))
        .find(|s| i64::from(esk_wire::partition::partition_for(s.as_bytes(), 2)) == owned[0])
        .unwrap();
    let client = env.client(Duration::from_secs(30), false);
    let append = |v: u64| {
        let stream = stream.clone();
        let client = &client;
        async move {
            client
                .append(
                    &stream,
                    ExpectedVersion::Exact(v),
                    vec![NewEvent { id: None, event_type: "Noted".into(), data: json!({"v": v}) }],
                    None,
                )
                .await
        }
    };
    for v in 0..20 {
        append(v).await.unwrap();
    }
    // A frozen old writer must write nothing after the takeover.
    a.signal("STOP");
    let frozen_at = Instant::now();
    let frozen_utc = chrono::Utc::now();
    append(20).await.expect("the standby serves the partition");
    let took = frozen_at.elapsed();
    println!("frozen owner at {frozen_utc} -> next append served by the standby: {took:?} (session timeout 6 s)");
    assert!(
        took < Duration::from_millis(7000),
        "{took:?}, frozen at {frozen_utc}; the standby's log:\n{}",
        b.log_tail()
    );
    for v in 21..30 {
        append(v).await.unwrap();
    }
    a.signal("CONT");
    tokio::time::sleep(Duration::from_secs(3)).await;
    for v in 30..35 {
        append(v).await.unwrap();
    }
    let log = crate::writer::checked_log(&env, "note");
    assert_eq!(log[&stream].len(), 35, "versions continue without gaps or duplicates");
    drop(b);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_platform_rides_through_a_broker_death_on_three_nodes() {
    let pass = Arc::new(esk_tests::exclusive());
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap().unwrap();
    let env = TestEnv::with(&cluster.bootstrap(), pass);
    let init = env.esk().args(["topics", "init", "--partitions", "3", "--json", "--timeout", "30s"]).run().ok().json();
    assert_eq!(init["replication_factor"], 3);
    let w = writer(&env, true);
    wait_serving(&[&w], 3, Duration::from_secs(90)).await;
    let (dr, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let r = replica(&env, dr.path(), "0");
    let p = Service::start(&env, "projector", &[("ESK_DATA_DIR", dp.path().to_str().unwrap())]);
    let client = Arc::new(env.client(Duration::from_secs(60), true));
    for i in 0..5 {
        let c = CommandData { command_type: "OpenAccount".into(), data: json!({"owner": "ride"}) };
        client.command(&format!("account-ride{i}"), ExpectedVersion::NoStream, c, None).await.unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let appends = tokio::spawn(load(client.clone(), "ride", 8, stop.clone()));
    let deposits = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let c = CommandData { command_type: "Deposit".into(), data: json!({"amount": 1}) };
                if client.command(&format!("account-ride{}", n % 5), ExpectedVersion::Any, c, None).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                n += 1;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let victim = 2;
    tokio::task::block_in_place(|| cluster.kill(victim)).unwrap();
    tokio::time::sleep(Duration::from_secs(8)).await;
    tokio::task::block_in_place(|| cluster.restart(victim)).unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::SeqCst);
    let sent = appends.await.unwrap();
    deposits.await.unwrap();
    let ok = sent.iter().filter(|s| s.result.is_ok()).count();
    println!("{ok} of {} appends acknowledged across the broker's death", sent.len());
    verify_load(&env, "ride", &sent).await;
    // The services were never restarted; the replica and the projector converge.
    let mut w = w;
    assert!(w.running(), "the writer died: {}", w.log_tail());
    converged(&env, &r, Duration::from_secs(90)).await;
    let balances: BTreeMap<String, Value> = leader_state(&env)
        .into_iter()
        .filter(|(k, _)| k.starts_with("account-"))
        .map(|(k, (_, s))| (k.trim_start_matches("account-").to_owned(), s.unwrap()["balance"].clone()))
        .collect();
    assert_eq!(balances.len(), 5);
    poll_until(Duration::from_secs(60), "the projector to hold the writers' balances", || async {
        let (code, body) = p.get("/accounts?limit=100")?;
        let doc: Value = serde_json::from_str(&body).ok()?;
        let got: BTreeMap<String, Value> = doc["accounts"]
            .as_array()?
            .iter()
            .map(|a| (a["id"].as_str().unwrap_or_default().to_owned(), a["balance"].clone()))
            .collect();
        (code == 200 && got == balances).then_some(())
    })
    .await;
}
