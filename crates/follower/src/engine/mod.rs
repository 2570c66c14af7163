//! The engine every follower of a log runs on: the replica and the writer's
//! and coordinator's hot standbys ([`crate::Follower`]), and the projector's
//! read models (`esk_projection::runner`).
//!
//! Each follows topics with `read_committed` (a write of an aborted Kafka
//! transaction is never seen) and applies a batch of records together with
//! its new positions in one local transaction, so that a crash never leaves
//! it ahead of, or out of step with, what it says it applied. What differs is
//! the store and what a record means; what they share is here, by concern:
//!
//! - [`poll`]: a batch of records, and the end of a batch when the brokers
//!   refuse the client (credentials, an ACL: no retry mends that);
//! - [`published`]: what a follower applied, for read-your-writes waits, the
//!   position its consumer stood at when it last found nothing new (past the
//!   transaction markers that follow the last applied record), and why it
//!   stopped for good;
//! - [`lag`]: applied positions against the high watermarks, sampled once a
//!   second on a thread of its own, so that `/status` and `/ready` never wait
//!   on Kafka;
//! - [`backoff`]: the pause between tries of a batch whose local store
//!   failed (100 ms doubling to 5 s), so a failing store never spins.

pub mod backoff;
pub mod lag;
pub mod poll;
pub mod published;

use std::collections::BTreeMap;

/// The next offset to read, per (topic, partition).
pub type Positions = BTreeMap<(String, i32), i64>;
