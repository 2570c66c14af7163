//! `esk-replica`: see the library's documentation for what it guarantees.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    esk_runtime::init_tracing("info");
    esk_runtime::exit_on_panic();
    let config = esk_replica::Config::parse();
    let shutdown = esk_runtime::shutdown_on_signals();
    match esk_replica::run(config, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("replica stopped: {e:#}");
            eprintln!("esk-replica: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
