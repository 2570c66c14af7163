//! Process plumbing shared by esk's binaries.
//!
//! # Layout
//! - [`init_tracing`]: logs to stderr, filtered by `RUST_LOG` (default `info`),
//!   as JSON when `ESK_LOG_FORMAT=json`.
//! - [`shutdown_on_signals`]: a [`CancellationToken`] cancelled by SIGINT or SIGTERM,
//!   which every service's `run(config, shutdown)` takes.
//! - [`service_main`]: the body of every service's `main`.
//! - [`metrics`]: the process's Prometheus recorder, installed once, rendered at
//!   `/metrics` by every service.
//! - [`http`]: every service's HTTP server, with its bounds (header and
//!   request timeouts, body size, connections).

pub mod described;
pub mod http;
pub mod sample;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// A duration: `500ms`, `10s`, `2m`, `24h`, `7d`, or a bare number of
/// seconds; more than 0 and at most 10 years.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = number.parse().map_err(|_| format!("'{s}' is not a duration; use e.g. 10s, 500ms, 2m, 24h, 7d"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => return Err(format!("'{s}' has unknown unit '{unit}'; use ms, s, m, h or d")),
    };
    if !(secs > 0.0 && secs <= 10.0 * 365.0 * 86_400.0) {
        return Err(format!("'{s}' is out of range; give more than 0 and at most 10 years"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// Installs the global tracing subscriber. Safe to call more than once.
pub fn init_tracing(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if std::env::var("ESK_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The body of every service's `main`: tracing, a panic ends the process,
/// `run` with a token that SIGINT or SIGTERM cancels; its error is logged and
/// printed, and the exit code says why it stopped: 0 cleanly,
/// [`EXIT_REFUSED`] when the brokers refused its credentials or an ACL is
/// missing (nothing a restart would mend), 1 any other error, 70 a panic.
pub async fn service_main<F>(name: &str, run: impl FnOnce(CancellationToken) -> F) -> std::process::ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    init_tracing("info");
    exit_on_panic();
    match run(shutdown_on_signals()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{name} stopped: {e:#}");
            eprintln!("esk-{name}: {e:#}");
            if refused(&e) { std::process::ExitCode::from(EXIT_REFUSED) } else { std::process::ExitCode::FAILURE }
        }
    }
}

/// A service's exit code when the brokers refused it (authentication or
/// authorization), as `esk`'s 5 for Kafka errors.
pub const EXIT_REFUSED: u8 = 5;

/// Whether `e` comes from the brokers refusing the credentials or an ACL.
fn refused(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| cause.downcast_ref::<esk_kafka::Error>().is_some_and(esk_kafka::Error::is_refusal))
}

/// A token cancelled when the process gets SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The process-wide Prometheus recorder. Histograms named `*_seconds` get
/// latency buckets from 0.5 ms to 10 s, `*_records` ones powers of two to 4096.
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
            let sizes: Vec<f64> = (0..13).map(|i| f64::from(1u32 << i)).collect();
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_records".into()), &sizes))
                .expect("bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed (a test harness); then ours just renders nothing new.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Makes a panic on any thread end the process (exit code 70) after it is
/// logged. Services are crash-only: a worker thread that died quietly would
/// leave its partitions or models unserved while `/health` still answered;
/// a dead process is taken over by another instance or restarted.
pub fn exit_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        tracing::error!("panic: {info}; exiting");
        std::process::exit(70);
    }));
}

/// Fault injection for crash tests: `ESK_FAULT=<point>` makes a service kill
/// itself with SIGKILL the first time it passes `point` (for example the
/// coordinator right after committing a decision). Unset, it costs a string
/// comparison. The points each service knows are listed in its crate docs.
pub fn fault_point(point: &str) {
    static FAULT: OnceLock<Option<String>> = OnceLock::new();
    let armed = FAULT.get_or_init(|| std::env::var("ESK_FAULT").ok().filter(|f| !f.is_empty()));
    if armed.as_deref() == Some(point) {
        tracing::warn!(point, "ESK_FAULT: killing this process with SIGKILL");
        let _ = std::process::Command::new("kill").args(["-9", &std::process::id().to_string()]).status();
        // kill(1) missing: still end at once, without cleanup.
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations_parse_with_their_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("5y").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("20000d").is_err());
    }
}
