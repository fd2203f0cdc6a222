//! Proves that the control plane of `scripts/controlplane` is a real Kubernetes: every test here
//! exercises behaviour that only a real kube-apiserver (+ etcd) and kube-controller-manager have,
//! and every assertion can fail.
//!
//! Needs the control plane (see `docs/controlplane.md`); with `CI=true` a missing control plane
//! fails these tests, outside CI they skip only with `OPSC_SKIP_CONTROLPLANE=1`.

mod support;

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::authentication::v1::{SelfSubjectReview, TokenRequest};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Api, Client, Config};
use serde_json::json;
use support::{AuditLog, TestNamespace, eventually};

const WAIT: Duration = Duration::from_secs(90);

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("test object must deserialize")
}

/// Runs `kubectl <args>` (the pinned one) when dropped: cleanup of cluster-scoped objects that
/// also happens when the test panics.
struct KubectlOnDrop(Vec<String>);
impl Drop for KubectlOnDrop {
    fn drop(&mut self) {
        if let Some(cp) = support::control_plane() {
            let _ = cp.kubectl().args(&self.0).output();
        }
    }
}

fn sa_user(ns: &str, sa: &str) -> String {
    format!("system:serviceaccount:{ns}:{sa}")
}

async fn impersonate_sa(ns: &str, sa: &str) -> Client {
    let groups = [
        "system:serviceaccounts".to_string(),
        format!("system:serviceaccounts:{ns}"),
        "system:authenticated".to_string(),
    ];
    let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
    support::client_as(&sa_user(ns, sa), &groups)
        .await
        .expect("control plane is up")
}

/// The server reports exactly the pinned release (the ldflags version stamp works) and serves
/// the APIs the operator relies on.
#[tokio::test]
async fn version_is_the_pinned_release() {
    let Some(client) = support::admin_client().await else {
        return;
    };
    let info = client.apiserver_version().await.expect("GET /version");
    let pinned = std::fs::read_to_string(
        support::controlplane::repo_root().join("tests/controlplane/K8S_VERSION"),
    )
    .expect("tests/controlplane/K8S_VERSION");
    let pinned = pinned.trim();
    assert_eq!(info.git_version, pinned, "{info:?}");
    let minor = pinned.trim_start_matches("v1.").split('.').next().unwrap();
    assert_eq!(
        (info.major.as_str(), info.minor.as_str()),
        ("1", minor),
        "{info:?}"
    );

    // ValidatingAdmissionPolicy (GA) and CRDs are served.
    let groups = client.list_api_groups().await.expect("GET /apis");
    let has = |name: &str, version: &str| {
        groups
            .groups
            .iter()
            .any(|g| g.name == name && g.versions.iter().any(|v| v.version == version))
    };
    assert!(
        has("admissionregistration.k8s.io", "v1"),
        "admissionregistration.k8s.io/v1 not served"
    );
    assert!(
        has("apiextensions.k8s.io", "v1"),
        "apiextensions.k8s.io/v1 not served"
    );
    let resources = client
        .list_api_group_resources("admissionregistration.k8s.io/v1")
        .await
        .expect("GET /apis/admissionregistration.k8s.io/v1");
    assert!(
        resources
            .resources
            .iter()
            .any(|r| r.name == "validatingadmissionpolicies"),
        "validatingadmissionpolicies not served: {:?}",
        resources
            .resources
            .iter()
            .map(|r| &r.name)
            .collect::<Vec<_>>()
    );
}

