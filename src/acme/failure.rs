//! Failed attempts: what went wrong in a bounded set of kinds ([`FailureKind`]), in plain
//! words ([`Failure`]), and the backoff resumed from the failures the stack's status records
//! ([`Recorded`]) after a restart or a change of leader.

use std::time::SystemTime;

use super::policy::{self, Backoff};
use super::timestamp::{parse_rfc3339, rfc3339};
use super::{ca_client, order};
use crate::crd::CertificateStatus;

/// What went wrong, in a bounded set (for metrics and Event reasons).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The gateway does not answer the challenge (self-check, before the CA is asked).
    ChallengeUnreachable,
    /// The CA tried the challenge and failed.
    ChallengeFailed,
    /// DNS-01: the DNS server could not be reached or did not take the update.
    DnsUpdateFailed,
    /// DNS-01: an authoritative server did not serve the TXT record in time.
    DnsNotPropagated,
    /// No answer from the CA, or a TLS or HTTP error talking to it.
    CaUnreachable,
    /// The CA said `rateLimited`.
    RateLimited,
    /// The CA refused or invalidated the order.
    OrderInvalid,
    /// The CA no longer knows the stored account.
    AccountUnknown,
    /// The CA refused the account.
    AccountRefused,
    /// The CA returned a certificate that fails the checks.
    BadCertificate,
    /// A referenced Secret is missing or unusable.
    Config,
    /// A Secret the certificate needs exists and is someone else's.
    NameConflict,
    /// The Kubernetes API failed.
    Kube,
    Internal,
    /// A failure the status recorded without its kind (an earlier process stopped while its
    /// next order ran): its message is all that is known.
    Earlier,
}

impl FailureKind {
    const ALL: [FailureKind; 15] = [
        FailureKind::ChallengeUnreachable,
        FailureKind::ChallengeFailed,
        FailureKind::DnsUpdateFailed,
        FailureKind::DnsNotPropagated,
        FailureKind::CaUnreachable,
        FailureKind::RateLimited,
        FailureKind::OrderInvalid,
        FailureKind::AccountUnknown,
        FailureKind::AccountRefused,
        FailureKind::BadCertificate,
        FailureKind::Config,
        FailureKind::NameConflict,
        FailureKind::Kube,
        FailureKind::Internal,
        FailureKind::Earlier,
    ];

    /// The kind whose [`FailureKind::reason`] is `reason`.
    pub fn from_reason(reason: &str) -> Option<FailureKind> {
        FailureKind::ALL.into_iter().find(|k| k.reason() == reason)
    }

    /// Whether a failure of this kind may carry the CA's `Retry-After`, which makes its next
    /// attempt more than a function of the failure count and time.
    fn may_carry_retry_after(self) -> bool {
        matches!(self, FailureKind::RateLimited | FailureKind::CaUnreachable)
    }

    pub fn reason(self) -> &'static str {
        match self {
            FailureKind::ChallengeUnreachable => "ChallengeUnreachable",
            FailureKind::ChallengeFailed => "ChallengeFailed",
            FailureKind::DnsUpdateFailed => "DNSUpdateFailed",
            FailureKind::DnsNotPropagated => "DNSNotPropagated",
            FailureKind::CaUnreachable => "CAUnreachable",
            FailureKind::RateLimited => "RateLimited",
            FailureKind::OrderInvalid => "OrderInvalid",
            FailureKind::AccountUnknown => "AccountUnknown",
            FailureKind::AccountRefused => "AccountRefused",
            FailureKind::BadCertificate => "BadCertificate",
            FailureKind::Config => "ConfigurationError",
            FailureKind::NameConflict => "NameConflict",
            FailureKind::Kube => "KubernetesError",
            FailureKind::Internal => "InternalError",
            FailureKind::Earlier => "EarlierFailure",
        }
    }
}

