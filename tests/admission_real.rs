//! The admission guardrails (src/admission/) and the violation audit (src/audit/) against
//! the real local kube-apiserver: real CEL evaluation, real RBAC, impersonated users.
//!
//! The API server is shared by every test binary, and ValidatingAdmissionPolicies are
//! cluster-wide. So each test installs its own copy of the guardrails: names suffixed with a
//! run id, the operator identity unique to the run, and every binding narrowed to namespaces
//! labelled `opsconductor.test/admission-run=<run>`. The policies' own rules are the shipped
//! ones, byte for byte. Everything cluster-scoped a test creates is deleted when it ends, also
//! when it fails.
//!
//! Also here, without the control plane: the committed `manifests/admission/guardrails.yaml`
//! must equal what the code builds (`OPSC_UPDATE_SNAPSHOTS=1` regenerates it).

mod support;

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use opsconductor_operator::admission::{
    self, AUDIT, ENFORCE, Guardrails, MANIFEST_PATH, OperatorIdentity, PROTECTED_LABEL,
};
use serde_json::{Value, json};

const RUN_LABEL: &str = "opsconductor.test/admission-run";
const POLICY_TIMEOUT: Duration = Duration::from_secs(90);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The committed manifest is exactly what the code builds for the default identity.
#[test]
fn committed_manifest_matches_the_code() {
    let yaml = admission::guardrails(&OperatorIdentity::default()).to_yaml();
    let path = root().join(MANIFEST_PATH);
    if std::env::var_os("OPSC_UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &yaml).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; generate it with OPSC_UPDATE_SNAPSHOTS=1 cargo test --test admission_real committed_manifest",
            path.display()
        )
    });
    assert!(
        committed == yaml,
        "{} differs from src/admission/; regenerate with OPSC_UPDATE_SNAPSHOTS=1 cargo test \
         --test admission_real committed_manifest and review the diff",
        path.display()
    );
    // It parses back into the typed objects.
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&committed)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(docs.len(), 11);
}

// ---------------------------------------------------------------------------------------------
// Set-up shared by the control-plane tests.
// ---------------------------------------------------------------------------------------------

/// Deletes cluster-scoped objects with the pinned kubectl when dropped (also on panic).
struct DeleteOnDrop(Vec<String>);

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        if let Some(cp) = support::control_plane() {
            for what in &self.0 {
                let _ = cp
                    .kubectl()
                    .args(["delete", what, "--ignore-not-found", "--wait=false"])
                    .output();
            }
        }
    }
}

/// The shipped guardrails, renamed for `run` and bound only to namespaces labelled with it.
fn scoped(mut g: Guardrails, run: &str) -> Guardrails {
    let only_this_run = LabelSelectorRequirement {
        key: RUN_LABEL.into(),
        operator: "In".into(),
        values: Some(vec![run.into()]),
    };
    for p in &mut g.policies {
        p.metadata.name = Some(format!("{}-{run}", p.metadata.name.as_ref().unwrap()));
    }
    for b in &mut g.bindings {
        b.metadata.name = Some(format!("{}-{run}", b.metadata.name.as_ref().unwrap()));
        let spec = b.spec.as_mut().unwrap();
        spec.policy_name = Some(format!("{}-{run}", spec.policy_name.as_ref().unwrap()));
        let selector = spec
            .match_resources
            .get_or_insert_with(Default::default)
            .namespace_selector
            .get_or_insert_with(Default::default);
        selector
            .match_expressions
            .get_or_insert_with(Vec::new)
            .push(only_this_run.clone());
    }
    g
}

struct Env {
    run: String,
    /// The namespace the guardrails protect (once the operator marks it).
    ns: support::TestNamespace,
    admin: Client,
    /// An ordinary user allowed to write Services, Pods and Namespaces by RBAC.
    alice: Client,
    alice_name: String,
    /// The operator's service account, impersonated.
    operator: Client,
    _cleanup: DeleteOnDrop,
}

