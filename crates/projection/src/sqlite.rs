//! The embedded store: one SQLite file per model version, in WAL mode so that
//! queries read while the runner writes.
//!
//! Layout of a projection's folder: `v<N>.sqlite` per version and `CURRENT`,
//! naming the version a restart opens. A rebuild writes `v<N+1>.sqlite` beside
//! the live file and switches by rewriting `CURRENT` (write, fsync, rename).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, Transaction, params};

use crate::{Parked, Positions, Store, StoreError};

/// One version of a projection's model.
pub struct SqliteStore {
    dir: PathBuf,
    version: u64,
    conn: Connection,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path()).finish()
    }
}

fn version_file(dir: &Path, version: u64) -> PathBuf {
    dir.join(format!("v{version}.sqlite"))
}

fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    // WAL: readers never block the writer. NORMAL: a commit survives a process
    // crash; a power loss may drop the last commits, checkpoint included, so
    // the model is still the fold of a prefix of the log.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS esk_checkpoints (
             topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
             PRIMARY KEY (topic, partition));
         CREATE TABLE IF NOT EXISTS esk_parked (
             topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL,
             reason TEXT NOT NULL, parked_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
             PRIMARY KEY (topic, partition, offset));
         CREATE TABLE IF NOT EXISTS esk_replayed (
             topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL,
             PRIMARY KEY (topic, partition, offset));",
    )?;
    Ok(conn)
}

