//! The shop (`examples/shop`) against a real broker: four services, three
//! bounded contexts, and the checkout saga under chaos.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use esk_tests::{Service, TestEnv, http_get, kill_each_once, poll_until, wait_serving};
use esk_wire::protocol::{CommandData, ExpectedVersion, StreamRecord};
use serde_json::{Value, json};

use crate::coordinator::latest;

const SESSION: (&str, &str) = ("ESK_WRITER_SESSION_TIMEOUT_MS", "6000");

/// One shop service: its binary, its HTTP variables (the first is `http`).
/// A checkout times out after 30 s, the default: a takeover (6 s session)
/// on a loaded machine stays well within it. (With 4 s, a loaded CI run saw
/// every checkout time out; the timeout's compensations are unit-tested in
/// `checkout::tests`.)
fn shop(env: &TestEnv, service: &str) -> Service {
    let (program, vars): (&str, &[&str]) = match service {
        "orders" => ("shop-orders", &["ESK_WRITER_HTTP", "ESK_PROJECTOR_HTTP"]),
        "payments" => ("shop-payments", &["ESK_WRITER_HTTP", "ESK_PROJECTOR_HTTP"]),
        "inventory" => ("shop-inventory", &["ESK_WRITER_HTTP"]),
        _ => ("shop-shipping", &["ESK_PROJECTOR_HTTP"]),
    };
    Service::program(env, program, vars, &[SESSION, ("ESK_CHECKOUT_TIMEOUT", "30s")])
}

fn place(customer: &str, item: &str, quantity: i64, amount: i64) -> CommandData {
    CommandData {
        command_type: "Place".into(),
        data: json!({"customer": customer, "item": item, "quantity": quantity, "amount": amount}),
    }
}

