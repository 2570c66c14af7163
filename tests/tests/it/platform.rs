//! `make up` / `make down`: the broker and topics come up once, a second `up`
//! changes nothing, `down` leaves no process and the port closed; `up` after a
//! service was SIGKILLed starts it again.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use esk_tests::{SHOP_HTTP_VARS, ShopWalk, bin, free_port_pair, http_get, repo_root};

/// The ports one `make up` of this test uses: the broker's and the writer's.
#[derive(Clone, Copy)]
struct Ports {
    kafka: u16,
    writer: u16,
    projector: u16,
    coordinator: u16,
    replica: u16,
    gateway: u16,
    /// The shop's: payments, its projector, inventory, orders, its projector, shipping.
    shop: [u16; 6],
}

fn make(target: &str, home: &Path, ports: Ports) -> (bool, String) {
    let bin_dir = bin("esk").parent().unwrap().to_owned();
    let mut cmd = Command::new("make");
    // The services `make up` starts inherit the marker: they die with this test process.
    esk_tests::owned(&mut cmd);
    for (var, port) in SHOP_HTTP_VARS.iter().zip(ports.shop) {
        cmd.env(var, format!("127.0.0.1:{port}"));
    }
    let out = cmd
        .arg("-s")
        .arg(target)
        .current_dir(repo_root())
        .env("ESK_HOME", home)
        .env("ESK_KAFKA_PORT", ports.kafka.to_string())
        .env("ESK_BIN_DIR", bin_dir)
        .env("ESK_PARTITIONS", "2")
        .env("ESK_WRITER_HTTP", format!("127.0.0.1:{}", ports.writer))
        .env("ESK_PROJECTOR_HTTP", format!("127.0.0.1:{}", ports.projector))
        .env("ESK_COORDINATOR_HTTP", format!("127.0.0.1:{}", ports.coordinator))
        .env("ESK_REPLICA_HTTP", format!("127.0.0.1:{}", ports.replica))
        .env("ESK_GATEWAY_HTTP", format!("127.0.0.1:{}", ports.gateway))
        .env_remove("KAFKA_BOOTSTRAP_SERVERS")
        .env_remove("ESK_TOPIC_PREFIX")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Whether `pid` is a process that still runs: neither gone nor a zombie (a
/// killed service's parent is init, which may reap it only seconds later).
fn pid_alive(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())) {
        // The state follows the command name in parentheses: "1234 (esk-writer) S ...".
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) if Path::new("/proc/self/stat").exists() => false,
        Err(_) => Command::new("kill")
            .args(["-0", pid.trim()])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
    }
}

