//! Writes: server-side apply of the desired bundle, skipping what already holds, and pruning
//! of what is no longer desired. The only module of the controller that changes children.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::Mutex;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::cache::Cache;
use super::compact::Slim;
use super::{Context, Request};
use crate::build::Bundle;
use crate::crd::PolicyMode;
use crate::names;
use crate::ownership::{self, Claim, NameConflict};

/// Why an object was (or would have been) written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cause {
    /// It did not exist yet.
    Created,
    /// The stack's spec (or the operator's idea of it) changed.
    Updated,
    /// Someone else changed or deleted it after the stack had converged.
    Drift,
    /// Someone else's object, handed over with the `opsconductor.io/adopt` annotation.
    Adopted,
}

/// What one apply pass did.
#[derive(Debug, Default)]
pub struct Report {
    /// (cause, kind, name) of every write.
    pub written: Vec<(Cause, &'static str, String)>,
    /// (kind, name, what) of drift seen in Audit mode and left alone.
    pub drift_reported: Vec<(&'static str, String)>,
    /// (kind, name) of deleted objects.
    pub pruned: Vec<(&'static str, String)>,
    /// Objects the stack wants that exist and are someone else's: never written.
    pub conflicts: Vec<NameConflict>,
    /// (Deployment, the conflicting object it would depend on) of workloads held back.
    pub held: Vec<(String, String)>,
}

/// What the last apply of each object produced, so a lagging watch cache is not mistaken for
/// drift and a field that never settles cannot cause a write loop.
///
/// One entry per managed object, so kept small: per namespace, the object's kind and name as a
/// 64-bit hash (keyed per process), and of the last apply a hash of the resourceVersion it
/// returned and 128 bits of the SHA-256 of what was applied; 32 bytes instead of the strings
/// (about 250 bytes). A collision of two names' hashes in one namespace could only make one
/// object's change be reported as an update rather than drift: whether an object is written
/// at all is decided by the desired object's own hash, which names the object.
#[derive(Default)]
pub struct AppliedLog {
    entries: Mutex<HashMap<Box<str>, HashMap<u64, Applied>>>,
    keys: std::hash::RandomState,
}

/// The last apply of one object (see [`AppliedLog`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Applied {
    resource_version: u64,
    desired: [u8; 16],
}

/// (kind, namespace, name) of a managed object.
type ObjectKey<'a> = (&'static str, &'a str, &'a str);

impl AppliedLog {
    fn slot(&self, (kind, _, name): &ObjectKey) -> u64 {
        use std::hash::BuildHasher;
        self.keys.hash_one((kind, name))
    }
    fn version(&self, resource_version: Option<&str>) -> u64 {
        use std::hash::BuildHasher;
        self.keys.hash_one(resource_version)
    }
    fn get(&self, key: &ObjectKey) -> Option<Applied> {
        let entries = self.entries.lock().unwrap();
        entries.get(key.1)?.get(&self.slot(key)).copied()
    }
    fn put(&self, key: &ObjectKey, resource_version: Option<&str>, desired: &[u8; 32]) {
        let applied = Applied {
            resource_version: self.version(resource_version),
            desired: desired[..16].try_into().expect("16 of 32 bytes"),
        };
        let slot = self.slot(key);
        let mut entries = self.entries.lock().unwrap();
        match entries.get_mut(key.1) {
            Some(objects) => {
                objects.insert(slot, applied);
            }
            None => {
                entries.insert(key.1.into(), HashMap::from([(slot, applied)]));
            }
        }
    }
    fn forget(&self, key: &ObjectKey) {
        let slot = self.slot(key);
        let mut entries = self.entries.lock().unwrap();
        if let Some(objects) = entries.get_mut(key.1) {
            objects.remove(&slot);
            if objects.is_empty() {
                entries.remove(key.1);
            }
        }
    }
    /// Whether the last apply of `key` was of `desired`.
    fn applied_exactly(last: Option<Applied>, desired: &[u8; 32]) -> bool {
        last.is_some_and(|a| a.desired[..] == desired[..16])
    }
    /// Keeps only the entries of objects in `namespaces` (those that still hold a stack).
    pub fn retain_namespaces(&self, namespaces: &std::collections::BTreeSet<&str>) {
        self.entries
            .lock()
            .unwrap()
            .retain(|namespace, _| namespaces.contains(&**namespace));
    }
}

/// Everything an apply pass needs to know about the stack.
pub struct Target<'a> {
    pub namespace: &'a str,
    pub stack_name: &'a str,
    pub stack_uid: &'a str,
    pub mode: PolicyMode,
    /// The stack's current generation was already fully applied once: a difference now is
    /// drift, not a spec change.
    pub converged: bool,
}

