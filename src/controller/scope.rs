//! Which namespaces the operator serves (`--watch-namespaces`, `--namespace-selector`), and
//! watches that see only those.
//!
//! Cluster-wide (the default), every watch is one request over all namespaces. Scoped to a list,
//! every watch of a namespaced kind becomes one watch per listed namespace, and the Namespace
//! watch one per listed name (a `metadata.name` field selector, which RBAC authorizes against
//! `resourceNames`): no request of the operator then lists or watches anything outside its
//! namespaces, so a release's RBAC can be Roles in those namespaces (charts/, docs/operations.md).
//!
//! Scoped by a label selector on Namespaces, the Namespace watch is one cluster-wide watch with
//! that label selector (the API server filters: a namespace outside the selection is never
//! sent), and every watch of a namespaced kind is one watch per selected namespace, started when
//! a namespace enters the selection and stopped when it leaves ([`dynamic`]); what the caches
//! held of a namespace that left is dropped from them at once.
//!
//! The per-namespace watches of one kind feed one cache. A cache takes one stream of watcher
//! events, whose `Init` .. `InitDone` brackets replace its whole content, so [`Merge`] turns the
//! per-namespace streams into one such stream: one `Init`, the initial objects of every
//! namespace, one `InitDone` once every namespace has listed; later re-lists of one namespace
//! (after a watch expired, or when it enters the selection) become `Apply` events plus a
//! `Delete` for each object of that namespace the new list no longer has, and a namespace that
//! leaves the selection a `Delete` for each object of it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::stream::BoxStream;
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;

use super::WatchBackoff;
use super::cache::Cache;
use super::compact::Compact;

/// The namespaces the operator serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace, through cluster-wide watches.
    #[default]
    Cluster,
    /// Only these (at least one), each through watches of its own.
    Namespaces(BTreeSet<String>),
    /// The namespaces whose labels match this label selector (in the API's string form, checked
    /// and normalized), each through watches of its own while it matches.
    Selector(String),
}

/// Where the violation audit's watches (Pods, Services, NetworkPolicies, Ingresses, Gateway API
/// routes) go: `--audit-namespaces`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AuditNamespaces {
    /// Over the operator's whole scope, like every other watch: one cluster-wide watch per kind
    /// when it serves every namespace.
    #[default]
    Scope,
    /// One watch per kind and namespace that holds a stack (of the scope), started when the
    /// namespace's first stack appears and stopped when its last one goes: objects of
    /// namespaces without a stack cost nothing, each namespace with stacks costs a connection
    /// per kind.
    WithStacks,
}

/// A watch of a namespaced kind over the namespaces `dynamic.selected` holds, one watch per
/// namespace, following its changes (see [`dynamic`]).
pub fn watch_in<K: Watched>(
    kind: &str,
    api: impl Fn(&str) -> Api<K> + Send + 'static,
    config: watcher::Config,
    dynamic: &Dynamic,
    store: impl Holds<K>,
) -> BoxStream<'static, watcher::Result<watcher::Event<K>>> {
    self::dynamic(kind.to_string(), api, config, dynamic.clone(), store)
}

/// The namespaces a `--namespace-selector` selects now, as the Namespace cache holds them:
/// `None` until that cache has its first list.
pub type Selected = tokio::sync::watch::Receiver<Option<BTreeSet<String>>>;

/// What the watches of a selector scope share: the selected namespaces, and which of them are
/// still being listed by some kind's watch (a stack of such a namespace waits: its caches are
/// not complete yet).
#[derive(Clone)]
pub struct Dynamic {
    pub selected: Selected,
    pub listing: Arc<Listing>,
}

/// Namespaces whose watches have not completed their first list yet, per kind.
#[derive(Debug, Default)]
pub struct Listing(Mutex<BTreeMap<String, BTreeSet<String>>>);

impl Listing {
    fn start(&self, kind: &str, namespace: &str) {
        let mut map = self.0.lock().unwrap();
        map.entry(kind.to_string())
            .or_default()
            .insert(namespace.to_string());
    }
    fn done(&self, kind: &str, namespace: &str) {
        if let Some(set) = self.0.lock().unwrap().get_mut(kind) {
            set.remove(namespace);
        }
    }
    /// Whether some kind's watch of `namespace` has not listed it yet.
    pub fn is_listing(&self, namespace: &str) -> bool {
        self.0
            .lock()
            .unwrap()
            .values()
            .any(|s| s.contains(namespace))
    }
}

