//! The first [`super::DnsProvider`]: RFC 2136 dynamic update signed with TSIG (RFC 8945),
//! messages and signatures by hickory-proto, over TCP to the primary server; the zone's
//! authoritative servers (its NS records) asked whether they serve a record.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use hickory_proto::op::{Message, Query, ResponseCode, update_message};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::rdata::tsig::TsigAlgorithm as WireAlgorithm;
use hickory_proto::rr::{Name, RData, RecordSet, RecordType, TSigner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::DnsProvider;
use crate::acme::ca_client::{RefusedAddress, refuse_internal};
use crate::acme::{Failure, FailureKind};
use crate::crd::TsigAlgorithm;

/// TTL of the challenge records: short, the CA looks once.
const TXT_TTL: u32 = 60;
/// Per DNS exchange (connect, send, answer).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// RFC 2136 dynamic update with TSIG, to one primary server.
pub struct Rfc2136 {
    /// `host:port` as configured.
    pub nameserver: String,
    pub zone: Option<String>,
    signer: TSigner,
    /// Names the Secret and key, for messages (never the value).
    key_source: String,
    /// The port the zone's other authoritative servers (its NS records) are asked on: 53;
    /// a test's servers on loopback listen elsewhere (`OPSC_ACME_DNS01_NS_PORT`).
    pub ns_port: u16,
    /// Whether the nameserver may be a loopback address (`--allow-loopback-acme-directory`).
    pub allow_loopback: bool,
    zones: tokio::sync::Mutex<std::collections::HashMap<String, Name>>,
}

fn wire_algorithm(a: TsigAlgorithm) -> WireAlgorithm {
    match a {
        TsigAlgorithm::HmacSha256 => WireAlgorithm::HmacSha256,
        TsigAlgorithm::HmacSha384 => WireAlgorithm::HmacSha384,
        TsigAlgorithm::HmacSha512 => WireAlgorithm::HmacSha512,
    }
}

fn algorithm_name(a: TsigAlgorithm) -> &'static str {
    match a {
        TsigAlgorithm::HmacSha256 => "hmac-sha256",
        TsigAlgorithm::HmacSha384 => "hmac-sha384",
        TsigAlgorithm::HmacSha512 => "hmac-sha512",
    }
}

fn fqdn(name: &str) -> Result<Name, Failure> {
    let mut n = Name::from_ascii(name.trim_end_matches('.'))
        .map_err(|e| Failure::config(format!("DNS-01: {name:?} is not a DNS name: {e}")))?;
    n.set_fqdn(true);
    Ok(n)
}

