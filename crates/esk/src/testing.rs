//! given/when/then without Kafka.
//!
//! Aggregates: `given::<Order>(&events).when(&command).then_expect(events)`
//! (or `then_reject`, `then_invalid`). Projections: a [`Model`] applies
//! events to the projection's own SQLite store in a temporary folder, each
//! event as the runner applies it (its own savepoint inside a transaction),
//! and `query` reads it back.
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
//! model.given(&[event("order-1", 1, "Placed", serde_json::json!({"item": "tea"}))]).unwrap();
//! let n: i64 = model.query(|c| c.query_row("SELECT v FROM n", [], |r| r.get(0))).unwrap();
//! assert_eq!(n, 1);
//! ```

use esk_projection::Store as _;
use esk_projection::sqlite::SqliteStore;
use esk_projection::{ApplyError, Projection, StoreError};
use esk_wire::{Event, StreamName};

pub use esk_domain::testing::{Given, When, given};

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

    /// Applies `events` in order, each in its own savepoint and the whole
    /// in one transaction, as the runner does. The first that fails is
    /// returned (with its index) and nothing is kept: a permanent failure is
    /// one the runner would park.
    pub fn given(&mut self, events: &[Event]) -> Result<(), (usize, ApplyError)> {
        let store_error = |e: StoreError| (0, ApplyError::Transient(e.to_string()));
        let mut tx = self.store.begin().map_err(store_error)?;
        for (i, e) in events.iter().enumerate() {
            SqliteStore::event_begin(&mut tx).map_err(store_error)?;
            self.projection.apply(&mut tx, e).map_err(|err| (i, err))?;
            SqliteStore::event_release(&mut tx).map_err(store_error)?;
        }
        SqliteStore::commit(tx).map_err(store_error)
    }

    /// Applies one event; see [`Model::given`].
    pub fn when(&mut self, event: &Event) -> Result<(), ApplyError> {
        self.given(std::slice::from_ref(event)).map_err(|(_, e)| e)
    }

    /// Reads the model.
    pub fn query<R>(&self, f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<R>) -> rusqlite::Result<R> {
        f(self.store.connection())
    }
}
