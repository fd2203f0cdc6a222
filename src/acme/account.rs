//! The ACME account: registered once per stack, kept in the Secret `<stack>-acme-account`,
//! reused across restarts and replicas. The HTTP client that talks to the CA is
//! [`super::ca_client`].
//!
//! The Secret holds instant-acme's account credentials (`credentials.json`: the account URL,
//! the PKCS#8 P-256 key, the directory URL). Before the account is registered it holds only
//! the key ([`KEY_AHEAD_KEY`]): the operator makes the key at the stack's first reconcile
//! ([`generate_ahead`]), so the gateway's first configuration already answers HTTP-01 with its
//! thumbprint, and the first order need not wait for the kubelet to bring a changed ConfigMap
//! into the gateway pods (up to a minute and a half); registration then uses that key. Not
//! with External Account Binding: instant-acme makes the key of such an account itself. It carries the stack's labels and a controller
//! owner reference, so it goes away with the stack. Registration happens only with
//! `acceptTermsOfService: true` (validation refuses anything else), with the `email` as
//! `mailto:` contact and, when configured, External Account Binding.
//!
//! The JWK thumbprint (RFC 7638) of the account key is what the gateway appends to the token
//! when it answers HTTP-01 challenges statelessly; it is computed here from the stored key,
//! without asking the CA.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use instant_acme::{Account, AccountCredentials, ExternalAccountKey, Key, NewAccount};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, Client};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

use super::ca_client::CaClient;
use super::{Failure, user_secrets};
use crate::model::{Acme, Stack};
use crate::names::{self, Component};
use crate::ownership::{self, Claim, NameConflict};

/// Key of the credentials in the account Secret.
pub const CREDENTIALS_KEY: &str = "credentials.json";
/// Key of the account key made ahead of registration (PKCS#8 DER), until `credentials.json`
/// replaces it.
pub const KEY_AHEAD_KEY: &str = "account-key.pk8";
/// Annotation naming the directory the account is registered with (for people).
pub const DIRECTORY_ANNOTATION: &str = "opsconductor.io/acme-directory";

/// The JWK thumbprint (RFC 7638) of a P-256 public key given as the uncompressed point
/// `04 || x || y`.
pub fn jwk_thumbprint_p256(public_point: &[u8]) -> Option<String> {
    if public_point.len() != 65 || public_point[0] != 4 {
        return None;
    }
    let b64 = URL_SAFE_NO_PAD;
    let jwk = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        b64.encode(&public_point[1..33]),
        b64.encode(&public_point[33..65])
    );
    Some(b64.encode(Sha256::digest(jwk.as_bytes())))
}

/// The stored account: instant-acme's credentials and what we read from them, or only a key
/// made ahead of registration.
pub struct Stored {
    /// instant-acme's credentials; `None` for a key made ahead of registration.
    pub credentials_json: Option<String>,
    /// The directory the account is registered with (`None` before registration).
    pub directory: Option<String>,
    pub thumbprint: String,
    key_pkcs8: Vec<u8>,
}

impl Stored {
    pub fn parse(credentials_json: &str) -> Result<Stored, String> {
        let value: serde_json::Value =
            serde_json::from_str(credentials_json).map_err(|e| e.to_string())?;
        let key = value["key_pkcs8"]
            .as_str()
            .ok_or("no key_pkcs8")?
            .trim_end_matches('=');
        let key_pkcs8 = URL_SAFE_NO_PAD
            .decode(key)
            .map_err(|e| format!("key_pkcs8: {e}"))?;
        let mut stored = Stored::ahead(key_pkcs8)?;
        stored.credentials_json = Some(credentials_json.to_string());
        stored.directory = value["directory"].as_str().map(str::to_string);
        Ok(stored)
    }

    /// A key made ahead of registration (PKCS#8 DER, P-256).
    pub fn ahead(key_pkcs8: Vec<u8>) -> Result<Stored, String> {
        let pair = rcgen::KeyPair::try_from(key_pkcs8.as_slice()).map_err(|e| e.to_string())?;
        let thumbprint =
            jwk_thumbprint_p256(pair.public_key_raw()).ok_or("the account key is not P-256")?;
        Ok(Stored {
            credentials_json: None,
            directory: None,
            thumbprint,
            key_pkcs8,
        })
    }

