//! Scoping (`--watch-namespaces`, the chart's `operator.watchNamespaces`) on the real control
//! plane: two operator processes with disjoint scopes side by side, each as its own release's
//! ServiceAccount with only the RBAC the chart renders for that scope (Roles in the listed
//! namespaces, a ClusterRole naming only those Namespaces).
//!
//! Proved from the audit log, which records every request of the group
//! `opsconductor:audit-reads` (reads included, scripts/controlplane) the operators are put in:
//! - each reconciles the stack of its own namespace, and neither writes anything of the other's
//!   or of a third namespace that neither serves;
//! - no request of either lists, watches or reads anything outside its scope (a namespaced
//!   request names one of its namespaces; the only cluster-scoped ones name its Namespaces);
//! - the chart's scoped RBAC is enough: no request is refused.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use opsconductor_operator::crd::OpsConductorStack;
use support::audit::AUDIT_READS_GROUP;
use support::operator::{apply_stack, example, install_crd, owned_objects, rendered_objects};
use support::process::{OperatorProcess, Spawn};
use support::{AuditEvent, AuditLog, ControlPlane, TestNamespace, eventually};

const RELEASE: &str = "opsconductor-operator";

/// The tests of this file one at a time: `the_audit_watches_only_namespaces_that_hold_a_stack`
/// runs an operator serving every namespace, which would also serve the other tests' stacks
/// (and they would take its work for their operators').
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const SERVICE_ACCOUNT: &str = "op";

/// The chart's ServiceAccount, ClusterRole, Roles (the leader election's too) and bindings for a
/// release in `release_ns` serving `scope`, as helm renders them (YAML).
fn chart_rbac(release_ns: &str, scope: &[&str]) -> String {
    chart_rbac_of(
        RELEASE,
        release_ns,
        SERVICE_ACCOUNT,
        &[
            "--set",
            &format!("operator.watchNamespaces={{{}}}", scope.join(",")),
        ],
    )
}

/// The RBAC part of the chart (ServiceAccount, ClusterRole, Roles and bindings) for release
/// `release` in `release_ns` with ServiceAccount `service_account` and the values `sets`.
fn chart_rbac_of(release: &str, release_ns: &str, service_account: &str, sets: &[&str]) -> String {
    let chart = support::controlplane::repo_root().join("charts/opsconductor-operator");
    let (mut helm, _home) = support::controlplane::helm_command();
    let out = helm
        .args(["template", release])
        .arg(&chart)
        .args(["--namespace", release_ns])
        .args(sets)
        // Short: the operator's user name is a certificate's CN (at most 64 characters).
        .args(["--set", &format!("serviceAccount.name={service_account}")])
        .args(["--show-only", "templates/serviceaccount.yaml"])
        .args(["--show-only", "templates/clusterrole.yaml"])
        .args(["--show-only", "templates/role.yaml"])
        // Rendered only with a list (helm refuses to show an empty template).
        .args(
            if sets
                .iter()
                .any(|s| s.starts_with("operator.watchNamespaces="))
            {
                &["--show-only", "templates/namespace-roles.yaml"][..]
            } else {
                &[]
            },
        )
        .output()
        .expect("helm runs");
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `kubectl apply` (or `delete`) of `yaml`.
fn kubectl(cp: &ControlPlane, verb: &[&str], yaml: &str) {
    use std::io::Write as _;
    let mut child = cp
        .kubectl()
        .args(verb)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubectl {verb:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes the cluster-scoped RBAC of a release when dropped (the namespaced part goes with the
/// test namespaces).
struct ClusterRbac<'a> {
    cp: &'a ControlPlane,
    yaml: String,
}

impl Drop for ClusterRbac<'_> {
    fn drop(&mut self) {
        let cluster: String = self
            .yaml
            .split("\n---")
            .filter(|d| d.contains("kind: ClusterRole"))
            .map(|d| format!("---\n{d}\n"))
            .collect();
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            kubectl(
                self.cp,
                &["delete", "--ignore-not-found", "--wait=false"],
                &cluster,
            )
        }));
    }
}

/// The groups the API server gives a ServiceAccount `system:serviceaccount:<ns>:<name>`
/// (`system:serviceaccounts`, `system:serviceaccounts:<ns>`), beside [`AUDIT_READS_GROUP`]: what
/// the chart's operator pod runs with, so that what Kubernetes grants those groups by default
/// (reading the token signing keys, for stacks with service identity) is granted here too.
fn as_service_account(user: &str) -> Vec<String> {
    let ns = user
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split(':').next())
        .expect("a ServiceAccount's user name");
    vec![
        AUDIT_READS_GROUP.to_string(),
        "system:serviceaccounts".to_string(),
        format!("system:serviceaccounts:{ns}"),
    ]
}

