//! The operator's own watch caches: [`Cache`].
//!
//! kube-runtime's `Store` keeps every object as an `Arc` of it under an `ObjectRef` key: the
//! key's name, namespace, resourceVersion and uid are strings of their own, and the object
//! carries an `ObjectMeta` (a third of a kilobyte even with most of its fields empty). Measured
//! at 200 stacks that bookkeeping was about 1.3 KB per object, against some 100 bytes of
//! compressed JSON ([`Compact`]): most of the operator's heap. A [`Cache`] keeps, per namespace
//! and name, a [`Kept`]: the compressed JSON and the few fields read on every event, nothing
//! twice.
//!
//! The cache also decides which watch events are worth a reconcile ([`CacheWriter::apply`]):
//! an object that appears or goes, or one whose cached content changed. A Pod's status, a
//! Deployment's conditions or a managedFields-only update change nothing the operator reads
//! (the cache drops them), so they trigger nothing; without this every pod status update in a
//! stack namespace would reconcile the stack, and a namespace busy enough would keep pushing
//! the debounced reconcile back. A re-list (after a watch expired) triggers only what changed
//! meanwhile, and what vanished.
//!
//! Readers look up one object by namespace and name, or all of one namespace; every reconcile
//! reads only its own namespace's objects, so a lookup costs the same however many other
//! namespaces the cache holds.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use kube::runtime::watcher;

use super::compact::{Compact, Kept};

/// Objects by namespace ("" for cluster-scoped kinds), then by name.
type Objects<K> = HashMap<Box<str>, Names<K>>;

/// The objects of one namespace, sorted by name: a vector, since a map's nodes or buckets take
/// about as much again as the objects in a namespace of a few dozen (a B-tree leaf has room
/// for eleven).
struct Names<K>(Vec<Named<K>>);

/// An object of a namespace under its name.
type Named<K> = (Box<str>, Kept<K>);

impl<K> Default for Names<K> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<K> Names<K> {
    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| (**n).cmp(name))
    }
    fn get(&self, name: &str) -> Option<&Kept<K>> {
        self.find(name).ok().map(|i| &self.0[i].1)
    }
    fn contains(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }
    fn insert(&mut self, name: String, kept: Kept<K>) {
        match self.find(&name) {
            Ok(i) => self.0[i].1 = kept,
            Err(i) => {
                // Room for an eighth more, not twice as much.
                if self.0.len() == self.0.capacity() {
                    self.0.reserve_exact(self.0.len() / 8 + 1);
                }
                self.0.insert(i, (name.into(), kept));
            }
        }
    }
    fn remove(&mut self, name: &str) {
        if let Ok(i) = self.find(name) {
            self.0.remove(i);
        }
    }
    fn iter(&self) -> impl Iterator<Item = (&str, &Kept<K>)> {
        self.0.iter().map(|(n, k)| (&**n, k))
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// A list's objects in the order they came: sorted, the last of a name kept (a list that
    /// started over after an error repeats names), without spare room.
    fn from_list(mut listed: Vec<Named<K>>) -> Self {
        // In place: stable, so of equal names the later stays later; reversed, the later
        // comes first and is the one `dedup_by` keeps.
        listed.sort_by(|a, b| a.0.cmp(&b.0));
        listed.reverse();
        listed.dedup_by(|later_in_vec, kept| later_in_vec.0 == kept.0);
        listed.reverse();
        listed.shrink_to_fit();
        Self(listed)
    }
}

/// A watch cache of one kind, to read (cheap to clone; every clone reads the same cache).
pub struct Cache<K> {
    objects: Arc<RwLock<Objects<K>>>,
    /// True once the first list is in; closed when the writer is gone.
    ready: tokio::sync::watch::Receiver<bool>,
}

impl<K> Clone for Cache<K> {
    fn clone(&self) -> Self {
        Self {
            objects: self.objects.clone(),
            ready: self.ready.clone(),
        }
    }
}

