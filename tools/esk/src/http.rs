//! A small HTTP/1.0 client for esk's own services (loopback or a private
//! network, plain HTTP): enough for JSON requests, no dependency on a TLS stack.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::exit::Failure;

/// `http://host:port` split into the address and a display name.
fn address(url: &str) -> Result<String, Failure> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        Failure::invalid(format!("service URL '{url}' must start with http:// (for example http://127.0.0.1:8702)"))
    })?;
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        return Err(Failure::invalid(format!("service URL '{url}' must be http://host:port")));
    }
    Ok(if host.contains(':') { host.to_owned() } else { format!("{host}:80") })
}

/// Sends a request; returns the status and the JSON body.
pub async fn call(base: &str, method: &str, path: &str, timeout: Duration) -> Result<(u16, Value), Failure> {
    let addr = address(base)?;
    let unreachable = |e: String| Failure::unavailable(format!("{base}{path}: {e} (is the service running?)"));
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(&addr).await.map_err(|e| e.to_string())?;
        // Requests that change something carry the admin token when one is set.
        let auth = match std::env::var("ESK_ADMIN_TOKEN") {
            Ok(t) if !t.is_empty() && method != "GET" => format!("Authorization: Bearer {t}\r\n"),
            _ => String::new(),
        };
        let req = format!(
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n{auth}Content-Length: 0\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(buf)
    };
    let buf = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| unreachable(format!("no answer within {timeout:?}")))?
        .map_err(unreachable)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| unreachable("not an HTTP response".into()))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| unreachable("not an HTTP response".into()))?;
    let json = serde_json::from_str(body).unwrap_or(Value::String(body.to_owned()));
    Ok((status, json))
}

/// What a 401 of a service means for the CLI's user (exit 4).
pub fn unauthorized(body: &Value) -> String {
    let set = if std::env::var_os("ESK_ADMIN_TOKEN").is_some() { "is not the service's" } else { "is not set" };
    format!("{} (ESK_ADMIN_TOKEN {set})", message(body))
}

/// The message of an esk JSON error body, or the body itself.
pub fn message(body: &Value) -> String {
    body.get("message").and_then(Value::as_str).map_or_else(|| body.to_string(), str::to_owned)
}
