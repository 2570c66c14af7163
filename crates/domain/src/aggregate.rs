//! The aggregate contract: pure functions from state and command to events.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Why the domain refused a command. Holds no technical cause, only the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The command is malformed for this aggregate (unknown command, bad amount):
    /// the caller's input is wrong. Exit code 4.
    #[error("{0}")]
    Invalid(String),
    /// A business rule refused a well-formed command (insufficient funds,
    /// account not open). Exit code 7.
    #[error("{0}")]
    Rejected(String),
}

/// An event as the domain produces it: a type name and JSON data.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct EventData {
    #[serde(rename = "type")]
    pub event_type: String,
    pub data: Value,
}

/// A domain aggregate: a category's consistency boundary.
///
/// `handle` decides, `apply` evolves; both are pure. The 2PC hooks let a stream
/// take part in a cross-stream transaction: `prepare` validates a command
/// against the state *including other holds* and returns the events that place
/// a hold; `commit` and `abort` return the events that end it.
pub trait Aggregate {
    type State: Default + Clone + Serialize + DeserializeOwned;
    type Command: DeserializeOwned;
    type Event: Serialize + DeserializeOwned;

    /// The stream category this aggregate owns (`account` for `account-42`).
    const CATEGORY: &'static str;

    fn handle(state: &Self::State, command: &Self::Command) -> Result<Vec<Self::Event>, DomainError>;

    fn apply(state: Self::State, event: &Self::Event) -> Self::State;

    /// Checks a command for a transaction without any state (amounts, the
    /// kinds of command that may be held), so that a client can refuse a bad
    /// transaction before anything is written. The default refuses: an
    /// aggregate that does not override it takes no part in transactions.
    fn validate_for_transaction(_command: &Self::Command) -> Result<(), DomainError> {
        Err(DomainError::Invalid(format!("category '{}' does not take part in transactions", Self::CATEGORY)))
    }

    /// Events that place a hold for transaction `txid`. The default refuses:
    /// an aggregate that does not override it takes no part in transactions.
    fn prepare(_state: &Self::State, _txid: &str, _command: &Self::Command) -> Result<Vec<Self::Event>, DomainError> {
        Err(DomainError::Invalid(format!("category '{}' does not take part in transactions", Self::CATEGORY)))
    }

    /// Whether a hold for `txid` is open.
    fn has_hold(_state: &Self::State, _txid: &str) -> bool {
        false
    }

    /// Events that apply the held command and release the hold.
    fn commit(_state: &Self::State, _txid: &str) -> Vec<Self::Event> {
        Vec::new()
    }

    /// Events that release the hold without effect.
    fn abort(_state: &Self::State, _txid: &str, _reason: &str) -> Vec<Self::Event> {
        Vec::new()
    }
}

/// Why an aggregate behind JSON could not decide: the domain refused, or
/// what it was given is not what it stores (a state record that does not
/// read as its state, an aggregate whose events do not serialize as tagged
/// JSON). The second is never the caller's fault and never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DynError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("{0}")]
    State(String),
}

/// An aggregate behind JSON: what the writer calls, whatever the category.
/// Nothing here panics on any JSON.
pub trait DynAggregate: Send + Sync {
    fn category(&self) -> &'static str;
    /// The state of a stream with no events.
    fn initial(&self) -> Value;
    /// Whether `state` reads as this aggregate's state.
    fn check_state(&self, state: &Value) -> Result<(), String>;
    fn handle(&self, state: &Value, command: &EventData) -> Result<Vec<EventData>, DynError>;
    /// Folds one event into the state. Unknown event types are an error: the
    /// stream holds something this aggregate cannot read.
    fn apply(&self, state: Value, event: &EventData) -> Result<Value, String>;
    fn prepare(&self, state: &Value, txid: &str, command: &EventData) -> Result<Vec<EventData>, DynError>;
    /// Checks a command for a transaction, without state.
    fn validate_for_transaction(&self, command: &EventData) -> Result<(), DomainError>;
    fn has_hold(&self, state: &Value, txid: &str) -> Result<bool, String>;
    fn commit(&self, state: &Value, txid: &str) -> Result<Vec<EventData>, String>;
    fn abort(&self, state: &Value, txid: &str, reason: &str) -> Result<Vec<EventData>, String>;
}