impl Scope {
    /// The scope of `--watch-namespaces` (`list`: absent or empty means not given) and
    /// `--namespace-selector`. Neither: the whole cluster. Both: refused (a fixed list and a
    /// selection that changes with labels do not make one scope; the RBAC of the one is Roles in
    /// the listed namespaces, of the other cluster-wide). A flag given with nothing in it is
    /// refused rather than read as "every namespace".
    pub fn from_flags<S: AsRef<str>>(list: &[S], selector: Option<&str>) -> Result<Scope, String> {
        let list = Self::from_list(list)?;
        match (list, selector) {
            (list, None) => Ok(list),
            (Scope::Cluster, Some(selector)) => Ok(Scope::Selector(
                check_label_selector(selector)
                    .map_err(|e| format!("--namespace-selector: {selector:?}: {e}"))?,
            )),
            (_, Some(_)) => Err(
                "--watch-namespaces and --namespace-selector: give one or the other, not both \
                 (a fixed list of namespaces, or the namespaces whose labels match)"
                    .into(),
            ),
        }
    }

    /// The scope of `--watch-namespaces` alone: no entry means the whole cluster. Every entry
    /// must be a namespace name (a DNS-1123 label); blanks around commas are ignored, but a
    /// list with nothing in it (`--watch-namespaces ""`) is refused.
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
        if set.is_empty() && !list.is_empty() {
            return Err(
                "--watch-namespaces: no namespace in the list; leave the flag (and \
                 OPSC_WATCH_NAMESPACES) out to serve every namespace"
                    .into(),
            );
        }
        Ok(if set.is_empty() {
            Scope::Cluster
        } else {
            Scope::Namespaces(set)
        })
    }

    /// For logs: `*`, the list, or the selector.
    pub fn describe(&self) -> String {
        match self {
            Scope::Cluster => "*".into(),
            Scope::Namespaces(set) => set.iter().cloned().collect::<Vec<_>>().join(","),
            Scope::Selector(s) => format!("namespaces matching {s:?}"),
        }
    }

    /// A watch of a namespaced kind over the scope. `api(None)` is the cluster-wide Api,
    /// `api(Some(ns))` the Api of namespace `ns`. `store` is the cache the stream will feed
    /// (the merge reads it to find what a re-list no longer has). `dynamic` is used by a
    /// selector scope only.
    pub fn watch<K: Watched>(
        &self,
        kind: &str,
        api: impl Fn(Option<&str>) -> Api<K> + Send + 'static,
        config: watcher::Config,
        store: impl Holds<K>,
        dynamic: &Dynamic,
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
            Scope::Selector(_) => self::dynamic(
                kind.to_string(),
                move |ns| api(Some(ns)),
                config,
                dynamic.clone(),
                store,
            ),
        }
    }

    /// A watch of Namespace objects over the scope: all of them, one watch per listed name, or
    /// the ones the selector matches.
    pub fn watch_namespaces<K: Watched>(
        &self,
        api: Api<K>,
        config: watcher::Config,
        store: impl Holds<K>,
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
            Scope::Selector(selector) => one_watch(api, config.labels(selector)).boxed(),
        }
    }
}

/// A label selector in the API's string form (`key=value`, `key!=value`, `key in (a,b)`,
/// `key notin (a,b)`, `key`, `!key`, comma-separated): checked as the API server would, and
/// returned normalized. An empty one (which would select every namespace) is refused.
pub fn check_label_selector(s: &str) -> Result<String, String> {
    let mut requirements = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.checked_sub(1).ok_or("an unmatched ')'")?,
            ',' if depth == 0 => {
                requirements.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("an unmatched '('".into());
    }
    requirements.push(&s[start..]);
    if requirements.len() == 1 && requirements[0].trim().is_empty() {
        return Err(
            "empty: it would select every namespace; leave the flag (and \
                    OPSC_NAMESPACE_SELECTOR) out for that"
                .into(),
        );
    }
    let mut out = Vec::new();
    for r in requirements {
        let r = r.trim();
        if r.is_empty() {
            return Err("an empty requirement between commas".into());
        }
        out.push(check_requirement(r)?);
    }
    Ok(out.join(","))
}

