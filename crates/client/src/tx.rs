//! 2PC transactions through the coordinator: checking them before anything is
//! written, sending them, and asking for their state.

use std::collections::HashSet;
use std::time::Duration;

use esk_domain::{EventData, Registry};
use esk_wire::StreamName;
use esk_wire::limits::{self, MAX_PARTICIPANTS, MAX_TX_COMMAND_BYTES, MAX_TXID_BYTES};
use esk_wire::partition::partition_for;
use esk_wire::protocol::{Participant, Reply, ReplyOutcome, TxRequest, TxStatus};
use rdkafka::producer::FutureRecord;
use tokio::sync::oneshot;

use crate::{Client, ClientError, outcome_error};
/// The votes deadline a transaction may ask for.
pub const TIMEOUT_RANGE_MS: std::ops::RangeInclusive<u64> = 100..=300_000;

/// Checks a transaction without any state: txid, participants, and with
/// `aggregates` their categories and commands too: a category must have an
/// aggregate there, or be one that `elsewhere` says another context's
/// writers serve (they check its commands when they vote). The coordinator
/// checks the same, with the aggregates it runs and the registry of
/// contexts, before writing anything; a client that knows neither passes
/// `None`.
pub fn validate(
    txid: &str,
    participants: &[Participant],
    timeout_ms: u64,
    aggregates: Option<&Registry>,
    elsewhere: &dyn Fn(&str) -> bool,
) -> Result<(), String> {
    if txid.is_empty()
        || txid.len() > MAX_TXID_BYTES
        || !txid.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err(format!(
            "txid '{}' must be 1 to {MAX_TXID_BYTES} letters, digits, '-', '_', '.' or ':'",
            limits::shorten(txid, 120)
        ));
    }
    if participants.is_empty() {
        return Err("a transaction needs at least one participant".into());
    }
    if participants.len() > MAX_PARTICIPANTS {
        return Err(format!("{} participants; at most {MAX_PARTICIPANTS}", participants.len()));
    }
    if !TIMEOUT_RANGE_MS.contains(&timeout_ms) {
        return Err(format!(
            "timeout {timeout_ms} ms is out of range {}..={} ms",
            TIMEOUT_RANGE_MS.start(),
            TIMEOUT_RANGE_MS.end()
        ));
    }
    let mut seen = HashSet::new();
    for p in participants {
        let stream = StreamName::parse(&p.stream).map_err(|e| e.to_string())?;
        if !seen.insert(p.stream.as_str()) {
            return Err(format!("stream {} appears twice in the transaction", p.stream));
        }
        let size = serde_json::to_vec(&p.command.data).map_or(usize::MAX, |v| v.len());
        if size > MAX_TX_COMMAND_BYTES || p.command.command_type.len() > limits::MAX_TYPE_BYTES {
            return Err(format!(
                "{}: the command's data is {size} bytes; the limit in a transaction is {MAX_TX_COMMAND_BYTES}",
                p.stream
            ));
        }
        let Some(aggregates) = aggregates else { continue };
        let Some(aggregate) = aggregates.get(stream.category()) else {
            if elsewhere(stream.category()) {
                continue;
            }
            return Err(format!(
                "unknown category '{}' in {}: no aggregate takes part in transactions (known: {}; and those of the \
                 contexts that claimed categories: `esk contexts`)",
                stream.category(),
                p.stream,
                aggregates.categories().collect::<Vec<_>>().join(", ")
            ));
        };
        let command = EventData { event_type: p.command.command_type.clone(), data: p.command.data.clone() };
        aggregate.validate_for_transaction(&command).map_err(|e| format!("{}: {e}", p.stream))?;
    }
    Ok(())
}

