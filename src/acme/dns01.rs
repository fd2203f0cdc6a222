//! DNS-01 challenges: a TXT record `_acme-challenge.<name>` holding the base64url SHA-256 of
//! the key authorization (RFC 8555 section 8.4), written through a [`DnsProvider`].
//!
//! - [`Dns01Solver`] is the order flow's [`Solver`] for DNS-01, over any [`DnsProvider`]: it
//!   records each TXT record in a ledger before writing it (so that a process stopped mid-order
//!   leaves a list the next one cleans up), waits until every authoritative server serves the
//!   record, and removes exactly the records it wrote (by value: the other records at that
//!   name, another stack's for the same zone included, stay).
//! - [`Rfc2136`] is the first provider: RFC 2136 dynamic update signed with TSIG (RFC 8945),
//!   messages and signatures by hickory-proto, over TCP to the primary server.
//!
//! Adding a provider: implement [`DnsProvider`] (present, missing, clean up, and the check of
//! the settings before an order), add its settings to `spec.tls.acme.dns01` and build it in
//! `mod.rs` where [`Rfc2136`] is built. The order flow does not change.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use hickory_proto::op::{Message, Query, ResponseCode, update_message};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::rdata::tsig::TsigAlgorithm as WireAlgorithm;
use hickory_proto::rr::{Name, RData, RecordSet, RecordType, TSigner};
use instant_acme::ChallengeType;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::order::Solver;
use super::{Failure, FailureKind};
use crate::crd::TsigAlgorithm;

/// TTL of the challenge records: short, the CA looks once.
const TXT_TTL: u32 = 60;
/// Per DNS exchange (connect, send, answer).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Writes and removes TXT records where the CA looks for them.
pub trait DnsProvider: Send + Sync {
    /// Checks, before an order is placed, that records at `names` can be written (for
    /// example that the server serves a zone for each).
    fn prepare(&self, names: &[String]) -> impl Future<Output = Result<(), Failure>> + Send;
    /// Adds the TXT record `value` at `name` (fully qualified, no trailing dot), beside any
    /// records already there.
    fn present(&self, name: &str, value: &str) -> impl Future<Output = Result<(), Failure>> + Send;
    /// One look at every server the CA may ask: those that do not serve `value` at `name`
    /// yet (empty: visible everywhere).
    fn missing(
        &self,
        name: &str,
        value: &str,
    ) -> impl Future<Output = Result<Vec<String>, Failure>> + Send;
    /// Removes exactly the record `value` at `name`.
    fn clean_up(&self, name: &str, value: &str)
    -> impl Future<Output = Result<(), Failure>> + Send;
}

/// A TXT record written for a challenge.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub name: String,
    pub value: String,
}

/// Where the records written and not yet removed are kept across processes (an annotation of
/// the stack's certificate Secret; see `mod.rs`). `save` replaces the whole list.
pub trait Ledger: Send + Sync {
    fn load(&self) -> impl Future<Output = Result<Vec<Record>, Failure>> + Send;
    fn save(&self, records: &[Record]) -> impl Future<Output = Result<(), Failure>> + Send;
}

/// `_acme-challenge.<host>` for a host or a wildcard host (`*.example.com` is validated at
/// `_acme-challenge.example.com`, RFC 8555 section 8.4).
pub fn challenge_name(host: &str) -> String {
    format!(
        "_acme-challenge.{}",
        host.strip_prefix("*.")
            .unwrap_or(host)
            .trim_end_matches('.')
    )
}

/// The TXT value for a key authorization: base64url(SHA-256(key authorization)), no padding.
pub fn txt_value(key_authorization: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(key_authorization.as_bytes()))
}

/// The order flow's DNS-01 solver over a provider.
pub struct Dns01Solver<P, L> {
    pub provider: P,
    pub ledger: L,
    /// How long `check` waits for every server to serve the record.
    pub propagation_timeout: Duration,
    /// What the solver waits for right now (shown in the stack's status while an order runs).
    pub progress: Arc<Mutex<Option<String>>>,
    written: tokio::sync::Mutex<Vec<Record>>,
}

impl<P: DnsProvider, L: Ledger> Dns01Solver<P, L> {
    pub fn new(
        provider: P,
        ledger: L,
        propagation_timeout: Duration,
        progress: Arc<Mutex<Option<String>>>,
    ) -> Self {
        Self {
            provider,
            ledger,
            propagation_timeout,
            progress,
            written: tokio::sync::Mutex::new(Vec::new()),
        }
    }

    fn say(&self, what: Option<String>) {
        *self.progress.lock().unwrap() = what;
    }

    /// Removes the records an earlier order left behind (a process stopped mid-order, or a
    /// removal that failed), as listed in the ledger. Those that cannot be removed now stay
    /// listed for the next order.
    pub async fn remove_leftovers(&self) -> Result<usize, Failure> {
        let mut written = self.written.lock().await;
        let listed = self.ledger.load().await?;
        let mut kept = Vec::new();
        let mut removed = 0;
        for r in listed {
            match self.provider.clean_up(&r.name, &r.value).await {
                Ok(()) => {
                    tracing::info!(name = %r.name, "removed a DNS-01 record left by an earlier order");
                    removed += 1;
                }
                Err(f) => {
                    tracing::warn!(name = %r.name, error = %f.message, "could not remove a DNS-01 record left by an earlier order");
                    kept.push(r);
                }
            }
        }
        self.ledger.save(&kept).await?;
        *written = kept;
        Ok(removed)
    }
}