fn check_requirement(r: &str) -> Result<String, String> {
    if let Some(key) = r.strip_prefix('!') {
        let key = key.trim();
        check_label_key(key)?;
        return Ok(format!("!{key}"));
    }
    let end = r
        .find(|c: char| c.is_whitespace() || c == '=' || c == '!' || c == '(')
        .unwrap_or(r.len());
    let (key, rest) = (&r[..end], r[end..].trim());
    check_label_key(key)?;
    if rest.is_empty() {
        return Ok(key.to_string());
    }
    for (op, out) in [("==", "="), ("!=", "!="), ("=", "=")] {
        if let Some(value) = rest.strip_prefix(op) {
            let value = value.trim();
            check_label_value(value)?;
            return Ok(format!("{key}{out}{value}"));
        }
    }
    for op in ["notin", "in"] {
        if let Some(set) = rest.strip_prefix(op) {
            let set = set.trim();
            let inner = set
                .strip_prefix('(')
                .and_then(|s| s.strip_suffix(')'))
                .ok_or_else(|| format!("{key:?}: '{op}' needs a set of values: ({op} (a,b))"))?;
            let mut values = Vec::new();
            for v in inner.split(',') {
                let v = v.trim();
                check_label_value(v)?;
                values.push(v);
            }
            if values.iter().all(|v| v.is_empty()) {
                return Err(format!("{key:?}: the set of '{op}' is empty"));
            }
            return Ok(format!("{key} {op} ({})", values.join(",")));
        }
    }
    Err(format!(
        "{r:?} is not a requirement (key, !key, key=value, key!=value, key in (a,b), key notin (a,b))"
    ))
}

/// A label key: an optional DNS subdomain prefix and `/`, then a name of at most 63 characters
/// (alphanumerics, `-`, `_`, `.`, starting and ending with an alphanumeric).
fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let ok = !prefix.is_empty()
            && prefix.len() <= 253
            && prefix
                .split('.')
                .all(|l| check_namespace_name(l).is_ok() && !l.is_empty());
        if !ok {
            return Err(format!(
                "label key {key:?}: the prefix must be a DNS subdomain"
            ));
        }
    }
    if name.is_empty() {
        return Err(format!("label key {key:?}: the name part is empty"));
    }
    check_label_value(name).map_err(|_| {
        format!(
            "label key {key:?}: the name part must be at most 63 characters, alphanumerics, \
             '-', '_' or '.', starting and ending with an alphanumeric"
        )
    })
}

