//! Dangerous values in a stack's spec (issue 14, item 7 and section 8): egress CIDRs that
//! reach the node or the cloud's metadata service, backend selectors the API server would
//! refuse or that select the stack's own pods, and Secret values echoed in error messages.
//! Where the API server is the reference (selectors, the NetworkPolicies built), the real
//! control plane is asked.

mod support;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::PostParams;
use opsconductor_operator::build::{self, BuildOptions};
use opsconductor_operator::render::parse_stack;
use opsconductor_operator::validate::validate;
use serde_json::{Value, json};
use support::TestNamespace;
use support::operator::install_crd;

fn stack(services_egress: Value, backends: Value) -> Value {
    json!({
        "apiVersion": "opsconductor.io/v1alpha1",
        "kind": "OpsConductorStack",
        "metadata": {"name": "prod", "namespace": "shop"},
        "spec": {
            "gateway": {"hosts": ["ops.example.com"]},
            "tls": {"secretName": "own"},
            "services": [
                {"name": "auth", "image": "auth:1", "route": "/", "egress": services_egress},
            ],
            "backends": backends,
        }
    })
}

/// Every problem validation reports for `v`, one per line (empty when it is valid).
fn problems(v: &Value) -> String {
    let s = parse_stack("t", &serde_json::to_string(v).unwrap()).unwrap();
    match validate(&s, "shop") {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

/// One egress rule; wide prefixes are granted explicitly (`allowWide`, which never lets a
/// link-local or loopback range through).
fn egress(cidr: &str) -> Value {
    json!([{"cidr": cidr, "ports": [443], "allowWide": true}])
}

#[test]
fn egress_to_link_local_or_loopback_addresses_is_refused() {
    for cidr in [
        "169.254.169.254/32",
        "169.254.0.0/16",
        "169.254.170.0/24",
        "127.0.0.1/32",
        "127.0.0.0/8",
        "::1/128",
        "fe80::/10",
        "fe80::1/128",
    ] {
        let p = problems(&stack(egress(cidr), json!([])));
        assert!(
            p.contains("spec.services[0].egress[0].cidr") && p.contains(cidr),
            "egress to {cidr} must be refused with its field path, got: {p:?}"
        );
    }
    assert_eq!(problems(&stack(egress("10.20.0.0/16"), json!([]))), "");
}

/// The service's NetworkPolicy for a wide egress prefix (and the except list the operator
/// added to it).
fn egress_block(cidr: &str) -> (NetworkPolicy, Vec<String>) {
    let v = stack(egress(cidr), json!([]));
    let s = parse_stack("t", &serde_json::to_string(&v).unwrap()).unwrap();
    let model = validate(&s, "shop").unwrap_or_else(|e| panic!("{cidr}: {e}"));
    let bundle = build::build(&model, &BuildOptions::default());
    let policy = bundle
        .network_policies
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("prod-svc-auth"))
        .unwrap()
        .clone();
    let except = policy
        .spec
        .as_ref()
        .unwrap()
        .egress
        .as_ref()
        .unwrap()
        .iter()
        .flat_map(|r| r.to.clone().unwrap_or_default())
        .filter_map(|peer| peer.ip_block)
        .find(|b| b.cidr == cidr)
        .unwrap_or_else(|| panic!("no ipBlock for {cidr}"))
        .except
        .unwrap_or_default();
    (policy, except)
}

#[tokio::test]
async fn wide_egress_never_reaches_link_local_or_metadata_addresses() {
    let mut policies = Vec::new();
    for (cidr, wanted) in [
        ("0.0.0.0/0", &["169.254.0.0/16"][..]),
        ("128.0.0.0/1", &["169.254.0.0/16"][..]),
        ("169.0.0.0/8", &["169.254.0.0/16"][..]),
        ("::/0", &["fe80::/10", "fd00:ec2::254/128"][..]),
    ] {
        let (policy, except) = egress_block(cidr);
        for w in wanted {
            assert!(
                except.iter().any(|e| e == w),
                "egress to {cidr} must except {w}: {except:?}"
            );
        }
        policies.push(policy);
    }
    let (_, except) = egress_block("10.0.0.0/8");
    assert!(except.is_empty(), "{except:?}");
    // The API server accepts what was built (every except inside its CIDR).
    let Some(ns) = TestNamespace::new("egress-except").await else {
        return;
    };
    for (i, mut policy) in policies.into_iter().enumerate() {
        policy.metadata.namespace = Some(ns.name.clone());
        policy.metadata.name = Some(format!("egress-{i}"));
        ns.api::<NetworkPolicy>()
            .create(&PostParams::default(), &policy)
            .await
            .unwrap_or_else(|e| panic!("the API server refuses {policy:?}: {e}"));
    }
}

fn with_backend(selector: Value) -> Value {
    stack(
        json!([]),
        json!([{"name": "db", "podSelector": selector, "ports": [5432], "allowFrom": ["auth"]}]),
    )
}

/// Validation must accept exactly the selectors the API server accepts (a selector the API
/// server refuses would fail only when the operator applies the NetworkPolicy).
#[tokio::test]
async fn backend_selectors_are_checked_as_the_api_server_checks_them() {
    let long = "a".repeat(64);
    let selectors = [
        json!({"matchLabels": {"app": "postgres"}}),
        json!({"matchLabels": {"example.com/app": "pg-1.2_x"}}),
        json!({"matchLabels": {"app": ""}}),
        json!({"matchLabels": {"app": "bad value!"}}),
        json!({"matchLabels": {"-app": "x"}}),
        json!({"matchLabels": {"Example.com/app": "x"}}),
        json!({"matchLabels": {"a/b/c": "x"}}),
        json!({"matchLabels": {long.clone(): "x"}}),
        json!({"matchLabels": {"app": long}}),
        json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["a", "b"]}]}),
        json!({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["a"]}, {"key": "tier", "operator": "Exists"}]}),
        json!({"matchExpressions": [{"key": "app", "operator": "in", "values": ["a"]}]}),
        json!({"matchExpressions": [{"key": "app", "operator": "Equals", "values": ["a"]}]}),
        json!({"matchExpressions": [{"key": "app", "operator": "In", "values": []}]}),
        json!({"matchExpressions": [{"key": "app", "operator": "In"}]}),
        json!({"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["a"]}]}),
        json!({"matchExpressions": [{"key": "bad key", "operator": "Exists"}]}),
        json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["no spaces"]}]}),
    ];
    let Some(ns) = TestNamespace::new("selectors").await else {
        return;
    };
    let mut disagreements = Vec::new();
    for (i, selector) in selectors.iter().enumerate() {
        let ours = problems(&with_backend(selector.clone()));
        let policy: NetworkPolicy = serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("s{i}"), "namespace": ns.name},
            "spec": {"podSelector": selector, "policyTypes": ["Ingress"]}
        }))
        .unwrap();
        let theirs = ns
            .api::<NetworkPolicy>()
            .create(
                &PostParams {
                    dry_run: true,
                    ..PostParams::default()
                },
                &policy,
            )
            .await;
        let we_accept = ours.is_empty();
        if we_accept != theirs.is_ok() {
            disagreements.push(format!(
                "{selector}: validation says {:?}, the API server says {:?}",
                if we_accept { "ok" } else { ours.as_str() },
                theirs.as_ref().map(|_| "ok").map_err(|e| match e {
                    kube::Error::Api(s) => s.message.clone(),
                    other => other.to_string(),
                })
            ));
        } else if !we_accept {
            assert!(ours.contains("spec.backends[0].podSelector"), "{ours}");
        }
    }
    assert!(disagreements.is_empty(), "{disagreements:#?}");
}

