//! The stack's status as a value: observations in, `OpsConductorStackStatus` out.
//!
//! Pure: the clock is passed in. A condition keeps its `lastTransitionTime` while its status
//! does not change, so an unchanged stack computes an identical status and causes no write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::crd::{
    CertificateStatus, GatewayStatus, OpsConductorStackStatus, PolicyMode, ServicesStatus,
    Violation,
};

pub const READY: &str = "Ready";
pub const SERVICES_READY: &str = "ServicesReady";
pub const GATEWAY_READY: &str = "GatewayReady";
pub const CERTIFICATE_READY: &str = "CertificateReady";
pub const POLICY_ENFORCED: &str = "PolicyEnforced";
/// Only on stacks with `spec.serviceIdentity`.
pub const SERVICE_IDENTITY_READY: &str = "ServiceIdentityReady";
/// Whether the gateway pods run the configuration the operator wrote
/// ([`super::config_status`]).
pub const GATEWAY_CONFIG_LOADED: &str = "GatewayConfigLoaded";

/// Most violations listed in status; `violationCount` has the total.
pub const MAX_LISTED_VIOLATIONS: usize = 50;

/// Most name conflicts (and held workloads) named in the Ready message; the Events name each.
pub const MAX_LISTED_CONFLICTS: usize = 20;

/// One condition as computed this round, before timestamps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    /// Status `Unknown` (with `ok` true: an unknown condition holds `Ready` back no more than
    /// a missing one would).
    pub unknown: bool,
    pub reason: String,
    pub message: String,
}

impl Verdict {
    pub fn ok(reason: &str, message: impl Into<String>) -> Self {
        Self::new(true, reason, message)
    }
    pub fn not(reason: &str, message: impl Into<String>) -> Self {
        Self::new(false, reason, message)
    }
    pub fn new(ok: bool, reason: &str, message: impl Into<String>) -> Self {
        Self {
            ok,
            unknown: false,
            reason: reason.into(),
            message: message.into(),
        }
    }
    /// Status `Unknown`: nothing can be said yet (see [`Verdict::unknown`] the field).
    pub fn unknown(reason: &str, message: impl Into<String>) -> Self {
        Self {
            unknown: true,
            ..Self::new(true, reason, message)
        }
    }
}

/// What the controller observed about one stack this round.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub generation: Option<i64>,
    /// Names of services whose Deployment has all desired replicas ready, and the total.
    pub services_ready: i32,
    pub services_total: i32,
    pub not_ready_services: Vec<String>,
    pub gateway_ready_replicas: i32,
    pub gateway_desired_replicas: i32,
    pub gateway_address: Option<String>,
    pub certificate: CertificateStatus,
    pub certificate_verdict: Verdict,
    pub policy_verdict: Verdict,
    pub violations: Vec<Violation>,
    /// Objects the stack wants that exist and are someone else's (`Kind/name`), sorted.
    pub conflicts: Vec<String>,
    /// Deployments held back, with the conflicting object each would depend on.
    pub held: Vec<(String, String)>,
    /// `ServiceIdentityReady`, for a stack with `spec.serviceIdentity` (else no condition).
    pub identity_verdict: Option<Verdict>,
    /// `GatewayConfigLoaded`; `None` (no condition) when the gateway is not built yet.
    pub config_verdict: Option<Verdict>,
}

/// What apply and the audit found about the stack's policy, for `PolicyEnforced`.
#[derive(Clone, Debug, Default)]
pub struct PolicyFindings<'a> {
    /// Objects changed by others and left as they are (mode Audit): (kind, name).
    pub drift_reported: &'a [(&'static str, String)],
    /// What is missing or switched off of the admission guardrails, when they are required.
    pub guardrail_problems: Vec<String>,
    pub mode: PolicyMode,
    /// The stack's NetworkPolicies.
    pub network_policies: usize,
    /// What breaks the policy in the stack's namespace.
    pub violations: &'a [Violation],
}

