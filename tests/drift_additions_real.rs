//! Drift by addition (issue 14, item 4), on the real control plane with the real operator: a
//! sidecar, an init container, a hostPath volume, an added capability on a managed
//! Deployment, or an extra port on the gateway Service, added by another field manager, are
//! drift like a changed value, and are removed in `Enforce` mode.

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Service};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use opsconductor_operator::crd::OpsConductorStack;
use serde_json::json;
use support::operator::{apply_stack, operator};
use support::{TestNamespace, eventually};

const WAIT: Duration = Duration::from_secs(30);

const STACK: &str = r#"
apiVersion: opsconductor.io/v1alpha1
kind: OpsConductorStack
metadata: {name: hello}
spec:
  gateway: {hosts: [hello.example.test], serviceType: NodePort}
  tls: {secretName: hello-cert}
  services:
    - {name: web, image: example/web:1, route: /}
"#;

async fn converged(client: &Client, ns: &str, name: &str) {
    let api: Api<OpsConductorStack> = Api::namespaced(client.clone(), ns);
    eventually("the stack's status to catch up", WAIT, || {
        let api = api.clone();
        async move {
            let s = api.get(name).await.ok()?;
            let observed = s.status.as_ref()?.observed_generation;
            (observed.is_some() && observed == s.metadata.generation).then_some(())
        }
    })
    .await;
}

/// Applies `patch` to Deployment `name` as another field manager (server-side apply, so the
/// additions are that manager's and a forced apply of the operator's own fields leaves them).
async fn add_to_deployment(ns: &TestNamespace, name: &str, spec: serde_json::Value) {
    ns.api::<Deployment>()
        .patch(
            name,
            &PatchParams::apply("intruder"),
            &Patch::Apply(json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name}, "spec": {"template": {"spec": spec}}})),
        )
        .await
        .unwrap_or_else(|e| panic!("adding to Deployment {name}: {e}"));
}

async fn pod_spec(ns: &TestNamespace, name: &str) -> serde_json::Value {
    let d = ns.api::<Deployment>().get(name).await.unwrap();
    serde_json::to_value(d.spec.unwrap().template.spec.unwrap()).unwrap()
}

#[tokio::test]
async fn additions_to_managed_workloads_and_the_gateway_service_are_reverted() {
    let Some(_op) = operator().await else { return };
    let Some(ns) = TestNamespace::new("drift-add").await else {
        return;
    };
    let mut stack: OpsConductorStack = serde_yaml::from_str(STACK).unwrap();
    stack.metadata.namespace = Some(ns.name.clone());
    apply_stack(&ns.client, &stack).await;
    converged(&ns.client, &ns.name, "hello").await;
    let gateway_container = pod_spec(&ns, "hello-gateway").await["containers"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let web_container = pod_spec(&ns, "web").await["containers"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();

    // A sidecar in the gateway pod, which could mount the TLS key.
    add_to_deployment(
        &ns,
        "hello-gateway",
        json!({"containers": [{"name": "sidecar", "image": "example/steal:1"}]}),
    )
    .await;
    eventually("the sidecar to be removed", WAIT, async || {
        let spec = pod_spec(&ns, "hello-gateway").await;
        let names: Vec<&str> = spec["containers"]
            .as_array()?
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        (names == [gateway_container.as_str()]).then_some(())
    })
    .await;

    // An init container, a hostPath volume and its mount, an added capability.
    add_to_deployment(
        &ns,
        "web",
        json!({
            "initContainers": [{"name": "init", "image": "example/init:1"}],
            "volumes": [{"name": "host", "hostPath": {"path": "/"}}],
            "containers": [{"name": web_container, "image": "example/web:1",
                "volumeMounts": [{"name": "host", "mountPath": "/host"}],
                "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}],
        }),
    )
    .await;
    eventually(
        "the init container, hostPath volume, mount and capability to be removed",
        WAIT,
        async || {
            let spec = pod_spec(&ns, "web").await;
            let text = spec.to_string();
            let clean = spec
                .get("initContainers")
                .is_none_or(|v| v.as_array().is_none_or(|a| a.is_empty()))
                && !text.contains("hostPath")
                && !text.contains("/host")
                && !text.contains("NET_ADMIN");
            clean.then_some(())
        },
    )
    .await;

    // An extra port on the gateway Service (a second way in past the gateway's ports).
    ns.api::<Service>()
        .patch(
            "hello-gateway",
            &PatchParams::apply("intruder"),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "hello-gateway"},
                "spec": {"ports": [{"name": "ssh", "port": 2222, "targetPort": 22}]}})),
        )
        .await
        .unwrap();
    eventually("the extra Service port to be removed", WAIT, async || {
        let svc = ns.api::<Service>().get("hello-gateway").await.ok()?;
        let ports = svc.spec?.ports?;
        ports.iter().all(|p| p.port != 2222).then_some(())
    })
    .await;

    // Each one was announced.
    let reverted: Vec<String> = Api::<Event>::namespaced(ns.client.clone(), &ns.name)
        .list(&ListParams::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("DriftReverted"))
        .filter_map(|e| e.message)
        .collect();
    for object in [
        "Deployment/hello-gateway",
        "Deployment/web",
        "Service/hello-gateway",
    ] {
        assert!(
            reverted.iter().any(|m| m.contains(object)),
            "no DriftReverted Event for {object}: {reverted:?}"
        );
    }
}