fn remove_version(dir: &Path, version: u64) {
    let base = version_file(dir, version);
    for suffix in ["", "-wal", "-shm"] {
        let mut p = base.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

impl SqliteStore {
    /// Opens the current version of the projection stored under `dir` (version
    /// 1 when there is none yet).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)?;
        let version = current_version(dir)?.unwrap_or(1);
        let conn = open(&version_file(dir, version))?;
        let store = Self { dir: dir.to_owned(), version, conn };
        if current_version(dir)?.is_none() {
            store.make_current()?;
        }
        Ok(store)
    }

    pub fn path(&self) -> PathBuf {
        version_file(&self.dir, self.version)
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn execute_batch(&mut self, sql: &str) -> Result<(), StoreError> {
        Ok(self.conn.execute_batch(sql)?)
    }
}

/// The version named in `CURRENT`, if any.
pub fn current_version(dir: &Path) -> Result<Option<u64>, StoreError> {
    match std::fs::read_to_string(dir.join("CURRENT")) {
        Ok(text) => text.trim().parse().map(Some).map_err(|_| {
            StoreError::Other(format!("{}: CURRENT holds '{}', not a version", dir.display(), text.trim()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl Store for SqliteStore {
    type Tx<'a> = Transaction<'a>;

    fn version(&self) -> u64 {
        self.version
    }

    fn checkpoints(&mut self) -> Result<Positions, StoreError> {
        let mut stmt = self.conn.prepare("SELECT topic, partition, next_offset FROM esk_checkpoints")?;
        let rows = stmt.query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// `BEGIN IMMEDIATE`: the batch takes the write lock first, so another
    /// writer of the file (a process manager's sender) makes it wait (the
    /// busy timeout, 10 s) rather than fail when it upgrades a stale read.
    fn begin(&mut self) -> Result<Transaction<'_>, StoreError> {
        Ok(self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?)
    }

    fn event_begin(tx: &mut Transaction<'_>) -> Result<(), StoreError> {
        tx.prepare_cached("SAVEPOINT esk_event")?.execute([])?;
        Ok(())
    }

    fn event_rollback(tx: &mut Transaction<'_>) -> Result<(), StoreError> {
        tx.prepare_cached("ROLLBACK TO esk_event")?.execute([])?;
        tx.prepare_cached("RELEASE esk_event")?.execute([])?;
        Ok(())
    }

    fn event_release(tx: &mut Transaction<'_>) -> Result<(), StoreError> {
        tx.prepare_cached("RELEASE esk_event")?.execute([])?;
        Ok(())
    }

    fn save_checkpoints(tx: &mut Transaction<'_>, positions: &Positions) -> Result<(), StoreError> {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO esk_checkpoints (topic, partition, next_offset) VALUES (?1, ?2, ?3)
             ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
        )?;
        for ((topic, partition), next) in positions {
            stmt.execute(params![topic, partition, next])?;
        }
        Ok(())
    }

    fn record_parked(tx: &mut Transaction<'_>, p: &Parked) -> Result<(), StoreError> {
        tx.execute(
            "INSERT OR REPLACE INTO esk_parked (topic, partition, offset, reason) VALUES (?1, ?2, ?3, ?4)",
            params![p.topic, p.partition, p.offset, p.reason],
        )?;
        Ok(())
    }

    fn is_parked(tx: &mut Transaction<'_>, topic: &str, partition: i32, offset: i64) -> Result<bool, StoreError> {
        let n: i64 = tx.query_row(
            "SELECT count(*) FROM esk_parked WHERE topic = ?1 AND partition = ?2 AND offset = ?3",
            params![topic, partition, offset],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    fn replayed(tx: &mut Transaction<'_>, topic: &str, partition: i32, offset: i64) -> Result<bool, StoreError> {
        let n: i64 = tx.query_row(
            "SELECT count(*) FROM esk_replayed WHERE topic = ?1 AND partition = ?2 AND offset = ?3",
            params![topic, partition, offset],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    fn mark_replayed(tx: &mut Transaction<'_>, topic: &str, partition: i32, offset: i64) -> Result<(), StoreError> {
        tx.execute(
            "INSERT OR IGNORE INTO esk_replayed (topic, partition, offset) VALUES (?1, ?2, ?3)",
            params![topic, partition, offset],
        )?;
        tx.execute(
            "DELETE FROM esk_parked WHERE topic = ?1 AND partition = ?2 AND offset = ?3",
            params![topic, partition, offset],
        )?;
        Ok(())
    }

    fn commit(tx: Transaction<'_>) -> Result<(), StoreError> {
        Ok(tx.commit()?)
    }

    fn create_next(&self) -> Result<Self, StoreError> {
        let version = self.version + 1;
        remove_version(&self.dir, version);
        let conn = open(&version_file(&self.dir, version))?;
        Ok(Self { dir: self.dir.clone(), version, conn })
    }

    fn make_current(&self) -> Result<(), StoreError> {
        let tmp = self.dir.join("CURRENT.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            writeln!(f, "{}", self.version)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.dir.join("CURRENT"))?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        for old in 1..self.version {
            remove_version(&self.dir, old);
        }
        Ok(())
    }
}

/// Read-only connections for queries, following the current version across
/// rebuild switches.
#[derive(Clone)]
pub struct Readers {
    inner: Arc<ReadersInner>,
}

struct ReadersInner {
    current: RwLock<(u64, PathBuf)>,
    pool: Mutex<Vec<(u64, Connection)>>,
}

impl std::fmt::Debug for Readers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readers").field("current", &self.current().1).finish()
    }
}

impl Readers {
    pub fn new(store: &SqliteStore) -> Self {
        Self {
            inner: Arc::new(ReadersInner {
                current: RwLock::new((store.version, store.path())),
                pool: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The version queries read, and its file.
    pub fn current(&self) -> (u64, PathBuf) {
        self.inner.current.read().expect("readers lock").clone()
    }

    /// Points new queries at another version (after a rebuild).
    pub fn switch_to(&self, store: &SqliteStore) {
        *self.inner.current.write().expect("readers lock") = (store.version, store.path());
        self.inner.pool.lock().expect("pool lock").clear();
    }

    /// Runs `f` on a read-only connection to the current version. Blocking: call
    /// it from a blocking thread.
    pub fn with<R>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<R>) -> Result<R, StoreError> {
        let (version, path) = self.current();
        let pooled = {
            let mut pool = self.inner.pool.lock().expect("pool lock");
            pool.iter().position(|(v, _)| *v == version).map(|i| pool.swap_remove(i).1)
        };
        let conn = match pooled {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                c.busy_timeout(Duration::from_secs(10))?;
                c
            }
        };
        let result = f(&conn);
        let mut pool = self.inner.pool.lock().expect("pool lock");
        if pool.len() < 16 && self.current().0 == version {
            pool.push((version, conn));
        }
        Ok(result?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_switch_through_current() {
        let dir = tempfile::tempdir().unwrap();
        let mut v1 = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(v1.version(), 1);
        let mut tx = v1.begin().unwrap();
        let p: Positions = [(("t".to_owned(), 0), 5)].into();
        SqliteStore::save_checkpoints(&mut tx, &p).unwrap();
        SqliteStore::commit(tx).unwrap();
        assert_eq!(v1.checkpoints().unwrap(), p);
        let readers = Readers::new(&v1);
        let mut v2 = v1.create_next().unwrap();
        assert!(v2.checkpoints().unwrap().is_empty(), "a new version starts empty");
        v2.make_current().unwrap();
        readers.switch_to(&v2);
        assert_eq!(readers.current().0, 2);
        assert!(!version_file(dir.path(), 1).exists(), "the old version is removed");
        drop((v1, v2));
        assert_eq!(SqliteStore::open(dir.path()).unwrap().version(), 2);
        let n: i64 = readers.with(|c| c.query_row("SELECT count(*) FROM esk_checkpoints", [], |r| r.get(0))).unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn a_rolled_back_event_keeps_the_rest_of_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(dir.path()).unwrap();
        s.execute_batch("CREATE TABLE t (x INTEGER)").unwrap();
        let mut tx = s.begin().unwrap();
        for (x, keep) in [(1, true), (2, false), (3, true)] {
            SqliteStore::event_begin(&mut tx).unwrap();
            tx.execute("INSERT INTO t VALUES (?1)", [x]).unwrap();
            if keep {
                SqliteStore::event_release(&mut tx).unwrap();
            } else {
                SqliteStore::event_rollback(&mut tx).unwrap();
            }
        }
        SqliteStore::commit(tx).unwrap();
        let xs: Vec<i64> = s
            .connection()
            .prepare("SELECT x FROM t ORDER BY x")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(xs, [1, 3]);
    }
}