/// The one writer of a [`Cache`], fed by the kind's watch stream.
pub struct CacheWriter<K> {
    objects: Arc<RwLock<Objects<K>>>,
    ready: tokio::sync::watch::Sender<bool>,
    /// A list in progress, by namespace in the order it came: it replaces the content at its
    /// end (readers see the previous content until then, as with kube-runtime's reflector).
    listing: Option<HashMap<Box<str>, Vec<Named<K>>>>,
}

/// The writer of a cache went away before the cache had its first list.
#[derive(Debug)]
pub struct WriterDropped;

/// A new, empty cache and its writer.
pub fn cache<K>() -> (Cache<K>, CacheWriter<K>) {
    let objects = Arc::new(RwLock::new(Objects::new()));
    let (ready_tx, ready) = tokio::sync::watch::channel(false);
    (
        Cache {
            objects: objects.clone(),
            ready,
        },
        CacheWriter {
            objects,
            ready: ready_tx,
            listing: None,
        },
    )
}

impl<K> Cache<K> {
    // A poisoned lock still holds a whole map: nothing panics while it is held.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Objects<K>> {
        self.objects.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The object `name` of `namespace` (None for a cluster-scoped kind).
    pub fn get(&self, namespace: Option<&str>, name: &str) -> Option<Compact<K>> {
        let objects = self.read();
        let kept = objects.get(namespace.unwrap_or(""))?.get(name)?;
        Some(kept.to_compact(namespace, name))
    }

    /// Every object of `namespace` (None: of a cluster-scoped kind), by name.
    pub fn in_namespace(&self, namespace: Option<&str>) -> Vec<Compact<K>> {
        let objects = self.read();
        objects
            .get(namespace.unwrap_or(""))
            .into_iter()
            .flat_map(Names::iter)
            .map(|(name, kept)| kept.to_compact(namespace, name))
            .collect()
    }

    /// The names of the objects of `namespace` (None: of a cluster-scoped kind).
    pub fn names_in(&self, namespace: Option<&str>) -> Vec<String> {
        let objects = self.read();
        objects
            .get(namespace.unwrap_or(""))
            .into_iter()
            .flat_map(|names| names.iter().map(|(n, _)| n.to_string()))
            .collect()
    }

    /// Objects held, and their JSON's bytes before and after compression.
    pub fn sizes(&self) -> (usize, usize, usize) {
        let objects = self.read();
        let mut sizes = (0, 0, 0);
        for (_, kept) in objects.values().flat_map(Names::iter) {
            sizes.0 += 1;
            sizes.1 += kept.json_len();
            sizes.2 += kept.packed_len();
        }
        sizes
    }

    /// Waits for the first list. Several tasks may wait at once (a `watch` channel wakes every
    /// one of them).
    pub async fn wait_until_ready(&self) -> Result<(), WriterDropped> {
        let mut ready = self.ready.clone();
        ready
            .wait_for(|r| *r)
            .await
            .map(|_| ())
            .map_err(|_| WriterDropped)
    }
}

