//! Tests of the rendered configuration as a whole (real nginx loads it in
//! `tests/gateway_nginx.rs`).

use super::http_context::server_names_hash_bucket_size;
use super::*;
use crate::build::Upstreams;
use crate::render::parse_stack;
use crate::validate::validate;

fn stack(yaml: &str) -> Stack {
    validate(&parse_stack("test", yaml).unwrap(), "default").unwrap()
}

const TWO_ROUTES: &str = r#"
apiVersion: opsconductor.io/v1alpha1
kind: OpsConductorStack
metadata: {name: t, namespace: ns}
spec:
  gateway:
    hosts: [a.example.com, b.example.com]
    rateLimit: {requestsPerSecond: 5, burst: 7}
    hsts: {maxAgeSeconds: 600, includeSubDomains: false}
    clientMaxBodySize: 3m
  tls: {secretName: own}
  services:
    - {name: api-v2, image: x, port: 9000, route: /api/}
    - {name: web, image: x, route: /}
    - {name: worker, image: x}
"#;

/// The operator's mode: the ClusterIP of `api-v2` and `web` (`worker` is not routed).
fn with_cluster_ips() -> BuildOptions {
    BuildOptions {
        upstreams: Upstreams::ClusterIps(
            [
                ("api-v2", "10.96.0.21"),
                ("web", "fd00::22"),
                ("worker", "10.96.0.23"),
            ]
            .into_iter()
            .map(|(n, ip)| (n.to_string(), ip.parse().unwrap()))
            .collect(),
        ),
        ..BuildOptions::default()
    }
}

/// The text of each `location` block, by its header line.
fn locations(conf: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = conf.lines();
    while let Some(line) = lines.next() {
        let t = line.trim();
        if t.starts_with("location ") && t.ends_with('{') {
            let mut body = String::new();
            for l in lines.by_ref() {
                if l.trim() == "}" {
                    break;
                }
                body.push_str(l.trim());
                body.push('\n');
            }
            out.push((t.to_string(), body));
        }
    }
    out
}

#[test]
fn no_location_sets_headers_that_would_drop_the_server_ones() {
    for options in [BuildOptions::default(), with_cluster_ips()] {
        let conf = render(&stack(TWO_ROUTES), &options);
        let locs = locations(&conf);
        assert!(locs.len() >= 4, "{locs:?}");
        for (head, body) in locs {
            assert!(!body.contains("add_header"), "{head}: {body}");
            assert!(!body.contains("proxy_set_header"), "{head}: {body}");
        }
    }
}

#[test]
fn security_headers_and_spec_values() {
    let conf = render(&stack(TWO_ROUTES), &BuildOptions::default());
    for needle in [
        "add_header Strict-Transport-Security \"max-age=600\" always;",
        "add_header X-Content-Type-Options \"nosniff\" always;",
        "add_header X-Frame-Options \"DENY\" always;",
        "add_header Referrer-Policy \"strict-origin-when-cross-origin\" always;",
        "client_max_body_size 3m;",
        "rate=5r/s;",
        "limit_req zone=opsconductor_per_client burst=7 nodelay;",
        "add_header Retry-After $opsconductor_retry_after always;",
        "server_name a.example.com b.example.com;",
        "proxy_connect_timeout 15s;",
        "proxy_read_timeout 60s;",
        "server_tokens off;",
        "ssl_protocols TLSv1.2 TLSv1.3;",
        "ssl_reject_handshake on;",
    ] {
        assert!(conf.contains(needle), "missing {needle:?} in\n{conf}");
    }
    assert!(!conf.contains("TLSv1.1") && !conf.contains("TLSv1 "));
}

#[test]
fn no_rate_limit_means_no_zone_and_no_retry_after() {
    let yaml = TWO_ROUTES.replace("    rateLimit: {requestsPerSecond: 5, burst: 7}\n", "");
    let conf = render(&stack(&yaml), &BuildOptions::default());
    assert!(!conf.contains("limit_req"));
    assert!(!conf.contains("Retry-After"));
}