/// Server-side apply: a second field manager that sets a field owned by the first gets 409
/// Conflict unless it forces; forcing moves the ownership. The deployment controller (in
/// kube-controller-manager) then creates the ReplicaSet.
#[tokio::test]
async fn server_side_apply_conflict_between_field_managers() {
    let Some(ns) = TestNamespace::new("ssa").await else {
        return;
    };
    let deployments: Api<Deployment> = ns.api();
    let manifest = |replicas: i32| {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": { "name": "web" },
            "spec": {
                "replicas": replicas,
                "selector": { "matchLabels": { "app": "web" } },
                "template": {
                    "metadata": { "labels": { "app": "web" } },
                    "spec": { "containers": [{ "name": "web", "image": "nginx:1.27" }] }
                }
            }
        })
    };

    let first = deployments
        .patch(
            "web",
            &PatchParams::apply("manager-a"),
            &Patch::Apply(manifest(1)),
        )
        .await
        .expect("first apply by manager-a");
    assert_eq!(first.spec.as_ref().unwrap().replicas, Some(1));

    let conflict = deployments
        .patch(
            "web",
            &PatchParams::apply("manager-b"),
            &Patch::Apply(manifest(3)),
        )
        .await
        .expect_err("manager-b must conflict on spec.replicas owned by manager-a");
    assert_eq!(api_code(&conflict), Some(409), "{conflict:?}");
    let msg = conflict.to_string();
    assert!(
        msg.contains("manager-a") && msg.contains(".spec.replicas"),
        "conflict names the owner and field: {msg}"
    );
    let unchanged = deployments.get("web").await.unwrap();
    assert_eq!(
        unchanged.spec.as_ref().unwrap().replicas,
        Some(1),
        "a rejected apply changed nothing"
    );

    let forced = deployments
        .patch(
            "web",
            &PatchParams::apply("manager-b").force(),
            &Patch::Apply(manifest(3)),
        )
        .await
        .expect("forced apply by manager-b");
    assert_eq!(forced.spec.as_ref().unwrap().replicas, Some(3));
    let managers: Vec<(String, serde_json::Value)> = forced
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            (
                m.manager.unwrap_or_default(),
                m.fields_v1.map(|f| f.0).unwrap_or_default(),
            )
        })
        .collect();
    // Only the owner of spec.replicas matters (the controller may own status.replicas).
    let owner_of_replicas: Vec<&str> = managers
        .iter()
        .filter(|(_, f)| f.pointer("/f:spec/f:replicas").is_some())
        .map(|(m, _)| m.as_str())
        .collect();
    assert_eq!(
        owner_of_replicas,
        vec!["manager-b"],
        "managedFields: {managers:?}"
    );

    let uid = forced.metadata.uid.clone().unwrap();
    let replicasets: Api<ReplicaSet> = ns.api();
    // kube-controller-manager's deployment controller creates a ReplicaSet owned by the
    // Deployment and scales it to the forced replica count.
    eventually(
        "a ReplicaSet owned by the Deployment with 3 replicas",
        WAIT,
        || {
            let replicasets = replicasets.clone();
            let uid = uid.clone();
            async move {
                let list = replicasets.list(&ListParams::default()).await.ok()?;
                list.items.into_iter().find(|rs| {
                    rs.metadata
                        .owner_references
                        .iter()
                        .flatten()
                        .any(|o| o.uid == uid && o.kind == "Deployment")
                        && rs.spec.as_ref().and_then(|s| s.replicas) == Some(3)
                })
            }
        },
    )
    .await;
}

/// A CRD becomes Established, and its CEL `x-kubernetes-validations` rule rejects an invalid
/// object with the rule's message while a valid one is stored.
#[tokio::test]
async fn crd_established_and_cel_rule_rejects_invalid_object() {
    let Some(ns) = TestNamespace::new("crd").await else {
        return;
    };
    let group = format!("{}.example.com", support::controlplane::unique_name("crd"));
    let crd_name = format!("widgets.{group}");
    let _cleanup = KubectlOnDrop(vec![
        "delete".into(),
        "crd".into(),
        crd_name.clone(),
        "--wait=false".into(),
    ]);
    let rule_message = "replicas must not exceed maxReplicas";
    let crd: CustomResourceDefinition = obj(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": { "name": crd_name },
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": { "plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList" },
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": { "openAPIV3Schema": {
                    "type": "object",
                    "properties": { "spec": {
                        "type": "object",
                        "required": ["replicas", "maxReplicas"],
                        "properties": {
                            "replicas": { "type": "integer" },
                            "maxReplicas": { "type": "integer" }
                        },
                        "x-kubernetes-validations": [
                            { "rule": "self.replicas <= self.maxReplicas", "message": rule_message }
                        ]
                    }}
                }}
            }]
        }
    }));
    let crds: Api<CustomResourceDefinition> = Api::all(ns.client.clone());
    crds.create(&PostParams::default(), &crd)
        .await
        .expect("create CRD");
    eventually("the CRD to be Established", WAIT, || {
        let crds = crds.clone();
        let crd_name = crd_name.clone();
        async move {
            let crd = crds.get(&crd_name).await.ok()?;
            crd.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        }
    })
    .await;

    let ar = ApiResource {
        group: group.clone(),
        version: "v1".into(),
        api_version: format!("{group}/v1"),
        kind: "Widget".into(),
        plural: "widgets".into(),
    };
    let widgets: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &ar);
    let widget = |name: &str, replicas: i64| -> DynamicObject {
        obj(json!({
            "apiVersion": format!("{group}/v1"),
            "kind": "Widget",
            "metadata": { "name": name },
            "spec": { "replicas": replicas, "maxReplicas": 3 }
        }))
    };

    // Right after Established the new resource may take a moment to be routable.
    let invalid = eventually(
        "the invalid Widget to be judged by the API server",
        WAIT,
        || {
            let widgets = widgets.clone();
            let w = widget("too-many", 5);
            async move {
                match widgets.create(&PostParams::default(), &w).await {
                    Err(e) if api_code(&e) == Some(404) => None,
                    other => Some(other),
                }
            }
        },
    )
    .await;
    let err = invalid.expect_err("replicas 5 > maxReplicas 3 must be rejected by the CEL rule");
    assert_eq!(api_code(&err), Some(422), "{err:?}");
    assert!(
        err.to_string().contains(rule_message),
        "error carries the rule's message: {err}"
    );
    assert_eq!(
        api_code(&widgets.get("too-many").await.unwrap_err()),
        Some(404)
    );

    let ok = widgets
        .create(&PostParams::default(), &widget("fine", 2))
        .await
        .expect("valid Widget");
    assert_eq!(ok.data["spec"]["replicas"], json!(2));

    // The rule also guards updates.
    let patched = widgets
        .patch(
            "fine",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": 4 } })),
        )
        .await
        .expect_err("an update breaking the rule must be rejected");
    assert!(patched.to_string().contains(rule_message), "{patched}");
}

