//! The edge settings of issue 18 against the real API server and the real operator binary:
//! `serviceType: ClusterIP` (a gateway behind an ingress or load balancer that already
//! exists), `proxyProtocol`, `trustedProxies` and `stripRequestHeaders`. What nginx does with
//! them is proven in `tests/gateway_nginx.rs`; here: the API server keeps the fields, the
//! operator refuses bad values with their field paths, and what the operator applies is what
//! the API server accepts, also when a running stack switches its gateway Service's type.

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::Api;
use kube::api::PostParams;
use opsconductor_operator::crd::{GatewayServiceType, OpsConductorStack};
use serde_json::{Value, json};
use support::TestNamespace;
use support::operator::{apply_stack, example, install_crd, operator};

const WAIT: Duration = Duration::from_secs(60);

/// Polls `check` on the object `name` until it returns `Ok`; on timeout, panics with the last
/// `Err` (what was found instead).
async fn until<K, F>(api: &Api<K>, name: &str, what: &str, check: F)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    F: Fn(&K) -> Result<(), String>,
{
    let start = std::time::Instant::now();
    loop {
        let last = match api.get_opt(name).await {
            Ok(Some(obj)) => match check(&obj) {
                Ok(()) => return,
                Err(e) => e,
            },
            Ok(None) => format!("{name} does not exist"),
            Err(e) => e.to_string(),
        };
        assert!(start.elapsed() < WAIT, "{what}: {last}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn service_shape(svc: &Service) -> (String, Option<String>, Vec<i32>) {
    let spec = svc.spec.clone().unwrap_or_default();
    (
        spec.type_.unwrap_or_default(),
        spec.external_traffic_policy,
        spec.ports
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p.node_port)
            .collect(),
    )
}

#[tokio::test]
async fn the_gateway_service_follows_service_type_to_cluster_ip_and_back() {
    let Some(ns) = TestNamespace::new("gateway-edge").await else {
        return;
    };
    operator().await.unwrap();
    let services: Api<Service> = ns.api();
    let deployments: Api<Deployment> = ns.api();
    let config_maps: Api<ConfigMap> = ns.api();
    let mut stack = example("minimal.yaml", &ns.name);
    apply_stack(&ns.client, &stack).await;
    until(
        &services,
        "hello-gateway",
        "LoadBalancer first",
        |s| match service_shape(s) {
            (t, Some(p), ports) if t == "LoadBalancer" && p == "Local" && ports.len() == 2 => {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        },
    )
    .await;

    // Behind an existing ingress: ClusterIP, which the API server takes only without
    // externalTrafficPolicy, and without the node ports the LoadBalancer had.
    stack.spec.gateway.service_type = GatewayServiceType::ClusterIp;
    apply_stack(&ns.client, &stack).await;
    until(
        &services,
        "hello-gateway",
        "ClusterIP",
        |s| match service_shape(s) {
            (t, None, ports) if t == "ClusterIP" && ports.is_empty() => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;

    // The PROXY protocol from a trusted proxy: nginx expects it on 8080/8443, and the
    // probes move to 8081.
    stack.spec.gateway.proxy_protocol = true;
    stack.spec.gateway.trusted_proxies = vec!["10.0.0.0/8".into()];
    stack.spec.gateway.strip_request_headers = vec!["X-User-Id".into()];
    apply_stack(&ns.client, &stack).await;
    until(&config_maps, "hello-gateway-config", "nginx.conf", |c| {
        let conf = c
            .data
            .as_ref()
            .and_then(|d| d.get("nginx.conf"))
            .cloned()
            .unwrap_or_default();
        let want = [
            "listen 8443 ssl http2 proxy_protocol default_server;",
            "listen 8080 proxy_protocol default_server;",
            "listen 8081 default_server;",
            "set_real_ip_from 10.0.0.0/8;",
            "real_ip_header proxy_protocol;",
            "proxy_set_header x-user-id \"\";",
        ];
        match want.iter().find(|w| !conf.contains(*w)) {
            None => Ok(()),
            Some(w) => Err(format!("no {w:?} yet")),
        }
    })
    .await;
    until(&deployments, "hello-gateway", "probes on 8081", |d| {
        let c = &d
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0];
        let ports: Vec<Value> = [&c.readiness_probe, &c.liveness_probe]
            .iter()
            .map(|p| {
                json!(
                    p.as_ref()
                        .and_then(|p| p.http_get.as_ref())
                        .map(|h| &h.port)
                )
            })
            .collect();
        if ports == [json!(8081), json!(8081)] {
            Ok(())
        } else {
            Err(format!("{ports:?}"))
        }
    })
    .await;

    // And back to a load balancer.
    stack.spec.gateway.service_type = GatewayServiceType::LoadBalancer;
    apply_stack(&ns.client, &stack).await;
    until(
        &services,
        "hello-gateway",
        "LoadBalancer again",
        |s| match service_shape(s) {
            (t, Some(p), ports) if t == "LoadBalancer" && p == "Local" && ports.len() == 2 => {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    // Nothing the operator reports about its own gateway Service.
    let stacks: Api<OpsConductorStack> = ns.api();
    until(&stacks, "hello", "no violations", |s| {
        let st = s.status.clone().unwrap_or_default();
        match st.violation_count {
            Some(0) if st.violations.is_empty() => Ok(()),
            n => Err(format!("{n:?}: {:?}", st.violations)),
        }
    })
    .await;
}

/// Runs `render -f` on `v`: (exit code, stderr).
fn render(v: &Value) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stack.yaml");
    std::fs::write(&file, serde_yaml::to_string(v).unwrap()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_opsconductor-operator"))
        .args(["render", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn edge_fields_are_kept_by_the_api_server_and_bad_values_refused_with_their_paths() {
    let Some(ns) = TestNamespace::new("gateway-edge-fields").await else {
        return;
    };
    install_crd(ns.control_plane).await;
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(
        ns.client.clone(),
        &ns.name,
        &kube::discovery::ApiResource::erase::<OpsConductorStack>(&()),
    );
    let stack = |name: &str, gateway: Value, tls: Value| -> kube::api::DynamicObject {
        let mut g = json!({"hosts": ["edge.example.com"]});
        g.as_object_mut()
            .unwrap()
            .extend(gateway.as_object().unwrap().clone());
        serde_json::from_value(json!({
            "apiVersion": "opsconductor.io/v1alpha1",
            "kind": "OpsConductorStack",
            "metadata": {"name": name, "namespace": ns.name},
            "spec": {
                "gateway": g,
                "tls": tls,
                "services": [{"name": "web", "image": "web:1", "route": "/"}],
            }
        }))
        .unwrap()
    };
    let own = json!({"secretName": "own"});
    let created = api
        .create(
            &PostParams::default(),
            &stack(
                "ok",
                json!({
                    "serviceType": "ClusterIP",
                    "proxyProtocol": true,
                    "trustedProxies": ["10.0.0.0/8", "fd00::/8"],
                    "stripRequestHeaders": ["X-User-Id"],
                }),
                own.clone(),
            ),
        )
        .await
        .unwrap();
    let stored = serde_json::to_value(&created).unwrap();
    let g = &stored["spec"]["gateway"];
    assert_eq!(g["serviceType"], "ClusterIP", "{g}");
    assert_eq!(g["proxyProtocol"], true, "{g}");
    assert_eq!(
        g["trustedProxies"],
        json!(["10.0.0.0/8", "fd00::/8"]),
        "{g}"
    );
    assert_eq!(g["stripRequestHeaders"], json!(["X-User-Id"]), "{g}");
    let (code, stderr) = render(&stored);
    assert_eq!(code, Some(0), "{stderr}");

    // The schema's limits and its CEL rule, at admission (the operator repeats them, for
    // `render` and for stacks stored under an older CRD).
    let long = "X".repeat(65);
    for (gateway, words) in [
        (
            json!({"stripRequestHeaders": [long]}),
            "stripRequestHeaders[0]",
        ),
        (
            json!({"stripRequestHeaders": ["X_Internal"]}),
            "stripRequestHeaders[0]",
        ),
        (json!({"serviceType": "ExternalName"}), "serviceType"),
        (
            json!({"proxyProtocol": true}),
            "proxyProtocol: true needs trustedProxies",
        ),
    ] {
        let err = api
            .create(
                &PostParams::default(),
                &stack("bad", gateway.clone(), own.clone()),
            )
            .await
            .expect_err("refused at admission");
        assert!(err.to_string().contains(words), "{gateway}: {err}");
    }

    // The operator's checks, each with its field path. Stored first: the API server takes
    // them all (they are the operator's rules, not the schema's).
    let acme = json!({"acme": {"directoryUrl": "https://acme.example.com/dir", "acceptTermsOfService": true}});
    let bad = api
        .create(
            &PostParams::default(),
            &stack(
                "refused",
                json!({
                    "proxyProtocol": true,
                    "trustedProxies": ["10.0.0.0/8", "0.0.0.0/0", "::/0", "10.0.0.1/8", "nope"],
                    "stripRequestHeaders": ["X-Internal", "Host", "x-user-id", "X-User-Id",
                                            "Content-Length", "X-Forwarded-For", "X-Service"],
                }),
                acme,
            ),
        )
        .await
        .unwrap();
    let (code, stderr) = render(&serde_json::to_value(&bad).unwrap());
    assert_eq!(code, Some(2), "{stderr}");
    for line in [
        "spec.gateway.trustedProxies[1]: \"0.0.0.0/0\" trusts every address",
        "spec.gateway.trustedProxies[2]: \"::/0\" trusts every address",
        "spec.gateway.trustedProxies[3]: \"10.0.0.1/8\" has host bits set",
        "spec.gateway.trustedProxies[4]: \"nope\" is not a CIDR",
        "spec.gateway.stripRequestHeaders[1]: \"Host\" is set by the gateway itself",
        "spec.gateway.stripRequestHeaders[3]: duplicate header \"X-User-Id\"",
        "spec.gateway.stripRequestHeaders[4]: \"Content-Length\" frames the request body",
        "spec.gateway.stripRequestHeaders[5]: \"X-Forwarded-For\" is set by the gateway itself",
    ] {
        assert!(stderr.contains(line), "missing {line:?} in:\n{stderr}");
    }
    // The PROXY protocol goes with ACME (HTTP-01 comes through the proxy that sends it).
    assert!(
        !stderr.contains("spec.gateway.proxyProtocol"),
        "proxyProtocol refused with tls.acme: {stderr}"
    );
    // Listing one of the headers that are always stripped is allowed (and changes nothing).
    for i in [0, 2, 6] {
        let path = format!("stripRequestHeaders[{i}]");
        assert!(!stderr.contains(&path), "{path}: {stderr}");
    }

    // What admission refuses, `render` refuses too, with the field path.
    let refused = stack(
        "offline",
        json!({"proxyProtocol": true, "stripRequestHeaders": ["X_Internal"]}),
        own,
    );
    let (code, stderr) = render(&serde_json::to_value(&refused).unwrap());
    assert_eq!(code, Some(2), "{stderr}");
    for line in [
        "spec.gateway.trustedProxies: proxyProtocol: true needs the addresses",
        "spec.gateway.stripRequestHeaders[0]: \"X_Internal\" contains '_'",
    ] {
        assert!(stderr.contains(line), "missing {line:?} in:\n{stderr}");
    }
}

/// Edge authentication, per-route limits and the Content-Security-Policy (issue 18): the API
/// server keeps the fields, its schema refuses what it can check (the CEL rule included), and
/// the operator refuses the rest with field paths, exactly as `render` does.
#[tokio::test]
async fn edge_policy_fields_are_kept_by_the_api_server_and_bad_values_refused() {
    let Some(ns) = TestNamespace::new("gateway-edge-policy").await else {
        return;
    };
    install_crd(ns.control_plane).await;
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(
        ns.client.clone(),
        &ns.name,
        &kube::discovery::ApiResource::erase::<OpsConductorStack>(&()),
    );
    let stack = |name: &str, gateway: Value, web: Value| -> kube::api::DynamicObject {
        let mut g = json!({"hosts": ["edge.example.com"]});
        g.as_object_mut()
            .unwrap()
            .extend(gateway.as_object().unwrap().clone());
        let mut w = json!({"name": "web", "image": "web:1", "route": "/"});
        w.as_object_mut()
            .unwrap()
            .extend(web.as_object().unwrap().clone());
        serde_json::from_value(json!({
            "apiVersion": "opsconductor.io/v1alpha1",
            "kind": "OpsConductorStack",
            "metadata": {"name": name, "namespace": ns.name},
            "spec": {
                "gateway": g,
                "tls": {"secretName": "own"},
                "services": [w, {"name": "auth", "image": "auth:1"}],
            }
        }))
        .unwrap()
    };
    let gateway = json!({
        "edgeAuth": {"service": "auth", "path": "/verify", "passHeaders": ["X-User-Id"], "cacheSeconds": 5},
        "contentSecurityPolicy": {"policy": "default-src 'self'; frame-ancestors 'none'", "reportOnly": true},
    });
    let web = json!({
        "edgeAuth": {"publicPaths": ["/login", "/public/"]},
        "routeLimits": {"requestsPerMinute": 30, "burst": 10, "concurrentRequestsPerClient": 4},
    });
    let created = api
        .create(
            &PostParams::default(),
            &stack("ok", gateway.clone(), web.clone()),
        )
        .await
        .unwrap();
    let stored = serde_json::to_value(&created).unwrap();
    assert_eq!(stored["spec"]["gateway"]["edgeAuth"], gateway["edgeAuth"]);
    assert_eq!(
        stored["spec"]["gateway"]["contentSecurityPolicy"],
        gateway["contentSecurityPolicy"]
    );
    assert_eq!(stored["spec"]["services"][0]["edgeAuth"], web["edgeAuth"]);
    assert_eq!(
        stored["spec"]["services"][0]["routeLimits"],
        web["routeLimits"]
    );
    let (code, stderr) = render(&stored);
    assert_eq!(code, Some(0), "{stderr}");

    // The schema's limits and the CEL rule, at admission.
    for (gateway, web, words) in [
        (
            json!({}),
            json!({"routeLimits": {"requestsPerSecond": 1, "requestsPerMinute": 1}}),
            "at most one of requestsPerSecond and requestsPerMinute",
        ),
        (
            json!({}),
            json!({"routeLimits": {"concurrentRequestsPerClient": 257}}),
            "concurrentRequestsPerClient",
        ),
        (
            json!({"edgeAuth": {"service": "auth", "path": "/v", "cacheSeconds": 301}}),
            json!({}),
            "cacheSeconds",
        ),
        (
            json!({"edgeAuth": {"service": "auth", "path": "/v", "passHeaders": ["X_User"]}}),
            json!({}),
            "passHeaders[0]",
        ),
        (
            json!({"contentSecurityPolicy": {"policy": "x".repeat(4097)}}),
            json!({}),
            "contentSecurityPolicy.policy",
        ),
    ] {
        let err = api
            .create(
                &PostParams::default(),
                &stack("bad", gateway.clone(), web.clone()),
            )
            .await
            .expect_err("refused at admission");
        assert!(err.to_string().contains(words), "{gateway} {web}: {err}");
    }

    // The operator's checks: stored by the API server, refused by `render` with field paths.
    let bad = api
        .create(
            &PostParams::default(),
            &stack(
                "refused",
                json!({
                    "edgeAuth": {"service": "nobody", "path": "/verify", "passHeaders": ["Authorization"]},
                    "contentSecurityPolicy": {"policy": "default-src 'self'\" always; return 200 \"x"},
                }),
                json!({
                    "edgeAuth": {"publicPaths": ["/login", "/login"]},
                    "routeLimits": {"burst": 3},
                }),
            ),
        )
        .await
        .unwrap();
    let (code, stderr) = render(&serde_json::to_value(&bad).unwrap());
    assert_eq!(code, Some(2), "{stderr}");
    for line in [
        "spec.gateway.edgeAuth.service: unknown service \"nobody\"",
        "spec.gateway.edgeAuth.passHeaders[0]: \"Authorization\" carries the client's own credentials",
        "spec.gateway.contentSecurityPolicy.policy: contains '\"'",
        "spec.services[0].edgeAuth.publicPaths[1]: \"/login\" is listed twice",
        "spec.services[0].routeLimits.burst: needs requestsPerSecond or requestsPerMinute",
    ] {
        assert!(stderr.contains(line), "missing {line:?} in:\n{stderr}");
    }
}