impl Client {
    async fn tx_request(&self, request: TxRequest, wait: Duration) -> Result<TxStatus, ClientError> {
        let txid = request.txid().to_owned();
        let attempt = request.attempt().unwrap_or(&txid).to_owned();
        let payload = serde_json::to_vec(&request).map_err(|e| ClientError::Invalid(e.to_string()))?;
        self.check_size("transaction", &payload)?;
        let (tx, rx) = oneshot::channel::<Reply>();
        self.pending
            .lock()
            .expect("pending lock")
            .insert(attempt.clone(), crate::Waiting { request_id: txid.clone(), tx });
        let forget = crate::Forget { pending: self.pending.clone(), attempt };
        let topic = self.topics.tx_requests();
        let record = FutureRecord::to(&topic)
            .partition(partition_for(txid.as_bytes(), self.tx_partitions))
            .key(&txid)
            .payload(&payload);
        let sent = self.producer.send(record, self.config.timeout).await;
        let outcome = match sent {
            Err((e, _)) => Err(crate::send_error(&topic, e)),
            Ok(_) => match tokio::time::timeout(wait, rx).await {
                Ok(Ok(reply)) => match reply.outcome {
                    ReplyOutcome::Tx(status) => Ok(status),
                    other => Err(outcome_error(other)),
                },
                Ok(Err(_)) => Err(ClientError::Internal("the reply reader stopped".into())),
                Err(_) => Err(ClientError::Unavailable(format!(
                    "no outcome for transaction {txid} within {wait:?} (is esk-coordinator running?); \
                     ask again with `esk tx status {txid}`, or retry with the same txid"
                ))),
            },
        };
        drop(forget);
        outcome
    }

    /// Runs a transaction and waits for its outcome (up to its timeout and the
    /// client's). The same txid again is safe: it answers with the first outcome.
    pub async fn transact(
        &self,
        txid: &str,
        participants: Vec<Participant>,
        timeout: Duration,
    ) -> Result<TxStatus, ClientError> {
        let request = TxRequest::Begin {
            txid: txid.to_owned(),
            participants,
            timeout_ms: timeout.as_millis() as u64,
            reply_partition: self.reply_partition,
            attempt: Some(uuid::Uuid::new_v4().simple().to_string()),
            sent_ms: limits::uuid_v7_ms(txid).is_none().then(crate::now_ms),
        };
        self.tx_request(request, timeout + self.config.timeout).await
    }

    /// A transaction's state.
    pub async fn tx_status(&self, txid: &str) -> Result<TxStatus, ClientError> {
        let request = TxRequest::Status {
            txid: txid.to_owned(),
            reply_partition: self.reply_partition,
            attempt: Some(uuid::Uuid::new_v4().simple().to_string()),
        };
        self.tx_request(request, self.config.timeout).await
    }
}

#[cfg(test)]
mod tests {
    use esk_wire::protocol::CommandData;
    use serde_json::json;

    use super::*;

    fn leg(stream: &str, command: &str, data: serde_json::Value) -> Participant {
        Participant { stream: stream.into(), command: CommandData { command_type: command.into(), data } }
    }

    #[test]
    fn categories_are_checked_only_against_the_aggregates_given() {
        let legs = [leg("order-1", "Reserve", json!({})), leg("account-1", "Withdraw", json!({"amount": 5}))];
        let builtin = Registry::builtin();
        let nowhere = |_: &str| false;
        let known = validate("t1", &legs, 5_000, Some(&builtin), &nowhere).unwrap_err();
        assert!(known.contains("unknown category 'order'"), "{known}");
        validate("t1", &legs, 5_000, None, &nowhere).unwrap();
        // A category another context serves is that context's writers' to check.
        validate("t1", &legs, 5_000, Some(&builtin), &|c| c == "order").unwrap();
        let bad_leg = [leg("order-1", "Reserve", json!({})), leg("account-1", "Withdraw", json!({"amount": -5}))];
        assert!(validate("t1", &bad_leg, 5_000, Some(&builtin), &|c| c == "order").is_err(), "ours still checked");
        // What needs no aggregate is checked either way.
        let twice = [leg("order-1", "A", json!({})), leg("order-1", "B", json!({}))];
        assert!(validate("t1", &twice, 5_000, None, &nowhere).unwrap_err().contains("appears twice"));
        let big = [leg("order-1", "A", json!({"x": "y".repeat(MAX_TX_COMMAND_BYTES)}))];
        assert!(validate("t1", &big, 5_000, None, &nowhere).unwrap_err().contains("the limit in a transaction"));
        assert!(validate("has space", &legs, 5_000, None, &nowhere).unwrap_err().contains("txid"));
    }
}