impl Env {
    async fn new(prefix: &str) -> Option<Env> {
        let ns = support::TestNamespace::new(prefix).await?;
        let admin = ns.client.clone();
        let run = support::unique_name("adm");
        let operator_id = OperatorIdentity::new(&run, "operator").unwrap();
        let alice_name = format!("alice-{run}");
        let guardrails = scoped(admission::guardrails(&operator_id), &run);

        let mut cleanup = Vec::new();
        for p in &guardrails.policies {
            cleanup.push(format!(
                "validatingadmissionpolicy/{}",
                p.metadata.name.as_ref().unwrap()
            ));
        }
        for b in &guardrails.bindings {
            cleanup.push(format!(
                "validatingadmissionpolicybinding/{}",
                b.metadata.name.as_ref().unwrap()
            ));
        }
        cleanup.push(format!("clusterrole/{run}"));
        cleanup.push(format!("clusterrolebinding/{run}"));
        let cleanup = DeleteOnDrop(cleanup);

        let pp = PostParams::default();
        let policies: Api<ValidatingAdmissionPolicy> = Api::all(admin.clone());
        for p in &guardrails.policies {
            policies.create(&pp, p).await.expect("create policy");
        }
        let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(admin.clone());
        for b in &guardrails.bindings {
            bindings.create(&pp, b).await.expect("create binding");
        }

        // RBAC: both may write what the tests write; only the policies tell them apart.
        let role: ClusterRole = from(json!({
            "metadata": {"name": run},
            "rules": [
                {"apiGroups": [""], "resources": ["services", "pods"],
                 "verbs": ["get", "list", "create", "update", "patch", "delete"]},
                {"apiGroups": [""], "resources": ["namespaces"],
                 "verbs": ["get", "create", "update", "patch"]},
                {"apiGroups": ["apps"], "resources": ["deployments", "replicasets"],
                 "verbs": ["get", "list", "create", "update", "patch", "delete"]},
            ]
        }));
        Api::<ClusterRole>::all(admin.clone())
            .create(&pp, &role)
            .await
            .expect("create ClusterRole");
        let binding: ClusterRoleBinding = from(json!({
            "metadata": {"name": run},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": run},
            "subjects": [
                {"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": alice_name},
                {"kind": "ServiceAccount", "namespace": run, "name": "operator"},
            ]
        }));
        Api::<ClusterRoleBinding>::all(admin.clone())
            .create(&pp, &binding)
            .await
            .expect("create ClusterRoleBinding");

        // The namespace takes part in this run's bindings.
        label_namespace(&admin, &ns.name, RUN_LABEL, Some(&run))
            .await
            .expect("admin labels the test namespace with the run id");

        let alice = support::client_as(&alice_name, &["system:authenticated"])
            .await
            .unwrap();
        let sa_groups = [
            "system:serviceaccounts".to_string(),
            format!("system:serviceaccounts:{run}"),
            "system:authenticated".to_string(),
        ];
        let sa_groups: Vec<&str> = sa_groups.iter().map(String::as_str).collect();
        let operator = support::client_as(&operator_id.username(), &sa_groups)
            .await
            .unwrap();
        Some(Env {
            run,
            ns,
            admin,
            alice,
            alice_name,
            operator,
            _cleanup: cleanup,
        })
    }

    fn services(&self, client: &Client) -> Api<Service> {
        Api::namespaced(client.clone(), &self.ns.name)
    }

    fn pods(&self, client: &Client) -> Api<Pod> {
        Api::namespaced(client.clone(), &self.ns.name)
    }

    /// Waits until the marker policy is active: alice's dry-run change of the marker on the
    /// test namespace is denied by it.
    async fn wait_for_marker_policy(&self) {
        let ns = self.ns.name.clone();
        let alice = self.alice.clone();
        support::eventually("the marker policy to be active", POLICY_TIMEOUT, || {
            let (ns, alice) = (ns.clone(), alice.clone());
            async move {
                let e = label_namespace_with(&alice, &ns, PROTECTED_LABEL, Some("bogus"), true)
                    .await
                    .err()?;
                denied_by_policy(&e).then_some(())
            }
        })
        .await;
    }

    /// The operator marks the namespace `value` (callers then wait for the binding to act).
    async fn operator_marks(&self, value: &str) {
        label_namespace(&self.operator, &self.ns.name, PROTECTED_LABEL, Some(value))
            .await
            .expect("the operator may set the marker");
    }
}

fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("test object must deserialize")
}

async fn label_namespace(
    client: &Client,
    ns: &str,
    key: &str,
    value: Option<&str>,
) -> Result<Namespace, kube::Error> {
    label_namespace_with(client, ns, key, value, false).await
}

