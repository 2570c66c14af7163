//! The bounds on everything esk takes in, in one place.
//!
//! Every record esk writes must fit the broker's `message.max.bytes` (Kafka's
//! default is 1 MiB + 12 bytes) and the producer's own limit (librdkafka's
//! `message.max.bytes`, 1,000,000 bytes by default). [`Limits`] derives from
//! the smaller of the two what a request, a stream's state record and a dead
//! letter may weigh; the fixed bounds below keep the parts of a request that
//! are copied into other records (request ids into replies, event headers and
//! remembered answers) small. Clients refuse what is over before sending
//! anything; the writer and the coordinator check again, since any producer
//! can write anything to their topics.

/// Bytes of a request id: 1 to 128 visible ASCII characters.
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// Bytes of an event id (`ce_id`).
pub const MAX_EVENT_ID_BYTES: usize = 100;
/// Bytes of an event type or command name.
pub const MAX_TYPE_BYTES: usize = 100;
/// Bytes of a correlation or causation id.
pub const MAX_TRACE_ID_BYTES: usize = 128;
/// Bytes of one event's JSON data (and of one command's).
pub const MAX_EVENT_DATA_BYTES: usize = 256 * 1024;
/// Events in one append.
pub const MAX_EVENTS_PER_REQUEST: usize = 1000;
/// Bytes of a transaction id.
pub const MAX_TXID_BYTES: usize = 100;
/// Participants of one transaction.
pub const MAX_PARTICIPANTS: usize = 64;
/// Bytes of one participant's command data in a transaction.
pub const MAX_TX_COMMAND_BYTES: usize = 8 * 1024;
/// 2PC holds one stream may have open at once.
pub const MAX_OPEN_HOLDS: usize = 256;
/// Bytes of a reason (a vote's, an abort's, an error message): longer ones are cut.
pub const MAX_REASON_BYTES: usize = 1024;

/// librdkafka's default `message.max.bytes` for a producer: no client of
/// esk's produces a larger record.
pub const CLIENT_MAX_MESSAGE_BYTES: usize = 1_000_000;
/// Kafka's default `message.max.bytes` (a broker's, and a topic's `max.message.bytes`).
pub const BROKER_DEFAULT_MAX_MESSAGE_BYTES: usize = 1_048_588;
/// Room kept in every record for its key, headers and framing.
pub const RECORD_OVERHEAD_BYTES: usize = 16 * 1024;
/// A dead letter whose original does not fit keeps this much of its value.
pub const TRUNCATED_VALUE_BYTES: usize = 64 * 1024;

/// Sizes derived from the smallest `message.max.bytes` on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest record esk produces: the broker's limit or the client's,
    /// whichever is smaller.
    pub record_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self::for_broker(BROKER_DEFAULT_MAX_MESSAGE_BYTES)
    }
}

impl Limits {
    /// Limits under a broker (or topic) that takes records up to `max_message_bytes`.
    pub fn for_broker(max_message_bytes: usize) -> Self {
        Self { record_bytes: max_message_bytes.min(CLIENT_MAX_MESSAGE_BYTES) }
    }

    /// The largest request (its JSON value): a record less the room for key and headers.
    pub fn request_bytes(&self) -> usize {
        self.record_bytes.saturating_sub(RECORD_OVERHEAD_BYTES)
    }

    /// The largest state record of one stream.
    pub fn state_bytes(&self) -> usize {
        self.request_bytes()
    }

    /// The largest transaction record the coordinator keeps: a request's worth,
    /// less room for the votes' reasons.
    pub fn tx_record_bytes(&self) -> usize {
        self.request_bytes().saturating_sub(MAX_PARTICIPANTS * MAX_REASON_BYTES)
    }

    /// The largest event data: the fixed bound, or less under a small broker limit.
    pub fn event_data_bytes(&self) -> usize {
        MAX_EVENT_DATA_BYTES.min(self.request_bytes() / 2)
    }
}

/// How far a client's clock may be ahead of the writer's without harm: a
/// tenth of the idempotency horizon. Answers are kept that much longer than
/// the horizon, so that a request dated by a fast clock cannot look younger
/// than the horizon after its answer was forgotten; a request dated further
/// ahead than this is refused.
pub fn clock_margin_ms(horizon_ms: i64) -> i64 {
    horizon_ms / 10
}

/// How long answers (and ended transactions) are kept: the horizon and the
/// clock margin.
pub fn kept_ms(horizon_ms: i64) -> i64 {
    horizon_ms + clock_margin_ms(horizon_ms)
}