/// The `upstream` block of `id`, from its header to its closing brace.
fn upstream_block<'a>(conf: &'a str, id: &str) -> &'a str {
    let start = conf
        .find(&format!("upstream {id} {{"))
        .unwrap_or_else(|| panic!("no upstream {id} in\n{conf}"));
    &conf[start..start + conf[start..].find('}').unwrap()]
}

#[test]
fn offline_upstreams_name_the_routed_services_and_keep_connections_alive() {
    let conf = render(&stack(TWO_ROUTES), &BuildOptions::default());
    let api = upstream_block(&conf, "svc_api_v2");
    assert_eq!(
        api.matches("server api-v2.ns.svc.cluster.local:9000 max_fails=0;")
            .count(),
        2,
        "{api}"
    );
    for needle in [
        "keepalive 512;",
        "keepalive_timeout 4s;",
        "keepalive_time 60s;",
    ] {
        assert!(api.contains(needle), "missing {needle:?} in {api}");
    }
    assert!(conf.contains("upstream svc_web {"));
    assert!(!conf.contains("worker.ns"), "internal-only service exposed");
    assert!(
        !conf.contains("resolver"),
        "nothing is resolved per request"
    );
    let locs = locations(&conf);
    let api = locs
        .iter()
        .find(|(h, _)| h == "location /api/ {")
        .expect("route location");
    // No URI part: the request URI goes upstream exactly as the client sent it.
    assert_eq!(api.1, "proxy_pass http://svc_api_v2;\n");
    assert!(conf.contains("proxy_next_upstream error timeout;"));
    assert!(conf.contains("proxy_next_upstream_tries 2;"));
    assert!(
        !conf.contains("non_idempotent"),
        "a POST is never sent twice"
    );
}

#[test]
fn in_cluster_upstreams_are_cluster_ips_and_a_service_without_one_answers_503() {
    let conf = render(&stack(TWO_ROUTES), &with_cluster_ips());
    assert!(!conf.contains(".svc.cluster.local"), "{conf}");
    assert!(!conf.contains("resolver"), "{conf}");
    let api = upstream_block(&conf, "svc_api_v2");
    assert_eq!(
        api.matches("server 10.96.0.21:9000 max_fails=0;").count(),
        2
    );
    let web = upstream_block(&conf, "svc_web");
    assert_eq!(
        web.matches("server [fd00::22]:8000 max_fails=0;").count(),
        2
    );
    assert!(
        !conf.contains("10.96.0.23"),
        "internal-only service exposed"
    );
    // No address for `web` yet: its route answers 503, nothing refers to a name.
    let only_api = BuildOptions {
        upstreams: Upstreams::ClusterIps(
            [("api-v2".to_string(), "10.96.0.21".parse().unwrap())].into(),
        ),
        ..BuildOptions::default()
    };
    let conf = render(&stack(TWO_ROUTES), &only_api);
    assert!(!conf.contains("svc_web"), "{conf}");
    let locs = locations(&conf);
    let root = locs
        .iter()
        .filter(|(h, _)| h == "location / {")
        .map(|(_, b)| b.as_str())
        .collect::<Vec<_>>();
    assert!(
        root.contains(
            &"# No ClusterIP for Service web yet: written once the Service exists.\nreturn 503;\n"
        ),
        "{root:?}"
    );
    assert!(conf.contains("proxy_pass http://svc_api_v2;"));
}

#[test]
fn only_websocket_upgrades_are_passed_on() {
    let conf = render(&stack(TWO_ROUTES), &BuildOptions::default());
    assert!(conf.contains("proxy_set_header Upgrade $opsconductor_upgrade;"));
    assert!(
        !conf.contains("$http_upgrade;"),
        "the client's Upgrade is never sent as is"
    );
    for map in ["$opsconductor_upgrade", "$opsconductor_connection"] {
        let start = conf.find(&format!("map $http_upgrade {map} {{")).unwrap();
        let body = &conf[start..start + conf[start..].find('}').unwrap()];
        assert!(body.contains("default         \"\";"), "{body}");
    }
}

