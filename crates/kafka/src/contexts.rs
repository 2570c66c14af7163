//! The registry of bounded contexts on Kafka (ADR 13): reading it, following
//! it, and a writer's claim of its categories.
//!
//! What a record means is `esk_wire::contexts`: the first valid claim of a
//! category wins, so every reader agrees on every category's context.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use esk_wire::Topics;
use esk_wire::contexts::{Claim, ContextMap};
use esk_wire::topics::DEFAULT_CONTEXT;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::{Error, KafkaConfig, Sending};

/// How often a follower looks for a registry topic that does not exist yet.
const MISSING_TOPIC_RECHECK: Duration = Duration::from_secs(5);

/// Reads the whole registry (a topic that does not exist holds no claim).
pub fn read(kafka: &KafkaConfig, topics: &Topics) -> Result<ContextMap, Error> {
    let mut map = ContextMap::default();
    let topic = topics.contexts();
    let group = format!("{}-contexts", topics.prefix());
    crate::read::read_topic(
        kafka,
        &group,
        &topic,
        |_| None,
        kafka.timeout,
        |m| {
            if let Err(why) = map.apply(m.key(), m.payload()) {
                tracing::warn!(topic, offset = m.offset(), "ignored a record of the registry of contexts: {why}");
            }
            Ok::<(), Error>(())
        },
    )
    .map_err(|e| match e {
        crate::read::ReadError::Kafka(e) | crate::read::ReadError::Each(e) => e,
    })?;
    Ok(map)
}

/// Claims `categories` for the context of `topics` (a writer's start):
/// refused when another context has one of them, or when a category no
/// context claimed already has events and the context is not the default
/// one (its streams' state is in the default context's topics: a category
/// does not move, ADR 13). After writing, reads the registry again, so that
/// of two contexts claiming a category at once the one that lost is told.
pub fn claim(kafka: &KafkaConfig, topics: &Topics, categories: &[String], by: &str) -> Result<(), Error> {
    let context = topics.context();
    let map = read(kafka, topics)?;
    let mut wanted = Vec::new();
    for category in categories {
        match map.claim(category) {
            Some(c) if c.context == context => {}
            Some(c) => return Err(Error::Invalid(taken(category, context, c))),
            None => {
                if context != DEFAULT_CONTEXT && has_events(kafka, &topics.events(category))? {
                    return Err(Error::Invalid(format!(
                        "category '{category}' already has events ({}), written in the default context before any \
                         context claimed it: its streams' versions are the default context's, so it cannot move to \
                         context '{context}' (ADR 13). Serve it from the default context's writers, or give this \
                         context another category",
                        topics.events(category)
                    )));
                }
                wanted.push(category.as_str());
            }
        }
    }
    if wanted.is_empty() {
        return Ok(());
    }
    let producer: ThreadedProducer<_> = kafka.producer(Sending::Parked).create()?;
    let topic = topics.contexts();
    let at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    for category in &wanted {
        let claim = Claim { context: context.to_owned(), at_ms, by: by.to_owned() };
        let value = serde_json::to_vec(&claim).map_err(|e| Error::Invalid(e.to_string()))?;
        producer
            .send(BaseRecord::<str, [u8]>::to(&topic).partition(0).key(category).payload(&value))
            .map_err(|(e, _)| Error::from(e))?;
    }
    producer.flush(kafka.timeout)?;
    let delivered = read(kafka, topics)?;
    for category in wanted {
        match delivered.claim(category) {
            Some(c) if c.context == context => {}
            Some(c) => return Err(Error::Invalid(taken(category, context, c))),
            None => {
                return Err(kafka.unavailable(format!("the claim of '{category}' is not in {topic} after it was sent")));
            }
        }
    }
    Ok(())
}

fn taken(category: &str, context: &str, c: &Claim) -> String {
    format!(
        "category '{category}' belongs to context '{}' (claimed by {} at {} ms): a category has one context, so \
         context '{context}' cannot serve it. Send its commands to '{}''s writers, or give this service another \
         category",
        c.context, c.by, c.at_ms, c.context
    )
}

