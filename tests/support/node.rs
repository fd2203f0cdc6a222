//! The real one-node cluster of `scripts/cluster` (docs/node.md): control plane, kubelet,
//! containerd, CNI bridge, kube-proxy, CoreDNS and kube-router's firewall on this machine, with
//! the project's images (`scripts/build-images`) imported into containerd.
//!
//! Started (or reused) once per test binary, like [`super::controlplane::control_plane`], and
//! with the same policy when it cannot be brought up:
//! - `CI=true`: panic, naming what is missing (never a silent skip);
//! - otherwise: panic too, unless `OPSC_SKIP_NODE=1` (or `OPSC_SKIP_CONTROLPLANE=1`) is set
//!   explicitly; then nothing is started and each test returns early after saying so on stderr.
//!
//! Lifetime: the cluster is NOT stopped at the end of a test binary (the next one reuses it in
//! under a second). Stop it with `scripts/cluster down`, which removes everything `up` added to
//! the machine.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use super::controlplane::{create_temporary_namespace, delete_namespace_from_drop, repo_root};

/// A running cluster, as reported by `scripts/cluster`.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Admin kubeconfig (`system:masters`).
    pub kubeconfig: PathBuf,
    /// kubectl and the control plane's binaries.
    pub bin_dir: PathBuf,
    /// kubelet, crictl, ... of the node.
    pub node_bin_dir: PathBuf,
    /// containerd's socket (for crictl).
    pub containerd_socket: PathBuf,
    /// The imported images by name (`pause`, `gateway`, `test-service`, `operator`): their refs.
    pub images: BTreeMap<String, String>,
}

impl Cluster {
    /// The pinned kubectl against this cluster.
    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(self.bin_dir.join("kubectl"));
        c.env("KUBECONFIG", &self.kubeconfig);
        c
    }

    /// `kubectl <args>`: what it printed (stdout, then stderr), never a panic; for diagnoses.
    fn kubectl_shown(&self, args: &[&str]) -> String {
        match self.kubectl().args(args).stdin(Stdio::null()).output() {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("kubectl did not run: {e}"),
        }
    }

    /// What a failed node test needs to be explained after the fact, when the namespace is
    /// gone: the namespace's stacks (spec and status), pods, Events and ConfigMaps, each pod's
    /// recent logs, and, in each gateway pod, the reload loop's last result and the HTTP-01
    /// lines of the nginx configuration it reads; then the operator pods' recent logs. A
    /// failed ACME test once could not be explained (the gateway answered 404 on the challenge
    /// path for 3 minutes, and neither the operator's log nor the pod's files were kept).
    pub fn diagnose(&self, ns: &str) -> String {
        let mut out = format!("==== diagnosis of namespace {ns} (the test failed) ====\n");
        let mut show = |title: &str, args: &[&str]| {
            out.push_str(&format!("---- {title}\n{}\n", self.kubectl_shown(args)));
        };
        show(
            "stacks",
            &["-n", ns, "get", "opsconductorstacks", "-o", "yaml"],
        );
        show(
            "pods, Events",
            &["-n", ns, "get", "pods,events", "-o", "wide"],
        );
        show("ConfigMaps", &["-n", ns, "get", "configmaps", "-o", "yaml"]);
        let pods = self.kubectl_shown(&["-n", ns, "get", "pods", "-o", "name"]);
        for pod in pods.lines().filter(|l| l.starts_with("pod/")) {
            show(
                &format!("{pod}: logs"),
                &[
                    "-n",
                    ns,
                    "logs",
                    pod,
                    "--all-containers",
                    "--prefix",
                    "--timestamps",
                    "--tail",
                    "80",
                ],
            );
            if pod.contains("-gateway-") {
                show(
                    &format!("{pod}: the reload loop's last result, the HTTP-01 lines it reads"),
                    &[
                        "-n",
                        ns,
                        "exec",
                        pod,
                        "-c",
                        "nginx",
                        "--",
                        "sh",
                        "-c",
                        // The gateway image has no grep: the shell picks the lines.
                        "cat /tmp/opsconductor-config-status; \
                         while IFS= read -r l; do case $l in \
                         *opsconductor-config*|*acme-challenge*|*'return 200 \"$1.'*) \
                         echo \"$l\";; esac; done < /etc/opsconductor/config/nginx.conf",
                    ],
                );
            }
        }
        show(
            "operator pods",
            &[
                "get",
                "pods",
                "-A",
                "-l",
                "app.kubernetes.io/name=opsconductor-operator",
                "-o",
                "wide",
            ],
        );
        show(
            "operator logs",
            &[
                "logs",
                "-n",
                "opsconductor-system",
                "-l",
                "app.kubernetes.io/name=opsconductor-operator",
                "--prefix",
                "--timestamps",
                "--tail",
                "200",
                "--max-log-requests",
                "10",
            ],
        );
        out.push_str(&format!("==== end of the diagnosis of {ns} ===="));
        out
    }

    /// `kubectl <args>`; its stdout, or a panic with its stderr.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self
            .kubectl()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("kubectl runs");
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The ref of an imported image (`operator`, `gateway`, `test-service`, `pause`).
    pub fn image(&self, name: &str) -> &str {
        self.images.get(name).unwrap_or_else(|| {
            panic!(
                "`scripts/cluster images` imported no image `{name}` (it printed {:?})",
                self.images
            )
        })
    }

    /// Gives the imported image `image` a second ref `new_ref` in containerd (the same
    /// content under another name, e.g. to roll pods to a "new" image without a registry).
    pub fn tag_image(&self, image: &str, new_ref: &str) {
        // Debian's containerd package's ctr (scripts/cluster installs it with containerd).
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.containerd_socket)
            .args([
                "--namespace",
                "k8s.io",
                "images",
                "tag",
                "--force",
                image,
                new_ref,
            ])
            .output()
            .expect("ctr runs");
        assert!(
            out.status.success(),
            "ctr images tag {image} {new_ref}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The admin client's configuration.
    pub async fn config(&self) -> Config {
        let kc = Kubeconfig::read_from(&self.kubeconfig)
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.kubeconfig.display()));
        Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap_or_else(|e| panic!("loading {}: {e}", self.kubeconfig.display()))
    }

    /// An admin client.
    pub async fn client(&self) -> Client {
        Client::try_from(self.config().await).expect("building kube client")
    }
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();