#[test]
fn redirects_name_only_the_stacks_hosts_and_no_port() {
    let conf = render(&stack(TWO_ROUTES), &BuildOptions::default());
    assert!(conf.contains("return 308 https://$opsconductor_redirect_host$request_uri;"));
    assert!(!conf.contains("https://$host"), "{conf}");
    let start = conf
        .find("map $host $opsconductor_redirect_host {")
        .unwrap();
    let map = &conf[start..start + conf[start..].find('}').unwrap()];
    assert!(
        map.contains("default \"\";")
            && map.contains("a.example.com a.example.com;")
            && map.contains("b.example.com b.example.com;"),
        "{map}"
    );
    assert!(conf.contains("absolute_redirect off;"));
    assert!(conf.contains("ssl_ecdh_curve X25519:prime256v1:secp384r1;"));
}

/// `conf` without the line that names it (which changes with every other line).
fn without_id(conf: &str) -> String {
    conf.lines()
        .filter(|l| !l.starts_with(super::CONFIG_ID_PREFIX))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// `conf` without the server of the reload loop's result (port 8084).
fn without_config_status(conf: &str) -> String {
    let start = conf
        .find("\n    # Port 8084")
        .expect("the config status server");
    let end = start + conf[start..].find("\n    }\n").unwrap() + "\n    }\n".len();
    format!("{}{}", &conf[..start], &conf[end..])
}

#[test]
fn the_file_names_itself_and_serves_the_reload_result_on_its_own_port() {
    let conf = render(&stack(TWO_ROUTES), &BuildOptions::default());
    let third = conf.lines().nth(2).unwrap();
    let id = super::config_id(&conf).unwrap();
    assert_eq!(third, format!("{}{id}", super::CONFIG_ID_PREFIX));
    assert_eq!(id.len(), 16);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
    // The SHA-256 of the file without that line.
    let digest = <sha2::Sha256 as sha2::Digest>::digest(without_id(&conf).as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    assert_eq!(id, hex);
    // Any change of the stack that changes the file changes the name; the same stack, the same.
    assert_eq!(render(&stack(TWO_ROUTES), &BuildOptions::default()), conf);
    let other = render(
        &stack(&TWO_ROUTES.replace("3m", "4m")),
        &BuildOptions::default(),
    );
    assert_ne!(super::config_id(&other), Some(id));
    assert_eq!(super::config_id("worker_processes 1;\n"), None);
    // The reload loop's result on 8084, nothing else there, and no access log.
    let start = conf.find("\n    # Port 8084").unwrap();
    let server = &conf[start..start + conf[start..].find("\n    }\n").unwrap()];
    let listens: Vec<&str> = server
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("listen "))
        .collect();
    assert_eq!(
        listens,
        [
            "listen 8084 default_server;",
            "listen [::]:8084 default_server;"
        ]
    );
    assert!(server.contains("access_log off;"));
    assert!(server.contains(&format!(
        "location = {} {{\n            default_type text/plain;\n            alias {};",
        super::CONFIG_STATUS_URL_PATH,
        crate::build::gateway::CONFIG_STATUS_PATH
    )));
    assert!(!server.contains("proxy_pass") && !server.contains("root "));
    assert_eq!(server.matches("location ").count(), 2, "{server}");
}

#[test]
fn a_root_route_replaces_the_404_fallback() {
    let conf = without_config_status(&render(&stack(TWO_ROUTES), &BuildOptions::default()));
    let roots = locations(&conf)
        .into_iter()
        .filter(|(h, _)| h == "location / {")
        .count();
    // One on 8080 (the redirect), one on 8443 (the web route); no 404 fallback.
    assert_eq!(roots, 2, "{conf}");
    let yaml = TWO_ROUTES.replace("route: /}", "}");
    let conf = without_config_status(&render(&stack(&yaml), &BuildOptions::default()));
    assert!(conf.contains("location / {\n            return 404;"));
}

#[test]
fn acme_challenge_answer_needs_an_acme_stack_and_a_thumbprint() {
    let acme = TWO_ROUTES.replace(
        "tls: {secretName: own}",
        "tls: {acme: {directoryUrl: \"https://acme.test/dir\", acceptTermsOfService: true}}",
    );
    let thumb = BuildOptions {
        acme_thumbprint: Some("Thumb_print-1".into()),
        ..BuildOptions::default()
    };
    let conf = render(&stack(&acme), &thumb);
    assert!(conf.contains("return 200 \"$1.Thumb_print-1\";"));
    for (yaml, options) in [
        (acme.as_str(), BuildOptions::default()),
        (TWO_ROUTES, thumb.clone()),
    ] {
        let conf = render(&stack(yaml), &options);
        assert!(!conf.contains("return 200 \"$1."));
        assert!(conf.contains("location /.well-known/acme-challenge/ {\n            return 404;"));
    }
}

#[test]
fn hash_bucket_fits_the_longest_dns_name() {
    assert_eq!(server_names_hash_bucket_size(15), 128);
    assert_eq!(server_names_hash_bucket_size(40), 128);
    assert_eq!(server_names_hash_bucket_size(60), 192);
    // 253 characters: 8 + 253 + 2 = 263, aligned 264; two of them and the end pointer.
    assert_eq!(server_names_hash_bucket_size(253), 576);
}

#[test]
fn the_seeds_internal_headers_are_always_stripped_and_nothing_is_trusted_by_default() {
    let conf = render(&stack(TWO_ROUTES), &BuildOptions::default());
    assert!(conf.contains("proxy_set_header x-internal \"\";"));
    assert!(conf.contains("proxy_set_header x-service \"\";"));
    assert!(!conf.contains("real_ip"), "{conf}");
    assert!(!conf.contains("proxy_protocol"), "{conf}");
    assert!(!conf.contains(&HEALTH_PORT.to_string()), "{conf}");
    let yaml = TWO_ROUTES.replace(
        "    clientMaxBodySize: 3m\n",
        "    clientMaxBodySize: 3m\n    stripRequestHeaders: [X-User-Id, X-Internal]\n",
    );
    let conf = render(&stack(&yaml), &BuildOptions::default());
    assert_eq!(conf.matches("proxy_set_header x-internal \"\";").count(), 1);
    assert!(conf.contains("proxy_set_header x-user-id \"\";"));
}

#[test]
fn trusted_proxies_name_the_client_by_x_forwarded_for_or_the_proxy_protocol() {
    let xff = TWO_ROUTES.replace(
        "    clientMaxBodySize: 3m\n",
        "    clientMaxBodySize: 3m\n    trustedProxies: [10.0.0.0/8, fd00::/8]\n",
    );
    let conf = render(&stack(&xff), &BuildOptions::default());
    for needle in [
        "set_real_ip_from 10.0.0.0/8;",
        "set_real_ip_from fd00::/8;",
        "real_ip_header X-Forwarded-For;",
        "real_ip_recursive on;",
    ] {
        assert!(conf.contains(needle), "missing {needle:?} in\n{conf}");
    }
    assert!(!conf.contains("proxy_protocol"), "{conf}");
    let pp = xff.replace(
        "trustedProxies:",
        "proxyProtocol: true\n    trustedProxies:",
    );
    let conf = render(&stack(&pp), &BuildOptions::default());
    assert!(conf.contains("real_ip_header proxy_protocol;"), "{conf}");
    assert!(!conf.contains("X-Forwarded-For;"), "{conf}");
    let listens: Vec<&str> = conf
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("listen "))
        .collect();
    assert_eq!(listens.len(), 10, "{listens:?}");
    for l in &listens {
        let own_port = l.contains(&format!("{HEALTH_PORT} "))
            || l.contains(&format!("{} ", super::CONFIG_STATUS_PORT));
        assert_eq!(!own_port, l.contains(" proxy_protocol"), "{l}");
    }
    let start = conf.find(&format!("listen {HEALTH_PORT} ")).unwrap();
    let health = &conf[start..start + conf[start..].find("\n    }").unwrap()];
    assert!(health.contains("location = /healthz {"), "{health}");
    assert!(!health.contains("proxy_pass"), "{health}");
}

