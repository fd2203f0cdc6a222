//! NetworkPolicies: every stack pod is default-deny in both directions; each allowed edge of
//! the service graph is then written on both sides (the caller's egress and the callee's
//! ingress), so the graph holds whichever side a CNI evaluates first.
//!
//! The allowed edges are exactly those of "The policy" in docs/api.md:
//! clients (or `allowedSourceRanges`) -> gateway 8080/8443; `spec.gateway.metrics.allowFrom`
//! -> gateway 9113 and 9114 (the metrics exporters); gateway -> routed services and the
//! verdict service of edge authentication;
//! service -> service per `calls` (or all, with `serviceToService: All`); `allowFrom`
//! services -> backends; every stack pod -> cluster DNS; a service -> its own `egress` CIDRs.
//! Ports are always numeric, never named.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{meta, nginx};
use crate::model::{Port, Service, ServiceToService, Stack};
use crate::names::{self, Component};

/// The namespace and pod labels of the cluster DNS pods (CoreDNS keeps kube-dns's label).
pub const DNS_NAMESPACE: &str = "kube-system";
pub const DNS_POD_LABEL: (&str, &str) = ("k8s-app", "kube-dns");

/// Every NetworkPolicy of the stack. `cluster_cidrs` (the operator's `--cluster-cidrs`) are
/// cut out of the services' egress CIDRs, as [`NEVER_EGRESS`] is.
pub fn network_policies(
    stack: &Stack,
    operator_namespace: Option<&str>,
    cluster_cidrs: &[ipnet::IpNet],
) -> Vec<NetworkPolicy> {
    let mut out = vec![
        default_deny(stack),
        allow_dns(stack),
        gateway(stack, operator_namespace),
    ];
    out.extend(
        stack
            .services
            .iter()
            .map(|s| service(stack, s, cluster_cidrs)),
    );
    out.extend(stack.backends.iter().map(|b| {
        let selects = b.pod_selector.clone();
        let ingress = NetworkPolicyIngressRule {
            from: Some(
                b.allow_from
                    .iter()
                    .map(|s| pods(stack, Component::Service(s)))
                    .collect(),
            ),
            ports: Some(tcp(&b.ports)),
        };
        policy(
            stack,
            names::backend_policy(&stack.name, &b.name),
            selects,
            // Only ingress: the backend's own egress is not the stack's to decide.
            Some(if b.allow_from.is_empty() {
                vec![]
            } else {
                vec![ingress]
            }),
            None,
        )
    }));
    out
}

fn default_deny(stack: &Stack) -> NetworkPolicy {
    policy(
        stack,
        names::default_deny_policy(&stack.name),
        selector(names::stack_pods(&stack.name)),
        Some(vec![]),
        Some(vec![]),
    )
}

fn allow_dns(stack: &Stack) -> NetworkPolicy {
    // Namespace and pod selector in ONE peer: kube-dns pods in kube-system, nothing else.
    let peer = NetworkPolicyPeer {
        namespace_selector: Some(selector(BTreeMap::from([(
            "kubernetes.io/metadata.name".to_string(),
            DNS_NAMESPACE.to_string(),
        )]))),
        pod_selector: Some(selector(BTreeMap::from([(
            DNS_POD_LABEL.0.to_string(),
            DNS_POD_LABEL.1.to_string(),
        )]))),
        ..NetworkPolicyPeer::default()
    };
    let ports = ["UDP", "TCP"]
        .into_iter()
        .map(|proto| NetworkPolicyPort {
            protocol: Some(proto.into()),
            port: Some(IntOrString::Int(53)),
            ..NetworkPolicyPort::default()
        })
        .collect();
    policy(
        stack,
        names::dns_policy(&stack.name),
        selector(names::stack_pods(&stack.name)),
        None,
        Some(vec![NetworkPolicyEgressRule {
            to: Some(vec![peer]),
            ports: Some(ports),
        }]),
    )
}

