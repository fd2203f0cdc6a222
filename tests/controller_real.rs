//! The controller against the real control plane: the real operator binary reconciles stacks
//! in fresh namespaces, and every claim is checked on the API server itself (objects, status,
//! Events, and the audit log for the writes the operator made).
//!
//! No kubelet runs here: where a test needs ready pods, it writes the Deployment's status
//! through the status subresource, standing in for the kubelet and the deployment controller.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use opsconductor_operator::crd::{CertificateState, OpsConductorStack};
use serde_json::json;
use support::operator::{
    OPERATOR_USER, apply_stack, example, operator, owned_objects, rendered_objects,
};
use support::{AuditLog, TestNamespace, eventually};

const WAIT: Duration = Duration::from_secs(30);

/// Waits until the stack's status describes its current generation.
async fn converged(client: &Client, ns: &str, name: &str) -> OpsConductorStack {
    let api: Api<OpsConductorStack> = Api::namespaced(client.clone(), ns);
    eventually(
        "the stack's status to catch up with its generation",
        WAIT,
        || {
            let api = api.clone();
            async move {
                let s = api.get(name).await.ok()?;
                let observed = s.status.as_ref()?.observed_generation;
                (observed.is_some() && observed == s.metadata.generation).then_some(s)
            }
        },
    )
    .await
}

