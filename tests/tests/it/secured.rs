//! esk on a secured broker (ADR 10: SASL_SSL, SCRAM-SHA-512, no ACL means
//! denied). Each service runs as its own user with only the ACLs that `esk
//! acls --commands` prints, and `esk` as `client`; a refused login and a
//! missing ACL end `esk` with exit 5 well before its timeout, naming which;
//! the client cannot write what only the services may.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use esk_tests::{Esk, SecuredBroker, Service, TestEnv, poll_until, wait_serving};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;

const PARTITIONS: u32 = 2;
const SESSION_MS: &str = "6000";
/// The users of the broker: esk's roles, and one that gets no ACL at all.
const USERS: &[&str] = &["writer", "coordinator", "projector", "replica", "client", "nobody"];

/// The module's broker and the one installation on it: topics made by
/// admin, every role's ACLs applied.
#[derive(Debug)]
struct Installation {
    broker: SecuredBroker,
    prefix: String,
}

static INSTALLATION: OnceLock<Result<Installation, String>> = OnceLock::new();

fn installation() -> &'static Installation {
    match INSTALLATION.get_or_init(|| set_up().map_err(|e| format!("{e:#}"))) {
        Ok(i) => i,
        Err(e) => panic!("no secured installation: {e}"),
    }
}

