//! Errors of the Kafka adapters, classified for the caller's retry decision.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cluster could not be reached or did not answer in time: transient.
    #[error("Kafka unavailable at {bootstrap}: {reason}")]
    Unavailable { bootstrap: String, reason: String },
    /// The request itself is wrong (bad config, conflicting topic layout): permanent.
    #[error("{0}")]
    Invalid(String),
    /// Kafka refused or failed the operation for another reason.
    #[error("Kafka error: {0}")]
    Kafka(#[from] KafkaError),
}

impl Error {
    /// Whether retrying the same request later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unavailable { .. } => true,
            Error::Invalid(_) => false,
            Error::Kafka(e) => is_transient_code(e.rdkafka_error_code()),
        }
    }
}

/// Error codes that mean "the cluster is not (yet) able to answer", not "you asked wrongly".
pub fn is_transient_code(code: Option<RDKafkaErrorCode>) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        Some(
            BrokerTransportFailure
                | AllBrokersDown
                | OperationTimedOut
                | RequestTimedOut
                | NetworkException
                | LeaderNotAvailable
                | NotLeaderForPartition
                | NotController
                | CoordinatorNotAvailable
                | NotCoordinator
                | CoordinatorLoadInProgress
                | NotEnoughReplicas
                | NotEnoughReplicasAfterAppend
                | Resolve
        )
    )
}

/// Whether an error refuses a record for what it is (too large, invalid):
/// retrying the same record cannot help.
pub fn refuses_the_record(e: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        e.rdkafka_error_code(),
        Some(
            MessageSizeTooLarge
                | MessageBatchTooLarge
                | InvalidRecord
                | InvalidMessage
                | InvalidMessageSize
                | BadMessage
        )
    )
}
