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

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_owned()
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

static BROKER: OnceLock<Result<Broker, String>> = OnceLock::new();

/// The broker of this test run, started on first use. A failed start fails
/// every test that needs the broker with the same message (and its log),
/// rather than each trying again for minutes.
pub fn broker() -> &'static Broker {
    match BROKER.get_or_init(|| start_broker().map_err(|e| format!("{e:#}"))) {
        Ok(broker) => broker,
        Err(e) => panic!("no Kafka broker for the tests: {e}"),
    }
}

fn start_broker() -> Result<Broker> {
    if let Ok(bootstrap) = std::env::var("KAFKA_BOOTSTRAP_SERVERS")
        && !bootstrap.trim().is_empty()
    {
        return Ok(Broker { bootstrap, kind: BrokerKind::External });
    }
    let forced = std::env::var("ESK_TEST_BROKER").unwrap_or_default();
    if forced == "docker" || (forced != "local" && docker_answers()) {
        return start_container();
    }
    start_local()
}

/// Whether a Docker engine answers on its socket (the `docker` client alone is not enough).
pub fn docker_answers() -> bool {
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

/// A Kafka container: the image `infra/docker/build.sh` builds here
/// (`esk/kafka:<the pom's Kafka version>`, no registry), on the host's
/// network, listening on 127.0.0.1 alone. testcontainers' blocking runner
/// makes a runtime of its own, which may not run inside a test's tokio
/// runtime: it runs on a thread of its own.
fn start_container() -> Result<Broker> {
    std::thread::spawn(start_container_here)
        .join()
        .map_err(|_| anyhow::anyhow!("starting a Kafka container panicked"))?
}

fn start_container_here() -> Result<Broker> {
    use testcontainers::core::WaitFor;
    use testcontainers::runners::SyncRunner;
    use testcontainers::{GenericImage, ImageExt};
    let built = Command::new(repo_root().join("infra/docker/build.sh"))
        .stderr(Stdio::inherit())
        .output()
        .context("running infra/docker/build.sh")?;
    if !built.status.success() {
        bail!("infra/docker/build.sh failed ({}): the Docker path needs the image esk/kafka", built.status);
    }
    let image = String::from_utf8_lossy(&built.stdout).trim().to_owned();
    let (name, tag) = image.split_once(':').context("infra/docker/build.sh printed no image name")?;
    let port = free_port_pair()?;
    let container_name = format!("esk-test-kafka-{}-{port}", std::process::id());
    // The container outlives nothing of the test process: a watchdog removes
    // it when the process ends, however it ends (SIGKILL too), from before
    // it exists.
    watch_container(&container_name)?;
    let started = GenericImage::new(name, tag)
        .with_wait_for(WaitFor::message_on_stdout("Kafka Server started"))
        .with_network("host")
        .with_env_var("ESK_KAFKA_PORT", port.to_string())
        .with_container_name(&container_name)
        .with_label("esk.test-pid", std::process::id().to_string())
        .with_startup_timeout(Duration::from_secs(120))
        .start();
    let container = match started {
        Ok(c) => c,
        Err(e) => {
            let kept = container_logs(&container_name, port);
            let _ = Command::new("docker").args(["rm", "-f", "-v", &container_name]).output();
            bail!("starting a Kafka container of {image}: {e}; its log: {kept}");
        }
    };
    // The static broker is never dropped; the watchdog removes the container.
    std::mem::forget(container);
    Ok(Broker { bootstrap: format!("127.0.0.1:{port}"), kind: BrokerKind::Container })
}

/// A container's log under `target/test-logs/`, for a failed start.
fn container_logs(name: &str, port: u16) -> String {
    let dir = repo_root().join("target/test-logs");
    let path = dir.join(format!("kafka-container-{port}.log"));
    let out = Command::new("docker").args(["logs", name]).output();
    let text = match out {
        Ok(o) => format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
        Err(e) => format!("docker logs {name}: {e}"),
    };
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, text)) {
        Ok(()) => path.display().to_string(),
        Err(e) => format!("(not kept: {e})"),
    }
}

/// Starts a detached watchdog that removes the container `name` once this
/// process is gone (as `kafka.sh start --watch-pid` kills the local broker).
fn watch_container(name: &str) -> Result<()> {
    let script = r#"while kill -0 "$1" 2>/dev/null; do sleep 1; done; docker rm -f -v "$2" >/dev/null 2>&1"#;
    spawn_watchdog("esk-container-watch", script, name).context("starting the container's watchdog")
}

/// Starts `script` (sh, `$1` this process's pid, `$2` what it watches over)
/// detached in a session of its own, so that it outlives this process. It
/// never carries [`OWNER_VAR`]: the sweep of [`owned`] must not end it.
fn spawn_watchdog(name: &str, script: &str, arg: &str) -> std::io::Result<()> {
    Command::new("setsid")
        .args(["sh", "-c", script, name, &std::process::id().to_string(), arg])
        .env_remove(OWNER_VAR)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(drop)
}

/// Starts a detached watchdog that removes the containers and volumes of the
/// compose project `project` once this process is gone, however it ends.
pub fn watch_compose_project(project: &str) -> Result<()> {
    // A compose command still running may create a container after a pass:
    // passes go on until two in a row find none (a minute at most).
    let script = r#"while kill -0 "$1" 2>/dev/null; do sleep 1; done
label="label=com.docker.compose.project=$2"
quiet=0
for _ in $(seq 1 60); do
  left=$(docker ps -aq --filter "$label")
  if [ -z "$left" ]; then
    quiet=$((quiet + 1))
    [ "$quiet" -ge 2 ] && break
  else
    quiet=0
    echo "$left" | xargs docker rm -f -v >/dev/null 2>&1
  fi
  sleep 1
done
docker volume ls -q --filter "$label" | xargs -r docker volume rm >/dev/null 2>&1"#;
    spawn_watchdog("esk-compose-watch", script, project).context("starting the compose project's watchdog")
}

