//! How ready the certificate is, from what one reconcile found: the state for the status, the
//! CertificateReady condition (ok, reason, message), the renewal time to show, and when to
//! look again. And which background job is due now.
//!
//! Pure functions of one [`Input`] (the certificate examined in `<stack>-tls`, the policy's
//! [`Decision`], the job running, the failures so far, settings, now): no client, no clock, no
//! state. As in cert-manager, the trigger ([`due_job`]: what to start) and the readiness
//! ([`readiness`]: what to report) are apart and answer from the same inputs; a job that
//! [`due_job`] names is reported by [`readiness`] as started, because the
//! [`super::Manager`] starts it in the same reconcile.

use std::time::{Duration, SystemTime};

use super::Failure;
use super::policy::{Decision, Why};
use super::timestamp::rfc3339;
use super::tls_secret::Examined;
use crate::crd::CertificateState;

/// A background job that was already running when the reconcile looked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Running<'a> {
    /// An order, with what it waits for (a DNS record not yet served by some server).
    Order {
        progress: Option<&'a str>,
    },
    RenewalInfo,
}

/// The failed attempts since the last success.
#[derive(Clone, Copy, Debug, Default)]
pub struct Failures<'a> {
    pub count: u32,
    pub last: Option<&'a Failure>,
    /// When the backoff after the last failure ends.
    pub next_attempt: Option<SystemTime>,
}

/// What [`readiness`] and [`due_job`] decide on.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    pub examined: &'a Examined,
    /// The gateway's hosts.
    pub hosts: &'a [String],
    pub decision: &'a Decision,
    pub running: Option<Running<'a>>,
    pub failures: Failures<'a>,
    /// When the renewal information of the certificate in use is to be fetched again; `None`
    /// when it was never fetched for this certificate.
    pub ari_next_check: Option<SystemTime>,
    pub now: SystemTime,
    /// How soon to look again while a job runs.
    pub poll_interval: Duration,
    /// The longest wait between two looks.
    pub recheck: Duration,
}

/// What to report about the certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub state: CertificateState,
    /// The CertificateReady condition, as in [`super::Report`].
    pub ok: bool,
    pub reason: &'static str,
    pub message: String,
    /// The next renewal, or the next attempt after a failure.
    pub renewal_time: Option<SystemTime>,
    /// Look again after this long.
    pub requeue: Duration,
}

/// A background job to start now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Due {
    /// An order; `replaces` is the ARI identifier of the certificate it renews (RFC 9773
    /// section 5), for a renewal that is due.
    Order { why: Why, replaces: Option<String> },
    /// A renewal-information check for the certificate in use.
    RenewalInfo { serial: String, ari_id: String },
}

/// The shortest wait between two looks (a renewal time a moment away).
const MIN_REQUEUE: Duration = Duration::from_millis(500);

/// The job to start now: none while one runs; an order when one is decided and the backoff is
/// over; a renewal-information check when the certificate in use has an ARI identifier and
/// the renewal information fetched for it is not fresh.
pub fn due_job(input: &Input<'_>) -> Option<Due> {
    if input.running.is_some() {
        return None;
    }
    match input.decision {
        Decision::Issue(why) if !in_backoff(input) => Some(Due::Order {
            why: why.clone(),
            replaces: match (input.examined, why) {
                (Examined::Issued(leaf), Why::Due { .. }) => leaf.ari_id.clone(),
                _ => None,
            },
        }),
        Decision::Wait { .. } if !ari_fresh(input) => match input.examined {
            Examined::Issued(leaf) => leaf.ari_id.as_ref().map(|ari_id| Due::RenewalInfo {
                serial: leaf.facts.serial.clone(),
                ari_id: ari_id.clone(),
            }),
            _ => None,
        },
        _ => None,
    }
}

