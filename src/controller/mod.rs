//! The controller: watches stacks and every kind of object it creates for them, and
//! reconciles each stack as a pipeline (see [`reconcile`]).
//!
//! Child objects are watched through label-filtered reflectors whose caches are shared with
//! the reconciler, so "is this object already as we want it?" is answered from memory and an
//! unchanged stack causes no write request at all.

mod apply;
pub mod compact;
pub mod diff;
pub mod janitor;
mod reconcile;
pub mod scope;
mod slim;
pub mod status;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::DynamicObject;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::runtime::{Controller, WatchStreamExt, controller::Action};
use kube::{Api, Client, Resource, ResourceExt};

use crate::crd::OpsConductorStack;
use crate::metrics::Metrics;
use crate::names;
use crate::server::Health;
use compact::Compact;

/// Settings of `opsconductor-operator run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub cluster_domain: String,
    /// Compare desired objects with the watch caches and write only what differs. Switched
    /// off only to measure what it saves (every reconcile then applies everything).
    pub compare_before_apply: bool,
    /// Periodic re-check of every stack, on top of the watches.
    pub resync: Duration,
    /// Stacks reconciled at the same time.
    pub max_concurrent_reconciles: u16,
    /// The operator's own namespace (`POD_NAMESPACE`, set by the chart), for the gateway
    /// NetworkPolicy rule that lets the ACME self-check through `allowedSourceRanges`.
    pub operator_namespace: Option<String>,
    /// Report `PolicyEnforced=True` only while the admission guardrails
    /// ([`crate::admission`]) are installed and bound (`--admission-guardrails require`);
    /// `false` when they are deliberately not installed (the chart's `admission.enabled=false`).
    pub require_guardrails: bool,
    /// Accept ACME directory URLs on loopback addresses (`--allow-loopback-acme-directory`:
    /// a test CA on the operator's own machine); see
    /// [`crate::validate::directory_url_problems`].
    pub allow_loopback_acme_directory: bool,
    /// Gateway images stacks may use (`--allowed-gateway-images`); empty: any. See
    /// [`crate::validate::gateway_image_problems`].
    pub allowed_gateway_images: Vec<String>,
    /// The cluster's own address ranges (`--cluster-cidrs`); see
    /// [`crate::build::BuildOptions::cluster_cidrs`].
    pub cluster_cidrs: Vec<ipnet::IpNet>,
    /// The namespaces served (`--watch-namespaces`); see [`scope`].
    pub scope: scope::Scope,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            cluster_domain: "cluster.local".into(),
            compare_before_apply: true,
            resync: Duration::from_secs(300),
            max_concurrent_reconciles: 8,
            operator_namespace: None,
            require_guardrails: true,
            allow_loopback_acme_directory: false,
            allowed_gateway_images: Vec::new(),
            cluster_cidrs: Vec::new(),
            scope: scope::Scope::Cluster,
        }
    }
}

/// Caches of the objects the operator manages, filled by label-filtered watches (Services
/// and NetworkPolicies: the audit's caches of every one, see `run`).
pub struct Stores {
    pub service_accounts: Store<Compact<ServiceAccount>>,
    pub config_maps: Store<Compact<ConfigMap>>,
    pub network_policies: Store<Compact<NetworkPolicy>>,
    pub deployments: Store<Compact<Deployment>>,
    pub services: Store<Compact<Service>>,
    pub pod_disruption_budgets: Store<Compact<PodDisruptionBudget>>,
    /// Everything in stack namespaces that the violation audit looks at, managed or not.
    pub audit: AuditStores,
    /// The admission guardrails installed in the cluster, when the operator requires them
    /// (see [`RunOptions::require_guardrails`]).
    pub guardrails: Option<GuardrailStores>,
    /// Opens once every cache above has its initial list (see [`Stores::wait_ready`]).
    ready: tokio::sync::watch::Sender<bool>,
}