/// The gateway's metrics exporter (issue 15) against the real API server and operator: the
/// CEL rule refuses `enabled` without scrapers; enabled, the sidecar and the policy rule for
/// 9113 are applied and hold (no drift reported against what the API server stored); a change
/// to the sidecar by someone else is reverted; switched off, both go again.
#[tokio::test]
async fn the_metrics_exporter_is_applied_held_and_removed_with_the_spec() {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let Some(_op) = operator().await else { return };
    let Some(ns) = TestNamespace::new("drift-metrics").await else {
        return;
    };
    let with_metrics = |metrics: &str| {
        let text = STACK.replace(
            "serviceType: NodePort}",
            &format!("serviceType: NodePort, metrics: {metrics}}}"),
        );
        let mut stack: OpsConductorStack = serde_yaml::from_str(&text).unwrap();
        stack.metadata.namespace = Some(ns.name.clone());
        stack
    };
    // Refused at admission: nobody named to scrape.
    let refused = Api::<OpsConductorStack>::namespaced(ns.client.clone(), &ns.name)
        .patch(
            "hello",
            &PatchParams::apply("opsconductor-tests").force(),
            &Patch::Apply(json!({"apiVersion": "opsconductor.io/v1alpha1",
                "kind": "OpsConductorStack", "metadata": {"name": "hello"},
                "spec": serde_json::to_value(&with_metrics("{enabled: true}").spec).unwrap()})),
        )
        .await
        .expect_err("the CEL rule refuses metrics without allowFrom");
    assert!(
        refused
            .to_string()
            .contains("metrics.enabled needs allowFrom"),
        "{refused}"
    );

    apply_stack(
        &ns.client,
        &with_metrics(
            "{enabled: true, allowFrom: [{namespaceSelector: {matchLabels: {team: obs}}, \
             podSelector: {matchLabels: {app: prometheus}}}]}",
        ),
    )
    .await;
    converged(&ns.client, &ns.name, "hello").await;
    let containers = |spec: &serde_json::Value| -> Vec<String> {
        spec["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect()
    };
    eventually("the exporter sidecar", WAIT, async || {
        (containers(&pod_spec(&ns, "hello-gateway").await) == ["nginx", "exporter", "requests"])
            .then_some(())
    })
    .await;
    let metrics_rule = async || {
        let policy = ns.api::<NetworkPolicy>().get("hello-gateway").await.ok()?;
        let rules = policy.spec?.ingress.unwrap_or_default();
        Some(
            rules
                .into_iter()
                .filter(|r| {
                    r.ports.iter().flatten().any(|p| {
                        p.port
                            == Some(
                                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(
                                    9113,
                                ),
                            )
                    })
                })
                .collect::<Vec<_>>(),
        )
    };
    let rules = metrics_rule().await.unwrap();
    assert_eq!(rules.len(), 1, "{rules:?}");
    let peer = &rules[0].from.as_ref().unwrap()[0];
    assert_eq!(
        serde_json::to_value(peer).unwrap(),
        json!({"namespaceSelector": {"matchLabels": {"team": "obs"}},
               "podSelector": {"matchLabels": {"app": "prometheus"}}})
    );

    // What the operator applied holds as the API server stored it (defaults included): the
    // reconciles so far (the Deployment's own status changes trigger more) found no drift.
    let drift_events = async || -> usize {
        Api::<Event>::namespaced(ns.client.clone(), &ns.name)
            .list(&ListParams::default())
            .await
            .unwrap()
            .into_iter()
            .filter(|e| {
                matches!(e.reason.as_deref(), Some("DriftReverted" | "DriftDetected"))
                    && e.message
                        .as_deref()
                        .is_some_and(|m| m.contains("Deployment/hello-gateway"))
            })
            .count()
    };
    assert_eq!(drift_events().await, 0);

    // Someone points the exporter elsewhere (forcing the operator's fields): reverted.
    ns.api::<Deployment>()
        .patch(
            "hello-gateway",
            &PatchParams::apply("intruder").force(),
            &Patch::Apply(json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "hello-gateway"}, "spec": {"template": {"spec": {
                    "containers": [{"name": "exporter", "image": "example/exporter:evil"}]}}}})),
        )
        .await
        .unwrap();
    eventually("the exporter's image to be restored", WAIT, async || {
        let spec = pod_spec(&ns, "hello-gateway").await;
        let image = spec["containers"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == "exporter")?["image"]
            .as_str()?
            .to_string();
        (image == opsconductor_operator::crd::DEFAULT_GATEWAY_IMAGE).then_some(())
    })
    .await;
    eventually("a DriftReverted Event", WAIT, async || {
        (drift_events().await >= 1).then_some(())
    })
    .await;

    // Switched off: the sidecar and the rule go.
    apply_stack(&ns.client, &with_metrics("{enabled: false}")).await;
    eventually("the exporter sidecar to go", WAIT, async || {
        (containers(&pod_spec(&ns, "hello-gateway").await) == ["nginx"]).then_some(())
    })
    .await;
    assert!(metrics_rule().await.unwrap().is_empty());
}
