//! DNS-01 against real parts: Knot DNS (Debian's `knot`, installed by scripts/install-nginx)
//! as the authoritative server on loopback, taking RFC 2136 updates signed with a TSIG key;
//! pebble validating through it (`-dnsserver`); the operator binary against the real control
//! plane.
//!
//! The zone `example.test` is served by a primary on 127.0.0.1 (updates allowed with the key
//! `acme-key`) and, where a test needs a second authoritative server, a second knot on
//! 127.0.0.2 with the same port: either serving the zone file as it was (never sees an
//! update) or a real secondary (NOTIFY from the primary, then a transfer). The operator asks the zone's NS servers on that port
//! (`OPSC_ACME_DNS01_NS_PORT`). No gateway runs: `OPSC_ACME_GATEWAY_URL` names a closed
//! port, so nothing here can go through HTTP-01.
//!
//! Under `CI=true` a missing part (control plane, pebble, knotd, kdig, knsupdate) fails the
//! test with a message naming it.

mod acme_support;
mod gateway_support;
mod support;

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use acme_support::{GatewayRunner, Operator, Pebble, PebbleOptions, free_port, pebble_orders};
use k8s_openapi::api::core::v1::{Event, Secret};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use opsconductor_operator::acme::{DNS01_RECORDS_ANNOTATION, cert};
use opsconductor_operator::crd::{CertificateState, CertificateStatus, OpsConductorStack};
use serde_json::json;
use support::process::{counting_listener, private_hosts_wrapper, spawn_as_operator_under};
use support::{TestNamespace, eventually};

/// Only one of these tests at a time (one operator per test).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A guard against hangs, never an assertion on speed.
const WAIT: Duration = Duration::from_secs(120);
const ZONE: &str = "example.test";
const KEY_NAME: &str = "acme-key";
/// The TSIG secret knot has (base64 of 32 bytes; a test key, used nowhere else).
const KEY_SECRET: &str = "c2VjcmV0LWtleS1mb3ItdGhlLWRucy0wMS10ZXN0cyE=";
/// Another key of the same length: what a wrong Secret holds.
const WRONG_SECRET: &str = "d3Jvbmcta2V5LWZvci10aGUtZG5zLTAxLXRlc3RzISE=";

