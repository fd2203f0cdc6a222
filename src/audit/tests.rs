use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::*;
use crate::build::{BuildOptions, build};
use crate::crd::OpsConductorStack;
use crate::validate::validate;
use serde_json::{Value, json};

const UID: &str = "0b5e6c1a-0000-4000-8000-000000000001";

fn stack() -> Stack {
    let cr: OpsConductorStack = serde_json::from_value(json!({
        "apiVersion": "opsconductor.io/v1alpha1",
        "kind": "OpsConductorStack",
        "metadata": {"name": "prod", "namespace": "ops", "uid": UID},
        "spec": {
            "gateway": {"hosts": ["ops.example.com"]},
            "tls": {"secretName": "cert"},
            "services": [
                {"name": "auth", "image": "auth:1", "route": "/auth/", "calls": ["users"]},
                {"name": "users", "image": "users:1"},
            ],
            "backends": [
                {"name": "postgres", "podSelector": {"matchLabels": {"app": "postgres"}},
                 "ports": [5432], "allowFrom": ["auth"]},
            ],
        }
    }))
    .unwrap();
    validate(&cr, "ops").unwrap()
}

fn run(found: &Found) -> Vec<Violation> {
    let stack = stack();
    audit(&stack, &build(&stack, &BuildOptions::default()), found)
}

/// The stack's own objects exactly as built: no violations.
fn own_objects() -> Found {
    let stack = stack();
    let bundle = build(&stack, &BuildOptions::default());
    let pods = bundle
        .deployments
        .iter()
        .map(|d| {
            let template = d.spec.clone().unwrap().template;
            let name = d.metadata.name.clone().unwrap();
            Pod {
                metadata: ObjectMeta {
                    name: Some(format!("{name}-5d8f-abcde")),
                    labels: template.metadata.unwrap().labels,
                    // Made by the Deployment's ReplicaSet, as the controllers do.
                    owner_references: Some(vec![
                        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                            api_version: "apps/v1".into(),
                            kind: "ReplicaSet".into(),
                            name: format!("{name}-5d8f"),
                            uid: "rs".into(),
                            controller: Some(true),
                            block_owner_deletion: Some(true),
                        },
                    ]),
                    ..ObjectMeta::default()
                },
                spec: template.spec,
                ..Pod::default()
            }
        })
        .collect();
    Found {
        services: bundle.services.clone(),
        pods,
        network_policies: bundle.network_policies.clone(),
        ..Found::default()
    }
}

fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

fn service(name: &str, spec: Value) -> Service {
    from(json!({"metadata": {"name": name}, "spec": spec}))
}

fn pod(name: &str, labels: Value, spec: Value) -> Pod {
    from(json!({"metadata": {"name": name, "labels": labels}, "spec": spec}))
}

fn container(ports: Value) -> Value {
    json!({"name": "main", "image": "x", "ports": ports})
}

fn policy(name: &str, spec: Value) -> NetworkPolicy {
    from(json!({"metadata": {"name": name}, "spec": spec}))
}

fn only(v: Vec<Violation>) -> Violation {
    assert_eq!(v.len(), 1, "expected one violation, got {v:#?}");
    v.into_iter().next().unwrap()
}

#[test]
fn a_pod_with_the_stacks_label_not_made_by_its_deployments_is_reported() {
    let mut found = own_objects();
    let mut joiner = found.pods[0].clone();
    joiner.metadata.name = Some("joiner".into());
    joiner.metadata.owner_references = None;
    let mut foreign_rs = found.pods[0].clone();
    foreign_rs.metadata.name = Some("other-abc-x".into());
    foreign_rs.metadata.owner_references.as_mut().unwrap()[0].name = "other-abc".into();
    found.pods.extend([joiner, foreign_rs]);
    let names: Vec<String> = run(&found)
        .into_iter()
        .filter(|v| v.reason.contains("not created by the stack's Deployments"))
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["joiner", "other-abc-x"]);
}

