//! DNS-01 challenges: a TXT record `_acme-challenge.<name>` holding the base64url SHA-256 of
//! the key authorization (RFC 8555 section 8.4), written through a [`DnsProvider`].
//!
//! - [`Dns01Solver`] is the order flow's [`Solver`] for DNS-01, over any [`DnsProvider`]: it
//!   records each TXT record in a ledger before writing it (so that a process stopped mid-order
//!   leaves a list the next one cleans up), waits until every authoritative server serves the
//!   record, and removes exactly the records it wrote (by value: the other records at that
//!   name, another stack's for the same zone included, stay).
//! - [`rfc2136::Rfc2136`] is the first provider, in its own file: RFC 2136 dynamic update
//!   signed with TSIG (RFC 8945), messages and signatures by hickory-proto, over TCP to the
//!   primary server.
//!
//! Adding a provider: implement [`DnsProvider`] (present, missing, clean up, and the check of
//! the settings before an order) in a file of its own beside `rfc2136.rs`, add its settings to
//! `spec.tls.acme.dns01` and build it in `jobs.rs` where [`rfc2136::Rfc2136`] is built. The
//! order flow does not change.

pub mod rfc2136;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use instant_acme::ChallengeType;
use sha2::Digest;

use super::order::Solver;
use super::{Failure, FailureKind};

/// Writes and removes TXT records where the CA looks for them.
pub trait DnsProvider: Send + Sync {
    /// Checks, before an order is placed, that records at `names` can be written (for
    /// example that the server serves a zone for each).
    fn prepare(&self, names: &[String]) -> impl Future<Output = Result<(), Failure>> + Send;
    /// Adds the TXT record `value` at `name` (fully qualified, no trailing dot), beside any
    /// records already there.
    fn present(&self, name: &str, value: &str) -> impl Future<Output = Result<(), Failure>> + Send;
    /// One look at every server the CA may ask: those that do not serve `value` at `name`
    /// yet (empty: visible everywhere).
    fn missing(
        &self,
        name: &str,
        value: &str,
    ) -> impl Future<Output = Result<Vec<String>, Failure>> + Send;
    /// Removes exactly the record `value` at `name`.
    fn clean_up(&self, name: &str, value: &str)
    -> impl Future<Output = Result<(), Failure>> + Send;
}

/// A TXT record written for a challenge.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub name: String,
    pub value: String,
}

/// Where the records written and not yet removed are kept across processes (an annotation of
/// the stack's certificate Secret; see `mod.rs`). `save` replaces the whole list.
pub trait Ledger: Send + Sync {
    fn load(&self) -> impl Future<Output = Result<Vec<Record>, Failure>> + Send;
    fn save(&self, records: &[Record]) -> impl Future<Output = Result<(), Failure>> + Send;
}

/// `_acme-challenge.<host>` for a host or a wildcard host (`*.example.com` is validated at
/// `_acme-challenge.example.com`, RFC 8555 section 8.4).
pub fn challenge_name(host: &str) -> String {
    format!(
        "_acme-challenge.{}",
        host.strip_prefix("*.")
            .unwrap_or(host)
            .trim_end_matches('.')
    )
}

/// The TXT value for a key authorization: base64url(SHA-256(key authorization)), no padding.
pub fn txt_value(key_authorization: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(key_authorization.as_bytes()))
}

/// The order flow's DNS-01 solver over a provider.
pub struct Dns01Solver<P, L> {
    pub provider: P,
    pub ledger: L,
    /// How long `check` waits for every server to serve the record.
    pub propagation_timeout: Duration,
    /// What the solver waits for right now (shown in the stack's status while an order runs).
    pub progress: Arc<Mutex<Option<String>>>,
    written: tokio::sync::Mutex<Vec<Record>>,
}

impl<P: DnsProvider, L: Ledger> Dns01Solver<P, L> {
    pub fn new(
        provider: P,
        ledger: L,
        propagation_timeout: Duration,
        progress: Arc<Mutex<Option<String>>>,
    ) -> Self {
        Self {
            provider,
            ledger,
            propagation_timeout,
            progress,
            written: tokio::sync::Mutex::new(Vec::new()),
        }
    }

    fn say(&self, what: Option<String>) {
        *self.progress.lock().unwrap() = what;
    }

