//! The gateway with real nginx: the configuration exactly as the operator renders it into the
//! gateway ConfigMap, run by the machine's nginx (Debian's 1.22) on loopback, with small HTTP
//! backends standing in for the services. How names are mapped and ports chosen is described
//! in `tests/gateway_support/mod.rs` and `docs/gateway.md`.
//!
//! Needs `nginx`, `openssl` and `curl` (and `unshare` as root for the startup-resolution
//! tests). Under `CI=true` a missing tool fails; elsewhere `OPSC_SKIP_NGINX=1` skips.

mod gateway_support;
#[path = "support/measured.rs"]
mod measured;

use std::io::Read;
use std::net::{Ipv4Addr, TcpStream};
use std::thread;
use std::time::Duration;

use gateway_support::{
    Backend, Gateway, Layout, OldTlsServer, Resolution, curl_many, rendered_config, tools_present,
};
use opsconductor_operator::build::{BuildOptions, nginx};
use opsconductor_operator::controller::config_status;

const HOST: &str = "shop.example.test";
const OTHER_HOST: &str = "api.shop.example.test";
const THUMBPRINT: &str = "9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI";
const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// The in-cluster name the gateway uses for service `name` of the test stacks.
fn fqdn(name: &str) -> String {
    format!("{name}.shop.svc.cluster.local")
}

fn options() -> BuildOptions {
    BuildOptions {
        acme_thumbprint: Some(THUMBPRINT.into()),
        ..BuildOptions::default()
    }
}

/// The test stack: two hosts, ACME, a 1 KiB body limit, two routed services (one at `/`),
/// an internal-only one, and optional extra lines under `gateway:` and `services:`.
fn stack_yaml(auth_port: u16, web_port: u16, gateway_extra: &str, services_extra: &str) -> String {
    format!(
        r#"apiVersion: opsconductor.io/v1alpha1
kind: OpsConductorStack
metadata: {{name: edge, namespace: shop}}
spec:
  gateway:
    hosts: [{HOST}, {OTHER_HOST}]
    clientMaxBodySize: 1k
    hsts: {{maxAgeSeconds: 63072000, includeSubDomains: true, preload: true}}
{gateway_extra}  tls:
    acme: {{directoryUrl: "https://acme.invalid/directory", acceptTermsOfService: true}}
  services:
    - {{name: auth, image: example/auth:1, port: {auth_port}, route: /api/v1/auth/}}
    - {{name: web, image: example/web:1, port: {web_port}, route: /}}
    - {{name: internal, image: example/internal:1, port: 9999}}
{services_extra}"#
    )
}

/// Two backends and a gateway sending to them by ClusterIP (the operator's mode; the
/// ClusterIP is 127.0.0.1 and each backend listens on its service's port).
struct Setup {
    auth: Backend,
    web: Backend,
    gw: Gateway,
}

fn setup(gateway_extra: &str) -> Setup {
    let auth = Backend::start("auth");
    let web = Backend::start("web");
    let yaml = stack_yaml(auth.port, web.port, gateway_extra, "");
    let gw = Gateway::start(&yaml, options(), Resolution::Loopback, &[HOST, OTHER_HOST]);
    Setup { auth, web, gw }
}

/// Requests to `paths` on [`HOST`] over HTTPS, HTTP/1.1, all at once (one curl, a connection
/// each), from a thread: its result is the status codes, a line each (only those: the output
/// of parallel transfers may interleave).
fn curl_at_once(
    gw: &Gateway,
    paths: impl Iterator<Item = String>,
) -> std::thread::JoinHandle<String> {
    let resolve = format!("{HOST}:{}:127.0.0.1", gw.layout.https_port);
    let cert = gw.layout.cert().display().to_string();
    let mut args: Vec<String> = [
        "-sS",
        "--parallel",
        "--parallel-max",
        "300",
        "--http1.1",
        "--resolve",
        &resolve,
        "--cacert",
        &cert,
        "-w",
        "%{http_code}\\n",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    for path in paths {
        args.extend(["-o".to_string(), "/dev/null".to_string()]);
        args.push(gw.https_url(HOST, &path));
    }
    std::thread::spawn(move || {
        let out = std::process::Command::new("curl")
            .args(&args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    })
}

fn assert_security_headers(r: &gateway_support::Response, what: &str) {
    let expect = [
        (
            "strict-transport-security",
            "max-age=63072000; includeSubDomains; preload",
        ),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "strict-origin-when-cross-origin"),
    ];
    for (name, value) in expect {
        assert_eq!(
            r.header(name),
            Some(value),
            "{what}: header {name} in {:?}",
            r.headers
        );
    }
    assert_eq!(
        r.header("server"),
        Some("nginx"),
        "{what}: no version shown"
    );
}

#[test]
fn each_route_reaches_its_backend_with_the_prefix_and_forwarded_headers() {
    if !tools_present(false) {
        return;
    }
    let s = setup("");
    let r = s.gw.curl_https(
        HOST,
        "/api/v1/auth/login?next=%2Fhome",
        &[
            "-H",
            "X-Forwarded-For: 203.0.113.9",
            "-H",
            "Forwarded: for=evil",
        ],
    );
    assert_eq!(r.status, 200, "{r:?}");
    let seen = r.json();
    assert_eq!(seen["backend"], "auth");
    assert_eq!(seen["path"], "/api/v1/auth/login?next=%2Fhome");
    let h = &seen["headers"];
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-host"], HOST);
    assert_eq!(h["host"], HOST);
    // The edge does not pass on what the client claims about earlier hops.
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert!(h.get("forwarded").is_none(), "{h}");
    // HTTP/1.1 upstream, Connection emptied (keepalive-capable), one id on both sides.
    assert!(h.get("connection").is_none(), "{h}");
    let id = h["x-request-id"].as_str().unwrap();
    assert_eq!(id.len(), 32, "{id}");
    assert_eq!(r.header("x-request-id"), Some(id));
    assert_eq!(r.header("x-powered-by"), None, "backend detail leaked");
    assert_security_headers(&r, "routed response");

    let r = s.gw.curl_https(OTHER_HOST, "/static/app.js", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["backend"], "web");
    assert_eq!(r.json()["path"], "/static/app.js");
    assert_eq!(r.json()["headers"]["host"], OTHER_HOST);
    // The longest prefix wins: /api/v1/authx is not under /api/v1/auth/.
    assert_eq!(
        s.gw.curl_https(HOST, "/api/v1/authx", &[]).json()["backend"],
        "web"
    );
    assert!(s.auth.connections() >= 1 && s.web.connections() >= 1);
    // Internal-only services have no route and no upstream.
    let conf = std::fs::read_to_string(s.gw.layout.config_path()).unwrap();
    assert!(!conf.contains(":9999;"), "{conf}");
    // Nothing is resolved: the routes go to the ClusterIPs written into the file.
    assert!(!conf.contains(".svc.cluster.local") && !conf.contains("resolver"));
}

#[test]
fn plain_http_redirects_everything_but_acme_challenges_and_health() {
    if !tools_present(false) {
        return;
    }
    let s = setup("");
    let r = s.gw.curl_http(HOST, "/api/v1/auth/login?x=1&y=2");
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some("https://shop.example.test/api/v1/auth/login?x=1&y=2")
    );
    let r = s.gw.curl_http(OTHER_HOST, "/");
    assert_eq!(r.status, 308);
    assert_eq!(r.header("location"), Some("https://api.shop.example.test/"));

    let token = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0";
    let r =
        s.gw.curl_http(HOST, &format!("/.well-known/acme-challenge/{token}"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, format!("{token}.{THUMBPRINT}"));
    // Not a token: not answered, and not redirected either.
    let r = s.gw.curl_http(HOST, "/.well-known/acme-challenge/a/b");
    assert_eq!(r.status, 308, "a nested path is no challenge: redirected");
    let r = s.gw.curl_http(HOST, "/healthz");
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    assert_eq!(s.auth.connections() + s.web.connections(), 0);
}

#[test]
fn acme_path_without_a_thumbprint_is_not_redirected() {
    if !tools_present(false) {
        return;
    }
    let yaml = stack_yaml(1, 2, "", "");
    let gw = Gateway::start(
        &yaml,
        BuildOptions::default(),
        Resolution::Loopback,
        &[HOST, OTHER_HOST],
    );
    let r = gw.curl_http(HOST, "/.well-known/acme-challenge/abc");
    assert_eq!(r.status, 404);
    assert_eq!(gw.curl_http(HOST, "/x").status, 308);
}

#[test]
fn security_headers_are_on_every_https_response() {
    if !tools_present(false) {
        return;
    }
    let s = setup("");
    let ok = s.gw.curl_https(HOST, "/", &[]);
    assert_eq!(ok.status, 200);
    assert_security_headers(&ok, "200 from a backend");
    let big = "x".repeat(4096);
    let too_big =
        s.gw.curl_https(HOST, "/upload", &["--data-binary", &big, "-H", "Expect:"]);
    assert_eq!(too_big.status, 413);
    assert_security_headers(&too_big, "413");
    let wrong_host =
        s.gw.curl_https(HOST, "/", &["-H", &format!("Host: {OTHER_HOST}")]);
    assert_eq!(wrong_host.status, 421);
    assert_security_headers(&wrong_host, "421");
    let h2 = s.gw.curl_https(HOST, "/", &["--http2"]);
    assert_eq!(h2.version, "HTTP/2");
    assert_security_headers(&h2, "HTTP/2");
}

#[test]
fn only_tls_1_2_and_1_3_with_the_chosen_ciphers_and_curves() {
    if !tools_present(false) {
        return;
    }
    let s = setup("");
    let sni = ["-servername", HOST];
    for (flag, name) in [("-tls1", "TLS 1.0"), ("-tls1_1", "TLS 1.1")] {
        // The client can speak it: a server that allows it completes the handshake.
        let old = OldTlsServer::start(&s.gw.layout, flag);
        let (ok, out) = gateway_support::s_client(
            &format!("127.0.0.1:{}", old.port),
            &s.gw.layout.permissive_openssl_conf(),
            &[flag, "-cipher", "DEFAULT@SECLEVEL=0", "-servername", HOST],
            b"",
        );
        assert!(
            ok,
            "control: {name} against a permissive server failed:\n{out}"
        );
        let (ok, out) = s.gw.s_client(
            &[flag, "-cipher", "DEFAULT@SECLEVEL=0", sni[0], sni[1]],
            b"",
        );
        assert!(!ok, "{name} was accepted:\n{out}");
    }
    let (ok, out) = s.gw.s_client(&["-tls1_2", "-brief", sni[0], sni[1]], b"");
    assert!(ok, "{out}");
    assert!(out.contains("Protocol version: TLSv1.2"), "{out}");
    let suite = out
        .lines()
        .find_map(|l| l.strip_prefix("Ciphersuite: "))
        .unwrap_or_else(|| panic!("no suite in {out}"));
    assert!(
        nginx::TLS12_CIPHERS.split(':').any(|c| c == suite),
        "{suite} is not in the intermediate list"
    );
    assert!(out.contains("X25519"), "X25519 preferred:\n{out}");
    let (ok, out) = s.gw.s_client(&["-tls1_3", "-brief", sni[0], sni[1]], b"");
    assert!(ok, "{out}");
    assert!(out.contains("Protocol version: TLSv1.3"), "{out}");
    // A CBC suite from outside the intermediate list is refused.
    let (ok, out) = s.gw.s_client(
        &[
            "-tls1_2",
            "-cipher",
            "ECDHE-ECDSA-AES128-SHA",
            sni[0],
            sni[1],
        ],
        b"",
    );
    assert!(!ok, "a non-AEAD suite was accepted:\n{out}");
    // Curves: P-256 accepted (P-384 too: a_client_with_only_p384_completes_the_handshake),
    // P-521 alone refused.
    let (ok, out) = s.gw.s_client(
        &["-tls1_3", "-groups", "P-256", "-brief", sni[0], sni[1]],
        b"",
    );
    assert!(ok && out.contains("prime256v1"), "{out}");
    let (ok, out) =
        s.gw.s_client(&["-tls1_3", "-groups", "P-521", sni[0], sni[1]], b"");
    assert!(!ok, "P-521 was accepted:\n{out}");
}

#[test]
fn http2_is_negotiated_with_alpn() {
    if !tools_present(false) {
        return;
    }
    let s = setup("");
    let (ok, out) =
        s.gw.s_client(&["-alpn", "h2,http/1.1", "-servername", HOST], b"");
    assert!(ok, "{out}");
    assert!(out.contains("ALPN protocol: h2"), "{out}");
    let r = s.gw.curl_https(HOST, "/api/v1/auth/x", &["--http2"]);
    assert_eq!((r.version.as_str(), r.status), ("HTTP/2", 200));
    // Upstream stays HTTP/1.1.
    assert_eq!(r.json()["backend"], "auth");
}

#[test]
fn unknown_or_missing_sni_is_refused_in_the_handshake_and_host_must_match_sni() {
    if !tools_present(false) {
        return;
    }
    let s = setup("");
    let (ok, out) = s.gw.s_client(&["-servername", "evil.example.test"], b"");
    assert!(!ok, "unknown SNI accepted:\n{out}");
    assert!(
        !out.contains("BEGIN CERTIFICATE") && !out.contains("subject="),
        "a certificate was shown for an unknown name:\n{out}"
    );
    let (ok, out) = s.gw.s_client(&["-noservername"], b"");
    assert!(!ok, "missing SNI accepted:\n{out}");
    let (ok, out) = s.gw.s_client(&["-servername", OTHER_HOST], b"");
    assert!(ok, "a configured host was refused:\n{out}");
    // DNS names are case-insensitive: an upper-case SNI with a lower-case Host is one host.
    let request = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
    let (_, out) = s.gw.s_client(
        &["-quiet", "-servername", &HOST.to_ascii_uppercase()],
        request.as_bytes(),
    );
    assert!(out.contains("HTTP/1.1 200 OK"), "{out}");
    let reached = s.web.connections();

    let r =
        s.gw.curl_https(HOST, "/", &["-H", "Host: evil.example.test"]);
    assert_eq!(r.status, 421);
    let r =
        s.gw.curl_https(HOST, "/", &["-H", &format!("Host: {OTHER_HOST}")]);
    assert_eq!(r.status, 421, "another configured host over this session");
    assert_eq!(s.web.connections(), reached, "a 421 reached a backend");
}

#[test]
fn a_body_above_the_limit_gets_413() {
    if !tools_present(false) {
        return;
    }
    let s = setup("");
    let small = "y".repeat(1000);
    let r = s.gw.curl_https(
        HOST,
        "/api/v1/auth/upload",
        &["--data-binary", &small, "-H", "Expect:"],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], 1000);
    let big = "y".repeat(1025);
    let r = s.gw.curl_https(
        HOST,
        "/api/v1/auth/upload",
        &["--data-binary", &big, "-H", "Expect:"],
    );
    assert_eq!(r.status, 413);
    assert_eq!(s.auth.connections(), 1, "the large body never reached auth");
}

