//! Packaging against the real control plane: the rendered chart passes a server-side dry run;
//! `helm install`, `upgrade` and `uninstall` create, change and remove its objects; the operator
//! binary, impersonating the chart's ServiceAccount with only the chart's RBAC, reconciles the
//! full example stack; the same operator with one rule removed from its ClusterRole fails with
//! a message naming the missing permission. The helm-only checks are in `chart_template.rs`.
//!
//! The control-plane tests that run an operator are serialized (`OPERATOR_TESTS`): each
//! operator watches stacks in every namespace, so two of them would reconcile each other's
//! stacks. The admission policies are not installed into the shared control plane (they are
//! cluster-wide and would apply to other tests' namespaces); the dry run checks them.

mod chart_support;
mod support;

use chart_support::{CHART, documents, helm, read, template};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use opsconductor_operator::crd::OpsConductorStack;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::io::Write as _;
use std::process::Stdio;
use std::time::{Duration, Instant};
use support::operator::{
    apply_stack, example, http_get, install_crd, owned_objects, rendered_objects,
    write_impersonating_kubeconfig,
};
use support::process::{OperatorProcess, Spawn};
use support::{AuditLog, ControlPlane, TestNamespace, eventually};

/// Serializes the tests that run an operator (see the module docs).
static OPERATOR_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `kubectl <args>` with `stdin`; (success, stdout + stderr).
fn kubectl(cp: &ControlPlane, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = cp
        .kubectl()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or("").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn kubectl_apply(cp: &ControlPlane, yaml: &str) {
    let (ok, out) = kubectl(cp, &["apply", "-f", "-"], Some(yaml));
    assert!(ok, "kubectl apply failed: {out}");
}

/// Deletes cluster-scoped objects when dropped (also when the test fails).
struct ClusterScoped {
    cp: &'static ControlPlane,
    objects: Vec<String>,
}

impl Drop for ClusterScoped {
    fn drop(&mut self) {
        if self.objects.is_empty() {
            return;
        }
        let mut args = vec!["delete", "--ignore-not-found", "--wait=false"];
        args.extend(self.objects.iter().map(String::as_str));
        let (ok, out) = kubectl(self.cp, &args, None);
        if !ok {
            eprintln!("packaging: cleanup of {:?} failed: {out}", self.objects);
        }
    }
}

/// The ServiceAccount identity of a release named opsconductor-operator in `namespace`, as the
/// API server sees a pod of it: the user and its groups (never system:masters).
fn service_account(namespace: &str) -> (String, Vec<String>) {
    (
        format!("system:serviceaccount:{namespace}:opsconductor-operator"),
        vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{namespace}"),
            "system:authenticated".into(),
        ],
    )
}

/// The chart's ServiceAccount, ClusterRole(+Binding) and Role(+Binding) for a release named
/// opsconductor-operator in `namespace`, as helm renders them.
fn chart_rbac(namespace: &str) -> Vec<Value> {
    let yaml = template(
        "opsconductor-operator",
        namespace,
        &[
            "--show-only",
            "templates/serviceaccount.yaml",
            "--show-only",
            "templates/clusterrole.yaml",
            "--show-only",
            "templates/role.yaml",
        ],
    )
    .expect("helm is available");
    documents(&yaml)
}

fn to_yaml(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap()))
        .collect()
}

/// Installs the chart's RBAC for `namespace`, minus the ClusterRole rules for which `drop`
/// says true; the guard deletes the cluster-scoped part.
fn install_chart_rbac(
    cp: &'static ControlPlane,
    namespace: &str,
    drop: impl Fn(&Value) -> bool,
) -> ClusterScoped {
    let mut docs = chart_rbac(namespace);
    let mut guard = ClusterScoped {
        cp,
        objects: vec![],
    };
    for d in &mut docs {
        let name = d["metadata"]["name"].as_str().unwrap().to_string();
        match d["kind"].as_str().unwrap() {
            "ClusterRole" => {
                let rules = d["rules"].as_array_mut().unwrap();
                let before = rules.len();
                rules.retain(|r| !drop(r));
                eprintln!(
                    "packaging: ClusterRole {name}: {} of {before} rules",
                    rules.len()
                );
                guard.objects.push(format!("clusterrole/{name}"));
            }
            "ClusterRoleBinding" => guard.objects.push(format!("clusterrolebinding/{name}")),
            _ => {}
        }
    }
    kubectl_apply(cp, &to_yaml(&docs));
    guard
}

