//! The shop's shipping service: the `shipments` read model, fed by the
//! orders context's events: an order placed is known, a confirmed one is to
//! ship, a cancelled one is not shipped. `GET /shipments/{order}`.

use std::sync::Arc;

use esk::axum::extract::{self, Path, Query};
use esk::axum::routing::get;
use esk::axum::{Json, Router};
use esk::projector::{ApiError, App, Params, after, read};
use esk::rusqlite::{OptionalExtension as _, Transaction, params};
use esk::{ApplyError, Event, Projection, SqliteStore, StoreError};
use serde::Serialize;

/// The model's name: its store, group and dead-letter topic.
pub const NAME: &str = "shipments";

/// The `shipments` read model.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shipments;

/// A shipment as queries see it: `pending` (placed, not confirmed yet),
/// `to_ship` (confirmed) or `not_shipped` (cancelled).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Shipment {
    pub order: String,
    pub customer: String,
    pub item: String,
    pub quantity: i64,
    pub status: String,
}

impl Projection<SqliteStore> for Shipments {
    fn name(&self) -> &str {
        NAME
    }

    fn categories(&self) -> Vec<String> {
        vec!["order".into()]
    }

    fn migrate(&self, store: &mut SqliteStore) -> Result<(), StoreError> {
        store.execute_batch(
            "CREATE TABLE IF NOT EXISTS shipments (
                 id TEXT PRIMARY KEY, customer TEXT NOT NULL, item TEXT NOT NULL,
                 quantity INTEGER NOT NULL, status TEXT NOT NULL)",
        )
    }

    fn apply(&self, tx: &mut Transaction<'_>, event: &Event) -> Result<(), ApplyError> {
        let id = event.stream.id();
        let set = |status: &str| -> Result<usize, ApplyError> {
            Ok(tx
                .prepare_cached("UPDATE shipments SET status = ?2 WHERE id = ?1 AND status = 'pending'")?
                .execute(params![id, status])?)
        };
        let changed = match event.event_type.as_str() {
            "Placed" => {
                let d = &event.data;
                let (Some(customer), Some(item), Some(quantity)) =
                    (d["customer"].as_str(), d["item"].as_str(), d["quantity"].as_i64())
                else {
                    return Err(ApplyError::Permanent(format!("order {id}: a Placed event without its terms")));
                };
                tx.prepare_cached(
                    "INSERT INTO shipments (id, customer, item, quantity, status) VALUES (?1, ?2, ?3, ?4, 'pending')
                     ON CONFLICT(id) DO NOTHING",
                )?
                .execute(params![id, customer, item, quantity])?
            }
            "Confirmed" => set("to_ship")?,
            "Cancelled" => set("not_shipped")?,
            // Events of orders this model does not ship by: nothing to do.
            _ => return Ok(()),
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

/// One shipment from the model.
pub fn get_shipment(c: &esk::rusqlite::Connection, id: &str) -> esk::rusqlite::Result<Option<Shipment>> {
    c.query_row("SELECT id, customer, item, quantity, status FROM shipments WHERE id = ?1", [id], |r| {
        Ok(Shipment { order: r.get(0)?, customer: r.get(1)?, item: r.get(2)?, quantity: r.get(3)?, status: r.get(4)? })
    })
    .optional()
}

/// `GET /shipments/{order}` (`after=<position token>`, `timeout_ms`).
pub fn routes() -> Router<Arc<App>> {
    Router::new().route("/shipments/{order}", get(shipment))
}

async fn shipment(
    extract::State(app): extract::State<Arc<App>>,
    Path(order): Path<String>,
    Query(params): Params,
) -> Result<Json<Shipment>, ApiError> {
    let (model, _) = after(&app, NAME, &params).await?;
    let key = order.clone();
    read(model, move |c| get_shipment(c, &key))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no shipment for order {order}")))
}

#[cfg(test)]
mod tests {
    use esk::testing::{Model, event};
    use serde_json::json;

    use super::*;

    fn placed(order: &str) -> Event {
        event(order, 1, "Placed", json!({"customer": "ann", "item": "tea", "quantity": 2, "amount": 700}))
    }

    #[test]
    fn confirmed_orders_are_to_ship_and_cancelled_ones_not() {
        let mut model = Model::new(Shipments).unwrap();
        let parked = model
            .given(&[
                placed("order-1"),
                placed("order-2"),
                event("order-1", 2, "Confirmed", json!({})),
                event("order-2", 2, "Cancelled", json!({"reason": "no stock"})),
            ])
            .unwrap();
        assert!(parked.is_empty(), "{parked:?}");
        let one = model.query(|c| get_shipment(c, "1")).unwrap().unwrap();
        assert_eq!((one.status.as_str(), one.item.as_str(), one.quantity), ("to_ship", "tea", 2));
        assert_eq!(model.query(|c| get_shipment(c, "2")).unwrap().unwrap().status, "not_shipped");
        assert!(model.query(|c| get_shipment(c, "3")).unwrap().is_none());
    }

    #[test]
    fn an_order_confirmed_twice_or_unknown_is_parked() {
        let mut model = Model::new(Shipments).unwrap();
        let parked = model
            .given(&[
                placed("order-1"),
                event("order-1", 2, "Confirmed", json!({})),
                event("order-1", 3, "Cancelled", json!({"reason": "late"})),
                event("order-9", 2, "Confirmed", json!({})),
            ])
            .unwrap();
        assert_eq!(parked.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(model.query(|c| get_shipment(c, "1")).unwrap().unwrap().status, "to_ship");
    }
}
