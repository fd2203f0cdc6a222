//! Admission guardrails: ValidatingAdmissionPolicies (CEL, evaluated inside the API server; no
//! webhook to keep alive) that stop the edge-TLS / internal-HTTP policy from being broken in a
//! stack's namespace in the first place. Pure builders; the committed YAML in
//! `manifests/admission/` is generated from them (a test fails when it drifts).
//!
//! # The namespace marker
//! The operator labels each namespace that holds a stack with [`PROTECTED_LABEL`]:
//! [`ENFORCE`] when any stack there has `policy.mode: Enforce`, else [`AUDIT`] (see
//! [`marker_value`]), and removes the label when the last stack is gone. The guardrail bindings
//! select namespaces by that label, one binding per value:
//! - `enforce`: `validationActions: [Deny]`;
//! - `audit`: `validationActions: [Warn, Audit]` (the client sees a warning, the audit log
//!   records the failure, the request goes through).
//!
//! A marker anyone could set or remove would make the guardrails optional, so a third policy
//! denies creating a Namespace with the label, and adding, changing or removing it, to every
//! user but the operator's service account; it also refuses values other than `enforce` and
//! `audit`, for everyone. It applies to cluster admins too: to uninstall, delete the policies
//! first.
//!
//! # The operator's identity
//! A label on an object proves nothing, so the exemption for the gateway's Service checks the
//! requesting user. The operator's username is written into the policy text when it is built
//! ([`OperatorIdentity`]), rather than read from a parameter object: a parameter (a ConfigMap)
//! would be one more object whose editors could make themselves "the operator", and a missing
//! one would block or open every request. The Helm chart renders the same builders' output
//! with its own namespace and service account name.
//!
//! # The rules, in a protected namespace
//! - Services: type NodePort or LoadBalancer only from the operator (its gateway), or when an
//!   update keeps the type the Service already had (so controllers that add finalizers to an
//!   existing LoadBalancer Service keep working); `spec.externalIPs` from nobody, unless an
//!   update leaves them as they were.
//! - Pods: no `hostNetwork`, no `hostPID`, no `hostPort` on any container or init container
//!   (checked on create: these fields cannot change afterwards).
//!
//! Objects that existed before the namespace was protected are not touched; the violation
//! audit ([`crate::audit`]) reports them.

use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::{
    MatchResources, NamedRuleWithOperations, ValidatingAdmissionPolicy,
    ValidatingAdmissionPolicyBinding, ValidatingAdmissionPolicyBindingSpec,
    ValidatingAdmissionPolicySpec, Validation, Variable,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use serde::Serialize;

use crate::model::PolicyMode;
use crate::names;

mod installed;

pub use installed::guardrail_problems;

/// The namespace label that switches the guardrails on; only the operator may change it.
pub const PROTECTED_LABEL: &str = "opsconductor.io/protected";
/// Marker value: violations are denied.
pub const ENFORCE: &str = "enforce";
/// Marker value: violations are allowed with a warning and recorded in the audit log.
pub const AUDIT: &str = "audit";

/// Names of the policies and bindings.
pub const SERVICES_POLICY: &str = "opsconductor-guardrails-services";
pub const PODS_POLICY: &str = "opsconductor-guardrails-pods";
pub const MARKER_POLICY: &str = "opsconductor-namespace-marker";
pub const MEMBERS_POLICY: &str = "opsconductor-guardrails-stack-members";

/// Who creates the pods of the operator's Deployments: the deployment controller creates their
/// ReplicaSets, the ReplicaSet controller their pods (with per-controller credentials, as
/// kube-controller-manager runs with `--use-service-account-credentials`; otherwise as
/// `system:kube-controller-manager`).
pub const DEPLOYMENT_CONTROLLER: &str = "system:serviceaccount:kube-system:deployment-controller";
pub const REPLICASET_CONTROLLER: &str = "system:serviceaccount:kube-system:replicaset-controller";
pub const CONTROLLER_MANAGER: &str = "system:kube-controller-manager";

/// The header of the committed manifest.
pub const MANIFEST_HEADER: &str = "# Generated from src/admission/ for the default operator identity \
(service account opsconductor-operator in namespace opsconductor-system); do not edit.\n\
# Regenerate: OPSC_UPDATE_SNAPSHOTS=1 cargo test --test admission_real committed_manifest\n";

/// Where the committed manifest lives, relative to the repository root.
pub const MANIFEST_PATH: &str = "manifests/admission/guardrails.yaml";

/// The operator's service account: the one user the guardrails exempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorIdentity {
    namespace: String,
    service_account: String,
}

