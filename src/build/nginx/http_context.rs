//! The `http` context's own settings: timeouts, the access log, the maps of the configured
//! hosts (SNI, the redirect, the 421 rule, wildcards), where the client's address comes from,
//! and TLS.

use std::fmt::Write as _;

use super::{CLIENT_TIMEOUT_SECONDS, ECDH_CURVES, TLS_DIR, TLS12_CIPHERS, TMP_DIR};
use crate::model::Stack;

pub(super) fn http_settings(w: &mut String, stack: &Stack) {
    let g = &stack.gateway;
    let longest_host = g.hosts.iter().map(String::len).max().unwrap_or(0);
    let _ = writeln!(
        w,
        r#"    server_tokens off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65s;
    # Slow or silent clients are dropped, and their connections freed at once.
    client_header_timeout {CLIENT_TIMEOUT_SECONDS}s;
    client_body_timeout {CLIENT_TIMEOUT_SECONDS}s;
    reset_timedout_connection on;
    # Requests in progress per client address (see limit_conn in the HTTPS server).
    limit_conn_zone $binary_remote_addr zone=opsconductor_conn_per_client:10m;
    limit_conn_status 429;
    limit_conn_log_level warn;
    client_max_body_size {body};
    # Redirects nginx makes itself (a route asked for without its trailing slash) stay
    # relative: an absolute one would name the pod's port, 8443, which no client can reach.
    absolute_redirect off;
    # Fit the longest host names (DNS allows 253 characters; nginx's defaults, about 50).
    server_names_hash_bucket_size {bucket};
    server_names_hash_max_size 1024;
    map_hash_bucket_size {bucket};
    client_body_temp_path {TMP_DIR}/client_body;
    proxy_temp_path {TMP_DIR}/proxy;
    fastcgi_temp_path {TMP_DIR}/fastcgi;
    uwsgi_temp_path {TMP_DIR}/uwsgi;
    scgi_temp_path {TMP_DIR}/scgi;

    # One JSON object per request on stdout: every request that reaches the edge, in one place.
    # remote_addr is the client (named by a trusted proxy, if any); peer_addr the TCP peer.
    log_format opsconductor_json escape=json
        '{{"time":"$time_iso8601","remote_addr":"$remote_addr","peer_addr":"$realip_remote_addr",'
        '"request_id":"$request_id",'
        '"host":"$host","sni":"$ssl_server_name","method":"$request_method","uri":"$request_uri",'
        '"protocol":"$server_protocol","status":$status,"bytes_sent":$body_bytes_sent,'
        '"request_time":$request_time,"upstream":"$upstream_addr",'
        '"upstream_status":"$upstream_status","upstream_time":"$upstream_response_time",'
        '"tls":"$ssl_protocol","tls_reused":"$ssl_session_reused","user_agent":"$http_user_agent"}}';
    access_log /dev/stdout opsconductor_json;

    # Only WebSocket upgrades pass through. Any other Upgrade (h2c above all) is dropped: a
    # backend that accepted it would turn the connection into a raw tunnel past the routes,
    # the Host check, the rate limit, the access log and the header rewriting. Every request
    # that is not a WebSocket upgrade goes out with an empty Connection header, so that
    # kept-alive upstream connections can be reused.
    map $http_upgrade $opsconductor_upgrade {{
        default         "";
        ~*^websocket$   websocket;
    }}
    map $http_upgrade $opsconductor_connection {{
        default         "";
        ~*^websocket$   upgrade;
    }}

    # The configured host the client named in SNI, in lower case (map keys match
    # case-insensitively; $ssl_server_name is as the client sent it).
    map $ssl_server_name $opsconductor_sni_host {{
        hostnames;
        default "";
{sni_hosts}    }}

    # The configured host a plain-HTTP request names, for the redirect to HTTPS: never a host
    # the client made up (that would be an open redirect).
    map $host $opsconductor_redirect_host {{
        hostnames;
        default "";
{sni_hosts}    }}"#,
        body = g.client_max_body_size,
        bucket = server_names_hash_bucket_size(longest_host),
        sni_hosts = g
            .hosts
            .iter()
            .map(|h| match wildcard_regex(h) {
                // A wildcard host: the pattern stands for the name (compared with the
                // pattern the Host header maps to, below).
                Some(re) => format!("        \"~*{re}\" \"{h}\";\n"),
                None => format!("        {h} {h};\n"),
            })
            .collect::<String>(),
    );
    if g.hosts.iter().any(|h| wildcard_regex(h).is_some()) {
        // With wildcard hosts the redirect names the request's own host when a wildcard
        // matches it (`$host`: lowercase, and checked by the pattern), and the 421 rule
        // compares the configured host (or wildcard) the Host header and the SNI name match.
        let redirect = g
            .hosts
            .iter()
            .map(|h| match wildcard_regex(h) {
                Some(re) => format!("        \"~{re}\" $host;\n"),
                None => format!("        {h} {h};\n"),
            })
            .collect::<String>();
        let patterns = g
            .hosts
            .iter()
            .map(|h| match wildcard_regex(h) {
                Some(re) => format!("        \"~{re}\" \"{h}\";\n"),
                None => format!("        {h} {h};\n"),
            })
            .collect::<String>();
        w.truncate(
            w.rfind("    # The configured host a plain-HTTP request names")
                .unwrap_or(w.len()),
        );
        let _ = writeln!(
            w,
            r#"    # The configured host a plain-HTTP request names, for the redirect to HTTPS: never a host
    # the client made up (that would be an open redirect).
    map $host $opsconductor_redirect_host {{
        hostnames;
        default "";
{redirect}    }}

    # The configured host or wildcard the Host header matches (the 421 rule).
    map $host $opsconductor_host_pattern {{
        hostnames;
        default "";
{patterns}    }}"#
        );
    }
    if let Some(rl) = g.rate_limit {
        let _ = writeln!(
            w,
            "
    # Per client address, across all routes.
    limit_req_zone $binary_remote_addr zone=opsconductor_per_client:10m rate={}r/s;
    limit_req_status 429;
    limit_req_log_level warn;",
            rl.requests_per_second
        );
    }
}

