//! Which namespaces the operator serves (`--watch-namespaces`), and watches that see only those.
//!
//! Cluster-wide (the default), every watch is one request over all namespaces. Scoped to a list,
//! every watch of a namespaced kind becomes one watch per listed namespace, and the Namespace
//! watch one per listed name (a `metadata.name` field selector, which RBAC authorizes against
//! `resourceNames`): no request of the operator then lists or watches anything outside its
//! namespaces, so a release's RBAC can be Roles in those namespaces (charts/, docs/operations.md).
//!
//! The per-namespace watches of one kind feed one cache. A cache takes one stream of watcher
//! events, whose `Init` .. `InitDone` brackets replace its whole content, so [`Merge`] turns the
//! per-namespace streams into one such stream: one `Init`, the initial objects of every
//! namespace, one `InitDone` once every namespace has listed; later re-lists of one namespace
//! (after a watch expired) become `Apply` events plus a `Delete` for each object of that
//! namespace the new list no longer has.

use std::collections::{BTreeSet, HashMap, HashSet};

use futures::StreamExt;
use futures::stream::BoxStream;
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};

use super::WatchBackoff;

/// The namespaces the operator serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace, through cluster-wide watches.
    #[default]
    Cluster,
    /// Only these (at least one), each through watches of its own.
    Namespaces(BTreeSet<String>),
}

impl Scope {
    /// The scope of `--watch-namespaces`: empty means the whole cluster. Every entry must be a
    /// namespace name (a DNS-1123 label); blanks around commas are ignored.
    pub fn from_list<S: AsRef<str>>(list: &[S]) -> Result<Scope, String> {
        let mut set = BTreeSet::new();
        for entry in list {
            let name = entry.as_ref().trim();
            if name.is_empty() {
                continue;
            }
            check_namespace_name(name).map_err(|e| format!("--watch-namespaces: {name:?} {e}"))?;
            set.insert(name.to_string());
        }
        Ok(if set.is_empty() {
            Scope::Cluster
        } else {
            Scope::Namespaces(set)
        })
    }

    /// Whether objects of `namespace` are in scope.
    pub fn contains(&self, namespace: &str) -> bool {
        match self {
            Scope::Cluster => true,
            Scope::Namespaces(set) => set.contains(namespace),
        }
    }

    /// For logs: `*` or the list.
    pub fn describe(&self) -> String {
        match self {
            Scope::Cluster => "*".into(),
            Scope::Namespaces(set) => set.iter().cloned().collect::<Vec<_>>().join(","),
        }
    }

    /// A watch of a namespaced kind over the scope. `api(None)` is the cluster-wide Api,
    /// `api(Some(ns))` the Api of namespace `ns`. `store` is the cache the stream will feed
    /// (the merge reads it to find what a re-list no longer has).
    pub fn watch<K: Watched>(
        &self,
        api: impl Fn(Option<&str>) -> Api<K>,
        config: watcher::Config,
        store: Store<K>,
    ) -> BoxStream<'static, watcher::Result<watcher::Event<K>>> {
        match self {
            Scope::Cluster => one_watch(api(None), config).boxed(),
            Scope::Namespaces(set) => merged(
                set.iter()
                    .map(|ns| (ns.clone(), api(Some(ns)), config.clone()))
                    .collect(),
                Owner::Namespace,
                store,
            ),
        }
    }

    /// A watch of Namespace objects over the scope: all of them, or one watch per listed name.
    pub fn watch_namespaces<K: Watched>(
        &self,
        api: Api<K>,
        config: watcher::Config,
        store: Store<K>,
    ) -> BoxStream<'static, watcher::Result<watcher::Event<K>>> {
        match self {
            Scope::Cluster => one_watch(api, config).boxed(),
            Scope::Namespaces(set) => merged(
                set.iter()
                    .map(|ns| {
                        let config = config.clone().fields(&format!("metadata.name={ns}"));
                        (ns.clone(), api.clone(), config)
                    })
                    .collect(),
                Owner::Name,
                store,
            ),
        }
    }
}

/// A namespace name: a DNS-1123 label (lowercase letters, digits and `-`, starting and ending
/// with a letter or digit, at most 63 characters).
fn check_namespace_name(s: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if s.len() > 63 {
        return Err("is longer than 63 characters".into());
    }
    if !s.chars().all(ok_char) {
        return Err("may hold only lowercase letters, digits and '-' (a namespace name)".into());
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must start and end with a letter or digit (a namespace name)".into());
    }
    Ok(())
}

/// How an object is told to belong to one of the merged watches.
#[derive(Clone, Copy, Debug)]
enum Owner {
    /// Its namespace (watches of a namespaced kind, one per namespace).
    Namespace,
    /// Its name (watches of Namespaces, one per name).
    Name,
}

/// What a kind needs to be watched (and cached) over the scope.
pub trait Watched:
    Resource<DynamicType: Eq + std::hash::Hash + Clone>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
}

impl<K> Watched for K where
    K: Resource<DynamicType: Eq + std::hash::Hash + Clone>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static
{
}

