//! esk's HTTP gateway: the platform over HTTP/JSON for programs in any
//! language, and a web console.
//!
//! - Writes: `POST /streams/{stream}/events`, `POST /streams/{stream}/commands/{command}`,
//!   `POST /transactions`; `Idempotency-Key` is the request id (or txid).
//! - Reads: `GET /streams/{stream}` (paged, both ways), `GET /transactions/{txid}`.
//! - Live: `GET /subscriptions[/{category}]`, Server-Sent Events resumable
//!   with `Last-Event-ID` (see [`subscribe`]).
//! - Errors: RFC 9457 problems, a `type` per class ([`problem`]).
//! - `GET /openapi.json`: the OpenAPI 3.1 document, made from this code and
//!   checked into the repository (`services/gateway/openapi.json`).
//! - The console at `/console/` and the data it shows ([`console`]).
//!
//! The gateway keeps no state of its own: it is a client of the writers and
//! the coordinator (through Kafka, as the CLI is), so any number may run,
//! and one killed loses nothing a client cannot retry.

pub mod api;
pub mod console;
pub mod openapi;
pub mod problem;
pub mod subscribe;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::Result;
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use esk_client::Client;
use esk_kafka::KafkaConfig;
use esk_wire::{SchemaRegistry, Topics};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::problem::{Class, Problem};

#[derive(Debug, Clone, Parser)]
#[command(name = "esk-gateway", version, about = "esk's HTTP gateway: the platform over HTTP/JSON, and a web console")]
pub struct Config {
    /// Kafka bootstrap servers, host:port[,host:port...].
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS", default_value = "127.0.0.1:9092")]
    pub bootstrap_servers: String,
    /// Kafka client properties (librdkafka names: TLS, SASL, tuning) from a
    /// Java-style properties file; `ESK_KAFKA_<PROPERTY>` variables apply on
    /// top. The gateway needs the client role's ACLs (`esk acls`).
    #[arg(long, env = "ESK_KAFKA_CONFIG")]
    pub kafka_config: Option<PathBuf>,
    /// Prefix of every platform topic.
    #[arg(long, env = "ESK_TOPIC_PREFIX", default_value = "esk")]
    pub prefix: String,
    /// Address of the HTTP endpoint.
    #[arg(long, env = "ESK_GATEWAY_HTTP", default_value = "127.0.0.1:8705")]
    pub http_addr: String,
    /// How long a request waits for Kafka and for a writer's answer.
    #[arg(long, env = "ESK_TIMEOUT", default_value = "10s", value_parser = esk_runtime::parse_duration)]
    pub timeout: Duration,
    /// JSON Schemas to upcast events read with (as `esk read --schemas-dir`).
    #[arg(long, env = "ESK_SCHEMAS_DIR")]
    pub schemas_dir: Option<PathBuf>,
    /// Subscriptions served at once; one more is answered 503. Each holds a
    /// Kafka reader, a thread, and up to 256 events and 4 MiB of prefetch.
    #[arg(long, env = "ESK_GATEWAY_MAX_SUBSCRIPTIONS", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub max_subscriptions: u64,
    /// The writers' HTTP endpoints the console shows (comma-separated).
    #[arg(long, env = "ESK_GATEWAY_WRITER_URL", default_value = "http://127.0.0.1:8701", value_delimiter = ',')]
    pub writer_url: Vec<String>,
    /// The projectors' HTTP endpoints: the console's projections and dead letters.
    #[arg(long, env = "ESK_GATEWAY_PROJECTOR_URL", default_value = "http://127.0.0.1:8702", value_delimiter = ',')]
    pub projector_url: Vec<String>,
    /// The replicas' HTTP endpoints the console shows.
    #[arg(long, env = "ESK_GATEWAY_REPLICA_URL", default_value = "http://127.0.0.1:8703", value_delimiter = ',')]
    pub replica_url: Vec<String>,
    /// The coordinators' HTTP endpoints the console shows.
    #[arg(long, env = "ESK_GATEWAY_COORDINATOR_URL", default_value = "http://127.0.0.1:8704", value_delimiter = ',')]
    pub coordinator_url: Vec<String>,
    /// Bounds of the HTTP server. The admin token (`ESK_ADMIN_TOKEN`) guards
    /// the console's replays; it is needed to listen beyond loopback.
    #[command(flatten)]
    pub http: esk_runtime::http::HttpLimits,
}

