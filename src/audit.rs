//! The violation audit: what in the stack's namespace breaks the edge-TLS / internal-HTTP
//! policy of docs/api.md. A pure function over objects the controller has already read; it never
//! writes, and nothing it reports is modified or deleted by the operator.
//!
//! # What is a violation
//! - a Service whose type is not `ClusterIP` (NodePort, LoadBalancer, ExternalName), except the
//!   stack's own gateway Service with exactly the type the spec asks for;
//! - a Service with `externalIPs` (the gateway's included: the operator never sets them);
//! - a Pod with `hostNetwork`, `hostPID` or a `hostPort` on any container;
//! - every Ingress, and every Gateway API route (HTTPRoute, GRPCRoute, TLSRoute, TCPRoute,
//!   UDPRoute): the operator creates none, so each is a way in around the gateway;
//! - a NetworkPolicy that opens the stack's pods (or its backends) to more than the stack
//!   declares: NetworkPolicies add up, so any other policy selecting those pods with an ingress
//!   rule widens the default-deny (an empty `podSelector` selects them too); egress rules for
//!   the stack's pods likewise. The stack's own policies are exempt only while their spec is
//!   exactly the declared one.
//!
//! # Managed or not
//! Exemptions (the gateway Service's type, the stack's own NetworkPolicies) go only to objects
//! the stack really manages. Labels alone prove nothing, since anyone can copy them, so an
//! object counts as managed only when all of these hold:
//! 1. it carries `app.kubernetes.io/managed-by: opsconductor-operator` and
//!    `opsconductor.io/stack: <stack>`;
//! 2. it has a *controller* owner reference to this OpsConductorStack (group
//!    `opsconductor.io`, the stack's name, and the stack's uid when the model has one, which the
//!    controller's always does);
//! 3. its kind and name are among the objects the stack's [`Bundle`] wants; names are unique
//!    per kind and namespace, so a copy cannot take an existing name, and a copy under another
//!    name is never managed.
//!
//! Managed objects are still checked: an exemption covers only what the operator itself chose.
//! A managed Service that someone turned NodePort, or a managed pod template given
//! `hostNetwork`, is drift; it is reported here until the controller has reverted it.
//!
//! # Pods
//! Pods are checked whoever owns them, the stack's own Deployments' pods included: the
//! operator never asks for host networking, host PID or host ports, so such a pod is either
//! not the stack's or drift, and in both cases it is running with the host's network or
//! processes now. No ownership chain (Pod -> ReplicaSet -> Deployment) is needed for that.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::{
    Ingress, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::core::DynamicObject;

use crate::build::Bundle;
use crate::crd::Violation;
use crate::model::Stack;
use crate::names;

/// How many violations `status.violations` lists; `status.violationCount` has the total.
pub const MAX_REPORTED: usize = 50;

/// Gateway API route kinds the audit reports: `(group, kind, plural)`. The controller lists
/// those its API server serves (discovery), in whatever version is preferred.
pub const GATEWAY_ROUTE_KINDS: &[(&str, &str, &str)] = &[
    ("gateway.networking.k8s.io", "HTTPRoute", "httproutes"),
    ("gateway.networking.k8s.io", "GRPCRoute", "grpcroutes"),
    ("gateway.networking.k8s.io", "TLSRoute", "tlsroutes"),
    ("gateway.networking.k8s.io", "TCPRoute", "tcproutes"),
    ("gateway.networking.k8s.io", "UDPRoute", "udproutes"),
];

/// A Gateway API route found in the namespace. Only its kind and name matter: every route is
/// a violation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub kind: String,
    pub name: String,
}

impl Route {
    /// From a listed object; `kind` is the kind that was listed (list items may lack their
    /// `kind`).
    pub fn from_dynamic(kind: &str, object: &DynamicObject) -> Route {
        Route {
            kind: object
                .types
                .as_ref()
                .map(|t| t.kind.clone())
                .filter(|k| !k.is_empty())
                .unwrap_or_else(|| kind.to_string()),
            name: object.metadata.name.clone().unwrap_or_default(),
        }
    }

    /// From a JSON object (e.g. `kubectl get httproutes -o json` items).
    pub fn from_value(kind: &str, object: &serde_json::Value) -> Route {
        Route {
            kind: object["kind"]
                .as_str()
                .filter(|k| !k.is_empty())
                .unwrap_or(kind)
                .to_string(),
            name: object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        }
    }
}

/// Everything the controller read from the stack's namespace.
#[derive(Clone, Debug, Default)]
pub struct Found {
    pub services: Vec<Service>,
    pub pods: Vec<Pod>,
    pub ingresses: Vec<Ingress>,
    pub network_policies: Vec<NetworkPolicy>,
    /// Gateway API routes, when that API is installed; empty otherwise.
    pub routes: Vec<Route>,
}

/// The violations in `found`, sorted and without duplicates. `desired` is the stack's bundle
/// (`build::build(stack, ..)`): it says which objects the stack manages and what its
/// NetworkPolicies and pods look like.
pub fn audit(stack: &Stack, desired: &Bundle, found: &Found) -> Vec<Violation> {
    let ctx = Context::new(stack, desired, found);
    let mut out = Vec::new();
    for svc in &found.services {
        ctx.service(svc, &mut out);
    }
    for pod in &found.pods {
        pod_violations(pod, &mut out);
        joined(stack, desired, pod, &mut out);
    }
    for ing in &found.ingresses {
        out.push(violation(
            "Ingress",
            &ing.metadata,
            "an Ingress routes traffic from outside the cluster into the namespace around the \
             stack's gateway"
                .into(),
        ));
    }
    for r in &found.routes {
        out.push(Violation {
            kind: r.kind.clone(),
            name: r.name.clone(),
            reason: format!(
                "a Gateway API {} can route traffic from outside the cluster into the namespace \
                 around the stack's gateway",
                r.kind
            ),
        });
    }
    for np in &found.network_policies {
        ctx.network_policy(np, &mut out);
    }
    out.sort();
    out.dedup();
    out
}

