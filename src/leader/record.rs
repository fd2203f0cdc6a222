//! The election itself, pure: what a Lease record says, whether to take, keep or leave it, and
//! the Lease spec each step writes. No client, no clock of its own.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use std::time::{Duration, Instant};

/// The parts of a Lease an election reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// `None` or empty: nobody holds it (never taken, or released).
    pub holder: Option<String>,
    pub lease_duration: Duration,
    pub acquire_time: Option<Timestamp>,
    pub renew_time: Option<Timestamp>,
    pub transitions: i32,
}

impl Record {
    pub fn from_lease(lease: &Lease, default_duration: Duration) -> Record {
        let spec = lease.spec.clone().unwrap_or_default();
        Record {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            lease_duration: spec
                .lease_duration_seconds
                .filter(|s| *s > 0)
                .map(|s| Duration::from_secs(s as u64))
                .unwrap_or(default_duration),
            acquire_time: spec.acquire_time.map(|t| t.0),
            renew_time: spec.renew_time.map(|t| t.0),
            transitions: spec.lease_transitions.unwrap_or(0),
        }
    }
}

/// What a candidate should do after reading the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Take the Lease: it does not exist, is free, or has expired.
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds a live Lease; it expires in `expires_in` unless renewed.
    Standby {
        holder: String,
        expires_in: Duration,
    },
}

/// A candidate's view of the Lease over time: the last record it saw and when (by its own
/// monotonic clock) that record first appeared.
#[derive(Clone, Debug)]
pub struct Elector {
    identity: String,
    observed: Option<(Record, Instant)>,
}

impl Elector {
    pub fn new(identity: impl Into<String>) -> Self {
        Self {
            identity: identity.into(),
            observed: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Records a read of the Lease (`None`: it does not exist) made at `now`, and decides.
    pub fn observe(&mut self, record: Option<&Record>, now: Instant) -> Decision {
        let Some(record) = record else {
            self.observed = None;
            return Decision::Acquire;
        };
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|(seen, _)| seen != record);
        if changed {
            self.observed = Some((record.clone(), now));
        }
        let seen_at = self.observed.as_ref().map(|(_, at)| *at).unwrap_or(now);
        match &record.holder {
            None => Decision::Acquire,
            Some(holder) if *holder == self.identity => Decision::Renew,
            Some(holder) => {
                let expires = seen_at + record.lease_duration;
                if now >= expires {
                    Decision::Acquire
                } else {
                    Decision::Standby {
                        holder: holder.clone(),
                        expires_in: expires - now,
                    }
                }
            }
        }
    }
}

/// The spec that takes the Lease for `identity` at `now`.
pub fn acquired_spec(
    previous: Option<&Record>,
    identity: &str,
    lease_duration: Duration,
    now: Timestamp,
) -> LeaseSpec {
    let transitions = match previous {
        None => 0,
        Some(p) if p.holder.as_deref() == Some(identity) => p.transitions,
        Some(p) => p.transitions + 1,
    };
    LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(lease_duration.as_secs().max(1) as i32),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    }
}

/// The spec that renews our Lease at `now` (acquire time and transitions kept).
pub fn renewed_spec(
    previous: &Record,
    identity: &str,
    lease_duration: Duration,
    now: Timestamp,
) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(lease_duration.as_secs().max(1) as i32),
        acquire_time: previous.acquire_time.or(Some(now)).map(MicroTime),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(previous.transitions),
        ..LeaseSpec::default()
    }
}

/// The spec that gives the Lease up: no holder, a 1 s duration (as client-go releases).
pub fn released_spec(previous: &Record, now: Timestamp) -> LeaseSpec {
    LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(previous.transitions),
        ..LeaseSpec::default()
    }
}

/// The leader must step down: its last successful renewal is older than the deadline.
pub fn renew_deadline_passed(last_renewal: Instant, now: Instant, deadline: Duration) -> bool {
    now.saturating_duration_since(last_renewal) >= deadline
}

/// When a standby reads the Lease next: every retry period, and once more just after the
/// Lease would expire, so that a dead leader is replaced at expiry rather than up to a retry
/// period later.
pub fn next_attempt_in(retry_period: Duration, expires_in: Duration) -> Duration {
    retry_period.min(expires_in + Duration::from_millis(10))
}
