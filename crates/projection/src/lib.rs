//! esk's projection framework: read models with exactly-once effects.
//!
//! Delivery guarantee: **exactly-once effects**. A projection's tables and its
//! checkpoint (topic, partition, next offset) change in one local transaction;
//! on start and on every assignment the runner seeks to its own checkpoint,
//! never to the group's committed offset (it commits that too, for lag tools).
//! A crash at any point leaves the read model equal to the fold of a prefix of
//! the log.
//!
//! # Layout
//! - [`Projection`]: what a read model implements: its name, the categories it
//!   reads, its schema, and `apply(tx, event)`.
//! - [`Store`]: the local store behind a projection; [`sqlite::SqliteStore`] is
//!   the embedded default (rusqlite, bundled), versioned so that a rebuild can
//!   build beside the live copy and switch atomically.
//! - [`runner`]: the consume loop (`read_committed`, batching, checkpoints,
//!   dead letters, metrics, positions for read-your-writes) and rebuilds.
//!
//! # Writing a projection
//! ```ignore
//! struct Totals;
//! impl Projection<SqliteStore> for Totals {
//!     fn name(&self) -> &str { "totals" }
//!     fn categories(&self) -> Vec<String> { vec!["account".into()] }
//!     fn migrate(&self, store: &mut SqliteStore) -> Result<(), StoreError> {
//!         store.execute_batch("CREATE TABLE IF NOT EXISTS totals (n INTEGER)")
//!     }
//!     fn apply(&self, tx: &mut Transaction<'_>, e: &Event) -> Result<(), ApplyError> {
//!         tx.execute("UPDATE totals SET n = n + 1", [])?;   // transient on error
//!         Ok(())
//!     }
//! }
//! ```
//! Return [`ApplyError::Permanent`] for an event the projection can never
//! apply (it is parked in `<prefix>.dlq.<name>` and the runner moves on), and
//! [`ApplyError::Transient`] for a store failure (the batch is retried).
//! The shipped example is the `accounts` projection of `services/projector`.

pub mod runner;
pub mod sqlite;

use std::collections::BTreeMap;

use esk_wire::Event;

/// Where a projection stands: next offset to apply per (topic, partition).
pub type Positions = BTreeMap<(String, i32), i64>;

/// Why an event was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The event can never be applied (unknown type, a rule of the model it
    /// breaks): park it and go on.
    #[error("{0}")]
    Permanent(String),
    /// The store failed; the batch is rolled back and retried.
    #[error("{0}")]
    Transient(String),
}

impl From<rusqlite::Error> for ApplyError {
    fn from(e: rusqlite::Error) -> Self {
        ApplyError::Transient(e.to_string())
    }
}

/// A store failure; the runner retries.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// An event that could not be applied, with where it came from.
#[derive(Debug, Clone)]
pub struct Parked {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub reason: String,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// The local store of a projection. Each store is one version of the model; a
/// rebuild creates the next version beside the current one.
pub trait Store: Sized + Send + 'static {
    type Tx<'a>;

    /// The version of the model this store holds.
    fn version(&self) -> u64;
    /// The checkpoints committed so far.
    fn checkpoints(&mut self) -> Result<Positions, StoreError>;
    fn begin(&mut self) -> Result<Self::Tx<'_>, StoreError>;
    /// Starts one event's changes inside a transaction (a savepoint).
    fn event_begin(tx: &mut Self::Tx<'_>) -> Result<(), StoreError>;
    /// Undoes one event's changes, keeping the rest of the transaction.
    fn event_rollback(tx: &mut Self::Tx<'_>) -> Result<(), StoreError>;
    fn event_release(tx: &mut Self::Tx<'_>) -> Result<(), StoreError>;
    fn save_checkpoints(tx: &mut Self::Tx<'_>, positions: &Positions) -> Result<(), StoreError>;
    fn record_parked(tx: &mut Self::Tx<'_>, parked: &Parked) -> Result<(), StoreError>;
    /// Whether this store version parked the event and has not applied it
    /// since: only such an event may be replayed (once it is, it is not
    /// parked any more). An event a rebuild applied in order is not parked in
    /// the rebuilt version, so a replay there skips it.
    fn is_parked(tx: &mut Self::Tx<'_>, topic: &str, partition: i32, offset: i64) -> Result<bool, StoreError>;
    /// Whether a parked event was already applied by a replay.
    fn replayed(tx: &mut Self::Tx<'_>, topic: &str, partition: i32, offset: i64) -> Result<bool, StoreError>;
    fn mark_replayed(tx: &mut Self::Tx<'_>, topic: &str, partition: i32, offset: i64) -> Result<(), StoreError>;

    fn commit(tx: Self::Tx<'_>) -> Result<(), StoreError>;
    /// Creates the next version, empty, beside this one.
    fn create_next(&self) -> Result<Self, StoreError>;
    /// Makes this version the one a restart opens (and removes older ones).
    fn make_current(&self) -> Result<(), StoreError>;
}

/// A read model built from events.
pub trait Projection<S: Store>: Send + Sync + 'static {
    /// Names the store, the dead-letter topic (`<prefix>.dlq.<name>`) and the group.
    fn name(&self) -> &str;
    /// The categories whose events it reads.
    fn categories(&self) -> Vec<String>;
    /// Creates or updates its tables in a store.
    fn migrate(&self, store: &mut S) -> Result<(), StoreError>;
    /// Applies one event inside the batch's transaction.
    fn apply(&self, tx: &mut S::Tx<'_>, event: &Event) -> Result<(), ApplyError>;
}
