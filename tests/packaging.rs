//! Packaging: the Helm chart, the generated install manifest, and the chart's RBAC proven
//! against the real control plane.
//!
//! Without the control plane (but with helm where it renders): the chart's CRD and admission
//! policies are the code's, `manifests/install.yaml` is what `scripts/gen-manifests` makes of
//! the chart, `helm lint` passes, the rendered objects are hardened, bad values are refused.
//!
//! Against the real control plane: the rendered chart passes a server-side dry run; `helm
//! install`, `upgrade` and `uninstall` create, change and remove its objects; the operator
//! binary, impersonating the chart's ServiceAccount with only the chart's RBAC, reconciles the
//! full example stack; the same operator with one rule removed from its ClusterRole fails with
//! a message naming the missing permission.
//!
//! The control-plane tests that run an operator are serialized (`OPERATOR_TESTS`): each
//! operator watches stacks in every namespace, so two of them would reconcile each other's
//! stacks. The admission policies are not installed into the shared control plane (they are
//! cluster-wide and would apply to other tests' namespaces); the dry run checks them.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use opsconductor_operator::admission::{self, OperatorIdentity};
use opsconductor_operator::crd::OpsConductorStack;
use serde_json::{Value, json};
use support::operator::{
    apply_stack, example, http_get, install_crd, owned_objects, rendered_objects,
    write_impersonating_kubeconfig,
};
use support::process::{OperatorProcess, Spawn};
use support::{AuditLog, ControlPlane, TestNamespace, eventually, tools_bin_dir};

const CHART: &str = "charts/opsconductor-operator";
/// Where the chart's admission template is generated from src/admission.rs.
const ADMISSION_TEMPLATE: &str = "charts/opsconductor-operator/templates/admission.yaml";
/// Identity placeholders the generator replaces with template expressions. They are valid DNS
/// names (as [`OperatorIdentity::new`] wants) that appear nowhere else in the policies.
const SENTINEL_NAMESPACE: &str = "sentinel-release-namespace";
const SENTINEL_ACCOUNT: &str = "sentinel-service-account";

/// Serializes the tests that run an operator (see the module docs).
static OPERATOR_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Parses multi-document YAML into JSON values, skipping empty documents.
fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("valid YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name_suffix: &str) -> &'a Value {
    docs.iter()
        .find(|d| {
            d["kind"] == kind
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(name_suffix))
        })
        .unwrap_or_else(|| panic!("no {kind} named *{name_suffix} in the rendered chart"))
}

// ---------------------------------------------------------------------------------------------
// helm
// ---------------------------------------------------------------------------------------------

fn helm_path() -> Option<PathBuf> {
    Some(tools_bin_dir()?.join("helm"))
}

/// `helm <args>` (with the chart path relative to the repository root); stdout, or a panic with
/// stderr.
fn helm(args: &[&str], kubeconfig: Option<&Path>) -> String {
    let helm = helm_path().expect("helm is available");
    let mut cmd = Command::new(&helm);
    cmd.current_dir(root()).args(args);
    // Keep helm's caches and config out of the user's home and away from other tests.
    let home = std::env::temp_dir().join(format!("opsc-helm-{}", std::process::id()));
    cmd.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    if let Some(kc) = kubeconfig {
        cmd.env("KUBECONFIG", kc);
    }
    let out = cmd.output().expect("helm runs");
    assert!(
        out.status.success(),
        "helm {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `helm template` of the chart with `extra` arguments; None when helm is explicitly skipped.
fn template(release: &str, namespace: &str, extra: &[&str]) -> Option<String> {
    helm_path()?;
    let mut args = vec!["template", release, CHART, "--namespace", namespace];
    args.extend_from_slice(extra);
    Some(helm(&args, None))
}

/// `helm template` that is expected to fail; its error message.
fn template_error(extra: &[&str]) -> Option<String> {
    let helm = helm_path()?;
    let mut args = vec!["template", "t", CHART];
    args.extend_from_slice(extra);
    let out = Command::new(helm)
        .current_dir(root())
        .args(&args)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "helm template {extra:?} was expected to fail"
    );
    Some(String::from_utf8_lossy(&out.stderr).into_owned())
}

// ---------------------------------------------------------------------------------------------
// Generated and copied files
// ---------------------------------------------------------------------------------------------

#[test]
fn chart_crd_is_the_committed_crd() {
    let chart = read("charts/opsconductor-operator/crds/opsconductorstacks.opsconductor.io.yaml");
    assert!(
        chart == read("crds/opsconductorstacks.opsconductor.io.yaml"),
        "the chart's CRD differs from crds/opsconductorstacks.opsconductor.io.yaml; run \
         scripts/gen-manifests"
    );
}

#[test]
fn chart_app_version_is_the_crate_version() {
    let chart: Value =
        serde_yaml::from_str(&read("charts/opsconductor-operator/Chart.yaml")).unwrap();
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "Chart.yaml appVersion must be Cargo.toml's version (the image tag defaults to it)"
    );
}

