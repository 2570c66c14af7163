//! `infra/docker-compose.yml`: the whole stack (Kafka, the topics, the
//! platform's services and the shop's) in containers of the images
//! `infra/docker/build.sh` builds here, run by `docker compose` or Debian's
//! `docker-compose`, used as the README says: every service becomes healthy,
//! the shop's checkout saga confirms an order, the gateway serves it, a
//! service SIGKILLed is restarted by the engine and goes on, and `down -v`
//! leaves no container and no volume.
//!
//! It needs a Docker engine: with none, it says so and passes, unless
//! `ESK_TEST_BROKER=docker` asks for the Docker path (then it fails). With an
//! engine, it needs a compose (CI installs Debian's `docker-compose`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use esk_tests::{
    SHOP_HTTP_VARS, ShopWalk, bin, docker_answers, free_port_pair, http_get, owned, repo_root, run_bounded, wait_for,
    watch_compose_project,
};

/// The image of esk's binaries the test builds from this build's binaries
/// (not the release build `make images` tags esk/esk:<version>).
const IMAGE: &str = "esk/esk:test";

/// The HTTP addresses of the platform's services; with the shop's
/// ([`SHOP_HTTP_VARS`]) every one the compose file runs beside Kafka and
/// `topics`: 11, as the gateway's console counts them.
const PLATFORM_HTTP_VARS: [&str; 5] =
    ["ESK_WRITER_HTTP", "ESK_PROJECTOR_HTTP", "ESK_REPLICA_HTTP", "ESK_COORDINATOR_HTTP", "ESK_GATEWAY_HTTP"];

/// `docker compose` (the plugin) or `docker-compose`, whichever runs; None
/// (and why) when no Docker engine answers.
fn compose_command() -> Option<Vec<String>> {
    if !docker_answers() {
        let asked = std::env::var("ESK_TEST_BROKER").is_ok_and(|b| b == "docker");
        assert!(!asked, "ESK_TEST_BROKER=docker, but no Docker engine answers (infra/docker/engine.sh start)");
        println!("skipped: no Docker engine answers; infra/docker-compose.yml is tested where one does");
        return None;
    }
    let runs = |args: &[&str]| Command::new(args[0]).args(&args[1..]).output().is_ok_and(|o| o.status.success());
    if runs(&["docker", "compose", "version"]) {
        return Some(vec!["docker".into(), "compose".into()]);
    }
    assert!(
        runs(&["docker-compose", "version"]),
        "a Docker engine answers, but neither `docker compose` nor `docker-compose` runs (Debian: apt-get install \
         docker-compose)"
    );
    Some(vec!["docker-compose".into()])
}

/// One compose project of the test: its name, file, and the environment
/// that gives it free ports.
struct Project {
    compose: Vec<String>,
    name: String,
    env: Vec<(String, String)>,
    log: PathBuf,
}

impl Project {
    fn command(&self, args: &[&str]) -> Command {
        let file = repo_root().join("infra/docker-compose.yml");
        let mut cmd = Command::new(&self.compose[0]);
        cmd.args(&self.compose[1..])
            .arg("-f")
            .arg(file)
            .args(["-p", &self.name])
            .args(args)
            .current_dir(repo_root())
            .env_remove("KAFKA_BOOTSTRAP_SERVERS")
            .env_remove("ESK_TOPIC_PREFIX");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        owned(&mut cmd);
        cmd
    }

    /// Runs a compose command, bounded; panics with its output (and the
    /// services' logs) when it fails.
    fn run(&self, args: &[&str], bound: Duration) -> String {
        let ran = run_bounded(self.command(args), bound);
        assert!(ran.ok, "compose {args:?} failed after {:?}:\n{}\n{}", ran.elapsed, ran.output, self.logs());
        ran.output
    }

    /// The last lines of every service's log, kept in `target/test-logs/`.
    fn logs(&self) -> String {
        let ran = run_bounded(self.command(&["logs", "--no-color", "--tail", "40"]), Duration::from_secs(60));
        let _ = std::fs::write(&self.log, &ran.output);
        format!("the services' logs: {}\n{}", self.log.display(), ran.output)
    }

