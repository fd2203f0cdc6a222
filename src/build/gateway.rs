//! The gateway: nginx configuration, Deployment, the one external Service and its
//! disruption budget.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, ExecAction,
    Lifecycle, LifecycleHandler, PodSpec, PodTemplateSpec, ResourceRequirements,
    SecretVolumeSource, Service, ServiceAccount, ServicePort, ServiceSpec, SleepAction, Volume,
    VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::nginx::request_metrics;
use super::service::{container_security_context, pod_security_context};
use super::{BuildOptions, meta, nginx};
use crate::model::{CertificateSource, GatewayServiceType, Stack};
use crate::names::{self, Component};

/// The gateway container's requests and limits when the spec gives none: a small request so
/// that it schedules anywhere, and a memory limit so that a flood of connections (each TLS
/// connection holds buffers in nginx) ends in a restart of one pod, not in the node's memory.
/// No CPU limit: throttling stalls TLS handshakes; set one in `spec.gateway.resources`.
pub fn default_resources() -> ResourceRequirements {
    let q = |v: &str| Quantity(v.to_string());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), q("100m")),
            ("memory".to_string(), q("64Mi")),
        ])),
        limits: Some(BTreeMap::from([("memory".to_string(), q("512Mi"))])),
        ..ResourceRequirements::default()
    }
}

/// The user id the gateway runs as: the `nginx` user of the project's gateway image
/// (`images/gateway/make-rootfs`), the same uid as in the nginx-unprivileged images.
const NGINX_UID: i64 = 101;

/// The gateway container's command (POSIX sh, dash in the gateway image): nginx in the
/// foreground as PID 1, and a small loop beside it that applies a changed configuration or
/// certificate in place. The kubelet updates ConfigMap and Secret volumes in place (an atomic
/// symlink swap), so a new `nginx.conf` or a renewed certificate reaches running pods without
/// a restart. Every 2 s the loop takes the `cksum` of the three files; when it changed, it runs
/// `nginx -t` on them, and only if that passes `nginx -s reload`: nginx starts new workers
/// with the new files while the old ones finish their requests (graceful). Files that fail
/// `nginx -t` are never loaded: nginx keeps serving the previous ones, the loop logs why on
/// stderr and tries again at the next change (the operator's own checks normally prevent it:
/// see `docs/gateway.md`). The last result is in [`CONFIG_STATUS_PATH`]: `loaded <id>` or
/// `rejected <id>` with nginx's message on the lines after it, `<id>` the name the operator
/// wrote into the file ([`nginx::CONFIG_ID_PREFIX`]); it is replaced atomically (written
/// beside, then renamed), and nginx serves it to the operator on
/// [`nginx::CONFIG_STATUS_PORT`] for the `GatewayConfigLoaded` condition. The loop ends when
/// nginx does (its parent, read from `/proc/self/stat`, is the shell that became nginx by
/// `exec`), so it never outlives it where the container does not end with nginx (e.g. a test
/// running the command). See `docs/gateway.md` and `docs/acme.md`.
///
/// No `$$` and no `$(NAME)` with a NAME the container defines: the kubelet expands a
/// container's command before running it (`$$` becomes `$`, `$(NAME)` an environment
/// variable), so `kill -0 "$$"` ran as `kill -0 "$"` in a real pod, the loop ended after 2 s,
/// and a renewed certificate never reached a running gateway.
/// [`kubelet_expansion_leaves_the_command_alone`] guards it.
pub const RELOAD_ON_CHANGE: &str = r##"tls=/etc/opsconductor/tls
conf=/etc/opsconductor/config/nginx.conf
result=/tmp/opsconductor-config-status
digest() { cat "$conf" "$tls/tls.crt" "$tls/tls.key" 2>/dev/null | cksum; }
config_id() {
  n=0
  while [ "$n" -lt 5 ] && IFS= read -r line; do
    n=$((n + 1))
    case $line in "# opsconductor-config "*) echo "${line#"# opsconductor-config "}"; return ;; esac
  done < "$conf"
  echo none
}
report() { printf '%s %s\n%s\n' "$1" "$2" "$3" > "$result.new" && mv -f "$result.new" "$result"; }
(
  read -r _ _ _ nginx _ < /proc/self/stat
  last=$(digest)
  report loaded "$(config_id)" ""
  while sleep 2; do
    kill -0 "$nginx" 2>/dev/null || exit 0
    now=$(digest)
    [ "$now" = "$last" ] && continue
    id=$(config_id)
    if problem=$(nginx -t -q -c "$conf" 2>&1); then
      nginx -s reload -c "$conf" && last=$now && report loaded "$id" ""
    else
      last=$now
      report rejected "$id" "$problem"
      echo "opsconductor-gateway: the configuration test failed, not loaded (nginx keeps serving the previous files): $problem" >&2
    fi
  done
) &
exec nginx -c "$conf"
"##;

