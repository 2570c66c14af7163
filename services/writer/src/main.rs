//! `esk-writer`: see the library's documentation for what it guarantees.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    esk_runtime::init_tracing("info");
    esk_runtime::exit_on_panic();

    let config = esk_writer::Config::parse();
    let shutdown = esk_runtime::shutdown_on_signals();
    match esk_writer::run(config, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("writer stopped: {e:#}");
            eprintln!("esk-writer: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