/// A kubeconfig that authenticates as `user` in `groups` with a client certificate of the
/// control plane's CA. Not impersonation: the API server's audit policy matches the
/// authenticated user, which for an impersonated request is the admin; a certificate's user is
/// the one the policy sees, so the reads of [`AUDIT_READS_GROUP`] are recorded
/// (scripts/controlplane). RBAC binds a ServiceAccount subject by its user name, so
/// `system:serviceaccount:<ns>:<name>` gets the chart's bindings.
fn write_certificate_kubeconfig(cp: &ControlPlane, path: &Path, user: &str, groups: &[String]) {
    let pki = cp.state_dir.join("pki");
    let key = path.with_extension("key");
    let csr = path.with_extension("csr");
    let crt = path.with_extension("crt");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let subject: String =
        groups.iter().map(|g| format!("/O={g}")).collect::<String>() + &format!("/CN={user}");
    // Extensions make it an X.509 v3 certificate (rustls accepts no other).
    let ext = path.with_extension("ext");
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    run(&[
        "req",
        "-new",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        &subject,
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        csr.to_str().unwrap(),
    ]);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let serial = format!("0x{nanos:x}");
    run(&[
        "x509",
        "-req",
        "-in",
        csr.to_str().unwrap(),
        "-CA",
        pki.join("ca.crt").to_str().unwrap(),
        "-CAkey",
        pki.join("ca.key").to_str().unwrap(),
        "-set_serial",
        &serial,
        "-days",
        "1",
        "-out",
        crt.to_str().unwrap(),
        "-extfile",
        ext.to_str().unwrap(),
    ]);
    let mut kc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&cp.kubeconfig).unwrap()).unwrap();
    for entry in kc["users"].as_sequence_mut().expect("kubeconfig has users") {
        let mut user = serde_yaml::Mapping::new();
        user.insert("client-certificate".into(), crt.to_str().unwrap().into());
        user.insert("client-key".into(), key.to_str().unwrap().into());
        entry["user"] = serde_yaml::Value::Mapping(user);
    }
    std::fs::write(path, serde_yaml::to_string(&kc).unwrap()).unwrap();
}

/// One tenant: its release namespace and the namespace it serves.
struct Tenant {
    release: TestNamespace,
    served: TestNamespace,
    user: String,
}

impl Tenant {
    async fn new(tag: &str) -> Option<Tenant> {
        let release = TestNamespace::new(&format!("scope-{tag}-sys")).await?;
        let served = TestNamespace::new(&format!("scope-{tag}")).await?;
        let user = format!("system:serviceaccount:{}:{SERVICE_ACCOUNT}", release.name);
        Some(Tenant {
            release,
            served,
            user,
        })
    }

    fn install_rbac(&self) -> ClusterRbac<'static> {
        let cp = self.release.control_plane;
        let yaml = chart_rbac(&self.release.name, &[&self.served.name]);
        kubectl(cp, &["apply"], &yaml);
        ClusterRbac { cp, yaml }
    }

    /// The operator as this release's ServiceAccount (never system:masters), its reads audited.
    fn start(&self, dir: &Path) -> OperatorProcess {
        self.start_in(dir, &as_service_account(&self.user))
    }

    /// [`Tenant::start`] with the certificate's `groups` as given.
    fn start_in(&self, dir: &Path, groups: &[String]) -> OperatorProcess {
        let cp = self.release.control_plane;
        let kubeconfig = dir.join(format!(
            "kubeconfig-{}-{}",
            self.release.name,
            std::process::id()
        ));
        write_certificate_kubeconfig(cp, &kubeconfig, &self.user, groups);
        OperatorProcess::spawn(Spawn {
            name: &self.release.name,
            kubeconfig: &kubeconfig,
            log_dir: dir,
            args: &[
                "--dns-resolver",
                "none",
                "--watch-namespaces",
                &self.served.name,
                "--leader-election",
                "--leader-election-namespace",
                &self.release.name,
            ],
            env: &[("POD_NAME", &self.release.name)],
        })
    }

    /// Whether `e`, a request of this tenant's operator, stays inside its scope: a namespaced
    /// request in the served or the release namespace (its Lease), a cluster-scoped one only on
    /// the served Namespace, or a request on no object at all (API discovery).
    fn in_scope(&self, e: &AuditEvent) -> bool {
        if e.resource.is_empty() {
            return true;
        }
        if e.resource == "namespaces" {
            return e.name == self.served.name;
        }
        e.namespace == self.served.name || e.namespace == self.release.name
    }
}

/// The control plane's audit policy records the reads of [`AUDIT_READS_GROUP`].
fn assert_reads_recorded(cp: &ControlPlane) {
    let policy = std::fs::read_to_string(cp.state_dir.join("audit-policy.yaml")).unwrap();
    assert!(
        policy.contains(AUDIT_READS_GROUP),
        "the control plane at {} was started before its audit policy recorded the reads of \
         {AUDIT_READS_GROUP}: stop it (OPSC_STATE={} scripts/controlplane down) and run again",
        cp.state_dir.display(),
        cp.state_dir.display()
    );
}