fn set_up() -> anyhow::Result<Installation> {
    let started = Instant::now();
    let broker = SecuredBroker::start(USERS)?;
    let prefix = format!("s{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let mut env = TestEnv::on(&broker.bootstrap);
    env.prefix = prefix.clone();
    let admin = broker.client_config("admin", "librdkafka");
    let init = env
        .esk()
        .env("ESK_KAFKA_CONFIG", admin.to_str().unwrap())
        .args(["topics", "init", "--partitions", &PARTITIONS.to_string(), "--shards", &PARTITIONS.to_string()])
        .run();
    anyhow::ensure!(init.code == Some(0), "esk topics init as admin: {init:#?}");
    println!("broker and topics in {:?}", started.elapsed());
    let lines = env.esk().args(["acls", "--commands"]).run().ok().stdout;
    let count = lines.lines().count();
    broker.admin_tool_lines("AclCommand", &lines)?;
    println!("{count} ACL lines applied; set up in {:?}", started.elapsed());
    Ok(Installation { broker, prefix })
}

/// A test's view of the installation (the shared prefix).
fn env() -> TestEnv {
    let i = installation();
    let mut env = TestEnv::on(&i.broker.bootstrap);
    env.prefix = i.prefix.clone();
    env
}

fn config(user: &str) -> String {
    installation().broker.client_config(user, "librdkafka").display().to_string()
}

/// `esk` as `user`.
fn esk_as(env: &TestEnv, user: &str) -> Esk {
    env.esk().env("ESK_KAFKA_CONFIG", &config(user))
}

/// A service as the user of its role.
fn service(env: &TestEnv, name: &str, extra: &[(&str, &str)]) -> Service {
    let file = config(name);
    let mut all = vec![("ESK_KAFKA_CONFIG", file.as_str())];
    all.extend_from_slice(extra);
    Service::start(env, name, &all)
}

fn serving(w: &Service) -> u64 {
    w.get_json("/health").and_then(|h| h["partitions_serving"].as_u64()).unwrap_or(0)
}

fn position(run: &esk_tests::Run) -> String {
    run.json()["position"].as_str().unwrap_or_else(|| panic!("no position: {run:#?}")).to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_role_works_with_only_its_acls_and_a_killed_writers_partitions_answer_again() {
    let env = env();
    let w1 = service(&env, "writer", &[("ESK_WRITER_SESSION_TIMEOUT_MS", SESSION_MS)]);
    let c = service(&env, "coordinator", &[("ESK_COORDINATOR_SESSION_TIMEOUT_MS", SESSION_MS)]);
    let p = service(&env, "projector", &[]);
    let r = service(&env, "replica", &[]);
    wait_serving(&[&w1], u64::from(PARTITIONS), Duration::from_secs(90)).await;
    poll_until(Duration::from_secs(90), "the coordinator to own every partition", || async {
        c.get_json("/health").filter(|h| h["partitions_owned"] == u64::from(PARTITIONS)).map(|_| ())
    })
    .await;
    let esk = || esk_as(&env, "client").args(["--timeout", "30s", "--json"]);

    esk().args(["append", "note-s1", "Written", r#"{"n": 1}"#]).run().ok();
    esk().args(["command", "account-sa", "OpenAccount", r#"{"owner": "a"}"#]).run().ok();
    esk().args(["command", "account-sa", "Deposit", r#"{"amount": 100}"#]).run().ok();
    esk().args(["command", "account-sb", "OpenAccount", r#"{"owner": "b"}"#]).run().ok();
    let tx = esk().args(["tx", "transfer", "account-sa", "account-sb", "10"]).run().ok().json();
    assert_eq!(tx["outcome"], "committed", "{tx}");
    let last = position(&esk().args(["command", "account-sb", "Deposit", r#"{"amount": 1}"#]).run().ok());
    let read = esk().args(["read", "account-sa"]).run().ok();
    assert!(read.stdout.lines().count() >= 3, "opened, deposited, the transfer's: {read:#?}");

    // The projection and the replica, each reading as its own user.
    let balance = poll_until(Duration::from_secs(60), "the projector to apply the deposit", || async {
        let (code, body) = p.get(&format!("/accounts/sb?after={last}&timeout_ms=1000"))?;
        (code == 200).then(|| serde_json::from_str::<Value>(&body).unwrap()["balance"].clone())
    })
    .await;
    assert_eq!(balance, 11, "{}", p.log_tail());
    let version = poll_until(Duration::from_secs(60), "the replica to apply the deposit", || async {
        let (code, body) = r.get(&format!("/streams/account-sb?after={last}"))?;
        (code == 200).then(|| serde_json::from_str::<Value>(&body).unwrap()["version"].clone())
    })
    .await;
    assert!(version.as_u64().is_some_and(|v| v >= 3), "{version} {}", r.log_tail());

    // Two writers; the first is SIGKILLed: its partitions answer the next appends.
    let w2 = service(&env, "writer", &[("ESK_WRITER_SESSION_TIMEOUT_MS", SESSION_MS)]);
    poll_until(Duration::from_secs(90), "both writers to serve", || async {
        (serving(&w1) > 0 && serving(&w2) > 0 && serving(&w1) + serving(&w2) == u64::from(PARTITIONS)).then_some(())
    })
    .await;
    let streams: Vec<String> = (0..PARTITIONS as i32)
        .map(|want| {
            (0..)
                .map(|i| format!("note-k{i}"))
                .find(|s| esk_wire::partition::partition_for(s.as_bytes(), PARTITIONS as i32) == want)
                .unwrap()
        })
        .collect();
    let killed = Instant::now();
    w1.kill();
    let appends: Vec<_> = streams.iter().map(|s| esk().args(["append", s, "Written", "{}"]).spawn()).collect();
    for (s, a) in streams.iter().zip(appends) {
        let run = a.wait();
        assert_eq!(run.code, Some(0), "{s} after the kill: {run:#?}\n{}", w2.log_tail());
        println!("{s}: answered {:?} after the SIGKILL (session timeout {SESSION_MS} ms)", killed.elapsed());
    }
    assert!(killed.elapsed() < Duration::from_secs(30), "took {:?}", killed.elapsed());
    // /health counts a partition once its phase is set: a moment after it answers.
    poll_until(Duration::from_secs(30), "the second writer to report every partition", || async {
        (serving(&w2) == u64::from(PARTITIONS)).then_some(())
    })
    .await;
}

/// What a refused login or a missing ACL is tried with: every path of `esk`
/// that reaches Kafka (the request/reply client, a reader, the admin client).
const CLI_PATHS: [&[&str]; 5] = [
    &["append", "note-pw", "Written", "{}"],
    &["command", "account-pw", "OpenAccount", r#"{"owner": "p"}"#],
    &["read", "note-pw"],
    &["tx", "transfer", "account-pw1", "account-pw2", "1"],
    &["topics", "describe"],
];

/// How long a refusal may take to end a run: about a second when quiet; the
/// margin is for a loaded machine, and well below the runs' 20 s timeout.
const FAST: Duration = Duration::from_secs(12);

#[test]
fn a_wrong_password_ends_esk_at_once_naming_authentication() {
    let env = env();
    for args in CLI_PATHS {
        let run = esk_as(&env, "client")
            .env("ESK_KAFKA_SASL_PASSWORD", "not-the-password")
            .args(["--timeout", "20s"])
            .args(args)
            .run()
            .code(5);
        assert!(run.stderr.to_lowercase().contains("authentication"), "{args:?}: {run:#?}");
        assert!(!run.stderr.contains("not-the-password"), "the password is shown: {run:#?}");
        println!("esk {args:?} with a wrong password: exit 5 after {:?}", run.elapsed);
        assert!(run.elapsed < FAST, "{args:?}: {run:#?}");
    }
}

#[test]
fn a_principal_without_an_acl_is_refused_naming_authorization() {
    let env = env();
    let cases: [(&str, &[&str]); 4] = [
        ("nobody", &["append", "note-na", "Written", "{}"]),
        ("nobody", &["read", "note-na"]),
        ("replica", &["command", "account-na", "OpenAccount", r#"{"owner": "n"}"#]),
        ("client", &["dlq", "list", "writer"]),
    ];
    for (user, args) in cases {
        let run = esk_as(&env, user).args(["--timeout", "20s"]).args(args).run().code(5);
        assert!(run.stderr.to_lowercase().contains("authorization"), "{user} {args:?}: {run:#?}");
        println!("esk {args:?} as {user}: exit 5 after {:?}", run.elapsed);
        assert!(run.elapsed < FAST, "{run:#?}");
    }
}

/// A service that cannot log in, or whose principal has no ACL, stops at
/// start with exit 5 and a log line naming which, instead of retrying.
#[test]
fn a_service_refused_by_the_brokers_stops_at_once_naming_why() {
    let env = env();
    for name in ["writer", "coordinator", "projector", "replica"] {
        for (refusal, user, extra) in [
            ("authentication", name, &[("ESK_KAFKA_SASL_PASSWORD", "not-the-password")][..]),
            ("authorization", "nobody", &[]),
        ] {
            let started = Instant::now();
            let file = config(user);
            let mut all = vec![("ESK_KAFKA_CONFIG", file.as_str())];
            all.extend_from_slice(extra);
            let mut s = Service::start(&env, name, &all);
            let code = s.exit_code(Duration::from_secs(30));
            let log = std::fs::read_to_string(&s.log).unwrap_or_default();
            println!("esk-{name} refused ({refusal}): exit {code:?} after {:?}", started.elapsed());
            assert_eq!(code, Some(5), "esk-{name} ({refusal}): {}", s.log_tail());
            assert!(log.to_lowercase().contains(refusal), "esk-{name}: {}", s.log_tail());
            assert!(!log.contains("not-the-password"), "esk-{name} logs the password: {}", s.log_tail());
            assert!(started.elapsed() < Duration::from_secs(20), "esk-{name} took {:?}", started.elapsed());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
#[allow(clippy::result_large_err, reason = "rdkafka's delivery result")]
async fn the_client_may_not_write_the_state_or_the_decisions() {
    let env = env();
    let properties = esk_kafka::Properties::load(Some(std::path::Path::new(&config("client"))), Vec::new()).unwrap();
    let kafka = env.kafka().with_properties(properties).unwrap();
    let producer: FutureProducer =
        kafka.producer(esk_kafka::Sending::Foreign { max_message_bytes: 1_000_000 }).create().unwrap();
    let t = env.topics();
    for topic in [t.state(), t.tx_commit(), t.answers(), t.events("account")] {
        let record = FutureRecord::to(&topic).partition(0).key("account-forged").payload("{}");
        let sent = tokio::time::timeout(Duration::from_secs(60), producer.send(record, Duration::from_secs(20)))
            .await
            .unwrap_or_else(|_| panic!("no delivery report for {topic} within 60 s"));
        let code = sent.err().and_then(|(e, _)| e.rdkafka_error_code());
        assert_eq!(code, Some(RDKafkaErrorCode::TopicAuthorizationFailed), "{topic}");
    }
}
