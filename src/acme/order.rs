//! One ACME order for all of a stack's gateway hosts, answered over HTTP-01 by the gateway
//! (`http01.rs`) or over DNS-01 through a DNS provider (`dns01/`), chosen per host.
//!
//! The steps, each one a request to the CA (counted in the metrics by type and outcome):
//! 1. prepare: the solver checks that the challenges can be answered at all, or no order is
//!    placed (HTTP-01: the gateway must already answer a probe token with
//!    `<token>.<thumbprint>`; DNS-01: the zone is found and the TSIG key accepted). A
//!    challenge that cannot be answered would only burn the CA's failed-validation limits;
//! 2. `newOrder` for every host, with the `profile` and, on a renewal, `replaces` (ARI);
//! 3. every pending authorization's answer presented (HTTP-01: nothing to do, the gateway
//!    answers statelessly; DNS-01: a TXT record), then each checked as the CA would (through
//!    the gateway; at every authoritative server), then the CA told the challenges are ready.
//!    On a failure before that, what was presented is cleaned up and the authorization that
//!    failed is deactivated;
//! 4. poll the order (honouring `Retry-After`) until ready, finalize with a CSR for a new key,
//!    poll until the certificate is issued and download the full chain;
//! 5. check chain, key and host coverage before handing the result back. Nothing is written
//!    here: the caller writes the Secret only after this check.
//!
//! The challenge solver sits behind [`Solver`] (HTTP-01 through the gateway, DNS-01 through a
//! DNS provider, or both by host), so the flow above is the same for every kind of challenge.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewOrder,
    OrderStatus, RetryPolicy,
};

use super::ca_client::CaClient;
use super::cert::{self, KeyAlgorithm};
use super::{Failure, FailureKind};
use crate::metrics::Metrics;

/// Answers the challenges of one kind: presents, checks and cleans up. The order flow picks
/// the challenge of [`Solver::challenge_type`] for each host and calls the rest; it knows
/// nothing else about how a challenge is answered. HTTP-01: [`super::http01::GatewaySolver`]; DNS-01:
/// [`super::dns01::Dns01Solver`] over a DNS provider; both at once: [`ByHost`].
pub trait Solver: Send + Sync {
    /// The challenge this solver answers for `host` (a wildcard host is `*.name`).
    fn challenge_type(&self, host: &str) -> ChallengeType;
    /// Before an order is placed: can the challenges for `hosts` be answered at all (a
    /// failure here means no order, so no failed validation at the CA)? `thumbprint` is the
    /// account's.
    fn prepare(
        &self,
        hosts: &[String],
        thumbprint: &str,
    ) -> impl Future<Output = Result<(), Failure>> + Send;
    /// Makes the answer for `key_authorization` (`<token>.<thumbprint>`) available for `host`.
    fn present(
        &self,
        host: &str,
        token: &str,
        key_authorization: &str,
    ) -> impl Future<Output = Result<(), Failure>> + Send;
    /// Checks, as the CA would, that the answer is reachable; waits up to the solver's
    /// patience for it (a gateway still reloading, a DNS record still propagating).
    fn check(
        &self,
        host: &str,
        token: &str,
        key_authorization: &str,
    ) -> impl Future<Output = Result<(), Failure>> + Send;
    /// Removes what `present` made (after validation, whatever its outcome).
    fn clean_up(
        &self,
        host: &str,
        token: &str,
        key_authorization: &str,
    ) -> impl Future<Output = ()> + Send;
}

/// Two solvers, chosen per host: `first` for the hosts `use_first` accepts (DNS-01 for the
/// hosts under `dns01.domains`), `second` for the others.
pub struct ByHost<A, B, F> {
    pub first: A,
    pub second: B,
    pub use_first: F,
}

impl<A: Solver, B: Solver, F: Fn(&str) -> bool + Send + Sync> Solver for ByHost<A, B, F> {
    fn challenge_type(&self, host: &str) -> ChallengeType {
        if (self.use_first)(host) {
            self.first.challenge_type(host)
        } else {
            self.second.challenge_type(host)
        }
    }

    async fn prepare(&self, hosts: &[String], thumbprint: &str) -> Result<(), Failure> {
        let (first, second): (Vec<String>, Vec<String>) =
            hosts.iter().cloned().partition(|h| (self.use_first)(h));
        if !first.is_empty() {
            self.first.prepare(&first, thumbprint).await?;
        }
        if !second.is_empty() {
            self.second.prepare(&second, thumbprint).await?;
        }
        Ok(())
    }

