//! given/when/then without Kafka.
//!
//! Aggregates: `given::<Order>(&events).when(&command).then_expect(events)`
//! (or `then_reject`, `then_invalid`). Projections: a [`Model`] applies
//! events to the projection's own SQLite store in a temporary folder as the
//! runner applies a batch — each event in its own savepoint, one that the
//! projection refuses for good ([`ApplyError::Permanent`]) undone and parked
//! while the others commit, the whole batch undone on a transient error —
//! and `query` reads it back. The events are taken as given: decoding,
//! upcasting and JSON Schema checks are the runner's, before `apply`.
//! Process managers: a [`Processes`] harness applies events, answers and
//! deadlines as the runner and the sender do, on the manager's own store and
//! a clock the test moves, and shows the commands each reaction queued.
//!
//! ```
//! use esk::testing::{Model, event};
//! # use esk::{ApplyError, Event, Projection, SqliteStore, StoreError};
//! # use esk::rusqlite::Transaction;
//! # struct Count;
//! # impl Projection<SqliteStore> for Count {
//! #     fn name(&self) -> &str { "count" }
//! #     fn categories(&self) -> Vec<String> { vec!["order".into()] }
//! #     fn migrate(&self, s: &mut SqliteStore) -> Result<(), StoreError> {
//! #         s.execute_batch("CREATE TABLE IF NOT EXISTS n (k TEXT PRIMARY KEY, v INTEGER)")
//! #     }
//! #     fn apply(&self, tx: &mut Transaction<'_>, e: &Event) -> Result<(), ApplyError> {
//! #         tx.execute("INSERT INTO n VALUES ('all', 1) ON CONFLICT(k) DO UPDATE SET v = v + 1", [])?;
//! #         Ok(())
//! #     }
//! # }
//! let mut model = Model::new(Count).unwrap();
//! let parked = model.given(&[event("order-1", 1, "Placed", serde_json::json!({"item": "tea"}))]).unwrap();
//! assert!(parked.is_empty());
//! let n: i64 = model.query(|c| c.query_row("SELECT v FROM n", [], |r| r.get(0))).unwrap();
//! assert_eq!(n, 1);
//! ```

use esk_projection::Store as _;
use esk_projection::sqlite::SqliteStore;
use esk_projection::{ApplyError, Projection, StoreError};
use esk_wire::{Event, StreamName};

pub use esk_domain::testing::{Given, When, given};
/// A process manager under test: see [`esk_projector::process::Harness`].
pub use esk_projector::process::Harness as Processes;

fn at(i: usize, e: StoreError) -> (usize, ApplyError) {
    (i, ApplyError::Transient(e.to_string()))
}

/// An event of `stream` at `version`, as the writer would have written it
/// (id `<stream>-<version>`, source `esk-test`, now).
///
/// # Panics
/// When `stream` is not a stream name (`<category>-<id>`): a test's typo.
#[track_caller]
pub fn event(stream: &str, version: u64, event_type: &str, data: serde_json::Value) -> Event {
    let stream = StreamName::parse(stream).unwrap_or_else(|e| panic!("'{stream}' is not a stream name: {e}"));
    Event {
        id: format!("{stream}-{version}"),
        source: "esk-test".into(),
        event_type: event_type.into(),
        time: chrono::Utc::now(),
        stream,
        version,
        correlation_id: None,
        causation_id: None,
        data_schema: None,
        data,
    }
}

/// A projection over its own SQLite store in a temporary folder (removed
/// when the model is dropped).
#[derive(Debug)]
pub struct Model<P> {
    projection: P,
    store: SqliteStore,
    _dir: tempfile::TempDir,
}

impl<P: Projection<SqliteStore>> Model<P> {
    /// A new, empty store, migrated by the projection.
    pub fn new(projection: P) -> Result<Self, StoreError> {
        let dir = tempfile::tempdir()?;
        let mut store = SqliteStore::open(dir.path())?;
        projection.migrate(&mut store)?;
        Ok(Self { projection, store, _dir: dir })
    }

    /// Applies `events` in order as one batch: each in its own savepoint,
    /// all in one transaction. An event the projection refuses for good is
    /// undone alone and returned as parked (its index and reason) while the
    /// others commit, as the runner parks it; a transient failure undoes the
    /// whole batch and is returned with the event's index.
    pub fn given(&mut self, events: &[Event]) -> Result<Vec<(usize, String)>, (usize, ApplyError)> {
        let mut tx = self.store.begin().map_err(|e| at(0, e))?;
        let mut parked = Vec::new();
        for (i, e) in events.iter().enumerate() {
            SqliteStore::event_begin(&mut tx).map_err(|err| at(i, err))?;
            match self.projection.apply(&mut tx, e) {
                Ok(()) => SqliteStore::event_release(&mut tx).map_err(|err| at(i, err))?,
                Err(ApplyError::Permanent(reason)) => {
                    SqliteStore::event_rollback(&mut tx).map_err(|err| at(i, err))?;
                    parked.push((i, reason));
                }
                // Dropping the transaction rolls the batch back.
                Err(transient) => return Err((i, transient)),
            }
        }
        SqliteStore::commit(tx).map_err(|e| at(events.len().saturating_sub(1), e))?;
        Ok(parked)
    }

    /// Applies one event: `Err` when the projection refuses it (then nothing
    /// of it is kept) or the store fails.
    pub fn when(&mut self, event: &Event) -> Result<(), ApplyError> {
        match self.given(std::slice::from_ref(event)) {
            Ok(parked) => match parked.into_iter().next() {
                Some((_, reason)) => Err(ApplyError::Permanent(reason)),
                None => Ok(()),
            },
            Err((_, e)) => Err(e),
        }
    }

    /// Reads the model.
    pub fn query<R>(&self, f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<R>) -> rusqlite::Result<R> {
        f(self.store.connection())
    }
}
