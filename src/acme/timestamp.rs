//! Timestamps as the status and the Events write them: RFC 3339 in UTC, to the second.

use std::time::{Duration, SystemTime};

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

pub(super) fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub(super) fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let secs = text
        .parse::<k8s_openapi::jiff::Timestamp>()
        .ok()?
        .as_second();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}
