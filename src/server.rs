//! The probe and metrics endpoint: `/healthz`, `/readyz` and `/metrics` over plain HTTP/1.1.
//!
//! Three fixed GET routes do not need a web framework; this keeps the binary small.
//!
//! The endpoint must never cost the operator its file descriptors or a core (issue 14,
//! item 8): at most [`MAX_CONNECTIONS`] connections are open at a time (the next wait in the
//! kernel's accept queue, using no descriptor of the process), each gets [`CONNECTION_DEADLINE`]
//! in all to send its request and receive the answer, however slowly it dribbles bytes, and when
//! accepting fails (the process or the system is out of descriptors) the loop waits before it
//! tries again instead of spinning.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::metrics::Metrics;

/// Connections served at the same time. Probes and a scraper or two need a handful.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a connection gets to send its request head and read the answer, in all.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);
/// Wait after a failed accept: doubles from the first to the last while accepting fails.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What the endpoint reports.
pub struct Health {
    /// Set once every watch has listed its objects.
    pub ready: AtomicBool,
    pub metrics: Arc<Metrics>,
}

/// The answer to one request: status line, body, content type.
type Answer = (&'static str, String, &'static str);

/// What answers a request, from its method and path.
type Handler = Arc<dyn Fn(&str, &str) -> Answer + Send + Sync>;

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, health: Arc<Health>) {
    serve_with(
        listener,
        Arc::new(move |method, path| route(&health, method, path)),
    )
    .await;
}

/// Serves `/metrics` alone, from `render`, with the same bounds (the gateway's `requests`
/// sidecar, [`crate::gateway_requests`]).
pub async fn serve_metrics(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    serve_with(
        listener,
        Arc::new(move |method, path| match (method, path) {
            ("GET", "/metrics") => ("200 OK", render(), "text/plain; version=0.0.4"),
            _ => ("404 Not Found", "not found\n".into(), "text/plain"),
        }),
    )
    .await;
}

async fn serve_with(listener: TcpListener, handler: Handler) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    let mut failing = false;
    loop {
        // A slot first: while every slot is taken, new connections wait in the accept queue.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                if failing {
                    tracing::info!("metrics endpoint accepts connections again");
                    failing = false;
                }
                backoff = ACCEPT_BACKOFF_FIRST;
                let handler = handler.clone();
                tokio::spawn(async move {
                    // Dropped, with the connection, at the deadline.
                    let _ =
                        tokio::time::timeout(CONNECTION_DEADLINE, answer(stream, &*handler)).await;
                    drop(slot);
                });
            }
            Err(error) => {
                // Out of file descriptors (EMFILE, ENFILE) or memory: the pending connection
                // stays in the queue and the next accept fails at once, so retrying without a
                // pause would spin a core until descriptors free up.
                if !failing {
                    tracing::warn!(%error, "metrics endpoint cannot accept connections; backing off");
                    failing = true;
                }
                drop(slot);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// Reads one request head (bounded) and writes the answer; the body of a GET is ignored.
async fn answer(mut stream: TcpStream, handler: &(dyn Fn(&str, &str) -> Answer + Send + Sync)) {
    let mut buf = vec![0u8; 2048];
    let mut len = 0;
    while len < buf.len() {
        match stream.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                len += n;
                if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body, content_type) = handler(method, path);
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The operator's three routes.
fn route(health: &Health, method: &str, path: &str) -> Answer {
    match (method, path) {
        ("GET", "/healthz") => ("200 OK", "ok\n".to_string(), "text/plain"),
        ("GET", "/readyz") if health.ready.load(Ordering::Relaxed) => {
            ("200 OK", "ok\n".into(), "text/plain")
        }
        ("GET", "/readyz") => (
            "503 Service Unavailable",
            "caches not synced yet\n".into(),
            "text/plain",
        ),
        ("GET", "/metrics") => (
            "200 OK",
            health.metrics.render(),
            "text/plain; version=0.0.4",
        ),
        _ => ("404 Not Found", "not found\n".into(), "text/plain"),
    }
}
