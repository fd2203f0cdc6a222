//! The gateway's `nginx.conf`, generated from the validated stack.
//!
//! Every value placed in the configuration comes from the validated model (DNS names, checked
//! paths and sizes, numbers) or from [`BuildOptions`] the operator computed itself, so nothing
//! a user writes can inject a directive. There are no free-form snippets.
//!
//! The same text must load on Debian's nginx 1.22 (what the tests run) and on the nginx of the
//! default gateway image (1.27): only directives and parameters both accept are used. The
//! design and its trade-offs are written up in `docs/gateway.md`.
//!
//! [`render`] writes the file in order; each part has its file:
//! - this file: the constants the pod and the tests share, the main context (workers, their
//!   shutdown), and [`render`];
//! - `http_context`: the `http` context's settings (timeouts, the access log, the host maps,
//!   the client's address, TLS);
//! - `upstreams`: the `upstream` blocks, by name or by ClusterIP, with keep-alive;
//! - `servers`: the `server` blocks (probes, port 8080, port 8443 and its locations);
//! - `headers`: the security headers of every response, the request headers towards services;
//! - `request_metrics`: with `metrics`, the per-request line for the exporter of requests by
//!   route and status class ([`crate::gateway_requests`]);
//! - `route_limits`: per-route limits (`routeLimits`);
//! - `edge_auth`: edge authentication (the verdict locations, cache and headers);
//! - `tests`: tests of the whole file.

mod edge_auth;
mod headers;
mod http_context;
pub mod request_metrics;
mod route_limits;
mod servers;
#[cfg(test)]
mod tests;
mod upstreams;

use std::fmt::Write as _;

use super::BuildOptions;
use crate::model::Stack;
use edge_auth::verdict_cache;
use http_context::{client_address, http_settings, tls_settings};
use request_metrics::request_log;
use route_limits::{any_route_rate, route_limit_zones};
use servers::{config_status_server, health_server, plain_http_server, status_server, tls_servers};
use upstreams::upstreams;

pub use edge_auth::{VERDICT_CACHE_DIR, VERDICT_LOCATION};

/// Key of the configuration in the gateway ConfigMap.
pub const CONFIG_KEY: &str = "nginx.conf";

/// Where the ConfigMap is mounted in the gateway pod.
pub const CONFIG_DIR: &str = "/etc/opsconductor/config";

pub const CONFIG_PATH: &str = "/etc/opsconductor/config/nginx.conf";

/// Where the TLS Secret is mounted in the gateway pod.
pub const TLS_DIR: &str = "/etc/opsconductor/tls";

/// The one writable directory of the gateway pod (an emptyDir): pid file and temp files.
pub const TMP_DIR: &str = "/tmp";

pub const HTTP_PORT: i32 = 8080;

pub const HTTPS_PORT: i32 = 8443;

/// Answers the kubelet's probes when the listeners on [`HTTP_PORT`] and [`HTTPS_PORT`] expect
/// the PROXY protocol (which the kubelet does not speak); not in the gateway Service.
pub const HEALTH_PORT: i32 = 8081;

/// nginx's `stub_status` (connection and request counters) for the metrics exporter beside
/// it, with `spec.gateway.metrics`: on 127.0.0.1 only, so nothing outside the pod's network
/// namespace reaches it (the exporter shares that namespace); not in the gateway Service.
pub const STATUS_PORT: i32 = 8082;

/// The reload loop's last result (see [`crate::build::gateway::RELOAD_ON_CHANGE`]), served
/// for the operator's `GatewayConfigLoaded` condition; not in the gateway Service, and the
/// gateway's NetworkPolicy admits only the operator's pods to it.
pub const CONFIG_STATUS_PORT: i32 = 8084;

/// The path of the reload loop's result on [`CONFIG_STATUS_PORT`].
pub const CONFIG_STATUS_URL_PATH: &str = "/opsconductor/config";

/// The third line of every configuration names it: this prefix, then the first 16 hex digits
/// of the SHA-256 of the rest of the file. The reload loop reports the name of the file it
/// loaded or refused, so the operator can tell whether a pod runs the configuration it wrote.
pub const CONFIG_ID_PREFIX: &str = "# opsconductor-config ";

/// The name of a configuration [`render`] wrote (its [`CONFIG_ID_PREFIX`] line).
pub fn config_id(conf: &str) -> Option<&str> {
    conf.lines()
        .take(5)
        .find_map(|l| l.strip_prefix(CONFIG_ID_PREFIX))
        .map(str::trim)
}

/// The path of `stub_status` on [`STATUS_PORT`].
pub const STATUS_PATH: &str = "/stub_status";

/// Answered on the HTTP port for the kubelet's probes; never redirected.
pub const HEALTH_PATH: &str = "/healthz";

