//! `esk-projector`: see the library's documentation for what it guarantees.

use clap::Parser;

/// mimalloc rather than glibc's malloc: esk's hot paths allocate and free
/// per record (ADR 11; the projector's catch-up 3-11 % faster).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = esk_projector::Config::parse();
    esk_runtime::service_main("projector", |shutdown| esk_projector::run(config, shutdown)).await
}
