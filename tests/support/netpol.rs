//! The NetworkPolicy analyzer (np-guard's netpol-analyzer, `netpolicy`, from
//! `scripts/build-parts tools`) and the canonical form its answers are compared in: shared by
//! the analyzer tier (`tests/netpol_analyzer.rs`, rendered policies and stand-in pods) and the
//! node tier (`tests/node_e2e.rs`, the live objects against packets on a real network plugin).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use ipnet::IpNet;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Connections, in a canonical form both sides are reduced to.
// ---------------------------------------------------------------------------------------------

/// One end of a connection: a pod (`namespace/name`) or an address range outside the cluster.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    Pod(String),
    /// Inclusive range of addresses of one family (4 or 6).
    Ip {
        family: u8,
        lo: u128,
        hi: u128,
    },
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Pod(p) => f.write_str(p),
            Peer::Ip { family: 4, lo, hi } => write!(
                f,
                "{}-{}",
                std::net::Ipv4Addr::from(*lo as u32),
                std::net::Ipv4Addr::from(*hi as u32)
            ),
            Peer::Ip { lo, hi, .. } => write!(
                f,
                "{}-{}",
                std::net::Ipv6Addr::from(*lo),
                std::net::Ipv6Addr::from(*hi)
            ),
        }
    }
}

/// What may flow: any protocol and port, or one protocol on an inclusive port range.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Conn {
    All,
    Ports { proto: String, lo: u16, hi: u16 },
}

impl std::fmt::Display for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Conn::All => f.write_str("all"),
            Conn::Ports { proto, lo, hi } if lo == hi => write!(f, "{proto} {lo}"),
            Conn::Ports { proto, lo, hi } => write!(f, "{proto} {lo}-{hi}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fact {
    pub src: Peer,
    pub dst: Peer,
    pub conn: Conn,
}

impl std::fmt::Display for Fact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} => {} : {}", self.src, self.dst, self.conn)
    }
}

pub type Facts = BTreeSet<Fact>;

pub fn tcp(port: u16) -> Conn {
    Conn::Ports {
        proto: "TCP".into(),
        lo: port,
        hi: port,
    }
}

pub fn udp(port: u16) -> Conn {
    Conn::Ports {
        proto: "UDP".into(),
        lo: port,
        hi: port,
    }
}

pub fn pod(ns: &str, name: &str) -> Peer {
    Peer::Pod(format!("{ns}/{name}"))
}

pub fn cidr_peer(cidr: &str) -> Peer {
    let net: IpNet = cidr
        .parse()
        .unwrap_or_else(|e| panic!("bad CIDR {cidr}: {e}"));
    match net {
        IpNet::V4(n) => Peer::Ip {
            family: 4,
            lo: u32::from(n.network()) as u128,
            hi: u32::from(n.broadcast()) as u128,
        },
        IpNet::V6(n) => Peer::Ip {
            family: 6,
            lo: u128::from(n.network()),
            hi: u128::from(n.broadcast()),
        },
    }
}

pub fn everyone_v4() -> Peer {
    cidr_peer("0.0.0.0/0")
}

/// (pod, pod-is-source, connection, address family)
pub type RangeKey = (String, bool, Conn, u8);