#[tokio::test]
async fn two_operators_with_disjoint_scopes_touch_only_their_own_namespaces() {
    let _serial = SERIAL.lock().await;
    let Some(a) = Tenant::new("a").await else {
        return;
    };
    let b = Tenant::new("b").await.unwrap();
    // A namespace with a stack that neither operator serves.
    let outside = TestNamespace::new("scope-outside").await.unwrap();
    let cp = a.release.control_plane;
    assert_reads_recorded(cp);
    install_crd(cp).await;
    let _rbac_a = a.install_rbac();
    let _rbac_b = b.install_rbac();

    let audit = AuditLog::of(cp);
    let mark = audit.mark();
    let dir = cp.state_dir.join("scope-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let op_a = a.start(&dir);
    let op_b = b.start(&dir);
    for op in [&op_a, &op_b] {
        eventually(
            "both scoped operators to lead and sync their caches (/readyz)",
            Duration::from_secs(90),
            async || op.ready().then_some(()),
        )
        .await;
    }

    let mut stacks = Vec::new();
    for ns in [&a.served, &b.served, &outside] {
        stacks.push(apply_stack(&ns.client, &example("minimal.yaml", &ns.name)).await);
    }
    for (tenant, stack) in [(&a, &stacks[0]), (&b, &stacks[1])] {
        let expected = rendered_objects(stack);
        let uid = stack.uid().unwrap();
        let (client, ns) = (tenant.served.client.clone(), tenant.served.name.clone());
        eventually(
            "each served stack's objects, owned by it",
            Duration::from_secs(90),
            || {
                let (client, ns, uid, expected) =
                    (client.clone(), ns.clone(), uid.clone(), expected.clone());
                async move { (owned_objects(&client, &ns, &uid).await == expected).then_some(()) }
            },
        )
        .await;
        let api: Api<OpsConductorStack> = tenant.served.api();
        eventually(
            "each served stack's status to describe its generation",
            Duration::from_secs(90),
            || {
                let api = api.clone();
                async move {
                    let s = api.get("hello").await.ok()?;
                    let observed = s.status.as_ref()?.observed_generation;
                    (observed.is_some() && observed == s.metadata.generation).then_some(())
                }
            },
        )
        .await;
    }
    // A few resyncs' worth of steady state, so that late requests are in the log too.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let requests = audit.requests_since(&mark);
    for (tenant, other) in [(&a, &b), (&b, &a)] {
        let mine: Vec<&AuditEvent> = requests.iter().filter(|e| e.user == tenant.user).collect();
        let reads: Vec<&&AuditEvent> = mine
            .iter()
            .filter(|e| matches!(e.verb.as_str(), "list" | "watch"))
            .collect();
        assert!(
            reads.len() >= 8,
            "the audit log has only {} list/watch requests of {}: are its reads recorded?",
            reads.len(),
            tenant.user
        );
        let outside_scope: Vec<String> = mine
            .iter()
            .filter(|e| !tenant.in_scope(e))
            .map(|e| format!("{} {}", e.verb, e.request_uri))
            .collect();
        assert!(
            outside_scope.is_empty(),
            "requests of {} outside its scope {:?}:\n{}",
            tenant.user,
            tenant.served.name,
            outside_scope.join("\n")
        );
        let refused: Vec<String> = mine
            .iter()
            .filter(|e| e.code == 403)
            .map(|e| format!("{} {}", e.verb, e.request_uri))
            .collect();
        assert!(
            refused.is_empty(),
            "the chart's scoped RBAC refused requests of {}:\n{}",
            tenant.user,
            refused.join("\n")
        );
        // It wrote its own stack's objects and status, and nothing in the other's namespace or
        // in the namespace nobody serves.
        let writes: Vec<&&AuditEvent> = mine.iter().filter(|e| e.is_write()).collect();
        assert!(
            writes.iter().any(|e| e.namespace == tenant.served.name
                && e.resource == "opsconductorstacks"
                && e.subresource == "status"
                && e.succeeded()),
            "{} never wrote its stack's status",
            tenant.user
        );
        // A new stack's objects are created without a read of each one first: the operator
        // lists the names of each kind in the namespace once per reconcile and reads an
        // object only when its name is taken (src/controller/apply.rs). Services and
        // Deployments are left out: the gateway's configuration reads the routed Services'
        // ClusterIPs, and whether its Deployment exists, by name before they are created.
        let created: Vec<&AuditEvent> = writes
            .iter()
            .map(|e| **e)
            .filter(|e| {
                e.verb == "patch"
                    && e.code == 201
                    && e.namespace == tenant.served.name
                    && e.subresource.is_empty()
                    && READ_ONLY_TO_CREATE.contains(&e.resource.as_str())
            })
            .collect();
        assert!(
            created.len() >= 4,
            "{} created only {} objects of its stack: {created:#?}",
            tenant.user,
            created.len()
        );
        let read_first: Vec<String> = created
            .iter()
            .filter(|c| {
                mine.iter().any(|e| {
                    e.verb == "get"
                        && e.resource == c.resource
                        && e.namespace == c.namespace
                        && e.name == c.name
                        && e.stage_timestamp < c.stage_timestamp
                })
            })
            .map(|c| format!("{}/{}", c.resource, c.name))
            .collect();
        assert!(
            read_first.is_empty(),
            "{} read these objects by name before creating them: {read_first:?}",
            tenant.user
        );
        let trespass: Vec<String> = writes
            .iter()
            .filter(|e| e.namespace == other.served.name || e.namespace == outside.name)
            .map(|e| format!("{} {}", e.verb, e.request_uri))
            .collect();
        assert!(
            trespass.is_empty(),
            "{} wrote outside its scope:\n{}",
            tenant.user,
            trespass.join("\n")
        );
    }
    // The stack nobody serves has no status from either operator (another test binary's
    // cluster-wide operator may serve it; only these two users are checked).
    let served: BTreeSet<&str> = [a.user.as_str(), b.user.as_str()].into();
    let touched: Vec<String> = requests
        .iter()
        .filter(|e| served.contains(e.user.as_str()) && e.namespace == outside.name)
        .map(|e| format!("{} {} {}", e.user, e.verb, e.request_uri))
        .collect();
    assert!(touched.is_empty(), "{}", touched.join("\n"));
    for op in [&op_a, &op_b] {
        let log = op.log_text();
        let denials: Vec<&str> = log.lines().filter(|l| l.contains("forbidden")).collect();
        assert!(denials.is_empty(), "{}:\n{}", op.name, denials.join("\n"));
    }
}

/// The kinds of a stack's objects (as the audit log names their resources) that the operator
/// reads by name only to see whose an existing one is before it creates one.
const READ_ONLY_TO_CREATE: [&str; 4] = [
    "serviceaccounts",
    "configmaps",
    "networkpolicies",
    "poddisruptionbudgets",
];

/// Sets (`Some`) or removes (`None`) label `key` of namespace `ns`, as the test user.
async fn label_namespace(client: &kube::Client, ns: &str, key: &str, value: Option<&str>) {
    let api: Api<Namespace> = Api::all(client.clone());
    let patch = serde_json::json!({"metadata": {"labels": {key: value}}});
    api.patch(ns, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("labelling namespace {ns}: {e}"));
}

/// A release scoped by `--namespace-selector` (the chart's `operator.namespaceSelector`).
struct SelectorRelease<'a> {
    release: &'static str,
    release_ns: &'a TestNamespace,
    service_account: &'static str,
    selector: String,
    user: String,
}

