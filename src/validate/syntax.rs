//! The syntax of single values: host names, DNS labels, paths, durations.

use std::time::Duration;

/// A host name the certificate can cover with HTTP-01: a lowercase DNS name, no wildcard,
/// not an IP address.
pub(super) fn check_host(host: &str) -> Result<String, String> {
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
pub(super) fn check_rfc1123_label(s: &str) -> Result<(), String> {
    if s.contains('.') {
        return Err(format!("{s:?} contains '.'"));
    }
    check_subdomain(s)
}

/// The cluster's DNS domain (`--cluster-domain`), which goes into the gateway's upstream
/// addresses: an RFC 1123 subdomain.
pub fn check_cluster_domain(s: &str) -> Result<String, String> {
    check_subdomain(s)
        .map(|()| s.to_string())
        .map_err(|e| format!("--cluster-domain: {e}"))
}

/// An RFC 1123 subdomain: dot-separated labels of lowercase letters, digits and `-`.
pub(super) fn check_subdomain(s: &str) -> Result<(), String> {
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
pub(super) fn check_path(path: &str, route: bool) -> Result<(), String> {
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
