//! Leader election with a `coordination.k8s.io/v1` Lease: of several operator replicas only
//! the holder of the Lease reconciles (and orders certificates); the others wait as standbys.
//!
//! The protocol is client-go's `leaderelection` package with a Lease lock:
//! - a candidate reads the Lease every retry period; it takes it (optimistic concurrency: an
//!   update with the Lease's resourceVersion, or a create) when nobody holds it, when the holder
//!   released it, or when the record has not changed for the lease duration *as measured by
//!   the candidate's own clock* since it first saw that record. Remote timestamps are never
//!   compared with the local clock, so clock skew between nodes cannot shorten a lease;
//! - the leader renews every retry period. When it has not renewed for the renew deadline
//!   (shorter than the lease duration), or finds someone else holding the Lease, it has lost:
//!   its work is stopped and [`run_elected`] returns [`Error::Lost`] (the process exits and is
//!   restarted as a candidate, as controller-runtime does);
//! - on shutdown (SIGTERM) the leader stops its work first, then releases the Lease (empty
//!   holder, duration 1 s), so a standby takes over at its next retry instead of after the
//!   lease duration.
//!
//! Takeover after the leader dies without releasing: the lease duration after the standby
//! last saw the Lease change (it reads the Lease every retry period, and once more right at
//! expiry). The standby sees the leader's last renewal up to one retry period after it was
//! made, so counted from the leader's death: between lease duration minus one retry period and
//! lease duration plus one retry period (13 s to 17 s with the defaults).
//!
//! The decisions are pure ([`Elector::observe`], [`renew_deadline_passed`], the `*_spec`
//! functions) over an injected [`std::time::Instant`] and wall time; only [`run_elected`] talks
//! to the API server.
//!
//! # Readiness of a standby
//! A standby is *ready* (`/readyz` 200): it is doing what its role asks, and a standby that
//! never became ready would stall every rolling update of a Deployment with `maxUnavailable:
//! 0`. On becoming leader the process reports not ready until its watch caches are synced, as a
//! single operator does. `/healthz` is 200 in both roles. The gauge `opsconductor_leader` is 1
//! on the leader (and on a process without leader election) and 0 on a standby.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::names;
use crate::server::Health;

/// The command-line flags of `run` for leader election.
#[derive(Clone, Debug, clap::Args)]
pub struct ElectionArgs {
    /// Reconcile only while holding a coordination.k8s.io Lease, so that one of several
    /// replicas works at a time (the chart turns this on). Off by default: a single process,
    /// e.g. on a developer's machine, needs no Lease and no RBAC for one.
    #[arg(long, env = "OPSC_LEADER_ELECTION")]
    pub leader_election: bool,
    /// Namespace of the Lease. Default: $POD_NAMESPACE, else the namespace of the kubeconfig
    /// context (in a pod: the service account's namespace).
    #[arg(long, env = "OPSC_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(
        long,
        env = "OPSC_LEADER_ELECTION_ID",
        default_value = "opsconductor-operator"
    )]
    pub leader_election_id: String,
    /// Seconds a standby waits after the Lease's last change before it takes the Lease over.
    #[arg(long, default_value_t = 15)]
    pub leader_election_lease_seconds: u64,
    /// Seconds the leader keeps working without a successful renewal before it steps down;
    /// less than the lease duration.
    #[arg(long, default_value_t = 10)]
    pub leader_election_renew_seconds: u64,
    /// Seconds between renewals by the leader and attempts by a standby.
    #[arg(long, default_value_t = 2)]
    pub leader_election_retry_seconds: u64,
}

/// Errors of leader election. Each has a bounded `reason()`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid leader election settings: {0}")]
    Config(String),
    #[error("leader election: Kubernetes API request on Lease {lease} failed: {source}")]
    Kube {
        lease: String,
        #[source]
        source: kube::Error,
    },
    #[error("lost the leader Lease {lease}: {why}; stopped reconciling")]
    Lost { lease: String, why: String },
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Config(_) => "InvalidConfig",
            Error::Kube { .. } => "ApiError",
            Error::Lost { .. } => "LeaseLost",
        }
    }
}

