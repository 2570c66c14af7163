//! Process plumbing shared by esk's binaries.
//!
//! # Layout
//! - [`init_tracing`]: logs to stderr, filtered by `RUST_LOG` (default `info`),
//!   as JSON when `ESK_LOG_FORMAT=json`.
//! - [`shutdown_on_signals`]: a [`CancellationToken`] cancelled by SIGINT or SIGTERM,
//!   which every service's `run(config, shutdown)` takes.

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber. Safe to call more than once.
pub fn init_tracing(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if std::env::var("ESK_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
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
