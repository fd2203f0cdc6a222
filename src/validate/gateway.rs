//! The gateway and its edge: TLS-terminating nginx settings, client addresses, edge auth, headers.

use super::Errors;
use super::services::check_selector;
use super::syntax::{check_host, check_path};
use crate::crd::OpsConductorStackSpec;
use crate::model::{
    ContentSecurityPolicy, EdgeAuth, Gateway, GatewayMetrics, Hsts, MetricsScraper, RateLimit,
    Timeouts,
};
use ipnet::IpNet;
use std::collections::BTreeSet;
use std::time::Duration;

pub(super) fn validate_gateway(spec: &OpsConductorStackSpec, errs: &mut Errors) -> Option<Gateway> {
    let g = &spec.gateway;
    let before = errs.0.len();
    if g.hosts.is_empty() || g.hosts.len() > 100 {
        errs.add(
            "spec.gateway.hosts",
            format!("needs 1 to 100 hosts, got {}", g.hosts.len()),
        );
    }
    let mut seen = BTreeSet::new();
    let mut hosts = Vec::new();
    for (i, host) in g.hosts.iter().enumerate() {
        let path = format!("spec.gateway.hosts[{i}]");
        match check_host(host) {
            Ok(h) => {
                if !seen.insert(h.clone()) {
                    errs.add(&path, format!("duplicate host {host:?}"));
                }
                hosts.push(h);
            }
            Err(e) => errs.add(&path, e),
        }
    }
    if g.image.trim().is_empty() {
        errs.add("spec.gateway.image", "must not be empty");
    }
    if !(1..=100).contains(&g.replicas) {
        errs.add(
            "spec.gateway.replicas",
            format!("{} is out of range 1 to 100", g.replicas),
        );
    }
    let ranges: Vec<IpNet> = g
        .allowed_source_ranges
        .iter()
        .enumerate()
        .filter_map(|(i, r)| errs.cidr(&format!("spec.gateway.allowedSourceRanges[{i}]"), r))
        .collect();
    let (trusted_proxies, strip_request_headers) = validate_edge(spec, errs);
    let rate_limit = g.rate_limit.as_ref().and_then(|r| {
        let rps = u32::try_from(r.requests_per_second)
            .ok()
            .filter(|v| *v >= 1);
        let burst = u32::try_from(r.burst).ok();
        if rps.is_none() {
            errs.add(
                "spec.gateway.rateLimit.requestsPerSecond",
                "must be at least 1",
            );
        }
        if burst.is_none() {
            errs.add("spec.gateway.rateLimit.burst", "must not be negative");
        }
        Some(RateLimit {
            requests_per_second: rps?,
            burst: burst?,
        })
    });
    let edge_auth = validate_edge_auth(spec, errs);
    let content_security_policy = g.content_security_policy.as_ref().and_then(|c| {
        check_csp(&c.policy)
            .map_err(|e| errs.add("spec.gateway.contentSecurityPolicy.policy", e))
            .ok()?;
        Some(ContentSecurityPolicy {
            policy: c.policy.trim().to_string(),
            report_only: c.report_only,
        })
    });
    let max_age = u64::try_from(g.hsts.max_age_seconds).ok();
    if max_age.is_none() {
        errs.add("spec.gateway.hsts.maxAgeSeconds", "must not be negative");
    }
    if g.hsts.preload && (!g.hsts.include_sub_domains || g.hsts.max_age_seconds < 31_536_000) {
        errs.add(
            "spec.gateway.hsts.preload",
            "preload lists require includeSubDomains: true and maxAgeSeconds of at least 31536000",
        );
    }
    if let Err(e) = check_nginx_size(&g.client_max_body_size) {
        errs.add("spec.gateway.clientMaxBodySize", e);
    }
    let mut timeout = |field: &str, value: i32, max: i32| {
        if (1..=max).contains(&value) {
            Duration::from_secs(value as u64)
        } else {
            errs.add(
                format!("spec.gateway.timeouts.{field}"),
                format!("{value} is out of range 1 to {max}"),
            );
            Duration::ZERO
        }
    };
    let timeouts = Timeouts {
        connect: timeout("connectSeconds", g.timeouts.connect_seconds, 300),
        send: timeout("sendSeconds", g.timeouts.send_seconds, 3600),
        read: timeout("readSeconds", g.timeouts.read_seconds, 3600),
    };
    let metrics = validate_metrics(g.metrics.as_ref(), errs);
    if errs.0.len() != before {
        return None;
    }
    Some(Gateway {
        metrics,
        timeouts,
        resources: g
            .resources
            .clone()
            .unwrap_or_else(crate::build::gateway::default_resources),
        hosts,
        image: g.image.clone(),
        replicas: g.replicas,
        service_type: g.service_type,
        allowed_source_ranges: ranges,
        rate_limit,
        edge_auth,
        content_security_policy,
        hsts: Hsts {
            max_age_seconds: max_age?,
            include_sub_domains: g.hsts.include_sub_domains,
            preload: g.hsts.preload,
        },
        client_max_body_size: g.client_max_body_size.to_ascii_lowercase(),
        trusted_proxies,
        proxy_protocol: g.proxy_protocol,
        strip_request_headers,
    })
}

