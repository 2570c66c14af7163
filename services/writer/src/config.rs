//! The writer's configuration: flags with environment fallbacks. `esk-writer --help`
//! is the reference.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(name = "esk-writer", version, about = "esk's writer: the single writer of each partition")]
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
    /// The bounded context this writer serves (ADR 13): its requests, state,
    /// answers and 2PC topics are `<prefix>.<context>.*` (`esk topics init
    /// --context NAME` makes them), its group and transactional ids
    /// `<prefix>-<context>-writer*`. `default`: the installation's own
    /// topics, which also take requests for every category no context claims.
    #[arg(long, env = "ESK_CONTEXT", default_value = esk_wire::topics::DEFAULT_CONTEXT,
          value_parser = esk_wire::topics::parse_context)]
    pub context: String,
    /// Which of the built-in aggregates the `esk-writer` program serves
    /// (comma-separated: `account`, `inventory`; `none` for raw appends
    /// only). Default: both. A library writer serves what it is given instead.
    #[arg(long, env = "ESK_WRITER_AGGREGATES", value_delimiter = ',', default_value = "account,inventory")]
    pub aggregates: Vec<String>,
    /// Categories this writer takes raw appends for without an aggregate
    /// (comma-separated): claimed for its context at start, as the
    /// categories of its aggregates are.
    #[arg(long, env = "ESK_WRITER_CATEGORIES", value_delimiter = ',', value_parser = parse_category)]
    pub categories: Vec<String>,
    /// Address of the HTTP endpoint (/health, /metrics, /status).
    #[arg(long, env = "ESK_WRITER_HTTP", default_value = "127.0.0.1:8701")]
    pub http_addr: String,
    /// Consumer-group session timeout in ms: how soon another instance takes over
    /// the partitions of one that died.
    #[arg(long, env = "ESK_WRITER_SESSION_TIMEOUT_MS", default_value_t = 6000,
          value_parser = clap::value_parser!(u64).range(1000..=300_000))]
    pub session_timeout_ms: u64,
    /// Kafka transaction timeout in ms.
    #[arg(long, env = "ESK_WRITER_TRANSACTION_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1000..=900_000))]
    pub transaction_timeout_ms: u64,
    /// Most records decided in one transaction (of a shard, over all its
    /// partitions). Batches form by themselves under load; a lone request is
    /// never held back.
    #[arg(long, env = "ESK_WRITER_MAX_BATCH", default_value_t = 2_000,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_batch: u64,
    /// Most bytes of requests (keys and values) decided in one transaction:
    /// a batch stops growing at this or at `--max-batch` records, whichever
    /// comes first (a lone larger request is still taken). What a batch
    /// writes is several times what it reads, and all of it is held until the
    /// commit.
    #[arg(long, env = "ESK_WRITER_MAX_BATCH_BYTES", default_value_t = 4 << 20,
          value_parser = clap::value_parser!(u64).range(1..=(256 << 20)))]
    pub max_batch_bytes: u64,
    /// Microseconds a shard waits after a commit, for each partition the
    /// transaction wrote, before it begins its next transaction (records
    /// arriving meanwhile join it). The broker writes a transaction's commit
    /// markers, one a partition written, after it has answered the commit; a
    /// transaction begun before they are written is refused
    /// (CONCURRENT_TRANSACTIONS) and librdkafka asks again only 20 ms later.
    /// 100 µs: a lone append (four partitions written) waits 0.4 ms, a
    /// transaction over twelve busy partitions (37) 3.7 ms; a flat 1 ms left
    /// the refused starts of the large ones, a flat 3 ms held every lone
    /// request 3 ms (ADR 11). 0 turns it off; the wait is at most 100 ms.
    #[arg(long, env = "ESK_WRITER_COMMIT_GAP_US", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub commit_gap_us: u64,
    /// Most microseconds a busy shard waits after a commit, so that its next
    /// batch fills: the commit gap plus 5 ms for each record of the batch
    /// just committed beyond the first, up to this. Off by default: a shard's
    /// batch fills by itself while its transaction runs (measured at 64 and
    /// 256 in flight, 5 ms of linger lowered appends/s; ADR 11). At most
    /// 100 ms.
    #[arg(long, env = "ESK_WRITER_BATCH_LINGER_US", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub batch_linger_us: u64,
    /// Follow the whole state and answers topics into the local store as a hot
    /// standby, so that taking a partition over reads only what was written
    /// since (disk: every stream and the answers of one horizon; memory: the
    /// store's page cache).
    #[arg(long, env = "ESK_WRITER_STANDBY", default_value_t = true, action = clap::ArgAction::Set)]
    pub standby: bool,
    /// Folder of the local stores (`<data-dir>/<prefix>[-<context>]-writer-<instance>`).
    #[arg(long, env = "ESK_DATA_DIR", default_value = ".esk/data")]
    pub data_dir: PathBuf,
    /// This instance's name, for its local store. Unset, the first of 0, 1,
    /// 2, ... whose store no other running writer holds.
    #[arg(long, env = "ESK_WRITER_INSTANCE")]
    pub instance: Option<String>,
    /// How long a retried request or 2PC decision is answered with its first
    /// result, e.g. 24h, 7d. Default: the installation's, which `esk topics
    /// init --idempotency-horizon` set (the commands topic's retention). Never
    /// shorter than the commands topic keeps requests, and the answers topic
    /// must keep answers a tenth longer (the clock margin): the writer refuses
    /// to start otherwise.
    #[arg(long, env = "ESK_WRITER_IDEMPOTENCY_HORIZON", value_parser = esk_runtime::parse_duration)]
    pub idempotency_horizon: Option<Duration>,
    /// Stream records kept in memory per owned partition (the rest are read
    /// from the local store when needed).
    #[arg(long, env = "ESK_WRITER_STREAM_CACHE", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub stream_cache: u64,
    /// How long after its transaction's deadline a hold still open makes the
    /// writer ask the coordinator for the decision (then again as often).
    #[arg(long, env = "ESK_WRITER_HOLD_GRACE_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub hold_grace_ms: u64,
    /// Also load the JSON Schemas in this folder (`<category>/<Type>.v<N>.json`):
    /// each category found becomes strict. esk's shipped schemas
    /// (`schemas/account`, `schemas/inventory`) hold only for the categories
    /// of the built-in aggregates this writer runs.
    #[arg(long, env = "ESK_SCHEMAS_DIR")]
    pub schemas_dir: Option<PathBuf>,
    /// Bounds of the HTTP server.
    #[command(flatten)]
    pub http: esk_runtime::http::HttpLimits,
}

