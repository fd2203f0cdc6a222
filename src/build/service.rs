//! Objects for one internal service: its ServiceAccount, hardened Deployment and ClusterIP
//! Service. Plain HTTP on one port; nothing here can be reached from outside the cluster.

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapProjection, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, Lifecycle, LifecycleHandler, PodSecurityContext, PodSpec, PodTemplateSpec,
    ProjectedVolumeSource, SeccompProfile, SecurityContext, Service, ServiceAccount,
    ServiceAccountTokenProjection, ServicePort, ServiceSpec, SleepAction, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{IdentityKeys, meta};

/// Seconds a service's pod keeps serving after its termination starts, before the kubelet
/// sends the stop signal (the `preStop` sleep): the time kube-proxy on each node takes to
/// stop sending it new connections. The pod's termination grace (30 s by default) covers it.
pub const PRE_STOP_SECONDS: i64 = 5;
use crate::model::{self, ServiceIdentity, Stack};
use crate::names::{self, Component};

/// Where a service container finds its identity (with `spec.serviceIdentity.enabled`): one
/// read-only projected volume holding the token and the stack's identity ConfigMap.
pub const IDENTITY_DIR: &str = "/var/run/secrets/opsconductor.io/identity";
/// The token's file name in [`IDENTITY_DIR`]; the kubelet replaces it before it expires.
pub const IDENTITY_TOKEN_FILE: &str = "token";
/// The environment variables a service container gets with `spec.serviceIdentity.enabled`:
/// the token's path, the stack's audience, the path of the API server's token signing keys
/// (a JWKS) and the path of the token issuer. A service's own `env` may not use these names.
pub const IDENTITY_ENV: [&str; 4] = [
    "OPSC_IDENTITY_TOKEN_FILE",
    "OPSC_IDENTITY_AUDIENCE",
    "OPSC_IDENTITY_JWKS_FILE",
    "OPSC_IDENTITY_ISSUER_FILE",
];
/// Keys of the identity ConfigMap (`<stack>-identity`): the audience always; the issuer and
/// the keys once the operator has read them from the API server.
pub const IDENTITY_AUDIENCE_KEY: &str = "audience";
pub const IDENTITY_ISSUER_KEY: &str = "issuer";
pub const IDENTITY_JWKS_KEY: &str = "jwks.json";
const IDENTITY_VOLUME: &str = "identity";

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
        env: {
            let mut env = svc.env.clone();
            if let Some(identity) = &stack.service_identity {
                env.extend(identity_env(identity));
            }
            (!env.is_empty()).then_some(env)
        },
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
        volume_mounts: Some({
            let mut mounts = vec![VolumeMount {
                name: "tmp".into(),
                mount_path: "/tmp".into(),
                ..VolumeMount::default()
            }];
            if stack.service_identity.is_some() {
                mounts.push(VolumeMount {
                    name: IDENTITY_VOLUME.into(),
                    mount_path: IDENTITY_DIR.into(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                });
            }
            mounts
        }),
        ..Container::default()
    };
    // A read-only root filesystem still needs somewhere to write temp files.
    let mut volumes = vec![Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                "64Mi".into(),
            )),
            ..EmptyDirVolumeSource::default()
        }),
        ..Volume::default()
    }];
    if let Some(identity) = &stack.service_identity {
        volumes.push(identity_volume(stack, identity));
    }
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
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// The environment of a service container with identity on (see [`IDENTITY_ENV`]).
fn identity_env(identity: &ServiceIdentity) -> Vec<EnvVar> {
    let [token, audience, jwks, issuer] = IDENTITY_ENV;
    let var = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..EnvVar::default()
    };
    vec![
        var(token, format!("{IDENTITY_DIR}/{IDENTITY_TOKEN_FILE}")),
        var(audience, identity.audience.clone()),
        var(jwks, format!("{IDENTITY_DIR}/{IDENTITY_JWKS_KEY}")),
        var(issuer, format!("{IDENTITY_DIR}/{IDENTITY_ISSUER_KEY}")),
    ]
}

