//! How the watch caches hold objects: [`Compact`].
//!
//! The caches are most of the operator's memory, and Kubernetes objects are large once
//! deserialized: every optional field of a k8s-openapi struct takes room whether set or not,
//! and every label and string is its own allocation. Measured on the benchmark's cluster (200
//! stacks of 10 services), a Deployment took 16.6 KB of heap, a NetworkPolicy 9.4 KB and even
//! a ServiceAccount 2.8 KB; as compact JSON they take a quarter of that.
//!
//! So a cached object keeps as fields only what is read for every object on every event or
//! reconcile (its name, namespace and resourceVersion, owner references to stacks for the
//! controller's triggers, the deletion timestamp, and the operator's own `opsconductor.io/`
//! labels for pruning and the namespace marker), and the rest as the JSON the API server sent,
//! minus managedFields and minus what [`Slim`] drops. A reconcile decodes the few objects of
//! its own namespace when it reads them. A watch delivers a [`Compact`] (those fields in an
//! `ObjectMeta`, as kube-runtime's triggers need them); the cache keeps a [`Kept`] (the same
//! without the `ObjectMeta`, in one allocation; see `super::cache`).
//!
//! That JSON is kept LZ4-compressed against a dictionary per kind ([`Dictionary`]): the first
//! objects of the kind the process cached. Objects of one kind repeat most of each other's
//! text (field names, the operator's labels, the defaults the API server filled in), so a
//! Deployment of a few KB of JSON keeps a few hundred bytes; decoding one costs microseconds,
//! and a reconcile decodes only its own namespace's.

use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::Resource;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

/// The label prefix whose labels stay readable without decoding.
const OWN_LABEL_PREFIX: &str = "opsconductor.io/";
/// The kind whose owner references stay readable without decoding.
const STACK_KIND: &str = "OpsConductorStack";

/// What the cache drops of an object of this kind before keeping it (see [`super::slim`]),
/// and the kind's compression dictionary.
pub trait Slim {
    fn slim(&mut self) {}
    /// The kind's dictionary. Each kind needs a static of its own (one in a default method
    /// would be shared by every kind), so every implementation names one with [`dictionary!`].
    fn dictionary() -> &'static Dictionary;
}

/// The body of [`Slim::dictionary`]: a static of the implementing kind's own.
macro_rules! dictionary {
    () => {
        fn dictionary() -> &'static Dictionary {
            static DICTIONARY: Dictionary = Dictionary::new();
            &DICTIONARY
        }
    };
}

/// A kind's compression dictionary: the JSON of the first objects of the kind cached, up to
/// [`Dictionary::MAX`] bytes. An object is compressed against the dictionary as it is at that
/// moment and keeps that version (an `Arc`); versions are taken each time the dictionary has
/// doubled (2, 4, ... 32 KiB), so at most five are ever kept per kind, and later objects, the
/// bulk of a large cluster, share the last.
pub struct Dictionary(Mutex<DictionaryState>);

struct DictionaryState {
    /// The first objects' JSON as it accumulates (emptied once it is whole).
    growing: Vec<u8>,
    /// The dictionary reached its limit: the current version is the last.
    whole: bool,
    /// The version new objects are compressed against (empty at first).
    current: Option<Arc<[u8]>>,
}

impl Default for Dictionary {
    fn default() -> Self {
        Self::new()
    }
}

impl Dictionary {
    /// The largest dictionary (LZ4 looks back at most 64 KiB).
    const MAX: usize = 32 * 1024;
    /// The first version's size; each later one doubles it.
    const FIRST: usize = 2 * 1024;

    pub const fn new() -> Self {
        Self(Mutex::new(DictionaryState {
            growing: Vec::new(),
            whole: false,
            current: None,
        }))
    }

    /// The version to compress `json` against; `json` then joins the dictionary if it is
    /// still growing.
    fn version_for(&self, json: &[u8]) -> Option<Arc<[u8]>> {
        // Nothing panics while the lock is held; a poisoned lock still holds a whole state.
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let version = state.current.clone();
        let room = Self::MAX - state.growing.len();
        if !state.whole {
            state
                .growing
                .extend_from_slice(&json[..json.len().min(room)]);
            let current = state.current.as_ref().map_or(0, |c| c.len());
            let next = (current * 2).max(Self::FIRST);
            if state.growing.len() >= next.min(Self::MAX) {
                state.current = Some(state.growing.as_slice().into());
                if state.growing.len() == Self::MAX {
                    state.growing = Vec::new();
                    state.whole = true;
                }
            }
        }
        version
    }
}

