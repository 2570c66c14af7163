//! Every service's HTTP server, with its bounds: how long a client may take
//! to send its headers and how long a request may take, how large a body may
//! be, how many connections are served at once. A client that breaks a bound
//! gets a clear status (408, 413, 503) or its connection closed; the service
//! goes on.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

/// The bounds of a service's HTTP server (flattened into every service's
/// configuration: `--http-*`, `ESK_HTTP_*`).
#[derive(Debug, Clone, clap::Args)]
pub struct HttpLimits {
    /// Longest a client may take to send a request's headers, in ms; then the
    /// connection is closed (slow clients cannot hold connections).
    #[arg(long = "http-header-timeout-ms", env = "ESK_HTTP_HEADER_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub header_timeout_ms: u64,
    /// Longest a request may take, body and answer included, in ms; then 408.
    /// Longer than any wait a query may ask for.
    #[arg(long = "http-request-timeout-ms", env = "ESK_HTTP_REQUEST_TIMEOUT_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub request_timeout_ms: u64,
    /// Largest request body, in bytes; beyond it 413.
    #[arg(long = "http-max-body-bytes", env = "ESK_HTTP_MAX_BODY_BYTES", default_value_t = 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(0..=1024 * 1024 * 1024))]
    pub max_body_bytes: u64,
    /// Connections served at once; one more is answered 503 and closed.
    #[arg(long = "http-max-connections", env = "ESK_HTTP_MAX_CONNECTIONS", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_connections: u64,
    /// The bearer token every request but GET and HEAD must carry
    /// (`Authorization: Bearer <token>`; 401 without it): rebuilds, replays.
    /// Needed to listen beyond loopback; a service refuses to start there
    /// without one.
    #[arg(long = "admin-token", env = "ESK_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_timeout_ms: 10_000,
            request_timeout_ms: 60_000,
            max_body_bytes: 1024 * 1024,
            max_connections: 256,
            admin_token: None,
        }
    }
}

/// A `/ready` answer: 200 when nothing stands in the way, else 503 with
/// every reason.
pub fn readiness(reasons: Vec<String>) -> (StatusCode, axum::Json<serde_json::Value>) {
    if reasons.is_empty() {
        (StatusCode::OK, axum::Json(serde_json::json!({"ready": true})))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({"ready": false, "reasons": reasons})))
    }
}

/// Why a member of a consumer group that owns partitions (writer,
/// coordinator) is not ready: Kafka does not answer, the group has assigned
/// it nothing yet (or is rebalancing), or an assigned partition is not
/// served yet (`phase_of` says where it is; `"serving"` is ready).
pub fn member_not_ready(
    probe: &crate::sample::Sampled<Result<(), String>>,
    group: &str,
    assigned: Option<Vec<i32>>,
    phase_of: impl Fn(i32) -> &'static str,
) -> Vec<String> {
    let mut reasons = Vec::new();
    if let Err(e) = crate::sample::reachable(probe, crate::sample::PROBE_FRESH) {
        reasons.push(e);
    }
    match assigned {
        None => reasons.push(format!("the {group} group has not assigned partitions to this instance yet")),
        Some(partitions) => reasons.extend(
            partitions
                .into_iter()
                .map(|p| (p, phase_of(p)))
                .filter(|(_, phase)| *phase != "serving")
                .map(|(p, phase)| format!("partition {p} is {phase}")),
        ),
    }
    reasons
}

/// Binds a service's HTTP address: a clear error when it cannot, and a
/// refusal to listen beyond loopback without an admin token.
pub async fn bind(addr: &str, limits: &HttpLimits) -> std::io::Result<TcpListener> {
    // Checked before binding: nothing listens beyond loopback, even for a moment.
    let resolved = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    for a in resolved {
        exposure(a, limits)?;
    }
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    check_exposure(&listener, limits)?;
    Ok(listener)
}

fn check_exposure(listener: &TcpListener, limits: &HttpLimits) -> std::io::Result<()> {
    exposure(listener.local_addr()?, limits)
}

