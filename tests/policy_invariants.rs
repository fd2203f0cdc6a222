//! Property tests over generated valid stacks: whatever the spec, the built objects keep the
//! policy of API.md. Pure: no cluster involved.
//!
//! - only the gateway Service is not ClusterIP, and no Service exposes nodePorts, externalIPs
//!   or a loadBalancerIP;
//! - no pod uses host networking, host ports or the host PID namespace;
//! - every stack pod is selected by a default-deny policy for both directions;
//! - every route reaches exactly its service.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use opsconductor_operator::build::{BuildOptions, build};
use opsconductor_operator::crd::OpsConductorStack;
use opsconductor_operator::validate::validate;
use proptest::prelude::*;
use serde_json::{Value, json};

/// A generated stack description, turned into the CR's JSON.
fn stack_strategy() -> impl Strategy<Value = Value> {
    (1usize..10)
        .prop_flat_map(|n| {
            (
                Just(n),
                proptest::collection::vec(any::<bool>(), n),             // routed?
                proptest::collection::vec(proptest::collection::vec(any::<bool>(), n), n), // calls matrix
                proptest::collection::vec(1u16..=65535, n),              // ports
                0usize..4,                                               // backends
                any::<bool>(),                                           // All mode
                any::<bool>(),                                           // Audit
                proptest::option::of((1i32..1000, 0i32..1000)),          // rate limit
                any::<bool>(),                                           // source ranges
                any::<bool>(),                                           // NodePort
                1usize..4,                                               // hosts
            )
        })
        .prop_map(|(n, routed, calls, ports, backends, all, audit, rl, ranges, nodeport, hosts)| {
            let services: Vec<Value> = (0..n)
                .map(|i| {
                    let mut s = json!({"name": format!("svc-{i}"), "image": format!("img/{i}:1"), "port": ports[i]});
                    if routed[i] {
                        s["route"] = json!(if i == 0 { "/".to_string() } else { format!("/api/{i}/") });
                    }
                    let c: Vec<String> = (0..n).filter(|j| calls[i][*j]).map(|j| format!("svc-{j}")).collect();
                    s["calls"] = json!(c);
                    if i % 3 == 2 {
                        s["egress"] = json!([{"cidr": "10.20.0.0/16", "ports": [22]}]);
                    }
                    s
                })
                .collect();
            let backends: Vec<Value> = (0..backends)
                .map(|b| {
                    let from: Vec<String> = (0..n).filter(|i| (i + b) % 2 == 0).map(|i| format!("svc-{i}")).collect();
                    json!({"name": format!("db-{b}"), "podSelector": {"matchLabels": {"app": format!("db-{b}")}},
                           "ports": [5432 + b as i32], "allowFrom": from})
                })
                .collect();
            let mut gateway = json!({
                "hosts": (0..hosts).map(|h| format!("h{h}.example.com")).collect::<Vec<_>>(),
                "serviceType": if nodeport { "NodePort" } else { "LoadBalancer" },
            });
            if let Some((rps, burst)) = rl {
                gateway["rateLimit"] = json!({"requestsPerSecond": rps, "burst": burst});
            }
            if ranges {
                gateway["allowedSourceRanges"] = json!(["192.0.2.0/24"]);
            }
            json!({
                "apiVersion": "opsconductor.io/v1alpha1",
                "kind": "OpsConductorStack",
                "metadata": {"name": "prop", "namespace": "ns1", "uid": "0b7c8e5e-0000-4000-8000-000000000001"},
                "spec": {
                    "gateway": gateway,
                    "tls": {"secretName": "cert"},
                    "services": services,
                    "backends": backends,
                    "policy": {"mode": if audit { "Audit" } else { "Enforce" },
                               "serviceToService": if all { "All" } else { "Declared" }},
                }
            })
        })
}

fn selects(policy: &NetworkPolicy, labels: &BTreeMap<String, String>) -> bool {
    let sel = policy
        .spec
        .as_ref()
        .unwrap()
        .pod_selector
        .as_ref()
        .cloned()
        .unwrap_or_default();
    assert!(
        sel.match_expressions.is_none(),
        "the builders use matchLabels only"
    );
    sel.match_labels
        .unwrap_or_default()
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
}

fn is_default_deny_both_ways(policy: &NetworkPolicy) -> bool {
    let spec = policy.spec.as_ref().unwrap();
    let types = spec.policy_types.clone().unwrap_or_default();
    types.contains(&"Ingress".to_string())
        && types.contains(&"Egress".to_string())
        && spec.ingress.as_ref().is_some_and(|r| r.is_empty())
        && spec.egress.as_ref().is_some_and(|r| r.is_empty())
}