/// Caches of the ValidatingAdmissionPolicies and their bindings labelled as the operator's.
pub struct GuardrailStores {
    pub policies: Store<ValidatingAdmissionPolicy>,
    pub bindings: Store<ValidatingAdmissionPolicyBinding>,
}

impl GuardrailStores {
    /// What is missing or switched off (see [`crate::admission::guardrail_problems`]).
    pub fn problems(&self) -> Vec<String> {
        let policies: Vec<_> = self
            .policies
            .state()
            .iter()
            .map(|p| (**p).clone())
            .collect();
        let bindings: Vec<_> = self
            .bindings
            .state()
            .iter()
            .map(|b| (**b).clone())
            .collect();
        crate::admission::guardrail_problems(&policies, &bindings)
    }
}

/// Caches of every Service, Pod, Ingress and NetworkPolicy, for the violation audit.
pub struct AuditStores {
    pub services: Store<Compact<Service>>,
    pub pods: Store<Compact<Pod>>,
    pub ingresses: Store<Compact<Ingress>>,
    pub network_policies: Store<Compact<NetworkPolicy>>,
    pub namespaces: Store<Compact<Namespace>>,
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
    async fn wait_ready(&self) {
        let mut ready = self.ready.subscribe();
        // An error means the sender is gone, i.e. the operator is shutting down.
        let _ = ready.wait_for(|open| *open).await;
    }

    /// The single waiter on the stores' own readiness: opens [`Stores::wait_ready`] for
    /// everyone once each cache has had its initial list.
    async fn open_when_synced(&self) {
        // Errors here only mean the writer was dropped, i.e. the operator is shutting down.
        // (`services` and `network_policies` are the audit's caches, awaited below.)
        let _ = self.service_accounts.wait_until_ready().await;
        let _ = self.config_maps.wait_until_ready().await;
        let _ = self.deployments.wait_until_ready().await;
        let _ = self.pod_disruption_budgets.wait_until_ready().await;
        let _ = self.audit.services.wait_until_ready().await;
        let _ = self.audit.pods.wait_until_ready().await;
        let _ = self.audit.ingresses.wait_until_ready().await;
        let _ = self.audit.network_policies.wait_until_ready().await;
        let _ = self.audit.namespaces.wait_until_ready().await;
        for (_, store) in &self.audit.routes {
            let _ = store.wait_until_ready().await;
        }
        if let Some(g) = &self.guardrails {
            let _ = g.policies.wait_until_ready().await;
            let _ = g.bindings.wait_until_ready().await;
        }
        self.ready.send_replace(true);
    }
}

impl Stores {
    /// Sets the cache gauges: objects and JSON bytes per kind.
    fn export_sizes(&self, metrics: &Metrics) {
        fn one<K>(metrics: &Metrics, kind: &'static str, store: &Store<Compact<K>>)
        where
            K: Resource<DynamicType = ()>
                + serde::Serialize
                + serde::de::DeserializeOwned
                + compact::Slim,
        {
            let state = store.state();
            let bytes: usize = state.iter().map(|o| o.json_len()).sum();
            metrics.cache(kind, state.len(), bytes);
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

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub stores: Stores,
    pub options: RunOptions,
    /// The controller's own cache of stacks (to find the stacks of a namespace).
    pub stacks: Store<OpsConductorStack>,
    /// ACME issuance and renewal of the gateway certificates.
    pub acme: crate::acme::Manager,
    applied: apply::AppliedLog,
    /// Consecutive failures per stack (namespace/name), for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The violations last announced by Events, per stack, so none is announced twice.
    announced_violations: Mutex<HashMap<String, Vec<crate::crd::Violation>>>,
    /// The namespace markers written lately: namespace -> (the label as the write left it,
    /// the Namespace's resourceVersion after it), until the namespace cache has caught up.
    markers_written: Mutex<HashMap<String, (Option<String>, String)>>,
    /// The generation of each stack (namespace/name) this process last applied in full, so
    /// that a stack cache that has not yet seen the status write does not hide convergence.
    applied_generations: Mutex<HashMap<String, i64>>,
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
    #[error(
        "the admission marker of namespace {namespace} is still {found:?} after our write (is it held by another field manager?)"
    )]
    MarkerNotApplied {
        namespace: String,
        found: Option<String>,
    },
    #[error("{0}")]
    Certificate(crate::acme::Error),
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
            Error::MarkerNotApplied { .. } => "MarkerNotApplied",
            Error::Certificate(e) => e.reason(),
        }
    }
}