/// One watch request stream, retried on [`WatchBackoff`] after an error.
fn one_watch<K: Watched>(
    api: Api<K>,
    config: watcher::Config,
) -> impl futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static {
    watcher(api, config).backoff(WatchBackoff::default())
}

/// One watch per `(tag, api, config)`, merged by [`Merge`].
fn merged<K: Watched>(
    watches: Vec<(String, Api<K>, watcher::Config)>,
    owner: Owner,
    store: Store<K>,
) -> BoxStream<'static, watcher::Result<watcher::Event<K>>> {
    let tags: Vec<String> = watches.iter().map(|(t, _, _)| t.clone()).collect();
    let streams = watches.into_iter().map(|(tag, api, config)| {
        one_watch(api, config)
            .map(move |event| (tag.clone(), event))
            .boxed()
    });
    let mut merge = Merge::new(tags);
    let first = futures::stream::iter([Ok(watcher::Event::Init)]);
    first
        .chain(
            futures::stream::select_all(streams)
                .flat_map(move |(tag, event)| futures::stream::iter(merge.step(&tag, event)))
                // A prune reads the cache when its turn comes, i.e. after every event before it
                // has gone through the cache (the stream is consumed one event at a time).
                .flat_map(move |out| futures::stream::iter(out.resolve(&store, owner))),
        )
        .boxed()
}

/// What [`Merge`] puts out: an event, or "delete what the cache holds of watch `tag` but
/// `seen`", resolved only when the events before it have reached the cache.
enum Out<K> {
    Event(watcher::Result<watcher::Event<K>>),
    Prune { tag: String, seen: HashSet<String> },
}

impl<K> Out<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    fn resolve(self, store: &Store<K>, owner: Owner) -> Vec<watcher::Result<watcher::Event<K>>> {
        match self {
            Out::Event(e) => vec![e],
            Out::Prune { tag, seen } => store
                .state()
                .into_iter()
                .filter(|o| owner.owns(&**o, &tag) && !seen.contains(&o.name_any()))
                .map(|o| Ok(watcher::Event::Delete((*o).clone())))
                .collect(),
        }
    }
}

impl Owner {
    fn owns<K: Resource>(self, obj: &K, tag: &str) -> bool {
        match self {
            Owner::Namespace => obj.meta().namespace.as_deref() == Some(tag),
            Owner::Name => obj.meta().name.as_deref() == Some(tag),
        }
    }
}

/// Turns the events of several watches (each tagged with its namespace) into the events of one
/// watch over all of them; see the module documentation. The stream starts with `Init`.
struct Merge<K> {
    /// Watches whose first list is not complete yet; `InitDone` goes out when none is left.
    pending: HashSet<String>,
    /// Events of watches that completed their first list while others had not: the cache is
    /// still collecting its first content, and applies them only after `InitDone`.
    held: Vec<(String, watcher::Result<watcher::Event<K>>)>,
    /// Watches re-listing after their first list: the names listed so far.
    relisting: HashMap<String, HashSet<String>>,
}

impl<K: ResourceExt> Merge<K> {
    fn new(tags: Vec<String>) -> Self {
        Merge {
            pending: tags.into_iter().collect(),
            held: Vec::new(),
            relisting: HashMap::new(),
        }
    }

    /// The merged output for one event of watch `tag`.
    fn step(&mut self, tag: &str, event: watcher::Result<watcher::Event<K>>) -> Vec<Out<K>> {
        use watcher::Event::*;
        if !self.pending.is_empty() {
            if !self.pending.contains(tag) {
                self.held.push((tag.to_string(), event));
                return Vec::new();
            }
            return match event {
                // A first list that started over after an error: what it had listed stays in
                // the cache's buffer and is overwritten by the new list (an object deleted in
                // between goes at this watch's next re-list).
                Ok(Init) => Vec::new(),
                Ok(InitApply(o)) => vec![Out::Event(Ok(InitApply(o)))],
                Ok(InitDone) => {
                    self.pending.remove(tag);
                    if !self.pending.is_empty() {
                        return Vec::new();
                    }
                    let mut out = vec![Out::Event(Ok(InitDone))];
                    for (tag, event) in std::mem::take(&mut self.held) {
                        out.extend(self.after_sync(&tag, event));
                    }
                    out
                }
                // Not sent before a watch's first InitDone; passed on as they are.
                other => vec![Out::Event(other)],
            };
        }
        self.after_sync(tag, event)
    }