/// An object as a watch delivers it to the caches (see the module docs), and as a cache hands
/// it out: the few fields read on every event in an `ObjectMeta`, the rest compressed. The
/// cache itself keeps a [`Kept`] under the object's namespace and name, without the
/// `ObjectMeta`, which takes a third of a kilobyte even with most of its fields empty.
pub struct Compact<K> {
    meta: ObjectMeta,
    body: Body,
    kind: PhantomData<fn() -> K>,
}

/// What a cache keeps of an object besides its namespace and name (the cache's keys): a
/// [`Compact`] without its `ObjectMeta`, with its strings and compressed JSON in one allocation.
/// About 100 bytes and that allocation, against some 1.2 KB of bookkeeping for an object in
/// kube-runtime's `Store` (measured by `tests/cache_memory.rs`).
pub struct Kept<K> {
    /// The owner references to stacks (encoded, see [`Body::stacks`]), the own labels (as in
    /// [`Body::own_labels`]) and the compressed JSON, one after the other.
    bytes: Box<[u8]>,
    /// Where the labels start and the JSON starts in `bytes`.
    labels_at: u32,
    packed_at: u32,
    /// Bytes of the JSON before compression.
    json_len: u32,
    resource_version: Version,
    generation: Option<i64>,
    /// Rare (an object being deleted): boxed, so that the others do not pay for its room.
    deletion: Option<Box<Time>>,
    content_hash: u64,
    /// The version of the kind's dictionary the JSON was compressed against.
    dictionary: Option<Arc<[u8]>>,
    kind: PhantomData<fn() -> K>,
}

/// The part of an object that both forms share.
#[derive(Clone)]
struct Body {
    /// Hash of the JSON: equal for two versions that differ only in what the cache drops.
    content_hash: u64,
    /// The `opsconductor.io/` labels, each key and value followed by a NUL (one allocation;
    /// a map would take half a kilobyte for one entry). Label keys and values cannot hold NUL.
    own_labels: Box<str>,
    /// The JSON, LZ4-compressed against `dictionary`.
    packed: Arc<[u8]>,
    /// The version of the kind's dictionary it was compressed against.
    dictionary: Option<Arc<[u8]>>,
    /// Bytes of the JSON before compression.
    json_len: u32,
}

/// A resourceVersion: a number in every API server backed by etcd, kept without an
/// allocation then; any other text as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Version {
    Absent,
    Number(u64),
    Text(Box<str>),
}

impl Version {
    fn new(v: Option<String>) -> Self {
        match v {
            None => Version::Absent,
            // Only when the number prints back as the same text ("007" stays text).
            Some(v) => match v.parse::<u64>() {
                Ok(n) if n.to_string() == v => Version::Number(n),
                _ => Version::Text(v.into()),
            },
        }
    }
    fn to_option(&self) -> Option<String> {
        match self {
            Version::Absent => None,
            Version::Number(n) => Some(n.to_string()),
            Version::Text(t) => Some(t.to_string()),
        }
    }
}

/// Separates the fields of an encoded owner reference to a stack, and the references.
const FIELD: char = '\0';
const REFERENCE: char = '\u{1}';

impl Body {
    fn labels(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut parts = self.own_labels.split_terminator(FIELD);
        std::iter::from_fn(move || Some((parts.next()?, parts.next()?)))
    }

    /// The owner references to stacks, as a cache keeps them: per reference its apiVersion,
    /// name, uid, controller flag and blockOwnerDeletion flag (each flag `1`, `0`, or empty
    /// when unset) separated by NUL, the references separated by U+0001 (neither can occur in
    /// an apiVersion, a name or a uid the API server set).
    fn stacks(refs: &[OwnerReference]) -> String {
        let flag = |b: Option<bool>| match b {
            Some(true) => "1",
            Some(false) => "0",
            None => "",
        };
        refs.iter()
            .map(|r| {
                format!(
                    "{}{FIELD}{}{FIELD}{}{FIELD}{}{FIELD}{}",
                    r.api_version,
                    r.name,
                    r.uid,
                    flag(r.controller),
                    flag(r.block_owner_deletion)
                )
            })
            .collect::<Vec<_>>()
            .join(&REFERENCE.to_string())
    }

