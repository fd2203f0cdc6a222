use std::time::Duration;

use super::*;
use crate::model::{CertificateSource, Dns01, Hsts, Rate, Rfc2136, RouteLimits, SecretKey};
use serde_json::{Value, json};

fn base() -> Value {
    json!({
        "apiVersion": "opsconductor.io/v1alpha1",
        "kind": "OpsConductorStack",
        "metadata": {"name": "prod", "namespace": "ops"},
        "spec": {
            "gateway": {"hosts": ["ops.example.com"]},
            "tls": {"acme": {"directoryUrl": "https://acme.example/dir", "acceptTermsOfService": true}},
            "services": [
                {"name": "auth", "image": "auth:1", "route": "/api/v1/auth/", "calls": ["users"]},
                {"name": "users", "image": "users:1"}
            ],
            "backends": [
                {"name": "postgres", "podSelector": {"matchLabels": {"app": "postgres"}}, "ports": [5432], "allowFrom": ["auth"]}
            ]
        }
    })
}

fn run(v: Value) -> Result<Stack, ValidationErrors> {
    let stack: OpsConductorStack = serde_json::from_value(v).expect("test input deserializes");
    validate(&stack, "default")
}

/// Applies `edit` to the base stack and returns the error lines.
fn errors(edit: impl FnOnce(&mut Value)) -> Vec<String> {
    let mut v = base();
    edit(&mut v);
    match run(v) {
        Ok(_) => vec![],
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

fn assert_error(edit: impl FnOnce(&mut Value), expected: &str) {
    let errs = errors(edit);
    assert!(
        errs.iter().any(|e| e.contains(expected)),
        "expected an error containing {expected:?}, got {errs:#?}"
    );
}

/// The base stack with edge authentication from `auth` on the `users` route.
fn with_edge_auth(v: &mut Value) {
    v["spec"]["gateway"]["edgeAuth"] =
        json!({"service": "auth", "path": "/api/v1/auth/verify", "passHeaders": ["X-User-Id"]});
    v["spec"]["services"][1]["route"] = json!("/api/v1/users/");
    v["spec"]["services"][1]["edgeAuth"] = json!({"publicPaths": ["/api/v1/users/signup"]});
}

#[test]
fn edge_auth_is_checked_field_by_field() {
    let stack = run({
        let mut v = base();
        with_edge_auth(&mut v);
        v
    })
    .expect("valid");
    let a = stack.gateway.edge_auth.as_ref().unwrap();
    assert_eq!(a.pass_headers, ["x-user-id"]);
    assert_eq!(a.cache_seconds, 0);
    assert!(stack.gateway_reaches(&stack.services[0]));
    type Edit = Box<dyn FnOnce(&mut Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|v| v["spec"]["gateway"]["edgeAuth"]["service"] = json!("nobody")),
            "spec.gateway.edgeAuth.service: unknown service \"nobody\"",
        ),
        (
            Box::new(|v| v["spec"]["gateway"]["edgeAuth"]["path"] = json!("/verify?x=1")),
            "spec.gateway.edgeAuth.path: \"/verify?x=1\" contains '?'",
        ),
        (
            Box::new(|v| {
                v["spec"]["gateway"]["edgeAuth"]["passHeaders"] = json!(["X-User-Id", "x-user-id"])
            }),
            "spec.gateway.edgeAuth.passHeaders[1]: duplicate header \"x-user-id\"",
        ),
        (
            Box::new(|v| v["spec"]["gateway"]["edgeAuth"]["passHeaders"] = json!(["X_User"])),
            "spec.gateway.edgeAuth.passHeaders[0]: \"X_User\" contains '_'",
        ),
        (
            Box::new(|v| {
                v["spec"]["gateway"]["edgeAuth"]["passHeaders"] = json!(["Authorization"])
            }),
            "spec.gateway.edgeAuth.passHeaders[0]: \"Authorization\" carries the client's own credentials",
        ),
        (
            Box::new(|v| v["spec"]["gateway"]["edgeAuth"]["passHeaders"] = json!(["X-Service"])),
            "spec.gateway.edgeAuth.passHeaders[0]: \"X-Service\" is what the services trust",
        ),
        (
            Box::new(|v| v["spec"]["gateway"]["edgeAuth"]["passHeaders"] = json!(["Host"])),
            "spec.gateway.edgeAuth.passHeaders[0]: \"Host\" is set by the gateway itself",
        ),
        (
            Box::new(|v| v["spec"]["gateway"]["edgeAuth"]["cacheSeconds"] = json!(301)),
            "spec.gateway.edgeAuth.cacheSeconds: 301 is out of range 0 to 300",
        ),
        (
            Box::new(|v| v["spec"]["services"][1]["route"] = Value::Null),
            "spec.services[1].edgeAuth: needs a route",
        ),
        (
            Box::new(|v| {
                v["spec"]["gateway"]
                    .as_object_mut()
                    .unwrap()
                    .remove("edgeAuth");
            }),
            "spec.services[1].edgeAuth: needs spec.gateway.edgeAuth",
        ),
        (
            Box::new(|v| {
                v["spec"]["services"][1]["edgeAuth"]["publicPaths"] = json!(["/api/v1/auth/login"])
            }),
            "spec.services[1].edgeAuth.publicPaths[0]: \"/api/v1/auth/login\" is not under the route \"/api/v1/users/\"",
        ),
        (
            Box::new(|v| {
                v["spec"]["services"][1]["edgeAuth"]["publicPaths"] = json!(["/api/v1/users/"])
            }),
            "is not under the route",
        ),
        (
            Box::new(|v| {
                v["spec"]["services"][1]["edgeAuth"]["publicPaths"] = json!(["/api/v1/users/a:b"])
            }),
            "spec.services[1].edgeAuth.publicPaths[0]: \"/api/v1/users/a:b\" contains ':'",
        ),
        (
            Box::new(|v| {
                v["spec"]["services"][1]["edgeAuth"]["publicPaths"] =
                    json!(["/api/v1/users/x", "/api/v1/users/x"])
            }),
            "spec.services[1].edgeAuth.publicPaths[1]: \"/api/v1/users/x\" is listed twice",
        ),
        (
            Box::new(|v| {
                v["spec"]["services"][0]["route"] = json!("/api/v1/users/admin/");
                v["spec"]["services"][1]["edgeAuth"]["publicPaths"] =
                    json!(["/api/v1/users/admin/login"]);
            }),
            "spec.services[1].edgeAuth.publicPaths[0]: \"/api/v1/users/admin/login\" is under the route \"/api/v1/users/admin/\" of spec.services[0]",
        ),
    ];
    for (edit, expected) in cases {
        assert_error(
            |v| {
                with_edge_auth(v);
                edit(v);
            },
            expected,
        );
    }
    // Edge authentication that no route uses: nothing reaches the verdict service.
    let stack = run({
        let mut v = base();
        with_edge_auth(&mut v);
        v["spec"]["services"][1]
            .as_object_mut()
            .unwrap()
            .remove("edgeAuth");
        v["spec"]["services"][0]
            .as_object_mut()
            .unwrap()
            .remove("route");
        v
    })
    .expect("valid");
    assert!(stack.verdicts().is_none());
    assert!(!stack.gateway_reaches(&stack.services[0]));
}