/// Labels every operator pod of the Helm chart carries, whatever the release is called.
pub const OPERATOR_POD_LABELS: [(&str, &str); 2] = [
    ("app.kubernetes.io/component", "operator"),
    ("app.kubernetes.io/part-of", "opsconductor"),
];

/// Ranges a service's egress never reaches, even inside a wider CIDR it declares: link-local
/// addresses (the node's link-local services and the cloud metadata service at
/// 169.254.169.254) and the IPv6 metadata address some clouds use. Validation refuses egress
/// CIDRs inside them; these are cut out of wider ones.
pub const NEVER_EGRESS: [&str; 3] = ["169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128"];

/// The [`NEVER_EGRESS`] ranges, then the cluster's own ranges, inside `cidr`: its `except`
/// list, each range once.
fn except_within(cidr: &ipnet::IpNet, cluster_cidrs: &[ipnet::IpNet]) -> Option<Vec<String>> {
    let mut within: Vec<String> = Vec::new();
    let ranges = NEVER_EGRESS
        .iter()
        .map(|r| r.parse::<ipnet::IpNet>().expect("a valid CIDR"))
        .chain(cluster_cidrs.iter().map(|r| r.trunc()));
    for r in ranges.filter(|r| cidr.contains(r) && r != cidr) {
        if !within.contains(&r.to_string()) {
            within.push(r.to_string());
        }
    }
    (!within.is_empty()).then_some(within)
}

fn gateway(stack: &Stack, operator_namespace: Option<&str>) -> NetworkPolicy {
    let sources = &stack.gateway.allowed_source_ranges;
    let from = (!sources.is_empty()).then(|| {
        sources
            .iter()
            .map(|cidr| NetworkPolicyPeer {
                ip_block: Some(IPBlock {
                    cidr: cidr.to_string(),
                    except: None,
                }),
                ..NetworkPolicyPeer::default()
            })
            .collect()
    });
    let mut ingress = vec![NetworkPolicyIngressRule {
        from,
        ports: Some(tcp(&[nginx::HTTP_PORT as Port, nginx::HTTPS_PORT as Port])),
    }];
    // With source ranges, the operator's own ACME self-check (a GET of the challenge path on
    // port 8080 through the gateway Service) would be cut off: let the operator's pods in.
    let acme = matches!(stack.tls.source, crate::model::CertificateSource::Acme(_));
    if let (true, false, Some(ns)) = (acme, sources.is_empty(), operator_namespace) {
        ingress.push(NetworkPolicyIngressRule {
            from: Some(vec![operator_pods(ns)]),
            ports: Some(tcp(&[nginx::HTTP_PORT as Port])),
        });
    }
    // The reload loop's result, from the operator's pods and nobody else: the operator reads
    // it for the GatewayConfigLoaded condition.
    if let Some(ns) = operator_namespace {
        ingress.push(NetworkPolicyIngressRule {
            from: Some(vec![operator_pods(ns)]),
            ports: Some(tcp(&[nginx::CONFIG_STATUS_PORT as Port])),
        });
    }
    // The exporter's metrics port, from the scrapers the spec names and nobody else.
    if let Some(metrics) = &stack.gateway.metrics {
        ingress.push(NetworkPolicyIngressRule {
            from: Some(
                metrics
                    .allow_from
                    .iter()
                    .map(|a| NetworkPolicyPeer {
                        namespace_selector: Some(a.namespace_selector.clone()),
                        pod_selector: a.pod_selector.clone(),
                        ..NetworkPolicyPeer::default()
                    })
                    .collect(),
            ),
            ports: Some(tcp(&[
                super::gateway::METRICS_PORT as Port,
                super::gateway::REQUEST_METRICS_PORT as Port,
            ])),
        });
    }
    let egress = stack
        .services
        .iter()
        .filter(|s| stack.gateway_reaches(s))
        .map(|s| NetworkPolicyEgressRule {
            to: Some(vec![pods(stack, Component::Service(&s.name))]),
            ports: Some(tcp(&[s.port])),
        })
        .collect();
    policy(
        stack,
        names::gateway_policy(&stack.name),
        selector(names::selector(&stack.name, Component::Gateway)),
        Some(ingress),
        Some(egress),
    )
}

