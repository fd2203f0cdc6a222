//! ACME certificates for the gateway: renewal policy, certificate checks, account, orders.
//!
//! - [`policy`]: when to order and when to retry (pure, clock passed in);
//! - [`cert`]: inspecting a `kubernetes.io/tls` Secret's contents, keys, CSRs, the bootstrap
//!   certificate.

pub mod cert;
pub mod policy;

use std::time::SystemTime;

/// `t` as RFC 3339 in UTC, to the second (`2027-01-27T10:00:00Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|ts| ts.to_string())
        .unwrap_or_default()
}
