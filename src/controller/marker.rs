//! The namespace admission marker: the label that tells the admission guardrails which
//! namespaces hold stacks, and in which policy mode.

use k8s_openapi::api::core::v1::Namespace;
use kube::{Api, ResourceExt};

use super::{Context, Error};

/// Field manager of the namespace marker label, apart from the operator's main one so that
/// applying it never touches anything else on the Namespace.
pub const MARKER_MANAGER: &str = "opsconductor-operator-namespace-marker";

/// Sets the admission marker label of `namespace` from the policy modes of its stacks, or
/// removes it when no stack is left. Writes only when the label must change.
pub async fn sync_namespace_marker(
    ctx: &Context,
    namespace: &str,
    modes: Vec<crate::crd::PolicyMode>,
) -> Result<(), Error> {
    let wanted = crate::admission::marker_value(modes);
    if current_marker(ctx, namespace).as_deref() == wanted {
        return Ok(());
    }
    write_namespace_marker(ctx, namespace, wanted).await
}

/// The marker of `namespace` as last known: the namespace cache's, unless a write of ours is
/// newer than what the cache holds yet (a lagging cache must not hide our own write, or the
/// label set a moment ago looks absent and is never removed).
pub(super) fn current_marker(ctx: &Context, namespace: &str) -> Option<String> {
    let cached = ctx.stores.audit.namespaces.get(None, namespace);
    // The marker is an `opsconductor.io/` label: readable without decoding.
    let from_cache = cached.as_ref().and_then(|ns| {
        ns.label(crate::admission::PROTECTED_LABEL)
            .map(str::to_string)
    });
    let cache_version = cached.as_ref().and_then(|ns| ns.resource_version());
    let mut written = ctx.markers_written.lock().unwrap();
    match written.get(namespace) {
        Some((label, version)) if newer(version, cache_version.as_deref()) => label.clone(),
        Some(_) => {
            written.remove(namespace);
            from_cache
        }
        None => from_cache,
    }
}

/// Whether resourceVersion `ours` is newer than the cache's `cached`. resourceVersions are
/// opaque to clients but numeric in every API server backed by etcd; one that does not parse
/// counts as caught up, so the cache decides.
fn newer(ours: &str, cached: Option<&str>) -> bool {
    match (ours.parse::<u64>(), cached.map(str::parse::<u64>)) {
        (Ok(ours), Some(Ok(cached))) => ours > cached,
        (Ok(_), None) => true,
        _ => false,
    }
}

/// Applies the marker label of `namespace` (`None` removes it), and remembers what the write
/// left until the namespace cache shows it.
pub(super) async fn write_namespace_marker(
    ctx: &Context,
    namespace: &str,
    wanted: Option<&str>,
) -> Result<(), Error> {
    use kube::api::{Patch, PatchParams};
    let labels = match wanted {
        Some(v) => serde_json::json!({ crate::admission::PROTECTED_LABEL: v }),
        None => serde_json::json!({}),
    };
    let patch = serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": { "name": namespace, "labels": labels },
    });
    let written = Api::<Namespace>::all(ctx.client.clone())
        .patch(
            namespace,
            &PatchParams::apply(MARKER_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|e| Error::Marker {
            namespace: namespace.to_string(),
            source: e.into(),
        })?;
    let label = written
        .labels()
        .get(crate::admission::PROTECTED_LABEL)
        .cloned();
    if let Some(version) = written.resource_version() {
        ctx.markers_written
            .lock()
            .unwrap()
            .insert(namespace.to_string(), (label.clone(), version));
    }
    if label.as_deref() != wanted {
        // E.g. the label is held by another field manager: our apply cannot remove it.
        return Err(Error::MarkerNotApplied {
            namespace: namespace.to_string(),
            found: label,
        });
    }
    tracing::info!(namespace, marker = ?wanted, "namespace admission marker updated");
    Ok(())
}
