//! The `inventory` aggregate: stock of one item (`inventory-<sku>`), added and
//! reserved; a reservation never takes more than is in stock and not already
//! held by open transactions.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::aggregate::Outcome;
use crate::aggregate::{Aggregate, DomainError};

/// The largest quantity one command may move.
pub const MAX_QUANTITY: i64 = 1_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum Command {
    AddStock {
        quantity: i64,
    },
    Reserve {
        quantity: i64,
    },
    /// Gives back units a `Reserve` took.
    Release {
        quantity: i64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum Event {
    StockAdded {
        quantity: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        txid: Option<String>,
    },
    StockReserved {
        quantity: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        txid: Option<String>,
    },
    ReservationHeld {
        txid: String,
        quantity: i64,
    },
    StockReleased {
        quantity: i64,
    },
    ReservationReleased {
        txid: String,
        outcome: Outcome,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Units in stock and not yet reserved by a committed reservation.
    pub stock: i64,
    /// Open 2PC reservations by txid.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub held: BTreeMap<String, i64>,
}

impl State {
    /// Stock minus what open transactions hold.
    pub fn available(&self) -> i64 {
        self.stock - self.held.values().sum::<i64>()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Inventory;

fn check_quantity(quantity: i64) -> Result<i64, DomainError> {
    if !(1..=MAX_QUANTITY).contains(&quantity) {
        return Err(DomainError::Invalid(format!("quantity must be from 1 to {MAX_QUANTITY}, got {quantity}")));
    }
    Ok(quantity)
}

fn check_reserve(state: &State, quantity: i64) -> Result<i64, DomainError> {
    let quantity = check_quantity(quantity)?;
    if quantity > state.available() {
        return Err(DomainError::Rejected(format!(
            "insufficient stock: available {}, requested {quantity}",
            state.available()
        )));
    }
    Ok(quantity)
}

impl Aggregate for Inventory {
    type State = State;
    type Command = Command;
    type Event = Event;
    const CATEGORY: &'static str = "inventory";

    fn handle(state: &State, command: &Command) -> Result<Vec<Event>, DomainError> {
        match command {
            Command::AddStock { quantity } => {
                Ok(vec![Event::StockAdded { quantity: check_quantity(*quantity)?, txid: None }])
            }
            Command::Reserve { quantity } => {
                Ok(vec![Event::StockReserved { quantity: check_reserve(state, *quantity)?, txid: None }])
            }
            Command::Release { quantity } => Ok(vec![Event::StockReleased { quantity: check_quantity(*quantity)? }]),
        }
    }

    fn apply(mut state: State, event: &Event) -> State {
        match event {
            Event::StockAdded { quantity, .. } => state.stock += quantity,
            Event::StockReserved { quantity, .. } => state.stock -= quantity,
            Event::StockReleased { quantity } => state.stock += quantity,
            Event::ReservationHeld { txid, quantity } => {
                state.held.insert(txid.clone(), *quantity);
            }
            Event::ReservationReleased { txid, .. } => {
                state.held.remove(txid);
            }
        }
        state
    }

    fn validate_for_transaction(command: &Command) -> Result<(), DomainError> {
        match command {
            Command::Reserve { quantity } => check_quantity(*quantity).map(drop),
            Command::AddStock { .. } | Command::Release { .. } => {
                Err(DomainError::Invalid("only Reserve can be part of a transaction".into()))
            }
        }
    }

    fn prepare(state: &State, txid: &str, command: &Command) -> Result<Vec<Event>, DomainError> {
        if state.held.contains_key(txid) {
            return Ok(Vec::new());
        }
        match command {
            Command::Reserve { quantity } => {
                Ok(vec![Event::ReservationHeld { txid: txid.to_owned(), quantity: check_reserve(state, *quantity)? }])
            }
            Command::AddStock { .. } | Command::Release { .. } => {
                Err(DomainError::Invalid("only Reserve can be part of a transaction".into()))
            }
        }
    }

    fn has_hold(state: &State, txid: &str) -> bool {
        state.held.contains_key(txid)
    }

    fn commit(state: &State, txid: &str) -> Vec<Event> {
        let Some(quantity) = state.held.get(txid) else { return Vec::new() };
        vec![
            Event::StockReserved { quantity: *quantity, txid: Some(txid.to_owned()) },
            Event::ReservationReleased { txid: txid.to_owned(), outcome: Outcome::Committed, reason: None },
        ]
    }

    fn abort(state: &State, txid: &str, reason: &str) -> Vec<Event> {
        if !state.held.contains_key(txid) {
            return Vec::new();
        }
        vec![Event::ReservationReleased {
            txid: txid.to_owned(),
            outcome: Outcome::Aborted,
            reason: Some(reason.to_owned()),
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::given;
    use Command::*;
    use Event::*;

    fn added(q: i64) -> Event {
        StockAdded { quantity: q, txid: None }
    }

    #[test]
    fn stock_is_added_and_reserved_never_beyond_what_is_there() {
        given::<Inventory>(&[]).when(&AddStock { quantity: 5 }).then_expect(vec![added(5)]);
        given::<Inventory>(&[added(5)])
            .when(&Reserve { quantity: 5 })
            .then_expect(vec![StockReserved { quantity: 5, txid: None }]);
        given::<Inventory>(&[added(5)]).when(&Reserve { quantity: 6 }).then_reject("available 5, requested 6");
        given::<Inventory>(&[]).when(&AddStock { quantity: 0 }).then_invalid("quantity");
        let reserved = StockReserved { quantity: 5, txid: None };
        given::<Inventory>(&[added(5), reserved.clone()])
            .when(&Release { quantity: 2 })
            .then_expect(vec![StockReleased { quantity: 2 }]);
        let state = [added(5), reserved, StockReleased { quantity: 2 }].iter().fold(State::default(), Inventory::apply);
        assert_eq!(state.stock, 2);
        given::<Inventory>(&[]).when(&Release { quantity: 0 }).then_invalid("quantity");
        assert!(Inventory::validate_for_transaction(&Release { quantity: 1 }).is_err());
    }

    #[test]
    fn holds_count_and_resolve() {
        let held = ReservationHeld { txid: "t".into(), quantity: 4 };
        given::<Inventory>(&[added(5)]).when_prepared("t", &Reserve { quantity: 4 }).then_expect(vec![held.clone()]);
        given::<Inventory>(&[added(5), held.clone()]).when(&Reserve { quantity: 2 }).then_reject("available 1");
        let state = [added(5), held].iter().fold(State::default(), Inventory::apply);
        let after = Inventory::commit(&state, "t").iter().fold(state.clone(), Inventory::apply);
        assert_eq!((after.stock, after.available()), (1, 1));
        let after = Inventory::abort(&state, "t", "no").iter().fold(state, Inventory::apply);
        assert_eq!((after.stock, after.available()), (5, 5));
        assert!(Inventory::validate_for_transaction(&AddStock { quantity: 1 }).is_err());
        assert!(Inventory::validate_for_transaction(&Reserve { quantity: -1 }).is_err());
    }
}
