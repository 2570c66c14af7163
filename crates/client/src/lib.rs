//! A client for esk's writer: appends, domain commands and stream reads, over
//! Kafka alone.
//!
//! Requests go to `<prefix>.commands`, keyed by stream, in the stream's
//! partition (Kafka's Java partitioner). Each client reads one partition of
//! `<prefix>.replies`, picked at random, so that many clients do not each read
//! every reply; a request names that partition and its reply arrives there,
//! after the writer's transaction committed (`read_committed`). Many requests
//! may be in flight at once.
//!
//! Delivery guarantee: a request is sent with an idempotent, `acks=all`
//! producer; a success reply means the events are durable. On a timeout the
//! request may or may not have been applied: retry with the same request id (or
//! the same event ids at the same expected version) within the idempotency
//! horizon and the writer answers with the first result without writing
//! twice. Every send carries an attempt id that its reply echoes, so a client
//! never takes the answer to an earlier attempt for the answer to this one.
//! A request over the limits (`esk_wire::limits`, from the broker's
//! `max.message.bytes`) is refused before anything is sent.

pub mod http;
mod read;
pub mod tx;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use esk_kafka::{AuthWatch, KafkaConfig};
use esk_wire::limits::{self, Limits};
use esk_wire::partition::partition_for;
use esk_wire::protocol::{
    Appended, CommandData, ErrorCode, ExpectedVersion, NewEvent, Reply, ReplyOutcome, Request, RequestBody, StreamHead,
};
use esk_wire::{StreamName, Topics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::oneshot;

pub use read::{Page, ReadEvent, decode, read_range, read_stream};

/// Why a request did not succeed. Each variant maps to one CLI exit code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The stream is not at the expected version; nothing was written.
    #[error("{message}")]
    WrongExpectedVersion { message: String, actual: u64 },
    /// The input is invalid (found by the client or the writer); nothing was written.
    #[error("{0}")]
    Invalid(String),
    /// The domain refused the command; nothing was written.
    #[error("{0}")]
    Refused(String),
    /// Kafka or the writer could not be reached, or did not answer in time.
    #[error("{0}")]
    Unavailable(String),
    /// The writer failed in a way that is not the caller's fault.
    #[error("{0}")]
    Internal(String),
    /// The request is older than the idempotency horizon and not remembered:
    /// it may have been applied; nothing was written now.
    #[error("{0}")]
    Expired(String),
}

impl From<esk_kafka::Error> for ClientError {
    fn from(e: esk_kafka::Error) -> Self {
        match e {
            esk_kafka::Error::Invalid(m) => ClientError::Invalid(m),
            // Refused credentials and missing ACLs: the installation cannot be
            // used as configured, as when it is unreachable (exit 5).
            e @ (esk_kafka::Error::Authentication(_) | esk_kafka::Error::Authorization(_)) => {
                ClientError::Unavailable(e.to_string())
            }
            e if e.is_transient() => ClientError::Unavailable(e.to_string()),
            e => ClientError::Internal(e.to_string()),
        }
    }
}

impl From<rdkafka::error::KafkaError> for ClientError {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        esk_kafka::Error::from(e).into()
    }
}

/// Waiting sends, by attempt id, with their request id (or txid).
type Pending = Arc<Mutex<HashMap<String, Waiting>>>;

#[derive(Debug)]
struct Waiting {
    request_id: String,
    tx: oneshot::Sender<Reply>,
}

/// The send a reply answers: by its attempt; a reply from a service that
/// names no attempt (one from before attempts) goes to a send of its request id.
fn waiting_for(pending: &mut HashMap<String, Waiting>, reply: &Reply) -> Option<Waiting> {
    if let Some(attempt) = &reply.attempt {
        return pending.remove(attempt);
    }
    let key = pending.iter().find(|(_, w)| w.request_id == reply.request_id).map(|(k, _)| k.clone())?;
    pending.remove(&key)
}

