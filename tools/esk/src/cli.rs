//! The command-line grammar. `esk --help` and `esk <command> --help` are the reference.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "esk", version, about = "Event sourcing on Apache Kafka", propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Kafka bootstrap servers, host:port[,host:port...].
    #[arg(long, global = true, env = "KAFKA_BOOTSTRAP_SERVERS", default_value = "127.0.0.1:9092")]
    pub bootstrap_servers: String,
    /// Kafka client properties (librdkafka names: TLS, SASL, tuning) from a
    /// Java-style properties file, as Kafka's tools take `--command-config`.
    /// Each `ESK_KAFKA_<PROPERTY>` variable applies on top (`_` for `.`, `__`
    /// for `_`: `ESK_KAFKA_SECURITY_PROTOCOL=SASL_SSL`). Properties esk's
    /// guarantees rest on (isolation.level, enable.idempotence,
    /// transactional.id, partitioner, acks, group.id, ...) are refused.
    #[arg(long, global = true, env = "ESK_KAFKA_CONFIG")]
    pub kafka_config: Option<std::path::PathBuf>,
    /// Prefix of every platform topic, so that installations can share a cluster.
    #[arg(long, global = true, env = "ESK_TOPIC_PREFIX", default_value = "esk")]
    pub prefix: String,
    /// Print one JSON document (JSON lines for event streams) on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// How long to wait for Kafka or a service before giving up (exit 5), e.g. 10s, 500ms.
    #[arg(long, global = true, env = "ESK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// The projector's HTTP address, for `esk projection` and `esk dlq replay`.
    #[arg(long, global = true, env = "ESK_PROJECTOR_URL", default_value = "http://127.0.0.1:8702")]
    pub projector_url: String,
    /// The replicas' HTTP addresses, comma-separated, for `esk replica status`.
    #[arg(long, global = true, env = "ESK_REPLICA_URLS", default_value = "http://127.0.0.1:8703")]
    pub replica_urls: String,
    /// Also the JSON Schemas in this folder (`<category>/<Type>.v<N>.json`),
    /// beside the built-in ones, as the writer and projector take them.
    #[arg(long, global = true, env = "ESK_SCHEMAS_DIR")]
    pub schemas_dir: Option<std::path::PathBuf>,
}

impl Global {
    /// The built-in schemas and `--schemas-dir`'s.
    pub fn schemas(&self) -> Result<esk_wire::SchemaRegistry, crate::exit::Failure> {
        esk_wire::SchemaRegistry::with_dir(self.schemas_dir.as_deref())
            .map_err(|e| crate::exit::Failure::invalid(format!("--schemas-dir: {e}")))
    }
}

#[derive(Debug, Subcommand)]
#[allow(clippy::enum_variant_names, reason = "the subcommand names are the CLI contract")]
pub enum Command {
    /// Create or inspect the platform topics.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Append one event to a stream, checked by expected version and schema.
    Append(AppendArgs),
    /// Append many events from JSON lines: {"stream","type","data"[,"expected_version"][,"id"]}.
    Produce(ProduceArgs),
    /// Send a command to the aggregate of a stream's category (e.g. account: OpenAccount, Deposit, Withdraw).
    Command(CommandArgs),
    /// Print a stream's events in order.
    Read(ReadArgs),
    /// Follow the event log live.
    Tail(TailArgs),
    /// 2PC transactions across streams and services, through the coordinator.
    Tx {
        #[command(subcommand)]
        command: TxCommand,
    },
    /// Read models: status and rebuilds (through the projector's HTTP API).
    Projection {
        #[command(subcommand)]
        command: ProjectionCommand,
    },
    /// Replicas: every replica's lag.
    Replica {
        #[command(subcommand)]
        command: ReplicaCommand,
    },
    /// Parked records of a consumer (writer, or a projection such as accounts).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// The Kafka ACLs each role needs on this installation (nothing is sent to Kafka).
    Acls(AclsArgs),
}

/// Whom the ACLs of `esk acls` are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Role {
    Writer,
    Coordinator,
    Projector,
    Replica,
    /// Appends, commands, transactions and reads (`esk` and esk-client).
    Client,
    /// esk-gateway: a client, and the console's reads of the coordinator's
    /// log and the dead letters.
    Gateway,
}

