//! End to end on a real node (issue 13): the operator and every stack run as pods on the
//! one-node cluster of `scripts/cluster` (docs/node.md), from the project's own images.
//!
//! The user's path, first slice:
//! - `helm upgrade --install` of charts/opsconductor-operator with the local operator image:
//!   two operator pods Running and Ready, and one of them holds the leader Lease;
//! - a stack applied with `kubectl apply`, its gateway and services from the local images, with
//!   a certificate the user brings: it becomes Ready, and every pod of it is Running and Ready,
//!   so the gateway's readiness probe passed in a real pod (read-only root, its uid, its mounts,
//!   its command and reload loop), and the services' probes too.
//!
//! Needs root and the node (see tests/support/node.rs for the skip policy: none under CI=true).
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use opsconductor_operator::crd::OpsConductorStack;

use support::eventually;
use support::node::{Cluster, NodeNamespace, cluster};

const RELEASE: &str = "opsconductor-operator";
const RELEASE_NS: &str = "opsconductor-system";
const LEASE: &str = "opsconductor-operator";

/// `helm <args>` against the cluster, with helm's caches in a private dir; stdout or a panic.
fn helm(cluster: &Cluster, args: &[&str]) -> String {
    let helm = support::tools_bin_dir()
        .expect("helm is available when the node is")
        .join("helm");
    let home = std::env::temp_dir().join(format!("opsc-helm-node-{}", std::process::id()));
    let out = Command::new(&helm)
        .args(args)
        .current_dir(support::controlplane::repo_root())
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .stdin(Stdio::null())
        .output()
        .expect("helm runs");
    assert!(
        out.status.success(),
        "helm {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `localhost/opsconductor/operator:HASH` -> (repository, tag).
fn split_ref(image: &str) -> (&str, &str) {
    image
        .rsplit_once(':')
        .filter(|(repo, _)| !repo.is_empty())
        .unwrap_or_else(|| panic!("image ref {image} has no tag"))
}

static INSTALLED: OnceLock<()> = OnceLock::new();

/// Installs (or upgrades to the current image) the chart's release once per test binary.
fn install_operator(cluster: &Cluster) {
    INSTALLED.get_or_init(|| {
        let (repo, tag) = split_ref(cluster.image("operator"));
        helm(
            cluster,
            &[
                "upgrade",
                "--install",
                RELEASE,
                "charts/opsconductor-operator",
                "--namespace",
                RELEASE_NS,
                "--create-namespace",
                "--set",
                &format!("image.repository={repo}"),
                "--set",
                &format!("image.tag={tag}"),
                // Imported into containerd, never pulled.
                "--set",
                "image.pullPolicy=Never",
            ],
        );
    });
}

fn pod_ready(p: &Pod) -> bool {
    let status = p.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn describe_pods(cluster: &Cluster, ns: &str) -> String {
    let out = cluster
        .kubectl()
        .args(["-n", ns, "get", "pods,events", "-o", "wide"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    format!("kubectl -n {ns} get pods,events:\n{out}")
}

#[tokio::test]
async fn helm_install_runs_two_operator_pods_and_one_holds_the_lease() {
    let Some(cluster) = cluster() else { return };
    install_operator(cluster);
    let client = cluster.client().await;
    let image = cluster.image("operator").to_string();
    let pods: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NS);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), RELEASE_NS);

    // The rollout of this image is complete: two pods of it Running and Ready, no other.
    let names = eventually(
        "two operator pods of the local image Running and Ready",
        Duration::from_secs(180),
        || async {
            let d = deployments.get_opt(RELEASE).await.ok()??;
            let st = d.status.as_ref()?;
            (st.updated_replicas == Some(2)
                && st.ready_replicas == Some(2)
                && st.replicas == Some(2))
            .then_some(())?;
            let list = pods
                .list(&ListParams::default().labels("app.kubernetes.io/component=operator"))
                .await
                .ok()?;
            let live: Vec<&Pod> = list
                .items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect();
            (live.len() == 2).then_some(())?;
            live.iter()
                .all(|p| {
                    pod_ready(p)
                        && p.spec.as_ref().is_some_and(|s| {
                            s.containers
                                .iter()
                                .all(|c| c.image.as_deref() == Some(&image))
                        })
                })
                .then(|| live.iter().map(|p| p.name_any()).collect::<Vec<_>>())
        },
    )
    .await;
    eprintln!("operator pods: {names:?}");

    // One of them (and only one: the identity names one pod) holds the Lease.
    let leases: Api<Lease> = Api::namespaced(client.clone(), RELEASE_NS);
    let holder = eventually(
        "one of the two operator pods to hold the Lease",
        Duration::from_secs(60),
        || async {
            let l = leases.get_opt(LEASE).await.ok()??;
            let holder = l.spec?.holder_identity?;
            names
                .iter()
                .any(|n| holder.starts_with(&format!("{n}_")))
                .then_some(holder)
        },
    )
    .await;
    eprintln!("Lease {RELEASE_NS}/{LEASE} held by {holder}");
}

/// A self-signed certificate for `host` as a kubernetes.io/tls Secret (openssl, as the user
/// would bring one).
fn tls_secret(cluster: &Cluster, ns: &str, name: &str, host: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, crt) = (dir.path().join("tls.key"), dir.path().join("tls.crt"));
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .args(["-subj", &format!("/CN={host}")])
        .args(["-addext", &format!("subjectAltName=DNS:{host}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(status.success(), "openssl req failed");
    cluster.kubectl_ok(&[
        "-n",
        ns,
        "create",
        "secret",
        "tls",
        name,
        &format!("--cert={}", path_str(&crt)),
        &format!("--key={}", path_str(&key)),
    ]);
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[tokio::test]
async fn a_stack_of_local_images_becomes_ready_with_every_pod_running_and_ready() {
    let Some(cluster) = cluster() else { return };
    install_operator(cluster);
    let Some(ns) = NodeNamespace::new("node-stack").await else {
        return;
    };
    let host = "e2e.opsconductor.test";
    tls_secret(cluster, &ns.name, "e2e-cert", host);
    let manifest = format!(
        r#"apiVersion: opsconductor.io/v1alpha1
kind: OpsConductorStack
metadata:
  name: e2e
  namespace: {ns}
spec:
  gateway:
    hosts: [{host}]
    image: {gateway}
    replicas: 1
    serviceType: NodePort
  tls:
    secretName: e2e-cert
  services:
    - name: web
      image: {svc}
      route: /
      calls: [api]
      env: [{{name: SERVICE_NAME, value: web}}]
    - name: api
      image: {svc}
      route: /api/
      env: [{{name: SERVICE_NAME, value: api}}]
"#,
        ns = ns.name,
        gateway = cluster.image("gateway"),
        svc = cluster.image("test-service"),
    );
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), manifest).expect("writing the stack");
    cluster.kubectl_ok(&["apply", "-f", path_str(file.path())]);

    let stacks: Api<OpsConductorStack> = ns.api();
    let ready = eventually(
        "the stack's Ready condition to be True",
        Duration::from_secs(240),
        || async {
            let s = stacks.get_opt("e2e").await.ok()??;
            let st = s.status?;
            let c = st.conditions.iter().find(|c| c.type_ == "Ready")?;
            (c.status == "True").then(|| c.message.clone())
        },
    )
    .await;
    eprintln!("stack Ready: {ready}");
    assert_eq!(
        cluster
            .kubectl_ok(&[
                "-n",
                &ns.name,
                "get",
                "opsconductorstacks",
                "e2e",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ])
            .trim(),
        "True",
        "kubectl get opsconductorstacks shows Ready"
    );

    // Every pod of the stack: the gateway and both services, each Running and Ready.
    let pods: Api<Pod> = ns.api();
    let list = pods
        .list(&ListParams::default())
        .await
        .expect("listing pods");
    let mut by_image: Vec<(String, String, bool)> = list
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let image = p
                .spec
                .as_ref()
                .and_then(|s| s.containers.first())
                .and_then(|c| c.image.clone())
                .unwrap_or_default();
            (p.name_any(), image, pod_ready(p))
        })
        .collect();
    by_image.sort();
    let gateways = by_image
        .iter()
        .filter(|(_, i, _)| i == cluster.image("gateway"))
        .count();
    let services = by_image
        .iter()
        .filter(|(_, i, _)| i == cluster.image("test-service"))
        .count();
    assert!(
        gateways == 1 && services == 2 && by_image.iter().all(|(_, _, ready)| *ready),
        "expected 1 gateway and 2 service pods, all Running and Ready; got {by_image:?}\n{}",
        describe_pods(cluster, &ns.name)
    );
}