/// Whether knotd, kdig and knsupdate are here; under `CI=true` a missing one fails.
fn knot_present() -> bool {
    let missing: Vec<&str> = ["knotd", "kdig", "knsupdate"]
        .into_iter()
        .filter(|tool| {
            !Command::new(tool)
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let message = format!(
        "the DNS-01 tests need {} (Debian's knot and knot-dnsutils; scripts/install-nginx installs them)",
        missing.join(", ")
    );
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if ci || std::env::var("OPSC_SKIP_NGINX").as_deref() != Ok("1") {
        panic!("{message}; outside CI, OPSC_SKIP_NGINX=1 skips these tests explicitly");
    }
    eprintln!("OPSC_SKIP_NGINX=1: skipping: {message}");
    false
}

/// A port free on both 127.0.0.1 and 127.0.0.2 (TCP; knot takes UDP too).
fn shared_port() -> u16 {
    loop {
        let port = free_port();
        if TcpListener::bind((Ipv4Addr::new(127, 0, 0, 2), port)).is_ok()
            && std::net::UdpSocket::bind((Ipv4Addr::new(127, 0, 0, 1), port)).is_ok()
            && std::net::UdpSocket::bind((Ipv4Addr::new(127, 0, 0, 2), port)).is_ok()
        {
            return port;
        }
    }
}

/// What a knotd is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Takes the updates (and transfers to the secondary, NOTIFYing it when `notify`).
    Primary { notify: bool },
    /// Serves the zone file as it is: never sees an update.
    StaticCopy,
    /// A real secondary: NOTIFY from the primary, then a transfer.
    Secondary,
}

/// One knotd, stopped by its PID on drop.
struct Knot {
    dir: tempfile::TempDir,
    child: Child,
}

impl Knot {
    /// knotd on `address:port` serving `zone_file` for example.test; `updates` allows RFC 2136
    /// updates signed with the test key.
    fn start(address: &str, port: u16, zone_file: &str, role: Role) -> Knot {
        let dir = tempfile::Builder::new()
            .prefix("opsc-knot-")
            .tempdir()
            .unwrap();
        let d = dir.path().display();
        std::fs::write(dir.path().join(format!("{ZONE}.zone")), zone_file).unwrap();
        // Transfers and NOTIFY between the two loopback servers (the kernel picks the source
        // address, so the whole loopback range is allowed).
        let (remote, acl, zone_extra) = match role {
            Role::Primary { notify } => (
                if notify {
                    format!("remote:\n  - id: secondary\n    address: 127.0.0.2@{port}\n\n")
                } else {
                    String::new()
                },
                format!(
                    "acl:\n  - id: acme_update\n    key: {KEY_NAME}\n    action: update\n\
                     \x20   update-type: [TXT, NS]\n  - id: transfer\n    address: 127.0.0.0/8\n\
                     \x20   action: transfer\n"
                ),
                if notify {
                    "    acl: [acme_update, transfer]\n    notify: secondary\n"
                } else {
                    "    acl: [acme_update, transfer]\n"
                },
            ),
            Role::StaticCopy => (String::new(), String::new(), ""),
            Role::Secondary => (
                format!("remote:\n  - id: primary\n    address: 127.0.0.1@{port}\n\n"),
                "acl:\n  - id: notify_from_primary\n    address: 127.0.0.0/8\n    action: notify\n"
                    .to_string(),
                "    master: primary\n    acl: notify_from_primary\n",
            ),
        };
        let config = format!(
            "server:\n    rundir: \"{d}\"\n    listen: {address}@{port}\n\n\
             control:\n    listen: \"{d}/knot.sock\"\n\n\
             log:\n  - target: stderr\n    any: info\n\n\
             database:\n    storage: \"{d}\"\n\n\
             key:\n  - id: {KEY_NAME}\n    algorithm: hmac-sha256\n    secret: {KEY_SECRET}\n\n\
             {remote}{acl}\n\
             template:\n  - id: default\n    storage: \"{d}\"\n    zonefile-sync: -1\n    \
             journal-content: changes\n    semantic-checks: off\n\n\
             zone:\n  - domain: {ZONE}\n    file: \"{ZONE}.zone\"\n{zone_extra}"
        );
        let config_path = dir.path().join("knot.conf");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("knot.log");
        let mut child = Command::new("knotd")
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("knotd starts");
        let deadline = Instant::now() + Duration::from_secs(30);
        // Listening, and the zone loaded (an authoritative SOA answer).
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "knotd exited ({status}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if TcpStream::connect((address, port)).is_ok()
                && kdig(address, port, "SOA", ZONE)
                    .iter()
                    .any(|l| l.contains("ns1"))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "knotd did not serve {ZONE} within 30 s (a hang guard):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Knot { dir, child }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("knot.log")).unwrap_or_default()
    }
}

impl Drop for Knot {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- knot log ---\n{}", self.log());
        }
    }
}

