//! The projector's HTTP API.
//!
//! - the models' own query routes (the built-in projector's: `/accounts`, see
//!   [`crate::accounts::routes`]); they take `after=<position token>` (from an
//!   append or command reply): the answer waits until the model has applied
//!   it (`timeout_ms`, default 5000), else 504 with what it reached. A route
//!   reads through [`after`] and [`read`].
//! - `GET /status`: per projection, checkpoints, high watermarks, lag, events/s, rebuild.
//! - `POST /projections/{name}/rebuild`, `POST /projections/{name}/replay`
//!   (a process manager is not rebuilt: 409).
//! - `GET /processes/{name}/{id}`: a process manager's process: state,
//!   commands waiting, answers, deadlines.
//! - `/health`, `/metrics`.
//!
//! Errors are JSON: `{"error": "<code>", "message": "..."}` with a 4xx or 5xx status.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use esk_wire::protocol::Position;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{App, Model};

/// An HTTP error with a JSON body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Value,
}

impl ApiError {
    /// `{"error": code, "message": message}` with `status`.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self { status, body: json!({"error": code, "message": message.into()}) }
    }

    /// 400 `bad_request`.
    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// Adds `key` to the body.
    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.body[key] = value;
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

/// A query's parameters, as every route takes them.
pub type Params = Query<HashMap<String, String>>;

/// The paths the projector serves itself; a model's own routes may not use them.
pub const BUILT_IN: [&str; 8] = [
    "/health",
    "/ready",
    "/metrics",
    "/status",
    "/projections",
    "/projections/{name}/rebuild",
    "/projections/{name}/replay",
    "/processes/{name}/{id}",
];

/// The built-in routes and `routes` (the models' queries). Made before
/// anything starts: a model's route on a built-in path ([`BUILT_IN`]) is a
/// programming error that axum refuses with a panic naming the path.
pub fn router(routes: Router<Arc<App>>) -> Router<Arc<App>> {
    routes
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/projections", get(status))
        .route("/projections/{name}/rebuild", post(rebuild))
        .route("/projections/{name}/replay", post(replay))
        .route("/processes/{name}/{id}", get(process))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
}

/// Serves `router` (from [`router`]).
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    router: Router<Arc<App>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let limits = app.config.http.clone();
    esk_runtime::http::serve(listener, router.with_state(app), shutdown, &limits).await?;
    Ok(())
}

/// How long a query may wait: `timeout_ms`, default 5 s, at most the configured maximum.
pub fn wait_limit(app: &App, params: &HashMap<String, String>) -> Result<Duration, ApiError> {
    let ms = match params.get("timeout_ms") {
        None => 5000,
        Some(t) => t
            .parse::<u64>()
            .map_err(|_| ApiError::bad(format!("timeout_ms '{t}' is not a whole number of milliseconds")))?,
    };
    Ok(Duration::from_millis(ms.min(app.config.max_wait_ms)))
}

/// The model `name`, once it has applied the query's `after` token if it
/// gave one (else 504 `timeout` with where the model is); and how long the
/// query may still wait of its `timeout_ms`. What a model's own route calls
/// first.
pub async fn after<'a>(
    app: &'a App,
    name: &str,
    params: &HashMap<String, String>,
) -> Result<(&'a Model, Duration), ApiError> {
    let model = named(app, name)?;
    let limit = wait_limit(app, params)?;
    let started = tokio::time::Instant::now();
    after_token(app, model, params, limit).await?;
    Ok((model, limit.saturating_sub(started.elapsed())))
}

/// Waits until the model has applied the `after` token, if one was given.
async fn after_token(
    app: &App,
    model: &Model,
    params: &HashMap<String, String>,
    limit: Duration,
) -> Result<(), ApiError> {
    let Some(token) = params.get("after") else {
        return Ok(());
    };
    let pos: Position = token.parse().map_err(ApiError::bad)?;
    if !model.categories.contains(&pos.category) {
        return Err(ApiError::bad(format!(
            "token '{token}' is for category '{}'; the {} model reads {}",
            pos.category,
            model.name,
            model.categories.join(", ")
        )));
    }
    let topic = app.topics.events(&pos.category);
    model.runner.wait_past(&topic, pos.partition, pos.offset, limit).await.map_err(|reached| {
        let at = reached.get(&(topic.clone(), pos.partition)).copied().unwrap_or(0);
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!(
                "the {} model has not applied {token} within {} ms: it is at offset {at} of {topic}/{}",
                model.name,
                limit.as_millis(),
                pos.partition
            ),
        )
        .with("wanted", json!(token))
        .with("reached", json!(at))
    })
}