impl Role {
    pub const ALL: [Role; 6] =
        [Role::Writer, Role::Coordinator, Role::Projector, Role::Replica, Role::Client, Role::Gateway];

    pub fn name(self) -> &'static str {
        match self {
            Role::Writer => "writer",
            Role::Coordinator => "coordinator",
            Role::Projector => "projector",
            Role::Replica => "replica",
            Role::Client => "client",
            Role::Gateway => "gateway",
        }
    }
}

#[derive(Debug, Args)]
pub struct AclsArgs {
    /// Only this role's ACLs.
    #[arg(long)]
    pub role: Option<Role>,
    /// The principal of a role, ROLE=User:name (default User:<role>); repeatable.
    #[arg(long, value_name = "ROLE=PRINCIPAL")]
    pub principal: Vec<String>,
    /// A projection the projectors run, for its dead-letter topic
    /// `<prefix>.dlq.<name>`; repeatable (default: the built-in `accounts`).
    /// A service of your own on the esk library names its projections here.
    #[arg(long = "projection", value_name = "NAME")]
    pub projections: Vec<String>,
    /// A bounded context beside the default one, for its writers' topics,
    /// group and transactional ids and what clients, the coordinator and
    /// replicas need of it; repeatable.
    #[arg(long = "context", value_name = "NAME")]
    pub contexts: Vec<String>,
    /// Print `kafka-acls` arguments, one ACL a line, to run as an admin:
    /// `esk acls --commands | while read -r a; do kafka-acls.sh
    /// --bootstrap-server HOST:PORT --command-config admin.properties $a; done`.
    #[arg(long)]
    pub commands: bool,
}

#[derive(Debug, Subcommand)]
pub enum TxCommand {
    /// Move AMOUNT from one account to another, all or nothing.
    Transfer {
        /// The account to debit, e.g. account-1.
        from: String,
        /// The account to credit, e.g. account-2.
        to: String,
        /// Whole minor units, at least 1.
        #[arg(allow_hyphen_values = true)]
        amount: String,
        #[command(flatten)]
        tx: TxArgs,
    },
    /// Run a transaction from a file: {"participants": [{"stream","command","data"}], "timeout_ms"?}.
    Run {
        /// The transaction file, or - for standard input.
        #[arg(long, short)]
        file: String,
        #[command(flatten)]
        tx: TxArgs,
    },
    /// A transaction's state: pending, committed, aborted or unknown.
    Status { txid: String },
}

#[derive(Debug, Args)]
pub struct TxArgs {
    /// The transaction id; choosing it makes a retry after a timeout safe (default: a new UUID).
    #[arg(long)]
    pub txid: Option<String>,
    /// How long the participants have to vote before the coordinator aborts.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub tx_timeout: Duration,
    /// Send participants of categories esk does not ship (a service's own
    /// aggregates, which the coordinator running them checks) without
    /// checking their categories and commands here against the built-in
    /// `account` and `inventory`.
    #[arg(long)]
    pub any_category: bool,
}

