//! The CloudEvents 1.0 envelope in the Kafka protocol binding, binary content mode.
//!
//! The Kafka value is the event's JSON data; the attributes travel as headers:
//! `ce_specversion`, `ce_id`, `ce_source`, `ce_type`, `ce_time` (RFC 3339),
//! `ce_subject` (the stream), `content-type: application/json`, and esk's
//! extensions `ce_streamversion`, `ce_correlationid`, `ce_causationid`,
//! `ce_dataschema`. Any CloudEvents SDK or plain Kafka tool can read them.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;

use crate::stream::{StreamName, StreamNameError};

pub const SPEC_VERSION: &str = "1.0";
pub const CONTENT_TYPE: &str = "application/json";

pub const H_SPECVERSION: &str = "ce_specversion";
pub const H_ID: &str = "ce_id";
pub const H_SOURCE: &str = "ce_source";
pub const H_TYPE: &str = "ce_type";
pub const H_TIME: &str = "ce_time";
pub const H_SUBJECT: &str = "ce_subject";
pub const H_STREAMVERSION: &str = "ce_streamversion";
pub const H_CORRELATIONID: &str = "ce_correlationid";
pub const H_CAUSATIONID: &str = "ce_causationid";
pub const H_DATASCHEMA: &str = "ce_dataschema";
pub const H_CONTENT_TYPE: &str = "content-type";

/// A Kafka header as the wire sees it: a name and an optional (possibly null) value.
pub type Header = (String, Option<Vec<u8>>);

/// One event of a stream, as stored in `<prefix>.events.<category>`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `ce_id`: unique per event; esk makes UUIDv7s unless the client gives one.
    pub id: String,
    /// `ce_source`: who wrote it (for esk's writer, `esk/writer`).
    pub source: String,
    /// `ce_type`: the event type, e.g. `Deposited`.
    pub event_type: String,
    /// `ce_time`.
    pub time: DateTime<Utc>,
    /// `ce_subject`: the stream the event belongs to.
    pub stream: StreamName,
    /// `ce_streamversion`: 1 for the first event of a stream.
    pub version: u64,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    /// `ce_dataschema`: the schema that validated the data, if the category has one.
    pub data_schema: Option<String>,
    /// The event's JSON data: the Kafka value.
    pub data: Value,
}

/// Why a Kafka record is not an esk event. Decoding never panics on any input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("header {0} is missing")]
    MissingHeader(&'static str),
    #[error("header {0} is not valid UTF-8")]
    NotUtf8(String),
    #[error("header {H_SPECVERSION} is '{0}'; only CloudEvents {SPEC_VERSION} is supported")]
    SpecVersion(String),
    #[error("header {H_TIME} is '{value}', not an RFC 3339 time: {reason}")]
    Time { value: String, reason: String },
    #[error("header {H_SUBJECT}: {0}")]
    Subject(StreamNameError),
    #[error("header {H_STREAMVERSION} is '{0}'; it must be a whole number from 1")]
    StreamVersion(String),
    #[error("content-type is '{0}'; esk events are {CONTENT_TYPE}")]
    ContentType(String),
    #[error("the record has no value (a tombstone); an event needs JSON data")]
    NoValue,
    #[error("the value is not JSON: {0}")]
    Json(String),
}

impl Event {
    /// The Kafka headers of this event, in binary content mode.
    pub fn headers(&self) -> Vec<Header> {
        let mut h: Vec<Header> = vec![
            (H_SPECVERSION.into(), Some(SPEC_VERSION.into())),
            (H_ID.into(), Some(self.id.clone().into_bytes())),
            (H_SOURCE.into(), Some(self.source.clone().into_bytes())),
            (H_TYPE.into(), Some(self.event_type.clone().into_bytes())),
            (H_TIME.into(), Some(format_time(&self.time).into_bytes())),
            (H_SUBJECT.into(), Some(self.stream.as_str().as_bytes().to_vec())),
            (H_STREAMVERSION.into(), Some(self.version.to_string().into_bytes())),
            (H_CONTENT_TYPE.into(), Some(CONTENT_TYPE.into())),
        ];
        let optional = [
            (H_CORRELATIONID, &self.correlation_id),
            (H_CAUSATIONID, &self.causation_id),
            (H_DATASCHEMA, &self.data_schema),
        ];
        for (name, value) in optional {
            if let Some(v) = value {
                h.push((name.into(), Some(v.clone().into_bytes())));
            }
        }
        h
    }

    /// The Kafka value: the data as compact JSON.
    pub fn value(&self) -> Vec<u8> {
        serde_json::to_vec(&self.data).expect("a serde_json::Value always serializes")
    }