/// A Kubernetes API error of the certificate's is one like any other (the same reasons).
impl From<crate::acme::Error> for Error {
    fn from(e: crate::acme::Error) -> Error {
        match e {
            crate::acme::Error::Kube(e) => Error::Kube(e),
            e => Error::Certificate(e),
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
    ctx.metrics.reconcile_error(error.reason());
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
        ($kind:ty) => {
            child_watch!($kind, managed.clone())
        };
        ($kind:ty, $config:expr) => {
            child_watch!($kind, $config, |reader| options.scope.watch(
                |ns| match ns {
                    Some(ns) => Api::<Compact<$kind>>::namespaced(client.clone(), ns),
                    None => Api::<Compact<$kind>>::all(client.clone()),
                },
                $config,
                reader,
            ))
        };
        ($kind:ty, $config:expr, $watch:expr) => {{
            // Cached compactly: see `compact` (managedFields and what `Slim` drops are gone
            // before an object is kept).
            let (reader, writer) = reflector::store::<Compact<$kind>>();
            // Over the scope: cluster-wide, or one watch per namespace merged (see `scope`).
            let stream = ($watch)(reader.clone())
                .reflect(writer)
                // Only changes of what the cache keeps trigger a reconcile (see `Changes`).
                .filter_map({
                    let mut changes = Changes::default();
                    move |event| {
                        let out = match event {
                            Ok(event) => changes.triggers(event).map(Ok),
                            // A failing watch retries on its own backoff; its errors must not
                            // reach the controller, whose trigger backoff would otherwise
                            // pause every watch.
                            Err(error) => {
                                tracing::warn!(kind = stringify!($kind), %error, "watch failed; retrying");
                                None
                            }
                        };
                        std::future::ready(out)
                    }
                });
            (reader, stream)
        }};
    }
    let (service_accounts, sa_stream) = child_watch!(ServiceAccount);
    let (config_maps, cm_stream) = child_watch!(ConfigMap);
    let (deployments, deploy_stream) = child_watch!(Deployment);
    let (pod_disruption_budgets, pdb_stream) = child_watch!(PodDisruptionBudget);
    // The audit sees everything in the namespaces, not only what the operator manages. Its
    // Service and NetworkPolicy caches hold the managed ones too and serve as their caches:
    // one watch and one copy per object (apply and prune look objects up by name and check
    // the stack label and owner reference themselves).
    let everything = watcher::Config::default().any_semantic();
    let (audit_services, audit_svc_stream) = child_watch!(Service, everything.clone());
    let (audit_pods, audit_pod_stream) = child_watch!(Pod, everything.clone());
    let (audit_ingresses, audit_ing_stream) = child_watch!(Ingress, everything.clone());
    let (audit_policies, audit_np_stream) = child_watch!(NetworkPolicy, everything.clone());
    let (services, network_policies) = (audit_services.clone(), audit_policies.clone());
    let (namespaces, ns_stream) = child_watch!(Namespace, everything.clone(), |reader| {
        options.scope.watch_namespaces(
            Api::<Compact<Namespace>>::all(client.clone()),
            everything.clone(),
            reader,
        )
    });
    // The stacks, over the scope like everything else.
    let (stack_store, stack_writer) = reflector::store::<OpsConductorStack>();
    let stack_stream = options
        .scope
        .watch(
            |ns| match ns {
                Some(ns) => Api::<OpsConductorStack>::namespaced(client.clone(), ns),
                None => Api::<OpsConductorStack>::all(client.clone()),
            },
            watcher::Config::default().any_semantic(),
            stack_store.clone(),
        )
        .reflect(stack_writer)
        .applied_objects();
    let mut controller = Controller::for_stream(stack_stream, stack_store.clone());
    // An object anywhere in a namespace concerns every stack of that namespace.
    let in_namespace = {
        let stack_store = stack_store.clone();
        move |namespace: Option<String>| {
            stack_store
                .state()
                .into_iter()
                .filter(|s| s.metadata.namespace == namespace)
                .map(|s| ObjectRef::from_obj(&*s))
                .collect::<Vec<_>>()
        }
    };
    // Gateway API routes are watched when the API server serves them at startup (restart the
    // operator after installing the Gateway API).
    let mut routes = Vec::new();
    for (kind, resource) in served_route_kinds(&client).await {
        let writer = reflector::store::Writer::new(resource.clone());
        let reader = writer.as_reader();
        let stream = options
            .scope
            .watch(
                |ns| match ns {
                    Some(ns) => {
                        Api::<DynamicObject>::namespaced_with(client.clone(), ns, &resource)
                    }
                    None => Api::<DynamicObject>::all_with(client.clone(), &resource),
                },
                everything.clone(),
                reader.clone(),
            )
            .modify(|o| o.managed_fields_mut().clear())
            .reflect(writer)
            .touched_objects()
            .filter_map(|event| async move {
                event
                    .map_err(|e| tracing::warn!(error = %e, "route watch failed; retrying"))
                    .ok()
                    .map(Ok)
            });
        let mapper = in_namespace.clone();
        controller = controller.watches_stream_with(
            stream,
            move |o: DynamicObject| mapper(o.metadata.namespace.clone()),
            resource,
        );
        tracing::info!(%kind, "watching Gateway API routes for the violation audit");
        routes.push((kind, reader));
    }

    // The admission guardrails, when required: any change of them concerns every stack's
    // PolicyEnforced condition.
    let guardrails = if options.require_guardrails {
        let config = watcher::Config::default().labels(&format!(
            "{}={}",
            names::PART_OF_LABEL,
            names::PART_OF
        ));
        macro_rules! guardrail_watch {
            ($kind:ty) => {{
                let (reader, writer) = reflector::store::<$kind>();
                let stream = watcher(Api::<$kind>::all(client.clone()), config.clone())
                    .backoff(WatchBackoff::default())
                    .modify(|o| o.managed_fields_mut().clear())
                    .reflect(writer)
                    .touched_objects()
                    .filter_map(|event| async move {
                        event
                            .map_err(|e| {
                                tracing::warn!(kind = stringify!($kind), error = %e, "guardrail watch failed; retrying")
                            })
                            .ok()
                            .map(Ok)
                    });
                let all = stack_store.clone();
                controller = controller.watches_stream(stream, move |_| {
                    all.state()
                        .iter()
                        .map(|s| ObjectRef::from_obj(&**s))
                        .collect::<Vec<_>>()
                });
                reader
            }};
        }
        let policies = guardrail_watch!(ValidatingAdmissionPolicy);
        let bindings = guardrail_watch!(ValidatingAdmissionPolicyBinding);
        tracing::info!("PolicyEnforced requires the admission guardrails to be installed");
        Some(GuardrailStores { policies, bindings })
    } else {
        tracing::info!(
            "admission guardrails not required (--admission-guardrails ignore): PolicyEnforced \
             does not check them"
        );
        None
    };

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
            audit: AuditStores {
                services: audit_services,
                pods: audit_pods,
                ingresses: audit_ingresses,
                network_policies: audit_policies,
                namespaces,
                routes,
            },
            guardrails,
            ready: tokio::sync::watch::Sender::new(false),
        },
        acme: crate::acme::Manager::new(
            crate::acme::Config {
                allow_loopback_directory: options.allow_loopback_acme_directory,
                ..crate::acme::Config::from_env(&options.cluster_domain)
            },
            health.metrics.clone(),
        ),
        options,
        stacks: stack_store.clone(),
        applied: apply::AppliedLog::default(),
        failures: Mutex::default(),
        announced_violations: Mutex::default(),
        markers_written: Mutex::default(),
        applied_generations: Mutex::default(),
    });

    // Tasks that live as long as this controller: aborted when `run` returns or is dropped
    // (e.g. on losing the leadership), so that they neither write nor keep the caches alive.
    let mut tasks = AbortOnDrop::default();
    {
        let ctx = ctx.clone();
        let health = health.clone();
        tasks.0.push(tokio::spawn(async move {
            ctx.stores.open_when_synced().await;
            // The initial lists are behind us: hand what they left free back to the kernel.
            crate::memory::release_free_memory();
            health.ready.store(true, Ordering::Relaxed);
            tracing::info!("watch caches synced");
            loop {
                ctx.stores.export_sizes(&ctx.metrics);
                tokio::time::sleep(Duration::from_secs(15)).await;
            }
        }));
    }

    let (n1, n2, n3, n4) = (
        in_namespace.clone(),
        in_namespace.clone(),
        in_namespace.clone(),
        in_namespace.clone(),
    );
    tasks.0.push(tokio::spawn(janitor::run(ctx.clone())));
    controller
        .trigger_backoff(WatchBackoff::default())
        .with_config(
            kube::runtime::controller::Config::default()
                .debounce(Duration::from_millis(200))
                .concurrency(ctx.options.max_concurrent_reconciles),
        )
        .owns_stream(sa_stream)
        .owns_stream(cm_stream)
        .owns_stream(deploy_stream)
        .owns_stream(pdb_stream)
        .watches_stream(audit_svc_stream, move |o| n1(o.namespace()))
        .watches_stream(audit_pod_stream, move |o| n2(o.namespace()))
        .watches_stream(audit_ing_stream, move |o| n3(o.namespace()))
        .watches_stream(audit_np_stream, move |o| n4(o.namespace()))
        // Namespaces only feed the cache (for the admission marker); they trigger nothing.
        .watches_stream(ns_stream, |_| Vec::<ObjectRef<OpsConductorStack>>::new())
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