/// Adapts a typed [`Aggregate`] to [`DynAggregate`].
pub struct Typed<A>(std::marker::PhantomData<fn() -> A>);

impl<A> fmt::Debug for Typed<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Typed")
    }
}

impl<A> Default for Typed<A> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

fn state_of<A: Aggregate>(v: &Value) -> Result<A::State, String> {
    // The writer checks every state record it reads (`check_state`); one
    // that still does not read is refused here, never a panic.
    A::State::deserialize(v).map_err(|e| format!("the stored {} state is unreadable: {e}", A::CATEGORY))
}

fn command_of<A: Aggregate>(c: &EventData) -> Result<A::Command, DomainError> {
    let tagged = serde_json::json!({"type": c.event_type, "data": c.data});
    serde_json::from_value(tagged)
        .map_err(|e| DomainError::Invalid(format!("{} command {}: {e}", A::CATEGORY, c.event_type)))
}

fn to_data<A: Aggregate>(events: Vec<A::Event>) -> Result<Vec<EventData>, String> {
    events
        .into_iter()
        .map(|e| {
            serde_json::to_value(e)
                .and_then(serde_json::from_value)
                .map_err(|e| format!("the {} aggregate made an event that is not tagged JSON: {e}", A::CATEGORY))
        })
        .collect()
}

impl<A: Aggregate + 'static> DynAggregate for Typed<A> {
    fn category(&self) -> &'static str {
        A::CATEGORY
    }

    fn initial(&self) -> Value {
        serde_json::to_value(A::State::default()).unwrap_or(Value::Null)
    }

    fn check_state(&self, state: &Value) -> Result<(), String> {
        state_of::<A>(state).map(|_| ())
    }

    fn handle(&self, state: &Value, command: &EventData) -> Result<Vec<EventData>, DynError> {
        let cmd = command_of::<A>(command)?;
        let events = A::handle(&state_of::<A>(state).map_err(DynError::State)?, &cmd)?;
        to_data::<A>(events).map_err(DynError::State)
    }

    fn apply(&self, state: Value, event: &EventData) -> Result<Value, String> {
        let tagged = serde_json::json!({"type": event.event_type, "data": event.data});
        let e: A::Event = serde_json::from_value(tagged)
            .map_err(|e| format!("{} cannot apply {}: {e}", A::CATEGORY, event.event_type))?;
        let next = A::apply(state_of::<A>(&state)?, &e);
        serde_json::to_value(next).map_err(|e| format!("the {} state does not serialize: {e}", A::CATEGORY))
    }

    fn prepare(&self, state: &Value, txid: &str, command: &EventData) -> Result<Vec<EventData>, DynError> {
        let cmd = command_of::<A>(command)?;
        let events = A::prepare(&state_of::<A>(state).map_err(DynError::State)?, txid, &cmd)?;
        to_data::<A>(events).map_err(DynError::State)
    }

    fn validate_for_transaction(&self, command: &EventData) -> Result<(), DomainError> {
        A::validate_for_transaction(&command_of::<A>(command)?)
    }

    fn has_hold(&self, state: &Value, txid: &str) -> Result<bool, String> {
        Ok(A::has_hold(&state_of::<A>(state)?, txid))
    }

    fn commit(&self, state: &Value, txid: &str) -> Result<Vec<EventData>, String> {
        to_data::<A>(A::commit(&state_of::<A>(state)?, txid))
    }

    fn abort(&self, state: &Value, txid: &str, reason: &str) -> Result<Vec<EventData>, String> {
        to_data::<A>(A::abort(&state_of::<A>(state)?, txid, reason))
    }
}

/// The aggregates of an installation, by category.
#[derive(Clone, Default)]
pub struct Registry {
    by_category: BTreeMap<&'static str, Arc<dyn DynAggregate>>,
    /// The categories served by esk's own aggregates ([`Registry::builtin`]):
    /// their events follow esk's shipped schemas.
    builtin: std::collections::BTreeSet<&'static str>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.by_category.keys()).finish()
    }
}

impl Registry {
    /// The aggregates esk ships: `account` and `inventory`.
    pub fn builtin() -> Self {
        let mut r = Self::default();
        r.register::<crate::account::Account>();
        r.register::<crate::inventory::Inventory>();
        r.builtin = r.by_category.keys().copied().collect();
        r
    }