async fn events_with_reason(client: &Client, ns: &str, reason: &str) -> Vec<String> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .map(|e| e.message.unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn creates_every_object_and_then_writes_nothing() {
    let Some(op) = operator().await else { return };
    let Some(ns) = TestNamespace::new("create").await else {
        return;
    };
    let stack = apply_stack(&ns.client, &example("opsconductor.yaml", &ns.name)).await;
    let uid = stack.uid().unwrap();
    let expected = rendered_objects(&stack);
    assert_eq!(expected.len(), 36, "the example renders 36 objects");
    eventually(
        "every rendered object to exist, owned by the stack",
        WAIT,
        || {
            let (client, ns, uid, expected) = (
                ns.client.clone(),
                ns.name.clone(),
                uid.clone(),
                expected.clone(),
            );
            async move { (owned_objects(&client, &ns, &uid).await == expected).then_some(()) }
        },
    )
    .await;
    converged(&ns.client, &ns.name, "prod").await;
    // The example orders its certificate from a CA this control plane cannot reach: the order
    // fails in the background, and the reconcile that follows writes that (an Event and the
    // status). On a loaded machine the failure can land after the status above was written,
    // so wait for it: "unchanged" starts once nothing is left in flight.
    let api: Api<OpsConductorStack> = Api::namespaced(ns.client.clone(), &ns.name);
    eventually(
        "the certificate order to have failed and its failure to be in the status",
        WAIT,
        async || {
            let s = api.get("prod").await.ok()?;
            let status = s.status?;
            let failed = status.certificate.as_ref()?.state == CertificateState::Failed;
            (failed && status.observed_generation == s.metadata.generation).then_some(())
        },
    )
    .await;

    // A second reconcile, triggered by a change that does not alter the spec, writes nothing.
    let audit = AuditLog::of(ns.control_plane);
    let reconciles = op.metric("opsconductor_reconciles_total{result=\"ok\"}");
    let mark = audit.mark();
    api.patch(
        "prod",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"touch": "1"}}})),
    )
    .await
    .unwrap();
    eventually(
        "the operator to reconcile the touched stack",
        WAIT,
        async || {
            (op.metric("opsconductor_reconciles_total{result=\"ok\"}") > reconciles).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes: Vec<String> = audit
        .writes_since(&mark, |e| e.user == OPERATOR_USER && e.namespace == ns.name)
        .iter()
        .map(|e| {
            format!(
                "{} {}/{}{}",
                e.verb,
                e.resource,
                e.name,
                if e.subresource.is_empty() {
                    String::new()
                } else {
                    format!("/{}", e.subresource)
                }
            )
        })
        .collect();
    assert!(
        writes.is_empty(),
        "an unchanged stack caused writes: {writes:#?}"
    );

    // The creation was announced once, as an Event on the stack.
    let created = events_with_reason(&ns.client, &ns.name, "Created").await;
    assert_eq!(created.len(), 1, "{created:?}");
    assert!(
        created[0].contains("Deployment/auth")
            && created[0].contains("NetworkPolicy/prod-default-deny")
    );
}

#[tokio::test]
async fn removed_services_and_backends_are_pruned() {
    let Some(_op) = operator().await else { return };
    let Some(ns) = TestNamespace::new("prune").await else {
        return;
    };
    let mut stack = example("opsconductor.yaml", &ns.name);
    let applied = apply_stack(&ns.client, &stack).await;
    let uid = applied.uid().unwrap();
    converged(&ns.client, &ns.name, "prod").await;

    // Drop the frontend service, the minio backend and the calls that named nothing else.
    stack.spec.services.retain(|s| s.name != "frontend");
    stack.spec.backends.retain(|b| b.name != "minio");
    apply_stack(&ns.client, &stack).await;
    let expected = rendered_objects(&stack);
    eventually("the removed objects to be deleted", WAIT, || {
        let (client, ns, uid, expected) = (
            ns.client.clone(),
            ns.name.clone(),
            uid.clone(),
            expected.clone(),
        );
        async move { (owned_objects(&client, &ns, &uid).await == expected).then_some(()) }
    })
    .await;
    for gone in [
        "Deployment/frontend",
        "Service/frontend",
        "ServiceAccount/frontend",
        "NetworkPolicy/prod-svc-frontend",
        "NetworkPolicy/prod-backend-minio",
    ] {
        assert!(!expected.contains(gone));
    }
    let pruned = eventually("Pruned events for every removed object", WAIT, async || {
        let all = events_with_reason(&ns.client, &ns.name, "Pruned")
            .await
            .join("\n");
        (all.contains("Deployment/frontend") && all.contains("NetworkPolicy/prod-backend-minio"))
            .then_some(all)
    })
    .await;
    assert!(pruned.contains("Service/frontend"), "{pruned}");
}

#[tokio::test]
async fn deleting_the_stack_removes_everything_through_owner_references() {
    let Some(_op) = operator().await else { return };
    let Some(ns) = TestNamespace::new("gc").await else {
        return;
    };
    let applied = apply_stack(&ns.client, &example("minimal.yaml", &ns.name)).await;
    let uid = applied.uid().unwrap();
    converged(&ns.client, &ns.name, "hello").await;
    assert!(!owned_objects(&ns.client, &ns.name, &uid).await.is_empty());
    let api: Api<OpsConductorStack> = Api::namespaced(ns.client.clone(), &ns.name);
    api.delete("hello", &DeleteParams::background())
        .await
        .unwrap();
    // The garbage collector of kube-controller-manager does this, not the operator.
    eventually(
        "every owned object to be garbage-collected",
        Duration::from_secs(60),
        || {
            let (client, ns, uid) = (ns.client.clone(), ns.name.clone(), uid.clone());
            async move {
                owned_objects(&client, &ns, &uid)
                    .await
                    .is_empty()
                    .then_some(())
            }
        },
    )
    .await;
}

/// Applies `change` as someone else, then waits until `reverted` holds again.
async fn assert_reverted<F, Fut>(ns: &TestNamespace, what: &str, reverted: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    eventually(&format!("{what} to be reverted"), WAIT, || {
        let check = reverted();
        async move { check.await.then_some(()) }
    })
    .await;
    let _ = ns;
    started.elapsed()
}

#[tokio::test]
async fn drift_is_reverted_in_enforce_mode() {
    let Some(_op) = operator().await else { return };
    let Some(ns) = TestNamespace::new("drift").await else {
        return;
    };
    apply_stack(&ns.client, &example("opsconductor.yaml", &ns.name)).await;
    converged(&ns.client, &ns.name, "prod").await;
    let services: Api<Service> = ns.api();
    let policies: Api<NetworkPolicy> = ns.api();
    let deployments: Api<Deployment> = ns.api();
    let configs: Api<ConfigMap> = ns.api();
    let someone = PatchParams::apply("someone-else").force();
    let mut times = Vec::new();

    // A service turned NodePort. The API server picks the node port: a fixed one can be
    // taken by a gateway Service of another test on the shared control plane (it was once,
    // "provided port is already allocated").
    services
        .patch("auth", &PatchParams::default(), &Patch::Merge(json!({"spec": {"type": "NodePort", "ports": [{"name": "http", "port": 8000, "targetPort": 8000, "protocol": "TCP"}]}})))
        .await
        .unwrap();
    times.push(
        assert_reverted(&ns, "Service auth type NodePort", || async {
            let s = services.get("auth").await.unwrap().spec.unwrap();
            s.type_.as_deref() == Some("ClusterIP")
                && s.ports.unwrap().iter().all(|p| p.node_port.is_none())
        })
        .await,
    );

    // An external IP added.
    services
        .patch(
            "users",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"externalIPs": ["203.0.113.10"]}})),
        )
        .await
        .unwrap();
    times.push(
        assert_reverted(&ns, "Service users externalIPs", || async {
            services
                .get("users")
                .await
                .unwrap()
                .spec
                .unwrap()
                .external_ips
                .unwrap_or_default()
                .is_empty()
        })
        .await,
    );

    // A NetworkPolicy deleted.
    policies
        .delete("prod-svc-auth", &DeleteParams::default())
        .await
        .unwrap();
    times.push(
        assert_reverted(&ns, "deleted NetworkPolicy prod-svc-auth", || async {
            policies
                .get_opt("prod-svc-auth")
                .await
                .unwrap()
                .is_some_and(|p| p.metadata.deletion_timestamp.is_none())
        })
        .await,
    );

    // A NetworkPolicy opened to everyone with an extra rule.
    policies
        .patch(
            "prod-svc-users",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"ingress": [{}]}})),
        )
        .await
        .unwrap();
    times.push(
        assert_reverted(
            &ns,
            "NetworkPolicy prod-svc-users opened to all",
            || async {
                let ingress = policies
                    .get("prod-svc-users")
                    .await
                    .unwrap()
                    .spec
                    .unwrap()
                    .ingress
                    .unwrap_or_default();
                ingress
                    .iter()
                    .all(|r| r.from.as_ref().is_some_and(|f| !f.is_empty()))
            },
        )
        .await,
    );

    // hostNetwork set on a Deployment.
    deployments
        .patch("jobs", &someone, &Patch::Apply(json!({"apiVersion": "apps/v1", "kind": "Deployment", "spec": {"template": {"spec": {"hostNetwork": true}}}})))
        .await
        .unwrap();
    times.push(
        assert_reverted(&ns, "hostNetwork on Deployment jobs", || async {
            let d = deployments.get("jobs").await.unwrap();
            d.spec.unwrap().template.spec.unwrap().host_network != Some(true)
        })
        .await,
    );

    // The gateway configuration edited.
    configs
        .patch("prod-gateway-config", &PatchParams::default(), &Patch::Merge(json!({"data": {"nginx.conf": "events {}\nhttp { server { listen 8080; location / { proxy_pass http://evil; } } }\n"}})))
        .await
        .unwrap();
    times.push(
        assert_reverted(&ns, "edited gateway nginx.conf", || async {
            let data = configs
                .get("prod-gateway-config")
                .await
                .unwrap()
                .data
                .unwrap();
            data["nginx.conf"].contains("Generated by opsconductor-operator")
        })
        .await,
    );

    // The Event is published right after the revert: wait for it rather than race it.
    let objects = [
        "Service/auth",
        "Service/users",
        "NetworkPolicy/prod-svc-auth",
        "NetworkPolicy/prod-svc-users",
        "Deployment/jobs",
        "ConfigMap/prod-gateway-config",
    ];
    let all = eventually(
        "a DriftReverted Event for every reverted object",
        WAIT,
        async || {
            let all = events_with_reason(&ns.client, &ns.name, "DriftReverted")
                .await
                .join("\n");
            objects.iter().all(|o| all.contains(o)).then_some(all)
        },
    )
    .await;
    assert!(
        all.lines()
            .all(|l| l.starts_with("reverted changes made by others to ")),
        "{all}"
    );
    eprintln!("drift reverted after (as seen by polling): {times:?}");
}

