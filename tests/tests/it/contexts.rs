//! Bounded contexts (ADR 13) against a real broker: `payments` (the account
//! aggregate) and `inventory` (the inventory aggregate) as two services,
//! each with its own topics and writer group. Clients route by category
//! through the registry of contexts; one context's writer dying does not
//! stop the other's; 2PC spans them under SIGKILLs of every role.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use esk_client::ClientError;
use esk_tests::{Service, TestEnv, kill_each_once, poll_until, wait_serving};
use esk_wire::protocol::{ExpectedVersion, StreamRecord, TxState};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

use crate::coordinator::{cmd, coordinating, coordinator, latest, leg, legs, open, settled};

/// A writer of one built-in aggregate in its own context.
fn context_writer(env: &TestEnv, context: &str, aggregate: &str) -> Service {
    Service::start(
        env,
        "writer",
        &[("ESK_CONTEXT", context), ("ESK_WRITER_AGGREGATES", aggregate), ("ESK_WRITER_SESSION_TIMEOUT_MS", "6000")],
    )
}

/// An installation of `partitions` with the contexts `payments` and `inventory`.
fn two_contexts(partitions: u32) -> TestEnv {
    let env = TestEnv::new();
    env.init_topics(partitions);
    env.init_context("payments", partitions);
    env.init_context("inventory", partitions);
    env
}