#[test]
fn the_stacks_own_objects_are_clean() {
    assert_eq!(run(&own_objects()), vec![]);
}

#[test]
fn nodeport_loadbalancer_and_externalname_services_are_reported() {
    for (ty, words) in [
        (
            "NodePort",
            "type NodePort exposes a service outside the gateway",
        ),
        (
            "LoadBalancer",
            "type LoadBalancer exposes a service outside the gateway",
        ),
        ("ExternalName", "type ExternalName"),
    ] {
        let mut found = own_objects();
        found.services.push(service(
            "legacy-admin",
            json!({"type": ty, "externalName": "x.example"}),
        ));
        let v = only(run(&found));
        assert_eq!(
            (v.kind.as_str(), v.name.as_str()),
            ("Service", "legacy-admin")
        );
        assert!(v.reason.starts_with(words), "{ty}: {}", v.reason);
    }
}

#[test]
fn clusterip_and_headless_services_are_fine() {
    let mut found = own_objects();
    found
        .services
        .push(service("plain", json!({"ports": [{"port": 80}]})));
    found
        .services
        .push(service("explicit", json!({"type": "ClusterIP"})));
    found.services.push(service(
        "headless",
        json!({"type": "ClusterIP", "clusterIP": "None"}),
    ));
    assert_eq!(run(&found), vec![]);
}

#[test]
fn external_ips_are_reported_even_on_a_clusterip_service_and_on_the_gateway() {
    let mut found = own_objects();
    found.services.push(service(
        "sneaky",
        json!({"type": "ClusterIP", "externalIPs": ["203.0.113.9"]}),
    ));
    let gateway = found
        .services
        .iter_mut()
        .find(|s| s.metadata.name.as_deref() == Some("prod-gateway"))
        .unwrap();
    gateway.spec.as_mut().unwrap().external_ips = Some(vec!["198.51.100.1".into()]);
    let v = run(&found);
    assert_eq!(v.len(), 2, "{v:#?}");
    assert!(v.iter().all(|v| v.reason.starts_with("externalIPs (")));
    assert!(v[1].reason.contains("203.0.113.9"), "{v:#?}");
}

#[test]
fn the_gateway_may_have_only_the_type_the_spec_asks_for() {
    // Built as LoadBalancer (the default): NodePort on the managed gateway is drift.
    let mut found = own_objects();
    let gateway = found
        .services
        .iter_mut()
        .find(|s| s.metadata.name.as_deref() == Some("prod-gateway"))
        .unwrap();
    assert_eq!(
        gateway.spec.as_ref().unwrap().type_.as_deref(),
        Some("LoadBalancer")
    );
    gateway.spec.as_mut().unwrap().type_ = Some("NodePort".into());
    let v = only(run(&found));
    assert_eq!(v.name, "prod-gateway");
    assert!(v.reason.starts_with("type NodePort"));
}

#[test]
fn a_cluster_ip_gateway_turned_load_balancer_or_node_port_is_reported() {
    // serviceType: ClusterIP (behind an existing ingress): the gateway has no exemption.
    let mut stack = stack();
    stack.gateway.service_type = crate::model::GatewayServiceType::ClusterIp;
    let bundle = build(&stack, &BuildOptions::default());
    let gateway = bundle
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("prod-gateway"))
        .unwrap()
        .clone();
    let found = |svc: &Service| Found {
        services: vec![svc.clone()],
        ..Found::default()
    };
    assert_eq!(audit(&stack, &bundle, &found(&gateway)), vec![]);
    for ty in ["LoadBalancer", "NodePort"] {
        let mut changed = gateway.clone();
        changed.spec.as_mut().unwrap().type_ = Some(ty.into());
        let v = only(audit(&stack, &bundle, &found(&changed)));
        assert!(v.reason.starts_with(&format!("type {ty}")), "{}", v.reason);
    }
}

