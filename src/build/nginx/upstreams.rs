//! The `upstream` blocks of the routed services (and of the verdict service), by name or by
//! ClusterIP, with keep-alive.

use std::fmt::Write as _;

use super::{UPSTREAM_CONNECTION_SECONDS, UPSTREAM_IDLE_SECONDS, UPSTREAM_KEEPALIVE};
use crate::build::{BuildOptions, Upstreams};
use crate::model::{Service, Stack};

fn upstream_host(stack: &Stack, svc: &Service, options: &BuildOptions) -> String {
    format!(
        "{}.{}.svc.{}:{}",
        svc.name, stack.namespace, options.cluster_domain, svc.port
    )
}

pub(super) fn upstream_id(svc: &Service) -> String {
    // Service names are DNS-1035 labels: no '_', so the mapping is one to one.
    format!("svc_{}", svc.name.as_str().replace('-', "_"))
}

/// Where nginx sends a routed service's requests: its Service's name or ClusterIP with the
/// port; `None` when the operator knows no address for it yet.
pub(super) fn upstream_server(
    stack: &Stack,
    svc: &Service,
    options: &BuildOptions,
) -> Option<String> {
    match &options.upstreams {
        Upstreams::Names => Some(upstream_host(stack, svc, options)),
        Upstreams::ClusterIps(ips) => ips
            .get(svc.name.as_str())
            .map(|ip| std::net::SocketAddr::new(*ip, svc.port).to_string()),
    }
}

pub(super) fn upstreams(w: &mut String, stack: &Stack, options: &BuildOptions) {
    let how = match options.upstreams {
        Upstreams::Names => "by name, resolved once when nginx starts or reloads",
        Upstreams::ClusterIps(_) => "by the ClusterIP of their Service",
    };
    let _ = writeln!(
        w,
        "
    # Routed services, {how}.
    # Nothing is resolved per request, and connections are kept alive: kube-proxy picks a
    # ready pod for each new connection, and one connection serves for at most {UPSTREAM_CONNECTION_SECONDS}s,
    # so load follows pods that come and go.
    # Each address is listed twice: one retry, on a new connection, of an idempotent request
    # that could not reach a pod (proxy_next_upstream); max_fails=0: never marked down."
    );
    // Routed services, and the verdict service of edge authentication.
    for svc in stack.services.iter().filter(|s| stack.gateway_reaches(s)) {
        let Some(server) = upstream_server(stack, svc, options) else {
            continue;
        };
        let _ = writeln!(
            w,
            "
    upstream {id} {{
        server {server} max_fails=0;
        server {server} max_fails=0;
        keepalive {UPSTREAM_KEEPALIVE};
        keepalive_timeout {UPSTREAM_IDLE_SECONDS}s;
        keepalive_time {UPSTREAM_CONNECTION_SECONDS}s;
    }}",
            id = upstream_id(svc),
        );
    }
}
