//! What the writer remembers of a partition: every stream's record, the
//! answers to requests and the 2PC decisions of the idempotency horizon.
//!
//! All of it is on disk, in the partition's local store (`esk_store`), a copy
//! of `<prefix>.state` and `<prefix>.answers` (the truth); recently used
//! stream records are also cached in memory, at most `--stream-cache` per
//! partition. So memory is bounded whatever the number of streams or
//! requests, and a retry is recognised however many requests came between.
//!
//! Keys in the store: `s␟<stream>` (its record, tagged when it has open
//! holds), `q␟<stream>` (why its record was refused, when it has no good one),
//! `r␟<stream>␟<request id>` and `e␟<stream>␟<first event id>␟<expected
//! version>` (an answer), `d␟<stream>␟<txid>` (a decision), `i␟<stream>␟<first
//! version, 20 digits>` (an index page). Answers and decisions carry their
//! time and expire after the horizon; index pages stay, as on the state topic.

use std::collections::HashMap;

use esk_domain::Registry;
use esk_follower::Followed;
use esk_follower::store::Intake;
use esk_store::{Changes, PartitionStore, StoreError};
use esk_wire::protocol::{
    Answered, ConsumedRecord, Decided, ExpectedVersion, IndexEntry, IndexPage, Memory, StreamRecord,
};
use serde::Deserialize;

use crate::batch::{Lookup, LookupError};

/// Rows of streams with open 2PC holds.
pub const TAG_HOLDS: i64 = 1;

const SEP: char = '\u{1f}';

pub fn stream_key(stream: &str) -> String {
    format!("s{SEP}{stream}")
}

pub use esk_store::consumed_position;

/// The store's key of a stream's index page, ordered by its first version.
pub fn page_key(stream: &str, first_version: u64) -> String {
    format!("i{SEP}{stream}{SEP}{first_version:020}")
}

fn quarantine_key(stream: &str) -> String {
    format!("q{SEP}{stream}")
}

fn answer_key(stream: &str, request_id: &str) -> String {
    format!("r{SEP}{stream}{SEP}{request_id}")
}

fn event_key(stream: &str, event_id: &str, expected: ExpectedVersion) -> String {
    format!("e{SEP}{stream}{SEP}{event_id}{SEP}{expected}")
}

fn decided_key(stream: &str, txid: &str) -> String {
    format!("d{SEP}{stream}{SEP}{txid}")
}

/// Takes records of the state topic into the store, checking each: any
/// producer can write anything to a topic.
#[derive(Debug)]
pub struct StateIntake {
    pub aggregates: Registry,
    /// (version, last offset) of records taken but not in the store yet.
    pending: HashMap<String, (u64, i64)>,
}

impl StateIntake {
    pub fn new(aggregates: Registry) -> Self {
        Self { aggregates, pending: HashMap::new() }
    }
}

/// Version and last offset of a stored record, without reading the rest.
#[derive(Deserialize)]
struct Head {
    version: u64,
    last_offset: i64,
}

impl Intake for StateIntake {
    fn begin(&mut self) {
        self.pending.clear();
    }

