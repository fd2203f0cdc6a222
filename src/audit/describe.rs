//! NetworkPolicy rules, peers and label selectors as the text of a violation's reason, and
//! label selector matching as the API server does it.

use k8s_openapi::api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use std::collections::BTreeMap;

/// `from` / `to` peers and ports of one rule, in words.
pub(super) fn describe_rule(
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    everyone: &str,
) -> String {
    let who = match peers {
        None | Some([]) => everyone.to_string(),
        Some(peers) => peers
            .iter()
            .map(describe_peer)
            .collect::<Vec<_>>()
            .join(", "),
    };
    let on = match ports {
        None | Some([]) => "any port".to_string(),
        Some(ports) => {
            let p: Vec<String> = ports
                .iter()
                .map(|p| {
                    let proto = p.protocol.as_deref().unwrap_or("TCP");
                    match (&p.port, p.end_port) {
                        (None, _) => format!("{proto} any port"),
                        (Some(port), Some(end)) => format!("{proto} {}-{end}", intstr(port)),
                        (Some(port), None) => format!("{proto} {}", intstr(port)),
                    }
                })
                .collect();
            p.join(", ")
        }
    };
    format!("{who} on {on}")
}

fn intstr(v: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString) -> String {
    match v {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i) => i.to_string(),
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s.clone(),
    }
}

fn describe_peer(peer: &NetworkPolicyPeer) -> String {
    if let Some(block) = &peer.ip_block {
        return match block.except.as_deref() {
            Some(except) if !except.is_empty() => {
                format!("{} except {}", block.cidr, except.join(", "))
            }
            _ => block.cidr.clone(),
        };
    }
    let pods = peer.pod_selector.as_ref().map(describe_selector);
    let namespaces = peer.namespace_selector.as_ref().map(describe_selector);
    match (pods, namespaces) {
        (Some(p), None) => format!("pods {p} in this namespace"),
        (None, Some(n)) => format!("every pod in namespaces {n}"),
        (Some(p), Some(n)) => format!("pods {p} in namespaces {n}"),
        (None, None) => "anywhere".into(),
    }
}

fn describe_selector(s: &LabelSelector) -> String {
    let mut parts: Vec<String> = s
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in s.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            op => format!("{} {} ({values})", e.key, op.to_lowercase()),
        });
    }
    if parts.is_empty() {
        "(all)".into()
    } else {
        format!("with {}", parts.join(", "))
    }
}

/// Kubernetes label-selector semantics: every `matchLabels` pair and every expression must
/// hold; an empty selector selects everything. An unknown operator selects nothing.
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let pairs = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    pairs && expressions
}