impl<'a> SelectorRelease<'a> {
    fn new(
        release: &'static str,
        release_ns: &'a TestNamespace,
        service_account: &'static str,
        selector: String,
    ) -> Self {
        let user = format!(
            "system:serviceaccount:{}:{service_account}",
            release_ns.name
        );
        SelectorRelease {
            release,
            release_ns,
            service_account,
            selector,
            user,
        }
    }

    /// The chart's default Lease name: the release's full name.
    fn lease(&self) -> String {
        format!("{}-opsconductor-operator", self.release)
    }

    fn install_rbac(&self) -> ClusterRbac<'static> {
        let cp = self.release_ns.control_plane;
        let yaml = chart_rbac_of(
            self.release,
            &self.release_ns.name,
            self.service_account,
            &[
                "--set-string",
                &format!("operator.namespaceSelector={}", self.selector),
            ],
        );
        assert!(
            yaml.contains(&format!("resourceNames: [\"{}\"]", self.lease())),
            "the chart's leader-election Role names the Lease {}:\n{yaml}",
            self.lease()
        );
        kubectl(cp, &["apply"], &yaml);
        ClusterRbac { cp, yaml }
    }

    fn start(&self, dir: &Path) -> OperatorProcess {
        let cp = self.release_ns.control_plane;
        let kubeconfig = dir.join(format!(
            "kubeconfig-{}-{}",
            self.release,
            std::process::id()
        ));
        write_certificate_kubeconfig(cp, &kubeconfig, &self.user, &as_service_account(&self.user));
        OperatorProcess::spawn(Spawn {
            name: self.release,
            kubeconfig: &kubeconfig,
            log_dir: dir,
            args: &[
                "--namespace-selector",
                &self.selector,
                "--leader-election",
                "--leader-election-namespace",
                &self.release_ns.name,
                "--leader-election-id",
                &self.lease(),
            ],
            env: &[("POD_NAME", self.release)],
        })
    }
}

/// Waits until `ns`'s copy of `stack` is `expected`, owned by it, with a status of its
/// generation.
async fn converged(ns: &TestNamespace, stack: &OpsConductorStack, what: &str) {
    let expected = rendered_objects(stack);
    let uid = stack.uid().unwrap();
    let (client, name) = (ns.client.clone(), ns.name.clone());
    eventually(what, Duration::from_secs(90), || {
        let (client, name, uid, expected) =
            (client.clone(), name.clone(), uid.clone(), expected.clone());
        async move {
            if owned_objects(&client, &name, &uid).await != expected {
                return None;
            }
            let s = Api::<OpsConductorStack>::namespaced(client, &name)
                .get("hello")
                .await
                .ok()?;
            let observed = s.status.as_ref()?.observed_generation;
            (observed.is_some() && observed == s.metadata.generation).then_some(())
        }
    })
    .await;
}

