//! The controller: watches stacks and every kind of object it creates for them, and
//! reconciles each stack as a pipeline (see [`reconcile`]).
//!
//! Child objects are watched through label-filtered reflectors whose caches are shared with
//! the reconciler, so "is this object already as we want it?" is answered from memory and an
//! unchanged stack causes no write request at all.

mod apply;
pub mod diff;
mod reconcile;
pub mod status;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::runtime::{Controller, WatchStreamExt, controller::Action};
use kube::{Api, Client, Resource};

use crate::crd::OpsConductorStack;
use crate::metrics::Metrics;
use crate::names;
use crate::server::Health;

/// Settings of `opsconductor-operator run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub cluster_domain: String,
    /// Compare desired objects with the watch caches and write only what differs. Switched
    /// off only to measure what it saves (every reconcile then applies everything).
    pub compare_before_apply: bool,
    /// Periodic re-check of every stack, on top of the watches.
    pub resync: Duration,
    /// The cluster DNS server the gateway resolves service names with at request time
    /// (see [`crate::build::BuildOptions::dns_resolver`]).
    pub dns_resolver: Option<std::net::SocketAddr>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            cluster_domain: "cluster.local".into(),
            compare_before_apply: true,
            resync: Duration::from_secs(300),
            dns_resolver: None,
        }
    }
}

/// Caches of the objects the operator manages, filled by label-filtered watches.
pub struct Stores {
    pub service_accounts: Store<ServiceAccount>,
    pub config_maps: Store<ConfigMap>,
    pub network_policies: Store<NetworkPolicy>,
    pub deployments: Store<Deployment>,
    pub services: Store<Service>,
    pub pod_disruption_budgets: Store<PodDisruptionBudget>,
}

impl Stores {
    async fn wait_ready(&self) {
        // Errors here only mean the writer was dropped, i.e. the operator is shutting down.
        let _ = self.service_accounts.wait_until_ready().await;
        let _ = self.config_maps.wait_until_ready().await;
        let _ = self.network_policies.wait_until_ready().await;
        let _ = self.deployments.wait_until_ready().await;
        let _ = self.services.wait_until_ready().await;
        let _ = self.pod_disruption_budgets.wait_until_ready().await;
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub stores: Stores,
    pub options: RunOptions,
    applied: apply::AppliedLog,
    /// Consecutive failures per stack (namespace/name), for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
}

/// Errors of one reconcile. Each has a bounded `reason()` for metrics and Events.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot serialize an object: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the stack has no namespace")]
    NoNamespace,
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(e)) if e.code == 409 => "Conflict",
            Error::Kube(kube::Error::Api(e)) if e.code == 403 => "Forbidden",
            Error::Kube(kube::Error::Api(e)) if e.code == 422 => "Invalid",
            Error::Kube(kube::Error::Api(e)) if e.code == 429 => "Throttled",
            Error::Kube(kube::Error::Api(e)) if e.code >= 500 => "ServerError",
            Error::Kube(_) => "ApiUnavailable",
            Error::Json(_) => "Serialization",
            Error::NoNamespace => "NoNamespace",
        }
    }
}

/// Backoff of the watches after an error (an API server restart, a dropped connection):
/// 250 ms, doubling up to 4 s, reset after a success. Short on purpose: drift must be seen
/// again within seconds once the API server is back, and one operator's re-watches are light.
#[derive(Clone, Debug)]
pub struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    const FIRST: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(4);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let current = self.next;
        self.next = (current * 2).min(Self::MAX);
        Some(current)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Retry delay after `failures` consecutive failures: 1 s, 2 s, 4 s, ... capped at 5 minutes.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(9)).min(Duration::from_secs(300))
}

fn stack_key(stack: &OpsConductorStack) -> String {
    format!(
        "{}/{}",
        stack.metadata.namespace.as_deref().unwrap_or(""),
        stack.metadata.name.as_deref().unwrap_or("")
    )
}