impl<K> CacheWriter<K> {
    /// Takes one watch event into the cache and returns what should trigger a reconcile: an
    /// object that appeared, changed what the cache keeps ([`Compact::content_hash`]) or went
    /// away. The triggers of a list come at its end, once the cache holds the listed content.
    pub fn apply(&mut self, event: watcher::Event<Compact<K>>) -> Vec<Compact<K>> {
        use watcher::Event::*;
        match event {
            Init => {
                self.listing = Some(HashMap::new());
                Vec::new()
            }
            InitApply(object) => {
                let (namespace, name, kept) = object.into_kept();
                self.listing
                    .get_or_insert_with(HashMap::new)
                    .entry(namespace.unwrap_or_default().into())
                    .or_default()
                    .push((name.into(), kept));
                Vec::new()
            }
            InitDone => {
                let listed: Objects<K> = self
                    .listing
                    .take()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(ns, names)| (ns, Names::from_list(names)))
                    .collect();
                let mut objects = self.objects.write().unwrap_or_else(|e| e.into_inner());
                let previous = std::mem::replace(&mut *objects, listed);
                let triggers = list_triggers(&previous, &objects);
                drop(objects);
                drop(previous);
                self.ready.send_replace(true);
                triggers
            }
            Apply(object) => {
                let hash = object.content_hash();
                let (namespace, name) = object.key();
                let changed = {
                    let objects = self.objects.read().unwrap_or_else(|e| e.into_inner());
                    objects
                        .get(namespace)
                        .and_then(|names| names.get(name))
                        .is_none_or(|kept| kept.content_hash() != hash)
                };
                let trigger = changed.then(|| object.clone());
                let (namespace, name, kept) = object.into_kept();
                let mut objects = self.objects.write().unwrap_or_else(|e| e.into_inner());
                objects
                    .entry(namespace.unwrap_or_default().into())
                    .or_default()
                    .insert(name, kept);
                trigger.into_iter().collect()
            }
            Delete(object) => {
                let (namespace, name) = object.key();
                let mut objects = self.objects.write().unwrap_or_else(|e| e.into_inner());
                if let Some(names) = objects.get_mut(namespace) {
                    names.remove(name);
                    if names.is_empty() {
                        objects.remove(namespace);
                    }
                }
                vec![object]
            }
        }
    }
}