/// Each stream's last state in a context's state topic.
fn states(env: &TestEnv, context: &str) -> BTreeMap<String, Value> {
    latest::<StreamRecord>(env, &env.topics().in_context(context).state())
        .into_iter()
        .filter_map(|(k, r)| r.state.map(|s| (k, s)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn checkouts_under_chaos_end_confirmed_or_cancelled_and_conserve_stock_and_money() {
    let env = TestEnv::new();
    env.init_topics(2);
    for context in ["orders", "payments", "inventory"] {
        env.init_context(context, 2);
    }
    let names = ["orders", "payments", "inventory", "shipping"];
    let services: Vec<Arc<std::sync::Mutex<Option<Service>>>> =
        names.iter().map(|n| Arc::new(std::sync::Mutex::new(Some(shop(&env, n))))).collect();
    {
        let guards: Vec<_> = services.iter().map(|s| s.lock().unwrap()).collect();
        let writers: Vec<&Service> = guards[..3].iter().map(|g| g.as_ref().unwrap()).collect();
        wait_serving(&writers, 6, Duration::from_secs(90)).await;
    }
    let client = Arc::new(env.client(Duration::from_secs(30), true));

    // 20 customers, 5 of them with too little money; 4 items, 30 each: too
    // little stock for 200 orders of 1 or 2.
    let (customers, items, stock) = (20usize, 4usize, 30i64);
    let budget = |c: usize| if c % 4 == 3 { 150 } else { 10_000 };
    for c in 0..customers {
        let open = CommandData { command_type: "OpenAccount".into(), data: json!({"owner": format!("c{c}")}) };
        client.command(&format!("account-c{c}"), ExpectedVersion::NoStream, open, None).await.unwrap();
        let deposit = CommandData { command_type: "Deposit".into(), data: json!({"amount": budget(c)}) };
        client.command(&format!("account-c{c}"), ExpectedVersion::Exact(1), deposit, None).await.unwrap();
    }
    for i in 0..items {
        let add = CommandData { command_type: "AddStock".into(), data: json!({"quantity": stock}) };
        client.command(&format!("inventory-i{i}"), ExpectedVersion::NoStream, add, None).await.unwrap();
    }

    // Every service is SIGKILLed once, in an order and at moments of chance,
    // while 200 checkouts run.
    let over = Arc::new(AtomicBool::new(false));
    let chaos = {
        let (services, env) = (services.clone(), env.clone());
        kill_each_once(names.len(), over.clone(), move |which| {
            let mut slot = services[which].lock().unwrap();
            slot.take().unwrap().kill();
            *slot = Some(shop(&env, names[which]));
        })
    };
    let orders = 200usize;
    let placing: Vec<_> = (0..8usize)
        .map(|k| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut placed = Vec::new();
                for n in (k..orders).step_by(8) {
                    let (customer, item) = (format!("c{}", n % customers), format!("i{}", (n / 3) % items));
                    let (quantity, amount) = (1 + (n % 2) as i64, 50 + (n % 5) as i64 * 10);
                    let command = place(&customer, &item, quantity, amount);
                    let id = format!("order-{n}");
                    // A retry after a timeout is answered with the first result.
                    let mut tries = 0;
                    loop {
                        let r = client.command(&id, ExpectedVersion::NoStream, command.clone(), Some(id.clone())).await;
                        match r {
                            Ok(_) => break,
                            Err(e) if tries < 5 => {
                                tries += 1;
                                println!("{id}: {e}; again");
                            }
                            Err(e) => panic!("{id} was never placed: {e}"),
                        }
                    }
                    placed.push((n, customer, item, quantity, amount));
                }
                placed
            })
        })
        .collect();
    let mut placed = Vec::new();
    for p in placing {
        placed.extend(p.await.unwrap());
    }
    let killed: Vec<&str> = chaos.join().unwrap().into_iter().map(|i| names[i]).collect();
    println!("killed: {killed:?}");

    // Every order ends confirmed or cancelled, and stock and money add up:
    // what confirmed orders took, and nothing else (no reservation or
    // payment left behind).
    let deadline = Instant::now() + Duration::from_secs(240);
    let (ended, confirmed) = loop {
        let orders_now = states(&env, "orders");
        let ended: HashMap<usize, String> = placed
            .iter()
            .filter_map(|(n, ..)| {
                let status = orders_now.get(&format!("order-{n}"))?["status"].as_str()?.to_owned();
                matches!(status.as_str(), "confirmed" | "cancelled").then_some((*n, status))
            })
            .collect();
        let confirmed: Vec<&(usize, String, String, i64, i64)> =
            placed.iter().filter(|(n, ..)| ended.get(n).is_some_and(|s| s == "confirmed")).collect();
        let accounts = states(&env, "payments");
        let stocks = states(&env, "inventory");
        let mut diffs = Vec::new();
        for c in 0..customers {
            let spent: i64 = confirmed.iter().filter(|o| o.1 == format!("c{c}")).map(|o| o.4).sum();
            let balance = accounts.get(&format!("account-c{c}")).and_then(|s| s["balance"].as_i64());
            if balance != Some(budget(c) as i64 - spent) {
                diffs.push(format!("c{c}: balance {balance:?}, expected {}", budget(c) as i64 - spent));
            }
        }
        for i in 0..items {
            let taken: i64 = confirmed.iter().filter(|o| o.2 == format!("i{i}")).map(|o| o.3).sum();
            let left = stocks.get(&format!("inventory-i{i}")).and_then(|s| s["stock"].as_i64());
            if left != Some(stock - taken) {
                diffs.push(format!("i{i}: stock {left:?}, expected {}", stock - taken));
            }
        }
        if ended.len() == orders && diffs.is_empty() {
            break (ended, confirmed.len());
        }
        assert!(Instant::now() < deadline, "{} of {orders} orders ended; stock and money: {diffs:?}", ended.len());
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let cancelled = orders - confirmed;
    println!("{confirmed} confirmed, {cancelled} cancelled");
    assert!(confirmed > 0 && cancelled > 0, "the run needs both outcomes");

    // Each step and each compensation took effect once: the events a
    // saga's command wrote carry its request id as their causation.
    let mut by_cause: HashMap<String, Vec<String>> = HashMap::new();
    for category in ["inventory", "account", "order"] {
        for (_, _, e) in env.all_events(category) {
            if let Some(cause) = e.causation_id.filter(|c| c.starts_with("pm:checkout:")) {
                by_cause.entry(cause).or_default().push(e.event_type);
            }
        }
    }
    let once = |n: usize, step: &str, types: &[&str]| -> bool {
        match by_cause.get(&format!("pm:checkout:{n}:{step}")) {
            None => false,
            Some(got) => {
                assert_eq!(got, &types.to_vec(), "order {n}, step {step}: {got:?}");
                true
            }
        }
    };
    let (mut released, mut refunded, mut refused_payments) = (0, 0, 0);
    for (n, ..) in &placed {
        let reserved = once(*n, "reserve", &["StockReserved"]);
        let paid = once(*n, "pay", &["Withdrawn"]);
        let release = once(*n, "release", &["StockReleased"]);
        let refund = once(*n, "refund", &["Deposited"]);
        if ended[n] == "confirmed" {
            assert!(reserved && paid && once(*n, "confirm", &["Confirmed"]), "order {n}");
            assert!(!release && !refund, "order {n} was confirmed and compensated");
        } else {
            assert!(once(*n, "cancel", &["Cancelled"]), "order {n}");
            assert_eq!(release, reserved, "order {n}: reserved {reserved}, released {release}");
            assert_eq!(refund, paid, "order {n}: paid {paid}, refunded {refund}");
            released += usize::from(release);
            refunded += usize::from(refund);
            refused_payments += usize::from(reserved && !paid);
        }
    }
    println!("compensations: {released} releases, {refunded} refunds; {refused_payments} payments refused or late");
    assert!(released > 0, "some payment was refused after its stock was reserved");

    // Nothing is left in flight: no hold, and the saga's outbox is empty.
    for (stream, record) in latest::<StreamRecord>(&env, &env.topics().in_context("payments").state()) {
        assert!(record.holds.is_empty(), "{stream} holds {:?}", record.holds);
    }
    let orders_svc = services[0].lock().unwrap().take().unwrap();
    let projector = orders_svc.addr(1).to_owned();
    for (n, ..) in placed.iter().step_by(7) {
        let doc = poll_until(Duration::from_secs(30), "the checkout's process to finish", || async {
            let (code, body) = http_get(&projector, &format!("/processes/checkout/{n}"))?;
            let doc: Value = serde_json::from_str(&body).ok()?;
            (code == 200 && doc["finished"] == true && doc["outbox"].as_array()?.is_empty()).then_some(doc)
        })
        .await;
        assert_eq!(doc["state"]["stage"], ended[n], "{doc}");
    }
    // Asking for what is not a process: 404 with the reason; a process
    // manager is not rebuilt (409).
    for (path, why) in [
        ("/processes/nope/1", "no projection 'nope'"),
        ("/processes/orders/1", "not a process manager"),
        ("/processes/checkout/999999", "no process '999999'"),
    ] {
        let (code, body) = http_get(&projector, path).expect("the projector answers");
        assert_eq!(code, 404, "{path}: {body}");
        assert!(body.contains(why), "{path}: {body}");
    }
    let url = format!("http://{projector}");
    let rebuild = env.esk().args(["projection", "rebuild", "checkout", "--projector-url", &url]).run().code(1);
    assert!(rebuild.stderr.contains("not rebuilt"), "{}", rebuild.stderr);
    // The shipping context's model agrees.
    let shipping = services[3].lock().unwrap().take().unwrap();
    for (n, ..) in &placed {
        let want = if ended[n] == "confirmed" { "to_ship" } else { "not_shipped" };
        poll_until(Duration::from_secs(30), "shipping to agree", || async {
            let (code, body) = shipping.get(&format!("/shipments/{n}"))?;
            let doc: Value = serde_json::from_str(&body).ok()?;
            (code == 200 && doc["status"] == want).then_some(())
        })
        .await;
    }
    drop(orders_svc);
}
