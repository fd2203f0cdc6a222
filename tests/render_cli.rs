//! The `crd` and `render` subcommands, run as the real binary: snapshots of every example,
//! the committed CRD, and what bad input does (field-named errors, exit 2, nothing on stdout).
//!
//! Snapshots live in `tests/snapshots/`; after an intended output change, regenerate them with
//! `OPSC_UPDATE_SNAPSHOTS=1 cargo test --test render_cli` and review the diff.

use std::path::PathBuf;
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_opsconductor-operator"))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(args: &[&str]) -> Output {
    bin()
        .args(args)
        .current_dir(root())
        .output()
        .expect("the binary runs")
}

fn check_snapshot(name: &str, actual: &str) {
    let path = root().join("tests/snapshots").join(name);
    if std::env::var_os("OPSC_UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "missing snapshot {}; run with OPSC_UPDATE_SNAPSHOTS=1",
            path.display()
        )
    });
    if expected != actual {
        let first = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b);
        panic!(
            "render output differs from {} (first differing line: {:?}); if intended, regenerate with OPSC_UPDATE_SNAPSHOTS=1 and review the diff",
            path.display(),
            first.map(|i| i + 1)
        );
    }
}

fn examples() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    assert!(v.len() >= 3, "expected the examples to be there");
    v
}

#[test]
fn every_example_renders_to_its_snapshot() {
    for example in examples() {
        let rel = example
            .strip_prefix(root())
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let out = run(&["render", "-f", &rel]);
        assert!(
            out.status.success(),
            "{rel}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let name = example.file_name().unwrap().to_str().unwrap();
        check_snapshot(name, &stdout);
    }
}

#[test]
fn render_is_deterministic_and_json_matches_yaml() {
    let a = run(&["render", "-f", "examples/opsconductor.yaml"]);
    let b = run(&["render", "-f", "examples/opsconductor.yaml"]);
    assert_eq!(a.stdout, b.stdout);
    let json = run(&["render", "-f", "examples/opsconductor.yaml", "-o", "json"]);
    assert!(json.status.success());
    let from_json: Vec<serde_json::Value> = serde_json::from_slice(&json.stdout).unwrap();
    let text = String::from_utf8(a.stdout).unwrap();
    let from_yaml: Vec<serde_json::Value> = text
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_yaml::from_str(d).unwrap())
        .collect();
    assert_eq!(from_json, from_yaml);
}

