//! What the stack protects (its pods and backends, by labels) and the checks that depend on it:
//! Services (the gateway's exemption), Ingresses, Gateway API routes and NetworkPolicies that
//! open protected pods to more than the stack declares.

use super::describe::{describe_rule, selects};
use super::{Found, violation};
use crate::build::Bundle;
use crate::crd::Violation;
use crate::model::Stack;
use crate::names;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::{BTreeMap, BTreeSet};

/// Pods a NetworkPolicy must not open up: the stack's (by their pod-template labels, so they
/// count before any pod exists) and the backends' (the pods found that a backend selects).
struct Protected {
    /// Shown in reasons: `gateway`, a service's name, or `backend postgres`.
    what: String,
    labels: BTreeMap<String, String>,
    /// Stack pods: their egress is the stack's too. Backends: only their ingress is.
    stack_pod: bool,
}

pub(super) struct Context<'a> {
    stack: &'a Stack,
    desired: &'a Bundle,
    protected: Vec<Protected>,
}

impl<'a> Context<'a> {
    pub(super) fn new(stack: &'a Stack, desired: &'a Bundle, found: &Found) -> Self {
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

    pub(super) fn service(&self, svc: &Service, out: &mut Vec<Violation>) {
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

    pub(super) fn network_policy(&self, np: &NetworkPolicy, out: &mut Vec<Violation>) {
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
