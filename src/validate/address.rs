//! Addresses that must never be reached: loopback, link-local, metadata and other internal ranges.

use ipnet::IpNet;

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
pub(super) fn internal_host(host: &str) -> Option<Internal> {
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
pub(super) const WIDE_V4: u8 = 8;
pub(super) const WIDE_V6: u8 = 16;

pub(super) fn is_wide(cidr: &IpNet) -> bool {
    match cidr {
        IpNet::V4(n) => n.prefix_len() < WIDE_V4,
        IpNet::V6(n) => n.prefix_len() < WIDE_V6,
    }
}

/// Why egress to `cidr` is never granted, when it lies inside a link-local or loopback range
/// (wider CIDRs get the link-local ranges cut out, see `build::netpol::NEVER_EGRESS`).
pub(super) fn never_egress(cidr: &IpNet) -> Option<&'static str> {
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