/// Where the reload loop writes the result of the last change it saw: `loaded <id>` or
/// `rejected <id>` and nginx's message (in the pod's emptyDir; nginx serves it on
/// [`nginx::CONFIG_STATUS_PORT`], and `kubectl exec ... cat` shows it).
pub const CONFIG_STATUS_PATH: &str = "/tmp/opsconductor-config-status";

/// Seconds the `preStop` hook waits before nginx is told to stop: the pod leaves the Service's
/// endpoints when its termination starts, and kube-proxy on every node, and a load balancer's
/// health check, need a moment to stop sending new connections to it. nginx keeps accepting
/// meanwhile. Then the kubelet sends the image's stop signal, SIGQUIT in the gateway image
/// (`STOPSIGNAL`): nginx's graceful shutdown.
pub const PRE_STOP_SECONDS: u32 = 10;

/// Seconds the kubelet waits for the pod to end after its termination starts: the `preStop`
/// wait, then the longest nginx lets requests in flight finish
/// ([`nginx::shutdown_timeout_seconds`]), and 5 s of margin. After that the kubelet kills.
pub fn termination_grace_seconds(stack: &Stack) -> i64 {
    i64::from(PRE_STOP_SECONDS) + i64::from(nginx::shutdown_timeout_seconds(stack)) + 5
}

/// The metrics port of the exporter beside nginx (`spec.gateway.metrics`): Prometheus scrapes
/// `/metrics` here, from where `allowFrom` says (the gateway's NetworkPolicy). Not in the
/// gateway Service (which is the stack's public entry point).
pub const METRICS_PORT: i32 = 9113;

/// The exporter's binary: nginx's Prometheus exporter as Debian builds it
/// (`prometheus-nginx-exporter`, in the project's gateway image).
pub const EXPORTER_BINARY: &str = "prometheus-nginx-exporter";

/// The exporter's arguments: it reads nginx's `stub_status` on the pod's loopback
/// ([`nginx::STATUS_PORT`]) at each scrape and serves `/metrics` on [`METRICS_PORT`]. It
/// exits when nginx does not answer when it starts, and both containers start together, so it
/// retries for up to a minute first.
pub fn exporter_args() -> Vec<String> {
    vec![
        format!(
            "--nginx.scrape-uri=http://127.0.0.1:{}{}",
            nginx::STATUS_PORT,
            nginx::STATUS_PATH
        ),
        format!("--web.listen-address=:{METRICS_PORT}"),
        "--web.telemetry-path=/metrics".into(),
        "--nginx.retries=60".into(),
        "--nginx.retry-interval=1s".into(),
    ]
}

/// Requests and limits of the exporter: it holds a few counters and answers a scrape every
/// few seconds (about 10 MiB resident, measured).
pub fn exporter_resources() -> ResourceRequirements {
    let q = |v: &str| Quantity(v.to_string());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), q("10m")),
            ("memory".to_string(), q("16Mi")),
        ])),
        limits: Some(BTreeMap::from([
            ("cpu".to_string(), q("100m")),
            ("memory".to_string(), q("64Mi")),
        ])),
        ..ResourceRequirements::default()
    }
}

