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
//!   found, in order. Except where an addition changes what runs or what is exposed
//!   ([`is_closed_list`]: containers, volumes, mounts, ports): there an element someone else
//!   added is drift, like a sidecar that could mount the TLS key or an extra port on the
//!   gateway Service.
//! - Some fields we never set must stay unset ([`is_closed_field`]: init and ephemeral
//!   containers, `envFrom`, host namespaces, ...), and a `securityContext` must be exactly
//!   ours (an added capability or `privileged: true` is drift).
//! - Where being present means something, present-but-empty is not absent: a label map's
//!   entry with an empty value is a label (`matchLabels: {tier: ""}` narrows a selector), and an
//!   empty `podSelector` or `namespaceSelector` selects everything (a peer given
//!   `namespaceSelector: {}` admits the pods of every namespace). The API server keeps both as
//!   written.
//!
//! [`holds_exactly`] is the one answer to "is this object exactly ours": apply uses it before
//! writing a NetworkPolicy, and the violation audit ([`crate::audit`]) to report a managed
//! NetworkPolicy that others changed, so that the audit never reports what apply would not
//! revert.

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
                Some(av) if is_closed_list(key) => contains_closed(av, dv),
                Some(av) if is_label_map(key) => contains_labels(av, dv, atomic),
                Some(av) => contains(av, dv, atomic || is_atomic_field(key)),
                None => reads_as_absent(key, dv),
            }) && a.iter().all(|(key, av)| {
                d.contains_key(key)
                    || reads_as_absent(key, av)
                    || !(atomic || is_closed_field(key) || is_closed_list(key))
            })
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

/// Fields whose whole subtree is replaced, not merged, by an apply, or must be exactly ours.
fn is_atomic_field(key: &str) -> bool {
    matches!(
        key,
        "ingress" | "egress" | "policyTypes" | "matchExpressions" | "securityContext"
    )
}

/// Keyed lists where an element someone else added is drift: what runs in a pod, what it
/// mounts, and which ports are open.
fn is_closed_list(key: &str) -> bool {
    matches!(key, "containers" | "volumes" | "volumeMounts" | "ports")
}

/// Fields the operator never sets that must stay unset: each would change what a pod runs,
/// reads or shares with the node.
fn is_closed_field(key: &str) -> bool {
    matches!(
        key,
        "initContainers"
            | "ephemeralContainers"
            | "envFrom"
            | "hostNetwork"
            | "hostPID"
            | "hostIPC"
            | "hostUsers"
            | "shareProcessNamespace"
            | "hostAliases"
            | "externalIPs"
    )
}

/// A closed keyed list: ours, element by element (each may have fields of others, such as
/// defaults), and nothing more.
fn contains_closed(actual: &Value, desired: &Value) -> bool {
    match (desired, actual) {
        (Value::Array(d), Value::Array(a)) => {
            d.len() == a.len() && d.iter().zip(a).all(|(dv, av)| contains(av, dv, false))
        }
        (d, a) => contains(a, d, false),
    }
}

/// Maps from label keys to values, where every entry counts, whatever its value.
fn is_label_map(key: &str) -> bool {
    matches!(key, "labels" | "matchLabels" | "nodeSelector")
}

/// Label selectors of a NetworkPolicy: present and empty, they select everything.
fn is_selector(key: &str) -> bool {
    matches!(key, "podSelector" | "namespaceSelector")
}

/// Our labels, each with its value; in an atomic subtree no label of anyone else either.
fn contains_labels(actual: &Value, desired: &Value, atomic: bool) -> bool {
    let empty = serde_json::Map::new();
    let (Some(d), Some(a)) = (
        desired.as_object().or(desired.is_null().then_some(&empty)),
        actual.as_object().or(actual.is_null().then_some(&empty)),
    ) else {
        return desired == actual;
    };
    d.iter().all(|(k, dv)| a.get(k) == Some(dv)) && (!atomic || a.keys().all(|k| d.contains_key(k)))
}

/// Whether `value`, the value of `key`, reads back from the API server as if absent.
fn reads_as_absent(key: &str, value: &Value) -> bool {
    if value.is_null() {
        return true;
    }
    if is_selector(key) {
        return false;
    }
    if is_label_map(key) {
        return value.as_object().is_some_and(|o| o.is_empty());
    }
    is_zero(value)
}

fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.iter().all(|(k, v)| reads_as_absent(k, v)),
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
        let desired = json!({"env": [{"name": "A", "value": "1"}]});
        let actual = json!({"env": [{"name": "B", "value": "2"}, {"name": "A", "value": "1"}]});
        assert!(holds(&actual, &desired));
        let changed = json!({"env": [{"name": "A", "value": "2"}]});
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
    fn additions_to_what_runs_or_is_exposed_are_drift() {
        let desired = json!({"spec": {"template": {"spec": {
            "hostNetwork": false,
            "containers": [{"name": "app", "image": "a:1", "ports": [{"containerPort": 8000}],
                "securityContext": {"capabilities": {"drop": ["ALL"]}, "privileged": false}}],
            "volumes": [{"name": "tmp", "emptyDir": {}}]}}}});
        let defaulted = json!({"spec": {"template": {"spec": {
            "dnsPolicy": "ClusterFirst",
            "containers": [{"name": "app", "image": "a:1", "imagePullPolicy": "IfNotPresent",
                "ports": [{"containerPort": 8000, "protocol": "TCP"}],
                "securityContext": {"capabilities": {"drop": ["ALL"]}}}],
            "volumes": [{"name": "tmp", "emptyDir": {}}]}}}});
        assert!(holds(&defaulted, &desired), "server defaults are not drift");
        let with = |f: &dyn Fn(&mut Value)| {
            let mut v = defaulted.clone();
            f(&mut v["spec"]["template"]["spec"]);
            v
        };
        let additions = [
            (
                "a sidecar",
                with(&|s| {
                    s["containers"]
                        .as_array_mut()
                        .unwrap()
                        .push(json!({"name": "side", "image": "s:1"}))
                }),
            ),
            (
                "an init container",
                with(&|s| s["initContainers"] = json!([{"name": "i", "image": "i:1"}])),
            ),
            (
                "a hostPath volume",
                with(&|s| {
                    s["volumes"]
                        .as_array_mut()
                        .unwrap()
                        .push(json!({"name": "h", "hostPath": {"path": "/"}}))
                }),
            ),
            (
                "a mount",
                with(&|s| {
                    s["containers"][0]["volumeMounts"] = json!([{"name": "h", "mountPath": "/h"}])
                }),
            ),
            (
                "an extra port",
                with(&|s| {
                    s["containers"][0]["ports"]
                        .as_array_mut()
                        .unwrap()
                        .push(json!({"containerPort": 22}))
                }),
            ),
            (
                "envFrom",
                with(&|s| s["containers"][0]["envFrom"] = json!([{"secretRef": {"name": "x"}}])),
            ),
            (
                "an added capability",
                with(&|s| {
                    s["containers"][0]["securityContext"]["capabilities"]["add"] =
                        json!(["NET_ADMIN"])
                }),
            ),
            (
                "privileged",
                with(&|s| s["containers"][0]["securityContext"]["privileged"] = json!(true)),
            ),
            ("hostPID", with(&|s| s["hostPID"] = json!(true))),
        ];
        for (what, actual) in additions {
            assert!(!holds(&actual, &desired), "{what} must be drift");
        }
        let service = json!({"spec": {"ports": [{"name": "https", "port": 443}]}});
        let extra = json!({"spec": {"ports": [{"name": "https", "port": 443, "nodePort": 31000}, {"name": "ssh", "port": 22}]}});
        assert!(!holds(&extra, &service), "an extra Service port is drift");
        let allocated = json!({"spec": {"ports": [{"name": "https", "port": 443, "nodePort": 31000}], "clusterIP": "10.0.0.1"}});
        assert!(holds(&allocated, &service));
    }

    #[test]
    fn present_but_empty_is_not_absent_where_it_means_something() {
        let desired = json!({"spec": {"podSelector": {"matchLabels": {"stack": "s"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "gw"}}}]}]}});
        assert!(holds_exactly(&desired, &desired));
        let narrowed = json!({"spec": {"podSelector": {"matchLabels": {"stack": "s", "x": ""}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "gw"}}}]}]}});
        assert!(
            !holds_exactly(&narrowed, &desired),
            "an empty-valued label narrows the selector"
        );
        let widened = json!({"spec": {"podSelector": {"matchLabels": {"stack": "s"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "gw"}},
                "namespaceSelector": {}}]}]}});
        assert!(
            !holds_exactly(&widened, &desired),
            "an empty namespaceSelector admits every namespace"
        );
        // Elsewhere an empty map still reads as absent (the API server drops it).
        let read_back = json!({"spec": {"podSelector": {"matchLabels": {"stack": "s"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "gw"}}}], "ports": []}]}});
        assert!(holds_exactly(&read_back, &desired));
        let no_labels = json!({"metadata": {"labels": {}}});
        assert!(holds(&json!({"metadata": {}}), &no_labels));
        // In a merged subtree others may add labels, empty-valued ones too.
        let merged = json!({"metadata": {"labels": {"a": "b", "other": ""}}});
        assert!(holds(&merged, &json!({"metadata": {"labels": {"a": "b"}}})));
        assert!(!holds(
            &json!({"metadata": {"labels": {}}}),
            &json!({"metadata": {"labels": {"a": ""}}})
        ));
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(holds(&json!({"a": 1.0}), &json!({"a": 1})));
    }
}
