//! The watch caches the reconciler reads instead of the API server, and their readiness.

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Resource;
use kube::api::DynamicObject;
use kube::runtime::reflector::Store;

use super::cache::{Cache, WriterDropped};
use crate::metrics::Metrics;

/// Caches of the objects the operator manages, filled by label-filtered watches. Services and
/// NetworkPolicies have no cache of their own: the audit's caches of every one serve (one
/// watch and one copy per object; apply and prune look objects up by name and check the
/// stack label and owner reference themselves).
pub struct Stores {
    pub service_accounts: Cache<ServiceAccount>,
    pub config_maps: Cache<ConfigMap>,
    pub deployments: Cache<Deployment>,
    pub pod_disruption_budgets: Cache<PodDisruptionBudget>,
    /// Everything in stack namespaces that the violation audit looks at, managed or not:
    /// also the caches of the managed Services and NetworkPolicies.
    pub audit: AuditStores,
    /// The admission guardrails installed in the cluster, when the operator requires them
    /// (see [`RunOptions::require_guardrails`]).
    pub guardrails: Option<GuardrailStores>,
    /// Opens once every cache above has its initial list (see [`Stores::wait_ready`]).
    pub(super) ready: tokio::sync::watch::Sender<bool>,
}

/// Caches of the ValidatingAdmissionPolicies and their bindings labelled as the operator's.
pub struct GuardrailStores {
    pub policies: Store<ValidatingAdmissionPolicy>,
    pub bindings: Store<ValidatingAdmissionPolicyBinding>,
}

impl GuardrailStores {
    /// What is missing or switched off (see [`crate::admission::guardrail_problems`]).
    pub fn problems(&self) -> Vec<String> {
        fn all<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> Vec<K> {
            store.state().iter().map(|o| (**o).clone()).collect()
        }
        let (policies, bindings) = (all(&self.policies), all(&self.bindings));
        crate::admission::guardrail_problems(&policies, &bindings)
    }
}

/// Caches of every Service, Pod, Ingress and NetworkPolicy, for the violation audit.
pub struct AuditStores {
    pub services: Cache<Service>,
    pub pods: Cache<Pod>,
    pub ingresses: Cache<Ingress>,
    pub network_policies: Cache<NetworkPolicy>,
    pub namespaces: Cache<Namespace>,
    /// Gateway API routes, one cache per route kind the API server served at startup.
    pub routes: Vec<(String, Store<DynamicObject>)>,
}

impl Stores {
    /// Waits until every cache holds its initial list.
    ///
    /// Many reconciles wait here at once when the operator starts with stacks present, so they
    /// wait on one `watch` channel, not on the stores: kube-runtime's
    /// `Store::wait_until_ready` keeps only the waker of the last task that polled it, and
    /// every earlier waiter then sleeps until something unrelated wakes it (with 200 stacks
    /// present a restart stayed unready for minutes and reconciled about one stack a second).
    /// One task, [`Stores::open_when_synced`], is the only waiter on the stores themselves.
    pub(super) async fn wait_ready(&self) {
        let mut ready = self.ready.subscribe();
        // An error means the sender is gone, i.e. the operator is shutting down.
        let _ = ready.wait_for(|open| *open).await;
    }