impl Default for OperatorIdentity {
    /// `opsconductor-operator` in `opsconductor-system`: what the install manifests use.
    fn default() -> Self {
        Self {
            namespace: "opsconductor-system".into(),
            service_account: "opsconductor-operator".into(),
        }
    }
}

impl OperatorIdentity {
    /// Both names must be DNS names (lowercase letters, digits, `-`, `.`), which also keeps
    /// them safe inside a CEL string literal.
    pub fn new(namespace: &str, service_account: &str) -> Result<Self, String> {
        for (what, v) in [
            ("namespace", namespace),
            ("service account", service_account),
        ] {
            let ok = !v.is_empty()
                && v.len() <= 253
                && v.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
                && v.starts_with(|c: char| c.is_ascii_alphanumeric())
                && v.ends_with(|c: char| c.is_ascii_alphanumeric());
            if !ok {
                return Err(format!("{what} {v:?} is not a valid DNS name"));
            }
        }
        Ok(Self {
            namespace: namespace.into(),
            service_account: service_account.into(),
        })
    }

    /// `system:serviceaccount:<namespace>:<name>`, as the API server names the requester.
    pub fn username(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }
}

/// The marker value for a namespace whose stacks have these modes; `None` when there is no
/// stack left (remove the label). Enforce wins: one enforcing stack protects the namespace.
pub fn marker_value(modes: impl IntoIterator<Item = PolicyMode>) -> Option<&'static str> {
    let mut value = None;
    for mode in modes {
        match mode {
            PolicyMode::Enforce => return Some(ENFORCE),
            PolicyMode::Audit => value = Some(AUDIT),
        }
    }
    value
}

/// The policies and their bindings, in apply order (a binding names its policy).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Guardrails {
    pub policies: Vec<ValidatingAdmissionPolicy>,
    pub bindings: Vec<ValidatingAdmissionPolicyBinding>,
}

impl Guardrails {
    /// All objects as JSON values with apiVersion and kind, policies first.
    pub fn to_values(&self) -> Vec<serde_json::Value> {
        let Guardrails { policies, bindings } = self;
        let mut out = Vec::new();
        push_all(&mut out, policies);
        push_all(&mut out, bindings);
        out
    }

    /// The committed manifest: header, then one YAML document per object.
    pub fn to_yaml(&self) -> String {
        let mut out = MANIFEST_HEADER.to_string();
        for v in self.to_values() {
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(&v).expect("JSON values serialize as YAML"));
        }
        out
    }
}

fn push_all<T: Serialize>(out: &mut Vec<serde_json::Value>, objects: &[T]) {
    for o in objects {
        out.push(serde_json::to_value(o).expect("k8s-openapi objects always serialize"));
    }
}

/// Every guardrail for an operator running as `operator`.
pub fn guardrails(operator: &OperatorIdentity) -> Guardrails {
    let user = operator.username();
    Guardrails {
        policies: vec![
            services_policy(&user),
            pods_policy(),
            marker_policy(&user),
            members_policy(&user),
        ],
        bindings: vec![
            binding(SERVICES_POLICY, ENFORCE),
            binding(SERVICES_POLICY, AUDIT),
            binding(PODS_POLICY, ENFORCE),
            binding(PODS_POLICY, AUDIT),
            binding(MEMBERS_POLICY, ENFORCE),
            binding(MEMBERS_POLICY, AUDIT),
            ValidatingAdmissionPolicyBinding {
                metadata: meta(MARKER_POLICY),
                spec: Some(ValidatingAdmissionPolicyBindingSpec {
                    policy_name: Some(MARKER_POLICY.into()),
                    validation_actions: Some(vec!["Deny".into()]),
                    match_resources: None,
                    param_ref: None,
                }),
            },
        ],
    }
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        labels: Some(BTreeMap::from([
            (names::PART_OF_LABEL.to_string(), names::PART_OF.to_string()),
            (names::COMPONENT_LABEL.to_string(), "admission".to_string()),
        ])),
        ..ObjectMeta::default()
    }
}

fn rule(resource: &str, operations: &[&str]) -> NamedRuleWithOperations {
    rule_in("", resource, operations)
}

