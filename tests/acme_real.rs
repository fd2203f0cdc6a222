//! ACME against a real ACME server: pebble (built from its Go module) validating HTTP-01
//! through real nginx running the gateway configuration the operator wrote, the operator
//! binary talking to the real control plane.
//!
//! Each test has its own pebble, DNS server, nginx and operator; the tests run one at a time
//! (one operator per test, so that no two operators work on the same stacks).
//!
//! Under `CI=true` a missing part (control plane, pebble, nginx, openssl, curl) fails the
//! test with a message naming it.

mod acme_support;
mod gateway_support;
mod support;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use acme_support::{ChallTestSrv, GatewayRunner, Operator, Pebble, PebbleOptions};
use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use opsconductor_operator::acme::cert;
use opsconductor_operator::crd::{CertificateState, CertificateStatus, OpsConductorStack};
use serde_json::json;
use support::{TestNamespace, eventually};

/// Only one ACME test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const STACK: &str = "shop";
/// A guard against hangs, never an assertion on speed.
const WAIT: Duration = Duration::from_secs(120);

struct World {
    ns: TestNamespace,
    tools: &'static Path,
    _dns: ChallTestSrv,
    pebble: Pebble,
    gateway: GatewayRunner,
    _backend: gateway_support::Backend,
    operator: Option<Operator>,
    env: Vec<(&'static str, String)>,
}

impl World {
    /// Everything but the operator: a namespace with the pebble CA bundle Secret, pebble,
    /// its DNS, a backend for the one service, and the gateway runner.
    async fn new(prefix: &str, validity_seconds: u64, nonce_reject: u32) -> Option<World> {
        Self::with(prefix, validity_seconds, nonce_reject, None, None).await
    }

    async fn with(
        prefix: &str,
        validity_seconds: u64,
        nonce_reject: u32,
        va_sleep: Option<u32>,
        ca_http_port: Option<u16>,
    ) -> Option<World> {
        Self::with_pebble(prefix, |options| {
            options.validity_seconds = validity_seconds;
            options.nonce_reject = nonce_reject;
            options.va_sleep = va_sleep;
            if let Some(port) = ca_http_port {
                options.http_port = port;
            }
        })
        .await
    }

    /// The world with pebble's options set by `configure` (default: 90-day certificates,
    /// validation on the gateway's HTTP port, no faults, no External Account Binding).
    async fn with_pebble(
        prefix: &str,
        configure: impl FnOnce(&mut PebbleOptions),
    ) -> Option<World> {
        if !acme_support::parts_present() {
            return None;
        }
        let ns = TestNamespace::new(prefix).await?;
        let tools = support::tools_bin_dir()?;
        support::operator::install_crd(ns.control_plane).await;
        let gateway = GatewayRunner::start(ns.client.clone(), &ns.name, STACK);
        let dns = ChallTestSrv::start(tools);
        let mut options = PebbleOptions {
            validity_seconds: 90 * 86_400,
            http_port: gateway.http_port(),
            nonce_reject: 0,
            va_sleep: None,
            external_account_binding: None,
        };
        configure(&mut options);
        let pebble = Pebble::start(tools, dns.dns_port, options);
        let secrets: Api<Secret> = ns.api();
        secrets
            .patch(
                "pebble-ca",
                &PatchParams::apply("opsconductor-tests"),
                &Patch::Apply(json!({
                    "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pebble-ca"},
                    "stringData": {"ca.crt": pebble.tls_ca_pem}
                })),
            )
            .await
            .unwrap();
        let backend = gateway_support::Backend::start("web");
        let env = vec![
            (
                "OPSC_ACME_GATEWAY_URL",
                format!("http://127.0.0.1:{}", gateway.http_port()),
            ),
            ("OPSC_ACME_BACKOFF_FIRST_SECONDS", "2".to_string()),
            ("OPSC_ACME_BACKOFF_CAP_SECONDS", "16".to_string()),
            ("OPSC_ACME_SELF_CHECK_SECONDS", "20".to_string()),
            ("OPSC_ACME_RECHECK_SECONDS", "3".to_string()),
            ("OPSC_ACME_ARI_MIN_SECONDS", "1".to_string()),
            ("OPSC_ACME_ARI_MAX_SECONDS", "3".to_string()),
        ];
        Some(World {
            ns,
            tools,
            _dns: dns,
            pebble,
            gateway,
            _backend: backend,
            operator: None,
            env,
        })
    }

    fn start_operator(&mut self) {
        self.operator = None;
        self.operator = Some(Operator::start(self.ns.control_plane, &self.env));
    }

    fn operator(&self) -> &Operator {
        self.operator.as_ref().unwrap()
    }

    fn client(&self) -> &Client {
        &self.ns.client
    }

    fn stack(&self, hosts: &[&str]) -> OpsConductorStack {
        self.stack_with(hosts, json!({}))
    }

    /// The stack with more `spec.tls.acme` fields.
    fn stack_with(&self, hosts: &[&str], acme: serde_json::Value) -> OpsConductorStack {
        let mut stack = json!({
            "apiVersion": "opsconductor.io/v1alpha1",
            "kind": "OpsConductorStack",
            "metadata": {"name": STACK, "namespace": self.ns.name},
            "spec": {
                "gateway": {"hosts": hosts, "replicas": 1},
                "tls": {"acme": {
                    "directoryUrl": self.pebble.directory_url(),
                    "email": "ops@shop.test",
                    "acceptTermsOfService": true,
                    "caBundleSecretRef": {"name": "pebble-ca", "key": "ca.crt"},
                }},
                "services": [{"name": "web", "image": "web:1", "route": "/", "port": self._backend.port}],
            }
        });
        for (k, v) in acme.as_object().unwrap() {
            stack["spec"]["tls"]["acme"][k] = v.clone();
        }
        serde_json::from_value(stack).unwrap()
    }