#[tokio::test]
async fn drift_is_reported_not_reverted_in_audit_mode() {
    let Some(_op) = operator().await else { return };
    let Some(ns) = TestNamespace::new("audit").await else {
        return;
    };
    let mut stack = example("opsconductor.yaml", &ns.name);
    stack.spec.policy.mode = opsconductor_operator::crd::PolicyMode::Audit;
    apply_stack(&ns.client, &stack).await;
    converged(&ns.client, &ns.name, "prod").await;
    let services: Api<Service> = ns.api();
    services
        .patch(
            "auth",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"type": "NodePort"}})),
        )
        .await
        .unwrap();
    let api: Api<OpsConductorStack> = Api::namespaced(ns.client.clone(), &ns.name);
    let condition = eventually("PolicyEnforced=False/DriftDetected", WAIT, async || {
        let s = api.get("prod").await.ok()?;
        let c = s
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "PolicyEnforced")?;
        (c.reason == "DriftDetected").then_some(c)
    })
    .await;
    assert_eq!(condition.status, "False");
    assert!(
        condition.message.contains("Service/auth"),
        "{}",
        condition.message
    );
    let events = eventually("a DriftDetected event", WAIT, async || {
        let e = events_with_reason(&ns.client, &ns.name, "DriftDetected").await;
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert!(events[0].contains("Service/auth"));
    // Still NodePort: Audit mode changes nothing that was changed by others.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        services
            .get("auth")
            .await
            .unwrap()
            .spec
            .unwrap()
            .type_
            .as_deref(),
        Some("NodePort")
    );
}

