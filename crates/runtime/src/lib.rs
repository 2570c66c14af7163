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

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

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
/// printed, and the exit code says whether it stopped cleanly.
pub async fn service_main<E, F>(name: &str, run: impl FnOnce(CancellationToken) -> F) -> std::process::ExitCode
where
    E: std::fmt::Display,
    F: Future<Output = Result<(), E>>,
{
    init_tracing("info");
    exit_on_panic();
    match run(shutdown_on_signals()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{name} stopped: {e:#}");
            eprintln!("esk-{name}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
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
/// latency buckets from 0.5 ms to 10 s, `*_size` ones powers of two to 4096.
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
            let sizes: Vec<f64> = (0..13).map(|i| f64::from(1u32 << i)).collect();
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), &sizes))
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
