//! Starts (or reuses) the real local control plane of `scripts/controlplane` once per test binary
//! and hands each test a `kube::Client` and a fresh namespace.
//!
//! Policy when the control plane cannot be brought up:
//! - `CI=true`: panic, naming what is missing (never a silent skip);
//! - otherwise: panic too, unless `OPSC_SKIP_CONTROLPLANE=1` is set explicitly, in which case
//!   the control plane is not even started and each test returns early after saying so on
//!   stderr. Under `CI=true`, `OPSC_SKIP_CONTROLPLANE` is ignored.
//!
//! Lifetime: the processes are NOT stopped at the end of a test binary. The next test binary (or
//! the next `cargo test`) reuses them through `scripts/controlplane up`, which checks PIDs and
//! `/readyz`. Stop them with `scripts/controlplane down` (`.ci/run` does so at its end).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

/// A running control plane, as reported by `scripts/controlplane`.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    /// Admin kubeconfig (user `opsc-admin`, group `system:masters`).
    pub kubeconfig: PathBuf,
    /// `${OPSC_STATE:-/tmp/opsconductor-controlplane}`.
    pub state_dir: PathBuf,
    /// JSON-lines audit log: every write at Metadata level, no reads.
    pub audit_log: PathBuf,
    /// Directory with etcd, kube-apiserver, kube-controller-manager and kubectl.
    pub bin_dir: PathBuf,
}

impl ControlPlane {
    /// The pinned kubectl, built with the control plane.
    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(self.bin_dir.join("kubectl"));
        c.env("KUBECONFIG", &self.kubeconfig);
        c
    }

    /// A `kube::Config` for the admin user.
    pub async fn config(&self) -> Config {
        let kc = Kubeconfig::read_from(&self.kubeconfig)
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.kubeconfig.display()));
        Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap_or_else(|e| panic!("loading {}: {e}", self.kubeconfig.display()))
    }
}

static CONTROL_PLANE: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

fn truthy(var: &str) -> bool {
    matches!(
        std::env::var(var)
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Ok("1" | "true" | "yes")
    )
}

/// The repository root: `OPSC_REPO_ROOT`, else the crate's manifest dir.
pub fn repo_root() -> PathBuf {
    std::env::var_os("OPSC_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn bring_up() -> Result<ControlPlane, String> {
    let script = repo_root().join("scripts/controlplane");
    if !script.exists() {
        return Err(format!("{} is missing", script.display()));
    }
    for tool in ["go", "openssl", "curl", "flock", "setsid"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            return Err(format!(
                "`{tool}` is not on PATH; scripts/controlplane needs go (to build the control \
                 plane once), openssl, curl, flock and setsid"
            ));
        }
    }
    eprintln!(
        "support: starting or reusing the control plane: {} up (a cold build takes many minutes)",
        script.display()
    );
    let started = Instant::now();
    // stderr is inherited so build and start-up progress is visible; stdout's last line is the
    // kubeconfig path.
    let out = Command::new(&script)
        .arg("up")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "`{} up` failed ({}); its messages are above, logs are in {}",
            script.display(),
            out.status,
            state_dir().join("logs").display()
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let kubeconfig = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| PathBuf::from(l.trim()))
        .ok_or_else(|| "`scripts/controlplane up` printed no kubeconfig path".to_string())?;
    if !kubeconfig.is_file() {
        return Err(format!(
            "kubeconfig {} does not exist",
            kubeconfig.display()
        ));
    }
    let state_dir = kubeconfig
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(state_dir);
    let bin_dir = std::fs::read_to_string(state_dir.join("bin-dir"))
        .map(|s| PathBuf::from(s.trim()))
        .map_err(|e| format!("reading {}/bin-dir: {e}", state_dir.display()))?;
    eprintln!(
        "support: control plane ready in {:.1}s, kubeconfig {}",
        started.elapsed().as_secs_f64(),
        kubeconfig.display()
    );
    Ok(ControlPlane {
        audit_log: state_dir.join("audit.log"),
        kubeconfig,
        state_dir,
        bin_dir,
    })
}

fn state_dir() -> PathBuf {
    std::env::var_os("OPSC_STATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/opsconductor-controlplane"))
}

/// The control plane, started once per test binary (or reused when already running).
///
/// Returns `None` only outside CI with `OPSC_SKIP_CONTROLPLANE=1`; panics in every other case
/// where it is not available.
pub fn control_plane() -> Option<&'static ControlPlane> {
    let ci = truthy("CI");
    if !ci && truthy("OPSC_SKIP_CONTROLPLANE") {
        eprintln!(
            "support: OPSC_SKIP_CONTROLPLANE=1: skipping a test that needs the real control plane"
        );
        return None;
    }
    match CONTROL_PLANE.get_or_init(bring_up) {
        Ok(cp) => Some(cp),
        Err(e) if ci => panic!(
            "CI=true and the real Kubernetes control plane is not available: {e}. \
             Build it with `scripts/build-parts controlplane` (needs Go and the module proxy), \
             see docs/controlplane.md"
        ),
        Err(e) => panic!(
            "the real Kubernetes control plane is not available: {e}. \
             See docs/controlplane.md; set OPSC_SKIP_CONTROLPLANE=1 to skip these tests explicitly"
        ),
    }
}

/// An admin client (`system:masters`).
pub async fn admin_client() -> Option<Client> {
    let cp = control_plane()?;
    Some(Client::try_from(cp.config().await).expect("building kube client"))
}