/// Which watch events are worth a reconcile: an object that appears or goes, or one whose
/// cached content changed. A Pod's status, a Deployment's conditions or a managedFields-only
/// update change nothing the operator reads (the cache drops them), so they trigger nothing;
/// without this filter every pod status update in a stack namespace would reconcile the
/// stack, and a namespace busy enough would keep pushing the debounced reconcile back.
#[derive(Default)]
struct Changes {
    /// Content hash of every object seen, by namespace/name.
    seen: HashMap<(Option<String>, String), u64>,
}

impl Changes {
    fn triggers<K>(&mut self, event: watcher::Event<Compact<K>>) -> Option<Compact<K>>
    where
        K: Resource + serde::Serialize + serde::de::DeserializeOwned + compact::Slim,
    {
        let key = |o: &Compact<K>| (o.namespace(), o.name_any());
        match event {
            watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                let hash = o.content_hash();
                let before = self.seen.insert(key(&o), hash);
                (before != Some(hash)).then_some(o)
            }
            watcher::Event::Delete(o) => {
                self.seen.remove(&key(&o));
                Some(o)
            }
            // A (re)list starts over: what vanished meanwhile leaves no stale entry behind.
            watcher::Event::Init => {
                self.seen.clear();
                None
            }
            watcher::Event::InitDone => None,
        }
    }
}

