//! The API server's service account token issuer and signing keys, for the stacks with
//! `spec.serviceIdentity`: the operator reads them and writes them into each such stack's
//! identity ConfigMap, so that the services verify one another's tokens offline, with no
//! egress to the API server and no RBAC of their own (docs/gateway.md, "Service identity").
//!
//! Read once, then again every [`REFRESH`] (signing keys change only when the API server is
//! restarted with other keys); after a failed read the keys last read stay in use and the next
//! reconcile that needs them tries again after [`RETRY`]. With none read since the operator
//! started, the ConfigMaps are written without keys: services then refuse every token (fails
//! closed) until a read succeeds, and the stack's `ServiceIdentityReady` condition says why.
//! Keys found in an existing ConfigMap are not taken over: anyone who may edit ConfigMaps in the
//! namespace could have put their own key there, and a drift revert needs the real keys.

use std::time::{Duration, Instant};

use kube::Client;

use crate::build::IdentityKeys;

/// How long keys read from the API server are used before they are read again.
pub const REFRESH: Duration = Duration::from_secs(300);
/// How long after a failed read the next one is tried.
pub const RETRY: Duration = Duration::from_secs(30);

/// The cache in [`super::Context`]: the keys last read, and when a read was last tried.
#[derive(Default)]
pub struct KeysCache {
    state: tokio::sync::Mutex<CacheState>,
}

/// The keys last read, and when a read was last tried and whether it succeeded.
type CacheState = (
    Option<IdentityKeys>,
    Option<(Instant, bool)>,
    Option<String>,
);

/// What the cache gives a reconcile: the keys last read, and why the last read failed, when it
/// did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Keys {
    pub keys: Option<IdentityKeys>,
    pub error: Option<String>,
}

impl KeysCache {
    /// The keys, read again when the last read is older than [`REFRESH`] (or failed more than
    /// [`RETRY`] ago). No keys until a read succeeded.
    pub async fn get(&self, client: &Client) -> Keys {
        let mut state = self.state.lock().await;
        let due = match state.1 {
            None => true,
            Some((at, ok)) => at.elapsed() >= if ok { REFRESH } else { RETRY },
        };
        if due {
            match read(client).await {
                Ok(keys) => {
                    if state.0.as_ref() != Some(&keys) {
                        tracing::info!(issuer = %keys.issuer, "read the service account token signing keys");
                    }
                    *state = (Some(keys), Some((Instant::now(), true)), None);
                }
                Err(e) => {
                    if state.0.is_some() {
                        tracing::warn!(error = %e, "cannot read the service account token issuer and keys from the API server; the stacks' identity ConfigMaps keep the keys read earlier");
                    } else {
                        tracing::warn!(error = %e, "cannot read the service account token issuer and keys from the API server; the stacks' identity ConfigMaps have no keys until a read succeeds (services refuse every token meanwhile)");
                    }
                    state.1 = Some((Instant::now(), false));
                    state.2 = Some(format!("{e:#}"));
                }
            }
        }
        Keys {
            keys: state.0.clone(),
            error: state.2.clone(),
        }
    }

    /// What [`KeysCache::get`] gave last, without reading (for the status of the reconcile
    /// that just built with it).
    pub async fn current(&self) -> Keys {
        let state = self.state.lock().await;
        Keys {
            keys: state.0.clone(),
            error: state.2.clone(),
        }
    }
}

