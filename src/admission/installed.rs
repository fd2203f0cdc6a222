//! The guardrails installed in the cluster, checked against what [`super::guardrails`] builds:
//! the controller reports `PolicyEnforced=False` while one is missing or switched off.

use k8s_openapi::api::admissionregistration::v1::{
    MatchResources, NamedRuleWithOperations, ValidatingAdmissionPolicy,
    ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::{OperatorIdentity, guardrails};

/// What is wrong with the guardrails installed in the cluster, compared with what
/// [`guardrails`] builds: one line per policy or binding that is missing or does not do its
/// job (a policy that fails open, a binding that names another policy, no longer denies, or
/// selects other namespaces). Empty: every guardrail is in place and bound.
///
/// The rules inside the policies are not compared: they name the operator's identity, which
/// only the installer knows. What is compared is what switches a policy off without touching
/// its rules.
pub fn guardrail_problems(
    installed_policies: &[ValidatingAdmissionPolicy],
    installed_bindings: &[ValidatingAdmissionPolicyBinding],
) -> Vec<String> {
    let wanted = guardrails(&OperatorIdentity::default());
    let mut problems = Vec::new();
    for want in &wanted.policies {
        let name = want.metadata.name.as_deref().unwrap_or_default();
        match installed_policies
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
        {
            None => problems.push(format!("ValidatingAdmissionPolicy {name} is missing")),
            Some(p) => {
                let failure = p.spec.as_ref().and_then(|s| s.failure_policy.as_deref());
                if failure.is_some_and(|f| f != "Fail") {
                    problems.push(format!(
                        "ValidatingAdmissionPolicy {name} has failurePolicy {} (must be Fail)",
                        failure.unwrap_or_default()
                    ));
                }
            }
        }
    }
    for want in &wanted.bindings {
        let name = want.metadata.name.as_deref().unwrap_or_default();
        let want = want.spec.clone().unwrap_or_default();
        let Some(have) = installed_bindings
            .iter()
            .find(|b| b.metadata.name.as_deref() == Some(name))
        else {
            problems.push(format!(
                "ValidatingAdmissionPolicyBinding {name} is missing"
            ));
            continue;
        };
        let have = have.spec.clone().unwrap_or_default();
        if have.policy_name != want.policy_name {
            problems.push(format!(
                "ValidatingAdmissionPolicyBinding {name} binds {:?}, not {}",
                have.policy_name.unwrap_or_default(),
                want.policy_name.unwrap_or_default()
            ));
        }
        let actions = have.validation_actions.clone().unwrap_or_default();
        let missing: Vec<&String> = want
            .validation_actions
            .iter()
            .flatten()
            .filter(|a| !actions.contains(a))
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "ValidatingAdmissionPolicyBinding {name} has validationActions {actions:?}, \
                 without {missing:?}"
            ));
        }
        if scope(&have.match_resources) != scope(&want.match_resources)
            || have.param_ref != want.param_ref
        {
            problems.push(format!(
                "ValidatingAdmissionPolicyBinding {name} selects other namespaces or objects \
                 than the operator's"
            ));
        }
    }
    problems
}

/// What a binding's `matchResources` restricts it to, with the API server's defaults (an
/// empty selector, `matchPolicy`) taken out, so an installed binding compares equal to the
/// one built.
fn scope(m: &Option<MatchResources>) -> impl PartialEq + use<> {
    let m = m.clone().unwrap_or_default();
    let selector = |s: Option<LabelSelector>| s.filter(|s| *s != LabelSelector::default());
    let list = |l: Option<Vec<NamedRuleWithOperations>>| l.unwrap_or_default();
    (
        selector(m.namespace_selector),
        selector(m.object_selector),
        list(m.resource_rules),
        list(m.exclude_resource_rules),
    )
}
