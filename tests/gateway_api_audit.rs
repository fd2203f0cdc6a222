//! The violation audit with the Gateway API installed: the real HTTPRoute CRD of
//! `sigs.k8s.io/gateway-api` (its published `config/crd/standard` manifest, fetched as that Go
//! module at a pinned version) is served by the real control plane before the operator
//! starts, and a route in a stack's namespace is reported until it is deleted.
//!
//! Its own test binary: the operator discovers the served route kinds at startup.

mod support;

use std::process::Command;
use std::time::Duration;

use kube::Api;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams};
use opsconductor_operator::crd::OpsConductorStack;
use serde_json::json;
use support::operator::{apply_stack, example, operator};
use support::{TestNamespace, control_plane, eventually};

const GATEWAY_API: &str = "sigs.k8s.io/gateway-api@v1.6.3";

/// The directory of the Gateway API module (downloaded into the Go module cache once).
fn gateway_api_dir() -> std::path::PathBuf {
    let out = Command::new("go")
        .args(["mod", "download", "-json", GATEWAY_API])
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap_or_else(|e| panic!("running `go mod download {GATEWAY_API}` (Go is needed for the Gateway API CRDs): {e}"));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "`go mod download {GATEWAY_API}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let dir = info["Dir"]
        .as_str()
        .unwrap_or_else(|| panic!("`go mod download {GATEWAY_API}` failed: {info}"));
    std::path::PathBuf::from(dir)
}

#[tokio::test]
async fn gateway_api_routes_in_a_stack_namespace_are_violations() {
    let Some(cp) = control_plane() else { return };
    let crd =
        gateway_api_dir().join("config/crd/standard/gateway.networking.k8s.io_httproutes.yaml");
    let status = cp
        .kubectl()
        .args(["apply", "--server-side", "--force-conflicts", "-f"])
        .arg(&crd)
        .status()
        .unwrap();
    assert!(status.success(), "installing {}", crd.display());
    let admin = kube::Client::try_from(cp.config().await).unwrap();
    support::operator::wait_established(&admin, "httproutes.gateway.networking.k8s.io").await;

    let Some(_op) = operator().await else { return };
    let Some(ns) = TestNamespace::new("gwapi").await else {
        return;
    };
    apply_stack(&ns.client, &example("minimal.yaml", &ns.name)).await;

    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "gateway.networking.k8s.io",
        "v1",
        "HTTPRoute",
    ));
    let routes: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &resource);
    let route = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "around-the-gateway"},
        "spec": {"parentRefs": [{"name": "some-other-gateway"}], "rules": [{"backendRefs": [{"name": "web", "port": 8000}]}]}});
    routes
        .patch(
            "around-the-gateway",
            &PatchParams::apply("someone-else"),
            &Patch::Apply(&route),
        )
        .await
        .unwrap();

    let stacks: Api<OpsConductorStack> = Api::namespaced(ns.client.clone(), &ns.name);
    let status = eventually(
        "the HTTPRoute to be reported",
        Duration::from_secs(30),
        async || {
            let s = stacks.get("hello").await.ok()?.status?;
            (s.violation_count == Some(1)).then_some(s)
        },
    )
    .await;
    assert_eq!(status.violations[0].kind, "HTTPRoute");
    assert_eq!(status.violations[0].name, "around-the-gateway");
    assert!(
        status.violations[0].reason.contains("Gateway API"),
        "{:?}",
        status.violations[0]
    );

    routes
        .delete("around-the-gateway", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the violation to clear",
        Duration::from_secs(30),
        async || {
            let s = stacks.get("hello").await.ok()?.status?;
            (s.violation_count == Some(0)).then_some(())
        },
    )
    .await;
}