/// Where ACME HTTP-01 challenges are fetched (RFC 8555, section 8.3).
pub const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Mozilla's "intermediate" TLS 1.2 cipher list (version 5.7), ECDHE only: the two DHE
/// suites of that list are left out, so no DH parameters need shipping. TLS 1.3 suites are
/// not configurable in nginx 1.22 and OpenSSL's defaults for them are all strong.
pub const TLS12_CIPHERS: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:\
ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:\
ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";

/// Key exchange groups offered, in order of preference (OpenSSL names). P-384 for clients
/// that offer nothing else (some FIPS-restricted ones).
pub const ECDH_CURVES: &str = "X25519:prime256v1:secp384r1";

/// Idle upstream connections each worker keeps per service: a cap, not a pool nginx fills
/// (it keeps only connections it opened for requests, each for [`UPSTREAM_IDLE_SECONDS`] at
/// most). Sized above the requests one worker carries at once, so that a connection opened for
/// a request is kept for the next one instead of closed after it: at 32, with 50 client
/// connections in flight, 175 to 220 requests in 1000 opened a new upstream connection, and
/// the gateway spent 61 µs of CPU per kept-alive HTTPS request; at 512 none did, 49 µs
/// (`docs/benchmarks.md`, issue 15). Upstream connections count against `worker_connections`,
/// which bounds them whatever this says.
pub const UPSTREAM_KEEPALIVE: u32 = 512;

/// Seconds an idle upstream connection is kept open. Below the idle timeout of common HTTP
/// servers (Node.js 5 s, uvicorn 5 s, Tomcat 20 s), so that nginx, not the service, closes an
/// idle connection, and a request is not sent on a connection the service is closing.
pub const UPSTREAM_IDLE_SECONDS: u32 = 4;

/// Seconds one upstream connection is used at most (it is closed after the request in
/// progress then). kube-proxy picks a pod per connection, so this bounds how long a kept-alive
/// connection stays with one pod: after a scale-up, new pods get their share within it.
pub const UPSTREAM_CONNECTION_SECONDS: u32 = 60;

/// Requests one client address may have in progress on one gateway pod (HTTP/2 streams count
/// one each); more get 429. Bounds what one client holds of a pod's connections, so that it
/// cannot deny service to everyone else (clients behind one NAT share it).
pub const MAX_REQUESTS_PER_CLIENT: u32 = 256;

/// Seconds a client may take to send its request head, and between two reads of its body;
/// also the TLS handshake's time limit in nginx 1.22. nginx's default is 60 s, which let one
/// client keep thousands of silent connections open for a minute.
pub const CLIENT_TIMEOUT_SECONDS: u32 = 10;

/// Seconds a client is told to wait after a 429.
pub const RETRY_AFTER_SECONDS: u32 = 1;

/// Renders the configuration. Paths in it are the pod's mount points; tests that run real
/// nginx rewrite only the [`CONFIG_DIR`], [`TLS_DIR`] and [`TMP_DIR`] prefixes and the listen
/// ports.
pub fn render(stack: &Stack, options: &BuildOptions) -> String {
    let header = format!(
        "# Generated by opsconductor-operator for OpsConductorStack {}/{}.\n\
         # Do not edit: the operator reverts changes. Change the stack's spec instead.\n",
        stack.namespace, stack.name
    );
    let body = render_body(stack, options);
    let digest = <sha2::Sha256 as sha2::Digest>::digest(format!("{header}{body}").as_bytes());
    let id: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{header}{CONFIG_ID_PREFIX}{id}\n{body}")
}

/// Everything after the lines that name the file.
fn render_body(stack: &Stack, options: &BuildOptions) -> String {
    let mut c = String::new();
    let w = &mut c;
    main_context(w, stack);
    let _ = writeln!(w, "\nhttp {{");
    http_settings(w, stack);
    request_log(w, stack);
    client_address(w, stack);
    tls_settings(w);
    upstreams(w, stack, options);
    route_limit_zones(w, stack);
    verdict_cache(w, stack);
    if stack.gateway.rate_limit.is_some() || any_route_rate(stack) {
        let _ = writeln!(
            w,
            "
    # Told to clients that were rate limited; an empty value sends no header.
    map $status $opsconductor_retry_after {{
        429     {RETRY_AFTER_SECONDS};
        default \"\";
    }}"
        );
    }
    if stack.gateway.proxy_protocol {
        health_server(w);
    }
    if stack.gateway.metrics.is_some() {
        status_server(w);
    }
    config_status_server(w);
    plain_http_server(w, stack, options);
    tls_servers(w, stack, options);
    let _ = writeln!(w, "}}");
    c
}

/// nginx workers: one per CPU the pod may use. `auto` counts the node's CPUs, which with a CPU
/// limit on a large node means dozens of workers, each with its own memory, for a share of a
/// core (issue 14, item 6); so with a CPU limit, its value rounded up (at most 64).
pub fn worker_processes(stack: &Stack) -> String {
    let limit = stack
        .gateway
        .resources
        .limits
        .as_ref()
        .and_then(|l| l.get("cpu"))
        .and_then(|q| cpu_cores(&q.0));
    match limit {
        Some(cores) => cores.clamp(1, 64).to_string(),
        None => "auto".into(),
    }
}