#[derive(Debug, Subcommand)]
pub enum ProjectionCommand {
    /// Every projection's version, progress, lag per partition and events/s.
    Status,
    /// Build a fresh copy of a projection from offset 0 beside the live one, then switch.
    Rebuild {
        /// The projection, e.g. accounts.
        name: String,
        /// Start it and return at once instead of waiting for the switch.
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReplicaCommand {
    /// Applied position, high watermark and lag (records, ms) per partition of every replica.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// The parked records, with their origin and the reason.
    List {
        /// writer, coordinator, or a projection's name.
        consumer: String,
        /// The writers of this bounded context (with `writer`; default: the
        /// default context's).
        #[arg(long, value_name = "NAME")]
        context: Option<String>,
    },
    /// Apply parked events again (a projection: each once per model version,
    /// only those the model parked), or send parked requests to their topic
    /// again (writer, coordinator: each once, across runs).
    Replay {
        /// writer, coordinator, or a projection's name.
        consumer: String,
        /// The writers of this bounded context (with `writer`; default: the
        /// default context's).
        #[arg(long, value_name = "NAME")]
        context: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct AppendArgs {
    /// The stream, <category>-<id>, e.g. order-17.
    pub stream: String,
    /// The event type, e.g. OrderPlaced.
    #[arg(value_name = "TYPE")]
    pub event_type: String,
    /// The event data as JSON, or @FILE to read it from a file.
    #[arg(value_name = "DATA_JSON")]
    pub data: String,
    /// any, no-stream, exists, or the version the stream must be at.
    #[arg(long, default_value = "any")]
    pub expected_version: String,
    /// The event id (a UUID); a retry with the same id at the same expected version writes nothing twice.
    #[arg(long)]
    pub event_id: Option<String>,
    /// The request id; a retry with the same id gets the first answer and writes nothing twice.
    #[arg(long)]
    pub request_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// JSON-lines file, or - for standard input.
    #[arg(long, short)]
    pub file: String,
    /// Requests in flight at once. Lines of one stream are still appended in file order.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub in_flight: u64,
    /// Most lines of one stream merged into one request (one append: all of
    /// them or none), where each line's outcome is the one it would have
    /// alone: lines expecting any (or exists, after one expecting any) merge;
    /// a line expecting a version is sent alone. 1 sends a request a line.
    /// Lines of different streams may be appended in another order than the
    /// file's.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub merge: u64,
}

#[derive(Debug, Args)]
pub struct CommandArgs {
    /// The stream, e.g. account-42.
    pub stream: String,
    /// The command, e.g. Deposit.
    #[arg(value_name = "COMMAND")]
    pub command: String,
    /// The command data as JSON, e.g. '{"amount": 100}', or @FILE.
    #[arg(value_name = "DATA_JSON")]
    pub data: String,
    /// any, no-stream, exists, or the version the stream must be at.
    #[arg(long, default_value = "any")]
    pub expected_version: String,
    /// The request id; a retry with the same id gets the first answer.
    #[arg(long)]
    pub request_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct ReadArgs {
    /// The stream, e.g. account-42.
    pub stream: String,
    /// The first version to print.
    #[arg(long, default_value_t = 1)]
    pub from_version: u64,
}

#[derive(Debug, Args)]
pub struct TailArgs {
    /// Only this category's events.
    #[arg(long)]
    pub category: Option<String>,
    /// Start at the oldest event instead of the newest.
    #[arg(long)]
    pub from_beginning: bool,
    /// Stop after this many events.
    #[arg(long)]
    pub limit: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Create every platform topic with its configs. Idempotent: existing topics are kept.
    Init(InitArgs),
    /// Show the platform topics that exist, their partitions, replication and
    /// configs, and the contexts: which categories each claimed, and their
    /// topics.
    Describe,
}

#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// Also make the topics of this bounded context (ADR 13):
    /// `<prefix>.<context>.commands`, `.state`, `.answers`, `.tx.prepare`,
    /// `.tx.commit`, `.dlq.writer` and `.shards`, for a writer started with
    /// `--context NAME`. `--partitions` and `--shards` are then the context's
    /// (default: the installation's).
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
    /// Partitions of every co-partitioned topic (default 12, or what an existing installation has).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub partitions: Option<i32>,
    /// Shards (default 1, or what an existing installation has): shard k is
    /// every partition p with p % shards == k, owned by one writer instance
    /// and one coordinator instance at a time, each writing it in one Kafka
    /// transaction at a time. One shard batches best; more spread the load
    /// over instances. Fixed once created: changing it needs every writer and
    /// coordinator stopped.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub shards: Option<i32>,
    /// Replicas per partition (default: 3, or the number of brokers if fewer).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=100))]
    pub replication_factor: Option<i32>,
    /// How long a retried request or transaction is answered with its first
    /// result (e.g. 24h, 7d; default 7d, or what the installation has): the
    /// request topics keep requests this long, the writer's answers too.
    #[arg(long, value_parser = esk_runtime::parse_duration)]
    pub idempotency_horizon: Option<Duration>,
}

/// A wait: `10s`, `500ms`, `2m` or a bare number of seconds, less than a day.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = esk_runtime::parse_duration(s)?;
    if d >= Duration::from_secs(86_400) {
        return Err(format!("'{}' is out of range; give more than 0 and less than a day", s.trim()));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("25h").is_err());
    }

    #[test]
    fn the_grammar_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
