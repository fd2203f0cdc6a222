//! The operator never fetches an ACME directory from the node or the cloud's metadata service
//! (issue 14, item 8): the real operator binary against the real control plane, with a TCP
//! listener on 127.0.0.1 standing in for whatever listens on the node's loopback. A stack whose
//! `directoryUrl` names a loopback (in any form the resolver accepts) or link-local address is
//! refused with the field path, and nothing connects to the listener; with the operator's
//! opt-in `--allow-loopback-acme-directory` (what tests with pebble on 127.0.0.1 use), the same
//! stack is accepted and the operator does connect.
//!
//! A host **name** that resolves to such an address is refused when the operator connects
//! (the check above cannot see it): the operator runs in a mount namespace of its own whose
//! `/etc/hosts` names the stand-ins, so the system resolver itself answers with loopback and
//! link-local addresses (root, and `unshare` from util-linux, as the node tier needs).

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use kube::Api;
use opsconductor_operator::crd::OpsConductorStack;
use serde_json::json;
use support::operator::{apply_stack, install_crd};
use support::process::{
    OperatorProcess, counting_listener, private_hosts_wrapper, spawn_as_operator,
    spawn_as_operator_under,
};
use support::{ControlPlane, TestNamespace, eventually};

const WAIT: Duration = Duration::from_secs(60);

/// The tests run one at a time: each one's operators watch the whole control plane, and would
/// otherwise act on the other's stacks (without its `/etc/hosts`, or with another flag).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn stack(name: &str, namespace: &str, directory_url: &str) -> OpsConductorStack {
    serde_json::from_value(json!({
        "apiVersion": "opsconductor.io/v1alpha1",
        "kind": "OpsConductorStack",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "gateway": {"hosts": [format!("{name}.example.com")]},
            "tls": {"acme": {"directoryUrl": directory_url, "acceptTermsOfService": true}},
            "services": [{"name": "web", "image": "web:1", "route": "/"}],
        }
    }))
    .unwrap()
}

/// The Ready condition's (reason, message).
async fn ready(api: &Api<OpsConductorStack>, name: &str) -> Option<(String, String)> {
    let s = api.get(name).await.ok()?;
    s.status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.reason, c.message))
}

fn operator(cp: &ControlPlane, tag: &str, args: &[&str], env: &[(&str, &str)]) -> OperatorProcess {
    spawn_as_operator(cp, tag, args, env)
}

#[tokio::test]
async fn directory_urls_on_loopback_or_link_local_addresses_are_never_fetched() {
    let _serial = SERIAL.lock().await;
    let Some(ns) = TestNamespace::new("acme-directory").await else {
        return;
    };
    let cp = ns.control_plane;
    install_crd(cp).await;

    let (port, connections) = counting_listener();

    // The released default: no loopback (the environment of cargo's processes allows it).
    let refusing = operator(
        cp,
        "refusing",
        &[],
        &[("OPSC_ALLOW_LOOPBACK_ACME_DIRECTORY", "false")],
    );
    eventually("the operator's caches to sync", WAIT, async || {
        refusing.ready().then_some(())
    })
    .await;
    let api: Api<OpsConductorStack> = ns.api();
    let urls = [
        ("loopback", format!("https://127.0.0.1:{port}/dir")),
        // 127.0.0.1 as one 32-bit number: the resolver turns it into the loopback address.
        ("decimal", format!("https://2130706433:{port}/dir")),
        ("metadata", "https://169.254.169.254/latest/dir".to_string()),
    ];
    for (name, url) in &urls {
        apply_stack(&ns.client, &stack(name, &ns.name, url)).await;
    }
    for (name, url) in &urls {
        let (_, message) = eventually(&format!("{name} to be refused"), WAIT, async || {
            ready(&api, name)
                .await
                .filter(|(reason, _)| reason == "InvalidSpec")
        })
        .await;
        assert!(
            message.contains(&format!("spec.tls.acme.directoryUrl: {url:?} names a")),
            "{name}: {message}"
        );
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "the operator connected to a loopback directory URL"
    );
    drop(refusing);

    // Opted in: the loopback stacks are accepted and their directory is fetched (link-local
    // addresses stay refused whatever the flag; the unit tests cover every form).
    let allowing = operator(cp, "allowing", &["--allow-loopback-acme-directory"], &[]);
    eventually(
        "the operator to fetch the loopback directory",
        WAIT,
        async || (connections.load(Ordering::SeqCst) > 0).then_some(()),
    )
    .await;
    for name in ["loopback", "decimal"] {
        eventually(&format!("{name} to be accepted"), WAIT, async || {
            ready(&api, name)
                .await
                .filter(|(reason, _)| reason != "InvalidSpec")
        })
        .await;
    }
    drop(allowing);
}