/// The operator's pods: the chart's pod labels in the operator's namespace.
fn operator_pods(namespace: &str) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(selector(BTreeMap::from([(
            "kubernetes.io/metadata.name".to_string(),
            namespace.to_string(),
        )]))),
        pod_selector: Some(selector(
            OPERATOR_POD_LABELS
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )),
        ..NetworkPolicyPeer::default()
    }
}

/// Services that `svc` may call.
fn callees<'a>(stack: &'a Stack, svc: &'a Service) -> Vec<&'a Service> {
    match stack.service_to_service {
        ServiceToService::All => stack.services.iter().collect(),
        ServiceToService::Declared => svc.calls.iter().filter_map(|c| stack.service(c)).collect(),
    }
}

fn service(stack: &Stack, svc: &Service, cluster_cidrs: &[ipnet::IpNet]) -> NetworkPolicy {
    let mut from = Vec::new();
    if stack.gateway_reaches(svc) {
        from.push(pods(stack, Component::Gateway));
    }
    for caller in &stack.services {
        if callees(stack, caller).iter().any(|c| c.name == svc.name) {
            from.push(pods(stack, Component::Service(&caller.name)));
        }
    }
    let ingress = if from.is_empty() {
        vec![]
    } else {
        vec![NetworkPolicyIngressRule {
            from: Some(from),
            ports: Some(tcp(&[svc.port])),
        }]
    };

    let mut egress: Vec<NetworkPolicyEgressRule> = callees(stack, svc)
        .into_iter()
        .map(|callee| NetworkPolicyEgressRule {
            to: Some(vec![pods(stack, Component::Service(&callee.name))]),
            ports: Some(tcp(&[callee.port])),
        })
        .collect();
    for backend in stack
        .backends
        .iter()
        .filter(|b| b.allow_from.contains(&svc.name))
    {
        egress.push(NetworkPolicyEgressRule {
            to: Some(vec![NetworkPolicyPeer {
                pod_selector: Some(backend.pod_selector.clone()),
                ..NetworkPolicyPeer::default()
            }]),
            ports: Some(tcp(&backend.ports)),
        });
    }
    for e in &svc.egress {
        egress.push(NetworkPolicyEgressRule {
            to: Some(vec![NetworkPolicyPeer {
                ip_block: Some(IPBlock {
                    cidr: e.cidr.to_string(),
                    except: except_within(&e.cidr, cluster_cidrs),
                }),
                ..NetworkPolicyPeer::default()
            }]),
            ports: Some(tcp(&e.ports)),
        });
    }
    policy(
        stack,
        names::service_policy(&stack.name, &svc.name),
        selector(names::selector(&stack.name, Component::Service(&svc.name))),
        Some(ingress),
        Some(egress),
    )
}

/// A policy with explicit `policyTypes`: a direction is listed exactly when its rules are
/// given (an empty list of rules denies that direction).
fn policy(
    stack: &Stack,
    name: String,
    pod_selector: LabelSelector,
    ingress: Option<Vec<NetworkPolicyIngressRule>>,
    egress: Option<Vec<NetworkPolicyEgressRule>>,
) -> NetworkPolicy {
    let mut types = Vec::new();
    if ingress.is_some() {
        types.push("Ingress".to_string());
    }
    if egress.is_some() {
        types.push("Egress".to_string());
    }
    NetworkPolicy {
        metadata: meta(stack, name, Component::Policy),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(pod_selector),
            policy_types: Some(types),
            ingress,
            egress,
        }),
    }
}

fn pods(stack: &Stack, component: Component<'_>) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        pod_selector: Some(selector(names::selector(&stack.name, component))),
        ..NetworkPolicyPeer::default()
    }
}