/// A label value: empty, or at most 63 characters, alphanumerics, `-`, `_`, `.`, starting and
/// ending with an alphanumeric.
fn check_label_value(value: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let edge = |c: Option<char>| c.is_none_or(|c| c.is_ascii_alphanumeric());
    if value.len() <= 63
        && value.chars().all(ok_char)
        && edge(value.chars().next())
        && edge(value.chars().last())
    {
        Ok(())
    } else {
        Err(format!(
            "label value {value:?} must be at most 63 characters, alphanumerics, '-', '_' or \
             '.', starting and ending with an alphanumeric"
        ))
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
pub enum Owner {
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
    store: impl Holds<K>,
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

/// One watch per namespace `dynamic.selected` holds, started and stopped as the selection
/// changes, merged by [`Merge`]: the stream waits for the selection's first value, then starts
/// like [`merged`] over it. `kind` names the watches in `dynamic.listing`.
fn dynamic<K: Watched>(
    kind: String,
    api: impl Fn(&str) -> Api<K> + Send + 'static,
    config: watcher::Config,
    dynamic: Dynamic,
    store: impl Holds<K>,
) -> BoxStream<'static, watcher::Result<watcher::Event<K>>> {
    type Tagged<K> = BoxStream<'static, (String, watcher::Result<watcher::Event<K>>)>;
    struct State<K: Watched, A, S> {
        kind: String,
        api: A,
        config: watcher::Config,
        dynamic: Dynamic,
        store: S,
        /// `None` until the selection's first value.
        merge: Option<Merge<K>>,
        /// The running watches, each stopped by its token.
        running: HashMap<String, CancellationToken>,
        streams: futures::stream::SelectAll<Tagged<K>>,
        queue: VecDeque<Out<K>>,
        /// The selection's sender is gone (shutting down): no more changes.
        closed: bool,
    }
    impl<K: Watched, A: Fn(&str) -> Api<K>, S> State<K, A, S> {
        fn start(&mut self, ns: &str) {
            let token = CancellationToken::new();
            let tag = ns.to_string();
            self.dynamic.listing.start(&self.kind, ns);
            self.streams.push(
                one_watch((self.api)(ns), self.config.clone())
                    .map(move |event| (tag.clone(), event))
                    .take_until(token.clone().cancelled_owned())
                    .boxed(),
            );
            if let Some(old) = self.running.insert(ns.to_string(), token) {
                old.cancel();
            }
        }
        fn stop(&mut self, ns: &str) {
            if let Some(token) = self.running.remove(ns) {
                token.cancel();
            }
            self.dynamic.listing.done(&self.kind, ns);
        }
        /// Starts and stops watches so that they match `selected`.
        fn follow(&mut self, selected: &BTreeSet<String>) {
            let gone: Vec<String> = self
                .running
                .keys()
                .filter(|ns| !selected.contains(*ns))
                .cloned()
                .collect();
            for ns in gone {
                self.stop(&ns);
                let out = self
                    .merge
                    .as_mut()
                    .map(|m| m.remove(&ns))
                    .unwrap_or_default();
                self.queue.extend(out);
            }
            for ns in selected {
                if !self.running.contains_key(ns) {
                    if let Some(m) = self.merge.as_mut() {
                        m.add(ns);
                    }
                    self.start(ns);
                }
            }
        }
    }
    let state = State {
        kind,
        api,
        config,
        dynamic,
        store,
        merge: None,
        running: HashMap::new(),
        streams: futures::stream::SelectAll::new(),
        queue: VecDeque::new(),
        closed: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(out) = st.queue.pop_front() {
                match out {
                    Out::Event(event) => return Some((event, st)),
                    Out::Listed(ns) => st.dynamic.listing.done(&st.kind, &ns),
                    prune => {
                        // Resolved now: every event before it has gone through the cache.
                        let events = prune.resolve(&st.store, Owner::Namespace);
                        for event in events.into_iter().rev() {
                            st.queue.push_front(Out::Event(event));
                        }
                    }
                }
                continue;
            }
            if st.merge.is_none() {
                // The first selection: its namespaces make the cache's first content.
                let first = match st.dynamic.selected.wait_for(|s| s.is_some()).await {
                    Ok(s) => s.clone().unwrap_or_default(),
                    Err(_) => return None,
                };
                st.merge = Some(Merge::new(first.iter().cloned().collect()));
                st.queue.push_back(Out::Event(Ok(watcher::Event::Init)));
                if first.is_empty() {
                    st.queue.push_back(Out::Event(Ok(watcher::Event::InitDone)));
                }
                for ns in &first {
                    st.start(ns);
                }
                continue;
            }
            let has_streams = !st.streams.is_empty();
            tokio::select! {
                changed = st.dynamic.selected.changed(), if !st.closed => {
                    if changed.is_err() {
                        st.closed = true;
                        continue;
                    }
                    let selected = st.dynamic.selected.borrow_and_update().clone().unwrap_or_default();
                    st.follow(&selected);
                }
                next = st.streams.next(), if has_streams => {
                    // `None`: every watch has stopped; wait for the selection to change.
                    if let Some((tag, event)) = next {
                        let listed = matches!(event, Ok(watcher::Event::InitDone));
                        let out = st.merge.as_mut().expect("started").step(&tag, event);
                        st.queue.extend(out);
                        if listed {
                            st.queue.push_back(Out::Listed(tag));
                        }
                    }
                }
                else => return None,
            }
        }
    })
    .boxed()
}

/// What [`Merge`] puts out: an event, or "delete what the cache holds of watch `tag` but
/// `seen`", resolved only when the events before it have reached the cache. ([`dynamic`] adds
/// `Listed`: watch `tag` has listed, and what it listed has reached the cache.)
enum Out<K> {
    Event(watcher::Result<watcher::Event<K>>),
    Prune { tag: String, seen: HashSet<String> },
    Listed(String),
}

