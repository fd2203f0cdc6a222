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
//! functions, `record.rs`) over an injected [`std::time::Instant`] and wall time; only
//! [`run_elected`] (through `lease.rs`) talks to the API server.
//!
//! # Readiness of a standby
//! A standby is *ready* (`/readyz` 200): it is doing what its role asks, and a standby that
//! never became ready would stall every rolling update of a Deployment with `maxUnavailable:
//! 0`. On becoming leader the process reports not ready until its watch caches are synced, as a
//! single operator does. `/healthz` is 200 in both roles. The gauge `opsconductor_leader` is 1
//! on the leader (and on a process without leader election) and 0 on a standby.

mod config;
mod lease;
mod record;
#[cfg(test)]
mod tests;

pub use config::{Config, ElectionArgs, Error, Timing, default_identity};
use lease::{Renewed, acquire, release, renew};
pub use record::{
    Decision, Elector, Record, acquired_spec, next_attempt_in, released_spec,
    renew_deadline_passed, renewed_spec,
};

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::Api;
use tokio_util::sync::CancellationToken;

use crate::server::Health;

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
