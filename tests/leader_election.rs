//! Leader election (src/leader/) with two real operator processes against the real control
//! plane: only the Lease holder reconciles; a standby takes over within the lease duration when
//! the leader is killed, at once when it is stopped (it releases the Lease), and a leader that
//! cannot renew steps down before a standby may start.
//!
//! Each operator runs as its own user, so the audit log tells their writes apart. The users may
//! read cluster-wide (the controller watches every namespace) but write only in the test's own
//! namespaces: the operators cannot touch other tests' stacks, and other tests' operators are
//! told apart by their user names.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::DeleteParams;
use kube::{Api, Client};
use opsconductor_operator::crd::OpsConductorStack;
use serde_json::{Value, json};
use support::operator::{apply_stack, example, install_crd, write_impersonating_kubeconfig};
use support::process::{OperatorProcess, Spawn};
use support::{AuditLog, ControlPlane, TestNamespace, eventually};

/// The defaults of `run --leader-election`, which the chart uses too.
const LEASE_DURATION: Duration = Duration::from_secs(15);
const RENEW_DEADLINE: Duration = Duration::from_secs(10);
const RETRY_PERIOD: Duration = Duration::from_secs(2);

/// Operator processes with leader election (stopped with SIGKILL when dropped).
struct Candidate;

impl Candidate {
    fn start(cp: &ControlPlane, name: &'static str, user: &str, lease_ns: &str) -> OperatorProcess {
        let dir = cp.state_dir.join("leader-election-tests");
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = dir.join(format!(
            "kubeconfig-{name}-{}-{lease_ns}",
            std::process::id()
        ));
        write_impersonating_kubeconfig(cp, &kubeconfig, user, &["system:authenticated"]);
        // POD_NAME is the identity the Lease records (`<POD_NAME>_<random>`).
        OperatorProcess::spawn(Spawn {
            name,
            kubeconfig: &kubeconfig,
            log_dir: &dir,
            args: &["--leader-election", "--leader-election-namespace", lease_ns],
            env: &[("POD_NAME", name)],
        })
    }
}

/// Cluster-scoped RBAC of a test, deleted when dropped.
struct Rbac {
    cp: &'static ControlPlane,
    objects: Vec<String>,
}

impl Drop for Rbac {
    fn drop(&mut self) {
        let mut args = vec![
            "delete".to_string(),
            "--ignore-not-found".into(),
            "--wait=false".into(),
        ];
        args.extend(self.objects.iter().cloned());
        let _ = self.cp.kubectl().args(&args).output();
    }
}

fn kubectl_apply(cp: &ControlPlane, docs: &[Value]) {
    let yaml: String = docs
        .iter()
        .map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap()))
        .collect();
    let mut child = cp
        .kubectl()
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Read everything the controller watches, cluster-wide; write only the stack's namespace (and
/// its marker label) and the Lease. One RoleBinding per user for the Lease, so a test can take
/// one user's Lease access away.
fn grant(cp: &'static ControlPlane, users: &[&str], lease_ns: &str, stack_ns: &str) -> Rbac {
    grant_reads(cp, users, lease_ns, stack_ns, &["*"])
}

/// What the operator reads cluster-wide; the tests of a refused watch take one away.
const READS: [&str; 15] = [
    "ingresses",
    "opsconductorstacks",
    "serviceaccounts",
    "configmaps",
    "deployments",
    "poddisruptionbudgets",
    "services",
    "pods",
    "networkpolicies",
    "namespaces",
    "secrets",
    "events",
    "leases",
    "validatingadmissionpolicies",
    "validatingadmissionpolicybindings",
];