/// The timing of an election. `renew_deadline < lease_duration`, `retry_period <
/// renew_deadline`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Default for Timing {
    /// client-go's defaults: 15 s, 10 s, 2 s.
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl Timing {
    pub fn new(
        lease_duration: Duration,
        renew_deadline: Duration,
        retry_period: Duration,
    ) -> Result<Self, Error> {
        if retry_period.is_zero() {
            return Err(Error::Config("the retry period must be positive".into()));
        }
        if renew_deadline <= retry_period {
            return Err(Error::Config(format!(
                "the renew deadline ({renew_deadline:?}) must be longer than the retry period \
                 ({retry_period:?}): the leader needs more than one attempt to renew"
            )));
        }
        if lease_duration <= renew_deadline {
            return Err(Error::Config(format!(
                "the renew deadline ({renew_deadline:?}) must be shorter than the lease duration \
                 ({lease_duration:?}): the leader must stop before a standby may take over"
            )));
        }
        Ok(Self {
            lease_duration,
            renew_deadline,
            retry_period,
        })
    }
}

/// Everything an election needs.
#[derive(Clone, Debug)]
pub struct Config {
    pub namespace: String,
    pub name: String,
    /// This process's holder identity: unique per process.
    pub identity: String,
    pub timing: Timing,
}

impl Config {
    /// From the flags; `None` when leader election is off.
    pub fn from_args(args: &ElectionArgs, client: &Client) -> Result<Option<Self>, Error> {
        if !args.leader_election {
            return Ok(None);
        }
        let namespace = args
            .leader_election_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| client.default_namespace().to_string());
        let timing = Timing::new(
            Duration::from_secs(args.leader_election_lease_seconds),
            Duration::from_secs(args.leader_election_renew_seconds),
            Duration::from_secs(args.leader_election_retry_seconds),
        )?;
        Ok(Some(Self {
            namespace,
            name: args.leader_election_id.clone(),
            identity: default_identity(),
            timing,
        }))
    }

    fn lease(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// `$POD_NAME` (else the host name) and a random suffix: a restarted container must not take
/// its predecessor's Lease for its own.
pub fn default_identity() -> String {
    use std::hash::{BuildHasher, Hasher};
    let base = std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "opsconductor-operator".into());
    // RandomState is seeded from the OS's randomness.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    format!("{base}_{:08x}", hasher.finish() as u32)
}

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

/// Runs `work` — directly when `config` is `None`, else only while holding the Lease — until
/// `shutdown` resolves. `work` gets a token that is cancelled when it must stop.
///
/// With an election: waits as a standby (ready, see the module docs) until it holds the Lease
/// or `shutdown` comes first; then runs `work`, renewing in the background. On shutdown it
/// waits for `work` to finish and releases the Lease. When the Lease is lost, `work` is asked
/// to stop, given what is left of the lease duration to do so, and [`Error::Lost`] is
/// returned.
pub async fn run_elected<W, Fut>(
    client: &Client,
    config: Option<Config>,
    health: &Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    work: W,
) -> Result<(), Error>
where
    W: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = ()>,
{
    // Cancelled on shutdown. `stop`, its child, is also cancelled when the Lease is lost.
    let shutting_down = CancellationToken::new();
    let stop = shutting_down.child_token();
    tokio::spawn({
        let shutting_down = shutting_down.clone();
        async move {
            shutdown.await;
            shutting_down.cancel();
        }
    });
    let Some(config) = config else {
        // Without an election this process is the only one, so it leads.
        set_leader(health, true);
        work(stop).await;
        return Ok(());
    };
    let api: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
    let lease = config.lease();
    let mut elector = Elector::new(config.identity.clone());

    set_leader(health, false);
    // A standby is ready: see the module docs.
    health.ready.store(true, Ordering::Relaxed);
    tracing::info!(%lease, identity = %config.identity, "leader election: waiting for the Lease");
    let acquired = tokio::select! {
        acquired = acquire(&api, &config, &mut elector) => acquired,
        _ = shutting_down.cancelled() => {
            tracing::info!(%lease, "shutting down as a standby");
            return Ok(());
        }
    };
    let mut last_renewal = acquired;
    set_leader(health, true);
    // Not ready until the controller's caches have synced.
    health.ready.store(false, Ordering::Relaxed);
    tracing::info!(%lease, identity = %config.identity, "leader election: acquired the Lease; starting the controller");

    // Renews until it cannot; then says why, and the work is stopped.
    let mut renewer = {
        let (api, config) = (api.clone(), config.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(config.timing.retry_period).await;
                let left = config
                    .timing
                    .renew_deadline
                    .saturating_sub(last_renewal.elapsed());
                if renew_deadline_passed(last_renewal, Instant::now(), config.timing.renew_deadline)
                {
                    return format!(
                        "no successful renewal for {:?} (the renew deadline)",
                        config.timing.renew_deadline
                    );
                }
                match tokio::time::timeout(left, renew(&api, &config)).await {
                    Ok(Ok(Renewed::Yes)) => last_renewal = Instant::now(),
                    Ok(Ok(Renewed::TakenBy(holder))) => {
                        return format!("{holder} holds it now");
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(lease = %config.lease(), %error, "cannot renew the Lease; retrying");
                    }
                    Err(_) => {}
                }
            }
        })
    };
    let lost = |ended: Result<String, tokio::task::JoinError>| {
        ended.unwrap_or_else(|e| format!("the renewal task ended: {e}"))
    };

    let work = work(stop.clone());
    tokio::pin!(work);
    let mut why = tokio::select! {
        _ = &mut work => None,
        ended = &mut renewer => Some(lost(ended)),
    };
    if why.is_some() {
        stop.cancel();
        // The work gets what is left of the lease duration to stop: after that a standby may
        // already be reconciling.
        let grace = config
            .timing
            .lease_duration
            .saturating_sub(config.timing.renew_deadline);
        if tokio::time::timeout(grace, &mut work).await.is_err() {
            tracing::error!(%lease, "the controller did not stop within {grace:?} after the Lease was lost");
        }
    } else if renewer.is_finished() {
        // Lost at the moment the work ended.
        why = Some(lost((&mut renewer).await));
    }
    renewer.abort();
    set_leader(health, false);
    if let Some(why) = why {
        return Err(Error::Lost { lease, why });
    }
    match release(&api, &config).await {
        Ok(true) => tracing::info!(%lease, "released the Lease for a fast handover"),
        Ok(false) => tracing::warn!(%lease, "the Lease was no longer ours to release"),
        Err(error) => {
            tracing::warn!(%lease, %error, "cannot release the Lease; it expires on its own")
        }
    }
    Ok(())
}

