//! Validation: the raw custom resource in, a [`Stack`] or every problem at once out.
//!
//! Pure: no client, no clock. Each problem names its field path the way `kubectl explain`
//! spells it (`spec.services[2].calls[0]: unknown service "user"`), so a user can find it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use ipnet::IpNet;

use crate::crd::{OpsConductorStack, OpsConductorStackSpec};
use crate::model::{
    Acme, Backend, CertificateSource, ContentSecurityPolicy, Dns01, DnsLabel, EdgeAuth, Egress,
    Gateway, Hsts, Port, Rate, RateLimit, Rfc2136, RouteAuth, RouteLimits, SecretKey, Service,
    Stack, Timeouts, Tls,
};
use crate::names::{self, Component};

/// One problem in a stack, at one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in a stack, in field order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("\n"))
    }
}

impl ValidationErrors {
    /// The messages joined with "; " for a condition message or an Event.
    pub fn one_line(&self) -> String {
        self.0
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Collects errors while walking the spec.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn label(&mut self, path: &str, value: &str) -> Option<DnsLabel> {
        DnsLabel::parse(value).map_err(|e| self.add(path, e)).ok()
    }

    fn port(&mut self, path: &str, value: i32) -> Option<Port> {
        match Port::try_from(value) {
            Ok(p) if p >= 1 => Some(p),
            _ => {
                self.add(path, format!("port {value} is out of range 1 to 65535"));
                None
            }
        }
    }

    fn cidr(&mut self, path: &str, value: &str) -> Option<IpNet> {
        match value.parse::<IpNet>() {
            Ok(net) if net.trunc() == net => Some(net),
            Ok(net) => {
                self.add(
                    path,
                    format!("{value:?} has host bits set; did you mean {}?", net.trunc()),
                );
                None
            }
            Err(_) => {
                self.add(
                    path,
                    format!("{value:?} is not a CIDR (e.g. 10.0.0.0/8 or 2001:db8::/32)"),
                );
                None
            }
        }
    }
}

/// Validates `stack`; `default_namespace` is used when the object has none (offline render).
pub fn validate(
    stack: &OpsConductorStack,
    default_namespace: &str,
) -> Result<Stack, ValidationErrors> {
    let mut errs = Errors::default();
    let raw_name = stack.metadata.name.clone().unwrap_or_default();
    let name = if raw_name.is_empty() {
        errs.add("metadata.name", "must be set");
        None
    } else {
        let name = errs.label("metadata.name", &raw_name);
        let max = names::max_stack_name_len();
        if raw_name.len() > max {
            errs.add(
                "metadata.name",
                format!(
                    "{raw_name:?} is {} characters; at most {max} fit, because derived names such as \"{raw_name}-gateway-config\" must stay within 63",
                    raw_name.len()
                ),
            );
            None
        } else {
            name
        }
    };
    let namespace = stack
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| default_namespace.to_string());
    // It reaches nginx.conf (upstream addresses) and every object: a DNS label, as the API
    // server requires of namespaces (checked here for `render`, which takes it from `-n`).
    if DnsLabel::parse(&namespace).is_err() && check_rfc1123_label(&namespace).is_err() {
        errs.add(
            "metadata.namespace",
            format!("{namespace:?} is not a namespace name (a DNS label: lowercase letters, digits and '-')"),
        );
    }
    let spec = &stack.spec;

    let gateway = validate_gateway(spec, &mut errs);
    let tls = validate_tls(spec, &mut errs);
    let services = validate_services(spec, name.as_ref(), &mut errs);
    let backends = validate_backends(spec, name.as_ref(), &services, &mut errs);
    check_wildcards(spec, &mut errs);
    if name.is_some() {
        errs.0
            .extend(secret_references(stack, std::slice::from_ref(&raw_name)));
    }

    match (name, gateway, tls) {
        (Some(name), Some(gateway), Some(tls)) if errs.0.is_empty() => Ok(Stack {
            name,
            namespace,
            uid: stack.metadata.uid.clone(),
            gateway,
            tls,
            services,
            backends,
            mode: spec.policy.mode,
            service_to_service: spec.policy.service_to_service,
        }),
        _ => Err(ValidationErrors(errs.0)),
    }
}

fn validate_gateway(spec: &OpsConductorStackSpec, errs: &mut Errors) -> Option<Gateway> {
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
    if errs.0.len() != before {
        return None;
    }
    Some(Gateway {
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
    if g.proxy_protocol && spec.tls.acme.is_some() {
        errs.add(
            "spec.gateway.proxyProtocol",
            "cannot be combined with tls.acme yet: the operator's self-check of the HTTP-01 \
             challenge reaches the gateway without a PROXY protocol header; use tls.secretName",
        );
    }
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

fn validate_tls(spec: &OpsConductorStackSpec, errs: &mut Errors) -> Option<Tls> {
    let t = &spec.tls;
    let before = errs.0.len();
    let renew_before = t
        .renew_before
        .as_deref()
        .and_then(|d| match parse_duration(d) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                errs.add("spec.tls.renewBefore", "must be greater than zero");
                None
            }
            Err(e) => {
                errs.add("spec.tls.renewBefore", e);
                None
            }
        });
    let source = match (&t.acme, &t.secret_name) {
        (Some(_), Some(_)) | (None, None) => {
            errs.add(
                "spec.tls",
                "exactly one of tls.acme or tls.secretName must be set",
            );
            None
        }
        (None, Some(secret)) => {
            if let Err(e) = check_subdomain(secret) {
                errs.add("spec.tls.secretName", e);
            }
            Some(CertificateSource::Secret(secret.clone()))
        }
        (Some(acme), None) => {
            let url = acme.directory_url.trim();
            if !url.starts_with("https://") || url.len() <= "https://".len() {
                errs.add(
                    "spec.tls.acme.directoryUrl",
                    format!(
                        "{:?} must be an https:// URL of an ACME directory",
                        acme.directory_url
                    ),
                );
            }
            if !acme.accept_terms_of_service {
                errs.add(
                    "spec.tls.acme.acceptTermsOfService",
                    "must be true: the operator registers an ACME account only after you accept the CA's terms of service",
                );
            }
            if let Some(email) = acme.email.as_ref().filter(|e| !is_email(e)) {
                errs.add(
                    "spec.tls.acme.email",
                    format!("{email:?} is not an email address"),
                );
            }
            let eab = acme.external_account_binding.as_ref().map(|eab| {
                if eab.key_id.trim().is_empty() {
                    errs.add(
                        "spec.tls.acme.externalAccountBinding.keyId",
                        "must not be empty",
                    );
                }
                let key = secret_key(
                    errs,
                    "spec.tls.acme.externalAccountBinding.hmacKeySecretRef",
                    &eab.hmac_key_secret_ref,
                );
                (eab.key_id.clone(), key)
            });
            let ca_bundle = acme
                .ca_bundle_secret_ref
                .as_ref()
                .map(|r| secret_key(errs, "spec.tls.acme.caBundleSecretRef", r));
            let bad_profile = |p: &&String| {
                p.is_empty()
                    || !p
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            };
            if let Some(profile) = acme.profile.as_ref().filter(bad_profile) {
                errs.add(
                    "spec.tls.acme.profile",
                    format!("{profile:?} is not a profile name"),
                );
            }
            let dns01 = acme
                .dns01
                .as_ref()
                .map(|d| Box::new(validate_dns01(d, errs)));
            Some(CertificateSource::Acme(Acme {
                dns01,
                directory_url: url.to_string(),
                email: acme.email.clone(),
                external_account_binding: eab,
                ca_bundle,
                profile: acme.profile.clone(),
                key_algorithm: acme.key_algorithm,
            }))
        }
    };
    if errs.0.len() != before {
        return None;
    }
    Some(Tls {
        source: source?,
        renew_before,
    })
}

/// Wildcard hosts need a certificate that HTTP-01 cannot get: DNS-01 for that host, or the
/// user's own Secret. From the raw spec, so that it is reported beside every other problem.
fn check_wildcards(spec: &OpsConductorStackSpec, errs: &mut Errors) {
    let Some(acme) = &spec.tls.acme else {
        return;
    };
    if spec.tls.secret_name.is_some() {
        return; // "exactly one of" is reported already
    }
    for (i, host) in spec.gateway.hosts.iter().enumerate() {
        if !host.starts_with("*.") || check_host(host).is_err() {
            continue;
        }
        let message = match &acme.dns01 {
            Some(d) => {
                let covered = d.domains.is_empty()
                    || d.domains.iter().any(|domain| {
                        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
                        let name = &host[2..];
                        name == domain || name.ends_with(&format!(".{domain}"))
                    });
                if covered {
                    continue;
                }
                format!(
                    "{host:?} is a wildcard and none of spec.tls.acme.dns01.domains covers it: \
                     HTTP-01 validation cannot issue wildcard certificates; add its domain to \
                     dns01.domains"
                )
            }
            None => format!(
                "{host:?} is a wildcard; HTTP-01 validation cannot issue wildcard \
                 certificates: set spec.tls.acme.dns01 (DNS-01 validation), or bring your own \
                 certificate with spec.tls.secretName"
            ),
        };
        errs.add(format!("spec.gateway.hosts[{i}]"), message);
    }
}

/// `host` or `host:port` (an IPv6 address in brackets) with the port, 53 when missing.
fn check_nameserver(s: &str) -> Result<String, String> {
    let s = s.trim();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: an IPv6 address needs a closing ']'"))?;
        v6.parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("{s:?}: {v6:?} is not an IPv6 address"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(format!("{s:?} is not host:port")),
        };
        (format!("[{v6}]"), port)
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (s.to_string(), None),
        }
    };
    let port = match port {
        None => 53,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{s:?}: {p:?} is not a port (1 to 65535)"))?,
    };
    if !host.starts_with('[') && host.parse::<std::net::Ipv4Addr>().is_err() {
        check_subdomain(&host.to_ascii_lowercase())
            .map_err(|e| format!("{s:?}: not an address or host name: {e}"))?;
    }
    Ok(format!("{host}:{port}"))
}