/// The gateway's state: a client once Kafka answered, and its bounds.
pub struct App {
    pub config: Config,
    pub kafka: KafkaConfig,
    pub topics: Topics,
    pub schemas: Arc<SchemaRegistry>,
    pub client: OnceLock<Arc<Client>>,
    pub connect_error: Mutex<Option<String>>,
    pub subscriptions: Arc<Semaphore>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("prefix", &self.topics.prefix()).finish()
    }
}

impl App {
    /// The longest a request waits for an answer: within the HTTP request's bound.
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.config.http.request_timeout_ms)
            .saturating_sub(Duration::from_secs(2))
            .max(Duration::from_secs(1))
    }
}

/// Runs the gateway until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    esk_runtime::metrics();
    esk_runtime::described::describe("gateway");
    Topics::validate_prefix(&config.prefix).map_err(anyhow::Error::msg)?;
    for url in
        config.writer_url.iter().chain(&config.projector_url).chain(&config.replica_url).chain(&config.coordinator_url)
    {
        console::address(url).map_err(anyhow::Error::msg)?;
    }
    let kafka = KafkaConfig::load(&config.bootstrap_servers, config.timeout, config.kafka_config.as_deref())?;
    let schemas =
        SchemaRegistry::with_dir(config.schemas_dir.as_deref()).map_err(|e| anyhow::anyhow!("--schemas-dir: {e}"))?;
    let listener = esk_runtime::http::bind(&config.http_addr, &config.http).await?;
    let app = Arc::new(App {
        topics: Topics::new(&config.prefix),
        subscriptions: Arc::new(Semaphore::new(config.max_subscriptions as usize)),
        config,
        kafka,
        schemas: Arc::new(schemas),
        client: OnceLock::new(),
        connect_error: Mutex::new(None),
    });
    tracing::info!(http = %listener.local_addr()?, "gateway for {} at {}", app.topics.prefix(), app.kafka.bootstrap);
    let connecting = tokio::spawn(connect(app.clone(), shutdown.clone()));
    let limits = app.config.http.clone();
    esk_runtime::http::serve_guarded(listener, router(app.clone()), shutdown, &limits, console::admin_only, |r| {
        r.layer(axum::middleware::map_response(as_problem))
    })
    .await?;
    connecting.abort();
    if let Some(client) = Arc::into_inner(app).and_then(|a| a.client.into_inner()) {
        // Dropping a client joins its reader thread: off the runtime.
        tokio::task::spawn_blocking(move || drop(client)).await?;
    }
    Ok(())
}

/// Connects the client, again and again until Kafka answers: meanwhile the
/// API answers 503 with the last reason, and `/ready` says it.
async fn connect(app: Arc<App>, shutdown: CancellationToken) {
    let mut pause = Duration::from_millis(200);
    loop {
        let (kafka, topics) = (app.kafka.clone(), app.topics.clone());
        match tokio::task::spawn_blocking(move || Client::connect_pipelined(kafka, topics)).await {
            Ok(Ok(client)) => {
                let _ = app.client.set(Arc::new(client));
                *app.connect_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                tracing::info!("connected to Kafka");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!("connecting to Kafka: {e}; again in {pause:?}");
                *app.connect_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
            Err(e) => tracing::error!("connecting to Kafka: {e}"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// Every route (the HTTP layer's own errors become problems in [`run`]).
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/streams/{stream}/events", post(api::append))
        .route("/streams/{stream}/commands/{command}", post(api::command))
        .route("/streams/{stream}", get(api::read))
        .route("/transactions", post(api::transact).get(console::transactions))
        .route("/transactions/{txid}", get(api::transaction))
        .route("/subscriptions", get(api::subscribe_all))
        .route("/subscriptions/{category}", get(api::subscribe_category))
        .route("/categories", get(console::categories))
        .route("/categories/{category}/events", get(console::category_events))
        .route("/services", get(console::services))
        .route("/projections", get(console::projections))
        .route("/dead-letters", get(console::dead_letters))
        .route("/dead-letters/{projection}/replay", post(console::replay))
        .route("/openapi.json", get(openapi::document))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/", get(|| async { axum::response::Redirect::to("/console/") }))
        .route("/console", get(|| async { axum::response::Redirect::to("/console/") }))
        .route("/console/", get(console::index))
        .route("/console/{asset}", get(console::asset))
        .fallback(|| async { Problem::not_found("no such endpoint (see /openapi.json)") })
        .method_not_allowed_fallback(|| async {
            Problem::new(Class::MethodNotAllowed, "this endpoint does not take that method (see /openapi.json)")
        })
        .with_state(app)
}

/// The gateway runs.
#[utoipa::path(get, path = "/health", tag = "service",
    responses((status = 200, description = "`{\"status\": \"ok\"}`", body = Object)))]
pub async fn health() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"status": "ok"}))
}

