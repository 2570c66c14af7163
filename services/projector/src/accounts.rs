//! The `accounts` projection: balance, available and version per account.
//!
//! `available` is the balance minus open withdrawal holds of 2PC transactions,
//! as the account aggregate counts it. The shipped example of a projection.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get as route_get;
use axum::{Json, Router};
use esk_domain::account::{Event as AccountEvent, HeldCommand};
use esk_projection::sqlite::SqliteStore;
use esk_projection::{ApplyError, Projection, StoreError};
use esk_wire::Event;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::Serialize;
use serde_json::{Value, json};

use crate::App;
use crate::http::{ApiError, Params, after, read, wait_limit};

/// The projection's name: its store, group and dead-letter topic.
pub const NAME: &str = "accounts";

#[derive(Debug, Clone, Copy, Default)]
pub struct Accounts;

/// An account as queries see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Account {
    pub id: String,
    pub owner: String,
    pub balance: i64,
    pub available: i64,
    pub version: u64,
}

impl Projection<SqliteStore> for Accounts {
    fn name(&self) -> &str {
        NAME
    }

    fn categories(&self) -> Vec<String> {
        vec!["account".into()]
    }

    fn migrate(&self, store: &mut SqliteStore) -> Result<(), StoreError> {
        store.execute_batch(
            "CREATE TABLE IF NOT EXISTS accounts (
                 id TEXT PRIMARY KEY, owner TEXT NOT NULL,
                 balance INTEGER NOT NULL, available INTEGER NOT NULL, version INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS account_holds (
                 id TEXT NOT NULL, txid TEXT NOT NULL, command TEXT NOT NULL, amount INTEGER NOT NULL,
                 PRIMARY KEY (id, txid));",
        )
    }

    fn apply(&self, tx: &mut Transaction<'_>, event: &Event) -> Result<(), ApplyError> {
        let e: AccountEvent = decode(&event.event_type, &event.data)
            .map_err(|err| ApplyError::Permanent(format!("not an account event: {err}")))?;
        let id = event.stream.id();
        let version = event.version as i64;
        let changed = match &e {
            AccountEvent::AccountOpened { owner } => {
                let exists: Option<i64> = tx
                    .prepare_cached("SELECT version FROM accounts WHERE id = ?1")?
                    .query_row([id], |r| r.get(0))
                    .optional()?;
                if exists.is_some() {
                    return Err(ApplyError::Permanent(format!("account {id} is already open")));
                }
                tx.prepare_cached(
                    "INSERT INTO accounts (id, owner, balance, available, version) VALUES (?1, ?2, 0, 0, ?3)",
                )?
                .execute(params![id, owner, version])?
            }
            AccountEvent::Deposited { amount, .. } => move_money(tx, id, *amount, *amount, version)?,
            AccountEvent::Withdrawn { amount, .. } => move_money(tx, id, -amount, -amount, version)?,
            AccountEvent::HoldPlaced { txid, command, amount } => {
                let held = if *command == HeldCommand::Withdraw { -amount } else { 0 };
                let n = move_money(tx, id, 0, held, version)?;
                if n == 1 {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO account_holds (id, txid, command, amount) VALUES (?1, ?2, ?3, ?4)",
                    )?
                    .execute(params![id, txid, format!("{command:?}"), amount])?;
                }
                n
            }
            AccountEvent::HoldReleased { txid, .. } => {
                let hold: Option<(String, i64)> = tx
                    .prepare_cached("DELETE FROM account_holds WHERE id = ?1 AND txid = ?2 RETURNING command, amount")?
                    .query_row(params![id, txid], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                let back = match hold {
                    Some((command, amount)) if command == "Withdraw" => amount,
                    _ => 0,
                };
                move_money(tx, id, 0, back, version)?
            }
        };
        if changed == 0 {
            return Err(ApplyError::Permanent(format!("account {id} is not open")));
        }
        Ok(())
    }
}

/// An adjacently tagged event (`{"type", "data"}`) from its type and data as
/// they are, without building that object (a copy of the data per event).
fn decode<T: serde::de::DeserializeOwned>(event_type: &str, data: &Value) -> serde_json::Result<T> {
    use serde::de::IntoDeserializer as _;
    let event_type = Value::String(event_type.to_owned());
    let entries = [("type", &event_type), ("data", data)];
    T::deserialize(serde::de::value::MapDeserializer::new(entries.into_iter().map(|(k, v)| (k, v.into_deserializer()))))
}

fn move_money(tx: &Transaction<'_>, id: &str, balance: i64, available: i64, version: i64) -> Result<usize, ApplyError> {
    Ok(tx
        .prepare_cached(
            "UPDATE accounts SET balance = balance + ?2, available = available + ?3, version = max(version, ?4)
             WHERE id = ?1",
        )?
        .execute(params![id, balance, available, version])?)
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Account> {
    Ok(Account {
        id: r.get(0)?,
        owner: r.get(1)?,
        balance: r.get(2)?,
        available: r.get(3)?,
        version: r.get::<_, i64>(4)? as u64,
    })
}

pub fn get(conn: &Connection, id: &str) -> rusqlite::Result<Option<Account>> {
    conn.query_row("SELECT id, owner, balance, available, version FROM accounts WHERE id = ?1", [id], row).optional()
}

/// Accounts ordered by id, after `cursor`, at most `limit`.
pub fn list(conn: &Connection, cursor: Option<&str>, limit: u32) -> rusqlite::Result<Vec<Account>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, owner, balance, available, version FROM accounts WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    stmt.query_map(params![cursor.unwrap_or(""), limit], row)?.collect()
}

