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
    eventually("the stack to converge", Duration::from_secs(30), || async {
        let s = stacks.get("prod").await.ok()?;
        (s.status?.observed_generation == s.metadata.generation).then_some(())
    })
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
        || async {
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
        || async {
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
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_opsconductor-operator"))
        .args(["run", "--metrics-addr", &addr])
        .env("KUBECONFIG", &cp.kubeconfig)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually("/readyz", Duration::from_secs(30), || async {
        support::operator::http_get(&addr, "/readyz").map(|_| ())
    })
    .await;
    let health = support::operator::http_get(&addr, "/healthz").unwrap();
    assert_eq!(health, "ok\n");
    let metrics = support::operator::http_get(&addr, "/metrics").unwrap();
    assert!(
        metrics.contains("# TYPE opsconductor_reconcile_duration_seconds histogram"),
        "{metrics}"
    );
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = eventually(
        "the operator to exit after SIGTERM",
        Duration::from_secs(30),
        || {
            let status = child.try_wait().unwrap();
            async move { status }
        },
    )
    .await;
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "exit status {status}; log:\n{stderr}");
    assert!(
        stderr.contains("SIGTERM received, shutting down"),
        "{stderr}"
    );
    assert!(stderr.contains("controller stopped"), "{stderr}");
}
