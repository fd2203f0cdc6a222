//! When to order a certificate, and when to try again after a failure.
//!
//! Pure functions of (certificate facts, renewal information, settings, now): no clock, no
//! randomness, no I/O. Time is passed in, so every rule below is tested with a fixed `now`.
//!
//! Renewal time of a certificate with lifetime `L = notAfter - notBefore`:
//! 1. `notAfter - renewBefore` when `renewBefore` is set and shorter than `L`;
//!    otherwise `notBefore + 2/3 L` (a `renewBefore` as long as the lifetime would mean
//!    "renew at once, forever": it falls back to the default, as cert-manager does);
//! 2. when the CA offers renewal information (ARI, RFC 9773), a point inside its suggested
//!    window, if that is earlier: ARI can only bring renewal forward (a CA that revoked or
//!    will revoke a certificate moves the window into the past, which means "now"). The point
//!    is deterministic, seeded by the certificate's serial (see [`ari_point`]), so every
//!    replica and every restart picks the same moment and many certificates of one CA still
//!    spread over the window;
//! 3. never later than `notAfter - L/20`: once less than a twentieth of the lifetime is left,
//!    the certificate is renewed whatever the settings or the CA say.
//!
//! A certificate is (re)issued at once when there is none, when it is the temporary bootstrap
//! certificate, when it is broken, or when its names differ from the gateway's hosts.
//!
//! After a failed attempt the next one waits for the capped exponential [`Backoff`], or for
//! the CA's `Retry-After` (rate limits) when that is later.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

/// What the renewal policy needs to know about the certificate in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFacts {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// DNS names of the certificate (subjectAltName), lowercase.
    pub hosts: Vec<String>,
    /// Serial number, hex; seeds the point chosen in an ARI window.
    pub serial: String,
}

impl CertFacts {
    /// `notAfter - notBefore` (zero for a certificate that ends before it starts).
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO)
    }
}

/// An ARI suggested renewal window (RFC 9773, section 4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: SystemTime,
    pub end: SystemTime,
}

/// The share of the lifetime after which a certificate is renewed by default (numerator,
/// denominator): 2/3.
pub const DEFAULT_RENEWAL_FRACTION: (u32, u32) = (2, 3);

/// The hard floor: renewal happens at the latest when this share of the lifetime is left.
pub const HARD_FLOOR_DIVISOR: u32 = 20;

/// The time to renew `cert` (see the module documentation for the rules).
pub fn renewal_time(
    cert: &CertFacts,
    renew_before: Option<Duration>,
    ari: Option<&Window>,
) -> SystemTime {
    let lifetime = cert.lifetime();
    let configured = match renew_before {
        Some(before) if before < lifetime => cert.not_after - before,
        _ => {
            let (num, den) = DEFAULT_RENEWAL_FRACTION;
            cert.not_before + lifetime * num / den
        }
    };
    let mut at = configured;
    if let Some(window) = ari {
        at = at.min(ari_point(window, &cert.serial));
    }
    at.min(hard_deadline(cert))
}

/// `notAfter - lifetime/20`: the latest moment a renewal starts.
pub fn hard_deadline(cert: &CertFacts) -> SystemTime {
    cert.not_after - cert.lifetime() / HARD_FLOOR_DIVISOR
}

/// The point of `window` chosen for the certificate with `serial`: `start + f * (end - start)`
/// with `f` in `[0, 1)` taken from the SHA-256 of the serial. RFC 9773 asks for a random point
/// so that renewals spread out; a serial-seeded one spreads the same way but stays put across
/// reconciles, restarts and replicas. A window whose end is not after its start is invalid
/// (section 4.2) and yields its start.
pub fn ari_point(window: &Window, serial: &str) -> SystemTime {
    let Ok(width) = window.end.duration_since(window.start) else {
        return window.start;
    };
    let digest = Sha256::digest(serial.as_bytes());
    let seed = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    // f = seed / 2^64, applied in nanoseconds without floating point.
    let offset = (width.as_nanos() * u128::from(seed)) >> 64;
    window.start + Duration::from_nanos(offset.min(u128::from(u64::MAX)) as u64)
}

/// Why a new certificate is needed now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Why {
    /// No certificate has been issued for this stack yet.
    NoCertificate,
    /// Only the temporary self-signed bootstrap certificate is in place.
    Temporary,
    /// The certificate in the Secret cannot be used (the reason says why).
    Broken(String),
    /// The gateway's hosts are not exactly the certificate's names.
    HostsChanged {
        missing: Vec<String>,
        extra: Vec<String>,
    },
    /// The renewal time has come.
    Due { renewal_time: SystemTime },
}

