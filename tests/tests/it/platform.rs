//! `make up` / `make down`: the broker and topics come up once, a second `up`
//! changes nothing, `down` leaves no process and the port closed.

use std::path::Path;
use std::process::Command;

use esk_tests::{bin, free_port_pair, repo_root};

/// The ports one `make up` of this test uses: the broker's and the writer's.
#[derive(Clone, Copy)]
struct Ports {
    kafka: u16,
    writer: u16,
    projector: u16,
    coordinator: u16,
    replica: u16,
}

fn make(target: &str, home: &Path, ports: Ports) -> (bool, String) {
    let bin_dir = bin("esk").parent().unwrap().to_owned();
    let out = Command::new("make")
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

fn pid_alive(pid: &str) -> bool {
    Command::new("kill")
        .args(["-0", pid.trim()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn make_up_is_idempotent_and_make_down_leaves_nothing() {
    let home = tempfile::tempdir().unwrap();
    let ports = Ports {
        kafka: free_port_pair().unwrap(),
        writer: free_port_pair().unwrap(),
        projector: free_port_pair().unwrap(),
        coordinator: free_port_pair().unwrap(),
        replica: free_port_pair().unwrap(),
    };

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
    let projector_pid = std::fs::read_to_string(home.path().join("run/projector.pid")).unwrap();
    assert!(home.path().join("data").is_dir(), "the projector's store lives under ESK_HOME/data");

    let writer_pid = std::fs::read_to_string(home.path().join("run/writer.pid")).unwrap();
    assert!(home.path().join("log/writer.log").exists());

    drop(guard);
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
