//! Watch wiring: the stack watch, the watches of every kind of child and of what the audit
//! reads, and the controller that turns their events into reconciles.

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
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher;
use kube::runtime::{Controller, WatchStreamExt, controller::Action};
use kube::{Api, Client, ResourceExt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::cache;
use super::compact::Compact;
use super::stores::{AuditStores, GuardrailStores, Stores};
use super::{Context, Error, RunOptions, apply, identity, janitor, reconcile, scope, stack_key};
use crate::crd::OpsConductorStack;
use crate::names;
use crate::server::Health;

/// Backoff of the watches after an error (an API server restart, a dropped connection):
/// 125 ms doubling up to 2 s, each delay with up to as much again of random jitter (so the
/// first retry comes after 125 to 250 ms, none after more than 4 s), reset after a success.
/// Short on purpose: drift must be seen again within seconds once the API server is back, and
/// one operator's re-watches are light. The jitter keeps the watches of every kind (and of
/// every namespace, with `--watch-namespaces`) from coming back in lockstep.
pub struct WatchBackoff(watcher::ExponentialBackoff);

impl WatchBackoff {
    const FIRST: Duration = Duration::from_millis(125);
    const MAX: Duration = Duration::from_secs(2);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self(
            backon::ExponentialBuilder::default()
                .with_min_delay(Self::FIRST)
                .with_max_delay(Self::MAX)
                .with_factor(2.0)
                .with_jitter()
                .without_max_times()
                .into(),
        )
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        self.0.next()
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.0.reset();
    }
}

/// Retry delay after `failures` consecutive failures: 1 s, 2 s, 4 s, ... capped at 5 minutes.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(9)).min(Duration::from_secs(300))
}

fn error_policy(stack: Arc<OpsConductorStack>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = {
        let mut map = ctx.failures.lock().unwrap();
        let n = map.entry(stack_key(&stack)).or_default();
        *n += 1;
        *n
    };
    let delay = backoff(failures);
    tracing::warn!(
        namespace = stack.metadata.namespace.as_deref().unwrap_or(""),
        name = stack.metadata.name.as_deref().unwrap_or(""),
        stage = error.stage(),
        reason = error.reason(),
        %error,
        failures,
        retry_in = ?delay,
        "reconcile failed"
    );
    ctx.metrics.reconcile_error(error.reason());
    Action::requeue(delay)
}