#[test]
fn copied_labels_do_not_make_a_service_managed() {
    let stack = stack();
    let bundle = build(&stack, &BuildOptions::default());
    let real = bundle
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("prod-gateway"))
        .unwrap();
    // Same labels and owner reference, another name: not one of the stack's objects.
    let mut copy = real.clone();
    copy.metadata.name = Some("prod-gateway-2".into());
    // Same name and labels but no owner reference (the real one is not there).
    let mut unowned = real.clone();
    unowned.metadata.owner_references = None;
    // Owner reference to another stack with the same name (a different uid).
    let mut other_uid = real.clone();
    other_uid.metadata.owner_references.as_mut().unwrap()[0].uid = "another".into();
    // A non-controller owner reference.
    let mut not_controller = real.clone();
    not_controller.metadata.owner_references.as_mut().unwrap()[0].controller = Some(false);
    // Owned, but without the labels.
    let mut unlabelled = real.clone();
    unlabelled.metadata.labels = None;
    for (what, svc) in [
        ("copy", copy),
        ("unowned", unowned),
        ("other uid", other_uid),
        ("not controller", not_controller),
        ("unlabelled", unlabelled),
    ] {
        let found = Found {
            services: vec![svc],
            ..Found::default()
        };
        let v = only(audit(&stack, &bundle, &found));
        assert!(
            v.reason.starts_with("type LoadBalancer"),
            "{what}: {}",
            v.reason
        );
    }
    // And the real one is exempt.
    let found = Found {
        services: vec![real.clone()],
        ..Found::default()
    };
    assert_eq!(audit(&stack, &bundle, &found), vec![]);
}

#[test]
fn an_internal_service_turned_nodeport_is_drift_and_reported() {
    let mut found = own_objects();
    let auth = found
        .services
        .iter_mut()
        .find(|s| s.metadata.name.as_deref() == Some("auth"))
        .unwrap();
    auth.spec.as_mut().unwrap().type_ = Some("NodePort".into());
    let v = only(run(&found));
    assert_eq!(v.name, "auth");
}

#[test]
fn host_network_host_pid_and_host_ports_are_reported_per_problem() {
    let mut found = own_objects();
    found.pods.push(pod(
        "debug",
        json!({"app": "debug"}),
        json!({"hostNetwork": true, "hostPID": true, "containers": [container(json!([{"containerPort": 80, "hostPort": 8080}]))],
               "initContainers": [{"name": "init", "image": "x", "ports": [{"containerPort": 1, "hostPort": 9090}]}]}),
    ));
    let v = run(&found);
    let reasons: Vec<&str> = v.iter().map(|v| v.reason.as_str()).collect();
    assert_eq!(v.len(), 3, "{reasons:#?}");
    assert!(v.iter().all(|v| v.kind == "Pod" && v.name == "debug"));
    assert!(reasons.iter().any(|r| r.contains("(hostNetwork)")));
    assert!(reasons.iter().any(|r| r.contains("(hostPID)")));
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("hostPort: main 8080, init 9090"))
    );
}

#[test]
fn container_ports_without_host_ports_are_fine() {
    let mut found = own_objects();
    found.pods.push(pod(
        "web",
        json!({"app": "web"}),
        json!({"hostNetwork": false, "containers": [container(json!([{"containerPort": 80}]))]}),
    ));
    assert_eq!(run(&found), vec![]);
}

#[test]
fn the_stacks_own_pods_are_checked_too() {
    let mut found = own_objects();
    let p = found
        .pods
        .iter_mut()
        .find(|p| p.metadata.name.as_deref().unwrap().starts_with("auth-"))
        .unwrap();
    p.spec.as_mut().unwrap().host_network = Some(true);
    let v = only(run(&found));
    assert!(v.name.starts_with("auth-") && v.reason.contains("hostNetwork"));
}

