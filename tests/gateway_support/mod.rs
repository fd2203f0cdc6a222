//! Real nginx for the gateway tests: the configuration exactly as the operator renders it into
//! the gateway ConfigMap, a certificate made by `openssl`, small HTTP backends on loopback
//! standing in for the services, and one of two ways to point the gateway at them:
//!
//! - [`Resolution::Loopback`] / [`Resolution::ClusterIps`]: the operator's mode
//!   ([`Upstreams::ClusterIps`]): each routed Service's ClusterIP written into the
//!   configuration, here 127.0.0.1 (the backends listen there, each on its service's port).
//! - [`Resolution::Hosts`]: the offline `render` mode (names resolved when nginx starts): nginx
//!   runs in a private mount namespace (`unshare -m`, root only) with a generated hosts file
//!   bind-mounted over `/etc/hosts`, so the machine's own is not touched.
//!
//! [`Dns`] is a tiny DNS server for tests that need one (the ACME tests' CA resolves with it).
//!
//! The only changes made to the rendered text: the mount-path prefixes and `/tmp` point into a
//! temp dir, and the listen ports 8080/8443 become free loopback ports (the machine may be
//! using 8080; a network namespace would also hide nginx from the test's own clients).
//!
//! Processes are stopped by their PID when their guard drops, also when a test fails.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use opsconductor_operator::build::{BuildOptions, Upstreams, nginx};
use opsconductor_operator::render::bundle_for;

/// Whether the real-nginx tests can run here. Under `CI=true` a missing tool fails the test
/// with a message naming it; elsewhere, `OPSC_SKIP_NGINX=1` skips explicitly, and a missing
/// tool without it fails too (nothing is skipped silently).
pub fn tools_present(need_unshare: bool) -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let skip = std::env::var("OPSC_SKIP_NGINX").is_ok_and(|v| v == "1");
    if skip && !ci {
        eprintln!("OPSC_SKIP_NGINX=1: skipping a real-nginx test");
        return false;
    }
    let mut missing = Vec::new();
    for (tool, args, package) in [
        ("nginx", &["-v"][..], "nginx"),
        ("openssl", &["version"][..], "openssl"),
        ("curl", &["--version"][..], "curl"),
    ] {
        let ok = Command::new(tool)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            missing.push(format!("{tool} (Debian package {package})"));
        }
    }
    if need_unshare && !unshare_works() {
        missing.push(
            "a private mount namespace (`unshare -m` with `mount --bind`, util-linux, as root)"
                .into(),
        );
    }
    if !missing.is_empty() {
        panic!(
            "the real-nginx gateway tests need: {}. Install them (scripts/install-nginx), or \
             outside CI set OPSC_SKIP_NGINX=1 to skip these tests explicitly.",
            missing.join(", ")
        );
    }
    true
}

fn unshare_works() -> bool {
    Command::new("unshare")
        .args(["-m", "sh", "-c", "mount --bind /etc/hosts /etc/hosts"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A free TCP port on 127.0.0.1 (the listener is closed again; nginx binds it next).
pub fn free_port() -> u16 {
    // bind(0) can hand out the same port twice in a row once the first listener is closed: a
    // gateway once got one port for both HTTP and HTTPS ("a duplicate default server"), so
    // no port is given twice in a process. (Another process can still take one before its
    // user binds it; the users retry on "Address already in use".)
    static GIVEN: Mutex<std::collections::BTreeSet<u16>> =
        Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if given.insert(port) {
            return port;
        }
    }
}

/// A free UDP port on 127.0.0.1 (the socket is closed again; the exporter binds it next).
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn ipv6_loopback() -> bool {
    TcpListener::bind("[::1]:0").is_ok()
}

/// Sends SIGTERM (nginx's fast shutdown: the master stops its workers) and reaps the child.
fn terminate(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// DNS

/// A minimal authoritative DNS server on 127.0.0.1 (UDP): A records for the names it knows,
/// an empty answer for their other types (AAAA), NXDOMAIN for every other name. Names can be
/// added while it runs, like a Service being created.
pub struct Dns {
    pub addr: SocketAddr,
    names: Arc<Mutex<HashMap<String, Ipv4Addr>>>,
    queries: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Dns {
    pub fn start() -> Dns {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let names: Arc<Mutex<HashMap<String, Ipv4Addr>>> = Arc::default();
        let queries = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (names, queries, stop) = (names.clone(), queries.clone(), stop.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    queries.fetch_add(1, Ordering::Relaxed);
                    if let Some(reply) = answer(&buf[..n], &names.lock().unwrap()) {
                        let _ = socket.send_to(&reply, peer);
                    }
                }
            })
        };
        Dns {
            addr,
            names,
            queries,
            stop,
            thread: Some(thread),
        }
    }

    pub fn insert(&self, name: &str, ip: Ipv4Addr) {
        self.names
            .lock()
            .unwrap()
            .insert(name.to_ascii_lowercase(), ip);
    }

    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One DNS reply for one query (RFC 1035, section 4.1), or None for what is not a query.
fn answer(query: &[u8], names: &HashMap<String, Ipv4Addr>) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(pos)? as usize;
        pos += 1;
        if len == 0 {
            break;
        }
        if len & 0xC0 != 0 {
            return None;
        }
        labels.push(String::from_utf8_lossy(query.get(pos..pos + len)?).to_ascii_lowercase());
        pos += len;
    }
    let qtype = u16::from_be_bytes([*query.get(pos)?, *query.get(pos + 1)?]);
    let question_end = pos + 4;
    let question = query.get(12..question_end)?;
    let name = labels.join(".");
    let found = names.get(&name).copied();
    let mut reply = Vec::with_capacity(question_end + 16);
    reply.extend_from_slice(&query[0..2]);
    // QR, the query's opcode and RD, AA; RA; rcode 0 or 3 (NXDOMAIN).
    reply.push(0x80 | (query[2] & 0x79) | 0x04);
    reply.push(0x80 | if found.is_some() { 0 } else { 3 });
    let answers: u16 = (found.is_some() && qtype == 1).into();
    reply.extend_from_slice(&[0, 1]);
    reply.extend_from_slice(&answers.to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]);
    reply.extend_from_slice(question);
    if let (Some(ip), 1) = (found, answers) {
        reply.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
        reply.extend_from_slice(&5u32.to_be_bytes());
        reply.extend_from_slice(&[0, 4]);
        reply.extend_from_slice(&ip.octets());
    }
    Some(reply)
}

// ---------------------------------------------------------------------------------------------
// Backends

