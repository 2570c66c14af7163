//! Local stores: what a service must look up by key, on disk, so that its
//! memory stays bounded however much it remembers.
//!
//! A Kafka topic is the truth; a store is a copy of what a service read or
//! wrote there, one SQLite file per partition (WAL, `synchronous=NORMAL`),
//! with the next offset it has of each topic in the same transaction as the
//! rows. A crash leaves a file behind what Kafka holds, never ahead of it or
//! out of step: the owner of a partition reads the topics from the store's
//! positions to their ends before it serves (a restore), and a follower (the
//! hot standby) keeps the files of the partitions it does not own near the
//! ends, so that taking one over reads little.
//!
//! Rows are `key → (offset, value, time, tag)`. A put replaces a row only with
//! a record from a later offset, so an owner and a follower may both write a
//! partition's file in any order and the newest record wins. `time_ms` (0 for
//! none) lets rows expire; `tag` (0 for none) marks rows to list without a scan
//! (open transactions, streams with open holds).
//!
//! # Layout
//! - [`Store`]: a folder of partition files, locked by one process.
//! - [`PartitionStore`]: one partition's file: lookups, positions, batches of
//!   changes, expiry.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OptionalExtension, params};

/// Why a store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("local store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("local store {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error(
        "local store {0} is in use by another process: give each instance its own data directory \
         (--data-dir or ESK_DATA_DIR)"
    )]
    Locked(PathBuf),
}

/// A folder of partition files that one process owns (`LOCK` is held while open).
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    _lock: File,
}

impl Store {
    /// Opens (creating) `dir` and takes its lock, or says who holds it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let io = |e: std::io::Error| StoreError::Io { path: dir.to_owned(), reason: e.to_string() };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = File::options().create(true).truncate(false).write(true).open(dir.join("LOCK")).map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(StoreError::Locked(dir.to_owned())),
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        Ok(Self { dir: dir.to_owned(), _lock: lock })
    }

    /// The store of an instance: `instance`'s when given, else the first of
    /// 0, 1, 2, ... that no other process holds (a restarted instance finds
    /// its own again; a second one on the same machine gets another).
    pub fn open_instance(dir_of: impl Fn(&str) -> PathBuf, instance: Option<&str>) -> Result<Self, StoreError> {
        if let Some(instance) = instance {
            return Self::open(&dir_of(instance));
        }
        let mut last = None;
        for i in 0..64 {
            match Self::open(&dir_of(&i.to_string())) {
                Err(StoreError::Locked(dir)) => last = Some(dir),
                other => return other,
            }
        }
        Err(StoreError::Locked(last.unwrap_or_else(|| dir_of("63"))))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Ties the store to one Kafka cluster: files kept for another (a reset
    /// cluster, another cluster with the same prefix and data directory) are
    /// removed, so that nothing is served from them. Call it before opening
    /// any partition. Returns whether files were removed.
    pub fn bind_cluster(&self, cluster_id: &str) -> Result<bool, StoreError> {
        let io = |e: std::io::Error| StoreError::Io { path: self.dir.clone(), reason: e.to_string() };
        let marker = self.dir.join("CLUSTER");
        let known = match std::fs::read_to_string(&marker) {
            Ok(id) => Some(id.trim().to_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(e)),
        };
        if known.as_deref() == Some(cluster_id) {
            return Ok(false);
        }
        let mut removed = false;
        for entry in std::fs::read_dir(&self.dir).map_err(io)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('p') && name.contains(".sqlite") {
                std::fs::remove_file(entry.path()).map_err(io)?;
                removed = true;
            }
        }
        if removed {
            tracing::warn!(dir = %self.dir.display(), ?known, cluster_id, "the local store was another cluster's; starting it afresh");
        }
        std::fs::write(&marker, cluster_id).map_err(io)?;
        Ok(removed)
    }

    /// A connection to partition `p`'s file. An unreadable file (a power
    /// loss mid-write, a disk error) is removed and started afresh: its
    /// positions go with it, so the owner restores it from Kafka.
    pub fn partition(&self, p: i32) -> Result<PartitionStore, StoreError> {
        let path = self.dir.join(format!("p{p}.sqlite"));
        match PartitionStore::open(&path) {
            Ok(s) => Ok(s),
            Err(StoreError::Sqlite(e))
                if matches!(e.sqlite_error_code(), Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)) =>
            {
                tracing::warn!(path = %path.display(), "local store unreadable ({e}); starting it afresh from Kafka");
                remove_files(&path);
                PartitionStore::open(&path)
            }
            Err(e) => Err(e),
        }
    }

    /// Bytes on disk of every partition file (with their logs).
    pub fn disk_bytes(&self) -> u64 {
        std::fs::read_dir(&self.dir).map_or(0, |d| d.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
    }
}

