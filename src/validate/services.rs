//! The services: routes, calls between services, per-route auth and limits, external backends.

use super::Errors;
use super::address::{WIDE_V4, WIDE_V6, is_wide, never_egress};
use super::syntax::{check_path, check_subdomain};
use crate::crd::OpsConductorStackSpec;
use crate::model::{Backend, DnsLabel, Egress, Port, Rate, RouteAuth, RouteLimits, Service};
use crate::names::{self, Component};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};

pub(super) fn validate_services(
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
pub(super) fn route_limits(
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

pub(super) fn validate_backends(
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

pub(super) fn ports(errs: &mut Errors, path: &str, raw: &[i32]) -> Option<Vec<Port>> {
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

/// Checks a label selector the way the API server checks one and, given the `stack`, that it
/// selects none of the stack's own pods (a backend's: a backend is a workload outside the
/// stack). Without a stack, only the syntax (the metrics scrapers' selectors).
pub(super) fn check_selector(
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

/// `spec.serviceIdentity`: the lifetime in range (the schema's, repeated for `render`), and no
/// service setting an environment variable the operator sets for the token. The lifetime when
/// enabled and valid.
pub(super) fn validate_identity(spec: &OpsConductorStackSpec, errs: &mut Errors) -> Option<i64> {
    let identity = spec.service_identity.as_ref()?;
    let before = errs.0.len();
    let range = crate::crd::IDENTITY_EXPIRATION_RANGE;
    if !range.contains(&identity.expiration_seconds) {
        errs.add(
            "spec.serviceIdentity.expirationSeconds",
            format!(
                "{} is out of range {} to {} seconds: the API server refuses projected tokens \
                 shorter than 10 minutes, and the kubelet renews every token within 24 hours",
                identity.expiration_seconds,
                range.start(),
                range.end()
            ),
        );
    }
    if !identity.enabled {
        return None;
    }
    for (i, s) in spec.services.iter().enumerate() {
        for (k, e) in s.env.iter().enumerate() {
            if crate::build::IDENTITY_ENV.contains(&e.name.as_str()) {
                errs.add(
                    format!("spec.services[{i}].env[{k}].name"),
                    format!(
                        "{:?} is set by the operator with spec.serviceIdentity.enabled (the \
                         identity token's file and audience); choose another name",
                        e.name
                    ),
                );
            }
        }
    }
    (errs.0.len() == before).then_some(identity.expiration_seconds)
}