const EDGE: &str = r#"
apiVersion: opsconductor.io/v1alpha1
kind: OpsConductorStack
metadata: {name: t, namespace: ns}
spec:
  gateway:
    hosts: [a.example.com]
    rateLimit: {requestsPerSecond: 5, burst: 7}
    stripRequestHeaders: [X-User-Id, X-Tenant]
    edgeAuth: {service: verdicts, path: /verify, passHeaders: [X-User-Id, X-Roles], cacheSeconds: 9}
    contentSecurityPolicy: {policy: "default-src 'self'; frame-ancestors 'none'"}
  tls: {secretName: own}
  services:
    - {name: verdicts, image: x, port: 7000}
    - name: api
      image: x
      route: /api/
      edgeAuth: {publicPaths: [/api/login, /api/public/]}
      routeLimits: {requestsPerMinute: 30, burst: 2, concurrentRequestsPerClient: 3}
    - {name: web, image: x, route: /}
"#;

#[test]
fn edge_auth_asks_an_internal_location_and_public_paths_do_not() {
    let addresses = BuildOptions {
        upstreams: Upstreams::ClusterIps(
            stack(EDGE)
                .services
                .iter()
                .map(|s| (s.name.to_string(), "10.96.0.9".parse().unwrap()))
                .collect(),
        ),
        ..BuildOptions::default()
    };
    for options in [BuildOptions::default(), addresses] {
        let conf = render(&stack(EDGE), &options);
        let locs = locations(&conf);
        let body = |head: &str| {
            locs.iter()
                .find(|(h, _)| h == head)
                .unwrap_or_else(|| {
                    panic!(
                        "no {head} in
{conf}"
                    )
                })
                .1
                .clone()
        };
        let api = body("location /api/ {");
        assert!(
            api.contains(
                "auth_request /_opsconductor:verdict/api;
"
            ),
            "{api}"
        );
        assert!(api.contains(
            "auth_request_set $opsconductor_verdict_x_user_id $upstream_http_x_user_id;"
        ));
        for public in ["location = /api/login {", "location /api/public/ {"] {
            let b = body(public);
            assert!(!b.contains("auth_request"), "{public}: {b}");
            // The route's limits hold on its public paths too.
            assert!(b.contains("limit_req zone=opsconductor_route_api burst=2 nodelay;"));
        }
        assert!(!body("location / {").contains("auth_request"));
        let verdict = body("location = /_opsconductor:verdict/api {");
        assert!(
            verdict.starts_with(
                "internal;
"
            ),
            "{verdict}"
        );
        assert!(verdict.contains("proxy_pass_request_body off;"));
        assert!(verdict.contains("proxy_set_header X-Original-URI $request_uri;"));
        assert!(verdict.contains("proxy_set_header x-user-id \"\";"));
        assert!(verdict.contains("proxy_set_header x-tenant \"\";"));
        assert!(verdict.contains("proxy_cache_key \"api $http_authorization\";"));
        assert!(verdict.contains("proxy_cache_valid 200 204 401 403 9s;"));
        assert!(verdict.contains("proxy_pass http://svc_verdicts/verify;"));
        assert!(conf.contains("upstream svc_verdicts {"), "{conf}");
        // The client's X-User-Id is replaced on every route by the verdict's (empty unless
        // a verdict set it); never both a removal and the verdict for one name.
        assert!(conf.contains("set $opsconductor_verdict_x_user_id \"\";"));
        assert!(conf.contains("proxy_set_header x-user-id $opsconductor_verdict_x_user_id;"));
        let server_headers = &conf[conf.find("proxy_http_version").unwrap()..];
        let server_headers = &server_headers[..server_headers.find("location").unwrap()];
        assert!(
            !server_headers.contains("x-user-id \"\""),
            "{server_headers}"
        );
        assert_eq!(
            conf.matches("proxy_set_header x-user-id $opsconductor_verdict_x_user_id;")
                .count(),
            1
        );
        assert!(conf.contains(
            "proxy_cache_path /tmp/verdicts levels=1:2 keys_zone=opsconductor_verdicts:1m \
             max_size=8m inactive=9s use_temp_path=off;"
        ));
        assert_eq!(conf.matches('{').count(), conf.matches('}').count());
    }
    // Without a cache, no cache path (and no memory volume in the pod).
    let conf = render(
        &stack(&EDGE.replace(", cacheSeconds: 9", "")),
        &BuildOptions::default(),
    );
    assert!(!conf.contains("proxy_cache"), "{conf}");
    // Without any route using it, no verdict location, no upstream for the verdict service.
    let conf = render(
        &stack(&EDGE.replace(
            "      edgeAuth: {publicPaths: [/api/login, /api/public/]}
",
            "",
        )),
        &BuildOptions::default(),
    );
    assert!(!conf.contains("verdict"), "{conf}");
    assert!(
        conf.contains("proxy_set_header x-user-id \"\";"),
        "still removed: {conf}"
    );
}