fn remove_files(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

/// A row as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Offset of the record it came from, in its topic.
    pub offset: i64,
    pub value: Vec<u8>,
    /// When it happened (ms since the epoch), 0 if it never expires.
    pub time_ms: i64,
    pub tag: i64,
}

/// A row to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    pub key: String,
    pub row: Row,
}

/// Changes applied in one local transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Each replaces its key's row if its offset is later (or there is none).
    pub puts: Vec<Put>,
    /// `(key, offset)`: removes the row if it came from an offset before this one.
    pub deletes: Vec<(String, i64)>,
    /// `(topic, next offset)`: a position only ever moves forward.
    pub positions: Vec<(String, i64)>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty() && self.positions.is_empty()
    }

    pub fn put(&mut self, key: String, offset: i64, value: Vec<u8>, time_ms: i64, tag: i64) {
        self.puts.push(Put { key, row: Row { offset, value, time_ms, tag } });
    }

    /// Moves `topic`'s position to at least `next`.
    pub fn position(&mut self, topic: &str, next: i64) {
        match self.positions.iter_mut().find(|(t, _)| t == topic) {
            Some((_, n)) => *n = (*n).max(next),
            None => self.positions.push((topic.to_owned(), next)),
        }
    }
}

/// One partition's file.
#[derive(Debug)]
pub struct PartitionStore {
    conn: Connection,
    path: PathBuf,
}

/// The position (in a store's positions table) of where a single writer's
/// partition is in `input`: the next offset to process, taken from the
/// consumed-positions record its log carries
/// ([`esk_wire::protocol::ConsumedRecord`] under `CONSUMED_KEY`).
pub fn consumed_position(input: &str) -> String {
    format!("c\u{1f}{input}")
}

/// Every input's next offset from a store's positions (see
/// [`consumed_position`]).
pub fn consumed_positions(positions: &BTreeMap<String, i64>) -> BTreeMap<String, i64> {
    let prefix = consumed_position("");
    positions
        .iter()
        .filter_map(|(name, next)| name.strip_prefix(&prefix).map(|input| (input.to_owned(), *next)))
        .collect()
}

/// Page cache per connection: the store's memory is this, whatever it holds.
const CACHE_KIB: i64 = 4096;