#[tokio::test]
async fn an_invalid_stack_is_explained_and_does_not_stall_a_valid_one() {
    let Some(op) = operator().await else { return };
    let Some(ns) = TestNamespace::new("invalid").await else {
        return;
    };
    let api: Api<OpsConductorStack> = Api::namespaced(ns.client.clone(), &ns.name);

    // Passes admission (schema and CEL), fails the operator's validation.
    let mut bad = example("minimal.yaml", &ns.name);
    bad.metadata.name = Some("broken".into());
    bad.spec.services[0].calls = vec!["ghost".into()];
    bad.spec.gateway.hosts = vec!["broken.example.com".into()];
    apply_stack(&ns.client, &bad).await;
    let good = example("minimal.yaml", &ns.name);
    apply_stack(&ns.client, &good).await;

    let ready = eventually("broken to be Ready=False/InvalidSpec", WAIT, async || {
        let s = api.get("broken").await.ok()?;
        s.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Ready" && c.reason == "InvalidSpec")
    })
    .await;
    assert_eq!(
        ready.message,
        "spec.services[0].calls[0]: unknown service \"ghost\""
    );
    let warnings = events_with_reason(&ns.client, &ns.name, "InvalidSpec").await;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let hello = converged(&ns.client, &ns.name, "hello").await;
    assert!(
        Api::<Deployment>::namespaced(ns.client.clone(), &ns.name)
            .get_opt("web")
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        hello
            .status
            .unwrap()
            .conditions
            .iter()
            .any(|c| c.type_ == "PolicyEnforced" && c.status == "True")
    );

    // A running stack made invalid: nothing of what runs changes.
    let audit = AuditLog::of(ns.control_plane);
    let mark = audit.mark();
    let mut broken_good = good.clone();
    broken_good.spec.services[0].calls = vec!["nobody".into()];
    apply_stack(&ns.client, &broken_good).await;
    eventually("hello to report InvalidSpec", WAIT, async || {
        let s = api.get("hello").await.ok()?;
        s.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Ready" && c.reason == "InvalidSpec")
    })
    .await;
    let writes: Vec<String> = audit
        .writes_since(&mark, |e| {
            e.user == OPERATOR_USER
                && e.namespace == ns.name
                && e.resource != "events"
                && e.resource != "opsconductorstacks"
        })
        .iter()
        .map(|e| format!("{} {}/{}", e.verb, e.resource, e.name))
        .collect();
    assert!(
        writes.is_empty(),
        "an invalid spec changed running objects: {writes:?}"
    );
    assert!(op.metric("opsconductor_reconciles_total") > 0.0);
}