#[test]
fn route_limits_are_checked_field_by_field() {
    let limits = |l: Value| move |v: &mut Value| v["spec"]["services"][0]["routeLimits"] = l;
    let stack = run({
        let mut v = base();
        limits(json!({"requestsPerMinute": 30, "burst": 5, "concurrentRequestsPerClient": 4}))(
            &mut v,
        );
        v
    })
    .expect("valid");
    assert_eq!(
        stack.services[0].route_limits,
        Some(RouteLimits {
            rate: Some(Rate::PerMinute(30)),
            burst: 5,
            concurrent_requests_per_client: Some(4)
        })
    );
    for (l, expected) in [
        (
            json!({"requestsPerSecond": 1, "requestsPerMinute": 1}),
            "spec.services[0].routeLimits.requestsPerMinute: at most one of requestsPerSecond and requestsPerMinute",
        ),
        (
            json!({"burst": 3}),
            "spec.services[0].routeLimits.burst: needs requestsPerSecond or requestsPerMinute",
        ),
        (json!({}), "spec.services[0].routeLimits: sets no limit"),
        (
            json!({"requestsPerSecond": 0}),
            "spec.services[0].routeLimits.requestsPerSecond: 0 is out of range 1 to 100000",
        ),
        (
            json!({"requestsPerMinute": 5, "burst": -1}),
            "spec.services[0].routeLimits.burst: -1 is out of range 0 to 100000",
        ),
        (
            json!({"concurrentRequestsPerClient": 257}),
            "spec.services[0].routeLimits.concurrentRequestsPerClient: 257 is out of range 1 to 256",
        ),
    ] {
        assert_error(limits(l), expected);
    }
    assert_error(
        |v| v["spec"]["services"][1]["routeLimits"] = json!({"requestsPerSecond": 1}),
        "spec.services[1].routeLimits: needs a route",
    );
}

#[test]
fn a_content_security_policy_cannot_leave_its_nginx_string() {
    let csp = |p: &str| {
        let p = p.to_string();
        move |v: &mut Value| v["spec"]["gateway"]["contentSecurityPolicy"] = json!({"policy": p})
    };
    let ok = "default-src 'self'; script-src 'self' 'nonce-abc+/='; report-uri https://r.example/csp?a=1&b=2#x";
    let stack = run({
        let mut v = base();
        csp(ok)(&mut v);
        v
    })
    .expect("valid");
    assert_eq!(stack.gateway.content_security_policy.unwrap().policy, ok);
    for (bad, ch) in [
        ("default-src 'self'\" always; add_header X 1", "'\"'"),
        ("default-src 'self';\nreturn 200", "'\\n'"),
        ("default-src 'self';\rx", "'\\r'"),
        ("default-src $host", "'$'"),
        ("default-src 'self' \\", "'\\\\'"),
        ("default-src {x}", "'{'"),
        ("default-src 'self'\tx", "'\\t'"),
        ("default-src é", "'é'"),
    ] {
        assert_error(
            csp(bad),
            &format!("spec.gateway.contentSecurityPolicy.policy: contains {ch}"),
        );
    }
    assert_error(
        csp("   "),
        "spec.gateway.contentSecurityPolicy.policy: must not be empty",
    );
}

#[test]
fn base_is_valid_and_defaults_apply() {
    let stack = run(base()).expect("valid");
    assert_eq!(stack.name.as_str(), "prod");
    assert_eq!(stack.namespace, "ops");
    assert_eq!(stack.gateway.replicas, 2);
    assert_eq!(stack.gateway.image, crate::crd::DEFAULT_GATEWAY_IMAGE);
    assert_eq!(stack.gateway.client_max_body_size, "10m");
    assert_eq!(
        stack.gateway.hsts,
        Hsts {
            max_age_seconds: 31_536_000,
            include_sub_domains: true,
            preload: false
        }
    );
    assert_eq!(stack.services[1].port, 8000);
    assert_eq!(stack.services[1].health_path, "/health");
    assert_eq!(
        stack.services[0].calls,
        vec![DnsLabel::parse("users").unwrap()]
    );
    assert_eq!(stack.mode, crate::crd::PolicyMode::Enforce);
    let CertificateSource::Acme(acme) = &stack.tls.source else {
        panic!("acme")
    };
    assert_eq!(acme.key_algorithm, crate::crd::KeyAlgorithm::EcdsaP256);
    let mut v = base();
    v["spec"]["tls"]["acme"]["keyAlgorithm"] = json!("ECDSA-P384");
    let CertificateSource::Acme(acme) = run(v).unwrap().tls.source else {
        panic!("acme")
    };
    assert_eq!(acme.key_algorithm, crate::crd::KeyAlgorithm::EcdsaP384);
    let mut v = base();
    v["spec"]["tls"]["acme"]["keyAlgorithm"] = json!("RSA-2048");
    let CertificateSource::Acme(acme) = run(v).unwrap().tls.source else {
        panic!("acme")
    };
    assert_eq!(acme.key_algorithm, crate::crd::KeyAlgorithm::Rsa2048);
    let mut v = base();
    v["spec"]["tls"]["acme"]["keyAlgorithm"] = json!("RSA-1024");
    assert!(serde_json::from_value::<OpsConductorStack>(v).is_err());
}

#[test]
fn namespace_defaults_when_missing() {
    let mut v = base();
    v["metadata"].as_object_mut().unwrap().remove("namespace");
    assert_eq!(run(v).unwrap().namespace, "default");
}

#[test]
fn stack_name_rules() {
    assert_error(
        |v| v["metadata"]["name"] = json!("Prod"),
        "metadata.name: \"Prod\" must start with a lowercase letter",
    );
    assert_error(
        |v| v["metadata"]["name"] = json!("1prod"),
        "metadata.name: \"1prod\" must start with a lowercase letter",
    );
    assert_error(|v| v["metadata"]["name"] = json!("prod_x"), "contains '_'");
    assert_error(
        |v| v["metadata"]["name"] = json!("prod-"),
        "must end with a lowercase letter or digit",
    );
    let long = "a".repeat(names::max_stack_name_len() + 1);
    assert_error(
        move |v| v["metadata"]["name"] = json!(long),
        "derived names such as",
    );
    let fits = "a".repeat(names::max_stack_name_len());
    assert!(errors(move |v| v["metadata"]["name"] = json!(fits)).is_empty());
}