fn kafka_sh() -> PathBuf {
    repo_root().join("infra/kafka/kafka.sh")
}

/// Runs `infra/kafka/kafka.sh` with a state dir of its own; the broker is tied
/// to this process (`--watch-pid`) and its data removed when it dies. A start
/// that failed because a port was taken is tried once more on fresh ports.
fn start_local() -> Result<Broker> {
    let (_, port) = start_single(&[])?;
    Ok(Broker { bootstrap: format!("127.0.0.1:{port}"), kind: BrokerKind::Local })
}

/// `kafka.sh start` of one node with `env` on top, in a temp `ESK_HOME` (see
/// [`start_local`]): that home and the client port.
fn start_single(env: &[(&str, &str)]) -> Result<(PathBuf, u16)> {
    let mut failures = Vec::new();
    for attempt in 1..=START_ATTEMPTS {
        let home = tempfile::Builder::new().prefix("esk-test-kafka-").tempdir()?.keep();
        let port = free_port_pair()?;
        let out = Command::new(kafka_sh())
            .args(["start", "--watch-pid", &std::process::id().to_string()])
            .env("ESK_HOME", &home)
            .env("ESK_KAFKA_PORT", port.to_string())
            .env("ESK_KAFKA_EPHEMERAL", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .context("running infra/kafka/kafka.sh")?;
        if out.status.success() {
            return Ok((home, port));
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let kept = keep_logs(&home, &format!("kafka-{port}"));
        let clash = port_clash(&stderr, &home);
        // Stop a broker that may still run (a start timeout), and remove its state.
        let _ = Command::new(kafka_sh()).arg("stop").env("ESK_HOME", &home).stderr(Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&home);
        failures.push(format!(
            "attempt {attempt}: infra/kafka/kafka.sh start on port {port} failed ({}){}; its log: {kept}\n{}",
            out.status,
            if clash { ", a port was taken" } else { "" },
            tail_lines(&stderr, 15)
        ));
        if !clash {
            break;
        }
    }
    bail!("{}", failures.join("\n"))
}

/// A single-node broker of a test's own (the run's broker is shared), which
/// the test may freeze: stopped and removed on drop.
#[derive(Debug)]
pub struct OwnBroker {
    pub bootstrap: String,
    home: PathBuf,
}

impl OwnBroker {
    pub fn start() -> Result<Self> {
        let (home, port) = start_single(&[])?;
        Ok(Self { bootstrap: format!("127.0.0.1:{port}"), home })
    }

    fn signal(&self, sig: &str) -> Result<()> {
        let pid = std::fs::read_to_string(self.home.join("run/kafka.pid"))?;
        let ok = Command::new("kill").args([sig, pid.trim()]).status()?.success();
        anyhow::ensure!(ok, "kill {sig} {pid} failed");
        Ok(())
    }

    /// SIGSTOP: the broker holds its connections and answers nothing.
    pub fn freeze(&self) -> Result<()> {
        self.signal("-STOP")
    }

    /// SIGCONT after [`OwnBroker::freeze`].
    pub fn thaw(&self) -> Result<()> {
        self.signal("-CONT")
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = self.thaw();
        let _ = Command::new(kafka_sh()).arg("stop").env("ESK_HOME", &self.home).stderr(Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

/// A secured broker of its own (ADR 10: SASL_SSL, SCRAM-SHA-512, ACLs, no ACL
/// means denied), tied to this process like the local broker. Users `admin`
/// (a super user) and those given, each with a properties file.
#[derive(Debug)]
pub struct SecuredBroker {
    home: PathBuf,
    users: String,
    pub bootstrap: String,
}

impl SecuredBroker {
    pub fn start(users: &[&str]) -> Result<Self> {
        let users = users.join(" ");
        let (home, port) =
            start_single(&[("ESK_KAFKA_SECURITY", "sasl_ssl"), ("ESK_KAFKA_SCRAM_USERS", users.as_str())])?;
        Ok(Self { home, users, bootstrap: format!("127.0.0.1:{port}") })
    }

    /// The path of `user`'s client properties, `librdkafka` (esk's) or `java` (Kafka's tools).
    pub fn client_config(&self, user: &str, kind: &str) -> PathBuf {
        let out = Command::new(kafka_sh())
            .args(["client-config", user, kind])
            .env("ESK_HOME", &self.home)
            .env("ESK_KAFKA_SCRAM_USERS", &self.users)
            .output()
            .expect("running kafka.sh client-config");
        assert!(out.status.success(), "kafka.sh client-config {user}: {}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    }

    /// Runs a tool of Kafka's as admin once per line of `lines`, in one JVM
    /// (`kafka.sh tool-lines CLASS`): `--bootstrap-server` and
    /// `--command-config` come first, then the line's words.
    pub fn admin_tool_lines(&self, class: &str, lines: &str) -> Result<Output> {
        use std::io::Write as _;
        let config = self.client_config("admin", "java");
        let mut child = Command::new(kafka_sh())
            .args(["tool-lines", class, "--bootstrap-server", &self.bootstrap, "--command-config"])
            .arg(&config)
            .env("ESK_HOME", &self.home)
            .env("ESK_KAFKA_HEAP", "256m")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kafka.sh tool-lines")?;
        child.stdin.take().expect("a piped stdin").write_all(lines.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kafka.sh tool-lines {class} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }
}

/// How often a broker or cluster start is tried when a port clash failed it.
const START_ATTEMPTS: usize = 2;

/// Whether a failed broker start says that a port was taken.
fn port_clash(stderr: &str, home: &Path) -> bool {
    let logs = std::fs::read_dir(home.join("log"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok());
    std::iter::once(stderr.to_owned())
        .chain(logs)
        .any(|t| t.contains("Address already in use") || t.contains("BindException") || t.contains("is taken by"))
}

/// Copies the logs of a failed broker start (`<home>/log/*.log`) to
/// `target/test-logs/<name>-<time>-<file>`, before the temp dir goes: returns
/// where they went, for the failure message.
fn keep_logs(home: &Path, name: &str) -> String {
    let dir = repo_root().join("target/test-logs");
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S");
    let mut kept = Vec::new();
    if std::fs::create_dir_all(&dir).is_ok() {
        for entry in std::fs::read_dir(home.join("log")).into_iter().flatten().flatten() {
            let to = dir.join(format!("{name}-{stamp}-{}", entry.file_name().to_string_lossy()));
            if std::fs::copy(entry.path(), &to).is_ok() {
                kept.push(to.display().to_string());
            }
        }
    }
    if kept.is_empty() { format!("none found in {}/log", home.display()) } else { kept.join(", ") }
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Ports for the brokers and services of tests.
///
/// Taken outside the kernel's ephemeral port range
/// (`/proc/sys/net/ipv4/ip_local_port_range`): a port found free by binding
/// port 0 comes from that range, and once released, any outgoing connection
/// (of a broker, a service, a client) may take it as its local port before
/// the broker or service that was to listen on it has started (seconds, for
/// a JVM), which then fails with "Address already in use". Each is handed out
/// once per run, and locked for the run (a lock file per port pair in
/// `<tmp>/esk-test-ports/`) so that test runs side by side on one machine do
/// not pick the same. Ports esk uses by default (`make up`, `kafka.sh
/// cluster`) are never picked.
mod ports {
    use std::fs::File;
    use std::net::TcpListener;
    use std::ops::Range;
    use std::sync::{Mutex, OnceLock};

    use anyhow::{Result, bail};

    /// esk's default ports: make up's broker and services, kafka.sh's cluster.
    const DEFAULTS: [Range<u32>; 5] = [8701..8705, 9092..9094, 19092..19094, 29092..29094, 39092..39094];

    struct Pool {
        /// Even port numbers p: p and p + 1 are a pair.
        range: Range<u32>,
        next: u32,
        /// The lock files of the pairs handed out, held until the process ends.
        held: Vec<File>,
    }

    static POOL: OnceLock<Mutex<Pool>> = OnceLock::new();

    /// The kernel's ephemeral range, or one that covers Linux's and macOS's defaults.
    pub(super) fn ephemeral() -> (u32, u32) {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| {
                let mut it = s.split_whitespace().map(str::parse::<u32>);
                Some((it.next()?.ok()?, it.next()?.ok()?))
            })
            .unwrap_or((32768, 65535))
    }

    /// The larger stretch outside the ephemeral range (above 10000, where fewer
    /// well-known services listen); the whole range if that stretch is small.
    pub(super) fn range() -> Range<u32> {
        let (low, high) = ephemeral();
        let below = 10_000..low.max(10_000);
        let above = (high + 1).min(65_535)..65_535;
        let best = if below.len() >= above.len() { below } else { above };
        if best.len() >= 2_000 { best } else { 10_000..65_535 }
    }

    fn pool() -> &'static Mutex<Pool> {
        POOL.get_or_init(|| {
            let range = range();
            // Start somewhere random, so runs side by side rarely probe the same ports.
            let start = (uuid::Uuid::new_v4().as_u128() % u128::from(range.len() as u32)) as u32;
            Mutex::new(Pool { next: start, range, held: Vec::new() })
        })
    }

    /// A lock on the pair at p for this process's life, if no other process holds it.
    fn lock(p: u32) -> Option<File> {
        let dir = std::env::temp_dir().join("esk-test-ports");
        if std::fs::create_dir_all(&dir).is_ok() {
            use std::os::unix::fs::PermissionsExt;
            // Shared by every user's test runs; each file stays its creator's.
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777));
        }
        let file = File::options().create(true).truncate(false).write(true).open(dir.join(format!("{p}.lock"))).ok()?;
        file.try_lock().ok()?;
        Some(file)
    }

    fn bindable(p: u32) -> bool {
        u16::try_from(p).is_ok_and(|p| TcpListener::bind(("127.0.0.1", p)).is_ok())
    }

    /// A port p with p and p + 1 free, never handed out before in this run.
    pub fn pair() -> Result<u16> {
        let mut pool = pool().lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let pairs = pool.range.len() as u32 / 2;
        let base = pool.range.start.next_multiple_of(2);
        for _ in 0..pairs {
            let p = base + (pool.next % pairs) * 2;
            pool.next = pool.next.wrapping_add(1);
            if p + 1 >= pool.range.end || DEFAULTS.iter().any(|r| r.contains(&p) || r.contains(&(p + 1))) {
                continue;
            }
            let Some(file) = lock(p) else { continue };
            if bindable(p) && bindable(p + 1) {
                pool.held.push(file);
                return Ok(p as u16);
            }
        }
        bail!("no free port pair in {:?} (outside the ephemeral range {:?})", pool.range, ephemeral())
    }
}

/// A port p with p and p + 1 free (a KRaft node's client and controller
/// ports; a service uses p): outside the kernel's ephemeral range, and never
/// the same twice in a test run (see the `ports` module).
pub fn free_port_pair() -> Result<u16> {
    ports::pair()
}

/// A 3-node KRaft cluster on one host, in a temp dir, on free ports. Stopped
/// and removed on drop (and by the watchdog if the test process dies).
#[derive(Debug)]
pub struct Cluster {
    home: PathBuf,
    ports: [u16; 3],
}

impl Cluster {
    /// Starts the three nodes; a start that failed because a port was taken is
    /// tried once more on fresh ports. The logs of a failed start are kept in
    /// `target/test-logs/`.
    pub fn start() -> Result<Self> {
        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            let home = tempfile::Builder::new().prefix("esk-test-cluster-").tempdir()?.keep();
            let ports = [free_port_pair()?, free_port_pair()?, free_port_pair()?];
            let cluster = Self { home, ports };
            let Err(e) = cluster.script(&["cluster", "start", "--watch-pid", &std::process::id().to_string()]) else {
                return Ok(cluster);
            };
            let kept = keep_logs(&cluster.home, &format!("cluster-{}", ports[0]));
            let clash = port_clash(&format!("{e:#}"), &cluster.home);
            // Drop stops the nodes and removes the temp dir.
            drop(cluster);
            failures.push(format!(
                "attempt {attempt} on ports {ports:?}: {e:#}{}; logs: {kept}",
                if clash { " (a port was taken)" } else { "" }
            ));
            if !clash {
                break;
            }
        }
        bail!("{}", failures.join("\n"))
    }

    fn script(&self, args: &[&str]) -> Result<()> {
        let ports = self.ports.map(|p| p.to_string()).join(" ");
        let out = Command::new(kafka_sh())
            .args(args)
            .env("ESK_HOME", &self.home)
            .env("ESK_KAFKA_CLUSTER_PORTS", ports)
            .env("ESK_KAFKA_EPHEMERAL", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            bail!("kafka.sh {args:?} failed ({}):\n{}", out.status, tail_lines(&stderr, 15));
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

    /// Start node `n` again on its old data; returns once it answers. The logs
    /// of a failed restart are kept in `target/test-logs/`.
    pub fn restart(&self, n: usize) -> Result<()> {
        self.script(&["cluster", "restart", &n.to_string()]).map_err(|e| {
            let kept = keep_logs(&self.home, &format!("cluster-{}-restart", self.ports[0]));
            e.context(format!("restarting node {n}; logs: {kept}"))
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.script(&["cluster", "stop"]);
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

/// Lets tests run side by side, except those that measure time or run a
/// 3-node cluster: they run alone, so two cores busy with other tests do not
/// decide their outcome.
#[derive(Debug, Default)]
struct Gate {
    state: Mutex<(usize, bool)>,
    cv: Condvar,
}

static GATE: OnceLock<Gate> = OnceLock::new();

/// A test's place at the gate; released on drop.
#[derive(Debug)]
pub struct Pass {
    exclusive: bool,
}

impl Pass {
    fn take(exclusive: bool) -> Self {
        let gate = GATE.get_or_init(Gate::default);
        let mut s = gate.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            let (shared, excl) = *s;
            let free = if exclusive { shared == 0 && !excl } else { !excl };
            if free {
                if exclusive {
                    s.1 = true;
                } else {
                    s.0 += 1;
                }
                return Self { exclusive };
            }
            s = gate.cv.wait(s).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let gate = GATE.get_or_init(Gate::default);
        let mut s = gate.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.exclusive {
            s.1 = false;
        } else {
            s.0 -= 1;
        }
        gate.cv.notify_all();
    }
}

/// Takes the machine for a test that measures time or runs the 3-node
/// cluster: waits until no other test runs, and keeps others out until dropped.
pub fn exclusive() -> Pass {
    Pass::take(true)
}

/// A place beside other tests for a test without a [`TestEnv`] (one that runs
/// its own broker and services, say), so that no exclusive test runs beside it.
pub fn shared() -> Pass {
    Pass::take(false)
}

/// Per-test isolation: a topic prefix, and ids derived from it.
#[derive(Debug, Clone)]
pub struct TestEnv {
    pub bootstrap: String,
    pub prefix: String,
    _pass: Arc<Pass>,
}

impl TestEnv {
    /// A fresh prefix on the run's broker.
    pub fn new() -> Self {
        Self::on(&broker().bootstrap)
    }

    /// A fresh prefix on the given cluster. Waits while an exclusive test runs.
    pub fn on(bootstrap: &str) -> Self {
        Self::with(bootstrap, Arc::new(Pass::take(false)))
    }

    /// A fresh prefix for a test that holds [`exclusive`] already.
    pub fn with(bootstrap: &str, pass: Arc<Pass>) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self { bootstrap: bootstrap.to_owned(), prefix: format!("t{}", &id[..12]), _pass: pass }
    }

    /// A fresh prefix on the run's broker, the machine to itself (see [`exclusive`]).
    pub fn exclusive() -> Self {
        let pass = Arc::new(exclusive());
        Self::with(&broker().bootstrap, pass)
    }

    pub fn topics(&self) -> esk_wire::Topics {
        esk_wire::Topics::new(&self.prefix)
    }

    /// A group id or transactional id unique to this test.
    pub fn id(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }

    pub fn kafka(&self) -> esk_kafka::KafkaConfig {
        esk_kafka::KafkaConfig::new(&self.bootstrap, Duration::from_secs(15)).expect("valid bootstrap")
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

/// A binary of the workspace. The first call runs `cargo build --bins` (a no-op
/// when up to date), so `cargo test` alone never runs stale binaries;
/// `ESK_TEST_NO_BUILD=1` skips that when the caller just built them.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    // Test binaries live in target/<profile>/deps; the workspace's binaries one up.
    let exe = std::env::current_exe().expect("the test binary has a path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>").to_owned();
    BUILT.get_or_init(|| {
        if std::env::var_os("ESK_TEST_NO_BUILD").is_some() {
            return;
        }
        let release = dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "--workspace", "--bins", "--quiet"]).current_dir(repo_root());
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "cargo build --bins failed");
    });
    dir.join(name)
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

    pub fn env_remove(mut self, key: &str) -> Self {
        self.cmd.env_remove(key);
        self
    }

    /// Starts the command without waiting.
    pub fn spawn(mut self) -> Spawned {
        let started = Instant::now();
        let child = owned(&mut self.cmd).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("running esk");
        Spawned { child, started }
    }

    pub fn run(mut self) -> Run {
        let started = Instant::now();
        let out: Output = owned(&mut self.cmd).output().expect("running esk");
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: started.elapsed(),
        }
    }
}

/// An `esk` command running in the background.
#[derive(Debug)]
pub struct Spawned {
    child: std::process::Child,
    started: Instant,
}

impl Spawned {
    pub fn wait(self) -> Run {
        let out = self.child.wait_with_output().expect("waiting for esk");
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: self.started.elapsed(),
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
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
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
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl TestEnv {
    /// `esk topics init --partitions n` for this test's prefix.
    pub fn init_topics(&self, partitions: u32) {
        self.esk().args(["topics", "init", "--partitions", &partitions.to_string()]).run().ok();
    }

    /// The platform topics with `shards` shards (`init_topics` makes
    /// one: a single writer instance serves every partition, the others
    /// stand by).
    pub fn init_topics_sharded(&self, partitions: u32, shards: u32) {
        let (partitions, shards) = (partitions.to_string(), shards.to_string());
        self.esk().args(["topics", "init", "--partitions", &partitions, "--shards", &shards]).run().ok();
    }

    /// `esk topics init --context name --partitions n`: the installation's
    /// topics if missing, and the bounded context's own.
    pub fn init_context(&self, context: &str, partitions: u32) {
        let partitions = partitions.to_string();
        self.esk().args(["topics", "init", "--context", context, "--partitions", &partitions]).run().ok();
    }

    /// A connected client of this test's installation.
    pub fn client(&self, timeout: Duration, pipelined: bool) -> esk_client::Client {
        let config = esk_kafka::KafkaConfig::new(&self.bootstrap, timeout).expect("valid bootstrap");
        let open = if pipelined { esk_client::Client::connect_pipelined } else { esk_client::Client::connect };
        open(config, self.topics()).expect("connecting a client")
    }

    /// Every event in `<prefix>.events.<category>` (read_committed), in partition
    /// and offset order, decoded.
    pub fn all_events(&self, category: &str) -> Vec<(i32, i64, esk_wire::Event)> {
        self.read_topic(&self.topics().events(category), true)
            .into_iter()
            .map(|r| {
                let headers: Vec<(&str, Option<&[u8]>)> =
                    r.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
                let e = esk_wire::Event::decode(headers, r.value.as_deref())
                    .unwrap_or_else(|err| panic!("undecodable event at {}@{}: {err}", r.partition, r.offset));
                (r.partition, r.offset, e)
            })
            .collect()
    }

    /// Every record of a topic up to its current end.
    pub fn read_topic(&self, topic: &str, committed: bool) -> Vec<Record> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::{Message, Offset, TopicPartitionList};
        let kafka = self.kafka();
        let group = self.id("reader");
        let config = if committed {
            kafka.committed_reader(&group, Duration::from_millis(50))
        } else {
            kafka.uncommitted_reader(&group)
        };
        let consumer: BaseConsumer = config.create().expect("a consumer");
        let timeout = Duration::from_secs(15);
        let Some(partitions) = topic_partitions(&consumer, topic, timeout) else {
            return Vec::new();
        };
        let mut tpl = TopicPartitionList::new();
        let mut ends = Vec::new();
        for p in partitions {
            // Retries transient errors (a new topic's leader not ready yet) within the timeout.
            let (_, high) = esk_kafka::watermarks(consumer.client(), topic, p, timeout)
                .unwrap_or_else(|e| panic!("watermarks of {topic} partition {p}: {e}"));
            ends.push((p, high));
            tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let positions = consumer.position().unwrap();
            let done = ends.iter().all(|(p, high)| {
                positions.find_partition(topic, *p).and_then(|e| e.offset().to_raw()).is_some_and(|o| o >= *high)
                    || *high == 0
            });
            if done {
                break;
            }
            assert!(Instant::now() < deadline, "reading {topic} did not finish");
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                let m = m.expect("a record");
                out.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec),
                    headers: esk_kafka::record::headers_of(&m),
                });
            }
        }
        out.sort_by_key(|r| (r.partition, r.offset));
        out
    }
}

/// The partitions of `topic`, or `None` if it does not exist. Transient errors
/// (a new topic whose leaders are being elected, a broker not answering yet)
/// are retried until `timeout`, then panic: a broker error is not an empty topic.
pub fn topic_partitions<C: rdkafka::consumer::ConsumerContext>(
    consumer: &rdkafka::consumer::BaseConsumer<C>,
    topic: &str,
    timeout: Duration,
) -> Option<Vec<i32>> {
    use rdkafka::consumer::Consumer;
    use rdkafka::error::RDKafkaErrorCode;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let transient = match consumer.fetch_metadata(Some(topic), left) {
            Ok(md) => match md.topics().first() {
                None => return None,
                Some(t) => match t.error().map(RDKafkaErrorCode::from) {
                    None if !t.partitions().is_empty() => return Some(t.partitions().iter().map(|p| p.id()).collect()),
                    None => "no partitions yet".to_owned(),
                    Some(RDKafkaErrorCode::UnknownTopicOrPartition) => return None,
                    Some(code) if esk_kafka::error::is_transient_code(Some(code)) => code.to_string(),
                    Some(code) => panic!("metadata of {topic}: {code}"),
                },
            },
            Err(e) if esk_kafka::error::is_transient_code(e.rdkafka_error_code()) => e.to_string(),
            Err(e) => panic!("metadata of {topic}: {e}"),
        };
        assert!(Instant::now() < deadline, "metadata of {topic}: still {transient} after {timeout:?}");
        std::thread::sleep(esk_kafka::config::TRANSIENT_RETRY_PAUSE);
    }
}

/// A raw Kafka record.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// The variable that marks a process as this test process's:
/// [`owned`] sets it, and the watchdog [`owned`] starts SIGKILLs every
/// process that carries it once this process is gone.
pub const OWNER_VAR: &str = "ESK_TEST_OWNER";

/// Ties what `cmd` starts, and what that starts in turn (it inherits the
/// environment), to this test process: when the test process ends, however
/// it ends (a panic that aborts, SIGKILL), a detached watchdog SIGKILLs every
/// process whose environment carries `ESK_TEST_OWNER=<this pid>`, as
/// `kafka.sh start --watch-pid` does for the local broker. The marker, not a
/// pid, names them, so a reused pid is never killed. `Drop` still stops a
/// service at the end of its test; this is for the ends that run no `Drop`.
pub fn owned(cmd: &mut Command) -> &mut Command {
    static WATCHDOG: OnceLock<Result<(), String>> = OnceLock::new();
    let watching = WATCHDOG.get_or_init(|| {
        // A marked process still alive may start another while a pass runs
        // (make, node): passes go on until one finds none (30 at most).
        let script = r#"while kill -0 "$1" 2>/dev/null; do sleep 1; done
for _ in $(seq 1 30); do
  found=""
  for e in /proc/[0-9]*/environ; do
    if grep -qzxF "$2=$1" "$e" 2>/dev/null; then p=${e#/proc/}; kill -9 "${p%/environ}" 2>/dev/null; found=1; fi
  done
  [ -n "$found" ] || break
  sleep 0.2
done"#;
        spawn_watchdog("esk-test-watch", script, OWNER_VAR)
            .map_err(|e| format!("starting the test processes' watchdog: {e}"))
    });
    if let Err(e) = watching {
        panic!("{e}");
    }
    cmd.env(OWNER_VAR, std::process::id().to_string())
}

/// Calls `check` every 250 ms until it finds something or `bound` has
/// passed: what it found, or an error naming `what` (blocking; in async
/// tests, [`poll_until`]).
pub fn wait_for<T>(
    bound: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> std::result::Result<T, String> {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(found) = check() {
            return Ok(found);
        }
        if Instant::now() > deadline {
            return Err(format!("{what}: not within {bound:?}"));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// What a bounded run of a program printed.
#[derive(Debug)]
pub struct Ran {
    pub ok: bool,
    pub output: String,
    pub elapsed: Duration,
}

/// Runs `cmd` with stdout and stderr to one file, killed after `timeout`
/// (what it printed is kept, with a line saying so).
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Ran {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("output");
    let file = std::fs::File::create(&path).expect("an output file");
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("a second handle"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let ok = loop {
        if let Some(status) = child.try_wait().expect("waiting for the child") {
            break status.success();
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut output = std::fs::read_to_string(&path).unwrap_or_default();
    if started.elapsed() > timeout {
        output.push_str(&format!("\n(killed after {timeout:?})"));
    }
    Ran { ok, output, elapsed: started.elapsed() }
}

/// The HTTP addresses of the shop's services, as `make up` and the compose
/// file take them: payments, its projector, inventory, orders, its
/// projector, shipping.
pub const SHOP_HTTP_VARS: [&str; 6] = [
    "ESK_PAYMENTS_HTTP",
    "ESK_PAYMENTS_PROJECTOR_HTTP",
    "ESK_INVENTORY_HTTP",
    "ESK_ORDERS_HTTP",
    "ESK_ORDERS_PROJECTOR_HTTP",
    "ESK_SHIPPING_HTTP",
];

/// The README's walkthrough of the shop, on an installation (prefix `esk`)
/// a test started as a user would (`make up`, the compose file): the `esk`
/// binary against `bootstrap`, its orders projector at `orders_projector`.
#[derive(Debug)]
pub struct ShopWalk {
    pub bootstrap: String,
    pub orders_projector: String,
}

impl ShopWalk {
    /// Runs `esk <args>` on the installation; panics with its stderr when it fails.
    pub fn esk(&self, args: &[&str]) {
        let out = owned(&mut Command::new(bin("esk")))
            .args(["--bootstrap-servers", &self.bootstrap, "--prefix", "esk", "--timeout", "30s"])
            .args(args)
            .env_remove("ESK_TIMEOUT")
            .output()
            .expect("running esk");
        assert!(out.status.success(), "esk {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Ann's account with 5,000 and ten tea in stock.
    pub fn stock(&self) {
        self.esk(&["command", "account-ann", "OpenAccount", r#"{"owner": "ann"}"#]);
        self.esk(&["command", "account-ann", "Deposit", r#"{"amount": 5000}"#]);
        self.esk(&["command", "inventory-tea", "AddStock", r#"{"quantity": 10}"#]);
    }

    /// Places `order-<id>` (two tea for 700) and waits up to `bound` for the
    /// checkout saga to confirm it; Err says what the order's row was.
    pub fn checkout(&self, id: &str, bound: Duration) -> std::result::Result<(), String> {
        let placed = r#"{"customer": "ann", "item": "tea", "quantity": 2, "amount": 700}"#;
        self.esk(&["command", &format!("order-{id}"), "Place", placed, "--expected-version", "no-stream"]);
        let mut row = String::new();
        wait_for(bound, &format!("order {id} confirmed by the checkout saga"), || {
            row = http_get(&self.orders_projector, &format!("/orders/{id}")).map(|(_, b)| b).unwrap_or_default();
            row.contains(r#""status":"confirmed""#).then_some(())
        })
        .map_err(|e| format!("{e} (its row: {row})"))
    }
}

/// A running esk service (`esk-<name>`), killed on drop.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    child: std::process::Child,
    pub http: String,
    ports: Vec<String>,
    pub log: PathBuf,
}

impl Service {
    /// Starts `esk-<name>` for the test's installation, HTTP on a free port,
    /// stderr to `target/test-logs/<prefix>-<name>-<port>.log`.
    pub fn start(env: &TestEnv, name: &str, extra: &[(&str, &str)]) -> Self {
        Self::program(env, &format!("esk-{name}"), &[&format!("ESK_{}_HTTP", name.to_uppercase())], extra)
    }

    /// Starts the workspace's binary `program` as [`Service::start`] does; its
    /// HTTP address (`http`) goes in the first of `http_vars`, and each other
    /// one gets a free port of its own (in [`Service::ports`]).
    pub fn program(env: &TestEnv, program: &str, http_vars: &[&str], extra: &[(&str, &str)]) -> Self {
        let addrs: Vec<String> =
            http_vars.iter().map(|_| format!("127.0.0.1:{}", free_port_pair().expect("a free port"))).collect();
        let http = addrs.first().cloned().expect("an HTTP variable");
        let port = http.rsplit(':').next().unwrap_or_default().to_owned();
        let logs = repo_root().join("target/test-logs");
        std::fs::create_dir_all(&logs).expect("a log dir");
        let log = logs.join(format!("{}-{}-{port}.log", env.prefix, program.trim_start_matches("esk-")));
        let file = std::fs::File::create(&log).expect("a log file");
        let mut cmd = Command::new(bin(program));
        // Local stores under target/, one folder per test (services take
        // instances of their own below it); a test may give its own.
        let data = repo_root().join("target/test-data").join(&env.prefix);
        cmd.env("KAFKA_BOOTSTRAP_SERVERS", &env.bootstrap)
            .env("ESK_TOPIC_PREFIX", &env.prefix)
            .env("ESK_DATA_DIR", &data)
            .env("RUST_LOG", std::env::var("ESK_TEST_RUST_LOG").unwrap_or_else(|_| "info,librdkafka=warn".into()))
            .stdout(Stdio::null())
            .stderr(file);
        for (var, addr) in http_vars.iter().zip(&addrs) {
            cmd.env(var, addr);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = owned(&mut cmd).spawn().unwrap_or_else(|e| panic!("starting {program}: {e}"));
        Self { name: program.trim_start_matches("esk-").to_owned(), child, http, ports: addrs, log }
    }

    /// The HTTP address given to the `i`th of [`Service::program`]'s variables.
    pub fn addr(&self, i: usize) -> &str {
        &self.ports[i]
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// GET a path of the service's HTTP endpoint: (status, body).
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&self.http, path)
    }

    /// GET a JSON document (any status).
    pub fn get_json(&self, path: &str) -> Option<serde_json::Value> {
        self.get(path).and_then(|(_, b)| serde_json::from_str(&b).ok())
    }

    /// Sends a signal (KILL, STOP, CONT, TERM) to the process.
    pub fn signal(&self, sig: &str) {
        let ok =
            Command::new("kill").args([format!("-{sig}"), self.pid().to_string()]).status().is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} {} failed", self.pid());
    }

    /// SIGKILL and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `timeout` for the process to end: its exit code (`None`
    /// when it still runs or was killed by a signal).
    pub fn exit_code(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines of the service's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGKILLs each of `n` roles once, in an order and at moments of chance
/// (0.7 to 3 s apart; the seed is printed): `kill(i)` kills role `i` and
/// starts it again. Sets `over` after the last. The order the roles went in.
pub fn kill_each_once(
    n: usize,
    over: Arc<std::sync::atomic::AtomicBool>,
    kill: impl Fn(usize) + Send + 'static,
) -> std::thread::JoinHandle<Vec<usize>> {
    std::thread::spawn(move || {
        let mut seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1;
        println!("chaos seed {seed}");
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, (next() % (i as u64 + 1)) as usize);
        }
        for &which in &order {
            std::thread::sleep(Duration::from_millis(700 + next() % 2300));
            kill(which);
        }
        over.store(true, std::sync::atomic::Ordering::SeqCst);
        order
    })
}

/// A minimal HTTP/1.0 GET over loopback: (status, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    esk_client::http::get(addr, path, Duration::from_secs(30)).ok()
}

/// An HTTP answer: status, headers (names lowercase) and body.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// One HTTP/1.0 request (the answer's body ends with the connection): any
/// method, headers and body, within `timeout` for each read and write.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> std::io::Result<HttpAnswer> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or_default();
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(head.as_bytes())?;
    // A server may answer (413) before it has read a large body.
    let _ = s.write_all(body);
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not an HTTP answer: {text:.200}"));
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(HttpAnswer { status, headers, body: body.to_owned() })
}

/// A Server-Sent Events stream being read: its events' ids and data.
#[derive(Debug)]
pub struct Sse {
    reader: std::io::BufReader<std::net::TcpStream>,
    pub status: u16,
    timeout: Duration,
    /// The id of the last frame that had one (an event's, or the start's).
    pub last_id: Option<String>,
}

/// One event of a [`Sse`] stream.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: Option<String>,
    pub data: String,
}

impl Sse {
    /// Opens `GET path` with `Last-Event-ID` when given; each read waits at most `timeout`.
    pub fn open(addr: &str, path: &str, last_event_id: Option<&str>, timeout: Duration) -> std::io::Result<Self> {
        use std::io::{BufRead, Write};
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(timeout))?;
        let resume = last_event_id.map(|id| format!("Last-Event-ID: {id}\r\n")).unwrap_or_default();
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{resume}\r\n")?;
        let mut reader = std::io::BufReader::new(s);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                break;
            }
        }
        Ok(Self { reader, status, timeout, last_id: None })
    }

    /// The next event (comments skipped); `None` when the stream ended, an
    /// error when none came within the timeout (keep-alive comments or not).
    pub fn next_event(&mut self) -> std::io::Result<Option<SseEvent>> {
        use std::io::BufRead;
        let (mut id, mut data, mut any) = (None, String::new(), false);
        let mut line = String::new();
        let deadline = Instant::now() + self.timeout;
        loop {
            if Instant::now() > deadline {
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no event within the timeout"));
            }
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Ok(None);
            }
            let l = line.trim_end_matches(['\r', '\n']);
            if l.is_empty() {
                if any && !data.is_empty() {
                    return Ok(Some(SseEvent { id, data }));
                }
                // A frame with an id alone (the start) only sets the id, as in a browser.
                (id, any) = (None, false);
                continue;
            }
            if let Some(v) = l.strip_prefix("id:") {
                id = Some(v.trim_start().to_owned());
                self.last_id.clone_from(&id);
                any = true;
            } else if let Some(v) = l.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
                any = true;
            }
        }
    }
}

/// Waits until the writers together serve `partitions` partitions.
pub async fn wait_serving(writers: &[&Service], partitions: u64, timeout: Duration) {
    let what = format!("{partitions} partitions served by the writers");
    poll_until(timeout, &what, || async {
        let total: u64 = writers
            .iter()
            .filter_map(|w| w.get_json("/health"))
            .map(|h| h["partitions_serving"].as_u64().unwrap_or(0))
            .sum();
        (total == partitions).then_some(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Kafka of infra/kafka/pom.xml, whichever path a test takes: the
    /// local broker's jars, the image infra/docker/build.sh builds (tagged
    /// with the pom's version, read by the script), and the compose file.
    #[test]
    fn the_kafka_version_is_the_same_on_every_path() {
        let read = |p: &str| std::fs::read_to_string(repo_root().join(p)).unwrap();
        let pom = read("infra/kafka/pom.xml");
        let version = pom.split("<kafka.version>").nth(1).and_then(|r| r.split('<').next()).unwrap().to_owned();
        assert!(version.split('.').all(|n| n.parse::<u32>().is_ok()), "{version}");
        let build = read("infra/docker/build.sh");
        assert!(build.contains("<kafka.version>") && build.contains("image=esk/kafka:$version"), "build.sh's tag");
        let compose = read("infra/docker-compose.yml");
        let images: Vec<&str> =
            compose.lines().filter_map(|l| l.trim().strip_prefix("image:")).map(str::trim).collect();
        assert!(!images.is_empty());
        for image in images.iter().filter(|i| i.contains("kafka")) {
            assert_eq!(image.rsplit(':').next(), Some(version.as_str()), "compose: {image}");
        }
        // And esk's image is this workspace's version, as `make images` tags it.
        let cargo = read("Cargo.toml");
        let esk_version = cargo.lines().find_map(|l| l.strip_prefix("version = \"")).unwrap().trim_end_matches('"');
        assert!(compose.contains(&format!("esk/esk:{esk_version}}}")), "compose runs esk/esk:{esk_version}");
        // The jars kafka.sh fetched, when they are there (CI fetches them first).
        let lib = repo_root().join("infra/kafka/lib");
        if lib.is_dir() {
            let jars: Vec<String> = std::fs::read_dir(&lib)
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("kafka-clients-") || n.starts_with("kafka_2."))
                .collect();
            assert!(!jars.is_empty(), "no kafka jar in {}", lib.display());
            for jar in jars {
                assert!(jar.ends_with(&format!("-{version}.jar")), "{jar} is not Kafka {version}");
            }
        }
    }

    #[test]
    fn ports_are_outside_the_ephemeral_range_and_handed_out_once() {
        let (low, high) = ports::ephemeral();
        let outside = ports::range().end <= low || ports::range().start > high;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..40 {
            let p = u32::from(free_port_pair().unwrap());
            assert!(seen.insert(p) && seen.insert(p + 1), "{p} handed out twice");
            assert!(!outside || p + 1 < low || p > high, "{p} is in the ephemeral range {low}-{high}");
            for q in [p, p + 1] {
                std::net::TcpListener::bind(("127.0.0.1", q as u16)).unwrap_or_else(|e| panic!("port {q}: {e}"));
            }
        }
    }

    #[test]
    fn a_listener_that_could_not_bind_is_a_port_clash() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join("log")).unwrap();
        let log = home.path().join("log/kafka.log");
        std::fs::write(&log, "INFO starting\nERROR Exiting Kafka\n").unwrap();
        assert!(!port_clash("kafka: broker exited during start", home.path()));
        std::fs::write(
            &log,
            "KafkaException: Socket server failed to bind to 127.0.0.1:17001: Address already in use.\n",
        )
        .unwrap();
        assert!(port_clash("", home.path()));
        assert!(port_clash("kafka: port 17000 is taken by another process; stop it", Path::new("/nonexistent")));
    }
}