/// The first `max` violations, for `status.violations`, and the total count.
pub fn capped(mut violations: Vec<Violation>, max: usize) -> (Vec<Violation>, usize) {
    let total = violations.len();
    violations.truncate(max);
    (violations, total)
}

fn violation(kind: &str, meta: &ObjectMeta, reason: String) -> Violation {
    Violation {
        kind: kind.into(),
        name: meta.name.clone().unwrap_or_default(),
        reason,
    }
}

/// Pods a NetworkPolicy must not open up: the stack's (by their pod-template labels, so they
/// count before any pod exists) and the backends' (the pods found that a backend selects).
struct Protected {
    /// Shown in reasons: `gateway`, a service's name, or `backend postgres`.
    what: String,
    labels: BTreeMap<String, String>,
    /// Stack pods: their egress is the stack's too. Backends: only their ingress is.
    stack_pod: bool,
}

struct Context<'a> {
    stack: &'a Stack,
    desired: &'a Bundle,
    protected: Vec<Protected>,
}

impl<'a> Context<'a> {
    fn new(stack: &'a Stack, desired: &'a Bundle, found: &Found) -> Self {
        let gateway = names::gateway(&stack.name);
        let mut protected: Vec<Protected> = desired
            .deployments
            .iter()
            .filter_map(|d| {
                let name = d.metadata.name.clone()?;
                let labels = d
                    .spec
                    .as_ref()?
                    .template
                    .metadata
                    .as_ref()?
                    .labels
                    .clone()?;
                Some(Protected {
                    what: if name == gateway {
                        "the gateway".into()
                    } else {
                        name
                    },
                    labels,
                    stack_pod: true,
                })
            })
            .collect();
        for backend in &stack.backends {
            for pod in &found.pods {
                let labels = pod.metadata.labels.clone().unwrap_or_default();
                if selects(&backend.pod_selector, &labels) {
                    protected.push(Protected {
                        what: format!("backend {}", backend.name),
                        labels,
                        stack_pod: false,
                    });
                }
            }
        }
        Context {
            stack,
            desired,
            protected,
        }
    }

