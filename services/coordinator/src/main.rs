//! `esk-coordinator`: see the library's documentation for what it guarantees.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = esk_coordinator::Config::parse();
    esk_runtime::service_main("coordinator", |shutdown| esk_coordinator::run(config, shutdown)).await
}