/// The host of a nameserver as validation writes it (`host:port`, `[v6]:port`).
fn nameserver_host(nameserver: &str) -> &str {
    let host = nameserver
        .rsplit_once(':')
        .map_or(nameserver, |(host, _port)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The first of `addrs` that is not internal (`refuse_internal`, loopback allowed only with
/// `allow_loopback`), and the addresses refused (each once).
fn checked_address(
    host: &str,
    addrs: impl IntoIterator<Item = SocketAddr>,
    allow_loopback: bool,
) -> (Option<SocketAddr>, Vec<RefusedAddress>) {
    let mut refused: Vec<RefusedAddress> = Vec::new();
    let mut checked = None;
    for addr in addrs {
        match refuse_internal(host, [addr.ip()], allow_loopback) {
            Ok(()) => {
                checked.get_or_insert(addr);
            }
            Err(r) if refused.contains(&r) => {}
            Err(r) => refused.push(r),
        }
    }
    (checked, refused)
}

/// `"ns.example" resolves to 169.254.169.254, a link-local address: ...`, each refused address
/// with why.
fn refused_addresses(refused: &[RefusedAddress]) -> String {
    let Some(first) = refused.first() else {
        return String::new();
    };
    let mut out = if first.host == first.ip.to_string() {
        format!("{} is {}", first.ip, first.internal.why())
    } else {
        format!(
            "the name {:?} resolves to {}, {}",
            first.host,
            first.ip,
            first.internal.why()
        )
    };
    for r in &refused[1..] {
        out.push_str(&format!("; and to {}, {}", r.ip, r.internal.why()));
    }
    out
}

fn shown(name: &Name) -> String {
    name.to_ascii().trim_end_matches('.').to_string()
}

impl Rfc2136 {
    /// `secret` is the TSIG key (decoded); `key_source` says where it came from
    /// (`Secret NAME, key "KEY"`); `allow_loopback` lets the nameserver resolve to a loopback
    /// address (`--allow-loopback-acme-directory`).
    pub fn new(
        settings: &crate::model::Rfc2136,
        secret: Vec<u8>,
        key_source: String,
        ns_port: u16,
        allow_loopback: bool,
    ) -> Result<Rfc2136, Failure> {
        let key_name = fqdn(&settings.tsig_key_name)?;
        let signer = TSigner::new(
            secret,
            wire_algorithm(settings.tsig_algorithm),
            key_name,
            300,
        )
        .map_err(|e| Failure::config(format!("DNS-01: TSIG key unusable: {e}")))?;
        Ok(Rfc2136 {
            nameserver: settings.nameserver.clone(),
            zone: settings.zone.clone(),
            signer,
            key_source: format!(
                "TSIG key {:?} ({}, {key_source})",
                settings.tsig_key_name,
                algorithm_name(settings.tsig_algorithm)
            ),
            ns_port,
            allow_loopback,
            zones: Default::default(),
        })
    }

    /// The address to send to: the first address the nameserver resolves to that is not
    /// internal (issue 14, item 8: loopback unless `allow_loopback`, link-local with the cloud
    /// metadata service, unspecified; the rules of the CA client, `ca_client::refuse_internal`).
    /// Internal addresses are dropped; when nothing else is left the attempt fails naming the
    /// field, the name and the refused addresses, and nothing is sent. Only the address checked
    /// here is connected to (no second lookup a changed DNS answer could slip through).
    async fn server(&self) -> Result<SocketAddr, Failure> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(self.nameserver.as_str())
            .await
            .map_err(|e| {
                Failure::new(
                    FailureKind::DnsUpdateFailed,
                    format!(
                        "DNS-01: nameserver {} does not resolve: {e}",
                        self.nameserver
                    ),
                )
            })?
            .collect();
        let (checked, refused) = checked_address(
            nameserver_host(&self.nameserver),
            addrs,
            self.allow_loopback,
        );
        match (checked, refused.is_empty()) {
            (Some(addr), true) => Ok(addr),
            (Some(addr), false) => {
                tracing::warn!(
                    nameserver = %self.nameserver,
                    using = %addr,
                    refused = %refused_addresses(&refused),
                    "DNS-01: skipping the nameserver's internal addresses"
                );
                Ok(addr)
            }
            (None, true) => Err(Failure::new(
                FailureKind::DnsUpdateFailed,
                format!("DNS-01: nameserver {} has no address", self.nameserver),
            )),
            (None, false) => Err(Failure::config(format!(
                "DNS-01: spec.tls.acme.dns01.rfc2136.nameserver {:?}: {}; nothing was sent to it",
                self.nameserver,
                refused_addresses(&refused)
            ))),
        }
    }

    /// The zone holding `name`: the configured one, or the owner of the SOA the nameserver
    /// returns for `name` (in the answer at the apex, in the authority section below it).
    async fn zone_of(&self, name: &str) -> Result<Name, Failure> {
        let wanted = fqdn(name)?;
        if let Some(zone) = &self.zone {
            let zone = fqdn(zone)?;
            if !zone.zone_of(&wanted) {
                return Err(Failure::config(format!(
                    "DNS-01: {name} is not in zone {} (spec.tls.acme.dns01.rfc2136.zone)",
                    shown(&zone)
                )));
            }
            return Ok(zone);
        }
        if let Some(z) = self.zones.lock().await.get(name) {
            return Ok(z.clone());
        }
        let server = self.server().await?;
        let answer = query(server, &wanted, RecordType::SOA).await.map_err(|e| {
            Failure::new(
                FailureKind::DnsUpdateFailed,
                format!(
                    "DNS-01: looking up the zone of {name} at {}: {e}",
                    self.nameserver
                ),
            )
        })?;
        let soa_owner = answer
            .answers
            .iter()
            .chain(answer.authorities.iter())
            .find(|r| r.record_type() == RecordType::SOA)
            .map(|r| r.name.clone());
        let zone = match (answer.response_code, soa_owner) {
            (ResponseCode::NoError | ResponseCode::NXDomain, Some(owner))
                if answer.metadata.authoritative && owner.zone_of(&wanted) =>
            {
                owner
            }
            (code, _) => {
                return Err(Failure::config(format!(
                    "DNS-01: nameserver {} serves no zone for {name} (it answered {code} without \
                     an authoritative SOA); set spec.tls.acme.dns01.rfc2136.nameserver to the \
                     zone's primary server, or spec.tls.acme.dns01.rfc2136.zone",
                    self.nameserver
                )));
            }
        };
        self.zones
            .lock()
            .await
            .insert(name.to_string(), zone.clone());
        Ok(zone)
    }

    /// One signed update; `what` describes it for messages.
    async fn update(&self, message: Message, what: &str) -> Result<(), Failure> {
        let server = self.server().await?;
        let answer = exchange(server, message, Some(&self.signer))
            .await
            .map_err(|e| match e {
                ExchangeError::Refused(code) => self.refusal(code, what),
                other => Failure::new(
                    FailureKind::DnsUpdateFailed,
                    format!("DNS-01: {what} at {}: {other}", self.nameserver),
                ),
            })?;
        match answer.response_code {
            ResponseCode::NoError => Ok(()),
            code => Err(self.refusal(code, what)),
        }
    }

    fn refusal(&self, code: ResponseCode, what: &str) -> Failure {
        match code {
            ResponseCode::NotAuth => Failure::config(format!(
                "DNS-01: nameserver {} refused the {} (NOTAUTH) while {what}: check that the \
                 key name, algorithm and secret match the key the server has, and that the key \
                 may update this zone",
                self.nameserver, self.key_source
            )),
            ResponseCode::Refused => Failure::config(format!(
                "DNS-01: nameserver {} refused the update (REFUSED) while {what}: the {} may not \
                 update this zone, or the server does not allow dynamic updates",
                self.nameserver, self.key_source
            )),
            ResponseCode::NotZone => Failure::config(format!(
                "DNS-01: nameserver {} does not serve the zone (NOTZONE) while {what}",
                self.nameserver
            )),
            other => Failure::new(
                FailureKind::DnsUpdateFailed,
                format!(
                    "DNS-01: nameserver {} answered {other} while {what}",
                    self.nameserver
                ),
            ),
        }
    }

    fn txt_set(name: &Name, value: &str) -> RecordSet {
        let mut set = RecordSet::new(name.clone(), RecordType::TXT, 0);
        set.set_ttl(TXT_TTL);
        set.add_rdata(RData::TXT(TXT::new(vec![value.to_string()])));
        set
    }

    /// The servers that answer for the zone: the configured nameserver, and each NS of the
    /// zone (addresses from the nameserver's own A/AAAA records, else the system resolver).
    async fn authoritative(&self, zone: &Name) -> Result<Vec<(String, SocketAddr)>, Failure> {
        let primary = self.server().await?;
        let mut servers = vec![(self.nameserver.clone(), primary)];
        let ns = query(primary, zone, RecordType::NS).await.map_err(|e| {
            Failure::new(
                FailureKind::DnsUpdateFailed,
                format!(
                    "DNS-01: asking {} for the NS records of {}: {e}",
                    self.nameserver,
                    shown(zone)
                ),
            )
        })?;
        for record in &ns.answers {
            let RData::NS(target) = &record.data else {
                continue;
            };
            let target = target.0.clone();
            let mut addrs = Vec::new();
            for rtype in [RecordType::A, RecordType::AAAA] {
                if let Ok(a) = query(primary, &target, rtype).await {
                    for r in &a.answers {
                        match &r.data {
                            RData::A(ip) => addrs.push(SocketAddr::new(ip.0.into(), self.ns_port)),
                            RData::AAAA(ip) => {
                                addrs.push(SocketAddr::new(ip.0.into(), self.ns_port))
                            }
                            _ => {}
                        }
                    }
                }
            }
            if addrs.is_empty()
                && let Ok(found) =
                    tokio::net::lookup_host((shown(&target).as_str(), self.ns_port)).await
            {
                addrs.extend(found);
            }
            if addrs.is_empty() {
                servers.push((
                    format!("{} (no address found)", shown(&target)),
                    SocketAddr::from(([0, 0, 0, 0], 0)),
                ));
            }
            for addr in addrs {
                if servers.iter().all(|(_, a)| *a != addr) {
                    servers.push((format!("{} ({addr})", shown(&target)), addr));
                }
            }
        }
        Ok(servers)
    }
}

impl DnsProvider for Rfc2136 {
    /// Finds each name's zone, then sends each zone an update that changes nothing (one
    /// prerequisite: the zone's SOA exists; no update records), so that a key the server
    /// refuses is found before an order is placed.
    async fn prepare(&self, names: &[String]) -> Result<(), Failure> {
        let mut zones: Vec<Name> = Vec::new();
        for name in names {
            let zone = self.zone_of(name).await?;
            if !zones.contains(&zone) {
                zones.push(zone);
            }
        }
        for zone in zones {
            let mut message = Message::query();
            message.metadata.op_code = hickory_proto::op::OpCode::Update;
            message.metadata.recursion_desired = false;
            let mut question = Query::new();
            question
                .set_name(zone.clone())
                .set_query_class(hickory_proto::rr::DNSClass::IN)
                .set_query_type(RecordType::SOA);
            message.add_query(question);
            let mut exists = hickory_proto::rr::Record::update0(zone.clone(), 0, RecordType::SOA);
            exists.dns_class = hickory_proto::rr::DNSClass::ANY;
            message.add_answer(exists.into_record_of_rdata());
            self.update(
                message,
                &format!("checking the key against zone {} (no change)", shown(&zone)),
            )
            .await?;
        }
        Ok(())
    }

    async fn present(&self, name: &str, value: &str) -> Result<(), Failure> {
        let zone = self.zone_of(name).await?;
        let owner = fqdn(name)?;
        let message = update_message::append(Self::txt_set(&owner, value), zone, false, false);
        self.update(message, &format!("adding the TXT record {name}"))
            .await
    }

    async fn missing(&self, name: &str, value: &str) -> Result<Vec<String>, Failure> {
        let zone = self.zone_of(name).await?;
        let owner = fqdn(name)?;
        let mut missing = Vec::new();
        for (label, addr) in self.authoritative(&zone).await? {
            let seen = match query(addr, &owner, RecordType::TXT).await {
                Ok(answer) => answer.answers.iter().any(|r| match &r.data {
                    RData::TXT(txt) => txt.txt_data.iter().any(|s| s.as_ref() == value.as_bytes()),
                    _ => false,
                }),
                Err(_) => false,
            };
            if !seen {
                missing.push(label);
            }
        }
        Ok(missing)
    }

    async fn clean_up(&self, name: &str, value: &str) -> Result<(), Failure> {
        let zone = self.zone_of(name).await?;
        let owner = fqdn(name)?;
        let message = update_message::delete_by_rdata(Self::txt_set(&owner, value), zone, false);
        self.update(message, &format!("removing the TXT record {name}"))
            .await
    }
}

// ---------------------------------------------------------------------------------------------
// Transport: DNS over TCP (RFC 1035 section 4.2.2, RFC 7766), one exchange per connection.

#[derive(Debug)]
enum ExchangeError {
    /// The server answered with this code and no valid signature (a refused TSIG key is
    /// answered unsigned, RFC 8945 section 5.3.2).
    Refused(ResponseCode),
    Other(String),
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExchangeError::Refused(code) => write!(f, "refused ({code})"),
            ExchangeError::Other(s) => f.write_str(s),
        }
    }
}

