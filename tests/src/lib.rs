//! The integration-test harness: a real Kafka broker for the run, and isolation
//! for every test.
//!
//! # Layout
//! - [`broker`]: the broker of this test run, chosen once:
//!   1. `KAFKA_BOOTSTRAP_SERVERS` if set (a broker you run yourself);
//!   2. else a testcontainers Kafka where a Docker engine answers;
//!   3. else the local broker of `infra/kafka` on free ports in a temp dir, tied to
//!      this process by a watchdog so it dies with the run.
//!
//!   `ESK_TEST_BROKER=local|docker` forces 2 or 3.
//! - [`Cluster`]: a 3-node KRaft cluster on one host for replication and failover tests.
//! - [`TestEnv`]: per-test topic prefix, group ids and transactional ids.
//! - [`Esk`]: runs the real `esk` binary with the test's broker and prefix.
//! - [`poll_until`]: deadlines instead of sleeps.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// How the run's broker was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    External,
    Container,
    Local,
}

/// The run's broker.
#[derive(Debug)]
pub struct Broker {
    pub bootstrap: String,
    pub kind: BrokerKind,
}

static BROKER: OnceLock<Broker> = OnceLock::new();

/// The broker of this test run, started on first use.
pub fn broker() -> &'static Broker {
    BROKER.get_or_init(|| {
        start_broker().unwrap_or_else(|e| panic!("no Kafka broker for the tests: {e:#}"))
    })
}

fn start_broker() -> Result<Broker> {
    if let Ok(bootstrap) = std::env::var("KAFKA_BOOTSTRAP_SERVERS")
        && !bootstrap.trim().is_empty()
    {
        return Ok(Broker {
            bootstrap,
            kind: BrokerKind::External,
        });
    }
    let forced = std::env::var("ESK_TEST_BROKER").unwrap_or_default();
    if forced == "docker" || (forced != "local" && docker_answers()) {
        return start_container();
    }
    start_local()
}

/// Whether a Docker engine answers on its socket (the `docker` client alone is not enough).
fn docker_answers() -> bool {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let path = std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|h| h.strip_prefix("unix://").map(str::to_owned))
        .unwrap_or_else(|| "/var/run/docker.sock".into());
    let Ok(mut s) = UnixStream::connect(path) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /_ping HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.") && buf.contains(" 200 ")
}