/// What a list that replaced `before` with `after` should trigger: the objects new or changed
/// in it, and the objects of `before` it no longer has.
fn list_triggers<K>(before: &Objects<K>, after: &Objects<K>) -> Vec<Compact<K>> {
    let namespace = |ns: &str| (!ns.is_empty()).then(|| ns.to_string());
    let mut triggers = Vec::new();
    for (ns, names) in after {
        let old = before.get(ns);
        for (name, kept) in names.iter() {
            let same = old
                .and_then(|o| o.get(name))
                .is_some_and(|o| o.content_hash() == kept.content_hash());
            if !same {
                triggers.push(kept.to_compact(namespace(ns).as_deref(), name));
            }
        }
    }
    for (ns, names) in before {
        let new = after.get(ns);
        for (name, kept) in names.iter() {
            if !new.is_some_and(|n| n.contains(name)) {
                triggers.push(kept.to_compact(namespace(ns).as_deref(), name));
            }
        }
    }
    triggers
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    use kube::{Resource, ResourceExt};

    use super::*;

    fn pod(ns: &str, name: &str, rv: &str, phase: &str, host_network: bool) -> Compact<Pod> {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "resourceVersion": rv},
            "spec": {"hostNetwork": host_network, "containers": [{"name": "c"}]},
            "status": {"phase": phase}
        }))
        .unwrap()
    }

    fn names(triggers: &[Compact<Pod>]) -> Vec<String> {
        let mut n: Vec<String> = triggers.iter().map(|t| t.name_any()).collect();
        n.sort();
        n
    }

    #[test]
    fn only_appearing_changed_or_deleted_objects_trigger_a_reconcile() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let (cache, mut writer) = cache::<Pod>();
        let steps = [
            (Init, 0),
            (InitApply(pod("shop", "p", "1", "Pending", false)), 0),
            // The list's triggers come once the cache holds it.
            (InitDone, 1),
            // A status update: nothing the cache keeps changed.
            (Apply(pod("shop", "p", "2", "Running", false)), 0),
            (Apply(pod("shop", "p", "3", "Running", true)), 1),
            (Delete(pod("shop", "p", "4", "Running", true)), 1),
            // Back after a deletion: new again.
            (Apply(pod("shop", "p", "5", "Running", true)), 1),
        ];
        for (i, (event, fires)) in steps.into_iter().enumerate() {
            assert_eq!(writer.apply(event).len(), fires, "step {i}");
        }
        let p = cache.get(Some("shop"), "p").expect("cached");
        assert_eq!(p.resource_version().as_deref(), Some("5"));
        assert_eq!(p.decode().spec.unwrap().host_network, Some(true));
    }

    /// A re-list (a watch that expired) replaces the content at its end: readers see the old
    /// content until then, and only what changed or vanished meanwhile triggers.
    #[test]
    fn a_relist_triggers_what_changed_and_what_vanished() {
        use watcher::Event::{Init, InitApply, InitDone};
        let (cache, mut writer) = cache::<Pod>();
        writer.apply(Init);
        for name in ["a", "b", "c"] {
            writer.apply(InitApply(pod("shop", name, "1", "Pending", false)));
        }
        assert_eq!(names(&writer.apply(InitDone)), ["a", "b", "c"]);
        writer.apply(Init);
        writer.apply(InitApply(pod("shop", "a", "7", "Running", false)));
        // A list that started over after an error repeats names: the later one counts.
        writer.apply(InitApply(pod("shop", "b", "6", "Running", false)));
        writer.apply(InitApply(pod("shop", "b", "8", "Running", true)));
        writer.apply(InitApply(pod("other", "d", "9", "Running", false)));
        assert_eq!(cache.names_in(Some("shop")), ["a", "b", "c"], "not yet");
        assert!(cache.in_namespace(Some("other")).is_empty(), "not yet");
        // b changed, c vanished, d is new; a only changed its status.
        assert_eq!(names(&writer.apply(InitDone)), ["b", "c", "d"]);
        assert_eq!(cache.names_in(Some("shop")), ["a", "b"]);
        let b = cache.get(Some("shop"), "b").unwrap();
        assert_eq!(b.resource_version().as_deref(), Some("8"));
        assert_eq!(cache.names_in(Some("other")), ["d"]);
        assert_eq!(cache.sizes().0, 3);
    }

    #[test]
    fn waiters_go_on_at_the_first_list_and_fail_when_the_writer_is_gone() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let (cache, mut writer) = cache::<Namespace>();
            let waiter = tokio::spawn({
                let cache = cache.clone();
                async move { cache.wait_until_ready().await }
            });
            tokio::task::yield_now().await;
            assert!(!waiter.is_finished());
            writer.apply(watcher::Event::Init);
            writer.apply(watcher::Event::InitDone);
            assert!(waiter.await.unwrap().is_ok());
            let (cache, writer) = super::cache::<Namespace>();
            drop(writer);
            assert!(cache.wait_until_ready().await.is_err());
        });
    }

    /// What a cached object keeps reads back the same: identity, owners to stacks, own labels,
    /// deletion, and the whole object.
    #[test]
    fn an_object_reads_back_from_the_cache_as_it_came() {
        let json = serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {
                "name": "orders", "namespace": "shop", "uid": "u1", "resourceVersion": "0042",
                "generation": 3, "deletionTimestamp": "2026-12-01T10:00:00Z",
                "labels": {"opsconductor.io/stack": "shop", "opsconductor.io/empty": "",
                           "app": "orders"},
                "ownerReferences": [
                    {"apiVersion": "opsconductor.io/v1alpha1", "kind": "OpsConductorStack",
                     "name": "shop", "uid": "s1", "controller": true},
                    {"apiVersion": "opsconductor.io/v1alpha1", "kind": "OpsConductorStack",
                     "name": "other", "uid": "s2", "blockOwnerDeletion": false},
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "c1"}]
            },
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "orders"}},
                     "template": {"metadata": {"labels": {"app": "orders"}},
                                  "spec": {"containers": [{"name": "app", "image": "x"}]}}}
        });
        let incoming: Compact<Deployment> = serde_json::from_value(json).unwrap();
        let (cache, mut writer) = cache::<Deployment>();
        writer.apply(watcher::Event::Apply(incoming.clone()));
        let out = cache.get(Some("shop"), "orders").unwrap();
        assert_eq!(out.meta(), incoming.meta());
        assert_eq!(out.resource_version().as_deref(), Some("0042"));
        assert_eq!(out.owner_references().len(), 2, "only references to stacks");
        assert_eq!(out.label("opsconductor.io/stack"), Some("shop"));
        assert_eq!(out.label("opsconductor.io/empty"), Some(""));
        assert_eq!(out.decode(), incoming.decode());
        assert!(out.decode().labels().contains_key("app"));
        assert!(cache.get(Some("other"), "orders").is_none());
    }
}
