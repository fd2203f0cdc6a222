//! Real parts for the ACME tests: pebble (with its own TLS certificate on 127.0.0.1),
//! pebble-challtestsrv (resolving every name to 127.0.0.1, so pebble's HTTP-01 validation
//! reaches the test's nginx), the operator binary with ACME settings of the test's choosing,
//! and a stand-in for the kubelet that runs real nginx with the gateway ConfigMap and the
//! certificate Secret exactly as the operator wrote them, reloading nginx when they change.
//!
//! Every process is stopped by its PID when its guard drops, also when a test fails.

#![allow(dead_code)]

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use crate::gateway_support::{Layout, local_config};
use crate::support::ControlPlane;
use crate::support::process::{OperatorProcess, spawn_as_operator};

pub use crate::gateway_support::free_port;

/// SIGTERM, then SIGKILL after 10 s ([`crate::support::process::terminate`]).
fn stop(child: &mut Child) {
    crate::support::process::terminate(child, Duration::from_secs(10));
}

fn wait_listening(port: u16, what: &str, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}) before listening:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port} within 30 s (a hang guard)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// pebble and pebble-challtestsrv

/// How a pebble is configured.
#[derive(Clone, Debug)]
pub struct PebbleOptions {
    /// Lifetime of issued certificates (the default profile's `validityPeriod`).
    pub validity_seconds: u64,
    /// The port pebble's HTTP-01 validation connects to (the gateway's HTTP port).
    pub http_port: u16,
    /// `PEBBLE_WFE_NONCEREJECT`: percent of good nonces refused.
    pub nonce_reject: u32,
    /// `PEBBLE_VA_SLEEPTIME`: the validation waits up to this many seconds (none: no wait).
    pub va_sleep: Option<u32>,
    /// External Account Binding: when set, pebble requires it on every new account and knows
    /// this one key (key ID, base64url HMAC key without padding, as pebble's config wants).
    pub external_account_binding: Option<(String, String)>,
}

pub struct Pebble {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub management_port: u16,
    /// PEM of the CA that signed pebble's own TLS certificate (for `caBundleSecretRef`).
    pub tls_ca_pem: String,
    pub options: PebbleOptions,
    dns_port: u16,
    child: Option<Child>,
}

impl Pebble {
    pub fn start(bin: &Path, dns_port: u16, options: PebbleOptions) -> Pebble {
        let dir = tempfile::Builder::new()
            .prefix("opsc-pebble-")
            .tempdir()
            .unwrap();
        // pebble's own TLS: a small CA and a certificate for 127.0.0.1.
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "pebble test TLS CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        std::fs::write(dir.path().join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        let mut pebble = Pebble {
            dir,
            port: free_port(),
            management_port: free_port(),
            tls_ca_pem: ca_cert.pem(),
            options,
            dns_port,
            child: None,
        };
        pebble.spawn(bin);
        pebble
    }

    fn spawn(&mut self, bin: &Path) {
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{}", self.port),
                "managementListenAddress": format!("127.0.0.1:{}", self.management_port),
                "certificate": self.dir.path().join("cert.pem"),
                "privateKey": self.dir.path().join("key.pem"),
                "httpPort": self.options.http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": self.options.external_account_binding.is_some(),
                "externalAccountMACKeys": self
                    .options
                    .external_account_binding
                    .iter()
                    .cloned()
                    .collect::<std::collections::BTreeMap<String, String>>(),
                "retryAfter": {"authz": 1, "order": 1},
                "keyAlgorithm": "ecdsa",
                "profiles": {
                    "default": {"description": "test", "validityPeriod": self.options.validity_seconds},
                    "shortlived": {"description": "test", "validityPeriod": self.options.validity_seconds},
                }
            }
        });
        let config_path = self.dir.path().join("pebble.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let log = self.log_path();
        let mut child = Command::new(bin.join("pebble"))
            .arg("-config")
            .arg(&config_path)
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{}", self.dns_port))
            .env(
                if self.options.va_sleep.is_some() {
                    "PEBBLE_VA_SLEEPTIME"
                } else {
                    "PEBBLE_VA_NOSLEEP"
                },
                self.options
                    .va_sleep
                    .map_or("1".to_string(), |s| s.to_string()),
            )
            .env(
                "PEBBLE_WFE_NONCEREJECT",
                self.options.nonce_reject.to_string(),
            )
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdin(Stdio::null())
            .stdout(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .stderr(Stdio::inherit())
            .spawn()
            .expect("pebble starts");
        wait_listening(self.port, "pebble", &mut child, &log);
        self.child = Some(child);
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("pebble.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child);
        }
    }

    /// Starts it again on the same ports (with an empty database, as pebble keeps none).
    pub fn restart(&mut self, bin: &Path) {
        self.stop();
        self.spawn(bin);
    }

    /// pebble's management API: the ARI answer for `certificate_pem`.
    pub fn set_renewal_window(&self, certificate_pem: &str, start: &str, end: &str) {
        let body = serde_json::json!({
            "Certificate": certificate_pem,
            "ARIResponse": serde_json::json!({"suggestedWindow": {"start": start, "end": end}}).to_string(),
        });
        let out = Command::new("curl")
            .args([
                "-sS",
                "-k",
                "--fail-with-body",
                "-X",
                "POST",
                "--data-binary",
            ])
            .arg(body.to_string())
            .arg(format!(
                "https://127.0.0.1:{}/set-renewal-info/",
                self.management_port
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "set-renewal-info: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- pebble log ---\n{}", self.log());
        }
    }
}

