//! The coordinator's configuration: flags with environment fallbacks.

use std::time::Duration;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(name = "esk-coordinator", version, about = "esk's coordinator: 2PC over prepare/commit topics")]
pub struct Config {
    /// Kafka bootstrap servers, host:port[,host:port...].
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS", default_value = "127.0.0.1:9092")]
    pub bootstrap_servers: String,
    /// Prefix of every platform topic.
    #[arg(long, env = "ESK_TOPIC_PREFIX", default_value = "esk")]
    pub prefix: String,
    /// Address of the HTTP endpoint (/health, /metrics, /status, /tx/{txid}).
    #[arg(long, env = "ESK_COORDINATOR_HTTP", default_value = "127.0.0.1:8704")]
    pub http_addr: String,
    /// Consumer-group session timeout in ms: how soon another instance takes over.
    #[arg(long, env = "ESK_COORDINATOR_SESSION_TIMEOUT_MS", default_value_t = 6000,
          value_parser = clap::value_parser!(u64).range(1000..=300_000))]
    pub session_timeout_ms: u64,
    /// Kafka transaction timeout in ms.
    #[arg(long, env = "ESK_COORDINATOR_TRANSACTION_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1000..=900_000))]
    pub transaction_timeout_ms: u64,
    /// How long to wait for acknowledgements before sending a decision again, in ms.
    #[arg(long, env = "ESK_COORDINATOR_RESEND_MS", default_value_t = 3000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub resend_ms: u64,
    /// Most records decided in one transaction.
    #[arg(long, env = "ESK_COORDINATOR_MAX_BATCH", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub max_batch: u64,
}

impl Config {
    pub fn kafka_timeout(&self) -> Duration {
        Duration::from_secs(30)
    }

    pub fn transactional_id(&self, partition: i32) -> String {
        format!("{}-coordinator-p{partition}", self.prefix)
    }

    pub fn group_id(&self) -> String {
        format!("{}-coordinator", self.prefix)
    }
}
