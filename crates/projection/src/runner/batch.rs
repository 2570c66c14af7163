//! A batch applied in one store transaction with its checkpoints, and what
//! is parked instead of applied.

use std::collections::HashMap;

use esk_follower::engine::backoff::Backoff;
use esk_kafka::record::headers_of;
use esk_wire::{Event, SchemaRegistry};
use rdkafka::Message;
use rdkafka::message::{BorrowedMessage, Headers};

use crate::{ApplyError, Parked, Positions, Projection, Store, StoreError};

/// A consumed record, owned.
#[derive(Debug, Clone)]
pub(super) struct Rec {
    pub(super) topic: String,
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) key: Option<Vec<u8>>,
    pub(super) value: Option<Vec<u8>>,
    pub(super) headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Rec {
    pub(super) fn of(m: &impl Message) -> Self {
        Rec {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers: headers_of(m),
        }
    }

    fn parked(&self, reason: String) -> Parked {
        Parked {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
            reason,
            key: self.key.clone(),
            value: self.value.clone(),
            headers: self.headers.clone(),
        }
    }
}

/// Decodes, upcasts and validates a record; `Err` is the reason to park it.
pub(super) fn decode(rec: &Rec, schemas: &SchemaRegistry) -> Result<Event, String> {
    decode_parts(rec.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())), rec.value.as_deref(), schemas)
}

fn decode_parts<'a>(
    headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    value: Option<&[u8]>,
    schemas: &SchemaRegistry,
) -> Result<Event, String> {
    let mut event = Event::decode(headers, value).map_err(|e| format!("undecodable: {e}"))?;
    let (data, schema) = schemas.upcast(event.data_schema.as_deref(), std::mem::take(&mut event.data))?;
    event.data = data;
    event.data_schema = schema;
    schemas
        .validate(event.stream.category(), &event.event_type, &event.data)
        .map_err(|e| format!("fails its schema: {e}"))?;
    Ok(event)
}

/// A record a batch applies: one just polled (borrowed from the consumer,
/// copied only when parked) or one read back for a replay.
pub(super) trait Record {
    fn at(&self) -> (&str, i32, i64);
    fn decode(&self, schemas: &SchemaRegistry) -> Result<Event, String>;
    fn parked(&self, reason: String) -> Parked;
}

impl Record for Rec {
    fn at(&self) -> (&str, i32, i64) {
        (&self.topic, self.partition, self.offset)
    }

    fn decode(&self, schemas: &SchemaRegistry) -> Result<Event, String> {
        decode(self, schemas)
    }

    fn parked(&self, reason: String) -> Parked {
        Rec::parked(self, reason)
    }
}

impl Record for BorrowedMessage<'_> {
    fn at(&self) -> (&str, i32, i64) {
        (self.topic(), self.partition(), self.offset())
    }

    fn decode(&self, schemas: &SchemaRegistry) -> Result<Event, String> {
        let headers = self.headers().into_iter().flat_map(|h| h.iter().map(|x| (x.key, x.value)));
        decode_parts(headers, self.payload(), schemas)
    }

    fn parked(&self, reason: String) -> Parked {
        Rec::of(self).parked(reason)
    }
}

/// Why a batch did not apply.
#[derive(Debug)]
pub(super) enum BatchError {
    /// The store (or the dead-letter topic) failed: retry the batch.
    Store(StoreError),
    /// The projection failed transiently on this event: retry, and park it
    /// once it has failed [`POISON_AFTER`] times in a row.
    Event { at: (String, i32, i64), reason: String },
}

impl From<StoreError> for BatchError {
    fn from(e: StoreError) -> Self {
        BatchError::Store(e)
    }
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchError::Store(e) => write!(f, "{e}"),
            BatchError::Event { at: (t, p, o), reason } => write!(f, "{t}/{p}@{o}: {reason}"),
        }
    }
}

/// An event whose apply fails transiently this many times in a row is parked:
/// no event holds a projection back for ever.
pub const POISON_AFTER: u32 = 10;

/// What each record of a batch decoded to: its event, or why it is parked.
pub(super) type Decoded = Vec<Result<Event, String>>;

/// Each record of a batch decoded, upcast and validated: its event, or why
/// it is to be parked (once per batch: the careful pass reuses it).
pub(super) fn decode_all<R: Record>(batch: &[R], schemas: &SchemaRegistry) -> Decoded {
    batch.iter().map(|r| r.decode(schemas)).collect()
}

/// A batch's records and what each decoded to.
struct Batch<'a, R> {
    records: &'a [R],
    decoded: &'a [Result<Event, String>],
}