    /// Once the cache holds its first content: everything as single changes.
    fn after_sync(&mut self, tag: &str, event: watcher::Result<watcher::Event<K>>) -> Vec<Out<K>> {
        use watcher::Event::*;
        match event {
            Ok(Init) => {
                self.relisting.insert(tag.to_string(), HashSet::new());
                Vec::new()
            }
            Ok(InitApply(o)) => {
                if let Some(seen) = self.relisting.get_mut(tag) {
                    seen.insert(o.name_any());
                }
                vec![Out::Event(Ok(Apply(o)))]
            }
            // The cache is what this watch listed plus what vanished meanwhile: prune that.
            Ok(InitDone) => vec![Out::Prune {
                tag: tag.to_string(),
                seen: self.relisting.remove(tag).unwrap_or_default(),
            }],
            other => vec![Out::Event(other)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::reflector;
    use watcher::Event::*;

    fn cm(ns: &str, name: &str, value: &str) -> ConfigMap {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns},
            "data": {"v": value}
        }))
        .unwrap()
    }

    fn names(store: &Store<ConfigMap>) -> Vec<String> {
        let mut v: Vec<String> = store
            .state()
            .iter()
            .map(|o| {
                format!(
                    "{}/{}={}",
                    o.namespace().unwrap(),
                    o.name_any(),
                    o.data.as_ref().unwrap()["v"]
                )
            })
            .collect();
        v.sort();
        v
    }

    /// Feeds `events` through a merge of watches `a` and `b` into a cache, as the operator does.
    struct Harness {
        merge: Merge<ConfigMap>,
        writer: reflector::store::Writer<ConfigMap>,
        store: Store<ConfigMap>,
    }

    impl Harness {
        fn new() -> Self {
            let writer = reflector::store::Writer::<ConfigMap>::default();
            let store = writer.as_reader();
            let mut h = Harness {
                merge: Merge::new(vec!["a".into(), "b".into()]),
                writer,
                store,
            };
            h.writer.apply_watcher_event(&Init);
            h
        }
        fn send(&mut self, tag: &str, event: watcher::Event<ConfigMap>) {
            // One at a time, as the stream goes through the cache.
            for out in self.merge.step(tag, Ok(event)) {
                for event in out.resolve(&self.store, Owner::Namespace) {
                    self.writer.apply_watcher_event(&event.unwrap());
                }
            }
        }
        /// A whole (re)list of namespace `tag`: `(name, value)` of each object.
        fn list(&mut self, tag: &str, objects: &[(&str, &str)]) {
            self.send(tag, Init);
            for (name, value) in objects {
                self.send(tag, InitApply(cm(tag, name, value)));
            }
            self.send(tag, InitDone);
        }
        fn ready(&self) -> bool {
            futures::FutureExt::now_or_never(self.store.wait_until_ready()).is_some()
        }
    }

    #[test]
    fn the_cache_is_ready_once_every_namespace_has_listed_and_keeps_early_changes() {
        let mut h = Harness::new();
        h.list("a", &[("x", "1")]);
        // "a" changes while "b" is still listing: kept until the cache has its content.
        h.send("a", Apply(cm("a", "x", "2")));
        h.send("a", Apply(cm("a", "y", "1")));
        h.send("a", Delete(cm("a", "y", "1")));
        assert!(!h.ready(), "b has not listed yet");
        h.send("b", Init);
        h.send("b", InitApply(cm("b", "z", "1")));
        assert!(!h.ready());
        h.send("b", InitDone);
        assert!(h.ready());
        assert_eq!(names(&h.store), ["a/x=2", "b/z=1"]);
    }

    #[test]
    fn a_relist_of_one_namespace_drops_only_what_that_namespace_lost() {
        let mut h = Harness::new();
        h.list("a", &[("x", "1"), ("y", "1")]);
        h.list("b", &[("x", "1")]);
        assert_eq!(names(&h.store), ["a/x=1", "a/y=1", "b/x=1"]);
        // "a" re-lists after its watch expired: y is gone, x changed.
        h.send("a", Init);
        h.send("a", InitApply(cm("a", "x", "2")));
        assert_eq!(names(&h.store), ["a/x=2", "a/y=1", "b/x=1"]);
        h.send("a", InitDone);
        assert_eq!(names(&h.store), ["a/x=2", "b/x=1"]);
        // An empty re-list of "b" empties b and nothing else.
        h.list("b", &[]);
        assert_eq!(names(&h.store), ["a/x=2"]);
    }

    #[test]
    fn a_relist_while_others_still_list_is_applied_after_the_first_content() {
        let mut h = Harness::new();
        h.list("a", &[("x", "1"), ("y", "1")]);
        // a's watch expires and re-lists while b is still listing: only y is left, changed.
        h.list("a", &[("y", "2")]);
        h.list("b", &[("z", "1")]);
        assert_eq!(names(&h.store), ["a/y=2", "b/z=1"]);
    }

    #[test]
    fn namespace_lists_are_checked() {
        assert_eq!(Scope::from_list::<&str>(&[]), Ok(Scope::Cluster));
        assert_eq!(Scope::from_list(&["", " "]), Ok(Scope::Cluster));
        assert_eq!(
            Scope::from_list(&["b", " a ", "b"]),
            Ok(Scope::Namespaces(["a".to_string(), "b".to_string()].into()))
        );
        for bad in ["Team-A", "a_b", "-a", "a-", &"x".repeat(64)] {
            let e = Scope::from_list(&[bad]).unwrap_err();
            assert!(e.starts_with("--watch-namespaces: "), "{e}");
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        let s = Scope::from_list(&["a"]).unwrap();
        assert!(s.contains("a") && !s.contains("b"));
        assert!(Scope::Cluster.contains("b"));
    }
}