/// A connection to an esk installation.
pub struct Client {
    config: KafkaConfig,
    topics: Topics,
    producer: FutureProducer,
    partitions: i32,
    tx_partitions: i32,
    reply_partition: i32,
    limits: Limits,
    pending: Pending,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
    /// Idle consumers of [`read_stream`], reused (up to [`read::READERS`]).
    point_readers: read::Pool,
    /// Which context each category's requests go to (ADR 13), followed.
    routes: Arc<esk_kafka::contexts::Routes>,
    _following: esk_kafka::contexts::Following,
    /// Partitions of each context's commands topic, as first looked up.
    context_partitions: esk_kafka::contexts::Partitions,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("prefix", &self.topics.prefix())
            .field("reply_partition", &self.reply_partition)
            .finish()
    }
}

fn partition_count(
    consumer: &BaseConsumer<AuthWatch>,
    topic: &str,
    timeout: Duration,
    bootstrap: &str,
) -> Result<i32, ClientError> {
    // Ends at once when the brokers refused the credentials (librdkafka
    // retries until the timeout, telling only the consumer's poll).
    let md = esk_kafka::watch::consumer_metadata(consumer, bootstrap, Some(topic), timeout)?;
    let t = md.topics().first();
    if let Some(code) = t.and_then(|t| t.error()).map(rdkafka::error::RDKafkaErrorCode::from)
        && esk_kafka::error::is_authorization_code(Some(code))
    {
        return Err(esk_kafka::error::topic_error(topic, code).into());
    }
    let t = t
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .ok_or_else(|| ClientError::Unavailable(format!("topic {topic} does not exist: run `esk topics init`")))?;
    Ok(t.partitions().len() as i32)
}

impl Client {
    /// Connects for one request at a time; see [`Client::connect_pipelined`].
    pub fn connect(config: KafkaConfig, topics: Topics) -> Result<Self, ClientError> {
        Self::open(config, topics, false)
    }

    /// Connects for many requests in flight: requests for one stream reach the
    /// writer in the order they were submitted, even across retries.
    pub fn connect_pipelined(config: KafkaConfig, topics: Topics) -> Result<Self, ClientError> {
        Self::open(config, topics, true)
    }

