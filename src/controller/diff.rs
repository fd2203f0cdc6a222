//! Does an object already hold what we would apply? Pure, so it is tested without a cluster.
//!
//! Server-side apply only owns the fields we send, so the question is not "are the objects
//! equal" (the API server adds defaults, status and fields of other managers) but "does every
//! field we set have our value". Two details make that answer match what an apply would do:
//!
//! - A zero value we send (`false`, `0`, `""`, `[]`, `{}`) matches an absent field: the API
//!   server omits empty values when it serializes, so `hostNetwork: false` reads back as
//!   nothing.
//! - Lists come in two shapes. Atomic lists (NetworkPolicy rules, `command`, `externalIPs`,
//!   every list of scalars) are replaced whole by a forced apply, so they must be equal in
//!   length and element by element; an extra rule someone added is drift. Keyed lists
//!   (containers, ports, env, volumes, ownerReferences) are merged by key, so elements other
//!   managers added are theirs and are not ours to compare: each of our elements must be
//!   found, in order.

use serde_json::Value;

/// True when applying `desired` to `actual` would change nothing that we own.
pub fn holds(actual: &Value, desired: &Value) -> bool {
    contains(actual, desired, false)
}

/// Like [`holds`], but `spec` must be exactly ours: no field, label or rule of anyone else.
/// Used for NetworkPolicies, where any addition (an extra rule, an extra selector label that
/// narrows a default-deny) weakens the policy.
pub fn holds_exactly(actual: &Value, desired: &Value) -> bool {
    let Value::Object(d) = desired else {
        return holds(actual, desired);
    };
    d.iter().all(|(key, dv)| {
        let av = actual.get(key).unwrap_or(&Value::Null);
        contains(av, dv, key == "spec")
    })
}

fn contains(actual: &Value, desired: &Value, atomic: bool) -> bool {
    match (desired, actual) {
        (Value::Object(d), Value::Object(a)) => {
            d.iter().all(|(key, dv)| match a.get(key) {
                Some(av) => contains(av, dv, atomic || is_atomic_field(key)),
                None => is_zero(dv),
            }) && (!atomic || a.iter().all(|(key, av)| d.contains_key(key) || is_zero(av)))
        }
        (Value::Array(d), Value::Array(a)) => {
            let scalars = d
                .iter()
                .chain(a.iter())
                .all(|v| !v.is_object() && !v.is_array());
            if atomic || scalars {
                d.len() == a.len() && d.iter().zip(a).all(|(dv, av)| contains(av, dv, true))
            } else {
                // Keyed list: our elements, in order, as a subsequence of the actual list.
                let mut rest = a.iter();
                d.iter().all(|dv| rest.any(|av| contains(av, dv, false)))
            }
        }
        (d, Value::Null) => is_zero(d),
        (Value::Number(d), Value::Number(a)) => d.as_f64() == a.as_f64(),
        (d, a) => d == a,
    }
}

/// Fields whose whole subtree is replaced, not merged, by an apply.
fn is_atomic_field(key: &str) -> bool {
    matches!(
        key,
        "ingress" | "egress" | "policyTypes" | "matchExpressions"
    )
}

fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_zero),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn server_defaults_and_other_fields_are_ignored() {
        let desired =
            json!({"spec": {"type": "ClusterIP", "ports": [{"port": 80, "protocol": "TCP"}]}});
        let actual = json!({"spec": {"type": "ClusterIP", "clusterIP": "10.96.0.9",
            "ports": [{"port": 80, "protocol": "TCP", "targetPort": 80}], "sessionAffinity": "None"},
            "status": {}});
        assert!(holds(&actual, &desired));
    }

    #[test]
    fn a_changed_value_is_drift() {
        let desired = json!({"spec": {"type": "ClusterIP"}});
        assert!(!holds(&json!({"spec": {"type": "NodePort"}}), &desired));
        assert!(!holds(
            &json!({"spec": {}}),
            &json!({"spec": {"replicas": 2}})
        ));
    }

    #[test]
    fn zero_values_match_absent_fields() {
        let desired = json!({"spec": {"hostNetwork": false, "externalIPs": [], "labels": {}}});
        assert!(holds(&json!({"spec": {}}), &desired));
        assert!(!holds(&json!({"spec": {"hostNetwork": true}}), &desired));
        assert!(!holds(
            &json!({"spec": {"externalIPs": ["203.0.113.9"]}}),
            &desired
        ));
    }

    #[test]
    fn keyed_lists_allow_elements_of_other_managers() {
        let desired = json!({"containers": [{"name": "app", "image": "a:1"}]});
        let actual = json!({"containers": [{"name": "sidecar", "image": "s:1"}, {"name": "app", "image": "a:1", "imagePullPolicy": "IfNotPresent"}]});
        assert!(holds(&actual, &desired));
        let changed = json!({"containers": [{"name": "app", "image": "a:2"}]});
        assert!(!holds(&changed, &desired));
    }

    #[test]
    fn atomic_lists_must_be_equal() {
        let desired = json!({"spec": {"ingress": [{"from": [{"podSelector": {"matchLabels": {"a": "b"}}}]}]}});
        let widened = json!({"spec": {"ingress": [{"from": [{"podSelector": {"matchLabels": {"a": "b"}}}]}, {}]}});
        assert!(!holds(&widened, &desired), "an extra ingress rule is drift");
        let opened = json!({"spec": {"ingress": [{"from": [{"podSelector": {"matchLabels": {"a": "b"}}}, {"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}});
        assert!(!holds(&opened, &desired), "an extra peer is drift");
        assert!(holds(&desired, &desired));
        let scalars = json!({"command": ["nginx", "-c", "x"]});
        assert!(!holds(
            &json!({"command": ["nginx", "-c", "x", "-g", "y"]}),
            &scalars
        ));
    }

    #[test]
    fn exact_specs_reject_additions() {
        let desired = json!({"metadata": {"labels": {"a": "b"}}, "spec": {"podSelector": {"matchLabels": {"stack": "s"}}, "policyTypes": ["Ingress"]}});
        let narrowed = json!({"metadata": {"labels": {"a": "b", "other": "x"}}, "spec": {"podSelector": {"matchLabels": {"stack": "s", "x": "y"}}, "policyTypes": ["Ingress"]}});
        assert!(
            holds(&narrowed, &desired),
            "a merge view ignores the extra selector label"
        );
        assert!(
            !holds_exactly(&narrowed, &desired),
            "an exact spec does not"
        );
        let same_with_other_labels = json!({"metadata": {"labels": {"a": "b", "other": "x"}}, "spec": {"podSelector": {"matchLabels": {"stack": "s"}}, "policyTypes": ["Ingress"]}});
        assert!(
            holds_exactly(&same_with_other_labels, &desired),
            "metadata still merges"
        );
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(holds(&json!({"a": 1.0}), &json!({"a": 1})));
    }
}
