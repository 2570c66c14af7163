//! Kafka adapters for esk: everything that speaks to a broker goes through here.
//!
//! # Layout
//! - [`config`]: the only place esk builds Kafka clients: named profiles
//!   (committed reader, group member, transactional producer, admin, ...)
//!   over settings every client shares (murmur2 partitioning, bounded
//!   timeouts), bootstrap-address checks. `make lint` fails on a client
//!   config built or set anywhere else.
//! - [`properties`]: the user's own client properties (a file and
//!   `ESK_KAFKA_<PROPERTY>` variables) on top of every profile; those a
//!   guarantee rests on are refused.
//! - [`admin`]: the platform topics and their configs; idempotent creation and
//!   description through the admin API.
//! - [`contexts`]: the registry of bounded contexts: read, followed, claimed.
//! - [`read`]: reading a partition to its end (restores).
//! - [`record`]: owned headers, and dead letters (cut to fit when they must).
//! - [`error`]: errors that say whether the broker was unreachable (retry later),
//!   the request was wrong, the credentials refused or an ACL missing (do not retry).
//! - [`watch`]: a client context that sees a refused login, and metadata waits
//!   that end with it at once rather than at their timeout.

pub mod admin;
pub mod config;
pub mod contexts;
pub mod error;
pub mod properties;
pub mod read;
pub mod record;
pub mod watch;

pub use config::{GroupMember, KafkaConfig, Sending, watermarks};

/// Drops a librdkafka client (consumer, producer, admin) on a thread of its
/// own: librdkafka's destroy waits for its threads, ~100 ms, which no caller
/// on a request's path should wait for. If no thread can be started, it is
/// dropped here.
pub fn destroy_later<T: Send + 'static>(client: T) {
    let _ = std::thread::Builder::new().name("esk-kafka-destroy".into()).spawn(move || drop(client));
}
pub use error::{Error, refuses_the_record};
pub use properties::Properties;
pub use watch::AuthWatch;