/// The state, condition and next look (see the module documentation).
pub fn readiness(input: &Input<'_>) -> Readiness {
    let now = input.now;
    let in_use = input.examined.in_use();
    let serving_valid = in_use.is_some_and(|leaf| {
        now < leaf.facts.not_after && super::cert::uncovered(leaf, input.hosts).is_empty()
    });
    let until = |t: SystemTime| t.duration_since(now).unwrap_or_default();
    let (state, reason, message, renewal_time, requeue) = match input.decision {
        Decision::Wait { renewal_time: at } => {
            let requeue = match input.ari_next_check {
                _ if !has_ari_id(input) => until(*at),
                Some(next) if ari_fresh(input) => until(*at).min(until(next)),
                // A check runs, or starts now (see `due_job`).
                _ => input.poll_interval,
            };
            let leaf = in_use.expect("Wait only for an issued certificate");
            let message = format!(
                "certificate {} for {} valid until {}; renewal at {}",
                leaf.facts.serial,
                leaf.facts.hosts.join(", "),
                rfc3339(leaf.facts.not_after),
                rfc3339(*at)
            );
            (
                CertificateState::Valid,
                "Issued",
                message,
                Some(*at),
                requeue,
            )
        }
        Decision::Issue(why) => {
            let busy = if serving_valid {
                CertificateState::Renewing
            } else {
                CertificateState::Issuing
            };
            match (input.running, input.failures.next_attempt) {
                (Some(Running::Order { progress }), _) => {
                    let message = match progress {
                        Some(p) => format!("ordering a certificate: {}; {p}", why.describe()),
                        None => format!("ordering a certificate: {}", why.describe()),
                    };
                    (busy, "Ordering", message, None, input.poll_interval)
                }
                (Some(Running::RenewalInfo), _) => {
                    let message = format!("about to order a certificate: {}", why.describe());
                    (busy, "Ordering", message, None, input.poll_interval)
                }
                (None, Some(next)) if in_backoff(input) => {
                    let failure = input
                        .failures
                        .last
                        .expect("a next attempt follows a failure");
                    let state = if serving_valid {
                        CertificateState::Renewing
                    } else {
                        CertificateState::Failed
                    };
                    let message = format!(
                        "{} failed {} time(s): {}; next attempt at {}",
                        if serving_valid { "renewal" } else { "issuance" },
                        input.failures.count,
                        failure.message,
                        rfc3339(next)
                    );
                    (
                        state,
                        failure.kind.reason(),
                        message,
                        Some(next),
                        until(next),
                    )
                }
                // The order starts now (see `due_job`).
                (None, _) => {
                    let message = format!("ordering a certificate: {}", why.describe());
                    (busy, "Ordering", message, None, input.poll_interval)
                }
            }
        }
    };
    let message = if matches!(input.examined, Examined::Temporary) {
        format!("serving a temporary self-signed certificate until the first issuance; {message}")
    } else {
        message
    };
    Readiness {
        state,
        ok: serving_valid && state != CertificateState::Failed,
        reason,
        message,
        renewal_time,
        requeue: requeue.min(input.recheck).max(MIN_REQUEUE),
    }
}

/// Whether the backoff after the last failure still runs.
fn in_backoff(input: &Input<'_>) -> bool {
    input
        .failures
        .next_attempt
        .is_some_and(|next| next > input.now)
}

/// Whether the certificate in use is one the CA keeps renewal information for.
fn has_ari_id(input: &Input<'_>) -> bool {
    matches!(input.examined, Examined::Issued(leaf) if leaf.ari_id.is_some())
}

