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

mod context;
mod describe;
mod pods;
#[cfg(test)]
mod tests;

use context::Context;
pub use describe::selects;
#[cfg(test)]
pub(crate) use pods::pod_findings;
use pods::{joined, pod_violations};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::DynamicObject;

use crate::build::Bundle;
use crate::crd::Violation;
use crate::model::Stack;

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