fn validate_dns01(d: &crate::crd::Dns01Spec, errs: &mut Errors) -> Dns01 {
    let path = "spec.tls.acme.dns01";
    let mut domains = Vec::new();
    for (i, domain) in d.domains.iter().enumerate() {
        let lower = domain.trim_end_matches('.').to_ascii_lowercase();
        match check_subdomain(&lower) {
            Ok(()) if lower.contains('.') => domains.push(lower),
            Ok(()) => errs.add(
                format!("{path}.domains[{i}]"),
                format!("{domain:?} is not a fully qualified DNS name"),
            ),
            Err(e) => errs.add(format!("{path}.domains[{i}]"), e),
        }
    }
    if !(1..=3600).contains(&d.propagation_timeout_seconds) {
        errs.add(
            format!("{path}.propagationTimeoutSeconds"),
            format!(
                "{} is out of range 1 to 3600",
                d.propagation_timeout_seconds
            ),
        );
    }
    let r = &d.rfc2136;
    let nameserver = match check_nameserver(&r.nameserver) {
        Ok(ns) => ns,
        Err(e) => {
            errs.add(format!("{path}.rfc2136.nameserver"), e);
            String::new()
        }
    };
    let zone = r.zone.as_ref().map(|z| {
        let lower = z.trim_end_matches('.').to_ascii_lowercase();
        if let Err(e) = check_subdomain(&lower) {
            errs.add(format!("{path}.rfc2136.zone"), e);
        }
        lower
    });
    let key_name = r.tsig_key_name.trim_end_matches('.');
    let key_name_ok = !key_name.is_empty()
        && key_name.len() <= 253
        && key_name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if !key_name_ok {
        errs.add(
            format!("{path}.rfc2136.tsigKeyName"),
            format!(
                "{:?} is not a key name (a DNS name: letters, digits, '-', '_' and '.')",
                r.tsig_key_name
            ),
        );
    }
    let tsig_secret = secret_key(
        errs,
        &format!("{path}.rfc2136.tsigSecretRef"),
        &r.tsig_secret_ref,
    );
    Dns01 {
        domains,
        propagation_timeout: Duration::from_secs(d.propagation_timeout_seconds.max(1) as u64),
        rfc2136: Rfc2136 {
            nameserver,
            zone,
            tsig_key_name: key_name.to_string(),
            tsig_algorithm: r.tsig_algorithm,
            tsig_secret,
        },
    }
}

fn secret_key(errs: &mut Errors, path: &str, r: &crate::crd::SecretKeyRef) -> SecretKey {
    if let Err(e) = check_subdomain(&r.name) {
        errs.add(format!("{path}.name"), e);
    }
    if r.key.is_empty()
        || !r
            .key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        errs.add(
            format!("{path}.key"),
            format!("{:?} is not a valid Secret key", r.key),
        );
    }
    SecretKey {
        name: r.name.clone(),
        key: r.key.clone(),
    }
}

fn validate_services(
    spec: &OpsConductorStackSpec,
    stack: Option<&DnsLabel>,
    errs: &mut Errors,
) -> Vec<Service> {
    let raw = &spec.services;
    if raw.is_empty() || raw.len() > 200 {
        errs.add(
            "spec.services",
            format!("needs 1 to 200 services, got {}", raw.len()),
        );
    }
    let mut first_index: BTreeMap<&str, usize> = BTreeMap::new();
    let mut route_owner: BTreeMap<&str, usize> = BTreeMap::new();
    let known: BTreeSet<&str> = raw.iter().map(|s| s.name.as_str()).collect();
    let mut out = Vec::new();
    for (i, s) in raw.iter().enumerate() {
        let p = format!("spec.services[{i}]");
        let name = errs.label(&format!("{p}.name"), &s.name);
        if let Some(j) = first_index.insert(&s.name, i) {
            errs.add(
                format!("{p}.name"),
                format!(
                    "duplicate service name {:?} (also spec.services[{j}])",
                    s.name
                ),
            );
            first_index.insert(&s.name, j);
        }
        if let Some(why) = reserved_service_name(&s.name, stack) {
            errs.add(
                format!("{p}.name"),
                format!("{:?} {why}; choose another", s.name),
            );
        }
        if s.image.trim().is_empty() {
            errs.add(format!("{p}.image"), "must not be empty");
        }
        let port = errs.port(&format!("{p}.port"), s.port);
        if !(0..=1000).contains(&s.replicas) {
            errs.add(
                format!("{p}.replicas"),
                format!("{} is out of range 0 to 1000", s.replicas),
            );
        }
        if let Some(route) = &s.route {
            match check_path(route, true) {
                Err(e) => errs.add(format!("{p}.route"), e),
                Ok(()) => {
                    if let Some(j) = route_owner.insert(route, i) {
                        errs.add(
                            format!("{p}.route"),
                            format!("route {route:?} is already used by spec.services[{j}]"),
                        );
                        route_owner.insert(route, j);
                    }
                }
            }
        }
        if let Err(e) = check_path(&s.health_path, false) {
            errs.add(format!("{p}.healthPath"), e);
        }
        let edge_auth = s
            .edge_auth
            .as_ref()
            .and_then(|a| route_auth(spec, i, a, errs));
        let route_limits = s
            .route_limits
            .as_ref()
            .and_then(|l| route_limits(s.route.is_some(), &format!("{p}.routeLimits"), l, errs));
        let mut calls = Vec::new();
        let mut seen_calls = BTreeSet::new();
        for (k, c) in s.calls.iter().enumerate() {
            let cp = format!("{p}.calls[{k}]");
            if !known.contains(c.as_str()) {
                errs.add(cp, format!("unknown service {c:?}"));
            } else if !seen_calls.insert(c.as_str()) {
                errs.add(cp, format!("service {c:?} is listed twice"));
            } else if let Some(label) = errs.label(&cp, c) {
                calls.push(label);
            }
        }
        let mut egress = Vec::new();
        for (k, e) in s.egress.iter().enumerate() {
            let ep = format!("{p}.egress[{k}]");
            let mut cidr = errs.cidr(&format!("{ep}.cidr"), &e.cidr);
            if let Some(why) = cidr.and_then(|c| never_egress(&c)) {
                errs.add(format!("{ep}.cidr"), format!("{:?} {why}", e.cidr));
                cidr = None;
            } else if let Some(wide) = cidr.filter(|c| is_wide(c) && !e.allow_wide) {
                errs.add(
                    format!("{ep}.cidr"),
                    format!(
                        "{:?} is wider than /{}: it opens egress to most of the internet; set \
                         {ep}.allowWide: true to grant it",
                        e.cidr,
                        match wide {
                            IpNet::V4(_) => WIDE_V4,
                            IpNet::V6(_) => WIDE_V6,
                        }
                    ),
                );
                cidr = None;
            }
            let ports = ports(errs, &format!("{ep}.ports"), &e.ports);
            if let (Some(cidr), Some(ports)) = (cidr, ports) {
                egress.push(Egress { cidr, ports });
            }
        }
        if let (Some(name), Some(port)) = (name, port) {
            out.push(Service {
                name,
                image: s.image.clone(),
                port,
                replicas: s.replicas,
                route: s.route.clone(),
                edge_auth,
                route_limits,
                health_path: s.health_path.clone(),
                env: s.env.clone(),
                resources: s.resources.clone(),
                calls,
                egress,
            });
        }
    }
    out
}

/// `spec.services[i].edgeAuth`: a routed service, a verdict service in `spec.gateway.edgeAuth`,
/// public paths under the route that no longer route of another service takes.
fn route_auth(
    spec: &OpsConductorStackSpec,
    i: usize,
    a: &crate::crd::RouteAuthSpec,
    errs: &mut Errors,
) -> Option<RouteAuth> {
    let p = format!("spec.services[{i}].edgeAuth");
    let before = errs.0.len();
    let route = spec.services[i].route.as_deref();
    if route.is_none() {
        errs.add(
            &p,
            "needs a route: a service without one is never reached from outside",
        );
    }
    if spec.gateway.edge_auth.is_none() {
        errs.add(
            &p,
            "needs spec.gateway.edgeAuth, the service that gives the verdicts",
        );
    }
    if a.public_paths.len() > 50 {
        errs.add(format!("{p}.publicPaths"), "at most 50 paths");
    }
    let mut seen = BTreeSet::new();
    for (k, path) in a.public_paths.iter().enumerate() {
        let pp = format!("{p}.publicPaths[{k}]");
        if let Err(e) = check_path(path, false) {
            errs.add(&pp, e);
            continue;
        }
        if !seen.insert(path.as_str()) {
            errs.add(&pp, format!("{path:?} is listed twice"));
            continue;
        }
        let Some(route) = route else { continue };
        if !path.starts_with(route) || path == route {
            errs.add(
                &pp,
                format!(
                    "{path:?} is not under the route {route:?}: a public path is a path below \
                     it (to make the whole route public, leave out edgeAuth)"
                ),
            );
            continue;
        }
        // A longer route of another service takes the path: it would never reach this one.
        if let Some((j, other)) = spec.services.iter().enumerate().find_map(|(j, o)| {
            let r = o.route.as_deref()?;
            (j != i && r.len() > route.len() && path.starts_with(r)).then_some((j, r))
        }) {
            errs.add(
                &pp,
                format!(
                    "{path:?} is under the route {other:?} of spec.services[{j}], which takes \
                     its requests"
                ),
            );
        }
    }
    if errs.0.len() != before {
        return None;
    }
    Some(RouteAuth {
        public_paths: a.public_paths.clone(),
    })
}

/// `spec.services[i].routeLimits`: a routed service, at most one rate, a burst only with a
/// rate, at least one limit, values in range (the schema's ranges, repeated for `render`).
fn route_limits(
    routed: bool,
    p: &str,
    l: &crate::crd::RouteLimitsSpec,
    errs: &mut Errors,
) -> Option<RouteLimits> {
    let before = errs.0.len();
    if !routed {
        errs.add(
            p,
            "needs a route: a service without one is never reached from outside",
        );
    }
    let mut in_range = |field: &str, v: Option<i32>, min: i32, max: i32| -> Option<u32> {
        let v = v?;
        if (min..=max).contains(&v) {
            Some(v as u32)
        } else {
            errs.add(
                format!("{p}.{field}"),
                format!("{v} is out of range {min} to {max}"),
            );
            None
        }
    };
    let per_second = in_range("requestsPerSecond", l.requests_per_second, 1, 100_000);
    let per_minute = in_range("requestsPerMinute", l.requests_per_minute, 1, 1_000_000);
    let burst = in_range("burst", l.burst, 0, 100_000);
    let concurrent = in_range(
        "concurrentRequestsPerClient",
        l.concurrent_requests_per_client,
        1,
        crate::build::nginx::MAX_REQUESTS_PER_CLIENT as i32,
    );
    let rate = match (l.requests_per_second, l.requests_per_minute) {
        (Some(_), Some(_)) => {
            errs.add(
                format!("{p}.requestsPerMinute"),
                "at most one of requestsPerSecond and requestsPerMinute",
            );
            None
        }
        _ => per_second
            .map(Rate::PerSecond)
            .or(per_minute.map(Rate::PerMinute)),
    };
    if l.burst.is_some() && l.requests_per_second.is_none() && l.requests_per_minute.is_none() {
        errs.add(
            format!("{p}.burst"),
            "needs requestsPerSecond or requestsPerMinute: a burst is counted above a rate",
        );
    }
    if l.requests_per_second.is_none()
        && l.requests_per_minute.is_none()
        && l.concurrent_requests_per_client.is_none()
    {
        errs.add(
            p,
            "sets no limit: give requestsPerSecond, requestsPerMinute or \
             concurrentRequestsPerClient",
        );
    }
    if errs.0.len() != before {
        return None;
    }
    Some(RouteLimits {
        rate,
        burst: burst.unwrap_or(0),
        concurrent_requests_per_client: concurrent,
    })
}

