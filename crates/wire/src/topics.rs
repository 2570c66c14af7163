//! Names of the platform topics (DESIGN section 2) under a configurable prefix.

/// Checks a projection's name: it names the projection's store, its group
/// and its dead-letter topic `<prefix>.dlq.<name>`, so it is category-like
/// (lowercase letters and digits, at most 64) and not `writer` or
/// `coordinator`, whose dead-letter topics hold other records.
pub fn check_projection_name(name: &str) -> Result<(), String> {
    if crate::stream::is_valid_category(name) && !matches!(name, "writer" | "coordinator") {
        return Ok(());
    }
    Err(format!(
        "projection name '{}': it names a store, a group and the dead-letter topic <prefix>.dlq.<name>, so it must be \
         lowercase letters and digits (at most 64), and not 'writer' or 'coordinator'",
        crate::limits::shorten(name, 80)
    ))
}

/// The context whose topics have the installation's own names
/// (`<prefix>.commands`, ...): every installation made before contexts, and
/// the categories no other context claims.
pub const DEFAULT_CONTEXT: &str = "default";

/// Names a context may not take: its topics `<prefix>.<context>.*` would
/// share a namespace with events (`<prefix>.events.*`), dead letters
/// (`<prefix>.dlq.*`) or the coordinator's topics (`<prefix>.tx.*`).
const RESERVED_CONTEXTS: [&str; 3] = ["events", "dlq", "tx"];

/// Checks a bounded context's name: lowercase letters, digits and `_`
/// (at most 64, starting with a letter), as a category, and not a reserved
/// namespace.
pub fn check_context_name(name: &str) -> Result<(), String> {
    if crate::stream::is_valid_category(name) && !RESERVED_CONTEXTS.contains(&name) {
        return Ok(());
    }
    Err(format!(
        "context name '{}': it names topics <prefix>.<context>.*, so it must be lowercase letters, digits and '_' \
         (at most 64, starting with a letter), and not {}",
        crate::limits::shorten(name, 80),
        RESERVED_CONTEXTS.join(", ")
    ))
}

/// A context named on a command line or in the environment: `default`, or a
/// name [`check_context_name`] takes.
pub fn parse_context(s: &str) -> Result<String, String> {
    if s != DEFAULT_CONTEXT {
        check_context_name(s)?;
    }
    Ok(s.to_owned())
}

/// The topic names of one esk installation. The prefix lets tests and tenants
/// share a cluster (`ESK_TOPIC_PREFIX`, default `esk`).
///
/// A bounded context (ADR 13) has its own requests, state, answers, 2PC
/// prepare and commit, shards and writer dead-letter topics,
/// `<prefix>.<context>.commands` and so on; the default context's are the
/// installation's own names. Events, replies, the coordinator's topics and
/// projections' dead letters are the installation's whatever the context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
    /// `None`: the default context.
    context: Option<String>,
}

