//! HTTP-01 through the gateway: it answers every token statelessly with
//! `<token>.<thumbprint>` from its nginx configuration, so [`GatewaySolver`] has nothing to
//! present or clean up; it checks, before ordering and before telling the CA, that the answer
//! comes back through the gateway Service.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::ChallengeType;

use super::order::{Solver, error_chain};
use super::{Failure, FailureKind};

/// The gateway answers every token with `<token>.<thumbprint>` from its nginx configuration:
/// nothing to present or clean up; the check GETs the answer through the gateway Service.
pub struct GatewaySolver {
    /// `http://<stack>-gateway.<namespace>.svc.<domain>` (port 80), or a test's override.
    pub base_url: String,
    /// How long the check waits for a correct answer.
    pub patience: Duration,
    client: HyperClient<HttpConnector, Empty<Bytes>>,
}

impl GatewaySolver {
    pub fn new(base_url: String, patience: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
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