#[test]
fn every_ingress_and_gateway_route_is_reported() {
    let mut found = own_objects();
    found.ingresses.push(from(json!({"metadata": {"name": "web",
        "labels": {"app.kubernetes.io/managed-by": "opsconductor-operator", "opsconductor.io/stack": "prod"}}})));
    let http: DynamicObject = from(json!({"apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute", "metadata": {"name": "api"}}));
    let untyped: DynamicObject = from(json!({"metadata": {"name": "grpc"}}));
    found.routes.push(Route::from_dynamic("HTTPRoute", &http));
    found
        .routes
        .push(Route::from_dynamic("GRPCRoute", &untyped));
    found.routes.push(Route::from_value(
        "TCPRoute",
        &json!({"metadata": {"name": "db"}}),
    ));
    let v = run(&found);
    let kinds: Vec<(&str, &str)> = v
        .iter()
        .map(|v| (v.kind.as_str(), v.name.as_str()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("GRPCRoute", "grpc"),
            ("HTTPRoute", "api"),
            ("Ingress", "web"),
            ("TCPRoute", "db")
        ]
    );
    assert!(v[1].reason.contains("a Gateway API HTTPRoute"));
    assert!(v[2].reason.contains("around the stack's gateway"));
}

#[test]
fn a_policy_opening_stack_pods_is_reported_with_what_it_opens() {
    let mut found = own_objects();
    found.network_policies.push(policy(
        "allow-monitoring",
        json!({"podSelector": {"matchLabels": {"app.kubernetes.io/name": "auth"}},
               "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "obs"}}}],
                            "ports": [{"port": 9090}]}]}),
    ));
    let v = only(run(&found));
    assert_eq!(v.name, "allow-monitoring");
    assert_eq!(
        v.reason,
        "opens the pods of auth to traffic the stack does not declare (every pod in \
         namespaces with team=obs on TCP 9090); NetworkPolicies add up, so this widens the \
         stack's default-deny"
    );
}

#[test]
fn an_empty_pod_selector_selects_the_stack_too() {
    let mut found = own_objects();
    found.network_policies.push(policy(
        "allow-all",
        json!({"podSelector": {}, "ingress": [{}]}),
    ));
    let v = only(run(&found));
    assert!(
        v.reason
            .starts_with("opens the pods of auth, the gateway and users to traffic"),
        "{}",
        v.reason
    );
    assert!(v.reason.contains("(anywhere on any port)"), "{}", v.reason);
}

#[test]
fn deny_policies_and_policies_for_other_pods_are_fine() {
    let mut found = own_objects();
    // Deny-all ingress: selects the stack but allows nothing.
    found.network_policies.push(policy(
        "deny-all",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
    ));
    // Ingress rules, but types say egress only: the ingress rules do not apply.
    found.network_policies.push(policy(
        "egress-typed",
        json!({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]}),
    ));
    // Opens other pods only.
    found.network_policies.push(policy(
        "other-app",
        json!({"podSelector": {"matchLabels": {"app": "other"}}, "ingress": [{}]}),
    ));
    found.network_policies.push(policy(
        "not-the-stack",
        json!({"podSelector": {"matchExpressions": [
            {"key": "opsconductor.io/stack", "operator": "DoesNotExist"}]}, "ingress": [{}], "egress": [{}]}),
    ));
    assert_eq!(run(&found), vec![]);
}

#[test]
fn egress_for_stack_pods_is_reported_but_not_for_backends() {
    let mut found = own_objects();
    found.pods.push(pod(
        "postgres-0",
        json!({"app": "postgres"}),
        json!({"containers": [container(json!([]))]}),
    ));
    found.network_policies.push(policy(
        "backup-egress",
        json!({"podSelector": {"matchLabels": {"app": "postgres"}}, "policyTypes": ["Egress"],
               "egress": [{"to": [{"ipBlock": {"cidr": "10.9.0.0/16"}}]}]}),
    ));
    assert_eq!(run(&found), vec![], "a backend's egress is not the stack's");
    found.network_policies.push(policy(
        "users-out",
        json!({"podSelector": {"matchExpressions": [
            {"key": "app.kubernetes.io/name", "operator": "In", "values": ["users", "x"]}]},
               "policyTypes": ["Egress"],
               "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
                           "ports": [{"port": 1000, "endPort": 2000}]}]}),
    ));
    let v = only(run(&found));
    assert_eq!(
        v.reason,
        "lets the pods of users send traffic the stack does not declare (0.0.0.0/0 \
         except 10.0.0.0/8 on TCP 1000-2000); NetworkPolicies add up, so this widens the \
         stack's default-deny"
    );
}

