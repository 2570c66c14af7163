//! The shop's orders service, written as a team would write its own service
//! on esk: an [`Order`] aggregate (the `order` category), the `orders` read
//! model ([`Orders`]) and its query route, through the `esk` facade alone.
//!
//! An order is placed once, then ends confirmed or cancelled, once. The
//! [`checkout`] saga takes it there: stock, payment, confirmation, and
//! compensation when a step is refused or the checkout times out.

pub mod checkout;

use std::sync::Arc;

use esk::axum::extract::{self, Path, Query};
use esk::axum::routing::get;
use esk::axum::{Json, Router};
use esk::projector::{ApiError, App, Params, after, read};
use esk::rusqlite::{OptionalExtension as _, Transaction, params};
use esk::{Aggregate, ApplyError, DomainError, Event, Projection, SqliteStore, StoreError};
use serde::{Deserialize, Serialize};

/// An order's state. The writer stores it (JSON, in each stream's state
/// record) and reads it back after a restart: a field added later must have
/// a default, hence `serde(default)`.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OrderState {
    pub placed: bool,
    pub status: Status,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    #[default]
    New,
    Placed,
    Confirmed,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum Command {
    Place { customer: String, item: String, quantity: u32, amount: i64 },
    Confirm {},
    Cancel { reason: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum OrderEvent {
    Placed { customer: String, item: String, quantity: u32, amount: i64 },
    Confirmed {},
    Cancelled { reason: String },
}

/// The order aggregate.
#[derive(Debug)]
pub struct Order;

impl Aggregate for Order {
    type State = OrderState;
    type Command = Command;
    type Event = OrderEvent;
    const CATEGORY: &'static str = "order";

    fn handle(s: &OrderState, c: &Command) -> Result<Vec<OrderEvent>, DomainError> {
        match c {
            Command::Place { customer, item, quantity, amount } => {
                if *quantity == 0 || *amount < 0 || customer.is_empty() || item.is_empty() {
                    return Err(DomainError::Invalid(
                        "an order needs a customer, an item, a quantity from 1 and an amount from 0".into(),
                    ));
                }
                // The checkout sends commands to account-<customer> and inventory-<item>.
                for (category, id) in [("account", customer), ("inventory", item)] {
                    esk::StreamName::new(category, id)
                        .map_err(|e| DomainError::Invalid(format!("'{id}' cannot name a {category} stream: {e}")))?;
                }
                if s.placed {
                    return Err(DomainError::Rejected("the order is already placed".into()));
                }
                Ok(vec![OrderEvent::Placed {
                    customer: customer.clone(),
                    item: item.clone(),
                    quantity: *quantity,
                    amount: *amount,
                }])
            }
            Command::Confirm {} => match s.status {
                Status::Placed => Ok(vec![OrderEvent::Confirmed {}]),
                other => Err(DomainError::Rejected(format!("an order that is {other:?} cannot be confirmed"))),
            },
            Command::Cancel { reason } => match s.status {
                Status::Placed => Ok(vec![OrderEvent::Cancelled { reason: reason.clone() }]),
                other => Err(DomainError::Rejected(format!("an order that is {other:?} cannot be cancelled"))),
            },
        }
    }

    fn apply(s: OrderState, e: &OrderEvent) -> OrderState {
        match e {
            OrderEvent::Placed { .. } => OrderState { placed: true, status: Status::Placed },
            OrderEvent::Confirmed {} => OrderState { status: Status::Confirmed, ..s },
            OrderEvent::Cancelled { .. } => OrderState { status: Status::Cancelled, ..s },
        }
    }
}

/// The `orders` model's name: its store, group and dead-letter topic.
pub const NAME: &str = "orders";

/// The bounded context the orders service's writer serves: `order` is its.
pub const CONTEXT: &str = "orders";

/// The `orders` read model: one row an order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Orders;

/// An order as queries see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OrderRow {
    pub id: String,
    pub customer: String,
    pub item: String,
    pub quantity: i64,
    pub amount: i64,
    pub status: String,
    pub version: i64,
}

impl Projection<SqliteStore> for Orders {
    fn name(&self) -> &str {
        NAME
    }

    fn categories(&self) -> Vec<String> {
        vec![Order::CATEGORY.into()]
    }

    fn migrate(&self, store: &mut SqliteStore) -> Result<(), StoreError> {
        store.execute_batch(
            "CREATE TABLE IF NOT EXISTS orders (
                 id TEXT PRIMARY KEY, customer TEXT NOT NULL, item TEXT NOT NULL,
                 quantity INTEGER NOT NULL, amount INTEGER NOT NULL, status TEXT NOT NULL,
                 version INTEGER NOT NULL)",
        )
    }

    fn apply(&self, tx: &mut Transaction<'_>, event: &Event) -> Result<(), ApplyError> {
        let tagged = serde_json::json!({"type": event.event_type, "data": event.data});
        let e: OrderEvent = serde_json::from_value(tagged)
            .map_err(|err| ApplyError::Permanent(format!("not an order event: {err}")))?;
        let (id, version) = (event.stream.id(), event.version as i64);
        let changed = match e {
            OrderEvent::Placed { customer, item, quantity, amount } => tx
                .prepare_cached(
                    "INSERT INTO orders (id, customer, item, quantity, amount, status, version)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'placed', ?6) ON CONFLICT(id) DO NOTHING",
                )?
                .execute(params![id, customer, item, quantity, amount, version])?,
            OrderEvent::Confirmed {} => set_status(tx, id, "confirmed", version)?,
            OrderEvent::Cancelled { .. } => set_status(tx, id, "cancelled", version)?,
        };
        if changed == 0 {
            return Err(ApplyError::Permanent(format!(
                "order {id}: {} does not follow what the model holds",
                event.event_type
            )));
        }
        Ok(())
    }
}

