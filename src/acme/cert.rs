//! Certificates and keys: inspecting a `kubernetes.io/tls` Secret's contents, the temporary
//! bootstrap certificate, a new private key and CSR per issuance.
//!
//! Nothing here talks to the network or reads the clock: times are passed in.

use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256,
    PKCS_ECDSA_P384_SHA384, PKCS_RSA_SHA256, SignatureAlgorithm,
};
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::pem::Pem;

use super::policy::CertFacts;

/// The Common Name of the temporary self-signed certificate; how it is recognised.
pub const BOOTSTRAP_CN: &str = "opsconductor temporary certificate";

/// How long the bootstrap certificate is valid. Long enough to never expire while issuance
/// is retried, short enough that a forgotten one is noticed.
pub const BOOTSTRAP_LIFETIME: Duration = Duration::from_secs(30 * 86_400);

/// The key type of a new certificate key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyAlgorithm {
    #[default]
    EcdsaP256,
    EcdsaP384,
    /// RSA, 2048-bit modulus, public exponent 65537; the CSR is signed RSA PKCS#1 v1.5
    /// SHA-256.
    Rsa2048,
}

impl KeyAlgorithm {
    fn rcgen(self) -> &'static SignatureAlgorithm {
        match self {
            KeyAlgorithm::EcdsaP256 => &PKCS_ECDSA_P256_SHA256,
            KeyAlgorithm::EcdsaP384 => &PKCS_ECDSA_P384_SHA384,
            KeyAlgorithm::Rsa2048 => &PKCS_RSA_SHA256,
        }
    }

    /// Whether making a key takes long enough (RSA: tens to hundreds of milliseconds, seconds
    /// in a debug build) that it must not run on an async worker thread.
    pub fn is_slow(self) -> bool {
        matches!(self, KeyAlgorithm::Rsa2048)
    }
}

/// Errors of this module: what is wrong with a certificate or key, in plain words.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertError {
    #[error("tls.crt holds no PEM certificate")]
    NoCertificate,
    #[error("tls.crt is not valid PEM: {0}")]
    Pem(String),
    #[error("certificate {index} of the chain cannot be parsed: {detail}")]
    Parse { index: usize, detail: String },
    #[error(
        "certificate {index} of the chain was not issued by the next one ({issuer} != {subject})"
    )]
    ChainOrder {
        index: usize,
        issuer: String,
        subject: String,
    },
    #[error("tls.key cannot be parsed (PKCS#8 PEM expected): {0}")]
    Key(String),
    #[error("tls.key does not belong to the certificate")]
    KeyMismatch,
    #[error("the certificate does not cover {}", .0.join(", "))]
    HostsNotCovered(Vec<String>),
    #[error("the certificate is not valid before {0}")]
    NotYetValid(String),
    #[error("the certificate expired at {0}")]
    Expired(String),
    #[error("cannot make a key or certificate: {0}")]
    Generate(String),
}

/// What a parsed chain says about its leaf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    pub facts: CertFacts,
    /// The temporary bootstrap certificate (self-signed, [`BOOTSTRAP_CN`]).
    pub temporary: bool,
    /// Certificates in the chain, leaf included.
    pub chain_len: usize,
    /// The ARI certificate identifier `base64url(AKI keyIdentifier).base64url(serial DER)`
    /// (RFC 9773 section 4.1), when the leaf has an authority key identifier.
    pub ari_id: Option<String>,
    /// The leaf's SubjectPublicKeyInfo key bits, for the key-match check.
    public_key: Vec<u8>,
}