#[test]
fn backend_selectors_that_match_the_stacks_own_pods_are_refused() {
    for selector in [
        json!({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}),
        json!({"matchLabels": {"opsconductor.io/stack": "prod"}}),
        json!({"matchExpressions": [{"key": "opsconductor.io/stack", "operator": "NotIn", "values": ["other"]}]}),
        json!({"matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "In", "values": ["gateway"]}]}),
        json!({"matchLabels": {"app.kubernetes.io/name": "auth"}}),
    ] {
        let p = problems(&with_backend(selector.clone()));
        assert!(
            p.contains("spec.backends[0].podSelector") && p.contains("stack's own pods"),
            "{selector} selects the stack's own pods and must be refused, got {p:?}"
        );
    }
    // Selectors of other workloads stay valid, also when they share a key with stack pods.
    for selector in [
        json!({"matchLabels": {"app": "postgres"}}),
        json!({"matchLabels": {"app.kubernetes.io/name": "postgres"}}),
        json!({"matchExpressions": [{"key": "opsconductor.io/stack", "operator": "Exists"}, {"key": "app", "operator": "In", "values": ["pg"]}]}),
    ] {
        assert_eq!(problems(&with_backend(selector.clone())), "", "{selector}");
    }
}

/// An EAB HMAC key that fails to decode must not have any detail of its value echoed (the
/// message reaches status and Events): no offset, no length, no byte.
#[test]
fn a_bad_eab_key_is_reported_without_any_detail_of_its_value() {
    use opsconductor_operator::acme::user_secrets::decode_hmac;
    for secret in [
        &b"c2VjcmV0LWhtYWMta2V5!x"[..],
        b"abc$def",
        b"a",
        b"\xff\xfe",
        b"c2VjcmV0LWhtYWMta2V5IQ==extra",
    ] {
        let err = decode_hmac(secret).expect_err("not base64");
        let words = err.replace("base64url", "").replace("base64", "");
        assert!(
            !words.chars().any(|c| c.is_ascii_digit()),
            "the error names a position, length or byte of the secret: {err:?}"
        );
        let text = String::from_utf8_lossy(secret);
        assert!(text.len() < 4 || !err.contains(text.as_ref()), "{err:?}");
    }
    assert_eq!(decode_hmac(b"c2VjcmV0").unwrap(), b"secret");
}

/// Issue 14, section 8: the namespace and `--cluster-domain` reach nginx.conf (upstream
/// addresses); both are checked first, so `render` (and `run`) refuse anything but DNS names.
#[test]
fn namespace_and_cluster_domain_are_validated_before_they_reach_nginx() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stack.yaml");
    let mut v = stack(json!([]), json!([]));
    v["metadata"].as_object_mut().unwrap().remove("namespace");
    std::fs::write(&file, serde_yaml::to_string(&v).unwrap()).unwrap();
    let render = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_opsconductor-operator"))
            .arg("render")
            .arg("-f")
            .arg(&file)
            .args(args)
            .output()
            .unwrap()
    };
    let ok = render(&["-n", "shop", "--cluster-domain", "corp.internal"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    for (args, words) in [
        (
            &["-n", "shop;evil", "--cluster-domain", "cluster.local"][..],
            "metadata.namespace",
        ),
        (&["-n", "Shop"][..], "metadata.namespace"),
        (
            &[
                "-n",
                "shop",
                "--cluster-domain",
                "cluster.local; return 200 x",
            ][..],
            "cluster-domain",
        ),
        (
            &["-n", "shop", "--cluster-domain", "a..b"][..],
            "cluster-domain",
        ),
    ] {
        let out = render(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && out.stdout.is_empty() && stderr.contains(words),
            "render {args:?} must refuse it ({words}): status {:?}, stderr {stderr}",
            out.status
        );
    }
}

/// Egress to `0.0.0.0/0` or `::/0` (or anything wider than /8, /16) needs `allowWide: true`
/// (issue 14, item 7): the real API server keeps the field (the CRD's schema has it), and the
/// real binary refuses the stack without it, with the field path.
#[tokio::test]
async fn wide_egress_needs_an_explicit_allow_wide() {
    let Some(ns) = TestNamespace::new("wide-egress").await else {
        return;
    };
    install_crd(ns.control_plane).await;
    let mut v = stack(
        json!([
            {"cidr": "0.0.0.0/0", "ports": [443], "allowWide": true},
            {"cidr": "::/0", "ports": [443]},
            {"cidr": "10.0.0.0/8", "ports": [5432]},
        ]),
        json!([]),
    );
    v["metadata"]["namespace"] = json!(ns.name);
    let api: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        ns.client.clone(),
        &ns.name,
        &kube::discovery::ApiResource::erase::<opsconductor_operator::crd::OpsConductorStack>(&()),
    );
    let created = api
        .create(&PostParams::default(), &serde_json::from_value(v).unwrap())
        .await
        .unwrap();
    let mut stored = serde_json::to_value(&created).unwrap();
    let rules = &stored["spec"]["services"][0]["egress"];
    assert_eq!(
        rules[0]["allowWide"],
        json!(true),
        "the API server must keep allowWide (the CRD's schema): {rules}"
    );

    let render = |v: &Value| {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stack.yaml");
        std::fs::write(&file, serde_yaml::to_string(v).unwrap()).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_opsconductor-operator"))
            .args(["render", "-f"])
            .arg(&file)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, stderr) = render(&stored);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "spec.services[0].egress[1].cidr: \"::/0\" is wider than /16: it opens egress to \
             most of the internet; set spec.services[0].egress[1].allowWide: true to grant it"
        ),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("allowWide").count(),
        1,
        "only ::/0: {stderr}"
    );

    stored["spec"]["services"][0]["egress"][1]["allowWide"] = json!(true);
    let (code, stdout, stderr) = render(&stored);
    assert_eq!(code, Some(0), "{stderr}");
    for cidr in ["cidr: 0.0.0.0/0", "cidr: ::/0", "cidr: 10.0.0.0/8"] {
        assert!(stdout.contains(cidr), "{cidr} missing:\n{stdout}");
    }
}