#[test]
fn a_policy_opening_a_backend_is_reported() {
    let mut found = own_objects();
    found.pods.push(pod(
        "postgres-0",
        json!({"app": "postgres", "role": "primary"}),
        json!({"containers": [container(json!([]))]}),
    ));
    found.network_policies.push(policy(
        "pg-open",
        json!({"podSelector": {"matchLabels": {"role": "primary"}},
               "ingress": [{"from": [{"podSelector": {}}]}]}),
    ));
    let v = only(run(&found));
    assert!(
        v.reason.starts_with(
            "opens the pods of backend postgres to traffic the stack does not \
             declare (pods (all) in this namespace on any port)"
        ),
        "{}",
        v.reason
    );
}

#[test]
fn missing_policy_types_follow_kubernetes_defaults() {
    let mut found = own_objects();
    // No policyTypes and egress rules only: Ingress (with no rules) and Egress apply.
    found.network_policies.push(policy(
        "implicit",
        json!({"podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}},
               "egress": [{"ports": [{"port": 25}]}]}),
    ));
    let v = only(run(&found));
    assert!(
        v.reason.starts_with("lets the pods of the gateway send"),
        "{}",
        v.reason
    );
    assert!(v.reason.contains("anywhere on TCP 25"), "{}", v.reason);
}

#[test]
fn a_changed_managed_policy_is_drift_and_a_copied_one_is_not_managed() {
    let mut found = own_objects();
    let np = found
        .network_policies
        .iter_mut()
        .find(|p| p.metadata.name.as_deref() == Some("prod-svc-users"))
        .unwrap();
    let mut copy = np.clone();
    np.spec.as_mut().unwrap().ingress.as_mut().unwrap()[0]
        .from
        .as_mut()
        .unwrap()
        .push(from(json!({"ipBlock": {"cidr": "0.0.0.0/0"}})));
    let v = only(run(&found));
    assert_eq!(v.name, "prod-svc-users");
    assert!(
        v.reason
            .starts_with("was changed after the operator wrote it")
    );

    // The original spec under another name, with the stack's labels and owner: not
    // managed, and it opens users to the gateway and auth: reported.
    let mut found = own_objects();
    copy.metadata.name = Some("prod-svc-users-copy".into());
    found.network_policies.push(copy);
    let v = only(run(&found));
    assert_eq!(v.name, "prod-svc-users-copy");
    assert!(
        v.reason.starts_with("opens the pods of users"),
        "{}",
        v.reason
    );
}

#[test]
fn a_managed_policy_read_back_without_empty_lists_is_unchanged() {
    let mut found = own_objects();
    // The API server drops empty lists (e.g. `ingress: []` of the default-deny).
    for np in &mut found.network_policies {
        let spec = np.spec.as_mut().unwrap();
        if spec.ingress.as_ref().is_some_and(|i| i.is_empty()) {
            spec.ingress = None;
        }
        if spec.egress.as_ref().is_some_and(|e| e.is_empty()) {
            spec.egress = None;
        }
    }
    assert_eq!(run(&found), vec![]);
}

