//! Partition ownership for esk's single-writer services (the writer, the
//! coordinator): who owns partition p of a set of co-partitioned input topics,
//! and how an owner fences the previous one.
//!
//! # Layout
//! - [`group`]: the consumer group (range assignor, so the owner of p owns p of
//!   every input topic). Each owned partition's queues are split off to a
//!   thread that runs the service's [`Handler`]; the group thread only serves
//!   the group protocol. On a revoke every handler finishes its transaction and
//!   returns before the partitions are given up.
//! - [`io`]: what a handler works with: its [`PartitionIo`] (batches from its
//!   queues, round-robin; rewinding to the committed offsets; stop-aware
//!   pauses) and [`io::fence`], which creates the partition's transactional
//!   producer (`transactional.id` per partition: `init_transactions` aborts the
//!   previous owner's open transaction at once and fences its later writes).
//! - [`txn`]: committing a batch (the handler writes where it is in its
//!   inputs on its own log), and classifying failures into abortable (abort,
//!   rewind, go on) and fatal (acquire anew).

pub mod group;
pub mod io;
pub mod txn;

pub use group::{GroupSpec, Handler, ShardSpec, run_group, serve};
pub use io::{Bounds, Incoming, Lease, PartitionIo, Phase, ShardIo, Signal, mark, own};
pub use txn::TxnError;
