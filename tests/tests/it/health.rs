//! `/health` (liveness), `/ready` (readiness) and `/metrics` of every service:
//! readiness that tells the truth, served without a Kafka call.

use std::time::{Duration, Instant};

use esk_tests::{OwnBroker, Service, TestEnv, poll_until};

async fn ready_code(s: &Service) -> Option<u16> {
    s.get("/ready").map(|(code, _)| code)
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_is_503_until_each_service_serves_and_while_the_broker_is_frozen() {
    let broker = tokio::task::spawn_blocking(OwnBroker::start).await.unwrap().expect("a broker of the test's own");
    let env = TestEnv::on(&broker.bootstrap);
    env.init_topics(2);
    // A writer that must wait for its group: its first answer is 503 with a reason.
    let services: Vec<Service> = ["writer", "coordinator", "projector", "replica"]
        .iter()
        .map(|name| Service::start(&env, name, &[("ESK_WRITER_SESSION_TIMEOUT_MS", "6000")]))
        .collect();
    let w = &services[0];
    let first = poll_until(Duration::from_secs(30), "the writer's /ready to answer", || async {
        w.get("/ready").filter(|(_, b)| !b.is_empty())
    })
    .await;
    if first.0 == 503 {
        let doc: serde_json::Value = serde_json::from_str(&first.1).unwrap();
        assert_eq!(doc["ready"], false, "{doc}");
        assert!(!doc["reasons"].as_array().unwrap().is_empty(), "{doc}");
    } else {
        // Only if it served both partitions before its first answer.
        assert_eq!(first.0, 200);
    }
    for s in &services {
        poll_until(Duration::from_secs(90), &format!("esk-{} to be ready", s.name), || async {
            (ready_code(s).await == Some(200)).then_some(())
        })
        .await;
        assert_eq!(s.get("/health").unwrap().0, 200);
    }
    let status = w.get_json("/status").unwrap();
    assert_eq!(status["partitions"].as_object().unwrap().len(), 2, "{status}");

    // The broker frozen: every service says so within seconds, and /status,
    // /ready and /metrics still answer at once (they never wait on Kafka).
    broker.freeze().unwrap();
    for s in &services {
        let doc = poll_until(Duration::from_secs(30), &format!("esk-{} to be unready", s.name), || async {
            s.get("/ready").filter(|(c, _)| *c == 503).map(|(_, b)| b)
        })
        .await;
        assert!(doc.contains("Kafka"), "esk-{}: {doc}", s.name);
        for path in ["/status", "/metrics", "/health"] {
            let started = Instant::now();
            let (code, _) = s.get(path).unwrap_or_else(|| panic!("esk-{} {path} did not answer", s.name));
            assert_eq!(code, 200, "esk-{} {path}", s.name);
            assert!(started.elapsed() < Duration::from_secs(3), "esk-{} {path} took {:?}", s.name, started.elapsed());
        }
    }
    broker.thaw().unwrap();
    for s in &services {
        poll_until(Duration::from_secs(90), &format!("esk-{} to be ready again", s.name), || async {
            (ready_code(s).await == Some(200)).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_described_with_build_info() {
    let env = TestEnv::new();
    env.init_topics(1);
    let w = Service::start(&env, "writer", &[]);
    let text = poll_until(Duration::from_secs(30), "the writer's /metrics", || async {
        w.get("/metrics").filter(|(c, b)| *c == 200 && b.contains("esk_build_info")).map(|(_, b)| b)
    })
    .await;
    assert!(text.contains("# HELP esk_build_info"), "{text}");
    assert!(text.contains("service=\"writer\""), "{text}");
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).unwrap();
        assert!(text.contains(&format!("# HELP {name}")), "{name} has no HELP line:\n{text}");
    }
}
