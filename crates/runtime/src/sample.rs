//! Values that cost a broker round trip (lags, the broker's reachability),
//! sampled on a thread of their own: `/status`, `/ready` and `/metrics` serve
//! the last sample and never wait on Kafka.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The last value of a sampler, and when it was taken.
#[derive(Debug)]
pub struct Sampled<T> {
    name: String,
    latest: Arc<Mutex<Option<(T, Instant)>>>,
    stop: Arc<AtomicBool>,
}

impl<T> Drop for Sampled<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Calls `take` now and then every `every` after the last call ended, on a
/// thread named `esk-sample-<name>`, until the [`Sampled`] is dropped. Each
/// sample's age is the gauge `esk_sample_age_seconds{sample=name}` when read.
pub fn spawn<T: Clone + Send + 'static>(
    name: &str,
    every: Duration,
    mut take: impl FnMut() -> T + Send + 'static,
) -> Sampled<T> {
    let latest = Arc::new(Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let (l, s) = (latest.clone(), stop.clone());
    let spawned = std::thread::Builder::new().name(format!("esk-sample-{name}")).spawn(move || {
        while !s.load(Ordering::Relaxed) {
            let value = take();
            *l.lock().expect("sample lock") = Some((value, Instant::now()));
            let until = Instant::now() + every;
            while Instant::now() < until && !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50).min(every));
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!("cannot start the {name} sampler: {e}");
    }
    Sampled { name: name.to_owned(), latest, stop }
}

impl<T: Clone> Sampled<T> {
    /// The last sample and its age; `None` before the first.
    pub fn latest(&self) -> Option<(T, Duration)> {
        let latest = self.latest.lock().expect("sample lock").as_ref().map(|(v, at)| (v.clone(), at.elapsed()));
        if let Some((_, age)) = &latest {
            metrics::gauge!("esk_sample_age_seconds", "sample" => self.name.clone()).set(age.as_secs_f64());
        }
        latest
    }
}

/// Probes the cluster every second ([`esk_kafka::config::probe`] of `topic`,
/// 3 s at most each) on a metadata client of its own.
pub fn kafka_probe(
    kafka: &esk_kafka::KafkaConfig,
    group: &str,
    topic: &str,
) -> Result<Sampled<Result<(), String>>, esk_kafka::Error> {
    let client: rdkafka::consumer::BaseConsumer = kafka.metadata(&format!("{group}-probe")).create()?;
    let topic = topic.to_owned();
    Ok(spawn("kafka", Duration::from_secs(1), move || {
        use rdkafka::consumer::Consumer;
        esk_kafka::config::probe(client.client(), &topic, Duration::from_secs(3))
    }))
}

/// Records a reader may still be behind and count as caught up for `/ready`
/// (once caught up it stays ready under load; the lag is in `/status`).
pub const READY_LAG_RECORDS: i64 = 1000;

/// Set once a reader has caught up (lag at most [`READY_LAG_RECORDS`]).
#[derive(Debug, Default)]
pub struct CaughtUp(AtomicBool);

impl CaughtUp {
    /// Whether `lag` (the sampled total, `None` before a sample) is, or
    /// once was, caught up; `Err` with why not.
    pub fn check(&self, what: &str, lag: Option<i64>) -> Result<(), String> {
        if self.0.load(Ordering::Relaxed) {
            return Ok(());
        }
        match lag {
            Some(n) if n <= READY_LAG_RECORDS => {
                self.0.store(true, Ordering::Relaxed);
                Ok(())
            }
            Some(n) => Err(format!("{what} is catching up: {n} records behind")),
            None => Err(format!("{what}: lag not measured yet")),
        }
    }
}

/// How recent the last answered probe must be for a service to be ready.
pub const PROBE_FRESH: Duration = Duration::from_secs(10);

/// Whether the broker answered the last probe, taken at most `fresh` ago:
/// `Err` with the reason when it did not, or the probe is stale or missing.
pub fn reachable(probe: &Sampled<Result<(), String>>, fresh: Duration) -> Result<(), String> {
    match probe.latest() {
        None => Err("Kafka not reached yet".into()),
        Some((_, age)) if age > fresh => {
            Err(format!("Kafka has not answered for {:.1} s (a probe is still waiting)", age.as_secs_f64()))
        }
        Some((Err(e), _)) => Err(format!("Kafka unreachable: {e}")),
        Some((Ok(()), _)) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_sample_is_served_and_a_stale_probe_is_not_reachable() {
        let n = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let s = spawn("count", Duration::from_millis(10), move || n.fetch_add(1, Ordering::Relaxed));
        let started = Instant::now();
        while s.latest().is_none_or(|(v, _)| v < 3) {
            assert!(started.elapsed() < Duration::from_secs(10), "no samples");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(s);

        let probe = spawn("probe", Duration::from_secs(3600), || Err::<(), _>("refused".to_owned()));
        let started = Instant::now();
        while probe.latest().is_none() {
            assert!(started.elapsed() < Duration::from_secs(10), "no probe");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(reachable(&probe, Duration::from_secs(60)).unwrap_err().contains("refused"));
        let ok = spawn("ok", Duration::from_secs(3600), || Ok::<(), String>(()));
        while ok.latest().is_none() {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(reachable(&ok, Duration::from_secs(60)).is_ok());
        std::thread::sleep(Duration::from_millis(30));
        assert!(reachable(&ok, Duration::from_millis(1)).unwrap_err().contains("not answered"));
    }
}
