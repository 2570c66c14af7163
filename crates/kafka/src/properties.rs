//! The user's own client properties: a properties file (`--kafka-config`,
//! `ESK_KAFKA_CONFIG`) and `ESK_KAFKA_<PROPERTY>` variables, applied on top of
//! every esk profile. What would break a guarantee is refused, naming the
//! property and where it came from; values whose names look secret are never
//! shown.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::Error;

/// Environment variables under `ESK_KAFKA_` that are esk's own, not client
/// properties.
pub const RESERVED_VARIABLES: &[&str] = &[
    "ESK_KAFKA_CONFIG",
    "ESK_KAFKA_DEBUG",
    "ESK_KAFKA_PORT",
    "ESK_KAFKA_CLUSTER_PORTS",
    "ESK_KAFKA_HEAP",
    "ESK_KAFKA_START_TIMEOUT",
    "ESK_KAFKA_EPHEMERAL",
    "ESK_KAFKA_SECURITY",
    "ESK_KAFKA_SCRAM_USERS",
];

/// Properties esk sets itself because a guarantee rests on them, with what
/// each one guards.
pub const REFUSED: &[(&str, &str)] = &[
    ("bootstrap.servers", "give it as --bootstrap-servers or KAFKA_BOOTSTRAP_SERVERS"),
    ("metadata.broker.list", "give it as --bootstrap-servers or KAFKA_BOOTSTRAP_SERVERS"),
    ("isolation.level", "readers see committed records only (read_committed)"),
    ("enable.idempotence", "producers write each record once (idempotent)"),
    ("enable.gapless.guarantee", "esk's producers decide it"),
    ("transactional.id", "each partition's writer has its own, for fencing"),
    ("transaction.timeout.ms", "set by --transaction-timeout-ms where a service has it"),
    ("partitioner", "keys land where every Kafka client puts them (murmur2)"),
    ("partitioner.class", "keys land where every Kafka client puts them (murmur2)"),
    ("acks", "every write waits for all in-sync replicas"),
    ("request.required.acks", "every write waits for all in-sync replicas"),
    ("group.id", "each service names its own groups"),
    ("group.instance.id", "each service names its own group members"),
    ("enable.auto.commit", "offsets are committed in transactions, with what they produced"),
    ("auto.commit.enable", "offsets are committed in transactions, with what they produced"),
    ("enable.auto.offset.store", "offsets are stored with what they produced"),
    ("auto.offset.reset", "a new reader starts from the earliest record"),
    ("partition.assignment.strategy", "writers and coordinators rely on co-partitioned assignment"),
    ("group.protocol", "writers and coordinators rely on the classic group protocol"),
    ("session.timeout.ms", "set by --session-timeout-ms where a service has it"),
    ("heartbeat.interval.ms", "derived from the session timeout"),
    ("message.timeout.ms", "bounded by the transaction timeout or the request timeout"),
    ("delivery.timeout.ms", "bounded by the transaction timeout or the request timeout"),
    ("enable.partition.eof", "readers find the end of a partition by its watermark"),
];

/// Whether a property's value must never be shown.
pub fn is_secret(name: &str) -> bool {
    ["password", "secret", "jaas", "token", "key.pem", "ssl.key", "credentials"].iter().any(|s| name.contains(s))
}

/// The user's client properties, in the order they apply (file, then environment).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Properties {
    values: BTreeMap<String, (String, String)>,
}

impl std::fmt::Debug for Properties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.values.iter().map(|(k, (v, _))| (k, shown(k, v)))).finish()
    }
}

/// A value as it may be logged.
fn shown<'a>(name: &str, value: &'a str) -> &'a str {
    if is_secret(name) { "(secret)" } else { value }
}

impl Properties {
    /// The file (if any), then every `ESK_KAFKA_<PROPERTY>` in `env`:
    /// `_` stands for `.`, `__` for `_` (Confluent's convention), so
    /// `ESK_KAFKA_SECURITY_PROTOCOL` is `security.protocol` and
    /// `ESK_KAFKA_LOG__LEVEL` is `log_level`. A variable overrides the file.
    pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, Error> {
        let mut properties = Self::default();
        if let Some(file) = file {
            let text = std::fs::read_to_string(file).map_err(|e| {
                Error::Invalid(format!("cannot read the Kafka client properties file {}: {e}", file.display()))
            })?;
            for (line, name, value) in
                parse(&text).map_err(|(line, reason)| Error::Invalid(format!("{}:{line}: {reason}", file.display())))?
            {
                properties.insert(name, value, format!("{}:{line}", file.display()))?;
            }
        }
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("ESK_KAFKA_") && !RESERVED_VARIABLES.contains(&k.as_str()))
            .collect();
        vars.sort();
        for (var, value) in vars {
            let name = property_of(&var["ESK_KAFKA_".len()..])
                .ok_or_else(|| Error::Invalid(format!("{var} names no Kafka client property")))?;
            properties.insert(name, value, var)?;
        }
        Ok(properties)
    }

    /// From this process's environment and `file`.
    pub fn from_env(file: Option<&Path>) -> Result<Self, Error> {
        Self::load(file, std::env::vars())
    }

    fn insert(&mut self, name: String, value: String, source: String) -> Result<(), Error> {
        if let Some((_, why)) = REFUSED.iter().find(|(n, _)| *n == name) {
            return Err(Error::Invalid(format!("{source}: the Kafka client property {name} cannot be set: {why}")));
        }
        if name.starts_with("ssl_") || name.ends_with("_cb") || name == "opaque" {
            return Err(Error::Invalid(format!("{source}: {name} is not settable from a properties file")));
        }
        self.values.insert(name, (value, source));
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// `(name, value)` in order of name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.values.iter().map(|(k, (v, _))| (k.as_str(), v.as_str()))
    }

    /// Where a property came from (`file:line` or the variable).
    pub fn source(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(|(_, s)| s.as_str())
    }

    /// `name=value` lines as they may be logged (secrets hidden).
    pub fn describe(&self) -> String {
        self.values.iter().map(|(k, (v, s))| format!("{k}={} ({s})", shown(k, v))).collect::<Vec<_>>().join(", ")
    }
}

