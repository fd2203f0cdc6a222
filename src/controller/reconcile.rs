//! One reconcile of one stack, as a pipeline:
//!
//! 1. gather   — the stack from the watch; the caches of its objects (no request)
//! 2. validate — into the model; an invalid spec stops here and changes nothing running
//! 3. build    — the desired bundle (pure)
//! 4. apply    — server-side apply of what differs, prune what is no longer desired (writes)
//! 5. status   — observe readiness, compute the status, write it only when it changed

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};

use super::apply::{self, Cause, Report, Target};
use super::compact::{Compact, Slim};
use super::status::{self, Observed, Verdict};
use super::{Context, Error, reference, stack_key};
use crate::build::{self, BuildOptions};
use crate::crd::{CertificateStatus, OpsConductorStack, OpsConductorStackStatus, PolicyMode};
use crate::model::{CertificateSource, Stack};
use crate::names;
use crate::ownership::NameConflict;
use crate::validate;

pub async fn reconcile(stack: Arc<OpsConductorStack>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&stack, &ctx).await;
    ctx.metrics.reconciled(result.is_ok(), started.elapsed());
    if result.is_ok() {
        ctx.failures.lock().unwrap().remove(&stack_key(&stack));
    }
    result
}

async fn reconcile_inner(stack: &OpsConductorStack, ctx: &Context) -> Result<Action, Error> {
    // 1. gather
    if stack.meta().deletion_timestamp.is_some() {
        // Owner references hand everything to the garbage collector.
        ctx.acme
            .forget(&stack.namespace().unwrap_or_default(), &stack.name_any());
        return Ok(Action::await_change());
    }
    let namespace = stack.namespace().ok_or(Error::NoNamespace)?;
    ctx.stores.wait_ready().await;

    // 2. validate
    // The Secrets the operator writes for the other stacks of the namespace are theirs alone.
    let neighbours: Vec<String> = ctx
        .stacks
        .state()
        .iter()
        .filter(|s| s.metadata.namespace.as_deref() == Some(namespace.as_str()))
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
        &ctx.options.cluster_cidrs,
    ));
    let model = match validate::validate(stack, &namespace) {
        Ok(model) if references.is_empty() => model,
        result => {
            let mut errors = result.err().map(|e| e.0).unwrap_or_default();
            for r in references {
                if !errors.contains(&r) {
                    errors.push(r);
                }
            }
            let errors = validate::ValidationErrors(errors);
            invalid_spec(stack, ctx, &errors.one_line()).await?;
            return Ok(Action::await_change());
        }
    };

    // 3. build (the certificate first: the gateway answers ACME challenges with the
    // account's thumbprint; the ACME engine never waits for the CA here)
    let certificate = certificate(stack, ctx, &model).await?;
    let options = BuildOptions {
        cluster_domain: ctx.options.cluster_domain.clone(),
        acme_thumbprint: certificate.thumbprint.clone(),
        upstreams: build::Upstreams::ClusterIps(cluster_ips(ctx, &model)),
        operator_namespace: ctx.options.operator_namespace.clone(),
        cluster_cidrs: ctx.options.cluster_cidrs.clone(),
    };
    let bundle = build::build(&model, &options);

    // 4. apply
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
        namespace: &namespace,
        stack_name: model.name.as_str(),
        stack_uid: &uid,
        mode: model.mode,
        converged,
    };
    let report = apply::apply_bundle(ctx, &target, &bundle, certificate.conflicts.clone()).await?;
    if report.conflicts.is_empty()
        && let Some(generation) = generation
    {
        ctx.applied_generations
            .lock()
            .unwrap()
            .insert(key.clone(), generation);
    }
    publish_report(stack, ctx, &report).await;
    conflict_events(stack, ctx, &report.conflicts).await;
    let modes = ctx
        .stacks
        .state()
        .iter()
        .filter(|s| {
            s.metadata.namespace.as_deref() == Some(namespace.as_str())
                && s.metadata.deletion_timestamp.is_none()
        })
        .map(|s| s.spec.policy.mode)
        .chain([model.mode])
        .collect();
    super::sync_namespace_marker(ctx, &namespace, modes).await?;

    // 5. status
    let violations = violations(ctx, &model, &bundle, &report);
    for event in &certificate.events {
        let type_ = if event.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(stack, ctx, type_, event.reason, "Certificate", &event.note).await;
    }
    let mut observed = observe(
        stack,
        ctx,
        &model,
        &report,
        bundle.network_policies.len(),
        (certificate.status, certificate.verdict),
    )
    .await?;
    if !violations.is_empty() && observed.policy_verdict.ok {
        let listed: Vec<String> = violations
            .iter()
            .take(3)
            .map(|v| format!("{} {} ({})", v.kind, v.name, v.reason))
            .collect();
        let more = if violations.len() > 3 {
            format!(" and {} more", violations.len() - 3)
        } else {
            String::new()
        };
        observed.policy_verdict = Verdict::not(
            "ViolationsFound",
            format!(
                "{} object(s) in the namespace break the policy: {}{more}",
                violations.len(),
                listed.join("; ")
            ),
        );
    }
    ctx.metrics.violations(&stack_key(stack), violations.len());
    observed.violations = violations;
    let new_status = status::compute(stack.status.as_ref(), &observed, Timestamp::now());
    audit_drift_event(stack, ctx, &new_status).await;
    violation_events(stack, ctx, &new_status).await;
    write_status(stack, ctx, new_status).await?;
    let requeue = certificate
        .requeue_after
        .map_or(ctx.options.resync, |d| d.min(ctx.options.resync));
    Ok(Action::requeue(requeue))
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
                .services
                .get(&ObjectRef::new(svc.name.as_str()).within(&model.namespace))?
                .decode();
            let labels = service.metadata.labels.as_ref()?;
            let ours = labels.get(names::STACK_LABEL).map(String::as_str)
                == Some(model.name.as_str())
                && labels.get(names::MANAGED_BY_LABEL).map(String::as_str) == Some(names::MANAGER);
            if !ours {
                return None;
            }
            let ip = service.spec?.cluster_ip?.parse().ok()?;
            Some((svc.name.to_string(), ip))
        })
        .collect()
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
        tracing::warn!(stack = %stack_key(stack), %message, "invalid spec");
        publish(
            stack,
            ctx,
            EventType::Warning,
            "InvalidSpec",
            "Validate",
            message,
        )
        .await;
    }
    let new_status = status::invalid(
        stack.status.as_ref(),
        stack.meta().generation,
        message,
        Timestamp::now(),
    );
    write_status(stack, ctx, new_status).await
}