    fn owner_references(stacks: &str) -> Option<Vec<OwnerReference>> {
        if stacks.is_empty() {
            return None;
        }
        let flag = |s: &str| match s {
            "1" => Some(true),
            "0" => Some(false),
            _ => None,
        };
        Some(
            stacks
                .split(REFERENCE)
                .map(|r| {
                    let mut f = r.split(FIELD);
                    let mut next = || f.next().unwrap_or_default();
                    OwnerReference {
                        api_version: next().into(),
                        kind: STACK_KIND.into(),
                        name: next().into(),
                        uid: next().into(),
                        controller: flag(next()),
                        block_owner_deletion: flag(next()),
                    }
                })
                .collect(),
        )
    }
}

impl<K> Kept<K> {
    /// A part of `bytes` that was a `&str` when it was put there.
    fn text(&self, from: u32, to: u32) -> &str {
        std::str::from_utf8(&self.bytes[from as usize..to as usize])
            .expect("copied from a str at a char boundary")
    }

    /// The object again as the cache hands it out, under `namespace` and `name`.
    pub fn to_compact(&self, namespace: Option<&str>, name: &str) -> Compact<K> {
        Compact {
            meta: ObjectMeta {
                name: Some(name.to_string()),
                namespace: namespace.map(str::to_string),
                resource_version: self.resource_version.to_option(),
                generation: self.generation,
                deletion_timestamp: self.deletion.as_deref().cloned(),
                owner_references: Body::owner_references(self.text(0, self.labels_at)),
                ..ObjectMeta::default()
            },
            body: Body {
                content_hash: self.content_hash,
                own_labels: self.text(self.labels_at, self.packed_at).into(),
                packed: self.bytes[self.packed_at as usize..].into(),
                dictionary: self.dictionary.clone(),
                json_len: self.json_len,
            },
            kind: PhantomData,
        }
    }

    /// See [`Compact::content_hash`].
    pub fn content_hash(&self) -> u64 {
        self.content_hash
    }

    /// Bytes of JSON of this object (before compression).
    pub fn json_len(&self) -> usize {
        self.json_len as usize
    }

    /// Bytes kept for this object's JSON (after compression).
    pub fn packed_len(&self) -> usize {
        self.bytes.len() - self.packed_at as usize
    }
}

impl<K> Clone for Compact<K> {
    fn clone(&self) -> Self {
        Self {
            meta: self.meta.clone(),
            body: self.body.clone(),
            kind: PhantomData,
        }
    }
}

impl<K> fmt::Debug for Compact<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Compact")
            .field("meta", &self.meta)
            .field("json_bytes", &self.body.json_len)
            .field("packed_bytes", &self.body.packed.len())
            .finish()
    }
}

impl<K> Compact<K> {
    /// Its namespace ("" for a cluster-scoped object) and name.
    pub fn key(&self) -> (&str, &str) {
        (
            self.meta.namespace.as_deref().unwrap_or(""),
            self.meta.name.as_deref().unwrap_or(""),
        )
    }

