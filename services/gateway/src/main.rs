//! `esk-gateway`: see the library's documentation for what it serves.

/// mimalloc rather than glibc's malloc: esk's hot paths allocate and free
/// per record (ADR 11).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = esk_gateway::Config::parse();
    esk_runtime::service_main("gateway", |shutdown| esk_gateway::run(config, shutdown)).await
}