/// kube-controller-manager's garbage collector deletes a dependent whose owner is gone, and
/// leaves an object without owner alone.
#[tokio::test]
async fn garbage_collector_deletes_dependents_of_a_deleted_owner() {
    let Some(ns) = TestNamespace::new("gc").await else {
        return;
    };
    let cms: Api<ConfigMap> = ns.api();
    let owner = cms
        .create(
            &PostParams::default(),
            &obj(json!({ "metadata": { "name": "owner" }, "data": { "k": "v" } })),
        )
        .await
        .expect("create owner");
    let uid = owner.metadata.uid.clone().unwrap();
    cms.create(
        &PostParams::default(),
        &obj(json!({
            "metadata": {
                "name": "child",
                "ownerReferences": [{ "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid }]
            },
            "data": { "k": "v" }
        })),
    )
    .await
    .expect("create child");
    cms.create(
        &PostParams::default(),
        &obj(json!({ "metadata": { "name": "bystander" } })),
    )
    .await
    .expect("create bystander");

    cms.delete("owner", &DeleteParams::default())
        .await
        .expect("delete owner");
    eventually("the garbage collector to delete the child", WAIT, || {
        let cms = cms.clone();
        async move {
            match cms.get("child").await {
                Err(e) if api_code(&e) == Some(404) => Some(()),
                _ => None,
            }
        }
    })
    .await;
    cms.get("bystander")
        .await
        .expect("an object without owner must stay");
}

/// RBAC: a service account with a Role for reading ConfigMaps can read them but is denied
/// Secrets and writes, both when impersonated and with a real token from the TokenRequest API.
#[tokio::test]
async fn rbac_denies_a_service_account_without_permission() {
    let Some(ns) = TestNamespace::new("rbac").await else {
        return;
    };
    let n = ns.name.as_str();
    let pp = PostParams::default();
    ns.api::<ServiceAccount>()
        .create(&pp, &obj(json!({ "metadata": { "name": "limited" } })))
        .await
        .unwrap();
    ns.api::<Role>()
        .create(&pp, &obj(json!({
            "metadata": { "name": "read-configmaps" },
            "rules": [{ "apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"] }]
        })))
        .await
        .unwrap();
    ns.api::<RoleBinding>()
        .create(&pp, &obj(json!({
            "metadata": { "name": "limited-reads-configmaps" },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-configmaps" },
            "subjects": [{ "kind": "ServiceAccount", "name": "limited", "namespace": n }]
        })))
        .await
        .unwrap();
    ns.api::<Secret>()
        .create(
            &pp,
            &obj(json!({ "metadata": { "name": "s" }, "stringData": { "a": "b" } })),
        )
        .await
        .unwrap();

    // 1. Impersonation of the service account.
    let as_sa = impersonate_sa(n, "limited").await;
    check_limited_rights(&as_sa, n).await;

    // 2. A real bound token, signed by the apiserver's service-account key.
    let tr: TokenRequest = obj(json!({ "spec": { "audiences": [], "expirationSeconds": 600 } }));
    let tr: TokenRequest = ns
        .api::<ServiceAccount>()
        .create_subresource("token", "limited", &pp, &tr)
        .await
        .expect("TokenRequest");
    let token = tr.status.expect("token status").token;
    let admin_kc = Kubeconfig::read_from(&ns.control_plane.kubeconfig).unwrap();
    let mut kc = serde_json::to_value(&admin_kc).unwrap();
    kc["users"][0]["user"] = json!({ "token": token });
    let kc: Kubeconfig = serde_json::from_value(kc).unwrap();
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    let with_token = Client::try_from(config).unwrap();
    let review: SelfSubjectReview = Api::all(with_token.clone())
        .create(
            &pp,
            &obj(json!({ "apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview" })),
        )
        .await
        .expect("SelfSubjectReview with the token");
    let username = review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username);
    assert_eq!(username.as_deref(), Some(sa_user(n, "limited").as_str()));
    check_limited_rights(&with_token, n).await;
}