#[test]
fn host_rules() {
    assert_error(
        |v| v["spec"]["gateway"]["hosts"] = json!([]),
        "spec.gateway.hosts: needs 1 to 100 hosts, got 0",
    );
    let many: Vec<String> = (0..101).map(|i| format!("h{i}.example.com")).collect();
    assert_error(
        move |v| v["spec"]["gateway"]["hosts"] = json!(many),
        "got 101",
    );
    let hundred: Vec<String> = (0..100).map(|i| format!("h{i}.example.com")).collect();
    assert!(errors(move |v| v["spec"]["gateway"]["hosts"] = json!(hundred)).is_empty());
    assert_error(
        |v| v["spec"]["gateway"]["hosts"] = json!(["*.example.com"]),
        "spec.gateway.hosts[0]: \"*.example.com\" is a wildcard",
    );
    assert_error(
        |v| v["spec"]["gateway"]["hosts"] = json!(["203.0.113.7"]),
        "is an IP address",
    );
    assert_error(
        |v| v["spec"]["gateway"]["hosts"] = json!(["Ops.example.com"]),
        "must be lowercase",
    );
    assert_error(
        |v| v["spec"]["gateway"]["hosts"] = json!(["ops..example.com"]),
        "is not a valid DNS name",
    );
    assert_error(
        |v| v["spec"]["gateway"]["hosts"] = json!(["-ops.example.com"]),
        "is not a valid DNS name",
    );
    assert_error(
        |v| v["spec"]["gateway"]["hosts"] = json!(["localhost"]),
        "not a fully qualified",
    );
    assert_error(
        |v| v["spec"]["gateway"]["hosts"] = json!(["a.example.com", "a.example.com"]),
        "spec.gateway.hosts[1]: duplicate host",
    );
}

#[test]
fn gateway_rules() {
    assert_error(
        |v| v["spec"]["gateway"]["replicas"] = json!(0),
        "spec.gateway.replicas: 0 is out of range",
    );
    assert_error(
        |v| v["spec"]["gateway"]["image"] = json!(" "),
        "spec.gateway.image: must not be empty",
    );
    assert_error(
        |v| v["spec"]["gateway"]["allowedSourceRanges"] = json!(["10.0.0.0/33"]),
        "spec.gateway.allowedSourceRanges[0]: \"10.0.0.0/33\" is not a CIDR",
    );
    assert_error(
        |v| v["spec"]["gateway"]["allowedSourceRanges"] = json!(["10.0.0.1/8"]),
        "has host bits set; did you mean 10.0.0.0/8?",
    );
    assert!(
        errors(|v| v["spec"]["gateway"]["allowedSourceRanges"] =
            json!(["10.0.0.0/8", "2001:db8::/32"]))
        .is_empty()
    );
    assert_error(
        |v| v["spec"]["gateway"]["rateLimit"] = json!({"requestsPerSecond": 0}),
        "spec.gateway.rateLimit.requestsPerSecond: must be at least 1",
    );
    assert_error(
        |v| v["spec"]["gateway"]["rateLimit"] = json!({"requestsPerSecond": 5, "burst": -1}),
        "spec.gateway.rateLimit.burst",
    );
    assert_error(
        |v| v["spec"]["gateway"]["hsts"] = json!({"maxAgeSeconds": -1}),
        "spec.gateway.hsts.maxAgeSeconds",
    );
    assert_error(
        |v| v["spec"]["gateway"]["hsts"] = json!({"preload": true, "includeSubDomains": false}),
        "spec.gateway.hsts.preload",
    );
    assert_error(
        |v| v["spec"]["gateway"]["clientMaxBodySize"] = json!("10mb"),
        "spec.gateway.clientMaxBodySize: \"10mb\"",
    );
    assert_error(
        |v| v["spec"]["gateway"]["clientMaxBodySize"] = json!("10m; evil"),
        "spec.gateway.clientMaxBodySize",
    );
    assert!(errors(|v| v["spec"]["gateway"]["clientMaxBodySize"] = json!("512k")).is_empty());
    assert_error(
        |v| v["spec"]["gateway"]["timeouts"] = json!({"connectSeconds": 0}),
        "spec.gateway.timeouts.connectSeconds: 0 is out of range",
    );
}

#[test]
fn tls_rules() {
    assert_error(
        |v| v["spec"]["tls"]["secretName"] = json!("mine"),
        "spec.tls: exactly one of tls.acme or tls.secretName",
    );
    assert_error(|v| v["spec"]["tls"] = json!({}), "spec.tls: exactly one of");
    assert_error(
        |v| v["spec"]["tls"]["acme"]["acceptTermsOfService"] = json!(false),
        "spec.tls.acme.acceptTermsOfService: must be true",
    );
    assert_error(
        |v| v["spec"]["tls"]["acme"]["directoryUrl"] = json!("http://acme.example/dir"),
        "spec.tls.acme.directoryUrl",
    );
    assert_error(
        |v| v["spec"]["tls"]["acme"]["email"] = json!("not-an-email"),
        "spec.tls.acme.email",
    );
    assert_error(
        |v| v["spec"]["tls"]["renewBefore"] = json!("30d"),
        "spec.tls.renewBefore: \"30d\": use hours",
    );
    assert_error(
        |v| v["spec"]["tls"]["renewBefore"] = json!("0h"),
        "spec.tls.renewBefore: must be greater than zero",
    );
    assert_error(
        |v| {
            v["spec"]["tls"]["acme"]["externalAccountBinding"] =
                json!({"keyId": "", "hmacKeySecretRef": {"name": "Bad_Name", "key": "k"}})
        },
        "spec.tls.acme.externalAccountBinding.keyId: must not be empty",
    );
    assert_error(
        |v| {
            v["spec"]["tls"]["acme"]["externalAccountBinding"] =
                json!({"keyId": "k", "hmacKeySecretRef": {"name": "Bad_Name", "key": "k"}})
        },
        "spec.tls.acme.externalAccountBinding.hmacKeySecretRef.name",
    );
    assert_error(
        |v| v["spec"]["tls"]["acme"]["caBundleSecretRef"] = json!({"name": "ca", "key": "a/b"}),
        "spec.tls.acme.caBundleSecretRef.key",
    );
    let mut v = base();
    v["spec"]["tls"] = json!({"secretName": "my-cert", "renewBefore": "1h30m"});
    let stack = run(v).unwrap();
    assert_eq!(
        stack.tls.source,
        CertificateSource::Secret("my-cert".into())
    );
    assert_eq!(stack.tls.renew_before, Some(Duration::from_secs(5400)));
}