fn exposure(local: std::net::SocketAddr, limits: &HttpLimits) -> std::io::Result<()> {
    if !local.ip().is_loopback() && limits.admin_token.as_deref().is_none_or(str::is_empty) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{local} is beyond loopback: set an admin token (ESK_ADMIN_TOKEN or --admin-token) so that \
                 rebuilds, replays and every other request but GET need it, or listen on 127.0.0.1"
            ),
        ));
    }
    Ok(())
}

/// Whether two tokens are equal, in time that does not depend on where they differ.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Which requests need the admin token: those for which it says true.
pub type Guarded = fn(&axum::http::Method, &str) -> bool;

/// The services' rule: every request that changes something (not GET or HEAD).
pub fn changes(method: &axum::http::Method, _path: &str) -> bool {
    !matches!(*method, axum::http::Method::GET | axum::http::Method::HEAD)
}

/// 401 for a request that `guarded` names without the admin token.
async fn require_token(
    token: Option<Arc<str>>,
    guarded: Guarded,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let Some(token) = token else { return next.run(request).await };
    if !guarded(request.method(), request.uri().path()) {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| same_token(g.trim().as_bytes(), token.as_bytes())) {
        return next.run(request).await;
    }
    metrics::counter!("esk_http_unauthorized_total").increment(1);
    let body = serde_json::json!({
        "error": "unauthorized",
        "message": "this request needs the admin token: Authorization: Bearer <ESK_ADMIN_TOKEN>",
    });
    (StatusCode::UNAUTHORIZED, [(axum::http::header::WWW_AUTHENTICATE, "Bearer")], axum::Json(body)).into_response()
}

/// What a connection over the limit gets before it is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n\
content-length: 84\r\n\r\n{\"error\":\"busy\",\"message\":\"too many connections; try again (ESK_HTTP_MAX_CONNECTIONS)\"}";

/// Serves `app` on `listener` within `limits` until `shutdown`; then stops
/// accepting and gives open connections up to five seconds to finish.
/// Every request that changes something needs the admin token when one is set.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
    limits: &HttpLimits,
) -> std::io::Result<()> {
    serve_guarded(listener, app, shutdown, limits, changes, |app| app).await
}

