//! The HTTP gateway against the real platform: every endpoint, every error
//! class as an RFC 9457 problem, an Idempotency-Key retried after the
//! gateway was SIGKILLed mid-request, and a subscription that outlives a
//! gateway restart with no gap and no duplicate.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use esk_tests::{HttpAnswer, Service, Sse, TestEnv, http, repo_root, wait_serving};
use esk_wire::protocol::{ExpectedVersion, NewEvent};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);
const ADMIN: &str = "gateway-test-admin";

fn gateway(env: &TestEnv, extra: &[(&str, &str)]) -> Service {
    let mut vars = vec![("ESK_ADMIN_TOKEN", ADMIN)];
    vars.extend_from_slice(extra);
    Service::start(env, "gateway", &vars)
}

async fn ready(g: &Service) {
    esk_tests::poll_until(T, "the gateway ready", || async { g.get("/ready").filter(|(s, _)| *s == 200).map(|_| ()) })
        .await;
}

fn post(g: &Service, path: &str, headers: &[(&str, &str)], body: &Value) -> HttpAnswer {
    let mut h = vec![("Content-Type", "application/json")];
    h.extend_from_slice(headers);
    http(&g.http, "POST", path, &h, Some(body.to_string().as_bytes()), T).expect("the gateway answers")
}

fn get(g: &Service, path: &str) -> HttpAnswer {
    http(&g.http, "GET", path, &[], None, T).expect("the gateway answers")
}

/// Asserts an RFC 9457 problem of `class` with `status`.
fn problem(a: &HttpAnswer, status: u16, class: &str) -> Value {
    assert_eq!(a.status, status, "{a:?}");
    assert_eq!(a.header("content-type"), Some("application/problem+json"), "{a:?}");
    let p = a.json();
    assert_eq!(p["type"], format!("urn:esk:problem:{class}"), "{a:?}");
    assert_eq!(p["status"], status, "{a:?}");
    assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()), "{a:?}");
    assert!(p["detail"].as_str().is_some_and(|t| !t.is_empty()), "{a:?}");
    p
}