/// Names a stack service can never take, because the ServiceAccount, Deployment and Service
/// of that name would be someone else's in every namespace (`default`, `kubernetes`) or
/// are the stack's own derived objects. Why, when `name` is one.
fn reserved_service_name(name: &str, stack: Option<&DnsLabel>) -> Option<String> {
    match name {
        "default" => {
            return Some(
                "is reserved: every namespace has the ServiceAccount \"default\", which a stack \
                 never changes"
                    .into(),
            );
        }
        "kubernetes" => {
            return Some("is reserved: it is the name of the API server's Service".into());
        }
        _ => {}
    }
    let stack = stack?;
    names::FIXED_SUFFIXES
        .iter()
        .any(|suffix| name == format!("{stack}{suffix}"))
        .then(|| format!("is the name of one of the stack's own objects (stack {stack:?})"))
}

/// References in `stack` to Secrets the operator writes for stacks, which a stack must never
/// hand to its pods or use as its own: every stack's ACME account key (`<stack>-acme-account`),
/// and the gateway certificate and key of the other stacks (`<other>-tls`), and of this one
/// in a service's environment. `stacks` names the stacks of the namespace (the controller
/// knows them all; offline, only this one). Each problem with its field path.
pub fn secret_references(stack: &OpsConductorStack, stacks: &[String]) -> Vec<FieldError> {
    let own = stack.metadata.name.clone().unwrap_or_default();
    let forbidden = |name: &str, own_tls_too: bool| -> Option<String> {
        stacks.iter().chain([&own]).find_map(|s| {
            if name == format!("{s}-acme-account") {
                Some(format!("is the ACME account key of stack {s:?}"))
            } else if name == format!("{s}-tls") && (s != &own || own_tls_too) {
                Some(format!(
                    "holds the gateway certificate and key of stack {s:?}"
                ))
            } else {
                None
            }
        })
    };
    let mut out = Vec::new();
    let mut check = |path: String, name: &str, own_tls_too: bool| {
        if let Some(why) = forbidden(name, own_tls_too) {
            out.push(FieldError {
                path,
                message: format!(
                    "Secret {name:?} {why}, which the operator keeps for that stack alone; \
                     reference a Secret of your own"
                ),
            });
        }
    };
    let spec = &stack.spec;
    for (i, s) in spec.services.iter().enumerate() {
        for (k, e) in s.env.iter().enumerate() {
            if let Some(r) = e
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref())
            {
                check(
                    format!("spec.services[{i}].env[{k}].valueFrom.secretKeyRef.name"),
                    &r.name,
                    true,
                );
            }
        }
    }
    if let Some(name) = &spec.tls.secret_name {
        // A stack serving a certificate of its own may call the Secret `<stack>-tls`.
        check("spec.tls.secretName".into(), name, false);
    }
    if let Some(acme) = &spec.tls.acme {
        if let Some(eab) = &acme.external_account_binding {
            check(
                "spec.tls.acme.externalAccountBinding.hmacKeySecretRef.name".into(),
                &eab.hmac_key_secret_ref.name,
                true,
            );
        }
        if let Some(r) = &acme.ca_bundle_secret_ref {
            check("spec.tls.acme.caBundleSecretRef.name".into(), &r.name, true);
        }
        if let Some(d) = &acme.dns01 {
            check(
                "spec.tls.acme.dns01.rfc2136.tsigSecretRef.name".into(),
                &d.rfc2136.tsig_secret_ref.name,
                true,
            );
        }
    }
    out
}

/// Problems with the ACME directory URL the operator would fetch (issue 14, item 8), each with
/// its field path: a host that is a link-local address (the cloud metadata service,
/// `169.254.169.254`, `fd00:ec2::254`), an unspecified address, or, unless `allow_loopback`
/// (`--allow-loopback-acme-directory`, for a test CA on the operator's own machine), a loopback
/// address or `localhost`. IPv4 addresses are recognised in every form the system resolver
/// accepts (`127.1`, `2130706433`, `0x7f.0.0.1`) and inside IPv6 (`::ffff:127.0.0.1`).
///
/// Host names are not resolved here: the CA client refuses to connect to a name that resolves
/// to such an address (`acme::account::CaClient`). Private addresses (`10.0.0.0/8`, ...) are
/// allowed, private CAs live there.
pub fn directory_url_problems(stack: &OpsConductorStack, allow_loopback: bool) -> Vec<FieldError> {
    let Some(acme) = stack.spec.tls.acme.as_ref() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(d) = &acme.dns01 {
        let host = check_nameserver(&d.rfc2136.nameserver)
            .ok()
            .and_then(|ns| url_host(&format!("https://{ns}")));
        let internal = match host.as_deref().and_then(internal_host) {
            Some(Internal::Loopback) if allow_loopback => None,
            internal => internal,
        };
        if let Some(internal) = internal {
            out.push(FieldError {
                path: "spec.tls.acme.dns01.rfc2136.nameserver".into(),
                message: format!("{:?} names {}", d.rfc2136.nameserver, internal.why()),
            });
        }
    }
    let url = acme.directory_url.trim();
    let Some(host) = url_host(url) else {
        return out;
    };
    let why = match internal_host(&host) {
        Some(Internal::Loopback) if allow_loopback => return out,
        Some(internal) => internal.why(),
        None => return out,
    };
    out.push(FieldError {
        path: "spec.tls.acme.directoryUrl".into(),
        message: format!("{:?} names {why}", acme.directory_url),
    });
    out
}

/// Egress CIDRs that lie inside the cluster's own ranges (`cluster_cidrs`, the operator's
/// `--cluster-cidrs`: pod, Service and node ranges), each with its field path (issue 14,
/// item 7). Inside the cluster a stack reaches pods and Services through `calls` and
/// `backends`, which the policies grant by identity; an address range there would grant
/// whatever runs at those addresses, today and after any reschedule. A wider CIDR that holds
/// a cluster range is fine: the range is cut out of it (`except`, see `build::netpol`).
pub fn egress_cluster_problems(
    stack: &OpsConductorStack,
    cluster_cidrs: &[IpNet],
) -> Vec<FieldError> {
    let mut out = Vec::new();
    for (i, s) in stack.spec.services.iter().enumerate() {
        for (k, e) in s.egress.iter().enumerate() {
            let Ok(cidr) = e.cidr.parse::<IpNet>() else {
                continue;
            };
            if let Some(range) = cluster_cidrs.iter().find(|r| r.trunc().contains(&cidr)) {
                out.push(FieldError {
                    path: format!("spec.services[{i}].egress[{k}].cidr"),
                    message: format!(
                        "{:?} lies inside the cluster's own range {} (the operator's \
                         --cluster-cidrs): reach pods and Services of the cluster with \
                         spec.services[{i}].calls or spec.backends, which the policies grant \
                         by identity, not by address",
                        e.cidr,
                        range.trunc()
                    ),
                });
            }
        }
    }
    out
}

/// The gateway image against the operator's allow-list (`--allowed-gateway-images`; empty:
/// any image), issue 14, item 5: the gateway runs with the stack's TLS key mounted, so an
/// operator may insist on images it trusts. An entry is a repository as written in the spec
/// (`ghcr.io/opsconductor/opsconductor-gateway`: any tag or digest of it) or, ending in `/`, a
/// prefix (`registry.example.com/approved/`: every repository under it).
pub fn gateway_image_problems(stack: &OpsConductorStack, allowed: &[String]) -> Vec<FieldError> {
    if allowed.is_empty() {
        return Vec::new();
    }
    let image = stack.spec.gateway.image.trim();
    let repository = image_repository(image);
    let ok = allowed.iter().any(|entry| {
        if entry.ends_with('/') {
            repository.starts_with(entry.as_str()) && repository.len() > entry.len()
        } else {
            repository == entry
        }
    });
    if ok {
        return Vec::new();
    }
    vec![FieldError {
        path: "spec.gateway.image".into(),
        message: format!(
            "{image:?} is not one of the gateway images this operator allows ({}): the gateway \
             runs with the stack's TLS key; use an allowed image or ask the operator's \
             administrator",
            allowed.join(", ")
        ),
    }]
}

/// `registry/path/name` of an image reference, without `:tag` and `@digest`.
fn image_repository(image: &str) -> &str {
    let name = image.split('@').next().unwrap_or(image);
    match name.rfind(':') {
        Some(colon) if !name[colon..].contains('/') => &name[..colon],
        _ => name,
    }
}

/// The host of an `https://` URL, lowercase, without brackets, port or user info.
fn url_host(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?;
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        authority.split(':').next()?
    };
    Some(host.trim_end_matches('.').to_ascii_lowercase())
}

/// The kinds of address the operator never fetches an ACME directory from (issue 14, item 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Internal {
    Loopback,
    LinkLocal,
    Unspecified,
}

impl Internal {
    /// Why such an address is refused, in words for status.
    pub fn why(self) -> &'static str {
        match self {
            Internal::LinkLocal => {
                "a link-local address: the node's own services and the cloud metadata service \
                 (169.254.169.254) live there, and the operator never fetches from them"
            }
            Internal::Unspecified => "the unspecified address, which means this host",
            Internal::Loopback => {
                "a loopback address, the operator's own pod; refused unless the operator runs \
                 with --allow-loopback-acme-directory (a test CA on the same machine)"
            }
        }
    }
}

/// Whether `ip` is an address the operator must not fetch from: loopback, link-local (with the
/// cloud metadata addresses) or unspecified; an IPv4-mapped IPv6 address counts as its IPv4
/// address. Used on the directory URL as written and on every address a CA's host name
/// resolves to (`acme::account`).
pub fn internal_ip(ip: std::net::IpAddr) -> Option<Internal> {
    use std::net::{IpAddr, Ipv4Addr};
    let v4 = |ip: Ipv4Addr| {
        if ip.is_loopback() {
            Some(Internal::Loopback)
        } else if ip.is_link_local() {
            Some(Internal::LinkLocal)
        } else if ip.octets()[0] == 0 {
            Some(Internal::Unspecified)
        } else {
            None
        }
    };
    match ip {
        IpAddr::V6(ip) => {
            if let Some(mapped) = ip.to_ipv4_mapped() {
                return v4(mapped);
            }
            if ip.is_loopback() {
                Some(Internal::Loopback)
            } else if ip.is_unspecified() {
                Some(Internal::Unspecified)
            } else if (ip.segments()[0] & 0xffc0) == 0xfe80
                || ip == std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
            {
                Some(Internal::LinkLocal)
            } else {
                None
            }
        }
        IpAddr::V4(ip) => v4(ip),
    }
}

/// Whether `host` (as [`url_host`] returns it) names an address the operator must not fetch.
fn internal_host(host: &str) -> Option<Internal> {
    if host == "localhost" || host.ends_with(".localhost") {
        return Some(Internal::Loopback);
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => internal_ip(ip),
        Err(_) => inet_aton(host).and_then(|ip| internal_ip(ip.into())),
    }
}