    /// Is this object one the stack manages (see the module docs)?
    fn managed<'n>(
        &self,
        meta: &ObjectMeta,
        desired_names: impl IntoIterator<Item = Option<&'n String>>,
    ) -> bool {
        let labels = meta.labels.clone().unwrap_or_default();
        let labelled = labels.get(names::MANAGED_BY_LABEL).map(String::as_str)
            == Some(names::MANAGER)
            && labels.get(names::STACK_LABEL).map(String::as_str) == Some(self.stack.name.as_str());
        let owned = meta.owner_references.iter().flatten().any(|o| {
            o.controller == Some(true)
                && o.kind == "OpsConductorStack"
                && o.api_version.split('/').next() == Some("opsconductor.io")
                && o.name == self.stack.name.as_str()
                && self.stack.uid.as_ref().is_none_or(|uid| &o.uid == uid)
        });
        let desired = meta.name.as_ref().is_some_and(|name| {
            desired_names
                .into_iter()
                .any(|d| d.is_some_and(|d| d == name))
        });
        labelled && owned && desired
    }

    fn service(&self, svc: &Service, out: &mut Vec<Violation>) {
        let managed = self.managed(
            &svc.metadata,
            self.desired
                .services
                .iter()
                .map(|s| s.metadata.name.as_ref()),
        );
        let spec = svc.spec.clone().unwrap_or_default();
        let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
        // The one exemption: the stack's gateway Service with the type the spec asks for.
        let allowed_type = managed
            .then(|| {
                self.desired
                    .services
                    .iter()
                    .find(|d| d.metadata.name == svc.metadata.name)
                    .and_then(|d| d.spec.as_ref()?.type_.clone())
            })
            .flatten()
            .unwrap_or_else(|| "ClusterIP".into());
        if ty != "ClusterIP" && ty != allowed_type {
            let reason = match ty {
                "NodePort" => "type NodePort exposes a service outside the gateway: it opens a \
                               port on every node"
                    .to_string(),
                "LoadBalancer" => "type LoadBalancer exposes a service outside the gateway: it \
                                   gets its own external address"
                    .to_string(),
                "ExternalName" => "type ExternalName makes this name an alias for an outside \
                                   host; services in a stack's namespace must be plain ClusterIP"
                    .to_string(),
                other => format!("type {other} is not ClusterIP"),
            };
            out.push(violation("Service", &svc.metadata, reason));
        }
        if let Some(ips) = spec.external_ips.filter(|ips| !ips.is_empty()) {
            out.push(violation(
                "Service",
                &svc.metadata,
                format!(
                    "externalIPs ({}) make the service reachable from outside the cluster, \
                     around the gateway",
                    ips.join(", ")
                ),
            ));
        }
    }

    fn network_policy(&self, np: &NetworkPolicy, out: &mut Vec<Violation>) {
        let desired = self
            .desired
            .network_policies
            .iter()
            .find(|d| d.metadata.name.is_some() && d.metadata.name == np.metadata.name);
        let managed = self.managed(&np.metadata, desired.map(|d| d.metadata.name.as_ref()));
        if managed {
            // The same answer apply gives before it writes the policy again.
            let same = desired.is_some_and(|d| {
                match (serde_json::to_value(np), serde_json::to_value(d)) {
                    (Ok(actual), Ok(desired)) => {
                        crate::controller::diff::holds_exactly(&actual, &desired)
                    }
                    _ => false,
                }
            });
            if !same {
                out.push(violation(
                    "NetworkPolicy",
                    &np.metadata,
                    "was changed after the operator wrote it: it no longer matches the \
                     connections the stack declares"
                        .into(),
                ));
            }
            return;
        }
        let spec = np.spec.clone().unwrap_or_default();
        let selector = spec.pod_selector.clone().unwrap_or_default();
        let selected: Vec<&Protected> = self
            .protected
            .iter()
            .filter(|p| selects(&selector, &p.labels))
            .collect();
        if selected.is_empty() {
            return;
        }
        let ingress = spec.ingress.clone().unwrap_or_default();
        let egress = spec.egress.clone().unwrap_or_default();
        // Kubernetes' rule for missing policyTypes: Ingress always, Egress when it has rules.
        let types = spec.policy_types.clone().unwrap_or_else(|| {
            let mut t = vec!["Ingress".to_string()];
            if !egress.is_empty() {
                t.push("Egress".into());
            }
            t
        });
        if types.iter().any(|t| t == "Ingress") && !ingress.is_empty() {
            let sources: Vec<String> = ingress
                .iter()
                .map(|r| describe_rule(r.from.as_deref(), r.ports.as_deref(), "anywhere"))
                .collect();
            out.push(violation(
                "NetworkPolicy",
                &np.metadata,
                format!(
                    "opens {} to traffic the stack does not declare ({}); NetworkPolicies add \
                     up, so this widens the stack's default-deny",
                    list(&selected),
                    sources.join("; ")
                ),
            ));
        }
        let stack_pods: Vec<&Protected> = selected.into_iter().filter(|p| p.stack_pod).collect();
        if types.iter().any(|t| t == "Egress") && !egress.is_empty() && !stack_pods.is_empty() {
            let targets: Vec<String> = egress
                .iter()
                .map(|r| describe_rule(r.to.as_deref(), r.ports.as_deref(), "anywhere"))
                .collect();
            out.push(violation(
                "NetworkPolicy",
                &np.metadata,
                format!(
                    "lets {} send traffic the stack does not declare ({}); NetworkPolicies add \
                     up, so this widens the stack's default-deny",
                    list(&stack_pods),
                    targets.join("; ")
                ),
            ));
        }
    }
}

/// `the pods of auth`, `the pods of the gateway, auth and backend postgres`.
fn list(pods: &[&Protected]) -> String {
    let what: BTreeSet<&str> = pods.iter().map(|p| p.what.as_str()).collect();
    let what: Vec<&str> = what.into_iter().collect();
    let words = match what.as_slice() {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    };
    format!("the pods of {words}")
}

/// What the audit finds wrong with one Pod on its own.
#[cfg(test)]
pub(crate) fn pod_findings(pod: &Pod) -> Vec<Violation> {
    let mut out = Vec::new();
    pod_violations(pod, &mut out);
    out
}

fn pod_violations(pod: &Pod, out: &mut Vec<Violation>) {
    let Some(spec) = &pod.spec else { return };
    if spec.host_network == Some(true) {
        out.push(violation(
            "Pod",
            &pod.metadata,
            "uses the node's network (hostNetwork): its ports are open on the node, outside the \
             gateway and the NetworkPolicies"
                .into(),
        ));
    }
    if spec.host_pid == Some(true) {
        out.push(violation(
            "Pod",
            &pod.metadata,
            "shares the node's process namespace (hostPID): it can see every process on the node"
                .into(),
        ));
    }
    let mut host_ports = Vec::new();
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .map(|c| (&c.name, c.ports.as_deref()));
    let ephemeral = spec
        .ephemeral_containers
        .iter()
        .flatten()
        .map(|c| (&c.name, c.ports.as_deref()));
    for (name, ports) in containers.chain(ephemeral) {
        for p in ports.into_iter().flatten() {
            if let Some(hp) = p.host_port.filter(|hp| *hp != 0) {
                host_ports.push(format!("{name} {hp}"));
            }
        }
    }
    if !host_ports.is_empty() {
        out.push(violation(
            "Pod",
            &pod.metadata,
            format!(
                "binds ports on the node (hostPort: {}), reachable from outside the cluster \
                 around the gateway",
                host_ports.join(", ")
            ),
        ));
    }
}

