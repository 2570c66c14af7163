//! A service of its own on the `esk` library (`examples/shop/orders`): its
//! aggregate decides its commands, its read model answers read-your-writes
//! queries on its own route, and it survives SIGKILL as esk's services do.

use std::time::Duration;

use esk_client::ClientError;
use esk_tests::{Service, TestEnv, http_get, poll_until, wait_serving};
use esk_wire::protocol::{CommandData, ExpectedVersion};
use serde_json::{Value, json};

fn cmd(ty: &str, data: Value) -> CommandData {
    CommandData { command_type: ty.into(), data }
}

fn place() -> CommandData {
    cmd("Place", json!({"customer": "ann", "item": "tea", "quantity": 2, "amount": 700}))
}

/// `shop-orders`: its writer's HTTP first (health: partitions served), its projector's second.
async fn orders(env: &TestEnv, partitions: u64) -> Service {
    let svc = Service::program(env, "shop-orders", &["ESK_WRITER_HTTP", "ESK_PROJECTOR_HTTP"], &[]);
    wait_serving(&[&svc], partitions, Duration::from_secs(60)).await;
    svc
}

fn order(svc: &Service, query: &str) -> (u16, Value) {
    let (code, body) = http_get(svc.addr(1), &format!("/orders/{query}")).expect("the projector answers");
    (code, serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_on_the_library_decides_with_its_aggregate_and_serves_its_model() {
    let env = TestEnv::new();
    env.init_topics(2);
    env.init_context("orders", 2);
    let svc = orders(&env, 2).await;
    let client = env.client(Duration::from_secs(30), false);

    let placed = client.command("order-1", ExpectedVersion::NoStream, place(), Some("place-1".into())).await.unwrap();
    assert_eq!((placed.first_version, placed.last_version), (1, 1));
    // The aggregate's rules, as the service wrote them.
    let again = client.command("order-1", ExpectedVersion::Any, place(), None).await.unwrap_err();
    assert!(matches!(again, ClientError::Refused(ref m) if m.contains("already placed")), "{again:?}");
    let bad = cmd("Place", json!({"customer": "ann", "item": "tea", "quantity": 0, "amount": 1}));
    let bad = client.command("order-2", ExpectedVersion::NoStream, bad, None).await.unwrap_err();
    assert!(matches!(bad, ClientError::Invalid(ref m) if m.contains("quantity")), "{bad:?}");
    // Its writer serves the context `orders`: another category's requests go
    // to that category's context (here the default one, which no writer
    // serves), never to this service.
    assert_eq!(client.context_of("order"), "orders");
    let short = env.client(Duration::from_secs(2), false);
    let other = cmd("OpenAccount", json!({"owner": "ann"}));
    let other = short.command("account-1", ExpectedVersion::NoStream, other, None).await.unwrap_err();
    assert!(matches!(other, ClientError::Unavailable(_)), "{other:?}");
    let routed = |topic: &str| env.read_topic(topic, false).into_iter().filter_map(|r| r.key).collect::<Vec<_>>();
    // (The service's checkout saga asked for inventory-tea's stock there too.)
    assert!(routed(&env.topics().commands()).contains(&b"account-1".to_vec()));
    assert!(routed(&env.topics().in_context("orders").commands()).iter().all(|k| k.starts_with(b"order-")));

    let confirmed =
        client.command("order-1", ExpectedVersion::Exact(1), cmd("Confirm", json!({})), None).await.unwrap();
    // Read-your-writes on the service's own route.
    let (code, row) = order(&svc, &format!("1?after={}", confirmed.position));
    assert_eq!(code, 200, "{row}");
    assert_eq!((row["status"].as_str(), row["version"].as_i64()), (Some("confirmed"), Some(2)), "{row}");
    let (code, missing) = order(&svc, "nope");
    assert_eq!((code, missing["error"].as_str()), (404, Some("not_found")), "{missing}");
    let status: Value = serde_json::from_str(&http_get(svc.addr(1), "/status").unwrap().1).unwrap();
    assert_eq!(status["projections"][0]["name"], "orders", "{status}");

    // SIGKILL and a restart: the retry is answered with its first result,
    // nothing is written twice, and the model is where it was.
    svc.kill();
    let svc = orders(&env, 2).await;
    let retried = client.command("order-1", ExpectedVersion::NoStream, place(), Some("place-1".into())).await.unwrap();
    assert_eq!(retried, placed);
    let row = poll_until(Duration::from_secs(30), "the model after the restart", || async {
        let (code, body) = http_get(svc.addr(1), "/orders/1")?;
        (code == 200).then(|| serde_json::from_str::<Value>(&body).ok()).flatten()
    })
    .await;
    assert_eq!(row["status"], "confirmed", "{row}");
    let events: Vec<_> =
        env.all_events("order").into_iter().map(|(_, _, e)| (e.stream.to_string(), e.version)).collect();
    assert_eq!(events, vec![("order-1".to_owned(), 1), ("order-1".to_owned(), 2)]);
}