#[tokio::test]
async fn what_the_schema_and_cel_can_reject_is_rejected_at_admission() {
    let Some(_op) = operator().await else { return };
    let Some(ns) = TestNamespace::new("admission").await else {
        return;
    };
    let api: Api<OpsConductorStack> = Api::namespaced(ns.client.clone(), &ns.name);
    type Case = (&'static str, fn(&mut serde_json::Value), &'static str);
    let cases: [Case; 4] = [
        (
            "duplicate names",
            |v| v["spec"]["services"][1]["name"] = "a".into(),
            "service names must be unique",
        ),
        (
            "route without slash",
            |v| v["spec"]["services"][0]["route"] = "/api".into(),
            "route must start and end with '/'",
        ),
        (
            "both tls sources",
            |v| {
                v["spec"]["tls"]["acme"] =
                    json!({"directoryUrl": "https://x.example/dir", "acceptTermsOfService": true})
            },
            "exactly one of tls.acme or tls.secretName",
        ),
        (
            "port out of range",
            |v| v["spec"]["services"][0]["port"] = 70000.into(),
            "spec.services[0].port",
        ),
    ];
    for (what, edit, message) in cases {
        let mut v = json!({
            "apiVersion": "opsconductor.io/v1alpha1", "kind": "OpsConductorStack",
            "metadata": {"name": "rejected", "namespace": ns.name},
            "spec": {"gateway": {"hosts": ["a.example.com"]}, "tls": {"secretName": "s"},
                     "services": [{"name": "a", "image": "a:1", "route": "/a/"}, {"name": "b", "image": "b:1"}]}
        });
        edit(&mut v);
        let err = api
            .patch(
                "rejected",
                &PatchParams::apply("opsconductor-tests"),
                &Patch::Apply(&v),
            )
            .await
            .expect_err(what);
        let text = err.to_string();
        assert!(text.contains(message), "{what}: {text}");
    }
}

#[tokio::test]
async fn status_and_printer_columns_explain_the_state() {
    let Some(_op) = operator().await else { return };
    let Some(ns) = TestNamespace::new("status").await else {
        return;
    };
    let mut stack = example("minimal.yaml", &ns.name);
    stack.spec.services.push(
        serde_json::from_value(json!({"name": "api", "image": "api:1", "replicas": 2})).unwrap(),
    );
    apply_stack(&ns.client, &stack).await;
    let first = converged(&ns.client, &ns.name, "hello")
        .await
        .status
        .unwrap();
    let cert = first
        .conditions
        .iter()
        .find(|c| c.type_ == "CertificateReady")
        .unwrap();
    assert_eq!(
        (cert.status.as_str(), cert.reason.as_str()),
        ("False", "SecretMissing")
    );
    assert_eq!(first.services.as_ref().unwrap().summary, "0/2");
    // No gateway pod runs (no kubelet here): which configuration they run is not known.
    let loaded = first
        .conditions
        .iter()
        .find(|c| c.type_ == "GatewayConfigLoaded")
        .unwrap();
    assert_eq!(
        (loaded.status.as_str(), loaded.reason.as_str()),
        ("Unknown", "NoPods")
    );

    // The user's certificate appears.
    // A real certificate: the operator checks chain, key and hosts of a user's Secret.
    let (crt, key) = opsconductor_operator::acme::cert::bootstrap(
        &stack.spec.gateway.hosts,
        std::time::SystemTime::now(),
    )
    .unwrap();
    let secrets: Api<Secret> = ns.api();
    secrets
        .patch("hello-cert", &PatchParams::apply("opsconductor-tests"), &Patch::Apply(json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls", "metadata": {"name": "hello-cert"},
            "stringData": {"tls.crt": crt, "tls.key": key}})))
        .await
        .unwrap();
    // Stand in for the kubelet: every pod the ReplicaSets created reports Running and Ready;
    // the real ReplicaSet and Deployment controllers turn that into ready replicas.
    let pods: Api<Pod> = ns.api();
    let api: Api<OpsConductorStack> = Api::namespaced(ns.client.clone(), &ns.name);
    let mut touch = 0;
    eventually("Ready=True", Duration::from_secs(60), || {
        touch += 1;
        let (pods, api) = (pods.clone(), api.clone());
        async move {
            for pod in pods.list(&ListParams::default()).await.ok()? {
                let ready = pod.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| {
                    c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                });
                if !ready {
                    let _ = pods
                        .patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Merge(json!({"status": {
                            "phase": "Running",
                            "conditions": [
                                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                                {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})))
                        .await;
                }
            }
            // The Secret is not watched: a touch of the stack makes the operator look again.
            let _ = api
                .patch("hello", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"annotations": {"touch": touch.to_string()}}})))
                .await;
            let s = api.get("hello").await.ok()?;
            s.status?.conditions.into_iter().find(|c| c.type_ == "Ready" && c.status == "True")
        }
    })
    .await;

    // Pods reported Running without an address (this test stands in for the kubelet): still
    // not known, and an Unknown condition does not hold Ready back.
    let now = api.get("hello").await.unwrap().status.unwrap();
    let loaded = now
        .conditions
        .iter()
        .find(|c| c.type_ == "GatewayConfigLoaded")
        .unwrap();
    assert_eq!(loaded.status, "Unknown", "{loaded:?}");

    let out = ns
        .control_plane
        .kubectl()
        .args(["get", "opsconductorstacks", "-n", &ns.name])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "READY",
            "SERVICES",
            "HOST",
            "CERTIFICATE",
            "EXPIRES",
            "VIOLATIONS",
            "AGE"
        ]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..5],
        ["hello", "True", "2/2", "hello.example.com", "Valid"],
        "{text}"
    );
    // EXPIRES: the notAfter parsed from the user's certificate (shown as a relative time),
    // then VIOLATIONS.
    assert_ne!(row[5], "0", "{text}");
    assert_eq!(row[6], "0", "{text}");
}