/// Starts an operator process impersonating `user` (stopped with SIGKILL when dropped).
fn start_operator(
    cp: &ControlPlane,
    tag: &str,
    user: &str,
    groups: &[String],
    args: &[&str],
) -> OperatorProcess {
    let dir = cp.state_dir.join("packaging-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join(format!("kubeconfig-{tag}-{}", std::process::id()));
    write_impersonating_kubeconfig(
        cp,
        &kubeconfig,
        user,
        &groups.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let all = args.to_vec();
    OperatorProcess::spawn(Spawn {
        name: tag,
        kubeconfig: &kubeconfig,
        log_dir: &dir,
        args: &all,
        env: &[("POD_NAME", tag)],
    })
}

#[tokio::test]
async fn helm_template_passes_a_server_side_dry_run() {
    let Some(ns) = TestNamespace::new("chart-dry-run").await else {
        return;
    };
    let cp = ns.control_plane;
    // Every object of the chart, the admission policies and the CRD included, with the
    // optional ones switched on (but the ServiceMonitor, whose CRD is not installed here).
    let yaml = template(
        "opsconductor-operator",
        &ns.name,
        &["--include-crds", "--set", "rbac.create=true"],
    )
    .unwrap();
    let (ok, out) = kubectl(cp, &["apply", "--dry-run=server", "-f", "-"], Some(&yaml));
    assert!(ok, "the API server refused the rendered chart:\n{out}");
    for expected in [
        "customresourcedefinition.apiextensions.k8s.io/opsconductorstacks.opsconductor.io",
        "deployment.apps/opsconductor-operator",
        "clusterrole.rbac.authorization.k8s.io/opsconductor-operator-",
        "role.rbac.authorization.k8s.io/opsconductor-operator-leader-election",
        "networkpolicy.networking.k8s.io/opsconductor-operator",
        "validatingadmissionpolicy.admissionregistration.k8s.io/opsconductor-guardrails-services",
        "validatingadmissionpolicybinding.admissionregistration.k8s.io/opsconductor-namespace-marker",
        "poddisruptionbudget.policy/opsconductor-operator",
        "service/opsconductor-operator-metrics",
    ] {
        assert!(out.contains(expected), "{expected} missing:\n{out}");
    }
    assert!(out.contains("(server dry run)"), "{out}");
    // Nothing was created.
    let deployments: Api<Deployment> = ns.api();
    assert!(
        deployments
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );

    // The same for the generated install manifest (its own namespace, opsconductor-system, may
    // not exist here: skip that document and point the rest at the test namespace).
    let install = read("manifests/install.yaml").replace(
        "namespace: opsconductor-system",
        &format!("namespace: {}", ns.name),
    );
    let docs: Vec<Value> = documents(&install)
        .into_iter()
        .filter(|d| d["kind"] != "Namespace")
        .collect();
    let (ok, out) = kubectl(
        cp,
        &["apply", "--dry-run=server", "-f", "-"],
        Some(&to_yaml(&docs)),
    );
    assert!(ok, "the API server refused manifests/install.yaml:\n{out}");
}

/// Both scoped forms of the chart pass the API server's checks: a list (Roles in the listed
/// namespace) and a label selector with the audit limited to stack namespaces.
#[tokio::test]
async fn the_scoped_forms_of_the_chart_pass_a_server_side_dry_run() {
    let Some(ns) = TestNamespace::new("chart-dry-run-scoped").await else {
        return;
    };
    let cp = ns.control_plane;
    let list = format!("operator.watchNamespaces={{{}}}", ns.name);
    let selector = r"operator.namespaceSelector=example.com/tenant in (a\,b)\,!frozen";
    for (sets, expected) in [
        (
            vec!["--set", list.as_str()],
            format!(
                "role.rbac.authorization.k8s.io/opsconductor-operator-{}",
                ns.name
            ),
        ),
        (
            vec![
                "--set-string",
                selector,
                "--set",
                "operator.auditNamespaces=with-stacks",
            ],
            format!(
                "clusterrole.rbac.authorization.k8s.io/opsconductor-operator-{}",
                ns.name
            ),
        ),
    ] {
        let yaml = template("opsconductor-operator", &ns.name, &sets).unwrap();
        let (ok, out) = kubectl(cp, &["apply", "--dry-run=server", "-f", "-"], Some(&yaml));
        assert!(ok, "the API server refused the chart with {sets:?}:\n{out}");
        assert!(out.contains(&expected), "{expected} missing:\n{out}");
        assert!(
            out.contains("deployment.apps/opsconductor-operator"),
            "{out}"
        );
    }
}

#[tokio::test]
async fn helm_install_upgrade_and_uninstall() {
    let Some(ns) = TestNamespace::new("chart-install").await else {
        return;
    };
    let cp = ns.control_plane;
    let kc = Some(cp.kubeconfig.as_path());
    // The admission policies are cluster-wide and would guard every other test's namespaces on
    // this shared API server: they are left out here (the dry run above covers them).
    let release = "opsc";
    let out = helm(
        &[
            "install",
            release,
            CHART,
            "--namespace",
            &ns.name,
            "--set",
            "admission.enabled=false",
        ],
        kc,
    );
    assert!(out.contains("STATUS: deployed"), "{out}");
    // NOTES.txt tells the user what to do next.
    assert!(out.contains("kubectl get opsconductorstacks"), "{out}");
    let _cleanup = ClusterScoped {
        cp,
        objects: vec![
            format!("clusterrole/opsc-opsconductor-operator-{}", ns.name),
            format!("clusterrolebinding/opsc-opsconductor-operator-{}", ns.name),
        ],
    };

    let full = "opsc-opsconductor-operator";
    let deployments: Api<Deployment> = ns.api();
    let d = deployments.get(full).await.unwrap();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));
    let pod = d.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some(full));
    let sas: Api<ServiceAccount> = ns.api();
    assert_eq!(
        sas.get(full).await.unwrap().automount_service_account_token,
        Some(false)
    );
    let svcs: Api<Service> = ns.api();
    svcs.get(&format!("{full}-metrics")).await.unwrap();
    let nps: Api<NetworkPolicy> = ns.api();
    nps.get(full).await.unwrap();
    let pdbs: Api<PodDisruptionBudget> = ns.api();
    pdbs.get(full).await.unwrap();
    let roles: Api<Role> = ns.api();
    roles.get(&format!("{full}-leader-election")).await.unwrap();
    let role_bindings: Api<RoleBinding> = ns.api();
    role_bindings
        .get(&format!("{full}-leader-election"))
        .await
        .unwrap();
    let cluster_name = format!("{full}-{}", ns.name);
    let cluster_roles: Api<ClusterRole> = Api::all(ns.client.clone());
    let cr = cluster_roles.get(&cluster_name).await.unwrap();
    assert!(cr.rules.unwrap().len() >= 10);
    let crbs: Api<ClusterRoleBinding> = Api::all(ns.client.clone());
    let crb = crbs.get(&cluster_name).await.unwrap();
    assert_eq!(crb.subjects.unwrap()[0].name, full);
    // The real deployment controller takes the Deployment up (pods stay Pending: no kubelet).
    eventually(
        "the deployment controller to observe the Deployment",
        Duration::from_secs(30),
        || {
            let deployments = deployments.clone();
            async move {
                let d = deployments.get(full).await.ok()?;
                (d.status?.observed_generation? >= 1).then_some(())
            }
        },
    )
    .await;

    // Upgrade: a changed value reaches the objects.
    let out = helm(
        &[
            "upgrade",
            release,
            CHART,
            "--namespace",
            &ns.name,
            "--reuse-values",
            "--set",
            "replicaCount=3",
            "--set",
            "operator.logFormat=text",
            "--set",
            "leaderElection.leaseName=renamed",
        ],
        kc,
    );
    assert!(out.contains("REVISION: 2"), "{out}");
    let d = deployments.get(full).await.unwrap();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(3));
    let args = d.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(args.contains(&"--log-format=text".to_string()), "{args:?}");
    assert!(
        args.contains(&"--leader-election-id=renamed".to_string()),
        "{args:?}"
    );
    let role = roles.get(&format!("{full}-leader-election")).await.unwrap();
    let names: Vec<String> = role
        .rules
        .unwrap()
        .into_iter()
        .flat_map(|r| r.resource_names.unwrap_or_default())
        .collect();
    assert_eq!(names, ["renamed"]);
    let status = helm(&["status", release, "--namespace", &ns.name], kc);
    assert!(status.contains("STATUS: deployed"), "{status}");

    // Uninstall: every object goes, the CRD stays (Helm never deletes CRDs: stacks would go
    // with it).
    let out = helm(
        &["uninstall", release, "--namespace", &ns.name, "--wait"],
        kc,
    );
    assert!(out.contains("uninstalled"), "{out}");
    eventually(
        "the release's objects to be gone",
        Duration::from_secs(30),
        || {
            let (deployments, sas, cluster_roles, crbs, roles, name) = (
                deployments.clone(),
                sas.clone(),
                cluster_roles.clone(),
                crbs.clone(),
                roles.clone(),
                cluster_name.clone(),
            );
            async move {
                let gone = deployments.get_opt(full).await.ok()?.is_none()
                    && sas.get_opt(full).await.ok()?.is_none()
                    && roles
                        .get_opt(&format!("{full}-leader-election"))
                        .await
                        .ok()?
                        .is_none()
                    && cluster_roles.get_opt(&name).await.ok()?.is_none()
                    && crbs.get_opt(&name).await.ok()?.is_none();
                gone.then_some(())
            }
        },
    )
    .await;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(ns.client.clone());
    crds.get("opsconductorstacks.opsconductor.io")
        .await
        .unwrap();
}

