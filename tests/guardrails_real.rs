//! The operator reports `PolicyEnforced=True` only while the admission guardrails are in place
//! (issue 14, item 8): the real operator binary, with `--admission-guardrails require` (the
//! default of the released binary and of the chart), against the real control plane, while
//! the test installs, removes and weakens the ValidatingAdmissionPolicies and their bindings.
//!
//! The guardrails are cluster-wide and carry their real names here (the operator checks those
//! names), so they would guard the namespaces of any other test running at the same time:
//! this file holds one test, and removes them again when it ends (also on panic).

mod support;

use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client};
use opsconductor_operator::admission::{self, ENFORCE, OperatorIdentity, PODS_POLICY};
use opsconductor_operator::crd::OpsConductorStack;
use serde_json::Value;
use support::operator::{apply_stack, example, install_crd};
use support::process::spawn_as_operator;
use support::{ControlPlane, TestNamespace, eventually};

const WAIT: Duration = Duration::from_secs(60);
/// Marks the guardrails this test installed, for the cleanup.
const TEST_LABEL: &str = "opsconductor.test/guardrails";

/// Deletes the guardrails this test installed when dropped.
struct Installed(&'static ControlPlane);

impl Drop for Installed {
    fn drop(&mut self) {
        let out = self
            .0
            .kubectl()
            .args([
                "delete",
                "validatingadmissionpolicybindings,validatingadmissionpolicies",
                "-l",
                TEST_LABEL,
                "--ignore-not-found",
                "--wait=false",
            ])
            .output()
            .expect("kubectl runs");
        if !out.status.success() {
            eprintln!(
                "guardrails_real: could not delete the guardrails: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Server-side applies every guardrail the code builds (for the identity the test's operator
/// runs as), labelled for the cleanup.
async fn install(client: &Client) {
    for mut v in admission::guardrails(&OperatorIdentity::default()).to_values() {
        v["metadata"]["labels"][TEST_LABEL] = "true".into();
        let name = v["metadata"]["name"].as_str().unwrap().to_string();
        let params = PatchParams::apply("guardrails-test").force();
        let result = if v["kind"] == "ValidatingAdmissionPolicy" {
            Api::<ValidatingAdmissionPolicy>::all(client.clone())
                .patch(&name, &params, &Patch::Apply(&v))
                .await
                .map(|_| ())
        } else {
            Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
                .patch(&name, &params, &Patch::Apply(&v))
                .await
                .map(|_| ())
        };
        result.unwrap_or_else(|e| panic!("installing {name}: {e}"));
    }
}

async fn policy_enforced(api: &Api<OpsConductorStack>) -> Option<Condition> {
    api.get("hello")
        .await
        .ok()?
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "PolicyEnforced")
}

/// Waits until PolicyEnforced has `status` and `reason`; the condition. On timeout, says what
/// the condition was.
async fn wait_for(api: &Api<OpsConductorStack>, status: &str, reason: &str) -> Condition {
    let start = std::time::Instant::now();
    loop {
        let c = policy_enforced(api).await;
        if let Some(c) = c
            .as_ref()
            .filter(|c| c.status == status && c.reason == reason)
        {
            return c.clone();
        }
        assert!(
            start.elapsed() < WAIT,
            "PolicyEnforced is not {status}/{reason} after {WAIT:?}: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn policy_enforced_requires_the_admission_guardrails_to_be_installed_and_bound() {
    let Some(ns) = TestNamespace::new("guardrails").await else {
        return;
    };
    let cp = ns.control_plane;
    install_crd(cp).await;
    let installed = Installed(cp);
    // A leftover of an earlier, killed run would make the first check meaningless.
    drop(Installed(cp));

    // What the chart sets with admission.enabled (its default) and the binary's default; the
    // environment overrides the "ignore" other tests' operators run with.
    let op = spawn_as_operator(
        cp,
        "guardrails",
        &[],
        &[("OPSC_ADMISSION_GUARDRAILS", "require")],
    );
    eventually("the operator's caches to sync", WAIT, async || {
        op.ready().then_some(())
    })
    .await;

    let api: Api<OpsConductorStack> = ns.api();
    apply_stack(&ns.client, &example("minimal.yaml", &ns.name)).await;

    // Nothing installed: not enforced, and every missing object is named.
    let c = wait_for(&api, "False", "GuardrailsMissing").await;
    let all = admission::guardrails(&OperatorIdentity::default());
    for v in all.to_values() {
        let name = v["metadata"]["name"].as_str().unwrap();
        assert!(
            c.message.contains(&format!(
                "{} {name} is missing",
                v["kind"].as_str().unwrap()
            )),
            "{name} not named: {}",
            c.message
        );
    }

    // Installed and bound: enforced.
    install(&ns.client).await;
    let c = wait_for(&api, "True", "Enforced").await;
    eprintln!("guardrails_real: installed: {}", c.message);

    // One binding removed: named, and only it.
    let gone = format!("{PODS_POLICY}-{ENFORCE}");
    let bindings = Api::<ValidatingAdmissionPolicyBinding>::all(ns.client.clone());
    bindings
        .delete(&gone, &DeleteParams::default())
        .await
        .unwrap();
    let c = wait_for(&api, "False", "GuardrailsMissing").await;
    assert!(
        c.message.ends_with(&format!(
            "ValidatingAdmissionPolicyBinding {gone} is missing"
        )),
        "{}",
        c.message
    );
    assert_eq!(c.message.matches(" is missing").count(), 1, "{}", c.message);

    // Back, but only warning: switched off as surely as deleted.
    install(&ns.client).await;
    wait_for(&api, "True", "Enforced").await;
    let weakened: Value = serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": gone},
        "spec": {"validationActions": ["Warn"]},
    });
    bindings
        .patch(&gone, &PatchParams::default(), &Patch::Merge(&weakened))
        .await
        .unwrap();
    let c = wait_for(&api, "False", "GuardrailsMissing").await;
    assert!(
        c.message.contains(&format!(
            "ValidatingAdmissionPolicyBinding {gone} has validationActions [\"Warn\"], without [\"Deny\"]"
        )),
        "{}",
        c.message
    );

    // A policy that fails open. (The Warn above is undone the way it came, by a merge patch:
    // validationActions is a set, and an apply of [Deny] would add to the other manager's Warn.)
    bindings
        .patch(
            &gone,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"validationActions": ["Deny"]}})),
        )
        .await
        .unwrap();
    wait_for(&api, "True", "Enforced").await;
    Api::<ValidatingAdmissionPolicy>::all(ns.client.clone())
        .patch(
            PODS_POLICY,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"failurePolicy": "Ignore"}})),
        )
        .await
        .unwrap();
    let c = wait_for(&api, "False", "GuardrailsMissing").await;
    assert!(
        c.message.contains(&format!(
            "ValidatingAdmissionPolicy {PODS_POLICY} has failurePolicy Ignore (must be Fail)"
        )),
        "{}",
        c.message
    );
    // Its watches of the guardrails never failed (RBAC, a wrong selector).
    assert!(
        !op.log_text().contains("guardrail watch failed"),
        "{}",
        op.log_text()
    );
    drop(installed);
    wait_for(&api, "False", "GuardrailsMissing").await;
}
