//! The stack's certificate Secret `<stack>-tls`: reading and checking what is in use (with the
//! bootstrap certificate when there is none, and the last good one restored when someone else
//! changed it), writing it, and the DNS-01 ledger kept in its annotation.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

use super::manager::CertEvent;
use super::state::{Good, State};
use super::{Error, Failure, cert, dns01};
use crate::model::Stack;
use crate::names::{self, Component};
use crate::ownership::{self, Claim, NameConflict};

/// Annotation on `<stack>-tls`: sha256 of what the operator wrote, to notice changes by others.
pub const DIGEST_ANNOTATION: &str = "opsconductor.io/certificate-sha256";
/// Annotation on `<stack>-tls`: `temporary` for the bootstrap certificate, `acme` otherwise.
pub const SOURCE_ANNOTATION: &str = "opsconductor.io/certificate-source";

/// Reads `<stack>-tls` and says what is in use: writes the bootstrap certificate when
/// there is none, and restores the last good certificate when someone changed it.
pub(super) async fn examine(
    client: &Client,
    stack: &Stack,
    state: &Arc<Mutex<State>>,
    now: SystemTime,
    events: &mut Vec<CertEvent>,
) -> Result<Examined, Error> {
    let name = names::tls_secret(&stack.name);
    let api: Api<Secret> = Api::namespaced(client.clone(), &stack.namespace);
    let Some(secret) = api.get_opt(&name).await? else {
        // (Created by server-side apply: a Secret created by someone else meanwhile would
        // be written. The window is one request long, and a stack only ever names its
        // own `<stack>-tls`.)
        write_bootstrap(client, stack, now).await?;
        events.push(CertEvent {
            warning: false,
            reason: "TemporaryCertificate",
            note: format!(
                "wrote a temporary self-signed certificate to Secret {name} so the gateway can \
                 start; it is replaced after the first issuance"
            ),
        });
        return Ok(Examined::Temporary);
    };
    let claim = ownership::claim(&secret.metadata, stack.name.as_str(), stack.uid.as_deref());
    if let Claim::Foreign(why) = claim {
        return Ok(Examined::Conflict(NameConflict {
            kind: "Secret",
            name,
            why,
        }));
    }
    let data = secret.data.clone().unwrap_or_default();
    let field = |k: &str| data.get(k).map(|b| b.0.clone()).unwrap_or_default();
    let (crt, key) = (field("tls.crt"), field("tls.key"));
    let recorded = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DIGEST_ANNOTATION))
        .cloned();
    // An adopted Secret is rewritten (with the stack's owner reference) like a changed one.
    let untouched = claim == Claim::Ours
        && recorded.as_deref() == Some(cert::content_digest(&crt, &key).as_str());
    let parsed = cert::parse_chain(&crt).and_then(|leaf| {
        if cert::key_matches(&leaf, &key)? {
            Ok(leaf)
        } else {
            Err(cert::CertError::KeyMismatch)
        }
    });
    if untouched {
        return Ok(match parsed {
            Ok(leaf) if leaf.temporary => Examined::Temporary,
            Ok(leaf) => {
                let mut st = state.lock().unwrap();
                if st
                    .good
                    .as_ref()
                    .is_none_or(|g| g.leaf.facts.serial != leaf.facts.serial)
                {
                    st.good = Some(Good {
                        crt: String::from_utf8_lossy(&crt).into_owned(),
                        key: String::from_utf8_lossy(&key).into_owned(),
                        leaf: leaf.clone(),
                    });
                }
                Examined::Issued(leaf)
            }
            Err(e) => Examined::Broken(e.to_string(), None),
        });
    }
    // Changed by someone else.
    let what = match &parsed {
        Ok(leaf) => format!("it now holds certificate {}", leaf.facts.serial),
        Err(e) => format!("its content is unusable: {e}"),
    };
    let good = state.lock().unwrap().good.clone();
    if let Some(good) = good.filter(|g| now < g.leaf.facts.not_after) {
        write_tls_secret(client, stack, &good.crt, &good.key, false).await?;
        events.push(CertEvent {
            warning: true,
            reason: "CertificateRepaired",
            note: format!(
                "Secret {name} was changed by someone else ({what}); restored certificate {}",
                good.leaf.facts.serial
            ),
        });
        return Ok(Examined::Issued(good.leaf));
    }
    events.push(CertEvent {
        warning: true,
        reason: "CertificateTampered",
        note: format!(
            "Secret {name} was changed by someone else ({what}) and the operator holds no \
             copy of its own certificate; ordering a new one"
        ),
    });
    match parsed {
        // It still serves; keep it in place while a new certificate is ordered.
        Ok(leaf) if !leaf.temporary => Ok(Examined::Broken(
            format!("Secret {name} was changed by someone else"),
            Some(leaf),
        )),
        _ => {
            write_bootstrap(client, stack, now).await?;
            Ok(Examined::Broken(
                format!("Secret {name} was changed by someone else: {what}"),
                None,
            ))
        }
    }
}