/// [`grant`], with cluster-wide reads of `reads` only.
fn grant_reads(
    cp: &'static ControlPlane,
    users: &[&str],
    lease_ns: &str,
    stack_ns: &str,
    reads: &[&str],
) -> Rbac {
    let name = format!("opsc-leader-test-{stack_ns}");
    let subjects: Vec<Value> = users
        .iter()
        .map(|u| json!({"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": u}))
        .collect();
    let mut docs = vec![
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": [
                {"apiGroups": ["*"], "resources": reads, "verbs": ["get", "list", "watch"]},
                {"apiGroups": [""], "resources": ["namespaces"], "resourceNames": [stack_ns], "verbs": ["patch"]},
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": subjects,
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "everything", "namespace": stack_ns},
            "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "everything", "namespace": stack_ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "everything"},
            "subjects": subjects,
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "leases", "namespace": lease_ns},
            "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}],
        }),
    ];
    for (i, s) in subjects.iter().enumerate() {
        docs.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": format!("leases-{i}"), "namespace": lease_ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "leases"},
            "subjects": [s],
        }));
    }
    kubectl_apply(cp, &docs);
    Rbac {
        cp,
        objects: vec![
            format!("clusterrole/{name}"),
            format!("clusterrolebinding/{name}"),
        ],
    }
}

fn user(ns: &str, name: &str) -> String {
    format!("opsc-leader-test:{ns}:{name}")
}

/// The Lease's holder, or "" when it has none (or does not exist yet).
async fn holder(leases: &Api<Lease>) -> String {
    leases
        .get_opt("opsconductor-operator")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
        .unwrap_or_default()
}

async fn wait_for_holder(
    leases: &Api<Lease>,
    candidate: &OperatorProcess,
    timeout: Duration,
) -> Duration {
    let start = Instant::now();
    let prefix = format!("{}_", candidate.name);
    eventually(
        &format!("operator {} to hold the Lease", candidate.name),
        timeout,
        async || holder(leases).await.starts_with(&prefix).then_some(()),
    )
    .await;
    start.elapsed()
}

async fn converged(client: &Client, ns: &str) {
    let stacks: Api<OpsConductorStack> = Api::namespaced(client.clone(), ns);
    eventually("the stack to converge", Duration::from_secs(60), || {
        let stacks = stacks.clone();
        async move {
            let s = stacks.get("prod").await.ok()?;
            let observed = s.status.as_ref()?.observed_generation;
            (observed.is_some() && observed == s.metadata.generation).then_some(())
        }
    })
    .await;
}