async fn check_limited_rights(client: &Client, ns: &str) {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    cms.list(&ListParams::default())
        .await
        .expect("the Role allows listing ConfigMaps");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let denied = secrets
        .get("s")
        .await
        .expect_err("reading a Secret must be denied");
    assert_eq!(api_code(&denied), Some(403), "{denied:?}");
    assert!(denied.to_string().contains("forbidden"), "{denied}");
    let denied = cms
        .create(
            &PostParams::default(),
            &obj(json!({ "metadata": { "name": "nope" } })),
        )
        .await
        .expect_err("creating a ConfigMap must be denied");
    assert_eq!(api_code(&denied), Some(403), "{denied:?}");
    let other: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    let denied = other
        .list(&ListParams::default())
        .await
        .expect_err("other namespaces are not granted");
    assert_eq!(api_code(&denied), Some(403), "{denied:?}");
}

async fn next_event<S>(stream: &mut S) -> watcher::Event<ConfigMap>
where
    S: futures::Stream<Item = Result<watcher::Event<ConfigMap>, watcher::Error>> + Unpin,
{
    tokio::time::timeout(Duration::from_secs(30), stream.try_next())
        .await
        .expect("a watch event within 30 s")
        .expect("watch stream error")
        .expect("watch stream ended")
}

/// A watch (kube-runtime's watcher: list, then watch) receives add, update and delete events.
#[tokio::test]
async fn watch_receives_events() {
    let Some(ns) = TestNamespace::new("watch").await else {
        return;
    };
    let cms: Api<ConfigMap> = ns.api();
    let mut stream = watcher(
        cms.clone(),
        watcher::Config::default().labels("watched=yes"),
    )
    .boxed();
    // The initial list of an empty selection.
    loop {
        if let watcher::Event::InitDone = next_event(&mut stream).await {
            break;
        }
    }
    let pp = PostParams::default();
    cms.create(&pp, &obj(json!({ "metadata": { "name": "ignored" } })))
        .await
        .unwrap();
    cms.create(&pp, &obj(json!({ "metadata": { "name": "w", "labels": { "watched": "yes" } }, "data": { "v": "1" } })))
        .await
        .unwrap();
    match next_event(&mut stream).await {
        watcher::Event::Apply(cm) => {
            assert_eq!(
                cm.metadata.name.as_deref(),
                Some("w"),
                "only the labelled object is watched"
            );
            assert_eq!(cm.data.unwrap()["v"], "1");
        }
        other => panic!("expected Apply for the created object, got {other:?}"),
    }
    cms.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({ "data": { "v": "2" } })),
    )
    .await
    .unwrap();
    match next_event(&mut stream).await {
        watcher::Event::Apply(cm) => assert_eq!(cm.data.unwrap()["v"], "2"),
        other => panic!("expected Apply for the update, got {other:?}"),
    }
    cms.delete("w", &DeleteParams::default()).await.unwrap();
    match next_event(&mut stream).await {
        watcher::Event::Delete(cm) => assert_eq!(cm.metadata.name.as_deref(), Some("w")),
        other => panic!("expected Delete, got {other:?}"),
    }
}