/// Canonical form: single ports instead of short port ranges, and for each (pod, direction,
/// connection) the address ranges merged, so that however the analyzer partitions the address
/// space the same allowed set compares equal.
pub fn canonical(facts: impl IntoIterator<Item = Fact>) -> Facts {
    let mut out = Facts::new();
    let mut ranges: BTreeMap<RangeKey, Vec<(u128, u128)>> = BTreeMap::new();
    for fact in facts {
        let conns = match &fact.conn {
            Conn::Ports { proto, lo, hi } if hi - lo < 1024 => (*lo..=*hi)
                .map(|p| Conn::Ports {
                    proto: proto.clone(),
                    lo: p,
                    hi: p,
                })
                .collect(),
            other => vec![other.clone()],
        };
        for conn in conns {
            match (&fact.src, &fact.dst) {
                (Peer::Pod(p), Peer::Ip { family, lo, hi }) => ranges
                    .entry((p.clone(), true, conn, *family))
                    .or_default()
                    .push((*lo, *hi)),
                (Peer::Ip { family, lo, hi }, Peer::Pod(p)) => ranges
                    .entry((p.clone(), false, conn, *family))
                    .or_default()
                    .push((*lo, *hi)),
                _ => {
                    out.insert(Fact {
                        src: fact.src.clone(),
                        dst: fact.dst.clone(),
                        conn,
                    });
                }
            }
        }
    }
    for ((p, pod_is_src, conn, family), mut rs) in ranges {
        rs.sort();
        let mut merged: Vec<(u128, u128)> = Vec::new();
        for (lo, hi) in rs {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        for (lo, hi) in merged {
            let ip = Peer::Ip { family, lo, hi };
            let (src, dst) = if pod_is_src {
                (Peer::Pod(p.clone()), ip)
            } else {
                (ip, Peer::Pod(p.clone()))
            };
            out.insert(Fact {
                src,
                dst,
                conn: conn.clone(),
            });
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The analyzer.
// ---------------------------------------------------------------------------------------------

pub fn analyzer() -> Option<PathBuf> {
    let dir = super::tools_bin_dir()?;
    let bin = dir.join("netpolicy");
    assert!(
        bin.is_file(),
        "netpol-analyzer is missing at {}; build it with `scripts/build-parts tools`",
        bin.display()
    );
    Some(bin)
}

pub fn run_analyzer(bin: &Path, args: &[&str]) -> String {
    let out = Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    assert!(
        out.status.success(),
        "`netpolicy {}` failed ({}):\n{}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("analyzer output is UTF-8")
}

/// `ns/name[Pod]` or an address range `a-b` (or a single address, or a CIDR).
pub fn parse_peer(s: &str) -> Peer {
    let s = s.trim();
    if let Some(open) = s.find('[') {
        assert!(
            s.ends_with("[Pod]"),
            "unexpected workload kind in analyzer output: {s}"
        );
        return Peer::Pod(s[..open].to_string());
    }
    if s.contains('/') {
        return cidr_peer(s);
    }
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let parse = |a: &str| -> IpAddr {
        a.trim()
            .parse()
            .unwrap_or_else(|e| panic!("cannot read peer {s:?} from the analyzer: {e}"))
    };
    match (parse(lo), parse(hi)) {
        (IpAddr::V4(lo), IpAddr::V4(hi)) => Peer::Ip {
            family: 4,
            lo: u32::from(lo) as u128,
            hi: u32::from(hi) as u128,
        },
        (IpAddr::V6(lo), IpAddr::V6(hi)) => Peer::Ip {
            family: 6,
            lo: u128::from(lo),
            hi: u128::from(hi),
        },
        _ => panic!("mixed address families in {s:?}"),
    }
}

/// `All Connections`, `No Connections`, or `TCP 53,UDP 53`, `TCP 1-79,81-65535`, possibly with
/// `;` between protocols.
pub fn parse_conns(s: &str) -> Vec<Conn> {
    let s = s.trim();
    if s == "All Connections" {
        return vec![Conn::All];
    }
    if s == "No Connections" || s.is_empty() {
        return vec![];
    }
    let mut out = Vec::new();
    let mut proto: Option<String> = None;
    for item in s.split([',', ';']) {
        let item = item.trim();
        let ports = match item.split_once(' ') {
            Some((p, rest)) => {
                proto = Some(p.to_string());
                rest.trim()
            }
            None if item.chars().all(|c| c.is_ascii_alphabetic()) => {
                // A protocol alone: every port.
                proto = Some(item.to_string());
                "1-65535"
            }
            None => item,
        };
        let proto = proto
            .clone()
            .unwrap_or_else(|| panic!("no protocol before {item:?} in {s:?}"));
        let (lo, hi) = ports.split_once('-').unwrap_or((ports, ports));
        let num = |p: &str| -> u16 {
            p.trim()
                .parse()
                .unwrap_or_else(|e| panic!("cannot read port {p:?} in {s:?}: {e}"))
        };
        out.push(Conn::Ports {
            proto,
            lo: num(lo),
            hi: num(hi),
        });
    }
    out
}

/// Every connection `netpolicy list` allows for the objects in `dir`.
pub fn list(bin: &Path, dir: &Path) -> Facts {
    let text = run_analyzer(
        bin,
        &["list", "--dirpath", dir.to_str().unwrap(), "-o", "json"],
    );
    let rows: Vec<Value> = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("analyzer JSON unreadable ({e}):\n{text}"));
    let mut facts = Vec::new();
    for row in rows {
        let src = parse_peer(row["src"].as_str().expect("src"));
        let dst = parse_peer(row["dst"].as_str().expect("dst"));
        for conn in parse_conns(row["conn"].as_str().expect("conn")) {
            facts.push(Fact {
                src: src.clone(),
                dst: dst.clone(),
                conn,
            });
        }
    }
    canonical(facts)
}