/// Writes per user in `ns` since `mark`, successful ones only.
fn writers(audit: &AuditLog, mark: &support::AuditMark, ns: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for e in audit.writes_since(mark, |e| e.namespace == ns && e.succeeded()) {
        *out.entry(e.user).or_default() += 1;
    }
    out
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_standby_takes_over_when_it_dies() {
    let Some(lease_ns) = TestNamespace::new("leader").await else {
        return;
    };
    let stack_ns = TestNamespace::new("leader-stack").await.unwrap();
    let cp = lease_ns.control_plane;
    install_crd(cp).await;
    let (user_a, user_b) = (user(&lease_ns.name, "a"), user(&lease_ns.name, "b"));
    let _rbac = grant(cp, &[&user_a, &user_b], &lease_ns.name, &stack_ns.name);
    let leases: Api<Lease> = lease_ns.api();
    let audit = AuditLog::of(cp);

    let mut a = Candidate::start(cp, "leader-a", &user_a, &lease_ns.name);
    wait_for_holder(&leases, &a, Duration::from_secs(30)).await;
    let b = Candidate::start(cp, "leader-b", &user_b, &lease_ns.name);
    // The standby is up, ready (it is ready to take over) and waiting.
    eventually(
        "the standby to be ready",
        Duration::from_secs(30),
        async || b.ready().then_some(()),
    )
    .await;
    eventually(
        "the standby to see the leader",
        Duration::from_secs(10),
        async || b.log_text().contains("another replica leads").then_some(()),
    )
    .await;
    // The leader becomes ready once its caches synced. (It once stayed 503 here: the readiness
    // task was one of several waiters on kube-runtime's store readiness, which wakes only the
    // last; the controller now waits on a channel of its own.)
    eventually(
        "the leader to be ready",
        Duration::from_secs(60),
        async || a.ready().then_some(()),
    )
    .await;

    // Only the leader reconciles.
    let mark = audit.mark();
    apply_stack(&stack_ns.client, &offline_example(&stack_ns.name)).await;
    converged(&stack_ns.client, &stack_ns.name).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let w = writers(&audit, &mark, &stack_ns.name);
    assert!(
        w.get(&user_a).copied().unwrap_or(0) >= 35,
        "the leader made too few writes: {w:?}"
    );
    assert_eq!(w.get(&user_b), None, "the standby wrote: {w:?}");
    assert!(a.metric("opsconductor_reconciles_total") >= 1.0);
    assert_eq!(b.metric("opsconductor_reconciles_total"), 0.0);
    assert!(holder(&leases).await.starts_with("leader-a_"));
    let transitions_before = leases
        .get("opsconductor-operator")
        .await
        .unwrap()
        .spec
        .unwrap()
        .lease_transitions
        .unwrap_or(0);

    // Kill the leader: no release, the Lease must expire.
    a.signal("-KILL");
    a.wait_exit(Duration::from_secs(5));
    let took = wait_for_holder(&leases, &b, LEASE_DURATION * 2).await;
    eprintln!(
        "leader_election: the standby took over {:.1}s after the leader was killed (lease {}s, retry {}s)",
        took.as_secs_f64(),
        LEASE_DURATION.as_secs(),
        RETRY_PERIOD.as_secs()
    );
    // Safety, not speed (the figure above is what to read for speed): the standby never took
    // a Lease that was still live.
    assert!(
        took >= LEASE_DURATION - RETRY_PERIOD - Duration::from_secs(1),
        "the standby took a live Lease after {took:?}"
    );
    let lease = leases
        .get("opsconductor-operator")
        .await
        .unwrap()
        .spec
        .unwrap();
    assert_eq!(lease.lease_transitions, Some(transitions_before + 1));

    // The new leader reconciles: drift is reverted by b.
    eventually(
        "the new leader's caches to sync",
        Duration::from_secs(30),
        async || b.ready().then_some(()),
    )
    .await;
    let mark = audit.mark();
    let policies: Api<NetworkPolicy> = stack_ns.api();
    policies
        .delete("prod-default-deny", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the new leader to restore the deleted NetworkPolicy",
        Duration::from_secs(30),
        || {
            let policies = policies.clone();
            async move {
                policies
                    .get_opt("prod-default-deny")
                    .await
                    .ok()?
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .map(|_| ())
            }
        },
    )
    .await;
    let w = writers(&audit, &mark, &stack_ns.name);
    assert!(w.get(&user_b).copied().unwrap_or(0) >= 1, "{w:?}");
    assert_eq!(w.get(&user_a), None, "{w:?}");
    assert!(b.log_text().contains("acquired the Lease"));
}

#[tokio::test]
async fn a_stopped_leader_releases_the_lease_for_an_immediate_handover() {
    let Some(lease_ns) = TestNamespace::new("leader-term").await else {
        return;
    };
    let stack_ns = TestNamespace::new("leader-term-stack").await.unwrap();
    let cp = lease_ns.control_plane;
    install_crd(cp).await;
    let (user_a, user_b) = (user(&lease_ns.name, "a"), user(&lease_ns.name, "b"));
    let _rbac = grant(cp, &[&user_a, &user_b], &lease_ns.name, &stack_ns.name);
    let leases: Api<Lease> = lease_ns.api();

    let mut a = Candidate::start(cp, "term-a", &user_a, &lease_ns.name);
    wait_for_holder(&leases, &a, Duration::from_secs(30)).await;
    let b = Candidate::start(cp, "term-b", &user_b, &lease_ns.name);
    eventually(
        "the standby to see the leader",
        Duration::from_secs(30),
        async || b.log_text().contains("another replica leads").then_some(()),
    )
    .await;

    a.signal("-TERM");
    let status = a.wait_exit(Duration::from_secs(30));
    // Released, not left to expire: once the stopped leader is gone the Lease names no holder
    // (or already the standby), long before its duration would have run out.
    let after_exit = holder(&leases).await;
    assert!(
        after_exit.is_empty() || after_exit.starts_with("term-b_"),
        "the stopped leader still holds the Lease: {after_exit:?}"
    );
    // Liveness only (no timing assertion): the standby takes it. The figure is printed.
    let took = wait_for_holder(&leases, &b, Duration::from_secs(60)).await;
    eprintln!(
        "leader_election: the standby took over {:.1}s after the leader exited (retry period {:?})",
        took.as_secs_f64(),
        RETRY_PERIOD
    );
    assert!(status.success(), "the stopped leader exited with {status}");
    let log = a.log_text();
    assert!(log.contains("released the Lease"), "{log}");
    // The controller had stopped before the release.
    let stopped = log.find("controller stopped").expect("controller stopped");
    assert!(stopped < log.find("released the Lease").unwrap(), "{log}");
}

/// A leader told to stop before its caches have synced, while a reconcile waits for them:
/// it stops and releases the Lease at once. Here the caches never sync (its cluster-wide
/// Ingress watch is refused) and a stack is there to reconcile. Before, that reconcile waited
/// for caches the stopping controller no longer filled (it stops polling its streams and waits
/// for the reconciles in flight), and the shutdown hung until the process was killed, with the
/// Lease left to expire (seen once in a full run: `a_stopped_leader_releases_the_lease…` sent
/// SIGTERM 0.4 s after the leader started, with stacks of earlier tests in the cluster).
#[tokio::test]
async fn a_leader_stopped_before_its_caches_synced_exits_and_releases_the_lease() {
    // The stack's reconcile starts (its watch is allowed), and waits for the Ingress cache.
    stopped_before_synced("unsynced", "Ingress", "ingresses").await;
}

/// The same with the stack watch itself refused: kube-runtime holds every reconcile until the
/// stack cache has its first list, and its graceful shutdown waited for that list, which no
/// longer came (seen in a full run: SIGTERM 0.5 s after the leader started, on a loaded
/// machine; the process hung until killed). Hung past 30 s without the fix.
#[tokio::test]
async fn a_leader_stopped_before_the_stacks_were_listed_exits_and_releases_the_lease() {
    stopped_before_synced("unlisted", "OpsConductorStack", "opsconductorstacks").await;
}

/// A leader whose cluster-wide watch of `resource` (`kind` in its log) is refused, with a
/// stack in the cluster, gets SIGTERM: it exits with 0 and releases the Lease.
async fn stopped_before_synced(prefix: &str, kind: &str, resource: &str) {
    let Some(lease_ns) = TestNamespace::new(&format!("leader-{prefix}")).await else {
        return;
    };
    let stack_ns = TestNamespace::new(&format!("leader-{prefix}-stack"))
        .await
        .unwrap();
    let cp = lease_ns.control_plane;
    install_crd(cp).await;
    let user_a = user(&lease_ns.name, "a");
    let reads: Vec<&str> = READS.iter().copied().filter(|r| *r != resource).collect();
    assert_eq!(reads.len(), READS.len() - 1, "{resource} is read");
    let _rbac = grant_reads(cp, &[&user_a], &lease_ns.name, &stack_ns.name, &reads);
    apply_stack(&stack_ns.client, &example("minimal.yaml", &stack_ns.name)).await;
    let leases: Api<Lease> = lease_ns.api();
    let name: &'static str = Box::leak(format!("{prefix}-a").into_boxed_str());
    let mut a = Candidate::start(cp, name, &user_a, &lease_ns.name);
    wait_for_holder(&leases, &a, Duration::from_secs(30)).await;
    eventually(
        &format!("the leader's {kind} watch to be refused"),
        Duration::from_secs(30),
        async || {
            let refused = format!("{resource}.");
            a.log_text()
                .lines()
                .any(|l| l.contains(&refused) && l.contains("is forbidden"))
                .then_some(())
        },
    )
    .await;
    // A reconcile allowed to start has started by now (200 ms of debounce).
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.signal("-TERM");
    let status = a.wait_exit(Duration::from_secs(30));
    let log = a.log_text();
    assert!(status.success(), "exited with {status}: {log}");
    assert!(
        !log.contains("watch caches synced"),
        "premise: the caches never synced: {log}"
    );
    assert!(log.contains("released the Lease"), "{log}");
    let after_exit = holder(&leases).await;
    assert!(
        after_exit.is_empty(),
        "the Lease still names {after_exit:?}"
    );
}

#[tokio::test]
async fn a_leader_that_cannot_renew_steps_down_before_a_standby_starts() {
    let Some(lease_ns) = TestNamespace::new("leader-renew").await else {
        return;
    };
    let stack_ns = TestNamespace::new("leader-renew-stack").await.unwrap();
    let cp = lease_ns.control_plane;
    install_crd(cp).await;
    let (user_a, user_b) = (user(&lease_ns.name, "a"), user(&lease_ns.name, "b"));
    let _rbac = grant(cp, &[&user_a, &user_b], &lease_ns.name, &stack_ns.name);
    let leases: Api<Lease> = lease_ns.api();

    let mut a = Candidate::start(cp, "renew-a", &user_a, &lease_ns.name);
    wait_for_holder(&leases, &a, Duration::from_secs(30)).await;
    let b = Candidate::start(cp, "renew-b", &user_b, &lease_ns.name);
    eventually(
        "the standby to see the leader",
        Duration::from_secs(30),
        async || b.log_text().contains("another replica leads").then_some(()),
    )
    .await;

    // Take the leader's access to the Lease away: its renewals fail from now on.
    let bindings: Api<k8s_openapi::api::rbac::v1::RoleBinding> = lease_ns.api();
    bindings
        .delete("leases-0", &DeleteParams::default())
        .await
        .unwrap();
    let cut = Instant::now();
    let status = a.wait_exit(RENEW_DEADLINE + RETRY_PERIOD * 2 + Duration::from_secs(5));
    let stepped_down = cut.elapsed();
    assert!(
        !status.success(),
        "a leader that lost its Lease must exit non-zero"
    );
    let log = a.log_text();
    assert!(log.contains("lost the leader Lease"), "{log}");
    assert!(log.contains("renew deadline"), "{log}");
    // It stopped while the Lease was still valid for everyone else...
    assert!(
        stepped_down < LEASE_DURATION,
        "the leader stepped down only after {stepped_down:?}"
    );
    // ...and the standby took over only after the Lease had expired.
    let took = wait_for_holder(&leases, &b, LEASE_DURATION * 2).await + stepped_down;
    eprintln!(
        "leader_election: leader stepped down after {:.1}s without renewals; standby took over after {:.1}s",
        stepped_down.as_secs_f64(),
        took.as_secs_f64()
    );
    assert!(took >= stepped_down);
    assert!(took >= LEASE_DURATION - RETRY_PERIOD * 2, "took {took:?}");
}

#[test]
fn the_dockerfile_builds_with_scripts_build_static_into_scratch() {
    let dockerfile =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"))
            .unwrap();
    assert!(dockerfile.contains("scripts/build-static"));
    assert!(dockerfile.contains("\nFROM scratch\n"));
    assert!(dockerfile.contains("\nUSER 65532:65532\n"));
    assert!(dockerfile.contains("ca-certificates.crt"));
    let ignore =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".dockerignore"))
            .unwrap();
    for copied in ["Cargo.toml", "Cargo.lock", "src/", "scripts/build-static"] {
        assert!(
            ignore.contains(&format!("!{copied}")),
            "{copied} is not in the build context"
        );
    }
}

/// The full example stack, with its ACME directory on a loopback port where nothing listens:
/// the operator must not reach out to a real CA from a test (it writes the bootstrap
/// certificate and reports the CA as unreachable).
fn offline_example(namespace: &str) -> OpsConductorStack {
    let mut stack = example("opsconductor.yaml", namespace);
    stack
        .spec
        .tls
        .acme
        .as_mut()
        .expect("the example uses ACME")
        .directory_url = "https://127.0.0.1:9/directory".into();
    stack
}