impl<K> Out<K> {
    fn resolve(
        self,
        store: &impl Holds<K>,
        owner: Owner,
    ) -> Vec<watcher::Result<watcher::Event<K>>> {
        match self {
            Out::Event(e) => vec![e],
            Out::Listed(_) => Vec::new(),
            Out::Prune { tag, seen } => store
                .held(owner, &tag)
                .into_iter()
                .filter(|(name, _)| !seen.contains(name))
                .map(|(_, o)| Ok(watcher::Event::Delete(o)))
                .collect(),
        }
    }
}

/// A cache that a merged stream of watches feeds: what it holds of one of the watches, by name,
/// for the deletions a re-list implies.
pub trait Holds<K>: Send + Sync + 'static {
    /// The objects of namespace `tag` ([`Owner::Namespace`]) or the object named `tag`
    /// ([`Owner::Name`]), with their names.
    fn held(&self, owner: Owner, tag: &str) -> Vec<(String, K)>;
}

impl<K: Watched> Holds<K> for Store<K> {
    fn held(&self, owner: Owner, tag: &str) -> Vec<(String, K)> {
        self.state()
            .into_iter()
            .filter(|o| owner.owns(&**o, tag))
            .map(|o| (o.name_any(), (*o).clone()))
            .collect()
    }
}

impl<K: 'static> Holds<Compact<K>> for Cache<K> {
    fn held(&self, owner: Owner, tag: &str) -> Vec<(String, Compact<K>)> {
        let objects = match owner {
            Owner::Namespace => self.in_namespace(Some(tag)),
            Owner::Name => self.get(None, tag).into_iter().collect(),
        };
        objects
            .into_iter()
            .map(|o| (o.key().1.to_string(), o))
            .collect()
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
    /// Watches removed while the first content was being collected.
    dropped: Vec<String>,
}

