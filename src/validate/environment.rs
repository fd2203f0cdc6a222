//! Checks of a valid stack against the operator's own configuration (its flags): Secret
//! references, CA directories, cluster address ranges, allowed gateway images.

use super::FieldError;
use super::address::{Internal, internal_host};
use super::tls::check_nameserver;
use crate::crd::OpsConductorStack;
use ipnet::IpNet;

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
/// to such an address (`acme::ca_client::CaClient`). Private addresses (`10.0.0.0/8`, ...) are
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
    let gateway = &stack.spec.gateway;
    let mut images = vec![("spec.gateway.image", gateway.image.trim())];
    // The exporter runs in the same pod (without the key mounted, but in its network
    // namespace, beside nginx's status listener): the same list applies.
    if let Some(m) = gateway.metrics.as_ref().filter(|m| m.enabled) {
        images.push((
            "spec.gateway.metrics.image",
            m.image
                .as_deref()
                .unwrap_or(crate::crd::DEFAULT_GATEWAY_IMAGE)
                .trim(),
        ));
    }
    let mut out = Vec::new();
    for (path, image) in images {
        let repository = image_repository(image);
        let ok = allowed.iter().any(|entry| {
            if entry.ends_with('/') {
                repository.starts_with(entry.as_str()) && repository.len() > entry.len()
            } else {
                repository == entry
            }
        });
        if !ok {
            out.push(FieldError {
                path: path.into(),
                message: format!(
                    "{image:?} is not one of the gateway images this operator allows ({}): the \
                     gateway runs with the stack's TLS key; use an allowed image or ask the \
                     operator's administrator",
                    allowed.join(", ")
                ),
            });
        }
    }
    out
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
pub(super) fn url_host(url: &str) -> Option<String> {
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