/// The chart's admission template: the policies src/admission.rs builds, with the operator's
/// username as a template expression. `OPSC_UPDATE_SNAPSHOTS=1` (or scripts/gen-manifests)
/// rewrites it.
fn admission_template() -> String {
    let sentinel = OperatorIdentity::new(SENTINEL_NAMESPACE, SENTINEL_ACCOUNT).unwrap();
    let mut body = String::new();
    for v in admission::guardrails(&sentinel).to_values() {
        body.push_str("---\n");
        body.push_str(&serde_yaml::to_string(&v).unwrap());
    }
    let body = body.replace(&sentinel.username(), "{{ $operator }}");
    assert!(
        !body.contains(SENTINEL_NAMESPACE) && !body.contains(SENTINEL_ACCOUNT),
        "the policies use the operator's namespace or account name outside its username; the \
         generator must learn to template that"
    );
    format!(
        "{{{{- /*\n\
         Generated from src/admission.rs by tests/packaging.rs; do not edit.\n\
         Regenerate: scripts/gen-manifests (or OPSC_UPDATE_SNAPSHOTS=1 cargo test --test packaging admission)\n\
         The policies exempt exactly one user, this release's ServiceAccount.\n\
         */ -}}}}\n\
         {{{{- if .Values.admission.enabled }}}}\n\
         {{{{- $operator := printf \"system:serviceaccount:%s:%s\" .Release.Namespace (include \"opsconductor-operator.serviceAccountName\" .) }}}}\n\
         {body}\
         {{{{- end }}}}\n"
    )
}

#[test]
fn chart_admission_template_is_generated_from_the_code() {
    let generated = admission_template();
    let path = root().join(ADMISSION_TEMPLATE);
    if std::env::var_os("OPSC_UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    assert!(
        read(ADMISSION_TEMPLATE) == generated,
        "{ADMISSION_TEMPLATE} differs from src/admission.rs; run scripts/gen-manifests and review \
         the diff"
    );
}

/// Rendered by helm for another namespace and ServiceAccount, the chart's policies are exactly
/// what src/admission.rs builds for that identity.
#[test]
fn chart_renders_the_codes_guardrails_for_its_own_identity() {
    let Some(yaml) = template(
        "ops",
        "platform-ops",
        &["--set", "serviceAccount.name=reconciler"],
    ) else {
        return;
    };
    let rendered: Vec<Value> = documents(&yaml)
        .into_iter()
        .filter(|d| {
            d["apiVersion"]
                .as_str()
                .is_some_and(|a| a.starts_with("admissionregistration.k8s.io/"))
        })
        .collect();
    let identity = OperatorIdentity::new("platform-ops", "reconciler").unwrap();
    let expected = admission::guardrails(&identity).to_values();
    assert_eq!(rendered.len(), expected.len());
    for (r, e) in rendered.iter().zip(&expected) {
        assert_eq!(r, e, "helm renders a different {}", e["metadata"]["name"]);
    }
    assert!(yaml.contains("system:serviceaccount:platform-ops:reconciler"));

    let without = template("ops", "platform-ops", &["--set", "admission.enabled=false"]).unwrap();
    assert!(!without.contains("ValidatingAdmissionPolicy"));
}

