//! One reconcile of one stack, as a pipeline. Each stage is one function of this file, in
//! this order; what touches the API server says so:
//!
//! 1. [`gather()`]    — the stack from the watch; wait for the caches (no request)
//! 2. [`validate()`]  — into the model; an invalid spec stops here and changes nothing running
//!    (only the status and an Event say why)
//! 3. [`dereference()`] — what the stack refers to: its certificate, from the user's TLS Secret
//!    (a read) or the ACME engine (the certificate Secrets; orders run in the background).
//!    After validation, because the ACME engine must never act on an invalid spec
//! 4. [`build()`]     — the desired bundle (pure, apart from the ClusterIPs read from the cache)
//! 5. [`apply()`]     — server-side apply of what differs, prune what is no longer desired, the
//!    namespace's admission marker (writes)
//! 6. [`status()`]    — readiness and violations from the caches, the status computed and
//!    written only when it changed, Events
//!
//! Each stage that can fail has its own [`Error`] variant.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use tracing::Instrument;

use super::apply::{self, Report, Target};
use super::cache::Cache;
use super::compact::Slim;
use super::dereference::{self, Certificate};
use super::events::Events;
use super::status::{self, Observed, PolicyFindings};
use super::{Context, Error, Request, stack_key};
use crate::build::{self, BuildOptions, Bundle};
use crate::crd::{OpsConductorStack, OpsConductorStackStatus, Violation};
use crate::model::Stack;
use crate::names;
use crate::ownership::NameConflict;
use crate::validate::{self, ValidationErrors};

pub async fn reconcile(stack: Arc<OpsConductorStack>, ctx: Arc<Context>) -> Result<Action, Error> {
    // Every log line of this reconcile (the ACME engine's calls from it too) names the stack
    // (`stack`, not `name`: the JSON log format writes the span's own name under `name`).
    let span = tracing::info_span!(
        "reconcile",
        namespace = stack.metadata.namespace.as_deref().unwrap_or(""),
        stack = stack.metadata.name.as_deref().unwrap_or(""),
    );
    let started = Instant::now();
    let result = reconcile_inner(&stack, &ctx).instrument(span).await;
    ctx.metrics.reconciled(result.is_ok(), started.elapsed());
    if result.is_ok() {
        ctx.failures.lock().unwrap().remove(&stack_key(&stack));
    }
    result
}

async fn reconcile_inner(stack: &OpsConductorStack, ctx: &Context) -> Result<Action, Error> {
    let namespace = match gather(stack, ctx).await? {
        Ok(namespace) => namespace,
        Err(action) => return Ok(action),
    };
    let model = match validate(stack, ctx, &namespace) {
        Ok(model) => model,
        Err(errors) => {
            invalid_spec(stack, ctx, &errors.one_line()).await?;
            return Ok(Action::await_change());
        }
    };
    let certificate = dereference(stack, ctx, &model).await?;
    let (mut bundle, held_back) = build(ctx, &model, &certificate).await?;
    let mut report = apply(stack, ctx, &model, &bundle, &certificate, !held_back).await?;
    if held_back {
        // The Services exist now, with their addresses: the configuration with them, then
        // the gateway, in this same pass.
        let (again, still_held_back) = build(ctx, &model, &certificate).await?;
        if !still_held_back {
            bundle = again;
            report = apply(stack, ctx, &model, &bundle, &certificate, true).await?;
        }
    }
    let mut requeue = certificate
        .requeue_after
        .map_or(ctx.options.resync, |d| d.min(ctx.options.resync));
    // Without the API server's signing keys the stack's services refuse every token: come back
    // when the next read is due, not at the next resync.
    if model.service_identity.is_some() && ctx.identity_keys.current().await.keys.is_none() {
        requeue = requeue.min(super::identity::RETRY);
    }
    // Which configuration the gateway pods run; while some are still on their way to the one
    // just written, look again soon (nothing in the API tells when a pod's reload happened).
    let config_verdict = match gateway_config_id(&model, &bundle) {
        Some(want) => {
            let (verdict, again) = super::config_status::check(ctx, &model, &want).await;
            if let Some(again) = again {
                requeue = requeue.min(again);
            }
            Some(verdict)
        }
        None => None,
    };
    status(
        stack,
        ctx,
        &model,
        &bundle,
        &report,
        certificate,
        config_verdict,
    )
    .await?;
    Ok(Action::requeue(requeue))
}