/// `ServiceIdentityReady` of a stack with `spec.serviceIdentity`, from the identity ConfigMap
/// it wants (`keys`: what it publishes) and the last read's error. True while the ConfigMap
/// has keys (a failed refresh is named: the keys read earlier stay until a read succeeds);
/// False without them, since then every token is refused.
pub fn verdict(config_map: &str, keys: &Keys) -> crate::controller::status::Verdict {
    use crate::controller::status::Verdict;
    let error = keys.error.as_deref();
    match (&keys.keys, error) {
        (Some(k), None) => Verdict::ok(
            "KeysPublished",
            format!(
                "ConfigMap {config_map} holds the API server's issuer {} and {} token signing key(s)",
                k.issuer,
                key_count(&k.jwks)
            ),
        ),
        (Some(k), Some(e)) => Verdict::ok(
            "KeysPublished",
            format!(
                "ConfigMap {config_map} holds the issuer {} and {} token signing key(s) read earlier; reading them again failed ({e}), retried every {} s",
                k.issuer,
                key_count(&k.jwks),
                RETRY.as_secs()
            ),
        ),
        (None, e) => Verdict::not(
            "KeysUnavailable",
            format!(
                "cannot read the service account token issuer and keys from the API server ({}); ConfigMap {config_map} has none, so services refuse every identity token until a read succeeds (retried every {} s)",
                e.unwrap_or("not read yet"),
                RETRY.as_secs()
            ),
        ),
    }
}

/// How many keys a JWKS document holds (0 if it is not one).
fn key_count(jwks: &str) -> usize {
    serde_json::from_str::<serde_json::Value>(jwks)
        .ok()
        .and_then(|v| Some(v.get("keys")?.as_array()?.len()))
        .unwrap_or(0)
}

/// Reads the issuer (`/.well-known/openid-configuration`) and the keys (`/openid/v1/jwks`).
/// Needs `get` on those two non-resource URLs: Kubernetes grants it to every service account
/// by default (the ClusterRole `system:service-account-issuer-discovery`, bound to
/// `system:serviceaccounts`); the chart adds no rule of its own for it.
pub async fn read(client: &Client) -> anyhow::Result<IdentityKeys> {
    let get = |path: &str| -> anyhow::Result<http::Request<Vec<u8>>> {
        Ok(http::Request::get(path).body(Vec::new())?)
    };
    let discovery: serde_json::Value = serde_json::from_str(
        &client
            .request_text(get("/.well-known/openid-configuration")?)
            .await?,
    )?;
    let issuer = discovery
        .get("issuer")
        .and_then(|i| i.as_str())
        .filter(|i| !i.is_empty())
        .ok_or_else(|| anyhow::anyhow!("the discovery document has no issuer"))?
        .to_string();
    let jwks: serde_json::Value =
        serde_json::from_str(&client.request_text(get("/openid/v1/jwks")?).await?)?;
    if jwks
        .get("keys")
        .and_then(|k| k.as_array())
        .is_none_or(|k| k.is_empty())
    {
        anyhow::bail!("/openid/v1/jwks has no keys");
    }
    Ok(IdentityKeys {
        issuer,
        // Re-serialized compactly, so that the ConfigMap changes only when the keys do.
        jwks: serde_json::to_string(&jwks)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_condition_is_true_only_with_keys_and_names_a_failed_read() {
        let k = IdentityKeys {
            issuer: "https://kubernetes.default.svc".into(),
            jwks: r#"{"keys":[{"kid":"a"},{"kid":"b"}]}"#.into(),
        };
        let fresh = verdict(
            "shop-identity",
            &Keys {
                keys: Some(k.clone()),
                error: None,
            },
        );
        assert!(fresh.ok && fresh.reason == "KeysPublished", "{fresh:?}");
        assert!(
            fresh.message.contains("2 token signing key(s)"),
            "{fresh:?}"
        );
        let stale = verdict(
            "shop-identity",
            &Keys {
                keys: Some(k),
                error: Some("403 Forbidden".into()),
            },
        );
        assert!(
            stale.ok && stale.message.contains("403 Forbidden"),
            "{stale:?}"
        );
        let none = verdict(
            "shop-identity",
            &Keys {
                keys: None,
                error: Some("403 Forbidden".into()),
            },
        );
        assert!(!none.ok && none.reason == "KeysUnavailable", "{none:?}");
        assert!(
            none.message.contains("403 Forbidden") && none.message.contains("shop-identity"),
            "{none:?}"
        );
    }
}
