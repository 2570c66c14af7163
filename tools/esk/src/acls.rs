//! `esk acls`: the Kafka ACLs each role needs on this installation's topics,
//! consumer groups and transactional ids, as a table or as `kafka-acls`
//! command lines. Nothing is sent to Kafka.
//!
//! Every resource below is what the code uses (the file is named beside it);
//! a change there must change this list, or the secured tests fail. Read and
//! Write imply Describe; DescribeConfigs does not follow from either and is
//! granted where a service reads a topic's configs (partition counts,
//! `retention.ms`, `max.message.bytes`). Families (every events topic, a
//! service's groups and transactional ids) are prefixed patterns.

use std::collections::BTreeMap;

use esk_wire::Topics;
use serde::Serialize;
use serde_json::json;

use crate::cli::{AclsArgs, Global, Role};
use crate::exit::Failure;

/// A Kafka ACL operation, by `kafka-acls --operation` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Op {
    Read,
    Write,
    Create,
    Describe,
    DescribeConfigs,
    IdempotentWrite,
}

/// A kind of Kafka resource, by `kafka-acls` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Topic,
    Group,
    TransactionalId,
    Cluster,
}

impl Kind {
    fn option(self) -> &'static str {
        match self {
            Kind::Topic => "--topic",
            Kind::Group => "--group",
            Kind::TransactionalId => "--transactional-id",
            Kind::Cluster => "--cluster",
        }
    }
}

/// Operations on resources of one kind, each named literally or by prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Acl {
    pub kind: Kind,
    /// The resource names (the cluster's is `kafka-cluster`).
    pub names: Vec<String>,
    pub prefixed: bool,
    pub operations: Vec<Op>,
    /// What in esk needs it.
    pub why: &'static str,
}

impl Acl {
    fn new(kind: Kind, names: &[String], operations: &[Op], why: &'static str) -> Self {
        Self { kind, names: names.to_vec(), prefixed: false, operations: operations.to_vec(), why }
    }

    fn prefixed(kind: Kind, name: String, operations: &[Op], why: &'static str) -> Self {
        Self { kind, names: vec![name], prefixed: true, operations: operations.to_vec(), why }
    }
}

/// Idempotent producers: brokers before Kafka 3.0 ask for IdempotentWrite on
/// the cluster (later ones accept Write on any topic instead).
fn idempotent() -> Acl {
    Acl::new(
        Kind::Cluster,
        &["kafka-cluster".into()],
        &[Op::IdempotentWrite],
        "idempotent producers (brokers before Kafka 3.0)",
    )
}

/// The ACLs of one role, for the built-in projection (`accounts`) and the
/// default context.
#[cfg(test)]
pub fn acls(role: Role, t: &Topics) -> Vec<Acl> {
    acls_for(role, t, &["accounts".to_owned()], &[])
}

/// Reading the registry of contexts (ADR 13): clients and services route by it.
fn registry(t: &Topics, write: bool) -> Vec<Acl> {
    use Op::{DescribeConfigs, Read, Write};
    // A writer describes the registry at start (`esk topics init` makes it).
    let ops: &[Op] = if write { &[Read, Write, DescribeConfigs] } else { &[Read] };
    vec![
        Acl::new(
            Kind::Topic,
            &[t.contexts()],
            ops,
            if write {
                "the registry of contexts: read to route, written to claim its categories"
            } else {
                "the registry of contexts: which context a category's requests go to"
            },
        ),
        Acl::new(Kind::Group, &[format!("{}-contexts", t.prefix())], &[Read], "the registry's reader"),
    ]
}

