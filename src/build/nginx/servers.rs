//! The `server` blocks: the probes-only port (with the PROXY protocol), port 8080 (probes,
//! HTTP-01 answers, the redirect) and port 8443 (the refusal of unknown SNI, then the stack's
//! hosts with their routes).

use std::fmt::Write as _;

use super::edge_auth::{route_locations, verdict_locations, verdict_variables};
use super::headers::{request_header_hygiene, security_headers};
use super::http_context::wildcard_regex;
use super::request_metrics::route_label;
use super::route_limits::any_route_rate;
use super::upstreams::{upstream_id, upstream_server};
use super::{
    ACME_CHALLENGE_PREFIX, CONFIG_STATUS_PORT, CONFIG_STATUS_URL_PATH, HEALTH_PATH, HEALTH_PORT,
    HTTP_PORT, HTTPS_PORT, MAX_REQUESTS_PER_CLIENT, STATUS_PATH, STATUS_PORT,
};
use crate::build::BuildOptions;
use crate::model::{CertificateSource, Stack};

/// ` proxy_protocol` on the listeners of ports 8080 and 8443 when the spec asks for it.
pub(super) fn proxy_protocol(stack: &Stack) -> &'static str {
    if stack.gateway.proxy_protocol {
        " proxy_protocol"
    } else {
        ""
    }
}

pub(super) fn health_server(w: &mut String) {
    let _ = writeln!(
        w,
        r#"
    # Port {HEALTH_PORT}: the probes only. 8080 and 8443 expect the PROXY protocol, which the
    # kubelet does not speak. Not part of the gateway Service.
    server {{
        listen {HEALTH_PORT} default_server;
        listen [::]:{HEALTH_PORT} default_server;
        access_log off;

        location = {HEALTH_PATH} {{
            default_type text/plain;
            return 200 "ok\n";
        }}

        location / {{
            return 404;
        }}
    }}"#
    );
}

/// `stub_status` for the metrics exporter in the same pod: on the pod's loopback only (the
/// exporter shares the network namespace), not logged, 404 for anything else.
pub(super) fn status_server(w: &mut String) {
    let _ = writeln!(
        w,
        r#"
    # Port {STATUS_PORT} on loopback: nginx's counters for the metrics exporter beside it in the
    # pod (spec.gateway.metrics). Nothing outside the pod reaches it.
    server {{
        listen 127.0.0.1:{STATUS_PORT} default_server;
        access_log off;

        location = {STATUS_PATH} {{
            stub_status;
        }}

        location / {{
            return 404;
        }}
    }}"#
    );
}

pub(super) fn config_status_server(w: &mut String) {
    let _ = writeln!(
        w,
        r#"
    # Port {CONFIG_STATUS_PORT}: the reload loop's last result (which configuration this pod loaded or
    # refused, and why), read by the operator for the stack's GatewayConfigLoaded condition.
    # Not part of the gateway Service; the gateway's NetworkPolicy admits only the operator.
    server {{
        listen {CONFIG_STATUS_PORT} default_server;
        listen [::]:{CONFIG_STATUS_PORT} default_server;
        access_log off;

        location = {CONFIG_STATUS_URL_PATH} {{
            default_type text/plain;
            alias {status_file};
        }}

        location / {{
            return 404;
        }}
    }}"#,
        status_file = crate::build::gateway::CONFIG_STATUS_PATH,
    );
}

pub(super) fn plain_http_server(w: &mut String, stack: &Stack, options: &BuildOptions) {
    let _ = writeln!(
        w,
        r#"
    # Port 8080: probes, ACME HTTP-01 challenges, and a redirect for everything else.
    server {{
        listen {HTTP_PORT}{pp} default_server;
        listen [::]:{HTTP_PORT}{pp} default_server;

        location = {HEALTH_PATH} {{
            access_log off;
            default_type text/plain;
            return 200 "ok\n";
        }}
"#,
        pp = proxy_protocol(stack),
    );
    match (&stack.tls.source, &options.acme_thumbprint) {
        (CertificateSource::Acme(_), Some(thumbprint)) => {
            let _ = writeln!(
                w,
                r#"        # HTTP-01, stateless: the key authorization is "<token>.<account thumbprint>".
        location ~ "^/\.well-known/acme-challenge/([-_A-Za-z0-9]+)$" {{
            default_type text/plain;
            return 200 "$1.{thumbprint}";
        }}
"#
            );
        }
        _ => {
            let _ = writeln!(
                w,
                r#"        # No ACME account yet (or a user-managed certificate): nothing to answer.
        location {ACME_CHALLENGE_PREFIX} {{
            return 404;
        }}
"#
            );
        }
    }
    let _ = writeln!(
        w,
        r#"        location / {{
            if ($opsconductor_redirect_host = "") {{
                return 421;
            }}
            return 308 https://$opsconductor_redirect_host$request_uri;
        }}
    }}"#
    );
}