#[test]
fn service_rules() {
    assert_error(
        |v| v["spec"]["services"] = json!([]),
        "spec.services: needs 1 to 200 services, got 0",
    );
    let many: Vec<Value> = (0..201)
        .map(|i| json!({"name": format!("s{i}"), "image": "x"}))
        .collect();
    assert_error(move |v| v["spec"]["services"] = json!(many), "got 201");
    assert_error(
        |v| v["spec"]["services"][1]["name"] = json!("auth"),
        "spec.services[1].name: duplicate service name \"auth\" (also spec.services[0])",
    );
    // Names that would make the stack take over someone else's objects, or its own.
    for (name, why) in [
        (
            "prod-gateway",
            "is the name of one of the stack's own objects",
        ),
        (
            "prod-gateway-config",
            "is the name of one of the stack's own objects",
        ),
        ("prod-tls", "is the name of one of the stack's own objects"),
        (
            "default",
            "is reserved: every namespace has the ServiceAccount \"default\"",
        ),
        (
            "kubernetes",
            "is reserved: it is the name of the API server's Service",
        ),
    ] {
        assert_error(
            |v| v["spec"]["services"][1]["name"] = json!(name),
            &format!("spec.services[1].name: {name:?} {why}"),
        );
    }
    let plain = errors(|v| v["spec"]["services"][1]["name"] = json!("gateway"));
    assert!(
        plain.iter().all(|e| !e.contains("spec.services[1].name")),
        "{plain:?}"
    );
    assert_error(
        |v| v["spec"]["services"][1]["name"] = json!("Users"),
        "spec.services[1].name",
    );
    assert_error(
        |v| v["spec"]["services"][1]["name"] = json!("a".repeat(64)),
        "longer than 63 characters",
    );
    assert_error(
        |v| v["spec"]["services"][0]["port"] = json!(0),
        "spec.services[0].port: port 0 is out of range 1 to 65535",
    );
    assert_error(
        |v| v["spec"]["services"][0]["port"] = json!(65536),
        "port 65536 is out of range",
    );
    assert_error(
        |v| v["spec"]["services"][0]["replicas"] = json!(-1),
        "spec.services[0].replicas",
    );
    assert_error(
        |v| v["spec"]["services"][0]["image"] = json!(""),
        "spec.services[0].image: must not be empty",
    );
    assert_error(
        |v| v["spec"]["services"][0]["route"] = json!("/api"),
        "spec.services[0].route: \"/api\" must start and end with '/'",
    );
    assert_error(
        |v| v["spec"]["services"][0]["route"] = json!("api/"),
        "must start and end with '/'",
    );
    assert_error(
        |v| v["spec"]["services"][0]["route"] = json!("/a b/"),
        "contains ' '",
    );
    assert_error(
        |v| v["spec"]["services"][0]["route"] = json!("/a;return 200;/"),
        "contains ';'",
    );
    assert_error(
        |v| v["spec"]["services"][0]["route"] = json!("/../"),
        "'..' segments",
    );
    assert_error(
        |v| v["spec"]["services"][1]["route"] = json!("/api/v1/auth/"),
        "spec.services[1].route: route \"/api/v1/auth/\" is already used by spec.services[0]",
    );
    assert_error(
        |v| v["spec"]["services"][0]["healthPath"] = json!("health"),
        "spec.services[0].healthPath",
    );
    assert_error(
        |v| v["spec"]["services"][0]["calls"] = json!(["user"]),
        "spec.services[0].calls[0]: unknown service \"user\"",
    );
    assert_error(
        |v| v["spec"]["services"][0]["calls"] = json!(["users", "users"]),
        "spec.services[0].calls[1]: service \"users\" is listed twice",
    );
    assert_error(
        |v| v["spec"]["services"][1]["egress"] = json!([{"cidr": "nope", "ports": [22]}]),
        "spec.services[1].egress[0].cidr",
    );
    assert_error(
        |v| v["spec"]["services"][1]["egress"] = json!([{"cidr": "10.0.0.0/8", "ports": []}]),
        "spec.services[1].egress[0].ports: needs at least one port",
    );
    assert_error(
        |v| {
            v["spec"]["services"][1]["egress"] =
                json!([{"cidr": "10.0.0.0/8", "ports": [22, 70000]}])
        },
        "spec.services[1].egress[0].ports[1]: port 70000",
    );
    assert_error(
        |v| v["spec"]["services"][1]["egress"] = json!([{"cidr": "10.0.0.0/8", "ports": [22, 22]}]),
        "ports[1]: port 22 is listed twice",
    );
}

#[test]
fn backend_rules() {
    assert_error(
        |v| v["spec"]["backends"][0]["allowFrom"] = json!(["nobody"]),
        "spec.backends[0].allowFrom[0]: unknown service \"nobody\"",
    );
    assert_error(
        |v| v["spec"]["backends"][0]["podSelector"] = json!({}),
        "spec.backends[0].podSelector: must select something",
    );
    assert_error(
        |v| v["spec"]["backends"][0]["ports"] = json!([]),
        "spec.backends[0].ports: needs at least one port",
    );
    assert_error(
        |v| v["spec"]["backends"][0]["name"] = json!("PG"),
        "spec.backends[0].name",
    );
    assert_error(
        |v| {
            let b = v["spec"]["backends"][0].clone();
            v["spec"]["backends"].as_array_mut().unwrap().push(b);
        },
        "spec.backends[1].name: duplicate backend name \"postgres\"",
    );
}

#[test]
fn all_problems_are_reported_at_once() {
    let errs = errors(|v| {
        v["metadata"]["name"] = json!("Bad");
        v["spec"]["gateway"]["hosts"] = json!(["*.x.com"]);
        v["spec"]["services"][0]["calls"] = json!(["ghost"]);
        v["spec"]["services"][1]["port"] = json!(0);
        v["spec"]["backends"][0]["allowFrom"] = json!(["phantom"]);
    });
    assert_eq!(errs.len(), 5, "{errs:#?}");
}

#[test]
fn durations() {
    assert_eq!(
        parse_duration("720h").unwrap(),
        Duration::from_secs(720 * 3600)
    );
    assert_eq!(
        parse_duration("1h30m15s").unwrap(),
        Duration::from_secs(5415)
    );
    assert!(parse_duration("").is_err());
    assert!(parse_duration("h").is_err());
    assert!(parse_duration("10").is_err());
    assert!(parse_duration("10ms").is_err());
    assert!(parse_duration("99999999999999999999h").is_err());
}

#[test]
fn dns_labels() {
    assert!(DnsLabel::parse("a").is_ok());
    assert!(DnsLabel::parse("a-1").is_ok());
    assert!(DnsLabel::parse("").is_err());
    assert!(DnsLabel::parse("a.b").is_err());
    assert!(DnsLabel::parse(&"a".repeat(63)).is_ok());
    assert!(DnsLabel::parse(&"a".repeat(64)).is_err());
}