fn rule_in(group: &str, resource: &str, operations: &[&str]) -> NamedRuleWithOperations {
    NamedRuleWithOperations {
        api_groups: Some(vec![group.into()]),
        api_versions: Some(vec!["v1".into()]),
        resources: Some(vec![resource.into()]),
        operations: Some(operations.iter().map(|o| o.to_string()).collect()),
        ..NamedRuleWithOperations::default()
    }
}

fn var(name: &str, expression: &str) -> Variable {
    Variable {
        name: name.into(),
        expression: expression.into(),
    }
}

fn check(expression: &str, message: &str, message_expression: Option<&str>) -> Validation {
    Validation {
        expression: expression.into(),
        message: Some(message.into()),
        message_expression: message_expression.map(Into::into),
        reason: Some("Forbidden".into()),
    }
}

fn policy(
    name: &str,
    rules: Vec<NamedRuleWithOperations>,
    variables: Vec<Variable>,
    validations: Vec<Validation>,
) -> ValidatingAdmissionPolicy {
    ValidatingAdmissionPolicy {
        metadata: meta(name),
        spec: Some(ValidatingAdmissionPolicySpec {
            failure_policy: Some("Fail".into()),
            match_constraints: Some(MatchResources {
                resource_rules: Some(rules),
                ..MatchResources::default()
            }),
            variables: Some(variables),
            validations: Some(validations),
            ..ValidatingAdmissionPolicySpec::default()
        }),
        status: None,
    }
}

/// A CEL string literal of a name checked by [`OperatorIdentity::new`]. (Messages in
/// `messageExpression`s use double quotes: their words contain apostrophes.)
fn cel_string(s: &str) -> String {
    debug_assert!(!s.contains(['\'', '\\']));
    format!("'{s}'")
}

const WHY: &str = "opsconductor-operator keeps the stack's TLS gateway the only way into this \
namespace";

fn services_policy(operator: &str) -> ValidatingAdmissionPolicy {
    policy(
        SERVICES_POLICY,
        vec![rule("services", &["CREATE", "UPDATE"])],
        vec![
            var(
                "isOperator",
                &format!("request.userInfo.username == {}", cel_string(operator)),
            ),
            var(
                "type",
                "has(object.spec.type) ? object.spec.type : 'ClusterIP'",
            ),
            var(
                "oldType",
                "(oldObject != null && has(oldObject.spec.type)) ? oldObject.spec.type : ''",
            ),
            var(
                "externalIPs",
                "has(object.spec.externalIPs) ? object.spec.externalIPs : []",
            ),
            var(
                "oldExternalIPs",
                "(oldObject != null && has(oldObject.spec.externalIPs)) ? oldObject.spec.externalIPs : []",
            ),
        ],
        vec![
            check(
                "!(variables.type in ['NodePort', 'LoadBalancer']) || variables.isOperator || \
                 variables.type == variables.oldType",
                &format!(
                    "NodePort and LoadBalancer Services expose a workload outside the gateway: \
                     {WHY}, so only the operator may create them (for the gateway). Use a \
                     ClusterIP Service and a route on the OpsConductorStack."
                ),
                Some(&format!(
                    "\"Service type \" + variables.type + \" exposes a workload outside the \
                     gateway: {WHY}, so only the operator may create NodePort and LoadBalancer \
                     Services (for the gateway). Use a ClusterIP Service and a route on the \
                     OpsConductorStack.\""
                )),
            ),
            check(
                "size(variables.externalIPs) == 0 || variables.externalIPs == variables.oldExternalIPs",
                &format!(
                    "spec.externalIPs make a Service reachable from outside the cluster around \
                     the gateway: {WHY}."
                ),
                None,
            ),
        ],
    )
}

