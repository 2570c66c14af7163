//! Errors as RFC 9457 problem details (`application/problem+json`), one
//! stable `type` per error class, with the status and the CLI's exit code
//! the class stands for.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use esk_client::ClientError;
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// The classes of error: each a stable `type` URI, a status and a title.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The input is invalid; nothing was written (CLI exit 4).
    InvalidInput,
    /// The request needs the admin token (or the API token).
    Unauthorized,
    NotFound,
    MethodNotAllowed,
    /// The stream is not at the expected version; nothing was written (exit 3).
    WrongExpectedVersion,
    /// The request is older than the idempotency horizon (exit 4).
    RequestExpired,
    /// The transaction aborted: nothing of it was written (exit 6).
    TransactionAborted,
    /// The body is over the limit (exit 4).
    PayloadTooLarge,
    UnsupportedMediaType,
    /// The domain refused the command; nothing was written (exit 7).
    DomainRefused,
    /// Not the caller's fault (exit 1).
    Internal,
    /// Kafka, a writer or the coordinator did not answer (exit 5): retrying
    /// with the same Idempotency-Key is safe.
    Unavailable,
    /// A wait for a position or an outcome ran out.
    Timeout,
}

impl Class {
    pub fn slug(self) -> &'static str {
        match self {
            Class::InvalidInput => "invalid-input",
            Class::Unauthorized => "unauthorized",
            Class::NotFound => "not-found",
            Class::MethodNotAllowed => "method-not-allowed",
            Class::WrongExpectedVersion => "wrong-expected-version",
            Class::RequestExpired => "request-expired",
            Class::TransactionAborted => "transaction-aborted",
            Class::PayloadTooLarge => "payload-too-large",
            Class::UnsupportedMediaType => "unsupported-media-type",
            Class::DomainRefused => "domain-refused",
            Class::Internal => "internal",
            Class::Unavailable => "unavailable",
            Class::Timeout => "timeout",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Class::InvalidInput => StatusCode::BAD_REQUEST,
            Class::Unauthorized => StatusCode::UNAUTHORIZED,
            Class::NotFound => StatusCode::NOT_FOUND,
            Class::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Class::WrongExpectedVersion | Class::RequestExpired | Class::TransactionAborted => StatusCode::CONFLICT,
            Class::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Class::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Class::DomainRefused => StatusCode::UNPROCESSABLE_ENTITY,
            Class::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Class::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Class::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Class::InvalidInput => "The request is invalid; nothing was written",
            Class::Unauthorized => "This request needs a bearer token",
            Class::NotFound => "Not found",
            Class::MethodNotAllowed => "Method not allowed",
            Class::WrongExpectedVersion => "The stream is not at the expected version; nothing was written",
            Class::RequestExpired => "The request is older than the idempotency horizon; nothing was written now",
            Class::TransactionAborted => "The transaction aborted; none of it was written",
            Class::PayloadTooLarge => "The request is over the size limit; nothing was written",
            Class::UnsupportedMediaType => "The body must be application/json",
            Class::DomainRefused => "The domain refused the command; nothing was written",
            Class::Internal => "Internal error",
            Class::Unavailable => "Unavailable: retrying with the same Idempotency-Key is safe",
            Class::Timeout => "Timed out",
        }
    }

    /// `urn:esk:problem:<slug>`.
    pub fn uri(self) -> &'static str {
        match self {
            Class::InvalidInput => "urn:esk:problem:invalid-input",
            Class::Unauthorized => "urn:esk:problem:unauthorized",
            Class::NotFound => "urn:esk:problem:not-found",
            Class::MethodNotAllowed => "urn:esk:problem:method-not-allowed",
            Class::WrongExpectedVersion => "urn:esk:problem:wrong-expected-version",
            Class::RequestExpired => "urn:esk:problem:request-expired",
            Class::TransactionAborted => "urn:esk:problem:transaction-aborted",
            Class::PayloadTooLarge => "urn:esk:problem:payload-too-large",
            Class::UnsupportedMediaType => "urn:esk:problem:unsupported-media-type",
            Class::DomainRefused => "urn:esk:problem:domain-refused",
            Class::Internal => "urn:esk:problem:internal",
            Class::Unavailable => "urn:esk:problem:unavailable",
            Class::Timeout => "urn:esk:problem:timeout",
        }
    }

    /// Every class, for the documentation and tests.
    pub const ALL: [Class; 13] = [
        Class::InvalidInput,
        Class::Unauthorized,
        Class::NotFound,
        Class::MethodNotAllowed,
        Class::WrongExpectedVersion,
        Class::RequestExpired,
        Class::TransactionAborted,
        Class::PayloadTooLarge,
        Class::UnsupportedMediaType,
        Class::DomainRefused,
        Class::Internal,
        Class::Unavailable,
        Class::Timeout,
    ];
}

