//! Transactions of an owned partition: their failures, their commit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, Producer};

/// Why a transaction did not commit.
#[derive(Debug)]
pub enum TxnError {
    /// Abort, rewind to the committed offsets, go on.
    Abortable(anyhow::Error),
    /// The client or the broker refused a record of the batch for what it is
    /// (too large, invalid): the same batch would fail again. Abort, then take
    /// the batch's inputs one at a time to find the one that makes such a
    /// record, and refuse or park it.
    Rejected(anyhow::Error),
    /// The producer is fenced or broken, or a commit's outcome is unknown:
    /// acquire the partition anew (fence, restore from what did commit).
    Fatal(anyhow::Error),
}

impl std::fmt::Display for TxnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TxnError::Abortable(e) => write!(f, "{e:#}"),
            TxnError::Rejected(e) => write!(f, "a record was refused: {e:#}"),
            TxnError::Fatal(e) => write!(f, "fatal: {e:#}"),
        }
    }
}

use esk_kafka::refuses_the_record;

/// Fenced or fatal errors end the producer; a refused record is `Rejected`;
/// the rest abort the transaction.
pub fn classify(e: KafkaError) -> TxnError {
    if refuses_the_record(&e) {
        return TxnError::Rejected(anyhow!(e));
    }
    let fenced = matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::InvalidProducerIdMapping
        )
    );
    let fatal = match &e {
        KafkaError::Transaction(rde) => rde.is_fatal(),
        _ => false,
    };
    if fenced || fatal { TxnError::Fatal(anyhow!(e)) } else { TxnError::Abortable(anyhow!(e)) }
}

/// Runs a transactional call, again while it fails with a retriable error.
/// An error that requires an abort means the transaction did not commit; an
/// outcome still unknown after the retries is fatal, so that the partition is
/// acquired afresh and its state restored from what did commit. Never abort
/// after a commit whose outcome is unknown: the rewind could skip a batch that
/// was committed.
///
/// A handler told to stop (a revoke: the rebalance waits for it) tries no more:
/// the next owner's fencing settles the transaction either way.
///
/// `call` ends with `Err` only when it cannot tell (see [`watched`]): that
/// gives up at once.
pub fn retrying(
    what: &str,
    stop: &AtomicBool,
    mut call: impl FnMut() -> Result<Result<(), KafkaError>, TxnError>,
) -> Result<(), TxnError> {
    for attempt in 1..=3 {
        if attempt > 1 && stop.load(Ordering::SeqCst) {
            return Err(TxnError::Fatal(anyhow!("{what}: outcome unknown, and the partition is being given up")));
        }
        match call()? {
            Ok(()) => return Ok(()),
            Err(KafkaError::Transaction(e)) if e.is_fatal() => return Err(TxnError::Fatal(anyhow!("{what}: {e}"))),
            Err(KafkaError::Transaction(e)) if e.txn_requires_abort() => {
                return Err(TxnError::Abortable(anyhow!("{what}: {e}")));
            }
            Err(e) => tracing::warn!(attempt, "{what} failed, retrying: {e}"),
        }
    }
    Err(TxnError::Fatal(anyhow!("{what}: outcome unknown after 3 attempts")))
}

/// Waits for every delivery; their offsets in order. Await deliveries before
/// `commit_transaction`: rdkafka's commit flushes first, and its flush polls in
/// 100 ms steps while anything is in flight.
pub fn await_deliveries(deliveries: Vec<DeliveryFuture>) -> Result<Vec<i64>, TxnError> {
    let mut offsets = Vec::with_capacity(deliveries.len());
    for d in futures::executor::block_on(futures::future::join_all(deliveries)) {
        match d {
            Ok(Ok(delivery)) => offsets.push(delivery.offset),
            Ok(Err((err, _))) => return Err(classify(err)),
            Err(_) => return Err(TxnError::Abortable(anyhow!("a delivery was cancelled"))),
        }
    }
    Ok(offsets)
}

/// Commits the transaction. The writer and the coordinator keep where they
/// are in their inputs with their own records (a consumed-positions record
/// on their log), not in the consumer group (ADR 11).
pub fn commit_only(producer: &FutureProducer, timeout: Duration, stop: &AtomicBool) -> Result<(), TxnError> {
    retrying("commit_transaction", stop, || {
        let producer = producer.clone();
        watched("commit_transaction", timeout, move || {
            settle(&producer);
            producer.commit_transaction(timeout)
        })
    })
}

/// How long [`settle`] waits at most.
const SETTLE: Duration = Duration::from_millis(5);

/// Waits (briefly) until the producer counts nothing in flight. rdkafka's
/// `commit_transaction` flushes first, and its flush, finding anything still
/// counted, polls for up to 100 ms before it looks again; right after the
/// last delivery future resolves, its report is often still being served on
/// the producer's polling thread and counted. Without this, a transaction
/// whose commit followed its deliveries at once paid 100 ms about one time in
/// a hundred at 1 in flight and most of the time at 64 (ADR 11).
fn settle(producer: &FutureProducer) {
    let deadline = Instant::now() + SETTLE;
    while producer.in_flight_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(20));
    }
}