impl Why {
    /// Plain words, for logs, Events and status.
    pub fn describe(&self) -> String {
        match self {
            Why::NoCertificate => "no certificate has been issued yet".into(),
            Why::Temporary => "only the temporary self-signed certificate is in place".into(),
            Why::Broken(reason) => format!("the certificate in use is broken: {reason}"),
            Why::HostsChanged { missing, extra } => {
                let mut parts = Vec::new();
                if !missing.is_empty() {
                    parts.push(format!("does not cover {}", missing.join(", ")));
                }
                if !extra.is_empty() {
                    parts.push(format!("still names {}", extra.join(", ")));
                }
                format!(
                    "the gateway's hosts changed: the certificate {}",
                    parts.join(" and ")
                )
            }
            Why::Due { renewal_time } => {
                format!("renewal time {} has come", super::rfc3339(*renewal_time))
            }
        }
    }

    /// A bounded word for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Why::NoCertificate => "initial",
            Why::Temporary => "initial",
            Why::Broken(_) => "broken",
            Why::HostsChanged { .. } => "hosts-changed",
            Why::Due { .. } => "renewal",
        }
    }
}

/// What the certificate in use is, as far as the policy is concerned.
#[derive(Clone, Copy, Debug)]
pub enum Current<'a> {
    None,
    Temporary,
    Broken(&'a str),
    Issued(&'a CertFacts),
}

/// The decision for one stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Order a new certificate now.
    Issue(Why),
    /// Nothing to do until `renewal_time`.
    Wait { renewal_time: SystemTime },
}

/// Whether to order now, given the certificate in use, the gateway's hosts, `renewBefore`,
/// the CA's renewal window (if any) and the current time.
pub fn decide(
    current: Current<'_>,
    wanted_hosts: &[String],
    renew_before: Option<Duration>,
    ari: Option<&Window>,
    now: SystemTime,
) -> Decision {
    let cert = match current {
        Current::None => return Decision::Issue(Why::NoCertificate),
        Current::Temporary => return Decision::Issue(Why::Temporary),
        Current::Broken(reason) => return Decision::Issue(Why::Broken(reason.to_string())),
        Current::Issued(cert) => cert,
    };
    let (missing, extra) = host_difference(&cert.hosts, wanted_hosts);
    if !missing.is_empty() || !extra.is_empty() {
        return Decision::Issue(Why::HostsChanged { missing, extra });
    }
    let renewal_time = renewal_time(cert, renew_before, ari);
    if now >= renewal_time {
        Decision::Issue(Why::Due { renewal_time })
    } else {
        Decision::Wait { renewal_time }
    }
}

/// (wanted names the certificate lacks, certificate names no longer wanted), compared
/// case-insensitively, each sorted.
pub fn host_difference(cert_hosts: &[String], wanted: &[String]) -> (Vec<String>, Vec<String>) {
    let have: BTreeSet<String> = cert_hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
    let want: BTreeSet<String> = wanted.iter().map(|h| h.to_ascii_lowercase()).collect();
    (
        want.difference(&have).cloned().collect(),
        have.difference(&want).cloned().collect(),
    )
}

/// Capped exponential backoff after failed attempts: `first`, `2 first`, `4 first`, ...,
/// never more than `cap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub cap: Duration,
}

impl Backoff {
    /// The production schedule: 1 min, 2, 4, 8, 16, 32 min, then every hour.
    pub const DEFAULT: Backoff = Backoff {
        first: Duration::from_secs(60),
        cap: Duration::from_secs(3600),
    };

    /// The wait after `failures` consecutive failures (`failures >= 1`; 0 means no wait).
    pub fn delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32 << (failures - 1).min(20);
        self.first.saturating_mul(factor).min(self.cap)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// When to try again after the `failures`-th consecutive failure at `failed_at`: after the
/// backoff, or at the CA's `Retry-After` when that is later (a rate limit is honoured even
/// beyond the backoff's cap).
pub fn next_attempt(
    failed_at: SystemTime,
    failures: u32,
    backoff: &Backoff,
    retry_after: Option<SystemTime>,
) -> SystemTime {
    let after_backoff = failed_at + backoff.delay(failures);
    match retry_after {
        Some(t) if t > after_backoff => t,
        _ => after_backoff,
    }
}

/// How long to keep a fetched renewal window before asking the CA again: the CA's
/// `Retry-After`, clamped to `[min, max]` (RFC 9773 section 4.3 asks clients to respect it
/// and to bound their own polling).
pub fn ari_recheck(retry_after: Option<Duration>, min: Duration, max: Duration) -> Duration {
    retry_after.unwrap_or(max).clamp(min, max.max(min))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);
    const HOUR: Duration = Duration::from_secs(3600);