/// `spec.gateway.metrics`: `None` unless enabled; enabled needs at least one scraper, and the
/// selectors must be ones the API server takes (they go into the gateway's NetworkPolicy).
fn validate_metrics(
    m: Option<&crate::crd::GatewayMetricsSpec>,
    errs: &mut Errors,
) -> Option<GatewayMetrics> {
    let m = m?;
    let before = errs.0.len();
    if let Some(image) = &m.image
        && image.trim().is_empty()
    {
        errs.add("spec.gateway.metrics.image", "must not be empty");
    }
    if m.enabled && m.allow_from.is_empty() {
        errs.add(
            "spec.gateway.metrics.allowFrom",
            "must name who may scrape the metrics (the Prometheus namespace, and pods) when \
             enabled is true: nobody else reaches the metrics port",
        );
    }
    if m.allow_from.len() > 10 {
        errs.add(
            "spec.gateway.metrics.allowFrom",
            format!("at most 10 entries, got {}", m.allow_from.len()),
        );
    }
    for (i, a) in m.allow_from.iter().enumerate() {
        let p = format!("spec.gateway.metrics.allowFrom[{i}]");
        check_selector(
            errs,
            &format!("{p}.namespaceSelector"),
            &a.namespace_selector,
            None,
            &[],
        );
        if let Some(pods) = &a.pod_selector {
            check_selector(errs, &format!("{p}.podSelector"), pods, None, &[]);
        }
    }
    if !m.enabled || errs.0.len() != before {
        return None;
    }
    Some(GatewayMetrics {
        image: m
            .image
            .as_deref()
            .unwrap_or(crate::crd::DEFAULT_GATEWAY_IMAGE)
            .trim()
            .to_string(),
        allow_from: m
            .allow_from
            .iter()
            .map(|a| MetricsScraper {
                namespace_selector: a.namespace_selector.clone(),
                pod_selector: a.pod_selector.clone(),
            })
            .collect(),
    })
}

/// Client identity and header hygiene at the edge (issue 18): whose word about the client's
/// address is taken, whether the listeners expect the PROXY protocol, and which request
/// headers never reach a service. Returns the trusted CIDRs and the lowercase header names
/// to remove (the built-in ones first). See docs/api.md#specgateway.
fn validate_edge(spec: &OpsConductorStackSpec, errs: &mut Errors) -> (Vec<IpNet>, Vec<String>) {
    let g = &spec.gateway;
    let mut trusted = Vec::new();
    for (i, r) in g.trusted_proxies.iter().enumerate() {
        let path = format!("spec.gateway.trustedProxies[{i}]");
        match errs.cidr(&path, r) {
            Some(net) if net.prefix_len() == 0 => errs.add(
                &path,
                format!(
                    "{r:?} trusts every address: any client could choose its own address; \
                     list the addresses of the proxies in front of the gateway"
                ),
            ),
            Some(net) => trusted.push(net),
            None => {}
        }
    }
    if g.proxy_protocol && g.trusted_proxies.is_empty() {
        errs.add(
            "spec.gateway.trustedProxies",
            "proxyProtocol: true needs the addresses of the proxies that send it; without \
             them every client would have the proxy's address",
        );
    }
    // With tls.acme, HTTP-01 works under the PROXY protocol too: the CA's validation comes
    // through the proxy that sends the header, and the operator's self-check sends its own
    // (acme::http01::SELF_CHECK_PROXY_HEADER).
    let mut headers: Vec<String> = crate::model::ALWAYS_STRIPPED_HEADERS
        .iter()
        .map(|h| h.to_string())
        .collect();
    let mut seen = BTreeSet::new();
    for (i, h) in g.strip_request_headers.iter().enumerate() {
        let path = format!("spec.gateway.stripRequestHeaders[{i}]");
        let lower = h.to_ascii_lowercase();
        if let Err(e) = check_strippable_header(h) {
            errs.add(&path, e);
        } else if !seen.insert(lower.clone()) {
            errs.add(&path, format!("duplicate header {h:?}"));
        } else if !headers.contains(&lower) {
            headers.push(lower);
        }
    }
    (trusted, headers)
}