fn dns01() -> Value {
    json!({"rfc2136": {
        "nameserver": "192.0.2.53",
        "tsigKeyName": "acme-key",
        "tsigSecretRef": {"name": "tsig", "key": "secret"},
    }})
}

#[test]
fn dns01_settings_are_checked_field_by_field() {
    let mut v = base();
    v["spec"]["tls"]["acme"]["dns01"] = dns01();
    let stack = run(v).expect("valid");
    let CertificateSource::Acme(acme) = &stack.tls.source else {
        panic!("acme")
    };
    let d = acme.dns01.as_ref().unwrap();
    assert_eq!(d.rfc2136.nameserver, "192.0.2.53:53");
    assert_eq!(
        d.rfc2136.tsig_algorithm,
        crate::crd::TsigAlgorithm::HmacSha256
    );
    assert_eq!(d.propagation_timeout, Duration::from_secs(300));
    assert!(d.covers("anything.example.org") && d.covers("*.example.org"));

    let with = |edit: fn(&mut Value)| {
        move |v: &mut Value| {
            v["spec"]["tls"]["acme"]["dns01"] = dns01();
            edit(&mut v["spec"]["tls"]["acme"]["dns01"]);
        }
    };
    assert_error(
        with(|d| d["rfc2136"]["nameserver"] = json!("ns.example.com:0")),
        "spec.tls.acme.dns01.rfc2136.nameserver: \"ns.example.com:0\": \"0\" is not a port",
    );
    assert_error(
        with(|d| d["rfc2136"]["nameserver"] = json!("[2001:db8::1")),
        "spec.tls.acme.dns01.rfc2136.nameserver",
    );
    assert_error(
        with(|d| d["rfc2136"]["nameserver"] = json!("NS_1!")),
        "spec.tls.acme.dns01.rfc2136.nameserver",
    );
    assert_error(
        with(|d| d["rfc2136"]["zone"] = json!("Bad Zone")),
        "spec.tls.acme.dns01.rfc2136.zone",
    );
    assert_error(
        with(|d| d["rfc2136"]["tsigKeyName"] = json!("key with spaces")),
        "spec.tls.acme.dns01.rfc2136.tsigKeyName",
    );
    assert_error(
        with(|d| d["rfc2136"]["tsigSecretRef"]["key"] = json!("a/b")),
        "spec.tls.acme.dns01.rfc2136.tsigSecretRef.key",
    );
    assert_error(
        with(|d| d["propagationTimeoutSeconds"] = json!(0)),
        "spec.tls.acme.dns01.propagationTimeoutSeconds: 0 is out of range 1 to 3600",
    );
    assert_error(
        with(|d| d["domains"] = json!(["localhost"])),
        "spec.tls.acme.dns01.domains[0]: \"localhost\" is not a fully qualified DNS name",
    );
    // The Secrets the operator keeps for stacks are never a TSIG key.
    assert_error(
        with(|d| d["rfc2136"]["tsigSecretRef"]["name"] = json!("prod-acme-account")),
        "spec.tls.acme.dns01.rfc2136.tsigSecretRef.name: Secret \"prod-acme-account\" is the ACME account key",
    );
    assert_error(
        with(|d| d["rfc2136"]["tsigSecretRef"]["name"] = json!("prod-tls")),
        "spec.tls.acme.dns01.rfc2136.tsigSecretRef.name: Secret \"prod-tls\" holds the gateway certificate",
    );
    // Bracketed IPv6 with a port, and a host name without one.
    let mut v = base();
    v["spec"]["tls"]["acme"]["dns01"] = dns01();
    v["spec"]["tls"]["acme"]["dns01"]["rfc2136"]["nameserver"] = json!("[2001:db8::53]:5353");
    assert!(run(v).is_ok());
}

#[test]
fn wildcards_need_dns01_or_an_own_secret() {
    let wildcard = |v: &mut Value| {
        v["spec"]["gateway"]["hosts"] = json!(["example.com", "*.example.com"]);
    };
    // HTTP-01: refused, naming DNS-01.
    assert_error(
        wildcard,
        "spec.gateway.hosts[1]: \"*.example.com\" is a wildcard; HTTP-01 validation cannot \
         issue wildcard certificates: set spec.tls.acme.dns01",
    );
    // DNS-01 for every host: allowed.
    let mut v = base();
    wildcard(&mut v);
    v["spec"]["tls"]["acme"]["dns01"] = dns01();
    assert_eq!(
        run(v).unwrap().gateway.hosts,
        ["example.com", "*.example.com"]
    );
    // DNS-01 for other domains only: refused, naming dns01.domains.
    assert_error(
        |v| {
            wildcard(v);
            v["spec"]["tls"]["acme"]["dns01"] = dns01();
            v["spec"]["tls"]["acme"]["dns01"]["domains"] = json!(["example.org"]);
        },
        "none of spec.tls.acme.dns01.domains covers it",
    );
    let mut v = base();
    wildcard(&mut v);
    v["spec"]["tls"]["acme"]["dns01"] = dns01();
    v["spec"]["tls"]["acme"]["dns01"]["domains"] = json!(["example.com"]);
    assert!(run(v).is_ok());
    // The user's own Secret: allowed.
    let mut v = base();
    wildcard(&mut v);
    v["spec"]["tls"] = json!({"secretName": "wild-cert"});
    assert!(run(v).is_ok());
    // Only as the whole first label.
    for bad in [
        "a.*.example.com",
        "*x.example.com",
        "*.com",
        "**.example.com",
    ] {
        let errs = errors(|v| {
            v["spec"]["gateway"]["hosts"] = json!([bad]);
            v["spec"]["tls"] = json!({"secretName": "wild-cert"});
        });
        assert!(
            errs.iter().any(|e| e.starts_with("spec.gateway.hosts[0]")),
            "{bad}: {errs:?}"
        );
    }
}

#[test]
fn dns01_per_domain_covers_the_domain_and_below() {
    let d = Dns01 {
        domains: vec!["example.com".into()],
        propagation_timeout: Duration::from_secs(1),
        rfc2136: Rfc2136 {
            nameserver: "ns:53".into(),
            zone: None,
            tsig_key_name: "k".into(),
            tsig_algorithm: Default::default(),
            tsig_secret: SecretKey {
                name: "s".into(),
                key: "k".into(),
            },
        },
    };
    for host in ["example.com", "*.example.com", "a.b.example.com"] {
        assert!(d.covers(host), "{host}");
    }
    for host in ["example.org", "notexample.com", "*.com"] {
        assert!(!d.covers(host), "{host}");
    }
}