/// Aborts its tasks when dropped.
#[derive(Default)]
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// The Gateway API route kinds the API server serves, in their preferred version.
async fn served_route_kinds(client: &Client) -> Vec<(String, kube::discovery::ApiResource)> {
    let groups: Vec<&str> = crate::audit::GATEWAY_ROUTE_KINDS
        .iter()
        .map(|(g, _, _)| *g)
        .collect();
    let discovery = match kube::Discovery::new(client.clone())
        .filter(&groups)
        .run()
        .await
    {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "API discovery failed; Gateway API routes are not audited");
            return vec![];
        }
    };
    crate::audit::GATEWAY_ROUTE_KINDS
        .iter()
        .filter_map(|(group, kind, _)| {
            let (resource, _) = discovery.get(group)?.recommended_kind(kind)?;
            Some((kind.to_string(), resource))
        })
        .collect()
}

/// Field manager of the namespace marker label, apart from the operator's main one so that
/// applying it never touches anything else on the Namespace.
pub const MARKER_MANAGER: &str = "opsconductor-operator-namespace-marker";

/// Sets the admission marker label of `namespace` from the policy modes of its stacks, or
/// removes it when no stack is left. Writes only when the label must change.
pub async fn sync_namespace_marker(
    ctx: &Context,
    namespace: &str,
    modes: Vec<crate::crd::PolicyMode>,
) -> Result<(), Error> {
    let wanted = crate::admission::marker_value(modes);
    if current_marker(ctx, namespace).as_deref() == wanted {
        return Ok(());
    }
    write_namespace_marker(ctx, namespace, wanted).await
}