/// Applies the bundle in its apply order, then prunes what is no longer desired.
///
/// `conflicts` are those already found outside the bundle (the certificate Secrets). An object
/// found to be someone else's is not written (see [`ownership`]); a Deployment whose pods
/// would run with someone else's ServiceAccount, ConfigMap or Secret is held back, and so is
/// every Deployment while any of the stack's NetworkPolicies is someone else's (no pod of the
/// stack runs without its whole policy).
pub async fn apply_bundle(
    ctx: &Context,
    target: &Target<'_>,
    bundle: &Bundle,
    conflicts: Vec<NameConflict>,
) -> Result<Report, Request> {
    let mut report = Report {
        conflicts,
        ..Report::default()
    };
    // Destructured so that a new kind in the bundle cannot be forgotten here. The order is
    // the bundle's: identities and configuration, NetworkPolicies before any pod can start,
    // then workloads, Services and disruption budgets.
    let Bundle {
        service_accounts,
        config_maps,
        network_policies,
        deployments,
        services,
        pod_disruption_budgets,
    } = bundle;
    let s = &ctx.stores;
    apply_kind(
        ctx,
        target,
        &s.service_accounts,
        service_accounts,
        false,
        &mut report,
    )
    .await?;
    apply_kind(ctx, target, &s.config_maps, config_maps, false, &mut report).await?;
    apply_kind(
        ctx,
        target,
        &s.audit.network_policies,
        network_policies,
        true,
        &mut report,
    )
    .await?;
    let mut runnable = Vec::new();
    for d in deployments {
        match held_by(d, &report.conflicts) {
            Some(on) => report.held.push((d.name_any(), on)),
            None => runnable.push(d.clone()),
        }
    }
    apply_kind(ctx, target, &s.deployments, &runnable, false, &mut report).await?;
    apply_kind(ctx, target, &s.audit.services, services, false, &mut report).await?;
    apply_kind(
        ctx,
        target,
        &s.pod_disruption_budgets,
        pod_disruption_budgets,
        false,
        &mut report,
    )
    .await?;

    // Prune in reverse order: exposure goes first, identities last.
    prune_kind(
        ctx,
        target,
        &s.pod_disruption_budgets,
        pod_disruption_budgets,
        &mut report,
    )
    .await?;
    prune_kind(ctx, target, &s.audit.services, services, &mut report).await?;
    prune_kind(ctx, target, &s.deployments, deployments, &mut report).await?;
    prune_kind(
        ctx,
        target,
        &s.audit.network_policies,
        network_policies,
        &mut report,
    )
    .await?;
    prune_kind(ctx, target, &s.config_maps, config_maps, &mut report).await?;
    prune_kind(
        ctx,
        target,
        &s.service_accounts,
        service_accounts,
        &mut report,
    )
    .await?;
    Ok(report)
}

/// A kind of child object the operator applies and prunes.
trait Child:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Slim
    + Clone
    + Serialize
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
    /// The kind, as reports, Events and metric labels name it.
    const KIND: &'static str;
}

macro_rules! children {
    ($($kind:ident),*) => {$(
        impl Child for $kind {
            const KIND: &'static str = stringify!($kind);
        }
    )*};
}
children!(
    ServiceAccount,
    ConfigMap,
    NetworkPolicy,
    Deployment,
    Service,
    PodDisruptionBudget
);