impl<P: DnsProvider, L: Ledger> Solver for Dns01Solver<P, L> {
    fn challenge_type(&self, _host: &str) -> ChallengeType {
        ChallengeType::Dns01
    }

    async fn prepare(&self, hosts: &[String], _thumbprint: &str) -> Result<(), Failure> {
        self.remove_leftovers().await?;
        let mut names: Vec<String> = hosts.iter().map(|h| challenge_name(h)).collect();
        names.dedup();
        self.provider.prepare(&names).await
    }

    async fn present(
        &self,
        host: &str,
        _token: &str,
        key_authorization: &str,
    ) -> Result<(), Failure> {
        let record = Record {
            name: challenge_name(host),
            value: txt_value(key_authorization),
        };
        // Listed before it is written: a process stopped right after the write leaves it
        // listed for the next one.
        let mut written = self.written.lock().await;
        written.push(record.clone());
        self.ledger.save(&written).await?;
        drop(written);
        self.say(Some(format!("writing the TXT record {}", record.name)));
        self.provider.present(&record.name, &record.value).await
    }

    async fn check(
        &self,
        host: &str,
        _token: &str,
        key_authorization: &str,
    ) -> Result<(), Failure> {
        let (name, value) = (challenge_name(host), txt_value(key_authorization));
        let started = Instant::now();
        let deadline = started + self.propagation_timeout;
        let mut pause = Duration::from_millis(100);
        loop {
            let missing = self.provider.missing(&name, &value).await?;
            if missing.is_empty() {
                tracing::debug!(%name, seconds = started.elapsed().as_secs_f64(), "DNS-01 record visible at every authoritative server");
                self.say(None);
                return Ok(());
            }
            let waited = started.elapsed().as_secs();
            self.say(Some(format!(
                "waiting for the TXT record {name} to be served by {} (not yet after {waited} s)",
                missing.join(", ")
            )));
            if Instant::now() + pause > deadline {
                self.say(None);
                return Err(Failure::new(
                    FailureKind::DnsNotPropagated,
                    format!(
                        "DNS-01: the TXT record {name} is not served by {} after {} s \
                         (spec.tls.acme.dns01.propagationTimeoutSeconds); the CA was not asked \
                         to validate",
                        missing.join(", "),
                        self.propagation_timeout.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    async fn clean_up(&self, host: &str, _token: &str, key_authorization: &str) {
        let record = Record {
            name: challenge_name(host),
            value: txt_value(key_authorization),
        };
        match self.provider.clean_up(&record.name, &record.value).await {
            Ok(()) => {
                let mut written = self.written.lock().await;
                written.retain(|r| r != &record);
                if let Err(f) = self.ledger.save(&written).await {
                    tracing::warn!(error = %f.message, "could not update the DNS-01 record list");
                }
            }
            // Stays in the ledger: the next order removes it.
            Err(f) => {
                tracing::warn!(name = %record.name, error = %f.message, "could not remove a DNS-01 record; the next order tries again");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// RFC 2136

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

fn shown(name: &Name) -> String {
    name.to_ascii().trim_end_matches('.').to_string()
}

impl Rfc2136 {
    /// `secret` is the TSIG key (decoded); `key_source` says where it came from
    /// (`Secret NAME, key "KEY"`).
    pub fn new(
        settings: &crate::model::Rfc2136,
        secret: Vec<u8>,
        key_source: String,
        ns_port: u16,
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
            zones: Default::default(),
        })
    }

    async fn server(&self) -> Result<SocketAddr, Failure> {
        let mut addrs = tokio::net::lookup_host(self.nameserver.as_str())
            .await
            .map_err(|e| {
                Failure::new(
                    FailureKind::DnsUpdateFailed,
                    format!(
                        "DNS-01: nameserver {} does not resolve: {e}",
                        self.nameserver
                    ),
                )
            })?;
        addrs.next().ok_or_else(|| {
            Failure::new(
                FailureKind::DnsUpdateFailed,
                format!("DNS-01: nameserver {} has no address", self.nameserver),
            )
        })
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

    #[test]
    fn challenge_names_and_values() {
        assert_eq!(
            challenge_name("a.example.com"),
            "_acme-challenge.a.example.com"
        );
        assert_eq!(
            challenge_name("*.example.com"),
            "_acme-challenge.example.com"
        );
        // RFC 8555 section 8.4: base64url(SHA-256("token.thumbprint")), 43 characters.
        let v = txt_value("token.thumbprint");
        assert_eq!(v.len(), 43);
        assert!(!v.contains('=') && !v.contains('+') && !v.contains('/'));
        assert_ne!(v, txt_value("token.other"));
    }
}
