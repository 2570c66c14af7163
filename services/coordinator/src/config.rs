//! The coordinator's configuration: flags with environment fallbacks.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(name = "esk-coordinator", version, about = "esk's coordinator: 2PC over prepare/commit topics")]
pub struct Config {
    /// Kafka bootstrap servers, host:port[,host:port...].
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS", default_value = "127.0.0.1:9092")]
    pub bootstrap_servers: String,
    /// Kafka client properties (librdkafka names: TLS, SASL, tuning) from a
    /// Java-style properties file, as Kafka's tools take `--command-config`.
    /// Each `ESK_KAFKA_<PROPERTY>` variable applies on top (`_` for `.`, `__`
    /// for `_`: `ESK_KAFKA_SECURITY_PROTOCOL=SASL_SSL`). Properties esk's
    /// guarantees rest on (isolation.level, enable.idempotence,
    /// transactional.id, partitioner, acks, group.id, ...) are refused.
    #[arg(long, env = "ESK_KAFKA_CONFIG")]
    pub kafka_config: Option<PathBuf>,
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
    /// Most records decided in one transaction (of a shard, over all its
    /// partitions), or 4 MiB of them.
    #[arg(long, env = "ESK_COORDINATOR_MAX_BATCH", default_value_t = 2_000,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_batch: u64,
    /// Microseconds a shard waits after a commit, for each partition the
    /// transaction wrote, before it begins its next (records arriving
    /// meanwhile join it): the broker writes the commit markers after it has
    /// answered the commit, and refuses the next transaction until they are
    /// written (CONCURRENT_TRANSACTIONS, retried 20 ms later), as for the
    /// writer. 0 turns it off; the wait is at most 100 ms.
    #[arg(long, env = "ESK_COORDINATOR_COMMIT_GAP_US", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub commit_gap_us: u64,
    /// Folder of the local store of ended transactions
    /// (`<data-dir>/<prefix>-coordinator-<instance>`).
    #[arg(long, env = "ESK_DATA_DIR", default_value = ".esk/data")]
    pub data_dir: PathBuf,
    /// This instance's name, for its local store. Unset, the first of 0, 1,
    /// 2, ... whose store no other running coordinator holds.
    #[arg(long, env = "ESK_COORDINATOR_INSTANCE")]
    pub instance: Option<String>,
    /// How long an ended transaction is remembered (a retry of its txid gets
    /// its outcome, `esk tx status` knows it), e.g. 24h, 7d; then its log
    /// record is tombstoned. Default: how long the transaction requests topic
    /// keeps requests, which `esk topics init --idempotency-horizon` set;
    /// never shorter (the coordinator refuses to start otherwise).
    #[arg(long, env = "ESK_COORDINATOR_IDEMPOTENCY_HORIZON", value_parser = esk_runtime::parse_duration)]
    pub idempotency_horizon: Option<Duration>,
    /// Follow the whole transaction log into the local store, so that taking
    /// a partition over reads only what was written since.
    #[arg(long, env = "ESK_COORDINATOR_STANDBY", default_value_t = true, action = clap::ArgAction::Set)]
    pub standby: bool,
    /// Bounds of the HTTP server.
    #[command(flatten)]
    pub http: esk_runtime::http::HttpLimits,
}

impl Config {
    pub fn kafka_timeout(&self) -> Duration {
        Duration::from_secs(30)
    }

    /// The transactional id of shard `shard`: the same for every instance
    /// that ever owns it, so that the next owner fences the last.
    pub fn transactional_id(&self, shard: i32) -> String {
        format!("{}-coordinator-s{shard}", self.prefix)
    }

    pub fn group_id(&self) -> String {
        format!("{}-coordinator", self.prefix)
    }

    /// The local store's folder for an instance name.
    pub fn store_dir(&self, instance: &str) -> PathBuf {
        self.data_dir.join(format!("{}-coordinator-{instance}", self.prefix))
    }
}