/// Parses a PEM chain (leaf first) and checks that each certificate was issued by the next.
pub fn parse_chain(crt_pem: &[u8]) -> Result<Leaf, CertError> {
    let mut ders = Vec::new();
    for pem in Pem::iter_from_buffer(crt_pem) {
        let pem = pem.map_err(|e| CertError::Pem(e.to_string()))?;
        if pem.label == "CERTIFICATE" {
            ders.push(pem.contents);
        }
    }
    if ders.is_empty() {
        return Err(CertError::NoCertificate);
    }
    let mut parsed = Vec::with_capacity(ders.len());
    for (index, der) in ders.iter().enumerate() {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| CertError::Parse {
            index,
            detail: e.to_string(),
        })?;
        parsed.push(cert);
    }
    for (index, pair) in parsed.windows(2).enumerate() {
        if pair[0].issuer().as_raw() != pair[1].subject().as_raw() {
            return Err(CertError::ChainOrder {
                index,
                issuer: pair[0].issuer().to_string(),
                subject: pair[1].subject().to_string(),
            });
        }
    }
    Ok(leaf_of(&parsed[0], parsed.len()))
}

fn leaf_of(cert: &X509Certificate<'_>, chain_len: usize) -> Leaf {
    let mut hosts = Vec::new();
    let mut aki = None;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    if let GeneralName::DNSName(dns) = name {
                        hosts.push(dns.to_ascii_lowercase());
                    }
                }
            }
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                aki = a.key_identifier.as_ref().map(|k| k.0.to_vec());
            }
            _ => {}
        }
    }
    let raw_serial = cert.tbs_certificate.raw_serial();
    let serial = hex(raw_serial.strip_prefix(&[0]).unwrap_or(raw_serial));
    let time = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    let cn_is_bootstrap = cert
        .subject()
        .iter_common_name()
        .any(|cn| cn.as_str() == Ok(BOOTSTRAP_CN));
    let self_signed = cert.subject().as_raw() == cert.issuer().as_raw();
    let ari_id = aki.map(|aki| {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!("{}.{}", b64.encode(aki), b64.encode(raw_serial))
    });
    Leaf {
        facts: CertFacts {
            not_before: time(cert.validity().not_before),
            not_after: time(cert.validity().not_after),
            hosts,
            serial,
        },
        temporary: cn_is_bootstrap && self_signed,
        chain_len,
        ari_id,
        public_key: cert.public_key().subject_public_key.data.to_vec(),
    }
}

/// Whether the PKCS#8 PEM key `key_pem` is the private half of `leaf`'s public key.
pub fn key_matches(leaf: &Leaf, key_pem: &[u8]) -> Result<bool, CertError> {
    let text = std::str::from_utf8(key_pem).map_err(|_| CertError::Key("not UTF-8".into()))?;
    let key = KeyPair::from_pem(text).map_err(|e| CertError::Key(e.to_string()))?;
    Ok(key.public_key_raw() == leaf.public_key.as_slice())
}

/// Whether `pattern` (a certificate name, possibly `*.example.com`) covers `host`. A wildcard
/// covers exactly one leftmost label.
pub fn name_covers(pattern: &str, host: &str) -> bool {
    let (pattern, host) = (pattern.to_ascii_lowercase(), host.to_ascii_lowercase());
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == host,
    }
}

/// The wanted hosts that none of the certificate's names covers.
pub fn uncovered(leaf: &Leaf, wanted: &[String]) -> Vec<String> {
    wanted
        .iter()
        .filter(|h| !leaf.facts.hosts.iter().any(|n| name_covers(n, h)))
        .cloned()
        .collect()
}

/// The full check of a Secret's `tls.crt` and `tls.key`: the chain parses and is in order,
/// the key belongs to the leaf, the leaf covers every wanted host and is valid at `now`.
pub fn inspect(
    crt_pem: &[u8],
    key_pem: &[u8],
    wanted: &[String],
    now: SystemTime,
) -> Result<Leaf, CertError> {
    let leaf = parse_chain(crt_pem)?;
    if !key_matches(&leaf, key_pem)? {
        return Err(CertError::KeyMismatch);
    }
    let missing = uncovered(&leaf, wanted);
    if !missing.is_empty() {
        return Err(CertError::HostsNotCovered(missing));
    }
    if now < leaf.facts.not_before {
        return Err(CertError::NotYetValid(super::rfc3339(
            leaf.facts.not_before,
        )));
    }
    if now >= leaf.facts.not_after {
        return Err(CertError::Expired(super::rfc3339(leaf.facts.not_after)));
    }
    Ok(leaf)
}