    /// A record that does not fit is refused; a stream whose only records
    /// were refused is quarantined: its requests are answered with the reason.
    fn take(&mut self, store: &PartitionStore, f: &Followed, changes: &mut Changes) -> Result<(), StoreError> {
        if f.is_consumed() {
            // Positions only move forward (`Changes::position`).
            match ConsumedRecord::decode(f.value.as_deref()) {
                Ok(r) => r.next.iter().for_each(|(input, next)| changes.position(&consumed_position(input), *next)),
                Err(reason) => esk_follower::refused("state", f, &reason),
            }
            return Ok(());
        }
        if f.is_index_page() {
            match IndexPage::decode(f.key.as_deref().unwrap_or_default(), f.value.as_deref(), f.partition, f.partitions)
            {
                Ok(page) => {
                    let key = page_key(&page.stream, page.first_version());
                    changes.put(key, f.offset, f.value.clone().unwrap_or_default(), 0, 0);
                }
                Err(reason) => esk_follower::refused("state", f, &reason),
            }
            return Ok(());
        }
        let stream = f.key.as_deref().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
        let previous = match self.pending.get(&stream) {
            Some(p) => Some(*p),
            None => match store.get(&stream_key(&stream))? {
                // The store has this stream from a later record already (the
                // owner and the standby write one file): this one is old news.
                Some(row) if row.offset >= f.offset => return Ok(()),
                Some(row) => serde_json::from_slice::<Head>(&row.value).ok().map(|h| (h.version, h.last_offset)),
                None => None,
            },
        };
        let checked = f.stream_record(previous).and_then(|r| {
            let category = r.stream.split_once('-').map_or("", |(c, _)| c);
            match (self.aggregates.get(category), &r.state) {
                (Some(a), Some(state)) => a.check_state(state).map(|()| r),
                (Some(_), None) if r.version > 0 => Err("a stream of an aggregate without its state".into()),
                _ => Ok(r),
            }
        });
        match checked {
            Ok(record) => {
                let time_ms = f.timestamp_ms.unwrap_or(0).max(1);
                for answer in &record.answered {
                    let mut answer = answer.clone();
                    answer.answered_ms = time_ms;
                    put_memory(changes, f.offset, &Memory::Answer { stream: stream.clone(), answer });
                }
                for decided in &record.decided {
                    let mut decided = decided.clone();
                    decided.decided_ms = time_ms;
                    put_memory(changes, f.offset, &Memory::Decision { stream: stream.clone(), decided });
                }
                self.pending.insert(stream.clone(), (record.version, record.last_offset));
                put_record(changes, f.offset, &record);
                changes.deletes.push((quarantine_key(&stream), f.offset + 1));
            }
            // The stream's latest record does not fit: serving it from an
            // older one could number its events wrong, so it is quarantined
            // (answered with the reason) until a good record follows.
            Err(reason) => {
                esk_follower::refused("state", f, &reason);
                if esk_wire::StreamName::parse(&stream).is_ok() {
                    let why = format!(
                        "the state record of {stream} at offset {} of partition {} was refused ({reason}); the \
                         stream is not served until a record the writer can trust follows",
                        f.offset, f.partition
                    );
                    changes.put(quarantine_key(&stream), f.offset, why.into_bytes(), 0, 0);
                }
            }
        }
        Ok(())
    }
}

/// Takes records of the answers topic into the store; forgets what the
/// horizon no longer covers.
#[derive(Debug)]
pub struct AnswersIntake {
    pub horizon_ms: i64,
}

impl Intake for AnswersIntake {
    fn take(&mut self, _store: &PartitionStore, f: &Followed, changes: &mut Changes) -> Result<(), StoreError> {
        let decoded = f
            .value
            .as_deref()
            .ok_or_else(|| "a record with no value".to_owned())
            .and_then(|v| serde_json::from_slice::<Memory>(v).map_err(|e| format!("not an answer: {e}")))
            .and_then(|m| {
                let home = esk_wire::partition::partition_for(m.stream().as_bytes(), f.partitions);
                if f.key.as_deref() != Some(m.stream().as_bytes()) || home != f.partition {
                    return Err(format!("stream '{}' is not the record's key or partition", m.stream()));
                }
                Ok(m)
            });
        match decoded {
            Ok(m) => put_memory(changes, f.offset, &m),
            Err(reason) => esk_follower::refused("answers", f, &reason),
        }
        Ok(())
    }

    fn tidy(&mut self, store: &mut PartitionStore) -> Result<(), StoreError> {
        let before = chrono::Utc::now().timestamp_millis() - esk_wire::limits::kept_ms(self.horizon_ms);
        store.expire(before, 100_000).map(|_| ())
    }
}

/// Puts a stream record (tagged when it has open holds).
pub fn put_record(changes: &mut Changes, offset: i64, record: &StreamRecord) {
    if let Ok(value) = serde_json::to_vec(record) {
        put_record_bytes(changes, offset, record, value);
    }
}

fn put_record_bytes(changes: &mut Changes, offset: i64, record: &StreamRecord, value: Vec<u8>) {
    let tag = if record.holds.is_empty() { 0 } else { TAG_HOLDS };
    changes.put(stream_key(&record.stream), offset, value, 0, tag);
}

/// Puts an answer (under its request id, and its first event id if any) or a decision.
pub fn put_memory(changes: &mut Changes, offset: i64, memory: &Memory) {
    let time_ms = memory.time_ms().max(1);
    match memory {
        Memory::Answer { stream, answer } => {
            let Ok(value) = serde_json::to_vec(answer) else { return };
            if let Some(event_id) = &answer.first_event_id {
                changes.put(event_key(stream, event_id, answer.expected_version), offset, value.clone(), time_ms, 0);
            }
            changes.put(answer_key(stream, &answer.request_id), offset, value, time_ms, 0);
        }
        Memory::Decision { stream, decided } => {
            if let Ok(value) = serde_json::to_vec(decided) {
                changes.put(decided_key(stream, &decided.txid), offset, value, time_ms, 0);
            }
        }
    }
}