/// Stage 1, gather: the stack's namespace once the caches hold their initial lists, or what to
/// do instead: nothing for a stack being deleted (owner references hand everything to the
/// garbage collector) or in a namespace that has left the `--namespace-selector` selection;
/// come back shortly for one in a namespace whose per-namespace watches have not listed it yet
/// (it has just entered the selection, or holds its first stack with `--audit-namespaces
/// with-stacks`): its caches are incomplete, and an object missing from them is not missing.
async fn gather(stack: &OpsConductorStack, ctx: &Context) -> Result<Result<String, Action>, Error> {
    if stack.meta().deletion_timestamp.is_some() {
        ctx.acme
            .forget(&stack.namespace().unwrap_or_default(), &stack.name_any());
        return Ok(Err(Action::await_change()));
    }
    let namespace = stack.namespace().ok_or(Error::NoNamespace)?;
    // Stopping before the caches synced: they never will (the controller no longer polls the
    // streams that fill them, and waits for this reconcile), so give up instead of hanging
    // the shutdown until the kubelet kills the pod with the Lease still held.
    tokio::select! {
        () = ctx.stores.wait_ready() => {}
        () = ctx.stop.cancelled() => return Ok(Err(Action::await_change())),
    }
    if let super::scope::Scope::Selector(_) = ctx.options.scope {
        let selected = ctx
            .dynamic
            .selected
            .borrow()
            .as_ref()
            .is_some_and(|s| s.contains(&namespace));
        if !selected {
            return Ok(Err(Action::await_change()));
        }
    }
    if ctx.dynamic.listing.is_listing(&namespace) {
        return Ok(Err(Action::requeue(std::time::Duration::from_millis(500))));
    }
    Ok(Ok(namespace))
}

/// Stage 2, validate: the spec into the model, with the checks that depend on the operator's
/// settings and on the namespace's other stacks. Every problem at once.
fn validate(
    stack: &OpsConductorStack,
    ctx: &Context,
    namespace: &str,
) -> Result<Stack, ValidationErrors> {
    // The Secrets the operator writes for the other stacks of the namespace are theirs alone.
    let neighbours: Vec<String> = ctx
        .stacks
        .state()
        .iter()
        .filter(|s| s.metadata.namespace.as_deref() == Some(namespace))
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    let mut references = validate::secret_references(stack, &neighbours);
    // The operator fetches the ACME directory itself: never from the node or the cloud's
    // metadata service (issue 14, item 8).
    references.extend(validate::directory_url_problems(
        stack,
        ctx.options.allow_loopback_acme_directory,
    ));
    // The gateway runs with the TLS key: only images the operator's administrator allows.
    references.extend(validate::gateway_image_problems(
        stack,
        &ctx.options.allowed_gateway_images,
    ));
    // Egress by address never reaches into the cluster's own ranges.
    references.extend(validate::egress_cluster_problems(
        stack,
        &ctx.options.build.cluster_cidrs,
    ));
    match validate::validate(stack, namespace) {
        Ok(model) if references.is_empty() => Ok(model),
        result => {
            let mut errors = result.err().map(|e| e.0).unwrap_or_default();
            for r in references {
                if !errors.contains(&r) {
                    errors.push(r);
                }
            }
            Err(ValidationErrors(errors))
        }
    }
}

/// Stage 3, dereference: the certificate (see [`super::dereference`]).
async fn dereference(
    stack: &OpsConductorStack,
    ctx: &Context,
    model: &Stack,
) -> Result<Certificate, Error> {
    dereference::certificate(stack, ctx, model).await
}

