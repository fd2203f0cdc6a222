//! The certificate: its source, ACME (HTTP-01 and DNS-01 through RFC 2136) and wildcards.

use super::Errors;
use super::syntax::{check_host, check_subdomain, parse_duration};
use crate::crd::OpsConductorStackSpec;
use crate::model::{Acme, CertificateSource, Dns01, Rfc2136, SecretKey, Tls};
use std::time::Duration;

pub(super) fn validate_tls(spec: &OpsConductorStackSpec, errs: &mut Errors) -> Option<Tls> {
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
pub(super) fn check_wildcards(spec: &OpsConductorStackSpec, errs: &mut Errors) {
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
pub(super) fn check_nameserver(s: &str) -> Result<String, String> {
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