/// An open hold, as the partition's worker tracks it to ask for its decision.
#[derive(Debug, Clone)]
struct Hold {
    deadline_ms: i64,
    asked_ms: i64,
}

/// Recently used stream records: least recently used go first.
#[derive(Debug)]
struct Cache {
    map: HashMap<String, (StreamRecord, u64)>,
    clock: u64,
    capacity: usize,
}

impl Cache {
    fn get(&mut self, stream: &str) -> Option<&StreamRecord> {
        self.clock += 1;
        let clock = self.clock;
        self.map.get_mut(stream).map(|(r, used)| {
            *used = clock;
            &*r
        })
    }

    fn put(&mut self, record: StreamRecord) {
        self.clock += 1;
        self.map.insert(record.stream.clone(), (record, self.clock));
        // Evict in steps of an eighth, so that the sort is paid rarely.
        if self.map.len() > self.capacity + self.capacity / 8 {
            let mut used: Vec<u64> = self.map.values().map(|(_, u)| *u).collect();
            let cut = self.map.len() - self.capacity;
            used.select_nth_unstable(cut);
            let below = used[cut];
            self.map.retain(|_, (_, u)| *u >= below);
        }
    }
}

/// The partition's memory while this instance owns it.
#[derive(Debug)]
pub struct PartitionMemory {
    pub partition: i32,
    store: PartitionStore,
    cache: Cache,
    horizon_ms: i64,
    now_ms: i64,
    /// By (txid, stream): one transaction may hold several streams of a partition.
    holds: HashMap<(String, String), Hold>,
}

/// What a committed transaction wrote, with the offsets it got.
#[derive(Debug, Default)]
pub struct Committed {
    /// (record, its JSON, offset in the state topic)
    pub records: Vec<(StreamRecord, Vec<u8>, i64)>,
    /// (memory, offset in the answers topic)
    pub memories: Vec<(Memory, i64)>,
    /// (index page, its JSON, offset in the state topic)
    pub pages: Vec<(IndexPage, Vec<u8>, i64)>,
    /// (topic, next offset) for the state and answers topics.
    pub positions: Vec<(String, i64)>,
}

impl PartitionMemory {
    pub fn new(partition: i32, store: PartitionStore, cache_capacity: usize, horizon_ms: i64) -> Self {
        let cache = Cache { map: HashMap::new(), clock: 0, capacity: cache_capacity.max(1) };
        Self { partition, store, cache, horizon_ms, now_ms: 0, holds: HashMap::new() }
    }

    pub fn store(&mut self) -> &mut PartitionStore {
        &mut self.store
    }

    /// The clock answers and decisions expire by, for the next batch.
    pub fn set_now(&mut self, now_ms: i64) {
        self.now_ms = now_ms;
    }

    pub fn cached(&self) -> usize {
        self.cache.map.len()
    }

    /// Next offset of each input, from the consumed-positions records the
    /// store took (by the owner after its commits, or by the standby).
    pub fn consumed(&self) -> Result<std::collections::BTreeMap<String, i64>, StoreError> {
        Ok(esk_store::consumed_positions(&self.store.positions()?))
    }

    /// Reads the open holds from the store (after a restore).
    pub fn load_holds(&mut self) -> Result<usize, StoreError> {
        self.holds.clear();
        for (_, row) in self.store.tagged(TAG_HOLDS)? {
            if let Ok(record) = serde_json::from_slice::<StreamRecord>(&row.value) {
                self.note_holds(&record);
            }
        }
        Ok(self.holds.len())
    }

    fn note_holds(&mut self, record: &StreamRecord) {
        self.holds.retain(|(txid, stream), _| *stream != record.stream || record.holds.iter().any(|o| o.txid == *txid));
        for o in &record.holds {
            self.holds
                .entry((o.txid.clone(), record.stream.clone()))
                .or_insert(Hold { deadline_ms: o.deadline_ms, asked_ms: 0 });
        }
    }

