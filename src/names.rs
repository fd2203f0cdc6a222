//! Names of the objects the operator creates, and the labels every one of them carries.
//!
//! Services keep their own names (`http://auth:8000` inside the namespace); everything else
//! is prefixed with the stack's name.

use std::collections::BTreeMap;

use crate::model::DnsLabel;

pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGER: &str = "opsconductor-operator";
pub const STACK_LABEL: &str = "opsconductor.io/stack";
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
pub const PART_OF_LABEL: &str = "app.kubernetes.io/part-of";
pub const PART_OF: &str = "opsconductor";
/// What an object is part of: the gateway, one service, or the stack's policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component<'a> {
    Gateway,
    Service(&'a DnsLabel),
    Policy,
    /// The services' identity settings (`spec.serviceIdentity`): the identity ConfigMap.
    Identity,
}

impl Component<'_> {
    fn component(&self) -> &'static str {
        match self {
            Component::Gateway => "gateway",
            Component::Service(_) => "service",
            Component::Policy => "network-policy",
            Component::Identity => "identity",
        }
    }
}

/// The suffixes appended to the stack name. The longest one bounds the stack name's length.
pub const FIXED_SUFFIXES: &[&str] = &[
    "-gateway",
    "-gateway-config",
    "-tls",
    "-acme-account",
    "-default-deny",
    "-allow-dns",
];

/// Longest stack name for which every derived name is still a valid DNS-1035 label.
pub fn max_stack_name_len() -> usize {
    63 - FIXED_SUFFIXES.iter().map(|s| s.len()).max().unwrap_or(0)
}

pub fn gateway(stack: &DnsLabel) -> String {
    format!("{stack}-gateway")
}
pub fn gateway_config(stack: &DnsLabel) -> String {
    format!("{stack}-gateway-config")
}
/// The stack's service identity ConfigMap. Not in [`FIXED_SUFFIXES`]: it is shorter than the
/// longest, and no service's objects (ServiceAccount, Deployment, Service) are ConfigMaps, so
/// no service name is reserved for it (reserving one would break stacks that use it).
pub fn identity_config(stack: &DnsLabel) -> String {
    format!("{stack}-identity")
}
pub fn tls_secret(stack: &DnsLabel) -> String {
    format!("{stack}-tls")
}
pub fn acme_account_secret(stack: &DnsLabel) -> String {
    format!("{stack}-acme-account")
}
pub fn default_deny_policy(stack: &DnsLabel) -> String {
    format!("{stack}-default-deny")
}
pub fn dns_policy(stack: &DnsLabel) -> String {
    format!("{stack}-allow-dns")
}
pub fn gateway_policy(stack: &DnsLabel) -> String {
    format!("{stack}-gateway")
}
pub fn service_policy(stack: &DnsLabel, service: &DnsLabel) -> String {
    format!("{stack}-svc-{service}")
}
pub fn backend_policy(stack: &DnsLabel, backend: &DnsLabel) -> String {
    format!("{stack}-backend-{backend}")
}

/// The label set of every object the operator creates for `component` of `stack`.
pub fn labels(stack: &DnsLabel, component: Component<'_>) -> BTreeMap<String, String> {
    let mut labels = selector(stack, component);
    labels.insert(NAME_LABEL.into(), name_of(stack, component));
    labels.insert(INSTANCE_LABEL.into(), stack.to_string());
    labels.insert(PART_OF_LABEL.into(), PART_OF.into());
    labels.insert(MANAGED_BY_LABEL.into(), MANAGER.into());
    labels
}

/// The labels that select the pods of `component` (a subset of [`labels`], stable forever:
/// Deployment selectors are immutable).
pub fn selector(stack: &DnsLabel, component: Component<'_>) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    labels.insert(STACK_LABEL.into(), stack.to_string());
    labels.insert(COMPONENT_LABEL.into(), component.component().into());
    if let Component::Service(_) = component {
        labels.insert(NAME_LABEL.into(), name_of(stack, component));
    }
    labels
}

/// Selects every pod of the stack: the gateway's and every service's.
pub fn stack_pods(stack: &DnsLabel) -> BTreeMap<String, String> {
    BTreeMap::from([(STACK_LABEL.to_string(), stack.to_string())])
}

fn name_of(stack: &DnsLabel, component: Component<'_>) -> String {
    match component {
        Component::Gateway => gateway(stack),
        Component::Service(name) => name.to_string(),
        Component::Policy => stack.to_string(),
        Component::Identity => identity_config(stack),
    }
}
