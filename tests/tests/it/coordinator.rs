//! The coordinator against a real broker: the bank test under chaos, targeted
//! crash points, a transaction across accounts and inventory, bad input.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use esk_client::{Client, ClientError};
use esk_tests::{Service, TestEnv, poll_until, wait_serving};
use esk_wire::protocol::{CONSUMED_KEY, CommandData, ExpectedVersion, Participant, StreamRecord, TxRecord, TxState};
use serde_json::{Value, json};

const SESSION: &str = "6000";

fn writer(env: &TestEnv, fault: Option<&str>) -> Service {
    let mut vars = vec![("ESK_WRITER_SESSION_TIMEOUT_MS", SESSION)];
    if let Some(f) = fault {
        vars.push(("ESK_FAULT", f));
    }
    Service::start(env, "writer", &vars)
}

pub(crate) fn coordinator(env: &TestEnv, fault: Option<&str>) -> Service {
    let mut vars = vec![("ESK_COORDINATOR_SESSION_TIMEOUT_MS", SESSION), ("ESK_COORDINATOR_RESEND_MS", "1000")];
    if let Some(f) = fault {
        vars.push(("ESK_FAULT", f));
    }
    Service::start(env, "coordinator", &vars)
}

pub(crate) async fn coordinating(c: &Service, partitions: u64) {
    poll_until(Duration::from_secs(60), "the coordinator to own every partition", || async {
        c.get_json("/health").filter(|h| h["partitions_owned"] == partitions).map(|_| ())
    })
    .await;
}

/// A writer and a coordinator without faults, serving every partition.
async fn writer_and_coordinator(env: &TestEnv, partitions: u64) -> (Service, Service) {
    let w = writer(env, None);
    let c = coordinator(env, None);
    wait_serving(&[&w], partitions, Duration::from_secs(60)).await;
    coordinating(&c, partitions).await;
    (w, c)
}

pub(crate) fn cmd(ty: &str, data: Value) -> CommandData {
    CommandData { command_type: ty.into(), data }
}

pub(crate) fn leg(stream: &str, ty: &str, data: Value) -> Participant {
    Participant { stream: stream.into(), command: cmd(ty, data) }
}

fn transfer_legs(from: &str, to: &str, amount: i64) -> Vec<Participant> {
    vec![leg(from, "Withdraw", json!({"amount": amount})), leg(to, "Deposit", json!({"amount": amount}))]
}

pub(crate) async fn open(client: &Client, stream: &str, deposit: i64) {
    client.command(stream, ExpectedVersion::NoStream, cmd("OpenAccount", json!({"owner": "t"})), None).await.unwrap();
    if deposit > 0 {
        client.command(stream, ExpectedVersion::Any, cmd("Deposit", json!({"amount": deposit})), None).await.unwrap();
    }
}

/// The last record of every key of a compacted topic.
pub(crate) fn latest<T: serde::de::DeserializeOwned>(env: &TestEnv, topic: &str) -> BTreeMap<String, T> {
    let mut out = BTreeMap::new();
    for r in env.read_topic(topic, true) {
        let (Some(k), Some(v)) = (r.key, r.value) else { continue };
        if let Ok(v) = serde_json::from_slice(&v) {
            out.insert(String::from_utf8_lossy(&k).into_owned(), v);
        }
    }
    out
}