/// A client that impersonates `user` with `groups` (the admin may impersonate anyone).
/// For a service account use `system:serviceaccount:<ns>:<name>` and the groups
/// `system:serviceaccounts`, `system:serviceaccounts:<ns>`, `system:authenticated`.
pub async fn client_as(user: &str, groups: &[&str]) -> Option<Client> {
    let cp = control_plane()?;
    let mut config = cp.config().await;
    config.auth_info.impersonate = Some(user.to_string());
    config.auth_info.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
    Some(Client::try_from(config).expect("building impersonating kube client"))
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`. `check` is an
/// async closure (`async || ...`, which may borrow and change what it captures between polls),
/// or a closure returning a future.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A fresh, uniquely named namespace with an admin client. Dropping it deletes the namespace
/// (without waiting for the namespace controller to finish), also when the test panics.
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
    pub control_plane: &'static ControlPlane,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A DNS-1123 label `opsc-<prefix>-<unique>` of at most 63 characters.
pub fn unique_name(prefix: &str) -> String {
    let mut p: String = prefix
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    p.truncate(40);
    let p = p.trim_matches('-');
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let suffix = format!(
        "{:x}{:x}{:x}",
        std::process::id() % 0xfff,
        n,
        nanos % 0xfffff
    );
    format!("opsc-{p}-{suffix}")
}

/// Creates a namespace `unique_name(prefix)` labelled as temporary; its name.
pub async fn create_temporary_namespace(client: &Client, prefix: &str) -> String {
    let name = unique_name(prefix);
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": name, "labels": { "opsconductor.test/temporary": "true" } }
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
    name
}

/// Deletes namespace `name` (background), for a `Drop`: Drop may run inside the test's
/// (current-thread) tokio runtime, where blocking on a future is not allowed, or while a panic
/// unwinds, so it deletes from a separate thread with its own small runtime. `config` gives
/// the client's configuration there. A failure is printed, never raised.
pub fn delete_namespace_from_drop<F, Fut>(name: String, config: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Config>,
{
    let shown = name.clone();
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let client = Client::try_from(config().await)?;
            match Api::<Namespace>::all(client)
                .delete(&name, &DeleteParams::background())
                .await
            {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
    });
    let result: Result<(), Box<dyn std::error::Error + Send + Sync>> = handle
        .join()
        .unwrap_or_else(|_| Err("namespace cleanup thread panicked".into()));
    if let Err(e) = result {
        eprintln!("support: could not delete test namespace {shown}: {e}");
    }
}

impl TestNamespace {
    /// Creates the namespace. `None` only when the control plane is explicitly skipped.
    pub async fn new(prefix: &str) -> Option<TestNamespace> {
        let control_plane = control_plane()?;
        let client = Client::try_from(control_plane.config().await).expect("building kube client");
        let name = create_temporary_namespace(&client, prefix).await;
        Some(TestNamespace {
            name,
            client,
            control_plane,
        })
    }

    /// `Api<K>` in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let cp = self.control_plane;
        delete_namespace_from_drop(self.name.clone(), move || cp.config());
    }
}

static TOOLS: OnceLock<Result<PathBuf, String>> = OnceLock::new();

fn build_tools() -> Result<PathBuf, String> {
    let script = repo_root().join("scripts/build-parts");
    eprintln!(
        "support: locating or building the test tools: {} tools",
        script.display()
    );
    let out = Command::new(&script)
        .arg("tools")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "`{} tools` failed ({}); its messages are above",
            script.display(),
            out.status
        ));
    }
    let dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| PathBuf::from(l.trim()))
        .ok_or_else(|| "`scripts/build-parts tools` printed no directory".to_string())?;
    for bin in ["helm", "pebble", "pebble-challtestsrv", "netpolicy"] {
        if !dir.join(bin).is_file() {
            return Err(format!("{} is missing", dir.join(bin).display()));
        }
    }
    Ok(dir)
}

/// `helm` (the built one) with its home, cache, configuration and data in a directory of its
/// own, removed when the returned guard drops: helm stays out of the user's home and away from
/// other tests, and no run leaves a directory behind. Keep the guard until the command ran.
pub fn helm_command() -> (std::process::Command, tempfile::TempDir) {
    let helm = tools_bin_dir()
        .expect("the tools (helm) are built: scripts/build-parts tools")
        .join("helm");
    let home = tempfile::Builder::new()
        .prefix("opsc-helm-")
        .tempdir()
        .expect("a temporary directory for helm");
    let mut cmd = std::process::Command::new(helm);
    cmd.env("HOME", home.path())
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"));
    (cmd, home)
}

/// The directory with helm, pebble, pebble-challtestsrv and netpolicy (built once by
/// `scripts/build-parts tools`). Same policy as [`control_plane`]: `None` only outside CI with
/// `OPSC_SKIP_CONTROLPLANE=1`, a panic naming what is missing otherwise.
pub fn tools_bin_dir() -> Option<&'static Path> {
    let ci = truthy("CI");
    if !ci && truthy("OPSC_SKIP_CONTROLPLANE") {
        eprintln!("support: OPSC_SKIP_CONTROLPLANE=1: skipping a test that needs the real tools");
        return None;
    }
    match TOOLS.get_or_init(build_tools) {
        Ok(dir) => Some(dir.as_path()),
        Err(e) => panic!(
            "the test tools (helm, pebble, pebble-challtestsrv, netpolicy) are not available: {e}. \
             Build them with `scripts/build-parts tools`, see docs/controlplane.md{}",
            if ci {
                ""
            } else {
                "; set OPSC_SKIP_CONTROLPLANE=1 to skip these tests explicitly"
            }
        ),
    }
}