fn selector(labels: BTreeMap<String, String>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels),
        ..LabelSelector::default()
    }
}

fn tcp(ports: &[Port]) -> Vec<NetworkPolicyPort> {
    ports
        .iter()
        .map(|p| NetworkPolicyPort {
            protocol: Some("TCP".into()),
            port: Some(IntOrString::Int(i32::from(*p))),
            ..NetworkPolicyPort::default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::OpsConductorStack;

    fn stack(tls: &str, ranges: &str) -> Stack {
        let yaml = format!(
            "apiVersion: opsconductor.io/v1alpha1\nkind: OpsConductorStack\nmetadata: {{name: s, namespace: ns}}\n\
             spec:\n  gateway: {{hosts: [a.example.com], allowedSourceRanges: {ranges}}}\n  tls: {tls}\n\
             \x20 services: [{{name: web, image: w, route: /}}]\n"
        );
        let cr: OpsConductorStack = serde_yaml::from_str(&yaml).unwrap();
        crate::validate::validate(&cr, "ns").unwrap()
    }

    fn gateway_ingress(stack: &Stack, operator_ns: Option<&str>) -> Vec<NetworkPolicyIngressRule> {
        let policies = network_policies(stack, operator_ns, &[]);
        let gw = policies
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some("s-gateway"))
            .unwrap();
        gw.spec.as_ref().unwrap().ingress.clone().unwrap()
    }

    const ACME: &str =
        "{acme: {directoryUrl: 'https://ca.example/dir', acceptTermsOfService: true}}";

    #[test]
    fn the_acme_self_check_passes_source_ranges_from_the_operator_pods_only() {
        let rules = gateway_ingress(&stack(ACME, "[192.0.2.0/24]"), Some("opsconductor-system"));
        // Clients, the self-check, the reload loop's result.
        assert_eq!(rules.len(), 3);
        let peer = &rules[1].from.as_ref().unwrap()[0];
        let ns = peer
            .namespace_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap();
        assert_eq!(ns["kubernetes.io/metadata.name"], "opsconductor-system");
        assert_eq!(
            peer.pod_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["app.kubernetes.io/component"],
            "operator"
        );
        assert_eq!(rules[1].ports.as_ref().unwrap().len(), 1, "8080 only");
    }

    #[test]
    fn the_metrics_port_admits_exactly_the_scrapers_named() {
        let with = |metrics: &str| {
            let yaml = format!(
                "apiVersion: opsconductor.io/v1alpha1\nkind: OpsConductorStack\nmetadata: {{name: s, namespace: ns}}\n\
                 spec:\n  gateway: {{hosts: [a.example.com], allowedSourceRanges: [192.0.2.0/24]{metrics}}}\n\
                 \x20 tls: {{secretName: c}}\n  services: [{{name: web, image: w, route: /}}]\n"
            );
            let cr: OpsConductorStack = serde_yaml::from_str(&yaml).unwrap();
            gateway_ingress(&crate::validate::validate(&cr, "ns").unwrap(), Some("o"))
        };
        let without = with("");
        assert_eq!(without.len(), 2, "clients, the reload loop's result");
        assert_eq!(with(", metrics: {enabled: false}"), without);
        let rules = with(
            ", metrics: {enabled: true, allowFrom: [\
             {namespaceSelector: {matchLabels: {team: obs}}, podSelector: {matchLabels: {app: prom}}}, \
             {namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ops}}}]}",
        );
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[..2], without[..], "the other rules are unchanged");
        let metrics = &rules[2];
        assert_eq!(metrics.ports, Some(tcp(&[9113, 9114])));
        let peers = metrics.from.as_ref().unwrap();
        assert_eq!(peers.len(), 2);
        let labels =
            |s: &Option<LabelSelector>| s.as_ref().map(|s| s.match_labels.clone().unwrap());
        assert_eq!(
            labels(&peers[0].namespace_selector),
            Some(BTreeMap::from([("team".to_string(), "obs".to_string())]))
        );
        assert_eq!(
            labels(&peers[0].pod_selector),
            Some(BTreeMap::from([("app".to_string(), "prom".to_string())]))
        );
        assert_eq!(peers[1].pod_selector, None);
        assert!(peers.iter().all(|p| p.ip_block.is_none()));
    }

    #[test]
    fn no_extra_rule_without_source_ranges_acme_or_a_known_operator_namespace() {
        assert_eq!(
            gateway_ingress(&stack(ACME, "[]"), Some("opsconductor-system")).len(),
            2,
            "clients, the reload loop's result"
        );
        assert_eq!(
            gateway_ingress(&stack("{secretName: c}", "[192.0.2.0/24]"), Some("o")).len(),
            2
        );
        assert_eq!(
            gateway_ingress(&stack(ACME, "[192.0.2.0/24]"), None).len(),
            1
        );
    }

    /// The reload loop's result port admits the operator's pods, nobody else, and only that port.
    #[test]
    fn the_reload_result_is_open_to_the_operator_pods_only() {
        for tls in [ACME, "{secretName: c}"] {
            let rules = gateway_ingress(&stack(tls, "[]"), Some("opsconductor-system"));
            let rule = rules.last().unwrap();
            assert_eq!(rule.ports, Some(tcp(&[nginx::CONFIG_STATUS_PORT as Port])));
            assert_eq!(rule.from, Some(vec![operator_pods("opsconductor-system")]));
            // (The peer itself is checked by the self-check test above.)
            // No other rule opens that port.
            let opened = rules
                .iter()
                .filter(|r| {
                    r.ports
                        .iter()
                        .flatten()
                        .any(|p| p.port == Some(IntOrString::Int(nginx::CONFIG_STATUS_PORT)))
                })
                .count();
            assert_eq!(opened, 1);
        }
    }

    #[test]
    fn the_clusters_own_ranges_are_cut_out_of_wider_egress() {
        let yaml = "apiVersion: opsconductor.io/v1alpha1\nkind: OpsConductorStack\n\
                    metadata: {name: s, namespace: ns}\n\
                    spec:\n  gateway: {hosts: [a.example.com]}\n  tls: {secretName: own-tls}\n\
                    \x20 services:\n  - {name: web, image: w, route: /, egress: [\
                    {cidr: 0.0.0.0/0, ports: [443], allowWide: true}, \
                    {cidr: 10.0.0.0/8, ports: [5432]}, {cidr: 192.0.2.0/24, ports: [25]}]}\n";
        let cr: OpsConductorStack = serde_yaml::from_str(yaml).unwrap();
        let stack = crate::validate::validate(&cr, "ns").unwrap();
        let cluster: Vec<ipnet::IpNet> = ["10.244.0.0/16", "10.96.0.0/12", "fd00:10:96::/112"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        let excepts = |cluster: &[ipnet::IpNet]| -> Vec<Option<Vec<String>>> {
            let policies = network_policies(&stack, None, cluster);
            let web = policies
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some("s-svc-web"))
                .unwrap();
            web.spec
                .as_ref()
                .unwrap()
                .egress
                .as_ref()
                .unwrap()
                .iter()
                .filter_map(|r| {
                    r.to.as_ref()?[0]
                        .ip_block
                        .as_ref()
                        .map(|b| b.except.clone())
                })
                .collect()
        };
        let strings = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            excepts(&cluster),
            vec![
                strings(&["169.254.0.0/16", "10.244.0.0/16", "10.96.0.0/12"]),
                strings(&["10.244.0.0/16", "10.96.0.0/12"]),
                None,
            ]
        );
        // Without --cluster-cidrs: as before, only the link-local range.
        assert_eq!(excepts(&[]), vec![strings(&["169.254.0.0/16"]), None, None]);
    }
}
