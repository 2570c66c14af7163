//! Kafka adapters for esk: everything that speaks to a broker goes through here.
//!
//! # Layout
//! - [`config`]: client settings shared by every esk producer and consumer
//!   (murmur2 partitioning, bounded timeouts), bootstrap-address checks.
//! - [`admin`]: the platform topics and their configs; idempotent creation and
//!   description through the admin API.
//! - [`read`]: reading a partition to its end (restores).
//! - [`record`]: owned headers, and dead letters (cut to fit when they must).
//! - [`error`]: errors that say whether the broker was unreachable (retry later)
//!   or the request was wrong (do not retry).

pub mod admin;
pub mod config;
pub mod error;
pub mod read;
pub mod record;

pub use config::{KafkaConfig, watermarks};
pub use error::{Error, refuses_the_record};