async fn publish_report(stack: &OpsConductorStack, ctx: &Context, report: &Report) {
    let list = |cause: Cause| -> Vec<String> {
        report
            .written
            .iter()
            .filter(|(c, _, _)| *c == cause)
            .map(|(_, k, n)| format!("{k}/{n}"))
            .collect()
    };
    let created = list(Cause::Created);
    if !created.is_empty() {
        publish(
            stack,
            ctx,
            EventType::Normal,
            "Created",
            "Apply",
            &format!("created {}", created.join(", ")),
        )
        .await;
    }
    for name in list(Cause::Adopted) {
        let (kind, name) = name.split_once('/').unwrap_or_default();
        publish_about(
            stack,
            ctx,
            EventType::Normal,
            "Adopted",
            "Apply",
            &format!(
                "adopted {kind}/{name}: its {} annotation hands it to this stack",
                crate::ownership::ADOPT_ANNOTATION
            ),
            related(stack, kind, name),
        )
        .await;
    }
    let updated = list(Cause::Updated);
    if !updated.is_empty() {
        publish(
            stack,
            ctx,
            EventType::Normal,
            "Updated",
            "Apply",
            &format!("updated {}", updated.join(", ")),
        )
        .await;
    }
    // One Event per object for drift and pruning: Events with the same reason about the same
    // objects are folded into one series, so a per-object `related` keeps each one visible.
    for (cause, kind, name) in &report.written {
        if *cause == Cause::Drift {
            ctx.metrics.drift(kind, "reverted");
            let note = format!("reverted changes made by others to {kind}/{name}");
            tracing::info!(stack = %stack_key(stack), %note, "drift reverted");
            publish_about(
                stack,
                ctx,
                EventType::Warning,
                "DriftReverted",
                "Revert",
                &note,
                related(stack, kind, name),
            )
            .await;
        }
    }
    for (kind, name) in &report.pruned {
        let note = format!("deleted {kind}/{name}: the stack no longer wants it");
        publish_about(
            stack,
            ctx,
            EventType::Normal,
            "Pruned",
            "Delete",
            &note,
            related(stack, kind, name),
        )
        .await;
    }
}