/// The ACLs of one role, where the projectors run `projections` and the
/// writers serve the default context and `contexts`.
pub fn acls_for(role: Role, t: &Topics, projections: &[String], contexts: &[String]) -> Vec<Acl> {
    let mut all = vec![t.in_context(esk_wire::topics::DEFAULT_CONTEXT)];
    all.extend(contexts.iter().map(|c| t.in_context(c)));
    match role {
        // services/gateway: a client (src/api.rs), and the console's reads (src/console.rs, src/subscribe.rs).
        Role::Gateway => {
            use Kind::{Group, Topic};
            let mut acls = acls_for(Role::Client, t, projections, contexts);
            let mut parked: Vec<String> = projections.iter().map(|n| t.dlq(n)).collect();
            parked.push(t.writer_dlq());
            acls.push(Acl::new(Topic, &[t.tx_log()], &[Op::Read], "the console's transactions"));
            acls.push(Acl::new(Topic, &parked, &[Op::Read], "the console's dead letters"));
            acls.push(Acl::new(
                Group,
                &[format!("{}-gateway", t.prefix())],
                &[Op::Read],
                "its subscriptions' and the console's readers (nothing is committed)",
            ));
            acls
        }
        Role::Writer => {
            let mut acls: Vec<Acl> = all.iter().flat_map(|t| acls_of(role, t, projections)).collect();
            acls.retain(|a| a.kind != Kind::Cluster);
            acls.push(idempotent());
            acls.extend(registry(t, true));
            acls
        }
        Role::Coordinator | Role::Client => {
            let mut acls = acls_of(role, t, projections);
            let (names, ops, why): (Vec<String>, &[Op], _) = if role == Role::Coordinator {
                (
                    all[1..].iter().flat_map(|t| [t.tx_prepare(), t.tx_commit()]).collect(),
                    &[Op::Write, Op::DescribeConfigs],
                    "prepares and decisions to the writers of the other contexts",
                )
            } else {
                (
                    all[1..].iter().map(Topics::commands).collect(),
                    &[Op::Write, Op::DescribeConfigs],
                    "requests to the writers of the other contexts",
                )
            };
            if !names.is_empty() {
                acls.push(Acl::new(Kind::Topic, &names, ops, why));
            }
            acls.extend(registry(t, false));
            acls
        }
        Role::Replica => all.iter().flat_map(|t| acls_of(role, t, projections)).collect(),
        Role::Projector => acls_of(role, t, projections),
    }
}