async fn label_namespace_with(
    client: &Client,
    ns: &str,
    key: &str,
    value: Option<&str>,
    dry_run: bool,
) -> Result<Namespace, kube::Error> {
    let pp = PatchParams {
        dry_run,
        ..PatchParams::default()
    };
    Api::<Namespace>::all(client.clone())
        .patch(
            ns,
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {key: value}}})),
        )
        .await
}

/// Denied by a ValidatingAdmissionPolicy (not by RBAC, not by validation).
fn denied_by_policy(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.message.contains("ValidatingAdmissionPolicy"))
}

fn message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({}, {})", s.message, s.code, s.reason),
        other => other.to_string(),
    }
}

fn service(name: &str, spec: Value) -> Service {
    let mut spec = spec;
    if spec.get("ports").is_none() {
        spec["ports"] = json!([{"port": 80, "targetPort": 8080}]);
    }
    if spec.get("selector").is_none() {
        spec["selector"] = json!({"app": name});
    }
    from(json!({"metadata": {"name": name}, "spec": spec}))
}

fn pod(name: &str, spec: Value) -> Pod {
    let mut spec = spec;
    if spec.get("containers").is_none() {
        spec["containers"] = json!([{"name": "main", "image": "registry.invalid/app:1"}]);
    }
    from(json!({"metadata": {"name": name, "labels": {"app": name}}, "spec": spec}))
}

fn dry_run() -> PostParams {
    PostParams {
        dry_run: true,
        ..PostParams::default()
    }
}

/// Creates `obj` (dry run or not) and expects a policy denial whose message contains `words`.
async fn expect_denied<K>(api: &Api<K>, obj: &K, words: &str, dry: bool) -> String
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let pp = if dry {
        dry_run()
    } else {
        PostParams::default()
    };
    let e = api
        .create(&pp, obj)
        .await
        .expect_err("the guardrails must deny this");
    assert!(denied_by_policy(&e), "not a policy denial: {}", message(&e));
    let m = message(&e);
    assert!(
        m.contains(words),
        "the denial must say why ({words:?}): {m}"
    );
    m
}

// ---------------------------------------------------------------------------------------------
// Enforce mode.
// ---------------------------------------------------------------------------------------------

