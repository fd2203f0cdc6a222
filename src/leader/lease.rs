//! The Lease on the API server: create, take over, renew and release it, with optimistic
//! concurrency (a write on a stale resourceVersion loses, and the loser waits).

use super::config::{Config, Error};
use super::record::{
    Decision, Elector, Record, acquired_spec, next_attempt_in, released_spec, renewed_spec,
};
use crate::names;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use std::time::{Duration, Instant};

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
pub(super) async fn acquire(api: &Api<Lease>, config: &Config, elector: &mut Elector) -> Instant {
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

pub(super) enum Renewed {
    Yes,
    TakenBy(String),
}

pub(super) async fn renew(api: &Api<Lease>, config: &Config) -> Result<Renewed, Error> {
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
pub(super) async fn release(api: &Api<Lease>, config: &Config) -> Result<bool, Error> {
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