/// Stage 4, build: the desired objects. The gateway answers ACME challenges with the account's
/// thumbprint, and reaches the routed services by their ClusterIPs ([`addresses`]).
///
/// A gateway is first created only once every routed service has its address: its pods start
/// with the configuration they mount then, and a route without an address answers 503 until
/// the kubelet brings them the next one (up to a minute or more), while the stack already
/// said Ready (seen on the node: the first request to a route got 503 after Ready). Until
/// then the Deployment is left out (the second value is true); the reconcile applies the
/// rest, which creates the Services, and builds again. A gateway that exists is always kept
/// (and updated).
async fn build(
    ctx: &Context,
    model: &Stack,
    certificate: &Certificate,
) -> Result<(Bundle, bool), Error> {
    let (addresses, waiting) = addresses(ctx, model).await?;
    let identity_keys = match model.service_identity {
        Some(_) => ctx.identity_keys.get(&ctx.client).await.keys,
        None => None,
    };
    let options = BuildOptions {
        acme_thumbprint: certificate.thumbprint.clone(),
        upstreams: build::Upstreams::ClusterIps(addresses),
        identity_keys,
        ..ctx.options.build.clone()
    };
    let mut bundle = build::build(model, &options);
    if !waiting.is_empty() {
        let name = names::gateway(&model.name);
        let cached = ctx
            .stores
            .deployments
            .get(Some(&model.namespace), &name)
            .is_some();
        let exists = cached
            || Api::<Deployment>::namespaced(ctx.client.clone(), &model.namespace)
                .get_metadata_opt(&name)
                .await
                .map_err(|e| Error::Apply(Request::Kube(e)))?
                .is_some();
        if !exists {
            tracing::info!(
                waiting = ?waiting,
                "the gateway is created once these services have their ClusterIPs"
            );
            bundle
                .deployments
                .retain(|d| d.metadata.name.as_deref() != Some(name.as_str()));
            return Ok((bundle, true));
        }
    }
    Ok((bundle, false))
}

/// The ClusterIP of each routed service, and the routed services that have none yet. The
/// Service cache first; a Service it does not hold (one this stack created a moment ago) is
/// read from the API server.
async fn addresses(
    ctx: &Context,
    model: &Stack,
) -> Result<
    (
        std::collections::BTreeMap<String, std::net::IpAddr>,
        Vec<String>,
    ),
    Error,
> {
    let mut found = cluster_ips(ctx, model);
    let mut waiting = Vec::new();
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &model.namespace);
    for svc in model.services.iter().filter(|s| s.route.is_some()) {
        let name = svc.name.to_string();
        if found.contains_key(&name) {
            continue;
        }
        let read = api
            .get_opt(&name)
            .await
            .map_err(|e| Error::Apply(Request::Kube(e)))?;
        match read.as_ref().and_then(|s| our_cluster_ip(s, model)) {
            Some(ip) => {
                found.insert(name, ip);
            }
            None => waiting.push(name),
        }
    }
    Ok((found, waiting))
}

/// Stage 5, apply: writes what differs and prunes what is no longer wanted (see
/// [`super::apply`]), tells in Events what it wrote and whose objects it left alone, and sets
/// the namespace's admission marker. A bundle that is not `complete` (the gateway held back,
/// see [`build`]) does not count as this generation applied: the next apply still creates
/// what is missing, also in Audit mode.
async fn apply(
    stack: &OpsConductorStack,
    ctx: &Context,
    model: &Stack,
    bundle: &Bundle,
    certificate: &Certificate,
    complete: bool,
) -> Result<Report, Error> {
    let namespace = model.namespace.as_str();
    let generation = stack.meta().generation;
    // Converged: this generation was fully applied once, as the status says or, when the
    // stack cache has not yet seen that status write, as this process remembers. Without the
    // second, a change made right after the first convergence looked like a spec change:
    // reverted without a word, even in Audit mode.
    let key = stack_key(stack);
    let converged = generation.is_some()
        && (stack.status.as_ref().and_then(|s| s.observed_generation) == generation
            || ctx.applied_generations.lock().unwrap().get(&key) == generation.as_ref());
    let uid = stack.uid().unwrap_or_default();
    let target = Target {
        namespace,
        stack_name: model.name.as_str(),
        stack_uid: &uid,
        mode: model.mode,
        converged,
    };
    let report = apply::apply_bundle(ctx, &target, bundle, certificate.conflicts.clone())
        .await
        .map_err(Error::Apply)?;
    if complete
        && report.conflicts.is_empty()
        && let Some(generation) = generation
    {
        ctx.applied_generations
            .lock()
            .unwrap()
            .insert(key, generation);
    }
    let events = Events::new(stack, ctx);
    events.report(&report).await;
    events.conflicts(&report.conflicts).await;
    let modes = ctx
        .stacks
        .state()
        .iter()
        .filter(|s| {
            s.metadata.namespace.as_deref() == Some(namespace)
                && s.metadata.deletion_timestamp.is_none()
        })
        .map(|s| s.spec.policy.mode)
        .chain([model.mode])
        .collect();
    super::sync_namespace_marker(ctx, namespace, modes).await?;
    Ok(report)
}

