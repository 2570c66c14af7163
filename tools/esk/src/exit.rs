//! Exit codes (DESIGN section 8) and how failures are reported.

use std::fmt::Display;
use std::process::ExitCode;

use serde_json::json;

/// Why a command failed; each kind has its documented exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 1: a bug or an unexpected state; the message says what.
    Internal,
    /// 2: the command line is wrong.
    Usage,
    /// 3: the stream is not at the expected version.
    WrongExpectedVersion,
    /// 4: bad input (JSON, schema, stream name, type); nothing was written.
    InvalidInput,
    /// 5: Kafka or a service is unreachable or did not answer in time.
    Unavailable,
    /// 6: a transaction was aborted.
    Aborted,
    /// 7: the domain refused the command.
    Refused,
    /// 4: the request is older than the idempotency horizon and not
    /// remembered (it may have been applied); nothing was written.
    Expired,
}

impl Kind {
    pub fn exit_code(self) -> u8 {
        match self {
            Kind::Internal => 1,
            Kind::Usage => 2,
            Kind::WrongExpectedVersion => 3,
            Kind::InvalidInput | Kind::Expired => 4,
            Kind::Unavailable => 5,
            Kind::Aborted => 6,
            Kind::Refused => 7,
        }
    }

    /// The machine-readable name in `{"error": ...}`.
    pub fn code(self) -> &'static str {
        match self {
            Kind::Internal => "internal",
            Kind::Usage => "usage",
            Kind::WrongExpectedVersion => "wrong_expected_version",
            Kind::InvalidInput => "invalid_input",
            Kind::Unavailable => "unavailable",
            Kind::Aborted => "aborted",
            Kind::Refused => "domain_refused",
            Kind::Expired => "request_expired",
        }
    }
}

/// A failed command: its kind and a message that names what was wrong.
#[derive(Debug)]
pub struct Failure {
    pub kind: Kind,
    pub message: String,
    /// Extra fields for the JSON error document (e.g. the actual version).
    pub details: serde_json::Map<String, serde_json::Value>,
    /// The command already printed its JSON document (with the failures in it).
    pub json_printed: bool,
}

impl Failure {
    pub fn new(kind: Kind, message: impl Display) -> Self {
        Self { kind, message: message.to_string(), details: serde_json::Map::new(), json_printed: false }
    }

    pub fn invalid(message: impl Display) -> Self {
        Self::new(Kind::InvalidInput, message)
    }

    pub fn unavailable(message: impl Display) -> Self {
        Self::new(Kind::Unavailable, message)
    }

    pub fn report(self, json: bool) -> ExitCode {
        eprintln!("esk: {}", self.message);
        if json && !self.json_printed {
            let mut doc = self.details;
            doc.insert("error".into(), self.kind.code().into());
            doc.insert("message".into(), self.message.into());
            println!("{}", serde_json::Value::Object(doc));
        }
        ExitCode::from(self.kind.exit_code())
    }
}

impl From<esk_kafka::Error> for Failure {
    fn from(e: esk_kafka::Error) -> Self {
        match e {
            esk_kafka::Error::Invalid(m) => Failure::invalid(m),
            // Refused credentials, a missing ACL: exit 5, the message naming which.
            e @ (esk_kafka::Error::Authentication(_) | esk_kafka::Error::Authorization(_)) => Failure::unavailable(e),
            e if e.is_transient() => Failure::unavailable(e),
            e => Failure::new(Kind::Internal, e),
        }
    }
}

impl From<esk_client::ClientError> for Failure {
    fn from(e: esk_client::ClientError) -> Self {
        use esk_client::ClientError as E;
        match e {
            E::WrongExpectedVersion { message, actual } => {
                let mut f = Failure::new(Kind::WrongExpectedVersion, message);
                f.details.insert("actual_version".into(), actual.into());
                f
            }
            E::Invalid(m) => Failure::invalid(m),
            E::Refused(m) => Failure::new(Kind::Refused, m),
            E::Unavailable(m) => Failure::unavailable(m),
            E::Internal(m) => Failure::new(Kind::Internal, m),
            E::Expired(m) => Failure::new(Kind::Expired, m),
        }
    }
}

/// Reports a command-line parse error: help and version go to stdout with exit 0,
/// real errors exit 2.
pub fn usage(e: &clap::Error, json: bool) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let _ = e.print();
    if json {
        let first = e.to_string().lines().next().unwrap_or_default().to_owned();
        println!("{}", json!({"error": Kind::Usage.code(), "message": first}));
    }
    ExitCode::from(Kind::Usage.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_design() {
        let all = [
            (Kind::Internal, 1, "internal"),
            (Kind::Usage, 2, "usage"),
            (Kind::WrongExpectedVersion, 3, "wrong_expected_version"),
            (Kind::InvalidInput, 4, "invalid_input"),
            (Kind::Unavailable, 5, "unavailable"),
            (Kind::Aborted, 6, "aborted"),
            (Kind::Refused, 7, "domain_refused"),
            (Kind::Expired, 4, "request_expired"),
        ];
        for (kind, code, name) in all {
            assert_eq!((kind.exit_code(), kind.code()), (code, name));
        }
    }
}