    /// Removes the records an earlier order left behind (a process stopped mid-order, or a
    /// removal that failed), as listed in the ledger. Those that cannot be removed now stay
    /// listed for the next order.
    pub async fn remove_leftovers(&self) -> Result<usize, Failure> {
        let mut written = self.written.lock().await;
        let listed = self.ledger.load().await?;
        let mut kept = Vec::new();
        let mut removed = 0;
        for r in listed {
            match self.provider.clean_up(&r.name, &r.value).await {
                Ok(()) => {
                    tracing::info!(name = %r.name, "removed a DNS-01 record left by an earlier order");
                    removed += 1;
                }
                Err(f) => {
                    tracing::warn!(name = %r.name, error = %f.message, "could not remove a DNS-01 record left by an earlier order");
                    kept.push(r);
                }
            }
        }
        self.ledger.save(&kept).await?;
        *written = kept;
        Ok(removed)
    }
}

impl<P: DnsProvider, L: Ledger> Solver for Dns01Solver<P, L> {
    fn challenge_type(&self, _host: &str) -> ChallengeType {
        ChallengeType::Dns01
    }

    async fn prepare(&self, hosts: &[String], _thumbprint: &str) -> Result<(), Failure> {
        self.remove_leftovers().await?;
        let mut names: Vec<String> = hosts.iter().map(|h| challenge_name(h)).collect();
        names.dedup();
        self.provider.prepare(&names).await
    }

    async fn present(
        &self,
        host: &str,
        _token: &str,
        key_authorization: &str,
    ) -> Result<(), Failure> {
        let record = Record {
            name: challenge_name(host),
            value: txt_value(key_authorization),
        };
        // Listed before it is written: a process stopped right after the write leaves it
        // listed for the next one.
        let mut written = self.written.lock().await;
        written.push(record.clone());
        self.ledger.save(&written).await?;
        drop(written);
        self.say(Some(format!("writing the TXT record {}", record.name)));
        self.provider.present(&record.name, &record.value).await
    }

    async fn check(
        &self,
        host: &str,
        _token: &str,
        key_authorization: &str,
    ) -> Result<(), Failure> {
        let (name, value) = (challenge_name(host), txt_value(key_authorization));
        let started = Instant::now();
        let deadline = started + self.propagation_timeout;
        let mut pause = Duration::from_millis(100);
        loop {
            let missing = self.provider.missing(&name, &value).await?;
            if missing.is_empty() {
                tracing::debug!(%name, seconds = started.elapsed().as_secs_f64(), "DNS-01 record visible at every authoritative server");
                self.say(None);
                return Ok(());
            }
            let waited = started.elapsed().as_secs();
            self.say(Some(format!(
                "waiting for the TXT record {name} to be served by {} (not yet after {waited} s)",
                missing.join(", ")
            )));
            if Instant::now() + pause > deadline {
                self.say(None);
                return Err(Failure::new(
                    FailureKind::DnsNotPropagated,
                    format!(
                        "DNS-01: the TXT record {name} is not served by {} after {} s \
                         (spec.tls.acme.dns01.propagationTimeoutSeconds); the CA was not asked \
                         to validate",
                        missing.join(", "),
                        self.propagation_timeout.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    async fn clean_up(&self, host: &str, _token: &str, key_authorization: &str) {
        let record = Record {
            name: challenge_name(host),
            value: txt_value(key_authorization),
        };
        match self.provider.clean_up(&record.name, &record.value).await {
            Ok(()) => {
                let mut written = self.written.lock().await;
                written.retain(|r| r != &record);
                if let Err(f) = self.ledger.save(&written).await {
                    tracing::warn!(error = %f.message, "could not update the DNS-01 record list");
                }
            }
            // Stays in the ledger: the next order removes it.
            Err(f) => {
                tracing::warn!(name = %record.name, error = %f.message, "could not remove a DNS-01 record; the next order tries again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_names_and_values() {
        assert_eq!(
            challenge_name("a.example.com"),
            "_acme-challenge.a.example.com"
        );
        assert_eq!(
            challenge_name("*.example.com"),
            "_acme-challenge.example.com"
        );
        // RFC 8555 section 8.4: base64url(SHA-256("token.thumbprint")), 43 characters.
        let v = txt_value("token.thumbprint");
        assert_eq!(v.len(), 43);
        assert!(!v.contains('=') && !v.contains('+') && !v.contains('/'));
        assert_ne!(v, txt_value("token.other"));
    }
}