pub(super) fn tls_servers(w: &mut String, stack: &Stack, options: &BuildOptions) {
    let g = &stack.gateway;
    let headers = security_headers(stack);
    let _ = writeln!(
        w,
        r#"
    # Unknown or missing SNI: the TLS handshake is refused, no certificate is shown. A request
    # whose Host header names no configured host lands here too, on a session opened for one.
    server {{
        listen {HTTPS_PORT} ssl http2{pp} default_server;
        listen [::]:{HTTPS_PORT} ssl http2{pp} default_server;
        ssl_reject_handshake on;
{headers}
        return 421;
    }}

    server {{
        listen {HTTPS_PORT} ssl http2{pp};
        listen [::]:{HTTPS_PORT} ssl http2{pp};
        server_name {hosts};

        # The Host header must name the host the TLS session was opened for (a client that
        # coalesced connections retries on a new one, RFC 9110 section 15.5.20).
        {host_rule}

        limit_conn opsconductor_conn_per_client {MAX_REQUESTS_PER_CLIENT};

        # Set here and nowhere below: a location with its own add_header would drop all of these.
{headers}"#,
        hosts = g
            .hosts
            .iter()
            .map(|h| match wildcard_regex(h) {
                Some(re) => format!("\"~{re}\""),
                None => h.clone(),
            })
            .collect::<Vec<_>>()
            .join(" "),
        host_rule = if g.hosts.iter().any(|h| wildcard_regex(h).is_some()) {
            // A wildcard host: the Host header must match the same configured host or
            // wildcard as the SNI name (the certificate covers both names).
            "if ($opsconductor_host_pattern != $opsconductor_sni_host) {\n            return 421;\n        }\n        if ($opsconductor_sni_host = \"\") {\n            return 421;\n        }"
        } else {
            "if ($host != $opsconductor_sni_host) {\n            return 421;\n        }"
        },
        pp = proxy_protocol(stack),
    );
    if let Some(rl) = g.rate_limit {
        let _ = writeln!(
            w,
            "        add_header Retry-After $opsconductor_retry_after always;
        limit_req zone=opsconductor_per_client burst={} nodelay;",
            rl.burst
        );
    } else if any_route_rate(stack) {
        let _ = writeln!(
            w,
            "        add_header Retry-After $opsconductor_retry_after always;"
        );
    }
    verdict_variables(w, stack);
    // Inherited by every location, none of which sets proxy_set_header itself (but the
    // internal ones that ask for verdicts, which set their own).
    let _ = writeln!(
        w,
        r#"
        proxy_http_version 1.1;
        proxy_set_header Upgrade $opsconductor_upgrade;
        proxy_set_header Connection $opsconductor_connection;
        proxy_set_header Host $host;
        # The gateway is the edge: what a client claims about earlier hops is dropped.
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-Proto https;
        proxy_set_header X-Forwarded-Host $host;
        proxy_set_header X-Forwarded-Port 443;
        proxy_set_header Forwarded "";
        proxy_set_header X-Request-ID $request_id;
        # Headers the services trust from each other never come from outside.
{strip}
        proxy_hide_header X-Powered-By;
        # A request that could not reach the service (refused, reset, connect timeout) is
        # retried once on a new connection: only if idempotent (nginx never re-sends a POST,
        # PATCH or LOCK that went out).
        proxy_next_upstream error timeout;
        proxy_next_upstream_tries 2;
        proxy_connect_timeout {connect}s;
        proxy_send_timeout {send}s;
        proxy_read_timeout {read}s;"#,
        strip = request_header_hygiene(stack),
        connect = g.timeouts.connect.as_secs(),
        send = g.timeouts.send.as_secs(),
        read = g.timeouts.read.as_secs(),
    );

    let mut routed: Vec<_> = stack
        .services
        .iter()
        .filter_map(|s| s.route.as_ref().map(|r| (r, s)))
        .collect();
    routed.sort_by(|a, b| a.0.cmp(b.0));
    for (route, svc) in &routed {
        // The route, then its public paths (edge authentication): the same service, the same
        // limits, no verdict asked for.
        for (location, policy) in route_locations(stack, route, svc) {
            // With metrics, the route's label first, before any rule that may answer.
            let policy = format!("{}{policy}", route_label(stack, svc));
            if upstream_server(stack, svc, options).is_some() {
                // Without a URI part, the request URI goes upstream exactly as the client sent
                // it.
                let _ = writeln!(
                    w,
                    "
        location {location} {{{policy}
            proxy_pass http://{id};
        }}",
                    id = upstream_id(svc),
                );
            } else {
                let _ = writeln!(
                    w,
                    "
        location {location} {{{policy}
            # No ClusterIP for Service {name} yet: written once the Service exists.
            return 503;
        }}",
                    name = svc.name,
                );
            }
        }
    }
    verdict_locations(w, stack, options);
    if !routed.iter().any(|(r, _)| r.as_str() == "/") {
        let _ = writeln!(
            w,
            "
        location / {{
            return 404;
        }}"
        );
    }
    let _ = writeln!(w, "    }}");
}
