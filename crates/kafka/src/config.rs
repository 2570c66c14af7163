//! Client settings every esk producer, consumer and admin client shares.

use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::client::{Client, ClientContext};
use rdkafka::error::KafkaResult;

use crate::error::{Error, is_transient_code};
use crate::properties::{Properties, is_secret};

/// Where the cluster is, how long to wait for it, and the user's own client
/// properties (TLS, SASL, tuning) applied on top of every profile.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list.
    pub bootstrap: String,
    /// Upper bound on any one request (metadata, admin, produce delivery).
    pub timeout: Duration,
    properties: Properties,
}

/// A member of a consumer group that commits its offsets in transactions
/// (writer and coordinator owners, projectors).
#[derive(Debug, Clone)]
pub struct GroupMember<'a> {
    pub group: &'a str,
    /// A static member (`group.instance.id`): a restart within the session
    /// gets its partitions back without a rebalance.
    pub instance: Option<&'a str>,
    /// The session timeout (librdkafka's default when `None`); heartbeats at
    /// a twentieth of it, so a survivor learns of a rebalance sooner.
    pub session: Option<Duration>,
    /// Co-partitioned assignment (`range`): partition N of every topic of
    /// the group goes to the same member.
    pub co_partitioned: bool,
}

/// How a plain (non-transactional) producer sends.
#[derive(Debug, Clone, Copy)]
pub enum Sending {
    /// Each request at once, idempotent or not, delivered within the timeout.
    Requests { idempotent: bool, timeout: Duration },
    /// Dead letters and other single records: idempotent, at once.
    Parked,
    /// Bulk loads (benchmarks, backfills): large compressed batches.
    Bulk { idempotent: bool },
    /// As any other client might send (tests of hostile input): records up
    /// to `max_message_bytes`, past librdkafka's own 1,000,000-byte default.
    Foreign { max_message_bytes: usize },
}

impl KafkaConfig {
    /// Checks the bootstrap list before any connection is tried, so a typo gets a
    /// message that names it rather than a timeout. No client properties of the user's.
    pub fn new(bootstrap: &str, timeout: Duration) -> Result<Self, Error> {
        validate_bootstrap(bootstrap)
            .map_err(|reason| Error::Unavailable { bootstrap: bootstrap.to_owned(), reason })?;
        Ok(Self { bootstrap: bootstrap.to_owned(), timeout, properties: Properties::default() })
    }

    /// [`KafkaConfig::new`] with the user's client properties: `file` (a
    /// properties file, as Kafka's `--command-config` takes) and the
    /// `ESK_KAFKA_<PROPERTY>` variables of this process, each checked by
    /// librdkafka now, so a wrong name or value fails at start, naming it.
    pub fn load(bootstrap: &str, timeout: Duration, file: Option<&Path>) -> Result<Self, Error> {
        let config = Self::new(bootstrap, timeout)?.with_properties(Properties::from_env(file)?)?;
        if !config.properties.is_empty() {
            tracing::info!(properties = %config.properties.describe(), "Kafka client properties");
        }
        Ok(config)
    }

    /// These properties on top of every profile, checked by librdkafka.
    pub fn with_properties(mut self, properties: Properties) -> Result<Self, Error> {
        for (name, value) in properties.iter() {
            let mut c = ClientConfig::new();
            c.set(name, value);
            if let Err(e) = c.create_native_config() {
                let source = properties.source(name).unwrap_or("?");
                let shown = if is_secret(name) { "(secret)".to_owned() } else { format!("'{value}'") };
                return Err(Error::Invalid(format!("{source}: Kafka client property {name}={shown}: {e}")));
            }
        }
        self.properties = properties;
        if !self.properties.is_empty() {
            // Files named by properties (certificates, keys) are read when a
            // client is made: make one now (it connects only when used).
            let made: Result<rdkafka::consumer::BaseConsumer, _> = self.metadata("esk-check").create();
            if let Err(e) = made {
                return Err(Error::Invalid(format!(
                    "the Kafka client properties ({}) do not make a client: {e}",
                    self.properties.describe()
                )));
            }
        }
        Ok(self)
    }

    /// The same cluster and properties, another request bound.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The user's properties (to log: [`Properties::describe`] hides secrets).
    pub fn properties(&self) -> &Properties {
        &self.properties
    }