fn set_status(tx: &Transaction<'_>, id: &str, status: &str, version: i64) -> Result<usize, ApplyError> {
    Ok(tx
        .prepare_cached("UPDATE orders SET status = ?2, version = ?3 WHERE id = ?1 AND status = 'placed'")?
        .execute(params![id, status, version])?)
}

/// One order from the model.
pub fn get_order(c: &esk::rusqlite::Connection, id: &str) -> esk::rusqlite::Result<Option<OrderRow>> {
    c.query_row("SELECT id, customer, item, quantity, amount, status, version FROM orders WHERE id = ?1", [id], |r| {
        Ok(OrderRow {
            id: r.get(0)?,
            customer: r.get(1)?,
            item: r.get(2)?,
            quantity: r.get(3)?,
            amount: r.get(4)?,
            status: r.get(5)?,
            version: r.get(6)?,
        })
    })
    .optional()
}

/// `GET /orders/{id}` (`after=<position token>`, `timeout_ms`).
pub fn routes() -> Router<Arc<App>> {
    Router::new().route("/orders/{id}", get(order))
}

async fn order(
    extract::State(app): extract::State<Arc<App>>,
    Path(id): Path<String>,
    Query(params): Params,
) -> Result<Json<OrderRow>, ApiError> {
    let (model, _) = after(&app, NAME, &params).await?;
    let key = id.clone();
    read(model, move |c| get_order(c, &key))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("order {id} does not exist")))
}

#[cfg(test)]
mod tests {
    use esk::testing::{Model, event, given};
    use serde_json::json;

    use super::*;

    fn place() -> Command {
        Command::Place { customer: "ann".into(), item: "tea".into(), quantity: 2, amount: 700 }
    }

    fn placed() -> OrderEvent {
        OrderEvent::Placed { customer: "ann".into(), item: "tea".into(), quantity: 2, amount: 700 }
    }

    #[test]
    fn an_order_is_placed_once() {
        given::<Order>(&[]).when(&place()).then_expect(vec![placed()]);
        given::<Order>(&[placed()]).when(&place()).then_reject("already placed");
    }

    #[test]
    fn an_order_names_a_customer_and_an_item_that_name_streams() {
        let bad = Command::Place { customer: "ann smith".into(), item: "tea".into(), quantity: 1, amount: 7 };
        given::<Order>(&[]).when(&bad).then_invalid("account stream");
    }

    #[test]
    fn an_order_needs_a_quantity() {
        let bad = Command::Place { customer: "ann".into(), item: "tea".into(), quantity: 0, amount: 700 };
        given::<Order>(&[]).when(&bad).then_invalid("quantity from 1");
    }

    #[test]
    fn an_order_ends_once() {
        given::<Order>(&[placed()]).when(&Command::Confirm {}).then_expect(vec![OrderEvent::Confirmed {}]);
        given::<Order>(&[placed(), OrderEvent::Confirmed {}])
            .when(&Command::Cancel { reason: "late".into() })
            .then_reject("cannot be cancelled");
        given::<Order>(&[]).when(&Command::Confirm {}).then_reject("cannot be confirmed");
    }

    #[test]
    fn the_model_follows_an_order() {
        let mut model = Model::new(Orders).unwrap();
        let parked = model
            .given(&[
                event("order-1", 1, "Placed", json!({"customer": "ann", "item": "tea", "quantity": 2, "amount": 700})),
                event("order-1", 2, "Cancelled", json!({"reason": "out of stock"})),
            ])
            .unwrap();
        assert!(parked.is_empty(), "{parked:?}");
        let row = model.query(|c| get_order(c, "1")).unwrap().unwrap();
        assert_eq!((row.status.as_str(), row.version, row.quantity), ("cancelled", 2, 2));
    }

    #[test]
    fn the_model_refuses_what_does_not_follow() {
        let mut model = Model::new(Orders).unwrap();
        let err = model.when(&event("order-2", 2, "Confirmed", json!({}))).unwrap_err();
        assert!(matches!(err, ApplyError::Permanent(ref m) if m.contains("does not follow")), "{err:?}");
        let err = model.when(&event("order-3", 1, "Shipped", json!({}))).unwrap_err();
        assert!(matches!(err, ApplyError::Permanent(ref m) if m.contains("not an order event")), "{err:?}");
    }

    #[test]
    fn an_event_refused_in_a_batch_is_parked_and_the_rest_kept() {
        let mut model = Model::new(Orders).unwrap();
        let placed = json!({"customer": "ann", "item": "tea", "quantity": 1, "amount": 5});
        let parked = model
            .given(&[
                event("order-4", 1, "Placed", placed.clone()),
                event("order-5", 2, "Confirmed", json!({})),
                event("order-6", 1, "Placed", placed),
            ])
            .unwrap();
        assert_eq!(parked.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![1]);
        let ids: Vec<String> = model
            .query(|c| c.prepare("SELECT id FROM orders ORDER BY id")?.query_map([], |r| r.get(0))?.collect())
            .unwrap();
        assert_eq!(ids, vec!["4", "6"]);
    }
}
