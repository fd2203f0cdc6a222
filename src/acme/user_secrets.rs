//! Secrets the user supplies, read and never written: a certificate Secret of their own
//! (`tls.secretName`), checked and reported; and the keys the ACME settings refer to (the CA
//! bundle, the External Account Binding HMAC key, the DNS-01 TSIG key).

use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use super::timestamp::rfc3339;
use super::{Failure, cert};
use crate::crd::{CertificateState, CertificateStatus};
use crate::model::SecretKey;

/// The status of a user-managed certificate Secret (`tls.secretName`), checked with
/// [`cert::inspect`]: (status, ok, reason, message).
pub fn user_secret_status(
    secret: Option<&Secret>,
    name: &str,
    namespace: &str,
    hosts: &[String],
    now: SystemTime,
) -> (CertificateStatus, bool, &'static str, String) {
    let mut status = CertificateStatus::pending();
    let Some(secret) = secret else {
        let message = format!("Secret {name} does not exist in namespace {namespace}");
        status.last_failure_reason = Some(message.clone());
        return (status, false, "SecretMissing", message);
    };
    let data = secret.data.clone().unwrap_or_default();
    let (Some(crt), Some(key)) = (data.get("tls.crt"), data.get("tls.key")) else {
        let message = format!("Secret {name} has no tls.crt and tls.key");
        status.state = CertificateState::Failed;
        status.last_failure_reason = Some(message.clone());
        return (status, false, "SecretInvalid", message);
    };
    if let Ok(leaf) = cert::parse_chain(&crt.0) {
        status.hosts = leaf.facts.hosts.clone();
        status.serial = Some(leaf.facts.serial.clone());
        status.not_before = Some(rfc3339(leaf.facts.not_before));
        status.not_after = Some(rfc3339(leaf.facts.not_after));
    }
    match cert::inspect(&crt.0, &key.0, hosts, now) {
        Ok(leaf) => {
            status.state = CertificateState::Valid;
            let message = format!(
                "serving certificate {} from Secret {name} (managed by you), valid until {}",
                leaf.facts.serial,
                rfc3339(leaf.facts.not_after)
            );
            (status, true, "SecretPresent", message)
        }
        // A key format ring cannot read (PKCS#1, SEC1) is not the user's error.
        Err(cert::CertError::Key(_)) if status.serial.is_some() => {
            status.state = CertificateState::Valid;
            let message = format!(
                "serving the certificate in Secret {name} (managed by you); its key is not in \
                 PKCS#8 form, so the key match was not checked"
            );
            (status, true, "SecretPresent", message)
        }
        Err(e) => {
            let message = format!("Secret {name}: {e}");
            status.state = CertificateState::Failed;
            status.last_failure_reason = Some(message.clone());
            (status, false, "SecretInvalid", message)
        }
    }
}

/// Reads one key of a Secret in the stack's namespace; a plain-words error when missing.
pub async fn secret_value(
    client: &Client,
    namespace: &str,
    key: &SecretKey,
    what: &str,
) -> Result<Vec<u8>, Failure> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = api
        .get_opt(&key.name)
        .await
        .map_err(|e| Failure::kube(format!("reading Secret {}: {e}", key.name)))?
        .ok_or_else(|| Failure::config(format!("{what}: Secret {} does not exist", key.name)))?;
    secret
        .data
        .and_then(|mut d| d.remove(&key.key))
        .map(|b| b.0)
        .ok_or_else(|| {
            Failure::config(format!(
                "{what}: Secret {} has no key {:?}",
                key.name, key.key
            ))
        })
}

/// Decodes an EAB HMAC key as CAs hand it out: base64url (padding optional), or standard
/// base64. The error says nothing about the value (no offset, length or byte: it is a secret,
/// and the message reaches status and Events).
pub fn decode_hmac(text: &[u8]) -> Result<Vec<u8>, String> {
    const HIDDEN: &str = "(the value is not shown)";
    let s = std::str::from_utf8(text)
        .map_err(|_| format!("not text {HIDDEN}"))?
        .trim();
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .or_else(|_| URL_SAFE.decode(s))
        .or_else(|_| STANDARD.decode(s))
        .map_err(|_| format!("not base64url or base64 {HIDDEN}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;
    use std::time::Duration;

    #[test]
    fn user_secrets_show_serial_and_expiry_or_say_what_is_wrong() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let hosts = vec!["a.example".to_string()];
        let (crt, key) = cert::bootstrap(&hosts, now).unwrap();
        let secret = |crt: &str, key: &str| Secret {
            data: Some(BTreeMap::from([
                ("tls.crt".to_string(), ByteString(crt.as_bytes().to_vec())),
                ("tls.key".to_string(), ByteString(key.as_bytes().to_vec())),
            ])),
            ..Secret::default()
        };
        let (status, ok, reason, _) =
            user_secret_status(Some(&secret(&crt, &key)), "mine", "ns", &hosts, now);
        assert!(ok, "{status:?}");
        assert_eq!(reason, "SecretPresent");
        assert_eq!(status.state, CertificateState::Valid);
        assert!(status.serial.is_some());
        assert_eq!(
            status.not_after,
            Some(rfc3339(now + cert::BOOTSTRAP_LIFETIME))
        );

        let other = vec!["b.example".to_string()];
        let (status, ok, _, message) =
            user_secret_status(Some(&secret(&crt, &key)), "mine", "ns", &other, now);
        assert!(!ok);
        assert_eq!(status.state, CertificateState::Failed);
        assert_eq!(
            message,
            "Secret mine: the certificate does not cover b.example"
        );

        let (_, ok, reason, message) = user_secret_status(None, "mine", "ns", &hosts, now);
        assert!(!ok);
        assert_eq!(reason, "SecretMissing");
        assert_eq!(message, "Secret mine does not exist in namespace ns");
    }

    #[test]
    fn hmac_keys_decode_from_base64url_with_or_without_padding() {
        assert_eq!(decode_hmac(b"aGVsbG8").unwrap(), b"hello");
        assert_eq!(decode_hmac(b"aGVsbG8=\n").unwrap(), b"hello");
        assert_eq!(decode_hmac(b"_-8").unwrap(), [0xff, 0xef]);
        assert!(decode_hmac(b"!!").is_err());
    }
}
