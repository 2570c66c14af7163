//! `esk-replica`: see the library's documentation for what it guarantees.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = esk_replica::Config::parse();
    esk_runtime::service_main("replica", |shutdown| esk_replica::run(config, shutdown)).await
}
