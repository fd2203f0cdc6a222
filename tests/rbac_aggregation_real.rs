//! Who may create stacks (issue 14, item 5): the chart's ClusterRole
//! `<fullname>-stack-editor` carries the labels that the built-in `admin` and `edit` roles
//! aggregate, and not the one `view` aggregates, because creating a stack lets its author read
//! the namespace's Secrets through the operator. Checked against the real API server: the
//! built-in roles' own aggregation selectors (as the API server bootstraps them) pick the role
//! up or not, and the role itself lets a user bound to it manage stacks but not their status.
//! (The copying of rules into `admin` and `edit` is kube-controller-manager's
//! clusterrole-aggregation controller, which the test control plane does not run.)

mod support;

use std::collections::BTreeMap;
use std::process::Command;

use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use opsconductor_operator::crd::OpsConductorStack;
use serde_json::{Value, json};
use support::{TestNamespace, client_as, tools_bin_dir};

struct Delete(&'static support::ControlPlane, String);

impl Drop for Delete {
    fn drop(&mut self) {
        let _ = self
            .0
            .kubectl()
            .args(["delete", "clusterrole", &self.1, "--ignore-not-found"])
            .output();
    }
}

fn helm_template(namespace: &str) -> Value {
    let helm = tools_bin_dir()
        .expect("helm is built with the control plane's tools")
        .join("helm");
    let root = support::controlplane::repo_root();
    let out = Command::new(helm)
        .args([
            "template",
            "opsconductor-operator",
            "charts/opsconductor-operator",
            "--namespace",
            namespace,
            "--show-only",
            "templates/aggregate-clusterroles.yaml",
        ])
        .current_dir(root)
        .output()
        .expect("helm runs");
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_yaml::from_slice(&out.stdout).unwrap()
}

/// Whether a built-in role's aggregation rule selects `labels` (its selectors use matchLabels).
fn selects(role: &ClusterRole, labels: &BTreeMap<String, String>) -> bool {
    let rule = role.aggregation_rule.as_ref().expect("an aggregated role");
    rule.cluster_role_selectors.iter().flatten().any(|s| {
        assert!(s.match_expressions.is_none(), "{s:?}");
        s.match_labels
            .iter()
            .flatten()
            .all(|(k, v)| labels.get(k) == Some(v))
    })
}

async fn bind(client: &Client, ns: &str, user: &str, cluster_role: &str) {
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("{user}-{cluster_role}"), "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
}

fn stack(ns: &str) -> Value {
    json!({
        "apiVersion": "opsconductor.io/v1alpha1",
        "kind": "OpsConductorStack",
        "metadata": {"name": "mine", "namespace": ns},
        "spec": {
            "gateway": {"hosts": ["mine.example.com"]},
            "tls": {"secretName": "mine-cert"},
            "services": [{"name": "web", "image": "web:1", "route": "/"}],
        }
    })
}

fn forbidden<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> bool {
    matches!(r, Err(kube::Error::Api(e)) if e.code == 403)
}

#[tokio::test]
async fn stacks_are_aggregated_into_admin_and_edit_but_not_view() {
    let Some(ns) = TestNamespace::new("rbac-aggregation").await else {
        return;
    };
    let cp = ns.control_plane;
    support::operator::install_crd(cp).await;
    let role: ClusterRole = serde_json::from_value(helm_template(&ns.name)).unwrap();
    let name = role.metadata.name.clone().unwrap();
    let labels = role.metadata.labels.clone().unwrap_or_default();
    let _guard = Delete(cp, name.clone());
    Api::<ClusterRole>::all(ns.client.clone())
        .patch(
            &name,
            &PatchParams::apply("rbac-aggregation-test").force(),
            &Patch::Apply(&role),
        )
        .await
        .unwrap();

    // The built-in roles, as the real API server bootstraps them.
    let roles: Api<ClusterRole> = Api::all(ns.client.clone());
    for (builtin, wanted) in [("admin", true), ("edit", true), ("view", false)] {
        let r = roles.get(builtin).await.unwrap();
        assert_eq!(
            selects(&r, &labels),
            wanted,
            "ClusterRole {builtin} aggregates {name}: expected {wanted}; labels {labels:?}"
        );
    }

    // What the role grants, as the API server authorizes it.
    bind(&ns.client, &ns.name, "alice", &name).await;
    bind(&ns.client, &ns.name, "bob", "view").await;
    let alice = client_as("alice", &["system:authenticated"]).await.unwrap();
    let bob = client_as("bob", &["system:authenticated"]).await.unwrap();
    let dyn_api = |c: &Client| -> Api<kube::api::DynamicObject> {
        Api::namespaced_with(
            c.clone(),
            &ns.name,
            &kube::discovery::ApiResource::erase::<OpsConductorStack>(&()),
        )
    };
    let object: kube::api::DynamicObject = serde_json::from_value(stack(&ns.name)).unwrap();
    assert!(
        forbidden(dyn_api(&bob).create(&PostParams::default(), &object).await),
        "view must not create stacks"
    );
    assert!(
        forbidden(dyn_api(&bob).get("mine").await),
        "view must not read stacks"
    );
    dyn_api(&alice)
        .create(&PostParams::default(), &object)
        .await
        .expect("the stack-editor role creates stacks");
    dyn_api(&alice).get("mine").await.unwrap();
    // The status is the operator's.
    let status = dyn_api(&alice)
        .patch_status(
            "mine",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"violationCount": 0}})),
        )
        .await;
    assert!(
        forbidden(status),
        "the stack-editor role must not write status"
    );
    dyn_api(&alice)
        .delete("mine", &Default::default())
        .await
        .unwrap();
}