/// A ValidatingAdmissionPolicy with a CEL expression, bound to one namespace, denies matching
/// requests there with its message.
#[tokio::test]
async fn validating_admission_policy_denies_with_its_message() {
    let Some(ns) = TestNamespace::new("vap").await else {
        return;
    };
    let policy = support::controlplane::unique_name("no-forbidden-key");
    let _cleanup = KubectlOnDrop(vec![
        "delete".into(),
        "validatingadmissionpolicy,validatingadmissionpolicybinding".into(),
        policy.clone(),
        "--ignore-not-found".into(),
        "--wait=false".into(),
    ]);
    let message = "the key 'forbidden' is not allowed";
    let client = ns.client.clone();
    let vap_ar = ApiResource {
        group: "admissionregistration.k8s.io".into(),
        version: "v1".into(),
        api_version: "admissionregistration.k8s.io/v1".into(),
        kind: "ValidatingAdmissionPolicy".into(),
        plural: "validatingadmissionpolicies".into(),
    };
    let binding_ar = ApiResource {
        kind: "ValidatingAdmissionPolicyBinding".into(),
        plural: "validatingadmissionpolicybindings".into(),
        ..vap_ar.clone()
    };
    Api::<DynamicObject>::all_with(client.clone(), &vap_ar)
        .create(
            &PostParams::default(),
            &obj(json!({
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicy",
                "metadata": { "name": policy },
                "spec": {
                    "failurePolicy": "Fail",
                    "matchConstraints": { "resourceRules": [{
                        "apiGroups": [""], "apiVersions": ["v1"],
                        "operations": ["CREATE", "UPDATE"], "resources": ["configmaps"]
                    }]},
                    "validations": [{
                        "expression": "!has(object.data) || !('forbidden' in object.data)",
                        "message": message
                    }]
                }
            })),
        )
        .await
        .expect("create ValidatingAdmissionPolicy");
    Api::<DynamicObject>::all_with(client.clone(), &binding_ar)
        .create(
            &PostParams::default(),
            &obj(json!({
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicyBinding",
                "metadata": { "name": policy },
                "spec": {
                    "policyName": policy,
                    "validationActions": ["Deny"],
                    "matchResources": { "namespaceSelector": {
                        "matchLabels": { "kubernetes.io/metadata.name": ns.name }
                    }}
                }
            })),
        )
        .await
        .expect("create ValidatingAdmissionPolicyBinding");

    let cms: Api<ConfigMap> = ns.api();
    let bad: ConfigMap =
        obj(json!({ "metadata": { "name": "bad" }, "data": { "forbidden": "x" } }));
    // The policy takes effect once the apiserver's informers have seen it: probe with dry runs.
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let err = eventually("the policy to take effect", WAIT, || {
        let cms = cms.clone();
        let bad = bad.clone();
        let dry = dry.clone();
        async move { cms.create(&dry, &bad).await.err() }
    })
    .await;
    assert_eq!(api_code(&err), Some(422), "{err:?}");
    assert!(err.to_string().contains(message), "{err}");
    let err = cms
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("denied for real too");
    assert!(err.to_string().contains(message), "{err}");
    cms.create(
        &PostParams::default(),
        &obj(json!({ "metadata": { "name": "good" }, "data": { "fine": "x" } })),
    )
    .await
    .expect("a ConfigMap without the key is admitted");
}

