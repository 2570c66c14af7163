//! Clients in other languages against the real stack, through the HTTP
//! gateway alone: the shop's Python dispatcher (`examples/shop/dispatch`, its
//! own unittest suite) and Schemathesis, which drives every operation of the
//! committed OpenAPI document (`services/gateway/openapi.json`) and checks
//! each answer against it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use esk_tests::{Service, TestEnv, free_port_pair, poll_until, repo_root, run_bounded, wait_serving};

use crate::coordinator::coordinating;

const PARTITIONS: u32 = 2;

/// Schemathesis' checks: no 5xx, and every status, content type and body as
/// the document says. (Not its negative-data checks: which inputs the
/// gateway refuses is for the document's schemas to say, and they are loose
/// where the writer's rules decide.)
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance";

/// The writer (raw appends for every category but its aggregates'), what
/// else `full` asks for (the coordinator, a projector), and the gateway in
/// front of them, ready.
struct Stack {
    gateway: Service,
    _others: Vec<Service>,
    _env: TestEnv,
}

fn url(s: &Service) -> String {
    format!("http://{}", s.http)
}

async fn stack(full: bool) -> Stack {
    let env = TestEnv::new();
    env.init_topics(PARTITIONS);
    let writer = Service::start(&env, "writer", &[("ESK_WRITER_SESSION_TIMEOUT_MS", "6000")]);
    wait_serving(&[&writer], u64::from(PARTITIONS), Duration::from_secs(60)).await;
    // Nothing listens there: the services this stack lacks are down, not
    // whatever else runs on the machine's default ports.
    let nowhere = format!("http://127.0.0.1:{}", free_port_pair().expect("a free port"));
    let mut urls = [
        ("ESK_GATEWAY_WRITER_URL", url(&writer)),
        ("ESK_GATEWAY_REPLICA_URL", nowhere.clone()),
        ("ESK_GATEWAY_COORDINATOR_URL", nowhere.clone()),
        ("ESK_GATEWAY_PROJECTOR_URL", nowhere),
    ];
    let mut others = vec![writer];
    if full {
        let coordinator = Service::start(&env, "coordinator", &[]);
        coordinating(&coordinator, u64::from(PARTITIONS)).await;
        let projector = Service::start(&env, "projector", &[]);
        poll_until(Duration::from_secs(60), "the projector ready", || async {
            projector.get("/ready").filter(|(code, _)| *code == 200).map(|_| ())
        })
        .await;
        urls[2].1 = url(&coordinator);
        urls[3].1 = url(&projector);
        others.extend([coordinator, projector]);
    }
    let vars: Vec<(&str, &str)> = urls.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let gateway = Service::start(&env, "gateway", &vars);
    poll_until(Duration::from_secs(60), "the gateway's /health", || async {
        gateway.get("/health").filter(|(code, _)| *code == 200).map(|_| ())
    })
    .await;
    Stack { gateway, _others: others, _env: env }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_dispatcher_ships_every_confirmed_order_once_through_the_gateway() {
    let stack = stack(false).await;
    let dir = repo_root().join("examples/shop/dispatch");
    let mut cmd = Command::new("python3");
    esk_tests::owned(&mut cmd);
    cmd.args(["-m", "unittest", "-v"])
        .current_dir(&dir)
        .env("ESK_GATEWAY_URL", url(&stack.gateway))
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let ran = tokio::task::spawn_blocking(move || run_bounded(cmd, Duration::from_secs(600))).await.unwrap();
    println!("{}\n(python3 -m unittest: {:?})", ran.output, ran.elapsed);
    assert!(ran.ok, "the dispatcher's tests failed:\n{}\ngateway:\n{}", ran.output, stack.gateway.log_tail());
    // A suite that skipped itself (no ESK_GATEWAY_URL) proves nothing.
    assert!(ran.output.contains("\nOK") && !ran.output.contains("skipped="), "{}", ran.output);
}

/// The venv of `infra/tools/python.sh` (made on first use): Schemathesis at its pinned version.
fn tools_venv() -> std::path::PathBuf {
    let out = Command::new(repo_root().join("infra/tools/python.sh")).output().expect("running infra/tools/python.sh");
    assert!(out.status.success(), "infra/tools/python.sh failed:\n{}", String::from_utf8_lossy(&out.stderr));
    Path::new(String::from_utf8_lossy(&out.stdout).trim()).to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_server_error_and_no_answer_off_the_openapi_document() {
    let venv = tokio::task::spawn_blocking(tools_venv).await.unwrap();
    let stack = stack(true).await;
    poll_until(Duration::from_secs(60), "the gateway ready", || async {
        stack.gateway.get("/ready").filter(|(code, _)| *code == 200).map(|_| ())
    })
    .await;
    let schema = repo_root().join("services/gateway/openapi.json");
    assert!(schema.exists(), "{} is missing", schema.display());
    // In a folder of its own: Hypothesis keeps its example database in the working directory.
    let work = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(venv.join("bin/schemathesis"));
    esk_tests::owned(&mut cmd);
    cmd.arg("run")
        .arg(&schema)
        .args(["--url", &url(&stack.gateway)])
        .args(["--checks", CHECKS])
        // Subscriptions are Server-Sent Events that never end.
        .args(["--exclude-path-regex", "^/subscriptions"])
        // One worker: with threads, CPython 3.11's ast.parse fails now and then
        // inside Hypothesis ("AST constructor recursion depth mismatch",
        // CPython gh-106905), an error of the tool, not of the gateway.
        .args(["--max-examples", "50", "--request-timeout", "30", "--workers", "1"])
        .args(["--generation-database", "none", "--no-color"])
        .current_dir(work.path())
        .env("NO_COLOR", "1");
    let ran = tokio::task::spawn_blocking(move || run_bounded(cmd, Duration::from_secs(300))).await.unwrap();
    println!("{}\n(schemathesis: {:?})", ran.output, ran.elapsed);
    assert!(ran.ok, "schemathesis found failures:\n{}\ngateway:\n{}", ran.output, stack.gateway.log_tail());
}
