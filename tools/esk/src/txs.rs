//! `esk tx transfer`, `esk tx run` and `esk tx status`.
//!
//! Exit 0 when the transaction committed, 6 when it aborted (the reason is
//! printed), 4 when it is invalid (nothing is written), 5 when no outcome came
//! in time (ask again with `esk tx status TXID`, or retry with the same `--txid`).

use std::io::Read;

use esk_domain::Registry;
use esk_wire::protocol::{CommandData, Participant, TxStatus};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::cli::{Global, TxArgs};
use crate::events::connect;
use crate::exit::{Failure, Kind};

fn print(g: &Global, s: &TxStatus, full: bool) {
    if g.json {
        let mut doc = json!({"txid": s.txid, "outcome": s.outcome});
        if let Some(r) = &s.reason {
            doc["reason"] = json!(r);
        }
        if full {
            doc["state"] = serde_json::to_value(s.state).expect("states serialize");
            doc["participants"] = serde_json::to_value(&s.participants).expect("participants serialize");
        }
        println!("{doc}");
    } else {
        match &s.reason {
            Some(r) => println!("{} {}: {r}", s.txid, s.outcome),
            None => println!("{} {}", s.txid, s.outcome),
        }
        if full {
            for p in &s.participants {
                let vote = match p.vote {
                    Some(true) => "yes",
                    Some(false) => "no",
                    None => "-",
                };
                println!(
                    "  {} {} vote {vote}{}",
                    p.stream,
                    p.command.command_type,
                    if p.acked { ", acknowledged" } else { "" }
                );
            }
        }
    }
}

async fn run(g: &Global, txid: Option<String>, participants: Vec<Participant>, args: &TxArgs) -> Result<(), Failure> {
    let txid = txid.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let timeout_ms = args.tx_timeout.as_millis() as u64;
    let builtin = Registry::builtin();
    let aggregates = (!args.any_category).then_some(&builtin);
    // What needs no installation is checked before connecting; the
    // categories then, against the built-in aggregates and the contexts that
    // claimed categories (their writers check their commands).
    esk_client::tx::validate(&txid, &participants, timeout_ms, None, &|_| false).map_err(Failure::invalid)?;
    let client = connect(g, false).await?;
    let elsewhere = |category: &str| client.context_of(category) != esk_wire::topics::DEFAULT_CONTEXT;
    esk_client::tx::validate(&txid, &participants, timeout_ms, aggregates, &elsewhere).map_err(Failure::invalid)?;
    let status = client.transact(&txid, participants, args.tx_timeout).await?;
    print(g, &status, false);
    match status.outcome.as_str() {
        "committed" => Ok(()),
        "aborted" => {
            let mut f = Failure::new(
                Kind::Aborted,
                format!("transaction {txid} aborted: {}", status.reason.as_deref().unwrap_or("no reason given")),
            );
            f.json_printed = g.json;
            Err(f)
        }
        other => {
            Err(Failure::unavailable(format!("transaction {txid} is {other}; ask again with `esk tx status {txid}`")))
        }
    }
}

pub async fn transfer(g: &Global, from: &str, to: &str, amount: &str, args: TxArgs) -> Result<(), Failure> {
    let amount: i64 =
        amount.parse().map_err(|_| Failure::invalid(format!("AMOUNT '{amount}' is not a whole number")))?;
    let leg = |stream: &str, command: &str| Participant {
        stream: stream.to_owned(),
        command: CommandData { command_type: command.into(), data: json!({"amount": amount}) },
    };
    let txid = args.txid.clone();
    run(g, txid, vec![leg(from, "Withdraw"), leg(to, "Deposit")], &args).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TxFile {
    participants: Vec<FileParticipant>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileParticipant {
    stream: String,
    command: String,
    #[serde(default)]
    data: Value,
}

pub async fn run_file(g: &Global, file: &str, mut args: TxArgs) -> Result<(), Failure> {
    let text = if file == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map_err(|e| Failure::invalid(format!("reading stdin: {e}")))?;
        s
    } else {
        std::fs::read_to_string(file).map_err(|e| Failure::invalid(format!("cannot read {file}: {e}")))?
    };
    let tx: TxFile = serde_json::from_str(&text).map_err(|e| {
        Failure::invalid(format!(
            "{file} is not a transaction ({e}); expected {{\"participants\": [{{\"stream\", \"command\", \"data\"}}], \"timeout_ms\"?}}"
        ))
    })?;
    if let Some(ms) = tx.timeout_ms {
        args.tx_timeout = std::time::Duration::from_millis(ms);
    }
    let participants = tx
        .participants
        .into_iter()
        .map(|p| Participant { stream: p.stream, command: CommandData { command_type: p.command, data: p.data } })
        .collect();
    let txid = args.txid.clone();
    run(g, txid, participants, &args).await
}

pub async fn status(g: &Global, txid: &str) -> Result<(), Failure> {
    let client = connect(g, false).await?;
    let status = client.tx_status(txid).await?;
    print(g, &status, true);
    Ok(())
}
