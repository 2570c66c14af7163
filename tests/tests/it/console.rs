//! The gateway's web console in a real browser: `tests/console/console.mjs`
//! drives Debian's Chromium with playwright-core against a writer, a
//! projector with a parked event, a coordinator and the gateway on the test's
//! broker, and leaves screenshots of each page in `target/console-screenshots/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use esk_tests::{Service, TestEnv, repo_root, wait_serving};
use esk_wire::protocol::ExpectedVersion;
use serde_json::json;

use crate::coordinator::{cmd, coordinating, coordinator};

const ADMIN_TOKEN: &str = "console-admin-token";
/// The script bounds each of its waits by 20 s and its whole run by 240 s.
const SCRIPT_BOUND: Duration = Duration::from_secs(300);

fn projector(env: &TestEnv, data: &Path, extra: &[(&str, &str)]) -> Service {
    let mut vars = vec![("ESK_DATA_DIR", data.to_str().expect("a UTF-8 path")), ("ESK_PROJECTOR_INSTANCE", "0")];
    vars.extend_from_slice(extra);
    let p = Service::start(env, "projector", &vars);
    let started = Instant::now();
    while p.get("/health").is_none() {
        assert!(started.elapsed() < Duration::from_secs(30), "the projector did not start: {}", p.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    p
}

/// The browser: Chromium must be installed, the test fails otherwise (it
/// does not skip, so a console nobody checked never passes for one).
fn chromium() -> String {
    let path = std::env::var("ESK_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&path).exists(),
        "no Chromium at {path}: the console's browser test needs it (apt-get install chromium, or set ESK_CHROMIUM)"
    );
    path
}

/// `tests/console`, with its node_modules (`npm ci` on the first run).
fn scripts() -> PathBuf {
    let dir = repo_root().join("tests/console");
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node is needed for the console's browser test (apt-get install nodejs npm)"
    );
    if !dir.join("node_modules/playwright-core").exists() {
        let out = Command::new("npm")
            .args(["ci", "--prefix"])
            .arg(&dir)
            .args(["--no-audit", "--no-fund", "--loglevel=error"])
            .output()
            .expect("running npm");
        assert!(
            out.status.success(),
            "npm ci --prefix tests/console failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

/// Parks one event in the accounts projection (a Deposited its schema does
/// not allow, written by a foreign producer), then restarts the projector
/// with a schema that allows it: the console's replay then applies it.
async fn park_one(env: &TestEnv, data: &Path, schemas: &Path) -> Service {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let p = projector(env, data, &[]);
    let client = env.client(Duration::from_secs(30), false);
    let stream = "account-parked";
    client.command(stream, ExpectedVersion::NoStream, cmd("OpenAccount", json!({"owner": "p"})), None).await.unwrap();
    let noted = esk_wire::Event {
        id: uuid::Uuid::new_v4().to_string(),
        source: "foreign".into(),
        event_type: "Deposited".into(),
        time: chrono::Utc::now(),
        stream: esk_wire::StreamName::parse(stream).unwrap(),
        version: 2,
        correlation_id: None,
        causation_id: None,
        data_schema: None,
        data: json!({"amount": 7, "note": "bonus"}),
    };
    let headers = noted.headers().iter().fold(rdkafka::message::OwnedHeaders::new(), |h, (k, v)| {
        h.insert(rdkafka::message::Header { key: k, value: v.as_deref() })
    });
    let producer: FutureProducer =
        env.kafka().producer(esk_kafka::Sending::Foreign { max_message_bytes: 1_000_000 }).create().unwrap();
    let topic = env.topics().events("account");
    let value = noted.value();
    producer
        .send(FutureRecord::to(&topic).key(stream).payload(&value).headers(headers), Duration::from_secs(10))
        .await
        .unwrap();
    // Applied past it: it was parked.
    let later =
        client.command(stream, ExpectedVersion::Any, cmd("Deposit", json!({"amount": 100})), None).await.unwrap();
    let (code, body) = p.get(&format!("/accounts/parked?after={}", later.position)).unwrap();
    assert_eq!(code, 200, "{body}");
    let metrics = p.get("/metrics").unwrap().1;
    assert!(metrics.contains("esk_projection_parked_total{projection=\"accounts\"} 1"), "nothing parked: {metrics}");

    std::fs::create_dir(schemas.join("account")).unwrap();
    std::fs::write(
        schemas.join("account/Deposited.v1.json"),
        json!({"type": "object", "required": ["amount"],
               "properties": {"amount": {"type": "integer", "minimum": 1}, "note": {"type": "string"}}})
        .to_string(),
    )
    .unwrap();
    p.kill();
    projector(env, data, &[("ESK_SCHEMAS_DIR", schemas.to_str().unwrap())])
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_shows_in_a_browser_what_the_api_wrote() {
    let chromium = chromium();
    let scripts = scripts();
    let env = TestEnv::new();
    env.init_topics(2);
    let writer = Service::start(&env, "writer", &[("ESK_WRITER_SESSION_TIMEOUT_MS", "6000")]);
    let coordinator = coordinator(&env, None);
    wait_serving(&[&writer], 2, Duration::from_secs(60)).await;
    coordinating(&coordinator, 2).await;
    let (data, schemas) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let projector = park_one(&env, data.path(), schemas.path()).await;

    // No replica runs here: the console shows it unreachable, with the reason.
    let no_replica = format!("http://127.0.0.1:{}", esk_tests::free_port_pair().unwrap());
    let url = |s: &Service| format!("http://{}", s.http);
    let gateway = Service::start(
        &env,
        "gateway",
        &[
            ("ESK_ADMIN_TOKEN", ADMIN_TOKEN),
            ("ESK_GATEWAY_WRITER_URL", &url(&writer)),
            ("ESK_GATEWAY_PROJECTOR_URL", &url(&projector)),
            ("ESK_GATEWAY_COORDINATOR_URL", &url(&coordinator)),
            ("ESK_GATEWAY_REPLICA_URL", &no_replica),
        ],
    );
    let started = Instant::now();
    while gateway.get("/ready").is_none_or(|(code, _)| code != 200) {
        assert!(started.elapsed() < Duration::from_secs(60), "the gateway is not ready: {}", gateway.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }

    let shots = repo_root().join("target/console-screenshots");
    let log = repo_root().join(format!("target/test-logs/{}-console.log", env.prefix));
    let file = std::fs::File::create(&log).expect("a log file");
    let mut script = esk_tests::owned(&mut Command::new("node"))
        .arg(scripts.join("console.mjs"))
        .env("ESK_GATEWAY_URL", url(&gateway))
        .env("ESK_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("ESK_PARKED_PROJECTION", "accounts")
        .env("ESK_EXPECT_REPLAYED", "1")
        .env("ESK_EXPECT_READY", "writer,projector,coordinator,gateway")
        .env("ESK_TEST_CATEGORY", "console")
        .env("ESK_CHROMIUM", &chromium)
        .env("ESK_SCREENSHOTS", &shots)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("a log file"))
        .stderr(file)
        .spawn()
        .expect("running node");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = script.try_wait().expect("waiting for node") {
            break Some(status);
        }
        if started.elapsed() > SCRIPT_BOUND {
            let _ = script.kill();
            let _ = script.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.is_some_and(|s| s.success()),
        "tests/console/console.mjs failed ({}) after {:.0?}:\n{output}\ngateway log:\n{}",
        status.map_or_else(|| format!("killed after {SCRIPT_BOUND:?}"), |s| s.to_string()),
        started.elapsed(),
        gateway.log_tail()
    );
    println!("{output}");
}