/// A new private key for one issuance. RSA is slow (see [`KeyAlgorithm::is_slow`]): call
/// it off the async runtime.
pub fn new_key(algorithm: KeyAlgorithm) -> Result<KeyPair, CertError> {
    match algorithm {
        KeyAlgorithm::Rsa2048 => new_rsa_key(2048, algorithm.rcgen()),
        _ => {
            KeyPair::generate_for(algorithm.rcgen()).map_err(|e| CertError::Generate(e.to_string()))
        }
    }
}

/// ring signs with RSA keys but cannot make them: the `rsa` crate makes the key (its primes
/// from the OS random source), and ring loads its PKCS#8 encoding, checking it on the way.
/// The `rsa` crate is used for nothing else: every private-key operation is ring's.
fn new_rsa_key(bits: usize, alg: &'static SignatureAlgorithm) -> Result<KeyPair, CertError> {
    use rsa::pkcs8::EncodePrivateKey;
    let generate = |e: String| CertError::Generate(format!("RSA-{bits} key: {e}"));
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits)
        .map_err(|e| generate(e.to_string()))?;
    let pkcs8 = key.to_pkcs8_der().map_err(|e| generate(e.to_string()))?;
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from(pkcs8.as_bytes());
    KeyPair::from_pkcs8_der_and_sign_algo(&der, alg).map_err(|e| generate(e.to_string()))
}

/// A DER CSR for `hosts` (subjectAltNames only, an empty subject, as ACME CAs expect).
pub fn csr(hosts: &[String], key: &KeyPair) -> Result<Vec<u8>, CertError> {
    let mut params =
        CertificateParams::new(hosts.to_vec()).map_err(|e| CertError::Generate(e.to_string()))?;
    params.distinguished_name = DistinguishedName::new();
    let csr = params
        .serialize_request(key)
        .map_err(|e| CertError::Generate(e.to_string()))?;
    Ok(csr.der().to_vec())
}