    async fn present(&self, host: &str, token: &str, ka: &str) -> Result<(), Failure> {
        if (self.use_first)(host) {
            self.first.present(host, token, ka).await
        } else {
            self.second.present(host, token, ka).await
        }
    }

    async fn check(&self, host: &str, token: &str, ka: &str) -> Result<(), Failure> {
        if (self.use_first)(host) {
            self.first.check(host, token, ka).await
        } else {
            self.second.check(host, token, ka).await
        }
    }

    async fn clean_up(&self, host: &str, token: &str, ka: &str) {
        if (self.use_first)(host) {
            self.first.clean_up(host, token, ka).await
        } else {
            self.second.clean_up(host, token, ka).await
        }
    }
}

/// A challenge answer made available.
struct Presented {
    host: String,
    token: String,
    key_authorization: String,
    kind: ChallengeType,
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
    // 1. The challenges must be answerable before the CA is asked to look.
    solver.prepare(&request.hosts, thumbprint).await?;

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

    // 3. Challenges: every answer presented, then checked, then offered to the CA (one
    // propagation wait for all DNS records, not one per host).
    let mut presented: Vec<Presented> = Vec::new();
    let mut failed: Option<(String, Failure)> = None;
    {
        let mut authorizations = order.authorizations();
        while let Some(next) = authorizations.next().await {
            let authz = match next {
                Ok(a) => a,
                Err(e) => {
                    failed = Some((
                        String::new(),
                        Failure::from_acme("fetching an authorization", e, http),
                    ));
                    break;
                }
            };
            match authz.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                status => {
                    failed = Some((
                        String::new(),
                        Failure::new(
                            FailureKind::OrderInvalid,
                            format!(
                                "order invalid: the authorization for {} is {status:?}",
                                authz.identifier()
                            ),
                        ),
                    ));
                    break;
                }
            }
            let host = authz.identifier().to_string();
            let kind = solver.challenge_type(&host);
            let Some(token) = authz
                .challenges
                .iter()
                .find(|c| c.r#type == kind)
                .map(|c| c.token.clone())
            else {
                failed = Some((
                    String::new(),
                    Failure::new(
                        FailureKind::OrderInvalid,
                        format!("order invalid: the CA offers no {kind:?} challenge for {host}"),
                    ),
                ));
                break;
            };
            // The key authorization (RFC 8555 section 8.1).
            let key_authorization = format!("{token}.{thumbprint}");
            let result = solver.present(&host, &token, &key_authorization).await;
            presented.push(Presented {
                host: host.clone(),
                token,
                key_authorization,
                kind,
            });
            if let Err(f) = result {
                failed = Some((host, f));
                break;
            }
        }
    }
    if failed.is_none() {
        for p in &presented {
            if let Err(f) = solver.check(&p.host, &p.token, &p.key_authorization).await {
                failed = Some((p.host.clone(), f));
                break;
            }
        }
    }
    if failed.is_none() {
        let mut authorizations = order.authorizations();
        while let Some(next) = authorizations.next().await {
            let Ok(mut authz) = next else { continue };
            let host = authz.identifier().to_string();
            let Some(p) = presented.iter().find(|p| p.host == host) else {
                continue;
            };
            let Some(mut challenge) = authz.challenge(p.kind.clone()) else {
                continue;
            };
            debug_assert_eq!(challenge.key_authorization().as_str(), p.key_authorization);
            if let Err(e) = nonce_retries!(timed(metrics, "challengeReady", challenge.set_ready()))
            {
                failed = Some((
                    String::new(),
                    Failure::from_acme("answering the challenge", e, http),
                ));
                break;
            }
        }
    }
    if let Some((host, failure)) = failed {
        for p in &presented {
            solver
                .clean_up(&p.host, &p.token, &p.key_authorization)
                .await;
        }
        // An authorization whose challenge the CA was never asked to validate does not
        // linger as pending at the CA.
        if !host.is_empty() {
            let mut authorizations = order.authorizations();
            while let Some(Ok(mut authz)) = authorizations.next().await {
                if authz.identifier().to_string() == host {
                    let _ = timed(metrics, "deactivateAuthorization", authz.deactivate()).await;
                    break;
                }
            }
        }
        return Err(failure);
    }

    // 4. Wait for validation, finalize, download.
    let polling = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(1.5)
        .timeout(Duration::from_secs(120));
    let status = nonce_retries!(timed(metrics, "pollOrder", order.poll_ready(&polling)));
    for p in &presented {
        solver
            .clean_up(&p.host, &p.token, &p.key_authorization)
            .await;
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
