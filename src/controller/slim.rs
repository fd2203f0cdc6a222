//! What the watch caches keep of each object: only what the operator reads.
//!
//! The caches are most of the operator's memory. The violation audit watches every Pod in
//! the cluster, and a Pod as the API server returns it (volumes, tolerations, status, env,
//! probes) is many times larger than the few fields the audit looks at, so those Pods are cut
//! down before they are cached. Deployments lose the parts of their status nobody reads.
//! managedFields are dropped from everything (see `child_watch!` in the controller).

use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EphemeralContainer, Pod, PodCondition, PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Keeps what [`crate::audit`] reads of a Pod: its identity and labels (NetworkPolicy and
/// backend selectors match them), `hostNetwork`, `hostPID`, and each container's name and
/// ports (for `hostPort`), ephemeral containers included. Of a gateway pod's status (labelled
/// as one of a stack's gateway pods) also the phase, the address, where the operator asks it
/// which configuration it loaded ([`super::config_status`]), and whether it is Ready (so that
/// the pod's becoming ready, when nginx listens, brings a reconcile that asks it); no other
/// pod keeps any status, so their status updates change nothing cached and trigger no
/// reconcile.
pub fn pod(pod: &mut Pod) {
    let meta = std::mem::take(&mut pod.metadata);
    let gateway = meta.labels.as_ref().is_some_and(|l| {
        l.contains_key(crate::names::STACK_LABEL)
            && l.get(crate::names::COMPONENT_LABEL).map(String::as_str) == Some("gateway")
    });
    pod.metadata = ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        labels: meta.labels,
        owner_references: meta.owner_references,
        deletion_timestamp: meta.deletion_timestamp,
        ..ObjectMeta::default()
    };
    pod.status = pod
        .status
        .take()
        .filter(|_| gateway)
        .map(|status| PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            conditions: status.conditions.map(|conditions| {
                conditions
                    .into_iter()
                    .filter(|c| c.type_ == "Ready")
                    .map(|c| PodCondition {
                        type_: c.type_,
                        status: c.status,
                        ..PodCondition::default()
                    })
                    .collect()
            }),
            ..PodStatus::default()
        });
    let Some(spec) = pod.spec.take() else { return };
    let ports = |ports: Option<Vec<ContainerPort>>| {
        ports.map(|ports| {
            ports
                .into_iter()
                .map(|p| ContainerPort {
                    container_port: p.container_port,
                    host_port: p.host_port,
                    protocol: p.protocol,
                    ..ContainerPort::default()
                })
                .collect()
        })
    };
    let containers = |list: Vec<Container>| -> Vec<Container> {
        list.into_iter()
            .map(|c| Container {
                name: c.name,
                ports: ports(c.ports),
                ..Container::default()
            })
            .collect()
    };
    pod.spec = Some(PodSpec {
        host_network: spec.host_network,
        host_pid: spec.host_pid,
        containers: containers(spec.containers),
        init_containers: spec.init_containers.map(containers),
        ephemeral_containers: spec.ephemeral_containers.map(|list| {
            list.into_iter()
                .map(|c| EphemeralContainer {
                    name: c.name,
                    ports: ports(c.ports),
                    ..EphemeralContainer::default()
                })
                .collect()
        }),
        ..PodSpec::default()
    });
}

