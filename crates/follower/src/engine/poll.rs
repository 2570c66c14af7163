//! Batches of records from a consumer.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use rdkafka::message::BorrowedMessage;

/// Up to `max` records: the first poll waits up to `wait`, the rest take only
/// what is already fetched. A consumer error ends the batch and the next poll
/// tries again, except a refusal by the brokers (credentials, an ACL), which
/// is returned: no retry mends it.
///
/// Keep `wait` short where an idle position matters: a poll that serves only
/// a transaction marker returns nothing but waits out its timeout.
pub fn batch<'c>(
    consumer: &'c BaseConsumer<impl ConsumerContext>,
    max: usize,
    wait: Duration,
) -> Result<Vec<BorrowedMessage<'c>>, esk_kafka::Error> {
    let mut batch = Vec::new();
    let mut timeout = wait;
    while batch.len() < max {
        match consumer.poll(timeout) {
            Some(Ok(m)) => batch.push(m),
            Some(Err(e)) => {
                if let Some(refused) = esk_kafka::Error::refusal(&e) {
                    return Err(refused);
                }
                tracing::warn!("consume: {e}");
                break;
            }
            None => break,
        }
        timeout = Duration::ZERO;
    }
    Ok(batch)
}