    /// Serves `A::CATEGORY` with `A` (replacing a built-in one of that category).
    pub fn register<A: Aggregate + 'static>(&mut self) {
        self.by_category.insert(A::CATEGORY, Arc::new(Typed::<A>::default()));
        self.builtin.remove(A::CATEGORY);
    }

    /// Adds every aggregate of `other` (replacing one of the same category).
    pub fn extend(&mut self, other: Registry) {
        for category in other.by_category.keys() {
            if !other.builtin.contains(category) {
                self.builtin.remove(category);
            }
        }
        self.builtin.extend(other.builtin);
        self.by_category.extend(other.by_category);
    }

    /// The categories served by esk's built-in aggregates: those whose events
    /// are held to esk's shipped schemas. A category of a service's own
    /// aggregate, whatever its name, is not (no category is esk's alone).
    pub fn builtin_categories(&self) -> Vec<&'static str> {
        self.builtin.iter().copied().collect()
    }

    pub fn get(&self, category: &str) -> Option<&Arc<dyn DynAggregate>> {
        self.by_category.get(category)
    }

    /// Only the aggregates of `categories`; `Err` names one it does not have.
    pub fn only(mut self, categories: &[String]) -> Result<Self, String> {
        if let Some(missing) = categories.iter().find(|c| !self.by_category.contains_key(c.as_str())) {
            return Err(format!(
                "no aggregate for category '{missing}' (there are: {})",
                self.categories().collect::<Vec<_>>().join(", ")
            ));
        }
        self.by_category.retain(|c, _| categories.iter().any(|k| k == c));
        let kept: Vec<&'static str> = self.by_category.keys().copied().collect();
        self.builtin.retain(|c| kept.contains(c));
        Ok(self)
    }

    pub fn categories(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.by_category.keys().copied()
    }
}

/// How a two-phase commit ended for a participant, as its release event records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Committed,
    Aborted,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An aggregate of a service's own, named like a built-in one.
    struct MyAccount;
    impl Aggregate for MyAccount {
        type State = ();
        type Command = ();
        type Event = ();
        const CATEGORY: &'static str = "account";
        fn handle(_: &(), _: &()) -> Result<Vec<()>, DomainError> {
            Ok(vec![])
        }
        fn apply((): (), _: &()) {}
    }

    #[test]
    fn only_esk_s_own_aggregates_count_as_built_in() {
        assert_eq!(Registry::builtin().builtin_categories(), ["account", "inventory"]);
        let mut mine = Registry::builtin();
        mine.register::<MyAccount>();
        assert_eq!(mine.builtin_categories(), ["inventory"], "a service's own account is not esk's");
        let mut extended = Registry::default();
        extended.register::<MyAccount>();
        extended.extend(Registry::builtin().only(&["inventory".into()]).unwrap());
        assert_eq!(extended.builtin_categories(), ["inventory"]);
        let mut replaced = Registry::builtin();
        let mut own = Registry::default();
        own.register::<MyAccount>();
        replaced.extend(own);
        assert_eq!(replaced.builtin_categories(), ["inventory"]);
        assert!(Registry::builtin().only(&[]).unwrap().builtin_categories().is_empty());
    }

    #[test]
    fn an_unreadable_state_is_an_error_never_a_panic() {
        let registry = Registry::builtin();
        let account = registry.get("account").unwrap();
        let bad = json!({"balance": "x"});
        assert!(account.check_state(&bad).unwrap_err().contains("unreadable"));
        assert!(account.check_state(&account.initial()).is_ok());
        let deposit = EventData { event_type: "Deposit".into(), data: json!({"amount": 1}) };
        assert!(matches!(account.handle(&bad, &deposit), Err(DynError::State(_))));
        assert!(matches!(account.prepare(&bad, "t", &deposit), Err(DynError::State(_))));
        assert!(account.has_hold(&bad, "t").is_err());
        assert!(account.commit(&bad, "t").is_err());
        assert!(account.abort(&bad, "t", "r").is_err());
        let opened = EventData { event_type: "AccountOpened".into(), data: json!({"owner": "ann"}) };
        assert!(account.apply(bad, &opened).is_err());
    }
}