/// The ACLs of one role in the context of `t`.
fn acls_of(role: Role, t: &Topics, projections: &[String]) -> Vec<Acl> {
    use Kind::{Group, Topic, TransactionalId};
    use Op::{Create, Describe, DescribeConfigs, Read, Write};
    let p = t.prefix();
    // The writers' group and transactional ids: `<prefix>[-<context>]-writer`.
    let writer = format!("{}-writer", t.scope());
    match role {
        // services/writer: src/lib.rs (topic checks, limits, groups), worker.rs (writes), restore.rs, standby.rs.
        Role::Writer => vec![
            Acl::new(
                Topic,
                &[t.commands(), t.tx_prepare(), t.tx_commit()],
                &[Read, DescribeConfigs],
                "its group's inputs: requests, 2PC prepares and decisions",
            ),
            Acl::new(Topic, &[t.shards()], &[Read, DescribeConfigs], "its group assigns the shards"),
            Acl::new(
                Topic,
                &[t.state(), t.answers()],
                &[Read, Write, DescribeConfigs],
                "written in each transaction; read back by restores and the standby",
            ),
            Acl::new(
                Topic,
                &[t.replies(), t.tx_votes(), t.writer_dlq()],
                &[Write, DescribeConfigs],
                "replies to clients, votes to the coordinator, parked requests",
            ),
            Acl::prefixed(
                Topic,
                t.events_prefix(),
                &[Write, Create, DescribeConfigs],
                "the events; a new category's topic is created by the writer",
            ),
            Acl::prefixed(
                Group,
                writer.clone(),
                &[Read],
                "its group, and the -restore, -standby-*, -watermarks readers",
            ),
            Acl::prefixed(
                TransactionalId,
                format!("{writer}-s"),
                &[Write],
                "one transactional producer per owned shard",
            ),
            idempotent(),
        ],
        // services/coordinator: src/lib.rs, handler.rs.
        Role::Coordinator => vec![
            Acl::new(
                Topic,
                &[t.tx_requests(), t.tx_votes()],
                &[Read, DescribeConfigs],
                "its group's inputs: transactions asked for, participants' votes",
            ),
            Acl::new(Topic, &[t.shards()], &[Read, DescribeConfigs], "its group assigns the shards"),
            Acl::new(
                Topic,
                &[t.tx_log()],
                &[Read, Write, DescribeConfigs],
                "its log: written in each transaction, read back by restores and the standby",
            ),
            Acl::new(
                Topic,
                &[t.tx_prepare(), t.tx_commit(), t.replies()],
                &[Write, DescribeConfigs],
                "prepares and decisions to the writers, replies to clients",
            ),
            Acl::new(
                Topic,
                &[t.dlq("coordinator")],
                &[Write, Create, DescribeConfigs],
                "parked records; the coordinator makes sure the topic exists at start",
            ),
            Acl::prefixed(Group, format!("{p}-coordinator"), &[Read], "its group, and the -restore, -standby readers"),
            Acl::prefixed(
                TransactionalId,
                format!("{p}-coordinator-s"),
                &[Write],
                "one transactional producer per owned shard",
            ),
            idempotent(),
        ],
        // services/projector: src/lib.rs (Projector; the binary runs accounts); crates/projection/src/runner.
        Role::Projector => vec![
            Acl::prefixed(Topic, t.events_prefix(), &[Read], "the events it projects (subscribed by pattern)"),
            Acl::new(
                Topic,
                &[t.commands()],
                &[Describe, DescribeConfigs],
                "the partition count for its dead-letter topic",
            ),
            Acl::new(
                Topic,
                &projections.iter().map(|name| t.dlq(name)).collect::<Vec<_>>(),
                &[Read, Write, Create],
                "parked events of each projection, read again by replays; made at start",
            ),
            Acl::prefixed(
                Group,
                format!("{p}-projector-"),
                &[Read],
                "a group per instance and projection, and its -watermarks, -replay, -rebuild readers",
            ),
            idempotent(),
        ],
        // The client's and more: see `acls_for`.
        Role::Gateway => acls_of(Role::Client, t, projections),
        // services/replica: src/lib.rs; crates/follower.
        Role::Replica => vec![
            Acl::new(Topic, &[t.state()], &[Read], "the leader topic it follows"),
            Acl::prefixed(Group, format!("{p}-replica-"), &[Read], "a reader per instance, and its -watermarks reader"),
        ],
        // crates/client (appends, commands, transactions, reads); tools/esk/src/events.rs (tail).
        Role::Client => vec![
            Acl::new(
                Topic,
                &[t.commands(), t.tx_requests()],
                &[Write, DescribeConfigs],
                "requests and transactions; max.message.bytes bounds them",
            ),
            Acl::new(Topic, &[t.replies()], &[Read], "the answers (one partition per client)"),
            Acl::prefixed(Topic, t.events_prefix(), &[Read, DescribeConfigs], "esk read and esk tail"),
            Acl::new(
                Group,
                &[format!("{p}-client"), "esk-read".into(), "esk-tail".into()],
                &[Read],
                "the readers of replies, streams and the tail (nothing is committed)",
            ),
            idempotent(),
        ],
    }
}

/// What no role is given: an admin's jobs.
const ADMIN_ONLY: &[&str] = &[
    "esk topics init creates the topics: Create on them (or on the cluster) and DescribeConfigs; run it as an admin",
    "esk dlq replay writes parked records back to their topics (tx.commit among them), with group and transactional \
     id <prefix>-dlq-replay-<consumer>; esk dlq list reads <prefix>.dlq.<consumer> with group esk-dlq: run them as \
     an admin",
];