/// A failed attempt: its kind, plain words, and the CA's `Retry-After` when it sent one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
    pub retry_after: Option<SystemTime>,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn config(message: impl Into<String>) -> Failure {
        Failure::new(FailureKind::Config, message)
    }

    pub fn kube(message: impl Into<String>) -> Failure {
        Failure::new(FailureKind::Kube, message)
    }

    /// Classifies an instant-acme error met while doing `step`.
    pub fn from_acme(step: &str, e: instant_acme::Error, http: &ca_client::CaClient) -> Failure {
        use instant_acme::Error as E;
        match e {
            E::Api(p) if order::is_type(&p, "rateLimited") => {
                let retry_after = http.last_retry_after();
                let until = retry_after
                    .map(|t| format!("rate-limited until {}", rfc3339(t)))
                    .unwrap_or_else(|| "rate-limited".into());
                Failure {
                    kind: FailureKind::RateLimited,
                    message: format!("{until}: {} (while {step})", order::problem_text(&p)),
                    retry_after,
                }
            }
            E::Api(p) if order::is_type(&p, "accountDoesNotExist") => Failure::new(
                FailureKind::AccountUnknown,
                format!(
                    "the CA does not know the stored account: {} (while {step})",
                    order::problem_text(&p)
                ),
            ),
            E::Api(p) if order::is_type(&p, "externalAccountRequired") => Failure::new(
                FailureKind::AccountRefused,
                format!(
                    "the CA requires External Account Binding: set \
                     spec.tls.acme.externalAccountBinding (keyId, and hmacKeySecretRef naming \
                     a Secret with the HMAC key) to the credentials the CA gave you; \
                     the CA said: {} (while {step})",
                    order::problem_text(&p)
                ),
            ),
            E::Api(p) if step.contains("account") => Failure::new(
                FailureKind::AccountRefused,
                format!(
                    "the CA refused the account: {} (while {step})",
                    order::problem_text(&p)
                ),
            ),
            E::Api(p) if p.status.is_some_and(|s| s >= 500) => Failure {
                kind: FailureKind::CaUnreachable,
                message: format!("CA unavailable: {} (while {step})", order::problem_text(&p)),
                retry_after: http.last_retry_after(),
            },
            E::Api(p) => Failure::new(
                FailureKind::OrderInvalid,
                format!("order invalid: {} (while {step})", order::problem_text(&p)),
            ),
            E::Other(e) if e.downcast_ref::<ca_client::RefusedAddress>().is_some() => {
                Failure::config(format!("{e}; nothing was sent to it (while {step})"))
            }
            E::Timeout(_) => Failure::new(
                FailureKind::CaUnreachable,
                format!("CA unreachable: the CA did not finish in time (while {step})"),
            ),
            other => Failure::new(
                FailureKind::CaUnreachable,
                format!(
                    "CA unreachable: {} (while {step})",
                    order::error_chain(&other)
                ),
            ),
        }
    }
}

/// What the stack's status says about earlier attempts: written by this operator before a
/// restart, or by the replica that led before a change of leader. The backoff resumes from it,
/// so that neither orders again at once after failures (a crash-looping operator is what gets
/// an account rate-limited or blocked by a real CA).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recorded {
    /// `status.certificate`, when it describes the stack's current spec (its
    /// `observedGeneration` is the stack's generation; a spec changed since starts afresh, as a
    /// change of hosts or ACME settings does in a running operator).
    pub certificate: Option<CertificateStatus>,
    /// The CertificateReady condition's reason: the kind of the last failure.
    pub reason: Option<String>,
}

/// A backoff resumed from the status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Resumed {
    pub(super) failures: u32,
    pub(super) failure: Failure,
    pub(super) failed_at: SystemTime,
    pub(super) next_attempt: SystemTime,
}

