//! Requests and limits on the gateway pod (issue 14, item 6): by default the gateway container
//! gets a small request and a memory limit, so that a flood of connections restarts one pod
//! instead of exhausting the node; `spec.gateway.resources` replaces them. The real operator
//! binary against the real control plane: what the API server stores in the gateway
//! Deployment.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ResourceRequirements;
use kube::Api;
use serde_json::json;
use support::TestNamespace;
use support::operator::{apply_stack, example, operator};

const WAIT: Duration = Duration::from_secs(60);

fn requirements(requests: &[(&str, &str)], limits: &[(&str, &str)]) -> ResourceRequirements {
    let map = |kv: &[(&str, &str)]| {
        Some(
            kv.iter()
                .map(|(k, v)| (k.to_string(), serde_json::from_value(json!(v)).unwrap()))
                .collect::<BTreeMap<_, _>>(),
        )
    };
    ResourceRequirements {
        requests: map(requests),
        limits: map(limits),
        ..ResourceRequirements::default()
    }
}

/// Waits until the gateway container's resources are `want`; on timeout, says what they were.
async fn gateway_resources(api: &Api<Deployment>, want: &ResourceRequirements) {
    let start = std::time::Instant::now();
    loop {
        let found = api
            .get_opt("hello-gateway")
            .await
            .ok()
            .flatten()
            .and_then(|d| d.spec?.template.spec?.containers[0].resources.clone());
        if found.as_ref() == Some(want) {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "the gateway's resources are {found:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_gateway_pod_has_requests_and_limits_by_default_and_as_the_spec_says() {
    let Some(ns) = TestNamespace::new("gateway-resources").await else {
        return;
    };
    operator().await.unwrap();
    let deployments: Api<Deployment> = ns.api();
    let mut stack = example("minimal.yaml", &ns.name);
    apply_stack(&ns.client, &stack).await;
    gateway_resources(
        &deployments,
        &requirements(
            &[("cpu", "100m"), ("memory", "64Mi")],
            &[("memory", "512Mi")],
        ),
    )
    .await;

    let own = requirements(
        &[("cpu", "250m"), ("memory", "128Mi")],
        &[("cpu", "1"), ("memory", "1Gi")],
    );
    stack.spec.gateway.resources = Some(own.clone());
    apply_stack(&ns.client, &stack).await;
    gateway_resources(&deployments, &own).await;
}
