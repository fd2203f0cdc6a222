//! Pods: host networking, host PID and host ports, whoever owns the pod, and pods that carry
//! the stack's labels without being made by its Deployments.

use super::violation;
use crate::build::Bundle;
use crate::crd::Violation;
use crate::model::Stack;
use crate::names;
use k8s_openapi::api::core::v1::Pod;

/// What the audit finds wrong with one Pod on its own.
#[cfg(test)]
pub(crate) fn pod_findings(pod: &Pod) -> Vec<Violation> {
    let mut out = Vec::new();
    pod_violations(pod, &mut out);
    out
}

pub(super) fn pod_violations(pod: &Pod, out: &mut Vec<Violation>) {
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
pub(super) fn joined(stack: &Stack, desired: &Bundle, pod: &Pod, out: &mut Vec<Violation>) {
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