#[test]
fn route_limits_add_to_the_gateway_s_and_csp_is_a_security_header() {
    let conf = render(&stack(EDGE), &BuildOptions::default());
    assert!(
        conf.contains(
            "limit_req_zone $binary_remote_addr zone=opsconductor_route_api:1m rate=30r/m;"
        )
    );
    assert!(
        conf.contains("limit_conn_zone $binary_remote_addr zone=opsconductor_route_conn_api:1m;")
    );
    let api = locations(&conf)
        .into_iter()
        .find(|(h, _)| h == "location /api/ {")
        .unwrap()
        .1;
    for line in [
        "limit_req zone=opsconductor_per_client burst=7 nodelay;",
        "limit_req zone=opsconductor_route_api burst=2 nodelay;",
        "limit_conn opsconductor_conn_per_client 256;",
        "limit_conn opsconductor_route_conn_api 3;",
    ] {
        assert!(api.contains(line), "{line} in {api}");
    }
    assert_eq!(
        conf.matches(
            "add_header Content-Security-Policy \"default-src 'self'; frame-ancestors 'none'\" always;"
        )
        .count(),
        2,
        "both HTTPS servers: {conf}"
    );
    // Route limits alone, without the gateway's: the 429 status and Retry-After all the same.
    let conf = render(
        &stack(&EDGE.replace(
            "    rateLimit: {requestsPerSecond: 5, burst: 7}
",
            "",
        )),
        &BuildOptions::default(),
    );
    assert!(conf.contains("limit_req_status 429;"));
    assert!(conf.contains("add_header Retry-After $opsconductor_retry_after always;"));
    assert!(!conf.contains("opsconductor_per_client burst"), "{conf}");
}

