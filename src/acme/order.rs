//! One ACME order for all of a stack's gateway hosts, answered over HTTP-01 by the gateway.
//!
//! The steps, each one a request to the CA (counted in the metrics by type and outcome):
//! 1. self-check before ordering: the gateway must already answer a probe token with
//!    `<token>.<thumbprint>`, or no order is placed at all (a gateway that cannot answer would
//!    only burn the CA's failed-validation limits);
//! 2. `newOrder` for every host, with the `profile` and, on a renewal, `replaces` (ARI);
//! 3. per pending authorization: present (nothing to do: the gateway answers statelessly),
//!    self-check the real token through the gateway, then tell the CA the challenge is ready;
//!    a challenge that fails the self-check is not offered to the CA and its authorization is
//!    deactivated (clean-up);
//! 4. poll the order (honouring `Retry-After`) until ready, finalize with a CSR for a new key,
//!    poll until the certificate is issued and download the full chain;
//! 5. check chain, key and host coverage before handing the result back. Nothing is written
//!    here: the caller writes the Secret only after this check.
//!
//! The challenge solver sits behind [`Solver`], so tests and other solvers can stand in.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewOrder,
    OrderStatus, RetryPolicy,
};

use super::account::CaClient;
use super::cert::{self, KeyAlgorithm};
use super::{Failure, FailureKind};
use crate::metrics::Metrics;

