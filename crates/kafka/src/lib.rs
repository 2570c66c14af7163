//! Kafka adapters for esk: everything that speaks to a broker goes through here.
//!
//! # Layout
//! - [`config`]: client settings shared by every esk producer and consumer
//!   (murmur2 partitioning, bounded timeouts), bootstrap-address checks.
//! - [`admin`]: the platform topics and their configs; idempotent creation and
//!   description through the admin API.
//! - [`record`]: owned headers, and the headers of dead letters.
//! - [`error`]: errors that say whether the broker was unreachable (retry later)
//!   or the request was wrong (do not retry).

pub mod admin;
pub mod config;
pub mod error;
pub mod record;

pub use config::{KafkaConfig, watermarks};
pub use error::Error;