#[tokio::test]
async fn violations_by_other_objects_are_reported_and_cleared() {
    let Some(op) = operator().await else { return };
    let Some(ns) = TestNamespace::new("violations").await else {
        return;
    };
    apply_stack(&ns.client, &example("minimal.yaml", &ns.name)).await;
    converged(&ns.client, &ns.name, "hello").await;

    // The operator marks the namespace for the admission guardrails.
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(ns.client.clone());
    let marker = namespaces
        .get(&ns.name)
        .await
        .unwrap()
        .metadata
        .labels
        .unwrap_or_default()
        .get("opsconductor.io/protected")
        .cloned();
    assert_eq!(marker.as_deref(), Some("enforce"));

    // Someone else's NodePort Service and an Ingress, next to the stack.
    let services: Api<Service> = ns.api();
    let legacy = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "legacy-admin"},
        "spec": {"type": "NodePort", "selector": {"app": "legacy"}, "ports": [{"port": 80}]}});
    services
        .patch(
            "legacy-admin",
            &PatchParams::apply("someone-else"),
            &Patch::Apply(&legacy),
        )
        .await
        .unwrap();
    let ingresses: Api<k8s_openapi::api::networking::v1::Ingress> = ns.api();
    let ingress = json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "shortcut"},
        "spec": {"defaultBackend": {"service": {"name": "web", "port": {"number": 8000}}}}});
    ingresses
        .patch(
            "shortcut",
            &PatchParams::apply("someone-else"),
            &Patch::Apply(&ingress),
        )
        .await
        .unwrap();

    let api: Api<OpsConductorStack> = Api::namespaced(ns.client.clone(), &ns.name);
    let status = eventually("both violations in status", WAIT, async || {
        let s = api.get("hello").await.ok()?.status?;
        (s.violation_count == Some(2)).then_some(s)
    })
    .await;
    let found: Vec<(String, String)> = status
        .violations
        .iter()
        .map(|v| (v.kind.clone(), v.name.clone()))
        .collect();
    assert_eq!(
        found,
        [
            ("Ingress".to_string(), "shortcut".to_string()),
            ("Service".into(), "legacy-admin".into())
        ]
    );
    assert!(
        status.violations[1].reason.contains("NodePort"),
        "{:?}",
        status.violations[1]
    );
    let policy = status
        .conditions
        .iter()
        .find(|c| c.type_ == "PolicyEnforced")
        .unwrap();
    assert_eq!(
        (policy.status.as_str(), policy.reason.as_str()),
        ("False", "ViolationsFound")
    );
    let events = eventually("PolicyViolation events", WAIT, async || {
        let e = events_with_reason(&ns.client, &ns.name, "PolicyViolation").await;
        (e.len() == 2).then_some(e.join("\n"))
    })
    .await;
    assert!(
        events.contains("legacy-admin") && events.contains("shortcut"),
        "{events}"
    );
    assert!(op.metric("opsconductor_violations{namespace=") >= 2.0);
    // Nothing the operator does not manage is modified or deleted.
    assert_eq!(
        services
            .get("legacy-admin")
            .await
            .unwrap()
            .spec
            .unwrap()
            .type_
            .as_deref(),
        Some("NodePort")
    );

    // Fixed: the violations disappear.
    services
        .delete("legacy-admin", &DeleteParams::default())
        .await
        .unwrap();
    ingresses
        .delete("shortcut", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the violations to clear", WAIT, async || {
        let s = api.get("hello").await.ok()?.status?;
        let policy = s.conditions.iter().find(|c| c.type_ == "PolicyEnforced")?;
        (s.violation_count == Some(0) && s.violations.is_empty() && policy.status == "True")
            .then_some(())
    })
    .await;
    let resolved = events_with_reason(&ns.client, &ns.name, "ViolationResolved").await;
    assert_eq!(resolved.len(), 2, "{resolved:?}");

    // The last stack gone, the marker goes too.
    api.delete("hello", &DeleteParams::default()).await.unwrap();
    eventually("the namespace marker to be removed", WAIT, async || {
        let labels = namespaces
            .get(&ns.name)
            .await
            .ok()?
            .metadata
            .labels
            .unwrap_or_default();
        (!labels.contains_key("opsconductor.io/protected")).then_some(())
    })
    .await;
}

