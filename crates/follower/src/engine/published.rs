//! What a follower applied, as the readers of its store see it.

use std::sync::Mutex;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::{BorrowedMessage, Message};
use tokio::sync::watch;

use super::Positions;

/// Published by a follower's loop after each committed batch: what it
/// applied (`T`: its positions, and whatever its tokens are checked
/// against), where its consumer stood when idle, when the last applied
/// record of each partition was written, and why it stopped for good (`F`).
#[derive(Debug)]
pub struct Published<T, F> {
    applied: watch::Sender<T>,
    idle: Mutex<Positions>,
    last_ms: Mutex<Positions>,
    failure: watch::Sender<Option<F>>,
}

impl<T: Clone, F: Clone> Published<T, F> {
    pub fn new(initial: T) -> Self {
        Self {
            applied: watch::Sender::new(initial),
            idle: Mutex::new(Positions::new()),
            last_ms: Mutex::new(Positions::new()),
            failure: watch::Sender::new(None),
        }
    }

    /// What is applied now (committed in the local store).
    pub fn applied(&self) -> T {
        self.applied.borrow().clone()
    }

    /// Publishes a committed batch's outcome; waiters see it.
    pub fn publish(&self, applied: T) {
        self.applied.send_replace(applied);
    }

    /// Wakes the waiters without a change of positions (the store changed
    /// otherwise: a replay of parked records).
    pub fn touch(&self) {
        self.applied.send_modify(|_| {});
    }

    /// A reader of what is applied.
    pub fn watch(&self) -> Applied<T> {
        Applied(self.applied.subscribe())
    }

    /// Notes when the records of a committed batch were written (per
    /// partition, the last one's timestamp), for the lag in ms.
    pub fn written(&self, batch: &[BorrowedMessage<'_>]) {
        // A batch holds a handful of partitions.
        let mut seen: Vec<(&str, i32, i64)> = Vec::new();
        for m in batch {
            if let Some(ts) = m.timestamp().to_millis() {
                match seen.iter_mut().find(|(t, p, _)| *p == m.partition() && *t == m.topic()) {
                    Some(s) => s.2 = ts,
                    None => seen.push((m.topic(), m.partition(), ts)),
                }
            }
        }
        for (topic, partition, ts) in seen {
            self.written_at(topic, partition, ts);
        }
    }

    /// As [`Published::written`], for one record already copied.
    pub fn written_at(&self, topic: &str, partition: i32, timestamp_ms: i64) {
        self.last_ms.lock().expect("last_ms lock").insert((topic.to_owned(), partition), timestamp_ms);
    }

    /// When the last applied record of each partition was written (ms since
    /// the epoch).
    pub fn last_written(&self) -> Positions {
        self.last_ms.lock().expect("last_ms lock").clone()
    }

    /// Notes where `consumer` stands after a poll that found nothing new:
    /// past the transaction markers that follow the last applied record.
    pub fn idle_at<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) {
        if let Ok(tpl) = consumer.position() {
            let mut idle = self.idle.lock().expect("idle lock");
            for e in tpl.elements() {
                if let Some(o) = e.offset().to_raw() {
                    idle.insert((e.topic().to_owned(), e.partition()), o);
                }
            }
        }
    }

    /// Where the consumer stood when it last found nothing new.
    pub fn idle(&self) -> Positions {
        self.idle.lock().expect("idle lock").clone()
    }

    /// The loop stopped for good, with why.
    pub fn fail(&self, why: F) {
        self.failure.send_replace(Some(why));
    }

    /// Resolves once the loop stopped for good, with why.
    pub async fn failed(&self) -> F {
        let mut rx = self.failure.subscribe();
        let why = rx.wait_for(Option::is_some).await.ok().and_then(|why| why.clone());
        match why {
            Some(why) => why,
            // The sender lives as long as `self`: not reached.
            None => std::future::pending().await,
        }
    }
}

/// Waits on what a follower applied.
#[derive(Debug, Clone)]
pub struct Applied<T>(watch::Receiver<T>);

impl<T: Clone> Applied<T> {
    /// Waits until `done` holds for what is applied, or the timeout passes
    /// (then `Err` with what was applied by then).
    pub async fn until(&self, done: impl Fn(&T) -> bool, timeout: Duration) -> Result<(), T> {
        let mut rx = self.0.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if done(&rx.borrow_and_update()) {
                return Ok(());
            }
            if !matches!(tokio::time::timeout_at(deadline, rx.changed()).await, Ok(Ok(()))) {
                return Err(rx.borrow().clone());
            }
        }
    }

    /// Waits for the next published batch (or the timeout).
    pub async fn changed(&self, timeout: Duration) {
        let mut rx = self.0.clone();
        rx.borrow_and_update();
        let _ = tokio::time::timeout(timeout, rx.changed()).await;
    }

    /// What is applied now.
    pub fn now(&self) -> T {
        self.0.borrow().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_keeps_the_last_timestamp_per_partition() {
        let p: Published<(), ()> = Published::new(());
        p.written_at("t", 0, 5);
        p.written_at("t", 0, 7);
        p.written_at("u", 0, 1);
        let last = p.last_written();
        assert_eq!(last.get(&("t".to_owned(), 0)), Some(&7));
        assert_eq!(last.get(&("u".to_owned(), 0)), Some(&1));
    }

    #[tokio::test]
    async fn until_answers_at_once_when_done_and_with_what_was_reached_on_timeout() {
        let p: Published<i64, ()> = Published::new(3);
        let w = p.watch();
        assert_eq!(w.until(|n| *n >= 3, Duration::from_millis(1)).await, Ok(()));
        assert_eq!(w.until(|n| *n >= 4, Duration::from_millis(20)).await, Err(3));
        let waiting = tokio::spawn({
            let w = w.clone();
            async move { w.until(|n| *n >= 4, Duration::from_secs(30)).await }
        });
        p.publish(4);
        assert_eq!(waiting.await.unwrap(), Ok(()));
    }
}
