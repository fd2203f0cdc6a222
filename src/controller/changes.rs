//! The change filter: which watch events are worth a reconcile.

use std::collections::HashMap;

use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use super::compact::{self, Compact};

/// Which watch events are worth a reconcile: an object that appears or goes, or one whose
/// cached content changed. A Pod's status, a Deployment's conditions or a managedFields-only
/// update change nothing the operator reads (the cache drops them), so they trigger nothing;
/// without this filter every pod status update in a stack namespace would reconcile the
/// stack, and a namespace busy enough would keep pushing the debounced reconcile back.
#[derive(Default)]
pub(super) struct Changes {
    /// Content hash of every object seen, by namespace/name.
    seen: HashMap<(Option<String>, String), u64>,
}

impl Changes {
    pub(super) fn triggers<K>(&mut self, event: watcher::Event<Compact<K>>) -> Option<Compact<K>>
    where
        K: Resource + serde::Serialize + serde::de::DeserializeOwned + compact::Slim,
    {
        let key = |o: &Compact<K>| (o.namespace(), o.name_any());
        match event {
            watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                let hash = o.content_hash();
                let before = self.seen.insert(key(&o), hash);
                (before != Some(hash)).then_some(o)
            }
            watcher::Event::Delete(o) => {
                self.seen.remove(&key(&o));
                Some(o)
            }
            // A (re)list starts over: what vanished meanwhile leaves no stale entry behind.
            watcher::Event::Init => {
                self.seen.clear();
                None
            }
            watcher::Event::InitDone => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;

    use super::*;

    #[test]
    fn only_appearing_changed_or_deleted_objects_trigger_a_reconcile() {
        let pod = |rv: &str, phase: &str, host_network: bool| -> Compact<Pod> {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "namespace": "shop", "resourceVersion": rv},
                "spec": {"hostNetwork": host_network, "containers": [{"name": "c"}]},
                "status": {"phase": phase}
            }))
            .unwrap()
        };
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let mut changes = Changes::default();
        let steps = [
            (Init, false),
            (InitApply(pod("1", "Pending", false)), true),
            (InitDone, false),
            // A status update: nothing the cache keeps changed.
            (Apply(pod("2", "Running", false)), false),
            (Apply(pod("3", "Running", true)), true),
            (Delete(pod("4", "Running", true)), true),
            // Back after a deletion: new again.
            (Apply(pod("5", "Running", true)), true),
        ];
        for (i, (event, fires)) in steps.into_iter().enumerate() {
            assert_eq!(changes.triggers(event).is_some(), fires, "step {i}");
        }
    }
}