async fn platform(partitions: u32) -> (TestEnv, Service, Service) {
    let env = TestEnv::new();
    env.init_topics(partitions);
    let w = Service::start(&env, "writer", &[("ESK_WRITER_SESSION_TIMEOUT_MS", "6000")]);
    let c = Service::start(&env, "coordinator", &[]);
    wait_serving(&[&w], u64::from(partitions), Duration::from_secs(60)).await;
    (env, w, c)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_endpoint_answers_and_every_error_class_is_a_problem() {
    let (env, _w, _c) = platform(2).await;
    let g = gateway(&env, &[("ESK_HTTP_MAX_BODY_BYTES", "4194304"), ("ESK_GATEWAY_MAX_SUBSCRIPTIONS", "1")]);
    ready(&g).await;

    // Appends: 201, the position token in the body and the header; the
    // same Idempotency-Key again answers alike and writes nothing.
    let events = json!({"expected_version": "no-stream", "events": [{"type": "Noted", "data": {"n": 1}}, {"type": "Noted", "data": {"n": 2}}]});
    let a = post(&g, "/streams/note-1/events", &[("Idempotency-Key", "note-1-first")], &events);
    assert_eq!(a.status, 201, "{a:?}");
    let first = a.json();
    assert_eq!((first["first_version"].as_u64(), first["last_version"].as_u64()), (Some(1), Some(2)), "{a:?}");
    assert_eq!(a.header("esk-position"), first["position"].as_str());
    let again = post(&g, "/streams/note-1/events", &[("Idempotency-Key", "note-1-first")], &events);
    assert_eq!((again.status, again.json()), (201, first.clone()), "a retry is answered with the first result");
    // Wrong expected version: 409 with the version the stream is at.
    let wrong = post(&g, "/streams/note-1/events", &[], &events);
    assert_eq!(problem(&wrong, 409, "wrong-expected-version")["actual_version"], 2);
    for v in 3..=6 {
        let body = json!({"expected_version": v - 1, "events": [{"type": "Noted", "data": {"n": v}}]});
        assert_eq!(post(&g, "/streams/note-1/events", &[], &body).status, 201);
    }

    // Reads: pages forwards and backwards; read-your-writes tokens checked.
    let page = get(&g, "/streams/note-1?limit=4").json();
    let versions =
        |p: &Value| p["events"].as_array().unwrap().iter().map(|e| e["version"].as_u64().unwrap()).collect::<Vec<_>>();
    assert_eq!(
        (versions(&page), page["next"].as_u64(), page["version"].as_u64()),
        (vec![1, 2, 3, 4], Some(5), Some(6))
    );
    let rest = get(&g, "/streams/note-1?from=5&limit=4").json();
    assert_eq!((versions(&rest), rest["next"].as_u64()), (vec![5, 6], None));
    assert_eq!(rest["events"][1]["data"], json!({"n": 6}));
    let back = get(&g, "/streams/note-1?direction=backwards&limit=4").json();
    assert_eq!((versions(&back), back["next"].as_u64()), (vec![6, 5, 4, 3], Some(2)));
    let back2 = get(&g, "/streams/note-1?direction=backwards&from=2").json();
    assert_eq!((versions(&back2), back2["next"].as_u64()), (vec![2, 1], None));
    let token = first["position"].as_str().unwrap();
    assert_eq!(get(&g, &format!("/streams/note-1?after={token}")).status, 200);
    problem(&get(&g, "/streams/note-1?after=yesterday"), 400, "invalid-input");
    problem(&get(&g, "/streams/note-1?limit=0"), 400, "invalid-input");
    problem(&get(&g, "/streams/note-1?direction=sideways"), 400, "invalid-input");
    problem(&get(&g, "/streams/note-404"), 404, "not-found");
    problem(&get(&g, "/streams/Not%20a%20stream"), 400, "invalid-input");

    // Commands: decided by the aggregate; refused 422, unknown 400.
    let open = post(
        &g,
        "/streams/account-g1/commands/OpenAccount",
        &[],
        &json!({"expected_version": "no-stream", "data": {"owner": "g"}}),
    );
    assert_eq!(open.status, 200, "{open:?}");
    assert!(open.header("esk-position").is_some());
    let refused = post(&g, "/streams/account-g1/commands/Withdraw", &[], &json!({"data": {"amount": 5}}));
    assert!(problem(&refused, 422, "domain-refused")["detail"].as_str().unwrap().contains("insufficient"));
    problem(&post(&g, "/streams/account-g1/commands/Explode", &[], &json!({})), 400, "invalid-input");
    let deposit = post(&g, "/streams/account-g1/commands/Deposit", &[], &json!({"data": {"amount": 100}}));
    assert_eq!(deposit.status, 200, "{deposit:?}");
    let open2 = post(&g, "/streams/account-g2/commands/OpenAccount", &[], &json!({"data": {"owner": "h"}}));
    assert_eq!(open2.status, 200, "{open2:?}");

    // Input that is not what a request takes: 400, 415, 413, nothing written.
    let raw = |path: &str, ct: Option<&str>, body: &[u8]| {
        let h: Vec<(&str, &str)> = ct.map(|c| vec![("Content-Type", c)]).unwrap_or_default();
        http(&g.http, "POST", path, &h, Some(body), T).unwrap()
    };
    problem(&raw("/streams/note-2/events", None, b"{}"), 415, "unsupported-media-type");
    problem(&raw("/streams/note-2/events", Some("application/json"), b"{not json"), 400, "invalid-input");
    problem(&raw("/streams/note-2/events", Some("application/json"), br#"{"events": []}"#), 400, "invalid-input");
    problem(
        &raw(
            "/streams/note-2/events",
            Some("application/json"),
            br#"{"events": [{"type": "A", "data": 1}], "extra": 1}"#,
        ),
        400,
        "invalid-input",
    );
    problem(
        &post(
            &g,
            "/streams/note-2/events",
            &[("Idempotency-Key", "has space")],
            &json!({"events": [{"type": "A", "data": {}}]}),
        ),
        400,
        "invalid-input",
    );
    // Over the broker's record limit (within the body limit), and over the body limit.
    let big = json!({"events": [{"type": "Big", "data": {"x": "y".repeat(1_500_000)}}]});
    problem(&post(&g, "/streams/note-2/events", &[], &big), 413, "payload-too-large");
    let huge = vec![b' '; 5 << 20];
    problem(&raw("/streams/note-2/events", Some("application/json"), &huge), 413, "payload-too-large");
    problem(&get(&g, "/streams/note-2"), 404, "not-found");

    // An Idempotency-Key from beyond the idempotency horizon: a UUIDv7 of
    // 30 days ago says when it was first sent.
    let old = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
        uuid::NoContext,
        (chrono::Utc::now() - chrono::Duration::days(30)).timestamp() as u64,
        0,
    ))
    .to_string();
    let expired = post(
        &g,
        "/streams/note-3/events",
        &[("Idempotency-Key", &old)],
        &json!({"events": [{"type": "A", "data": {}}]}),
    );
    problem(&expired, 409, "request-expired");

    // Transactions: committed 200, aborted 409 with every vote, the txid
    // from the Idempotency-Key answered alike again, looked up by txid.
    let tx = json!({"participants": [
        {"stream": "account-g1", "command": "Withdraw", "data": {"amount": 30}},
        {"stream": "account-g2", "command": "Deposit", "data": {"amount": 30}}]});
    let committed = post(&g, "/transactions", &[("Idempotency-Key", "tx-g-1")], &tx);
    assert_eq!((committed.status, committed.json()["outcome"].as_str()), (200, Some("committed")), "{committed:?}");
    assert_eq!(post(&g, "/transactions", &[("Idempotency-Key", "tx-g-1")], &tx).json()["txid"], "tx-g-1");
    let looked = get(&g, "/transactions/tx-g-1").json();
    assert_eq!(looked["outcome"], "committed", "{looked}");
    assert!(looked["participants"].as_array().unwrap().iter().all(|p| p["vote"] == true), "{looked}");
    let too_much = json!({"txid": "tx-g-2", "participants": [
        {"stream": "account-g1", "command": "Withdraw", "data": {"amount": 1000}},
        {"stream": "account-g2", "command": "Deposit", "data": {"amount": 1000}}]});
    let aborted = problem(&post(&g, "/transactions", &[], &too_much), 409, "transaction-aborted");
    let votes = &aborted["transaction"]["participants"];
    assert!(votes.as_array().unwrap().iter().any(|p| p["vote"] == false && p["reason"].is_string()), "{aborted}");
    problem(&post(&g, "/transactions", &[("Idempotency-Key", "other")], &too_much), 400, "invalid-input");
    problem(&post(&g, "/transactions", &[], &json!({"participants": []})), 400, "invalid-input");
    problem(&get(&g, "/transactions/tx-none"), 404, "not-found");
    problem(&get(&g, "/transactions/has%20space"), 400, "invalid-input");
    let listed = get(&g, "/transactions").json();
    let txids: Vec<&str> =
        listed["transactions"].as_array().unwrap().iter().filter_map(|t| t["txid"].as_str()).collect();
    assert!(txids.contains(&"tx-g-1") && txids.contains(&"tx-g-2"), "{listed}");
    // The money moved once.
    let balance = |s: &str| -> i64 {
        get(&g, &format!("/streams/{s}")).json()["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| match e["type"].as_str().unwrap() {
                "Deposited" => e["data"]["amount"].as_i64().unwrap(),
                "Withdrawn" => -e["data"]["amount"].as_i64().unwrap(),
                _ => 0,
            })
            .sum()
    };
    assert_eq!((balance("account-g1"), balance("account-g2")), (70, 30));

    // The console's data.
    let categories = get(&g, "/categories").json();
    assert!(categories["categories"].as_array().unwrap().iter().any(|c| c["name"] == "note"), "{categories}");
    let newest = get(&g, "/categories/note/events?limit=3").json();
    assert_eq!(newest["events"].as_array().unwrap().len(), 3, "{newest}");
    assert_eq!(newest["events"][0]["data"], json!({"n": 6}), "newest first: {newest}");
    problem(&get(&g, "/categories/nothing_here/events"), 404, "not-found");
    assert_eq!(get(&g, "/services").status, 200);
    assert_eq!(get(&g, "/dead-letters").status, 200);
    // Replays need the admin token.
    let replay = http(&g.http, "POST", "/dead-letters/accounts/replay", &[], None, T).unwrap();
    problem(&replay, 401, "unauthorized");

    // Subscriptions: live from now (where "now" is fixed before the answer),
    // or after a write's position token.
    let mut live = Sse::open(&g.http, "/subscriptions/note", None, T).unwrap();
    assert_eq!(live.status, 200);
    let body = json!({"events": [{"type": "Noted", "data": {"live": true}}]});
    assert_eq!(post(&g, "/streams/note-live/events", &[], &body).status, 201);
    let e: Value = serde_json::from_str(&live.next_event().unwrap().unwrap().data).unwrap();
    assert_eq!((e["stream"].as_str(), e["data"].clone()), (Some("note-live"), json!({"live": true})));
    drop(live);
    // Its slot frees once its reader saw the client go (within a poll).
    let open = || get(&g, "/status").json()["subscriptions"].as_u64();
    esk_tests::poll_until(T, "the subscription's slot free", || async { (open() == Some(0)).then_some(()) }).await;
    let mut after = Sse::open(&g.http, &format!("/subscriptions/note?from={token}&limit=5"), None, T).unwrap();
    let mut seen = Vec::new();
    while let Ok(Some(e)) = after.next_event() {
        let doc: Value = serde_json::from_str(&e.data).unwrap();
        seen.push((doc["stream"].as_str().unwrap().to_owned(), doc["version"].as_u64().unwrap()));
    }
    assert!(seen.contains(&("note-1".into(), 3)) && seen.contains(&("note-live".into(), 1)), "{seen:?}");
    assert!(!seen.contains(&("note-1".into(), 2)), "from a token: after that write, {seen:?}");
    assert_eq!(seen.len(), 5, "note-1 3 to 6 and note-live: {seen:?}");
    problem(&get(&g, "/subscriptions/note?from=note:0:999999"), 400, "invalid-input");
    problem(&get(&g, "/subscriptions/note?from=account:0:1"), 400, "invalid-input");

    // Subscriptions: bounded; the one over the bound is 503 with Retry-After.
    let held = Sse::open(&g.http, "/subscriptions/note?from=start", None, T).unwrap();
    assert_eq!(held.status, 200);
    let over = get(&g, "/subscriptions/note?from=start");
    problem(&over, 503, "unavailable");
    assert!(over.header("retry-after").is_some(), "{over:?}");
    drop(held);
    problem(&get(&g, "/subscriptions/Note"), 400, "invalid-input");
    esk_tests::poll_until(T, "the subscription's slot free", || async { (open() == Some(0)).then_some(()) }).await;

    // The HTTP layer's own errors are problems too.
    problem(&get(&g, "/nowhere"), 404, "not-found");
    problem(&http(&g.http, "DELETE", "/streams/note-1", &[], None, T).unwrap(), 405, "method-not-allowed");

    // The OpenAPI document served is the one checked in.
    let served = get(&g, "/openapi.json");
    let kept = std::fs::read_to_string(repo_root().join("services/gateway/openapi.json")).unwrap();
    assert_eq!(served.body, kept);
    // The console is served from the binary.
    let console = get(&g, "/console/");
    assert!(console.status == 200 && console.body.contains("<html"), "{console:?}");
    assert_eq!(get(&g, "/console/app.js").status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotency_key_retried_after_the_gateway_was_killed_mid_request_writes_once() {
    let (env, w, _c) = platform(1).await;
    let g = gateway(&env, &[]);
    ready(&g).await;
    // The writer is stopped: the request reaches Kafka, and the gateway is
    // killed while it waits for the answer.
    w.signal("STOP");
    let addr = g.http.clone();
    let body = json!({"expected_version": "any", "events": [{"type": "Paid", "data": {"amount": 7}}]});
    let pending = std::thread::spawn(move || {
        http(
            &addr,
            "POST",
            "/streams/payment-1/events",
            &[("Content-Type", "application/json"), ("Idempotency-Key", "pay-1")],
            Some(body.to_string().as_bytes()),
            T,
        )
    });
    std::thread::sleep(Duration::from_secs(2));
    g.kill();
    assert!(pending.join().unwrap().map_or(0, |a| a.status) != 201, "no answer from a killed gateway");
    w.signal("CONT");
    let g2 = gateway(&env, &[]);
    ready(&g2).await;
    let body = json!({"expected_version": "any", "events": [{"type": "Paid", "data": {"amount": 7}}]});
    let retried = post(&g2, "/streams/payment-1/events", &[("Idempotency-Key", "pay-1")], &body);
    assert_eq!(retried.status, 201, "{retried:?}");
    assert_eq!((retried.json()["first_version"].as_u64(), retried.json()["last_version"].as_u64()), (Some(1), Some(1)));
    let again = post(&g2, "/streams/payment-1/events", &[("Idempotency-Key", "pay-1")], &body);
    assert_eq!(again.json(), retried.json());
    let read = get(&g2, "/streams/payment-1").json();
    assert_eq!(read["version"], 1, "written once: {read}");
    assert_eq!(env.all_events("payment").len(), 1, "one event in the log");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscription_outlives_a_gateway_restart_with_no_gap_and_no_duplicate() {
    let (env, _w, _c) = platform(3).await;
    let g = gateway(&env, &[]);
    ready(&g).await;
    let client = env.client(T, true);
    // Some events before the subscription starts (from=start reads them).
    let streams: Vec<String> = (0..6).map(|i| format!("ticket-{i}")).collect();
    let ev = |n: u64| NewEvent { id: None, event_type: "Sold".into(), data: json!({"n": n}) };
    for s in &streams {
        client.append(s, ExpectedVersion::Any, vec![ev(0)], None).await.unwrap();
    }
    // Appends go on while the subscription is read, the gateway killed and restarted.
    let total_per_stream = 40u64;
    let writer = {
        let streams = streams.clone();
        tokio::spawn(async move {
            for n in 1..total_per_stream {
                for s in &streams {
                    client.append(s, ExpectedVersion::Any, vec![ev(n)], None).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            client
        })
    };
    let want = total_per_stream * streams.len() as u64;
    let mut got: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut last_id: Option<String> = None;
    let mut count = 0u64;
    let mut gateway = Some(g);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut restarts = 0;
    while count < want {
        assert!(Instant::now() < deadline, "{count} of {want} events in 120 s");
        let addr = gateway.as_ref().unwrap().http.clone();
        let from = if last_id.is_none() { "?from=start" } else { "" };
        let mut sse = Sse::open(&addr, &format!("/subscriptions/ticket{from}"), last_id.as_deref(), T).unwrap();
        assert_eq!(sse.status, 200);
        while let Ok(Some(e)) = sse.next_event() {
            let doc: Value = serde_json::from_str(&e.data).unwrap();
            got.entry(doc["stream"].as_str().unwrap().to_owned()).or_default().push(doc["version"].as_u64().unwrap());
            last_id = e.id;
            count += 1;
            // Kill the gateway twice mid-stream, then restart it.
            if restarts < 2 && count == want / 3 * (restarts + 1) {
                restarts += 1;
                gateway.take().unwrap().kill();
                let g = Service::start(&env, "gateway", &[]);
                ready(&g).await;
                gateway = Some(g);
                break;
            }
            if count == want {
                break;
            }
        }
    }
    assert_eq!(restarts, 2);
    let _client = writer.await.unwrap();
    for (s, versions) in &got {
        let expected: Vec<u64> = (1..=total_per_stream).collect();
        assert_eq!(versions, &expected, "{s}: every event once, in order");
    }
    assert_eq!(got.len(), streams.len());
    // Nothing more arrives after the last one: no duplicate at the end either.
    let addr = gateway.as_ref().unwrap().http.clone();
    let mut tail = Sse::open(&addr, "/subscriptions/ticket", last_id.as_deref(), Duration::from_secs(3)).unwrap();
    assert!(tail.next_event().is_err(), "no event after the last one (the read timed out)");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscription_resumes_from_its_start_and_goes_past_hostile_records() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let (env, _w, _c) = platform(2).await;
    let g = gateway(&env, &[]);
    ready(&g).await;
    let body = |n: u64| json!({"events": [{"type": "Rang", "data": {"n": n}}]});
    assert_eq!(post(&g, "/streams/bell-0/events", &[], &body(0)).status, 201);

    // A quiet subscription from now that drops before any event: the id of
    // its start frame resumes it, so the events written meanwhile arrive.
    let mut quiet = Sse::open(&g.http, "/subscriptions/bell", None, Duration::from_secs(2)).unwrap();
    assert!(quiet.next_event().is_err(), "no event yet");
    let start = quiet.last_id.clone().expect("the start frame has an id");
    drop(quiet);
    for n in 1..=3 {
        assert_eq!(post(&g, "/streams/bell-1/events", &[], &body(n)).status, 201);
    }
    // A foreign record whose header holds a line break, between the events.
    let topic = env.topics().events("bell");
    let producer: FutureProducer =
        env.kafka().producer(esk_kafka::Sending::Foreign { max_message_bytes: 1_000_000 }).create().unwrap();
    let headers = rdkafka::message::OwnedHeaders::new()
        .insert(rdkafka::message::Header { key: "ce_specversion", value: Some("1.0\n: forged".as_bytes()) });
    let forged = FutureRecord::to(&topic).key("bell-1").payload("{}").headers(headers);
    producer.send(forged, T).await.unwrap();
    assert_eq!(post(&g, "/streams/bell-1/events", &[], &body(4)).status, 201);
    let mut resumed = Sse::open(&g.http, "/subscriptions/bell", Some(&start), T).unwrap();
    let mut got = Vec::new();
    while got.len() < 4 {
        let e = resumed.next_event().expect("every event after the start, past the forged record").unwrap();
        let doc: Value = serde_json::from_str(&e.data).unwrap();
        got.push(doc["data"]["n"].as_u64().unwrap());
    }
    assert_eq!(got, vec![1, 2, 3, 4], "from the start frame on, not bell-0 again");
    drop(resumed);

    // Cursors that are not this subscription's are refused, not read from the start.
    problem(&get(&g, "/subscriptions/bell?from="), 400, "invalid-input");
    let foreign = start.replace("bell:", "other:");
    problem(&get(&g, &format!("/subscriptions/bell?from={foreign}")), 400, "invalid-input");
    problem(&get(&g, "/subscriptions/bell?from=bell:0=999999"), 400, "invalid-input");
    problem(&get(&g, "/subscriptions/bell?from=bell:7:0"), 400, "invalid-input");
    let overflow =
        http(&g.http, "GET", "/subscriptions/bell", &[("Last-Event-ID", &"bell:0=1,".repeat(10_000))], None, T)
            .unwrap();
    problem(&overflow, 400, "invalid-input");

    // Paging backwards from past the end starts at the end and ends.
    let page = get(&g, "/streams/bell-1?direction=backwards&from=18446744073709551615&limit=3");
    assert_eq!(page.status, 200, "{page:?}");
    let page = page.json();
    let versions: Vec<u64> =
        page["events"].as_array().unwrap().iter().map(|e| e["version"].as_u64().unwrap()).collect();
    assert_eq!((versions, page["next"].as_u64()), (vec![4, 3, 2], Some(1)), "{page}");
    let last = get(&g, "/streams/bell-1?direction=backwards&from=1").json();
    assert_eq!(last["next"], Value::Null, "{last}");
}