/// The marker of `namespace` as last known: the namespace cache's, unless a write of ours is
/// newer than what the cache holds yet (a lagging cache must not hide our own write, or the
/// label set a moment ago looks absent and is never removed).
fn current_marker(ctx: &Context, namespace: &str) -> Option<String> {
    let cached = ctx.stores.audit.namespaces.get(&ObjectRef::new(namespace));
    // The marker is an `opsconductor.io/` label: readable without decoding.
    let from_cache = cached.as_ref().and_then(|ns| {
        ns.label(crate::admission::PROTECTED_LABEL)
            .map(str::to_string)
    });
    let cache_version = cached.as_ref().and_then(|ns| ns.resource_version());
    let mut written = ctx.markers_written.lock().unwrap();
    match written.get(namespace) {
        Some((label, version)) if newer(version, cache_version.as_deref()) => label.clone(),
        Some(_) => {
            written.remove(namespace);
            from_cache
        }
        None => from_cache,
    }
}

/// Whether resourceVersion `ours` is newer than the cache's `cached`. resourceVersions are
/// opaque to clients but numeric in every API server backed by etcd; one that does not parse
/// counts as caught up, so the cache decides.
fn newer(ours: &str, cached: Option<&str>) -> bool {
    match (ours.parse::<u64>(), cached.map(str::parse::<u64>)) {
        (Ok(ours), Some(Ok(cached))) => ours > cached,
        (Ok(_), None) => true,
        _ => false,
    }
}

