//! The coordinator's HTTP API: `/health`, `/metrics`, `/status` (open
//! transactions, in-doubt count) and `GET /tx/{txid}` for the partitions this
//! instance owns (the CLI's `esk tx status` asks whichever instance owns it,
//! through Kafka).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use esk_wire::partition::partition_for;
use esk_wire::protocol::TxStatus;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Shared;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let handle = esk_runtime::metrics();
    let limits = shared.config.http.clone();
    let app = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/status", get(status))
        .route("/tx/{txid}", get(tx))
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .fallback(|| async {
            (StatusCode::NOT_FOUND, Json(json!({"error": "not_found", "message": "no such endpoint"})))
        })
        .with_state(shared);
    esk_runtime::http::serve(listener, app, shutdown, &limits).await?;
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

async fn health(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let owned = shared.owned.lock().expect("owned lock").len();
    Json(json!({"status": "ok", "partitions_owned": owned}))
}

/// Ready when Kafka answers and every partition the group assigned is
/// served (restored); 503 with the reasons before. No Kafka call here.
async fn ready(State(shared): State<Arc<Shared>>) -> (StatusCode, Json<Value>) {
    let assigned = shared.assigned.lock().expect("assigned lock").clone();
    let serving = shared.serving.lock().expect("serving lock").clone();
    esk_runtime::http::readiness(esk_runtime::http::member_not_ready(&shared.probe, "coordinator", assigned, |p| {
        if serving.contains(&p) { "serving" } else { "starting" }
    }))
}

async fn status(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let now = now_ms();
    let owned = shared.owned.lock().expect("owned lock").clone();
    let mut partitions = Vec::new();
    let (mut open, mut in_doubt) = (0, 0);
    for (p, txs) in owned {
        let (o, d) = txs.lock().expect("view lock").counts(now);
        open += o;
        in_doubt += d;
        partitions.push(json!({"partition": p, "open": o, "in_doubt": d}));
    }
    Json(json!({"open": open, "in_doubt": in_doubt, "partitions": partitions}))
}

async fn tx(State(shared): State<Arc<Shared>>, Path(txid): Path<String>) -> (StatusCode, Json<Value>) {
    let p = partition_for(txid.as_bytes(), shared.partitions);
    let txs = shared.owned.lock().expect("owned lock").get(&p).cloned();
    let Some(txs) = txs else {
        return (
            StatusCode::NOT_FOUND,
            Json(
                json!({"error": "not_owned", "message": format!("partition {p} of {txid} is owned by another coordinator instance; ask with `esk tx status {txid}`")}),
            ),
        );
    };
    let mut record = txs.lock().expect("view lock").get(&txid).cloned();
    if record.is_none() {
        let store = shared.store.clone();
        let (horizon_ms, t) = (shared.horizon_ms, txid.clone());
        record = tokio::task::spawn_blocking(move || {
            use crate::logic::Done;
            let partition = store.partition(p).ok()?;
            crate::handler::StoreDone { store: &partition, horizon_ms, now_ms: now_ms() }.done(&t).ok().flatten()
        })
        .await
        .ok()
        .flatten();
    }
    match record {
        Some(r) => (StatusCode::OK, Json(serde_json::to_value(TxStatus::of(&r)).expect("statuses serialize"))),
        None => {
            (StatusCode::NOT_FOUND, Json(json!({"error": "not_found", "message": format!("no transaction {txid}")})))
        }
    }
}