fn start_container() -> Result<Broker> {
    use testcontainers::ImageExt;
    use testcontainers::runners::SyncRunner;
    use testcontainers_modules::kafka::apache::{KAFKA_PORT, Kafka};
    let container = Kafka::default()
        .with_env_var("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
        .with_env_var("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
        .with_env_var("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0")
        .with_env_var("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false")
        .start()
        .context("starting a Kafka container")?;
    let port = container.get_host_port_ipv4(KAFKA_PORT)?;
    // The container lives as long as the test process; testcontainers' reaper
    // removes it when the process ends.
    std::mem::forget(container);
    Ok(Broker {
        bootstrap: format!("127.0.0.1:{port}"),
        kind: BrokerKind::Container,
    })
}

fn kafka_sh() -> PathBuf {
    repo_root().join("infra/kafka/kafka.sh")
}

/// Runs `infra/kafka/kafka.sh` with a state dir of its own; the broker is tied
/// to this process (`--watch-pid`) and its data removed when it dies.
fn start_local() -> Result<Broker> {
    let home = tempfile::Builder::new()
        .prefix("esk-test-kafka-")
        .tempdir()?
        .keep();
    let port = free_port_pair()?;
    let status = Command::new(kafka_sh())
        .args(["start", "--watch-pid", &std::process::id().to_string()])
        .env("ESK_HOME", &home)
        .env("ESK_KAFKA_PORT", port.to_string())
        .env("ESK_KAFKA_EPHEMERAL", "1")
        .stdout(Stdio::null())
        .status()
        .context("running infra/kafka/kafka.sh")?;
    if !status.success() {
        bail!(
            "infra/kafka/kafka.sh start failed ({status}); see {}/log/kafka.log",
            home.display()
        );
    }
    Ok(Broker {
        bootstrap: format!("127.0.0.1:{port}"),
        kind: BrokerKind::Local,
    })
}

/// A port p with p and p + 1 free (a KRaft node's client and controller ports).
pub fn free_port_pair() -> Result<u16> {
    for _ in 0..50 {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let p = l.local_addr()?.port();
        if p < 65000 && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return Ok(p);
        }
    }
    bail!("no two adjacent free ports found")
}

/// A 3-node KRaft cluster on one host, in a temp dir, on free ports. Stopped
/// and removed on drop (and by the watchdog if the test process dies).
#[derive(Debug)]
pub struct Cluster {
    home: PathBuf,
    ports: [u16; 3],
}

impl Cluster {
    pub fn start() -> Result<Self> {
        let home = tempfile::Builder::new()
            .prefix("esk-test-cluster-")
            .tempdir()?
            .keep();
        let mut ports = [0u16; 3];
        for i in 0..3 {
            // Step past the ports already picked and their controller neighbours.
            loop {
                let candidate = free_port_pair()?;
                if !ports.iter().any(|q| candidate.abs_diff(*q) <= 1) {
                    ports[i] = candidate;
                    break;
                }
            }
        }
        let cluster = Self { home, ports };
        cluster.script(&[
            "cluster",
            "start",
            "--watch-pid",
            &std::process::id().to_string(),
        ])?;
        Ok(cluster)
    }

    fn script(&self, args: &[&str]) -> Result<()> {
        let ports = self.ports.map(|p| p.to_string()).join(" ");
        let status = Command::new(kafka_sh())
            .args(args)
            .env("ESK_HOME", &self.home)
            .env("ESK_KAFKA_CLUSTER_PORTS", ports)
            .env("ESK_KAFKA_EPHEMERAL", "1")
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!(
                "kafka.sh {args:?} failed ({status}); logs in {}/log",
                self.home.display()
            );
        }
        Ok(())
    }

    pub fn bootstrap(&self) -> String {
        self.ports.map(|p| format!("127.0.0.1:{p}")).join(",")
    }

    /// The client address of node `n` (1..=3).
    pub fn node(&self, n: usize) -> String {
        format!("127.0.0.1:{}", self.ports[n - 1])
    }

    /// SIGKILL node `n` (1..=3).
    pub fn kill(&self, n: usize) -> Result<()> {
        self.script(&["cluster", "kill", &n.to_string()])
    }

    /// Start node `n` again on its old data; returns once it answers.
    pub fn restart(&self, n: usize) -> Result<()> {
        self.script(&["cluster", "restart", &n.to_string()])
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.script(&["cluster", "stop"]);
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

/// Per-test isolation: a topic prefix, and ids derived from it.
#[derive(Debug, Clone)]
pub struct TestEnv {
    pub bootstrap: String,
    pub prefix: String,
}

impl TestEnv {
    /// A fresh prefix on the run's broker.
    pub fn new() -> Self {
        Self::on(&broker().bootstrap)
    }

    /// A fresh prefix on the given cluster.
    pub fn on(bootstrap: &str) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            bootstrap: bootstrap.to_owned(),
            prefix: format!("t{}", &id[..12]),
        }
    }

    pub fn topics(&self) -> esk_wire::Topics {
        esk_wire::Topics::new(&self.prefix)
    }

    /// A group id or transactional id unique to this test.
    pub fn id(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }

    pub fn kafka(&self) -> esk_kafka::KafkaConfig {
        esk_kafka::KafkaConfig::new(&self.bootstrap, Duration::from_secs(15))
            .expect("valid bootstrap")
    }

    /// The `esk` binary, set up for this test's broker and prefix.
    pub fn esk(&self) -> Esk {
        let mut cmd = Command::new(bin("esk"));
        cmd.env("KAFKA_BOOTSTRAP_SERVERS", &self.bootstrap)
            .env("ESK_TOPIC_PREFIX", &self.prefix)
            .env_remove("ESK_TIMEOUT");
        Esk { cmd }
    }
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

/// A built binary of the workspace (built on first use if missing).
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    // Test binaries live in target/<profile>/deps; the workspace's binaries one up.
    let exe = std::env::current_exe().expect("the test binary has a path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_owned();
    let path = dir.join(name);
    if !path.exists() {
        BUILT.get_or_init(|| {
            let release = dir.file_name().is_some_and(|n| n == "release");
            let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cmd.args(["build", "--workspace", "--bins"])
                .current_dir(repo_root());
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("running cargo build");
            assert!(status.success(), "cargo build --bins failed");
        });
    }
    path
}

/// A command line for the `esk` binary.
#[derive(Debug)]
pub struct Esk {
    cmd: Command,
}

impl Esk {
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.cmd.args(args);
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.cmd.env(key, value);
        self
    }

    pub fn run(mut self) -> Run {
        let started = Instant::now();
        let out: Output = self.cmd.output().expect("running esk");
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: started.elapsed(),
        }
    }
}

/// What a finished `esk` run printed and returned.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    /// Asserts exit code 0 and returns self.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, Some(0), "esk failed: {self:#?}");
        self
    }

    /// Asserts the exit code and returns self.
    #[track_caller]
    pub fn code(self, want: i32) -> Self {
        assert_eq!(self.code, Some(want), "unexpected exit code: {self:#?}");
        self
    }

    /// stdout as one JSON document.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }
}

/// Polls `check` until it returns `Some`, or fails after `timeout` with `what`.
pub async fn poll_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