/// `PolicyEnforced`: drift left alone first, then missing guardrails, then violations found
/// by the audit; else in place (mode Audit says that it reports drift without reverting it).
pub fn policy_verdict(found: &PolicyFindings) -> Verdict {
    let policies = found.network_policies;
    if !found.drift_reported.is_empty() {
        let names: Vec<String> = found
            .drift_reported
            .iter()
            .map(|(k, n)| format!("{k}/{n}"))
            .collect();
        return Verdict::not(
            "DriftDetected",
            format!(
                "policy mode Audit: changed by others and left as they are: {}",
                names.join(", ")
            ),
        );
    }
    if !found.guardrail_problems.is_empty() {
        return Verdict::not(
            "GuardrailsMissing",
            format!(
                "the admission guardrails are not in place (install them with the chart, \
                 admission.enabled=true, or manifests/admission/): {}",
                found.guardrail_problems.join("; ")
            ),
        );
    }
    let violations = found.violations;
    if !violations.is_empty() {
        let listed: Vec<String> = violations
            .iter()
            .take(3)
            .map(|v| format!("{} {} ({})", v.kind, v.name, v.reason))
            .collect();
        let more = if violations.len() > 3 {
            format!(" and {} more", violations.len() - 3)
        } else {
            String::new()
        };
        return Verdict::not(
            "ViolationsFound",
            format!(
                "{} object(s) in the namespace break the policy: {}{more}",
                violations.len(),
                listed.join("; ")
            ),
        );
    }
    if found.mode == PolicyMode::Audit {
        Verdict::ok(
            "Audited",
            format!(
                "{policies} NetworkPolicies in place; mode Audit reports drift without reverting it"
            ),
        )
    } else {
        Verdict::ok(
            "Enforced",
            format!("{policies} NetworkPolicies in place; every stack pod is default-deny"),
        )
    }
}

/// The status for a stack whose spec is valid.
pub fn compute(
    previous: Option<&OpsConductorStackStatus>,
    observed: &Observed,
    now: Timestamp,
) -> OpsConductorStackStatus {
    let services = if observed.services_ready == observed.services_total {
        Verdict::ok(
            "AllReady",
            format!(
                "{0}/{0} services have every replica ready",
                observed.services_total
            ),
        )
    } else {
        Verdict::not(
            "Progressing",
            format!(
                "{}/{} services ready; waiting for: {}",
                observed.services_ready,
                observed.services_total,
                observed.not_ready_services.join(", ")
            ),
        )
    };
    let gateway = if observed.gateway_ready_replicas >= observed.gateway_desired_replicas {
        Verdict::ok(
            "AllReady",
            format!("{} gateway pods ready", observed.gateway_ready_replicas),
        )
    } else if observed.gateway_ready_replicas > 0 {
        Verdict::not(
            "Degraded",
            format!(
                "{}/{} gateway pods ready",
                observed.gateway_ready_replicas, observed.gateway_desired_replicas
            ),
        )
    } else {
        Verdict::not(
            "Unavailable",
            format!("0/{} gateway pods ready", observed.gateway_desired_replicas),
        )
    };
    let mut parts = vec![
        (SERVICES_READY, services),
        (GATEWAY_READY, gateway),
        (CERTIFICATE_READY, observed.certificate_verdict.clone()),
        (POLICY_ENFORCED, observed.policy_verdict.clone()),
    ];
    if let Some(identity) = &observed.identity_verdict {
        parts.push((SERVICE_IDENTITY_READY, identity.clone()));
    }
    if let Some(config) = &observed.config_verdict {
        parts.push((GATEWAY_CONFIG_LOADED, config.clone()));
    }
    let failing: Vec<&str> = parts
        .iter()
        .filter(|(_, v)| !v.ok)
        .map(|(t, _)| *t)
        .collect();
    let ready = if !observed.conflicts.is_empty() {
        Verdict::not(
            "NameConflict",
            conflict_message(&observed.conflicts, &observed.held),
        )
    } else if failing.is_empty() && observed.identity_verdict.is_some() {
        Verdict::ok(
            "AllReady",
            "services, gateway, certificate, policy and service identity are all in place",
        )
    } else if failing.is_empty() {
        Verdict::ok(
            "AllReady",
            "services, gateway, certificate and policy are all in place",
        )
    } else {
        Verdict::not("NotReady", format!("not yet: {}", failing.join(", ")))
    };
    let mut verdicts = vec![(READY, ready)];
    verdicts.extend(parts);
    let mut violations = observed.violations.clone();
    violations.sort();
    let count = violations.len();
    violations.truncate(MAX_LISTED_VIOLATIONS);
    OpsConductorStackStatus {
        observed_generation: observed.generation,
        conditions: conditions(previous, &verdicts, observed.generation, now),
        services: Some(ServicesStatus {
            ready: observed.services_ready,
            total: observed.services_total,
            summary: format!("{}/{}", observed.services_ready, observed.services_total),
        }),
        gateway: Some(GatewayStatus {
            ready_replicas: observed.gateway_ready_replicas,
            address: observed.gateway_address.clone(),
        }),
        certificate: Some(observed.certificate.clone()),
        violations,
        violation_count: Some(count as i32),
    }
}