/// Why a request that is not remembered may not be decided now, if it may not:
/// first sent longer ago than the horizon, or dated too far ahead.
pub fn too_old(origin_ms: Option<i64>, now_ms: i64, horizon_ms: i64) -> Option<String> {
    let origin = origin_ms?;
    if origin < now_ms - horizon_ms {
        let sent = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(origin)
            .map_or_else(|| origin.to_string(), |t| t.to_rfc3339());
        return Some(format!(
            "it was first sent at {sent}, longer ago than the idempotency horizon ({} s)",
            horizon_ms / 1000
        ));
    }
    if origin > now_ms + clock_margin_ms(horizon_ms) {
        return Some(format!(
            "it says it was first sent {} s from now: the sender's clock is ahead by more than the {} s the \
             idempotency horizon allows",
            (origin - now_ms) / 1000,
            clock_margin_ms(horizon_ms) / 1000
        ));
    }
    None
}

/// Checks a request id: 1 to [`MAX_REQUEST_ID_BYTES`] visible ASCII characters.
pub fn check_request_id(id: &str) -> Result<(), String> {
    check_id("request id", id, MAX_REQUEST_ID_BYTES)
}

/// Checks a correlation or causation id.
pub fn check_trace_id(what: &str, id: &str) -> Result<(), String> {
    check_id(what, id, MAX_TRACE_ID_BYTES)
}

fn check_id(what: &str, id: &str, max: usize) -> Result<(), String> {
    if id.is_empty() || id.len() > max {
        return Err(format!("a {what} has 1 to {max} characters; this one has {}", id.len()));
    }
    if let Some(c) = id.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!("{what} '{}' contains {c:?}: use visible ASCII characters only", shorten(id, 40)));
    }
    Ok(())
}

/// At most `max` bytes of `text`, cut at a character boundary, with `…` when cut.
pub fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The time in a UUIDv7 (ms since the epoch), if `id` is one.
pub fn uuid_v7_ms(id: &str) -> Option<i64> {
    let u = uuid::Uuid::parse_str(id).ok()?;
    if u.get_version_num() != 7 {
        return None;
    }
    let (secs, nanos) = u.get_timestamp()?.to_unix();
    i64::try_from(secs).ok().map(|s| s * 1000 + i64::from(nanos / 1_000_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_smaller_of_broker_and_client() {
        let d = Limits::default();
        assert_eq!(d.record_bytes, CLIENT_MAX_MESSAGE_BYTES);
        assert_eq!(d.request_bytes(), CLIENT_MAX_MESSAGE_BYTES - RECORD_OVERHEAD_BYTES);
        let small = Limits::for_broker(200_000);
        assert_eq!(small.record_bytes, 200_000);
        assert!(small.event_data_bytes() < MAX_EVENT_DATA_BYTES);
        assert!(small.tx_record_bytes() < small.request_bytes());
    }

    #[test]
    fn request_ids_are_bounded_and_visible() {
        assert!(check_request_id("req-1").is_ok());
        assert!(check_request_id(&"x".repeat(128)).is_ok());
        assert!(check_request_id(&"x".repeat(129)).unwrap_err().contains("1 to 128"));
        assert!(check_request_id("").is_err());
        assert!(check_request_id("a b").unwrap_err().contains("' '"));
        assert!(check_request_id("é").is_err());
    }

    #[test]
    fn text_is_shortened_at_a_boundary() {
        assert_eq!(shorten("abc", 5), "abc");
        assert_eq!(shorten("abcdef", 3), "abc…");
        assert_eq!(shorten("ééé", 3), "é…");
    }

    #[test]
    fn requests_are_dated_within_the_horizon_and_the_clock_margin() {
        let h = 1_000_000;
        assert_eq!(too_old(None, 5_000_000, h), None, "undated: decided now");
        assert_eq!(too_old(Some(4_500_000), 5_000_000, h), None);
        assert!(too_old(Some(3_999_999), 5_000_000, h).unwrap().contains("longer ago"));
        assert_eq!(too_old(Some(5_100_000), 5_000_000, h), None, "a clock ahead by less than the margin");
        assert!(too_old(Some(5_100_001), 5_000_000, h).unwrap().contains("ahead"));
        assert_eq!(kept_ms(h), 1_100_000);
    }

    #[test]
    fn uuid_v7_times_are_read() {
        let id = uuid::Uuid::now_v7().to_string();
        let now = chrono::Utc::now().timestamp_millis();
        assert!((uuid_v7_ms(&id).unwrap() - now).abs() < 5_000);
        assert_eq!(uuid_v7_ms(&uuid::Uuid::new_v4().to_string()), None);
        assert_eq!(uuid_v7_ms("req-1"), None);
    }
}