fn pods_policy() -> ValidatingAdmissionPolicy {
    policy(
        PODS_POLICY,
        vec![rule("pods", &["CREATE"])],
        vec![
            var(
                "containers",
                "object.spec.containers + (has(object.spec.initContainers) ? object.spec.initContainers : [])",
            ),
            var(
                "hostPortContainers",
                "variables.containers.filter(c, has(c.ports) && c.ports.exists(p, has(p.hostPort) && p.hostPort != 0)).map(c, c.name)",
            ),
        ],
        vec![
            check(
                "!has(object.spec.hostNetwork) || !object.spec.hostNetwork",
                &format!(
                    "hostNetwork puts the pod on the node's network, reachable outside the \
                     gateway and the NetworkPolicies: {WHY}."
                ),
                None,
            ),
            check(
                "!has(object.spec.hostPID) || !object.spec.hostPID",
                &format!(
                    "hostPID shares the node's process namespace with the pod: {WHY}, and a \
                     pod that sees the node's processes is outside it."
                ),
                None,
            ),
            check(
                "size(variables.hostPortContainers) == 0",
                &format!(
                    "hostPort opens a port on the node, reachable outside the gateway: {WHY}."
                ),
                Some(&format!(
                    "\"hostPort (container \" + variables.hostPortContainers.join(\", \") + \") \
                     opens a port on the node, reachable outside the gateway: {WHY}.\""
                )),
            ),
        ],
    )
}

/// Only the stack's own pods carry its label (`opsconductor.io/stack`): a pod with the label
/// matches the stack's Services (the gateway's LoadBalancer included) and NetworkPolicies, so
/// anyone who could create one would join the stack, past the gateway or with a service's
/// egress grants. The label may appear only along the operator's chain: Deployments (pod
/// template) from the operator, their ReplicaSets from the deployment controller, their pods
/// from the ReplicaSet controller. Nobody else may add, change or remove it on an existing
/// pod, ReplicaSet or Deployment template.
fn members_policy(operator: &str) -> ValidatingAdmissionPolicy {
    let label = cel_string(names::STACK_LABEL);
    let labels_of = |o: &str| {
        format!(
            "{o} == null ? {{}} : (request.resource.resource == 'pods' ? (has({o}.metadata.labels) ? {o}.metadata.labels : {{}}) : ((has({o}.spec.template.metadata) && has({o}.spec.template.metadata.labels)) ? {o}.spec.template.metadata.labels : {{}}))"
        )
    };
    policy(
        MEMBERS_POLICY,
        vec![
            rule("pods", &["CREATE", "UPDATE"]),
            rule_in("apps", "replicasets", &["CREATE", "UPDATE"]),
            rule_in("apps", "deployments", &["CREATE", "UPDATE"]),
        ],
        vec![
            var("labels", &labels_of("object")),
            var("oldLabels", &labels_of("oldObject")),
            var(
                "stack",
                &format!("{label} in variables.labels ? variables.labels[{label}] : ''"),
            ),
            var(
                "oldStack",
                &format!("{label} in variables.oldLabels ? variables.oldLabels[{label}] : ''"),
            ),
            var(
                "creators",
                &format!(
                    "request.resource.resource == 'pods' ? [{rs}, {kcm}] : (request.resource.resource == 'replicasets' ? [{deploy}, {kcm}] : [{op}])",
                    rs = cel_string(REPLICASET_CONTROLLER),
                    deploy = cel_string(DEPLOYMENT_CONTROLLER),
                    kcm = cel_string(CONTROLLER_MANAGER),
                    op = cel_string(operator),
                ),
            ),
        ],
        vec![check(
            "variables.stack == variables.oldStack || request.userInfo.username in variables.creators",
            &format!(
                "the label {} makes a pod part of a stack (its Services and NetworkPolicies select it): only the operator's Deployments, through their ReplicaSets, may create pods with it, and nobody may add, change or remove it afterwards",
                names::STACK_LABEL
            ),
            Some(&format!(
                "\"the label {} makes a pod part of a stack (its Services and \
                 NetworkPolicies select it): only the operator's Deployments, through their \
                 ReplicaSets, may create pods with it, and nobody may add, change or remove it \
                 afterwards (\" + request.resource.resource + \" by \" + \
                 request.userInfo.username + \")\"",
                names::STACK_LABEL
            )),
        )],
    )
}