/// Issue 14, item 3: a pod with the stack's label joins the stack (its Services, the gateway's
/// LoadBalancer included, and its NetworkPolicies select it). Only the operator's Deployments,
/// through the real deployment and ReplicaSet controllers, may put such pods in a protected
/// namespace; nobody may create them directly, through another workload, or by relabelling.
#[tokio::test]
async fn only_the_operators_deployments_put_pods_into_a_stack() {
    use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
    let Some(env) = Env::new("adm-members").await else {
        return;
    };
    let stack_labels =
        json!({"opsconductor.io/stack": "shop", "app.kubernetes.io/component": "gateway"});
    let labelled_pod: Pod = from(
        json!({"metadata": {"name": "joiner", "labels": stack_labels},
        "spec": {"containers": [{"name": "main", "image": "registry.invalid/app:1"}]}}),
    );
    let template = json!({"metadata": {"labels": stack_labels},
        "spec": {"containers": [{"name": "main", "image": "registry.invalid/app:1"}]}});
    let deployment = |name: &str| -> Deployment {
        from(json!({"metadata": {"name": name}, "spec": {"replicas": 1,
            "selector": {"matchLabels": stack_labels}, "template": template}}))
    };
    let replica_set: ReplicaSet = from(json!({"metadata": {"name": "rs-joiner"}, "spec": {
        "replicas": 1, "selector": {"matchLabels": stack_labels}, "template": template}}));
    let alice_pods = env.pods(&env.alice);
    let alice_deploy: Api<Deployment> = Api::namespaced(env.alice.clone(), &env.ns.name);
    let alice_rs: Api<ReplicaSet> = Api::namespaced(env.alice.clone(), &env.ns.name);
    let op_deploy: Api<Deployment> = Api::namespaced(env.operator.clone(), &env.ns.name);

    // Unprotected namespace: nothing is checked yet.
    alice_pods
        .create(&dry_run(), &labelled_pod)
        .await
        .unwrap_or_else(|e| panic!("unprotected namespace: {}", message(&e)));
    env.operator_marks(ENFORCE).await;
    support::eventually("the members binding to deny", POLICY_TIMEOUT, || {
        let (api, probe) = (alice_pods.clone(), labelled_pod.clone());
        async move {
            let e = api.create(&dry_run(), &probe).await.err()?;
            denied_by_policy(&e).then_some(())
        }
    })
    .await;

    // Directly, or through a workload of one's own: denied, saying why.
    let why = "makes a pod part of a stack";
    expect_denied(&alice_pods, &labelled_pod, why, false).await;
    expect_denied(&alice_deploy, &deployment("joiner"), why, false).await;
    expect_denied(&alice_rs, &replica_set, why, false).await;
    // Pods and workloads without the label are none of its business.
    alice_pods
        .create(&PostParams::default(), &pod("plain", json!({})))
        .await
        .unwrap_or_else(|e| panic!("an unlabelled pod must pass: {}", message(&e)));

    // The operator's Deployment: the real deployment controller creates its ReplicaSet and the
    // real ReplicaSet controller its pod, each allowed.
    op_deploy
        .create(&PostParams::default(), &deployment("gateway"))
        .await
        .unwrap_or_else(|e| panic!("the operator's Deployment: {}", message(&e)));
    let member = support::eventually(
        "the ReplicaSet controller to create the Deployment's pod",
        POLICY_TIMEOUT,
        || {
            let api = alice_pods.clone();
            async move {
                api.list(&ListParams::default().labels("opsconductor.io/stack=shop"))
                    .await
                    .ok()?
                    .items
                    .into_iter()
                    .next()
            }
        },
    )
    .await;
    let member_name = member.metadata.name.clone().unwrap();

    // Relabelling: joining with an unlabelled pod, moving a member to another stack or out of
    // its stack: denied.
    let relabel = |labels: Value| Patch::Merge(json!({"metadata": {"labels": labels}}));
    for (name, labels) in [
        ("plain", json!({"opsconductor.io/stack": "shop"})),
        (
            member_name.as_str(),
            json!({"opsconductor.io/stack": "other"}),
        ),
        (member_name.as_str(), json!({"opsconductor.io/stack": null})),
    ] {
        let e = alice_pods
            .patch(name, &PatchParams::default(), &relabel(labels.clone()))
            .await
            .expect_err("relabelling must be denied");
        assert!(
            denied_by_policy(&e) && message(&e).contains(why),
            "{name} {labels}: {}",
            message(&e)
        );
    }
    // Other label changes on a member are fine.
    alice_pods
        .patch(
            &member_name,
            &PatchParams::default(),
            &relabel(json!({"note": "x"})),
        )
        .await
        .unwrap_or_else(|e| panic!("an unrelated label: {}", message(&e)));
}