/// A small HTTP/1.1 server standing in for one service. Each response is JSON describing the
/// request as received (method, path, headers, body length, which connection). A request
/// asking for a WebSocket upgrade gets `101`, after which the backend answers one line
/// `echo:<line>` and closes; one asking for an `h2c` upgrade gets `101` and the line
/// `h2c-tunnel-open`.
pub struct Backend {
    pub name: String,
    pub port: u16,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    /// Requests to `/hold...` are answered only once `release` is set; `held` counts those
    /// waiting.
    held: Arc<AtomicUsize>,
    release: Arc<AtomicBool>,
    /// Every request received, as described in its response (held ones when answered).
    seen: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Backend {
    pub fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        {
            let (connections, stop, name) = (connections.clone(), stop.clone(), name.to_string());
            let (held, release, seen) = (held.clone(), release.clone(), seen.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let n = connections.fetch_add(1, Ordering::Relaxed) + 1;
                            let name = name.clone();
                            let hold = (held.clone(), release.clone());
                            let seen = seen.clone();
                            thread::spawn(move || serve(stream, &name, n, &hold, &seen));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            });
        }
        Backend {
            name: name.into(),
            port,
            connections,
            stop,
            held,
            release,
            seen,
        }
    }

    /// The requests received so far whose path starts with `prefix`, as described in their
    /// responses (method, path, headers, body length).
    pub fn requests(&self, prefix: &str) -> Vec<serde_json::Value> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with(prefix)))
            .cloned()
            .collect()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Requests to `/hold...` waiting for [`Backend::release`].
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Answers every held request, and every later one at once.
    pub fn release(&self) {
        self.release.store(true, Ordering::Relaxed);
    }

    /// Holds `/hold...` requests again until the next [`Backend::release`] (call it once the
    /// released ones were answered).
    pub fn hold_again(&self) {
        self.release.store(false, Ordering::Relaxed);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.release.store(true, Ordering::Relaxed);
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(
    stream: TcpStream,
    name: &str,
    connection: usize,
    (held, release): &(Arc<AtomicUsize>, Arc<AtomicBool>),
    seen: &Mutex<Vec<serde_json::Value>>,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = BTreeMap::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let body_len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; body_len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if headers
            .get("upgrade")
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
        {
            let connection_upgrade = headers
                .get("connection")
                .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"));
            let _ = write!(
                out,
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 X-Backend: {name}\r\nX-Saw-Connection-Upgrade: {connection_upgrade}\r\n\r\n"
            );
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = writeln!(out, "echo:{}", line.trim_end());
            let _ = out.flush();
            return;
        }
        // Like an HTTP/2 server that accepts cleartext upgrades (RFC 7540, section 3.2): once
        // it answers 101, the connection is a raw tunnel to it, past everything the gateway
        // does per request.
        if headers
            .get("upgrade")
            .is_some_and(|v| v.eq_ignore_ascii_case("h2c"))
        {
            let _ = write!(
                out,
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\
                 X-Backend: {name}\r\n\r\nh2c-tunnel-open\n"
            );
            let _ = out.flush();
            return;
        }
        if path.starts_with("/hold") {
            held.fetch_add(1, Ordering::Relaxed);
            // Released by the test (or when the backend is dropped); a hang guard bounds it.
            let deadline = Instant::now() + Duration::from_secs(120);
            while !release.load(Ordering::Relaxed) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            held.fetch_sub(1, Ordering::Relaxed);
        }
        let described = serde_json::json!({
            "backend": name,
            "connection": connection,
            "method": method,
            "path": path,
            "headers": headers,
            "body_len": body_len,
        });
        seen.lock().unwrap().push(described.clone());
        let description = described.to_string();
        // A stand-in verdict service (edge authentication): `Bearer user-<id>` passes with
        // X-User-Id and X-User-Roles, `Bearer forbidden` gets 403, anything else 401. It asks
        // not to be cached, which the gateway overrides with its own time (docs/gateway.md).
        if path.starts_with("/verdict") {
            let token = headers
                .get("authorization")
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or_default();
            let head = match token.strip_prefix("user-") {
                Some(id) => format!(
                    "200 OK\r\nX-User-Id: {id}\r\nX-User-Roles: reader\r\nX-Other: not-passed"
                ),
                None if token == "forbidden" => "403 Forbidden".to_string(),
                None => "401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"test\"".to_string(),
            };
            let _ = write!(
                out,
                "HTTP/1.1 {head}\r\nCache-Control: no-store\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{description}",
                description.len()
            );
            let _ = out.flush();
            continue;
        }
        let close = headers
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let _ = write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             X-Powered-By: test-backend\r\n{}\r\n{description}",
            description.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        let _ = out.flush();
        if close {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway

/// How the gateway finds the services' addresses.
pub enum Resolution {
    /// The operator's mode with every service of the stack at 127.0.0.1.
    Loopback,
    /// The operator's mode with these ClusterIPs (a routed service missing here answers 503).
    ClusterIps(BTreeMap<String, IpAddr>),
    /// The offline `render` mode: names mapped through a private `/etc/hosts`.
    Hosts(Vec<(String, Ipv4Addr)>),
}

/// The operator's mode for `stack_yaml`, with every service at 127.0.0.1.
pub fn loopback_upstreams(stack_yaml: &str) -> Upstreams {
    let stack = opsconductor_operator::render::parse_stack("test-stack.yaml", stack_yaml).unwrap();
    let model = opsconductor_operator::validate::validate(&stack, "default").unwrap();
    Upstreams::ClusterIps(
        model
            .services
            .iter()
            .map(|s| (s.name.to_string(), IpAddr::V4(Ipv4Addr::LOCALHOST)))
            .collect(),
    )
}

/// The rendered `nginx.conf` of `stack_yaml`, read from the gateway ConfigMap of the bundle
/// built through the crate's public API. Also checks that the gateway Deployment mounts and
/// runs exactly the paths the test rewrites.
pub fn rendered_config(stack_yaml: &str, options: &BuildOptions) -> String {
    let bundle = bundle_for("test-stack.yaml", stack_yaml, "default", options)
        .unwrap_or_else(|e| panic!("the test stack is invalid: {e}"));
    let deployment = serde_json::to_value(&bundle.deployments[0]).unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    // `sh -c <script>`: nginx in the foreground with the configuration the test runs, and a
    // certificate reload loop beside it (tests/acme_real.rs runs that script).
    let script = container["command"][2].as_str().unwrap_or_default();
    assert_eq!(container["command"][0], "sh");
    assert!(
        script.contains(&format!("conf={}\n", nginx::CONFIG_PATH))
            && script.ends_with("exec nginx -c \"$conf\"\n"),
        "the gateway must run the configuration the test runs: {script}"
    );
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    for dir in [nginx::CONFIG_DIR, nginx::TLS_DIR, nginx::TMP_DIR] {
        assert!(mounts.contains(&dir), "{dir} is not mounted: {mounts:?}");
    }
    let config_map = bundle
        .config_maps
        .iter()
        .find(|c| {
            c.data
                .as_ref()
                .is_some_and(|d| d.contains_key(nginx::CONFIG_KEY))
        })
        .expect("a ConfigMap holding nginx.conf");
    config_map.data.as_ref().unwrap()[nginx::CONFIG_KEY].clone()
}

/// Paths of one nginx run: `<dir>/config/nginx.conf`, `<dir>/tls/tls.{crt,key}`, `<dir>/tmp`.
pub struct Layout {
    pub dir: tempfile::TempDir,
    pub http_port: u16,
    pub https_port: u16,
    /// For the probes-only listener of a gateway whose 8080/8443 expect the PROXY protocol.
    pub health_port: u16,
    /// For the loopback `stub_status` listener of a gateway with `spec.gateway.metrics`.
    pub status_port: u16,
    /// The UDP port on 127.0.0.1 where nginx sends a line per request (with
    /// `spec.gateway.metrics`) and the `requests` sidecar reads them.
    pub request_log_port: u16,
    /// For the reload loop's result ([`nginx::CONFIG_STATUS_PORT`] in the pod).
    pub config_status_port: u16,
}

impl Layout {
    pub fn new() -> Layout {
        let dir = tempfile::Builder::new()
            .prefix("opsc-gateway-")
            .tempdir()
            .unwrap();
        for sub in ["config", "tls", "tmp"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        // nginx's workers run as an unprivileged user when the test runs as root: they must
        // reach the temp dirs.
        let _ = Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(dir.path())
            .status();
        let _ = Command::new("chmod")
            .arg("a+rwx")
            .arg(dir.path().join("tmp"))
            .status();
        Layout {
            dir,
            http_port: free_port(),
            https_port: free_port(),
            health_port: free_port(),
            status_port: free_port(),
            request_log_port: free_udp_port(),
            config_status_port: free_port(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("config/nginx.conf")
    }

    /// Rewrites the mount-path prefixes, `/tmp` and the listen ports; nothing else.
    pub fn install_config(&self, rendered: &str) {
        let text = local_config_with_all_ports(
            rendered,
            self.dir.path(),
            self.http_port,
            self.https_port,
            Some(self.health_port),
            Some(self.status_port),
            self.config_status_port,
        );
        // The request log's target (with `metrics`): the layout's own UDP port.
        let target = format!(
            "syslog:server=127.0.0.1:{},",
            nginx::request_metrics::REQUEST_LOG_PORT
        );
        let text = text.replace(
            &target,
            &format!("syslog:server=127.0.0.1:{},", self.request_log_port),
        );
        std::fs::write(self.config_path(), text).unwrap();
    }

    /// A self-signed ECDSA P-256 certificate for `hosts`, as the Secret's tls.crt/tls.key.
    pub fn make_certificate(&self, hosts: &[&str]) {
        let san: Vec<String> = hosts.iter().map(|h| format!("DNS:{h}")).collect();
        let out = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .arg("ec_paramgen_curve:P-256")
            .args(["-nodes", "-days", "2", "-subj"])
            .arg("/CN=opsconductor gateway test")
            .arg("-addext")
            .arg(format!("subjectAltName={}", san.join(",")))
            .arg("-keyout")
            .arg(self.path("tls/tls.key"))
            .arg("-out")
            .arg(self.path("tls/tls.crt"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl req failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = Command::new("chmod")
            .arg("a+r")
            .arg(self.path("tls/tls.key"))
            .status();
    }

    pub fn cert(&self) -> PathBuf {
        self.path("tls/tls.crt")
    }

    /// The nginx command line for this layout, wrapped in a private mount namespace with its
    /// own `/etc/hosts` when `hosts` is given.
    fn nginx_command(&self, hosts: Option<&[(String, Ipv4Addr)]>, extra: &[&str]) -> Command {
        let mut args: Vec<String> = vec![
            "-p".into(),
            self.dir.path().display().to_string(),
            "-e".into(),
            "stderr".into(),
            "-c".into(),
            self.config_path().display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut cmd = match hosts {
            None => {
                let mut c = Command::new("nginx");
                c.args(&args);
                c
            }
            Some(entries) => {
                let hosts_file = self.path("hosts");
                let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
                for (name, ip) in entries {
                    text.push_str(&format!("{ip} {name}\n"));
                }
                std::fs::write(&hosts_file, text).unwrap();
                let mut c = Command::new("unshare");
                // unshare execs sh, which execs nginx: the child's PID is nginx's.
                c.args([
                    "-m",
                    "sh",
                    "-c",
                    "mount --bind \"$0\" /etc/hosts && exec nginx \"$@\"",
                ])
                .arg(&hosts_file)
                .args(&args);
                c
            }
        };
        // As in the gateway image: no distribution-wide OpenSSL policy on top of nginx.conf,
        // so that the TLS settings under test are nginx.conf's alone.
        cmd.env("OPENSSL_CONF", self.permissive_openssl_conf());
        cmd
    }

    /// An OpenSSL configuration that sets nothing (Debian's raises the minimum protocol).
    pub fn permissive_openssl_conf(&self) -> PathBuf {
        let p = self.path("openssl.cnf");
        if !p.exists() {
            std::fs::write(&p, "# intentionally empty\n").unwrap();
        }
        p
    }

    /// `nginx -t` on the installed configuration.
    pub fn nginx_test(&self, hosts: Option<&[(String, Ipv4Addr)]>) -> Output {
        self.nginx_command(hosts, &["-t"]).output().unwrap()
    }
}

/// The rendered configuration for a local run rooted at `dir` (`config/`, `tls/`, `tmp/`):
/// the mount-path prefixes and `/tmp` point into `dir`, and the listen ports become
/// `http_port`/`https_port` on loopback (`[::1]` only where the machine has IPv6), and a
/// Service's ClusterIP in an `upstream` becomes 127.0.0.1 with the same port (a configuration
/// written by the operator against the test control plane names its service range, where no
/// test traffic may ever go; the backends listen on loopback). Nothing else changes.
pub fn local_config(rendered: &str, dir: &Path, http_port: u16, https_port: u16) -> String {
    local_config_with_health(rendered, dir, http_port, https_port, None)
}

/// [`local_config`], and the probes-only port [`nginx::HEALTH_PORT`] (rendered only with
/// `proxyProtocol`) becomes `health_port`.
pub fn local_config_with_health(
    rendered: &str,
    dir: &Path,
    http_port: u16,
    https_port: u16,
    health_port: Option<u16>,
) -> String {
    local_config_with_ports(rendered, dir, http_port, https_port, health_port, None)
}

/// [`local_config_with_health`], and the loopback `stub_status` port [`nginx::STATUS_PORT`]
/// (rendered only with `spec.gateway.metrics`) becomes `status_port` (still on 127.0.0.1).
/// The reload loop's result port [`nginx::CONFIG_STATUS_PORT`] becomes a free port (see
/// [`local_config_with_all_ports`] to choose it).
pub fn local_config_with_ports(
    rendered: &str,
    dir: &Path,
    http_port: u16,
    https_port: u16,
    health_port: Option<u16>,
    status_port: Option<u16>,
) -> String {
    local_config_with_all_ports(
        rendered,
        dir,
        http_port,
        https_port,
        health_port,
        status_port,
        free_port(),
    )
}

/// [`local_config_with_ports`], with the reload loop's result on `config_status_port`.
pub fn local_config_with_all_ports(
    rendered: &str,
    dir: &Path,
    http_port: u16,
    https_port: u16,
    health_port: Option<u16>,
    status_port: Option<u16>,
    config_status_port: u16,
) -> String {
    let d = dir.display();
    let v6 = ipv6_loopback();
    // /tmp first: the temp dir itself may live under /tmp.
    let text = rendered
        .replace(&format!(" {}/", nginx::TMP_DIR), &format!(" {d}/tmp/"))
        .replace(nginx::CONFIG_DIR, &format!("{d}/config"))
        .replace(nginx::TLS_DIR, &format!("{d}/tls"));
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        let rewritten = if let Some(rest) = t.strip_prefix("listen ") {
            let (port, options) = rest.split_once(&[' ', ';'][..]).unwrap();
            let sep = &rest[rest.find(&[' ', ';'][..]).unwrap()..][..1];
            if let Some(p) = port.strip_prefix("127.0.0.1:") {
                assert_eq!(p.parse::<i32>().unwrap(), nginx::STATUS_PORT, "{line}");
                let new_port = status_port.expect("a status port for the metrics listener");
                out.push_str(&line[..line.len() - t.len()]);
                out.push_str(&format!("listen 127.0.0.1:{new_port}{sep}{options}\n"));
                continue;
            }
            let ipv6 = port.starts_with("[::]:");
            let port = port.trim_start_matches("[::]:");
            let new_port = match port.parse::<i32>().unwrap() {
                p if p == nginx::HTTP_PORT => http_port,
                p if p == nginx::HTTPS_PORT => https_port,
                p if p == nginx::HEALTH_PORT && health_port.is_some() => health_port.unwrap(),
                p if p == nginx::CONFIG_STATUS_PORT => config_status_port,
                p => panic!("unexpected listen port {p}"),
            };
            match (ipv6, v6) {
                (true, false) => continue,
                (true, true) => format!("listen [::1]:{new_port}{sep}{options}"),
                (false, _) => format!("listen 127.0.0.1:{new_port}{sep}{options}"),
            }
        } else if let Some((addr, rest)) = t
            .strip_prefix("server ")
            .and_then(|r| r.split_once(' '))
            .and_then(|(a, rest)| Some((a.parse::<SocketAddr>().ok()?, rest)))
        {
            format!("server 127.0.0.1:{} {rest}", addr.port())
        } else {
            t.to_string()
        };
        out.push_str(&line[..line.len() - t.len()]);
        out.push_str(&rewritten);
        out.push('\n');
    }
    let outside = out.replace(&d.to_string(), "<dir>");
    assert!(
        !outside.contains("/etc/opsconductor") && !outside.contains(" /tmp/"),
        "a pod path was left in the configuration:\n{outside}"
    );
    out
}

/// A running nginx serving the rendered gateway configuration.
pub struct Gateway {
    pub layout: Layout,
    child: Child,
    pub hosts: Vec<String>,
}

impl Gateway {
    /// Renders `stack_yaml` with `options` (and the upstreams of `resolution`), installs the
    /// configuration and a certificate for `hosts`, starts nginx and waits until it listens.
    pub fn start(
        stack_yaml: &str,
        options: BuildOptions,
        resolution: Resolution,
        hosts: &[&str],
    ) -> Gateway {
        let mut options = options;
        let host_entries = match resolution {
            Resolution::Loopback => {
                options.upstreams = loopback_upstreams(stack_yaml);
                None
            }
            Resolution::ClusterIps(ips) => {
                options.upstreams = Upstreams::ClusterIps(ips);
                None
            }
            Resolution::Hosts(entries) => {
                options.upstreams = Upstreams::Names;
                Some(entries)
            }
        };
        let rendered = rendered_config(stack_yaml, &options);
        // A free port can be taken by someone else between the probe and nginx's bind: then
        // nginx exits with "Address already in use", and another pair of ports is tried.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let layout = Layout::new();
            layout.install_config(&rendered);
            layout.make_certificate(hosts);
            let child = layout
                .nginx_command(host_entries.as_deref(), &[])
                .stdout(std::fs::File::create(layout.path("access.log")).unwrap())
                .stderr(std::fs::File::create(layout.path("error.log")).unwrap())
                .spawn()
                .expect("nginx starts");
            let mut gw = Gateway {
                layout,
                child,
                hosts: hosts.iter().map(|h| h.to_string()).collect(),
            };
            match gw.wait_listening() {
                Ok(()) => return gw,
                Err(e) if attempt < 3 && e.contains("Address already in use") => continue,
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "nginx exited ({status}) before listening:\n{}",
                    self.error_log()
                ));
            }
            // A port that answers may be someone else's (a free port taken between the probe
            // and nginx's bind, while nginx keeps retrying its bind): only nginx's pid file,
            // which it writes once every listen socket is bound, says the ports are ours.
            let log = self.error_log();
            if log.contains("Address already in use") {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(format!(
                    "nginx could not bind: Address already in use\n{log}"
                ));
            }
            let pid_file = self.layout.path("tmp/nginx.pid");
            let ours = std::fs::read_to_string(&pid_file)
                .is_ok_and(|p| p.trim() == self.child.id().to_string());
            let up = |p: u16| TcpStream::connect(("127.0.0.1", p)).is_ok();
            if ours && up(self.layout.http_port) && up(self.layout.https_port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "nginx did not listen within 30 s:\n{}",
                    self.error_log()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.layout.path("error.log")).unwrap_or_default()
    }

    /// The master's pid (the child: under `unshare`, sh `exec`s nginx).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `nginx -s reload`, as the pod's reload loop runs it: SIGHUP to the master, which
    /// loads the installed configuration and starts new workers, while the old ones finish.
    pub fn reload(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "cannot signal nginx");
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.layout.path("access.log")).unwrap_or_default()
    }

    pub fn https_url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.layout.https_port)
    }

    /// curl to the HTTPS port, trusting the test certificate, `host` resolved to loopback.
    /// [`Gateway::curl_https`], with curl's error as `Err` (no HTTP response at all).
    pub fn try_curl_https(&self, host: &str, path: &str) -> Result<Response, String> {
        let resolve = format!("{host}:{}:127.0.0.1", self.layout.https_port);
        let cert = self.layout.cert().display().to_string();
        let url = self.https_url(host, path);
        let mut responses = try_curl_many(&["--resolve", &resolve, "--cacert", &cert, &url])?;
        assert_eq!(responses.len(), 1, "{responses:?}");
        Ok(responses.remove(0))
    }

    pub fn curl_https(&self, host: &str, path: &str, extra: &[&str]) -> Response {
        let resolve = format!("{host}:{}:127.0.0.1", self.layout.https_port);
        let cert = self.layout.cert().display().to_string();
        let mut args = vec!["--resolve", &resolve, "--cacert", &cert];
        args.extend_from_slice(extra);
        let url = self.https_url(host, path);
        args.push(&url);
        curl(&args)
    }

    /// curl to the plain HTTP port with `Host: host`.
    pub fn curl_http(&self, host: &str, path: &str) -> Response {
        let url = format!("http://127.0.0.1:{}{path}", self.layout.http_port);
        let host_header = format!("Host: {host}");
        curl(&["-H", &host_header, &url])
    }

    /// `openssl s_client` to the HTTPS port; stdin is `input`, the output is stdout+stderr.
    pub fn s_client(&self, args: &[&str], input: &[u8]) -> (bool, String) {
        s_client(
            &format!("127.0.0.1:{}", self.layout.https_port),
            &self.layout.permissive_openssl_conf(),
            args,
            input,
        )
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        terminate(&mut self.child);
        if thread::panicking() {
            eprintln!(
                "--- nginx error log ---\n{}\n--- access log ---\n{}",
                self.error_log(),
                self.access_log()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// One HTTP response as curl saw it (the last one, after any 1xx).
#[derive(Debug)]
pub struct Response {
    pub version: String,
    pub status: u16,
    /// Lowercase names; repeated headers joined with ", ".
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// Written by curl after each response, to split several responses of one run.
const END_MARK: &str = "\n--opsc-end-of-response--\n";

/// Runs curl with `-sS -i` and parses the response. Guarded against hanging by curl's own
/// `--max-time`: a guard, not an assertion on time.
pub fn curl(args: &[&str]) -> Response {
    let mut responses = curl_many(args);
    assert_eq!(responses.len(), 1, "{responses:?}");
    responses.remove(0)
}

/// Every response of one curl run, e.g. `curl URL URL URL` (one connection, reused).
pub fn curl_many(args: &[&str]) -> Vec<Response> {
    try_curl_many(args).unwrap_or_else(|e| panic!("curl {args:?} failed: {e}"))
}

/// [`curl_many`], with curl's error (a transport failure: no HTTP response) as `Err`.
pub fn try_curl_many(args: &[&str]) -> Result<Vec<Response>, String> {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "60", "-w", END_MARK])
        .args(args)
        .output()
        .expect("curl runs");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut parts: Vec<&str> = text.split(END_MARK).collect();
    assert_eq!(parts.pop(), Some(""), "curl output ends with the mark");
    Ok(parts.into_iter().map(parse_response).collect())
}

fn parse_response(text: &str) -> Response {
    let mut rest = text;
    loop {
        let (head, body) = rest
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no header block in {text:?}"));
        let mut lines = head.lines();
        let status_line = lines.next().unwrap();
        let mut parts = status_line.split_whitespace();
        let version = parts.next().unwrap().to_string();
        let status: u16 = parts.next().unwrap().parse().unwrap();
        if (100..200).contains(&status) && body.starts_with("HTTP/") {
            rest = body;
            continue;
        }
        let mut headers = BTreeMap::new();
        for line in lines {
            if let Some((k, v)) = line.split_once(':') {
                headers
                    .entry(k.trim().to_ascii_lowercase())
                    .and_modify(|e: &mut String| {
                        e.push_str(", ");
                        e.push_str(v.trim());
                    })
                    .or_insert_with(|| v.trim().to_string());
            }
        }
        return Response {
            version,
            status,
            headers,
            body: body.to_string(),
        };
    }
}

/// `openssl s_client -connect addr ARGS`, with `input` on stdin. Returns whether it exited
/// successfully and its stdout and stderr.
pub fn s_client(addr: &str, openssl_conf: &Path, args: &[&str], input: &[u8]) -> (bool, String) {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", addr])
        .args(args)
        .env("OPENSSL_CONF", openssl_conf)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl runs");
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    // A hang guard: s_client waits for the server to close; nothing asserts on time.
    let watchdog = {
        let done = done.clone();
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            if !done.load(Ordering::Relaxed) {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        })
    };
    {
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(input);
    }
    let out = child.wait_with_output().unwrap();
    done.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `openssl s_server` accepting only TLS 1.0 or 1.1 (OpenSSL security level 0): proves that
/// the client side of the protocol-version test can speak the old versions at all.
pub struct OldTlsServer {
    pub port: u16,
    child: Child,
}

impl OldTlsServer {
    pub fn start(layout: &Layout, version_flag: &str) -> OldTlsServer {
        let port = free_port();
        let mut child = Command::new("openssl")
            .args(["s_server", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(layout.cert())
            .arg("-key")
            .arg(layout.path("tls/tls.key"))
            .args([version_flag, "-cipher", "DEFAULT@SECLEVEL=0", "-quiet"])
            .env("OPENSSL_CONF", layout.permissive_openssl_conf())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server runs");
        let deadline = Instant::now() + Duration::from_secs(30);
        // Watch the listening sockets rather than connecting (a probe would be a client).
        while !listening(port) {
            if let Ok(Some(s)) = child.try_wait() {
                panic!("openssl s_server exited: {s}");
            }
            assert!(Instant::now() < deadline, "s_server did not listen");
            thread::sleep(Duration::from_millis(50));
        }
        OldTlsServer { port, child }
    }
}

impl Drop for OldTlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether something listens on 127.0.0.1:port, from /proc/net/tcp.
fn listening(port: u16) -> bool {
    let needle = format!("0100007F:{port:04X} 00000000:0000 0A");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| t.contains(&needle))
}

// ---------------------------------------------------------------------------------------------
// A real PROXY protocol sender

/// Whether `tool` (from Debian package `package`) runs, under the same rules as
/// [`tools_present`]: a missing tool fails the test, also outside CI unless `OPSC_SKIP_NGINX=1`.
pub fn tool_present(tool: &str, version_args: &[&str], package: &str) -> bool {
    if std::env::var("OPSC_SKIP_NGINX").is_ok_and(|v| v == "1")
        && !std::env::var("CI").is_ok_and(|v| v == "true")
    {
        eprintln!("OPSC_SKIP_NGINX=1: skipping a test that needs {tool}");
        return false;
    }
    let ok = Command::new(tool)
        .args(version_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "this test needs {tool} (Debian package {package}; scripts/install-nginx installs it), \
         or outside CI OPSC_SKIP_NGINX=1 to skip it explicitly"
    );
    true
}

/// HAProxy (Debian's) in TCP mode in front of the gateway: each frontend listens on a free
/// loopback port and forwards to a gateway port from a chosen source address, sending the
/// PROXY protocol header (v1 or v2) naming the client it accepted.
pub struct HaProxy {
    child: Child,
    dir: tempfile::TempDir,
    /// Frontend name -> the port it listens on (127.0.0.1).
    pub ports: BTreeMap<String, u16>,
}

/// One HAProxy frontend: `name`, the gateway port it forwards to, the source address of its
/// connections to the gateway, and `send-proxy` or `send-proxy-v2`.
pub struct Frontend<'a> {
    pub name: &'a str,
    pub to_port: u16,
    pub source: &'a str,
    pub send_proxy: &'a str,
}

impl HaProxy {
    /// Starts HAProxy with `frontends` and waits until it listens on every frontend port. A
    /// free port can be taken by someone else before HAProxy binds it: then HAProxy exits,
    /// and it is started again on other ports.
    pub fn start(frontends: &[Frontend<'_>]) -> HaProxy {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::try_start(frontends) {
                Ok(h) => return h,
                Err(log) if attempt < 3 && log.contains("cannot bind") => continue,
                Err(log) => panic!("haproxy did not start:\n{log}"),
            }
        }
    }

    fn try_start(frontends: &[Frontend<'_>]) -> Result<HaProxy, String> {
        let dir = tempfile::Builder::new()
            .prefix("opsc-haproxy-")
            .tempdir()
            .unwrap();
        let mut ports = BTreeMap::new();
        let mut cfg = String::from(
            "global\n    maxconn 256\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    \
             timeout client 60s\n    timeout server 60s\n",
        );
        for f in frontends {
            let port = free_port();
            ports.insert(f.name.to_string(), port);
            cfg.push_str(&format!(
                "\nfrontend {name}\n    bind 127.0.0.1:{port}\n    default_backend {name}_gw\n\n\
                 backend {name}_gw\n    server gw 127.0.0.1:{to} source {source} {send}\n",
                name = f.name,
                to = f.to_port,
                source = f.source,
                send = f.send_proxy,
            ));
        }
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &cfg).unwrap();
        let check = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "haproxy refuses the configuration:\n{cfg}\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        // -db: foreground, no daemon; the guard stops it by its PID.
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(std::fs::File::create(dir.path().join("haproxy.log")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("haproxy.err")).unwrap())
            .spawn()
            .expect("haproxy starts");
        let mut h = HaProxy { child, dir, ports };
        let deadline = Instant::now() + Duration::from_secs(30);
        // Listening sockets of HAProxy's own process, not merely someone's on those ports.
        while !h
            .ports
            .values()
            .all(|p| listening_inode(*p).is_some_and(|i| owns_socket(h.child.id(), i)))
        {
            if let Ok(Some(status)) = h.child.try_wait() {
                return Err(format!("haproxy exited ({status}):\n{}", h.log()));
            }
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen:\n{}",
                h.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
        Ok(h)
    }

    pub fn port(&self, frontend: &str) -> u16 {
        self.ports[frontend]
    }

    pub fn log(&self) -> String {
        ["haproxy.log", "haproxy.err"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        terminate(&mut self.child);
        if thread::panicking() {
            eprintln!("--- haproxy log ---\n{}", self.log());
        }
    }
}

/// The inode of the socket listening on 127.0.0.1:port, from /proc/net/tcp.
fn listening_inode(port: u16) -> Option<String> {
    let local = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .ok()?
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 9 && f[1] == local && f[3] == "0A")
        .map(|f| f[9].to_string())
}

/// Whether process `pid` holds the socket with `inode`.
fn owns_socket(pid: u32, inode: String) -> bool {
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy() == want))
    })
}

/// One curl run with a group of arguments per request (`--next` between them: each request
/// has its own headers, source address and so on, and connections are reused where they can
/// be). Returns the responses in order.
pub fn curl_each(groups: &[Vec<String>]) -> Vec<Response> {
    let mut args: Vec<String> = Vec::new();
    for (i, group) in groups.iter().enumerate() {
        if i > 0 {
            args.push("--next".into());
        }
        for a in ["-sS", "-i", "--max-time", "60", "-w", END_MARK] {
            args.push(a.into());
        }
        args.extend(group.iter().cloned());
    }
    let out = Command::new("curl")
        .args(&args)
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut parts: Vec<&str> = text.split(END_MARK).collect();
    assert_eq!(parts.pop(), Some(""), "curl output ends with the mark");
    parts.into_iter().map(parse_response).collect()
}

// ---------------------------------------------------------------------------------------------
// Steady load

/// The longest a [`Load`] runs when nobody stops it.
const LOAD_BOUND: Duration = Duration::from_secs(30 * 60);

/// A steady HTTPS load on the gateway: 3 clients, each a loop of curl runs of 20 requests over
/// one kept-alive connection, plus one client opening a new connection per request, each to
/// `/c<i>`. Bounded: it stops when told, or after [`LOAD_BOUND`] (a test that never stops it;
/// a count of runs ran out on the node, where one change under load takes minutes).
///
/// What a failed request is: every request must succeed for a client that behaves as HTTP
/// allows and browsers do. A request that got no response at all on a connection that was
/// reused (RFC 9112 section 9.3.1: the server may close an idle kept-alive connection at any
/// time, and the client may retry an idempotent request then), or that an HTTP/2 server
/// refused with GOAWAY before processing it (RFC 9113 section 6.8), is retried once on a new
/// connection, and that retry must succeed; such retries are counted. Anything else is a
/// failure: an error status, a response cut short, a request lost on a fresh connection, or a
/// failed retry. (The same rule as the certificate rollout test in `tests/acme_real.rs`.)
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<Mutex<Vec<String>>>,
    retried: Arc<AtomicUsize>,
    clients: Vec<thread::JoinHandle<()>>,
}