async fn produce(p: &FutureProducer, topic: &str, key: &[u8], value: &[u8]) {
    p.send(FutureRecord::to(topic).partition(0).key(key).payload(value), Duration::from_secs(15))
        .await
        .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_route_by_category_and_fail_independently() {
    let env = two_contexts(2);
    let payments = context_writer(&env, "payments", "account");
    let mut inventory = context_writer(&env, "inventory", "inventory");
    let c = coordinator(&env, None);
    wait_serving(&[&payments, &inventory], 4, Duration::from_secs(60)).await;
    coordinating(&c, 2).await;
    let client = env.client(Duration::from_secs(20), false);
    open(&client, "account-ann", 100).await;
    client
        .command("inventory-tea", ExpectedVersion::NoStream, cmd("AddStock", json!({"quantity": 5})), None)
        .await
        .unwrap();

    // Each request went to its category's context, none to the default one.
    let t = env.topics();
    let keys = |topic: &str| -> HashSet<String> {
        env.read_topic(topic, false).into_iter().filter_map(|r| r.key).map(|k| String::from_utf8(k).unwrap()).collect()
    };
    assert_eq!(keys(&t.in_context("payments").commands()), HashSet::from(["account-ann".to_owned()]));
    assert_eq!(keys(&t.in_context("inventory").commands()), HashSet::from(["inventory-tea".to_owned()]));
    assert!(keys(&t.commands()).is_empty(), "nothing for the default context");

    // The CLI needs no flag for either context, a transaction across both included.
    env.esk().args(["command", "inventory-tea", "AddStock", r#"{"quantity": 1}"#]).run().ok();
    let file = tempfile::NamedTempFile::new().unwrap();
    let tx = json!({"participants": [
        {"stream": "account-ann", "command": "Withdraw", "data": {"amount": 30}},
        {"stream": "inventory-tea", "command": "Reserve", "data": {"quantity": 2}}]});
    std::fs::write(file.path(), tx.to_string()).unwrap();
    env.esk().args(["tx", "run", "--file", file.path().to_str().unwrap()]).run().ok();
    let read = env.esk().args(["--json", "read", "account-ann"]).run().ok();
    assert!(read.stdout.contains("Withdrawn"), "{}", read.stdout);
    let described = env.esk().args(["--json", "topics", "describe"]).run().ok().json();
    let contexts: BTreeMap<String, Value> = described["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["context"].as_str().unwrap().to_owned(), c["categories"].clone()))
        .collect();
    assert_eq!(contexts["payments"], json!(["account"]), "{described}");
    assert_eq!(contexts["inventory"], json!(["inventory"]), "{described}");
    assert!(described["missing"].as_array().unwrap().is_empty(), "{described}");

    // Forged records on the registry change nothing: the first claim stands.
    let raw: FutureProducer =
        env.kafka().producer(esk_kafka::Sending::Foreign { max_message_bytes: 2_000_000 }).create().unwrap();
    let steal = json!({"context": "inventory", "at_ms": 1, "by": "a forger"}).to_string();
    produce(&raw, &t.contexts(), b"account", steal.as_bytes()).await;
    produce(&raw, &t.contexts(), b"account", b"\xff\x00 not json").await;
    produce(&raw, &t.contexts(), b"NOT A CATEGORY", b"{}").await;
    let late = env.client(Duration::from_secs(20), false);
    assert_eq!(late.context_of("account"), "payments");
    late.command("account-ann", ExpectedVersion::Any, cmd("Deposit", json!({"amount": 1})), None).await.unwrap();

    // Another context cannot take a category one has: that writer stops at
    // start, naming the owner, and nothing changes.
    env.init_context("shop", 2);
    let mut thief = context_writer(&env, "shop", "account");
    let code = thief.exit_code(Duration::from_secs(60));
    assert!(code.is_some_and(|c| c != 0), "a writer claiming another context's category must stop: {code:?}");
    assert!(thief.log_tail().contains("belongs to context 'payments'"), "{}", thief.log_tail());

    // inventory's writer dies: payments serves on, at its usual pace.
    inventory.signal("KILL");
    assert_eq!(inventory.exit_code(Duration::from_secs(10)), None, "killed by a signal");
    for i in 0..5 {
        let began = Instant::now();
        let deposit = cmd("Deposit", json!({"amount": 1}));
        client.command("account-ann", ExpectedVersion::Any, deposit, Some(format!("d{i}"))).await.unwrap();
        assert!(began.elapsed() < Duration::from_secs(10), "payments waited on inventory: {:?}", began.elapsed());
    }
    let short = env.client(Duration::from_secs(3), false);
    let stalled = short.command("inventory-tea", ExpectedVersion::Any, cmd("AddStock", json!({"quantity": 1})), None);
    assert!(matches!(stalled.await, Err(ClientError::Unavailable(_))), "nobody serves inventory now");

    // Restarted on its own, inventory serves again; payments never stopped.
    let inventory = context_writer(&env, "inventory", "inventory");
    wait_serving(&[&payments, &inventory], 4, Duration::from_secs(60)).await;
    client.command("inventory-tea", ExpectedVersion::Any, cmd("AddStock", json!({"quantity": 1})), None).await.unwrap();
    let states: BTreeMap<String, StreamRecord> = latest(&env, &t.in_context("payments").state());
    assert_eq!(states["account-ann"].state.as_ref().unwrap()["balance"], 100 - 30 + 1 + 5);
    assert!(latest::<StreamRecord>(&env, &t.state()).is_empty(), "the default context wrote nothing");
}

/// The roles of the chaos run, each SIGKILLed and started again at random.
struct Roles {
    env: TestEnv,
    payments: Mutex<Option<Service>>,
    inventory: Mutex<Option<Service>>,
    coordinator: Mutex<Option<Service>>,
    projector: Mutex<Option<(Service, std::path::PathBuf)>>,
}

impl Roles {
    fn kill_and_restart(&self, which: usize) {
        let again = |slot: &Mutex<Option<Service>>, start: &dyn Fn() -> Service| {
            let mut s = slot.lock().unwrap();
            s.take().unwrap().kill();
            *s = Some(start());
        };
        match which {
            0 => again(&self.coordinator, &|| coordinator(&self.env, None)),
            1 => again(&self.payments, &|| context_writer(&self.env, "payments", "account")),
            2 => again(&self.inventory, &|| context_writer(&self.env, "inventory", "inventory")),
            _ => {
                let mut p = self.projector.lock().unwrap();
                let (old, dir) = p.take().unwrap();
                old.kill();
                let dir_s = dir.to_string_lossy().into_owned();
                *p = Some((Service::start(&self.env, "projector", &[("ESK_DATA_DIR", &dir_s)]), dir));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_across_two_contexts_is_all_or_nothing_under_chaos() {
    let env = two_contexts(3);
    let payments = context_writer(&env, "payments", "account");
    let inventory = context_writer(&env, "inventory", "inventory");
    let c = coordinator(&env, None);
    wait_serving(&[&payments, &inventory], 6, Duration::from_secs(60)).await;
    coordinating(&c, 3).await;
    let data = tempfile::tempdir().unwrap();
    let projector = Service::start(&env, "projector", &[("ESK_DATA_DIR", data.path().to_str().unwrap())]);
    let client = Arc::new(env.client(Duration::from_secs(10), false));
    let (buyers, budget, skus, stock) = (6u64, 400i64, 3u64, 40i64);
    for b in 0..buyers {
        open(&client, &format!("account-buyer{b}"), budget).await;
    }
    for s in 0..skus {
        let add = cmd("AddStock", json!({"quantity": stock}));
        client.command(&format!("inventory-sku{s}"), ExpectedVersion::NoStream, add, None).await.unwrap();
    }
    let roles = Arc::new(Roles {
        env: env.clone(),
        payments: Mutex::new(Some(payments)),
        inventory: Mutex::new(Some(inventory)),
        coordinator: Mutex::new(Some(c)),
        projector: Mutex::new(Some((projector, data.path().to_owned()))),
    });
    // Every role is killed once, in an order and at moments of chance.
    let over = Arc::new(AtomicBool::new(false));
    let chaos = {
        let roles = roles.clone();
        kill_each_once(4, over.clone(), move |which| {
            roles.kill_and_restart(which);
        })
    };
    let runs: Vec<_> = (0..6u64)
        .map(|k| {
            let (client, over) = (client.clone(), over.clone());
            tokio::spawn(async move {
                let mut done = Vec::new();
                let mut round = 0u64;
                // Until every role was killed once, and at least 20 purchases.
                while round < 20 || (round < 400 && !over.load(Ordering::SeqCst)) {
                    let buyer = format!("account-buyer{}", (k + round) % buyers);
                    let sku = format!("inventory-sku{}", (k * 7 + round) % skus);
                    let (amount, quantity) = (1 + ((k + round) % 9) as i64, 1 + (round % 3) as i64);
                    let txid = uuid::Uuid::new_v4().to_string();
                    let legs = vec![
                        leg(&buyer, "Withdraw", json!({"amount": amount})),
                        leg(&sku, "Reserve", json!({"quantity": quantity})),
                    ];
                    done.push((txid.clone(), client.transact(&txid, legs, Duration::from_secs(5)).await));
                    round += 1;
                }
                done
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for r in runs {
        outcomes.extend(r.await.unwrap());
    }
    let killed = chaos.join().unwrap();
    println!("killed (0 coordinator, 1 payments, 2 inventory, 3 projector): {killed:?}; {} purchases", outcomes.len());

    // No transaction in doubt; each committed one has both legs, the others none.
    let log = settled(&env, Duration::from_secs(120)).await;
    let found = legs(&env);
    let (mut spent, mut reserved): (BTreeMap<String, i64>, BTreeMap<String, i64>) = Default::default();
    let mut committed = 0;
    for (txid, outcome) in &outcomes {
        let state = log.get(txid).map(|r| r.state);
        let mine = found.get(txid).cloned().unwrap_or_default();
        if state == Some(TxState::Committed) {
            committed += 1;
            let types: HashSet<&str> = mine.iter().map(|(_, t, _)| t.as_str()).collect();
            assert_eq!((mine.len(), types), (2, HashSet::from(["Withdrawn", "StockReserved"])), "{txid}: {mine:?}");
            for (stream, ty, n) in &mine {
                let sum = if ty == "Withdrawn" { &mut spent } else { &mut reserved };
                *sum.entry(stream.clone()).or_default() += n;
            }
        } else {
            assert!(mine.is_empty(), "{txid} ({state:?}) has legs: {mine:?}");
        }
        if let Ok(s) = outcome {
            let want = if s.outcome == "committed" { TxState::Committed } else { TxState::Aborted };
            assert_eq!(state, Some(want), "{txid}: the client was told {}", s.outcome);
        }
    }
    println!("{committed} of {} committed", outcomes.len());
    assert!(committed > 0, "nothing committed");

    // Every balance and every stock exact, no hold left, in each context's state...
    let t = env.topics();
    let accounts: BTreeMap<String, StreamRecord> = latest(&env, &t.in_context("payments").state());
    let items: BTreeMap<String, StreamRecord> = latest(&env, &t.in_context("inventory").state());
    for b in 0..buyers {
        let id = format!("account-buyer{b}");
        let s = accounts[&id].state.clone().unwrap();
        assert_eq!(s["balance"].as_i64().unwrap(), budget - spent.get(&id).copied().unwrap_or(0), "{id}: {s}");
        assert!(accounts[&id].holds.is_empty(), "{id} still holds: {:?}", accounts[&id].holds);
    }
    for k in 0..skus {
        let id = format!("inventory-sku{k}");
        let s = items[&id].state.clone().unwrap();
        assert_eq!(s["stock"].as_i64().unwrap(), stock - reserved.get(&id).copied().unwrap_or(0), "{id}: {s}");
        assert!(items[&id].holds.is_empty(), "{id} still holds: {:?}", items[&id].holds);
    }
    // ...and in the projector's model of the accounts.
    let (p, _) = roles.projector.lock().unwrap().take().unwrap();
    poll_until(Duration::from_secs(60), "the projector to hold the same balances", || async {
        let (code, body) = p.get("/accounts?limit=1000")?;
        let doc: Value = serde_json::from_str(&body).ok()?;
        let rows = doc["accounts"].as_array()?.clone();
        let same = code == 200
            && rows.len() == buyers as usize
            && rows.iter().all(|a| {
                let s = accounts[&format!("account-{}", a["id"].as_str().unwrap())].state.clone().unwrap();
                a["balance"] == s["balance"] && a["available"] == s["balance"]
            });
        same.then_some(())
    })
    .await;
}

/// No category is esk's alone: a context's writer that takes raw appends to
/// `account` (no built-in aggregate there) holds them to its own schemas, not
/// to esk's shipped ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_category_named_like_a_built_in_one_is_a_context_s_own() {
    let env = TestEnv::new();
    env.init_topics(1);
    env.init_context("ledger", 1);
    let ledger = Service::start(
        &env,
        "writer",
        &[("ESK_CONTEXT", "ledger"), ("ESK_WRITER_AGGREGATES", "none"), ("ESK_WRITER_CATEGORIES", "account")],
    );
    wait_serving(&[&ledger], 1, Duration::from_secs(60)).await;
    let client = env.client(Duration::from_secs(20), false);
    assert_eq!(client.context_of("account"), "ledger");
    let event = esk_wire::protocol::NewEvent { id: None, event_type: "Booked".into(), data: json!({"cents": 5}) };
    let a = client.append("account-1", ExpectedVersion::NoStream, vec![event], None).await.unwrap();
    assert_eq!(a.first_version, 1, "an event type esk's account schemas do not know, taken");
    let events = env.all_events("account");
    assert_eq!(events[0].2.event_type, "Booked");
}