#[test]
fn braces_balance() {
    for options in [BuildOptions::default(), with_cluster_ips()] {
        let conf = render(&stack(TWO_ROUTES), &options);
        // Braces inside quoted strings (the log format, the ACME regex) are balanced too.
        let open = conf.matches('{').count();
        let close = conf.matches('}').count();
        assert_eq!(open, close, "{conf}");
    }
}

/// A one-route stack with `fields` added to its gateway (`, resources: {...}`).
fn with_gateway_fields(fields: &str) -> Stack {
    stack(&format!(
        "apiVersion: opsconductor.io/v1alpha1
kind: OpsConductorStack
metadata: {{name: t, namespace: ns}}
spec:
  gateway: {{hosts: [a.example.com]{fields}}}
  tls: {{secretName: own}}
  services: [{{name: web, image: web:1, route: /}}]
"
    ))
}

#[test]
fn workers_follow_the_cpu_limit_and_stay_auto_without_one() {
    let with = with_gateway_fields;
    assert_eq!(worker_processes(&with("")), "auto");
    assert!(render(&with(""), &BuildOptions::default()).contains("\nworker_processes auto;\n"));
    for (cpu, workers) in [
        ("1", "1"),
        ("\"1500m\"", "2"),
        ("\"250m\"", "1"),
        ("3", "3"),
        ("0.5", "1"),
        ("200", "64"),
    ] {
        let s = with(&format!(
            ", resources: {{limits: {{cpu: {cpu}, memory: 1Gi}}}}"
        ));
        assert_eq!(worker_processes(&s), workers, "cpu {cpu}");
        assert!(
            render(&s, &BuildOptions::default())
                .contains(&format!("\nworker_processes {workers};\n")),
            "cpu {cpu}"
        );
    }
    // A request alone changes nothing: nginx may use more than it asked for.
    let s = with(", resources: {requests: {cpu: \"1\"}}");
    assert_eq!(worker_processes(&s), "auto");
}

