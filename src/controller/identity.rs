//! The API server's service account token issuer and signing keys, for the stacks with
//! `spec.serviceIdentity`: the operator reads them and writes them into each such stack's
//! identity ConfigMap, so that the services verify one another's tokens offline, with no
//! egress to the API server and no RBAC of their own (docs/gateway.md, "Service identity").
//!
//! Read once, then again every [`REFRESH`] (signing keys change only when the API server is
//! restarted with other keys); after a failed read the last keys stay in use and the next
//! reconcile that needs them tries again after [`RETRY`].

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
type CacheState = (Option<IdentityKeys>, Option<(Instant, bool)>);

impl KeysCache {
    /// The keys, read again when the last read is older than [`REFRESH`] (or failed more than
    /// [`RETRY`] ago). `None` until a read succeeded.
    pub async fn get(&self, client: &Client) -> Option<IdentityKeys> {
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
                    *state = (Some(keys), Some((Instant::now(), true)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the service account token issuer and keys from the API server; the stacks' identity ConfigMaps keep what they have");
                    state.1 = Some((Instant::now(), false));
                }
            }
        }
        state.0.clone()
    }
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