/// Where the client's address comes from: the TCP peer, unless the peer is one of the
/// trusted proxies; then the PROXY protocol header (with `proxyProtocol`) or the rightmost
/// address of `X-Forwarded-For` that is not itself a trusted proxy. Everything keyed on
/// `$remote_addr` (the rate limits, the access log, `X-Real-IP` and `X-Forwarded-For` towards
/// the services) follows.
pub(super) fn client_address(w: &mut String, stack: &Stack) {
    let g = &stack.gateway;
    if g.trusted_proxies.is_empty() {
        return;
    }
    let _ = writeln!(
        w,
        "
    # The client's address as the trusted proxies in front report it; from anyone else, the
    # TCP peer's address stands."
    );
    for cidr in &g.trusted_proxies {
        let _ = writeln!(w, "    set_real_ip_from {cidr};");
    }
    if g.proxy_protocol {
        let _ = writeln!(w, "    real_ip_header proxy_protocol;");
    } else {
        let _ = writeln!(
            w,
            "    real_ip_header X-Forwarded-For;
    real_ip_recursive on;"
        );
    }
}

/// For a wildcard host `*.example.com`, the regex of the names it covers: exactly one label
/// in front (as a certificate's wildcard does, RFC 6125 section 6.4.3), so `a.b.example.com`
/// and `example.com` are not matched. nginx's own `*.example.com` would match any depth.
pub(super) fn wildcard_regex(host: &str) -> Option<String> {
    let rest = host.strip_prefix("*.")?;
    Some(format!("^[a-z0-9-]+\\.{}$", rest.replace('.', "\\.")))
}

/// Hash bucket size for the server names and the SNI map alike. nginx stores each name with
/// a pointer and two bytes of overhead, 8-byte aligned, plus a terminating pointer per
/// bucket, and rounds the bucket size up to a cache line. Room for two of the longest names
/// per bucket lets nginx find a table size quickly even with the 100 hosts the spec allows.
pub(super) fn server_names_hash_bucket_size(longest_name: usize) -> usize {
    let element = (8 + longest_name + 2).div_ceil(8) * 8;
    (2 * element + 8).div_ceil(64) * 64
}

pub(super) fn tls_settings(w: &mut String) {
    let _ = writeln!(
        w,
        "
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ciphers {TLS12_CIPHERS};
    ssl_prefer_server_ciphers off;
    ssl_ecdh_curve {ECDH_CURVES};
    # Resumption from a per-pod session cache (TLS 1.2 session IDs, TLS 1.3 stateful tickets).
    # Stateless tickets stay off: nginx never rotates their key while it runs, which would
    # void forward secrecy for as long as the pod lives. No 0-RTT (replayable).
    ssl_session_cache shared:opsconductor_tls:10m;
    ssl_session_timeout 1d;
    ssl_session_tickets off;
    ssl_early_data off;
    ssl_certificate {TLS_DIR}/tls.crt;
    ssl_certificate_key {TLS_DIR}/tls.key;"
    );
}