/// Waits until every transaction in the log is decided and acknowledged; returns them.
pub(crate) async fn settled(env: &TestEnv, timeout: Duration) -> BTreeMap<String, TxRecord> {
    let deadline = Instant::now() + timeout;
    loop {
        let log: BTreeMap<String, TxRecord> = latest(env, &env.topics().tx_log());
        let open: Vec<_> = log
            .values()
            .filter(|r| !matches!(r.state, TxState::Committed | TxState::Aborted))
            .map(|r| (&r.txid, r.state))
            .collect();
        if open.is_empty() {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "transactions still open after {timeout:?}: {:?}",
            &open[..open.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The 2PC legs in the event logs: txid -> [(stream, event type, amount or quantity)].
pub(crate) fn legs(env: &TestEnv) -> HashMap<String, Vec<(String, String, i64)>> {
    let mut out: HashMap<String, Vec<(String, String, i64)>> = HashMap::new();
    for category in ["account", "inventory"] {
        for (_, _, e) in env.all_events(category) {
            let applied = matches!(e.event_type.as_str(), "Withdrawn" | "Deposited" | "StockReserved");
            if let (true, Some(txid)) = (applied, e.data["txid"].as_str()) {
                let n = e.data["amount"].as_i64().or(e.data["quantity"].as_i64()).unwrap_or(0);
                out.entry(txid.to_owned()).or_default().push((e.stream.to_string(), e.event_type.clone(), n));
            }
        }
    }
    out
}

/// Account states as the writers hold them (their last state records).
fn writer_accounts(env: &TestEnv) -> BTreeMap<String, Value> {
    latest::<StreamRecord>(env, &env.topics().state())
        .into_iter()
        .filter(|(k, _)| k.starts_with("account-"))
        .filter_map(|(k, r)| r.state.map(|s| (k, s)))
        .collect()
}

struct Roles {
    env: TestEnv,
    writer: Mutex<Option<Service>>,
    coordinator: Mutex<Option<Service>>,
    projector: Mutex<Option<(Service, std::path::PathBuf)>>,
}

impl Roles {
    /// SIGKILLs one role and starts it again at once.
    fn kill_and_restart(&self, which: u64) -> &'static str {
        match which % 3 {
            0 => {
                let mut c = self.coordinator.lock().unwrap();
                c.take().unwrap().kill();
                *c = Some(coordinator(&self.env, None));
                "coordinator"
            }
            1 => {
                let mut w = self.writer.lock().unwrap();
                w.take().unwrap().kill();
                *w = Some(writer(&self.env, None));
                "writer"
            }
            _ => {
                let mut p = self.projector.lock().unwrap();
                let (old, dir) = p.take().unwrap();
                old.kill();
                let dir_s = dir.to_string_lossy().into_owned();
                *p = Some((Service::start(&self.env, "projector", &[("ESK_DATA_DIR", &dir_s)]), dir));
                "projector"
            }
        }
    }
}

/// SIGKILLs and restarts roles at random moments until `stop`, at most `max` times.
fn chaos(
    roles: Arc<Roles>,
    stop: Arc<AtomicBool>,
    only: &'static [u64],
    max: usize,
) -> std::thread::JoinHandle<Vec<&'static str>> {
    std::thread::spawn(move || {
        let mut seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
        println!("chaos seed {seed}");
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut killed = Vec::new();
        while !stop.load(Ordering::SeqCst) && killed.len() < max {
            std::thread::sleep(Duration::from_millis(1500 + next() % 2500));
            if stop.load(Ordering::SeqCst) {
                break;
            }
            killed.push(roles.kill_and_restart(only[(next() % only.len() as u64) as usize]));
        }
        killed
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bank_test_conserves_money_under_chaos() {
    let env = TestEnv::new();
    env.init_topics(3);
    let (w, c) = writer_and_coordinator(&env, 3).await;
    let data = tempfile::tempdir().unwrap();
    let p = Service::start(&env, "projector", &[("ESK_DATA_DIR", data.path().to_str().unwrap())]);
    let client = Arc::new(env.client(Duration::from_secs(10), false));
    let (accounts, initial) = (20, 1000i64);
    for i in 0..accounts {
        open(&client, &format!("account-bank{i}"), initial).await;
    }
    let roles = Arc::new(Roles {
        env: env.clone(),
        writer: Mutex::new(Some(w)),
        coordinator: Mutex::new(Some(c)),
        projector: Mutex::new(Some((p, data.path().to_owned()))),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let chaos = chaos(roles.clone(), stop.clone(), &[0, 1, 2], 6);
    let clients: Vec<_> = (0..8u64)
        .map(|k| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut rng = (k + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let mut next = move |n: u64| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % n
                };
                let mut done = Vec::new();
                for _ in 0..250 {
                    let from = next(accounts);
                    let to = (from + 1 + next(accounts - 1)) % accounts;
                    let amount = 1 + next(400) as i64;
                    let txid = uuid::Uuid::new_v4().to_string();
                    let legs = transfer_legs(&format!("account-bank{from}"), &format!("account-bank{to}"), amount);
                    let outcome = client.transact(&txid, legs, Duration::from_secs(5)).await;
                    done.push((txid, outcome));
                }
                done
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for c in clients {
        outcomes.extend(c.await.unwrap());
    }
    stop.store(true, Ordering::SeqCst);
    let killed = chaos.join().unwrap();
    println!("killed during the run: {killed:?}");
    let committed = outcomes.iter().filter(|(_, o)| matches!(o, Ok(s) if s.outcome == "committed")).count();
    let aborted = outcomes.iter().filter(|(_, o)| matches!(o, Ok(s) if s.outcome == "aborted")).count();
    let unknown = outcomes.iter().filter(|(_, o)| matches!(o, Err(ClientError::Unavailable(_)))).count();
    println!("{committed} committed, {aborted} aborted, {unknown} without an outcome at the client");
    assert_eq!(committed + aborted + unknown, outcomes.len(), "only timeouts may fail");
    assert!(committed > 100 && aborted > 0, "the run needs both outcomes");

    // No transaction stays undecided past its deadline plus recovery.
    let log = settled(&env, Duration::from_secs(90)).await;
    let legs = legs(&env);
    for (txid, outcome) in &outcomes {
        let in_log = log.get(txid).map(|r| r.state);
        let found = legs.get(txid).cloned().unwrap_or_default();
        match in_log {
            Some(TxState::Committed) => {
                let types: HashSet<&str> = found.iter().map(|(_, t, _)| t.as_str()).collect();
                assert_eq!(found.len(), 2, "{txid}: a committed transfer has exactly its two legs: {found:?}");
                assert_eq!(types, HashSet::from(["Withdrawn", "Deposited"]));
                assert_eq!(found[0].2, found[1].2);
            }
            _ => assert!(found.is_empty(), "{txid} ({in_log:?}) has legs: {found:?}"),
        }
        if let Ok(s) = outcome {
            let want = if s.outcome == "committed" { TxState::Committed } else { TxState::Aborted };
            assert_eq!(in_log, Some(want), "{txid}: the client was told {}", s.outcome);
        }
    }
    // Money is neither created nor destroyed, in the writers' state...
    let states = writer_accounts(&env);
    assert_eq!(states.len(), accounts as usize);
    let total: i64 = states.values().map(|s| s["balance"].as_i64().unwrap()).sum();
    assert_eq!(total, initial * accounts as i64, "the writers' total changed");
    for (k, s) in &states {
        assert!(s["balance"].as_i64().unwrap() >= 0, "{k} is negative: {s}");
        assert!(s.get("holds").is_none_or(|h| h.as_object().is_some_and(|m| m.is_empty())), "{k} still holds: {s}");
    }
    // ...and in the projector's model.
    let (p, _) = roles.projector.lock().unwrap().take().unwrap();
    poll_until(Duration::from_secs(60), "the projector to hold the same balances", || async {
        let (code, body) = p.get("/accounts?limit=1000")?;
        let doc: Value = serde_json::from_str(&body).ok()?;
        let rows = doc["accounts"].as_array()?.clone();
        let same = code == 200
            && rows.len() == accounts as usize
            && rows.iter().all(|a| {
                let s = &states[&format!("account-{}", a["id"].as_str().unwrap())];
                a["balance"] == s["balance"] && a["available"] == s["balance"]
            });
        same.then_some(())
    })
    .await;
}

/// Opens two accounts and runs one transfer with a fault armed somewhere.
async fn crash_point(role: &str, fault: &str) {
    let env = TestEnv::new();
    env.init_topics(2);
    let (wf, cf) = if role == "writer" { (Some(fault), None) } else { (None, Some(fault)) };
    let mut w = writer(&env, None);
    wait_serving(&[&w], 2, Duration::from_secs(60)).await;
    let client = Arc::new(env.client(Duration::from_secs(20), false));
    open(&client, "account-cp1", 100).await;
    open(&client, "account-cp2", 0).await;
    if wf.is_some() {
        w.kill();
        w = writer(&env, wf);
        wait_serving(&[&w], 2, Duration::from_secs(60)).await;
    }
    let mut c = coordinator(&env, cf);
    coordinating(&c, 2).await;
    let txid = format!("crash-{role}-{fault}");
    let run = {
        let (client, txid) = (client.clone(), txid.clone());
        tokio::spawn(async move {
            client.transact(&txid, transfer_legs("account-cp1", "account-cp2", 40), Duration::from_secs(40)).await
        })
    };
    // The armed process kills itself at its point; start it again, unarmed.
    let victim = if role == "writer" { &mut w } else { &mut c };
    poll_until(Duration::from_secs(30), "the fault to fire", || {
        let gone = !victim.running();
        async move { gone.then_some(()) }
    })
    .await;
    if role == "writer" {
        w = writer(&env, None);
        wait_serving(&[&w], 2, Duration::from_secs(60)).await;
    } else {
        c = coordinator(&env, None);
        coordinating(&c, 2).await;
    }
    let outcome = run.await.unwrap().expect("an outcome within the deadline");
    assert_eq!(outcome.outcome, "committed", "{outcome:?}");
    let log = settled(&env, Duration::from_secs(60)).await;
    assert_eq!(log[&txid].state, TxState::Committed);
    let legs = legs(&env);
    assert_eq!(legs[&txid].len(), 2, "{:?}", legs[&txid]);
    let states = writer_accounts(&env);
    assert_eq!(states["account-cp1"]["balance"], 60);
    assert_eq!(states["account-cp2"]["balance"], 40);
    let status = env.esk().args(["tx", "status", &txid, "--json"]).run().ok().json();
    assert_eq!(status["state"], "committed");
    drop((w, c));
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_after_prepares_before_any_decision() {
    crash_point("coordinator", "after-prepare").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_after_the_decision_before_the_acknowledgements() {
    crash_point("coordinator", "after-decision").await;
}

/// A partial vote is held in memory only (ADR 11), its offset not committed:
/// a coordinator killed right after taking one, or right after a transaction
/// committed other work while it held one, reads it again and commits. Two
/// writers on two shards make each participant vote from its own writer, so
/// the votes come apart.
#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_holding_a_partial_vote_in_memory_commits_after_restart() {
    killed_holding_a_partial_vote("after-partial-vote", 1).await;
}

/// As above, with transfers side by side, so that other work commits while a
/// vote is held: the committed offset stays below the vote.
#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_after_a_commit_while_holding_a_partial_vote_commits_after_restart() {
    killed_holding_a_partial_vote("after-commit-holding-vote", 6).await;
}

async fn killed_holding_a_partial_vote(fault: &str, side_by_side: usize) {
    let env = TestEnv::new();
    env.init_topics_sharded(2, 2);
    let (w1, w2) = (writer(&env, None), writer(&env, None));
    poll_until(Duration::from_secs(60), "both writers to serve a shard", || async {
        let serving = |w: &Service| w.get_json("/health").map_or(0, |h| h["partitions_serving"].as_u64().unwrap_or(0));
        (serving(&w1) == 1 && serving(&w2) == 1).then_some(())
    })
    .await;
    let client = Arc::new(env.client(Duration::from_secs(20), false));
    // Two accounts in different partitions, so in different shards.
    let (a, b) = {
        let p = |s: &str| esk_wire::partition::partition_for(s.as_bytes(), 2);
        let names: Vec<String> = (0..).map(|i| format!("account-pv{i}")).take(40).collect();
        let a = names.iter().find(|s| p(s) == 0).unwrap().clone();
        let b = names.iter().find(|s| p(s) == 1).unwrap().clone();
        (a, b)
    };
    open(&client, &a, 1_000).await;
    open(&client, &b, 0).await;
    let mut c = coordinator(&env, Some(fault));
    coordinating(&c, 2).await;
    // One writer paused: the other's vote of each transfer is held in memory
    // while the coordinator goes on (the next round's requests commit), on a
    // loaded machine as on an idle one; with both running, both votes could
    // keep arriving in one batch and the point never be passed.
    w2.signal("STOP");
    // Rounds of transfers until the coordinator died at its point.
    let mut runs = Vec::new();
    let mut pending = Vec::new();
    for round in 0..20 {
        let mut this = Vec::new();
        for i in 0..side_by_side {
            let txid = format!("pv-{round}-{i}");
            let (client, t, from, to) = (client.clone(), txid.clone(), a.clone(), b.clone());
            this.push(tokio::spawn(async move {
                client.transact(&t, transfer_legs(&from, &to, 10), Duration::from_secs(40)).await
            }));
            runs.push(txid);
        }
        let started = Instant::now();
        while c.running() && started.elapsed() < Duration::from_secs(2) && !this.iter().all(|r| r.is_finished()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let died = !c.running();
        for (k, r) in this.into_iter().enumerate() {
            let txid = runs[runs.len() - side_by_side + k].clone();
            pending.push((txid, r));
        }
        if died {
            break;
        }
    }
    w2.signal("CONT");
    assert!(!c.running(), "{fault} did not fire in 20 rounds");
    c = coordinator(&env, None);
    coordinating(&c, 2).await;
    for (txid, run) in pending {
        let outcome = run.await.unwrap().unwrap_or_else(|e| panic!("{txid}: no outcome: {e}"));
        assert_eq!(outcome.outcome, "committed", "{txid}: {outcome:?}");
    }
    let log = settled(&env, Duration::from_secs(60)).await;
    let legs = legs(&env);
    let n = log.keys().filter(|t| t.starts_with("pv-")).count();
    assert!(log.values().filter(|r| r.txid.starts_with("pv-")).all(|r| r.state == TxState::Committed));
    assert!(legs.iter().filter(|(t, _)| t.starts_with("pv-")).all(|(_, l)| l.len() == 2), "{legs:?}");
    let states = writer_accounts(&env);
    assert_eq!(states[&a]["balance"], 1_000 - 10 * n as i64);
    assert_eq!(states[&b]["balance"], 10 * n as i64);
    drop((w1, w2, c));
}

/// The coordinator's consumed positions ride on `tx.log` (ADR 11): a new
/// owner resumes from them, not from the group's offsets, so with the group
/// set back to the beginning it answers no old request again.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_coordinator_resumes_from_its_log_not_from_the_groups_offsets() {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let env = TestEnv::new();
    env.init_topics(1);
    let (w, c) = writer_and_coordinator(&env, 1).await;
    let client = Arc::new(env.client(Duration::from_secs(20), false));
    open(&client, "account-rl1", 100).await;
    open(&client, "account-rl2", 0).await;
    for i in 0..5 {
        let txid = format!("rl-{i}");
        let outcome = client.transact(&txid, transfer_legs("account-rl1", "account-rl2", 1), Duration::from_secs(20));
        assert_eq!(outcome.await.unwrap().outcome, "committed");
    }
    settled(&env, Duration::from_secs(60)).await;
    let log = env.read_topic(&env.topics().tx_log(), true);
    assert!(log.iter().any(|r| r.key.as_deref() == Some(CONSUMED_KEY.as_bytes())), "no consumed-positions record");
    let replies = |env: &TestEnv| {
        env.read_topic(&env.topics().replies(), true)
            .iter()
            .filter(|r| r.key.as_deref().is_some_and(|k| k.starts_with(b"rl-")))
            .count()
    };
    let before = replies(&env);
    c.kill();
    // Once the dead member's session is over the group is empty and takes a
    // plain commit: every input back to its beginning.
    let group: BaseConsumer = env
        .kafka()
        .committed_reader(&format!("{}-coordinator", env.prefix), Duration::from_millis(50))
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for topic in [env.topics().tx_requests(), env.topics().tx_votes()] {
        tpl.add_partition_offset(&topic, 0, Offset::Offset(0)).unwrap();
    }
    poll_until(Duration::from_secs(60), "the group takes a plain commit", || {
        let ok = group.commit(&tpl, CommitMode::Sync).ok();
        async move { ok }
    })
    .await;
    let c2 = coordinator(&env, None);
    coordinating(&c2, 1).await;
    let outcome = client.transact("rl-new", transfer_legs("account-rl1", "account-rl2", 1), Duration::from_secs(20));
    assert_eq!(outcome.await.unwrap().outcome, "committed");
    settled(&env, Duration::from_secs(60)).await;
    assert_eq!(replies(&env), before + 1, "the new owner answered old requests again");
    assert_eq!(writer_accounts(&env)["account-rl2"]["balance"], 6);
    drop((w, c2));
}

#[tokio::test(flavor = "multi_thread")]
async fn participant_writer_killed_after_voting_yes() {
    crash_point("writer", "after-vote").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn paying_and_reserving_stock_commit_together_under_chaos() {
    let env = TestEnv::new();
    env.init_topics(3);
    let (w, c) = writer_and_coordinator(&env, 3).await;
    let client = Arc::new(env.client(Duration::from_secs(10), false));
    open(&client, "account-buyer", 10_000).await;
    client
        .command("inventory-sku1", ExpectedVersion::NoStream, cmd("AddStock", json!({"quantity": 25})), None)
        .await
        .unwrap();
    let roles = Arc::new(Roles {
        env: env.clone(),
        writer: Mutex::new(Some(w)),
        coordinator: Mutex::new(Some(c)),
        projector: Mutex::new(None),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let chaos = chaos(roles.clone(), stop.clone(), &[0, 1], 4);
    let mut outcomes = Vec::new();
    for _ in 0..40 {
        let txid = uuid::Uuid::new_v4().to_string();
        let legs = vec![
            leg("account-buyer", "Withdraw", json!({"amount": 10})),
            leg("inventory-sku1", "Reserve", json!({"quantity": 1})),
        ];
        outcomes.push((txid.clone(), client.transact(&txid, legs, Duration::from_secs(5)).await));
    }
    stop.store(true, Ordering::SeqCst);
    println!("killed: {:?}", chaos.join().unwrap());
    let log = settled(&env, Duration::from_secs(90)).await;
    let legs = legs(&env);
    let mut committed = 0;
    for (txid, _) in &outcomes {
        let found = legs.get(txid).cloned().unwrap_or_default();
        if log.get(txid).map(|r| r.state) == Some(TxState::Committed) {
            committed += 1;
            let types: HashSet<&str> = found.iter().map(|(_, t, _)| t.as_str()).collect();
            assert_eq!(types, HashSet::from(["Withdrawn", "StockReserved"]), "{txid}: {found:?}");
            assert_eq!(found.len(), 2);
        } else {
            assert!(found.is_empty(), "{txid}: legs of an uncommitted transaction: {found:?}");
        }
    }
    println!("{committed} of 40 purchases committed");
    assert!(committed > 0 && committed <= 25, "{committed}");
    let states: BTreeMap<String, StreamRecord> = latest(&env, &env.topics().state());
    assert_eq!(states["account-buyer"].state.as_ref().unwrap()["balance"], 10_000 - 10 * committed);
    assert_eq!(states["inventory-sku1"].state.as_ref().unwrap()["stock"], 25 - committed);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_transactions_exit_4_and_write_nothing() {
    let env = TestEnv::new();
    env.init_topics(2);
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    };
    let p = |s: &str, c: &str, a: i64| json!({"stream": s, "command": c, "data": {"amount": a}});
    let cases = [
        (
            file("unknown.json", &json!({"participants": [p("widget-1", "Withdraw", 1)]}).to_string()),
            "unknown category 'widget'",
        ),
        (
            file(
                "twice.json",
                &json!({"participants": [p("account-1", "Withdraw", 1), p("account-1", "Deposit", 1)]}).to_string(),
            ),
            "appears twice",
        ),
        (
            file("negative.json", &json!({"participants": [p("account-1", "Withdraw", -3)]}).to_string()),
            "at least 1, got -3",
        ),
        (file("zero.json", &json!({"participants": [p("account-1", "Deposit", 0)]}).to_string()), "at least 1, got 0"),
        (file("empty.json", r#"{"participants": []}"#), "at least one participant"),
        (file("malformed.json", "{\"participants\": ["), "not a transaction"),
        (file("extra.json", r#"{"participants": [], "bogus": 1}"#), "not a transaction"),
    ];
    for (path, wanted) in &cases {
        let run = env.esk().args(["tx", "run", "--file", path, "--json"]).run().code(4);
        assert!(run.stderr.contains(wanted), "{path}: wanted '{wanted}' in {}", run.stderr);
        assert_eq!(run.json()["error"], "invalid_input");
    }
    env.esk().args(["tx", "run", "--file", "/no/such/file"]).run().code(4);
    env.esk().args(["tx", "transfer", "account-1", "account-2", "0"]).run().code(4);
    env.esk().args(["tx", "transfer", "account-1", "account-2", "-5"]).run().code(4);
    env.esk().args(["tx", "transfer", "account-1", "account-2", "lots"]).run().code(4);
    env.esk().args(["tx", "transfer", "account-1", "account-1", "5"]).run().code(4);
    env.esk().args(["tx", "transfer", "account-1", "account-2", "5", "--txid", "has space"]).run().code(4);
    for topic in [env.topics().tx_requests(), env.topics().tx_prepare(), env.topics().tx_log()] {
        assert!(env.read_topic(&topic, false).is_empty(), "{topic} was written");
    }
}