/// What a [`Load`] saw.
#[derive(Debug)]
pub struct LoadReport {
    pub ok: usize,
    pub retried: usize,
    pub failures: Vec<String>,
}

impl Load {
    /// The load on a gateway on this machine (`host` resolved to 127.0.0.1).
    pub fn start(host: &str, https_port: u16) -> Load {
        Load::start_at(host, https_port, "127.0.0.1")
    }

    /// The load on `https://<host>:<https_port>` with `host` resolved to `address`.
    pub fn start_at(host: &str, https_port: u16, address: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(Mutex::new(Vec::<String>::new()));
        let retried = Arc::new(AtomicUsize::new(0));
        let mut clients = Vec::new();
        for i in 0..4 {
            let (stop, ok, failed, retried) =
                (stop.clone(), ok.clone(), failed.clone(), retried.clone());
            let url = format!("https://{host}:{https_port}/c{i}");
            let resolve = format!("{host}:{https_port}:{address}");
            clients.push(thread::spawn(move || {
                let per_run = if i == 3 { 1 } else { 20 };
                let curl = |urls: usize| {
                    let mut args = vec![
                        "-sk".to_string(),
                        "--max-time".into(),
                        "30".into(),
                        "--resolve".into(),
                        resolve.clone(),
                        // Per transfer: status, new connections it opened (0: a reused one),
                        // and curl's exit code for it (16: HTTP/2 stream refused).
                        "-w".into(),
                        "%{http_code} %{num_connects} %{exitcode}\\n".into(),
                    ];
                    for _ in 0..urls {
                        args.extend(["-o".to_string(), "/dev/null".to_string(), url.clone()]);
                    }
                    let out = Command::new("curl").args(&args).output().unwrap();
                    let lines: Vec<(String, u32, u32)> = String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .map(|l| {
                            let mut f = l.split_whitespace();
                            let code = f.next().unwrap_or("").to_string();
                            let connects = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                            let exit = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                            (code, connects, exit)
                        })
                        .collect();
                    (lines, String::from_utf8_lossy(&out.stderr).to_string())
                };
                let started = Instant::now();
                while started.elapsed() < LOAD_BOUND {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let (lines, stderr) = curl(per_run);
                    let note = |what: String| {
                        let mut note = format!("client {i}: {what}; curl stderr: {stderr}");
                        note.truncate(400);
                        failed.lock().unwrap().push(note);
                    };
                    if lines.len() != per_run {
                        note(format!(
                            "{} of {per_run} transfers reported: {lines:?}",
                            lines.len()
                        ));
                    }
                    for (code, connects, exit) in lines {
                        if code == "200" {
                            ok.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let no_response = code == "000";
                        let may_retry = no_response && (connects == 0 || exit == 16);
                        if !may_retry {
                            note(format!(
                                "status {code}, {connects} new connection(s), exit {exit}"
                            ));
                            continue;
                        }
                        let (again, _) = curl(1);
                        if again.first().is_some_and(|(c, _, _)| c == "200") {
                            retried.fetch_add(1, Ordering::Relaxed);
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            note(format!(
                                "no response (exit {exit}, {connects} new connection(s)), and the retry got {again:?}"
                            ));
                        }
                    }
                }
            }));
        }
        Load {
            stop,
            ok,
            failed,
            retried,
            clients,
        }
    }

    /// Requests that succeeded so far.
    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` requests succeeded in all (a hang guard, not a timing assertion).
    pub fn wait_for(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.ok() < n {
            assert!(
                Instant::now() < deadline,
                "the load did not reach {n} requests: {} ok, failures {:?}",
                self.ok(),
                self.failed.lock().unwrap()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.clients.drain(..) {
            c.join().unwrap();
        }
        LoadReport {
            ok: self.ok(),
            retried: self.retried.load(Ordering::Relaxed),
            failures: self.failed.lock().unwrap().clone(),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway container's own command

/// The gateway container's command run as the pod runs it (`sh -c <script>`: nginx as the
/// shell's `exec`, the reload loop beside it), on `layout`, with the configuration directory
/// laid out as the kubelet lays out a ConfigMap volume: `nginx.conf -> ..data/nginx.conf`,
/// `..data -> ..<version>`, and a new version published by an atomic swap of `..data`.
pub struct PodGateway {
    pub layout: Layout,
    child: Child,
}

impl PodGateway {
    /// `script` is the container's command script from the rendered Deployment; `rendered`
    /// the first nginx.conf. Paths are rewritten as [`local_config`] rewrites the file's.
    pub fn start(script: &str, rendered: &str, hosts: &[&str]) -> PodGateway {
        let layout = Layout::new();
        layout.make_certificate(hosts);
        let gw_dir = layout.dir.path().display().to_string();
        let pod = PodGateway {
            child: {
                publish_config(&layout, "..v0", rendered);
                std::os::unix::fs::symlink("..data/nginx.conf", layout.config_path()).unwrap();
                // /tmp first: the temp dir itself may live under /tmp.
                let local = script
                    .replace(&format!("={}/", nginx::TMP_DIR), &format!("={gw_dir}/tmp/"))
                    .replace(nginx::TLS_DIR, &format!("{gw_dir}/tls"))
                    .replace(nginx::CONFIG_DIR, &format!("{gw_dir}/config"))
                    .replace("nginx -", "nginx -e stderr -");
                assert!(
                    !local.contains("/etc/opsconductor")
                        && local.contains(&format!("{gw_dir}/tmp/")),
                    "{local}"
                );
                Command::new("sh")
                    .arg("-c")
                    .arg(&local)
                    .env("OPENSSL_CONF", layout.permissive_openssl_conf())
                    .stdout(std::fs::File::create(layout.path("access.log")).unwrap())
                    .stderr(std::fs::File::create(layout.path("error.log")).unwrap())
                    .spawn()
                    .unwrap()
            },
            layout,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", pod.layout.https_port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not start:\n{}",
                pod.error_log()
            );
            thread::sleep(Duration::from_millis(50));
        }
        pod
    }

    /// Publishes `rendered` as ConfigMap volume version `version` (`..v1`, `..v2`, ...).
    pub fn publish(&self, version: &str, rendered: &str) {
        publish_config(&self.layout, version, rendered);
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.layout.path("error.log")).unwrap_or_default()
    }

    /// The reload loop's last result (`loaded <id>` or `rejected <id>` and nginx's message),
    /// from its file.
    pub fn config_status(&self) -> String {
        std::fs::read_to_string(self.layout.path("tmp/opsconductor-config-status"))
            .unwrap_or_default()
    }

    /// The reload loop's last result as nginx serves it to the operator (an HTTP GET of
    /// [`nginx::CONFIG_STATUS_URL_PATH`] on the layout's port for it): (status, body).
    pub fn served_config_status(&self) -> (u16, String) {
        use std::io::{Read, Write};
        let mut stream = TcpStream::connect(("127.0.0.1", self.layout.config_status_port))
            .expect("the config status port accepts");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        write!(
            stream,
            "GET {} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n",
            nginx::CONFIG_STATUS_URL_PATH
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, body.to_string())
    }

    /// curl to the HTTPS port, trusting the test certificate.
    pub fn curl_https(&self, host: &str, path: &str) -> Response {
        let resolve = format!("{host}:{}:127.0.0.1", self.layout.https_port);
        let cert = self.layout.cert().display().to_string();
        let url = format!("https://{host}:{}{path}", self.layout.https_port);
        curl(&["--resolve", &resolve, "--cacert", &cert, &url])
    }
}

impl Drop for PodGateway {
    fn drop(&mut self) {
        // SIGQUIT, as the pod's stop signal: a graceful stop.
        let _ = Command::new("kill")
            .args(["-QUIT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        terminate(&mut self.child);
        if thread::panicking() {
            eprintln!("--- nginx error log ---\n{}", self.error_log());
        }
    }
}

/// Writes `rendered` (made local) as `config/<version>/nginx.conf` and points `config/..data`
/// at it with an atomic rename, as the kubelet's atomic writer does.
fn publish_config(layout: &Layout, version: &str, rendered: &str) {
    let text = local_config_with_all_ports(
        rendered,
        layout.dir.path(),
        layout.http_port,
        layout.https_port,
        Some(layout.health_port),
        None,
        layout.config_status_port,
    );
    let config = layout.path("config");
    std::fs::create_dir(config.join(version)).unwrap();
    std::fs::write(config.join(version).join("nginx.conf"), text).unwrap();
    let _ = std::fs::remove_file(config.join("..data_tmp"));
    std::os::unix::fs::symlink(version, config.join("..data_tmp")).unwrap();
    std::fs::rename(config.join("..data_tmp"), config.join("..data")).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The gateway's metrics exporter

/// nginx's Prometheus exporter as the gateway image carries it (Debian's
/// `prometheus-nginx-exporter`): `OPSC_NGINX_EXPORTER` when set, else what
/// `scripts/install-nginx --exporter-path` prints (it unpacks the package into the cache
/// first when missing). Under the rules of [`tools_present`]: missing, the test fails unless
/// `OPSC_SKIP_NGINX=1` outside CI.
pub fn exporter_binary() -> Option<PathBuf> {
    if std::env::var("OPSC_SKIP_NGINX").is_ok_and(|v| v == "1")
        && !std::env::var("CI").is_ok_and(|v| v == "true")
    {
        eprintln!("OPSC_SKIP_NGINX=1: skipping a test that needs the nginx exporter");
        return None;
    }
    let path = match std::env::var_os("OPSC_NGINX_EXPORTER") {
        Some(p) => PathBuf::from(p),
        None => {
            let out = Command::new(root().join("scripts/install-nginx"))
                .arg("--exporter-path")
                .output()
                .expect("scripts/install-nginx runs");
            assert!(
                out.status.success(),
                "scripts/install-nginx --exporter-path failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        }
    };
    let runs = Command::new(&path)
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        runs,
        "the nginx exporter {} does not run (Debian package prometheus-nginx-exporter; \
         scripts/install-nginx unpacks it), or outside CI OPSC_SKIP_NGINX=1 to skip",
        path.display()
    );
    Some(path)
}

/// The exporter running with the sidecar's own arguments, as the operator renders them,
/// except that its two ports move to free loopback ports: the scrape URI to the gateway's
/// status port, the listen address to `port` on 127.0.0.1.
pub struct Exporter {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

impl Exporter {
    pub fn start(binary: &Path, args: &[String], gateway: &Gateway) -> Exporter {
        let port = free_port();
        let status = format!("127.0.0.1:{}/", nginx::STATUS_PORT);
        let listen = format!(":{}", opsconductor_operator::build::gateway::METRICS_PORT);
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                a.replace(
                    &status,
                    &format!("127.0.0.1:{}/", gateway.layout.status_port),
                )
                .replace(
                    &format!("--web.listen-address={listen}"),
                    &format!("--web.listen-address=127.0.0.1:{port}"),
                )
            })
            .collect();
        assert!(
            args.iter()
                .any(|a| a.contains(&gateway.layout.status_port.to_string()))
                && args
                    .iter()
                    .any(|a| a.ends_with(&format!("127.0.0.1:{port}"))),
            "the sidecar's arguments changed shape: {args:?}"
        );
        Exporter::spawn(binary, &args, port, gateway.layout.path("exporter.log"))
    }

    /// The `requests` sidecar, `opsconductor-operator gateway-requests` (this build's binary),
    /// with the command the operator renders for it, except that its ports move: the UDP port
    /// it reads to the layout's request log port (where the gateway's nginx sends), its
    /// `/metrics` to `port` on 127.0.0.1.
    pub fn start_requests(command: &[String], gateway: &Gateway) -> Exporter {
        use opsconductor_operator::build::gateway::REQUEST_METRICS_PORT;
        use opsconductor_operator::build::nginx::request_metrics::REQUEST_LOG_PORT;
        let port = free_port();
        let args: Vec<String> = command[1..]
            .iter()
            .map(|a| {
                a.replace(
                    &format!("--udp=127.0.0.1:{REQUEST_LOG_PORT}"),
                    &format!("--udp=127.0.0.1:{}", gateway.layout.request_log_port),
                )
                .replace(
                    &format!("--listen=0.0.0.0:{REQUEST_METRICS_PORT}"),
                    &format!("--listen=127.0.0.1:{port}"),
                )
            })
            .collect();
        assert!(
            command[0] == "/opsconductor-operator"
                && args.contains(&format!(
                    "--udp=127.0.0.1:{}",
                    gateway.layout.request_log_port
                ))
                && args.contains(&format!("--listen=127.0.0.1:{port}")),
            "the sidecar's command changed shape: {command:?}"
        );
        Exporter::spawn(
            Path::new(env!("CARGO_BIN_EXE_opsconductor-operator")),
            &args,
            port,
            gateway.layout.path("requests.log"),
        )
    }

    fn spawn(binary: &Path, args: &[String], port: u16, log: PathBuf) -> Exporter {
        let child = Command::new(binary)
            .args(args)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("the exporter starts");
        let mut exporter = Exporter { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while exporter.scrape_text().is_none() {
            if let Ok(Some(status)) = exporter.child.try_wait() {
                panic!("the exporter exited ({status}):\n{}", exporter.log());
            }
            assert!(
                Instant::now() < deadline,
                "the exporter did not serve /metrics within 30 s:\n{}",
                exporter.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
        exporter
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as the kubelet stops a container: how it exited, or a failure if it was still
    /// running 10 s later (a container's first process that ignores SIGTERM keeps its pod
    /// terminating for the whole grace period).
    pub fn stop(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the exporter still runs 10 s after SIGTERM:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn scrape_text(&self) -> Option<String> {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "10"])
            .arg(format!("http://127.0.0.1:{}/metrics", self.port))
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// One scrape of `/metrics`: each sample without labels, by name.
    pub fn scrape(&self) -> BTreeMap<String, f64> {
        let text = self
            .scrape_text()
            .unwrap_or_else(|| panic!("the scrape failed:\n{}", self.log()));
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        terminate(&mut self.child);
        if thread::panicking() {
            eprintln!(
                "--- exporter log ---\n{}",
                self.log().chars().take(20_000).collect::<String>()
            );
        }
    }
}
