//! Faults: the operator keeps working across a restart of the real kube-apiserver, without
//! being restarted itself. Its own test binary, because the restart affects every test that
//! runs at the same time.

mod support;

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use opsconductor_operator::crd::OpsConductorStack;
use serde_json::json;
use support::operator::{apply_stack, example, operator};
use support::process::{OperatorProcess, Spawn};
use support::{TestNamespace, eventually};

/// The tests of this file run one at a time: a restart must not hit the other test.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn the_operator_recovers_from_an_api_server_restart() {
    let _serial = SERIAL.lock().await;
    let Some(op) = operator().await else { return };
    let Some(ns) = TestNamespace::new("restart").await else {
        return;
    };
    apply_stack(&ns.client, &example("opsconductor.yaml", &ns.name)).await;
    let stacks: Api<OpsConductorStack> = Api::namespaced(ns.client.clone(), &ns.name);
    eventually(
        "the stack to converge",
        Duration::from_secs(30),
        async || {
            let s = stacks.get("prod").await.ok()?;
            (s.status?.observed_generation == s.metadata.generation).then_some(())
        },
    )
    .await;

    let script = support::controlplane::repo_root().join("scripts/controlplane");
    let status = Command::new(&script)
        .arg("restart-apiserver")
        .status()
        .expect("scripts/controlplane runs");
    assert!(
        status.success(),
        "scripts/controlplane restart-apiserver failed"
    );

    // Changes made right after the restart are still seen and handled: drift is reverted,
    // a deleted policy comes back, and a spec change is applied.
    let services: Api<Service> = ns.api();
    let policies: Api<NetworkPolicy> = ns.api();
    eventually(
        "the restarted API server to accept writes",
        Duration::from_secs(60),
        async || {
            services
                .patch(
                    "auth",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"type": "NodePort"}})),
                )
                .await
                .ok()
        },
    )
    .await;
    policies
        .delete("prod-default-deny", &DeleteParams::default())
        .await
        .unwrap();
    let mut stack = example("opsconductor.yaml", &ns.name);
    stack.spec.services[1].replicas = 3;
    apply_stack(&ns.client, &stack).await;

    eventually(
        "drift after the restart to be reverted",
        Duration::from_secs(60),
        async || {
            let auth = services.get("auth").await.ok()?.spec?;
            let deny = policies.get_opt("prod-default-deny").await.ok()??;
            let users = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(
                ns.client.clone(),
                &ns.name,
            )
            .get("users")
            .await
            .ok()?;
            (auth.type_.as_deref() == Some("ClusterIP")
                && deny.metadata.deletion_timestamp.is_none()
                && users.spec?.replicas == Some(3))
            .then_some(())
        },
    )
    .await;
    assert!(op.metric("opsconductor_reconciles_total{result=\"ok\"}") > 0.0);
}

#[tokio::test]
async fn sigterm_shuts_the_operator_down_cleanly() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = support::control_plane() else {
        return;
    };
    support::operator::install_crd(cp).await;
    let mut op = OperatorProcess::spawn(Spawn {
        name: "sigterm",
        kubeconfig: &cp.kubeconfig,
        log_dir: &cp.state_dir.join("controller-faults-tests"),
        args: &[],
        env: &[],
    });
    let addr = op.metrics_addr.clone();
    eventually("/readyz", Duration::from_secs(30), async || {
        support::operator::http_get(&addr, "/readyz").map(|_| ())
    })
    .await;
    let health = support::operator::http_get(&addr, "/healthz").unwrap();
    assert_eq!(health, "ok\n");
    let metrics = op.metrics();
    assert!(
        metrics.contains("# TYPE opsconductor_reconcile_duration_seconds histogram"),
        "{metrics}"
    );
    op.signal("-TERM");
    let status = op.wait_exit(Duration::from_secs(30));
    let log = op.log_text();
    assert!(status.success(), "exit status {status}; log:\n{log}");
    assert!(log.contains("SIGTERM received, shutting down"), "{log}");
    assert!(log.contains("controller stopped"), "{log}");
}