/// The operator as the chart's ServiceAccount, with the chart's RBAC and nothing else, takes
/// the full example stack to convergence, and the leader Lease with it.
#[tokio::test]
async fn the_charts_rbac_is_enough_to_reconcile_a_full_stack() {
    let _serial = OPERATOR_TESTS.lock().await;
    let Some(release_ns) = TestNamespace::new("chart-rbac").await else {
        return;
    };
    let stack_ns = TestNamespace::new("chart-rbac-stack").await.unwrap();
    let cp = release_ns.control_plane;
    install_crd(cp).await;
    let _rbac = install_chart_rbac(cp, &release_ns.name, |_| false);
    let (user, groups) = service_account(&release_ns.name);
    let audit = AuditLog::of(cp);
    let mark = audit.mark();
    let op = start_operator(
        cp,
        "chart-rbac",
        &user,
        &groups,
        &[
            "--leader-election",
            "--leader-election-namespace",
            &release_ns.name,
        ],
    );
    eventually(
        "the operator (chart RBAC) to lead and sync its caches",
        Duration::from_secs(60),
        async || op.ready().then_some(()),
    )
    .await;

    let started = Instant::now();
    let stack = apply_stack(&stack_ns.client, &offline_example(&stack_ns.name)).await;
    let uid = stack.uid().unwrap();
    let expected = rendered_objects(&stack);
    assert_eq!(expected.len(), 36);
    eventually(
        "every object of the example stack, owned by it",
        Duration::from_secs(60),
        || {
            let (client, ns, uid, expected) = (
                stack_ns.client.clone(),
                stack_ns.name.clone(),
                uid.clone(),
                expected.clone(),
            );
            async move { (owned_objects(&client, &ns, &uid).await == expected).then_some(()) }
        },
    )
    .await;
    let stacks: Api<OpsConductorStack> = stack_ns.api();
    let converged = eventually(
        "the stack's status to describe its generation",
        Duration::from_secs(60),
        || {
            let stacks = stacks.clone();
            async move {
                let s = stacks.get("prod").await.ok()?;
                let observed = s.status.as_ref()?.observed_generation;
                (observed.is_some() && observed == s.metadata.generation).then_some(s)
            }
        },
    )
    .await;
    eprintln!(
        "packaging: converged in {:.1}s with the chart's RBAC",
        started.elapsed().as_secs_f64()
    );
    let conditions = converged.status.unwrap().conditions;
    assert!(
        conditions
            .iter()
            .any(|c| c.type_ == "PolicyEnforced" && c.status == "True"),
        "{conditions:?}"
    );

    // The example has service identity on: the operator read the API server's token issuer
    // and signing keys with the chart's RBAC (Kubernetes' default issuer-discovery binding of
    // every service account; the chart adds no rule for it) and published them.
    let identity: Api<k8s_openapi::api::core::v1::ConfigMap> = stack_ns.api();
    eventually(
        "the identity ConfigMap to hold the issuer and keys (chart RBAC)",
        Duration::from_secs(60),
        async || {
            let data = identity.get("prod-identity").await.ok()?.data?;
            (data.contains_key("issuer") && data.contains_key("jwks.json")).then_some(())
        },
    )
    .await;

    // Drift by addition is reverted with the chart's RBAC too: a sidecar added to the gateway
    // by another field manager is removed by a replace (the `update` verb; without it the
    // revert was forbidden and the sidecar stayed).
    let deployments: Api<Deployment> = stack_ns.api();
    deployments
        .patch(
            "prod-gateway",
            &kube::api::PatchParams::apply("intruder"),
            &kube::api::Patch::Apply(json!({"apiVersion": "apps/v1",
                "kind": "Deployment", "metadata": {"name": "prod-gateway"},
                "spec": {"template": {"spec": {"containers": [
                    {"name": "sidecar", "image": "example/steal:1"}]}}}})),
        )
        .await
        .unwrap();
    eventually(
        "the sidecar to be removed by the operator (chart RBAC)",
        Duration::from_secs(60),
        || {
            let deployments = deployments.clone();
            async move {
                let d = deployments.get("prod-gateway").await.ok()?;
                let pod = d.spec?.template.spec?;
                pod.containers
                    .iter()
                    .all(|c| c.name != "sidecar")
                    .then_some(())
            }
        },
    )
    .await;

    // Every write the operator made was allowed, and it made them as the ServiceAccount.
    // (Only in this test's namespaces: the operator also reconciles other tests' stacks, and
    // writes into their terminating namespaces are refused for that reason, not by RBAC.)
    let writes = audit.writes_since(&mark, |e| {
        e.user == user && (e.namespace == stack_ns.name || e.namespace == release_ns.name)
    });
    let denied: Vec<String> = writes
        .iter()
        .filter(|e| e.code >= 400 && e.code != 404 && e.code != 409)
        .map(|e| {
            format!(
                "{} {}/{} in {:?}: {}",
                e.verb, e.resource, e.name, e.namespace, e.code
            )
        })
        .collect();
    assert!(denied.is_empty(), "writes refused: {denied:#?}");
    // Operators watch every namespace: another test binary's operator running at the same
    // time would take part of the work and make this proof meaningless. Say so plainly.
    let others: BTreeSet<String> = audit
        .writes_since(&mark, |e| {
            e.namespace == stack_ns.name
                && e.user != user
                && e.user != "opsc-admin"
                && !e.user.starts_with("system:serviceaccount:kube-system:")
                && !e.user.starts_with("system:kube-")
                // The API server's own Events (e.g. about a Service's cluster IP).
                && e.user != "system:apiserver"
        })
        .into_iter()
        .map(|e| e.user)
        .collect();
    assert!(
        others.is_empty(),
        "other operators wrote into the stack's namespace meanwhile ({others:?}); run this test \
         without other operator tests running against the same control plane"
    );
    let in_stack = writes
        .iter()
        .filter(|e| e.namespace == stack_ns.name)
        .count();
    assert!(
        in_stack >= 35,
        "only {in_stack} writes in the stack namespace"
    );
    assert!(
        writes
            .iter()
            .any(|e| e.resource == "opsconductorstacks" && e.subresource == "status"),
        "no status write by the ServiceAccount"
    );
    // The bootstrap certificate (ACME cannot reach its CA here): Secrets are written too.
    assert!(
        writes
            .iter()
            .any(|e| e.resource == "secrets" && e.name == "prod-tls" && e.succeeded()),
        "no write of Secret prod-tls by the ServiceAccount"
    );
    assert!(
        writes
            .iter()
            .any(|e| e.resource == "leases" && e.namespace == release_ns.name && e.succeeded()),
        "no Lease write in the release namespace"
    );
    // No RBAC denial at all. (Other 403s can appear: the operator watches every namespace,
    // and a namespace an earlier test is deleting refuses new objects with a 403 too.)
    let log = op.log_text();
    let denials: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("is forbidden: User"))
        .collect();
    assert!(denials.is_empty(), "RBAC denials:\n{}", denials.join("\n"));
}