impl<K: ResourceExt> Merge<K> {
    fn new(tags: Vec<String>) -> Self {
        Merge {
            pending: tags.into_iter().collect(),
            held: Vec::new(),
            relisting: HashMap::new(),
            dropped: Vec::new(),
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
                    self.first_content_done()
                }
                // Not sent before a watch's first InitDone; passed on as they are.
                other => vec![Out::Event(other)],
            };
        }
        self.after_sync(tag, event)
    }

    /// Every watch has completed its first list: the cache gets its first content, then what
    /// was held meanwhile, then the removal of what namespaces that left during the first
    /// list had contributed to it.
    fn first_content_done(&mut self) -> Vec<Out<K>> {
        let mut out = vec![Out::Event(Ok(watcher::Event::InitDone))];
        for (tag, event) in std::mem::take(&mut self.held) {
            out.extend(self.after_sync(&tag, event));
        }
        for tag in std::mem::take(&mut self.dropped) {
            out.push(Out::Prune {
                tag,
                seen: HashSet::new(),
            });
        }
        out
    }

    /// A watch `tag` joins (a namespace entered the selection). Before the first content it is
    /// waited for like the others; after, its list arrives as changes (see `after_sync`).
    fn add(&mut self, tag: &str) {
        self.relisting.remove(tag);
        self.dropped.retain(|t| t != tag);
        if !self.pending.is_empty() {
            self.pending.insert(tag.to_string());
        }
    }

    /// The watch `tag` is gone (its namespace left the selection): what the cache holds of it
    /// goes, and nothing of it is waited for any longer.
    fn remove(&mut self, tag: &str) -> Vec<Out<K>> {
        self.relisting.remove(tag);
        self.held.retain(|(t, _)| t != tag);
        if self.pending.is_empty() {
            return vec![Out::Prune {
                tag: tag.to_string(),
                seen: HashSet::new(),
            }];
        }
        // Still collecting the first content: what this watch listed is in it (the cache's
        // buffer), so it is removed right after the first content is complete.
        self.pending.remove(tag);
        self.dropped.push(tag.to_string());
        if self.pending.is_empty() {
            self.first_content_done()
        } else {
            Vec::new()
        }
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
        for empty in [&["", " "][..], &[""][..]] {
            let e = Scope::from_list(empty).unwrap_err();
            assert!(e.starts_with("--watch-namespaces: no namespace"), "{e}");
        }
        assert_eq!(
            Scope::from_list(&["b", " a ", "b", ""]),
            Ok(Scope::Namespaces(["a".to_string(), "b".to_string()].into()))
        );
        for bad in ["Team-A", "a_b", "-a", "a-", &"x".repeat(64)] {
            let e = Scope::from_list(&[bad]).unwrap_err();
            assert!(e.starts_with("--watch-namespaces: "), "{e}");
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn a_list_and_a_selector_are_one_or_the_other() {
        assert_eq!(Scope::from_flags::<&str>(&[], None), Ok(Scope::Cluster));
        assert_eq!(
            Scope::from_flags::<&str>(&[], Some(" tenant = a ")),
            Ok(Scope::Selector("tenant=a".into()))
        );
        let e = Scope::from_flags(&["a"], Some("tenant=a")).unwrap_err();
        assert!(
            e.contains("--watch-namespaces and --namespace-selector"),
            "{e}"
        );
        let e = Scope::from_flags::<&str>(&[], Some(" ")).unwrap_err();
        assert!(e.starts_with("--namespace-selector: "), "{e}");
        assert!(e.contains("every namespace"), "{e}");
        // A bad list is named even with a selector beside it.
        let e = Scope::from_flags(&["A"], Some("t=a")).unwrap_err();
        assert!(e.starts_with("--watch-namespaces: "), "{e}");
    }

    #[test]
    fn label_selectors_are_checked_and_normalized() {
        for (input, normalized) in [
            ("tenant=a", "tenant=a"),
            ("tenant==a", "tenant=a"),
            ("tenant != a", "tenant!=a"),
            ("tenant", "tenant"),
            ("!frozen", "!frozen"),
            (
                "example.com/tenant in (a, b),!frozen",
                "example.com/tenant in (a,b),!frozen",
            ),
            ("tier notin (x)", "tier notin (x)"),
            ("t.e_s-t=", "t.e_s-t="),
        ] {
            assert_eq!(
                check_label_selector(input).as_deref(),
                Ok(normalized),
                "{input}"
            );
        }
        for bad in [
            "",
            "  ",
            "a=b,",
            ",a",
            "a in (b",
            "a)",
            "a in ()",
            "a in b",
            "a > 3",
            "-a=b",
            "a=b c",
            "Upper.Case/x=y",
            "/x=y",
            "a/=y",
            &format!("a={}", "v".repeat(64)),
        ] {
            let e = check_label_selector(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
    }

    #[test]
    fn a_namespace_that_leaves_takes_its_objects_out_of_the_cache() {
        let mut h = Harness::new();
        h.list("a", &[("x", "1")]);
        h.list("b", &[("y", "1")]);
        for out in h.merge.remove("a") {
            for event in out.resolve(&h.store, Owner::Namespace) {
                h.writer.apply_watcher_event(&event.unwrap());
            }
        }
        assert_eq!(names(&h.store), ["b/y=1"]);
        // It comes back: its list arrives as changes.
        h.merge.add("a");
        h.list("a", &[("z", "1")]);
        assert_eq!(names(&h.store), ["a/z=1", "b/y=1"]);
    }

    #[test]
    fn a_namespace_that_leaves_during_the_first_list_is_not_waited_for_nor_kept() {
        let mut h = Harness::new();
        h.list("a", &[("x", "1")]);
        h.send("b", Init);
        h.send("b", InitApply(cm("b", "y", "1")));
        assert!(!h.ready());
        let out = h.merge.remove("b");
        for out in out {
            for event in out.resolve(&h.store, Owner::Namespace) {
                h.writer.apply_watcher_event(&event.unwrap());
            }
        }
        assert!(h.ready(), "nothing is left to wait for");
        assert_eq!(names(&h.store), ["a/x=1"]);
    }

    #[test]
    fn a_namespace_that_joins_during_the_first_list_is_waited_for() {
        let mut h = Harness::new();
        h.merge.add("c");
        h.list("a", &[("x", "1")]);
        h.list("b", &[]);
        assert!(!h.ready(), "c has not listed yet");
        h.list("c", &[("z", "1")]);
        assert!(h.ready());
        assert_eq!(names(&h.store), ["a/x=1", "c/z=1"]);
    }

    #[test]
    fn listing_is_per_kind_and_namespace() {
        let l = Listing::default();
        l.start("Pod", "a");
        l.start("Service", "a");
        l.done("Pod", "a");
        assert!(l.is_listing("a") && !l.is_listing("b"));
        l.done("Service", "a");
        assert!(!l.is_listing("a"));
    }
}