fn describe(events: &[&AuditEvent]) -> String {
    events
        .iter()
        .map(|e| {
            format!(
                "{} {} {} ({})",
                e.stage_timestamp, e.verb, e.request_uri, e.code
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Two releases in ONE namespace, each scoped by a label selector on Namespaces, each as its own
/// ServiceAccount with the chart's RBAC for a selector and the chart's default Lease name. From
/// the audit log (reads included):
/// - each reconciles the stack of its selected namespace, and the two Leases are independent;
/// - a namespace that gets the label is served (its stack converges), and once the label is
///   gone every watch of the operator in it ends and nothing of it is read or written again
///   (a drift there is left alone while the same drift in a selected namespace is reverted);
/// - no request of either reaches a namespace outside its selection: not the other's, not one
///   with a stack, a Service and a ConfigMap that nobody selects, and nothing is listed or
///   watched cluster-wide but Namespaces with the selector.
#[tokio::test]
async fn releases_scoped_by_label_selectors_follow_the_labels_and_see_nothing_else() {
    let _serial = SERIAL.lock().await;
    let Some(sys) = TestNamespace::new("scope-sel-sys").await else {
        return;
    };
    let cp = sys.control_plane;
    assert_reads_recorded(cp);
    let a1 = TestNamespace::new("scope-sel-a").await.unwrap();
    let b1 = TestNamespace::new("scope-sel-b").await.unwrap();
    let joiner = TestNamespace::new("scope-sel-join").await.unwrap();
    let outside = TestNamespace::new("scope-sel-out").await.unwrap();
    install_crd(cp).await;

    // Values unique to this run: another run's namespaces never match.
    let key = "scope.opsconductor.test/tenant";
    let run = sys.name.rsplit('-').next().unwrap().to_string();
    let (value_a, value_b) = (format!("a-{run}"), format!("b-{run}"));
    label_namespace(&sys.client, &a1.name, key, Some(&value_a)).await;
    label_namespace(&sys.client, &b1.name, key, Some(&value_b)).await;
    let a = SelectorRelease::new("sel-a", &sys, "op-a", format!("{key}={value_a}"));
    let b = SelectorRelease::new("sel-b", &sys, "op-b", format!("{key} in ({value_b})"));
    let _rbac_a = a.install_rbac();
    let _rbac_b = b.install_rbac();

    let audit = AuditLog::of(cp);
    let start = audit.mark();
    let dir = cp.state_dir.join("scope-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let op_a = a.start(&dir);
    let op_b = b.start(&dir);
    for op in [&op_a, &op_b] {
        eventually(
            "both operators to lead their own Lease and sync their caches (/readyz)",
            Duration::from_secs(90),
            async || (op.ready() && op.metric("opsconductor_leader") == 1.0).then_some(()),
        )
        .await;
    }

    // Objects nobody selects: a stack, a Service and a ConfigMap.
    let unrelated_svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "unrelated"},
        "spec": {"type": "NodePort", "ports": [{"port": 80}]}
    }))
    .unwrap();
    Api::<Service>::namespaced(outside.client.clone(), &outside.name)
        .create(&Default::default(), &unrelated_svc)
        .await
        .unwrap();
    let unrelated_cm: ConfigMap =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "unrelated"}})).unwrap();
    Api::<ConfigMap>::namespaced(outside.client.clone(), &outside.name)
        .create(&Default::default(), &unrelated_cm)
        .await
        .unwrap();
    let mut stacks = Vec::new();
    for ns in [&a1, &b1, &joiner, &outside] {
        stacks.push(apply_stack(&ns.client, &example("minimal.yaml", &ns.name)).await);
    }
    converged(&a1, &stacks[0], "a's selected stack to converge").await;
    converged(&b1, &stacks[1], "b's selected stack to converge").await;
    let before_label = audit.requests_since(&start);
    let early: Vec<&AuditEvent> = before_label
        .iter()
        .filter(|e| (e.user == a.user || e.user == b.user) && e.namespace == joiner.name)
        .collect();
    assert!(
        early.is_empty(),
        "requests in a namespace before it was selected:\n{}",
        describe(&early)
    );

    // The namespace enters a's selection: a watches it, and its stack is served.
    label_namespace(&sys.client, &joiner.name, key, Some(&value_a)).await;
    eventually(
        "a to watch the stacks of the namespace that entered its selection",
        Duration::from_secs(60),
        || {
            let seen = audit.requests_since(&start).iter().any(|e| {
                e.user == a.user
                    && e.namespace == joiner.name
                    && e.verb == "watch"
                    && e.resource == "opsconductorstacks"
            });
            async move { seen.then_some(()) }
        },
    )
    .await;
    converged(
        &joiner,
        &stacks[2],
        "the joining namespace's stack to converge",
    )
    .await;

    // It leaves: every watch of a in it ends.
    label_namespace(&sys.client, &joiner.name, key, None).await;
    eventually(
        "every watch of a in the namespace that left its selection to end",
        Duration::from_secs(60),
        || {
            let requests = audit.requests_since(&start);
            let (mut started, mut ended) = (BTreeSet::new(), BTreeSet::new());
            for e in requests
                .iter()
                .filter(|e| e.user == a.user && e.namespace == joiner.name && e.verb == "watch")
            {
                if e.stage == "ResponseStarted" {
                    started.insert(e.audit_id.clone());
                } else {
                    ended.insert(e.audit_id.clone());
                }
            }
            let ok = !started.is_empty() && started.is_subset(&ended);
            async move { ok.then_some(()) }
        },
    )
    .await;
    let after_leave = audit.mark();
    // The same drift in a selected namespace and in the one that left: only the first is
    // reverted.
    let drifted = "hello-gateway-config";
    for ns in [&a1, &joiner] {
        Api::<ConfigMap>::namespaced(ns.client.clone(), &ns.name)
            .delete(drifted, &Default::default())
            .await
            .unwrap();
    }
    let a1_maps: Api<ConfigMap> = Api::namespaced(a1.client.clone(), &a1.name);
    eventually(
        "the drift in the selected namespace to be reverted",
        Duration::from_secs(60),
        || {
            let api = a1_maps.clone();
            async move { api.get_opt(drifted).await.ok().flatten().map(|_| ()) }
        },
    )
    .await;
    // A resync's worth of the operator's periodic work (the janitor runs every second).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let left = audit.requests_since(&after_leave);
    let late: Vec<&AuditEvent> = left
        .iter()
        .filter(|e| e.user == a.user && (e.namespace == joiner.name || e.name == joiner.name))
        .collect();
    assert!(
        late.is_empty(),
        "requests of a in the namespace after it left the selection:\n{}",
        describe(&late)
    );
    assert!(
        Api::<ConfigMap>::namespaced(joiner.client.clone(), &joiner.name)
            .get_opt(drifted)
            .await
            .unwrap()
            .is_none(),
        "the drift in the namespace that left the selection was reverted"
    );

    let requests = audit.requests_since(&start);
    for (release, own, other) in [
        (&a, vec![a1.name.as_str(), joiner.name.as_str()], &b),
        (&b, vec![b1.name.as_str()], &a),
    ] {
        let mine: Vec<&AuditEvent> = requests.iter().filter(|e| e.user == release.user).collect();
        let reads = mine
            .iter()
            .filter(|e| matches!(e.verb.as_str(), "list" | "watch"))
            .count();
        assert!(
            reads >= 8,
            "only {reads} list/watch requests of {} in the audit log: are its reads recorded?",
            release.user
        );
        // In scope: a namespaced request in a selected namespace or the release namespace; a
        // list or watch of Namespaces with the selector; a patch of a selected Namespace (the
        // marker); API discovery (no object).
        let encoded_key = "labelSelector=scope.opsconductor.test%2Ftenant";
        let outside_scope: Vec<&AuditEvent> = mine
            .iter()
            .copied()
            .filter(|e| {
                let ok = if e.resource.is_empty() {
                    true
                } else if e.resource == "namespaces" {
                    match e.verb.as_str() {
                        "list" | "watch" => {
                            e.name.is_empty() && e.request_uri.contains(encoded_key)
                        }
                        _ => own.contains(&e.name.as_str()),
                    }
                } else {
                    own.contains(&e.namespace.as_str()) || e.namespace == sys.name
                };
                !ok
            })
            .collect();
        assert!(
            outside_scope.is_empty(),
            "requests of {} outside its selection:\n{}",
            release.user,
            describe(&outside_scope)
        );
        let unrelated: Vec<&AuditEvent> = mine
            .iter()
            .copied()
            .filter(|e| e.namespace == outside.name || e.name == outside.name)
            .collect();
        assert!(unrelated.is_empty(), "{}", describe(&unrelated));
        let refused: Vec<&AuditEvent> = mine.iter().copied().filter(|e| e.code == 403).collect();
        assert!(
            refused.is_empty(),
            "the chart's RBAC for a selector refused requests of {}:\n{}",
            release.user,
            describe(&refused)
        );
        // Its own Lease only.
        let leases: BTreeSet<&str> = mine
            .iter()
            .filter(|e| e.resource == "leases" && e.is_write())
            .map(|e| e.name.as_str())
            .collect();
        let own_lease = release.lease();
        assert!(
            leases.iter().all(|l| *l == own_lease || l.is_empty()),
            "{} wrote Leases {leases:?}, not only {own_lease} ({} is the other's)",
            release.user,
            other.lease()
        );
        assert!(
            mine.iter().any(|e| e.namespace == own[0]
                && e.resource == "opsconductorstacks"
                && e.subresource == "status"
                && e.succeeded()),
            "{} never wrote its stack's status",
            release.user
        );
    }
    for op in [&op_a, &op_b] {
        let log = op.log_text();
        let denials: Vec<&str> = log.lines().filter(|l| l.contains("forbidden")).collect();
        assert!(denials.is_empty(), "{}:\n{}", op.name, denials.join("\n"));
    }
}

