//! The probe and metrics endpoint: `/healthz`, `/readyz` and `/metrics` over plain HTTP/1.1.
//!
//! Three fixed GET routes do not need a web framework; this keeps the binary small.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// What the endpoint reports.
pub struct Health {
    /// Set once every watch has listed its objects.
    pub ready: AtomicBool,
    pub metrics: Arc<Metrics>,
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, health: Arc<Health>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let mut len = 0;
            // Read the request head (bounded); the body of a GET is ignored.
            while len < buf.len() {
                match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    stream.read(&mut buf[len..]),
                )
                .await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => {
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
            let (status, body, content_type) = match (method, path) {
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
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