fn marker_policy(operator: &str) -> ValidatingAdmissionPolicy {
    let label = cel_string(PROTECTED_LABEL);
    policy(
        MARKER_POLICY,
        vec![rule("namespaces", &["CREATE", "UPDATE"])],
        vec![
            var(
                "marker",
                &format!(
                    "(has(object.metadata.labels) && {label} in object.metadata.labels) ? \
                     object.metadata.labels[{label}] : ''"
                ),
            ),
            var(
                "oldMarker",
                &format!(
                    "(oldObject != null && has(oldObject.metadata.labels) && {label} in \
                     oldObject.metadata.labels) ? oldObject.metadata.labels[{label}] : ''"
                ),
            ),
        ],
        vec![
            check(
                &format!(
                    "variables.marker == variables.oldMarker || request.userInfo.username == {}",
                    cel_string(operator)
                ),
                &format!(
                    "only opsconductor-operator ({operator}) may set, change or remove the \
                     label {PROTECTED_LABEL}: it switches on the guardrails that keep a stack's \
                     namespace reachable only through its TLS gateway"
                ),
                None,
            ),
            check(
                &format!(
                    "variables.marker == variables.oldMarker || variables.marker in ['', {}, {}]",
                    cel_string(ENFORCE),
                    cel_string(AUDIT)
                ),
                &format!("the label {PROTECTED_LABEL} must be \"{ENFORCE}\" or \"{AUDIT}\""),
                None,
            ),
        ],
    )
}

