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

/// The topic names of one esk installation. The prefix lets tests and tenants
/// share a cluster (`ESK_TOPIC_PREFIX`, default `esk`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self::new("esk")
    }
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
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
        format!("{}.commands", self.prefix)
    }

    pub fn events(&self, category: &str) -> String {
        format!("{}.events.{category}", self.prefix)
    }

    /// The prefix shared by every events topic, for subscriptions by pattern.
    pub fn events_prefix(&self) -> String {
        format!("{}.events.", self.prefix)
    }

    pub fn state(&self) -> String {
        format!("{}.state", self.prefix)
    }

    /// What the writer remembers for the idempotency horizon: answered
    /// requests and applied 2PC decisions (co-partitioned, delete policy,
    /// retention = the horizon).
    pub fn answers(&self) -> String {
        format!("{}.answers", self.prefix)
    }

    pub fn replies(&self) -> String {
        format!("{}.replies", self.prefix)
    }

    pub fn tx_requests(&self) -> String {
        format!("{}.tx.requests", self.prefix)
    }

    pub fn tx_prepare(&self) -> String {
        format!("{}.tx.prepare", self.prefix)
    }

    pub fn tx_commit(&self) -> String {
        format!("{}.tx.commit", self.prefix)
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
        format!("{}.shards", self.prefix)
    }

    pub fn dlq(&self, consumer: &str) -> String {
        format!("{}.dlq.{consumer}", self.prefix)
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
    }

    #[test]
    fn prefix_must_be_a_legal_topic_name() {
        assert!(Topics::validate_prefix("esk").is_ok());
        assert!(Topics::validate_prefix("test_1-a.b").is_ok());
        assert!(Topics::validate_prefix("").is_err());
        assert!(Topics::validate_prefix("a/b").unwrap_err().contains("'/'"));
    }
}