impl PartitionStore {
    fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL in WAL mode: a commit survives a process crash; a power loss
        // may lose the last ones, positions with them, which a restore reads again.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
        conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS rows (
                 key TEXT PRIMARY KEY, offset INTEGER NOT NULL, value BLOB NOT NULL,
                 time_ms INTEGER NOT NULL, tag INTEGER NOT NULL) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS rows_tag ON rows (tag) WHERE tag != 0;
             CREATE INDEX IF NOT EXISTS rows_time ON rows (time_ms) WHERE time_ms != 0;
             CREATE TABLE IF NOT EXISTS positions (topic TEXT PRIMARY KEY, next_offset INTEGER NOT NULL);",
        )?;
        Ok(Self { conn, path: path.to_owned() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Result<Option<Row>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT offset, value, time_ms, tag FROM rows WHERE key = ?1")?;
        Ok(stmt
            .query_row([key], |r| Ok(Row { offset: r.get(0)?, value: r.get(1)?, time_ms: r.get(2)?, tag: r.get(3)? }))
            .optional()?)
    }

    /// Up to `limit` rows whose keys start with `prefix`, in key order, from
    /// the last one at or before `from` (or the first, if none is).
    pub fn from_floor(&self, prefix: &str, from: &str, limit: usize) -> Result<Vec<(String, Row)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT key, offset, value, time_ms, tag FROM rows
             WHERE key >= coalesce((SELECT max(key) FROM rows WHERE key >= ?1 AND key <= ?2), ?1)
               AND substr(key, 1, length(?1)) = ?1
             ORDER BY key LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![prefix, from, limit as i64], |r| {
            Ok((r.get(0)?, Row { offset: r.get(1)?, value: r.get(2)?, time_ms: r.get(3)?, tag: r.get(4)? }))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The next offset of `topic` this file has (0: none read yet).
    pub fn position(&self, topic: &str) -> Result<i64, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT next_offset FROM positions WHERE topic = ?1")?;
        Ok(stmt.query_row([topic], |r| r.get(0)).optional()?.unwrap_or(0))
    }

    pub fn positions(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT topic, next_offset FROM positions")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Applies `changes` in one transaction.
    pub fn apply(&mut self, changes: &Changes) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        {
            let mut put = tx.prepare_cached(
                "INSERT INTO rows (key, offset, value, time_ms, tag) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (key) DO UPDATE SET offset = excluded.offset, value = excluded.value,
                     time_ms = excluded.time_ms, tag = excluded.tag
                 WHERE excluded.offset > rows.offset",
            )?;
            for p in &changes.puts {
                put.execute(params![p.key, p.row.offset, p.row.value, p.row.time_ms, p.row.tag])?;
            }
            let mut delete = tx.prepare_cached("DELETE FROM rows WHERE key = ?1 AND offset < ?2")?;
            for (key, offset) in &changes.deletes {
                delete.execute(params![key, offset])?;
            }
            let mut position = tx.prepare_cached(
                "INSERT INTO positions (topic, next_offset) VALUES (?1, ?2)
                 ON CONFLICT (topic) DO UPDATE SET next_offset = max(next_offset, excluded.next_offset)",
            )?;
            for (topic, next) in &changes.positions {
                position.execute(params![topic, next])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every row with this tag.
    pub fn tagged(&self, tag: i64) -> Result<Vec<(String, Row)>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT key, offset, value, time_ms, tag FROM rows WHERE tag = ?1")?;
        let rows = stmt.query_map([tag], |r| {
            Ok((r.get(0)?, Row { offset: r.get(1)?, value: r.get(2)?, time_ms: r.get(3)?, tag: r.get(4)? }))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Up to `limit` rows whose time is set and before `before_ms`, oldest first.
    pub fn older_than(&self, before_ms: i64, limit: usize) -> Result<Vec<(String, Row)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT key, offset, value, time_ms, tag FROM rows
             WHERE time_ms != 0 AND time_ms < ?1 ORDER BY time_ms LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![before_ms, limit as i64], |r| {
            Ok((r.get(0)?, Row { offset: r.get(1)?, value: r.get(2)?, time_ms: r.get(3)?, tag: r.get(4)? }))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Removes up to `limit` rows whose time is set and before `before_ms`;
    /// returns how many went.
    pub fn expire(&mut self, before_ms: i64, limit: usize) -> Result<usize, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "DELETE FROM rows WHERE key IN
                 (SELECT key FROM rows WHERE time_ms != 0 AND time_ms < ?1 ORDER BY time_ms LIMIT ?2)",
        )?;
        Ok(stmt.execute(params![before_ms, limit as i64])?)
    }

    /// Forgets everything, positions included (the topic was recreated).
    pub fn clear(&mut self) -> Result<(), StoreError> {
        self.conn.execute_batch("DELETE FROM rows; DELETE FROM positions;")?;
        Ok(())
    }

    /// Rows held.
    pub fn count(&self) -> Result<u64, StoreError> {
        Ok(self.conn.query_row("SELECT count(*) FROM rows", [], |r| r.get::<_, i64>(0))? as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_floor_starts_at_the_last_key_at_or_before() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap().partition(0).unwrap();
        let mut c = Changes::default();
        for k in ["a/01", "a/05", "a/09", "b/02", "a"] {
            c.put(k.into(), 1, k.as_bytes().to_vec(), 0, 0);
        }
        s.apply(&c).unwrap();
        let keys = |from: &str, limit| -> Vec<String> {
            s.from_floor("a/", from, limit).unwrap().into_iter().map(|(k, _)| k).collect()
        };
        assert_eq!(keys("a/06", 10), ["a/05", "a/09"]);
        assert_eq!(keys("a/05", 1), ["a/05"]);
        assert_eq!(keys("a/00", 10), ["a/01", "a/05", "a/09"], "before the first: from the first");
        assert_eq!(keys("a/99", 10), ["a/09"]);
        assert!(s.from_floor("c/", "c/5", 10).unwrap().is_empty());
    }

    fn row(offset: i64, value: &str) -> Row {
        Row { offset, value: value.as_bytes().to_vec(), time_ms: 0, tag: 0 }
    }

    #[test]
    fn a_put_replaces_only_with_a_later_offset() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut p = store.partition(0).unwrap();
        let mut c = Changes::default();
        c.put("s:a".into(), 5, b"five".to_vec(), 0, 0);
        c.position("state", 6);
        p.apply(&c).unwrap();
        let mut older = Changes::default();
        older.put("s:a".into(), 3, b"three".to_vec(), 0, 0);
        older.position("state", 4);
        p.apply(&older).unwrap();
        assert_eq!(p.get("s:a").unwrap(), Some(row(5, "five")));
        assert_eq!(p.position("state").unwrap(), 6, "positions only move forward");
        let mut newer = Changes::default();
        newer.put("s:a".into(), 9, b"nine".to_vec(), 0, 0);
        newer.deletes.push(("s:b".into(), 10));
        p.apply(&newer).unwrap();
        assert_eq!(p.get("s:a").unwrap(), Some(row(9, "nine")));
        assert_eq!(p.position("other").unwrap(), 0);
        let mut delete = Changes::default();
        delete.deletes.push(("s:a".into(), 9));
        p.apply(&delete).unwrap();
        assert!(p.get("s:a").unwrap().is_some(), "a tombstone removes only rows from before it");
        delete.deletes[0].1 = 10;
        p.apply(&delete).unwrap();
        assert_eq!(p.get("s:a").unwrap(), None);
    }

    #[test]
    fn rows_expire_by_time_and_list_by_tag() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut p = store.partition(3).unwrap();
        let mut c = Changes::default();
        for i in 0..10 {
            c.put(format!("r:{i}"), i, vec![], 1000 + i, 0);
        }
        c.put("s:x".into(), 1, vec![], 0, 1);
        p.apply(&c).unwrap();
        assert_eq!(p.tagged(1).unwrap().len(), 1);
        assert_eq!(p.older_than(1005, 100).unwrap().len(), 5);
        assert_eq!(p.expire(1005, 3).unwrap(), 3);
        assert_eq!(p.expire(1005, 100).unwrap(), 2);
        assert_eq!(p.count().unwrap(), 6, "rows without a time never expire");
        p.clear().unwrap();
        assert_eq!(p.count().unwrap(), 0);
    }

    #[test]
    fn one_process_holds_a_store_and_a_broken_file_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(matches!(Store::open(dir.path()), Err(StoreError::Locked(_))));
        std::fs::write(dir.path().join("p1.sqlite"), b"this is not a database file, not at all").unwrap();
        let mut p = store.partition(1).unwrap();
        let mut c = Changes::default();
        c.position("t", 1);
        p.apply(&c).unwrap();
        assert_eq!(p.position("t").unwrap(), 1);
        drop((p, store));
        let again = Store::open(dir.path()).expect("the lock goes with the store");
        assert!(again.bind_cluster("c1").unwrap(), "files of no known cluster go");
        assert!(!dir.path().join("p1.sqlite").exists());
        again.partition(2).unwrap();
        assert!(!again.bind_cluster("c1").unwrap(), "same cluster");
        assert!(again.bind_cluster("c2").unwrap(), "another cluster's files go");
        assert!(!dir.path().join("p2.sqlite").exists());
        drop(again);
        let of = |i: &str| dir.path().join(format!("w-{i}"));
        let first = Store::open_instance(of, None).unwrap();
        let second = Store::open_instance(of, None).unwrap();
        assert_eq!((first.dir(), second.dir()), (of("0").as_path(), of("1").as_path()));
        drop(first);
        assert_eq!(Store::open_instance(of, None).unwrap().dir(), of("0"), "a restart finds its own again");
    }
}
