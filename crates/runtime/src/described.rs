//! Every metric esk's services record, with its unit and help text: the
//! `# HELP` and `# TYPE` lines of `/metrics`. A test checks that every
//! metric named in the workspace's code is here.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// (name, kind, unit, help).
pub const METRICS: &[(&str, Kind, Unit, &str)] = &[
    ("esk_build_info", Kind::Gauge, Unit::Count, "1, labelled with the service and its version"),
    (
        "esk_http_refused_connections_total",
        Kind::Counter,
        Unit::Count,
        "HTTP connections refused over --http-max-connections",
    ),
    ("esk_http_unauthorized_total", Kind::Counter, Unit::Count, "HTTP requests refused without the admin token"),
    (
        "esk_refused_records_total",
        Kind::Counter,
        Unit::Count,
        "records of an internal topic refused on read (forged or malformed), by topic",
    ),
    (
        "esk_gateway_problems_total",
        Kind::Counter,
        Unit::Count,
        "gateway answers that were problems (application/problem+json), by type",
    ),
    ("esk_gateway_subscriptions", Kind::Gauge, Unit::Count, "subscriptions the gateway serves now"),
    (
        "esk_gateway_subscriptions_refused_total",
        Kind::Counter,
        Unit::Count,
        "subscriptions refused over --max-subscriptions",
    ),
    ("esk_gateway_subscription_events_total", Kind::Counter, Unit::Count, "events sent to subscriptions"),
    (
        "esk_gateway_subscription_skipped_total",
        Kind::Counter,
        Unit::Count,
        "records of an events topic that were not esk events, skipped by subscriptions",
    ),
    ("esk_writer_partitions", Kind::Gauge, Unit::Count, "partitions this writer owns"),
    (
        "esk_owner_unknown_shards_total",
        Kind::Counter,
        Unit::Count,
        "shards assigned that the shards topic did not have when the instance started (not served)",
    ),
    ("esk_writer_batches_total", Kind::Counter, Unit::Count, "Kafka transactions committed by the writer"),
    ("esk_writer_records_total", Kind::Counter, Unit::Count, "requests decided by the writer"),
    ("esk_writer_events_total", Kind::Counter, Unit::Count, "events appended by the writer"),
    ("esk_writer_aborts_total", Kind::Counter, Unit::Count, "writer transactions aborted (and retried)"),
    ("esk_writer_fenced_total", Kind::Counter, Unit::Count, "partitions this writer lost to a newer owner"),
    (
        "esk_writer_dead_letters_total",
        Kind::Counter,
        Unit::Count,
        "input records the writer parked in its dead-letter topic",
    ),
    ("esk_writer_refused_inputs_total", Kind::Counter, Unit::Count, "requests refused as invalid"),
    (
        "esk_writer_expired_requests_total",
        Kind::Counter,
        Unit::Count,
        "retries refused as older than the idempotency horizon",
    ),
    ("esk_writer_retries_answered_total", Kind::Counter, Unit::Count, "retries answered with their first result"),
    ("esk_writer_answers_remembered_total", Kind::Counter, Unit::Count, "answers written to the answers topic"),
    (
        "esk_writer_hold_asks_total",
        Kind::Counter,
        Unit::Count,
        "2PC holds past their deadline asked about at the coordinator",
    ),
    (
        "esk_writer_offset_mispredictions_total",
        Kind::Counter,
        Unit::Count,
        "batches whose predicted event offsets were wrong (answered after a re-read)",
    ),
    ("esk_writer_cached_streams", Kind::Gauge, Unit::Count, "stream records held in the writer's memory cache"),
    ("esk_writer_open_holds", Kind::Gauge, Unit::Count, "2PC holds open on the writer's streams"),
    ("esk_writer_store_bytes", Kind::Gauge, Unit::Bytes, "size of the writer's local store on disk"),
    ("esk_writer_batch_records", Kind::Histogram, Unit::Count, "requests decided per writer transaction"),
    ("esk_writer_batch_partitions", Kind::Histogram, Unit::Count, "partitions written per writer transaction"),
    (
        "esk_writer_transaction_seconds",
        Kind::Histogram,
        Unit::Seconds,
        "time of one writer transaction, begin to commit",
    ),
    ("esk_writer_restore_seconds", Kind::Histogram, Unit::Seconds, "time to restore a partition on takeover"),
    (
        "esk_writer_linger_seconds",
        Kind::Histogram,
        Unit::Seconds,
        "time a shard waited after a commit before its next transaction (commit gap, batch linger)",
    ),
    (
        "esk_coordinator_unlogged_changes_total",
        Kind::Counter,
        Unit::Count,
        "partial votes and acknowledgements kept in memory, logged with their transaction's next change",
    ),
    ("esk_coordinator_open_transactions", Kind::Gauge, Unit::Count, "2PC transactions open"),
    (
        "esk_coordinator_in_doubt_transactions",
        Kind::Gauge,
        Unit::Count,
        "2PC transactions decided but not yet acknowledged by every participant",
    ),
    ("esk_coordinator_decisions_total", Kind::Counter, Unit::Count, "2PC decisions taken, by outcome"),
    (
        "esk_coordinator_aborts_total",
        Kind::Counter,
        Unit::Count,
        "coordinator Kafka transactions aborted (and retried)",
    ),
    ("esk_coordinator_fenced_total", Kind::Counter, Unit::Count, "partitions this coordinator lost to a newer owner"),
    ("esk_coordinator_dead_letters_total", Kind::Counter, Unit::Count, "input records the coordinator parked"),
    ("esk_coordinator_refused_inputs_total", Kind::Counter, Unit::Count, "transaction requests refused as invalid"),
    (
        "esk_coordinator_refused_passed_total",
        Kind::Counter,
        Unit::Count,
        "inputs refused already, read again below a vote held in memory and passed over",
    ),
    (
        "esk_coordinator_refused_remembered",
        Kind::Gauge,
        Unit::Count,
        "refused inputs remembered until the partition's position passes them (at most until the held vote's deadline)",
    ),
    (
        "esk_coordinator_expired_requests_total",
        Kind::Counter,
        Unit::Count,
        "retries refused as older than the idempotency horizon",
    ),
    ("esk_coordinator_tombstones_total", Kind::Counter, Unit::Count, "ended transactions tombstoned after the horizon"),
    (
        "esk_coordinator_decision_seconds",
        Kind::Histogram,
        Unit::Seconds,
        "time from a transaction's request to its decision",
    ),
    (
        "esk_coordinator_transaction_seconds",
        Kind::Histogram,
        Unit::Seconds,
        "time of one coordinator Kafka transaction",
    ),
    (
        "esk_coordinator_restore_seconds",
        Kind::Histogram,
        Unit::Seconds,
        "time to restore a partition's live transactions on takeover",
    ),
    ("esk_projection_applied_total", Kind::Counter, Unit::Count, "events applied to a read model, by projection"),
    ("esk_projection_parked_total", Kind::Counter, Unit::Count, "events parked in a projection's dead-letter topic"),
    ("esk_projection_retries_total", Kind::Counter, Unit::Count, "batches a projection tried again after a failure"),
    (
        "esk_projection_batches_redone_total",
        Kind::Counter,
        Unit::Count,
        "batches applied again with a savepoint per event because the projection refused one of them",
    ),
    (
        "esk_projection_lag_records",
        Kind::Gauge,
        Unit::Count,
        "records of a category partition not yet applied, sampled",
    ),
    (
        "esk_projection_lag_ms",
        Kind::Gauge,
        Unit::Milliseconds,
        "0 when a category partition is caught up, else the age of the last event the projection applied from it, sampled",
    ),
    (
        "esk_projection_skipped_total",
        Kind::Counter,
        Unit::Count,
        "records polled again below a projection's checkpoint (after a rebalance's seek) and passed over",
    ),
    ("esk_projection_batch_seconds", Kind::Histogram, Unit::Seconds, "time to apply and commit one projection batch"),
    (
        "esk_contexts_ignored_records_total",
        Kind::Counter,
        Unit::Count,
        "records of the registry of contexts that were not valid claims (ignored)",
    ),
    ("esk_process_outbox", Kind::Gauge, Unit::Count, "commands of a process manager waiting for their answers"),
    ("esk_process_deadlines", Kind::Gauge, Unit::Count, "deadlines a process manager has set and not yet passed"),
    ("esk_process_processes", Kind::Gauge, Unit::Count, "processes a process manager's store holds"),
    (
        "esk_process_forgotten_total",
        Kind::Counter,
        Unit::Count,
        "finished processes removed from a process manager's store after 7 days",
    ),
    (
        "esk_process_answers_total",
        Kind::Counter,
        Unit::Count,
        "answers to a process manager's commands, by outcome (done, refused, invalid, wrong_expected_version, expired)",
    ),
    (
        "esk_process_retries_total",
        Kind::Counter,
        Unit::Count,
        "a process manager's commands sent again after no answer (Kafka or the writer unreachable)",
    ),
    (
        "esk_process_refused_reactions_total",
        Kind::Counter,
        Unit::Count,
        "reactions to answers or deadlines whose effects were refused (a step name used twice, a bad stream name)",
    ),
    (
        "esk_replica_lag_records",
        Kind::Gauge,
        Unit::Count,
        "records of the state topic not yet applied by the replica, sampled",
    ),
    (
        "esk_replica_lag_ms",
        Kind::Gauge,
        Unit::Milliseconds,
        "age of the oldest record the replica has not applied, sampled",
    ),
    (
        "esk_sample_age_seconds",
        Kind::Gauge,
        Unit::Seconds,
        "age of the last sample of a value /status and /ready serve, by sample",
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Describes every metric and sets `esk_build_info` for `service`.
pub fn describe(service: &str) {
    for (name, kind, unit, help) in METRICS {
        match kind {
            Kind::Counter => describe_counter!(*name, *unit, *help),
            Kind::Gauge => describe_gauge!(*name, *unit, *help),
            Kind::Histogram => describe_histogram!(*name, *unit, *help),
        }
    }
    metrics::gauge!("esk_build_info", "service" => service.to_owned(), "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    use super::*;

    fn names_in(dir: &Path, found: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                if !path.ends_with("target") {
                    names_in(&path, found);
                }
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for macro_ in ["counter!(", "gauge!(", "histogram!("] {
                    for (i, _) in text.match_indices(macro_) {
                        let rest = text[i + macro_.len()..].trim_start();
                        if let Some(name) = rest.strip_prefix('"').and_then(|r| r.split('"').next())
                            && name.starts_with("esk_")
                        {
                            found.insert(name.to_owned());
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_metric_in_the_code_is_described_once() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut used = BTreeSet::new();
        for dir in ["crates", "services", "tools"] {
            names_in(&root.join(dir), &mut used);
        }
        let described: BTreeSet<String> = METRICS.iter().map(|m| m.0.to_owned()).collect();
        assert_eq!(described.len(), METRICS.len(), "a metric is described twice");
        let missing: Vec<_> = used.difference(&described).collect();
        assert!(missing.is_empty(), "metrics without a description: {missing:?}");
        assert!(used.len() > 30, "the scan found too few metrics: {used:?}");
    }
}