    /// Makes a committed transaction's records the partition's memory: the
    /// store first, so that a failure leaves nothing in memory ahead of it.
    pub fn absorb(&mut self, committed: Committed) -> Result<(), StoreError> {
        let mut changes = Changes::default();
        for (record, value, offset) in &committed.records {
            put_record_bytes(&mut changes, *offset, record, value.clone());
        }
        for (memory, offset) in &committed.memories {
            put_memory(&mut changes, *offset, memory);
        }
        for (page, value, offset) in committed.pages {
            changes.put(page_key(&page.stream, page.first_version()), offset, value, 0, 0);
        }
        for (topic, next) in &committed.positions {
            changes.position(topic, *next);
        }
        self.store.apply(&changes)?;
        for (record, _, _) in committed.records {
            self.note_holds(&record);
            self.cache.put(record);
        }
        Ok(())
    }

    /// Holds open `grace_ms` past their deadline, not asked about for
    /// `every_ms`: (txid, stream), noted as asked now.
    pub fn overdue(&mut self, now_ms: i64, grace_ms: i64, every_ms: i64) -> Vec<(String, String)> {
        let mut due = Vec::new();
        for ((txid, stream), h) in &mut self.holds {
            if now_ms >= h.deadline_ms.saturating_add(grace_ms) && now_ms.saturating_sub(h.asked_ms) >= every_ms {
                h.asked_ms = now_ms;
                due.push((txid.clone(), stream.clone()));
            }
        }
        due
    }

    pub fn open_holds(&self) -> usize {
        self.holds.len()
    }

    /// Removes answers and decisions older than the horizon and its clock
    /// margin; how many went.
    pub fn expire(&mut self, now_ms: i64) -> Result<usize, StoreError> {
        self.store.expire(now_ms - esk_wire::limits::kept_ms(self.horizon_ms), 10_000)
    }

    fn expired(&self, time_ms: i64) -> bool {
        time_ms != 0 && time_ms < self.now_ms - esk_wire::limits::kept_ms(self.horizon_ms)
    }

    fn remembered<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, LookupError> {
        let store = |e: StoreError| LookupError::Store(e.to_string());
        match self.store.get(key).map_err(store)? {
            Some(row) if !self.expired(row.time_ms) => Ok(serde_json::from_slice(&row.value).ok()),
            _ => Ok(None),
        }
    }
}

impl Lookup for PartitionMemory {
    fn stream(&mut self, stream: &str) -> Result<Option<StreamRecord>, LookupError> {
        if let Some(r) = self.cache.get(stream) {
            return Ok(Some(r.clone()));
        }
        let store = |e: StoreError| LookupError::Store(e.to_string());
        let record = self.store.get(&stream_key(stream)).map_err(store)?;
        // Quarantined by a refused record later than the last good one.
        if let Some(q) = self.store.get(&quarantine_key(stream)).map_err(store)?
            && record.as_ref().is_none_or(|r| q.offset > r.offset)
        {
            return Err(LookupError::Unservable(String::from_utf8_lossy(&q.value).into_owned()));
        }
        let Some(row) = record else { return Ok(None) };
        let record: StreamRecord = serde_json::from_slice(&row.value).map_err(|e| {
            LookupError::Unservable(format!("the writer's stored record of {stream} is unreadable: {e}"))
        })?;
        self.cache.put(record.clone());
        Ok(Some(record))
    }

    fn answer(&mut self, stream: &str, request_id: &str) -> Result<Option<Answered>, LookupError> {
        self.remembered(&answer_key(stream, request_id))
    }

    fn index_pages(&mut self, stream: &str, from: u64, limit: usize) -> Result<Vec<IndexEntry>, LookupError> {
        let store = |e: StoreError| LookupError::Store(e.to_string());
        let prefix = format!("i{SEP}{stream}{SEP}");
        let pages = limit.div_ceil(esk_wire::protocol::INDEX_PAGE_ENTRIES).max(1);
        let mut entries = Vec::new();
        for (key, row) in self.store.from_floor(&prefix, &page_key(stream, from), pages).map_err(store)? {
            let page: IndexPage = serde_json::from_slice(&row.value).map_err(|e| {
                LookupError::Unservable(format!("the writer's stored index page {key:?} is unreadable: {e}"))
            })?;
            entries.extend(page.entries);
        }
        Ok(entries)
    }

    fn answer_by_event(
        &mut self,
        stream: &str,
        event_id: &str,
        expected: ExpectedVersion,
    ) -> Result<Option<Answered>, LookupError> {
        self.remembered(&event_key(stream, event_id, expected))
    }