#[test]
fn worker_connections_fit_the_memory_limit_when_the_workers_are_known() {
    let with = with_gateway_fields;
    // The default resources (no CPU limit, so `auto` workers): the most.
    assert_eq!(worker_connections(&with("")), 4096);
    assert!(
        render(&with(""), &BuildOptions::default()).contains("\n    worker_connections 4096;\n")
    );
    for (limits, connections) in [
        // 3/4 of the limit at 64 KiB a connection, shared by the workers.
        ("{cpu: 1, memory: 128Mi}", 1536),
        ("{cpu: 2, memory: 128Mi}", 768),
        ("{cpu: \"500m\", memory: 256Mi}", 3072),
        ("{cpu: 1, memory: 512Mi}", 4096),
        ("{cpu: 4, memory: 1Gi}", 3072),
        ("{cpu: 1, memory: 128M}", 1464),
        ("{cpu: 1, memory: \"134217728\"}", 1536),
        ("{cpu: 1, memory: 1.5Gi}", 4096),
        // Tiny limits keep a floor; a limit without the other keeps the default.
        ("{cpu: 1, memory: 8Mi}", 256),
        ("{cpu: 64, memory: 256Mi}", 256),
        ("{memory: 128Mi}", 4096),
        ("{cpu: 1}", 4096),
    ] {
        let s = with(&format!(", resources: {{limits: {limits}}}"));
        assert_eq!(worker_connections(&s), connections, "limits {limits}");
        assert!(
            render(&s, &BuildOptions::default())
                .contains(&format!("\n    worker_connections {connections};\n")),
            "limits {limits}"
        );
    }
    assert_eq!(memory_bytes("1Ki"), Some(1024));
    assert_eq!(memory_bytes("1e3"), Some(1000));
    assert_eq!(memory_bytes("100m"), None);
    assert_eq!(memory_bytes("lots"), None);
}

#[test]
fn the_status_listener_is_on_loopback_and_only_with_metrics() {
    let plain = render(&stack(TWO_ROUTES), &BuildOptions::default());
    assert!(!plain.contains("stub_status"));
    let with = TWO_ROUTES.replace(
        "    clientMaxBodySize: 3m\n",
        "    clientMaxBodySize: 3m\n    metrics: {enabled: true, allowFrom: [{namespaceSelector: {}}]}\n",
    );
    let conf = render(&stack(&with), &BuildOptions::default());
    let listens: Vec<&str> = conf
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("listen ") && l.contains(&STATUS_PORT.to_string()))
        .collect();
    assert_eq!(
        listens,
        [format!("listen 127.0.0.1:{STATUS_PORT} default_server;")]
    );
    assert_eq!(conf.matches("stub_status;").count(), 1);
    assert!(conf.contains(&format!("location = {STATUS_PATH} {{")));
    // Everything else is the same file, but for the request log (tested below).
    let start = conf.find("\n    # Port 8082").unwrap();
    let end = start + conf[start..].find("\n    }\n").unwrap() + "\n    }\n".len();
    assert_eq!(
        without_id(&without_request_log(&format!(
            "{}{}",
            &conf[..start],
            &conf[end..]
        ))),
        without_id(&plain)
    );
}