/// Issue 15: a change of routes reaches the gateway through its ConfigMap (which the pods'
/// reload loop applies in place, `tests/gateway_nginx.rs`): the gateway's pod template, and
/// so its generation, stay the same, i.e. no roll. The configuration names each routed
/// Service by its ClusterIP. A change of the image changes the template: a roll, drained
/// (`preStop`, termination grace, `maxUnavailable: 0`).
#[tokio::test]
async fn a_route_change_is_applied_without_a_roll_and_an_image_change_rolls() {
    let Some(_op) = operator().await else { return };
    let Some(ns) = TestNamespace::new("noroll").await else {
        return;
    };
    let mut stack = example("opsconductor.yaml", &ns.name);
    apply_stack(&ns.client, &stack).await;
    converged(&ns.client, &ns.name, "prod").await;
    let deployments: Api<Deployment> = ns.api();
    let config_maps: Api<ConfigMap> = ns.api();
    let services: Api<Service> = ns.api();
    let config = || async {
        config_maps
            .get("prod-gateway-config")
            .await
            .unwrap()
            .data
            .unwrap()["nginx.conf"]
            .clone()
    };
    // Every routed Service by its ClusterIP, once the operator's cache has seen them.
    let auth_ip = services
        .get("auth")
        .await
        .unwrap()
        .spec
        .unwrap()
        .cluster_ip
        .unwrap();
    let with_ips = eventually(
        "the ClusterIPs in the gateway configuration",
        WAIT,
        async || {
            let text = config().await;
            (text.contains(&format!("server {auth_ip}:8000 max_fails=0;"))
                && !text.contains("return 503;"))
            .then_some(text)
        },
    )
    .await;
    assert!(!with_ips.contains(".svc.cluster.local"), "{with_ips}");
    assert!(!with_ips.contains("resolver"), "{with_ips}");

    let gateway = deployments.get("prod-gateway").await.unwrap();
    let generation = gateway.metadata.generation;
    let template = serde_json::to_value(&gateway.spec.as_ref().unwrap().template).unwrap();
    let pod = &template["spec"];
    assert_eq!(
        pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][0],
        "sleep"
    );
    assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap() > 60 + 15);
    assert_eq!(
        gateway
            .spec
            .as_ref()
            .unwrap()
            .strategy
            .as_ref()
            .unwrap()
            .rolling_update
            .as_ref()
            .unwrap()
            .max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0))
    );

    // A route moves: the configuration changes, the pod template does not.
    // (users: its route has no public paths of edge authentication that would have to move
    // with it.)
    let users = stack
        .spec
        .services
        .iter_mut()
        .find(|s| s.name == "users")
        .unwrap();
    users.route = Some("/api/v2/users/".into());
    apply_stack(&ns.client, &stack).await;
    converged(&ns.client, &ns.name, "prod").await;
    eventually(
        "the new route in the gateway configuration",
        WAIT,
        async || {
            config()
                .await
                .contains("location /api/v2/users/ {")
                .then_some(())
        },
    )
    .await;
    let after = deployments.get("prod-gateway").await.unwrap();
    assert_eq!(
        serde_json::to_value(&after.spec.as_ref().unwrap().template).unwrap(),
        template,
        "a route change must not change the gateway's pod template (it would roll the pods)"
    );
    assert_eq!(after.metadata.generation, generation);

    // The image changes: the template changes, the Deployment rolls.
    stack.spec.gateway.image = "example.test/opsconductor-gateway:2".into();
    apply_stack(&ns.client, &stack).await;
    converged(&ns.client, &ns.name, "prod").await;
    let rolled = eventually(
        "the new image in the gateway's pod template",
        WAIT,
        async || {
            let d = deployments.get("prod-gateway").await.unwrap();
            let image = d.spec.as_ref()?.template.spec.as_ref()?.containers[0]
                .image
                .clone()?;
            (image == "example.test/opsconductor-gateway:2").then_some(d)
        },
    )
    .await;
    assert!(rolled.metadata.generation > generation);
}

