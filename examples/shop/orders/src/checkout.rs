//! The checkout saga: an order placed → reserve its stock (the inventory
//! context) → take its payment (the payments context) → confirm it; and
//! compensation when a step is refused or the checkout times out: stock
//! reserved is released, money taken is refunded, the order is cancelled.
//! Each step and each compensation is a command with a request id of its own
//! (`pm:checkout:<order>:<step>`), so each takes effect once.
//!
//! Steps: `reserve` (`inventory-<item>` Reserve), `pay` (`account-<customer>`
//! Withdraw), `confirm` (`order-<id>` Confirm); compensations: `release`
//! (Release), `refund` (Deposit), `cancel` (`order-<id>` Cancel).

use std::time::Duration;

use esk::Event;
use esk::process::{Answer, Effects, Process};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The checkout saga's name: its store, group and request ids.
pub const NAME: &str = "checkout";

/// The saga, with how long a checkout may take before it is cancelled.
#[derive(Debug, Clone, Copy)]
pub struct Checkout {
    pub timeout: Duration,
}

impl Default for Checkout {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(30) }
    }
}

/// Where a checkout is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Not placed yet (no `Placed` seen).
    #[default]
    New,
    Reserving,
    Paying,
    Confirming,
    /// Compensating: the order is being cancelled.
    Cancelling,
    Confirmed,
    Cancelled,
    /// A step was answered "expired" (sent again after the idempotency
    /// horizon, not remembered): it may or may not have been applied, so
    /// nothing more is sent; an operator looks (`reason`).
    Attention,
}

/// One checkout: the order's terms, where it is, and what was done.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CheckoutState {
    pub order: String,
    pub customer: String,
    pub item: String,
    pub quantity: u32,
    pub amount: i64,
    pub stage: Stage,
    /// The stock is reserved (and not released).
    pub reserved: bool,
    /// The payment is taken (and not refunded).
    pub paid: bool,
    /// Compensations sent.
    pub released: bool,
    pub refunded: bool,
    pub cancel_sent: bool,
    pub reason: Option<String>,
    /// Compensations that were not applied (refused or invalid), for an operator.
    pub problems: Vec<String>,
}

impl CheckoutState {
    /// Starts compensating: cancels the order and gives back what was taken
    /// (what is still on its way is given back when it is answered).
    fn compensate(&mut self, reason: String, fx: &mut Effects) {
        if matches!(self.stage, Stage::Cancelling | Stage::Cancelled | Stage::Confirmed) {
            return;
        }
        self.stage = Stage::Cancelling;
        self.reason = Some(reason.clone());
        fx.cancel_deadline("timeout");
        if !self.cancel_sent {
            self.cancel_sent = true;
            fx.send("cancel", &self.order, "Cancel", json!({ "reason": reason }));
        }
        self.give_back(fx);
    }

    /// Releases the stock and refunds the payment, each once.
    fn give_back(&mut self, fx: &mut Effects) {
        if self.reserved && !self.released {
            self.released = true;
            fx.send("release", &format!("inventory-{}", self.item), "Release", json!({ "quantity": self.quantity }));
        }
        if self.paid && !self.refunded {
            self.refunded = true;
            fx.send("refund", &format!("account-{}", self.customer), "Deposit", json!({ "amount": self.amount }));
        }
    }
}

fn why(answer: &Answer) -> String {
    match answer {
        Answer::Done { .. } => "done".into(),
        Answer::Refused { message } | Answer::Invalid { message } | Answer::Expired { message } => message.clone(),
        Answer::WrongExpectedVersion { message, .. } => message.clone(),
    }
}

impl Process for Checkout {
    type State = CheckoutState;

    fn name(&self) -> &str {
        NAME
    }

    fn categories(&self) -> Vec<String> {
        vec!["order".into()]
    }

    fn correlate(&self, event: &Event) -> Option<String> {
        Some(event.stream.id().to_owned())
    }

    fn on_event(&self, s: &mut CheckoutState, event: &Event, fx: &mut Effects) {
        match event.event_type.as_str() {
            "Placed" if s.stage == Stage::New => {
                let terms = (
                    event.data["customer"].as_str(),
                    event.data["item"].as_str(),
                    event.data["quantity"].as_u64(),
                    event.data["amount"].as_i64(),
                );
                let (Some(customer), Some(item), Some(quantity), Some(amount)) = terms else { return };
                *s = CheckoutState {
                    order: event.stream.to_string(),
                    customer: customer.to_owned(),
                    item: item.to_owned(),
                    quantity: quantity.min(u64::from(u32::MAX)) as u32,
                    amount,
                    stage: Stage::Reserving,
                    ..CheckoutState::default()
                };
                fx.send("reserve", &format!("inventory-{item}"), "Reserve", json!({ "quantity": quantity }));
                fx.deadline("timeout", self.timeout);
            }
            "Confirmed" => {
                s.stage = Stage::Confirmed;
                fx.finish();
            }
            "Cancelled" => {
                s.stage = Stage::Cancelled;
                // Whatever is still on its way is given back when answered.
                s.give_back(fx);
                fx.finish();
            }
            _ => {}
        }
    }