/// An RFC 9457 problem: `type`, `title`, `status`, `detail`, and the class's
/// own members (`actual_version`, `transaction`, ...).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// `urn:esk:problem:<class>`, stable per class.
    #[serde(rename = "type")]
    pub problem_type: &'static str,
    pub title: &'static str,
    pub status: u16,
    /// What was wrong, for a person.
    pub detail: String,
    /// For wrong-expected-version: the stream's version now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_version: Option<u64>,
    /// For transaction-aborted: the transaction's state with every vote.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub transaction: Option<Box<Value>>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub extra: Option<Box<Map<String, Value>>>,
    #[serde(skip)]
    #[schema(ignore)]
    class: Option<Class>,
}

impl Problem {
    pub fn new(class: Class, detail: impl Into<String>) -> Self {
        Self {
            problem_type: class.uri(),
            title: class.title(),
            status: class.status().as_u16(),
            detail: detail.into(),
            actual_version: None,
            transaction: None,
            extra: None,
            class: Some(class),
        }
    }

    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(Class::InvalidInput, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(Class::NotFound, detail)
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(Class::Unavailable, detail)
    }

    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(Class::Internal, detail)
    }

    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.extra.get_or_insert_with(Default::default).insert(key.to_owned(), value);
        self
    }

    pub fn class(&self) -> Option<Class> {
        self.class
    }
}

impl From<ClientError> for Problem {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::WrongExpectedVersion { message, actual } => {
                let mut p = Problem::new(Class::WrongExpectedVersion, message);
                p.actual_version = Some(actual);
                p
            }
            ClientError::Invalid(m) => Problem::new(Class::InvalidInput, m),
            ClientError::Refused(m) => Problem::new(Class::DomainRefused, m),
            ClientError::Unavailable(m) => Problem::new(Class::Unavailable, m),
            ClientError::Internal(m) => Problem::new(Class::Internal, m),
            ClientError::Expired(m) => Problem::new(Class::RequestExpired, m),
        }
    }
}

pub const PROBLEM_JSON: &str = "application/problem+json";

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if let Some(class) = self.class {
            metrics::counter!("esk_gateway_problems_total", "type" => class.slug()).increment(1);
        }
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_has_its_own_type_and_an_error_status() {
        let mut seen = std::collections::HashSet::new();
        for c in Class::ALL {
            assert!(seen.insert(c.uri()), "{c:?}");
            assert_eq!(c.uri(), format!("urn:esk:problem:{}", c.slug()));
            assert!(c.status().is_client_error() || c.status().is_server_error(), "{c:?}");
        }
    }

    #[test]
    fn client_errors_keep_their_meaning() {
        let p = Problem::from(ClientError::WrongExpectedVersion { message: "at 3".into(), actual: 3 });
        assert_eq!((p.status, p.actual_version), (409, Some(3)));
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["type"], "urn:esk:problem:wrong-expected-version");
        assert_eq!(v["actual_version"], 3);
        assert_eq!(Problem::from(ClientError::Refused("no".into())).status, 422);
        assert_eq!(Problem::from(ClientError::Unavailable("down".into())).status, 503);
        assert_eq!(Problem::from(ClientError::Invalid("bad".into())).status, 400);
        assert_eq!(Problem::from(ClientError::Expired("old".into())).problem_type, "urn:esk:problem:request-expired");
    }
}
