//! The esk replica: a follower of the leader topic (`<prefix>.state`) that
//! serves every stream's state over HTTP.
//!
//! It reads with `read_committed` into a local SQLite store, its applied
//! position in the same transaction (see `esk_follower`), so a crash never
//! leaves it ahead of or out of step with what it says it applied, and no
//! write of an aborted Kafka transaction is ever shown. Several replicas may
//! run, each with its own store.
//!
//! - `GET /streams/{stream}` -> `{"stream","version","state"}`; `after=<position>`
//!   or `min_version=<n>` waits until the replica has applied that much
//!   (`timeout_ms`, default 5000), else 504 with what it reached. A client that
//!   passes the token of what it last saw never reads an older state, from any replica.
//! - `GET /status`: applied position, high watermark, lag in records and in ms per partition.
//! - `/health`, `/metrics`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;
use esk_follower::Follower;
use esk_follower::sqlite::{Reader, SqliteSink, StreamState};
use esk_kafka::KafkaConfig;
use esk_wire::protocol::Position;
use esk_wire::{StreamName, Topics};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Parser)]
#[command(name = "esk-replica", version, about = "esk's replica: follows the leader topic, serves stream state")]
pub struct Config {
    /// Kafka bootstrap servers, host:port[,host:port...].
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS", default_value = "127.0.0.1:9092")]
    pub bootstrap_servers: String,
    /// Kafka client properties (librdkafka names: TLS, SASL, tuning) from a
    /// Java-style properties file, as Kafka's tools take `--command-config`.
    /// Each `ESK_KAFKA_<PROPERTY>` variable applies on top (`_` for `.`, `__`
    /// for `_`: `ESK_KAFKA_SECURITY_PROTOCOL=SASL_SSL`). Properties esk's
    /// guarantees rest on (isolation.level, enable.idempotence,
    /// transactional.id, partitioner, acks, group.id, ...) are refused.
    #[arg(long, env = "ESK_KAFKA_CONFIG")]
    pub kafka_config: Option<PathBuf>,
    /// Prefix of every platform topic.
    #[arg(long, env = "ESK_TOPIC_PREFIX", default_value = "esk")]
    pub prefix: String,
    /// The bounded context whose state topic this replica follows
    /// (`<prefix>.<context>.state`; `default`: `<prefix>.state`).
    #[arg(long, env = "ESK_CONTEXT", default_value = esk_wire::topics::DEFAULT_CONTEXT, value_parser = esk_wire::topics::parse_context)]
    pub context: String,
    /// Address of the HTTP endpoint.
    #[arg(long, env = "ESK_REPLICA_HTTP", default_value = "127.0.0.1:8703")]
    pub http_addr: String,
    /// Folder of the local store.
    #[arg(long, env = "ESK_DATA_DIR", default_value = ".esk/data")]
    pub data_dir: PathBuf,
    /// This replica's name (each keeps its own store).
    #[arg(long, env = "ESK_REPLICA_INSTANCE", default_value = "0")]
    pub instance: String,
    /// Longest a query waits for a token, in ms.
    #[arg(long, env = "ESK_REPLICA_MAX_WAIT_MS", default_value_t = 30_000)]
    pub max_wait_ms: u64,
    /// Bounds of the HTTP server.
    #[command(flatten)]
    pub http: esk_runtime::http::HttpLimits,
}

impl Config {
    pub fn store(&self) -> PathBuf {
        self.data_dir.join(format!("{}-replica-{}", self.scope(), self.instance)).join("replica.sqlite")
    }

    /// `<prefix>`, or `<prefix>-<context>` for another context than the default.
    fn scope(&self) -> String {
        Topics::new(&self.prefix).in_context(&self.context).scope()
    }
}

struct App {
    config: Config,
    follower: Follower,
    reader: Reader,
    probe: esk_runtime::sample::Sampled<Result<(), String>>,
    caught_up: esk_runtime::sample::CaughtUp,
}

/// Runs the replica until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    esk_runtime::metrics();
    esk_runtime::described::describe("replica");
    let kafka = KafkaConfig::load(&config.bootstrap_servers, Duration::from_secs(30), config.kafka_config.as_deref())?;
    Topics::validate_prefix(&config.prefix).map_err(anyhow::Error::msg)?;
    let topics = Topics::new(&config.prefix).in_context(&config.context);
    let path = config.store();
    let sink = SqliteSink::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let listener = esk_runtime::http::bind(&config.http_addr, &config.http).await?;
    let group = format!("{}-replica-{}", config.scope(), config.instance);
    let follower = esk_follower::spawn(&kafka, &topics.state(), &group, sink)?;
    tracing::info!(http = %listener.local_addr()?, store = %path.display(), "replica following {}", topics.state());
    let probe = esk_runtime::sample::kafka_probe(&kafka, &group, &topics.state())?;
    let app = Arc::new(App { reader: Reader::new(&path), config, follower, probe, caught_up: Default::default() });
    let router = Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/streams/{stream}", get(stream))
        .fallback(|| async { err(StatusCode::NOT_FOUND, "not_found", "no such endpoint".into()) })
        .with_state(app.clone());
    let limits = app.config.http.clone();
    // Following that stopped for good (the brokers refused it) ends the
    // service: a replica that no longer follows would answer tokens never.
    let failed = {
        let (app, shutdown) = (app.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => None,
                why = app.follower.failed() => {
                    shutdown.cancel();
                    Some(why)
                }
            }
        })
    };
    esk_runtime::http::serve(listener, router, shutdown, &limits).await?;
    let failure = failed.await?;
    if let Some(app) = Arc::into_inner(app) {
        tokio::task::spawn_blocking(move || app.follower.stop()).await?;
    }
    match failure {
        Some(e) => Err(anyhow::Error::new(e).context(format!("following {} stopped", topics.state()))),
        None => Ok(()),
    }
}