/// Runs `f` on one of the model's query connections (off the async threads).
pub async fn read<R: Send + 'static>(
    model: &Model,
    f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<R> + Send + 'static,
) -> Result<R, ApiError> {
    let readers = model.readers.clone();
    tokio::task::spawn_blocking(move || readers.with(f))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", e.to_string()))
}

async fn model_status(model: &Model) -> Value {
    let status = model.runner.status();
    // As last sampled: no Kafka call here.
    let lag = model.runner.lag();
    for l in lag.iter().flatten() {
        let partition = format!("{}/{}", l.topic, l.partition);
        metrics::gauge!("esk_projection_lag_records", "projection" => model.name.clone(), "partition" => partition.clone())
            .set(l.lag_records as f64);
        metrics::gauge!("esk_projection_lag_ms", "projection" => model.name.clone(), "partition" => partition)
            .set(l.lag_ms as f64);
    }
    json!({
        "name": model.name,
        "version": status.version,
        "applied": status.applied,
        "parked": status.parked,
        "events_per_second": status.events_per_second,
        "lag": lag.as_ref().map(|l| l.iter().map(|l| l.lag_records).sum::<i64>()),
        "lag_ms": lag.as_ref().map(|l| l.iter().map(|l| l.lag_ms).max().unwrap_or(0)),
        "partitions": lag,
        "rebuild": status.rebuild,
    })
}

/// Ready when Kafka answers and every read model has caught up once; 503
/// with the reasons before. No Kafka call here.
async fn ready(State(app): State<Arc<App>>) -> (StatusCode, Json<Value>) {
    let mut reasons = Vec::new();
    if let Err(e) = esk_runtime::sample::reachable(&app.probe, esk_runtime::sample::PROBE_FRESH) {
        reasons.push(e);
    }
    for m in app.models() {
        let lag = m.runner.lag().map(|l| l.iter().map(|l| l.lag_records).sum());
        if let Err(e) = m.caught_up.check(&format!("projection {}", m.name), lag) {
            reasons.push(e);
        }
    }
    esk_runtime::http::readiness(reasons)
}

async fn status(State(app): State<Arc<App>>) -> Json<Value> {
    let mut all = Vec::new();
    for m in app.models() {
        all.push(model_status(m).await);
    }
    Json(json!({"instance": app.config.instance, "projections": all}))
}

async fn metrics(State(app): State<Arc<App>>) -> String {
    for m in app.models() {
        model_status(m).await;
    }
    esk_runtime::metrics().render()
}

fn named<'a>(app: &'a App, name: &str) -> Result<&'a Model, ApiError> {
    app.model(name).ok_or_else(|| {
        let known: Vec<&str> = app.models().map(|m| m.name.as_str()).collect();
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no projection '{name}' (known: {})", known.join(", ")),
        )
    })
}

async fn rebuild(State(app): State<Arc<App>>, Path(name): Path<String>) -> Result<(StatusCode, Json<Value>), ApiError> {
    let model = named(&app, &name)?;
    if model.process {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "'{name}' is a process manager: its store is not rebuilt (a rebuild would send its commands again)"
            ),
        ));
    }
    let runner = &model.runner;
    let version = tokio::task::block_in_place(|| runner.rebuild())
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, "conflict", e))?;
    Ok((StatusCode::ACCEPTED, Json(json!({"projection": name, "version": version}))))
}

/// One process of a process manager: its state, the commands waiting for
/// an answer, the answers so far and its deadlines.
async fn process(
    State(app): State<Arc<App>>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let model = named(&app, &name)?;
    if !model.process {
        return Err(ApiError::not_found(format!("'{name}' is a projection, not a process manager")));
    }
    let wanted = id.clone();
    match read(model, move |c| crate::process::describe(c, &wanted)).await? {
        Some(doc) => Ok(Json(doc)),
        None => Err(ApiError::not_found(format!("no process '{id}' in '{name}'"))),
    }
}

async fn replay(State(app): State<Arc<App>>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let model = named(&app, &name)?;
    let runner = &model.runner;
    let report = tokio::task::block_in_place(|| runner.replay())
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e))?;
    Ok(Json(json!({"projection": name, "replayed": report.replayed,
        "already_replayed": report.already_replayed, "not_parked_here": report.not_parked_here,
        "still_failing": report.still_failing})))
}