/// A release serving every namespace with `--audit-namespaces with-stacks`, as its own
/// ServiceAccount with the chart's cluster-wide RBAC: the violation audit watches Pods,
/// Services, NetworkPolicies and Ingresses one namespace at a time, only where a stack is. From
/// the audit log: none of them is listed or watched cluster-wide, none in a namespace without a
/// stack (which holds a NodePort Service and a NetworkPolicy), and when the namespace's stack is
/// deleted its audit watches end; a violation in the stack's namespace is still found.
#[tokio::test]
async fn the_audit_watches_only_namespaces_that_hold_a_stack() {
    let _serial = SERIAL.lock().await;
    let Some(sys) = TestNamespace::new("scope-aud-sys").await else {
        return;
    };
    let cp = sys.control_plane;
    assert_reads_recorded(cp);
    let with_stack = TestNamespace::new("scope-aud-stack").await.unwrap();
    let without = TestNamespace::new("scope-aud-none").await.unwrap();
    install_crd(cp).await;
    let (release, service_account) = ("aud", "op-aud");
    let user = format!("system:serviceaccount:{}:{service_account}", sys.name);
    let yaml = chart_rbac_of(release, &sys.name, service_account, &[]);
    kubectl(cp, &["apply"], &yaml);
    let _rbac = ClusterRbac { cp, yaml };

    let exposed = |name: &str| -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"type": "NodePort", "ports": [{"port": 80}]}
        }))
        .unwrap()
    };
    let open_policy: k8s_openapi::api::networking::v1::NetworkPolicy =
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "open"},
            "spec": {"podSelector": {}, "ingress": [{}]}
        }))
        .unwrap();
    Api::<Service>::namespaced(without.client.clone(), &without.name)
        .create(&Default::default(), &exposed("unrelated"))
        .await
        .unwrap();
    Api::<k8s_openapi::api::networking::v1::NetworkPolicy>::namespaced(
        without.client.clone(),
        &without.name,
    )
    .create(&Default::default(), &open_policy)
    .await
    .unwrap();

    let audit = AuditLog::of(cp);
    let start = audit.mark();
    let dir = cp.state_dir.join("scope-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join(format!("kubeconfig-{release}-{}", std::process::id()));
    write_certificate_kubeconfig(cp, &kubeconfig, &user, &as_service_account(&user));
    let lease = format!("{release}-opsconductor-operator");
    let op = OperatorProcess::spawn(Spawn {
        name: release,
        kubeconfig: &kubeconfig,
        log_dir: &dir,
        args: &[
            "--audit-namespaces",
            "with-stacks",
            "--leader-election",
            "--leader-election-namespace",
            &sys.name,
            "--leader-election-id",
            &lease,
        ],
        env: &[("POD_NAME", release)],
    });
    eventually(
        "the operator to lead and sync its caches (/readyz)",
        Duration::from_secs(90),
        async || op.ready().then_some(()),
    )
    .await;
    let stack = apply_stack(
        &with_stack.client,
        &example("minimal.yaml", &with_stack.name),
    )
    .await;
    converged(&with_stack, &stack, "the stack to converge").await;
    Api::<Service>::namespaced(with_stack.client.clone(), &with_stack.name)
        .create(&Default::default(), &exposed("exposed"))
        .await
        .unwrap();
    let stacks: Api<OpsConductorStack> = with_stack.api();
    eventually(
        "the NodePort Service in the stack's namespace to be reported",
        Duration::from_secs(60),
        || {
            let stacks = stacks.clone();
            async move {
                let s = stacks.get("hello").await.ok()?;
                s.status?
                    .violations
                    .iter()
                    .any(|v| v.kind == "Service" && v.name == "exposed")
                    .then_some(())
            }
        },
    )
    .await;

    // The stack goes: the audit's watches of its namespace end.
    stacks.delete("hello", &Default::default()).await.unwrap();
    let audited = ["pods", "services", "networkpolicies", "ingresses"];
    eventually(
        "every audit watch of the namespace whose stack is gone to end",
        Duration::from_secs(60),
        || {
            let (mut started, mut ended) = (BTreeSet::new(), BTreeSet::new());
            for e in audit
                .requests_since(&start)
                .iter()
                .filter(|e| e.user == user && e.namespace == with_stack.name && e.verb == "watch")
            {
                if e.stage == "ResponseStarted" {
                    started.insert((e.resource.clone(), e.audit_id.clone()));
                } else {
                    ended.insert((e.resource.clone(), e.audit_id.clone()));
                }
            }
            let kinds: BTreeSet<&str> = started.iter().map(|(r, _)| r.as_str()).collect();
            let ok = audited.iter().all(|k| kinds.contains(k)) && started.is_subset(&ended);
            async move { ok.then_some(()) }
        },
    )
    .await;

    let requests = audit.requests_since(&start);
    let mine: Vec<&AuditEvent> = requests.iter().filter(|e| e.user == user).collect();
    let wide: Vec<&AuditEvent> = mine
        .iter()
        .copied()
        .filter(|e| {
            matches!(e.verb.as_str(), "list" | "watch")
                && e.namespace.is_empty()
                && (audited.contains(&e.resource.as_str())
                    || e.api_group == "gateway.networking.k8s.io")
        })
        .collect();
    assert!(
        wide.is_empty(),
        "cluster-wide audit watches with --audit-namespaces with-stacks:\n{}",
        describe(&wide)
    );
    let elsewhere: Vec<&AuditEvent> = mine
        .iter()
        .copied()
        .filter(|e| e.namespace == without.name)
        .collect();
    assert!(
        elsewhere.is_empty(),
        "requests in a namespace without a stack:\n{}",
        describe(&elsewhere)
    );
    // Refusals in this test's namespaces and of cluster-scoped requests (it also serves stacks
    // that earlier tests left in namespaces being deleted, where writes are refused).
    let refused: Vec<&AuditEvent> = mine
        .iter()
        .copied()
        .filter(|e| {
            e.code == 403
                && [
                    sys.name.as_str(),
                    with_stack.name.as_str(),
                    without.name.as_str(),
                    "",
                ]
                .contains(&e.namespace.as_str())
        })
        .collect();
    assert!(refused.is_empty(), "{}", describe(&refused));
}