#[test]
fn a_websocket_upgrade_passes_through() {
    if !tools_present(false) {
        return;
    }
    let s = setup("");
    let request = format!(
        "GET /api/v1/auth/socket HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\nping\n"
    );
    let (_, out) = s.gw.s_client(
        &["-quiet", "-servername", HOST, "-alpn", "http/1.1"],
        request.as_bytes(),
    );
    assert!(out.contains("HTTP/1.1 101 Switching Protocols"), "{out}");
    assert!(out.contains("X-Backend: auth"), "{out}");
    assert!(out.contains("X-Saw-Connection-Upgrade: true"), "{out}");
    assert!(
        out.contains("echo:ping"),
        "no data through the tunnel:\n{out}"
    );
}

/// Request smuggling through `Upgrade` (issue 14, item 2): a backend that accepts cleartext
/// HTTP/2 upgrades would turn the client's connection into a raw tunnel past the route
/// prefix, the Host check, the rate limit, the access log and the header rewriting. Only
/// `websocket` upgrades may pass; any other `Upgrade` is removed before the request goes on.
#[test]
fn only_websocket_upgrades_pass_and_h2c_never_reaches_a_backend() {
    if !tools_present(false) {
        return;
    }
    let s = setup("");
    for upgrade in ["h2c", "H2C", "websocket, h2c", "h2c, websocket"] {
        let request = format!(
            "GET /api/v1/auth/x HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: {upgrade}\r\n\
             Connection: Upgrade, HTTP2-Settings, close\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        );
        let (_, out) = s.gw.s_client(
            &["-quiet", "-servername", HOST, "-alpn", "http/1.1"],
            request.as_bytes(),
        );
        assert!(
            !out.contains(" 101 ") && !out.contains("h2c-tunnel-open"),
            "Upgrade: {upgrade} opened a tunnel to the backend:\n{out}"
        );
        assert!(out.contains("HTTP/1.1 200"), "Upgrade: {upgrade}: {out}");
        let body = &out[out.find('{').expect("a JSON body")..];
        let body = &body[..=body.rfind('}').unwrap()];
        let seen: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(seen["backend"], "auth");
        let h = &seen["headers"];
        assert!(
            h.get("upgrade").is_none(),
            "Upgrade: {upgrade} reached the backend: {h}"
        );
        assert!(h.get("connection").is_none(), "{h}");
    }
    // Still passed: a WebSocket upgrade, whatever its case.
    let request = format!(
        "GET /api/v1/auth/socket HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: WebSocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\nping\n"
    );
    let (_, out) = s.gw.s_client(
        &["-quiet", "-servername", HOST, "-alpn", "http/1.1"],
        request.as_bytes(),
    );
    assert!(out.contains("HTTP/1.1 101 Switching Protocols"), "{out}");
    assert!(
        out.contains("echo:ping"),
        "no data through the tunnel:\n{out}"
    );
}

/// Issue 14, section 8: the plain-HTTP redirect goes only to the stack's own hosts (it was an
/// open redirect to whatever Host the client sent).
#[test]
fn plain_http_redirects_only_to_the_stacks_hosts() {
    if !tools_present(false) {
        return;
    }
    let s = setup("");
    for host in [
        "evil.example",
        "shop.example.test.evil.example",
        "SHOP.EXAMPLE.TEST.evil",
    ] {
        let r = s.gw.curl_http(host, "/login");
        assert_ne!(r.status, 308, "Host {host}: {r:?}");
        assert!(
            r.header("location").is_none(),
            "Host {host} was redirected: {:?}",
            r.header("location")
        );
    }
    // The stack's hosts, in any case, still are.
    let r = s.gw.curl_http("Shop.Example.Test", "/a?b=c");
    assert_eq!(r.status, 308, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some("https://shop.example.test/a?b=c")
    );
    // Probes and challenges do not depend on the Host.
    let r = s.gw.curl_http("10.0.0.7:8080", "/healthz");
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
}

/// Issue 14, section 8: redirects nginx makes by itself (a route without its trailing slash)
/// named the pod's port (8443 in a pod; the test's port here), which no client can reach.
#[test]
fn nginx_s_own_redirects_name_no_port() {
    if !tools_present(false) {
        return;
    }
    let s = setup("");
    let r = s.gw.curl_https(HOST, "/api/v1/auth", &[]);
    assert_eq!(r.status, 301, "{r:?}");
    let location = r.header("location").unwrap_or_default();
    let port = s.gw.layout.https_port.to_string();
    assert!(
        !location.contains(&format!(":{port}")) && !location.contains(":8443"),
        "the redirect names the listening port: {location}"
    );
    assert!(location.ends_with("/api/v1/auth/"), "{location}");
    assert_security_headers(&r, "redirect");
}

/// Issue 14, section 8: a TLS 1.3 client offering only P-384 for the key exchange (some
/// FIPS-restricted clients) completes the handshake (before: refused, see the curve checks of
/// only_tls_1_2_and_1_3_with_the_chosen_ciphers_and_curves). Over TLS 1.2 the groups a client
/// offers also bind the curve of an ECDSA certificate (RFC 8422), so a P-384-only client there
/// needs a P-384 certificate (`keyAlgorithm: ECDSA-P384`), whatever the server offers.
#[test]
fn a_client_with_only_p384_completes_the_handshake() {
    if !tools_present(false) {
        return;
    }
    let s = setup("");
    let (ok, out) = s.gw.s_client(
        &["-servername", HOST, "-groups", "P-384", "-tls1_3", "-brief"],
        b"",
    );
    assert!(
        ok && (out.contains("P-384") || out.contains("secp384r1")),
        "TLS 1.3 with only P-384 offered:\n{out}"
    );
}

/// Issue 14, section 8: every `clientMaxBodySize` that validation accepts is one nginx
/// accepts, and `0` (nginx: no limit at all) is refused.
#[test]
fn every_accepted_body_size_loads_in_nginx_and_zero_is_refused() {
    if !tools_present(false) {
        return;
    }
    let stack = |size: &str| {
        format!(
            r#"apiVersion: opsconductor.io/v1alpha1
kind: OpsConductorStack
metadata: {{name: edge, namespace: shop}}
spec:
  gateway:
    hosts: [{HOST}]
    clientMaxBodySize: "{size}"
  tls: {{secretName: own}}
  services:
    - {{name: web, image: example/web:1, route: /}}
"#
        )
    };
    let valid = |size: &str| {
        opsconductor_operator::render::parse_stack("t", &stack(size))
            .ok()
            .and_then(|s| opsconductor_operator::validate::validate(&s, "shop").ok())
            .is_some()
    };
    for size in ["0", "0k", "00m"] {
        assert!(
            !valid(size),
            "{size:?} switches the limit off and must be refused"
        );
    }
    let mut accepted = 0;
    for size in [
        "1",
        "512k",
        "10m",
        "1g",
        "1G",
        "100g",
        "8589934591g",
        "8589934592g",
        "999999999999",
        "999999999999g",
        "9223372036854775807",
        "9223372036854775808",
    ] {
        if !valid(size) {
            continue;
        }
        accepted += 1;
        let layout = Layout::new();
        // The operator's mode (ClusterIPs): `nginx -t` needs no DNS.
        let in_cluster = BuildOptions {
            upstreams: gateway_support::loopback_upstreams(&stack(size)),
            ..BuildOptions::default()
        };
        layout.install_config(&rendered_config(&stack(size), &in_cluster));
        layout.make_certificate(&[HOST]);
        let out = layout.nginx_test(None);
        assert!(
            out.status.success(),
            "validation accepts clientMaxBodySize {size:?}, nginx does not:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(accepted >= 5, "ordinary sizes must stay valid");
}

/// Issue 14, item 6 (part): one client address cannot take every connection of a gateway pod.
/// It may have at most 256 requests in progress at a time (HTTP/2 streams count one each);
/// beyond that it gets 429 at the edge, while other clients are still served.
#[test]
fn one_client_address_cannot_hold_more_than_256_requests() {
    if !tools_present(false) {
        return;
    }
    const LIMIT: usize = 256;
    let s = setup("");
    // LIMIT requests at once from 127.0.0.1, each held by the backend until released.
    let holding = curl_at_once(&s.gw, (0..LIMIT).map(|i| format!("/hold?{i}")));
    // A hang guard, not a timing assertion.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while s.web.held() < LIMIT && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(s.web.held(), LIMIT, "the held requests did not all arrive");
    // One more from the same address is refused at the edge ...
    let r = s.gw.curl_https(HOST, "/one-more", &[]);
    if r.status != 429 {
        // Seen once in about 20 runs under heavy load: say what the held requests saw, so that
        // the next occurrence tells a limit that did not hold from a held request that nginx
        // had already finished (its client gone) while the backend still counted it.
        s.web.release();
        let codes = holding.join().unwrap();
        let mut seen = std::collections::BTreeMap::new();
        for c in codes.lines() {
            *seen.entry(c.to_string()).or_insert(0) += 1;
        }
        panic!(
            "one address held {LIMIT} requests and got another: {r:?}\nthe held requests' statuses: {seen:?}\nnginx's error log:\n{}",
            s.gw.error_log()
        );
    }
    // ... while another client is served.
    let r =
        s.gw.curl_https(HOST, "/other-client", &["--interface", "127.0.0.2"]);
    assert_eq!(r.status, 200, "{r:?}");
    s.web.release();
    let codes = holding.join().unwrap();
    assert_eq!(
        codes.lines().filter(|c| *c == "200").count(),
        LIMIT,
        "the held requests: {codes}"
    );
}

#[test]
fn a_burst_beyond_the_rate_limit_gets_429_with_retry_after() {
    if !tools_present(false) {
        return;
    }
    let s = setup("    rateLimit: {requestsPerSecond: 1, burst: 3}\n");
    let url = s.gw.https_url(HOST, "/api/v1/auth/x");
    let resolve = format!("{HOST}:{}:127.0.0.1", s.gw.layout.https_port);
    let cert = s.gw.layout.cert().display().to_string();
    let mut args = vec!["--resolve", &resolve, "--cacert", &cert];
    // Forty requests on one connection, as fast as curl sends them: at 1 r/s with a burst
    // of 3, at most 3 + (seconds elapsed) of them can pass.
    for _ in 0..40 {
        args.push(&url);
    }
    let responses = curl_many(&args);
    assert_eq!(responses.len(), 40);
    let passed = responses.iter().filter(|r| r.status == 200).count();
    let limited: Vec<_> = responses.iter().filter(|r| r.status == 429).collect();
    assert!(passed >= 3, "the burst must pass: {passed}");
    assert_eq!(passed + limited.len(), 40);
    assert!(!limited.is_empty(), "nothing was limited");
    for r in &limited {
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_security_headers(r, "429");
    }
    for r in responses.iter().filter(|r| r.status == 200) {
        assert_eq!(r.header("retry-after"), None);
    }
    assert!(s.auth.connections() >= 1);
}

#[test]
fn a_service_without_an_address_answers_503_alone_and_is_served_after_a_reload() {
    if !tools_present(false) {
        return;
    }
    let auth = Backend::start("auth");
    let web = Backend::start("web");
    let ghost = Backend::start("ghost");
    let yaml = stack_yaml(
        auth.port,
        web.port,
        "",
        &format!(
            "    - {{name: ghost, image: example/ghost:1, port: {}, route: /ghost/}}\n",
            ghost.port
        ),
    );
    // The operator's cache has no Service "ghost" yet: no address for it.
    let known: std::collections::BTreeMap<String, std::net::IpAddr> = ["auth", "web"]
        .into_iter()
        .map(|n| (n.to_string(), LOCALHOST.into()))
        .collect();
    let gw = Gateway::start(
        &yaml,
        options(),
        Resolution::ClusterIps(known.clone()),
        &[HOST],
    );
    assert_eq!(gw.curl_https(HOST, "/api/v1/auth/a", &[]).status, 200);
    assert_eq!(gw.curl_https(HOST, "/", &[]).status, 200);
    let r = gw.curl_https(HOST, "/ghost/a", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    assert_security_headers(&r, "503");
    assert_eq!(ghost.connections(), 0);
    // The Service appears; the operator writes its ClusterIP; the pod reloads nginx.
    let mut all = known;
    all.insert("ghost".into(), LOCALHOST.into());
    let rendered = rendered_config(
        &yaml,
        &BuildOptions {
            upstreams: opsconductor_operator::build::Upstreams::ClusterIps(all),
            ..options()
        },
    );
    gw.layout.install_config(&rendered);
    gw.reload();
    // The old workers may answer a request or two more, and one that accepted the connection
    // as it began its graceful shutdown closes it unanswered (curl: "Error in the HTTP2
    // framing layer", seen once in a full run; a client may retry such a request, RFC 9113
    // section 8.7; the reload tests count those). Polled, a hang guard only.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let r = gw.try_curl_https(HOST, "/ghost/a");
        if let Ok(r) = &r
            && r.status == 200
        {
            assert_eq!(r.json()["backend"], "ghost");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ghost never became reachable: {r:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(gw.curl_https(HOST, "/api/v1/auth/b", &[]).status, 200);
}

#[test]
fn startup_resolution_keeps_upstream_connections_alive_but_needs_every_name() {
    if !tools_present(true) {
        return;
    }
    let auth = Backend::start("auth");
    let web = Backend::start("web");
    let yaml = stack_yaml(auth.port, web.port, "", "");
    let hosts = vec![(fqdn("auth"), LOCALHOST), (fqdn("web"), LOCALHOST)];
    let gw = Gateway::start(&yaml, options(), Resolution::Hosts(hosts.clone()), &[HOST]);
    let resolve = format!("{HOST}:{}:127.0.0.1", gw.layout.https_port);
    let cert = gw.layout.cert().display().to_string();
    let url = gw.https_url(HOST, "/api/v1/auth/k");
    let mut args = vec!["--resolve", &resolve, "--cacert", &cert];
    for _ in 0..20 {
        args.push(&url);
    }
    let responses = curl_many(&args);
    assert!(responses.iter().all(|r| r.status == 200));
    // One client connection, one nginx worker: the upstream connection is reused.
    assert!(
        auth.connections() <= 2,
        "20 requests opened {} upstream connections",
        auth.connections()
    );
    let first = responses[0].json()["connection"].clone();
    assert_eq!(responses[19].json()["connection"], first);

    // The price: a name that does not resolve stops nginx from starting at all.
    let layout = Layout::new();
    layout.install_config(&rendered_config(&yaml, &options()));
    layout.make_certificate(&[HOST]);
    let out = layout.nginx_test(Some(&hosts[..1]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("host not found in upstream"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 15: in the operator's mode, N requests from many client connections reuse a few
/// kept-alive upstream connections (at most one per nginx worker when requests come one at a
/// time), counted at the backend. The per-request DNS mode this replaced opened one per
/// request (this test, on it: 60 connections for 60 requests).
#[test]
fn requests_reuse_far_fewer_upstream_connections_than_there_are_requests() {
    if !tools_present(false) {
        return;
    }
    let s = setup("");
    let resolve = format!("{HOST}:{}:127.0.0.1", s.gw.layout.https_port);
    let cert = s.gw.layout.cert().display().to_string();
    let url = s.gw.https_url(HOST, "/api/v1/auth/k");
    // Six client connections (six curl runs, one after the other), ten requests each.
    let mut requests = 0;
    for _ in 0..6 {
        let mut args = vec!["--resolve", &resolve, "--cacert", &cert];
        for _ in 0..10 {
            args.push(&url);
        }
        let responses = curl_many(&args);
        assert!(responses.iter().all(|r| r.status == 200), "{responses:?}");
        requests += responses.len();
    }
    assert_eq!(requests, 60);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let opened = s.auth.connections();
    assert!(
        opened <= workers,
        "{requests} requests opened {opened} upstream connections ({workers} nginx workers)"
    );
    assert!(opened >= 1);
}

/// Issue 15: more requests at once than nginx's usual upstream `keepalive 32` keep their
/// upstream connections for the next ones. One nginx worker (a CPU limit of 1), and rounds of
/// 48 requests held by the backend at the same time, so that the worker needs 48 upstream
/// connections at once; between rounds they are idle. With a cap of 32, every round after the
/// first opened 16 new connections (the ones beyond the cap were closed after their request);
/// the operator's cap keeps all of them, so a round opens none.
#[test]
fn a_burst_above_nginxs_usual_keepalive_cap_keeps_its_upstream_connections() {
    if !tools_present(false) {
        return;
    }
    const AT_ONCE: usize = 48;
    const ROUNDS: usize = 4;
    // nginx closes an upstream connection idle for 4 s; a round that began later than this
    // after the previous one's answers says nothing about the cap.
    const QUICK: std::time::Duration = std::time::Duration::from_secs(3);
    let s = setup("    resources: {limits: {cpu: \"1\"}}\n");
    let config = std::fs::read_to_string(s.gw.layout.config_path()).unwrap();
    assert!(config.contains("worker_processes 1;"), "{config}");
    let mut answered_at: Option<std::time::Instant> = None;
    let mut counted = Vec::new();
    for round in 0..ROUNDS {
        let before = s.web.connections();
        let holding = curl_at_once(&s.gw, (0..AT_ONCE).map(|i| format!("/hold?{round}-{i}")));
        // A hang guard, not a timing assertion.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while s.web.held() < AT_ONCE && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(
            s.web.held(),
            AT_ONCE,
            "round {round}: the held requests did not all arrive"
        );
        let opened = s.web.connections() - before;
        let gap = answered_at.map(|t| t.elapsed());
        s.web.release();
        let codes = holding.join().unwrap();
        answered_at = Some(std::time::Instant::now());
        s.web.hold_again();
        assert_eq!(
            codes.lines().filter(|c| *c == "200").count(),
            AT_ONCE,
            "round {round}: {codes}"
        );
        if round == 0 {
            assert_eq!(
                opened, AT_ONCE,
                "the first round needs a connection per request"
            );
        } else if gap.is_some_and(|g| g < QUICK) {
            counted.push((round, opened));
        }
    }
    assert!(
        !counted.is_empty(),
        "no round began within {QUICK:?} of the previous one's answers (a machine this slow \
         cannot show the cap)"
    );
    for (round, opened) in &counted {
        assert!(
            *opened <= 2,
            "round {round}: {AT_ONCE} requests at once opened {opened} new upstream connections \
             although {AT_ONCE} were idle (the idle ones beyond the keep-alive cap were closed)"
        );
    }
}

#[test]
fn the_access_log_is_one_json_object_per_request_on_stdout() {
    if !tools_present(false) {
        return;
    }
    let s = setup("");
    s.gw.curl_https(
        HOST,
        "/api/v1/auth/log-me?q=\"x\"",
        &["-A", "agent \"quoted\""],
    );
    s.gw.curl_http(HOST, "/plain");
    // nginx writes the line after the response; poll the file briefly.
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines =
            s.gw.access_log()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>();
        if lines.len() >= 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(lines.len(), 2, "{lines:?}");
    let entries: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let tls = &entries[0];
    assert_eq!(tls["status"], 200);
    // No trusted proxies: the client is the TCP peer.
    assert_eq!(tls["remote_addr"], "127.0.0.1");
    assert_eq!(tls["peer_addr"], "127.0.0.1");
    assert_eq!(tls["host"], HOST);
    assert_eq!(tls["sni"], HOST);
    assert_eq!(tls["tls"], "TLSv1.3");
    assert_eq!(tls["user_agent"], "agent \"quoted\"");
    assert_eq!(tls["upstream_status"], "200");
    assert_eq!(entries[1]["status"], 308);
    assert!(
        !s.gw.error_log().contains("[error]"),
        "{}",
        s.gw.error_log()
    );
}

#[test]
fn tls_1_2_and_1_3_sessions_resume_from_the_cache_without_stateless_tickets() {
    if !tools_present(false) {
        return;
    }
    let s = setup("");
    let sess = s.gw.layout.path("session.pem");
    let sess = sess.to_str().unwrap();
    let (ok, out) =
        s.gw.s_client(&["-tls1_2", "-servername", HOST, "-sess_out", sess], b"");
    assert!(ok, "{out}");
    assert!(
        !out.contains("TLS session ticket:"),
        "a stateless ticket was issued:\n{out}"
    );
    let (ok, out) =
        s.gw.s_client(&["-tls1_2", "-servername", HOST, "-sess_in", sess], b"");
    assert!(ok, "{out}");
    assert!(out.contains("Reused, TLSv1.2"), "not resumed:\n{out}");

    // TLS 1.3: with stateless tickets off, OpenSSL sends tickets that name a cache entry.
    // A request keeps the first connection open until the ticket has arrived.
    let request = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
    let sess13 = s.gw.layout.path("session13.pem");
    let sess13 = sess13.to_str().unwrap();
    let (_, out) = s.gw.s_client(
        &[
            "-tls1_3",
            "-servername",
            HOST,
            "-sess_out",
            sess13,
            "-ign_eof",
        ],
        request.as_bytes(),
    );
    assert!(out.contains("HTTP/1.1 200 OK"), "{out}");
    let (_, out) = s.gw.s_client(
        &[
            "-tls1_3",
            "-servername",
            HOST,
            "-sess_in",
            sess13,
            "-ign_eof",
        ],
        request.as_bytes(),
    );
    assert!(out.contains("Reused, TLSv1.3"), "not resumed:\n{out}");
    assert!(out.contains("HTTP/1.1 200 OK"), "{out}");
}

#[test]
fn nginx_accepts_the_configuration_of_every_example() {
    if !tools_present(true) {
        return;
    }
    let mut examples: Vec<_> = std::fs::read_dir(gateway_support::root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 3);
    let mut stacks: Vec<(String, String)> = examples
        .iter()
        .map(|p| (p.display().to_string(), std::fs::read_to_string(p).unwrap()))
        .collect();
    // And the largest gateway the spec allows: 100 hosts, the longest a DNS name can be.
    let label = "a".repeat(63);
    let hosts: Vec<String> = (0..100)
        .map(|i| {
            format!(
                "h{i:02}{}.{label}.{label}.{}.com",
                &label[..60],
                &label[..57]
            )
        })
        .collect();
    assert_eq!(hosts[0].len(), 253);
    stacks.push((
        "100 hosts of 253 characters".into(),
        format!(
            "apiVersion: opsconductor.io/v1alpha1\nkind: OpsConductorStack\nmetadata: {{name: big}}\n\
             spec:\n  gateway:\n    hosts: [{}]\n  tls: {{secretName: c}}\n  services:\n\
             \x20   - {{name: web, image: x, route: /}}\n",
            hosts.join(", ")
        ),
    ));
    for (name, yaml) in &stacks {
        let stack = opsconductor_operator::render::parse_stack(name, yaml).unwrap();
        let model = opsconductor_operator::validate::validate(&stack, "default").unwrap();
        let names: Vec<(String, Ipv4Addr)> = model
            .services
            .iter()
            .map(|s| {
                (
                    format!("{}.{}.svc.cluster.local", s.name, model.namespace),
                    LOCALHOST,
                )
            })
            .collect();
        let hosts: Vec<&str> = model.gateway.hosts.iter().map(String::as_str).collect();
        let in_cluster = BuildOptions {
            upstreams: gateway_support::loopback_upstreams(yaml),
            ..options()
        };
        for (mode, opts, hosts_file) in [
            ("ClusterIPs", in_cluster, None),
            ("startup resolution", options(), Some(&names[..])),
        ] {
            let layout = Layout::new();
            layout.install_config(&rendered_config(yaml, &opts));
            layout.make_certificate(&hosts[..hosts.len().min(20)]);
            let out = layout.nginx_test(hosts_file);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && stderr.contains("test is successful"),
                "{name} ({mode}): nginx -t failed:\n{stderr}"
            );
            // nginx 1.25.1+ warns that `listen ... http2` is deprecated; the replacement
            // (`http2 on;`) does not exist in 1.22 (docs/gateway.md). Nothing else may warn.
            let warnings: Vec<&str> = stderr
                .lines()
                .filter(|l| l.contains("[warn]") || l.contains("[emerg]"))
                .filter(|l| !l.contains("\"listen ... http2\" directive is deprecated"))
                .collect();
            assert!(
                warnings.is_empty(),
                "{name} ({mode}): nginx warns:\n{stderr}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The edge: header hygiene and the client's address (issue 18)

/// The first `n` access log entries, once nginx has written them (it writes after the
/// response; polled briefly).
fn access_entries(gw: &Gateway, n: usize) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    for _ in 0..200 {
        lines = gw
            .access_log()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>();
        if lines.len() >= n {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert!(lines.len() >= n, "{n} entries expected: {lines:?}");
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The client address the service was told: `X-Real-IP` and `X-Forwarded-For` as the backend
/// received them (they must agree: the gateway sets both from one address).
fn client_seen_by_service(r: &gateway_support::Response) -> String {
    assert_eq!(r.status, 200, "{r:?}");
    let h = &r.json()["headers"];
    let real = h["x-real-ip"].as_str().unwrap_or_default().to_string();
    assert_eq!(h["x-forwarded-for"].as_str(), Some(real.as_str()), "{h}");
    real
}

#[test]
fn headers_the_inside_trusts_never_come_from_outside() {
    if !tools_present(false) {
        return;
    }
    let spoofed = [
        "-H",
        "X-Internal: true",
        "-H",
        "X-Service: jobs",
        "-H",
        "X_Internal: true",
        "-H",
        "X-User-Id: 1",
        "-H",
        "X-TENANT-ID: other",
        "-H",
        "X-Service-Version: kept",
        "-H",
        "Authorization: Bearer token",
    ];
    // The seed's two headers always; the spec's list on top, in any case.
    for (extra, stripped, kept) in [
        (
            "",
            &["x-internal", "x-service", "x_internal"][..],
            &[
                "x-user-id",
                "x-tenant-id",
                "x-service-version",
                "authorization",
            ][..],
        ),
        (
            "    stripRequestHeaders: [X-User-Id, x-tenant-id]\n",
            &[
                "x-internal",
                "x-service",
                "x_internal",
                "x-user-id",
                "x-tenant-id",
            ][..],
            &["x-service-version", "authorization"][..],
        ),
    ] {
        let s = setup(extra);
        for proto in ["--http1.1", "--http2"] {
            let mut args = vec![proto];
            args.extend_from_slice(&spoofed);
            let r = s.gw.curl_https(HOST, "/api/v1/auth/me", &args);
            assert_eq!(r.status, 200, "{r:?}");
            let h = &r.json()["headers"];
            for name in stripped {
                assert!(
                    h.get(name).is_none(),
                    "{extra:?} {proto}: {name} reached the service: {h}"
                );
            }
            for name in kept {
                assert!(
                    h.get(name).is_some(),
                    "{extra:?} {proto}: {name} was removed: {h}"
                );
            }
            // Every route: the root route too.
            let r = s.gw.curl_https(OTHER_HOST, "/", &args);
            assert_eq!(r.json()["backend"], "web");
            assert!(r.json()["headers"].get("x-internal").is_none(), "{r:?}");
        }
    }
}

#[test]
fn x_forwarded_for_is_believed_only_from_trusted_proxies() {
    if !tools_present(false) {
        return;
    }
    let ask = |s: &Setup, from: &str, xff: &str| {
        client_seen_by_service(&s.gw.curl_https(
            HOST,
            "/api/v1/auth/who",
            &[
                "--interface",
                from,
                "-H",
                &format!("X-Forwarded-For: {xff}"),
            ],
        ))
    };
    // Nothing is trusted by default: the peer's address stands, whatever the client claims.
    let s = setup("");
    assert_eq!(ask(&s, "127.0.0.2", "203.0.113.7"), "127.0.0.2");
    drop(s);

    let s = setup("    trustedProxies: [127.0.0.2/32, 10.0.0.0/8]\n");
    // From the trusted proxy: the rightmost address that is not itself a trusted proxy.
    assert_eq!(ask(&s, "127.0.0.2", "203.0.113.7"), "203.0.113.7");
    assert_eq!(
        ask(&s, "127.0.0.2", "198.51.100.1, 203.0.113.7"),
        "203.0.113.7"
    );
    assert_eq!(ask(&s, "127.0.0.2", "203.0.113.7, 10.1.2.3"), "203.0.113.7");
    // From anyone else the claim is ignored.
    assert_eq!(ask(&s, "127.0.0.3", "203.0.113.7"), "127.0.0.3");
    assert_eq!(ask(&s, "127.0.0.1", "127.0.0.2, 203.0.113.8"), "127.0.0.1");
    // The access log has the same addresses, and the TCP peer beside them.
    let logged: Vec<(String, String)> = access_entries(&s.gw, 5)
        .iter()
        .map(|e| {
            (
                e["remote_addr"].as_str().unwrap().to_string(),
                e["peer_addr"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want = [
        ("203.0.113.7", "127.0.0.2"),
        ("203.0.113.7", "127.0.0.2"),
        ("203.0.113.7", "127.0.0.2"),
        ("127.0.0.3", "127.0.0.3"),
        ("127.0.0.1", "127.0.0.1"),
    ]
    .map(|(a, b)| (a.to_string(), b.to_string()));
    assert_eq!(logged, want);
}

/// Arguments of one curl request to the gateway's HTTPS port from `from`, claiming `xff`.
fn request_from(gw: &Gateway, from: &str, xff: &str, path: &str) -> Vec<String> {
    vec![
        "--resolve".into(),
        format!("{HOST}:{}:127.0.0.1", gw.layout.https_port),
        "--cacert".into(),
        gw.layout.cert().display().to_string(),
        "--interface".into(),
        from.into(),
        "-H".into(),
        format!("X-Forwarded-For: {xff}"),
        gw.https_url(HOST, path),
    ]
}

#[test]
fn the_rate_limit_keys_on_the_client_a_trusted_proxy_names() {
    if !tools_present(false) {
        return;
    }
    let s = setup(
        "    trustedProxies: [127.0.0.2/32]\n    rateLimit: {requestsPerSecond: 1, burst: 2}\n",
    );
    // One client behind the proxy, forty requests as fast as curl sends them: at 1 r/s with
    // a burst of 2 it is limited.
    let one: Vec<Vec<String>> = (0..40)
        .map(|_| request_from(&s.gw, "127.0.0.2", "203.0.113.7", "/api/v1/auth/a"))
        .collect();
    let responses = gateway_support::curl_each(&one);
    let limited = responses.iter().filter(|r| r.status == 429).count();
    eprintln!("one client behind the trusted proxy: {limited} of 40 limited");
    assert!(limited > 0, "one client was not limited");
    // Right after, through the same proxy, other clients each have a bucket of their own.
    let others: Vec<Vec<String>> = (0..10)
        .map(|i| {
            request_from(
                &s.gw,
                "127.0.0.2",
                &format!("198.51.100.{}", i + 1),
                "/api/v1/auth/b",
            )
        })
        .collect();
    let statuses: Vec<u16> = gateway_support::curl_each(&others)
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(
        statuses, [200; 10],
        "clients behind the proxy share its bucket"
    );
    // From an untrusted address, a new X-Forwarded-For per request buys no new bucket.
    let spoofing: Vec<Vec<String>> = (0..40)
        .map(|i| {
            request_from(
                &s.gw,
                "127.0.0.3",
                &format!("192.0.2.{}", i + 1),
                "/api/v1/auth/c",
            )
        })
        .collect();
    let responses = gateway_support::curl_each(&spoofing);
    let limited = responses.iter().filter(|r| r.status == 429).count();
    eprintln!("a new X-Forwarded-For per request from an untrusted peer: {limited} of 40 limited");
    assert!(
        limited > 0,
        "a spoofed X-Forwarded-For escaped the rate limit"
    );
    for r in responses.iter().filter(|r| r.status == 200) {
        assert_eq!(client_seen_by_service(r), "127.0.0.3");
    }
}

/// A gateway with `proxyProtocol: true` (and a certificate of its own), the rate limit as in
/// the test above, behind Debian's HAProxy.
#[test]
fn the_proxy_protocol_names_the_client_only_when_a_trusted_proxy_sends_it() {
    if !tools_present(false) || !gateway_support::tool_present("haproxy", &["-v"], "haproxy") {
        return;
    }
    let auth = Backend::start("auth");
    let web = Backend::start("web");
    let yaml = stack_yaml(
        auth.port,
        web.port,
        "    proxyProtocol: true\n    trustedProxies: [127.0.0.2/32]\n    \
         rateLimit: {requestsPerSecond: 1, burst: 2}\n",
        "",
    )
    .replace(
        "acme: {directoryUrl: \"https://acme.invalid/directory\", acceptTermsOfService: true}",
        "secretName: own",
    );
    let gw = Gateway::start(&yaml, options(), Resolution::Loopback, &[HOST, OTHER_HOST]);
    let (https, http) = (gw.layout.https_port, gw.layout.http_port);
    use gateway_support::{Frontend, HaProxy};
    let lb = HaProxy::start(&[
        Frontend {
            name: "v1",
            to_port: https,
            source: "127.0.0.2",
            send_proxy: "send-proxy",
        },
        Frontend {
            name: "v2",
            to_port: https,
            source: "127.0.0.2",
            send_proxy: "send-proxy-v2",
        },
        Frontend {
            name: "stranger",
            to_port: https,
            source: "127.0.0.4",
            send_proxy: "send-proxy",
        },
        Frontend {
            name: "http",
            to_port: http,
            source: "127.0.0.2",
            send_proxy: "send-proxy",
        },
    ]);
    let cert = gw.layout.cert().display().to_string();
    let through = |frontend: &str, client: &str, path: &str| -> Vec<String> {
        let port = lb.port(frontend);
        vec![
            "--resolve".into(),
            format!("{HOST}:{port}:127.0.0.1"),
            "--cacert".into(),
            cert.clone(),
            "--interface".into(),
            client.into(),
            "-H".into(),
            "X-Forwarded-For: 203.0.113.7".into(),
            format!("https://{HOST}:{port}{path}"),
        ]
    };
    let one = |frontend: &str, client: &str| {
        let r = gateway_support::curl_each(&[through(frontend, client, "/api/v1/auth/who")]);
        client_seen_by_service(&r[0])
    };
    // v1 and v2 from the trusted proxy: the client HAProxy accepted (X-Forwarded-For is not
    // looked at when the PROXY protocol names the client).
    assert_eq!(one("v1", "127.0.0.3"), "127.0.0.3");
    assert_eq!(one("v2", "127.0.0.5"), "127.0.0.5");
    // The same header from a sender that is not trusted changes nothing.
    assert_eq!(one("stranger", "127.0.0.3"), "127.0.0.4");
    // Plain HTTP through the proxy: the redirect works and the log names the client.
    let r = gateway_support::curl(&[
        "-H",
        &format!("Host: {HOST}"),
        "--interface",
        "127.0.0.6",
        &format!("http://127.0.0.1:{}/plain", lb.port("http")),
    ]);
    assert_eq!(r.status, 308, "{r:?}");
    // A connection without the header is refused: the listeners expect it.
    let direct = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--resolve"])
        .arg(format!("{HOST}:{https}:127.0.0.1"))
        .args(["--cacert", &cert])
        .arg(gw.https_url(HOST, "/api/v1/auth/who"))
        .output()
        .unwrap();
    assert!(!direct.status.success(), "served without a PROXY header");
    // A hand-written PROXY header from an untrusted address claims 203.0.113.9 in vain.
    {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", http)).unwrap();
        write!(
            c,
            "PROXY TCP4 203.0.113.9 127.0.0.1 5555 80\r\nGET /spoofed HTTP/1.1\r\nHost: {HOST}\r\n\
             Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 308"), "{answer}");
    }
    // The probes' own port answers without the header.
    let r = gateway_support::curl(&[&format!(
        "http://127.0.0.1:{}/healthz",
        gw.layout.health_port
    )]);
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    let r = gateway_support::curl(&[&format!(
        "http://127.0.0.1:{}/api/v1/auth/x",
        gw.layout.health_port
    )]);
    assert_eq!(r.status, 404);

    // The log: the client, and the TCP peer (the sender of the PROXY header) beside it.
    let logged: Vec<(String, String, String)> = access_entries(&gw, 5)
        .iter()
        .map(|e| {
            let field = |k: &str| e[k].as_str().unwrap().to_string();
            (field("uri"), field("remote_addr"), field("peer_addr"))
        })
        .collect();
    let addr_of = |uri: &str| {
        logged
            .iter()
            .filter(|(u, _, _)| u == uri)
            .map(|(_, a, p)| (a.as_str(), p.as_str()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        addr_of("/api/v1/auth/who"),
        [
            ("127.0.0.3", "127.0.0.2"),
            ("127.0.0.5", "127.0.0.2"),
            ("127.0.0.4", "127.0.0.4")
        ],
        "{logged:?}"
    );
    assert_eq!(
        addr_of("/plain"),
        [("127.0.0.6", "127.0.0.2")],
        "{logged:?}"
    );
    assert_eq!(
        addr_of("/spoofed"),
        [("127.0.0.1", "127.0.0.1")],
        "{logged:?}"
    );

    // The rate limit: one client through the proxy is limited; right after, another client
    // through the same proxy has a bucket of its own.
    let many: Vec<Vec<String>> = (0..40)
        .map(|_| through("v1", "127.0.0.3", "/api/v1/auth/a"))
        .collect();
    let limited = gateway_support::curl_each(&many)
        .iter()
        .filter(|r| r.status == 429)
        .count();
    eprintln!("one client behind HAProxy (PROXY protocol): {limited} of 40 limited");
    assert!(limited > 0, "one client was not limited");
    let statuses: Vec<u16> = gateway_support::curl_each(&[
        through("v1", "127.0.0.7", "/api/v1/auth/b"),
        through("v2", "127.0.0.8", "/api/v1/auth/b"),
    ])
    .iter()
    .map(|r| r.status)
    .collect();
    assert_eq!(
        statuses,
        [200, 200],
        "clients behind the proxy share its bucket"
    );
    assert!(!gw.error_log().contains("[emerg]"), "{}", gw.error_log());
}

/// HTTP-01 under the PROXY protocol (`proxyProtocol` with `tls.acme`): the CA's validation
/// comes through the proxy that sends the header (HAProxy here, the CA's connection from
/// 127.0.0.7), and the operator's own self-check, the real `GatewaySolver`, reaches port 80
/// directly and opens its connection with `PROXY UNKNOWN`: nginx answers it and keeps the
/// operator's address. The same check without the header gets no answer, like any client
/// that skips the proxy.
#[test]
fn the_http01_challenge_is_answered_under_the_proxy_protocol() {
    use opsconductor_operator::acme::http01::GatewaySolver;
    use opsconductor_operator::acme::order::Solver;
    if !tools_present(false) || !gateway_support::tool_present("haproxy", &["-v"], "haproxy") {
        return;
    }
    let auth = Backend::start("auth");
    let web = Backend::start("web");
    let yaml = stack_yaml(
        auth.port,
        web.port,
        "    proxyProtocol: true\n    trustedProxies: [127.0.0.2/32]\n",
        "",
    );
    let gw = Gateway::start(&yaml, options(), Resolution::Loopback, &[HOST, OTHER_HOST]);
    let http = gw.layout.http_port;
    let lb = gateway_support::HaProxy::start(&[gateway_support::Frontend {
        name: "http",
        to_port: http,
        source: "127.0.0.2",
        send_proxy: "send-proxy",
    }]);
    // The CA, through the proxy.
    let token = "ca-token_0123";
    let r = gateway_support::curl(&[
        "-H",
        &format!("Host: {HOST}"),
        "--interface",
        "127.0.0.7",
        &format!(
            "http://127.0.0.1:{}/.well-known/acme-challenge/{token}",
            lb.port("http")
        ),
    ]);
    assert_eq!(
        (r.status, r.body.trim()),
        (200, format!("{token}.{THUMBPRINT}").as_str()),
        "{r:?}"
    );
    // The operator's self-check, straight to the gateway's port 80.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let base = format!("http://127.0.0.1:{http}");
    let hosts = [HOST.to_string()];
    let with_header = GatewaySolver::new(base.clone(), std::time::Duration::from_secs(20), true);
    runtime
        .block_on(with_header.prepare(&hosts, THUMBPRINT))
        .expect("the self-check with the PROXY header is answered");
    runtime
        .block_on(with_header.check(HOST, "self-token", &format!("self-token.{THUMBPRINT}")))
        .expect("the self-check of a token is answered");
    // Without the header nginx waits for one and closes the connection: no answer.
    let without = GatewaySolver::new(base, std::time::Duration::from_secs(1), false);
    let refused = runtime
        .block_on(without.prepare(&hosts, THUMBPRINT))
        .expect_err("answered without a PROXY header");
    assert!(
        refused
            .message
            .contains("not reachable through the gateway"),
        "{}",
        refused.message
    );
    // The log: the CA's request names the client HAProxy accepted and HAProxy as the peer;
    // the self-check's requests keep the operator's own address (PROXY UNKNOWN claims none).
    let logged: Vec<(String, String, String)> = access_entries(&gw, 3)
        .iter()
        .map(|e| {
            let field = |k: &str| e[k].as_str().unwrap().to_string();
            (field("uri"), field("remote_addr"), field("peer_addr"))
        })
        .collect();
    let challenge = |t: &str| format!("/.well-known/acme-challenge/{t}");
    assert!(
        logged.contains(&(
            challenge(token),
            "127.0.0.7".to_string(),
            "127.0.0.2".to_string()
        )),
        "{logged:?}"
    );
    assert!(
        logged.contains(&(
            challenge("self-token"),
            "127.0.0.1".to_string(),
            "127.0.0.1".to_string()
        )),
        "{logged:?}"
    );
    let self_checks: Vec<_> = logged
        .iter()
        .filter(|(u, _, _)| u.starts_with(&challenge("opsconductor-self-check-")))
        .collect();
    assert!(!self_checks.is_empty(), "{logged:?}");
    assert!(
        self_checks
            .iter()
            .all(|(_, a, p)| a == "127.0.0.1" && p == "127.0.0.1"),
        "{logged:?}"
    );
    assert!(!gw.error_log().contains("[emerg]"), "{}", gw.error_log());
}

/// Not a test: writes the gateway configuration for `scripts/bench-gateway`, rendered by the
/// operator's builder exactly as for the tests. Reads OPSC_BENCH_DIR (with config/, tls/,
/// tmp/), OPSC_BENCH_BACKEND_PORT, OPSC_BENCH_HTTP_PORT and OPSC_BENCH_HTTPS_PORT. The mode is
/// the operator's (the Service's ClusterIP, here 127.0.0.1, with kept-alive connections).
#[test]
#[ignore = "run by scripts/bench-gateway"]
fn write_bench_config() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    let port = |name: &str| var(name).parse::<u16>().unwrap();
    let yaml = format!(
        r#"apiVersion: opsconductor.io/v1alpha1
kind: OpsConductorStack
metadata: {{name: bench, namespace: shop}}
spec:
  gateway:
    hosts: [{HOST}]
  tls: {{secretName: bench-cert}}
  services:
    - {{name: web, image: example/web:1, port: {}, route: /}}
"#,
        port("OPSC_BENCH_BACKEND_PORT")
    );
    assert!(
        std::env::var_os("OPSC_BENCH_DNS").is_none(),
        "OPSC_BENCH_DNS: the per-request DNS mode is gone (issue 15); the gateway reaches \
         services by ClusterIP"
    );
    let options = BuildOptions {
        upstreams: gateway_support::loopback_upstreams(&yaml),
        ..BuildOptions::default()
    };
    let dir = std::path::PathBuf::from(var("OPSC_BENCH_DIR"));
    let text = gateway_support::local_config(
        &rendered_config(&yaml, &options),
        &dir,
        port("OPSC_BENCH_HTTP_PORT"),
        port("OPSC_BENCH_HTTPS_PORT"),
    );
    std::fs::write(dir.join("config/nginx.conf"), text).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Changes without a failed request (issue 15, item 2)

/// A stack with `web` at `/` and `api`, routed at `/api/` or internal only.
fn reload_stack(web: u16, api: u16, api_routed: bool) -> String {
    let route = if api_routed { ", route: /api/" } else { "" };
    format!(
        "apiVersion: opsconductor.io/v1alpha1\nkind: OpsConductorStack\n\
         metadata: {{name: edge, namespace: shop}}\nspec:\n  gateway: {{hosts: [{HOST}]}}\n\
         \x20 tls: {{secretName: own}}\n  services:\n\
         \x20   - {{name: web, image: example/web:1, port: {web}, route: /}}\n\
         \x20   - {{name: api, image: example/api:1, port: {api}{route}}}\n"
    )
}

/// Polls `path` until the backend named `backend` answers it (a hang guard, not a timing
/// assertion: how long the reload loop takes is not asserted).
fn wait_for_backend(pod: &gateway_support::PodGateway, path: &str, backend: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let r = pod.curl_https(HOST, path);
        if r.status == 200 && r.json()["backend"] == backend {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{path} never reached {backend}: {r:?}\n{}",
            pod.error_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The gateway container's own command (its reload loop) with real nginx, the configuration
/// directory laid out as the kubelet lays out a ConfigMap volume. Under a steady load of
/// kept-alive and new connections, a route is added, a configuration that fails `nginx -t` is
/// published (never loaded: nginx keeps serving, the loop says why), and the route is removed:
/// no request fails (as defined in [`gateway_support::Load`]). At each step nginx serves the
/// loop's result on the port the operator asks, and the operator's verdict on it is checked
/// (`GatewayConfigLoaded`): the file loaded, by its name, or refused with nginx's reason.
#[test]
fn a_route_added_and_removed_through_the_pods_reload_loop_fails_no_request() {
    if !tools_present(false) {
        return;
    }
    let web = Backend::start("web");
    let api = Backend::start("api");
    let render = |routed: bool| {
        let yaml = reload_stack(web.port, api.port, routed);
        let options = BuildOptions {
            upstreams: gateway_support::loopback_upstreams(&yaml),
            ..BuildOptions::default()
        };
        let bundle =
            opsconductor_operator::render::bundle_for("reload.yaml", &yaml, "shop", &options)
                .unwrap();
        let deployment = serde_json::to_value(&bundle.deployments[0]).unwrap();
        let script = deployment["spec"]["template"]["spec"]["containers"][0]["command"][2]
            .as_str()
            .unwrap()
            .to_string();
        (rendered_config(&yaml, &options), script)
    };
    let (without_api, script) = render(false);
    let (with_api, script_after) = render(true);
    assert_eq!(script, script_after, "the container's command is the same");
    let pod = gateway_support::PodGateway::start(&script, &without_api, &[HOST]);
    assert_eq!(pod.curl_https(HOST, "/api/x").json()["backend"], "web");
    assert!(pod.config_status().starts_with("loaded "));
    // What the operator reads, and what it makes of it.
    let served = || {
        let (status, body) = pod.served_config_status();
        assert_eq!(status, 200, "{body}");
        config_status::Answer::parse(&body)
    };
    let id = |conf: &str| nginx::config_id(conf).unwrap().to_string();
    let verdict = |want: &str| config_status::verdict(want, &[("pod".into(), served())], 0).0;
    assert_eq!(served(), config_status::Answer::Loaded(id(&without_api)));
    assert_eq!(verdict(&id(&without_api)).reason, "Loaded");
    assert_ne!(id(&without_api), id(&with_api));
    let until = |what: &str, want: config_status::Answer| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while served() != want {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: {:?}\n{}",
                served(),
                pod.error_log()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };

    let load = gateway_support::Load::start(HOST, pod.layout.https_port);
    load.wait_for(200);

    // The route is added: the kubelet swaps the ConfigMap volume, the loop reloads nginx.
    pod.publish("..v1", &with_api);
    wait_for_backend(&pod, "/api/x", "api");
    until(
        "the new file loaded",
        config_status::Answer::Loaded(id(&with_api)),
    );
    let loaded = verdict(&id(&with_api));
    assert!(
        loaded.ok && !loaded.unknown && loaded.reason == "Loaded",
        "{loaded:?}"
    );
    // Against the file before, the pod is on its way (it runs another one).
    assert_eq!(verdict(&id(&without_api)).reason, "Pending");
    load.wait_for(load.ok() + 200);

    // A configuration nginx refuses is never loaded: the route stays, the loop says why.
    // (A file of its own name, as the operator would write a new one.)
    let broken_id = "00000000deadbeef";
    let broken = format!("{with_api}\nnot_a_directive on;\n").replace(
        &format!("{}{}", nginx::CONFIG_ID_PREFIX, id(&with_api)),
        &format!("{}{broken_id}", nginx::CONFIG_ID_PREFIX),
    );
    assert_eq!(nginx::config_id(&broken), Some(broken_id));
    pod.publish("..v2", &broken);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !pod.config_status().starts_with("rejected ") {
        assert!(
            std::time::Instant::now() < deadline,
            "the loop never reported the broken configuration: {:?}\n{}",
            pod.config_status(),
            pod.error_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let config_status::Answer::Rejected {
        id: refused,
        message,
    } = served()
    else {
        panic!("served: {:?}", served())
    };
    assert_eq!(refused, broken_id);
    assert!(
        message.contains("unknown directive \"not_a_directive\""),
        "{message}"
    );
    let rejected = verdict(broken_id);
    assert!(
        !rejected.ok && rejected.reason == "Rejected",
        "{rejected:?}"
    );
    assert!(
        rejected
            .message
            .contains("pod(s) pod refused configuration 00000000deadbeef")
            && rejected.message.contains("not_a_directive"),
        "{rejected:?}"
    );
    assert!(
        pod.error_log().contains(
            "the configuration test failed, not loaded (nginx keeps serving the previous files)"
        ),
        "{}",
        pod.error_log()
    );
    assert!(pod.error_log().contains("not_a_directive"));
    assert_eq!(pod.curl_https(HOST, "/api/x").json()["backend"], "api");
    load.wait_for(load.ok() + 200);

    // The route is removed again.
    pod.publish("..v3", &without_api);
    wait_for_backend(&pod, "/api/x", "web");
    until(
        "the first file loaded again",
        config_status::Answer::Loaded(id(&without_api)),
    );
    assert!(pod.config_status().starts_with("loaded "));
    load.wait_for(load.ok() + 200);

    let report = load.stop();
    let reloads = pod.error_log().matches("(SIGHUP) received").count();
    measured::measured(format!(
        "route added, refused configuration, route removed under load: {} requests, \
         {} failed, {} got no response on a reused or refused connection and succeeded on the \
         one retry HTTP allows; {reloads} reloads",
        report.ok,
        report.failures.len(),
        report.retried
    ));
    assert!(
        report.failures.is_empty(),
        "failed requests: {:#?}\n{}",
        report.failures,
        pod.error_log()
    );
    assert_eq!(reloads, 2, "two reloads, none for the refused file");
}

/// Issue 19: a wildcard host (allowed with DNS-01 or the user's own Secret) is served for
/// exactly one label below it; the 421 rule holds the Host header to the configured host or
/// wildcard the SNI name matched; the redirect names only names a configured host or wildcard
/// covers.
#[test]
fn a_wildcard_host_serves_one_label_and_keeps_the_421_and_redirect_rules() {
    if !tools_present(false) {
        return;
    }
    let web = Backend::start("web");
    let yaml = format!(
        r#"apiVersion: opsconductor.io/v1alpha1
kind: OpsConductorStack
metadata: {{name: edge, namespace: shop}}
spec:
  gateway:
    hosts: [{HOST}, "*.apps.example.test"]
  tls:
    secretName: wild-cert
  services:
    - {{name: web, image: example/web:1, port: {}, route: /}}
"#,
        web.port
    );
    let gw = Gateway::start(
        &yaml,
        BuildOptions::default(),
        Resolution::Loopback,
        &[HOST, "*.apps.example.test"],
    );
    // One label below the wildcard: served (curl checks the certificate's wildcard name).
    for host in ["a.apps.example.test", "x-1.apps.example.test"] {
        let r = gw.curl_https(host, "/", &[]);
        assert_eq!(r.status, 200, "{host}: {r:?}");
        assert_eq!(r.json()["backend"], "web");
    }
    // Not the wildcard's own domain, not two labels below: refused in the handshake.
    for sni in [
        "apps.example.test",
        "a.b.apps.example.test",
        "a.apps.example.test.evil",
    ] {
        let (ok, out) = gw.s_client(&["-servername", sni], b"");
        assert!(!ok, "SNI {sni} accepted:\n{out}");
    }
    // Host within the same wildcard as the SNI name: the certificate covers both, served.
    let r = gw.curl_https(
        "a.apps.example.test",
        "/",
        &["-H", "Host: b.apps.example.test"],
    );
    assert_eq!(r.status, 200, "{r:?}");
    let reached = web.connections();
    // Host of another configured host, or of nothing configured, over a wildcard session: 421;
    // and a wildcard Host over the exact host's session: 421.
    for (sni, host) in [
        ("a.apps.example.test", HOST),
        ("a.apps.example.test", "evil.example.test"),
        ("a.apps.example.test", "a.b.apps.example.test"),
        (HOST, "a.apps.example.test"),
    ] {
        let r = gw.curl_https(sni, "/", &["-H", &format!("Host: {host}")]);
        assert_eq!(r.status, 421, "SNI {sni}, Host {host}: {r:?}");
    }
    assert_eq!(web.connections(), reached, "a 421 reached a backend");
    // The exact host still works as before.
    assert_eq!(gw.curl_https(HOST, "/", &[]).status, 200);

    // Plain HTTP: redirected to the name asked for when a configured host or wildcard covers
    // it, never elsewhere.
    let r = gw.curl_http("a.apps.example.test", "/x?y=z");
    assert_eq!(r.status, 308, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some("https://a.apps.example.test/x?y=z")
    );
    for host in ["a.b.apps.example.test", "apps.example.test", "evil.example"] {
        let r = gw.curl_http(host, "/");
        assert_ne!(r.status, 308, "Host {host}: {r:?}");
    }
}

/// The worker processes of the gateway's nginx master.
fn worker_pids(gw: &Gateway) -> Vec<u32> {
    let master = gw.pid().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let (_, rest) = stat.rsplit_once(") ")?;
            (rest.split_whitespace().nth(1) == Some(master.as_str()))
                .then(|| e.file_name().to_str()?.parse().ok())
                .flatten()
        })
        .collect()
}

/// Open descriptors and resident KiB of the gateway's workers, summed.
fn worker_usage(gw: &Gateway) -> (usize, u64) {
    worker_pids(gw).iter().fold((0, 0), |(fds, rss), pid| {
        let open = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
        let kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        (fds + open, rss + kib)
    })
}

/// A TLS client with its ClientHello ready to send. It never checks the server's answer (no
/// trust anchors): the tests that use it never read one.
fn client_hello(host: &str) -> rustls::ClientConnection {
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    rustls::ClientConnection::new(
        std::sync::Arc::new(config),
        rustls::pki_types::ServerName::try_from(host.to_string()).unwrap(),
    )
    .unwrap()
}

/// This process's (soft, hard) open-file limits, from /proc/self/limits.
fn nofile_limits() -> (usize, usize) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut v = line["Max open files".len()..].split_whitespace().map(|f| {
        if f == "unlimited" {
            usize::MAX
        } else {
            f.parse().unwrap()
        }
    });
    (v.next().unwrap(), v.next().unwrap())
}

/// Opens `n` TCP connections to `port` that never send a byte (no TLS ClientHello).
fn silent_connections(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            TcpStream::connect(("127.0.0.1", port))
                .unwrap_or_else(|e| panic!("silent connection {i}: {e}"))
        })
        .collect()
}

/// Waits until the server has closed every one of `conns` (a read sees EOF or a reset);
/// returns how long that took. Bytes from the server fail it when `silent` (a connection
/// that never wrote gets no answer), and are read past otherwise. The deadline is a hang
/// guard, not a timing assertion.
fn wait_closed(conns: &[TcpStream], silent: bool) -> Duration {
    let started = std::time::Instant::now();
    for (i, c) in conns.iter().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        loop {
            match (&*c).read(&mut [0u8; 64]) {
                Ok(0) => break,
                Ok(_) if silent => panic!("silent connection {i} was sent bytes"),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    assert!(
                        started.elapsed() < Duration::from_secs(90),
                        "silent connection {i} still open after 90 s"
                    );
                }
                Err(_) => break,
            }
        }
    }
    started.elapsed()
}

/// The `worker_connections` of a rendered configuration.
fn rendered_worker_connections(config: &str) -> usize {
    config
        .lines()
        .find_map(|l| l.trim().strip_prefix("worker_connections "))
        .and_then(|v| v.trim_end_matches(';').parse().ok())
        .expect("worker_connections in the configuration")
}

/// Issue 14, item 6: connections that send nothing, or start a TLS handshake and stall.
/// nginx caps requests per client address (limit_conn) but cannot cap connections before a
/// request. What bounds them is the header timeout (on this nginx it also covers the TLS
/// handshake), `worker_connections`, and that idle connections give their slot up when slots
/// run out. One worker with a 128 MiB limit shows each:
/// - silent connections: another client is served while they are held, even past
///   `worker_connections`, and nginx closes them all after the timeout;
/// - stalled handshakes (a ClientHello, then nothing): they hold their slot and OpenSSL's
///   buffers until the timeout; `worker_connections`, sized to the memory limit, keeps the
///   worker's memory under the limit however many come (before the sizing, 4,096 of them
///   took about 190 MiB). What a flood of them does to other clients is printed.
#[test]
fn silent_and_stalled_connections_are_bounded_by_the_timeout_and_the_memory_limit() {
    if !tools_present(false) {
        return;
    }
    const LIMIT_MIB: u64 = 128;
    let flood = nginx::MAX_WORKER_CONNECTIONS as usize + 100;
    // Room for the connections in this process: the soft descriptor limit raised to the hard
    // one (prlimit, as tests/metrics_endpoint.rs lowers it for the operator).
    let me = std::process::id().to_string();
    let hard = nofile_limits().1;
    let raise = if hard == usize::MAX {
        "--nofile=unlimited:".to_string()
    } else {
        format!("--nofile={hard}:")
    };
    let raised = std::process::Command::new("prlimit")
        .args(["--pid", &me, &raise])
        .status()
        .expect("prlimit runs");
    assert!(raised.success(), "prlimit {raise}");
    assert!(
        nofile_limits().0 > flood + 200,
        "this test needs {} descriptors, the limit is {:?}",
        flood + 200,
        nofile_limits()
    );
    let s = setup(&format!(
        "    resources: {{limits: {{cpu: \"1\", memory: {LIMIT_MIB}Mi}}}}\n"
    ));
    let slots =
        rendered_worker_connections(&std::fs::read_to_string(s.gw.layout.config_path()).unwrap());
    assert!(
        slots < flood,
        "worker_connections {slots} for a {LIMIT_MIB} MiB limit"
    );
    assert_eq!(worker_pids(&s.gw).len(), 1, "one worker for cpu: 1");
    let (fds_before, rss_before) = worker_usage(&s.gw);

    // Silent connections, fewer than the slots: all accepted, another client served, all
    // closed by nginx on its own timer (the client never writes).
    let silent = slots * 3 / 4;
    let held = silent_connections(s.gw.layout.https_port, silent);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while worker_usage(&s.gw).0 < fds_before + silent {
        assert!(
            std::time::Instant::now() < deadline,
            "nginx did not accept {silent} connections: {:?}",
            worker_usage(&s.gw)
        );
        thread::sleep(Duration::from_millis(50));
    }
    let (_, rss_held) = worker_usage(&s.gw);
    let r = s.gw.curl_https(HOST, "/", &["--max-time", "20"]);
    assert_eq!(
        r.status, 200,
        "another client while {silent} silent connections are held: {r:?}"
    );
    let closed_after = wait_closed(&held, true);
    drop(held);
    measured::measured(format!(
        "silent connections: {silent} held cost the worker {} KiB ({:.2} KiB each); nginx closed all after {:.1} s",
        rss_held.saturating_sub(rss_before),
        rss_held.saturating_sub(rss_before) as f64 / silent as f64,
        closed_after.as_secs_f64()
    ));

    // More silent connections than slots: nginx closes idle ones to take new ones.
    let held = silent_connections(s.gw.layout.https_port, flood);
    let r = s.gw.curl_https(HOST, "/", &["--max-time", "20"]);
    assert_eq!(
        r.status, 200,
        "another client while {flood} silent connections are held: {r:?}"
    );
    assert!(
        s.gw.error_log()
            .contains("worker_connections are not enough, reusing connections"),
        "nginx took a slot from an idle connection; its error log:\n{}",
        s.gw.error_log()
    );
    wait_closed(&held, true);
    drop(held);

    // Stalled handshakes, more than the slots: the worker's memory stays under the limit.
    let (_, rss_before) = worker_usage(&s.gw);
    let mut peak = (0, 0);
    let stalled: Vec<TcpStream> = silent_connections(s.gw.layout.https_port, flood)
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            // A full ClientHello; the server's answer is never read.
            let _ = client_hello(HOST).write_tls(&mut c);
            if i % 256 == 0 {
                let now = worker_usage(&s.gw);
                peak = (peak.0.max(now.0), peak.1.max(now.1));
            }
            c
        })
        .collect();
    for _ in 0..20 {
        let now = worker_usage(&s.gw);
        peak = (peak.0.max(now.0), peak.1.max(now.1));
        thread::sleep(Duration::from_millis(50));
    }
    let during = s.gw.curl_https(HOST, "/", &["--max-time", "3"]);
    let freed_after = wait_closed(&stalled, false);
    drop(stalled);
    let after = s.gw.curl_https(HOST, "/", &["--max-time", "20"]);
    let per =
        peak.1.saturating_sub(rss_before) as f64 / peak.0.saturating_sub(fds_before).max(1) as f64;
    measured::measured(format!(
        "stalled handshakes: {flood} sent, worker_connections {slots} (one worker, memory limit {LIMIT_MIB} MiB): peak {} descriptors, {} KiB resident (about {per:.1} KiB per stalled handshake); another client meanwhile got status {} (0: refused or no answer within 3 s); nginx closed them after {:.1} s, then status {}",
        peak.0,
        peak.1,
        during.status,
        freed_after.as_secs_f64(),
        after.status
    ));
    assert!(
        peak.1 < LIMIT_MIB * 1024,
        "the worker held {} KiB with {flood} stalled handshakes, over the {LIMIT_MIB} MiB limit",
        peak.1
    );
    assert_eq!(
        after.status, 200,
        "served again once the stalled handshakes are closed: {after:?}"
    );
}

/// Container `name` of the gateway Deployment the operator renders for stack `yaml` (the
/// metrics sidecars' command lines, as they run in the pod).
fn rendered_gateway_container(yaml: &str, name: &str) -> k8s_openapi::api::core::v1::Container {
    let bundle =
        opsconductor_operator::render::bundle_for("stack.yaml", yaml, "shop", &options()).unwrap();
    let deployment = bundle
        .deployments
        .into_iter()
        .next()
        .expect("the gateway Deployment");
    deployment
        .spec
        .and_then(|d| d.template.spec)
        .expect("a pod template")
        .containers
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("the {name} container of the gateway"))
}

/// The gateway's own metrics (issue 15): the configuration rendered with `spec.gateway.metrics`
/// in real nginx, and the real exporter (Debian's `prometheus-nginx-exporter`, the binary of
/// the gateway image) run with the sidecar's arguments as the operator renders them. The
/// counters move exactly with the traffic sent through the gateway: each scrape is one request
/// and one connection of its own on the status listener, nothing else talks to nginx.
#[test]
fn the_metrics_exporter_counts_the_gateways_connections_and_requests() {
    if !tools_present(false) {
        return;
    }
    let Some(binary) = gateway_support::exporter_binary() else {
        return;
    };
    const METRICS: &str = "    metrics:\n      enabled: true\n      \
                           allowFrom: [{namespaceSelector: {matchLabels: {team: obs}}}]\n";
    let s = setup(METRICS);
    // The sidecar's arguments, from the Deployment the operator renders for this stack.
    let yaml = stack_yaml(s.auth.port, s.web.port, METRICS, "");
    let args = rendered_gateway_container(&yaml, "exporter").args.unwrap();

    let exporter = gateway_support::Exporter::start(&binary, &args, &s.gw);
    let before = exporter.scrape();
    let get = |m: &std::collections::BTreeMap<String, f64>, name: &str| {
        *m.get(name)
            .unwrap_or_else(|| panic!("no {name} in the scrape: {m:?}"))
    };
    assert_eq!(get(&before, "nginx_up"), 1.0);

    // 12 requests on 12 new connections (one curl each), 8 on one kept-alive connection.
    for _ in 0..12 {
        assert_eq!(s.gw.curl_https(HOST, "/", &[]).status, 200);
    }
    let url = s.gw.https_url(HOST, "/");
    let resolve = format!("{HOST}:{}:127.0.0.1", s.gw.layout.https_port);
    let cert = s.gw.layout.cert().display().to_string();
    let mut args: Vec<&str> = vec!["--resolve", &resolve, "--cacert", &cert];
    for _ in 0..8 {
        args.push(&url);
    }
    let kept = curl_many(&args);
    assert!(kept.iter().all(|r| r.status == 200), "{kept:?}");

    let after = exporter.scrape();
    // The second scrape is one more request. The exporter keeps its connection to the status
    // listener alive between scrapes (nginx closes it after 65 s idle, then the scrape opens
    // one more).
    assert_eq!(
        get(&after, "nginx_http_requests_total") - get(&before, "nginx_http_requests_total"),
        20.0 + 1.0
    );
    for counter in ["nginx_connections_accepted", "nginx_connections_handled"] {
        let delta = get(&after, counter) - get(&before, counter);
        assert!(delta == 13.0 || delta == 14.0, "{counter} moved by {delta}");
    }

    // Connections held open show as active, besides the exporter's own; they go away when
    // the clients close them.
    let held: Vec<std::net::TcpStream> = (0..5)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", s.gw.layout.https_port)).unwrap())
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let m = exporter.scrape();
        // 5 held and the exporter's own (the closed curl connections may still be counted
        // for a moment, until nginx reads their end).
        if get(&m, "nginx_connections_active") == 6.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{m:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(held);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let m = exporter.scrape();
        if get(&m, "nginx_connections_active") == 1.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{m:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The status listener answers only on loopback and only its one path.
    let other = gateway_support::curl(&[&format!("http://127.0.0.1:{}/", s.gw.layout.status_port)]);
    assert_eq!(other.status, 404);
    // nginx's own log has no line for the scrapes (access_log off on the status listener).
    assert!(!s.gw.access_log().contains("stub_status"));
}

/// Requests by route and status class, and latency (issue 15), in real nginx with the
/// configuration as rendered with `metrics`, and the `requests` sidecar (this build's
/// `opsconductor-operator gateway-requests`) run with its rendered command. Requests with known answers move the counters by exactly their number,
/// per route and status class; each histogram counts every request of its route; requests no
/// route handled land under `(none)`; and many distinct URIs add no series. With the exporter
/// gone, nginx still serves every request.
#[test]
fn the_request_exporter_counts_requests_by_route_and_status_class_with_bounded_labels() {
    use std::collections::BTreeMap;
    if !tools_present(false) {
        return;
    }
    let slow = Backend::start("slow");
    let web = Backend::start("web");
    // Nothing listens there: every request to the route is a 502.
    let gone_port = gateway_support::free_port();
    let yaml = format!(
        r#"apiVersion: opsconductor.io/v1alpha1
kind: OpsConductorStack
metadata: {{name: edge, namespace: shop}}
spec:
  gateway:
    hosts: [{HOST}]
    metrics: {{enabled: true, allowFrom: [{{namespaceSelector: {{matchLabels: {{team: obs}}}}}}]}}
  tls:
    acme: {{directoryUrl: "https://acme.invalid/directory", acceptTermsOfService: true}}
  services:
    - {{name: slow, image: example/slow:1, port: {a}, route: /hold/, routeLimits: {{concurrentRequestsPerClient: 1}}}}
    - {{name: web, image: example/web:1, port: {w}, route: /web/}}
    - {{name: gone, image: example/gone:1, port: {gone_port}, route: /gone/}}
"#,
        a = slow.port,
        w = web.port,
    );
    let gw = Gateway::start(&yaml, options(), Resolution::Loopback, &[HOST]);
    // The sidecar's command, from what the operator renders for this stack.
    let sidecar = rendered_gateway_container(&yaml, "requests");
    let exporter =
        gateway_support::Exporter::start_requests(sidecar.command.as_ref().unwrap(), &gw);

    let family = |m: &BTreeMap<String, f64>, prefix: &str| -> BTreeMap<String, f64> {
        m.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    };
    const REQUESTS: &str = "opsconductor_gateway_requests_total{";
    let total = |m: &BTreeMap<String, f64>| family(m, REQUESTS).values().sum::<f64>();
    // Waits until the exporter has taken `n` requests in all (UDP: nginx does not wait for
    // it), then returns that scrape.
    let settled = |n: f64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let m = exporter.scrape();
            if total(&m) >= n {
                return m;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the exporter took {} of {n} requests: {m:?}\n{}",
                total(&m),
                gw.error_log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    };
    let before = exporter.scrape();
    assert_eq!(total(&before), 0.0, "{before:?}");

    let status = |path: &str| gw.curl_https(HOST, path, &[]).status;
    // web: 5 x 200.
    for i in 0..5 {
        assert_eq!(status(&format!("/web/page-{i}")), 200);
    }
    // slow: with one request held by the backend, 2 x 429 (one request in progress per
    // client on that route), the held one 200 once released, then 3 x 200 (answered at once).
    let held = {
        let url = gw.https_url(HOST, "/hold/on");
        let resolve = format!("{HOST}:{}:127.0.0.1", gw.layout.https_port);
        let cert = gw.layout.cert().display().to_string();
        thread::spawn(move || {
            gateway_support::curl(&["--resolve", &resolve, "--cacert", &cert, &url]).status
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while slow.held() < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the request was not held"
        );
        thread::sleep(Duration::from_millis(10));
    }
    for _ in 0..2 {
        assert_eq!(status("/hold/now"), 429);
    }
    slow.release();
    assert_eq!(held.join().unwrap(), 200);
    for _ in 0..3 {
        assert_eq!(status("/hold/now"), 200);
    }
    // gone: 2 x 502 (refused, retried once, refused).
    for _ in 0..2 {
        assert_eq!(status("/gone/x"), 502);
    }
    // No route: a URI no route takes (404), the route without its slash (nginx's own 301,
    // before the route's location runs), plain HTTP (308 to HTTPS).
    assert_eq!(status("/nowhere"), 404);
    assert_eq!(status("/web"), 301);
    assert_eq!(gw.curl_http(HOST, "/web/page").status, 308);

    let after = settled(16.0);
    let key = |route: &str, class: &str| {
        format!("{REQUESTS}route=\"{route}\",status_class=\"{class}\"}}")
    };
    let expected: BTreeMap<String, f64> = [
        (key("web", "2xx"), 5.0),
        (key("slow", "2xx"), 4.0),
        (key("slow", "4xx"), 2.0),
        (key("gone", "5xx"), 2.0),
        (key("(none)", "4xx"), 1.0),
        (key("(none)", "3xx"), 2.0),
    ]
    .into_iter()
    .collect();
    assert_eq!(family(&after, REQUESTS), expected);
    assert_eq!(
        after.get("opsconductor_gateway_request_lines_dropped_total{reason=\"malformed\"}"),
        Some(&0.0)
    );
    // Each histogram counts every request of its route, in its +Inf bucket too, and its
    // buckets only grow; the upstream one only requests that reached a service (not the
    // 429s, not the ones no route took).
    let check_histogram = |name: &str, route: &str, count: f64| {
        let c = after.get(&format!("{name}_count{{route=\"{route}\"}}"));
        assert_eq!(c, Some(&count), "{name} {route}: {after:?}");
        let buckets = family(&after, &format!("{name}_bucket{{route=\"{route}\",le="));
        assert_eq!(buckets.len(), 14, "13 buckets and +Inf: {after:?}");
        let inf = after[&format!("{name}_bucket{{route=\"{route}\",le=\"+Inf\"}}")];
        assert_eq!(inf, count, "{name} {route}");
        let mut below = 0.0;
        for bound in nginx::request_metrics::LATENCY_BUCKETS {
            let v = after[&format!("{name}_bucket{{route=\"{route}\",le=\"{bound}\"}}")];
            assert!(
                below <= v && v <= inf,
                "{name} {route} le={bound}: {after:?}"
            );
            below = v;
        }
    };
    const LATENCY: &str = "opsconductor_gateway_request_duration_seconds";
    const UPSTREAM: &str = "opsconductor_gateway_upstream_duration_seconds";
    for (route, n) in [("web", 5.0), ("slow", 6.0), ("gone", 2.0), ("(none)", 3.0)] {
        check_histogram(LATENCY, route, n);
    }
    for (route, n) in [("web", 5.0), ("slow", 4.0), ("gone", 2.0)] {
        check_histogram(UPSTREAM, route, n);
    }
    assert!(!after.contains_key(&format!("{UPSTREAM}_count{{route=\"(none)\"}}")));
    // Requests nginx answered itself within a millisecond are in the smallest bucket.
    assert_eq!(
        after[&format!("{LATENCY}_bucket{{route=\"(none)\",le=\"0.005\"}}")],
        3.0
    );

    // 40 distinct URIs, as an attacker would pick them: 30 that no route takes, 10 under a
    // route. The counters move by exactly that, and not one series is added.
    let series = |m: &BTreeMap<String, f64>| -> Vec<String> {
        m.keys()
            .filter(|k| k.starts_with("opsconductor_gateway_"))
            .cloned()
            .collect()
    };
    let url = |path: String| gw.https_url(HOST, &path);
    let mut urls: Vec<String> = (0..30)
        .map(|i| url(format!("/x{i}-{:x}/{:x}?q={i}", rand_u64(), rand_u64())))
        .collect();
    urls.extend((0..10).map(|i| url(format!("/web/{:x}/{i}", rand_u64()))));
    let resolve = format!("{HOST}:{}:127.0.0.1", gw.layout.https_port);
    let cert = gw.layout.cert().display().to_string();
    let mut args: Vec<&str> = vec!["--resolve", &resolve, "--cacert", &cert];
    args.extend(urls.iter().map(String::as_str));
    let answers = curl_many(&args);
    assert_eq!(
        answers.iter().filter(|r| r.status == 404).count(),
        30,
        "{answers:?}"
    );
    assert_eq!(answers.iter().filter(|r| r.status == 200).count(), 10);
    let random = settled(56.0);
    assert_eq!(series(&random), series(&after));
    assert_eq!(random[&key("(none)", "4xx")], 1.0 + 30.0);
    assert_eq!(random[&key("web", "2xx")], 5.0 + 10.0);
    assert_eq!(total(&random), 56.0);
    // nginx warns about nothing per request (the route variable is unset where no route
    // ran, on purpose).
    assert!(
        !gw.error_log().contains("uninitialized"),
        "{}",
        gw.error_log()
    );

    // The exporter stopped as the kubelet stops it (SIGTERM, after the same `preStop` wait as
    // nginx's): it exits, and successfully. Then nginx serves every request all the same (the
    // same as after a crash); the lines are lost, and nginx notes the refused sends in its
    // error log.
    let status = exporter.stop();
    assert!(status.success(), "the exporter's exit at SIGTERM: {status}");
    // On one kept-alive connection, so one worker sends them all: its first send after the
    // port closed succeeds (the refusal comes back later), the next ones are refused.
    let down: Vec<String> = (0..10)
        .map(|i| gw.https_url(HOST, &format!("/web/while-down-{i}")))
        .collect();
    let mut args: Vec<&str> = vec!["--resolve", &resolve, "--cacert", &cert];
    args.extend(down.iter().map(String::as_str));
    let answers = curl_many(&args);
    assert_eq!(answers.len(), 10);
    assert!(answers.iter().all(|r| r.status == 200), "{answers:?}");
    assert!(
        gw.error_log().contains("send() to syslog failed"),
        "{}",
        gw.error_log()
    );
}

/// A random number for URIs no test has sent before (from the kernel, no crate needed).
fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    u64::from_le_bytes(b)
}