/// The conflicting object that `deployment`'s pods would depend on, as `Kind/name`: its
/// ServiceAccount, a mounted ConfigMap or Secret (also as a source of a projected volume), or
/// any NetworkPolicy of the stack.
fn held_by(deployment: &Deployment, conflicts: &[NameConflict]) -> Option<String> {
    let spec = deployment.spec.as_ref()?.template.spec.as_ref()?;
    let mut uses: Vec<(&str, &str)> = Vec::new();
    if let Some(sa) = spec.service_account_name.as_deref() {
        uses.push(("ServiceAccount", sa));
    }
    for v in spec.volumes.iter().flatten() {
        if let Some(cm) = &v.config_map {
            uses.push(("ConfigMap", cm.name.as_str()));
        }
        if let Some(secret) = v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) {
            uses.push(("Secret", secret));
        }
        // A projected volume's sources too: the services' identity volume holds the identity
        // ConfigMap (the keys they trust), beside the token.
        let sources = v.projected.iter().flat_map(|p| p.sources.iter().flatten());
        for source in sources {
            if let Some(cm) = &source.config_map {
                uses.push(("ConfigMap", cm.name.as_str()));
            }
            if let Some(secret) = &source.secret {
                uses.push(("Secret", secret.name.as_str()));
            }
        }
    }
    conflicts
        .iter()
        .find(|c| c.kind == "NetworkPolicy" || uses.contains(&(c.kind, c.name.as_str())))
        .map(NameConflict::object)
}

fn holds(exact: bool, actual: &serde_json::Value, desired: &serde_json::Value) -> bool {
    if exact {
        super::diff::holds_exactly(actual, desired)
    } else {
        super::diff::holds(actual, desired)
    }
}