async fn query(server: SocketAddr, name: &Name, rtype: RecordType) -> Result<Message, String> {
    let mut message = Message::query();
    message.add_query(Query::query(name.clone(), rtype));
    message.metadata.recursion_desired = false;
    exchange(server, message, None)
        .await
        .map_err(|e| e.to_string())
}

/// Sends `message` (signed with `signer` when given) and returns the answer; a signed
/// request's answer must carry a valid signature unless it is an error answer.
async fn exchange(
    server: SocketAddr,
    mut message: Message,
    signer: Option<&TSigner>,
) -> Result<Message, ExchangeError> {
    let io = |what: &str, e: std::io::Error| ExchangeError::Other(format!("{what}: {e}"));
    let mut verifier = match signer {
        Some(signer) => {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            message
                .finalize(signer, now)
                .map_err(|e| ExchangeError::Other(format!("signing the update: {e}")))?
        }
        None => None,
    };
    let id = message.metadata.id;
    let bytes = message
        .to_vec()
        .map_err(|e| ExchangeError::Other(format!("encoding the message: {e}")))?;
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(server)
            .await
            .map_err(|e| io("connecting", e))?;
        let len = u16::try_from(bytes.len())
            .map_err(|_| ExchangeError::Other("message too long".into()))?;
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        stream
            .write_all(&framed)
            .await
            .map_err(|e| io("sending", e))?;
        let mut len = [0u8; 2];
        stream
            .read_exact(&mut len)
            .await
            .map_err(|e| io("reading the answer", e))?;
        let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
        stream
            .read_exact(&mut answer)
            .await
            .map_err(|e| io("reading the answer", e))?;
        Ok::<_, ExchangeError>(answer)
    };
    let answer = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            ExchangeError::Other(format!("no answer within {} s", EXCHANGE_TIMEOUT.as_secs()))
        })??;
    let parsed = Message::from_vec(&answer)
        .map_err(|e| ExchangeError::Other(format!("unreadable answer: {e}")))?;
    if parsed.metadata.id != id {
        return Err(ExchangeError::Other("answer to another message".into()));
    }
    if let Some(verifier) = verifier.as_mut() {
        if parsed.response_code != ResponseCode::NoError {
            return Err(ExchangeError::Refused(parsed.response_code));
        }
        let verified = verifier.verify(&answer).map_err(|e| {
            ExchangeError::Other(format!(
                "the answer's TSIG signature does not verify (a wrong key, or not the server \
                 that has the key): {e}"
            ))
        })?;
        return Ok(verified.into_message());
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acme::dns01::DnsProvider;
    use crate::validate::Internal;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn provider(nameserver: &str, allow_loopback: bool) -> Rfc2136 {
        let settings = crate::model::Rfc2136 {
            nameserver: nameserver.to_string(),
            zone: None,
            tsig_key_name: "acme-key".into(),
            tsig_algorithm: TsigAlgorithm::HmacSha256,
            tsig_secret: crate::model::SecretKey {
                name: "tsig".into(),
                key: "secret".into(),
            },
        };
        Rfc2136::new(
            &settings,
            vec![7; 32],
            "Secret tsig".into(),
            53,
            allow_loopback,
        )
        .unwrap()
    }

    #[test]
    fn internal_addresses_of_a_nameserver_are_dropped_and_the_others_kept() {
        let addrs = |list: &[&str]| -> Vec<SocketAddr> {
            list.iter()
                .map(|a| SocketAddr::new(a.parse().unwrap(), 53))
                .collect()
        };
        assert_eq!(nameserver_host("ns.example:53"), "ns.example");
        assert_eq!(nameserver_host("[2001:db8::53]:53"), "2001:db8::53");
        // One good address among internal ones: only it is used.
        let (checked, refused) = checked_address(
            "ns.example",
            addrs(&[
                "169.254.169.254",
                "192.0.2.53",
                "127.0.0.1",
                "169.254.169.254",
            ]),
            false,
        );
        assert_eq!(checked, Some(addrs(&["192.0.2.53"])[0]));
        let refused_ips: Vec<String> = refused.iter().map(|r| r.ip.to_string()).collect();
        assert_eq!(refused_ips, ["169.254.169.254", "127.0.0.1"]);
        assert_eq!(
            refused_addresses(&refused),
            format!(
                "the name \"ns.example\" resolves to 169.254.169.254, {}; and to 127.0.0.1, {}",
                Internal::LinkLocal.why(),
                Internal::Loopback.why()
            )
        );
        // Loopback only with the flag; link-local, mapped and unspecified never.
        let (checked, _) = checked_address("ns.example", addrs(&["::1"]), true);
        assert_eq!(checked, Some(addrs(&["::1"])[0]));
        for ip in [
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "0.0.0.0",
            "::",
        ] {
            let (checked, refused) = checked_address("ns.example", addrs(&[ip]), true);
            assert_eq!((checked, refused.len()), (None, 1), "{ip}");
        }
    }

    /// The name `localhost` (resolved by the system resolver) with the loopback flag off: the
    /// attempt fails naming the field, the name and the address, and a listener on that
    /// address sees no connection; with the flag, the same name is used.
    #[tokio::test]
    async fn a_nameserver_name_resolving_to_loopback_is_refused_without_the_flag() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while listener.accept().await.is_ok() {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        });
        let nameserver = format!("localhost:{port}");
        let refused = provider(&nameserver, false)
            .prepare(&["_acme-challenge.www.example.test".into()])
            .await
            .unwrap_err();
        assert_eq!(refused.kind, FailureKind::Config);
        assert!(
            refused.message.starts_with(&format!(
                "DNS-01: spec.tls.acme.dns01.rfc2136.nameserver {nameserver:?}: the name \
                 \"localhost\" resolves to "
            )) && refused.message.contains(Internal::Loopback.why())
                && refused.message.ends_with("; nothing was sent to it"),
            "{}",
            refused.message
        );
        assert_eq!(connections.load(Ordering::SeqCst), 0);

        let allowed = provider(&nameserver, true).server().await.unwrap();
        assert!(
            allowed.ip().is_loopback() && allowed.port() == port,
            "{allowed}"
        );
    }
}