/// "Is this managed policy exactly ours?" has one answer: the audit reports a managed
/// NetworkPolicy as changed exactly when apply would write it again. Two answers used to
/// disagree on an empty-valued label added to the policy's podSelector (it narrows the
/// default-deny): the audit reported it, apply held it for ours and never reverted it.
#[test]
fn the_audit_and_apply_agree_on_what_is_exactly_ours() {
    let desired = own_objects()
        .network_policies
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some("prod-svc-users"))
        .unwrap();
    let desired_value = serde_json::to_value(&desired).unwrap();
    type Change = fn(&mut Value);
    let cases: [(&str, Change, bool); 5] = [
        ("nothing", |_| {}, true),
        (
            "empty lists dropped when read back",
            |v| {
                let spec = v["spec"].as_object_mut().unwrap();
                spec.retain(|_, x| x.as_array().is_none_or(|a| !a.is_empty()));
            },
            true,
        ),
        (
            "a peer from anywhere added",
            |v| {
                v["spec"]["ingress"][0]["from"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"ipBlock": {"cidr": "0.0.0.0/0"}}))
            },
            false,
        ),
        (
            "an empty-valued label added to the podSelector",
            |v| v["spec"]["podSelector"]["matchLabels"]["narrowed"] = json!(""),
            false,
        ),
        (
            "a peer opened to every namespace with an empty namespaceSelector",
            |v| {
                let peer = v["spec"]["ingress"]
                    .as_array_mut()
                    .unwrap()
                    .iter_mut()
                    .flat_map(|rule| rule["from"].as_array_mut().unwrap().iter_mut())
                    .find(|peer| peer.get("namespaceSelector").is_none())
                    .expect("a peer of the namespace's own pods");
                peer["namespaceSelector"] = json!({});
            },
            false,
        ),
    ];
    for (what, change, exact) in cases {
        let mut actual_value = desired_value.clone();
        change(&mut actual_value);
        let actual: NetworkPolicy = serde_json::from_value(actual_value.clone()).unwrap();
        let mut found = own_objects();
        found
            .network_policies
            .retain(|p| p.metadata.name != desired.metadata.name);
        found.network_policies.push(actual);
        let audit_reports_it = run(&found).iter().any(|v| {
            v.name == "prod-svc-users"
                && v.reason
                    .starts_with("was changed after the operator wrote it")
        });
        let apply_holds_it = crate::controller::diff::holds_exactly(&actual_value, &desired_value);
        assert_eq!(
            (audit_reports_it, apply_holds_it),
            (!exact, exact),
            "{what}: (audit reports it, apply holds it for ours)"
        );
    }
}

#[test]
fn the_list_is_sorted_deduplicated_and_capped() {
    let mut found = own_objects();
    for i in (0..60).rev() {
        found
            .services
            .push(service(&format!("np-{i:02}"), json!({"type": "NodePort"})));
    }
    found
        .services
        .push(service("np-00", json!({"type": "NodePort"})));
    let v = run(&found);
    assert_eq!(v.len(), 60);
    assert!(v.windows(2).all(|w| w[0] < w[1]));
    let (shown, total) = capped(v, MAX_REPORTED);
    assert_eq!((shown.len(), total), (50, 60));
    assert_eq!(shown[0].name, "np-00");
    let (shown, total) = capped(vec![], MAX_REPORTED);
    assert_eq!((shown.len(), total), (0, 0));
}

#[test]
fn label_selectors_follow_kubernetes_semantics() {
    let labels: BTreeMap<String, String> = [
        ("app".to_string(), "web".to_string()),
        ("tier".into(), "front".into()),
    ]
    .into();
    let sel = |v: Value| -> LabelSelector { from(v) };
    assert!(selects(&sel(json!({})), &labels));
    assert!(selects(
        &sel(json!({"matchLabels": {"app": "web"}})),
        &labels
    ));
    assert!(!selects(
        &sel(json!({"matchLabels": {"app": "db"}})),
        &labels
    ));
    for (op, values, expected) in [
        ("In", json!(["web", "x"]), true),
        ("In", json!(["x"]), false),
        ("NotIn", json!(["x"]), true),
        ("NotIn", json!(["web"]), false),
        ("Exists", json!(null), true),
        ("DoesNotExist", json!(null), false),
        ("Bogus", json!(null), false),
    ] {
        let s =
            sel(json!({"matchExpressions": [{"key": "app", "operator": op, "values": values}]}));
        assert_eq!(selects(&s, &labels), expected, "{op} {values}");
    }
    let absent =
        sel(json!({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}));
    assert!(selects(&absent, &labels), "NotIn holds for a missing key");
}