async fn apply_kind<K: Child>(
    ctx: &Context,
    target: &Target<'_>,
    store: &Cache<K>,
    desired: &[K],
    exact: bool,
    report: &mut Report,
) -> Result<(), Request> {
    let kind = K::KIND;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), target.namespace);
    // The names of this kind in the namespace, listed (metadata only) once per pass the first
    // time an object is missing from the cache: a new stack's objects then cost one list per
    // kind instead of a read per object before it is created.
    let mut listed: Option<BTreeSet<String>> = None;
    for object in desired {
        let name = object.name_any();
        let key = (kind, target.namespace, name.as_str());
        let desired_json = serde_json::to_value(object)?;
        let hash: [u8; 32] = Sha256::digest(desired_json.to_string().as_bytes()).into();
        let last = ctx.applied.get(&key);
        let cached = store.get(Some(target.namespace), &name);
        let uid = (!target.stack_uid.is_empty()).then_some(target.stack_uid);
        let claim_of =
            |meta: &kube::api::ObjectMeta| ownership::claim(meta, target.stack_name, uid);
        // Whose is it? The managed caches hold only objects with the operator's labels, so
        // an object missing from the cache may still exist under that name: a list of the
        // names (never a write) settles it before anything is created, and a read of the
        // object when the name is taken.
        let mut exists = cached.is_some();
        let mut read: Option<K> = None;
        if cached.is_none() && listed.is_none() {
            let names = api.list_metadata(&ListParams::default()).await?;
            listed = Some(names.items.iter().map(|o| o.name_any()).collect());
        }
        let taken = || listed.as_ref().is_some_and(|names| names.contains(&name));
        let claim = match &cached {
            Some(c) if claim_of(c.meta()) == Claim::Ours => Claim::Ours,
            // The cache keeps only owner references to stacks and no annotations.
            Some(c) => claim_of(c.decode().meta()),
            None if !taken() => Claim::Ours,
            None => match api.get_opt(&name).await? {
                Some(fresh) => {
                    exists = true;
                    let claim = claim_of(fresh.meta());
                    read = Some(fresh);
                    claim
                }
                None => Claim::Ours,
            },
        };
        if let Claim::Foreign(why) = claim {
            report.conflicts.push(NameConflict { kind, name, why });
            continue;
        }
        let adopting = claim == Claim::Adopt;
        let actual = match (&cached, &read) {
            (Some(c), _) => Some(c.value()),
            (None, Some(r)) => Some(serde_json::to_value(r)?),
            (None, None) => None,
        };
        let cached_holds = !adopting
            && actual
                .as_ref()
                .is_some_and(|a| holds(exact, a, &desired_json));
        if ctx.options.compare_before_apply && !adopting {
            if cached_holds {
                continue;
            }
            // We applied exactly this before: the cache may simply not have seen our write
            // yet. A read (never a write) settles it.
            if AppliedLog::applied_exactly(last, &hash) {
                let fresh = match read.take() {
                    Some(r) => Some(r),
                    None => api.get_opt(&name).await?,
                };
                exists = fresh.is_some();
                if let Some(fresh) = &fresh {
                    if let Claim::Foreign(why) = claim_of(fresh.meta()) {
                        report.conflicts.push(NameConflict { kind, name, why });
                        continue;
                    }
                    if holds(exact, &serde_json::to_value(fresh)?, &desired_json) {
                        continue;
                    }
                    // Our own last write, unchanged since: a field that never reads back as
                    // sent. Writing again would loop; leave it.
                    let fresh_version = ctx
                        .applied
                        .version(fresh.meta().resource_version.as_deref());
                    if last.is_some_and(|a| a.resource_version == fresh_version) {
                        continue;
                    }
                }
            }
        }

        // Only with compare-before-apply switched off: an object already as desired is
        // written anyway, and that is neither drift nor an update to report.
        let unchanged = cached_holds;
        let cause = match (exists, target.converged) {
            _ if adopting => Cause::Adopted,
            (false, false) => Cause::Created,
            (true, false) => Cause::Updated,
            (_, true) if last.is_some() && !AppliedLog::applied_exactly(last, &hash) => {
                Cause::Updated
            }
            (_, true) => Cause::Drift,
        };
        if cause == Cause::Drift && target.mode == PolicyMode::Audit && !unchanged {
            report.drift_reported.push((kind, name));
            continue;
        }
        let mut applied = match api
            .patch(
                &name,
                &PatchParams::apply(names::MANAGER).force(),
                &Patch::Apply(object),
            )
            .await
        {
            Ok(applied) => applied,
            // Another manager co-owns part of something the stack no longer wants (it once
            // forced a value into a container that the spec has since dropped): the apply
            // removes only our fields and leaves an invalid remainder (a container without
            // an image), so every apply fails. In Enforce mode the object is ours to set as
            // a whole: replace it. (Anything else invalid fails the replace alike.)
            Err(kube::Error::Api(e))
                if e.code == 422 && exists && target.mode == PolicyMode::Enforce =>
            {
                let mut replacement = object.clone();
                replacement.meta_mut().resource_version = api.get(&name).await?.resource_version();
                api.replace(
                    &name,
                    &PostParams {
                        field_manager: Some(names::MANAGER.into()),
                        ..PostParams::default()
                    },
                    &replacement,
                )
                .await?
            }
            Err(e) => return Err(e.into()),
        };
        if (exact || cause == Cause::Drift || target.mode == PolicyMode::Enforce)
            && !holds(exact, &serde_json::to_value(&applied)?, &desired_json)
        {
            // Someone else owns additions that must not be there (an extra label in a
            // NetworkPolicy's podSelector, a sidecar or an extra Service port, see
            // `diff`): apply cannot remove fields of other managers, a replace does.
            // Also on an update in Enforce mode: a field the stack no longer wants (a
            // container dropped from the spec) stays after the apply when another manager
            // co-owns it (e.g. once forced a value into it), and the next reconcile would
            // take it for our own write that never reads back as sent, and leave it.
            let mut replacement = object.clone();
            replacement.meta_mut().resource_version = applied.resource_version();
            applied = api
                .replace(
                    &name,
                    &PostParams {
                        field_manager: Some(names::MANAGER.into()),
                        ..PostParams::default()
                    },
                    &replacement,
                )
                .await?;
        }
        ctx.applied
            .put(&key, applied.meta().resource_version.as_deref(), &hash);
        let cause_label = match cause {
            _ if unchanged => "unchanged",
            Cause::Created => "created",
            Cause::Updated => "updated",
            Cause::Drift => "drift",
            Cause::Adopted => "adopted",
        };
        ctx.metrics.applied(kind, cause_label);
        if !unchanged {
            report.written.push((cause, kind, name));
        }
    }
    Ok(())
}

