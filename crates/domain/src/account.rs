//! The `account` aggregate: open, deposit, withdraw never below zero, and holds
//! for two-phase commits. Amounts are whole minor units (cents).
//!
//! `available` is the balance minus open withdrawal holds: it is what a
//! withdrawal, direct or prepared, may take. A held deposit does not raise it
//! until it commits.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::aggregate::Outcome;
use crate::aggregate::{Aggregate, DomainError};

/// The largest amount one command may move; keeps every balance far from overflow.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum Command {
    OpenAccount { owner: String },
    Deposit { amount: i64 },
    Withdraw { amount: i64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeldCommand {
    Deposit,
    Withdraw,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum Event {
    AccountOpened {
        owner: String,
    },
    Deposited {
        amount: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        txid: Option<String>,
    },
    Withdrawn {
        amount: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        txid: Option<String>,
    },
    HoldPlaced {
        txid: String,
        command: HeldCommand,
        amount: i64,
    },
    HoldReleased {
        txid: String,
        outcome: Outcome,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub command: HeldCommand,
    pub amount: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub open: bool,
    pub owner: String,
    pub balance: i64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub holds: BTreeMap<String, Hold>,
}

impl State {
    /// The balance minus open withdrawal holds.
    pub fn available(&self) -> i64 {
        let held: i64 = self.holds.values().filter(|h| h.command == HeldCommand::Withdraw).map(|h| h.amount).sum();
        self.balance - held
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Account;

fn check_amount(amount: i64) -> Result<i64, DomainError> {
    if amount < 1 {
        return Err(DomainError::Invalid(format!("amount must be at least 1, got {amount}")));
    }
    if amount > MAX_AMOUNT {
        return Err(DomainError::Invalid(format!("amount must be at most {MAX_AMOUNT}, got {amount}")));
    }
    Ok(amount)
}

fn require_open(state: &State) -> Result<(), DomainError> {
    if state.open { Ok(()) } else { Err(DomainError::Rejected("account is not open".into())) }
}

/// Checks a deposit or withdrawal against the state and returns its amount.
fn check_move(state: &State, command: &Command) -> Result<(HeldCommand, i64), DomainError> {
    match command {
        Command::OpenAccount { .. } => {
            Err(DomainError::Invalid("OpenAccount cannot be part of a transaction; open the account first".into()))
        }
        Command::Deposit { amount } => {
            let amount = check_amount(*amount)?;
            require_open(state)?;
            if state.balance.checked_add(amount).is_none_or(|b| b > i64::MAX / 2) {
                return Err(DomainError::Rejected("deposit would overflow the balance".into()));
            }
            Ok((HeldCommand::Deposit, amount))
        }
        Command::Withdraw { amount } => {
            let amount = check_amount(*amount)?;
            require_open(state)?;
            let available = state.available();
            if amount > available {
                return Err(DomainError::Rejected(format!(
                    "insufficient funds: available {available}, requested {amount}"
                )));
            }
            Ok((HeldCommand::Withdraw, amount))
        }
    }
}

impl Aggregate for Account {
    type State = State;
    type Command = Command;
    type Event = Event;
    const CATEGORY: &'static str = "account";

    fn handle(state: &State, command: &Command) -> Result<Vec<Event>, DomainError> {
        match command {
            Command::OpenAccount { owner } => {
                let owner = owner.trim();
                if owner.is_empty() {
                    return Err(DomainError::Invalid("owner must not be empty".into()));
                }
                if state.open {
                    return Err(DomainError::Rejected(format!("account is already open (owner {})", state.owner)));
                }
                Ok(vec![Event::AccountOpened { owner: owner.to_owned() }])
            }
            Command::Deposit { .. } | Command::Withdraw { .. } => {
                let (kind, amount) = check_move(state, command)?;
                Ok(vec![match kind {
                    HeldCommand::Deposit => Event::Deposited { amount, txid: None },
                    HeldCommand::Withdraw => Event::Withdrawn { amount, txid: None },
                }])
            }
        }
    }

    fn apply(mut state: State, event: &Event) -> State {
        match event {
            Event::AccountOpened { owner } => {
                state.open = true;
                state.owner.clone_from(owner);
            }
            Event::Deposited { amount, .. } => state.balance += amount,
            Event::Withdrawn { amount, .. } => state.balance -= amount,
            Event::HoldPlaced { txid, command, amount } => {
                state.holds.insert(txid.clone(), Hold { command: *command, amount: *amount });
            }
            Event::HoldReleased { txid, .. } => {
                state.holds.remove(txid);
            }
        }
        state
    }

    fn validate_for_transaction(command: &Command) -> Result<(), DomainError> {
        match command {
            Command::OpenAccount { .. } => {
                Err(DomainError::Invalid("OpenAccount cannot be part of a transaction; open the account first".into()))
            }
            Command::Deposit { amount } | Command::Withdraw { amount } => check_amount(*amount).map(drop),
        }
    }

    fn prepare(state: &State, txid: &str, command: &Command) -> Result<Vec<Event>, DomainError> {
        if state.holds.contains_key(txid) {
            return Ok(Vec::new());
        }
        let (kind, amount) = check_move(state, command)?;
        Ok(vec![Event::HoldPlaced { txid: txid.to_owned(), command: kind, amount }])
    }

    fn has_hold(state: &State, txid: &str) -> bool {
        state.holds.contains_key(txid)
    }

    fn commit(state: &State, txid: &str) -> Vec<Event> {
        let Some(hold) = state.holds.get(txid) else {
            return Vec::new();
        };
        let applied = match hold.command {
            HeldCommand::Deposit => Event::Deposited { amount: hold.amount, txid: Some(txid.to_owned()) },
            HeldCommand::Withdraw => Event::Withdrawn { amount: hold.amount, txid: Some(txid.to_owned()) },
        };
        vec![applied, Event::HoldReleased { txid: txid.to_owned(), outcome: Outcome::Committed, reason: None }]
    }

    fn abort(state: &State, txid: &str, reason: &str) -> Vec<Event> {
        if !state.holds.contains_key(txid) {
            return Vec::new();
        }
        vec![Event::HoldReleased { txid: txid.to_owned(), outcome: Outcome::Aborted, reason: Some(reason.to_owned()) }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::given;
    use Command::*;
    use Event::*;

    fn opened() -> Event {
        AccountOpened { owner: "ann".into() }
    }

    fn dep(amount: i64) -> Event {
        Deposited { amount, txid: None }
    }

    #[test]
    fn opening() {
        given::<Account>(&[]).when(&OpenAccount { owner: " ann ".into() }).then_expect(vec![opened()]);
        given::<Account>(&[opened()]).when(&OpenAccount { owner: "bob".into() }).then_reject("already open");
        given::<Account>(&[]).when(&OpenAccount { owner: "  ".into() }).then_invalid("owner");
    }

    #[test]
    fn deposits_and_withdrawals() {
        given::<Account>(&[opened()]).when(&Deposit { amount: 10 }).then_expect(vec![dep(10)]);
        given::<Account>(&[opened(), dep(10)])
            .when(&Withdraw { amount: 10 })
            .then_expect(vec![Withdrawn { amount: 10, txid: None }]);
        given::<Account>(&[]).when(&Deposit { amount: 10 }).then_reject("not open");
        given::<Account>(&[opened()]).when(&Deposit { amount: 0 }).then_invalid("at least 1");
        given::<Account>(&[opened()]).when(&Withdraw { amount: -3 }).then_invalid("at least 1, got -3");
    }

    #[test]
    fn never_below_zero() {
        given::<Account>(&[opened(), dep(10)])
            .when(&Withdraw { amount: 11 })
            .then_reject("insufficient funds: available 10, requested 11");
    }

    #[test]
    fn holds_count_against_available() {
        let held = HoldPlaced { txid: "t1".into(), command: HeldCommand::Withdraw, amount: 7 };
        given::<Account>(&[opened(), dep(10), held.clone()]).when(&Withdraw { amount: 4 }).then_reject("available 3");
        given::<Account>(&[opened(), dep(10), held.clone()])
            .when_prepared("t2", &Withdraw { amount: 4 })
            .then_reject("available 3");
        given::<Account>(&[opened(), dep(10)])
            .when_prepared("t1", &Withdraw { amount: 7 })
            .then_expect(vec![held.clone()]);
        // A held deposit does not raise what can be withdrawn.
        let held_in = HoldPlaced { txid: "t3".into(), command: HeldCommand::Deposit, amount: 100 };
        given::<Account>(&[opened(), held_in]).when(&Withdraw { amount: 1 }).then_reject("available 0");
        // Preparing the same txid twice places one hold.
        given::<Account>(&[opened(), dep(10), held]).when_prepared("t1", &Withdraw { amount: 7 }).then_expect(vec![]);
    }

    #[test]
    fn commit_and_abort_release_the_hold() {
        let state = [opened(), dep(10), HoldPlaced { txid: "t1".into(), command: HeldCommand::Withdraw, amount: 7 }]
            .iter()
            .fold(State::default(), Account::apply);
        assert_eq!(state.available(), 3);
        let committed = Account::commit(&state, "t1");
        assert_eq!(committed[0], Withdrawn { amount: 7, txid: Some("t1".into()) });
        let after = committed.iter().fold(state.clone(), Account::apply);
        assert_eq!((after.balance, after.available(), after.holds.len()), (3, 3, 0));
        let aborted = Account::abort(&state, "t1", "no");
        let after = aborted.iter().fold(state.clone(), Account::apply);
        assert_eq!((after.balance, after.available(), after.holds.len()), (10, 10, 0));
        // Unknown txids: nothing to do.
        assert!(Account::commit(&state, "zz").is_empty());
        assert!(Account::abort(&state, "zz", "x").is_empty());
    }

    #[test]
    fn events_serialize_as_the_schemas_expect() {
        let e = serde_json::to_value(Deposited { amount: 5, txid: None }).unwrap();
        assert_eq!(e, serde_json::json!({"type": "Deposited", "data": {"amount": 5}}));
        let e = serde_json::to_value(HoldReleased {
            txid: "t".into(),
            outcome: Outcome::Aborted,
            reason: Some("r".into()),
        })
        .unwrap();
        assert_eq!(e["data"]["outcome"], "aborted");
        let e =
            serde_json::to_value(HoldPlaced { txid: "t".into(), command: HeldCommand::Withdraw, amount: 1 }).unwrap();
        assert_eq!(e["data"]["command"], "Withdraw");
    }
}