/// What `scripts/gen-manifests --print-install` makes of the chart, i.e. what
/// manifests/install.yaml must hold.
fn generated_install_manifest() -> Option<String> {
    let helm = helm_path()?;
    let out = Command::new(root().join("scripts/gen-manifests"))
        .arg("--print-install")
        .env("HELM", helm)
        .output()
        .expect("scripts/gen-manifests runs");
    assert!(
        out.status.success(),
        "scripts/gen-manifests --print-install failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

#[test]
fn install_manifest_is_generated_from_the_chart() {
    let Some(generated) = generated_install_manifest() else {
        return;
    };
    assert!(
        read("manifests/install.yaml") == generated,
        "manifests/install.yaml differs from the chart; run scripts/gen-manifests and review \
         the diff"
    );
    assert!(generated.starts_with("# Generated by scripts/gen-manifests"));
    let docs = documents(&generated);
    let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ] {
        assert!(
            kinds.contains(kind),
            "install.yaml has no {kind}: {kinds:?}"
        );
    }
    // The namespace comes first, the CRD before anything that could use it.
    assert_eq!(docs[0]["kind"], "Namespace");
    assert_eq!(docs[0]["metadata"]["name"], "opsconductor-system");
    // It is the default identity, the one manifests/admission/ is generated for.
    let policies: Vec<&Value> = docs
        .iter()
        .filter(|d| {
            d["apiVersion"]
                .as_str()
                .is_some_and(|a| a.starts_with("admissionregistration.k8s.io/"))
        })
        .collect();
    let shipped = documents(&read(admission::MANIFEST_PATH));
    assert_eq!(policies.len(), shipped.len());
    for (p, s) in policies.iter().zip(&shipped) {
        assert_eq!(
            *p, s,
            "install.yaml's {} differs from manifests/admission",
            s["metadata"]["name"]
        );
    }
}

#[test]
fn helm_lint_passes() {
    if helm_path().is_none() {
        return;
    }
    let out = helm(&["lint", "--strict", CHART], None);
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// What the chart renders
// ---------------------------------------------------------------------------------------------

#[test]
fn the_operator_deployment_is_hardened_and_elects_a_leader() {
    let Some(yaml) = template("opsconductor-operator", "opsconductor-system", &[]) else {
        return;
    };
    let docs = documents(&yaml);
    let deployment = find(&docs, "Deployment", "opsconductor-operator");
    assert_eq!(deployment["metadata"]["name"], "opsconductor-operator");
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 2);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "opsconductor-operator");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    for forbidden in ["hostNetwork", "hostPID", "hostIPC"] {
        assert!(pod[forbidden].is_null() || pod[forbidden] == false);
    }
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["runAsUser"], 65532);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert!(sc["capabilities"]["add"].is_null());
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());
    let env: BTreeMap<&str, &Value> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e))
        .collect();
    assert_eq!(
        env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "run");
    for arg in [
        "--leader-election",
        "--leader-election-namespace=opsconductor-system",
        "--leader-election-id=opsconductor-operator",
        "--leader-election-lease-seconds=15",
        "--metrics-addr=0.0.0.0:8080",
    ] {
        assert!(args.contains(&arg), "{arg} missing from {args:?}");
    }
    // Every flag the chart passes is one the binary knows.
    let help = Command::new(env!("CARGO_BIN_EXE_opsconductor-operator"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for arg in &args[1..] {
        let flag = arg.split('=').next().unwrap();
        assert!(help.contains(flag), "`run` has no flag {flag}");
    }
    assert_eq!(
        c["image"],
        format!(
            "ghcr.io/opsconductor/opsconductor-operator:{}",
            env!("CARGO_PKG_VERSION")
        )
    );

    // A single replica without leader election has no lease Role.
    let single = template(
        "opsconductor-operator",
        "opsconductor-system",
        &[
            "--set",
            "replicaCount=1",
            "--set",
            "leaderElection.enabled=false",
        ],
    )
    .unwrap();
    let docs = documents(&single);
    assert!(!docs.iter().any(|d| d["kind"] == "Role"));
    assert!(!docs.iter().any(|d| d["kind"] == "PodDisruptionBudget"));
    let args =
        find(&docs, "Deployment", "operator")["spec"]["template"]["spec"]["containers"][0]["args"]
            .to_string();
    assert!(!args.contains("--leader-election"), "{args}");
}

#[test]
fn the_operators_network_policy_admits_only_metrics_and_reaches_only_what_it_needs() {
    let Some(yaml) = template("opsconductor-operator", "opsconductor-system", &[]) else {
        return;
    };
    let docs = documents(&yaml);
    let np = &find(&docs, "NetworkPolicy", "opsconductor-operator")["spec"];
    assert_eq!(np["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(
        np["podSelector"]["matchLabels"],
        find(&docs, "Deployment", "opsconductor-operator")["spec"]["selector"]["matchLabels"]
    );
    // In: one rule, the metrics port only.
    assert_eq!(
        np["ingress"],
        json!([{"ports": [{"port": 8080, "protocol": "TCP"}]}])
    );
    // Out: the API server, ACME over HTTPS, the gateways' HTTP port, DNS. Nothing else.
    let egress = np["egress"].as_array().unwrap();
    let ports: Vec<Value> = egress.iter().map(|r| r["ports"].clone()).collect();
    assert_eq!(
        ports,
        [
            json!([{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]),
            json!([{"port": 443, "protocol": "TCP"}]),
            json!([{"port": 8080, "protocol": "TCP"}]),
            json!([{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]),
        ]
    );
    // The ACME self-check reaches only the stacks' gateway pods.
    assert_eq!(
        egress[2]["to"],
        json!([{"namespaceSelector": {}, "podSelector": {"matchLabels": {
            "app.kubernetes.io/managed-by": "opsconductor-operator",
            "app.kubernetes.io/component": "gateway"}}}])
    );
    assert_eq!(
        egress[3]["to"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "kube-system"
    );

    // Restricted by values: scrapers, API server and ACME addresses.
    let restricted = template(
        "opsconductor-operator",
        "opsconductor-system",
        &[
            "--set-json",
            r#"networkPolicy.metricsFrom=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]"#,
            "--set-json",
            r#"networkPolicy.apiServer.cidrs=["10.0.0.1/32"]"#,
            "--set-json",
            r#"networkPolicy.acme.cidrs=["203.0.113.0/24"]"#,
        ],
    )
    .unwrap();
    let docs = documents(&restricted);
    let np = &find(&docs, "NetworkPolicy", "opsconductor-operator")["spec"];
    assert_eq!(
        np["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "monitoring"
    );
    assert_eq!(
        np["egress"][0]["to"],
        json!([{"ipBlock": {"cidr": "10.0.0.1/32"}}])
    );
    assert_eq!(
        np["egress"][1]["to"],
        json!([{"ipBlock": {"cidr": "203.0.113.0/24"}}])
    );
}

#[test]
fn rbac_grants_exactly_the_documented_rules() {
    let Some(yaml) = template("opsconductor-operator", "opsconductor-system", &[]) else {
        return;
    };
    let docs = documents(&yaml);
    let rules = |doc: &Value| -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for r in doc["rules"].as_array().unwrap() {
            for group in r["apiGroups"].as_array().unwrap() {
                for resource in r["resources"].as_array().unwrap() {
                    for verb in r["verbs"].as_array().unwrap() {
                        let names = r["resourceNames"]
                            .as_array()
                            .map(|n| format!(" {}", Value::Array(n.clone())))
                            .unwrap_or_default();
                        out.insert(format!(
                            "{}/{} {}{names}",
                            group.as_str().unwrap(),
                            resource.as_str().unwrap(),
                            verb.as_str().unwrap()
                        ));
                    }
                }
            }
        }
        out
    };
    let cluster = rules(find(&docs, "ClusterRole", "opsconductor-operator"));
    // No wildcard, no escalation verbs, nothing on RBAC itself.
    for r in &cluster {
        assert!(!r.contains('*'), "wildcard rule {r}");
        for verb in [" escalate", " bind", " impersonate", " deletecollection"] {
            assert!(!r.contains(verb), "{r}");
        }
        assert!(!r.starts_with("rbac.authorization.k8s.io/"), "{r}");
    }
    // Secrets: read (user certificates) and write (ACME), never list or watch cluster-wide.
    let secrets: BTreeSet<&str> = cluster
        .iter()
        .filter(|r| r.starts_with("/secrets "))
        .map(|r| r.as_str())
        .collect();
    assert_eq!(
        secrets,
        BTreeSet::from([
            "/secrets create",
            "/secrets get",
            "/secrets patch",
            "/secrets update"
        ])
    );
    // Admission objects: read only, the chart installs them.
    assert!(
        cluster
            .iter()
            .filter(|r| r.starts_with("admissionregistration.k8s.io/"))
            .all(|r| r.ends_with(" get") || r.ends_with(" list") || r.ends_with(" watch"))
    );
    let role = rules(find(&docs, "Role", "leader-election"));
    assert_eq!(
        role,
        BTreeSet::from([
            "coordination.k8s.io/leases create".to_string(),
            "coordination.k8s.io/leases get [\"opsconductor-operator\"]".to_string(),
            "coordination.k8s.io/leases update [\"opsconductor-operator\"]".to_string(),
        ])
    );
    let binding = find(&docs, "ClusterRoleBinding", "opsconductor-operator");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "opsconductor-operator", "namespace": "opsconductor-system"}])
    );
    // Cluster-scoped names carry the namespace outside opsconductor-system.
    let other = documents(&template("opsconductor-operator", "platform", &[]).unwrap());
    find(&other, "ClusterRole", "opsconductor-operator-platform");
}

#[test]
fn metrics_service_and_opt_in_service_monitor() {
    let Some(yaml) = template("opsconductor-operator", "opsconductor-system", &[]) else {
        return;
    };
    let docs = documents(&yaml);
    assert!(!docs.iter().any(|d| d["kind"] == "ServiceMonitor"));
    let svc = find(&docs, "Service", "-metrics");
    assert_eq!(svc["spec"]["type"], "ClusterIP");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");

    let with = documents(
        &template(
            "opsconductor-operator",
            "opsconductor-system",
            &[
                "--set",
                "metrics.serviceMonitor.enabled=true",
                "--set",
                "metrics.serviceMonitor.labels.release=prometheus",
            ],
        )
        .unwrap(),
    );
    let sm = find(&with, "ServiceMonitor", "opsconductor-operator");
    assert_eq!(sm["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"],
        find(&with, "Service", "-metrics")["metadata"]["labels"]
            .as_object()
            .map(|l| {
                json!({
                    "app.kubernetes.io/name": l["app.kubernetes.io/name"],
                    "app.kubernetes.io/instance": l["app.kubernetes.io/instance"],
                })
            })
            .unwrap()
    );
}

#[test]
fn bad_values_are_refused_with_a_reason() {
    let Some(e) = template_error(&["--set", "replicaCount=-1"]) else {
        return;
    };
    assert!(e.contains("replicaCount"), "{e}");
    let e = template_error(&["--set", "operator.logFormat=xml"]).unwrap();
    assert!(e.contains("logFormat"), "{e}");
    let e = template_error(&["--set", "unknownValue=1"]).unwrap();
    assert!(e.contains("unknownValue"), "{e}");
    let e = template_error(&["--set", "serviceAccount.name=Not_A_Name"]).unwrap();
    assert!(e.contains("serviceAccount"), "{e}");
    let e = template_error(&["--set", "leaderElection.renewDeadlineSeconds=20"]).unwrap();
    assert!(e.contains("renewDeadlineSeconds must be less than"), "{e}");
    let e = template_error(&["--set", "leaderElection.enabled=false"]).unwrap();
    assert!(e.contains("replicaCount > 1 needs leaderElection"), "{e}");
    let e = template_error(&["--set", "operator.watchNamespaces={Team_A}"]).unwrap();
    assert!(e.contains("watchNamespaces"), "{e}");
}

/// `operator.watchNamespaces`: the operator gets `--watch-namespaces`, everything inside a
/// namespace is granted by a Role there, and the ClusterRole keeps only the listed Namespaces
/// (by name) and the admission policies (read only).
#[test]
fn a_scoped_release_gets_roles_in_its_namespaces_and_almost_no_cluster_rules() {
    let Some(yaml) = template(
        "opsconductor-operator",
        "team-a-system",
        &["--set", "operator.watchNamespaces={team-a,team-a-staging}"],
    ) else {
        return;
    };
    let docs = documents(&yaml);
    let rules_of = |doc: &Value| -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for r in doc["rules"].as_array().unwrap() {
            for resource in r["resources"].as_array().unwrap() {
                for verb in r["verbs"].as_array().unwrap() {
                    let names = r["resourceNames"]
                        .as_array()
                        .map(|n| format!(" {}", Value::Array(n.clone())))
                        .unwrap_or_default();
                    out.insert(format!(
                        "{}/{} {}{names}",
                        r["apiGroups"][0].as_str().unwrap(),
                        resource.as_str().unwrap(),
                        verb.as_str().unwrap()
                    ));
                }
            }
        }
        out
    };
    let cluster = rules_of(find(
        &docs,
        "ClusterRole",
        "opsconductor-operator-team-a-system",
    ));
    let names = r#" ["team-a","team-a-staging"]"#;
    let expected: BTreeSet<String> = [
        format!("/namespaces list{names}"),
        format!("/namespaces watch{names}"),
        format!("/namespaces patch{names}"),
        "admissionregistration.k8s.io/validatingadmissionpolicies list".into(),
        "admissionregistration.k8s.io/validatingadmissionpolicies watch".into(),
        "admissionregistration.k8s.io/validatingadmissionpolicybindings list".into(),
        "admissionregistration.k8s.io/validatingadmissionpolicybindings watch".into(),
    ]
    .into();
    assert_eq!(cluster, expected);
    // The rules a cluster-wide release has in its ClusterRole, now in each namespace's Role.
    let unscoped = documents(&template("opsconductor-operator", "team-a-system", &[]).unwrap());
    let mut wide = rules_of(find(
        &unscoped,
        "ClusterRole",
        "opsconductor-operator-team-a-system",
    ));
    wide.retain(|r| !r.starts_with("/namespaces ") && !r.starts_with("admissionregistration"));
    assert!(wide.contains("/secrets get"), "{wide:?}");
    for ns in ["team-a", "team-a-staging"] {
        let role = docs
            .iter()
            .find(|d| d["kind"] == "Role" && d["metadata"]["namespace"] == ns)
            .unwrap_or_else(|| panic!("no Role in {ns}"));
        assert_eq!(rules_of(role), wide, "Role in {ns}");
        let binding = docs
            .iter()
            .find(|d| d["kind"] == "RoleBinding" && d["metadata"]["namespace"] == ns)
            .unwrap_or_else(|| panic!("no RoleBinding in {ns}"));
        assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": "opsconductor-operator", "namespace": "team-a-system"}])
        );
    }
    // Nothing in kube-system: the operator no longer looks up the cluster DNS Service (the
    // gateway reaches services by ClusterIP).
    assert!(
        !docs
            .iter()
            .any(|d| d["metadata"]["namespace"] == "kube-system"),
        "an object in kube-system"
    );
    let deployment = find(&docs, "Deployment", "opsconductor-operator");
    let args = &deployment["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(
        args.as_array()
            .unwrap()
            .contains(&json!("--watch-namespaces=team-a,team-a-staging")),
        "{args}"
    );
    // Not scoped: no namespace Roles, no --watch-namespaces.
    assert!(
        !unscoped
            .iter()
            .any(|d| d["kind"] == "Role" && d["metadata"]["namespace"] != "team-a-system")
    );
    assert!(!yaml_has(&unscoped, "--watch-namespaces"));
}

fn yaml_has(docs: &[Value], needle: &str) -> bool {
    docs.iter().any(|d| d.to_string().contains(needle))
}

// ---------------------------------------------------------------------------------------------
// Against the real control plane
// ---------------------------------------------------------------------------------------------

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
    assert_eq!(expected.len(), 35);
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