    async fn apply(&self, hosts: &[&str]) {
        support::operator::apply_stack(self.client(), &self.stack(hosts)).await;
    }

    async fn apply_with(&self, hosts: &[&str], acme: serde_json::Value) {
        support::operator::apply_stack(self.client(), &self.stack_with(hosts, acme)).await;
    }

    /// Creates or updates an Opaque Secret with one key.
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

    async fn certificate(&self) -> Option<CertificateStatus> {
        let api: Api<OpsConductorStack> = self.ns.api();
        api.get(STACK).await.ok()?.status?.certificate
    }

    /// Waits until the status shows a Valid certificate whose serial satisfies `accept`.
    async fn valid(
        &self,
        what: &str,
        accept: impl Fn(&CertificateStatus) -> bool,
    ) -> CertificateStatus {
        eventually(what, WAIT, async || {
            let c = self.certificate().await?;
            (c.state == CertificateState::Valid && c.serial.is_some() && accept(&c)).then_some(c)
        })
        .await
    }

    async fn tls_secret(&self) -> Secret {
        self.ns
            .api::<Secret>()
            .get(&format!("{STACK}-tls"))
            .await
            .unwrap()
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
}

fn secret_chain(secret: &Secret) -> (Vec<u8>, Vec<u8>) {
    let data = secret.data.clone().unwrap();
    (data["tls.crt"].0.clone(), data["tls.key"].0.clone())
}

fn hosts(h: &[&str]) -> Vec<String> {
    h.iter().map(|s| s.to_string()).collect()
}

/// The Secret holds a full chain, a key that matches, every host; nginx serves it.
async fn assert_secret_serves(w: &World, names: &[&str], serial: &str) {
    let (crt, key) = secret_chain(&w.tls_secret().await);
    let leaf = cert::inspect(&crt, &key, &hosts(names), SystemTime::now()).unwrap();
    assert_eq!(leaf.facts.serial, serial);
    assert!(
        leaf.chain_len >= 2,
        "full chain expected, got {}",
        leaf.chain_len
    );
    assert!(!leaf.temporary);
    let expected = serial.trim_start_matches('0').to_string();
    eventually("nginx to serve the new certificate", WAIT, async || {
        (w.gateway.served_serial(names[0]).as_deref() == Some(expected.as_str())).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_issuance_through_the_real_http01_path_then_account_reuse_and_a_host_change() {
    let _serial = SERIAL.lock().await;
    let Some(mut w) = World::new("acme-issue", 90 * 86_400, 0).await else {
        return;
    };
    w.start_operator();
    // The first gateway configuration the operator writes: every 20 ms from before the stack
    // exists (the operator's next look, which could add a thumbprint, is 2 s later).
    let first_config = {
        let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = w.ns.api();
        tokio::spawn(async move {
            loop {
                if let Ok(Some(cm)) = cms.get_opt(&format!("{STACK}-gateway-config")).await {
                    return cm.data.unwrap_or_default()["nginx.conf"].clone();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let applied = Instant::now();
    w.apply(&["shop.test", "www.shop.test"]).await;

    // The account key is made before the gateway exists: its first configuration already
    // answers HTTP-01 with the thumbprint the registration keeps, so the first order waits
    // for no configuration to reach the gateway pods (the kubelet takes up to 90 s).
    let first_config = tokio::time::timeout(WAIT, first_config)
        .await
        .expect("the gateway ConfigMap within the wait")
        .unwrap();
    let first_answer = first_config
        .lines()
        .find(|l| l.contains("return 200 \"$1."))
        .unwrap_or_else(|| {
            panic!("the first gateway configuration answers no challenge:\n{first_config}")
        })
        .trim()
        .to_string();

    // A temporary certificate first, so the gateway can start.
    let early = eventually("the bootstrap Secret", WAIT, async || {
        w.ns.api::<Secret>()
            .get_opt(&format!("{STACK}-tls"))
            .await
            .ok()?
    })
    .await;
    let (crt, _) = secret_chain(&early);
    let bootstrap = cert::parse_chain(&crt).unwrap();
    let issued = w.valid("a Valid certificate", |_| true).await;
    let elapsed = applied.elapsed();
    let serial = issued.serial.clone().unwrap();
    assert!(bootstrap.temporary || bootstrap.facts.serial == serial);
    assert_eq!(issued.hosts, ["shop.test", "www.shop.test"]);
    assert_eq!(issued.failed_attempts, 0);
    assert!(issued.renewal_time.is_some() && issued.not_after.is_some());
    assert_secret_serves(&w, &["shop.test", "www.shop.test"], &serial).await;
    let events = w.events().await;
    let issued_event = events
        .iter()
        .find(|(r, _)| r == "CertificateIssued")
        .unwrap_or_else(|| panic!("a CertificateIssued Event: {events:?}"));
    support::measured(format!(
        "stack applied to Valid status in {:.2} s; operator: {}",
        elapsed.as_secs_f64(),
        issued_event.1
    ));
    assert!(events.iter().any(|(r, _)| r == "TemporaryCertificate"));
    let op = w.operator();
    assert!(op.metric("opsconductor_acme_requests_total{type=\"newOrder\",outcome=\"ok\"}") >= 1.0);
    assert!(
        op.metric("opsconductor_acme_requests_total{type=\"challengeReady\",outcome=\"ok\"}")
            >= 2.0
    );
    let ready_metric = format!(
        "opsconductor_certificate_ready{{namespace=\"{}\",name=\"{STACK}\"}}",
        w.ns.name
    );
    eventually("the ready metric", WAIT, async || {
        (op.metric(&ready_metric) == 1.0).then_some(())
    })
    .await;

    // The account is kept in its Secret and reused after a restart: the same account URL.
    let account_secret = |w: &World| {
        let api: Api<Secret> = w.ns.api();
        async move {
            let s = api.get(&format!("{STACK}-acme-account")).await.unwrap();
            String::from_utf8(s.data.unwrap()["credentials.json"].0.clone()).unwrap()
        }
    };
    let before: serde_json::Value = serde_json::from_str(&account_secret(&w).await).unwrap();
    assert_eq!(
        gateway_config(&w).await,
        first_answer,
        "the registered account has the thumbprint of the key made ahead"
    );
    w.start_operator();
    // A host change: a new order for all three hosts, with the same account.
    w.apply(&["shop.test", "www.shop.test", "api.shop.test"])
        .await;
    let reissued = w
        .valid("a certificate for the new host", |c| c.hosts.len() == 3)
        .await;
    assert_ne!(reissued.serial, issued.serial);
    assert_secret_serves(
        &w,
        &["shop.test", "www.shop.test", "api.shop.test"],
        reissued.serial.as_deref().unwrap(),
    )
    .await;
    let after: serde_json::Value = serde_json::from_str(&account_secret(&w).await).unwrap();
    assert_eq!(before["id"], after["id"], "the account was reused");
    let registrations = w.pebble.log().matches("accounts in memory").count();
    assert_eq!(
        registrations,
        1,
        "one account registration at the CA:\n{}",
        w.pebble.log()
    );
}

/// HTTP-01 behind a load balancer that sends the PROXY protocol (`proxyProtocol` with
/// `tls.acme`): Debian's HAProxy stands for the load balancer (from 127.0.0.2, the one
/// trusted proxy) on both ports, and pebble validates through it, as a CA reaches a host's
/// public address. The operator's self-check goes straight to nginx's port 80 with its own
/// `PROXY UNKNOWN` header. The certificate is issued and served through the proxy; nginx's
/// log shows pebble's validations arriving through HAProxy under pebble's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_through_a_load_balancer_that_sends_the_proxy_protocol() {
    let _serial = SERIAL.lock().await;
    if !gateway_support::tool_present("haproxy", &["-v"], "haproxy") {
        return;
    }
    let Some(mut w) = World::new("acme-pp", 90 * 86_400, 0).await else {
        return;
    };
    let proxy = gateway_support::HaProxy::start(&[
        gateway_support::Frontend {
            name: "http",
            to_port: w.gateway.http_port(),
            source: "127.0.0.2",
            send_proxy: "send-proxy",
        },
        gateway_support::Frontend {
            name: "https",
            to_port: w.gateway.https_port(),
            source: "127.0.0.2",
            send_proxy: "send-proxy-v2",
        },
    ]);
    // pebble validates through the proxy (it keeps no state worth keeping yet).
    w.pebble.options.http_port = proxy.port("http");
    w.pebble.restart(w.tools);
    w.start_operator();
    let mut stack = serde_json::to_value(w.stack(&["shop.test"])).unwrap();
    stack["spec"]["gateway"]["proxyProtocol"] = json!(true);
    stack["spec"]["gateway"]["trustedProxies"] = json!(["127.0.0.2/32"]);
    let stack: OpsConductorStack = serde_json::from_value(stack).unwrap();
    support::operator::apply_stack(w.client(), &stack).await;

    let issued = w.valid("a Valid certificate", |_| true).await;
    assert_eq!(issued.hosts, ["shop.test"]);
    let expected = issued
        .serial
        .as_deref()
        .unwrap()
        .trim_start_matches('0')
        .to_string();
    eventually("nginx to serve it through the proxy", WAIT, async || {
        (w.gateway
            .served_serial_via(proxy.port("https"), "shop.test")
            .as_deref()
            == Some(expected.as_str()))
        .then_some(())
    })
    .await;
    assert!(
        w.gateway.served_serial("shop.test").is_none(),
        "served without a PROXY header"
    );
    let config = std::fs::read_to_string(w.gateway.layout.config_path()).unwrap();
    assert!(
        config.contains("proxy_protocol"),
        "the gateway's listeners expect the PROXY protocol:\n{config}"
    );
    // Whose requests reached the challenge path: pebble's through HAProxy (peer 127.0.0.2,
    // client pebble's 127.0.0.1), the self-check's directly (127.0.0.1 both). The order
    // tokens: pebble's validations and the operator's check of each token; the probe tokens:
    // the operator's check before ordering. nginx writes a line once it has answered, so the
    // log is read until both kinds are in it.
    type Seen = Vec<(String, String)>;
    let split = |log: &str| -> (Seen, Seen) {
        let mut kinds = (Vec::new(), Vec::new());
        for e in log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        {
            let Some(uri) = e["uri"].as_str() else {
                continue;
            };
            let Some(token) = uri.strip_prefix("/.well-known/acme-challenge/") else {
                continue;
            };
            let seen = (
                e["remote_addr"].as_str().unwrap_or("").to_string(),
                e["peer_addr"].as_str().unwrap_or("").to_string(),
            );
            if token.starts_with("opsconductor-self-check-") {
                kinds.1.push(seen);
            } else {
                kinds.0.push(seen);
            }
        }
        kinds
    };
    let (tokens, probes) = eventually("pebble's validation in nginx's log", WAIT, async || {
        let (tokens, probes) = split(&w.gateway.access_log());
        (tokens
            .iter()
            .any(|(a, p)| a == "127.0.0.1" && p == "127.0.0.2")
            && !probes.is_empty())
        .then_some((tokens, probes))
    })
    .await;
    eprintln!("challenge requests (client, TCP peer): order tokens {tokens:?}, probes {probes:?}");
    // PROXY UNKNOWN claims no address: whatever reached nginx directly keeps its own.
    assert!(
        tokens
            .iter()
            .chain(&probes)
            .all(|(a, p)| p == "127.0.0.2" || a == p),
        "{tokens:?} {probes:?}"
    );
    drop(proxy);
}

/// The rollout of a renewed certificate into running gateway pods, proven with real nginx
/// running the gateway container's own command (the reload loop of `src/build/gateway.rs`):
/// under continuous HTTPS load, the Secret volume is updated the way the kubelet does it (an
/// atomic swap of the `..data` symlink); nginx must serve the new certificate and no request
/// may fail. No control plane or CA is needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_rolls_into_running_nginx_without_a_failed_request() {
    if !acme_support::parts_present() {
        return;
    }
    let host = "roll.test";
    let backend = gateway_support::Backend::start("web");
    let yaml = format!(
        "apiVersion: opsconductor.io/v1alpha1\nkind: OpsConductorStack\nmetadata: {{name: roll}}\n\
         spec:\n  gateway: {{hosts: [{host}]}}\n  tls: {{secretName: roll-cert}}\n  services:\n\
         \x20   - {{name: web, image: web:1, route: /, port: {}}}\n",
        backend.port
    );
    let options = opsconductor_operator::build::BuildOptions {
        upstreams: gateway_support::loopback_upstreams(&yaml),
        ..Default::default()
    };
    let bundle =
        opsconductor_operator::render::bundle_for("roll.yaml", &yaml, "default", &options).unwrap();
    let config = bundle.config_maps[0].data.as_ref().unwrap()["nginx.conf"].clone();
    let deployment = serde_json::to_value(&bundle.deployments[0]).unwrap();
    let command = &deployment["spec"]["template"]["spec"]["containers"][0]["command"];
    assert_eq!(command[0], "sh");
    let script = command[2].as_str().unwrap().to_string();

    let layout = gateway_support::Layout::new();
    layout.install_config(&config);
    // The kubelet's Secret volume: tls.crt -> ..data/tls.crt, ..data -> ..<version>.
    let tls = layout.path("tls");
    let version = |name: &str, crt: &str, key: &str| {
        let dir = tls.join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("tls.crt"), crt).unwrap();
        std::fs::write(dir.join("tls.key"), key).unwrap();
        std::os::unix::fs::symlink(name, tls.join("..data_tmp")).unwrap();
        std::fs::rename(tls.join("..data_tmp"), tls.join("..data")).unwrap();
    };
    let names = vec![host.to_string()];
    let (crt1, key1) = cert::bootstrap(&names, SystemTime::now()).unwrap();
    let (crt2, key2) = cert::bootstrap(&names, SystemTime::now()).unwrap();
    let serial = |crt: &str| cert::parse_chain(crt.as_bytes()).unwrap().facts.serial;
    let (old_serial, new_serial) = (serial(&crt1), serial(&crt2));
    version("..v1", &crt1, &key1);
    for f in ["tls.crt", "tls.key"] {
        std::os::unix::fs::symlink(format!("..data/{f}"), tls.join(f)).unwrap();
    }
    let dir = layout.dir.path().display().to_string();
    // /tmp first: the temp dir itself may live under /tmp.
    let local_script = script
        .replace("=/tmp/", &format!("={dir}/tmp/"))
        .replace("/etc/opsconductor/tls", &format!("{dir}/tls"))
        .replace("/etc/opsconductor/config", &format!("{dir}/config"))
        .replace("nginx -", "nginx -e stderr -");
    let mut gateway = std::process::Command::new("sh")
        .arg("-c")
        .arg(&local_script)
        .env("OPENSSL_CONF", layout.permissive_openssl_conf())
        .stdout(std::fs::File::create(layout.path("access.log")).unwrap())
        .stderr(std::fs::File::create(layout.path("error.log")).unwrap())
        .spawn()
        .unwrap();
    let https = layout.https_port;
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", https)).is_err() {
        assert!(Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let served = || {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "openssl s_client -connect 127.0.0.1:{https} -servername {host} </dev/null 2>/dev/null | openssl x509 -noout -serial"
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .trim_start_matches("serial=")
            .to_ascii_lowercase()
            .trim_start_matches('0')
            .to_string()
    };
    assert_eq!(served(), old_serial.trim_start_matches('0'));

    // Continuous load: 3 clients, each a loop of curl runs of 20 requests over one kept-alive
    // connection, plus one client opening a new connection per request.
    //
    // What "no failed request" means here: every request succeeds for a client that behaves
    // as HTTP allows and browsers do. A request that got no response at all, on a connection
    // that was reused (RFC 9112 section 9.3.1: the server may close an idle kept-alive
    // connection at any time, and the client may retry an idempotent request then) or that an
    // HTTP/2 server refused with GOAWAY before processing it (RFC 9113 section 6.8), is
    // retried once on a new connection, and that retry must succeed. Such retries are counted
    // and printed. Anything else fails the test: an error status, a response cut short, a
    // request lost on a fresh connection that nginx had accepted, or a failed retry.
    let load = gateway_support::Load::start(host, https);
    let wait_for = |n: usize| {
        let deadline = Instant::now() + WAIT;
        while load.ok() < n {
            assert!(Instant::now() < deadline, "the load did not get going");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(200);
    let before_swap = load.ok();
    version("..v2", &crt2, &key2);
    let deadline = Instant::now() + WAIT;
    while served() != new_serial.trim_start_matches('0') {
        assert!(
            Instant::now() < deadline,
            "nginx still serves the old certificate:\n{}",
            std::fs::read_to_string(layout.path("error.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let at_switch = load.ok();
    wait_for(at_switch + 400);
    let report = load.stop();
    let _ = std::process::Command::new("kill")
        .args(["-QUIT", &gateway.id().to_string()])
        .status();
    let _ = gateway.wait();
    let error_log = std::fs::read_to_string(layout.path("error.log")).unwrap_or_default();
    let total = report.ok;
    let failures = report.failures;
    support::measured(format!(
        "certificate rollout under load: {total} requests ({before_swap} before the swap, \
         {} after nginx served the new certificate), {} failed, {} got no response on a reused \
         or refused connection and succeeded on the one retry HTTP allows",
        total - at_switch,
        failures.len(),
        report.retried
    ));
    assert!(
        failures.is_empty(),
        "failed requests: {failures:#?}\n{error_log}"
    );
    assert!(
        error_log.contains("reconfiguring") || error_log.contains("signal process started"),
        "nginx was reloaded, not restarted:\n{error_log}"
    );
}

/// The status and Events of a failing stack.
async fn failing(
    w: &World,
    what: &str,
    accept: impl Fn(&CertificateStatus) -> bool,
) -> CertificateStatus {
    eventually(what, WAIT, async || {
        let c = w.certificate().await?;
        accept(&c).then_some(c)
    })
    .await
}

fn gap(c: &CertificateStatus) -> i64 {
    let parse = |s: &Option<String>| -> i64 {
        s.as_deref()
            .unwrap()
            .parse::<k8s_openapi::jiff::Timestamp>()
            .unwrap()
            .as_second()
    };
    parse(&c.renewal_time) - parse(&c.last_failure_time)
}

/// Runs `openssl` with `input` on stdin; its stdout.
fn openssl(args: &[&str], input: &[u8]) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl runs");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A CA that requires External Account Binding, and a stack asking for an RSA-2048 key: no
/// binding, then a wrong HMAC key, each with a reason that says what to fix; then the right
/// key, and the certificate is issued for an RSA key that openssl, the operator's own checks
/// and nginx all accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_account_binding_is_required_then_an_rsa_2048_certificate_is_issued() {
    use base64::Engine;
    let _serial = SERIAL.lock().await;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (key_id, hmac) = ("kid-shop", b64.encode([0x5au8; 32]));
    let wrong_hmac = b64.encode([0xa5u8; 32]);
    let Some(mut w) = World::with_pebble("acme-eab", |o| {
        o.external_account_binding = Some((key_id.to_string(), hmac.clone()));
    })
    .await
    else {
        return;
    };
    w.start_operator();
    let rsa = json!({"keyAlgorithm": "RSA-2048"});
    w.apply_with(&["eab.test"], rsa.clone()).await;

    // (a) No binding: the CA refuses the account, and the status says what is missing.
    let missing = failing(&w, "a failure asking for External Account Binding", |c| {
        c.last_failure_reason.is_some()
    })
    .await;
    let reason = missing.last_failure_reason.clone().unwrap();
    assert!(
        reason.starts_with(
            "the CA requires External Account Binding: set spec.tls.acme.externalAccountBinding"
        ) && reason.contains("(externalAccountRequired)"),
        "{reason}"
    );
    assert_eq!(missing.state, CertificateState::Failed);
    let api: Api<OpsConductorStack> = w.ns.api();
    let conditions = api.get(STACK).await.unwrap().status.unwrap().conditions;
    let ready = conditions
        .iter()
        .find(|c| c.type_ == "CertificateReady")
        .unwrap();
    assert_eq!(ready.status, "False");
    assert!(
        ready.message.contains("External Account Binding"),
        "{ready:?}"
    );
    eprintln!("no binding: {reason}");

    // (c) A binding with the wrong HMAC key: the reason names the keyId and the Secret.
    w.put_secret("eab-hmac", "hmac", &wrong_hmac).await;
    let mut with_eab = rsa.clone();
    with_eab["externalAccountBinding"] = json!({
        "keyId": key_id, "hmacKeySecretRef": {"name": "eab-hmac", "key": "hmac"}
    });
    w.apply_with(&["eab.test"], with_eab).await;
    let refused = failing(&w, "a failure refusing the binding", |c| {
        c.last_failure_reason
            .as_deref()
            .is_some_and(|r| r.starts_with("the CA refused the External Account Binding"))
    })
    .await;
    let reason = refused.last_failure_reason.unwrap();
    assert!(
        reason.contains(r#"keyId "kid-shop" and the HMAC key in Secret eab-hmac (key "hmac")"#)
            && reason.contains("(unauthorized)"),
        "{reason}"
    );
    eprintln!("wrong HMAC key: {reason}");

    // (b) The right HMAC key: the next attempt registers the account and issues.
    w.put_secret("eab-hmac", "hmac", &hmac).await;
    let fixed = Instant::now();
    let valid = w.valid("a certificate after the fix", |_| true).await;
    let elapsed = fixed.elapsed();
    assert!(
        w.pebble
            .log()
            .contains(r#"Successful newAccount Binding with CA using kid "kid-shop""#),
        "{}",
        w.pebble.log()
    );
    let serial = valid.serial.clone().unwrap();
    assert_secret_serves(&w, &["eab.test"], &serial).await;

    // The Secret holds a PKCS#8 RSA-2048 key and an RSA certificate for that same key.
    let (crt, key) = secret_chain(&w.tls_secret().await);
    assert!(key.starts_with(b"-----BEGIN PRIVATE KEY-----"));
    let key_text = openssl(&["pkey", "-noout", "-text"], &key);
    assert!(key_text.contains("Private-Key: (2048 bit"), "{key_text}");
    let crt_text = openssl(&["x509", "-noout", "-text"], &crt);
    assert!(
        crt_text.contains("Public Key Algorithm: rsaEncryption")
            && crt_text.contains("Public-Key: (2048 bit)"),
        "{crt_text}"
    );
    let key_modulus = openssl(&["rsa", "-noout", "-modulus"], &key);
    assert!(key_modulus.starts_with("Modulus="));
    assert_eq!(openssl(&["x509", "-noout", "-modulus"], &crt), key_modulus);
    assert!(openssl(&["rsa", "-noout", "-check"], &key).contains("RSA key ok"));

    let log = w.operator().log_text();
    let keygen_ms: Vec<u64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "made a new certificate key")
        .filter_map(|v| v["fields"]["millis"].as_u64())
        .collect();
    assert_eq!(keygen_ms.len(), 1, "one RSA key, for the one issuance");
    let events = w.events().await;
    let issued_event = events
        .iter()
        .find(|(r, _)| r == "CertificateIssued")
        .unwrap_or_else(|| panic!("a CertificateIssued Event: {events:?}"));
    support::measured(format!(
        "RSA-2048 with EAB: HMAC Secret fixed to Valid status in {:.2} s (includes \
         the wait for the next attempt); RSA key made in {} ms (debug operator binary); \
         operator: {}",
        elapsed.as_secs_f64(),
        keygen_ms[0],
        issued_event.1
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn challenge_unreachable_is_explained_backs_off_and_recovers() {
    let _serial = SERIAL.lock().await;
    let Some(mut w) = World::new("acme-unreach", 90 * 86_400, 0).await else {
        return;
    };
    // No gateway yet: the self-check cannot reach the challenge path.
    w.gateway.take_down();
    for (k, v) in w.env.iter_mut() {
        if *k == "OPSC_ACME_SELF_CHECK_SECONDS" {
            *v = "1".into();
        }
    }
    w.start_operator();
    w.apply(&["down.test"]).await;
    let second = failing(&w, "two failed attempts", |c| c.failed_attempts == 2).await;
    assert_eq!(second.state, CertificateState::Failed);
    let reason = second.last_failure_reason.clone().unwrap();
    assert!(
        reason.starts_with("challenge not reachable through the gateway"),
        "{reason}"
    );
    let third = failing(&w, "three failed attempts", |c| c.failed_attempts == 3).await;
    assert!(
        gap(&third) > gap(&second),
        "the backoff grows: {} s then {} s",
        gap(&second),
        gap(&third)
    );
    // The CA was never asked for an order while the gateway could not answer.
    assert!(
        !w.pebble.log().contains("orders in the db"),
        "{}",
        w.pebble.log()
    );
    let events = w.events().await;
    let warnings = events
        .iter()
        .filter(|(r, _)| r == "ChallengeUnreachable")
        .count();
    assert_eq!(
        warnings, 1,
        "one Event for one repeated failure: {events:?}"
    );

    // The fix: the gateway comes up; the next attempt succeeds.
    w.gateway.bring_up();
    let valid = w.valid("a certificate after the fix", |_| true).await;
    assert_eq!(valid.failed_attempts, 0);
    assert_eq!(valid.last_failure_reason, None);
    assert_secret_serves(&w, &["down.test"], valid.serial.as_deref().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_the_ca_cannot_reach_is_explained_then_a_ca_restart_recovers() {
    let _serial = SERIAL.lock().await;
    // pebble validates on a port where nothing listens; the operator's self-check passes.
    let closed = acme_support::free_port();
    let Some(mut w) = World::with("acme-ca-side", 90 * 86_400, 0, None, Some(closed)).await else {
        return;
    };
    w.start_operator();
    w.apply(&["far.test"]).await;
    let failed = failing(&w, "a failure from the CA", |c| c.failed_attempts >= 1).await;
    let reason = failed.last_failure_reason.clone().unwrap();
    assert!(
        reason.starts_with("challenge not reachable from the CA: far.test:"),
        "{reason}"
    );
    // pebble restarted (forgetting every account) and validating on the gateway's port.
    w.pebble.options.http_port = w.gateway.http_port();
    let thumbprint_before = gateway_config(&w).await;
    w.pebble.restart(w.tools);
    let valid = w
        .valid("a certificate after the CA restart", |_| true)
        .await;
    assert_secret_serves(&w, &["far.test"], valid.serial.as_deref().unwrap()).await;
    // The account was registered again with the same key: the gateway config is unchanged.
    assert_eq!(gateway_config(&w).await, thumbprint_before);
}

async fn gateway_config(w: &World) -> String {
    let api: Api<k8s_openapi::api::core::v1::ConfigMap> = w.ns.api();
    let cm = api.get(&format!("{STACK}-gateway-config")).await.unwrap();
    let text = cm.data.unwrap()["nginx.conf"].clone();
    text.lines()
        .find(|l| l.contains("return 200 \"$1."))
        .unwrap_or_else(|| panic!("no challenge answer in the config:\n{text}"))
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_the_nonces_rejected_and_the_ca_stopped_mid_order() {
    let _serial = SERIAL.lock().await;
    let Some(mut w) = World::with("acme-faults", 90 * 86_400, 50, Some(20), None).await else {
        return;
    };
    w.start_operator();
    w.apply(&["shaky.test"]).await;
    let first = w
        .valid("a certificate despite rejected nonces", |_| true)
        .await;
    assert!(
        w.pebble.log().contains("50% of good nonces"),
        "pebble runs with 50% rejection"
    );

    // A host change starts an order; the CA goes away while it is validating.
    let placed = |w: &World| w.operator().log_text().matches("ACME order placed").count();
    let before = placed(&w);
    w.apply(&["shaky.test", "www.shaky.test"]).await;
    eventually("the second order to be placed", WAIT, async || {
        (placed(&w) > before).then_some(())
    })
    .await;
    w.pebble.stop();
    // Between two attempts: while the next attempt runs, the state is Issuing with the last
    // failure still shown (a status read then made this test fail once).
    let down = failing(&w, "a failure while the CA is down", |c| {
        c.state != CertificateState::Issuing
            && c.last_failure_reason
                .as_deref()
                .is_some_and(|r| r.starts_with("CA unreachable"))
    })
    .await;
    // The old certificate stays in use (it still serves shaky.test); it does not cover the
    // new host, so the stack's certificate is not ready: Failed until the CA is back.
    assert_eq!(down.state, CertificateState::Failed);
    assert_eq!(down.serial, first.serial);
    assert!(down.failed_attempts >= 1);
    w.pebble.restart(w.tools);
    let valid = w
        .valid("a certificate for both hosts", |c| c.hosts.len() == 2)
        .await;
    assert_secret_serves(
        &w,
        &["shaky.test", "www.shaky.test"],
        valid.serial.as_deref().unwrap(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_secret_is_repaired() {
    let _serial = SERIAL.lock().await;
    let Some(mut w) = World::new("acme-tamper", 90 * 86_400, 0).await else {
        return;
    };
    w.start_operator();
    w.apply(&["safe.test"]).await;
    let valid = w.valid("a certificate", |_| true).await;
    let original = secret_chain(&w.tls_secret().await);
    let secrets: Api<Secret> = w.ns.api();
    let (fake_crt, fake_key) = cert::bootstrap(&hosts(&["safe.test"]), SystemTime::now()).unwrap();
    for (crt, key) in [
        ("garbage".to_string(), "garbage".to_string()),
        (fake_crt, fake_key),
    ] {
        secrets
            .patch(
                &format!("{STACK}-tls"),
                &PatchParams::default(),
                &Patch::Merge(json!({"stringData": {"tls.crt": crt, "tls.key": key}})),
            )
            .await
            .unwrap();
        eventually("the Secret to be restored", WAIT, async || {
            (secret_chain(&w.tls_secret().await) == original).then_some(())
        })
        .await;
    }
    let events = w.events().await;
    assert!(
        events
            .iter()
            .any(|(r, m)| r == "CertificateRepaired" && m.contains("unusable")),
        "{events:?}"
    );
    let c = w.certificate().await.unwrap();
    assert_eq!(
        c.serial, valid.serial,
        "repaired with the same certificate, no new order"
    );
    assert_secret_serves(&w, &["safe.test"], valid.serial.as_deref().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_by_a_short_lifetime_and_by_an_ari_window() {
    let _serial = SERIAL.lock().await;
    // 30-second certificates: renewal at 2/3 (20 s) or earlier within pebble's ARI window.
    let Some(mut w) = World::new("acme-renew", 30, 0).await else {
        return;
    };
    w.start_operator();
    w.apply(&["renew.test"]).await;
    let first = w.valid("a certificate", |_| true).await;
    let second = w
        .valid("a renewed certificate", |c| c.serial != first.serial)
        .await;
    assert_secret_serves(&w, &["renew.test"], second.serial.as_deref().unwrap()).await;
    let log = w.operator().log_text();
    assert!(
        log.contains("\"replaced\":true"),
        "the renewal order names the certificate it replaces"
    );
    drop(w);

    // 90-day certificates: only the CA's renewal window can bring renewal forward.
    let Some(mut w) = World::new("acme-ari", 90 * 86_400, 0).await else {
        return;
    };
    w.start_operator();
    w.apply(&["ari.test"]).await;
    let first = w.valid("a certificate", |_| true).await;
    let (crt, _) = secret_chain(&w.tls_secret().await);
    let past = |secs: u64| cert_time(SystemTime::now() - Duration::from_secs(secs));
    w.pebble
        .set_renewal_window(&String::from_utf8(crt).unwrap(), &past(7200), &past(3600));
    let renewed = w
        .valid("a certificate renewed by ARI", |c| c.serial != first.serial)
        .await;
    assert_secret_serves(&w, &["ari.test"], renewed.serial.as_deref().unwrap()).await;
    assert!(w.operator().log_text().contains("\"replaced\":true"));
}

fn cert_time(t: SystemTime) -> String {
    opsconductor_operator::acme::rfc3339(t)
}

/// `kubectl delete` is a background delete: the operator never sees a deletionTimestamp, the
/// stack just leaves its cache. Deleted while its order is in progress (pebble is still
/// validating the challenge, on a port that never answers), the stack's ACME job must stop:
/// once the operator has dropped the stack's metric series (the same pass stops the job), no
/// further request reaches the CA, although the order is still pending and then invalid, which
/// a running job would keep polling for and then ask about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_delete_mid_order_stops_the_job_and_the_ca_hears_no_more() {
    use acme_support::{SilentPort, pebble_requests};
    let _serial = SERIAL.lock().await;
    let silent = SilentPort::start();
    let Some(mut w) = World::with("acme-gone", 90 * 86_400, 0, None, Some(silent.port)).await
    else {
        return;
    };
    w.start_operator();
    w.apply(&["gone.test"]).await;
    eventually("pebble to be validating the challenge", WAIT, async || {
        (silent.open() > 0).then_some(())
    })
    .await;
    // The job is alive: it polls the pending order.
    let polling_from = pebble_requests(&w.pebble.log());
    eventually("the job to poll the pending order", WAIT, async || {
        (pebble_requests(&w.pebble.log()) >= polling_from + 2).then_some(())
    })
    .await;

    let stacks: Api<OpsConductorStack> = w.ns.api();
    stacks
        .delete(STACK, &kube::api::DeleteParams::background())
        .await
        .unwrap();
    let series = format!("namespace=\"{}\",name=\"{STACK}\"", w.ns.name);
    eventually("the stack's metric series to be gone", WAIT, async || {
        (!w.operator().metrics().contains(&series)).then_some(())
    })
    .await;
    assert!(
        silent.open() > 0,
        "pebble must still be validating when the stack is forgotten (mid-order); it gave up \
         before the operator noticed the deletion"
    );
    let at_forget = pebble_requests(&w.pebble.log());

    // Observe until pebble has given up the validation (the order is invalid now: a running
    // job would poll it, see that, and fetch the authorization to say why), and a little more.
    eventually("pebble to give up the validation", WAIT, async || {
        (silent.open() == 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = w.pebble.log();
    let after = pebble_requests(&log) - at_forget;
    // At most the one request that was already on its way when the job stopped.
    assert!(
        after <= 1,
        "{after} requests reached the CA after the stack was forgotten:\n{}",
        log.lines()
            .filter(|l| l.contains("-> calling handler()"))
            .skip(at_forget)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let stopped = w
        .operator()
        .log_text()
        .lines()
        .any(|l| l.contains("stopping its ACME job"));
    eprintln!(
        "requests to the CA: {polling_from} before validation, {at_forget} when forgotten, {after} after; \
         the operator logged that it stopped a running job: {stopped}"
    );
}

/// The ACME backoff survives a restart: it resumes from `failedAttempts` and
/// `lastFailureTime` in the status, so a restarted operator (or a new leader) does not order
/// again at once after failures.
///
/// 1. pebble validates on a closed port: orders fail; the first operator (backoff 1 s) fails
///    at least twice and is stopped.
/// 2. A new operator with a 300 s backoff: the recorded failures put the next attempt
///    300 s x 2^(n-1) after the last failure, and the status says so; over several
///    reconciles, no order reaches the CA.
/// 3. A new operator with a 1 s backoff: that time has passed, one order is made, and the
///    count of failures goes on from the recorded one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backoff_resumes_from_the_status_after_a_restart() {
    use acme_support::pebble_orders;
    let _serial = SERIAL.lock().await;
    let closed = acme_support::free_port();
    let Some(mut w) = World::with("acme-resume", 90 * 86_400, 0, None, Some(closed)).await else {
        return;
    };
    let set_backoff = |w: &mut World, first: &str| {
        for (k, v) in w.env.iter_mut() {
            match *k {
                "OPSC_ACME_BACKOFF_FIRST_SECONDS" => *v = first.to_string(),
                "OPSC_ACME_BACKOFF_CAP_SECONDS" => *v = "1000000".to_string(),
                _ => {}
            }
        }
    };
    let time = |s: &Option<String>| -> i64 {
        s.as_deref()
            .expect("a time")
            .parse::<k8s_openapi::jiff::Timestamp>()
            .unwrap()
            .as_second()
    };

    // 1. Two failures (at least), then the operator stops.
    set_backoff(&mut w, "1");
    w.start_operator();
    w.apply(&["again.test"]).await;
    failing(&w, "two failed orders", |c| {
        c.failed_attempts >= 2 && c.state == CertificateState::Failed
    })
    .await;
    w.operator = None;
    let before = w.certificate().await.unwrap();
    let failures = before.failed_attempts;
    // Normally the kind of the last failure; when the operator was stopped while its next
    // order ran, the status kept no kind.
    let expected_reason = match certificate_condition(&w).await.reason.as_str() {
        "Ordering" => "EarlierFailure".to_string(),
        reason => reason.to_string(),
    };
    assert!(
        before
            .last_failure_reason
            .as_deref()
            .is_some_and(|r| r.starts_with("challenge not reachable from the CA")),
        "{before:?}"
    );

    // 2. Restarted with a long backoff: it waits, and says until when.
    set_backoff(&mut w, "300");
    w.start_operator();
    // (Taken once the new operator is ready: a request of the stopped one has long been
    // logged by then, and the new one reconciles nothing before.)
    let orders = pebble_orders(&w.pebble.log());
    assert!(
        orders >= failures as usize,
        "{orders} orders, {failures} failures"
    );
    let resumed = failing(&w, "the restarted operator's first status", |c| {
        *c != before
    })
    .await;
    let expected_wait = 300 * (1i64 << (failures - 1));
    assert_eq!(
        (resumed.failed_attempts, resumed.state),
        (failures, CertificateState::Failed),
        "the failures are resumed, not started afresh: {resumed:?}"
    );
    assert_eq!(resumed.last_failure_time, before.last_failure_time);
    assert_eq!(
        time(&resumed.renewal_time) - time(&resumed.last_failure_time),
        expected_wait,
        "the next attempt is {expected_wait} s after the last failure: {resumed:?}"
    );
    let condition = certificate_condition(&w).await;
    assert_eq!(condition.reason, expected_reason);
    let next = resumed.renewal_time.clone().unwrap();
    assert!(
        condition
            .message
            .contains(&format!("failed {failures} time(s)"))
            && condition
                .message
                .ends_with(&format!("next attempt at {next}")),
        "{}",
        condition.message
    );
    // Several more reconciles of the stack (every 3 s here): still no order.
    let reconciles = |w: &World| w.operator().metric("opsconductor_reconciles_total");
    let from = reconciles(&w);
    eventually("three more reconciles", WAIT, async || {
        (reconciles(&w) >= from + 3.0).then_some(())
    })
    .await;
    let log = w.operator().log_text();
    assert!(
        !log.contains("starting an ACME order"),
        "the restarted operator ordered before the recorded backoff expired:\n{log}"
    );
    assert_eq!(
        pebble_orders(&w.pebble.log()),
        orders,
        "no order before the recorded backoff expires"
    );
    assert_eq!(w.certificate().await.unwrap().failed_attempts, failures);
    assert!(
        log.contains("resuming the ACME backoff recorded in the status"),
        "{log}"
    );

    // 3. Restarted with a 1 s backoff: the wait is over; the next order fails as the others
    // did, and the count goes on.
    set_backoff(&mut w, "1");
    w.start_operator();
    let third = failing(&w, "one more failed order", |c| {
        c.failed_attempts == failures + 1
    })
    .await;
    assert!(time(&third.last_failure_time) > time(&before.last_failure_time));
    assert!(pebble_orders(&w.pebble.log()) > orders);
}

/// The stack's CertificateReady condition.
async fn certificate_condition(
    w: &World,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    let stacks: Api<OpsConductorStack> = w.ns.api();
    let stack = stacks.get(STACK).await.unwrap();
    stack
        .status
        .and_then(|s| {
            s.conditions
                .into_iter()
                .find(|c| c.type_ == "CertificateReady")
        })
        .expect("a CertificateReady condition")
}
