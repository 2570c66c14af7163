//! A blocking HTTP/1.0 GET for probing esk's own services (health, status,
//! queries) from tests and benchmarks. The CLI has its own async client with
//! its exit codes.

use std::io::{Error, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// `GET path` from `addr` (`host:port`): the status and the body. Connecting,
/// each read and each write give up after `timeout`.
pub fn get(addr: &str, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let malformed = || Error::new(ErrorKind::InvalidData, format!("GET {path} from {addr}: not an HTTP response"));
    let (head, body) = buf.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(malformed)?;
    Ok((status, body.to_owned()))
}
