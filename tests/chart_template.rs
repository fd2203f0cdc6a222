//! The Helm chart without a cluster (the pinned helm renders it): the chart's CRD and admission
//! policies are the code's, `manifests/install.yaml` is what `scripts/gen-manifests` makes of
//! the chart, `helm lint` passes, the rendered objects are hardened, the RBAC is the documented
//! one, bad values are refused, a scoped release gets Roles. The tests against the real control
//! plane are in `packaging.rs`.

mod chart_support;
mod support;

use chart_support::{
    CHART, documents, find, helm, helm_path, read, root, template, template_error, yaml_has,
};
use opsconductor_operator::admission::{self, OperatorIdentity};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// Where the chart's admission template is generated from src/admission/.
const ADMISSION_TEMPLATE: &str = "charts/opsconductor-operator/templates/admission.yaml";
/// Identity placeholders the generator replaces with template expressions. They are valid DNS
/// names (as [`OperatorIdentity::new`] wants) that appear nowhere else in the policies.
const SENTINEL_NAMESPACE: &str = "sentinel-release-namespace";
const SENTINEL_ACCOUNT: &str = "sentinel-service-account";

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

/// The chart's admission template: the policies src/admission/ builds, with the operator's
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
         Generated from src/admission/ by tests/chart_template.rs; do not edit.\n\
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
        "{ADMISSION_TEMPLATE} differs from src/admission/; run scripts/gen-manifests and review \
         the diff"
    );
}