/// The name of the gateway configuration in `bundle` (see [`crate::build::nginx::config_id`]).
fn gateway_config_id(model: &Stack, bundle: &Bundle) -> Option<String> {
    let name = names::gateway_config(&model.name);
    bundle
        .config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(name.as_str()))?
        .data
        .as_ref()?
        .get(crate::build::nginx::CONFIG_KEY)
        .and_then(|conf| crate::build::nginx::config_id(conf))
        .map(str::to_string)
}

/// Stage 6, status: what runs, what the audit finds and the certificate, into the status (written
/// only when it changed) and Events.
async fn status(
    stack: &OpsConductorStack,
    ctx: &Context,
    model: &Stack,
    bundle: &Bundle,
    report: &Report,
    certificate: Certificate,
    config_verdict: Option<status::Verdict>,
) -> Result<(), Error> {
    let events = Events::new(stack, ctx);
    let violations = violations(ctx, model, bundle, report);
    for event in &certificate.events {
        let type_ = if event.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        events
            .send(type_, event.reason, "Certificate", &event.note, None)
            .await;
    }
    let policy_verdict = status::policy_verdict(&PolicyFindings {
        drift_reported: &report.drift_reported,
        guardrail_problems: ctx
            .stores
            .guardrails
            .as_ref()
            .map(|g| g.problems())
            .unwrap_or_default(),
        mode: model.mode,
        network_policies: bundle.network_policies.len(),
        violations: &violations,
    });
    ctx.metrics.violations(&stack_key(stack), violations.len());
    let identity_verdict = match model.service_identity {
        Some(_) => Some(super::identity::verdict(
            &names::identity_config(&model.name),
            &ctx.identity_keys.current().await,
        )),
        None => None,
    };
    let mut observed = observe(
        stack,
        ctx,
        model,
        report,
        certificate,
        policy_verdict,
        violations,
    );
    observed.identity_verdict = identity_verdict;
    observed.config_verdict = config_verdict;
    let new_status = status::compute(stack.status.as_ref(), &observed, Timestamp::now());
    events.audit_drift(&new_status).await;
    events.violations(&new_status).await;
    write_status(stack, ctx, new_status)
        .await
        .map_err(Error::Status)
}

/// The ClusterIP of each routed service's Service, from the Service cache: only a Service of
/// this stack (its stack and managed-by labels), so that a Service of the same name that is
/// someone else's never receives the stack's traffic. The cache sees a Service created or
/// re-created by this very reconcile a moment later, and that watch event reconciles the
/// stack again with the address.
fn cluster_ips(
    ctx: &Context,
    model: &Stack,
) -> std::collections::BTreeMap<String, std::net::IpAddr> {
    model
        .services
        .iter()
        .filter(|svc| svc.route.is_some())
        .filter_map(|svc| {
            let service = ctx
                .stores
                .audit
                .services
                .get(Some(&model.namespace), svc.name.as_str())?
                .decode();
            Some((svc.name.to_string(), our_cluster_ip(&service, model)?))
        })
        .collect()
}

/// The ClusterIP of `service` when it is this stack's (its stack and managed-by labels).
fn our_cluster_ip(service: &Service, model: &Stack) -> Option<std::net::IpAddr> {
    let labels = service.metadata.labels.as_ref()?;
    let ours = labels.get(names::STACK_LABEL).map(String::as_str) == Some(model.name.as_str())
        && labels.get(names::MANAGED_BY_LABEL).map(String::as_str) == Some(names::MANAGER);
    if !ours {
        return None;
    }
    service.spec.as_ref()?.cluster_ip.as_ref()?.parse().ok()
}

/// Ready=False/InvalidSpec with every problem; nothing else is touched. The Event is sent
/// only when the message changes, not on every retry.
async fn invalid_spec(
    stack: &OpsConductorStack,
    ctx: &Context,
    message: &str,
) -> Result<(), Error> {
    let before = status::condition(stack.status.as_ref(), status::READY);
    let changed = before.is_none_or(|c| c.reason != "InvalidSpec" || c.message != message);
    if changed {
        tracing::warn!(%message, "invalid spec");
        Events::new(stack, ctx)
            .send(EventType::Warning, "InvalidSpec", "Validate", message, None)
            .await;
    }
    let new_status = status::invalid(
        stack.status.as_ref(),
        stack.meta().generation,
        message,
        Timestamp::now(),
    );
    write_status(stack, ctx, new_status)
        .await
        .map_err(Error::Invalid)
}