    /// A fixed clock: the Unix epoch plus `days`.
    fn t(days: f64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs_f64(1_000_000_000.0 + days * 86_400.0)
    }

    fn cert(not_before_days: f64, not_after_days: f64, hosts: &[&str]) -> CertFacts {
        CertFacts {
            not_before: t(not_before_days),
            not_after: t(not_after_days),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            serial: "04a1b2".into(),
        }
    }

    fn hosts(h: &[&str]) -> Vec<String> {
        h.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn default_renewal_is_at_two_thirds_of_the_lifetime() {
        let c = cert(0.0, 90.0, &["a.example"]);
        assert_eq!(renewal_time(&c, None, None), t(60.0));
        let short = cert(0.0, 6.0, &["a.example"]);
        assert_eq!(renewal_time(&short, None, None), t(4.0));
    }

    #[test]
    fn renew_before_counts_back_from_not_after() {
        let c = cert(0.0, 90.0, &["a.example"]);
        assert_eq!(renewal_time(&c, Some(30 * DAY), None), t(60.0));
        assert_eq!(renewal_time(&c, Some(10 * DAY), None), t(80.0));
        // 10 days before a 90-day expiry is later than 2/3 and earlier than the floor.
        assert!(renewal_time(&c, Some(10 * DAY), None) < hard_deadline(&c));
    }

    #[test]
    fn renew_before_longer_than_the_lifetime_falls_back_to_two_thirds() {
        // A 720h renewBefore on a 6-day certificate.
        let c = cert(0.0, 6.0, &["a.example"]);
        assert_eq!(renewal_time(&c, Some(30 * DAY), None), t(4.0));
        assert_eq!(renewal_time(&c, Some(6 * DAY), None), t(4.0));
    }

    #[test]
    fn the_hard_floor_wins_over_a_short_renew_before() {
        // renewBefore of 1 hour on a 90-day certificate would renew with 1 h left; the floor
        // is 90/20 = 4.5 days before expiry.
        let c = cert(0.0, 90.0, &["a.example"]);
        assert_eq!(renewal_time(&c, Some(HOUR), None), t(85.5));
        assert_eq!(hard_deadline(&c), t(85.5));
    }

    #[test]
    fn the_hard_floor_wins_over_a_late_ari_window() {
        let c = cert(0.0, 90.0, &["a.example"]);
        let late = Window {
            start: t(89.0),
            end: t(89.9),
        };
        // ARI can only move renewal earlier than 2/3 anyway; with renewBefore=1h the floor
        // still caps it.
        assert_eq!(renewal_time(&c, Some(HOUR), Some(&late)), t(85.5));
    }

    #[test]
    fn an_ari_window_earlier_than_the_default_is_followed() {
        let c = cert(0.0, 90.0, &["a.example"]);
        let window = Window {
            start: t(30.0),
            end: t(32.0),
        };
        let at = renewal_time(&c, None, Some(&window));
        assert!(at >= t(30.0) && at < t(32.0), "{at:?}");
        assert_eq!(at, ari_point(&window, &c.serial));
    }

    #[test]
    fn an_ari_window_in_the_past_means_renew_now() {
        // What a CA answers for a revoked certificate.
        let c = cert(0.0, 90.0, &["a.example"]);
        let now = t(10.0);
        let window = Window {
            start: now - HOUR,
            end: now - HOUR + Duration::from_secs(1),
        };
        let d = decide(
            Current::Issued(&c),
            &hosts(&["a.example"]),
            None,
            Some(&window),
            now,
        );
        assert!(matches!(d, Decision::Issue(Why::Due { .. })), "{d:?}");
    }

    #[test]
    fn an_ari_window_later_than_the_default_does_not_delay_renewal() {
        let c = cert(0.0, 90.0, &["a.example"]);
        let window = Window {
            start: t(70.0),
            end: t(72.0),
        };
        assert_eq!(renewal_time(&c, None, Some(&window)), t(60.0));
    }

    #[test]
    fn the_ari_point_is_deterministic_inside_the_window_and_spreads_by_serial() {
        let window = Window {
            start: t(60.0),
            end: t(62.0),
        };
        let mut points = BTreeSet::new();
        for serial in 0..200 {
            let s = format!("{serial:x}");
            let p = ari_point(&window, &s);
            assert!(p >= window.start && p < window.end);
            assert_eq!(p, ari_point(&window, &s), "same serial, same point");
            points.insert(p);
        }
        assert!(points.len() > 190, "points spread: {}", points.len());
        let first_half = points.iter().filter(|p| **p < t(61.0)).count();
        assert!((60..140).contains(&first_half), "{first_half} of 200");
    }

    #[test]
    fn an_invalid_ari_window_yields_its_start() {
        let w = Window {
            start: t(5.0),
            end: t(4.0),
        };
        assert_eq!(ari_point(&w, "01"), t(5.0));
        let empty = Window {
            start: t(5.0),
            end: t(5.0),
        };
        assert_eq!(ari_point(&empty, "01"), t(5.0));
    }

    #[test]
    fn decide_waits_until_the_renewal_time_then_issues() {
        let c = cert(0.0, 90.0, &["a.example", "b.example"]);
        let wanted = hosts(&["b.example", "A.example"]);
        assert_eq!(
            decide(Current::Issued(&c), &wanted, None, None, t(59.9)),
            Decision::Wait {
                renewal_time: t(60.0)
            }
        );
        assert_eq!(
            decide(Current::Issued(&c), &wanted, None, None, t(60.0)),
            Decision::Issue(Why::Due {
                renewal_time: t(60.0)
            })
        );
        // Expired long ago: still just "due".
        assert!(matches!(
            decide(Current::Issued(&c), &wanted, None, None, t(200.0)),
            Decision::Issue(Why::Due { .. })
        ));
    }

    #[test]
    fn no_temporary_or_broken_certificates_are_replaced_at_once() {
        let wanted = hosts(&["a.example"]);
        assert_eq!(
            decide(Current::None, &wanted, None, None, t(0.0)),
            Decision::Issue(Why::NoCertificate)
        );
        assert_eq!(
            decide(Current::Temporary, &wanted, None, None, t(0.0)),
            Decision::Issue(Why::Temporary)
        );
        assert_eq!(
            decide(Current::Broken("no key"), &wanted, None, None, t(0.0)),
            Decision::Issue(Why::Broken("no key".into()))
        );
    }

    #[test]
    fn changed_hosts_reissue_before_the_renewal_time() {
        let c = cert(0.0, 90.0, &["a.example", "old.example"]);
        let d = decide(
            Current::Issued(&c),
            &hosts(&["a.example", "new.example"]),
            None,
            None,
            t(1.0),
        );
        assert_eq!(
            d,
            Decision::Issue(Why::HostsChanged {
                missing: vec!["new.example".into()],
                extra: vec!["old.example".into()],
            })
        );
        let Decision::Issue(why) = d else {
            unreachable!()
        };
        assert_eq!(
            why.describe(),
            "the gateway's hosts changed: the certificate does not cover new.example and still names old.example"
        );
    }

    #[test]
    fn backoff_doubles_from_one_minute_up_to_an_hour() {
        let b = Backoff::DEFAULT;
        let minutes: Vec<u64> = (1..=9).map(|n| b.delay(n).as_secs() / 60).collect();
        assert_eq!(minutes, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(b.delay(0), Duration::ZERO);
        assert_eq!(b.delay(u32::MAX), HOUR);
    }

    #[test]
    fn backoff_with_a_short_first_step_for_tests() {
        let b = Backoff {
            first: Duration::from_secs(2),
            cap: Duration::from_secs(30),
        };
        let s: Vec<u64> = (1..=6).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(s, [2, 4, 8, 16, 30, 30]);
    }

    #[test]
    fn retry_after_is_honoured_when_later_than_the_backoff() {
        let b = Backoff::DEFAULT;
        let failed = t(1.0);
        assert_eq!(
            next_attempt(failed, 1, &b, None),
            failed + 60 * Duration::from_secs(1)
        );
        // A rate limit three hours away: beyond the one-hour cap, and still honoured.
        let limited = failed + 3 * HOUR;
        assert_eq!(next_attempt(failed, 1, &b, Some(limited)), limited);
        // A Retry-After sooner than the backoff does not shorten it.
        let soon = failed + Duration::from_secs(5);
        assert_eq!(
            next_attempt(failed, 3, &b, Some(soon)),
            failed + 4 * 60 * Duration::from_secs(1)
        );
    }

    #[test]
    fn ari_recheck_respects_retry_after_within_bounds() {
        let min = Duration::from_secs(60);
        let max = 6 * HOUR;
        assert_eq!(ari_recheck(Some(HOUR), min, max), HOUR);
        assert_eq!(ari_recheck(Some(Duration::from_secs(1)), min, max), min);
        assert_eq!(ari_recheck(Some(48 * HOUR), min, max), max);
        assert_eq!(ari_recheck(None, min, max), max);
        // A max below the min (test settings) still gives the min.
        assert_eq!(ari_recheck(None, min, Duration::from_secs(5)), min);
    }
}
