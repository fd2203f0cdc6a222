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
use kube::api::{DeleteParams, ListParams};
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
                // The test's pebble listens on the node address at this port (not 443).
                "--set",
                &format!("networkPolicy.acme.ports={{443,{PEBBLE_PORT}}}"),
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

    // Failover: the leader pod is deleted (SIGTERM: it hands the Lease over as it stops), and
    // another live operator pod takes the Lease: the standby, or the leader's replacement when
    // its first try comes before the standby's next retry (both are standbys then).
    let leader = names
        .iter()
        .find(|n| holder.starts_with(&format!("{n}_")))
        .expect("the holder is one of the pods")
        .clone();
    pods.delete(&leader, &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("deleting the leader pod {leader}: {e}"));
    let (new_holder, pod) = eventually(
        "another live operator pod to take the Lease after the leader pod's deletion",
        Duration::from_secs(60),
        || async {
            let h = leases.get_opt(LEASE).await.ok()??.spec?.holder_identity?;
            let (pod, _) = h.rsplit_once('_')?;
            if pod == leader {
                return None;
            }
            let p = pods.get_opt(pod).await.ok()??;
            (p.metadata.deletion_timestamp.is_none() && pod_ready(&p))
                .then(|| (h.clone(), pod.to_string()))
        },
    )
    .await;
    eprintln!(
        "leader pod {leader} deleted; Lease now held by {new_holder} ({})",
        if names.contains(&pod) {
            "the standby"
        } else {
            "the leader's replacement"
        }
    );
    // The Deployment replaces the deleted pod: two Ready replicas again (for the next test).
    eventually(
        "the operator Deployment back at two Ready replicas",
        Duration::from_secs(120),
        || async {
            let st = deployments.get_opt(RELEASE).await.ok()??.status?;
            (st.ready_replicas == Some(2) && st.replicas == Some(2)).then_some(())
        },
    )
    .await;
}