async fn prune_kind<K: Child>(
    ctx: &Context,
    target: &Target<'_>,
    store: &Cache<K>,
    desired: &[K],
    report: &mut Report,
) -> Result<(), Request> {
    let kind = K::KIND;
    let wanted: BTreeSet<String> = desired.iter().map(ResourceExt::name_any).collect();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), target.namespace);
    for object in store.in_namespace(Some(target.namespace)) {
        let ours = object.label(names::STACK_LABEL) == Some(target.stack_name)
            // Labels can be copied; only an owner reference to this very stack makes it ours.
            && object.owner_references().iter().any(|o| o.controller == Some(true) && o.uid == target.stack_uid);
        let name = object.name_any();
        if !ours || wanted.contains(&name) || object.meta().deletion_timestamp.is_some() {
            continue;
        }
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        ctx.applied.forget(&(kind, target.namespace, name.as_str()));
        ctx.metrics.pruned(kind);
        report.pruned.push((kind, name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_applied_log_tells_objects_apart_by_kind_namespace_and_name() {
        let log = AppliedLog::default();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        log.put(&("Service", "shop", "web"), Some("10"), &a);
        log.put(&("Deployment", "shop", "web"), Some("11"), &b);
        log.put(&("Service", "other", "web"), Some("12"), &b);
        let last = log.get(&("Service", "shop", "web"));
        assert!(AppliedLog::applied_exactly(last, &a));
        assert!(!AppliedLog::applied_exactly(last, &b));
        assert_eq!(last.unwrap().resource_version, log.version(Some("10")));
        assert_ne!(last.unwrap().resource_version, log.version(Some("11")));
        assert!(AppliedLog::applied_exactly(
            log.get(&("Deployment", "shop", "web")),
            &b
        ));
        assert!(log.get(&("ConfigMap", "shop", "web")).is_none());
        log.forget(&("Service", "shop", "web"));
        assert!(log.get(&("Service", "shop", "web")).is_none());
        assert!(log.get(&("Deployment", "shop", "web")).is_some());
        log.retain_namespaces(&["other"].into());
        assert!(log.get(&("Deployment", "shop", "web")).is_none());
        assert!(log.get(&("Service", "other", "web")).is_some());
    }

    fn service_deployment(identity: bool) -> Deployment {
        let extra = if identity {
            "  serviceIdentity: {enabled: true}\n"
        } else {
            ""
        };
        let yaml = format!(
            "apiVersion: opsconductor.io/v1alpha1\nkind: OpsConductorStack\n\
             metadata: {{name: shop, namespace: ns}}\nspec:\n  gateway: {{hosts: [a.example.com]}}\n\
             \x20 tls: {{secretName: cert}}\n  services: [{{name: web, image: x, route: /}}]\n{extra}"
        );
        let raw: crate::crd::OpsConductorStack = serde_yaml::from_str(&yaml).unwrap();
        let stack = crate::validate::validate(&raw, "default").unwrap();
        crate::build::build(&stack, &crate::build::BuildOptions::default())
            .deployments
            .into_iter()
            .find(|d| d.metadata.name.as_deref() == Some("web"))
            .unwrap()
    }

    fn conflict(kind: &'static str, name: &str) -> NameConflict {
        NameConflict {
            kind,
            name: name.into(),
            why: "someone else's".into(),
        }
    }

    /// Someone else's ConfigMap under the identity ConfigMap's name would put their keys into
    /// the services' identity volume (a projected source): the services are held back.
    #[test]
    fn a_service_is_held_back_by_someone_elses_identity_config_map() {
        let foreign = [conflict("ConfigMap", "shop-identity")];
        assert_eq!(
            held_by(&service_deployment(true), &foreign).as_deref(),
            Some("ConfigMap/shop-identity")
        );
        assert_eq!(held_by(&service_deployment(false), &foreign), None);
        assert_eq!(
            held_by(
                &service_deployment(false),
                &[conflict("ServiceAccount", "web")]
            )
            .as_deref(),
            Some("ServiceAccount/web")
        );
    }
}