    fn on_answer(&self, s: &mut CheckoutState, step: &str, answer: &Answer, fx: &mut Effects) {
        if let Answer::Expired { message } = answer {
            // Maybe applied, maybe not: neither going on nor giving back is safe.
            s.stage = Stage::Attention;
            s.reason = Some(format!("step {step} expired: {message}"));
            fx.cancel_deadline("timeout");
            return;
        }
        match (step, answer.is_done()) {
            ("reserve", true) => {
                s.reserved = true;
                if s.stage == Stage::Reserving {
                    s.stage = Stage::Paying;
                    fx.send("pay", &format!("account-{}", s.customer), "Withdraw", json!({ "amount": s.amount }));
                } else {
                    // Reserved after the checkout was given up: give it back.
                    s.give_back(fx);
                }
            }
            ("reserve", false) => s.compensate(format!("stock not reserved: {}", why(answer)), fx),
            ("pay", true) => {
                s.paid = true;
                if s.stage == Stage::Paying {
                    s.stage = Stage::Confirming;
                    fx.cancel_deadline("timeout");
                    fx.send("confirm", &s.order, "Confirm", json!({}));
                } else {
                    s.give_back(fx);
                }
            }
            ("pay", false) => s.compensate(format!("payment refused: {}", why(answer)), fx),
            ("confirm", false) => {
                // The order could not be confirmed (cancelled meanwhile): give everything back.
                s.reason = Some(format!("not confirmed: {}", why(answer)));
                if !s.cancel_sent {
                    s.cancel_sent = true;
                    fx.send("cancel", &s.order, "Cancel", json!({ "reason": "not confirmed" }));
                }
                s.give_back(fx);
            }
            ("release" | "refund" | "cancel", false) => s.problems.push(format!("{step}: {}", why(answer))),
            _ => {}
        }
    }

    fn on_deadline(&self, s: &mut CheckoutState, name: &str, fx: &mut Effects) {
        // (A checkout needing attention has no deadline left.)
        if name == "timeout" && matches!(s.stage, Stage::Reserving | Stage::Paying) {
            s.compensate(format!("checkout timed out after {:?}", self.timeout), fx);
        }
    }
}

#[cfg(test)]
mod tests {
    use esk::process::Outgoing;
    use esk::testing::{Processes, event};
    use serde_json::json;

    use super::*;

    fn checkout() -> Processes<Checkout> {
        Processes::new(Checkout { timeout: Duration::from_secs(30) }).unwrap()
    }

    fn placed(t: &mut Processes<Checkout>) -> Vec<Outgoing> {
        let data = json!({"customer": "ann", "item": "tea", "quantity": 2, "amount": 700});
        t.given(&[event("order-1", 1, "Placed", data)]).unwrap()
    }

    fn done() -> Answer {
        Answer::Done { first_version: 1, last_version: 1, position: "p".into() }
    }

    fn refused(why: &str) -> Answer {
        Answer::Refused { message: why.into() }
    }

    /// (step, stream, command type) of each command.
    fn steps(out: &[Outgoing]) -> Vec<(&str, &str, &str)> {
        out.iter().map(|o| (o.step.as_str(), o.stream.as_str(), o.command.command_type.as_str())).collect()
    }

    #[test]
    fn a_checkout_reserves_then_pays_then_confirms() {
        let mut t = checkout();
        let out = placed(&mut t);
        assert_eq!(steps(&out), [("reserve", "inventory-tea", "Reserve")]);
        assert_eq!(out[0].command.data, json!({"quantity": 2}));
        assert_eq!(t.deadlines().len(), 1, "a timeout is set");
        assert_eq!(steps(&t.answer("1", "reserve", done()).unwrap()), [("pay", "account-ann", "Withdraw")]);
        assert_eq!(steps(&t.answer("1", "pay", done()).unwrap()), [("confirm", "order-1", "Confirm")]);
        assert!(t.deadlines().is_empty(), "paid: the timeout no longer applies");
        t.answer("1", "confirm", done()).unwrap();
        assert!(t.given(&[event("order-1", 2, "Confirmed", json!({}))]).unwrap().is_empty());
        assert!(t.finished("1"));
        assert_eq!(t.state("1").unwrap().stage, Stage::Confirmed);
        assert!(t.waiting().is_empty());
    }

