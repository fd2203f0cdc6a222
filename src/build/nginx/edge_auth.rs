//! Edge authentication (`spec.gateway.edgeAuth`, issue 18): the verdict cache, the verdict
//! headers, the locations of a route (the route asks for a verdict, its public paths do not)
//! and the internal locations that ask the verdict service.

use std::fmt::Write as _;

use super::route_limits::route_limit_lines;
use super::upstreams::{upstream_id, upstream_server};
use crate::build::BuildOptions;
use crate::model::{Service, Stack};

/// Prefix of the internal locations that ask the verdict service, one per route with edge
/// authentication. `:` is never in a route or public path (validation), so no route or public
/// path location can be the same; `internal` keeps clients out of them anyway (404).
pub const VERDICT_LOCATION: &str = "/_opsconductor:verdict/";

/// Where verdicts are cached (`spec.gateway.edgeAuth.cacheSeconds`): a memory-backed volume
/// of its own in the pod, so that the cache keys, which hold the clients' `Authorization`
/// values, never reach a disk.
pub const VERDICT_CACHE_DIR: &str = "/tmp/verdicts";

/// The variable holding a verdict header (lowercase, `-` as `_`).
pub(super) fn verdict_var(header: &str) -> String {
    format!("$opsconductor_verdict_{}", header.replace('-', "_"))
}

/// The verdict cache, when edge authentication asks for one.
pub(super) fn verdict_cache(w: &mut String, stack: &Stack) {
    let Some(a) = stack.verdicts().filter(|a| a.cache_seconds > 0) else {
        return;
    };
    let _ = writeln!(
        w,
        r#"
    # Verdicts of edge authentication, kept {n} s per route and Authorization value, in memory
    # only. A request without Authorization always asks.
    proxy_cache_path {VERDICT_CACHE_DIR} levels=1:2 keys_zone=opsconductor_verdicts:1m max_size=8m inactive={n}s use_temp_path=off;
    map $http_authorization $opsconductor_no_authorization {{
        ""      1;
        default 0;
    }}"#,
        n = a.cache_seconds
    );
}

/// Server level: the verdict's headers start empty on every request, and only a verdict fills
/// them (`auth_request_set`); an empty header is never sent.
pub(super) fn verdict_variables(w: &mut String, stack: &Stack) {
    let Some(a) = stack.verdicts().filter(|a| !a.pass_headers.is_empty()) else {
        return;
    };
    let _ = writeln!(
        w,
        "\n        # Headers of a verdict (edge authentication): filled on routes that ask for one."
    );
    for h in &a.pass_headers {
        let _ = writeln!(w, "        set {} \"\";", verdict_var(h));
    }
}

/// The locations of one route: the route itself, then each public path (exact, or a prefix
/// when it ends in `/`), each with the directives that go before its `proxy_pass`.
pub(super) fn route_locations(stack: &Stack, route: &str, svc: &Service) -> Vec<(String, String)> {
    let limits = route_limit_lines(stack, svc);
    let Some(auth) = &svc.edge_auth else {
        return vec![(route.to_string(), limits)];
    };
    let mut verdict = format!("\n            auth_request {VERDICT_LOCATION}{};", svc.name);
    for h in stack.verdicts().map_or(&[][..], |a| &a.pass_headers[..]) {
        let _ = write!(
            verdict,
            "\n            auth_request_set {} $upstream_http_{};",
            verdict_var(h),
            h.replace('-', "_")
        );
    }
    let mut out = vec![(route.to_string(), format!("{limits}{verdict}"))];
    for p in &auth.public_paths {
        let location = if p.ends_with('/') {
            p.clone()
        } else {
            format!("= {p}")
        };
        out.push((location, limits.clone()));
    }
    out
}

/// One internal location per route with edge authentication: a GET without body to the
/// verdict service's path, with the client's headers (but the ones the inside trusts), the
/// original method and URI; 2xx passes, 401 and 403 go back to the client, anything else is a
/// 500. It sets its own `proxy_set_header` list, so nothing of the server's is inherited.
pub(super) fn verdict_locations(w: &mut String, stack: &Stack, options: &BuildOptions) {
    let Some(a) = stack.verdicts() else {
        return;
    };
    let Some(verifier) = stack.service(&a.service) else {
        return;
    };
    // A verdict service without an address yet (its Service is not created yet): the
    // subrequest answers 503, which auth_request turns into 500: closed, never open.
    let target = if upstream_server(stack, verifier, options).is_some() {
        format!("proxy_pass http://{}{};", upstream_id(verifier), a.path)
    } else {
        "return 503;".to_string()
    };
    let mut strip: Vec<&String> = stack.gateway.strip_request_headers.iter().collect();
    for h in &a.pass_headers {
        if !strip.contains(&h) {
            strip.push(h);
        }
    }
    let strip: String = strip
        .iter()
        .map(|h| format!("\n            proxy_set_header {h} \"\";"))
        .collect();
    let cache = if a.cache_seconds > 0 {
        format!(
            "
            proxy_cache opsconductor_verdicts;
            proxy_cache_key \"{{svc}} $http_authorization\";
            proxy_cache_valid 200 204 401 403 {n}s;
            proxy_cache_bypass $opsconductor_no_authorization;
            proxy_no_cache $opsconductor_no_authorization;
            # At most {n} s, whatever the verdict service says about caching.
            proxy_ignore_headers Cache-Control Expires X-Accel-Expires Set-Cookie Vary;",
            n = a.cache_seconds
        )
    } else {
        String::new()
    };
    for svc in stack.services.iter().filter(|s| s.edge_auth.is_some()) {
        let _ = writeln!(
            w,
            r#"
        # Verdicts for route {route} from service {verifier} (edge authentication).
        location = {VERDICT_LOCATION}{name} {{
            internal;
            {target}
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header Upgrade "";
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header Forwarded "";
            proxy_set_header X-Request-ID $request_id;
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Original-Method $request_method;{strip}{cache}
        }}"#,
            route = svc.route.as_deref().unwrap_or_default(),
            verifier = verifier.name,
            name = svc.name,
            cache = cache.replace("{svc}", svc.name.as_str()),
        );
    }
}