/// The name conflicts last announced by Events, per stack (namespace/name), so that each is
/// announced once and an unchanged stack in conflict causes no write.
static ANNOUNCED_CONFLICTS: LazyLock<Mutex<HashMap<String, BTreeSet<String>>>> =
    LazyLock::new(Mutex::default);

/// A Warning Event for each object that is newly found to be someone else's.
async fn conflict_events(stack: &OpsConductorStack, ctx: &Context, conflicts: &[NameConflict]) {
    let key = stack_key(stack);
    let now: BTreeSet<String> = conflicts.iter().map(NameConflict::object).collect();
    let before = {
        let mut announced = ANNOUNCED_CONFLICTS.lock().unwrap();
        // After a restart, what the stored Ready message names was announced already.
        let before = announced.remove(&key).unwrap_or_else(|| {
            status::condition(stack.status.as_ref(), status::READY)
                .filter(|c| c.reason == "NameConflict")
                .map(|c| {
                    c.message
                        .split_whitespace()
                        .map(|w| w.trim_matches(|ch| ",;:()".contains(ch)).to_string())
                        .collect()
                })
                .unwrap_or_default()
        });
        if !now.is_empty() {
            announced.insert(key.clone(), now.clone());
        }
        before
    };
    for c in conflicts.iter().filter(|c| !before.contains(&c.object())) {
        let note = format!("left alone: {c}");
        tracing::warn!(stack = %key, %note, "name conflict");
        publish_about(
            stack,
            ctx,
            EventType::Warning,
            "NameConflict",
            "Apply",
            &note,
            related(stack, c.kind, &c.name),
        )
        .await;
    }
}

fn related(stack: &OpsConductorStack, kind: &str, name: &str) -> Option<ObjectReference> {
    let api_version = match kind {
        "Deployment" => "apps/v1",
        "NetworkPolicy" | "Ingress" => "networking.k8s.io/v1",
        "HTTPRoute" | "GRPCRoute" | "TLSRoute" | "TCPRoute" | "UDPRoute" => {
            "gateway.networking.k8s.io/v1"
        }
        "PodDisruptionBudget" => "policy/v1",
        _ => "v1",
    };
    Some(ObjectReference {
        api_version: Some(api_version.into()),
        kind: Some(kind.into()),
        name: Some(name.into()),
        namespace: stack.namespace(),
        ..ObjectReference::default()
    })
}