    /// The value of an `opsconductor.io/` label (other labels are in the JSON only).
    pub fn label(&self, key: &str) -> Option<&str> {
        debug_assert!(key.starts_with(OWN_LABEL_PREFIX), "{key} is not kept");
        self.body.labels().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Equal for two versions of an object that differ only in what the cache drops
    /// (resourceVersion, managedFields, what [`Slim`] removes).
    pub fn content_hash(&self) -> u64 {
        self.body.content_hash
    }

    /// Bytes of JSON of this object (before compression).
    pub fn json_len(&self) -> usize {
        self.body.json_len as usize
    }

    /// Bytes kept for this object's JSON (after compression).
    pub fn packed_len(&self) -> usize {
        self.body.packed.len()
    }

    /// What a cache keeps of it, and the namespace and name it keeps it under.
    pub fn into_kept(self) -> (Option<String>, String, Kept<K>) {
        let m = self.meta;
        let stacks = Body::stacks(m.owner_references.as_deref().unwrap_or_default());
        let b = self.body;
        let mut bytes = Vec::with_capacity(stacks.len() + b.own_labels.len() + b.packed.len());
        bytes.extend_from_slice(stacks.as_bytes());
        bytes.extend_from_slice(b.own_labels.as_bytes());
        bytes.extend_from_slice(&b.packed);
        // An object is at most about 1.5 MiB (etcd's request size).
        let at = |n: usize| u32::try_from(n).expect("an object under 4 GiB");
        let kept = Kept {
            labels_at: at(stacks.len()),
            packed_at: at(stacks.len() + b.own_labels.len()),
            bytes: bytes.into(),
            json_len: b.json_len,
            resource_version: Version::new(m.resource_version),
            generation: m.generation,
            deletion: m.deletion_timestamp.map(Box::new),
            content_hash: b.content_hash,
            dictionary: b.dictionary,
            kind: PhantomData,
        };
        (m.namespace, m.name.unwrap_or_default(), kept)
    }
}

impl<K> Compact<K>
where
    K: Resource + Serialize + DeserializeOwned + Slim,
{
    /// Keeps `object` the way the cache does.
    pub fn new(mut object: K) -> Self {
        object.meta_mut().managed_fields = None;
        object.slim();
        // The resourceVersion changes with every write, whatever it changed: kept as a field
        // (the watch resumes from it), left out of the JSON and so out of the content hash.
        let resource_version = object.meta_mut().resource_version.take();
        // Serializing a value that was just deserialized cannot fail.
        let json = serde_json::to_vec(&object).expect("a deserialized object serializes");
        let content_hash = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            json.hash(&mut h);
            h.finish()
        };
        let m = object.meta_mut();
        let own_labels: String = m
            .labels
            .take()
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| k.starts_with(OWN_LABEL_PREFIX))
            .flat_map(|(k, v)| [k, FIELD.to_string(), v, FIELD.to_string()])
            .collect();
        // Only references to stacks trigger reconciles; others (a Pod's ReplicaSet) are read
        // from the JSON when needed.
        let owner_references = m.owner_references.take().and_then(|refs| {
            let refs: Vec<_> = refs.into_iter().filter(|r| r.kind == STACK_KIND).collect();
            (!refs.is_empty()).then_some(refs)
        });
        let meta = ObjectMeta {
            name: m.name.take(),
            namespace: m.namespace.take(),
            resource_version,
            generation: m.generation,
            deletion_timestamp: m.deletion_timestamp.take(),
            owner_references,
            ..ObjectMeta::default()
        };
        let dictionary = K::dictionary().version_for(&json);
        let packed =
            lz4_flex::block::compress_with_dict(&json, dictionary.as_deref().unwrap_or_default())
                .into();
        Self {
            meta,
            body: Body {
                content_hash,
                own_labels: own_labels.into(),
                packed,
                dictionary,
                // Objects are limited to about 1.5 MiB by the API server (etcd's request size).
                json_len: u32::try_from(json.len()).expect("an object under 4 GiB"),
            },
            kind: PhantomData,
        }
    }

    /// The JSON kept for this object, decompressed.
    fn json(&self) -> Vec<u8> {
        let b = &self.body;
        let dictionary = b.dictionary.as_deref().unwrap_or_default();
        // The bytes were compressed here against this dictionary: they always decompress.
        lz4_flex::block::decompress_with_dict(&b.packed, b.json_len as usize, dictionary)
            .expect("a cached object decompresses")
    }

    /// The whole object (minus what the cache dropped, resourceVersion included: read a
    /// fresh object from the API server where it matters).
    pub fn decode(&self) -> K {
        // The bytes are our own serialization of a K: they always read back.
        serde_json::from_slice(&self.json()).expect("a cached object decodes")
    }

    /// The whole object as JSON, for comparing with a desired object.
    pub fn value(&self) -> serde_json::Value {
        serde_json::from_slice(&self.json()).expect("a cached object decodes")
    }
}

impl<'de, K> Deserialize<'de> for Compact<K>
where
    K: Resource + Serialize + DeserializeOwned + Slim,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        K::deserialize(deserializer).map(Self::new)
    }
}

impl<K: Resource> Resource for Compact<K> {
    type DynamicType = K::DynamicType;
    type Scope = K::Scope;

    fn kind(dt: &Self::DynamicType) -> std::borrow::Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &Self::DynamicType) -> std::borrow::Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &Self::DynamicType) -> std::borrow::Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &Self::DynamicType) -> std::borrow::Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
    }
}