/// Orders again within seconds after a failure (the next operator resumes the backoff the
/// status records).
const FAST_RETRY: [(&str, &str); 2] = [
    ("OPSC_ACME_BACKOFF_FIRST_SECONDS", "1"),
    ("OPSC_ACME_BACKOFF_CAP_SECONDS", "2"),
];

/// `status.certificate.lastFailureReason`.
async fn certificate_failure(api: &Api<OpsConductorStack>, name: &str) -> Option<String> {
    api.get(name)
        .await
        .ok()?
        .status?
        .certificate?
        .last_failure_reason
}

#[tokio::test]
async fn directory_host_names_that_resolve_to_internal_addresses_are_never_connected_to() {
    let _serial = SERIAL.lock().await;
    let Some(ns) = TestNamespace::new("acme-directory-names").await else {
        return;
    };
    let cp = ns.control_plane;
    install_crd(cp).await;

    let (port, connections) = counting_listener();

    // The operator's own /etc/hosts: names no static check can tell from a public CA's.
    let wrapper = private_hosts_wrapper(
        cp,
        "acme-directory",
        "127.0.0.1 localhost\n\
         127.0.0.1 ca.acme-directory.test\n\
         169.254.169.254 metadata.acme-directory.test\n\
         ::ffff:127.0.0.1 mapped.acme-directory.test\n",
    );
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();

    let refusing = spawn_as_operator_under(
        cp,
        "resolving-refusing",
        &[],
        &[
            ("OPSC_ALLOW_LOOPBACK_ACME_DIRECTORY", "false"),
            FAST_RETRY[0],
            FAST_RETRY[1],
        ],
        &wrapper,
    );
    eventually("the operator's caches to sync", WAIT, async || {
        refusing.ready().then_some(())
    })
    .await;
    let api: Api<OpsConductorStack> = ns.api();
    let cases = [
        ("by-name", "ca.acme-directory.test", "127.0.0.1"),
        (
            "metadata",
            "metadata.acme-directory.test",
            "169.254.169.254",
        ),
        ("mapped", "mapped.acme-directory.test", "::ffff:127.0.0.1"),
    ];
    for (name, host, _) in &cases {
        let url = format!("https://{host}:{port}/dir");
        apply_stack(&ns.client, &stack(name, &ns.name, &url)).await;
    }
    for (name, host, ip) in &cases {
        let reason = eventually(&format!("{name} to be refused"), WAIT, async || {
            certificate_failure(&api, name).await
        })
        .await;
        assert!(
            reason.contains(&format!("the CA's host \"{host}\" resolves to {ip}"))
                && reason.contains("nothing was sent to it"),
            "{name}: {reason}\n{}",
            refusing.log_text()
        );
        eprintln!("{name}: {reason}");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "the operator connected to a name that resolves to a loopback address"
    );
    drop(refusing);

    // Opted in to loopback: the same name is resolved and connected to (the listener is no
    // TLS server, so the order fails after that, which is not the point); the metadata name
    // stays refused.
    let allowing = spawn_as_operator_under(
        cp,
        "resolving-allowing",
        &["--allow-loopback-acme-directory"],
        &FAST_RETRY,
        &wrapper,
    );
    eventually(
        "the operator to connect to the loopback name",
        WAIT,
        async || (connections.load(Ordering::SeqCst) > 0).then_some(()),
    )
    .await;
    drop(allowing);
    let reason = certificate_failure(&api, "metadata").await.unwrap();
    assert!(
        reason.contains("resolves to 169.254.169.254, a link-local address"),
        "{reason}"
    );
}