    fn var(&self, name: &str) -> &str {
        self.env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).expect("a variable of the project")
    }

    /// The id of the container of `service`.
    fn container(&self, service: &str) -> String {
        // -a: also one that ended (compose v2 lists only running ones without it).
        let id = self.run(&["ps", "-a", "-q", service], Duration::from_secs(60)).trim().to_owned();
        assert!(!id.is_empty() && !id.contains('\n'), "one container of {service}: {id:?}");
        id
    }

    /// What Docker has of this project, by its label.
    fn left(&self, what: &[&str]) -> String {
        let out = Command::new("docker")
            .args(what)
            .args(["--filter", &format!("label=com.docker.compose.project={}", self.name)])
            .output()
            .expect("running docker");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// `down -v` even when an assertion failed; the watchdog covers a killed test.
impl Drop for Project {
    fn drop(&mut self) {
        let _ = run_bounded(self.command(&["down", "-v", "--remove-orphans", "-t", "20"]), Duration::from_secs(180));
    }
}

/// `docker inspect -f format id`.
fn docker_inspect(id: &str, format: &str) -> String {
    let out = Command::new("docker").args(["inspect", "-f", format, id]).output().expect("running docker inspect");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn build(args: &[&str], env: &[(&str, &Path)]) -> String {
    let mut cmd = Command::new(repo_root().join("infra/docker/build.sh"));
    cmd.args(args).env("ESK_IMAGE", IMAGE);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let ran = run_bounded(cmd, Duration::from_secs(600));
    assert!(ran.ok, "infra/docker/build.sh {args:?} failed:\n{}", ran.output);
    ran.output.lines().last().unwrap_or_default().to_owned()
}

#[test]
fn the_compose_file_runs_the_whole_stack_on_images_built_here() {
    let Some(compose) = compose_command() else { return };
    // The images: Kafka's, and esk's from this build's binaries.
    let kafka_image = build(&["kafka"], &[]);
    let bins = bin("esk").parent().expect("a bin dir").to_owned();
    let image = build(&["esk"], &[("ESK_BIN_DIR", &bins)]);
    assert_eq!(image, IMAGE);
    let compose_file = std::fs::read_to_string(repo_root().join("infra/docker-compose.yml")).unwrap();
    assert!(compose_file.contains(&format!("image: {kafka_image}")), "the compose file runs {kafka_image}");

    let kafka_port = free_port_pair().expect("a free port pair");
    let name = format!("esk-test-{}-{kafka_port}", std::process::id());
    let mut env = vec![
        ("ESK_IMAGE".to_owned(), IMAGE.to_owned()),
        ("ESK_KAFKA_PORT".to_owned(), kafka_port.to_string()),
        ("ESK_PARTITIONS".to_owned(), "2".to_owned()),
        ("ESK_CHECKOUT_TIMEOUT".to_owned(), "30s".to_owned()),
    ];
    for var in PLATFORM_HTTP_VARS.into_iter().chain(SHOP_HTTP_VARS) {
        env.push((var.to_owned(), format!("127.0.0.1:{}", free_port_pair().expect("a free port"))));
    }
    let log = repo_root().join(format!("target/test-logs/compose-{name}.log"));
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    watch_compose_project(&name).expect("a watchdog");
    let project = Project { compose, name, env, log };

    // Up: Kafka healthy, then the topics, then every service; each healthy
    // once its /ready answers.
    let started = Instant::now();
    project.run(&["up", "-d"], Duration::from_secs(420));
    for var in PLATFORM_HTTP_VARS.into_iter().chain(SHOP_HTTP_VARS) {
        let addr = project.var(var);
        let ready = wait_for(Duration::from_secs(240), &format!("the service at {var}={addr} ready"), || {
            http_get(addr, "/ready").filter(|(code, _)| *code == 200)
        });
        if let Err(e) = ready {
            panic!("{e}\n{}", project.logs());
        }
    }
    println!("the stack is up and ready in {:?}", started.elapsed());
    let topics = project.container("topics");
    let state = docker_inspect(&topics, "{{.State.Status}} {{.State.ExitCode}}");
    assert_eq!(state, "exited 0", "the topics container ran to its end");

    // The README's walkthrough, with the host's CLI against the stack's Kafka.
    let shop = ShopWalk {
        bootstrap: format!("127.0.0.1:{kafka_port}"),
        orders_projector: project.var("ESK_ORDERS_PROJECTOR_HTTP").to_owned(),
    };
    let checkout = |id: &str| {
        if let Err(e) = shop.checkout(id, Duration::from_secs(90)) {
            panic!("{e}\n{}", project.logs());
        }
    };
    shop.stock();
    checkout("1");
    let gateway = project.var("ESK_GATEWAY_HTTP").to_owned();
    let (code, body) = http_get(&gateway, "/streams/order-1").unwrap_or_default();
    assert!(code == 200 && body.contains(r#""type":"Confirmed""#), "{code} {body}");
    let (_, services) = http_get(&gateway, "/services").unwrap_or_default();
    let services: serde_json::Value = serde_json::from_str(&services).unwrap_or_default();
    let ready = services["services"].as_array().into_iter().flatten().filter(|s| s["ready"] == true).count();
    assert_eq!(ready, 11, "the gateway, 4 writers, 4 projectors, the replica and the coordinator: {services}");

    // The orders service (its context's writer and the saga) SIGKILLed: the
    // engine restarts it, and it goes on from the log (order 1 kept, a new
    // order checked out).
    let orders = project.container("orders");
    let inspect = |format: &str| docker_inspect(&orders, format);
    let pid = inspect("{{.State.Pid}}");
    assert!(pid.parse::<u32>().is_ok_and(|p| p > 1), "the orders service's pid: {pid:?}");
    // It runs as the image's user esk: one who is not root kills it through sudo.
    // (`docker kill` would not do: the engine restarts no container it was told to stop.)
    let killed = Command::new("kill").args(["-KILL", &pid]).status().is_ok_and(|s| s.success())
        || Command::new("sudo").args(["-n", "kill", "-KILL", &pid]).status().is_ok_and(|s| s.success());
    assert!(killed, "kill -KILL {pid} (the orders service, uid 10001), also with sudo -n");
    let restarted = wait_for(Duration::from_secs(120), "the orders service restarted and ready", || {
        let count: u32 = inspect("{{.RestartCount}}").parse().unwrap_or(0);
        let ready = http_get(project.var("ESK_ORDERS_HTTP"), "/ready").is_some_and(|(c, _)| c == 200);
        (count >= 1 && ready && inspect("{{.State.Pid}}") != pid).then_some(count)
    });
    if let Err(e) = restarted {
        panic!("{e}\n{}", project.logs());
    }
    let (code, body) = http_get(&gateway, "/streams/order-1").unwrap_or_default();
    assert!(code == 200 && body.contains(r#""type":"Confirmed""#), "after the restart: {code} {body}");
    checkout("2");

    // Down: nothing of the project is left.
    project.run(&["down", "-v", "--remove-orphans", "-t", "20"], Duration::from_secs(180));
    assert_eq!(project.left(&["ps", "-aq"]), "", "containers left after down");
    assert_eq!(project.left(&["volume", "ls", "-q"]), "", "volumes left after down -v");
    drop(project);
}