/// A self-signed certificate for `host` as a kubernetes.io/tls Secret (openssl, as the user
/// would bring one). The returned dir holds `tls.crt`, the client's trust anchor.
fn tls_secret(cluster: &Cluster, ns: &str, name: &str, host: &str) -> tempfile::TempDir {
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
    dir
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `kubectl exec <target> -- timeout 5 wget -qO- <url>` (busybox wget: its own `-T` crashes
/// in Debian 12's busybox-static); the body when the request succeeded.
fn wget_from(cluster: &Cluster, ns: &str, target: &str, url: &str) -> Option<String> {
    let out = cluster
        .kubectl()
        .args([
            "-n", ns, "exec", target, "--", "timeout", "5", "wget", "-qO-", url,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("kubectl runs");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `curl` from this machine (the node) with the host resolved to the node address; returns the
/// status line's code, the response headers and the body, or None when curl failed.
fn try_curl_node(args: &[&str]) -> Option<(u16, String, String)> {
    let out = Command::new("curl")
        .args(["-s", "-S", "--max-time", "10", "-D", "-"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("curl runs");
    if !out.status.success() {
        eprintln!(
            "curl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Some((code, head.to_ascii_lowercase(), body.to_string()))
}

fn curl_node(args: &[&str]) -> (u16, String, String) {
    try_curl_node(args).unwrap_or_else(|| panic!("curl {args:?} failed (its error is above)"))
}

#[tokio::test]
async fn a_stack_of_local_images_becomes_ready_serves_through_its_gateway_and_its_policies_hold() {
    let Some(cluster) = cluster() else { return };
    install_operator(cluster);
    let Some(ns) = NodeNamespace::new("node-stack").await else {
        return;
    };
    let host = "e2e.opsconductor.test";
    let cert_dir = tls_secret(cluster, &ns.name, "e2e-cert", host);
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

    // Traffic through the gateway pod, reached through its NodePort Service on the node's
    // address: each route lands on its service with the prefix kept, plain HTTP redirects to
    // HTTPS, and HSTS is sent.
    let node_port = |port: &str| {
        cluster
            .kubectl_ok(&[
                "-n",
                &ns.name,
                "get",
                "service",
                "e2e-gateway",
                "-o",
                &format!("jsonpath={{.spec.ports[?(@.port=={port})].nodePort}}"),
            ])
            .trim()
            .to_string()
    };
    let (https, http) = (node_port("443"), node_port("80"));
    assert!(
        !https.is_empty() && !http.is_empty(),
        "the gateway Service has NodePorts for 80 and 443"
    );
    let node = "10.250.0.1";
    let ca = cert_dir.path().join("tls.crt");
    // The Service's endpoint reaches kube-proxy's rules a moment after the pod is Ready: wait
    // until the gateway answers at all, then check what it answers.
    let probe = [
        "--cacert".to_string(),
        path_str(&ca).to_string(),
        "--resolve".to_string(),
        format!("{host}:{https}:{node}"),
        format!("https://{host}:{https}/"),
    ];
    let probe: Vec<&str> = probe.iter().map(String::as_str).collect();
    eventually(
        "the gateway to answer through its NodePort",
        Duration::from_secs(30),
        || async { try_curl_node(&probe).map(|_| ()) },
    )
    .await;
    for (path, service) in [("/api/v1/items?x=1", "api"), ("/some/page", "web")] {
        let (code, head, body) = curl_node(&[
            "--cacert",
            path_str(&ca),
            "--resolve",
            &format!("{host}:{https}:{node}"),
            &format!("https://{host}:{https}{path}"),
        ]);
        let echo: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{path}: not the test service's JSON ({e}): {body}"));
        assert_eq!(code, 200, "{path}: {head}{body}");
        assert_eq!(echo["service"], service, "{path} reaches {service}: {body}");
        assert_eq!(echo["uri"], path, "{path}: the prefix is kept: {body}");
        assert!(
            head.contains("strict-transport-security:"),
            "{path}: HSTS header missing: {head}"
        );
    }
    let (code, head, _) = curl_node(&[
        "--resolve",
        &format!("{host}:{http}:{node}"),
        &format!("http://{host}:{http}/api/v1/items"),
    ]);
    assert!(
        (301..=308).contains(&code) && head.contains(&format!("location: https://{host}")),
        "plain HTTP redirects to HTTPS: {code} {head}"
    );

    // A killed gateway container is restarted by the kubelet, and the gateway serves again.
    let gateway_pod = list
        .items
        .iter()
        .find(|p| {
            p.spec
                .as_ref()
                .and_then(|s| s.containers.first())
                .and_then(|c| c.image.as_deref())
                == Some(cluster.image("gateway"))
        })
        .expect("the gateway pod")
        .name_any();
    let container_status = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.first().cloned())
    };
    let before = container_status(&pods.get(&gateway_pod).await.expect("gateway pod"))
        .expect("the gateway container's status");
    let container_id = before
        .container_id
        .as_deref()
        .and_then(|id| id.strip_prefix("containerd://"))
        .expect("a containerd container id")
        .to_string();
    let out = Command::new(cluster.node_bin_dir.join("crictl"))
        .arg("--runtime-endpoint")
        .arg(format!("unix://{}", cluster.containerd_socket.display()))
        .args(["stop", "--timeout", "0", &container_id])
        .output()
        .expect("crictl runs");
    assert!(
        out.status.success(),
        "crictl stop {container_id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(
        "the kubelet to restart the killed gateway container, Ready again",
        Duration::from_secs(120),
        || async {
            let p = pods.get_opt(&gateway_pod).await.ok()??;
            let now = container_status(&p)?;
            (now.restart_count > before.restart_count && pod_ready(&p)).then_some(())
        },
    )
    .await;
    // Serving again once kube-proxy has the endpoint back (a moment after the pod is Ready).
    let args = [
        "--cacert".to_string(),
        path_str(&ca).to_string(),
        "--resolve".to_string(),
        format!("{host}:{https}:{node}"),
        format!("https://{host}:{https}/api/after-restart"),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    eventually(
        "the restarted gateway to serve HTTPS again",
        Duration::from_secs(30),
        || async {
            let (code, _, body) = try_curl_node(&args)?;
            (code == 200 && body.contains("\"service\":\"api\"")).then_some(())
        },
    )
    .await;

    // Enforcement by the network plugin, with real connections from real pods.
    // `calls: [api]`: web reaches api; api does not reach web.
    let api_from_web = eventually("web to reach api", Duration::from_secs(60), || async {
        wget_from(cluster, &ns.name, "deploy/web", "http://api:8000/from-web")
    })
    .await;
    assert!(
        api_from_web.contains("\"service\":\"api\""),
        "{api_from_web}"
    );
    assert_eq!(
        wget_from(cluster, &ns.name, "deploy/api", "http://web:8000/from-api"),
        None,
        "api must not reach web (web does not list it in calls)"
    );
    // DNS works from the stack's pods (the policies' DNS rule, to the kube-dns pods): the
    // Service's name resolves to its ClusterIP. (busybox nslookup's exit status also counts
    // the search-domain misses and AAAA, so the answer itself is checked.)
    let cluster_ip = cluster
        .kubectl_ok(&[
            "-n",
            &ns.name,
            "get",
            "service",
            "web",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .trim()
        .to_string();
    let fqdn = format!("web.{}.svc.cluster.local.", ns.name);
    let dns = cluster
        .kubectl()
        .args([
            "-n",
            &ns.name,
            "exec",
            "deploy/api",
            "--",
            "nslookup",
            &fqdn,
        ])
        .output()
        .expect("kubectl runs");
    let answer = String::from_utf8_lossy(&dns.stdout);
    assert!(
        !cluster_ip.is_empty() && answer.contains(&format!("Address: {cluster_ip}")),
        "nslookup {fqdn} from the api pod answers {cluster_ip}: {answer}{}",
        String::from_utf8_lossy(&dns.stderr)
    );
    // A pod in the stack's namespace that is not part of the stack reaches no service.
    let stranger = format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: stranger, namespace: {ns}}}
spec:
  securityContext: {{runAsNonRoot: true, runAsUser: 65532, seccompProfile: {{type: RuntimeDefault}}}}
  containers:
  - name: c
    image: {svc}
    imagePullPolicy: Never
    command: [sleep, "3600"]
    securityContext: {{allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {{drop: [ALL]}}}}
"#,
        ns = ns.name,
        svc = cluster.image("test-service"),
    );
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), stranger).expect("writing the pod");
    cluster.kubectl_ok(&["apply", "-f", path_str(file.path())]);
    eventually(
        "the stranger pod Running and Ready",
        Duration::from_secs(60),
        || async {
            pods.get_opt("stranger")
                .await
                .ok()?
                .filter(pod_ready)
                .map(|_| ())
        },
    )
    .await;
    // Its network works (a positive control: DNS through kube-dns answers it)...
    let control = cluster
        .kubectl()
        .args(["-n", &ns.name, "exec", "stranger", "--", "nslookup", &fqdn])
        .output()
        .expect("kubectl runs");
    assert!(
        String::from_utf8_lossy(&control.stdout).contains(&format!("Address: {cluster_ip}")),
        "the stranger pod resolves {fqdn}: {}",
        String::from_utf8_lossy(&control.stdout)
    );
    // ...but the policies let it reach neither service.
    for url in ["http://web:8000/health", "http://api:8000/health"] {
        assert_eq!(
            wget_from(cluster, &ns.name, "stranger", url),
            None,
            "a pod outside the stack must not reach {url}"
        );
    }
}

/// pebble's ACME port on the node address (the chart's ACME egress rule names it).
const PEBBLE_PORT: u16 = 14000;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A child process killed when dropped.
struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_tcp(addr: &str, what: &str, child: &mut std::process::Child) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "{what} exited"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not listen on {addr} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test]
async fn the_certificate_comes_from_pebble_through_the_gateway_pod() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let Some(cluster) = cluster() else { return };
    install_operator(cluster);
    let Some(ns) = NodeNamespace::new("node-acme").await else {
        return;
    };
    let tools = support::tools_bin_dir().expect("tools");
    let node = "10.250.0.1";
    let host = "acme.opsconductor.test";

    // pebble's own TLS: a CA and a certificate for the node address, where the operator pods
    // reach it.
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "pebble node TLS CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![node.to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.path().join("cert.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();

    // pebble-challtestsrv as pebble's DNS: every name is the gateway Service's ClusterIP (set
    // below, once the operator has made the Service); HTTP-01 goes to its port 80.
    let (dns_port, challtest_mgmt, pebble_mgmt) = (free_port(), free_port(), free_port());
    let mut challtest = Command::new(tools.join("pebble-challtestsrv"))
        .args(["-http01", "", "-https01", "", "-tlsalpn01", "", "-doh", ""])
        .arg("-dnsserver")
        .arg(format!("127.0.0.1:{dns_port}"))
        .arg("-management")
        .arg(format!("127.0.0.1:{challtest_mgmt}"))
        .args(["-defaultIPv4", node, "-defaultIPv6", ""])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("pebble-challtestsrv starts");
    wait_tcp(
        &format!("127.0.0.1:{challtest_mgmt}"),
        "pebble-challtestsrv",
        &mut challtest,
    );
    let _challtest = Killed(challtest);
    let config = serde_json::json!({
        "pebble": {
            "listenAddress": format!("{node}:{PEBBLE_PORT}"),
            "managementListenAddress": format!("127.0.0.1:{pebble_mgmt}"),
            "certificate": dir.path().join("cert.pem"),
            "privateKey": dir.path().join("key.pem"),
            "httpPort": 80,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "retryAfter": {"authz": 1, "order": 1},
            "keyAlgorithm": "ecdsa",
            "profiles": {"default": {"description": "node test", "validityPeriod": 86400}}
        }
    });
    std::fs::write(dir.path().join("pebble.json"), config.to_string()).unwrap();
    let mut pebble = Command::new(tools.join("pebble"))
        .arg("-config")
        .arg(dir.path().join("pebble.json"))
        .arg("-dnsserver")
        .arg(format!("127.0.0.1:{dns_port}"))
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_AUTHZREUSE", "0")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.path().join("pebble.log")).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("pebble starts");
    wait_tcp(&format!("{node}:{PEBBLE_PORT}"), "pebble", &mut pebble);
    let _pebble = Killed(pebble);

    cluster.kubectl_ok(&[
        "-n",
        &ns.name,
        "create",
        "secret",
        "generic",
        "pebble-ca",
        &format!(
            "--from-file=ca.crt={}",
            path_str(&dir.path().join("ca.pem"))
        ),
    ]);
    let manifest = format!(
        r#"apiVersion: opsconductor.io/v1alpha1
kind: OpsConductorStack
metadata:
  name: acme
  namespace: {ns}
spec:
  gateway:
    hosts: [{host}]
    image: {gateway}
    replicas: 1
    serviceType: NodePort
  tls:
    acme:
      directoryUrl: https://{node}:{PEBBLE_PORT}/dir
      email: e2e@opsconductor.test
      acceptTermsOfService: true
      caBundleSecretRef: {{name: pebble-ca, key: ca.crt}}
  services:
    - name: web
      image: {svc}
      route: /
"#,
        ns = ns.name,
        gateway = cluster.image("gateway"),
        svc = cluster.image("test-service"),
    );
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), manifest).expect("writing the stack");
    cluster.kubectl_ok(&["apply", "-f", path_str(file.path())]);

    // The gateway Service's ClusterIP becomes the answer for every name pebble looks up.
    let services: Api<k8s_openapi::api::core::v1::Service> = ns.api();
    let cluster_ip = eventually("the gateway Service", Duration::from_secs(60), || async {
        services
            .get_opt("acme-gateway")
            .await
            .ok()??
            .spec?
            .cluster_ip
    })
    .await;
    let out = Command::new("curl")
        .args(["-s", "-S", "--max-time", "5", "-X", "POST", "-d"])
        .arg(format!(r#"{{"ip":"{cluster_ip}"}}"#))
        .arg(format!(
            "http://127.0.0.1:{challtest_mgmt}/set-default-ipv4"
        ))
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "set-default-ipv4: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // HTTP-01 is validated through the real gateway pod, reached through its Service.
    let stacks: Api<OpsConductorStack> = ns.api();
    eventually(
        "the stack's CertificateReady condition to be True (pebble through the gateway pod)",
        Duration::from_secs(240),
        || async {
            let s = stacks.get_opt("acme").await.ok()??;
            let c = s
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "CertificateReady")?;
            (c.status == "True").then_some(())
        },
    )
    .await;

    let ready_at = std::time::Instant::now();
    // The gateway serves a certificate that chains to pebble's root.
    let root = Command::new("curl")
        .args(["-s", "-S", "-k", "--max-time", "5"])
        .arg(format!("https://127.0.0.1:{pebble_mgmt}/roots/0"))
        .output()
        .expect("curl runs");
    assert!(root.status.success(), "pebble's root");
    std::fs::write(dir.path().join("root.pem"), &root.stdout).unwrap();
    let https = cluster
        .kubectl_ok(&[
            "-n",
            &ns.name,
            "get",
            "service",
            "acme-gateway",
            "-o",
            "jsonpath={.spec.ports[?(@.port==443)].nodePort}",
        ])
        .trim()
        .to_string();
    let root_path = dir.path().join("root.pem");
    let args = [
        "--cacert".to_string(),
        path_str(&root_path).to_string(),
        "--resolve".to_string(),
        format!("{host}:{https}:{node}"),
        format!("https://{host}:{https}/issued"),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Until the kubelet updates the gateway pod's Secret volume (at its next sync of the pod,
    // up to its syncFrequency of 1 min with jitter) and the reload loop sees the new files, the
    // gateway still serves the placeholder certificate it started with.
    eventually(
        "the gateway to serve pebble's certificate",
        Duration::from_secs(240),
        || async {
            let (code, _, _) = try_curl_node(&args)?;
            (code == 200).then_some(())
        },
    )
    .await;
    eprintln!(
        "the gateway served pebble's certificate {:.0} s after CertificateReady",
        ready_at.elapsed().as_secs_f64()
    );
}