/// `spec.gateway.edgeAuth` (issue 18): a service of the stack, a path on it, the verdict's
/// headers to pass on, the cache time. See docs/api.md#specgatewayedgeauth.
fn validate_edge_auth(spec: &OpsConductorStackSpec, errs: &mut Errors) -> Option<EdgeAuth> {
    let a = spec.gateway.edge_auth.as_ref()?;
    let p = "spec.gateway.edgeAuth";
    let before = errs.0.len();
    let service = errs.label(&format!("{p}.service"), &a.service);
    if service.is_some() && !spec.services.iter().any(|s| s.name == a.service) {
        errs.add(
            format!("{p}.service"),
            format!(
                "unknown service {:?}: the verdicts come from a service of this stack",
                a.service
            ),
        );
    }
    if let Err(e) = check_path(&a.path, false) {
        errs.add(format!("{p}.path"), e);
    }
    let mut pass_headers: Vec<String> = Vec::new();
    if a.pass_headers.len() > 20 {
        errs.add(format!("{p}.passHeaders"), "at most 20 headers");
    }
    for (i, h) in a.pass_headers.iter().enumerate() {
        let path = format!("{p}.passHeaders[{i}]");
        let lower = h.to_ascii_lowercase();
        if let Err(e) = check_pass_header(h) {
            errs.add(&path, e);
        } else if pass_headers.contains(&lower) {
            errs.add(&path, format!("duplicate header {h:?}"));
        } else {
            pass_headers.push(lower);
        }
    }
    let cache_seconds = match u32::try_from(a.cache_seconds) {
        Ok(v) if v <= 300 => v,
        _ => {
            errs.add(
                format!("{p}.cacheSeconds"),
                format!(
                    "{} is out of range 0 to 300 (a verdict outlives a revoked token that long)",
                    a.cache_seconds
                ),
            );
            0
        }
    };
    if errs.0.len() != before {
        return None;
    }
    Some(EdgeAuth {
        service: service?,
        path: a.path.clone(),
        pass_headers,
        cache_seconds,
    })
}

/// A header of the verdict passed on to a service: a name the gateway can remove from client
/// requests (see [`check_strippable_header`]), and not the client's own credentials or one of
/// the headers the services trust from each other.
fn check_pass_header(h: &str) -> Result<(), String> {
    check_strippable_header(h)?;
    match h.to_ascii_lowercase().as_str() {
        "authorization" | "proxy-authorization" | "cookie" => Err(format!(
            "{h:?} carries the client's own credentials, which the services may need; pass the \
             verdict in a header of its own, e.g. X-User-Id"
        )),
        "x-internal" | "x-service" => Err(format!(
            "{h:?} is what the services trust from each other; a verdict about a client must \
             not set it"
        )),
        _ => Ok(()),
    }
}

/// A Content-Security-Policy value that stays one nginx string and one header line: printable
/// ASCII (no control characters, so no line break), and none of `"` (ends the string), `\`
/// (escapes), `$` (nginx expands variables in add_header), `{` and `}` (not used by CSP, and
/// kept out of nginx.conf). `;` and `'` are fine inside the quoted string.
fn check_csp(v: &str) -> Result<(), String> {
    let t = v.trim();
    if t.is_empty() {
        return Err("must not be empty".into());
    }
    if t.len() > 4096 {
        return Err(format!("is {} characters; at most 4096", t.len()));
    }
    if let Some(c) = t
        .chars()
        .find(|c| !(c.is_ascii_graphic() || *c == ' ') || "\"\\${}".contains(*c))
    {
        return Err(format!(
            "contains {c:?}; a policy here is printable ASCII without '\"', '\\', '$', '{{' \
             or '}}' (e.g. \"default-src 'self'; frame-ancestors 'none'\")"
        ));
    }
    Ok(())
}

/// A request header the spec may have removed: a name nginx passes on from clients (letters,
/// digits and `-`: with nginx's defaults a client header with any other character, `_`
/// included, never reaches a service), and none the gateway sets or needs itself.
fn check_strippable_header(h: &str) -> Result<(), String> {
    if h.is_empty() || h.len() > 64 {
        return Err(format!("{h:?} must have 1 to 64 characters"));
    }
    if let Some(c) = h
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(format!(
            "{h:?} contains {c:?}; a header name here is letters, digits and '-' (nginx drops \
             client headers with other characters, '_' included, before they reach a service)"
        ));
    }
    match h.to_ascii_lowercase().as_str() {
        "host" | "connection" | "upgrade" | "forwarded" | "x-forwarded-for"
        | "x-forwarded-proto" | "x-forwarded-host" | "x-forwarded-port" | "x-real-ip"
        | "x-request-id" => Err(format!(
            "{h:?} is set by the gateway itself on every request to a service"
        )),
        "content-length" | "transfer-encoding" => Err(format!(
            "{h:?} frames the request body; removing it would break requests"
        )),
        _ => Ok(()),
    }
}

/// A size nginx reads (`10m`, `512k`, `1g`, plain bytes), at least one byte: `0` would switch
/// the limit off, and nginx refuses sizes beyond its file offset range (2^63 - 1 bytes).
fn check_nginx_size(s: &str) -> Result<(), String> {
    let digits = s.trim_end_matches(['k', 'K', 'm', 'M', 'g', 'G']);
    let scale: u64 = match s.len() - digits.len() {
        0 => 1,
        1 => match s.as_bytes()[s.len() - 1].to_ascii_lowercase() {
            b'k' => 1 << 10,
            b'm' => 1 << 20,
            _ => 1 << 30,
        },
        _ => 0,
    };
    if digits.is_empty() || scale == 0 || !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("{s:?} is not a size like 10m, 512k or 1g"));
    }
    let value: u64 = digits.parse().unwrap_or(u64::MAX);
    if value == 0 {
        return Err(format!(
            "{s:?} would switch the limit off; give the largest body the services accept, e.g. 10m"
        ));
    }
    if value > i64::MAX as u64 / scale {
        return Err(format!("{s:?} is larger than nginx can handle"));
    }
    Ok(())
}
