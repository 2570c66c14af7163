//! Client settings every esk producer, consumer and admin client shares.

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::client::{Client, ClientContext};
use rdkafka::error::KafkaResult;

use crate::error::{Error, is_transient_code};

/// Where the cluster is and how long to wait for it.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list.
    pub bootstrap: String,
    /// Upper bound on any one request (metadata, admin, produce delivery).
    pub timeout: Duration,
}

impl KafkaConfig {
    /// Checks the bootstrap list before any connection is tried, so a typo gets a
    /// message that names it rather than a timeout.
    pub fn new(bootstrap: &str, timeout: Duration) -> Result<Self, Error> {
        validate_bootstrap(bootstrap)
            .map_err(|reason| Error::Unavailable { bootstrap: bootstrap.to_owned(), reason })?;
        Ok(Self { bootstrap: bootstrap.to_owned(), timeout })
    }

    /// The base client config: bootstrap, Java-compatible partitioning, bounded
    /// connection attempts, quiet logs (unless `ESK_KAFKA_DEBUG` names
    /// librdkafka debug contexts).
    pub fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        let ms = self.timeout.as_millis().max(1000).to_string();
        c.set("bootstrap.servers", &self.bootstrap)
            // Java's default partitioner: any Kafka client lands a key in the same partition.
            .set("partitioner", "murmur2_random")
            .set("socket.connection.setup.timeout.ms", &ms)
            .set("reconnect.backoff.max.ms", "2000")
            .set("log_level", "3");
        // librdkafka's own debug contexts (e.g. `eos,cgrp`) for diagnosing a
        // cluster; logged through tracing under the `librdkafka` target.
        if let Ok(contexts) = std::env::var("ESK_KAFKA_DEBUG")
            && !contexts.trim().is_empty()
        {
            c.set("debug", contexts.trim()).set("log_level", "7");
        }
        c
    }

    pub fn unavailable(&self, reason: impl std::fmt::Display) -> Error {
        Error::Unavailable { bootstrap: self.bootstrap.clone(), reason: reason.to_string() }
    }
}

/// A partition's (low, high) watermarks, the topic's metadata fetched first,
/// both within `timeout`. The metadata request waits for a connection without
/// polling, and refreshes a topic created or moved a moment ago; asked for
/// watermarks at once, a new client that is not connected yet looks for the
/// leader again only after 100 to 700 ms, and a long-lived one may call the
/// partition unknown.
///
/// A transient error (see [`is_transient_code`]: a leader being elected or
/// moved, `NotLeaderForPartition` from a broker that the metadata names
/// leader before it has taken the partition on, as right after a topic's
/// creation) is retried, metadata first, until `timeout` runs out.
pub fn watermarks<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> KafkaResult<(i64, i64)> {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    loop {
        let result =
            client.fetch_metadata(Some(topic), left()).and_then(|_| client.fetch_watermarks(topic, partition, left()));
        match result {
            Err(e) if is_transient_code(e.rdkafka_error_code()) && left() > TRANSIENT_RETRY_PAUSE => {
                tracing::debug!(topic, partition, "watermarks: {e}; again");
                std::thread::sleep(TRANSIENT_RETRY_PAUSE);
            }
            result => return result,
        }
    }
}

/// The pause before a call that failed with a transient error is tried again.
pub const TRANSIENT_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// `host:port[,host:port...]` with a port from 1 to 65535.
pub fn validate_bootstrap(bootstrap: &str) -> Result<(), String> {
    if bootstrap.trim().is_empty() {
        return Err("the bootstrap server list is empty; give host:port, e.g. 127.0.0.1:9092".into());
    }
    for server in bootstrap.split(',') {
        let server = server.trim();
        let Some((host, port)) = server.rsplit_once(':') else {
            return Err(format!("bootstrap server '{server}' has no port; give host:port, e.g. 127.0.0.1:9092"));
        };
        if host.is_empty() || host.contains(char::is_whitespace) || host.contains('/') {
            return Err(format!("bootstrap server '{server}' has no valid host"));
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => {
                return Err(format!("bootstrap server '{server}' has port '{port}'; a port is 1 to 65535"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_lists_are_checked() {
        assert!(validate_bootstrap("127.0.0.1:9092").is_ok());
        assert!(validate_bootstrap("a:1,b:2, c:3").is_ok());
        assert!(validate_bootstrap("").unwrap_err().contains("empty"));
        assert!(validate_bootstrap("localhost").unwrap_err().contains("no port"));
        assert!(validate_bootstrap("localhost:abc").unwrap_err().contains("'abc'"));
        assert!(validate_bootstrap("localhost:0").is_err());
        assert!(validate_bootstrap(":9092").unwrap_err().contains("host"));
    }
}