#[test]
fn dns01_nameservers_on_internal_addresses_are_refused() {
    let problems = |ns: &str, allow_loopback: bool| {
        let mut v = base();
        v["spec"]["tls"]["acme"]["dns01"] = dns01();
        v["spec"]["tls"]["acme"]["dns01"]["rfc2136"]["nameserver"] = json!(ns);
        let stack: OpsConductorStack = serde_json::from_value(v).unwrap();
        directory_url_problems(&stack, allow_loopback)
            .into_iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        problems("169.254.169.254", true),
        format!(
            "spec.tls.acme.dns01.rfc2136.nameserver: \"169.254.169.254\" names {}",
            Internal::LinkLocal.why()
        )
    );
    assert!(problems("[fe80::1]:53", true).contains("link-local"));
    assert!(problems("0.0.0.0:53", true).contains("unspecified"));
    let p = problems("127.0.0.1:5353", false);
    assert!(
        p.starts_with("spec.tls.acme.dns01.rfc2136.nameserver: ") && p.contains("loopback"),
        "{p}"
    );
    assert_eq!(problems("127.0.0.1:5353", true), "");
    assert_eq!(problems("ns1.example.com", false), "");
}

#[test]
fn directory_urls_on_internal_addresses_are_refused() {
    let problems = |url: &str, allow_loopback: bool| {
        let mut v = base();
        v["spec"]["tls"]["acme"]["directoryUrl"] = json!(url);
        let stack: OpsConductorStack = serde_json::from_value(v).unwrap();
        directory_url_problems(&stack, allow_loopback)
            .into_iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    for url in [
        "https://169.254.169.254/latest",
        "https://169.254.169.254:443/dir",
        "https://user@169.254.1.1/dir",
        "https://[fe80::1]/dir",
        "https://[fd00:ec2::254]/dir",
        "https://[::ffff:169.254.169.254]/dir",
        "https://2852039166/dir",
        "https://0xa9.0xfe.0xa9.0xfe/dir",
        "https://0251.0376.0251.0376/dir",
        "https://169.254.43518/dir",
    ] {
        let p = problems(url, true);
        assert!(
            p.starts_with("spec.tls.acme.directoryUrl: ") && p.contains("link-local"),
            "{url}: {p:?}"
        );
    }
    for url in [
        "https://127.0.0.1:14000/dir",
        "https://127.1/dir",
        "https://2130706433/dir",
        "https://0x7f.1/dir",
        "https://[::1]:14000/dir",
        "https://[::ffff:127.0.0.1]/dir",
        "https://localhost/dir",
        "https://LocalHost./dir",
        "https://acme.localhost/dir",
    ] {
        let p = problems(url, false);
        assert!(
            p.contains("spec.tls.acme.directoryUrl") && p.contains("loopback"),
            "{url}: {p:?}"
        );
        assert_eq!(problems(url, true), "", "{url} with loopback allowed");
    }
    for url in ["https://0.0.0.0/dir", "https://0/dir", "https://[::]/dir"] {
        assert!(problems(url, true).contains("unspecified"), "{url}");
    }
    for url in [
        "https://acme-v02.api.letsencrypt.org/directory",
        "https://10.250.0.1:14000/dir",
        "https://192.168.1.10/dir",
        "https://[fd12::1]/dir",
        "https://1.2.3.4.5/dir",
        "https://0x/dir",
        "https://169.254.169.254.example.com/dir",
    ] {
        assert_eq!(problems(url, false), "", "{url}");
    }
}

#[test]
fn wide_egress_needs_an_explicit_yes() {
    let egress = |rule: Value| {
        let mut v = base();
        v["spec"]["services"][1]["egress"] = json!([rule]);
        run(v)
    };
    for cidr in [
        "0.0.0.0/0",
        "0.0.0.0/1",
        "128.0.0.0/1",
        "10.0.0.0/7",
        "::/0",
        "2000::/3",
        "fd00::/15",
    ] {
        let err = egress(json!({"cidr": cidr, "ports": [443]}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "spec.services[1].egress[0].cidr: {cidr:?} is wider than /"
            )) && err.contains("set spec.services[1].egress[0].allowWide: true"),
            "{cidr}: {err}"
        );
        let ok = egress(json!({"cidr": cidr, "ports": [443], "allowWide": true}))
            .unwrap_or_else(|e| panic!("{cidr} with allowWide: {e}"));
        assert_eq!(ok.services[1].egress[0].cidr.to_string(), cidr);
    }
    for cidr in ["10.0.0.0/8", "203.0.113.0/24", "fd00::/16", "2001:db8::/32"] {
        egress(json!({"cidr": cidr, "ports": [443]})).unwrap_or_else(|e| panic!("{cidr}: {e}"));
    }
    // allowWide never lets link-local or loopback through.
    let err = egress(json!({"cidr": "169.254.0.0/16", "ports": [80], "allowWide": true}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("link-local"), "{err}");
}

#[test]
fn egress_into_the_clusters_own_ranges_is_refused() {
    let cluster: Vec<IpNet> = ["10.244.0.0/16", "10.96.0.0/12", "fd00:10:96::/112"]
        .iter()
        .map(|c| check_cluster_cidr(c).unwrap())
        .collect();
    let problems = |cidr: &str| {
        let mut v = base();
        v["spec"]["services"][1]["egress"] =
            json!([{"cidr": "203.0.113.0/24", "ports": [443]}, {"cidr": cidr, "ports": [443]}]);
        let stack: OpsConductorStack = serde_json::from_value(v).unwrap();
        egress_cluster_problems(&stack, &cluster)
    };
    for (cidr, range) in [
        ("10.244.0.0/16", "10.244.0.0/16"),
        ("10.244.7.0/24", "10.244.0.0/16"),
        ("10.100.0.10/32", "10.96.0.0/12"),
        ("fd00:10:96::a/128", "fd00:10:96::/112"),
    ] {
        let p = problems(cidr);
        assert_eq!(p.len(), 1, "{cidr}: {p:?}");
        assert_eq!(p[0].path, "spec.services[1].egress[1].cidr");
        assert!(
            p[0].message.starts_with(&format!(
                "{cidr:?} lies inside the cluster's own range {range} (the operator's \
                 --cluster-cidrs)"
            )),
            "{cidr}: {}",
            p[0].message
        );
    }
    // Outside, or holding a cluster range (cut out of it when built): fine here.
    for cidr in [
        "10.0.0.0/8",
        "0.0.0.0/0",
        "10.243.0.0/16",
        "192.0.2.1/32",
        "::/0",
    ] {
        assert_eq!(problems(cidr), vec![], "{cidr}");
    }
    // No ranges configured: nothing to check.
    let stack: OpsConductorStack = serde_json::from_value(base()).unwrap();
    assert_eq!(egress_cluster_problems(&stack, &[]), vec![]);
    assert!(
        check_cluster_cidr("10.244.0.1/16")
            .unwrap_err()
            .contains("host bits")
    );
    assert!(
        check_cluster_cidr("cluster")
            .unwrap_err()
            .contains("is not a CIDR")
    );
}

#[test]
fn gateway_images_outside_the_allow_list_are_refused() {
    let problems = |image: &str, allowed: &[&str]| {
        let mut v = base();
        v["spec"]["gateway"]["image"] = json!(image);
        let stack: OpsConductorStack = serde_json::from_value(v).unwrap();
        let allowed: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
        gateway_image_problems(&stack, &allowed)
            .into_iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let list = [
        "ghcr.io/opsconductor/opsconductor-gateway",
        "registry.example.com:5000/approved/",
    ];
    for ok in [
        "ghcr.io/opsconductor/opsconductor-gateway:0.1.0",
        "ghcr.io/opsconductor/opsconductor-gateway@sha256:abc",
        "ghcr.io/opsconductor/opsconductor-gateway:0.1@sha256:abc",
        "ghcr.io/opsconductor/opsconductor-gateway",
        "registry.example.com:5000/approved/nginx:1.27",
        "registry.example.com:5000/approved/team/nginx",
    ] {
        assert_eq!(problems(ok, &list), "", "{ok}");
        assert_eq!(problems(ok, &[]), "", "{ok}: no list, any image");
    }
    for bad in [
        "nginx:1.27",
        "ghcr.io/opsconductor/opsconductor-gateway-evil:1",
        "ghcr.io/opsconductor/opsconductor-gateway/evil:1",
        "evil.example/ghcr.io/opsconductor/opsconductor-gateway:1",
        "registry.example.com:5000/approved:1",
        "registry.example.com:5000/approvedx/nginx",
    ] {
        let p = problems(bad, &list);
        assert!(
            p.starts_with("spec.gateway.image: ") && p.contains("not one of the gateway images"),
            "{bad}: {p:?}"
        );
    }
}

/// The PROXY protocol goes with ACME (the base stack has `tls.acme`): the CA validates through
/// the proxy that sends the header, the self-check sends its own. Without trusted proxies it
/// is still refused.
#[test]
fn the_proxy_protocol_is_accepted_with_acme() {
    let stack = run({
        let mut v = base();
        v["spec"]["gateway"]["proxyProtocol"] = json!(true);
        v["spec"]["gateway"]["trustedProxies"] = json!(["10.0.0.0/8"]);
        v
    })
    .unwrap();
    assert!(stack.gateway.proxy_protocol);
    assert!(matches!(stack.tls.source, CertificateSource::Acme(_)));
    assert_error(
        |v| v["spec"]["gateway"]["proxyProtocol"] = json!(true),
        "spec.gateway.trustedProxies: proxyProtocol: true needs the addresses",
    );
}

/// Hostile text at every spec field whose value reaches nginx.conf as text (names, hosts,
/// routes, paths, headers, CIDRs, sizes, the policy): each value is a valid one with a hostile
/// tail (a new line and a directive, `;`, quotes, braces, `$`, `\`, CR, NUL, space, `#`).
/// Either the operator refuses it with an error at that field's path, or (a Content-Security-
/// Policy, where `;`, `'`, space and `#` are ordinary) the whole value stands inside one
/// double-quoted nginx string on a single line of the rendered file.
#[test]
fn hostile_strings_at_every_nginx_field_are_refused_or_quoted() {
    const TAILS: &[&str] = &[
        "\nreturn 200 pwned;",
        ";return 200 pwned",
        "\"pwned",
        "{pwned",
        "}pwned",
        "$pwned",
        "\\pwned",
        "\rpwned",
        "\u{0}pwned",
        " pwned",
        "#pwned",
        "'pwned",
    ];
    // The fields: where the value goes, its valid form, and the tails it may take.
    type Set = fn(&mut Value, Value);
    let fields: &[(&str, &str, Set, &[&str])] = &[
        (
            "metadata.name",
            "prod",
            |v, x| v["metadata"]["name"] = x,
            &[],
        ),
        (
            "metadata.namespace",
            "ops",
            |v, x| v["metadata"]["namespace"] = x,
            &[],
        ),
        (
            "spec.gateway.hosts[0]",
            "ops.example.com",
            |v, x| v["spec"]["gateway"]["hosts"][0] = x,
            &[],
        ),
        (
            "spec.services[1].name",
            "users",
            |v, x| v["spec"]["services"][1]["name"] = x,
            &[],
        ),
        (
            "spec.services[0].route",
            "/api/v1/auth/",
            |v, x| v["spec"]["services"][0]["route"] = x,
            &[],
        ),
        (
            "spec.gateway.clientMaxBodySize",
            "1m",
            |v, x| v["spec"]["gateway"]["clientMaxBodySize"] = x,
            &[],
        ),
        (
            "spec.gateway.trustedProxies[0]",
            "10.0.0.0/8",
            |v, x| v["spec"]["gateway"]["trustedProxies"] = json!([x]),
            &[],
        ),
        (
            "spec.gateway.allowedSourceRanges[0]",
            "10.0.0.0/8",
            |v, x| v["spec"]["gateway"]["allowedSourceRanges"] = json!([x]),
            &[],
        ),
        (
            "spec.gateway.stripRequestHeaders[0]",
            "X-Tenant",
            |v, x| v["spec"]["gateway"]["stripRequestHeaders"] = json!([x]),
            &[],
        ),
        (
            "spec.gateway.contentSecurityPolicy.policy",
            "default-src 'self'",
            |v, x| v["spec"]["gateway"]["contentSecurityPolicy"] = json!({"policy": x}),
            &[";return 200 pwned", " pwned", "#pwned", "'pwned"],
        ),
        (
            "spec.gateway.edgeAuth.service",
            "auth",
            |v, x| v["spec"]["gateway"]["edgeAuth"]["service"] = x,
            &[],
        ),
        (
            "spec.gateway.edgeAuth.path",
            "/api/v1/auth/verify",
            |v, x| v["spec"]["gateway"]["edgeAuth"]["path"] = x,
            &[],
        ),
        (
            "spec.gateway.edgeAuth.passHeaders[0]",
            "X-User-Id",
            |v, x| v["spec"]["gateway"]["edgeAuth"]["passHeaders"][0] = x,
            &[],
        ),
        (
            "spec.services[1].edgeAuth.publicPaths[0]",
            "/api/v1/users/signup",
            |v, x| v["spec"]["services"][1]["edgeAuth"]["publicPaths"][0] = x,
            &[],
        ),
    ];
    let options = crate::build::BuildOptions::default();
    for (path, valid, set, may_take) in fields {
        // The valid form is accepted: a refusal below is the tail's doing.
        let mut v = base();
        with_edge_auth(&mut v);
        set(&mut v, json!(valid));
        if let Err(e) = run(v) {
            panic!("{path}: the valid value {valid:?} is refused: {e}");
        }
        for tail in TAILS {
            let value = format!("{valid}{tail}");
            let mut v = base();
            with_edge_auth(&mut v);
            set(&mut v, json!(value));
            match run(v) {
                Err(e) => {
                    let lines: Vec<String> = e.0.iter().map(ToString::to_string).collect();
                    assert!(
                        lines.iter().any(|l| l.starts_with(&format!("{path}:"))),
                        "{path} = {value:?}: refused, but not at the field: {lines:#?}"
                    );
                }
                Ok(stack) => {
                    assert!(may_take.contains(tail), "{path} = {value:?} was accepted");
                    let conf = crate::build::nginx::render(&stack, &options);
                    let quoted = format!("\"{value}\"");
                    let carrying: Vec<&str> =
                        conf.lines().filter(|l| l.contains("pwned")).collect();
                    assert!(
                        !carrying.is_empty() && carrying.iter().all(|l| l.contains(&quoted)),
                        "{path} = {value:?} is not one quoted string: {carrying:#?}"
                    );
                }
            }
        }
    }
}

#[test]
fn gateway_metrics_need_scrapers_and_valid_selectors() {
    // Absent, or present but not enabled: no exporter.
    assert_eq!(run(base()).unwrap().gateway.metrics, None);
    let mut v = base();
    v["spec"]["gateway"]["metrics"] = json!({"enabled": false});
    assert_eq!(run(v).unwrap().gateway.metrics, None);
    // Enabled: the default image, the scrapers as given.
    let mut v = base();
    v["spec"]["gateway"]["metrics"] = json!({"enabled": true, "allowFrom": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]});
    let m = run(v).unwrap().gateway.metrics.unwrap();
    assert_eq!(m.image, crate::crd::DEFAULT_GATEWAY_IMAGE);
    assert_eq!(m.allow_from.len(), 1);
    assert!(m.allow_from[0].pod_selector.is_some());
    assert_error(
        |v| v["spec"]["gateway"]["metrics"] = json!({"enabled": true}),
        "spec.gateway.metrics.allowFrom: must name who may scrape",
    );
    assert_error(
        |v| {
            v["spec"]["gateway"]["metrics"] = json!({"enabled": true, "allowFrom": [
                {"namespaceSelector": {"matchLabels": {"bad key!": "x"}}}]})
        },
        "spec.gateway.metrics.allowFrom[0].namespaceSelector.matchLabels",
    );
    assert_error(
        |v| {
            v["spec"]["gateway"]["metrics"] = json!({"enabled": true, "allowFrom": [
                {"namespaceSelector": {}, "podSelector": {"matchExpressions": [
                    {"key": "app", "operator": "Near"}]}}]})
        },
        "spec.gateway.metrics.allowFrom[0].podSelector.matchExpressions[0].operator",
    );
    assert_error(
        |v| {
            v["spec"]["gateway"]["metrics"] =
                json!({"enabled": true, "image": " ", "allowFrom": [{"namespaceSelector": {}}]})
        },
        "spec.gateway.metrics.image: must not be empty",
    );
}

#[test]
fn the_gateway_image_allow_list_applies_to_the_metrics_exporter() {
    let list = vec!["ghcr.io/opsconductor/opsconductor-gateway".to_string()];
    let problems = |metrics: Value| {
        let mut v = base();
        v["spec"]["gateway"]["metrics"] = metrics;
        let stack: OpsConductorStack = serde_json::from_value(v).unwrap();
        gateway_image_problems(&stack, &list)
            .into_iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
    };
    let scrapers = json!([{"namespaceSelector": {}}]);
    // The default exporter image is the gateway image.
    assert!(problems(json!({"enabled": true, "allowFrom": scrapers})).is_empty());
    let p = problems(json!({"enabled": true, "allowFrom": scrapers, "image": "evil/exporter:1"}));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with("spec.gateway.metrics.image: ") && p[0].contains("evil/exporter:1"),
        "{p:?}"
    );
    // Not enabled: the image is not run, not checked.
    assert!(problems(json!({"enabled": false, "image": "evil/exporter:1"})).is_empty());
}

