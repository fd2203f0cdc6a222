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
//! its own namespace when it reads them.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

/// The label prefix whose labels stay readable without decoding.
const OWN_LABEL_PREFIX: &str = "opsconductor.io/";
/// The kind whose owner references stay readable without decoding.
const STACK_KIND: &str = "OpsConductorStack";

/// What the cache drops of an object of this kind before keeping it (see [`super::slim`]).
pub trait Slim {
    fn slim(&mut self) {}
}

/// An object as the watch caches hold it (see the module docs).
pub struct Compact<K> {
    meta: ObjectMeta,
    /// Hash of the JSON: equal for two versions that differ only in what the cache drops.
    content_hash: u64,
    /// The `opsconductor.io/` labels (a map would take half a kilobyte for one entry).
    own_labels: Box<[(String, String)]>,
    json: Arc<[u8]>,
    kind: PhantomData<fn() -> K>,
}

impl<K> Clone for Compact<K> {
    fn clone(&self) -> Self {
        Self {
            meta: self.meta.clone(),
            content_hash: self.content_hash,
            own_labels: self.own_labels.clone(),
            json: self.json.clone(),
            kind: PhantomData,
        }
    }
}

impl<K> fmt::Debug for Compact<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Compact")
            .field("meta", &self.meta)
            .field("json_bytes", &self.json.len())
            .finish()
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
        let json: Arc<[u8]> = serde_json::to_vec(&object)
            .expect("a deserialized object serializes")
            .into();
        let content_hash = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            json.hash(&mut h);
            h.finish()
        };
        let m = object.meta_mut();
        let own_labels = m
            .labels
            .take()
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| k.starts_with(OWN_LABEL_PREFIX))
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
        Self {
            meta,
            content_hash,
            own_labels,
            json,
            kind: PhantomData,
        }
    }

    /// The value of an `opsconductor.io/` label (other labels are in the JSON only).
    pub fn label(&self, key: &str) -> Option<&str> {
        debug_assert!(key.starts_with(OWN_LABEL_PREFIX), "{key} is not kept");
        self.own_labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Equal for two versions of an object that differ only in what the cache drops
    /// (resourceVersion, managedFields, what [`Slim`] removes).
    pub fn content_hash(&self) -> u64 {
        self.content_hash
    }

    /// Bytes of JSON kept for this object.
    pub fn json_len(&self) -> usize {
        self.json.len()
    }

    /// The whole object (minus what the cache dropped, resourceVersion included: read a
    /// fresh object from the API server where it matters).
    pub fn decode(&self) -> K {
        // The bytes are our own serialization of a K: they always read back.
        serde_json::from_slice(&self.json).expect("a cached object decodes")
    }

    /// The whole object as JSON, for comparing with a desired object.
    pub fn value(&self) -> serde_json::Value {
        serde_json::from_slice(&self.json).expect("a cached object decodes")
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

impl Slim for k8s_openapi::api::core::v1::ServiceAccount {}
impl Slim for k8s_openapi::api::core::v1::ConfigMap {}
impl Slim for k8s_openapi::api::core::v1::Service {}
impl Slim for k8s_openapi::api::core::v1::Namespace {}
impl Slim for k8s_openapi::api::networking::v1::NetworkPolicy {}
impl Slim for k8s_openapi::api::networking::v1::Ingress {}
impl Slim for k8s_openapi::api::policy::v1::PodDisruptionBudget {}
impl Slim for k8s_openapi::api::core::v1::Pod {
    fn slim(&mut self) {
        super::slim::pod(self)
    }
}
impl Slim for k8s_openapi::api::apps::v1::Deployment {
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
        assert!(c.json.len() < full, "{} of {full} bytes", c.json.len());
    }
}