/// Whether any partition of `topic` holds a record (a topic that does not
/// exist holds none).
fn has_events(kafka: &KafkaConfig, topic: &str) -> Result<bool, Error> {
    let consumer: BaseConsumer = kafka.metadata(&format!("{topic}-probe")).create()?;
    let md = consumer.fetch_metadata(Some(topic), kafka.timeout).map_err(|e| kafka.unavailable(e))?;
    if let Some(refused) = crate::error::topic_refused(&md, topic) {
        return Err(refused);
    }
    let Some(t) = md.topics().first().filter(|t| t.error().is_none()) else { return Ok(false) };
    for p in t.partitions() {
        let (low, high) = crate::watermarks(consumer.client(), topic, p.id(), kafka.timeout)?;
        if high > low {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The registry as a follower last read it: which context a category's
/// requests and 2PC records go to.
#[derive(Debug, Default)]
pub struct Routes {
    map: RwLock<ContextMap>,
}

impl Routes {
    /// Routes of a registry read once (tests, and tools that run briefly).
    pub fn fixed(map: ContextMap) -> Self {
        Self { map: RwLock::new(map) }
    }

    /// The context of `category`: its claimant's, else the default one.
    pub fn context_of(&self, category: &str) -> String {
        self.map.read().expect("routes lock").context_of(category).to_owned()
    }

    /// Whether `category`'s requests go to `context` (no allocation: on
    /// every request's path).
    pub fn routes_to(&self, category: &str, context: &str) -> bool {
        self.map.read().expect("routes lock").context_of(category) == context
    }

    /// A copy of what the registry says now.
    pub fn snapshot(&self) -> ContextMap {
        self.map.read().expect("routes lock").clone()
    }

    fn apply(&self, topic: &str, m: &impl Message) {
        if let Err(why) = self.map.write().expect("routes lock").apply(m.key(), m.payload()) {
            tracing::warn!(topic, offset = m.offset(), "ignored a record of the registry of contexts: {why}");
            metrics::counter!("esk_contexts_ignored_records_total").increment(1);
        }
    }
}

/// The partition counts of contexts' co-partitioned topics, each looked up
/// once (a context's topics keep their count: `esk topics init` refuses
/// another).
#[derive(Debug, Default)]
pub struct Partitions {
    known: std::sync::Mutex<std::collections::HashMap<String, i32>>,
}

impl Partitions {
    /// The partitions of `topic`, the co-partitioned topic of `context` a
    /// caller writes to, through `client`'s metadata. `Err`: Kafka did not
    /// answer, or the topic does not exist (`esk topics init --context`
    /// was not run), said for `category` when one is given.
    pub fn of<C: rdkafka::ClientContext>(
        &self,
        client: &rdkafka::client::Client<C>,
        context: &str,
        topic: &str,
        category: &str,
        timeout: Duration,
    ) -> Result<i32, String> {
        if let Some(n) = self.known.lock().expect("partitions lock").get(context) {
            return Ok(*n);
        }
        let md = client.fetch_metadata(Some(topic), timeout).map_err(|e| format!("metadata of {topic}: {e}"))?;
        let n = md
            .topics()
            .first()
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len() as i32)
            .ok_or_else(|| {
                let whose = if category.is_empty() { String::new() } else { format!("category '{category}' belongs to ") };
                format!(
                    "{whose}context '{context}', whose {topic} does not exist: run `esk topics init --context {context}`"
                )
            })?;
        self.known.lock().expect("partitions lock").insert(context.to_owned(), n);
        Ok(n)
    }
}

/// A thread that keeps [`Routes`] current; stopped when dropped.
#[derive(Debug)]
pub struct Following {
    routes: Arc<Routes>,
    bootstrap: String,
    stop: Arc<AtomicBool>,
    caught_up: std::sync::Mutex<Option<mpsc::Receiver<Result<(), Error>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts following the registry of `topics`' installation: from its
/// beginning, then every claim as it comes. [`Following::routes`] waits
/// until the registry as it was at the start has been read.
pub fn follow(kafka: &KafkaConfig, topics: &Topics) -> Result<Following, Error> {
    let consumer: BaseConsumer =
        kafka.committed_reader(&format!("{}-contexts", topics.prefix()), Duration::from_millis(100)).create()?;
    let routes = Arc::new(Routes::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::sync_channel(1);
    let thread = {
        let (routes, stop, topic, timeout) = (routes.clone(), stop.clone(), topics.contexts(), kafka.timeout);
        std::thread::Builder::new()
            .name("esk-contexts".into())
            .spawn(move || follow_loop(&consumer, &topic, timeout, &routes, &stop, tx))
            .map_err(|e| Error::Invalid(format!("starting the contexts follower: {e}")))?
    };
    Ok(Following {
        routes,
        bootstrap: kafka.bootstrap.clone(),
        stop,
        caught_up: std::sync::Mutex::new(Some(rx)),
        thread: Some(thread),
    })
}

/// [`follow`], and the routes once caught up, from async code (the wait is
/// off the runtime's threads).
pub async fn follow_async(kafka: &KafkaConfig, topics: &Topics) -> Result<(Following, Arc<Routes>), Error> {
    let following = follow(kafka, topics)?;
    let timeout = kafka.timeout;
    let (following, routes) = tokio::task::spawn_blocking(move || {
        let routes = following.routes(timeout);
        (following, routes)
    })
    .await
    .map_err(|e| Error::Invalid(format!("reading the registry of contexts: {e}")))?;
    Ok((following, routes?))
}

impl Following {
    /// The routes, once the registry is read to where it was when following
    /// began (at most the Kafka timeout).
    pub fn routes(&self, timeout: Duration) -> Result<Arc<Routes>, Error> {
        let waiting = self.caught_up.lock().expect("caught-up lock").take();
        if let Some(rx) = waiting {
            match rx.recv_timeout(timeout) {
                Ok(result) => result?,
                Err(_) => {
                    return Err(Error::Unavailable {
                        bootstrap: self.bootstrap.clone(),
                        reason: format!("the registry of contexts was not read within {timeout:?}"),
                    });
                }
            }
        }
        Ok(self.routes.clone())
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            crate::destroy_later(t);
        }
    }
}

fn follow_loop(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
    routes: &Routes,
    stop: &AtomicBool,
    caught_up: mpsc::SyncSender<Result<(), Error>>,
) {
    let mut caught_up = Some(caught_up);
    let mut end: Option<i64> = None;
    let mut next_check = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if end.is_none() {
            if Instant::now() < next_check {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            match assign(consumer, topic, timeout) {
                Ok(Some(high)) => {
                    end = Some(high);
                    // An empty registry is read already (a consumer's
                    // position stays unknown until it fetches a record).
                    if high == 0
                        && let Some(tx) = caught_up.take()
                    {
                        let _ = tx.send(Ok(()));
                    }
                }
                Ok(None) => {
                    // No registry (an installation from before contexts): no claims yet.
                    if let Some(tx) = caught_up.take() {
                        let _ = tx.send(Ok(()));
                    }
                    next_check = Instant::now() + MISSING_TOPIC_RECHECK;
                    continue;
                }
                Err(e) => {
                    if let Some(tx) = caught_up.take() {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    tracing::warn!(topic, "following the registry of contexts: {e}");
                    next_check = Instant::now() + MISSING_TOPIC_RECHECK;
                    continue;
                }
            }
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => routes.apply(topic, &m),
            Some(Err(e)) => tracing::debug!(topic, "contexts: {e}"),
            None => {}
        }
        if caught_up.is_some() {
            let position = consumer
                .position()
                .ok()
                .and_then(|tpl| tpl.find_partition(topic, 0).and_then(|p| p.offset().to_raw()))
                .unwrap_or(0);
            if end.is_some_and(|high| position >= high)
                && let Some(tx) = caught_up.take()
            {
                let _ = tx.send(Ok(()));
            }
        }
    }
}

/// Assigns the registry's partition from its beginning: `Some(high
/// watermark)`, or `None` when the topic does not exist.
fn assign(consumer: &BaseConsumer, topic: &str, timeout: Duration) -> Result<Option<i64>, Error> {
    let md = consumer.fetch_metadata(Some(topic), timeout)?;
    if let Some(refused) = crate::error::topic_refused(&md, topic) {
        return Err(refused);
    }
    if md.topics().first().is_none_or(|t| t.error().is_some() || t.partitions().is_empty()) {
        return Ok(None);
    }
    let (low, high) = crate::watermarks(consumer.client(), topic, 0, timeout)?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    Ok(Some(if high > low { high } else { 0 }))
}
