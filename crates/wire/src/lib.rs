//! The wire format of esk: what any Kafka client sees on esk's topics.
//!
//! # Layout
//! - [`stream`]: stream names, `<category>-<id>`, and their validation.
//! - [`envelope`]: the CloudEvents 1.0 binary-mode envelope (Kafka headers + JSON value).
//! - [`schema`]: JSON Schemas from `schemas/<category>/<Type>.v<N>.json`, strict
//!   categories, upcasters.
//! - [`topics`]: the names of the platform topics under a prefix, by context.
//! - [`contexts`]: the registry of bounded contexts: which context owns a category.
//! - [`partition`]: Kafka's Java partitioner (murmur2), so every client agrees.
//! - [`protocol`]: requests, replies, 2PC messages and state records.
//! - [`limits`]: the bounds on every input, derived from the broker's `message.max.bytes`.
//!
//! Nothing here talks to Kafka: headers are plain `(name, bytes)` pairs so that the
//! format can be tested (and fuzzed) without a broker.

pub mod contexts;
pub mod envelope;
pub mod limits;
pub mod partition;
pub mod protocol;
pub mod schema;
pub mod stream;
pub mod topics;

pub use envelope::{DecodeError, Event, Header};
pub use schema::{SchemaError, SchemaRegistry, ValidationError};
pub use stream::{StreamName, StreamNameError};
pub use topics::Topics;