    /// Decodes a record's headers and value. Unknown headers are ignored, as
    /// CloudEvents requires; a missing required attribute is an error.
    pub fn decode<'a, I>(headers: I, value: Option<&[u8]>) -> Result<Self, DecodeError>
    where
        I: IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    {
        let mut found = Attributes::default();
        for (name, bytes) in headers {
            let slot = match name {
                H_SPECVERSION => &mut found.specversion,
                H_ID => &mut found.id,
                H_SOURCE => &mut found.source,
                H_TYPE => &mut found.event_type,
                H_TIME => &mut found.time,
                H_SUBJECT => &mut found.subject,
                H_STREAMVERSION => &mut found.streamversion,
                H_CORRELATIONID => &mut found.correlationid,
                H_CAUSATIONID => &mut found.causationid,
                H_DATASCHEMA => &mut found.dataschema,
                H_CONTENT_TYPE => &mut found.content_type,
                _ => continue,
            };
            let Some(bytes) = bytes else { continue };
            *slot = Some(std::str::from_utf8(bytes).map_err(|_| DecodeError::NotUtf8(name.into()))?);
        }
        found.into_event(value)
    }
}

/// The attributes as the headers hold them: borrowed, so that those an event
/// does not keep (spec version, time, stream version, content type) are
/// checked without a copy.
#[derive(Default)]
struct Attributes<'a> {
    specversion: Option<&'a str>,
    id: Option<&'a str>,
    source: Option<&'a str>,
    event_type: Option<&'a str>,
    time: Option<&'a str>,
    subject: Option<&'a str>,
    streamversion: Option<&'a str>,
    correlationid: Option<&'a str>,
    causationid: Option<&'a str>,
    dataschema: Option<&'a str>,
    content_type: Option<&'a str>,
}

impl Attributes<'_> {
    fn into_event(self, value: Option<&[u8]>) -> Result<Event, DecodeError> {
        let spec = self.specversion.ok_or(DecodeError::MissingHeader(H_SPECVERSION))?;
        if spec != SPEC_VERSION {
            return Err(DecodeError::SpecVersion(spec.into()));
        }
        if let Some(ct) = self.content_type {
            // "application/json; charset=utf-8" is the same thing.
            if ct.split(';').next().map(str::trim) != Some(CONTENT_TYPE) {
                return Err(DecodeError::ContentType(ct.into()));
            }
        }
        let time_text = self.time.ok_or(DecodeError::MissingHeader(H_TIME))?;
        let time = DateTime::parse_from_rfc3339(time_text)
            .map_err(|e| DecodeError::Time { value: time_text.into(), reason: e.to_string() })?
            .with_timezone(&Utc);
        let subject = self.subject.ok_or(DecodeError::MissingHeader(H_SUBJECT))?;
        let stream = StreamName::parse(subject).map_err(DecodeError::Subject)?;
        let version_text = self.streamversion.ok_or(DecodeError::MissingHeader(H_STREAMVERSION))?;
        let version = match version_text.parse::<u64>() {
            Ok(v) if v >= 1 => v,
            _ => return Err(DecodeError::StreamVersion(version_text.into())),
        };
        let value = value.ok_or(DecodeError::NoValue)?;
        let data = serde_json::from_slice(value).map_err(|e| DecodeError::Json(e.to_string()))?;
        Ok(Event {
            id: self.id.ok_or(DecodeError::MissingHeader(H_ID))?.into(),
            source: self.source.ok_or(DecodeError::MissingHeader(H_SOURCE))?.into(),
            event_type: self.event_type.ok_or(DecodeError::MissingHeader(H_TYPE))?.into(),
            time,
            stream,
            version,
            correlation_id: self.correlationid.map(Into::into),
            causation_id: self.causationid.map(Into::into),
            data_schema: self.dataschema.map(Into::into),
            data,
        })
    }
}