/// What breaks the policy in the stack's namespace, from the audit caches. Managed objects
/// written in this very pass are left out: the cache has not seen the write yet.
fn violations(
    ctx: &Context,
    model: &Stack,
    bundle: &build::Bundle,
    report: &Report,
) -> Vec<crate::crd::Violation> {
    fn in_ns<K>(store: &kube::runtime::reflector::Store<Compact<K>>, ns: &str) -> Vec<K>
    where
        K: Resource<DynamicType = ()> + serde::Serialize + serde::de::DeserializeOwned + Slim,
    {
        store
            .state()
            .iter()
            .filter(|o| o.meta().namespace.as_deref() == Some(ns))
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

/// An Event for each violation that appeared, and for each that was fixed.
async fn violation_events(
    stack: &OpsConductorStack,
    ctx: &Context,
    new_status: &OpsConductorStackStatus,
) {
    // What this process last announced for the stack; the stack's own status is only the
    // starting point after a restart, as the cached stack can lag our last status write.
    let before: Vec<crate::crd::Violation> = {
        let mut announced = ctx.announced_violations.lock().unwrap();
        let key = stack_key(stack);
        let before = announced.get(&key).cloned().unwrap_or_else(|| {
            stack
                .status
                .as_ref()
                .map(|s| s.violations.clone())
                .unwrap_or_default()
        });
        announced.insert(key, new_status.violations.clone());
        before
    };
    for v in new_status.violations.iter().filter(|v| !before.contains(v)) {
        let note = format!("{} {}: {}", v.kind, v.name, v.reason);
        publish_about(
            stack,
            ctx,
            EventType::Warning,
            "PolicyViolation",
            "Audit",
            &note,
            related(stack, &v.kind, &v.name),
        )
        .await;
    }
    for v in before.iter().filter(|v| {
        !new_status
            .violations
            .iter()
            .any(|n| n.kind == v.kind && n.name == v.name)
    }) {
        let note = format!("{} {} no longer breaks the policy", v.kind, v.name);
        publish_about(
            stack,
            ctx,
            EventType::Normal,
            "ViolationResolved",
            "Audit",
            &note,
            related(stack, &v.kind, &v.name),
        )
        .await;
    }
}

/// In Audit mode, drift is reported: an Event when the set of drifted objects changes.
async fn audit_drift_event(
    stack: &OpsConductorStack,
    ctx: &Context,
    new_status: &OpsConductorStackStatus,
) {
    let before = status::condition(stack.status.as_ref(), status::POLICY_ENFORCED);
    let after = status::condition(Some(new_status), status::POLICY_ENFORCED);
    if let Some(after) = after
        && after.reason == "DriftDetected"
        && before.is_none_or(|b| b.message != after.message)
    {
        ctx.metrics.drift("any", "reported");
        publish(
            stack,
            ctx,
            EventType::Warning,
            "DriftDetected",
            "Audit",
            &after.message,
        )
        .await;
    }
}

async fn publish(
    stack: &OpsConductorStack,
    ctx: &Context,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    publish_about(stack, ctx, type_, reason, action, note, None).await;
}

async fn publish_about(
    stack: &OpsConductorStack,
    ctx: &Context,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
    secondary: Option<ObjectReference>,
) {
    let mut note = note.to_string();
    if note.len() > 1000 {
        let mut cut = 997;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary,
    };
    if let Err(e) = ctx.recorder.publish(&event, &reference(stack)).await {
        tracing::warn!(error = %e, reason, "cannot publish event");
    }
}

/// Reads readiness from the caches (and the user's TLS Secret, when there is one).
async fn observe(
    stack: &OpsConductorStack,
    ctx: &Context,
    model: &Stack,
    report: &Report,
    policies: usize,
    (certificate, certificate_verdict): (CertificateStatus, Verdict),
) -> Result<Observed, Error> {
    let ns = model.namespace.as_str();
    let deployment_ready = |name: &str| -> (bool, i32) {
        let Some(d) = ctx
            .stores
            .deployments
            .get(&ObjectRef::new(name).within(ns))
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
        .services
        .get(&ObjectRef::new(&gateway_name).within(ns))
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

    let policy_verdict = if !report.drift_reported.is_empty() {
        let names: Vec<String> = report
            .drift_reported
            .iter()
            .map(|(k, n)| format!("{k}/{n}"))
            .collect();
        Verdict::not(
            "DriftDetected",
            format!(
                "policy mode Audit: changed by others and left as they are: {}",
                names.join(", ")
            ),
        )
    } else if let Some(problems) = ctx
        .stores
        .guardrails
        .as_ref()
        .map(|g| g.problems())
        .filter(|p| !p.is_empty())
    {
        Verdict::not(
            "GuardrailsMissing",
            format!(
                "the admission guardrails are not in place (install them with the chart, \
                 admission.enabled=true, or manifests/admission/): {}",
                problems.join("; ")
            ),
        )
    } else if model.mode == PolicyMode::Audit {
        Verdict::ok(
            "Audited",
            format!(
                "{policies} NetworkPolicies in place; mode Audit reports drift without reverting it"
            ),
        )
    } else {
        Verdict::ok(
            "Enforced",
            format!("{policies} NetworkPolicies in place; every stack pod is default-deny"),
        )
    };
    let total = model.services.len() as i32;
    let conflicts: BTreeSet<String> = report.conflicts.iter().map(NameConflict::object).collect();
    Ok(Observed {
        generation: stack.meta().generation,
        services_ready: total - not_ready.len() as i32,
        services_total: total,
        not_ready_services: not_ready,
        gateway_ready_replicas: gateway_ready,
        gateway_desired_replicas: model.gateway.replicas,
        gateway_address,
        certificate,
        certificate_verdict,
        policy_verdict,
        violations: vec![],
        conflicts: conflicts.into_iter().collect(),
        held: report.held.clone(),
    })
}

/// The certificate's status, its condition, the ACME thumbprint for the gateway, when to
/// look again and the Events to publish.
struct Certificate {
    status: CertificateStatus,
    verdict: Verdict,
    thumbprint: Option<String>,
    requeue_after: Option<std::time::Duration>,
    events: Vec<crate::acme::CertEvent>,
    /// The certificate's Secrets that are someone else's.
    conflicts: Vec<NameConflict>,
}

/// ACME stacks: the ACME engine (reads and writes the stack's certificate Secrets, starts
/// orders in the background). A user's Secret: read and checked (chain, key, hosts, expiry).
async fn certificate(
    stack: &OpsConductorStack,
    ctx: &Context,
    model: &Stack,
) -> Result<Certificate, Error> {
    let now = std::time::SystemTime::now();
    match &model.tls.source {
        CertificateSource::Secret(name) => {
            let secret = Api::<Secret>::namespaced(ctx.client.clone(), &model.namespace)
                .get_opt(name)
                .await?;
            let (status, ok, reason, message) = crate::acme::user_secret_status(
                secret.as_ref(),
                name,
                &model.namespace,
                &model.gateway.hosts,
                now,
            );
            let verdict = if ok {
                Verdict::ok(reason, message)
            } else {
                Verdict::not(reason, message)
            };
            Ok(Certificate {
                status,
                verdict,
                thumbprint: None,
                requeue_after: None,
                events: vec![],
                conflicts: vec![],
            })
        }
        CertificateSource::Acme(acme) => {
            let recorded = recorded_certificate(stack);
            let report = ctx
                .acme
                .reconcile(&ctx.client, model, acme, &recorded, now)
                .await?;
            tracing::debug!(stack = %stack_key(stack), state = ?report.status.state, message = %report.message, "certificate");
            let verdict = if report.ok {
                Verdict::ok(report.reason, report.message)
            } else {
                Verdict::not(report.reason, report.message)
            };
            Ok(Certificate {
                status: report.status,
                verdict,
                thumbprint: report.thumbprint,
                requeue_after: report.requeue_after,
                events: report.events,
                conflicts: report.conflicts,
            })
        }
    }
}

/// What the status says about earlier certificate attempts, when it describes the current
/// spec (the ACME backoff resumes from it after a restart or a change of leader).
fn recorded_certificate(stack: &OpsConductorStack) -> crate::acme::Recorded {
    let Some(status) = stack.status.as_ref().filter(|s| {
        s.observed_generation.is_some() && s.observed_generation == stack.meta().generation
    }) else {
        return crate::acme::Recorded::default();
    };
    crate::acme::Recorded {
        certificate: status.certificate.clone(),
        reason: super::status::condition(Some(status), super::status::CERTIFICATE_READY)
            .map(|c| c.reason.clone()),
    }
}

/// Writes the status with server-side apply, only when it differs from what is stored.
async fn write_status(
    stack: &OpsConductorStack,
    ctx: &Context,
    new_status: OpsConductorStackStatus,
) -> Result<(), Error> {
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