/// `kdig +short` answer lines (TXT values without their quotes).
fn kdig(address: &str, port: u16, rtype: &str, name: &str) -> Vec<String> {
    let out = Command::new("kdig")
        .arg(format!("@{address}"))
        .args([
            "-p",
            &port.to_string(),
            "+short",
            "+norecurse",
            "+tcp",
            rtype,
            name,
        ])
        .output()
        .expect("kdig runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().trim_matches('"').to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// An RFC 2136 update with the test key, by knot's own client.
fn knsupdate(port: u16, commands: &str) {
    let mut child = Command::new("knsupdate")
        .args(["-y", &format!("hmac-sha256:{KEY_NAME}:{KEY_SECRET}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("knsupdate runs");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            format!("server 127.0.0.1 {port}\nzone {ZONE}.\n{commands}\nsend\nquit\n").as_bytes(),
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "knsupdate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn zone_file(second_server: bool) -> String {
    let mut z = format!(
        "$ORIGIN {ZONE}.\n$TTL 60\n@ SOA ns1.{ZONE}. hostmaster.{ZONE}. 1 60 60 3600 60\n\
         @ NS ns1.{ZONE}.\nns1 A 127.0.0.1\nwww A 127.0.0.1\n"
    );
    if second_server {
        z.push_str(&format!("@ NS ns2.{ZONE}.\nns2 A 127.0.0.2\n"));
    }
    z
}

struct World {
    ns: TestNamespace,
    port: u16,
    primary: Knot,
    _secondary: Option<Knot>,
    pebble: Pebble,
    _gateway: Option<GatewayRunner>,
    operator: Option<Operator>,
    env: Vec<(&'static str, String)>,
}

impl World {
    /// Knot (and, with `second`, a second authoritative server of the zone on 127.0.0.2: a
    /// static copy that never sees updates, or a real secondary), pebble validating through
    /// knot, the TSIG Secret and the pebble CA Secret.
    async fn new(prefix: &str, second: Option<Role>) -> Option<World> {
        Self::with(prefix, second, false).await
    }

    /// With `gateway`, also real nginx running the gateway configuration of stack `shop` as
    /// the operator writes it: pebble's HTTP-01 validation and the operator's self-check go
    /// there (for the hosts not under `dns01.domains`).
    async fn with(prefix: &str, second: Option<Role>, gateway: bool) -> Option<World> {
        if !knot_present() || !acme_support::parts_present() {
            return None;
        }
        let ns = TestNamespace::new(prefix).await?;
        let tools = support::tools_bin_dir()?;
        support::operator::install_crd(ns.control_plane).await;
        let port = shared_port();
        let primary = Knot::start(
            "127.0.0.1",
            port,
            &zone_file(second.is_some()),
            Role::Primary {
                notify: second == Some(Role::Secondary),
            },
        );
        let secondary = second.map(|role| Knot::start("127.0.0.2", port, &zone_file(true), role));
        let gateway = gateway.then(|| GatewayRunner::start(ns.client.clone(), &ns.name, "shop"));
        let gateway_port = gateway
            .as_ref()
            .map_or_else(free_port, GatewayRunner::http_port);
        let pebble = Pebble::start(
            tools,
            port,
            PebbleOptions {
                validity_seconds: 90 * 86_400,
                http_port: gateway_port,
                nonce_reject: 0,
                va_sleep: None,
                external_account_binding: None,
            },
        );
        let w = World {
            ns,
            port,
            primary,
            _secondary: secondary,
            pebble,
            _gateway: gateway,
            operator: None,
            env: vec![
                // Without a gateway, a closed port: nothing may go through the gateway.
                (
                    "OPSC_ACME_GATEWAY_URL",
                    format!("http://127.0.0.1:{gateway_port}"),
                ),
                ("OPSC_ACME_SELF_CHECK_SECONDS", "2".to_string()),
                ("OPSC_ACME_BACKOFF_FIRST_SECONDS", "2".to_string()),
                ("OPSC_ACME_BACKOFF_CAP_SECONDS", "16".to_string()),
                ("OPSC_ACME_RECHECK_SECONDS", "3".to_string()),
                ("OPSC_ACME_DNS01_NS_PORT", port.to_string()),
            ],
        };
        w.put_secret("pebble-ca", "ca.crt", &w.pebble.tls_ca_pem.clone())
            .await;
        w.put_secret("tsig", "secret", KEY_SECRET).await;
        Some(w)
    }

    fn start_operator(&mut self) {
        self.operator = None;
        self.operator = Some(Operator::start(self.ns.control_plane, &self.env));
    }

    fn stop_operator(&mut self) {
        self.operator = None;
    }

    async fn put_secret(&self, name: &str, key: &str, value: &str) {
        self.ns
            .api::<Secret>()
            .patch(
                name,
                &PatchParams::apply("opsconductor-tests").force(),
                &Patch::Apply(json!({
                    "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                    "stringData": {key: value}
                })),
            )
            .await
            .unwrap();
    }

    /// A stack `name` for `hosts`, every host through DNS-01 with the test key; `dns01` adds
    /// or replaces fields of `spec.tls.acme.dns01`, `gateway` of `spec.gateway`.
    async fn apply(
        &self,
        name: &str,
        hosts: &[&str],
        dns01: serde_json::Value,
        gateway: serde_json::Value,
    ) {
        let mut stack = json!({
            "apiVersion": "opsconductor.io/v1alpha1",
            "kind": "OpsConductorStack",
            "metadata": {"name": name, "namespace": self.ns.name},
            "spec": {
                "gateway": {"hosts": hosts, "replicas": 1},
                "tls": {"acme": {
                    "directoryUrl": self.pebble.directory_url(),
                    "acceptTermsOfService": true,
                    "caBundleSecretRef": {"name": "pebble-ca", "key": "ca.crt"},
                    "dns01": {
                        "rfc2136": {
                            "nameserver": format!("127.0.0.1:{}", self.port),
                            "tsigKeyName": KEY_NAME,
                            "tsigSecretRef": {"name": "tsig", "key": "secret"},
                        },
                    },
                }},
                "services": [{"name": "web", "image": "web:1", "port": 8080}],
            }
        });
        for (k, v) in dns01.as_object().unwrap() {
            stack["spec"]["tls"]["acme"]["dns01"][k] = v.clone();
        }
        for (k, v) in gateway.as_object().unwrap() {
            stack["spec"]["gateway"][k] = v.clone();
        }
        let stack: OpsConductorStack = serde_json::from_value(stack).unwrap();
        support::operator::apply_stack(&self.ns.client, &stack).await;
    }

    async fn certificate(&self, name: &str) -> Option<CertificateStatus> {
        let api: Api<OpsConductorStack> = self.ns.api();
        api.get(name).await.ok()?.status?.certificate
    }

    async fn condition_message(&self, name: &str) -> String {
        let api: Api<OpsConductorStack> = self.ns.api();
        let stack = api.get(name).await.unwrap();
        stack
            .status
            .and_then(|s| {
                s.conditions
                    .into_iter()
                    .find(|c| c.type_ == "CertificateReady")
            })
            .map(|c| c.message)
            .unwrap_or_default()
    }

    async fn valid(&self, name: &str) -> CertificateStatus {
        eventually(
            &format!("a Valid certificate for {name}"),
            WAIT,
            async || {
                let c = self.certificate(name).await?;
                (c.state == CertificateState::Valid && c.serial.is_some()).then_some(c)
            },
        )
        .await
    }

    /// The first recorded failure whose reason contains `needle`.
    async fn failure(&self, name: &str, needle: &str) -> CertificateStatus {
        eventually(&format!("a failure naming {needle:?}"), WAIT, async || {
            let c = self.certificate(name).await?;
            (c.failed_attempts >= 1
                && c.last_failure_reason
                    .as_deref()
                    .is_some_and(|r| r.contains(needle)))
            .then_some(c)
        })
        .await
    }

    async fn tls_secret(&self, name: &str) -> Secret {
        self.ns
            .api::<Secret>()
            .get(&format!("{name}-tls"))
            .await
            .unwrap()
    }

    /// The DNS-01 records the stack's Secret lists as written and not yet removed.
    async fn ledger(&self, name: &str) -> Vec<serde_json::Value> {
        let Ok(Some(secret)) = self
            .ns
            .api::<Secret>()
            .get_opt(&format!("{name}-tls"))
            .await
        else {
            return Vec::new();
        };
        secret
            .metadata
            .annotations
            .and_then(|a| a.get(DNS01_RECORDS_ANNOTATION).cloned())
            .map(|t| serde_json::from_str(&t).unwrap())
            .unwrap_or_default()
    }

    fn txt(&self, name: &str) -> Vec<String> {
        kdig("127.0.0.1", self.port, "TXT", name)
    }

    async fn events(&self) -> Vec<(String, String)> {
        let api: Api<Event> = self.ns.api();
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
            .collect()
    }

    fn operator_log(&self) -> String {
        self.operator
            .as_ref()
            .map(|op| op.log_text())
            .unwrap_or_default()
    }
}

/// The certificate in `<name>-tls` covers `names` exactly and is not the temporary one.
async fn assert_certificate_for(w: &World, name: &str, names: &[&str]) {
    let data = w.tls_secret(name).await.data.unwrap();
    let wanted: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let leaf = cert::inspect(
        &data["tls.crt"].0,
        &data["tls.key"].0,
        &wanted,
        SystemTime::now(),
    )
    .unwrap();
    assert!(!leaf.temporary);
    let mut got = leaf.facts.hosts.clone();
    got.sort();
    let mut want = wanted.clone();
    want.sort();
    assert_eq!(got, want);
}

/// The propagation waits the operator logged (seconds), from its JSON log.
fn propagation_waits(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("DNS-01 record visible at every authoritative server"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["fields"]["seconds"].as_f64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_and_apex_issued_through_rfc2136_for_a_private_gateway() {
    let _serial = SERIAL.lock().await;
    let Some(mut w) = World::new("dns01-issue", None).await else {
        return;
    };
    w.start_operator();
    let applied = Instant::now();
    // A private gateway: only 10.99.0.0/16 may reach it, so the CA (and HTTP-01) cannot; the
    // gateway is not even running (OPSC_ACME_GATEWAY_URL is a closed port).
    w.apply(
        "shop",
        &["dns.example.test", "*.dns.example.test"],
        json!({}),
        json!({"allowedSourceRanges": ["10.99.0.0/16"]}),
    )
    .await;
    let issued = w.valid("shop").await;
    let elapsed = applied.elapsed();
    assert_eq!(issued.failed_attempts, 0);
    assert_certificate_for(&w, "shop", &["dns.example.test", "*.dns.example.test"]).await;

    // Cleaned up: no TXT record left at the challenge name, and the ledger is empty.
    assert_eq!(
        w.txt("_acme-challenge.dns.example.test"),
        Vec::<String>::new()
    );
    assert!(w.ledger("shop").await.is_empty());
    // Validated through DNS only: no self-check of the gateway, no HTTP-01 at pebble.
    let log = w.operator_log();
    assert!(!log.contains("self-check"), "{log}");
    assert!(!w.pebble.log().contains("http-01"), "{}", w.pebble.log());

    let events = w.events().await;
    let issued_event = events
        .iter()
        .find(|(r, _)| r == "CertificateIssued")
        .unwrap_or_else(|| panic!("a CertificateIssued Event: {events:?}"));
    let waits = propagation_waits(&log);
    assert!(!waits.is_empty(), "the propagation wait is logged: {log}");
    support::measured(format!(
        "DNS-01 (wildcard + apex, knot on loopback): stack applied to Valid status in \
         {:.2} s; operator: {}; propagation waits: {:?} s",
        elapsed.as_secs_f64(),
        issued_event.1,
        waits
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_tsig_key_is_named_in_status_and_no_order_is_placed() {
    let _serial = SERIAL.lock().await;
    let Some(mut w) = World::new("dns01-key", None).await else {
        return;
    };
    w.put_secret("tsig", "secret", WRONG_SECRET).await;
    w.start_operator();
    w.apply("shop", &["key.example.test"], json!({}), json!({}))
        .await;
    let failed = w.failure("shop", "NOTAUTH").await;
    let reason = failed.last_failure_reason.unwrap();
    assert!(reason.contains("Secret tsig, key \"secret\""), "{reason}");
    assert!(reason.contains(KEY_NAME), "{reason}");
    assert!(
        !reason.contains(WRONG_SECRET) && !reason.contains(KEY_SECRET),
        "{reason}"
    );
    // Found before ordering: the CA saw no order.
    assert_eq!(pebble_orders(&w.pebble.log()), 0);
    assert_eq!(
        w.txt("_acme-challenge.key.example.test"),
        Vec::<String>::new()
    );

    // The right key in the Secret (no other change): issued at the next attempt.
    w.put_secret("tsig", "secret", KEY_SECRET).await;
    w.valid("shop").await;
    assert_certificate_for(&w, "shop", &["key.example.test"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_the_server_does_not_serve_is_named_and_no_order_is_placed() {
    let _serial = SERIAL.lock().await;
    let Some(mut w) = World::new("dns01-zone", None).await else {
        return;
    };
    w.start_operator();
    w.apply("shop", &["www.elsewhere.test"], json!({}), json!({}))
        .await;
    let failed = w.failure("shop", "serves no zone").await;
    let reason = failed.last_failure_reason.unwrap();
    assert!(
        reason.contains("_acme-challenge.www.elsewhere.test"),
        "{reason}"
    );
    assert!(
        reason.contains(&format!("127.0.0.1:{}", w.port)),
        "{reason}"
    );
    assert_eq!(pebble_orders(&w.pebble.log()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_not_served_in_time_names_the_server_and_is_removed() {
    let _serial = SERIAL.lock().await;
    let Some(mut w) = World::new("dns01-slow", Some(Role::StaticCopy)).await else {
        return;
    };
    // No second attempt while the test looks: the state stays Failed and no new record is
    // written meanwhile.
    w.env.retain(|(k, _)| !k.starts_with("OPSC_ACME_BACKOFF_"));
    w.env
        .push(("OPSC_ACME_BACKOFF_FIRST_SECONDS", "600".to_string()));
    w.env
        .push(("OPSC_ACME_BACKOFF_CAP_SECONDS", "600".to_string()));
    w.start_operator();
    w.apply(
        "shop",
        &["slow.example.test"],
        json!({"propagationTimeoutSeconds": 3}),
        json!({}),
    )
    .await;
    let failed = w.failure("shop", "is not served by").await;
    let reason = failed.last_failure_reason.unwrap();
    // The second server (which never gets the update) is named; the primary is not.
    assert!(
        reason.contains(&format!("ns2.example.test (127.0.0.2:{})", w.port)),
        "{reason}"
    );
    assert!(!reason.contains("127.0.0.1"), "{reason}");
    let cert = w.certificate("shop").await.unwrap();
    assert_eq!(cert.state, CertificateState::Failed);
    // Clean-up after the failure: the record written at the primary is gone, the ledger empty.
    eventually("the record removed after the failure", WAIT, async || {
        (w.txt("_acme-challenge.slow.example.test").is_empty() && w.ledger("shop").await.is_empty())
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_left_by_an_operator_stopped_mid_order_is_removed_by_the_next() {
    let _serial = SERIAL.lock().await;
    let Some(mut w) = World::new("dns01-restart", Some(Role::StaticCopy)).await else {
        return;
    };
    w.start_operator();
    // The second server never sees the record: the order waits for it (up to 10 minutes).
    w.apply(
        "shop",
        &["restart.example.test"],
        json!({"propagationTimeoutSeconds": 600}),
        json!({}),
    )
    .await;
    let name = "_acme-challenge.restart.example.test";
    let left = eventually("the record written and listed", WAIT, async || {
        let ledger = w.ledger("shop").await;
        let txt = w.txt(name);
        (ledger.len() == 1 && txt.len() == 1).then(|| txt[0].clone())
    })
    .await;
    assert_eq!(w.ledger("shop").await[0]["value"], left);
    // The status says which server does not serve it yet.
    eventually("the status naming the server that lags", WAIT, async || {
        let m = w.condition_message("shop").await;
        m.contains(&format!("ns2.example.test (127.0.0.2:{})", w.port))
            .then_some(())
    })
    .await;

    // Stopped mid-order; the zone loses its lagging server meanwhile.
    w.stop_operator();
    assert_eq!(w.txt(name), std::slice::from_ref(&left));
    knsupdate(w.port, &format!("update delete {ZONE}. NS ns2.{ZONE}."));

    w.start_operator();
    w.valid("shop").await;
    assert_certificate_for(&w, "shop", &["restart.example.test"]).await;
    // The record the stopped process wrote is gone, and so are the new order's.
    assert_eq!(w.txt(name), Vec::<String>::new());
    assert!(w.ledger("shop").await.is_empty());
    assert!(
        w.operator_log()
            .contains("removed a DNS-01 record left by an earlier order"),
        "{}",
        w.operator_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stacks_in_one_zone_leave_each_other_and_foreign_records_alone() {
    let _serial = SERIAL.lock().await;
    let Some(mut w) = World::new("dns01-two", None).await else {
        return;
    };
    // Someone else's record at the name both stacks use.
    let name = "_acme-challenge.shared.example.test";
    knsupdate(w.port, &format!("update add {name}. 60 TXT \"not-ours\""));
    w.start_operator();
    // Both validate at _acme-challenge.shared.example.test, at the same time.
    w.apply("alpha", &["shared.example.test"], json!({}), json!({}))
        .await;
    w.apply("beta", &["*.shared.example.test"], json!({}), json!({}))
        .await;
    w.valid("alpha").await;
    w.valid("beta").await;
    assert_certificate_for(&w, "alpha", &["shared.example.test"]).await;
    assert_certificate_for(&w, "beta", &["*.shared.example.test"]).await;
    assert_eq!(w.txt(name), ["not-ours"]);
    assert!(w.ledger("alpha").await.is_empty() && w.ledger("beta").await.is_empty());
    let _ = &w.primary;
}

/// The propagation wait with a real secondary: the primary NOTIFYs it after the update, and
/// the operator waits until the secondary has transferred the record. Prints the figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_propagation_wait_covers_a_real_secondary_by_notify_and_transfer() {
    let _serial = SERIAL.lock().await;
    let Some(mut w) = World::new("dns01-secondary", Some(Role::Secondary)).await else {
        return;
    };
    eventually("the secondary to serve the zone", WAIT, async || {
        (!kdig("127.0.0.2", w.port, "SOA", ZONE).is_empty()).then_some(())
    })
    .await;
    w.start_operator();
    let applied = Instant::now();
    w.apply(
        "shop",
        &["sec.example.test", "*.sec.example.test"],
        json!({}),
        json!({}),
    )
    .await;
    w.valid("shop").await;
    let elapsed = applied.elapsed();
    assert_certificate_for(&w, "shop", &["sec.example.test", "*.sec.example.test"]).await;
    let log = w.operator_log();
    let waits = propagation_waits(&log);
    assert!(!waits.is_empty(), "the propagation wait is logged: {log}");
    // Removed at both servers once the secondary has the removal too.
    eventually("the records removed at both servers", WAIT, async || {
        (w.txt("_acme-challenge.sec.example.test").is_empty()
            && kdig(
                "127.0.0.2",
                w.port,
                "TXT",
                "_acme-challenge.sec.example.test",
            )
            .is_empty())
        .then_some(())
    })
    .await;
    let events = w.events().await;
    let issued = events
        .iter()
        .find(|(r, _)| r == "CertificateIssued")
        .map(|(_, m)| m.clone())
        .unwrap_or_default();
    support::measured(format!(
        "DNS-01 with a knot secondary (NOTIFY + IXFR): stack applied to Valid in \
         {:.2} s; operator: {issued}; propagation waits: {waits:?} s",
        elapsed.as_secs_f64()
    ));
}

/// HTTP-01 and DNS-01 in one order, chosen by `dns01.domains`: `www.example.test` through the
/// real gateway (nginx running the operator's configuration; pebble fetches the answer there),
/// `*.apps.example.test` and `apps.example.test` through knot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_and_dns01_in_one_order_chosen_by_domain() {
    let _serial = SERIAL.lock().await;
    let Some(mut w) = World::with("dns01-mixed", None, true).await else {
        return;
    };
    w.start_operator();
    let hosts = [
        "www.example.test",
        "apps.example.test",
        "*.apps.example.test",
    ];
    w.apply(
        "shop",
        &hosts,
        json!({"domains": ["apps.example.test"]}),
        json!({}),
    )
    .await;
    w.valid("shop").await;
    assert_certificate_for(&w, "shop", &hosts).await;
    let pebble = w.pebble.log();
    // pebble validated www over HTTP (at the gateway), and apps and its wildcard in DNS (it
    // logs only its HTTP attempts; the operator logs each DNS record's propagation).
    assert!(
        pebble.contains("Attempting to validate w/ HTTP: http://www.example.test:"),
        "{pebble}"
    );
    assert!(
        !pebble.contains("validate w/ HTTP: http://apps.example.test"),
        "{pebble}"
    );
    assert_eq!(
        w.txt("_acme-challenge.apps.example.test"),
        Vec::<String>::new()
    );
    assert!(w.operator_log().contains("DNS-01 record visible"));
}

/// A nameserver **name** that resolves to an internal address (issue 14, item 8) is refused
/// when the operator resolves it, and nothing is sent there; validation cannot see it (it
/// refuses only such addresses written as literals). The operator runs in a mount namespace of
/// its own whose `/etc/hosts` names the stand-ins (root and `unshare`, as in
/// `acme_directory_real.rs`), so that the system resolver itself answers with a link-local
/// address (the cloud metadata service) and the unspecified address (which connects to the
/// node's loopback, where a counting listener waits). The operator runs with
/// `--allow-loopback-acme-directory` (pebble and knot are on loopback), so a name for knot's
/// loopback address is resolved and used: the certificate is issued through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nameserver_names_that_resolve_to_internal_addresses_are_never_sent_to() {
    let _serial = SERIAL.lock().await;
    let Some(w) = World::new("dns01-internal", None).await else {
        return;
    };
    let cp = w.ns.control_plane;
    let (listener_port, connections) = counting_listener();
    let wrapper = private_hosts_wrapper(
        cp,
        "dns01-internal",
        "127.0.0.1 localhost\n\
         127.0.0.1 primary.dns01.test\n\
         169.254.169.254 metadata.dns01.test\n\
         0.0.0.0 unspecified.dns01.test\n",
    );
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let env: Vec<(&str, &str)> = w.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let operator = spawn_as_operator_under(
        cp,
        "dns01-internal",
        &["--resync-seconds", "30", "--allow-loopback-acme-directory"],
        &env,
        &wrapper,
    );
    eventually("the operator's caches to sync", WAIT, async || {
        operator.ready().then_some(())
    })
    .await;
    let rfc2136 = |nameserver: String| {
        json!({"rfc2136": {
            "nameserver": nameserver,
            "tsigKeyName": KEY_NAME,
            "tsigSecretRef": {"name": "tsig", "key": "secret"},
        }})
    };
    let cases = [
        (
            "unspecified",
            "unspecified.dns01.test",
            listener_port,
            "0.0.0.0",
        ),
        ("metadata", "metadata.dns01.test", w.port, "169.254.169.254"),
    ];
    for (name, host, port, _) in &cases {
        w.apply(
            name,
            &[&format!("{name}.example.test")],
            rfc2136(format!("{host}:{port}")),
            json!({}),
        )
        .await;
    }
    for (name, host, port, ip) in &cases {
        let reason = eventually(&format!("{name} to be refused"), WAIT, async || {
            // Fails at once on a connection, rather than after the wait.
            assert_eq!(
                connections.load(Ordering::SeqCst),
                0,
                "the operator connected to a nameserver name that resolves to 0.0.0.0\n{}",
                operator.log_text()
            );
            let c = w.certificate(name).await?;
            c.last_failure_reason
                .filter(|r| r.contains("spec.tls.acme.dns01.rfc2136.nameserver"))
        })
        .await;
        assert!(
            reason.contains(&format!(
                "spec.tls.acme.dns01.rfc2136.nameserver \"{host}:{port}\": the name \"{host}\" \
                 resolves to {ip}, "
            )) && reason.contains("nothing was sent to it"),
            "{name}: {reason}\n{}",
            operator.log_text()
        );
        eprintln!("{name}: {reason}");
    }
    let metadata = w.certificate("metadata").await.unwrap();
    assert!(
        metadata
            .last_failure_reason
            .unwrap()
            .contains("169.254.169.254, a link-local address"),
    );
    // Refused before any order: the CA saw none.
    assert_eq!(pebble_orders(&w.pebble.log()), 0);

    // A name for knot's own (loopback, allowed) address is resolved and used.
    w.apply(
        "named",
        &["named.example.test"],
        rfc2136(format!("primary.dns01.test:{}", w.port)),
        json!({}),
    )
    .await;
    w.valid("named").await;
    assert_certificate_for(&w, "named", &["named.example.test"]).await;
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "the operator connected to a nameserver name that resolves to 0.0.0.0"
    );
    drop(operator);
}