/// The roles asked for, each with its principal.
fn chosen(args: &AclsArgs) -> Result<Vec<(Role, String)>, Failure> {
    let mut principals: BTreeMap<Role, String> = BTreeMap::new();
    for given in &args.principal {
        let (role, principal) = given
            .split_once('=')
            .ok_or_else(|| Failure::invalid(format!("--principal '{given}': give ROLE=User:name")))?;
        let role = <Role as clap::ValueEnum>::from_str(role, true).map_err(|_| {
            Failure::invalid(format!(
                "--principal '{given}': '{role}' is no role (writer, coordinator, projector, replica, client, gateway)"
            ))
        })?;
        if !principal.contains(':') || principal.ends_with(':') {
            return Err(Failure::invalid(format!("--principal '{given}': a principal is TYPE:name, e.g. User:alice")));
        }
        principals.insert(role, principal.to_owned());
    }
    let roles = match args.role {
        Some(r) => vec![r],
        None => Role::ALL.to_vec(),
    };
    Ok(roles
        .into_iter()
        .map(|r| (r, principals.get(&r).cloned().unwrap_or_else(|| format!("User:{}", r.name()))))
        .collect())
}

/// The arguments of one `kafka-acls --add` (after `--bootstrap-server` and `--command-config`).
pub fn command_line(principal: &str, acl: &Acl) -> String {
    let mut args = vec!["--add".to_owned(), "--allow-principal".into(), principal.to_owned()];
    for op in &acl.operations {
        args.push("--operation".into());
        args.push(format!("{op:?}"));
    }
    if acl.kind == Kind::Cluster {
        args.push("--cluster".into());
    } else {
        for name in &acl.names {
            args.push(acl.kind.option().into());
            args.push(name.clone());
        }
    }
    if acl.prefixed {
        args.push("--resource-pattern-type".into());
        args.push("prefixed".into());
    }
    args.join(" ")
}

/// The projections asked for (`accounts` when none), each a name a projector runs.
fn projections(args: &AclsArgs) -> Result<Vec<String>, Failure> {
    if args.projections.is_empty() {
        return Ok(vec!["accounts".into()]);
    }
    for name in &args.projections {
        esk_wire::topics::check_projection_name(name).map_err(|e| Failure::invalid(format!("--projection: {e}")))?;
    }
    Ok(args.projections.clone())
}