/// Keeps what the status computation reads of a Deployment's status (the spec is compared
/// with the desired one and stays whole).
pub fn deployment(deployment: &mut Deployment) {
    if let Some(status) = deployment.status.take() {
        deployment.status = Some(DeploymentStatus {
            observed_generation: status.observed_generation,
            replicas: status.replicas,
            ready_replicas: status.ready_replicas,
            updated_replicas: status.updated_replicas,
            available_replicas: status.available_replicas,
            ..DeploymentStatus::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn full_pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "debug", "namespace": "shop", "uid": "u1",
                         "resourceVersion": "7", "labels": {"app": "orders"},
                         "annotations": {"big": "x".repeat(4096)},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                              "name": "orders-1", "uid": "u0"}]},
            "spec": {
                "hostNetwork": true, "hostPID": true,
                "containers": [{"name": "web", "image": "nginx", "env": [{"name": "A", "value": "1"}],
                                "ports": [{"name": "http", "containerPort": 80, "hostPort": 8080,
                                           "protocol": "TCP"}]}],
                "initContainers": [{"name": "setup", "image": "busybox",
                                    "ports": [{"containerPort": 1, "hostPort": 9}]}],
                "ephemeralContainers": [{"name": "dbg", "image": "busybox",
                                         "ports": [{"containerPort": 2, "hostPort": 7}]}],
                "volumes": [{"name": "v", "emptyDir": {}}],
                "tolerations": [{"key": "k", "operator": "Exists"}]
            },
            "status": {"phase": "Running", "podIP": "10.244.0.9", "podIPs": [{"ip": "10.244.0.9"}],
                       "hostIP": "10.250.0.1",
                       "conditions": [{"type": "Ready", "status": "True",
                                       "lastTransitionTime": "2026-01-01T00:00:00Z"},
                                      {"type": "PodScheduled", "status": "True"}],
                       "containerStatuses": [{"name": "web", "image": "nginx", "imageID": "x",
                                              "ready": true, "restartCount": 0}]}
        }))
        .unwrap()
    }

    #[test]
    fn a_slim_pod_keeps_what_the_audit_reads() {
        let mut p = full_pod();
        pod(&mut p);
        assert_eq!(p.metadata.name.as_deref(), Some("debug"));
        assert_eq!(p.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(p.metadata.labels.as_ref().unwrap()["app"], "orders");
        assert_eq!(p.metadata.owner_references.as_ref().unwrap().len(), 1);
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.host_network, Some(true));
        assert_eq!(spec.host_pid, Some(true));
        let port = &spec.containers[0].ports.as_ref().unwrap()[0];
        assert_eq!((port.container_port, port.host_port), (80, Some(8080)));
        let init = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(init.name, "setup");
        assert_eq!(init.ports.as_ref().unwrap()[0].host_port, Some(9));
        assert!(p.status.is_none(), "no status but a gateway pod's");
        // A stack's gateway pod keeps its phase and address.
        let mut g = full_pod();
        g.metadata.labels = Some(crate::names::selector(
            &crate::model::DnsLabel::parse("shop").unwrap(),
            crate::names::Component::Gateway,
        ));
        pod(&mut g);
        let status = g.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.244.0.9"));
        // Of the conditions only Ready, without its times.
        let conditions = status.conditions.as_ref().unwrap();
        assert_eq!(conditions.len(), 1);
        assert_eq!(
            (conditions[0].type_.as_str(), conditions[0].status.as_str()),
            ("Ready", "True")
        );
        assert!(conditions[0].last_transition_time.is_none());
        assert!(status.container_statuses.is_none());
        assert!(status.pod_ips.is_none() && status.host_ip.is_none());
    }

    #[test]
    fn a_slim_pod_drops_the_rest() {
        let mut p = full_pod();
        let before = serde_json::to_vec(&p).unwrap().len();
        pod(&mut p);
        assert!(p.status.is_none());
        assert!(p.metadata.annotations.is_none());
        let spec = p.spec.as_ref().unwrap();
        assert!(spec.volumes.is_none() && spec.tolerations.is_none());
        assert!(spec.containers[0].image.is_none() && spec.containers[0].env.is_none());
        let after = serde_json::to_vec(&p).unwrap().len();
        assert!(after * 5 < before, "{after} of {before} bytes kept");
    }

    /// The audit's verdict on a Pod is the same before and after slimming.
    #[test]
    fn the_audit_sees_a_slim_pod_as_it_sees_the_full_one() {
        let full = full_pod();
        let mut slim = full.clone();
        pod(&mut slim);
        assert_eq!(
            crate::audit::pod_findings(&full),
            crate::audit::pod_findings(&slim)
        );
        assert_eq!(crate::audit::pod_findings(&slim).len(), 3);
    }

    #[test]
    fn a_slim_deployment_keeps_its_spec_and_the_readiness_figures() {
        let mut d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "orders", "generation": 3},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "orders"}},
                     "template": {"metadata": {"labels": {"app": "orders"}},
                                  "spec": {"containers": [{"name": "app", "image": "x"}]}}},
            "status": {"observedGeneration": 3, "replicas": 2, "readyReplicas": 1,
                       "updatedReplicas": 2, "availableReplicas": 1,
                       "conditions": [{"type": "Available", "status": "False",
                                       "message": "x".repeat(2048)}]}
        }))
        .unwrap();
        let spec = d.spec.clone();
        deployment(&mut d);
        assert_eq!(d.spec, spec);
        let s = d.status.unwrap();
        assert_eq!(
            (s.observed_generation, s.replicas, s.ready_replicas),
            (Some(3), Some(2), Some(1))
        );
        assert!(s.conditions.is_none());
    }
}
