//! Objects for one internal service: its ServiceAccount, hardened Deployment and ClusterIP
//! Service. Plain HTTP on one port; nothing here can be reached from outside the cluster.

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, Lifecycle, LifecycleHandler,
    PodSecurityContext, PodSpec, PodTemplateSpec, SeccompProfile, SecurityContext, Service,
    ServiceAccount, ServicePort, ServiceSpec, SleepAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::meta;

/// Seconds a service's pod keeps serving after its termination starts, before the kubelet
/// sends the stop signal (the `preStop` sleep): the time kube-proxy on each node takes to
/// stop sending it new connections. The pod's termination grace (30 s by default) covers it.
pub const PRE_STOP_SECONDS: i64 = 5;
use crate::model::{self, Stack};
use crate::names::{self, Component};

pub fn service_account(stack: &Stack, svc: &model::Service) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(stack, svc.name.to_string(), Component::Service(&svc.name)),
        // The services talk HTTP to each other, never to the API server.
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

pub fn deployment(stack: &Stack, svc: &model::Service) -> Deployment {
    let component = Component::Service(&svc.name);
    let selector = names::selector(&stack.name, component);
    let port = i32::from(svc.port);
    let probe =
        |failure_threshold| super::http_probe(&svc.health_path, port, 10, failure_threshold);
    let container = Container {
        name: svc.name.to_string(),
        image: Some(svc.image.clone()),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        env: (!svc.env.is_empty()).then(|| svc.env.clone()),
        resources: svc.resources.clone(),
        // Kept serving for a moment after its termination starts: the pod leaves the
        // Service's endpoints then, and kube-proxy on every node needs a moment to stop
        // sending new connections to it, while the gateway's kept-alive connections to it
        // are still in use. Only then does the kubelet send the stop signal. A `sleep`
        // action, so the image needs no shell (seen on the node: a backend pod deleted under
        // load cost one 502 without it).
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: PRE_STOP_SECONDS,
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        readiness_probe: Some(probe(3)),
        liveness_probe: Some(probe(6)),
        security_context: Some(container_security_context()),
        volume_mounts: Some(vec![VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    Deployment {
        metadata: meta(stack, svc.name.to_string(), component),
        spec: Some(DeploymentSpec {
            replicas: Some(svc.replicas),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(names::labels(&stack.name, component)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(svc.name.to_string()),
                    automount_service_account_token: Some(false),
                    // Explicit, so that the operator owns these fields and reverts a change.
                    host_network: Some(false),
                    host_pid: Some(false),
                    host_ipc: Some(false),
                    security_context: Some(pod_security_context()),
                    containers: vec![container],
                    // A read-only root filesystem still needs somewhere to write temp files.
                    volumes: Some(vec![Volume {
                        name: "tmp".into(),
                        empty_dir: Some(EmptyDirVolumeSource {
                            size_limit: Some(
                                k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                                    "64Mi".into(),
                                ),
                            ),
                            ..EmptyDirVolumeSource::default()
                        }),
                        ..Volume::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

pub fn service(stack: &Stack, svc: &model::Service) -> Service {
    let component = Component::Service(&svc.name);
    let port = i32::from(svc.port);
    Service {
        metadata: meta(stack, svc.name.to_string(), component),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            // Explicitly empty, so that the operator owns the field and removes any address
            // someone adds: an external IP would expose the service outside the gateway.
            external_ips: Some(vec![]),
            selector: Some(names::selector(&stack.name, component)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port,
                target_port: Some(IntOrString::Int(port)),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Pod-level hardening shared by every pod the operator creates.
pub(super) fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

/// Container-level hardening shared by every container the operator creates.
pub(super) fn container_security_context() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..SecurityContext::default()
    }
}
