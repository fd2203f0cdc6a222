//! The operator never fetches an ACME directory from the node or the cloud's metadata service
//! (issue 14, item 8): the real operator binary against the real control plane, with a TCP
//! listener on 127.0.0.1 standing in for whatever listens on the node's loopback. A stack whose
//! `directoryUrl` names a loopback (in any form the resolver accepts) or link-local address is
//! refused with the field path, and nothing connects to the listener; with the operator's
//! opt-in `--allow-loopback-acme-directory` (what tests with pebble on 127.0.0.1 use), the same
//! stack is accepted and the operator does connect.

mod support;

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kube::Api;
use opsconductor_operator::crd::OpsConductorStack;
use serde_json::json;
use support::operator::{apply_stack, install_crd};
use support::process::{OperatorProcess, spawn_as_operator};
use support::{ControlPlane, TestNamespace, eventually};

const WAIT: Duration = Duration::from_secs(60);

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
    let Some(ns) = TestNamespace::new("acme-directory").await else {
        return;
    };
    let cp = ns.control_plane;
    install_crd(cp).await;

    // What listens on the operator's loopback: counts every connection made to it.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    {
        let connections = connections.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                connections.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
    }

    // The released default: no loopback (the environment of cargo's processes allows it).
    let refusing = operator(
        cp,
        "refusing",
        &[],
        &[("OPSC_ALLOW_LOOPBACK_ACME_DIRECTORY", "false")],
    );
    eventually("the operator's caches to sync", WAIT, || async {
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
        let (_, message) = eventually(&format!("{name} to be refused"), WAIT, || async {
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
        || async { (connections.load(Ordering::SeqCst) > 0).then_some(()) },
    )
    .await;
    for name in ["loopback", "decimal"] {
        eventually(&format!("{name} to be accepted"), WAIT, || async {
            ready(&api, name)
                .await
                .filter(|(reason, _)| reason != "InvalidSpec")
        })
        .await;
    }
    drop(allowing);
}
