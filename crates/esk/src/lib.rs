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
//! # What a service gets, and its limits today
//! - [`Writer`]: the single writer of each partition of the installation's
//!   commands topic, for the aggregates it is given; raw appends to any
//!   category. One writer group serves an installation, so every writer of it
//!   must be given the same aggregates (the built-in ones are
//!   [`Registry::builtin`]): a service with its own aggregates runs its own
//!   writer under its own topic prefix, or registers the built-in ones too.
//! - [`Projector`]: the projections it is given, each in its own SQLite store
//!   and consumer group, plus the service's query routes ([`projector::after`]
//!   waits for a read-your-writes token, [`projector::read`] reads).
//! - [`coordinator::run_with`]: two-phase commits over the aggregates it is
//!   given.
//! - [`Client`]: appends, commands, reads and transactions from any program.

/// Each service's `Config` parses its flags and environment (`Config::parse()`).
pub use clap::Parser;
pub use esk_client::Client;
pub use esk_domain::{Aggregate, DomainError, EventData, Outcome, Registry};
pub use esk_projection::sqlite::SqliteStore;
pub use esk_projection::{ApplyError, Projection, Store, StoreError};
pub use esk_projector::Projector;
pub use esk_runtime::service_main;
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

/// The coordinator of two-phase commits.
pub mod coordinator {
    pub use esk_coordinator::{Config, run_with};
}

pub mod testing;