/// Ready's message while objects of the stack's names are someone else's.
fn conflict_message(conflicts: &[String], held: &[(String, String)]) -> String {
    fn list(items: Vec<String>) -> String {
        let more = items.len().saturating_sub(MAX_LISTED_CONFLICTS);
        let mut text = items
            .into_iter()
            .take(MAX_LISTED_CONFLICTS)
            .collect::<Vec<_>>()
            .join(", ");
        if more > 0 {
            text.push_str(&format!(" and {more} more"));
        }
        text
    }
    let mut message = format!(
        "{} object(s) with names this stack wants exist and were not created by it; they are \
         left alone (annotate one with {}=<stack name> to hand it over, or rename the service): {}",
        conflicts.len(),
        crate::ownership::ADOPT_ANNOTATION,
        list(conflicts.to_vec()),
    );
    if !held.is_empty() {
        message.push_str(&format!(
            "; held back until then: {}",
            list(
                held.iter()
                    .map(|(d, on)| format!("Deployment/{d} (needs {on})"))
                    .collect()
            )
        ));
    }
    message
}

/// The status for a stack whose spec failed validation: Ready=False/InvalidSpec with every
/// problem; the rest of the previous status (what is running) is kept as it was.
pub fn invalid(
    previous: Option<&OpsConductorStackStatus>,
    generation: Option<i64>,
    message: &str,
    now: Timestamp,
) -> OpsConductorStackStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let mut verdicts = vec![(READY, Verdict::not("InvalidSpec", message))];
    // Keep the other conditions as they were: nothing was changed.
    for c in previous
        .map(|p| p.conditions.as_slice())
        .unwrap_or_default()
    {
        if c.type_ != READY {
            verdicts.push((
                leak_type(&c.type_),
                Verdict {
                    ok: c.status != "False",
                    unknown: c.status == "Unknown",
                    reason: c.reason.clone(),
                    message: c.message.clone(),
                },
            ));
        }
    }
    status.conditions = conditions(previous, &verdicts, generation, now);
    status.observed_generation = generation;
    if status.certificate.is_none() {
        status.certificate = Some(CertificateStatus::pending());
    }
    status
}

fn leak_type(t: &str) -> &'static str {
    match t {
        SERVICES_READY => SERVICES_READY,
        GATEWAY_READY => GATEWAY_READY,
        CERTIFICATE_READY => CERTIFICATE_READY,
        POLICY_ENFORCED => POLICY_ENFORCED,
        SERVICE_IDENTITY_READY => SERVICE_IDENTITY_READY,
        _ => READY,
    }
}

fn conditions(
    previous: Option<&OpsConductorStackStatus>,
    verdicts: &[(&str, Verdict)],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    verdicts
        .iter()
        .map(|(type_, v)| {
            let status = match (v.unknown, v.ok) {
                (true, _) => "Unknown",
                (false, true) => "True",
                (false, false) => "False",
            };
            let before = previous.and_then(|p| p.conditions.iter().find(|c| c.type_ == *type_));
            let last_transition_time = match before {
                Some(c) if c.status == status => c.last_transition_time.clone(),
                _ => Time(now),
            };
            Condition {
                type_: type_.to_string(),
                status: status.into(),
                reason: v.reason.clone(),
                message: v.message.clone(),
                last_transition_time,
                observed_generation: generation,
            }
        })
        .collect()
}