/// Applies a batch in one transaction: the events, the parked ones, the new
/// checkpoints. Events in `poison` are parked without being applied (they
/// failed too often). `before_commit` sees the parked events first (they go
/// to the dead-letter topic). Returns (applied, parked).
///
/// The first pass applies the events without a savepoint each (one SQL
/// statement saved per event, and the reason a catch-up applies several
/// hundred thousand events a second). An event the projection refuses may
/// have made part of its changes already, so the first refusal rolls the
/// whole transaction back and the batch is applied again with each event in
/// a savepoint of its own, which undoes exactly the refused event's changes
/// (`esk_projection_batches_redone_total`).
///
/// `decoded` is [`decode_all`] of the batch. A record below the partition's
/// checkpoint was applied (or parked) already: polled again after a
/// rebalance's seek, it is passed over (`esk_projection_skipped_total`).
pub(super) fn apply_batch<S: Store, P: Projection<S>, R: Record>(
    projection: &P,
    store: &mut S,
    batch: &[R],
    decoded: &[Result<Event, String>],
    positions: &mut Positions,
    poison: &HashMap<(String, i32, i64), String>,
    before_commit: &mut dyn FnMut(&[Parked]) -> Result<(), StoreError>,
) -> Result<(u64, Vec<Parked>), BatchError> {
    let batch = Batch { records: batch, decoded };
    if let Some(done) = apply_pass(projection, store, &batch, positions, poison, before_commit, false)? {
        return Ok(done);
    }
    metrics::counter!("esk_projection_batches_redone_total", "projection" => projection.name().to_owned()).increment(1);
    apply_pass(projection, store, &batch, positions, poison, before_commit, true)?
        .ok_or_else(|| BatchError::Store(StoreError::Other("a batch with savepoints gave up".into())))
}

/// One pass of [`apply_batch`]: `None` when an event was refused in a pass
/// without savepoints (nothing was committed; the batch needs the careful
/// pass).
fn apply_pass<S: Store, P: Projection<S>, R: Record>(
    projection: &P,
    store: &mut S,
    batch: &Batch<'_, R>,
    positions: &mut Positions,
    poison: &HashMap<(String, i32, i64), String>,
    before_commit: &mut dyn FnMut(&[Parked]) -> Result<(), StoreError>,
    careful: bool,
) -> Result<Option<(u64, Vec<Parked>)>, BatchError> {
    let mut tx = store.begin()?;
    let mut parked = Vec::new();
    let mut applied = 0;
    let mut skipped = 0u64;
    // The next offset of each partition in the batch (a handful).
    let mut reached: Vec<(&str, i32, i64)> = Vec::new();
    for (rec, decoded) in batch.records.iter().zip(batch.decoded) {
        let (topic, partition, offset) = rec.at();
        let next = match reached.iter_mut().find(|(t, p, _)| *p == partition && *t == topic) {
            Some(r) => &mut r.2,
            None => {
                let checkpoint = positions.get(&(topic.to_owned(), partition)).copied().unwrap_or(i64::MIN);
                reached.push((topic, partition, checkpoint));
                &mut reached.last_mut().expect("just pushed").2
            }
        };
        if offset < *next {
            skipped += 1;
            continue;
        }
        *next = offset + 1;
        if let Some(reason) = poisoned(poison, rec) {
            parked.push(rec.parked(format!("failed {POISON_AFTER} times in a row: {reason}")));
            continue;
        }
        let event = match decoded {
            Ok(e) => e,
            Err(reason) => {
                parked.push(rec.parked(reason.clone()));
                continue;
            }
        };
        if careful {
            S::event_begin(&mut tx)?;
        }
        match projection.apply(&mut tx, event) {
            Ok(()) => {
                if careful {
                    S::event_release(&mut tx)?;
                }
                applied += 1;
            }
            Err(ApplyError::Permanent(_)) if !careful => return Ok(None),
            Err(ApplyError::Permanent(reason)) => {
                S::event_rollback(&mut tx)?;
                parked.push(rec.parked(format!("the projection refused it: {reason}")));
            }
            Err(ApplyError::Transient(reason)) => {
                return Err(BatchError::Event { at: (topic.to_owned(), partition, offset), reason });
            }
        }
    }
    if skipped > 0 {
        metrics::counter!("esk_projection_skipped_total", "projection" => projection.name().to_owned())
            .increment(skipped);
    }
    let mut next = positions.clone();
    for (topic, partition, offset) in reached {
        next.insert((topic.to_owned(), partition), offset);
    }
    for p in &parked {
        S::record_parked(&mut tx, p)?;
    }
    S::save_checkpoints(&mut tx, &next)?;
    before_commit(&parked)?;
    S::commit(tx)?;
    *positions = next;
    Ok(Some((applied, parked)))
}