/// Runs the controller until `stop` is cancelled (shutdown, or the leader Lease lost).
pub async fn run(
    client: Client,
    options: RunOptions,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let managed = watcher::Config::default().labels(&format!(
        "{}={},{}",
        names::MANAGED_BY_LABEL,
        names::MANAGER,
        names::STACK_LABEL
    ));

    // With --namespace-selector: the selected namespaces, published by the Namespace watch
    // (below) once its cache has its first list, and followed by every per-namespace watch.
    let (selected_tx, selected) = tokio::sync::watch::channel(None);
    let dynamic = scope::Dynamic {
        selected,
        listing: Arc::default(),
    };
    macro_rules! child_watch {
        ($kind:ty) => {
            child_watch!($kind, managed.clone())
        };
        ($kind:ty, $config:expr) => {
            child_watch!($kind, $config, |reader| options.scope.watch(
                stringify!($kind),
                {
                    let client = client.clone();
                    move |ns| match ns {
                        Some(ns) => Api::<Compact<$kind>>::namespaced(client.clone(), ns),
                        None => Api::<Compact<$kind>>::all(client.clone()),
                    }
                },
                $config,
                reader,
                &dynamic,
            ))
        };
        ($kind:ty, $config:expr, $watch:expr) => {
            child_watch!($kind, $config, $watch, |_| |_: bool| ())
        };
        ($kind:ty, $config:expr, $watch:expr, $after_cache:expr) => {{
            // Cached compactly: see `compact` and `cache` (managedFields and what `Slim` drops
            // are gone before an object is kept).
            let (reader, mut writer) = cache::cache::<$kind>();
            // Sees each event after the cache has taken it in (true: the end of a list).
            #[allow(unused_mut)] // Mutable for the Namespace cache's, not for the others.
            let mut after_cache = ($after_cache)(reader.clone());
            // Over the scope: cluster-wide, or one watch per namespace merged (see `scope`).
            let stream = ($watch)(reader.clone())
                // Only changes of what the cache keeps trigger a reconcile (see `cache`).
                .flat_map(move |event| {
                    let triggers = match event {
                        Ok(event) => {
                            let listed = matches!(event, watcher::Event::InitDone);
                            let triggers = writer.apply(event);
                            after_cache(listed);
                            triggers
                        }
                        // A failing watch retries on its own backoff; its errors must not
                        // reach the controller, whose trigger backoff would otherwise
                        // pause every watch.
                        Err(error) => {
                            tracing::warn!(kind = stringify!($kind), %error, "watch failed; retrying");
                            Vec::new()
                        }
                    };
                    futures::stream::iter(triggers.into_iter().map(Ok))
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
    // With --audit-namespaces with-stacks: the namespaces that hold a stack, published by the
    // stack watch (below) once its cache has its first list, and followed by the audit's
    // per-namespace watches.
    let with_stacks = options.audit_namespaces == scope::AuditNamespaces::WithStacks;
    let (stack_namespaces_tx, stack_namespaces) = tokio::sync::watch::channel(None);
    let audit_dynamic = scope::Dynamic {
        selected: stack_namespaces,
        listing: dynamic.listing.clone(),
    };
    macro_rules! audit_watch {
        ($kind:ty) => {
            child_watch!($kind, everything.clone(), |reader| {
                let client = client.clone();
                if with_stacks {
                    scope::watch_in(
                        stringify!($kind),
                        move |ns| Api::<Compact<$kind>>::namespaced(client.clone(), ns),
                        everything.clone(),
                        &audit_dynamic,
                        reader,
                    )
                } else {
                    options.scope.watch(
                        stringify!($kind),
                        move |ns| match ns {
                            Some(ns) => Api::<Compact<$kind>>::namespaced(client.clone(), ns),
                            None => Api::<Compact<$kind>>::all(client.clone()),
                        },
                        everything.clone(),
                        reader,
                        &dynamic,
                    )
                }
            })
        };
    }
    let (audit_services, audit_svc_stream) = audit_watch!(Service);
    let (audit_pods, audit_pod_stream) = audit_watch!(Pod);
    let (audit_ingresses, audit_ing_stream) = audit_watch!(Ingress);
    let (audit_policies, audit_np_stream) = audit_watch!(NetworkPolicy);
    let (namespaces, ns_stream) = child_watch!(
        Namespace,
        everything.clone(),
        |reader| {
            options.scope.watch_namespaces(
                Api::<Compact<Namespace>>::all(client.clone()),
                everything.clone(),
                reader,
            )
        },
        // Once the cache has its first list, every change of it may change the selection
        // (only the watches of a selector scope follow it).
        |reader: cache::Cache<Namespace>| {
            let follow = matches!(options.scope, scope::Scope::Selector(_));
            let mut synced = false;
            move |listed: bool| {
                synced |= listed;
                if synced && follow {
                    let names: std::collections::BTreeSet<String> =
                        reader.names_in(None).into_iter().collect();
                    selected_tx.send_if_modified(|current| {
                        let changed = current.as_ref() != Some(&names);
                        if changed {
                            *current = Some(names);
                        }
                        changed
                    });
                }
            }
        }
    );
    // The stacks, over the scope like everything else.
    // Whether the stack cache has had its first list, set as the list's end passes into the
    // cache (`Context::stacks_listed` says why not the cache's own readiness).
    let (stacks_listed_tx, stacks_listed) = tokio::sync::watch::channel(false);
    let (stack_store, stack_writer) = reflector::store::<OpsConductorStack>();
    let stack_stream = options
        .scope
        .watch(
            "OpsConductorStack",
            {
                let client = client.clone();
                move |ns| match ns {
                    Some(ns) => Api::<OpsConductorStack>::namespaced(client.clone(), ns),
                    None => Api::<OpsConductorStack>::all(client.clone()),
                }
            },
            watcher::Config::default().any_semantic(),
            stack_store.clone(),
            &dynamic,
        )
        .reflect(stack_writer)
        // Once the cache has its first list, every change of it may change the namespaces
        // that hold a stack (only the audit's watches with --audit-namespaces with-stacks
        // follow them).
        .inspect({
            let (stacks, mut synced) = (stack_store.clone(), false);
            move |event| {
                if matches!(event, Ok(watcher::Event::InitDone)) {
                    synced = true;
                    stacks_listed_tx.send_replace(true);
                }
                if synced && with_stacks {
                    let names: std::collections::BTreeSet<String> = stacks
                        .state()
                        .iter()
                        .filter_map(|s| s.metadata.namespace.clone())
                        .collect();
                    stack_namespaces_tx.send_if_modified(|current| {
                        let changed = current.as_ref() != Some(&names);
                        if changed {
                            *current = Some(names);
                        }
                        changed
                    });
                }
            }
        })
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
        let api = {
            let (client, resource) = (client.clone(), resource.clone());
            move |ns: Option<&str>| match ns {
                Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, &resource),
                None => Api::<DynamicObject>::all_with(client.clone(), &resource),
            }
        };
        let watch = if with_stacks {
            scope::watch_in(
                &kind,
                move |ns| api(Some(ns)),
                everything.clone(),
                &audit_dynamic,
                reader.clone(),
            )
        } else {
            options
                .scope
                .watch(&kind, api, everything.clone(), reader.clone(), &dynamic)
        };
        let stream = watch
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
            deployments,
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
                ..crate::acme::Config::from_env(&options.build.cluster_domain)
            },
            health.metrics.clone(),
        ),
        options,
        dynamic,
        stacks: stack_store.clone(),
        stacks_listed: stacks_listed.clone(),
        applied: apply::AppliedLog::default(),
        failures: Mutex::default(),
        announced_conflicts: Mutex::default(),
        announced_violations: Mutex::default(),
        markers_written: Mutex::default(),
        applied_generations: Mutex::default(),
        identity_keys: identity::KeysCache::default(),
        stop: stop.clone(),
    });

    // Tasks that live as long as this controller: a JoinSet aborts them when `run` returns or
    // is dropped (e.g. on losing the leadership), so that they neither write nor keep the
    // caches alive.
    let mut tasks = JoinSet::new();
    {
        let ctx = ctx.clone();
        let health = health.clone();
        tasks.spawn(async move {
            // The stacks too: a controller that cannot list them is not ready either.
            if !ctx.stores.open_when_synced().await || !ctx.stacks_listed().await {
                // Stopped before the caches synced: nothing to report ready.
                return;
            }
            // The initial lists are behind us: hand what they left free back to the kernel.
            crate::memory::release_free_memory();
            health.ready.store(true, Ordering::Relaxed);
            tracing::info!("watch caches synced");
            loop {
                ctx.stores.export_sizes(&ctx.metrics);
                tokio::time::sleep(Duration::from_secs(15)).await;
                // What bursts of reconciles (a restart with many stacks, many stacks applied
                // at once) freed stays with the allocator as holes in the heap; a walk over
                // its free lists every 15 s hands those pages back (after a restart with 900
                // stacks present: 82 MiB resident without it, 63 MiB with it, for a heap of
                // 47 MiB in use).
                crate::memory::release_free_memory();
            }
        });
    }

    let (n1, n2, n3, n4) = (
        in_namespace.clone(),
        in_namespace.clone(),
        in_namespace.clone(),
        in_namespace.clone(),
    );
    tasks.spawn(janitor::run(ctx.clone()));
    let controller = controller
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
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(reconcile::reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller event");
            }
        });
    // kube-runtime holds every reconcile until the stack cache has its first list, and its
    // graceful shutdown waits for that too: told to stop before that list, the controller
    // would never end, since nothing polls the stack watch any more (seen in a full run: a
    // leader stopped 0.5 s after it started, on a loaded machine, hung until killed). No
    // reconcile can have started then, so the controller is dropped instead.
    tokio::select! {
        () = controller => {}
        () = async {
            stop.cancelled().await;
            if *stacks_listed.borrow() {
                // Listed: the graceful shutdown ends once the reconciles in flight have.
                std::future::pending::<()>().await;
            }
        } => {
            tracing::info!("stopped before the stacks were listed: no reconcile had started");
        }
    }
    tracing::info!("controller stopped");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_backoff_is_short_jittered_and_resets() {
        use kube::runtime::utils::Backoff as _;
        let bases = [125, 250, 500, 1000, 2000, 2000];
        let mut b = WatchBackoff::default();
        let mut delays = Vec::new();
        for _ in 0..50 {
            for base in bases {
                let d = b.next().unwrap().as_millis();
                assert!(
                    (base..2 * base).contains(&d),
                    "{d} ms for a base of {base} ms"
                );
                delays.push(d);
            }
            b.reset();
        }
        let first = b.next().unwrap().as_millis();
        assert!((125..250).contains(&first), "{first} ms after a reset");
        delays.sort();
        delays.dedup();
        assert!(delays.len() > bases.len(), "no jitter: {delays:?}");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let s: Vec<u64> = (1..=12).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(s, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert!(backoff(100) <= Duration::from_secs(300));
    }
}
