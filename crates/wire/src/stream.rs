//! Stream names: `<category>-<id>`, the category being the text before the first `-`.

use std::fmt;
use std::str::FromStr;

/// The longest stream name accepted, in bytes. Names travel as Kafka keys and
/// CloudEvents subjects; a bound keeps them cheap to hold in memory per stream.
pub const MAX_STREAM_LEN: usize = 200;
/// The longest category: it becomes part of a topic name (`<prefix>.events.<category>`).
pub const MAX_CATEGORY_LEN: usize = 64;

/// A valid stream name such as `account-42`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamName {
    name: String,
    dash: usize,
}

/// Why a text is not a stream name. Every variant names the offending input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamNameError {
    #[error("stream name is empty: streams are named <category>-<id>, e.g. account-42")]
    Empty,
    #[error("stream name '{0}' has no category: streams are named <category>-<id>, e.g. account-42")]
    NoCategory(String),
    #[error("stream name '{0}' has an empty category before the '-'")]
    EmptyCategory(String),
    #[error("stream name '{0}' has an empty id after the '-'")]
    EmptyId(String),
    #[error(
        "category '{category}' of stream '{stream}' is invalid: it must start with a lowercase letter, \
         use only a-z, 0-9 and '_', and be at most {MAX_CATEGORY_LEN} characters"
    )]
    BadCategory { stream: String, category: String },
    #[error("stream id of '{stream}' contains {found:?}: ids use letters, digits and - _ . : @ only")]
    BadIdChar { stream: String, found: char },
    #[error("stream name is {len} bytes long; the limit is {MAX_STREAM_LEN}")]
    TooLong { len: usize },
}

impl StreamName {
    /// Parses and validates a stream name.
    pub fn parse(name: &str) -> Result<Self, StreamNameError> {
        if name.is_empty() {
            return Err(StreamNameError::Empty);
        }
        if name.len() > MAX_STREAM_LEN {
            return Err(StreamNameError::TooLong { len: name.len() });
        }
        let Some(dash) = name.find('-') else {
            return Err(StreamNameError::NoCategory(name.to_owned()));
        };
        let (category, id) = (&name[..dash], &name[dash + 1..]);
        if category.is_empty() {
            return Err(StreamNameError::EmptyCategory(name.to_owned()));
        }
        if id.is_empty() {
            return Err(StreamNameError::EmptyId(name.to_owned()));
        }
        if !is_valid_category(category) {
            return Err(StreamNameError::BadCategory { stream: name.to_owned(), category: category.to_owned() });
        }
        if let Some(found) = id.chars().find(|c| !is_id_char(*c)) {
            return Err(StreamNameError::BadIdChar { stream: name.to_owned(), found });
        }
        Ok(Self { name: name.to_owned(), dash })
    }

    /// Builds `<category>-<id>` and validates it.
    pub fn new(category: &str, id: &str) -> Result<Self, StreamNameError> {
        Self::parse(&format!("{category}-{id}"))
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The text before the first `-`.
    pub fn category(&self) -> &str {
        &self.name[..self.dash]
    }

    /// The text after the first `-`.
    pub fn id(&self) -> &str {
        &self.name[self.dash + 1..]
    }
}

/// A category is a lowercase identifier: it is part of topic names and schema paths.
pub fn is_valid_category(category: &str) -> bool {
    let mut chars = category.chars();
    matches!(chars.next(), Some('a'..='z'))
        && category.len() <= MAX_CATEGORY_LEN
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@')
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl FromStr for StreamName {
    type Err = StreamNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl AsRef<str> for StreamName {
    fn as_ref(&self) -> &str {
        &self.name
    }
}

impl serde::Serialize for StreamName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name)
    }
}

impl<'de> serde::Deserialize<'de> for StreamName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn splits_at_the_first_dash() {
        let s = StreamName::parse("account-42-b").unwrap();
        assert_eq!(s.category(), "account");
        assert_eq!(s.id(), "42-b");
        assert_eq!(s.to_string(), "account-42-b");
    }

    #[test]
    fn rejects_bad_names_with_a_reason() {
        use StreamNameError::*;
        assert_eq!(StreamName::parse(""), Err(Empty));
        assert_eq!(StreamName::parse("account"), Err(NoCategory("account".into())));
        assert_eq!(StreamName::parse("-1"), Err(EmptyCategory("-1".into())));
        assert_eq!(StreamName::parse("account-"), Err(EmptyId("account-".into())));
        assert!(matches!(StreamName::parse("Account-1"), Err(BadCategory { .. })));
        assert!(matches!(StreamName::parse("acc.ount-1"), Err(BadCategory { .. })));
        assert!(matches!(StreamName::parse("account-a b"), Err(BadIdChar { found: ' ', .. })));
        assert!(matches!(StreamName::parse(&format!("a-{}", "x".repeat(300))), Err(TooLong { .. })));
        let msg = StreamName::parse("account").unwrap_err().to_string();
        assert!(msg.contains("'account'") && msg.contains("<category>-<id>"), "{msg}");
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,300}") {
            let _ = StreamName::parse(&s);
        }

        #[test]
        fn valid_names_round_trip(cat in "[a-z][a-z0-9_]{0,20}", id in "[A-Za-z0-9_.:@-]{1,40}") {
            let s = StreamName::new(&cat, &id).unwrap();
            prop_assert_eq!(s.category(), cat.as_str());
            prop_assert_eq!(s.id(), id.as_str());
            prop_assert_eq!(StreamName::parse(s.as_str()).unwrap(), s);
        }
    }
}