/// Why `rec` is to be parked unapplied, if it failed too often.
fn poisoned<'a>(poison: &'a HashMap<(String, i32, i64), String>, rec: &impl Record) -> Option<&'a String> {
    if poison.is_empty() {
        return None;
    }
    let (topic, partition, offset) = rec.at();
    poison.get(&(topic.to_owned(), partition, offset))
}

/// What keeps failing in a batch being retried, and the backoff.
#[derive(Debug, Default)]
pub(super) struct Failing {
    counts: HashMap<(String, i32, i64), u32>,
    /// Events that failed [`POISON_AFTER`] times: parked on the next try.
    pub(super) poison: HashMap<(String, i32, i64), String>,
    backoff: Backoff,
}

impl Failing {
    /// Notes a failed try and waits before the next.
    pub(super) fn failed(&mut self, e: BatchError) {
        if let BatchError::Event { at, reason } = e {
            let n = self.counts.entry(at.clone()).or_default();
            *n += 1;
            if *n >= POISON_AFTER {
                self.poison.insert(at, reason);
                // Park it now, without waiting.
                return;
            }
        }
        self.backoff.wait();
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::sqlite::SqliteStore;

    /// Inserts a row per event, then refuses a deposit of 13 (after its
    /// insert, so a refusal leaves a change behind that must be undone).
    struct RefusesThirteen;

    impl Projection<SqliteStore> for RefusesThirteen {
        fn name(&self) -> &str {
            "thirteen"
        }
        fn categories(&self) -> Vec<String> {
            vec!["account".into()]
        }
        fn migrate(&self, store: &mut SqliteStore) -> Result<(), StoreError> {
            store.execute_batch("CREATE TABLE seen (version INTEGER)")
        }
        fn apply(&self, tx: &mut rusqlite::Transaction<'_>, e: &Event) -> Result<(), ApplyError> {
            tx.prepare_cached("INSERT INTO seen (version) VALUES (?1)")?.execute([e.version as i64])?;
            if e.data["amount"] == 13 {
                return Err(ApplyError::Permanent("13 is refused".into()));
            }
            Ok(())
        }
    }

    fn deposit(offset: i64, amount: i64) -> Rec {
        let h = |k: &str, v: String| (k.to_owned(), Some(v.into_bytes()));
        Rec {
            topic: "t.events.account".into(),
            partition: 0,
            offset,
            key: Some(b"account-1".to_vec()),
            value: Some(format!(r#"{{"amount": {amount}}}"#).into_bytes()),
            headers: vec![
                h("ce_specversion", "1.0".into()),
                h("ce_id", format!("e{offset}")),
                h("ce_source", "test".into()),
                h("ce_type", "Deposited".into()),
                h("ce_time", "2026-12-02T10:00:00Z".into()),
                h("ce_subject", "account-1".into()),
                h("ce_streamversion", (offset + 1).to_string()),
                h("ce_dataschema", "urn:esk:schema:account:Deposited:v1".into()),
                h("content-type", "application/json".into()),
            ],
        }
    }

    /// The versions `RefusesThirteen` inserted, in the order it inserted them.
    fn seen(store: &SqliteStore) -> Vec<i64> {
        let mut stmt = store.connection().prepare("SELECT version FROM seen ORDER BY rowid").unwrap();
        stmt.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
    }

    /// The first pass has no savepoints: a refusal must roll the batch back
    /// and redo it with savepoints, so that the refused event's own changes
    /// are undone and every other event is applied exactly once.
    #[test]
    fn a_refused_event_is_undone_and_parked_and_the_rest_applied_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        RefusesThirteen.migrate(&mut store).unwrap();
        let batch: Vec<Rec> = [5, 13, 7, 13, 9].iter().enumerate().map(|(o, a)| deposit(o as i64, *a)).collect();
        let mut positions = Positions::new();
        let mut dead = Vec::new();
        let (applied, parked) = apply_batch(
            &RefusesThirteen,
            &mut store,
            &batch,
            &decode_all(&batch, &SchemaRegistry::builtin()),
            &mut positions,
            &HashMap::new(),
            &mut |p: &[Parked]| {
                dead.extend(p.iter().map(|p| p.offset));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(applied, 3);
        assert_eq!(parked.iter().map(|p| p.offset).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(dead, [1, 3], "the dead-letter sender saw the parked events once");
        let seen = seen(&store);
        assert_eq!(seen, [1, 3, 5], "the refused events' inserts are undone, the others applied once");
        assert_eq!(positions, [(("t.events.account".to_owned(), 0), 5)].into());
        assert_eq!(store.checkpoints().unwrap(), positions);
    }

    /// A long batch over two partitions: in order, the refused and the
    /// undecodable parked, the rest applied once, each partition's
    /// checkpoint after its last record.
    #[test]
    fn a_long_batch_applies_in_order_and_parks_exactly_the_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        RefusesThirteen.migrate(&mut store).unwrap();
        let n = 320;
        let batch: Vec<Rec> = (0..n)
            .map(|o| {
                let mut r = deposit(o, if o % 50 == 7 { 13 } else { 1 });
                r.partition = (o % 2) as i32;
                if o % 100 == 42 {
                    r.value = Some(b"{not json".to_vec());
                }
                r
            })
            .collect();
        let mut positions = Positions::new();
        let (applied, parked) = apply_batch(
            &RefusesThirteen,
            &mut store,
            &batch,
            &decode_all(&batch, &SchemaRegistry::builtin()),
            &mut positions,
            &HashMap::new(),
            &mut |_: &[Parked]| Ok(()),
        )
        .unwrap();
        let bad: Vec<i64> = (0..n).filter(|o| o % 50 == 7 || o % 100 == 42).collect();
        assert_eq!(parked.iter().map(|p| p.offset).collect::<Vec<_>>(), bad);
        assert_eq!(applied, (n as usize - bad.len()) as u64);
        let seen = seen(&store);
        let good: Vec<i64> = (0..n).filter(|o| !bad.contains(o)).map(|o| o + 1).collect();
        assert_eq!(seen, good, "applied once each, in the batch's order");
        let want: Positions =
            [(("t.events.account".to_owned(), 0), n - 1), (("t.events.account".to_owned(), 1), n)].into();
        assert_eq!(positions, want);
        assert_eq!(store.checkpoints().unwrap(), positions);
    }

    /// Records polled again below the checkpoint (a rebalance seeks back to
    /// the store's checkpoints while a batch is polled or held) are passed
    /// over, within a batch and across batches: each event applied once.
    #[test]
    fn records_polled_again_below_the_checkpoint_are_applied_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        RefusesThirteen.migrate(&mut store).unwrap();
        let mut positions = Positions::new();
        let apply = |store: &mut SqliteStore, offsets: &[i64], positions: &mut Positions| {
            let batch: Vec<Rec> = offsets.iter().map(|o| deposit(*o, 1)).collect();
            let decoded = decode_all(&batch, &SchemaRegistry::builtin());
            apply_batch(&RefusesThirteen, store, &batch, &decoded, positions, &HashMap::new(), &mut |_: &[Parked]| {
                Ok(())
            })
            .unwrap()
            .0
        };
        assert_eq!(apply(&mut store, &[0, 1, 2, 3, 4, 1, 2, 3, 4, 5], &mut positions), 6);
        assert_eq!(apply(&mut store, &[3, 4, 5, 6, 7], &mut positions), 2);
        assert_eq!(apply(&mut store, &[2, 3], &mut positions), 0);
        assert_eq!(seen(&store), [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(positions, [(("t.events.account".to_owned(), 0), 8)].into());
        assert_eq!(store.checkpoints().unwrap(), positions);
    }

    proptest! {
        /// No record of an events topic makes a projection's decoding panic.
        #[test]
        fn arbitrary_event_records_never_panic(
            headers in prop::collection::vec(
                (prop_oneof![
                    Just("ce_specversion".to_owned()), Just("ce_id".to_owned()), Just("ce_time".to_owned()),
                    Just("ce_subject".to_owned()), Just("ce_streamversion".to_owned()), Just("ce_type".to_owned()),
                    Just("ce_source".to_owned()), Just("ce_dataschema".to_owned()), Just("content-type".to_owned()),
                    "\\PC{0,12}",
                ], proptest::option::of(prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..24),
                    prop_oneof![Just("1.0"), Just("account-1"), Just("Deposited"), Just("2026-11-26T10:00:00Z"),
                                Just("3"), Just("urn:esk:schema:account:Deposited:v1"), Just("application/json")]
                        .prop_map(|s| s.as_bytes().to_vec()),
                ])),
                0..12),
            value in proptest::option::of(prop_oneof![
                prop::collection::vec(any::<u8>(), 0..64),
                Just(br#"{"amount": 5}"#.to_vec()),
                Just(br#"{"amount": "x"}"#.to_vec()),
            ]),
        ) {
            let rec = Rec { topic: "t.events.account".into(), partition: 0, offset: 1, key: None, value, headers };
            let _ = decode(&rec, &SchemaRegistry::builtin());
        }
    }
}
