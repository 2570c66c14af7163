//! `/health`, `/metrics` and `/status` of the writer.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Shared;

/// What the writer reports about its partitions.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Status {
    pub partitions: BTreeMap<i32, PartitionStatus>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct PartitionStatus {
    /// starting, restoring, serving, fenced
    pub phase: &'static str,
    /// Stream records held in memory (all are on disk, in the local store).
    pub cached_streams: usize,
    /// 2PC holds open on the partition's streams.
    pub open_holds: usize,
    pub batches: u64,
    pub records: u64,
}

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let handle = esk_runtime::metrics();
    let limits = shared.config.http.clone();
    let app = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/status", get(status))
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .with_state(shared);
    esk_runtime::http::serve(listener, app, shutdown, &limits).await?;
    Ok(())
}

async fn health(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let status = shared.status.lock().expect("status lock").clone();
    let serving = status.partitions.values().filter(|p| p.phase == "serving").count();
    Json(
        serde_json::json!({"status": "ok", "partitions_owned": status.partitions.len(), "partitions_serving": serving}),
    )
}

/// The partitions this instance owns, and how far behind its hot standby is
/// on the state and answers topics (records not yet in the local store).
/// Ready when Kafka answers and every partition the group assigned is
/// served; 503 with the reasons before that (restoring, a rebalance, the
/// broker unreachable). No Kafka call here: the probe is sampled.
async fn ready(State(shared): State<Arc<Shared>>) -> (axum::http::StatusCode, Json<serde_json::Value>) {
    let assigned = shared.assigned.lock().expect("assigned lock").clone();
    let status = shared.status.lock().expect("status lock").clone();
    esk_runtime::http::readiness(esk_runtime::http::member_not_ready(&shared.probe, "writer", assigned, |p| {
        status.partitions.get(&p).map_or("starting", |s| s.phase)
    }))
}

/// As last sampled (no Kafka call here): a lag is `null` before the first
/// sample or while Kafka does not answer.
async fn status(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let status = shared.status.lock().expect("status lock").clone();
    let standby = shared.standby.as_ref().map(|(state, answers)| {
        let lag = |f: &esk_follower::Follower| f.lag().map(|l| l.iter().map(|l| l.lag_records).sum::<i64>());
        serde_json::json!({"state_lag_records": lag(state), "answers_lag_records": lag(answers)})
    });
    Json(serde_json::json!({"partitions": status.partitions, "standby": standby}))
}