/// The condition of `type_` in `status`, if any.
pub fn condition<'a>(
    status: Option<&'a OpsConductorStackStatus>,
    type_: &str,
) -> Option<&'a Condition> {
    status?.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed() -> Observed {
        Observed {
            generation: Some(3),
            services_ready: 2,
            services_total: 2,
            not_ready_services: vec![],
            gateway_ready_replicas: 2,
            gateway_desired_replicas: 2,
            gateway_address: None,
            certificate: CertificateStatus {
                state: crate::crd::CertificateState::Valid,
                hosts: vec!["a.example.com".into()],
                ..CertificateStatus::pending()
            },
            certificate_verdict: Verdict::ok("Valid", "ok"),
            policy_verdict: Verdict::ok("Enforced", "ok"),
            violations: vec![],
            conflicts: vec![],
            held: vec![],
            identity_verdict: None,
            config_verdict: None,
        }
    }

    /// PolicyEnforced: drift left alone, then missing guardrails, then violations, else in
    /// place; the first that applies names the reason.
    #[test]
    fn the_policy_verdict_takes_the_first_finding_that_applies() {
        let violation = |name: &str| Violation {
            kind: "Service".into(),
            name: name.into(),
            reason: "type NodePort".into(),
        };
        let five: Vec<Violation> = ["a", "b", "c", "d", "e"].map(violation).to_vec();
        let drift = [("NetworkPolicy", "p".to_string())];
        let problems = vec!["binding missing".to_string()];
        let base = PolicyFindings {
            network_policies: 4,
            ..PolicyFindings::default()
        };
        let cases = [
            (base.clone(), true, "Enforced", "4 NetworkPolicies in place"),
            (
                PolicyFindings {
                    mode: PolicyMode::Audit,
                    ..base.clone()
                },
                true,
                "Audited",
                "mode Audit reports drift",
            ),
            (
                PolicyFindings {
                    violations: &five,
                    ..base.clone()
                },
                false,
                "ViolationsFound",
                "5 object(s) in the namespace break the policy: Service a (type NodePort); \
                 Service b (type NodePort); Service c (type NodePort) and 2 more",
            ),
            (
                PolicyFindings {
                    guardrail_problems: problems.clone(),
                    violations: &five,
                    ..base.clone()
                },
                false,
                "GuardrailsMissing",
                "binding missing",
            ),
            (
                PolicyFindings {
                    drift_reported: &drift,
                    guardrail_problems: problems.clone(),
                    violations: &five,
                    ..base.clone()
                },
                false,
                "DriftDetected",
                "left as they are: NetworkPolicy/p",
            ),
        ];
        for (found, ok, reason, message) in cases {
            let v = policy_verdict(&found);
            assert_eq!((v.ok, v.reason.as_str()), (ok, reason), "{v:?}");
            assert!(v.message.contains(message), "{v:?}");
        }
    }

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn all_good_is_ready() {
        let s = compute(None, &observed(), t(100));
        let ready = condition(Some(&s), READY).unwrap();
        assert_eq!(ready.status, "True");
        assert_eq!(ready.observed_generation, Some(3));
        assert_eq!(s.services.unwrap().summary, "2/2");
        assert_eq!(s.violation_count, Some(0));
    }

    /// ServiceIdentityReady only with identity on; without keys it holds Ready back, and the
    /// condition goes away with identity switched off.
    #[test]
    fn service_identity_has_a_condition_of_its_own_only_when_on() {
        let plain = compute(None, &observed(), t(100));
        assert!(condition(Some(&plain), SERVICE_IDENTITY_READY).is_none());
        let with = |v: Verdict| Observed {
            identity_verdict: Some(v),
            ..observed()
        };
        let published = compute(None, &with(Verdict::ok("KeysPublished", "keys")), t(100));
        assert_eq!(
            condition(Some(&published), SERVICE_IDENTITY_READY)
                .unwrap()
                .status,
            "True"
        );
        assert_eq!(condition(Some(&published), READY).unwrap().status, "True");
        let missing = compute(
            Some(&published),
            &with(Verdict::not("KeysUnavailable", "no keys")),
            t(200),
        );
        let c = condition(Some(&missing), SERVICE_IDENTITY_READY).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "KeysUnavailable")
        );
        let ready = condition(Some(&missing), READY).unwrap();
        assert_eq!(ready.status, "False");
        assert!(ready.message.contains(SERVICE_IDENTITY_READY), "{ready:?}");
        // An invalid spec keeps it as it was.
        let invalid = invalid(Some(&missing), Some(4), "bad", t(300));
        let kept = condition(Some(&invalid), SERVICE_IDENTITY_READY).unwrap();
        assert_eq!(kept.reason, "KeysUnavailable");
        // Switched off: gone.
        let off = compute(Some(&missing), &observed(), t(400));
        assert!(condition(Some(&off), SERVICE_IDENTITY_READY).is_none());
    }

    #[test]
    fn unchanged_observations_give_an_identical_status() {
        let first = compute(None, &observed(), t(100));
        let second = compute(Some(&first), &observed(), t(200));
        assert_eq!(first, second, "timestamps only move on a transition");
    }

    #[test]
    fn a_failing_part_explains_itself_and_moves_the_transition_time() {
        let first = compute(None, &observed(), t(100));
        let mut o = observed();
        o.services_ready = 1;
        o.not_ready_services = vec!["users".into()];
        let second = compute(Some(&first), &o, t(200));
        let ready = condition(Some(&second), READY).unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(ready.message, "not yet: ServicesReady");
        assert_eq!(ready.last_transition_time, Time(t(200)));
        let services = condition(Some(&second), SERVICES_READY).unwrap();
        assert_eq!(services.message, "1/2 services ready; waiting for: users");
        let gateway = condition(Some(&second), GATEWAY_READY).unwrap();
        assert_eq!(gateway.last_transition_time, Time(t(100)));
    }

    #[test]
    fn violations_are_capped_and_counted() {
        let mut o = observed();
        o.violations = (0..60)
            .map(|i| Violation {
                kind: "Service".into(),
                name: format!("s{i:02}"),
                reason: "r".into(),
            })
            .collect();
        let s = compute(None, &o, t(1));
        assert_eq!(s.violations.len(), MAX_LISTED_VIOLATIONS);
        assert_eq!(s.violation_count, Some(60));
    }

    #[test]
    fn name_conflicts_make_ready_false_and_are_listed_with_what_they_hold() {
        let mut o = observed();
        o.conflicts = vec!["Service/db".into(), "ServiceAccount/builder".into()];
        o.held = vec![("builder".into(), "ServiceAccount/builder".into())];
        let s = compute(None, &o, t(1));
        let ready = condition(Some(&s), READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "NameConflict")
        );
        assert!(
            ready.message.starts_with("2 object(s)")
                && ready
                    .message
                    .contains(": Service/db, ServiceAccount/builder; held back")
                && ready
                    .message
                    .contains("Deployment/builder (needs ServiceAccount/builder)"),
            "{}",
            ready.message
        );
        // Bounded, whatever the number of conflicts.
        o.conflicts = (0..500).map(|i| format!("Service/s{i:03}")).collect();
        let s = compute(None, &o, t(1));
        let ready = condition(Some(&s), READY).unwrap();
        assert!(ready.message.contains("and 480 more"), "{}", ready.message);
        assert!(ready.message.len() < 2000);
    }

    #[test]
    fn invalid_spec_keeps_what_runs() {
        let good = compute(None, &observed(), t(100));
        let bad = invalid(
            Some(&good),
            Some(4),
            "spec.services[0].port: port 0 is out of range",
            t(200),
        );
        let ready = condition(Some(&bad), READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "InvalidSpec")
        );
        assert_eq!(bad.services, good.services);
        assert_eq!(
            condition(Some(&bad), SERVICES_READY).unwrap().status,
            "True"
        );
        assert_eq!(bad.observed_generation, Some(4));
    }
}