/// The text of the `{ ... }` block that starts at `start` (which points at or before `{`).
fn block(text: &str, start: usize) -> &str {
    let open = start + text[start..].find('{').unwrap();
    let mut depth = 0;
    for (i, c) in text[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &text[open..open + i + 1];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced braces in nginx.conf");
}

/// The in-cluster addresses that the proxying `location <route>` blocks forward to
/// (following an upstream block when `proxy_pass` names one), one list per such block.
fn targets_of_route(conf: &str, route: &str) -> Vec<Vec<String>> {
    let needle = format!("location {route} {{");
    let mut out = Vec::new();
    for (at, _) in conf.match_indices(&needle) {
        let loc = block(conf, at);
        let mut text = String::new();
        for line in loc.lines() {
            if let Some(rest) = line.trim().strip_prefix("proxy_pass http://") {
                text.push_str(rest);
                let name = rest.trim_end_matches(';').split(['/', ':']).next().unwrap();
                if let Some(up) = conf.find(&format!("upstream {name} {{")) {
                    text.push_str(block(conf, up));
                }
            }
        }
        if !text.is_empty() {
            out.push(
                text.split(|c: char| c.is_whitespace() || c == ';' || c == '/')
                    .filter(|t| t.contains(".svc.cluster.local"))
                    .map(str::to_string)
                    .collect(),
            );
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn built_objects_keep_the_policy(raw in stack_strategy()) {
        let cr: OpsConductorStack = serde_json::from_value(raw).unwrap();
        let stack = validate(&cr, "default").expect("generated stacks are valid");
        let bundle = build(&stack, &BuildOptions::default());

        // 1. Only the gateway Service leaves the cluster.
        let gateway_name = "prop-gateway";
        for svc in &bundle.services {
            let name = svc.metadata.name.as_deref().unwrap();
            let spec = svc.spec.as_ref().unwrap();
            if name == gateway_name {
                prop_assert!(matches!(spec.type_.as_deref(), Some("LoadBalancer" | "NodePort")));
            } else {
                prop_assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
                prop_assert!(spec.ports.iter().flatten().all(|p| p.node_port.is_none()));
            }
            prop_assert!(spec.external_ips.as_ref().is_none_or(|ips| ips.is_empty()));
            prop_assert!(spec.load_balancer_ip.is_none());
        }
        prop_assert_eq!(bundle.services.iter().filter(|s| s.spec.as_ref().unwrap().type_.as_deref() != Some("ClusterIP")).count(), 1);

        // 2. No pod touches the host.
        let pods: Vec<(&Deployment, BTreeMap<String, String>)> = bundle
            .deployments
            .iter()
            .map(|d| {
                let t = &d.spec.as_ref().unwrap().template;
                (d, t.metadata.as_ref().unwrap().labels.clone().unwrap())
            })
            .collect();
        for (d, _) in &pods {
            let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
            prop_assert_ne!(pod.host_network, Some(true));
            prop_assert_ne!(pod.host_pid, Some(true));
            prop_assert_ne!(pod.host_ipc, Some(true));
            for c in &pod.containers {
                prop_assert!(c.ports.iter().flatten().all(|p| p.host_port.is_none()));
                let sc = c.security_context.as_ref().unwrap();
                prop_assert_eq!(sc.read_only_root_filesystem, Some(true));
                prop_assert_eq!(sc.allow_privilege_escalation, Some(false));
                prop_assert_eq!(sc.run_as_non_root, Some(true));
            }
        }
        prop_assert_eq!(pods.len(), stack.services.len() + 1);

        // 3. Every stack pod is default-deny both ways.
        for (d, labels) in &pods {
            prop_assert!(
                bundle.network_policies.iter().any(|p| selects(p, labels) && is_default_deny_both_ways(p)),
                "{} is not selected by a default-deny policy", d.metadata.name.as_deref().unwrap()
            );
        }

        // 4. Every route reaches exactly its service.
        let conf = bundle.config_maps[0].data.as_ref().unwrap()["nginx.conf"].clone();
        for svc in &stack.services {
            if let Some(route) = &svc.route {
                let expected = format!("{}.ns1.svc.cluster.local:{}", svc.name, svc.port);
                // Each upstream lists its one address twice (one retry on a new connection,
                // docs/gateway.md): the same target, never another.
                let mut targets = targets_of_route(&conf, route);
                for t in &mut targets {
                    t.dedup();
                }
                prop_assert_eq!(targets, vec![vec![expected]]);
            }
        }
        let all_services: Vec<&Service> = bundle.services.iter().collect();
        prop_assert_eq!(all_services.len(), stack.services.len() + 1);
    }
}