/// An IPv4 address in the forms `inet_aton(3)` (and so the system resolver) accepts: one to
/// four parts, each decimal, octal (leading `0`) or hexadecimal (`0x`), the last one filling
/// the remaining bytes.
fn inet_aton(s: &str) -> Option<std::net::Ipv4Addr> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut values = Vec::new();
    for p in &parts {
        let v = if let Some(hex) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
            u32::from_str_radix(hex, 16).ok()?
        } else if p.len() > 1 && p.starts_with('0') {
            u32::from_str_radix(&p[1..], 8).ok()?
        } else if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
            p.parse::<u32>().ok()?
        } else {
            return None;
        };
        values.push(v);
    }
    let (last, head) = values.split_last()?;
    if head.iter().any(|v| *v > 255) {
        return None;
    }
    let last_bits = 8 * (4 - head.len() as u32);
    if last_bits < 32 && *last >= 1 << last_bits {
        return None;
    }
    let mut n = 0u32;
    for (i, v) in head.iter().enumerate() {
        n |= v << (24 - 8 * i);
    }
    Some(std::net::Ipv4Addr::from(n | last))
}

/// Egress CIDRs with a shorter prefix than these need `allowWide: true`: `10.0.0.0/8` (a whole
/// private range) does not, `0.0.0.0/0`, `::/0` and their halves do.
const WIDE_V4: u8 = 8;
const WIDE_V6: u8 = 16;

fn is_wide(cidr: &IpNet) -> bool {
    match cidr {
        IpNet::V4(n) => n.prefix_len() < WIDE_V4,
        IpNet::V6(n) => n.prefix_len() < WIDE_V6,
    }
}

/// Why egress to `cidr` is never granted, when it lies inside a link-local or loopback range
/// (wider CIDRs get the link-local ranges cut out, see `build::netpol::NEVER_EGRESS`).
fn never_egress(cidr: &IpNet) -> Option<&'static str> {
    let inside = |range: &str| range.parse::<IpNet>().is_ok_and(|r| r.contains(cidr));
    if inside("169.254.0.0/16") || inside("fe80::/10") {
        Some(
            "is link-local: the node's own services and the cloud metadata service \
             (169.254.169.254) live there, and a stack never reaches them",
        )
    } else if inside("127.0.0.0/8") || inside("::1/128") {
        Some("is loopback: it never leaves the pod, so it needs no egress rule")
    } else {
        None
    }
}

/// Checks a backend's pod selector the way the API server checks a label selector, and that
/// it selects none of the stack's own pods (a backend is a workload outside the stack).
fn check_selector(
    errs: &mut Errors,
    path: &str,
    sel: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    stack: Option<&DnsLabel>,
    services: &[&str],
) {
    let before = errs.0.len();
    for (k, v) in sel.match_labels.iter().flatten() {
        if let Err(e) = check_label_key(k) {
            errs.add(format!("{path}.matchLabels"), format!("key {k:?}: {e}"));
        }
        if let Err(e) = check_label_value(v) {
            errs.add(
                format!("{path}.matchLabels[{k}]"),
                format!("value {v:?}: {e}"),
            );
        }
    }
    for (i, r) in sel.match_expressions.iter().flatten().enumerate() {
        let p = format!("{path}.matchExpressions[{i}]");
        if let Err(e) = check_label_key(&r.key) {
            errs.add(format!("{p}.key"), format!("{:?}: {e}", r.key));
        }
        let values = r.values.as_deref().unwrap_or_default();
        match r.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => errs.add(
                format!("{p}.values"),
                format!("must not be empty with operator {}", r.operator),
            ),
            "In" | "NotIn" => {
                for (j, v) in values.iter().enumerate() {
                    if let Err(e) = check_label_value(v) {
                        errs.add(format!("{p}.values[{j}]"), format!("{v:?}: {e}"));
                    }
                }
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => errs.add(
                format!("{p}.values"),
                format!("must be empty with operator {}", r.operator),
            ),
            "Exists" | "DoesNotExist" => {}
            other => errs.add(
                format!("{p}.operator"),
                format!("{other:?} is not one of In, NotIn, Exists, DoesNotExist"),
            ),
        }
    }
    let Some(stack) = stack.filter(|_| errs.0.len() == before) else {
        return;
    };
    // The labels of every pod the stack runs: the gateway's and each service's.
    let mut pods = vec![(
        "the gateway".to_string(),
        names::labels(stack, Component::Gateway),
    )];
    for s in services {
        if let Ok(name) = DnsLabel::parse(s) {
            pods.push((
                format!("service {s}"),
                names::labels(stack, Component::Service(&name)),
            ));
        }
    }
    if let Some((which, _)) = pods.iter().find(|(_, labels)| selects(sel, labels)) {
        errs.add(
            path,
            format!(
                "selects the stack's own pods ({which}); a backend is a workload outside the \
                 stack: select it by labels the stack's pods do not have"
            ),
        );
    }
}

/// Whether `sel` matches a pod with `labels` (Kubernetes label selector semantics).
fn selects(
    sel: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    labels: &BTreeMap<String, String>,
) -> bool {
    let labels_match = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_match = sel.match_expressions.iter().flatten().all(|r| {
        let values = r.values.as_deref().unwrap_or_default();
        match (r.operator.as_str(), labels.get(&r.key)) {
            ("In", Some(v)) => values.contains(v),
            ("In", None) => false,
            ("NotIn", Some(v)) => !values.contains(v),
            ("NotIn", None) => true,
            ("Exists", found) => found.is_some(),
            ("DoesNotExist", found) => found.is_none(),
            _ => false,
        }
    });
    labels_match && expressions_match
}

/// A label key: an optional DNS subdomain prefix and `/`, then a name of 1 to 63 characters.
fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            return Err("the prefix before '/' must not be empty".into());
        }
        check_subdomain(prefix).map_err(|e| format!("prefix: {e}"))?;
    }
    if name.is_empty() {
        return Err("the name must not be empty".into());
    }
    check_label_value(name).map_err(|e| format!("name: {e}"))
}

/// A label value: empty, or 1 to 63 letters, digits, `-`, `_` and `.`, starting and ending
/// with a letter or digit.
fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if value.len() > 63
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        || !edge(value.chars().next())
        || !edge(value.chars().last())
    {
        return Err(
            "must be at most 63 letters, digits, '-', '_' or '.', starting and ending with a \
             letter or digit"
                .into(),
        );
    }
    Ok(())
}

fn validate_backends(
    spec: &OpsConductorStackSpec,
    stack: Option<&DnsLabel>,
    services: &[Service],
    errs: &mut Errors,
) -> Vec<Backend> {
    let service_names: Vec<&str> = spec.services.iter().map(|s| s.name.as_str()).collect();
    let known: BTreeSet<&str> = spec.services.iter().map(|s| s.name.as_str()).collect();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for (i, b) in spec.backends.iter().enumerate() {
        let p = format!("spec.backends[{i}]");
        let name = errs.label(&format!("{p}.name"), &b.name);
        if let Some(j) = seen.insert(&b.name, i) {
            errs.add(
                format!("{p}.name"),
                format!(
                    "duplicate backend name {:?} (also spec.backends[{j}])",
                    b.name
                ),
            );
            seen.insert(&b.name, j);
        }
        let sel = &b.pod_selector;
        let empty = sel.match_labels.as_ref().is_none_or(|m| m.is_empty())
            && sel.match_expressions.as_ref().is_none_or(|m| m.is_empty());
        if empty {
            errs.add(
                format!("{p}.podSelector"),
                "must select something: an empty selector matches every pod in the namespace, the stack's own included",
            );
        } else {
            check_selector(
                errs,
                &format!("{p}.podSelector"),
                sel,
                stack,
                &service_names,
            );
        }
        let ports = ports(errs, &format!("{p}.ports"), &b.ports);
        let mut allow_from = Vec::new();
        let mut seen_from = BTreeSet::new();
        for (k, a) in b.allow_from.iter().enumerate() {
            let ap = format!("{p}.allowFrom[{k}]");
            if !known.contains(a.as_str()) {
                errs.add(ap, format!("unknown service {a:?}"));
            } else if !seen_from.insert(a.as_str()) {
                errs.add(ap, format!("service {a:?} is listed twice"));
            } else if let Some(svc) = services.iter().find(|s| s.name.as_str() == a) {
                allow_from.push(svc.name.clone());
            }
        }
        if let (Some(name), Some(ports)) = (name, ports) {
            out.push(Backend {
                name,
                pod_selector: b.pod_selector.clone(),
                ports,
                allow_from,
            });
        }
    }
    out
}

fn ports(errs: &mut Errors, path: &str, raw: &[i32]) -> Option<Vec<Port>> {
    if raw.is_empty() {
        errs.add(path, "needs at least one port");
        return None;
    }
    let mut out = Vec::new();
    let mut ok = true;
    for (k, p) in raw.iter().enumerate() {
        match errs.port(&format!("{path}[{k}]"), *p) {
            Some(p) if out.contains(&p) => {
                errs.add(format!("{path}[{k}]"), format!("port {p} is listed twice"));
                ok = false;
            }
            Some(p) => out.push(p),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// A host name the certificate can cover with HTTP-01: a lowercase DNS name, no wildcard,
/// not an IP address.
fn check_host(host: &str) -> Result<String, String> {
    if let Some(rest) = host.strip_prefix("*.") {
        // A wildcard names one label below `rest` (RFC 6125); allowed where the certificate
        // comes from DNS-01 or the user's own Secret (checked in `check_wildcards`).
        return match check_host(rest) {
            Ok(_) => Ok(host.to_string()),
            Err(_) if rest.contains('*') => Err(format!(
                "{host:?}: a wildcard is allowed only as the whole first label (\"*.example.com\")"
            )),
            Err(e) => Err(format!("{host:?}: after \"*.\": {e}")),
        };
    }
    if host.contains('*') {
        return Err(format!(
            "{host:?}: a wildcard is allowed only as the whole first label (\"*.example.com\")"
        ));
    }
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!(
            "{host:?} is an IP address; the gateway needs DNS names"
        ));
    }
    if host != host.to_ascii_lowercase() {
        return Err(format!("{host:?} must be lowercase"));
    }
    check_subdomain(host)?;
    if !host.contains('.') {
        return Err(format!("{host:?} is not a fully qualified DNS name"));
    }
    Ok(host.to_string())
}

/// An RFC 1123 label: 1 to 63 lowercase letters, digits and `-`, not starting or ending with
/// `-` (what namespace names are).
fn check_rfc1123_label(s: &str) -> Result<(), String> {
    if s.contains('.') {
        return Err(format!("{s:?} contains '.'"));
    }
    check_subdomain(s)
}

/// One of the operator's `--cluster-cidrs`: a CIDR without host bits.
pub fn check_cluster_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    match s.parse::<IpNet>() {
        Ok(net) if net.trunc() == net => Ok(net),
        Ok(net) => Err(format!(
            "{s:?} has host bits set; did you mean {}?",
            net.trunc()
        )),
        Err(_) => Err(format!(
            "{s:?} is not a CIDR (e.g. 10.244.0.0/16 or fd00:10:96::/112)"
        )),
    }
}

