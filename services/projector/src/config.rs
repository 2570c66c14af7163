//! The projector's configuration: flags with environment fallbacks.

use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(name = "esk-projector", version, about = "esk's projector: read models with read-your-writes queries")]
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
    /// Address of the HTTP endpoint.
    #[arg(long, env = "ESK_PROJECTOR_HTTP", default_value = "127.0.0.1:8702")]
    pub http_addr: String,
    /// Folder of the local stores (one SQLite file per model version).
    #[arg(long, env = "ESK_DATA_DIR", default_value = ".esk/data")]
    pub data_dir: PathBuf,
    /// This instance's name: every instance keeps a full copy of the models, in
    /// its own store and consumer group.
    #[arg(long, env = "ESK_PROJECTOR_INSTANCE", default_value = "0")]
    pub instance: String,
    /// Most events applied in one store transaction.
    #[arg(long, env = "ESK_PROJECTOR_MAX_BATCH", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_batch: u64,
    /// Longest a query waits for a read-your-writes token, in ms (a query may ask
    /// for less with `timeout_ms`).
    #[arg(long, env = "ESK_PROJECTOR_MAX_WAIT_MS", default_value_t = 30_000)]
    pub max_wait_ms: u64,
    /// Also load the JSON Schemas in this folder. esk's shipped schemas hold
    /// only for the categories of the built-in model it runs (`accounts`).
    #[arg(long, env = "ESK_SCHEMAS_DIR")]
    pub schemas_dir: Option<PathBuf>,
    /// Bounds of the HTTP server.
    #[command(flatten)]
    pub http: esk_runtime::http::HttpLimits,
}

impl Config {
    pub fn store_dir(&self, projection: &str) -> PathBuf {
        self.data_dir.join(format!("{}-projector-{}", self.prefix, self.instance)).join(projection)
    }

    pub fn group_id(&self, projection: &str) -> String {
        format!("{}-projector-{}-{projection}", self.prefix, self.instance)
    }
}