/// pebble-challtestsrv as DNS server only: every name is 127.0.0.1, no AAAA.
pub struct ChallTestSrv {
    pub dns_port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl ChallTestSrv {
    pub fn start(bin: &Path) -> ChallTestSrv {
        let dir = tempfile::tempdir().unwrap();
        let dns_port = free_port();
        let management = free_port();
        let log = dir.path().join("challtestsrv.log");
        let mut child = Command::new(bin.join("pebble-challtestsrv"))
            .args(["-http01", "", "-https01", "", "-tlsalpn01", "", "-doh", ""])
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{dns_port}"))
            .arg("-management")
            .arg(format!("127.0.0.1:{management}"))
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("pebble-challtestsrv starts");
        // The DNS server is UDP and TCP; TCP tells when it is up.
        wait_listening(dns_port, "pebble-challtestsrv", &mut child, &log);
        ChallTestSrv {
            dns_port,
            child,
            _dir: dir,
        }
    }
}

impl Drop for ChallTestSrv {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

// ---------------------------------------------------------------------------------------------
// The operator

/// The operator binary with the test's ACME settings, as the chart's service account
/// ([`crate::support::process::spawn_as_operator`]); stopped with SIGTERM on drop (and by stdin
/// EOF), its log printed when the test failed.
pub struct Operator(OperatorProcess);

impl Operator {
    pub fn start(cp: &ControlPlane, env: &[(&str, String)]) -> Operator {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let op = spawn_as_operator(cp, "acme", &["--resync-seconds", "30"], &env);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !op.ready() {
            assert!(
                Instant::now() < deadline,
                "the operator did not become ready within 60 s:\n{}",
                op.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Operator(op)
    }
}

impl std::ops::Deref for Operator {
    type Target = OperatorProcess;

    fn deref(&self) -> &OperatorProcess {
        &self.0
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.0.terminate(Duration::from_secs(10));
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway, as a kubelet would run it

/// Runs nginx with the gateway ConfigMap and the TLS Secret read back from the API server,
/// and reloads it (`nginx -s reload`) when either changes, as the gateway pod does.
pub struct GatewayRunner {
    pub layout: Arc<Layout>,
    stop: Arc<AtomicBool>,
    handle: Option<tokio::task::JoinHandle<()>>,
    nginx: Arc<Mutex<Option<Child>>>,
    /// Reloads done after the first start.
    pub reloads: Arc<Mutex<u32>>,
    paused: Arc<AtomicBool>,
}

impl GatewayRunner {
    pub fn start(client: Client, namespace: &str, stack: &str) -> GatewayRunner {
        let layout = Arc::new(Layout::new());
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let nginx: Arc<Mutex<Option<Child>>> = Arc::default();
        let reloads = Arc::new(Mutex::new(0));
        let handle = {
            let (layout, stop, nginx, reloads, paused) = (
                layout.clone(),
                stop.clone(),
                nginx.clone(),
                reloads.clone(),
                paused.clone(),
            );
            let cms: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
            let secrets: Api<Secret> = Api::namespaced(client, namespace);
            let (cm_name, secret_name) =
                (format!("{stack}-gateway-config"), format!("{stack}-tls"));
            tokio::spawn(async move {
                let mut last: Option<(String, Vec<u8>, Vec<u8>)> = None;
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if paused.load(Ordering::Relaxed) {
                        continue;
                    }
                    let (Ok(Some(cm)), Ok(Some(secret))) = (
                        cms.get_opt(&cm_name).await,
                        secrets.get_opt(&secret_name).await,
                    ) else {
                        continue;
                    };
                    let config = cm
                        .data
                        .and_then(|mut d| d.remove("nginx.conf"))
                        .unwrap_or_default();
                    let data = secret.data.unwrap_or_default();
                    let crt = data.get("tls.crt").map(|b| b.0.clone()).unwrap_or_default();
                    let key = data.get("tls.key").map(|b| b.0.clone()).unwrap_or_default();
                    let now = (config.clone(), crt.clone(), key.clone());
                    if last.as_ref() == Some(&now) {
                        continue;
                    }
                    layout.install_config(&config);
                    // As the kubelet does: new files, then the reload sees them.
                    write_atomically(&layout.path("tls/tls.crt"), &crt);
                    write_atomically(&layout.path("tls/tls.key"), &key);
                    let mut guard = nginx.lock().unwrap();
                    let running = guard
                        .as_mut()
                        .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
                    if running {
                        // A reload with files nginx rejects (a tampered Secret: key and
                        // certificate that do not match) fails and nginx keeps serving the
                        // previous ones, as in the pod: note it, do not stop the runner.
                        let status = nginx_cmd(&layout, &["-s", "reload"]).status().unwrap();
                        if status.success() {
                            *reloads.lock().unwrap() += 1;
                        } else {
                            eprintln!(
                                "acme_support: nginx -s reload refused the new files ({status}); nginx keeps the previous ones"
                            );
                        }
                    } else {
                        let child = nginx_cmd(&layout, &[])
                            .stdout(std::fs::File::create(layout.path("access.log")).unwrap())
                            .stderr(std::fs::File::create(layout.path("error.log")).unwrap())
                            .spawn()
                            .expect("nginx starts");
                        *guard = Some(child);
                    }
                    last = Some(now);
                }
            })
        };
        GatewayRunner {
            layout,
            stop,
            handle: Some(handle),
            nginx,
            reloads,
            paused,
        }
    }

    pub fn http_port(&self) -> u16 {
        self.layout.http_port
    }

    pub fn https_port(&self) -> u16 {
        self.layout.https_port
    }

    /// Stops nginx and stops following the API (the challenge path becomes unreachable).
    pub fn take_down(&self) {
        self.paused.store(true, Ordering::Relaxed);
        if let Some(mut c) = self.nginx.lock().unwrap_or_else(|e| e.into_inner()).take() {
            stop(&mut c);
        }
    }

    /// Follows the API again and starts nginx.
    pub fn bring_up(&self) {
        self.paused.store(false, Ordering::Relaxed);
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.layout.path("error.log")).unwrap_or_default()
    }

    /// nginx's access log (JSON lines, the container's stdout).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.layout.path("access.log")).unwrap_or_default()
    }

    /// The serial (lowercase hex, no leading zeros) of the certificate nginx serves for `host`.
    pub fn served_serial(&self, host: &str) -> Option<String> {
        self.served_serial_via(self.https_port(), host)
    }

    /// As [`Self::served_serial`], through a proxy in front of nginx listening on
    /// 127.0.0.1:`port` (one that sends the PROXY protocol header nginx then expects).
    pub fn served_serial_via(&self, port: u16, host: &str) -> Option<String> {
        let mut s_client = Command::new("openssl")
            .args(["s_client", "-connect"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-servername", host])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut pem = String::new();
        s_client.stdout.take()?.read_to_string(&mut pem).ok()?;
        let _ = s_client.wait();
        let mut x509 = Command::new("openssl")
            .args(["x509", "-noout", "-serial"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        use std::io::Write;
        x509.stdin.take()?.write_all(pem.as_bytes()).ok()?;
        let out = x509.wait_with_output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let hex = text.trim().strip_prefix("serial=")?.to_ascii_lowercase();
        Some(hex.trim_start_matches('0').to_string())
    }
}

impl Drop for GatewayRunner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.abort();
        }
        if let Some(mut c) = self.nginx.lock().unwrap_or_else(|e| e.into_inner()).take() {
            stop(&mut c);
        }
        if std::thread::panicking() {
            eprintln!("--- nginx error log ---\n{}", self.error_log());
        }
    }
}

fn write_atomically(path: &Path, content: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn nginx_cmd(layout: &Layout, extra: &[&str]) -> Command {
    let mut c = Command::new("nginx");
    c.arg("-p")
        .arg(layout.dir.path())
        .args(["-e", "stderr", "-c"])
        .arg(layout.config_path())
        .args(extra)
        .env("OPENSSL_CONF", layout.permissive_openssl_conf());
    c
}

/// Whether the real parts are here: under `CI=true` a missing one fails the test.
pub fn parts_present() -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let mut missing = Vec::new();
    for (tool, arg) in [
        ("nginx", "-v"),
        ("openssl", "version"),
        ("curl", "--version"),
    ] {
        let ok = Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            missing.push(tool);
        }
    }
    if missing.is_empty() {
        return true;
    }
    let message = format!(
        "the ACME tests need {} (scripts/install-nginx installs them)",
        missing.join(", ")
    );
    if ci || std::env::var("OPSC_SKIP_NGINX").as_deref() != Ok("1") {
        panic!("{message}; outside CI, OPSC_SKIP_NGINX=1 skips these tests explicitly");
    }
    eprintln!("OPSC_SKIP_NGINX=1: skipping: {message}");
    false
}

/// `local_config` is re-exported for tests that render by hand.
pub fn rewrite(rendered: &str, layout: &Layout) -> String {
    local_config(
        rendered,
        layout.dir.path(),
        layout.http_port,
        layout.https_port,
    )
}

// ---------------------------------------------------------------------------------------------
// A challenge port that never answers

/// A TCP port that accepts connections and never answers on them: pebble's HTTP-01
/// validation pointed at it stays in progress (until pebble's own validation timeout closes
/// the connection), so an order stays pending for as long as the test needs.
pub struct SilentPort {
    pub port: u16,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    open: Arc<std::sync::atomic::AtomicUsize>,
}

impl SilentPort {
    pub fn start() -> SilentPort {
        use std::sync::atomic::AtomicUsize;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (a, o) = (accepted.clone(), open.clone());
        // The thread ends with the test binary; the listener is never used elsewhere.
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                o.fetch_add(1, Ordering::SeqCst);
                let o = o.clone();
                std::thread::spawn(move || {
                    // Read (and ignore) the request until the peer closes the connection.
                    let mut buf = [0u8; 1024];
                    while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        SilentPort {
            port,
            accepted,
            open,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections accepted and not yet closed by the peer.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

/// Requests pebble has handled so far (it logs one line per request).
pub fn pebble_requests(log: &str) -> usize {
    log.matches("-> calling handler()").count()
}

/// Orders pebble has created so far.
pub fn pebble_orders(log: &str) -> usize {
    log.matches("Added order").count()
}