/// The versions a watch saw, as (resourceVersion, object).
type Seen<K> = std::sync::Arc<std::sync::Mutex<Vec<(u64, K)>>>;

/// Every version of the objects named `name` of kind `K` in `ns` that a watch sees, as
/// (resourceVersion, object), collected until the returned handle is aborted.
fn versions<K>(client: &Client, ns: &str, name: &str) -> (Seen<K>, tokio::task::JoinHandle<()>)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
    <K as kube::Resource>::DynamicType: Default,
{
    use futures::StreamExt;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let config = kube::runtime::watcher::Config::default().fields(&format!("metadata.name={name}"));
    let out = seen.clone();
    let task = tokio::spawn(async move {
        let mut stream = kube::runtime::watcher(api, config).boxed();
        while let Some(event) = stream.next().await {
            let objects = match event {
                Ok(kube::runtime::watcher::Event::Apply(o))
                | Ok(kube::runtime::watcher::Event::InitApply(o)) => vec![o],
                _ => continue,
            };
            for o in objects {
                let rv = o
                    .resource_version()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                out.lock().unwrap().push((rv, o));
            }
        }
    });
    (seen, task)
}

/// The gateway is created only once its configuration has an address for every routed
/// service: its pods start with the configuration they mount then, and a route without an
/// address answers 503 until the kubelet brings the next one, a minute or more, while the
/// stack says Ready (seen on the node). Watches on the gateway ConfigMap and Deployment, from
/// before the stack exists, show which configuration existed when the Deployment was created.
#[tokio::test]
async fn the_gateway_is_created_with_an_address_for_every_route() {
    let Some(_op) = operator().await else { return };
    let Some(ns) = TestNamespace::new("first-config").await else {
        return;
    };
    let (configs, config_watch) =
        versions::<ConfigMap>(&ns.client, &ns.name, "prod-gateway-config");
    let (deployments, deployment_watch) =
        versions::<Deployment>(&ns.client, &ns.name, "prod-gateway");
    // Both watches are established before the stack exists (an empty list first).
    tokio::time::sleep(Duration::from_secs(1)).await;
    apply_stack(&ns.client, &example("opsconductor.yaml", &ns.name)).await;
    converged(&ns.client, &ns.name, "prod").await;
    eventually("the gateway Deployment to be seen", WAIT, || async {
        (!deployments.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    let complete = |c: &ConfigMap| {
        !c.data
            .as_ref()
            .and_then(|d| d.get("nginx.conf"))
            .expect("nginx.conf in the gateway ConfigMap")
            .contains("No ClusterIP")
    };
    eventually("the configuration to have every address", WAIT, || async {
        configs
            .lock()
            .unwrap()
            .last()
            .is_some_and(|(_, c)| complete(c))
            .then_some(())
    })
    .await;
    config_watch.abort();
    deployment_watch.abort();
    let created = deployments.lock().unwrap()[0].0;
    let configs = configs.lock().unwrap();
    let before: Vec<(u64, bool)> = configs
        .iter()
        .map(|(rv, c)| (*rv, complete(c)))
        .filter(|(rv, _)| *rv < created)
        .collect();
    assert!(
        before.last().is_some_and(|(_, complete)| *complete),
        "the gateway Deployment was created (resourceVersion {created}) when its configuration \
         was (resourceVersion, every route has an address): {before:?}"
    );
}
