//! `esk-coordinator`: see the library's documentation for what it guarantees.

/// mimalloc rather than glibc's malloc: esk's hot paths allocate and free
/// per record (ADR 11).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = esk_coordinator::Config::parse();
    esk_runtime::service_main("coordinator", |shutdown| esk_coordinator::run(config, shutdown)).await
}