/// Whether the renewal information fetched for the certificate in use is still fresh.
fn ari_fresh(input: &Input<'_>) -> bool {
    input.ari_next_check.is_some_and(|next| next > input.now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acme::policy::{self, Current};
    use crate::acme::{FailureKind, cert};

    const MIN: Duration = Duration::from_secs(60);
    const POLL: Duration = Duration::from_secs(2);
    const RECHECK: Duration = Duration::from_secs(600);

    /// The message of the valid certificate of [`leaf`].
    const VALID: &str = "certificate 0a1b for a.example valid until 2027-01-15T09:30:00Z; \
                         renewal at 2027-01-15T09:00:00Z";
    const TEMPORARY: &str =
        "serving a temporary self-signed certificate until the first issuance; ";

    /// Minute `m` of the test's clock.
    fn t(m: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000) + MIN * m as u32
    }

    /// An issued certificate for `a.example`, valid from minute 0 to minute 90 (renewal at
    /// 60), with an ARI identifier when `ari`.
    fn leaf(ari: bool) -> cert::Leaf {
        let (crt, _) = cert::bootstrap(&["a.example".to_string()], t(0)).unwrap();
        let mut leaf = cert::parse_chain(crt.as_bytes()).unwrap();
        leaf.temporary = false;
        leaf.facts.not_before = t(0);
        leaf.facts.not_after = t(90);
        leaf.facts.serial = "0a1b".into();
        leaf.ari_id = ari.then(|| "aki.c2VyaWFs".to_string());
        leaf
    }

    /// What one reconcile found, at minute `now`.
    struct Found {
        examined: Examined,
        hosts: &'static [&'static str],
        running: Option<Running<'static>>,
        failures: u32,
        next_attempt: Option<u64>,
        ari_next_check: Option<u64>,
        now: u64,
    }

    fn found(examined: Examined, now: u64) -> Found {
        Found {
            examined,
            hosts: &["a.example"],
            running: None,
            failures: 0,
            next_attempt: None,
            ari_next_check: None,
            now,
        }
    }

    /// Two failures, the next attempt 4 minutes from now.
    fn failing(examined: Examined, now: u64) -> Found {
        Found {
            failures: 2,
            next_attempt: Some(now + 4),
            ..found(examined, now)
        }
    }

    /// What is to be reported (the renewal time in minutes), and the job to start.
    struct Want {
        state: CertificateState,
        ok: bool,
        reason: &'static str,
        message: String,
        renewal: Option<u64>,
        requeue: Duration,
        job: Option<Due>,
    }

    fn decide(f: &Found) -> (Readiness, Option<Due>) {
        let hosts: Vec<String> = f.hosts.iter().map(|h| h.to_string()).collect();
        let current = match &f.examined {
            Examined::Temporary => Current::Temporary,
            Examined::Broken(reason, _) => Current::Broken(reason),
            Examined::Issued(leaf) => Current::Issued(&leaf.facts),
            Examined::Conflict(_) => unreachable!("never decided on"),
        };
        let decision = policy::decide(current, &hosts, None, None, t(f.now));
        let failure = Failure::new(FailureKind::ChallengeFailed, "the CA saw 404");
        let input = Input {
            examined: &f.examined,
            hosts: &hosts,
            decision: &decision,
            running: f.running,
            failures: Failures {
                count: f.failures,
                last: (f.failures > 0).then_some(&failure),
                next_attempt: f.next_attempt.map(t),
            },
            ari_next_check: f.ari_next_check.map(t),
            now: t(f.now),
            poll_interval: POLL,
            recheck: RECHECK,
        };
        (readiness(&input), due_job(&input))
    }

    /// Valid, renewal at minute 60: look again after `requeue`, start `job`.
    fn valid(requeue: Duration, job: Option<Due>) -> Want {
        Want {
            state: CertificateState::Valid,
            ok: true,
            reason: "Issued",
            message: VALID.into(),
            renewal: Some(60),
            requeue,
            job,
        }
    }

    /// An order runs or starts (`job`); `ok` while the certificate in use still serves.
    fn ordering(state: CertificateState, ok: bool, message: String, job: Option<Due>) -> Want {
        Want {
            state,
            ok,
            reason: "Ordering",
            message,
            renewal: None,
            requeue: POLL,
            job,
        }
    }

    /// In the backoff of [`failing`], the next attempt at minute `next`.
    fn backing_off(state: CertificateState, ok: bool, message: String, next: u64) -> Want {
        Want {
            state,
            ok,
            reason: "ChallengeFailed",
            message,
            renewal: Some(next),
            requeue: 4 * MIN,
            job: None,
        }
    }

    #[test]
    fn readiness_and_the_due_job_follow_the_table() {
        use CertificateState::{Failed, Issuing, Renewing};
        let order = |why: Why, replaces: Option<&str>| {
            Some(Due::Order {
                why,
                replaces: replaces.map(str::to_string),
            })
        };
        let due = || Why::Due {
            renewal_time: t(60),
        };
        let changed = || Why::Broken("Secret shop-tls was changed by someone else".into());
        let added = || Why::HostsChanged {
            missing: vec!["b.example".into()],
            extra: vec![],
        };
        let to_order = |why: Why| format!("ordering a certificate: {}", why.describe());
        let failed = |what: &str, at: &str| {
            format!("{what} failed 2 time(s): the CA saw 404; next attempt at 2027-01-15T{at}Z")
        };
        let issued = |ari| Examined::Issued(leaf(ari));
        let fetch_ari = Some(Due::RenewalInfo {
            serial: "0a1b".into(),
            ari_id: "aki.c2VyaWFs".into(),
        });
        let progress = "waiting for ns1 to serve the record";
        let rows: Vec<(&str, Found, Want)> = vec![
            (
                "valid, renewal far away: look again at the recheck",
                found(issued(false), 10),
                valid(RECHECK, None),
            ),
            (
                "valid, renewal in 5 minutes: look again then",
                found(issued(false), 55),
                valid(5 * MIN, None),
            ),
            (
                "valid, renewal information fresh: look again at its next check",
                Found {
                    ari_next_check: Some(57),
                    ..found(issued(true), 55)
                },
                valid(2 * MIN, None),
            ),
            (
                "valid, renewal information never fetched: it is fetched now",
                found(issued(true), 10),
                valid(POLL, fetch_ari.clone()),
            ),
            (
                "valid, renewal information stale: it is fetched now",
                Found {
                    ari_next_check: Some(10),
                    ..found(issued(true), 10)
                },
                valid(POLL, fetch_ari),
            ),
            (
                "valid, renewal information being fetched: poll",
                Found {
                    ari_next_check: Some(9),
                    running: Some(Running::RenewalInfo),
                    ..found(issued(true), 10)
                },
                valid(POLL, None),
            ),
            (
                "temporary: the first order starts",
                found(Examined::Temporary, 0),
                ordering(
                    Issuing,
                    false,
                    format!("{TEMPORARY}{}", to_order(Why::Temporary)),
                    order(Why::Temporary, None),
                ),
            ),
            (
                "temporary, ordering: the order's progress",
                Found {
                    running: Some(Running::Order {
                        progress: Some(progress),
                    }),
                    ..found(Examined::Temporary, 0)
                },
                ordering(
                    Issuing,
                    false,
                    format!("{TEMPORARY}{}; {progress}", to_order(Why::Temporary)),
                    None,
                ),
            ),
            (
                "renewal due while renewal information is fetched: the order waits",
                Found {
                    running: Some(Running::RenewalInfo),
                    ..found(issued(true), 61)
                },
                ordering(
                    Renewing,
                    true,
                    format!("about to order a certificate: {}", due().describe()),
                    None,
                ),
            ),
            (
                "renewal due: the order replaces the certificate (ARI)",
                found(issued(true), 61),
                ordering(
                    Renewing,
                    true,
                    to_order(due()),
                    order(due(), Some("aki.c2VyaWFs")),
                ),
            ),
            (
                "renewal failed twice, in backoff: still serving",
                failing(issued(false), 61),
                backing_off(Renewing, true, failed("renewal", "09:05:00"), 65),
            ),
            (
                "backoff over: the next order starts",
                Found {
                    next_attempt: Some(61),
                    ..failing(issued(false), 61)
                },
                ordering(Renewing, true, to_order(due()), order(due(), None)),
            ),
            (
                "first issuance failing",
                failing(Examined::Temporary, 3),
                backing_off(
                    Failed,
                    false,
                    format!("{TEMPORARY}{}", failed("issuance", "08:07:00")),
                    7,
                ),
            ),
            (
                "expired and failing",
                failing(issued(false), 95),
                backing_off(Failed, false, failed("issuance", "09:39:00"), 99),
            ),
            (
                "a host added: not served until the new certificate",
                Found {
                    hosts: &["a.example", "b.example"],
                    ..found(issued(false), 10)
                },
                ordering(Issuing, false, to_order(added()), order(added(), None)),
            ),
            (
                "changed by someone else, still serving",
                found(
                    Examined::Broken(
                        "Secret shop-tls was changed by someone else".into(),
                        Some(leaf(false)),
                    ),
                    10,
                ),
                ordering(Renewing, true, to_order(changed()), order(changed(), None)),
            ),
            (
                "unusable and failing",
                failing(Examined::Broken("tls.key does not match".into(), None), 10),
                backing_off(Failed, false, failed("issuance", "08:14:00"), 14),
            ),
        ];
        for (name, found, want) in rows {
            let (got, job) = decide(&found);
            assert_eq!(got.state, want.state, "{name}");
            assert_eq!(got.ok, want.ok, "{name}");
            assert_eq!(got.reason, want.reason, "{name}");
            assert_eq!(got.message, want.message, "{name}");
            assert_eq!(got.renewal_time, want.renewal.map(t), "{name}");
            assert_eq!(got.requeue, want.requeue, "{name}");
            assert_eq!(job, want.job, "{name}");
        }
    }

    /// A look again is never sooner than half a second, never later than the recheck, also
    /// when the recheck is set below half a second.
    #[test]
    fn the_next_look_stays_within_its_bounds() {
        let examined = Examined::Issued(leaf(false));
        let hosts = vec!["a.example".to_string()];
        for (recheck, renewal_in, want) in [
            (
                RECHECK,
                Duration::from_millis(10),
                Duration::from_millis(500),
            ),
            (RECHECK, 2 * RECHECK, RECHECK),
            (Duration::from_millis(100), MIN, Duration::from_millis(500)),
        ] {
            let decision = Decision::Wait {
                renewal_time: t(10) + renewal_in,
            };
            let input = Input {
                examined: &examined,
                hosts: &hosts,
                decision: &decision,
                running: None,
                failures: Failures::default(),
                ari_next_check: None,
                now: t(10),
                poll_interval: POLL,
                recheck,
            };
            assert_eq!(
                readiness(&input).requeue,
                want,
                "{recheck:?} {renewal_in:?}"
            );
        }
    }
}
