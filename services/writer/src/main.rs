//! `esk-writer`: see the library's documentation for what it guarantees.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = esk_writer::Config::parse();
    esk_runtime::service_main("writer", |shutdown| esk_writer::run(config, shutdown)).await
}