    fn decided(&mut self, stream: &str, txid: &str) -> Result<Option<Decided>, LookupError> {
        self.remembered(&decided_key(stream, txid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use esk_wire::protocol::{Appended, IndexEntry, OpenHold, Verdict};

    fn record(stream: &str, version: u64, holds: &[&str]) -> StreamRecord {
        let mut r = StreamRecord::new(stream, None);
        r.version = version;
        r.last_offset = version as i64;
        r.index = vec![IndexEntry { version: 1, offset: 1 }];
        r.holds = holds.iter().map(|t| OpenHold { txid: (*t).into(), deadline_ms: 1000 }).collect();
        r
    }

    fn answer(stream: &str, id: &str, at: i64) -> Memory {
        Memory::Answer {
            stream: stream.into(),
            answer: Answered {
                request_id: id.into(),
                first_event_id: Some(format!("e-{id}")),
                expected_version: ExpectedVersion::Any,
                result: Appended { stream: stream.into(), first_version: 1, last_version: 1, position: "n:0:1".into() },
                fingerprint: 7,
                answered_ms: at,
            },
        }
    }

    #[test]
    fn the_memory_answers_from_disk_within_the_horizon_and_evicts_from_its_cache() {
        let dir = tempfile::tempdir().unwrap();
        let store = esk_store::Store::open(dir.path()).unwrap();
        let mut m = PartitionMemory::new(0, store.partition(0).unwrap(), 10, 1_000);
        let mut c = Committed::default();
        for i in 0..100 {
            let r = record(&format!("note-{i}"), 1, &[]);
            let v = serde_json::to_vec(&r).unwrap();
            c.records.push((r, v, i));
            c.memories.push((answer(&format!("note-{i}"), &format!("r{i}"), 10_000), i));
        }
        c.positions.push(("state".into(), 100));
        m.absorb(c).unwrap();
        assert!(m.cached() <= 10 + 10 / 8 + 1, "the cache stays bounded: {}", m.cached());
        m.set_now(10_500);
        assert_eq!(m.stream("note-3").unwrap().unwrap().version, 1, "an evicted stream is read from disk");
        assert_eq!(m.stream("note-x").unwrap(), None);
        assert!(m.answer("note-5", "r5").unwrap().is_some());
        assert!(m.answer_by_event("note-5", "e-r5", ExpectedVersion::Any).unwrap().is_some());
        assert!(m.answer_by_event("note-5", "e-r5", ExpectedVersion::NoStream).unwrap().is_none());
        assert!(m.answer("note-5", "r6").unwrap().is_none());
        m.set_now(11_050);
        assert!(m.answer("note-5", "r5").unwrap().is_some(), "within the clock margin after the horizon");
        m.set_now(11_101);
        assert!(m.answer("note-5", "r5").unwrap().is_none(), "past the horizon and its margin");
        assert_eq!(m.expire(11_101).unwrap(), 200);
    }

    #[test]
    fn open_holds_are_tracked_and_asked_about_after_their_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let store = esk_store::Store::open(dir.path()).unwrap();
        let mut m = PartitionMemory::new(0, store.partition(0).unwrap(), 10, 1_000);
        let r = record("account-1", 2, &["t1", "t2"]);
        let v = serde_json::to_vec(&r).unwrap();
        let decided = Memory::Decision {
            stream: "account-1".into(),
            decided: Decided { txid: "t0".into(), decision: Verdict::Abort, decided_ms: 5 },
        };
        m.absorb(Committed { records: vec![(r, v, 1)], memories: vec![(decided, 1)], ..Committed::default() }).unwrap();
        assert_eq!(m.open_holds(), 2);
        assert!(m.overdue(1500, 1000, 1000).is_empty(), "not yet");
        assert_eq!(m.overdue(2000, 1000, 1000).len(), 2);
        assert!(m.overdue(2500, 1000, 1000).is_empty(), "asked a moment ago");
        // One transaction holding two streams of the partition: both are asked about.
        let other = record("account-2", 1, &["t1"]);
        let v = serde_json::to_vec(&other).unwrap();
        m.absorb(Committed { records: vec![(other, v, 2)], ..Committed::default() }).unwrap();
        assert_eq!(m.open_holds(), 3);
        let asked = m.overdue(10_000, 1000, 1000);
        assert_eq!(asked.iter().filter(|(t, _)| t == "t1").count(), 2, "{asked:?}");
        let mut reloaded = PartitionMemory::new(0, store.partition(0).unwrap(), 10, 1_000);
        assert_eq!(reloaded.load_holds().unwrap(), 3);
        let r = record("account-1", 3, &["t2"]);
        let v = serde_json::to_vec(&r).unwrap();
        reloaded.absorb(Committed { records: vec![(r, v, 3)], ..Committed::default() }).unwrap();
        assert_eq!(reloaded.open_holds(), 2, "account-1 holds t2 only, account-2 still t1");
        reloaded.set_now(10);
        assert_eq!(reloaded.decided("account-1", "t0").unwrap().unwrap().decision, Verdict::Abort);
    }
}

#[cfg(test)]
mod intake_tests {
    use proptest::prelude::*;

    use super::*;

    fn followed(key: Option<Vec<u8>>, value: Option<Vec<u8>>, offset: i64) -> Followed {
        Followed { partition: 0, offset, partitions: 1, timestamp_ms: Some(1), key, value }
    }

    proptest! {
        /// No record of the state or answers topics makes a restore or the
        /// standby panic, whatever its bytes.
        #[test]
        fn arbitrary_state_and_answers_records_never_panic(
            records in prop::collection::vec(
                (proptest::option::of(prop_oneof![Just(b"account-1".to_vec()), prop::collection::vec(any::<u8>(), 0..12)]),
                 proptest::option::of(prop_oneof![
                     prop::collection::vec(any::<u8>(), 0..80),
                     Just(br#"{"stream":"account-1","version":2,"last_offset":3,"index":[{"version":1,"offset":0}],"state":{"open":true,"owner":"a","balance":1}}"#.to_vec()),
                     Just(br#"{"stream":"account-1","version":1,"last_offset":0,"index":[{"version":1,"offset":0}],"state":{"balance":"x"}}"#.to_vec()),
                     Just(br#"{"kind":"answer","stream":"account-1","answer":{"request_id":"r","expected_version":"any","result":{"stream":"account-1","first_version":1,"last_version":1,"position":"a:0:0"}}}"#.to_vec()),
                 ])),
                1..12),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let store = esk_store::Store::open(dir.path()).unwrap();
            let mut p = store.partition(0).unwrap();
            let mut state = StateIntake::new(Registry::builtin());
            let mut answers = AnswersIntake { horizon_ms: 1000 };
            let mut changes = Changes::default();
            for (i, (key, value)) in records.into_iter().enumerate() {
                let f = followed(key, value, i as i64);
                state.take(&p, &f, &mut changes).unwrap();
                answers.take(&p, &f, &mut changes).unwrap();
            }
            p.apply(&changes).unwrap();
        }
    }

    #[test]
    fn a_stream_whose_only_record_is_refused_is_quarantined_until_a_good_one_comes() {
        let dir = tempfile::tempdir().unwrap();
        let store = esk_store::Store::open(dir.path()).unwrap();
        let mut p = store.partition(0).unwrap();
        let mut intake = StateIntake::new(Registry::builtin());
        let bad = br#"{"stream":"account-1","version":1,"last_offset":0,"index":[{"version":1,"offset":0}],"state":{"balance":"x"}}"#;
        let mut c = Changes::default();
        intake.take(&p, &followed(Some(b"account-1".to_vec()), Some(bad.to_vec()), 0), &mut c).unwrap();
        p.apply(&c).unwrap();
        let mut m = PartitionMemory::new(0, store.partition(0).unwrap(), 10, 1000);
        assert!(matches!(m.stream("account-1"), Err(LookupError::Unservable(why)) if why.contains("refused")));
        let good = br#"{"stream":"account-1","version":1,"last_offset":0,"index":[{"version":1,"offset":0}],"state":{"open":true,"owner":"a","balance":0}}"#;
        let mut c = Changes::default();
        intake.begin();
        intake.take(&p, &followed(Some(b"account-1".to_vec()), Some(good.to_vec()), 1), &mut c).unwrap();
        p.apply(&c).unwrap();
        let mut m = PartitionMemory::new(0, store.partition(0).unwrap(), 10, 1000);
        assert_eq!(m.stream("account-1").unwrap().unwrap().version, 1);
        // A good record, then a refused later one: quarantined again, not
        // served from the older record.
        let mut c = Changes::default();
        intake.begin();
        intake.take(&p, &followed(Some(b"account-1".to_vec()), Some(bad.to_vec()), 2), &mut c).unwrap();
        p.apply(&c).unwrap();
        let mut m = PartitionMemory::new(0, store.partition(0).unwrap(), 10, 1000);
        assert!(matches!(m.stream("account-1"), Err(LookupError::Unservable(_))));
    }
}
