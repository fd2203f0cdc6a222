//! The operator's allow-list of gateway images (issue 14, item 5): the gateway runs with the
//! stack's TLS key mounted, so `--allowed-gateway-images` (chart value
//! `operator.allowedGatewayImages`) refuses any other image with the field path, and nothing of
//! such a stack is applied. The real operator binary against the real control plane.

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use opsconductor_operator::crd::OpsConductorStack;
use serde_json::json;
use support::operator::{apply_stack, install_crd};
use support::process::spawn_as_operator;
use support::{TestNamespace, eventually};

const WAIT: Duration = Duration::from_secs(60);
const ALLOWED: &str = "registry.example.com/approved/,ghcr.io/opsconductor/opsconductor-gateway";

fn stack(name: &str, namespace: &str, image: &str) -> OpsConductorStack {
    serde_json::from_value(json!({
        "apiVersion": "opsconductor.io/v1alpha1",
        "kind": "OpsConductorStack",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "gateway": {"hosts": [format!("{name}.example.com")], "image": image},
            "tls": {"secretName": format!("{name}-cert")},
            "services": [{"name": format!("{name}-web"), "image": "web:1", "route": "/"}],
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn gateway_images_outside_the_operators_allow_list_are_refused() {
    let Some(ns) = TestNamespace::new("gateway-images").await else {
        return;
    };
    let cp = ns.control_plane;
    install_crd(cp).await;
    let op = spawn_as_operator(
        cp,
        "gateway-images",
        &[],
        &[("OPSC_ALLOWED_GATEWAY_IMAGES", ALLOWED)],
    );
    eventually("the operator's caches to sync", WAIT, async || {
        op.ready().then_some(())
    })
    .await;

    let stacks: Api<OpsConductorStack> = ns.api();
    let deployments: Api<Deployment> = ns.api();
    let trusted = "registry.example.com/approved/nginx:1.27";
    apply_stack(&ns.client, &stack("trusted", &ns.name, trusted)).await;
    apply_stack(&ns.client, &stack("foreign", &ns.name, "nginx:1.27")).await;

    let message = eventually("foreign to be refused", WAIT, async || {
        let s = stacks.get("foreign").await.ok()?;
        s.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Ready" && c.reason == "InvalidSpec")
            .map(|c| c.message)
    })
    .await;
    assert!(
        message.contains("spec.gateway.image: \"nginx:1.27\" is not one of the gateway images this operator allows (registry.example.com/approved/, ghcr.io/opsconductor/opsconductor-gateway)"),
        "{message}"
    );
    let gateway = eventually("the trusted stack's gateway", WAIT, async || {
        deployments.get_opt("trusted-gateway").await.ok().flatten()
    })
    .await;
    let image = gateway.spec.unwrap().template.spec.unwrap().containers[0]
        .image
        .clone();
    assert_eq!(image.as_deref(), Some(trusted));
    // The refused stack got nothing: no gateway, no service.
    for name in ["foreign-gateway", "foreign-web"] {
        assert!(
            deployments.get_opt(name).await.unwrap().is_none(),
            "{name} was created for a refused stack"
        );
    }
}