    /// Learns the partition counts and starts reading a replies partition.
    fn open(config: KafkaConfig, topics: Topics, pipelined: bool) -> Result<Self, ClientError> {
        let timeout = config.timeout;
        // Read the registry of contexts meanwhile.
        let following = esk_kafka::contexts::follow(&config, &topics)?;
        let replies = topics.replies();
        let consumer: BaseConsumer<AuthWatch> = config
            .committed_reader(&format!("{}-client", topics.prefix()), Duration::from_millis(10))
            .create_with_context(AuthWatch::default())?;
        let partitions = partition_count(&consumer, &topics.commands(), timeout, &config.bootstrap)?;
        let reply_partitions = partition_count(&consumer, &replies, timeout, &config.bootstrap)?;
        let tx_partitions = partition_count(&consumer, &topics.tx_requests(), timeout, &config.bootstrap)?;
        let limits = Limits::for_broker(esk_kafka::admin::max_message_bytes_blocking(
            &config,
            &[topics.commands(), topics.tx_requests()],
        )?);
        let reply_partition = (uuid::Uuid::new_v4().as_u128() % reply_partitions as u128) as i32;
        // Read from the current end: any reply to a request sent after this lands later.
        // Retries a transient error (a new topic's leader not ready yet) within the timeout.
        let (_, high) = esk_kafka::watermarks(consumer.client(), &replies, reply_partition, timeout)
            .map_err(|e| ClientError::Unavailable(format!("reading {replies}: {e}")))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&replies, reply_partition, Offset::Offset(high))?;
        consumer.assign(&tpl)?;
        // Idempotence keeps pipelined requests of one stream in order across
        // retries, at the price of about half a second to get a producer id.
        // A lone request needs no order: a duplicate of it is answered by the
        // writer from its memory of request ids and writes nothing.
        let producer: FutureProducer =
            config.producer(esk_kafka::Sending::Requests { idempotent: pipelined, timeout }).create()?;
        if pipelined {
            // Connect now so the producer gets its id at once (see the writer's worker).
            producer
                .client()
                .fetch_metadata(Some(&topics.commands()), timeout)
                .map_err(|e| ClientError::Unavailable(format!("Kafka at {}: {e}", config.bootstrap)))?;
        }
        let pending: Pending = Arc::default();
        let routes = following.routes(timeout)?;

        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (pending, stop) = (pending.clone(), stop.clone());
            std::thread::Builder::new()
                .name("esk-replies".into())
                .spawn(move || read_replies(&consumer, &pending, &stop))
                .expect("spawning the reply reader")
        };
        tracing::debug!(reply_partition, "connected");
        Ok(Self {
            config,
            topics,
            producer,
            partitions,
            tx_partitions,
            reply_partition,
            limits,
            pending,
            stop,
            reader: Some(reader),
            point_readers: read::Pool::default(),
            routes,
            _following: following,
            context_partitions: Default::default(),
        })
    }

    /// The limits of this installation, from its topics' `max.message.bytes`.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Refuses a payload over the limit before it is sent.
    fn check_size(&self, what: &str, payload: &[u8]) -> Result<(), ClientError> {
        let max = self.limits.request_bytes();
        if payload.len() > max {
            return Err(ClientError::Invalid(format!(
                "the {what} is {} bytes; the limit is {max} (the broker's max.message.bytes less room for headers)",
                payload.len()
            )));
        }
        Ok(())
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    pub fn kafka(&self) -> &KafkaConfig {
        &self.config
    }

    /// Partitions of the default context's co-partitioned topics.
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// The context a category's requests go to, as the registry says now.
    pub fn context_of(&self, category: &str) -> String {
        self.routes.context_of(category)
    }

    /// The commands topic and its partition count for a stream's category:
    /// its context's (ADR 13), looked up once a context.
    fn route(&self, stream: &StreamName) -> Result<(String, i32), ClientError> {
        let context = self.routes.context_of(stream.category());
        let topic = self.topics.in_context(&context).commands();
        if context == esk_wire::topics::DEFAULT_CONTEXT {
            return Ok((topic, self.partitions));
        }
        let n = self
            .context_partitions
            .of(self.producer.client(), &context, &topic, stream.category(), self.config.timeout)
            .map_err(|e| ClientError::Unavailable(format!("Kafka at {}: {e}", self.config.bootstrap)))?;
        Ok((topic, n))
    }

    /// Sends a request and waits for its reply.
    pub async fn request(
        &self,
        stream: &str,
        body: RequestBody,
        request_id: Option<String>,
    ) -> Result<Reply, ClientError> {
        self.submit(stream, body, request_id)?.reply().await
    }

    /// Enqueues a request now (requests submitted one after another reach the
    /// writer in that order) and returns a handle to await its reply.
    pub fn submit(
        &self,
        stream: &str,
        body: RequestBody,
        request_id: Option<String>,
    ) -> Result<Submitted<'_>, ClientError> {
        self.submit_first_sent(stream, body, request_id, None)
    }

    /// [`Client::submit`] of a request first sent at `first_sent_ms` (ms
    /// since the epoch): a retry by a program that keeps its requests (a
    /// process manager's outbox) says when it first sent it, so that one sent
    /// again after the idempotency horizon is refused (`request_expired`)
    /// rather than applied again. `None`: a UUIDv7 request id's time, else now.
    pub fn submit_first_sent(
        &self,
        stream: &str,
        body: RequestBody,
        request_id: Option<String>,
        first_sent_ms: Option<i64>,
    ) -> Result<Submitted<'_>, ClientError> {
        let stream = StreamName::parse(stream).map_err(|e| ClientError::Invalid(e.to_string()))?;
        let request_id = request_id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        limits::check_request_id(&request_id).map_err(ClientError::Invalid)?;
        // The first attempt's time: as given, or a UUIDv7 id carries it,
        // else it is now (see `Request::sent_ms`).
        let sent_ms = first_sent_ms.or_else(|| limits::uuid_v7_ms(&request_id).is_none().then(now_ms));
        let attempt = uuid::Uuid::new_v4().simple().to_string();
        let request = Request {
            request_id,
            reply_partition: self.reply_partition,
            stream: stream.to_string(),
            body,
            correlation_id: None,
            causation_id: None,
            attempt: Some(attempt.clone()),
            sent_ms,
        };
        let id = request.request_id.clone();
        let payload = serde_json::to_vec(&request).map_err(|e| ClientError::Invalid(e.to_string()))?;
        self.check_size("request (all its events)", &payload)?;
        let (topic, partitions) = self.route(&stream)?;
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(attempt.clone(), Waiting { request_id: id.clone(), tx });

        let record = FutureRecord::to(&topic)
            .partition(partition_for(stream.as_str().as_bytes(), partitions))
            .key(stream.as_str())
            .payload(&payload);
        match self.producer.send_result(record) {
            Ok(delivery) => {
                let forget = Forget { pending: self.pending.clone(), attempt: attempt.clone() };
                Ok(Submitted { client: self, id, attempt, topic, delivery, rx, _forget: forget })
            }
            Err((e, _)) => {
                self.pending.lock().expect("pending lock").remove(&attempt);
                Err(send_error(&topic, e))
            }
        }
    }

    /// Appends events at an expected version.
    pub async fn append(
        &self,
        stream: &str,
        expected_version: ExpectedVersion,
        events: Vec<NewEvent>,
        request_id: Option<String>,
    ) -> Result<Appended, ClientError> {
        let body = RequestBody::Append { expected_version, events };
        appended(self.request(stream, body, request_id).await?)
    }

    /// Sends a command to the stream's aggregate.
    pub async fn command(
        &self,
        stream: &str,
        expected_version: ExpectedVersion,
        command: CommandData,
        request_id: Option<String>,
    ) -> Result<Appended, ClientError> {
        let body = RequestBody::Command { expected_version, command };
        appended(self.request(stream, body, request_id).await?)
    }

    /// [`Client::command`] first sent at `first_sent_ms`: see
    /// [`Client::submit_first_sent`].
    pub async fn command_first_sent(
        &self,
        stream: &str,
        expected_version: ExpectedVersion,
        command: CommandData,
        request_id: String,
        first_sent_ms: i64,
    ) -> Result<Appended, ClientError> {
        let body = RequestBody::Command { expected_version, command };
        appended(self.submit_first_sent(stream, body, Some(request_id), Some(first_sent_ms))?.reply().await?)
    }

    /// The stream's version and where its events are.
    pub async fn head(&self, stream: &str) -> Result<StreamHead, ClientError> {
        self.head_from(stream, 0).await
    }

    /// The stream's head with its index from the run holding version `from`
    /// (at most [`esk_wire::protocol::MAX_HEAD_ENTRIES`] entries a reply).
    pub async fn head_from(&self, stream: &str, from: u64) -> Result<StreamHead, ClientError> {
        match self.request(stream, RequestBody::Head { from }, None).await?.outcome {
            ReplyOutcome::Head(h) => Ok(h),
            other => Err(outcome_error(other)),
        }
    }
}