fn err(status: StatusCode, code: &str, message: String) -> Response {
    (status, Json(json!({"error": code, "message": message}))).into_response()
}

fn bad(message: String) -> Response {
    err(StatusCode::BAD_REQUEST, "bad_request", message)
}

async fn stream(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let stream = match StreamName::parse(&name) {
        Ok(s) => s,
        Err(e) => return bad(e.to_string()),
    };
    let ms = match params.get("timeout_ms").map(|t| t.parse::<u64>()) {
        None => 5000,
        Some(Ok(ms)) => ms.min(app.config.max_wait_ms),
        Some(Err(_)) => {
            return bad(format!("timeout_ms '{}' is not a whole number of milliseconds", params["timeout_ms"]));
        }
    };
    let limit = Duration::from_millis(ms);
    let deadline = tokio::time::Instant::now() + limit;
    let min_version = match params.get("min_version").map(|v| v.parse::<u64>()) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => return bad(format!("min_version '{}' is not a whole number", params["min_version"])),
    };
    if let Some(token) = params.get("after") {
        let pos: Position = match token.parse() {
            Ok(p) => p,
            Err(e) => return bad(e),
        };
        if let Err(reached) = app.follower.wait_for(&pos, limit).await {
            return (
                StatusCode::GATEWAY_TIMEOUT,
                Json(json!({"error": "timeout", "wanted": token, "reached": reached,
                    "message": format!("this replica has not applied {token} within {ms} ms (it is at event offset {reached} of {}:{})", pos.category, pos.partition)})),
            )
                .into_response();
        }
    }
    loop {
        let reader = app.reader.clone();
        let key = stream.to_string();
        let found: Option<StreamState> = match tokio::task::spawn_blocking(move || reader.stream(&key)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return err(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", format!("{e:#}")),
            Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        };
        let reached = found.as_ref().map_or(0, |s| s.version);
        match (found, min_version) {
            (Some(s), None) => return Json(s).into_response(),
            (Some(s), Some(v)) if s.version >= v => return Json(s).into_response(),
            (None, None) => {
                return err(StatusCode::NOT_FOUND, "not_found", format!("stream {stream} does not exist here"));
            }
            (_, Some(v)) => {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return (
                        StatusCode::GATEWAY_TIMEOUT,
                        Json(json!({"error": "timeout", "wanted": v, "reached": reached,
                            "message": format!("stream {stream} did not reach version {v} within {ms} ms (it is at {reached})")})),
                    )
                        .into_response();
                }
                app.follower.changed(deadline - now).await;
            }
        }
    }
}

/// The lag as last sampled (never a Kafka call here); `null`s before the
/// first sample or while Kafka does not answer.
fn lag_doc(app: &App) -> Value {
    let Some(lag) = app.follower.lag() else {
        return json!({"instance": app.config.instance, "lag_records": null, "lag_ms": null, "partitions": null});
    };
    for l in &lag {
        let p = l.partition.to_string();
        metrics::gauge!("esk_replica_lag_records", "partition" => p.clone()).set(l.lag_records as f64);
        metrics::gauge!("esk_replica_lag_ms", "partition" => p).set(l.lag_ms as f64);
    }
    json!({
        "instance": app.config.instance,
        "lag_records": lag.iter().map(|l| l.lag_records).sum::<i64>(),
        "lag_ms": lag.iter().map(|l| l.lag_ms).max().unwrap_or(0),
        "partitions": lag,
    })
}

/// Ready when Kafka answers and the replica has caught up with the state
/// topic once; 503 with the reasons before. No Kafka call here.
async fn ready(State(app): State<Arc<App>>) -> (StatusCode, Json<Value>) {
    let mut reasons = Vec::new();
    if let Err(e) = esk_runtime::sample::reachable(&app.probe, esk_runtime::sample::PROBE_FRESH) {
        reasons.push(e);
    }
    let lag = app.follower.lag().map(|l| l.iter().map(|l| l.lag_records).sum());
    if let Err(e) = app.caught_up.check("the replica", lag) {
        reasons.push(e);
    }
    esk_runtime::http::readiness(reasons)
}

async fn status(State(app): State<Arc<App>>) -> Json<Value> {
    Json(lag_doc(&app))
}

async fn metrics(State(app): State<Arc<App>>) -> String {
    lag_doc(&app);
    esk_runtime::metrics().render()
}