/// A pod with the stack's label that none of the stack's Deployments made (through a
/// ReplicaSet `<deployment>-<pod-template-hash>`): it joins the stack's Services and
/// NetworkPolicies without being the stack's (issue 14, item 3; admission denies it in
/// protected namespaces, this reports what got in).
fn joined(stack: &Stack, desired: &Bundle, pod: &Pod, out: &mut Vec<Violation>) {
    let labelled = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(names::STACK_LABEL))
        .is_some_and(|v| v == stack.name.as_str());
    if !labelled {
        return;
    }
    let from_our_deployment = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .filter(|r| r.controller == Some(true) && r.kind == "ReplicaSet")
        .any(|r| {
            desired.deployments.iter().any(|d| {
                d.metadata.name.as_deref().is_some_and(|d| {
                    r.name
                        .strip_prefix(d)
                        .and_then(|rest| rest.strip_prefix('-'))
                        .is_some_and(|hash| {
                            !hash.is_empty() && hash.chars().all(|c| c.is_ascii_alphanumeric())
                        })
                })
            })
        });
    if !from_our_deployment {
        out.push(violation(
            "Pod",
            &pod.metadata,
            format!(
                "carries the stack's label {}={} but was not created by the stack's \
                 Deployments: the stack's Services and NetworkPolicies select it",
                names::STACK_LABEL,
                stack.name
            ),
        ));
    }
}

/// `from` / `to` peers and ports of one rule, in words.
fn describe_rule(
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    everyone: &str,
) -> String {
    let who = match peers {
        None | Some([]) => everyone.to_string(),
        Some(peers) => peers
            .iter()
            .map(describe_peer)
            .collect::<Vec<_>>()
            .join(", "),
    };
    let on = match ports {
        None | Some([]) => "any port".to_string(),
        Some(ports) => {
            let p: Vec<String> = ports
                .iter()
                .map(|p| {
                    let proto = p.protocol.as_deref().unwrap_or("TCP");
                    match (&p.port, p.end_port) {
                        (None, _) => format!("{proto} any port"),
                        (Some(port), Some(end)) => format!("{proto} {}-{end}", intstr(port)),
                        (Some(port), None) => format!("{proto} {}", intstr(port)),
                    }
                })
                .collect();
            p.join(", ")
        }
    };
    format!("{who} on {on}")
}

fn intstr(v: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString) -> String {
    match v {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i) => i.to_string(),
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s.clone(),
    }
}

fn describe_peer(peer: &NetworkPolicyPeer) -> String {
    if let Some(block) = &peer.ip_block {
        return match block.except.as_deref() {
            Some(except) if !except.is_empty() => {
                format!("{} except {}", block.cidr, except.join(", "))
            }
            _ => block.cidr.clone(),
        };
    }
    let pods = peer.pod_selector.as_ref().map(describe_selector);
    let namespaces = peer.namespace_selector.as_ref().map(describe_selector);
    match (pods, namespaces) {
        (Some(p), None) => format!("pods {p} in this namespace"),
        (None, Some(n)) => format!("every pod in namespaces {n}"),
        (Some(p), Some(n)) => format!("pods {p} in namespaces {n}"),
        (None, None) => "anywhere".into(),
    }
}

fn describe_selector(s: &LabelSelector) -> String {
    let mut parts: Vec<String> = s
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in s.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            op => format!("{} {} ({values})", e.key, op.to_lowercase()),
        });
    }
    if parts.is_empty() {
        "(all)".into()
    } else {
        format!("with {}", parts.join(", "))
    }
}