#[tokio::test]
async fn enforce_mode_denies_exposure_except_the_operators_gateway() {
    let Some(env) = Env::new("adm-enforce").await else {
        return;
    };
    let alice_svc = env.services(&env.alice);
    let op_svc = env.services(&env.operator);
    let alice_pods = env.pods(&env.alice);

    // Before the marker: alice may create a NodePort Service here (dry run) — the
    // guardrails apply to protected namespaces only.
    alice_svc
        .create(&dry_run(), &service("early", json!({"type": "NodePort"})))
        .await
        .unwrap_or_else(|e| panic!("unprotected namespace: {}", message(&e)));

    env.operator_marks(ENFORCE).await;
    let probe = service("legacy-admin", json!({"type": "NodePort"}));
    support::eventually("the enforce binding to deny", POLICY_TIMEOUT, || {
        let (api, probe) = (alice_svc.clone(), probe.clone());
        async move {
            let e = api.create(&dry_run(), &probe).await.err()?;
            denied_by_policy(&e).then_some(())
        }
    })
    .await;

    // Each policy's binding becomes active on its own schedule (the API server's policy
    // informers are independent): wait for the Pod guardrails too before asserting on them.
    let pod_probe = pod("probe-hostnet", json!({"hostNetwork": true}));
    support::eventually(
        "the enforce binding for pods to deny",
        POLICY_TIMEOUT,
        || {
            let (api, probe) = (alice_pods.clone(), pod_probe.clone());
            async move {
                let e = api.create(&dry_run(), &probe).await.err()?;
                denied_by_policy(&e).then_some(())
            }
        },
    )
    .await;

    // An ordinary user's NodePort and LoadBalancer Services: denied, saying why.
    let m = expect_denied(
        &alice_svc,
        &probe,
        "Service type NodePort exposes a workload outside the gateway",
        false,
    )
    .await;
    assert!(m.contains("only the operator may create NodePort and LoadBalancer Services"));
    expect_denied(
        &alice_svc,
        &service("lb", json!({"type": "LoadBalancer"})),
        "Service type LoadBalancer exposes a workload outside the gateway",
        false,
    )
    .await;
    // The same user's ClusterIP Service is fine: RBAC allows the writes, the policy decides.
    alice_svc
        .create(&PostParams::default(), &service("internal", json!({})))
        .await
        .unwrap_or_else(|e| panic!("ClusterIP must be allowed: {}", message(&e)));
    // externalIPs: denied, also on a ClusterIP Service, also for the operator.
    for api in [&alice_svc, &op_svc] {
        expect_denied(
            api,
            &service("ext", json!({"externalIPs": ["203.0.113.10"]})),
            "spec.externalIPs make a Service reachable from outside the cluster",
            true,
        )
        .await;
    }
    // Turning an existing ClusterIP Service into a NodePort one: denied.
    let e = alice_svc
        .patch(
            "internal",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"type": "NodePort"}})),
        )
        .await
        .expect_err("switching to NodePort must be denied");
    assert!(denied_by_policy(&e), "{}", message(&e));

    // The operator's gateway Service (LoadBalancer) is allowed.
    let gateway = service(
        "prod-gateway",
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
               "ports": [{"name": "https", "port": 443, "targetPort": 8443}]}),
    );
    op_svc
        .create(&PostParams::default(), &gateway)
        .await
        .unwrap_or_else(|e| panic!("the operator's gateway must be allowed: {}", message(&e)));
    // Others may still update it when the type stays (e.g. a finalizer or an annotation)...
    alice_svc
        .patch(
            "prod-gateway",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"team": "ops"}}})),
        )
        .await
        .unwrap_or_else(|e| panic!("an update keeping the type must pass: {}", message(&e)));
    // ...but not change it to another exposing type.
    let e = alice_svc
        .patch(
            "prod-gateway",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"type": "NodePort"}})),
        )
        .await
        .expect_err("alice turning the gateway into NodePort must be denied");
    assert!(denied_by_policy(&e), "{}", message(&e));
    // A label copied from the operator's objects proves nothing.
    let mut copied = service("sneaky", json!({"type": "LoadBalancer"}));
    copied.metadata.labels = Some(
        [
            ("app.kubernetes.io/managed-by", "opsconductor-operator"),
            ("opsconductor.io/stack", "prod"),
            ("app.kubernetes.io/component", "gateway"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    );
    expect_denied(&alice_svc, &copied, "Service type LoadBalancer", true).await;

    // Pods: hostNetwork, hostPort (also in an init container) and hostPID are denied.
    expect_denied(
        &alice_pods,
        &pod("hostnet", json!({"hostNetwork": true})),
        "hostNetwork puts the pod on the node's network",
        false,
    )
    .await;
    expect_denied(
        &alice_pods,
        &pod(
            "hostport",
            json!({"containers": [{"name": "web", "image": "x", "ports": [{"containerPort": 80, "hostPort": 8080}]}]}),
        ),
        "hostPort (container web) opens a port on the node",
        false,
    )
    .await;
    expect_denied(
        &alice_pods,
        &pod(
            "init-hostport",
            json!({"initContainers": [{"name": "setup", "image": "x", "ports": [{"containerPort": 1, "hostPort": 9}]}]}),
        ),
        "hostPort (container setup)",
        true,
    )
    .await;
    expect_denied(
        &alice_pods,
        &pod("hostpid", json!({"hostPID": true})),
        "hostPID shares the node's process namespace",
        true,
    )
    .await;
    // No exemption for the operator on pods.
    expect_denied(
        &env.pods(&env.operator),
        &pod("op-hostnet", json!({"hostNetwork": true})),
        "hostNetwork",
        true,
    )
    .await;
    // An ordinary pod is fine.
    alice_pods
        .create(
            &PostParams::default(),
            &pod("plain", json!({"hostNetwork": false})),
        )
        .await
        .unwrap_or_else(|e| panic!("a plain pod must be allowed: {}", message(&e)));

    // When the operator removes the marker (its last stack is gone), the guardrails stop.
    label_namespace(&env.operator, &env.ns.name, PROTECTED_LABEL, None)
        .await
        .expect("the operator may remove the marker");
    support::eventually("the guardrails to stop", POLICY_TIMEOUT, || {
        let api = alice_svc.clone();
        async move {
            api.create(&dry_run(), &service("later", json!({"type": "NodePort"})))
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The namespace marker.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn only_the_operator_can_set_change_or_remove_the_namespace_marker() {
    let Some(env) = Env::new("adm-marker").await else {
        return;
    };
    env.wait_for_marker_policy().await;
    let ns = &env.ns.name;
    let why = "may set, change or remove the label opsconductor.io/protected";

    // Alice cannot set it.
    let e = label_namespace(&env.alice, ns, PROTECTED_LABEL, Some(ENFORCE))
        .await
        .expect_err("alice must not set the marker");
    assert!(
        denied_by_policy(&e) && message(&e).contains(why),
        "{}",
        message(&e)
    );
    // Nor create a namespace that carries it.
    let marked: Namespace = from(json!({"metadata": {
        "name": format!("{}-new", env.run),
        "labels": {PROTECTED_LABEL: AUDIT, RUN_LABEL: env.run}}}));
    let _maybe_created = DeleteOnDrop(vec![format!("namespace/{}-new", env.run)]);
    let e = Api::<Namespace>::all(env.alice.clone())
        .create(&PostParams::default(), &marked)
        .await
        .expect_err("alice must not create a marked namespace");
    assert!(denied_by_policy(&e), "{}", message(&e));

    // The operator sets it; alice can neither change nor remove it, but may change other
    // labels of the namespace.
    env.operator_marks(ENFORCE).await;
    for value in [Some(AUDIT), None] {
        let e = label_namespace(&env.alice, ns, PROTECTED_LABEL, value)
            .await
            .expect_err("alice must not change or remove the marker");
        assert!(
            denied_by_policy(&e) && message(&e).contains(why),
            "{value:?}: {}",
            message(&e)
        );
    }
    label_namespace(&env.alice, ns, "team", Some("ops"))
        .await
        .unwrap_or_else(|e| panic!("other labels stay editable: {}", message(&e)));
    let labels = Api::<Namespace>::all(env.admin.clone())
        .get(ns)
        .await
        .unwrap()
        .metadata
        .labels
        .unwrap();
    assert_eq!(
        labels.get(PROTECTED_LABEL).map(String::as_str),
        Some(ENFORCE)
    );

    // The operator may switch it and remove it; nobody may set a value that means nothing.
    label_namespace(&env.operator, ns, PROTECTED_LABEL, Some(AUDIT))
        .await
        .expect("the operator switches to audit");
    let e = label_namespace(&env.operator, ns, PROTECTED_LABEL, Some("off"))
        .await
        .expect_err("an unknown marker value must be refused");
    assert!(
        message(&e).contains("must be \"enforce\" or \"audit\""),
        "{}",
        message(&e)
    );
    label_namespace(&env.operator, ns, PROTECTED_LABEL, None)
        .await
        .expect("the operator removes the marker");
}

// ---------------------------------------------------------------------------------------------
// Audit mode.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn audit_mode_warns_and_records_instead_of_denying() {
    let Some(env) = Env::new("adm-audit").await else {
        return;
    };
    env.operator_marks(AUDIT).await;
    let cp = env.ns.control_plane;
    let kubectl_as_alice = |name: &str, dry: bool| {
        let manifest = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": env.ns.name},
            "spec": {"type": "NodePort", "selector": {"app": "x"}, "ports": [{"port": 80}]}
        });
        let mut cmd = cp.kubectl();
        cmd.args([
            "create",
            "-f",
            "-",
            "--as",
            &env.alice_name,
            "--as-group",
            "system:authenticated",
        ]);
        if dry {
            cmd.arg("--dry-run=server");
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run kubectl");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(manifest.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let words = "Service type NodePort exposes a workload outside the gateway";
    // Wait until the audit binding acts: kubectl prints the policy's warning.
    support::eventually("the audit binding to warn", POLICY_TIMEOUT, || {
        let r = kubectl_as_alice("probe", true);
        async move { (r.0 && r.2.contains(words)).then_some(()) }
    })
    .await;

    let audit_log = cp.audit_log.clone();
    let (ok, stdout, stderr) = kubectl_as_alice("legacy-admin", false);
    assert!(
        ok,
        "audit mode must not deny: stdout {stdout} stderr {stderr}"
    );
    assert!(
        stderr.contains("Warning:") && stderr.contains(words),
        "kubectl must show the warning: {stderr}"
    );
    // The Service exists, as NodePort.
    let svc = env
        .services(&env.admin)
        .get("legacy-admin")
        .await
        .expect("created");
    assert_eq!(svc.spec.unwrap().type_.as_deref(), Some("NodePort"));
    // And the audit log records the policy failure for that request.
    let ns = env.ns.name.clone();
    support::eventually("the audit annotation", POLICY_TIMEOUT, || {
        let text = std::fs::read_to_string(&audit_log).unwrap_or_default();
        let found = text.lines().any(|l| {
            l.contains("validation.policy.admission.k8s.io/validation_failure")
                && l.contains(&format!("\"namespace\":\"{ns}\""))
                && l.contains("\"name\":\"legacy-admin\"")
        });
        async move { found.then_some(()) }
    })
    .await;

    // Switching the namespace to enforce makes the same request fail.
    env.operator_marks(ENFORCE).await;
    support::eventually("the enforce binding to deny", POLICY_TIMEOUT, || {
        let r = kubectl_as_alice("probe2", true);
        async move { (!r.0 && r.2.contains(words)).then_some(()) }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The violation audit over objects read back from the API server.
// ---------------------------------------------------------------------------------------------

use opsconductor_operator::audit::{self, Found};
use opsconductor_operator::build::{BuildOptions, build};
use opsconductor_operator::crd::OpsConductorStack;

async fn found_in(client: &Client, ns: &str) -> Found {
    let lp = ListParams::default();
    Found {
        services: Api::<Service>::namespaced(client.clone(), ns)
            .list(&lp)
            .await
            .unwrap()
            .items,
        pods: Api::<Pod>::namespaced(client.clone(), ns)
            .list(&lp)
            .await
            .unwrap()
            .items,
        ingresses: Api::<Ingress>::namespaced(client.clone(), ns)
            .list(&lp)
            .await
            .unwrap()
            .items,
        network_policies: Api::<NetworkPolicy>::namespaced(client.clone(), ns)
            .list(&lp)
            .await
            .unwrap()
            .items,
        routes: vec![],
    }
}

/// The stack's own objects, written to and read back from the API server (which defaults
/// fields and drops empty lists), give no violation; each kind of violation is found, with
/// its reason, and is gone after the fix.
#[tokio::test]
async fn audit_finds_each_violation_in_real_objects_and_clears_after_the_fix() {
    let Some(ns) = support::TestNamespace::new("audit").await else {
        return;
    };
    let client = ns.client.clone();
    let cp = ns.control_plane;
    let out = cp
        .kubectl()
        .args(["apply", "--server-side", "--force-conflicts", "-f"])
        .arg(root().join("crds"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "installing the CRD: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(root().join("examples/opsconductor.yaml")).unwrap();
    let mut doc: Value = serde_yaml::from_str(&text).unwrap();
    doc["metadata"]["namespace"] = json!(ns.name);
    let cr: OpsConductorStack = from(doc);
    let stacks: Api<OpsConductorStack> = ns.api();
    let cr = support::eventually("the CRD to be served", POLICY_TIMEOUT, || {
        let (stacks, cr) = (stacks.clone(), cr.clone());
        async move { stacks.create(&PostParams::default(), &cr).await.ok() }
    })
    .await;
    let stack = opsconductor_operator::validate::validate(&cr, &ns.name).expect("valid");
    assert!(stack.uid.is_some());
    let bundle = build(&stack, &BuildOptions::default());
    let ssa = PatchParams::apply("opsconductor-operator").force();
    for s in &bundle.services {
        Api::<Service>::namespaced(client.clone(), &ns.name)
            .patch(s.metadata.name.as_ref().unwrap(), &ssa, &Patch::Apply(s))
            .await
            .expect("apply service");
    }
    for p in &bundle.network_policies {
        Api::<NetworkPolicy>::namespaced(client.clone(), &ns.name)
            .patch(p.metadata.name.as_ref().unwrap(), &ssa, &Patch::Apply(p))
            .await
            .expect("apply policy");
    }
    let run = |found: Found| audit::audit(&stack, &bundle, &found);
    assert_eq!(
        run(found_in(&client, &ns.name).await),
        vec![],
        "the stack's own objects, read back"
    );

    // One of each.
    let services = Api::<Service>::namespaced(client.clone(), &ns.name);
    let pods = Api::<Pod>::namespaced(client.clone(), &ns.name);
    let pp = PostParams::default();
    services
        .create(&pp, &service("legacy-admin", json!({"type": "NodePort"})))
        .await
        .unwrap();
    services
        .create(
            &pp,
            &service("ext", json!({"externalIPs": ["203.0.113.10"]})),
        )
        .await
        .unwrap();
    pods.create(&pp, &pod("hostnet", json!({"hostNetwork": true})))
        .await
        .unwrap();
    Api::<Ingress>::namespaced(client.clone(), &ns.name)
        .create(
            &pp,
            &from(
                json!({"metadata": {"name": "web"}, "spec": {"defaultBackend": {
                "service": {"name": "frontend", "port": {"number": 8080}}}}}),
            ),
        )
        .await
        .unwrap();
    Api::<NetworkPolicy>::namespaced(client.clone(), &ns.name)
        .create(
            &pp,
            &from(json!({"metadata": {"name": "allow-all"},
                         "spec": {"podSelector": {}, "ingress": [{}]}})),
        )
        .await
        .unwrap();
    let v = run(found_in(&client, &ns.name).await);
    let got: Vec<(&str, &str)> = v
        .iter()
        .map(|v| (v.kind.as_str(), v.name.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("Ingress", "web"),
            ("NetworkPolicy", "allow-all"),
            ("Pod", "hostnet"),
            ("Service", "ext"),
            ("Service", "legacy-admin"),
        ],
        "{v:#?}"
    );
    assert_eq!(
        v[4].reason,
        "type NodePort exposes a service outside the gateway: it opens a port on every node"
    );

    // A managed policy changed by someone else is drift.
    Api::<NetworkPolicy>::namespaced(client.clone(), &ns.name)
        .patch(
            "prod-svc-users",
            &PatchParams::default(),
            &Patch::Json::<()>(
                serde_json::from_value(json!([{"op": "add", "path": "/spec/ingress/0/from/-",
                    "value": {"ipBlock": {"cidr": "0.0.0.0/0"}}}]))
                .unwrap(),
            ),
        )
        .await
        .unwrap();
    let v = run(found_in(&client, &ns.name).await);
    assert!(
        v.iter()
            .any(|v| v.name == "prod-svc-users" && v.reason.starts_with("was changed")),
        "{v:#?}"
    );

    // The fixes: each violation disappears.
    services
        .patch(
            "legacy-admin",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"type": "ClusterIP", "ports": [{"port": 80, "targetPort": 8080, "nodePort": null}]}})),
        )
        .await
        .unwrap();
    services
        .patch(
            "ext",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"externalIPs": null}})),
        )
        .await
        .unwrap();
    pods.delete("hostnet", &Default::default()).await.unwrap();
    Api::<Ingress>::namespaced(client.clone(), &ns.name)
        .delete("web", &Default::default())
        .await
        .unwrap();
    Api::<NetworkPolicy>::namespaced(client.clone(), &ns.name)
        .delete("allow-all", &Default::default())
        .await
        .unwrap();
    let users = bundle
        .network_policies
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("prod-svc-users"))
        .unwrap();
    Api::<NetworkPolicy>::namespaced(client.clone(), &ns.name)
        .patch("prod-svc-users", &ssa, &Patch::Apply(users))
        .await
        .unwrap();
    // Pods without a kubelet are deleted at once; the list may still show it for a moment.
    let (client2, name) = (client.clone(), ns.name.clone());
    let v = support::eventually("every violation to clear", POLICY_TIMEOUT, || {
        let (client, name) = (client2.clone(), name.clone());
        let (stack, bundle) = (stack.clone(), bundle.clone());
        async move {
            let v = audit::audit(&stack, &bundle, &found_in(&client, &name).await);
            v.is_empty().then_some(v)
        }
    })
    .await;
    assert_eq!(v, vec![]);
}