impl Default for Topics {
    fn default() -> Self {
        Self::new("esk")
    }
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into(), context: None }
    }

    /// The same installation's topics, for a context's writer (the default
    /// context for [`DEFAULT_CONTEXT`]). The name is not checked here: see
    /// [`check_context_name`].
    pub fn in_context(&self, context: &str) -> Self {
        let context = (context != DEFAULT_CONTEXT).then(|| context.to_owned());
        Self { prefix: self.prefix.clone(), context }
    }

    /// The context these topics' context-owned names are of.
    pub fn context(&self) -> &str {
        self.context.as_deref().unwrap_or(DEFAULT_CONTEXT)
    }

    /// A context-owned topic: `<prefix>.<context>.<name>`, or
    /// `<prefix>.<name>` in the default context.
    fn owned(&self, name: &str) -> String {
        match &self.context {
            Some(c) => format!("{}.{c}.{name}", self.prefix),
            None => format!("{}.{name}", self.prefix),
        }
    }

    /// What a context's groups, transactional ids and stores are named by:
    /// `<prefix>`, or `<prefix>-<context>` outside the default context (the
    /// writers' group is `<scope>-writer`).
    pub fn scope(&self) -> String {
        match &self.context {
            Some(c) => format!("{}-{c}", self.prefix),
            None => self.prefix.clone(),
        }
    }

    /// The registry of contexts: which context owns each claimed category
    /// (one partition, kept forever; the first claim of a category wins).
    pub fn contexts(&self) -> String {
        format!("{}.contexts", self.prefix)
    }

    /// Checks that a prefix gives legal Kafka topic names.
    pub fn validate_prefix(prefix: &str) -> Result<(), String> {
        if prefix.is_empty() {
            return Err("topic prefix is empty".into());
        }
        if prefix.len() > 100 {
            return Err(format!("topic prefix is {} characters; at most 100", prefix.len()));
        }
        if let Some(c) = prefix.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
            return Err(format!(
                "topic prefix '{prefix}' contains {c:?}: Kafka topic names use a-z, A-Z, 0-9, '.', '_' and '-'"
            ));
        }
        Ok(())
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn commands(&self) -> String {
        self.owned("commands")
    }

    pub fn events(&self, category: &str) -> String {
        format!("{}.events.{category}", self.prefix)
    }

    /// The prefix shared by every events topic, for subscriptions by pattern.
    pub fn events_prefix(&self) -> String {
        format!("{}.events.", self.prefix)
    }

    pub fn state(&self) -> String {
        self.owned("state")
    }

    /// What the writer remembers for the idempotency horizon: answered
    /// requests and applied 2PC decisions (co-partitioned, delete policy,
    /// retention = the horizon).
    pub fn answers(&self) -> String {
        self.owned("answers")
    }

    pub fn replies(&self) -> String {
        format!("{}.replies", self.prefix)
    }

    pub fn tx_requests(&self) -> String {
        format!("{}.tx.requests", self.prefix)
    }

    pub fn tx_prepare(&self) -> String {
        self.owned("tx.prepare")
    }

    pub fn tx_commit(&self) -> String {
        self.owned("tx.commit")
    }

    pub fn tx_votes(&self) -> String {
        format!("{}.tx.votes", self.prefix)
    }

    pub fn tx_log(&self) -> String {
        format!("{}.tx.log", self.prefix)
    }

    /// One partition per shard, nothing written to it: the writer group's
    /// and the coordinator group's assignments of these partitions say which
    /// instance owns which shard of the co-partitioned topics (shard k: every
    /// partition p with p % shards == k).
    pub fn shards(&self) -> String {
        self.owned("shards")
    }

    /// The dead-letter topic of a projection or of the coordinator.
    pub fn dlq(&self, consumer: &str) -> String {
        format!("{}.dlq.{consumer}", self.prefix)
    }

    /// The dead-letter topic of this context's writers (`esk dlq replay
    /// writer` sends its records back to this context's commands topic).
    pub fn writer_dlq(&self) -> String {
        self.owned("dlq.writer")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_design() {
        let t = Topics::new("t1");
        assert_eq!(t.commands(), "t1.commands");
        assert_eq!(t.events("account"), "t1.events.account");
        assert_eq!(t.tx_log(), "t1.tx.log");
        assert_eq!(t.answers(), "t1.answers");
        assert_eq!(t.dlq("writer"), "t1.dlq.writer");
        assert_eq!(t.shards(), "t1.shards");
        assert_eq!(t.writer_dlq(), "t1.dlq.writer");
        assert_eq!(t.contexts(), "t1.contexts");
    }

    #[test]
    fn a_context_owns_its_requests_state_and_2pc_topics_and_shares_the_rest() {
        let t = Topics::new("t1").in_context("payments");
        assert_eq!(t.context(), "payments");
        assert_eq!(t.commands(), "t1.payments.commands");
        assert_eq!(t.state(), "t1.payments.state");
        assert_eq!(t.answers(), "t1.payments.answers");
        assert_eq!(t.tx_prepare(), "t1.payments.tx.prepare");
        assert_eq!(t.tx_commit(), "t1.payments.tx.commit");
        assert_eq!(t.shards(), "t1.payments.shards");
        assert_eq!(t.writer_dlq(), "t1.payments.dlq.writer");
        assert_eq!(t.events("account"), "t1.events.account");
        assert_eq!(t.replies(), "t1.replies");
        assert_eq!(t.tx_votes(), "t1.tx.votes");
        assert_eq!(t.tx_requests(), "t1.tx.requests");
        assert_eq!(t.dlq("orders"), "t1.dlq.orders");
        assert_eq!(t.contexts(), "t1.contexts");
        assert_eq!(t.in_context(DEFAULT_CONTEXT), Topics::new("t1"));
        assert_eq!((t.scope(), Topics::new("t1").scope()), ("t1-payments".to_owned(), "t1".to_owned()));
        assert_eq!(Topics::new("t1").context(), DEFAULT_CONTEXT);
    }

    #[test]
    fn context_names_stay_out_of_the_installation_namespaces() {
        for good in ["payments", "inventory2", "order_mgmt"] {
            check_context_name(good).unwrap();
        }
        for bad in ["events", "dlq", "tx", "", "Payments", "a.b", "1x", &"x".repeat(65)] {
            assert!(check_context_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefix_must_be_a_legal_topic_name() {
        assert!(Topics::validate_prefix("esk").is_ok());
        assert!(Topics::validate_prefix("test_1-a.b").is_ok());
        assert!(Topics::validate_prefix("").is_err());
        assert!(Topics::validate_prefix("a/b").unwrap_err().contains("'/'"));
    }
}
