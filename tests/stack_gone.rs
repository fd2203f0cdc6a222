//! What is left when a stack is gone, against the real control plane and the real operator
//! binary: nothing. The namespace marker goes and the stack's metric series go, whether the
//! operator saw the stack's Delete event or not.
//!
//! Its own test binary: each test starts and kills its own operator processes, and no other
//! operator may run meanwhile (one would see the Delete event the test makes sure is missed).

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::DeleteParams;
use opsconductor_operator::crd::OpsConductorStack;
use support::controlplane::ControlPlane;
use support::operator::{apply_stack, example, install_crd};
use support::process::{OperatorProcess, Spawn};
use support::{TestNamespace, eventually};

const WAIT: Duration = Duration::from_secs(30);
const MARKER: &str = "opsconductor.io/protected";

/// The tests of this file run one at a time: each owns the only operator.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts an operator process of this test's own and waits for its caches (`/readyz`).
async fn own_operator(cp: &ControlPlane) -> OperatorProcess {
    let op = OperatorProcess::spawn(Spawn {
        name: "stack-gone",
        kubeconfig: &cp.kubeconfig,
        log_dir: &cp.state_dir.join("stack-gone-tests"),
        args: &[],
        env: &[],
    });
    eventually("the operator's /readyz", WAIT, async || {
        op.ready().then_some(())
    })
    .await;
    op
}

async fn marker(namespaces: &Api<Namespace>, name: &str) -> Option<Option<String>> {
    let ns = namespaces.get(name).await.ok()?;
    Some(ns.metadata.labels.unwrap_or_default().get(MARKER).cloned())
}

async fn wait_stack_gone(stacks: &Api<OpsConductorStack>, name: &str) {
    eventually("the stack to be gone", WAIT, async || {
        stacks.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await;
}

/// The operator is down while the stack is deleted: the restarted operator's first list has
/// no such stack and no Delete event ever comes. The marker must still go.
#[tokio::test]
async fn the_marker_goes_when_the_stack_was_deleted_while_the_operator_was_down() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = support::control_plane() else {
        return;
    };
    install_crd(cp).await;
    let Some(ns) = TestNamespace::new("gone-down").await else {
        return;
    };
    let namespaces: Api<Namespace> = Api::all(ns.client.clone());
    let stacks: Api<OpsConductorStack> = ns.api();

    let mut op = own_operator(cp).await;
    apply_stack(&ns.client, &example("minimal.yaml", &ns.name)).await;
    eventually("the namespace marker to be set", WAIT, async || {
        (marker(&namespaces, &ns.name).await?.as_deref() == Some("enforce")).then_some(())
    })
    .await;
    op.kill();

    stacks
        .delete("hello", &DeleteParams::background())
        .await
        .unwrap();
    wait_stack_gone(&stacks, "hello").await;
    assert_eq!(
        marker(&namespaces, &ns.name).await,
        Some(Some("enforce".into())),
        "nothing else may remove the marker while the operator is down"
    );

    let _op = own_operator(cp).await;
    eventually(
        "the marker of a namespace whose last stack went while the operator was down to be removed",
        WAIT,
        async || marker(&namespaces, &ns.name).await?.is_none().then_some(()),
    )
    .await;
}

/// `kubectl delete` (a background delete) never shows the operator a deletionTimestamp: the
/// stack just vanishes from its cache. Its metric series must go with it.
#[tokio::test]
async fn a_background_delete_drops_the_stacks_metric_series() {
    let _serial = SERIAL.lock().await;
    let Some(cp) = support::control_plane() else {
        return;
    };
    install_crd(cp).await;
    let Some(ns) = TestNamespace::new("gone-metrics").await else {
        return;
    };
    let stacks: Api<OpsConductorStack> = ns.api();
    let namespaces: Api<Namespace> = Api::all(ns.client.clone());
    let op = own_operator(cp).await;
    let series = format!(
        "opsconductor_violations{{namespace=\"{}\",name=\"hello\"}}",
        ns.name
    );

    apply_stack(&ns.client, &example("minimal.yaml", &ns.name)).await;
    eventually("the stack's violations series", WAIT, async || {
        op.metrics().contains(&series).then_some(())
    })
    .await;

    stacks
        .delete("hello", &DeleteParams::background())
        .await
        .unwrap();
    wait_stack_gone(&stacks, "hello").await;
    eventually(
        "the deleted stack's series to leave /metrics",
        WAIT,
        async || (!op.metrics().contains(&series)).then_some(()),
    )
    .await;
    eventually("the namespace marker to be removed", WAIT, async || {
        marker(&namespaces, &ns.name).await?.is_none().then_some(())
    })
    .await;
}