/// The cluster's DNS domain (`--cluster-domain`), which goes into the gateway's upstream
/// addresses: an RFC 1123 subdomain.
pub fn check_cluster_domain(s: &str) -> Result<String, String> {
    check_subdomain(s)
        .map(|()| s.to_string())
        .map_err(|e| format!("--cluster-domain: {e}"))
}

/// An RFC 1123 subdomain: dot-separated labels of lowercase letters, digits and `-`.
fn check_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 253 {
        return Err(format!("{s:?} must be 1 to 253 characters"));
    }
    for label in s.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "{s:?} is not a valid DNS name (lowercase letters, digits, '-' and '.', labels of 1 to 63 characters)"
            ));
        }
    }
    Ok(())
}

/// A URL path safe to place in nginx configuration and probes. Routes must end with `/`.
fn check_path(path: &str, route: bool) -> Result<(), String> {
    if !path.starts_with('/') || (route && !path.ends_with('/')) {
        return Err(if route {
            format!("{path:?} must start and end with '/'")
        } else {
            format!("{path:?} must start with '/'")
        });
    }
    if path.len() > 256 {
        return Err("must be at most 256 characters".into());
    }
    if path.contains("//") || path.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(format!(
            "{path:?} must not contain empty, '.' or '..' segments"
        ));
    }
    if let Some(c) = path
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "/-._~".contains(*c)))
    {
        return Err(format!(
            "{path:?} contains {c:?}; allowed are letters, digits and / - . _ ~"
        ));
    }
    Ok(())
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

fn is_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !local
            .chars()
            .any(|c| c.is_whitespace() || c == '@' || c == ',')
        && domain.contains('.')
        && check_subdomain(&domain.to_ascii_lowercase()).is_ok()
}