/// RFC 3339 with microseconds and `Z`, the form esk writes.
pub fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn sample() -> Event {
        Event {
            id: "0190b3b2-7c3e-7000-8000-000000000001".into(),
            source: "esk/writer".into(),
            event_type: "Deposited".into(),
            time: DateTime::parse_from_rfc3339("2026-11-26T10:00:00.123456Z").unwrap().with_timezone(&Utc),
            stream: StreamName::parse("account-42").unwrap(),
            version: 7,
            correlation_id: Some("c-1".into()),
            causation_id: None,
            data_schema: Some("urn:esk:schema:account:Deposited:v1".into()),
            data: json!({"amount": 10}),
        }
    }

    fn decode_owned(headers: &[Header], value: Option<&[u8]>) -> Result<Event, DecodeError> {
        Event::decode(headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())), value)
    }

    #[test]
    fn headers_follow_the_kafka_binding() {
        let e = sample();
        let h = e.headers();
        let get = |n: &str| {
            h.iter().find(|(k, _)| k == n).and_then(|(_, v)| v.clone()).map(|v| String::from_utf8(v).unwrap())
        };
        assert_eq!(get("ce_specversion").as_deref(), Some("1.0"));
        assert_eq!(get("ce_subject").as_deref(), Some("account-42"));
        assert_eq!(get("ce_streamversion").as_deref(), Some("7"));
        assert_eq!(get("ce_time").as_deref(), Some("2026-11-26T10:00:00.123456Z"));
        assert_eq!(get("content-type").as_deref(), Some("application/json"));
        assert_eq!(get("ce_causationid"), None);
        assert_eq!(e.value(), br#"{"amount":10}"#);
    }

    #[test]
    fn missing_and_bad_attributes_are_named() {
        let e = sample();
        let without = |name: &str| -> Vec<Header> { e.headers().into_iter().filter(|(k, _)| k != name).collect() };
        let v = e.value();
        assert_eq!(decode_owned(&without(H_SUBJECT), Some(&v)), Err(DecodeError::MissingHeader(H_SUBJECT)));
        assert_eq!(decode_owned(&e.headers(), None), Err(DecodeError::NoValue));
        assert!(matches!(decode_owned(&e.headers(), Some(b"{")), Err(DecodeError::Json(_))));
        let mut h = without(H_STREAMVERSION);
        h.push((H_STREAMVERSION.into(), Some(b"0".to_vec())));
        assert_eq!(decode_owned(&h, Some(&v)), Err(DecodeError::StreamVersion("0".into())));
        let mut h = without(H_CONTENT_TYPE);
        h.push((H_CONTENT_TYPE.into(), Some(b"application/json; charset=utf-8".to_vec())));
        assert_eq!(decode_owned(&h, Some(&v)).unwrap(), e);
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        let json_leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "\\PC{0,20}".prop_map(Value::from),
        ];
        let data = json_leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        (
            "[a-z0-9-]{1,36}",
            "\\PC{1,30}",
            "[A-Za-z]{1,20}",
            0i64..4_000_000_000_000_000,
            ("[a-z][a-z0-9_]{0,10}", "[A-Za-z0-9_.:@-]{1,20}"),
            1u64..u64::MAX,
            proptest::option::of("\\PC{1,20}"),
            proptest::option::of("\\PC{1,20}"),
            proptest::option::of("[a-z:]{1,40}"),
            data,
        )
            .prop_map(|(id, source, ty, micros, (cat, sid), version, corr, caus, schema, data)| Event {
                id,
                source,
                event_type: ty,
                time: DateTime::from_timestamp_micros(micros).unwrap(),
                stream: StreamName::new(&cat, &sid).unwrap(),
                version,
                correlation_id: corr,
                causation_id: caus,
                data_schema: schema,
                data,
            })
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(e in arb_event()) {
            let decoded = decode_owned(&e.headers(), Some(&e.value())).unwrap();
            prop_assert_eq!(decoded, e);
        }

        #[test]
        fn decoding_arbitrary_input_never_panics(
            headers in prop::collection::vec(
                (prop_oneof![
                    Just(H_SPECVERSION.to_string()), Just(H_ID.to_string()), Just(H_TIME.to_string()),
                    Just(H_SUBJECT.to_string()), Just(H_STREAMVERSION.to_string()),
                    Just(H_CONTENT_TYPE.to_string()), Just(H_TYPE.to_string()), Just(H_SOURCE.to_string()),
                    "\\PC{0,12}",
                ], proptest::option::of(prop::collection::vec(any::<u8>(), 0..40))),
                0..14),
            value in proptest::option::of(prop::collection::vec(any::<u8>(), 0..200)),
        ) {
            let _ = decode_owned(&headers, value.as_deref());
        }

        #[test]
        fn corrupting_one_header_gives_a_typed_error_or_the_same_event(
            e in arb_event(), which in 0usize..8, bytes in prop::collection::vec(any::<u8>(), 0..20)
        ) {
            let mut h = e.headers();
            h[which].1 = Some(bytes);
            // Either it still decodes (the new bytes happened to be valid) or it says why not.
            if let Err(err) = decode_owned(&h, Some(&e.value())) {
                prop_assert!(!err.to_string().is_empty());
            }
        }
    }
}