/// The exporter sidecar, hardened like every container of the operator (non-root uid 101,
/// read-only root, no capabilities, no privilege escalation). No probes: the pod's readiness
/// is nginx's alone, so a failing exporter never takes a gateway out of service; if it exits,
/// the kubelet restarts it.
fn exporter_container(metrics: &crate::model::GatewayMetrics) -> Container {
    let mut security = container_security_context();
    security.run_as_user = Some(NGINX_UID);
    security.run_as_group = Some(NGINX_UID);
    Container {
        name: "exporter".into(),
        image: Some(metrics.image.clone()),
        command: Some(vec![EXPORTER_BINARY.into()]),
        args: Some(exporter_args()),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: METRICS_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        resources: Some(exporter_resources()),
        security_context: Some(security),
        ..Container::default()
    }
}

/// The port where the `requests` sidecar serves the requests by route and status class, and
/// latency (`spec.gateway.metrics`), beside [`METRICS_PORT`]: the same scrapers, the same rule.
pub const REQUEST_METRICS_PORT: i32 = 9114;

/// The `requests` sidecar's command: the operator's own binary, in the operator's image
/// ([`crate::crd::DEFAULT_OPERATOR_IMAGE`]), as `gateway-requests`
/// ([`crate::gateway_requests`]).
pub fn request_exporter_command() -> Vec<String> {
    vec![
        "/opsconductor-operator".into(),
        "gateway-requests".into(),
        format!("--udp=127.0.0.1:{}", request_metrics::REQUEST_LOG_PORT),
        format!("--listen=0.0.0.0:{REQUEST_METRICS_PORT}"),
    ]
}

/// Requests and limits of the `requests` sidecar: a few counters per route (at most
/// [`crate::gateway_requests::MAX_ROUTES`] routes), one thread reading datagrams and one
/// answering scrapes. The CPU limit keeps it from taking the gateway's CPU under load: past
/// what it can parse in that share, datagrams are dropped by the kernel, nginx never slowed.
pub fn request_exporter_resources() -> ResourceRequirements {
    let q = |v: &str| Quantity(v.to_string());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), q("10m")),
            ("memory".to_string(), q("8Mi")),
        ])),
        limits: Some(BTreeMap::from([
            ("cpu".to_string(), q("200m")),
            ("memory".to_string(), q("32Mi")),
        ])),
        ..ResourceRequirements::default()
    }
}