/// How long past its own timeout a transactional call may take before it is
/// taken for stuck.
const STUCK_AFTER: Duration = Duration::from_secs(5);

/// Runs a transactional call that takes `timeout` on a helper thread, and
/// gives the producer up (fatal) if the call has not returned soon after:
/// librdkafka can block in `send_offsets_to_transaction` for good once the
/// group coordinator died (librdkafka issues 5456 and 5511, seen here when a
/// broker was killed). The partition is then fenced and acquired afresh; the
/// stuck call ends with the old producer whenever librdkafka lets go, and the
/// fencing makes whatever it does harmless.
pub fn watched<T: Send + 'static>(
    what: &str,
    timeout: Duration,
    call: impl FnOnce() -> T + Send + 'static,
) -> Result<T, TxnError> {
    within(what, timeout + STUCK_AFTER, call)
}

/// A job for a handler thread's caller thread.
type Job = Box<dyn FnOnce() + Send>;

thread_local! {
    /// The calling thread's caller: one long-lived thread runs its calls in
    /// turn (two transactional calls a transaction: spawning a thread for
    /// each cost more than the calls). Dropped with the calling thread, or
    /// when a call is stuck (a new one is made for the next call).
    static CALLER: std::cell::RefCell<Option<std::sync::mpsc::Sender<Job>>> = const { std::cell::RefCell::new(None) };
}

fn caller() -> std::io::Result<std::sync::mpsc::Sender<Job>> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    std::thread::Builder::new().name("esk-txn-call".into()).spawn(move || {
        while let Ok(job) = rx.recv() {
            job();
        }
    })?;
    Ok(tx)
}

fn within<T: Send + 'static>(
    what: &str,
    limit: Duration,
    call: impl FnOnce() -> T + Send + 'static,
) -> Result<T, TxnError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let mut job: Job = Box::new(move || {
        let _ = tx.send(call());
    });
    CALLER.with(|c| {
        let mut c = c.borrow_mut();
        // A caller whose thread ended (a call panicked) gives the job back.
        for _ in 0..2 {
            let sender = match c.take() {
                Some(s) => s,
                None => caller().map_err(|e| TxnError::Fatal(anyhow!("{what}: cannot start a thread: {e}")))?,
            };
            match sender.send(job) {
                Ok(()) => {
                    *c = Some(sender);
                    return Ok(());
                }
                Err(std::sync::mpsc::SendError(back)) => job = back,
            }
        }
        Err(TxnError::Fatal(anyhow!("{what}: its caller thread ends at once")))
    })?;
    rx.recv_timeout(limit).map_err(|e| {
        // The caller is stuck in this call (or ended with it): the next call gets a new one.
        CALLER.with(|c| c.borrow_mut().take());
        match e {
            std::sync::mpsc::RecvTimeoutError::Timeout => {
                tracing::error!("{what} did not return within {limit:?}: giving the producer up");
                TxnError::Fatal(anyhow!("{what} stuck in librdkafka past its timeout"))
            }
            std::sync::mpsc::RecvTimeoutError::Disconnected => TxnError::Fatal(anyhow!("{what} panicked")),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_that_returns_in_time_gives_its_result() {
        assert_eq!(within("quick", Duration::from_secs(5), || 7).unwrap(), 7);
    }

    #[test]
    fn a_stuck_call_is_fatal_once_its_limit_passes() {
        let started = Instant::now();
        let err =
            within("stuck", Duration::from_millis(50), || std::thread::sleep(Duration::from_secs(2))).unwrap_err();
        assert!(matches!(err, TxnError::Fatal(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    }

    #[test]
    fn calls_after_a_stuck_one_and_a_panicking_one_still_run() {
        assert!(within("stuck", Duration::from_millis(20), || std::thread::sleep(Duration::from_millis(500))).is_err());
        assert_eq!(within("after stuck", Duration::from_secs(5), || 1).unwrap(), 1);
        let err = within("panics", Duration::from_secs(5), || -> u8 { panic!("planted") }).unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        assert_eq!(within("after panic", Duration::from_secs(5), || 2).unwrap(), 2);
        // One caller thread serves calls in turn.
        let a = within("a", Duration::from_secs(5), || std::thread::current().id()).unwrap();
        let b = within("b", Duration::from_secs(5), || std::thread::current().id()).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, std::thread::current().id());
    }

    #[test]
    fn retrying_gives_up_at_once_when_a_call_cannot_tell() {
        let stop = AtomicBool::new(false);
        let mut calls = 0;
        let err = retrying("x", &stop, || {
            calls += 1;
            Err(TxnError::Fatal(anyhow!("stuck")))
        })
        .unwrap_err();
        assert!(matches!(err, TxnError::Fatal(_)));
        assert_eq!(calls, 1);
    }
}