    /// The single waiter on the stores' own readiness: opens [`Stores::wait_ready`] for
    /// everyone once each cache has had its initial list. False when a cache's writer went
    /// away first (the controller stopped before they synced); the waiters are let go then
    /// too, since nothing will fill the caches any more.
    pub(super) async fn open_when_synced(&self) -> bool {
        let mut synced = true;
        let mut note = |r: Result<(), WriterDropped>| synced &= r.is_ok();
        // kube-runtime's stores (routes, guardrails): the same, in its own error type.
        let dropped = |_| WriterDropped;
        note(self.service_accounts.wait_until_ready().await);
        note(self.config_maps.wait_until_ready().await);
        note(self.deployments.wait_until_ready().await);
        note(self.pod_disruption_budgets.wait_until_ready().await);
        note(self.audit.services.wait_until_ready().await);
        note(self.audit.pods.wait_until_ready().await);
        note(self.audit.ingresses.wait_until_ready().await);
        note(self.audit.network_policies.wait_until_ready().await);
        note(self.audit.namespaces.wait_until_ready().await);
        for (_, store) in &self.audit.routes {
            note(store.wait_until_ready().await.map_err(dropped));
        }
        if let Some(g) = &self.guardrails {
            note(g.policies.wait_until_ready().await.map_err(dropped));
            note(g.bindings.wait_until_ready().await.map_err(dropped));
        }
        self.ready.send_replace(true);
        synced
    }
}

impl Stores {
    /// Sets the cache gauges: objects and JSON bytes per kind.
    pub(super) fn export_sizes(&self, metrics: &Metrics) {
        fn one<K>(metrics: &Metrics, kind: &'static str, cache: &Cache<K>) {
            let (objects, json, packed) = cache.sizes();
            metrics.cache(kind, objects, json, packed);
        }
        // Services and NetworkPolicies: one cache serves the managed objects and the audit.
        one(metrics, "ServiceAccount", &self.service_accounts);
        one(metrics, "ConfigMap", &self.config_maps);
        one(metrics, "Deployment", &self.deployments);
        one(metrics, "PodDisruptionBudget", &self.pod_disruption_budgets);
        one(metrics, "Service", &self.audit.services);
        one(metrics, "NetworkPolicy", &self.audit.network_policies);
        one(metrics, "Pod", &self.audit.pods);
        one(metrics, "Ingress", &self.audit.ingresses);
        one(metrics, "Namespace", &self.audit.namespaces);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use kube::runtime::watcher;

    use super::*;

    /// Many reconciles wait for the caches at once when the operator restarts with stacks
    /// present: every one of them must go on when the caches are synced, not only the last
    /// to have polled (the kube-runtime store readiness future wakes only that one).
    #[tokio::test]
    async fn every_waiter_goes_on_once_the_caches_are_synced() {
        // Each cache, and a way to give it its (empty) initial list.
        let mut syncs: Vec<Box<dyn FnMut()>> = Vec::new();
        macro_rules! store {
            ($kind:ty) => {{
                let (reader, mut writer) = super::super::cache::cache::<$kind>();
                syncs.push(Box::new(move || {
                    writer.apply(watcher::Event::Init);
                    writer.apply(watcher::Event::InitDone);
                }));
                reader
            }};
        }
        let stores = Arc::new(Stores {
            service_accounts: store!(ServiceAccount),
            config_maps: store!(ConfigMap),
            deployments: store!(Deployment),
            pod_disruption_budgets: store!(PodDisruptionBudget),
            audit: AuditStores {
                services: store!(Service),
                pods: store!(Pod),
                ingresses: store!(Ingress),
                network_policies: store!(NetworkPolicy),
                namespaces: store!(Namespace),
                routes: Vec::new(),
            },
            guardrails: None,
            ready: tokio::sync::watch::Sender::new(false),
        });
        let opener = tokio::spawn({
            let stores = stores.clone();
            async move { stores.open_when_synced().await }
        });
        let waiters: Vec<_> = (0..50)
            .map(|_| {
                let stores = stores.clone();
                tokio::spawn(async move { stores.wait_ready().await })
            })
            .collect();
        // Let every waiter register before the caches fill.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            waiters.iter().all(|w| !w.is_finished()),
            "nothing is synced yet"
        );
        for sync in &mut syncs {
            sync();
        }
        // A hang guard, not a timing assertion: a lost wakeup would block forever.
        let all = async {
            opener.await.unwrap();
            for w in waiters {
                w.await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(30), all)
            .await
            .expect("every waiter must be woken once the caches are synced");
    }
}