/// The `requests` sidecar, hardened like the other exporter: no volume, nothing written. Its
/// image is the operator's own ([`BuildOptions::requests_exporter_image`]).
fn request_exporter_container(options: &BuildOptions) -> Container {
    let mut security = container_security_context();
    security.run_as_user = Some(NGINX_UID);
    security.run_as_group = Some(NGINX_UID);
    Container {
        name: "requests".into(),
        image: Some(options.requests_exporter_image.clone()),
        command: Some(request_exporter_command()),
        // Waits as long as nginx's own `preStop`, so nginx's lines keep coming to a listener
        // while it still serves; at SIGTERM the exporter exits once they stop coming
        // ([`crate::gateway_requests::QUIET_BEFORE_EXIT`]). A `sleep` action: the image has no
        // shell.
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: i64::from(PRE_STOP_SECONDS),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        ports: Some(vec![ContainerPort {
            name: Some("requests".into()),
            container_port: REQUEST_METRICS_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        resources: Some(request_exporter_resources()),
        security_context: Some(security),
        ..Container::default()
    }
}

pub fn service_account(stack: &Stack) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(stack, names::gateway(&stack.name), Component::Gateway),
        // nginx never talks to the API server.
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

pub fn config_map(stack: &Stack, options: &BuildOptions) -> ConfigMap {
    ConfigMap {
        metadata: meta(
            stack,
            names::gateway_config(&stack.name),
            Component::Gateway,
        ),
        data: Some(BTreeMap::from([(
            nginx::CONFIG_KEY.to_string(),
            nginx::render(stack, options),
        )])),
        ..ConfigMap::default()
    }
}

/// The Secret the gateway serves its certificate from.
pub fn tls_secret_name(stack: &Stack) -> String {
    match &stack.tls.source {
        CertificateSource::Secret(name) => name.clone(),
        CertificateSource::Acme(_) => names::tls_secret(&stack.name),
    }
}

/// The gateway Deployment. The configuration is not part of the pod template (no checksum
/// annotation): a change of routes, hosts or limits reaches the running pods through the
/// ConfigMap volume and their reload loop, without a roll. What the template holds (image,
/// resources, ports, probes, the Secret's name) rolls the pods, one surge pod at a time,
/// each old pod drained (`preStop`, SIGQUIT, [`termination_grace_seconds`]).
pub fn deployment(stack: &Stack, options: &BuildOptions) -> Deployment {
    let component = Component::Gateway;
    // With the PROXY protocol on 8080, the probes go to a port of their own.
    let probe_port = if stack.gateway.proxy_protocol {
        nginx::HEALTH_PORT
    } else {
        nginx::HTTP_PORT
    };
    let probe =
        |failure_threshold| super::http_probe(nginx::HEALTH_PATH, probe_port, 5, failure_threshold);
    let port = |name: &str, port| ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    };
    let mount = |name: &str, path: &str, read_only| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    };
    // Cached verdicts of edge authentication are keyed on the clients' Authorization values:
    // a volume in memory of their own, so that those never reach the node's disk.
    let verdict_cache = stack.verdicts().is_some_and(|a| a.cache_seconds > 0);
    let mut security = container_security_context();
    security.run_as_user = Some(NGINX_UID);
    security.run_as_group = Some(NGINX_UID);
    let container = Container {
        name: "nginx".into(),
        image: Some(stack.gateway.image.clone()),
        // Bypasses the image's entrypoint scripts, which write into the read-only root.
        command: Some(vec![
            "sh".into(),
            "-c".into(),
            RELOAD_ON_CHANGE.into(),
            "opsconductor-gateway".into(),
        ]),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec!["sleep".into(), PRE_STOP_SECONDS.to_string()]),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        ports: Some(vec![
            port("http", nginx::HTTP_PORT),
            port("https", nginx::HTTPS_PORT),
            port("config-status", nginx::CONFIG_STATUS_PORT),
        ]),
        resources: Some(stack.gateway.resources.clone()),
        readiness_probe: Some(probe(2)),
        liveness_probe: Some(probe(6)),
        security_context: Some(security),
        volume_mounts: Some({
            let mut mounts = vec![
                mount("config", nginx::CONFIG_DIR, true),
                mount("tls", nginx::TLS_DIR, true),
                mount("tmp", "/tmp", false),
            ];
            if verdict_cache {
                mounts.push(mount("verdicts", nginx::VERDICT_CACHE_DIR, false));
            }
            mounts
        }),
        ..Container::default()
    };
    Deployment {
        metadata: meta(stack, names::gateway(&stack.name), component),
        spec: Some(DeploymentSpec {
            replicas: Some(stack.gateway.replicas),
            selector: LabelSelector {
                match_labels: Some(names::selector(&stack.name, component)),
                ..LabelSelector::default()
            },
            // Never fewer ready gateways than asked for during a roll.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(names::labels(&stack.name, component)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(names::gateway(&stack.name)),
                    automount_service_account_token: Some(false),
                    // Explicit, so that the operator owns these fields and reverts a change.
                    host_network: Some(false),
                    host_pid: Some(false),
                    host_ipc: Some(false),
                    security_context: Some(pod_security_context()),
                    containers: {
                        let mut containers = vec![container];
                        if let Some(metrics) = &stack.gateway.metrics {
                            containers.push(exporter_container(metrics));
                            containers.push(request_exporter_container(options));
                        }
                        containers
                    },
                    termination_grace_period_seconds: Some(termination_grace_seconds(stack)),
                    volumes: Some({
                        let mut volumes = vec![
                            Volume {
                                name: "config".into(),
                                config_map: Some(ConfigMapVolumeSource {
                                    name: names::gateway_config(&stack.name),
                                    ..ConfigMapVolumeSource::default()
                                }),
                                ..Volume::default()
                            },
                            Volume {
                                name: "tls".into(),
                                secret: Some(SecretVolumeSource {
                                    secret_name: Some(tls_secret_name(stack)),
                                    ..SecretVolumeSource::default()
                                }),
                                ..Volume::default()
                            },
                            Volume {
                                name: "tmp".into(),
                                empty_dir: Some(EmptyDirVolumeSource {
                                    size_limit: Some(Quantity("256Mi".into())),
                                    ..EmptyDirVolumeSource::default()
                                }),
                                ..Volume::default()
                            },
                        ];
                        if verdict_cache {
                            volumes.push(Volume {
                                name: "verdicts".into(),
                                empty_dir: Some(EmptyDirVolumeSource {
                                    medium: Some("Memory".into()),
                                    // nginx keeps the cache within 8 MiB (max_size).
                                    size_limit: Some(Quantity("16Mi".into())),
                                }),
                                ..Volume::default()
                            });
                        }
                        volumes
                    }),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

pub fn service(stack: &Stack) -> Service {
    let component = Component::Gateway;
    let port = |name: &str, port, target| ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(target)),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    };
    let (type_, source_ranges) = match stack.gateway.service_type {
        GatewayServiceType::LoadBalancer => {
            let ranges: Vec<String> = stack
                .gateway
                .allowed_source_ranges
                .iter()
                .map(ToString::to_string)
                .collect();
            ("LoadBalancer", (!ranges.is_empty()).then_some(ranges))
        }
        GatewayServiceType::NodePort => ("NodePort", None),
        GatewayServiceType::ClusterIp => ("ClusterIP", None),
    };
    // Keeps the client's address, which rate limiting and allowedSourceRanges need; the API
    // server refuses the field on a ClusterIP Service (only traffic from outside has it).
    let external_traffic_policy =
        (stack.gateway.service_type != GatewayServiceType::ClusterIp).then(|| "Local".to_string());
    Service {
        metadata: meta(stack, names::gateway(&stack.name), component),
        spec: Some(ServiceSpec {
            type_: Some(type_.into()),
            external_ips: Some(vec![]),
            selector: Some(names::selector(&stack.name, component)),
            ports: Some(vec![
                port("http", 80, nginx::HTTP_PORT),
                port("https", 443, nginx::HTTPS_PORT),
            ]),
            external_traffic_policy,
            load_balancer_source_ranges: source_ranges,
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

pub fn pod_disruption_budget(stack: &Stack) -> PodDisruptionBudget {
    let component = Component::Gateway;
    PodDisruptionBudget {
        metadata: meta(stack, names::gateway(&stack.name), component),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(names::selector(&stack.name, component)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reload_script_names_the_mounted_paths() {
        assert!(RELOAD_ON_CHANGE.contains(&format!("tls={}\n", nginx::TLS_DIR)));
        assert!(RELOAD_ON_CHANGE.contains(&format!("conf={}\n", nginx::CONFIG_PATH)));
        assert!(RELOAD_ON_CHANGE.contains(&format!("result={CONFIG_STATUS_PATH}\n")));
        assert!(CONFIG_STATUS_PATH.starts_with(&format!("{}/", nginx::TMP_DIR)));
        assert!(RELOAD_ON_CHANGE.ends_with("exec nginx -c \"$conf\"\n"));
    }

    /// What the kubelet does to a container's command and args before it runs them (the
    /// expansion of Kubernetes' `third_party/forked/golang/expansion`): `$$` becomes `$`, and
    /// `$(NAME)` becomes the value of the container's variable NAME when it has one. The
    /// gateway container has no variables, so only the first rule can change anything.
    fn kubelet_expansion(input: &str, env: &[(&str, &str)]) -> String {
        let mut out = String::new();
        let mut rest = input;
        while let Some(i) = rest.find('$') {
            out.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            if let Some(tail) = after.strip_prefix('$') {
                out.push('$');
                rest = tail;
            } else if let Some(inner) = after.strip_prefix('(')
                && let Some(end) = inner.find(')')
                && let Some((_, value)) = env.iter().find(|(k, _)| *k == &inner[..end])
            {
                out.push_str(value);
                rest = &inner[end + 1..];
            } else {
                out.push('$');
                rest = after;
            }
        }
        out.push_str(rest);
        out
    }

    fn built(gateway: &str, tls: &str) -> (Deployment, Service) {
        let yaml = format!(
            "apiVersion: opsconductor.io/v1alpha1\nkind: OpsConductorStack\n\
             metadata: {{name: t, namespace: ns}}\nspec:\n  gateway: {{hosts: [a.example.com]{gateway}}}\n\
             \x20 tls: {tls}\n  services: [{{name: web, image: x, route: /}}]\n"
        );
        let raw = crate::render::parse_stack("test", &yaml).unwrap();
        let stack = crate::validate::validate(&raw, "ns").unwrap();
        let options = crate::build::BuildOptions::default();
        let _ = config_map(&stack, &options);
        (deployment(&stack, &options), service(&stack))
    }

    #[test]
    fn with_the_proxy_protocol_the_probes_use_their_own_port() {
        let probe_ports = |d: &Deployment| {
            let c = &d
                .spec
                .as_ref()
                .unwrap()
                .template
                .spec
                .as_ref()
                .unwrap()
                .containers[0];
            [&c.readiness_probe, &c.liveness_probe]
                .map(|p| p.as_ref().unwrap().http_get.as_ref().unwrap().port.clone())
        };
        let (d, _) = built("", "{secretName: own}");
        let http = IntOrString::Int(nginx::HTTP_PORT);
        assert_eq!(probe_ports(&d), [http.clone(), http]);
        let (d, svc) = built(
            ", proxyProtocol: true, trustedProxies: [10.0.0.0/8]",
            "{secretName: own}",
        );
        let health = IntOrString::Int(nginx::HEALTH_PORT);
        assert_eq!(probe_ports(&d), [health.clone(), health]);
        // The probes' port is not exposed.
        let ports: Vec<i32> = svc
            .spec
            .unwrap()
            .ports
            .unwrap()
            .iter()
            .map(|p| p.port)
            .collect();
        assert_eq!(ports, [80, 443]);
    }

    const METRICS: &str = ", metrics: {enabled: true, allowFrom: [{namespaceSelector: {}}]}";

    #[test]
    fn the_metrics_exporter_is_a_hardened_sidecar_only_when_enabled() {
        let pod = |d: &Deployment| d.spec.clone().unwrap().template.spec.unwrap();
        let (d, svc) = built("", "{secretName: own}");
        assert_eq!(pod(&d).containers.len(), 1);
        let (with, svc_with) = built(METRICS, "{secretName: own}");
        // The gateway Service (public) never carries the metrics port.
        assert_eq!(svc, svc_with);
        let spec = pod(&with);
        assert_eq!(spec.containers.len(), 3);
        // The nginx container is the same with or without the exporter.
        assert_eq!(spec.containers[0], pod(&d).containers[0]);
        let e = &spec.containers[1];
        assert_eq!(e.name, "exporter");
        assert_eq!(e.image.as_deref(), Some(crate::crd::DEFAULT_GATEWAY_IMAGE));
        assert_eq!(e.command, Some(vec![EXPORTER_BINARY.to_string()]));
        assert!(
            e.args
                .iter()
                .flatten()
                .any(|a| a == "--nginx.scrape-uri=http://127.0.0.1:8082/stub_status")
        );
        let port = &e.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("metrics"), METRICS_PORT)
        );
        let sc = e.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.run_as_user, Some(NGINX_UID));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop,
            Some(vec!["ALL".to_string()])
        );
        let limits = e.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert!(limits.contains_key("memory") && limits.contains_key("cpu"));
        // Readiness is nginx's alone.
        assert!(e.readiness_probe.is_none() && e.liveness_probe.is_none());
        assert!(e.volume_mounts.is_none());

        // The `requests` sidecar: the operator's own binary and image, its port beside the
        // other exporter's, hardened the same way, nothing mounted.
        let r = &spec.containers[2];
        assert_eq!(r.name, "requests");
        assert_eq!(r.image.as_deref(), Some(crate::crd::DEFAULT_OPERATOR_IMAGE));
        assert_eq!(
            r.command.as_deref(),
            Some(
                &[
                    "/opsconductor-operator".to_string(),
                    "gateway-requests".into(),
                    "--udp=127.0.0.1:8083".into(),
                    "--listen=0.0.0.0:9114".into(),
                ][..]
            )
        );
        // Listening while nginx's `preStop` waits: the same wait, no shell needed.
        let sleep = r
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref()?.sleep.as_ref());
        assert_eq!(sleep.map(|s| s.seconds), Some(i64::from(PRE_STOP_SECONDS)));
        let port = &r.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("requests"), REQUEST_METRICS_PORT)
        );
        assert_eq!(r.security_context, e.security_context);
        let limits = r.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert!(limits.contains_key("memory") && limits.contains_key("cpu"));
        assert!(r.readiness_probe.is_none() && r.liveness_probe.is_none());
        assert!(r.volume_mounts.is_none());
        // Its image is the one the operator is told (its own, as the chart names it).
        let raw = crate::render::parse_stack(
            "test",
            "apiVersion: opsconductor.io/v1alpha1\nkind: OpsConductorStack\n\
             metadata: {name: t, namespace: ns}\nspec:\n  gateway: {hosts: [a.example.com], \
             metrics: {enabled: true, allowFrom: [{namespaceSelector: {}}]}}\n\
             \x20 tls: {secretName: own}\n  services: [{name: web, image: x, route: /}]\n",
        )
        .unwrap();
        let stack = crate::validate::validate(&raw, "ns").unwrap();
        let options = crate::build::BuildOptions {
            requests_exporter_image: "registry.example/mirror/operator:1".into(),
            ..crate::build::BuildOptions::default()
        };
        let mirrored = pod(&deployment(&stack, &options));
        assert_eq!(
            mirrored.containers[2].image.as_deref(),
            Some("registry.example/mirror/operator:1")
        );
        // The pod's volumes are the same with or without metrics.
        assert_eq!(spec.volumes, pod(&d).volumes);
    }

    #[test]
    fn a_cluster_ip_gateway_has_no_external_traffic_policy() {
        let (_, svc) = built(", serviceType: ClusterIP", "{secretName: own}");
        let spec = svc.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.external_traffic_policy, None);
        assert_eq!(spec.load_balancer_source_ranges, None);
        for ty in ["LoadBalancer", "NodePort"] {
            let (_, svc) = built(&format!(", serviceType: {ty}"), "{secretName: own}");
            let spec = svc.spec.unwrap();
            assert_eq!(spec.type_.as_deref(), Some(ty));
            assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
        }
    }

    #[test]
    fn kubelet_expansion_leaves_the_command_alone() {
        assert_eq!(kubelet_expansion("kill -0 \"$$\"", &[]), "kill -0 \"$\"");
        assert_eq!(kubelet_expansion("$(A) $(b c)", &[("A", "x")]), "x $(b c)");
        let yaml = "apiVersion: opsconductor.io/v1alpha1\nkind: OpsConductorStack\n\
                    metadata: {name: t, namespace: ns}\nspec:\n  gateway: {hosts: [a.example.com], \
                    metrics: {enabled: true, allowFrom: [{namespaceSelector: {}}]}}\n\
                    \x20 tls: {secretName: own}\n  services: [{name: web, image: x, route: /}]\n";
        let raw = crate::render::parse_stack("test", yaml).unwrap();
        let stack = crate::validate::validate(&raw, "ns").unwrap();
        let deployment = deployment(&stack, &crate::build::BuildOptions::default());
        let pod = deployment.spec.unwrap().template.spec.unwrap();
        // nginx with its reload loop, and the two metrics exporters.
        assert_eq!(pod.containers.len(), 3);
        for container in &pod.containers {
            assert_kubelet_leaves_alone(container);
        }
    }

    fn assert_kubelet_leaves_alone(container: &Container) {
        let env: Vec<(String, String)> = container
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let pre_stop = container
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|h| h.exec.as_ref())
            .and_then(|e| e.command.clone())
            .unwrap_or_default();
        assert!(container.name != "nginx" || !pre_stop.is_empty());
        for part in container
            .command
            .iter()
            .flatten()
            .chain(container.args.iter().flatten())
            .chain(pre_stop.iter())
        {
            assert_eq!(
                &kubelet_expansion(part, &env),
                part,
                "the kubelet would rewrite it"
            );
        }
    }
}
