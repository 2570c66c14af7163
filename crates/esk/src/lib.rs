//! esk as a library: a service's own aggregates and read models on esk's
//! writer and projector, with the platform's guarantees (expected versions,
//! idempotent retries and events in one Kafka transaction; read models with
//! exactly-once effects and read-your-writes tokens), graceful shutdown,
//! `/health`, `/ready`, `/status` and `/metrics`.
//!
//! # Quick start
//! ```no_run
//! use esk::{Aggregate, DomainError, Parser as _};
//! use serde::{Deserialize, Serialize};
//!
//! /// An order: placed once, then cancelled at most once.
//! struct Order;
//! #[derive(Default, Clone, Serialize, Deserialize)]
//! struct State { placed: bool, cancelled: bool }
//! #[derive(Deserialize)]
//! #[serde(tag = "type", content = "data")]
//! enum Command { Place { item: String }, Cancel {} }
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! #[serde(tag = "type", content = "data")]
//! enum Event { Placed { item: String }, Cancelled {} }
//!
//! impl Aggregate for Order {
//!     type State = State;
//!     type Command = Command;
//!     type Event = Event;
//!     const CATEGORY: &'static str = "order";
//!     fn handle(s: &State, c: &Command) -> Result<Vec<Event>, DomainError> {
//!         match c {
//!             Command::Place { .. } if s.placed => Err(DomainError::Rejected("already placed".into())),
//!             Command::Place { item } => Ok(vec![Event::Placed { item: item.clone() }]),
//!             Command::Cancel {} if !s.placed || s.cancelled => Err(DomainError::Rejected("nothing to cancel".into())),
//!             Command::Cancel {} => Ok(vec![Event::Cancelled {}]),
//!         }
//!     }
//!     fn apply(s: State, e: &Event) -> State {
//!         match e { Event::Placed { .. } => State { placed: true, ..s }, Event::Cancelled {} => State { cancelled: true, ..s } }
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     let config = esk::writer::Config::parse(); // the writer's flags and ESK_* variables
//!     esk::service_main("orders-writer", |shutdown| esk::Writer::new(config).aggregate::<Order>().run(shutdown)).await
//! }
//! ```
//! A projection is a [`Projection`] run by a [`Projector`] (see
//! `docs/guide.md`); aggregates and projections are tested without Kafka
//! with [`testing`].
//!
//! # What a service gets
//! - [`Writer`]: the single writer of each partition of its bounded
//!   context's commands topic, for the aggregates it is given
//!   ([`Writer::context`] names the context; the categories of its aggregates
//!   are claimed for it, and clients route them there); raw appends to any
//!   category of its context.
//! - [`Projector`]: the projections it is given, each in its own SQLite store
//!   and consumer group, plus the service's query routes ([`projector::after`]
//!   waits for a read-your-writes token, [`projector::read`] reads), and the
//!   process managers ([`Process`], sagas with compensation) it is given.
//! - [`coordinator::run_with`]: two-phase commits across contexts.
//! - [`Client`]: appends, commands, reads and transactions from any program.

/// Runs a writer and a projector in one process until `shutdown` is
/// cancelled: either stopping (for good, or on an error) stops the other, and
/// this waits for both, so that the writer leaves its partitions to the next
/// owner at once. The first error is returned (both, if both failed).
pub async fn run_both(
    writer: Writer,
    projector: Projector,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let (w, p) = tokio::join!(
        async {
            let r = writer.run(shutdown.clone()).await;
            shutdown.cancel();
            r
        },
        async {
            let r = projector.run(shutdown.clone()).await;
            shutdown.cancel();
            r
        }
    );
    match (w, p) {
        (Err(w), Err(p)) => Err(w.context(format!("and the projector stopped too: {p:#}"))),
        (w, p) => w.and(p),
    }
}

/// Each service's `Config` parses its flags and environment (`Config::parse()`).
pub use clap::Parser;
pub use esk_client::Client;
pub use esk_domain::{Aggregate, DomainError, EventData, Outcome, Registry};
pub use esk_projection::sqlite::SqliteStore;
pub use esk_projection::{ApplyError, Projection, Store, StoreError};
pub use esk_projector::Projector;
pub use esk_projector::process::Process;
pub use esk_runtime::{parse_duration, service_main};
pub use esk_wire::{Event, StreamName};
pub use esk_writer::Writer;
/// For projections' SQL and services' query routes, at the versions esk uses.
pub use {axum, rusqlite};

/// The writer: [`Writer`] and its configuration.
pub mod writer {
    pub use esk_writer::{Config, Writer};
}

/// The projector: [`Projector`], its configuration, and what a query route reads through.
pub mod projector {
    pub use esk_projector::http::{ApiError, Params, after, read};
    pub use esk_projector::{App, Config, Model, Projector};
}

/// Process managers (sagas): [`Process`], what its reactions ask for, and
/// how its commands were answered.
pub mod process {
    pub use esk_projector::process::{Answer, Effects, MAX_IN_FLIGHT, Outgoing, Process, request_id};
    pub use esk_wire::protocol::{CommandData, ExpectedVersion};
}

/// The aggregates and the read model esk ships (what `esk-writer` and
/// `esk-projector` run): the shop's `payments` and `inventory` services serve
/// them in their own contexts.
pub mod builtin {
    pub use esk_domain::account::Account;
    pub use esk_domain::inventory::Inventory;
    pub use esk_projector::accounts::{Accounts, routes as accounts_routes};
}

/// The coordinator of two-phase commits.
pub mod coordinator {
    pub use esk_coordinator::{Config, run_with};
}

pub mod testing;

/// `docs/guide.md`: its quick start compiles here, as a doctest; its other
/// snippets are excerpts of `examples/shop`, which builds and is tested.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/guide.md")]
pub struct Guide;