fn set_leader(health: &Health, leader: bool) {
    health.metrics.set_leader(leader);
}

fn kube_error(config: &Config) -> impl Fn(kube::Error) -> Error + '_ {
    move |source| Error::Kube {
        lease: config.lease(),
        source,
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn lease_object(config: &Config, spec: LeaseSpec, resource_version: Option<String>) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            namespace: Some(config.namespace.clone()),
            resource_version,
            labels: Some(
                [(
                    names::MANAGED_BY_LABEL.to_string(),
                    names::MANAGER.to_string(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
    }
}

fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(names::MANAGER.into()),
        ..PostParams::default()
    }
}

/// Tries every retry period until this process holds the Lease; returns when it took it.
async fn acquire(api: &Api<Lease>, config: &Config, elector: &mut Elector) -> Instant {
    let mut last_holder: Option<String> = None;
    let mut last_error: Option<String> = None;
    loop {
        let mut wait = config.timing.retry_period;
        match try_acquire(api, config, elector).await {
            Ok(Attempt::Acquired(at)) => return at,
            Ok(Attempt::Standby { holder, expires_in }) => {
                // Look again right when the Lease would expire, not up to a retry period later.
                wait = next_attempt_in(config.timing.retry_period, expires_in);
                last_error = None;
                if last_holder.as_ref() != Some(&holder) {
                    tracing::info!(lease = %config.lease(), %holder, ?expires_in, "standby: another replica leads");
                    last_holder = Some(holder);
                }
            }
            Ok(Attempt::Raced) => {}
            Err(error) => {
                // Said once per distinct message, not every retry period.
                let message = error.to_string();
                if last_error.as_ref() != Some(&message) {
                    tracing::error!(reason = error.reason(), %error, "leader election: cannot read or take the Lease; retrying");
                    last_error = Some(message);
                }
            }
        }
        tokio::time::sleep(wait).await;
    }
}

/// When a standby reads the Lease next: every retry period, and once more just after the
/// Lease would expire, so that a dead leader is replaced at expiry rather than up to a retry
/// period later.
pub fn next_attempt_in(retry_period: Duration, expires_in: Duration) -> Duration {
    retry_period.min(expires_in + Duration::from_millis(10))
}

enum Attempt {
    Acquired(Instant),
    Standby {
        holder: String,
        expires_in: Duration,
    },
    /// Someone else wrote the Lease between our read and our write.
    Raced,
}

async fn try_acquire(
    api: &Api<Lease>,
    config: &Config,
    elector: &mut Elector,
) -> Result<Attempt, Error> {
    let err = kube_error(config);
    let current = api.get_opt(&config.name).await.map_err(&err)?;
    let now = Instant::now();
    let record = current
        .as_ref()
        .map(|l| Record::from_lease(l, config.timing.lease_duration));
    match elector.observe(record.as_ref(), now) {
        Decision::Standby { holder, expires_in } => Ok(Attempt::Standby { holder, expires_in }),
        Decision::Acquire | Decision::Renew => {
            let spec = acquired_spec(
                record.as_ref(),
                &config.identity,
                config.timing.lease_duration,
                Timestamp::now(),
            );
            let result = match &current {
                None => {
                    api.create(&post_params(), &lease_object(config, spec, None))
                        .await
                }
                Some(lease) => {
                    api.replace(
                        &config.name,
                        &post_params(),
                        &lease_object(config, spec, lease.resource_version()),
                    )
                    .await
                }
            };
            match result {
                Ok(_) => Ok(Attempt::Acquired(now)),
                Err(e) if is_conflict(&e) => Ok(Attempt::Raced),
                Err(e) => Err(err(e)),
            }
        }
    }
}

enum Renewed {
    Yes,
    TakenBy(String),
}

async fn renew(api: &Api<Lease>, config: &Config) -> Result<Renewed, Error> {
    let err = kube_error(config);
    loop {
        let lease = api.get(&config.name).await.map_err(&err)?;
        let record = Record::from_lease(&lease, config.timing.lease_duration);
        if record.holder.as_deref() != Some(config.identity.as_str()) {
            return Ok(Renewed::TakenBy(
                record.holder.unwrap_or_else(|| "nobody".into()),
            ));
        }
        let spec = renewed_spec(
            &record,
            &config.identity,
            config.timing.lease_duration,
            Timestamp::now(),
        );
        match api
            .replace(
                &config.name,
                &post_params(),
                &lease_object(config, spec, lease.resource_version()),
            )
            .await
        {
            Ok(_) => return Ok(Renewed::Yes),
            // Written in between (by us, or by a taker): read again.
            Err(e) if is_conflict(&e) => continue,
            Err(e) => return Err(err(e)),
        }
    }
}

/// Gives the Lease up if we still hold it; Ok(false) when someone else does.
async fn release(api: &Api<Lease>, config: &Config) -> Result<bool, Error> {
    let err = kube_error(config);
    let lease = api.get(&config.name).await.map_err(&err)?;
    let record = Record::from_lease(&lease, config.timing.lease_duration);
    if record.holder.as_deref() != Some(config.identity.as_str()) {
        return Ok(false);
    }
    api.replace(
        &config.name,
        &post_params(),
        &lease_object(
            config,
            released_spec(&record, Timestamp::now()),
            lease.resource_version(),
        ),
    )
    .await
    .map_err(&err)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn held_by(holder: &str, renewed_at: i64) -> Record {
        Record {
            holder: Some(holder.into()),
            lease_duration: S(15),
            acquire_time: Some(Timestamp::from_second(1_000).unwrap()),
            renew_time: Some(Timestamp::from_second(renewed_at).unwrap()),
            transitions: 3,
        }
    }

    #[test]
    fn a_missing_or_free_lease_is_taken_at_once() {
        let t0 = Instant::now();
        let mut e = Elector::new("me");
        assert_eq!(e.observe(None, t0), Decision::Acquire);
        let released = Record {
            holder: None,
            ..held_by("other", 1_000)
        };
        assert_eq!(e.observe(Some(&released), t0), Decision::Acquire);
        let empty = Record {
            holder: Some(String::new()),
            ..held_by("other", 1_000)
        };
        // An empty holder string reads as None when parsed from a Lease.
        let lease = Lease {
            spec: Some(LeaseSpec {
                holder_identity: empty.holder.clone(),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        };
        assert_eq!(Record::from_lease(&lease, S(15)).holder, None);
    }

    #[test]
    fn a_live_lease_is_left_alone_until_it_has_not_changed_for_its_duration() {
        let t0 = Instant::now();
        let mut e = Elector::new("me");
        let r = held_by("other", 1_000);
        assert_eq!(
            e.observe(Some(&r), t0),
            Decision::Standby {
                holder: "other".into(),
                expires_in: S(15)
            }
        );
        // The same record 14 s later: still standing by, 1 s left.
        assert_eq!(
            e.observe(Some(&r), t0 + S(14)),
            Decision::Standby {
                holder: "other".into(),
                expires_in: S(1)
            }
        );
        // Unchanged for the full duration, by our clock: take it.
        assert_eq!(e.observe(Some(&r), t0 + S(15)), Decision::Acquire);
    }

    #[test]
    fn every_renewal_restarts_the_standbys_clock() {
        let t0 = Instant::now();
        let mut e = Elector::new("me");
        let mut at = t0;
        for renewal in 0..20 {
            let r = held_by("other", 1_000 + renewal * 2);
            assert!(matches!(e.observe(Some(&r), at), Decision::Standby { .. }));
            at += S(2);
        }
        // The leader died after the last renewal, seen at `at - 2 s`: the standby waits the
        // full duration from that sighting, not from the record's own timestamp.
        let last = held_by("other", 1_000 + 19 * 2);
        assert!(matches!(
            e.observe(Some(&last), at - S(2) + S(14)),
            Decision::Standby { .. }
        ));
        assert_eq!(e.observe(Some(&last), at - S(2) + S(15)), Decision::Acquire);
    }

    #[test]
    fn remote_timestamps_are_not_trusted() {
        // A renewTime far in the past (a skewed clock on the leader's node) does not make the
        // lease look expired: only the local observation counts.
        let t0 = Instant::now();
        let mut e = Elector::new("me");
        let skewed = held_by("other", 0);
        assert!(matches!(
            e.observe(Some(&skewed), t0),
            Decision::Standby { .. }
        ));
    }

    #[test]
    fn our_own_lease_is_renewed() {
        let mut e = Elector::new("me");
        assert_eq!(
            e.observe(Some(&held_by("me", 1_000)), Instant::now()),
            Decision::Renew
        );
    }

    #[test]
    fn a_shorter_lease_duration_in_the_record_wins() {
        // A released lease carries duration 1 s; a holder may also ask for less than ours.
        let t0 = Instant::now();
        let mut e = Elector::new("me");
        let r = Record {
            lease_duration: S(1),
            ..held_by("other", 1_000)
        };
        assert!(matches!(e.observe(Some(&r), t0), Decision::Standby { .. }));
        assert_eq!(e.observe(Some(&r), t0 + S(1)), Decision::Acquire);
    }

    #[test]
    fn specs_count_transitions_and_keep_the_acquire_time() {
        let now = Timestamp::from_second(2_000).unwrap();
        let fresh = acquired_spec(None, "me", S(15), now);
        assert_eq!(fresh.holder_identity.as_deref(), Some("me"));
        assert_eq!(fresh.lease_transitions, Some(0));
        assert_eq!(fresh.lease_duration_seconds, Some(15));
        assert_eq!(fresh.acquire_time, Some(MicroTime(now)));

        let taken = acquired_spec(Some(&held_by("other", 1_000)), "me", S(15), now);
        assert_eq!(taken.lease_transitions, Some(4));

        let mine = held_by("me", 1_000);
        let renewed = renewed_spec(&mine, "me", S(15), now);
        assert_eq!(renewed.lease_transitions, Some(3));
        assert_eq!(renewed.acquire_time, mine.acquire_time.map(MicroTime));
        assert_eq!(renewed.renew_time, Some(MicroTime(now)));

        let released = released_spec(&mine, now);
        assert_eq!(released.holder_identity, None);
        assert_eq!(released.lease_duration_seconds, Some(1));
        assert_eq!(released.lease_transitions, Some(3));
        // After a release, the next taker counts one more transition.
        let record = Record::from_lease(
            &Lease {
                spec: Some(released),
                ..Lease::default()
            },
            S(15),
        );
        assert_eq!(
            acquired_spec(Some(&record), "next", S(15), now).lease_transitions,
            Some(4)
        );
    }

    #[test]
    fn a_standby_looks_again_right_at_expiry() {
        assert_eq!(next_attempt_in(S(2), S(15)), S(2));
        assert_eq!(
            next_attempt_in(S(2), Duration::from_millis(700)),
            Duration::from_millis(710)
        );
        assert_eq!(
            next_attempt_in(S(2), Duration::ZERO),
            Duration::from_millis(10)
        );
    }

    #[test]
    fn the_leader_steps_down_at_the_renew_deadline() {
        let t0 = Instant::now();
        assert!(!renew_deadline_passed(t0, t0 + S(9), S(10)));
        assert!(renew_deadline_passed(t0, t0 + S(10), S(10)));
        // A clock that went backwards is not a passed deadline.
        assert!(!renew_deadline_passed(t0 + S(5), t0, S(10)));
    }

    #[test]
    fn timing_must_let_the_leader_stop_before_a_standby_starts() {
        assert!(Timing::new(S(15), S(10), S(2)).is_ok());
        assert_eq!(Timing::default(), Timing::new(S(15), S(10), S(2)).unwrap());
        let e = Timing::new(S(10), S(10), S(2)).unwrap_err();
        assert!(
            e.to_string().contains("shorter than the lease duration"),
            "{e}"
        );
        assert!(Timing::new(S(15), S(2), S(2)).is_err());
        assert!(Timing::new(S(15), S(10), S(0)).is_err());
    }

    #[test]
    fn identities_are_unique_per_process_start() {
        let a = default_identity();
        let b = default_identity();
        assert_ne!(a, b);
        assert!(a.contains('_'));
    }
}