/// Presents, checks and cleans up HTTP-01 challenge answers.
pub trait Solver: Send + Sync {
    /// Makes `key_authorization` available at `/.well-known/acme-challenge/<token>` of `host`.
    fn present(
        &self,
        host: &str,
        token: &str,
        key_authorization: &str,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Checks, as the CA would, that the answer is reachable; waits up to the solver's
    /// patience for it (a gateway that is still reloading its configuration).
    fn check(
        &self,
        host: &str,
        token: &str,
        key_authorization: &str,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Removes what `present` made.
    fn clean_up(&self, host: &str, token: &str) -> impl Future<Output = ()> + Send;
}

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

impl Solver for GatewaySolver {
    async fn present(
        &self,
        _host: &str,
        _token: &str,
        _key_authorization: &str,
    ) -> Result<(), String> {
        Ok(())
    }

    async fn check(&self, host: &str, token: &str, key_authorization: &str) -> Result<(), String> {
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

    async fn clean_up(&self, _host: &str, _token: &str) {}
}

/// What to order.
#[derive(Clone, Debug)]
pub struct Request {
    pub hosts: Vec<String>,
    pub profile: Option<String>,
    /// The ARI identifier of the certificate this order replaces.
    pub replaces: Option<String>,
    pub key_algorithm: KeyAlgorithm,
}

/// A checked certificate, ready to be written.
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
    pub leaf: cert::Leaf,
    /// Whether the CA accepted the `replaces` field.
    pub replaced: bool,
}

/// Times one request to the CA and counts it by type and outcome.
pub(super) async fn timed<T>(
    metrics: &Metrics,
    kind: &'static str,
    fut: impl Future<Output = Result<T, instant_acme::Error>>,
) -> Result<T, instant_acme::Error> {
    let started = Instant::now();
    let result = fut.await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(instant_acme::Error::Api(p)) if is_type(p, "rateLimited") => "rate-limited",
        Err(instant_acme::Error::Api(_)) => "problem",
        Err(_) => "error",
    };
    metrics.observe_acme(kind, outcome, started.elapsed());
    result
}

/// Retries a step that failed only because the CA refused a nonce (instant-acme already
/// retries three times inside; a CA rejecting half of all nonces needs a few more).
macro_rules! nonce_retries {
    ($step:expr) => {{
        let mut attempts = 0;
        loop {
            match $step.await {
                Err(instant_acme::Error::Api(p)) if is_type(&p, "badNonce") && attempts < 8 => {
                    attempts += 1;
                }
                other => break other,
            }
        }
    }};
}

pub(super) fn is_type(problem: &instant_acme::Problem, short: &str) -> bool {
    problem
        .r#type
        .as_deref()
        .is_some_and(|t| t == format!("urn:ietf:params:acme:error:{short}"))
}

/// The whole chain of an error's sources, joined with ": ".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
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

/// Runs one order to the end. `now` is only used to check the issued certificate's validity.
pub async fn issue<S: Solver>(
    account: &Account,
    http: &CaClient,
    solver: &S,
    thumbprint: &str,
    request: &Request,
    metrics: &Arc<Metrics>,
    now: impl Fn() -> SystemTime,
) -> Result<Issued, Failure> {
    let gateway_host = request.hosts.first().map(String::as_str).unwrap_or("");
    // 1. The gateway must answer before the CA is asked to look.
    let probe = probe_token();
    solver
        .check(gateway_host, &probe, &format!("{probe}.{thumbprint}"))
        .await
        .map_err(|e| {
            Failure::new(
                FailureKind::ChallengeUnreachable,
                format!(
                    "challenge not reachable through the gateway (self-check before ordering): {e}"
                ),
            )
        })?;

    // 2. The order.
    let identifiers: Vec<Identifier> = request.hosts.iter().cloned().map(Identifier::Dns).collect();
    let replaces = request.replaces.as_deref().and_then(|id| {
        let (aki, serial) = id.split_once('.')?;
        Some(CertificateIdentifier {
            authority_key_identifier: aki.to_string().into(),
            serial: serial.to_string().into(),
        })
    });
    let place = |with_replaces: bool| {
        let identifiers = &identifiers;
        let replaces = replaces.clone();
        async move {
            let mut new_order = NewOrder::new(identifiers);
            if let Some(profile) = &request.profile {
                new_order = new_order.profile(profile);
            }
            if let (true, Some(r)) = (with_replaces, replaces) {
                new_order = new_order.replaces(r);
            }
            nonce_retries!(timed(metrics, "newOrder", account.new_order(&new_order)))
        }
    };
    let (mut order, replaced) = match place(replaces.is_some()).await {
        Ok(order) => (order, replaces.is_some()),
        // A CA that refuses `replaces` (already replaced, or ARI switched off) still gets the
        // order: renewal must not depend on it.
        Err(instant_acme::Error::Api(p))
            if replaces.is_some()
                && (is_type(&p, "alreadyReplaced") || is_type(&p, "malformed")) =>
        {
            tracing::info!(problem = %p, "the CA refused `replaces`; ordering without it");
            let order = place(false)
                .await
                .map_err(|e| Failure::from_acme("placing the order", e, http))?;
            (order, false)
        }
        Err(instant_acme::Error::Unsupported(_)) if replaces.is_some() => {
            let order = place(false)
                .await
                .map_err(|e| Failure::from_acme("placing the order", e, http))?;
            (order, false)
        }
        Err(e) => return Err(Failure::from_acme("placing the order", e, http)),
    };
    tracing::info!(order = order.url(), hosts = ?request.hosts, replaced, "ACME order placed");

    // 3. Challenges.
    let mut offered = Vec::new();
    {
        let mut authorizations = order.authorizations();
        while let Some(next) = authorizations.next().await {
            let mut authz =
                next.map_err(|e| Failure::from_acme("fetching an authorization", e, http))?;
            match authz.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                status => {
                    return Err(Failure::new(
                        FailureKind::OrderInvalid,
                        format!(
                            "order invalid: the authorization for {} is {status:?}",
                            authz.identifier()
                        ),
                    ));
                }
            }
            let host = authz.identifier().to_string();
            let Some(token) = authz
                .challenges
                .iter()
                .find(|c| c.r#type == ChallengeType::Http01)
                .map(|c| c.token.clone())
            else {
                return Err(Failure::new(
                    FailureKind::OrderInvalid,
                    format!("order invalid: the CA offers no HTTP-01 challenge for {host}"),
                ));
            };
            // The key authorization (RFC 8555 section 8.1), exactly what the gateway answers.
            let key_authorization = format!("{token}.{thumbprint}");
            let checked = match solver.present(&host, &token, &key_authorization).await {
                Ok(()) => solver.check(&host, &token, &key_authorization).await,
                Err(e) => Err(e),
            };
            if let Err(e) = checked {
                solver.clean_up(&host, &token).await;
                let _ = timed(metrics, "deactivateAuthorization", authz.deactivate()).await;
                return Err(Failure::new(
                    FailureKind::ChallengeUnreachable,
                    format!("challenge not reachable through the gateway for {host}: {e}"),
                ));
            }
            let mut challenge = authz
                .challenge(ChallengeType::Http01)
                .expect("the HTTP-01 challenge found above");
            debug_assert_eq!(challenge.key_authorization().as_str(), key_authorization);
            nonce_retries!(timed(metrics, "challengeReady", challenge.set_ready()))
                .map_err(|e| Failure::from_acme("answering the challenge", e, http))?;
            offered.push((host, token));
        }
    }

    // 4. Wait for validation, finalize, download.
    let polling = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(1.5)
        .timeout(Duration::from_secs(120));
    let status = nonce_retries!(timed(metrics, "pollOrder", order.poll_ready(&polling)));
    for (host, token) in &offered {
        solver.clean_up(host, token).await;
    }
    match status {
        Ok(OrderStatus::Ready) => {}
        Ok(_) => return Err(validation_failure(&mut order, metrics).await),
        Err(instant_acme::Error::Api(p)) if !is_type(&p, "rateLimited") => {
            let mut failure = validation_failure(&mut order, metrics).await;
            if failure.kind == FailureKind::OrderInvalid && failure.message.ends_with("no detail") {
                failure.message = format!("order invalid: {}", problem_text(&p));
            }
            return Err(failure);
        }
        Err(e) => return Err(Failure::from_acme("waiting for validation", e, http)),
    }
    let key = new_key(request.key_algorithm)
        .await
        .map_err(|e| Failure::new(FailureKind::Internal, e.to_string()))?;
    let csr = cert::csr(&request.hosts, &key)
        .map_err(|e| Failure::new(FailureKind::Internal, e.to_string()))?;
    nonce_retries!(timed(metrics, "finalize", order.finalize_csr(&csr)))
        .map_err(|e| Failure::from_acme("finalizing the order", e, http))?;
    let chain_pem = nonce_retries!(timed(
        metrics,
        "certificate",
        order.poll_certificate(&polling)
    ))
    .map_err(|e| Failure::from_acme("downloading the certificate", e, http))?;
    let key_pem = key.serialize_pem();

    // 5. Check before anyone writes it.
    let leaf = cert::inspect(
        chain_pem.as_bytes(),
        key_pem.as_bytes(),
        &request.hosts,
        now(),
    )
    .map_err(|e| {
        Failure::new(
            FailureKind::BadCertificate,
            format!("the CA returned a certificate that cannot be used: {e}"),
        )
    })?;
    Ok(Issued {
        chain_pem,
        key_pem,
        leaf,
        replaced,
    })
}

/// The issuance's new key; a slow one (RSA) is made on a blocking thread so the runtime's
/// workers keep serving the other stacks and the solver meanwhile.
async fn new_key(algorithm: KeyAlgorithm) -> Result<rcgen::KeyPair, cert::CertError> {
    if !algorithm.is_slow() {
        return cert::new_key(algorithm);
    }
    let started = Instant::now();
    let key = tokio::task::spawn_blocking(move || cert::new_key(algorithm))
        .await
        .map_err(|e| cert::CertError::Generate(format!("key generation stopped: {e}")))??;
    tracing::debug!(
        ?algorithm,
        millis = started.elapsed().as_millis() as u64,
        "made a new certificate key"
    );
    Ok(key)
}

/// Why the CA invalidated the order, from the challenges' errors.
async fn validation_failure(order: &mut instant_acme::Order, metrics: &Metrics) -> Failure {
    let _ = timed(metrics, "pollOrder", order.refresh()).await;
    let mut details = Vec::new();
    let mut challenge_failed = false;
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        let _ = timed(metrics, "authorization", authz.refresh()).await;
        let host = authz.identifier().to_string();
        for ch in &authz.challenges {
            if let Some(err) = &ch.error {
                challenge_failed = true;
                details.push(format!("{host}: {}", problem_text(err)));
            }
        }
    }
    if challenge_failed {
        Failure::new(
            FailureKind::ChallengeFailed,
            format!(
                "challenge not reachable from the CA: {}",
                details.join("; ")
            ),
        )
    } else {
        let detail = order
            .state()
            .error
            .as_ref()
            .map(problem_text)
            .unwrap_or_else(|| "no detail".into());
        Failure::new(
            FailureKind::OrderInvalid,
            format!("order invalid: {detail}"),
        )
    }
}

/// A problem document in plain words: its detail, and its type's short name.
pub fn problem_text(p: &instant_acme::Problem) -> String {
    let kind = p
        .r#type
        .as_deref()
        .map(|t| t.trim_start_matches("urn:ietf:params:acme:error:"))
        .unwrap_or("unknown");
    let mut text = format!("{} ({kind})", p.detail.as_deref().unwrap_or("no detail"));
    for sub in &p.subproblems {
        text.push_str(&format!("; {sub}"));
    }
    text
}