/// Kubernetes label-selector semantics: every `matchLabels` pair and every expression must
/// hold; an empty selector selects everything. An unknown operator selects nothing.
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let pairs = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    pairs && expressions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{BuildOptions, build};
    use crate::crd::OpsConductorStack;
    use crate::validate::validate;
    use serde_json::{Value, json};

    const UID: &str = "0b5e6c1a-0000-4000-8000-000000000001";

    fn stack() -> Stack {
        let cr: OpsConductorStack = serde_json::from_value(json!({
            "apiVersion": "opsconductor.io/v1alpha1",
            "kind": "OpsConductorStack",
            "metadata": {"name": "prod", "namespace": "ops", "uid": UID},
            "spec": {
                "gateway": {"hosts": ["ops.example.com"]},
                "tls": {"secretName": "cert"},
                "services": [
                    {"name": "auth", "image": "auth:1", "route": "/auth/", "calls": ["users"]},
                    {"name": "users", "image": "users:1"},
                ],
                "backends": [
                    {"name": "postgres", "podSelector": {"matchLabels": {"app": "postgres"}},
                     "ports": [5432], "allowFrom": ["auth"]},
                ],
            }
        }))
        .unwrap();
        validate(&cr, "ops").unwrap()
    }

    fn run(found: &Found) -> Vec<Violation> {
        let stack = stack();
        audit(&stack, &build(&stack, &BuildOptions::default()), found)
    }

    /// The stack's own objects exactly as built: no violations.
    fn own_objects() -> Found {
        let stack = stack();
        let bundle = build(&stack, &BuildOptions::default());
        let pods = bundle
            .deployments
            .iter()
            .map(|d| {
                let template = d.spec.clone().unwrap().template;
                let name = d.metadata.name.clone().unwrap();
                Pod {
                    metadata: ObjectMeta {
                        name: Some(format!("{name}-5d8f-abcde")),
                        labels: template.metadata.unwrap().labels,
                        // Made by the Deployment's ReplicaSet, as the controllers do.
                        owner_references: Some(vec![
                            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                                api_version: "apps/v1".into(),
                                kind: "ReplicaSet".into(),
                                name: format!("{name}-5d8f"),
                                uid: "rs".into(),
                                controller: Some(true),
                                block_owner_deletion: Some(true),
                            },
                        ]),
                        ..ObjectMeta::default()
                    },
                    spec: template.spec,
                    ..Pod::default()
                }
            })
            .collect();
        Found {
            services: bundle.services.clone(),
            pods,
            network_policies: bundle.network_policies.clone(),
            ..Found::default()
        }
    }

    fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    fn service(name: &str, spec: Value) -> Service {
        from(json!({"metadata": {"name": name}, "spec": spec}))
    }

    fn pod(name: &str, labels: Value, spec: Value) -> Pod {
        from(json!({"metadata": {"name": name, "labels": labels}, "spec": spec}))
    }

    fn container(ports: Value) -> Value {
        json!({"name": "main", "image": "x", "ports": ports})
    }

    fn policy(name: &str, spec: Value) -> NetworkPolicy {
        from(json!({"metadata": {"name": name}, "spec": spec}))
    }

    fn only(v: Vec<Violation>) -> Violation {
        assert_eq!(v.len(), 1, "expected one violation, got {v:#?}");
        v.into_iter().next().unwrap()
    }

    #[test]
    fn a_pod_with_the_stacks_label_not_made_by_its_deployments_is_reported() {
        let mut found = own_objects();
        let mut joiner = found.pods[0].clone();
        joiner.metadata.name = Some("joiner".into());
        joiner.metadata.owner_references = None;
        let mut foreign_rs = found.pods[0].clone();
        foreign_rs.metadata.name = Some("other-abc-x".into());
        foreign_rs.metadata.owner_references.as_mut().unwrap()[0].name = "other-abc".into();
        found.pods.extend([joiner, foreign_rs]);
        let names: Vec<String> = run(&found)
            .into_iter()
            .filter(|v| v.reason.contains("not created by the stack's Deployments"))
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["joiner", "other-abc-x"]);
    }

    #[test]
    fn the_stacks_own_objects_are_clean() {
        assert_eq!(run(&own_objects()), vec![]);
    }

    #[test]
    fn nodeport_loadbalancer_and_externalname_services_are_reported() {
        for (ty, words) in [
            (
                "NodePort",
                "type NodePort exposes a service outside the gateway",
            ),
            (
                "LoadBalancer",
                "type LoadBalancer exposes a service outside the gateway",
            ),
            ("ExternalName", "type ExternalName"),
        ] {
            let mut found = own_objects();
            found.services.push(service(
                "legacy-admin",
                json!({"type": ty, "externalName": "x.example"}),
            ));
            let v = only(run(&found));
            assert_eq!(
                (v.kind.as_str(), v.name.as_str()),
                ("Service", "legacy-admin")
            );
            assert!(v.reason.starts_with(words), "{ty}: {}", v.reason);
        }
    }

    #[test]
    fn clusterip_and_headless_services_are_fine() {
        let mut found = own_objects();
        found
            .services
            .push(service("plain", json!({"ports": [{"port": 80}]})));
        found
            .services
            .push(service("explicit", json!({"type": "ClusterIP"})));
        found.services.push(service(
            "headless",
            json!({"type": "ClusterIP", "clusterIP": "None"}),
        ));
        assert_eq!(run(&found), vec![]);
    }

    #[test]
    fn external_ips_are_reported_even_on_a_clusterip_service_and_on_the_gateway() {
        let mut found = own_objects();
        found.services.push(service(
            "sneaky",
            json!({"type": "ClusterIP", "externalIPs": ["203.0.113.9"]}),
        ));
        let gateway = found
            .services
            .iter_mut()
            .find(|s| s.metadata.name.as_deref() == Some("prod-gateway"))
            .unwrap();
        gateway.spec.as_mut().unwrap().external_ips = Some(vec!["198.51.100.1".into()]);
        let v = run(&found);
        assert_eq!(v.len(), 2, "{v:#?}");
        assert!(v.iter().all(|v| v.reason.starts_with("externalIPs (")));
        assert!(v[1].reason.contains("203.0.113.9"), "{v:#?}");
    }

    #[test]
    fn the_gateway_may_have_only_the_type_the_spec_asks_for() {
        // Built as LoadBalancer (the default): NodePort on the managed gateway is drift.
        let mut found = own_objects();
        let gateway = found
            .services
            .iter_mut()
            .find(|s| s.metadata.name.as_deref() == Some("prod-gateway"))
            .unwrap();
        assert_eq!(
            gateway.spec.as_ref().unwrap().type_.as_deref(),
            Some("LoadBalancer")
        );
        gateway.spec.as_mut().unwrap().type_ = Some("NodePort".into());
        let v = only(run(&found));
        assert_eq!(v.name, "prod-gateway");
        assert!(v.reason.starts_with("type NodePort"));
    }

    #[test]
    fn a_cluster_ip_gateway_turned_load_balancer_or_node_port_is_reported() {
        // serviceType: ClusterIP (behind an existing ingress): the gateway has no exemption.
        let mut stack = stack();
        stack.gateway.service_type = crate::model::GatewayServiceType::ClusterIp;
        let bundle = build(&stack, &BuildOptions::default());
        let gateway = bundle
            .services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some("prod-gateway"))
            .unwrap()
            .clone();
        let found = |svc: &Service| Found {
            services: vec![svc.clone()],
            ..Found::default()
        };
        assert_eq!(audit(&stack, &bundle, &found(&gateway)), vec![]);
        for ty in ["LoadBalancer", "NodePort"] {
            let mut changed = gateway.clone();
            changed.spec.as_mut().unwrap().type_ = Some(ty.into());
            let v = only(audit(&stack, &bundle, &found(&changed)));
            assert!(v.reason.starts_with(&format!("type {ty}")), "{}", v.reason);
        }
    }

    #[test]
    fn copied_labels_do_not_make_a_service_managed() {
        let stack = stack();
        let bundle = build(&stack, &BuildOptions::default());
        let real = bundle
            .services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some("prod-gateway"))
            .unwrap();
        // Same labels and owner reference, another name: not one of the stack's objects.
        let mut copy = real.clone();
        copy.metadata.name = Some("prod-gateway-2".into());
        // Same name and labels but no owner reference (the real one is not there).
        let mut unowned = real.clone();
        unowned.metadata.owner_references = None;
        // Owner reference to another stack with the same name (a different uid).
        let mut other_uid = real.clone();
        other_uid.metadata.owner_references.as_mut().unwrap()[0].uid = "another".into();
        // A non-controller owner reference.
        let mut not_controller = real.clone();
        not_controller.metadata.owner_references.as_mut().unwrap()[0].controller = Some(false);
        // Owned, but without the labels.
        let mut unlabelled = real.clone();
        unlabelled.metadata.labels = None;
        for (what, svc) in [
            ("copy", copy),
            ("unowned", unowned),
            ("other uid", other_uid),
            ("not controller", not_controller),
            ("unlabelled", unlabelled),
        ] {
            let found = Found {
                services: vec![svc],
                ..Found::default()
            };
            let v = only(audit(&stack, &bundle, &found));
            assert!(
                v.reason.starts_with("type LoadBalancer"),
                "{what}: {}",
                v.reason
            );
        }
        // And the real one is exempt.
        let found = Found {
            services: vec![real.clone()],
            ..Found::default()
        };
        assert_eq!(audit(&stack, &bundle, &found), vec![]);
    }

    #[test]
    fn an_internal_service_turned_nodeport_is_drift_and_reported() {
        let mut found = own_objects();
        let auth = found
            .services
            .iter_mut()
            .find(|s| s.metadata.name.as_deref() == Some("auth"))
            .unwrap();
        auth.spec.as_mut().unwrap().type_ = Some("NodePort".into());
        let v = only(run(&found));
        assert_eq!(v.name, "auth");
    }

    #[test]
    fn host_network_host_pid_and_host_ports_are_reported_per_problem() {
        let mut found = own_objects();
        found.pods.push(pod(
            "debug",
            json!({"app": "debug"}),
            json!({"hostNetwork": true, "hostPID": true, "containers": [container(json!([{"containerPort": 80, "hostPort": 8080}]))],
                   "initContainers": [{"name": "init", "image": "x", "ports": [{"containerPort": 1, "hostPort": 9090}]}]}),
        ));
        let v = run(&found);
        let reasons: Vec<&str> = v.iter().map(|v| v.reason.as_str()).collect();
        assert_eq!(v.len(), 3, "{reasons:#?}");
        assert!(v.iter().all(|v| v.kind == "Pod" && v.name == "debug"));
        assert!(reasons.iter().any(|r| r.contains("(hostNetwork)")));
        assert!(reasons.iter().any(|r| r.contains("(hostPID)")));
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("hostPort: main 8080, init 9090"))
        );
    }

    #[test]
    fn container_ports_without_host_ports_are_fine() {
        let mut found = own_objects();
        found.pods.push(pod(
            "web",
            json!({"app": "web"}),
            json!({"hostNetwork": false, "containers": [container(json!([{"containerPort": 80}]))]}),
        ));
        assert_eq!(run(&found), vec![]);
    }

    #[test]
    fn the_stacks_own_pods_are_checked_too() {
        let mut found = own_objects();
        let p = found
            .pods
            .iter_mut()
            .find(|p| p.metadata.name.as_deref().unwrap().starts_with("auth-"))
            .unwrap();
        p.spec.as_mut().unwrap().host_network = Some(true);
        let v = only(run(&found));
        assert!(v.name.starts_with("auth-") && v.reason.contains("hostNetwork"));
    }

    #[test]
    fn every_ingress_and_gateway_route_is_reported() {
        let mut found = own_objects();
        found.ingresses.push(from(json!({"metadata": {"name": "web",
            "labels": {"app.kubernetes.io/managed-by": "opsconductor-operator", "opsconductor.io/stack": "prod"}}})));
        let http: DynamicObject = from(json!({"apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute", "metadata": {"name": "api"}}));
        let untyped: DynamicObject = from(json!({"metadata": {"name": "grpc"}}));
        found.routes.push(Route::from_dynamic("HTTPRoute", &http));
        found
            .routes
            .push(Route::from_dynamic("GRPCRoute", &untyped));
        found.routes.push(Route::from_value(
            "TCPRoute",
            &json!({"metadata": {"name": "db"}}),
        ));
        let v = run(&found);
        let kinds: Vec<(&str, &str)> = v
            .iter()
            .map(|v| (v.kind.as_str(), v.name.as_str()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("GRPCRoute", "grpc"),
                ("HTTPRoute", "api"),
                ("Ingress", "web"),
                ("TCPRoute", "db")
            ]
        );
        assert!(v[1].reason.contains("a Gateway API HTTPRoute"));
        assert!(v[2].reason.contains("around the stack's gateway"));
    }

    #[test]
    fn a_policy_opening_stack_pods_is_reported_with_what_it_opens() {
        let mut found = own_objects();
        found.network_policies.push(policy(
            "allow-monitoring",
            json!({"podSelector": {"matchLabels": {"app.kubernetes.io/name": "auth"}},
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "obs"}}}],
                                "ports": [{"port": 9090}]}]}),
        ));
        let v = only(run(&found));
        assert_eq!(v.name, "allow-monitoring");
        assert_eq!(
            v.reason,
            "opens the pods of auth to traffic the stack does not declare (every pod in \
             namespaces with team=obs on TCP 9090); NetworkPolicies add up, so this widens the \
             stack's default-deny"
        );
    }

    #[test]
    fn an_empty_pod_selector_selects_the_stack_too() {
        let mut found = own_objects();
        found.network_policies.push(policy(
            "allow-all",
            json!({"podSelector": {}, "ingress": [{}]}),
        ));
        let v = only(run(&found));
        assert!(
            v.reason
                .starts_with("opens the pods of auth, the gateway and users to traffic"),
            "{}",
            v.reason
        );
        assert!(v.reason.contains("(anywhere on any port)"), "{}", v.reason);
    }

    #[test]
    fn deny_policies_and_policies_for_other_pods_are_fine() {
        let mut found = own_objects();
        // Deny-all ingress: selects the stack but allows nothing.
        found.network_policies.push(policy(
            "deny-all",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        ));
        // Ingress rules, but types say egress only: the ingress rules do not apply.
        found.network_policies.push(policy(
            "egress-typed",
            json!({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]}),
        ));
        // Opens other pods only.
        found.network_policies.push(policy(
            "other-app",
            json!({"podSelector": {"matchLabels": {"app": "other"}}, "ingress": [{}]}),
        ));
        found.network_policies.push(policy(
            "not-the-stack",
            json!({"podSelector": {"matchExpressions": [
                {"key": "opsconductor.io/stack", "operator": "DoesNotExist"}]}, "ingress": [{}], "egress": [{}]}),
        ));
        assert_eq!(run(&found), vec![]);
    }

    #[test]
    fn egress_for_stack_pods_is_reported_but_not_for_backends() {
        let mut found = own_objects();
        found.pods.push(pod(
            "postgres-0",
            json!({"app": "postgres"}),
            json!({"containers": [container(json!([]))]}),
        ));
        found.network_policies.push(policy(
            "backup-egress",
            json!({"podSelector": {"matchLabels": {"app": "postgres"}}, "policyTypes": ["Egress"],
                   "egress": [{"to": [{"ipBlock": {"cidr": "10.9.0.0/16"}}]}]}),
        ));
        assert_eq!(run(&found), vec![], "a backend's egress is not the stack's");
        found.network_policies.push(policy(
            "users-out",
            json!({"podSelector": {"matchExpressions": [
                {"key": "app.kubernetes.io/name", "operator": "In", "values": ["users", "x"]}]},
                   "policyTypes": ["Egress"],
                   "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
                               "ports": [{"port": 1000, "endPort": 2000}]}]}),
        ));
        let v = only(run(&found));
        assert_eq!(
            v.reason,
            "lets the pods of users send traffic the stack does not declare (0.0.0.0/0 \
             except 10.0.0.0/8 on TCP 1000-2000); NetworkPolicies add up, so this widens the \
             stack's default-deny"
        );
    }

    #[test]
    fn a_policy_opening_a_backend_is_reported() {
        let mut found = own_objects();
        found.pods.push(pod(
            "postgres-0",
            json!({"app": "postgres", "role": "primary"}),
            json!({"containers": [container(json!([]))]}),
        ));
        found.network_policies.push(policy(
            "pg-open",
            json!({"podSelector": {"matchLabels": {"role": "primary"}},
                   "ingress": [{"from": [{"podSelector": {}}]}]}),
        ));
        let v = only(run(&found));
        assert!(
            v.reason.starts_with(
                "opens the pods of backend postgres to traffic the stack does not \
                 declare (pods (all) in this namespace on any port)"
            ),
            "{}",
            v.reason
        );
    }

    #[test]
    fn missing_policy_types_follow_kubernetes_defaults() {
        let mut found = own_objects();
        // No policyTypes and egress rules only: Ingress (with no rules) and Egress apply.
        found.network_policies.push(policy(
            "implicit",
            json!({"podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}},
                   "egress": [{"ports": [{"port": 25}]}]}),
        ));
        let v = only(run(&found));
        assert!(
            v.reason.starts_with("lets the pods of the gateway send"),
            "{}",
            v.reason
        );
        assert!(v.reason.contains("anywhere on TCP 25"), "{}", v.reason);
    }

    #[test]
    fn a_changed_managed_policy_is_drift_and_a_copied_one_is_not_managed() {
        let mut found = own_objects();
        let np = found
            .network_policies
            .iter_mut()
            .find(|p| p.metadata.name.as_deref() == Some("prod-svc-users"))
            .unwrap();
        let mut copy = np.clone();
        np.spec.as_mut().unwrap().ingress.as_mut().unwrap()[0]
            .from
            .as_mut()
            .unwrap()
            .push(from(json!({"ipBlock": {"cidr": "0.0.0.0/0"}})));
        let v = only(run(&found));
        assert_eq!(v.name, "prod-svc-users");
        assert!(
            v.reason
                .starts_with("was changed after the operator wrote it")
        );

        // The original spec under another name, with the stack's labels and owner: not
        // managed, and it opens users to the gateway and auth: reported.
        let mut found = own_objects();
        copy.metadata.name = Some("prod-svc-users-copy".into());
        found.network_policies.push(copy);
        let v = only(run(&found));
        assert_eq!(v.name, "prod-svc-users-copy");
        assert!(
            v.reason.starts_with("opens the pods of users"),
            "{}",
            v.reason
        );
    }

    #[test]
    fn a_managed_policy_read_back_without_empty_lists_is_unchanged() {
        let mut found = own_objects();
        // The API server drops empty lists (e.g. `ingress: []` of the default-deny).
        for np in &mut found.network_policies {
            let spec = np.spec.as_mut().unwrap();
            if spec.ingress.as_ref().is_some_and(|i| i.is_empty()) {
                spec.ingress = None;
            }
            if spec.egress.as_ref().is_some_and(|e| e.is_empty()) {
                spec.egress = None;
            }
        }
        assert_eq!(run(&found), vec![]);
    }

    /// "Is this managed policy exactly ours?" has one answer: the audit reports a managed
    /// NetworkPolicy as changed exactly when apply would write it again. Two answers used to
    /// disagree on an empty-valued label added to the policy's podSelector (it narrows the
    /// default-deny): the audit reported it, apply held it for ours and never reverted it.
    #[test]
    fn the_audit_and_apply_agree_on_what_is_exactly_ours() {
        let desired = own_objects()
            .network_policies
            .into_iter()
            .find(|p| p.metadata.name.as_deref() == Some("prod-svc-users"))
            .unwrap();
        let desired_value = serde_json::to_value(&desired).unwrap();
        type Change = fn(&mut Value);
        let cases: [(&str, Change, bool); 5] = [
            ("nothing", |_| {}, true),
            (
                "empty lists dropped when read back",
                |v| {
                    let spec = v["spec"].as_object_mut().unwrap();
                    spec.retain(|_, x| x.as_array().is_none_or(|a| !a.is_empty()));
                },
                true,
            ),
            (
                "a peer from anywhere added",
                |v| {
                    v["spec"]["ingress"][0]["from"]
                        .as_array_mut()
                        .unwrap()
                        .push(json!({"ipBlock": {"cidr": "0.0.0.0/0"}}))
                },
                false,
            ),
            (
                "an empty-valued label added to the podSelector",
                |v| v["spec"]["podSelector"]["matchLabels"]["narrowed"] = json!(""),
                false,
            ),
            (
                "a peer opened to every namespace with an empty namespaceSelector",
                |v| {
                    let peer = v["spec"]["ingress"]
                        .as_array_mut()
                        .unwrap()
                        .iter_mut()
                        .flat_map(|rule| rule["from"].as_array_mut().unwrap().iter_mut())
                        .find(|peer| peer.get("namespaceSelector").is_none())
                        .expect("a peer of the namespace's own pods");
                    peer["namespaceSelector"] = json!({});
                },
                false,
            ),
        ];
        for (what, change, exact) in cases {
            let mut actual_value = desired_value.clone();
            change(&mut actual_value);
            let actual: NetworkPolicy = serde_json::from_value(actual_value.clone()).unwrap();
            let mut found = own_objects();
            found
                .network_policies
                .retain(|p| p.metadata.name != desired.metadata.name);
            found.network_policies.push(actual);
            let audit_reports_it = run(&found).iter().any(|v| {
                v.name == "prod-svc-users"
                    && v.reason
                        .starts_with("was changed after the operator wrote it")
            });
            let apply_holds_it =
                crate::controller::diff::holds_exactly(&actual_value, &desired_value);
            assert_eq!(
                (audit_reports_it, apply_holds_it),
                (!exact, exact),
                "{what}: (audit reports it, apply holds it for ours)"
            );
        }
    }

    #[test]
    fn the_list_is_sorted_deduplicated_and_capped() {
        let mut found = own_objects();
        for i in (0..60).rev() {
            found
                .services
                .push(service(&format!("np-{i:02}"), json!({"type": "NodePort"})));
        }
        found
            .services
            .push(service("np-00", json!({"type": "NodePort"})));
        let v = run(&found);
        assert_eq!(v.len(), 60);
        assert!(v.windows(2).all(|w| w[0] < w[1]));
        let (shown, total) = capped(v, MAX_REPORTED);
        assert_eq!((shown.len(), total), (50, 60));
        assert_eq!(shown[0].name, "np-00");
        let (shown, total) = capped(vec![], MAX_REPORTED);
        assert_eq!((shown.len(), total), (0, 0));
    }

    #[test]
    fn label_selectors_follow_kubernetes_semantics() {
        let labels: BTreeMap<String, String> = [
            ("app".to_string(), "web".to_string()),
            ("tier".into(), "front".into()),
        ]
        .into();
        let sel = |v: Value| -> LabelSelector { from(v) };
        assert!(selects(&sel(json!({})), &labels));
        assert!(selects(
            &sel(json!({"matchLabels": {"app": "web"}})),
            &labels
        ));
        assert!(!selects(
            &sel(json!({"matchLabels": {"app": "db"}})),
            &labels
        ));
        for (op, values, expected) in [
            ("In", json!(["web", "x"]), true),
            ("In", json!(["x"]), false),
            ("NotIn", json!(["x"]), true),
            ("NotIn", json!(["web"]), false),
            ("Exists", json!(null), true),
            ("DoesNotExist", json!(null), false),
            ("Bogus", json!(null), false),
        ] {
            let s = sel(
                json!({"matchExpressions": [{"key": "app", "operator": op, "values": values}]}),
            );
            assert_eq!(selects(&s, &labels), expected, "{op} {values}");
        }
        let absent = sel(
            json!({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}),
        );
        assert!(selects(&absent, &labels), "NotIn holds for a missing key");
    }
}