/// The failures to resume from, or `None` when the status records none (or no readable time
/// of the last one). The next attempt follows the backoff of the recorded count from the
/// recorded time; the recorded `renewalTime` (the next attempt the status named) counts only
/// when the failure may have carried the CA's `Retry-After`, which is not stored elsewhere.
pub(super) fn resume(recorded: &Recorded, backoff: &Backoff) -> Option<Resumed> {
    let c = recorded.certificate.as_ref()?;
    let failures = u32::try_from(c.failed_attempts).ok().filter(|n| *n > 0)?;
    let failed_at = parse_rfc3339(c.last_failure_time.as_deref()?)?;
    let kind = recorded
        .reason
        .as_deref()
        .and_then(FailureKind::from_reason)
        .unwrap_or(FailureKind::Earlier);
    let retry_after = c
        .renewal_time
        .as_deref()
        .and_then(parse_rfc3339)
        .filter(|_| kind.may_carry_retry_after());
    Some(Resumed {
        failures,
        failure: Failure {
            kind,
            message: c
                .last_failure_reason
                .clone()
                .unwrap_or_else(|| "(no reason recorded)".into()),
            retry_after,
        },
        failed_at,
        next_attempt: policy::next_attempt(failed_at, failures, backoff, retry_after),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::CertificateState;
    use std::time::Duration;

    #[test]
    fn every_failure_reason_names_its_kind() {
        for kind in FailureKind::ALL {
            assert_eq!(FailureKind::from_reason(kind.reason()), Some(kind));
        }
        assert_eq!(FailureKind::from_reason("Issued"), None);
    }

    #[test]
    fn the_backoff_resumes_from_the_recorded_failures() {
        let t = |s: &str| parse_rfc3339(s).unwrap();
        let backoff = Backoff {
            first: Duration::from_secs(60),
            cap: Duration::from_secs(3600),
        };
        let recorded = |failed: i32, at: Option<&str>, next: Option<&str>, reason: &str| Recorded {
            certificate: Some(CertificateStatus {
                state: CertificateState::Failed,
                renewal_time: next.map(str::to_string),
                last_failure_reason: Some("challenge not reachable from the CA: x".into()),
                last_failure_time: at.map(str::to_string),
                failed_attempts: failed,
                ..CertificateStatus::pending()
            }),
            reason: Some(reason.into()),
        };
        // Two failures, the last at 10:00: the third attempt waits 2 minutes from then.
        let r = resume(
            &recorded(
                2,
                Some("2027-01-27T10:00:00Z"),
                Some("2027-01-27T10:02:00Z"),
                "ChallengeFailed",
            ),
            &backoff,
        )
        .unwrap();
        assert_eq!(r.failures, 2);
        assert_eq!(r.failed_at, t("2027-01-27T10:00:00Z"));
        assert_eq!(r.next_attempt, t("2027-01-27T10:02:00Z"));
        assert_eq!(r.failure.kind, FailureKind::ChallengeFailed);
        assert_eq!(r.failure.message, "challenge not reachable from the CA: x");
        // The backoff of this process counts, not the next attempt an earlier one computed
        // (it may have run with other settings)...
        let r = resume(
            &recorded(
                2,
                Some("2027-01-27T10:00:00Z"),
                Some("2027-01-27T12:00:00Z"),
                "ChallengeFailed",
            ),
            &backoff,
        )
        .unwrap();
        assert_eq!(r.next_attempt, t("2027-01-27T10:02:00Z"));
        // ...except a later one that may come from the CA's Retry-After.
        for reason in ["RateLimited", "CAUnreachable"] {
            let r = resume(
                &recorded(
                    2,
                    Some("2027-01-27T10:00:00Z"),
                    Some("2027-01-27T12:00:00Z"),
                    reason,
                ),
                &backoff,
            )
            .unwrap();
            assert_eq!(r.next_attempt, t("2027-01-27T12:00:00Z"), "{reason}");
        }
        // Many failures: the cap.
        let r = resume(
            &recorded(30, Some("2027-01-27T10:00:00Z"), None, "OrderInvalid"),
            &backoff,
        )
        .unwrap();
        assert_eq!(r.next_attempt, t("2027-01-27T11:00:00Z"));
        // Nothing to resume: no failure, no time, an unreadable time, no certificate status.
        assert_eq!(
            resume(
                &recorded(0, Some("2027-01-27T10:00:00Z"), None, "Issued"),
                &backoff
            ),
            None
        );
        assert_eq!(
            resume(&recorded(2, None, None, "ChallengeFailed"), &backoff),
            None
        );
        assert_eq!(
            resume(
                &recorded(2, Some("yesterday"), None, "ChallengeFailed"),
                &backoff
            ),
            None
        );
        assert_eq!(resume(&Recorded::default(), &backoff), None);
        // Stopped while the next order ran: the reason is no failure's, the backoff resumes.
        let r = resume(
            &recorded(1, Some("2027-01-27T10:00:00Z"), None, "Ordering"),
            &backoff,
        )
        .unwrap();
        assert_eq!(r.failure.kind, FailureKind::Earlier);
        assert_eq!(r.next_attempt, t("2027-01-27T10:01:00Z"));
    }

    #[test]
    fn failures_are_put_in_plain_words() {
        let http = ca_client::CaClient::new(None, false).unwrap();
        let placing = |kind: &str, detail: &str, status: u16| {
            let problem: instant_acme::Problem = serde_json::from_value(serde_json::json!({
                "type": format!("urn:ietf:params:acme:error:{kind}"),
                "detail": detail,
                "status": status
            }))
            .unwrap();
            Failure::from_acme(
                "placing the order",
                instant_acme::Error::Api(problem),
                &http,
            )
        };
        let f = placing("rateLimited", "too many certificates for this name", 429);
        assert_eq!(f.kind, FailureKind::RateLimited);
        assert_eq!(
            f.message,
            "rate-limited: too many certificates for this name (rateLimited) (while placing the order)"
        );
        let f = placing("rejectedIdentifier", "name is blocked", 400);
        assert_eq!(f.kind, FailureKind::OrderInvalid);
        assert!(
            f.message.starts_with("order invalid: name is blocked"),
            "{}",
            f.message
        );
        let f = Failure::from_acme(
            "reading the CA's directory",
            instant_acme::Error::Other("connection refused".into()),
            &http,
        );
        assert_eq!(f.kind, FailureKind::CaUnreachable);
        assert_eq!(
            f.message,
            "CA unreachable: connection refused (while reading the CA's directory)"
        );
    }
}