#[test]
fn make_up_is_idempotent_and_make_down_leaves_nothing() {
    // Its own broker and services: no exclusive test (timing, the cluster) beside it.
    let _pass = esk_tests::shared();
    let home = tempfile::tempdir().unwrap();
    let ports = Ports::free();

    let port = ports.kafka;
    let (ok, out) = make("up", home.path(), ports);
    let guard = Down(home.path().to_owned(), ports);
    assert!(ok, "make up failed:\n{out}");
    assert!(port_open(port), "no broker on {port} after make up:\n{out}");
    assert!(out.contains("created"), "{out}");
    let pid = std::fs::read_to_string(home.path().join("run/kafka.pid")).unwrap();
    assert!(home.path().join("log/kafka.log").exists());

    let (ok, again) = make("up", home.path(), ports);
    assert!(ok, "second make up failed:\n{again}");
    assert!(again.contains("already running"), "{again}");
    assert!(again.contains("0 created"), "second make up changed topics:\n{again}");
    let same = std::fs::read_to_string(home.path().join("run/kafka.pid")).unwrap();
    assert_eq!(pid, same, "second make up restarted the broker");

    let (ok, status) = make("status", home.path(), ports);
    assert!(ok && status.contains("running"), "{status}");
    assert!(status.contains("writer: running"), "{status}");
    assert!(status.contains("projector: running"), "{status}");
    assert!(status.contains("coordinator: running"), "{status}");
    assert!(status.contains("replica: running"), "{status}");
    assert!(status.contains("gateway: running"), "{status}");
    let projector_pid = std::fs::read_to_string(home.path().join("run/projector.pid")).unwrap();
    assert!(home.path().join("data").is_dir(), "the projector's store lives under ESK_HOME/data");

    let writer_pid = std::fs::read_to_string(home.path().join("run/writer.pid")).unwrap();
    assert!(home.path().join("log/writer.log").exists());

    // The shop runs beside the platform, and the README's walkthrough works:
    // an order placed is checked out by the saga across three contexts.
    for service in ["payments", "inventory", "orders", "shipping"] {
        assert!(status.contains(&format!("shop-{service}: running")), "{status}");
    }
    let shop_pids: Vec<String> = ["payments", "inventory", "orders", "shipping"]
        .iter()
        .map(|s| std::fs::read_to_string(home.path().join(format!("run/shop-{s}.pid"))).unwrap())
        .collect();
    let shop = ShopWalk {
        bootstrap: format!("127.0.0.1:{}", ports.kafka),
        orders_projector: format!("127.0.0.1:{}", ports.shop[4]),
    };
    shop.stock();
    shop.checkout("1", Duration::from_secs(60)).unwrap();
    // The shipping context's model and the payments context's agree, soon.
    for (port, path, want) in
        [(ports.shop[5], "/shipments/1", "to_ship"), (ports.shop[1], "/accounts/ann", r#""balance":4300"#)]
    {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = http_get(&format!("127.0.0.1:{port}"), path).map(|(_, body)| body).unwrap_or_default();
            if got.contains(want) {
                break;
            }
            assert!(Instant::now() < deadline, "{path}: {got}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // The gateway serves the same installation over HTTP, and its console
    // sees every service of the platform and the shop.
    let gateway = ports.http("gateway");
    let (code, body) = http_get(&gateway, "/streams/order-1").unwrap_or_default();
    assert!(code == 200 && body.contains(r#""type":"Confirmed""#), "{code} {body}");
    let (_, services) = http_get(&gateway, "/services").unwrap_or_default();
    let services: serde_json::Value = serde_json::from_str(&services).unwrap_or_default();
    let ready: Vec<&str> = services["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["ready"] == true)
        .filter_map(|s| s["url"].as_str())
        .collect();
    assert_eq!(ready.len(), 11, "the gateway, 4 writers, 4 projectors, the replica and the coordinator: {services}");
    let gateway_pid = std::fs::read_to_string(home.path().join("run/gateway.pid")).unwrap();

    drop(guard);
    assert!(!pid_alive(&gateway_pid), "gateway pid {gateway_pid} alive after make down");
    for pid in &shop_pids {
        assert!(!pid_alive(pid), "a shop service (pid {pid}) alive after make down");
    }
    assert!(!port_open(port), "port {port} still open after make down");
    assert!(!pid_alive(&pid), "broker pid {pid} alive after make down");
    assert!(!pid_alive(&writer_pid), "writer pid {writer_pid} alive after make down");
    assert!(!pid_alive(&projector_pid), "projector pid {projector_pid} alive after make down");

    assert!(!home.path().join("run/kafka.pid").exists());
}

/// Runs `make down` even when an assertion failed, so no broker leaks.
struct Down(std::path::PathBuf, Ports);

impl Drop for Down {
    fn drop(&mut self) {
        let (ok, out) = make("down", &self.0, self.1);
        assert!(ok || std::thread::panicking(), "make down failed:\n{out}");
    }
}

impl Ports {
    fn free() -> Self {
        Self {
            kafka: free_port_pair().unwrap(),
            writer: free_port_pair().unwrap(),
            projector: free_port_pair().unwrap(),
            coordinator: free_port_pair().unwrap(),
            replica: free_port_pair().unwrap(),
            gateway: free_port_pair().unwrap(),
            shop: [(); 6].map(|()| free_port_pair().unwrap()),
        }
    }

    fn http(&self, service: &str) -> String {
        let port = match service {
            "writer" => self.writer,
            "projector" => self.projector,
            "coordinator" => self.coordinator,
            "replica" => self.replica,
            "gateway" => self.gateway,
            other => panic!("no service {other}"),
        };
        format!("127.0.0.1:{port}")
    }
}

const RESTARTS: usize = 20;

/// `make up` right after a service was SIGKILLed starts it again, every time,
/// for every service: the killed process is a zombie until init reaps it (on
/// some machines a second or two later), and `up` took it for a running one.
/// Each round: SIGKILL, wait until the process no longer runs (a zombie or
/// gone, never longer), `make up`, then the service answers `/health` from a
/// new pid, and a command through the writer succeeds. A writer's round takes
/// about 6 s, its group's session timeout: the new writer gets the partitions
/// when the killed one's session expires (the broker's minimum session
/// timeout is 6 s, so a shorter one is refused).
#[test]
fn make_up_restarts_every_service_after_sigkill() {
    let _pass = esk_tests::shared();
    let home = tempfile::tempdir().unwrap();
    let ports = Ports::free();
    let up = || make("up", home.path(), ports);
    let (ok, out) = up();
    let _guard = Down(home.path().to_owned(), ports);
    assert!(ok, "make up failed:\n{out}");
    let bootstrap = format!("127.0.0.1:{}", ports.kafka);
    let command = |stream: &str| {
        Command::new(bin("esk"))
            .args(["--bootstrap-servers", &bootstrap, "--prefix", "esk", "--timeout", "20s"])
            .args(["command", stream, "OpenAccount", r#"{"owner": "ann"}"#])
            .env_remove("ESK_TIMEOUT")
            .output()
            .unwrap()
    };
    let log =
        |service: &str| std::fs::read_to_string(home.path().join(format!("log/{service}.log"))).unwrap_or_default();
    for service in ["writer", "projector", "replica", "coordinator", "gateway"] {
        let started = Instant::now();
        let mut slowest = Duration::ZERO;
        for round in 1..=RESTARTS {
            let t0 = Instant::now();
            let pid_file = home.path().join(format!("run/{service}.pid"));
            let pid = std::fs::read_to_string(&pid_file).unwrap();
            assert!(pid_alive(&pid), "{service} pid {pid} not running before round {round}");
            let killed = Command::new("kill").args(["-KILL", pid.trim()]).status().unwrap();
            assert!(killed.success(), "kill -KILL {pid}");
            let deadline = Instant::now() + Duration::from_secs(10);
            while pid_alive(&pid) {
                assert!(Instant::now() < deadline, "{service} pid {pid} still runs 10 s after SIGKILL");
                std::thread::sleep(Duration::from_millis(10));
            }

            let (ok, out) = up();
            let ctx = || format!("{service}, round {round}:\n{out}\n{service}.log:\n{}", tail(&log(service)));
            assert!(ok, "make up after SIGKILL failed: {}", ctx());
            assert!(out.contains(&format!("{service} started")), "make up did not start a new {}", ctx());
            let new_pid = std::fs::read_to_string(&pid_file).unwrap();
            assert_ne!(pid, new_pid, "the pid file still names the killed process: {}", ctx());
            assert!(pid_alive(&new_pid), "{service} pid {new_pid} not running after make up: {}", ctx());
            let health = http_get(&ports.http(service), "/health");
            assert!(health.as_ref().is_some_and(|(code, _)| *code == 200), "/health: {health:?}: {}", ctx());
            if service == "writer" {
                let out = command(&format!("account-r{round}"));
                assert!(
                    out.status.success(),
                    "a command after the writer's restart: {} {}{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    ctx()
                );
            }
            slowest = slowest.max(t0.elapsed());
        }
        eprintln!("{service}: {RESTARTS} restarts in {:.1?}, slowest {slowest:.1?}", started.elapsed());
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