impl Slim for k8s_openapi::api::core::v1::ServiceAccount {
    dictionary!();
}
impl Slim for k8s_openapi::api::core::v1::ConfigMap {
    dictionary!();
}
impl Slim for k8s_openapi::api::core::v1::Service {
    dictionary!();
}
impl Slim for k8s_openapi::api::core::v1::Namespace {
    dictionary!();
}
impl Slim for k8s_openapi::api::networking::v1::NetworkPolicy {
    dictionary!();
}
impl Slim for k8s_openapi::api::networking::v1::Ingress {
    dictionary!();
}
impl Slim for k8s_openapi::api::policy::v1::PodDisruptionBudget {
    dictionary!();
}
impl Slim for k8s_openapi::api::core::v1::Pod {
    dictionary!();
    fn slim(&mut self) {
        super::slim::pod(self)
    }
}
impl Slim for k8s_openapi::api::apps::v1::Deployment {
    dictionary!();
    fn slim(&mut self) {
        super::slim::deployment(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Pod;
    use kube::ResourceExt;
    use serde_json::json;

    fn deployment_json() -> serde_json::Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {
                "name": "orders", "namespace": "shop", "uid": "u1", "resourceVersion": "42",
                "generation": 3,
                "labels": {"opsconductor.io/stack": "shop", "app.kubernetes.io/name": "orders"},
                "annotations": {"opsconductor.io/config-sha256": "abc"},
                "ownerReferences": [{"apiVersion": "opsconductor.io/v1alpha1",
                                     "kind": "OpsConductorStack", "name": "shop",
                                     "uid": "s1", "controller": true}],
                "managedFields": [{"manager": "opsconductor-operator", "operation": "Apply",
                                   "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]
            },
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "orders"}},
                     "template": {"metadata": {"labels": {"app": "orders"}},
                                  "spec": {"containers": [{"name": "app", "image": "x"}]}}},
            "status": {"observedGeneration": 3, "readyReplicas": 2,
                       "conditions": [{"type": "Available", "status": "True"}]}
        })
    }

    #[test]
    fn the_cache_reads_identity_owners_and_own_labels_without_decoding() {
        let c: Compact<Deployment> = serde_json::from_value(deployment_json()).unwrap();
        assert_eq!(c.name_any(), "orders");
        assert_eq!(c.namespace().as_deref(), Some("shop"));
        assert_eq!(c.resource_version().as_deref(), Some("42"));
        assert_eq!(c.owner_references()[0].uid, "s1");
        assert_eq!(c.label("opsconductor.io/stack"), Some("shop"));
        // Other labels and owners are in the JSON only.
        assert!(c.labels().is_empty());
        let mut with_rs = deployment_json();
        with_rs["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1",
            "kind": "ReplicaSet", "name": "orders-1", "uid": "r1"}]);
        let c: Compact<Deployment> = serde_json::from_value(with_rs).unwrap();
        assert!(c.owner_references().is_empty());
        assert_eq!(c.decode().owner_references()[0].uid, "r1");
    }

    #[test]
    fn decoding_gives_the_object_without_managed_fields_and_slimmed() {
        let c: Compact<Deployment> = serde_json::from_value(deployment_json()).unwrap();
        let d = c.decode();
        assert_eq!(d.labels().len(), 2, "every label is kept in the JSON");
        assert_eq!(d.annotations().len(), 1);
        assert!(d.metadata.managed_fields.is_none());
        assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));
        let status = d.status.unwrap();
        assert_eq!(status.ready_replicas, Some(2));
        assert!(status.conditions.is_none(), "slimmed");
        let v = c.value();
        assert_eq!(v["metadata"]["labels"]["app.kubernetes.io/name"], "orders");
        assert!(v["metadata"].get("managedFields").is_none());
    }

    #[test]
    fn watch_events_and_lists_deserialize_into_compact_objects() {
        let event: kube::core::WatchEvent<Compact<Pod>> = serde_json::from_value(json!({
            "type": "ADDED",
            "object": {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": "p", "namespace": "shop", "resourceVersion": "9"},
                       "spec": {"hostNetwork": true, "containers": [{"name": "c", "image": "x"}]},
                       "status": {"phase": "Pending"}}
        }))
        .unwrap();
        let kube::core::WatchEvent::Added(pod) = event else {
            panic!("an ADDED event")
        };
        let p = pod.decode();
        assert_eq!(p.spec.unwrap().host_network, Some(true));
        assert!(p.status.is_none(), "slimmed");
    }

    #[test]
    fn only_changes_of_what_is_kept_change_the_content_hash() {
        let hash = |v: serde_json::Value| {
            serde_json::from_value::<Compact<Pod>>(v)
                .unwrap()
                .content_hash()
        };
        let pod = |rv: &str, phase: &str, host_network: bool| {
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "p", "namespace": "shop", "resourceVersion": rv},
                   "spec": {"hostNetwork": host_network, "containers": [{"name": "c", "image": "x"}]},
                   "status": {"phase": phase}})
        };
        let first = hash(pod("1", "Pending", false));
        assert_eq!(
            first,
            hash(pod("2", "Running", false)),
            "status and resourceVersion"
        );
        assert_ne!(first, hash(pod("3", "Running", true)), "hostNetwork");
    }

    #[test]
    fn a_compact_object_is_much_smaller_than_the_json_it_came_from() {
        let full = deployment_json().to_string().len();
        let c: Compact<Deployment> = serde_json::from_value(deployment_json()).unwrap();
        assert!(c.json_len() < full, "{} of {full} bytes", c.json_len());
        assert!(c.packed_len() < c.json_len());
    }

    /// Two stacks' objects as the operator builds them: every object of the second decodes to
    /// what it was, and compressed against the dictionaries (whichever object of the kind set
    /// them first, in this test or another of this process) they keep a fraction of their JSON.
    #[test]
    fn objects_of_a_kind_compress_against_the_kinds_dictionary_and_decode_whole() {
        use crate::build::BuildOptions;
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/opsconductor.yaml"
        ))
        .unwrap();
        let bundle = |ns: &str| {
            crate::render::bundle_for("opsconductor.yaml", &text, ns, &BuildOptions::default())
                .unwrap()
        };
        fn kind<K>(first: &[K], second: &[K]) -> (usize, usize)
        where
            K: Resource<DynamicType = ()>
                + Clone
                + Serialize
                + DeserializeOwned
                + Slim
                + PartialEq
                + fmt::Debug,
        {
            for object in first {
                let _ = Compact::new(object.clone());
            }
            let (mut json, mut packed) = (0, 0);
            for object in second {
                let c = Compact::new(object.clone());
                assert_eq!(&c.decode(), object);
                json += c.json_len();
                packed += c.packed_len();
            }
            (json, packed)
        }
        let (a, b) = (bundle("team-a"), bundle("team-b"));
        let sizes = [
            (
                "ServiceAccount",
                kind(&a.service_accounts, &b.service_accounts),
            ),
            ("ConfigMap", kind(&a.config_maps, &b.config_maps)),
            (
                "NetworkPolicy",
                kind(&a.network_policies, &b.network_policies),
            ),
            ("Deployment", kind(&a.deployments, &b.deployments)),
            ("Service", kind(&a.services, &b.services)),
        ];
        let (mut json, mut packed) = (0, 0);
        for (name, (j, p)) in sizes {
            println!("{name}: {j} bytes of JSON kept as {p}");
            assert!(p < j, "{name}: {p} of {j} bytes");
            json += j;
            packed += p;
        }
        println!("all: {json} bytes of JSON kept as {packed}");
        assert!(packed * 3 < json, "{packed} of {json} bytes");
    }

    #[test]
    fn a_dictionary_keeps_a_few_versions_and_stops_growing_at_its_limit() {
        let dictionary = Dictionary::new();
        let mut versions: Vec<Arc<[u8]>> = Vec::new();
        for i in 0..200 {
            let json = format!("{{\"object\":{i},\"pad\":\"{}\"}}", "x".repeat(700));
            if let Some(v) = dictionary.version_for(json.as_bytes())
                && !versions.last().is_some_and(|last| Arc::ptr_eq(last, &v))
            {
                versions.push(v);
            }
        }
        let sizes: Vec<usize> = versions.iter().map(|v| v.len()).collect();
        assert!(sizes.len() <= 5, "{sizes:?}");
        assert!(
            sizes
                .windows(2)
                .all(|w| w[1] >= 2 * w[0] || w[1] == Dictionary::MAX),
            "{sizes:?}"
        );
        assert_eq!(sizes.last(), Some(&Dictionary::MAX));
    }
}
