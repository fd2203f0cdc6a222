//! The real operator binary, started once per test binary against the real control plane.
//!
//! It runs under its own identity (the admin impersonating the service account
//! [`OPERATOR_USER`] with `system:masters`), so the audit log tells its writes apart from the
//! test's own. It stops by itself when the test binary exits (see [`OperatorProcess`]).

use std::io::Read;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::ListParams;
use kube::{Api, Client, CustomResourceExt, ResourceExt};
use opsconductor_operator::crd::OpsConductorStack;

use super::controlplane::{ControlPlane, control_plane, eventually};
use super::process::{OperatorProcess, Spawn};

/// The user the operator's requests are made as.
pub const OPERATOR_USER: &str = "system:serviceaccount:opsconductor-system:opsconductor-operator";

pub struct Operator {
    pub metrics_addr: String,
    pub log: PathBuf,
    _process: Mutex<OperatorProcess>,
}

static OPERATOR: OnceLock<Operator> = OnceLock::new();

/// The operator for this test binary (started on first use, after the CRD is installed).
/// `None` only when the control plane is explicitly skipped.
pub async fn operator() -> Option<&'static Operator> {
    let cp = control_plane()?;
    if let Some(op) = OPERATOR.get() {
        return Some(op);
    }
    install_crd(cp).await;
    let op = OPERATOR.get_or_init(|| start(cp));
    eventually(
        "the operator's caches to sync (/readyz)",
        Duration::from_secs(60),
        async || {
            http_get(&op.metrics_addr, "/readyz")
                .filter(|b| b.starts_with("ok"))
                .map(|_| ())
        },
    )
    .await;
    Some(op)
}

fn start(cp: &ControlPlane) -> Operator {
    let dir = cp.state_dir.join("operator-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join(format!("kubeconfig-{}", std::process::id()));
    write_impersonating_kubeconfig(
        cp,
        &kubeconfig,
        OPERATOR_USER,
        &["system:masters", "system:authenticated"],
    );
    let process = OperatorProcess::spawn(Spawn {
        name: "shared",
        kubeconfig: &kubeconfig,
        log_dir: &dir,
        args: &[],
        env: &[],
    });
    Operator {
        metrics_addr: process.metrics_addr.clone(),
        log: process.log.clone(),
        _process: Mutex::new(process),
    }
}

/// Writes to `path` a copy of the admin kubeconfig that impersonates `user` with `groups`.
pub fn write_impersonating_kubeconfig(
    cp: &ControlPlane,
    path: &std::path::Path,
    user: &str,
    groups: &[&str],
) {
    let mut kc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&cp.kubeconfig).unwrap()).unwrap();
    for entry in kc["users"].as_sequence_mut().expect("kubeconfig has users") {
        entry["user"]["as"] = user.into();
        entry["user"]["as-groups"] =
            serde_yaml::Value::Sequence(groups.iter().map(|g| (*g).into()).collect());
    }
    std::fs::write(path, serde_yaml::to_string(&kc).unwrap()).unwrap();
}

/// A free loopback address (`127.0.0.1:<port>`) for an operator's `--metrics-addr`.
pub fn free_loopback_addr() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// Installs (or updates) the CRD from the code and waits until it is served.
pub async fn install_crd(cp: &ControlPlane) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let client = Client::try_from(cp.config().await).unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "opsconductorstacks.opsconductor.io",
        &PatchParams::apply("opsconductor-tests").force(),
        &Patch::Apply(OpsConductorStack::crd()),
    )
    .await
    .expect("the CRD applies");
    wait_established(&client, "opsconductorstacks.opsconductor.io").await;
}

/// Waits until the CRD `name` is Established. Polled: `kubectl wait --for=condition=...`
/// fails at once, instead of waiting, while a CRD that was just created has no conditions yet.
pub async fn wait_established(client: &Client, name: &str) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    eventually(
        &format!("the CRD {name} to be Established"),
        Duration::from_secs(30),
        || {
            let crds = crds.clone();
            async move {
                let crd = crds.get(name).await.ok()?;
                let established = crd
                    .status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                established.then_some(())
            }
        },
    )
    .await;
}

impl Operator {
    /// The value of the first sample of `metric` whose line starts with `prefix` (a metric
    /// name, optionally with labels), or 0 when there is none yet.
    pub fn metric(&self, prefix: &str) -> f64 {
        let body = http_get(&self.metrics_addr, "/metrics").unwrap_or_default();
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// A plain HTTP/1.1 GET on loopback; the body, or None when nothing answers.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// An example stack from `examples/`, moved into `namespace`.
pub fn example(file: &str, namespace: &str) -> OpsConductorStack {
    let path = super::controlplane::repo_root().join("examples").join(file);
    let mut stack: OpsConductorStack =
        serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    stack.metadata.namespace = Some(namespace.to_string());
    stack
}

/// Applies `stack` as the test user (a field manager of its own).
pub async fn apply_stack(client: &Client, stack: &OpsConductorStack) -> OpsConductorStack {
    let api: Api<OpsConductorStack> =
        Api::namespaced(client.clone(), stack.metadata.namespace.as_deref().unwrap());
    let mut body = serde_json::to_value(stack).unwrap();
    body["apiVersion"] = "opsconductor.io/v1alpha1".into();
    body["kind"] = "OpsConductorStack".into();
    if let Some(meta) = body["metadata"].as_object_mut() {
        meta.remove("resourceVersion");
        meta.remove("managedFields");
    }
    api.patch(
        stack.metadata.name.as_deref().unwrap(),
        &PatchParams::apply("opsconductor-tests").force(),
        &Patch::Apply(&body),
    )
    .await
    .unwrap_or_else(|e| panic!("applying the stack: {e}"))
}

/// Names of every object the stack owns, as "Kind/name".
pub async fn owned_objects(client: &Client, ns: &str, uid: &str) -> BTreeSet<String> {
    async fn names<K>(client: &Client, ns: &str, uid: &str, out: &mut BTreeSet<String>)
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let api: Api<K> = Api::namespaced(client.clone(), ns);
        for o in api.list(&ListParams::default()).await.unwrap() {
            if o.owner_references()
                .iter()
                .any(|r| r.uid == uid && r.controller == Some(true))
            {
                out.insert(format!("{}/{}", K::kind(&()), o.name_any()));
            }
        }
    }
    let mut out = BTreeSet::new();
    names::<ServiceAccount>(client, ns, uid, &mut out).await;
    names::<ConfigMap>(client, ns, uid, &mut out).await;
    names::<NetworkPolicy>(client, ns, uid, &mut out).await;
    names::<Deployment>(client, ns, uid, &mut out).await;
    names::<Service>(client, ns, uid, &mut out).await;
    names::<PodDisruptionBudget>(client, ns, uid, &mut out).await;
    out
}

/// What `render` says the stack consists of, as "Kind/name".
pub fn rendered_objects(stack: &OpsConductorStack) -> BTreeSet<String> {
    let model = opsconductor_operator::validate::validate(stack, "unused").unwrap();
    opsconductor_operator::build::build(&model, &Default::default())
        .to_values()
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}
