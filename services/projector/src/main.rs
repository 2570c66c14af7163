//! `esk-projector`: see the library's documentation for what it guarantees.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    esk_runtime::init_tracing("info");
    esk_runtime::exit_on_panic();

    let config = esk_projector::Config::parse();
    let shutdown = esk_runtime::shutdown_on_signals();
    match esk_projector::run(config, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("projector stopped: {e:#}");
            eprintln!("esk-projector: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