/// The queries of the `accounts` model:
/// - `GET /accounts/{id}` -> `{"id","owner","balance","available","version"}`;
///   `min_version=<n>` waits until the account has reached that version;
/// - `GET /accounts?limit=&cursor=` -> `{"accounts": [...], "next": cursor|null}`;
/// - both take `after=<position token>` and `timeout_ms` (see [`crate::http`]).
pub fn routes() -> Router<Arc<App>> {
    Router::new().route("/accounts", route_get(list_route)).route("/accounts/{id}", route_get(account_route))
}

fn account_id(raw: &str) -> Result<String, ApiError> {
    let id = raw.strip_prefix("account-").unwrap_or(raw);
    esk_wire::StreamName::new("account", id)
        .map(|s| s.id().to_owned())
        .map_err(|e| ApiError::bad(format!("'{raw}' is not an account id: {e}")))
}

async fn account_route(
    State(app): State<Arc<App>>,
    Path(raw): Path<String>,
    Query(params): Params,
) -> Result<Json<Account>, ApiError> {
    let id = account_id(&raw)?;
    let min_version = match params.get("min_version") {
        None => None,
        Some(v) => {
            Some(v.parse::<u64>().map_err(|_| ApiError::bad(format!("min_version '{v}' is not a whole number")))?)
        }
    };
    let limit = wait_limit(&app, &params)?;
    let (model, left) = after(&app, NAME, &params).await?;
    let deadline = tokio::time::Instant::now() + left;
    loop {
        let key = id.clone();
        let found = read(model, move |c| get(c, &key)).await?;
        let reached = found.as_ref().map_or(0, |a| a.version);
        match (found, min_version) {
            (Some(a), None) => return Ok(Json(a)),
            (Some(a), Some(v)) if a.version >= v => return Ok(Json(a)),
            (None, None) => {
                return Err(ApiError::not_found(format!("account {id} does not exist")));
            }
            (_, Some(v)) => {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return Err(ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "timeout",
                        format!(
                            "account {id} did not reach version {v} within {} ms (it is at {reached})",
                            limit.as_millis()
                        ),
                    )
                    .with("wanted", json!(v))
                    .with("reached", json!(reached)));
                }
                model.runner.changed(deadline - now).await;
            }
        }
    }
}

async fn list_route(State(app): State<Arc<App>>, Query(params): Params) -> Result<Json<Value>, ApiError> {
    let limit = match params.get("limit") {
        None => 100,
        Some(l) => match l.parse::<u32>() {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => {
                return Err(ApiError::bad(format!("limit '{l}' is not a number from 1 to 1000")));
            }
        },
    };
    let cursor = params.get("cursor").cloned();
    let (model, _) = after(&app, NAME, &params).await?;
    let page = read(model, move |c| list(c, cursor.as_deref(), limit)).await?;
    let next = (page.len() as u32 == limit).then(|| page.last().map(|a| a.id.clone())).flatten();
    Ok(Json(json!({"accounts": page, "next": next})))
}

#[cfg(test)]
mod tests {
    use super::*;
    use esk_projection::Store;
    use esk_wire::StreamName;
    use serde_json::json;

    fn event(stream: &str, version: u64, ty: &str, data: Value) -> Event {
        Event {
            id: format!("{stream}-{version}"),
            source: "test".into(),
            event_type: ty.into(),
            time: chrono::Utc::now(),
            stream: StreamName::parse(stream).unwrap(),
            version,
            correlation_id: None,
            causation_id: None,
            data_schema: None,
            data,
        }
    }

    #[test]
    fn folds_account_events_with_holds() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        Accounts.migrate(&mut store).unwrap();
        let events = [
            event("account-1", 1, "AccountOpened", json!({"owner": "ann"})),
            event("account-1", 2, "Deposited", json!({"amount": 100})),
            event("account-1", 3, "HoldPlaced", json!({"txid": "t", "command": "Withdraw", "amount": 30})),
            event("account-1", 4, "HoldPlaced", json!({"txid": "u", "command": "Deposit", "amount": 5})),
        ];
        let mut tx = store.begin().unwrap();
        for e in &events {
            Accounts.apply(&mut tx, e).unwrap();
        }
        SqliteStore::commit(tx).unwrap();
        let a = get(store.connection(), "1").unwrap().unwrap();
        assert_eq!((a.balance, a.available, a.version), (100, 70, 4));
        let mut tx = store.begin().unwrap();
        Accounts.apply(&mut tx, &event("account-1", 5, "Withdrawn", json!({"amount": 30, "txid": "t"}))).unwrap();
        Accounts
            .apply(&mut tx, &event("account-1", 6, "HoldReleased", json!({"txid": "t", "outcome": "committed"})))
            .unwrap();
        Accounts
            .apply(&mut tx, &event("account-1", 7, "HoldReleased", json!({"txid": "u", "outcome": "aborted"})))
            .unwrap();
        SqliteStore::commit(tx).unwrap();
        let a = get(store.connection(), "1").unwrap().unwrap();
        assert_eq!((a.balance, a.available, a.version), (70, 70, 7));
    }

    #[test]
    fn events_it_cannot_apply_are_permanent_failures() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        Accounts.migrate(&mut store).unwrap();
        let mut tx = store.begin().unwrap();
        for (e, wanted) in [
            (event("account-9", 1, "Deposited", json!({"amount": 1})), "not open"),
            (event("account-9", 1, "Bonus", json!({})), "not an account event"),
            (event("account-9", 1, "Deposited", json!({"amount": "ten"})), "not an account event"),
            (event("account-9", 1, "HoldPlaced", json!({"txid": "t"})), "not an account event"),
        ] {
            match Accounts.apply(&mut tx, &e) {
                Err(ApplyError::Permanent(m)) => assert!(m.contains(wanted), "{m}"),
                other => panic!("{other:?}"),
            }
        }
    }
}
