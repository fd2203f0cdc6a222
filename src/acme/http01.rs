//! HTTP-01 through the gateway: it answers every token statelessly with
//! `<token>.<thumbprint>` from its nginx configuration, so [`GatewaySolver`] has nothing to
//! present or clean up; it checks, before ordering and before telling the CA, that the answer
//! comes back through the gateway Service.
//!
//! With `spec.gateway.proxyProtocol` the gateway's port 80 expects a PROXY protocol header on
//! every connection, so the check opens each of its connections with `PROXY UNKNOWN\r\n`
//! ([`SELF_CHECK_PROXY_HEADER`]): the gateway then keeps the operator's own address, and
//! nothing is claimed about a client. The CA's own validation comes through the load balancer
//! or proxy in front of the gateway, which sends the header (docs/gateway.md).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use instant_acme::ChallengeType;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::order::{Solver, error_chain};
use super::{Failure, FailureKind};

/// The gateway answers every token with `<token>.<thumbprint>` from its nginx configuration:
/// nothing to present or clean up; the check GETs the answer through the gateway Service.
pub struct GatewaySolver {
    /// `http://<stack>-gateway.<namespace>.svc.<domain>` (port 80), or a test's override.
    pub base_url: String,
    /// How long the check waits for a correct answer.
    pub patience: Duration,
    client: HyperClient<SelfCheckConnector, Empty<Bytes>>,
}

impl GatewaySolver {
    /// `proxy_protocol`: the gateway's listeners expect the PROXY protocol
    /// (`spec.gateway.proxyProtocol`), so every connection of the check starts with
    /// [`SELF_CHECK_PROXY_HEADER`].
    pub fn new(base_url: String, patience: Duration, proxy_protocol: bool) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let connector = SelfCheckConnector {
            http,
            proxy_protocol,
        };
        Self {
            base_url: base_url.trim_end_matches('/').to_string(),
            patience,
            client: HyperClient::builder(TokioExecutor::new()).build(connector),
        }
    }

    async fn fetch_once(&self, host: &str, token: &str) -> Result<(u16, String), String> {
        let url = format!(
            "{}{}{token}",
            self.base_url,
            crate::build::nginx::ACME_CHALLENGE_PREFIX
        );
        let request = http::Request::get(&url)
            .header(http::header::HOST, host)
            .body(Empty::new())
            .map_err(|e| format!("bad URL {url}: {e}"))?;
        let response = tokio::time::timeout(Duration::from_secs(10), self.client.request(request))
            .await
            .map_err(|_| format!("GET {url}: no answer within 10s"))?
            .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
        let status = response.status().as_u16();
        let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
            .await
            .map_err(|_| format!("GET {url}: body not received within 10s"))?
            .map_err(|e| format!("GET {url}: {e}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).trim().to_string()))
    }
}

impl GatewaySolver {
    /// Waits up to the patience for the gateway to answer `token` with `key_authorization`.
    async fn answered(
        &self,
        host: &str,
        token: &str,
        key_authorization: &str,
    ) -> Result<(), String> {
        let deadline = Instant::now() + self.patience;
        let mut pause = Duration::from_millis(200);
        loop {
            let last = match self.fetch_once(host, token).await {
                Ok((200, body)) if body == key_authorization => return Ok(()),
                Ok((200, body)) => {
                    let shown: String = body.chars().take(120).collect();
                    format!(
                        "the gateway answers {shown:?} instead of the key authorization (is its \
                         configuration, with this account's thumbprint, loaded yet?)"
                    )
                }
                Ok((status, _)) => format!(
                    "the gateway answers HTTP {status} for {}{token} (is its configuration \
                     loaded yet?)",
                    crate::build::nginx::ACME_CHALLENGE_PREFIX
                ),
                Err(e) => e,
            };
            if Instant::now() + pause > deadline {
                return Err(last);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }
}

impl Solver for GatewaySolver {
    fn challenge_type(&self, _host: &str) -> ChallengeType {
        ChallengeType::Http01
    }

    /// The gateway must answer a probe token before the CA is asked to look.
    async fn prepare(&self, hosts: &[String], thumbprint: &str) -> Result<(), Failure> {
        let host = hosts.first().map(String::as_str).unwrap_or("");
        let probe = probe_token();
        self.answered(host, &probe, &format!("{probe}.{thumbprint}"))
            .await
            .map_err(|e| {
                Failure::new(
                    FailureKind::ChallengeUnreachable,
                    format!(
                        "challenge not reachable through the gateway (self-check before ordering): {e}"
                    ),
                )
            })
    }

    async fn present(
        &self,
        _host: &str,
        _token: &str,
        _key_authorization: &str,
    ) -> Result<(), Failure> {
        Ok(())
    }

    async fn check(&self, host: &str, token: &str, key_authorization: &str) -> Result<(), Failure> {
        self.answered(host, token, key_authorization)
            .await
            .map_err(|e| {
                Failure::new(
                    FailureKind::ChallengeUnreachable,
                    format!("challenge not reachable through the gateway for {host}: {e}"),
                )
            })
    }

    async fn clean_up(&self, _host: &str, _token: &str, _key_authorization: &str) {}
}

/// What the self-check sends first on each connection to a gateway that expects the PROXY
/// protocol: version 1 with the `UNKNOWN` family, which the protocol provides for a sender's
/// own connections such as health checks. The receiver keeps the TCP peer's address (nginx
/// sets no `$proxy_protocol_addr`, and its realip module leaves `$remote_addr` alone), so the
/// operator never names a client it is not.
pub const SELF_CHECK_PROXY_HEADER: &[u8] = b"PROXY UNKNOWN\r\n";

/// The self-check's connector: a plain TCP connection ([`HttpConnector`]), opened with
/// [`SELF_CHECK_PROXY_HEADER`] when the gateway expects the PROXY protocol.
#[derive(Clone)]
pub struct SelfCheckConnector {
    http: HttpConnector,
    proxy_protocol: bool,
}

type ConnectFuture = Pin<
    Box<
        dyn Future<Output = Result<TokioIo<TcpStream>, Box<dyn std::error::Error + Send + Sync>>>
            + Send,
    >,
>;

impl tower_service::Service<http::Uri> for SelfCheckConnector {
    type Response = TokioIo<TcpStream>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.http.call(uri);
        let proxy_protocol = self.proxy_protocol;
        Box::pin(async move {
            let mut io = connecting.await?;
            if proxy_protocol {
                io.inner_mut()
                    .write_all(SELF_CHECK_PROXY_HEADER)
                    .await
                    .map_err(|e| format!("sending the PROXY protocol header: {e}"))?;
            }
            Ok(io)
        })
    }
}

/// A random probe token (base64url of 16 random bytes; the gateway accepts `[-_A-Za-z0-9]+`).
fn probe_token() -> String {
    use base64::Engine;
    let mut bytes = [0u8; 16];
    let _ = rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes);
    format!(
        "opsconductor-self-check-{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}