/// Parses a Go-style duration such as `720h`, `90m`, `1h30m` or `3600s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 720h, 90m or 1h30m");
    if s.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3600,
            'm' if chars.peek() == Some(&'s') => {
                return Err(format!("{s:?}: milliseconds are too fine for renewal"));
            }
            'm' => 60,
            's' => 1,
            'd' => return Err(format!("{s:?}: use hours, e.g. 720h for 30 days")),
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        digits.clear();
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    if !digits.is_empty() {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn base() -> Value {
        json!({
            "apiVersion": "opsconductor.io/v1alpha1",
            "kind": "OpsConductorStack",
            "metadata": {"name": "prod", "namespace": "ops"},
            "spec": {
                "gateway": {"hosts": ["ops.example.com"]},
                "tls": {"acme": {"directoryUrl": "https://acme.example/dir", "acceptTermsOfService": true}},
                "services": [
                    {"name": "auth", "image": "auth:1", "route": "/api/v1/auth/", "calls": ["users"]},
                    {"name": "users", "image": "users:1"}
                ],
                "backends": [
                    {"name": "postgres", "podSelector": {"matchLabels": {"app": "postgres"}}, "ports": [5432], "allowFrom": ["auth"]}
                ]
            }
        })
    }

    fn run(v: Value) -> Result<Stack, ValidationErrors> {
        let stack: OpsConductorStack = serde_json::from_value(v).expect("test input deserializes");
        validate(&stack, "default")
    }

    /// Applies `edit` to the base stack and returns the error lines.
    fn errors(edit: impl FnOnce(&mut Value)) -> Vec<String> {
        let mut v = base();
        edit(&mut v);
        match run(v) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    fn assert_error(edit: impl FnOnce(&mut Value), expected: &str) {
        let errs = errors(edit);
        assert!(
            errs.iter().any(|e| e.contains(expected)),
            "expected an error containing {expected:?}, got {errs:#?}"
        );
    }

    /// The base stack with edge authentication from `auth` on the `users` route.
    fn with_edge_auth(v: &mut Value) {
        v["spec"]["gateway"]["edgeAuth"] =
            json!({"service": "auth", "path": "/api/v1/auth/verify", "passHeaders": ["X-User-Id"]});
        v["spec"]["services"][1]["route"] = json!("/api/v1/users/");
        v["spec"]["services"][1]["edgeAuth"] = json!({"publicPaths": ["/api/v1/users/signup"]});
    }

    #[test]
    fn edge_auth_is_checked_field_by_field() {
        let stack = run({
            let mut v = base();
            with_edge_auth(&mut v);
            v
        })
        .expect("valid");
        let a = stack.gateway.edge_auth.as_ref().unwrap();
        assert_eq!(a.pass_headers, ["x-user-id"]);
        assert_eq!(a.cache_seconds, 0);
        assert!(stack.gateway_reaches(&stack.services[0]));
        type Edit = Box<dyn FnOnce(&mut Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|v| v["spec"]["gateway"]["edgeAuth"]["service"] = json!("nobody")),
                "spec.gateway.edgeAuth.service: unknown service \"nobody\"",
            ),
            (
                Box::new(|v| v["spec"]["gateway"]["edgeAuth"]["path"] = json!("/verify?x=1")),
                "spec.gateway.edgeAuth.path: \"/verify?x=1\" contains '?'",
            ),
            (
                Box::new(|v| {
                    v["spec"]["gateway"]["edgeAuth"]["passHeaders"] =
                        json!(["X-User-Id", "x-user-id"])
                }),
                "spec.gateway.edgeAuth.passHeaders[1]: duplicate header \"x-user-id\"",
            ),
            (
                Box::new(|v| v["spec"]["gateway"]["edgeAuth"]["passHeaders"] = json!(["X_User"])),
                "spec.gateway.edgeAuth.passHeaders[0]: \"X_User\" contains '_'",
            ),
            (
                Box::new(|v| {
                    v["spec"]["gateway"]["edgeAuth"]["passHeaders"] = json!(["Authorization"])
                }),
                "spec.gateway.edgeAuth.passHeaders[0]: \"Authorization\" carries the client's own credentials",
            ),
            (
                Box::new(|v| {
                    v["spec"]["gateway"]["edgeAuth"]["passHeaders"] = json!(["X-Service"])
                }),
                "spec.gateway.edgeAuth.passHeaders[0]: \"X-Service\" is what the services trust",
            ),
            (
                Box::new(|v| v["spec"]["gateway"]["edgeAuth"]["passHeaders"] = json!(["Host"])),
                "spec.gateway.edgeAuth.passHeaders[0]: \"Host\" is set by the gateway itself",
            ),
            (
                Box::new(|v| v["spec"]["gateway"]["edgeAuth"]["cacheSeconds"] = json!(301)),
                "spec.gateway.edgeAuth.cacheSeconds: 301 is out of range 0 to 300",
            ),
            (
                Box::new(|v| v["spec"]["services"][1]["route"] = Value::Null),
                "spec.services[1].edgeAuth: needs a route",
            ),
            (
                Box::new(|v| {
                    v["spec"]["gateway"]
                        .as_object_mut()
                        .unwrap()
                        .remove("edgeAuth");
                }),
                "spec.services[1].edgeAuth: needs spec.gateway.edgeAuth",
            ),
            (
                Box::new(|v| {
                    v["spec"]["services"][1]["edgeAuth"]["publicPaths"] =
                        json!(["/api/v1/auth/login"])
                }),
                "spec.services[1].edgeAuth.publicPaths[0]: \"/api/v1/auth/login\" is not under the route \"/api/v1/users/\"",
            ),
            (
                Box::new(|v| {
                    v["spec"]["services"][1]["edgeAuth"]["publicPaths"] = json!(["/api/v1/users/"])
                }),
                "is not under the route",
            ),
            (
                Box::new(|v| {
                    v["spec"]["services"][1]["edgeAuth"]["publicPaths"] =
                        json!(["/api/v1/users/a:b"])
                }),
                "spec.services[1].edgeAuth.publicPaths[0]: \"/api/v1/users/a:b\" contains ':'",
            ),
            (
                Box::new(|v| {
                    v["spec"]["services"][1]["edgeAuth"]["publicPaths"] =
                        json!(["/api/v1/users/x", "/api/v1/users/x"])
                }),
                "spec.services[1].edgeAuth.publicPaths[1]: \"/api/v1/users/x\" is listed twice",
            ),
            (
                Box::new(|v| {
                    v["spec"]["services"][0]["route"] = json!("/api/v1/users/admin/");
                    v["spec"]["services"][1]["edgeAuth"]["publicPaths"] =
                        json!(["/api/v1/users/admin/login"]);
                }),
                "spec.services[1].edgeAuth.publicPaths[0]: \"/api/v1/users/admin/login\" is under the route \"/api/v1/users/admin/\" of spec.services[0]",
            ),
        ];
        for (edit, expected) in cases {
            assert_error(
                |v| {
                    with_edge_auth(v);
                    edit(v);
                },
                expected,
            );
        }
        // Edge authentication that no route uses: nothing reaches the verdict service.
        let stack = run({
            let mut v = base();
            with_edge_auth(&mut v);
            v["spec"]["services"][1]
                .as_object_mut()
                .unwrap()
                .remove("edgeAuth");
            v["spec"]["services"][0]
                .as_object_mut()
                .unwrap()
                .remove("route");
            v
        })
        .expect("valid");
        assert!(stack.verdicts().is_none());
        assert!(!stack.gateway_reaches(&stack.services[0]));
    }

    #[test]
    fn route_limits_are_checked_field_by_field() {
        let limits = |l: Value| move |v: &mut Value| v["spec"]["services"][0]["routeLimits"] = l;
        let stack = run({
            let mut v = base();
            limits(json!({"requestsPerMinute": 30, "burst": 5, "concurrentRequestsPerClient": 4}))(
                &mut v,
            );
            v
        })
        .expect("valid");
        assert_eq!(
            stack.services[0].route_limits,
            Some(RouteLimits {
                rate: Some(Rate::PerMinute(30)),
                burst: 5,
                concurrent_requests_per_client: Some(4)
            })
        );
        for (l, expected) in [
            (
                json!({"requestsPerSecond": 1, "requestsPerMinute": 1}),
                "spec.services[0].routeLimits.requestsPerMinute: at most one of requestsPerSecond and requestsPerMinute",
            ),
            (
                json!({"burst": 3}),
                "spec.services[0].routeLimits.burst: needs requestsPerSecond or requestsPerMinute",
            ),
            (json!({}), "spec.services[0].routeLimits: sets no limit"),
            (
                json!({"requestsPerSecond": 0}),
                "spec.services[0].routeLimits.requestsPerSecond: 0 is out of range 1 to 100000",
            ),
            (
                json!({"requestsPerMinute": 5, "burst": -1}),
                "spec.services[0].routeLimits.burst: -1 is out of range 0 to 100000",
            ),
            (
                json!({"concurrentRequestsPerClient": 257}),
                "spec.services[0].routeLimits.concurrentRequestsPerClient: 257 is out of range 1 to 256",
            ),
        ] {
            assert_error(limits(l), expected);
        }
        assert_error(
            |v| v["spec"]["services"][1]["routeLimits"] = json!({"requestsPerSecond": 1}),
            "spec.services[1].routeLimits: needs a route",
        );
    }

    #[test]
    fn a_content_security_policy_cannot_leave_its_nginx_string() {
        let csp = |p: &str| {
            let p = p.to_string();
            move |v: &mut Value| {
                v["spec"]["gateway"]["contentSecurityPolicy"] = json!({"policy": p})
            }
        };
        let ok = "default-src 'self'; script-src 'self' 'nonce-abc+/='; report-uri https://r.example/csp?a=1&b=2#x";
        let stack = run({
            let mut v = base();
            csp(ok)(&mut v);
            v
        })
        .expect("valid");
        assert_eq!(stack.gateway.content_security_policy.unwrap().policy, ok);
        for (bad, ch) in [
            ("default-src 'self'\" always; add_header X 1", "'\"'"),
            ("default-src 'self';\nreturn 200", "'\\n'"),
            ("default-src 'self';\rx", "'\\r'"),
            ("default-src $host", "'$'"),
            ("default-src 'self' \\", "'\\\\'"),
            ("default-src {x}", "'{'"),
            ("default-src 'self'\tx", "'\\t'"),
            ("default-src é", "'é'"),
        ] {
            assert_error(
                csp(bad),
                &format!("spec.gateway.contentSecurityPolicy.policy: contains {ch}"),
            );
        }
        assert_error(
            csp("   "),
            "spec.gateway.contentSecurityPolicy.policy: must not be empty",
        );
    }

    #[test]
    fn base_is_valid_and_defaults_apply() {
        let stack = run(base()).expect("valid");
        assert_eq!(stack.name.as_str(), "prod");
        assert_eq!(stack.namespace, "ops");
        assert_eq!(stack.gateway.replicas, 2);
        assert_eq!(stack.gateway.image, crate::crd::DEFAULT_GATEWAY_IMAGE);
        assert_eq!(stack.gateway.client_max_body_size, "10m");
        assert_eq!(
            stack.gateway.hsts,
            Hsts {
                max_age_seconds: 31_536_000,
                include_sub_domains: true,
                preload: false
            }
        );
        assert_eq!(stack.services[1].port, 8000);
        assert_eq!(stack.services[1].health_path, "/health");
        assert_eq!(
            stack.services[0].calls,
            vec![DnsLabel::parse("users").unwrap()]
        );
        assert_eq!(stack.mode, crate::crd::PolicyMode::Enforce);
        let CertificateSource::Acme(acme) = &stack.tls.source else {
            panic!("acme")
        };
        assert_eq!(acme.key_algorithm, crate::crd::KeyAlgorithm::EcdsaP256);
        let mut v = base();
        v["spec"]["tls"]["acme"]["keyAlgorithm"] = json!("ECDSA-P384");
        let CertificateSource::Acme(acme) = run(v).unwrap().tls.source else {
            panic!("acme")
        };
        assert_eq!(acme.key_algorithm, crate::crd::KeyAlgorithm::EcdsaP384);
        let mut v = base();
        v["spec"]["tls"]["acme"]["keyAlgorithm"] = json!("RSA-2048");
        let CertificateSource::Acme(acme) = run(v).unwrap().tls.source else {
            panic!("acme")
        };
        assert_eq!(acme.key_algorithm, crate::crd::KeyAlgorithm::Rsa2048);
        let mut v = base();
        v["spec"]["tls"]["acme"]["keyAlgorithm"] = json!("RSA-1024");
        assert!(serde_json::from_value::<OpsConductorStack>(v).is_err());
    }

    #[test]
    fn namespace_defaults_when_missing() {
        let mut v = base();
        v["metadata"].as_object_mut().unwrap().remove("namespace");
        assert_eq!(run(v).unwrap().namespace, "default");
    }

    #[test]
    fn stack_name_rules() {
        assert_error(
            |v| v["metadata"]["name"] = json!("Prod"),
            "metadata.name: \"Prod\" must start with a lowercase letter",
        );
        assert_error(
            |v| v["metadata"]["name"] = json!("1prod"),
            "metadata.name: \"1prod\" must start with a lowercase letter",
        );
        assert_error(|v| v["metadata"]["name"] = json!("prod_x"), "contains '_'");
        assert_error(
            |v| v["metadata"]["name"] = json!("prod-"),
            "must end with a lowercase letter or digit",
        );
        let long = "a".repeat(names::max_stack_name_len() + 1);
        assert_error(
            move |v| v["metadata"]["name"] = json!(long),
            "derived names such as",
        );
        let fits = "a".repeat(names::max_stack_name_len());
        assert!(errors(move |v| v["metadata"]["name"] = json!(fits)).is_empty());
    }

    #[test]
    fn host_rules() {
        assert_error(
            |v| v["spec"]["gateway"]["hosts"] = json!([]),
            "spec.gateway.hosts: needs 1 to 100 hosts, got 0",
        );
        let many: Vec<String> = (0..101).map(|i| format!("h{i}.example.com")).collect();
        assert_error(
            move |v| v["spec"]["gateway"]["hosts"] = json!(many),
            "got 101",
        );
        let hundred: Vec<String> = (0..100).map(|i| format!("h{i}.example.com")).collect();
        assert!(errors(move |v| v["spec"]["gateway"]["hosts"] = json!(hundred)).is_empty());
        assert_error(
            |v| v["spec"]["gateway"]["hosts"] = json!(["*.example.com"]),
            "spec.gateway.hosts[0]: \"*.example.com\" is a wildcard",
        );
        assert_error(
            |v| v["spec"]["gateway"]["hosts"] = json!(["203.0.113.7"]),
            "is an IP address",
        );
        assert_error(
            |v| v["spec"]["gateway"]["hosts"] = json!(["Ops.example.com"]),
            "must be lowercase",
        );
        assert_error(
            |v| v["spec"]["gateway"]["hosts"] = json!(["ops..example.com"]),
            "is not a valid DNS name",
        );
        assert_error(
            |v| v["spec"]["gateway"]["hosts"] = json!(["-ops.example.com"]),
            "is not a valid DNS name",
        );
        assert_error(
            |v| v["spec"]["gateway"]["hosts"] = json!(["localhost"]),
            "not a fully qualified",
        );
        assert_error(
            |v| v["spec"]["gateway"]["hosts"] = json!(["a.example.com", "a.example.com"]),
            "spec.gateway.hosts[1]: duplicate host",
        );
    }

    #[test]
    fn gateway_rules() {
        assert_error(
            |v| v["spec"]["gateway"]["replicas"] = json!(0),
            "spec.gateway.replicas: 0 is out of range",
        );
        assert_error(
            |v| v["spec"]["gateway"]["image"] = json!(" "),
            "spec.gateway.image: must not be empty",
        );
        assert_error(
            |v| v["spec"]["gateway"]["allowedSourceRanges"] = json!(["10.0.0.0/33"]),
            "spec.gateway.allowedSourceRanges[0]: \"10.0.0.0/33\" is not a CIDR",
        );
        assert_error(
            |v| v["spec"]["gateway"]["allowedSourceRanges"] = json!(["10.0.0.1/8"]),
            "has host bits set; did you mean 10.0.0.0/8?",
        );
        assert!(
            errors(|v| v["spec"]["gateway"]["allowedSourceRanges"] =
                json!(["10.0.0.0/8", "2001:db8::/32"]))
            .is_empty()
        );
        assert_error(
            |v| v["spec"]["gateway"]["rateLimit"] = json!({"requestsPerSecond": 0}),
            "spec.gateway.rateLimit.requestsPerSecond: must be at least 1",
        );
        assert_error(
            |v| v["spec"]["gateway"]["rateLimit"] = json!({"requestsPerSecond": 5, "burst": -1}),
            "spec.gateway.rateLimit.burst",
        );
        assert_error(
            |v| v["spec"]["gateway"]["hsts"] = json!({"maxAgeSeconds": -1}),
            "spec.gateway.hsts.maxAgeSeconds",
        );
        assert_error(
            |v| v["spec"]["gateway"]["hsts"] = json!({"preload": true, "includeSubDomains": false}),
            "spec.gateway.hsts.preload",
        );
        assert_error(
            |v| v["spec"]["gateway"]["clientMaxBodySize"] = json!("10mb"),
            "spec.gateway.clientMaxBodySize: \"10mb\"",
        );
        assert_error(
            |v| v["spec"]["gateway"]["clientMaxBodySize"] = json!("10m; evil"),
            "spec.gateway.clientMaxBodySize",
        );
        assert!(errors(|v| v["spec"]["gateway"]["clientMaxBodySize"] = json!("512k")).is_empty());
        assert_error(
            |v| v["spec"]["gateway"]["timeouts"] = json!({"connectSeconds": 0}),
            "spec.gateway.timeouts.connectSeconds: 0 is out of range",
        );
    }

    #[test]
    fn tls_rules() {
        assert_error(
            |v| v["spec"]["tls"]["secretName"] = json!("mine"),
            "spec.tls: exactly one of tls.acme or tls.secretName",
        );
        assert_error(|v| v["spec"]["tls"] = json!({}), "spec.tls: exactly one of");
        assert_error(
            |v| v["spec"]["tls"]["acme"]["acceptTermsOfService"] = json!(false),
            "spec.tls.acme.acceptTermsOfService: must be true",
        );
        assert_error(
            |v| v["spec"]["tls"]["acme"]["directoryUrl"] = json!("http://acme.example/dir"),
            "spec.tls.acme.directoryUrl",
        );
        assert_error(
            |v| v["spec"]["tls"]["acme"]["email"] = json!("not-an-email"),
            "spec.tls.acme.email",
        );
        assert_error(
            |v| v["spec"]["tls"]["renewBefore"] = json!("30d"),
            "spec.tls.renewBefore: \"30d\": use hours",
        );
        assert_error(
            |v| v["spec"]["tls"]["renewBefore"] = json!("0h"),
            "spec.tls.renewBefore: must be greater than zero",
        );
        assert_error(
            |v| {
                v["spec"]["tls"]["acme"]["externalAccountBinding"] =
                    json!({"keyId": "", "hmacKeySecretRef": {"name": "Bad_Name", "key": "k"}})
            },
            "spec.tls.acme.externalAccountBinding.keyId: must not be empty",
        );
        assert_error(
            |v| {
                v["spec"]["tls"]["acme"]["externalAccountBinding"] =
                    json!({"keyId": "k", "hmacKeySecretRef": {"name": "Bad_Name", "key": "k"}})
            },
            "spec.tls.acme.externalAccountBinding.hmacKeySecretRef.name",
        );
        assert_error(
            |v| v["spec"]["tls"]["acme"]["caBundleSecretRef"] = json!({"name": "ca", "key": "a/b"}),
            "spec.tls.acme.caBundleSecretRef.key",
        );
        let mut v = base();
        v["spec"]["tls"] = json!({"secretName": "my-cert", "renewBefore": "1h30m"});
        let stack = run(v).unwrap();
        assert_eq!(
            stack.tls.source,
            CertificateSource::Secret("my-cert".into())
        );
        assert_eq!(stack.tls.renew_before, Some(Duration::from_secs(5400)));
    }

    #[test]
    fn service_rules() {
        assert_error(
            |v| v["spec"]["services"] = json!([]),
            "spec.services: needs 1 to 200 services, got 0",
        );
        let many: Vec<Value> = (0..201)
            .map(|i| json!({"name": format!("s{i}"), "image": "x"}))
            .collect();
        assert_error(move |v| v["spec"]["services"] = json!(many), "got 201");
        assert_error(
            |v| v["spec"]["services"][1]["name"] = json!("auth"),
            "spec.services[1].name: duplicate service name \"auth\" (also spec.services[0])",
        );
        // Names that would make the stack take over someone else's objects, or its own.
        for (name, why) in [
            (
                "prod-gateway",
                "is the name of one of the stack's own objects",
            ),
            (
                "prod-gateway-config",
                "is the name of one of the stack's own objects",
            ),
            ("prod-tls", "is the name of one of the stack's own objects"),
            (
                "default",
                "is reserved: every namespace has the ServiceAccount \"default\"",
            ),
            (
                "kubernetes",
                "is reserved: it is the name of the API server's Service",
            ),
        ] {
            assert_error(
                |v| v["spec"]["services"][1]["name"] = json!(name),
                &format!("spec.services[1].name: {name:?} {why}"),
            );
        }
        let plain = errors(|v| v["spec"]["services"][1]["name"] = json!("gateway"));
        assert!(
            plain.iter().all(|e| !e.contains("spec.services[1].name")),
            "{plain:?}"
        );
        assert_error(
            |v| v["spec"]["services"][1]["name"] = json!("Users"),
            "spec.services[1].name",
        );
        assert_error(
            |v| v["spec"]["services"][1]["name"] = json!("a".repeat(64)),
            "longer than 63 characters",
        );
        assert_error(
            |v| v["spec"]["services"][0]["port"] = json!(0),
            "spec.services[0].port: port 0 is out of range 1 to 65535",
        );
        assert_error(
            |v| v["spec"]["services"][0]["port"] = json!(65536),
            "port 65536 is out of range",
        );
        assert_error(
            |v| v["spec"]["services"][0]["replicas"] = json!(-1),
            "spec.services[0].replicas",
        );
        assert_error(
            |v| v["spec"]["services"][0]["image"] = json!(""),
            "spec.services[0].image: must not be empty",
        );
        assert_error(
            |v| v["spec"]["services"][0]["route"] = json!("/api"),
            "spec.services[0].route: \"/api\" must start and end with '/'",
        );
        assert_error(
            |v| v["spec"]["services"][0]["route"] = json!("api/"),
            "must start and end with '/'",
        );
        assert_error(
            |v| v["spec"]["services"][0]["route"] = json!("/a b/"),
            "contains ' '",
        );
        assert_error(
            |v| v["spec"]["services"][0]["route"] = json!("/a;return 200;/"),
            "contains ';'",
        );
        assert_error(
            |v| v["spec"]["services"][0]["route"] = json!("/../"),
            "'..' segments",
        );
        assert_error(
            |v| v["spec"]["services"][1]["route"] = json!("/api/v1/auth/"),
            "spec.services[1].route: route \"/api/v1/auth/\" is already used by spec.services[0]",
        );
        assert_error(
            |v| v["spec"]["services"][0]["healthPath"] = json!("health"),
            "spec.services[0].healthPath",
        );
        assert_error(
            |v| v["spec"]["services"][0]["calls"] = json!(["user"]),
            "spec.services[0].calls[0]: unknown service \"user\"",
        );
        assert_error(
            |v| v["spec"]["services"][0]["calls"] = json!(["users", "users"]),
            "spec.services[0].calls[1]: service \"users\" is listed twice",
        );
        assert_error(
            |v| v["spec"]["services"][1]["egress"] = json!([{"cidr": "nope", "ports": [22]}]),
            "spec.services[1].egress[0].cidr",
        );
        assert_error(
            |v| v["spec"]["services"][1]["egress"] = json!([{"cidr": "10.0.0.0/8", "ports": []}]),
            "spec.services[1].egress[0].ports: needs at least one port",
        );
        assert_error(
            |v| {
                v["spec"]["services"][1]["egress"] =
                    json!([{"cidr": "10.0.0.0/8", "ports": [22, 70000]}])
            },
            "spec.services[1].egress[0].ports[1]: port 70000",
        );
        assert_error(
            |v| {
                v["spec"]["services"][1]["egress"] =
                    json!([{"cidr": "10.0.0.0/8", "ports": [22, 22]}])
            },
            "ports[1]: port 22 is listed twice",
        );
    }

    #[test]
    fn backend_rules() {
        assert_error(
            |v| v["spec"]["backends"][0]["allowFrom"] = json!(["nobody"]),
            "spec.backends[0].allowFrom[0]: unknown service \"nobody\"",
        );
        assert_error(
            |v| v["spec"]["backends"][0]["podSelector"] = json!({}),
            "spec.backends[0].podSelector: must select something",
        );
        assert_error(
            |v| v["spec"]["backends"][0]["ports"] = json!([]),
            "spec.backends[0].ports: needs at least one port",
        );
        assert_error(
            |v| v["spec"]["backends"][0]["name"] = json!("PG"),
            "spec.backends[0].name",
        );
        assert_error(
            |v| {
                let b = v["spec"]["backends"][0].clone();
                v["spec"]["backends"].as_array_mut().unwrap().push(b);
            },
            "spec.backends[1].name: duplicate backend name \"postgres\"",
        );
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let errs = errors(|v| {
            v["metadata"]["name"] = json!("Bad");
            v["spec"]["gateway"]["hosts"] = json!(["*.x.com"]);
            v["spec"]["services"][0]["calls"] = json!(["ghost"]);
            v["spec"]["services"][1]["port"] = json!(0);
            v["spec"]["backends"][0]["allowFrom"] = json!(["phantom"]);
        });
        assert_eq!(errs.len(), 5, "{errs:#?}");
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("720h").unwrap(),
            Duration::from_secs(720 * 3600)
        );
        assert_eq!(
            parse_duration("1h30m15s").unwrap(),
            Duration::from_secs(5415)
        );
        assert!(parse_duration("").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("10ms").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
    }

    #[test]
    fn dns_labels() {
        assert!(DnsLabel::parse("a").is_ok());
        assert!(DnsLabel::parse("a-1").is_ok());
        assert!(DnsLabel::parse("").is_err());
        assert!(DnsLabel::parse("a.b").is_err());
        assert!(DnsLabel::parse(&"a".repeat(63)).is_ok());
        assert!(DnsLabel::parse(&"a".repeat(64)).is_err());
    }

    fn dns01() -> Value {
        json!({"rfc2136": {
            "nameserver": "192.0.2.53",
            "tsigKeyName": "acme-key",
            "tsigSecretRef": {"name": "tsig", "key": "secret"},
        }})
    }

    #[test]
    fn dns01_settings_are_checked_field_by_field() {
        let mut v = base();
        v["spec"]["tls"]["acme"]["dns01"] = dns01();
        let stack = run(v).expect("valid");
        let CertificateSource::Acme(acme) = &stack.tls.source else {
            panic!("acme")
        };
        let d = acme.dns01.as_ref().unwrap();
        assert_eq!(d.rfc2136.nameserver, "192.0.2.53:53");
        assert_eq!(
            d.rfc2136.tsig_algorithm,
            crate::crd::TsigAlgorithm::HmacSha256
        );
        assert_eq!(d.propagation_timeout, Duration::from_secs(300));
        assert!(d.covers("anything.example.org") && d.covers("*.example.org"));

        let with = |edit: fn(&mut Value)| {
            move |v: &mut Value| {
                v["spec"]["tls"]["acme"]["dns01"] = dns01();
                edit(&mut v["spec"]["tls"]["acme"]["dns01"]);
            }
        };
        assert_error(
            with(|d| d["rfc2136"]["nameserver"] = json!("ns.example.com:0")),
            "spec.tls.acme.dns01.rfc2136.nameserver: \"ns.example.com:0\": \"0\" is not a port",
        );
        assert_error(
            with(|d| d["rfc2136"]["nameserver"] = json!("[2001:db8::1")),
            "spec.tls.acme.dns01.rfc2136.nameserver",
        );
        assert_error(
            with(|d| d["rfc2136"]["nameserver"] = json!("NS_1!")),
            "spec.tls.acme.dns01.rfc2136.nameserver",
        );
        assert_error(
            with(|d| d["rfc2136"]["zone"] = json!("Bad Zone")),
            "spec.tls.acme.dns01.rfc2136.zone",
        );
        assert_error(
            with(|d| d["rfc2136"]["tsigKeyName"] = json!("key with spaces")),
            "spec.tls.acme.dns01.rfc2136.tsigKeyName",
        );
        assert_error(
            with(|d| d["rfc2136"]["tsigSecretRef"]["key"] = json!("a/b")),
            "spec.tls.acme.dns01.rfc2136.tsigSecretRef.key",
        );
        assert_error(
            with(|d| d["propagationTimeoutSeconds"] = json!(0)),
            "spec.tls.acme.dns01.propagationTimeoutSeconds: 0 is out of range 1 to 3600",
        );
        assert_error(
            with(|d| d["domains"] = json!(["localhost"])),
            "spec.tls.acme.dns01.domains[0]: \"localhost\" is not a fully qualified DNS name",
        );
        // The Secrets the operator keeps for stacks are never a TSIG key.
        assert_error(
            with(|d| d["rfc2136"]["tsigSecretRef"]["name"] = json!("prod-acme-account")),
            "spec.tls.acme.dns01.rfc2136.tsigSecretRef.name: Secret \"prod-acme-account\" is the ACME account key",
        );
        assert_error(
            with(|d| d["rfc2136"]["tsigSecretRef"]["name"] = json!("prod-tls")),
            "spec.tls.acme.dns01.rfc2136.tsigSecretRef.name: Secret \"prod-tls\" holds the gateway certificate",
        );
        // Bracketed IPv6 with a port, and a host name without one.
        let mut v = base();
        v["spec"]["tls"]["acme"]["dns01"] = dns01();
        v["spec"]["tls"]["acme"]["dns01"]["rfc2136"]["nameserver"] = json!("[2001:db8::53]:5353");
        assert!(run(v).is_ok());
    }

    #[test]
    fn wildcards_need_dns01_or_an_own_secret() {
        let wildcard = |v: &mut Value| {
            v["spec"]["gateway"]["hosts"] = json!(["example.com", "*.example.com"]);
        };
        // HTTP-01: refused, naming DNS-01.
        assert_error(
            wildcard,
            "spec.gateway.hosts[1]: \"*.example.com\" is a wildcard; HTTP-01 validation cannot \
             issue wildcard certificates: set spec.tls.acme.dns01",
        );
        // DNS-01 for every host: allowed.
        let mut v = base();
        wildcard(&mut v);
        v["spec"]["tls"]["acme"]["dns01"] = dns01();
        assert_eq!(
            run(v).unwrap().gateway.hosts,
            ["example.com", "*.example.com"]
        );
        // DNS-01 for other domains only: refused, naming dns01.domains.
        assert_error(
            |v| {
                wildcard(v);
                v["spec"]["tls"]["acme"]["dns01"] = dns01();
                v["spec"]["tls"]["acme"]["dns01"]["domains"] = json!(["example.org"]);
            },
            "none of spec.tls.acme.dns01.domains covers it",
        );
        let mut v = base();
        wildcard(&mut v);
        v["spec"]["tls"]["acme"]["dns01"] = dns01();
        v["spec"]["tls"]["acme"]["dns01"]["domains"] = json!(["example.com"]);
        assert!(run(v).is_ok());
        // The user's own Secret: allowed.
        let mut v = base();
        wildcard(&mut v);
        v["spec"]["tls"] = json!({"secretName": "wild-cert"});
        assert!(run(v).is_ok());
        // Only as the whole first label.
        for bad in [
            "a.*.example.com",
            "*x.example.com",
            "*.com",
            "**.example.com",
        ] {
            let errs = errors(|v| {
                v["spec"]["gateway"]["hosts"] = json!([bad]);
                v["spec"]["tls"] = json!({"secretName": "wild-cert"});
            });
            assert!(
                errs.iter().any(|e| e.starts_with("spec.gateway.hosts[0]")),
                "{bad}: {errs:?}"
            );
        }
    }

    #[test]
    fn dns01_per_domain_covers_the_domain_and_below() {
        let d = Dns01 {
            domains: vec!["example.com".into()],
            propagation_timeout: Duration::from_secs(1),
            rfc2136: Rfc2136 {
                nameserver: "ns:53".into(),
                zone: None,
                tsig_key_name: "k".into(),
                tsig_algorithm: Default::default(),
                tsig_secret: SecretKey {
                    name: "s".into(),
                    key: "k".into(),
                },
            },
        };
        for host in ["example.com", "*.example.com", "a.b.example.com"] {
            assert!(d.covers(host), "{host}");
        }
        for host in ["example.org", "notexample.com", "*.com"] {
            assert!(!d.covers(host), "{host}");
        }
    }

    #[test]
    fn dns01_nameservers_on_internal_addresses_are_refused() {
        let problems = |ns: &str, allow_loopback: bool| {
            let mut v = base();
            v["spec"]["tls"]["acme"]["dns01"] = dns01();
            v["spec"]["tls"]["acme"]["dns01"]["rfc2136"]["nameserver"] = json!(ns);
            let stack: OpsConductorStack = serde_json::from_value(v).unwrap();
            directory_url_problems(&stack, allow_loopback)
                .into_iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            problems("169.254.169.254", true),
            format!(
                "spec.tls.acme.dns01.rfc2136.nameserver: \"169.254.169.254\" names {}",
                Internal::LinkLocal.why()
            )
        );
        assert!(problems("[fe80::1]:53", true).contains("link-local"));
        assert!(problems("0.0.0.0:53", true).contains("unspecified"));
        let p = problems("127.0.0.1:5353", false);
        assert!(
            p.starts_with("spec.tls.acme.dns01.rfc2136.nameserver: ") && p.contains("loopback"),
            "{p}"
        );
        assert_eq!(problems("127.0.0.1:5353", true), "");
        assert_eq!(problems("ns1.example.com", false), "");
    }

    #[test]
    fn directory_urls_on_internal_addresses_are_refused() {
        let problems = |url: &str, allow_loopback: bool| {
            let mut v = base();
            v["spec"]["tls"]["acme"]["directoryUrl"] = json!(url);
            let stack: OpsConductorStack = serde_json::from_value(v).unwrap();
            directory_url_problems(&stack, allow_loopback)
                .into_iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        };
        for url in [
            "https://169.254.169.254/latest",
            "https://169.254.169.254:443/dir",
            "https://user@169.254.1.1/dir",
            "https://[fe80::1]/dir",
            "https://[fd00:ec2::254]/dir",
            "https://[::ffff:169.254.169.254]/dir",
            "https://2852039166/dir",
            "https://0xa9.0xfe.0xa9.0xfe/dir",
            "https://0251.0376.0251.0376/dir",
            "https://169.254.43518/dir",
        ] {
            let p = problems(url, true);
            assert!(
                p.starts_with("spec.tls.acme.directoryUrl: ") && p.contains("link-local"),
                "{url}: {p:?}"
            );
        }
        for url in [
            "https://127.0.0.1:14000/dir",
            "https://127.1/dir",
            "https://2130706433/dir",
            "https://0x7f.1/dir",
            "https://[::1]:14000/dir",
            "https://[::ffff:127.0.0.1]/dir",
            "https://localhost/dir",
            "https://LocalHost./dir",
            "https://acme.localhost/dir",
        ] {
            let p = problems(url, false);
            assert!(
                p.contains("spec.tls.acme.directoryUrl") && p.contains("loopback"),
                "{url}: {p:?}"
            );
            assert_eq!(problems(url, true), "", "{url} with loopback allowed");
        }
        for url in ["https://0.0.0.0/dir", "https://0/dir", "https://[::]/dir"] {
            assert!(problems(url, true).contains("unspecified"), "{url}");
        }
        for url in [
            "https://acme-v02.api.letsencrypt.org/directory",
            "https://10.250.0.1:14000/dir",
            "https://192.168.1.10/dir",
            "https://[fd12::1]/dir",
            "https://1.2.3.4.5/dir",
            "https://0x/dir",
            "https://169.254.169.254.example.com/dir",
        ] {
            assert_eq!(problems(url, false), "", "{url}");
        }
    }

    #[test]
    fn wide_egress_needs_an_explicit_yes() {
        let egress = |rule: Value| {
            let mut v = base();
            v["spec"]["services"][1]["egress"] = json!([rule]);
            run(v)
        };
        for cidr in [
            "0.0.0.0/0",
            "0.0.0.0/1",
            "128.0.0.0/1",
            "10.0.0.0/7",
            "::/0",
            "2000::/3",
            "fd00::/15",
        ] {
            let err = egress(json!({"cidr": cidr, "ports": [443]}))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!(
                    "spec.services[1].egress[0].cidr: {cidr:?} is wider than /"
                )) && err.contains("set spec.services[1].egress[0].allowWide: true"),
                "{cidr}: {err}"
            );
            let ok = egress(json!({"cidr": cidr, "ports": [443], "allowWide": true}))
                .unwrap_or_else(|e| panic!("{cidr} with allowWide: {e}"));
            assert_eq!(ok.services[1].egress[0].cidr.to_string(), cidr);
        }
        for cidr in ["10.0.0.0/8", "203.0.113.0/24", "fd00::/16", "2001:db8::/32"] {
            egress(json!({"cidr": cidr, "ports": [443]})).unwrap_or_else(|e| panic!("{cidr}: {e}"));
        }
        // allowWide never lets link-local or loopback through.
        let err = egress(json!({"cidr": "169.254.0.0/16", "ports": [80], "allowWide": true}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("link-local"), "{err}");
    }

    #[test]
    fn egress_into_the_clusters_own_ranges_is_refused() {
        let cluster: Vec<IpNet> = ["10.244.0.0/16", "10.96.0.0/12", "fd00:10:96::/112"]
            .iter()
            .map(|c| check_cluster_cidr(c).unwrap())
            .collect();
        let problems = |cidr: &str| {
            let mut v = base();
            v["spec"]["services"][1]["egress"] =
                json!([{"cidr": "203.0.113.0/24", "ports": [443]}, {"cidr": cidr, "ports": [443]}]);
            let stack: OpsConductorStack = serde_json::from_value(v).unwrap();
            egress_cluster_problems(&stack, &cluster)
        };
        for (cidr, range) in [
            ("10.244.0.0/16", "10.244.0.0/16"),
            ("10.244.7.0/24", "10.244.0.0/16"),
            ("10.100.0.10/32", "10.96.0.0/12"),
            ("fd00:10:96::a/128", "fd00:10:96::/112"),
        ] {
            let p = problems(cidr);
            assert_eq!(p.len(), 1, "{cidr}: {p:?}");
            assert_eq!(p[0].path, "spec.services[1].egress[1].cidr");
            assert!(
                p[0].message.starts_with(&format!(
                    "{cidr:?} lies inside the cluster's own range {range} (the operator's \
                     --cluster-cidrs)"
                )),
                "{cidr}: {}",
                p[0].message
            );
        }
        // Outside, or holding a cluster range (cut out of it when built): fine here.
        for cidr in [
            "10.0.0.0/8",
            "0.0.0.0/0",
            "10.243.0.0/16",
            "192.0.2.1/32",
            "::/0",
        ] {
            assert_eq!(problems(cidr), vec![], "{cidr}");
        }
        // No ranges configured: nothing to check.
        let stack: OpsConductorStack = serde_json::from_value(base()).unwrap();
        assert_eq!(egress_cluster_problems(&stack, &[]), vec![]);
        assert!(
            check_cluster_cidr("10.244.0.1/16")
                .unwrap_err()
                .contains("host bits")
        );
        assert!(
            check_cluster_cidr("cluster")
                .unwrap_err()
                .contains("is not a CIDR")
        );
    }

    #[test]
    fn gateway_images_outside_the_allow_list_are_refused() {
        let problems = |image: &str, allowed: &[&str]| {
            let mut v = base();
            v["spec"]["gateway"]["image"] = json!(image);
            let stack: OpsConductorStack = serde_json::from_value(v).unwrap();
            let allowed: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
            gateway_image_problems(&stack, &allowed)
                .into_iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        };
        let list = [
            "ghcr.io/opsconductor/opsconductor-gateway",
            "registry.example.com:5000/approved/",
        ];
        for ok in [
            "ghcr.io/opsconductor/opsconductor-gateway:0.1.0",
            "ghcr.io/opsconductor/opsconductor-gateway@sha256:abc",
            "ghcr.io/opsconductor/opsconductor-gateway:0.1@sha256:abc",
            "ghcr.io/opsconductor/opsconductor-gateway",
            "registry.example.com:5000/approved/nginx:1.27",
            "registry.example.com:5000/approved/team/nginx",
        ] {
            assert_eq!(problems(ok, &list), "", "{ok}");
            assert_eq!(problems(ok, &[]), "", "{ok}: no list, any image");
        }
        for bad in [
            "nginx:1.27",
            "ghcr.io/opsconductor/opsconductor-gateway-evil:1",
            "ghcr.io/opsconductor/opsconductor-gateway/evil:1",
            "evil.example/ghcr.io/opsconductor/opsconductor-gateway:1",
            "registry.example.com:5000/approved:1",
            "registry.example.com:5000/approvedx/nginx",
        ] {
            let p = problems(bad, &list);
            assert!(
                p.starts_with("spec.gateway.image: ")
                    && p.contains("not one of the gateway images"),
                "{bad}: {p:?}"
            );
        }
    }
}