fn parse_category(s: &str) -> Result<String, String> {
    if esk_wire::stream::is_valid_category(s) {
        Ok(s.to_owned())
    } else {
        Err(format!("category '{s}': lowercase letters, digits and '_', at most 64, starting with a letter"))
    }
}

impl Config {
    /// The installation's topics, with this writer's context's own.
    pub fn topics(&self) -> esk_wire::Topics {
        esk_wire::Topics::new(&self.prefix).in_context(&self.context)
    }

    /// What the writer's group, transactional ids and store are named by
    /// ([`esk_wire::Topics::scope`]).
    fn scope(&self) -> String {
        self.topics().scope()
    }

    /// Bound on any single Kafka call (metadata, commit, restore step).
    pub fn kafka_timeout(&self) -> Duration {
        Duration::from_secs(30)
    }

    /// The transactional id of writer shard `shard`: the same for every
    /// instance that ever owns the shard, so that the next owner fences the
    /// last.
    pub fn transactional_id(&self, shard: i32) -> String {
        format!("{}-writer-s{shard}", self.scope())
    }

    pub fn group_id(&self) -> String {
        format!("{}-writer", self.scope())
    }

    /// The local store's folder for an instance name.
    pub fn store_dir(&self, instance: &str) -> PathBuf {
        self.data_dir.join(format!("{}-writer-{instance}", self.scope()))
    }
}