#[test]
fn service_identity_is_off_unless_enabled_and_names_the_stack_and_namespace() {
    let off = run(base()).unwrap();
    assert_eq!(off.service_identity, None);
    let mut v = base();
    v["spec"]["serviceIdentity"] = json!({});
    assert_eq!(
        run(v).unwrap().service_identity,
        None,
        "enabled defaults to false"
    );

    let mut v = base();
    v["spec"]["serviceIdentity"] = json!({"enabled": true});
    let on = run(v).unwrap().service_identity.unwrap();
    assert_eq!(on.audience, "opsconductor.io/ops/prod");
    assert_eq!(on.expiration_seconds, 3600, "the default lifetime");

    // The same stack name in another namespace has another audience.
    let mut v = base();
    v["metadata"]["namespace"] = json!("staging");
    v["spec"]["serviceIdentity"] = json!({"enabled": true, "expirationSeconds": 600});
    let other = run(v).unwrap().service_identity.unwrap();
    assert_eq!(other.audience, "opsconductor.io/staging/prod");
    assert_eq!(other.expiration_seconds, 600);
}

#[test]
fn service_identity_lifetime_out_of_range_names_the_field() {
    for bad in [0, 599, 86_401, -1] {
        assert_error(
            |v| v["spec"]["serviceIdentity"] = json!({"enabled": true, "expirationSeconds": bad}),
            &format!(
                "spec.serviceIdentity.expirationSeconds: {bad} is out of range 600 to 86400 seconds"
            ),
        );
    }
    // Checked even while disabled: the schema refuses it either way.
    assert_error(
        |v| v["spec"]["serviceIdentity"] = json!({"expirationSeconds": 100}),
        "spec.serviceIdentity.expirationSeconds: 100 is out of range",
    );
    for good in [600, 86_400] {
        let errs = errors(|v| {
            v["spec"]["serviceIdentity"] = json!({"enabled": true, "expirationSeconds": good})
        });
        assert!(errs.is_empty(), "{good}: {errs:?}");
    }
}

#[test]
fn service_identity_refuses_env_names_the_operator_sets() {
    let edit = |v: &mut Value| {
        v["spec"]["serviceIdentity"] = json!({"enabled": true});
        v["spec"]["services"][1]["env"] = json!([{"name": "A", "value": "1"}, {"name": "OPSC_IDENTITY_TOKEN_FILE", "value": "/x"}]);
    };
    assert_error(
        edit,
        "spec.services[1].env[1].name: \"OPSC_IDENTITY_TOKEN_FILE\" is set by the operator",
    );
    // Without identity the name is the service's to use.
    let errs = errors(|v| {
        v["spec"]["services"][1]["env"] =
            json!([{"name": "OPSC_IDENTITY_TOKEN_FILE", "value": "/x"}]);
    });
    assert!(errs.is_empty(), "{errs:?}");
}