/// What breaks the policy in the stack's namespace, from the audit caches. Managed objects
/// written in this very pass are left out: the cache has not seen the write yet.
fn violations(
    ctx: &Context,
    model: &Stack,
    bundle: &build::Bundle,
    report: &Report,
) -> Vec<crate::crd::Violation> {
    fn in_ns<K>(cache: &Cache<K>, ns: &str) -> Vec<K>
    where
        K: Resource<DynamicType = ()> + serde::Serialize + serde::de::DeserializeOwned + Slim,
    {
        cache
            .in_namespace(Some(ns))
            .iter()
            .map(|o| o.decode())
            .collect()
    }
    let ns = model.namespace.as_str();
    let a = &ctx.stores.audit;
    let found = crate::audit::Found {
        services: in_ns(&a.services, ns),
        pods: in_ns(&a.pods, ns),
        ingresses: in_ns(&a.ingresses, ns),
        network_policies: in_ns(&a.network_policies, ns),
        routes: a
            .routes
            .iter()
            .flat_map(|(kind, store)| {
                store
                    .state()
                    .into_iter()
                    .filter(|o| o.metadata.namespace.as_deref() == Some(ns))
                    .map(|o| crate::audit::Route::from_dynamic(kind, &o))
                    .collect::<Vec<_>>()
            })
            .collect(),
    };
    let just_written: Vec<(&str, &str)> = report
        .written
        .iter()
        .map(|(_, k, n)| (*k, n.as_str()))
        .collect();
    crate::audit::audit(model, bundle, &found)
        .into_iter()
        .filter(|v| !just_written.contains(&(v.kind.as_str(), v.name.as_str())))
        .collect()
}

/// Readiness from the caches, with what the other stages found.
fn observe(
    stack: &OpsConductorStack,
    ctx: &Context,
    model: &Stack,
    report: &Report,
    certificate: Certificate,
    policy_verdict: status::Verdict,
    violations: Vec<Violation>,
) -> Observed {
    let ns = model.namespace.as_str();
    let deployment_ready = |name: &str| -> (bool, i32) {
        let Some(d) = ctx
            .stores
            .deployments
            .get(Some(ns), name)
            .map(|d| d.decode())
        else {
            return (false, 0);
        };
        let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let st = d.status.clone().unwrap_or_default();
        let ready = st.ready_replicas.unwrap_or(0);
        let current = st.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
        (current && ready >= want, ready)
    };
    let mut not_ready = Vec::new();
    for svc in &model.services {
        if !deployment_ready(svc.name.as_str()).0 {
            not_ready.push(svc.name.to_string());
        }
    }
    let gateway_name = names::gateway(&model.name);
    let (_, gateway_ready) = deployment_ready(&gateway_name);
    let gateway_address = ctx
        .stores
        .audit
        .services
        .get(Some(ns), &gateway_name)
        .and_then(|s| {
            let ingress = s
                .decode()
                .status
                .as_ref()?
                .load_balancer
                .as_ref()?
                .ingress
                .as_ref()?
                .first()?
                .clone();
            ingress.ip.or(ingress.hostname)
        });

    let total = model.services.len() as i32;
    let conflicts: BTreeSet<String> = report.conflicts.iter().map(NameConflict::object).collect();
    Observed {
        generation: stack.meta().generation,
        services_ready: total - not_ready.len() as i32,
        services_total: total,
        not_ready_services: not_ready,
        gateway_ready_replicas: gateway_ready,
        gateway_desired_replicas: model.gateway.replicas,
        gateway_address,
        certificate: certificate.status,
        certificate_verdict: certificate.verdict,
        policy_verdict,
        violations,
        conflicts: conflicts.into_iter().collect(),
        held: report.held.clone(),
        identity_verdict: None,
        config_verdict: None,
    }
}

/// Writes the status with server-side apply, only when it differs from what is stored.
async fn write_status(
    stack: &OpsConductorStack,
    ctx: &Context,
    new_status: OpsConductorStackStatus,
) -> Result<(), Request> {
    if stack.status.as_ref() == Some(&new_status) {
        return Ok(());
    }
    let api: Api<OpsConductorStack> =
        Api::namespaced(ctx.client.clone(), &stack.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": OpsConductorStack::api_version(&()),
        "kind": OpsConductorStack::kind(&()),
        "status": new_status,
    });
    api.patch_status(
        &stack.name_any(),
        &PatchParams::apply(names::MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}
