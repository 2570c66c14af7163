//! Pure domain aggregates for esk: no I/O, no Kafka, no clocks.
//!
//! # Layout
//! - [`aggregate`]: the [`Aggregate`] trait (`handle(&state, command)` and
//!   `apply(state, event)`, plus the 2PC participant hooks), [`DomainError`], and
//!   [`DynAggregate`], the JSON-facing form the writer calls.
//! - [`account`]: the worked example: open, deposit, withdraw never below
//!   zero, and holds for two-phase commits.
//! - [`inventory`]: stock per item, reservations never beyond what is in stock,
//!   so that one transaction can pay and reserve across services.
//! - [`testing`]: given/when/then helpers for aggregate tests.

pub mod account;
pub mod aggregate;
pub mod inventory;
pub mod testing;

pub use aggregate::{Aggregate, DomainError, DynAggregate, DynError, EventData, Outcome, Registry};