    /// Whether this is an account registered with `directory_url`.
    pub fn registered_with(&self, directory_url: &str) -> bool {
        self.credentials_json.is_some() && self.directory.as_deref() == Some(directory_url)
    }

    /// The thumbprint the gateway must answer HTTP-01 with for `acme`, when it is known before
    /// an order: the account's, when it is registered with that directory; a key's made ahead
    /// of registration, which the registration will use (not with External Account Binding,
    /// whose key instant-acme makes itself).
    pub fn thumbprint_for(&self, acme: &Acme) -> Option<&str> {
        let known = if self.credentials_json.is_some() {
            self.registered_with(&acme.directory_url)
        } else {
            acme.external_account_binding.is_none()
        };
        known.then_some(self.thumbprint.as_str())
    }

    pub fn credentials(&self) -> Result<AccountCredentials, Failure> {
        let json = self
            .credentials_json
            .as_deref()
            .ok_or_else(|| Failure::config("the ACME account is not registered yet"))?;
        serde_json::from_str(json)
            .map_err(|e| Failure::config(format!("the stored ACME account is unreadable: {e}")))
    }
}

/// Why the account Secret could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Kube(#[from] kube::Error),
    /// A Secret of that name exists and is someone else's: never read, never written.
    #[error("{0}")]
    Conflict(NameConflict),
    /// No key could be made ahead of registration (the system's random source failed).
    #[error("generating an ACME account key: {0}")]
    KeyGeneration(String),
}

impl From<ReadError> for Failure {
    fn from(e: ReadError) -> Failure {
        match e {
            ReadError::Kube(e) => Failure::kube(format!("reading the ACME account Secret: {e}")),
            ReadError::Conflict(c) => Failure::new(super::FailureKind::NameConflict, c.to_string()),
            ReadError::KeyGeneration(e) => Failure::config(e),
        }
    }
}

/// Reads the account Secret; `None` when there is none (or it holds no credentials). A
/// Secret of that name that is someone else's (see [`crate::ownership`]) is not read.
pub async fn read(client: &Client, stack: &Stack) -> Result<Option<Stored>, ReadError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &stack.namespace);
    let name = names::acme_account_secret(&stack.name);
    let Some(secret) = api.get_opt(&name).await? else {
        return Ok(None);
    };
    if let Claim::Foreign(why) =
        ownership::claim(&secret.metadata, stack.name.as_str(), stack.uid.as_deref())
    {
        return Err(ReadError::Conflict(NameConflict {
            kind: "Secret",
            name,
            why,
        }));
    }
    let data = secret.data.unwrap_or_default();
    if let Some(bytes) = data.get(CREDENTIALS_KEY) {
        return Ok(std::str::from_utf8(&bytes.0)
            .ok()
            .and_then(|s| Stored::parse(s).ok()));
    }
    Ok(data
        .get(KEY_AHEAD_KEY)
        .and_then(|bytes| Stored::ahead(bytes.0.clone()).ok()))
}

/// Makes the account key ahead of registration and keeps it in the account Secret (created,
/// never replaced); returns what [`read`] then finds. Called when there is no account Secret,
/// without External Account Binding: the gateway's configuration gets the key's thumbprint
/// before the first order, and the registration uses the key.
pub async fn generate_ahead(client: &Client, stack: &Stack) -> Result<Option<Stored>, ReadError> {
    let (_, pkcs8) = Key::generate_pkcs8().map_err(|e| ReadError::KeyGeneration(e.to_string()))?;
    let key_pkcs8 = pkcs8.secret_pkcs8_der().to_vec();
    let api: Api<Secret> = Api::namespaced(client.clone(), &stack.namespace);
    let name = names::acme_account_secret(&stack.name);
    let secret = Secret {
        metadata: crate::build::meta(stack, name, Component::Gateway),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            KEY_AHEAD_KEY.to_string(),
            ByteString(key_pkcs8.clone()),
        )])),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(Stored::ahead(key_pkcs8).ok()),
        // Made meanwhile (by the order job's registration, or by hand): what is there counts.
        Err(kube::Error::Api(e)) if e.code == 409 => read(client, stack).await,
        Err(e) => Err(ReadError::Kube(e)),
    }
}

