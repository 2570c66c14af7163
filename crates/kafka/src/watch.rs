//! What librdkafka tells only a client's error callback: the brokers refused
//! its credentials. librdkafka goes on retrying (ADR 10: a wrong password
//! reaches the callback as `_AUTHENTICATION` within about 0.3 s), so a
//! metadata wait would run to its timeout and then say only "timed out";
//! [`fetch_metadata`] ends it as soon as the callback has seen the refusal,
//! and names it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::metadata::Metadata;
use rdkafka::producer::{BaseProducer, Producer, ProducerContext};

use crate::error::{Error, is_authentication_code};

/// A client context that remembers the last refused login and TLS failure
/// librdkafka reported, and logs every error as librdkafka's default does.
#[derive(Debug, Clone, Default)]
pub struct AuthWatch {
    seen: Arc<Mutex<Seen>>,
}

#[derive(Debug, Default)]
struct Seen {
    authentication: Option<String>,
    tls: Option<String>,
}

impl AuthWatch {
    /// Why the brokers refused the credentials, if they did.
    pub fn authentication(&self) -> Option<String> {
        self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).authentication.clone()
    }

    /// The last TLS failure (a certificate not trusted, say), if any.
    pub fn tls(&self) -> Option<String> {
        self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).tls.clone()
    }
}

impl ClientContext for AuthWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        {
            let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if is_authentication_code(code) {
                seen.authentication = Some(reason.to_owned());
            } else if code == Some(RDKafkaErrorCode::SSL) {
                seen.tls = Some(reason.to_owned());
            }
        }
        tracing::error!(target: "librdkafka", "librdkafka: {error}: {reason}");
    }
}

impl ConsumerContext for AuthWatch {}

/// Only for [`fetch_metadata`]'s producer, which sends nothing.
impl ProducerContext for AuthWatch {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// How long one metadata request may wait before the callback is looked at again.
const SLICE: Duration = Duration::from_millis(250);

/// Metadata (of `topic`, or of every topic) within `timeout`, asked in short
/// slices through a producer that sends nothing (an admin client never serves
/// librdkafka's error events; a producer's `poll` does, into [`AuthWatch`]):
/// [`Error::Authentication`] as soon as the brokers refused the credentials; a
/// transient error is retried until the timeout, and then is
/// [`Error::Unavailable`], naming a TLS failure if one was seen.
pub fn fetch_metadata(
    probe: &BaseProducer<AuthWatch>,
    bootstrap: &str,
    topic: Option<&str>,
    timeout: Duration,
) -> Result<Metadata, Error> {
    let refused = || {
        probe.poll(Duration::ZERO);
        probe.context().authentication()
    };
    sliced(bootstrap, timeout, |slice| probe.client().fetch_metadata(topic, slice), refused, || probe.context().tls())
}

/// [`fetch_metadata`] for a consumer with a `group.id`: librdkafka hands it
/// errors through `poll` rather than the error callback, so it is polled
/// between slices (call it before any assignment: no record is taken).
pub fn consumer_metadata<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    bootstrap: &str,
    topic: Option<&str>,
    timeout: Duration,
) -> Result<Metadata, Error> {
    let refused = || {
        for _ in 0..100 {
            match consumer.poll(Duration::ZERO) {
                Some(Err(e)) if is_authentication_code(e.rdkafka_error_code()) => return Some(e.to_string()),
                Some(_) => {}
                None => return None,
            }
        }
        None
    };
    sliced(bootstrap, timeout, |slice| consumer.fetch_metadata(topic, slice), refused, || None)
}

fn sliced(
    bootstrap: &str,
    timeout: Duration,
    fetch: impl Fn(Duration) -> rdkafka::error::KafkaResult<Metadata>,
    refused: impl Fn() -> Option<String>,
    tls: impl Fn() -> Option<String>,
) -> Result<Metadata, Error> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let result = fetch(left.min(SLICE));
        if let Some(why) = refused() {
            return Err(Error::Authentication(format!("{bootstrap}: {why}")));
        }
        let e = match result {
            Ok(md) => return Ok(md),
            Err(e) => Error::from(e),
        };
        if !e.is_transient() {
            return Err(e);
        }
        if Instant::now() >= deadline {
            let reason = match tls() {
                Some(tls) => format!("no metadata within {timeout:?} ({e}); TLS failed: {tls}"),
                None => format!("no metadata within {timeout:?} ({e})"),
            };
            return Err(Error::Unavailable { bootstrap: bootstrap.to_owned(), reason });
        }
    }
}