/// The audit log records each write once with its user and namespace, and no reads: the count
/// helper sees exactly the writes a user made.
#[tokio::test]
async fn audit_log_counts_writes_per_user() {
    let Some(ns) = TestNamespace::new("audit").await else {
        return;
    };
    let n = ns.name.as_str();
    let pp = PostParams::default();
    ns.api::<ServiceAccount>()
        .create(&pp, &obj(json!({ "metadata": { "name": "writer" } })))
        .await
        .unwrap();
    ns.api::<Role>()
        .create(&pp, &obj(json!({
            "metadata": { "name": "cm-writer" },
            "rules": [{ "apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "create", "patch"] }]
        })))
        .await
        .unwrap();
    ns.api::<RoleBinding>()
        .create(&pp, &obj(json!({
            "metadata": { "name": "writer" },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-writer" },
            "subjects": [{ "kind": "ServiceAccount", "name": "writer", "namespace": n }]
        })))
        .await
        .unwrap();

    let audit = AuditLog::of(ns.control_plane);
    let user = sa_user(n, "writer");
    let mark = audit.mark();
    assert_eq!(
        audit.count_writes(&mark, &user, Some(n)),
        0,
        "no writes yet"
    );

    let as_sa = impersonate_sa(n, "writer").await;
    let cms: Api<ConfigMap> = Api::namespaced(as_sa.clone(), n);
    for i in 0..5 {
        cms.list(&ListParams::default()).await.unwrap();
        let _ = cms.get(&format!("c{i}")).await;
    }
    let after_reads = audit.mark();
    assert_eq!(
        audit.count_writes(&mark, &user, None),
        0,
        "reads are not audited as writes"
    );
    assert!(
        audit.events_since(&mark).iter().all(|e| e.user != user),
        "reads are not recorded at all"
    );

    cms.create(&pp, &obj(json!({ "metadata": { "name": "c1" } })))
        .await
        .unwrap();
    cms.patch(
        "c1",
        &PatchParams::default(),
        &Patch::Merge(json!({ "data": { "a": "b" } })),
    )
    .await
    .unwrap();
    let denied = Api::<Secret>::namespaced(as_sa, n)
        .create(&pp, &obj(json!({ "metadata": { "name": "nope" } })))
        .await
        .expect_err("no rights on secrets");
    assert_eq!(api_code(&denied), Some(403));
    // An admin write in the same namespace is counted for the admin, not the service account.
    ns.api::<ConfigMap>()
        .create(&pp, &obj(json!({ "metadata": { "name": "by-admin" } })))
        .await
        .unwrap();

    // A create denied by RBAC is audited before its body is decoded: its objectRef has no name.
    let writes = audit.writes_since(&after_reads, |e| e.user == user);
    let summary: Vec<(String, String, String, u16)> = writes
        .iter()
        .map(|e| (e.verb.clone(), e.resource.clone(), e.name.clone(), e.code))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("create".into(), "configmaps".into(), "c1".into(), 201),
            ("patch".into(), "configmaps".into(), "c1".into(), 200),
            ("create".into(), "secrets".into(), String::new(), 403),
        ],
        "{writes:#?}"
    );
    assert!(
        writes
            .iter()
            .all(|e| e.namespace == n && e.impersonated_by.as_deref() == Some("opsc-admin"))
    );
    assert_eq!(writes.iter().filter(|e| e.succeeded()).count(), 2);
    let counts = audit.count_writes_by_user_and_namespace(&after_reads);
    assert_eq!(
        counts.get(&(user.clone(), n.to_string())),
        Some(&3),
        "{counts:?}"
    );
    assert_eq!(
        counts.get(&("opsc-admin".to_string(), n.to_string())),
        Some(&1),
        "{counts:?}"
    );
}

/// The pinned kubectl built with the control plane talks to it, and `scripts/build-parts tools`
/// provides helm stamped with the Kubernetes version it was built against.
#[tokio::test]
async fn pinned_kubectl_and_helm_work() {
    let Some(ns) = TestNamespace::new("cli").await else {
        return;
    };
    let out = ns
        .control_plane
        .kubectl()
        .args(["version", "-o", "json"])
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["clientVersion"]["gitVersion"], v["serverVersion"]["gitVersion"],
        "{v}"
    );
    let out = ns
        .control_plane
        .kubectl()
        .args([
            "-n",
            &ns.name,
            "create",
            "configmap",
            "from-kubectl",
            "--from-literal=a=b",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ns.api::<ConfigMap>()
        .get("from-kubectl")
        .await
        .expect("kubectl created it");

    let Some(tools) = support::tools_bin_dir() else {
        return;
    };
    let chart = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(tools.join("helm"))
        .args(["create", "c"])
        .current_dir(chart.path())
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    std::fs::write(
        chart.path().join("c/templates/kv.yaml"),
        "# kube {{ .Capabilities.KubeVersion.Version }}\n",
    )
    .unwrap();
    let out = std::process::Command::new(tools.join("helm"))
        .args(["template", "c"])
        .current_dir(chart.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let minor = std::fs::read_to_string(
        support::controlplane::repo_root().join("tests/controlplane/K8S_VERSION"),
    )
    .unwrap()
    .trim()
    .split('.')
    .nth(1)
    .unwrap()
    .to_string();
    let rendered = String::from_utf8_lossy(&out.stdout);
    assert!(
        rendered.contains(&format!("# kube v1.{minor}.")),
        "helm must know its Kubernetes version: {rendered}"
    );
}