fn truthy(var: &str) -> bool {
    matches!(
        std::env::var(var)
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Ok("1" | "true" | "yes")
    )
}

/// Runs `scripts/cluster <args>` with its progress on the terminal; its stdout.
fn run_cluster_script(args: &[&str]) -> Result<String, String> {
    let script = repo_root().join("scripts/cluster");
    if !script.exists() {
        return Err(format!("{} is missing", script.display()));
    }
    let mut cmd = Command::new(&script);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // The operator image of the test node: the dev profile's code generation (a source change
    // rebuilds it in about a minute, not the release build's 8), unless the caller chose.
    if std::env::var_os("OPSC_OPERATOR_PROFILE").is_none() {
        cmd.env("OPSC_OPERATOR_PROFILE", "image-test");
    }
    let out = cmd
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "`{} {}` failed ({}); its messages are above (node logs: `scripts/cluster paths`)",
            script.display(),
            args.join(" "),
            out.status
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn key_values(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn bring_up() -> Result<Cluster, String> {
    // The effective uid (the third field of Uid:), read from /proc without a libc call.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    if !root {
        return Err("scripts/cluster needs root (containerd, kubelet, iptables)".to_string());
    }
    eprintln!(
        "support: starting or reusing the one-node cluster: scripts/cluster up (a cold build \
         takes many minutes, docs/node.md)"
    );
    let started = Instant::now();
    let up = run_cluster_script(&["up"])?;
    let kubeconfig = up
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| PathBuf::from(l.trim()))
        .ok_or("`scripts/cluster up` printed no kubeconfig path")?;
    if !kubeconfig.is_file() {
        return Err(format!(
            "kubeconfig {} does not exist",
            kubeconfig.display()
        ));
    }
    let paths = key_values(&run_cluster_script(&["paths"])?);
    let path = |k: &str| {
        paths
            .get(k)
            .map(PathBuf::from)
            .ok_or(format!("`scripts/cluster paths` printed no {k}="))
    };
    eprintln!("support: importing the project's images: scripts/cluster images");
    let images = key_values(&run_cluster_script(&["images"])?);
    for name in ["pause", "gateway", "test-service", "operator"] {
        if !images.contains_key(name) {
            return Err(format!(
                "`scripts/cluster images` printed no `{name}=` line (got {images:?})"
            ));
        }
    }
    eprintln!(
        "support: cluster ready in {:.1}s, kubeconfig {}",
        started.elapsed().as_secs_f64(),
        kubeconfig.display()
    );
    Ok(Cluster {
        bin_dir: path("controlplane_bin")?,
        node_bin_dir: path("node_bin")?,
        containerd_socket: path("containerd_socket")?,
        kubeconfig,
        images,
    })
}

/// The cluster, started once per test binary (or reused when already running).
///
/// Returns `None` only outside CI with `OPSC_SKIP_NODE=1` or `OPSC_SKIP_CONTROLPLANE=1`;
/// panics in every other case where it is not available.
pub fn cluster() -> Option<&'static Cluster> {
    let ci = truthy("CI");
    if !ci && (truthy("OPSC_SKIP_NODE") || truthy("OPSC_SKIP_CONTROLPLANE")) {
        eprintln!("support: OPSC_SKIP_NODE=1: skipping a test that needs the real node");
        return None;
    }
    match CLUSTER.get_or_init(bring_up) {
        Ok(c) => Some(c),
        Err(e) if ci => panic!(
            "CI=true and the real one-node cluster is not available: {e}. It needs root, Go and \
             the module proxy (scripts/build-parts node), Debian's containerd and runc, and \
             scripts/build-images; see docs/node.md"
        ),
        Err(e) => panic!(
            "the real one-node cluster is not available: {e}. See docs/node.md; set \
             OPSC_SKIP_NODE=1 to skip these tests explicitly"
        ),
    }
}

/// A fresh namespace on the cluster, deleted on drop (also when the test panics).
pub struct NodeNamespace {
    pub name: String,
    pub client: Client,
    pub cluster: &'static Cluster,
}

impl NodeNamespace {
    pub async fn new(prefix: &str) -> Option<NodeNamespace> {
        let cluster = cluster()?;
        let client = cluster.client().await;
        let name = create_temporary_namespace(&client, prefix).await;
        Some(NodeNamespace {
            name,
            client,
            cluster,
        })
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for NodeNamespace {
    fn drop(&mut self) {
        let cluster = self.cluster;
        if std::thread::panicking() {
            eprintln!("{}", cluster.diagnose(&self.name));
        }
        delete_namespace_from_drop(self.name.clone(), move || cluster.config());
    }
}
