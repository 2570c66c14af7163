//! The replica's store: every followed stream in one SQLite file (WAL), with
//! the follower's progress in the same transaction as the records.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde_json::Value;

use crate::{Followed, Progress, Sink};

/// A stream as a replica serves it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StreamState {
    pub stream: String,
    pub version: u64,
    pub state: Option<Value>,
}

#[derive(Debug)]
pub struct SqliteSink {
    conn: Connection,
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(10))
}

impl SqliteSink {
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let conn = Connection::open(path)?;
        configure(&conn)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS streams (
                 stream TEXT PRIMARY KEY, partition INTEGER NOT NULL, version INTEGER NOT NULL,
                 state TEXT, last_offset INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS positions (
                 partition INTEGER PRIMARY KEY, next_offset INTEGER NOT NULL, last_ms INTEGER);
             CREATE TABLE IF NOT EXISTS event_offsets (
                 category TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL,
                 PRIMARY KEY (category, partition));",
        )?;
        Ok(Self { conn })
    }
}

impl Sink for SqliteSink {
    fn load(&mut self) -> Result<Progress> {
        let mut p = Progress::default();
        let mut stmt = self.conn.prepare("SELECT partition, next_offset, last_ms FROM positions")?;
        for row in
            stmt.query_map([], |r| Ok((r.get::<_, i32>(0)?, r.get::<_, i64>(1)?, r.get::<_, Option<i64>>(2)?)))?
        {
            let (part, next, ms) = row?;
            p.positions.insert(part, next);
            if let Some(ms) = ms {
                p.last_ms.insert(part, ms);
            }
        }
        let mut stmt = self.conn.prepare("SELECT category, partition, offset FROM event_offsets")?;
        for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i32>(1)?, r.get::<_, i64>(2)?)))? {
            let (c, part, o) = row?;
            p.events.insert((c, part), o);
        }
        Ok(p)
    }

    fn apply(&mut self, batch: &[Followed], progress: &mut Progress) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut previous = tx.prepare_cached("SELECT version, last_offset FROM streams WHERE stream = ?1")?;
            let mut put = tx.prepare_cached(
                "INSERT INTO streams (stream, partition, version, state, last_offset) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (stream) DO UPDATE SET partition = excluded.partition, version = excluded.version,
                 state = excluded.state, last_offset = excluded.last_offset",
            )?;
            for f in batch {
                // Where the writer is in its inputs, where a stream's older
                // events are: nothing a reader serves.
                if f.is_consumed() || f.is_index_page() {
                    continue;
                }
                let stream = f.key.as_deref().map(String::from_utf8_lossy).unwrap_or_default();
                let prev: Option<(u64, i64)> = previous
                    .query_row([stream.as_ref()], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
                    .optional()?;
                let r = match f.stream_record(prev) {
                    Ok(r) => r,
                    // The stream keeps the last record that fitted.
                    Err(reason) => {
                        crate::refused("state", f, &reason);
                        continue;
                    }
                };
                let state = r.state.as_ref().map(Value::to_string);
                put.execute(params![r.stream, f.partition, r.version as i64, state, r.last_offset])?;
                progress.applied(f.partition, &r);
            }
            let mut pos = tx.prepare_cached(
                "INSERT INTO positions (partition, next_offset, last_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (partition) DO UPDATE SET next_offset = excluded.next_offset, last_ms = excluded.last_ms",
            )?;
            for (part, next) in &progress.positions {
                pos.execute(params![part, next, progress.last_ms.get(part)])?;
            }
            let mut ev = tx.prepare_cached(
                "INSERT INTO event_offsets (category, partition, offset) VALUES (?1, ?2, ?3)
                 ON CONFLICT (category, partition) DO UPDATE SET offset = excluded.offset",
            )?;
            for ((c, part), o) in &progress.events {
                ev.execute(params![c, part, o])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

/// Read-only connections for queries.
#[derive(Debug, Clone)]
pub struct Reader {
    path: PathBuf,
}

impl Reader {
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_owned() }
    }

    /// A stream's state (blocking: call from a blocking thread).
    pub fn stream(&self, stream: &str) -> Result<Option<StreamState>> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        configure(&conn)?;
        let row = conn
            .query_row("SELECT stream, version, state FROM streams WHERE stream = ?1", [stream], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, Option<String>>(2)?))
            })
            .optional()?;
        Ok(row.map(|(stream, version, state)| StreamState {
            stream,
            version: version as u64,
            state: state.and_then(|s| serde_json::from_str(&s).ok()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use esk_wire::protocol::StreamRecord;

    fn followed(partition: i32, offset: i64, stream: &str, version: u64, last_offset: i64) -> Followed {
        let mut record = StreamRecord::new(stream, Some(serde_json::json!({"balance": version})));
        record.version = version;
        record.last_offset = last_offset;
        record.index = vec![esk_wire::protocol::IndexEntry { version: 1, offset: 0 }];
        Followed {
            partition,
            offset,
            partitions: 1,
            timestamp_ms: Some(1000 + offset),
            key: Some(stream.as_bytes().to_vec()),
            value: Some(serde_json::to_vec(&record).unwrap()),
        }
    }

    #[test]
    fn records_and_progress_commit_together_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica.sqlite");
        let mut sink = SqliteSink::open(&path).unwrap();
        assert_eq!(sink.load().unwrap(), Progress::default());
        let batch = vec![
            followed(0, 0, "account-1", 1, 10),
            followed(0, 1, "account-2", 1, 11),
            followed(0, 2, "note-1", 3, 4),
        ];
        let mut progress = Progress::default();
        progress.advance(&batch);
        sink.apply(&batch, &mut progress).unwrap();
        drop(sink);
        let mut again = SqliteSink::open(&path).unwrap();
        let loaded = again.load().unwrap();
        assert_eq!(loaded, progress);
        assert_eq!(loaded.positions[&0], 3);
        assert!(loaded.covers(&"account:0:11".parse().unwrap()));
        assert!(!loaded.covers(&"account:0:12".parse().unwrap()));
        assert!(!loaded.covers(&"account:1:0".parse().unwrap()));
        let s = Reader::new(&path).stream("account-2").unwrap().unwrap();
        assert_eq!((s.version, s.state.unwrap()["balance"].as_u64()), (1, Some(1)));
        assert!(Reader::new(&path).stream("account-9").unwrap().is_none());
    }

    #[test]
    fn records_that_do_not_fit_are_refused_and_the_stream_keeps_its_last_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica.sqlite");
        let mut sink = SqliteSink::open(&path).unwrap();
        let good = followed(0, 0, "account-1", 2, 10);
        let mut garbage = followed(0, 1, "account-1", 0, 0);
        garbage.value = Some(b"{\"balance\": \"x\"".to_vec());
        let older = followed(0, 2, "account-1", 1, 5);
        let mut wrong_key = followed(0, 3, "account-1", 9, 20);
        wrong_key.key = Some(b"account-2".to_vec());
        let mut tombstone = followed(0, 4, "account-1", 9, 20);
        tombstone.value = None;
        let batch = vec![good, garbage, older, wrong_key, tombstone];
        let mut progress = Progress::default();
        progress.advance(&batch);
        sink.apply(&batch, &mut progress).unwrap();
        assert_eq!(progress.positions[&0], 5, "the follower moves past refused records");
        let s = Reader::new(&path).stream("account-1").unwrap().unwrap();
        assert_eq!(s.version, 2);
        assert!(Reader::new(&path).stream("account-2").unwrap().is_none());
    }
}