/// Prometheus metrics (`esk_gateway_*`, `esk_http_*`).
#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, description = "The Prometheus text format", body = String, content_type = "text/plain")))]
pub async fn metrics() -> String {
    esk_runtime::metrics().render()
}

/// Ready once the gateway reached Kafka (its client is connected).
#[utoipa::path(get, path = "/ready", tag = "service",
    responses((status = 200, description = "`{\"ready\": true}`", body = Object),
              (status = 503, description = "`{\"ready\": false, \"reasons\": [...]}`", body = Object)))]
pub async fn ready(axum::extract::State(app): axum::extract::State<Arc<App>>) -> Response {
    let mut reasons = Vec::new();
    if app.client.get().is_none() {
        let why = app.connect_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
        reasons.push(format!(
            "not connected to Kafka at {} yet{}",
            app.kafka.bootstrap,
            why.map(|w| format!(": {w}")).unwrap_or_default()
        ));
    }
    esk_runtime::http::readiness(reasons).into_response()
}

/// Whether the gateway reached Kafka, and its subscriptions.
#[utoipa::path(get, path = "/status", tag = "service",
    responses((status = 200, description = "`{connected, prefix, subscriptions, max_subscriptions}`", body = Object)))]
pub async fn status(axum::extract::State(app): axum::extract::State<Arc<App>>) -> axum::Json<serde_json::Value> {
    let open = app.config.max_subscriptions as usize - app.subscriptions.available_permits();
    axum::Json(serde_json::json!({
        "connected": app.client.get().is_some(),
        "prefix": app.topics.prefix(),
        "subscriptions": open,
        "max_subscriptions": app.config.max_subscriptions,
    }))
}

/// An error the HTTP layer answered itself (the body limit's 413, the
/// timeout's 408, the admin token's 401, a rejected path) becomes a problem
/// of its class; the handlers' problems pass as they are.
async fn as_problem(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let content_type = response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if content_type.starts_with(problem::PROBLEM_JSON) {
        return response;
    }
    let class = match status {
        StatusCode::PAYLOAD_TOO_LARGE => Class::PayloadTooLarge,
        StatusCode::UNAUTHORIZED => Class::Unauthorized,
        StatusCode::NOT_FOUND => Class::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => Class::MethodNotAllowed,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => Class::UnsupportedMediaType,
        StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => Class::Timeout,
        StatusCode::SERVICE_UNAVAILABLE => Class::Unavailable,
        s if s.is_client_error() => Class::InvalidInput,
        _ => Class::Internal,
    };
    let detail = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "the body is over this gateway's limit (ESK_HTTP_MAX_BODY_BYTES)".to_owned(),
        StatusCode::REQUEST_TIMEOUT => {
            "the request took longer than this gateway's bound (ESK_HTTP_REQUEST_TIMEOUT_MS)".to_owned()
        }
        StatusCode::UNAUTHORIZED => {
            "this request needs the admin token: Authorization: Bearer <ESK_ADMIN_TOKEN>".to_owned()
        }
        _ => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    let (parts, _) = response.into_parts();
    let mut p = Problem::new(class, detail);
    // The request's bound ran out while the gateway worked: its slowness,
    // not the client's (and a 408 is one a browser may send again by itself).
    p.status = if status == StatusCode::REQUEST_TIMEOUT { StatusCode::GATEWAY_TIMEOUT } else { status }.as_u16();
    let mut out = p.into_response();
    if let Some(v) = parts.headers.get(header::WWW_AUTHENTICATE) {
        out.headers_mut().insert(header::WWW_AUTHENTICATE, v.clone());
    }
    if status == StatusCode::METHOD_NOT_ALLOWED
        && let Some(v) = parts.headers.get(header::ALLOW)
    {
        out.headers_mut().insert(header::ALLOW, v.clone());
    }
    out
}