    #[test]
    fn no_stock_cancels_the_order_and_takes_nothing() {
        let mut t = checkout();
        placed(&mut t);
        let out = t.answer("1", "reserve", refused("insufficient stock")).unwrap();
        assert_eq!(steps(&out), [("cancel", "order-1", "Cancel")]);
        assert!(out[0].command.data["reason"].as_str().unwrap().contains("insufficient stock"));
        assert!(t.given(&[event("order-1", 2, "Cancelled", json!({"reason": "x"}))]).unwrap().is_empty());
        assert!(t.finished("1") && t.deadlines().is_empty());
    }

    #[test]
    fn a_refused_payment_releases_the_stock_and_cancels() {
        let mut t = checkout();
        placed(&mut t);
        t.answer("1", "reserve", done()).unwrap();
        let out = t.answer("1", "pay", refused("insufficient funds")).unwrap();
        assert_eq!(steps(&out), [("cancel", "order-1", "Cancel"), ("release", "inventory-tea", "Release")]);
        assert_eq!(out[1].command.data, json!({"quantity": 2}));
    }

    #[test]
    fn a_timeout_compensates_once_also_for_a_payment_answered_late() {
        let mut t = checkout();
        placed(&mut t);
        t.answer("1", "reserve", done()).unwrap();
        assert!(t.elapse(Duration::from_secs(29)).unwrap().is_empty(), "not before the timeout");
        let out = t.elapse(Duration::from_secs(2)).unwrap();
        assert_eq!(steps(&out), [("cancel", "order-1", "Cancel"), ("release", "inventory-tea", "Release")]);
        // The payment was taken after all: refunded, once.
        let out = t.answer("1", "pay", done()).unwrap();
        assert_eq!(steps(&out), [("refund", "account-ann", "Deposit")]);
        assert_eq!(out[0].command.data, json!({"amount": 700}));
        assert!(t.answer("1", "pay", done()).is_err(), "an answer is reacted to once");
        assert!(t.given(&[event("order-1", 2, "Cancelled", json!({"reason": "timed out"}))]).unwrap().is_empty());
        assert!(t.elapse(Duration::from_secs(60)).unwrap().is_empty(), "no deadline left");
    }

    #[test]
    fn a_reservation_answered_after_the_timeout_is_released() {
        let mut t = checkout();
        placed(&mut t);
        assert_eq!(steps(&t.elapse(Duration::from_secs(31)).unwrap()), [("cancel", "order-1", "Cancel")]);
        assert_eq!(steps(&t.answer("1", "reserve", done()).unwrap()), [("release", "inventory-tea", "Release")]);
        assert_eq!(t.state("1").unwrap().stage, Stage::Cancelling);
    }

    #[test]
    fn a_finished_checkout_is_forgotten_after_seven_days_an_open_one_never() {
        let mut t = checkout();
        placed(&mut t);
        let data = json!({"customer": "bob", "item": "tea", "quantity": 1, "amount": 10});
        t.given(&[event("order-2", 1, "Placed", data)]).unwrap();
        t.answer("1", "reserve", refused("none left")).unwrap();
        t.answer("1", "cancel", done()).unwrap();
        t.given(&[event("order-1", 2, "Cancelled", json!({"reason": "none left"}))]).unwrap();
        t.elapse(Duration::from_secs(6 * 86_400)).unwrap();
        assert_eq!(t.forget_finished().unwrap(), 0, "kept 7 days");
        t.elapse(Duration::from_secs(2 * 86_400)).unwrap();
        assert_eq!(t.forget_finished().unwrap(), 1);
        assert!(t.state("1").is_none());
        assert!(t.state("2").is_some(), "order 2 is not finished: its reserve still waits");
    }

    #[test]
    fn an_expired_answer_stops_the_checkout_for_an_operator() {
        let mut t = checkout();
        placed(&mut t);
        t.answer("1", "reserve", done()).unwrap();
        let out = t.answer("1", "pay", Answer::Expired { message: "not remembered".into() }).unwrap();
        assert!(out.is_empty(), "neither confirmed nor compensated: it may have been paid");
        let s = t.state("1").unwrap();
        assert_eq!(s.stage, Stage::Attention);
        assert!(s.reason.unwrap().contains("pay expired"));
        assert!(t.elapse(Duration::from_secs(60)).unwrap().is_empty(), "no timeout left");
    }

    #[test]
    fn an_event_seen_again_changes_nothing() {
        let mut t = checkout();
        placed(&mut t);
        assert!(placed(&mut t).is_empty(), "the Placed event again (a replay) sends nothing");
        assert_eq!(t.waiting().len(), 1);
    }
}
