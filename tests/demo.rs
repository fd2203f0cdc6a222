//! The one-command demo (`scripts/demo`, issues #8 and #13) runs end to end on the real node,
//! as CI runs it: the chart is installed with the local operator image, the example stack is
//! Ready with every pod running, pebble issued the certificate through the gateway pod, HTTPS
//! through the gateway's NodePort (verified against pebble's root only) reached both services,
//! and afterwards nothing the demo started or added is left.
//!
//! The cluster is brought up first (`support::node::cluster`, as the node tier does), so the
//! demo takes the path of a user whose cluster already runs: it must leave the cluster running
//! and remove its namespace and the release it installed. The demo gets its own state dir, so
//! a demo a developer keeps running with `--keep` is not touched (the demo's lock refuses a
//! second run instead).
//!
//! Needs root and the node; under `CI=true` a missing part fails the test (see
//! tests/support/node.rs), outside CI `OPSC_SKIP_NODE=1` skips it explicitly.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use support::node::{Cluster, cluster};

/// The live processes of a demo run with `state`: every process the demo starts inherits the
/// state dir variable the test sets (`entry`).
fn processes_of(entry: &str) -> Vec<(u32, String)> {
    let needle = format!("{entry}\0");
    let mut found = Vec::new();
    for dir in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = dir.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let read = |f: &str| {
            String::from_utf8_lossy(&std::fs::read(dir.path().join(f)).unwrap_or_default())
                .into_owned()
        };
        if read("environ").contains(&needle) {
            found.push((pid, read("cmdline").replace('\0', " ")));
        }
    }
    found
}

fn pid_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn helm(cluster: &Cluster, args: &[&str]) -> String {
    let tools = support::tools_bin_dir().expect("the test tools (helm)");
    let home = tempfile::tempdir().expect("tempdir");
    let out = Command::new(tools.join("helm"))
        .args(args)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .expect("helm runs");
    assert!(
        out.status.success(),
        "helm {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn release_installed(cluster: &Cluster) -> bool {
    helm(cluster, &["list", "-A", "-q"])
        .lines()
        .any(|r| r == "opsconductor-operator")
}

#[test]
fn the_demo_installs_the_chart_serves_https_through_the_gateway_pod_and_cleans_up() {
    let Some(cluster) = cluster() else { return };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let state = std::env::temp_dir().join("opsconductor-demo-test");
    let state_entry = format!("OPSC_DEMO_STATE={}", state.display());
    // The release the node tier installs (and leaves, for its next test binary) would be
    // reused, and so not removed by the demo: the demo installs its own.
    if release_installed(cluster) {
        eprintln!("demo test: uninstalling the release an earlier node test left");
        helm(
            cluster,
            &[
                "uninstall",
                "opsconductor-operator",
                "-n",
                "opsconductor-system",
                "--wait",
            ],
        );
    }
    eprintln!("demo test: running scripts/demo with {state_entry}");
    // stderr (build and cluster progress) goes straight to the test's output.
    let out = Command::new(root.join("scripts/demo"))
        .env("OPSC_DEMO_STATE", &state)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("--- scripts/demo output ---\n{stdout}");
    assert!(out.status.success(), "scripts/demo failed ({})", out.status);

    // The progress steps, in order.
    let steps: Vec<&str> = stdout.lines().filter(|l| l.starts_with("==> ")).collect();
    let expected = [
        "==> the one-node cluster",
        "==> images",
        "==> operator: helm upgrade --install",
        "==> pebble",
        "==> stack applied",
        "==> waiting for the certificate",
        "==> waiting for the stack to be Ready",
        "==> kubectl get opsconductorstacks",
        "==> HTTPS through the gateway pod",
        "==> stopping everything the demo started",
    ];
    let mut at = 0;
    for e in expected {
        at += steps[at..]
            .iter()
            .position(|s| s.starts_with(e))
            .unwrap_or_else(|| panic!("no step {e:?} (in this order) in {steps:#?}"));
    }

    // `kubectl get opsconductorstacks`: Ready, both services, the host, a Valid certificate.
    let row: Vec<&str> = stdout
        .lines()
        .find(|l| l.starts_with("demo "))
        .unwrap_or_else(|| panic!("no row for the stack `demo`"))
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..5],
        ["demo", "True", "2/2", "demo.opsconductor.test", "Valid"]
    );
    // Real pods: the gateway and both services Running.
    let running = stdout
        .lines()
        .filter(|l| l.starts_with("pod/") && l.contains(" 1/1 ") && l.contains("Running"))
        .count();
    assert_eq!(running, 3, "three pods Running and Ready:\n{stdout}");

    // The certificate pebble issued (not the operator's temporary one) for the demo host.
    let issuer = stdout
        .lines()
        .find(|l| l.starts_with("issuer="))
        .expect("openssl x509 -issuer");
    assert!(issuer.contains("Pebble Intermediate CA"), "{issuer}");
    assert!(stdout.contains("DNS:demo.opsconductor.test"), "the SAN");

    // The HTTPS requests: curl trusted only pebble's root and reached each service's pod
    // through the gateway pod, which said it was HTTPS and added the gateway's headers.
    assert_eq!(stdout.matches("HTTP/2 200").count(), 2, "two HTTPS 200s");
    for (service, uri) in [("web", "/"), ("api", "/api/hello")] {
        assert!(
            stdout.contains(&format!("\"service\":\"{service}\""))
                && stdout.contains(&format!("\"uri\":\"{uri}\"")),
            "the service {service} answered {uri}"
        );
    }
    assert!(stdout.contains("\"x-forwarded-proto\":\"https\""));
    assert!(
        stdout
            .to_ascii_lowercase()
            .contains("strict-transport-security: max-age=")
    );
    assert!(stdout.contains("demo OK in "));

    // Nothing it started is left: no process of the run, no PID files, neither its namespace
    // nor the release it installed; the cluster, running before, still runs.
    let left = processes_of(&state_entry);
    assert!(left.is_empty(), "still running after the demo: {left:#?}");
    assert_eq!(pid_files(&state.join("pids")), Vec::<PathBuf>::new());
    for name in ["challtestsrv", "pebble"] {
        assert!(
            stdout.contains(&format!("stopped {name} (pid ")),
            "the demo reports stopping {name}"
        );
    }
    let ns = cluster
        .kubectl()
        .args([
            "get",
            "namespace",
            "opsc-demo",
            "--ignore-not-found",
            "-o",
            "name",
        ])
        .output()
        .expect("kubectl runs");
    assert_eq!(
        String::from_utf8_lossy(&ns.stdout).trim(),
        "",
        "namespace opsc-demo is gone"
    );
    assert!(
        !release_installed(cluster),
        "the release the demo installed is uninstalled"
    );
    assert!(
        stdout.contains("uninstalled the release opsconductor-operator"),
        "the demo reports the uninstall"
    );
}