/// The binding of `policy` for namespaces marked `value`.
fn binding(policy: &str, value: &str) -> ValidatingAdmissionPolicyBinding {
    let actions: &[&str] = if value == ENFORCE {
        &["Deny"]
    } else {
        &["Warn", "Audit"]
    };
    ValidatingAdmissionPolicyBinding {
        metadata: meta(&format!("{policy}-{value}")),
        spec: Some(ValidatingAdmissionPolicyBindingSpec {
            policy_name: Some(policy.into()),
            validation_actions: Some(actions.iter().map(|a| a.to_string()).collect()),
            match_resources: Some(MatchResources {
                namespace_selector: Some(LabelSelector {
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: PROTECTED_LABEL.into(),
                        operator: "In".into(),
                        values: Some(vec![value.into()]),
                    }]),
                    ..LabelSelector::default()
                }),
                ..MatchResources::default()
            }),
            param_ref: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enforce_wins_and_no_stack_means_no_marker() {
        use PolicyMode::{Audit, Enforce};
        assert_eq!(marker_value([]), None);
        assert_eq!(marker_value([Audit]), Some(AUDIT));
        assert_eq!(marker_value([Audit, Enforce, Audit]), Some(ENFORCE));
        assert_eq!(marker_value([Enforce]), Some(ENFORCE));
    }

    #[test]
    fn identities_must_be_dns_names() {
        assert_eq!(
            OperatorIdentity::new("ops", "op-1").unwrap().username(),
            "system:serviceaccount:ops:op-1"
        );
        for (ns, sa) in [("", "a"), ("a", "x' || true || '"), ("A", "b"), ("a", "-b")] {
            assert!(OperatorIdentity::new(ns, sa).is_err(), "{ns:?} {sa:?}");
        }
        assert_eq!(
            OperatorIdentity::default().username(),
            "system:serviceaccount:opsconductor-system:opsconductor-operator"
        );
    }

    #[test]
    fn audit_bindings_warn_and_enforce_bindings_deny() {
        let g = guardrails(&OperatorIdentity::default());
        assert_eq!(g.policies.len(), 4);
        let by_name: BTreeMap<String, (Vec<String>, Option<String>)> = g
            .bindings
            .iter()
            .map(|b| {
                let spec = b.spec.clone().unwrap();
                let value = spec
                    .match_resources
                    .and_then(|m| m.namespace_selector)
                    .and_then(|s| s.match_expressions)
                    .map(|e| {
                        assert_eq!(e[0].key, PROTECTED_LABEL);
                        e[0].values.clone().unwrap()[0].clone()
                    });
                (
                    b.metadata.name.clone().unwrap(),
                    (spec.validation_actions.unwrap(), value),
                )
            })
            .collect();
        let deny = vec!["Deny".to_string()];
        let warn = vec!["Warn".to_string(), "Audit".to_string()];
        assert_eq!(
            by_name["opsconductor-guardrails-services-enforce"],
            (deny.clone(), Some(ENFORCE.into()))
        );
        assert_eq!(
            by_name["opsconductor-guardrails-services-audit"],
            (warn.clone(), Some(AUDIT.into()))
        );
        assert_eq!(
            by_name["opsconductor-guardrails-pods-enforce"],
            (deny.clone(), Some(ENFORCE.into()))
        );
        assert_eq!(
            by_name["opsconductor-guardrails-pods-audit"],
            (warn.clone(), Some(AUDIT.into()))
        );
        assert_eq!(
            by_name["opsconductor-guardrails-stack-members-enforce"],
            (deny.clone(), Some(ENFORCE.into()))
        );
        assert_eq!(
            by_name["opsconductor-guardrails-stack-members-audit"],
            (warn, Some(AUDIT.into()))
        );
        // The marker is guarded everywhere, always denying.
        assert_eq!(by_name[MARKER_POLICY], (deny, None));
        for b in &g.bindings {
            let p = b.spec.as_ref().unwrap().policy_name.as_deref().unwrap();
            assert!(
                g.policies
                    .iter()
                    .any(|x| x.metadata.name.as_deref() == Some(p))
            );
        }
    }

    #[test]
    fn the_operator_is_named_in_the_service_marker_and_members_rules_only() {
        let id = OperatorIdentity::new("ops-sys", "the-op").unwrap();
        let g = guardrails(&id);
        let text = |name: &str| {
            serde_json::to_string(
                g.policies
                    .iter()
                    .find(|p| p.metadata.name.as_deref() == Some(name))
                    .unwrap(),
            )
            .unwrap()
        };
        let user = "'system:serviceaccount:ops-sys:the-op'";
        assert!(text(SERVICES_POLICY).contains(user));
        assert!(text(MARKER_POLICY).contains(user));
        // Stack-labelled Deployment templates from the operator only; their ReplicaSets and
        // pods from the controllers.
        let members = text(MEMBERS_POLICY);
        assert!(members.contains(user));
        assert!(members.contains(DEPLOYMENT_CONTROLLER) && members.contains(REPLICASET_CONTROLLER));
        assert!(
            !text(PODS_POLICY).contains("serviceaccount"),
            "no one is exempt from the pod rules"
        );
    }

    #[test]
    fn guardrail_problems_name_what_is_missing_or_switched_off() {
        let g = guardrails(&OperatorIdentity::new("ops", "op").unwrap());
        assert!(guardrail_problems(&g.policies, &g.bindings).is_empty());
        // As the API server returns them: defaults filled in.
        let mut defaulted = g.bindings.clone();
        for b in &mut defaulted {
            let m = b
                .spec
                .as_mut()
                .unwrap()
                .match_resources
                .get_or_insert_default();
            m.match_policy = Some("Equivalent".into());
            m.object_selector = Some(LabelSelector::default());
            m.namespace_selector.get_or_insert_default();
        }
        assert!(guardrail_problems(&g.policies, &defaulted).is_empty());
        assert_eq!(
            guardrail_problems(&[], &[]).len(),
            g.policies.len() + g.bindings.len()
        );

        let mut policies = g.policies.clone();
        policies.retain(|p| p.metadata.name.as_deref() != Some(PODS_POLICY));
        policies[0].spec.as_mut().unwrap().failure_policy = Some("Ignore".into());
        let mut bindings = g.bindings.clone();
        let enforce = format!("{MEMBERS_POLICY}-{ENFORCE}");
        let audit = format!("{SERVICES_POLICY}-{AUDIT}");
        for b in &mut bindings {
            let name = b.metadata.name.clone().unwrap();
            let spec = b.spec.as_mut().unwrap();
            if name == enforce {
                spec.validation_actions = Some(vec!["Warn".into()]);
            } else if name == audit {
                spec.match_resources = None;
            } else if name == MARKER_POLICY {
                spec.policy_name = Some(PODS_POLICY.into());
            }
        }
        bindings
            .retain(|b| b.metadata.name.as_deref() != Some(&format!("{PODS_POLICY}-{ENFORCE}")));
        let problems = guardrail_problems(&policies, &bindings);
        assert_eq!(
            problems,
            vec![
                format!(
                    "ValidatingAdmissionPolicy {SERVICES_POLICY} has failurePolicy Ignore (must be Fail)"
                ),
                format!("ValidatingAdmissionPolicy {PODS_POLICY} is missing"),
                format!(
                    "ValidatingAdmissionPolicyBinding {audit} selects other namespaces or objects than the operator's"
                ),
                format!("ValidatingAdmissionPolicyBinding {PODS_POLICY}-{ENFORCE} is missing"),
                format!(
                    "ValidatingAdmissionPolicyBinding {enforce} has validationActions [\"Warn\"], without [\"Deny\"]"
                ),
                format!(
                    "ValidatingAdmissionPolicyBinding {MARKER_POLICY} binds \"{PODS_POLICY}\", not {MARKER_POLICY}"
                ),
            ],
        );
    }
}