    /// What every client shares: bootstrap, Java-compatible partitioning,
    /// bounded connection attempts, quiet logs (unless `ESK_KAFKA_DEBUG` names
    /// librdkafka debug contexts).
    fn base(&self) -> ClientConfig {
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

    /// The user's properties last: they win over esk's tuning, and
    /// [`Properties`] refuses those a guarantee rests on.
    fn finish(&self, mut c: ClientConfig) -> ClientConfig {
        for (name, value) in self.properties.iter() {
            c.set(name, value);
        }
        c
    }

    /// An admin client (topics, configs, ACLs).
    pub fn admin(&self) -> ClientConfig {
        self.finish(self.base())
    }

    /// A consumer used only for metadata and watermarks.
    pub fn metadata(&self, group: &str) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group);
        self.finish(c)
    }

    /// A reader by assignment (no group membership, nothing committed) of
    /// committed records only; `fetch_wait` bounds how long the broker holds
    /// a fetch when there is nothing new.
    pub fn committed_reader(&self, group: &str, fetch_wait: Duration) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", fetch_wait.as_millis().max(1).to_string());
        self.finish(c)
    }

    /// [`KafkaConfig::committed_reader`] for a live subscription that waits
    /// on its reader: what it fetches ahead is bounded
    /// ([`SUBSCRIPTION_PREFETCH_KB`] a subscription), so a slow reader holds
    /// little memory.
    pub fn subscription_reader(&self, group: &str) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "100")
            // A cursor older than what retention kept goes on from the oldest kept.
            .set("auto.offset.reset", "earliest")
            .set("queued.max.messages.kbytes", SUBSCRIPTION_PREFETCH_KB.to_string());
        self.finish(c)
    }

    /// [`KafkaConfig::committed_reader`] for reading scattered records by
    /// offset (a stream's events from its index): small fetches, so that a
    /// seek does not wait for a large prefetch to arrive and be dropped.
    pub fn point_reader(&self, group: &str) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "5")
            .set("max.partition.fetch.bytes", "16384");
        self.finish(c)
    }

    /// [`KafkaConfig::point_reader`] that says when it reached the end of a
    /// partition (`PartitionEOF`): reading the newest records of a log.
    pub fn tail_reader(&self, group: &str) -> ClientConfig {
        let mut c = self.point_reader(group);
        c.set("enable.partition.eof", "true");
        c
    }

    /// [`KafkaConfig::committed_reader`] with large fetches: reading a
    /// partition to its end (restores).
    pub fn bulk_reader(&self, group: &str) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "20")
            .set("fetch.max.bytes", "52428800");
        self.finish(c)
    }

    /// A reader that sees aborted records too: only tests use it, to show
    /// what an aborted transaction left in the log.
    pub fn uncommitted_reader(&self, group: &str) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group).set("enable.auto.commit", "false").set("isolation.level", "read_uncommitted");
        self.finish(c)
    }

    /// A group member that reads committed records and commits its offsets
    /// in transactions (nothing automatic), from the earliest record when the
    /// group has none.
    pub fn group_member(&self, m: &GroupMember<'_>) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", m.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            // One fetch is in flight per broker: a partition assigned while a
            // long poll waits is first fetched when that poll returns, so the
            // poll is kept short (librdkafka's 500 ms default added up to half
            // a second to every takeover).
            .set("fetch.wait.max.ms", "50")
            // New category topics are seen within seconds.
            .set("topic.metadata.refresh.interval.ms", "5000");
        if let Some(instance) = m.instance {
            c.set("group.instance.id", instance);
        }
        if m.co_partitioned {
            c.set("partition.assignment.strategy", "range");
        }
        if let Some(session) = m.session {
            let session = session.as_millis() as u64;
            c.set("session.timeout.ms", session.to_string())
                // Frequent heartbeats: a survivor learns of a rebalance sooner, so a
                // takeover costs little more than the session timeout.
                .set("heartbeat.interval.ms", (session / 20).max(100).to_string())
                // librdkafka sends a heartbeat only when its main loop wakes, which
                // with nothing else to do is every 500 ms: the statistics timer
                // wakes it often enough for the interval above to hold (the
                // statistics themselves are dropped by the member's context).
                .set("statistics.interval.ms", "100");
        }
        self.finish(c)
    }

    /// A transactional producer (`transactional_id` fences every earlier one
    /// with the same id): acks from all in-sync replicas, idempotent, a
    /// batch sent and awaited at once (lingering only delays it).
    pub fn transactional_producer(&self, transactional_id: &str, transaction_timeout: Duration) -> ClientConfig {
        let ms = transaction_timeout.as_millis().max(1000).to_string();
        let mut c = self.base();
        c.set("transactional.id", transactional_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("transaction.timeout.ms", &ms)
            .set("message.timeout.ms", &ms)
            .set("linger.ms", "0")
            .set("compression.type", "lz4");
        self.finish(c)
    }

    /// A plain producer, acks from all in-sync replicas.
    pub fn producer(&self, sending: Sending) -> ClientConfig {
        let mut c = self.base();
        c.set("acks", "all");
        match sending {
            Sending::Requests { idempotent, timeout } => {
                c.set("linger.ms", "0")
                    .set("enable.idempotence", if idempotent { "true" } else { "false" })
                    .set("message.timeout.ms", timeout.as_millis().max(1000).to_string());
            }
            Sending::Parked => {
                c.set("enable.idempotence", "true");
            }
            Sending::Bulk { idempotent } => {
                c.set("enable.idempotence", if idempotent { "true" } else { "false" })
                    .set("linger.ms", "20")
                    .set("batch.size", "1000000")
                    .set("compression.type", "lz4");
            }
            Sending::Foreign { max_message_bytes } => {
                c.set("message.max.bytes", max_message_bytes.to_string());
            }
        }
        self.finish(c)
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

/// Whether the cluster answers: metadata of `topic` from a broker within
/// `timeout`, sampled for readiness (see `esk_runtime::sample`).
pub fn probe<C: ClientContext>(client: &Client<C>, topic: &str, timeout: Duration) -> Result<(), String> {
    match client.fetch_metadata(Some(topic), timeout) {
        Ok(md) if !md.brokers().is_empty() => Ok(()),
        Ok(_) => Err("the metadata names no broker".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// What a subscription's reader fetches ahead at most, in KiB.
pub const SUBSCRIPTION_PREFETCH_KB: u32 = 4096;

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

/// What this build of librdkafka can do (`builtin.features`).
pub fn builtin_features() -> Result<String, Error> {
    Ok(ClientConfig::new().create_native_config()?.get("builtin.features")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn librdkafka_is_built_with_tls_sasl_and_zstd() {
        let features = builtin_features().unwrap();
        for f in ["ssl", "sasl_plain", "sasl_scram", "sasl_oauthbearer", "zstd", "lz4"] {
            assert!(features.split(',').any(|x| x == f), "{f} missing from {features}");
        }
    }

    #[test]
    fn user_properties_apply_on_top_of_every_profile_and_bad_ones_fail_at_start() {
        let env = |vars: &[(&str, &str)]| vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        let kafka = KafkaConfig::new("127.0.0.1:9092", Duration::from_secs(5))
            .unwrap()
            .with_properties(
                Properties::load(
                    None,
                    env(&[
                        ("ESK_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
                        ("ESK_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
                        ("ESK_KAFKA_SASL_USERNAME", "writer"),
                        ("ESK_KAFKA_SASL_PASSWORD", "hunter2"),
                        ("ESK_KAFKA_LINGER_MS", "5"),
                    ]),
                )
                .unwrap(),
            )
            .unwrap();
        for c in [
            kafka.admin(),
            kafka.metadata("g"),
            kafka.committed_reader("g", Duration::from_millis(10)),
            kafka.bulk_reader("g"),
            kafka.group_member(&GroupMember { group: "g", instance: None, session: None, co_partitioned: true }),
            kafka.transactional_producer("t", Duration::from_secs(10)),
            kafka.producer(Sending::Parked),
        ] {
            assert_eq!(c.get("security.protocol"), Some("SASL_SSL"));
            assert_eq!(c.get("linger.ms"), Some("5"));
            assert_eq!(c.get("partitioner"), Some("murmur2_random"));
        }
        let tx = kafka.transactional_producer("t", Duration::from_secs(10));
        assert_eq!(tx.get("enable.idempotence"), Some("true"));
        assert_eq!(tx.get("acks"), Some("all"));
        assert_eq!(
            kafka.committed_reader("g", Duration::from_millis(10)).get("isolation.level"),
            Some("read_committed")
        );

        let bad = |vars: &[(&str, &str)]| {
            KafkaConfig::new("127.0.0.1:9092", Duration::from_secs(5))
                .unwrap()
                .with_properties(Properties::load(None, env(vars)).unwrap())
                .unwrap_err()
                .to_string()
        };
        let e = bad(&[("ESK_KAFKA_NO_SUCH_THING", "1")]);
        assert!(e.contains("no.such.thing") && e.contains("ESK_KAFKA_NO_SUCH_THING"), "{e}");
        let e = bad(&[("ESK_KAFKA_SECURITY_PROTOCOL", "carrier-pigeon")]);
        assert!(e.contains("security.protocol") && e.contains("carrier-pigeon"), "{e}");
        let e = bad(&[
            ("ESK_KAFKA_SECURITY_PROTOCOL", "SSL"),
            ("ESK_KAFKA_SSL_KEY_PASSWORD", "hunter2"),
            ("ESK_KAFKA_SSL_CA_LOCATION", "/nonexistent/ca.pem"),
        ]);
        assert!(e.contains("/nonexistent/ca.pem") && !e.contains("hunter2"), "{e}");
    }

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