/// The temporary self-signed certificate (PEM chain, PKCS#8 PEM key) for `hosts`, valid from
/// an hour before `now` for [`BOOTSTRAP_LIFETIME`]. Browsers will not trust it; it only lets
/// the gateway start (and answer HTTP-01) before the first issuance.
pub fn bootstrap(hosts: &[String], now: SystemTime) -> Result<(String, String), CertError> {
    let key = new_key(KeyAlgorithm::EcdsaP256)?;
    let mut params =
        CertificateParams::new(hosts.to_vec()).map_err(|e| CertError::Generate(e.to_string()))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, BOOTSTRAP_CN);
    params.distinguished_name = dn;
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + BOOTSTRAP_LIFETIME).into();
    let cert = params
        .self_signed(&key)
        .map_err(|e| CertError::Generate(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The digest the operator records next to what it writes, to notice changes by others.
pub fn content_digest(crt: &[u8], key: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(crt);
    h.update([0]);
    h.update(key);
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, IsCa, Issuer, KeyIdMethod};
    use x509_parser::prelude::FromDer;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn hosts(h: &[&str]) -> Vec<String> {
        h.iter().map(|s| s.to_string()).collect()
    }

    /// A small CA and a leaf signed by it, as an ACME CA would return them.
    fn issued(names: &[&str]) -> (String, String, String) {
        issued_with(names, new_key(KeyAlgorithm::EcdsaP256).unwrap())
    }

    /// The same, with the leaf's key given.
    fn issued_with(names: &[&str], leaf_key: KeyPair) -> (String, String, String) {
        let ca_key = new_key(KeyAlgorithm::EcdsaP256).unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "test CA");
        ca.key_identifier_method = KeyIdMethod::Sha256;
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let mut leaf = CertificateParams::new(hosts(names)).unwrap();
        leaf.use_authority_key_identifier_extension = true;
        leaf.not_before = (now() - Duration::from_secs(86_400)).into();
        leaf.not_after = (now() + Duration::from_secs(89 * 86_400)).into();
        leaf.serial_number = Some(vec![0x04, 0xa1, 0xb2].into());
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
        (
            format!("{}{}", leaf_cert.pem(), ca_cert.pem()),
            leaf_key.serialize_pem(),
            ca_cert.pem(),
        )
    }

    #[test]
    fn an_issued_chain_is_inspected() {
        let (chain, key, _) = issued(&["a.example", "B.example"]);
        let leaf = inspect(
            chain.as_bytes(),
            key.as_bytes(),
            &hosts(&["a.example", "b.example"]),
            now(),
        )
        .unwrap();
        assert_eq!(leaf.chain_len, 2);
        assert_eq!(leaf.facts.serial, "04a1b2");
        assert_eq!(leaf.facts.hosts, ["a.example", "b.example"]);
        assert!(!leaf.temporary);
        assert_eq!(
            leaf.facts.not_after,
            now() + Duration::from_secs(89 * 86_400)
        );
        let ari = leaf.ari_id.as_deref().unwrap();
        assert!(ari.ends_with(".BKGy"), "{ari}");
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let (chain, _, _) = issued(&["a.example"]);
        let (_, other_key, _) = issued(&["a.example"]);
        assert_eq!(
            inspect(
                chain.as_bytes(),
                other_key.as_bytes(),
                &hosts(&["a.example"]),
                now()
            ),
            Err(CertError::KeyMismatch)
        );
    }

    #[test]
    fn missing_hosts_expiry_and_garbage_are_named() {
        let (chain, key, _) = issued(&["a.example"]);
        assert_eq!(
            inspect(
                chain.as_bytes(),
                key.as_bytes(),
                &hosts(&["a.example", "c.example"]),
                now()
            ),
            Err(CertError::HostsNotCovered(vec!["c.example".into()]))
        );
        let later = now() + Duration::from_secs(90 * 86_400);
        assert!(matches!(
            inspect(
                chain.as_bytes(),
                key.as_bytes(),
                &hosts(&["a.example"]),
                later
            ),
            Err(CertError::Expired(_))
        ));
        assert_eq!(
            parse_chain(b"hello").map(|_| ()),
            Err(CertError::NoCertificate)
        );
        let broken = chain.replacen("MII", "MIX", 1);
        assert!(parse_chain(broken.as_bytes()).is_err());
        assert!(matches!(
            inspect(
                chain.as_bytes(),
                b"not a key",
                &hosts(&["a.example"]),
                now()
            ),
            Err(CertError::Key(_))
        ));
    }

    #[test]
    fn a_chain_out_of_order_is_refused() {
        let (chain, _, ca) = issued(&["a.example"]);
        let leaf_only = chain.strip_suffix(&ca).unwrap();
        let reversed = format!("{ca}{leaf_only}");
        assert!(matches!(
            parse_chain(reversed.as_bytes()),
            Err(CertError::ChainOrder { index: 0, .. })
        ));
    }

    #[test]
    fn the_bootstrap_certificate_is_valid_for_the_hosts_and_marked_temporary() {
        let wanted = hosts(&["a.example", "b.example"]);
        let (crt, key) = bootstrap(&wanted, now()).unwrap();
        let leaf = inspect(crt.as_bytes(), key.as_bytes(), &wanted, now()).unwrap();
        assert!(leaf.temporary);
        assert_eq!(leaf.chain_len, 1);
        assert_eq!(leaf.facts.not_after, now() + BOOTSTRAP_LIFETIME);
        // An issued certificate is never taken for a temporary one.
        let (chain, key2, _) = issued(&["a.example"]);
        assert!(
            !inspect(
                chain.as_bytes(),
                key2.as_bytes(),
                &hosts(&["a.example"]),
                now()
            )
            .unwrap()
            .temporary
        );
    }

    #[test]
    fn every_issuance_gets_a_new_key_and_a_csr_for_all_hosts() {
        let a = new_key(KeyAlgorithm::EcdsaP256).unwrap();
        let b = new_key(KeyAlgorithm::EcdsaP256).unwrap();
        assert_ne!(a.public_key_raw(), b.public_key_raw());
        let p384 = new_key(KeyAlgorithm::EcdsaP384).unwrap();
        assert_eq!(p384.public_key_raw().len(), 97);
        let der = csr(&hosts(&["a.example", "b.example"]), &a).unwrap();
        let (_, req) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&der).unwrap();
        let names: Vec<String> = req
            .requested_extensions()
            .into_iter()
            .flatten()
            .filter_map(|e| match e {
                x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) => Some(
                    san.general_names
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(names, ["DNSName(a.example)", "DNSName(b.example)"]);
    }

    #[test]
    fn an_rsa_key_makes_a_csr_and_matches_its_certificate() {
        let started = std::time::Instant::now();
        let key = new_key(KeyAlgorithm::Rsa2048).unwrap();
        println!("RSA-2048 key made in {:?}", started.elapsed());
        assert!(key.is_compatible(&PKCS_RSA_SHA256));
        let pem = key.serialize_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");

        // The CSR carries a 2048-bit RSA key with exponent 65537 and an RSA-SHA256 signature.
        let der = csr(&hosts(&["a.example"]), &key).unwrap();
        let (_, req) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&der).unwrap();
        assert_eq!(
            req.signature_algorithm.algorithm,
            x509_parser::oid_registry::OID_PKCS1_SHA256WITHRSA
        );
        let spki = &req.certification_request_info.subject_pki;
        match spki.parsed().unwrap() {
            x509_parser::public_key::PublicKey::RSA(rsa) => {
                assert_eq!(rsa.key_size(), 2048);
                assert_eq!(rsa.try_exponent().unwrap(), 65537);
            }
            other => panic!("not an RSA key: {other:?}"),
        }
        assert_eq!(spki.subject_public_key.data.as_ref(), key.public_key_raw());

        // A certificate for that key (signed by an ECDSA CA, as CAs mix them) passes the full
        // check with the key as the Secret holds it; another RSA key, or an ECDSA one, does not.
        let (chain, key_pem, _) = issued_with(&["a.example"], key);
        assert_eq!(key_pem, pem);
        let leaf = inspect(
            chain.as_bytes(),
            key_pem.as_bytes(),
            &hosts(&["a.example"]),
            now(),
        )
        .unwrap();
        assert_eq!(leaf.facts.hosts, ["a.example"]);
        let other = new_key(KeyAlgorithm::Rsa2048).unwrap().serialize_pem();
        assert_ne!(other, pem);
        let ecdsa = new_key(KeyAlgorithm::EcdsaP256).unwrap().serialize_pem();
        for wrong in [other, ecdsa] {
            assert_eq!(
                inspect(
                    chain.as_bytes(),
                    wrong.as_bytes(),
                    &hosts(&["a.example"]),
                    now()
                ),
                Err(CertError::KeyMismatch)
            );
        }
        // An ECDSA certificate with an RSA key is refused too.
        let (ecdsa_chain, _, _) = issued(&["a.example"]);
        assert_eq!(
            inspect(
                ecdsa_chain.as_bytes(),
                pem.as_bytes(),
                &hosts(&["a.example"]),
                now()
            ),
            Err(CertError::KeyMismatch)
        );
        assert!(KeyAlgorithm::Rsa2048.is_slow());
        assert!(!KeyAlgorithm::EcdsaP256.is_slow());
    }

    #[test]
    fn wildcards_cover_one_label() {
        assert!(name_covers("*.example.com", "a.example.com"));
        assert!(name_covers("A.example.com", "a.EXAMPLE.com"));
        assert!(!name_covers("*.example.com", "example.com"));
        assert!(!name_covers("*.example.com", "a.b.example.com"));
        assert!(!name_covers("a.example.com", "b.example.com"));
    }

    #[test]
    fn the_content_digest_changes_with_either_half() {
        let d = content_digest(b"crt", b"key");
        assert_eq!(d.len(), 64);
        assert_ne!(d, content_digest(b"crt", b"key2"));
        assert_ne!(d, content_digest(b"crtk", b"ey"));
    }
}