/// What `<stack>-tls` holds.
#[derive(Debug)]
pub(super) enum Examined {
    Temporary,
    /// Unusable or not the operator's; the leaf when it still serves.
    Broken(String, Option<cert::Leaf>),
    Issued(cert::Leaf),
    /// Someone else's Secret of that name: not used, not written.
    Conflict(NameConflict),
}

impl Examined {
    /// The certificate the gateway serves when it is one the CA issued: a good one, or one
    /// changed by someone else that still serves.
    pub(super) fn in_use(&self) -> Option<&cert::Leaf> {
        match self {
            Examined::Issued(leaf) | Examined::Broken(_, Some(leaf)) => Some(leaf),
            _ => None,
        }
    }
}

/// Writes a new temporary self-signed certificate for the gateway's hosts to `<stack>-tls`.
async fn write_bootstrap(client: &Client, stack: &Stack, now: SystemTime) -> Result<(), Error> {
    let (crt, key) =
        cert::bootstrap(&stack.gateway.hosts, now).map_err(|source| Error::Bootstrap {
            secret: names::tls_secret(&stack.name),
            source,
        })?;
    write_tls_secret(client, stack, &crt, &key, true).await?;
    Ok(())
}

/// Writes `<stack>-tls` (server-side apply): the chain, the key, the digest of both.
pub(super) async fn write_tls_secret(
    client: &Client,
    stack: &Stack,
    crt: &str,
    key: &str,
    temporary: bool,
) -> Result<(), kube::Error> {
    let name = names::tls_secret(&stack.name);
    let mut meta = crate::build::meta(stack, name.clone(), Component::Gateway);
    meta.annotations = Some(BTreeMap::from([
        (
            DIGEST_ANNOTATION.to_string(),
            cert::content_digest(crt.as_bytes(), key.as_bytes()),
        ),
        (
            SOURCE_ANNOTATION.to_string(),
            if temporary { "temporary" } else { "acme" }.to_string(),
        ),
    ]));
    let secret = Secret {
        metadata: meta,
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_string(), ByteString(crt.as_bytes().to_vec())),
            ("tls.key".to_string(), ByteString(key.as_bytes().to_vec())),
        ])),
        ..Secret::default()
    };
    let mut value = serde_json::to_value(&secret).map_err(kube::Error::SerdeError)?;
    value["apiVersion"] = "v1".into();
    value["kind"] = "Secret".into();
    Api::<Secret>::namespaced(client.clone(), &stack.namespace)
        .patch(
            &name,
            &PatchParams::apply(names::MANAGER).force(),
            &Patch::Apply(&value),
        )
        .await?;
    Ok(())
}

/// Annotation on `<stack>-tls`: the DNS-01 records written and not yet removed (JSON list of
/// `{name, value}`), written before each record is, under its own field manager.
pub const DNS01_RECORDS_ANNOTATION: &str = "opsconductor.io/dns01-records";
/// The field manager of [`DNS01_RECORDS_ANNOTATION`] (apart from the Secret's content, so
/// that neither write removes the other's fields).
const DNS01_MANAGER: &str = "opsconductor-operator-dns01";

/// The DNS-01 ledger kept in an annotation of the stack's certificate Secret: the Secret
/// exists before any order (the temporary certificate), belongs to the stack and goes with
/// it; a record listed there was written by this stack's orders and by nothing else.
pub(super) struct SecretLedger {
    pub(super) client: Client,
    pub(super) stack: Stack,
}

impl dns01::Ledger for SecretLedger {
    async fn load(&self) -> Result<Vec<dns01::Record>, Failure> {
        let name = names::tls_secret(&self.stack.name);
        let secret = Api::<Secret>::namespaced(self.client.clone(), &self.stack.namespace)
            .get_opt(&name)
            .await
            .map_err(|e| Failure::kube(format!("reading Secret {name}: {e}")))?;
        let text = secret
            .and_then(|s| s.metadata.annotations)
            .and_then(|mut a| a.remove(DNS01_RECORDS_ANNOTATION));
        Ok(text
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default())
    }

    async fn save(&self, records: &[dns01::Record]) -> Result<(), Failure> {
        let name = names::tls_secret(&self.stack.name);
        // A merge patch: it never creates the Secret (gone with its stack, or replaced by
        // someone else's meanwhile: a 404 or a conflict, not a Secret made here).
        let listed = if records.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::Value::String(serde_json::to_string(records).unwrap_or_default())
        };
        let value = serde_json::json!({
            "metadata": {"annotations": {DNS01_RECORDS_ANNOTATION: listed}},
        });
        let params = PatchParams {
            field_manager: Some(DNS01_MANAGER.into()),
            ..PatchParams::default()
        };
        Api::<Secret>::namespaced(self.client.clone(), &self.stack.namespace)
            .patch(&name, &params, &Patch::Merge(&value))
            .await
            .map_err(|e| {
                Failure::kube(format!("recording DNS-01 records in Secret {name}: {e}"))
            })?;
        Ok(())
    }
}
