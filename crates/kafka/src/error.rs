//! Errors of the Kafka adapters, classified for the caller's retry decision.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The cluster could not be reached or did not answer in time: transient.
    #[error("Kafka unavailable at {bootstrap}: {reason}")]
    Unavailable { bootstrap: String, reason: String },
    /// The request itself is wrong (bad config, conflicting topic layout): permanent.
    #[error("{0}")]
    Invalid(String),
    /// The brokers refused this client's credentials (SASL, TLS): permanent
    /// until the client properties change.
    #[error("Kafka authentication failed: {0} (check sasl.username, sasl.password and sasl.mechanism)")]
    Authentication(String),
    /// The principal has no ACL for what it asked (a topic, a group, a
    /// transactional id, the cluster): permanent until an ACL is added.
    #[error("Kafka authorization failed: {0} (an ACL is missing: `esk acls` lists what each role needs)")]
    Authorization(String),
    /// Kafka refused or failed the operation for another reason.
    #[error("Kafka error: {0}")]
    Kafka(KafkaError),
}

impl From<KafkaError> for Error {
    /// Refused credentials and missing ACLs get variants of their own, so a
    /// caller names the cause instead of retrying or timing out.
    fn from(e: KafkaError) -> Self {
        let code = e.rdkafka_error_code();
        if is_authentication_code(code) {
            Error::Authentication(e.to_string())
        } else if is_authorization_code(code) {
            Error::Authorization(e.to_string())
        } else {
            Error::Kafka(e)
        }
    }
}

impl Error {
    /// `e` as [`Error::Authentication`] or [`Error::Authorization`] if it is a
    /// refusal by the brokers: what a loop that retries consumer errors
    /// should stop on, since no retry mends it.
    pub fn refusal(e: &KafkaError) -> Option<Self> {
        Some(Self::from(e.clone())).filter(Self::is_refusal)
    }

    /// Whether the brokers refused the credentials or an ACL is missing.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Error::Authentication(_) | Error::Authorization(_))
    }

    /// Whether retrying the same request later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unavailable { .. } => true,
            Error::Invalid(_) | Error::Authentication(_) | Error::Authorization(_) => false,
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

/// Codes that mean the brokers refused the client's credentials.
pub fn is_authentication_code(code: Option<RDKafkaErrorCode>) -> bool {
    use RDKafkaErrorCode::*;
    matches!(code, Some(Authentication | SaslAuthenticationFailed))
}

/// Codes that mean the principal lacks an ACL.
pub fn is_authorization_code(code: Option<RDKafkaErrorCode>) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        Some(
            TopicAuthorizationFailed
                | GroupAuthorizationFailed
                | ClusterAuthorizationFailed
                | TransactionalIdAuthorizationFailed
                | DelegationTokenAuthorizationFailed
        )
    )
}

/// [`Error::Authorization`] if the metadata answer about `topic` says the
/// principal may not describe it (a missing ACL, not a missing topic).
pub fn topic_refused(md: &rdkafka::metadata::Metadata, topic: &str) -> Option<Error> {
    let code = md.topics().first().and_then(|t| t.error()).map(RDKafkaErrorCode::from)?;
    is_authorization_code(Some(code)).then(|| topic_error(topic, code))
}

/// A topic's error in a metadata answer, as an [`Error`]: a missing ACL is
/// [`Error::Authorization`], naming the topic.
pub fn topic_error(topic: &str, code: RDKafkaErrorCode) -> Error {
    if is_authorization_code(Some(code)) {
        Error::Authorization(format!("topic {topic}: {code}"))
    } else {
        Error::Kafka(KafkaError::MetadataFetch(code))
    }
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