/// With one rule removed from the chart's ClusterRole, the operator says which permission it
/// lacks.
#[tokio::test]
async fn a_missing_permission_fails_loudly_and_names_it() {
    let _serial = OPERATOR_TESTS.lock().await;
    let Some(release_ns) = TestNamespace::new("chart-norbac").await else {
        return;
    };
    let stack_ns = TestNamespace::new("chart-norbac-stack").await.unwrap();
    let cp = release_ns.control_plane;
    install_crd(cp).await;
    let (user, groups) = service_account(&release_ns.name);
    let audit = AuditLog::of(cp);
    let mark = audit.mark();
    let mut stack = example("minimal.yaml", &stack_ns.name);
    stack.metadata.name = Some("lacking".into());
    apply_stack(&stack_ns.client, &stack).await;

    // 1. Without the NetworkPolicy rule the watch cannot list them: the operator never gets
    //    ready and repeats why.
    {
        let _rbac = install_chart_rbac(cp, &release_ns.name, |r| {
            r["resources"]
                .as_array()
                .unwrap()
                .contains(&json!("networkpolicies"))
        });
        let op = start_operator(cp, "no-netpol", &user, &groups, &[]);
        let line = eventually(
            "the operator to log the missing NetworkPolicy permission",
            Duration::from_secs(30),
            async || {
                op.log_text()
                    .lines()
                    .find(|l| {
                        l.contains("networkpolicies")
                            && l.contains("forbidden")
                            && l.contains("cannot list")
                    })
                    .map(str::to_string)
            },
        )
        .await;
        eprintln!("packaging: the operator says: {line}");
        assert!(line.contains(&user), "{line}");
        assert!(!op.ready(), "/readyz must not be ok without the watch");
        // Without its caches it writes nothing at all (in particular no half-applied stack).
        // (Checked in the audit log: another test binary's operator may reconcile this stack.)
        assert_eq!(audit.count_writes(&mark, &user, Some(&stack_ns.name)), 0);
    }

    // 2. Without the status rule everything is applied, and then the status write is refused:
    //    the reconcile fails with the permission in its message, and is retried.
    {
        let _rbac = install_chart_rbac(cp, &release_ns.name, |r| {
            r["resources"].as_array().unwrap() == &vec![json!("opsconductorstacks/status")]
        });
        let op = start_operator(cp, "no-status", &user, &groups, &[]);
        let line = eventually(
            "the operator to log the missing status permission",
            Duration::from_secs(30),
            async || {
                op.log_text()
                    .lines()
                    .find(|l| {
                        l.contains("reconcile failed") && l.contains("opsconductorstacks/status")
                    })
                    .map(str::to_string)
            },
        )
        .await;
        eprintln!("packaging: the operator says: {line}");
        assert!(line.contains("Forbidden"), "{line}");
        assert!(line.contains("patch"), "{line}");
        // The metric counts it, by reason.
        eventually(
            "opsconductor_reconcile_errors_total{reason=\"Forbidden\"}",
            Duration::from_secs(10),
            async || {
                http_get(&op.metrics_addr, "/metrics")?
                    .lines()
                    .any(|l| {
                        l.starts_with("opsconductor_reconcile_errors_total{reason=\"Forbidden\"}")
                    })
                    .then_some(())
            },
        )
        .await;
    }
}

/// The full example stack, with its ACME directory on a loopback port where nothing listens:
/// the operator must not reach out to a real CA from a test (it writes the bootstrap
/// certificate and reports the CA as unreachable).
fn offline_example(namespace: &str) -> OpsConductorStack {
    let mut stack = example("opsconductor.yaml", namespace);
    stack
        .spec
        .tls
        .acme
        .as_mut()
        .expect("the example uses ACME")
        .directory_url = "https://127.0.0.1:9/directory".into();
    stack
}