/// Rendered by helm for another namespace and ServiceAccount, the chart's policies are exactly
/// what src/admission/ builds for that identity.
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
    // The stacks' gateway NetworkPolicies admit the operator's pods by these labels (the ACME
    // self-check, the reload results): every pod of the chart carries them. (They were on the
    // Deployment only, and a node test found the gateways refusing the operator.)
    let pod_labels = &spec["template"]["metadata"]["labels"];
    for (key, value) in opsconductor_operator::build::netpol::OPERATOR_POD_LABELS {
        assert_eq!(pod_labels[key], value, "pod label {key}: {pod_labels}");
    }
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
    // The gateways' `requests` metrics sidecar runs the operator's own image, as the chart
    // names it (a mirrored registry included).
    assert_eq!(env["OPSC_GATEWAY_REQUESTS_IMAGE"]["value"], c["image"]);
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
    // Out: the API server, ACME over HTTPS, the gateways' HTTP port and reload result port,
    // DNS. Nothing else.
    let egress = np["egress"].as_array().unwrap();
    let ports: Vec<Value> = egress.iter().map(|r| r["ports"].clone()).collect();
    assert_eq!(
        ports,
        [
            json!([{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]),
            json!([{"port": 443, "protocol": "TCP"}]),
            json!([{"port": 8080, "protocol": "TCP"}, {"port": 8084, "protocol": "TCP"}]),
            json!([{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]),
        ]
    );
    // The ACME self-check and the look at the reload results reach only the stacks' gateway
    // pods.
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

/// The gateways' PodMonitor is off by default; on, it selects exactly the pods the operator
/// renders for a gateway with `spec.gateway.metrics` (and none of a service's), on the port
/// name of their exporter.
#[test]
fn opt_in_pod_monitor_for_the_gateways() {
    let Some(yaml) = template("opsconductor-operator", "opsconductor-system", &[]) else {
        return;
    };
    assert!(!documents(&yaml).iter().any(|d| d["kind"] == "PodMonitor"));

    let stack = "apiVersion: opsconductor.io/v1alpha1\nkind: OpsConductorStack\n\
                 metadata: {name: shop, namespace: shop}\nspec:\n  gateway:\n    hosts: [a.example.com]\n\
                 \x20   metrics: {enabled: true, allowFrom: [{namespaceSelector: {matchLabels: {team: obs}}}]}\n\
                 \x20 tls: {secretName: own}\n  services: [{name: web, image: w, route: /}]\n";
    let bundle = opsconductor_operator::render::bundle_for(
        "stack.yaml",
        stack,
        "shop",
        &opsconductor_operator::build::BuildOptions::default(),
    )
    .unwrap();
    let pod_labels = |name: &str| {
        let d = bundle
            .deployments
            .iter()
            .find(|d| d.metadata.name.as_deref() == Some(name))
            .unwrap();
        let template = &d.spec.as_ref().unwrap().template;
        (
            template.metadata.as_ref().unwrap().labels.clone().unwrap(),
            template.spec.as_ref().unwrap().containers.clone(),
        )
    };
    let (gateway_labels, gateway_containers) = pod_labels("shop-gateway");
    let (web_labels, _) = pod_labels("web");

    let with = documents(
        &template(
            "opsconductor-operator",
            "opsconductor-system",
            &[
                "--set",
                "metrics.gatewayPodMonitor.enabled=true",
                "--set",
                "metrics.gatewayPodMonitor.labels.release=prometheus",
            ],
        )
        .unwrap(),
    );
    let pm = find(&with, "PodMonitor", "opsconductor-operator-gateways");
    assert_eq!(pm["metadata"]["namespace"], "opsconductor-system");
    assert_eq!(pm["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(pm["spec"]["namespaceSelector"], json!({"any": true}));
    let selector = pm["spec"]["selector"]["matchLabels"].as_object().unwrap();
    let selects = |labels: &BTreeMap<String, String>| {
        selector
            .iter()
            .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
    };
    assert!(
        selects(&gateway_labels),
        "{selector:?} vs {gateway_labels:?}"
    );
    assert!(!selects(&web_labels), "a service's pods are not scraped");
    // One endpoint per exporter sidecar, on its named port.
    let endpoints = pm["spec"]["podMetricsEndpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 2);
    for (endpoint, sidecar) in endpoints.iter().zip(["exporter", "requests"]) {
        assert_eq!(endpoint["path"], "/metrics");
        let exporter = gateway_containers
            .iter()
            .find(|c| c.name == sidecar)
            .unwrap_or_else(|| panic!("the {sidecar} sidecar"));
        let port = &exporter.ports.as_ref().unwrap()[0];
        assert_eq!(endpoint["port"].as_str(), port.name.as_deref());
    }
    assert_eq!(
        pm["spec"]["podTargetLabels"],
        json!(["opsconductor.io/stack"])
    );

    let scoped = documents(
        &template(
            "opsconductor-operator",
            "opsconductor-system",
            &[
                "--set",
                "metrics.gatewayPodMonitor.enabled=true",
                "--set",
                "metrics.gatewayPodMonitor.namespaces={shop,blog}",
            ],
        )
        .unwrap(),
    );
    let pm = find(&scoped, "PodMonitor", "-gateways");
    assert_eq!(
        pm["spec"]["namespaceSelector"],
        json!({"matchNames": ["shop", "blog"]})
    );
    let e = template_error(&[
        "--set",
        "metrics.gatewayPodMonitor.enabled=true",
        "--set",
        "metrics.gatewayPodMonitor.interval=often",
    ])
    .unwrap();
    assert!(e.contains("interval"), "{e}");
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

/// `operator.namespaceSelector`: the operator gets `--namespace-selector`; the rules stay in the
/// ClusterRole (the selection changes with labels, which RBAC cannot follow), with no namespace
/// Roles; a list and a selector together, or a non-string selector, are refused.
#[test]
fn a_release_scoped_by_a_selector_keeps_cluster_rules_and_passes_the_selector() {
    let Some(yaml) = template(
        "opsconductor-operator",
        "team-b-system",
        &[
            "--set-string",
            r"operator.namespaceSelector=example.com/tenant in (b\,b-staging)",
        ],
    ) else {
        return;
    };
    let docs = documents(&yaml);
    let deployment = find(&docs, "Deployment", "opsconductor-operator");
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap();
    assert!(
        args.contains(&json!(
            "--namespace-selector=example.com/tenant in (b,b-staging)"
        )),
        "{args:?}"
    );
    assert!(
        !args
            .iter()
            .any(|a| a.as_str().unwrap().starts_with("--watch-namespaces")),
        "{args:?}"
    );
    let unscoped = documents(&template("opsconductor-operator", "team-b-system", &[]).unwrap());
    let name = "opsconductor-operator-team-b-system";
    assert_eq!(
        find(&docs, "ClusterRole", name)["rules"],
        find(&unscoped, "ClusterRole", name)["rules"],
        "a selector release has the cluster-wide release's rules"
    );
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"] == "Role" && d["metadata"]["namespace"] != "team-b-system"),
        "a namespace Role with a selector"
    );
    let e = template_error(&[
        "--set",
        "operator.watchNamespaces={a}",
        "--set",
        "operator.namespaceSelector=tenant=a",
    ])
    .unwrap();
    assert!(
        e.contains("operator.watchNamespaces and operator.namespaceSelector"),
        "{e}"
    );
    let e = template_error(&["--set", "operator.namespaceSelector=true"]).unwrap();
    assert!(e.contains("namespaceSelector"), "{e}");
}

/// `operator.auditNamespaces`: `with-stacks` reaches the operator as `--audit-namespaces`; the
/// default passes nothing; anything else is refused.
#[test]
fn the_audit_namespaces_value_reaches_the_operator() {
    let Some(yaml) = template(
        "opsconductor-operator",
        "opsconductor-system",
        &["--set", "operator.auditNamespaces=with-stacks"],
    ) else {
        return;
    };
    assert!(yaml_has(
        &documents(&yaml),
        "--audit-namespaces=with-stacks"
    ));
    let default = template("opsconductor-operator", "opsconductor-system", &[]).unwrap();
    assert!(!yaml_has(&documents(&default), "--audit-namespaces"));
    let e = template_error(&["--set", "operator.auditNamespaces=everywhere"]).unwrap();
    assert!(e.contains("auditNamespaces"), "{e}");
}

/// The leader-election Lease is named after the release by default: two releases in one
/// namespace elect their leaders independently, each Role granting only its own Lease.
#[test]
fn releases_in_one_namespace_have_their_own_leases() {
    let Some(a) = template("team-a", "tenants", &[]) else {
        return;
    };
    let b = template("team-b", "tenants", &[]).unwrap();
    let lease = |yaml: &str| -> (String, Value) {
        let docs = documents(yaml);
        let deployment = find(&docs, "Deployment", "opsconductor-operator");
        let id = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a.as_str()?.strip_prefix("--leader-election-id="))
            .next()
            .unwrap()
            .to_string();
        let role = find(&docs, "Role", "-leader-election");
        (id, role["rules"][1]["resourceNames"].clone())
    };
    let (id_a, names_a) = lease(&a);
    let (id_b, names_b) = lease(&b);
    assert_eq!(id_a, "team-a-opsconductor-operator");
    assert_eq!(id_b, "team-b-opsconductor-operator");
    assert_eq!(names_a, json!([id_a]));
    assert_eq!(names_b, json!([id_b]));
    // The default release keeps the Lease name it always had; an explicit name wins.
    let default = template("opsconductor-operator", "opsconductor-system", &[]).unwrap();
    assert_eq!(lease(&default).0, "opsconductor-operator");
    let named = template(
        "team-a",
        "tenants",
        &["--set", "leaderElection.leaseName=shared"],
    )
    .unwrap();
    assert_eq!(lease(&named), ("shared".to_string(), json!(["shared"])));
}