/// A ready account and its thumbprint.
pub struct Ready {
    pub account: Account,
    pub thumbprint: String,
    /// Whether it was registered just now.
    pub registered: bool,
}

/// The account of `stack`: the stored one when it belongs to the configured directory,
/// otherwise a new registration (stored before it is used).
pub async fn load_or_register(
    client: &Client,
    stack: &Stack,
    acme: &Acme,
    http: &CaClient,
) -> Result<Ready, Failure> {
    let stored = read(client, stack).await?;
    if let Some(stored) = stored
        .as_ref()
        .filter(|s| s.registered_with(&acme.directory_url))
    {
        let account = Account::builder_with_http(Box::new(http.clone()))
            .from_credentials(stored.credentials()?)
            .await
            .map_err(|e| Failure::from_acme("reading the CA's directory", e, http))?;
        return Ok(Ready {
            account,
            thumbprint: stored.thumbprint.clone(),
            registered: false,
        });
    }
    // A key made ahead of registration is registered, so the thumbprint the gateway already
    // answers with stays right; an account of another directory is not reused.
    let ahead = stored.as_ref().filter(|s| s.credentials_json.is_none());
    register(client, stack, acme, http, ahead).await
}

/// Registers an account (reusing `key` when given: one made ahead of registration, or after
/// the CA forgot the account, as a restarted test CA does) and stores its credentials.
pub async fn register(
    client: &Client,
    stack: &Stack,
    acme: &Acme,
    http: &CaClient,
    key: Option<&Stored>,
) -> Result<Ready, Failure> {
    let contact = acme.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let eab = match &acme.external_account_binding {
        Some((key_id, hmac_ref)) => {
            let raw = user_secrets::secret_value(
                client,
                &stack.namespace,
                hmac_ref,
                "externalAccountBinding.hmacKeySecretRef",
            )
            .await?;
            let hmac = user_secrets::decode_hmac(&raw).map_err(|e| {
                Failure::config(format!("the External Account Binding HMAC key is {e}"))
            })?;
            Some(ExternalAccountKey::new(key_id.clone(), &hmac))
        }
        None => None,
    };
    let builder = Account::builder_with_http(Box::new(http.clone()));
    let (account, credentials) = match (key, &eab) {
        // Same key, same thumbprint: the gateway's configuration need not change.
        (Some(stored), None) => {
            let pkcs8 = PrivatePkcs8KeyDer::from(stored.key_pkcs8.clone());
            let signing = Key::from_pkcs8_der(pkcs8.clone_key())
                .map_err(|e| Failure::config(format!("the stored account key: {e}")))?;
            let (account, credentials) = builder
                .create_from_key(
                    (signing, PrivateKeyDer::Pkcs8(pkcs8)),
                    acme.directory_url.clone(),
                )
                .await
                .map_err(|e| Failure::from_acme("registering the ACME account", e, http))?;
            if !contacts.is_empty() {
                account
                    .update_contacts(&contacts)
                    .await
                    .map_err(|e| Failure::from_acme("setting the account's contact", e, http))?;
            }
            (account, credentials)
        }
        _ => builder
            .create(
                &NewAccount {
                    contact: &contacts,
                    // Validation admits only stacks with acceptTermsOfService: true.
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                acme.directory_url.clone(),
                eab.as_ref(),
            )
            .await
            .map_err(|e| registration_failure(e, acme, http))?,
    };
    let json = serde_json::to_string(&credentials)
        .map_err(|e| Failure::config(format!("serializing the account: {e}")))?;
    let stored = Stored::parse(&json).map_err(Failure::config)?;
    store(client, stack, &acme.directory_url, &json).await?;
    Ok(Ready {
        account,
        thumbprint: stored.thumbprint,
        registered: true,
    })
}

/// A failed registration in plain words. With External Account Binding, the CA's
/// `unauthorized` or `malformed` answer means it did not accept the binding (an unknown keyId,
/// an HMAC key that does not match it): that is said first, naming the settings to check.
fn registration_failure(e: instant_acme::Error, acme: &Acme, http: &CaClient) -> Failure {
    const STEP: &str = "registering the ACME account";
    let refused_binding = match (&e, &acme.external_account_binding) {
        (instant_acme::Error::Api(p), Some(eab))
            if super::order::is_type(p, "unauthorized")
                || super::order::is_type(p, "malformed") =>
        {
            Some((super::order::problem_text(p), eab))
        }
        _ => None,
    };
    match refused_binding {
        Some((said, (key_id, hmac_ref))) => Failure::new(
            super::FailureKind::AccountRefused,
            format!(
                "the CA refused the External Account Binding: check that keyId {key_id:?} and \
                 the HMAC key in Secret {} (key {:?}) are the pair the CA gave you; the CA \
                 said: {said} (while {STEP})",
                hmac_ref.name, hmac_ref.key
            ),
        ),
        None => Failure::from_acme(STEP, e, http),
    }
}

/// Writes the account Secret (created, or replaced when it held another directory's account).
/// An existing Secret of that name that is someone else's is never replaced.
async fn store(
    client: &Client,
    stack: &Stack,
    directory: &str,
    credentials_json: &str,
) -> Result<(), Failure> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &stack.namespace);
    let name = names::acme_account_secret(&stack.name);
    let mut meta = crate::build::meta(stack, name.clone(), Component::Gateway);
    meta.annotations = Some(BTreeMap::from([(
        DIRECTORY_ANNOTATION.to_string(),
        directory.to_string(),
    )]));
    let secret = Secret {
        metadata: meta,
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            CREDENTIALS_KEY.to_string(),
            ByteString(credentials_json.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    };
    let kube_err = |e: kube::Error| Failure::kube(format!("writing Secret {name}: {e}"));
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let mut current = api.get(&name).await.map_err(kube_err)?;
            if let Claim::Foreign(why) =
                ownership::claim(&current.metadata, stack.name.as_str(), stack.uid.as_deref())
            {
                let conflict = NameConflict {
                    kind: "Secret",
                    name,
                    why,
                };
                return Err(Failure::new(
                    super::FailureKind::NameConflict,
                    conflict.to_string(),
                ));
            }
            current.data = secret.data;
            current.metadata.annotations = secret.metadata.annotations;
            current.metadata.labels = secret.metadata.labels;
            current.metadata.owner_references = secret.metadata.owner_references;
            api.replace(&name, &PostParams::default(), &current)
                .await
                .map_err(kube_err)?;
            Ok(())
        }
        Err(e) => Err(kube_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SecretKey;

    #[test]
    fn the_thumbprint_is_read_from_stored_credentials() {
        let (key, pkcs8) = Key::generate_pkcs8().unwrap();
        let credentials = serde_json::json!({
            "id": "https://ca.test/acct/1",
            "key_pkcs8": URL_SAFE_NO_PAD.encode(pkcs8.secret_pkcs8_der()),
            "directory": "https://ca.test/dir",
        })
        .to_string();
        let stored = Stored::parse(&credentials).unwrap();
        assert_eq!(stored.directory.as_deref(), Some("https://ca.test/dir"));
        // A SHA-256 in base64url: 43 characters. (tests/acme_real.rs proves the value: the
        // CA validates the gateway's "<token>.<thumbprint>" answers.)
        assert_eq!(stored.thumbprint.len(), 43);
        drop(key);
        // Deterministic for the same key.
        assert_eq!(
            Stored::parse(&credentials).unwrap().thumbprint,
            stored.thumbprint
        );
    }

    /// An ACME setting at `https://ca.test/dir` without anything optional.
    fn test_acme() -> Acme {
        Acme {
            directory_url: "https://ca.test/dir".into(),
            email: None,
            external_account_binding: None,
            ca_bundle: None,
            profile: None,
            key_algorithm: Default::default(),
            dns01: None,
        }
    }

    /// A key made ahead of registration names the thumbprint the registration will keep,
    /// except with External Account Binding; a registered account's counts only for its own
    /// directory.
    #[test]
    fn which_stored_key_names_the_thumbprint_before_an_order() {
        let (_, pkcs8) = Key::generate_pkcs8().unwrap();
        let der = pkcs8.secret_pkcs8_der().to_vec();
        let ahead = Stored::ahead(der.clone()).unwrap();
        let credentials = serde_json::json!({
            "id": "https://ca.test/acct/1",
            "key_pkcs8": URL_SAFE_NO_PAD.encode(&der),
            "directory": "https://ca.test/dir",
        })
        .to_string();
        let registered = Stored::parse(&credentials).unwrap();
        assert_eq!(
            ahead.thumbprint, registered.thumbprint,
            "same key, same thumbprint"
        );
        let mut acme = test_acme();
        assert_eq!(ahead.thumbprint_for(&acme), Some(ahead.thumbprint.as_str()));
        assert_eq!(
            registered.thumbprint_for(&acme),
            Some(ahead.thumbprint.as_str())
        );
        assert!(registered.credentials().is_ok());
        assert!(
            ahead.credentials().is_err(),
            "a key ahead is no account yet"
        );
        acme.directory_url = "https://other-ca.test/dir".into();
        assert_eq!(
            registered.thumbprint_for(&acme),
            None,
            "another CA: a new account"
        );
        assert_eq!(ahead.thumbprint_for(&acme), Some(ahead.thumbprint.as_str()));
        acme.external_account_binding = Some((
            "kid".into(),
            SecretKey {
                name: "eab".into(),
                key: "hmac".into(),
            },
        ));
        assert_eq!(
            ahead.thumbprint_for(&acme),
            None,
            "EAB: the key is made at registration"
        );
        assert!(Stored::ahead(b"not a key".to_vec()).is_err());
    }

    #[test]
    fn rfc_7638_example_thumbprint() {
        // RFC 7638 section 3.1 uses an RSA key; RFC 8037-style EC vectors are not published,
        // so check the construction against a hand-computed JWK digest instead.
        let mut point = vec![4u8];
        point.extend([1u8; 32]);
        point.extend([2u8; 32]);
        let jwk = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            URL_SAFE_NO_PAD.encode([1u8; 32]),
            URL_SAFE_NO_PAD.encode([2u8; 32])
        );
        assert_eq!(
            jwk_thumbprint_p256(&point).unwrap(),
            URL_SAFE_NO_PAD.encode(Sha256::digest(jwk.as_bytes()))
        );
        assert_eq!(jwk_thumbprint_p256(&point[..64]), None);
    }

    #[test]
    fn a_refused_registration_names_the_binding_to_check() {
        let http = CaClient::new(None, false).unwrap();
        let problem = |kind: &str, detail: &str| {
            instant_acme::Error::Api(
                serde_json::from_value(serde_json::json!({
                    "type": format!("urn:ietf:params:acme:error:{kind}"),
                    "detail": detail,
                    "status": 403,
                }))
                .unwrap(),
            )
        };
        let mut acme = test_acme();
        // No binding configured, and the CA wants one.
        let f = registration_failure(
            problem("externalAccountRequired", "policy requires EAB"),
            &acme,
            &http,
        );
        assert_eq!(f.kind, super::super::FailureKind::AccountRefused);
        assert!(
            f.message.starts_with(
                "the CA requires External Account Binding: set spec.tls.acme.externalAccountBinding"
            ),
            "{}",
            f.message
        );
        assert!(
            f.message
                .contains("policy requires EAB (externalAccountRequired)")
        );
        // Refused for another reason, without a binding: the CA's words.
        let f = registration_failure(problem("unauthorized", "no"), &acme, &http);
        assert!(
            f.message.starts_with("the CA refused the account: no"),
            "{}",
            f.message
        );
        // A binding the CA does not accept.
        acme.external_account_binding = Some((
            "kid-1".into(),
            SecretKey {
                name: "eab".into(),
                key: "hmac".into(),
            },
        ));
        for kind in ["unauthorized", "malformed"] {
            let f = registration_failure(problem(kind, "bad MAC"), &acme, &http);
            assert_eq!(f.kind, super::super::FailureKind::AccountRefused);
            assert!(
                f.message.starts_with(
                    "the CA refused the External Account Binding: check that keyId \"kid-1\" \
                     and the HMAC key in Secret eab (key \"hmac\")"
                ),
                "{}",
                f.message
            );
            assert!(f.message.contains(&format!("bad MAC ({kind})")));
        }
        // A rate limit stays a rate limit.
        let f = registration_failure(problem("rateLimited", "slow down"), &acme, &http);
        assert_eq!(f.kind, super::super::FailureKind::RateLimited);
    }
}