/// The most connections one worker takes (`worker_connections`), and the fewest it is given
/// when sized to a small memory limit.
pub const MAX_WORKER_CONNECTIONS: u32 = 4096;
const MIN_WORKER_CONNECTIONS: u32 = 256;

/// What one connection may cost a worker at most, for sizing `worker_connections` to the pod's
/// memory limit: a TLS handshake that a client starts and never finishes holds OpenSSL's
/// state and buffers until the handshake timeout, about 48 KiB each on the gateway's nginx
/// and OpenSSL (measured and printed by `tests/gateway_nginx.rs`), plus a margin. Idle
/// connections cost under 1 KiB and are taken back when slots run out, so this is the bound
/// that matters (issue 14, item 6).
const CONNECTION_BUDGET_BYTES: u64 = 64 * 1024;

/// Connections per worker: with a CPU limit (so a known number of workers) and a memory limit,
/// as many as three quarters of the memory limit holds at [`CONNECTION_BUDGET_BYTES`] each,
/// shared by the workers (between 256 and 4096), so that a flood of stalled handshakes is
/// refused at the edge instead of ending in the pod's OOM kill. Otherwise 4096 (with
/// `worker_processes auto` the number of workers is the node's CPUs, unknown here;
/// `docs/security.md`).
pub fn worker_connections(stack: &Stack) -> u32 {
    let limits = stack.gateway.resources.limits.as_ref();
    let workers = limits
        .and_then(|l| l.get("cpu"))
        .and_then(|q| cpu_cores(&q.0))
        .map(|c| u64::from(c.clamp(1, 64)));
    let memory = limits
        .and_then(|l| l.get("memory"))
        .and_then(|q| memory_bytes(&q.0));
    match (workers, memory) {
        (Some(workers), Some(bytes)) => {
            let fit = bytes / 4 * 3 / workers / CONNECTION_BUDGET_BYTES;
            u32::try_from(fit)
                .unwrap_or(MAX_WORKER_CONNECTIONS)
                .clamp(MIN_WORKER_CONNECTIONS, MAX_WORKER_CONNECTIONS)
        }
        _ => MAX_WORKER_CONNECTIONS,
    }
}

/// A memory quantity in bytes (`512Mi`, `1Gi`, `500M`, `1.5G`, `134217728`, `1e9`); `None`
/// for forms a memory limit does not take (`m`) or that do not parse.
fn memory_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let (number, factor) = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("Ei", 1 << 60),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
        ("E", 1_000_000_000_000_000_000),
    ]
    .iter()
    .find_map(|(suffix, f)| q.strip_suffix(suffix).map(|n| (n, *f)))
    .unwrap_or((q, 1));
    let v = number
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)?;
    let bytes = v * factor as f64;
    (bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// A CPU quantity (`500m`, `1`, `1.5`, `2`) rounded up to whole cores; `None` for other forms.
fn cpu_cores(q: &str) -> Option<u32> {
    let q = q.trim();
    let cores = if let Some(milli) = q.strip_suffix('m') {
        milli.parse::<u64>().ok()?.div_ceil(1000)
    } else {
        let v = q
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)?;
        v.ceil() as u64
    };
    u32::try_from(cores).ok()
}

/// Seconds nginx lets the requests in flight finish when it stops (SIGQUIT) or after a reload
/// (the old workers), `worker_shutdown_timeout`: then it closes what is left (long downloads,
/// WebSockets). A request that makes progress is bounded by the client timeout for its head
/// and body, and the gateway's connect, send and read timeouts for the service: their sum.
pub fn shutdown_timeout_seconds(stack: &Stack) -> u32 {
    let t = &stack.gateway.timeouts;
    let secs = u64::from(CLIENT_TIMEOUT_SECONDS)
        + t.connect.as_secs()
        + t.send.as_secs()
        + t.read.as_secs();
    u32::try_from(secs).unwrap_or(u32::MAX)
}

fn main_context(w: &mut String, stack: &Stack) {
    let workers = worker_processes(stack);
    let connections = worker_connections(stack);
    let shutdown = shutdown_timeout_seconds(stack);
    let _ = writeln!(
        w,
        "
worker_processes {workers};
daemon off;
pid {TMP_DIR}/nginx.pid;
error_log stderr notice;

# Room for every connection a worker may hold: each proxied request takes two descriptors.
worker_rlimit_nofile 10240;

# After a reload, and when the pod stops (SIGQUIT), workers finish the requests in flight;
# what is still open after this is closed (the pod's termination grace is longer).
worker_shutdown_timeout {shutdown}s;

events {{
    worker_connections {connections};
}}"
    );
}