#[test]
fn example_stack_renders_every_object_kind() {
    let out = run(&["render", "-f", "examples/opsconductor.yaml", "-o", "json"]);
    let objects: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let count = |kind: &str| objects.iter().filter(|o| o["kind"] == kind).count();
    // 6 services + the gateway.
    assert_eq!(count("ServiceAccount"), 7);
    assert_eq!(count("Deployment"), 7);
    assert_eq!(count("Service"), 7);
    // The gateway's nginx.conf and the services' identity (`serviceIdentity`).
    assert_eq!(count("ConfigMap"), 2);
    assert_eq!(count("PodDisruptionBudget"), 1);
    // default-deny, dns, gateway, one per service, one per backend.
    assert_eq!(count("NetworkPolicy"), 3 + 6 + 3);
    for o in &objects {
        assert_eq!(
            o["metadata"]["namespace"], "opsconductor",
            "{}",
            o["metadata"]["name"]
        );
        assert_eq!(
            o["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "opsconductor-operator"
        );
        assert_eq!(o["metadata"]["labels"]["opsconductor.io/stack"], "prod");
    }
}

fn write_temp(content: &str) -> tempfile::NamedTempFile {
    let f = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::fs::write(f.path(), content).unwrap();
    f
}

fn assert_rejected(content: &str, expected: &[&str]) {
    let f = write_temp(content);
    let out = run(&["render", "-f", f.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "nothing may reach stdout on bad input"
    );
    for e in expected {
        assert!(stderr.contains(e), "stderr should contain {e:?}:\n{stderr}");
    }
}

#[test]
fn invalid_stack_lists_every_problem_with_its_field() {
    let text = std::fs::read_to_string(root().join("tests/fixtures/invalid.yaml")).unwrap();
    assert_rejected(
        &text,
        &[
            "spec.services[2].calls[0]: unknown service \"user\"",
            "spec.gateway.hosts[0]: \"*.example.com\" is a wildcard",
            "spec.services[1].route: \"api\" must start and end with '/'",
            "spec.backends[0].allowFrom[0]: unknown service \"ghost\"",
            "spec.tls.acme.acceptTermsOfService: must be true",
        ],
    );
}

#[test]
fn service_identity_out_of_range_is_refused_naming_the_field() {
    let stack = |identity: &str| {
        format!(
            "apiVersion: opsconductor.io/v1alpha1\nkind: OpsConductorStack\nmetadata: {{name: x}}\n\
             spec:\n  gateway: {{hosts: [a.example.com]}}\n  tls: {{secretName: s}}\n\
             \x20 services:\n    - {{name: a, image: i, env: [{{name: OPSC_IDENTITY_AUDIENCE, value: v}}]}}\n\
             \x20 serviceIdentity: {identity}\n"
        )
    };
    assert_rejected(
        &stack("{enabled: true, expirationSeconds: 300}"),
        &[
            "spec.serviceIdentity.expirationSeconds: 300 is out of range 600 to 86400 seconds",
            "spec.services[0].env[0].name: \"OPSC_IDENTITY_AUDIENCE\" is set by the operator",
        ],
    );
    assert_rejected(
        &stack("{enabled: true, expirationSeconds: 172800}"),
        &["spec.serviceIdentity.expirationSeconds: 172800 is out of range 600 to 86400 seconds"],
    );
}

#[test]
fn not_yaml_not_a_stack_and_wrong_types_get_one_line_errors() {
    assert_rejected("key: [unclosed\n", &["not valid YAML"]);
    assert_rejected("", &["contains no document"]);
    assert_rejected(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
        &["not an OpsConductorStack: found apiVersion \"v1\", kind \"ConfigMap\""],
    );
    assert_rejected(
        "apiVersion: opsconductor.io/v1alpha1\nkind: OpsConductorStack\nmetadata: {name: x}\nspec:\n  gateway: {hosts: [a.example.com]}\n  tls: {secretName: s}\n  services:\n    - {name: a, image: i, port: eighty}\n",
        &["spec.services[0].port: invalid type"],
    );
    assert_rejected(
        "apiVersion: opsconductor.io/v1alpha1\nkind: OpsConductorStack\nmetadata: {name: x}\nspec:\n  tls: {secretName: s}\n  services: []\n",
        &["spec: missing field `gateway`"],
    );
    let two = "apiVersion: opsconductor.io/v1alpha1\nkind: OpsConductorStack\n---\napiVersion: opsconductor.io/v1alpha1\nkind: OpsConductorStack\n";
    assert_rejected(two, &["contains 2 documents"]);
    let out = run(&["render", "-f", "/nonexistent/stack.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/stack.yaml: cannot read"));
}

#[test]
fn committed_crd_matches_the_code() {
    let out = run(&["crd"]);
    assert!(out.status.success());
    let committed =
        std::fs::read_to_string(root().join("crds/opsconductorstacks.opsconductor.io.yaml"))
            .unwrap();
    assert!(
        committed == String::from_utf8(out.stdout).unwrap(),
        "crds/opsconductorstacks.opsconductor.io.yaml is stale; regenerate: cargo run -- crd > crds/opsconductorstacks.opsconductor.io.yaml"
    );
}

#[test]
fn crd_has_the_contracted_names_columns_and_rules() {
    let out = run(&["crd"]);
    let crd: serde_json::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    assert_eq!(crd["spec"]["group"], "opsconductor.io");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["plural"], "opsconductorstacks");
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "ocs");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(version["subresources"]["status"].is_object());
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        [
            "Ready",
            "Services",
            "Host",
            "Certificate",
            "Expires",
            "Violations",
            "Age"
        ]
    );
    let text = serde_json::to_string(&crd).unwrap();
    for rule in [
        "has(self.acme) != has(self.secretName)",
        "self.exists_one(t, t.name == s.name)",
        "self.startsWith('/') && self.endsWith('/')",
    ] {
        assert!(text.contains(rule), "CRD lacks CEL rule {rule}");
    }
    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(spec["gateway"]["properties"]["replicas"]["default"], 2);
    assert_eq!(
        spec["gateway"]["properties"]["image"]["default"],
        format!(
            "ghcr.io/opsconductor/opsconductor-gateway:{}",
            env!("CARGO_PKG_VERSION")
        )
    );
    assert_eq!(
        spec["services"]["items"]["properties"]["port"]["default"],
        8000
    );
    assert_eq!(spec["services"]["maxItems"], 200);
    assert_eq!(spec["gateway"]["properties"]["hosts"]["maxItems"], 100);
}

/// `--cluster-cidrs` (issue 14, item 7): a wider egress CIDR has the cluster's ranges cut out,
/// one inside a cluster range is refused with its field, a bad range is refused by the flag.
#[test]
fn egress_never_reaches_into_the_clusters_own_ranges() {
    let f = write_temp(
        "apiVersion: opsconductor.io/v1alpha1\nkind: OpsConductorStack\n\
         metadata: {name: s, namespace: ns}\n\
         spec:\n  gateway: {hosts: [a.example.com]}\n  tls: {secretName: own-tls}\n\
         \x20 services:\n  - {name: web, image: w, route: /, egress: [\
         {cidr: 10.0.0.0/8, ports: [5432]}]}\n",
    );
    let path = f.path().to_str().unwrap();
    let ranges = "--cluster-cidrs=10.244.0.0/16,10.96.0.0/12";
    let out = run(&["render", "-f", path, "-o", "json", ranges]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objects: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let web = objects
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["kind"] == "NetworkPolicy" && o["metadata"]["name"] == "s-svc-web")
        .unwrap();
    let blocks: Vec<&serde_json::Value> = web["spec"]["egress"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|rule| rule["to"][0].get("ipBlock"))
        .collect();
    assert_eq!(
        blocks,
        vec![
            &serde_json::json!({"cidr": "10.0.0.0/8", "except": ["10.244.0.0/16", "10.96.0.0/12"]})
        ]
    );

    // Without the flag, as before: nothing is cut out of 10.0.0.0/8.
    let out = run(&["render", "-f", path, "-o", "json"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"cidr\": \"10.0.0.0/8\""));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("10.244.0.0/16"));

    // Inside a cluster range: refused, naming the field and the range.
    let out = run(&["render", "-f", path, "--cluster-cidrs=10.0.0.0/8"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        stderr.contains(
            "spec.services[0].egress[0].cidr: \"10.0.0.0/8\" lies inside the cluster's own range \
             10.0.0.0/8"
        ),
        "{stderr}"
    );

    // A range with host bits is refused by the flag itself.
    let out = run(&["render", "-f", path, "--cluster-cidrs=10.244.0.1/16"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("host bits"),
        "{stderr}"
    );
}
