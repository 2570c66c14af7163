//! `esk-projector`: see the library's documentation for what it guarantees.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = esk_projector::Config::parse();
    esk_runtime::service_main("projector", |shutdown| esk_projector::run(config, shutdown)).await
}