fn error_policy(stack: Arc<OpsConductorStack>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = {
        let mut map = ctx.failures.lock().unwrap();
        let n = map.entry(stack_key(&stack)).or_default();
        *n += 1;
        *n
    };
    let delay = backoff(failures);
    tracing::warn!(stack = %stack_key(&stack), reason = error.reason(), %error, failures, retry_in = ?delay, "reconcile failed");
    ctx.metrics.inc(
        "opsconductor_reconcile_errors_total",
        &[("reason", error.reason())],
    );
    Action::requeue(delay)
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    options: RunOptions,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let managed = watcher::Config::default().labels(&format!(
        "{}={},{}",
        names::MANAGED_BY_LABEL,
        names::MANAGER,
        names::STACK_LABEL
    ));

    macro_rules! child_watch {
        ($kind:ty) => {{
            let (reader, writer) = reflector::store::<$kind>();
            let stream = watcher(Api::<$kind>::all(client.clone()), managed.clone())
                .backoff(WatchBackoff::default())
                .reflect(writer)
                .touched_objects()
                // A failing watch retries on its own backoff; its errors must not reach the
                // controller, whose trigger backoff would otherwise pause every watch.
                .filter_map(|event| async move {
                    match event {
                        Ok(object) => Some(Ok(object)),
                        Err(error) => {
                            tracing::warn!(kind = stringify!($kind), %error, "watch failed; retrying");
                            None
                        }
                    }
                });
            (reader, stream)
        }};
    }
    let (service_accounts, sa_stream) = child_watch!(ServiceAccount);
    let (config_maps, cm_stream) = child_watch!(ConfigMap);
    let (network_policies, np_stream) = child_watch!(NetworkPolicy);
    let (deployments, deploy_stream) = child_watch!(Deployment);
    let (services, svc_stream) = child_watch!(Service);
    let (pod_disruption_budgets, pdb_stream) = child_watch!(PodDisruptionBudget);

    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: names::MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        ),
        metrics: health.metrics.clone(),
        stores: Stores {
            service_accounts,
            config_maps,
            network_policies,
            deployments,
            services,
            pod_disruption_budgets,
        },
        options,
        applied: apply::AppliedLog::default(),
        failures: Mutex::default(),
    });

    {
        let ctx = ctx.clone();
        let health = health.clone();
        tokio::spawn(async move {
            ctx.stores.wait_ready().await;
            health.ready.store(true, Ordering::Relaxed);
            tracing::info!("watch caches synced");
        });
    }

    let stacks = Api::<OpsConductorStack>::all(client);
    Controller::new(stacks, watcher::Config::default().any_semantic())
        .trigger_backoff(WatchBackoff::default())
        .with_config(
            kube::runtime::controller::Config::default().debounce(Duration::from_millis(200)),
        )
        .owns_stream(sa_stream)
        .owns_stream(cm_stream)
        .owns_stream(np_stream)
        .owns_stream(deploy_stream)
        .owns_stream(svc_stream)
        .owns_stream(pdb_stream)
        .graceful_shutdown_on(shutdown)
        .run(reconcile::reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
    tracing::info!("controller stopped");
}

/// The ClusterIP of the cluster DNS Service (`kube-system/kube-dns`, the name CoreDNS keeps),
/// or None when the cluster has none.
pub async fn discover_dns(client: &Client) -> Option<std::net::SocketAddr> {
    let svc = Api::<Service>::namespaced(client.clone(), "kube-system")
        .get_opt("kube-dns")
        .await
        .ok()??;
    let ip: std::net::IpAddr = svc.spec?.cluster_ip?.parse().ok()?;
    Some(std::net::SocketAddr::new(ip, 53))
}

/// A reference to the stack for Events.
fn reference(stack: &OpsConductorStack) -> k8s_openapi::api::core::v1::ObjectReference {
    stack.object_ref(&())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_backoff_is_short_and_resets() {
        use kube::runtime::utils::Backoff as _;
        let mut b = WatchBackoff::default();
        let first: Vec<u128> = b.by_ref().take(6).map(|d| d.as_millis()).collect();
        assert_eq!(first, [250, 500, 1000, 2000, 4000, 4000]);
        b.reset();
        assert_eq!(b.next(), Some(Duration::from_millis(250)));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let s: Vec<u64> = (1..=12).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(s, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert!(backoff(100) <= Duration::from_secs(300));
    }
}