/// The configuration without what `request_metrics` adds: the http-context block and the
/// route label line of each route's locations.
fn without_request_log(conf: &str) -> String {
    let start = conf
        .find("\n    # Requests by route and status class")
        .expect("the request log block");
    let end = start
        + conf[start..]
            .find("nohostname opsconductor_metrics;\n")
            .unwrap()
        + "nohostname opsconductor_metrics;\n".len();
    let rest = format!("{}{}", &conf[..start], &conf[end..]);
    rest.lines()
        .filter(|l| !l.trim_start().starts_with("set $opsconductor_route "))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn with_metrics_each_request_is_logged_to_the_sidecar_with_a_bounded_route_label() {
    use super::request_metrics::{NO_ROUTE, REQUEST_LOG_PORT, ROUTE_VARIABLE};
    let plain = render(&stack(TWO_ROUTES), &with_cluster_ips());
    assert!(!plain.contains("syslog") && !plain.contains(ROUTE_VARIABLE));
    assert!(!plain.contains("uninitialized_variable_warn"));
    let with = TWO_ROUTES.replace(
        "    clientMaxBodySize: 3m\n",
        "    clientMaxBodySize: 3m\n    metrics: {enabled: true, allowFrom: [{namespaceSelector: {}}]}\n",
    );
    let conf = render(&stack(&with), &with_cluster_ips());
    // One second access log, over UDP to the pod's loopback, beside the JSON one on stdout.
    let logs: Vec<&str> = conf
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("access_log "))
        .collect();
    assert_eq!(
        logs,
        [
            "access_log /dev/stdout opsconductor_json;",
            &format!(
                "access_log syslog:server=127.0.0.1:{REQUEST_LOG_PORT},facility=local7,\
                 severity=info,tag=opsconductor,nohostname opsconductor_metrics;"
            ),
            // The probes, the status listener, the reload result: in neither log.
            "access_log off;",
            "access_log off;",
            "access_log off;",
        ]
    );
    // The line: the route's label and nginx's own numbers, nothing a client sends.
    assert!(conf.contains(
        "log_format opsconductor_metrics\n        \
         '$opsconductor_route_label $status $request_time $upstream_response_time\\n';"
    ));
    assert!(conf.contains(&format!("\"\"      \"{NO_ROUTE}\";")));
    // Each routed service's location starts with its name as the label; no other location
    // sets it (the unrouted service, the 404 catch-all, the redirect, ACME, probes).
    let labelled: Vec<(String, String)> = locations(&conf)
        .into_iter()
        .filter(|(_, body)| body.contains(ROUTE_VARIABLE))
        .collect();
    let headers: Vec<&str> = labelled.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(headers, ["location / {", "location /api/ {"]);
    assert!(labelled[0].1.starts_with("set $opsconductor_route web;"));
    assert!(labelled[1].1.starts_with("set $opsconductor_route api-v2;"));
    assert_eq!(conf.matches("set $opsconductor_route ").count(), 2);
    // Everything else is the file without metrics.
    let start = conf.find("\n    # Port 8082").unwrap();
    let end = start + conf[start..].find("\n    }\n").unwrap() + "\n    }\n".len();
    assert_eq!(
        without_id(&without_request_log(&format!(
            "{}{}",
            &conf[..start],
            &conf[end..]
        ))),
        without_id(&plain)
    );
}