/// Service identity with an operator that may not read the API server's signing keys: the
/// release's user here has only the audit group, not `system:serviceaccounts`, so the default
/// binding `system:service-account-issuer-discovery` does not cover it (a cluster that removed
/// that binding is the same). The stack says so in `ServiceIdentityReady` (and `Ready`), its
/// identity ConfigMap has no keys (every token is refused: fails closed); once the read is
/// allowed, the next retry publishes the API server's keys and the condition turns True.
#[tokio::test]
async fn an_operator_that_may_not_read_the_signing_keys_says_so_and_publishes_none() {
    let _serial = SERIAL.lock().await;
    let Some(t) = Tenant::new("keys").await else {
        return;
    };
    let cp = t.release.control_plane;
    install_crd(cp).await;
    let _rbac = t.install_rbac();
    let dir = cp.state_dir.join("scope-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let op = t.start_in(&dir, &[AUDIT_READS_GROUP.to_string()]);
    eventually(
        "the operator to lead and sync its caches (/readyz)",
        Duration::from_secs(90),
        async || op.ready().then_some(()),
    )
    .await;

    let mut stack = serde_json::to_value(example("minimal.yaml", &t.served.name)).unwrap();
    stack["spec"]["serviceIdentity"] = serde_json::json!({"enabled": true});
    let stack: OpsConductorStack = serde_json::from_value(stack).unwrap();
    apply_stack(&t.served.client, &stack).await;
    let stacks: Api<OpsConductorStack> = t.served.api();
    let identity = async |want: &str| {
        let s = stacks.get("hello").await.ok()?;
        let status = s.status?;
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == "ServiceIdentityReady")?;
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
        (c.status == want).then(|| (c.clone(), ready.clone()))
    };
    let (refused, ready) = eventually(
        "ServiceIdentityReady=False",
        Duration::from_secs(90),
        async || identity("False").await,
    )
    .await;
    assert_eq!(refused.reason, "KeysUnavailable", "{refused:?}");
    assert!(
        refused.message.contains("forbidden") && refused.message.contains("hello-identity"),
        "the API server's answer and the ConfigMap: {refused:?}"
    );
    assert!(
        ready.status == "False" && ready.message.contains("ServiceIdentityReady"),
        "{ready:?}"
    );
    let config_maps: Api<ConfigMap> = t.served.api();
    let data = config_maps
        .get("hello-identity")
        .await
        .expect("the identity ConfigMap")
        .data
        .unwrap_or_default();
    assert_eq!(
        data.keys().map(String::as_str).collect::<Vec<_>>(),
        ["audience"],
        "no keys while they cannot be read: {data:?}"
    );

    // The read allowed (what the default binding gives every ServiceAccount).
    let binding = format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: {}-issuer-discovery\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: system:service-account-issuer-discovery\nsubjects:\n- apiGroup: rbac.authorization.k8s.io\n  kind: User\n  name: {}\n",
        t.release.name, t.user
    );
    kubectl(cp, &["apply"], &binding);
    let _binding = ClusterRbac { cp, yaml: binding };
    let (published, _) = eventually(
        "ServiceIdentityReady=True after the next read",
        Duration::from_secs(120),
        async || identity("True").await,
    )
    .await;
    assert_eq!(published.reason, "KeysPublished", "{published:?}");
    let served = support::identity::served_jwks(&t.served.client).await;
    let published_keys = eventually(
        "the API server's keys in the identity ConfigMap",
        Duration::from_secs(30),
        async || {
            let data = config_maps.get("hello-identity").await.ok()?.data?;
            serde_json::from_str::<serde_json::Value>(data.get("jwks.json")?).ok()
        },
    )
    .await;
    assert_eq!(published_keys, served);
}