/// [`serve`] where the admin token guards the requests `guarded` names, and
/// `outer` wraps everything (the bounds' own answers too).
pub async fn serve_guarded(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
    limits: &HttpLimits,
    guarded: Guarded,
    outer: fn(Router) -> Router,
) -> std::io::Result<()> {
    check_exposure(&listener, limits)?;
    let token: Option<Arc<str>> = limits.admin_token.as_deref().filter(|t| !t.is_empty()).map(Arc::from);
    let app = app
        .layer(axum::middleware::from_fn(move |request, next| require_token(token.clone(), guarded, request, next)))
        .layer(RequestBodyLimitLayer::new(limits.max_body_bytes as usize))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(limits.request_timeout_ms),
        ));
    let app = outer(app);
    let slots = Arc::new(Semaphore::new(limits.max_connections as usize));
    let graceful = GracefulShutdown::new();
    let header_timeout = Duration::from_millis(limits.header_timeout_ms);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (mut stream, _) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!("accepting an HTTP connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("esk_http_refused_connections_total").increment(1);
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(BUSY)).await;
            });
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        // HTTP/1 alone: a server that sniffs for HTTP/2 first reads with no
        // timer, and a client that sends nothing would hold its slot.
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("HTTP connection: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await.is_err() {
        tracing::debug!("HTTP connections still open at shutdown");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use axum::routing::{get, post};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    use super::*;

    async fn start(limits: HttpLimits) -> (std::net::SocketAddr, CancellationToken) {
        let app = Router::new()
            .route("/ok", get(|| async { "ok" }))
            .route("/slow", get(|| async { tokio::time::sleep(Duration::from_secs(5)).await }))
            .route("/echo", post(|body: axum::body::Bytes| async move { body.len().to_string() }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let s = shutdown.clone();
        tokio::spawn(async move { serve(listener, app, s, &limits).await });
        (addr, shutdown)
    }

    /// Sends `request` and reads the answer until the server closes (or 3 s pass).
    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn with_an_admin_token_only_reads_go_without_it() {
        let (addr, _stop) = start(HttpLimits { admin_token: Some("t0ken".into()), ..HttpLimits::default() }).await;
        let post = |auth: &str| {
            format!("POST /echo HTTP/1.1\r\nhost: x\r\n{auth}content-length: 2\r\nconnection: close\r\n\r\nhi")
        };
        let answer = exchange(addr, post("").as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 401") && answer.contains("ESK_ADMIN_TOKEN"), "{answer}");
        let answer = exchange(addr, post("authorization: Bearer t0kem\r\n").as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        let answer = exchange(addr, post("authorization: Bearer t0ken\r\n").as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with('2'), "{answer}");
        let answer = exchange(addr, b"GET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // Without a token on loopback, anything goes (the default for `make up`).
        let (addr, _stop) = start(HttpLimits::default()).await;
        assert!(exchange(addr, post("").as_bytes()).await.starts_with("HTTP/1.1 200"));
    }

    #[test]
    fn listening_beyond_loopback_needs_an_admin_token() {
        let beyond: std::net::SocketAddr = "10.1.2.3:8701".parse().unwrap();
        let e = exposure(beyond, &HttpLimits::default()).unwrap_err().to_string();
        assert!(e.contains("ESK_ADMIN_TOKEN") && e.contains("10.1.2.3:8701"), "{e}");
        let empty = HttpLimits { admin_token: Some(String::new()), ..HttpLimits::default() };
        assert!(exposure(beyond, &empty).is_err());
        assert!(exposure(beyond, &HttpLimits { admin_token: Some("t".into()), ..HttpLimits::default() }).is_ok());
        assert!(exposure("[::1]:8701".parse().unwrap(), &HttpLimits::default()).is_ok());
        assert!(exposure("127.0.0.1:8701".parse().unwrap(), &HttpLimits::default()).is_ok());
    }

    #[tokio::test]
    async fn a_client_that_sends_its_headers_too_slowly_is_cut_off() {
        let limits = HttpLimits { header_timeout_ms: 200, ..HttpLimits::default() };
        let (addr, _stop) = start(limits).await;
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        let mut buf = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(n.is_ok(), "the server closed the connection");
        assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
        // A whole request is still served.
        assert!(
            exchange(addr, b"GET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 200")
        );
    }

    #[tokio::test]
    async fn a_client_that_sends_nothing_is_cut_off() {
        let (addr, _stop) =
            start(HttpLimits { header_timeout_ms: 200, max_connections: 1, ..HttpLimits::default() }).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "the server closed the silent connection");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let answer = exchange(addr, b"GET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "its slot is free again: {answer}");
    }

    #[tokio::test]
    async fn a_request_that_takes_too_long_gets_408() {
        let (addr, _stop) = start(HttpLimits { request_timeout_ms: 200, ..HttpLimits::default() }).await;
        let answer = exchange(addr, b"GET /slow HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_gets_413() {
        let (addr, _stop) = start(HttpLimits { max_body_bytes: 100, ..HttpLimits::default() }).await;
        let small =
            exchange(addr, b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello")
                .await;
        assert!(small.starts_with("HTTP/1.1 200") && small.ends_with('5'), "{small}");
        let mut big = b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\nconnection: close\r\n\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'x', 1000));
        let answer = exchange(addr, &big).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        // Chunked, with no length announced: cut off at the limit too.
        let chunked = format!(
            "POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n3e8\r\n{}\r\n0\r\n\r\n",
            "y".repeat(1000)
        );
        let answer = exchange(addr, chunked.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }

    #[tokio::test]
    async fn connections_over_the_limit_get_503_and_the_rest_are_served() {
        let (addr, stop) = start(HttpLimits { max_connections: 2, ..HttpLimits::default() }).await;
        let held: Vec<TcpStream> = futures_join(addr, 2).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let answer = exchange(addr, b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("too many connections"));
        drop(held);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let answer = exchange(addr, b"GET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "served again once the others left: {answer}");
        stop.cancel();
    }

    async fn futures_join(addr: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(TcpStream::connect(addr).await.unwrap());
        }
        out
    }
}