/// The identity volume: the kubelet's token for the pod's own ServiceAccount, bound to the
/// stack's audience (so that the API server and every other audience refuse it), renewed by
/// the kubelet at 80% of its lifetime; beside it the stack's identity ConfigMap (audience,
/// issuer, signing keys), so that a callee verifies a caller's token offline. No API server
/// CA, no namespace file: the token is not for the API server.
fn identity_volume(stack: &Stack, identity: &ServiceIdentity) -> Volume {
    Volume {
        name: IDENTITY_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![
                VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(identity.audience.clone()),
                        expiration_seconds: Some(identity.expiration_seconds),
                        path: IDENTITY_TOKEN_FILE.into(),
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: names::identity_config(&stack.name),
                        ..ConfigMapProjection::default()
                    }),
                    ..VolumeProjection::default()
                },
            ]),
            ..ProjectedVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// The stack's identity ConfigMap (`<stack>-identity`), with identity on: the audience, and
/// the API server's issuer and token signing keys once the operator has read them (`keys`;
/// the offline `render` has none). Services read it through their identity volume.
pub fn identity_config_map(
    stack: &Stack,
    identity: &ServiceIdentity,
    keys: Option<&IdentityKeys>,
) -> ConfigMap {
    let mut data = BTreeMap::from([(IDENTITY_AUDIENCE_KEY.to_string(), identity.audience.clone())]);
    if let Some(keys) = keys {
        data.insert(IDENTITY_ISSUER_KEY.into(), keys.issuer.clone());
        data.insert(IDENTITY_JWKS_KEY.into(), keys.jwks.clone());
    }
    ConfigMap {
        metadata: meta(
            stack,
            names::identity_config(&stack.name),
            Component::Identity,
        ),
        data: Some(data),
        ..ConfigMap::default()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{BuildOptions, build};
    use serde_json::{Value, json};

    fn stack(identity: &str) -> Stack {
        let yaml = format!(
            "apiVersion: opsconductor.io/v1alpha1\nkind: OpsConductorStack\n\
             metadata: {{name: shop, namespace: team-a}}\nspec:\n  gateway: {{hosts: [a.example.com]}}\n\
             \x20 tls: {{secretName: cert}}\n\
             \x20 services: [{{name: web, image: x, route: /, calls: [api], env: [{{name: A, value: b}}]}}, {{name: api, image: y}}]\n{identity}"
        );
        let raw: crate::crd::OpsConductorStack = serde_yaml::from_str(&yaml).unwrap();
        crate::validate::validate(&raw, "default").unwrap()
    }

    fn pod(bundle: &crate::build::Bundle, name: &str) -> Value {
        let d = bundle
            .deployments
            .iter()
            .find(|d| d.metadata.name.as_deref() == Some(name))
            .unwrap();
        serde_json::to_value(d).unwrap()["spec"]["template"]["spec"].clone()
    }

    #[test]
    fn without_identity_no_token_is_mounted_and_nothing_changes() {
        let bundle = build(&stack(""), &BuildOptions::default());
        for name in ["web", "api"] {
            let pod = pod(&bundle, name);
            assert_eq!(pod["automountServiceAccountToken"], json!(false));
            assert_eq!(pod["volumes"].as_array().unwrap().len(), 1, "only /tmp");
            let env = &pod["containers"][0]["env"];
            assert!(
                env.as_array().is_none_or(|e| e
                    .iter()
                    .all(|v| !v["name"].as_str().unwrap().starts_with("OPSC_"))),
                "{env}"
            );
        }
        assert!(
            bundle
                .config_maps
                .iter()
                .all(|c| c.metadata.name.as_deref() != Some("shop-identity"))
        );
        // Disabled explicitly: the same objects as without the section.
        assert_eq!(
            build(
                &stack("  serviceIdentity: {enabled: false, expirationSeconds: 900}\n"),
                &BuildOptions::default()
            ),
            bundle
        );
    }

    #[test]
    fn identity_mounts_an_audience_bound_token_read_only_and_keeps_the_hardening() {
        let with = stack("  serviceIdentity: {enabled: true, expirationSeconds: 900}\n");
        let keys = IdentityKeys {
            issuer: "https://kubernetes.default.svc.cluster.local".into(),
            jwks: r#"{"keys":[{"kid":"k"}]}"#.into(),
        };
        let bundle = build(
            &with,
            &BuildOptions {
                identity_keys: Some(keys.clone()),
                ..BuildOptions::default()
            },
        );
        for name in ["web", "api"] {
            let pod = pod(&bundle, name);
            // Never the default token (API audience, CA, namespace): only the projected one.
            assert_eq!(pod["automountServiceAccountToken"], json!(false));
            assert_eq!(pod["serviceAccountName"], json!(name));
            let volume = pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == "identity")
                .unwrap()
                .clone();
            assert_eq!(
                volume["projected"]["sources"],
                json!([
                    {"serviceAccountToken": {
                        "audience": "opsconductor.io/team-a/shop",
                        "expirationSeconds": 900,
                        "path": "token"
                    }},
                    {"configMap": {"name": "shop-identity"}}
                ])
            );
            let c = &pod["containers"][0];
            let mount = c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == "identity")
                .unwrap();
            assert_eq!(mount["mountPath"], json!(IDENTITY_DIR));
            assert_eq!(mount["readOnly"], json!(true));
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], json!(true));
            assert_eq!(sc["runAsNonRoot"], json!(true));
            assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
            let env: Vec<(String, String)> = c["env"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e["name"].as_str().unwrap().to_string(),
                        e["value"].as_str().unwrap().to_string(),
                    )
                })
                .collect();
            let dir = IDENTITY_DIR;
            let mut expected = vec![];
            if name == "web" {
                expected.push(("A".to_string(), "b".to_string()));
            }
            expected.extend([
                ("OPSC_IDENTITY_TOKEN_FILE".into(), format!("{dir}/token")),
                (
                    "OPSC_IDENTITY_AUDIENCE".into(),
                    "opsconductor.io/team-a/shop".into(),
                ),
                ("OPSC_IDENTITY_JWKS_FILE".into(), format!("{dir}/jwks.json")),
                ("OPSC_IDENTITY_ISSUER_FILE".into(), format!("{dir}/issuer")),
            ]);
            assert_eq!(env, expected);
        }
        // The gateway calls nobody on its own behalf: no token there.
        let gateway = pod(&bundle, "shop-gateway");
        assert_eq!(gateway["automountServiceAccountToken"], json!(false));
        assert!(!gateway.to_string().contains("serviceAccountToken"));
        // The ServiceAccounts still never automount.
        for sa in &bundle.service_accounts {
            assert_eq!(sa.automount_service_account_token, Some(false));
        }
        let cm = bundle
            .config_maps
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some("shop-identity"))
            .unwrap();
        let data = cm.data.as_ref().unwrap();
        assert_eq!(data["audience"], "opsconductor.io/team-a/shop");
        assert_eq!(data["issuer"], keys.issuer);
        assert_eq!(data["jwks.json"], keys.jwks);
        assert_eq!(cm.metadata.namespace.as_deref(), Some("team-a"));

        // Offline (render): the audience only, the keys come from the operator.
        let offline = build(&with, &BuildOptions::default());
        let cm = offline
            .config_maps
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some("shop-identity"))
            .unwrap();
        assert_eq!(
            cm.data.as_ref().unwrap().keys().collect::<Vec<_>>(),
            ["audience"]
        );
        // NetworkPolicies do not change: verification needs no egress to the API server.
        assert_eq!(
            offline.network_policies,
            build(&stack(""), &BuildOptions::default()).network_policies
        );
    }
}