pub fn run(g: &Global, args: &AclsArgs) -> Result<(), Failure> {
    Topics::validate_prefix(&g.prefix).map_err(Failure::invalid)?;
    let topics = Topics::new(&g.prefix);
    let roles = chosen(args)?;
    let projections = projections(args)?;
    for c in &args.contexts {
        esk_wire::topics::check_context_name(c).map_err(|e| Failure::invalid(format!("--context: {e}")))?;
    }
    let acls = |role: Role, topics: &Topics| acls_for(role, topics, &projections, &args.contexts);
    if args.commands {
        for (role, principal) in &roles {
            for acl in acls(*role, &topics) {
                println!("{}", command_line(principal, &acl));
            }
        }
        return Ok(());
    }
    if g.json {
        let doc: Vec<_> = roles
            .iter()
            .map(|(role, principal)| json!({"role": role.name(), "principal": principal, "acls": acls(*role, &topics)}))
            .collect();
        println!("{}", json!({"roles": doc, "admin_only": ADMIN_ONLY}));
        return Ok(());
    }
    let mut rows = vec![["ROLE", "PRINCIPAL", "RESOURCE", "NAME", "PATTERN", "OPERATIONS", "FOR"].map(String::from)];
    for (role, principal) in &roles {
        for acl in acls(*role, &topics) {
            let ops: Vec<String> = acl.operations.iter().map(|o| format!("{o:?}")).collect();
            for name in &acl.names {
                rows.push([
                    role.name().to_owned(),
                    principal.clone(),
                    format!("{:?}", acl.kind),
                    name.clone(),
                    if acl.prefixed { "prefixed" } else { "literal" }.to_owned(),
                    ops.join(","),
                    acl.why.to_owned(),
                ]);
            }
        }
    }
    let widths: Vec<usize> = (0..6).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    for r in &rows {
        let cells: Vec<String> = (0..6).map(|i| format!("{:<w$}", r[i], w = widths[i])).collect();
        println!("{}  {}", cells.join("  "), r[6]);
    }
    println!();
    for note in ADMIN_ONLY {
        println!("Not granted: {note}.");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether an ACL grants `op` on the resource `name` of `kind` (Read and
    /// Write imply Describe, as the broker has it).
    fn allows(acl: &Acl, op: Op, kind: Kind, name: &str) -> bool {
        let covers = |n: &String| if acl.prefixed { name.starts_with(n.as_str()) } else { n == name };
        let grants = acl.operations.contains(&op)
            || (op == Op::Describe && acl.operations.iter().any(|o| matches!(o, Op::Read | Op::Write)));
        acl.kind == kind && grants && (kind == Kind::Cluster || acl.names.iter().any(covers))
    }

    fn allowed(role: Role, op: Op, kind: Kind, name: &str) -> bool {
        acls(role, &Topics::new("p")).iter().any(|a| allows(a, op, kind, name))
    }

    #[test]
    fn projectors_get_the_dead_letter_topics_of_the_projections_named() {
        let t = Topics::new("p");
        let orders = acls_for(Role::Projector, &t, &["orders".into(), "shipments".into()], &[]);
        let grants = |name: &str| orders.iter().any(|a| allows(a, Op::Create, Kind::Topic, name));
        assert!(grants("p.dlq.orders") && grants("p.dlq.shipments"));
        assert!(!grants("p.dlq.accounts"), "only the projections named");
        assert!(allowed(Role::Projector, Op::Write, Kind::Topic, "p.dlq.accounts"), "accounts by default");
        for bad in ["writer", "Orders", "a.b", ""] {
            let args = AclsArgs {
                role: None,
                principal: vec![],
                projections: vec![bad.into()],
                contexts: vec![],
                commands: false,
            };
            assert!(projections(&args).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_client_writes_only_requests_and_transactions() {
        use Kind::Topic;
        let t = Topics::new("p");
        for topic in [t.state(), t.answers(), t.tx_commit(), t.tx_prepare(), t.tx_votes(), t.tx_log(), t.replies()] {
            assert!(!allowed(Role::Client, Op::Write, Topic, &topic), "the client may write {topic}");
        }
        assert!(!allowed(Role::Client, Op::Write, Topic, &t.events("account")));
        assert!(!allowed(Role::Client, Op::Create, Topic, &t.events("account")));
        assert!(!allowed(Role::Client, Op::Read, Topic, &t.state()));
        assert!(!allowed(Role::Client, Op::Write, Kind::TransactionalId, "p-writer-s0"));
        assert!(allowed(Role::Client, Op::Write, Topic, &t.commands()));
        assert!(allowed(Role::Client, Op::Write, Topic, &t.tx_requests()));
        assert!(allowed(Role::Client, Op::Read, Topic, &t.replies()));
        assert!(allowed(Role::Client, Op::Read, Topic, &t.events("account")));
        assert!(allowed(Role::Client, Op::Read, Kind::Group, "p-client"));
        assert!(!allowed(Role::Client, Op::Read, Topic, &t.tx_log()), "the console's reads are the gateway's");
        assert!(allowed(Role::Gateway, Op::Write, Topic, &t.commands()), "the gateway is a client");
        assert!(allowed(Role::Gateway, Op::Read, Topic, &t.tx_log()));
        assert!(allowed(Role::Gateway, Op::Read, Topic, &t.dlq("accounts")));
        assert!(allowed(Role::Gateway, Op::Read, Topic, &t.writer_dlq()));
        assert!(!allowed(Role::Gateway, Op::Write, Topic, &t.tx_log()));
        assert!(!allowed(Role::Gateway, Op::Read, Topic, &t.state()));
    }

    #[test]
    fn each_service_gets_its_families_and_no_other_roles() {
        use Kind::{Group, Topic, TransactionalId};
        for group in ["p-writer", "p-writer-restore", "p-writer-standby-state-watermarks", "p-writer-watermarks"] {
            assert!(allowed(Role::Writer, Op::Read, Group, group), "{group}");
        }
        assert!(allowed(Role::Writer, Op::Write, TransactionalId, "p-writer-s11"));
        assert!(allowed(Role::Writer, Op::Read, Topic, "p.shards"));
        assert!(allowed(Role::Writer, Op::Create, Topic, "p.events.order"));
        assert!(!allowed(Role::Writer, Op::Write, TransactionalId, "p-coordinator-s0"));
        assert!(allowed(Role::Coordinator, Op::Write, TransactionalId, "p-coordinator-s3"));
        assert!(allowed(Role::Coordinator, Op::Read, Topic, "p.shards"));
        assert!(allowed(Role::Coordinator, Op::Read, Group, "p-coordinator-standby-watermarks"));
        assert!(allowed(Role::Coordinator, Op::Write, Topic, "p.tx.commit"));
        assert!(!allowed(Role::Coordinator, Op::Write, Topic, "p.state"));
        assert!(allowed(Role::Projector, Op::Read, Group, "p-projector-a-accounts-rebuild"));
        assert!(!allowed(Role::Projector, Op::Write, Topic, "p.dlq.writer"));
        assert!(allowed(Role::Replica, Op::Describe, Topic, "p.state"));
        assert!(!allowed(Role::Replica, Op::Write, Topic, "p.state"));
    }

    #[test]
    fn each_context_s_writers_get_its_topics_group_and_transactional_ids() {
        use Kind::{Group, Topic, TransactionalId};
        let t = Topics::new("p");
        let contexts = ["payments".to_owned()];
        let writer = acls_for(Role::Writer, &t, &[], &contexts);
        let allows_op = |acls: &[Acl], op, kind, name: &str| acls.iter().any(|a| allows(a, op, kind, name));
        let payments = t.in_context("payments");
        for topic in [payments.commands(), payments.tx_prepare(), payments.tx_commit(), payments.shards()] {
            assert!(allows_op(&writer, Op::Read, Topic, &topic), "{topic}");
        }
        assert!(allows_op(&writer, Op::Write, Topic, &payments.state()));
        assert!(allows_op(&writer, Op::Write, Topic, &payments.writer_dlq()));
        assert!(allows_op(&writer, Op::Read, Group, "p-payments-writer-standby-state"));
        assert!(allows_op(&writer, Op::Write, TransactionalId, "p-payments-writer-s0"));
        assert!(allows_op(&writer, Op::Write, Topic, "p.contexts"), "a writer claims its categories");
        let client = acls_for(Role::Client, &t, &[], &contexts);
        assert!(allows_op(&client, Op::Write, Topic, &payments.commands()));
        assert!(allows_op(&client, Op::Read, Topic, "p.contexts"));
        assert!(!allows_op(&client, Op::Write, Topic, "p.contexts"), "only writers claim");
        let coordinator = acls_for(Role::Coordinator, &t, &[], &contexts);
        assert!(allows_op(&coordinator, Op::Write, Topic, &payments.tx_commit()));
        assert!(!allows_op(&coordinator, Op::Write, Topic, &payments.state()));
        let replica = acls_for(Role::Replica, &t, &[], &contexts);
        assert!(allows_op(&replica, Op::Read, Topic, &payments.state()));
    }

    #[test]
    fn command_lines_are_kafka_acls_arguments() {
        let t = Topics::new("p");
        let line = command_line("User:w", &acls(Role::Writer, &t)[4]);
        assert_eq!(
            line,
            "--add --allow-principal User:w --operation Write --operation Create --operation DescribeConfigs \
             --topic p.events. --resource-pattern-type prefixed"
        );
        let cluster = command_line("User:c", &idempotent());
        assert_eq!(cluster, "--add --allow-principal User:c --operation IdempotentWrite --cluster");
    }
}