/// `SECURITY_PROTOCOL` -> `security.protocol`, `LOG__LEVEL` -> `log_level`.
fn property_of(suffix: &str) -> Option<String> {
    if suffix.is_empty() || !suffix.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    let name = suffix.to_ascii_lowercase().replace("__", "\u{0}").replace('_', ".").replace('\u{0}', "_");
    (!name.starts_with('.') && !name.ends_with('.') && !name.contains("..")).then_some(name)
}

/// A property of a file: (line, name, value).
type Line = (usize, String, String);

/// Java properties as Kafka's tools read them: `name=value` or `name: value`,
/// `#` and `!` comments, a trailing `\` continues a line.
fn parse(text: &str) -> Result<Vec<Line>, (usize, String)> {
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let mut logical = line.trim_start().to_owned();
        if logical.is_empty() || logical.starts_with('#') || logical.starts_with('!') {
            continue;
        }
        while logical.ends_with('\\') && !logical.ends_with("\\\\") {
            logical.pop();
            match lines.next() {
                Some((_, next)) => logical.push_str(next.trim_start()),
                None => break,
            }
        }
        let split = logical.find(['=', ':']).ok_or((i + 1, format!("'{}' is not name=value", logical.trim())))?;
        let name = logical[..split].trim().to_owned();
        let value = logical[split + 1..].trim().to_owned();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err((i + 1, format!("'{name}' is not a property name")));
        }
        out.push((i + 1, name, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_file_then_variables_on_top() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("client.properties");
        std::fs::write(
            &file,
            "# Confluent Cloud\nsecurity.protocol=SASL_SSL\nsasl.mechanism: PLAIN\n! comment\n\
             sasl.username = me\nsasl.password=s3cret\nssl.ca.location=/etc/ca.pem\\\n  -more\n",
        )
        .unwrap();
        let p = Properties::load(
            Some(&file),
            env(&[
                ("ESK_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
                ("ESK_KAFKA_LOG__LEVEL", "6"),
                ("ESK_KAFKA_PORT", "9092"),
                ("ESK_KAFKA_DEBUG", "eos"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        let got: Vec<_> = p.iter().collect();
        assert_eq!(
            got,
            vec![
                ("log_level", "6"),
                ("sasl.mechanism", "SCRAM-SHA-512"),
                ("sasl.password", "s3cret"),
                ("sasl.username", "me"),
                ("security.protocol", "SASL_SSL"),
                ("ssl.ca.location", "/etc/ca.pem-more"),
            ]
        );
        assert_eq!(p.source("sasl.mechanism"), Some("ESK_KAFKA_SASL_MECHANISM"));
        assert_eq!(p.source("sasl.username"), Some(format!("{}:5", file.display()).as_str()));
        assert!(!p.describe().contains("s3cret"), "{}", p.describe());
        assert!(!format!("{p:?}").contains("s3cret"));
    }

    #[test]
    fn properties_that_would_break_a_guarantee_are_refused_by_name() {
        for name in ["isolation.level", "enable.idempotence", "transactional.id", "partitioner", "acks"] {
            let var = format!("ESK_KAFKA_{}", name.to_ascii_uppercase().replace('.', "_"));
            let e = Properties::load(None, env(&[(&var, "x")])).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains(&var), "{e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p");
        std::fs::write(&file, "security.protocol=SSL\n\nisolation.level=read_uncommitted\n").unwrap();
        let e = Properties::load(Some(&file), []).unwrap_err().to_string();
        assert!(e.contains("isolation.level") && e.contains(":3"), "{e}");
    }

    #[test]
    fn bad_files_and_names_get_clear_errors() {
        let e = Properties::load(Some(Path::new("/nonexistent/p")), []).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/p"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p");
        std::fs::write(&file, "just words\n").unwrap();
        let e = Properties::load(Some(&file), []).unwrap_err().to_string();
        assert!(e.contains(":1") && e.contains("name=value"), "{e}");
        assert!(Properties::load(None, env(&[("ESK_KAFKA_", "x")])).is_err());
        assert!(Properties::load(None, env(&[("ESK_KAFKA_A-B", "x")])).is_err());
    }
}