/// Applies the marker label of `namespace` (`None` removes it), and remembers what the write
/// left until the namespace cache shows it.
async fn write_namespace_marker(
    ctx: &Context,
    namespace: &str,
    wanted: Option<&str>,
) -> Result<(), Error> {
    use kube::api::{Patch, PatchParams};
    let labels = match wanted {
        Some(v) => serde_json::json!({ crate::admission::PROTECTED_LABEL: v }),
        None => serde_json::json!({}),
    };
    let patch = serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": { "name": namespace, "labels": labels },
    });
    let written = Api::<Namespace>::all(ctx.client.clone())
        .patch(
            namespace,
            &PatchParams::apply(MARKER_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    let label = written
        .labels()
        .get(crate::admission::PROTECTED_LABEL)
        .cloned();
    if let Some(version) = written.resource_version() {
        ctx.markers_written
            .lock()
            .unwrap()
            .insert(namespace.to_string(), (label.clone(), version));
    }
    if label.as_deref() != wanted {
        // E.g. the label is held by another field manager: our apply cannot remove it.
        return Err(Error::MarkerNotApplied {
            namespace: namespace.to_string(),
            found: label,
        });
    }
    tracing::info!(namespace, marker = ?wanted, "namespace admission marker updated");
    Ok(())
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

    /// Many reconciles wait for the caches at once when the operator restarts with stacks
    /// present: every one of them must go on when the caches are synced, not only the last
    /// to have polled (the kube-runtime store readiness future wakes only that one).
    #[tokio::test]
    async fn every_waiter_goes_on_once_the_caches_are_synced() {
        macro_rules! store {
            ($kind:ty) => {
                reflector::store::<Compact<$kind>>()
            };
        }
        let (service_accounts, mut w1) = store!(ServiceAccount);
        let (config_maps, mut w2) = store!(ConfigMap);
        let (network_policies, mut w3) = store!(NetworkPolicy);
        let (deployments, mut w4) = store!(Deployment);
        let (services, mut w5) = store!(Service);
        let (pod_disruption_budgets, mut w6) = store!(PodDisruptionBudget);
        let (audit_services, mut w7) = store!(Service);
        let (pods, mut w8) = store!(Pod);
        let (ingresses, mut w9) = store!(Ingress);
        let (audit_policies, mut w10) = store!(NetworkPolicy);
        let (namespaces, mut w11) = store!(Namespace);
        let stores = Arc::new(Stores {
            service_accounts,
            config_maps,
            network_policies,
            deployments,
            services,
            pod_disruption_budgets,
            audit: AuditStores {
                services: audit_services,
                pods,
                ingresses,
                network_policies: audit_policies,
                namespaces,
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
        macro_rules! sync {
            ($($w:ident),*) => {$(
                $w.apply_watcher_event(&watcher::Event::Init);
                $w.apply_watcher_event(&watcher::Event::InitDone);
            )*};
        }
        sync!(w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11);
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

    #[test]
    fn only_appearing_changed_or_deleted_objects_trigger_a_reconcile() {
        let pod = |rv: &str, phase: &str, host_network: bool| -> Compact<Pod> {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "namespace": "shop", "resourceVersion": rv},
                "spec": {"hostNetwork": host_network, "containers": [{"name": "c"}]},
                "status": {"phase": phase}
            }))
            .unwrap()
        };
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let mut changes = Changes::default();
        let steps = [
            (Init, false),
            (InitApply(pod("1", "Pending", false)), true),
            (InitDone, false),
            // A status update: nothing the cache keeps changed.
            (Apply(pod("2", "Running", false)), false),
            (Apply(pod("3", "Running", true)), true),
            (Delete(pod("4", "Running", true)), true),
            // Back after a deletion: new again.
            (Apply(pod("5", "Running", true)), true),
        ];
        for (i, (event, fires)) in steps.into_iter().enumerate() {
            assert_eq!(changes.triggers(event).is_some(), fires, "step {i}");
        }
    }

    /// A controller's own tasks end with it: dropping the guard aborts them (their futures
    /// are dropped, so whatever they hold goes too).
    #[tokio::test]
    async fn tasks_end_when_their_guard_is_dropped() {
        let (held, released) = tokio::sync::oneshot::channel::<()>();
        let mut tasks = AbortOnDrop::default();
        tasks.0.push(tokio::spawn(async move {
            let _held = held;
            std::future::pending::<()>().await;
        }));
        drop(tasks);
        // The sender goes with the aborted task; a live task would keep this pending (the
        // timeout is a hang guard, not a timing assertion).
        let r = tokio::time::timeout(Duration::from_secs(30), released).await;
        assert!(
            matches!(r, Ok(Err(_))),
            "the task still holds its sender: {r:?}"
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let s: Vec<u64> = (1..=12).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(s, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert!(backoff(100) <= Duration::from_secs(300));
    }
}
