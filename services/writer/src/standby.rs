//! The hot standby: every writer instance follows the whole state and
//! answers topics into its local store (with the replicas' follower code), so
//! that when it takes a partition over the store is near the topics' ends and
//! the restore reads only what was written since. It holds nothing in memory
//! but the store's page cache: the streams and answers are on disk.
//!
//! An owner writes its own partition's file after each commit; the standby
//! passes the partitions this instance owns over, and reads one again from
//! its store's position once it is given up.

use std::sync::Arc;

use anyhow::Result;
use esk_domain::Registry;
use esk_follower::Follower;
use esk_follower::store::{Owned, StoreSink};
use esk_kafka::KafkaConfig;
use esk_store::Store;
use esk_wire::Topics;

use crate::memory::{AnswersIntake, StateIntake};

/// Followers of the state and answers topics into `store`.
pub fn spawn(
    kafka: &KafkaConfig,
    topics: &Topics,
    group: &str,
    store: &Arc<Store>,
    aggregates: Registry,
    horizon_ms: i64,
    owned: &Owned,
) -> Result<(Follower, Follower)> {
    let state = StoreSink::new(store.clone(), topics.state(), StateIntake::new(aggregates), owned.clone());
    let answers = StoreSink::new(store.clone(), topics.answers(), AnswersIntake { horizon_ms }, owned.clone());
    Ok((
        esk_follower::spawn(kafka, &topics.state(), &format!("{group}-state"), state)?,
        esk_follower::spawn(kafka, &topics.answers(), &format!("{group}-answers"), answers)?,
    ))
}