/// A request on its way; [`Submitted::reply`] waits for the answer.
pub struct Submitted<'c> {
    client: &'c Client,
    id: String,
    attempt: String,
    topic: String,
    delivery: rdkafka::producer::DeliveryFuture,
    rx: oneshot::Receiver<Reply>,
    _forget: Forget,
}

/// Forgets a send's waiting entry when the wait ends, however it ends (a
/// caller that gave up, a dropped future): no entry outlives its waiter.
pub(crate) struct Forget {
    pub(crate) pending: Pending,
    pub(crate) attempt: String,
}

impl Drop for Forget {
    fn drop(&mut self) {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.attempt);
    }
}

impl std::fmt::Debug for Submitted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submitted").field("request_id", &self.id).finish()
    }
}

impl Submitted<'_> {
    pub fn request_id(&self) -> &str {
        &self.id
    }

    /// Waits for the request to be stored and answered, up to the client's timeout.
    pub async fn reply(self) -> Result<Reply, ClientError> {
        let Submitted { client, id, attempt, topic, delivery, rx, _forget } = self;
        let timeout = client.config.timeout;
        let outcome = async {
            match tokio::time::timeout(timeout, delivery).await {
                Ok(Ok(Ok(_))) => tracing::debug!(request = id, "request stored"),
                Ok(Ok(Err((e, _)))) => {
                    return Err(match send_error(&topic, e) {
                        ClientError::Unavailable(m) => {
                            ClientError::Unavailable(format!("request {id}, Kafka at {}: {m}", client.config.bootstrap))
                        }
                        other => other,
                    });
                }
                Ok(Err(_)) | Err(_) => {
                    return Err(ClientError::Unavailable(format!(
                        "Kafka at {} did not take request {id} within {timeout:?}",
                        client.config.bootstrap
                    )));
                }
            }
            tokio::time::timeout(timeout, rx)
                .await
                .map_err(|_| {
                    ClientError::Unavailable(format!(
                        "no reply from the writer within {timeout:?} (is esk-writer running?); request {id} may \
                         still be applied: retrying it with the same request id is safe"
                    ))
                })?
                .map_err(|_| ClientError::Internal("the reply reader stopped".into()))
        }
        .await;
        drop(_forget);
        tracing::debug!(request = id, attempt, "reply received");
        outcome
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A failed send: a record the broker refuses for its size or form is the
/// caller's input (nothing was written), anything else is unavailability.
pub(crate) fn send_error(topic: &str, e: rdkafka::error::KafkaError) -> ClientError {
    if esk_kafka::refuses_the_record(&e) {
        ClientError::Invalid(format!("{topic} refused the request: {e} (nothing was written)"))
    } else {
        ClientError::Unavailable(format!("sending to {topic}: {e}"))
    }
}

fn appended(reply: Reply) -> Result<Appended, ClientError> {
    match reply.outcome {
        ReplyOutcome::Appended(a) => Ok(a),
        other => Err(outcome_error(other)),
    }
}

pub fn outcome_error(outcome: ReplyOutcome) -> ClientError {
    match outcome {
        ReplyOutcome::Error(e) => match e.code {
            ErrorCode::WrongExpectedVersion => {
                ClientError::WrongExpectedVersion { message: e.message, actual: e.actual_version.unwrap_or_default() }
            }
            ErrorCode::InvalidInput => ClientError::Invalid(e.message),
            ErrorCode::DomainRefused => ClientError::Refused(e.message),
            ErrorCode::Internal => ClientError::Internal(e.message),
            ErrorCode::RequestExpired => ClientError::Expired(e.message),
            ErrorCode::Unavailable => ClientError::Unavailable(e.message),
        },
        other => ClientError::Internal(format!("unexpected reply: {other:?}")),
    }
}

fn read_replies(consumer: &BaseConsumer<AuthWatch>, pending: &Pending, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(20)) {
            Some(Ok(m)) => {
                let Some(reply) = m.payload().and_then(|p| serde_json::from_slice::<Reply>(p).ok()) else {
                    continue;
                };
                let waiting = waiting_for(&mut pending.lock().expect("pending lock"), &reply);
                if let Some(w) = waiting {
                    let _ = w.tx.send(reply);
                }
            }
            Some(Err(e)) => tracing::debug!("replies: {e}"),
            None => {}
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.point_readers.close();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use esk_wire::protocol::{ErrorCode, ReplyError};

    fn reply(request_id: &str, attempt: Option<&str>) -> Reply {
        let outcome =
            ReplyOutcome::Error(ReplyError { code: ErrorCode::Internal, message: String::new(), actual_version: None });
        Reply { request_id: request_id.into(), attempt: attempt.map(str::to_owned), outcome }
    }

    #[test]
    fn replies_go_to_their_attempt_or_to_their_request_id_from_older_services() {
        let mut pending = HashMap::new();
        for (attempt, id) in [("a1", "r"), ("a2", "r"), ("a3", "s")] {
            let (tx, _rx) = oneshot::channel();
            pending.insert(attempt.to_owned(), Waiting { request_id: id.into(), tx });
        }
        assert!(waiting_for(&mut pending, &reply("r", Some("a2"))).is_some());
        assert!(pending.contains_key("a1") && !pending.contains_key("a2"), "the other attempt still waits");
        assert!(waiting_for(&mut pending, &reply("r", Some("zz"))).is_none(), "an answer to no attempt of ours");
        assert_eq!(waiting_for(&mut pending, &reply("s", None)).map(|w| w.request_id), Some("s".into()));
        assert!(waiting_for(&mut pending, &reply("q", None)).is_none());
    }
}
