//! `esk`: the command line of esk, event sourcing on Apache Kafka.
//!
//! Human output by default; `--json` prints one JSON document on stdout. Errors
//! go to stderr (and, with `--json`, to stdout as `{"error", "message"}`). The
//! exit codes are the contract of DESIGN section 8; see [`exit::Failure`].

/// mimalloc rather than glibc's malloc: esk's hot paths allocate and free
/// per record (ADR 11).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod acls;
mod cli;
mod dlq;
mod events;
mod exit;
mod http;
mod produce;
mod projection;
mod replica;
mod topics;
mod txs;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, DlqCommand, ProjectionCommand, ReplicaCommand, TopicsCommand, TxCommand};

use crate::exit::Failure;

fn main() -> ExitCode {
    let json_requested = std::env::args().any(|a| a == "--json");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return exit::usage(&e, json_requested),
    };
    esk_runtime::init_tracing("warn");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("building the tokio runtime");
    let json = cli.global.json;
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(json),
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let g = cli.global;
    match cli.command {
        Command::Topics { command } => match command {
            TopicsCommand::Init(args) => topics::init(&g, args).await,
            TopicsCommand::Describe => topics::describe(&g).await,
        },
        Command::Append(args) => events::append(&g, args).await,
        Command::Produce(args) => produce::produce(&g, args).await,
        Command::Command(args) => events::command(&g, args).await,
        Command::Read(args) => events::read(&g, args).await,
        Command::Tail(args) => events::tail(&g, args).await,
        Command::Tx { command } => match command {
            TxCommand::Transfer { from, to, amount, tx } => txs::transfer(&g, &from, &to, &amount, tx).await,
            TxCommand::Run { file, tx } => txs::run_file(&g, &file, tx).await,
            TxCommand::Status { txid } => txs::status(&g, &txid).await,
        },
        Command::Projection { command } => match command {
            ProjectionCommand::Status => projection::status(&g).await,
            ProjectionCommand::Rebuild { name, no_wait } => projection::rebuild(&g, &name, no_wait).await,
        },
        Command::Replica { command: ReplicaCommand::Status } => replica::status(&g).await,
        Command::Dlq { command } => match command {
            DlqCommand::List { consumer, context } => dlq::list(&g, &consumer, context.as_deref()).await,
            DlqCommand::Replay { consumer, context } => dlq::replay(&g, &consumer, context.as_deref()).await,
        },
        Command::Acls(args) => acls::run(&g, &args),
    }
}
